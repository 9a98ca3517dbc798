/*
 * The transmission phase (nbd-proto.md, "Transmission"): the reader loop
 * that parses requests, the checker that decides what a request may do,
 * and the job runner that performs it on the export and replies.
 *
 * Order of a request's life: nbd_transmission() reads the 28-byte header,
 * nbd_request_check() validates it against the negotiated capabilities
 * and says how many payload bytes follow (a WRITE's data is read even
 * when the request will fail, so the stream stays in step), the reader
 * waits for in-flight budget, reads the payload and queues a job.
 * nbd_job_run() (on a worker) performs the I/O with the public vdisk API
 * and sends a simple reply, or structured chunks when they were
 * negotiated: reads as OFFSET_DATA/OFFSET_HOLE runs from block status,
 * errors as one ERROR chunk with a message. Replies for one connection
 * go out under its send mutex, one chunk at a time. The stream is read
 * and written through nbd_conn_read()/nbd_conn_write() (tls.h), plain or
 * TLS as the handshake left it.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "../core/error.h"
#include "nbd-proto.h"
#include "nbd-server.h"
#include "tls.h"

/* Per-connection back-pressure: the reader stops reading new requests
 * while this many are in flight or this many payload bytes are held. */
#define CONN_MAX_INFLIGHT       128u
#define CONN_MAX_INFLIGHT_BYTES (64u * 1024 * 1024)

/* CACHE reads the range in pieces of this size and drops the data. */
#define CACHE_CHUNK             (1u * 1024 * 1024)

/* ---- checking ---- */

/* Flags each command accepts (FUA is valid on every command). */
static uint16_t cmd_allowed_flags(uint16_t type, const nbd_caps *caps)
{
    switch (type) {
    case NBD_CMD_READ:
        return NBD_CMD_FLAG_FUA | (caps->structured ? NBD_CMD_FLAG_DF : 0);
    case NBD_CMD_WRITE_ZEROES:
        return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE |
               NBD_CMD_FLAG_FAST_ZERO;
    case NBD_CMD_BLOCK_STATUS:
        return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE;
    default:
        return NBD_CMD_FLAG_FUA;
    }
}

int nbd_request_check(const nbd_request *req, const nbd_caps *caps,
                      uint32_t *payload, bool *fatal, const char **msg)
{
    bool is_write;

    *payload = 0;
    *fatal = false;
    *msg = NULL;

    if (req->type == NBD_CMD_READ || req->type == NBD_CMD_WRITE) {
        if (req->length > NBD_MAX_PAYLOAD) {
            /* We will not buffer the data of an oversized write, and
             * without reading it the next header cannot be found. */
            *fatal = req->type == NBD_CMD_WRITE;
            *msg = "request length exceeds the maximum payload";
            return NBD_EINVAL;
        }
    }
    if (req->type == NBD_CMD_WRITE) {
        *payload = req->length;
    }

    switch (req->type) {
    case NBD_CMD_READ:
    case NBD_CMD_WRITE:
    case NBD_CMD_FLUSH:
    case NBD_CMD_TRIM:
    case NBD_CMD_CACHE:
    case NBD_CMD_WRITE_ZEROES:
    case NBD_CMD_BLOCK_STATUS:
        break;
    default:
        *msg = "unknown command";
        return NBD_EINVAL;
    }

    if (req->flags & ~cmd_allowed_flags(req->type, caps)) {
        *msg = "unsupported flags for this command";
        return NBD_EINVAL;
    }

    is_write = req->type == NBD_CMD_WRITE || req->type == NBD_CMD_TRIM ||
               req->type == NBD_CMD_WRITE_ZEROES;
    if (is_write && caps->read_only) {
        *msg = "export is read-only";
        return NBD_EPERM;
    }

    if (req->type != NBD_CMD_FLUSH &&
        (req->offset > caps->size ||
         req->length > caps->size - req->offset)) {
        *msg = "request extends past the end of the export";
        /* The spec asks for ENOSPC on writes past the end, EINVAL else. */
        return (req->type == NBD_CMD_WRITE ||
                req->type == NBD_CMD_WRITE_ZEROES) ? NBD_ENOSPC : NBD_EINVAL;
    }

    if (req->type == NBD_CMD_BLOCK_STATUS) {
        if (!caps->structured || (!caps->ctx_base && !caps->ctx_depth)) {
            *msg = "no metadata context negotiated";
            return NBD_EINVAL;
        }
        if (req->length == 0) {
            *msg = "block status of an empty range";
            return NBD_EINVAL;
        }
    }
    return 0;
}

