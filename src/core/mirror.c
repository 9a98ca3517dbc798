/*
 * The mirror job (QEMU's blockdev-mirror) and active commit, which is a
 * mirror into the base: copies a source node into a target while the
 * source stays in use, reaches READY once the target holds everything,
 * keeps copying what is written meanwhile, and on job-complete switches
 * every user and parent of the source (or of the node `replaces` names)
 * to the target.
 *
 * Tracking: a dirty tracker on the source (dirty.c) marks every write
 * once it reached the driver. The job takes a dirty run, clears it, then
 * reads the source and writes the target; a write that lands during or
 * after the read marks the run again, so it is copied again. Ranges the
 * source reads as zeros become zero writes (or discards) on the target.
 *
 * Convergence and the pivot happen when the job finalizes, under the
 * graph lock: the users of the node to replace are held at their request
 * gates (vd_node_gate_users(): in-flight requests finish, new ones wait),
 * what is still dirty is copied, the target is flushed, and then the
 * users and parents move to the target (vd_node_replace()) and the gates
 * open onto it. No write can reach the source after its last copy. A
 * soft cancel of a READY mirror (block-job-cancel without force) makes
 * the same final copy and leaves everyone on the source, as QEMU does.
 *
 * Permissions, as QEMU's: the source is shared for reads and writes but
 * not resizes; the target is written by the job alone (a user of its
 * own, QEMU's target block backend, that lets others hold nothing but
 * unchanged writes); for active commit the layers between the active
 * layer and the base are kept unwritten and un-resized.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "job_int.h"

#define DEFAULT_BUF_SIZE (16u << 20)     /* QEMU's DEFAULT_MIRROR_BUF_SIZE */
#define SLICE_NS 100000000ull             /* QEMU's BLOCK_JOB_SLICE_TIME */

typedef struct mirror_state {
    vd_node *source, *target;
    vd_node *to_replace;       /* source, or what `replaces` names */
    vd_node *base;             /* sync=top / active commit: copy above it */
    bool active_commit;
    vd_mirror_sync sync;
    bool unmap;
    uint64_t granularity, buf_size;
    vd_dirty_tracker *dirty;
    vd_user *target_user;      /* QEMU's s->target block backend */
    uint64_t piece;            /* the most one copy takes */
    vd_copy_pool *pool;        /* the copies in flight */
    _Atomic uint64_t in_flight; /* bytes handed to workers, not done */
    vd_job *job;
    /* copy-mode=write-blocking (QEMU's active mirror): a write hook on
     * the source, and a bitmap that only the hook and the job mark. */
    bool write_blocking;
    vd_write_hook hook;
    bool hooked;
    uint64_t len;              /* the source's */
    _Atomic bool copy_writes;  /* the hook writes guest writes through */
    _Atomic int hook_err;      /* a target write of the hook failed */
    bool should_complete;      /* [J] job-complete was given */
    bool gated;                /* the users of to_replace are held */
    bool target_is_zero;
    vd_node *target_backing;   /* attached to the target at completion */
    bool target_reopened_rw;
} mirror_state;

static vd_node *backing_of(vd_node *n)
{
    return n->backing ? n->backing->node : NULL;
}

/* A worker's copy of [off, off+len) from the source to the target;
 * the range is marked again when it fails. The pool keeps overlapping
 * copies apart, so this copy's read and write happen with no other copy
 * of these bytes in between. */
static int copy_piece(void *opaque, uint64_t off, uint64_t len, uint8_t *buf,
                      bool *in_source, vd_error *err)
{
    mirror_state *s = opaque;
    int r = vd_block_job_copy(s->source, s->target, off, len, buf, 0,
                              s->unmap ? VD_REQ_MAY_UNMAP : 0, in_source,
                              err);
    if (r < 0) {
        vd_dirty_tracker_set(s->dirty, off, len);
    } else {
        vd_job_progress_update(s->job, len);
        /* The target is flushed before READY: its disk writes the copies
         * while the job goes on, instead of all of them then. */
        vd_node_advise(s->target, off, len, VD_ADVISE_WRITEBACK);
    }
    atomic_fetch_sub(&s->in_flight, len);
    return r;
}

