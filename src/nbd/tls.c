/*
 * TLS for the NBD server with gnutls: the credentials of the tls-creds-*
 * objects, the session of one connection, and the connection's byte
 * stream (see tls.h for the contract and the threading rules, and
 * tls-creds.h for how the object registry loads credentials here).
 *
 * Organisation: the connection box and the plain/TLS stream come first,
 * because they are compiled with or without gnutls; then, under
 * VDISK_HAVE_GNUTLS, the credentials (loading files the way qemu's
 * crypto/tlscreds*.c expect them) and the session (handshake, peer
 * check, record I/O); finally the stubs for a build without gnutls.
 *
 * Every static name here starts with tls_: the fuzz target compiles the
 * server's .c files as one translation unit.
 */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#ifdef VDISK_HAVE_GNUTLS
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#endif

#include "tls-creds.h"
#include "tls.h"

/* Writes smaller than this are gathered into one TLS record (the
 * largest plaintext a record carries), so a reply header and its
 * payload do not cost a record each. */
#define TLS_STAGE_SIZE          16384
/* How long the final close_notify may wait for room in the socket. */
#define TLS_BYE_TIMEOUT_S       1

typedef struct tls_session tls_session;

/*
 * nbd_conn has no field for a session, so connections are allocated in
 * this box (nbd_conn first, so a pointer to one is a pointer to the
 * other). @tls is written by the connection's first thread before it
 * starts any other and only read afterwards.
 */
typedef struct tls_conn_box {
    nbd_conn conn;
    tls_session *tls;
} tls_conn_box;

static tls_session *tls_of(const nbd_conn *c)
{
    return ((const tls_conn_box *)(const void *)c)->tls;
}

static int tls_session_read(tls_session *t, void *buf, size_t len);
static ssize_t tls_session_read_some(tls_session *t, void *buf, size_t len);
static size_t tls_session_pending(tls_session *t);
static int tls_session_write(tls_session *t, struct iovec *iov, int n);
static void tls_session_end(tls_session *t, nbd_conn *c);

nbd_conn *nbd_conn_alloc(void)
{
    tls_conn_box *box = calloc(1, sizeof(*box));

    return box ? &box->conn : NULL;
}

void nbd_conn_release(nbd_conn *c)
{
    tls_conn_box *box = (tls_conn_box *)(void *)c;

    if (!box) {
        return;
    }
    if (box->tls) {
        tls_session_end(box->tls, c);
        box->tls = NULL;
    }
    free(box);
}

bool nbd_conn_tls_active(const nbd_conn *c)
{
    return tls_of(c) != NULL;
}

int nbd_conn_read(nbd_conn *c, void *buf, size_t len)
{
    tls_session *t = tls_of(c);

    return t ? tls_session_read(t, buf, len)
             : nbd_read_full(c->in_fd, buf, len);
}

ssize_t nbd_conn_read_some(nbd_conn *c, void *buf, size_t len)
{
    tls_session *t = tls_of(c);
    ssize_t n;

    if (t) {
        return tls_session_read_some(t, buf, len);
    }
    do {
        n = read(c->in_fd, buf, len);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        return errno == EAGAIN ? -ETIMEDOUT : -errno;
    }
    return n == 0 ? -EPIPE : n;
}

size_t nbd_conn_pending(nbd_conn *c)
{
    tls_session *t = tls_of(c);

    return t ? tls_session_pending(t) : 0;
}

int nbd_conn_write(nbd_conn *c, struct iovec *iov, int n)
{
    tls_session *t = tls_of(c);

    return t ? tls_session_write(t, iov, n)
             : nbd_write_full(c->out_fd, iov, n);
}

#ifdef VDISK_HAVE_GNUTLS

/* ---- credential objects ---- */

/* vd_error_set() for messages that may end in a gnutls text: those end
 * with a full stop, and ours must not. */
