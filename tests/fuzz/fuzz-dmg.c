/*
 * libFuzzer target: an arbitrary byte string opened as a dmg (UDIF) image
 * (src/drivers/dmg.c): the koly trailer search and its bounds, the
 * resource fork and XML property list walks (glib-style base64), the mish
 * chunk bounds, and zero, raw, zlib and bzip2 chunks through reads. The driver
 * reads only, so fuzz-format.h's writable pass must be refused. The run
 * is fuzz-format.h's.
 */
#define _GNU_SOURCE
#include "fuzz-format.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_format_run("dmg", data, size);
}
