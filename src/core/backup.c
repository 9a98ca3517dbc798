/*
 * The backup job (QEMU's blockdev-backup): the target becomes the
 * source as it was when the job started, however the source is written
 * meanwhile.
 *
 * A copy bitmap (one bit per cluster of the backup, 64 KiB or the
 * target's larger cluster size, as QEMU's block-copy) holds what is
 * still to copy. The job walks it; a write hook on the source (QEMU's
 * copy-before-write filter, without a node of its own) copies every
 * cluster a write is about to change before the write goes on. A
 * cluster is claimed before it is copied (its bit cleared, the cluster
 * marked in flight), so the job and a write never copy it twice, and a
 * write to a cluster the job is copying waits until the copy is done:
 * the target gets every cluster exactly as it was at the start. A copy
 * that fails puts the bit back; a write whose copy failed fails too
 * (QEMU's on-cbw-error=break-guest-write), so the point in time is never
 * silently lost.
 *
 * sync=full copies every cluster, sync=top those the source's own layer
 * holds, sync=none nothing but what writes are about to change, until
 * the job is cancelled (a fleecing target).
 *
 * Permissions: the job reads the source and lets others write it (the
 * hook sees every write) but not resize it; the target is written by the
 * job and shared with readers (an export of a fleecing target) but not
 * resized, as QEMU's copy-before-write target child.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap_int.h"
#include "job_int.h"

#define BACKUP_CLUSTER_DEFAULT 65536u
/* QEMU's block-copy: a task copies at most 1 MiB (BLOCK_COPY_MAX_BUFFER)
 * of contiguous clusters, several tasks at once. */
#define BACKUP_CHUNK (1u << 20)
#define BACKUP_WORKERS 8

/* Clusters [cluster, cluster + n) being copied. */
typedef struct inflight {
    uint64_t cluster, n;
    struct inflight *next;
} inflight;

typedef struct backup_state {
    vd_node *source, *target;
    vd_mirror_sync sync;
    bool compress;
    /* The bitmap of the source given to the job (bitmap_int.h), or NULL;
     * @frozen while it has a successor. sync=bitmap: @by_bitmap. */
    char *bm_name;
    vd_bitmap_sync_mode bm_mode;
    bool frozen, by_bitmap;
    uint64_t cluster, len;
    vd_dirty_tracker *todo;    /* clusters still to copy */
    pthread_mutex_t lock;      /* claims: @busy, and @todo's bits */
    pthread_cond_t cond;
    inflight *busy;
    vd_write_hook hook;
    bool hooked;
    vd_job *job;
    vd_user *target_user;
    vd_user *below[64];        /* the source's backing chain, unwritable */
    int n_below;
    vd_copy_pool *pool;        /* the job's copies in flight */
    uint64_t chunk;            /* clusters a job's copy takes at most */
} backup_state;

static vd_node *backing_of(vd_node *n)
{
    return n->backing ? n->backing->node : NULL;
}

/* The job's end for its bitmap (QEMU's backup_cleanup_sync_bitmap()):
 * the bitmap takes the successor's place when the job succeeded or the
 * mode is always (not never), else it takes the successor's bits back;
 * a failure with always keeps what was not copied. */
static void bitmap_end(backup_state *s, bool success)
{
    if (!s->frozen)
        return;
    bool sync = (success || s->bm_mode == VD_BITMAP_SYNC_ALWAYS) &&
                s->bm_mode != VD_BITMAP_SYNC_NEVER;
    const vd_hbitmap *left = !success && s->bm_mode == VD_BITMAP_SYNC_ALWAYS
                             ? vd_dirty_tracker_hbitmap(s->todo) : NULL;
    vd_error e = VD_ERROR_INIT;
    if (vd_bitmap_unfreeze(s->source, s->bm_name, sync, left, &e) < 0)
        vd_warn("backup: bitmap '%s': %s", s->bm_name, e.message);
    s->frozen = false;
}

static void backup_commit(vd_job *job)
{
    bitmap_end(job->state, true);
}

static void backup_abort(vd_job *job)
{
    bitmap_end(job->state, false);
}

static bool is_busy(backup_state *s, uint64_t c)
{
    for (inflight *i = s->busy; i; i = i->next)
        if (c >= i->cluster && c < i->cluster + i->n)
            return true;
    return false;
}

