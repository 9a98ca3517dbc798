/*
 * qcow2 amend: changing creation options of an existing image, as QEMU
 * 7.2's qcow2_amend_options() (qemu-img amend).
 *
 * Organisation: walks over every L1 and L2 table (the active ones and
 * those of the snapshots loaded at open), the three rewrites (expanding
 * zero clusters for a v2 downgrade, rewriting every refcount structure
 * for a new refcount width), upgrade (which writes a v2 snapshot table
 * anew in the v3 layout) and downgrade, and qcow2_amend() which
 * parses the options in QEMU's order and applies the changes in QEMU's
 * order: upgrade, key slots (encrypt.*), refcount width, data file bits
 * and header, backing check, lazy refcounts, size, downgrade. Messages
 * are QEMU's.
 *
 * Everything runs with the node drained (vd_amend() drains) and, except
 * for the resize, with qcow2_state.lock held.
 *
 * The generic vd_amend() is at the end: it belongs in src/core and lives
 * here because this file is the one the amend work owns.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crypto/luks.h"
#include "drivers/qcow2/qcow2.h"

/* ------------------------------------------------------------------ */
/* Expanding zero clusters (v3 -> v2)                                 */
/* ------------------------------------------------------------------ */


/* The zeros of a cluster that was a zero cluster. Encrypted, they are
 * written as the encryption of zeros: zeros in the file would read as
 * garbage (QEMU 7.2 writes plain zeros there and its downgraded image
 * reads garbage where the guest had zeros). */
static int expand_write_zeros(qcow2_state *s, uint64_t off, vd_error *err)
{
    uint8_t *zeros;
    vd_iov v;
    int ret;

    if (!s->crypt) {
        return vd_node_pwrite_zeroes(s->data_file->node, off,
                                     s->cluster_size, 0, err);
    }
    zeros = calloc(1, s->cluster_size);
    if (!zeros) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    vd_iov_init_buf(&v, zeros, s->cluster_size);
    ret = qcow2_crypt_pwritev(s, off, s->cluster_size, &v, 0, 0, err);
    free(zeros);
    return ret;
}

/* Turns the zero clusters referenced by L2 table @l2_off into data
 * clusters of zeros (or, without a backing file, into unallocated ones:
 * they read as zeros anyway). Lock held. */
static int expand_l2(qcow2_state *s, uint64_t l2_off, vd_error *err)
{
    uint64_t l2_refcount = 0;
    void *table = NULL;
    bool has_backing = s->node->backing != NULL;
    int ret;

    ret = qcow2_get_refcount(s, l2_off >> s->cluster_bits, &l2_refcount, err);
    if (ret < 0) {
        return ret;
    }
    ret = qcow2_cache_get(s, s->l2_cache, l2_off, &table, err);
    if (ret < 0) {
        return ret;
    }
    for (uint64_t j = 0; j < s->l2_size; j++) {
        uint64_t e = qcow2_get_l2_entry(s, table, j), off;
        qcow2_subcluster_type t = qcow2_get_subcluster_type(s, e, 0, 0);

        if (t != QCOW2_SC_ZERO_PLAIN && t != QCOW2_SC_ZERO_ALLOC) {
            continue;
        }
        if (t == QCOW2_SC_ZERO_PLAIN) {
            int64_t a;
            if (!has_backing) {
                qcow2_set_l2_entry(s, table, j, 0);
                qcow2_cache_mark_dirty(s->l2_cache, table);
                continue;
            }
            a = qcow2_alloc_clusters(s, s->cluster_size, err);
            if (a < 0) {
                ret = (int)a;
                break;
            }
            off = (uint64_t)a;
            if (l2_refcount > 1) {
                /* A shared L2 table: every sharer references the new
                 * cluster. */
                ret = qcow2_update_refcount(s, off, s->cluster_size,
                                            l2_refcount - 1, false,
                                            QCOW2_DISCARD_NEVER, err);
                if (ret < 0) {
                    break;
                }
            }
            ret = qcow2_cache_set_dependency(s, s->l2_cache,
                                             s->refcount_cache, err);
            if (ret < 0) {
                break;
            }
        } else {
            off = e & QCOW2_L2E_OFFSET_MASK;
            if (qcow2_offset_into_cluster(s, off)) {
                ret = qcow2_signal_corruption(s, err, "Cluster allocation "
                                              "offset 0x%" PRIx64 " unaligned "
                                              "(L2 offset: 0x%" PRIx64 ", L2 "
                                              "index: 0x%" PRIx64 ")", off,
                                              l2_off, j);
                break;
            }
        }
        ret = expand_write_zeros(s, off, err);
        if (ret < 0) {
            break;
        }
        /* The zeros must be on disk before an L2 entry points at them. */
        qcow2_cache_depends_on_flush(s->l2_cache);
        qcow2_set_l2_entry(s, table, j,
                           off | (l2_refcount == 1 ? QCOW2_OFLAG_COPIED : 0));
        qcow2_cache_mark_dirty(s->l2_cache, table);
    }
    qcow2_cache_put(s->l2_cache, &table);
    return ret;
}

