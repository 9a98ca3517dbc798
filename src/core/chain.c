/*
 * Backing-chain operations: changing the recorded backing file, emptying
 * an overlay, commit (overlay data down into a base) and rebase (moving an
 * overlay onto another backing file without changing what it shows).
 *
 * Both copy operations work in chunks of COPY_CHUNK bytes, driven by
 * block status, so that only allocated data is read and written; zeros
 * are written as write_zeroes. They run in the caller's thread. Their dry
 * runs (vd_commit_plan(), vd_rebase_plan()) are the same loops with a
 * range callback where the write would be, so what a dry run reports is
 * what the real run writes.
 */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/block_int.h"

#define COPY_CHUNK (2u << 20)

static const char *label(const vd_node *n)
{
    return n->filename ? n->filename : n->node_name;
}

VD_API int vd_change_backing_file(vd_node *node, const char *backing,
                                  const char *backing_fmt, vd_error *err)
{
    if (!node->drv->supports_backing || !node->drv->change_backing_file)
        return vd_error_set(err, -ENOTSUP, "%s: Image format '%s' does not "
                            "support changing the backing file", label(node),
                            node->drv->name);
    if (node->read_only)
        return vd_error_set(err, -EROFS, "%s: Block node is read-only",
                            label(node));
    if (backing && !*backing)
        backing = NULL;
    if (!backing)
        backing_fmt = NULL;
    vd_node_drain_begin(node);
    int r = node->drv->change_backing_file(node, backing, backing_fmt, err);
    vd_node_drain_end(node);
    if (r < 0)
        return r;
    /* The node's record follows the image. */
    free(node->backing_file);
    free(node->backing_format);
    free(node->full_backing_filename);
    node->backing_file = backing ? strdup(backing) : NULL;
    node->backing_format = backing_fmt ? strdup(backing_fmt) : NULL;
    node->full_backing_filename = NULL;
    if (backing) {
        /* Same rule as when opening: relative to the overlay. */
        if (backing[0] != '/' && !strstr(backing, "://") && node->filename &&
            strchr(node->filename, '/')) {
            const char *slash = strrchr(node->filename, '/');
            size_t d = (size_t)(slash - node->filename) + 1;
            char *f = malloc(d + strlen(backing) + 1);
            if (f) {
                memcpy(f, node->filename, d);
                strcpy(f + d, backing);
            }
            node->full_backing_filename = f;
        } else {
            node->full_backing_filename = strdup(backing);
        }
    }
    return 0;
}

VD_API int vd_make_empty(vd_node *node, vd_error *err)
{
    if (!node->drv->make_empty)
        return vd_error_set(err, -ENOTSUP, "%s: Image format '%s' does not "
                            "support emptying", label(node), node->drv->name);
    if (node->read_only)
        return vd_error_set(err, -EROFS, "%s: Block node is read-only",
                            label(node));
    vd_node_drain_begin(node);
    int r = node->drv->make_empty(node, err);
    vd_node_drain_end(node);
    return r;
}

/* Sleeps as needed so that @done bytes after @start_ns respect @rate. */
static void rate_wait(uint64_t rate, uint64_t done, struct timespec *start)
{
    if (!rate)
        return;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    double elapsed = (double)(now.tv_sec - start->tv_sec) +
                     (double)(now.tv_nsec - start->tv_nsec) / 1e9;
    double due = (double)done / (double)rate;
    if (due > elapsed)
        usleep((useconds_t)((due - elapsed) * 1e6));
}

/* A dry run's callback when its caller wants only the refusals. */
static void plan_nothing(uint64_t offset, uint64_t length, void *opaque)
{
    (void)offset;
    (void)length;
    (void)opaque;
}

/* The depth of @base below @top, or -1 when it is not in the chain. */
static int chain_depth(vd_node *top, vd_node *base)
{
    int d = 0;
    for (vd_node *p = top; p; p = p->backing ? p->backing->node : NULL, d++)
        if (p == base)
            return d;
    return -1;
}

/*
 * The granularity at which commit copies, as QEMU's active commit (a
 * mirror into the base) does: the base's cluster size, between 4 KiB and
 * 64 KiB. A granule touched by data above the base is copied whole, as
 * the top reads it, so the base ends up allocated exactly where qemu-img
 * commit leaves it allocated (which shows once lower layers change).
 */
