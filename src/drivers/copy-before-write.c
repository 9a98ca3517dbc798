/*
 * The "copy-before-write" filter (QEMU 7.2's block/copy-before-write.c),
 * the heart of fleecing: inserted above a node (its "file" child, the
 * source), it copies what every write, zero write and discard through it
 * is about to change into its "target" child first, so that the source
 * as it was when the filter was opened stays readable through the
 * snapshot API (the vtable's preadv_snapshot & co), which a
 * snapshot-access node above the filter turns into an ordinary node to
 * export (src/drivers/snapshot-access.c, docs/jobs.md "Fleecing").
 *
 * Three bitmaps of clusters (64 KiB, or the target's larger cluster, as
 * QEMU's block-copy) under the filter's lock: @todo, what still has to
 * be copied before it may change (all of it at first); @done, what the
 * target holds; @access, what the snapshot may still be read in (a
 * discard through the snapshot gives a range up: it is neither copied
 * nor readable any more). A cluster is claimed before it is copied (its
 * @todo bit cleared, the cluster marked busy), so two writes never copy
 * it twice and a second write waits for the first one's copy.
 *
 * A snapshot read takes a cluster run from the target where @done says
 * it was copied, else from the source, and while it reads the source it
 * holds that range "frozen": a write that has copied the range waits
 * until no such read is left before it goes on, so the read never sees
 * the new data. QEMU's order, which needs no lock across the I/O.
 *
 * Errors (on-cbw-error): break-guest-write (the default) fails the write
 * whose copy failed, and the cluster stays to be copied; break-snapshot
 * lets the write and every later one through uncopied and fails every
 * snapshot request from then on (-EACCES), so a broken point in time is
 * never read as a good one. cbw-timeout: QEMU abandons a copy that takes
 * longer; a copy here runs on the writer's own thread and cannot be
 * abandoned, so it finishes and is then counted as failed with
 * -ETIMEDOUT (docs/jobs.md).
 *
 * The bitmap option, as QEMU's: only the clusters a dirty bitmap marks
 * (read once, at open) are copied before writes, and only those can be
 * read through the snapshot; the rest fail with -EACCES. A backup tool
 * uses it to fleece just what changed since its last backup.
 *
 * Permissions as QEMU's cbw_child_perm(): the target is written and
 * shared with all but resize; the source gets a filter's permissions,
 * and once the filter has any parent it also reads the source
 * consistently and lets nobody else write or resize it (every write must
 * come through the filter).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/job_int.h"
#include "vdisk/bitmap.h"

#define CBW_CLUSTER_DEFAULT 65536u

enum { BREAK_GUEST_WRITE, BREAK_SNAPSHOT };
static const char *const on_cbw_error_names[] = { "break-guest-write",
                                                  "break-snapshot", NULL };

/* A range in use: a cluster being copied, or a snapshot read of the
 * source. */
typedef struct cbw_range {
    uint64_t off, end;
    struct cbw_range *next;
} cbw_range;

typedef struct cbw_state {
    vd_child *target;
    int on_error;
    uint64_t timeout_ns;       /* 0: none */
    uint64_t cluster, len;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool lock_init;
    uint64_t nclusters;
    uint64_t *todo, *done, *access;  /* a bit per cluster */
    cbw_range *copying;        /* clusters claimed by a write */
    cbw_range *frozen;         /* snapshot reads of the source */
    int snapshot_error;        /* < 0: the snapshot is broken */
} cbw_state;

/* The bitmaps: flat, a bit per cluster, so that a request tests its
 * clusters in constant time each. */
static bool bit(const uint64_t *m, uint64_t c)
{
    return m[c / 64] >> (c % 64) & 1;
}

static void put_bits(uint64_t *m, uint64_t from, uint64_t to, bool on)
{
    for (uint64_t c = from; c < to; c++) {
        if (on)
            m[c / 64] |= 1ull << (c % 64);
        else
            m[c / 64] &= ~(1ull << (c % 64));
    }
}

static uint64_t *bits_new(uint64_t n)
{
    return calloc(n / 64 + 1, sizeof(uint64_t));
}

static bool overlaps(const cbw_range *list, uint64_t off, uint64_t end)
{
    for (; list; list = list->next)
        if (list->off < end && off < list->end)
            return true;
    return false;
}

