/*
 * The QMP wire protocol (../shared/specs/qmp-spec.rst) on UNIX sockets,
 * and the daemon's life cycle.
 *
 * Each monitor socket has an accept thread; each client gets a thread
 * that sends the greeting, then reads one JSON object per line (at most
 * QMP_MAX_LINE bytes: longer lines are answered with an error and
 * skipped), checks the request's envelope as QEMU's dispatcher does,
 * runs the command under the daemon's big lock and writes the reply.
 * Commands other than qmp_capabilities are refused until the client has
 * negotiated; events go only to negotiated clients.
 *
 * Shutdown: `quit` or a signal pokes the wake pipe; qmp_daemon_run()
 * then announces SHUTDOWN, stops the listeners and clients (shutting
 * their sockets wakes the blocked threads), stops the NBD server with
 * its exports, and closes the nodes.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include "vdisk/job.h"
#include "vdisk/nbd-server.h"
#include "qmp-int.h"

#define QMP_MAX_LINE (1u << 20)

struct qmp_client {
    qmp_daemon *d;
    int fd;
    pthread_t thread;
    pthread_mutex_t send_lock;
    bool negotiated;            /* read by event senders under mon_lock */
    atomic_bool finished;
    qmp_client *next;
};

struct qmp_listener {
    qmp_daemon *d;
    int fd;
    char *path;
    pthread_t thread;
    qmp_listener *next;
};

/* ---- sending ---- */

/* Writes @obj as one line; consumes it. Failures mean the client left:
 * its reader will notice. */
static void send_obj(qmp_client *c, json_object *obj)
{
    const char *s = json_object_to_json_string_ext(
        obj, JSON_C_TO_STRING_SPACED | JSON_C_TO_STRING_NOSLASHESCAPE);
    size_t len = strlen(s);
    struct iovec iov[2] = {
        { (void *)s, len },
        { (void *)"\n", 1 },
    };
    struct msghdr mh = { .msg_iov = iov, .msg_iovlen = 2 };

    pthread_mutex_lock(&c->send_lock);
    while (mh.msg_iovlen) {
        ssize_t w = sendmsg(c->fd, &mh, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            break;
        }
        while (mh.msg_iovlen && (size_t)w >= mh.msg_iov[0].iov_len) {
            w -= (ssize_t)mh.msg_iov[0].iov_len;
            mh.msg_iov++;
            mh.msg_iovlen--;
        }
        if (mh.msg_iovlen) {
            mh.msg_iov[0].iov_base = (char *)mh.msg_iov[0].iov_base + w;
            mh.msg_iov[0].iov_len -= (size_t)w;
        }
    }
    pthread_mutex_unlock(&c->send_lock);
    json_object_put(obj);
}

static void send_error(qmp_client *c, json_object *id, const char *cls,
                       const char *desc)
{
    json_object *r = json_object_new_object();
    json_object *err = json_object_new_object();

    if (id) {
        json_object_object_add(r, "id", json_object_get(id));
    }
    json_object_object_add(err, "class", json_object_new_string(cls));
    json_object_object_add(err, "desc", json_object_new_string(desc));
    json_object_object_add(r, "error", err);
    send_obj(c, r);
}

void qmp_emit_event(qmp_daemon *d, const char *name, json_object *data)
{
    struct timeval tv;
    json_object *ev = json_object_new_object();
    json_object *ts = json_object_new_object();

    gettimeofday(&tv, NULL);
    json_object_object_add(ts, "seconds", json_object_new_int64(tv.tv_sec));
    json_object_object_add(ts, "microseconds",
                           json_object_new_int64(tv.tv_usec));
    json_object_object_add(ev, "timestamp", ts);
    json_object_object_add(ev, "event", json_object_new_string(name));
    if (data) {
        json_object_object_add(ev, "data", data);
    }
    pthread_mutex_lock(&d->mon_lock);
    for (qmp_client *c = d->clients; c; c = c->next) {
        if (c->negotiated && !atomic_load(&c->finished)) {
            send_obj(c, json_object_get(ev));
        }
    }
    pthread_mutex_unlock(&d->mon_lock);
    json_object_put(ev);
}