static int tls_fail(vd_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int tls_fail(vd_error *err, int code, const char *fmt, ...)
{
    char msg[1024];
    size_t len;
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    len = strlen(msg);
    while (len && (msg[len - 1] == '.' || msg[len - 1] == ' ' ||
                   msg[len - 1] == '\n')) {
        msg[--len] = '\0';
    }
    return vd_error_set(err, code, "%s", msg);
}

typedef enum tls_kind {
    TLS_X509,
    TLS_PSK,
} tls_kind;

/* The credentials of one tls-creds-* object (vd_nbd_tls_creds);
 * immutable once loaded, except for @refs. */
typedef struct vd_nbd_tls_creds {
    atomic_uint refs;   /* the object's and each server's */
    tls_kind kind;
    bool server;        /* endpoint=server: only those are loaded */
    bool verify_peer;   /* X.509: demand and check a client certificate */
    gnutls_certificate_credentials_t x509;
    gnutls_psk_server_credentials_t psk;
    gnutls_dh_params_t dh;
    gnutls_priority_t prio;
} tls_object;

/* qemu's default priority plus, for PSK, the key exchanges that use a
 * pre-shared key (qemu's TLS_PRIORITY_ADDITIONAL_PSK). */
#define TLS_DEFAULT_PRIORITY "NORMAL"
#define TLS_PSK_PRIORITY     ":+ECDHE-PSK:+DHE-PSK:+PSK"

static void tls_object_free(tls_object *o)
{
    if (!o) {
        return;
    }
    if (o->x509) {
        gnutls_certificate_free_credentials(o->x509);
    }
    if (o->psk) {
        gnutls_psk_free_server_credentials(o->psk);
    }
    if (o->dh) {
        gnutls_dh_params_deinit(o->dh);
    }
    if (o->prio) {
        gnutls_priority_deinit(o->prio);
    }
    free(o);
}

/* "DIR/NAME" in @buf, or an error when it does not fit. */
static int tls_path(char *buf, size_t size, const char *dir,
                    const char *name, vd_error *err)
{
    int n = snprintf(buf, size, "%s/%s", dir, name);

    if (n < 0 || (size_t)n >= size) {
        return tls_fail(err, -ENAMETOOLONG,
                            "%s: TLS credentials directory name too long",
                            dir);
    }
    return 0;
}

/* Builds DIR/NAME and checks it is readable. Returns 1 when it is, 0
 * when it is absent and optional, or a negative errno. */
static int tls_cred_file(char *buf, size_t size, const char *dir,
                         const char *name, bool required, vd_error *err)
{
    int r = tls_path(buf, size, dir, name, err);

    if (r < 0) {
        return r;
    }
    if (access(buf, R_OK) == 0) {
        return 1;
    }
    if (errno == ENOENT && !required) {
        return 0;
    }
    return vd_error_set_errno(err, -errno, "%s: cannot read TLS credentials",
                              buf);
}

/* dh-params.pem when present, else gnutls's built-in RFC 7919 groups
 * (qemu would generate fresh parameters, which takes seconds). */
static int tls_load_dh(tls_object *o, const char *dir, vd_error *err)
{
    char path[4096];
    gnutls_datum_t d = { NULL, 0 };
    int r = tls_cred_file(path, sizeof(path), dir, "dh-params.pem", false,
                          err);

    if (r <= 0) {
        if (r == 0) {
            if (o->kind == TLS_X509) {
                gnutls_certificate_set_known_dh_params(
                    o->x509, GNUTLS_SEC_PARAM_MEDIUM);
            } else {
                gnutls_psk_set_server_known_dh_params(
                    o->psk, GNUTLS_SEC_PARAM_MEDIUM);
            }
        }
        return r;
    }
    r = gnutls_load_file(path, &d);
    if (r >= 0) {
        r = gnutls_dh_params_init(&o->dh);
    }
    if (r >= 0) {
        r = gnutls_dh_params_import_pkcs3(o->dh, &d, GNUTLS_X509_FMT_PEM);
    }
    gnutls_free(d.data);
    if (r < 0) {
        return tls_fail(err, -EINVAL, "%s: cannot load DH parameters: %s",
                            path, gnutls_strerror(r));
    }
    if (o->kind == TLS_X509) {
        gnutls_certificate_set_dh_params(o->x509, o->dh);
    } else {
        gnutls_psk_set_server_dh_params(o->psk, o->dh);
    }
    return 0;
}

static int tls_load_x509(tls_object *o, const char *dir,
                         const char *key_password, vd_error *err)
{
    char ca[4096], crl[4096], cert[4096], key[4096];
    int r, has_crl;

    /* The files qemu's tls-creds-x509 reads for endpoint=server. */
    if ((r = tls_cred_file(ca, sizeof(ca), dir, "ca-cert.pem", true,
                           err)) < 0) {
        return r;
    }
    if ((has_crl = tls_cred_file(crl, sizeof(crl), dir, "ca-crl.pem",
                                 false, err)) < 0) {
        return has_crl;
    }
    if ((r = tls_cred_file(cert, sizeof(cert), dir, "server-cert.pem", true,
                           err)) < 0) {
        return r;
    }
    if ((r = tls_cred_file(key, sizeof(key), dir, "server-key.pem", true,
                           err)) < 0) {
        return r;
    }
    r = gnutls_certificate_allocate_credentials(&o->x509);
    if (r < 0) {
        return tls_fail(err, -ENOMEM, "out of memory");
    }
    r = gnutls_certificate_set_x509_trust_file(o->x509, ca,
                                               GNUTLS_X509_FMT_PEM);
    if (r <= 0) {
        return tls_fail(err, -EINVAL, "%s: no usable CA certificate%s%s",
                            ca, r < 0 ? ": " : "",
                            r < 0 ? gnutls_strerror(r) : "");
    }
    if (has_crl) {
        r = gnutls_certificate_set_x509_crl_file(o->x509, crl,
                                                 GNUTLS_X509_FMT_PEM);
        if (r < 0) {
            return tls_fail(err, -EINVAL,
                                "%s: cannot load revocation list: %s", crl,
                                gnutls_strerror(r));
        }
    }
    /* An encrypted key is opened with the password of the object's
     * passwordid secret. */
    r = gnutls_certificate_set_x509_key_file2(o->x509, cert, key,
                                              GNUTLS_X509_FMT_PEM,
                                              key_password, 0);
    if (r < 0) {
        /* qemu's words: a wrong passwordid secret ends up here. */
        return tls_fail(err, -EINVAL, "Cannot load certificate '%s' & key "
                        "'%s': %s", cert, key, gnutls_strerror(r));
    }
    return tls_load_dh(o, dir, err);
}

static int tls_load_psk(tls_object *o, const char *dir, vd_error *err)
{
    char keys[4096];
    int r = tls_cred_file(keys, sizeof(keys), dir, "keys.psk", true, err);

    if (r < 0) {
        return r;
    }
    r = gnutls_psk_allocate_server_credentials(&o->psk);
    if (r < 0) {
        return tls_fail(err, -ENOMEM, "out of memory");
    }
    /* gnutls reads the file ("username:hexkey" lines, qemu's format) at
     * every handshake, so keys can be changed without a restart. */
    r = gnutls_psk_set_server_credentials_file(o->psk, keys);
    if (r < 0) {
        return tls_fail(err, -EINVAL, "%s: cannot use PSK file: %s",
                            keys, gnutls_strerror(r));
    }
    return tls_load_dh(o, dir, err);
}

static int tls_load_priority(tls_object *o, const char *prio, vd_error *err)
{
    char buf[1024];
    const char *where = NULL;
    int n, r;

    n = snprintf(buf, sizeof(buf), "%s%s", prio ? prio : TLS_DEFAULT_PRIORITY,
                 o->kind == TLS_PSK ? TLS_PSK_PRIORITY : "");
    if (n < 0 || (size_t)n >= sizeof(buf)) {
        return tls_fail(err, -EINVAL, "TLS priority string too long");
    }
    r = gnutls_priority_init(&o->prio, buf, &where);
    if (r < 0) {
        return tls_fail(err, -EINVAL,
                            "invalid TLS priority string '%s' at '%s': %s",
                            buf, where ? where : "", gnutls_strerror(r));
    }
    return 0;
}

/* One tls-creds-* object's credentials, loaded as its configuration
 * says (tls-creds.h). */
int nbd_tls_creds_load(const nbd_tls_creds_config *cfg,
                       vd_nbd_tls_creds **out, vd_error *err)
{
    tls_object *o = calloc(1, sizeof(*o));
    int r = 0;

    *out = NULL;
    if (!o) {
        return tls_fail(err, -ENOMEM, "out of memory");
    }
    atomic_init(&o->refs, 1);
    o->kind = cfg->psk ? TLS_PSK : TLS_X509;
    o->server = cfg->server;
    /* Every tls-creds class has verify-peer; only X.509 uses it. */
    o->verify_peer = o->kind == TLS_X509 && cfg->verify_peer;
    /* Only server credentials are ever used here; client ones are
     * accepted so a shared command line parses, and refused when a
     * server is given them. */
    if (o->server) {
        r = o->kind == TLS_X509
            ? tls_load_x509(o, cfg->dir, cfg->key_password, err)
            : tls_load_psk(o, cfg->dir, err);
        if (r == 0) {
            r = tls_load_priority(o, cfg->priority, err);
        }
    }
    if (r < 0) {
        tls_object_free(o);
        return r;
    }
    *out = o;
    return 0;
}

vd_nbd_tls_creds *nbd_tls_creds_ref(vd_nbd_tls_creds *creds)
{
    atomic_fetch_add(&creds->refs, 1);
    return creds;
}

VD_API bool vd_nbd_tls_creds_is_server(const vd_nbd_tls_creds *creds)
{
    return creds->server;
}

VD_API void vd_nbd_tls_creds_unref(vd_nbd_tls_creds *creds)
{
    if (creds && atomic_fetch_sub(&creds->refs, 1) == 1) {
        tls_object_free(creds);
    }
}

/* ---- the session ---- */

struct tls_session {
    gnutls_session_t s;
    int in_fd, out_fd;
    /* Set by whichever side meets a fatal error; no close_notify then. */
    atomic_bool broken;
    /* The peer's end of stream, seen by tls_pull (read mutex held). */
    bool eof;
    /* Gathers small writes; used under the connection's send lock. */
    size_t staged;
    unsigned char stage[TLS_STAGE_SIZE];
};

/* Maps a gnutls error on the stream to a negative errno. */
static int tls_errno(int r)
{
    switch (r) {
    case GNUTLS_E_PREMATURE_TERMINATION:
    case GNUTLS_E_PUSH_ERROR:
        return -EPIPE;
    case GNUTLS_E_PULL_ERROR:
        return -ECONNRESET;
    case GNUTLS_E_AGAIN:
    case GNUTLS_E_TIMEDOUT:
        return -ETIMEDOUT;
    case GNUTLS_E_MEMORY_ERROR:
        return -ENOMEM;
    default:
        return -EPROTO;
    }
}

/*
 * gnutls treats end of stream without close_notify as fatal and
 * invalidates the whole session, sending included. But a client may
 * half-close after its last request, and the server's shutdown shuts the
 * read side on purpose, and in both cases the replies already owed must
 * still go out. So the pull function reports end of stream as EAGAIN
 * (which leaves the session intact) and remembers it in t->eof.
 */
static ssize_t tls_pull(gnutls_transport_ptr_t p, void *buf, size_t len)
{
    tls_session *t = p;
    ssize_t n = read(t->in_fd, buf, len);

    if (n == 0 && len > 0) {
        t->eof = true;
        errno = EAGAIN;
        return -1;
    }
    return n;
}

/* Readiness for gnutls's handshake timeout; the pending end of stream
 * counts as ready so that tls_pull gets to report it. */
static int tls_pull_timeout(gnutls_transport_ptr_t p, unsigned int ms)
{
    tls_session *t = p;
    struct pollfd pfd = { .fd = t->in_fd, .events = POLLIN };
    int r;

    if (t->eof) {
        return 1;
    }
    do {
        r = poll(&pfd, 1, ms == GNUTLS_INDEFINITE_TIMEOUT ? -1 : (int)ms);
    } while (r < 0 && errno == EINTR);
    return r;
}

static void tls_free_session(tls_session *t)
{
    gnutls_deinit(t->s);
    free(t);
}

/*
 * --tls-authz: the distinguished name of the client's X.509 certificate
 * must pass authorization object @authz, as QEMU 7.2's TLS session check
 * does. It is checked only when verify-peer is on (without it there is
 * no trusted certificate to name anyone) and never for PSK (QEMU 7.2
 * admits any PSK user the key file knows). Returns 0 or -EPROTO with
 * QEMU's message ("option negotiation failed: TLS x509 authz check for
 * DN is denied").
 */
static int tls_check_authz(tls_session *t, const tls_object *o,
                           const char *authz, vd_error *err)
{
    const gnutls_datum_t *certs;
    unsigned n = 0;
    gnutls_x509_crt_t crt;
    size_t len = 0;
    char *identity = NULL;
    vd_error aerr = VD_ERROR_INIT;
    int r;

    if (o->kind != TLS_X509 || !o->verify_peer) {
        return 0;
    }
    certs = gnutls_certificate_get_peers(t->s, &n);
    if (!certs || n == 0 || gnutls_x509_crt_init(&crt) < 0) {
        return tls_fail(err, -EPROTO, "No certificate peer");
    }
    /* gnutls_x509_crt_get_dn(): the DN in the order QEMU reports it. */
    if (gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER) < 0 ||
        gnutls_x509_crt_get_dn(crt, NULL, &len) !=
            GNUTLS_E_SHORT_MEMORY_BUFFER ||
        !(identity = malloc(len + 1)) ||
        gnutls_x509_crt_get_dn(crt, identity, &len) < 0) {
        gnutls_x509_crt_deinit(crt);
        free(identity);
        return tls_fail(err, -EPROTO, "Cannot read the distinguished "
                        "name of the client certificate");
    }
    gnutls_x509_crt_deinit(crt);
    r = vd_authz_is_allowed(authz, identity, &aerr);
    if (r < 0) {
        tls_fail(err, -EPROTO, "option negotiation failed: %s",
                 aerr.message);
    } else if (r == 0) {
        /* The server logs it so, as qemu-nbd. */
        tls_fail(err, -EPROTO, "option negotiation failed: TLS x509 authz "
                 "check for %s is denied", identity);
    }
    free(identity);
    return r > 0 ? 0 : -EPROTO;
}

