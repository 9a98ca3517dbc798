/*
 * The "iscsi" protocol driver: a LUN of an iSCSI target reached through
 * libiscsi, as QEMU 7.2's block/iscsi.c (BlockdevOptionsIscsi of
 * ../shared/specs/block-core.json, the URI form of
 * ../shared/specs/qemu-block-drivers.rst.inc):
 *
 *   iscsi://[user[%password]@]host[:port]/target-iqn/lun
 *
 * or the options transport (tcp), portal, target, lun, user, password
 * (from the URI), password-secret, initiator-name, header-digest and
 * timeout. Reads and writes are READ/WRITE(10), or (16) on LUNs past 2^32
 * blocks; flush is SYNCHRONIZE CACHE(10); discard is UNMAP when the
 * logical block provisioning VPD page (0xb2) sets LBPU; zero writes are
 * WRITE SAME(16), with the UNMAP bit when LBPWS and LBPRZ say unmapped
 * blocks read as zeros; block status is GET LBA STATUS when READ
 * CAPACITY(16) sets LBPME. The block limits VPD page (0xb0) bounds the
 * transfers, discards and zero writes; the LUN's block size is the
 * request alignment, so the core does the read-modify-write of
 * unaligned requests.
 *
 * Threads. A libiscsi context is not thread-safe, so each is used by one
 * thread at a time: the node keeps a small pool of sessions (one login
 * each, opened as the number of concurrent requests grows, at most
 * ISCSI_POOL), and a request takes an idle one under the node's mutex,
 * runs its command on it with the mutex released and gives it back. So
 * up to ISCSI_POOL commands are in flight on the target at once.
 *
 * Waiting. Commands go through libiscsi's asynchronous API and this
 * file's own poll loop, which gives every command a deadline: the
 * "timeout" option (seconds), or ISCSI_DEFAULT_TIMEOUT when it is 0
 * (QEMU's "no timeout": we never wait forever). A lost connection makes
 * the session be dropped and the command retried once on a new login (a
 * restarted target is thus survived as in QEMU, whose libiscsi
 * reconnects); a second failure, or a deadline passed, fails the request
 * with a message naming the URI. libiscsi's own reconnection is turned
 * off so that it never loops on a dead target behind our back.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

#include "core/block_int.h"
#include "common/dlib.h"

/* The library's functions this driver calls (common/dlib.h: loaded at
 * the first open or create, not linked). */
#define ISCSI_LIB_FUNCS(X) \
    X(iscsi_create_context) \
    X(iscsi_destroy_context) \
    X(iscsi_destroy_url) \
    X(iscsi_full_connect_async) \
    X(iscsi_get_error) \
    X(iscsi_get_fd) \
    X(iscsi_get_lba_status_task) \
    X(iscsi_inquiry_task) \
    X(iscsi_is_logged_in) \
    X(iscsi_logout_async) \
    X(iscsi_parse_full_url) \
    X(iscsi_read10_iov_task) \
    X(iscsi_read16_iov_task) \
    X(iscsi_readcapacity10_task) \
    X(iscsi_readcapacity16_task) \
    X(iscsi_service) \
    X(iscsi_set_header_digest) \
    X(iscsi_set_initiator_username_pwd) \
    X(iscsi_set_noautoreconnect) \
    X(iscsi_set_session_type) \
    X(iscsi_set_targetname) \
    X(iscsi_set_timeout) \
    X(iscsi_synchronizecache10_task) \
    X(iscsi_unmap_task) \
    X(iscsi_which_events) \
    X(iscsi_write10_iov_task) \
    X(iscsi_write16_iov_task) \
    X(iscsi_writesame16_task) \
    X(scsi_datain_unmarshall) \
    X(scsi_free_scsi_task)
VD_DLIB_DEFINE(iscsi_lib, VDISK_LIBISCSI_SONAME, ISCSI_LIB_FUNCS);

#define ISCSI_POOL 4
#define ISCSI_DEFAULT_TIMEOUT 60          /* seconds, when timeout=0 */
#define ISCSI_LOGOUT_TIMEOUT_MS 2000
#define ISCSI_DEFAULT_INITIATOR "iqn.2008-11.org.linux-kvm"
#define ISCSI_RETRIES 5                   /* unit attentions, busy */

typedef struct iscsi_session {
    struct iscsi_context *ctx;  /* NULL: not logged in */
    bool busy;                  /* taken by a request */
} iscsi_session;

typedef struct iscsi_state {
    char *uri;                  /* iscsi://portal/target/lun, messages */
    char *portal, *target, *user, *password, *initiator;
    int lun;
    enum iscsi_header_digest digest;
    unsigned timeout;           /* the option, seconds; 0: none asked */

    int type;                   /* peripheral device type */
    uint32_t block_size;
    uint64_t num_blocks;
    bool use16;                 /* READ/WRITE(16), else (10) */
    bool lbpme, lbprz, lbpu, lbpws;
    uint32_t max_xfer_len, opt_unmap_gran, max_unmap;
    uint64_t max_ws_len;
    uint8_t *zero_block;        /* WRITE SAME's data: one zero block */
    _Atomic bool has_write_same;
    _Atomic bool has_lba_status;

    pthread_mutex_t lock;       /* guards sessions[].busy and .ctx swaps */
    pthread_cond_t cond;        /* a session became idle */
    iscsi_session sessions[ISCSI_POOL];
} iscsi_state;

/* ---------------------------------------------------------------- */
/* Sessions and the poll loop                                        */
/* ---------------------------------------------------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t deadline_ms(const iscsi_state *s)
{
    unsigned t = s->timeout ? s->timeout : ISCSI_DEFAULT_TIMEOUT;

    return now_ms() + (int64_t)t * 1000;
}

/* What a completion callback leaves for the waiting thread. */
typedef struct iscsi_wait {
    bool done;
    int status;
    struct scsi_task *task;     /* a SCSI command's task, or NULL */
} iscsi_wait;

static void wait_cb(struct iscsi_context *ctx, int status, void *data,
                    void *opaque)
{
    iscsi_wait *w = opaque;

    (void)ctx;
    w->done = true;
    w->status = status;
    (void)data;
}