static bool is_todo(backup_state *s, uint64_t c)
{
    uint64_t off, bytes;
    return vd_dirty_tracker_next(s->todo, c * s->cluster, s->cluster, &off,
                                 &bytes) &&
           off == c * s->cluster;
}

/* Takes cluster @c and the clusters after it that still need a copy and
 * nobody copies, at most @max in all, for copying: returns how many (0
 * when @c needs no copy any more). Waits while someone else copies @c. */
static uint64_t claim(backup_state *s, uint64_t c, uint64_t max,
                      inflight *slot)
{
    pthread_mutex_lock(&s->lock);
    while (is_busy(s, c))
        pthread_cond_wait(&s->cond, &s->lock);
    uint64_t n = 0;
    while (n < max && (c + n) * s->cluster < s->len &&
           (n == 0 || !is_busy(s, c + n)) && is_todo(s, c + n))
        n++;
    if (n > 0) {
        vd_dirty_tracker_clear(s->todo, c * s->cluster, n * s->cluster);
        slot->cluster = c;
        slot->n = n;
        slot->next = s->busy;
        s->busy = slot;
    }
    pthread_mutex_unlock(&s->lock);
    return n;
}

static void release(backup_state *s, inflight *slot, bool failed)
{
    pthread_mutex_lock(&s->lock);
    for (inflight **p = &s->busy; *p; p = &(*p)->next) {
        if (*p == slot) {
            *p = slot->next;
            break;
        }
    }
    if (failed)
        vd_dirty_tracker_set(s->todo, slot->cluster * s->cluster,
                             slot->n * s->cluster);
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

/* Copies the claimed clusters [c, c+n) from the source to the target. */
static int copy_clusters(backup_state *s, uint64_t c, uint64_t n,
                         uint8_t *buf, bool *in_source, vd_error *err)
{
    uint64_t off = c * s->cluster;
    uint64_t len = s->len - off < n * s->cluster ? s->len - off
                                                  : n * s->cluster;
    return vd_block_job_copy(s->source, s->target, off, len, buf,
                             s->compress ? VD_REQ_COMPRESSED : 0,
                             VD_REQ_MAY_UNMAP, in_source, err);
}

/* The source is about to be written in [off, off+bytes): first copy
 * what the target still needs from there. */
static int before_write(void *opaque, uint64_t off, uint64_t bytes,
                        vd_error *err)
{
    backup_state *s = opaque;
    if (off >= s->len)
        return 0;
    uint64_t end = off + bytes < s->len ? off + bytes : s->len;
    uint8_t *buf = NULL;
    int r = 0;
    uint64_t last = (end - 1) / s->cluster;
    for (uint64_t c = off / s->cluster; r == 0 && c <= last;) {
        inflight slot;
        uint64_t max = last - c + 1 < s->chunk ? last - c + 1 : s->chunk;
        uint64_t n = claim(s, c, max, &slot);
        if (n == 0) {
            c++;
            continue;
        }
        if (!buf && !(buf = vd_node_blockalign(s->source,
                                               s->chunk * s->cluster))) {
            release(s, &slot, true);
            return vd_error_set(err, -ENOMEM, "Out of memory");
        }
        bool in_source;
        r = copy_clusters(s, c, n, buf, &in_source, err);
        release(s, &slot, r < 0);
        if (r == 0)
            vd_job_progress_update(s->job, n * s->cluster);
        c += n;
    }
    free(buf);
    return r;
}

/* A worker's copy of the clusters the job's thread claimed for it: the
 * claim is in s->busy, the first cluster names it. */
static int copy_claimed(void *opaque, uint64_t off, uint64_t len,
                        uint8_t *buf, bool *in_source, vd_error *err)
{
    backup_state *s = opaque;
    uint64_t c = off / s->cluster;
    uint64_t n = (len + s->cluster - 1) / s->cluster;
    int r = copy_clusters(s, c, n, buf, in_source, err);
    pthread_mutex_lock(&s->lock);
    inflight *slot = s->busy;
    while (slot && slot->cluster != c)
        slot = slot->next;
    pthread_mutex_unlock(&s->lock);
    release(s, slot, r < 0);
    free(slot);
    if (r == 0) {
        vd_job_progress_update(s->job, n * s->cluster);
        /* The target is flushed at the end: its disk writes the copies
         * while the job goes on. */
        vd_node_advise(s->target, off, len, VD_ADVISE_WRITEBACK);
    }
    return r;
}

/* Hands the clusters still to copy to the workers, a claimed run of at
 * most a chunk each, until none is left and none is in flight. */
static int backup_loop(vd_job *job, backup_state *s, vd_error *err)
{
    uint64_t cursor = 0, off, bytes;
    for (;;) {
        if (!vd_dirty_tracker_next(s->todo, cursor, s->cluster, &off,
                                   &bytes)) {
            /* A failed copy puts its clusters back: look again once
             * nothing is in flight. */
            int r = vd_copy_pool_settle(job, s->pool, err);
            if (r < 0)
                return r;
            if (vd_job_is_cancelled(job) ||
                !vd_dirty_tracker_next(s->todo, 0, s->cluster, &off, &bytes))
                return 0;
            cursor = 0;
            continue;
        }
        vd_block_job_ratelimit_sleep(job);
        if (vd_job_is_cancelled(job))
            return 0;
        uint64_t c = off / s->cluster;
        cursor = off + s->cluster;
        if (cursor >= s->len)
            cursor = 0;
        inflight *slot = malloc(sizeof(*slot));
        if (!slot)
            return vd_error_set(err, -ENOMEM, "Out of memory");
        uint64_t n = claim(s, c, s->chunk, slot);
        if (n == 0) {
            free(slot);
            continue;
        }
        cursor = (c + n) * s->cluster < s->len ? (c + n) * s->cluster : 0;
        uint64_t len = s->len - c * s->cluster < n * s->cluster
                       ? s->len - c * s->cluster : n * s->cluster;
        vd_copy_pool_submit(s->pool, c * s->cluster, len);
        vd_block_job_ratelimit_processed(job, n * s->cluster);
        if (vd_copy_pool_failed(s->pool)) {
            int r = vd_copy_pool_settle(job, s->pool, err);
            if (r < 0)
                return r;
        }
    }
}

static int backup_run(vd_job *job, vd_error *err)
{
    backup_state *s = job->state;
    if (s->sync == VD_MIRROR_SYNC_NONE) {
        /* Only the hook copies, until the job is cancelled. */
        while (!vd_job_is_cancelled(job))
            vd_job_sleep(job, 100000000ull);
        return 0;
    }
    int ret = backup_loop(job, s, err);
    /* No worker touches the nodes once run() returned. */
    vd_error e = VD_ERROR_INIT;
    int r2 = vd_copy_pool_drain(s->pool, NULL, &e);
    if (ret == 0 && r2 < 0 && !vd_job_is_cancelled(job)) {
        /* QEMU's job ends with the errno's text alone. */
        vd_error_set(err, r2, "%s", strerror(-r2));
        ret = r2;
    }
    if (ret == 0 && !vd_job_is_cancelled(job))
        ret = vd_node_flush(s->target, err);
    return ret;
}

/* (thread) A pause waits for the copies in flight. */
static void backup_pause(vd_job *job)
{
    backup_state *s = job->state;
    if (s->pool)
        vd_copy_pool_drain(s->pool, NULL, NULL);
}

static void drop_users(backup_state *s)
{
    vd_user_free(&s->target_user);
    while (s->n_below > 0)
        vd_user_free(&s->below[--s->n_below]);
}

static void backup_clean(vd_job *job)
{
    backup_state *s = job->state;
    bitmap_end(s, false);
    if (s->hooked) {
        vd_node_remove_write_hook(s->source, &s->hook);
        s->hooked = false;
    }
    vd_copy_pool_free(&s->pool);
    drop_users(s);
    vd_block_job_remove_nodes(job);
    /* The nodes go now, not when the last reference to the job does. */
    vd_node_unref(s->source);
    vd_node_unref(s->target);
    s->source = s->target = NULL;
}

static void state_free(backup_state *s)
{
    vd_copy_pool_free(&s->pool);
    vd_dirty_tracker_free(&s->todo, NULL);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->cond);
    vd_node_unref(s->source);
    vd_node_unref(s->target);
    free(s->bm_name);
    free(s);
}

