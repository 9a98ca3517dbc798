/*
 * Nodes and the graph: the warning handler, naming, allocation and
 * reference counting, reopening, draining, opening (with format probing
 * and the backing chain), the public open/close and getters, and image
 * creation with the checks every format shares (unknown options, backing
 * files, backing-format names). Attaching children and the permissions
 * that come with them live in perm.c; node.c calls it.
 *
 * Open order for a format node: the generic options are taken first,
 * then the protocol child is opened from "file.*" options (or the
 * filename), the format is probed if none was named, the format driver
 * opens over the child, leftover options are rejected by name, and last
 * the backing chain is opened iteratively (so a chain of depth 1000 needs
 * no deep recursion) with loop detection by device and inode.
 *
 * The graph lock (graph_lock) protects the global node list and node
 * names only; requests never take it.
 */
#include <errno.h>
#include <libgen.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/block_int.h"
#include "common/dlib.h"

static pthread_mutex_t graph_lock = PTHREAD_MUTEX_INITIALIZER;
static vd_node *all_nodes;
static unsigned long node_counter;

/* ---- warnings ---- */

static void (*warn_fn)(const char *msg, void *opaque);
static void *warn_opaque;

VD_API void vd_set_warning_handler(void (*fn)(const char *, void *),
                                   void *opaque)
{
    warn_fn = fn;
    warn_opaque = opaque;
}

static void warn_v(bool report, const char *fmt, va_list ap)
{
    char msg[1024];
    vsnprintf(msg, sizeof(msg), fmt, ap);
    if (warn_fn)
        warn_fn(msg, warn_opaque);
    else if (report)
        fprintf(stderr, "%s: warning: %s\n", program_invocation_short_name,
                msg);
    else
        fprintf(stderr, "WARNING: %s\n", msg);
}

void vd_warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    warn_v(false, fmt, ap);
    va_end(ap);
}

void vd_warn_report(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    warn_v(true, fmt, ap);
    va_end(ap);
}

VD_API const char *vd_version(void)
{
    return "0.1.0";
}

/* ---- naming ---- */

static vd_node *find_node_locked(const char *name)
{
    for (vd_node *n = all_nodes; n; n = n->next_global)
        if (n->node_name && strcmp(n->node_name, name) == 0)
            return n;
    return NULL;
}

/* Node names follow QEMU's rule: a letter first, then letters, digits,
 * '-', '.', '_', at most 31 characters. */
static bool node_name_valid(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 31)
        return false;
    if (!((s[0] >= 'a' && s[0] <= 'z') || (s[0] >= 'A' && s[0] <= 'Z')))
        return false;
    for (size_t i = 1; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_'))
            return false;
    }
    return true;
}

