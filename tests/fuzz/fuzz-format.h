/*
 * For the libFuzzer targets of the simple image formats (vdi, vpc,
 * parallels): the input opened as an image of one format, read-only
 * first (reads at the start, middle and end of the virtual disk, a
 * bounded block-status walk and the consistency check), then read-write
 * with a sector written at the start and in the middle (block
 * allocation: the driver validates its tables before the first write, so
 * a corrupt table must be refused, never written through). Errors are
 * the expected outcome for most inputs; the sanitizers report what
 * matters.
 */
#ifndef VDISK_FUZZ_FORMAT_H
#define VDISK_FUZZ_FORMAT_H

#include <string.h>

#include "vdisk/vdisk.h"
#include "fuzz-memfd.h"

#define FUZZ_FORMAT_READ (64 * 1024)
#define FUZZ_FORMAT_EXTENTS 64

static void fuzz_format_quiet(const char *msg, void *opaque)
{
    (void)msg;
    (void)opaque;
}

static void fuzz_format_read(vd_node *node, int64_t len, uint8_t *buf)
{
    int64_t offs[3] = { 0, (len / 2) & ~(int64_t)511,
                        (len - FUZZ_FORMAT_READ) & ~(int64_t)511 };
    uint64_t off = 0;
    vd_check_result res;

    for (int i = 0; i < 3; i++) {
        int64_t o = offs[i] < 0 ? 0 : offs[i];
        uint64_t n = (uint64_t)(len - o);
        vd_pread(node, buf, n < FUZZ_FORMAT_READ ? n : FUZZ_FORMAT_READ,
                 (uint64_t)o, 0, NULL);
    }
    for (int i = 0; i < FUZZ_FORMAT_EXTENTS && off < (uint64_t)len; i++) {
        vd_extent ext;
        if (vd_block_status(node, off, (uint64_t)len - off, &ext, NULL) < 0 ||
            ext.length == 0) {
            break;
        }
        off += ext.length;
    }
    memset(&res, 0, sizeof(res));
    vd_check(node, &res, 0, NULL);
}

static void fuzz_format_write(vd_node *node, int64_t len, uint8_t *buf)
{
    memset(buf, 0xa5, 512);
    vd_pwrite(node, buf, 512, 0, 0, NULL);
    vd_pwrite(node, buf, 512, (uint64_t)(len / 2) & ~(uint64_t)511, 0, NULL);
}

/* The two passes (read-only, then read-write) over the image at @path
 * of format @fmt. */
static void fuzz_format_passes(const char *fmt, const char *path)
{
    static uint8_t buf[FUZZ_FORMAT_READ];
    const unsigned base = VD_O_NO_BACKING | VD_O_QUIET;

    vd_set_warning_handler(fuzz_format_quiet, NULL);
    for (int pass = 0; pass < 2; pass++) {
        vd_node *node = NULL;
        int64_t len;

        if (vd_open(&node, path, fmt, NULL,
                    pass ? base | VD_O_RDWR : base | VD_O_FORCE_SHARE,
                    NULL) < 0) {
            continue;
        }
        len = vd_getlength(node);
        if (len >= 512) {
            (pass ? fuzz_format_write : fuzz_format_read)(node, len, buf);
        }
        vd_close(&node, NULL);
    }
}

/* The whole run for one input of format @fmt. */
static int fuzz_format_run(const char *fmt, const uint8_t *data, size_t size)
{
    char path[64];
    int fd = fuzz_memfd(fmt, data, size, 1u << 20, path, sizeof(path));

    if (fd < 0) {
        return 0;
    }
    fuzz_format_passes(fmt, path);
    close(fd);
    return 0;
}

#endif