static void backup_free(vd_job *job)
{
    state_free(job->state);
}

static const vd_job_driver backup_driver = {
    .type = VD_JOB_TYPE_BACKUP,
    .run = backup_run,
    .pause = backup_pause,
    .clean = backup_clean,
    .free = backup_free,
    .commit = backup_commit,
    .abort = backup_abort,
};

/* QEMU's block-copy cluster: 64 KiB, or the target's larger cluster. */
static uint64_t backup_cluster(vd_node *target)
{
    vd_image_info *info = NULL;
    uint64_t c = BACKUP_CLUSTER_DEFAULT;
    if (vd_get_info(target, &info, NULL) == 0) {
        if (info->cluster_size > 0 && (uint64_t)info->cluster_size > c)
            c = (uint64_t)info->cluster_size;
        vd_image_info_free(&info);
    }
    return c;
}

/* The clusters sync asks for. */
static int todo_init(backup_state *s, vd_error *err)
{
    if (s->by_bitmap)
        return 0;                /* the bitmap's, once it is frozen */
    if (s->sync != VD_MIRROR_SYNC_TOP) {
        vd_dirty_tracker_set(s->todo, 0, s->len);
        return 0;
    }
    vd_node *base = backing_of(s->source);
    for (uint64_t off = 0; off < s->len;) {
        uint64_t n = 0, map = 0;
        vd_node *file = NULL;
        int depth = 0;
        int st = vd_node_block_status_above(s->source, base, false, off,
                                            s->len - off, &n, &map, &file,
                                            &depth, err);
        if (st < 0)
            return st;
        if (st & VD_BLOCK_ALLOCATED)
            vd_dirty_tracker_set(s->todo, off, n);
        off += n;
    }
    return 0;
}

