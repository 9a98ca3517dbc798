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

int vd_block_job_copy(vd_node *src, vd_node *dst, uint64_t off, uint64_t len,
                      uint8_t *buf, unsigned write_flags,
                      unsigned zero_flags, bool *in_source, vd_error *err)
{
    for (uint64_t pos = off; pos < off + len;) {
        uint64_t n = 0, map = 0;
        vd_node *file = NULL;
        int depth = 0;
        *in_source = true;
        int st = vd_node_block_status_above(src, NULL, false, pos,
                                            off + len - pos, &n, &map, &file,
                                            &depth, err);
        if (st < 0)
            return st;
        int r;
        if (!(st & VD_BLOCK_DATA)) {
            /* Zeros, or nothing anywhere in the chain: reads as zeros. */
            *in_source = false;
            r = vd_node_pwrite_zeroes(dst, pos, n, zero_flags, err);
        } else {
            vd_iov v;
            vd_iov_init_buf(&v, buf + (pos - off), n);
            r = vd_node_preadv(src, pos, n, &v, 0, err);
            if (r == 0) {
                *in_source = false;
                r = vd_node_pwritev(dst, pos, n, &v, write_flags, err);
            }
        }
        if (r < 0)
            return r;
        pos += n;
    }
    return 0;
}

/* ---- copy workers ---- */

typedef struct copy_worker {
    vd_copy_pool *pool;
    pthread_t thread;
    pthread_cond_t wake;       /* a range was handed to it, or quit */
    uint8_t *buf;
    bool busy;                 /* a range was handed to it */
    vd_copy_span range;       /* in p->inflight while busy */
} copy_worker;

struct vd_copy_pool {
    pthread_mutex_t lock;
    pthread_cond_t cond;       /* a worker idle, a range gone (the job's
                                * thread and range lockers wait here; each
                                * worker waits on its own) */
    vd_copy_fn fn;
    void *opaque;
    unsigned n;                /* workers started */
    unsigned n_cond;           /* workers whose wake was initialised */
    unsigned busy;             /* workers with a range */
    bool quit;
    vd_copy_span *inflight;   /* the workers' ranges and the locked ones */
    int err_code;              /* the first failure since the last drain */
    bool err_in_source;
    vd_error err;
    copy_worker *w;
};

static bool overlaps(vd_copy_pool *p, uint64_t off, uint64_t end)
{
    for (vd_copy_span *r = p->inflight; r; r = r->next)
        if (r->off < end && off < r->end)
            return true;
    return false;
}

static void range_remove(vd_copy_pool *p, vd_copy_span *x)
{
    for (vd_copy_span **q = &p->inflight; *q; q = &(*q)->next) {
        if (*q == x) {
            *q = x->next;
            return;
        }
    }
}

static void *copy_worker_main(void *arg)
{
    copy_worker *w = arg;
    vd_copy_pool *p = w->pool;
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (!w->busy && !p->quit)
            pthread_cond_wait(&w->wake, &p->lock);
        if (!w->busy)
            break;
        uint64_t off = w->range.off, len = w->range.end - w->range.off;
        pthread_mutex_unlock(&p->lock);
        bool in_source = true;
        vd_error e = VD_ERROR_INIT;
        int r = p->fn(p->opaque, off, len, w->buf, &in_source, &e);
        pthread_mutex_lock(&p->lock);
        if (r < 0 && p->err_code == 0) {
            p->err_code = r;
            p->err_in_source = in_source;
            vd_error_set(&p->err, r, "%s", e.message);
        }
        vd_error_clear(&e);
        range_remove(p, &w->range);
        w->busy = false;
        p->busy--;
        pthread_cond_broadcast(&p->cond);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

int vd_copy_pool_new(vd_copy_pool **out, vd_node *align_node,
                     unsigned workers, uint64_t max_len, vd_copy_fn fn,
                     void *opaque, vd_error *err)
{
    *out = NULL;
    if (workers == 0)
        workers = 1;
    vd_copy_pool *p = calloc(1, sizeof(*p));
    copy_worker *w = calloc(workers, sizeof(*w));
    if (!p || !w) {
        free(p);
        free(w);
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->cond, NULL);
    p->fn = fn;
    p->opaque = opaque;
    p->w = w;
    *out = p;
    for (unsigned i = 0; i < workers; i++) {
        w[i].pool = p;
        pthread_cond_init(&w[i].wake, NULL);
        p->n_cond = i + 1;
        w[i].buf = vd_node_blockalign(align_node, max_len);
        if (!w[i].buf ||
            pthread_create(&w[i].thread, NULL, copy_worker_main, &w[i])) {
            free(w[i].buf);
            w[i].buf = NULL;
            if (i == 0) {
                vd_copy_pool_free(out);
                return vd_error_set(err, -ENOMEM, "Could not start the copy "
                                    "workers");
            }
            break;      /* fewer workers will do */
        }
        p->n = i + 1;
    }
    return 0;
}

void vd_copy_pool_free(vd_copy_pool **pp)
{
    vd_copy_pool *p = *pp;
    if (!p)
        return;
    *pp = NULL;
    pthread_mutex_lock(&p->lock);
    while (p->busy > 0)
        pthread_cond_wait(&p->cond, &p->lock);
    p->quit = true;
    for (unsigned i = 0; i < p->n; i++)
        pthread_cond_signal(&p->w[i].wake);
    pthread_mutex_unlock(&p->lock);
    for (unsigned i = 0; i < p->n; i++) {
        pthread_join(p->w[i].thread, NULL);
        free(p->w[i].buf);
    }
    /* Every worker's, started or not (calloc'd, initialised in new). */
    for (unsigned i = 0; p->w && i < p->n_cond; i++)
        pthread_cond_destroy(&p->w[i].wake);
    vd_error_clear(&p->err);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->cond);
    free(p->w);
    free(p);
}