static void task_cb(struct iscsi_context *ctx, int status, void *data,
                    void *opaque)
{
    iscsi_wait *w = opaque;

    (void)ctx;
    w->done = true;
    w->status = status;
    w->task = data;
}

enum { WAIT_OK = 0, WAIT_LOST = -1, WAIT_TIMEOUT = -2 };

/*
 * Drives @ctx until @w is done or @deadline (CLOCK_MONOTONIC ms) passes.
 * WAIT_LOST: the connection failed (the session is unusable);
 * WAIT_TIMEOUT: the deadline passed. libiscsi is serviced at least once a
 * second so that its own timeouts (iscsi_set_timeout) are checked.
 */
static int wait_for(struct iscsi_context *ctx, iscsi_wait *w,
                    int64_t deadline)
{
    while (!w->done) {
        int64_t left = deadline - now_ms();
        struct pollfd pfd;
        int r;

        if (left <= 0) {
            return WAIT_TIMEOUT;
        }
        pfd.fd = LIB(iscsi_get_fd)(ctx);
        pfd.events = (short)LIB(iscsi_which_events)(ctx);
        pfd.revents = 0;
        if (pfd.fd < 0) {
            return WAIT_LOST;
        }
        r = poll(&pfd, 1, left < 1000 ? (int)left : 1000);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return WAIT_LOST;
        }
        if (LIB(iscsi_service)(ctx, r > 0 ? pfd.revents : 0) < 0) {
            return WAIT_LOST;
        }
    }
    return WAIT_OK;
}

/* libiscsi's last error text without the newline it may end with. */
static const char *lib_error(struct iscsi_context *ctx)
{
    static __thread char buf[512];
    size_t n;

    snprintf(buf, sizeof(buf), "%s", LIB(iscsi_get_error)(ctx));
    n = strlen(buf);
    while (n && (buf[n - 1] == '\n' || buf[n - 1] == ' ')) {
        buf[--n] = '\0';
    }
    return buf;
}

/* Ends a session: a logout with a short deadline when it is still
 * healthy, then the context (whose pending commands are cancelled). */
static void session_drop(struct iscsi_context *ctx, bool logout)
{
    if (!ctx) {
        return;
    }
    if (logout && LIB(iscsi_is_logged_in)(ctx)) {
        iscsi_wait w = { 0 };
        if (LIB(iscsi_logout_async)(ctx, wait_cb, &w) == 0) {
            wait_for(ctx, &w, now_ms() + ISCSI_LOGOUT_TIMEOUT_MS);
        }
    }
    LIB(iscsi_destroy_context)(ctx);
}

/* Logs in to the LUN: a new context in *@out, or an error naming the
 * URI (QEMU's "iSCSI: Failed to connect to LUN : ..." after it). */
static int session_connect(iscsi_state *s, struct iscsi_context **out,
                           vd_error *err)
{
    struct iscsi_context *ctx;
    iscsi_wait w = { 0 };
    int r;

    *out = NULL;
    ctx = LIB(iscsi_create_context)(s->initiator);
    if (!ctx) {
        return vd_error_set(err, -ENOMEM,
                            "iSCSI: Failed to create iSCSI context.");
    }
    if (LIB(iscsi_set_targetname)(ctx, s->target)) {
        r = vd_error_set(err, -EINVAL, "iSCSI: Failed to set target name.");
        goto fail;
    }
    if (s->user &&
        LIB(iscsi_set_initiator_username_pwd)(ctx, s->user, s->password)) {
        r = vd_error_set(err, -EINVAL, "Failed to set initiator username "
                         "and password");
        goto fail;
    }
    if (LIB(iscsi_set_session_type)(ctx, ISCSI_SESSION_NORMAL) ||
        LIB(iscsi_set_header_digest)(ctx, s->digest)) {
        r = vd_error_set(err, -EINVAL, "iSCSI: Failed to set session "
                         "parameters.");
        goto fail;
    }
    LIB(iscsi_set_timeout)(ctx, (int)s->timeout);
    /* We retry on a new login ourselves, with a deadline. */
    LIB(iscsi_set_noautoreconnect)(ctx, 1);

    if (LIB(iscsi_full_connect_async)(ctx, s->portal, s->lun, wait_cb, &w)) {
        r = vd_error_set(err, -EIO, "%s: iSCSI: Failed to connect to LUN : "
                         "%s", s->uri, lib_error(ctx));
        goto fail;
    }
    r = wait_for(ctx, &w, deadline_ms(s));
    if (r == WAIT_TIMEOUT) {
        r = vd_error_set(err, -ETIMEDOUT, "%s: iSCSI: Failed to connect to "
                         "LUN : no answer within %u seconds", s->uri,
                         s->timeout ? s->timeout : ISCSI_DEFAULT_TIMEOUT);
        goto fail;
    }
    if (r != WAIT_OK || w.status != SCSI_STATUS_GOOD) {
        r = vd_error_set(err, -EIO, "%s: iSCSI: Failed to connect to LUN : "
                         "%s", s->uri, lib_error(ctx));
        goto fail;
    }
    *out = ctx;
    return 0;

fail:
    LIB(iscsi_destroy_context)(ctx);
    return r;
}

/* Takes an idle session, logging in when it has no context yet; waits
 * while all ISCSI_POOL are busy. Returns its index. */
static int session_get(iscsi_state *s, vd_error *err)
{
    int idx = -1;

    pthread_mutex_lock(&s->lock);
    for (;;) {
        int empty = -1;
        for (int i = 0; i < ISCSI_POOL; i++) {
            if (s->sessions[i].busy) {
                continue;
            }
            if (s->sessions[i].ctx) {
                idx = i;
                break;
            }
            if (empty < 0) {
                empty = i;
            }
        }
        if (idx < 0) {
            idx = empty;
        }
        if (idx >= 0) {
            break;
        }
        pthread_cond_wait(&s->cond, &s->lock);
    }
    s->sessions[idx].busy = true;
    pthread_mutex_unlock(&s->lock);

    if (!s->sessions[idx].ctx) {
        struct iscsi_context *ctx;
        int r = session_connect(s, &ctx, err);
        if (r < 0) {
            pthread_mutex_lock(&s->lock);
            s->sessions[idx].busy = false;
            pthread_cond_signal(&s->cond);
            pthread_mutex_unlock(&s->lock);
            return r;
        }
        s->sessions[idx].ctx = ctx;
    }
    return idx;
}

