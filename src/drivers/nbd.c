/*
 * The "nbd" protocol driver: a client of an NBD server on libnbd, with
 * QEMU 7.2's filenames and options (../shared/specs/block-core.json,
 * BlockdevOptionsNbd; ../shared/specs/qemu-block-drivers.rst.inc):
 *
 *   nbd://HOST[:PORT][/EXPORT]   nbd+tcp://...   (TCP, port 10809)
 *   nbd+unix:///[EXPORT]?socket=PATH
 *   nbd:HOST:PORT[:exportname=NAME]   nbd:unix:PATH[:exportname=NAME]
 *
 * and the options server.type/host/port/path (or the legacy host, port,
 * path), export, tls-creds, tls-hostname, x-dirty-bitmap,
 * reconnect-delay and open-timeout. TLS is QEMU's way, through a
 * tls-creds-x509 or tls-creds-psk object with endpoint=client (there is
 * no nbds:// in QEMU 7.2); its directory goes to libnbd.
 *
 * Requests. vdisk's callers bring their own threads (docs/concurrency.md),
 * and libnbd's synchronous calls hold the handle's lock for the whole
 * round trip, so they would serialise them. Instead each request is
 * issued with libnbd's aio calls (which take the handle's lock only
 * while queueing) and its thread sleeps on a semaphore; one
 * I/O thread per connection polls the socket and lets libnbd send and
 * receive, which runs the completion callbacks. So any number of
 * requests are in flight on one connection. Where the server offers
 * multi-conn, up to NBD_MAX_CONNS connections take the requests in
 * turn (a threaded server such as nbdkit then answers in parallel;
 * QEMU 7.2's client uses one). A reconnection replaces them all.
 *
 * Reconnection. When the connection dies, every request in flight fails
 * inside libnbd with the handle dead. With reconnect-delay > 0 the first
 * thread to notice reconnects (retrying until the delay has passed)
 * while the others wait, and every failed request is issued again on
 * the new connection, so none is lost; past the delay they fail with a
 * message naming the server. Without it the first failure is final.
 * A replaced connection keeps its I/O thread and handle until close,
 * since a request may still be in flight on it.
 *
 * Block status asks the server's base:allocation context (or the one
 * x-dirty-bitmap names, read with base:allocation's meaning as QEMU
 * does) about a large range at once, and answers the questions that
 * follow from what it said until a write of ours or time makes that
 * stale (nbdc_block_status()).
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>

#include "core/block_int.h"
#include "core/status_keep.h"
#include "nbd/tls-creds.h"
#include "common/dlib.h"

/* The library's functions this driver calls (common/dlib.h: loaded at
 * the first open or create, not linked). */
#define NBD_LIB_FUNCS(X) \
    X(nbd_add_meta_context) \
    X(nbd_aio_block_status) \
    X(nbd_aio_connect_tcp) \
    X(nbd_aio_connect_unix) \
    X(nbd_aio_disconnect) \
    X(nbd_aio_flush) \
    X(nbd_aio_get_direction) \
    X(nbd_aio_get_fd) \
    X(nbd_aio_is_closed) \
    X(nbd_aio_is_dead) \
    X(nbd_aio_is_ready) \
    X(nbd_aio_notify_read) \
    X(nbd_aio_notify_write) \
    X(nbd_aio_pread) \
    X(nbd_aio_pwrite) \
    X(nbd_aio_trim) \
    X(nbd_aio_zero) \
    X(nbd_can_fast_zero) \
    X(nbd_can_flush) \
    X(nbd_can_meta_context) \
    X(nbd_can_multi_conn) \
    X(nbd_can_trim) \
    X(nbd_can_zero) \
    X(nbd_close) \
    X(nbd_create) \
    X(nbd_get_block_size) \
    X(nbd_get_errno) \
    X(nbd_get_error) \
    X(nbd_get_size) \
    X(nbd_is_read_only) \
    X(nbd_poll) \
    X(nbd_set_export_name) \
    X(nbd_set_pread_initialize) \
    X(nbd_set_tls) \
    X(nbd_set_tls_certificates) \
    X(nbd_set_tls_psk_file) \
    X(nbd_set_tls_username) \
    X(nbd_set_tls_verify_peer) \
    X(nbd_supports_tls)
VD_DLIB_DEFINE(nbd_lib, VDISK_LIBNBD_SONAME, NBD_LIB_FUNCS);

#define NBD_DEFAULT_PORT "10809"
/* QEMU's NBD_MAX_BUFFER_SIZE: the largest read or write sent at once. */
#define NBD_MAX_BUFFER (32u << 20)
/* How long a handshake (TCP connect, options, TLS) may take. */
#define NBD_HANDSHAKE_TIMEOUT_MS 30000
/* Connections opened when the server offers multi-conn (each one a
 * socket and an I/O thread; requests go round robin). Two, measured on
 * 2 cores against nbdkit's file plugin (bench/remote-nbd.sh, 512 MiB,
 * medians of 10-12 under load): reads 1.17 s with one connection, 1.03 s
 * with two, 1.03 s with four; writes 1.33 s, 1.55 s, 1.68 s (more
 * writers to one file only contend on the server). */
#define NBD_MAX_CONNS 2
/* ... each within this: a server that offers multi-conn but takes
 * fewer connections than that may leave one hanging. */
#define NBD_EXTRA_CONN_TIMEOUT_MS 2000
/* NBD state flags of base:allocation (../shared/specs/nbd-proto.md). */
#define NBD_STATE_HOLE 1u
#define NBD_STATE_ZERO 2u
/* Block status (nbdc_block_status()): each question asks about up to
 * NBD_STATUS_SPAN from its offset on (the length is 32 bits on the
 * wire), and the answer is kept (core/status_keep.h). */
#define NBD_STATUS_SPAN (1u << 30)

/* One connection: a libnbd handle and the thread that drives it. */
typedef struct nbd_conn {
    struct nbd_handle *h;
    pthread_t thread;
    bool thread_started;
    int wake_fd;                /* eventfd: new work, or stop */
    bool quickack;              /* TCP: ack_now() after each read */
    atomic_bool stop;
    struct nbd_conn *next;      /* in the list of dead connections */
} nbd_conn;

