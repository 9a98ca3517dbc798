/*
 * vdisk's NBD server, internals: what the parts of src/nbd/ share beyond
 * the public interface in include/vdisk/nbd-server.h (which the library
 * exports, and tools/cmd_serve.c and src/qmp/ use like any embedder):
 *
 *   server.c        export registry (also changed at run time by QMP),
 *                   listening sockets, the accept loop, connection
 *                   lifetime, shutdown
 *   handshake.c     fixed newstyle negotiation as a state machine
 *   transmission.c  request parsing and checking, the connection's
 *                   threads, I/O on the export, simple and structured
 *                   replies
 *   tls.c           credentials, TLS sessions, the connection's stream
 *
 * Threads (the whole story): each connection has its own threads, at
 * most the server's per-connection limit, created lazily. The first runs
 * the handshake; in transmission they take turns holding the read mutex,
 * under which one of them reads the next request whole (header and
 * payload) into its own buffer, and then, with the mutex released,
 * performs the request and sends the reply under the send mutex, so
 * replies leave out of order, matched by cookie. While small requests
 * are fast, the thread takes those already received behind its own as
 * one batch and sends their replies in one write. No request is handed
 * from one thread to another. The first thread joins the others before
 * the connection ends. The list of clients belongs to the accept loop's
 * thread alone, which learns of finished connections through a
 * self-pipe; the export list is guarded by the server's export lock.
 */
#ifndef VDISK_NBD_INT_H
#define VDISK_NBD_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vdisk/nbd-server.h"
#include "vdisk/vdisk.h"

typedef struct nbd_export nbd_export;
typedef struct nbd_conn nbd_conn;
typedef struct nbd_worker nbd_worker;

/* One named export: a node opened by the caller, borrowed by the server. */
struct nbd_export {
    char *name;          /* may be "" (the default export) */
    char *description;   /* NULL when none */
    vd_node *node;
    vd_user *user;       /* the export's permissions on @node, as QEMU's
                            export block backend: read (and write), and
                            nobody may resize the node while served */
    vd_blocker *blocker; /* no snapshot revert under the clients */
    uint64_t size;       /* under the export lock: see nbd_export_size() */
    bool read_only;
    atomic_bool alloc_depth; /* offers qemu:allocation-depth (qemu-nbd
                                -A, block-export-add allocation-depth);
                                set after the export is listed, so a
                                handshake may read it meanwhile */
    /* Dirty bitmaps offered as contexts: fixed before the export is
     * listed, marked busy until it is removed (the names stay with the
     * slot, for handshakes that still hold it). */
    struct nbd_export_bitmap {
        vd_node *node;   /* where the bitmap lives (@node or below) */
        char *name;      /* the bitmap's name */
        char *ctx;       /* "qemu:dirty-bitmap:NAME" */
    } *bitmaps;
    size_t nb_bitmaps;
    bool bitmaps_busy;   /* still marked busy: not removed yet */
};

/* At most this many bitmaps per export: a connection's selection is a
 * 64-bit mask. */
#define NBD_MAX_EXPORT_BITMAPS 64

/* A parsed transmission request (host byte order). */
typedef struct nbd_request {
    uint16_t flags;
    uint16_t type;
    uint64_t cookie;
    uint64_t offset;
    uint32_t length;
} nbd_request;

/* What one connection negotiated; the request checker depends only on
 * this, so the fuzz target can drive it without a server. */
typedef struct nbd_caps {
    uint64_t size;       /* export size */
    bool read_only;
    bool structured;     /* NBD_OPT_STRUCTURED_REPLY acknowledged */
    bool ctx_base;       /* base:allocation selected */
    bool ctx_depth;      /* qemu:allocation-depth selected */
    uint64_t ctx_bitmaps; /* bit i: the export's bitmap i selected */
} nbd_caps;

struct nbd_conn {
    vd_nbd_server *srv;
    int in_fd, out_fd;   /* the same socket, except under the fuzzer */

    /* Negotiated in the handshake, read-only afterwards. */
    bool fixed_newstyle;
    bool no_zeroes;
    nbd_export *exp;
    nbd_export *ctx_export;  /* export named by the last SET_META_CONTEXT */
    nbd_caps caps;
    uint16_t tflags;         /* transmission flags sent to the client */

    /* The first fatal error (protocol violation, I/O failure). */
    vd_error err;

    /* Replies: one writer at a time; once a send fails, all do. */
    pthread_mutex_t send_lock;
    atomic_bool send_failed;

    /* Requests: the thread holding read_lock reads the next one. Bytes
     * received but not yet parsed wait in ibuf[ipos, ilen). */
    pthread_mutex_t read_lock;
    bool stopping;           /* no more requests will be read */
    int end;                 /* why: 0 (DISC) or a negative errno */
    unsigned char *ibuf;
    size_t ipos, ilen;
    unsigned max_threads;    /* the first thread included */
    unsigned nthreads;
    nbd_worker *workers;     /* threads beyond the first, joined at the end */
    atomic_uint busy;        /* threads holding a request not yet answered */

