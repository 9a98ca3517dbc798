/*
 * qcow2 refcounts and host cluster allocation (qcow2.txt "Host cluster
 * management").
 *
 * The refcount table lives in memory (host endian) and is rewritten
 * entry by entry; refcount blocks go through the refcount cache. The
 * file is organised as: accessors for refcount entries of any width,
 * lookup, refcount block allocation and table growth, the update of a
 * range, and the allocators built on it (clusters, clusters at a fixed
 * place, bytes for compressed data) and freeing.
 *
 * Allocation is two-phase: find a free range (refcount 0), then make sure
 * a refcount block exists for every cluster of it. Creating a block takes
 * a free cluster itself, possibly inside the range just found, so the
 * search is retried until no block had to be created; only then are the
 * refcounts raised. New refcount blocks describe themselves when they
 * fall into their own range, as QEMU's do. Everything runs with
 * qcow2_state.lock held.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/qcow2/qcow2.h"

uint64_t qcow2_refblock_get(const qcow2_state *s, const void *block,
                            uint64_t index)
{
    const uint8_t *b = block;
    switch (s->refcount_order) {
    case 0:
        return (b[index / 8] >> (index % 8)) & 0x1;
    case 1:
        return (b[index / 4] >> (2 * (index % 4))) & 0x3;
    case 2:
        return (b[index / 2] >> (4 * (index % 2))) & 0xf;
    case 3:
        return b[index];
    case 4:
        return be16toh(((const uint16_t *)block)[index]);
    case 5:
        return be32toh(((const uint32_t *)block)[index]);
    default:
        return be64toh(((const uint64_t *)block)[index]);
    }
}

void qcow2_refblock_set(const qcow2_state *s, void *block, uint64_t index,
                        uint64_t value)
{
    uint8_t *b = block;
    unsigned shift;
    uint8_t mask;

    switch (s->refcount_order) {
    case 0:
    case 1:
    case 2: {
        unsigned bits = 1u << s->refcount_order;
        unsigned per_byte = 8 / bits;
        shift = bits * (unsigned)(index % per_byte);
        mask = (uint8_t)(((1u << bits) - 1) << shift);
        b[index / per_byte] = (uint8_t)((b[index / per_byte] & ~mask) |
                                        ((value << shift) & mask));
        break;
    }
    case 3:
        b[index] = (uint8_t)value;
        break;
    case 4:
        ((uint16_t *)block)[index] = htobe16((uint16_t)value);
        break;
    case 5:
        ((uint32_t *)block)[index] = htobe32((uint32_t)value);
        break;
    default:
        ((uint64_t *)block)[index] = htobe64(value);
        break;
    }
}

int qcow2_refcount_init(qcow2_state *s, vd_error *err)
{
    uint64_t bytes = (uint64_t)s->refcount_table_size * 8;
    int ret;

    s->n_reftable_pending = 0;
    s->refcount_table = calloc(s->refcount_table_size ? s->refcount_table_size
                                                      : 1, 8);
    if (!s->refcount_table) {
        return vd_error_set(err, -ENOMEM, "%s: cannot allocate the refcount "
                            "table", s->filename);
    }
    if (bytes) {
        vd_node_debug_event(s->file->node, VD_BLKDBG_REFTABLE_LOAD);
        ret = vd_child_pread(s->file, s->refcount_table_offset,
                             s->refcount_table, bytes, err);
        if (ret < 0) {
            vd_error_prepend(err, "%s: reading the refcount table: ",
                             s->filename);
            return ret;
        }
    }
    for (uint32_t i = 0; i < s->refcount_table_size; i++) {
        s->refcount_table[i] = be64toh(s->refcount_table[i]);
    }
    return 0;
}

void qcow2_refcount_close(qcow2_state *s)
{
    free(s->refcount_table);
    s->refcount_table = NULL;
}

/* Offset of the refcount block for table index @rt_index, 0 when none;
 * < 0 on a corrupt entry. */
static int64_t refblock_offset(qcow2_state *s, uint64_t rt_index,
                               vd_error *err)
{
    uint64_t off;

    if (rt_index >= s->refcount_table_size) {
        return 0;
    }
    off = s->refcount_table[rt_index] & QCOW2_REFT_OFFSET_MASK;
    if (off > QCOW2_MAX_HOST_OFFSET) {
        /* Would come back negative, i.e. as an error code. */
        return vd_error_set(err, -EIO, "%s: refblock offset 0x%llx is "
                            "invalid (reftable index: 0x%llx)", s->filename,
                            (unsigned long long)off,
                            (unsigned long long)rt_index);
    }
    if (off & (s->cluster_size - 1)) {
        return qcow2_signal_corruption(s, err, "Refblock offset 0x%llx "
                                       "unaligned (reftable index: 0x%llx)",
                                       (unsigned long long)off,
                                       (unsigned long long)rt_index);
    }
    return (int64_t)off;
}

int qcow2_get_refcount(qcow2_state *s, uint64_t cluster_index,
                       uint64_t *refcount, vd_error *err)
{
    qcow2_refblock_hold h = { 0 };
    int ret = qcow2_held_get_refcount(s, &h, cluster_index, refcount, err);

    qcow2_refblock_release(s, &h);
    return ret;
}

/* First run of @n clusters with refcount 0 from free_cluster_index on.
 * Does not change refcounts. */
static int64_t find_free(qcow2_state *s, uint64_t n, vd_error *err)
{
    uint64_t start = s->free_cluster_index;
    uint64_t i = start;

    while (i - start < n) {
        uint64_t rc;
        /* QEMU's allocators load the block (blkdebug's refblock_load). */
        vd_node_debug_event(s->file->node, VD_BLKDBG_REFBLOCK_LOAD);
        int ret = qcow2_get_refcount(s, i, &rc, err);
        if (ret < 0) {
            return ret;
        }
        i++;
        if (rc != 0) {
            start = i;
        }
        if (start > (QCOW2_MAX_HOST_OFFSET >> s->cluster_bits)) {
            return vd_error_set(err, -EFBIG, "%s: image file is full",
                                s->filename);
        }
    }
    s->free_cluster_index = start;
    return (int64_t)(start << s->cluster_bits);
}