enum { CONN_UP, CONN_RECONNECTING, CONN_FAILED };

typedef struct nbd_state {
    /* What to connect to. */
    char *host, *port, *path;   /* path set: UNIX socket */
    char *export;               /* NULL: the default export "" */
    char *tls_creds, *tls_hostname, *x_dirty_bitmap;
    uint64_t reconnect_delay, open_timeout;  /* seconds */
    nbd_tls_client_creds tls;
    const char *context;        /* the meta context block status asks */
    bool has_context;           /* the server agreed to it */

    /* What the server offered at the first connection. */
    int64_t size;
    bool read_only, can_flush, can_trim, can_zero, can_fast_zero;

    pthread_mutex_t lock;       /* guards what follows */
    pthread_cond_t cond;        /* the state changed */
    nbd_conn *conn[NBD_MAX_CONNS];  /* current connections */
    int nconn;                  /* how many: 1, or more with multi-conn */
    atomic_uint next_conn;      /* round robin over them */
    nbd_conn *dead;             /* connections given up */
    int cstate;                 /* CONN_* */
    unsigned generation;        /* bumped by every new connection */
    char *last_error;           /* why the last reconnection failed */

    /* The last block status answer: writes, zeroes and trims are its
     * changes, a reconnection drops it. */
    vd_status_keep status;
} nbd_state;

/* ---- connections ---- */

static int64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int64_t ms)
{
    struct timespec ts = { .tv_sec = ms / 1000,
                           .tv_nsec = (ms % 1000) * 1000000 };

    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

/* Asks the kernel to acknowledge what arrives on TCP socket @fd at once
 * rather than after its delayed-ACK timer (up to 40 ms on Linux), which
 * it rearms by itself, so this is done after every read. A server that
 * leaves Nagle's algorithm on (qemu-nbd 7.2 does not set TCP_NODELAY)
 * holds a small reply while an earlier one is unacknowledged: each block
 * status or small read answered behind another waited for that timer
 * (a convert of 3000 4 KiB extents from qemu-nbd: 11.4 s without this,
 * 0.6 s with it). */
static void ack_now(int fd)
{
    int one = 1;

    (void)setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one));
}

/* The I/O thread: polls the socket in the direction libnbd wants and
 * the wake-up eventfd, which requests write after queueing a command
 * (the direction may have changed) and close writes to stop it. */
static void *conn_thread(void *opaque)
{
    nbd_conn *c = opaque;

    while (!atomic_load(&c->stop)) {
        struct pollfd p[2] = { { .fd = c->wake_fd, .events = POLLIN } };
        int n = 1;
        int fd = -1;

        if (!LIB(nbd_aio_is_dead)(c->h) && !LIB(nbd_aio_is_closed)(c->h))
            fd = LIB(nbd_aio_get_fd)(c->h);
        if (fd >= 0) {
            unsigned dir = LIB(nbd_aio_get_direction)(c->h);
            p[1].fd = fd;
            p[1].events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                          ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
            n = 2;
        }
        if (poll(p, n, 1000) < 0)
            continue;
        if (p[0].revents & POLLIN) {
            uint64_t v;
            if (read(c->wake_fd, &v, sizeof(v)) < 0) {
                /* EAGAIN: another wake-up took it; nothing lost. */
            }
        }
        if (n == 2) {
            /* A hang-up or error is read: libnbd then sees the end. */
            if (p[1].revents & (POLLIN | POLLHUP | POLLERR)) {
                LIB(nbd_aio_notify_read)(c->h);
                if (c->quickack)
                    ack_now(fd);
            } else if (p[1].revents & POLLOUT) {
                LIB(nbd_aio_notify_write)(c->h);
            }
        }
    }
    return NULL;
}

static void conn_wake(nbd_conn *c)
{
    uint64_t one = 1;

    if (write(c->wake_fd, &one, sizeof(one)) < 0) {
        /* The counter is full: the thread is awake anyway. */
    }
}

static void conn_stop(nbd_conn *c)
{
    if (c->thread_started) {
        atomic_store(&c->stop, true);
        conn_wake(c);
        pthread_join(c->thread, NULL);
        c->thread_started = false;
    }
}

static void conn_free(nbd_conn *c)
{
    if (!c)
        return;
    conn_stop(c);
    if (c->h) {
        /* A polite NBD_CMD_DISC when the connection still stands; the
         * close below does not wait for the server. */
        if (LIB(nbd_aio_is_ready)(c->h))
            LIB(nbd_aio_disconnect)(c->h, 0);
        LIB(nbd_close)(c->h);
    }
    if (c->wake_fd >= 0)
        close(c->wake_fd);
    free(c);
}

/* The server as messages name it: QEMU's filename of the node. */
static const char *server_name(vd_node *node)
{
    return node->filename ? node->filename : "nbd";
}

