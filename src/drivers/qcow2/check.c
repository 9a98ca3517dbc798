/*
 * qcow2 consistency check and repair (qemu-img check).
 *
 * The check rebuilds, from the metadata alone, how often every host
 * cluster is referenced: the header, the active L1 table and its L2
 * tables and data clusters, every snapshot's L1/L2 tables, the snapshot
 * table, the refcount table and blocks, and the bitmap directory and
 * tables. The result lives in an in-memory refcount table ("IMRT": one
 * big refcount block covering the whole file, in the on-disk entry
 * encoding so that slices of it can be written out as refcount blocks).
 * The IMRT is sized by the file length; references reaching more than one
 * cluster past the end are reported instead of counted, so its size stays
 * bounded by the file.
 *
 * Then the IMRT is compared with the on-disk refcounts: a higher on-disk
 * count is a leak, a lower one an error. Repairs follow QEMU's order
 * (block/qcow2-refcount.c): fix counts one by one with the driver's
 * refcount code; when the refcount structure itself is broken (a refcount
 * block that is misaligned, shared, or a cluster referenced but counted
 * 0) rebuild the whole structure from the IMRT into free clusters, then
 * count again and free the old structure as leaks. Last come the COPIED
 * flags of L1 and L2 entries, which must be set exactly when the
 * refcount is 1.
 *
 * Messages for each finding go to stderr with QEMU's wording, because
 * they are part of qemu-img check's observable output; the numbers go to
 * the vd_check_result. The file reads top-down: helpers and the IMRT,
 * the walkers (L2, L1, refcount blocks, bitmaps, snapshots), the
 * comparison, the rebuild, the COPIED pass and the entry point.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "drivers/qcow2/qcow2.h"

/* Limits from QEMU's qcow2.h (qcow2.txt leaves them to implementations). */
#define CK_MAX_SNAPSHOT_EXTRA 1024
#define CK_MAX_SNAPSHOTS_SIZE (1024ull * QCOW2_MAX_SNAPSHOTS)
/* Refuse an IMRT above this: a sparse file of many TB with tiny clusters
 * and 64-bit refcounts would otherwise ask for tens of GB. */
#define CK_MAX_IMRT_BYTES (1ull << 32)

/* Bitmap table entries ("Bitmap table"). */
#define BME_OFFSET_MASK   0x00fffffffffffe00ull

/* What the check walks the L2 tables for. */
#define CK_FRAG_INFO 2   /* count allocated/fragmented/compressed */

/* Which metadata a write may overlap (the rest is refused). */
#define OL_ACTIVE_L2 1u

typedef struct ck_snapshot {
    uint64_t l1_offset;
    uint32_t l1_size;
    uint32_t extra_size;
    char *id;
    char *name;
} ck_snapshot;

typedef struct ck_state {
    qcow2_state *s;
    unsigned fix;
    bool data_file;          /* guest data in an external file */
    uint8_t *imrt;
    int64_t nb_clusters;     /* entries in imrt */
    ck_snapshot *snaps;
    uint32_t nb_snaps;
    uint64_t snaps_offset;
    uint64_t snaps_size;
} ck_state;

/* ---- the in-memory refcount table ---------------------------------- */

static uint64_t imrt_get(const ck_state *c, int64_t idx)
{
    const uint8_t *a = c->imrt;
    uint64_t i = (uint64_t)idx;

    switch (c->s->refcount_order) {
    case 0: return (a[i / 8] >> (i % 8)) & 1;
    case 1: return (a[i / 4] >> (2 * (i % 4))) & 3;
    case 2: return (a[i / 2] >> (4 * (i % 2))) & 15;
    case 3: return a[i];
    case 4: return ((uint64_t)a[2 * i] << 8) | a[2 * i + 1];
    case 5: {
        uint64_t v = 0;
        for (int k = 0; k < 4; k++) {
            v = (v << 8) | a[4 * i + k];
        }
        return v;
    }
    default: {
        uint64_t v = 0;
        for (int k = 0; k < 8; k++) {
            v = (v << 8) | a[8 * i + k];
        }
        return v;
    }
    }
}

static void imrt_set(ck_state *c, int64_t idx, uint64_t v)
{
    uint8_t *a = c->imrt;
    uint64_t i = (uint64_t)idx;
    unsigned sh;

    switch (c->s->refcount_order) {
    case 0: case 1: case 2: {
        unsigned bits = 1u << c->s->refcount_order;
        unsigned per = 8 / bits;
        uint8_t mask = (uint8_t)((1u << bits) - 1);
        sh = (unsigned)(i % per) * bits;
        a[i / per] = (uint8_t)((a[i / per] & ~(mask << sh)) |
                               ((v & mask) << sh));
        return;
    }
    case 3:
        a[i] = (uint8_t)v;
        return;
    default: {
        unsigned bytes = 1u << (c->s->refcount_order - 3);
        for (unsigned k = 0; k < bytes; k++) {
            a[bytes * i + k] = (uint8_t)(v >> (8 * (bytes - 1 - k)));
        }
        return;
    }
    }
}

/* Bytes of an IMRT of @entries, rounded to whole clusters so that any
 * refcount-block-sized slice of it can be written to disk directly. */
static uint64_t imrt_bytes(const ck_state *c, int64_t entries)
{
    uint64_t b = (((uint64_t)entries << c->s->refcount_order) + 7) / 8;
    return qcow2_size_to_clusters(c->s, b) * c->s->cluster_size;
}

static int imrt_resize(ck_state *c, int64_t new_nb)
{
    uint64_t old_b = c->imrt ? imrt_bytes(c, c->nb_clusters) : 0;
    uint64_t new_b = imrt_bytes(c, new_nb);
    uint8_t *p;

    if (new_b == old_b && c->imrt) {
        c->nb_clusters = new_nb;
        return 0;
    }
    if (new_b > CK_MAX_IMRT_BYTES || new_b == 0) {
        return -EFBIG;
    }
    p = realloc(c->imrt, new_b);
    if (!p) {
        return -ENOMEM;
    }
    if (new_b > old_b) {
        memset(p + old_b, 0, new_b - old_b);
    }
    c->imrt = p;
    c->nb_clusters = new_nb;
    return 0;
}

static int64_t file_length(ck_state *c)
{
    return vd_node_getlength(c->s->file->node);
}

/*
 * Counts one reference to every cluster touching [offset, offset+size).
 * A range reaching one cluster or more past the end of the file is a
 * corruption and is not counted (the last cluster may be partly written).
 */