/* Gives a session back; @broken: its connection is unusable, drop it so
 * that the next user logs in again. The idle sessions go with it: they
 * reach the same target, which has most likely gone or restarted, and a
 * retry must not land on one of them. */
static void session_put(iscsi_state *s, int idx, bool broken)
{
    struct iscsi_context *old[ISCSI_POOL] = { NULL };

    pthread_mutex_lock(&s->lock);
    if (broken) {
        old[idx] = s->sessions[idx].ctx;
        s->sessions[idx].ctx = NULL;
        for (int i = 0; i < ISCSI_POOL; i++) {
            if (i != idx && !s->sessions[i].busy) {
                old[i] = s->sessions[i].ctx;
                s->sessions[i].ctx = NULL;
            }
        }
    }
    s->sessions[idx].busy = false;
    pthread_cond_signal(&s->cond);
    pthread_mutex_unlock(&s->lock);
    for (int i = 0; i < ISCSI_POOL; i++) {
        session_drop(old[i], false);
    }
}

/* ---------------------------------------------------------------- */
/* Commands                                                          */
/* ---------------------------------------------------------------- */

enum iscsi_op {
    OP_READ, OP_WRITE, OP_SYNC, OP_UNMAP, OP_WRITE_SAME, OP_LBA_STATUS,
    OP_INQUIRY, OP_CAPACITY16, OP_CAPACITY10,
};

typedef struct iscsi_cmd {
    enum iscsi_op op;
    uint64_t lba;
    uint32_t blocks;
    vd_iov *qiov;               /* READ, WRITE */
    bool unmap;                 /* WRITE SAME */
    int page;                   /* INQUIRY: VPD page, -1 standard */
} iscsi_cmd;

static const char *op_name(const iscsi_state *s, enum iscsi_op op)
{
    switch (op) {
    case OP_READ:
        return s->use16 ? "READ(16)" : "READ(10)";
    case OP_WRITE:
        return s->use16 ? "WRITE(16)" : "WRITE(10)";
    case OP_SYNC:
        return "SYNCHRONIZE CACHE(10)";
    case OP_UNMAP:
        return "UNMAP";
    case OP_WRITE_SAME:
        return "WRITE SAME(16)";
    case OP_LBA_STATUS:
        return "GET LBA STATUS";
    case OP_INQUIRY:
        return "INQUIRY";
    case OP_CAPACITY16:
        return "READ CAPACITY(16)";
    case OP_CAPACITY10:
        return "READ CAPACITY(10)";
    }
    return "command";
}

/* Queues @c on @ctx; the task or NULL (libiscsi's error is set). */
static struct scsi_task *submit(iscsi_state *s, struct iscsi_context *ctx,
                                const iscsi_cmd *c, iscsi_wait *w)
{
    /* struct scsi_iovec is laid out as struct iovec (libiscsi says so
     * in scsi-lowlevel.h), so the request's vector is passed as is. */
    struct scsi_iovec *iov = c->qiov ? (struct scsi_iovec *)c->qiov->iov
                                     : NULL;
    int niov = c->qiov ? c->qiov->niov : 0;
    uint32_t len = c->blocks * s->block_size;
    struct unmap_list ul;

    switch (c->op) {
    case OP_READ:
        if (s->use16) {
            return LIB(iscsi_read16_iov_task)(ctx, s->lun, c->lba, len,
                                              (int)s->block_size, 0, 0, 0, 0,
                                              0, task_cb, w, iov, niov);
        }
        return LIB(iscsi_read10_iov_task)(ctx, s->lun, (uint32_t)c->lba, len,
                                          (int)s->block_size, 0, 0, 0, 0, 0,
                                          task_cb, w, iov, niov);
    case OP_WRITE:
        if (s->use16) {
            return LIB(iscsi_write16_iov_task)(ctx, s->lun, c->lba, NULL,
                                               len, (int)s->block_size, 0, 0,
                                               0, 0, 0, task_cb, w, iov,
                                               niov);
        }
        return LIB(iscsi_write10_iov_task)(ctx, s->lun, (uint32_t)c->lba,
                                           NULL, len, (int)s->block_size, 0,
                                           0, 0, 0, 0, task_cb, w, iov, niov);
    case OP_SYNC:
        /* LBA 0, 0 blocks: the whole LUN, as QEMU's flush. */
        return LIB(iscsi_synchronizecache10_task)(ctx, s->lun, 0, 0, 0, 0,
                                                  task_cb, w);
    case OP_UNMAP:
        ul.lba = c->lba;
        ul.num = c->blocks;
        return LIB(iscsi_unmap_task)(ctx, s->lun, 0, 0, &ul, 1, task_cb, w);
    case OP_WRITE_SAME:
        return LIB(iscsi_writesame16_task)(ctx, s->lun, c->lba, s->zero_block,
                                           s->block_size, c->blocks, 0,
                                           c->unmap, 0, 0, task_cb, w);
    case OP_LBA_STATUS:
        /* Room for the 8-byte header and one 16-byte descriptor: we
         * ask about one extent at a time. */
        return LIB(iscsi_get_lba_status_task)(ctx, s->lun, c->lba, 8 + 16,
                                              task_cb, w);
    case OP_INQUIRY:
        return LIB(iscsi_inquiry_task)(ctx, s->lun, c->page >= 0,
                                       c->page >= 0 ? c->page : 0, 255,
                                       task_cb, w);
    case OP_CAPACITY16:
        return LIB(iscsi_readcapacity16_task)(ctx, s->lun, task_cb, w);
    case OP_CAPACITY10:
        return LIB(iscsi_readcapacity10_task)(ctx, s->lun, 0, 0, task_cb, w);
    }
    return NULL;
}