/* Waits for the copies in flight; a failure among them, or of a guest
 * write's write-through, gets the error policy now, with every worker
 * idle (on-error=stop pauses here). Returns 0 (go on) or the negative
 * errno to fail the job with. */
static int settle(vd_job *job, mirror_state *s, vd_error *err)
{
    int r = vd_copy_pool_settle(job, s->pool, err);
    if (r < 0)
        return r;
    if ((r = atomic_exchange(&s->hook_err, 0)) < 0)
        return vd_block_job_copy_failed(job, r, false, err);
    return 0;
}

/* Hands one dirty run of at most a piece to a worker, cleared first: a
 * write landing during or after the worker's read marks it again.
 * Returns the bytes handed out, 0 when nothing was. */
static uint64_t iterate(mirror_state *s, uint64_t *cursor)
{
    uint64_t off, len;
    if (!vd_dirty_tracker_next(s->dirty, *cursor, s->piece, &off, &len))
        return 0;
    vd_dirty_tracker_clear(s->dirty, off, len);
    *cursor = off + len;
    /* The last granule may reach past the end. */
    int64_t size = vd_node_getlength(s->source);
    if (size >= 0 && off + len > (uint64_t)size)
        len = (uint64_t)size > off ? (uint64_t)size - off : 0;
    if (len == 0)
        return 0;
    atomic_fetch_add(&s->in_flight, len);
    vd_copy_pool_submit(s->pool, off, len);
    return len;
}

/*
 * copy-mode=write-blocking, as QEMU's active mirror: every write to the
 * source is written to the target too before it completes, so the job
 * converges under any write load. The bitmap is then the job's own (not
 * marked by the request path): the hook marks what it did not write
 * through. Before the write reaches the source the hook locks its range
 * in the copy pool, which waits for overlapping copies of the workers
 * and of other guest writes; after it, with the lock still held, it
 * writes the same bytes to the target: source and target see
 * overlapping writes in the same order, and a worker's older read never
 * lands after them. As QEMU's do_sync_target_write(), a head or tail
 * granule that is dirty is left to the workers (its other bytes may
 * differ on the target), granules the write covers whole are clean
 * afterwards, and a failed target write marks the range again and goes
 * to the job's on-target-error policy. Before the job's first dirty
 * marks are set (and once it stops), writes are only marked.
 */
typedef struct active_op {
    mirror_state *s;
    uint64_t off, bytes;
    vd_copy_span span;
    struct active_op *next;
} active_op;

/* The hooked writes of this thread whose after-hook is still due. */
static __thread active_op *thread_ops;

static int before_write(void *opaque, uint64_t off, uint64_t bytes,
                        vd_error *err)
{
    mirror_state *s = opaque;
    if (off >= s->len)
        return 0;
    active_op *op = malloc(sizeof(*op));
    if (!op)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    op->s = s;
    op->off = off;
    op->bytes = bytes;
    uint64_t end = off + bytes < s->len ? off + bytes : s->len;
    vd_copy_pool_lock_range(s->pool, &op->span, off, end - off);
    op->next = thread_ops;
    thread_ops = op;
    return 0;
}

static bool granule_dirty(mirror_state *s, uint64_t pos)
{
    uint64_t g = s->granularity, start = pos / g * g, o, b;
    return vd_dirty_tracker_next(s->dirty, start, g, &o, &b) && o == start;
}

/* QEMU's do_sync_target_write(). A guest write with FUA is written
 * with FUA to the target too: once the job has pivoted, the target is
 * the disk the guest was promised that write on. */
