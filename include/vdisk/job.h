/*
 * vdisk: block jobs, part of libvdisk's public API.
 *
 * A job is a long operation on the node graph that runs on a thread of
 * its own while the nodes stay in use: streaming a backing chain into
 * its overlay, committing an overlay into its base, mirroring, backing
 * up. Jobs follow QEMU 7.2's model (../shared/specs/job.json,
 * ../shared/specs/block-core.json, docs/jobs.md): the same states and
 * allowed transitions, the same verbs (pause, resume, cancel, complete,
 * finalize, dismiss, set-speed), the same error policies and the same
 * events, so that `vdisk serve` answers QMP exactly as
 * qemu-storage-daemon does and a program embedding the library gets the
 * same behaviour without a daemon.
 *
 * Life of a job: a start function (vd_stream_start(), ...) checks its
 * arguments, takes permissions on the job's nodes (a vd_user per node,
 * described as "stream job 'ID'" in conflict messages) and blocks every
 * other operation on them ("Node 'X' is busy: block device is in use by
 * block job: stream"), then starts the job's thread: CREATED, RUNNING.
 * The thread copies, honouring the speed limit, pauses and cancellation
 * between chunks, and on an I/O error applies the job's policy. When it
 * is done the job becomes WAITING, then PENDING; finalizing (automatic
 * unless manual_finalize) makes the job's graph changes (stream: the
 * overlay's new backing file) or undoes what it set up, calls the
 * options' done callback and concludes; dismissing (automatic unless
 * manual_dismiss) removes it: NULL.
 *
 * Threads: every function here may be called from any thread. One
 * library-wide job lock guards every job's state; a job's own thread
 * never holds it during I/O. Finalization changes the graph: it runs
 * under vd_graph_lock(), in the job's thread (or in a thread waiting in
 * vd_job_wait()). A program that changes the graph (opens, closes,
 * reopens, users) from several threads while jobs run holds
 * vd_graph_lock() around those changes, as `vdisk serve` does around
 * every QMP command.
 *
 * Events: listeners (vd_job_listen()) are called for every status
 * change and block-job event, in order, from whichever thread made the
 * change, with the job lock held: a listener must only record or
 * forward what it is given and must not call vd_job_* functions.
 *
 * Errors follow vdisk.h: 0 or a negative errno, and QEMU's message in
 * the optional vd_error.
 */
#ifndef VDISK_JOB_H
#define VDISK_JOB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vdisk/vdisk.h"

