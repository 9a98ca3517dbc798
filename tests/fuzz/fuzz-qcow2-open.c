/*
 * libFuzzer target: open an arbitrary byte string as a qcow2 image.
 *
 * Each input is written to an anonymous memory file and opened through
 * the public API (format qcow2, read-only, no backing chain, no locking).
 * When the open succeeds the target reads a few ranges (start, middle,
 * end of the virtual disk, which exercises L1/L2 lookups, compressed
 * clusters and zero clusters) and walks block status for a bounded number
 * of extents. Errors are the expected outcome for most inputs; the
 * sanitizers report what matters (crashes, leaks, overflows, hangs).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vdisk/vdisk.h"

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
    int fd;

    vd_set_warning_handler(ignore_warning, NULL);
    fd = memfd_create("fuzz-qcow2", 0);
    if (fd < 0) {
        return 0;
    }
    if (size && write(fd, data, size) != (ssize_t)size) {
        close(fd);
        return 0;
    }
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);

    if (vd_open(&node, path, "qcow2", NULL,
                VD_O_NO_BACKING | VD_O_FORCE_SHARE | VD_O_QUIET,
                NULL) == 0) {
        int64_t len = vd_getlength(node);

        if (len > 0) {
            uint64_t off = 0;
            int i;

            read_at(node, buf, len, 0);
            read_at(node, buf, len, (len / 2) & ~(int64_t)511);
            read_at(node, buf, len, (len - READ_LEN) & ~(int64_t)511);
            for (i = 0; i < MAX_EXTENTS && off < (uint64_t)len; i++) {
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
    close(fd);
    return 0;
}
