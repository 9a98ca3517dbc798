/*
 * Jobs through the public API alone (include/vdisk/job.h), without a
 * daemon: a stream of a three-layer qcow2 chain started, waited for and
 * checked (content unchanged, new backing file in the header and in the
 * graph), its done callback and the events seen by a listener in QEMU's
 * order; pause, resume and set-speed on a speed-limited stream; a cancel
 * (chain and content unchanged, BLOCK_JOB_CANCELLED); manual finalize
 * and dismiss; the verbs refused in states that do not take them, with
 * QEMU's texts; writes from other threads during the stream that must
 * all survive; the operation blockers a job sets on its nodes; and a
 * commit of the middle layer into the base; a mirror started, completed
 * and pivoted through the API, with a user's requests following it; a
 * backup under writes from another thread, equal to the start; the error
 * policies stop (pause, I/O status, resume retries) and report; a
 * full backup with a bitmap under writes (the bitmap then marks every
 * write made during the job) and an incremental backup by it into the
 * same target, which then equals the source; the bitmap refusals.
 * Exit 0 pass, 1 fail.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vdisk/bitmap.h"
#include "vdisk/job.h"
#include "vdisk/vdisk.h"

#include "check.h"

#define SIZE (4u << 20)

static char dir[] = "/tmp/vdisk-job-XXXXXX";
static uint8_t model[SIZE];

/* ---- events ---- */

static pthread_mutex_t ev_lock = PTHREAD_MUTEX_INITIALIZER;
static char ev_log[4096];

static void on_event(const vd_job_event *ev, void *opaque)
{
    (void)opaque;
    static const char *const names[] = {
        "status", "ready", "pending", "completed", "cancelled", "error",
    };
    char one[64];
    if (ev->type == VD_JOB_EVENT_STATUS_CHANGE)
        snprintf(one, sizeof(one), "%s ", vd_job_status_name(ev->info->status));
    else
        snprintf(one, sizeof(one), "%s ", names[ev->type]);
    pthread_mutex_lock(&ev_lock);
    strncat(ev_log, one, sizeof(ev_log) - strlen(ev_log) - 1);
    pthread_mutex_unlock(&ev_lock);
}

static void take_events(char *out, size_t len)
{
    pthread_mutex_lock(&ev_lock);
    snprintf(out, len, "%s", ev_log);
    ev_log[0] = 0;
    pthread_mutex_unlock(&ev_lock);
}

static int done_calls, done_ret;

static void on_done(vd_job *job, int ret, void *opaque)
{
    (void)job;
    (void)opaque;
    done_calls++;
    done_ret = ret;
}

/* ---- images ---- */

static void path_of(char *out, const char *name)
{
    snprintf(out, 300, "%s/%s", dir, name);
}

static void write_pattern(vd_node *n, uint64_t off, uint64_t len, int byte)
{
    vd_error err = VD_ERROR_INIT;
    uint8_t *buf = malloc(len);
    memset(buf, byte, len);
    CHECK(vd_pwrite(n, buf, len, off, 0, &err) == 0, "write: %s",
          err.message);
    memcpy(model + off, buf, len);
    free(buf);
}

/* base (0x11 in [0, 2M)) <- mid (0x22 in [1M, 2M)) <- top (0x33 at
 * 1.5M); the model is what top shows. */
static void make_chain(void)
{
    char p[300], b[300];
    vd_error err = VD_ERROR_INIT;
    const char *names[] = { "base.qcow2", "mid.qcow2", "top.qcow2" };
    memset(model, 0, sizeof(model));
    for (int i = 0; i < 3; i++) {
        vd_opts *o = vd_opts_new();
        vd_node *n = NULL;
        path_of(p, names[i]);
        unlink(p);
        vd_opts_set(o, "size", "4M");
        if (i > 0) {
            path_of(b, names[i - 1]);
            vd_opts_set(o, "backing_file", b);
            vd_opts_set(o, "backing_fmt", "qcow2");
        }
        CHECK(vd_create(p, "qcow2", o, &err) == 0, "create %s: %s", p,
              err.message);
        vd_opts_free(&o);
        CHECK(vd_open(&n, p, "qcow2", NULL, VD_O_RDWR | VD_O_NO_BACKING,
                      &err) == 0, "open %s: %s", p, err.message);
        if (i == 0)
            write_pattern(n, 0, 2 << 20, 0x11);
        else if (i == 1)
            write_pattern(n, 1 << 20, 1 << 20, 0x22);
        else
            write_pattern(n, 3 << 19, 65536, 0x33);
        vd_close(&n, NULL);
    }
}