static int backup_start(vd_job **out, vd_node *source, vd_node *target,
                        vd_mirror_sync sync, bool compress,
                        const vd_backup_options *bo,
                        const vd_job_options *opts, vd_error *err)
{
    *out = NULL;
    if (source == target)
        return vd_error_set(err, -EINVAL, "Source and target cannot be the "
                            "same");
    if (compress && !target->drv->supports_compressed)
        return vd_error_set(err, -ENOTSUP, "Compression is not supported "
                            "for this drive %s", "");
    if (vd_op_is_blocked(source, VD_OP_BACKUP_SOURCE, err) ||
        vd_op_is_blocked(target, VD_OP_BACKUP_TARGET, err))
        return -EBUSY;
    /* A bitmap the job will write must be writable (QEMU checks here). */
    if (bo->bitmap && bo->bitmap_mode != VD_BITMAP_SYNC_NEVER) {
        int r = vd_bitmap_check(source, bo->bitmap, false, err);
        if (r < 0)
            return r;
    }
    int64_t len = vd_node_getlength(source);
    if (len < 0)
        return vd_error_set(err, (int)len, "Unable to get length for '%s'",
                            source->node_name);
    int64_t tlen = vd_node_getlength(target);
    if (tlen < 0)
        return vd_error_set(err, (int)tlen, "Unable to get length for "
                            "'%s'", target->node_name);
    if (tlen != len)
        return vd_error_set(err, -EINVAL, "Source and target image have "
                            "different sizes");

    backup_state *s = calloc(1, sizeof(*s));
    if (!s)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    s->source = source;
    s->target = target;
    s->sync = sync;
    s->compress = compress;
    s->by_bitmap = bo->sync == VD_BACKUP_SYNC_BITMAP;
    s->bm_mode = bo->bitmap_mode;
    if (bo->bitmap && !(s->bm_name = strdup(bo->bitmap))) {
        s->source = s->target = NULL;      /* not referenced yet */
        state_free(s);
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }

    s->len = (uint64_t)len;
    s->cluster = backup_cluster(target);
    vd_node_ref(source);
    vd_node_ref(target);
    s->chunk = BACKUP_CHUNK > s->cluster ? BACKUP_CHUNK / s->cluster : 1;
    int r = vd_dirty_bitmap_new(&s->todo, s->len, s->cluster, err);
    if (r == 0 && sync != VD_MIRROR_SYNC_NONE)
        r = vd_copy_pool_new(&s->pool, source, BACKUP_WORKERS,
                             s->chunk * s->cluster, copy_claimed, s, err);
    if (r == 0)
        r = todo_init(s, err);
    if (r < 0) {
        state_free(s);
        return r;
    }
    /* QEMU's copy-before-write filter stands between the source and its
     * writers and lets nobody write the source's backing chain (a
     * target there would change what the source shows); vdisk has no
     * filter node, so the job's edges on that chain say the same. The
     * target is written by the job, read by anyone (fleecing). Both are
     * taken before the job exists, as QEMU appends its filter first. */
    r = vd_user_new(&s->target_user, target, "backup target", VD_PERM_WRITE,
                    VD_PERM_ALL & ~VD_PERM_RESIZE, err);
    if (r == 0)
        s->target_user->edge.job_edge = true;
    for (vd_node *n = backing_of(source); r == 0 && n && s->n_below < 64;
         n = backing_of(n)) {
        r = vd_user_new(&s->below[s->n_below], n, "backup source chain", 0,
                        VD_PERM_ALL & ~VD_PERM_WRITE, err);
        if (r == 0)
            s->below[s->n_below++]->edge.job_edge = true;
    }
    if (r < 0) {
        drop_users(s);
        state_free(s);
        return r;
    }
    vd_job *job;
    r = vd_block_job_create(&job, &backup_driver, s, opts, err);
    if (r < 0) {
        drop_users(s);
        state_free(s);
        return r;
    }
    s->job = job;
    r = vd_block_job_add_node(job, source, VD_PERM_CONSISTENT_READ,
                              VD_PERM_ALL & ~VD_PERM_RESIZE, err);
    if (r == 0)
        r = vd_block_job_add_node(job, target, 0, VD_PERM_ALL, err);
    if (r < 0) {
        vd_job_early_fail(job);
        return r;
    }
    /* QEMU's backup job sits on its filter node, not on the source: the
     * source stays open to what does not change its content behind the
     * hook's back (snapshots on top of it, other jobs reading it). What
     * would is still refused: reverting to an internal snapshot, and
     * resizing and deleting, which permissions and references refuse
     * anyway. */
    for (int op = 0; op < VD_OP__MAX; op++)
        if (op != VD_OP_SNAPSHOT_GOTO && op != VD_OP_RESIZE &&
            op != VD_OP_DRIVE_DEL)
            vd_op_unblock(source, (vd_op)op, job->blocker);
    /* The bitmap is frozen, and sync=bitmap takes its bits, in the same
     * drained section that installs the hook: every write after the
     * point in time is in the successor. */
    vd_node_drain_begin(source);
    if (s->bm_name) {
        r = vd_bitmap_freeze(source, s->bm_name, err);
        if (r == 0) {
            s->frozen = true;
            if (s->by_bitmap)
                vd_bitmap_frozen_merge_into(source, s->bm_name,
                                            vd_dirty_tracker_hbitmap(s->todo));
        }
        if (r < 0) {
            vd_node_drain_end(source);
            vd_job_early_fail(job);
            return r;
        }
    }

    /* From here every write to the source first copies what it changes. */
    s->hook = (vd_write_hook){ .fn = before_write, .opaque = s };
    vd_node_add_write_hook(source, &s->hook);
    s->hooked = true;
    vd_node_drain_end(source);
    vd_job_progress_set_remaining(job, vd_dirty_tracker_count(s->todo));
    if (opts->defer_start) {
        vd_job_ref(job);             /* the caller's */
        *out = job;
        return 0;
    }
    /* QEMU starts backups as transaction actions, in a drained
     * section: the job pauses once at its start. */
    r = vd_job_start_drained(job, err);
    if (r < 0)
        return r;
    vd_job_ref(job);
    *out = job;
    return 0;
}