static uint64_t commit_granularity(vd_node *base)
{
    vd_image_info *info = NULL;
    uint64_t g = 65536;
    if (vd_get_info(base, &info, NULL) == 0 && info->cluster_size) {
        g = info->cluster_size < 4096 ? 4096 : info->cluster_size;
        if (g > 65536)
            g = 65536;
    }
    vd_image_info_free(&info);
    return g;
}

/* Copies [off, off+bytes) as the top reads it into the base: ranges that
 * read as zeros become write_zeroes, the rest is read and written. */
static int commit_range(vd_node *top, vd_node *base, uint64_t off,
                        uint64_t bytes, uint8_t *buf, vd_error *err)
{
    while (bytes > 0) {
        uint64_t want = bytes < COPY_CHUNK ? bytes : COPY_CHUNK;
        uint64_t pnum = 0, map;
        vd_node *file;
        int depth;
        int st = vd_node_block_status_above(top, NULL, true, off, want,
                                            &pnum, &map, &file, &depth, err);
        if (st < 0)
            return st;
        int r;
        if (st & VD_BLOCK_ZERO) {
            r = vd_node_pwrite_zeroes(base, off, pnum, VD_REQ_MAY_UNMAP, err);
        } else {
            vd_iov v;
            vd_iov_init_buf(&v, buf, pnum);
            r = vd_node_preadv(top, off, pnum, &v, 0, err);
            if (r == 0)
                r = vd_node_pwritev(base, off, pnum, &v, 0, err);
        }
        if (r < 0)
            return r;
        /* The base is flushed at the end: its disk writes meanwhile. */
        vd_node_advise(base, off, pnum, VD_ADVISE_WRITEBACK);
        off += pnum;
        bytes -= pnum;
    }
    return 0;
}

/* With @plan, the ranges are handed to it instead of being copied. */
static int commit_copy(vd_node *top, vd_node *base, uint64_t len,
                       uint64_t rate, vd_progress_fn progress, void *opaque,
                       vd_range_fn plan, void *plan_opaque, vd_error *err)
{
    uint8_t *buf = plan ? NULL : vd_node_blockalign(base, COPY_CHUNK);
    if (!plan && !buf)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    uint64_t g = commit_granularity(base);
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    uint64_t copied = 0, done = 0;
    int r = 0;
    for (uint64_t off = 0; off < len && r == 0;) {
        uint64_t want = len - off < COPY_CHUNK ? len - off : COPY_CHUNK;
        uint64_t pnum = 0, map;
        vd_node *file;
        int depth;
        r = vd_node_block_status_above(top, base, false, off, want, &pnum,
                                       &map, &file, &depth, err);
        if (r < 0)
            break;
        int st = r;
        r = 0;
        if (st & VD_BLOCK_ALLOCATED) {
            /* Allocated above the base: whole granules go down. */
            uint64_t from = off - off % g;
            uint64_t to = off + pnum + (g - (off + pnum) % g) % g;
            if (to > len)
                to = len;
            if (from < done)
                from = done;
            if (from < to && plan) {
                plan(from, to - from, plan_opaque);
                done = to;
            } else if (from < to) {
                r = commit_range(top, base, from, to - from, buf, err);
                copied += to - from;
                done = to;
                rate_wait(rate, copied, &start);
            }
        }
        off += pnum;
        if (progress)
            progress((double)off * 100.0 / (double)len, opaque);
    }
    free(buf);
    return r;
}

/* The refusals of a commit before anything is written (the base that
 * @*base resolves to must be in @top's chain). */
static int commit_check(vd_node *top, vd_node **base, int64_t *top_len,
                        int64_t *base_len, vd_error *err)
{
    vd_node *immediate = top->backing ? top->backing->node : NULL;
    if (!immediate)
        return vd_error_set(err, -EINVAL, "Image does not have a backing "
                            "file");
    if (!*base)
        *base = immediate;
    if (*base == top || chain_depth(top, *base) < 0)
        return vd_error_set(err, -EINVAL, "'%s' is not in the backing chain "
                            "of '%s'", label(*base), label(top));
    *top_len = vd_node_getlength(top);
    *base_len = vd_node_getlength(*base);
    if (*top_len < 0 || *base_len < 0)
        return vd_error_set(err, -EIO, "Could not get the image sizes");
    return 0;
}

