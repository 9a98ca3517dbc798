/*
 * The "ssh" protocol driver: an image file on another host read and
 * written over SFTP, on libssh, as QEMU 7.2's block/ssh.c
 * (../shared/specs/block-core.json: BlockdevOptionsSsh, SshHostKeyCheck;
 * ../shared/specs/qemu-block-drivers.rst.inc, "Secure Shell (ssh) disk
 * images"). Filenames are ssh://[USER@]HOST[:PORT]/PATH[?host_key_check=
 * no|yes|md5:HEX|sha1:HEX|sha256:HEX]; the blockdev options are
 * server.host, server.port, path, user and host-key-check.mode (none,
 * hash, known_hosts) with .type (md5, sha1, sha256) and .hash; QEMU's
 * legacy host, port and host_key_check are taken too.
 *
 * Authentication is QEMU's: the "none" method, then libssh's automatic
 * public key authentication (the keys of the ssh-agent at SSH_AUTH_SOCK,
 * then the default identity files of ~/.ssh without a passphrase);
 * nothing else. The host key is checked against ~/.ssh/known_hosts
 * unless host-key-check says otherwise, with QEMU's messages.
 *
 * Threads: a libssh session is not thread-safe, so every request takes
 * the node's mutex and requests on one node run one at a time on its one
 * session (QEMU's CoMutex does the same). Reads are pipelined within a
 * request (several SFTP read requests in flight); writes go in pieces
 * of at most 128 KiB as QEMU's (255 KiB to OpenSSH), each answered
 * before the next (libssh 0.10 has no asynchronous write).
 *
 * Never a hang: libssh's own timeout (SSH_OPTIONS_TIMEOUT) bounds each
 * wait, and a watchdog thread of the node shuts the socket down when one
 * request (or the open) takes longer than the timeout as a whole, which
 * makes whatever libssh call is waiting fail; the session is then marked
 * broken and every later request fails at once with a message naming
 * the server. QEMU has no timeout option for ssh; the timeout is 60 s,
 * or VDISK_SSH_TIMEOUT seconds from the environment (the tests use a
 * short one).
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <libssh/libssh.h>
#include <libssh/sftp.h>

#include "core/block_int.h"
#include "common/dlib.h"

/* The library's functions this driver calls (common/dlib.h: loaded at
 * the first open or create, not linked). */
#define SSH_LIB_FUNCS(X) \
    X(sftp_async_read) \
    X(sftp_async_read_begin) \
    X(sftp_attributes_free) \
    X(sftp_close) \
    X(sftp_extension_supported) \
    X(sftp_file_set_blocking) \
    X(sftp_free) \
    X(sftp_fstat) \
    X(sftp_fsync) \
    X(sftp_get_error) \
    X(sftp_init) \
    X(sftp_new) \
    X(sftp_open) \
    X(sftp_read) \
    X(sftp_seek64) \
    X(sftp_write) \
    X(ssh_clean_pubkey_hash) \
    X(ssh_connect) \
    X(ssh_disconnect) \
    X(ssh_free) \
    X(ssh_get_error) \
    X(ssh_get_error_code) \
    X(ssh_get_fingerprint_hash) \
    X(ssh_get_openssh_version) \
    X(ssh_get_publickey_hash) \
    X(ssh_get_server_publickey) \
    X(ssh_is_connected) \
    X(ssh_key_free) \
    X(ssh_key_type) \
    X(ssh_key_type_to_char) \
    X(ssh_new) \
    X(ssh_options_parse_config) \
    X(ssh_options_set) \
    X(ssh_session_is_known_server) \
    X(ssh_set_blocking) \
    X(ssh_string_free_char) \
    X(ssh_userauth_list) \
    X(ssh_userauth_none) \
    X(ssh_userauth_publickey_auto)
VD_DLIB_DEFINE(ssh_lib, VDISK_LIBSSH_SONAME, SSH_LIB_FUNCS);

/* Largest write sent in one SFTP request: libssh 0.10 sends a write as
 * one packet, each answered before the next, and servers limit packets.
 * QEMU's 128 KiB by default; OpenSSH's sftp-server (an OpenSSH banner
 * and its limits@openssh.com extension, 8.6 and later) takes 255 KiB of
 * data (its SFTP_MAX_MSG_LENGTH of 256 KiB less 1 KiB of headroom, the
 * max-write-length it reports), and half the round trips make pushing
 * an image faster. */
#define SSH_WRITE_CHUNK (128u * 1024)
#define SSH_WRITE_CHUNK_OPENSSH (255u * 1024)
/* Reads: pieces of this size, this many in flight at once. */
#define SSH_READ_CHUNK (64u * 1024)
#define SSH_READ_DEPTH 16
#define SSH_DEFAULT_TIMEOUT 60

typedef struct ssh_state {
    pthread_mutex_t lock;       /* serialises every use of the session */
    ssh_session session;
    sftp_session sftp;
    sftp_file file;
    int sock;
    uint64_t size;              /* the remote file's length, kept up to
                                   date as writes extend it */
    char *host, *port, *user, *path;
    bool flush_warned;
    bool broken;                /* the watchdog cut the connection, or
                                   the server went away */
    bool fsync_ok;
    size_t write_chunk;

    /* The watchdog: while a request runs, @deadline is set; when it
     * passes, the socket is shut down. */
    pthread_t watchdog;
    bool watchdog_running;
    pthread_mutex_t wd_lock;
    pthread_cond_t wd_cond;
    struct timespec deadline;
    bool armed, fired, quit;
    unsigned timeout;           /* seconds */
} ssh_state;

/* ---- the watchdog ---- */

static void *ssh_watchdog_main(void *opaque)
{
    ssh_state *s = opaque;

    pthread_mutex_lock(&s->wd_lock);
    while (!s->quit) {
        if (!s->armed) {
            pthread_cond_wait(&s->wd_cond, &s->wd_lock);
            continue;
        }
        struct timespec dl = s->deadline;
        int r = pthread_cond_timedwait(&s->wd_cond, &s->wd_lock, &dl);
        if (r == ETIMEDOUT && s->armed && !s->quit &&
            s->deadline.tv_sec == dl.tv_sec &&
            s->deadline.tv_nsec == dl.tv_nsec) {
            /* The waiting libssh call sees the end of the stream. */
            s->fired = true;
            s->armed = false;
            if (s->sock >= 0) {
                shutdown(s->sock, SHUT_RDWR);
            }
        }
    }
    pthread_mutex_unlock(&s->wd_lock);
    return NULL;
}