static int write_reftable_entry(qcow2_state *s, uint64_t rt_index,
                                vd_error *err)
{
    uint64_t be = htobe64(s->refcount_table[rt_index]);
    int ret = qcow2_pre_write_overlap_check(s, QCOW2_OL_REFCOUNT_TABLE,
                                            s->refcount_table_offset +
                                            rt_index * 8, 8, false, err);
    if (ret < 0) {
        return ret;
    }
    return vd_child_pwrite(s->file, s->refcount_table_offset + rt_index * 8,
                           &be, 8, 0, err);
}

static int change_one(qcow2_state *s, uint64_t cluster_index, uint64_t addend,
                      bool decrease, qcow2_discard_type type, vd_error *err);

static bool block_missing(const qcow2_state *s, uint64_t rt_index)
{
    return rt_index >= s->refcount_table_size ||
           !(s->refcount_table[rt_index] & QCOW2_REFT_OFFSET_MASK);
}

/*
 * Creates every missing refcount block for clusters [first, end), growing
 * the refcount table when needed. The new blocks (and the new table) go
 * into one area past @end, past the end of the file and past every
 * cluster allocated in this session; the blocks cover the area itself.
 * Blocks are written and flushed before the table points at them; a new
 * table is written and flushed before the header points at it, then the
 * old table's clusters are freed. Returns 1 (something was allocated) or
 * -errno.
 */
static int populate_area(qcow2_state *s, uint64_t first, uint64_t end,
                         vd_error *err)
{
    int64_t flen = vd_node_getlength(s->file->node);
    uint64_t area, area_end, nb_blocks = 0, table_clusters = 0, entries;
    uint64_t first_rt = first >> s->refcount_block_bits, last_rt;
    uint64_t *rts = NULL, *new_table = NULL;
    uint8_t *block = NULL;
    bool grow = false;
    int ret;

    if (flen < 0) {
        return vd_error_set(err, (int)flen, "%s: cannot get the file length",
                            s->filename);
    }
    area = qcow2_size_to_clusters(s, (uint64_t)flen);
    if (area < s->alloc_end) {
        area = s->alloc_end;
    }
    if (area < end) {
        area = end;
    }

    /* Fixed point over the area's size. */
    entries = s->refcount_table_size;
    for (;;) {
        uint64_t nb = 0, tc = 0, want;
        area_end = area + nb_blocks + table_clusters;
        last_rt = (area_end - 1) >> s->refcount_block_bits;
        /* A corrupt offset far past the end would otherwise make the scan
         * below (and the allocations after it) as large as the offset. */
        if (last_rt >= QCOW2_MAX_REFTABLE_BYTES / 8) {
            return vd_error_set(err, -EFBIG, "%s: refcount table would "
                                "exceed 8 MB", s->filename);
        }
        for (uint64_t r = first_rt; r <= last_rt; r++) {
            nb += block_missing(s, r);
        }
        grow = last_rt >= s->refcount_table_size;
        if (grow) {
            want = last_rt + 1;
            if (want < s->refcount_table_size + s->refcount_table_size / 2) {
                want = s->refcount_table_size + s->refcount_table_size / 2;
            }
            tc = qcow2_size_to_clusters(s, want * 8);
        }
        if (nb == nb_blocks && tc == table_clusters) {
            break;
        }
        nb_blocks = nb;
        table_clusters = tc;
    }
    if (grow) {
        entries = table_clusters << (s->cluster_bits - 3);
        if (table_clusters * s->cluster_size > QCOW2_MAX_REFTABLE_BYTES) {
            return vd_error_set(err, -EFBIG, "%s: refcount table would "
                                "exceed 8 MB", s->filename);
        }
    }
    if (nb_blocks == 0 && !grow) {
        return 0;
    }
    vd_node_debug_event(s->file->node, VD_BLKDBG_REFBLOCK_ALLOC);

    rts = calloc(nb_blocks ? nb_blocks : 1, sizeof(*rts));
    new_table = calloc(entries, 8);
    block = vd_node_blockalign(s->node, s->cluster_size);
    if (!rts || !new_table || !block) {
        ret = vd_error_set(err, -ENOMEM, "%s: cannot grow the refcounts",
                           s->filename);
        goto out;
    }
    for (uint64_t i = 0; i < s->refcount_table_size; i++) {
        new_table[i] = s->refcount_table[i];
    }
    {
        uint64_t i = 0;
        for (uint64_t r = first_rt; r <= last_rt; r++) {
            if (block_missing(s, r)) {
                rts[i++] = r;
            }
        }
    }
    if (nb_blocks) {
        vd_node_debug_event(s->file->node,
                            VD_BLKDBG_REFBLOCK_ALLOC_WRITE_BLOCKS);
    }
    for (uint64_t b = 0; b < nb_blocks; b++) {
        uint64_t base = rts[b] << s->refcount_block_bits;
        uint64_t lo = area > base ? area : base;
        uint64_t hi = area_end < base + s->refcount_block_size ?
                      area_end : base + s->refcount_block_size;
        memset(block, 0, s->cluster_size);
        for (uint64_t c = lo; c < hi; c++) {
            qcow2_refblock_set(s, block, c - base, 1);
        }
        ret = vd_child_pwrite(s->file, (area + b) << s->cluster_bits, block,
                              s->cluster_size, 0, err);
        if (ret < 0) {
            goto out;
        }
        new_table[rts[b]] = (area + b) << s->cluster_bits;
    }
    if (area_end > s->alloc_end) {
        s->alloc_end = area_end;
    }

    if (grow) {
        uint64_t old_offset = s->refcount_table_offset;
        uint64_t old_size = (uint64_t)s->refcount_table_size * 8;
        uint64_t toff = (area + nb_blocks) << s->cluster_bits;
        struct __attribute__((packed)) {
            uint64_t offset;
            uint32_t clusters;
        } hdr = { htobe64(toff), htobe32((uint32_t)table_clusters) };

        for (uint64_t i = 0; i < entries; i++) {
            new_table[i] = htobe64(new_table[i]);
        }
        vd_node_debug_event(s->file->node,
                            VD_BLKDBG_REFBLOCK_ALLOC_WRITE_TABLE);
        ret = vd_child_pwrite(s->file, toff, new_table,
                              table_clusters * s->cluster_size, 0, err);
        if (ret == 0) {
            /* Stable structures before the header points at them. */
            ret = qcow2_cache_flush(s, s->refcount_cache, err);
        }
        if (ret == 0) {
            vd_node_debug_event(s->file->node,
                                VD_BLKDBG_REFBLOCK_ALLOC_SWITCH_TABLE);
            ret = vd_child_pwrite(s->file,
                                  offsetof(qcow2_header, refcount_table_offset),
                                  &hdr, sizeof(hdr), 0, err);
        }
        if (ret == 0) {
            ret = vd_node_flush(s->file->node, err);
        }
        if (ret < 0) {
            goto out;
        }
        for (uint64_t i = 0; i < entries; i++) {
            new_table[i] = be64toh(new_table[i]);
        }
        free(s->refcount_table);
        s->refcount_table = new_table;
        new_table = NULL;
        s->refcount_table_offset = toff;
        s->refcount_table_size = (uint32_t)entries;
        qcow2_overlap_changed(s);
        ret = qcow2_free_clusters(s, old_offset, old_size,
                                  QCOW2_DISCARD_OTHER, err);
        if (ret < 0) {
            goto out;
        }
    } else {
        ret = qcow2_cache_flush(s, s->refcount_cache, err);
        if (ret == 0) {
            vd_node_debug_event(s->file->node,
                                VD_BLKDBG_REFBLOCK_ALLOC_HOOKUP);
        }
        for (uint64_t b = 0; ret == 0 && b < nb_blocks; b++) {
            s->refcount_table[rts[b]] = new_table[rts[b]];
            qcow2_overlap_changed(s);
            ret = write_reftable_entry(s, rts[b], err);
        }
        if (ret < 0) {
            goto out;
        }
    }
    ret = 1;
out:
    free(rts);
    free(new_table);
    free(block);
    return ret;
}

