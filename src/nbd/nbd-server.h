/*
 * vdisk's NBD server: the internal interface between the command-line
 * front end (tools/cmd_serve.c) and the three parts of src/nbd/:
 *
 *   server.c        export registry, listening sockets, the accept loop,
 *                   connection lifetime, the shared worker pool, shutdown
 *   handshake.c     fixed newstyle negotiation as a state machine
 *   transmission.c  request parsing and checking, I/O on the export,
 *                   simple and structured replies
 *
 * Threads (the whole story): one reader thread per connection runs the
 * handshake and then parses requests; each request becomes a job on one
 * queue served by a fixed pool of worker threads shared by all
 * connections. A worker performs the I/O through the public vdisk API and
 * sends the reply under the connection's send mutex, so replies leave out
 * of order, matched by cookie. The connection mutex guards only the
 * in-flight accounting the reader waits on (back-pressure and the final
 * drain before the socket closes); the queue mutex guards the job queue.
 * The list of clients belongs to the accept loop's thread alone, which
 * learns of finished readers through a self-pipe. Nothing else is
 * shared.
 */
#ifndef VDISK_NBD_SERVER_H
#define VDISK_NBD_SERVER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vdisk/vdisk.h"

typedef struct nbd_server nbd_server;
typedef struct nbd_export nbd_export;
typedef struct nbd_conn nbd_conn;
typedef struct nbd_job nbd_job;

/* One named export: a node opened by the caller, borrowed by the server. */
struct nbd_export {
    char *name;          /* may be "" (the default export) */
    char *description;   /* NULL when none */
    vd_node *node;
    uint64_t size;
    bool read_only;
};

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
} nbd_caps;

struct nbd_conn {
    nbd_server *srv;
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

    /* In-flight accounting (lock/cond): jobs queued or running and the
     * bytes of payload they hold or will read. */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    unsigned inflight;
    uint64_t inflight_bytes;

};

/* One request on the worker queue. */
struct nbd_job {
    nbd_conn *conn;
    nbd_request req;
    int error;           /* NBD_E* found while checking, 0 if none */
    char *errmsg;        /* its message, or NULL */
    void *data;          /* WRITE payload */
    uint64_t budget;     /* bytes counted in conn->inflight_bytes */
    nbd_job *next;
};

/* ---- server.c ---- */

/*
 * Creates a server. @nworkers threads (0: run every request in the reader
 * thread, for the fuzzer) serve at most @max_clients connections at once
 * (0: unlimited). Without @persistent, nbd_server_run() returns when the
 * last client of at least one has gone. Returns NULL on ENOMEM.
 */
nbd_server *nbd_server_new(unsigned nworkers, unsigned max_clients,
                           bool persistent);

/* Frees the server; it must not be running. Export nodes are borrowed:
 * close them afterwards. */
void nbd_server_free(nbd_server **srv);

/* Adds an export of @node named @name (unique, at most 4096 bytes).
 * Returns 0 or -EINVAL/-EEXIST/-ENOMEM with a message. */
int nbd_server_add_export(nbd_server *srv, const char *name,
                          const char *description, vd_node *node,
                          vd_error *err);

/* Finds the export called @name (@len bytes, not NUL-terminated). */
nbd_export *nbd_server_find_export(nbd_server *srv, const char *name,
                                   size_t len);
size_t nbd_server_nb_exports(const nbd_server *srv);
nbd_export *nbd_server_export(nbd_server *srv, size_t i);

/* True once the server has multi-connection semantics to offer: it may
 * have more than one client at a time. */
bool nbd_server_multi_conn(const nbd_server *srv);

/* True once shutdown was requested. */
bool nbd_server_shutting_down(const nbd_server *srv);

/* Listening sockets; call before nbd_server_run(). A UNIX socket path is
 * unlinked when the server is freed. */
int nbd_server_listen_unix(nbd_server *srv, const char *path, vd_error *err);
int nbd_server_listen_tcp(nbd_server *srv, const char *addr,
                          const char *port, vd_error *err);

/* Starts the worker threads (after any fork()) and serves connections
 * until shutdown is requested or, without persistence, the last client
 * leaves; then finishes in-flight requests and joins every thread.
 * Returns 0 or a negative errno. */
int nbd_server_run(nbd_server *srv, vd_error *err);

/* Asks a running server to stop. Async-signal-safe. */
void nbd_server_request_shutdown(nbd_server *srv);

/* Serves one connection on (@in_fd, @out_fd) in the calling thread until
 * it ends; the fds are not closed. Used by the reader threads and by the
 * fuzz target. Returns 0 for a clean end, else the negative errno of the
 * error that ended it. */
int nbd_conn_serve(nbd_server *srv, int in_fd, int out_fd, vd_error *err);

/* Queues @job for the workers (or runs it now when there are none). */
void nbd_server_submit(nbd_server *srv, nbd_job *job);

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
uint16_t nbd_export_tflags(nbd_server *srv, const nbd_export *exp,
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

/* Runs the transmission phase of @conn until DISC, end of stream or a
 * fatal error, then waits for its jobs. Returns 0 or a negative errno. */
int nbd_transmission(nbd_conn *conn);

/* Performs @job, sends its reply and frees it (called by workers). */
void nbd_job_run(nbd_job *job);

/* Maps a negative errno to the NBD error sent on the wire. */
uint32_t nbd_errno_to_wire(int err);

#endif
