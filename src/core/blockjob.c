/*
 * Block jobs: what a job that works on nodes adds to a job (job.c), as
 * QEMU's blockjob.c: the nodes it uses, each through a user that holds
 * the job's permissions and a blocker of every other operation; the
 * speed limit; the error policies and the I/O status.
 *
 * The speed limit admits bytes at the configured rate: after each piece
 * the job sleeps until the bytes done since the window began would have
 * taken that long at the limit. An idle job earns no credit for more
 * than one 100 ms slice (QEMU's BLOCK_JOB_SLICE_TIME), so a burst after
 * a pause stays short.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "job_int.h"

#define SLICE_NS 100000000ull

int vd_block_job_create(vd_job **out, const vd_job_driver *drv, void *state,
                        const vd_job_options *opts, vd_error *err)
{
    *out = NULL;
    if ((unsigned)opts->on_error >= VD_ON_ERROR__MAX ||
        (unsigned)opts->on_target_error >= VD_ON_ERROR__MAX)
        return vd_error_set(err, -EINVAL, "Invalid parameter 'on-error'");
    vd_job *job;
    int r = vd_job_create(&job, drv, state, opts, err);
    if (r < 0)
        return r;
    /* QEMU sets the speed on the new job: a bad one is refused after
     * the job existed (its "created" and "null" events included). */
    if (opts->speed < 0) {
        job->state = NULL;          /* still the caller's to free */
        vd_job_early_fail(job);
        return vd_error_set(err, -EINVAL, "Parameter 'speed' expects a "
                            "non-negative value");
    }
    job->speed = opts->speed;
    job->on_error = opts->on_error;
    job->on_target_error = opts->on_target_error;
    job->blocker = vd_blocker_new("block device is in use by block job: %s",
                                  vd_job_type_name(drv->type));
    if (!job->blocker) {
        job->state = NULL;
        vd_job_early_fail(job);
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    *out = job;
    return 0;
}

int vd_block_job_add_node(vd_job *job, vd_node *node, unsigned perm,
                          unsigned shared, vd_error *err)
{
    vd_job_node *jn = calloc(1, sizeof(*jn));
    char desc[300];
    if (!jn)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    snprintf(desc, sizeof(desc), "%s job '%s'",
             vd_job_type_name(job->drv->type), job->id);
    int r = vd_user_new(&jn->user, node, desc, perm, shared, err);
    if (r < 0) {
        free(jn);
        return r;
    }
    jn->user->edge.job_edge = true;
    r = vd_op_block_all(node, job->blocker);
    if (r < 0) {
        vd_user_free(&jn->user);
        free(jn);
        return vd_error_set(err, r, "Out of memory");
    }
    jn->node = node;
    jn->next = job->nodes;
    job->nodes = jn;
    return 0;
}

void vd_block_job_remove_nodes(vd_job *job)
{
    while (job->nodes) {
        vd_job_node *jn = job->nodes;
        job->nodes = jn->next;
        vd_op_unblock_all(jn->node, job->blocker);
        vd_user_free(&jn->user);
        free(jn);
    }
    vd_blocker_free(&job->blocker);
}

void vd_block_job_ratelimit_processed(vd_job *job, uint64_t bytes)
{
    vd_job_lock();
    if (job->speed > 0) {
        uint64_t now = vd_job_now_ns();
        uint64_t due = job->rl_start_ns +
                       (uint64_t)((double)job->rl_bytes * 1e9 /
                                  (double)job->speed);
        if (job->rl_start_ns == 0 || now > due + SLICE_NS) {
            job->rl_start_ns = now;
            job->rl_bytes = 0;
        }
        job->rl_bytes += bytes;
    }
    vd_job_unlock();
}