static void unlink_range(cbw_range **list, cbw_range *r)
{
    for (cbw_range **p = list; *p; p = &(*p)->next) {
        if (*p == r) {
            *p = r->next;
            return;
        }
    }
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* QEMU's block-copy cluster: 64 KiB, or the target's larger cluster. */
static uint64_t copy_cluster_size(vd_node *target)
{
    vd_image_info *info = NULL;
    uint64_t c = CBW_CLUSTER_DEFAULT;
    if (vd_get_info(target, &info, NULL) == 0) {
        if (info->cluster_size > 0 && (uint64_t)info->cluster_size > c)
            c = (uint64_t)info->cluster_size;
        vd_image_info_free(&info);
    }
    return c;
}

/* Whether some option of @opts starts with @prefix. */
static bool has_prefix(const vd_opts *opts, const char *prefix)
{
    for (size_t i = 0; i < vd_opts_count(opts); i++) {
        const char *k, *v;
        vd_opts_nth(opts, i, &k, &v);
        if (strncmp(k, prefix, strlen(prefix)) == 0)
            return true;
    }
    return false;
}

static int cbw_open(vd_node *node, vd_opts *opts, unsigned flags,
                    vd_error *err)
{
    cbw_state *s = node->opaque;
    int r = 0;

    (void)flags;
    char *bm_node = vd_opts_take(opts, "bitmap.node");
    char *bm_name = vd_opts_take(opts, "bitmap.name");
    char *on_error_s = vd_opts_take(opts, "on-cbw-error");
    char *timeout_s = vd_opts_take(opts, "cbw-timeout");
    int on_error = BREAK_GUEST_WRITE;
    uint64_t timeout = 0;
    /* QEMU parses these with its QAPI visitor (messages as QMP's schema
     * gives them, for json: file names and command lines). */
    if (!vd_opts_get(opts, "target") && !has_prefix(opts, "target.")) {
        r = vd_error_set(err, -EINVAL, "Parameter 'target' is missing");
    } else if (on_error_s) {
        for (on_error = 0; on_cbw_error_names[on_error] &&
             strcmp(on_cbw_error_names[on_error], on_error_s); on_error++) {
        }
        if (!on_cbw_error_names[on_error])
            r = vd_error_set(err, -EINVAL, "Parameter 'on-cbw-error' does "
                             "not accept value '%s'", on_error_s);
    }
    if (r == 0 && timeout_s) {
        char *end;
        errno = 0;
        timeout = strtoull(timeout_s, &end, 0);
        if (errno || end == timeout_s || *end)
            r = vd_error_set(err, -EINVAL, "Parameter 'cbw-timeout' expects "
                             "integer");
        else if (timeout > UINT32_MAX)
            r = vd_error_set(err, -EINVAL, "Parameter 'cbw-timeout' expects "
                             "uint32_t");
    }
    free(on_error_s);
    free(timeout_s);
    if (r < 0)
        goto out;
    s->on_error = on_error;
    s->timeout_ns = timeout * 1000000000ull;
    s->target = vd_node_open_child(node, opts, "target", NULL, VD_ROLE_DATA,
                                   false, err);
    if (!s->target) {
        r = err && err->code ? err->code : -EINVAL;
        goto out;
    }
    vd_node *bm_owner = NULL;
    if (bm_node || bm_name) {
        /* QEMU's block_dirty_bitmap_lookup(), then the checks of
         * bdrv_merge_dirty_bitmap() on a source. */
        bm_owner = bm_node ? vd_find_node(bm_node) : NULL;
        vd_bitmap_info info;
        if (!bm_owner) {
            r = vd_error_set(err, -ENOENT, "Node '%s' not found",
                             bm_node ? bm_node : "");
            goto out;
        }
        r = vd_bitmap_get_info(bm_owner, bm_name ? bm_name : "", &info,
                               err);
        if (r < 0)
            goto out;
        free(info.name);
        if (info.busy)
            r = vd_error_set(err, -EBUSY, "Bitmap '%s' is currently in use "
                             "by another operation and cannot be used",
                             bm_name);
        else if (info.inconsistent)
            r = vd_error_set(err, -EINVAL, "Bitmap '%s' is inconsistent and "
                             "cannot be used", bm_name);
        if (r < 0)
            goto out;
    }
    int64_t len = vd_node_getlength(node->file->node);
    if (len < 0) {
        r = vd_error_set(err, (int)len, "Unable to get length for '%s'",
                         node->file->node->node_name);
        goto out;
    }
    s->len = (uint64_t)len;
    s->cluster = copy_cluster_size(s->target->node);
    s->nclusters = (s->len + s->cluster - 1) / s->cluster;
    s->todo = bits_new(s->nclusters);
    s->done = bits_new(s->nclusters);
    s->access = bits_new(s->nclusters);
    if (!s->todo || !s->done || !s->access) {
        r = vd_error_set(err, -ENOMEM, "Cannot create block-copy-state: "
                         "Out of memory");
        goto out;
    }
    if (bm_owner) {
        /* Only what the bitmap marks is copied before writes, and only
         * that can be read through the snapshot (QEMU's access bitmap
         * starts as the copy bitmap): a dirty granule marks every
         * cluster it touches. */
        uint64_t pos = 0, start, bytes;
        while ((r = vd_bitmap_next_dirty(bm_owner, bm_name, pos, &start,
                                         &bytes, err)) > 0 &&
               start < s->len) {
            uint64_t end = start + bytes < s->len ? start + bytes : s->len;
            put_bits(s->todo, start / s->cluster,
                     (end + s->cluster - 1) / s->cluster, true);
            pos = end;
        }
        if (r < 0)
            goto out;
        r = 0;
        memcpy(s->access, s->todo, (s->nclusters / 64 + 1) * sizeof(uint64_t));
    } else {
        put_bits(s->todo, 0, s->nclusters, true);
        put_bits(s->access, 0, s->nclusters, true);
    }
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    s->lock_init = true;
out:
    free(bm_node);
    free(bm_name);
    if (r < 0) {
        /* The core does not call close after a failed open. */
        free(s->todo);
        free(s->done);
        free(s->access);
        s->todo = s->done = s->access = NULL;
    }
    return r;
}

static void cbw_close(vd_node *node)
{
    cbw_state *s = node->opaque;

    free(s->todo);
    free(s->done);
    free(s->access);
    s->todo = s->done = s->access = NULL;
    if (s->lock_init) {
        pthread_mutex_destroy(&s->lock);
        pthread_cond_destroy(&s->cond);
        s->lock_init = false;
    }
}

/* Copies cluster @c (claimed) from the source to the target. */
static int copy_one(vd_node *node, uint64_t c, uint8_t *buf, vd_error *err)
{
    cbw_state *s = node->opaque;
    uint64_t off = c * s->cluster;
    uint64_t len = s->len - off < s->cluster ? s->len - off : s->cluster;
    bool in_source;
    uint64_t t0 = s->timeout_ns ? now_ns() : 0;
    int r = vd_block_job_copy(node->file->node, s->target->node, off, len,
                              buf, 0, VD_REQ_MAY_UNMAP, &in_source, err);
    if (r == 0 && s->timeout_ns && now_ns() - t0 > s->timeout_ns)
        r = vd_error_set(err, -ETIMEDOUT, "copy-before-write timed out");
    return r;
}

/*
 * What precedes every change of [off, off+bytes) of the source: each
 * cluster still to copy is claimed, copied and marked done; then the
 * write waits until no snapshot read of the source overlaps the range.
 * Returns what the write must fail with (break-guest-write), else 0.
 */
static int before_write(vd_node *node, uint64_t off, uint64_t bytes,
                        vd_error *err)
{
    cbw_state *s = node->opaque;
    if (off >= s->len || bytes == 0)
        return 0;
    uint64_t end = off + bytes < s->len ? off + bytes : s->len;
    uint64_t first = off / s->cluster;
    uint64_t aoff = first * s->cluster;
    uint64_t aend = (end + s->cluster - 1) / s->cluster * s->cluster;
    uint8_t *buf = NULL;
    int r = 0;

    pthread_mutex_lock(&s->lock);
    bool broken = s->snapshot_error < 0;
    pthread_mutex_unlock(&s->lock);
    if (broken)
        return 0;
    for (uint64_t c = first; r == 0 && c * s->cluster < end; c++) {
        cbw_range slot = { c * s->cluster, (c + 1) * s->cluster, NULL };
        pthread_mutex_lock(&s->lock);
        while (overlaps(s->copying, slot.off, slot.end))
            pthread_cond_wait(&s->cond, &s->lock);
        bool take = bit(s->todo, c);
        if (take) {
            put_bits(s->todo, c, c + 1, false);
            slot.next = s->copying;
            s->copying = &slot;
        }
        pthread_mutex_unlock(&s->lock);
        if (!take)
            continue;
        vd_error e = VD_ERROR_INIT;
        if (!buf && !(buf = vd_node_blockalign(node->file->node,
                                               s->cluster)))
            r = vd_error_set(&e, -ENOMEM, "Out of memory");
        else
            r = copy_one(node, c, buf, &e);
        pthread_mutex_lock(&s->lock);
        unlink_range(&s->copying, &slot);
        if (r == 0) {
            put_bits(s->done, c, c + 1, true);
        } else {
            /* Still to copy: a later write tries again (and a broken
             * snapshot no longer asks for it anyway). */
            put_bits(s->todo, c, c + 1, true);
            if (s->on_error == BREAK_SNAPSHOT && s->snapshot_error == 0)
                s->snapshot_error = r;
        }
        pthread_cond_broadcast(&s->cond);
        pthread_mutex_unlock(&s->lock);
        if (r < 0 && s->on_error == BREAK_GUEST_WRITE) {
            free(buf);
            vd_error_set(err, r, "%s", e.message);
            return r;
        }
    }
    free(buf);
    pthread_mutex_lock(&s->lock);
    while (overlaps(s->frozen, aoff, aend))
        pthread_cond_wait(&s->cond, &s->lock);
    pthread_mutex_unlock(&s->lock);
    return 0;
}

static int cbw_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                       vd_iov *qiov, unsigned flags, vd_error *err)
{
    int r = before_write(node, off, bytes, err);
    return r < 0 ? r
           : vd_node_pwritev(node->file->node, off, bytes, qiov, flags, err);
}

