/*
 * libFuzzer target: an arbitrary byte string opened as a vpc (VHD) image
 * (src/drivers/vpc.c): footer, checksum, geometry and dynamic header
 * parsing and the BAT bounds; reads, block status (BAT lookups) and, on a
 * writable open, the layout checks that guard the first write and block
 * allocation. The run is fuzz-format.h's.
 */
#define _GNU_SOURCE
#include "fuzz-format.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_format_run("vpc", data, size);
}