/* QEMU's iscsi_translate_sense(): the errno of a CHECK CONDITION. */
static int sense_errno(const struct scsi_sense *sense)
{
    switch (sense->key) {
    case SCSI_SENSE_NOT_READY:
        return -EBUSY;
    case SCSI_SENSE_DATA_PROTECTION:
        return -EACCES;
    case SCSI_SENSE_COMMAND_ABORTED:
        return -ECANCELED;
    case SCSI_SENSE_ILLEGAL_REQUEST:
        break;
    default:
        return -EIO;
    }
    switch (sense->ascq) {
    case SCSI_SENSE_ASCQ_PARAMETER_LIST_LENGTH_ERROR:
    case SCSI_SENSE_ASCQ_INVALID_OPERATION_CODE:
    case SCSI_SENSE_ASCQ_INVALID_FIELD_IN_CDB:
    case SCSI_SENSE_ASCQ_INVALID_FIELD_IN_PARAMETER_LIST:
        return -EINVAL;
    case SCSI_SENSE_ASCQ_LBA_OUT_OF_RANGE:
        return -ENOSPC;
    case SCSI_SENSE_ASCQ_LOGICAL_UNIT_NOT_SUPPORTED:
        return -ENOTSUP;
    case SCSI_SENSE_ASCQ_WRITE_PROTECTED:
        return -EACCES;
    default:
        return -EIO;
    }
}

/*
 * Runs @c on a session of the pool. On success returns 0 and, with
 * @task_out, hands over the finished task (its data-in; the caller frees
 * it with scsi_free_scsi_task()). On a CHECK CONDITION the errno of the
 * sense data is returned and *@sense (when given) gets it, so callers
 * can tell an unsupported command from a failure. Unit attentions and a
 * busy target are retried; a lost connection once on a new login.
 */
static int run_cmd(iscsi_state *s, const iscsi_cmd *c,
                   struct scsi_task **task_out, struct scsi_sense *sense,
                   vd_error *err)
{
    bool relogged = false;

    if (task_out) {
        *task_out = NULL;
    }
    for (int attempt = 0;; attempt++) {
        iscsi_wait w = { 0 };
        struct scsi_task *task;
        int idx, r;

        idx = session_get(s, err);
        if (idx < 0) {
            return idx;
        }
        struct iscsi_context *ctx = s->sessions[idx].ctx;
        task = submit(s, ctx, c, &w);
        if (!task) {
            r = vd_error_set(err, -ENOMEM, "%s: %s failed: %s", s->uri,
                             op_name(s, c->op), lib_error(ctx));
            session_put(s, idx, true);
            return r;
        }
        r = wait_for(ctx, &w, deadline_ms(s));
        if (r == WAIT_TIMEOUT || (r == WAIT_OK &&
                                  w.status == SCSI_STATUS_TIMEOUT)) {
            /* The command may still be queued on the target: closing
             * its connection makes the target abort the session's
             * tasks, the most an initiator can do against a late
             * landing. */
            session_put(s, idx, true);
            LIB(scsi_free_scsi_task)(task);
            r = vd_error_set(err, -ETIMEDOUT, "%s: %s timed out after %u "
                             "seconds", s->uri, op_name(s, c->op),
                             s->timeout ? s->timeout : ISCSI_DEFAULT_TIMEOUT);
            /* Tools that print only the errno's text (convert, as
             * qemu-img) still tell which server failed. */
            vd_warn("%s", err ? err->message : "iSCSI: timeout");
            return r;
        }
        if (r == WAIT_LOST || w.status == SCSI_STATUS_CANCELLED ||
            w.status == SCSI_STATUS_ERROR) {
            /* libiscsi's error text is often an older one here. */
            session_put(s, idx, true);
            LIB(scsi_free_scsi_task)(task);
            vd_warn("%s: iSCSI: connection lost during %s%s", s->uri,
                    op_name(s, c->op), relogged ? "" : "; logging in again");
            if (!relogged) {
                /* Every command here may be repeated: a read, a write
                 * of the same data, a flush, an unmap. */
                relogged = true;
                continue;
            }
            return vd_error_set(err, -EIO, "%s: %s failed: connection "
                                "lost", s->uri, op_name(s, c->op));
        }
        if (w.status == SCSI_STATUS_GOOD) {
            session_put(s, idx, false);
            if (task_out) {
                *task_out = task;
            } else {
                LIB(scsi_free_scsi_task)(task);
            }
            return 0;
        }
        if ((w.status == SCSI_STATUS_BUSY ||
             w.status == SCSI_STATUS_TASK_SET_FULL ||
             (w.status == SCSI_STATUS_CHECK_CONDITION &&
              task->sense.key == SCSI_SENSE_UNIT_ATTENTION)) &&
            attempt < ISCSI_RETRIES) {
            session_put(s, idx, false);
            LIB(scsi_free_scsi_task)(task);
            if (w.status != SCSI_STATUS_CHECK_CONDITION) {
                usleep(10000u << attempt);
            }
            continue;
        }
        if (w.status == SCSI_STATUS_CHECK_CONDITION) {
            int e = sense_errno(&task->sense);
            if (sense) {
                *sense = task->sense;
            }
            vd_error_set(err, e, "%s: %s failed: %s", s->uri,
                         op_name(s, c->op), lib_error(ctx));
            session_put(s, idx, false);
            LIB(scsi_free_scsi_task)(task);
            return e;
        }
        r = vd_error_set(err, -EIO, "%s: %s failed with SCSI status 0x%x: "
                         "%s", s->uri, op_name(s, c->op), w.status,
                         lib_error(ctx));
        session_put(s, idx, false);
        LIB(scsi_free_scsi_task)(task);
        return r;
    }
}

/* An illegal request for an opcode or field the target does not know. */
static bool sense_unsupported(const struct scsi_sense *sense)
{
    return sense->key == SCSI_SENSE_ILLEGAL_REQUEST &&
           (sense->ascq == SCSI_SENSE_ASCQ_INVALID_OPERATION_CODE ||
            sense->ascq == SCSI_SENSE_ASCQ_INVALID_FIELD_IN_CDB);
}

/* ---------------------------------------------------------------- */
/* Open                                                              */
/* ---------------------------------------------------------------- */