int qcow2_reftable_write_pending(qcow2_state *s, vd_error *err)
{
    int ret;

    if (s->n_reftable_pending == 0) {
        return 0;
    }
    vd_node_debug_event(s->file->node, VD_BLKDBG_REFBLOCK_ALLOC_WRITE);
    ret = vd_node_flush(s->file->node, err);
    if (ret < 0) {
        return ret;
    }
    vd_node_debug_event(s->file->node, VD_BLKDBG_REFBLOCK_ALLOC_HOOKUP);
    while (s->n_reftable_pending > 0) {
        uint32_t rt_index = s->reftable_pending[s->n_reftable_pending - 1];

        /* Still ours: the table may have been rebuilt or shrunk. */
        if (rt_index < s->refcount_table_size &&
            (s->refcount_table[rt_index] & QCOW2_REFT_OFFSET_MASK)) {
            ret = write_reftable_entry(s, rt_index, err);
            if (ret < 0) {
                return ret;
            }
        }
        s->n_reftable_pending--;
    }
    return 0;
}

void qcow2_reftable_forget_pending(qcow2_state *s)
{
    s->n_reftable_pending = 0;
}

/*
 * Makes sure the refcount block covering @cluster_index exists. Returns 0
 * when it already did, 1 when a block was created (the caller's view of
 * free space is stale), or -errno.
 */