/* Makes one connection and runs the handshake, within @timeout_ms. */
static int conn_open(vd_node *node, nbd_conn **out, int64_t timeout_ms,
                     vd_error *err)
{
    nbd_state *s = node->opaque;
    nbd_conn *c = calloc(1, sizeof(*c));
    struct nbd_handle *h;
    int64_t deadline;
    int r;

    if (!c)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    c->wake_fd = -1;
    h = c->h = LIB(nbd_create)();
    if (!h) {
        r = vd_error_set(err, -ENOMEM, "%s", LIB(nbd_get_error)());
        goto fail;
    }
    /* Reads either fill the buffer or fail: libnbd need not clear it. */
    if (LIB(nbd_set_pread_initialize)(h, false) < 0 ||
        LIB(nbd_set_export_name)(h, s->export ? s->export : "") < 0 ||
        LIB(nbd_add_meta_context)(h, s->context) < 0)
        goto nbd_fail;
    if (s->tls_creds) {
        char *file = NULL;
        if (!LIB(nbd_supports_tls)(h)) {
            r = vd_error_set(err, -ENOTSUP, "TLS is not supported by "
                             "this build of libnbd");
            goto fail;
        }
        if (LIB(nbd_set_tls)(h, LIBNBD_TLS_REQUIRE) < 0 ||
            LIB(nbd_set_tls_verify_peer)(h, s->tls.verify_peer) < 0)
            goto nbd_fail;
        if (s->tls.psk) {
            /* QEMU's default PSK identity is "qemu". */
            if (asprintf(&file, "%s/keys.psk", s->tls.dir) < 0) {
                r = vd_error_set(err, -ENOMEM, "Out of memory");
                goto fail;
            }
            r = LIB(nbd_set_tls_psk_file)(h, file);
            free(file);
            const char *user = s->tls.username ? s->tls.username : "qemu";
            if (r < 0 || LIB(nbd_set_tls_username)(h, user) < 0)
                goto nbd_fail;
        } else if (LIB(nbd_set_tls_certificates)(h, s->tls.dir) < 0) {
            goto nbd_fail;
        }
    }
    if (s->path)
        r = LIB(nbd_aio_connect_unix)(h, s->path);
    else
        r = LIB(nbd_aio_connect_tcp)(h, s->host, s->port);
    if (r < 0)
        goto nbd_fail;
    deadline = now_ms() + timeout_ms;
    while (!LIB(nbd_aio_is_ready)(h)) {
        int64_t left = deadline - now_ms();
        if (LIB(nbd_aio_is_dead)(h) || LIB(nbd_aio_is_closed)(h))
            goto nbd_fail;
        if (left <= 0) {
            r = vd_error_set(err, -ETIMEDOUT, "Timed out connecting to "
                             "the NBD server");
            goto fail;
        }
        if (LIB(nbd_poll)(h, (int)(left < 1000 ? left : 1000)) < 0)
            goto nbd_fail;
    }
    c->quickack = !s->path;
    c->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->wake_fd < 0) {
        r = vd_error_set_errno(err, -errno, "eventfd");
        goto fail;
    }
    if ((r = pthread_create(&c->thread, NULL, conn_thread, c)) != 0) {
        r = vd_error_set(err, -r, "Could not start the NBD I/O thread");
        goto fail;
    }
    c->thread_started = true;
    *out = c;
    return 0;

nbd_fail:
    r = LIB(nbd_get_errno)();
    r = vd_error_set(err, r > 0 ? -r : -EIO, "%s",
                     LIB(nbd_get_error)() ? LIB(nbd_get_error)()
                                          : "NBD handshake failed");
fail:
    conn_free(c);
    return r;
}

/* Connects until it works or @seconds have passed (0: one try), as
 * QEMU's open-timeout and reconnect-delay. */
static int conn_open_retry(vd_node *node, uint64_t seconds, nbd_conn **out,
                           vd_error *err)
{
    int64_t deadline = now_ms() + (int64_t)seconds * 1000;
    int64_t pause = 100;

    for (;;) {
        vd_error e = VD_ERROR_INIT;
        int r = conn_open(node, out, NBD_HANDSHAKE_TIMEOUT_MS, &e);
        if (r == 0 || now_ms() >= deadline ||
            r == -ENOMEM || r == -ENOTSUP) {
            if (r < 0)
                vd_error_set(err, r, "%s", e.message);
            vd_error_clear(&e);
            return r;
        }
        vd_error_clear(&e);
        sleep_ms(pause);
        if (pause < 1000)
            pause *= 2;
    }
}

/* ---- requests ---- */

enum { OP_READ, OP_WRITE, OP_ZERO, OP_TRIM, OP_FLUSH, OP_STATUS };

/* One request on its way: the issuing thread waits on @done, posted by
 * the completion. A semaphore rather than a mutex and a condition
 * variable: the I/O thread signalled with the mutex held, so the woken
 * thread first blocked again on that mutex (a context switch more per
 * request); a waiter may destroy it as soon as its wait returns. */
typedef struct nbd_req {
    sem_t done;
    int error;
    /* block status: the extents of our context, from the request's
     * offset on (at most ext_cap of them, in @ext) */
    const char *context;
    bool got_extents;
    vd_kept_extent *ext;
    uint32_t ext_cap, next;
} nbd_req;

static int req_done(void *opaque, int *error)
{
    nbd_req *r = opaque;

    r->error = *error;
    sem_post(&r->done);
    return 1;   /* retire the command */
}

static int req_extent(void *opaque, const char *context, uint64_t offset,
                      uint32_t *entries, size_t nr_entries, int *error)
{
    nbd_req *r = opaque;
    uint64_t end = offset;

    (void)error;
    /* One chunk per context (../shared/specs/nbd-proto.md); a second
     * one would be a server's error, ignored rather than mixed in. */
    if (strcmp(context, r->context) != 0 || r->got_extents)
        return 0;
    r->got_extents = true;
    /* Entries are (length, flags) pairs; a zero length ends the list
     * (libnbd checks the rest of the reply's shape). */
    for (size_t i = 0; i + 1 < nr_entries && r->next < r->ext_cap; i += 2) {
        if (entries[i] == 0)
            break;
        end += entries[i];
        r->ext[r->next].end = end;
        r->ext[r->next].status =
            (entries[i + 1] & NBD_STATE_HOLE ? 0 : VD_BLOCK_DATA) |
            (entries[i + 1] & NBD_STATE_ZERO ? VD_BLOCK_ZERO : 0);
        r->next++;
    }
    return 0;
}

/* Issues @op on @c and waits for its reply. Returns 0, or the errno
 * the server or libnbd gave (positive). */
