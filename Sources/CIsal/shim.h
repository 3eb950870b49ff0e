/* ISA-L's igzip: its types and constants only. Nothing is linked: qimg loads
   libisal.so.2 with dlopen when a copy compresses (Sources/QCow2/Features/LibIsal.swift),
   so that the commands that never compress don't load it at start-up. */
#include <isa-l/igzip_lib.h>

/* The level buffer igzip's level 3 works best with (a macro expression Swift cannot import). */
static const unsigned int qimg_isal_level3_buffer = ISAL_DEF_LVL3_DEFAULT;