void vd_copy_pool_submit(vd_copy_pool *p, uint64_t off, uint64_t len)
{
    pthread_mutex_lock(&p->lock);
    while (p->busy == p->n || overlaps(p, off, off + len))
        pthread_cond_wait(&p->cond, &p->lock);
    copy_worker *w = NULL;
    for (unsigned i = 0; i < p->n && !w; i++)
        if (!p->w[i].busy)
            w = &p->w[i];
    w->busy = true;
    w->range.off = off;
    w->range.end = off + len;
    w->range.next = p->inflight;
    p->inflight = &w->range;
    p->busy++;
    pthread_cond_signal(&w->wake);
    pthread_mutex_unlock(&p->lock);
}

int vd_copy_pool_drain(vd_copy_pool *p, bool *in_source, vd_error *err)
{
    pthread_mutex_lock(&p->lock);
    while (p->busy > 0)
        pthread_cond_wait(&p->cond, &p->lock);
    int r = p->err_code;
    if (r < 0 && err) {
        if (in_source)
            *in_source = p->err_in_source;
        vd_error_set(err, r, "%s", p->err.message);
        vd_error_clear(&p->err);
        p->err_code = 0;
    }
    pthread_mutex_unlock(&p->lock);
    return r;
}

bool vd_copy_pool_failed(vd_copy_pool *p)
{
    pthread_mutex_lock(&p->lock);
    bool f = p->err_code < 0;
    pthread_mutex_unlock(&p->lock);
    return f;
}

bool vd_copy_pool_idle(vd_copy_pool *p)
{
    pthread_mutex_lock(&p->lock);
    bool idle = p->busy == 0;
    pthread_mutex_unlock(&p->lock);
    return idle;
}

void vd_copy_pool_lock_range(vd_copy_pool *p, vd_copy_span *r, uint64_t off,
                             uint64_t len)
{
    pthread_mutex_lock(&p->lock);
    while (overlaps(p, off, off + len))
        pthread_cond_wait(&p->cond, &p->lock);
    r->off = off;
    r->end = off + len;
    r->next = p->inflight;
    p->inflight = r;
    pthread_mutex_unlock(&p->lock);
}

void vd_copy_pool_unlock_range(vd_copy_pool *p, vd_copy_span *r)
{
    pthread_mutex_lock(&p->lock);
    range_remove(p, r);
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
}

int vd_block_job_copy_failed(vd_job *job, int r, bool in_source,
                             vd_error *err)
{
    vd_error_action a = vd_block_job_error_action(
        job, in_source ? job->on_error : job->on_target_error, in_source, -r);
    if (a == VD_ERROR_ACTION_REPORT) {
        /* QEMU's job ends with the errno's text alone. */
        vd_error_set(err, r, "%s", strerror(-r));
        return r;
    }
    vd_job_pause_point(job);
    return 0;
}

int vd_copy_pool_settle(vd_job *job, vd_copy_pool *p, vd_error *err)
{
    bool in_source = true;
    vd_error e = VD_ERROR_INIT;
    int r = vd_copy_pool_drain(p, &in_source, &e);
    return r < 0 ? vd_block_job_copy_failed(job, r, in_source, err) : 0;
}