static int ensure_refblock(qcow2_state *s, uint64_t cluster_index,
                           vd_error *err)
{
    uint64_t rt_index = cluster_index >> s->refcount_block_bits;
    int64_t off, new_block;
    void *block;
    int ret;

    if (rt_index >= s->refcount_table_size) {
        return populate_area(s, cluster_index, cluster_index + 1, err);
    }
    off = refblock_offset(s, rt_index, err);
    if (off < 0) {
        return (int)off;
    }
    if (off > 0) {
        return 0;
    }

    vd_node_debug_event(s->file->node, VD_BLKDBG_REFBLOCK_ALLOC);
    new_block = find_free(s, 1, err);
    if (new_block < 0) {
        return (int)new_block;
    }
    if (new_block == 0) {
        /* Only a corrupt image shows the header's cluster as free; the
         * table entry would stay 0 and the caller would retry forever. */
        return qcow2_signal_corruption(s, err, "Preventing invalid "
                                       "allocation of refcount block at "
                                       "offset 0");
    }
    if (((uint64_t)new_block >> s->cluster_bits) >> s->refcount_block_bits ==
        rt_index) {
        /* Self-describing: the block holds its own refcount. */
        ret = qcow2_cache_get_empty(s, s->refcount_cache, (uint64_t)new_block,
                                    &block, err);
        if (ret < 0) {
            return ret;
        }
        memset(block, 0, s->cluster_size);
        qcow2_refblock_set(s, block,
                           ((uint64_t)new_block >> s->cluster_bits) &
                           (s->refcount_block_size - 1), 1);
        if (((uint64_t)new_block >> s->cluster_bits) >= s->alloc_end) {
            s->alloc_end = ((uint64_t)new_block >> s->cluster_bits) + 1;
        }
        qcow2_cache_mark_dirty(s->refcount_cache, block);
        qcow2_cache_put(s->refcount_cache, &block);
    } else {
        /* Described by another block, which may need creating first. */
        ret = ensure_refblock(s, (uint64_t)new_block >> s->cluster_bits, err);
        if (ret < 0) {
            return ret;
        }
        if (ret > 0) {
            return 1;   /* that may have taken new_block: start over */
        }
        ret = change_one(s, (uint64_t)new_block >> s->cluster_bits, 1, false,
                         QCOW2_DISCARD_NEVER, err);
        if (ret < 0) {
            return ret;
        }
        ret = qcow2_cache_get_empty(s, s->refcount_cache, (uint64_t)new_block,
                                    &block, err);
        if (ret < 0) {
            return ret;
        }
        memset(block, 0, s->cluster_size);
        qcow2_cache_mark_dirty(s->refcount_cache, block);
        qcow2_cache_put(s->refcount_cache, &block);
    }
    /*
     * The block must be on disk before the table entry points at it.
     * QEMU flushes right here, which writes back every dirty byte of the
     * file while all writers wait (seconds on a large first write). The
     * entry is needed on disk only before a reference to a cluster the
     * block counts is: such references are written after the refcount
     * cache, and writing the refcount cache writes the pending entries
     * behind a flush (qcow2_reftable_write_pending()). Until then a
     * crash leaves the block unreachable (a leak at most: its own
     * refcount, when another block holds it) and nothing that uses it.
     */
    if (s->n_reftable_pending < QCOW2_REFTABLE_PENDING_MAX) {
        s->refcount_table[rt_index] = (uint64_t)new_block;
        s->reftable_pending[s->n_reftable_pending++] = (uint32_t)rt_index;
        qcow2_overlap_changed(s);
        return 1;
    }
    vd_node_debug_event(s->file->node, VD_BLKDBG_REFBLOCK_ALLOC_WRITE);
    ret = qcow2_cache_flush(s, s->refcount_cache, err);
    if (ret < 0) {
        return ret;
    }
    s->refcount_table[rt_index] = (uint64_t)new_block;
    qcow2_overlap_changed(s);
    vd_node_debug_event(s->file->node, VD_BLKDBG_REFBLOCK_ALLOC_HOOKUP);
    ret = write_reftable_entry(s, rt_index, err);
    if (ret < 0) {
        s->refcount_table[rt_index] = 0;
        qcow2_overlap_changed(s);
        return ret;
    }
    return 1;
}

/*
 * Removes host cluster @host from the queue of pending discards. A cluster
 * freed and queued may be allocated again before the queue is processed
 * (the queue is only emptied after some operations); discarding it then
 * would punch a hole into live metadata or data.
 */
static void unqueue_discard(qcow2_state *s, uint64_t host)
{
    uint64_t end = host + s->cluster_size;

    for (qcow2_discard_range **p = &s->discards; *p; p = &(*p)->next) {
        qcow2_discard_range *d = *p;
        uint64_t d_end = d->offset + d->bytes;

        if (end <= d->offset || host >= d_end) {
            continue;
        }
        if (host > d->offset && end < d_end) {
            qcow2_discard_range *tail = malloc(sizeof(*tail));
            if (!tail) {
                /* Out of memory: skip the tail rather than risk it. */
                d->bytes = host - d->offset;
                return;
            }
            *tail = (qcow2_discard_range){ end, d_end - end, d->next };
            d->bytes = host - d->offset;
            d->next = tail;
            return;
        }
        if (host > d->offset) {
            d->bytes = host - d->offset;
        } else if (end < d_end) {
            d->bytes = d_end - end;
            d->offset = end;
        } else {
            *p = d->next;
            free(d);
        }
        return;
    }
}

/* Queues the freed cluster at @host for a discard in the file. Clusters
 * are freed in guest order, which is rarely host order (a diverged
 * active layer was allocated in the order the guest wrote), so the queue
 * is only merged where it is cheap (with the range at its head) and is
 * sorted and coalesced when it is processed. O(1). Lock held. */
static void queue_discard(qcow2_state *s, uint64_t host)
{
    qcow2_discard_range *head = s->discards;

    if (head && head->offset + head->bytes == host) {
        head->bytes += s->cluster_size;
    } else if (head && host + s->cluster_size == head->offset) {
        head->offset = host;
        head->bytes += s->cluster_size;
    } else {
        qcow2_discard_range *d = malloc(sizeof(*d));
        if (d) {
            *d = (qcow2_discard_range){ host, s->cluster_size, head };
            s->discards = d;
        }
    }
}

/*
 * Adds @addend to (or with @decrease subtracts it from) the refcount of
 * host cluster @cluster_index in @block, the cached refcount block that
 * covers it (held by the caller), and does what follows from the new
 * value: the allocation frontier, the free-cluster hint, and for a freed
 * cluster the tables cached at it and its queued discard. Refuses an
 * overflow or underflow before changing anything. Lock held.
 */
static int change_in_block(qcow2_state *s, void *block,
                           uint64_t cluster_index, uint64_t addend,
                           bool decrease, qcow2_discard_type type,
                           uint64_t *refcount, vd_error *err)
{
    uint64_t idx = cluster_index & (s->refcount_block_size - 1);
    uint64_t rc = qcow2_refblock_get(s, block, idx);

    if (decrease ? rc < addend : s->refcount_max - rc < addend) {
        return vd_error_set(err, -EINVAL, "%s: refcount of cluster 0x%llx "
                            "would %s", s->filename,
                            (unsigned long long)cluster_index,
                            decrease ? "drop below 0" : "overflow");
    }
    if (!decrease && rc == 0 && s->discards) {
        unqueue_discard(s, cluster_index << s->cluster_bits);
    }
    rc = decrease ? rc - addend : rc + addend;
    if (rc && cluster_index >= s->alloc_end) {
        s->alloc_end = cluster_index + 1;
    }
    qcow2_refblock_set(s, block, idx, rc);
    qcow2_cache_mark_dirty(s->refcount_cache, block);

    if (rc == 0) {
        uint64_t host = cluster_index << s->cluster_bits;
        if (cluster_index < s->free_cluster_index) {
            s->free_cluster_index = cluster_index;
        }
        /* A freed table must not be written back over reused space. */
        qcow2_cache_discard(s->l2_cache, host);
        qcow2_cache_discard(s->refcount_cache, host);
        if (s->discard_passthrough[type]) {
            queue_discard(s, host);
        }
    }
    if (refcount) {
        *refcount = rc;
    }
    return 0;
}