static void ssh_arm(ssh_state *s)
{
    pthread_mutex_lock(&s->wd_lock);
    clock_gettime(CLOCK_REALTIME, &s->deadline);
    s->deadline.tv_sec += s->timeout;
    s->armed = true;
    pthread_cond_signal(&s->wd_cond);
    pthread_mutex_unlock(&s->wd_lock);
}

/* Returns whether the watchdog fired since the last ssh_arm(). */
static bool ssh_disarm(ssh_state *s)
{
    bool fired;

    pthread_mutex_lock(&s->wd_lock);
    s->armed = false;
    fired = s->fired;
    s->fired = false;
    pthread_cond_signal(&s->wd_cond);
    pthread_mutex_unlock(&s->wd_lock);
    return fired;
}

/* The socket changes under the watchdog's lock, which reads it. */
static void ssh_set_sock(ssh_state *s, int fd)
{
    if (s->watchdog_running) {
        pthread_mutex_lock(&s->wd_lock);
        s->sock = fd;
        pthread_mutex_unlock(&s->wd_lock);
    } else {
        s->sock = fd;
    }
}

static int ssh_watchdog_start(ssh_state *s, vd_error *err)
{
    const char *env = getenv("VDISK_SSH_TIMEOUT");
    pthread_condattr_t ca;

    s->timeout = SSH_DEFAULT_TIMEOUT;
    if (env && *env) {
        char *end;
        unsigned long v = strtoul(env, &end, 10);
        if (*end == 0 && v > 0 && v < 86400) {
            s->timeout = (unsigned)v;
        }
    }
    pthread_mutex_init(&s->wd_lock, NULL);
    pthread_condattr_init(&ca);
    pthread_cond_init(&s->wd_cond, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&s->watchdog, NULL, ssh_watchdog_main, s) != 0) {
        pthread_cond_destroy(&s->wd_cond);
        pthread_mutex_destroy(&s->wd_lock);
        return vd_error_set(err, -EAGAIN, "Could not start the ssh "
                            "driver's watchdog thread");
    }
    s->watchdog_running = true;
    return 0;
}

static void ssh_watchdog_stop(ssh_state *s)
{
    if (!s->watchdog_running) {
        return;
    }
    pthread_mutex_lock(&s->wd_lock);
    s->quit = true;
    pthread_cond_signal(&s->wd_cond);
    pthread_mutex_unlock(&s->wd_lock);
    pthread_join(s->watchdog, NULL);
    pthread_cond_destroy(&s->wd_cond);
    pthread_mutex_destroy(&s->wd_lock);
    s->watchdog_running = false;
}

/* ---- errors ---- */

/* QEMU's session_error_setg(): the message, libssh's last error and its
 * code. */
static int ssh_session_error(ssh_state *s, vd_error *err, int code,
                             const char *what)
{
    if (s->session) {
        return vd_error_set(err, code, "%s: %s (libssh error code: %d)",
                            what, LIB(ssh_get_error)(s->session),
                            LIB(ssh_get_error_code)(s->session));
    }
    return vd_error_set(err, code, "%s", what);
}

/* QEMU's sftp_error_setg(): also the SFTP status code. */
static int ssh_sftp_error(ssh_state *s, vd_error *err, int code,
                          const char *what)
{
    if (s->sftp) {
        return vd_error_set(err, code, "%s: %s (libssh error code: %d, "
                            "sftp error code: %d)", what,
                            LIB(ssh_get_error)(s->session),
                            LIB(ssh_get_error_code)(s->session),
                            LIB(sftp_get_error)(s->sftp));
    }
    return vd_error_set(err, code, "%s", what);
}

/* The session is gone for good: later requests fail at once. Tools
 * such as convert print only the errno's text of a failed request (as
 * qemu-img), so the first loss is also reported as a warning naming the
 * image's URI. */
static int ssh_broken(ssh_state *s, vd_error *err, int code, const char *fmt,
                      const char *op, const char *detail)
{
    char msg[512];

    snprintf(msg, sizeof(msg), fmt, s->host, s->port, op, detail);
    if (!s->broken) {
        vd_warn("ssh://%s@%s%s%s:%s%s: %s", s->user,
                strchr(s->host, ':') ? "[" : "", s->host,
                strchr(s->host, ':') ? "]" : "", s->port, s->path, msg);
    }
    s->broken = true;
    return vd_error_set(err, code, "%s", msg);
}

/* A request failed: a timeout (the watchdog fired), a connection gone,
 * or an SFTP error status. The first two break the session for good. */
static int ssh_io_error(ssh_state *s, bool fired, vd_error *err,
                        const char *op)
{
    char tmo[32];

    if (fired) {
        snprintf(tmo, sizeof(tmo), "%u s", s->timeout);
        return ssh_broken(s, err, -ETIMEDOUT, "ssh server %s:%s did not "
                          "answer a %s request within %s", op, tmo);
    }
    if (!LIB(ssh_is_connected)(s->session)) {
        return ssh_broken(s, err, -EIO, "ssh server %s:%s closed the "
                          "connection during a %s request: %s", op,
                          LIB(ssh_get_error)(s->session));
    }
    char what[160];
    snprintf(what, sizeof(what), "%s of '%s' on ssh server %s:%s failed",
             op, s->path, s->host, s->port);
    return ssh_sftp_error(s, err, -EIO, what);
}

static int ssh_check_broken(ssh_state *s, vd_error *err)
{
    if (s->broken) {
        return vd_error_set(err, -EIO, "the connection to ssh server %s:%s "
                            "was lost", s->host, s->port);
    }
    return 0;
}

/* ---- filenames and options ---- */