static vd_node *open_top(void)
{
    char p[300];
    vd_error err = VD_ERROR_INIT;
    vd_node *n = NULL;
    path_of(p, "top.qcow2");
    CHECK(vd_open(&n, p, "qcow2", NULL, VD_O_RDWR, &err) == 0, "open: %s",
          err.message);
    return n;
}

static void check_content(vd_node *n, const char *what)
{
    vd_error err = VD_ERROR_INIT;
    uint8_t *buf = malloc(SIZE);
    CHECK(vd_pread(n, buf, SIZE, 0, 0, &err) == 0, "%s: read: %s", what,
          err.message);
    for (uint32_t i = 0; i < SIZE; i++) {
        if (buf[i] != model[i]) {
            CHECK(0, "%s: byte 0x%x is 0x%02x, expected 0x%02x", what, i,
                  buf[i], model[i]);
            break;
        }
    }
    free(buf);
}

static int chain_length(vd_node *n)
{
    int len = 0;
    for (; n; n = vd_node_child(n, "backing"))
        len++;
    return len;
}

static vd_job_status status_of(vd_job *job)
{
    vd_job_info i;
    vd_job_get_info(job, &i);
    vd_job_status s = i.status;
    vd_job_info_clear(&i);
    return s;
}

static void wait_status(vd_job *job, vd_job_status want)
{
    for (int i = 0; i < 3000 && status_of(job) != want; i++)
        usleep(10000);
    CHECK(status_of(job) == want, "job in %s, expected %s",
          vd_job_status_name(status_of(job)), vd_job_status_name(want));
}

/* ---- scenarios ---- */

static void test_stream(void)
{
    char ev[4096];
    vd_error err = VD_ERROR_INIT;
    vd_job *job = NULL;
    make_chain();
    vd_node *top = open_top();
    vd_node *base = vd_node_child(vd_node_child(top, "backing"), "backing");
    vd_job_options o = { .id = "s1", .done = on_done };

    done_calls = 0;
    take_events(ev, sizeof(ev));
    CHECK(vd_stream_start(&job, top, base, NULL, false, &o, &err) == 0,
          "stream: %s", err.message);
    CHECK(vd_job_find("s1") == job, "vd_job_find");
    CHECK(vd_job_wait(job, &err) == 0, "wait: %s", err.message);
    CHECK(done_calls == 1 && done_ret == 0, "done %d times, ret %d",
          done_calls, done_ret);
    take_events(ev, sizeof(ev));
    CHECK(strcmp(ev, "created running waiting pending completed concluded "
                 "null ") == 0, "events: %s", ev);
    CHECK(vd_job_find("s1") == NULL, "dismissed job still found");
    vd_job_unref(&job);
    CHECK(chain_length(top) == 2, "chain of %d after stream",
          chain_length(top));
    CHECK(vd_node_child(top, "backing") == base, "base is not the backing");
    check_content(top, "after stream");
    vd_close(&top, NULL);
    top = open_top();
    CHECK(chain_length(top) == 2, "chain of %d after reopen",
          chain_length(top));
    check_content(top, "reopened after stream");
    vd_close(&top, NULL);
}

