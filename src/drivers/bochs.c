/*
 * The bochs format driver, read only: Bochs' growing redolog as QEMU
 * 7.2's block/bochs.c reads it.
 *
 * Layout (little endian): a 512-byte header of NUL-terminated strings in
 * fixed fields (magic[32] "Bochs Virtual HD Image", type[16] "Redolog",
 * subtype[16] "Growing"), the version at 64 (0x00020000, or 0x00010000
 * for the older layout), the header size at 68 (where the catalog
 * starts), the catalog's entry count at 72, the bitmap and extent sizes
 * in bytes at 76 and 80, and the disk size in bytes at 88 (version 2)
 * or 84 (version 1). The catalog maps each extent of the guest disk to
 * an index in the data area (0xffffffff: unallocated), which starts right
 * after the catalog; an allocated extent is its bitmap (one bit per
 * sector, rounded up to whole sectors) followed by its sectors. A sector
 * whose bit is clear reads as zeros.
 *
 * As QEMU: the catalog is limited to 1M entries (4 MiB, the largest
 * image bximage makes), extents are powers of two from 512 bytes to
 * 8 MiB, the catalog must cover the disk, bitmaps and sectors past the
 * end of the file read as zeros, and the disk size is kept in whole
 * sectors. Block status reports the whole disk as data, as QEMU does for
 * a format without its own block status. Writing and creating are
 * refused (QEMU's driver reads only).
 *
 * Locking: none needed; the catalog is read-only after open and each
 * read does its own bitmap lookups.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "simple-fmt.h"

#define BOCHS_HEADER_BYTES 512
#define BOCHS_VERSION_2 0x00020000u
#define BOCHS_VERSION_1 0x00010000u
#define BOCHS_CATALOG_MAX 0x100000u
#define BOCHS_EXTENT_MAX 0x800000u
#define BOCHS_UNALLOCATED 0xffffffffu

typedef struct bochs_state {
    const char *filename;
    uint32_t *catalog;
    uint32_t catalog_size;
    uint32_t extent_size;
    uint64_t data_offset;
    uint64_t bitmap_blocks, extent_blocks;
    uint64_t size;
} bochs_state;

/* @s is a NUL-terminated string at the start of @field (QEMU's strcmp
 * on the fixed fields). */
static bool field_is(const uint8_t *field, size_t size, const char *s)
{
    size_t n = strlen(s);

    return n < size && memcmp(field, s, n + 1) == 0;
}

static bool header_ok(const uint8_t *h)
{
    uint32_t version = fmt_rd32(h + 64);

    return field_is(h, 32, "Bochs Virtual HD Image") &&
           field_is(h + 32, 16, "Redolog") &&
           field_is(h + 48, 16, "Growing") &&
           (version == BOCHS_VERSION_2 || version == BOCHS_VERSION_1);
}

static int bochs_probe(const uint8_t *buf, size_t len, const char *filename)
{
    (void)filename;
    return len >= BOCHS_HEADER_BYTES && header_ok(buf) ? 100 : 0;
}

static int bochs_open(vd_node *node, vd_opts *opts, unsigned flags,
                      vd_error *err)
{
    bochs_state *s = node->opaque;
    uint8_t h[BOCHS_HEADER_BYTES];
    uint32_t header_size, bitmap_bytes, sectors_per_extent;
    uint64_t need;
    int64_t flen;
    int ret;

    (void)opts;
    s->filename = node->filename;
    if (flags & VD_NODE_RDWR) {
        return vd_error_set(err, -EACCES, "Image is read-only");
    }
    flen = fmt_read_head(node->file, h, sizeof(h), s->filename, err);
    if (flen < 0) {
        return (int)flen;
    }
    if ((uint64_t)flen < sizeof(h)) {
        memset(h + flen, 0, sizeof(h) - (size_t)flen);
    }
    if (!header_ok(h)) {
        return vd_error_set(err, -EINVAL, "Image not in Bochs format");
    }
    s->size = fmt_rd64(h + (fmt_rd32(h + 64) == BOCHS_VERSION_1 ? 84 : 88)) &
              ~511ull;
    s->catalog_size = fmt_rd32(h + 72);
    if (s->catalog_size > BOCHS_CATALOG_MAX) {
        return vd_error_set(err, -EFBIG, "Catalog size is too large");
    }
    header_size = fmt_rd32(h + 68);
    bitmap_bytes = fmt_rd32(h + 76);
    s->extent_size = fmt_rd32(h + 80);
    /* QEMU's 1 + (n - 1) / 512 in 32 bits: 0 gives 1 + 0xffffffff / 512 */
    s->bitmap_blocks = 1 + (uint32_t)(bitmap_bytes - 1) / 512;
    s->extent_blocks = 1 + (uint32_t)(s->extent_size - 1) / 512;
    if (s->extent_size < 512) {
        return vd_error_set(err, -EINVAL, "Extent size must be at least 512");
    }
    if (s->extent_size & (s->extent_size - 1)) {
        return vd_error_set(err, -EINVAL, "Extent size %" PRIu32 " is not a "
                            "power of two", s->extent_size);
    }
    if (s->extent_size > BOCHS_EXTENT_MAX) {
        return vd_error_set(err, -EINVAL, "Extent size %" PRIu32 " is too "
                            "large", s->extent_size);
    }
    sectors_per_extent = s->extent_size / 512;
    need = (s->size / 512 + sectors_per_extent - 1) / sectors_per_extent;
    if (s->catalog_size < need) {
        return vd_error_set(err, -EINVAL, "Catalog size is too small for "
                            "this disk size");
    }
    s->catalog = calloc(s->catalog_size ? s->catalog_size : 1, 4);
    if (!s->catalog) {
        return vd_error_set(err, -ENOMEM, "Could not allocate memory for "
                            "catalog");
    }
    /* The part past the end of the file reads as zeros, as in QEMU. */
    ret = vd_child_pread(node->file, header_size, s->catalog,
                         (uint64_t)s->catalog_size * 4, err);
    if (ret < 0) {
        free(s->catalog);
        s->catalog = NULL;
        vd_error_prepend(err, "cannot read the catalog: ");
        return ret;
    }
    for (uint32_t i = 0; i < s->catalog_size; i++) {
        s->catalog[i] = fmt_rd32((const uint8_t *)&s->catalog[i]);
    }
    /* 32 bits in QEMU: a header size near 4 GiB wraps the data area to
     * the start of the file. */
    s->data_offset = (uint32_t)(header_size + s->catalog_size * 4);
    node->bl.request_alignment = 512;
    return 0;
}

