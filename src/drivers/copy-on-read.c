/*
 * The "copy-on-read" filter (QEMU 7.2's block/copy-on-read.c): reads
 * through it copy what they find in the backing chain of the node below
 * into that node, so the data is local from then on. Writes, zero
 * writes, discards and flushes pass through.
 *
 * The copy itself is the core's (io.c's chain_preadv(), the same code
 * as a node's copy-on-read=on option): the filter asks for it with the
 * internal request flag VD_REQ_COPY_ON_READ, which reaches the first
 * node with a backing chain below. With "bottom" (a node of that chain,
 * not a filter) only what lies in the chain down to it, inclusive, is
 * copied; the filter then splits the read by where the data is, as
 * QEMU's cor_co_preadv_part() does. While the filter exists, writes to
 * the node it populates are serialised against its copies (the core's
 * vd_node_cor_begin(), as for a stream job), so a copy never overwrites
 * newer data with older.
 *
 * Permissions as QEMU's cor_child_perm(): the parents' consistent read,
 * write and resize pass through, and the filter always takes (and
 * shares) write-unchanged, which its copies are.
 */
#include <errno.h>
#include <stdlib.h>

#include "core/block_int.h"

typedef struct cor_state {
    vd_node *bottom;     /* referenced, or NULL */
    vd_node *target;     /* the node whose writes we serialise */
} cor_state;

/* The first node below @n that is not a filter (QEMU's
 * bdrv_skip_filters()). */
static vd_node *skip_filters(vd_node *n)
{
    while (n && n->drv->is_filter && n->file) {
        n = n->file->node;
    }
    return n;
}

static int cor_open(vd_node *node, vd_opts *opts, unsigned flags,
                    vd_error *err)
{
    cor_state *s = node->opaque;
    char *bottom = vd_opts_take(opts, "bottom");

    (void)flags;
    if (bottom) {
        vd_node *b = vd_find_node(bottom);
        int r = 0;
        if (!b) {
            r = vd_error_set(err, -EINVAL, "Bottom node '%s' not found",
                             bottom);
        } else if (b->drv->is_filter) {
            r = vd_error_set(err, -EINVAL, "Bottom node '%s' is a filter",
                             bottom);
        }
        free(bottom);
        if (r < 0) {
            return r;
        }
        vd_node_ref(b);
        s->bottom = b;
    }
    s->target = skip_filters(node->file->node);
    if (s->target) {
        vd_node_cor_begin(s->target);
    }
    return 0;
}

static void cor_close(vd_node *node)
{
    cor_state *s = node->opaque;

    if (s->target) {
        vd_node_cor_end(s->target);
    }
    vd_node_unref(s->bottom);
    s->bottom = NULL;
    s->target = NULL;
}

static int cor_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                      vd_iov *qiov, unsigned flags, vd_error *err)
{
    cor_state *s = node->opaque;
    vd_node *child = node->file->node;
    size_t qoff = 0;

    if (!s->bottom) {
        return vd_node_preadv(child, off, bytes, qiov,
                              flags | VD_REQ_COPY_ON_READ, err);
    }
    /* Only what lies in the chain down to the bottom node is copied. */
    vd_node *first = skip_filters(child);
    vd_node *below = first && first->backing
                     ? skip_filters(first->backing->node) : NULL;
    vd_node *base = s->bottom->backing ? s->bottom->backing->node : NULL;
    while (bytes > 0) {
        uint64_t n = bytes, map = 0;
        unsigned local = flags;
        vd_node *file = NULL;
        int depth = 0;
        /* A status that cannot be had is a copy, as QEMU does. */
        int r = vd_node_block_status(child, false, off, bytes, &n, &map,
                                     &file, NULL);
        if (r < 0) {
            n = bytes;
        }
        if (r <= 0 || !(r & VD_BLOCK_ALLOCATED)) {
            if (below) {
                uint64_t m = n;
                r = vd_node_block_status_above(below, base, false, off, n,
                                               &m, &map, &file, &depth,
                                               NULL);
                if (r < 0 || (r & VD_BLOCK_ALLOCATED)) {
                    local |= VD_REQ_COPY_ON_READ;
                }
                if (r >= 0) {
                    n = m;
                }
            }
        }
        vd_iov part;
        r = vd_iov_init_slice(&part, qiov, qoff, n);
        if (r == 0) {
            r = vd_node_preadv(child, off, n, &part, local, err);
            vd_iov_destroy(&part);
        }
        if (r < 0) {
            return r;
        }
        off += n;
        qoff += n;
        bytes -= n;
    }
    return 0;
}

static void cor_child_perm(vd_node *node, const vd_child *c, unsigned perm,
                           unsigned shared, unsigned *nperm,
                           unsigned *nshared)
{
    const unsigned passthrough = VD_PERM_CONSISTENT_READ | VD_PERM_WRITE |
                                 VD_PERM_RESIZE;

    (void)node;
    (void)c;
    *nperm = (perm & passthrough) | VD_PERM_WRITE_UNCHANGED;
    *nshared = (shared & passthrough) | (VD_PERM_ALL & ~passthrough);
}

const vd_driver vd_driver_copy_on_read = {
    .name = "copy-on-read",
    .instance_size = sizeof(cor_state),
    .is_filter = true,
    .supports_compressed = true,
    .open = cor_open,
    .close = cor_close,
    .preadv = cor_preadv,
    .getlength = vd_filter_getlength,
    .child_perm = cor_child_perm,
};