static void write_through(mirror_state *s, uint64_t off, uint64_t n,
                          vd_iov *qiov, unsigned flags)
{
    unsigned fua = flags & VD_REQ_FUA;
    uint64_t g = s->granularity, skip = 0;
    if (off % g && granule_dirty(s, off)) {
        skip = (off / g + 1) * g - off;
        if (n <= skip)
            return;
        off += skip;
        n -= skip;
    }
    if ((off + n) % g && granule_dirty(s, off + n - 1)) {
        uint64_t tail = (off + n) % g;
        if (n <= tail)
            return;
        n -= tail;
    }
    uint64_t cs = (off + g - 1) / g * g, ce = (off + n) / g * g;
    if (cs < ce)
        vd_dirty_tracker_clear(s->dirty, cs, ce - cs);
    vd_error e = VD_ERROR_INIT;
    int r;
    if (qiov) {
        vd_iov part;
        r = vd_iov_init_slice(&part, qiov, skip, n);
        if (r == 0) {
            r = vd_node_pwritev(s->target, off, n, &part, fua, &e);
            vd_iov_destroy(&part);
        }
    } else {
        r = vd_node_pwrite_zeroes(s->target, off, n,
                                  (s->unmap ? VD_REQ_MAY_UNMAP : 0) | fua,
                                  &e);
    }
    if (r < 0) {
        vd_dirty_tracker_set(s->dirty, off, n);
        int none = 0;
        atomic_compare_exchange_strong(&s->hook_err, &none, r);
        vd_job_lock();
        vd_job_kick(s->job);
        vd_job_unlock();
    } else {
        vd_job_progress_update(s->job, n);
    }
}

static void after_write(void *opaque, uint64_t off, uint64_t bytes,
                        vd_iov *qiov, unsigned flags, int ret)
{
    mirror_state *s = opaque;
    active_op **pp = &thread_ops;
    while (*pp && !((*pp)->s == s && (*pp)->off == off &&
                    (*pp)->bytes == bytes))
        pp = &(*pp)->next;
    active_op *op = *pp;
    if (!op)
        return;         /* past the end: nothing was locked */
    *pp = op->next;
    uint64_t n = op->span.end - op->span.off;
    /* A discard leaves the source reading what it likes: copied later. */
    if (ret < 0 || !atomic_load(&s->copy_writes) ||
        (!qiov && !(flags & VD_REQ_ZERO_WRITE)))
        vd_dirty_tracker_set(s->dirty, off, n);
    else
        write_through(s, off, n, qiov, flags);
    vd_copy_pool_unlock_range(s->pool, &op->span);
    free(op);
}

/* The first dirty marks: what sync asks to copy. A full sync makes the
 * whole target equal, as QEMU's zero_target: a target that discards
 * (discard=unmap) is zeroed first and only what the source holds is
 * copied; any other target gets every byte. */
static int dirty_init(mirror_state *s, vd_error *err)
{
    if (s->sync == VD_MIRROR_SYNC_NONE)
        return 0;
    int64_t len = vd_node_getlength(s->source);
    if (len < 0)
        return vd_error_set(err, (int)len, "Could not get the length of "
                            "'%s'", s->source->node_name);
    if (s->sync == VD_MIRROR_SYNC_FULL && !s->active_commit &&
        !s->target_is_zero) {
        if (!vd_node_discard_unmap(s->target)) {
            vd_dirty_tracker_set(s->dirty, 0, (uint64_t)len);
            return 0;
        }
        int r = vd_node_pwrite_zeroes(s->target, 0, (uint64_t)len,
                                      VD_REQ_MAY_UNMAP, err);
        if (r < 0)
            return r;
    }
    for (uint64_t off = 0; off < (uint64_t)len;) {
        uint64_t n = 0, map = 0;
        vd_node *file = NULL;
        int depth = 0;
        int st = vd_node_block_status_above(s->source, s->base, false, off,
                                            (uint64_t)len - off, &n, &map,
                                            &file, &depth, err);
        if (st < 0)
            return st;
        if (st & VD_BLOCK_ALLOCATED)
            vd_dirty_tracker_set(s->dirty, off, n);
        off += n;
    }
    return 0;
}

