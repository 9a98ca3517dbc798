/*
 * Jobs: QEMU 7.2's job state machine on threads (include/vdisk/job.h,
 * docs/jobs.md).
 *
 * The states, the allowed transitions and which verb each state accepts
 * are QEMU's tables (../shared/specs/job.json describes them); the
 * completion path is QEMU's too: when run() returns, the job's result is
 * settled (ABORTING on failure or forced cancel), a successful job waits
 * (WAITING) for the other jobs of its transaction, all of them become
 * PENDING, and finalizing prepares every job, then commits or aborts
 * each, calls its done callback, sends BLOCK_JOB_COMPLETED or
 * BLOCK_JOB_CANCELLED and concludes; a failure cancels the rest of the
 * transaction.
 *
 * Where QEMU has coroutines and a main loop, vdisk has a thread per job
 * and two locks. The job lock (job_mutex, with job_cond announcing every
 * change) guards every job's state; a job's thread takes it only at its
 * pause points. Completion changes the graph, so it runs under the
 * recursive graph lock, taken before the job lock: the job's thread
 * takes it after run() returned, and a thread that already holds it and
 * waits for the job (vd_job_wait(), a transaction's abort) completes
 * the job itself instead of waiting for a thread that cannot get it.
 * The verbs take the graph lock too, because cancel and finalize may
 * complete jobs. Driver callbacks and done callbacks run without the job
 * lock (the graph lock keeps other completions out meanwhile);
 * listeners run with it.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "job_int.h"

/* A transaction: jobs that succeed or fail together. A single job is a
 * transaction of one, as in QEMU. */
struct vd_job_txn {
    vd_job *jobs;        /* via txn_next */
    bool aborting;
    int refcnt;
};

static pthread_mutex_t job_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t job_cond;
static pthread_once_t job_once = PTHREAD_ONCE_INIT;
static vd_job *job_list;          /* newest first */
static int live_threads;          /* job threads not yet returned */

static pthread_mutex_t graph_mutex = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;

typedef struct listener {
    vd_job_event_fn fn;
    void *opaque;
} listener;
static listener *listeners;
static size_t n_listeners;

static void job_init_once(void)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&job_cond, &a);
    pthread_condattr_destroy(&a);
}

void vd_job_lock(void)
{
    pthread_once(&job_once, job_init_once);
    pthread_mutex_lock(&job_mutex);
}

void vd_job_unlock(void)
{
    pthread_mutex_unlock(&job_mutex);
}

VD_API void vd_graph_lock(void)
{
    pthread_mutex_lock(&graph_mutex);
}

VD_API void vd_graph_unlock(void)
{
    pthread_mutex_unlock(&graph_mutex);
}

uint64_t vd_job_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void changed(void)
{
    pthread_cond_broadcast(&job_cond);
}

/* ---- names and tables ---- */

static const char *const type_names[VD_JOB_TYPE__MAX] = {
    "commit", "stream", "mirror", "backup", "create", "amend",
    "snapshot-load", "snapshot-save", "snapshot-delete",
};

static const char *const status_names[VD_JOB_STATUS__MAX] = {
    "undefined", "created", "running", "paused", "ready", "standby",
    "waiting", "pending", "aborting", "concluded", "null",
};

static const char *const on_error_names[VD_ON_ERROR__MAX] = {
    "report", "ignore", "enospc", "stop", "auto",
};

VD_API const char *vd_job_type_name(vd_job_type type)
{
    return (unsigned)type < VD_JOB_TYPE__MAX ? type_names[type] : NULL;
}

VD_API const char *vd_job_status_name(vd_job_status status)
{
    return (unsigned)status < VD_JOB_STATUS__MAX ? status_names[status]
                                                 : NULL;
}

VD_API const char *vd_on_error_name(vd_on_error policy)
{
    return (unsigned)policy < VD_ON_ERROR__MAX ? on_error_names[policy]
                                               : NULL;
}

