/*
 * The "http", "https", "ftp" and "ftps" protocol drivers on libcurl:
 * a read-only image served by a web (or FTP) server, read with byte-range
 * requests, as QEMU 7.2's block/curl.c (options of BlockdevOptionsCurlBase,
 * ../shared/specs/block-core.json; ../shared/specs/qemu-block-drivers.rst.inc).
 *
 * Open sends one HEAD request: the Content-Length is the image's size, and
 * an http(s) server must answer "Accept-Ranges: bytes" or the image is
 * refused as QEMU refuses it. Reads are GET requests with a Range header.
 *
 * Threads. vdisk issues a request in the caller's thread (docs/
 * concurrency.md), so each read runs curl_easy_perform() itself on one of
 * CURL_SLOTS easy handles; a curl easy handle must not be used by two
 * threads at once, so a slot is owned by one request at a time and
 * requests beyond CURL_SLOTS wait on the node's condition variable. Each
 * handle keeps its connection alive between requests.
 *
 * The read-ahead cache. A read smaller than "readahead" fetches the
 * readahead bytes after it as well, into the slot's buffer; that buffer
 * stays valid after the transfer and later reads inside it are copied out
 * without a request (the least recently used slot is the one reused).
 * Reads inside a transfer still in progress wait for the bytes they need
 * rather than fetch them twice. Larger reads go straight into the
 * caller's buffers with no read-ahead (a bulk copy gains nothing from
 * it), so memory stays bounded by CURL_SLOTS * 2 * readahead.
 *
 * What QEMU does not check and we do: a 206 reply's Content-Range total
 * must be the size found at open (else the image changed size under us),
 * a range request answered by a plain 200 is refused (the body would be
 * the wrong bytes), and a short reply is an error rather than a hang.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <curl/curl.h>

#include "core/block_int.h"
#include "common/dlib.h"

/* The library's functions this driver calls (common/dlib.h: loaded at
 * the first open or create, not linked). */
#define CURL_LIB_FUNCS(X) \
    X(curl_easy_cleanup) \
    X(curl_easy_getinfo) \
    X(curl_easy_init) \
    X(curl_easy_perform) \
    X(curl_easy_setopt) \
    X(curl_easy_strerror) \
    X(curl_global_init)
VD_DLIB_DEFINE(curl_lib, VDISK_LIBCURL_SONAME, CURL_LIB_FUNCS);

/* Transfers in flight per node (QEMU's CURL_NUM_STATES). */
#define CURL_SLOTS 8
#define CURL_READAHEAD_DEFAULT (256 * 1024)
#define CURL_TIMEOUT_DEFAULT 5
#define CURL_TIMEOUT_MAX 10000

typedef struct curl_state curl_state;

/* One easy handle, and the buffer of the last buffered transfer made
 * with it (the read-ahead cache entry). Fields other than @h, @buf's
 * contents past @filled and @errbuf are changed under the node's lock. */
typedef struct curl_slot {
    CURL *h;
    bool busy;              /* a request owns the handle */
    bool cached;            /* [start, start+len) is being or was buffered */
    uint64_t start;
    size_t len;
    size_t filled;          /* bytes of @buf received so far */
    uint8_t *buf;
    size_t cap;
    uint64_t stamp;         /* last use, for LRU */
    char errbuf[CURL_ERROR_SIZE];
} curl_slot;

/* One transfer: where its bytes go and what went wrong. */
typedef struct curl_xfer {
    curl_state *s;
    curl_slot *slot;
    uint64_t start;
    uint64_t want;          /* bytes asked for */
    uint64_t got;
    vd_iov *qiov;           /* direct: the caller's buffers... */
    size_t qoff;            /* ...from this offset; NULL: into slot->buf */
    bool checked;           /* the reply's status was looked at */
    char why[512];          /* our own reason to abort, or "" */
} curl_xfer;

struct curl_state {
    char *url;
    const char *proto;      /* the driver's protocol name */
    bool is_http;
    uint64_t len;
    size_t readahead;
    uint64_t timeout;
    bool sslverify;
    char *cookie;
    char *username;
    char *password;
    char *proxyusername;
    char *proxypassword;
    bool accept_range;      /* set by the HEAD's header callback */

    pthread_mutex_t lock;
    pthread_cond_t cond;    /* a slot became free or received bytes */
    int waiters;            /* threads waiting for bytes in a slot */
    uint64_t clock;
    curl_slot slots[CURL_SLOTS];
};

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_result;

