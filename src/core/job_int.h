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

/* mirror.c: active commit, a mirror of @active into @base, its backing
 * file, of job type commit. */
int vd_active_commit_start(vd_job **out, vd_node *active, vd_node *base,
                           const vd_job_options *opts, vd_error *err);

/* Monotonic clock in nanoseconds. */
uint64_t vd_job_now_ns(void);

#endif
