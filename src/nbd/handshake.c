/*
 * The fixed newstyle handshake (nbd-proto.md, "Handshake") as an explicit
 * state machine, in the manner of libnbd's generator/states*.c.
 *
 * Rules: every state has one function that performs the state's single
 * step (a read, a write or a decision) and returns the next state. The
 * driver loop, nbd_handshake(), checks each transition against the
 * declared table hs_transitions[] and aborts on an undeclared one (a
 * programming error, not a client error). A function that meets an error
 * records it in conn->err and returns HS_DEAD; DEAD, CLOSED and
 * TRANSMISSION are terminal. Option handlers are a second table,
 * hs_options[], one function per option; each sends its replies and
 * names the next state. Every length from the wire is bounded before it
 * is used to size or index anything: the option payload is read into a
 * fixed buffer of NBD_MAX_OPTION_LEN bytes, and longer options are
 * skipped (up to HS_MAX_DISCARD) without being stored.
 *
 * TLS (FORCEDTLS mode of nbd-proto.md, when the server has credentials:
 * --tls-creds, or tls-creds of nbd-server-start): until
 * NBD_OPT_STARTTLS succeeds, every option but STARTTLS and ABORT gets
 * NBD_REP_ERR_TLS_REQD and EXPORT_NAME ends the connection. STARTTLS
 * replies ACK, runs the TLS handshake (tls.c) and returns to
 * RECV_OPT_HDR with nothing negotiated, so haggling starts again over
 * TLS. All reads and writes go through nbd_conn_read()/nbd_conn_write(),
 * which switch to TLS records from then on.
 */
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "nbd-proto.h"
#include "nbd-int.h"
#include "tls.h"

/* Longest option we read and throw away (answering NBD_REP_ERR_TOO_BIG)
 * rather than treating as a denial of service and disconnecting. */
#define HS_MAX_DISCARD (1024u * 1024)

typedef enum hs_state {
    HS_START,             /* send the greeting */
    HS_RECV_CLIENT_FLAGS, /* read and check the client flags */
    HS_RECV_OPT_HDR,      /* read and check an option header */
    HS_RECV_OPT_DATA,     /* read the option payload */
    HS_SKIP_OPT_DATA,     /* throw away an oversized payload */
    HS_HANDLE_OPT,        /* act on the option and reply */
    HS_TRANSMISSION,      /* terminal: an export was chosen */
    HS_CLOSED,            /* terminal: the client aborted */
    HS_DEAD,              /* terminal: error recorded in conn->err */
    HS_NR_STATES,
} hs_state;

static const char *const hs_state_names[HS_NR_STATES] = {
    [HS_START] = "START",
    [HS_RECV_CLIENT_FLAGS] = "RECV_CLIENT_FLAGS",
    [HS_RECV_OPT_HDR] = "RECV_OPT_HDR",
    [HS_RECV_OPT_DATA] = "RECV_OPT_DATA",
    [HS_SKIP_OPT_DATA] = "SKIP_OPT_DATA",
    [HS_HANDLE_OPT] = "HANDLE_OPT",
    [HS_TRANSMISSION] = "TRANSMISSION",
    [HS_CLOSED] = "CLOSED",
    [HS_DEAD] = "DEAD",
};

#define S(x) (1u << (x))

/* Declared transitions: the bit set of states each state may move to. */
static const unsigned hs_transitions[HS_NR_STATES] = {
    [HS_START] = S(HS_RECV_CLIENT_FLAGS) | S(HS_DEAD),
    [HS_RECV_CLIENT_FLAGS] = S(HS_RECV_OPT_HDR) | S(HS_DEAD),
    [HS_RECV_OPT_HDR] = S(HS_RECV_OPT_DATA) | S(HS_SKIP_OPT_DATA) |
                        S(HS_DEAD),
    [HS_RECV_OPT_DATA] = S(HS_HANDLE_OPT) | S(HS_DEAD),
    [HS_SKIP_OPT_DATA] = S(HS_RECV_OPT_HDR) | S(HS_DEAD),
    [HS_HANDLE_OPT] = S(HS_RECV_OPT_HDR) | S(HS_TRANSMISSION) |
                      S(HS_CLOSED) | S(HS_DEAD),
};

/* The handshake's working state, alive only during negotiation. */
typedef struct hs {
    nbd_conn *conn;
    uint32_t option;      /* current option */
    uint32_t length;      /* its payload length from the header */
    unsigned char *data;  /* NBD_MAX_OPTION_LEN bytes */
} hs;

