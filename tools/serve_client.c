/*
 * The client sides of qemu-nbd (../shared/specs/qemu-nbd.rst), which
 * `vdisk serve` and vdisk invoked as qemu-nbd share: -L/--list, which
 * connects to an NBD server and prints its exports in qemu-nbd's layout
 * (on libnbd), and -c/-d, which bind a /dev/nbdN device of the kernel's
 * NBD client to the export being served, or unbind one. cmd_serve.c
 * parses and checks the command line; this file only talks to the
 * server and the kernel, with qemu-nbd's messages.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <pthread.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#ifdef __linux__
#include <linux/nbd.h>
#endif
#ifdef VDISK_HAVE_LIBNBD
#include <json-c/json.h>
#include <libnbd.h>

#include "dlib.h"
#endif

#include "serve_client.h"
#include "util.h"
#include "vdisk/vdisk.h"

/*
 * Connects a stream socket to the server as qemu-nbd's client does: the
 * UNIX socket @sockpath, or TCP @host:@port. Returns the descriptor or
 * -1 after qemu-nbd's message ("Failed to connect to 'PATH': ERROR",
 * "address resolution failed for HOST:PORT: ERROR").
 */
static int client_connect(const char *sockpath, const char *host,
                          const char *port)
{
    struct addrinfo hints = { .ai_family = AF_UNSPEC,
                              .ai_socktype = SOCK_STREAM };
    struct addrinfo *res, *ai;
    int fd = -1, e = 0, r;

    if (sockpath) {
        struct sockaddr_un sun = { .sun_family = AF_UNIX };

        if (strlen(sockpath) >= sizeof(sun.sun_path)) {
            cli_error("UNIX socket path '%s' is too long", sockpath);
            fprintf(stderr, "Path must be less than %zu bytes\n",
                    sizeof(sun.sun_path));
            return -1;
        }
        strcpy(sun.sun_path, sockpath);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
            e = errno;
            if (fd >= 0) {
                close(fd);
            }
            cli_error("Failed to connect to '%s': %s", sockpath, strerror(e));
            return -1;
        }
        return fd;
    }
    r = getaddrinfo(host, port, &hints, &res);
    if (r != 0) {
        cli_error("address resolution failed for %s:%s: %s", host, port,
                  gai_strerror(r));
        return -1;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC,
                    ai->ai_protocol);
        if (fd < 0) {
            e = errno;
            continue;
        }
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
            break;
        }
        e = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        cli_error("Failed to connect to '%s:%s': %s", host, port,
                  strerror(e));
    }
    return fd;
}

#ifdef VDISK_HAVE_LIBNBD

/* The library's functions this driver calls (dlib.h: loaded at the
 * first listing, not linked into every vdisk process). */
#define NBD_LIB_FUNCS(X) \
    X(nbd_can_cache) \
    X(nbd_can_df) \
    X(nbd_can_fast_zero) \
    X(nbd_can_flush) \
    X(nbd_can_fua) \
    X(nbd_can_multi_conn) \
    X(nbd_can_trim) \
    X(nbd_can_zero) \
    X(nbd_close) \
    X(nbd_connect_socket) \
    X(nbd_create) \
    X(nbd_get_block_size) \
    X(nbd_get_error) \
    X(nbd_get_size) \
    X(nbd_is_read_only) \
    X(nbd_is_rotational) \
    X(nbd_opt_abort) \
    X(nbd_opt_info) \
    X(nbd_opt_list) \
    X(nbd_opt_list_meta_context) \
    X(nbd_set_export_name) \
    X(nbd_set_full_info) \
    X(nbd_set_opt_mode) \
    X(nbd_set_tls) \
    X(nbd_set_tls_certificates) \
    X(nbd_set_tls_psk_file) \
    X(nbd_set_tls_username) \
    X(nbd_set_tls_verify_peer)
VD_DLIB_DEFINE(nbd_lib, VDISK_LIBNBD_SONAME, NBD_LIB_FUNCS);

/* The exports NBD_OPT_LIST returned. */
typedef struct list_entry {
    char *name;
    char *description;
} list_entry;

typedef struct list_result {
    list_entry *v;
    size_t n;
    bool oom;
} list_result;