static int ssh_hexval(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

/* Decodes %XX escapes in place (QEMU's URI parser unescapes the parts). */
static void ssh_unescape(char *p)
{
    char *o = p;

    for (; *p; p++) {
        int hi, lo;
        if (p[0] == '%' && (hi = ssh_hexval(p[1])) >= 0 &&
            (lo = ssh_hexval(p[2])) >= 0) {
            *o++ = (char)(hi * 16 + lo);
            p += 2;
        } else {
            *o++ = *p;
        }
    }
    *o = 0;
}

static int ssh_put(vd_opts *o, const char *key, const char *val,
                   vd_error *err)
{
    if (vd_opts_set(o, key, val) < 0) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    return 0;
}

/*
 * Splits ssh://[USER@]HOST[:PORT]/PATH[?QUERY] into QEMU's options (user,
 * server.host, server.port, path, host_key_check), as its parse_uri():
 * query parameters other than host_key_check are ignored.
 */
static int ssh_parse_uri(const char *uri, vd_opts *o, vd_error *err)
{
    char *buf, *p, *auth, *path, *query = NULL, *host, *port = NULL;
    char *at, *pathbuf = NULL;
    int ret = -EINVAL;

    if (strncmp(uri, "ssh://", 6) != 0) {
        return vd_error_set(err, -EINVAL, "URI scheme must be 'ssh'");
    }
    if (!(buf = strdup(uri + 6))) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    p = buf;
    /* The fragment is no part of the name. */
    if ((at = strchr(p, '#'))) {
        *at = 0;
    }
    if ((query = strchr(p, '?'))) {
        *query++ = 0;
    }
    auth = p;
    path = strchr(p, '/');
    if (path) {
        /* The path keeps its slash; the authority ends before it. */
        if (!(pathbuf = strdup(path))) {
            free(buf);
            return vd_error_set(err, -ENOMEM, "Out of memory");
        }
        *path = 0;
        path = pathbuf;
    }
    at = strrchr(auth, '@');
    if (at) {
        *at = 0;
        host = at + 1;
        ssh_unescape(auth);
        if (auth[0] && (ret = ssh_put(o, "user", auth, err)) < 0) {
            goto out;
        }
    } else {
        host = auth;
    }
    if (host[0] == '[') {
        char *close = strchr(host, ']');
        if (!close) {
            ret = vd_error_set(err, -EINVAL, "missing hostname in URI");
            goto out;
        }
        *close = 0;
        host++;
        if (close[1] == ':') {
            port = close + 2;
        }
    } else if ((port = strchr(host, ':'))) {
        *port++ = 0;
    }
    ssh_unescape(host);
    if (!host[0]) {
        ret = vd_error_set(err, -EINVAL, "missing hostname in URI");
        goto out;
    }
    if (!path || !path[0]) {
        ret = vd_error_set(err, -EINVAL, "missing remote path in URI");
        goto out;
    }
    ssh_unescape(path);
    if (port && port[0]) {
        char *end;
        unsigned long v = strtoul(port, &end, 10);
        if (*end || v > 65535) {
            ret = vd_error_set(err, -EINVAL, "Could not parse the port "
                               "of '%s'", uri);
            goto out;
        }
    } else {
        port = "22";
    }
    if ((ret = ssh_put(o, "server.host", host, err)) < 0 ||
        (ret = ssh_put(o, "server.port", port, err)) < 0 ||
        (ret = ssh_put(o, "path", path, err)) < 0) {
        goto out;
    }
    for (char *q = query, *next; q && *q; q = next) {
        next = q + strcspn(q, "&;");
        if (*next) {
            *next++ = 0;
        }
        char *eq = strchr(q, '=');
        if (eq) {
            *eq++ = 0;
        }
        ssh_unescape(q);
        if (strcmp(q, "host_key_check") == 0) {
            char *v = strdup(eq ? eq : "");
            if (!v) {
                ret = vd_error_set(err, -ENOMEM, "Out of memory");
                goto out;
            }
            ssh_unescape(v);
            ret = ssh_put(o, "host_key_check", v, err);
            free(v);
            if (ret < 0) {
                goto out;
            }
        }
    }
    ret = 0;
out:
    free(pathbuf);
    free(buf);
    return ret;
}

/* The host key check, QEMU's SshHostKeyCheck. */
enum { HKC_NONE, HKC_HASH, HKC_KNOWN_HOSTS };
enum { HKC_MD5, HKC_SHA1, HKC_SHA256 };

typedef struct ssh_conf {
    char *host, *port, *path, *user;
    int mode, type;
    char *hash;
    char *legacy_hkc;           /* host_key_check as given, for the name */
} ssh_conf;

static void ssh_conf_free(ssh_conf *c)
{
    free(c->host);
    free(c->port);
    free(c->path);
    free(c->user);
    free(c->hash);
    free(c->legacy_hkc);
    memset(c, 0, sizeof(*c));
}

/* The index of @v in @choices (NULL-terminated), or -1. */
static int ssh_enum(const char *const *choices, const char *v)
{
    for (int i = 0; choices[i]; i++) {
        if (strcmp(v, choices[i]) == 0) {
            return i;
        }
    }
    return -1;
}

/* Takes the options from @o into @c: the legacy ones translated first
 * as QEMU's ssh_process_legacy_options(). */
static int ssh_take_conf(vd_opts *o, ssh_conf *c, vd_error *err)
{
    static const char *const modes[] = { "none", "hash", "known_hosts",
                                         NULL };
    static const char *const types[] = { "md5", "sha1", "sha256", NULL };
    char *lhost = vd_opts_take(o, "host");
    char *lport = vd_opts_take(o, "port");
    char *lhkc = vd_opts_take(o, "host_key_check");
    char *tmp;
    int ret = 0;

    memset(c, 0, sizeof(*c));
    c->mode = -1;
    if (!lhost && lport) {
        ret = vd_error_set(err, -EINVAL, "port may not be used without "
                           "host");
        goto out;
    }
    c->host = vd_opts_take(o, "server.host");
    c->port = vd_opts_take(o, "server.port");
    if (lhost) {
        free(c->host);
        free(c->port);
        c->host = lhost;
        c->port = lport ? lport : strdup("22");
        lhost = lport = NULL;
    }
    /* InetSocketAddress's other members: accepted, as the address
     * resolution below tries every address anyway. */
    vd_opts_del(o, "server.numeric");
    vd_opts_del(o, "server.to");
    vd_opts_del(o, "server.ipv4");
    vd_opts_del(o, "server.ipv6");
    vd_opts_del(o, "server.keep-alive");
    c->path = vd_opts_take(o, "path");
    c->user = vd_opts_take(o, "user");

    /* QEMU's visitor names an enum member alone ('mode', 'type'). */
    tmp = vd_opts_take(o, "host-key-check.mode");
    if (tmp && (c->mode = ssh_enum(modes, tmp)) < 0) {
        ret = vd_error_set(err, -EINVAL, "Parameter 'mode' does not accept "
                           "value '%s'", tmp);
        free(tmp);
        goto out;
    }
    free(tmp);
    if (c->mode < 0) {
        c->mode = HKC_KNOWN_HOSTS;
    }
    tmp = vd_opts_take(o, "host-key-check.type");
    c->hash = vd_opts_take(o, "host-key-check.hash");
    if (c->mode == HKC_HASH) {
        if (!tmp) {
            ret = vd_error_set(err, -EINVAL, "Parameter "
                               "'host-key-check.type' is missing");
            goto out;
        }
        if ((c->type = ssh_enum(types, tmp)) < 0) {
            ret = vd_error_set(err, -EINVAL, "Parameter 'type' does not "
                               "accept value '%s'", tmp);
            free(tmp);
            goto out;
        }
        free(tmp);
        if (!c->hash) {
            ret = vd_error_set(err, -EINVAL, "Parameter "
                               "'host-key-check.hash' is missing");
            goto out;
        }
    } else if (tmp || c->hash) {
        free(tmp);
        ret = vd_error_set(err, -EINVAL, "Parameter '%s' is unexpected",
                           c->hash ? "host-key-check.hash"
                                   : "host-key-check.type");
        goto out;
    }
    if (lhkc) {
        static const struct { const char *p; int type; } pre[] = {
            { "md5:", HKC_MD5 }, { "sha1:", HKC_SHA1 },
            { "sha256:", HKC_SHA256 },
        };
        bool known = false;
        if (strcmp(lhkc, "no") == 0) {
            c->mode = HKC_NONE;
            known = true;
        } else if (strcmp(lhkc, "yes") == 0) {
            c->mode = HKC_KNOWN_HOSTS;
            known = true;
        }
        for (size_t i = 0; !known && i < sizeof(pre) / sizeof(pre[0]); i++) {
            size_t n = strlen(pre[i].p);
            if (strncmp(lhkc, pre[i].p, n) == 0) {
                c->mode = HKC_HASH;
                c->type = pre[i].type;
                free(c->hash);
                c->hash = strdup(lhkc + n);
                known = true;
            }
        }
        if (!known) {
            ret = vd_error_set(err, -EINVAL, "unknown host_key_check "
                               "setting (%s)", lhkc);
            goto out;
        }
        c->legacy_hkc = lhkc;
        lhkc = NULL;
    }
    if (!c->host) {
        ret = vd_error_set(err, -EINVAL, "Parameter 'server' is missing");
        goto out;
    }
    if (!c->port) {
        ret = vd_error_set(err, -EINVAL, "Parameter 'server.port' is "
                           "missing");
        goto out;
    }
    if (!c->path) {
        ret = vd_error_set(err, -EINVAL, "Parameter 'path' is missing");
        goto out;
    }
    {
        char *end;
        unsigned long v = strtoul(c->port, &end, 10);
        if (!c->port[0] || *end || v > 65535) {
            ret = vd_error_set(err, -EINVAL, "Use only numeric port value");
            goto out;
        }
    }
    if (!c->user) {
        struct passwd pw, *res = NULL;
        char pwbuf[1024];
        if (getpwuid_r(getuid(), &pw, pwbuf, sizeof(pwbuf), &res) != 0 ||
            !res) {
            ret = vd_error_set(err, -ENOENT, "Can't get user name");
            goto out;
        }
        c->user = strdup(res->pw_name);
    }
    if (!c->user || !c->host || !c->port || !c->path ||
        (c->mode == HKC_HASH && !c->hash)) {
        ret = vd_error_set(err, -ENOMEM, "Out of memory");
    }
out:
    free(lhost);
    free(lport);
    free(lhkc);
    if (ret < 0) {
        ssh_conf_free(c);
    }
    return ret;
}

/* ---- connecting ---- */

/* A TCP connection to host:port within the timeout, every address tried
 * in turn; QEMU's message on failure. */
static int ssh_tcp_connect(ssh_state *s, vd_error *err)
{
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM,
                              .ai_family = AF_UNSPEC };
    struct addrinfo *res = NULL;
    int e = ECONNREFUSED, r;

    r = getaddrinfo(s->host, s->port, &hints, &res);
    if (r != 0) {
        return vd_error_set(err, -EINVAL, "address resolution failed for "
                            "%s:%s: %s", s->host, s->port, gai_strerror(r));
    }
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC |
                        SOCK_NONBLOCK, a->ai_protocol);
        if (fd < 0) {
            e = errno;
            continue;
        }
        if (connect(fd, a->ai_addr, a->ai_addrlen) < 0 &&
            errno != EINPROGRESS) {
            e = errno;
            close(fd);
            continue;
        }
        struct pollfd pfd = { .fd = fd, .events = POLLOUT };
        r = poll(&pfd, 1, (int)s->timeout * 1000);
        int soerr = 0;
        socklen_t sl = sizeof(soerr);
        if (r <= 0) {
            e = r == 0 ? ETIMEDOUT : errno;
            close(fd);
            continue;
        }
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
        if (soerr) {
            e = soerr;
            close(fd);
            continue;
        }
        /* Blocking again for libssh; no Nagle delay on small requests
         * (QEMU sets TCP_NODELAY too). */
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        freeaddrinfo(res);
        ssh_set_sock(s, fd);
        return 0;
    }
    freeaddrinfo(res);
    return vd_error_set(err, -e, "Failed to connect to '%s:%s': %s",
                        s->host, s->port, strerror(e));
}

