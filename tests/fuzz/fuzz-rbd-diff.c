/*
 * libFuzzer target for the RBD diff stream reader (src/core/rbd_diff.c,
 * include/vdisk/rbd-diff.h): an arbitrary byte string scanned as a
 * stream, as `vdisk import-diff` scans it before its first write.
 *
 * The first input byte picks the image size the data records are held
 * to when the stream has no size record (bit 0: unbounded, else 2^(the
 * byte / 2 % 48) bytes) and whether the stream starts at offset 0 or 7
 * of the file (bit 7: seven junk bytes first, as a stream inside rbd's
 * export files starts at an offset). The rest is written to an
 * anonymous memory file. Every extent handed out must lie inside the
 * bound and its data inside the file; its bytes are read back, so a
 * wrong data position shows up as a short read (abort), and the record
 * counts must add up to the calls.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vdisk/rbd-diff.h"

#define MAX_INPUT (1u << 20)

typedef struct ctx {
    int fd;
    uint64_t limit, bound, calls;
    uint8_t buf[4096];
} ctx;

static int each_extent(void *opaque, bool zero, uint64_t offset,
                       uint64_t length, uint64_t data_pos, vd_error *err)
{
    ctx *c = opaque;

    (void)err;
    c->calls++;
    if (offset > c->bound || length > c->bound - offset) {
        abort();
    }
    if (!zero) {
        size_t n = length < sizeof(c->buf) ? (size_t)length : sizeof(c->buf);

        if (data_pos > c->limit || length > c->limit - data_pos) {
            abort();
        }
        if (n && pread(c->fd, c->buf, n, (off_t)data_pos) != (ssize_t)n) {
            abort();
        }
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    vd_rbd_diff_info info;
    vd_error err = VD_ERROR_INIT;
    uint64_t start, image_size;
    ctx c;
    int r;

    if (size < 1 || size > MAX_INPUT) {
        return 0;
    }
    memset(&c, 0, sizeof(c));
    start = data[0] & 0x80 ? 7 : 0;
    image_size = data[0] & 1 ? UINT64_MAX : 1ull << (data[0] / 2 % 48);
    c.fd = memfd_create("rbd-diff", 0);
    if (c.fd < 0) {
        return 0;
    }
    if ((start && write(c.fd, "junk!!\n", 7) != 7) ||
        (size > 1 && write(c.fd, data + 1, size - 1) != (ssize_t)(size - 1))) {
        close(c.fd);
        return 0;
    }
    c.limit = start + size - 1;
    r = vd_rbd_diff_scan(c.fd, start, c.limit, image_size, &info, NULL, NULL,
                         &err);
    /* the bound of the data records: the size record, else the image */
    c.bound = info.has_size ? info.size : image_size;
    vd_rbd_diff_info_clear(&info);
    vd_error_clear(&err);
    if (r >= 0) {
        /* A valid stream: scan again with the callback (import-diff's
         * second pass) and check what it hands out. */
        r = vd_rbd_diff_scan(c.fd, start, c.limit, image_size, &info,
                             each_extent, &c, &err);
        if (r < 0 || info.end > c.limit || info.end <= start ||
            c.calls != info.write_records + info.zero_records) {
            abort();
        }
        vd_rbd_diff_info_clear(&info);
        vd_error_clear(&err);
    }
    close(c.fd);
    return 0;
}