int nbd_conn_starttls(nbd_conn *c, vd_error *err)
{
    tls_conn_box *box = (tls_conn_box *)(void *)c;
    tls_object *o = c->srv ? nbd_server_tls(c->srv) : NULL;
    tls_session *t;
    int r;

    if (!o) {
        return tls_fail(err, -EINVAL, "nbd: TLS is not configured");
    }
    if (box->tls) {
        return tls_fail(err, -EINVAL, "nbd: TLS already started");
    }
    t = calloc(1, sizeof(*t));
    if (!t) {
        return tls_fail(err, -ENOMEM, "out of memory");
    }
    r = gnutls_init(&t->s, GNUTLS_SERVER | GNUTLS_NO_SIGNAL);
    if (r < 0) {
        free(t);
        return tls_fail(err, -ENOMEM, "nbd: cannot start TLS: %s",
                            gnutls_strerror(r));
    }
    t->in_fd = c->in_fd;
    t->out_fd = c->out_fd;
    r = gnutls_priority_set(t->s, o->prio);
    if (r >= 0) {
        r = o->kind == TLS_X509
            ? gnutls_credentials_set(t->s, GNUTLS_CRD_CERTIFICATE, o->x509)
            : gnutls_credentials_set(t->s, GNUTLS_CRD_PSK, o->psk);
    }
    if (r < 0) {
        tls_free_session(t);
        return tls_fail(err, -EINVAL, "nbd: cannot start TLS: %s",
                            gnutls_strerror(r));
    }
    if (o->kind == TLS_X509) {
        gnutls_certificate_server_set_request(
            t->s, o->verify_peer ? GNUTLS_CERT_REQUIRE : GNUTLS_CERT_IGNORE);
    }
    /* Sending uses gnutls's own socket functions on the fd; receiving
     * goes through tls_pull, which needs the session. */
    gnutls_transport_set_ptr2(t->s, t,
                              (gnutls_transport_ptr_t)(intptr_t)c->out_fd);
    gnutls_transport_set_pull_function(t->s, tls_pull);
    gnutls_transport_set_pull_timeout_function(t->s, tls_pull_timeout);
    gnutls_handshake_set_timeout(
        t->s, nbd_server_handshake_limit(c->srv)
              ? nbd_server_handshake_limit(c->srv) * 1000u
              : GNUTLS_INDEFINITE_TIMEOUT);

    do {
        r = gnutls_handshake(t->s);
        /* The socket blocks, so AGAIN means its receive timeout. */
    } while (r < 0 && r != GNUTLS_E_AGAIN && !gnutls_error_is_fatal(r));
    if (r < 0) {
        int code = t->eof ? -EPIPE : tls_errno(r);
        tls_free_session(t);
        return tls_fail(err, code, "nbd: TLS handshake failed: %s",
                            gnutls_strerror(r));
    }

    if (o->kind == TLS_X509 && o->verify_peer) {
        unsigned status = 0;

        r = gnutls_certificate_verify_peers2(t->s, &status);
        if (r < 0) {
            tls_free_session(t);
            return tls_fail(err, -EPROTO, "nbd: cannot verify client "
                                "certificate: %s", gnutls_strerror(r));
        }
        if (status) {
            gnutls_datum_t why = { NULL, 0 };
            r = gnutls_certificate_verification_status_print(
                status, GNUTLS_CRT_X509, &why, 0);
            tls_fail(err, -EPROTO, "nbd: client certificate rejected: %s",
                         r >= 0 && why.data ? (char *)why.data : "invalid");
            gnutls_free(why.data);
            tls_free_session(t);
            return -EPROTO;
        }
    }
    if (nbd_server_tls_authz(c->srv) &&
        tls_check_authz(t, o, nbd_server_tls_authz(c->srv), err) < 0) {
        tls_free_session(t);
        return -EPROTO;
    }
    box->tls = t;
    return 0;
}

