/*
 * libFuzzer target: open an arbitrary byte string as a vpc (VHD) image.
 *
 * The input goes into an anonymous memory file, opened read-only as vpc
 * through the public API: footer, checksum, geometry and dynamic header
 * parsing and the BAT bounds. When it opens, the target reads the start,
 * middle and end of the disk and walks block status (BAT lookups); then
 * it opens the same file read-write (the layout checks that guard the
 * first write) and writes one sector in the middle, which allocates a
 * block or writes into a fixed disk. The sanitizers report what matters.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vdisk/vdisk.h"
#include "fuzz-memfd.h"

#define READ_LEN (64 * 1024)
#define MAX_EXTENTS 64

static void ignore_warning(const char *msg, void *opaque)
{
    (void)msg;
    (void)opaque;
}

static void read_at(vd_node *node, uint8_t *buf, int64_t size, int64_t off)
{
    uint64_t len = READ_LEN;

    if (off < 0 || off >= size) {
        return;
    }
    if ((uint64_t)(size - off) < len) {
        len = (uint64_t)(size - off);
    }
    vd_pread(node, buf, len, (uint64_t)off, 0, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t buf[READ_LEN];
    char path[64];
    vd_node *node = NULL;
    int64_t len = 0;
    int fd;

    vd_set_warning_handler(ignore_warning, NULL);
    fd = fuzz_memfd("fuzz-vpc", data, size, 1 << 20, path, sizeof(path));
    if (fd < 0) {
        return 0;
    }
    if (vd_open(&node, path, "vpc", NULL,
                VD_O_FORCE_SHARE | VD_O_QUIET, NULL) == 0) {
        uint64_t off = 0;

        len = vd_getlength(node);
        if (len > 0) {
            read_at(node, buf, len, 0);
            read_at(node, buf, len, (len / 2) & ~(int64_t)511);
            read_at(node, buf, len, (len - READ_LEN) & ~(int64_t)511);
            for (int i = 0; i < MAX_EXTENTS && off < (uint64_t)len; i++) {
                vd_extent ext;

                if (vd_block_status(node, off, (uint64_t)len - off, &ext,
                                    NULL) < 0 || ext.length == 0) {
                    break;
                }
                off += ext.length;
            }
        }
        vd_close(&node, NULL);
    }
    /* Writable: only disks small enough that a block allocation stays
     * in memory (the memory file grows by at most a block). */
    if (len > 0 && len <= (64 << 20) &&
        vd_open(&node, path, "vpc", NULL,
                VD_O_RDWR | VD_O_FORCE_SHARE | VD_O_QUIET, NULL) == 0) {
        memset(buf, 0x5a, 512);
        vd_pwrite(node, buf, 512, (uint64_t)(len / 2) & ~511ull, 0, NULL);
        vd_close(&node, NULL);
    }
    close(fd);
    return 0;
}
