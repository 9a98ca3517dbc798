/*
 * libFuzzer target: an arbitrary byte string as a qcow (version 1) image
 * (src/drivers/qcow.c), opened read-only as the driver allows.
 *
 * When the open succeeds the target reads a cluster-sized piece at the
 * start, the middle and the end of the virtual disk (L1 and L2 lookups,
 * compressed clusters through zlib) and walks block status for a bounded
 * number of extents. The driver reads only the part of the L1 table that
 * lies inside the file, so a 256 KiB input cannot make it allocate more
 * than about that; a header that claims a huge disk is the common case.
 */
#define _GNU_SOURCE
#include <stdint.h>

#include "vdisk/vdisk.h"
#include "fuzz-memfd.h"

#define PIECE 65536
#define MAX_EXTENTS 64

static void quiet(const char *msg, void *opaque)
{
    (void)msg;
    (void)opaque;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t buf[PIECE];
    char path[64];
    vd_node *node = NULL;
    int fd;

    vd_set_warning_handler(quiet, NULL);
    fd = fuzz_memfd("fuzz-qcow", data, size, 1 << 18, path, sizeof(path));
    if (fd < 0) {
        return 0;
    }
    if (vd_open(&node, path, "qcow", NULL,
                VD_O_NO_BACKING | VD_O_FORCE_SHARE | VD_O_QUIET, NULL) == 0) {
        int64_t len = vd_getlength(node);
        uint64_t at[3] = { 0, (uint64_t)len / 2, (uint64_t)len - PIECE };

        for (int i = 0; i < 3 && len >= PIECE; i++) {
            vd_pread(node, buf, PIECE, at[i] & ~511ull, 0, NULL);
        }
        fuzz_walk_extents(node, len, MAX_EXTENTS);
        vd_close(&node, NULL);
    }
    close(fd);
    return 0;
}