typedef int l1_fn(qcow2_state *s, const uint64_t *l1, uint32_t n,
                  unsigned flags, void *opaque, vd_error *err);

/* Runs @fn over the active L1 table (@flags 0) and every snapshot's
 * (QCOW2_VALIDATE_SNAPSHOT), host endian. Lock held. */
static int for_each_l1(qcow2_state *s, const qcow2_snapshot *sn, l1_fn *fn,
                       void *opaque, vd_error *err)
{
    int ret = fn(s, s->l1_table, s->l1_size, 0, opaque, err);

    for (uint32_t k = 0; ret == 0 && k < s->nb_snapshots; k++) {
        uint64_t *l1;
        if (!sn[k].l1_size) {
            continue;
        }
        ret = qcow2_read_l1_table(s, sn[k].l1_table_offset, sn[k].l1_size, 0,
                                  &l1, err);
        if (ret == 0) {
            ret = fn(s, l1, sn[k].l1_size, QCOW2_VALIDATE_SNAPSHOT, opaque,
                     err);
        }
        free(l1);
    }
    return ret;
}

typedef int l2_fn(qcow2_state *s, uint64_t l2_off, vd_error *err);
typedef struct l2_walk {
    l2_fn *fn;
} l2_walk;

static int each_l2(qcow2_state *s, const uint64_t *l1, uint32_t n,
                   unsigned flags, void *opaque, vd_error *err)
{
    l2_fn *fn = ((l2_walk *)opaque)->fn;
    int ret = 0;

    (void)flags;
    for (uint32_t i = 0; ret == 0 && i < n; i++) {
        uint64_t l2 = l1[i] & QCOW2_L1E_OFFSET_MASK;
        if (l2) {
            ret = fn(s, l2, err);
        }
    }
    return ret;
}

/* Runs @fn over every L2 table of the active L1 table and of every
 * snapshot's L1 table. Lock held. */
static int for_each_l2(qcow2_state *s, const qcow2_snapshot *sn, l2_fn *fn,
                       vd_error *err)
{
    l2_walk w = { fn };
    return for_each_l1(s, sn, each_l2, &w, err);
}

static int validate_tree(qcow2_state *s, const uint64_t *l1, uint32_t n,
                         unsigned flags, void *opaque, vd_error *err)
{
    (void)opaque;
    return qcow2_validate_l1_tree(s, l1, n, flags, err);
}

/* Validates every tree a downgrade rewrites: the active L1 table and
 * each snapshot's (qcow2_validate_l1_tree()), before the first write.
 * Lock held. */
static int validate_trees(qcow2_state *s, const qcow2_snapshot *sn,
                          vd_error *err)
{
    return for_each_l1(s, sn, validate_tree, NULL, err);
}

/* for_each_l2() callback: -EEXIST when the table holds a compressed
 * cluster. */
static int find_compressed(qcow2_state *s, uint64_t l2_off, vd_error *err)
{
    void *table = NULL;
    int ret = qcow2_cache_get(s, s->l2_cache, l2_off, &table, err);

    if (ret < 0) {
        return ret;
    }
    for (uint64_t j = 0; j < s->l2_size && ret == 0; j++) {
        if (qcow2_get_l2_entry(s, table, j) & QCOW2_OFLAG_COMPRESSED) {
            ret = -EEXIST;
        }
    }
    qcow2_cache_put(s->l2_cache, &table);
    return ret;
}

