/*
 * Internals of block jobs: the job driver vtable that each job
 * (stream.c, ...) fills, the job structure shared by job.c (states,
 * verbs, threads, transactions, events) and blockjob.c (nodes, speed,
 * error policy), and the helpers a job's thread calls.
 *
 * Locking: the job lock (job.c) guards every field below marked [J]; one
 * condition variable with it announces every change. A job's thread
 * reads its own driver state without it. Fields set before the thread
 * starts and never changed are unmarked.
 */
#ifndef VDISK_CORE_JOB_INT_H
#define VDISK_CORE_JOB_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "block_int.h"
#include "vdisk/job.h"

typedef struct vd_job_txn vd_job_txn;

/*
 * What a job type does. Callbacks marked (thread) run on the job's own
 * thread without the job lock; the others run in the finalizing thread
 * with the graph lock held and the job lock not held.
 */
typedef struct vd_job_driver {
    vd_job_type type;
    /* REQUIRED (thread): the work. Returns 0 or a negative errno (with
     * @err). Calls vd_job_pause_point() / vd_job_sleep() between pieces
     * and returns soon after vd_job_is_cancelled() becomes true. */
    int (*run)(vd_job *job, vd_error *err);
    /* job-complete on a READY job (mirror): make run() finish. Called
     * with the job lock held; must only set state and kick the job. */
    void (*complete)(vd_job *job);
    /* A cancel request: returns whether it is forced after all (a READY
     * mirror turns a soft cancel into completion). Job lock held.
     * Absent: every cancel is forced. */
    bool (*cancel)(vd_job *job, bool force);
    /* (thread) At a pause point, before the job pauses: waits for the
     * copies the thread handed to workers (vd_copy_pool), so that a
     * paused job does no I/O. Optional. */
    void (*pause)(vd_job *job);
    /* Before the graph changes of a transaction: may still fail, which
     * aborts every job of the transaction. */
    int (*prepare)(vd_job *job, vd_error *err);
    /* Exactly one of commit (success) or abort (failure or cancel). */
    void (*commit)(vd_job *job);
    void (*abort)(vd_job *job);
    /* After commit or abort: release what the job set up. */
    void (*clean)(vd_job *job);
    /* Frees the driver's state (last reference gone). */
    void (*free)(vd_job *job);
} vd_job_driver;

/* One node a block job works on: a user holding the job's permissions,
 * and the blocker of every other operation. */
typedef struct vd_job_node {
    vd_user *user;
    vd_node *node;
    struct vd_job_node *next;
} vd_job_node;

struct vd_job {
    const vd_job_driver *drv;
    void *state;                 /* the driver's */
    char *id;
    int refcnt;                  /* [J] */
    vd_job_status status;        /* [J] */
    vd_job_txn *txn;             /* [J] */
    vd_job *next;                /* [J] in the global list, newest first */
    vd_job *txn_next;            /* [J] in txn->jobs */

    pthread_t thread;
    bool started;                /* [J] the thread was created */
    bool busy;                   /* [J] the thread is not waiting */
    bool paused;                 /* [J] waiting at a pause point */
    bool user_paused;            /* [J] */
    int pause_count;             /* [J] */
    bool cancelled;              /* [J] a cancel was requested */
    bool force_cancel;           /* [J] ... and it is forced */
    bool run_done;               /* [J] run() returned (deferred) */
    bool exited;                 /* [J] completion was processed */
    bool joined;                 /* [J] the thread was joined */
    bool finalized;              /* [J] done callback and events sent */
    int ret;                     /* [J] */
    vd_error err;                /* [J] */
    unsigned kick_gen;           /* [J] bumped to wake a sleeping thread */

    uint64_t progress_current;   /* [J] */
    uint64_t progress_total;     /* [J] */
    bool auto_finalize, auto_dismiss;
    void (*done)(vd_job *job, int ret, void *opaque);
    void *done_opaque;

    /* The block-job part (blockjob.c). */
    int64_t speed;               /* [J] */
    uint64_t rl_start_ns;        /* [J] start of the rate window */
    uint64_t rl_bytes;           /* [J] bytes done since rl_start_ns */
    vd_on_error on_error, on_target_error;
    vd_io_status io_status;      /* [J] */
    vd_job_node *nodes;          /* set up before the thread starts */
    vd_blocker *blocker;
};