static int conn_do(nbd_conn *c, int op, uint64_t off, uint64_t len,
                   void *buf, uint32_t nflags, nbd_req *r)
{
    nbd_completion_callback done = { .callback = req_done, .user_data = r };
    int64_t cookie;

    switch (op) {
    case OP_READ:
        cookie = LIB(nbd_aio_pread)(c->h, buf, len, off, done, 0);
        break;
    case OP_WRITE:
        cookie = LIB(nbd_aio_pwrite)(c->h, buf, len, off, done, nflags);
        break;
    case OP_ZERO:
        cookie = LIB(nbd_aio_zero)(c->h, len, off, done, nflags);
        break;
    case OP_TRIM:
        cookie = LIB(nbd_aio_trim)(c->h, len, off, done, 0);
        break;
    case OP_FLUSH:
        cookie = LIB(nbd_aio_flush)(c->h, done, 0);
        break;
    default: {
        nbd_extent_callback ext = { .callback = req_extent, .user_data = r };
        /* Without REQ_ONE: the server describes as much of the range
         * as it likes in one reply (nbdc_block_status() keeps it). */
        cookie = LIB(nbd_aio_block_status)(c->h, len, off, ext, done, 0);
        break;
    }
    }
    if (cookie < 0) {
        int e = LIB(nbd_get_errno)();
        return e > 0 ? e : EIO;
    }
    /* The I/O thread polls for replies already; it needs waking only
     * when libnbd could not send all of the request at once and now
     * waits for the socket to take more (a wake-up per request would
     * cost a context switch each). */
    if (LIB(nbd_aio_get_direction)(c->h) & LIBNBD_AIO_DIRECTION_WRITE)
        conn_wake(c);
    while (sem_wait(&r->done) < 0) {
        /* EINTR: a signal handler ran; the reply is still to come. */
    }
    return r->error;
}

/* Whether error @e of a request on @c means the connection is gone
 * (rather than the server's answer): libnbd's handle is dead, or the
 * error is one the socket gives before libnbd has noticed. */
static bool conn_lost(nbd_conn *c, int e)
{
    return LIB(nbd_aio_is_dead)(c->h) || LIB(nbd_aio_is_closed)(c->h) ||
           e == ENOTCONN || e == EPIPE || e == ECONNRESET || e == ESHUTDOWN;
}

/* Replaces the dead connection of generation @gen (lock held; dropped
 * while connecting). Called by the first request that saw it die; the
 * others wait in nbdc_request() meanwhile. */
static void reconnect(vd_node *node, unsigned gen, uint64_t seconds)
{
    nbd_state *s = node->opaque;
    nbd_conn *fresh[NBD_MAX_CONNS] = { NULL };
    vd_error e = VD_ERROR_INIT;
    int r, n = 1;

    if (s->generation != gen || s->cstate == CONN_RECONNECTING)
        return;
    s->cstate = CONN_RECONNECTING;
    pthread_mutex_unlock(&s->lock);
    /* The first within the delay; the others (multi-conn) once each: a
     * server that takes fewer now leaves us fewer. */
    r = conn_open_retry(node, seconds, &fresh[0], &e);
    while (r == 0 && n < s->nconn) {
        vd_error e2 = VD_ERROR_INIT;
        if (conn_open(node, &fresh[n], NBD_EXTRA_CONN_TIMEOUT_MS, &e2) < 0)
            break;
        n++;
    }
    pthread_mutex_lock(&s->lock);
    if (r == 0) {
        /* Keep the old ones, and their threads, until close: a request
         * may still be in flight on one (to fail when its socket does). */
        for (int i = 0; i < s->nconn; i++) {
            s->conn[i]->next = s->dead;
            s->dead = s->conn[i];
            s->conn[i] = fresh[i];
        }
        s->nconn = n;
        s->generation++;
        /* Maybe another server now: what it said before is not kept. */
        vd_status_keep_drop(&s->status);
        s->cstate = CONN_UP;
    } else {
        free(s->last_error);
        s->last_error = strdup(e.message);
        s->cstate = CONN_FAILED;
    }
    vd_error_clear(&e);
    pthread_cond_broadcast(&s->cond);
}

/* Runs one request, reissuing it on a new connection when the old one
 * died and reconnect-delay allows. Returns 0 or a negative errno with
 * @err set. @r (may be NULL) receives a block status's extent. */
static int nbdc_request(vd_node *node, int op, uint64_t off, uint64_t len,
                        void *buf, uint32_t nflags, nbd_req *out,
                        vd_error *err)
{
    nbd_state *s = node->opaque;
    bool tried_failed = false;

    for (;;) {
        /* (A reissued block status starts its list again.) */
        nbd_req r = { .context = s->context,
                      .ext = out ? out->ext : NULL,
                      .ext_cap = out ? out->ext_cap : 0 };
        nbd_conn *c;
        unsigned gen;
        int e;

        pthread_mutex_lock(&s->lock);
        while (s->cstate == CONN_RECONNECTING)
            pthread_cond_wait(&s->cond, &s->lock);
        if (s->cstate == CONN_FAILED) {
            /* Past the delay requests fail, but each new one may find
             * the server back (one try, no waiting). */
            if (tried_failed || s->reconnect_delay == 0) {
                e = vd_error_set(err, -EIO, "%s: connection to the NBD "
                                 "server lost%s%s", server_name(node),
                                 s->last_error ? ": " : "",
                                 s->last_error ? s->last_error : "");
                pthread_mutex_unlock(&s->lock);
                return e;
            }
            tried_failed = true;
            s->cstate = CONN_UP;   /* let reconnect() run once more */
            reconnect(node, s->generation, 0);
            pthread_mutex_unlock(&s->lock);
            continue;
        }
        c = s->conn[atomic_fetch_add_explicit(&s->next_conn, 1,
                                              memory_order_relaxed) %
                     (unsigned)s->nconn];
        gen = s->generation;
        pthread_mutex_unlock(&s->lock);

        sem_init(&r.done, 0, 0);
        e = conn_do(c, op, off, len, buf, nflags, &r);
        sem_destroy(&r.done);
        if (e == 0) {
            if (out) {
                out->got_extents = r.got_extents;
                out->next = r.next;
            }
            return 0;
        }
        if (!conn_lost(c, e)) {
            /* The server's answer to this request: final. */
            return vd_error_set_errno(err, -e, "%s", server_name(node));
        }
        pthread_mutex_lock(&s->lock);
        if (s->reconnect_delay == 0) {
            s->cstate = CONN_FAILED;
            free(s->last_error);
            s->last_error = strdup(strerror(e));
            e = vd_error_set(err, -EIO, "%s: connection to the NBD server "
                             "lost: %s", server_name(node), strerror(e));
            pthread_mutex_unlock(&s->lock);
            return e;
        }
        reconnect(node, gen, s->reconnect_delay);
        pthread_mutex_unlock(&s->lock);
    }
}