static int inc_refs(ck_state *c, vd_check_result *res, uint64_t offset,
                    uint64_t size)
{
    qcow2_state *s = c->s;
    int64_t file_len;
    uint64_t start, last;

    if (size == 0) {
        return 0;
    }
    file_len = file_length(c);
    if (file_len < 0) {
        return (int)file_len;
    }
    if (offset > (1ull << 62) || size > (1ull << 40) ||
        offset + size >= (uint64_t)file_len + s->cluster_size) {
        fprintf(stderr, "ERROR: counting reference for region exceeding "
                "the end of the file by one cluster or more: offset 0x%"
                PRIx64 " size 0x%" PRIx64 "\n", offset, size);
        res->corruptions++;
        return 0;
    }

    start = qcow2_start_of_cluster(s, offset);
    last = qcow2_start_of_cluster(s, offset + size - 1);
    for (uint64_t co = start; co <= last; co += s->cluster_size) {
        int64_t k = (int64_t)(co >> s->cluster_bits);
        uint64_t rc;

        if (k >= c->nb_clusters) {
            int ret = imrt_resize(c, k + 1);
            if (ret < 0) {
                res->check_errors++;
                return ret;
            }
        }
        rc = imrt_get(c, k);
        if (rc == s->refcount_max) {
            fprintf(stderr, "ERROR: overflow cluster offset=0x%" PRIx64
                    "\n", co);
            fprintf(stderr, "Use qemu-img amend to increase the refcount "
                    "entry width or qemu-img convert to create a clean "
                    "copy if the image cannot be opened for writing\n");
            res->corruptions++;
            continue;
        }
        imrt_set(c, k, rc + 1);
    }
    return 0;
}

/* 1 when a table at @offset lies wholly past the end of the file (so it
 * reads as zeros), 0 when not, or -errno. */
static int skip_past_eof(ck_state *c, uint64_t offset)
{
    int64_t len = file_length(c);

    if (len < 0) {
        return (int)len;
    }
    return offset >= (uint64_t)len;
}

/* ---- metadata overlap (before the checker writes anything) --------- */

static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b,
                           uint64_t blen)
{
    return alen && blen && a < b + blen && b < a + alen;
}

/*
 * True when [offset, offset+size) touches metadata other than what @ign
 * allows: the header, the active L1 table, the refcount table and blocks,
 * the snapshot table and snapshot L1 tables, the active L2 tables.
 */
static bool overlaps_metadata(ck_state *c, unsigned ign, uint64_t offset,
                              uint64_t size)
{
    qcow2_state *s = c->s;

    if (offset < s->cluster_size) {
        return true;
    }
    size = ((offset & (s->cluster_size - 1)) + size + s->cluster_size - 1)
           & ~(s->cluster_size - 1);
    offset = qcow2_start_of_cluster(s, offset);

    if (ranges_overlap(offset, size, s->l1_table_offset,
                       (uint64_t)s->l1_size * 8) ||
        ranges_overlap(offset, size, s->refcount_table_offset,
                       (uint64_t)s->refcount_table_size * 8) ||
        ranges_overlap(offset, size, c->snaps_offset, c->snaps_size)) {
        return true;
    }
    for (uint32_t i = 0; i < c->nb_snaps; i++) {
        if (ranges_overlap(offset, size, c->snaps[i].l1_offset,
                           (uint64_t)c->snaps[i].l1_size * 8)) {
            return true;
        }
    }
    if (!(ign & OL_ACTIVE_L2) && s->l1_table) {
        for (uint32_t i = 0; i < s->l1_size; i++) {
            uint64_t l2 = s->l1_table[i] & QCOW2_L1E_OFFSET_MASK;
            if (l2 && ranges_overlap(offset, size, l2, s->cluster_size)) {
                return true;
            }
        }
    }
    if (s->refcount_table) {
        for (uint32_t i = 0; i < s->refcount_table_size; i++) {
            uint64_t rb = s->refcount_table[i] & QCOW2_REFT_OFFSET_MASK;
            if (rb && ranges_overlap(offset, size, rb, s->cluster_size)) {
                return true;
            }
        }
    }
    return false;
}

/* ---- L2 and L1 tables ---------------------------------------------- */

typedef enum ck_ctype {
    CT_UNALLOCATED,
    CT_ZERO_PLAIN,
    CT_ZERO_ALLOC,
    CT_NORMAL,
    CT_COMPRESSED,
} ck_ctype;

/* QEMU's qcow2_get_cluster_type(): the whole-cluster view of an entry. */
static ck_ctype cluster_type(const ck_state *c, uint64_t e)
{
    if (e & QCOW2_OFLAG_COMPRESSED) {
        return CT_COMPRESSED;
    }
    if ((e & QCOW2_OFLAG_ZERO) && !c->s->extended_l2) {
        return (e & QCOW2_L2E_OFFSET_MASK) ? CT_ZERO_ALLOC : CT_ZERO_PLAIN;
    }
    if (!(e & QCOW2_L2E_OFFSET_MASK)) {
        /* Offset 0 is valid in an external data file; there every cluster
         * has refcount 1, so COPIED tells the two apart. */
        return (c->data_file && (e & QCOW2_OFLAG_COPIED)) ? CT_NORMAL
                                                           : CT_UNALLOCATED;
    }
    return CT_NORMAL;
}

/*
 * Turns a preallocated zero cluster whose offset is not aligned into a
 * plain zero cluster, writing just that entry. The caller counted the
 * corruption; success moves it to corruptions_fixed.
 */
static int fix_l2_entry_by_zero(ck_state *c, vd_check_result *res,
                                uint64_t l2_offset, uint8_t *l2,
                                uint64_t idx, bool active,
                                bool *metadata_overlap)
{
    qcow2_state *s = c->s;
    uint64_t esize = 1ull << s->l2_entry_shift;
    uint64_t eoff = l2_offset + idx * esize;
    int ret;

    if (s->extended_l2) {
        uint64_t bm = qcow2_get_l2_bitmap(s, l2, idx);
        bm |= bm << 32;
        bm &= QCOW2_L2B_ZERO_MASK;
        qcow2_set_l2_bitmap(s, l2, idx, bm);
        qcow2_set_l2_entry(s, l2, idx, 0);
    } else {
        qcow2_set_l2_entry(s, l2, idx, QCOW2_OFLAG_ZERO);
    }

    *metadata_overlap = overlaps_metadata(c, active ? OL_ACTIVE_L2 : 0,
                                          eoff, esize);
    if (*metadata_overlap) {
        fprintf(stderr, "ERROR: Overlap check failed\n");
        res->check_errors++;
        return -EIO;
    }
    ret = vd_child_pwrite(s->file, eoff, l2 + idx * esize, esize, 0, NULL);
    if (ret == 0) {
        ret = vd_node_flush(s->file->node, NULL);
    }
    if (ret < 0) {
        fprintf(stderr, "ERROR: Failed to overwrite L2 table entry: %s\n",
                strerror(-ret));
        res->check_errors++;
        return ret;
    }
    qcow2_cache_discard(s->l2_cache, l2_offset);
    res->corruptions--;
    res->corruptions_fixed++;
    return 0;
}