/* Compares the server's key hash with the hex string the user gave,
 * where ':' may separate the byte pairs (QEMU's compare_fingerprint). */
static bool ssh_hash_matches(const unsigned char *h, size_t len,
                             const char *want)
{
    for (size_t i = 0; i < len; i++) {
        while (*want == ':') {
            want++;
        }
        int hi = ssh_hexval(want[0]);
        int lo = hi < 0 ? -1 : ssh_hexval(want[1]);
        if (lo < 0 || (unsigned)(hi * 16 + lo) != h[i]) {
            return false;
        }
        want += 2;
    }
    return *want == 0;
}

static int ssh_check_host_key(ssh_state *s, const ssh_conf *c,
                              vd_error *err)
{
    static const char *const tname[] = { "md5", "sha1", "sha256" };
    static const enum ssh_publickey_hash_type ttype[] = {
        SSH_PUBLICKEY_HASH_MD5, SSH_PUBLICKEY_HASH_SHA1,
        SSH_PUBLICKEY_HASH_SHA256,
    };

    if (c->mode == HKC_NONE) {
        return 0;
    }
    if (c->mode == HKC_HASH) {
        ssh_key key = NULL;
        unsigned char *h = NULL;
        size_t hlen = 0;
        char hex[2 * 64 + 1];
        enum ssh_keytypes_e kt;

        if (LIB(ssh_get_server_publickey)(s->session, &key) != SSH_OK) {
            return ssh_session_error(s, err, -EINVAL,
                                     "failed to read remote host key");
        }
        kt = LIB(ssh_key_type)(key);
        int r = LIB(ssh_get_publickey_hash)(key, ttype[c->type], &h, &hlen);
        LIB(ssh_key_free)(key);
        if (r != 0) {
            return ssh_session_error(s, err, -EINVAL, "failed reading the "
                                     "hash of the server SSH key");
        }
        bool ok = ssh_hash_matches(h, hlen, c->hash);
        hex[0] = 0;
        for (size_t i = 0; i < hlen && i < 64; i++) {
            snprintf(hex + 2 * i, 3, "%02x", h[i]);
        }
        LIB(ssh_clean_pubkey_hash)(&h);
        if (!ok) {
            return vd_error_set(err, -EPERM, "remote host %s key fingerprint "
                                "'%s:%s' does not match host_key_check "
                                "'%s:%s'", LIB(ssh_key_type_to_char)(kt),
                                tname[c->type], hex, tname[c->type],
                                c->hash);
        }
        return 0;
    }

    switch (LIB(ssh_session_is_known_server)(s->session)) {
    case SSH_KNOWN_HOSTS_OK:
        return 0;
    case SSH_KNOWN_HOSTS_CHANGED: {
        ssh_key key = NULL;
        unsigned char *h = NULL;
        size_t hlen = 0;
        char *fp = NULL;
        enum ssh_keytypes_e kt = SSH_KEYTYPE_UNKNOWN;
        if (LIB(ssh_get_server_publickey)(s->session, &key) == SSH_OK) {
            kt = LIB(ssh_key_type)(key);
            if (LIB(ssh_get_publickey_hash)(key, SSH_PUBLICKEY_HASH_SHA256, &h,
                                            &hlen) == 0) {
                fp = LIB(ssh_get_fingerprint_hash)(SSH_PUBLICKEY_HASH_SHA256,
                                                   h,
                                                   hlen);
                LIB(ssh_clean_pubkey_hash)(&h);
            }
            LIB(ssh_key_free)(key);
        }
        if (fp) {
            vd_error_set(err, -EINVAL, "host key (%s key with fingerprint "
                         "%s) does not match the one in known_hosts; this "
                         "may be a possible attack",
                         LIB(ssh_key_type_to_char)(kt), fp);
            LIB(ssh_string_free_char)(fp);
            return -EINVAL;
        }
        return vd_error_set(err, -EINVAL, "host key does not match the one "
                            "in known_hosts; this may be a possible attack");
    }
    case SSH_KNOWN_HOSTS_OTHER:
        return vd_error_set(err, -EINVAL, "host key for this server not "
                            "found, another type exists");
    case SSH_KNOWN_HOSTS_UNKNOWN:
        return vd_error_set(err, -EINVAL, "no host key was found in "
                            "known_hosts");
    case SSH_KNOWN_HOSTS_NOT_FOUND:
        return vd_error_set(err, -ENOENT, "known_hosts file not found");
    case SSH_KNOWN_HOSTS_ERROR:
    default:
        return vd_error_set(err, -EINVAL, "error while checking the host");
    }
}