/* A write, zero or trim (nbdc_request()'s arguments): a block status
 * answer asked before it ended is not used after it began. */
static int nbdc_change(vd_node *node, int op, uint64_t off, uint64_t len,
                       void *buf, uint32_t nflags, vd_error *err)
{
    nbd_state *s = node->opaque;
    int r;

    vd_status_keep_change_begin(&s->status);
    r = nbdc_request(node, op, off, len, buf, nflags, NULL, err);
    vd_status_keep_change_end(&s->status);
    return r;
}

/* ---- filenames and options ---- */

static int oom(vd_error *err)
{
    return vd_error_set(err, -ENOMEM, "Out of memory");
}

/* Percent-decodes @in[0..len) into a new string. */
static char *uri_decode(const char *in, size_t len)
{
    char *out = malloc(len + 1), *o = out;

    if (!out)
        return NULL;
    for (size_t i = 0; i < len; i++) {
        unsigned v;
        if (in[i] == '%' && i + 2 < len &&
            sscanf(in + i + 1, "%2x", &v) == 1) {
            *o++ = (char)v;
            i += 2;
        } else {
            *o++ = in[i];
        }
    }
    *o = 0;
    return out;
}

/* host:port (host may be [v6]) into s->host and s->port. */
static int parse_inet(nbd_state *s, const char *hp, size_t len,
                      bool need_port, vd_error *err)
{
    const char *end = hp + len, *colon;

    if (len && hp[0] == '[') {
        const char *rb = memchr(hp, ']', len);
        if (!rb)
            return vd_error_set(err, -EINVAL, "error parsing IPv6 address "
                                "'%.*s'", (int)len, hp);
        s->host = strndup(hp + 1, (size_t)(rb - hp - 1));
        colon = rb + 1 < end && rb[1] == ':' ? rb + 1 : NULL;
        if (rb + 1 < end && !colon)
            return vd_error_set(err, -EINVAL, "error parsing address "
                                "'%.*s'", (int)len, hp);
    } else {
        colon = memrchr(hp, ':', len);
        s->host = strndup(hp, colon ? (size_t)(colon - hp) : len);
    }
    if (!s->host)
        return oom(err);
    if (colon) {
        s->port = strndup(colon + 1, (size_t)(end - colon - 1));
    } else if (need_port) {
        return vd_error_set(err, -EINVAL, "error parsing address '%.*s'",
                            (int)len, hp);
    } else {
        s->port = strdup(NBD_DEFAULT_PORT);
    }
    if (!s->port)
        return oom(err);
    if (!*s->port || strspn(s->port, "0123456789") != strlen(s->port))
        return vd_error_set(err, -EINVAL, "error parsing port in address "
                            "'%.*s'", (int)len, hp);
    return 0;
}

/* QEMU's nbd_parse_uri(): nbd[+tcp|+unix]://[host[:port]]/[export]
 * [?socket=PATH]. */
static int parse_uri(nbd_state *s, const char *name, vd_error *err)
{
    const char *sep = strstr(name, "://");
    size_t slen = (size_t)(sep - name);
    const char *auth = sep + 3, *pathp, *query;
    bool is_unix;

    if (slen == 3 && strncmp(name, "nbd", 3) == 0) {
        is_unix = false;
    } else if (slen == 7 && strncmp(name, "nbd+tcp", 7) == 0) {
        is_unix = false;
    } else if (slen == 8 && strncmp(name, "nbd+unix", 8) == 0) {
        is_unix = true;
    } else {
        return vd_error_set(err, -EINVAL, "No valid URL specified");
    }
    pathp = auth + strcspn(auth, "/?");
    query = strchr(pathp, '?');
    /* The path is the export, without its leading '/'. */
    {
        const char *p = pathp;
        size_t plen = query ? (size_t)(query - p) : strlen(p);
        if (plen && *p == '/') {
            p++;
            plen--;
        }
        if (plen) {
            s->export = uri_decode(p, plen);
            if (!s->export)
                return oom(err);
        }
    }
    if (is_unix) {
        if (pathp != auth)
            return vd_error_set(err, -EINVAL, "No valid URL specified");
        if (!query || strncmp(query + 1, "socket=", 7) != 0 ||
            strchr(query + 8, '&'))
            return vd_error_set(err, -EINVAL, "No valid URL specified");
        s->path = uri_decode(query + 8, strlen(query + 8));
        return s->path ? 0 : oom(err);
    }
    if (query)
        return vd_error_set(err, -EINVAL, "No valid URL specified");
    if (pathp == auth)
        return vd_error_set(err, -EINVAL, "No valid URL specified");
    if (parse_inet(s, auth, (size_t)(pathp - auth), false, NULL) < 0)
        return vd_error_set(err, -EINVAL, "No valid URL specified");
    return 0;
}

/* QEMU's legacy nbd:unix:PATH[:exportname=E] / nbd:HOST:PORT[:...]. */
static int parse_filename(nbd_state *s, const char *name, vd_error *err)
{
    const char *rest, *ex;
    size_t len;

    if (strstr(name, "://"))
        return parse_uri(s, name, err);
    if (strncmp(name, "nbd:", 4) != 0)
        return vd_error_set(err, -EINVAL, "File name string for NBD must "
                            "start with 'nbd:'");
    rest = name + 4;
    ex = strstr(rest, ":exportname=");
    len = ex ? (size_t)(ex - rest) : strlen(rest);
    if (ex && !(s->export = strdup(ex + 12)))
        return oom(err);
    if (strncmp(rest, "unix:", 5) == 0) {
        s->path = strndup(rest + 5, len - 5);
        return s->path ? 0 : oom(err);
    }
    return parse_inet(s, rest, len, true, err);
}

