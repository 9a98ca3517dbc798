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
    uint8_t *buf;
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

/* Copies [off, off+len) of the source to the target. Returns 0, or a
 * negative errno with *in_source telling which side failed. */
static int copy_range(mirror_state *s, uint64_t off, uint64_t len,
                      bool *in_source, vd_error *err)
{
    return vd_block_job_copy(s->source, s->target, off, len, s->buf, 0,
                             s->unmap ? VD_REQ_MAY_UNMAP : 0, in_source, err);
}

/* One dirty run of at most buf_size: cleared, then copied; marked again
 * when the copy fails. Returns the bytes done, 0 when nothing is dirty,
 * or a negative errno after the error policy was applied (-EAGAIN: go
 * on). */
static int64_t iterate(vd_job *job, mirror_state *s, uint64_t *cursor,
                       vd_error *err)
{
    uint64_t off, len;
    /* At most QEMU's max_io_bytes a piece (a 16th of the buffer, at
     * least 1 MiB), so that the speed limit meters small steps. */
    uint64_t piece = s->buf_size / 16 > (1u << 20) ? s->buf_size / 16
                                                   : (1u << 20);
    if (piece > s->buf_size)
        piece = s->buf_size;
    if (!vd_dirty_tracker_next(s->dirty, *cursor, piece, &off, &len))
        return 0;
    vd_dirty_tracker_clear(s->dirty, off, len);
    *cursor = off + len;
    /* The last granule may reach past the end. */
    int64_t size = vd_node_getlength(s->source);
    if (size >= 0 && off + len > (uint64_t)size)
        len = (uint64_t)size > off ? (uint64_t)size - off : 0;
    if (len == 0)
        return -EAGAIN;
    bool in_source = true;
    vd_error e = VD_ERROR_INIT;
    int r = copy_range(s, off, len, &in_source, &e);
    if (r < 0) {
        vd_dirty_tracker_set(s->dirty, off, len);
        vd_error_action a = vd_block_job_error_action(
            job, in_source ? job->on_error : job->on_target_error, in_source,
            -r);
        if (a == VD_ERROR_ACTION_REPORT) {
            /* QEMU's job ends with the errno's text alone. */
            vd_error_set(err, r, "%s", strerror(-r));
            return r;
        }
        return -EAGAIN;
    }
    return (int64_t)len;
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

static int mirror_run(vd_job *job, vd_error *err)
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
    uint64_t cursor = 0;
    for (;;) {
        uint64_t cnt = vd_dirty_tracker_count(s->dirty);
        vd_job_progress_set_remaining(job, cnt);
        if (cnt > 0) {
            int64_t n = iterate(job, s, &cursor, err);
            if (n < 0 && n != -EAGAIN)
                return (int)n;
            if (n > 0) {
                vd_job_progress_update(job, (uint64_t)n);
                vd_block_job_ratelimit_processed(job, (uint64_t)n);
            }
            vd_block_job_ratelimit_sleep(job);
        } else {
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
        if (!vd_dirty_tracker_next(s->dirty, cursor, s->buf_size, &off, &len))
            break;
        vd_dirty_tracker_clear(s->dirty, off, len);
        bool in_source;
        r = copy_range(s, off, len, &in_source, err);
        if (r < 0)
            return r;
        cursor = off + len;
    }
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
    vd_dirty_tracker_free(&s->dirty, s->source);
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
    vd_node_unref(s->source);
    vd_node_unref(s->target);
    vd_node_unref(s->to_replace);
    vd_node_unref(s->target_backing);
    free(s->buf);
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
    s->buf = vd_node_blockalign(source, s->buf_size);
    if (!s->buf) {
        state_free(s);
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    vd_job *job;
    int r = vd_block_job_create(&job, drv, s, opts, err);
    if (r < 0) {
        state_free(s);
        return r;
    }
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
    if (r == 0)
        r = vd_dirty_tracker_new(&s->dirty, source, g, err);
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