static int register_node(vd_node *node, const char *name, vd_error *err)
{
    pthread_mutex_lock(&graph_lock);
    if (name) {
        if (!node_name_valid(name)) {
            pthread_mutex_unlock(&graph_lock);
            return vd_error_set(err, -EINVAL, "Invalid node-name: '%s'",
                                name);
        }
        if (find_node_locked(name)) {
            pthread_mutex_unlock(&graph_lock);
            return vd_error_set(err, -EEXIST,
                                "Duplicate nodes with node-name='%s'", name);
        }
        node->node_name = strdup(name);
    } else {
        char buf[32];
        snprintf(buf, sizeof(buf), "#block%lu", node_counter++);
        node->node_name = strdup(buf);
    }
    if (!node->node_name) {
        pthread_mutex_unlock(&graph_lock);
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    /* Appended, so iteration follows creation order (group snapshot
     * operations pick "the first node that can"). */
    node->next_global = NULL;
    vd_node **tail = &all_nodes;
    while (*tail)
        tail = &(*tail)->next_global;
    *tail = node;
    pthread_mutex_unlock(&graph_lock);
    return 0;
}

static void unregister_node(vd_node *node)
{
    pthread_mutex_lock(&graph_lock);
    for (vd_node **p = &all_nodes; *p; p = &(*p)->next_global) {
        if (*p == node) {
            *p = node->next_global;
            break;
        }
    }
    pthread_mutex_unlock(&graph_lock);
}

VD_API void vd_foreach_node(void (*fn)(vd_node *node, void *opaque),
                            void *opaque)
{
    pthread_mutex_lock(&graph_lock);
    for (vd_node *n = all_nodes; n; n = n->next_global)
        fn(n, opaque);
    pthread_mutex_unlock(&graph_lock);
}

VD_API vd_node *vd_find_node(const char *name)
{
    pthread_mutex_lock(&graph_lock);
    vd_node *n = find_node_locked(name);
    pthread_mutex_unlock(&graph_lock);
    return n;
}

/* ---- allocation and children ---- */

static vd_node *node_new(const vd_driver *drv)
{
    vd_node *n = calloc(1, sizeof(*n));
    if (!n)
        return NULL;
    if (drv->instance_size) {
        n->opaque = calloc(1, drv->instance_size);
        if (!n->opaque) {
            free(n);
            return NULL;
        }
    }
    n->drv = drv;
    n->bl.request_alignment = 1;
    n->shared = VD_PERM_ALL; /* no edges yet: nothing held, all shared */
    atomic_init(&n->refcnt, 1);
    atomic_init(&n->total_size, 0);
    pthread_mutex_init(&n->lock, NULL);
    pthread_cond_init(&n->cond, NULL);
    pthread_mutex_init(&n->stats_lock, NULL);
    return n;
}

static void node_free(vd_node *n)
{
    vd_node_drop_opener(n);
    while (n->children)
        vd_node_detach_child(n, n->children);
    vd_node_free_op_blockers(n);
    vd_bitmaps_free(n);
    if (n->node_name)
        unregister_node(n);
    pthread_mutex_destroy(&n->lock);
    pthread_cond_destroy(&n->cond);
    vd_acct_cleanup(n);
    pthread_mutex_destroy(&n->stats_lock);
    free(n->node_name);
    free(n->filename);
    free(n->backing_file);
    free(n->backing_format);
    free(n->full_backing_filename);
    vd_opts_free(&n->open_opts);
    free(n->opaque);
    free(n);
}

void vd_node_ref(vd_node *node)
{
    atomic_fetch_add(&node->refcnt, 1);
}

/* Nodes whose last reference went while this thread was already closing
 * nodes: closing a chain of 1000 layers must not recurse 1000 deep. */
static __thread vd_node *closing_list;
static __thread bool closing;

void vd_node_unref(vd_node *node)
{
    if (!node)
        return;
    if (atomic_fetch_sub(&node->refcnt, 1) != 1)
        return;
    node->free_next = closing_list;
    closing_list = node;
    if (closing)
        return; /* the loop below, further up this thread's stack, will */
    closing = true;
    while (closing_list) {
        vd_node *n = closing_list;
        closing_list = n->free_next;
        /* A parent closes before its children: detaching them in
         * node_free() queues those that lose their last reference. The
         * persistent bitmaps are stored while the driver is open. */
        vd_bitmaps_close(n);
        if (n->drv->close)
            n->drv->close(n);
        node_free(n);
    }
    closing = false;
}

/* ---- reopening ---- */

void vd_node_close_driver(vd_node *n)
{
    if (n->drv->close)
        n->drv->close(n);
    if (n->drv->instance_size)
        memset(n->opaque, 0, n->drv->instance_size);
    /* The driver sets these again when it opens. */
    free(n->backing_file);
    n->backing_file = NULL;
    free(n->backing_format);
    n->backing_format = NULL;
    /* Until vd_node_open_driver() succeeds, requests must fail. */
    n->broken = true;
}

/* After a driver opened again: its limits and length, and requests
 * may run. */
static void driver_opened(vd_node *n)
{
    n->broken = false;
    if (n->drv->refresh_limits)
        n->drv->refresh_limits(n);
    if (n->bl.request_alignment == 0)
        n->bl.request_alignment = 1;
    vd_node_refresh_length(n);
}

int vd_node_open_driver(vd_node *n, unsigned flags, vd_error *err)
{
    vd_opts *o = vd_opts_clone(n->open_opts);
    if (!o) {
        n->broken = true;
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    n->flags = flags;
    n->read_only = !(flags & VD_NODE_RDWR);
    int r = n->drv->open(n, o, flags, err);
    vd_opts_free(&o);
    if (r < 0) {
        n->broken = true;
        return r;
    }
    driver_opened(n);
    return 0;
}

static int node_reopen(vd_node *n, unsigned flags, bool top, vd_error *err);

/* Reopens the children that hold @n's data (not its backing chain); the
 * permissions were settled for the whole subtree by @n's reopen. */
static int reopen_children(vd_node *n, bool rw, vd_error *err)
{
    for (vd_child *c = n->children; c; c = c->next) {
        if (c->role & VD_ROLE_COW)
            continue;
        unsigned f = rw ? c->node->flags | VD_NODE_RDWR
                        : c->node->flags & ~VD_NODE_RDWR;
        int r = node_reopen(c->node, f, false, err);
        if (r < 0)
            return r;
    }
    return 0;
}

int vd_node_reopen(vd_node *n, unsigned flags, vd_error *err)
{
    return node_reopen(n, flags, true, err);
}

/* @top: the node the caller reopens (its permissions are checked and
 * refreshed for it and everything below); else a child reopened along. */
static int node_reopen(vd_node *n, unsigned flags, bool top, vd_error *err)
{
    if (flags == n->flags && !n->broken)
        return 0;
    unsigned old = n->flags;
    bool to_rw = (flags & VD_NODE_RDWR) && !(old & VD_NODE_RDWR);
    bool to_ro = !(flags & VD_NODE_RDWR) && (old & VD_NODE_RDWR);
    int r = 0;
    /* Permissions first, before anything is closed: going read-write
     * needs write on the files below (checked against every other user
     * and process, and taken now, so nothing is written unlocked);
     * going read-only must not leave a writer above without its write
     * (checked only: the write stays until the caches are written). */
    if (top && (to_rw || to_ro)) {
        r = vd_node_reopen_perms(n, to_ro, to_rw, err);
        if (r < 0)
            return r;
    }
    vd_node_drain_begin(n);
    /* Going read-write, the children must be writable before the driver
     * opens; going read-only, the driver writes its caches on close while
     * the children still accept writes. */
    if (to_rw)
        r = reopen_children(n, true, err);
    /* Going read-only, the persistent bitmaps are stored first (and
     * become read-only); a failure to store them refuses the reopen. */
    if (r == 0 && to_ro)
        r = vd_bitmaps_store(n, true, err);
    if (r == 0) {
        vd_node_close_driver(n);
        if (!to_rw && !(flags & VD_NODE_RDWR))
            r = reopen_children(n, false, err);
        if (r == 0)
            r = vd_node_open_driver(n, flags, err);
        /* Read-write again: the driver marks its bitmaps in use and
         * ours become writable. */
        if (r == 0 && to_rw)
            r = vd_bitmaps_load(n, err);
    }
    if (r < 0 && !n->broken) {
        /* Nothing was closed yet: the old mode still stands. */
    } else if (r < 0) {
        /* Try to get back to where we were; the first error is kept. */
        reopen_children(n, (old & VD_NODE_RDWR) != 0, NULL);
        vd_node_open_driver(n, old, NULL);
    }
    /* The permissions follow the mode the node ended up in (the check
     * above made sure this cannot conflict). */
    if (top)
        vd_node_refresh_perms(n, NULL);
    vd_node_drain_end(n);
    return r;
}

VD_API int vd_reopen(vd_node *node, bool read_write, vd_error *err)
{
    unsigned f = read_write ? node->flags | VD_NODE_RDWR
                            : node->flags & ~VD_NODE_RDWR;
    /* The opener follows the node's mode: it gives up writing before a
     * switch to read-only and writes again after a switch to read-write
     * (other users keep what they hold, and may refuse the switch). */
    unsigned perm = 0, shared = VD_PERM_ALL;
    if (node->opener)
        vd_user_get_perm(node->opener, &perm, &shared);
    if (!read_write && node->opener && (perm & VD_PERM_WRITE))
        vd_user_set_perm(node->opener, perm & ~VD_PERM_WRITE, shared, NULL);
    int r = vd_node_reopen(node, f, err);
    if (r == 0 && read_write && node->opener)
        r = vd_user_set_perm(node->opener, perm | VD_PERM_WRITE, shared, err);
    else if (r < 0 && node->opener)
        vd_user_set_perm(node->opener, perm, shared, NULL);
    if (r < 0 && !err)
        return r;
    if (r == -EACCES || r == -EROFS || r == -EPERM)
        vd_error_prepend(err, "Could not reopen '%s' read-write: ",
                         node->filename ? node->filename : node->node_name);
    return r;
}

/* ---- draining ---- */

/* Quiesces @node and everything below and lets their drivers release
 * the requests they hold back (throttled, stopped at a breakpoint):
 * all of it before any waiting, because a request in flight on a node
 * may be held by a driver further down. */
static void drain_quiesce(vd_node *node)
{
    /* in_flight changes without the lock (io.c), so both counters are
     * seq_cst atomics: either a starting request sees quiesce raised, or
     * the wait below sees its in_flight count (see request_begin() in
     * io.c). */
    pthread_mutex_lock(&node->lock);
    __atomic_add_fetch(&node->quiesce, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&node->lock);
    if (node->drv->drain_begin)
        node->drv->drain_begin(node);
    for (vd_child *c = node->children; c; c = c->next)
        drain_quiesce(c->node);
}

static void drain_wait(vd_node *node)
{
    pthread_mutex_lock(&node->lock);
    while (__atomic_load_n(&node->in_flight, __ATOMIC_SEQ_CST) > 0)
        pthread_cond_wait(&node->cond, &node->lock);
    pthread_mutex_unlock(&node->lock);
    for (vd_child *c = node->children; c; c = c->next)
        drain_wait(c->node);
}

void vd_node_drain_begin(vd_node *node)
{
    drain_quiesce(node);
    drain_wait(node);
}

void vd_node_drain_end(vd_node *node)
{
    for (vd_child *c = node->children; c; c = c->next)
        vd_node_drain_end(c->node);
    if (node->drv->drain_end)
        node->drv->drain_end(node);
    pthread_mutex_lock(&node->lock);
    __atomic_sub_fetch(&node->quiesce, 1, __ATOMIC_SEQ_CST);
    pthread_cond_broadcast(&node->cond);
    pthread_mutex_unlock(&node->lock);
}

/* ---- opening ---- */

/* Cache modes as qemu's -t: direct (O_DIRECT), no-flush, writethrough. */
static int parse_cache_mode(const char *mode, unsigned *flags,
                            bool *writethrough, vd_error *err)
{
    *flags &= ~(VD_NODE_NOCACHE | VD_NODE_NO_FLUSH);
    *writethrough = false;
    if (strcmp(mode, "none") == 0 || strcmp(mode, "off") == 0) {
        *flags |= VD_NODE_NOCACHE;
    } else if (strcmp(mode, "writeback") == 0) {
    } else if (strcmp(mode, "unsafe") == 0) {
        *flags |= VD_NODE_NO_FLUSH;
    } else if (strcmp(mode, "directsync") == 0) {
        *flags |= VD_NODE_NOCACHE;
        *writethrough = true;
    } else if (strcmp(mode, "writethrough") == 0) {
        *writethrough = true;
    } else {
        return vd_error_set(err, -EINVAL, "Invalid cache mode '%s'", mode);
    }
    return 0;
}

const vd_driver *vd_protocol_for_filename(const char *filename,
                                          vd_error *err)
{
    const vd_driver *best = NULL;
    int best_score = 0;

    for (int i = 0; filename && vd_driver_at(i); i++) {
        const vd_driver *d = vd_driver_at(i);
        int score = d->probe_device ? d->probe_device(filename) : 0;
        if (score > best_score) {
            best = d;
            best_score = score;
        }
    }
    if (best)
        return best;
    size_t n = filename ? strcspn(filename, ":/") : 0;
    if (filename && filename[n] == ':') {
        for (int i = 0; vd_driver_at(i); i++) {
            const vd_driver *d = vd_driver_at(i);
            if (d->protocol_name && d->open &&
                strlen(d->protocol_name) == n &&
                strncmp(d->protocol_name, filename, n) == 0)
                return d;
        }
        /* A protocol QEMU has and this build has not (a remote driver
         * whose library was missing at build time, or one vdisk lacks):
         * QEMU's message, not a file of that name. Other prefixes stay
         * file names, which is more lenient than QEMU. */
        static const char *const qemu_protocols[] = {
            "nbd", "nbd+tcp", "nbd+unix", "http", "https", "ftp", "ftps",
            "ssh", "iscsi", "rbd", "gluster", "gluster+tcp", "gluster+unix",
            "gluster+rdma", "nfs", "vvfat", "nvme", NULL,
        };
        for (int i = 0; qemu_protocols[i]; i++)
            if (strlen(qemu_protocols[i]) == n &&
                strncmp(qemu_protocols[i], filename, n) == 0) {
                vd_error_set(err, -ENOENT, "Unknown protocol '%.*s'",
                             (int)n, filename);
                return NULL;
            }
    }
    return vd_find_driver("file");
}

/* Picks the format with the highest probe score for the child's first
 * bytes; raw (score 1) is the fallback. As QEMU 7.2 (find_image_format),
 * an empty file is raw without asking, and every probe sees the full
 * 2048 bytes, zero-padded past the end of a shorter file. The winner may
 * be a probe-only entry: the caller refuses it, never falls back. */
static const vd_driver *probe_format(vd_node *file, const char *filename,
                                     vd_error *err)
{
    enum { PROBE_BYTES = 2048 };
    if (vd_node_getlength(file) == 0)
        return vd_find_driver("raw");
    uint8_t *buf = vd_node_blockalign(file, PROBE_BYTES);
    if (!buf) {
        vd_error_set(err, -ENOMEM, "Out of memory");
        return NULL;
    }
    size_t n = PROBE_BYTES;
    memset(buf, 0, PROBE_BYTES);
    vd_iov qiov;
    vd_iov_init_buf(&qiov, buf, PROBE_BYTES);
    int r = vd_node_preadv(file, 0, PROBE_BYTES, &qiov, 0, err);
    if (r < 0) {
        free(buf);
        vd_error_prepend(err, "Could not read image for determining its "
                         "format: ");
        return NULL;
    }
    const vd_driver *best = NULL;
    int best_score = 0;
    for (int i = 0;; i++) {
        const vd_driver *d = vd_driver_at(i);
        if (!d)
            break;
        if (!d->is_format || !d->probe)
            continue;
        int s = d->probe(buf, n, filename);
        if (s > best_score) {
            best = d;
            best_score = s;
        }
    }
    free(buf);
    if (!best)
        vd_error_set(err, -EINVAL, "Could not determine image format");
    return best;
}

/* Resolves a backing file name relative to the overlay's directory, as
 * QEMU does (absolute names and protocol names are kept). */
static char *resolve_backing(const char *overlay, const char *backing)
{
    if (backing[0] == '/' || strstr(backing, "://") ||
        !overlay || !strchr(overlay, '/'))
        return strdup(backing);
    const char *slash = strrchr(overlay, '/');
    size_t dlen = (size_t)(slash - overlay) + 1;
    char *out = malloc(dlen + strlen(backing) + 1);
    if (!out)
        return NULL;
    memcpy(out, overlay, dlen);
    strcpy(out + dlen, backing);
    return out;
}

static bool opts_has_prefix(const vd_opts *opts, const char *prefix)
{
    size_t plen = strlen(prefix);
    for (size_t i = 0; i < vd_opts_count(opts); i++) {
        const char *k, *v;
        vd_opts_nth(opts, i, &k, &v);
        if (strncmp(k, prefix, plen) == 0)
            return true;
    }
    return false;
}

/* Rejects the first option no driver consumed. */
static int reject_leftover(vd_node *node, vd_opts *opts, vd_error *err)
{
    const char *key = vd_opts_first_key(opts);
    if (!key)
        return 0;
    /* QEMU words it by how the node was opened: drivers with a
     * protocol (blkdebug, blkverify) are opened as protocols. */
    if ((node->drv->is_format || node->drv->is_filter) &&
        !node->drv->protocol_name)
        return vd_error_set(err, -EINVAL,
                            "Block format '%s' does not support the option "
                            "'%s'", node->drv->name, key);
    return vd_error_set(err, -EINVAL,
                        "Block protocol '%s' doesn't support the option '%s'",
                        node->drv->name, key);
}

/* Opens one node without its backing chain. */
static int node_open_one(vd_node **out, const char *filename,
                         const vd_driver *drv, vd_opts *opts, unsigned flags,
                         vd_error *err)
{
    int r;
    char *node_name = vd_opts_take(opts, "node-name");
    char *driver = vd_opts_take(opts, "driver");
    char *tmp;
    bool writethrough = false;
    int detect_zeroes = 0;
    bool discard_unmap = false;

    if (driver) {
        const vd_driver *d = vd_find_driver(driver);
        if (!d) {
            r = vd_error_set(err, -EINVAL, "Unknown driver '%s'", driver);
            goto fail_early;
        }
        if (drv && drv != d) {
            r = vd_error_set(err, -EINVAL, "Cannot specify both format '%s' "
                             "and driver '%s'", drv->name, driver);
            goto fail_early;
        }
        drv = d;
    }
    if ((tmp = vd_opts_take(opts, "read-only"))) {
        bool ro;
        if (vd_parse_bool(tmp, &ro) < 0) {
            free(tmp);
            r = vd_error_set(err, -EINVAL,
                             "Parameter 'read-only' expects 'on' or 'off'");
            goto fail_early;
        }
        free(tmp);
        flags = ro ? flags & ~VD_NODE_RDWR : flags | VD_NODE_RDWR;
    }
    if ((tmp = vd_opts_take(opts, "cache"))) {
        r = parse_cache_mode(tmp, &flags, &writethrough, err);
        free(tmp);
        if (r < 0)
            goto fail_early;
    }
    {
        /* copy-on-read=on: io.c populates the node from its backing
         * chain on reads (the flag is private to node.c and io.c). */
        bool cor;
        if ((r = vd_opts_take_bool(opts, "copy-on-read", false, &cor,
                                   err)) < 0)
            goto fail_early;
        if (cor && !(flags & VD_NODE_RDWR)) {
            r = vd_error_set(err, -EINVAL, "Can't use copy-on-read on "
                             "read-only device");
            goto fail_early;
        }
        flags = cor ? flags | VD_NODE_COPY_ON_READ
                    : flags & ~VD_NODE_COPY_ON_READ;
    }
    {
        bool b;
        if ((r = vd_opts_take_bool(opts, "cache.direct",
                                   flags & VD_NODE_NOCACHE, &b, err)) < 0)
            goto fail_early;
        flags = b ? flags | VD_NODE_NOCACHE : flags & ~VD_NODE_NOCACHE;
        if ((r = vd_opts_take_bool(opts, "cache.no-flush",
                                   flags & VD_NODE_NO_FLUSH, &b, err)) < 0)
            goto fail_early;
        flags = b ? flags | VD_NODE_NO_FLUSH : flags & ~VD_NODE_NO_FLUSH;
        static const char *const dz[] = { "off", "on", "unmap", NULL };
        if ((r = vd_opts_take_enum(opts, "detect-zeroes", dz, 0,
                                   &detect_zeroes, err)) < 0)
            goto fail_early;
        static const char *const dm[] = { "ignore", "unmap", "off", "on",
                                          NULL };
        int d = 0;
        if ((r = vd_opts_take_enum(opts, "discard", dm, 0, &d, err)) < 0)
            goto fail_early;
        discard_unmap = d == 1 || d == 3;
        if (detect_zeroes == 2 && !discard_unmap) {
            r = vd_error_set(err, -EINVAL, "setting detect-zeroes to unmap "
                             "is not allowed without setting discard "
                             "operation to unmap");
            goto fail_early;
        }
    }

    if ((flags & VD_NODE_FORCE_SHARE) && (flags & VD_NODE_RDWR)) {
        r = vd_error_set(err, -EINVAL, "force-share=on can only be used "
                         "with read-only images");
        goto fail_early;
    }

    if (!drv && (flags & VD_NODE_PROTOCOL)) {
        drv = vd_protocol_for_filename(filename, err);
        if (!drv) {
            r = err && err->code ? err->code : -ENOENT;
            goto fail_early;
        }
    }
    /* A driver with a protocol is opened as one, named or not (QEMU's
     * bdrv_fill_options()): the children it opens inherit that. */
    if (drv && drv->protocol_name)
        flags |= VD_NODE_PROTOCOL;

    vd_node *file = NULL;
    bool file_from_filename = false;
    /* Drivers that open their own children (blkdebug, blkverify) get
     * no "file" child from the core. */
    bool core_file = !drv || ((drv->is_format || drv->is_filter) &&
                              !drv->opens_children);
    /* The primary child's options: "file", or the driver's other name
     * for it when the options use that one. */
    const char *fkey = "file";
    if (core_file && drv && drv->file_alias) {
        size_t alen = strlen(drv->file_alias);
        for (size_t i = 0; i < vd_opts_count(opts); i++) {
            const char *k, *v;
            vd_opts_nth(opts, i, &k, &v);
            if (!strncmp(k, drv->file_alias, alen) &&
                (k[alen] == 0 || k[alen] == '.'))
                fkey = drv->file_alias;
        }
    }
    char fprefix[64];
    snprintf(fprefix, sizeof(fprefix), "%s.", fkey);
    char *file_ref = core_file ? vd_opts_take(opts, fkey) : NULL;
    if (file_ref) {
        /* "file=NODE": an existing node becomes the protocol child. */
        file = vd_find_node(file_ref);
        if (!file) {
            /* As qemu, the reference is looked up as both. */
            r = vd_error_set(err, -ENOENT, "Cannot find device='%s' nor "
                             "node-name='%s'", file_ref, file_ref);
            free(file_ref);
            goto fail_early;
        }
        vd_node_ref(file);
        if ((flags & VD_NODE_RDWR) && file->read_only) {
            vd_node_unref(file);
            r = vd_error_set(err, -EROFS, "Node '%s' is read-only",
                             file_ref);
            free(file_ref);
            goto fail_early;
        }
    }
    free(file_ref);
    if (!file && core_file) {
        /* The protocol child: "file.*" options or the filename. */
        vd_opts *fopts = vd_opts_extract_prefix(opts, fprefix);
        if (!fopts) {
            r = vd_error_set(err, -ENOMEM, "Out of memory");
            goto fail_early;
        }
        /* Protocol options given at the top level belong to the child. */
        static const char *const moved[] = { "aio", "locking", NULL };
        for (int i = 0; moved[i]; i++) {
            char *v = vd_opts_take(opts, moved[i]);
            if (v && !vd_opts_get(fopts, moved[i]))
                vd_opts_set(fopts, moved[i], v);
            free(v);
        }
        char *ffilename = vd_opts_take(fopts, "filename");
        const char *fname = ffilename ? ffilename : filename;
        file_from_filename = !ffilename && filename &&
                             !vd_opts_get(fopts, "driver");
        /* A child given only by its options (file.driver=null-co) needs
         * no name; the protocol driver rejects a missing one itself. */
        if (!fname && !vd_opts_get(fopts, "driver")) {
            vd_opts_free(&fopts);
            r = drv ? vd_error_set(err, -EINVAL, "A block device must be "
                                   "specified for \"file\"")
                    : vd_error_set(err, -EINVAL, "Must specify either "
                                   "driver or file");
            goto fail_early;
        }
        unsigned fflags = (flags & ~VD_NODE_PROTOCOL) | VD_NODE_PROTOCOL;
        fflags &= ~(VD_NODE_NO_BACKING | VD_NODE_COPY_ON_READ);
        const vd_driver *fdrv = vd_find_driver(vd_opts_get(fopts, "driver"));
        if (fdrv && fdrv->supports_backing) {
            /* A format named as the child (a filter's file.driver=qcow2)
             * comes with its backing chain. */
            r = vd_node_open(&file, fname, NULL, fopts, fflags, err);
        } else {
            r = node_open_one(&file, fname, NULL, fopts, fflags, err);
            if (r == 0) {
                r = reject_leftover(file, fopts, err);
                if (r < 0)
                    vd_node_unref(file);
            }
        }
        free(ffilename);
        vd_opts_free(&fopts);
        if (r < 0)
            goto fail_early;
    }
    if (!drv) {
        {
            drv = probe_format(file, filename ? filename : file->filename,
                               err);
            if (!drv) {
                vd_node_unref(file);
                r = err && err->code ? err->code : -EINVAL;
                goto fail_early;
            }
            if (drv->guard_when_probed) {
                flags |= 1u << 30; /* remember: guard what was probed */
                /* As qemu: the warning matters only when writing. */
                if (!(flags & VD_NODE_QUIET) && (flags & VD_NODE_RDWR))
                    vd_warn("Image format was not specified for '%s' and "
                            "probing guessed %s.\n         Automatically "
                            "detecting the format is dangerous for %s "
                            "images, write operations on block 0 will be "
                            "restricted.\n         Specify the '%s' format "
                            "explicitly to remove the restrictions.",
                            filename ? filename : file->filename, drv->name,
                            drv->name, drv->name);
            }
        }
    }

    if (!drv->open) {
        /* A format vdisk recognises but has no driver for (named or
         * probed): refuse rather than show its metadata as data. */
        r = vd_driver_unsupported(drv, filename ? filename
                                  : file ? file->filename : NULL, err);
        vd_node_unref(file);
        goto fail_early;
    }

    vd_node *node = node_new(drv);
    if (!node) {
        vd_node_unref(file);
        r = vd_error_set(err, -ENOMEM, "Out of memory");
        goto fail_early;
    }
    node->probed_raw = (flags & (1u << 30)) != 0;
    flags &= ~(1u << 30);
    node->flags = flags;
    node->read_only = !(flags & VD_NODE_RDWR);
    node->writethrough = writethrough;
    node->detect_zeroes = detect_zeroes;
    node->discard_unmap = discard_unmap;
    const char *fname = filename ? filename : file ? file->filename : NULL;
    /* A format over the protocol node its filename opened is named as
     * that node ("file:x" and "host_device:/dev/sdb" lose the prefix, as
     * in QEMU's refresh_filename). */
    if (file && file_from_filename && file->filename)
        fname = file->filename;
    if (fname && !(node->filename = strdup(fname))) {
        vd_node_unref(file);
        node_free(node);
        r = vd_error_set(err, -ENOMEM, "Out of memory");
        goto fail_early;
    }
    /* Named before its file is attached: permission conflicts name the
     * new node. */
    r = register_node(node, node_name, err);
    if (r < 0) {
        vd_node_unref(file);
        node_free(node);
        goto fail_early;
    }
    if (file) {
        unsigned role = drv->is_filter
            ? VD_ROLE_FILTERED | VD_ROLE_PRIMARY
            : VD_ROLE_DATA | VD_ROLE_METADATA | VD_ROLE_PRIMARY;
        /* The driver's permissions on its file (a writable format:
         * write, and nobody else may) are taken here, before the
         * driver's open reads or writes anything. */
        if (!vd_node_attach_child(node, file, "file", role, err)) {
            vd_node_unref(file);
            node_free(node);
            r = err && err->code ? err->code : -ENOMEM;
            goto fail_early;
        }
        /* A format node inherits its file's memory alignment. */
        node->bl.min_mem_alignment = file->bl.min_mem_alignment;
    }
    /* Kept so that a snapshot revert through a fallback child can
     * reopen this driver with the same options. */
    node->open_opts = vd_opts_clone(opts);
    if (!node->open_opts) {
        node_free(node);
        r = vd_error_set(err, -ENOMEM, "Out of memory");
        goto fail_early;
    }
    r = drv->library ? vd_dlib_load(drv->library, err) : 0;
    if (r == 0)
        r = drv->open(node, opts, flags, err);
    if (r < 0) {
        /* The driver's state may be partial: close is not called. */
        node_free(node);
        goto fail_early;
    }
    /* What the driver needs from its children may depend on what its
     * open found (raw's window, qcow2's data file). */
    if (node->children) {
        r = vd_node_refresh_perms(node, err);
        if (r < 0) {
            vd_node_unref(node);
            goto fail_early;
        }
    }
    if (drv->refresh_limits)
        drv->refresh_limits(node);
    if (node->bl.request_alignment == 0)
        node->bl.request_alignment = 1;
    if (drv->getlength) {
        int64_t len = vd_node_refresh_length(node);
        if (len < 0) {
            vd_node_unref(node);
            r = vd_error_set_errno(err, (int)len, "%s: Could not get the "
                                   "image size", fname ? fname : "");
            goto fail_early;
        }
    }
    /* The image's persistent dirty bitmaps (QEMU loads them in the
     * format's open; a failure fails the open as there). */
    r = vd_bitmaps_load(node, err);
    if (r < 0) {
        vd_node_unref(node);
        goto fail_early;
    }
    *out = node;
    free(node_name);
    free(driver);
    return 0;

fail_early:
    free(node_name);
    free(driver);
    return r;
}

vd_child *vd_node_open_child(vd_node *parent, vd_opts *opts,
                             const char *name, const char *filename,
                             unsigned role, bool allow_none, vd_error *err)
{
    char prefix[128];
    char *ref = vd_opts_take(opts, name);
    vd_node *node = NULL;
    vd_child *c = NULL;
    int r = 0;

    snprintf(prefix, sizeof(prefix), "%s.", name);
    vd_opts *sub = vd_opts_extract_prefix(opts, prefix);
    if (!sub) {
        free(ref);
        vd_error_set(err, -ENOMEM, "Out of memory");
        return NULL;
    }
    if (ref && vd_opts_count(sub)) {
        r = vd_error_set(err, -EINVAL, "Cannot reference an existing block "
                         "device with additional options or a new filename");
    } else if (ref) {
        /* A BlockdevRef string: an existing node. */
        node = vd_find_node(ref);
        if (!node) {
            r = vd_error_set(err, -ENOENT, "Cannot find device='%s' nor "
                             "node-name='%s'", ref, ref);
        } else if ((parent->flags & VD_NODE_RDWR) && node->read_only) {
            r = vd_error_set(err, -EROFS, "Node '%s' is read-only", ref);
            node = NULL;
        } else {
            vd_node_ref(node);
        }
    } else if (!filename && !vd_opts_count(sub)) {
        vd_opts_free(&sub);
        if (allow_none)
            return NULL;
        vd_error_set(err, -EINVAL, "A block device must be specified for "
                     "\"%s\"", name);
        return NULL;
    } else {
        /* A new node with the parent's mode. As QEMU's
         * bdrv_inherited_options(): a pure data child of a node that is
         * no format is probed; filtered children keep the parent's
         * protocol flag. */
        unsigned flags = parent->flags & ~VD_NODE_COPY_ON_READ;
        if (!parent->drv->is_format && (role & VD_ROLE_DATA) &&
            !(role & (VD_ROLE_METADATA | VD_ROLE_FILTERED)))
            flags &= ~VD_NODE_PROTOCOL;
        if ((parent->drv->is_format && !(role & VD_ROLE_COW)) ||
            (role & VD_ROLE_METADATA))
            flags |= VD_NODE_PROTOCOL;
        char *fopt = vd_opts_take(sub, "filename");
        if (fopt && !(flags & VD_NODE_PROTOCOL) &&
            !vd_opts_get(sub, "driver")) {
            /* QEMU probes a child given as options only through its
             * "file": a bare "filename" names no protocol node. */
            r = vd_error_set(err, -EINVAL, "Must specify either driver or "
                             "file");
        } else {
            r = vd_node_open(&node, fopt ? fopt : filename, NULL, sub, flags,
                             err);
        }
        free(fopt);
    }
    vd_opts_free(&sub);
    free(ref);
    if (r < 0)
        return NULL;
    c = vd_node_attach_child(parent, node, name, role, err);
    if (!c) {
        vd_node_unref(node);
        return NULL;
    }
    if ((role & VD_ROLE_PRIMARY) && !parent->file)
        parent->file = c;
    return c;
}

/* Identity of the protocol file under a node, for loop detection. */
static bool node_file_id(vd_node *n, dev_t *dev, ino_t *ino)
{
    while (n->file)
        n = n->file->node;
    struct stat st;
    if (!n->filename || stat(n->filename, &st) < 0)
        return false;
    *dev = st.st_dev;
    *ino = st.st_ino;
    return true;
}

/*
 * Opens the backing chain under @top, one layer at a time. @top_backing
 * is the "backing" option (NULL: use the image's, "" or "null": none)
 * and @bopts the "backing.*" options for the first layer.
 */
static int open_backing_chain(vd_node *top, const char *top_backing,
                              vd_opts *bopts, vd_error *err)
{
    enum { MAX_CHAIN = 100000 };
    size_t ids_cap = 16, nids = 0;
    struct { dev_t dev; ino_t ino; } *ids = malloc(ids_cap * sizeof(*ids));
    if (!ids)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    if (node_file_id(top, &ids[0].dev, &ids[0].ino))
        nids = 1;

    vd_node *cur = top;
    const char *override = top_backing;
    char *override_owned = NULL;
    vd_opts *layer_opts = bopts;
    int r = 0;
    for (int depth = 0; depth < MAX_CHAIN; depth++) {
        if (!cur->drv->supports_backing)
            break;
        const char *bname;
        if (override) {
            if (!*override || strcmp(override, "null") == 0)
                break;
            bname = override;
        } else {
            bname = cur->backing_file;
        }
        if ((!bname || !*bname) && !vd_opts_get(layer_opts, "file.filename"))
            break;
        char *full = bname ? (override ? strdup(bname)
                              : resolve_backing(cur->filename, bname))
                           : NULL;
        if (bname && !full) {
            r = vd_error_set(err, -ENOMEM, "Out of memory");
            break;
        }
        if (full && !override) {
            free(cur->full_backing_filename);
            cur->full_backing_filename = strdup(full);
        }
        /* This layer's options: the loop owns them unless they are the
         * caller's @bopts. */
        vd_opts *o = layer_opts ? layer_opts : vd_opts_new();
        layer_opts = NULL;
        if (!o) {
            free(full);
            r = vd_error_set(err, -ENOMEM, "Out of memory");
            break;
        }
        vd_node *existing = override ? vd_find_node(override) : NULL;
        if (existing) {
            /* "backing=NODE": an open node becomes the backing layer. */
            if (o != bopts)
                vd_opts_free(&o);
            free(full);
            vd_node_ref(existing);
            if (!vd_node_attach_child(cur, existing, "backing",
                                      VD_ROLE_COW | VD_ROLE_DATA, err)) {
                vd_node_unref(existing);
                r = err && err->code ? err->code : -ENOMEM;
            }
            break;
        }
        const vd_driver *bdrv = NULL;
        if (!override && cur->backing_format && !vd_opts_get(o, "driver")) {
            bdrv = vd_find_driver(cur->backing_format);
            if (!bdrv) {
                r = vd_error_set(err, -EINVAL, "Could not open backing file: "
                                 "Unknown driver '%s'", cur->backing_format);
                free(full);
                if (o != bopts)
                    vd_opts_free(&o);
                break;
            }
        }
        /* A loop is found before the file is opened again: a second
         * open of a layer above would conflict with that layer's own
         * locks and hide the real fault. */
        struct stat bst;
        if (full && !strstr(full, "://") && !vd_opts_get(o, "file.filename")
            && stat(full, &bst) == 0) {
            for (size_t i = 0; i < nids && r == 0; i++) {
                if (ids[i].dev == bst.st_dev && ids[i].ino == bst.st_ino)
                    r = vd_error_set(err, -ELOOP, "Backing chain of '%s' "
                                     "loops back to '%s'", top->filename,
                                     full);
            }
            if (r < 0) {
                free(full);
                if (o != bopts)
                    vd_opts_free(&o);
                break;
            }
        }
        /* Backing layers are read-only and share the top's cache mode. */
        unsigned bflags = (cur->flags & (VD_NODE_NOCACHE | VD_NODE_NO_FLUSH |
                                         VD_NODE_FORCE_SHARE |
                                         VD_NODE_CHECK)) |
                          VD_NODE_NO_BACKING | VD_NODE_QUIET;
        vd_opts *next_bopts = vd_opts_extract_prefix(o, "backing.");
        char *next_override = vd_opts_take(o, "backing");
        vd_node *b = NULL;
        vd_error lerr = VD_ERROR_INIT;
        r = node_open_one(&b, full, bdrv, o, bflags, &lerr);
        if (r == 0) {
            r = reject_leftover(b, o, &lerr);
            if (r < 0)
                vd_node_unref(b);
        }
        if (o != bopts)
            vd_opts_free(&o);
        if (r < 0) {
            vd_error_set(err, r, "Could not open backing file: %s",
                         lerr.message);
            free(full);
            free(next_override);
            vd_opts_free(&next_bopts);
            break;
        }
        dev_t dev;
        ino_t ino;
        if (node_file_id(b, &dev, &ino)) {
            for (size_t i = 0; i < nids; i++) {
                if (ids[i].dev == dev && ids[i].ino == ino) {
                    r = vd_error_set(err, -ELOOP, "Backing chain of '%s' "
                                     "loops back to '%s'", top->filename,
                                     full ? full : b->filename);
                    break;
                }
            }
            if (r == 0 && nids == ids_cap) {
                ids_cap *= 2;
                void *n = realloc(ids, ids_cap * sizeof(*ids));
                if (!n)
                    r = vd_error_set(err, -ENOMEM, "Out of memory");
                else
                    ids = n;
            }
            if (r == 0) {
                ids[nids].dev = dev;
                ids[nids].ino = ino;
                nids++;
            }
        }
        free(full);
        if (r == 0 && !vd_node_attach_child(cur, b, "backing",
                                            VD_ROLE_COW | VD_ROLE_DATA,
                                            err)) {
            r = err && err->code ? err->code : -ENOMEM;
        }
        if (r < 0) {
            vd_node_unref(b);
            free(next_override);
            vd_opts_free(&next_bopts);
            break;
        }
        cur = b;
        override = NULL;
        /* Options for the next layer come from "backing.backing.*". */
        layer_opts = next_bopts;
        /* An explicit "backing.backing=..." names the next layer. */
        free(override_owned);
        override_owned = next_override;
        override = next_override;
    }
    free(override_owned);
    if (layer_opts && layer_opts != bopts)
        vd_opts_free(&layer_opts);
    free(ids);
    return r;
}

int vd_node_open(vd_node **out, const char *filename, const vd_driver *drv,
                 vd_opts *opts, unsigned flags, vd_error *err)
{
    vd_opts *own = NULL;
    if (!opts)
        opts = own = vd_opts_new();
    if (!opts)
        return vd_error_set(err, -ENOMEM, "Out of memory");

    /* Backing options are the core's business, but only for drivers
     * that can hold a backing file; for others they stay and are
     * rejected by name below. */
    const vd_driver *named = drv;
    if (!named && vd_opts_get(opts, "driver"))
        named = vd_find_driver(vd_opts_get(opts, "driver"));
    bool may_back = !named || named->supports_backing;
    char *backing = may_back ? vd_opts_take(opts, "backing") : NULL;
    vd_opts *bopts = may_back && opts_has_prefix(opts, "backing.")
                     ? vd_opts_extract_prefix(opts, "backing.") : NULL;

    vd_node *node = NULL;
    int r = node_open_one(&node, filename, drv, opts, flags, err);
    if (r == 0 && !node->drv->supports_backing && (backing || bopts)) {
        r = vd_error_set(err, -EINVAL, "Block format '%s' does not support "
                         "the option 'backing'", node->drv->name);
        vd_node_unref(node);
    } else if (r == 0) {
        r = reject_leftover(node, opts, err);
        if (r < 0)
            vd_node_unref(node);
    }
    if (r == 0 && node->backing_file && !node->full_backing_filename &&
        !backing)
        node->full_backing_filename = resolve_backing(node->filename,
                                                      node->backing_file);
    if (r == 0 && !(flags & VD_NODE_NO_BACKING)) {
        r = open_backing_chain(node, backing, bopts, err);
        if (r < 0)
            vd_node_unref(node);
    }
    free(backing);
    vd_opts_free(&bopts);
    vd_opts_free(&own);
    if (r == 0)
        *out = node;
    return r;
}

/*
 * vd_reopen_opts(): QEMU's bdrv_reopen() with the old options kept, as
 * qemu-io's reopen command uses it. Everything is checked before the
 * node changes; then the driver's own options, the cache mode and the
 * read-only mode are applied in that order, each through the reopen
 * paths above (drained node, the driver closed and opened again, the
 * permissions checked before a switch to read-write takes its locks).
 */

/* Switches O_DIRECT and flush skipping (@cf, VD_NODE_NOCACHE and
 * VD_NODE_NO_FLUSH) on @n and the children holding its data, bottom-up
 * so that the files below have their new mode before @n opens again. */
static int reopen_cache_tree(vd_node *n, unsigned cf, vd_error *err)
{
    for (vd_child *c = n->children; c; c = c->next) {
        if (c->role & VD_ROLE_COW)
            continue;
        int r = reopen_cache_tree(c->node, cf, err);
        if (r < 0)
            return r;
    }
    unsigned f = (n->flags & ~(VD_NODE_NOCACHE | VD_NODE_NO_FLUSH)) | cf;
    return node_reopen(n, f, false, err);
}

/* Opens @n's driver again with @opts as its options, in its mode. An
 * option the driver leaves is one it cannot take, and QEMU's reopen
 * says so; then, as on any failure, the driver goes back to its old
 * options. */
static int reopen_driver_opts(vd_node *n, const vd_opts *opts, vd_error *err)
{
    vd_opts *o = vd_opts_clone(opts), *keep = vd_opts_clone(opts);
    int r;

    if (!o || !keep) {
        vd_opts_free(&o);
        vd_opts_free(&keep);
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    vd_node_drain_begin(n);
    vd_node_close_driver(n);
    r = n->drv->open(n, o, n->flags, err);
    if (r == 0 && vd_opts_first_key(o)) {
        r = vd_error_set(err, -EINVAL, "Cannot change the option '%s'",
                         vd_opts_first_key(o));
        vd_node_close_driver(n);
    }
    if (r == 0) {
        vd_opts_free(&n->open_opts);
        n->open_opts = keep;
        keep = NULL;
        driver_opened(n);
    } else {
        if (n->drv->instance_size)
            memset(n->opaque, 0, n->drv->instance_size);
        /* The old options opened this driver before; if they no longer
         * do, the node stays broken and every request fails. */
        vd_node_open_driver(n, n->flags, NULL);
    }
    vd_node_refresh_perms(n, NULL);
    vd_node_drain_end(n);
    vd_opts_free(&o);
    vd_opts_free(&keep);
    return r;
}

VD_API int vd_reopen_opts(vd_node *node, const vd_opts *opts, vd_error *err)
{
    vd_opts *o = opts ? vd_opts_clone(opts) : vd_opts_new();
    vd_opts *merged = NULL;
    unsigned flags = node->flags;
    bool wt = node->writethrough, ro, b;
    int dz = node->detect_zeroes, d = node->discard_unmap ? 1 : 0, r = 0;
    char *tmp;
    static const char *const dzs[] = { "off", "on", "unmap", NULL };
    static const char *const dms[] = { "ignore", "unmap", "off", "on", NULL };

    if (!o)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    /* What names the node cannot change. */
    static const char *const fixed[] = { "driver", "node-name", NULL };
    for (int i = 0; fixed[i]; i++) {
        const char *cur = i == 0 ? node->drv->name : node->node_name;
        if ((tmp = vd_opts_take(o, fixed[i]))) {
            bool same = cur && strcmp(tmp, cur) == 0;
            free(tmp);
            if (!same) {
                r = vd_error_set(err, -EINVAL, "Cannot change the option "
                                 "'%s'", fixed[i]);
                goto out;
            }
        }
    }
    if ((r = vd_opts_take_bool(o, "read-only", node->read_only, &ro,
                               err)) < 0)
        goto out;
    if ((tmp = vd_opts_take(o, "cache"))) {
        r = parse_cache_mode(tmp, &flags, &wt, err);
        free(tmp);
        if (r < 0)
            goto out;
    }
    if ((r = vd_opts_take_bool(o, "cache.direct", flags & VD_NODE_NOCACHE,
                               &b, err)) < 0)
        goto out;
    flags = b ? flags | VD_NODE_NOCACHE : flags & ~VD_NODE_NOCACHE;
    if ((r = vd_opts_take_bool(o, "cache.no-flush", flags & VD_NODE_NO_FLUSH,
                               &b, err)) < 0)
        goto out;
    flags = b ? flags | VD_NODE_NO_FLUSH : flags & ~VD_NODE_NO_FLUSH;
    /* QEMU's reopen words for these two, not its open's. */
    tmp = vd_opts_get(o, "detect-zeroes") ? strdup(vd_opts_get(o,
                                                    "detect-zeroes")) : NULL;
    r = vd_opts_take_enum(o, "detect-zeroes", dzs, dz, &dz, NULL);
    if (r < 0) {
        vd_error_set(err, r, "invalid parameter value: %s", tmp ? tmp : "");
    }
    free(tmp);
    if (r < 0)
        goto out;
    if ((r = vd_opts_take_enum(o, "discard", dms, d, &d, NULL)) < 0) {
        r = vd_error_set(err, r, "Invalid discard option");
        goto out;
    }
    if (dz == 2 && !(d == 1 || d == 3)) {
        r = vd_error_set(err, -EINVAL, "setting detect-zeroes to unmap is "
                         "not allowed without setting discard operation to "
                         "unmap");
        goto out;
    }
    /* Options of the children (file.*, backing.*): vdisk reopens a
     * child only along with its parent, so they cannot change. QEMU
     * names the child's own key. */
    for (size_t i = 0; i < vd_opts_count(o); i++) {
        const char *k, *v, *dot;
        vd_opts_nth(o, i, &k, &v);
        if ((dot = strchr(k, '.'))) {
            r = vd_error_set(err, -EINVAL, "Cannot change the option '%s'",
                             dot + 1);
            goto out;
        }
    }
    /* A writer above keeps the node from going read-only (the caller
     * gives up its own writing first, as qemu-io's reopen -r does). */
    if (ro && !node->read_only && (node->perm & VD_PERM_WRITE)) {
        r = vd_error_set(err, -EPERM, "Read-only block node '%s' cannot "
                         "support read-write users", node->node_name);
        goto out;
    }

    /* The driver's own options, merged into those it was opened with. */
    if (vd_opts_count(o)) {
        merged = vd_opts_clone(node->open_opts);
        for (size_t i = 0; merged && i < vd_opts_count(o); i++) {
            const char *k, *v;
            vd_opts_nth(o, i, &k, &v);
            if (vd_opts_set(merged, k, v) < 0)
                vd_opts_free(&merged);
        }
        if (!merged) {
            r = vd_error_set(err, -ENOMEM, "Out of memory");
            goto out;
        }
        if ((r = reopen_driver_opts(node, merged, err)) < 0)
            goto out;
    }
    if ((flags ^ node->flags) & (VD_NODE_NOCACHE | VD_NODE_NO_FLUSH)) {
        r = reopen_cache_tree(node, flags & (VD_NODE_NOCACHE |
                                             VD_NODE_NO_FLUSH), err);
        vd_node_refresh_perms(node, NULL);
        if (r < 0)
            goto out;
    }
    node->writethrough = wt;
    node->detect_zeroes = dz;
    node->discard_unmap = d == 1 || d == 3;
    if (ro != node->read_only) {
        unsigned perm = 0, shared = VD_PERM_ALL;
        if (node->opener)
            vd_user_get_perm(node->opener, &perm, &shared);
        r = vd_node_reopen(node, ro ? node->flags & ~VD_NODE_RDWR
                                    : node->flags | VD_NODE_RDWR, err);
        /* The opener writes again once the node is writable, as with
         * vd_reopen(). */
        if (r == 0 && !ro && node->opener)
            r = vd_user_set_perm(node->opener, perm | VD_PERM_WRITE, shared,
                                 err);
        if (r == -EACCES || r == -EROFS)
            vd_error_prepend(err, "Could not reopen '%s' read-write: ",
                             node->filename ? node->filename
                                            : node->node_name);
    }
out:
    vd_opts_free(&merged);
    vd_opts_free(&o);
    return r;
}

/* ---- public open/close ---- */

VD_API int vd_open(vd_node **out, const char *filename, const char *format,
                   const vd_opts *opts, unsigned flags, vd_error *err)
{
    *out = NULL;
    const vd_driver *drv = NULL;
    if (format) {
        drv = vd_find_driver(format);
        if (!drv)
            return vd_error_set(err, -EINVAL, "Unknown driver '%s'", format);
    }
    vd_opts *o = vd_opts_new();
    if (!o)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    if (filename && strncmp(filename, "json:", 5) == 0) {
        int r = vd_opts_from_json(o, filename + 5, err);
        if (r < 0) {
            vd_opts_free(&o);
            return r;
        }
        filename = NULL;
        if (drv && vd_opts_get(o, "driver") &&
            strcmp(vd_opts_get(o, "driver"), drv->name) == 0)
            drv = NULL;
    }
    /* Explicit options override what a json: filename says. */
    for (size_t i = 0; i < vd_opts_count(opts); i++) {
        const char *k, *v;
        vd_opts_nth(opts, i, &k, &v);
        if (vd_opts_set(o, k, v) < 0) {
            vd_opts_free(&o);
            return vd_error_set(err, -ENOMEM, "Out of memory");
        }
    }
    unsigned f = flags & (VD_O_RDWR | VD_O_NO_BACKING | VD_O_CHECK |
                          VD_O_FORCE_SHARE | VD_O_NO_IO | VD_O_QUIET |
                          VD_NODE_NO_BITMAPS);
    int r = vd_node_open(out, filename, drv, o, f, err);
    vd_opts_free(&o);
    if (r < 0 || (flags & VD_O_NO_USER))
        return r;
    /* The opener: what a QEMU tool's block backend takes. A "read-only"
     * option may have made the node read-only despite VD_O_RDWR. */
    vd_node *n = *out;
    unsigned perm = (flags & VD_O_NO_IO) ? 0 : VD_PERM_CONSISTENT_READ;
    if (!n->read_only)
        perm |= VD_PERM_WRITE;
    if (flags & VD_O_RESIZE)
        perm |= VD_PERM_RESIZE;
    r = vd_node_attach_opener(n, perm, VD_PERM_ALL, err);
    if (r < 0) {
        *out = NULL;
        vd_node_unref(n);
    }
    return r;
}

VD_API int vd_close(vd_node **node, vd_error *err)
{
    if (!node || !*node)
        return 0;
    vd_node *n = *node;
    *node = NULL;
    int r = 0;
    if (!n->read_only)
        r = vd_node_flush(n, err);
    /* The caller's handle goes, and with it what it held. */
    vd_node_drop_opener(n);
    vd_node_unref(n);
    return r;
}

VD_API const char *vd_node_name(const vd_node *node)
{
    return node->node_name;
}

VD_API const char *vd_node_format(const vd_node *node)
{
    return node->drv->name;
}

VD_API const char *vd_node_filename(const vd_node *node)
{
    return node->filename;
}

VD_API bool vd_node_is_read_only(const vd_node *node)
{
    return node->read_only;
}

VD_API vd_node *vd_node_child(const vd_node *node, const char *role)
{
    for (vd_child *c = node->children; c; c = c->next)
        if (strcmp(c->name, role) == 0)
            return c->node;
    return NULL;
}

/* ---- create ---- */

static bool option_known(const vd_create_option *list, const char *key)
{
    for (; list && list->name; list++)
        if (strcmp(list->name, key) == 0)
            return true;
    return false;
}

int vd_create_protocol(const char *filename, vd_opts *opts, vd_error *err)
{
    const vd_driver *proto = vd_protocol_for_filename(filename, err);
    if (!proto)
        return err && err->code ? err->code : -ENOENT;
    if (!proto->create)
        return vd_error_set(err, -ENOTSUP, "%s: Protocol driver '%s' does "
                            "not support image creation", filename,
                            proto ? proto->name : "?");
    if (proto->library) {
        int r = vd_dlib_load(proto->library, err);
        if (r < 0)
            return r;
    }
    return proto->create(filename, opts, err);
}

const vd_create_option vd_create_opts_simple[] = {
    { "size", "size", "Virtual disk size", NULL },
    { "preallocation", "string", "Preallocation mode (allowed values: off)",
      NULL },
    { NULL, NULL, NULL, NULL },
};

int vd_create_simple(const char *filename, vd_opts *opts, vd_error *err)
{
    static const char *const modes[] = { "off", "metadata", "falloc",
                                         "full", NULL };
    const vd_driver *proto = vd_protocol_for_filename(filename, err);
    vd_node *node = NULL;
    uint64_t size;
    char *mode;
    int r;

    if (!proto)
        return err && err->code ? err->code : -ENOENT;
    r = vd_opts_take_size(opts, "size", 0, &size, err);
    if (r < 0)
        return r;
    mode = vd_opts_take(opts, "preallocation");
    if (mode) {
        size_t k = 0;
        while (modes[k] && strcmp(modes[k], mode) != 0)
            k++;
        if (!modes[k])
            r = vd_error_set(err, -EINVAL, "%s: invalid parameter value: %s",
                             filename, mode);
        else if (k != 0)
            r = vd_error_set(err, -ENOTSUP, "%s: Unsupported preallocation "
                             "mode '%s'", filename, mode);
        free(mode);
        if (r < 0)
            return r;
    }
    r = vd_open_protocol(&node, filename, VD_NODE_RDWR, err);
    if (r < 0) {
        vd_error_prepend(err, "Protocol driver '%s' does not support image "
                         "creation, and opening the image failed: ",
                         proto->name);
        vd_error_prepend(err, "%s: ", filename);
        return -EINVAL;
    }
    /* Shrinking is the driver's to refuse or ignore (nbd and iscsi ignore
     * it); a size larger than the export or LUN is an error. */
    vd_error terr = VD_ERROR_INIT;
    r = vd_node_truncate(node, size, false, VD_PREALLOC_OFF, &terr);
    int64_t len = vd_node_getlength(node);
    if (r < 0 && r != -ENOTSUP) {
        r = vd_error_set(err, r, "%s: %s", filename, terr.message);
    } else if (len < 0) {
        r = vd_error_set(err, (int)len, "%s: Failed to inquire the new image "
                         "file's length: %s", filename, strerror((int)-len));
    } else if ((uint64_t)len < size) {
        r = vd_error_set(err, r < 0 ? r : -ENOTSUP, "%s: %s", filename,
                         r < 0 ? terr.message : "Cannot grow the image");
    } else {
        r = 0;
    }
    if (r == 0 && len > 0) {
        r = vd_node_pwrite_zeroes(node, 0, len < 512 ? (uint64_t)len : 512,
                                  VD_REQ_MAY_UNMAP, &terr);
        if (r < 0)
            vd_error_set(err, r, "%s: Failed to clear the new image's first "
                         "sector: %s", filename, strerror(-r));
    }
    vd_error_clear(&terr);
    vd_node_unref(node);
    return r;
}

int vd_open_protocol(vd_node **out, const char *filename, unsigned flags,
                     vd_error *err)
{
    vd_opts *o = vd_opts_new();
    if (!o)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    int r = vd_node_open(out, filename, NULL, o,
                         (flags | VD_NODE_PROTOCOL | VD_NODE_NO_BACKING) &
                         ~VD_NODE_QUIET, err);
    vd_opts_free(&o);
    /* A create writing its new image holds it as QEMU's does (write and
     * resize, nobody else resizes) until it lets go of the node. */
    if (r == 0 && (flags & VD_NODE_RDWR)) {
        r = vd_node_attach_opener(*out, VD_PERM_CONSISTENT_READ |
                                  VD_PERM_WRITE | VD_PERM_RESIZE,
                                  VD_PERM_ALL & ~VD_PERM_RESIZE, err);
        if (r < 0) {
            vd_node_unref(*out);
            *out = NULL;
        }
    }
    return r;
}

int vd_create_check_backing_fmt(const char *filename, const char *bfile,
                                const char *bfmt, bool has_size,
                                vd_error *err)
{
    if (!bfmt)
        return 0;
    if (!vd_qemu_driver_name(bfmt))
        return vd_error_set(err, -EINVAL, "%s: Parameter 'backing-fmt' "
                            "does not accept value '%s'", filename, bfmt);
    if (bfile && !has_size && !vd_find_driver(bfmt))
        return vd_error_set(err, -EINVAL, "%s: Could not open backing "
                            "image: Unknown driver '%s'", filename, bfmt);
    return 0;
}

VD_API int vd_create(const char *filename, const char *format,
                     const vd_opts *opts, vd_error *err)
{
    const vd_driver *drv = vd_find_driver(format ? format : "raw");
    if (!drv)
        return vd_error_set(err, -EINVAL, "%s: Unknown file format '%s'",
                            filename, format);
    if (!drv->open)
        return vd_driver_unsupported(drv, filename, err);
    if (!drv->create)
        return vd_error_set(err, -ENOTSUP, "%s: Format driver '%s' does not "
                            "support image creation", filename, drv->name);
    /* The protocol first (unknown, or unable to create: http), then the
     * option names and value syntax against the format's and the
     * protocol's lists, as qemu-img checks them before any driver sees
     * the options. */
    const vd_create_option *list = vd_create_options_for(drv->name, filename,
                                                         err);
    if (!list) {
        vd_error_prepend(err, "%s: ", filename);
        return err && err->code ? err->code : -EINVAL;
    }
    for (size_t i = 0; i < vd_opts_count(opts); i++) {
        const char *k, *v;
        vd_opts_nth(opts, i, &k, &v);
        /* QEMU's test is whether the format's creation options name a
         * backing file (parallels may have one, but not create one). */
        if ((!drv->supports_backing ||
             !option_known(drv->create_opts, "backing_file")) &&
            (strcmp(k, "backing_file") == 0 || strcmp(k, "backing_fmt") == 0))
            return vd_error_set(err, -EINVAL, "%s: Backing file not "
                                "supported for file format '%s'", filename,
                                drv->name);
    }
    int r0 = vd_check_create_opts_for(drv->name, filename, opts, err);
    if (r0 < 0) {
        vd_error_prepend(err, "%s: ", filename);
        return r0;
    }
    vd_opts *o = opts ? vd_opts_clone(opts) : vd_opts_new();
    if (!o)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    int r = drv->library ? vd_dlib_load(drv->library, err) : 0;
    if (r == 0)
        r = drv->create(filename, o, err);
    vd_opts_free(&o);
    return r;
}
