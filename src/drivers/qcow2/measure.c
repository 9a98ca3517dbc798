/*
 * qcow2 measure: how many host bytes an image needs (qemu-img measure).
 *
 * Organisation: the qcow2 size formulas (refcount metadata by fixed
 * point, metadata for a fully allocated image, as QEMU 7.2's
 * qcow2_calc_prealloc_size()), the size of the persistent bitmaps of a
 * qcow2 source, the driver callback qcow2_measure(), and last the public
 * entry point vd_measure() with raw's trivial measurement.
 *
 * vd_measure() and the raw measurement are generic and would belong in
 * src/core and src/drivers/raw.c; they live here because this file is
 * the one the measuring work owns (see the report to the lead).
 *
 * The results must equal qemu-img's to the byte, quirks included: the
 * virtual size is rounded to the target's cluster size, metadata is
 * always counted for the fully allocated image, and "required" only
 * subtracts the data clusters the source does not hold.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "crypto/luks.h"
#include "drivers/qcow2/qcow2.h"

#define DIV_ROUND_UP(a, b) (((a) + (b) - 1) / (b))
#define ROUND_UP_TO(a, b) (DIV_ROUND_UP(a, b) * (b))

/* Largest bitmap directory we read (QEMU: 64 KiB per bitmap, 65535
 * bitmaps, but a sane image has far less). */
#define MAX_BITMAP_DIR_BYTES (64u << 20)

/*
 * Bytes of refcount table and blocks needed to count @clusters host
 * clusters plus the refcount structures themselves: iterate until the
 * structures no longer grow.
 */
uint64_t qcow2_refcount_metadata_size(uint64_t clusters, uint64_t cluster_size,
                                      int refcount_order, uint64_t *nb_blocks)
{
    uint64_t per_table_cluster = cluster_size / 8;
    uint64_t per_block = cluster_size * 8 >> refcount_order;
    uint64_t table = 0, blocks = 0, n = 0, last;

    do {
        last = n;
        blocks = DIV_ROUND_UP(clusters + table + blocks, per_block);
        table = DIV_ROUND_UP(blocks, per_table_cluster);
        n = clusters + blocks + table;
    } while (n != last);
    if (nb_blocks) {
        *nb_blocks = blocks;
    }
    return (blocks + table) * cluster_size;
}

/* Host size of a fully preallocated image of @size bytes. */
static uint64_t prealloc_size(uint64_t size, uint64_t cluster_size,
                              int refcount_order, bool extended_l2)
{
    uint64_t l2e_size = extended_l2 ? 16 : 8;
    uint64_t aligned = ROUND_UP_TO(size, cluster_size);
    uint64_t meta = cluster_size;                 /* header */
    uint64_t nl2e, nl1e;

    nl2e = ROUND_UP_TO(aligned / cluster_size, cluster_size / l2e_size);
    meta += nl2e * l2e_size;
    nl1e = ROUND_UP_TO(nl2e * l2e_size / cluster_size, cluster_size / 8);
    meta += nl1e * 8;
    meta += qcow2_refcount_metadata_size((meta + aligned) / cluster_size,
                                         cluster_size, refcount_order, NULL);
    return meta + aligned;
}

/*
 * Space the persistent bitmaps of the qcow2 node @src would take in an
 * image with clusters of @cluster_size: every bitmap fully allocated, its
 * table, and the directory entries, as QEMU's
 * qcow2_get_persistent_dirty_bitmap_size().
 */