/* Counts the clusters one L2 table references and checks its entries. */
static int check_l2(ck_state *c, vd_check_result *res, uint64_t l2_offset,
                    int flags, bool active)
{
    qcow2_state *s = c->s;
    uint64_t next_contiguous = 0;
    uint8_t *l2;
    int ret;

    /* A table wholly past the end of the file reads as zeros: nothing to
     * count (inc_refs already reported it). Skipping it keeps a check of
     * a hostile image bounded by the file's size. */
    ret = skip_past_eof(c, l2_offset);
    if (ret != 0) {
        return ret < 0 ? ret : 0;
    }
    l2 = malloc(s->cluster_size);
    if (!l2) {
        res->check_errors++;
        return -ENOMEM;
    }
    ret = vd_child_pread(s->file, l2_offset, l2, s->cluster_size, NULL);
    if (ret < 0) {
        fprintf(stderr, "ERROR: I/O error in check_refcounts_l2\n");
        res->check_errors++;
        goto out;
    }

    for (uint64_t i = 0; i < s->l2_size; i++) {
        uint64_t e = qcow2_get_l2_entry(s, l2, i);
        uint64_t bm = qcow2_get_l2_bitmap(s, l2, i);
        ck_ctype t = cluster_type(c, e);

        if (t != CT_COMPRESSED && (e & QCOW2_L2E_STD_RESERVED)) {
            fprintf(stderr, "ERROR found l2 entry with reserved bits set: %"
                    PRIx64 "\n", e);
            res->corruptions++;
        }

        switch (t) {
        case CT_COMPRESSED: {
            uint64_t coff, csize;

            if (e & QCOW2_OFLAG_COPIED) {
                fprintf(stderr, "ERROR: coffset=0x%" PRIx64 ": copied flag "
                        "must never be set for compressed clusters\n",
                        e & s->cluster_offset_mask);
                e &= ~QCOW2_OFLAG_COPIED;
                res->corruptions++;
            }
            if (c->data_file) {
                fprintf(stderr, "ERROR compressed cluster %d with data "
                        "file, entry=0x%" PRIx64 "\n", (int)i, e);
                res->corruptions++;
                break;
            }
            if (bm) {
                fprintf(stderr, "ERROR compressed cluster %d with non-zero "
                        "subcluster allocation bitmap, entry=0x%" PRIx64
                        "\n", (int)i, e);
                res->corruptions++;
                break;
            }
            qcow2_parse_compressed(s, e, &coff, &csize);
            ret = inc_refs(c, res, coff, csize);
            if (ret < 0) {
                goto out;
            }
            if (flags & CK_FRAG_INFO) {
                res->allocated_clusters++;
                res->compressed_clusters++;
                /* Compressed clusters share sectors: never contiguous. */
                res->fragmented_clusters++;
            }
            break;
        }

        case CT_ZERO_ALLOC:
        case CT_NORMAL: {
            uint64_t off = e & QCOW2_L2E_OFFSET_MASK;

            if ((bm >> 32) & bm) {
                res->corruptions++;
                fprintf(stderr, "ERROR offset=%" PRIx64 ": Allocated "
                        "cluster has corrupted subcluster allocation "
                        "bitmap\n", off);
            }
            if (qcow2_offset_into_cluster(s, off)) {
                bool has_data = s->extended_l2
                                ? (bm & QCOW2_L2B_ALLOC_MASK) != 0
                                : !(e & QCOW2_OFLAG_ZERO);
                res->corruptions++;
                if (!has_data) {
                    fprintf(stderr, "%s offset=%" PRIx64 ": Preallocated "
                            "cluster is not properly aligned; L2 entry "
                            "corrupted.\n",
                            (c->fix & VD_CHECK_FIX_ERRORS) ? "Repairing"
                                                           : "ERROR", off);
                    if (c->fix & VD_CHECK_FIX_ERRORS) {
                        bool overlap = false;
                        ret = fix_l2_entry_by_zero(c, res, l2_offset, l2, i,
                                                   active, &overlap);
                        if (overlap) {
                            goto out;
                        }
                        if (ret == 0) {
                            continue;   /* the cluster is unused now */
                        }
                    }
                } else {
                    fprintf(stderr, "ERROR offset=%" PRIx64 ": Data "
                            "cluster is not properly aligned; L2 entry "
                            "corrupted.\n", off);
                }
            }
            if (flags & CK_FRAG_INFO) {
                res->allocated_clusters++;
                if (next_contiguous && off != next_contiguous) {
                    res->fragmented_clusters++;
                }
                next_contiguous = off + s->cluster_size;
            }
            if (!c->data_file) {
                ret = inc_refs(c, res, off, s->cluster_size);
                if (ret < 0) {
                    goto out;
                }
            }
            break;
        }

        case CT_ZERO_PLAIN:
            break;

        case CT_UNALLOCATED:
            if (bm & QCOW2_L2B_ALLOC_MASK) {
                res->corruptions++;
                fprintf(stderr, "ERROR: Unallocated cluster has non-zero "
                        "subcluster allocation map\n");
            }
            break;
        }
    }
    ret = 0;
out:
    free(l2);
    return ret;
}

/* Counts an L1 table, its L2 tables and what they reference. */
static int check_l1(ck_state *c, vd_check_result *res, uint64_t l1_offset,
                    uint32_t l1_size, int flags, bool active)
{
    qcow2_state *s = c->s;
    uint64_t bytes = (uint64_t)l1_size * 8;
    uint64_t *l1;
    int ret;

    if (!l1_size) {
        return 0;
    }
    ret = inc_refs(c, res, l1_offset, bytes);
    if (ret < 0) {
        return ret;
    }
    ret = skip_past_eof(c, l1_offset);
    if (ret != 0) {
        return ret < 0 ? ret : 0;
    }
    l1 = malloc(bytes);
    if (!l1) {
        res->check_errors++;
        return -ENOMEM;
    }
    ret = vd_child_pread(s->file, l1_offset, l1, bytes, NULL);
    if (ret < 0) {
        fprintf(stderr, "ERROR: I/O error in check_refcounts_l1\n");
        res->check_errors++;
        free(l1);
        return ret;
    }

    for (uint32_t i = 0; i < l1_size; i++) {
        uint64_t e = be64toh(l1[i]);
        uint64_t l2_offset;

        if (!e) {
            continue;
        }
        if (e & QCOW2_L1E_RESERVED) {
            fprintf(stderr, "ERROR found L1 entry with reserved bits set: %"
                    PRIx64 "\n", e);
            res->corruptions++;
        }
        l2_offset = e & QCOW2_L1E_OFFSET_MASK;
        ret = inc_refs(c, res, l2_offset, s->cluster_size);
        if (ret < 0) {
            break;
        }
        if (qcow2_offset_into_cluster(s, l2_offset)) {
            fprintf(stderr, "ERROR l2_offset=%" PRIx64 ": Table is not "
                    "cluster aligned; L1 entry corrupted\n", l2_offset);
            res->corruptions++;
        }
        ret = check_l2(c, res, l2_offset, flags, active);
        if (ret < 0) {
            break;
        }
    }
    free(l1);
    return ret < 0 ? ret : 0;
}

/* ---- refcount blocks ----------------------------------------------- */