/* ---- job.c ---- */

void vd_job_lock(void);
void vd_job_unlock(void);

/* Creates a job in state CREATED (not started) and registers it. Checks
 * the id as QEMU does. The options' id, finalize/dismiss flags and done
 * callback are taken; the block-job fields are blockjob.c's. */
int vd_job_create(vd_job **out, const vd_job_driver *drv, void *state,
                  const vd_job_options *opts, vd_error *err);

/* Starts the job's thread: RUNNING. On failure the job is failed and
 * concluded as QEMU's job_early_fail. */
int vd_job_start(vd_job *job, vd_error *err);

/* vd_job_start() inside a drained section, as QEMU's transaction
 * actions start their jobs: the job pauses at its first pause point
 * (PAUSED), then the section ends and it runs (RUNNING again). */
int vd_job_start_drained(vd_job *job, vd_error *err);

/* A job that could not be set up after vd_job_create: removes it. */
void vd_job_early_fail(vd_job *job);

/* (thread) Waits here while the job is paused; returns at once when it
 * is not. */
void vd_job_pause_point(vd_job *job);

/* (thread) Sleeps @ns nanoseconds (woken early by a cancel, a speed
 * change or a resume), then passes a pause point. */
void vd_job_sleep(vd_job *job, uint64_t ns);

/* (thread) Whether a forced cancel was requested. */
bool vd_job_is_cancelled(vd_job *job);

/* (thread) Progress, in the job's units (bytes for block jobs). */
void vd_job_progress_update(vd_job *job, uint64_t done);
void vd_job_progress_set_remaining(vd_job *job, uint64_t remaining);

/* (thread) READY: job-complete is possible now. */
void vd_job_transition_to_ready(vd_job *job);

/* Sends @ev's type for @job to the listeners. Job lock held. */
void vd_job_emit(vd_job *job, vd_job_event_type type, bool is_read,
                 vd_error_action action);

/* Pauses the job as an error policy does (user-visible pause). Job lock
 * held. */
void vd_job_pause_for_error(vd_job *job);

/* Wakes the job's thread if it sleeps or waits. Job lock held. */
void vd_job_kick(vd_job *job);

/* Locked info copy (vd_job_get_info without taking the lock). */
int vd_job_info_locked(vd_job *job, vd_job_info *info);

/* ---- blockjob.c ---- */

/* vd_job_create plus the block-job part: the blocker "block device is
 * in use by block job: TYPE", the speed (checked) and the error
 * policies. On failure @state is still the caller's. */
int vd_block_job_create(vd_job **out, const vd_job_driver *drv, void *state,
                        const vd_job_options *opts, vd_error *err);

/* Adds @node to the job's nodes: a user holding @perm and sharing
 * @shared, described as "TYPE job 'ID'", and the job's blocker on every
 * operation of @node. Errors as vd_user_new(). */
int vd_block_job_add_node(vd_job *job, vd_node *node, unsigned perm,
                          unsigned shared, vd_error *err);

/* Releases every node (users and blockers). Idempotent. */
void vd_block_job_remove_nodes(vd_job *job);

/* (thread) Accounts @bytes copied against the speed limit. */
void vd_block_job_ratelimit_processed(vd_job *job, uint64_t bytes);

/* (thread) Sleeps as long as the speed limit asks (at least passing a
 * pause point), as QEMU's block_job_ratelimit_sleep. */
void vd_block_job_ratelimit_sleep(vd_job *job);

/* (thread) Applies the error policy @policy to error @errnum (positive)
 * of a read (@is_read) or write: sends BLOCK_JOB_ERROR and, for STOP,
 * pauses the job with its I/O status set. */
vd_error_action vd_block_job_error_action(vd_job *job, vd_on_error policy,
                                          bool is_read, int errnum);

/* Makes @base (NULL: none) @overlay's backing file: first in its header
 * (@backing_file, or the base's file name; with @mask_protocol a
 * protocol base is recorded as "raw"), then in the graph, @overlay
 * drained. Finalizing jobs only (graph lock held). */
int vd_block_job_set_backing(vd_node *overlay, vd_node *base,
                             const char *backing_file, bool mask_protocol,
                             vd_error *err);

/* Reopens a read-only @node read-write for a job (*reopened says so),
 * and back. */