/* One INQUIRY; the unmarshalled page in *@data, owned by *@task. */
static int inquiry(iscsi_state *s, int page, struct scsi_task **task,
                   void **data, vd_error *err)
{
    iscsi_cmd c = { .op = OP_INQUIRY, .page = page };
    int r = run_cmd(s, &c, task, NULL, err);

    if (r < 0) {
        return r;
    }
    *data = LIB(scsi_datain_unmarshall)(*task);
    if (!*data) {
        LIB(scsi_free_scsi_task)(*task);
        *task = NULL;
        return vd_error_set(err, -EIO, "%s: iSCSI: failed to unmarshall "
                            "inquiry data.", s->uri);
    }
    return 0;
}

/* READ CAPACITY(16) for disks (LBPME, LBPRZ, and LUNs past 2^32
 * blocks), READ CAPACITY(10) for CD-ROMs and targets without (16). The
 * node's values change only once the answer passed the checks (a
 * truncate asks again on an open node). */
static int read_capacity(iscsi_state *s, vd_error *err)
{
    struct scsi_task *task;
    struct scsi_sense sense = { 0 };
    iscsi_cmd c = { .op = OP_CAPACITY16 };
    uint32_t bsize;
    uint64_t blocks;
    bool lbpme = false, lbprz = false, use16 = false;
    int r;

    if (s->type == SCSI_INQUIRY_PERIPHERAL_DEVICE_TYPE_DIRECT_ACCESS) {
        r = run_cmd(s, &c, &task, &sense, err);
        if (r == 0) {
            struct scsi_readcapacity16 *rc = LIB(scsi_datain_unmarshall)(task);
            if (!rc) {
                LIB(scsi_free_scsi_task)(task);
                return vd_error_set(err, -EIO, "%s: iSCSI: failed to "
                                    "unmarshall readcapacity16 data.",
                                    s->uri);
            }
            bsize = rc->block_length;
            blocks = rc->returned_lba + 1;
            lbpme = rc->lbpme;
            lbprz = rc->lbprz;
            use16 = rc->returned_lba > 0xffffffffull;
            LIB(scsi_free_scsi_task)(task);
            goto check;
        }
        if (!sense_unsupported(&sense)) {
            return r;
        }
        vd_error_clear(err);
    }
    c.op = OP_CAPACITY10;
    r = run_cmd(s, &c, &task, NULL, err);
    if (r < 0) {
        return r;
    }
    struct scsi_readcapacity10 *rc10 = LIB(scsi_datain_unmarshall)(task);
    if (!rc10) {
        LIB(scsi_free_scsi_task)(task);
        return vd_error_set(err, -EIO, "%s: iSCSI: failed to unmarshall "
                            "readcapacity10 data.", s->uri);
    }
    bsize = rc10->block_size;
    blocks = rc10->lba ? (uint64_t)rc10->lba + 1 : 0;
    LIB(scsi_free_scsi_task)(task);

check:
    /* Bounds the target's answer before any arithmetic uses it. */
    if (bsize < 512 || bsize > 65536 || (bsize & (bsize - 1))) {
        return vd_error_set(err, -EINVAL, "%s: iSCSI: the LUN's block size "
                            "%" PRIu32 " is not supported", s->uri, bsize);
    }
    if (blocks > VD_MAX_LENGTH / bsize) {
        return vd_error_set(err, -EFBIG, "%s: iSCSI: the LUN's capacity of "
                            "%" PRIu64 " blocks is too large", s->uri,
                            blocks);
    }
    if (s->block_size && bsize != s->block_size) {
        /* Buffers and limits were sized for the old one. */
        return vd_error_set(err, -EIO, "%s: iSCSI: the LUN's block size "
                            "changed from %" PRIu32 " to %" PRIu32, s->uri,
                            s->block_size, bsize);
    }
    s->block_size = bsize;
    s->num_blocks = blocks;
    s->lbpme = lbpme;
    s->lbprz = lbprz;
    s->use16 = use16;
    return 0;
}

/* The VPD pages QEMU reads: logical block provisioning and limits. */
static int read_vpd(iscsi_state *s, vd_error *err)
{
    struct scsi_task *task, *ptask;
    struct scsi_inquiry_supported_pages *pages;
    int r = inquiry(s, SCSI_INQUIRY_PAGECODE_SUPPORTED_VPD_PAGES, &task,
                    (void **)&pages, err);

    if (r < 0) {
        return r;
    }
    for (int i = 0; i < pages->num_pages; i++) {
        if (pages->pages[i] ==
            SCSI_INQUIRY_PAGECODE_LOGICAL_BLOCK_PROVISIONING) {
            struct scsi_inquiry_logical_block_provisioning *lbp;
            r = inquiry(s, pages->pages[i], &ptask, (void **)&lbp, err);
            if (r < 0) {
                break;
            }
            s->lbpu = lbp->lbpu;
            s->lbpws = lbp->lbpws;
            LIB(scsi_free_scsi_task)(ptask);
        } else if (pages->pages[i] == SCSI_INQUIRY_PAGECODE_BLOCK_LIMITS) {
            struct scsi_inquiry_block_limits *bl;
            r = inquiry(s, pages->pages[i], &ptask, (void **)&bl, err);
            if (r < 0) {
                break;
            }
            s->max_xfer_len = bl->max_xfer_len;
            s->opt_unmap_gran = bl->opt_unmap_gran;
            s->max_unmap = bl->max_unmap;
            s->max_ws_len = bl->max_ws_len;
            LIB(scsi_free_scsi_task)(ptask);
        }
    }
    LIB(scsi_free_scsi_task)(task);
    return r;
}

static uint64_t min_nonzero(uint64_t a, uint64_t b)
{
    if (!a) {
        return b;
    }
    if (!b) {
        return a;
    }
    return a < b ? a : b;
}