static void test_verbs(void)
{
    char ev[4096];
    vd_error err = VD_ERROR_INIT;
    vd_job *job = NULL;
    make_chain();
    vd_node *top = open_top();
    vd_job_options o = { .id = "v", .speed = 512 * 1024,
                         .manual_finalize = true, .manual_dismiss = true };

    take_events(ev, sizeof(ev));
    CHECK(vd_stream_start(&job, top, NULL, NULL, false, &o, &err) == 0,
          "stream: %s", err.message);
    /* Refused in RUNNING, with QEMU's texts. */
    vd_error_clear(&err);
    CHECK(vd_job_complete(job, &err) == -EPERM &&
          strcmp(err.message, "Job 'v' in state 'running' cannot accept "
                 "command verb 'complete'") == 0, "complete: %s",
          err.message);
    vd_error_clear(&err);
    CHECK(vd_job_resume(job, &err) < 0 &&
          strcmp(err.message, "Can't resume a job that was not paused") == 0,
          "resume: %s", err.message);
    vd_error_clear(&err);
    CHECK(vd_job_set_speed(job, -1, &err) < 0 &&
          strcmp(err.message, "Parameter 'speed' expects a non-negative "
                 "value") == 0, "set-speed: %s", err.message);
    /* The nodes are busy. */
    vd_error_clear(&err);
    CHECK(vd_op_is_blocked(top, VD_OP_RESIZE, &err) &&
          strstr(err.message, "block device is in use by block job: stream"),
          "resize not blocked: %s", err.message);
    vd_job *other = NULL;
    vd_job_options o2 = { .id = "w" };
    vd_error_clear(&err);
    CHECK(vd_stream_start(&other, top, NULL, NULL, false, &o2, &err) ==
          -EBUSY, "second stream: %s", err.message);
    vd_error_clear(&err);
    CHECK(vd_stream_start(&other, top, NULL, NULL, false, &o, &err) < 0,
          "same id accepted");

    CHECK(vd_job_pause(job, &err) == 0, "pause: %s", err.message);
    vd_error_clear(&err);
    CHECK(vd_job_pause(job, &err) < 0 &&
          strcmp(err.message, "Job is already paused") == 0, "pause: %s",
          err.message);
    wait_status(job, VD_JOB_STATUS_PAUSED);
    vd_job_info i;
    vd_job_get_info(job, &i);
    CHECK(i.paused && !i.busy && i.speed == 512 * 1024, "paused info");
    vd_job_info_clear(&i);
    CHECK(vd_job_set_speed(job, 0, &err) == 0, "speed: %s", err.message);
    CHECK(vd_job_resume(job, &err) == 0, "resume: %s", err.message);
    wait_status(job, VD_JOB_STATUS_PENDING);
    vd_error_clear(&err);
    CHECK(vd_job_dismiss(job, &err) < 0 &&
          strcmp(err.message, "Job 'v' in state 'pending' cannot accept "
                 "command verb 'dismiss'") == 0, "dismiss: %s", err.message);
    CHECK(vd_job_finalize(job, &err) == 0, "finalize: %s", err.message);
    CHECK(status_of(job) == VD_JOB_STATUS_CONCLUDED, "not concluded");
    CHECK(vd_job_dismiss(job, &err) == 0, "dismiss: %s", err.message);
    CHECK(status_of(job) == VD_JOB_STATUS_NULL, "not null");
    CHECK(vd_job_find("v") == NULL, "dismissed job still found");
    vd_job_unref(&job);
    take_events(ev, sizeof(ev));
    CHECK(strcmp(ev, "created running paused running waiting pending "
                 "pending completed concluded null ") == 0, "events: %s",
          ev);
    CHECK(chain_length(top) == 1, "chain of %d", chain_length(top));
    check_content(top, "after the whole chain");
    CHECK(!vd_op_is_blocked(top, VD_OP_RESIZE, NULL), "still blocked");
    vd_close(&top, NULL);
}

static void test_cancel(void)
{
    char ev[4096];
    vd_error err = VD_ERROR_INIT;
    vd_job *job = NULL;
    make_chain();
    vd_node *top = open_top();
    vd_job_options o = { .id = "c", .speed = 256 * 1024, .done = on_done };
    take_events(ev, sizeof(ev));
    done_calls = 0;
    CHECK(vd_stream_start(&job, top, NULL, NULL, false, &o, &err) == 0,
          "stream: %s", err.message);
    CHECK(vd_job_cancel(job, true, &err) == 0, "cancel: %s", err.message);
    CHECK(vd_job_wait(job, &err) == -ECANCELED, "wait after cancel");
    CHECK(done_calls == 1 && done_ret == -ECANCELED, "done after cancel");
    vd_job_unref(&job);
    take_events(ev, sizeof(ev));
    CHECK(strcmp(ev, "created running aborting cancelled concluded null ")
          == 0, "events: %s", ev);
    CHECK(chain_length(top) == 3, "chain of %d after cancel",
          chain_length(top));
    check_content(top, "after cancel");
    vd_close(&top, NULL);
}

