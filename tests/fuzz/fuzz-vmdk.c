/*
 * libFuzzer target: an arbitrary byte string opened as a vmdk image
 * (src/drivers/vmdk.c): the hosted sparse header (VMDK4 "KDMV", VMDK3
 * "COWD", the stream footer), the grain directory bounds, grain table
 * lookups, compressed grains and their markers, and the descriptor text
 * (extent lines, CID, parentFileNameHint); reads, block status, check
 * and, on a writable open, the layout checks that guard the first write
 * and grain allocation. The run is fuzz-format.h's.
 *
 * An input that starts with the seSparse const header magic (0xcafebabe,
 * 64-bit little-endian) is an seSparse extent file instead: it is opened
 * through a descriptor naming it (a second memory file), so that the
 * const and volatile header checks, the 64-bit grain directory and the
 * grain table entry kinds are fuzzed too.
 */
#define _GNU_SOURCE
#include "fuzz-format.h"

static const uint8_t se_magic[8] = { 0xbe, 0xba, 0xfe, 0xca, 0, 0, 0, 0 };

static void fuzz_sesparse(const uint8_t *data, size_t size)
{
    char ext[64], path[64], desc[256];
    int efd = fuzz_memfd("vmdk-se", data, size, 1u << 20, ext, sizeof(ext));
    int dfd, n;

    if (efd < 0) {
        return;
    }
    n = snprintf(desc, sizeof(desc), "# Disk DescriptorFile\nversion=1\n"
                 "CID=1\nparentCID=ffffffff\ncreateType=\"seSparse\"\n"
                 "RW 8 SESPARSE \"%s\"\n", ext);
    dfd = fuzz_memfd("vmdk", (const uint8_t *)desc, (size_t)n, sizeof(desc),
                     path, sizeof(path));
    if (dfd >= 0) {
        fuzz_format_passes("vmdk", path);
        close(dfd);
    }
    close(efd);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size >= sizeof(se_magic) && !memcmp(data, se_magic, sizeof(se_magic))) {
        fuzz_sesparse(data, size);
        return 0;
    }
    return fuzz_format_run("vmdk", data, size);
}
