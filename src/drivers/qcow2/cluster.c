/*
 * qcow2 cluster mapping: L1/L2 lookup, L2 and L1 allocation, and the
 * guest-visible operations built on them (read, write with allocation
 * and copy-on-write, compressed write, write_zeroes, discard, block
 * status, preallocation).
 *
 * Design note: write ordering (crash safety)
 * -------------------------------------------
 * An allocating write proceeds in this order, so that after a crash at
 * any point the image is consistent or merely leaks clusters:
 *
 *   1. Under the lock: pick host clusters and raise their refcounts to 1
 *      in the refcount cache; register the guest cluster range as
 *      in-flight (other writers to it wait on alloc_cond).
 *   2. Without the lock: write the guest data together with the
 *      copy-on-write head and tail to the new clusters (only the guest
 *      data where the rest reads as zeros and the new clusters lie in
 *      the tail grown ahead, past everything the file held:
 *      file_zero_from(), grow_ahead()).
 *   3. Under the lock: point the L2 entries at the new clusters in the L2
 *      cache, which is made to depend on the refcount cache: before any
 *      L2 table is written, the refcount cache is written and the file
 *      flushed (cache.c), which also makes the data of step 2 stable.
 *      Clusters the entries used to reference are freed afterwards; the
 *      refcount cache then depends on the L2 cache, so a refcount that
 *      lets a cluster be reused never reaches the disk before the L2
 *      table that stopped using it.
 *   4. New L2 tables are written (after the refcounts, with a flush)
 *      before the L1 entry pointing at them; a new L1 table is written
 *      and flushed before the header points at it.
 *   5. A new refcount block's table entry reaches the disk when the
 *      refcount cache is next written, behind a flush (refcount.c,
 *      qcow2_reftable_write_pending()), so before any reference that
 *      step 3 or 4 orders after the refcount cache.
 *
 * Reads and in-place writes (cluster allocated with refcount 1, the
 * COPIED flag) only look the mapping up under the lock and do their data
 * I/O without it. Guest offsets are always checked against the
 * in-flight list before metadata is changed, and before an L2 entry is
 * looked at to decide what to change: an allocation in flight has its
 * data on the disk but its entry not yet linked, so its entry still
 * says "no data" (a zero write of part of such a cluster once took that
 * for an empty cluster and zeroed it whole, losing the other writer's
 * data). The wait drops the lock; decide only after it.
 */
#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "drivers/qcow2/qcow2.h"

qcow2_subcluster_type qcow2_get_subcluster_type(const qcow2_state *s,
                                                uint64_t l2_entry,
                                                uint64_t l2_bitmap,
                                                int sc_index)
{
    bool has_host;

    if (l2_entry & QCOW2_OFLAG_COMPRESSED) {
        return QCOW2_SC_COMPRESSED;
    }
    has_host = (l2_entry & QCOW2_L2E_OFFSET_MASK) ||
               ((l2_entry & QCOW2_OFLAG_COPIED) && s->data_file != s->file);
    if (!s->extended_l2) {
        if (l2_entry & QCOW2_OFLAG_ZERO) {
            return has_host ? QCOW2_SC_ZERO_ALLOC : QCOW2_SC_ZERO_PLAIN;
        }
        return has_host ? QCOW2_SC_NORMAL : QCOW2_SC_UNALLOCATED_PLAIN;
    }
    if ((l2_bitmap >> 32) & l2_bitmap & QCOW2_L2B_ALLOC_MASK) {
        return QCOW2_SC_INVALID;
    }
    if (has_host) {
        if (l2_bitmap & QCOW2_L2B_ZERO(sc_index)) {
            return QCOW2_SC_ZERO_ALLOC;
        }
        return (l2_bitmap & QCOW2_L2B_ALLOC(sc_index)) ?
               QCOW2_SC_NORMAL : QCOW2_SC_UNALLOCATED_ALLOC;
    }
    if (l2_bitmap & QCOW2_L2B_ALLOC(sc_index)) {
        return QCOW2_SC_INVALID;
    }
    return (l2_bitmap & QCOW2_L2B_ZERO(sc_index)) ?
           QCOW2_SC_ZERO_PLAIN : QCOW2_SC_UNALLOCATED_PLAIN;
}

static bool type_has_host(qcow2_subcluster_type t)
{
    return t == QCOW2_SC_NORMAL || t == QCOW2_SC_ZERO_ALLOC ||
           t == QCOW2_SC_UNALLOCATED_ALLOC;
}

static bool has_data_file(const qcow2_state *s)
{
    return s->data_file != s->file;
}

/* ---- L1 ---- */

int qcow2_write_l1_entry(qcow2_state *s, uint64_t l1_index, vd_error *err)
{
    uint64_t buf[64];
    uint64_t start = l1_index & ~63ull;
    uint64_t n = s->l1_size - start;
    int ret;

    if (n > 64) {
        n = 64;
    }
    for (uint64_t i = 0; i < n; i++) {
        buf[i] = htobe64(s->l1_table[start + i]);
    }
    ret = qcow2_pre_write_overlap_check(s, QCOW2_OL_ACTIVE_L1,
                                        s->l1_table_offset + start * 8, n * 8,
                                        false, err);
    if (ret < 0) {
        return ret;
    }
    vd_node_debug_event(s->file->node, VD_BLKDBG_L1_UPDATE);
    ret = vd_child_pwrite(s->file, s->l1_table_offset + start * 8, buf, n * 8,
                          0, err);
    if (ret < 0) {
        vd_error_prepend(err, "%s: writing the L1 table: ", s->filename);
    }
    return ret;
}

int qcow2_grow_l1_table(qcow2_state *s, uint64_t min_size, bool exact,
                        vd_error *err)
{
    uint64_t new_size, *new_l1 = NULL;
    int64_t new_off;
    uint64_t old_off = s->l1_table_offset, old_size = s->l1_size;
    int ret;

    if (min_size <= s->l1_size) {
        return 0;
    }
    if (exact) {
        new_size = min_size;
    } else {
        new_size = s->l1_size ? s->l1_size : 1;
        while (min_size > new_size) {
            new_size = (new_size * 3 + 1) / 2;
        }
    }
    if (new_size * 8 > QCOW2_MAX_L1_BYTES) {
        return vd_error_set(err, -EFBIG, "%s: L1 table of %llu entries "
                            "would exceed 32 MB", s->filename,
                            (unsigned long long)new_size);
    }
    new_l1 = calloc(new_size, 8);
    if (!new_l1) {
        return vd_error_set(err, -ENOMEM, "%s: cannot allocate the L1 table",
                            s->filename);
    }
    vd_node_debug_event(s->file->node, VD_BLKDBG_L1_GROW_ALLOC_TABLE);
    new_off = qcow2_alloc_clusters(s, new_size * 8, err);
    if (new_off < 0) {
        free(new_l1);
        return (int)new_off;
    }
    ret = qcow2_cache_flush(s, s->refcount_cache, err);
    if (ret < 0) {
        goto fail;
    }
    for (uint64_t i = 0; i < s->l1_size; i++) {
        new_l1[i] = htobe64(s->l1_table[i]);
    }
    ret = qcow2_pre_write_overlap_check(s, 0, (uint64_t)new_off, new_size * 8,
                                        false, err);
    if (ret == 0) {
        vd_node_debug_event(s->file->node, VD_BLKDBG_L1_GROW_WRITE_TABLE);
        ret = vd_child_pwrite(s->file, (uint64_t)new_off, new_l1,
                              new_size * 8, 0, err);
    }
    if (ret < 0) {
        goto fail;
    }
    ret = vd_node_flush(s->file->node, err);
    if (ret < 0) {
        goto fail;
    }
    {
        struct __attribute__((packed)) {
            uint32_t size;
            uint64_t offset;
        } hdr = { htobe32((uint32_t)new_size), htobe64((uint64_t)new_off) };
        vd_node_debug_event(s->file->node, VD_BLKDBG_L1_GROW_ACTIVATE_TABLE);
        ret = vd_child_pwrite(s->file, offsetof(qcow2_header, l1_size), &hdr,
                              sizeof(hdr), 0, err);
        if (ret < 0) {
            goto fail;
        }
        ret = vd_node_flush(s->file->node, err);
        if (ret < 0) {
            goto fail;
        }
    }
    for (uint64_t i = 0; i < new_size; i++) {
        new_l1[i] = be64toh(new_l1[i]);
    }
    free(s->l1_table);
    s->l1_table = new_l1;
    s->l1_size = (uint32_t)new_size;
    s->l1_table_offset = (uint64_t)new_off;
    qcow2_overlap_changed(s);
    if (old_size) {
        return qcow2_free_clusters(s, old_off, old_size * 8,
                                   QCOW2_DISCARD_OTHER, err);
    }
    return 0;

fail:
    free(new_l1);
    qcow2_free_clusters(s, (uint64_t)new_off, new_size * 8,
                        QCOW2_DISCARD_OTHER, NULL);
    return ret;
}

/* ---- L2 ---- */

int qcow2_get_l2_table(qcow2_state *s, uint64_t offset, bool alloc,
                       void **table, uint64_t *l2_index, vd_error *err)
{
    uint64_t l1_index = qcow2_offset_to_l1_index(s, offset);
    uint64_t l1e, l2_off;
    int64_t new_off;
    void *old = NULL, *t;
    int ret;

    *table = NULL;
    *l2_index = qcow2_offset_to_l2_index(s, offset);
    if (l1_index >= s->l1_size) {
        if (!alloc) {
            return 0;
        }
        ret = qcow2_grow_l1_table(s, l1_index + 1, false, err);
        if (ret < 0) {
            return ret;
        }
    }
    l1e = s->l1_table[l1_index];
    l2_off = l1e & QCOW2_L1E_OFFSET_MASK;
    if (l2_off & (s->cluster_size - 1)) {
        return qcow2_signal_corruption(s, err, "L2 table offset %#llx "
                                       "unaligned (L1 index: %#llx)",
                                       (unsigned long long)l2_off,
                                       (unsigned long long)l1_index);
    }
    if (l2_off && ((l1e & QCOW2_OFLAG_COPIED) || !alloc)) {
        return qcow2_cache_get(s, s->l2_cache, l2_off, table, err);
    }
    if (!alloc) {
        return 0;
    }

    /* New table (or a private copy of a shared one). */
    new_off = qcow2_alloc_clusters(s, s->cluster_size, err);
    if (new_off < 0) {
        return (int)new_off;
    }
    ret = qcow2_cache_flush(s, s->refcount_cache, err);
    if (ret < 0) {
        goto fail;
    }
    ret = qcow2_cache_get_empty(s, s->l2_cache, (uint64_t)new_off, &t, err);
    if (ret < 0) {
        goto fail;
    }
    if (l2_off) {
        vd_node_debug_event(s->file->node, VD_BLKDBG_L2_ALLOC_COW_READ);
        ret = qcow2_cache_get(s, s->l2_cache, l2_off, &old, err);
        if (ret < 0) {
            qcow2_cache_put(s->l2_cache, &t);
            goto fail;
        }
        memcpy(t, old, s->cluster_size);
        qcow2_cache_put(s->l2_cache, &old);
    } else {
        memset(t, 0, s->cluster_size);
    }
    vd_node_debug_event(s->file->node, VD_BLKDBG_L2_ALLOC_WRITE);
    qcow2_cache_mark_dirty(s->l2_cache, t);
    ret = qcow2_cache_flush(s, s->l2_cache, err);
    if (ret < 0) {
        qcow2_cache_put(s->l2_cache, &t);
        goto fail;
    }
    s->l1_table[l1_index] = (uint64_t)new_off | QCOW2_OFLAG_COPIED;
    qcow2_overlap_changed(s);
    ret = qcow2_write_l1_entry(s, l1_index, err);
    if (ret < 0) {
        s->l1_table[l1_index] = l1e;
        qcow2_overlap_changed(s);
        qcow2_cache_put(s->l2_cache, &t);
        goto fail;
    }
    if (l2_off) {
        qcow2_free_clusters(s, l2_off, s->cluster_size, QCOW2_DISCARD_OTHER,
                            NULL);
    }
    *table = t;
    return 0;

fail:
    qcow2_free_clusters(s, (uint64_t)new_off, s->cluster_size,
                        QCOW2_DISCARD_OTHER, NULL);
    return ret;
}