static void bochs_close(vd_node *node)
{
    bochs_state *s = node->opaque;

    free(s->catalog);
    s->catalog = NULL;
}

/* The file offset of guest sector @sector, or 0 when it reads as zeros. */
static int sector_offset(vd_node *node, uint64_t sector, uint64_t *host,
                         vd_error *err)
{
    bochs_state *s = node->opaque;
    uint64_t off = sector * 512;
    uint64_t idx = off / s->extent_size;
    uint64_t in = (off % s->extent_size) / 512;
    uint64_t bitmap_off;
    uint8_t bits;
    int ret;

    *host = 0;
    /* The catalog covers the disk (checked at open). */
    if (idx >= s->catalog_size || s->catalog[idx] == BOCHS_UNALLOCATED) {
        return 0;
    }
    bitmap_off = s->data_offset + 512 * (uint64_t)s->catalog[idx] *
                 (s->extent_blocks + s->bitmap_blocks);
    /* QEMU's uint64_t arithmetic wraps; past INT64_MAX it fails the
     * request. */
    if (bitmap_off > (uint64_t)INT64_MAX - (1ull << 33)) {
        return vd_error_set(err, -EIO, "%s: extent %" PRIu64 " at catalog "
                            "index %" PRIu32 " lies beyond any file",
                            s->filename, idx, s->catalog[idx]);
    }
    ret = vd_child_pread(node->file, bitmap_off + in / 8, &bits, 1, err);
    if (ret < 0) {
        vd_error_prepend(err, "%s: extent %" PRIu64 " bitmap: ", s->filename,
                         idx);
        return ret;
    }
    if (!((bits >> (in % 8)) & 1)) {
        return 0;
    }
    *host = bitmap_off + 512 * (s->bitmap_blocks + in);
    return 0;
}

static int bochs_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                        vd_iov *qiov, unsigned flags, vd_error *err)
{
    uint64_t done = 0, host = 0, run_host = 0, run_len = 0, run_at = 0;
    int ret;

    (void)flags;
    /* Sector by sector as QEMU, but runs of consecutive host sectors go
     * to the file as one read. */
    while (done < bytes) {
        ret = sector_offset(node, (off + done) / 512, &host, err);
        if (ret < 0) {
            return ret;
        }
        if (run_len && (!host || host != run_host + run_len)) {
            ret = fmt_file_io(node->file, false, run_host, qiov, run_at,
                              run_len, node->filename, err);
            if (ret < 0) {
                return ret;
            }
            run_len = 0;
        }
        if (host) {
            if (!run_len) {
                run_host = host;
                run_at = done;
            }
            run_len += 512;
        } else {
            vd_iov_memset(qiov, done, 0, 512);
        }
        done += 512;
    }
    if (run_len) {
        return fmt_file_io(node->file, false, run_host, qiov, run_at,
                           run_len, node->filename, err);
    }
    return 0;
}

static int64_t bochs_getlength(vd_node *node)
{
    bochs_state *s = node->opaque;

    return (int64_t)s->size;
}

const vd_driver vd_driver_bochs = {
    .name = "bochs",
    .instance_size = sizeof(bochs_state),
    .is_format = true,
    .probe = bochs_probe,
    .open = bochs_open,
    .close = bochs_close,
    .preadv = bochs_preadv,
    .block_status = fmt_block_status_all_data,
    .getlength = bochs_getlength,
};