/* QEMU's update_refcount() asks alloc_refcount_block() for every
 * cluster, which raises both events even when the block exists; blkdebug
 * rules armed by them must see them before the block is read. */
static void refblock_events(qcow2_state *s)
{
    vd_node_debug_event(s->file->node, VD_BLKDBG_REFBLOCK_ALLOC);
    vd_node_debug_event(s->file->node, VD_BLKDBG_REFBLOCK_LOAD);
}

/* A new reference to an existing cluster (not an allocation) must point
 * inside the file or among the clusters this session allocated: a
 * corrupt offset far past the end would otherwise create refcount blocks
 * (and grow the file) all the way out to it. */
static int check_reference_frontier(qcow2_state *s, uint64_t cluster_index,
                                    vd_error *err)
{
    int64_t flen = vd_node_getlength(s->file->node);
    uint64_t frontier = flen > 0 ? qcow2_size_to_clusters(s, flen) : 0;

    if (frontier < s->alloc_end) {
        frontier = s->alloc_end;
    }
    if (cluster_index >= frontier) {
        return vd_error_set(err, -EIO, "%s: refusing to reference cluster "
                            "0x%llx: it lies past the end of the file (0x%llx "
                            "clusters)", s->filename,
                            (unsigned long long)(cluster_index <<
                                                 s->cluster_bits),
                            (unsigned long long)frontier);
    }
    return 0;
}

/* ---- a refcount block held across a walk ------------------------------ */

void qcow2_refblock_release(qcow2_state *s, qcow2_refblock_hold *h)
{
    if (h->block) {
        qcow2_cache_put(s->refcount_cache, &h->block);
    }
}

/* Makes @h hold the refcount block of @cluster_index: 1 when it does, 0
 * when the cluster has no block (nothing held), < 0 on error. */
static int hold_block(qcow2_state *s, qcow2_refblock_hold *h,
                      uint64_t cluster_index, vd_error *err)
{
    uint64_t rt_index = cluster_index >> s->refcount_block_bits;
    int64_t off;
    int ret;

    if (h->block && h->rt_index == rt_index) {
        return 1;
    }
    qcow2_refblock_release(s, h);
    off = refblock_offset(s, rt_index, err);
    if (off <= 0) {
        return (int)off;
    }
    ret = qcow2_cache_get(s, s->refcount_cache, (uint64_t)off, &h->block,
                          err);
    if (ret < 0) {
        return ret;
    }
    h->rt_index = rt_index;
    return 1;
}

int qcow2_held_get_refcount(qcow2_state *s, qcow2_refblock_hold *h,
                            uint64_t cluster_index, uint64_t *refcount,
                            vd_error *err)
{
    int ret = hold_block(s, h, cluster_index, err);

    *refcount = 0;
    if (ret <= 0) {
        return ret;
    }
    *refcount = qcow2_refblock_get(s, h->block, cluster_index &
                                   (s->refcount_block_size - 1));
    return 0;
}

/* One refcount change through @h: the events, the block held, the
 * change. A cluster without a refcount block is an error here: the
 * callers create blocks (update_refcount()) or validated the references
 * (the walks) first. */
static int change_held(qcow2_state *s, qcow2_refblock_hold *h,
                       uint64_t cluster_index, uint64_t addend, bool decrease,
                       qcow2_discard_type type, uint64_t *refcount,
                       vd_error *err)
{
    int ret;

    refblock_events(s);
    ret = hold_block(s, h, cluster_index, err);
    if (ret < 0) {
        return ret;
    }
    if (ret == 0) {
        return vd_error_set(err, -EIO, "%s: no refcount block for cluster "
                            "0x%llx", s->filename,
                            (unsigned long long)cluster_index);
    }
    return change_in_block(s, h->block, cluster_index, addend, decrease, type,
                           refcount, err);
}

static int change_one(qcow2_state *s, uint64_t cluster_index, uint64_t addend,
                      bool decrease, qcow2_discard_type type, vd_error *err)
{
    qcow2_refblock_hold h = { 0 };
    int ret = change_held(s, &h, cluster_index, addend, decrease, type, NULL,
                          err);

    qcow2_refblock_release(s, &h);
    return ret;
}

int qcow2_held_update_refcount(qcow2_state *s, qcow2_refblock_hold *h,
                               uint64_t cluster_index, bool decrease,
                               qcow2_discard_type type, uint64_t *refcount,
                               vd_error *err)
{
    int ret;

    /* The same guards as update_refcount() where they are cheap: what a
     * change relies on was validated (checked again when the walk moves
     * to another block), and nothing gains a reference past the clusters
     * the file or this session holds. */
    if (!(h->block &&
          h->rt_index == cluster_index >> s->refcount_block_bits)) {
        ret = qcow2_begin_change(s, err);
        if (ret < 0) {
            return ret;
        }
    }
    if (!decrease && !s->repairing) {
        ret = check_reference_frontier(s, cluster_index, err);
        if (ret < 0) {
            return ret;
        }
    }
    return change_held(s, h, cluster_index, 1, decrease, type, refcount, err);
}

/*
 * The update behind qcow2_update_refcount() and the allocators. @alloc:
 * the range was just found free by an allocator (it may lie at or past
 * the end of the file: that is how the file grows). Any other increase
 * adds a reference to a cluster something already points at, which must
 * lie inside the file or among the clusters allocated in this session:
 * a corrupt offset far past the end would otherwise create refcount
 * blocks (and grow the file) all the way out to it.
 */