int vd_block_job_make_writable(vd_node *node, bool *reopened, vd_error *err);
void vd_block_job_restore_read_only(vd_node *node, bool *reopened);

/* Starts a set-up block job: its length from @len_of's, a reference
 * for the caller in @*out, the thread. On failure the job has failed
 * (and concluded) and @*out is untouched. */
int vd_block_job_launch(vd_job *job, vd_node *len_of, vd_job **out,
                        vd_error *err);

/* Copies [off, off+len) of @src (through its chain) into @dst through
 * @buf (at least @len bytes): data as data (write @write_flags), what
 * reads as zeros as a zero write (@zero_flags). On failure *in_source
 * says which side failed. */
int vd_block_job_copy(vd_node *src, vd_node *dst, uint64_t off, uint64_t len,
                      uint8_t *buf, unsigned write_flags,
                      unsigned zero_flags, bool *in_source, vd_error *err);

/*
 * A job's copy workers (blockjob.c): a few threads that each copy one
 * range at a time through a buffer of their own, so that several copies
 * are in flight (QEMU's mirror operations, its block-copy tasks). The
 * job's thread hands out ranges; the pool keeps a list of the ranges in
 * flight, and a range is handed out, or locked from outside (a mirror's
 * write-blocking guest write), only once nothing in flight overlaps it:
 * overlapping copies happen one after the other, in the order they were
 * asked for, so an older read never overwrites a newer copy.
 */
typedef struct vd_copy_pool vd_copy_pool;

/* A worker's copy of [off, off+len) through @buf. Returns 0 or a
 * negative errno, *in_source saying which side failed. */
typedef int (*vd_copy_fn)(void *opaque, uint64_t off, uint64_t len,
                          uint8_t *buf, bool *in_source, vd_error *err);

/* A range in flight: a worker's, or one locked from outside. */
typedef struct vd_copy_span {
    uint64_t off, end;
    struct vd_copy_span *next;
} vd_copy_span;

/* @workers threads with a buffer of @max_len bytes each, aligned for
 * @align_node. */
int vd_copy_pool_new(vd_copy_pool **out, vd_node *align_node,
                     unsigned workers, uint64_t max_len, vd_copy_fn fn,
                     void *opaque, vd_error *err);
/* Joins the workers (after waiting for them) and frees the pool. */
void vd_copy_pool_free(vd_copy_pool **p);
/* Waits for an idle worker and for no overlap, then hands it the copy
 * of [off, off+len) (len <= max_len). */
void vd_copy_pool_submit(vd_copy_pool *p, uint64_t off, uint64_t len);
/* Waits until every worker is idle. Returns the first error since the
 * last call (0 if none): negative errno, *in_source, @err; with @err
 * NULL the error stays pending for a later call. */
int vd_copy_pool_drain(vd_copy_pool *p, bool *in_source, vd_error *err);
/* Whether a worker failed since the last vd_copy_pool_drain(). */
bool vd_copy_pool_failed(vd_copy_pool *p);
/* Whether nothing is in flight. */
bool vd_copy_pool_idle(vd_copy_pool *p);
/* Locks [off, off+len) against every copy in flight (waiting for the
 * overlapping ones), and unlocks it. */
void vd_copy_pool_lock_range(vd_copy_pool *p, vd_copy_span *r, uint64_t off,
                             uint64_t len);
void vd_copy_pool_unlock_range(vd_copy_pool *p, vd_copy_span *r);

/* (thread) A copy of the job failed with @r: the job's error policy, as
 * the side says. Returns @r (with @err: the errno's text alone, as QEMU's
 * job ends) to fail the job, or 0 to go on, after the pause that
 * on-error=stop asked for. */
int vd_block_job_copy_failed(vd_job *job, int r, bool in_source,
                             vd_error *err);
/* (thread) Waits for the copies in flight, then applies the policy to
 * a failure among them (every worker idle): as above. */
int vd_copy_pool_settle(vd_job *job, vd_copy_pool *p, vd_error *err);

/* mirror.c: active commit, a mirror of @active into @base, its backing
 * file, of job type commit. */
int vd_active_commit_start(vd_job **out, vd_node *active, vd_node *base,
                           const vd_job_options *opts, vd_error *err);

/* Monotonic clock in nanoseconds. */
uint64_t vd_job_now_ns(void);

#endif