static int mirror_loop(vd_job *job, vd_error *err)
{
    mirror_state *s = job->state;
    int r;
    int64_t len = vd_node_getlength(s->source);
    int64_t blen = vd_node_getlength(s->target);
    if (s->active_commit) {
        if (len >= 0 && blen >= 0 && blen < len) {
            vd_node_drain_begin(s->target);
            r = vd_node_truncate(s->target, (uint64_t)len, false,
                                 VD_PREALLOC_OFF, err);
            vd_node_drain_end(s->target);
            if (r < 0)
                return r;
        }
    } else if (len >= 0 && blen >= 0 && len != blen) {
        /* A shorter target would lose the tail at the pivot, a longer
         * one show more than the source. QEMU checks when the job runs,
         * before it has a length. */
        vd_job_progress_set_remaining(job, 0);
        return vd_error_set(err, -EINVAL, "Source and target image have "
                            "different sizes");
    }
    r = dirty_init(s, err);
    if (r < 0)
        return r;
    /* From here on the target holds or will get every byte: guest
     * writes may go through. */
    if (s->write_blocking)
        atomic_store(&s->copy_writes, true);
    uint64_t cursor = 0;
    for (;;) {
        uint64_t cnt = vd_dirty_tracker_count(s->dirty);
        /* What is in flight is still to do, as QEMU counts it. */
        vd_job_progress_set_remaining(job, cnt + atomic_load(&s->in_flight));
        if (cnt > 0) {
            uint64_t n = iterate(s, &cursor);
            if (n > 0)
                vd_block_job_ratelimit_processed(job, n);
            if ((vd_copy_pool_failed(s->pool) ||
                 atomic_load(&s->hook_err) < 0) &&
                (r = settle(job, s, err)) < 0)
                return r;
            vd_block_job_ratelimit_sleep(job);
        } else {
            /* Nothing dirty: once the copies in flight are done (or
             * failed, marking their ranges again) look once more. */
            r = settle(job, s, err);
            if (r < 0)
                return r;
            if (vd_dirty_tracker_count(s->dirty) > 0)
                continue;
            vd_job_progress_set_remaining(job, 0);
            vd_job_lock();
            bool ready = job->status == VD_JOB_STATUS_READY ||
                         job->status == VD_JOB_STATUS_STANDBY;
            vd_job_unlock();
            if (!ready) {
                r = vd_node_flush(s->target, err);
                if (r < 0) {
                    vd_error_action a = vd_block_job_error_action(
                        job, job->on_target_error, false, -r);
                    if (a == VD_ERROR_ACTION_REPORT)
                        return r;
                    vd_error_clear(err);
                    continue;
                }
                vd_job_transition_to_ready(job);
            }
            vd_job_lock();
            bool done = s->should_complete || job->cancelled;
            vd_job_unlock();
            if (done)
                break;
            /* Ready and idle: look again every slice, or when kicked. */
            vd_job_sleep(job, SLICE_NS);
        }
        if (vd_job_is_cancelled(job))
            break;
    }
    return 0;
}

/* The loop, then the wait for the copies still in flight (a cancel
 * returns only once no worker touches the nodes). */
static int mirror_run(vd_job *job, vd_error *err)
{
    mirror_state *s = job->state;
    int r = mirror_loop(job, err);
    /* Writes are only marked now: the final copy takes them. */
    atomic_store(&s->copy_writes, false);
    vd_error e = VD_ERROR_INIT;
    int r2 = vd_copy_pool_drain(s->pool, NULL, &e);
    if (r == 0 && r2 < 0 && !vd_job_is_cancelled(job)) {
        /* QEMU's job ends with the errno's text alone. */
        vd_error_set(err, r2, "%s", strerror(-r2));
        r = r2;
    }
    return r;
}

/* (thread) A pause waits for the copies in flight. */
static void mirror_pause(vd_job *job)
{
    mirror_state *s = job->state;
    vd_copy_pool_drain(s->pool, NULL, NULL);
}