uint32_t nbd_errno_to_wire(int err)
{
    switch (-err) {
    case 0:
        return 0;
    case EPERM:
    case EROFS:
    case EACCES:
        return NBD_EPERM;
    case EIO:
        return NBD_EIO;
    case ENOMEM:
        return NBD_ENOMEM;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
        return NBD_ENOSPC;
    case EOVERFLOW:
        return NBD_EOVERFLOW;
    case ENOTSUP:
        return NBD_ENOTSUP;
    case ESHUTDOWN:
        return NBD_ESHUTDOWN;
    default:
        return NBD_EINVAL;
    }
}

/* ---- sending ---- */

/* Sends @n buffers as one message; after the first failure every later
 * send is skipped and the reader is woken to tear the connection down. */
static int conn_send(nbd_conn *c, struct iovec *iov, int n)
{
    int r;

    if (atomic_load(&c->send_failed)) {
        return -EPIPE;
    }
    pthread_mutex_lock(&c->send_lock);
    r = nbd_conn_write(c, iov, n);
    pthread_mutex_unlock(&c->send_lock);
    if (r < 0 && !atomic_exchange(&c->send_failed, true)) {
        shutdown(c->in_fd, SHUT_RDWR);
    }
    return r;
}

static int send_simple(nbd_conn *c, uint64_t cookie, uint32_t error,
                       void *data, size_t len)
{
    struct nbd_simple_reply r = {
        .magic = htobe32(NBD_SIMPLE_REPLY_MAGIC),
        .error = htobe32(error),
        .cookie = cookie,   /* opaque: echoed in the client's byte order */
    };
    struct iovec iov[2] = { { &r, sizeof(r) }, { data, len } };

    return conn_send(c, iov, len ? 2 : 1);
}

/* Sends a chunk whose payload is @n buffers (at most 3). */
static int send_chunk(nbd_conn *c, uint64_t cookie, uint16_t flags,
                      uint16_t type, struct iovec *payload, int n)
{
    struct nbd_chunk_hdr h;
    struct iovec iov[4];
    size_t len = 0;

    for (int i = 0; i < n; i++) {
        iov[i + 1] = payload[i];
        len += payload[i].iov_len;
    }
    h.magic = htobe32(NBD_STRUCTURED_REPLY_MAGIC);
    h.flags = htobe16(flags);
    h.type = htobe16(type);
    h.cookie = cookie;
    h.length = htobe32((uint32_t)len);
    iov[0].iov_base = &h;
    iov[0].iov_len = sizeof(h);
    return conn_send(c, iov, n + 1);
}

/* Replies with @error (NBD_E*, non-zero) and a message: an ERROR chunk
 * when structured replies are on, else a simple reply. */
static void send_error(nbd_conn *c, uint64_t cookie, uint32_t error,
                       const char *msg)
{
    if (c->caps.structured) {
        size_t mlen = msg ? strlen(msg) : 0;
        uint32_t e = htobe32(error);
        uint16_t ml;
        struct iovec iov[3];

        if (mlen > NBD_MAX_STRING) {
            mlen = NBD_MAX_STRING;
        }
        ml = htobe16((uint16_t)mlen);
        iov[0] = (struct iovec){ &e, 4 };
        iov[1] = (struct iovec){ &ml, 2 };
        iov[2] = (struct iovec){ (char *)(msg ? msg : ""), mlen };
        send_chunk(c, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR,
                   iov, 3);
    } else {
        send_simple(c, cookie, error, NULL, 0);
    }
}

static void send_result(nbd_conn *c, uint64_t cookie, int r,
                        const vd_error *err)
{
    if (r < 0) {
        send_error(c, cookie, nbd_errno_to_wire(r),
                   err->message[0] ? err->message : strerror(-r));
    } else {
        send_simple(c, cookie, 0, NULL, 0);
    }
}