static int check_refblocks(ck_state *c, vd_check_result *res, bool *rebuild)
{
    qcow2_state *s = c->s;
    int ret;

    for (uint32_t i = 0; i < s->refcount_table_size; i++) {
        uint64_t off = s->refcount_table[i] & QCOW2_REFT_OFFSET_MASK;
        int64_t cl = (int64_t)(off >> s->cluster_bits);

        if (s->refcount_table[i] & QCOW2_REFT_RESERVED) {
            fprintf(stderr, "ERROR refcount table entry %" PRIu32 " has "
                    "reserved bits set\n", i);
            res->corruptions++;
            *rebuild = true;
            continue;
        }
        /* (off is masked, so its low bits are already clear; QEMU's
         * alignment test is kept for clusters larger than 512 bytes.) */
        if (qcow2_offset_into_cluster(s, off)) {
            fprintf(stderr, "ERROR refcount block %" PRIu32 " is not "
                    "cluster aligned; refcount table entry corrupted\n", i);
            res->corruptions++;
            *rebuild = true;
            continue;
        }
        if (cl >= c->nb_clusters) {
            res->corruptions++;
            fprintf(stderr, "%s refcount block %" PRIu32 " is outside "
                    "image\n", (c->fix & VD_CHECK_FIX_ERRORS) ? "Repairing"
                                                              : "ERROR", i);
            if (c->fix & VD_CHECK_FIX_ERRORS) {
                int64_t size;

                /* Grow the file so the block exists (reading zeros), as
                 * QEMU does; refuse absurd sizes instead of trying. */
                if (off > (uint64_t)file_length(c) + (1ull << 30)) {
                    ret = -EFBIG;
                } else {
                    ret = vd_node_truncate(s->file->node,
                                           off + s->cluster_size, false,
                                           VD_PREALLOC_OFF, NULL);
                }
                if (ret == 0) {
                    size = file_length(c);
                    ret = size < 0 ? (int)size : 0;
                }
                if (ret == 0) {
                    int64_t nb = (int64_t)qcow2_size_to_clusters(
                                     s, (uint64_t)file_length(c));
                    if (nb > c->nb_clusters) {
                        ret = imrt_resize(c, nb);
                        if (ret < 0) {
                            res->check_errors++;
                            return ret;
                        }
                    }
                    if (cl >= c->nb_clusters) {
                        ret = -EINVAL;
                    }
                }
                if (ret == 0) {
                    res->corruptions--;
                    res->corruptions_fixed++;
                    ret = inc_refs(c, res, off, s->cluster_size);
                    if (ret < 0) {
                        return ret;
                    }
                    continue;
                }
                *rebuild = true;
                fprintf(stderr, "ERROR could not resize image: %s\n",
                        strerror(-ret));
            }
            continue;
        }
        if (off) {
            ret = inc_refs(c, res, off, s->cluster_size);
            if (ret < 0) {
                return ret;
            }
            if (imrt_get(c, cl) != 1) {
                fprintf(stderr, "ERROR refcount block %" PRIu32
                        " refcount=%" PRIu64 "\n", i, imrt_get(c, cl));
                res->corruptions++;
                *rebuild = true;
            }
        }
    }
    return 0;
}

/* ---- bitmaps ------------------------------------------------------- */

/*
 * Counts the bitmap directory, the bitmap tables and their clusters, as
 * QEMU's qcow2_check_bitmaps_refcounts(): a directory or a table that
 * does not load (bitmap.c's readers, shared with open) is a corruption
 * that ends the check with -EINVAL. Open validated the directory and the
 * tables of the bitmaps not in use; the tables of bitmaps in use are
 * first read here.
 */
static int check_bitmaps(ck_state *c, vd_check_result *res)
{
    qcow2_state *s = c->s;
    const qcow2_bitmaps_ext *ext = &s->bitmaps_ext;
    qcow2_bitmap_info *bm = NULL;
    int ret;

    if (!qcow2_bitmaps_valid(s)) {
        return 0;
    }
    ret = inc_refs(c, res, ext->bitmap_directory_offset,
                   ext->bitmap_directory_size);
    if (ret < 0) {
        return ret;
    }
    if (qcow2_bitmap_list_load(s, &bm, NULL) < 0) {
        res->corruptions++;
        return -EINVAL;
    }
    for (uint32_t n = 0; ret == 0 && n < ext->nb_bitmaps; n++) {
        uint64_t *table = NULL;

        ret = inc_refs(c, res, bm[n].table_offset,
                       (uint64_t)bm[n].table_size * 8);
        if (ret < 0) {
            break;
        }
        ret = qcow2_bitmap_table_load(s, bm[n].table_offset,
                                      bm[n].table_size, &table);
        if (ret < 0) {
            res->corruptions++;
            break;
        }
        for (uint32_t i = 0; ret == 0 && i < bm[n].table_size; i++) {
            uint64_t off = table[i] & BME_OFFSET_MASK;
            if (off) {
                ret = inc_refs(c, res, off, s->cluster_size);
            }
        }
        free(table);
    }
    qcow2_bitmap_list_free(bm, ext->nb_bitmaps);
    return ret;
}

/* ---- snapshots ----------------------------------------------------- */

static uint32_t rd32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
           ((uint32_t)p[2] << 8) | p[3];
}

static uint64_t rd64(const uint8_t *p)
{
    return ((uint64_t)rd32(p) << 32) | rd32(p + 4);
}

static void free_snapshots(ck_state *c)
{
    for (uint32_t i = 0; i < c->nb_snaps; i++) {
        free(c->snaps[i].id);
        free(c->snaps[i].name);
    }
    free(c->snaps);
    c->snaps = NULL;
    c->nb_snaps = 0;
}

static char *read_string(ck_state *c, uint64_t off, uint16_t len, int *ret)
{
    char *str = malloc((size_t)len + 1);

    if (!str) {
        *ret = -ENOMEM;
        return NULL;
    }
    *ret = len ? vd_child_pread(c->s->file, off, str, len, NULL) : 0;
    str[len] = '\0';
    return str;
}

/*
 * Reads the snapshot table named by the on-disk header (the driver may
 * have refused or skipped it when opening for check). Problems that make
 * the table unusable stop the check (check_errors); an entry of a v3
 * image without the mandatory extra data is a corruption.
 */