int qcow2_get_host_offset(qcow2_state *s, uint64_t offset, uint64_t *bytes,
                          uint64_t *host, qcow2_subcluster_type *type,
                          vd_error *err)
{
    uint64_t cover = s->cluster_size << s->l2_bits;
    uint64_t want = *bytes, end, cur, in_cluster, host_cluster;
    uint64_t l2_index, e, bm;
    qcow2_subcluster_type t;
    void *table;
    int ret;

    if (want > cover - (offset & (cover - 1))) {
        want = cover - (offset & (cover - 1));
    }
    ret = qcow2_get_l2_table(s, offset, false, &table, &l2_index, err);
    if (ret < 0) {
        return ret;
    }
    if (!table) {
        *type = QCOW2_SC_UNALLOCATED_PLAIN;
        *host = 0;
        *bytes = want;
        return 0;
    }
    e = qcow2_get_l2_entry(s, table, l2_index);
    bm = qcow2_get_l2_bitmap(s, table, l2_index);
    t = qcow2_get_subcluster_type(s, e, bm, qcow2_offset_to_sc_index(s, offset));
    in_cluster = qcow2_offset_into_cluster(s, offset);
    host_cluster = e & QCOW2_L2E_OFFSET_MASK;
    if (t == QCOW2_SC_INVALID) {
        qcow2_cache_put(s->l2_cache, &table);
        return qcow2_signal_corruption(s, err, "Invalid cluster entry found "
                                       "(L2 offset: 0x%llx, L2 index: 0x%llx)",
                                       (unsigned long long)
                                       (s->l1_table[qcow2_offset_to_l1_index(s, offset)] &
                                        QCOW2_L1E_OFFSET_MASK),
                                       (unsigned long long)l2_index);
    }
    if (t == QCOW2_SC_COMPRESSED) {
        qcow2_cache_put(s->l2_cache, &table);
        if (has_data_file(s)) {
            return qcow2_signal_corruption(s, err, "Compressed cluster entry "
                                           "found in image with external "
                                           "data file (L2 index: 0x%llx)",
                                           (unsigned long long)l2_index);
        }
        *type = t;
        *host = e;
        *bytes = want < s->cluster_size - in_cluster ?
                 want : s->cluster_size - in_cluster;
        return 0;
    }
    if (type_has_host(t) && (host_cluster & (s->cluster_size - 1))) {
        qcow2_cache_put(s->l2_cache, &table);
        return qcow2_signal_corruption(s, err, "Cluster allocation offset "
                                       "0x%llx unaligned (L2 index: 0x%llx)",
                                       (unsigned long long)host_cluster,
                                       (unsigned long long)l2_index);
    }

    /* Extend over following subclusters with the same type and, for host
     * types, a contiguous host mapping. */
    end = offset + want;
    cur = (offset | (s->subcluster_size - 1)) + 1;
    while (cur < end) {
        uint64_t idx = qcow2_offset_to_l2_index(s, cur);
        uint64_t e2 = qcow2_get_l2_entry(s, table, idx);
        uint64_t bm2 = qcow2_get_l2_bitmap(s, table, idx);
        qcow2_subcluster_type t2 =
            qcow2_get_subcluster_type(s, e2, bm2, qcow2_offset_to_sc_index(s, cur));
        if (t2 == QCOW2_SC_INVALID) {
            /* QEMU's count_contiguous_subclusters() fails the whole
             * lookup on a bad entry inside the range asked for. */
            qcow2_cache_put(s->l2_cache, &table);
            return qcow2_signal_corruption(s, err, "Invalid cluster entry "
                                           "found  (L2 offset: %#llx, L2 "
                                           "index: %#llx)",
                                           (unsigned long long)
                                           (s->l1_table[qcow2_offset_to_l1_index(s, offset)] &
                                            QCOW2_L1E_OFFSET_MASK),
                                           (unsigned long long)idx);
        }
        if (t2 != t) {
            break;
        }
        if (type_has_host(t) &&
            (e2 & QCOW2_L2E_OFFSET_MASK) + qcow2_offset_into_cluster(s, cur) !=
            host_cluster + in_cluster + (cur - offset)) {
            break;
        }
        cur += s->subcluster_size;
    }
    qcow2_cache_put(s->l2_cache, &table);
    *type = t;
    *host = type_has_host(t) ? host_cluster + in_cluster : 0;
    *bytes = (cur < end ? cur : end) - offset;
    return 0;
}

/* ---- reads ---- */

int qcow2_co_preadv(qcow2_state *s, uint64_t off, uint64_t bytes,
                    vd_iov *qiov, size_t qiov_off, vd_error *err)
{
    uint8_t *cbuf = NULL;
    int ret = 0;

    while (bytes > 0) {
        uint64_t cur = bytes, host;
        qcow2_subcluster_type t;
        vd_iov slice;

        pthread_mutex_lock(&s->lock);
        ret = qcow2_get_host_offset(s, off, &cur, &host, &t, err);
        pthread_mutex_unlock(&s->lock);
        if (ret < 0) {
            break;
        }
        switch (t) {
        case QCOW2_SC_UNALLOCATED_PLAIN:
        case QCOW2_SC_UNALLOCATED_ALLOC:
            if (s->node->backing) {
                vd_node_debug_event(s->file->node,
                                    VD_BLKDBG_READ_BACKING_AIO);
                ret = vd_iov_init_slice(&slice, qiov, qiov_off, cur);
                if (ret == 0) {
                    ret = vd_child_preadv(s->node->backing, off, cur, &slice,
                                          0, err);
                    vd_iov_destroy(&slice);
                }
            } else {
                vd_iov_memset(qiov, qiov_off, 0, cur);
            }
            break;
        case QCOW2_SC_ZERO_PLAIN:
        case QCOW2_SC_ZERO_ALLOC:
            vd_iov_memset(qiov, qiov_off, 0, cur);
            break;
        case QCOW2_SC_COMPRESSED:
            if (!cbuf) {
                cbuf = vd_node_blockalign(s->node, s->cluster_size);
                if (!cbuf) {
                    ret = vd_error_set(err, -ENOMEM, "%s: out of memory",
                                       s->filename);
                    break;
                }
            }
            ret = qcow2_decompress_cluster(s, host, cbuf, err);
            if (ret == 0) {
                vd_iov_from_buf(qiov, qiov_off,
                                cbuf + qcow2_offset_into_cluster(s, off), cur);
            }
            break;
        case QCOW2_SC_NORMAL:
            vd_node_debug_event(s->file->node, VD_BLKDBG_READ_AIO);
            if (s->crypt) {
                ret = qcow2_crypt_read(s, host, off, cur, qiov, qiov_off,
                                       err);
                break;
            }
            ret = vd_iov_init_slice(&slice, qiov, qiov_off, cur);
            if (ret == 0) {
                ret = vd_child_preadv(s->data_file, host, cur, &slice, 0, err);
                vd_iov_destroy(&slice);
            }
            break;
        default:
            ret = -EIO;
            break;
        }
        if (ret < 0) {
            break;
        }
        off += cur;
        qiov_off += cur;
        bytes -= cur;
    }
    free(cbuf);
    return ret;
}

/* Reads guest [off, off+len) into @buf as the image currently maps it;
 * bytes past the virtual size read as zeros. */
static int read_guest(qcow2_state *s, uint64_t off, uint8_t *buf,
                      uint64_t len, vd_error *err)
{
    vd_iov v;
    uint64_t in = len;

    if (len == 0) {
        return 0;
    }
    if (off >= s->size) {
        memset(buf, 0, len);
        return 0;
    }
    if (off + len > s->size) {
        in = s->size - off;
        memset(buf + in, 0, len - in);
    }
    vd_iov_init_buf(&v, buf, in);
    return qcow2_co_preadv(s, off, in, &v, 0, err);
}

/* ---- in-flight allocations ---- */

static bool inflight_overlaps(qcow2_state *s, uint64_t first, uint64_t n)
{
    for (qcow2_inflight *f = s->inflight; f; f = f->next) {
        if (first < f->first_cluster + f->nb_clusters &&
            f->first_cluster < first + n) {
            return true;
        }
    }
    return false;
}

static void wait_inflight(qcow2_state *s, uint64_t first, uint64_t n)
{
    while (inflight_overlaps(s, first, n)) {
        pthread_cond_wait(&s->alloc_cond, &s->lock);
    }
}

/*
 * Waits until no allocation in flight touches a cluster of guest
 * [off, off+bytes). A decision taken on an L2 entry must be taken after
 * this wait and with the lock held since: the wait drops the lock, and
 * an allocation links its entry only when it ends. Lock held.
 */
static void wait_range_inflight(qcow2_state *s, uint64_t off, uint64_t bytes)
{
    uint64_t first = off >> s->cluster_bits;

    if (bytes > 0) {
        wait_inflight(s, first, ((off + bytes - 1) >> s->cluster_bits) -
                                first + 1);
    }
}

static void inflight_remove(qcow2_state *s, qcow2_inflight *f)
{
    for (qcow2_inflight **p = &s->inflight; *p; p = &(*p)->next) {
        if (*p == f) {
            *p = f->next;
            break;
        }
    }
    pthread_cond_broadcast(&s->alloc_cond);
}

/* With lazy refcounts an allocating write sets the dirty bit (once per
 * session) before its L2 entries may reach the disk ahead of their
 * refcounts; only allocating writes do, as QEMU's
 * qcow2_alloc_cluster_link_l2() (zero writes, discards and compressed
 * writes keep refcounts accurate on a clean image). */