static void test_commit(void)
{
    vd_error err = VD_ERROR_INIT;
    vd_job *job = NULL;
    make_chain();
    vd_node *top = open_top();
    vd_node *mid = vd_node_child(top, "backing");
    vd_node *base = vd_node_child(mid, "backing");
    vd_job_options o = { .id = "m" };
    vd_job_options ao = { .id = "ac" };
    /* An active commit is a mirror into the base: READY, then cancelled
     * by force (nothing moves). */
    CHECK(vd_commit_start(&job, top, top, base, NULL, false, &ao, &err) == 0,
          "active commit: %s", err.message);
    wait_status(job, VD_JOB_STATUS_READY);
    CHECK(vd_job_cancel(job, true, &err) == 0, "cancel: %s", err.message);
    CHECK(vd_job_wait(job, &err) == -ECANCELED, "active commit not cancelled");
    vd_job_unref(&job);
    CHECK(chain_length(top) == 3, "chain of %d after the active commit",
          chain_length(top));
    vd_error_clear(&err);
    CHECK(vd_commit_start(&job, top, mid, mid, NULL, false, &o, &err) < 0 &&
          strcmp(err.message, "cannot commit an image into itself") == 0,
          "into itself: %s", err.message);
    vd_error_clear(&err);
    CHECK(vd_commit_start(&job, top, mid, base, NULL, false, &o, &err) == 0,
          "commit: %s", err.message);
    CHECK(vd_job_wait(job, &err) == 0, "wait: %s", err.message);
    vd_job_unref(&job);
    CHECK(chain_length(top) == 2, "chain of %d after commit",
          chain_length(top));
    CHECK(vd_node_child(top, "backing") == base, "base is not the backing");
    check_content(top, "after commit");
    vd_close(&top, NULL);
    top = open_top();
    CHECK(chain_length(top) == 2, "chain of %d after reopen",
          chain_length(top));
    check_content(top, "reopened after commit");
    vd_close(&top, NULL);
}

static void on_ready_complete(const vd_job_event *ev, void *opaque)
{
    /* Listeners may not call job functions: note it, complete later. */
    if (ev->type == VD_JOB_EVENT_READY)
        atomic_store((atomic_int *)opaque, 1);
}

/* A mirror through the public API: READY, then complete; the opener's
 * writes made through a user after the pivot land in the target. */
static void test_mirror(void)
{
    char p[300];
    vd_error err = VD_ERROR_INIT;
    vd_job *job = NULL;
    atomic_int ready = 0;
    make_chain();
    vd_node *top = open_top();
    path_of(p, "tgt.qcow2");
    unlink(p);
    vd_opts *o = vd_opts_new();
    vd_opts_set(o, "size", "4M");
    CHECK(vd_create(p, "qcow2", o, &err) == 0, "create: %s", err.message);
    vd_opts_free(&o);
    vd_node *tgt = NULL;
    CHECK(vd_open(&tgt, p, "qcow2", NULL, VD_O_RDWR | VD_O_NO_USER, &err) == 0,
          "open target: %s", err.message);
    vd_user *dev = NULL;
    CHECK(vd_user_new(&dev, top, "device", VD_PERM_CONSISTENT_READ |
                      VD_PERM_WRITE, VD_PERM_ALL, &err) == 0, "user: %s",
          err.message);
    vd_job_listen(on_ready_complete, &ready);
    vd_job_options jo = { .id = "mi", .done = on_done };
    vd_mirror_options mo = { .sync = VD_MIRROR_SYNC_FULL };
    done_calls = 0;
    CHECK(vd_mirror_start(&job, top, tgt, &mo, &jo, &err) == 0,
          "mirror: %s", err.message);
    for (int i = 0; i < 3000 && !atomic_load(&ready); i++)
        usleep(10000);
    CHECK(atomic_load(&ready), "never ready");
    CHECK(vd_job_complete(job, &err) == 0, "complete: %s", err.message);
    CHECK(vd_job_wait(job, &err) == 0, "wait: %s", err.message);
    CHECK(done_calls == 1 && done_ret == 0, "done");
    vd_job_unref(&job);
    vd_job_unlisten(on_ready_complete, &ready);
    CHECK(vd_user_node(dev) == tgt, "the user was not moved to the target");
    vd_node *n = vd_user_io_begin(dev);
    CHECK(n == tgt, "requests still go to the source");
    write_pattern(n, 65536, 4096, 0x77);
    vd_user_io_end(dev);
    check_content(tgt, "target after the pivot");
    vd_user_free(&dev);
    vd_close(&tgt, NULL);
    vd_close(&top, NULL);
    unlink(p);
}