static int read_snapshots(ck_state *c, vd_check_result *res)
{
    qcow2_state *s = c->s;
    uint8_t hdr[12];
    uint64_t off, table_len = 0;
    uint32_t nb;
    int ret;

    ret = vd_child_pread(s->file, 60, hdr, sizeof(hdr), NULL);
    if (ret < 0) {
        res->check_errors++;
        fprintf(stderr, "ERROR failed to read the snapshot table pointer "
                "from the image header: %s\n", strerror(-ret));
        return ret;
    }
    nb = rd32(hdr);
    c->snaps_offset = rd64(hdr + 4);
    if (nb == 0) {
        c->snaps_offset = 0;   /* QEMU ignores the offset of no table */
        return 0;
    }
    if (nb > QCOW2_MAX_SNAPSHOTS) {
        res->check_errors++;
        fprintf(stderr, "%s: ERROR snapshot table too large\n",
                program_invocation_short_name);
        c->snaps_offset = 0;
        return -EFBIG;
    }
    if (c->snaps_offset > INT64_MAX - (uint64_t)nb * 40 ||
        qcow2_offset_into_cluster(s, c->snaps_offset)) {
        res->check_errors++;
        fprintf(stderr, "%s: ERROR snapshot table offset invalid\n",
                program_invocation_short_name);
        c->snaps_offset = 0;
        return -EINVAL;
    }

    c->snaps = calloc(nb, sizeof(*c->snaps));
    if (!c->snaps) {
        res->check_errors++;
        return -ENOMEM;
    }
    off = c->snaps_offset;
    for (uint32_t i = 0; i < nb; i++) {
        qcow2_snapshot_header h;
        ck_snapshot *sn = &c->snaps[i];
        uint16_t id_size, name_size;

        table_len = (table_len + 7) & ~7ull;
        off = (off + 7) & ~7ull;
        ret = vd_child_pread(s->file, off, &h, sizeof(h), NULL);
        if (ret < 0) {
            goto fail_read;
        }
        off += sizeof(h);
        c->nb_snaps = i + 1;
        sn->l1_offset = be64toh(h.l1_table_offset);
        sn->l1_size = be32toh(h.l1_size);
        sn->extra_size = be32toh(h.extra_data_size);
        id_size = be16toh(h.id_str_size);
        name_size = be16toh(h.name_size);
        if (sn->extra_size > CK_MAX_SNAPSHOT_EXTRA) {
            res->check_errors++;
            fprintf(stderr, "%s: ERROR failed to read the snapshot table: "
                    "Too much extra metadata in snapshot table entry %"
                    PRIu32 "\n", program_invocation_short_name, i);
            free_snapshots(c);
            return -EFBIG;
        }
        off += sn->extra_size;
        sn->id = read_string(c, off, id_size, &ret);
        if (ret < 0) {
            goto fail_read;
        }
        off += id_size;
        sn->name = read_string(c, off, name_size, &ret);
        if (ret < 0) {
            goto fail_read;
        }
        off += name_size;
        table_len += sizeof(h) + sn->extra_size + id_size + name_size;
        if (table_len > CK_MAX_SNAPSHOTS_SIZE) {
            res->check_errors++;
            fprintf(stderr, "%s: ERROR failed to read the snapshot table: "
                    "Snapshot table is too big\n",
                    program_invocation_short_name);
            free_snapshots(c);
            return -EFBIG;
        }
    }
    c->snaps_size = off - c->snaps_offset;

    if (s->version >= 3) {
        for (uint32_t i = 0; i < c->nb_snaps; i++) {
            if (c->snaps[i].extra_size < 16) {
                res->corruptions++;
                /* Repaired by rewriting the table after the refcount
                 * check (fix_snapshot_table()). */
                fprintf(stderr, "%s snapshot table entry %" PRIu32
                        " is incomplete\n",
                        (c->fix & VD_CHECK_FIX_ERRORS) ? "Repairing" : "ERROR",
                        i);
            }
        }
    }
    return 0;

fail_read:
    res->check_errors++;
    fprintf(stderr, "%s: ERROR failed to read the snapshot table: Failed "
            "to read snapshot table: %s\n", program_invocation_short_name,
            strerror(-ret));
    free_snapshots(c);
    return ret;
}

/* ---- building and comparing the IMRT ------------------------------- */

static int calculate_refcounts(ck_state *c, vd_check_result *res,
                               bool *rebuild)
{
    qcow2_state *s = c->s;
    int ret;

    ret = inc_refs(c, res, 0, s->cluster_size);
    if (ret < 0) {
        return ret;
    }
    ret = check_l1(c, res, s->l1_table_offset, s->l1_size, CK_FRAG_INFO,
                   true);
    if (ret < 0) {
        return ret;
    }

    if (c->data_file && c->nb_snaps) {
        fprintf(stderr, "ERROR %" PRIu32 " snapshots in image with data "
                "file\n", c->nb_snaps);
        res->corruptions++;
    }
    for (uint32_t i = 0; i < c->nb_snaps; i++) {
        ck_snapshot *sn = &c->snaps[i];

        if (qcow2_offset_into_cluster(s, sn->l1_offset)) {
            fprintf(stderr, "ERROR snapshot %s (%s) l1_offset=%#" PRIx64
                    ": L1 table is not cluster aligned; snapshot table "
                    "entry corrupted\n", sn->id, sn->name, sn->l1_offset);
            res->corruptions++;
            continue;
        }
        if (sn->l1_size > QCOW2_MAX_L1_BYTES / 8) {
            fprintf(stderr, "ERROR snapshot %s (%s) l1_size=%#" PRIx32
                    ": L1 table is too large; snapshot table entry "
                    "corrupted\n", sn->id, sn->name, sn->l1_size);
            res->corruptions++;
            continue;
        }
        ret = check_l1(c, res, sn->l1_offset, sn->l1_size, 0, false);
        if (ret < 0) {
            return ret;
        }
    }
    ret = inc_refs(c, res, c->snaps_offset, c->snaps_size);
    if (ret < 0) {
        return ret;
    }
    ret = inc_refs(c, res, s->refcount_table_offset,
                   (uint64_t)s->refcount_table_size * 8);
    if (ret < 0) {
        return ret;
    }
    /* The LUKS header of an encrypted image (QEMU counts it here too:
     * without it, repair would free the key material). */
    if (s->has_crypto_ext) {
        ret = inc_refs(c, res, s->crypto_ext_offset, s->crypto_ext_length);
        if (ret < 0) {
            return ret;
        }
    }
    ret = check_bitmaps(c, res);
    if (ret < 0) {
        return ret;
    }
    return check_refblocks(c, res, rebuild);
}

/*
 * Compares on-disk refcounts with the IMRT, repairing what @fix allows
 * through the driver's refcount code. A cluster that is referenced but
 * has refcount 0 cannot be fixed that way (its refcount block may be
 * missing or shared): it asks for a rebuild.
 */
static void compare_refcounts(ck_state *c, vd_check_result *res,
                              unsigned fix, bool *rebuild,
                              int64_t *highest)
{
    qcow2_state *s = c->s;

    *highest = 0;
    for (int64_t i = 0; i < c->nb_clusters; i++) {
        uint64_t rc1, rc2;
        int64_t *num_fixed = NULL;
        vd_error e = VD_ERROR_INIT;
        int ret;

        ret = qcow2_get_refcount(s, (uint64_t)i, &rc1, &e);
        if (ret < 0) {
            fprintf(stderr, "Can't get refcount for cluster %" PRId64
                    ": %s\n", i, strerror(-ret));
            res->check_errors++;
            continue;
        }
        rc2 = imrt_get(c, i);
        if (rc1 > 0 || rc2 > 0) {
            *highest = i;
        }
        if (rc1 == rc2) {
            continue;
        }
        if (rc1 == 0) {
            *rebuild = true;
        } else if (rc1 > rc2 && (fix & VD_CHECK_FIX_LEAKS)) {
            num_fixed = &res->leaks_fixed;
        } else if (rc1 < rc2 && (fix & VD_CHECK_FIX_ERRORS)) {
            num_fixed = &res->corruptions_fixed;
        }
        fprintf(stderr, "%s cluster %" PRId64 " refcount=%" PRIu64
                " reference=%" PRIu64 "\n",
                num_fixed ? "Repairing" : rc1 < rc2 ? "ERROR" : "Leaked",
                i, rc1, rc2);
        if (num_fixed) {
            bool dec = rc1 > rc2;
            ret = qcow2_update_refcount(s, (uint64_t)i << s->cluster_bits,
                                        1, dec ? rc1 - rc2 : rc2 - rc1, dec,
                                        QCOW2_DISCARD_ALWAYS, NULL);
            if (ret >= 0) {
                (*num_fixed)++;
                continue;
            }
        }
        if (rc1 < rc2) {
            res->corruptions++;
        } else {
            res->leaks++;
        }
    }
}

