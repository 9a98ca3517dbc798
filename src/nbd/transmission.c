/*
 * The transmission phase (nbd-proto.md, "Transmission"): the checker
 * that decides what a request may do, the replies, the commands, and the
 * connection's threads that read requests and perform them.
 *
 * Order of a request's life: a thread of the connection takes the read
 * mutex, reads the 28-byte header (through a 64 KiB receive buffer, so
 * one system call usually brings several small requests),
 * nbd_request_check() validates it against the negotiated capabilities
 * and says how many payload bytes follow (a WRITE's data is read even
 * when the request will fail, so the stream stays in step), and the
 * payload goes into the thread's own buffer; small requests already
 * received behind it may join it as a batch (see BATCH_MAX). If no other
 * thread is free to read the next request and there is reason to expect
 * one, it starts one (up to the connection's limit). It then releases
 * the read mutex, performs the I/O with the public vdisk API and sends
 * a simple reply, or structured chunks when they were negotiated: reads
 * as OFFSET_DATA/OFFSET_HOLE runs from block status, errors as one ERROR
 * chunk with a message. Each reply or chunk leaves in one write under
 * the connection's send mutex (a batch's replies together). The stream is read and written through
 * nbd_conn_read_some()/nbd_conn_write() (tls.h), plain or TLS as the
 * handshake left it.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#include "nbd-proto.h"
#include "nbd-int.h"
#include "tls.h"

/* Bytes received ahead of parsing, per connection. */
#define IBUF_SIZE               (64u * 1024)

/* A thread keeps its request buffer between requests up to this size;
 * a larger request gets a buffer of its own, freed afterwards. */
#define BUF_KEEP                (256u * 1024)

/* Requests with more data than BUDGET_MIN take their size from a
 * per-connection budget while in flight; reading waits when it is spent.
 * This bounds the memory of one-off buffers and, because threads are
 * only started when all are busy, the number of threads (each keeping
 * its buffer) that large requests bring. Past a few requests in flight
 * large transfers gain nothing on two cores. */
#define BUDGET_MIN              (64u * 1024)
#define CONN_MAX_BIG_BYTES      (4u * 1024 * 1024)

/* A READ or WRITE up to this size, with nothing more received yet, does
 * not start another thread: at queue depth 1 the thread would only add a
 * wake-up to every request, and the current one is back soon. */
#define QUICK_REQUEST           (16u * 1024)

/*
 * Batches: a thread that reads a quick request (above) while the receive
 * buffer already holds more quick requests, complete with their data,
 * takes up to BATCH_MAX of them at once, performs them one after the
 * other and sends their replies in one write (the "cork"). Answered one
 * by one, each small request costs a write and a wake-up of the client,
 * more than the request itself when the data is in the page cache; in
 * a batch that is paid once for up to BATCH_MAX of them (4 KiB random
 * reads at queue depth 32: about twice the IOPS, docs/nbd.md). Only
 * while requests are fast: when the recent quick
 * requests took more than BATCH_FAST_NS on average (a disk behind the
 * image), each again gets a thread, so slow I/O still overlaps.
 */
#define BATCH_MAX               16
#define BATCH_BYTES             (64u * 1024)
#define BATCH_FAST_NS           50000u
#define CORK_SIZE               (BATCH_BYTES + 4096)