/* curl_global_init() is not thread-safe; run it once for the process. */
static void curl_global_once(void)
{
    curl_init_result = LIB(curl_global_init)(CURL_GLOBAL_ALL);
}

static void wipe_free(char *p)
{
    if (p) {
        explicit_bzero(p, strlen(p));
        free(p);
    }
}

/* ---- callbacks ---- */

/* Header lines of every reply, also of redirects: a status line starts a
 * new reply. At open we look for Accept-Ranges; on reads for the total of
 * Content-Range. */
static size_t curl_header_cb(char *ptr, size_t size, size_t nmemb,
                             void *opaque)
{
    curl_xfer *x = opaque;
    size_t n = size * nmemb;
    curl_state *s = x->s;
    char line[256];
    size_t l = n < sizeof(line) - 1 ? n : sizeof(line) - 1;

    memcpy(line, ptr, l);
    line[l] = 0;
    if (!strncasecmp(line, "HTTP/", 5)) {
        if (!x->qiov && !x->slot) {
            s->accept_range = false;
        }
        return n;
    }
    if (!x->qiov && !x->slot) {
        /* The HEAD at open: QEMU wants exactly "bytes". */
        if (!strncasecmp(line, "Accept-Ranges:", 14)) {
            const char *v = line + 14;
            v += strspn(v, " \t");
            if (!strncasecmp(v, "bytes", 5)) {
                s->accept_range = true;
            }
        }
        return n;
    }
    if (!strncasecmp(line, "Content-Range:", 14)) {
        const char *slash = strchr(line, '/');
        if (slash && slash[1] != '*') {
            char *end;
            unsigned long long total = strtoull(slash + 1, &end, 10);
            if (end != slash + 1 && total != s->len) {
                snprintf(x->why, sizeof(x->why), "%s changed size from %"
                         PRIu64 " to %llu bytes since it was opened",
                         s->url, s->len, total);
                return 0;       /* aborts the transfer */
            }
        }
    }
    return n;
}

/* Body bytes: into the caller's buffers or the slot's. */
static size_t curl_write_cb(char *ptr, size_t size, size_t nmemb,
                            void *opaque)
{
    curl_xfer *x = opaque;
    curl_state *s = x->s;
    size_t n = size * nmemb;

    if (!x->checked) {
        long code = 0;
        x->checked = true;
        LIB(curl_easy_getinfo)(x->slot->h, CURLINFO_RESPONSE_CODE, &code);
        /* A 200 to a range request carries the whole file from byte 0:
         * the wrong bytes unless that is what we asked for. */
        if (s->is_http && code != 206 &&
            !(x->start == 0 && x->want == s->len)) {
            snprintf(x->why, sizeof(x->why), "Server does not support "
                     "'range' (byte ranges).");
            return 0;
        }
    }
    if (n > x->want - x->got) {
        n = (size_t)(x->want - x->got);   /* more than asked: drop it */
    }
    if (x->qiov) {
        vd_iov_from_buf(x->qiov, x->qoff + (size_t)x->got, ptr, n);
        x->got += n;
    } else {
        curl_slot *slot = x->slot;
        memcpy(slot->buf + x->got, ptr, n);
        x->got += n;
        pthread_mutex_lock(&s->lock);
        slot->filled = (size_t)x->got;
        if (s->waiters) {
            pthread_cond_broadcast(&s->cond);
        }
        pthread_mutex_unlock(&s->lock);
    }
    return size * nmemb;
}

/* ---- handles ---- */