VD_API int vd_commit_plan(vd_node *top, vd_node *base, vd_range_fn fn,
                          void *opaque, vd_progress_fn progress,
                          void *popaque, vd_error *err)
{
    int64_t top_len = 0, base_len = 0;
    int r = commit_check(top, &base, &top_len, &base_len, err);
    if (r < 0)
        return r;
    vd_node_drain_begin(top);
    r = commit_copy(top, base, (uint64_t)top_len, 0, progress, popaque,
                    fn ? fn : plan_nothing, opaque, err);
    vd_node_drain_end(top);
    return r;
}

VD_API int vd_commit(vd_node *top, vd_node *base, unsigned flags,
                     uint64_t rate_limit, vd_progress_fn progress,
                     void *opaque, vd_error *err)
{
    int64_t top_len = 0, base_len = 0;
    int r = commit_check(top, &base, &top_len, &base_len, err);
    if (r < 0)
        return r;
    vd_node *immediate = top->backing->node;
    if (top->read_only && !(flags & VD_COMMIT_KEEP_TOP) && base == immediate)
        return vd_error_set(err, -EROFS, "%s: Block node is read-only",
                            label(top));

    bool was_ro = base->read_only;
    if (was_ro) {
        r = vd_node_reopen(base, base->flags | VD_NODE_RDWR, err);
        if (r < 0) {
            vd_error_prepend(err, "Could not reopen '%s' read-write: ",
                             label(base));
            return r;
        }
    }
    /* The commit writes (and may grow) the base: it holds that as a
     * user, as QEMU's commit job does, so whoever relies on the base
     * not changing in this process or another one refuses. */
    vd_user *writer = NULL;
    r = vd_user_new(&writer, base, "commit job 'commit'",
                    VD_PERM_CONSISTENT_READ | VD_PERM_WRITE | VD_PERM_RESIZE,
                    VD_PERM_CONSISTENT_READ | VD_PERM_WRITE |
                    VD_PERM_WRITE_UNCHANGED, err);
    if (r < 0) {
        if (was_ro)
            vd_node_reopen(base, base->flags & ~VD_NODE_RDWR, NULL);
        return r;
    }
    vd_node_drain_begin(top);
    if (base_len < top_len)
        r = vd_node_truncate(base, (uint64_t)top_len, false, VD_PREALLOC_OFF,
                             err);
    if (r == 0)
        r = commit_copy(top, base, (uint64_t)top_len, rate_limit, progress,
                        opaque, NULL, NULL, err);
    if (r == 0)
        r = vd_node_flush(base, err);
    vd_node_drain_end(top);
    vd_user_free(&writer);
    /* Emptying the top only makes sense when it reads through to the base
     * directly; with layers in between it stays as it is (qemu's -b). */
    if (r == 0 && !(flags & VD_COMMIT_KEEP_TOP) && base == immediate) {
        r = vd_make_empty(top, err);
        if (r == 0)
            r = vd_node_flush(top, err);
    }
    if (was_ro) {
        vd_error lerr = VD_ERROR_INIT;
        int r2 = vd_node_reopen(base, base->flags & ~VD_NODE_RDWR, &lerr);
        if (r == 0 && r2 < 0) {
            r = vd_error_set(err, r2, "%s", lerr.message);
        }
    }
    return r;
}

/* Resolves @name relative to @top's directory, as backing names are. */
static char *backing_path(const vd_node *top, const char *name)
{
    if (name[0] == '/' || strstr(name, "://") || !top->filename ||
        !strchr(top->filename, '/'))
        return strdup(name);
    const char *slash = strrchr(top->filename, '/');
    size_t d = (size_t)(slash - top->filename) + 1;
    char *f = malloc(d + strlen(name) + 1);
    if (f) {
        memcpy(f, top->filename, d);
        strcpy(f + d, name);
    }
    return f;
}

