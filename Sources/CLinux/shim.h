/* Linux calls that Swift's Glibc module does not expose (they need _GNU_SOURCE). */
#ifndef QIMG_CLINUX_SHIM_H
#define QIMG_CLINUX_SHIM_H

/* renameat2(2), glibc >= 2.28. */
extern int renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned int flags);

#define QIMG_RENAME_NOREPLACE 1u
#define QIMG_AT_FDCWD (-100)

#endif
