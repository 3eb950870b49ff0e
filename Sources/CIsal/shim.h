#include <isa-l/igzip_lib.h>

/* The level buffer igzip's level 3 works best with (a macro expression Swift cannot import). */
static const unsigned int qimg_isal_level3_buffer = ISAL_DEF_LVL3_DEFAULT;