/* The final copy with the users held, and the pivot when completing. */
static int mirror_prepare(vd_job *job, vd_error *err)
{
    mirror_state *s = job->state;
    vd_node_gate_users(s->to_replace);
    s->gated = true;
    uint64_t cursor = 0;
    int r = 0;
    while (vd_dirty_tracker_count(s->dirty) > 0) {
        uint64_t off, len;
        if (!vd_dirty_tracker_next(s->dirty, cursor, s->piece, &off, &len))
            break;
        vd_dirty_tracker_clear(s->dirty, off, len);
        atomic_fetch_add(&s->in_flight, len);
        vd_copy_pool_submit(s->pool, off, len);
        cursor = off + len;
        if (vd_copy_pool_failed(s->pool))
            break;          /* the range is dirty again: no retry here */
    }
    if ((r = vd_copy_pool_drain(s->pool, NULL, err)) < 0)
        return r;
    r = vd_node_flush(s->target, err);
    if (r < 0)
        return r;
    vd_job_lock();
    bool pivot = s->should_complete;
    vd_job_unlock();
    if (pivot) {
        /* The job's own user of the target goes first, as QEMU drops
         * the target's write permission before the replacement. */
        vd_user_free(&s->target_user);
        if (s->target_backing && !s->target->backing) {
            vd_node_ref(s->target_backing);
            if (!vd_node_attach_child(s->target, s->target_backing, "backing",
                                      VD_ROLE_COW | VD_ROLE_DATA, err)) {
                vd_node_unref(s->target_backing);
                return err && err->code ? err->code : -ENOMEM;
            }
        }
        r = vd_node_replace(s->to_replace, s->target, err);
        if (r < 0)
            return r;
        vd_node_ungate_users(s->target);
        s->gated = false;
    }
    return 0;
}

static void mirror_clean(vd_job *job)
{
    mirror_state *s = job->state;
    if (s->gated) {
        vd_node_ungate_users(s->to_replace);
        s->gated = false;
    }
    if (s->hooked) {
        vd_node_remove_write_hook(s->source, &s->hook);
        s->hooked = false;
    }
    vd_copy_pool_free(&s->pool);
    vd_dirty_tracker_free(&s->dirty, s->write_blocking ? NULL : s->source);
    vd_user_free(&s->target_user);
    vd_block_job_remove_nodes(job);
    vd_block_job_restore_read_only(s->target, &s->target_reopened_rw);
    /* The nodes go now, not when the last reference to the job does:
     * a caller that waited for the job may close and reopen them. */
    vd_node_unref(s->source);
    vd_node_unref(s->target);
    vd_node_unref(s->to_replace);
    vd_node_unref(s->target_backing);
    s->source = s->target = s->to_replace = s->target_backing = NULL;
}

static void state_free(mirror_state *s)
{
    vd_copy_pool_free(&s->pool);
    vd_node_unref(s->source);
    vd_node_unref(s->target);
    vd_node_unref(s->to_replace);
    vd_node_unref(s->target_backing);
    free(s);
}

static void mirror_free(vd_job *job)
{
    state_free(job->state);
}

static void mirror_complete(vd_job *job)
{
    mirror_state *s = job->state;
    s->should_complete = true;
}

/* A soft cancel of a READY mirror completes it without the pivot. */
static bool mirror_cancel(vd_job *job, bool force)
{
    return force || !(job->status == VD_JOB_STATUS_READY ||
                      job->status == VD_JOB_STATUS_STANDBY);
}

/* Mirror and active commit differ only in the type QMP shows. */
#define MIRROR_DRIVER(job_type)                                           \
    {                                                                     \
        .type = job_type, .run = mirror_run, .complete = mirror_complete, \
        .cancel = mirror_cancel, .prepare = mirror_prepare,               \
        .pause = mirror_pause,                                            \
        .clean = mirror_clean, .free = mirror_free,                       \
    }

static const vd_job_driver mirror_driver = MIRROR_DRIVER(VD_JOB_TYPE_MIRROR);
static const vd_job_driver active_commit_driver =
    MIRROR_DRIVER(VD_JOB_TYPE_COMMIT);

/* QEMU's bdrv_get_default_bitmap_granularity(): the cluster size within
 * [4 KiB, 64 KiB], 64 KiB without one. */