VD_API int vd_backup_start(vd_job **out, vd_node *source, vd_node *target,
                           vd_mirror_sync sync, bool compress,
                           const vd_job_options *opts, vd_error *err)
{
    vd_backup_options bo = { .sync = (vd_backup_sync)sync,
                             .compress = compress };
    return backup_start(out, source, target, sync, compress, &bo, opts, err);
}

VD_API const char *vd_backup_sync_name(vd_backup_sync sync)
{
    switch (sync) {
    case VD_BACKUP_SYNC_FULL: return "full";
    case VD_BACKUP_SYNC_TOP: return "top";
    case VD_BACKUP_SYNC_NONE: return "none";
    case VD_BACKUP_SYNC_INCREMENTAL: return "incremental";
    case VD_BACKUP_SYNC_BITMAP: return "bitmap";
    }
    return NULL;
}

VD_API const char *vd_bitmap_sync_mode_name(vd_bitmap_sync_mode mode)
{
    switch (mode) {
    case VD_BITMAP_SYNC_ON_SUCCESS: return "on-success";
    case VD_BITMAP_SYNC_NEVER: return "never";
    case VD_BITMAP_SYNC_ALWAYS: return "always";
    case VD_BITMAP_SYNC_UNSET: break;
    }
    return NULL;
}