static int list_cb(void *opaque, const char *name, const char *description)
{
    list_result *l = opaque;
    list_entry *nv = realloc(l->v, (l->n + 1) * sizeof(*nv));

    if (!nv) {
        l->oom = true;
        return 0;
    }
    l->v = nv;
    nv[l->n].name = strdup(name);
    nv[l->n].description = strdup(description ? description : "");
    l->n++;
    return 0;
}

/* The meta contexts of one export, in the order the server sent them. */
typedef struct ctx_list {
    char **v;
    size_t n;
} ctx_list;

static int ctx_cb(void *opaque, const char *name)
{
    ctx_list *l = opaque;
    char **nv = realloc(l->v, (l->n + 1) * sizeof(*nv));

    if (nv) {
        l->v = nv;
        nv[l->n++] = strdup(name);
    }
    return 0;
}

/* libnbd's last error without its "nbd_opt_list: " prefix. */
static const char *nbd_msg(void)
{
    const char *m = LIB(nbd_get_error)();
    const char *colon = m ? strstr(m, ": ") : NULL;

    return colon ? colon + 2 : m ? m : "unknown error";
}

/* Property @name of object @id as a C string (the registry hands out
 * JSON text: a string is unquoted, anything else kept as written), or
 * NULL when unset. The caller frees it. */
static char *obj_prop(const char *id, const char *name)
{
    char *json = vd_object_get_property(id, name, NULL);
    json_object *v = json ? json_tokener_parse(json) : NULL;
    char *out = NULL;

    if (v && json_object_is_type(v, json_type_string)) {
        out = strdup(json_object_get_string(v));
    } else if (json) {
        out = strdup(json);
    }
    json_object_put(v);
    free(json);
    return out;
}

/*
 * TLS for the lister: the tls-creds-* object @creds_id (endpoint=client)
 * gives the directory of the certificates (libnbd's names are QEMU's:
 * ca-cert.pem, client-cert.pem, client-key.pem) or the PSK file, and
 * whether the server's certificate is checked; @hostname is the name the
 * certificate must carry. Returns 0 or -1 after an error.
 */
static int list_setup_tls(struct nbd_handle *h, const char *creds_id,
                          const char *hostname)
{
    char *type = vd_object_type(creds_id);
    char *dir = obj_prop(creds_id, "dir");
    char *user = obj_prop(creds_id, "username");
    char *verify = obj_prop(creds_id, "verify-peer");
    int r = -1;

    if (!type || !dir) {
        cli_error("TLS credentials '%s' have no directory", creds_id);
        goto out;
    }
#ifdef LIBNBD_HAVE_NBD_SET_TLS_HOSTNAME
    if (hostname && nbd_set_tls_hostname(h, hostname) < 0) {
        cli_error("%s", nbd_msg());
        goto out;
    }
#else
    /* An older libnbd checks the certificate against no name when given
     * a connected socket; --tls-hostname has nothing to set. */
    (void)hostname;
#endif
    if (LIB(nbd_set_tls)(h, LIBNBD_TLS_REQUIRE) < 0 ||
        LIB(nbd_set_tls_verify_peer)(h, !verify ||
                                        strcmp(verify, "false") != 0)
            < 0) {
        cli_error("%s", nbd_msg());
        goto out;
    }
    if (strcmp(type, "tls-creds-psk") == 0) {
        char path[4200];

        snprintf(path, sizeof(path), "%s/keys.psk", dir);
        if (LIB(nbd_set_tls_psk_file)(h, path) < 0 ||
            LIB(nbd_set_tls_username)(h, user && *user ? user : "qemu") < 0) {
            cli_error("%s", nbd_msg());
            goto out;
        }
    } else if (LIB(nbd_set_tls_certificates)(h, dir) < 0) {
        cli_error("%s", nbd_msg());
        goto out;
    }
    r = 0;
out:
    free(type);
    free(dir);
    free(user);
    free(verify);
    return r;
}

/* The transmission flags of the export libnbd negotiated, rebuilt from
 * its predicates (libnbd does not hand out the raw word). */