static int mark_dirty_if_lazy(qcow2_state *s, vd_error *err)
{
    if (s->lazy_refcounts && !s->dirty_marked) {
        return qcow2_mark_dirty(s, err);
    }
    return 0;
}

/* ---- the file's zero tail ---- */

/*
 * Where the image file reads as zeros from, as far as this session
 * knows: everything written to it since the open lies in a cluster
 * given a refcount in the session (below alloc_end) or made the file
 * longer; the tail grow_ahead() added holds nothing. A new data cluster
 * at or past this offset need not be zeroed around its guest data
 * (UINT64_MAX: unknown, zero everything). Lock held.
 */
static uint64_t file_zero_from(qcow2_state *s)
{
    int64_t flen = vd_node_getlength(s->file->node);
    uint64_t z = s->alloc_end << s->cluster_bits, f;

    if (flen < 0 || has_data_file(s)) {
        return UINT64_MAX;
    }
    f = (uint64_t)flen;
    if (s->grown_to && f == s->grown_to) {
        f = s->grown_from;
    }
    return f > z ? f : z;
}

/* How far ahead of the allocation the file is grown at a time, and
 * after how many clusters allocated past its end in the session: a
 * session that allocates a few clusters leaves the file (also after a
 * crash) as QEMU's would be, byte for byte. */
#define GROW_STEP (32ull << 20)
#define GROW_AFTER 64

/*
 * Makes the file at least @end long, growing it ahead by GROW_STEP with
 * a zero write that may not fall back to writing buffers (fallocate: the
 * file system allocates the tail in large extents that read as zeros,
 * as QEMU's preallocate filter does), so that guest data written to new
 * clusters past its end does not make the file system extend the file
 * on every write, and the rest of such a cluster is allocated as in
 * QEMU's image (where it is zeroed): qemu-img map shows it as data.
 * @zero_from is file_zero_from() before the allocation that reaches
 * @end. The new length is past every cluster given a refcount, so no
 * write in flight can lie beyond it and be cut. A failure only costs the
 * speed. qcow2_trim_grown() gives the tail back at close. Only a file
 * node whose driver says it grows so (grows_ahead: the file driver, and
 * blkdebug over it) is grown, and not one in memory (bl.memory_backed:
 * on tmpfs each 32 MiB step was a 6 ms fallocate under the lock, while
 * the pages cost the same when the writes allocate them; a convert from
 * rbd into a qcow2 on /dev/shm stalled its in-order writer 24 times per
 * GiB). Lock held.
 */
static void grow_ahead(qcow2_state *s, uint64_t zero_from, uint64_t end)
{
    int64_t flen = vd_node_getlength(s->file->node);
    uint64_t target, start;

    if (flen < 0 || end <= (uint64_t)flen ||
        !s->file->node->drv->grows_ahead || s->file->node->bl.memory_backed) {
        return;
    }
    if ((s->alloc_end << s->cluster_bits) > end) {
        end = s->alloc_end << s->cluster_bits;
    }
    target = (end + GROW_STEP - 1) & ~(GROW_STEP - 1);
    /* The zero write starts past every cluster given a refcount, not at
     * the file's end: a cluster allocated before (past the end then)
     * may have its data write in flight, outside the lock, and zeroing
     * from the end wiped it when it landed first (an active commit lost
     * a 1 MiB piece so). Between the two the file stays a hole until
     * those writes land: zeros too. */
    start = s->alloc_end << s->cluster_bits;
    if (start < (uint64_t)flen) {
        start = (uint64_t)flen;
    }
    if (target > QCOW2_MAX_HOST_OFFSET || start >= target) {
        return;
    }
    if (!s->grown_to || (uint64_t)flen != s->grown_to) {
        s->grown_from = zero_from;
    }
    if (vd_node_pwrite_zeroes(s->file->node, start, target - start,
                              VD_REQ_NO_FALLBACK, NULL) == 0 &&
        vd_node_getlength(s->file->node) == (int64_t)target) {
        s->grown_to = target;
    } else {
        s->grown_to = 0;
    }
}

/* At close: cuts the tail grow_ahead() added back to the end of the
 * last cluster (or of what the file held before), as QEMU's image
 * would end. Requests are over (no lock needed). */
void qcow2_trim_grown(qcow2_state *s)
{
    int64_t flen = vd_node_getlength(s->file->node);
    uint64_t keep = s->alloc_end << s->cluster_bits;

    if (!s->grown_to || flen < 0 || (uint64_t)flen != s->grown_to) {
        return;
    }
    if (s->grown_from > keep) {
        keep = s->grown_from;
    }
    if (keep < (uint64_t)flen) {
        (void)vd_node_truncate(s->file->node, keep, false, VD_PREALLOC_OFF,
                               NULL);
    }
    s->grown_to = 0;
}

/* ---- writes ---- */

/* Whether extended L2 bitmap @bm contradicts itself or its entry (QEMU's
 * QCOW2_SUBCLUSTER_INVALID for some subcluster). */
static bool bitmap_invalid(const qcow2_state *s, uint64_t e, uint64_t bm)
{
    bool has_host = (e & QCOW2_L2E_OFFSET_MASK) ||
                    ((e & QCOW2_OFLAG_COPIED) && has_data_file(s));
    return s->extended_l2 && !(e & QCOW2_OFLAG_COMPRESSED) &&
           (((bm >> 32) & bm & QCOW2_L2B_ALLOC_MASK) ||
            (!has_host && (bm & QCOW2_L2B_ALLOC_MASK)));
}

/* Whether a write may use L2 entry @e: no contradictory bits, and a data
 * cluster that is aligned and, in the image file, starts inside it. */
static bool write_entry_sane(qcow2_state *s, uint64_t e, uint64_t bm)
{
    uint64_t host = e & QCOW2_L2E_OFFSET_MASK;

    if (e & QCOW2_OFLAG_COMPRESSED) {
        return true;
    }
    if (bitmap_invalid(s, e, bm) || (host & (s->cluster_size - 1))) {
        return false;
    }
    return !host || has_data_file(s) ||
           (int64_t)host < vd_node_getlength(s->file->node);
}

/*
 * Before a write uses L2 entry @e (index @idx of the table at @l2_off)
 * for guest offset @guest. The faults QEMU's write path reports as
 * corruption events (contradictory subcluster bits; a data offset that
 * is not cluster-aligned) are corruption events here, with its messages;
 * a data cluster past the end of the file is refused without a write
 * (writing there would grow the file out to a corrupt offset). Lock held.
 */
static int check_write_entry(qcow2_state *s, uint64_t e, uint64_t bm,
                             uint64_t l2_off, uint64_t idx, uint64_t guest,
                             vd_error *err)
{
    uint64_t host = e & QCOW2_L2E_OFFSET_MASK;
    int64_t flen;

    if (e & QCOW2_OFLAG_COMPRESSED) {
        return 0;
    }
    if (bitmap_invalid(s, e, bm)) {
        return qcow2_signal_corruption(s, err, "Invalid cluster entry found "
                                       "(L2 offset: %#llx, L2 index: %#llx)",
                                       (unsigned long long)l2_off,
                                       (unsigned long long)idx);
    }
    if (host & (s->cluster_size - 1)) {
        /* QEMU signals this for a cluster it would write in place; a
         * cluster it would copy is only refused here. */
        if (e & QCOW2_OFLAG_COPIED) {
            return qcow2_signal_corruption(s, err, "Data cluster offset "
                                           "%#llx unaligned (guest offset: "
                                           "%#llx)", (unsigned long long)host,
                                           (unsigned long long)guest);
        }
        return vd_error_set(err, -EIO, "%s: Data cluster offset %#llx "
                            "unaligned (guest offset: %#llx)", s->filename,
                            (unsigned long long)host,
                            (unsigned long long)guest);
    }
    if (!host || has_data_file(s)) {
        return 0;
    }
    flen = vd_node_getlength(s->file->node);
    if (flen >= 0 && host >= (uint64_t)flen) {
        return vd_error_set(err, -EIO, "%s: the data cluster at 0x%llx "
                            "(guest offset 0x%llx) lies outside the file "
                            "(length 0x%llx)", s->filename,
                            (unsigned long long)host,
                            (unsigned long long)guest,
                            (unsigned long long)flen);
    }
    return 0;
}

/* Whether guest [off, off+len) (inside one cluster) can be written in
 * place: the cluster is ours alone and every touched subcluster holds
 * data. */
static bool can_write_in_place(qcow2_state *s, uint64_t e, uint64_t bm,
                               uint64_t off, uint64_t len)
{
    if (e & QCOW2_OFLAG_COMPRESSED) {
        return false;
    }
    if (!(e & QCOW2_OFLAG_COPIED)) {
        return false;
    }
    for (uint64_t o = off; o < off + len;
         o = (o | (s->subcluster_size - 1)) + 1) {
        if (qcow2_get_subcluster_type(s, e, bm, qcow2_offset_to_sc_index(s, o))
            != QCOW2_SC_NORMAL) {
            return false;
        }
    }
    return true;
}

/* A cluster that is ours alone (COPIED) and has a host cluster but parts
 * without data is filled in place, keeping its host cluster, as QEMU's
 * handle_copied() does: with extended L2 subcluster by subcluster, and
 * without it a preallocated zero cluster (ZERO_ALLOC). */
static bool can_fill_in_place(qcow2_state *s, uint64_t e, uint64_t bm)
{
    qcow2_subcluster_type t;
    if ((e & QCOW2_OFLAG_COMPRESSED) || !(e & QCOW2_OFLAG_COPIED)) {
        return false;
    }
    if (!s->extended_l2) {
        return qcow2_get_subcluster_type(s, e, 0, 0) == QCOW2_SC_ZERO_ALLOC;
    }
    t = qcow2_get_subcluster_type(s, e, bm, 0);
    return t != QCOW2_SC_INVALID && type_has_host(t);
}

/* Bitmap of the subclusters touched by cluster-relative [start, end). */
static uint64_t sc_range_bits(qcow2_state *s, uint64_t start, uint64_t end)
{
    uint64_t first = start >> s->subcluster_bits;
    uint64_t last = (end - 1) >> s->subcluster_bits;
    uint64_t bits = 0;
    for (uint64_t i = first; i <= last && i < 32; i++) {
        bits |= 1ull << i;
    }
    return bits;
}

/*
 * Whether the copy-on-write areas of an allocation, guest [a0, a1) and
 * [b0, b1), read as zeros by block status alone, each as one extent
 * (QEMU's is_zero_cow() with bdrv_co_is_zero_fast()). Lock not held.
 */