/* ---- rebuilding the refcount structure ----------------------------- */

/* Reports a rebuild failure the way qemu-img does ("PROG: WHAT: strerror")
 * and records it in @err. Returns @code. */
static int rebuild_error(ck_state *c, vd_error *err, int code,
                         const char *what)
{
    fprintf(stderr, "%s: %s: %s\n", program_invocation_short_name, what,
            strerror(-code));
    return vd_error_set(err, code, "%s: %s: %s", c->s->filename, what,
                        strerror(-code));
}

/*
 * Allocates @count contiguous clusters in the IMRT (refcount 1), not
 * before *first_free, growing the IMRT past the end when needed. On
 * return *first_free is the first free cluster seen. Returns the byte
 * offset or -errno.
 */
static int64_t alloc_imrt(ck_state *c, int64_t count, int64_t *first_free)
{
    int64_t cl = *first_free, run = 0;
    bool first_gap = true;
    int ret;

    for (; cl < c->nb_clusters && run < count; cl++) {
        if (!imrt_get(c, cl)) {
            run++;
            if (first_gap) {
                *first_free = cl;
                first_gap = false;
            }
        } else {
            run = 0;
        }
    }
    if (run < count) {
        ret = imrt_resize(c, cl + count - run);
        if (ret < 0) {
            return ret;
        }
    }
    cl -= run;
    for (int64_t i = 0; i < count; i++) {
        imrt_set(c, cl + i, 1);
    }
    return cl << c->s->cluster_bits;
}

/*
 * Writes a refcount block for every block-sized slice of the IMRT in
 * [first, end) that has a non-zero entry, allocating it in the IMRT when
 * the new refcount table has no block there yet. Returns 1 when the new
 * table (*rt, *rt_entries) had to grow, 0 when not, or -errno.
 */
static int write_refblocks(ck_state *c, int64_t first, int64_t end,
                           uint64_t **rt, uint32_t *rt_entries,
                           vd_error *err)
{
    qcow2_state *s = c->s;
    int64_t first_free = 0;
    bool grown = false;
    int ret;

    for (int64_t cl = first; cl < end; cl++) {
        int64_t rb_index, rb_start, rb_off;

        if (!imrt_get(c, cl)) {
            continue;
        }
        rb_index = cl >> s->refcount_block_bits;
        rb_start = rb_index << s->refcount_block_bits;

        if ((int64_t)*rt_entries > rb_index && (*rt)[rb_index]) {
            rb_off = (int64_t)(*rt)[rb_index];
        } else {
            if (first_free < rb_start) {
                first_free = rb_start;   /* not inside a written block */
            }
            rb_off = alloc_imrt(c, 1, &first_free);
            if (rb_off < 0) {
                return rebuild_error(c, err, (int)rb_off,
                                     "ERROR allocating refblock");
            }
            if ((rb_off >> s->cluster_bits) >= end) {
                end = (rb_off >> s->cluster_bits) + 1;
            }
            if ((int64_t)*rt_entries <= rb_index) {
                uint64_t n = (((uint64_t)rb_index + 1) * 8 + s->cluster_size
                              - 1) / s->cluster_size * s->cluster_size / 8;
                uint64_t *p;

                if (n > QCOW2_MAX_REFTABLE_BYTES / 8) {
                    return rebuild_error(c, err, -EFBIG,
                                         "ERROR allocating reftable memory");
                }
                p = realloc(*rt, n * 8);
                if (!p) {
                    return rebuild_error(c, err, -ENOMEM,
                                         "ERROR allocating reftable memory");
                }
                memset(p + *rt_entries, 0, (n - *rt_entries) * 8);
                *rt = p;
                *rt_entries = (uint32_t)n;
                grown = true;
            }
            (*rt)[rb_index] = (uint64_t)rb_off;
        }

        if (overlaps_metadata(c, 0, (uint64_t)rb_off, s->cluster_size)) {
            /* QEMU marks the image corrupt here; a check never does. */
            return rebuild_error(c, err, -EIO, "ERROR writing refblock");
        }
        /* The IMRT is a whole number of clusters, so this slice is
         * complete even for the last block. */
        ret = vd_child_pwrite(s->file, (uint64_t)rb_off,
                              c->imrt + (uint64_t)rb_index * s->cluster_size,
                              s->cluster_size, 0, NULL);
        if (ret < 0) {
            return rebuild_error(c, err, ret, "ERROR writing refblock");
        }
        cl = rb_start + (int64_t)s->refcount_block_size - 1;
    }
    return grown;
}

/*
 * Writes a new refcount structure (blocks and table) computed from the
 * IMRT into clusters that are free in it, then points the header at it.
 * The old structure is left behind as leaked clusters for the second
 * pass to free. The allocation loop ends because each growth of the
 * table covers many more clusters than it takes.
 */