static int cbw_pwrite_zeroes(vd_node *node, uint64_t off, uint64_t bytes,
                             unsigned flags, vd_error *err)
{
    int r = before_write(node, off, bytes, err);
    return r < 0 ? r
           : vd_node_pwrite_zeroes(node->file->node, off, bytes, flags, err);
}

static int cbw_pdiscard(vd_node *node, uint64_t off, uint64_t bytes,
                        vd_error *err)
{
    int r = before_write(node, off, bytes, err);
    return r < 0 ? r : vd_node_pdiscard(node->file->node, off, bytes, err);
}

/*
 * Locks the snapshot's first run of [off, off+bytes) that lies in one
 * place: the target (copied) or the source (then frozen in @slot until
 * read_unlock()). -EACCES when the snapshot is broken or any of the
 * range was given up.
 */
static int read_lock(cbw_state *s, vd_node *node, uint64_t off,
                     uint64_t bytes, uint64_t *pnum, vd_node **from,
                     cbw_range *slot)
{
    int r = 0;
    pthread_mutex_lock(&s->lock);
    uint64_t first = off / s->cluster;
    uint64_t end = off + bytes;
    if (s->snapshot_error < 0)
        r = -EACCES;
    for (uint64_t c = first; r == 0 && c * s->cluster < end; c++)
        if (!bit(s->access, c))
            r = -EACCES;
    if (r == 0) {
        bool done = bit(s->done, first);
        uint64_t c = first + 1;
        while (c * s->cluster < end &&
               bit(s->done, c) == done)
            c++;
        uint64_t run_end = c * s->cluster < end ? c * s->cluster : end;
        *pnum = run_end - off;
        *slot = (cbw_range){ off, run_end, NULL };
        if (done) {
            *from = s->target->node;
        } else {
            *from = node->file->node;
            slot->next = s->frozen;
            s->frozen = slot;
        }
    }
    pthread_mutex_unlock(&s->lock);
    return r;
}