static unsigned list_flags(struct nbd_handle *h)
{
    unsigned f = 1;   /* NBD_FLAG_HAS_FLAGS */

    f |= LIB(nbd_is_read_only)(h) == 1 ? 1u << 1 : 0;
    f |= LIB(nbd_can_flush)(h) == 1 ? 1u << 2 : 0;
    f |= LIB(nbd_can_fua)(h) == 1 ? 1u << 3 : 0;
    f |= LIB(nbd_is_rotational)(h) == 1 ? 1u << 4 : 0;
    f |= LIB(nbd_can_trim)(h) == 1 ? 1u << 5 : 0;
    f |= LIB(nbd_can_zero)(h) == 1 ? 1u << 6 : 0;
    f |= LIB(nbd_can_df)(h) == 1 ? 1u << 7 : 0;
    f |= LIB(nbd_can_multi_conn)(h) == 1 ? 1u << 8 : 0;
    f |= LIB(nbd_can_cache)(h) == 1 ? 1u << 10 : 0;
    f |= LIB(nbd_can_fast_zero)(h) == 1 ? 1u << 11 : 0;
    return f;
}

int serve_list_exports(const char *sockpath, const char *host,
                       const char *port, const char *creds_id,
                       const char *tls_hostname)
{
    static const char *const flag_names[] = {
        NULL, "readonly", "flush", "fua", "rotational", "trim", "zeroes",
        "df", "multi", "resize", "cache", "fast-zero",
    };
    struct nbd_handle *h = NULL;
    list_result l = { 0 };
    int fd, ret = 1;

    vd_error err = VD_ERROR_INIT;
    if (vd_dlib_load(&nbd_lib, &err) < 0) {
        cli_error("%s", err.message);
        return 1;
    }
    fd = client_connect(sockpath, host, port);
    if (fd < 0) {
        return 1;
    }
    h = LIB(nbd_create)();
    if (!h) {
        close(fd);
        cli_error("%s", nbd_msg());
        return 1;
    }
    if (LIB(nbd_set_opt_mode)(h, true) < 0 ||
        LIB(nbd_set_full_info)(h, true) < 0 ||
        (creds_id && list_setup_tls(h, creds_id, tls_hostname) < 0)) {
        if (!creds_id) {
            cli_error("%s", nbd_msg());
        }
        close(fd);
        goto out;
    }
    /* libnbd owns the descriptor from here. */
    if (LIB(nbd_connect_socket)(h, fd) < 0) {
        cli_error("%s", nbd_msg());
        goto out;
    }
    if (LIB(nbd_opt_list)(h, (nbd_list_callback){ .callback = list_cb,
                                             .user_data = &l }) < 0) {
        cli_error("%s", nbd_msg());
        goto out;
    }
    if (l.oom) {
        cli_error("out of memory");
        goto out;
    }
    printf("exports available: %zu\n", l.n);
    for (size_t i = 0; i < l.n; i++) {
        ctx_list ctx = { 0 };
        int64_t size;

        printf(" export: '%s'\n", l.v[i].name);
        if (l.v[i].description && *l.v[i].description) {
            printf("  description: %s\n", l.v[i].description);
        }
        if (LIB(nbd_set_export_name)(h, l.v[i].name) < 0 ||
            LIB(nbd_opt_info)(h) < 0) {
            /* An export that vanished between LIST and INFO: qemu-nbd
             * prints its name and nothing more. */
            continue;
        }
        size = LIB(nbd_get_size)(h);
        if (size >= 0) {
            unsigned f = list_flags(h);

            printf("  size:  %" PRId64 "\n", size);
            printf("  flags: 0x%x (", f);
            for (unsigned b = 0; b < sizeof(flag_names) / sizeof(*flag_names);
                 b++) {
                if (flag_names[b] && (f & (1u << b))) {
                    printf(" %s", flag_names[b]);
                }
            }
            printf(" )\n");
        }
        if (LIB(nbd_get_block_size)(h, LIBNBD_SIZE_MINIMUM) > 0) {
            printf("  min block: %" PRId64 "\n",
                   LIB(nbd_get_block_size)(h, LIBNBD_SIZE_MINIMUM));
            printf("  opt block: %" PRId64 "\n",
                   LIB(nbd_get_block_size)(h, LIBNBD_SIZE_PREFERRED));
            printf("  max block: %" PRId64 "\n",
                   LIB(nbd_get_block_size)(h, LIBNBD_SIZE_MAXIMUM));
        }
        /* No query: the server lists every context of the export. */
        if (LIB(nbd_opt_list_meta_context)(
                h, (nbd_context_callback){ .callback = ctx_cb,
                                           .user_data = &ctx }) >= 0 &&
            ctx.n) {
            printf("  available meta contexts: %zu\n", ctx.n);
            for (size_t j = 0; j < ctx.n; j++) {
                printf("   %s\n", ctx.v[j] ? ctx.v[j] : "");
            }
        }
        for (size_t j = 0; j < ctx.n; j++) {
            free(ctx.v[j]);
        }
        free(ctx.v);
    }
    LIB(nbd_opt_abort)(h);
    ret = 0;
out:
    for (size_t i = 0; i < l.n; i++) {
        free(l.v[i].name);
        free(l.v[i].description);
    }
    free(l.v);
    LIB(nbd_close)(h);
    return ret;
}