/* ------------------------------------------------------------------ */
/* Changing the refcount width                                        */
/* ------------------------------------------------------------------ */

/*
 * Rewrites the refcount table and every refcount block for entries of
 * 2^@new_order bits. The new structures go past the end of the file and
 * are complete on disk (and flushed) before one header write switches to
 * them; only then are the old ones freed, through the new ones. A crash
 * before the header write leaves leaked clusters at the end of the file,
 * after it leaks at most the old structures. Lock held.
 */
static int change_refcount_order(qcow2_state *s, int new_order, vd_error *err)
{
    uint64_t cs = s->cluster_size;
    uint64_t per_block = cs * 8 >> new_order;
    uint64_t new_max = new_order == 6 ? UINT64_MAX
                                      : (1ull << (1u << new_order)) - 1;
    int64_t flen = vd_node_getlength(s->file->node);
    uint64_t end, blocks = 0, table = 0, n = 0, last;
    uint64_t *new_table = NULL, *old_table = NULL;
    uint64_t old_table_off = s->refcount_table_offset;
    uint32_t old_table_size = s->refcount_table_size;
    uint8_t *block = NULL;
    qcow2_state tmp;
    int ret;

    ret = qcow2_flush_caches(s, err);
    if (ret == 0) {
        /* The new structure is a copy of the old one: it must be sound. */
        ret = qcow2_begin_change(s, err);
    }
    if (ret < 0 || flen < 0) {
        return ret < 0 ? ret : (int)flen;
    }
    end = qcow2_size_to_clusters(s, (uint64_t)flen);
    if (s->alloc_end > end) {
        end = s->alloc_end;
    }
    /* Every refcount must fit the new width. */
    for (uint64_t i = 0; i < end; i++) {
        uint64_t rc;
        ret = qcow2_get_refcount(s, i, &rc, err);
        if (ret < 0) {
            return ret;
        }
        if (rc > new_max) {
            return vd_error_set(err, -EINVAL, "Cannot decrease refcount entry "
                                "width to %i bits: Cluster at offset %#" PRIx64
                                " has a refcount of %" PRIu64, 1 << new_order,
                                i << s->cluster_bits, rc);
        }
    }
    /* Blocks at [end, end + blocks), the table right after them; both
     * count themselves. */
    do {
        last = n;
        blocks = (end + blocks + table + per_block - 1) / per_block;
        table = (blocks * 8 + cs - 1) / cs;
        n = blocks + table;
    } while (n != last);
    if (table * cs > QCOW2_MAX_REFTABLE_BYTES) {
        return vd_error_set(err, -EFBIG, "%s: refcount table would be too "
                            "large", s->filename);
    }
    new_table = calloc(table * cs / 8, 8);
    block = vd_node_blockalign(s->node, cs);
    if (!new_table || !block) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
        goto out;
    }
    memset(&tmp, 0, sizeof(tmp));
    tmp.refcount_order = new_order;
    for (uint64_t b = 0; b < blocks; b++) {
        memset(block, 0, cs);
        for (uint64_t k = 0; k < per_block; k++) {
            uint64_t i = b * per_block + k, rc = 0;
            if (i < end) {
                ret = qcow2_get_refcount(s, i, &rc, err);
                if (ret < 0) {
                    goto out;
                }
            } else if (i < end + blocks + table) {
                rc = 1;
            }
            qcow2_refblock_set(&tmp, block, k, rc);
        }
        ret = vd_child_pwrite(s->file, (end + b) * cs, block, cs, 0, err);
        if (ret < 0) {
            goto out;
        }
        new_table[b] = htobe64((end + b) * cs);
    }
    ret = vd_child_pwrite(s->file, (end + blocks) * cs, new_table, table * cs,
                          0, err);
    if (ret == 0) {
        ret = vd_node_flush(s->file->node, err);
    }
    if (ret < 0) {
        goto out;
    }

    /* Switch. The refcount cache holds only clean blocks of the old
     * layout: forget them. */
    ret = qcow2_cache_empty(s->refcount_cache);
    if (ret < 0) {
        vd_error_set(err, ret, "%s: refcount cache is busy", s->filename);
        goto out;
    }
    for (uint64_t i = 0; i < table * cs / 8; i++) {
        new_table[i] = be64toh(new_table[i]);
    }
    old_table = s->refcount_table;
    s->refcount_table = new_table;
    new_table = NULL;
    s->refcount_table_offset = (end + blocks) * cs;
    qcow2_reftable_forget_pending(s);
    s->refcount_table_size = (uint32_t)(table * cs / 8);
    qcow2_overlap_changed(s);
    s->refcount_order = new_order;
    s->refcount_bits = 1 << new_order;
    s->refcount_max = new_max;
    s->refcount_block_bits = s->cluster_bits + 3 - new_order;
    s->refcount_block_size = 1ull << s->refcount_block_bits;
    if (s->alloc_end < end + blocks + table) {
        s->alloc_end = end + blocks + table;
    }
    ret = qcow2_update_header(s, err);
    if (ret < 0) {
        goto out;
    }

    /* Free the old structures through the new ones. */
    for (uint32_t i = 0; i < old_table_size && ret == 0; i++) {
        uint64_t off = old_table[i] & QCOW2_REFT_OFFSET_MASK;
        if (off) {
            ret = qcow2_free_clusters(s, off, cs, QCOW2_DISCARD_OTHER, err);
        }
    }
    if (ret == 0) {
        ret = qcow2_free_clusters(s, old_table_off,
                                  (uint64_t)old_table_size * 8,
                                  QCOW2_DISCARD_OTHER, err);
    }
    s->free_cluster_index = 0;
    if (ret == 0) {
        ret = qcow2_flush_caches(s, err);
    }
    qcow2_process_discards(s);
