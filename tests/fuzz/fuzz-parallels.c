/*
 * libFuzzer target: an arbitrary byte string opened as a parallels image
 * (src/drivers/parallels.c): header checks, the BAT's validation, reads,
 * block status, check, and cluster allocation on a writable open (which
 * also marks the header in use and cuts the file at close). The run is
 * fuzz-format.h's.
 */
#define _GNU_SOURCE
#include "fuzz-format.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_format_run("parallels", data, size);
}