static bool cow_reads_zero(qcow2_state *s, uint64_t a0, uint64_t a1,
                           uint64_t b0, uint64_t b1)
{
    uint64_t r[2][2] = { { a0, a1 }, { b0, b1 } };

    for (int i = 0; i < 2; i++) {
        uint64_t n = 0, map = 0, len = r[i][1] - r[i][0];
        vd_node *file = NULL;
        int depth = 0, st;

        if (len == 0) {
            continue;
        }
        st = vd_node_block_status_above(s->node, NULL, false, r[i][0], len,
                                        &n, &map, &file, &depth, NULL);
        if (st < 0 || !(st & VD_BLOCK_ZERO) || n != len) {
            return false;
        }
    }
    return true;
}

/*
 * One step of a write: at most the clusters of one L2 table. Writes in
 * place or allocates (see the design note at the top). *done receives the
 * number of bytes handled. *hint is the host offset right after the
 * previous step of the same request when that step ended on a cluster
 * boundary (0: none): an allocation tries to continue there first, as
 * QEMU's qcow2_alloc_host_offset() keeps a request's clusters
 * contiguous; the step leaves its own end there.
 */
/* Where a write's guest data comes from: @qiov (from byte @qoff), or,
 * for copy offloading, node @copy_from at @copy_off (+ the same @qoff). */
typedef struct write_src {
    vd_iov *qiov;
    vd_node *copy_from;
    uint64_t copy_off;
} write_src;

/* Writes @len bytes of the data of @src (from its byte @qoff) to host
 * @host of the data file. */
static int write_data(qcow2_state *s, const write_src *src, size_t qoff,
                      uint64_t host, uint64_t len, unsigned flags,
                      vd_error *err)
{
    vd_iov slice;
    int ret;

    if (src->copy_from) {
        return vd_node_copy_range_to(src->copy_from, src->copy_off + qoff,
                                     s->data_file->node, host, len, 0, err);
    }
    if (s->crypt) {
        return qcow2_crypt_pwritev(s, host, len, src->qiov, qoff, flags,
                                   err);
    }
    ret = vd_iov_init_slice(&slice, src->qiov, qoff, len);
    if (ret == 0) {
        ret = vd_child_pwritev(s->data_file, host, len, &slice,
                               flags & VD_REQ_FUA, err);
        vd_iov_destroy(&slice);
    }
    return ret;
}

static int write_step(qcow2_state *s, uint64_t off, uint64_t bytes,
                      const write_src *src, size_t qoff, unsigned flags,
                      uint64_t *hint, uint64_t *done, vd_error *err)
{
    uint64_t cs = s->cluster_size;
    uint64_t cover = cs << s->l2_bits;
    uint64_t chunk = bytes, first_cluster, n, covered, l2_index;
    uint64_t in0 = qcow2_offset_into_cluster(s, off);
    uint64_t e0, bm0, host_base, cow_start, cow_end, l2_off;
    uint64_t *olds = NULL;
    bool fill = false, allocated = false, skip_cow = false, fresh = false;
    qcow2_inflight inflight;
    uint8_t *head = NULL, *tail = NULL;
    void *table = NULL;
    vd_iov wv;
    int ret;

    if (chunk > cover - (off & (cover - 1))) {
        chunk = cover - (off & (cover - 1));
    }
    first_cluster = off >> s->cluster_bits;

    pthread_mutex_lock(&s->lock);
    wait_inflight(s, first_cluster,
                  ((off + chunk - 1) >> s->cluster_bits) - first_cluster + 1);
    ret = qcow2_get_l2_table(s, off, true, &table, &l2_index, err);
    if (ret < 0) {
        goto out_unlock;
    }
    e0 = qcow2_get_l2_entry(s, table, l2_index);
    bm0 = qcow2_get_l2_bitmap(s, table, l2_index);
    covered = chunk < cs - in0 ? chunk : cs - in0;
    l2_off = s->l1_table[qcow2_offset_to_l1_index(s, off)] &
             QCOW2_L1E_OFFSET_MASK;
    ret = check_write_entry(s, e0, bm0, l2_off, l2_index, off, err);
    if (ret < 0) {
        goto out_unlock;
    }

    if (can_write_in_place(s, e0, bm0, off, covered)) {
        uint64_t host = (e0 & QCOW2_L2E_OFFSET_MASK) + in0;
        for (n = 1; covered < chunk; n++) {
            uint64_t e = qcow2_get_l2_entry(s, table, l2_index + n);
            uint64_t bm = qcow2_get_l2_bitmap(s, table, l2_index + n);
            uint64_t len = chunk - covered < cs ? chunk - covered : cs;
            /* A bad entry ends the run; the next step reports it. */
            if (!write_entry_sane(s, e, bm) ||
                !can_write_in_place(s, e, bm, off + covered, len) ||
                (e & QCOW2_L2E_OFFSET_MASK) !=
                (e0 & QCOW2_L2E_OFFSET_MASK) + n * cs) {
                break;
            }
            covered += len;
        }
        qcow2_cache_put(s->l2_cache, &table);
        /* Even a write in place trusts the L1 and L2 tables that led
         * here: the structures are validated before the first write of
         * the session (a cached verdict afterwards). */
        ret = qcow2_begin_change(s, err);
        if (ret == 0) {
            ret = qcow2_pre_write_overlap_check(s, 0, host, covered, true,
                                                err);
        }
        pthread_mutex_unlock(&s->lock);
        if (ret < 0) {
            return ret;
        }
        vd_node_debug_event(s->file->node, VD_BLKDBG_WRITE_AIO);
        ret = write_data(s, src, qoff, host, covered, flags, err);
        *hint = ((off + covered) & (cs - 1)) ? 0 : host + covered;
        *done = covered;
        return ret;
    }

    /* Allocating: the structures the allocation relies on first. */
    ret = qcow2_validate_metadata(s, err);
    if (ret < 0) {
        goto out_unlock;
    }
    if (can_fill_in_place(s, e0, bm0)) {
        fill = true;
        n = 1;
        host_base = e0 & QCOW2_L2E_OFFSET_MASK;
    } else {
        for (n = 1; covered < chunk; n++) {
            uint64_t e = qcow2_get_l2_entry(s, table, l2_index + n);
            uint64_t bm = qcow2_get_l2_bitmap(s, table, l2_index + n);
            uint64_t len = chunk - covered < cs ? chunk - covered : cs;
            if (!write_entry_sane(s, e, bm) ||
                can_write_in_place(s, e, bm, off + covered, len) ||
                can_fill_in_place(s, e, bm)) {
                break;
            }
            covered += len;
        }
        /* The old clusters are read for copy-on-write and then freed:
         * each must be what its entry says before anything is written. */
        if (!has_data_file(s)) {
            int64_t flen = vd_node_getlength(s->file->node);
            for (uint64_t i = 0; ret == 0 && i < n; i++) {
                ret = qcow2_validate_cluster_ref(
                    s, qcow2_get_l2_entry(s, table, l2_index + i), l2_off,
                    l2_index + i, 0, flen < 0 ? 0 : (uint64_t)flen, err);
            }
            if (ret < 0) {
                goto out_unlock;
            }
        }
    }
    /* Validated: from here on the change is written. */
    ret = qcow2_begin_change(s, err);
    if (ret == 0) {
        ret = mark_dirty_if_lazy(s, err);
    }
    if (ret < 0) {
        goto out_unlock;
    }
    if (!fill) {
        if (has_data_file(s)) {
            host_base = first_cluster << s->cluster_bits;
        } else {
            int64_t h = -1, k = 0;
            uint64_t zero_from = file_zero_from(s);
            if (*hint) {
                k = qcow2_alloc_clusters_at(s, *hint, n, err);
                if (k < 0) {
                    ret = (int)k;
                    goto out_unlock;
                }
            }
            if (k > 0) {
                /* The run continues the previous step's clusters. */
                h = (int64_t)*hint;
                if ((uint64_t)k < n) {
                    n = (uint64_t)k;
                    covered = (cs - in0) + (n - 1) * cs;
                    if (covered > chunk) {
                        covered = chunk;
                    }
                }
            } else {
                h = qcow2_alloc_clusters(s, n * cs, err);
            }
            if (h < 0) {
                ret = (int)h;
                goto out_unlock;
            }
            host_base = (uint64_t)h;
            allocated = true;
            /* Inside the tail grown ahead and past everything the file
             * held: it reads as zeros, only the guest data is written. */
            if (host_base >= zero_from) {
                s->fresh_clusters += n;
                if (s->fresh_clusters > GROW_AFTER) {
                    grow_ahead(s, zero_from, host_base + n * cs);
                }
                fresh = s->grown_to && host_base + n * cs <= s->grown_to &&
                        vd_node_getlength(s->file->node) ==
                        (int64_t)s->grown_to;
            }
        }
    }
    /* A corrupt L2 entry or refcount may point the data at metadata. */
    ret = qcow2_pre_write_overlap_check(s, 0, host_base, n * cs, true, err);
    if (ret < 0) {
        goto out_unlock;
    }
    olds = malloc(n * 2 * sizeof(uint64_t));
    if (!olds) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
        goto out_unlock;
    }
    for (uint64_t i = 0; i < n; i++) {
        olds[2 * i] = qcow2_get_l2_entry(s, table, l2_index + i);
        olds[2 * i + 1] = qcow2_get_l2_bitmap(s, table, l2_index + i);
    }
    qcow2_cache_put(s->l2_cache, &table);
    inflight = (qcow2_inflight){ first_cluster, n, s->inflight };
    s->inflight = &inflight;
    pthread_mutex_unlock(&s->lock);

    /* Copy-on-write bounds, guest offsets. Without subclusters, or when
     * the old cluster had data elsewhere, the whole first and last
     * clusters are written; with subclusters only the touched ones. */
    {
        uint64_t c0 = first_cluster << s->cluster_bits;
        uint64_t clast = c0 + (n - 1) * cs;
        uint64_t end = off + covered;
        uint64_t el = olds[2 * (n - 1)];
        bool whole0 = !s->extended_l2 ||
                      (!fill && ((olds[0] & QCOW2_OFLAG_COMPRESSED) ||
                                 (olds[0] & QCOW2_L2E_OFFSET_MASK)));
        bool whole_last = !s->extended_l2 ||
                          (!fill && ((el & QCOW2_OFLAG_COMPRESSED) ||
                                     (el & QCOW2_L2E_OFFSET_MASK)));
        cow_start = whole0 ? c0 : off & ~(s->subcluster_size - 1);
        cow_end = whole_last ? clast + cs
                             : ((end - 1) | (s->subcluster_size - 1)) + 1;
        if (fill) {
            /* Subclusters that already hold data are not rewritten: an
             * in-place writer may be updating them right now. */
            if (cow_start < off &&
                qcow2_get_subcluster_type(s, olds[0], olds[1],
                                          qcow2_offset_to_sc_index(s, off)) ==
                QCOW2_SC_NORMAL) {
                cow_start = off;
            }
            if (cow_end > end &&
                qcow2_get_subcluster_type(s, olds[0], olds[1],
                                          qcow2_offset_to_sc_index(s, end - 1)) ==
                QCOW2_SC_NORMAL) {
                cow_end = end;
            }
        }
    }

    /* QEMU's handle_alloc_space(): when the copy-on-write areas read as
     * zeros, the whole range is zeroed in the file efficiently (no data
     * crosses the bus) and only the guest data is written. QEMU's
     * events: cluster_alloc_space when it tries, else (or when the file
     * cannot zero efficiently) cow_read for each area read, then
     * write_aio for the guest data and cow_write with it. */
    bool has_cow = cow_start < off || cow_end > off + covered;
    /* Not when encrypted: zeros in the file read as garbage (QEMU skips
     * this for encrypted images too). */
    if (!src->copy_from && has_cow && !s->crypt &&
        cow_reads_zero(s, cow_start, off, off + covered, cow_end)) {
        vd_error zerr = VD_ERROR_INIT;
        uint64_t zoff = host_base + (cow_start - (first_cluster <<
                                                  s->cluster_bits));
        vd_node_debug_event(s->file->node, VD_BLKDBG_CLUSTER_ALLOC_SPACE);
        /* New clusters in the tail grown ahead read as zeros already:
         * only the guest data is written (no fallocate per cluster,
         * which on ext4 costs more than the data write). */
        ret = fresh ? 0 : vd_node_pwrite_zeroes(s->data_file->node, zoff,
                                                cow_end - cow_start,
                                                VD_REQ_NO_FALLBACK, &zerr);
        if (ret == 0) {
            skip_cow = true;
        } else if (ret == -ENOTSUP || ret == -EAGAIN) {
            ret = 0;
        } else {
            vd_error_set(err, ret, "%s", zerr.message);
        }
    }

    vd_iov_init(&wv);
    if (ret == 0 && !skip_cow && cow_start < off) {
        vd_node_debug_event(s->file->node, VD_BLKDBG_COW_READ);
        head = vd_node_blockalign(s->node, off - cow_start);
        ret = head ? read_guest(s, cow_start, head, off - cow_start, err)
                   : -ENOMEM;
        if (ret == 0) {
            ret = vd_iov_add(&wv, head, off - cow_start);
        }
    }
    if (ret == 0 && !src->copy_from) {
        vd_iov slice;
        ret = vd_iov_init_slice(&slice, src->qiov, qoff, covered);
        for (int i = 0; ret == 0 && i < slice.niov; i++) {
            ret = vd_iov_add(&wv, slice.iov[i].iov_base, slice.iov[i].iov_len);
        }
        vd_iov_destroy(&slice);
    }
    if (ret == 0 && src->copy_from) {
        /* The copy-on-write head first, then the offloaded copy; the
         * tail below. */
        uint64_t c0 = first_cluster << s->cluster_bits;
        if (wv.size) {
            ret = vd_child_pwritev(s->data_file, host_base + (cow_start - c0),
                                   wv.size, &wv, 0, err);
        }
        if (ret == 0) {
            vd_node_debug_event(s->file->node, VD_BLKDBG_WRITE_AIO);
            ret = write_data(s, src, qoff, host_base + (off - c0), covered,
                             flags, err);
        }
        vd_iov_destroy(&wv);
        vd_iov_init(&wv);
    }
    if (ret == 0 && !skip_cow && cow_end > off + covered) {
        uint64_t tl = cow_end - (off + covered);
        vd_node_debug_event(s->file->node, VD_BLKDBG_COW_READ);
        tail = vd_node_blockalign(s->node, tl);
        ret = tail ? read_guest(s, off + covered, tail, tl, err) : -ENOMEM;
        if (ret == 0) {
            ret = vd_iov_add(&wv, tail, tl);
        }
    }
    if (ret == 0 && wv.size) {
        uint64_t c0 = first_cluster << s->cluster_bits;
        uint64_t host = host_base +
                        (src->copy_from ? off + covered - c0 :
                         (skip_cow ? off : cow_start) - c0);
        if (!src->copy_from) {
            vd_node_debug_event(s->file->node, VD_BLKDBG_WRITE_AIO);
        }
        if (has_cow && !skip_cow) {
            vd_node_debug_event(s->file->node, VD_BLKDBG_COW_WRITE);
        }
        /* Encrypted: the copy-on-write areas, read (decrypted) from
         * the old place, are encrypted for this host offset. */
        ret = s->crypt ? qcow2_crypt_pwritev(s, host, wv.size, &wv, 0,
                                             flags, err)
                       : vd_child_pwritev(s->data_file, host, wv.size, &wv,
                                          flags & VD_REQ_FUA, err);
    }
    vd_iov_destroy(&wv);
    free(head);
    free(tail);

    pthread_mutex_lock(&s->lock);
    if (ret < 0) {
        if (allocated) {
            qcow2_free_clusters(s, host_base, n * cs, QCOW2_DISCARD_NEVER,
                                NULL);
        }
        inflight_remove(s, &inflight);
        goto out_unlock;
    }
    ret = qcow2_get_l2_table(s, off, true, &table, &l2_index, err);
    if (ret < 0) {
        inflight_remove(s, &inflight);
        goto out_unlock;
    }
    if (qcow2_need_accurate_refcounts(s)) {
        ret = qcow2_cache_set_dependency(s, s->l2_cache, s->refcount_cache,
                                         err);
        if (ret < 0) {
            inflight_remove(s, &inflight);
            goto out_unlock;
        }
    }
    for (uint64_t i = 0; i < n; i++) {
        uint64_t c_guest = (first_cluster + i) << s->cluster_bits;
        uint64_t old = olds[2 * i], old_bm = olds[2 * i + 1];
        uint64_t entry = (host_base + i * cs) | QCOW2_OFLAG_COPIED;
        uint64_t bm = 0;
        if (s->extended_l2) {
            uint64_t ws = cow_start > c_guest ? cow_start - c_guest : 0;
            uint64_t we = cow_end < c_guest + cs ? cow_end - c_guest : cs;
            uint64_t bits = sc_range_bits(s, ws, we);
            if (fill) {
                entry = old;
                bm = (old_bm | bits) & ~(bits << 32);
            } else if ((old & QCOW2_OFLAG_COMPRESSED) ||
                       (old & QCOW2_L2E_OFFSET_MASK)) {
                bm = QCOW2_L2B_ALLOC_MASK;
            } else {
                bm = (old_bm & QCOW2_L2B_ZERO_MASK & ~(bits << 32)) | bits;
            }
        }
        qcow2_set_l2_entry(s, table, l2_index + i, entry);
        qcow2_set_l2_bitmap(s, table, l2_index + i, bm);
    }
    qcow2_cache_mark_dirty(s->l2_cache, table);
    qcow2_cache_put(s->l2_cache, &table);
    if (!fill && !has_data_file(s)) {
        for (uint64_t i = 0; i < n; i++) {
            int r = qcow2_free_any_cluster(s, olds[2 * i], QCOW2_DISCARD_OTHER,
                                           NULL);
            (void)r; /* a failed free leaks a cluster, nothing worse */
        }
    }
    inflight_remove(s, &inflight);
    if (flags & VD_REQ_FUA) {
        ret = qcow2_flush_caches(s, err);
    }
    *hint = ((off + covered) & (cs - 1)) ? 0 : host_base + n * cs;
    *done = covered;