/* Ends a read that read_lock() started (@slot: its frozen range, when it
 * read the source). Returns -EACCES when the snapshot broke meanwhile:
 * writes no longer wait for readers then, so what was read may be new. */
static int read_unlock(cbw_state *s, cbw_range *slot, bool frozen)
{
    pthread_mutex_lock(&s->lock);
    if (frozen) {
        unlink_range(&s->frozen, slot);
        pthread_cond_broadcast(&s->cond);
    }
    int r = s->snapshot_error < 0 ? -EACCES : 0;
    pthread_mutex_unlock(&s->lock);
    return r;
}

static int snapshot_refused(vd_error *err)
{
    return vd_error_set(err, -EACCES, "The snapshot is not readable "
                        "there (broken by a failed copy, or discarded)");
}

static int cbw_preadv_snapshot(vd_node *node, uint64_t off, uint64_t bytes,
                               vd_iov *qiov, vd_error *err)
{
    cbw_state *s = node->opaque;
    size_t qoff = 0;

    if (off + bytes > s->len)
        return vd_error_set(err, -EINVAL, "Read beyond the snapshot");
    while (bytes > 0) {
        uint64_t n = 0;
        vd_node *from = NULL;
        cbw_range slot;
        if (read_lock(s, node, off, bytes, &n, &from, &slot) < 0)
            return snapshot_refused(err);
        vd_iov part;
        int r = vd_iov_init_slice(&part, qiov, qoff, n);
        if (r == 0) {
            r = vd_node_preadv(from, off, n, &part, 0, err);
            vd_iov_destroy(&part);
        } else {
            vd_error_set(err, r, "Out of memory");
        }
        int u = read_unlock(s, &slot, from == node->file->node);
        if (r < 0)
            return r;
        if (u < 0)
            return snapshot_refused(err);
        off += n;
        qoff += n;
        bytes -= n;
    }
    return 0;
}