static int rebuild_refcount_structure(ck_state *c, vd_check_result *res,
                                      vd_error *err)
{
    qcow2_state *s = c->s;
    uint64_t *rt = NULL;
    uint32_t rt_entries = 0;
    int64_t rt_off = -1, rt_clusters = 0;
    uint8_t hdr[12];
    int changed, ret;

    ret = qcow2_cache_empty(s->refcount_cache);
    if (ret < 0) {
        rebuild_error(c, err, ret, "ERROR emptying the refcount cache");
        goto fail;
    }

    changed = write_refblocks(c, 0, c->nb_clusters, &rt, &rt_entries, err);
    if (changed < 0) {
        ret = changed;
        goto fail;
    }
    do {
        int64_t first_free = 0;

        rt_clusters = (int64_t)qcow2_size_to_clusters(
                          s, (uint64_t)rt_entries * 8);
        rt_off = alloc_imrt(c, rt_clusters, &first_free);
        if (rt_off < 0) {
            ret = rebuild_error(c, err, (int)rt_off,
                                "ERROR allocating reftable");
            goto fail;
        }
        changed = write_refblocks(c, rt_off >> s->cluster_bits,
                                  (rt_off >> s->cluster_bits) + rt_clusters,
                                  &rt, &rt_entries, err);
        if (changed < 0) {
            ret = changed;
            goto fail;
        }
    } while (changed);

    for (uint32_t i = 0; i < rt_entries; i++) {
        rt[i] = htobe64(rt[i]);
    }
    if (overlaps_metadata(c, 0, (uint64_t)rt_off, (uint64_t)rt_entries * 8)) {
        ret = rebuild_error(c, err, -EIO, "ERROR writing reftable");
        goto fail;
    }
    ret = vd_child_pwrite(s->file, (uint64_t)rt_off, rt,
                          (uint64_t)rt_entries * 8, 0, NULL);
    if (ret == 0) {
        ret = vd_node_flush(s->file->node, NULL);
    }
    if (ret < 0) {
        rebuild_error(c, err, ret, "ERROR writing reftable");
        goto fail;
    }
    /* refcount_table_offset and refcount_table_clusters are adjacent in
     * the header (offsets 48 and 56): one write switches structures. */
    for (int k = 0; k < 8; k++) {
        hdr[k] = (uint8_t)((uint64_t)rt_off >> (56 - 8 * k));
    }
    for (int k = 0; k < 4; k++) {
        hdr[8 + k] = (uint8_t)((uint64_t)rt_clusters >> (24 - 8 * k));
    }
    ret = vd_child_pwrite(s->file, 48, hdr, sizeof(hdr), 0, NULL);
    if (ret == 0) {
        ret = vd_node_flush(s->file->node, NULL);
    }
    if (ret < 0) {
        rebuild_error(c, err, ret, "ERROR setting reftable");
        goto fail;
    }

    for (uint32_t i = 0; i < rt_entries; i++) {
        rt[i] = be64toh(rt[i]);
    }
    free(s->refcount_table);
    s->refcount_table = rt;
    s->refcount_table_offset = (uint64_t)rt_off;
    qcow2_reftable_forget_pending(s);
    s->refcount_table_size = rt_entries;
    qcow2_overlap_changed(s);
    s->free_cluster_index = 0;
    return 0;

fail:
    res->check_errors++;
    free(rt);
    return ret;
}

/* ---- COPIED flags -------------------------------------------------- */

static int check_oflag_copied(ck_state *c, vd_check_result *res)
{
    qcow2_state *s = c->s;
    bool repair;
    uint8_t *l2;
    int ret = 0;

    if (c->fix & VD_CHECK_FIX_ERRORS) {
        repair = true;
    } else if (c->fix & VD_CHECK_FIX_LEAKS) {
        /* Only safe when the refcounts are known to be right by now. */
        repair = !res->check_errors && !res->corruptions && !res->leaks;
    } else {
        repair = false;
    }
    if (!s->l1_table) {
        return 0;
    }
    l2 = malloc(s->cluster_size);
    if (!l2) {
        res->check_errors++;
        return -ENOMEM;
    }

    for (uint32_t i = 0; i < s->l1_size; i++) {
        uint64_t l1e = s->l1_table[i];
        uint64_t l2_offset = l1e & QCOW2_L1E_OFFSET_MASK;
        uint64_t rc;
        int dirty = 0;

        if (!l2_offset) {
            continue;
        }
        if (qcow2_get_refcount(s, l2_offset >> s->cluster_bits, &rc,
                               NULL) < 0) {
            continue;   /* already reported by the comparison */
        }
        if ((rc == 1) != ((l1e & QCOW2_OFLAG_COPIED) != 0)) {
            res->corruptions++;
            fprintf(stderr, "%s OFLAG_COPIED L2 cluster: l1_index=%" PRIu32
                    " l1_entry=%" PRIx64 " refcount=%" PRIu64 "\n",
                    repair ? "Repairing" : "ERROR", i, l1e, rc);
            if (repair) {
                s->l1_table[i] = rc == 1 ? l1e | QCOW2_OFLAG_COPIED
                                         : l1e & ~QCOW2_OFLAG_COPIED;
                ret = qcow2_write_l1_entry(s, i, NULL);
                if (ret < 0) {
                    res->check_errors++;
                    goto out;
                }
                res->corruptions--;
                res->corruptions_fixed++;
            }
        }

        ret = vd_child_pread(s->file, l2_offset, l2, s->cluster_size, NULL);
        if (ret < 0) {
            fprintf(stderr, "ERROR: Could not read L2 table: %s\n",
                    strerror(-ret));
            res->check_errors++;
            goto out;
        }
        for (uint64_t j = 0; j < s->l2_size; j++) {
            uint64_t e = qcow2_get_l2_entry(s, l2, j);
            ck_ctype t = cluster_type(c, e);

            if (t != CT_NORMAL && t != CT_ZERO_ALLOC) {
                continue;
            }
            if (c->data_file) {
                rc = 1;
            } else if (qcow2_get_refcount(s, (e & QCOW2_L2E_OFFSET_MASK) >>
                                          s->cluster_bits, &rc, NULL) < 0) {
                continue;
            }
            if ((rc == 1) != ((e & QCOW2_OFLAG_COPIED) != 0)) {
                res->corruptions++;
                fprintf(stderr, "%s OFLAG_COPIED data cluster: l2_entry=%"
                        PRIx64 " refcount=%" PRIu64 "\n",
                        repair ? "Repairing" : "ERROR", e, rc);
                if (repair) {
                    qcow2_set_l2_entry(s, l2, j,
                                       rc == 1 ? e | QCOW2_OFLAG_COPIED
                                               : e & ~QCOW2_OFLAG_COPIED);
                    dirty++;
                }
            }
        }
        if (dirty) {
            if (overlaps_metadata(c, OL_ACTIVE_L2, l2_offset,
                                  s->cluster_size)) {
                fprintf(stderr, "ERROR: Could not write L2 table; metadata "
                        "overlap check failed: %s\n", strerror(EIO));
                res->check_errors++;
                ret = -EIO;
                goto out;
            }
            ret = vd_child_pwrite(s->file, l2_offset, l2, s->cluster_size,
                                  0, NULL);
            if (ret < 0) {
                fprintf(stderr, "ERROR: Could not write L2 table: %s\n",
                        strerror(-ret));
                res->check_errors++;
                goto out;
            }
            qcow2_cache_discard(s->l2_cache, l2_offset);
            res->corruptions -= dirty;
            res->corruptions_fixed += dirty;
        }
    }
    ret = 0;
out:
    free(l2);
    return ret;
}

/* ---- the refcount check as a whole --------------------------------- */

