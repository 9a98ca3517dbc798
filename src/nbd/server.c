/*
 * The NBD server's frame: the export registry, listening sockets, the
 * accept loop, connection lifetime and shutdown. Protocol work lives in
 * handshake.c and transmission.c (which also runs a connection's extra
 * threads); the threading model is described in nbd-int.h.
 *
 * Lifetime of a connection: the accept loop (vd_nbd_server_run(), the
 * caller's thread) accepts, links a client into its list and starts the
 * connection's first thread, which runs nbd_conn_serve() and then marks
 * the client finished and pokes the wake pipe. The accept loop joins
 * finished clients, closes their sockets and frees them. Shutdown (a
 * signal handler calling vd_nbd_server_request_shutdown()) stops
 * accepting, shuts the read side of every socket so each connection sees
 * end of stream and finishes the requests it has read, then joins every
 * client.
 *
 * The functions marked VD_API are libvdisk's public NBD interface
 * (include/vdisk/nbd-server.h); the rest is shared with the other files
 * of src/nbd/ through nbd-int.h.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "nbd-proto.h"
#include "nbd-int.h"
#include "tls.h"

#define MAX_LISTEN 8
/* Seconds a client gets to finish the handshake (qemu-nbd's default). */
#define HANDSHAKE_TIMEOUT 10
/* SO_SNDBUF of a UNIX socket client (set_unix_sndbuf()). */
#define NBD_UNIX_SNDBUF (1024 * 1024)

/* An export as the server keeps it: the public part first, so the
 * pointers handed out are the slots themselves. Exports added or removed
 * at run time (QMP) are guarded by elock; a removed slot is parked in the
 * graveyard until the server is freed because a handshake may still hold
 * its name. */
typedef struct export_slot {
    nbd_export pub;  /* pub.user and pub.blocker: released at removal */
    unsigned users;          /* connections in transmission on it */
    bool removed;
    struct export_slot *next_dead;
} export_slot;

/* Releases what an export holds on its node and frees its slot (pub is
 * the slot's first member). */
static void export_free(nbd_export *exp);
/* Unmarks (if still marked) and forgets an export's bitmaps. */
static void export_free_bitmaps(nbd_export *exp);

/* A connection as removal sees it: which export it transmits on. */
typedef struct live_conn {
    nbd_conn *c;
    export_slot *slot;
    struct live_conn *next;
} live_conn;

struct vd_nbd_server {
    nbd_export **exports;
    size_t nb_exports;
    pthread_mutex_t elock;   /* exports, users, live conns */
    pthread_cond_t econd;    /* a slot's users dropped */
    export_slot *graveyard;
    live_conn *live;

    unsigned max_clients;   /* 0: unlimited */
    bool persistent;

    int listen_fds[MAX_LISTEN];
    int nb_listen;
    char *unix_path;        /* unlinked at free */

    int wake[2];            /* self-pipe: shutdown and finished clients */
    atomic_bool shutdown;

    unsigned conn_threads;  /* per connection, at least 1 */

    vd_nbd_tls_creds *tls;  /* set before running, then read-only */
    char *tls_authz;        /* likewise */
    unsigned handshake_limit;   /* seconds, 0: none; likewise */
};

/* ---- low-level I/O ---- */