/* ---- commands ---- */

static int send_data_chunk(nbd_conn *c, uint64_t cookie, bool done,
                           uint64_t off, void *buf, size_t len)
{
    uint64_t beoff = htobe64(off);
    struct iovec iov[2] = { { &beoff, 8 }, { buf, len } };

    return send_chunk(c, cookie, done ? NBD_REPLY_FLAG_DONE : 0,
                      NBD_REPLY_TYPE_OFFSET_DATA, iov, 2);
}

static int send_hole_chunk(nbd_conn *c, uint64_t cookie, bool done,
                           uint64_t off, uint32_t len)
{
    unsigned char p[12];
    uint64_t beoff = htobe64(off);
    uint32_t belen = htobe32(len);
    struct iovec iov = { p, sizeof(p) };

    memcpy(p, &beoff, 8);
    memcpy(p + 8, &belen, 4);
    return send_chunk(c, cookie, done ? NBD_REPLY_FLAG_DONE : 0,
                      NBD_REPLY_TYPE_OFFSET_HOLE, &iov, 1);
}

/*
 * A structured, fragmentable read: walk block status and send each run
 * of zero extents as one hole chunk and each run of other extents as one
 * data chunk, so a sparse region costs 20 bytes instead of its length.
 * Each chunk is sent only after its data was read, so the DONE flag on
 * the last one never promises more than we have.
 */
static void do_sparse_read(nbd_conn *c, const nbd_request *req,
                           unsigned char *buf)
{
    vd_node *node = c->exp->node;
    uint64_t end = req->offset + req->length;
    uint64_t pos = req->offset, run_start = pos;
    int run_zero = -1;   /* -1: no run yet */
    vd_error err = VD_ERROR_INIT;

    while (pos < end || run_zero >= 0) {
        vd_extent ext;
        uint64_t n = 0;
        int zero = -1;

        if (pos < end) {
            if (vd_block_status(node, pos, end - pos, &ext, NULL) < 0 ||
                ext.length == 0) {
                /* Unknown status: read it. */
                ext.length = end - pos;
                ext.flags = VD_BLOCK_DATA;
            }
            n = ext.length < end - pos ? ext.length : end - pos;
            zero = (ext.flags & VD_BLOCK_ZERO) ? 1 : 0;
            if (zero == run_zero) {
                pos += n;
                continue;
            }
        }
        if (run_zero >= 0) {
            /* Flush the run [run_start, pos). */
            bool done = pos == end;
            uint64_t len = pos - run_start;
            int r;
            if (run_zero) {
                r = send_hole_chunk(c, req->cookie, done, run_start,
                                    (uint32_t)len);
            } else {
                unsigned char *p = buf + (run_start - req->offset);
                r = vd_pread(node, p, len, run_start, 0, &err);
                if (r < 0) {
                    send_error(c, req->cookie, nbd_errno_to_wire(r),
                               err.message[0] ? err.message : strerror(-r));
                    return;
                }
                r = send_data_chunk(c, req->cookie, done, run_start, p, len);
            }
            if (r < 0) {
                return;
            }
        }
        run_zero = zero;
        run_start = pos;
        pos += n;
    }
}

static void do_read(nbd_conn *c, const nbd_request *req)
{
    vd_error err = VD_ERROR_INIT;
    unsigned char *buf = NULL;
    int r;

    if (req->length) {
        buf = malloc(req->length);
        if (!buf) {
            send_error(c, req->cookie, NBD_ENOMEM, "out of memory");
            return;
        }
    }
    if (c->caps.structured && req->length &&
        !(req->flags & NBD_CMD_FLAG_DF)) {
        do_sparse_read(c, req, buf);
        free(buf);
        return;
    }
    r = req->length ? vd_pread(c->exp->node, buf, req->length, req->offset,
                               0, &err) : 0;
    if (r < 0) {
        send_result(c, req->cookie, r, &err);
    } else if (!c->caps.structured) {
        send_simple(c, req->cookie, 0, buf, req->length);
    } else if (req->length == 0) {
        send_chunk(c, req->cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE,
                   NULL, 0);
    } else {
        send_data_chunk(c, req->cookie, true, req->offset, buf, req->length);
    }
    free(buf);
}