/* ---- dispatch ---- */

json_object *qmp_daemon_execute(qmp_daemon *d, const char *name,
                                json_object *args, bool keyval, qmp_error *e)
{
    const qmp_cmd *cmd = qmp_find_command(name);
    json_object *own = NULL, *ret;

    if (!cmd) {
        return qmp_fail(e, "CommandNotFound",
                        "The command %s has not been found", name);
    }
    /* Keyval conversion rewrites members, and a missing arguments object
     * is an empty one: work on a private copy. */
    if (args) {
        if (json_object_deep_copy(args, &own, NULL) < 0) {
            return qmp_fail(e, NULL, "out of memory");
        }
    } else {
        own = json_object_new_object();
    }
    if (qmp_check_args(own, cmd->args, "", keyval, e) < 0) {
        json_object_put(own);
        return NULL;
    }
    pthread_mutex_lock(&d->lock);
    if (atomic_load(&d->quitting) && strcmp(name, "quit") != 0) {
        ret = qmp_fail(e, NULL, "The daemon is shutting down");
    } else {
        d->keyval = keyval;
        /* Jobs change the graph under the library's graph lock: no
         * command runs while one does (include/vdisk/job.h). */
        vd_graph_lock();
        ret = cmd->fn(d, own, e);
        vd_graph_unlock();
    }
    pthread_mutex_unlock(&d->lock);
    json_object_put(own);
    return ret;
}