/* A backup through the public API while threads write the source: the
 * target must be the source as it was at the start. */
static uint8_t start_model[SIZE];

static void *backup_writer(void *arg)
{
    vd_node *n = arg;
    for (int k = 0; k < 48; k++)
        write_pattern(n, ((uint64_t)k * 83 * 1024) % (SIZE - 8192), 8192,
                      0x90 + (k & 15));
    return NULL;
}

static void test_backup(void)
{
    char p[300];
    vd_error err = VD_ERROR_INIT;
    vd_job *job = NULL;
    make_chain();
    vd_node *top = open_top();
    memcpy(start_model, model, SIZE);
    path_of(p, "bak.qcow2");
    unlink(p);
    vd_opts *o = vd_opts_new();
    vd_opts_set(o, "size", "4M");
    CHECK(vd_create(p, "qcow2", o, &err) == 0, "create: %s", err.message);
    vd_opts_free(&o);
    vd_node *tgt = NULL;
    CHECK(vd_open(&tgt, p, "qcow2", NULL, VD_O_RDWR | VD_O_NO_USER, &err) == 0,
          "open target: %s", err.message);
    vd_job_options jo = { .id = "bk", .speed = 4 << 20, .done = on_done };
    done_calls = 0;
    CHECK(vd_backup_start(&job, top, tgt, VD_MIRROR_SYNC_FULL, false, &jo,
                          &err) == 0, "backup: %s", err.message);
    pthread_t t;
    pthread_create(&t, NULL, backup_writer, top);
    pthread_join(t, NULL);
    CHECK(vd_job_wait(job, &err) == 0, "wait: %s", err.message);
    CHECK(done_calls == 1 && done_ret == 0, "done");
    vd_job_unref(&job);
    memcpy(model, start_model, SIZE);
    check_content(tgt, "backup target");
    vd_close(&tgt, NULL);
    vd_close(&top, NULL);
    unlink(p);
}

/* Whether [off, off+len) is dirty in bitmap @name of @n. */
static bool range_dirty(vd_node *n, const char *name, uint64_t off,
                        uint64_t len)
{
    uint64_t start, bytes;
    return vd_bitmap_next_dirty(n, name, off, &start, &bytes, NULL) == 1 &&
           start <= off && start + bytes >= off + len;
}