/* QEMU's iscsi_refresh_limits(), in bytes. */
static void iscsi_set_limits(vd_node *node)
{
    iscsi_state *s = node->opaque;
    uint64_t bs = s->block_size;
    uint64_t max_xfer = s->use16 ? 0xffffffffull : 0xffffull;

    if (s->max_xfer_len) {
        max_xfer = max_xfer < s->max_xfer_len ? max_xfer : s->max_xfer_len;
    }
    node->bl.request_alignment = s->block_size;
    node->bl.max_transfer = max_xfer * bs;
    if (node->bl.max_transfer > VD_MAX_REQUEST) {
        node->bl.max_transfer = VD_MAX_REQUEST;
    }
    if (s->lbpu) {
        node->bl.max_pdiscard = min_nonzero((uint64_t)s->max_unmap * bs,
                                            (uint64_t)UINT32_MAX * bs);
        node->bl.pdiscard_alignment = s->opt_unmap_gran * s->block_size;
    } else {
        node->bl.pdiscard_alignment = s->block_size;
    }
    node->bl.max_pwrite_zeroes = min_nonzero(s->max_ws_len * bs,
                                             max_xfer * bs);
    if (node->bl.max_pwrite_zeroes > UINT32_MAX * bs) {
        node->bl.max_pwrite_zeroes = UINT32_MAX * bs;
    }
    if (node->bl.max_pwrite_zeroes > VD_MAX_REQUEST) {
        node->bl.max_pwrite_zeroes = VD_MAX_REQUEST;
    }
    node->bl.pwrite_zeroes_alignment = s->lbpws
        ? s->opt_unmap_gran * s->block_size : s->block_size;
}

static const char *const transport_choices[] = { "tcp", "iser", NULL };
static const char *const digest_choices[] = {
    "crc32c", "none", "crc32c-none", "none-crc32c", NULL
};
static const enum iscsi_header_digest digest_values[] = {
    ISCSI_HEADER_DIGEST_CRC32C, ISCSI_HEADER_DIGEST_NONE,
    ISCSI_HEADER_DIGEST_CRC32C_NONE, ISCSI_HEADER_DIGEST_NONE_CRC32C,
};

/* A string option, or @def (copied) when absent. */
static int take_str(vd_opts *opts, const char *key, const char *def,
                    char **out, vd_error *err)
{
    *out = vd_opts_take(opts, key);
    if (!*out && def && !(*out = strdup(def))) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    return 0;
}

/* The options, with the URI's parts as defaults (QEMU's
 * iscsi_parse_filename() puts them under options given explicitly). */
static int parse_options(vd_node *node, vd_opts *opts, vd_error *err)
{
    iscsi_state *s = node->opaque;
    struct iscsi_url *url = NULL;
    char *fname, *secret = NULL, *digest = NULL;
    uint64_t lun, timeout;
    int r, di;

    fname = vd_opts_take(opts, "filename");
    if (!fname && node->filename && strncmp(node->filename, "json:", 5)) {
        fname = strdup(node->filename);
        if (!fname) {
            return vd_error_set(err, -ENOMEM, "Out of memory");
        }
    }
    if (fname) {
        url = LIB(iscsi_parse_full_url)(NULL, fname);
        if (!url) {
            r = vd_error_set(err, -EINVAL, "Failed to parse URL : %s", fname);
            free(fname);
            return r;
        }
        free(fname);
    }

    r = vd_opts_take_enum(opts, "transport", transport_choices, -1, &di,
                          err);
    if (r < 0) {
        goto out;
    }
    if (di < 0 && url) {
        di = 0;             /* libiscsi parses iscsi:// (tcp) only here */
    }
    if ((r = take_str(opts, "portal", url ? url->portal : NULL,
                      &s->portal, err)) < 0 ||
        (r = take_str(opts, "target", url ? url->target : NULL,
                      &s->target, err)) < 0) {
        goto out;
    }
    if (di < 0 || !s->portal || !s->target) {
        r = vd_error_set(err, -EINVAL, "Need all of transport, portal and "
                         "target options");
        goto out;
    }
    if (di == 1) {
        r = vd_error_set(err, -ENOTSUP, "Unknown transport: iser");
        goto out;
    }
    r = vd_opts_take_uint(opts, "lun", url ? (uint64_t)url->lun : 0, &lun,
                          err);
    if (r < 0) {
        goto out;
    }
    if (lun > 0x3fff) {
        r = vd_error_set(err, -EINVAL, "Parameter 'lun' expects a LUN "
                         "number below 16384");
        goto out;
    }
    s->lun = (int)lun;

    /* CHAP, as QEMU's apply_chap(). */
    if ((r = take_str(opts, "user",
                      url && url->user[0] ? url->user : NULL, &s->user,
                      err)) < 0 ||
        (r = take_str(opts, "password",
                      url && url->user[0] ? url->passwd : NULL,
                      &s->password, err)) < 0 ||
        (r = take_str(opts, "password-secret", NULL, &secret, err)) < 0) {
        goto out;
    }
    if (s->user) {
        if (s->password && secret) {
            r = vd_error_set(err, -EINVAL, "'password' and "
                             "'password-secret' options are mutually "
                             "exclusive");
            goto out;
        }
        if (secret) {
            s->password = vd_secret_get_utf8(secret, err);
            if (!s->password) {
                r = err && err->code ? err->code : -EINVAL;
                goto out;
            }
        }
        if (!s->password) {
            r = vd_error_set(err, -EINVAL, "CHAP username specified but no "
                             "password was given");
            goto out;
        }
    }

    r = take_str(opts, "initiator-name", ISCSI_DEFAULT_INITIATOR,
                 &s->initiator, err);
    if (r < 0) {
        goto out;
    }
    digest = vd_opts_take(opts, "header-digest");
    s->digest = ISCSI_HEADER_DIGEST_NONE_CRC32C;    /* QEMU's default */
    if (digest) {
        int i;
        for (i = 0; digest_choices[i]; i++) {
            if (strcmp(digest, digest_choices[i]) == 0) {
                break;
            }
        }
        if (!digest_choices[i]) {
            r = vd_error_set(err, -EINVAL, "Invalid header-digest setting : "
                             "%s", digest);
            goto out;
        }
        s->digest = digest_values[i];
    }
    r = vd_opts_take_uint(opts, "timeout", 0, &timeout, err);
    if (r < 0) {
        goto out;
    }
    if (timeout > 86400) {
        r = vd_error_set(err, -EINVAL, "Parameter 'timeout' expects at most "
                         "86400 seconds");
        goto out;
    }
    s->timeout = (unsigned)timeout;

    if (asprintf(&s->uri, "iscsi://%s/%s/%d", s->portal, s->target,
                 s->lun) < 0) {
        s->uri = NULL;
        r = vd_error_set(err, -ENOMEM, "Out of memory");
        goto out;
    }
    /* Opened from options alone: the node is named by its URI. */
    if (!node->filename || !strncmp(node->filename, "json:", 5)) {
        free(node->filename);
        node->filename = strdup(s->uri);
        if (!node->filename) {
            r = vd_error_set(err, -ENOMEM, "Out of memory");
            goto out;
        }
    }
    r = 0;
out:
    free(secret);
    free(digest);
    if (url) {
        LIB(iscsi_destroy_url)(url);
    }
    return r;
}