/* The options every request of the node shares (QEMU's curl_init_state). */
static int curl_setup_handle(curl_state *s, CURL *h, char *errbuf)
{
    CURLcode rc = CURLE_OK;

#define SET(opt, val)                                                     \
    do {                                                                  \
        if (rc == CURLE_OK) {                                             \
            rc = LIB(curl_easy_setopt)(h, opt, val);                        \
        }                                                                 \
    } while (0)
    SET(CURLOPT_URL, s->url);
    SET(CURLOPT_SSL_VERIFYPEER, (long)s->sslverify);
    SET(CURLOPT_SSL_VERIFYHOST, s->sslverify ? 2L : 0L);
    if (!s->sslverify) {
        /* Nothing to verify against: spare every handle the parsing of
         * the system's CA bundle (megabytes of memory each). */
        SET(CURLOPT_CAINFO, NULL);
        SET(CURLOPT_CAPATH, NULL);
    }
    if (s->cookie) {
        SET(CURLOPT_COOKIE, s->cookie);
    }
    /* QEMU's timeout bounds a whole transfer; ours bounds each wait
     * (connecting, and any stall of the reply), so that a large read on a
     * slow link is not cut off while a dead server still fails in time. */
    SET(CURLOPT_CONNECTTIMEOUT, (long)s->timeout);
    if (s->timeout) {
        SET(CURLOPT_LOW_SPEED_LIMIT, 1L);
        SET(CURLOPT_LOW_SPEED_TIME, (long)s->timeout);
    }
    SET(CURLOPT_AUTOREFERER, 1L);
    SET(CURLOPT_FOLLOWLOCATION, 1L);
    SET(CURLOPT_MAXREDIRS, 20L);
    /* No SIGALRM for DNS timeouts: we run in the caller's threads. */
    SET(CURLOPT_NOSIGNAL, 1L);
    SET(CURLOPT_ERRORBUFFER, errbuf);
    SET(CURLOPT_FAILONERROR, 1L);
    SET(CURLOPT_BUFFERSIZE, 256L * 1024);
    if (s->username) {
        SET(CURLOPT_USERNAME, s->username);
    }
    if (s->password) {
        SET(CURLOPT_PASSWORD, s->password);
    }
    if (s->proxyusername) {
        SET(CURLOPT_PROXYUSERNAME, s->proxyusername);
    }
    if (s->proxypassword) {
        SET(CURLOPT_PROXYPASSWORD, s->proxypassword);
    }
    /* As QEMU (CVE-2013-0249): no other protocol, also not by redirect. */
#if LIBCURL_VERSION_NUM >= 0x075500
    SET(CURLOPT_PROTOCOLS_STR, "http,https,ftp,ftps");
    SET(CURLOPT_REDIR_PROTOCOLS_STR, "http,https,ftp,ftps");
#else
    SET(CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS |
                                  CURLPROTO_FTP | CURLPROTO_FTPS));
    SET(CURLOPT_REDIR_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS |
                                        CURLPROTO_FTP | CURLPROTO_FTPS));
#endif
#undef SET
    return rc == CURLE_OK ? 0 : -EINVAL;
}

/* ---- open and close ---- */

static void curl_free_state(curl_state *s)
{
    for (int i = 0; i < CURL_SLOTS; i++) {
        if (s->slots[i].h) {
            LIB(curl_easy_cleanup)(s->slots[i].h);
        }
        free(s->slots[i].buf);
    }
    free(s->url);
    wipe_free(s->cookie);
    free(s->username);
    wipe_free(s->password);
    free(s->proxyusername);
    wipe_free(s->proxypassword);
}

/* Takes a secret option's value: NULL without the option (and 0), the
 * secret's text, or NULL with @err set (-errno in *ret). */
static char *take_secret(vd_opts *opts, const char *key, int *ret,
                         vd_error *err)
{
    char *id = vd_opts_take(opts, key);
    char *val;

    *ret = 0;
    if (!id) {
        return NULL;
    }
    val = vd_secret_get_utf8(id, err);
    free(id);
    if (!val) {
        *ret = -EINVAL;
    }
    return val;
}

/* What the HEAD "returns" as a body is dropped: libcurl hands an FTP
 * server's size as "Content-Length: N" text to the write callback, whose
 * default is fwrite() to stdout (into `vdisk info`'s output). */
static size_t curl_discard_cb(char *ptr, size_t size, size_t nmemb,
                              void *opaque)
{
    (void)ptr;
    (void)opaque;
    return size * nmemb;
}