static void test_backup_bitmap(void)
{
    char p[300];
    vd_error err = VD_ERROR_INIT;
    vd_job *job = NULL;
    make_chain();
    vd_node *top = open_top();
    path_of(p, "inc.qcow2");
    unlink(p);
    vd_opts *o = vd_opts_new();
    vd_opts_set(o, "size", "4M");
    CHECK(vd_create(p, "qcow2", o, &err) == 0, "create: %s", err.message);
    vd_opts_free(&o);
    vd_node *tgt = NULL;
    CHECK(vd_open(&tgt, p, "qcow2", NULL, VD_O_RDWR | VD_O_NO_USER, &err) == 0,
          "open target: %s", err.message);
    CHECK(vd_bitmap_add(top, "b", 0, 0, &err) == 0, "add: %s", err.message);

    /* Refusals before anything happens. */
    vd_backup_options bo = { .sync = VD_BACKUP_SYNC_BITMAP };
    vd_job_options jo = { .id = "ib" };
    CHECK(vd_backup_start_opts(&job, top, tgt, &bo, &jo, &err) < 0 &&
          !strcmp(err.message, "must provide a valid bitmap name for "
                  "'bitmap' sync mode"), "no bitmap: %s", err.message);
    bo = (vd_backup_options){ .sync = VD_BACKUP_SYNC_FULL, .bitmap = "b" };
    err = (vd_error)VD_ERROR_INIT;
    CHECK(vd_backup_start_opts(&job, top, tgt, &bo, &jo, &err) < 0 &&
          !strcmp(err.message, "Bitmap sync mode must be given when "
                  "providing a bitmap"), "no mode: %s", err.message);

    /* Full, the bitmap receiving what is written meanwhile. */
    memcpy(start_model, model, SIZE);
    bo.bitmap_mode = VD_BITMAP_SYNC_ON_SUCCESS;
    jo.speed = 4 << 20;
    err = (vd_error)VD_ERROR_INIT;
    CHECK(vd_backup_start_opts(&job, top, tgt, &bo, &jo, &err) == 0,
          "full backup: %s", err.message);
    vd_bitmap_info info;
    CHECK(vd_bitmap_get_info(top, "b", &info, NULL) == 0 && info.busy &&
          info.recording, "the bitmap is frozen during the job");
    free(info.name);
    pthread_t t;
    pthread_create(&t, NULL, backup_writer, top);
    pthread_join(t, NULL);
    CHECK(vd_job_wait(job, &err) == 0, "wait: %s", err.message);
    vd_job_unref(&job);
    for (int k = 0; k < 48; k++)
        CHECK(range_dirty(top, "b", ((uint64_t)k * 83 * 1024) % (SIZE - 8192),
                          8192), "write %d made during the job is not in the "
              "bitmap", k);
    uint8_t now[SIZE];
    memcpy(now, model, SIZE);
    memcpy(model, start_model, SIZE);
    check_content(tgt, "full backup");
    memcpy(model, now, SIZE);

    /* Incremental into the same target: it becomes the source now. */
    bo = (vd_backup_options){ .sync = VD_BACKUP_SYNC_INCREMENTAL,
                              .bitmap = "b" };
    jo = (vd_job_options){ .id = "ib2" };
    CHECK(vd_backup_start_opts(&job, top, tgt, &bo, &jo, &err) == 0,
          "incremental: %s", err.message);
    CHECK(vd_job_wait(job, &err) == 0, "wait: %s", err.message);
    vd_job_unref(&job);
    check_content(tgt, "incremental backup");
    CHECK(vd_bitmap_get_info(top, "b", &info, NULL) == 0 && !info.busy &&
          info.recording && info.count == 0, "bitmap after the incremental: "
          "busy %d recording %d count %" PRIu64, info.busy, info.recording,
          info.count);
    free(info.name);
    vd_close(&tgt, NULL);
    vd_close(&top, NULL);
    unlink(p);
}

/* The error policies: a read of the source's data fails once (blkdebug's
 * inject-error); with on-error=stop the mirror pauses with its I/O status
 * failed and a BLOCK_JOB_ERROR, and the resume retries the same piece;
 * with report the job fails with the error. */
static vd_node *open_faulty_top(void)
{
    char p[300], o[700];
    vd_error err = VD_ERROR_INIT;
    vd_node *n = NULL;
    vd_extent ext;
    /* Where the top keeps its own data (guest 1.5 MiB): the first read
     * of that sector fails, not the header's. */
    vd_node *plain = open_top();
    CHECK(vd_block_status(plain, 3 << 19, 4096, &ext, &err) == 0 &&
          (ext.flags & VD_BLOCK_OFFSET_VALID), "no host offset");
    uint64_t sector = ext.offset / 512;
    vd_close(&plain, NULL);
    path_of(p, "top.qcow2");
    snprintf(o, sizeof(o), "driver=qcow2,file.driver=blkdebug,"
             "file.image.filename=%s,file.inject-error.0.iotype=read,"
             "file.inject-error.0.event=read_aio,"
             "file.inject-error.0.sector=%" PRIu64 ","
             "file.inject-error.0.once=on", p, sector);
    vd_opts *opts = vd_opts_new();
    CHECK(vd_opts_parse(opts, o, NULL, &err) == 0, "options: %s",
          err.message);
    CHECK(vd_open(&n, NULL, NULL, opts, VD_O_RDWR, &err) == 0, "open: %s",
          err.message);
    vd_opts_free(&opts);
    return n;
}