static void iscsi_close(vd_node *node)
{
    iscsi_state *s = node->opaque;

    for (int i = 0; i < ISCSI_POOL; i++) {
        session_drop(s->sessions[i].ctx, true);
        s->sessions[i].ctx = NULL;
    }
    if (s->uri) {
        pthread_mutex_destroy(&s->lock);
        pthread_cond_destroy(&s->cond);
    }
    free(s->uri);
    free(s->portal);
    free(s->target);
    free(s->user);
    if (s->password) {
        memset(s->password, 0, strlen(s->password));
    }
    free(s->password);
    free(s->initiator);
    free(s->zero_block);
    memset(s, 0, sizeof(*s));
}

static int iscsi_open(vd_node *node, vd_opts *opts, unsigned flags,
                      vd_error *err)
{
    iscsi_state *s = node->opaque;
    struct scsi_task *task;
    struct scsi_inquiry_standard *inq;
    int r;

    r = parse_options(node, opts, err);
    if (r < 0) {
        goto fail;
    }
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);

    /* The first login, as QEMU's open: a failure is reported here. */
    r = session_get(s, err);
    if (r < 0) {
        goto fail;
    }
    session_put(s, r, false);

    r = inquiry(s, -1, &task, (void **)&inq, err);
    if (r < 0) {
        goto fail;
    }
    s->type = inq->device_type;
    LIB(scsi_free_scsi_task)(task);
    if (s->type != SCSI_INQUIRY_PERIPHERAL_DEVICE_TYPE_DIRECT_ACCESS &&
        s->type != SCSI_INQUIRY_PERIPHERAL_DEVICE_TYPE_MMC) {
        /* QEMU passes other devices through as SCSI generic, which a
         * block layer without guests has no use for. */
        r = vd_error_set(err, -ENOTSUP, "%s: iSCSI: LUN of device type "
                         "0x%x is neither a disk nor a CD-ROM", s->uri,
                         s->type);
        goto fail;
    }
    if (s->type == SCSI_INQUIRY_PERIPHERAL_DEVICE_TYPE_MMC &&
        (flags & VD_NODE_RDWR) && !node->read_only) {
        r = vd_error_set(err, -EACCES, "%s: iSCSI: a CD-ROM LUN cannot be "
                         "opened read-write", s->uri);
        goto fail;
    }
    r = read_capacity(s, err);
    if (r < 0) {
        goto fail;
    }
    r = read_vpd(s, err);
    if (r < 0) {
        goto fail;
    }
    s->zero_block = calloc(1, s->block_size);
    if (!s->zero_block) {
        r = vd_error_set(err, -ENOMEM, "Out of memory");
        goto fail;
    }
    atomic_init(&s->has_write_same, true);
    atomic_init(&s->has_lba_status, s->lbpme);
    iscsi_set_limits(node);
    return 0;

fail:
    iscsi_close(node);
    return r;
}

static void iscsi_refresh_limits(vd_node *node)
{
    iscsi_set_limits(node);
}

/* ---------------------------------------------------------------- */
/* Requests                                                          */
/* ---------------------------------------------------------------- */

static int iscsi_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                        vd_iov *qiov, unsigned flags, vd_error *err)
{
    iscsi_state *s = node->opaque;
    iscsi_cmd c = {
        .op = OP_READ, .lba = off / s->block_size,
        .blocks = (uint32_t)(bytes / s->block_size), .qiov = qiov,
    };

    (void)flags;
    return run_cmd(s, &c, NULL, NULL, err);
}

static int iscsi_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                         vd_iov *qiov, unsigned flags, vd_error *err)
{
    iscsi_state *s = node->opaque;
    iscsi_cmd c = {
        .op = OP_WRITE, .lba = off / s->block_size,
        .blocks = (uint32_t)(bytes / s->block_size), .qiov = qiov,
    };

    (void)flags;
    /* A write past the LUN cannot grow it: the target refuses it with
     * LBA OUT OF RANGE, which says less than this. */
    if (off + bytes > s->num_blocks * s->block_size) {
        return vd_error_set(err, -ENOSPC, "%s: write at %" PRIu64 " past "
                            "the end of the LUN (%" PRIu64 " bytes)", s->uri,
                            off + bytes, s->num_blocks * s->block_size);
    }
    return run_cmd(s, &c, NULL, NULL, err);
}

static int iscsi_flush(vd_node *node, vd_error *err)
{
    iscsi_state *s = node->opaque;
    iscsi_cmd c = { .op = OP_SYNC };

    return run_cmd(s, &c, NULL, NULL, err);
}

/* UNMAP when LBPU says the target has it; advisory, so nothing happens
 * otherwise (QEMU's iscsi_co_pdiscard). */
static int iscsi_pdiscard(vd_node *node, uint64_t off, uint64_t bytes,
                          vd_error *err)
{
    iscsi_state *s = node->opaque;
    struct scsi_sense sense = { 0 };
    iscsi_cmd c = {
        .op = OP_UNMAP, .lba = off / s->block_size,
        .blocks = (uint32_t)(bytes / s->block_size),
    };
    int r;

    if (!s->lbpu) {
        return 0;
    }
    r = run_cmd(s, &c, NULL, &sense, err);
    /* A target that refuses the range (an unmap granularity it does
     * not say) loses nothing: discard is a hint. */
    if (r < 0 && sense.key == SCSI_SENSE_ILLEGAL_REQUEST) {
        vd_error_clear(err);
        return 0;
    }
    return r;
}

