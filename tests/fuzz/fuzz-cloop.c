/*
 * libFuzzer target: an arbitrary byte string opened as a cloop image
 * (src/drivers/cloop.c): the header bounds (block size, block count),
 * the offsets table (monotonic, read only as far as the file holds it)
 * and zlib blocks through reads and block status. The driver
 * reads only, so fuzz-format.h's writable pass must be refused. The run
 * is fuzz-format.h's.
 */
#define _GNU_SOURCE
#include "fuzz-format.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_format_run("cloop", data, size);
}
