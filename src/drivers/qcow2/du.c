/*
 * qcow2 space accounting: the driver's space_usage callback behind
 * vd_du() and `vdisk du` (docs/snapshots.md, "Space per snapshot").
 *
 * Every host cluster of the file is given the set of *owners* that
 * reference it, from the metadata alone (nothing of the guest data is
 * read): the active layer (its L1 table, L2 tables and the clusters
 * they map), each internal snapshot (likewise, from its own L1 table),
 * each persistent bitmap (its table and bitmap clusters), and the
 * metadata proper (header cluster with its extensions, refcount table
 * and blocks, snapshot table, bitmap directory, LUKS header). Owners
 * are walked one after the other, so two words per cluster suffice:
 * the only owner seen so far (or "several"), and the last owner that
 * counted it (so an owner reaching a cluster twice, as packed
 * compressed clusters do, counts it once).
 *
 * A cluster with one owner is that owner's *exclusive* space: qcow2's
 * refcount of a cluster is the number of references from the L1 trees
 * (a snapshot's tree adds one to every L2 table and data cluster it
 * reaches), so deleting a snapshot frees exactly the clusters only its
 * tree reaches, plus its L1 table. The sum of every owner's exclusive
 * bytes and the shared clusters counted once is the clusters the
 * metadata references, as qemu-img check rebuilds them; clusters with
 * an on-disk refcount that nothing references are leaks, a row of
 * their own. A bitmap's directory entry is accounted to the bitmap in
 * bytes and taken from the metadata row, so the sums stay exact.
 *
 * The walk holds the driver lock and reads L2 tables and refcount
 * blocks through the caches (a writable node's unwritten tables count
 * as they are in memory); snapshot L1 tables, the bitmap directory and
 * bitmap tables are read from the file. Clusters inside the file that
 * nothing references and no refcount claims are reported as unused.
 * Damaged metadata (a table past the end of the file or not aligned)
 * fails with a message naming it.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "drivers/qcow2/qcow2.h"

#define DU_MULTI UINT32_MAX        /* owner[]: more than one owner */
/* Two 4-byte words per cluster of the file: at most 4 GiB of them (a
 * sparse file of many TB with small clusters, as check's limit). */
#define DU_MAX_CLUSTERS (1ull << 29)
#define BME_OFFSET_MASK 0x00fffffffffffe00ull
#define BM_DIR_ENTRY_FIXED 24      /* bitmap directory entry's fixed part */

/* Rows are owners; row_of_owner maps them to the report's order. */
typedef struct du_owner {
    uint64_t used, exclusive, tables, mapped;
} du_owner;

typedef struct du_state {
    qcow2_state *s;
    uint64_t nb;                /* clusters the arrays cover */
    uint32_t *owner;            /* 0 none, o + 1, or DU_MULTI */
    uint32_t *last;             /* last owner (o + 1) that counted it */
    du_owner *own;
    uint32_t nb_own;
    vd_error *err;
} du_state;

/* Counts owner @o's reference to every cluster touching [off, off +
 * bytes); @table: the clusters are @o's own tables. @what names the
 * structure in the error for a range past the end of the file. */
static int du_ref(du_state *d, uint32_t o, uint64_t off, uint64_t bytes,
                  bool table, const char *what)
{
    qcow2_state *s = d->s;
    uint64_t first, last;

    if (!bytes) {
        return 0;
    }
    if (off > QCOW2_MAX_HOST_OFFSET || bytes > QCOW2_MAX_HOST_OFFSET ||
        ((off + bytes - 1) >> s->cluster_bits) >= d->nb) {
        return vd_error_set(d->err, -EINVAL, "%s: %s at offset %#" PRIx64
                            " (%" PRIu64 " bytes) lies past the end of the "
                            "file", s->filename, what, off, bytes);
    }
    first = off >> s->cluster_bits;
    last = (off + bytes - 1) >> s->cluster_bits;
    for (uint64_t k = first; k <= last; k++) {
        if (d->last[k] == o + 1) {
            continue;
        }
        d->last[k] = o + 1;
        d->own[o].used += s->cluster_size;
        if (table) {
            d->own[o].tables += s->cluster_size;
        }
        if (d->owner[k] == 0) {
            d->owner[k] = o + 1;
        } else if (d->owner[k] != o + 1) {
            d->owner[k] = DU_MULTI;
        }
    }
    return 0;
}