/*
 * WRITE SAME(16) of a zero block; with the UNMAP bit only when the caller
 * allows it and the target both unmaps that way (LBPWS) and reads
 * unmapped blocks as zeros (LBPRZ), so that the range reads as zeros
 * whatever the target chooses. -ENOTSUP makes the core write zeros.
 */
static int iscsi_pwrite_zeroes(vd_node *node, uint64_t off, uint64_t bytes,
                               unsigned flags, vd_error *err)
{
    iscsi_state *s = node->opaque;
    struct scsi_sense sense = { 0 };
    iscsi_cmd c = {
        .op = OP_WRITE_SAME, .lba = off / s->block_size,
        .blocks = (uint32_t)(bytes / s->block_size),
        .unmap = (flags & VD_REQ_MAY_UNMAP) && s->lbpws && s->lbprz,
    };
    int r;

    if (!atomic_load(&s->has_write_same)) {
        return -ENOTSUP;
    }
    if (off + bytes > s->num_blocks * s->block_size) {
        return vd_error_set(err, -ENOSPC, "%s: write at %" PRIu64 " past "
                            "the end of the LUN (%" PRIu64 " bytes)", s->uri,
                            off + bytes, s->num_blocks * s->block_size);
    }
    r = run_cmd(s, &c, NULL, &sense, err);
    if (r < 0 && sense_unsupported(&sense)) {
        atomic_store(&s->has_write_same, false);
        vd_error_clear(err);
        return -ENOTSUP;
    }
    return r;
}

/*
 * GET LBA STATUS when the LUN is thin-provisioned (LBPME), as QEMU's
 * iscsi_co_block_status(): a deallocated or anchored extent is not data,
 * and reads as zeros when LBPRZ says so. Without LBPME (or when the
 * target refuses the command) everything is data.
 */
static int iscsi_block_status(vd_node *node, bool want_zero, uint64_t off,
                              uint64_t bytes, uint64_t *pnum, uint64_t *map,
                              vd_node **file, vd_error *err)
{
    iscsi_state *s = node->opaque;
    struct scsi_task *task;
    struct scsi_sense sense = { 0 };
    struct scsi_get_lba_status *st;
    iscsi_cmd c = { .op = OP_LBA_STATUS, .lba = off / s->block_size };
    int ret = VD_BLOCK_DATA | VD_BLOCK_OFFSET_VALID;
    int r;

    (void)want_zero;
    *pnum = bytes;
    *map = off;
    *file = node;
    if (!atomic_load(&s->has_lba_status)) {
        return ret;
    }
    r = run_cmd(s, &c, &task, &sense, err);
    if (r < 0) {
        if (sense_unsupported(&sense)) {
            atomic_store(&s->has_lba_status, false);
            vd_error_clear(err);
            return ret;
        }
        return r;
    }
    st = LIB(scsi_datain_unmarshall)(task);
    if (!st || st->num_descriptors < 1 ||
        st->descriptors[0].lba != c.lba ||
        st->descriptors[0].num_blocks == 0) {
        /* An answer about another extent says nothing about ours. */
        LIB(scsi_free_scsi_task)(task);
        return ret;
    }
    uint64_t len = (uint64_t)st->descriptors[0].num_blocks * s->block_size;
    if (len < bytes) {
        *pnum = len;
    }
    if (st->descriptors[0].provisioning ==
            SCSI_PROVISIONING_TYPE_DEALLOCATED ||
        st->descriptors[0].provisioning == SCSI_PROVISIONING_TYPE_ANCHORED) {
        ret &= ~VD_BLOCK_DATA;
        if (s->lbprz) {
            ret |= VD_BLOCK_ZERO;
        }
    }
    LIB(scsi_free_scsi_task)(task);
    return ret;
}

static int64_t iscsi_getlength(vd_node *node)
{
    iscsi_state *s = node->opaque;

    return (int64_t)(s->num_blocks * s->block_size);
}

/* A LUN's size is the target's: QEMU's iscsi_co_truncate() accepts only
 * a size it already has (or, not exact, a smaller one). */
static int iscsi_truncate(vd_node *node, uint64_t size, bool exact,
                          vd_prealloc prealloc, vd_error *err)
{
    iscsi_state *s = node->opaque;
    uint64_t cur;
    int r;

    if (prealloc != VD_PREALLOC_OFF) {
        return vd_error_set(err, -ENOTSUP, "Unsupported preallocation mode "
                            "'%s'", prealloc == VD_PREALLOC_METADATA
                            ? "metadata" : prealloc == VD_PREALLOC_FALLOC
                            ? "falloc" : "full");
    }
    if (s->type != SCSI_INQUIRY_PERIPHERAL_DEVICE_TYPE_DIRECT_ACCESS) {
        return vd_error_set(err, -ENOTSUP, "Cannot resize non-disk iSCSI "
                            "devices");
    }
    r = read_capacity(s, err);
    if (r < 0) {
        return -EIO;
    }
    iscsi_set_limits(node);
    cur = s->num_blocks * s->block_size;
    if (size != cur && exact) {
        return vd_error_set(err, -ENOTSUP, "Cannot resize iSCSI devices");
    }
    if (size > cur) {
        return vd_error_set(err, -EINVAL, "Cannot grow iSCSI devices");
    }
    return 0;
}

const vd_driver vd_driver_iscsi = {
    .library = &iscsi_lib,
    .name = "iscsi",
    .protocol_name = "iscsi",
    .network = true,
    .instance_size = sizeof(iscsi_state),
    /* As QEMU 7.2: "creating" formats the LUN that exists. */
    .create_opts = vd_create_opts_simple,
    .info_self = true,
    .open = iscsi_open,
    .close = iscsi_close,
    .create = vd_create_simple,
    .preadv = iscsi_preadv,
    .pwritev = iscsi_pwritev,
    .pwrite_zeroes = iscsi_pwrite_zeroes,
    .pdiscard = iscsi_pdiscard,
    .flush = iscsi_flush,
    .block_status = iscsi_block_status,
    .getlength = iscsi_getlength,
    .truncate = iscsi_truncate,
    .refresh_limits = iscsi_refresh_limits,
};