/* Handles one request line from @c. */
static void handle_line(qmp_client *c, const char *line, size_t len)
{
    json_tokener *tok = json_tokener_new();
    json_object *req, *id = NULL, *exec = NULL, *args = NULL, *ret;
    enum json_tokener_error jerr;
    qmp_error e = { 0 };
    const char *name;

    if (!tok) {
        send_error(c, NULL, "GenericError", "out of memory");
        return;
    }
    req = json_tokener_parse_ex(tok, line, (int)len);
    jerr = json_tokener_get_error(tok);
    if (!req && jerr == json_tokener_continue) {
        json_tokener_free(tok);
        send_error(c, NULL, "GenericError",
                   "JSON parse error, unexpected end of input");
        return;
    }
    if (jerr != json_tokener_success) {
        char msg[256];
        snprintf(msg, sizeof(msg), "JSON parse error, %s",
                 json_tokener_error_desc(jerr));
        json_tokener_free(tok);
        json_object_put(req);
        send_error(c, NULL, "GenericError", msg);
        return;
    }
    if (json_tokener_get_parse_end(tok) < len) {
        /* Trailing text after the object on the same line. */
        const char *rest = line + json_tokener_get_parse_end(tok);
        while (*rest == ' ' || *rest == '\t' || *rest == '\r') {
            rest++;
        }
        if (rest < line + len) {
            json_tokener_free(tok);
            json_object_put(req);
            send_error(c, NULL, "GenericError",
                       "JSON parse error, one JSON value per line");
            return;
        }
    }
    json_tokener_free(tok);

    if (!json_object_is_type(req, json_type_object)) {
        json_object_put(req);
        send_error(c, NULL, "GenericError", "QMP input must be a JSON object");
        return;
    }
    json_object_object_get_ex(req, "id", &id);
    json_object_object_foreach(req, key, val) {
        if (strcmp(key, "execute") == 0 || strcmp(key, "exec-oob") == 0) {
            if (!json_object_is_type(val, json_type_string)) {
                char msg[128];
                snprintf(msg, sizeof(msg), "QMP input member '%s' must be a "
                         "string", key);
                send_error(c, id, "GenericError", msg);
                json_object_put(req);
                return;
            }
            exec = val;
        } else if (strcmp(key, "arguments") == 0) {
            if (!json_object_is_type(val, json_type_object)) {
                send_error(c, id, "GenericError", "QMP input member "
                           "'arguments' must be an object");
                json_object_put(req);
                return;
            }
            args = val;
        } else if (strcmp(key, "id") != 0 && strcmp(key, "control") != 0) {
            char msg[160];
            snprintf(msg, sizeof(msg), "QMP input member '%.100s' is "
                     "unexpected", key);
            send_error(c, id, "GenericError", msg);
            json_object_put(req);
            return;
        }
    }
    if (!exec) {
        send_error(c, id, "GenericError", "QMP input lacks member 'execute'");
        json_object_put(req);
        return;
    }
    name = json_object_get_string(exec);
    if (!c->negotiated && strcmp(name, "qmp_capabilities") != 0) {
        send_error(c, id, "CommandNotFound",
                   "Expecting capabilities negotiation with "
                   "'qmp_capabilities'");
        json_object_put(req);
        return;
    }
    if (c->negotiated && strcmp(name, "qmp_capabilities") == 0) {
        send_error(c, id, "CommandNotFound", "Capabilities negotiation is "
                   "already complete, command ignored");
        json_object_put(req);
        return;
    }
    ret = qmp_daemon_execute(c->d, name, args, false, &e);
    if (!ret) {
        send_error(c, id, e.cls ? e.cls : "GenericError", e.desc);
    } else {
        json_object *r = json_object_new_object();
        json_object_object_add(r, "return", ret);
        if (id) {
            json_object_object_add(r, "id", json_object_get(id));
        }
        if (strcmp(name, "qmp_capabilities") == 0) {
            pthread_mutex_lock(&c->d->mon_lock);
            c->negotiated = true;
            pthread_mutex_unlock(&c->d->mon_lock);
        }
        send_obj(c, r);
        if (strcmp(name, "quit") == 0) {
            /* The reply first, then the event, as QEMU orders them. */
            json_object *data = json_object_new_object();
            json_object_object_add(data, "guest",
                                   json_object_new_boolean(0));
            json_object_object_add(data, "reason",
                                   json_object_new_string("host-qmp-quit"));
            qmp_emit_event(c->d, "SHUTDOWN", data);
            {
                char b = 'q';
                if (write(c->d->wake[1], &b, 1) < 0) {
                    /* The pipe is full: a wake-up is pending anyway. */
                }
            }
        }
    }
    json_object_put(req);
}

static void *client_main(void *opaque)
{
    qmp_client *c = opaque;
    qmp_daemon *d = c->d;
    char *buf = malloc(QMP_MAX_LINE + 1);
    size_t have = 0;
    bool skipping = false;
    json_object *greet = json_object_new_object();
    json_object *qmp = json_object_new_object();
    json_object *ver;
    qmp_error e = { 0 };

    ver = qmp_cmd_query_version(d, NULL, &e);
    json_object_object_add(qmp, "version", ver);
    json_object_object_add(qmp, "capabilities", json_object_new_array());
    json_object_object_add(greet, "QMP", qmp);
    send_obj(c, greet);

    while (buf) {
        ssize_t n = read(c->fd, buf + have, QMP_MAX_LINE - have);
        char *nl;
        size_t start = 0;

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            break;
        }
        have += (size_t)n;
        while ((nl = memchr(buf + start, '\n', have - start))) {
            size_t len = (size_t)(nl - (buf + start));
            if (skipping) {
                skipping = false;
            } else {
                char *line = buf + start;
                line[len] = '\0';
                while (len && (line[len - 1] == '\r')) {
                    line[--len] = '\0';
                }
                size_t sp = 0;
                while (sp < len && (line[sp] == ' ' || line[sp] == '\t')) {
                    sp++;
                }
                if (sp < len) {
                    handle_line(c, line + sp, len - sp);
                }
            }
            start = (size_t)(nl - buf) + 1;
        }
        memmove(buf, buf + start, have - start);
        have -= start;
        if (have == QMP_MAX_LINE) {
            /* A line that fills the buffer is refused once and its rest
             * dropped until the next newline. */
            if (!skipping) {
                send_error(c, NULL, "GenericError", "JSON parse error, "
                           "line longer than 1048576 bytes");
            }
            skipping = true;
            have = 0;
        }
    }
    free(buf);
    atomic_store(&c->finished, true);
    return NULL;
}

