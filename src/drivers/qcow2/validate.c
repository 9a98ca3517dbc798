/*
 * qcow2: validation of the metadata an operation relies on, before the
 * operation's first write.
 *
 * Why: every change of qcow2 metadata trusts other metadata. Allocation
 * trusts the refcounts (a cluster with refcount 0 is free; if it is in
 * fact the header or an L2 table, the new data or table overwrites it);
 * a snapshot adds a reference to every cluster an L1 table reaches (an
 * entry pointing into the refcount table makes it count refcounts as
 * data clusters, or raise refcounts terabytes past the end of the file);
 * freeing trusts that the cluster freed is the one the entry names. A
 * damaged image thus turns an ordinary operation into silent data loss.
 * QEMU 7.2 finds much of this half-way through, after it has written;
 * vdisk checks first and refuses with the file untouched.
 *
 * Two levels:
 *  - qcow2_validate_metadata(), once per session before the first
 *    metadata change: the refcount structure and the structures every
 *    change relies on (header, L1 table, refcount table and blocks,
 *    snapshot table, snapshot L1 tables, active L2 tables) lie inside the
 *    file, no two of them share a cluster, and each of their clusters has
 *    a nonzero refcount (else the allocator would hand it out). It reads
 *    no L2 table, so it costs O(metadata), not O(data).
 *  - per operation, what it is about to reference or free: the L2 tables
 *    and entries an L1 table reaches (snapshot create, apply, delete;
 *    amend's downgrade) or those of a guest range (discard, zeroing with
 *    unmap, shrink, make_empty): inside the file, clear of every kind of
 *    metadata, refcount at least 1.
 *
 * Faults QEMU reports as corruption events at the same point (an
 * unaligned L2 table or data cluster offset) are corruption events here
 * too (the image is marked corrupt, as QEMU marks it); every other fault
 * is a plain refusal that writes nothing. Messages name the file, the
 * structure and its offset. Everything runs with qcow2_state.lock held.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/qcow2/qcow2.h"

/* Every kind of structure but the L2 tables: what an L2 table must not
 * share a cluster with (active and snapshot L2 tables are shared by
 * design). */
#define NOT_L2 (QCOW2_OL_ALL & ~(QCOW2_OL_ACTIVE_L2 | QCOW2_OL_INACTIVE_L2))

bool qcow2_range_in_file(const qcow2_state *s, uint64_t offset,
                         uint64_t bytes, uint64_t flen)
{
    if (offset > QCOW2_MAX_HOST_OFFSET || bytes > QCOW2_MAX_HOST_OFFSET) {
        return false;
    }
    return bytes == 0 ||
           (offset < flen && offset + bytes < flen + s->cluster_size);
}

static int file_length(qcow2_state *s, uint64_t *flen, vd_error *err)
{
    int64_t len = vd_node_getlength(s->file->node);

    if (len < 0) {
        return vd_error_set(err, (int)len, "%s: cannot get the file length",
                            s->filename);
    }
    *flen = (uint64_t)len;
    return 0;
}

/* The refcount of every cluster of [offset, offset+bytes) is at least 1
 * and, with @overflow, below the maximum. *@bad gets the first cluster
 * that fails (-ERANGE: overflow, -ENOENT: refcount 0); *@highest (when
 * not NULL) the highest refcount in the range. Through @hold when not
 * NULL (a walk over a table's entries keeps its refcount block). */
static int check_refs(qcow2_state *s, uint64_t offset, uint64_t bytes,
                      bool overflow, uint64_t *bad, uint64_t *highest,
                      qcow2_refblock_hold *hold, vd_error *err)
{
    uint64_t first = offset >> s->cluster_bits;
    uint64_t last = (offset + (bytes ? bytes : 1) - 1) >> s->cluster_bits;
    qcow2_refblock_hold local = { 0 };
    qcow2_refblock_hold *h = hold ? hold : &local;
    int ret = 0;

    for (uint64_t c = first; ret == 0 && c <= last; c++) {
        uint64_t rc;
        ret = qcow2_held_get_refcount(s, h, c, &rc, err);
        if (ret == 0 && (rc == 0 || (overflow && rc >= s->refcount_max))) {
            *bad = c << s->cluster_bits;
            ret = rc ? -ERANGE : -ENOENT;
        } else if (ret == 0 && highest && rc > *highest) {
            *highest = rc;
        }
    }
    qcow2_refblock_release(s, &local);
    return ret;
}