static int update_refcount(qcow2_state *s, uint64_t offset, uint64_t length,
                           uint64_t addend, bool decrease,
                           qcow2_discard_type type, bool alloc, vd_error *err)
{
    uint64_t first, last;
    int ret;

    if (length == 0 || addend == 0) {
        return 0;
    }
    /* Every metadata change passes here: the structures it relies on
     * must have been validated before anything is written. */
    ret = qcow2_begin_change(s, err);
    if (ret < 0) {
        return ret;
    }
    if (offset > QCOW2_MAX_HOST_OFFSET || length > QCOW2_MAX_HOST_OFFSET) {
        return vd_error_set(err, -EIO, "%s: refcount update of an invalid "
                            "range 0x%llx+0x%llx", s->filename,
                            (unsigned long long)offset,
                            (unsigned long long)length);
    }
    first = offset >> s->cluster_bits;
    last = (offset + length - 1) >> s->cluster_bits;
    if (!decrease && !alloc && !s->repairing) {
        ret = check_reference_frontier(s, last, err);
        if (ret < 0) {
            return ret;
        }
    }

    if (decrease) {
        /* The L2 entries that dropped these clusters must reach the disk
         * before refcounts that let the clusters be reused. */
        ret = qcow2_cache_set_dependency(s, s->refcount_cache, s->l2_cache,
                                         err);
        if (ret < 0) {
            return ret;
        }
    } else {
        for (uint64_t c = first; c <= last; c++) {
            ret = ensure_refblock(s, c, err);
            if (ret < 0) {
                return ret;
            }
        }
    }
    /* Validate first so that a failure leaves nothing half done. */
    for (uint64_t c = first; c <= last; c++) {
        uint64_t rc;
        ret = qcow2_get_refcount(s, c, &rc, err);
        if (ret < 0) {
            return ret;
        }
        if (decrease ? rc < addend : s->refcount_max - rc < addend) {
            return vd_error_set(err, -EINVAL, "%s: refcount of cluster "
                                "0x%llx would %s", s->filename,
                                (unsigned long long)c,
                                decrease ? "drop below 0" : "overflow");
        }
    }
    for (uint64_t c = first; c <= last; c++) {
        ret = change_one(s, c, addend, decrease, type, err);
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

int qcow2_update_refcount(qcow2_state *s, uint64_t offset, uint64_t length,
                          uint64_t addend, bool decrease,
                          qcow2_discard_type type, vd_error *err)
{
    return update_refcount(s, offset, length, addend, decrease, type, false,
                           err);
}

/*
 * An allocation settles after a few rounds: each round that had to create
 * refcount blocks leaves them in place, so the next finds them. Only
 * refcounts that change under the allocator's feet (a damaged image
 * whose "free" clusters are its own refcount structures) could make it
 * go round for ever, writing as it goes; this bound stops that.
 */
#define MAX_ALLOC_ROUNDS 64

static int too_many_rounds(qcow2_state *s, int *rounds, vd_error *err)
{
    if (++*rounds > MAX_ALLOC_ROUNDS) {
        return vd_error_set(err, -EIO, "%s: cluster allocation does not "
                            "settle (damaged refcounts?)", s->filename);
    }
    return 0;
}

int64_t qcow2_alloc_clusters(qcow2_state *s, uint64_t size, vd_error *err)
{
    uint64_t n = qcow2_size_to_clusters(s, size);
    int64_t off;
    int rounds = 0;
    int ret;

    ret = qcow2_begin_change(s, err);

    if (ret < 0) {
        return ret;
    }
    /* After vdisk's own validation reads, which QEMU does not have: the
     * allocation's first I/O is what follows QEMU's event. */
    vd_node_debug_event(s->file->node, VD_BLKDBG_CLUSTER_ALLOC);
    if (n == 0) {
        n = 1;
    }
    for (;;) {
        bool retry = false;
        ret = too_many_rounds(s, &rounds, err);
        if (ret < 0) {
            return ret;
        }
        off = find_free(s, n, err);
        if (off < 0) {
            return off;
        }
        {
            uint64_t first = (uint64_t)off >> s->cluster_bits;
            uint64_t missing = 0;
            for (uint64_t r = first >> s->refcount_block_bits;
                 r <= (first + n - 1) >> s->refcount_block_bits; r++) {
                missing += block_missing(s, r);
            }
            if (missing > 1 ||
                ((first + n - 1) >> s->refcount_block_bits) >=
                s->refcount_table_size) {
                /* Place all the blocks past the range at once rather
                 * than one by one inside it. */
                ret = populate_area(s, first, first + n, err);
                if (ret < 0) {
                    return ret;
                }
                continue;
            }
        }
        for (uint64_t c = 0; c < n; c++) {
            ret = ensure_refblock(s, ((uint64_t)off >> s->cluster_bits) + c,
                                  err);
            if (ret < 0) {
                return ret;
            }
            if (ret > 0) {
                retry = true;
                break;
            }
        }
        if (!retry) {
            break;
        }
    }
    if ((uint64_t)off + n * s->cluster_size > QCOW2_MAX_HOST_OFFSET) {
        return vd_error_set(err, -EFBIG, "%s: host offset limit reached",
                            s->filename);
    }
    ret = update_refcount(s, (uint64_t)off, n << s->cluster_bits, 1, false,
                          QCOW2_DISCARD_NEVER, true, err);
    if (ret < 0) {
        return ret;
    }
    return off;
}

int64_t qcow2_alloc_clusters_at(qcow2_state *s, uint64_t offset,
                                uint64_t nb_clusters, vd_error *err)
{
    uint64_t first = offset >> s->cluster_bits;
    uint64_t i;
    int rounds = 0;
    int ret = qcow2_begin_change(s, err);

    if (ret < 0) {
        return ret;
    }
    for (;;) {
        bool retry = false;
        ret = too_many_rounds(s, &rounds, err);
        if (ret < 0) {
            return ret;
        }
        for (i = 0; i < nb_clusters; i++) {
            uint64_t rc;
            /* QEMU's allocators load the block (blkdebug's refblock_load). */
            vd_node_debug_event(s->file->node, VD_BLKDBG_REFBLOCK_LOAD);
            ret = qcow2_get_refcount(s, first + i, &rc, err);
            if (ret < 0) {
                return ret;
            }
            if (rc != 0) {
                break;
            }
        }
        nb_clusters = i;
        for (i = 0; i < nb_clusters; i++) {
            ret = ensure_refblock(s, first + i, err);
            if (ret < 0) {
                return ret;
            }
            if (ret > 0) {
                retry = true;
                break;
            }
        }
        if (!retry) {
            break;
        }
    }
    if (nb_clusters == 0) {
        return 0;
    }
    ret = update_refcount(s, offset, nb_clusters << s->cluster_bits, 1,
                          false, QCOW2_DISCARD_NEVER, true, err);
    return ret < 0 ? ret : (int64_t)nb_clusters;
}

int64_t qcow2_alloc_bytes(qcow2_state *s, uint64_t size, vd_error *err)
{
    uint64_t offset = s->free_byte_offset;
    uint64_t free_in_cluster;
    int rounds = 0;
    int ret;

    ret = qcow2_begin_change(s, err);

    if (ret < 0) {
        return ret;
    }
    /* After vdisk's own validation reads, which QEMU does not have: the
     * allocation's first I/O is what follows QEMU's event. */
    vd_node_debug_event(s->file->node, VD_BLKDBG_CLUSTER_ALLOC_BYTES);
    if (size == 0 || size > s->cluster_size) {
        return vd_error_set(err, -EINVAL, "%s: bad compressed allocation "
                            "size %llu", s->filename,
                            (unsigned long long)size);
    }
    if (offset) {
        uint64_t rc;
        /* QEMU's allocators load the block (blkdebug's refblock_load). */
        vd_node_debug_event(s->file->node, VD_BLKDBG_REFBLOCK_LOAD);
        ret = qcow2_get_refcount(s, offset >> s->cluster_bits, &rc, err);
        if (ret < 0) {
            return ret;
        }
        if (rc == s->refcount_max) {
            offset = 0;
        }
    }
    free_in_cluster = s->cluster_size - qcow2_offset_into_cluster(s, offset);
    if (!offset || free_in_cluster < size) {
        /* Continue into the next cluster when it happens to be free and
         * adjacent, else start a fresh one, as QEMU does. */
        int64_t next;
        for (;;) {
            bool retry = false;
            ret = too_many_rounds(s, &rounds, err);
            if (ret < 0) {
                return ret;
            }
            next = find_free(s, 1, err);
            if (next < 0) {
                return next;
            }
            ret = ensure_refblock(s, (uint64_t)next >> s->cluster_bits, err);
            if (ret < 0) {
                return ret;
            }
            retry = ret > 0;
            if (!retry) {
                break;
            }
        }
        if (!offset ||
            ((offset + s->cluster_size - 1) & ~(s->cluster_size - 1)) !=
            (uint64_t)next) {
            offset = (uint64_t)next;
        }
    }
    if (offset > s->cluster_offset_mask) {
        return vd_error_set(err, -EFBIG, "%s: compressed data beyond the "
                            "descriptor's reach", s->filename);
    }
    ret = update_refcount(s, offset, size, 1, false, QCOW2_DISCARD_NEVER,
                          true, err);
    if (ret < 0) {
        return ret;
    }
    s->free_byte_offset = offset + size;
    if (qcow2_offset_into_cluster(s, s->free_byte_offset) == 0) {
        s->free_byte_offset = 0;
    }
    return (int64_t)offset;
}

int qcow2_free_clusters(qcow2_state *s, uint64_t offset, uint64_t size,
                        qcow2_discard_type type, vd_error *err)
{
    vd_node_debug_event(s->file->node, VD_BLKDBG_CLUSTER_FREE);
    return qcow2_update_refcount(s, offset, size, 1, true, type, err);
}

int qcow2_free_any_cluster(qcow2_state *s, uint64_t l2_entry,
                           qcow2_discard_type type, vd_error *err)
{
    uint64_t host, bytes;

    if (l2_entry & QCOW2_OFLAG_COMPRESSED) {
        qcow2_parse_compressed(s, l2_entry, &host, &bytes);
        /* The descriptor's sector count may overstate the data by up to
         * a sector; QEMU frees by the same sector-rounded span. */
        return qcow2_free_clusters(s, host, bytes, type, err);
    }
    host = l2_entry & QCOW2_L2E_OFFSET_MASK;
    if (s->data_file != s->file) {
        if (s->discard_passthrough[type] && (l2_entry & QCOW2_OFLAG_COPIED)) {
            vd_node_pdiscard(s->data_file->node, host, s->cluster_size, NULL);
        }
        return 0;
    }
    if (host == 0) {
        return 0;
    }
    return qcow2_free_clusters(s, host, s->cluster_size, type, err);
}

static int cmp_range(const void *a, const void *b)
{
    const qcow2_discard_range *x = *(qcow2_discard_range *const *)a;
    const qcow2_discard_range *y = *(qcow2_discard_range *const *)b;

    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/*
 * One discard per run of adjacent freed clusters, in file order, as
 * QEMU's merging queue ends up with: on a file system that discards the
 * device synchronously (ext4 -o discard) every call costs milliseconds,
 * and a snapshot apply frees thousands of clusters that were allocated
 * side by side but are reached one by one in guest order. The ranges are
 * all free on disk already (the caller flushed the refcounts), so their
 * order does not matter for safety.
 */
void qcow2_process_discards(qcow2_state *s)
{
    qcow2_discard_range **v;
    size_t n = 0, i = 0;

    for (qcow2_discard_range *d = s->discards; d; d = d->next) {
        n++;
    }
    v = n > 1 ? malloc(n * sizeof(*v)) : NULL;
    if (v) {
        for (qcow2_discard_range *d = s->discards; d; d = d->next) {
            v[i++] = d;
        }
        qsort(v, n, sizeof(*v), cmp_range);
        for (i = 0; i < n;) {
            uint64_t off = v[i]->offset, end = off + v[i]->bytes;
            size_t j = i + 1;
            while (j < n && v[j]->offset <= end) {
                if (v[j]->offset + v[j]->bytes > end) {
                    end = v[j]->offset + v[j]->bytes;
                }
                j++;
            }
            /* Advisory: a failed discard only costs space. */
            vd_node_pdiscard(s->file->node, off, end - off, NULL);
            while (i < j) {
                free(v[i++]);
            }
        }
        free(v);
        s->discards = NULL;
        return;
    }
    /* One range, or no memory to sort: in queue order. */
    while (s->discards) {
        qcow2_discard_range *d = s->discards;
        s->discards = d->next;
        vd_node_pdiscard(s->file->node, d->offset, d->bytes, NULL);
        free(d);
    }
}

/* Whether refcount block @block (at host @off, table index @rt_index)
 * counts nothing but, where it lies in its own range, itself. */
static bool refblock_unused(qcow2_state *s, const void *block, uint64_t off,
                            uint64_t rt_index)
{
    uint64_t self = off >> s->cluster_bits;
    uint64_t first = rt_index << s->refcount_block_bits;

    for (uint64_t i = 0; i < s->refcount_block_size; i++) {
        if (first + i != self && qcow2_refblock_get(s, block, i)) {
            return false;
        }
    }
    return true;
}

int qcow2_shrink_reftable(qcow2_state *s, vd_error *err)
{
    uint32_t n = s->refcount_table_size;
    uint64_t *table = calloc(n ? n : 1, 8);
    bool *drop = calloc(n ? n : 1, sizeof(*drop));
    bool any = false;
    int ret = 0;

    if (!table || !drop) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
        goto out;
    }
    /* The whole table is rewritten from memory below: entries of new
     * blocks may go to disk only after the blocks. */
    ret = qcow2_cache_write(s, s->refcount_cache, err);
    if (ret < 0) {
        goto out;
    }
    for (uint32_t i = 0; i < n; i++) {
        int64_t off = refblock_offset(s, i, err);
        void *block;

        if (off < 0) {
            ret = (int)off;
            goto out;
        }
        table[i] = htobe64(s->refcount_table[i]);
        if (off == 0) {
            continue;
        }
        ret = qcow2_cache_get(s, s->refcount_cache, (uint64_t)off, &block,
                              err);
        if (ret < 0) {
            goto out;
        }
        drop[i] = refblock_unused(s, block, (uint64_t)off, i);
        qcow2_cache_put(s->refcount_cache, &block);
        if (drop[i]) {
            table[i] = 0;
            any = true;
        }
    }
    if (!any) {
        goto out;
    }
    /* The table without them reaches the disk first: a crash after it
     * leaves at most the blocks' own clusters counted (leaked) in a
     * block that stays. */
    ret = qcow2_pre_write_overlap_check(s, QCOW2_OL_REFCOUNT_TABLE,
                                        s->refcount_table_offset,
                                        (uint64_t)n * 8, false, err);
    if (ret == 0) {
        ret = vd_child_pwrite(s->file, s->refcount_table_offset, table,
                              (uint64_t)n * 8, 0, err);
    }
    if (ret == 0) {
        ret = vd_node_flush(s->file->node, err);
    }
    for (uint32_t i = 0; i < n; i++) {
        uint64_t off = s->refcount_table[i] & QCOW2_REFT_OFFSET_MASK;
        uint64_t cluster = off >> s->cluster_bits;

        if (!drop[i]) {
            continue;
        }
        s->refcount_table[i] = 0;
        qcow2_cache_discard(s->refcount_cache, off);
        qcow2_overlap_changed(s);
        if (ret < 0) {
            /* The table on disk may be half written: forget the blocks
             * in memory too (QEMU does the same), leaking at most. */
            continue;
        }
        /* A block that lay in its own range took its count with it;
         * one counted by a block that stays is given back there. */
        if ((cluster >> s->refcount_block_bits) != i &&
            !block_missing(s, cluster >> s->refcount_block_bits)) {
            int r = change_one(s, cluster, 1, true, QCOW2_DISCARD_OTHER,
                               err);
            if (r < 0) {
                ret = r;
            }
        } else if (cluster < s->free_cluster_index) {
            s->free_cluster_index = cluster;
        }
        /* Given back to the file whatever the discard options say, as
         * QEMU's qcow2_discard_refcount_block() does. */
        queue_discard(s, off);
    }
out:
    free(table);
    free(drop);
    return ret;
}

/*
 * Whether the image looks preallocated with metadata: more clusters have
 * a refcount than the file has allocated (QEMU's threshold: 10/9 of the
 * allocated clusters, at least two more). Block status then asks the file
 * whether "allocated" data clusters are really holes, as QEMU does only
 * for such images. Takes s->lock.
 */
bool qcow2_detect_metadata_preallocation(qcow2_state *s)
{
    vd_node *f = s->file->node;
    int64_t flen = vd_node_getlength(f);
    int64_t falloc = f->drv->get_allocated_size
                     ? f->drv->get_allocated_size(f) : -1;
    if (flen < 0 || falloc < 0)
        return false;
    uint64_t real = (uint64_t)falloc / s->cluster_size;
    uint64_t threshold = real * 10 / 9 > real + 2 ? real * 10 / 9 : real + 2;
    uint64_t end = qcow2_size_to_clusters(s, (uint64_t)flen), count = 0;
    pthread_mutex_lock(&s->lock);
    for (uint64_t i = 0; i < end && count < threshold; i++) {
        uint64_t rc = 0;
        if (qcow2_get_refcount(s, i, &rc, NULL) < 0)
            break;
        count += rc != 0;
    }
    pthread_mutex_unlock(&s->lock);
    return count >= threshold;
}