out:
    free(old_table);
    free(new_table);
    free(block);
    return ret;
}

/* ------------------------------------------------------------------ */
/* Version changes                                                    */
/* ------------------------------------------------------------------ */

/* QEMU's qcow2_upgrade(): v3 wants every snapshot to carry the 64-bit
 * VM state size and the disk size in its extra data; a table with an
 * entry that lacks them (v2 tables, which may have none) is written
 * anew first, in the v3 layout, and only then does the header say v3.
 * A crash in between leaves a v2 image with a v3-style table, which v2
 * readers take. */
static int upgrade(qcow2_state *s, const qcow2_snapshot *sn, vd_error *err)
{
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        if (sn[i].extra_data_size < 16) {
            int ret = qcow2_rewrite_snapshot_table(s, err);
            if (ret < 0) {
                vd_error_prepend(err, "Failed to update the snapshot "
                                 "table: ");
                return ret;
            }
            break;
        }
    }
    s->version = 3;
    s->header_length = sizeof(qcow2_header);
    s->incompatible_features = 0;
    s->compatible_features = 0;
    s->autoclear_features = 0;
    s->refcount_order = 4;
    s->compression_type = QCOW2_COMPRESSION_ZLIB;
    return qcow2_update_header(s, err);
}

static int downgrade(qcow2_state *s, const qcow2_snapshot *sn, vd_error *err)
{
    int ret;

    if (s->refcount_order != 4) {
        return vd_error_set(err, -ENOTSUP, "compat=0.10 requires "
                            "refcount_bits=16");
    }
    if (s->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
        return vd_error_set(err, -ENOTSUP, "Cannot downgrade an image with a "
                            "data file");
    }
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        if (sn[i].vm_state_size > UINT32_MAX || sn[i].disk_size != s->size) {
            return vd_error_set(err, -ENOTSUP, "Internal snapshots prevent "
                                "downgrade of image");
        }
    }
    /* Zero clusters become data clusters in every tree (validated by
     * qcow2_amend() before its first write). */
    ret = qcow2_begin_change(s, err);
    if (ret < 0) {
        return ret;
    }
    if (s->incompatible_features & QCOW2_INCOMPAT_DIRTY) {
        ret = qcow2_mark_clean(s, err);
        if (ret < 0) {
            vd_error_prepend(err, "Failed to make the image clean: ");
            return ret;
        }
    }
    if (s->incompatible_features & ~QCOW2_INCOMPAT_COMPRESSION) {
        return vd_error_set(err, -ENOTSUP, "Cannot downgrade an image with "
                            "incompatible features 0x%" PRIx64 " set",
                            (uint64_t)(s->incompatible_features &
                                       ~QCOW2_INCOMPAT_COMPRESSION));
    }
    if (s->incompatible_features & QCOW2_INCOMPAT_COMPRESSION) {
        /* Checked before anything changes (QEMU checks after expanding
         * the zero clusters; the outcome is the same refusal). */
        ret = for_each_l2(s, sn, find_compressed, err);
        if (ret == -EEXIST) {
            return vd_error_set(err, -ENOTSUP, "Cannot downgrade an image "
                                "with zstd compression type and existing "
                                "compressed clusters");
        } else if (ret < 0) {
            return ret;
        }
    }
    s->compatible_features = 0;
    s->lazy_refcounts = false;
    s->bitmaps_kept_in_v2 = qcow2_bitmaps_valid(s);
    s->autoclear_features = 0;
    s->data_file_raw = false;
    ret = for_each_l2(s, sn, expand_l2, err);
    if (ret == 0) {
        ret = qcow2_flush_caches(s, err);
    }
    if (ret < 0) {
        vd_error_prepend(err, "Failed to turn zero into data clusters: ");
        return ret;
    }
    s->incompatible_features = 0;
    s->compression_type = QCOW2_COMPRESSION_ZLIB;
    s->version = 2;
    s->header_length = QCOW2_V2_HEADER_LEN;
    free(s->header_extra);
    s->header_extra = NULL;
    s->header_extra_len = 0;
    ret = qcow2_update_header(s, err);
    if (ret < 0) {
        s->version = 3;
        s->header_length = sizeof(qcow2_header);
    }
    return ret;
}