static void do_write(nbd_conn *c, const nbd_job *job)
{
    vd_error err = VD_ERROR_INIT;
    const nbd_request *req = &job->req;
    unsigned flags = (req->flags & NBD_CMD_FLAG_FUA) ? VD_REQ_FUA : 0;
    int r = 0;

    if (req->length) {
        r = vd_pwrite(c->exp->node, job->data, req->length, req->offset,
                      flags, &err);
    }
    send_result(c, req->cookie, r, &err);
}

static void do_write_zeroes(nbd_conn *c, const nbd_request *req)
{
    vd_error err = VD_ERROR_INIT;
    unsigned flags = 0;
    int r = 0;

    if (req->flags & NBD_CMD_FLAG_FUA) {
        flags |= VD_REQ_FUA;
    }
    if (!(req->flags & NBD_CMD_FLAG_NO_HOLE)) {
        flags |= VD_REQ_MAY_UNMAP;
    }
    if (req->flags & NBD_CMD_FLAG_FAST_ZERO) {
        flags |= VD_REQ_NO_FALLBACK;
    }
    if (req->length) {
        r = vd_write_zeroes(c->exp->node, req->length, req->offset, flags,
                            &err);
    }
    if (r == -ENOTSUP && !(req->flags & NBD_CMD_FLAG_FAST_ZERO)) {
        /* Only FAST_ZERO may fail with ENOTSUP (spec, WRITE_ZEROES). */
        r = -EIO;
    }
    send_result(c, req->cookie, r, &err);
}

static void do_trim(nbd_conn *c, const nbd_request *req)
{
    vd_error err = VD_ERROR_INIT;
    int r = 0;

    if (req->length) {
        r = vd_discard(c->exp->node, req->length, req->offset, &err);
    }
    if (r == 0 && (req->flags & NBD_CMD_FLAG_FUA)) {
        r = vd_flush(c->exp->node, &err);
    }
    send_result(c, req->cookie, r, &err);
}

static void do_flush(nbd_conn *c, const nbd_request *req)
{
    vd_error err = VD_ERROR_INIT;
    int r = vd_flush(c->exp->node, &err);

    send_result(c, req->cookie, r, &err);
}

/* Reads the range and drops it: the node's caches (and the host page
 * cache) then hold it, which is all CACHE promises. */
static void do_cache(nbd_conn *c, const nbd_request *req)
{
    vd_error err = VD_ERROR_INIT;
    uint64_t pos = req->offset, end = req->offset + req->length;
    size_t bufsz = req->length < CACHE_CHUNK ? req->length : CACHE_CHUNK;
    unsigned char *buf = bufsz ? malloc(bufsz) : NULL;
    int r = 0;

    if (bufsz && !buf) {
        send_error(c, req->cookie, NBD_ENOMEM, "out of memory");
        return;
    }
    while (pos < end && r == 0) {
        uint64_t n = end - pos < bufsz ? end - pos : bufsz;
        r = vd_pread(c->exp->node, buf, n, pos, 0, &err);
        pos += n;
    }
    free(buf);
    send_result(c, req->cookie, r, &err);
}

/* Extents of one metadata context, built up for a BLOCK_STATUS reply. */
typedef struct extent_list {
    uint32_t id;
    uint32_t *d;        /* pairs (length, flags), big-endian */
    size_t n, cap;      /* in pairs */
    uint32_t last_flags;
} extent_list;

static int extent_add(extent_list *l, uint32_t len, uint32_t flags)
{
    if (l->n && l->last_flags == flags) {
        /* Same status as before: lengthen the previous descriptor. The
         * sum stays within the request's 32-bit length. */
        uint32_t prev = be32toh(l->d[2 * (l->n - 1)]);
        l->d[2 * (l->n - 1)] = htobe32(prev + len);
        return 0;
    }
    if (l->n == l->cap) {
        size_t ncap = l->cap ? l->cap * 2 : 16;
        uint32_t *nd = realloc(l->d, ncap * 2 * sizeof(uint32_t));
        if (!nd) {
            return -ENOMEM;
        }
        l->d = nd;
        l->cap = ncap;
    }
    l->d[2 * l->n] = htobe32(len);
    l->d[2 * l->n + 1] = htobe32(flags);
    l->n++;
    l->last_flags = flags;
    return 0;
}