/* The size and range support, with one HEAD request (QEMU's curl_open). */
static int curl_probe(curl_state *s, vd_error *err)
{
    curl_slot *slot = &s->slots[0];
    curl_xfer x = { .s = s };
    curl_off_t d = -1;
    CURLcode rc;

    slot->h = LIB(curl_easy_init)();
    if (!slot->h || curl_setup_handle(s, slot->h, slot->errbuf) < 0) {
        return vd_error_set(err, -EIO, "CURL: Error opening file: "
                            "cannot set up a curl handle");
    }
    LIB(curl_easy_setopt)(slot->h, CURLOPT_NOBODY, 1L);
    LIB(curl_easy_setopt)(slot->h, CURLOPT_WRITEFUNCTION, curl_discard_cb);
    LIB(curl_easy_setopt)(slot->h, CURLOPT_HEADERFUNCTION, curl_header_cb);
    LIB(curl_easy_setopt)(slot->h, CURLOPT_HEADERDATA, &x);
    /* The HEAD is bounded as a whole, as QEMU's timeout. */
    LIB(curl_easy_setopt)(slot->h, CURLOPT_TIMEOUT, (long)s->timeout);
    slot->errbuf[0] = 0;
    rc = LIB(curl_easy_perform)(slot->h);
    if (rc != CURLE_OK) {
        return vd_error_set(err, -EIO, "CURL: Error opening file: %s",
                            slot->errbuf[0] ? slot->errbuf
                                            : LIB(curl_easy_strerror)(rc));
    }
    if (LIB(curl_easy_getinfo)(slot->h, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &d)
        != CURLE_OK || d < 0) {
        return vd_error_set(err, -EIO, "CURL: Error opening file: Server "
                            "didn't report file size.");
    }
    s->len = (uint64_t)d;
    if (s->is_http && !s->accept_range) {
        return vd_error_set(err, -EIO, "CURL: Error opening file: Server "
                            "does not support 'range' (byte ranges).");
    }
    /* Back to plain GETs for the reads, on the same connection. */
    LIB(curl_easy_setopt)(slot->h, CURLOPT_NOBODY, 0L);
    LIB(curl_easy_setopt)(slot->h, CURLOPT_HTTPGET, 1L);
    LIB(curl_easy_setopt)(slot->h, CURLOPT_TIMEOUT, 0L);
    return 0;
}

static int curl_open(vd_node *node, vd_opts *opts, unsigned flags,
                     vd_error *err)
{
    curl_state *s = node->opaque;
    const char *proto = node->drv->protocol_name;
    char *url, *cookie, *cookie_secret;
    uint64_t ra;
    int ret;

    memset(s, 0, sizeof(*s));
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);

    if (flags & VD_NODE_RDWR) {
        return vd_error_set(err, -EACCES, "curl driver does not support "
                            "writes");
    }
    pthread_once(&curl_once, curl_global_once);
    if (curl_init_result != CURLE_OK) {
        return vd_error_set(err, -EIO, "libcurl initialization failed with "
                            "%d", (int)curl_init_result);
    }

    /* The filename is the URL (QEMU's curl_parse_filename). */
    url = vd_opts_take(opts, "url");
    {
        char *fname = vd_opts_take(opts, "filename");
        if (!url && fname) {
            url = fname;
        } else {
            free(fname);
        }
    }
    if (!url && node->filename && node->filename[0] &&
        strncmp(node->filename, "json:", 5) != 0) {
        url = strdup(node->filename);
    }

    ret = vd_opts_take_size(opts, "readahead", CURL_READAHEAD_DEFAULT, &ra,
                            err);
    if (ret < 0) {
        goto fail;
    }
    if (ra & 0x1ff) {
        ret = vd_error_set(err, -EINVAL, "HTTP_READAHEAD_SIZE %" PRIu64
                           " is not a multiple of 512", ra);
        goto fail;
    }
    if (ra > (1u << 30)) {
        ret = vd_error_set(err, -EINVAL, "Parameter 'readahead' is too "
                           "large");
        goto fail;
    }
    s->readahead = (size_t)ra;
    ret = vd_opts_take_uint(opts, "timeout", CURL_TIMEOUT_DEFAULT,
                            &s->timeout, err);
    if (ret < 0) {
        goto fail;
    }
    if (s->timeout > CURL_TIMEOUT_MAX) {
        ret = vd_error_set(err, -EINVAL, "timeout parameter is too large or "
                           "negative");
        goto fail;
    }
    ret = vd_opts_take_bool(opts, "sslverify", true, &s->sslverify, err);
    if (ret < 0) {
        goto fail;
    }
    cookie = vd_opts_take(opts, "cookie");
    cookie_secret = vd_opts_take(opts, "cookie-secret");
    if (cookie && cookie_secret) {
        wipe_free(cookie);
        free(cookie_secret);
        ret = vd_error_set(err, -EINVAL, "curl driver cannot handle both "
                           "cookie and cookie secret");
        goto fail;
    }
    if (cookie_secret) {
        s->cookie = vd_secret_get_utf8(cookie_secret, err);
        free(cookie_secret);
        if (!s->cookie) {
            ret = -EINVAL;
            goto fail;
        }
    } else {
        s->cookie = cookie;
    }

    if (!url) {
        ret = vd_error_set(err, -EINVAL, "curl block driver requires an "
                           "'url' option");
        goto fail;
    }
    {
        size_t pl = strlen(proto);
        if (strncmp(url, proto, pl) != 0 || strncmp(url + pl, "://", 3)) {
            ret = vd_error_set(err, -EINVAL, "%s curl driver cannot handle "
                               "the URL '%s' (does not start with '%s://')",
                               proto, url, proto);
            goto fail;
        }
    }
    s->url = url;
    url = NULL;
    s->proto = proto;
    s->is_http = !strcmp(proto, "http") || !strcmp(proto, "https");

    s->username = vd_opts_take(opts, "username");
    s->password = take_secret(opts, "password-secret", &ret, err);
    if (ret < 0) {
        goto fail;
    }
    s->proxyusername = vd_opts_take(opts, "proxy-username");
    s->proxypassword = take_secret(opts, "proxy-password-secret", &ret, err);
    if (ret < 0) {
        goto fail;
    }

    ret = curl_probe(s, err);
    if (ret < 0) {
        goto fail;
    }
    if (!node->filename && !(node->filename = strdup(s->url))) {
        ret = vd_error_set(err, -ENOMEM, "Out of memory");
        goto fail;
    }
    node->bl.request_alignment = 1;
    return 0;