/* QEMU's authenticate(): "none", then public keys (agent, default
 * identities). */
static int ssh_authenticate(ssh_state *s, vd_error *err)
{
    int r = LIB(ssh_userauth_none)(s->session, NULL);

    if (r == SSH_AUTH_ERROR) {
        return ssh_session_error(s, err, -EPERM, "failed to authenticate "
                                 "using none authentication");
    }
    if (r == SSH_AUTH_SUCCESS) {
        return 0;
    }
    if (LIB(ssh_userauth_list)(s->session, NULL) & SSH_AUTH_METHOD_PUBLICKEY) {
        r = LIB(ssh_userauth_publickey_auto)(s->session, NULL, NULL);
        if (r == SSH_AUTH_ERROR) {
            return ssh_session_error(s, err, -EINVAL, "failed to "
                                     "authenticate using publickey "
                                     "authentication");
        }
        if (r == SSH_AUTH_SUCCESS) {
            return 0;
        }
    }
    return vd_error_set(err, -EPERM, "failed to authenticate using publickey "
                        "authentication and the identities held by your "
                        "ssh-agent");
}

/* Tears the connection down (also a half-made one). */
static void ssh_disconnect_all(ssh_state *s)
{
    if (s->file) {
        /* Also on a broken session: sftp_close() frees the handle, and
         * its close request fails at once on a dead or shut-down
         * socket. */
        LIB(sftp_close)(s->file);
        s->file = NULL;
    }
    if (s->sftp) {
        LIB(sftp_free)(s->sftp);
        s->sftp = NULL;
    }
    if (s->session) {
        if (!s->broken) {
            LIB(ssh_disconnect)(s->session);
        }
        LIB(ssh_free)(s->session);       /* closes s->sock */
        s->session = NULL;
        ssh_set_sock(s, -1);
    }
    if (s->sock >= 0) {
        close(s->sock);
        ssh_set_sock(s, -1);
    }
}

/*
 * Connects, checks the host key, authenticates, starts SFTP and opens
 * the path with @oflags (O_RDONLY, O_RDWR, | O_CREAT | O_TRUNC) and
 * @mode; the watchdog must be running.
 */
