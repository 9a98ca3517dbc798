/*
 * libFuzzer target: the vhdx driver's parsers (src/drivers/vhdx.c):
 * headers and their CRC-32C, the region table, the metadata items, the
 * BAT and its validation, the log search and replay on a writable open,
 * then reads, block status, check and writes (fuzz-format.h's passes).
 *
 * A VHDX file is at least a few MiB with its structures far apart (the
 * BAT and the metadata at 2 and 3 MiB in qemu-img's layout), beyond any
 * useful input length, so the input is a list of patches of a sparse
 * file: each is a 3-byte little-endian offset in 512-byte units, a
 * 2-byte length (at most 4096) and that many bytes. tests/fuzz/run.sh
 * turns qemu-img's images into this form for the seeds.
 */
#define _GNU_SOURCE
#include <sys/mman.h>
#include <unistd.h>

#include "fuzz-format.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64];
    int fd = memfd_create("vhdx", 0);

    if (fd < 0) {
        return 0;
    }
    while (size >= 5) {
        uint64_t off = ((uint64_t)data[0] | (uint64_t)data[1] << 8 |
                        (uint64_t)data[2] << 16) * 512;
        size_t len = (size_t)(data[3] | data[4] << 8);
        data += 5;
        size -= 5;
        if (len > 4096) {
            len = 4096;
        }
        if (len > size) {
            len = size;
        }
        if (pwrite(fd, data, len, (off_t)off) != (ssize_t)len) {
            break;
        }
        data += len;
        size -= len;
    }
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    fuzz_format_passes("vhdx", path);
    close(fd);
    return 0;
}
