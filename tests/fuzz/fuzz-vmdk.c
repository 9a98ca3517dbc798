/*
 * libFuzzer target: an arbitrary byte string opened as a vmdk image
 * (src/drivers/vmdk.c): the hosted sparse header (VMDK4 "KDMV", VMDK3
 * "COWD", the stream footer), the grain directory bounds, grain table
 * lookups, compressed grains and their markers, and the descriptor text
 * (extent lines, CID, parentFileNameHint); reads, block status, check
 * and, on a writable open, the layout checks that guard the first write
 * and grain allocation. The run is fuzz-format.h's.
 */
#define _GNU_SOURCE
#include "fuzz-format.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_format_run("vmdk", data, size);
}