void vd_block_job_ratelimit_sleep(vd_job *job)
{
    for (;;) {
        uint64_t delay = 0;
        vd_job_lock();
        if (job->speed > 0 && job->rl_start_ns) {
            uint64_t now = vd_job_now_ns();
            uint64_t due = job->rl_start_ns +
                           (uint64_t)((double)job->rl_bytes * 1e9 /
                                      (double)job->speed);
            delay = due > now ? due - now : 0;
        }
        bool cancelled = job->force_cancel;
        vd_job_unlock();
        /* Always a pause point, even without a limit, as QEMU. */
        vd_job_sleep(job, delay);
        if (delay == 0 || cancelled || vd_job_is_cancelled(job))
            return;
    }
}

vd_error_action vd_block_job_error_action(vd_job *job, vd_on_error policy,
                                          bool is_read, int errnum)
{
    vd_error_action action;
    switch (policy) {
    case VD_ON_ERROR_ENOSPC:
    case VD_ON_ERROR_AUTO:
        action = errnum == ENOSPC ? VD_ERROR_ACTION_STOP
                                  : VD_ERROR_ACTION_REPORT;
        break;
    case VD_ON_ERROR_STOP:
        action = VD_ERROR_ACTION_STOP;
        break;
    case VD_ON_ERROR_IGNORE:
        action = VD_ERROR_ACTION_IGNORE;
        break;
    default:
        action = VD_ERROR_ACTION_REPORT;
        break;
    }
    vd_job_lock();
    if (!job->force_cancel)
        vd_job_emit(job, VD_JOB_EVENT_ERROR, is_read, action);
    if (action == VD_ERROR_ACTION_STOP) {
        vd_job_pause_for_error(job);
        if (job->io_status == VD_IO_STATUS_OK)
            job->io_status = errnum == ENOSPC ? VD_IO_STATUS_NOSPACE
                                              : VD_IO_STATUS_FAILED;
    }
    vd_job_unlock();
    return action;
}

int vd_block_job_set_backing(vd_node *overlay, vd_node *base,
                             const char *backing_file, bool mask_protocol,
                             vd_error *err)
{
    const char *name = NULL, *fmt = NULL;
    if (base) {
        name = backing_file ? backing_file : vd_node_filename(base);
        fmt = mask_protocol && !base->drv->is_format && !base->drv->is_filter
              ? "raw" : base->drv->name;
    }
    int r = vd_change_backing_file(overlay, name, fmt, err);
    if (r < 0)
        return r;
    vd_node_drain_begin(overlay);
    if (overlay->backing)
        vd_node_detach_child(overlay, overlay->backing);
    if (base) {
        vd_node_ref(base);
        if (!vd_node_attach_child(overlay, base, "backing",
                                  VD_ROLE_COW | VD_ROLE_DATA, err)) {
            vd_node_unref(base);
            r = err && err->code ? err->code : -ENOMEM;
        }
    }
    vd_node_drain_end(overlay);
    return r;
}

int vd_block_job_make_writable(vd_node *node, bool *reopened, vd_error *err)
{
    *reopened = false;
    if (!vd_node_is_read_only(node))
        return 0;
    vd_node_drain_begin(node);
    int r = vd_reopen(node, true, err);
    vd_node_drain_end(node);
    *reopened = r == 0;
    return r;
}

void vd_block_job_restore_read_only(vd_node *node, bool *reopened)
{
    if (!*reopened)
        return;
    vd_error e = VD_ERROR_INIT;
    vd_node_drain_begin(node);
    (void)vd_reopen(node, false, &e);
    vd_node_drain_end(node);
    *reopened = false;
}

int vd_block_job_launch(vd_job *job, vd_node *len_of, vd_job **out,
                        vd_error *err)
{
    /* QEMU's job has set its length before the start returns (its
     * coroutine runs until the first yield): a query right after the
     * start shows it. */
    int64_t len = vd_node_getlength(len_of);
    if (len > 0)
        vd_job_progress_set_remaining(job, (uint64_t)len);
    vd_job_ref(job);             /* the caller's */
    int r = vd_job_start(job, err);
    if (r < 0) {
        vd_job_unref(&job);
        return r;
    }
    *out = job;
    return 0;
}