/* Joins and frees clients whose thread has finished. Caller holds
 * mon_lock. */
static void reap_clients(qmp_daemon *d, bool all)
{
    for (qmp_client **pp = &d->clients; *pp;) {
        qmp_client *c = *pp;
        if (all || atomic_load(&c->finished)) {
            *pp = c->next;
            pthread_join(c->thread, NULL);
            close(c->fd);
            pthread_mutex_destroy(&c->send_lock);
            free(c);
        } else {
            pp = &c->next;
        }
    }
}

static void *listener_main(void *opaque)
{
    qmp_listener *l = opaque;
    qmp_daemon *d = l->d;

    for (;;) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
        qmp_client *c;

        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) {
                continue;
            }
            break;  /* shut down */
        }
        if (atomic_load(&d->quitting)) {
            close(fd);
            continue;
        }
        c = calloc(1, sizeof(*c));
        if (!c) {
            close(fd);
            continue;
        }
        c->d = d;
        c->fd = fd;
        {
            /* A client that stops reading must not stall event senders
             * (who hold the daemon's locks) for long. */
            struct timeval tv = { .tv_sec = 5 };
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        }
        pthread_mutex_init(&c->send_lock, NULL);
        pthread_mutex_lock(&d->mon_lock);
        reap_clients(d, false);
        if (pthread_create(&c->thread, NULL, client_main, c) != 0) {
            pthread_mutex_unlock(&d->mon_lock);
            close(fd);
            pthread_mutex_destroy(&c->send_lock);
            free(c);
            continue;
        }
        c->next = d->clients;
        d->clients = c;
        pthread_mutex_unlock(&d->mon_lock);
    }
    return NULL;
}