static uint64_t default_granularity(vd_node *target)
{
    vd_image_info *info = NULL;
    uint64_t g = 65536;
    if (vd_get_info(target, &info, NULL) == 0) {
        if (info->cluster_size > 0)
            g = info->cluster_size < 4096 ? 4096
                : info->cluster_size > 65536 ? 65536
                : (uint64_t)info->cluster_size;
        vd_image_info_free(&info);
    }
    return g;
}

static int mirror_common(vd_job **out, const vd_job_driver *drv,
                         vd_node *source, vd_node *target,
                         const vd_mirror_options *mo, vd_node *base,
                         const vd_job_options *opts, vd_error *err)
{
    *out = NULL;
    uint64_t g = mo->granularity ? mo->granularity
                                 : default_granularity(target);
    if (mo->buf_size < 0)
        return vd_error_set(err, -EINVAL, "Invalid parameter 'buf-size'");
    if (source == target)
        return vd_error_set(err, -EINVAL, "Can't mirror node into itself");
    mirror_state *s = calloc(1, sizeof(*s));
    if (!s)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    s->source = source;
    s->target = target;
    s->to_replace = mo->replaces ? mo->replaces : source;
    s->base = base;
    s->active_commit = drv == &active_commit_driver;
    s->sync = mo->sync;
    s->unmap = !mo->no_unmap;
    s->granularity = g;
    s->write_blocking = mo->write_blocking;
    s->target_is_zero = mo->target_is_zero;
    s->target_backing = mo->target_backing;
    if (s->target_backing)
        vd_node_ref(s->target_backing);
    s->buf_size = mo->buf_size ? (uint64_t)mo->buf_size : DEFAULT_BUF_SIZE;
    if (s->buf_size < g)
        s->buf_size = g;
    vd_node_ref(source);
    vd_node_ref(target);
    vd_node_ref(s->to_replace);
    /* QEMU's mirror: at most max_io_bytes a copy (a 16th of the
     * buffer, at least 1 MiB: the speed limit meters small steps), and
     * as many copies in flight as the buffer holds, at most
     * MAX_IN_FLIGHT (16). Each worker has a piece of the buffer. */
    s->piece = s->buf_size / 16 > (1u << 20) ? s->buf_size / 16 : (1u << 20);
    if (s->piece > s->buf_size)
        s->piece = s->buf_size;
    uint64_t workers = s->buf_size / s->piece;
    if (workers > 16)
        workers = 16;
    int r = vd_copy_pool_new(&s->pool, source, (unsigned)workers, s->piece,
                             copy_piece, s, err);
    if (r < 0) {
        state_free(s);
        return r;
    }
    vd_job *job;
    r = vd_block_job_create(&job, drv, s, opts, err);
    if (r < 0) {
        state_free(s);
        return r;
    }
    s->job = job;
    /* The job's edge on the source: reads and writes by others go on. */
    r = vd_block_job_add_node(job, source, 0, VD_PERM_CONSISTENT_READ |
                              VD_PERM_WRITE | VD_PERM_WRITE_UNCHANGED, err);
    if (r == 0 && s->to_replace != source)
        r = vd_block_job_add_node(job, s->to_replace, 0, VD_PERM_ALL, err);
    if (r == 0 && s->active_commit) {
        /* The layers between the active layer and the base: nobody
         * resizes them; writes are shared so that the base, below them,
         * can be written (QEMU's rule), reads for the active layer. */
        for (vd_node *n = backing_of(source); r == 0 && n && n != target;
             n = backing_of(n))
            r = vd_block_job_add_node(job, n, 0, VD_PERM_CONSISTENT_READ |
                                      VD_PERM_WRITE |
                                      VD_PERM_WRITE_UNCHANGED, err);
        if (r == 0)
            r = vd_block_job_make_writable(target, &s->target_reopened_rw,
                                           err);
    }
    if (r == 0)
        r = vd_block_job_add_node(job, target, 0, VD_PERM_ALL, err);
    if (r == 0) {
        int64_t sl = vd_node_getlength(source), tl = vd_node_getlength(target);
        unsigned perm = VD_PERM_WRITE;
        unsigned shared = VD_PERM_WRITE_UNCHANGED;
        if (s->active_commit) {
            /* The base is the active layer's backing file: it is read
             * through the chain, and written below it. */
            shared |= VD_PERM_CONSISTENT_READ | VD_PERM_WRITE;
            if (tl < sl)
                perm |= VD_PERM_RESIZE;
        }
        r = vd_user_new(&s->target_user, target, NULL, perm, shared, err);
    }
    if (r == 0 && s->write_blocking) {
        int64_t sl = vd_node_getlength(source);
        r = sl < 0 ? vd_error_set(err, (int)sl, "Could not get the length "
                                  "of '%s'", source->node_name)
                   : vd_dirty_bitmap_new(&s->dirty, (uint64_t)sl, g, err);
        if (r == 0) {
            s->len = (uint64_t)sl;
            s->hook = (vd_write_hook){ .fn = before_write, .opaque = s,
                                       .after = after_write };
            vd_node_add_write_hook(source, &s->hook);
            s->hooked = true;
        }
    } else if (r == 0) {
        r = vd_dirty_tracker_new(&s->dirty, source, g, err);
    }
    if (r < 0) {
        vd_job_early_fail(job);
        return r;
    }
    return vd_block_job_launch(job, source, out, err);
}