    /* Requests carrying more than 64 KiB of data draw on a byte budget
     * while in flight (transmission.c), which bounds their buffers. */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    uint64_t big_bytes;
    /* Buffers of finished large requests, kept for the next ones (a
     * fresh one costs a page fault per 4 KiB); under lock, together
     * with big_bytes at most the budget. */
    struct nbd_big_buf *big_free;
    uint64_t big_free_bytes;

    /* Average time of the recent quick requests (transmission.c,
     * batches); updated without a lock, an estimate. */
    atomic_uint quick_ns;
};

/* One of a connection's threads; its buffer carries a request's payload
 * (WRITE) or data (READ) and is kept between requests up to a bound. */
struct nbd_worker {
    nbd_conn *conn;
    pthread_t thread;
    unsigned char *buf;
    size_t bufsize;
    unsigned char *cork;  /* replies of a batch (transmission.c) */
    nbd_worker *next;
};

/* ---- server.c ---- */

/* The server's credentials, or NULL when it serves plain NBD. */
vd_nbd_tls_creds *nbd_server_tls(const vd_nbd_server *srv);

/* Seconds a client gets for the whole handshake, 0 for no limit. */
unsigned nbd_server_handshake_limit(const vd_nbd_server *srv);

/* The authorization object (authz-simple, authz-list) a TLS client's
 * identity must pass, or NULL. */
const char *nbd_server_tls_authz(const vd_nbd_server *srv);

/* Connections currently in transmission on export @name. */
unsigned nbd_server_export_clients(vd_nbd_server *srv, const char *name);

/* The size of @exp, read under the export lock (a resize may change it
 * at any time). */
uint64_t nbd_export_size(vd_nbd_server *srv, const nbd_export *exp);

/* Finds the export called @name (@len bytes, not NUL-terminated). */
nbd_export *nbd_server_find_export(vd_nbd_server *srv, const char *name,
                                   size_t len);
size_t nbd_server_nb_exports(const vd_nbd_server *srv);

/* The @i-th export, or NULL past the end (exports may be removed while a
 * client lists them). A removed export's name and description stay
 * valid until the server is freed. */
nbd_export *nbd_server_export(vd_nbd_server *srv, size_t i);

/* True once the server has multi-connection semantics to offer: it may
 * have more than one client at a time. */
bool nbd_server_multi_conn(const vd_nbd_server *srv);

/* True once shutdown was requested. */
bool nbd_server_shutting_down(const vd_nbd_server *srv);

/* Serves one connection on (@in_fd, @out_fd) in the calling thread until
 * it ends; the fds are not closed. Used by the accept loop's client
 * threads and by the fuzz target. Returns 0 for a clean end, else the
 * negative errno of the error that ended it. */
int nbd_conn_serve(vd_nbd_server *srv, int in_fd, int out_fd, vd_error *err);
/* nbd_conn_serve(), also telling whether the client got to transmission
 * (qemu-nbd's "negotiated": only such a client ends a server that is not
 * persistent when it leaves; a client that only lists does not). */
int nbd_conn_serve_ex(vd_nbd_server *srv, int in_fd, int out_fd,
                      vd_error *err, bool *negotiated);

/* Reads exactly @len bytes. Returns 0, -EPIPE at end of file (the peer
 * went away) or another negative errno. */
int nbd_read_full(int fd, void *buf, size_t len);

/* Writes the @n buffers completely. Returns 0 or a negative errno. */
int nbd_write_full(int fd, struct iovec *iov, int n);

/* ---- handshake.c ---- */

/* Result of the negotiation. */
enum nbd_hs_result {
    NBD_HS_TRANSMISSION, /* an export was chosen: start transmission */
    NBD_HS_CLOSED,       /* the client aborted cleanly */
    NBD_HS_DEAD,         /* a fatal error, recorded in conn->err */
};

enum nbd_hs_result nbd_handshake(nbd_conn *conn);

/* The transmission flags of @exp for a connection with @structured. */
uint16_t nbd_export_tflags(vd_nbd_server *srv, const nbd_export *exp,
                           bool structured);

/* ---- transmission.c ---- */

/*
 * Checks a request header against what the connection negotiated.
 * Returns 0 when it may run, or the NBD_E* error to reply with (and a
 * static message in *msg). *payload gets the bytes of data that follow
 * the header on the wire and must be read whatever the verdict;
 * *fatal is set when the stream cannot be resynchronised (oversized
 * write payload): reply, then disconnect.
 */
int nbd_request_check(const nbd_request *req, const nbd_caps *caps,
                      uint32_t *payload, bool *fatal, const char **msg);

/* Runs the transmission phase of @conn in the calling thread and the
 * ones it starts, until DISC, end of stream or a fatal error, then joins
 * them (their replies are sent). Returns 0 or a negative errno. */
int nbd_transmission(nbd_conn *conn);

/* Maps a negative errno to the NBD error sent on the wire. */
uint32_t nbd_errno_to_wire(int err);

#endif