static int send_extents(nbd_conn *c, uint64_t cookie, extent_list *l,
                        bool done)
{
    uint32_t id = htobe32(l->id);
    struct iovec iov[2] = { { &id, 4 }, { l->d, l->n * 8 } };

    return send_chunk(c, cookie, done ? NBD_REPLY_FLAG_DONE : 0,
                      NBD_REPLY_TYPE_BLOCK_STATUS, iov, 2);
}

static void do_block_status(nbd_conn *c, const nbd_request *req)
{
    vd_error err = VD_ERROR_INIT;
    extent_list base = { .id = NBD_CTX_ID_BASE };
    extent_list depth = { .id = NBD_CTX_ID_DEPTH };
    bool one = req->flags & NBD_CMD_FLAG_REQ_ONE;
    uint64_t pos = req->offset, end = req->offset + req->length;
    size_t max = one ? 1 : NBD_MAX_EXTENTS;
    int r = 0;

    /* One pass over the range serves both contexts; a list that is full
     * stops the walk (the client asks again from where we stopped). */
    while (pos < end && base.n <= max && depth.n <= max) {
        vd_extent ext;
        uint32_t n, bf, df;

        r = vd_block_status(c->exp->node, pos, end - pos, &ext, &err);
        if (r < 0) {
            break;
        }
        if (ext.length == 0) {
            r = vd_error_set(&err, -EIO, "%s: block status made no progress",
                             vd_node_filename(c->exp->node));
            break;
        }
        n = (uint32_t)(ext.length < end - pos ? ext.length : end - pos);
        bf = ((ext.flags & VD_BLOCK_DATA) ? 0 : NBD_STATE_HOLE) |
             ((ext.flags & VD_BLOCK_ZERO) ? NBD_STATE_ZERO : 0);
        /* qemu:allocation-depth: 0 unallocated, 1 this image, 2 its
         * backing file and so on. */
        df = (ext.flags & VD_BLOCK_ALLOCATED) ? (uint32_t)ext.depth + 1 : 0;
        if (c->caps.ctx_base) {
            if (base.n == max && base.last_flags != bf) {
                break;
            }
            if ((r = extent_add(&base, n, bf)) < 0) {
                break;
            }
        }
        if (c->caps.ctx_depth) {
            if (depth.n == max && depth.last_flags != df) {
                /* Keep base's extent: lists may cover different spans. */
                break;
            }
            if ((r = extent_add(&depth, n, df)) < 0) {
                break;
            }
        }
        pos += n;
    }
    if (r < 0 && !(base.n || depth.n)) {
        send_result(c, req->cookie, r, &err);
    } else {
        /* On a late error we still answer with the prefix we know. */
        if (c->caps.ctx_base) {
            if (send_extents(c, req->cookie, &base, !c->caps.ctx_depth) < 0) {
                goto out;
            }
        }
        if (c->caps.ctx_depth) {
            send_extents(c, req->cookie, &depth, true);
        }
    }
out:
    free(base.d);
    free(depth.d);
}

void nbd_job_run(nbd_job *job)
{
    nbd_conn *c = job->conn;
    const nbd_request *req = &job->req;

    if (atomic_load(&c->send_failed)) {
        /* The client is gone: no one to reply to. */
    } else if (job->error) {
        send_error(c, req->cookie, (uint32_t)job->error, job->errmsg);
    } else {
        switch (req->type) {
        case NBD_CMD_READ:
            do_read(c, req);
            break;
        case NBD_CMD_WRITE:
            do_write(c, job);
            break;
        case NBD_CMD_WRITE_ZEROES:
            do_write_zeroes(c, req);
            break;
        case NBD_CMD_TRIM:
            do_trim(c, req);
            break;
        case NBD_CMD_FLUSH:
            do_flush(c, req);
            break;
        case NBD_CMD_CACHE:
            do_cache(c, req);
            break;
        case NBD_CMD_BLOCK_STATUS:
            do_block_status(c, req);
            break;
        }
    }

    pthread_mutex_lock(&c->lock);
    c->inflight--;
    c->inflight_bytes -= job->budget;
    pthread_cond_broadcast(&c->cond);
    pthread_mutex_unlock(&c->lock);
    free(job->data);
    free(job);
}