#ifdef __cplusplus
extern "C" {
#endif

/** A job (reference counted; see vd_job_ref()). */
typedef struct vd_job vd_job;

/** QEMU's JobType, in its order. */
typedef enum vd_job_type {
    VD_JOB_TYPE_COMMIT,
    VD_JOB_TYPE_STREAM,
    VD_JOB_TYPE_MIRROR,
    VD_JOB_TYPE_BACKUP,
    VD_JOB_TYPE_CREATE,
    VD_JOB_TYPE_AMEND,
    VD_JOB_TYPE_SNAPSHOT_LOAD,
    VD_JOB_TYPE_SNAPSHOT_SAVE,
    VD_JOB_TYPE_SNAPSHOT_DELETE,
    VD_JOB_TYPE__MAX
} vd_job_type;

/** QEMU's JobStatus, in its order. */
typedef enum vd_job_status {
    VD_JOB_STATUS_UNDEFINED,
    VD_JOB_STATUS_CREATED,
    VD_JOB_STATUS_RUNNING,
    VD_JOB_STATUS_PAUSED,
    VD_JOB_STATUS_READY,
    VD_JOB_STATUS_STANDBY,
    VD_JOB_STATUS_WAITING,
    VD_JOB_STATUS_PENDING,
    VD_JOB_STATUS_ABORTING,
    VD_JOB_STATUS_CONCLUDED,
    VD_JOB_STATUS_NULL,
    VD_JOB_STATUS__MAX
} vd_job_status;

/** What a job does on an I/O error (QEMU's BlockdevOnError). */
typedef enum vd_on_error {
    VD_ON_ERROR_REPORT,  /* fail the job */
    VD_ON_ERROR_IGNORE,  /* go on; the job ends with the error */
    VD_ON_ERROR_ENOSPC,  /* stop on ENOSPC, report anything else */
    VD_ON_ERROR_STOP,    /* pause the job until it is resumed */
    VD_ON_ERROR_AUTO,    /* as ENOSPC for jobs */
    VD_ON_ERROR__MAX
} vd_on_error;

/** What was done about one I/O error (QEMU's BlockErrorAction). */
typedef enum vd_error_action {
    VD_ERROR_ACTION_IGNORE,
    VD_ERROR_ACTION_REPORT,
    VD_ERROR_ACTION_STOP,
} vd_error_action;

/** A block job's I/O status (QEMU's BlockDeviceIoStatus). */
typedef enum vd_io_status {
    VD_IO_STATUS_OK,
    VD_IO_STATUS_FAILED,
    VD_IO_STATUS_NOSPACE,
} vd_io_status;

/** QEMU's names: "stream", "running", "report", "stop", "nospace"...
 * (static strings; NULL for an out-of-range value). */
VD_API const char *vd_job_type_name(vd_job_type type);
VD_API const char *vd_job_status_name(vd_job_status status);
VD_API const char *vd_on_error_name(vd_on_error policy);
VD_API const char *vd_error_action_name(vd_error_action action);
VD_API const char *vd_io_status_name(vd_io_status status);

/** Parses a BlockdevOnError name into @*out; -EINVAL when unknown. */
VD_API int vd_on_error_parse(const char *name, vd_on_error *out);

/** What every block job takes when it starts. Zero-initialised means:
 * no id (an error: QEMU requires one), no speed limit, report errors,
 * automatic finalize and dismiss, no callback. */
typedef struct vd_job_options {
    const char *id;           /* QEMU's job-id (copied) */
    int64_t speed;            /* bytes per second, 0: unlimited */
    vd_on_error on_error;     /* on-error / on-source-error */
    vd_on_error on_target_error;
    bool manual_finalize;     /* auto-finalize=false */
    bool manual_dismiss;      /* auto-dismiss=false */
    /* Create the job without starting it (a transaction's prepare):
     * vd_job_start_deferred() starts it, vd_job_cancel() drops it. Only
     * vd_backup_start() takes it. */
    bool defer_start;
    /* Called once when the job finalizes, with 0 on success, -ECANCELED
     * when cancelled, or the error; from the finalizing thread, with the
     * job lock not held (it may query the job, not wait for it). */
    void (*done)(vd_job *job, int ret, void *opaque);
    void *opaque;
} vd_job_options;

/** A copy of a job's state (QEMU's JobInfo and BlockJobInfo). */
typedef struct vd_job_info {
    char *id;
    vd_job_type type;
    vd_job_status status;
    uint64_t current_progress;
    uint64_t total_progress;
    int64_t speed;
    bool busy;                /* its thread is working, not waiting */
    bool paused;              /* paused by the user or by an error */
    bool ready;               /* READY or STANDBY */
    bool auto_finalize;
    bool auto_dismiss;
    vd_io_status io_status;
    char *error;              /* why it failed, or NULL */
} vd_job_info;

/** Fills @info with a copy of @job's state; free with
 * vd_job_info_clear(). -ENOMEM. */
VD_API int vd_job_get_info(vd_job *job, vd_job_info *info);
VD_API void vd_job_info_clear(vd_job_info *info);

/* ------------------------------------------------------------------ */
/* Finding and driving jobs                                           */
/* ------------------------------------------------------------------ */

/** The job named @id (borrowed: valid until it is dismissed, unless
 * referenced with vd_job_ref()), or NULL. */
VD_API vd_job *vd_job_find(const char *id);

/** Calls @fn for every job, newest first (QEMU's order in query-jobs),
 * with a copy of its state (valid during the call). The job lock is
 * held: @fn must not call vd_job_* functions (take a reference with
 * vd_job_ref() afterwards, from vd_job_find(), to act on a job). */
VD_API void vd_foreach_job(void (*fn)(vd_job *job, const vd_job_info *info,
                                      void *opaque),
                           void *opaque);

/** The job's id (borrowed, valid while the job is). */
VD_API const char *vd_job_id(const vd_job *job);

/** Takes / drops a reference; the last one frees a dismissed job. */
VD_API void vd_job_ref(vd_job *job);
VD_API void vd_job_unref(vd_job **job);

/*
 * The verbs. Each fails with -EPERM and QEMU's "Job 'ID' in state
 * 'STATE' cannot accept command verb 'VERB'" when the job's state does
 * not allow it, and otherwise as noted.
 */

/** Pauses at the job's next pause point (PAUSED, or STANDBY when
 * READY). "Job is already paused". */
VD_API int vd_job_pause(vd_job *job, vd_error *err);

/** Resumes a paused job and clears its I/O status. "Can't resume a job
 * that was not paused". */
VD_API int vd_job_resume(vd_job *job, vd_error *err);

/** Cancels. @force is QEMU's block-job-cancel force: a READY mirror
 * cancelled without it completes without switching to its target. */
VD_API int vd_job_cancel(vd_job *job, bool force, vd_error *err);

/** Asks a READY job to complete (mirror, active commit). "The active
 * block job 'ID' cannot be completed" for jobs without completion. */
VD_API int vd_job_complete(vd_job *job, vd_error *err);

/** Finalizes a PENDING job (and every job of its transaction). */
VD_API int vd_job_finalize(vd_job *job, vd_error *err);

/** Removes a CONCLUDED job: vd_job_find() no longer finds it and its
 * state becomes NULL. References (the start function's, vd_job_ref())
 * stay valid until released. */
VD_API int vd_job_dismiss(vd_job *job, vd_error *err);

/** Changes the speed limit (bytes per second, 0: none) at once.
 * "Parameter 'speed' expects a non-negative value" for a negative one. */
VD_API int vd_job_set_speed(vd_job *job, int64_t speed, vd_error *err);

/**
 * Waits until @job has concluded (finalizing it in this thread if its
 * own thread waits for the graph lock this thread holds). Returns the
 * job's result: 0, -ECANCELED, or its error (message in @err). A job
 * with manual_finalize must be finalized by another thread meanwhile.
 */
VD_API int vd_job_wait(vd_job *job, vd_error *err);

/** Starts a job created with defer_start, as a transaction's commit
 * does (QEMU's jobs meet the transaction's drained section first: the
 * job pauses once, then runs). -EPERM when it is not in CREATED. */
VD_API int vd_job_start_deferred(vd_job *job, vd_error *err);

/** Makes @jobs (created with defer_start, not started) one transaction,
 * QEMU's completion-mode "grouped": none finalizes before all have
 * finished, and one that fails or is cancelled cancels the others. */
VD_API int vd_job_group(vd_job *const *jobs, size_t n, vd_error *err);

/** Cancels every job (forced) and waits for each, as QEMU does on exit.
 * Call with no job pending a manual finalize that nobody will give. */
VD_API void vd_job_cancel_all_sync(void);

/* ------------------------------------------------------------------ */
/* Events                                                             */
/* ------------------------------------------------------------------ */

/** QEMU's job events. */
typedef enum vd_job_event_type {
    VD_JOB_EVENT_STATUS_CHANGE,  /* JOB_STATUS_CHANGE */
    VD_JOB_EVENT_READY,          /* BLOCK_JOB_READY */
    VD_JOB_EVENT_PENDING,        /* BLOCK_JOB_PENDING */
    VD_JOB_EVENT_COMPLETED,      /* BLOCK_JOB_COMPLETED */
    VD_JOB_EVENT_CANCELLED,      /* BLOCK_JOB_CANCELLED */
    VD_JOB_EVENT_ERROR,          /* BLOCK_JOB_ERROR */
} vd_job_event_type;

typedef struct vd_job_event {
    vd_job_event_type type;
    const vd_job_info *info;     /* the job's state at the event */
    /* VD_JOB_EVENT_ERROR only: */
    bool is_read;                /* the failed operation was a read */
    vd_error_action action;
} vd_job_event;

typedef void (*vd_job_event_fn)(const vd_job_event *ev, void *opaque);

/** Adds / removes a listener for every job's events (see the top of
 * this file for what a listener may do). -ENOMEM. */
VD_API int vd_job_listen(vd_job_event_fn fn, void *opaque);
VD_API void vd_job_unlisten(vd_job_event_fn fn, void *opaque);

/* ------------------------------------------------------------------ */
/* The graph lock                                                     */
/* ------------------------------------------------------------------ */

/** The library-wide recursive lock under which jobs change the graph
 * (see the top of this file). Never held during a job's I/O. */
VD_API void vd_graph_lock(void);
VD_API void vd_graph_unlock(void);

/* ------------------------------------------------------------------ */
/* The jobs                                                           */
/* ------------------------------------------------------------------ */

/**
 * Streams into @top the data it inherits from the layers of its backing
 * chain above @base (QEMU's block-stream), then makes @base (NULL: no
 * backing file at all) @top's backing file, in the image header and in
 * the open graph. @backing_file (may be NULL) is the name written into
 * the header instead of @base's file name; with @mask_protocol, a
 * protocol node as base is recorded with format "raw". Writes to @top
 * meanwhile are never overwritten by the copy. @base must be in @top's
 * backing chain below @top. On success @*out holds a reference to the
 * job (release it with vd_job_unref()).
 * Errors (QEMU's texts): -EINVAL (no id, "Invalid job ID", "Job ID 'X'
 * already in use", base not in the chain), -EBUSY (a node is busy with
 * another job or operation), -EPERM (permission conflict), -ENOMEM.
 */
VD_API int vd_stream_start(vd_job **out, vd_node *top, vd_node *base,
                           const char *backing_file, bool mask_protocol,
                           const vd_job_options *opts, vd_error *err);

/**
 * Commits an intermediate layer (QEMU's block-commit below the active
 * layer): copies into @base what the layers from @top down to @base's
 * overlay hold, grows @base first if it is shorter, then makes @base the
 * backing file of @top's overlay (header: @backing_file, or @base's file
 * name; with @mask_protocol a protocol base is recorded as "raw") and
 * drops the layers in between from @active's chain. @top must be below
 * @active in its chain and @base below @top; a read-only @base is
 * reopened read-write for the job. When @top is @active or something
 * writes it, this is an active commit: a mirror of @top into @base
 * (type "commit") that becomes READY and, on vd_job_complete(), moves
 * every user of @top to @base (see vd_mirror_start()). Errors as
 * vd_stream_start().
 */
VD_API int vd_commit_start(vd_job **out, vd_node *active, vd_node *top,
                           vd_node *base, const char *backing_file,
                           bool mask_protocol, const vd_job_options *opts,
                           vd_error *err);

/** What a mirror copies first (QEMU's MirrorSyncMode). */
typedef enum vd_mirror_sync {
    VD_MIRROR_SYNC_FULL,   /* the whole chain's content */
    VD_MIRROR_SYNC_TOP,    /* what the source's own layer holds */
    VD_MIRROR_SYNC_NONE,   /* only what is written from now on */
} vd_mirror_sync;

/** blockdev-mirror's options; zero-initialised: sync full, QEMU's
 * default granularity (the target's cluster size within 4..64 KiB),
 * 16 MiB of buffer, replace the source, unmap zeroes on the target. */
typedef struct vd_mirror_options {
    vd_mirror_sync sync;
    uint64_t granularity;     /* 0 or a power of two in [512, 64 MiB] */
    int64_t buf_size;         /* bytes copied at once, 0: 16 MiB */
    vd_node *replaces;        /* the node the target replaces, or NULL */
    bool no_unmap;            /* write zeroes without discarding */
    /* The target reads as zeros already (a new image): a full sync copies
     * only what the source holds (QEMU's zero_target false). */
    bool target_is_zero;
    /* Attached as the target's backing node when the mirror completes
     * (drive-mirror's source backing chain), or NULL. */
    vd_node *target_backing;
    /* copy-mode=write-blocking: once the job runs, every write to
     * @source is also written to @target before it completes. */
    bool write_blocking;
} vd_mirror_options;

/**
 * Mirrors @source into @target (QEMU's blockdev-mirror): copies what
 * @mo's sync asks for, then keeps copying what is written to @source;
 * the job becomes READY (event) once @target holds everything written.
 * vd_job_complete() then makes it finish: the users of @source (or of
 * @mo->replaces) are held at their request gates (vd_user_io_begin()),
 * the last writes are copied and flushed, and every user and parent
 * node moves to @target (not the opener of vd_open(): its caller holds
 * the node itself and must switch to @target on its own, for it writes
 * to the node directly). Cancelling a READY mirror without force
 * finishes with the same final copy and no switch. @target must be the
 * size of @source; nobody else may use it meanwhile (the job writes it
 * alone). Errors (QEMU's texts): granularity out of range or not a power
 * of two, "Can't mirror node into itself", busy nodes, permission
 * conflicts, as vd_stream_start().
 */
VD_API int vd_mirror_start(vd_job **out, vd_node *source, vd_node *target,
                           const vd_mirror_options *mo,
                           const vd_job_options *opts, vd_error *err);

/**
 * Backs @source up into @target (QEMU's blockdev-backup): @target
 * becomes @source as it was when the job started, whatever is written
 * to @source meanwhile (each write first copies the clusters it is about
 * to change; a write whose copy fails fails too). @sync: FULL copies
 * everything, TOP what @source's own layer holds, NONE only what writes
 * are about to change, until the job is cancelled (fleecing). With
 * @compress the target is written compressed. @target must have
 * @source's size; others may read it (an export of a fleecing target)
 * but not write or resize it. Errors (QEMU's texts): "Source and target
 * cannot be the same", "Source and target image have different sizes",
 * busy nodes, permission conflicts.
 */
VD_API int vd_backup_start(vd_job **out, vd_node *source, vd_node *target,
                           vd_mirror_sync sync, bool compress,
                           const vd_job_options *opts, vd_error *err);

/** What a backup copies (QEMU's MirrorSyncMode as backup takes it): the
 * first three are vd_mirror_sync's; INCREMENTAL is BITMAP with bitmap
 * mode on-success; BITMAP copies what the bitmap marks. */
typedef enum vd_backup_sync {
    VD_BACKUP_SYNC_FULL = VD_MIRROR_SYNC_FULL,
    VD_BACKUP_SYNC_TOP = VD_MIRROR_SYNC_TOP,
    VD_BACKUP_SYNC_NONE = VD_MIRROR_SYNC_NONE,
    VD_BACKUP_SYNC_INCREMENTAL,
    VD_BACKUP_SYNC_BITMAP,
} vd_backup_sync;

/** What a backup does to its bitmap when it ends (QEMU's BitmapSyncMode);
 * UNSET: not given (QEMU's has_bitmap_mode false). */
typedef enum vd_bitmap_sync_mode {
    VD_BITMAP_SYNC_UNSET,
    VD_BITMAP_SYNC_ON_SUCCESS,  /* cleared of what was copied on success */
    VD_BITMAP_SYNC_NEVER,       /* left as it was (sync=bitmap only) */
    VD_BITMAP_SYNC_ALWAYS,      /* cleared of what was copied, even on
                                 * failure or cancel */
} vd_bitmap_sync_mode;

/** QEMU's names ("bitmap", "on-success", ...); NULL when out of range. */
VD_API const char *vd_backup_sync_name(vd_backup_sync sync);
VD_API const char *vd_bitmap_sync_mode_name(vd_bitmap_sync_mode mode);

/** blockdev-backup's options; zero-initialised: sync full, no
 * compression, no bitmap. */
typedef struct vd_backup_options {
    vd_backup_sync sync;
    bool compress;
    /* A dirty bitmap of the source node itself (not of its chain), or
     * NULL. With sync BITMAP (or INCREMENTAL) only the clusters it marks
     * are copied. During the job the bitmap is frozen: busy, its bits
     * kept, while a successor records the source's writes. At the end,
     * unless @bitmap_mode is NEVER, on success (or always with ALWAYS)
     * the bitmap becomes the successor: it marks what was written since
     * the job started; otherwise the successor's bits are ORed back in;
     * a job that failed with ALWAYS also keeps the clusters it did not
     * copy. */
    const char *bitmap;
    vd_bitmap_sync_mode bitmap_mode;
} vd_backup_options;

/**
 * vd_backup_start() with a bitmap (QEMU's blockdev-backup with bitmap and
 * bitmap-mode). Checks first, in QEMU's order and words: "must provide a
 * valid bitmap name for 'bitmap' sync mode", "Bitmap sync mode must be
 * 'on-success' when using sync mode 'incremental'", "Bitmap 'X' could
 * not be found", "Bitmap sync mode must be given when providing a
 * bitmap", the bitmap busy or inconsistent, "sync mode 'none' does not
 * produce meaningful bitmap outputs", "Bitmap sync mode 'never' has no
 * meaningful effect when combined with sync mode 'full'", "Cannot
 * specify bitmap sync mode without a bitmap"; then vd_backup_start()'s,
 * a read-only bitmap being refused unless the mode is NEVER. Progress
 * counts the bytes the job has to copy (the bitmap's dirty clusters for
 * sync BITMAP).
 */
VD_API int vd_backup_start_opts(vd_job **out, vd_node *source,
                                vd_node *target, const vd_backup_options *bo,
                                const vd_job_options *opts, vd_error *err);

#ifdef __cplusplus
}
#endif

#endif