static int overflow_error(qcow2_state *s, vd_error *err)
{
    return vd_error_set(err, -EINVAL, "%s: a snapshot would overflow the "
                        "reference count of a cluster (refcount width %d "
                        "bits)", s->filename, s->refcount_bits);
}

/* ------------------------------------------------------------------ */
/* Once per session: the structures every change relies on            */
/* ------------------------------------------------------------------ */

enum vkind {
    VK_HEADER, VK_L1, VK_REFTABLE, VK_SNTABLE, VK_SNL1, VK_REFBLOCK, VK_L2,
    VK_CRYPTO,
};

typedef struct vrange {
    uint64_t start, end;        /* whole clusters */
    uint64_t offset;            /* as stored (for messages) */
    int kind;
    uint64_t index;             /* reftable/L1 index, snapshot number */
} vrange;

static void describe(qcow2_state *s, const vrange *r, char *buf, size_t len)
{
    switch (r->kind) {
    case VK_HEADER:
        snprintf(buf, len, "header");
        break;
    case VK_L1:
        snprintf(buf, len, "active L1 table");
        break;
    case VK_REFTABLE:
        snprintf(buf, len, "refcount table");
        break;
    case VK_SNTABLE:
        snprintf(buf, len, "snapshot table");
        break;
    case VK_SNL1:
        snprintf(buf, len, "L1 table of snapshot '%s'",
                 s->snapshots[r->index].id_str);
        break;
    case VK_REFBLOCK:
        snprintf(buf, len, "refcount block (refcount table index 0x%" PRIx64
                 ")", r->index);
        break;
    case VK_CRYPTO:
        snprintf(buf, len, "encryption header");
        break;
    default:
        snprintf(buf, len, "L2 table (active L1 index 0x%" PRIx64 ")",
                 r->index);
        break;
    }
}

static int cmp_range(const void *a, const void *b)
{
    const vrange *x = a, *y = b;
    return x->start < y->start ? -1 : x->start > y->start;
}

typedef struct vlist {
    vrange *v;
    size_t n, cap;
} vlist;

static int push(qcow2_state *s, vlist *l, int kind, uint64_t index,
                uint64_t offset, uint64_t bytes)
{
    if (bytes == 0) {
        return 0;
    }
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        vrange *nv = realloc(l->v, cap * sizeof(*nv));
        if (!nv) {
            return -ENOMEM;
        }
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = (vrange){
        qcow2_start_of_cluster(s, offset),
        qcow2_start_of_cluster(s, offset + bytes + s->cluster_size - 1),
        offset, kind, index,
    };
    return 0;
}

/* A fixed table must lie inside the file (open checks this too, except
 * for images opened for a check). */
static int table_in_file(qcow2_state *s, vlist *l, int kind, uint64_t index,
                         uint64_t offset, uint64_t bytes, uint64_t flen,
                         vd_error *err)
{
    char what[96];

    if (!qcow2_range_in_file(s, offset, bytes, flen)) {
        vrange r = { 0, 0, offset, kind, index };
        describe(s, &r, what, sizeof(what));
        return vd_error_set(err, -EIO, "%s: the %s at 0x%" PRIx64 " (0x%"
                            PRIx64 " bytes) lies outside the file (length 0x%"
                            PRIx64 ")", s->filename, what, offset, bytes,
                            flen);
    }
    if (push(s, l, kind, index, offset, bytes) < 0) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    return 0;
}

/*
 * The L2 tables and refcount blocks, one cluster each, are kept apart
 * from the few multi-cluster tables: as bare offsets, bit 0 set for a
 * refcount block (offsets are cluster-aligned), sorted. An L1 table at
 * QEMU's 32 MB limit costs 32 MB here, not five times that.
 */
#define TAG_REFBLOCK 1ull

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The vrange of tagged single cluster @t (its index found again). */
static vrange single(qcow2_state *s, uint64_t t, uint64_t skip)
{
    uint64_t off = t & ~TAG_REFBLOCK;
    vrange r = { off, off + s->cluster_size, off,
                 (t & TAG_REFBLOCK) ? VK_REFBLOCK : VK_L2, 0 };

    if (t & TAG_REFBLOCK) {
        for (uint32_t i = 0; i < s->refcount_table_size; i++) {
            if ((s->refcount_table[i] & QCOW2_REFT_OFFSET_MASK) == off &&
                i != skip) {
                r.index = i;
                break;
            }
        }
    } else {
        for (uint32_t i = 0; i < s->l1_size; i++) {
            if ((s->l1_table[i] & QCOW2_L1E_OFFSET_MASK) == off &&
                i != skip) {
                r.index = i;
                break;
            }
        }
    }
    return r;
}