out_unlock:
    if (table) {
        qcow2_cache_put(s->l2_cache, &table);
    }
    pthread_mutex_unlock(&s->lock);
    free(olds);
    return ret;
}

/* A whole write, step by step (each step at most one L2 table). */
static int write_all(qcow2_state *s, uint64_t off, uint64_t bytes,
                     const write_src *src, unsigned flags, vd_error *err)
{
    uint64_t hint = 0;
    size_t qoff = 0;

    while (bytes > 0) {
        uint64_t done = 0;
        int ret = write_step(s, off, bytes, src, qoff, flags, &hint, &done,
                             err);
        if (ret < 0) {
            return ret;
        }
        off += done;
        qoff += done;
        bytes -= done;
    }
    return 0;
}

int qcow2_co_pwritev(qcow2_state *s, uint64_t off, uint64_t bytes,
                     vd_iov *qiov, unsigned flags, vd_error *err)
{
    if (flags & VD_REQ_COMPRESSED) {
        return qcow2_co_pwritev_compressed(s, off, bytes, qiov, err);
    }
    return write_all(s, off, bytes, &(write_src){ .qiov = qiov }, flags,
                     err);
}

int qcow2_co_copy_range_to(qcow2_state *s, vd_node *src, uint64_t soff,
                           uint64_t doff, uint64_t bytes, vd_error *err)
{
    if (s->crypt) {
        return -ENOTSUP;        /* the data must be encrypted on the way */
    }
    return write_all(s, doff, bytes,
                     &(write_src){ .copy_from = src, .copy_off = soff }, 0,
                     err);
}

/*
 * QEMU's qcow2_co_copy_range_from(): each piece of the range goes to
 * where its data lives (the data file, or the backing file where it is
 * unallocated), becomes a zero write where it reads as zeros, and a
 * compressed cluster cannot be offloaded (-ENOTSUP).
 */
int qcow2_co_copy_range_from(qcow2_state *s, uint64_t soff, vd_node *dst,
                             uint64_t doff, uint64_t bytes, vd_error *err)
{
    while (bytes > 0) {
        uint64_t cur = bytes, host = 0, copy_off = soff;
        qcow2_subcluster_type t;
        vd_node *child = NULL;
        unsigned flags = 0;
        int ret;

        pthread_mutex_lock(&s->lock);
        ret = qcow2_get_host_offset(s, soff, &cur, &host, &t, err);
        pthread_mutex_unlock(&s->lock);
        if (ret < 0) {
            return ret;
        }
        switch (t) {
        case QCOW2_SC_UNALLOCATED_PLAIN:
        case QCOW2_SC_UNALLOCATED_ALLOC:
            if (s->node->backing) {
                int64_t blen = vd_node_getlength(s->node->backing->node);
                if (blen >= 0 && soff >= (uint64_t)blen) {
                    flags = VD_REQ_ZERO_WRITE;
                } else {
                    child = s->node->backing->node;
                    if (blen >= 0 && cur > (uint64_t)blen - soff) {
                        cur = (uint64_t)blen - soff;
                    }
                }
            } else {
                flags = VD_REQ_ZERO_WRITE;
            }
            break;
        case QCOW2_SC_ZERO_PLAIN:
        case QCOW2_SC_ZERO_ALLOC:
            flags = VD_REQ_ZERO_WRITE;
            break;
        case QCOW2_SC_NORMAL:
            if (s->crypt) {
                return -ENOTSUP;        /* ciphertext in the file */
            }
            child = s->data_file->node;
            copy_off = host;
            break;
        default:
            return -ENOTSUP;
        }
        ret = vd_node_copy_range_from(child, copy_off, dst, doff, cur, flags,
                                      err);
        if (ret < 0) {
            return ret;
        }
        soff += cur;
        doff += cur;
        bytes -= cur;
    }
    return 0;
}