static bool same_file(const char *a, const char *b)
{
    struct stat sa, sb;
    return a && b && stat(a, &sa) == 0 && stat(b, &sb) == 0 &&
           sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* Reads [off, off+len) of @n, or zeros when there is no node. */
static int read_or_zero(vd_node *n, uint64_t off, uint64_t len, uint8_t *buf,
                        vd_error *err)
{
    if (!n) {
        memset(buf, 0, len);
        return 0;
    }
    vd_iov v;
    vd_iov_init_buf(&v, buf, len);
    return vd_node_preadv(n, off, len, &v, 0, err);
}

/* Copies into @top every 512-byte sector of [off, off+len) where the old
 * and the new backing read differently (with @plan: hands it the runs). */
static int rebase_range(vd_node *top, vd_node *old_b, vd_node *new_b,
                        uint64_t off, uint64_t len, uint8_t *a, uint8_t *b,
                        vd_range_fn plan, void *plan_opaque, vd_error *err)
{
    int r = read_or_zero(old_b, off, len, a, err);
    if (r == 0)
        r = read_or_zero(new_b, off, len, b, err);
    if (r < 0)
        return r;
    enum { SECTOR = 512 };
    uint64_t pos = 0;
    while (pos < len) {
        uint64_t n = len - pos < SECTOR ? len - pos : SECTOR;
        if (memcmp(a + pos, b + pos, n) == 0) {
            pos += n;
            continue;
        }
        /* A run of differing sectors is written in one request. */
        uint64_t end = pos + n;
        while (end < len) {
            uint64_t m = len - end < SECTOR ? len - end : SECTOR;
            if (memcmp(a + end, b + end, m) == 0)
                break;
            end += m;
        }
        if (plan) {
            plan(off + pos, end - pos, plan_opaque);
        } else {
            vd_iov v;
            vd_iov_init_buf(&v, a + pos, end - pos);
            r = vd_node_pwritev(top, off + pos, end - pos, &v, 0, err);
            if (r < 0)
                return r;
            /* The image is flushed at the end: its disk writes meanwhile. */
            vd_node_advise(top, off + pos, end - pos, VD_ADVISE_WRITEBACK);
        }
        pos = end;
    }
    return 0;
}

/*
 * QEMU's bdrv_find_backing_image() as qemu-img rebase calls it: the new
 * backing file @path (already made relative to the image's directory) is
 * made absolute against each image of the chain in turn and compared,
 * canonicalised, with that image's backing file. The first match is the
 * node below that image, which a safe rebase then uses as it is, opened
 * with its own driver whatever -F says. (Relative paths are thereby
 * resolved twice, as in QEMU: a match needs the image in the current
 * directory or absolute names.)
 */
static vd_node *find_backing_image(vd_node *top, const char *path)
{
    for (vd_node *p = top; p && p->backing; p = p->backing->node) {
        char *cand = backing_path(p, path);
        char a[PATH_MAX], b[PATH_MAX];
        bool match = cand && p->full_backing_filename &&
                     realpath(cand, a) &&
                     realpath(p->full_backing_filename, b) && !strcmp(a, b);
        free(cand);
        if (match)
            return p->backing->node;
    }
    return NULL;
}

/* The refusals of every rebase before anything is written. */
static int rebase_check(vd_node *top, vd_error *err)
{
    if (!top->drv->supports_backing || !top->drv->change_backing_file)
        return vd_error_set(err, -ENOTSUP, "%s: Image format '%s' does not "
                            "support changing the backing file", label(top),
                            top->drv->name);
    return 0;
}

/* A safe rebase's nodes: the old backing node (borrowed, NULL for none)
 * and the new one (@*new_b: a reference the caller drops; NULL for
 * none), with the refusals made before anything is copied. */
static int rebase_open(vd_node *top, const char *backing,
                       const char *backing_fmt, const vd_opts *backing_opts,
                       vd_node **old_b, vd_node **new_b, vd_error *err)
{
    *old_b = top->backing ? top->backing->node : NULL;
    *new_b = NULL;
    if (!*old_b && top->backing_file)
        return vd_error_set(err, -ENOENT, "Could not open old backing file "
                            "'%s'", top->backing_file);
    if (!backing)
        return 0;
    char *path = backing_path(top, backing);
    if (!path)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    if (same_file(path, top->filename)) {
        free(path);
        return vd_error_set(err, -EINVAL, "Backing file '%s' would be "
                            "the image itself", backing);
    }
    int r = 0;
    *new_b = find_backing_image(top, path);
    if (*new_b) {
        vd_node_ref(*new_b);
    } else {
        const vd_driver *drv = NULL;
        vd_error lerr = VD_ERROR_INIT;
        if (backing_fmt && !(drv = vd_find_driver(backing_fmt))) {
            vd_error_set(&lerr, -EINVAL, "Unknown driver '%s'", backing_fmt);
            r = -EINVAL;
        } else {
            vd_opts *o = backing_opts ? vd_opts_clone(backing_opts)
                                      : vd_opts_new();
            r = o ? vd_node_open(new_b, path, drv, o, VD_NODE_QUIET, &lerr)
                  : -ENOMEM;
            vd_opts_free(&o);
        }
        if (r < 0)
            vd_error_set(err, r, "Could not open new backing file '%s': %s",
                         backing, lerr.message);
    }
    free(path);
    return r;
}

/* Copies into @top what reads differently through @new_b than through
 * @old_b where @top does not hold the data itself (with @plan: hands it
 * the ranges instead). */
static int rebase_copy(vd_node *top, vd_node *old_b, vd_node *new_b,
                       vd_range_fn plan, void *plan_opaque,
                       vd_progress_fn progress, void *opaque, vd_error *err)
{
    int r = 0;
    int64_t len = vd_node_getlength(top);
    uint8_t *a = vd_node_blockalign(top, COPY_CHUNK);
    uint8_t *b = vd_node_blockalign(top, COPY_CHUNK);
    if (!a || !b)
        r = vd_error_set(err, -ENOMEM, "Out of memory");
    vd_node_drain_begin(top);
    for (uint64_t off = 0; r == 0 && len > 0 && off < (uint64_t)len;) {
        uint64_t want = (uint64_t)len - off < COPY_CHUNK
                        ? (uint64_t)len - off : COPY_CHUNK;
        uint64_t pnum = 0, map;
        vd_node *file;
        r = vd_node_block_status(top, false, off, want, &pnum, &map, &file,
                                 err);
        if (r < 0)
            break;
        int st = r;
        r = 0;
        /* What the top holds itself stays visible whatever lies below. */
        if (!(st & VD_BLOCK_ALLOCATED))
            r = rebase_range(top, old_b, new_b, off, pnum, a, b, plan,
                             plan_opaque, err);
        off += pnum;
        if (progress)
            progress((double)off * 100.0 / (double)len, opaque);
    }
    if (r == 0 && !plan)
        r = vd_node_flush(top, err);
    vd_node_drain_end(top);
    free(a);
    free(b);
    return r;
}

VD_API int vd_rebase_plan(vd_node *top, const char *backing,
                          const char *backing_fmt,
                          const vd_opts *backing_opts, unsigned flags,
                          vd_range_fn fn, void *opaque,
                          vd_progress_fn progress, void *popaque,
                          vd_error *err)
{
    vd_node *old_b = NULL, *new_b = NULL;
    int r = rebase_check(top, err);
    if (backing && !*backing)
        backing = NULL;
    if (r == 0 && (flags & VD_REBASE_UNSAFE))
        return 0;
    if (r == 0)
        r = rebase_open(top, backing, backing_fmt, backing_opts, &old_b,
                        &new_b, err);
    if (r < 0)
        return r;
    r = rebase_copy(top, old_b, new_b, fn ? fn : plan_nothing, opaque,
                    progress, popaque, err);
    vd_node_unref(new_b);
    return r;
}

VD_API int vd_rebase(vd_node *top, const char *backing,
                     const char *backing_fmt, const vd_opts *backing_opts,
                     unsigned flags, vd_progress_fn progress, void *opaque,
                     vd_error *err)
{
    int r = rebase_check(top, err);
    if (r < 0)
        return r;
    if (top->read_only)
        return vd_error_set(err, -EROFS, "%s: Block node is read-only",
                            label(top));
    if (backing && !*backing)
        backing = NULL;
    if (flags & VD_REBASE_UNSAFE)
        return vd_change_backing_file(top, backing, backing_fmt, err);

    vd_node *old_b = NULL, *new_b = NULL;
    r = rebase_open(top, backing, backing_fmt, backing_opts, &old_b, &new_b,
                    err);
    if (r < 0)
        return r;
    r = rebase_copy(top, old_b, new_b, NULL, NULL, progress, opaque, err);
    if (r == 0)
        r = vd_change_backing_file(top, backing, backing_fmt, err);
    if (r == 0) {
        /* The open chain follows the header. */
        if (top->backing)
            vd_node_detach_child(top, top->backing);
        if (new_b && !vd_node_attach_child(top, new_b, "backing",
                                           VD_ROLE_COW | VD_ROLE_DATA,
                                           err)) {
            vd_node_unref(new_b);
            return err && err->code ? err->code : -ENOMEM;
        }
        return 0;
    }
    vd_node_unref(new_b);
    return r;
}

/* ---- live external snapshots ---- */

VD_API int vd_snapshot_append(vd_node *node, vd_node *overlay, vd_error *err)
{
    if (vd_op_is_blocked(node, VD_OP_EXTERNAL_SNAPSHOT, err))
        return -EBUSY;
    if (vd_node_has_users(overlay))
        return vd_error_set(err, -EBUSY, "The overlay is already in use");
    if (vd_op_is_blocked(overlay, VD_OP_EXTERNAL_SNAPSHOT, err))
        return -EBUSY;
    if (overlay->backing)
        return vd_error_set(err, -EINVAL, "The overlay already has a "
                            "backing image");
    if (!overlay->drv->supports_backing)
        return vd_error_set(err, -ENOTSUP, "The overlay does not support "
                            "backing images");
    /* Hold the node's users at their gates: what they wrote before is
     * flushed into @node, what they write next goes to the overlay. */
    vd_node_gate_users(node);
    int r = 0;
    if (!node->read_only) {
        r = vd_node_flush(node, err);
        if (r < 0) {
            vd_node_ungate_users(node);
            return vd_error_set(err, r, "I/O error");
        }
    }
    vd_node_ref(node);
    vd_node_drain_begin(overlay);
    if (!vd_node_attach_child(overlay, node, "backing",
                              VD_ROLE_COW | VD_ROLE_DATA, err)) {
        vd_node_drain_end(overlay);
        vd_node_unref(node);
        vd_node_ungate_users(node);
        return err && err->code ? err->code : -ENOMEM;
    }
    vd_node_drain_end(overlay);
    r = vd_node_replace(node, overlay, err);
    if (r < 0) {
        vd_node_drain_begin(overlay);
        vd_node_detach_child(overlay, overlay->backing);
        vd_node_drain_end(overlay);
        vd_node_ungate_users(node);
        return r;
    }
    vd_node_ungate_users(overlay);
    return 0;
}

VD_API int vd_snapshot_unappend(vd_node *overlay, vd_error *err)
{
    vd_node *node = overlay->backing ? overlay->backing->node : NULL;
    if (!node)
        return vd_error_set(err, -EINVAL, "'%s' has no backing node",
                            overlay->node_name);
    vd_node_ref(node);
    vd_node_gate_users(overlay);
    int r = vd_node_replace(overlay, node, err);
    if (r < 0) {
        vd_node_ungate_users(overlay);
        vd_node_unref(node);
        return r;
    }
    vd_node_drain_begin(overlay);
    vd_node_detach_child(overlay, overlay->backing);
    vd_node_drain_end(overlay);
    vd_node_ungate_users(node);
    vd_node_unref(node);
    return 0;
}

VD_API int vd_node_set_backing(vd_node *node, vd_node *backing,
                               vd_error *err)
{
    if (!node->drv->supports_backing)
        return vd_error_set(err, -ENOTSUP, "Driver '%s' of node '%s' does "
                            "not support backing files", node->drv->name,
                            node->node_name);
    for (vd_node *n = backing; n; n = n->backing ? n->backing->node : NULL)
        if (n == node)
            return vd_error_set(err, -EINVAL, "Making '%s' a backing file "
                                "of '%s' would create a cycle",
                                backing->node_name, node->node_name);
    int r = 0;
    vd_node_drain_begin(node);
    if (node->backing)
        vd_node_detach_child(node, node->backing);
    if (backing) {
        vd_node_ref(backing);
        if (!vd_node_attach_child(node, backing, "backing",
                                  VD_ROLE_COW | VD_ROLE_DATA, err)) {
            vd_node_unref(backing);
            r = err && err->code ? err->code : -ENOMEM;
        }
    }
    vd_node_drain_end(node);
    return r;
}