int qmp_daemon_add_monitor(qmp_daemon *d, const char *path, vd_error *err)
{
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    qmp_listener *l;
    struct stat st;
    int fd, r;

    if (strlen(path) >= sizeof(sun.sun_path)) {
        return vd_error_set(err, -ENAMETOOLONG, "%s: socket path too long",
                            path);
    }
    strcpy(sun.sun_path, path);
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) {
        unlink(path);
    }
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return vd_error_set_errno(err, -errno, "%s: cannot create socket",
                                  path);
    }
    if (bind(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0 ||
        listen(fd, 16) < 0) {
        r = -errno;
        close(fd);
        return vd_error_set_errno(err, r, "%s: cannot listen", path);
    }
    l = calloc(1, sizeof(*l));
    if (!l || !(l->path = strdup(path))) {
        free(l);
        close(fd);
        unlink(path);
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    l->d = d;
    l->fd = fd;
    r = pthread_create(&l->thread, NULL, listener_main, l);
    if (r != 0) {
        close(fd);
        unlink(path);
        free(l->path);
        free(l);
        return vd_error_set_errno(err, -r, "cannot start monitor thread");
    }
    pthread_mutex_lock(&d->mon_lock);
    l->next = d->listeners;
    d->listeners = l;
    pthread_mutex_unlock(&d->mon_lock);
    return 0;
}

/* ---- life cycle ---- */

qmp_daemon *qmp_daemon_new(void)
{
    qmp_daemon *d = calloc(1, sizeof(*d));

    if (!d) {
        return NULL;
    }
    if (pipe2(d->wake, O_CLOEXEC | O_NONBLOCK) < 0) {
        free(d);
        return NULL;
    }
    pthread_mutex_init(&d->lock, NULL);
    pthread_mutex_init(&d->mon_lock, NULL);
    d->quit_reason = "host-signal";
    if (qmp_jobs_init(d) < 0) {
        pthread_mutex_destroy(&d->lock);
        pthread_mutex_destroy(&d->mon_lock);
        close(d->wake[0]);
        close(d->wake[1]);
        free(d);
        return NULL;
    }
    return d;
}

void qmp_daemon_quit(qmp_daemon *d, const char *reason)
{
    d->quit_reason = reason;
    atomic_store(&d->quitting, true);
    /* The main loop is woken after the reply is sent (monitor.c). */
}

void qmp_daemon_request_quit(qmp_daemon *d)
{
    char b = 's';

    if (write(d->wake[1], &b, 1) < 0) {
        /* A full pipe already holds a wake-up. */
    }
}

static void stop_monitors(qmp_daemon *d)
{
    qmp_listener *l;

    pthread_mutex_lock(&d->mon_lock);
    l = d->listeners;
    d->listeners = NULL;
    pthread_mutex_unlock(&d->mon_lock);
    while (l) {
        qmp_listener *next = l->next;
        /* Wakes the blocked accept(). */
        shutdown(l->fd, SHUT_RDWR);
        pthread_join(l->thread, NULL);
        close(l->fd);
        unlink(l->path);
        free(l->path);
        free(l);
        l = next;
    }
    pthread_mutex_lock(&d->mon_lock);
    for (qmp_client *c = d->clients; c; c = c->next) {
        shutdown(c->fd, SHUT_RDWR);
    }
    pthread_mutex_unlock(&d->mon_lock);
    /* Clients may be waiting for the big lock or emitting events: join
     * them without holding mon_lock. */
    for (;;) {
        qmp_client *c;
        pthread_mutex_lock(&d->mon_lock);
        c = d->clients;
        if (c) {
            d->clients = c->next;
        }
        pthread_mutex_unlock(&d->mon_lock);
        if (!c) {
            break;
        }
        pthread_join(c->thread, NULL);
        close(c->fd);
        pthread_mutex_destroy(&c->send_lock);
        free(c);
    }
}

static int shutdown_daemon(qmp_daemon *d)
{
    int r;

    atomic_store(&d->quitting, true);
    stop_monitors(d);
    /* As qemu-storage-daemon: jobs are cancelled before the nodes go. */
    vd_job_cancel_all_sync();
    pthread_mutex_lock(&d->lock);
    qmp_daemon_stop_nbd(d);
    r = qmp_daemon_close_nodes(d);
    pthread_mutex_unlock(&d->lock);
    return r;
}

int qmp_daemon_run(qmp_daemon *d)
{
    for (;;) {
        struct pollfd p = { .fd = d->wake[0], .events = POLLIN };
        char b[16];
        ssize_t n;

        if (poll(&p, 1, -1) < 0 && errno != EINTR) {
            break;
        }
        n = read(d->wake[0], b, sizeof(b));
        if (n > 0) {
            break;
        }
    }
    if (strcmp(d->quit_reason, "host-qmp-quit") != 0) {
        json_object *data = json_object_new_object();
        json_object_object_add(data, "guest", json_object_new_boolean(0));
        json_object_object_add(data, "reason",
                               json_object_new_string(d->quit_reason));
        qmp_emit_event(d, "SHUTDOWN", data);
    }
    return shutdown_daemon(d);
}

void qmp_daemon_free(qmp_daemon **pd)
{
    qmp_daemon *d = *pd;

    if (!d) {
        return;
    }
    if (d->listeners || d->clients || d->nbd || d->nb_nodes) {
        shutdown_daemon(d);
    }
    qmp_jobs_fini(d);
    free(d->nodes);
    free(d->exports);
    /* The objects (--object, object-add) are the daemon's, as QEMU's
     * /objects; its NBD server, which held a reference, is gone. */
    vd_object_del_all();
    close(d->wake[0]);
    close(d->wake[1]);
    pthread_mutex_destroy(&d->lock);
    pthread_mutex_destroy(&d->mon_lock);
    free(d);
    *pd = NULL;
}
