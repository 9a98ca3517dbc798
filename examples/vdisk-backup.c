/*
 * vdisk-backup: an incremental backup client on libvdisk's public API
 * (vdisk/vdisk.h, vdisk/bitmap.h) and nothing else.
 *
 *   vdisk-backup full IMAGE BITMAP OUT
 *       copies every extent of IMAGE that does not read as zeros into a
 *       new qcow2 OUT, and makes BITMAP a clean persistent dirty bitmap
 *       of IMAGE (added, or cleared when IMAGE has it already);
 *   vdisk-backup inc IMAGE BITMAP BASE OUT
 *       creates OUT as a qcow2 overlay of the previous backup BASE (the
 *       full one or the last incremental; stored as given, so relative to
 *       OUT's folder) and copies into it only the extents BITMAP marks
 *       dirty, then clears BITMAP.
 *
 * OUT must not exist (a backup never overwrites a file). The chain
 * full <- inc1 <- inc2 ... reads as IMAGE did at the last
 * backup. IMAGE is opened read-write, so its lock keeps a VM (QEMU or
 * vdisk) from writing while a backup runs: back up a stopped VM, or use
 * a backup job (vdisk/job.h) for a running one. The bitmap is cleared
 * only once OUT is flushed and closed, so a failed incremental backup
 * leaves the bits for the next attempt; the bitmap is stored in IMAGE
 * when IMAGE is closed (docs/bitmaps.md).
 *
 * Build: cc -o vdisk-backup vdisk-backup.c $(pkg-config --cflags --libs vdisk)
 * Exit status 0 on success, 1 with a message on stderr otherwise.
 */
#define _POSIX_C_SOURCE 200809L      /* access() */

#include <vdisk/bitmap.h>
#include <vdisk/vdisk.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHUNK (1u << 20)

/* Copies [off, off+len) of @src to the same place in @dst; a chunk of
 * zeros becomes a zero write, so an overlay hides its backing there. */
static int copy(vd_node *src, vd_node *dst, uint64_t off, uint64_t len,
                unsigned char *buf, vd_error *err)
{
    while (len > 0) {
        uint64_t n = len < CHUNK ? len : CHUNK;
        int ret = vd_pread(src, buf, n, off, 0, err);
        if (ret < 0) {
            return ret;
        }
        if (buf[0] == 0 && memcmp(buf, buf + 1, n - 1) == 0) {
            ret = vd_write_zeroes(dst, n, off, 0, err);
        } else {
            ret = vd_pwrite(dst, buf, n, off, 0, err);
        }
        if (ret < 0) {
            return ret;
        }
        off += n;
        len -= n;
    }
    return 0;
}

/* Creates the qcow2 @out of @size bytes (over @base when not NULL) and
 * opens it read-write. */
static int create_out(const char *out, uint64_t size, const char *base,
                      vd_node **node, vd_error *err)
{
    char sz[32];
    vd_opts *opts = vd_opts_new();
    int ret = opts ? 0 : -1;

    snprintf(sz, sizeof(sz), "%" PRIu64, size);
    if (ret == 0) {
        ret = vd_opts_set(opts, "size", sz);
    }
    if (ret == 0 && base) {
        ret = vd_opts_set(opts, "backing_file", base);
        if (ret == 0) {
            ret = vd_opts_set(opts, "backing_fmt", "qcow2");
        }
    }
    if (ret == 0) {
        ret = vd_create(out, "qcow2", opts, err);
    }
    vd_opts_free(&opts);
    return ret < 0 ? ret : vd_open(node, out, "qcow2", NULL, VD_O_RDWR, err);
}