VD_API int vd_on_error_parse(const char *name, vd_on_error *out)
{
    for (int i = 0; i < VD_ON_ERROR__MAX; i++) {
        if (name && strcmp(name, on_error_names[i]) == 0) {
            *out = (vd_on_error)i;
            return 0;
        }
    }
    return -EINVAL;
}

VD_API const char *vd_error_action_name(vd_error_action action)
{
    static const char *const names[] = { "ignore", "report", "stop" };
    return (unsigned)action < 3 ? names[action] : NULL;
}

VD_API const char *vd_io_status_name(vd_io_status status)
{
    static const char *const names[] = { "ok", "failed", "nospace" };
    return (unsigned)status < 3 ? names[status] : NULL;
}

/* QEMU's state transition table: allowed[from][to]. */
#define U VD_JOB_STATUS_UNDEFINED
static const bool allowed[VD_JOB_STATUS__MAX][VD_JOB_STATUS__MAX] = {
    /*               U  C  R  P  Y  S  W  D  X  E  N */
    /* undefined */ {0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0},
    /* created   */ {0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1},
    /* running   */ {0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0},
    /* paused    */ {0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0},
    /* ready     */ {0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0},
    /* standby   */ {0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0},
    /* waiting   */ {0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0},
    /* pending   */ {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0},
    /* aborting  */ {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0},
    /* concluded */ {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1},
    /* null      */ {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
};
#undef U

typedef enum verb {
    VERB_CANCEL, VERB_PAUSE, VERB_RESUME, VERB_SET_SPEED, VERB_COMPLETE,
    VERB_FINALIZE, VERB_DISMISS, VERB__MAX
} verb;

static const char *const verb_names[VERB__MAX] = {
    "cancel", "pause", "resume", "set-speed", "complete", "finalize",
    "dismiss",
};

/* QEMU's verb table: accepts[verb][state]. */
static const bool accepts[VERB__MAX][VD_JOB_STATUS__MAX] = {
    /*               U  C  R  P  Y  S  W  D  X  E  N */
    /* cancel    */ {0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0},
    /* pause     */ {0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    /* resume    */ {0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    /* set-speed */ {0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    /* complete  */ {0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0},
    /* finalize  */ {0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0},
    /* dismiss   */ {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0},
};

static int apply_verb(vd_job *job, verb v, vd_error *err)
{
    if (accepts[v][job->status])
        return 0;
    return vd_error_set(err, -EPERM, "Job '%s' in state '%s' cannot accept "
                        "command verb '%s'", job->id,
                        status_names[job->status], verb_names[v]);
}

/* ---- events ---- */

int vd_job_info_locked(vd_job *job, vd_job_info *info)
{
    memset(info, 0, sizeof(*info));
    info->id = strdup(job->id);
    if (!info->id)
        return -ENOMEM;
    info->type = job->drv->type;
    info->status = job->status;
    info->current_progress = job->progress_current;
    info->total_progress = job->progress_total;
    info->speed = job->speed;
    info->busy = job->busy;
    info->paused = job->pause_count > 0;
    info->ready = job->status == VD_JOB_STATUS_READY ||
                  job->status == VD_JOB_STATUS_STANDBY;
    info->auto_finalize = job->auto_finalize;
    info->auto_dismiss = job->auto_dismiss;
    info->io_status = job->io_status;
    if (job->ret < 0 && job->err.code) {
        info->error = strdup(job->err.message);
        if (!info->error) {
            vd_job_info_clear(info);
            return -ENOMEM;
        }
    }
    return 0;
}

VD_API int vd_job_get_info(vd_job *job, vd_job_info *info)
{
    vd_job_lock();
    int r = vd_job_info_locked(job, info);
    vd_job_unlock();
    return r;
}

VD_API void vd_job_info_clear(vd_job_info *info)
{
    if (!info)
        return;
    free(info->id);
    free(info->error);
    memset(info, 0, sizeof(*info));
}

void vd_job_emit(vd_job *job, vd_job_event_type type, bool is_read,
                 vd_error_action action)
{
    if (n_listeners == 0)
        return;
    vd_job_info info;
    if (vd_job_info_locked(job, &info) < 0)
        return;
    vd_job_event ev = { type, &info, is_read, action };
    for (size_t i = 0; i < n_listeners; i++)
        listeners[i].fn(&ev, listeners[i].opaque);
    vd_job_info_clear(&info);
}

VD_API int vd_job_listen(vd_job_event_fn fn, void *opaque)
{
    vd_job_lock();
    listener *l = realloc(listeners, (n_listeners + 1) * sizeof(*l));
    if (!l) {
        vd_job_unlock();
        return -ENOMEM;
    }
    listeners = l;
    listeners[n_listeners++] = (listener){ fn, opaque };
    vd_job_unlock();
    return 0;
}

VD_API void vd_job_unlisten(vd_job_event_fn fn, void *opaque)
{
    vd_job_lock();
    for (size_t i = 0; i < n_listeners; i++) {
        if (listeners[i].fn == fn && listeners[i].opaque == opaque) {
            memmove(&listeners[i], &listeners[i + 1],
                    (n_listeners - i - 1) * sizeof(*listeners));
            n_listeners--;
            break;
        }
    }
    if (n_listeners == 0) {
        free(listeners);
        listeners = NULL;
    }
    vd_job_unlock();
}

static void transition(vd_job *job, vd_job_status to)
{
    vd_job_status from = job->status;
    if (!allowed[from][to]) {
        /* A bug in this file, never the caller's: QEMU asserts. */
        fprintf(stderr, "vdisk: job '%s': transition %s -> %s is not "
                "allowed\n", job->id, status_names[from], status_names[to]);
        abort();
    }
    job->status = to;
    changed();
    if (from != to)
        vd_job_emit(job, VD_JOB_EVENT_STATUS_CHANGE, false, 0);
}

/* ---- lifetime ---- */

static vd_job_txn *txn_new(void)
{
    vd_job_txn *t = calloc(1, sizeof(*t));
    if (t)
        t->refcnt = 1;
    return t;
}

static void txn_unref(vd_job_txn *t)
{
    if (t && --t->refcnt == 0)
        free(t);
}

static void txn_del_job(vd_job *job)
{
    vd_job_txn *t = job->txn;
    if (!t)
        return;
    for (vd_job **p = &t->jobs; *p; p = &(*p)->txn_next) {
        if (*p == job) {
            *p = job->txn_next;
            break;
        }
    }
    job->txn = NULL;
    txn_unref(t);
}

static bool id_wellformed(const char *id)
{
    if (!((id[0] >= 'a' && id[0] <= 'z') || (id[0] >= 'A' && id[0] <= 'Z')))
        return false;
    for (const char *p = id + 1; *p; p++) {
        char c = *p;
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_'))
            return false;
    }
    return true;
}

static vd_job *find_locked(const char *id)
{
    for (vd_job *j = job_list; j; j = j->next)
        if (strcmp(j->id, id) == 0)
            return j;
    return NULL;
}

int vd_job_create(vd_job **out, const vd_job_driver *drv, void *state,
                  const vd_job_options *opts, vd_error *err)
{
    *out = NULL;
    if (!opts->id)
        return vd_error_set(err, -EINVAL, "An explicit job ID is required");
    if (!id_wellformed(opts->id))
        return vd_error_set(err, -EINVAL, "Invalid job ID '%s'", opts->id);
    vd_job *job = calloc(1, sizeof(*job));
    vd_job_txn *txn = txn_new();
    if (!job || !txn || !(job->id = strdup(opts->id))) {
        free(job);
        free(txn);
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    job->drv = drv;
    job->state = state;
    job->refcnt = 1;
    job->pause_count = 1;        /* the start removes it, as QEMU */
    job->paused = true;
    job->auto_finalize = !opts->manual_finalize;
    job->auto_dismiss = !opts->manual_dismiss;
    job->done = opts->done;
    job->done_opaque = opts->opaque;
    vd_error_clear(&job->err);

    vd_job_lock();
    if (find_locked(opts->id)) {
        vd_job_unlock();
        free(job->id);
        free(job);
        free(txn);
        return vd_error_set(err, -EINVAL, "Job ID '%s' already in use",
                            opts->id);
    }
    transition(job, VD_JOB_STATUS_CREATED);
    job->next = job_list;
    job_list = job;
    job->txn = txn;
    txn->jobs = job;
    vd_job_unlock();
    *out = job;
    return 0;
}

/* Frees @job; its thread is gone and nobody references it. */
static void job_free(vd_job *job)
{
    if (job->drv->free && job->state)
        job->drv->free(job);
    free(job->id);
    free(job);
}

static void unref_locked(vd_job *job)
{
    if (--job->refcnt == 0) {
        vd_job_unlock();
        job_free(job);
        vd_job_lock();
    }
}

VD_API void vd_job_ref(vd_job *job)
{
    vd_job_lock();
    job->refcnt++;
    vd_job_unlock();
}

VD_API void vd_job_unref(vd_job **job)
{
    if (!job || !*job)
        return;
    vd_job_lock();
    unref_locked(*job);
    vd_job_unlock();
    *job = NULL;
}

VD_API const char *vd_job_id(const vd_job *job)
{
    return job->id;
}

VD_API vd_job *vd_job_find(const char *id)
{
    vd_job_lock();
    vd_job *j = id ? find_locked(id) : NULL;
    vd_job_unlock();
    return j;
}

VD_API void vd_foreach_job(void (*fn)(vd_job *job, const vd_job_info *info,
                                      void *opaque),
                           void *opaque)
{
    vd_job_lock();
    for (vd_job *j = job_list; j; j = j->next) {
        vd_job_info i;
        if (vd_job_info_locked(j, &i) == 0) {
            fn(j, &i, opaque);
            vd_job_info_clear(&i);
        }
    }
    vd_job_unlock();
}

static void do_dismiss(vd_job *job)
{
    job->busy = false;
    job->paused = false;
    job->run_done = true;
    txn_del_job(job);
    for (vd_job **p = &job_list; *p; p = &(*p)->next) {
        if (*p == job) {
            *p = job->next;
            break;
        }
    }
    transition(job, VD_JOB_STATUS_NULL);
    unref_locked(job);
}

/* ---- the job's thread ---- */

bool vd_job_is_cancelled(vd_job *job)
{
    vd_job_lock();
    bool c = job->force_cancel;
    vd_job_unlock();
    return c;
}

void vd_job_kick(vd_job *job)
{
    job->kick_gen++;
    changed();
}

static void pause_point_locked(vd_job *job)
{
    if (job->pause_count == 0 || job->force_cancel)
        return;
    if (job->drv->pause) {
        /* The work the thread handed out ends first (QEMU's driver
         * pause): a paused job does no I/O. */
        vd_job_unlock();
        job->drv->pause(job);
        vd_job_lock();
        if (job->pause_count == 0 || job->force_cancel)
            return;
    }
    vd_job_status was = job->status;
    transition(job, was == VD_JOB_STATUS_READY ? VD_JOB_STATUS_STANDBY
                                               : VD_JOB_STATUS_PAUSED);
    job->paused = true;
    job->busy = false;
    while (job->pause_count > 0 && !job->force_cancel)
        pthread_cond_wait(&job_cond, &job_mutex);
    job->paused = false;
    job->busy = true;
    transition(job, was);
}

void vd_job_pause_point(vd_job *job)
{
    vd_job_lock();
    pause_point_locked(job);
    vd_job_unlock();
}

void vd_job_sleep(vd_job *job, uint64_t ns)
{
    vd_job_lock();
    if (!job->force_cancel && job->pause_count == 0 && ns > 0) {
        uint64_t deadline = vd_job_now_ns() + ns;
        unsigned gen = job->kick_gen;
        struct timespec ts = { (time_t)(deadline / 1000000000u),
                               (long)(deadline % 1000000000u) };
        job->busy = false;
        changed();
        while (!job->force_cancel && job->pause_count == 0 &&
               job->kick_gen == gen && vd_job_now_ns() < deadline)
            pthread_cond_timedwait(&job_cond, &job_mutex, &ts);
        job->busy = true;
    }
    pause_point_locked(job);
    vd_job_unlock();
}

void vd_job_progress_update(vd_job *job, uint64_t done)
{
    vd_job_lock();
    job->progress_current += done;
    vd_job_unlock();
}

void vd_job_progress_set_remaining(vd_job *job, uint64_t remaining)
{
    vd_job_lock();
    job->progress_total = job->progress_current + remaining;
    vd_job_unlock();
}

void vd_job_transition_to_ready(vd_job *job)
{
    vd_job_lock();
    transition(job, VD_JOB_STATUS_READY);
    vd_job_emit(job, VD_JOB_EVENT_READY, false, 0);
    vd_job_unlock();
}

void vd_job_pause_for_error(vd_job *job)
{
    if (!job->user_paused) {
        job->pause_count++;
        job->user_paused = true;
    }
}

/* ---- completion (graph lock and job lock held) ---- */

static bool is_completed(const vd_job *job)
{
    switch (job->status) {
    case VD_JOB_STATUS_WAITING:
    case VD_JOB_STATUS_PENDING:
    case VD_JOB_STATUS_ABORTING:
    case VD_JOB_STATUS_CONCLUDED:
    case VD_JOB_STATUS_NULL:
        return true;
    default:
        return false;
    }
}

static void update_rc(vd_job *job)
{
    if (job->ret == 0 && job->force_cancel)
        job->ret = -ECANCELED;
    if (job->ret < 0) {
        /* An I/O error that came without words (an injected one) is
         * reported as QEMU reports every job error: strerror. */
        if (!job->err.code || !job->err.message[0]) {
            job->err.code = 0;
            vd_error_set(&job->err, job->ret, "%s", strerror(-job->ret));
        }
        transition(job, VD_JOB_STATUS_ABORTING);
    }
}

/* Calls a driver callback without the job lock. */
#define UNLOCKED(call)        \
    do {                      \
        vd_job_unlock();      \
        call;                 \
        vd_job_lock();        \
    } while (0)

static void conclude(vd_job *job)
{
    transition(job, VD_JOB_STATUS_CONCLUDED);
    if (job->auto_dismiss || !job->started)
        do_dismiss(job);
}

static void finalize_single(vd_job *job)
{
    update_rc(job);
    int ret = job->ret;
    if (ret == 0) {
        if (job->drv->commit)
            UNLOCKED(job->drv->commit(job));
    } else if (job->drv->abort) {
        UNLOCKED(job->drv->abort(job));
    }
    if (job->drv->clean)
        UNLOCKED(job->drv->clean(job));
    job->finalized = true;
    if (job->done)
        UNLOCKED(job->done(job, ret, job->done_opaque));
    if (job->started)
        vd_job_emit(job, job->force_cancel ? VD_JOB_EVENT_CANCELLED
                                           : VD_JOB_EVENT_COMPLETED,
                    false, 0);
    txn_del_job(job);
    conclude(job);
}

static void exit_job(vd_job *job);

/* Waits until @job's run() returned and processes its exit here. The
 * caller holds a reference to @job. */
static void finish_sync(vd_job *job)
{
    while (!is_completed(job)) {
        if (job->run_done && !job->exited) {
            exit_job(job);
            break;
        }
        if (!job->started) {
            /* Never started: complete it as cancelled right here. */
            job->exited = true;
            job->run_done = true;
            job->ret = -ECANCELED;
            update_rc(job);
            break;
        }
        pthread_cond_wait(&job_cond, &job_mutex);
    }
}

static void txn_abort(vd_job *job)
{
    vd_job_txn *txn = job->txn;
    if (!txn || txn->aborting)
        return;
    txn->aborting = true;
    txn->refcnt++;
    for (vd_job *o = txn->jobs; o; o = o->txn_next) {
        if (o != job) {
            bool force = true;
            if (o->drv->cancel)
                force = o->drv->cancel(o, true);
            if (o->user_paused) {
                o->user_paused = false;
                o->pause_count--;
                o->io_status = VD_IO_STATUS_OK;
            }
            o->cancelled = true;
            o->force_cancel |= force;
            vd_job_kick(o);
        }
    }
    while (txn->jobs) {
        vd_job *o = txn->jobs;
        o->refcnt++;
        if (!is_completed(o))
            finish_sync(o);
        finalize_single(o);
        unref_locked(o);
    }
    txn_unref(txn);
}

static void do_finalize(vd_job *job)
{
    vd_job_txn *txn = job->txn;
    int rc = 0;
    txn->refcnt++;
    for (vd_job *o = txn->jobs; o && rc == 0; o = o->txn_next) {
        if (o->ret == 0 && o->drv->prepare) {
            vd_error e = VD_ERROR_INIT;
            int r;
            UNLOCKED(r = o->drv->prepare(o, &e));
            if (r < 0) {
                o->ret = r;
                if (!o->err.code)
                    o->err = e;
            }
            update_rc(o);
        }
        rc = o->ret;
    }
    if (rc) {
        txn_abort(job);
    } else {
        while (txn->jobs) {
            vd_job *o = txn->jobs;
            o->refcnt++;
            finalize_single(o);
            unref_locked(o);
        }
    }
    txn_unref(txn);
}

static void txn_success(vd_job *job)
{
    vd_job_txn *txn = job->txn;
    transition(job, VD_JOB_STATUS_WAITING);
    for (vd_job *o = txn->jobs; o; o = o->txn_next)
        if (!is_completed(o))
            return;
    bool manual = false;
    for (vd_job *o = txn->jobs; o; o = o->txn_next) {
        transition(o, VD_JOB_STATUS_PENDING);
        if (!o->auto_finalize) {
            vd_job_emit(o, VD_JOB_EVENT_PENDING, false, 0);
            manual = true;
        }
    }
    if (!manual)
        do_finalize(job);
}

static void completed(vd_job *job)
{
    update_rc(job);
    if (job->ret < 0)
        txn_abort(job);
    else
        txn_success(job);
}

/* QEMU's job_exit: run() has returned; settle the job. */
static void exit_job(vd_job *job)
{
    job->exited = true;
    job->busy = false;
    job->refcnt++;
    completed(job);
    unref_locked(job);
}

static void *job_thread(void *arg)
{
    vd_job *job = arg;
    vd_error e = VD_ERROR_INIT;

    vd_job_pause_point(job);
    int ret = job->drv->run(job, &e);

    vd_job_lock();
    job->run_done = true;
    if (job->ret == 0)
        job->ret = ret < 0 ? ret : 0;
    if (ret < 0 && !job->err.code)
        job->err = e;
    changed();
    vd_job_unlock();

    vd_graph_lock();
    vd_job_lock();
    if (!job->exited)
        exit_job(job);
    unref_locked(job);           /* the thread's reference */
    live_threads--;
    changed();
    vd_job_unlock();
    vd_graph_unlock();
    return NULL;
}

int vd_job_start(vd_job *job, vd_error *err)
{
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    vd_job_lock();
    job->refcnt++;                /* the thread's */
    job->started = true;
    job->pause_count--;
    job->busy = true;
    job->paused = false;
    transition(job, VD_JOB_STATUS_RUNNING);
    live_threads++;
    int r = pthread_create(&job->thread, &a, job_thread, job);
    pthread_attr_destroy(&a);
    if (r != 0) {
        live_threads--;
        job->refcnt--;
        job->ret = -r;
        vd_error_set(&job->err, -r, "Could not start the job's thread: %s",
                     strerror(r));
        job->run_done = true;
        vd_job_unlock();
        vd_graph_lock();
        vd_job_lock();
        exit_job(job);
        vd_job_unlock();
        vd_graph_unlock();
        return vd_error_set(err, -r, "Could not start the job's thread: %s",
                            strerror(r));
    }
    vd_job_unlock();
    return 0;
}

int vd_job_start_drained(vd_job *job, vd_error *err)
{
    vd_job_lock();
    job->pause_count++;
    vd_job_unlock();
    int r = vd_job_start(job, err);
    vd_job_lock();
    if (r == 0) {
        /* QEMU's job meets the drain at its first pause point. */
        while (job->status != VD_JOB_STATUS_PAUSED && !job->run_done)
            pthread_cond_wait(&job_cond, &job_mutex);
    }
    job->pause_count--;
    vd_job_kick(job);
    /* ... and is running again when the command that started it
     * answers: a query right after shows it running, as QEMU's. */
    while (r == 0 && job->status == VD_JOB_STATUS_PAUSED &&
           job->pause_count == 0 && !job->run_done)
        pthread_cond_wait(&job_cond, &job_mutex);
    vd_job_unlock();
    return r;
}

VD_API int vd_job_group(vd_job *const *jobs, size_t n, vd_error *err)
{
    vd_job_lock();
    for (size_t i = 0; i < n; i++) {
        if (jobs[i]->started || jobs[i]->status != VD_JOB_STATUS_CREATED) {
            vd_job_unlock();
            return vd_error_set(err, -EPERM, "Job '%s' was started already",
                                jobs[i]->id);
        }
    }
    vd_job_txn *txn = n ? jobs[0]->txn : NULL;
    for (size_t i = 1; i < n; i++) {
        vd_job *j = jobs[i];
        if (j->txn == txn)
            continue;
        txn_del_job(j);
        j->txn = txn;
        j->txn_next = txn->jobs;
        txn->jobs = j;
        txn->refcnt++;
    }
    vd_job_unlock();
    return 0;
}

VD_API int vd_job_start_deferred(vd_job *job, vd_error *err)
{
    vd_job_lock();
    bool created = job->status == VD_JOB_STATUS_CREATED && !job->started;
    vd_job_unlock();
    if (!created)
        return vd_error_set(err, -EPERM, "Job '%s' was started already",
                            job->id);
    return vd_job_start_drained(job, err);
}

void vd_job_early_fail(vd_job *job)
{
    vd_graph_lock();
    vd_job_lock();
    if (job->drv->clean && job->state)
        UNLOCKED(job->drv->clean(job));
    do_dismiss(job);
    vd_job_unlock();
    vd_graph_unlock();
}

/* ---- the verbs ---- */

#define VERB_BEGIN()     \
    vd_graph_lock();     \
    vd_job_lock()
#define VERB_END()       \
    vd_job_unlock();     \
    vd_graph_unlock()

VD_API int vd_job_pause(vd_job *job, vd_error *err)
{
    VERB_BEGIN();
    int r = apply_verb(job, VERB_PAUSE, err);
    if (r == 0 && job->user_paused)
        r = vd_error_set(err, -EPERM, "Job is already paused");
    if (r == 0) {
        job->user_paused = true;
        job->pause_count++;
        changed();
    }
    VERB_END();
    return r;
}

VD_API int vd_job_resume(vd_job *job, vd_error *err)
{
    VERB_BEGIN();
    int r = 0;
    if (!job->user_paused || job->pause_count <= 0)
        r = vd_error_set(err, -EPERM, "Can't resume a job that was not "
                         "paused");
    if (r == 0)
        r = apply_verb(job, VERB_RESUME, err);
    if (r == 0) {
        job->io_status = VD_IO_STATUS_OK;
        job->user_paused = false;
        job->pause_count--;
        vd_job_kick(job);
    }
    VERB_END();
    return r;
}

static void cancel_locked(vd_job *job, bool force)
{
    if (job->status == VD_JOB_STATUS_CONCLUDED) {
        do_dismiss(job);
        return;
    }
    if (job->drv->cancel)
        force = job->drv->cancel(job, force);
    else
        force = true;
    if (job->user_paused) {
        job->io_status = VD_IO_STATUS_OK;
        job->user_paused = false;
        job->pause_count--;
    }
    if (force || !job->run_done) {
        job->cancelled = true;
        job->force_cancel |= force;
    }
    if (!job->started) {
        job->exited = true;
        job->run_done = true;
        completed(job);
    } else if (job->run_done) {
        if (job->force_cancel) {
            /* Its exit may still be waiting for the graph lock. */
            txn_abort(job);
        }
    } else {
        vd_job_kick(job);
    }
}

VD_API int vd_job_cancel(vd_job *job, bool force, vd_error *err)
{
    VERB_BEGIN();
    job->refcnt++;
    int r = apply_verb(job, VERB_CANCEL, err);
    if (r == 0)
        cancel_locked(job, force);
    unref_locked(job);
    VERB_END();
    return r;
}

VD_API int vd_job_complete(vd_job *job, vd_error *err)
{
    VERB_BEGIN();
    int r = apply_verb(job, VERB_COMPLETE, err);
    if (r == 0 && (job->cancelled || !job->drv->complete))
        r = vd_error_set(err, -EPERM, "The active block job '%s' cannot be "
                         "completed", job->id);
    if (r == 0) {
        job->drv->complete(job);
        vd_job_kick(job);
    }
    VERB_END();
    return r;
}

VD_API int vd_job_finalize(vd_job *job, vd_error *err)
{
    VERB_BEGIN();
    job->refcnt++;
    int r = apply_verb(job, VERB_FINALIZE, err);
    if (r == 0)
        do_finalize(job);
    unref_locked(job);
    VERB_END();
    return r;
}

VD_API int vd_job_dismiss(vd_job *job, vd_error *err)
{
    VERB_BEGIN();
    job->refcnt++;
    int r = apply_verb(job, VERB_DISMISS, err);
    if (r == 0)
        do_dismiss(job);
    unref_locked(job);
    VERB_END();
    return r;
}

VD_API int vd_job_set_speed(vd_job *job, int64_t speed, vd_error *err)
{
    VERB_BEGIN();
    int r = apply_verb(job, VERB_SET_SPEED, err);
    if (r == 0 && speed < 0)
        r = vd_error_set(err, -EINVAL, "Parameter 'speed' expects a "
                         "non-negative value");
    if (r == 0) {
        int64_t old = job->speed;
        job->speed = speed;
        job->rl_start_ns = 0;
        /* A slower limit takes effect at the next piece anyway; a
         * faster one should end a long sleep now. */
        if (!speed || speed > old)
            vd_job_kick(job);
    }
    VERB_END();
    return r;
}

VD_API int vd_job_wait(vd_job *job, vd_error *err)
{
    vd_job_lock();
    job->refcnt++;
    for (;;) {
        if (job->finalized || job->status == VD_JOB_STATUS_NULL)
            break;
        if (job->run_done && !job->exited) {
            vd_job_unlock();
            vd_graph_lock();
            vd_job_lock();
            if (!job->exited)
                exit_job(job);
            vd_job_unlock();
            vd_graph_unlock();
            vd_job_lock();
            continue;
        }
        pthread_cond_wait(&job_cond, &job_mutex);
    }
    int r = job->ret;
    if (r < 0 && r != -ECANCELED && job->err.code)
        vd_error_set(err, r, "%s", job->err.message);
    unref_locked(job);
    vd_job_unlock();
    return r;
}

VD_API void vd_job_cancel_all_sync(void)
{
    for (;;) {
        vd_graph_lock();
        vd_job_lock();
        vd_job *j = job_list;
        if (!j) {
            vd_job_unlock();
            vd_graph_unlock();
            break;
        }
        j->refcnt++;
        if (j->status != VD_JOB_STATUS_CONCLUDED &&
            accepts[VERB_CANCEL][j->status])
            cancel_locked(j, true);
        if (j->status != VD_JOB_STATUS_NULL && !is_completed(j))
            finish_sync(j);
        if (j->status == VD_JOB_STATUS_CONCLUDED)
            do_dismiss(j);
        unref_locked(j);
        vd_job_unlock();
        vd_graph_unlock();
    }
    /* The detached threads are finishing their last lines. */
    vd_job_lock();
    while (live_threads > 0)
        pthread_cond_wait(&job_cond, &job_mutex);
    vd_job_unlock();
}
