/* libnbd's types and constants (Debian libnbd-dev). Nothing is linked: qimg loads
   libnbd.so.0 with dlopen on first use (Sources/QCow2/Live/NBD/LibNBD.swift), because
   linking it (with gnutls and libxml2 behind it) would slow every command's start. */
#ifndef QIMG_CNBD_SHIM_H
#define QIMG_CNBD_SHIM_H
#include <libnbd.h>
#endif