int main(int argc, char **argv)
{
    vd_error err = VD_ERROR_INIT;
    vd_node *img = NULL, *out = NULL;
    unsigned char *buf = NULL;
    uint64_t copied = 0, extents = 0, off = 0, start, bytes;
    int64_t size;
    bool full = argc == 5 && strcmp(argv[1], "full") == 0;
    const char *what;
    int ret;

    if (!full && !(argc == 6 && strcmp(argv[1], "inc") == 0)) {
        fprintf(stderr, "usage: vdisk-backup full IMAGE BITMAP OUT\n"
                        "       vdisk-backup inc IMAGE BITMAP BASE OUT\n");
        return 1;
    }
    const char *image = argv[2], *bitmap = argv[3];
    const char *dest = argv[full ? 4 : 5];

    /* Refuse before IMAGE is opened read-write, which stores its bitmaps
     * again when it closes: a refused backup leaves every file as it was. */
    what = dest;
    ret = access(dest, F_OK) == 0
          ? vd_error_set(&err, -EEXIST, "exists: choose a new file") : 0;
    if (ret == 0 && !full) {
        what = image;
        ret = vd_open(&img, image, NULL, NULL, 0, &err);
        if (ret >= 0 && vd_bitmap_find(img, bitmap) != img) {
            ret = vd_error_set(&err, -ENOENT, "no bitmap '%s': run a full "
                               "backup first", bitmap);
        }
        vd_close(&img, NULL);
    }
    if (ret == 0) {
        what = image;
        ret = vd_open(&img, image, NULL, NULL, VD_O_RDWR, &err);
    }
    if (ret < 0) {
        goto out;
    }
    size = vd_getlength(img);
    if (size < 0) {
        ret = vd_error_set_errno(&err, (int)size, "cannot get its size");
        goto out;
    }
    if (full) {
        /* A clean bitmap before the copy: every write from now on is in
         * the next incremental backup. */
        ret = vd_bitmap_find(img, bitmap) == img
              ? vd_bitmap_clear(img, bitmap, &err)
              : vd_bitmap_add(img, bitmap, 0, VD_BITMAP_PERSISTENT, &err);
    }
    buf = malloc(CHUNK);
    if (ret < 0 || !buf) {
        ret = ret < 0 ? ret : vd_error_set(&err, -ENOMEM, "out of memory");
        goto out;
    }
    what = dest;
    ret = create_out(dest, (uint64_t)size, full ? NULL : argv[4], &out, &err);
    while (ret >= 0) {
        if (full) {
            /* Every extent that does not read as zeros (the new qcow2
             * reads zeros everywhere already). */
            vd_extent ext;
            if ((uint64_t)size == off) {
                break;
            }
            what = image;
            ret = vd_block_status(img, off, (uint64_t)size - off, &ext, &err);
            if (ret < 0) {
                break;
            }
            start = off;
            bytes = ext.length;
            off += bytes;
            if (ext.flags & VD_BLOCK_ZERO) {
                continue;
            }
        } else {
            what = image;
            ret = vd_bitmap_next_dirty(img, bitmap, off, &start, &bytes, &err);
            if (ret <= 0) {
                break;
            }
            off = start + bytes;
        }
        what = dest;
        ret = copy(img, out, start, bytes, buf, &err);
        copied += bytes;
        extents++;
    }
    if (ret >= 0) {
        what = dest;
        ret = vd_close(&out, &err);
    }
    if (ret >= 0 && !full) {
        what = image;
        ret = vd_bitmap_clear(img, bitmap, &err);
    }
out:
    free(buf);
    vd_close(&out, NULL);
    if (ret >= 0) {
        what = image;
        ret = vd_close(&img, &err);       /* stores the bitmap */
    }
    vd_close(&img, NULL);
    if (ret < 0) {
        fprintf(stderr, "vdisk-backup: %s: %s\n", what,
                err.message[0] ? err.message : strerror(-ret));
        return 1;
    }
    printf("%s backup of %s: copied %" PRIu64 " bytes in %" PRIu64
           " extents to %s\n", full ? "full" : "incremental", image,
           copied, extents, dest);
    return 0;
}