int nbd_read_full(int fd, void *buf, size_t len)
{
    char *p = buf;

    while (len) {
        ssize_t n = read(fd, p, len);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            /* The handshake timeout shows up as EAGAIN. */
            return errno == EAGAIN ? -ETIMEDOUT : -errno;
        }
        if (n == 0) {
            return -EPIPE;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int nbd_write_full(int fd, struct iovec *iov, int n)
{
    while (n > 0) {
        ssize_t w = writev(fd, iov, n > IOV_MAX ? IOV_MAX : n);
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

/* ---- exports ---- */

static nbd_export *nbd_server_find_export_locked(vd_nbd_server *srv,
                                                 const char *name, size_t len)
{
    for (size_t i = 0; i < srv->nb_exports; i++) {
        nbd_export *e = srv->exports[i];
        if (strlen(e->name) == len && memcmp(e->name, name, len) == 0) {
            return e;
        }
    }
    return NULL;
}

VD_API vd_nbd_server *vd_nbd_server_new(unsigned nworkers,
                                        unsigned max_clients,
                                        bool persistent)
{
    vd_nbd_server *srv = calloc(1, sizeof(*srv));

    if (!srv) {
        return NULL;
    }
    srv->conn_threads = nworkers ? nworkers : 1;
    srv->max_clients = max_clients;
    srv->persistent = persistent;
    srv->handshake_limit = HANDSHAKE_TIMEOUT;
    srv->wake[0] = srv->wake[1] = -1;
    if (pipe2(srv->wake, O_CLOEXEC | O_NONBLOCK) < 0) {
        free(srv);
        return NULL;
    }
    pthread_mutex_init(&srv->elock, NULL);
    pthread_cond_init(&srv->econd, NULL);
    return srv;
}

VD_API void vd_nbd_server_set_tls(vd_nbd_server *srv,
                                  vd_nbd_tls_creds *creds)
{
    vd_nbd_tls_creds_unref(srv->tls);
    srv->tls = creds;
}

vd_nbd_tls_creds *nbd_server_tls(const vd_nbd_server *srv)
{
    return srv->tls;
}

VD_API int vd_nbd_server_set_tls_authz(vd_nbd_server *srv, const char *id)
{
    char *copy = id ? strdup(id) : NULL;

    if (id && !copy) {
        return -ENOMEM;
    }
    free(srv->tls_authz);
    srv->tls_authz = copy;
    return 0;
}

const char *nbd_server_tls_authz(const vd_nbd_server *srv)
{
    return srv->tls_authz;
}

VD_API void vd_nbd_server_set_handshake_limit(vd_nbd_server *srv,
                                              unsigned seconds)
{
    srv->handshake_limit = seconds;
}

unsigned nbd_server_handshake_limit(const vd_nbd_server *srv)
{
    return srv->handshake_limit;
}

VD_API void vd_nbd_server_free(vd_nbd_server **psrv)
{
    vd_nbd_server *srv = *psrv;

    if (!srv) {
        return;
    }
    for (int i = 0; i < srv->nb_listen; i++) {
        close(srv->listen_fds[i]);
    }
    if (srv->unix_path) {
        unlink(srv->unix_path);
        free(srv->unix_path);
    }
    for (size_t i = 0; i < srv->nb_exports; i++) {
        export_free(srv->exports[i]);
    }
    free(srv->exports);
    while (srv->graveyard) {
        export_slot *d = srv->graveyard;
        srv->graveyard = d->next_dead;
        export_free_bitmaps(&d->pub);
        free(d->pub.name);
        free(d->pub.description);
        free(d);
    }
    vd_nbd_tls_creds_unref(srv->tls);
    free(srv->tls_authz);
    pthread_mutex_destroy(&srv->elock);
    pthread_cond_destroy(&srv->econd);
    close(srv->wake[0]);
    close(srv->wake[1]);
    free(srv);
    *psrv = NULL;
}

/* Lets go of the busy marks on the export's bitmaps (once). */
static void export_release_bitmaps(nbd_export *exp)
{
    if (!exp->bitmaps_busy) {
        return;
    }
    for (size_t i = 0; i < exp->nb_bitmaps; i++) {
        vd_bitmap_set_busy(exp->bitmaps[i].node, exp->bitmaps[i].name, false,
                           NULL);
    }
    exp->bitmaps_busy = false;
}

static void export_free_bitmaps(nbd_export *exp)
{
    export_release_bitmaps(exp);
    for (size_t i = 0; i < exp->nb_bitmaps; i++) {
        free(exp->bitmaps[i].name);
        free(exp->bitmaps[i].ctx);
    }
    free(exp->bitmaps);
    exp->bitmaps = NULL;
    exp->nb_bitmaps = 0;
}

static void export_free(nbd_export *exp)
{
    export_free_bitmaps(exp);
    if (exp->blocker) {
        vd_op_unblock(exp->node, VD_OP_SNAPSHOT_GOTO, exp->blocker);
        vd_blocker_free(&exp->blocker);
    }
    vd_user_free(&exp->user);
    free(exp->name);
    free(exp->description);
    free(exp);
}

/*
 * Takes the export's permissions on @node as QEMU does: first read (and
 * write) sharing everything, then resize unshared, so the conflicts are
 * found and worded in the same order as qemu-storage-daemon's.
 */
static int export_take_perms(nbd_export *exp, vd_error *err)
{
    unsigned perm = VD_PERM_CONSISTENT_READ |
                    (exp->read_only ? 0 : VD_PERM_WRITE);
    int r = vd_user_new(&exp->user, exp->node, NULL, perm, VD_PERM_ALL,
                        err);

    if (r == 0) {
        r = vd_user_set_perm(exp->user, perm,
                             VD_PERM_ALL & ~VD_PERM_RESIZE, err);
    }
    if (r == 0) {
        exp->blocker = vd_blocker_new("node is exported as '%s'",
                                      exp->name);
        if (!exp->blocker ||
            vd_op_block(exp->node, VD_OP_SNAPSHOT_GOTO, exp->blocker) < 0) {
            vd_blocker_free(&exp->blocker);
            r = vd_error_set(err, -ENOMEM, "out of memory");
        }
    }
    return r;
}

/*
 * Finds, checks and marks busy the bitmaps @o offers, as QEMU's
 * nbd_export_create(): every bitmap is found and checked before any is
 * marked, so a refusal leaves them all as they were.
 */
static int export_bind_bitmaps(nbd_export *exp, const vd_nbd_export_opts *o,
                               vd_error *err)
{
    size_t n = o->nb_bitmaps, i;
    int r = 0;

    if (n == 0) {
        return 0;
    }
    if (n > NBD_MAX_EXPORT_BITMAPS) {
        return vd_error_set(err, -EINVAL, "export '%s': at most %d dirty "
                            "bitmaps can be exported", exp->name,
                            NBD_MAX_EXPORT_BITMAPS);
    }
    exp->bitmaps = calloc(n, sizeof(*exp->bitmaps));
    if (!exp->bitmaps) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    exp->nb_bitmaps = n;
    for (i = 0; i < n && r == 0; i++) {
        const vd_bitmap_ref *ref = &o->bitmaps[i];
        struct nbd_export_bitmap *b = &exp->bitmaps[i];
        vd_bitmap_info info;

        b->node = ref->node ? ref->node : vd_bitmap_find(exp->node, ref->name);
        if (!b->node) {
            r = vd_error_set(err, -ENOENT, "Bitmap '%s' is not found",
                             ref->name);
            break;
        }
        r = vd_bitmap_get_info(b->node, ref->name, &info, err);
        if (r < 0) {
            break;
        }
        free(info.name);
        if (info.busy) {
            r = vd_error_set(err, -EINVAL, "Bitmap '%s' is currently in use "
                             "by another operation and cannot be used",
                             ref->name);
        } else if (info.inconsistent) {
            r = vd_error_set(err, -EINVAL, "Bitmap '%s' is inconsistent and "
                             "cannot be used", ref->name);
            if (err) {
                snprintf(err->hint, sizeof(err->hint), "Try "
                         "block-dirty-bitmap-remove to delete this bitmap "
                         "from disk");
            }
        } else if (exp->read_only && !vd_node_is_read_only(exp->node) &&
                   info.recording) {
            r = vd_error_set(err, -EINVAL, "Enabled bitmap '%s' "
                             "incompatible with readonly export", ref->name);
        } else {
            b->name = strdup(ref->name);
            if (!b->name || asprintf(&b->ctx, "%s%s", NBD_CTX_DIRTY_BITMAP,
                                     ref->name) < 0) {
                b->ctx = NULL;
                r = vd_error_set(err, -ENOMEM, "out of memory");
            }
        }
    }
    /* Busy only once all passed; set_busy fails only for what was
     * checked above, which the graph lock of the caller keeps true. */
    for (i = 0; i < n && r == 0; i++) {
        r = vd_bitmap_set_busy(exp->bitmaps[i].node, exp->bitmaps[i].name,
                               true, err);
        if (r < 0) {
            while (i-- > 0) {
                vd_bitmap_set_busy(exp->bitmaps[i].node,
                                   exp->bitmaps[i].name, false, NULL);
            }
            break;
        }
    }
    exp->bitmaps_busy = r == 0;
    return r;
}

VD_API int vd_nbd_server_add_export(vd_nbd_server *srv, const char *name,
                                    const char *description, vd_node *node,
                                    vd_error *err)
{
    return vd_nbd_server_add_export_ro(srv, name, description, node,
                                       vd_node_is_read_only(node), err);
}

VD_API int vd_nbd_server_add_export_ro(vd_nbd_server *srv, const char *name,
                                       const char *description, vd_node *node,
                                       bool read_only, vd_error *err)
{
    vd_nbd_export_opts o = {
        .name = name, .description = description, .node = node,
        .read_only = read_only,
    };

    return vd_nbd_server_add_export_opts(srv, &o, err);
}

VD_API int vd_nbd_server_add_export_opts(vd_nbd_server *srv,
                                         const vd_nbd_export_opts *o,
                                         vd_error *err)
{
    const char *name = o->name, *description = o->description;
    vd_node *node = o->node;
    export_slot *slot;
    nbd_export *exp, **nv;
    int64_t size;

    if (strlen(name) > NBD_MAX_STRING) {
        return vd_error_set(err, -EINVAL, "export name '%.40s...' is longer "
                            "than %d bytes", name, NBD_MAX_STRING);
    }
    if (description && strlen(description) > NBD_MAX_STRING) {
        return vd_error_set(err, -EINVAL, "description of export '%s' is "
                            "longer than %d bytes", name, NBD_MAX_STRING);
    }
    size = vd_getlength(node);
    if (size < 0) {
        return vd_error_set_errno(err, (int)size, "%s: cannot get length",
                                  vd_node_filename(node));
    }
    slot = calloc(1, sizeof(*slot));
    if (!slot) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    exp = &slot->pub;
    exp->name = strdup(name);
    exp->description = description ? strdup(description) : NULL;
    if (!exp->name || (description && !exp->description)) {
        free(exp->name);
        free(exp->description);
        free(slot);
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    exp->node = node;
    exp->size = (uint64_t)size;
    exp->read_only = o->read_only || vd_node_is_read_only(node);
    atomic_init(&exp->alloc_depth, o->allocation_depth);

    /* A duplicate name is reported before a permission conflict, as
     * qemu-storage-daemon does; exports change only on the caller's
     * thread, so the name cannot be taken in between. */
    pthread_mutex_lock(&srv->elock);
    bool dup = nbd_server_find_export_locked(srv, name, strlen(name));
    pthread_mutex_unlock(&srv->elock);
    int r = dup ? vd_error_set(err, -EEXIST, "export name '%s' is used "
                               "twice", name)
                : export_take_perms(exp, err);
    if (r == 0) {
        r = export_bind_bitmaps(exp, o, err);
    }
    if (r < 0) {
        export_free(exp);
        return r;
    }

    pthread_mutex_lock(&srv->elock);
    nv = realloc(srv->exports, (srv->nb_exports + 1) * sizeof(*nv));
    if (!nv) {
        pthread_mutex_unlock(&srv->elock);
        export_free(exp);
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    srv->exports = nv;
    srv->exports[srv->nb_exports++] = exp;
    pthread_mutex_unlock(&srv->elock);
    return 0;
}

/* Whether some connection on @slot has a client that is still there:
 * its socket is open and idle, as opposed to one whose client has closed
 * it (end of stream) or has sent what may be its last request (a
 * disconnect), which the connection's thread is about to finish. Peeking
 * takes nothing from the socket. Called with elock held. */
static bool slot_has_live_client(vd_nbd_server *srv, export_slot *slot)
{
    for (live_conn *l = srv->live; l; l = l->next) {
        char b;
        if (l->slot != slot) {
            continue;
        }
        ssize_t n = recv(l->c->in_fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return true;
        }
    }
    return false;
}

VD_API int vd_nbd_server_remove_export(vd_nbd_server *srv, const char *name,
                                       bool hard, vd_error *err)
{
    export_slot *slot = NULL;
    size_t i;

    pthread_mutex_lock(&srv->elock);
    for (i = 0; i < srv->nb_exports; i++) {
        if (strcmp(srv->exports[i]->name, name) == 0) {
            slot = (export_slot *)srv->exports[i];
            break;
        }
    }
    if (!slot) {
        pthread_mutex_unlock(&srv->elock);
        return vd_error_set(err, -ENOENT, "export '%s' not found", name);
    }
    /* A client that has just disconnected (qemu-io, qemu-img at exit)
     * may still count as a user for the moment its connection's thread
     * takes to finish; QEMU's event loop has seen the disconnection by
     * the time it reads the next QMP command. So safe mode waits (at most
     * 5 s) for connections whose client is gone, and refuses at once
     * when a client is still there. */
    for (int waited = 0; slot->users && !hard; waited += 50) {
        if (slot_has_live_client(srv, slot) || waited >= 5000) {
            pthread_mutex_unlock(&srv->elock);
            return vd_error_set(err, -EBUSY, "export '%s' still in use",
                                name);
        }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 50 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&srv->econd, &srv->elock, &ts);
    }
    /* Unlisted first, so no new client can pick it while we wait. */
    memmove(&srv->exports[i], &srv->exports[i + 1],
            (srv->nb_exports - i - 1) * sizeof(*srv->exports));
    srv->nb_exports--;
    slot->removed = true;
    /* Shutting the socket makes the reading thread see end of stream;
     * the connection answers the requests it has read, then leaves
     * transmission. */
    for (live_conn *l = srv->live; l; l = l->next) {
        if (l->slot == slot) {
            shutdown(l->c->in_fd, SHUT_RDWR);
        }
    }
    while (slot->users) {
        pthread_cond_wait(&srv->econd, &srv->elock);
    }
    slot->next_dead = srv->graveyard;
    srv->graveyard = slot;
    pthread_mutex_unlock(&srv->elock);
    /* No connection uses the node any more: its permissions go now (the
     * name stays for clients that still list exports). */
    if (slot->pub.blocker) {
        vd_op_unblock(slot->pub.node, VD_OP_SNAPSHOT_GOTO, slot->pub.blocker);
        vd_blocker_free(&slot->pub.blocker);
    }
    vd_user_free(&slot->pub.user);
    export_release_bitmaps(&slot->pub);
    return 0;
}

VD_API int vd_nbd_server_set_allocation_depth(vd_nbd_server *srv,
                                              const char *name, bool on,
                                              vd_error *err)
{
    nbd_export *e;

    pthread_mutex_lock(&srv->elock);
    e = nbd_server_find_export_locked(srv, name, strlen(name));
    if (e) {
        atomic_store(&e->alloc_depth, on);
    }
    pthread_mutex_unlock(&srv->elock);
    return e ? 0 : vd_error_set(err, -ENOENT, "export '%s' not found", name);
}

VD_API void vd_nbd_server_update_export_size(vd_nbd_server *srv,
                                             vd_node *node)
{
    int64_t size = vd_getlength(node);

    if (size < 0) {
        return;
    }
    pthread_mutex_lock(&srv->elock);
    for (size_t i = 0; i < srv->nb_exports; i++) {
        if (srv->exports[i]->node == node) {
            srv->exports[i]->size = (uint64_t)size;
        }
    }
    pthread_mutex_unlock(&srv->elock);
}

unsigned nbd_server_export_clients(vd_nbd_server *srv, const char *name)
{
    unsigned n = 0;

    pthread_mutex_lock(&srv->elock);
    for (size_t i = 0; i < srv->nb_exports; i++) {
        if (strcmp(srv->exports[i]->name, name) == 0) {
            n = ((export_slot *)srv->exports[i])->users;
        }
    }
    pthread_mutex_unlock(&srv->elock);
    return n;
}

nbd_export *nbd_server_find_export(vd_nbd_server *srv, const char *name,
                                   size_t len)
{
    nbd_export *e;

    pthread_mutex_lock(&srv->elock);
    e = nbd_server_find_export_locked(srv, name, len);
    pthread_mutex_unlock(&srv->elock);
    return e;
}

VD_API bool vd_nbd_server_has_export(vd_nbd_server *srv, const char *name)
{
    return nbd_server_find_export(srv, name, strlen(name)) != NULL;
}

size_t nbd_server_nb_exports(const vd_nbd_server *srv)
{
    size_t n;

    pthread_mutex_lock((pthread_mutex_t *)&srv->elock);
    n = srv->nb_exports;
    pthread_mutex_unlock((pthread_mutex_t *)&srv->elock);
    return n;
}

nbd_export *nbd_server_export(vd_nbd_server *srv, size_t i)
{
    nbd_export *e;

    pthread_mutex_lock(&srv->elock);
    e = i < srv->nb_exports ? srv->exports[i] : NULL;
    pthread_mutex_unlock(&srv->elock);
    return e;
}

uint64_t nbd_export_size(vd_nbd_server *srv, const nbd_export *exp)
{
    uint64_t size;

    pthread_mutex_lock(&srv->elock);
    size = exp->size;
    pthread_mutex_unlock(&srv->elock);
    return size;
}

bool nbd_server_multi_conn(const vd_nbd_server *srv)
{
    return srv->max_clients != 1;
}

bool nbd_server_shutting_down(const vd_nbd_server *srv)
{
    return atomic_load(&srv->shutdown);
}

/* ---- listening ---- */

VD_API int vd_nbd_server_listen_unix(vd_nbd_server *srv, const char *path,
                                     vd_error *err)
{
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    struct stat st;
    int fd;

    if (srv->nb_listen >= MAX_LISTEN) {
        return vd_error_set(err, -EINVAL, "too many listening sockets");
    }
    if (strlen(path) >= sizeof(sun.sun_path)) {
        return vd_error_set(err, -ENAMETOOLONG, "%s: socket path too long",
                            path);
    }
    strcpy(sun.sun_path, path);
    /* A socket left by a previous server would make bind fail; anything
     * else at that path is not ours to remove. */
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) {
        unlink(path);
    }
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return vd_error_set_errno(err, -errno, "%s: cannot create socket",
                                  path);
    }
    if (bind(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0 ||
        listen(fd, 64) < 0) {
        int e = -errno;
        close(fd);
        return vd_error_set_errno(err, e, "%s: cannot listen", path);
    }
    free(srv->unix_path);
    srv->unix_path = strdup(path);
    srv->listen_fds[srv->nb_listen++] = fd;
    return 0;
}

VD_API int vd_nbd_server_listen_tcp(vd_nbd_server *srv, const char *addr,
                                    const char *port, vd_error *err)
{
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC,
        .ai_socktype = SOCK_STREAM,
        .ai_flags = AI_PASSIVE,
    };
    struct addrinfo *res, *ai;
    int r, last = 0, bound = 0;

    r = getaddrinfo(addr, port, &hints, &res);
    if (r != 0) {
        return vd_error_set(err, -EINVAL, "address resolution failed for %s:%s: %s",
                            addr ? addr : "*", port, gai_strerror(r));
    }
    for (ai = res; ai && srv->nb_listen < MAX_LISTEN; ai = ai->ai_next) {
        int one = 1;
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC,
                        ai->ai_protocol);
        if (fd < 0) {
            last = -errno;
            continue;
        }
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (ai->ai_family == AF_INET6) {
            /* Each family gets its own socket from getaddrinfo. */
            setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
        }
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 ||
            listen(fd, 64) < 0) {
            last = -errno;
            close(fd);
            continue;
        }
        srv->listen_fds[srv->nb_listen++] = fd;
        bound++;
    }
    freeaddrinfo(res);
    if (!bound) {
        return vd_error_set_errno(err, last ? last : -EADDRNOTAVAIL,
                                  "%s:%s: cannot listen", addr ? addr : "*",
                                  port);
    }
    return 0;
}

/* ---- connections ---- */

static void wake(vd_nbd_server *srv)
{
    char b = 0;
    /* A full pipe already guarantees a wake-up. */
    if (write(srv->wake[1], &b, 1) < 0) {
        return;
    }
}

int nbd_conn_serve(vd_nbd_server *srv, int in_fd, int out_fd, vd_error *err)
{
    bool negotiated;

    return nbd_conn_serve_ex(srv, in_fd, out_fd, err, &negotiated);
}

int nbd_conn_serve_ex(vd_nbd_server *srv, int in_fd, int out_fd,
                      vd_error *err, bool *negotiated)
{
    /* Allocated by tls.c, which keeps the TLS session beside it. */
    nbd_conn *c = nbd_conn_alloc();
    struct timeval tv = { .tv_sec = srv->handshake_limit };
    struct timeval zero = { 0 };
    int ret = 0;

    if (!c) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    c->srv = srv;
    c->in_fd = in_fd;
    c->out_fd = out_fd;
    c->max_threads = srv->conn_threads;
    c->nthreads = 1;
    pthread_mutex_init(&c->send_lock, NULL);
    pthread_mutex_init(&c->read_lock, NULL);
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->cond, NULL);

    *negotiated = false;
    /* Bound the handshake so a silent client cannot hold a slot (a zero
     * timeout is none: --handshake-limit=0); on a non-socket (the
     * fuzzer's pipe) this harmlessly fails. */
    setsockopt(in_fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    switch (nbd_handshake(c)) {
    case NBD_HS_TRANSMISSION: {
        /* Count the connection on its export so that a run-time removal
         * can wait for it; an export removed during the handshake ends
         * the connection here. */
        live_conn lc = { .c = c, .slot = (export_slot *)c->exp };
        *negotiated = true;
        pthread_mutex_lock(&srv->elock);
        if (lc.slot->removed) {
            pthread_mutex_unlock(&srv->elock);
            break;
        }
        lc.slot->users++;
        lc.next = srv->live;
        srv->live = &lc;
        pthread_mutex_unlock(&srv->elock);
        setsockopt(in_fd, SOL_SOCKET, SO_RCVTIMEO, &zero, sizeof(zero));
        ret = nbd_transmission(c);
        pthread_mutex_lock(&srv->elock);
        for (live_conn **pp = &srv->live; *pp; pp = &(*pp)->next) {
            if (*pp == &lc) {
                *pp = lc.next;
                break;
            }
        }
        lc.slot->users--;
        pthread_cond_broadcast(&srv->econd);
        pthread_mutex_unlock(&srv->elock);
        break;
    }
    case NBD_HS_CLOSED:
        break;
    case NBD_HS_DEAD:
        ret = c->err.code ? c->err.code : -EIO;
        break;
    }
    if (err && vd_error_is_set(&c->err)) {
        vd_error_set(err, c->err.code, "%s", c->err.message);
    }
    pthread_mutex_destroy(&c->send_lock);
    pthread_mutex_destroy(&c->read_lock);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
    nbd_conn_release(c);
    return ret;
}

/* One accepted client, as the accept loop tracks it. */
typedef struct client {
    vd_nbd_server *srv;
    int fd;
    pthread_t thread;
    atomic_bool finished;
    bool negotiated;         /* written before finished is set */
    struct client *next;
} client;

static void *client_main(void *opaque)
{
    client *cl = opaque;
    vd_error err = VD_ERROR_INIT;
    int r;

    r = nbd_conn_serve_ex(cl->srv, cl->fd, cl->fd, &err, &cl->negotiated);
    /* Clients that simply hang up are not worth a message. The program's
     * name starts it, as QEMU's tools do (qemu-nbd, or the embedder's). */
    if (r < 0 && r != -EPIPE && r != -ECONNRESET && err.message[0]) {
        fprintf(stderr, "%s: %s\n", program_invocation_short_name,
                err.message);
    }
    atomic_store(&cl->finished, true);
    wake(cl->srv);
    return NULL;
}

VD_API void vd_nbd_server_request_shutdown(vd_nbd_server *srv)
{
    atomic_store(&srv->shutdown, true);
    wake(srv);
}

/* Joins and frees finished clients; returns how many remain. Sets
 * @*negotiated_left when one of those that left had reached
 * transmission. */
static unsigned reap(client **list, bool *negotiated_left)
{
    unsigned n = 0;

    for (client **pp = list; *pp;) {
        client *cl = *pp;
        if (atomic_load(&cl->finished)) {
            pthread_join(cl->thread, NULL);
            *negotiated_left |= cl->negotiated;
            close(cl->fd);
            *pp = cl->next;
            free(cl);
        } else {
            n++;
            pp = &cl->next;
        }
    }
    return n;
}

/*
 * A UNIX socket's send buffer bounds the bytes waiting in the client's
 * receive queue (about 208 KiB by default): a 1 MiB read reply then
 * leaves in five pieces, each a wake-up of the client and of the
 * sending thread. With room for a whole reply the client reads it in
 * one go and spends about a third less CPU per MiB (fio, 1 MiB reads at
 * queue depth 4, docs/nbd.md). TCP sockets keep the kernel's automatic
 * sizing, which a fixed size would turn off.
 */
static void set_unix_sndbuf(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    int size = NBD_UNIX_SNDBUF;

    if (getsockname(fd, (struct sockaddr *)&ss, &len) == 0 &&
        ss.ss_family == AF_UNIX) {
        /* The kernel doubles it, within net.core.wmem_max. */
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
    }
}

/* Accepts a client on @lfd and starts its first thread; false if none. */
static bool accept_one(vd_nbd_server *srv, int lfd, client **list)
{
    int one = 1;
    client *cl;
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);

    if (fd < 0) {
        return false;   /* the client gave up, or a transient error */
    }
    /* Replies are written whole; Nagle would only delay them. Fails
     * harmlessly on UNIX sockets. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    set_unix_sndbuf(fd);
    cl = calloc(1, sizeof(*cl));
    if (!cl) {
        close(fd);
        return false;
    }
    cl->srv = srv;
    cl->fd = fd;
    if (pthread_create(&cl->thread, NULL, client_main, cl) != 0) {
        close(fd);
        free(cl);
        return false;
    }
    cl->next = *list;
    *list = cl;
    return true;
}

VD_API int vd_nbd_server_run(vd_nbd_server *srv, vd_error *err)
{
    client *clients = NULL;
    unsigned nb = 0;
    int r = 0;

    while (!atomic_load(&srv->shutdown)) {
        struct pollfd pfd[MAX_LISTEN + 1];
        int n = 0;
        bool room = srv->max_clients == 0 || nb < srv->max_clients;

        pfd[n++] = (struct pollfd){ .fd = srv->wake[0], .events = POLLIN };
        /* At the client limit new connections wait in the backlog, as
         * with qemu-nbd --shared. */
        for (int i = 0; room && i < srv->nb_listen; i++) {
            pfd[n++] = (struct pollfd){ .fd = srv->listen_fds[i],
                                        .events = POLLIN };
        }
        if (poll(pfd, (nfds_t)n, -1) < 0 && errno != EINTR) {
            r = vd_error_set_errno(err, -errno, "poll failed");
            break;
        }
        if (pfd[0].revents & POLLIN) {
            char buf[64];
            while (read(srv->wake[0], buf, sizeof(buf)) > 0) {
            }
        }
        /* As qemu-nbd: a server that is not persistent ends when the
         * last client leaves, counting only clients that got as far as
         * transmission (one that listed the exports and left does not
         * end it). */
        bool negotiated_left = false;
        nb = reap(&clients, &negotiated_left);
        if (!srv->persistent && negotiated_left && nb == 0) {
            break;
        }
        for (int i = 1; i < n; i++) {
            if ((pfd[i].revents & POLLIN) && !atomic_load(&srv->shutdown)) {
                nb += accept_one(srv, pfd[i].fd, &clients);
            }
        }
    }

    /* Stop accepting, then let every connection finish what it has read. */
    atomic_store(&srv->shutdown, true);
    for (int i = 0; i < srv->nb_listen; i++) {
        close(srv->listen_fds[i]);
    }
    srv->nb_listen = 0;
    for (client *cl = clients; cl; cl = cl->next) {
        shutdown(cl->fd, SHUT_RD);
    }
    for (client *cl = clients; cl; cl = cl->next) {
        pthread_join(cl->thread, NULL);
        atomic_store(&cl->finished, true);
    }
    while (clients) {
        client *cl = clients;
        clients = cl->next;
        close(cl->fd);
        free(cl);
    }
    return r;
}