static int du_aligned(du_state *d, uint64_t off, const char *what)
{
    if (qcow2_offset_into_cluster(d->s, off)) {
        return vd_error_set(d->err, -EINVAL, "%s: %s offset %#" PRIx64
                            " is not cluster-aligned", d->s->filename, what,
                            off);
    }
    return 0;
}

/* One L2 table of owner @o: the table and every host cluster its
 * entries reference (QEMU check's view of the entry types). */
static int du_l2(du_state *d, uint32_t o, uint64_t l2_off)
{
    qcow2_state *s = d->s;
    bool data_file = s->data_file && s->data_file != s->file;
    void *l2 = NULL;
    int ret;

    ret = du_aligned(d, l2_off, "L2 table");
    if (ret == 0) {
        ret = du_ref(d, o, l2_off, s->cluster_size, true, "L2 table");
    }
    if (ret == 0) {
        ret = qcow2_cache_get(s, s->l2_cache, l2_off, &l2, d->err);
    }
    if (ret < 0) {
        return ret;
    }
    for (uint64_t i = 0; i < s->l2_size && ret == 0; i++) {
        uint64_t e = qcow2_get_l2_entry(s, l2, i);
        uint64_t off = e & QCOW2_L2E_OFFSET_MASK;

        if (e & QCOW2_OFLAG_COMPRESSED) {
            uint64_t coff, cbytes;

            qcow2_parse_compressed(s, e, &coff, &cbytes);
            d->own[o].mapped += s->cluster_size;
            ret = du_ref(d, o, coff, cbytes, false, "compressed cluster");
            continue;
        }
        if (!off) {
            /* Unallocated or a plain zero cluster; in an external data
             * file offset 0 is valid (COPIED tells it apart). */
            if (data_file && (e & QCOW2_OFLAG_COPIED)) {
                d->own[o].mapped += s->cluster_size;
            }
            continue;
        }
        d->own[o].mapped += s->cluster_size;
        if (data_file) {
            continue;       /* not in this file, not refcounted */
        }
        ret = du_aligned(d, off, "data cluster");
        if (ret == 0) {
            ret = du_ref(d, o, off, s->cluster_size, false, "data cluster");
        }
    }
    qcow2_cache_put(s->l2_cache, &l2);
    return ret;
}

/* An L1 table of @size entries (host endian @l1, stored at @l1_off) and
 * its tree, for owner @o. */
static int du_l1(du_state *d, uint32_t o, uint64_t l1_off,
                 const uint64_t *l1, uint32_t size)
{
    int ret = du_ref(d, o, l1_off, (uint64_t)size * 8, true, "L1 table");

    for (uint32_t i = 0; i < size && ret == 0; i++) {
        uint64_t l2_off = l1[i] & QCOW2_L1E_OFFSET_MASK;

        if (l2_off) {
            ret = du_l2(d, o, l2_off);
        }
    }
    return ret;
}

/* The refcount table and blocks, owned by the metadata row @o. */
static int du_refcount_structure(du_state *d, uint32_t o)
{
    qcow2_state *s = d->s;
    int ret = du_ref(d, o, s->refcount_table_offset,
                     (uint64_t)s->refcount_table_size * 8, true,
                     "refcount table");

    for (uint32_t i = 0; i < s->refcount_table_size && ret == 0; i++) {
        uint64_t off = s->refcount_table[i] & QCOW2_REFT_OFFSET_MASK;

        if (off) {
            ret = du_aligned(d, off, "refcount block");
            if (ret == 0) {
                ret = du_ref(d, o, off, s->cluster_size, true,
                             "refcount block");
            }
        }
    }
    return ret;
}

/* Clusters with an on-disk refcount that no owner references; those of
 * them inside the file's first @fc clusters also go to *@leaked_in. */