static int ssh_connect_open(ssh_state *s, const ssh_conf *c, int oflags,
                            int mode, vd_error *err)
{
    unsigned port = (unsigned)strtoul(c->port, NULL, 10);
    long tmo = (long)s->timeout;
    int ret;
    bool fired;

    s->host = strdup(c->host);
    s->port = strdup(c->port);
    s->user = strdup(c->user);
    s->path = strdup(c->path);
    if (!s->host || !s->port || !s->user || !s->path) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }

    ssh_arm(s);
    ret = ssh_tcp_connect(s, err);
    if (ret < 0) {
        ssh_disarm(s);
        return ret;
    }
    s->session = LIB(ssh_new)();
    if (!s->session) {
        ret = vd_error_set(err, -ENOMEM, "failed to initialize libssh "
                           "session");
        goto fail;
    }
    LIB(ssh_set_blocking)(s->session, 1);
    if (LIB(ssh_options_set)(s->session, SSH_OPTIONS_USER, s->user) < 0 ||
        LIB(ssh_options_set)(s->session, SSH_OPTIONS_HOST, s->host) < 0 ||
        LIB(ssh_options_set)(s->session, SSH_OPTIONS_PORT, &port) < 0 ||
        LIB(ssh_options_set)(s->session, SSH_OPTIONS_COMPRESSION,
                             "none") < 0) {
        ret = ssh_session_error(s, err, -EINVAL, "failed to set the options "
                                "of the libssh session");
        goto fail;
    }
    /* ~/.ssh/config, as QEMU. */
    if (LIB(ssh_options_parse_config)(s->session, NULL) < 0) {
        ret = ssh_session_error(s, err, -EINVAL, "failed to parse "
                                "~/.ssh/config");
        goto fail;
    }
    if (LIB(ssh_options_set)(s->session, SSH_OPTIONS_TIMEOUT, &tmo) < 0 ||
        LIB(ssh_options_set)(s->session, SSH_OPTIONS_FD, &s->sock) < 0) {
        ret = ssh_session_error(s, err, -EINVAL, "failed to set the socket "
                                "in the libssh session");
        goto fail;
    }
    if (LIB(ssh_connect)(s->session) != SSH_OK) {
        ret = ssh_session_error(s, err, -EINVAL, "failed to establish SSH "
                                "session");
        goto fail;
    }
    if ((ret = ssh_check_host_key(s, c, err)) < 0 ||
        (ret = ssh_authenticate(s, err)) < 0) {
        goto fail;
    }
    s->sftp = LIB(sftp_new)(s->session);
    if (!s->sftp) {
        ret = ssh_session_error(s, err, -EINVAL, "failed to create sftp "
                                "handle");
        goto fail;
    }
    if (LIB(sftp_init)(s->sftp) < 0) {
        ret = ssh_sftp_error(s, err, -EINVAL, "failed to initialize sftp "
                             "handle");
        goto fail;
    }
    s->file = LIB(sftp_open)(s->sftp, s->path, oflags, (mode_t)mode);
    if (!s->file) {
        char what[4200];
        int se = LIB(sftp_get_error)(s->sftp);
        snprintf(what, sizeof(what), "failed to open remote file '%s'",
                 s->path);
        ret = ssh_sftp_error(s, err, se == SSH_FX_NO_SUCH_FILE ? -ENOENT :
                             se == SSH_FX_PERMISSION_DENIED ? -EACCES :
                             -EINVAL, what);
        goto fail;
    }
    LIB(sftp_file_set_blocking)(s->file);
    sftp_attributes a = LIB(sftp_fstat)(s->file);
    if (!a) {
        ret = ssh_sftp_error(s, err, -EINVAL, "failed to read file "
                             "attributes");
        goto fail;
    }
    s->size = a->size;
    LIB(sftp_attributes_free)(a);
    s->fsync_ok = LIB(sftp_extension_supported)(s->sftp, "fsync@openssh.com",
                                                "1");
    s->write_chunk = LIB(ssh_get_openssh_version)(s->session) > 0 &&
                     LIB(sftp_extension_supported)(s->sftp,
                                                   "limits@openssh.com",
                                                   "1") ?
                     SSH_WRITE_CHUNK_OPENSSH : SSH_WRITE_CHUNK;
    ret = 0;

fail:
    fired = ssh_disarm(s);
    if (fired) {
        /* Whatever libssh said (or even if the last call made it), the
         * cause is the silence. */
        vd_error_clear(err);
        ret = vd_error_set(err, -ETIMEDOUT, "ssh server %s:%s did not "
                           "answer within %u s", s->host, s->port,
                           s->timeout);
        s->broken = true;
    }
    if (ret < 0) {
        ssh_disconnect_all(s);
    }
    return ret;
}

static void ssh_state_free(ssh_state *s)
{
    ssh_disconnect_all(s);
    ssh_watchdog_stop(s);
    free(s->host);
    free(s->port);
    free(s->user);
    free(s->path);
    s->host = s->port = s->user = s->path = NULL;
}

/* QEMU's name of a node opened from options: ssh://USER@HOST:PORT/PATH,
 * with the legacy host_key_check appended when it was given. */
static char *ssh_make_filename(const ssh_conf *c)
{
    char *out = NULL;
    bool v6 = strchr(c->host, ':') != NULL;

    if (asprintf(&out, "ssh://%s@%s%s%s:%s%s%s%s", c->user, v6 ? "[" : "",
                 c->host, v6 ? "]" : "", c->port, c->path,
                 c->legacy_hkc ? "?host_key_check=" : "",
                 c->legacy_hkc ? c->legacy_hkc : "") < 0) {
        return NULL;
    }
    return out;
}

/* The first option of @opts that says where the image is (QEMU's
 * strong runtime options), or NULL. */
static const char *ssh_location_option(const vd_opts *opts)
{
    static const char *const keys[] = { "host", "port", "path", "user",
                                        "host_key_check", NULL };

    for (size_t i = 0; opts && i < vd_opts_count(opts); i++) {
        const char *k, *v;
        vd_opts_nth(opts, i, &k, &v);
        if (strncmp(k, "server.", 7) == 0) {
            return k;
        }
        for (int j = 0; keys[j]; j++) {
            if (strcmp(k, keys[j]) == 0) {
                return k;
            }
        }
    }
    return NULL;
}

/* Options from a filename (@opts may be NULL, or must not say where the
 * image is: QEMU refuses both at once) or, without one, from @opts. */
static int ssh_conf_from(vd_opts *opts, const char *filename, ssh_conf *c,
                         vd_error *err)
{
    const char *clash = ssh_location_option(opts);
    vd_opts *o;
    int ret;

    if (!filename) {
        return ssh_take_conf(opts, c, err);
    }
    if (clash) {
        return vd_error_set(err, -EINVAL, "Option '%s' cannot be used with "
                            "a file name", clash);
    }
    if (!(o = vd_opts_new())) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    ret = ssh_parse_uri(filename, o, err);
    if (ret == 0) {
        ret = ssh_take_conf(o, c, err);
    }
    vd_opts_free(&o);
    return ret;
}