/* CACHE reads the range in pieces of this size and drops the data. */
#define CACHE_CHUNK             BUF_KEEP

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
        if (!caps->structured || (!caps->ctx_base && !caps->ctx_depth &&
                                 !caps->ctx_bitmaps)) {
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

/* Replies of a batch, gathered to go out in one write. */
typedef struct nbd_cork {
    unsigned char *buf;   /* CORK_SIZE bytes */
    size_t len;
} nbd_cork;

/* The cork of the batch this thread is performing, or NULL. */
static __thread nbd_cork *thread_cork;

static int conn_send_now(nbd_conn *c, struct iovec *iov, int n);

/* Sends what the cork holds. */
static int cork_flush(nbd_conn *c, nbd_cork *k)
{
    struct iovec iov = { k->buf, k->len };

    if (!k->len) {
        return 0;
    }
    k->len = 0;
    return conn_send_now(c, &iov, 1);
}

/* Sends @n buffers as one message, or, during a batch, copies them into
 * the cork (the buffers of the caller do not live until the batch
 * ends); a message bigger than the cork goes out at once, after what
 * the cork holds, so a request's chunks stay in order. */
static int conn_send(nbd_conn *c, struct iovec *iov, int n)
{
    nbd_cork *k = thread_cork;
    size_t len = 0;
    int r;

    if (!k) {
        return conn_send_now(c, iov, n);
    }
    for (int i = 0; i < n; i++) {
        len += iov[i].iov_len;
    }
    if (len > CORK_SIZE - k->len && (r = cork_flush(c, k)) < 0) {
        return r;
    }
    if (len > CORK_SIZE) {
        return conn_send_now(c, iov, n);
    }
    for (int i = 0; i < n; i++) {
        memcpy(k->buf + k->len, iov[i].iov_base, iov[i].iov_len);
        k->len += iov[i].iov_len;
    }
    return atomic_load(&c->send_failed) ? -EPIPE : 0;
}

/* Sends @n buffers as one message; after the first failure every later
 * send is skipped and the reading thread is woken to end the connection. */
static int conn_send_now(nbd_conn *c, struct iovec *iov, int n)
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
static void do_sparse_read(nbd_conn *c, vd_node *node,
                           const nbd_request *req, unsigned char *buf)
{
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

/* @buf holds req->length bytes. */
static void do_read(nbd_conn *c, vd_node *node, const nbd_request *req,
                    unsigned char *buf)
{
    vd_error err = VD_ERROR_INIT;
    int r;

    if (c->caps.structured && req->length &&
        !(req->flags & NBD_CMD_FLAG_DF)) {
        do_sparse_read(c, node, req, buf);
        return;
    }
    r = req->length ? vd_pread(node, buf, req->length, req->offset,
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
}

static void do_write(nbd_conn *c, vd_node *node, const nbd_request *req,
                     const unsigned char *data)
{
    vd_error err = VD_ERROR_INIT;
    unsigned flags = (req->flags & NBD_CMD_FLAG_FUA) ? VD_REQ_FUA : 0;
    int r = 0;

    if (req->length) {
        r = vd_pwrite(node, data, req->length, req->offset,
                      flags, &err);
    }
    send_result(c, req->cookie, r, &err);
}

static void do_write_zeroes(nbd_conn *c, vd_node *node,
                            const nbd_request *req)
{
    vd_error err = VD_ERROR_INIT;
    unsigned flags = 0;
    int r = 0;

    if (req->flags & NBD_CMD_FLAG_FUA) {
        flags |= VD_REQ_FUA;
    }
    /* As QEMU's block layer: a node opened with discard=ignore (the
     * default; qemu-nbd without --discard=unmap) never deallocates. */
    if (!(req->flags & NBD_CMD_FLAG_NO_HOLE) &&
        vd_node_discard_unmap(node)) {
        flags |= VD_REQ_MAY_UNMAP;
    }
    if (req->flags & NBD_CMD_FLAG_FAST_ZERO) {
        flags |= VD_REQ_NO_FALLBACK;
    }
    if (req->length) {
        r = vd_write_zeroes(node, req->length, req->offset, flags,
                            &err);
    }
    if (r == -ENOTSUP && !(req->flags & NBD_CMD_FLAG_FAST_ZERO)) {
        /* Only FAST_ZERO may fail with ENOTSUP (spec, WRITE_ZEROES). */
        r = -EIO;
    }
    send_result(c, req->cookie, r, &err);
}

static void do_trim(nbd_conn *c, vd_node *node, const nbd_request *req)
{
    vd_error err = VD_ERROR_INIT;
    int r = 0;

    /* discard=ignore: the request succeeds and does nothing, as QEMU's
     * bdrv_co_pdiscard() on a node without BDRV_O_UNMAP. */
    if (req->length && vd_node_discard_unmap(node)) {
        r = vd_discard(node, req->length, req->offset, &err);
    }
    if (r == 0 && (req->flags & NBD_CMD_FLAG_FUA)) {
        r = vd_flush(node, &err);
    }
    send_result(c, req->cookie, r, &err);
}

static void do_flush(nbd_conn *c, vd_node *node, const nbd_request *req)
{
    vd_error err = VD_ERROR_INIT;
    int r = vd_flush(node, &err);

    send_result(c, req->cookie, r, &err);
}

/* Reads the range and drops it: the node's caches (and the host page
 * cache) then hold it, which is all CACHE promises. @buf holds @bufsz
 * bytes, at least min(length, CACHE_CHUNK). */
static void do_cache(nbd_conn *c, vd_node *node, const nbd_request *req,
                     unsigned char *buf, size_t bufsz)
{
    vd_error err = VD_ERROR_INIT;
    uint64_t pos = req->offset, end = req->offset + req->length;
    int r = 0;

    while (pos < end && r == 0) {
        uint64_t n = end - pos < bufsz ? end - pos : bufsz;
        r = vd_pread(node, buf, n, pos, 0, &err);
        pos += n;
    }
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

/*
 * The extents of bitmap @b over [@pos, @end) into @l, dirty ones with
 * NBD_STATE_DIRTY, at most @max descriptors (QEMU's bitmap_to_extents()).
 */
static int bitmap_extents(const struct nbd_export_bitmap *b, uint64_t pos,
                          uint64_t end, size_t max, extent_list *l,
                          vd_error *err)
{
    while (pos < end) {
        uint64_t start, bytes;
        int r = vd_bitmap_next_dirty(b->node, b->name, pos, &start, &bytes,
                                     err);
        if (r < 0) {
            return r;
        }
        if (r == 0 || start >= end) {
            start = end;
            bytes = 0;
        }
        if (start > pos) {
            if (l->n == max && l->last_flags != 0) {
                break;
            }
            if ((r = extent_add(l, (uint32_t)(start - pos), 0)) < 0) {
                return r;
            }
            pos = start;
        }
        if (bytes) {
            uint64_t n = start + bytes < end ? bytes : end - start;
            if (l->n == max && l->last_flags != NBD_STATE_DIRTY) {
                break;
            }
            if ((r = extent_add(l, (uint32_t)n, NBD_STATE_DIRTY)) < 0) {
                return r;
            }
            pos += n;
        }
    }
    return 0;
}

/* The chunks of the selected bitmaps, one per context, after those of
 * base:allocation and qemu:allocation-depth (which then carry no DONE
 * flag); the last chunk carries it. */
static void send_bitmap_status(nbd_conn *c, const nbd_request *req,
                               size_t max)
{
    const nbd_export *exp = c->exp;
    uint64_t sel = c->caps.ctx_bitmaps;

    for (size_t i = 0; i < exp->nb_bitmaps; i++) {
        vd_error err = VD_ERROR_INIT;
        extent_list l = { .id = NBD_CTX_ID_BITMAP0 + (uint32_t)i };
        bool last;
        int r;

        if (!(sel >> i & 1)) {
            continue;
        }
        last = (sel >> i >> 1) == 0;
        r = bitmap_extents(&exp->bitmaps[i], req->offset,
                           req->offset + req->length, max, &l, &err);
        if (r < 0) {
            /* An error chunk ends the reply. */
            send_result(c, req->cookie, r, &err);
            free(l.d);
            return;
        }
        r = send_extents(c, req->cookie, &l, last);
        free(l.d);
        if (r < 0) {
            return;
        }
    }
}

static void do_block_status(nbd_conn *c, vd_node *node,
                            const nbd_request *req)
{
    vd_error err = VD_ERROR_INIT;
    extent_list base = { .id = NBD_CTX_ID_BASE };
    extent_list depth = { .id = NBD_CTX_ID_DEPTH };
    bool one = req->flags & NBD_CMD_FLAG_REQ_ONE;
    uint64_t pos = req->offset, end = req->offset + req->length;
    size_t max = one ? 1 : NBD_MAX_EXTENTS;
    int r = 0;

    bool more = c->caps.ctx_bitmaps != 0;

    if (!c->caps.ctx_base && !c->caps.ctx_depth) {
        send_bitmap_status(c, req, max);
        return;
    }
    /* One pass over the range serves both contexts; a list that is full
     * stops the walk (the client asks again from where we stopped). */
    while (pos < end && base.n <= max && depth.n <= max) {
        vd_extent ext;
        uint32_t n, bf, df;

        r = vd_block_status(node, pos, end - pos, &ext, &err);
        if (r < 0) {
            break;
        }
        if (ext.length == 0) {
            r = vd_error_set(&err, -EIO, "%s: block status made no progress",
                             vd_node_filename(node));
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
            if (send_extents(c, req->cookie, &base,
                             !c->caps.ctx_depth && !more) < 0) {
                goto out;
            }
        }
        if (c->caps.ctx_depth) {
            if (send_extents(c, req->cookie, &depth, !more) < 0) {
                goto out;
            }
        }
        if (more) {
            send_bitmap_status(c, req, max);
        }
    }
out:
    free(base.d);
    free(depth.d);
}

/* ---- the connection's threads ---- */

/* A request as the thread that read it holds it. */
typedef struct nbd_work {
    nbd_request req;
    int error;            /* NBD_E* found while checking, 0 if none */
    const char *errmsg;   /* its message, or NULL */
    unsigned char *data;  /* WRITE payload or READ data, or NULL */
    bool own;             /* data is a one-off buffer, given back after */
    size_t own_size;      /* its size */
    uint64_t budget;      /* bytes taken from the connection's budget */
} nbd_work;

static void budget_take(nbd_conn *c, uint64_t bytes)
{
    pthread_mutex_lock(&c->lock);
    /* Alone, a request may always go ahead, so none waits forever. */
    while (c->big_bytes > 0 && c->big_bytes + bytes > CONN_MAX_BIG_BYTES) {
        pthread_cond_wait(&c->cond, &c->lock);
    }
    c->big_bytes += bytes;
    pthread_mutex_unlock(&c->lock);
}

static void budget_give(nbd_conn *c, uint64_t bytes)
{
    pthread_mutex_lock(&c->lock);
    c->big_bytes -= bytes;
    pthread_cond_broadcast(&c->cond);
    pthread_mutex_unlock(&c->lock);
}

/* A cached buffer of a large request; the header lives in the buffer. */
struct nbd_big_buf {
    size_t size;
    struct nbd_big_buf *next;
};

/* Request payloads live in page-aligned buffers: the kernel copies to
 * and from a buffer that is not 64-byte aligned (malloc's) several times
 * slower on some CPUs, on both the socket and the image side. */
static unsigned char *payload_alloc(size_t len)
{
    void *p = NULL;

    return posix_memalign(&p, 4096, len) == 0 ? p : NULL;
}

/*
 * Large requests reuse the buffers of earlier ones: a 1 MiB buffer fresh
 * from the allocator is fresh memory from the kernel (glibc maps big
 * blocks and trims arenas), and faulting in and zeroing its 256 pages
 * cost a quarter of the server's time under 1 MiB sequential reads. The
 * cache and the requests in flight together stay within the budget, so
 * the peak memory is what the budget allows anyway.
 */
static unsigned char *big_buf_get(nbd_conn *c, size_t len)
{
    struct nbd_big_buf **pp, *b = NULL;

    pthread_mutex_lock(&c->lock);
    for (pp = &c->big_free; *pp; pp = &(*pp)->next) {
        if ((*pp)->size == len) {
            b = *pp;
            *pp = b->next;
            c->big_free_bytes -= len;
            break;
        }
    }
    pthread_mutex_unlock(&c->lock);
    return (unsigned char *)b;
}

static void big_buf_put(nbd_conn *c, unsigned char *p, size_t len)
{
    struct nbd_big_buf *b = (struct nbd_big_buf *)p;

    pthread_mutex_lock(&c->lock);
    /* Evict other sizes first: a client usually sticks to one. */
    while (c->big_free && c->big_free_bytes + c->big_bytes + len >
                          CONN_MAX_BIG_BYTES) {
        struct nbd_big_buf *old = c->big_free;
        c->big_free = old->next;
        c->big_free_bytes -= old->size;
        free(old);
    }
    if (c->big_free_bytes + c->big_bytes + len <= CONN_MAX_BIG_BYTES) {
        b->size = len;
        b->next = c->big_free;
        c->big_free = b;
        c->big_free_bytes += len;
        p = NULL;
    }
    pthread_mutex_unlock(&c->lock);
    free(p);
}

static void big_buf_drop_all(nbd_conn *c)
{
    while (c->big_free) {
        struct nbd_big_buf *b = c->big_free;
        c->big_free = b->next;
        free(b);
    }
    c->big_free_bytes = 0;
}

/* A buffer of @len (non-zero) bytes for @wk: the thread's own, grown as
 * needed up to BUF_KEEP, or a one-off one. NULL on ENOMEM. */
static unsigned char *work_buffer(nbd_worker *w, nbd_work *wk, size_t len)
{
    unsigned char *p;

    if (len <= BUF_KEEP) {
        if (w->bufsize < len) {
            /* Doubling keeps a client's mix of sizes from costing a
             * reallocation per request. */
            size_t n = w->bufsize ? w->bufsize : 4096;
            while (n < len) {
                n *= 2;
            }
            if (n > BUF_KEEP) {
                n = BUF_KEEP;
            }
            free(w->buf);
            w->bufsize = 0;
            w->buf = payload_alloc(n);
            if (!w->buf) {
                return NULL;
            }
            w->bufsize = n;
        }
        return w->buf;
    }
    p = big_buf_get(w->conn, len);
    if (!p) {
        p = payload_alloc(len);
    }
    wk->own = p != NULL;
    wk->own_size = len;
    return p;
}

static void work_release(nbd_worker *w, nbd_work *wk)
{
    /* The budget first: the cache counts what is still in flight. */
    if (wk->budget) {
        budget_give(w->conn, wk->budget);
        wk->budget = 0;
    }
    if (wk->own) {
        big_buf_put(w->conn, wk->data, wk->own_size);
        wk->own = false;
    }
    wk->data = NULL;
}

/* Copies the next @len bytes of the stream to @dst: what the receive
 * buffer holds first, then by refilling it, or straight into @dst when
 * at least a buffer's worth remains. Under read_lock. */
static int conn_recv(nbd_conn *c, void *dst, size_t len)
{
    unsigned char *p = dst;

    while (len) {
        size_t have = c->ilen - c->ipos;
        ssize_t n;

        if (have) {
            size_t k = have < len ? have : len;
            memcpy(p, c->ibuf + c->ipos, k);
            c->ipos += k;
            p += k;
            len -= k;
            continue;
        }
        c->ipos = c->ilen = 0;
        if (len >= IBUF_SIZE) {
            return nbd_conn_read(c, p, len);
        }
        n = nbd_conn_read_some(c, c->ibuf, IBUF_SIZE);
        if (n < 0) {
            return (int)n;
        }
        c->ilen = (size_t)n;
    }
    return 0;
}

/* Throws away @len bytes of the stream (a payload we have no room for). */
static int conn_skip(nbd_conn *c, size_t len)
{
    unsigned char scratch[4096];

    while (len) {
        size_t k = len < sizeof(scratch) ? len : sizeof(scratch);
        int r = conn_recv(c, scratch, k);
        if (r < 0) {
            return r;
        }
        len -= k;
    }
    return 0;
}

static int read_failed(nbd_conn *c, int r, const char *what)
{
    /* A client that vanishes between requests is normal for a hard
     * disconnect, and after a failed send it is our doing: record the
     * fault quietly either way. */
    if (r != -EPIPE || !atomic_load(&c->send_failed)) {
        vd_error_set(&c->err, r, "nbd: %s while reading %s",
                     r == -EPIPE ? "client closed the connection"
                                 : strerror(-r),
                     what);
    }
    return r;
}

/* Reads and checks the next request into @wk, its data into @slot when
 * not NULL (a batch's part of the thread's buffer, big enough), else
 * into work_buffer(). Returns 1 when there is one to perform, 0 at
 * DISC, or a negative errno when the connection must end (recorded in
 * c->err). Under read_lock. */
static int read_request(nbd_worker *w, nbd_work *wk, unsigned char *slot)
{
    nbd_conn *c = w->conn;
    struct nbd_request_hdr h;
    nbd_request *req = &wk->req;
    uint32_t payload, need;
    bool fatal;
    int r;

    r = conn_recv(c, &h, sizeof(h));
    if (r < 0) {
        return read_failed(c, r, "a request");
    }
    if (be32toh(h.magic) != NBD_REQUEST_MAGIC) {
        return vd_error_set(&c->err, -EINVAL, "nbd: bad request magic 0x%08x",
                            be32toh(h.magic));
    }
    req->flags = be16toh(h.flags);
    req->type = be16toh(h.type);
    req->cookie = h.cookie;   /* kept in wire order, echoed as is */
    req->offset = be64toh(h.offset);
    req->length = be32toh(h.length);
    if (req->type == NBD_CMD_DISC) {
        return 0;
    }

    wk->error = nbd_request_check(req, &c->caps, &payload, &fatal,
                                  &wk->errmsg);
    wk->data = NULL;
    wk->own = false;
    wk->budget = 0;
    if (fatal) {
        send_error(c, req->cookie, (uint32_t)wk->error, wk->errmsg);
        return vd_error_set(&c->err, -EINVAL,
                            "nbd: %s (%" PRIu32 " bytes); disconnecting",
                            wk->errmsg, req->length);
    }
    need = payload ? payload
         : (!wk->error && req->type == NBD_CMD_READ) ? req->length : 0;
    if (need > BUDGET_MIN) {
        /* Waiting here holds up reading, which is the point. */
        budget_take(c, need);
        wk->budget = need;
    }
    if (need && slot) {
        wk->data = slot;
    } else if (need) {
        wk->data = work_buffer(w, wk, need);
        if (!wk->data) {
            wk->error = NBD_ENOMEM;
            wk->errmsg = "out of memory";
        }
    }
    if (payload) {
        r = wk->data ? conn_recv(c, wk->data, payload)
                     : conn_skip(c, payload);
        if (r < 0) {
            work_release(w, wk);
            return read_failed(c, r, "write data");
        }
    }
    return 1;
}

static void *worker_main(void *opaque);

/* Starts one more thread when none is free to read the request after
 * this one and one is probably coming. Under read_lock. */
static void maybe_spawn(nbd_conn *c, const nbd_request *req)
{
    bool quick = (req->type == NBD_CMD_READ || req->type == NBD_CMD_WRITE) &&
                 req->length <= QUICK_REQUEST;
    nbd_worker *w;

    if (c->nthreads >= c->max_threads ||
        c->nthreads > atomic_load(&c->busy)) {
        return;
    }
    if (quick && c->ipos == c->ilen && nbd_conn_pending(c) == 0) {
        return;
    }
    w = calloc(1, sizeof(*w));
    if (!w) {
        return;
    }
    w->conn = c;
    if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
        /* Make do with the threads we have. */
        free(w);
        c->max_threads = c->nthreads;
        return;
    }
    w->next = c->workers;
    c->workers = w;
    c->nthreads++;
}

static bool is_quick(const nbd_request *req)
{
    return (req->type == NBD_CMD_READ || req->type == NBD_CMD_WRITE) &&
           req->length <= QUICK_REQUEST;
}

/* The bytes of the thread's buffer the next request needs when it may
 * join a batch: a quick READ or WRITE already received whole (reading it
 * must not wait for the client, which may be waiting for the batch's
 * replies); -1 otherwise. A bad header is left to read_request(). */
static long peek_quick(const nbd_conn *c)
{
    size_t have = c->ilen - c->ipos;
    struct nbd_request_hdr h;
    uint16_t type;
    uint32_t len;

    if (have < sizeof(h)) {
        return -1;
    }
    memcpy(&h, c->ibuf + c->ipos, sizeof(h));
    type = be16toh(h.type);
    len = be32toh(h.length);
    if (be32toh(h.magic) != NBD_REQUEST_MAGIC ||
        (type != NBD_CMD_READ && type != NBD_CMD_WRITE) ||
        len > QUICK_REQUEST ||
        (type == NBD_CMD_WRITE && have - sizeof(h) < len)) {
        return -1;
    }
    return len;
}

/* Grows the thread's buffer to a batch's size; false on ENOMEM. */
static bool batch_buffer(nbd_worker *w)
{
    unsigned char *p;

    if (w->bufsize >= BATCH_BYTES) {
        return true;
    }
    p = payload_alloc(BATCH_BYTES);
    if (!p) {
        return false;
    }
    free(w->buf);
    w->buf = p;
    w->bufsize = BATCH_BYTES;
    return true;
}

/*
 * Takes the next request into wk[0] and, when it is quick, recent quick
 * requests were fast and more are already received, up to BATCH_MAX - 1
 * more behind it (their data side by side in the thread's buffer).
 * Returns how many, 0 once the connection is ending.
 */
static unsigned next_requests(nbd_worker *w, nbd_work *wk)
{
    nbd_conn *c = w->conn;
    bool batch = atomic_load_explicit(&c->quick_ns, memory_order_relaxed) <
                 BATCH_FAST_NS && batch_buffer(w);
    size_t at = 0;
    unsigned n = 0;
    int r;

    pthread_mutex_lock(&c->read_lock);
    if (c->stopping) {
        pthread_mutex_unlock(&c->read_lock);
        return 0;
    }
    r = read_request(w, &wk[0], NULL);
    if (r > 0) {
        n = 1;
        /* The first request's data, if any, is at the buffer's start
         * (quick requests fit the buffer and are not one-offs). */
        at = wk[0].data ? (wk[0].req.length + 4095) & ~(size_t)4095 : 0;
        batch = batch && is_quick(&wk[0].req);
    }
    while (r > 0 && batch && n < BATCH_MAX) {
        long need = peek_quick(c);
        /* Page-aligned slots, as payload_alloc() gives (copy speed). */
        size_t room = need < 0 ? 0 : ((size_t)need + 4095) & ~(size_t)4095;
        if (need < 0 || at + room > w->bufsize) {
            break;
        }
        r = read_request(w, &wk[n], w->buf + at);
        if (r > 0) {
            at += room;
            n++;
        }
    }
    if (r <= 0) {
        /* DISC or the end: the requests taken before still run. */
        c->stopping = true;
        c->end = r;
    }
    if (n) {
        atomic_fetch_add(&c->busy, 1);
        maybe_spawn(c, &wk[n - 1].req);
    }
    pthread_mutex_unlock(&c->read_lock);
    return n;
}

static void run_request(nbd_worker *w, nbd_work *wk)
{
    nbd_conn *c = w->conn;
    const nbd_request *req = &wk->req;

    if (atomic_load(&c->send_failed)) {
        return;   /* the client is gone: no one to reply to */
    }
    if (wk->error) {
        send_error(c, req->cookie, (uint32_t)wk->error, wk->errmsg);
        return;
    }
    /* Through the export's user: a pivot (mirror, active commit) sends
     * the request to the node that replaced the exported one. */
    vd_node *node = vd_user_io_begin(c->exp->user);
    switch (req->type) {
    case NBD_CMD_READ:
        do_read(c, node, req, wk->data);
        break;
    case NBD_CMD_WRITE:
        do_write(c, node, req, wk->data);
        break;
    case NBD_CMD_WRITE_ZEROES:
        do_write_zeroes(c, node, req);
        break;
    case NBD_CMD_TRIM:
        do_trim(c, node, req);
        break;
    case NBD_CMD_FLUSH:
        do_flush(c, node, req);
        break;
    case NBD_CMD_CACHE:
        if (req->length) {
            size_t n = req->length < CACHE_CHUNK ? req->length : CACHE_CHUNK;
            unsigned char *buf = work_buffer(w, wk, n);
            if (!buf) {
                send_error(c, req->cookie, NBD_ENOMEM, "out of memory");
                break;
            }
            do_cache(c, node, req, buf, n);
        } else {
            send_result(c, req->cookie, 0, NULL);
        }
        break;
    case NBD_CMD_BLOCK_STATUS:
        do_block_status(c, node, req);
        break;
    }
    vd_user_io_end(c->exp->user);
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Performs a request, and for a quick one folds its time into the
 * connection's average (weight 1/8) that decides whether to batch. */
static void run_timed(nbd_worker *w, nbd_work *wk)
{
    nbd_conn *c = w->conn;
    uint64_t t0, t;
    unsigned avg;

    if (!is_quick(&wk->req)) {
        run_request(w, wk);
        return;
    }
    t0 = now_ns();
    run_request(w, wk);
    t = now_ns() - t0;
    if (t > 100u * BATCH_FAST_NS) {
        t = 100u * BATCH_FAST_NS;
    }
    avg = atomic_load_explicit(&c->quick_ns, memory_order_relaxed);
    atomic_store_explicit(&c->quick_ns, avg - avg / 8 + (unsigned)t / 8,
                          memory_order_relaxed);
}

/* The loop every thread of a connection runs. */
static void serve_requests(nbd_worker *w)
{
    nbd_work wk[BATCH_MAX];
    nbd_cork cork = { 0 };
    unsigned n;

    while ((n = next_requests(w, wk)) > 0) {
        if (n > 1 && !w->cork) {
            /* Without a cork, the replies go out one by one. */
            w->cork = malloc(CORK_SIZE);
        }
        if (n > 1 && w->cork) {
            cork.buf = w->cork;
            thread_cork = &cork;
        }
        for (unsigned i = 0; i < n; i++) {
            run_timed(w, &wk[i]);
            work_release(w, &wk[i]);
        }
        if (thread_cork) {
            thread_cork = NULL;
            cork_flush(w->conn, &cork);
        }
        atomic_fetch_sub(&w->conn->busy, 1);
    }
    free(w->buf);
    w->buf = NULL;
    w->bufsize = 0;
    free(w->cork);
    w->cork = NULL;
}

static void *worker_main(void *opaque)
{
    serve_requests(opaque);
    return NULL;
}

/*
 * Shutdown and export removal shut the socket, so the thread that is
 * reading sees end of stream and marks the connection as stopping; the
 * others finish what they hold (their replies still go out) and leave
 * when they next come for a request.
 */
int nbd_transmission(nbd_conn *c)
{
    nbd_worker first = { .conn = c };
    nbd_worker *ws;

    c->ibuf = payload_alloc(IBUF_SIZE);
    if (!c->ibuf) {
        return vd_error_set(&c->err, -ENOMEM, "nbd: out of memory");
    }
    serve_requests(&first);

    /* Stopping is set, so no thread is started any more. */
    pthread_mutex_lock(&c->read_lock);
    ws = c->workers;
    c->workers = NULL;
    pthread_mutex_unlock(&c->read_lock);
    while (ws) {
        nbd_worker *next = ws->next;
        pthread_join(ws->thread, NULL);
        free(ws);
        ws = next;
    }
    free(c->ibuf);
    c->ibuf = NULL;
    big_buf_drop_all(c);
    return c->end;
}