/* One cluster of a compressed write: the guest bytes (the last cluster
 * of the image may be short; the rest of @in is zeros), and what the
 * codec made of them (ret -ENOSPC: incompressible). */
typedef struct compressed_cluster {
    uint64_t off, bytes;
    uint8_t *in, *out;
    size_t out_len;
    int ret;
    bool ready;                 /* compressed, not stored yet */
} compressed_cluster;

/*
 * A compressed write of @n clusters as a stream: every thread (helpers
 * and the caller) takes the next cluster and compresses it into a slot,
 * and the caller stores the clusters in guest order as their slots
 * become ready, compressing one itself when the next to store is not
 * ready yet. Cluster i uses slot i % nslots, so at most nslots clusters
 * are compressed ahead of the one being stored; no thread waits for the
 * slowest cluster of a batch, and storing overlaps compressing.
 */
typedef struct compress_job {
    qcow2_state *s;
    vd_iov *qiov;
    uint64_t off, bytes;        /* the request */
    compressed_cluster *c;
    size_t nslots, n;
    size_t claimed;             /* clusters handed out to compress */
    size_t stored;              /* clusters stored (in order) */
    bool stop;                  /* the write failed: compress no more */
    pthread_mutex_t lock;
    pthread_cond_t stored_cond; /* a slot came free, or stop */
    pthread_cond_t ready_cond;  /* the next cluster to store is ready */
} compress_job;

/* Cluster @i of @job into its slot with this thread's @cz (job lock not
 * held: the slot is this thread's until it is marked ready). */
static void compress_one(compress_job *job, size_t i, qcow2_compressor *cz)
{
    uint64_t cs = job->s->cluster_size, pos = (uint64_t)i * cs;
    compressed_cluster *c = &job->c[i % job->nslots];

    c->off = job->off + pos;
    c->bytes = job->bytes - pos < cs ? job->bytes - pos : cs;
    memset(c->in + c->bytes, 0, cs - c->bytes);
    vd_iov_to_buf(job->qiov, pos, c->in, c->bytes);
    c->ret = qcow2_compress_cluster(job->s, cz, c->in, c->out, cs,
                                    &c->out_len);
}

/* Whether a cluster can be handed out to compress. Job lock held. */
static bool compress_claimable(const compress_job *job)
{
    return !job->stop && job->claimed < job->n &&
           job->claimed < job->stored + job->nslots;
}

/* Job lock held, dropped while compressing. */
static void compress_claimed(compress_job *job, qcow2_compressor *cz)
{
    size_t i = job->claimed++;

    pthread_mutex_unlock(&job->lock);
    compress_one(job, i, cz);
    pthread_mutex_lock(&job->lock);
    job->c[i % job->nslots].ready = true;
    if (i == job->stored) {
        pthread_cond_signal(&job->ready_cond);
    }
}

static void *compress_helper(void *opaque)
{
    compress_job *job = opaque;
    qcow2_compressor *cz = qcow2_compressor_new();

    pthread_mutex_lock(&job->lock);
    while (!job->stop && job->claimed < job->n) {
        if (compress_claimable(job)) {
            compress_claimed(job, cz);
        } else {
            pthread_cond_wait(&job->stored_cond, &job->lock);
        }
    }
    pthread_mutex_unlock(&job->lock);
    qcow2_compressor_free(cz);
    return NULL;
}

/* Stores one compressed cluster: a byte range allocated for its data,
 * the data written, then the L2 entry (refcounts before L2, as QEMU). */
static int store_compressed(qcow2_state *s, const compressed_cluster *c,
                            vd_error *err)
{
    const uint8_t *out = c->out;
    size_t out_len = c->out_len;
    uint64_t off = c->off;
    uint64_t l2_index, old, entry;
    int64_t coff = -1;
    qcow2_inflight inflight;
    void *table = NULL;
    int ret;

    pthread_mutex_lock(&s->lock);
    wait_inflight(s, off >> s->cluster_bits, 1);
    /* The old cluster is freed below: it must be what the entry says. */
    ret = qcow2_validate_metadata(s, err);
    if (ret == 0) {
        ret = qcow2_validate_guest_range(s, off, 1, err);
    }
    if (ret == 0) {
        ret = qcow2_begin_change(s, err);
    }
    if (ret == 0) {
        ret = qcow2_get_l2_table(s, off, true, &table, &l2_index, err);
    }
    if (ret < 0) {
        pthread_mutex_unlock(&s->lock);
        return ret;
    }
    old = qcow2_get_l2_entry(s, table, l2_index);
    qcow2_cache_put(s->l2_cache, &table);
    coff = qcow2_alloc_bytes(s, out_len, err);
    if (coff < 0) {
        ret = (int)coff;
        pthread_mutex_unlock(&s->lock);
        return ret;
    }
    vd_node_debug_event(s->file->node, VD_BLKDBG_L2_UPDATE_COMPRESSED);
    inflight = (qcow2_inflight){ off >> s->cluster_bits, 1, s->inflight };
    s->inflight = &inflight;
    ret = qcow2_pre_write_overlap_check(s, 0, (uint64_t)coff, out_len, false,
                                        err);
    pthread_mutex_unlock(&s->lock);

    if (ret == 0) {
        vd_node_debug_event(s->data_file->node, VD_BLKDBG_WRITE_COMPRESSED);
        ret = vd_child_pwrite(s->file, (uint64_t)coff, out, out_len, 0, err);
    }

    pthread_mutex_lock(&s->lock);
    if (ret == 0) {
        ret = qcow2_get_l2_table(s, off, true, &table, &l2_index, err);
    }
    if (ret == 0 && qcow2_need_accurate_refcounts(s)) {
        ret = qcow2_cache_set_dependency(s, s->l2_cache, s->refcount_cache,
                                         err);
    }
    if (ret < 0) {
        qcow2_free_clusters(s, (uint64_t)coff, out_len, QCOW2_DISCARD_NEVER,
                            NULL);
    } else {
        uint64_t nb_csectors = (((uint64_t)coff + out_len - 1) >> 9) -
                               ((uint64_t)coff >> 9);
        entry = (uint64_t)coff | QCOW2_OFLAG_COMPRESSED |
                (nb_csectors << s->csize_shift);
        qcow2_set_l2_entry(s, table, l2_index, entry);
        qcow2_set_l2_bitmap(s, table, l2_index, 0);
        qcow2_cache_mark_dirty(s->l2_cache, table);
        qcow2_cache_put(s->l2_cache, &table);
        qcow2_free_any_cluster(s, old, QCOW2_DISCARD_OTHER, NULL);
    }
    if (table) {
        qcow2_cache_put(s->l2_cache, &table);
    }
    inflight_remove(s, &inflight);
    pthread_mutex_unlock(&s->lock);
    return ret;
}

int qcow2_co_pwritev_compressed(qcow2_state *s, uint64_t off,
                                uint64_t bytes, vd_iov *qiov, vd_error *err)
{
    uint64_t cs = s->cluster_size;
    compress_job job = { .s = s, .qiov = qiov, .off = off, .bytes = bytes };
    pthread_t tid[QCOW2_COMPRESS_THREADS];
    size_t threads, started = 0;
    qcow2_compressor *cz = NULL;
    static atomic_long ncpu;
    int ret = 0;

    if (has_data_file(s)) {
        return vd_error_set(err, -ENOTSUP, "%s: compression is not supported "
                            "with an external data file", s->filename);
    }
    /* Beyond QEMU, whose driver stores such clusters unencrypted (only
     * qemu-img convert refuses, in these words): the plaintext would
     * reach the file. */
    if (s->crypt_method) {
        return vd_error_set(err, -ENOTSUP, "%s: Compression and encryption "
                            "not supported at the same time", s->filename);
    }
    /* Whole clusters, the last one of the image possibly short. */
    if (qcow2_offset_into_cluster(s, off) ||
        (bytes % cs != 0 && off + bytes != s->size)) {
        return vd_error_set(err, -EINVAL, "%s: compressed writes must cover "
                            "whole clusters", s->filename);
    }
    if (bytes == 0) {
        return 0;
    }
    if (!atomic_load_explicit(&ncpu, memory_order_relaxed)) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        atomic_store_explicit(&ncpu, n > 0 ? n : 1, memory_order_relaxed);
    }
    job.n = (size_t)((bytes + cs - 1) / cs);
    threads = (size_t)atomic_load_explicit(&ncpu, memory_order_relaxed);
    if (threads > QCOW2_COMPRESS_THREADS) {
        threads = QCOW2_COMPRESS_THREADS;
    }
    if (threads > job.n) {
        threads = job.n;
    }
    /* Two slots a thread: one being compressed, one ready to store. */
    job.nslots = job.n < 2 * threads ? job.n : 2 * threads;
    job.c = calloc(job.nslots, sizeof(*job.c));
    if (!job.c) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    for (size_t i = 0; i < job.nslots; i++) {
        job.c[i].in = vd_node_blockalign(s->node, cs);
        job.c[i].out = vd_node_blockalign(s->node, cs);
        if (!job.c[i].in || !job.c[i].out) {
            ret = vd_error_set(err, -ENOMEM, "%s: out of memory",
                               s->filename);
            goto out;
        }
    }
    pthread_mutex_init(&job.lock, NULL);
    pthread_cond_init(&job.stored_cond, NULL);
    pthread_cond_init(&job.ready_cond, NULL);
    while (started + 1 < threads &&
           pthread_create(&tid[started], NULL, compress_helper, &job) == 0) {
        started++;
    }

    pthread_mutex_lock(&job.lock);
    while (ret == 0 && job.stored < job.n) {
        compressed_cluster *c = &job.c[job.stored % job.nslots];

        if (!c->ready) {
            if (compress_claimable(&job)) {
                if (!cz) {
                    cz = qcow2_compressor_new();
                }
                compress_claimed(&job, cz);
            } else {
                pthread_cond_wait(&job.ready_cond, &job.lock);
            }
            continue;
        }
        pthread_mutex_unlock(&job.lock);
        /* In guest order, so the image's layout is that of one cluster
         * after the other. */
        if (c->ret == -ENOSPC) {
            /* Incompressible: a normal cluster, as QEMU stores it. */
            vd_iov v;
            vd_iov_init_buf(&v, c->in, c->bytes);
            ret = qcow2_co_pwritev(s, c->off, c->bytes, &v, 0, err);
        } else if (c->ret < 0) {
            ret = vd_error_set(err, c->ret, "%s: compression failed",
                               s->filename);
        } else {
            ret = store_compressed(s, c, err);
        }
        pthread_mutex_lock(&job.lock);
        c->ready = false;
        job.stored++;
        if (ret < 0) {
            job.stop = true;
        }
        pthread_cond_broadcast(&job.stored_cond);
    }
    pthread_mutex_unlock(&job.lock);
    for (size_t i = 0; i < started; i++) {
        pthread_join(tid[i], NULL);
    }
    pthread_cond_destroy(&job.ready_cond);
    pthread_cond_destroy(&job.stored_cond);
    pthread_mutex_destroy(&job.lock);
    qcow2_compressor_free(cz);