static int bitmaps_size(vd_node *src, uint64_t cluster_size, uint64_t *out,
                        vd_error *err)
{
    qcow2_state *s = src->opaque;
    uint64_t dir_size = s->bitmaps_ext.bitmap_directory_size;
    uint64_t dir_off = s->bitmaps_ext.bitmap_directory_offset;
    uint64_t total = 0, dir_needed = 0, pos = 0;
    uint8_t *dir;
    int ret;

    *out = 0;
    /* QEMU ignores the bitmaps when a program without bitmap support
     * cleared the autoclear bit. */
    if (!s->has_bitmaps_ext || !s->bitmaps_ext.nb_bitmaps ||
        !(s->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS)) {
        return 0;
    }
    if (dir_size > MAX_BITMAP_DIR_BYTES || dir_size == 0 ||
        dir_off & (s->cluster_size - 1)) {
        return vd_error_set(err, -EINVAL, "%s: bitmap directory at 0x%" PRIx64
                            " of 0x%" PRIx64 " bytes is invalid", s->filename,
                            dir_off, dir_size);
    }
    dir = malloc(dir_size);
    if (!dir) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    ret = vd_child_pread(s->file, dir_off, dir, dir_size, err);
    for (uint32_t i = 0; ret == 0 && i < s->bitmaps_ext.nb_bitmaps; i++) {
        uint32_t extra, gran_bits;
        uint16_t name_size;
        uint64_t entry, bits, bytes, clusters;

        if (pos + 24 > dir_size) {
            ret = vd_error_set(err, -EINVAL, "%s: bitmap directory is "
                               "truncated", s->filename);
            break;
        }
        gran_bits = dir[pos + 17];
        name_size = be16toh(*(uint16_t *)(dir + pos + 18));
        extra = be32toh(*(uint32_t *)(dir + pos + 20));
        entry = ROUND_UP_TO(24ull + extra + name_size, 8);
        if (pos + entry > dir_size || gran_bits < 9 || gran_bits > 31) {
            ret = vd_error_set(err, -EINVAL, "%s: bitmap directory entry at "
                               "0x%" PRIx64 " is invalid", s->filename,
                               dir_off + pos);
            break;
        }
        bits = DIV_ROUND_UP(s->size, 1ull << gran_bits);
        bytes = DIV_ROUND_UP(bits, 8);
        clusters = DIV_ROUND_UP(bytes, cluster_size);
        total += clusters * cluster_size;
        total += ROUND_UP_TO(clusters * 8, cluster_size);
        dir_needed += ROUND_UP_TO(24ull + name_size, 8);
        pos += entry;
    }
    free(dir);
    if (ret == 0) {
        *out = total + ROUND_UP_TO(dir_needed, cluster_size);
    }
    return ret;
}

/* Bytes of @src's guest data (rounded to whole target clusters) that a
 * copy must write: ranges reading as zeros are left out. */
static int data_size(vd_node *src, uint64_t ssize, uint64_t cluster_size,
                     uint64_t *out, vd_error *err)
{
    uint64_t required = 0;
    for (uint64_t off = 0; off < ssize;) {
        vd_extent ext;
        uint64_t pnum;
        bool zero;
        int ret = vd_block_status(src, off, ssize - off, &ext, err);
        if (ret < 0) {
            vd_error_prepend(err, "Unable to get block status: ");
            return ret;
        }
        pnum = ext.length;
        /* Block status asks the file about zeros only for images
         * preallocated with metadata, as QEMU's does. */
        zero = (ext.flags & VD_BLOCK_ZERO) != 0;
        if (zero) {
            /* no data to copy (safe: the target has no backing file) */
        } else if ((ext.flags & (VD_BLOCK_DATA | VD_BLOCK_ALLOCATED)) ==
                   (VD_BLOCK_DATA | VD_BLOCK_ALLOCATED)) {
            /* The whole target cluster is written; skip to its end. */
            pnum = ROUND_UP_TO(off + pnum, cluster_size) - off;
            required += off % cluster_size + pnum;
        }
        off += pnum;
    }
    *out = required;
    return 0;
}