static int check_refcounts(ck_state *c, vd_check_result *res, vd_error *err)
{
    qcow2_state *s = c->s;
    vd_check_result pre;
    int64_t size, highest = 0;
    bool rebuild = false;
    int ret;

    size = file_length(c);
    if (size < 0) {
        res->check_errors++;
        return (int)size;
    }
    if (qcow2_size_to_clusters(s, (uint64_t)size) > INT32_MAX) {
        res->check_errors++;
        return vd_error_set(err, -EFBIG, "%s: image file too large to "
                            "check", s->filename);
    }
    /* QEMU counts the virtual size in whole sectors, rounded down. */
    res->total_clusters = (int64_t)qcow2_size_to_clusters(
                              s, s->size & ~511ull);

    ret = imrt_resize(c, (int64_t)qcow2_size_to_clusters(s, (uint64_t)size));
    if (ret < 0) {
        res->check_errors++;
        return ret;
    }
    ret = calculate_refcounts(c, res, &rebuild);
    if (ret < 0) {
        return ret;
    }

    /* When only counts need fixing this comparison runs again with
     * repairs enabled; its findings are then discarded. */
    pre = *res;
    compare_refcounts(c, res, 0, &rebuild, &highest);

    if (rebuild && (c->fix & VD_CHECK_FIX_ERRORS)) {
        vd_check_result old = *res;
        int64_t fresh_leaks = 0;

        fprintf(stderr, "Rebuilding refcount structure\n");
        ret = rebuild_refcount_structure(c, res, err);
        if (ret < 0) {
            return ret;
        }
        res->corruptions = 0;
        res->leaks = 0;

        /* The old structure is now unreferenced: count from scratch. */
        rebuild = false;
        memset(c->imrt, 0, imrt_bytes(c, c->nb_clusters));
        {
            unsigned saved_fix = c->fix;
            c->fix = 0;
            ret = calculate_refcounts(c, res, &rebuild);
            c->fix = saved_fix;
        }
        if (ret < 0) {
            return ret;
        }
        if (c->fix & VD_CHECK_FIX_LEAKS) {
            vd_check_result saved = *res;

            memset(res, 0, sizeof(*res));
            compare_refcounts(c, res, VD_CHECK_FIX_LEAKS, &rebuild,
                              &highest);
            if (rebuild) {
                fprintf(stderr, "ERROR rebuilt refcount structure is still "
                        "broken\n");
            }
            fresh_leaks = res->leaks;
            *res = saved;
        }
        if (res->corruptions < old.corruptions) {
            res->corruptions_fixed += old.corruptions - res->corruptions;
        }
        if (res->leaks < old.leaks) {
            res->leaks_fixed += old.leaks - res->leaks;
        }
        res->leaks += fresh_leaks;
    } else if (c->fix) {
        if (rebuild) {
            fprintf(stderr, "ERROR need to rebuild refcount structures\n");
            res->check_errors++;
            return vd_error_set(err, -EIO, "%s: the refcount structure "
                                "needs a rebuild (repair with -r all)",
                                s->filename);
        }
        if (res->leaks || res->corruptions) {
            *res = pre;
            compare_refcounts(c, res, c->fix, &rebuild, &highest);
        }
    }

    ret = qcow2_flush_caches(s, NULL);
    if (ret < 0 && c->fix) {
        res->check_errors++;
        return vd_error_set(err, ret, "%s: cannot write repaired refcounts",
                            s->filename);
    }
    ret = check_oflag_copied(c, res);
    if (ret < 0) {
        return ret;
    }
    res->image_end_offset = (highest + 1) * (int64_t)s->cluster_size;
    return 0;
}

/* Clears the corrupt bit on disk (v3), as QEMU's qcow2_mark_consistent. */
static int mark_consistent(qcow2_state *s, vd_error *err)
{
    uint64_t v;
    int ret;

    if (!(s->incompatible_features & QCOW2_INCOMPAT_CORRUPT) ||
        s->version < 3) {
        return 0;
    }
    ret = vd_node_flush(s->file->node, err);
    if (ret < 0) {
        return ret;
    }
    s->incompatible_features &= ~QCOW2_INCOMPAT_CORRUPT;
    s->corrupt = false;
    v = htobe64(s->incompatible_features);
    ret = vd_child_pwrite(s->file, 72, &v, sizeof(v), 0, err);
    if (ret == 0) {
        ret = vd_node_flush(s->file->node, err);
    }
    return ret;
}

/* Adds a partial result to the total, as qcow2_add_check_result(). */
static void add_result(vd_check_result *out, const vd_check_result *in,
                       bool alloc_info)
{
    out->corruptions += in->corruptions;
    out->leaks += in->leaks;
    out->check_errors += in->check_errors;
    out->corruptions_fixed += in->corruptions_fixed;
    out->leaks_fixed += in->leaks_fixed;
    if (alloc_info) {
        out->image_end_offset = in->image_end_offset;
        out->allocated_clusters = in->allocated_clusters;
        out->total_clusters = in->total_clusters;
        out->fragmented_clusters = in->fragmented_clusters;
        out->compressed_clusters = in->compressed_clusters;
    }
}

int qcow2_check(vd_node *node, vd_check_result *res, unsigned fix,
                vd_error *err)
{
    qcow2_state *s = node->opaque;
    vd_check_result snap_res, rc_res;
    ck_state c;
    int ret;

    memset(res, 0, sizeof(*res));
    memset(&snap_res, 0, sizeof(snap_res));
    memset(&rc_res, 0, sizeof(rc_res));
    memset(&c, 0, sizeof(c));
    c.s = s;
    c.fix = fix;
    c.data_file = s->data_file && s->data_file != s->file;
    if (fix && node->read_only) {
        return vd_error_set(err, -EROFS, "%s: cannot repair an image opened "
                            "read-only", s->filename);
    }

    pthread_mutex_lock(&s->lock);
    /* The repairs below fix what qcow2_validate_metadata() would refuse:
     * they are not gated by it, and the image is validated afresh at
     * the next change. */
    s->repairing = true;
    s->validated = false;
    /* Work from what is on disk: the checker reads tables directly. */
    ret = qcow2_flush_caches(s, err);
    if (ret < 0 && fix) {
        goto out;
    }

    ret = read_snapshots(&c, &snap_res);
    if (ret < 0) {
        add_result(res, &snap_res, false);
        if (!vd_error_is_set(err)) {
            vd_error_set(err, ret, "%s: cannot read the snapshot table",
                         s->filename);
        }
        goto out;
    }
    ret = check_refcounts(&c, &rc_res, err);
    add_result(res, &rc_res, true);
    if (ret == 0 && snap_res.corruptions && (fix & VD_CHECK_FIX_ERRORS)) {
        /* QEMU's qcow2_check_fix_snapshot_table(): the table is written
         * anew, every entry complete. */
        vd_error e = VD_ERROR_INIT;
        ret = qcow2_snapshot_table_repair(s, c.snaps_offset, c.nb_snaps, &e);
        if (ret < 0) {
            snap_res.check_errors++;
            fprintf(stderr, "ERROR failed to update snapshot table: %s\n",
                    strerror(-ret));
            vd_error_set(err, ret, "%s", e.message);
        } else {
            snap_res.corruptions_fixed += snap_res.corruptions;
            snap_res.corruptions = 0;
        }
    }
    add_result(res, &snap_res, false);
    if (ret < 0) {
        if (!vd_error_is_set(err)) {
            vd_error_set_errno(err, ret, "%s: check failed", s->filename);
        }
        goto out;
    }

    if (fix && res->check_errors == 0 && res->corruptions == 0) {
        ret = qcow2_mark_clean(s, err);
        if (ret == 0) {
            ret = mark_consistent(s, err);
        }
    }
out:
    s->repairing = false;
    pthread_mutex_unlock(&s->lock);
    free_snapshots(&c);
    free(c.imrt);
    return ret;
}
