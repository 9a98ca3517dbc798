/*
 * libFuzzer target: an arbitrary byte string opened as a vdi image
 * (src/drivers/vdi.c): header checks, the block map's validation, reads,
 * block status, check, and block allocation on a writable open. The run
 * is fuzz-format.h's.
 */
#define _GNU_SOURCE
#include "fuzz-format.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_format_run("vdi", data, size);
}