static int du_leaks(du_state *d, uint64_t fc, uint64_t *leaked,
                    uint64_t *leaked_in)
{
    qcow2_state *s = d->s;

    *leaked = *leaked_in = 0;
    for (uint32_t i = 0; i < s->refcount_table_size; i++) {
        uint64_t off = s->refcount_table[i] & QCOW2_REFT_OFFSET_MASK;
        uint64_t base = (uint64_t)i << s->refcount_block_bits;
        void *blk = NULL;
        int ret;

        if (!off) {
            continue;
        }
        ret = qcow2_cache_get(s, s->refcount_cache, off, &blk, d->err);
        if (ret < 0) {
            return ret;
        }
        for (uint64_t j = 0; j < s->refcount_block_size; j++) {
            uint64_t k = base + j;

            if ((k >= d->nb || d->owner[k] == 0) &&
                qcow2_refblock_get(s, blk, j) > 0) {
                *leaked += s->cluster_size;
                *leaked_in += k < fc ? s->cluster_size : 0;
            }
        }
        qcow2_cache_put(s->refcount_cache, &blk);
    }
    return 0;
}

/* The bitmaps (owners @first ..): tables and bits; *entry_bytes gets
 * each one's directory entry size, taken from the metadata row later. */
static int du_bitmaps(du_state *d, uint32_t first, qcow2_bitmap_info *bm,
                      uint32_t n, uint64_t *entry_bytes)
{
    qcow2_state *s = d->s;
    uint64_t dir_size = s->bitmaps_ext.bitmap_directory_size;
    uint8_t *dir = malloc(dir_size);
    uint64_t pos = 0;
    int ret;

    if (!dir) {
        return vd_error_set(d->err, -ENOMEM, "Out of memory");
    }
    /* The directory was validated by qcow2_bitmap_list_load(): the
     * entries' sizes are read again here (it keeps no sizes). */
    ret = vd_child_pread(s->file, s->bitmaps_ext.bitmap_directory_offset,
                         dir, dir_size, d->err);
    for (uint32_t i = 0; i < n && ret == 0; i++) {
        uint64_t *table = NULL;
        uint64_t esize;

        if (pos + BM_DIR_ENTRY_FIXED > dir_size) {
            ret = vd_error_set(d->err, -EINVAL, "%s: bitmap directory is "
                               "truncated", s->filename);
            break;
        }
        esize = BM_DIR_ENTRY_FIXED +
                (((uint64_t)dir[pos + 20] << 24) |
                 ((uint64_t)dir[pos + 21] << 16) |
                 ((uint64_t)dir[pos + 22] << 8) | dir[pos + 23]) +
                (((uint64_t)dir[pos + 18] << 8) | dir[pos + 19]);
        esize = (esize + 7) & ~7ull;
        entry_bytes[i] = esize;
        pos += esize;

        ret = du_ref(d, first + i, bm[i].table_offset,
                     (uint64_t)bm[i].table_size * 8, true, "bitmap table");
        if (ret < 0) {
            break;
        }
        ret = qcow2_bitmap_table_load(s, bm[i].table_offset,
                                      bm[i].table_size, &table);
        if (ret < 0) {
            vd_error_set(d->err, ret, "%s: bitmap '%s' has a bad table",
                         s->filename, bm[i].name);
            break;
        }
        for (uint32_t j = 0; j < bm[i].table_size && ret == 0; j++) {
            uint64_t off = table[j] & BME_OFFSET_MASK;

            if (off) {
                ret = du_ref(d, first + i, off, s->cluster_size, false,
                             "bitmap cluster");
            }
        }
        free(table);
    }
    free(dir);
    return ret;
}

static char *du_strdup(const char *str)
{
    return str ? strdup(str) : NULL;
}