#else

int serve_list_exports(const char *sockpath, const char *host,
                       const char *port, const char *creds_id,
                       const char *tls_hostname)
{
    (void)sockpath, (void)host, (void)port, (void)creds_id;
    (void)tls_hostname;
    cli_error("List mode is not available: vdisk was built without "
              "libnbd");
    return 1;
}

#endif /* VDISK_HAVE_LIBNBD */

int serve_kernel_disconnect(const char *dev)
{
    int fd = open(dev, O_RDWR | O_CLOEXEC);

    if (fd < 0) {
        cli_error("Cannot open %s: %s", dev, strerror(errno));
        return 1;
    }
#ifdef __linux__
    /* As qemu-nbd: the three requests, their failures ignored (on a file
     * that is not an NBD device they do nothing). */
    ioctl(fd, NBD_CLEAR_QUE);
    ioctl(fd, NBD_DISCONNECT);
    ioctl(fd, NBD_CLEAR_SOCK);
#endif
    close(fd);
    printf("%s disconnected\n", dev);
    return 0;
}

/* ---- -c: the kernel's client on /dev/nbdN ---- */

/* Reads or writes exactly @len bytes; 0 or -1. */
static int full_io(int fd, void *buf, size_t len, bool wr)
{
    char *p = buf;

    while (len) {
        ssize_t n = wr ? write(fd, p, len) : read(fd, p, len);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static uint64_t be64(const unsigned char *p)
{
    uint64_t v = 0;

    for (int i = 0; i < 8; i++) {
        v = v << 8 | p[i];
    }
    return v;
}

/*
 * The client handshake the kernel cannot do itself: fixed newstyle,
 * NBD_OPT_EXPORT_NAME of the default export (the only one qemu-nbd -c
 * serves), no structured replies (the kernel takes simple replies).
 * Returns 0 with the export's size and transmission flags, or -1.
 */
static int kernel_handshake(int fd, uint64_t *size, uint16_t *flags)
{
    unsigned char hello[18], opt[16], reply[10];
    static const unsigned char magic[16] = "NBDMAGICIHAVEOPT";
    uint32_t cflags;

    if (full_io(fd, hello, sizeof(hello), false) < 0 ||
        memcmp(hello, magic, 8) != 0 || memcmp(hello + 8, magic + 8, 8)) {
        return -1;
    }
    /* NBD_FLAG_C_FIXED_NEWSTYLE only: the 124 zero bytes after the
     * reply are simpler to skip than to negotiate away. */
    cflags = htonl(1);
    memcpy(opt, magic + 8, 8);
    opt[8] = opt[9] = opt[10] = 0;
    opt[11] = 1;                       /* NBD_OPT_EXPORT_NAME */
    memset(opt + 12, 0, 4);            /* an empty name */
    if (full_io(fd, &cflags, 4, true) < 0 ||
        full_io(fd, opt, sizeof(opt), true) < 0 ||
        full_io(fd, reply, sizeof(reply), false) < 0) {
        return -1;
    }
    *size = be64(reply);
    *flags = (uint16_t)(reply[8] << 8 | reply[9]);
    /* This client did not ask for NBD_FLAG_C_NO_ZEROES, so the reply
     * ends with 124 zero bytes whatever the server offered. */
    unsigned char zeroes[124];
    return full_io(fd, zeroes, sizeof(zeroes), false);
}

typedef struct kernel_client {
    char *dev;
    int dev_fd;
    int ready_fd;       /* --fork's pipe to the parent, or -1 */
    char *sockpath;
    const char *srcpath;
    bool verbose;
    void (*stop)(void);
    int status;
} kernel_client;

static void *kernel_client_main(void *opaque)
{
    kernel_client *k = opaque;
    uint64_t size = 0;
    uint16_t flags = 0;
    int sock, dev = k->dev_fd;

    k->status = 1;
    sock = client_connect(k->sockpath, NULL, NULL);
    if (sock < 0) {
        goto out;
    }
    if (kernel_handshake(sock, &size, &flags) < 0) {
        cli_error("Failed to read initial magic: Unexpected end-of-file "
                  "before all data were read");
        goto out;
    }
#ifdef __linux__
    if (ioctl(dev, NBD_SET_SOCK, (unsigned long)sock) < 0) {
        cli_error("Failed to set NBD socket");
        goto out;
    }
    if (ioctl(dev, NBD_SET_BLKSIZE, 512UL) < 0) {
        cli_error("Failed setting NBD block size");
        goto out;
    }
    if (ioctl(dev, NBD_SET_SIZE_BLOCKS, (unsigned long)(size / 512)) < 0) {
        cli_error("Failed setting size (in blocks)");
        goto out;
    }
    if (ioctl(dev, NBD_SET_FLAGS, (unsigned long)flags) < 0 &&
        errno != ENOTTY) {
        cli_error("Failed setting flags");
        goto out;
    }
    if (k->verbose) {
        fprintf(stderr, "NBD device %s is now connected to %s\n", k->dev,
                k->srcpath);
    }
    if (k->ready_fd >= 0) {
        char ok = 'R';
        if (write(k->ready_fd, &ok, 1) != 1) {
            /* The parent is gone; nothing more to tell it. */
        }
        close(k->ready_fd);
        k->ready_fd = -1;
    }
    /* Serves until the device is disconnected (qemu-nbd -d). */
    if (ioctl(dev, NBD_DO_IT) < 0 && errno != EPIPE && errno != 0) {
        cli_error("NBD_DO_IT failed: %s", strerror(errno));
        ioctl(dev, NBD_CLEAR_QUE);
        ioctl(dev, NBD_CLEAR_SOCK);
        goto out;
    }
    ioctl(dev, NBD_CLEAR_QUE);
    ioctl(dev, NBD_CLEAR_SOCK);
    k->status = 0;
#else
    cli_error("Kernel /dev/nbdN support not available");
#endif
out:
    if (k->ready_fd >= 0) {
        close(k->ready_fd);   /* the parent of --fork exits 1 */
        k->ready_fd = -1;
    }
    if (dev >= 0) {
        close(dev);
    }
    if (sock >= 0) {
        close(sock);
    }
    k->stop();
    return NULL;
}

static kernel_client the_client;
static pthread_t the_client_thread;

int serve_kernel_connect_start(const char *dev, const char *sockpath,
                               const char *srcpath, bool verbose,
                               void (*stop)(void), int ready_fd)
{
    int fd = open(dev, O_RDWR | O_CLOEXEC);

    /* Opened here rather than in the thread, so that a device that
     * cannot be opened fails the command before it reports success. */
    if (fd < 0) {
        cli_error("Failed to open %s: %s", dev, strerror(errno));
        return -1;
    }
    the_client = (kernel_client){ .dev = strdup(dev), .dev_fd = fd,
                                  .sockpath = strdup(sockpath),
                                  .srcpath = srcpath, .verbose = verbose,
                                  .stop = stop, .status = 1,
                                  .ready_fd = ready_fd };
    if (!the_client.dev || !the_client.sockpath) {
        cli_error("out of memory");
        close(fd);
        return -1;
    }
    if (pthread_create(&the_client_thread, NULL, kernel_client_main,
                       &the_client) != 0) {
        cli_error("Failed to create client thread: %s", strerror(errno));
        return -1;
    }
    return 0;
}

int serve_kernel_connect_finish(void)
{
    pthread_join(the_client_thread, NULL);
    free(the_client.dev);
    free(the_client.sockpath);
    return the_client.status;
}