out:
    for (size_t i = 0; i < job.nslots; i++) {
        free(job.c[i].in);
        free(job.c[i].out);
    }
    free(job.c);
    return ret;
}

/* ---- zeroes and discard ---- */

/* QEMU's is_zero(): guest [off, off+bytes) reads as zeros through the
 * whole backing chain, by block status alone (no data is read); the
 * range is clipped to the image. Lock not held (block status takes it). */
static bool chain_reads_zero(qcow2_state *s, uint64_t off, uint64_t bytes)
{
    if (off >= s->size) {
        return true;
    }
    if (bytes > s->size - off) {
        bytes = s->size - off;
    }
    while (bytes > 0) {
        uint64_t n = 0, map = 0;
        vd_node *file = NULL;
        int depth = 0;
        int r = vd_node_block_status_above(s->node, NULL, true, off, bytes,
                                           &n, &map, &file, &depth, NULL);
        if (r < 0 || !(r & VD_BLOCK_ZERO) || n == 0) {
            return false;
        }
        off += n;
        bytes -= n;
    }
    return true;
}

/*
 * Changes the L2 entries of guest [off, off+bytes) (aligned to the zero
 * granularity, or reaching the end of the image) to read as zeros
 * (@discard false) or to be discarded. Lock held.
 */
static int zero_or_discard_range(qcow2_state *s, uint64_t off, uint64_t bytes,
                                 bool discard, bool full_discard,
                                 bool unmap_flag, vd_error *err)
{
    uint64_t cs = s->cluster_size;
    uint64_t end = off + bytes;
    qcow2_discard_type dtype = full_discard ? QCOW2_DISCARD_ALWAYS
                                            : QCOW2_DISCARD_REQUEST;
    const uint64_t range_start = off;
    int ret = 0;

    while (off < end) {
        uint64_t cover = cs << s->l2_bits;
        uint64_t stop = (off & ~(cover - 1)) + cover;
        uint64_t l2_index;
        void *table;
        bool alloc;

        if (stop > end) {
            stop = end;
        }
        wait_inflight(s, off >> s->cluster_bits,
                      ((stop - 1) >> s->cluster_bits) - (off >> s->cluster_bits) + 1);
        /* As QEMU's get_cluster_table(): every zero write and discard
         * works on a table of its own, creating an absent one and
         * copying one shared with a snapshot (no COPIED flag in its L1
         * entry) before it changes, or the change would reach into the
         * snapshot. Shrinking (full discard) creates only the table that
         * stays, the one its new end falls into: QEMU creates the others
         * too and frees them again at once. */
        uint64_t l1_index = qcow2_offset_to_l1_index(s, off);
        uint64_t l1e = l1_index < s->l1_size ? s->l1_table[l1_index] : 0;
        bool shared_l2 = (l1e & QCOW2_L1E_OFFSET_MASK) &&
                         !(l1e & QCOW2_OFLAG_COPIED);
        alloc = !full_discard || shared_l2 ||
                (off == range_start && (off & (cover - 1)));
        ret = qcow2_get_l2_table(s, off, alloc, &table, &l2_index, err);
        if (ret < 0) {
            return ret;
        }
        if (!table) {
            off = stop;
            continue;
        }
        while (off < stop) {
            uint64_t c_guest = qcow2_start_of_cluster(s, off);
            uint64_t c_end = c_guest + cs;
            uint64_t pend = c_end < stop ? c_end : stop;
            uint64_t idx = qcow2_offset_to_l2_index(s, off);
            uint64_t old = qcow2_get_l2_entry(s, table, idx);
            uint64_t old_bm = qcow2_get_l2_bitmap(s, table, idx);
            uint64_t ne = old, nbm = old_bm;
            /* By cluster type, as QEMU's zero_in_l2_slice() and
             * discard_in_l2_slice(): the subcluster bits do not matter
             * to a whole-cluster change. */
            qcow2_subcluster_type t = qcow2_get_subcluster_type(s, old, 0, 0);
            bool whole = off == c_guest && (pend == c_end || pend >= s->size);
            bool free_old = false;
            bool allocated = t == QCOW2_SC_NORMAL || t == QCOW2_SC_COMPRESSED ||
                             t == QCOW2_SC_ZERO_ALLOC ||
                             (s->extended_l2 && type_has_host(t));

            if (whole && discard) {
                if (full_discard) {
                    ne = nbm = 0;
                } else if (s->node->backing || allocated) {
                    if (s->extended_l2) {
                        ne = 0;
                        nbm = QCOW2_L2B_ZERO_MASK;
                    } else {
                        ne = s->version >= 3 ? QCOW2_OFLAG_ZERO : 0;
                    }
                }
                free_old = true;
            } else if (whole) {
                bool unmap = t == QCOW2_SC_COMPRESSED ||
                             (unmap_flag && allocated);
                ne = unmap ? 0 : old;
                if (s->extended_l2) {
                    nbm = QCOW2_L2B_ZERO_MASK;
                } else {
                    ne |= QCOW2_OFLAG_ZERO;
                }
                free_old = unmap;
            } else if (!discard && s->extended_l2 &&
                       t != QCOW2_SC_COMPRESSED) {
                uint64_t bits = sc_range_bits(s, off - c_guest, pend - c_guest);
                nbm = (old_bm & ~bits) | (bits << 32);
            }
            if (ne != old || nbm != old_bm) {
                qcow2_set_l2_entry(s, table, idx, ne);
                qcow2_set_l2_bitmap(s, table, idx, nbm);
                qcow2_cache_mark_dirty(s->l2_cache, table);
                if (free_old && !has_data_file(s)) {
                    qcow2_free_any_cluster(s, old, dtype, NULL);
                }
            }
            off = pend;
        }
        qcow2_cache_put(s->l2_cache, &table);
    }
    return ret;
}

/* Before zeroing or discarding guest [off, off+bytes): the structures and
 * every L2 table and cluster the range frees are validated, then the
 * change begins (deferred header). Lock held. */
static int begin_range_change(qcow2_state *s, uint64_t off, uint64_t bytes,
                              vd_error *err)
{
    int ret = qcow2_validate_metadata(s, err);

    if (ret == 0) {
        ret = qcow2_validate_guest_range(s, off, bytes, err);
    }
    if (ret == 0) {
        ret = qcow2_begin_change(s, err);
    }
    return ret;
}

/* Whether the cluster holding guest @off is compressed. Lock held. */
static int is_compressed(qcow2_state *s, uint64_t off, bool *compressed,
                         vd_error *err)
{
    uint64_t bytes = 1, host;
    qcow2_subcluster_type t;
    int ret = qcow2_get_host_offset(s, off, &bytes, &host, &t, err);

    *compressed = ret == 0 && t == QCOW2_SC_COMPRESSED;
    return ret;
}

/*
 * QEMU's qcow2_subcluster_zeroize(): guest [off, off+bytes), aligned to
 * subclusters (the end may be the end of the image), is made to read as
 * zeros in the L2 tables. v2 has no zero flag: without a backing file
 * the range is discarded instead (it reads as zeros then), with one
 * -ENOTSUP makes the caller write zeros. Part of a compressed cluster
 * cannot be marked with subcluster bits: -ENOTSUP as well, found for the
 * head before anything changes and for the tail after the rest changed,
 * as QEMU (the caller's zero buffer then covers the whole request).
 * Lock held, change begun.
 */
static int zeroize(qcow2_state *s, uint64_t off, uint64_t bytes,
                   unsigned flags, vd_error *err)
{
    uint64_t cs = s->cluster_size, end = off + bytes;
    uint64_t head, tail;
    bool unmap = (flags & VD_REQ_MAY_UNMAP) != 0, comp;
    int ret = 0;

    if (has_data_file(s) && s->data_file_raw) {
        /* The data file must stay a valid raw image of the disk. */
        ret = vd_node_pwrite_zeroes(s->data_file->node, off, bytes,
                                    flags & VD_REQ_MAY_UNMAP, err);
        if (ret < 0) {
            return ret;
        }
    }
    if (s->version < 3) {
        if (s->node->backing) {
            return -ENOTSUP;
        }
        return zero_or_discard_range(s, off, bytes, true, false, false, err);
    }
    head = ((off + cs - 1) & ~(cs - 1)) < end ?
           ((off + cs - 1) & ~(cs - 1)) - off : bytes;
    if (end >= s->size) {
        tail = 0;
    } else {
        uint64_t c = end & ~(cs - 1);
        tail = end - (c > off + head ? c : off + head);
    }
    if (head) {
        ret = is_compressed(s, off, &comp, err);
        if (ret == 0 && comp) {
            ret = -ENOTSUP;
        }
        if (ret == 0) {
            ret = zero_or_discard_range(s, off, head, false, false, unmap,
                                        err);
        }
        if (ret < 0) {
            return ret;
        }
    }
    if (end - tail > off + head) {
        ret = zero_or_discard_range(s, off + head, end - tail - off - head,
                                    false, false, unmap, err);
        if (ret < 0) {
            return ret;
        }
    }
    if (tail) {
        ret = is_compressed(s, end - tail, &comp, err);
        if (ret == 0 && comp) {
            ret = -ENOTSUP;
        }
        if (ret == 0) {
            ret = zero_or_discard_range(s, end - tail, tail, false, false,
                                        unmap, err);
        }
    }
    return ret;
}

/*
 * QEMU's qcow2_co_pwrite_zeroes(). The core hands over the bulk of a
 * request in whole subclusters and an unaligned head or tail as a piece
 * inside one subcluster. Such a piece becomes a zero subcluster when the
 * rest of its subcluster reads as zeros already (through the whole
 * chain) and the subcluster holds no data; otherwise -ENOTSUP makes the
 * core write a zero buffer, as QEMU's generic layer does.
 */