/* One record's worth at most (gnutls returns what one record holds). */
static ssize_t tls_session_read_some(tls_session *t, void *buf, size_t len)
{
    for (;;) {
        ssize_t n = gnutls_record_recv(t->s, buf, len);

        if (n > 0) {
            return n;
        }
        if (n == 0) {
            /* close_notify: an orderly end of stream. */
            return -EPIPE;
        }
        if (n == GNUTLS_E_INTERRUPTED) {
            continue;
        }
        if (n == GNUTLS_E_AGAIN && t->eof) {
            return -EPIPE;
        }
        if (n == GNUTLS_E_REHANDSHAKE) {
            /* Renegotiation would race with the other threads' sends. */
            atomic_store(&t->broken, true);
            return -EPROTO;
        }
        if (n != GNUTLS_E_AGAIN && !gnutls_error_is_fatal((int)n)) {
            continue;   /* a warning alert */
        }
        if (n != GNUTLS_E_AGAIN) {
            atomic_store(&t->broken, true);
        }
        return tls_errno((int)n);
    }
}

static size_t tls_session_pending(tls_session *t)
{
    return gnutls_record_check_pending(t->s);
}

static int tls_session_read(tls_session *t, void *buf, size_t len)
{
    char *p = buf;

    while (len) {
        ssize_t n = tls_session_read_some(t, p, len);

        if (n < 0) {
            return (int)n;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Sends @len bytes as records, however many calls that takes. */
static int tls_push(tls_session *t, const void *buf, size_t len)
{
    const char *p = buf;

    while (len) {
        ssize_t n = gnutls_record_send(t->s, p, len);

        if (n > 0) {
            p += n;
            len -= (size_t)n;
            continue;
        }
        if (n == GNUTLS_E_INTERRUPTED) {
            continue;
        }
        if (n == GNUTLS_E_AGAIN) {
            /* Only a send timeout makes a blocking socket say this; wait
             * for room rather than spin, then repeat the same call. */
            struct pollfd pfd = { .fd = t->out_fd, .events = POLLOUT };
            poll(&pfd, 1, 1000);
            continue;
        }
        atomic_store(&t->broken, true);
        return n == 0 ? -EIO : tls_errno((int)n);
    }
    return 0;
}

static int tls_flush_stage(tls_session *t)
{
    size_t len = t->staged;

    t->staged = 0;
    return len ? tls_push(t, t->stage, len) : 0;
}

/*
 * Small pieces (headers, short payloads) are copied into the stage and
 * go out as one record; a piece that still has a full record's worth
 * once the stage is topped up and flushed is sent straight from the
 * caller's buffer, so a 32 MiB read is not copied.
 */
static int tls_session_write(tls_session *t, struct iovec *iov, int n)
{
    int r;

    if (atomic_load(&t->broken)) {
        return -EPIPE;
    }
    for (int i = 0; i < n; i++) {
        const char *p = iov[i].iov_base;
        size_t len = iov[i].iov_len;

        while (len) {
            if (t->staged == 0 && len >= TLS_STAGE_SIZE) {
                r = tls_push(t, p, len);
                if (r < 0) {
                    return r;
                }
                break;
            }
            size_t k = TLS_STAGE_SIZE - t->staged;
            if (k > len) {
                k = len;
            }
            memcpy(t->stage + t->staged, p, k);
            t->staged += k;
            p += k;
            len -= k;
            if (t->staged == TLS_STAGE_SIZE && (r = tls_flush_stage(t)) < 0) {
                return r;
            }
        }
    }
    return tls_flush_stage(t);
}

static void tls_session_end(tls_session *t, nbd_conn *c)
{
    if (!atomic_load(&t->broken) && !atomic_load(&c->send_failed)) {
        /* A client that stopped reading must not hold us here. */
        struct timeval tv = { .tv_sec = TLS_BYE_TIMEOUT_S };
        setsockopt(t->out_fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        gnutls_bye(t->s, GNUTLS_SHUT_WR);
    }
    tls_free_session(t);
}

#else /* !VDISK_HAVE_GNUTLS */

struct tls_session {
    int unused;
};

int nbd_tls_creds_load(const nbd_tls_creds_config *cfg,
                       vd_nbd_tls_creds **out, vd_error *err)
{
    (void)cfg;
    *out = NULL;
    return vd_error_set(err, -ENOTSUP, "TLS support is not compiled in");
}

vd_nbd_tls_creds *nbd_tls_creds_ref(vd_nbd_tls_creds *creds)
{
    return creds;
}

VD_API bool vd_nbd_tls_creds_is_server(const vd_nbd_tls_creds *creds)
{
    (void)creds;
    return false;
}

VD_API void vd_nbd_tls_creds_unref(vd_nbd_tls_creds *creds)
{
    (void)creds;
}

int nbd_conn_starttls(nbd_conn *c, vd_error *err)
{
    (void)c;
    return vd_error_set(err, -ENOTSUP, "nbd: TLS support is not compiled in");
}

static int tls_session_read(tls_session *t, void *buf, size_t len)
{
    (void)t;
    (void)buf;
    (void)len;
    return -ENOTSUP;
}

static size_t tls_session_pending(tls_session *t)
{
    (void)t;
    return 0;
}

static ssize_t tls_session_read_some(tls_session *t, void *buf, size_t len)
{
    (void)t;
    (void)buf;
    (void)len;
    return -ENOTSUP;
}

static int tls_session_write(tls_session *t, struct iovec *iov, int n)
{
    (void)t;
    (void)iov;
    (void)n;
    return -ENOTSUP;
}

static void tls_session_end(tls_session *t, nbd_conn *c)
{
    (void)t;
    (void)c;
}

#endif /* VDISK_HAVE_GNUTLS */