fail:
    free(url);
    curl_free_state(s);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->lock);
    memset(s, 0, sizeof(*s));
    return ret;
}

static void curl_close(vd_node *node)
{
    curl_state *s = node->opaque;

    curl_free_state(s);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->lock);
}

static int64_t curl_getlength(vd_node *node)
{
    curl_state *s = node->opaque;

    return (int64_t)s->len;
}

/* ---- reads ---- */

/* Fetches [x->start, x->start + x->want) with the slot's handle, without
 * the node's lock. */
static int curl_fetch(curl_state *s, curl_xfer *x, vd_error *err)
{
    curl_slot *slot = x->slot;
    char range[64];
    CURLcode rc;

    if (!slot->h) {
        slot->h = LIB(curl_easy_init)();
        if (!slot->h || curl_setup_handle(s, slot->h, slot->errbuf) < 0) {
            return vd_error_set(err, -EIO, "curl: %s: cannot set up a curl "
                                "handle", s->url);
        }
    }
    snprintf(range, sizeof(range), "%" PRIu64 "-%" PRIu64, x->start,
             x->start + x->want - 1);
    LIB(curl_easy_setopt)(slot->h, CURLOPT_RANGE, range);
    LIB(curl_easy_setopt)(slot->h, CURLOPT_WRITEFUNCTION, curl_write_cb);
    LIB(curl_easy_setopt)(slot->h, CURLOPT_WRITEDATA, x);
    LIB(curl_easy_setopt)(slot->h, CURLOPT_HEADERFUNCTION, curl_header_cb);
    LIB(curl_easy_setopt)(slot->h, CURLOPT_HEADERDATA, x);
    slot->errbuf[0] = 0;
    rc = LIB(curl_easy_perform)(slot->h);
    if (x->why[0]) {
        vd_warn("curl: %s", x->why);
        return vd_error_set(err, -EIO, "curl: %s", x->why);
    }
    if (rc != CURLE_OK) {
        /* As QEMU, curl's own words, which name the host; and the URL. */
        const char *msg = slot->errbuf[0] ? slot->errbuf
                                          : LIB(curl_easy_strerror)(rc);
        vd_warn("curl: %s: %s", s->url, msg);
        return vd_error_set(err, -EIO, "curl: %s: %s", s->url, msg);
    }
    if (x->got < x->want) {
        vd_warn("curl: %s: the server sent %" PRIu64 " of the %" PRIu64
                " bytes at offset %" PRIu64 " (did the file change size?)",
                s->url, x->got, x->want, x->start);
        return vd_error_set(err, -EIO, "curl: %s: short reply", s->url);
    }
    return 0;
}