int qcow2_space_usage(vd_node *node, vd_du_result *res, vd_error *err)
{
    qcow2_state *s = node->opaque;
    du_state d;
    qcow2_bitmap_info *bm = NULL;
    uint32_t nb_bm = 0, o_meta, o_active, o_snap, o_bm;
    uint64_t *entry_bytes = NULL, leaked = 0, shared = 0;
    uint64_t fc, leaked_in = 0, unowned_in = 0;
    int64_t flen;
    size_t nrows;
    int ret;

    memset(&d, 0, sizeof(d));
    d.s = s;
    d.err = err;
    pthread_mutex_lock(&s->lock);
    if (s->snapshots_unusable) {
        ret = vd_error_set(err, -EINVAL, "%s: the snapshot table is "
                           "damaged", s->filename);
        goto out;
    }
    flen = vd_node_getlength(s->file->node);
    if (flen < 0) {
        ret = vd_error_set(err, (int)flen, "%s: cannot get the file length",
                           s->filename);
        goto out;
    }
    /* A structure may end inside the cluster after the last byte (the
     * last cluster may be partly written, as qemu-img check allows). */
    fc = qcow2_size_to_clusters(s, (uint64_t)flen);
    d.nb = fc + 1;
    if (d.nb > DU_MAX_CLUSTERS) {
        ret = vd_error_set(err, -EFBIG, "%s: %" PRIu64 " clusters are too "
                           "many to account (at most %llu)", s->filename,
                           d.nb, (unsigned long long)DU_MAX_CLUSTERS);
        goto out;
    }
    if (qcow2_bitmaps_valid(s) && s->bitmaps_ext.nb_bitmaps) {
        ret = qcow2_bitmap_list_load(s, &bm, err);
        if (ret < 0) {
            vd_error_prepend(err, "%s: ", s->filename);
            goto out;
        }
        nb_bm = s->bitmaps_ext.nb_bitmaps;
    }
    o_meta = 0;
    o_active = 1;
    o_snap = 2;
    o_bm = o_snap + s->nb_snapshots;
    d.nb_own = o_bm + nb_bm;
    d.owner = calloc(d.nb, sizeof(*d.owner));
    d.last = calloc(d.nb, sizeof(*d.last));
    d.own = calloc(d.nb_own, sizeof(*d.own));
    entry_bytes = calloc(nb_bm ? nb_bm : 1, sizeof(*entry_bytes));
    if (!d.owner || !d.last || !d.own || !entry_bytes) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory for %" PRIu64
                           " clusters", s->filename, d.nb);
        goto out;
    }

    /* Metadata first, then each tree: owners must not interleave. */
    ret = du_ref(&d, o_meta, 0, s->cluster_size, true, "header");
    if (ret == 0) {
        ret = du_refcount_structure(&d, o_meta);
    }
    if (ret == 0) {
        ret = du_ref(&d, o_meta, s->snapshots_offset, s->snapshots_size,
                     true, "snapshot table");
    }
    if (ret == 0 && s->has_crypto_ext) {
        ret = du_ref(&d, o_meta, s->crypto_ext_offset, s->crypto_ext_length,
                     true, "LUKS header");
    }
    if (ret == 0 && bm) {
        ret = du_ref(&d, o_meta, s->bitmaps_ext.bitmap_directory_offset,
                     s->bitmaps_ext.bitmap_directory_size, true,
                     "bitmap directory");
    }
    if (ret == 0) {
        ret = du_l1(&d, o_active, s->l1_table_offset, s->l1_table,
                    s->l1_size);
    }
    for (uint32_t i = 0; i < s->nb_snapshots && ret == 0; i++) {
        const qcow2_snapshot *sn = &s->snapshots[i];
        uint64_t *l1 = NULL;

        ret = du_aligned(&d, sn->l1_table_offset, "snapshot L1 table");
        if (ret == 0 && sn->l1_size > QCOW2_MAX_L1_BYTES / 8) {
            ret = vd_error_set(err, -EINVAL, "%s: snapshot '%s' has an L1 "
                               "table of %" PRIu32 " entries", s->filename,
                               sn->name, sn->l1_size);
        }
        /* Counted before it is read: a table past the end is refused. */
        if (ret == 0) {
            ret = du_ref(&d, o_snap + i, sn->l1_table_offset,
                         (uint64_t)sn->l1_size * 8, true,
                         "snapshot L1 table");
        }
        if (ret == 0) {
            ret = qcow2_read_l1_table(s, sn->l1_table_offset, sn->l1_size,
                                      0, &l1, err);
        }
        if (ret == 0) {
            ret = du_l1(&d, o_snap + i, sn->l1_table_offset, l1,
                        sn->l1_size);
        }
        free(l1);
    }
    if (ret == 0 && bm) {
        ret = du_bitmaps(&d, o_bm, bm, nb_bm, entry_bytes);
    }
    if (ret == 0) {
        ret = du_leaks(&d, fc, &leaked, &leaked_in);
    }
    if (ret < 0) {
        goto out;
    }

    for (uint64_t k = 0; k < d.nb; k++) {
        if (d.owner[k] == DU_MULTI) {
            shared += s->cluster_size;
        } else if (d.owner[k]) {
            d.own[d.owner[k] - 1].exclusive += s->cluster_size;
        } else if (k < fc) {
            unowned_in += s->cluster_size;
        }
    }
    /* A bitmap's directory entry moves from the metadata row to it (when
     * the directory's clusters are the metadata's alone). */
    for (uint32_t i = 0; i < nb_bm; i++) {
        if (d.own[o_meta].exclusive >= entry_bytes[i]) {
            d.own[o_meta].exclusive -= entry_bytes[i];
            d.own[o_meta].used -= entry_bytes[i];
            d.own[o_meta].tables -= entry_bytes[i];
            d.own[o_bm + i].exclusive += entry_bytes[i];
            d.own[o_bm + i].used += entry_bytes[i];
            d.own[o_bm + i].tables += entry_bytes[i];
        }
    }

    nrows = d.nb_own + (leaked ? 1 : 0);
    res->rows = calloc(nrows, sizeof(*res->rows));
    if (!res->rows) {
        ret = vd_error_set(err, -ENOMEM, "Out of memory");
        goto out;
    }
    res->nb_rows = nrows;
    res->cluster_size = s->cluster_size;
    res->shared = shared;
    res->leaked = leaked;
    res->unused = unowned_in - leaked_in;
    res->allocated = shared;
    for (uint32_t o = 0; o < d.nb_own; o++) {
        res->allocated += d.own[o].exclusive;
    }
    /* Rows: active, snapshots, bitmaps, metadata, leaked. */
    for (uint32_t r = 0; r < d.nb_own; r++) {
        uint32_t o = r + 1 < d.nb_own ? r + 1 : o_meta;
        vd_du_row *row = &res->rows[r];

        row->used = d.own[o].used;
        row->exclusive = d.own[o].exclusive;
        row->shared = d.own[o].used - d.own[o].exclusive;
        row->tables = d.own[o].tables;
        row->mapped = d.own[o].mapped;
        if (o == o_meta) {
            row->kind = VD_DU_METADATA;
        } else if (o == o_active) {
            row->kind = VD_DU_ACTIVE;
            row->provisioned = s->size;
        } else if (o < o_bm) {
            const qcow2_snapshot *sn = &s->snapshots[o - o_snap];

            row->kind = VD_DU_SNAPSHOT;
            row->provisioned = sn->disk_size;
            row->id = du_strdup(sn->id_str);
            row->name = du_strdup(sn->name);
            if ((sn->id_str && !row->id) || (sn->name && !row->name)) {
                ret = vd_error_set(err, -ENOMEM, "Out of memory");
                goto out;
            }
        } else {
            row->kind = VD_DU_BITMAP;
            row->provisioned = s->size;
            row->name = du_strdup(bm[o - o_bm].name);
            if (!row->name) {
                ret = vd_error_set(err, -ENOMEM, "Out of memory");
                goto out;
            }
        }
    }
    if (leaked) {
        vd_du_row *row = &res->rows[nrows - 1];

        row->kind = VD_DU_LEAKED;
        row->used = row->exclusive = leaked;
    }
    ret = 0;
out:
    pthread_mutex_unlock(&s->lock);
    if (bm) {
        qcow2_bitmap_list_free(bm, nb_bm);
    }
    free(entry_bytes);
    free(d.owner);
    free(d.last);
    free(d.own);
    return ret;
}