/* ---- helpers ---- */

static hs_state hs_fail(hs *h, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static hs_state hs_fail(hs *h, int code, const char *fmt, ...)
{
    va_list ap;
    char msg[512];

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    vd_error_set(&h->conn->err, code, "nbd: %s", msg);
    return HS_DEAD;
}

/* Reads @len bytes or records why not. */
static int hs_read(hs *h, void *buf, size_t len, const char *what)
{
    int r = nbd_conn_read(h->conn, buf, len);

    if (r < 0) {
        vd_error_set(&h->conn->err, r, "nbd: %s while reading %s",
                     r == -EPIPE ? "client closed the connection"
                                 : strerror(-r), what);
    }
    return r;
}

static int hs_write(hs *h, struct iovec *iov, int n)
{
    int r = nbd_conn_write(h->conn, iov, n);

    if (r < 0) {
        vd_error_set(&h->conn->err, r, "nbd: cannot send to client: %s",
                     strerror(-r));
    }
    return r;
}

/* Sends one option reply of @type whose payload is @n buffers. */
static int hs_reply(hs *h, uint32_t type, struct iovec *payload, int n)
{
    struct nbd_option_reply rep;
    struct iovec iov[4];
    size_t len = 0;

    if (n > 3) {
        abort();
    }
    for (int i = 0; i < n; i++) {
        len += payload[i].iov_len;
        iov[i + 1] = payload[i];
    }
    rep.magic = htobe64(NBD_REP_MAGIC);
    rep.option = htobe32(h->option);
    rep.type = htobe32(type);
    rep.length = htobe32((uint32_t)len);
    iov[0].iov_base = &rep;
    iov[0].iov_len = sizeof(rep);
    return hs_write(h, iov, n + 1);
}

static int hs_ack(hs *h)
{
    return hs_reply(h, NBD_REP_ACK, NULL, 0);
}

/* Sends an error reply with a human message, then carries on with the
 * next option, as the spec asks of a fixed newstyle server. */
static hs_state hs_error(hs *h, uint32_t type, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static hs_state hs_error(hs *h, uint32_t type, const char *fmt, ...)
{
    char msg[512];
    struct iovec iov;
    va_list ap;
    int len;

    va_start(ap, fmt);
    len = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (len < 0) {
        len = 0;
    } else if ((size_t)len >= sizeof(msg)) {
        len = sizeof(msg) - 1;
    }
    iov.iov_base = msg;
    iov.iov_len = (size_t)len;
    return hs_reply(h, type, &iov, 1) < 0 ? HS_DEAD : HS_RECV_OPT_HDR;
}

static uint32_t get_be32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return be32toh(v);
}

static uint16_t get_be16(const unsigned char *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return be16toh(v);
}

/* ---- options ---- */

/* Sets conn->exp and its flags, forgetting meta contexts negotiated for
 * another export (they are only valid for the export they named). */
static void hs_choose_export(hs *h, nbd_export *exp)
{
    nbd_conn *c = h->conn;

    c->exp = exp;
    if (c->ctx_export != exp) {
        c->caps.ctx_bitmaps = 0;
        c->caps.ctx_base = c->caps.ctx_depth = false;
    }
    c->caps.size = nbd_export_size(c->srv, exp);
    c->caps.read_only = exp->read_only;
    c->tflags = nbd_export_tflags(c->srv, exp, c->caps.structured);
}

static hs_state opt_export_name(hs *h)
{
    nbd_conn *c = h->conn;
    nbd_export *exp;
    unsigned char reply[8 + 2 + 124];
    struct iovec iov;
    uint64_t size;
    uint16_t flags;

    if (h->length > NBD_MAX_STRING) {
        return hs_fail(h, -EINVAL, "export name of %u bytes is too long",
                       h->length);
    }
    exp = nbd_server_find_export(c->srv, (const char *)h->data, h->length);
    if (!exp) {
        /* EXPORT_NAME cannot report errors: the spec says to hang up. */
        return hs_fail(h, -ENOENT, "export '%.*s' not present",
                       (int)h->length, (const char *)h->data);
    }
    hs_choose_export(h, exp);
    size = htobe64(c->caps.size);
    flags = htobe16(c->tflags);
    memset(reply, 0, sizeof(reply));
    memcpy(reply, &size, 8);
    memcpy(reply + 8, &flags, 2);
    iov.iov_base = reply;
    iov.iov_len = c->no_zeroes ? 10 : sizeof(reply);
    return hs_write(h, &iov, 1) < 0 ? HS_DEAD : HS_TRANSMISSION;
}

static hs_state opt_abort(hs *h)
{
    /* The client may already be gone: a failed ACK changes nothing. */
    hs_ack(h);
    return HS_CLOSED;
}

static hs_state opt_list(hs *h)
{
    vd_nbd_server *srv = h->conn->srv;
    nbd_export *exp;

    if (h->length != 0) {
        return hs_error(h, NBD_REP_ERR_INVALID,
                        "NBD_OPT_LIST must not carry data");
    }
    /* An export removed meanwhile shortens the list (NULL ends it); its
     * strings stay valid, so a half-sent entry is still sound. */
    for (size_t i = 0; (exp = nbd_server_export(srv, i)) != NULL; i++) {
        uint32_t namelen = htobe32((uint32_t)strlen(exp->name));
        struct iovec iov[3] = {
            { &namelen, 4 },
            { exp->name, strlen(exp->name) },
            { exp->description ? exp->description : (char *)"",
              exp->description ? strlen(exp->description) : 0 },
        };
        if (hs_reply(h, NBD_REP_SERVER, iov, 3) < 0) {
            return HS_DEAD;
        }
    }
    return hs_ack(h) < 0 ? HS_DEAD : HS_RECV_OPT_HDR;
}

/* True while the client must still upgrade before anything else. */
static bool hs_tls_pending(const nbd_conn *c)
{
    return nbd_server_tls(c->srv) && !nbd_conn_tls_active(c);
}

static hs_state opt_starttls(hs *h)
{
    nbd_conn *c = h->conn;

    if (!nbd_server_tls(c->srv)) {
        return hs_error(h, NBD_REP_ERR_POLICY, "TLS not configured");
    }
    if (nbd_conn_tls_active(c)) {
        return hs_error(h, NBD_REP_ERR_INVALID, "TLS already started");
    }
    if (h->length != 0) {
        return hs_error(h, NBD_REP_ERR_INVALID,
                        "NBD_OPT_STARTTLS must not carry data");
    }
    if (hs_ack(h) < 0) {
        return HS_DEAD;
    }
    if (nbd_conn_starttls(c, &c->err) < 0) {
        return HS_DEAD;
    }
    /* The spec: nothing negotiated before the upgrade survives it. In
     * FORCEDTLS mode nothing could have been, but say so here rather
     * than rely on it. */
    c->exp = NULL;
    c->ctx_export = NULL;
    c->caps = (nbd_caps){ 0 };
    return HS_RECV_OPT_HDR;
}

/* Sends one NBD_REP_INFO of @type with @n payload buffers after it. */
static int hs_info(hs *h, uint16_t type, struct iovec *rest, int n)
{
    uint16_t t = htobe16(type);
    struct iovec iov[3];

    iov[0].iov_base = &t;
    iov[0].iov_len = 2;
    for (int i = 0; i < n && i < 2; i++) {
        iov[i + 1] = rest[i];
    }
    return hs_reply(h, NBD_REP_INFO, iov, n + 1);
}

/* NBD_OPT_INFO and NBD_OPT_GO: name, then a list of info requests. */
static hs_state opt_info_go(hs *h)
{
    nbd_conn *c = h->conn;
    const unsigned char *d = h->data;
    uint32_t namelen;
    uint16_t nreq;
    bool want_name = false, want_desc = false, want_bs = false;
    nbd_export *exp;
    uint16_t tflags;

    if (h->length < 6) {
        return hs_error(h, NBD_REP_ERR_INVALID, "option too short");
    }
    namelen = get_be32(d);
    if (namelen > h->length - 6) {
        return hs_error(h, NBD_REP_ERR_INVALID,
                        "name length %u exceeds the option", namelen);
    }
    if (namelen > NBD_MAX_STRING) {
        return hs_error(h, NBD_REP_ERR_TOO_BIG, "export name too long");
    }
    nreq = get_be16(d + 4 + namelen);
    if ((uint64_t)h->length != 4 + (uint64_t)namelen + 2 + 2 * (uint64_t)nreq) {
        return hs_error(h, NBD_REP_ERR_INVALID,
                        "option length does not match %u info requests",
                        nreq);
    }
    for (uint16_t i = 0; i < nreq; i++) {
        uint16_t t = get_be16(d + 4 + namelen + 2 + 2 * i);
        if (t == NBD_INFO_NAME) {
            want_name = true;
        } else if (t == NBD_INFO_DESCRIPTION) {
            want_desc = true;
        } else if (t == NBD_INFO_BLOCK_SIZE) {
            want_bs = true;
        }
        /* BLOCK_SIZE is always sent; unknown requests are ignored. */
    }

    exp = nbd_server_find_export(c->srv, (const char *)d + 4, namelen);
    if (!exp) {
        return hs_error(h, NBD_REP_ERR_UNKNOWN, "export '%.*s' not present",
                        (int)namelen, (const char *)d + 4);
    }

    if (want_name) {
        struct iovec iov = { exp->name, strlen(exp->name) };
        if (hs_info(h, NBD_INFO_NAME, &iov, 1) < 0) {
            return HS_DEAD;
        }
    }
    if (want_desc && exp->description) {
        struct iovec iov = { exp->description, strlen(exp->description) };
        if (hs_info(h, NBD_INFO_DESCRIPTION, &iov, 1) < 0) {
            return HS_DEAD;
        }
    }
    {
        /* As QEMU's server: the node's request alignment to a client
         * that asked for block sizes (or only looks, NBD_OPT_INFO), 1 to
         * one that may not honour it (the library does read-modify-write
         * for any alignment, so 1 is always safe). */
        vd_node *top = vd_user_node(exp->user);
        uint32_t min = h->option == NBD_OPT_INFO || want_bs
                       ? vd_node_request_alignment(top) : 1;
        uint32_t bs[3] = { htobe32(min), htobe32(NBD_PREFERRED_BLOCK),
                           htobe32(NBD_MAX_PAYLOAD) };
        struct iovec iov = { bs, sizeof(bs) };
        if (hs_info(h, NBD_INFO_BLOCK_SIZE, &iov, 1) < 0) {
            return HS_DEAD;
        }
    }
    tflags = nbd_export_tflags(c->srv, exp, c->caps.structured);
    {
        unsigned char buf[10];
        uint64_t size = htobe64(nbd_export_size(c->srv, exp));
        uint16_t fl = htobe16(tflags);
        struct iovec iov = { buf, sizeof(buf) };
        memcpy(buf, &size, 8);
        memcpy(buf + 8, &fl, 2);
        if (hs_info(h, NBD_INFO_EXPORT, &iov, 1) < 0) {
            return HS_DEAD;
        }
    }
    if (hs_ack(h) < 0) {
        return HS_DEAD;
    }
    if (h->option == NBD_OPT_GO) {
        hs_choose_export(h, exp);
        return HS_TRANSMISSION;
    }
    return HS_RECV_OPT_HDR;
}

static hs_state opt_structured_reply(hs *h)
{
    nbd_conn *c = h->conn;

    if (h->length != 0) {
        return hs_error(h, NBD_REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY must not carry data");
    }
    if (c->caps.structured) {
        return hs_error(h, NBD_REP_ERR_INVALID,
                        "structured reply already negotiated");
    }
    c->caps.structured = true;
    return hs_ack(h) < 0 ? HS_DEAD : HS_RECV_OPT_HDR;
}

/* The contexts a query names. For LIST, "NAMESPACE:" is a wildcard; SET
 * selects only exact names (the spec: an empty leaf SHOULD NOT select). */
/* The contexts a meta-context option selects. */
typedef struct ctx_sel {
    bool base, depth;
    uint64_t bitmaps;   /* bit i: the export's bitmap i */
} ctx_sel;

static bool ctx_is(const unsigned char *q, uint32_t len, const char *name)
{
    return len == strlen(name) && memcmp(q, name, len) == 0;
}

/*
 * Adds what query @q selects on @exp to @sel: an exact context name, and
 * for LIST also the namespace queries of the NBD spec and
 * ../shared/specs/nbd-qemu-extensions.rst ("base:", "qemu:" for every
 * qemu context, "qemu:dirty-bitmap:" for every bitmap).
 */
static void ctx_match(const unsigned char *q, uint32_t len, bool list,
                      const nbd_export *exp, ctx_sel *sel)
{
    size_t blen = strlen(NBD_CTX_DIRTY_BITMAP);
    bool all_qemu = list && ctx_is(q, len, "qemu:");

    if (ctx_is(q, len, NBD_CTX_BASE_ALLOCATION) ||
        (list && ctx_is(q, len, "base:"))) {
        sel->base = true;
    }
    if (ctx_is(q, len, NBD_CTX_ALLOCATION_DEPTH) || all_qemu) {
        sel->depth = true;
    }
    if (len < blen || memcmp(q, NBD_CTX_DIRTY_BITMAP, blen) != 0) {
        if (all_qemu) {
            sel->bitmaps = ~0ull;
        }
        return;
    }
    for (size_t i = 0; i < exp->nb_bitmaps; i++) {
        if ((list && len == blen) || ctx_is(q, len, exp->bitmaps[i].ctx)) {
            sel->bitmaps |= 1ull << i;
        }
    }
}

static int send_ctx(hs *h, uint32_t id, const char *name)
{
    uint32_t beid = htobe32(id);
    struct iovec iov[2] = { { &beid, 4 }, { (char *)name, strlen(name) } };

    return hs_reply(h, NBD_REP_META_CONTEXT, iov, 2);
}

/* NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT. */
static hs_state opt_meta_context(hs *h)
{
    nbd_conn *c = h->conn;
    const unsigned char *d = h->data;
    bool list = h->option == NBD_OPT_LIST_META_CONTEXT;
    uint32_t namelen, nq, pos, qpos;
    ctx_sel sel = { 0 };
    nbd_export *exp;

    if (!list) {
        /* SET replaces the old selection even when it fails. */
        c->caps.ctx_base = c->caps.ctx_depth = false;
        c->caps.ctx_bitmaps = 0;
        c->ctx_export = NULL;
    }
    if (!c->caps.structured) {
        return hs_error(h, NBD_REP_ERR_INVALID,
                        "structured replies not negotiated");
    }
    if (h->length < 8) {
        return hs_error(h, NBD_REP_ERR_INVALID, "option too short");
    }
    namelen = get_be32(d);
    if (namelen > h->length - 8) {
        return hs_error(h, NBD_REP_ERR_INVALID,
                        "name length %u exceeds the option", namelen);
    }
    if (namelen > NBD_MAX_STRING) {
        return hs_error(h, NBD_REP_ERR_TOO_BIG, "export name too long");
    }
    pos = 4 + namelen;
    nq = get_be32(d + pos);
    pos += 4;
    qpos = pos;
    /* Check every query before answering any (each needs 4 bytes at
     * least, so the count is bounded by the payload already). */
    for (uint32_t i = 0; i < nq; i++) {
        uint32_t qlen;
        if (h->length - pos < 4) {
            return hs_error(h, NBD_REP_ERR_INVALID,
                            "query %u runs past the option", i);
        }
        qlen = get_be32(d + pos);
        pos += 4;
        if (qlen > h->length - pos) {
            return hs_error(h, NBD_REP_ERR_INVALID,
                            "query %u runs past the option", i);
        }
        if (qlen > NBD_MAX_STRING) {
            return hs_error(h, NBD_REP_ERR_TOO_BIG, "query %u too long", i);
        }
        pos += qlen;
    }
    if (pos != h->length) {
        return hs_error(h, NBD_REP_ERR_INVALID,
                        "trailing data after the queries");
    }
    exp = nbd_server_find_export(c->srv, (const char *)d + 4, namelen);
    if (!exp) {
        return hs_error(h, NBD_REP_ERR_UNKNOWN, "export '%.*s' not present",
                        (int)namelen, (const char *)d + 4);
    }
    /* The queries were checked above; now match them on the export. */
    for (uint32_t i = 0; i < nq; i++) {
        uint32_t qlen = get_be32(d + qpos);
        ctx_match(d + qpos + 4, qlen, list, exp, &sel);
        qpos += 4 + qlen;
    }
    if (list && nq == 0) {
        sel.base = sel.depth = true;
        sel.bitmaps = ~0ull;
    }
    /* qemu:allocation-depth exists only on exports that offer it. */
    sel.depth = sel.depth && atomic_load(&exp->alloc_depth);
    if (exp->nb_bitmaps < 64) {
        sel.bitmaps &= (1ull << exp->nb_bitmaps) - 1;
    }
    /* LIST replies carry id 0, as the spec recommends. */
    if (sel.base && send_ctx(h, list ? 0 : NBD_CTX_ID_BASE,
                             NBD_CTX_BASE_ALLOCATION) < 0) {
        return HS_DEAD;
    }
    if (sel.depth && send_ctx(h, list ? 0 : NBD_CTX_ID_DEPTH,
                              NBD_CTX_ALLOCATION_DEPTH) < 0) {
        return HS_DEAD;
    }
    for (size_t i = 0; i < exp->nb_bitmaps; i++) {
        if ((sel.bitmaps >> i & 1) &&
            send_ctx(h, list ? 0 : NBD_CTX_ID_BITMAP0 + (uint32_t)i,
                     exp->bitmaps[i].ctx) < 0) {
            return HS_DEAD;
        }
    }
    if (!list) {
        c->caps.ctx_base = sel.base;
        c->caps.ctx_depth = sel.depth;
        c->caps.ctx_bitmaps = sel.bitmaps;
        c->ctx_export = exp;
    }
    return hs_ack(h) < 0 ? HS_DEAD : HS_RECV_OPT_HDR;
}

static const struct {
    uint32_t option;
    const char *name;
    hs_state (*fn)(hs *h);
} hs_options[] = {
    { NBD_OPT_EXPORT_NAME, "EXPORT_NAME", opt_export_name },
    { NBD_OPT_ABORT, "ABORT", opt_abort },
    { NBD_OPT_LIST, "LIST", opt_list },
    { NBD_OPT_STARTTLS, "STARTTLS", opt_starttls },
    { NBD_OPT_INFO, "INFO", opt_info_go },
    { NBD_OPT_GO, "GO", opt_info_go },
    { NBD_OPT_STRUCTURED_REPLY, "STRUCTURED_REPLY", opt_structured_reply },
    { NBD_OPT_LIST_META_CONTEXT, "LIST_META_CONTEXT", opt_meta_context },
    { NBD_OPT_SET_META_CONTEXT, "SET_META_CONTEXT", opt_meta_context },
};

/* ---- states ---- */

static hs_state st_start(hs *h)
{
    unsigned char greet[18];
    uint64_t m1 = htobe64(NBD_INIT_MAGIC), m2 = htobe64(NBD_OPTS_MAGIC);
    uint16_t fl = htobe16(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    struct iovec iov = { greet, sizeof(greet) };

    memcpy(greet, &m1, 8);
    memcpy(greet + 8, &m2, 8);
    memcpy(greet + 16, &fl, 2);
    return hs_write(h, &iov, 1) < 0 ? HS_DEAD : HS_RECV_CLIENT_FLAGS;
}

static hs_state st_recv_client_flags(hs *h)
{
    uint32_t flags;

    if (hs_read(h, &flags, 4, "client flags") < 0) {
        return HS_DEAD;
    }
    flags = be32toh(flags);
    if (flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
        return hs_fail(h, -EINVAL, "unknown client flags 0x%x", flags);
    }
    h->conn->fixed_newstyle = flags & NBD_FLAG_C_FIXED_NEWSTYLE;
    h->conn->no_zeroes = flags & NBD_FLAG_C_NO_ZEROES;
    return HS_RECV_OPT_HDR;
}

static hs_state st_recv_opt_hdr(hs *h)
{
    struct nbd_option_hdr hdr;

    if (hs_read(h, &hdr, sizeof(hdr), "option header") < 0) {
        return HS_DEAD;
    }
    if (be64toh(hdr.magic) != NBD_OPTS_MAGIC) {
        return hs_fail(h, -EINVAL, "bad option magic 0x%016llx",
                       (unsigned long long)be64toh(hdr.magic));
    }
    h->option = be32toh(hdr.option);
    h->length = be32toh(hdr.length);
    if (h->length > NBD_MAX_OPTION_LEN) {
        if (h->length > HS_MAX_DISCARD) {
            return hs_fail(h, -EINVAL, "option %u of %u bytes is too long",
                           h->option, h->length);
        }
        return HS_SKIP_OPT_DATA;
    }
    return HS_RECV_OPT_DATA;
}

static hs_state st_recv_opt_data(hs *h)
{
    if (h->length && hs_read(h, h->data, h->length, "option data") < 0) {
        return HS_DEAD;
    }
    return HS_HANDLE_OPT;
}

static hs_state st_skip_opt_data(hs *h)
{
    uint32_t left = h->length;

    while (left) {
        uint32_t n = left < NBD_MAX_OPTION_LEN ? left : NBD_MAX_OPTION_LEN;
        if (hs_read(h, h->data, n, "option data") < 0) {
            return HS_DEAD;
        }
        left -= n;
    }
    if (!h->conn->fixed_newstyle) {
        return hs_fail(h, -EINVAL, "option %u too long", h->option);
    }
    if (hs_tls_pending(h->conn)) {
        return hs_error(h, NBD_REP_ERR_TLS_REQD,
                        "option %u not permitted before TLS", h->option);
    }
    hs_state next = hs_error(h, NBD_REP_ERR_TOO_BIG,
                             "option of %u bytes is too long", h->length);
    return next == HS_DEAD ? HS_DEAD : HS_RECV_OPT_HDR;
}

static hs_state st_handle_opt(hs *h)
{
    nbd_conn *c = h->conn;

    if (!c->fixed_newstyle && h->option != NBD_OPT_EXPORT_NAME) {
        /* Plain newstyle has no way to refuse an option politely. */
        return hs_fail(h, -EINVAL, "option %u without fixed newstyle",
                       h->option);
    }
    if (hs_tls_pending(c) && h->option != NBD_OPT_STARTTLS &&
        h->option != NBD_OPT_ABORT) {
        if (h->option == NBD_OPT_EXPORT_NAME) {
            /* EXPORT_NAME cannot be refused: the spec says to hang up. */
            return hs_fail(h, -EPERM, "client chose an export without "
                           "starting TLS, which this server requires");
        }
        return hs_error(h, NBD_REP_ERR_TLS_REQD,
                        "option %u not permitted before TLS", h->option);
    }
    if (nbd_server_shutting_down(c->srv) && h->option != NBD_OPT_ABORT) {
        if (h->option == NBD_OPT_EXPORT_NAME) {
            return hs_fail(h, -ESHUTDOWN, "server is shutting down");
        }
        return hs_error(h, NBD_REP_ERR_SHUTDOWN, "server is shutting down");
    }
    for (size_t i = 0; i < sizeof(hs_options) / sizeof(hs_options[0]); i++) {
        if (hs_options[i].option == h->option) {
            return hs_options[i].fn(h);
        }
    }
    return hs_error(h, NBD_REP_ERR_UNSUP, "option %u not supported",
                    h->option);
}

static hs_state (*const hs_state_fns[HS_NR_STATES])(hs *h) = {
    [HS_START] = st_start,
    [HS_RECV_CLIENT_FLAGS] = st_recv_client_flags,
    [HS_RECV_OPT_HDR] = st_recv_opt_hdr,
    [HS_RECV_OPT_DATA] = st_recv_opt_data,
    [HS_SKIP_OPT_DATA] = st_skip_opt_data,
    [HS_HANDLE_OPT] = st_handle_opt,
};

enum nbd_hs_result nbd_handshake(nbd_conn *conn)
{
    hs h = { .conn = conn };
    hs_state st = HS_START;

    h.data = malloc(NBD_MAX_OPTION_LEN);
    if (!h.data) {
        vd_error_set(&conn->err, -ENOMEM, "nbd: out of memory");
        return NBD_HS_DEAD;
    }
    while (st != HS_TRANSMISSION && st != HS_CLOSED && st != HS_DEAD) {
        hs_state next = hs_state_fns[st](&h);
        if (!(hs_transitions[st] & S(next))) {
            fprintf(stderr, "nbd: undeclared handshake transition %s -> %s\n",
                    hs_state_names[st], hs_state_names[next]);
            abort();
        }
        st = next;
    }
    free(h.data);
    return st == HS_TRANSMISSION ? NBD_HS_TRANSMISSION
         : st == HS_CLOSED ? NBD_HS_CLOSED : NBD_HS_DEAD;
}

uint16_t nbd_export_tflags(vd_nbd_server *srv, const nbd_export *exp,
                           bool structured)
{
    uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH |
                 NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE;

    if (exp->read_only) {
        f |= NBD_FLAG_READ_ONLY;
    } else {
        f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES |
             NBD_FLAG_SEND_FAST_ZERO;
    }
    if (structured) {
        f |= NBD_FLAG_SEND_DF;
    }
    /* Every connection shares one node and a flush flushes all of it, so
     * multi-conn is safe; only offer it when a second client can get in. */
    if (nbd_server_multi_conn(srv)) {
        f |= NBD_FLAG_CAN_MULTI_CONN;
    }
    return f;
}