/* ---- the reader ---- */

/* Waits until @bytes more may be in flight. A single request may always
 * run when nothing else is in flight, so no request waits forever. */
static void wait_budget(nbd_conn *c, uint64_t bytes)
{
    pthread_mutex_lock(&c->lock);
    while (c->inflight > 0 &&
           (c->inflight >= CONN_MAX_INFLIGHT ||
            c->inflight_bytes + bytes > CONN_MAX_INFLIGHT_BYTES)) {
        pthread_cond_wait(&c->cond, &c->lock);
    }
    c->inflight++;
    c->inflight_bytes += bytes;
    pthread_mutex_unlock(&c->lock);
}

static void wait_idle(nbd_conn *c)
{
    pthread_mutex_lock(&c->lock);
    while (c->inflight > 0) {
        pthread_cond_wait(&c->cond, &c->lock);
    }
    pthread_mutex_unlock(&c->lock);
}

/*
 * Shutdown: the server shuts the socket's read side, so this loop sees
 * end of stream, stops taking requests and waits for the ones already
 * queued; their replies still go out.
 */
int nbd_transmission(nbd_conn *c)
{
    int ret = 0;

    for (;;) {
        struct nbd_request_hdr h;
        nbd_request req;
        uint32_t payload;
        bool fatal;
        const char *msg;
        nbd_job *job;
        int err, r;

        r = nbd_conn_read(c, &h, sizeof(h));
        if (r < 0) {
            if (r != -EPIPE || !atomic_load(&c->send_failed)) {
                /* A client that vanishes between requests is normal for
                 * a hard disconnect: record it, close quietly. */
                vd_error_set(&c->err, r, "nbd: %s while reading a request",
                             r == -EPIPE ? "client closed the connection"
                                         : strerror(-r));
            }
            ret = r;
            break;
        }
        if (be32toh(h.magic) != NBD_REQUEST_MAGIC) {
            ret = vd_error_set(&c->err, -EINVAL,
                               "nbd: bad request magic 0x%08x",
                               be32toh(h.magic));
            break;
        }
        req.flags = be16toh(h.flags);
        req.type = be16toh(h.type);
        req.cookie = h.cookie;   /* kept in wire order, echoed as is */
        req.offset = be64toh(h.offset);
        req.length = be32toh(h.length);
        if (req.type == NBD_CMD_DISC) {
            break;
        }

        err = nbd_request_check(&req, &c->caps, &payload, &fatal, &msg);
        if (fatal) {
            wait_idle(c);
            send_error(c, req.cookie, (uint32_t)err, msg);
            ret = vd_error_set(&c->err, -EINVAL,
                               "nbd: %s (%" PRIu32 " bytes); disconnecting",
                               msg, req.length);
            break;
        }

        job = calloc(1, sizeof(*job));
        if (!job) {
            ret = vd_error_set(&c->err, -ENOMEM, "nbd: out of memory");
            break;
        }
        job->conn = c;
        job->req = req;
        job->error = err;
        job->errmsg = (char *)msg;
        job->budget = (!err && (req.type == NBD_CMD_READ)) ? req.length
                                                           : payload;
        wait_budget(c, job->budget);
        if (payload) {
            job->data = malloc(payload);
            r = job->data ? nbd_conn_read(c, job->data, payload)
                          : -ENOMEM;
            if (r < 0) {
                vd_error_set(&c->err, r, "nbd: %s while reading write data",
                             r == -EPIPE ? "client closed the connection"
                                         : strerror(-r));
                ret = r;
                /* Account the job as finished without running it. */
                pthread_mutex_lock(&c->lock);
                c->inflight--;
                c->inflight_bytes -= job->budget;
                pthread_mutex_unlock(&c->lock);
                free(job->data);
                free(job);
                break;
            }
        }
        nbd_server_submit(c->srv, job);
    }
    wait_idle(c);
    return ret;
}