int qcow2_co_pwrite_zeroes(qcow2_state *s, uint64_t off, uint64_t bytes,
                           unsigned flags, vd_error *err)
{
    uint64_t sc = s->subcluster_size;
    uint64_t head = off & (sc - 1);
    uint64_t tail = ((off + bytes + sc - 1) & ~(sc - 1)) - (off + bytes);
    int ret;

    if (off + bytes == s->size) {
        tail = 0;
    }
    if (head || tail) {
        uint64_t n = sc, host;
        qcow2_subcluster_type t;

        /* The contract: an unaligned request lies inside one subcluster
         * (only that subcluster is zeroed below). */
        assert(off - head + sc >= off + bytes);

        if (!chain_reads_zero(s, off - head, head) ||
            !chain_reads_zero(s, off + bytes, tail)) {
            return -ENOTSUP;
        }
        pthread_mutex_lock(&s->lock);
        /* A write may have come in since the check, and one may still be
         * in flight: its data is on the disk but its L2 entry not yet
         * linked, so the entry says "no data". Wait for it first and
         * decide on the entry it leaves; no new allocation can start
         * while the lock stays held until the subcluster is zeroed. */
        off -= head;
        bytes = sc;
        wait_range_inflight(s, off, bytes);
        ret = qcow2_get_host_offset(s, off, &n, &host, &t, err);
        if (ret == 0 && t != QCOW2_SC_UNALLOCATED_PLAIN &&
            t != QCOW2_SC_UNALLOCATED_ALLOC && t != QCOW2_SC_ZERO_PLAIN &&
            t != QCOW2_SC_ZERO_ALLOC) {
            ret = -ENOTSUP;
        }
        if (ret < 0) {
            pthread_mutex_unlock(&s->lock);
            return ret;
        }
    } else {
        pthread_mutex_lock(&s->lock);
        /* The checks below (compressed clusters, validation) look at the
         * entries an in-flight allocation is about to replace. */
        wait_range_inflight(s, off, bytes);
    }
    /* Clusters are freed (unmap, compressed ones): validate first. */
    ret = begin_range_change(s, off, bytes, err);
    if (ret == 0) {
        ret = zeroize(s, off, bytes, flags, err);
    }
    if (ret == 0 && (flags & VD_REQ_FUA)) {
        ret = qcow2_flush_caches(s, err);
    }
    qcow2_process_discards(s);
    pthread_mutex_unlock(&s->lock);
    return ret;
}

static int discard_range(qcow2_state *s, uint64_t off, uint64_t bytes,
                         bool full, vd_error *err)
{
    uint64_t cs = s->cluster_size;
    uint64_t end = off + bytes;
    uint64_t a = (off + cs - 1) & ~(cs - 1);
    uint64_t b = end >= s->size ? end : end & ~(cs - 1);
    int ret;

    if (a >= b) {
        return 0;   /* partial clusters are ignored, as QEMU does */
    }
    pthread_mutex_lock(&s->lock);
    /* Every cluster freed must be what its entry says, as linked by any
     * allocation still in flight. */
    wait_range_inflight(s, a, b - a);
    ret = begin_range_change(s, a, b - a, err);
    if (ret == 0) {
        ret = zero_or_discard_range(s, a, b - a, true, full, false, err);
    }
    if (ret == 0) {
        qcow2_process_discards(s);
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

int qcow2_co_pdiscard(qcow2_state *s, uint64_t off, uint64_t bytes,
                      vd_error *err)
{
    /* v2 has no zero clusters: a discarded cluster would show the backing
     * file's data instead of the guest's. QEMU then discards nothing (the
     * request is advisory), and neither do we. */
    if (s->version < 3 && s->node->backing) {
        return -ENOTSUP;
    }
    return discard_range(s, off, bytes, false, err);
}

/* Used by truncate when shrinking: drops the clusters entirely. */
int qcow2_discard_full(qcow2_state *s, uint64_t off, uint64_t bytes,
                       vd_error *err);
int qcow2_discard_full(qcow2_state *s, uint64_t off, uint64_t bytes,
                       vd_error *err)
{
    return discard_range(s, off, bytes, true, err);
}

/* ---- block status ---- */

int qcow2_co_block_status(qcow2_state *s, bool want_zero, uint64_t off,
                          uint64_t bytes, uint64_t *pnum, uint64_t *map,
                          vd_node **file, vd_error *err)
{
    uint64_t cur = bytes, host;
    qcow2_subcluster_type t;
    int status = 0;
    int ret;

    /* Racing first calls may both detect: the answer is the same. */
    int prealloc = __atomic_load_n(&s->metadata_preallocation,
                                   __ATOMIC_RELAXED);
    if (want_zero && prealloc < 0) {
        prealloc = qcow2_detect_metadata_preallocation(s);
        __atomic_store_n(&s->metadata_preallocation, prealloc,
                         __ATOMIC_RELAXED);
    }
    pthread_mutex_lock(&s->lock);
    ret = qcow2_get_host_offset(s, off, &cur, &host, &t, err);
    pthread_mutex_unlock(&s->lock);
    if (ret < 0) {
        return ret;
    }
    *pnum = cur;
    /* Not for encrypted images: the file holds ciphertext (QEMU). */
    if ((t == QCOW2_SC_NORMAL || t == QCOW2_SC_ZERO_ALLOC ||
         t == QCOW2_SC_UNALLOCATED_ALLOC) && !s->crypt) {
        *map = host;
        *file = s->data_file->node;
        status |= VD_BLOCK_OFFSET_VALID;
    }
    if (t == QCOW2_SC_ZERO_PLAIN || t == QCOW2_SC_ZERO_ALLOC) {
        status |= VD_BLOCK_ZERO | VD_BLOCK_ALLOCATED;
    } else if (t == QCOW2_SC_NORMAL || t == QCOW2_SC_COMPRESSED) {
        status |= VD_BLOCK_DATA | VD_BLOCK_ALLOCATED;
    }
    if (t == QCOW2_SC_COMPRESSED) {
        status |= VD_BLOCK_COMPRESSED;
    }
    if (prealloc > 0 && t == QCOW2_SC_NORMAL && !s->crypt) {
        status |= VD_BLOCK_RECURSE;
    }
    return status;
}

/* ---- preallocation ---- */

/* Zeroes what does not read as zeros in [off, off+len) of @node: holes
 * (block status) are skipped, data is read and only non-zero chunks are
 * rewritten (a new file's first block holds zeros written by its
 * creation, as QEMU's file-posix writes them). */
static int zero_unless_zero(vd_node *node, uint64_t off, uint64_t len,
                            vd_error *err)
{
    const uint64_t chunk = 1u << 20;
    uint8_t *buf = NULL;
    int ret = 0;

    while (ret == 0 && len > 0) {
        uint64_t n = 0, map = 0;
        vd_node *file = NULL;
        int st = vd_node_block_status(node, true, off, len, &n, &map, &file,
                                      err);
        if (st < 0) {
            ret = st;
            break;
        }
        if (n == 0 || n > len) {
            n = len;
        }
        for (uint64_t pos = 0; !(st & VD_BLOCK_ZERO) && pos < n;
             pos += chunk) {
            uint64_t m = n - pos < chunk ? n - pos : chunk;
            if (!buf && !(buf = vd_node_blockalign(node, chunk))) {
                ret = vd_error_set(err, -ENOMEM, "out of memory");
                break;
            }
            vd_iov v;
            vd_iov_init_buf(&v, buf, m);
            ret = vd_node_preadv(node, off + pos, m, &v, 0, err);
            if (ret == 0 && !vd_buffer_is_zero(buf, m)) {
                ret = vd_node_pwrite_zeroes(node, off + pos, m, 0, err);
            }
            if (ret < 0) {
                break;
            }
        }
        off += n;
        len -= n;
    }
    free(buf);
    return ret;
}

int qcow2_preallocate(qcow2_state *s, uint64_t off, uint64_t bytes,
                      vd_prealloc mode, vd_error *err)
{
    uint64_t cs = s->cluster_size;
    uint64_t end = off + bytes;
    uint64_t host_end = 0;
    int ret = 0;

    off = qcow2_start_of_cluster(s, off);
    pthread_mutex_lock(&s->lock);
    while (off < end) {
        uint64_t cover = cs << s->l2_bits;
        uint64_t stop = (off & ~(cover - 1)) + cover;
        uint64_t l2_index, n = 0, e;
        int64_t h;
        void *table;

        if (stop > end) {
            stop = end;
        }
        ret = qcow2_get_l2_table(s, off, true, &table, &l2_index, err);
        if (ret < 0) {
            break;
        }
        e = qcow2_get_l2_entry(s, table, l2_index);
        if (qcow2_get_subcluster_type(s, e, 0, 0) != QCOW2_SC_UNALLOCATED_PLAIN) {
            qcow2_cache_put(s->l2_cache, &table);
            off += cs;
            continue;
        }
        while (off + n * cs < stop &&
               qcow2_get_subcluster_type(s, qcow2_get_l2_entry(s, table, l2_index + n),
                                         0, 0) == QCOW2_SC_UNALLOCATED_PLAIN) {
            n++;
        }
        qcow2_cache_put(s->l2_cache, &table);
        if (has_data_file(s)) {
            h = (int64_t)off;
        } else {
            h = qcow2_alloc_clusters(s, n * cs, err);
            if (h < 0) {
                ret = (int)h;
                break;
            }
        }
        {
            /* Reused clusters below the end of the file may hold old
             * data, and preallocated clusters must read as zeros (QEMU
             * leaves whatever is there). Only what does not read as
             * zeros already is zeroed: a new data file, all holes, is
             * left unallocated, as QEMU leaves it. */
            int64_t flen = vd_node_getlength(s->data_file->node);
            uint64_t zend = (uint64_t)h + n * cs;
            if (flen > h) {
                if ((uint64_t)flen < zend) {
                    zend = (uint64_t)flen;
                }
                ret = zero_unless_zero(s->data_file->node, (uint64_t)h,
                                       zend - (uint64_t)h, err);
                if (ret < 0) {
                    break;
                }
            }
        }
        ret = qcow2_get_l2_table(s, off, true, &table, &l2_index, err);
        if (ret < 0) {
            break;
        }
        ret = qcow2_cache_set_dependency(s, s->l2_cache, s->refcount_cache, err);
        if (ret < 0) {
            qcow2_cache_put(s->l2_cache, &table);
            break;
        }
        for (uint64_t i = 0; i < n; i++) {
            qcow2_set_l2_entry(s, table, l2_index + i,
                               ((uint64_t)h + i * cs) | QCOW2_OFLAG_COPIED);
            qcow2_set_l2_bitmap(s, table, l2_index + i, QCOW2_L2B_ALLOC_MASK);
        }
        qcow2_cache_mark_dirty(s->l2_cache, table);
        qcow2_cache_put(s->l2_cache, &table);
        if ((uint64_t)h + n * cs > host_end) {
            host_end = (uint64_t)h + n * cs;
        }
        off += n * cs;
    }
    if (ret == 0) {
        ret = qcow2_flush_caches(s, err);
    }
    pthread_mutex_unlock(&s->lock);
    if (ret == 0 && host_end) {
        vd_child *dc = s->data_file;
        int64_t len = vd_node_getlength(dc->node);
        if (len >= 0 && (uint64_t)len < host_end) {
            ret = vd_node_truncate(dc->node, host_end, false,
                                   mode == VD_PREALLOC_METADATA ?
                                   VD_PREALLOC_OFF : mode, err);
        }
    }
    return ret;
}