/* ---- the vtable ---- */

static int ssh_open(vd_node *node, vd_opts *opts, unsigned flags,
                    vd_error *err)
{
    ssh_state *s = node->opaque;
    bool rdwr = (flags & VD_NODE_RDWR) && !node->read_only;
    char *fname = vd_opts_take(opts, "filename");
    const char *name;
    ssh_conf c = { 0 };
    int ret;

    s->sock = -1;
    pthread_mutex_init(&s->lock, NULL);
    /* A filename option with location options is QEMU's conflict; the
     * node's own name (the filename the user opened, or the one this
     * function made from the options, which a reopen finds again beside
     * them) gives way to location options. */
    if (fname || ssh_location_option(opts)) {
        name = fname;
    } else {
        name = node->filename && node->filename[0] &&
               strncmp(node->filename, "json:", 5) != 0 ? node->filename
                                                         : NULL;
    }
    ret = ssh_conf_from(opts, name, &c, err);
    if (ret < 0) {
        free(fname);
        return ret;
    }
    if (!name && (!node->filename || !node->filename[0] ||
                  strncmp(node->filename, "json:", 5) == 0)) {
        char *n = ssh_make_filename(&c);
        if (!n) {
            free(fname);
            ssh_conf_free(&c);
            return vd_error_set(err, -ENOMEM, "Out of memory");
        }
        free(node->filename);
        node->filename = n;
    }
    free(fname);

    ret = ssh_watchdog_start(s, err);
    if (ret == 0) {
        ret = ssh_connect_open(s, &c, rdwr ? O_RDWR : O_RDONLY, 0, err);
    }
    ssh_conf_free(&c);
    if (ret < 0) {
        ssh_state_free(s);
        pthread_mutex_destroy(&s->lock);
        return ret;
    }
    node->bl.request_alignment = 1;
    return 0;
}

static void ssh_close(vd_node *node)
{
    ssh_state *s = node->opaque;

    ssh_state_free(s);
    pthread_mutex_destroy(&s->lock);
}

/* Reads [off, off+len) into @buf with SFTP read requests, up to
 * SSH_READ_DEPTH of them in flight; zeros past the end of the file.
 * Returns 0 or a negative errno. Session locked. */
static int ssh_read_locked(ssh_state *s, uint64_t off, uint8_t *buf,
                           size_t len)
{
    struct { int id; uint32_t len; size_t pos; } q[SSH_READ_DEPTH];
    size_t issued = 0, head = 0, tail = 0;
    size_t short_at = (size_t)-1;   /* first short piece's end, if any */
    int ret = 0;

    if (LIB(sftp_seek64)(s->file, off) < 0) {
        return -EIO;
    }
    while (tail < head || issued < len) {
        /* Keep the pipe full, unless a short piece told us where the
         * data ends (the pieces already asked for are still collected,
         * and what follows the short one is read again below) or a
         * piece failed. */
        while (ret == 0 && head - tail < SSH_READ_DEPTH && issued < len &&
               short_at == (size_t)-1) {
            uint32_t n = (uint32_t)(len - issued < SSH_READ_CHUNK ?
                                    len - issued : SSH_READ_CHUNK);
            int id = LIB(sftp_async_read_begin)(s->file, n);
            if (id < 0) {
                ret = -1;
                break;
            }
            q[head % SSH_READ_DEPTH].id = id;
            q[head % SSH_READ_DEPTH].len = n;
            q[head % SSH_READ_DEPTH].pos = issued;
            head++;
            issued += n;
        }
        if (tail == head) {
            break;
        }
        /* Collect the oldest answer (every one is collected, even after
         * an error, so that libssh frees its requests). */
        int r = LIB(sftp_async_read)(s->file,
                                     buf + q[tail % SSH_READ_DEPTH].pos,
                                     q[tail % SSH_READ_DEPTH].len,
                                     (uint32_t)q[tail % SSH_READ_DEPTH].id);
        if (r == SSH_EOF) {
            r = 0;          /* nothing there: short by all of it */
        }
        if (r < 0) {
            ret = -1;
            if (!LIB(ssh_is_connected)(s->session)) {
                break;      /* nothing more will come */
            }
        } else if ((uint32_t)r < q[tail % SSH_READ_DEPTH].len) {
            size_t end = q[tail % SSH_READ_DEPTH].pos + (size_t)r;
            if (end < short_at) {
                short_at = end;
            }
        }
        tail++;
    }
    if (ret < 0) {
        return -EIO;
    }
    if (short_at != (size_t)-1) {
        /* A short answer: at the end of the file, or a server that
         * answers less than asked. Read the rest in order, until a
         * read returns nothing (end of file); zeros from there. */
        size_t pos = short_at;
        if (LIB(sftp_seek64)(s->file, off + pos) < 0) {
            return -EIO;
        }
        while (pos < len) {
            size_t n = len - pos < SSH_READ_CHUNK ? len - pos
                                                  : SSH_READ_CHUNK;
            ssize_t r = LIB(sftp_read)(s->file, buf + pos, n);
            if (r < 0 && r != SSH_EOF) {
                return -EIO;
            }
            if (r <= 0) {
                memset(buf + pos, 0, len - pos);
                break;
            }
            pos += (size_t)r;
        }
    }
    return 0;
}

/* One request on the session: takes the lock, refuses a broken session,
 * runs @fn under the watchdog and turns its failure into a message
 * naming the server and @op. */
typedef struct ssh_req {
    uint64_t off;
    uint8_t *buf;
    size_t len;
} ssh_req;