/* ------------------------------------------------------------------ */
/* Entry point                                                        */
/* ------------------------------------------------------------------ */

static bool is_amend_option(const char *key)
{
    for (const vd_create_option *o = qcow2_amend_opts; o->name; o++) {
        if (!strcmp(o->name, key)) {
            return true;
        }
    }
    return false;
}

static int str_differs(const char *a, const char *b)
{
    return (a == NULL) != (b == NULL) || (a && strcmp(a, b) != 0);
}

/* What an amend asks for, parsed and checked as QEMU's QemuOpts and
 * qcow2_amend_options() check it before the first write. */
typedef struct amend_req {
    int new_version;
    bool lazy, data_file_raw, encryption_update;
    const char *backing_file, *backing_fmt, *data_file;
    uint64_t refcount_bits, new_size;
} amend_req;

static int amend_parse(qcow2_state *s, vd_opts *opts, amend_req *q,
                       vd_error *err)
{
    bool has_data_file = (s->incompatible_features &
                          QCOW2_INCOMPAT_DATA_FILE) != 0;

    memset(q, 0, sizeof(*q));
    q->new_version = s->version;
    q->lazy = s->lazy_refcounts;
    q->data_file_raw = (s->autoclear_features &
                        QCOW2_AUTOCLEAR_DATA_FILE_RAW) != 0;
    q->refcount_bits = (uint64_t)s->refcount_bits;

    /* Syntax first, like QemuOpts: unknown names and malformed values. */
    for (size_t i = 0; i < vd_opts_count(opts); i++) {
        const char *k, *v;
        vd_opts_nth(opts, i, &k, &v);
        if (!is_amend_option(k)) {
            /* (create_only names get a hint from the caller) */
            return vd_error_set(err, -EINVAL, "Invalid parameter '%s'", k);
        }
        if (!strcmp(k, "size")) {
            int r = vd_parse_size_u64(v, &q->new_size);
            if (r == -ERANGE) {
                return vd_error_set(err, -EINVAL, "Value '%s' is out of "
                                    "range for parameter 'size'", v);
            } else if (r < 0) {
                return vd_error_set(err, -EINVAL, "Parameter 'size' expects a "
                                    "non-negative number below 2^64");
            }
            if (q->new_size > INT64_MAX) {
                /* qemu-img finds this when it resizes, after the other
                 * changes; refused here before any. */
                return vd_error_set(err, -EINVAL, "Image size cannot be "
                                    "negative");
            }
        } else if (!strcmp(k, "lazy_refcounts") ||
                   !strcmp(k, "data_file_raw")) {
            if (strcmp(v, "on") && strcmp(v, "off")) {
                return vd_error_set(err, -EINVAL, "Parameter '%s' expects "
                                    "'on' or 'off'", k);
            }
        } else if (!strcmp(k, "refcount_bits")) {
            char *end;
            errno = 0;
            q->refcount_bits = strtoull(v, &end, 0);
            if (!*v || *end || errno || v[0] == '-') {
                return vd_error_set(err, -EINVAL, "Parameter 'refcount_bits' "
                                    "expects a number");
            }
        }
    }
    /* Semantics, in the order QEMU walks its option list. */
    for (const vd_create_option *o = qcow2_amend_opts; o->name; o++) {
        const char *const *k = &o->name;
        const char *v = vd_opts_get(opts, *k);
        if (!v) {
            continue;
        }
        if (!strncmp(*k, "encrypt.", 8)) {
            if (!s->crypt) {
                return vd_error_set(err, -EINVAL, "Can't amend encryption "
                                    "options - encryption not present");
            }
            if (s->crypt_method != QCOW2_CRYPT_LUKS) {
                return vd_error_set(err, -ENOTSUP, "Only LUKS encryption "
                                    "options can be amended");
            }
            q->encryption_update = true;
        } else if (!strcmp(*k, "compat")) {
            if (!strcmp(v, "0.10") || !strcmp(v, "v2")) {
                q->new_version = 2;
            } else if (!strcmp(v, "1.1") || !strcmp(v, "v3")) {
                q->new_version = 3;
            } else {
                return vd_error_set(err, -EINVAL, "Unknown compatibility "
                                    "level %s", v);
            }
        } else if (!strcmp(*k, "backing_file")) {
            q->backing_file = v;
        } else if (!strcmp(*k, "backing_fmt")) {
            q->backing_fmt = v;
        } else if (!strcmp(*k, "lazy_refcounts")) {
            q->lazy = !strcmp(v, "on");
        } else if (!strcmp(*k, "refcount_bits")) {
            if (q->refcount_bits == 0 || q->refcount_bits > 64 ||
                (q->refcount_bits & (q->refcount_bits - 1))) {
                return vd_error_set(err, -EINVAL, "Refcount width must be a "
                                    "power of two and may not exceed 64 "
                                    "bits");
            }
        } else if (!strcmp(*k, "data_file")) {
            q->data_file = v;
            if (!has_data_file) {
                return vd_error_set(err, -EINVAL, "data-file can only be set "
                                    "for images that use an external data "
                                    "file");
            }
        } else if (!strcmp(*k, "data_file_raw")) {
            bool on = !strcmp(v, "on");
            if (on && !q->data_file_raw) {
                return vd_error_set(err, -EINVAL, "data-file-raw cannot be "
                                    "set on existing images");
            }
            q->data_file_raw = on;
        }
    }
    return 0;
}