VD_API int vd_mirror_start(vd_job **out, vd_node *source, vd_node *target,
                           const vd_mirror_options *mo,
                           const vd_job_options *opts, vd_error *err)
{
    vd_mirror_options dflt = { 0 };
    if (!mo)
        mo = &dflt;
    uint64_t g = mo->granularity;
    if (g != 0 && (g < 512 || g > 64u << 20))
        return vd_error_set(err, -EINVAL, "Parameter 'granularity' expects "
                            "a value in range [512B, 64MB]");
    if (g & (g - 1))
        return vd_error_set(err, -EINVAL, "Parameter 'granularity' expects "
                            "a power of 2");
    if (vd_op_is_blocked(source, VD_OP_MIRROR_SOURCE, err) ||
        vd_op_is_blocked(target, VD_OP_MIRROR_TARGET, err))
        return -EBUSY;
    vd_mirror_options m = *mo;
    if (m.sync == VD_MIRROR_SYNC_TOP && !backing_of(source))
        m.sync = VD_MIRROR_SYNC_FULL;
    if (m.replaces) {
        /* QEMU's check_to_replace_node(): a node in use by something
         * that forbids it, or one whose content the source does not
         * show (anything but the source and the nodes down its filters'
         * children), would change under its users at the pivot. */
        if (vd_op_is_blocked(m.replaces, VD_OP_REPLACE, err))
            return -EBUSY;
        vd_node *n = source;
        while (n && n != m.replaces) {
            vd_node *below = NULL;
            for (vd_child *c = n->drv->is_filter ? n->children : NULL; c;
                 c = c->next) {
                if (c->role & VD_ROLE_FILTERED) {
                    below = c->node;
                    break;
                }
            }
            n = below;
        }
        if (!n)
            return vd_error_set(err, -EINVAL, "Cannot replace '%s' by a node "
                                "mirrored from '%s', because it cannot be "
                                "guaranteed that doing so would not lead to "
                                "an abrupt change of visible data",
                                m.replaces->node_name, source->node_name);
        int64_t a = vd_node_getlength(source);
        int64_t b = vd_node_getlength(m.replaces);
        if (a != b)
            return vd_error_set(err, -EINVAL, "cannot replace image with a "
                                "mirror image of different size");
    }
    return mirror_common(out, &mirror_driver, source, target, &m,
                         m.sync == VD_MIRROR_SYNC_TOP ? backing_of(source)
                                                      : NULL, opts, err);
}

int vd_active_commit_start(vd_job **out, vd_node *active, vd_node *base,
                           const vd_job_options *opts, vd_error *err)
{
    vd_mirror_options m = { .sync = VD_MIRROR_SYNC_TOP };
    return mirror_common(out, &active_commit_driver, active, base, &m, base,
                         opts, err);
}