static void test_error_policy(void)
{
    char ev[4096], p[300];
    vd_error err = VD_ERROR_INIT;
    for (int stop = 1; stop >= 0; stop--) {
        vd_job *job = NULL;
        make_chain();
        vd_node *top = open_faulty_top();
        path_of(p, "err.qcow2");
        unlink(p);
        vd_opts *o = vd_opts_new();
        vd_opts_set(o, "size", "4M");
        vd_create(p, "qcow2", o, &err);
        vd_opts_free(&o);
        vd_node *tgt = NULL;
        CHECK(vd_open(&tgt, p, "qcow2", NULL, VD_O_RDWR | VD_O_NO_USER,
                      &err) == 0, "open target: %s", err.message);
        vd_job_options jo = { .id = "e", .on_error = stop ? VD_ON_ERROR_STOP
                                                          : VD_ON_ERROR_REPORT };
        vd_mirror_options mo = { .sync = VD_MIRROR_SYNC_TOP };
        take_events(ev, sizeof(ev));
        CHECK(vd_mirror_start(&job, top, tgt, &mo, &jo, &err) == 0,
              "mirror: %s", err.message);
        if (stop) {
            wait_status(job, VD_JOB_STATUS_PAUSED);
            vd_job_info i;
            vd_job_get_info(job, &i);
            CHECK(i.io_status == VD_IO_STATUS_FAILED && i.paused,
                  "stopped job: io-status %s", vd_io_status_name(i.io_status));
            vd_job_info_clear(&i);
            CHECK(vd_job_resume(job, &err) == 0, "resume: %s", err.message);
            wait_status(job, VD_JOB_STATUS_READY);
            CHECK(vd_job_cancel(job, false, &err) == 0, "cancel: %s",
                  err.message);
            CHECK(vd_job_wait(job, &err) == 0, "wait: %s", err.message);
            take_events(ev, sizeof(ev));
            CHECK(strstr(ev, "error paused running") != NULL,
                  "events: %s", ev);
        } else {
            vd_error_clear(&err);
            CHECK(vd_job_wait(job, &err) == -EIO, "report: %d", err.code);
            take_events(ev, sizeof(ev));
            CHECK(strstr(ev, "error aborting") != NULL, "events: %s", ev);
        }
        vd_job_unref(&job);
        vd_close(&tgt, NULL);
        vd_close(&top, NULL);
        unlink(p);
    }
}

/* Writers during the stream: every write lands, none is overwritten by
 * the copy of older data from below. */
typedef struct writer {
    vd_node *node;
    int index;
} writer;

static void *writer_main(void *arg)
{
    writer *w = arg;
    for (int k = 0; k < 64; k++) {
        uint64_t off = ((uint64_t)(k * 4 + w->index) * 61 * 1024) %
                       (SIZE - 4096);
        off &= ~4095ull;
        /* Disjoint: each writer owns offsets congruent to its index. */
        if ((off / 4096) % 4 != (uint64_t)w->index)
            continue;
        write_pattern(w->node, off, 4096, 0x50 + w->index * 8 + (k & 7));
    }
    return NULL;
}

static void test_live_writes(void)
{
    vd_error err = VD_ERROR_INIT;
    vd_job *job = NULL;
    make_chain();
    vd_node *top = open_top();
    vd_job_options o = { .id = "l", .speed = 2 << 20 };
    CHECK(vd_stream_start(&job, top, NULL, NULL, false, &o, &err) == 0,
          "stream: %s", err.message);
    pthread_t t[4];
    writer w[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (writer){ top, i };
        pthread_create(&t[i], NULL, writer_main, &w[i]);
    }
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    CHECK(vd_job_wait(job, &err) == 0, "wait: %s", err.message);
    vd_job_unref(&job);
    CHECK(chain_length(top) == 1, "chain of %d", chain_length(top));
    check_content(top, "after stream with writers");
    vd_close(&top, NULL);
}

int main(void)
{
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    CHECK(vd_job_listen(on_event, NULL) == 0, "listen");
    test_stream();
    test_verbs();
    test_cancel();
    test_commit();
    test_mirror();
    test_backup();
    test_backup_bitmap();
    test_error_policy();
    test_live_writes();
    vd_job_cancel_all_sync();
    vd_job_unlisten(on_event, NULL);
    const char *names[] = { "base.qcow2", "mid.qcow2", "top.qcow2" };
    for (int i = 0; i < 3; i++) {
        char p[300];
        path_of(p, names[i]);
        unlink(p);
    }
    rmdir(dir);
    TEST_EXIT("test-job");
}
