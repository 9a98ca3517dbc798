/*
 * libFuzzer target: an arbitrary byte string opened as a bochs redolog
 * (src/drivers/bochs.c): the header checks, the catalog bounds (1M
 * entries at most, read only as far as the file holds it), extent
 * bitmaps and data lookups through reads and block status. The driver
 * reads only, so fuzz-format.h's writable pass must be refused. The run
 * is fuzz-format.h's.
 */
#define _GNU_SOURCE
#include "fuzz-format.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_format_run("bochs", data, size);
}