/* A slot whose buffer holds or will hold byte @at (lock held). */
static curl_slot *cache_lookup(curl_state *s, uint64_t at)
{
    for (int i = 0; i < CURL_SLOTS; i++) {
        curl_slot *slot = &s->slots[i];
        if (slot->cached && at >= slot->start &&
            at - slot->start < slot->len &&
            (slot->busy || at - slot->start < slot->filled)) {
            return slot;
        }
    }
    return NULL;
}

/* The free slot used least recently (lock held), or NULL. */
static curl_slot *slot_get(curl_state *s)
{
    curl_slot *best = NULL;

    for (int i = 0; i < CURL_SLOTS; i++) {
        curl_slot *slot = &s->slots[i];
        if (!slot->busy && (!best || slot->stamp < best->stamp)) {
            best = slot;
        }
    }
    return best;
}

static int curl_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                       vd_iov *qiov, unsigned flags, vd_error *err)
{
    curl_state *s = node->opaque;
    uint64_t pos = 0;
    int ret = 0;

    (void)flags;
    pthread_mutex_lock(&s->lock);
    while (pos < bytes) {
        uint64_t at = off + pos;
        uint64_t left = bytes - pos;
        curl_slot *slot;

        /* The core reads up to the length rounded up to 512 bytes. */
        if (at >= s->len) {
            vd_iov_memset(qiov, (size_t)pos, 0, (size_t)left);
            break;
        }
        if (left > s->len - at) {
            vd_iov_memset(qiov, (size_t)(s->len - off), 0,
                          (size_t)(left - (s->len - at)));
            bytes = s->len - off;
            left = bytes - pos;
        }

        slot = cache_lookup(s, at);
        if (slot) {
            uint64_t have = slot->start + slot->filled;
            if (at < have) {
                uint64_t n = have - at < left ? have - at : left;
                vd_iov_from_buf(qiov, (size_t)pos,
                                slot->buf + (at - slot->start), (size_t)n);
                slot->stamp = ++s->clock;
                pos += n;
                continue;
            }
            /* In flight: wait for the bytes (or its end). */
            s->waiters++;
            pthread_cond_wait(&s->cond, &s->lock);
            s->waiters--;
            continue;
        }

        slot = slot_get(s);
        if (!slot) {
            pthread_cond_wait(&s->cond, &s->lock);
            continue;
        }

        curl_xfer x = { .s = s, .slot = slot, .start = at };
        bool buffered = left < s->readahead;
        if (buffered) {
            uint64_t want = left + s->readahead;
            if (want > s->len - at) {
                want = s->len - at;
            }
            if (slot->cap < want) {
                uint8_t *nb = realloc(slot->buf, (size_t)want);
                if (!nb) {
                    ret = vd_error_set(err, -ENOMEM, "Out of memory");
                    break;
                }
                slot->buf = nb;
                slot->cap = (size_t)want;
            }
            x.want = want;
        } else {
            x.want = left;
            x.qiov = qiov;
            x.qoff = (size_t)pos;
        }
        slot->busy = true;
        slot->cached = buffered;
        slot->start = at;
        slot->len = buffered ? (size_t)x.want : 0;
        slot->filled = 0;
        slot->stamp = ++s->clock;
        pthread_mutex_unlock(&s->lock);

        ret = curl_fetch(s, &x, err);

        pthread_mutex_lock(&s->lock);
        slot->busy = false;
        if (ret < 0) {
            slot->cached = false;
        }
        pthread_cond_broadcast(&s->cond);
        if (ret < 0) {
            break;
        }
        if (!buffered) {
            pos += x.want;
        }
        /* Buffered: the next turn copies from the slot, still ours
         * since the lock was not dropped. */
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

/* Every node of the four drivers is the same but for its protocol. */
#define CURL_DRIVER(NAME)                                                 \
    {                                                                     \
        .name = NAME,                                                     \
        .protocol_name = NAME,                                            \
        .network = true,                                                  \
        .instance_size = sizeof(curl_state),                              \
        .open = curl_open,                                                \
        .close = curl_close,                                              \
        .preadv = curl_preadv,                                            \
        .getlength = curl_getlength,                                      \
        .library = &curl_lib,                                             \
    }

const vd_driver vd_driver_http = CURL_DRIVER("http");
const vd_driver vd_driver_https = CURL_DRIVER("https");
const vd_driver vd_driver_ftp = CURL_DRIVER("ftp");
const vd_driver vd_driver_ftps = CURL_DRIVER("ftps");