int qcow2_amend(vd_node *node, vd_opts *opts, bool force, vd_error *err)
{
    qcow2_state *s = node->opaque;
    int old_version = s->version;
    const qcow2_snapshot *sn = s->snapshots;
    amend_req q;
    int ret = amend_parse(s, opts, &q, err);
    int new_version = q.new_version;
    bool lazy = q.lazy, data_file_raw = q.data_file_raw;
    bool encryption_update = q.encryption_update;
    const char *backing_file = q.backing_file, *backing_fmt = q.backing_fmt;
    const char *data_file = q.data_file;
    uint64_t refcount_bits = q.refcount_bits, new_size = q.new_size;

    if (ret < 0) {
        return ret;
    }
    pthread_mutex_lock(&s->lock);
    ret = qcow2_flush_caches(s, err);
    if (ret < 0) {
        goto unlock;
    }
    /* A new refcount width copies the refcount structure and a downgrade
     * rewrites zero clusters in every tree: validate what they rely on
     * before the first write (the header rewrites below included). */
    if ((uint64_t)s->refcount_bits != refcount_bits ||
        new_version < old_version) {
        ret = qcow2_validate_metadata(s, err);
        if (ret == 0 && new_version < old_version) {
            ret = validate_trees(s, sn, err);
        }
        if (ret < 0) {
            /* qemu-img amend prints the message without a leading file
             * name: keep the file named after the context. */
            vd_error_prepend(err, new_version < old_version ?
                             "Failed to turn zero into data clusters: " :
                             "Cannot change the refcount width: ");
            goto unlock;
        }
    }
    if (new_version > old_version) {
        ret = upgrade(s, sn, err);
        if (ret < 0) {
            goto unlock;
        }
    }
    /* The key slots, where QEMU changes them: after an upgrade, before
     * the refcount width. */
    if (encryption_update) {
        ret = qcow2_crypt_amend(s, opts, force, err);
        if (ret < 0) {
            goto unlock;
        }
    }
    if ((uint64_t)s->refcount_bits != refcount_bits) {
        if (new_version < 3 && refcount_bits != 16) {
            ret = vd_error_set(err, -EINVAL, "Refcount widths other than 16 "
                               "bits require compatibility level 1.1 or above "
                               "(use compat=1.1 or greater)");
            goto unlock;
        }
        ret = change_refcount_order(s, __builtin_ctzll(refcount_bits), err);
        if (ret < 0) {
            goto unlock;
        }
    }
    if (data_file_raw) {
        s->autoclear_features |= QCOW2_AUTOCLEAR_DATA_FILE_RAW;
    } else {
        s->autoclear_features &= ~QCOW2_AUTOCLEAR_DATA_FILE_RAW;
    }
    s->data_file_raw = data_file_raw;
    if (data_file) {
        free(s->data_file_name);
        s->data_file_name = *data_file ? strdup(data_file) : NULL;
    }
    ret = qcow2_update_header(s, err);
    if (ret < 0) {
        vd_error_prepend(err, "Failed to update the image header: ");
        goto unlock;
    }
    if ((backing_file || backing_fmt) &&
        (str_differs(backing_file, s->backing_file) ||
         str_differs(backing_fmt, s->backing_format))) {
        ret = vd_error_set(err, -EINVAL, "Cannot amend the backing file");
        goto unlock;
    }
    if (s->lazy_refcounts != lazy) {
        if (lazy) {
            if (new_version < 3) {
                ret = vd_error_set(err, -EINVAL, "Lazy refcounts only "
                                   "supported with compatibility level 1.1 "
                                   "and above (use compat=1.1 or greater)");
                goto unlock;
            }
            s->compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS;
        } else {
            ret = qcow2_mark_clean(s, err);
            if (ret < 0) {
                vd_error_prepend(err, "Failed to make the image clean: ");
                goto unlock;
            }
            s->compatible_features &= ~QCOW2_COMPAT_LAZY_REFCOUNTS;
        }
        ret = qcow2_update_header(s, err);
        if (ret < 0) {
            vd_error_prepend(err, "Failed to update the image header: ");
            goto unlock;
        }
        s->lazy_refcounts = lazy;
    }
    pthread_mutex_unlock(&s->lock);

    if (new_size) {
        ret = vd_node_truncate(node, new_size, true, VD_PREALLOC_OFF, err);
        if (ret < 0) {
            goto out;
        }
    }

    pthread_mutex_lock(&s->lock);
    if (new_version < old_version) {
        ret = downgrade(s, sn, err);
    }
unlock:
    pthread_mutex_unlock(&s->lock);
out:
    return ret;
}