static int overlap_error(qcow2_state *s, const vrange *x, const vrange *y,
                         vd_error *err)
{
    char a[96], b[96];

    describe(s, x, a, sizeof(a));
    describe(s, y, b, sizeof(b));
    return vd_error_set(err, -EIO, "%s: the %s at 0x%" PRIx64 " overlaps the "
                        "%s at 0x%" PRIx64, s->filename, a, x->offset, b,
                        y->offset);
}

static int refs_error(qcow2_state *s, const vrange *r, int ret, uint64_t bad,
                      vd_error *err)
{
    char a[96];

    if (ret == -ENOENT) {
        describe(s, r, a, sizeof(a));
        ret = vd_error_set(err, -EIO, "%s: cluster 0x%" PRIx64 " of the %s "
                           "has refcount 0", s->filename, bad, a);
    }
    return ret;
}

static int validate_all(qcow2_state *s, vd_error *err)
{
    vlist l = { 0 };
    uint64_t *cl = NULL;
    size_t ncl = 0;
    uint64_t flen = 0, maxend = 0, bad = 0;
    size_t holder = 0;
    int ret;

    ret = file_length(s, &flen, err);
    if (ret < 0) {
        return ret;
    }
    ret = table_in_file(s, &l, VK_HEADER, 0, 0, s->cluster_size,
                        flen > s->cluster_size ? flen : s->cluster_size,
                        err);
    if (ret == 0) {
        ret = table_in_file(s, &l, VK_L1, 0, s->l1_table_offset,
                            (uint64_t)s->l1_size * 8, flen, err);
    }
    if (ret == 0) {
        ret = table_in_file(s, &l, VK_REFTABLE, 0, s->refcount_table_offset,
                            (uint64_t)s->refcount_table_size * 8, flen, err);
    }
    /* The LUKS header: a table or data cluster over it would destroy
     * the key material. */
    if (ret == 0 && s->has_crypto_ext) {
        ret = table_in_file(s, &l, VK_CRYPTO, 0, s->crypto_ext_offset,
                            s->crypto_ext_length, flen, err);
    }
    if (ret == 0 && s->nb_snapshots && s->snapshots) {
        ret = table_in_file(s, &l, VK_SNTABLE, 0, s->snapshots_offset,
                            s->snapshots_size, flen, err);
        for (uint32_t i = 0; ret == 0 && i < s->nb_snapshots; i++) {
            ret = table_in_file(s, &l, VK_SNL1, i,
                                s->snapshots[i].l1_table_offset,
                                (uint64_t)s->snapshots[i].l1_size * 8, flen,
                                err);
        }
    }
    cl = malloc(((size_t)s->refcount_table_size + s->l1_size + 1) * 8);
    if (ret == 0 && !cl) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }

    /* Refcount blocks: the refcount lookups below rely on them. */
    for (uint32_t i = 0; ret == 0 && i < s->refcount_table_size; i++) {
        uint64_t e = s->refcount_table[i];
        uint64_t off = e & QCOW2_REFT_OFFSET_MASK;

        if (!e) {
            continue;
        }
        /* The words of refblock_offset() (refcount.c), QEMU's for the
         * unaligned case. */
        if (off > QCOW2_MAX_HOST_OFFSET) {
            ret = vd_error_set(err, -EIO, "%s: refblock offset 0x%" PRIx64
                               " is invalid (reftable index: 0x%" PRIx32 ")",
                               s->filename, off, i);
        } else if ((e & QCOW2_REFT_RESERVED) ||
                   (off & (s->cluster_size - 1))) {
            ret = vd_error_set(err, -EIO, "%s: Refblock offset %#" PRIx64
                               " unaligned (reftable index: %#" PRIx32 ")",
                               s->filename, e, i);
        } else if (off >= flen) {
            ret = vd_error_set(err, -EIO, "%s: the refcount block at 0x%"
                               PRIx64 " (refcount table index 0x%" PRIx32
                               ") lies outside the file (length 0x%" PRIx64
                               ")", s->filename, off, i, flen);
        } else {
            cl[ncl++] = off | TAG_REFBLOCK;
        }
    }

    /* Active L2 tables. An unaligned entry is left to the operation that
     * follows it (a corruption event, as QEMU's). */
    for (uint32_t i = 0; ret == 0 && i < s->l1_size; i++) {
        uint64_t off = s->l1_table[i] & QCOW2_L1E_OFFSET_MASK;

        if (!off || (off & (s->cluster_size - 1))) {
            continue;
        }
        if (off >= flen) {
            ret = vd_error_set(err, -EIO, "%s: the L2 table at 0x%" PRIx64
                               " (active L1 index 0x%" PRIx32 ") lies outside "
                               "the file (length 0x%" PRIx64 ")", s->filename,
                               off, i, flen);
        } else {
            cl[ncl++] = off;
        }
    }
    if (ret < 0) {
        goto out;
    }

    /* No cluster may hold two of them: the tables among themselves... */
    qsort(l.v, l.n, sizeof(*l.v), cmp_range);
    for (size_t i = 0; i < l.n; i++) {
        if (i && l.v[i].start < maxend) {
            ret = overlap_error(s, &l.v[i], &l.v[holder], err);
            goto out;
        }
        if (l.v[i].end > maxend) {
            maxend = l.v[i].end;
            holder = i;
        }
    }
    /* ...the single clusters among themselves and against the tables
     * (which no longer overlap: binary search). */
    qsort(cl, ncl, sizeof(*cl), cmp_u64);
    for (size_t i = 0; i < ncl; i++) {
        uint64_t off = cl[i] & ~TAG_REFBLOCK;
        size_t lo = 0, hi = l.n;

        if (i && (cl[i - 1] & ~TAG_REFBLOCK) == off) {
            /* Two entries naming one cluster: the second entry of the
             * same table is the one after the first. */
            vrange x = single(s, cl[i - 1], UINT64_MAX);
            vrange y = single(s, cl[i], cl[i] == cl[i - 1] ? x.index
                                                           : UINT64_MAX);
            ret = overlap_error(s, &y, &x, err);
            goto out;
        }
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (l.v[mid].end <= off) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if (lo < l.n && l.v[lo].start <= off) {
            vrange x = single(s, cl[i], UINT64_MAX);
            ret = overlap_error(s, &x, &l.v[lo], err);
            goto out;
        }
    }

    /* Each of their clusters must count as used. */
    for (size_t i = 0; ret == 0 && i < l.n; i++) {
        ret = check_refs(s, l.v[i].start, l.v[i].end - l.v[i].start, false,
                         &bad, NULL, NULL, err);
        ret = ret < 0 ? refs_error(s, &l.v[i], ret, bad, err) : 0;
    }
    for (size_t i = 0; ret == 0 && i < ncl; i++) {
        ret = check_refs(s, cl[i] & ~TAG_REFBLOCK, s->cluster_size, false,
                         &bad, NULL, NULL, err);
        if (ret < 0) {
            vrange x = single(s, cl[i], UINT64_MAX);
            ret = refs_error(s, &x, ret, bad, err);
        }
    }