static int take_str(vd_opts *opts, const char *key, char **out)
{
    char *v = vd_opts_take(opts, key);

    if (v) {
        free(*out);
        *out = v;
    }
    return 0;
}

/* The options: a filename, or server.* (QEMU's SocketAddress), or the
 * legacy host/port/path; the other BlockdevOptionsNbd members. */
static int nbdc_parse_opts(vd_node *node, vd_opts *opts, vd_error *err)
{
    nbd_state *s = node->opaque;
    char *fname = vd_opts_take(opts, "filename");
    char *type = vd_opts_take(opts, "server.type");
    char *host = NULL, *port = NULL, *path = NULL;
    int r = 0;

    take_str(opts, "host", &host);
    take_str(opts, "server.host", &host);
    take_str(opts, "port", &port);
    take_str(opts, "server.port", &port);
    take_str(opts, "path", &path);
    take_str(opts, "server.path", &path);
    take_str(opts, "export", &s->export);
    take_str(opts, "tls-creds", &s->tls_creds);
    take_str(opts, "tls-hostname", &s->tls_hostname);
    take_str(opts, "x-dirty-bitmap", &s->x_dirty_bitmap);
    if ((r = vd_opts_take_uint(opts, "reconnect-delay", 0,
                               &s->reconnect_delay, err)) < 0 ||
        (r = vd_opts_take_uint(opts, "open-timeout", 0, &s->open_timeout,
                               err)) < 0)
        goto out;
    /* Both are uint32 in QEMU's schema. */
    if (s->reconnect_delay > UINT32_MAX || s->open_timeout > UINT32_MAX) {
        r = vd_error_set(err, -EINVAL, "Parameter '%s' expects uint32_t",
                         s->reconnect_delay > UINT32_MAX ? "reconnect-delay"
                                                         : "open-timeout");
        goto out;
    }

    if (host || port || path || type) {
        /* Options win over a filename the core kept from an earlier
         * open (ours, rebuilt from these options). */
        if (fname && fname[0]) {
            r = vd_error_set(err, -EINVAL, "No extra parameter allowed "
                             "with a filename");
            goto out;
        }
        if (type && strcmp(type, "inet") != 0 && strcmp(type, "unix") != 0) {
            r = vd_error_set(err, -EINVAL, "Unsupported server type '%s' "
                             "(vdisk's nbd client knows inet and unix)",
                             type);
            goto out;
        }
        if (host && path) {
            r = vd_error_set(err, -EINVAL, "Parameters 'server.path' and "
                             "'server.host' cannot be used together");
            goto out;
        }
        if ((type && strcmp(type, "unix") == 0) || (!type && path)) {
            if (!path) {
                r = vd_error_set(err, -EINVAL, "Parameter 'server.path' is "
                                 "missing");
                goto out;
            }
            s->path = path;
            path = NULL;
        } else {
            if (!host) {
                r = vd_error_set(err, -EINVAL, "Parameter 'server.host' is "
                                 "missing");
                goto out;
            }
            s->host = host;
            s->port = port ? port : strdup(NBD_DEFAULT_PORT);
            host = port = NULL;
            if (!s->port) {
                r = oom(err);
                goto out;
            }
        }
    } else {
        const char *name = fname && fname[0] ? fname : node->filename;
        char *export = s->export;
        if (!name || !name[0]) {
            r = vd_error_set(err, -EINVAL, "one of path and host must be "
                             "specified");
            goto out;
        }
        s->export = NULL;
        r = parse_filename(s, name, err);
        if (r == 0 && export) {
            if (s->export) {
                r = vd_error_set(err, -EINVAL, "No extra parameter allowed "
                                 "with a filename");
                free(export);
            } else {
                s->export = export;
            }
        } else {
            free(export);
        }
    }
out:
    free(fname);
    free(type);
    free(host);
    free(port);
    free(path);
    return r;
}

/* QEMU's nbd_refresh_filename(): the name info and map print. */
static int set_filename(vd_node *node, vd_error *err)
{
    nbd_state *s = node->opaque;
    const char *host = s->host && !strchr(s->host, ':') ? s->host : NULL;
    char *name = NULL;
    int r;

    if (s->path && s->export)
        r = asprintf(&name, "nbd+unix:///%s?socket=%s", s->export, s->path);
    else if (s->path)
        r = asprintf(&name, "nbd+unix://?socket=%s", s->path);
    else if (host && s->export)
        r = asprintf(&name, "nbd://%s:%s/%s", host, s->port, s->export);
    else if (host)
        r = asprintf(&name, "nbd://%s:%s", host, s->port);
    else
        return 0;   /* an IPv6 host: QEMU keeps json:{...}; so do we */
    if (r < 0)
        return oom(err);
    free(node->filename);
    node->filename = name;
    return 0;
}

/* ---- the driver ---- */

static void nbdc_free_state(nbd_state *s)
{
    for (int i = 0; i < s->nconn; i++) {
        conn_free(s->conn[i]);
        s->conn[i] = NULL;
    }
    s->nconn = 0;
    while (s->dead) {
        nbd_conn *c = s->dead;
        s->dead = c->next;
        conn_free(c);
    }
    free(s->host);
    free(s->port);
    free(s->path);
    free(s->export);
    free(s->tls_creds);
    free(s->tls_hostname);
    free(s->x_dirty_bitmap);
    free(s->tls.dir);
    free(s->tls.username);
    free(s->last_error);
}