/* ---- the dry run (vd_amend_plan()) ---- */

static const char *on_off(bool b)
{
    return b ? "on" : "off";
}

int qcow2_amend_plan(vd_node *node, vd_opts *opts, bool force,
                     vd_amend_change_fn fn, void *opaque, vd_error *err)
{
    qcow2_state *s = node->opaque;
    int old_version = s->version;
    bool old_raw = (s->autoclear_features &
                    QCOW2_AUTOCLEAR_DATA_FILE_RAW) != 0;
    amend_req q;
    char a[32], b[32];
    int ret = amend_parse(s, opts, &q, err);

    if (ret < 0) {
        return ret;
    }
    /* The refusals qcow2_amend() makes on its way, in its order, without
     * the writes between them. */
    pthread_mutex_lock(&s->lock);
    if ((uint64_t)s->refcount_bits != q.refcount_bits ||
        q.new_version < old_version) {
        ret = qcow2_validate_metadata(s, err);
        if (ret == 0 && q.new_version < old_version) {
            ret = validate_trees(s, s->snapshots, err);
        }
        if (ret < 0) {
            vd_error_prepend(err, q.new_version < old_version ?
                             "Failed to turn zero into data clusters: " :
                             "Cannot change the refcount width: ");
        }
    }
    /* The key slots, where the real amend changes them (after an
     * upgrade, which refuses nothing), with their secrets. */
    unsigned active = 0, activate = 0, erase = 0;
    if (ret == 0 && q.encryption_update) {
        ret = qcow2_crypt_amend_plan(s, opts, force, &active, &activate,
                                     &erase, err);
    }
    if (ret == 0 && (uint64_t)s->refcount_bits != q.refcount_bits &&
        q.new_version < 3 && q.refcount_bits != 16) {
        ret = vd_error_set(err, -EINVAL, "Refcount widths other than 16 "
                           "bits require compatibility level 1.1 or above "
                           "(use compat=1.1 or greater)");
    }
    if (ret == 0 && (q.backing_file || q.backing_fmt) &&
        (str_differs(q.backing_file, s->backing_file) ||
         str_differs(q.backing_fmt, s->backing_format))) {
        ret = vd_error_set(err, -EINVAL, "Cannot amend the backing file");
    }
    if (ret == 0 && q.lazy && !s->lazy_refcounts && q.new_version < 3) {
        ret = vd_error_set(err, -EINVAL, "Lazy refcounts only supported "
                           "with compatibility level 1.1 and above (use "
                           "compat=1.1 or greater)");
    }
    uint64_t size_after = q.new_size ? q.new_size : s->size;
    if (ret == 0 && q.new_size && q.new_size != s->size) {
        /* do_truncate()'s refusals, after an upgrade. */
        int v = q.new_version > old_version ? q.new_version : old_version;
        if (q.new_size & 511) {
            ret = vd_error_set(err, -EINVAL, "The new size must be a "
                               "multiple of 512");
        } else if (s->nb_snapshots && v < 3) {
            ret = vd_error_set(err, -ENOTSUP, "Can't resize a v2 image "
                               "which has snapshots");
        } else if (s->inconsistent_bitmap) {
            ret = vd_error_set(err, -ENOTSUP, "Bitmap '%s' is inconsistent "
                               "and cannot be used", s->inconsistent_bitmap);
        }
    }
    if (ret == 0 && q.new_version < old_version) {
        /* downgrade()'s refusals, after the other changes. */
        if (q.refcount_bits != 16) {
            ret = vd_error_set(err, -ENOTSUP, "compat=0.10 requires "
                               "refcount_bits=16");
        } else if (s->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
            ret = vd_error_set(err, -ENOTSUP, "Cannot downgrade an image "
                               "with a data file");
        }
        for (uint32_t i = 0; ret == 0 && i < s->nb_snapshots; i++) {
            if (s->snapshots[i].vm_state_size > UINT32_MAX ||
                s->snapshots[i].disk_size != size_after) {
                ret = vd_error_set(err, -ENOTSUP, "Internal snapshots "
                                   "prevent downgrade of image");
            }
        }
    }
    if (ret == 0 && fn) {
        if (q.new_version != old_version) {
            fn("compat", old_version < 3 ? "0.10" : "1.1",
               q.new_version < 3 ? "0.10" : "1.1", opaque);
        }
        if (q.lazy != s->lazy_refcounts) {
            fn("lazy_refcounts", on_off(s->lazy_refcounts), on_off(q.lazy),
               opaque);
        }
        if (q.refcount_bits != (uint64_t)s->refcount_bits) {
            snprintf(a, sizeof(a), "%d", s->refcount_bits);
            snprintf(b, sizeof(b), "%" PRIu64, q.refcount_bits);
            fn("refcount_bits", a, b, opaque);
        }
        if (q.data_file && str_differs(*q.data_file ? q.data_file : NULL,
                                       s->data_file_name)) {
            fn("data_file", s->data_file_name ? s->data_file_name : "",
               q.data_file, opaque);
        }
        if (q.data_file_raw != old_raw) {
            fn("data_file_raw", on_off(old_raw), on_off(q.data_file_raw),
               opaque);
        }
        if (size_after != s->size) {
            snprintf(a, sizeof(a), "%" PRIu64, s->size);
            snprintf(b, sizeof(b), "%" PRIu64, size_after);
            fn("size", a, b, opaque);
        }
        vd_luks_plan_report("encrypt.", active, activate, erase, fn, opaque);
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}