out:
    free(l.v);
    free(cl);
    return ret;
}

int qcow2_validate_metadata(qcow2_state *s, vd_error *err)
{
    int ret;

    if (s->repairing) {
        return 0;
    }
    if (!s->validated) {
        vd_error_clear(&s->validate_err);
        ret = validate_all(s, &s->validate_err);
        if (ret == -ENOMEM) {
            /* Not a verdict on the image: try again next time. */
            return vd_error_set(err, ret, "%s", s->validate_err.message);
        }
        s->validated = true;
        s->validate_ret = ret;
    }
    if (s->validate_ret < 0) {
        return vd_error_set(err, s->validate_ret, "%s",
                            s->validate_err.message);
    }
    return 0;
}

int qcow2_begin_change(qcow2_state *s, vd_error *err)
{
    int ret = qcow2_validate_metadata(s, err);

    if (ret == 0) {
        ret = qcow2_write_deferred_header(s, err);
    }
    return ret;
}

/* ------------------------------------------------------------------ */
/* Per operation: what it is about to reference or free               */
/* ------------------------------------------------------------------ */

/* An unaligned offset: a corruption event where QEMU signals one at
 * this point (QCOW2_VALIDATE_SIGNAL), else a refusal with the same text. */
static int unaligned(qcow2_state *s, unsigned flags, vd_error *err,
                     const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int unaligned(qcow2_state *s, unsigned flags, vd_error *err,
                     const char *fmt, ...)
{
    char msg[256];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (flags & QCOW2_VALIDATE_SIGNAL) {
        return qcow2_signal_corruption(s, err, "%s", msg);
    }
    return vd_error_set(err, -EIO, "%s: %s", s->filename, msg);
}

static int l2_table_ref(qcow2_state *s, uint64_t l1e, uint64_t l1_index,
                        unsigned flags, uint64_t flen, vd_error *err)
{
    uint64_t off = l1e & QCOW2_L1E_OFFSET_MASK, bad = 0;
    const char *which = (flags & QCOW2_VALIDATE_SNAPSHOT) ? "snapshot"
                                                           : "active";
    bool overflow = flags & QCOW2_VALIDATE_OVERFLOW;
    int bit, ret;

    if (!off) {
        return 0;
    }
    if (off & (s->cluster_size - 1)) {
        return unaligned(s, flags, err, "L2 table offset %#" PRIx64
                         " unaligned (L1 index: %#" PRIx64 ")", off,
                         l1_index);
    }
    if (!qcow2_range_in_file(s, off, s->cluster_size, flen)) {
        return vd_error_set(err, -EIO, "%s: the L2 table at 0x%" PRIx64
                            " (%s L1 index 0x%" PRIx64 ") lies outside the "
                            "file (length 0x%" PRIx64 ")", s->filename, off,
                            which, l1_index, flen);
    }
    bit = qcow2_metadata_overlap_kinds(s, NOT_L2, off, s->cluster_size);
    if (bit) {
        return vd_error_set(err, -EIO, "%s: the L2 table at 0x%" PRIx64
                            " (%s L1 index 0x%" PRIx64 ") overlaps the %s",
                            s->filename, off, which, l1_index,
                            qcow2_overlap_name(bit));
    }
    ret = check_refs(s, off, s->cluster_size, overflow, &bad, NULL, NULL,
                     err);
    if (ret == -ENOENT) {
        return vd_error_set(err, -EIO, "%s: the L2 table at 0x%" PRIx64
                            " (%s L1 index 0x%" PRIx64 ") has refcount 0",
                            s->filename, off, which, l1_index);
    }
    if (ret == -ERANGE) {
        return overflow_error(s, err);
    }
    return ret;
}

int qcow2_validate_l2_table_ref(qcow2_state *s, uint64_t l1e,
                                uint64_t l1_index, unsigned flags,
                                uint64_t flen, vd_error *err)
{
    return l2_table_ref(s, l1e, l1_index, flags, flen, err);
}

/* A run of host clusters [lo, hi) found to meet no metadata structure:
 * a walk over a table's entries checks each run once instead of each
 * cluster (data clusters mostly lie side by side). Empty when lo >= hi. */
typedef struct clear_run {
    uint64_t lo, hi;
} clear_run;

/* With QCOW2_VALIDATE_OVERFLOW, *@near_max (when not NULL) is set when
 * the host cluster of a compressed entry has a refcount so high that
 * the other compressed entries sharing it might not fit
 * (compressed_refs_fit() must then count them). @run (may be NULL) is
 * the walk's clear run, used and updated. */
static int cluster_ref(qcow2_state *s, uint64_t e, uint64_t l2_off,
                       uint64_t l2_index, unsigned flags, uint64_t flen,
                       bool *near_max, qcow2_refblock_hold *hold,
                       clear_run *run, vd_error *err)
{
    uint64_t off, bytes, bad = 0, highest = 0;
    bool overflow = flags & QCOW2_VALIDATE_OVERFLOW;
    const char *what;
    int bit, ret;

    if (e & QCOW2_OFLAG_COMPRESSED) {
        if (s->data_file != s->file) {
            return qcow2_signal_corruption(s, err, "Compressed cluster entry "
                                           "found in image with external "
                                           "data file (L2 index: %#" PRIx64
                                           ")", l2_index);
        }
        qcow2_parse_compressed(s, e, &off, &bytes);
        what = "compressed cluster";
    } else {
        off = e & QCOW2_L2E_OFFSET_MASK;
        bytes = s->cluster_size;
        what = "data cluster";
        /* External data file clusters are not refcounted. */
        if (!off || s->data_file != s->file) {
            return 0;
        }
        if (off & (s->cluster_size - 1)) {
            return unaligned(s, flags, err, "Cluster allocation offset %#"
                             PRIx64 " unaligned (L2 offset: %#" PRIx64 ", L2 "
                             "index: %#" PRIx64 ")", off, l2_off, l2_index);
        }
    }
    if (!qcow2_range_in_file(s, off, bytes, flen)) {
        return vd_error_set(err, -EIO, "%s: the %s at 0x%" PRIx64 " (L2 "
                            "table 0x%" PRIx64 ", index 0x%" PRIx64 ") lies "
                            "outside the file (length 0x%" PRIx64 ")",
                            s->filename, what, off, l2_off, l2_index, flen);
    }
    if (run && qcow2_start_of_cluster(s, off) >= run->lo &&
        off + bytes <= run->hi) {
        bit = 0;    /* inside a run already found clear */
    } else if (run) {
        uint64_t until = 0;
        bit = qcow2_metadata_overlap_window(s, QCOW2_OL_ALL, off, bytes,
                                            &until);
        if (!bit) {
            *run = (clear_run){ qcow2_start_of_cluster(s, off), until };
        }
    } else {
        bit = qcow2_metadata_overlap_kinds(s, QCOW2_OL_ALL, off, bytes);
    }
    if (bit) {
        return vd_error_set(err, -EIO, "%s: the %s at 0x%" PRIx64 " (L2 "
                            "table 0x%" PRIx64 ", index 0x%" PRIx64 ") "
                            "overlaps the %s", s->filename, what, off, l2_off,
                            l2_index, qcow2_overlap_name(bit));
    }
    ret = check_refs(s, off, bytes, overflow, &bad, &highest, hold, err);
    if (ret == 0 && overflow && near_max && (e & QCOW2_OFLAG_COMPRESSED)) {
        /* The entries sharing a host cluster are at most its refcount
         * (each is a reference) and, unless some overlap, one per
         * 512-byte sector of it plus one straddling in. */
        uint64_t sharing = (s->cluster_size >> 9) + 1;
        if (highest > sharing) {
            sharing = highest;
        }
        if (sharing >= s->refcount_max ||
            highest > s->refcount_max - sharing) {
            *near_max = true;
        }
    }
    if (ret == -ENOENT) {
        return vd_error_set(err, -EIO, "%s: the %s at 0x%" PRIx64 " (L2 "
                            "table 0x%" PRIx64 ", index 0x%" PRIx64 ") has "
                            "refcount 0", s->filename, what, off, l2_off,
                            l2_index);
    }
    if (ret == -ERANGE) {
        return overflow_error(s, err);
    }
    return ret;
}

int qcow2_validate_cluster_ref(qcow2_state *s, uint64_t e, uint64_t l2_off,
                               uint64_t l2_index, unsigned flags,
                               uint64_t flen, vd_error *err)
{
    return cluster_ref(s, e, l2_off, l2_index, flags, flen, NULL, NULL, NULL,
                       err);
}

/* Entries [first, end) of the L2 table named by @l1e. */
static int l2_entries(qcow2_state *s, uint64_t l1e, uint64_t first,
                      uint64_t end, unsigned flags, uint64_t flen,
                      bool *near_max, vd_error *err)
{
    uint64_t l2_off = l1e & QCOW2_L1E_OFFSET_MASK;
    qcow2_refblock_hold hold = { 0 };
    clear_run run = { 1, 0 };
    void *table = NULL;
    int ret = qcow2_cache_get(s, s->l2_cache, l2_off, &table, err);

    /* Nothing moves metadata during this pass: the hold and the clear
     * run stay true from entry to entry. */
    for (uint64_t j = first; ret == 0 && j < end; j++) {
        ret = cluster_ref(s, qcow2_get_l2_entry(s, table, j), l2_off, j,
                          flags, flen, near_max, &hold, &run, err);
    }
    qcow2_refblock_release(s, &hold);
    if (table) {
        qcow2_cache_put(s->l2_cache, &table);
    }
    return ret;
}

/*
 * Compressed clusters share host clusters, and a new reference to the
 * tree adds one to a shared host cluster for each compressed cluster in
 * it: "one more reference fits" per entry does not tell whether they
 * all fit. Each host cluster's refcount plus the number of compressed
 * entries of the tree in it must. Run where cluster_ref() found a host
 * cluster near the maximum: with refcounts narrower than 16 bits, any
 * (a few compressed clusters overflow them); wider, one already shared
 * about as often as the maximum allows (the tree's entries were
 * validated already).
 */
static int compressed_refs_fit(qcow2_state *s, const uint64_t *l1,
                               uint32_t l1_size, vd_error *err)
{
    uint64_t *hosts = NULL;
    size_t n = 0, cap = 0;
    int ret = 0;

    for (uint32_t i = 0; ret == 0 && i < l1_size; i++) {
        uint64_t l2_off = l1[i] & QCOW2_L1E_OFFSET_MASK;
        void *table = NULL;

        if (!l2_off) {
            continue;
        }
        ret = qcow2_cache_get(s, s->l2_cache, l2_off, &table, err);
        for (uint64_t j = 0; ret == 0 && j < s->l2_size; j++) {
            uint64_t e = qcow2_get_l2_entry(s, table, j), off, bytes;

            if (!(e & QCOW2_OFLAG_COMPRESSED)) {
                continue;
            }
            qcow2_parse_compressed(s, e, &off, &bytes);
            for (uint64_t c = off >> s->cluster_bits;
                 c <= (off + (bytes ? bytes : 1) - 1) >> s->cluster_bits;
                 c++) {
                if (n == cap) {
                    size_t ncap = cap ? 2 * cap : 256;
                    uint64_t *p = realloc(hosts, ncap * sizeof(*p));
                    if (!p) {
                        ret = vd_error_set(err, -ENOMEM, "%s: out of memory",
                                           s->filename);
                        break;
                    }
                    hosts = p;
                    cap = ncap;
                }
                hosts[n++] = c;
            }
        }
        if (table) {
            qcow2_cache_put(s->l2_cache, &table);
        }
    }
    if (ret == 0 && n > 1) {
        qsort(hosts, n, sizeof(*hosts), cmp_u64);
    }
    for (size_t i = 0, k; ret == 0 && i < n; i += k) {
        uint64_t rc;

        for (k = 1; i + k < n && hosts[i + k] == hosts[i]; k++) {
        }
        if (k == 1) {
            continue;
        }
        ret = qcow2_get_refcount(s, hosts[i], &rc, err);
        if (ret == 0 && rc + k > s->refcount_max) {
            ret = overflow_error(s, err);
        }
    }
    free(hosts);
    return ret;
}

int qcow2_validate_l1_tree(qcow2_state *s, const uint64_t *l1,
                           uint32_t l1_size, unsigned flags, vd_error *err)
{
    uint64_t flen = 0;
    bool near_max = false;
    int ret = file_length(s, &flen, err);

    for (uint32_t i = 0; ret == 0 && i < l1_size; i++) {
        if (!(l1[i] & QCOW2_L1E_OFFSET_MASK)) {
            continue;
        }
        ret = l2_table_ref(s, l1[i], i, flags, flen, err);
        if (ret == 0) {
            ret = l2_entries(s, l1[i], 0, s->l2_size, flags, flen,
                             &near_max, err);
        }
    }
    /* Counting the sharing entries costs a sort of them all: done only
     * where one could overflow, which with 16 bits and more takes a
     * host cluster already near the maximum. */
    if (ret == 0 && (flags & QCOW2_VALIDATE_OVERFLOW) && near_max) {
        ret = compressed_refs_fit(s, l1, l1_size, err);
    }
    return ret;
}

int qcow2_validate_guest_range(qcow2_state *s, uint64_t off, uint64_t bytes,
                               vd_error *err)
{
    uint64_t cover = s->cluster_size << s->l2_bits;
    uint64_t end = off + bytes, flen = 0;
    int ret = file_length(s, &flen, err);

    while (ret == 0 && off < end) {
        uint64_t l1_index = qcow2_offset_to_l1_index(s, off);
        uint64_t stop = (off & ~(cover - 1)) + cover;
        uint64_t l1e = l1_index < s->l1_size ? s->l1_table[l1_index] : 0;

        if (stop > end) {
            stop = end;
        }
        if (l1e & QCOW2_L1E_OFFSET_MASK) {
            ret = l2_table_ref(s, l1e, l1_index, 0, flen, err);
            if (ret == 0) {
                ret = l2_entries(s, l1e, qcow2_offset_to_l2_index(s, off),
                                 qcow2_offset_to_l2_index(s, stop - 1) + 1,
                                 0, flen, NULL, err);
            }
        }
        off = stop;
    }
    return ret;
}