static int nbdc_open(vd_node *node, vd_opts *opts, unsigned flags,
                     vd_error *err)
{
    nbd_state *s = node->opaque;
    bool rdwr = (flags & VD_NODE_RDWR) && !node->read_only;
    struct nbd_handle *h;
    int64_t minb, maxb;
    uint32_t align;
    int r;

    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    vd_status_keep_init(&s->status);
    if ((r = nbdc_parse_opts(node, opts, err)) < 0)
        goto fail;
    if (s->tls_creds) {
        if ((r = nbd_tls_client_creds_get(s->tls_creds, &s->tls, err)) < 0)
            goto fail;
        if (!s->tls.dir) {
            r = vd_error_set(err, -EINVAL, "Missing 'dir' property value");
            goto fail;
        }
    } else if (s->tls_hostname) {
        r = vd_error_set(err, -EINVAL, "tls-hostname is set but tls-creds "
                         "is not set");
        goto fail;
    }
    /* libnbd 1.14 checks the certificate against the host it connects
     * to and offers no other name; a different one is refused rather
     * than silently not checked. */
    if (s->tls_hostname && (!s->host || strcmp(s->tls_hostname, s->host))) {
        r = vd_error_set(err, -ENOTSUP, "tls-hostname other than the "
                         "server's host is not supported by vdisk's nbd "
                         "client");
        goto fail;
    }
    s->context = s->x_dirty_bitmap ? s->x_dirty_bitmap
                                   : LIBNBD_CONTEXT_BASE_ALLOCATION;
    if ((r = set_filename(node, err)) < 0)
        goto fail;

    r = conn_open_retry(node, s->open_timeout, &s->conn[0], err);
    if (r == 0)
        s->nconn = 1;
    if (r < 0) {
        if (s->path)
            vd_error_prepend(err, "Failed to connect to '%s': ", s->path);
        else
            vd_error_prepend(err, "Failed to connect to '%s:%s': ", s->host,
                             s->port);
        goto fail;
    }
    h = s->conn[0]->h;
    s->size = LIB(nbd_get_size)(h);
    if (s->size < 0) {
        r = vd_error_set(err, -EIO, "%s", LIB(nbd_get_error)());
        goto fail;
    }
    s->read_only = LIB(nbd_is_read_only)(h) == 1;
    s->can_flush = LIB(nbd_can_flush)(h) == 1;
    s->can_trim = LIB(nbd_can_trim)(h) == 1;
    s->can_zero = LIB(nbd_can_zero)(h) == 1;
    s->can_fast_zero = LIB(nbd_can_fast_zero)(h) == 1;
    s->has_context = LIB(nbd_can_meta_context)(h, s->context) == 1;
    if (s->x_dirty_bitmap && !s->has_context) {
        r = vd_error_set(err, -EINVAL, "requested x-dirty-bitmap %s not "
                         "found", s->x_dirty_bitmap);
        goto fail;
    }
    if (rdwr && s->read_only) {
        r = vd_error_set(err, -EACCES, "NBD export is read-only");
        goto fail;
    }

    /* Multi-conn: the server promises that what one connection flushes
     * covers every connection's writes (NBD_FLAG_CAN_MULTI_CONN), so
     * requests may be spread over several; a server with a connection
     * limit just leaves us fewer. */
    if (LIB(nbd_can_multi_conn)(h) == 1) {
        while (s->nconn < NBD_MAX_CONNS) {
            vd_error e = VD_ERROR_INIT;
            if (conn_open(node, &s->conn[s->nconn],
                          NBD_EXTRA_CONN_TIMEOUT_MS, &e) < 0)
                break;
            s->nconn++;
        }
    }

    /* The server's block sizes (QEMU's nbd_refresh_limits()). */
    minb = LIB(nbd_get_block_size)(h, LIBNBD_SIZE_MINIMUM);
    maxb = LIB(nbd_get_block_size)(h, LIBNBD_SIZE_MAXIMUM);
    align = minb > 0 && minb <= 65536 ? (uint32_t)minb : 1;
    node->bl.request_alignment = align;
    node->bl.max_transfer = NBD_MAX_BUFFER;
    if (maxb > 0 && (uint64_t)maxb < NBD_MAX_BUFFER)
        node->bl.max_transfer = (uint64_t)maxb / align * align;
    if (node->bl.max_transfer < align)
        node->bl.max_transfer = align;
    /* Zero and trim carry a 32-bit length but no payload. */
    node->bl.max_pwrite_zeroes = (INT32_MAX / align) * align;
    node->bl.max_pdiscard = node->bl.max_pwrite_zeroes;
    return 0;

fail:
    nbdc_free_state(s);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->cond);
    vd_status_keep_destroy(&s->status);
    memset(s, 0, sizeof(*s));
    return r;
}

static void nbdc_close_node(vd_node *node)
{
    nbd_state *s = node->opaque;

    nbdc_free_state(s);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->cond);
    vd_status_keep_destroy(&s->status);
}

/* libnbd wants one flat buffer; a scattered vector goes through a
 * bounce buffer. */
static int nbdc_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                       vd_iov *qiov, unsigned flags, vd_error *err)
{
    void *buf = qiov->niov == 1 ? qiov->iov[0].iov_base : malloc(bytes);
    int r;

    (void)flags;
    if (!buf)
        return oom(err);
    r = nbdc_request(node, OP_READ, off, bytes, buf, 0, NULL, err);
    if (buf != qiov->iov[0].iov_base) {
        if (r == 0)
            vd_iov_from_buf(qiov, 0, buf, bytes);
        free(buf);
    }
    return r;
}

static int nbdc_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                        vd_iov *qiov, unsigned flags, vd_error *err)
{
    void *buf = qiov->niov == 1 ? qiov->iov[0].iov_base : malloc(bytes);
    int r;

    (void)flags;    /* FUA is the core's: a flush after the write */
    if (!buf)
        return oom(err);
    if (buf != qiov->iov[0].iov_base)
        vd_iov_to_buf(qiov, 0, buf, bytes);
    r = nbdc_change(node, OP_WRITE, off, bytes, buf, 0, err);
    if (buf != qiov->iov[0].iov_base)
        free(buf);
    return r;
}

/* Without VD_REQ_MAY_UNMAP the zeros must stay allocated (NO_HOLE);
 * VD_REQ_NO_FALLBACK asks for a fast zero, which only a server that
 * offers it can promise. */