static int ssh_run(ssh_state *s, const char *op,
                   int (*fn)(ssh_state *s, ssh_req *r), ssh_req *r,
                   vd_error *err)
{
    int ret;

    pthread_mutex_lock(&s->lock);
    ret = ssh_check_broken(s, err);
    if (ret == 0) {
        ssh_arm(s);
        ret = fn(s, r);
        bool fired = ssh_disarm(s);
        if (ret < 0) {
            ret = ssh_io_error(s, fired, err, op);
        }
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

static int ssh_do_read(ssh_state *s, ssh_req *r)
{
    return ssh_read_locked(s, r->off, r->buf, r->len);
}

/* Writes the request's bytes in QEMU's pieces. */
static int ssh_do_write(ssh_state *s, ssh_req *r)
{
    if (LIB(sftp_seek64)(s->file, r->off) < 0) {
        return -EIO;
    }
    for (size_t done = 0; done < r->len;) {
        size_t n = r->len - done < s->write_chunk ? r->len - done
                                                  : s->write_chunk;
        ssize_t w = LIB(sftp_write)(s->file, r->buf + done, n);
        if (w <= 0) {
            return -EIO;
        }
        done += (size_t)w;
        if (r->off + done > s->size) {
            s->size = r->off + done;
        }
    }
    return 0;
}

static int ssh_do_fsync(ssh_state *s, ssh_req *r)
{
    (void)r;
    return LIB(sftp_fsync)(s->file) < 0 ? -EIO : 0;
}

/* Reads or writes a flat buffer, as libssh takes: the request's own
 * when it is one piece (convert's chunks), else a bounce buffer. */
static int ssh_rw(vd_node *node, uint64_t off, uint64_t bytes, vd_iov *qiov,
                  bool write, vd_error *err)
{
    ssh_req r = { .off = off, .len = (size_t)bytes };
    bool flat = qiov->niov == 1 && qiov->iov[0].iov_len == bytes;
    int ret;

    r.buf = flat ? qiov->iov[0].iov_base : malloc(bytes);
    if (!r.buf) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    if (write) {
        if (!flat) {
            vd_iov_to_buf(qiov, 0, r.buf, r.len);
        }
        ret = ssh_run(node->opaque, "write", ssh_do_write, &r, err);
    } else {
        ret = ssh_run(node->opaque, "read", ssh_do_read, &r, err);
        if (ret == 0 && !flat) {
            vd_iov_from_buf(qiov, 0, r.buf, r.len);
        }
    }
    if (!flat) {
        free(r.buf);
    }
    return ret;
}

static int ssh_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                      vd_iov *qiov, unsigned flags, vd_error *err)
{
    (void)flags;
    return ssh_rw(node, off, bytes, qiov, false, err);
}

static int ssh_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                       vd_iov *qiov, unsigned flags, vd_error *err)
{
    (void)flags;
    return ssh_rw(node, off, bytes, qiov, true, err);
}

static int ssh_flush(vd_node *node, vd_error *err)
{
    ssh_state *s = node->opaque;

    if (!s->fsync_ok) {
        /* QEMU's behaviour: warn once, report success. */
        pthread_mutex_lock(&s->lock);
        if (!s->flush_warned) {
            vd_warn("ssh server %s does not support fsync", s->host);
            vd_warn("to support fsync, you need OpenSSH >= 6.3");
            s->flush_warned = true;
        }
        pthread_mutex_unlock(&s->lock);
        return 0;
    }
    return ssh_run(s, "fsync", ssh_do_fsync, NULL, err);
}

static int64_t ssh_getlength(vd_node *node)
{
    ssh_state *s = node->opaque;
    int64_t len;

    pthread_mutex_lock(&s->lock);
    len = (int64_t)s->size;
    pthread_mutex_unlock(&s->lock);
    return len;
}

/* SFTP tells nothing of allocation: "disk size: unavailable", as QEMU. */
static int64_t ssh_get_allocated_size(vd_node *node)
{
    (void)node;
    return -ENOTSUP;
}

/* Grows the file to @size by writing its last byte (QEMU's
 * ssh_grow_file()). */
static int ssh_grow(ssh_state *s, uint64_t size, vd_error *err)
{
    uint8_t zero = 0;
    ssh_req r = { .off = size - 1, .buf = &zero, .len = 1 };

    return ssh_run(s, "grow", ssh_do_write, &r, err);
}

static const char *const prealloc_names[] = {
    "off", "metadata", "falloc", "full",
};

static int ssh_truncate(vd_node *node, uint64_t size, bool exact,
                        vd_prealloc prealloc, vd_error *err)
{
    ssh_state *s = node->opaque;
    int ret;

    (void)exact;
    if (prealloc != VD_PREALLOC_OFF) {
        return vd_error_set(err, -ENOTSUP, "Unsupported preallocation mode "
                            "'%s'", prealloc_names[prealloc]);
    }
    /* Truncate runs drained: nothing else uses the session. */
    if (size < s->size) {
        return vd_error_set(err, -ENOTSUP, "ssh driver does not support "
                            "shrinking files");
    }
    if (size > s->size) {
        ret = ssh_grow(s, size, err);
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

static const vd_create_option ssh_create_opts[] = {
    { "size", "size", "Virtual disk size", NULL },
    { NULL, NULL, NULL, NULL },
};

/* Creates (or truncates to nothing) the remote file and grows it to the
 * size rounded up to 512 bytes, as QEMU's ssh_co_create_opts(). */
static int ssh_create(const char *filename, vd_opts *opts, vd_error *err)
{
    ssh_state st;
    ssh_conf c = { 0 };
    uint64_t size;
    int ret;

    ret = vd_opts_take_size(opts, "size", 0, &size, err);
    if (ret < 0) {
        return ret;
    }
    size = (size + 511) & ~(uint64_t)511;
    memset(&st, 0, sizeof(st));
    st.sock = -1;
    ret = ssh_conf_from(NULL, filename, &c, err);
    if (ret < 0) {
        return ret;
    }
    ret = ssh_watchdog_start(&st, err);
    if (ret == 0) {
        ret = ssh_connect_open(&st, &c, O_RDWR | O_CREAT | O_TRUNC, 0644,
                               err);
    }
    ssh_conf_free(&c);
    if (ret == 0 && size > 0) {
        pthread_mutex_init(&st.lock, NULL);
        ret = ssh_grow(&st, size, err);
        pthread_mutex_destroy(&st.lock);
    }
    ssh_state_free(&st);
    return ret;
}

const vd_driver vd_driver_ssh = {
    .library = &ssh_lib,
    .name = "ssh",
    .protocol_name = "ssh",
    .network = true,
    .instance_size = sizeof(ssh_state),
    .create_opts = ssh_create_opts,
    .open = ssh_open,
    .close = ssh_close,
    .create = ssh_create,
    .preadv = ssh_preadv,
    .pwritev = ssh_pwritev,
    .flush = ssh_flush,
    .getlength = ssh_getlength,
    .get_allocated_size = ssh_get_allocated_size,
    .truncate = ssh_truncate,
};