static int cbw_snapshot_block_status(vd_node *node, bool want_zero,
                                     uint64_t off, uint64_t bytes,
                                     uint64_t *pnum, uint64_t *map,
                                     vd_node **file, vd_error *err)
{
    cbw_state *s = node->opaque;
    uint64_t n = 0;
    vd_node *from = NULL;
    cbw_range slot;

    if (read_lock(s, node, off, bytes, &n, &from, &slot) < 0)
        return snapshot_refused(err);
    int depth = 0;
    /* Through the whole chain of where the data is: the target reads
     * through to its backing file (the source, when fleecing) only
     * where nothing was copied, which the run excludes. */
    int r = vd_node_block_status_above(from, NULL, want_zero, off, n, pnum,
                                       map, file, &depth, err);
    if (read_unlock(s, &slot, from == node->file->node) < 0 && r >= 0)
        r = snapshot_refused(err);
    if (r >= 0) {
        /* Nothing anywhere in the chain reads as zeros. The snapshot's
         * data is its own (ALLOCATED) and is read through this node,
         * not where it lies. */
        if (!(r & (VD_BLOCK_DATA | VD_BLOCK_ZERO)))
            r |= VD_BLOCK_ZERO;
        r &= VD_BLOCK_DATA | VD_BLOCK_ZERO;
        r |= VD_BLOCK_ALLOCATED;
        *map = 0;
        *file = NULL;
    }
    return r;
}

/* A discard of the snapshot gives up the clusters it covers whole: they
 * need no copy any more and may not be read; the target's copies are
 * dropped. */
static int cbw_pdiscard_snapshot(vd_node *node, uint64_t off,
                                 uint64_t bytes, vd_error *err)
{
    cbw_state *s = node->opaque;
    uint64_t aoff = (off + s->cluster - 1) / s->cluster * s->cluster;
    uint64_t aend = (off + bytes) / s->cluster * s->cluster;

    if (aend <= aoff)
        return 0;
    pthread_mutex_lock(&s->lock);
    put_bits(s->access, aoff / s->cluster, aend / s->cluster, false);
    put_bits(s->todo, aoff / s->cluster, aend / s->cluster, false);
    pthread_mutex_unlock(&s->lock);
    return vd_node_pdiscard(s->target->node, aoff, aend - aoff, err);
}

static void cbw_child_perm(vd_node *node, const vd_child *c, unsigned perm,
                           unsigned shared, unsigned *nperm,
                           unsigned *nshared)
{
    if (!(c->role & VD_ROLE_FILTERED)) {
        /* The target: written by the copies; others may write it (the
         * guest's disk may be in its backing chain), nobody resize it,
         * since its size was taken at open. */
        *nperm = VD_PERM_WRITE;
        *nshared = VD_PERM_ALL & ~VD_PERM_RESIZE;
        return;
    }
    vd_default_child_perm(node, c, perm, shared, nperm, nshared);
    if (node->parents) {
        *nperm |= VD_PERM_CONSISTENT_READ;
        *nshared &= ~(VD_PERM_WRITE | VD_PERM_RESIZE);
    }
}

/* What the source's storage holds, as QEMU counts a filter's: the
 * target is not part of it. */
static int64_t cbw_allocated_size(vd_node *node)
{
    vd_image_info *info = NULL;
    int64_t r = -ENOTSUP;
    if (vd_get_info(node->file->node, &info, NULL) == 0) {
        r = info->actual_size;
        vd_image_info_free(&info);
    }
    return r;
}

const vd_driver vd_driver_copy_before_write = {
    .name = "copy-before-write",
    .instance_size = sizeof(cbw_state),
    .is_filter = true,
    .flush_primary_only = true,
    .open = cbw_open,
    .close = cbw_close,
    .pwritev = cbw_pwritev,
    .pwrite_zeroes = cbw_pwrite_zeroes,
    .pdiscard = cbw_pdiscard,
    .getlength = vd_filter_getlength,
    .get_allocated_size = cbw_allocated_size,
    .child_perm = cbw_child_perm,
    .preadv_snapshot = cbw_preadv_snapshot,
    .snapshot_block_status = cbw_snapshot_block_status,
    .pdiscard_snapshot = cbw_pdiscard_snapshot,
};