/* QEMU's do_backup_common(): the bitmap arguments, checked in its order
 * with its messages; incremental becomes bitmap with on-success. */
VD_API int vd_backup_start_opts(vd_job **out, vd_node *source,
                                vd_node *target, const vd_backup_options *bo,
                                const vd_job_options *opts, vd_error *err)
{
    *out = NULL;
    vd_backup_options o = *bo;
    if (!vd_backup_sync_name(o.sync) ||
        (o.bitmap_mode != VD_BITMAP_SYNC_UNSET &&
         !vd_bitmap_sync_mode_name(o.bitmap_mode)))
        return vd_error_set(err, -EINVAL, "Invalid parameter 'sync'");
    if ((o.sync == VD_BACKUP_SYNC_BITMAP ||
         o.sync == VD_BACKUP_SYNC_INCREMENTAL) && !o.bitmap)
        return vd_error_set(err, -EINVAL, "must provide a valid bitmap name "
                            "for '%s' sync mode", vd_backup_sync_name(o.sync));
    if (o.sync == VD_BACKUP_SYNC_INCREMENTAL) {
        if (o.bitmap_mode != VD_BITMAP_SYNC_UNSET &&
            o.bitmap_mode != VD_BITMAP_SYNC_ON_SUCCESS)
            return vd_error_set(err, -EINVAL, "Bitmap sync mode must be '%s' "
                                "when using sync mode '%s'",
                                "on-success", "incremental");
        o.sync = VD_BACKUP_SYNC_BITMAP;
        o.bitmap_mode = VD_BITMAP_SYNC_ON_SUCCESS;
    }
    if (o.bitmap) {
        if (!vd_bitmap_exists(source, o.bitmap))
            return vd_error_set(err, -ENOENT, "Bitmap '%s' could not be "
                                "found", o.bitmap);
        if (o.bitmap_mode == VD_BITMAP_SYNC_UNSET)
            return vd_error_set(err, -EINVAL, "Bitmap sync mode must be "
                                "given when providing a bitmap");
        int r = vd_bitmap_check(source, o.bitmap, true, err);
        if (r < 0)
            return r;
        if (o.sync == VD_BACKUP_SYNC_NONE)
            return vd_error_set(err, -EINVAL, "sync mode '%s' does not "
                                "produce meaningful bitmap outputs",
                                vd_backup_sync_name(o.sync));
        if (o.bitmap_mode == VD_BITMAP_SYNC_NEVER &&
            o.sync != VD_BACKUP_SYNC_BITMAP)
            return vd_error_set(err, -EINVAL, "Bitmap sync mode '%s' has no "
                                "meaningful effect when combined with sync "
                                "mode '%s'",
                                vd_bitmap_sync_mode_name(o.bitmap_mode),
                                vd_backup_sync_name(o.sync));
    }
    if (!o.bitmap && o.bitmap_mode != VD_BITMAP_SYNC_UNSET)
        return vd_error_set(err, -EINVAL, "Cannot specify bitmap sync mode "
                            "without a bitmap");
    /* sync=bitmap copies as full does, from the bitmap's clusters. */
    vd_mirror_sync m = o.sync == VD_BACKUP_SYNC_BITMAP
                       ? VD_MIRROR_SYNC_FULL : (vd_mirror_sync)o.sync;
    return backup_start(out, source, target, m, o.compress, &o, opts, err);
}