int qcow2_measure(vd_opts *opts, vd_node *src, vd_measure_result *out,
                  vd_error *err)
{
    static const char *const prealloc_names[] = {
        "off", "metadata", "falloc", "full", NULL,
    };
    bool extended_l2 = false;
    uint64_t cluster_size, refcount_bits, size = 0, required = 0, l2_tables;
    uint64_t luks_size = 0;
    int version = 3, prealloc = 0, ret;
    char *v;

    memset(out, 0, sizeof(*out));
    ret = vd_opts_take_bool(opts, "extended_l2", false, &extended_l2, err);
    if (ret < 0) {
        return ret;
    }
    ret = vd_opts_take_size(opts, "cluster_size", 65536, &cluster_size, err);
    if (ret < 0) {
        return ret;
    }
    if (cluster_size < 512 || cluster_size > (2u << 20) ||
        (cluster_size & (cluster_size - 1))) {
        return vd_error_set(err, -EINVAL, "Cluster size must be a power of "
                            "two between 512 and 2048k");
    }
    if (extended_l2 && cluster_size < 16384) {
        return vd_error_set(err, -EINVAL, "Extended L2 entries are only "
                            "supported with cluster sizes of at least 16384 "
                            "bytes");
    }
    v = vd_opts_take(opts, "compat");
    if (v) {
        if (!strcmp(v, "0.10")) {
            version = 2;
        } else if (strcmp(v, "1.1") != 0) {
            vd_error_set(err, -EINVAL, "Invalid compatibility level: '%s'", v);
            free(v);
            return -EINVAL;
        }
        free(v);
    }
    ret = vd_opts_take_uint(opts, "refcount_bits", 16, &refcount_bits, err);
    if (ret < 0) {
        return ret;
    }
    if (refcount_bits > 64 || refcount_bits == 0 ||
        (refcount_bits & (refcount_bits - 1))) {
        return vd_error_set(err, -EINVAL, "Refcount width must be a power of "
                            "two and may not exceed 64 bits");
    }
    if (version < 3 && refcount_bits != 16) {
        return vd_error_set(err, -EINVAL, "Different refcount widths than 16 "
                            "bits require compatibility level 1.1 or above "
                            "(use compat=1.1 or greater)");
    }
    v = vd_opts_take(opts, "preallocation");
    if (v) {
        prealloc = -1;
        for (int i = 0; prealloc_names[i]; i++) {
            if (!strcmp(v, prealloc_names[i])) {
                prealloc = i;
            }
        }
        if (prealloc < 0) {
            vd_error_set(err, -EINVAL, "invalid parameter value: %s", v);
            free(v);
            return -EINVAL;
        }
        free(v);
    }
    /* A LUKS header takes whole clusters (QEMU counts the payload
     * offset of the header it would create; "aes" has none, and other
     * names are ignored as QEMU ignores them). */
    v = vd_opts_take(opts, "encrypt.format");
    if (v && !strcmp(v, "luks")) {
        vd_luks_create_opts lo;
        uint64_t hdr = 0;

        ret = vd_luks_create_opts_take(opts, "encrypt.", &lo, err);
        if (ret == 0) {
            ret = vd_luks_create_payload(&lo, "encrypt.", &hdr, err);
            vd_luks_create_opts_free(&lo);
        }
        if (ret < 0) {
            free(v);
            return ret;
        }
        luks_size = ROUND_UP_TO(hdr, cluster_size);
    }
    free(v);
    v = vd_opts_take(opts, "backing_file");
    bool has_backing = v != NULL;
    free(v);
    /* QemuOpts' range (up to 2^64 - 1): vd_measure() checked it. */
    v = vd_opts_take(opts, "size");
    ret = v ? vd_parse_size_u64(v, &size) : 0;
    if (ret == -ERANGE) {
        vd_error_set(err, -EINVAL, "Value '%s' is out of range for "
                     "parameter 'size'", v);
    } else if (ret < 0) {
        vd_error_set(err, -EINVAL, "Parameter 'size' expects a "
                     "non-negative number below 2^64");
    }
    free(v);
    if (ret < 0) {
        return -EINVAL;
    }
    /* The rest (backing_fmt, compression_type, data_file, ...) does not
     * change the size; QEMU ignores it here as well. */
    for (const char *k = vd_opts_first_key(opts); k;
         k = vd_opts_first_key(opts)) {
        vd_opts_del(opts, k);
    }

    /* QEMU rounds up in 64 bits: the largest sizes wrap to a small one
     * (and a source's size replaces it below anyway). */
    size = (size + cluster_size - 1) & ~(cluster_size - 1);
    l2_tables = DIV_ROUND_UP(size / cluster_size,
                             cluster_size / (extended_l2 ? 16 : 8));
    if (l2_tables * 8 > QCOW2_MAX_L1_BYTES) {
        return vd_error_set(err, -EINVAL, "The image size is too large "
                            "(try using a larger cluster size)");
    }

    if (src) {
        int64_t ssize = vd_getlength(src);
        if (ssize < 0) {
            return vd_error_set_errno(err, (int)ssize, "Unable to get image "
                                      "virtual_size");
        }
        size = ROUND_UP_TO((uint64_t)ssize, cluster_size);
        if (has_backing) {
            /* The new backing file may share nothing with the source. */
            required = size;
        } else {
            ret = data_size(src, (uint64_t)ssize, cluster_size, &required,
                            err);
            if (ret < 0) {
                return ret;
            }
        }
    }
    if (prealloc == VD_PREALLOC_FULL || prealloc == VD_PREALLOC_FALLOC) {
        required = size;
    }

    out->fully_allocated = luks_size +
                           prealloc_size(size, cluster_size,
                                         __builtin_ctzll(refcount_bits),
                                         extended_l2);
    out->required = out->fully_allocated - size + required;
    if (version >= 3 && src && src->drv == &vd_driver_qcow2 &&
        ((qcow2_state *)src->opaque)->version >= 3) {
        out->has_bitmaps = true;
        ret = bitmaps_size(src, cluster_size, &out->bitmaps, err);
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}