static int nbdc_pwrite_zeroes(vd_node *node, uint64_t off, uint64_t bytes,
                              unsigned flags, vd_error *err)
{
    nbd_state *s = node->opaque;
    uint32_t nflags = 0;

    if (!s->can_zero)
        return -ENOTSUP;
    if (!(flags & VD_REQ_MAY_UNMAP))
        nflags |= LIBNBD_CMD_FLAG_NO_HOLE;
    if (flags & VD_REQ_NO_FALLBACK) {
        if (!s->can_fast_zero)
            return -ENOTSUP;
        nflags |= LIBNBD_CMD_FLAG_FAST_ZERO;
    }
    return nbdc_change(node, OP_ZERO, off, bytes, NULL, nflags, err);
}

static int nbdc_pdiscard(vd_node *node, uint64_t off, uint64_t bytes,
                         vd_error *err)
{
    nbd_state *s = node->opaque;

    if (!s->can_trim)
        return 0;
    return nbdc_change(node, OP_TRIM, off, bytes, NULL, 0, err);
}

static int nbdc_flush(vd_node *node, vd_error *err)
{
    nbd_state *s = node->opaque;

    if (!s->can_flush)
        return 0;
    return nbdc_request(node, OP_FLUSH, 0, 0, NULL, 0, NULL, err);
}

/* As QEMU's nbd_client_co_block_status(): the extent of the context at
 * @off, HOLE meaning no data and ZERO zeros, at the same offset of this
 * node; all data when the server has no such context. But where QEMU
 * asks with REQ_ONE, one extent and one round trip per question, this
 * asks about up to NBD_STATUS_SPAN and keeps the answer: a copy or a
 * map walks the extents in order, and a round trip per extent queued
 * behind the reads in flight stalled every worker of a convert, which
 * waits for its next chunk's status (1 GiB with 128 extents from
 * qemu-nbd: 0.3-0.6 s of a 1.1 s read). */
static int nbdc_block_status(vd_node *node, bool want_zero, uint64_t off,
                             uint64_t bytes, uint64_t *pnum, uint64_t *map,
                             vd_node **file, vd_error *err)
{
    nbd_state *s = node->opaque;
    uint32_t align = node->bl.request_alignment;
    uint64_t len, end;
    nbd_req r = { 0 };
    vd_kept_extent *ext;
    vd_status_ask ask;
    int ret;

    (void)want_zero;
    *map = off;
    *file = node;
    if (!s->has_context) {
        *pnum = bytes;
        return VD_BLOCK_DATA | VD_BLOCK_OFFSET_VALID;
    }
    ret = vd_status_keep_lookup(&s->status, off, bytes, align, pnum);
    if (ret >= 0)
        return ret | VD_BLOCK_OFFSET_VALID;

    ext = malloc(VD_STATUS_KEEP_EXTENTS * sizeof(*ext));
    if (!ext)
        return oom(err);
    len = (uint64_t)s->size - off;
    if (len > NBD_STATUS_SPAN)
        len = NBD_STATUS_SPAN;
    vd_status_keep_ask(&s->status, &ask);
    r.ext = ext;
    r.ext_cap = VD_STATUS_KEEP_EXTENTS;
    ret = nbdc_request(node, OP_STATUS, off, len, NULL, 0, &r, err);
    if (ret < 0)
        goto out;
    if (!r.got_extents || r.next == 0) {
        ret = vd_error_set(err, -EIO, "%s: server did not send a block "
                           "status extent", server_name(node));
        goto out;
    }
    /* Nothing past the range asked about. */
    end = off + len;
    for (uint32_t i = 0; i < r.next; i++) {
        if (ext[i].end >= end) {
            ext[i].end = end;
            r.next = i + 1;
            break;
        }
    }
    ret = vd_status_keep_answer(ext, r.next, off, bytes, align, pnum) |
          VD_BLOCK_OFFSET_VALID;
    vd_status_keep_store(&s->status, &ask, off, &ext, r.next);
out:
    free(ext);
    return ret;
}

static int64_t nbdc_getlength(vd_node *node)
{
    nbd_state *s = node->opaque;

    return s->size;
}

/* An export's size is the server's: as QEMU's nbd_co_truncate(), only
 * the size it has is accepted, or (not exact) a smaller one, which
 * changes nothing. */
static int nbdc_truncate(vd_node *node, uint64_t size, bool exact,
                         vd_prealloc prealloc, vd_error *err)
{
    nbd_state *s = node->opaque;

    (void)prealloc;
    if (size != (uint64_t)s->size && exact) {
        return vd_error_set(err, -ENOTSUP, "Cannot resize NBD nodes");
    }
    if (size > (uint64_t)s->size) {
        return vd_error_set(err, -EINVAL, "Cannot grow NBD nodes");
    }
    return 0;
}

/* QEMU's nbd, nbd+tcp and nbd+unix: one driver under three prefixes.
 * Creating an image on an export formats what the server has, as
 * qemu-img does (vd_create_simple()). */
#define NBD_DRIVER_COMMON                                                 \
    .name = "nbd",                                                        \
    .network = true,                                                      \
    .big_requests = true,                                                 \
    .instance_size = sizeof(nbd_state),                                   \
    .open = nbdc_open,                                                     \
    .close = nbdc_close_node,                                              \
    .preadv = nbdc_preadv,                                                 \
    .pwritev = nbdc_pwritev,                                               \
    .pwrite_zeroes = nbdc_pwrite_zeroes,                                   \
    .pdiscard = nbdc_pdiscard,                                             \
    .flush = nbdc_flush,                                                   \
    .block_status = nbdc_block_status,                                     \
    .truncate = nbdc_truncate,                                             \
    .create_opts = vd_create_opts_simple,                                  \
    .create = vd_create_simple,                                            \
    .getlength = nbdc_getlength,                                           \
    .library = &nbd_lib

const vd_driver vd_driver_nbd = {
    NBD_DRIVER_COMMON,
    .protocol_name = "nbd",
};

const vd_driver vd_driver_nbd_tcp = {
    NBD_DRIVER_COMMON,
    .protocol_name = "nbd+tcp",
};

const vd_driver vd_driver_nbd_unix = {
    NBD_DRIVER_COMMON,
    .protocol_name = "nbd+unix",
};
