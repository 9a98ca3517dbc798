/*
 * The "snapshot-access" driver (QEMU 7.2's block/snapshot-access.c): an
 * ordinary node over the snapshot API of its "file" child, in practice a
 * copy-before-write filter, whose point-in-time image it shows: reads
 * and block status are the snapshot's (the vtable's preadv_snapshot and
 * snapshot_block_status), a discard gives the range of the snapshot up
 * (pdiscard_snapshot: no more copies, no more reads there), and writes
 * are refused. Exported over NBD it is the fleecing export
 * (docs/jobs.md, "Fleecing").
 *
 * A child without the snapshot API is accepted, as QEMU does, and every
 * request then fails with -ENOTSUP. The node takes no permission on its
 * child and shares all: the filter below guards the data itself.
 */
#include <errno.h>

#include "core/block_int.h"

static int sa_open(vd_node *node, vd_opts *opts, unsigned flags,
                   vd_error *err)
{
    (void)flags;
    /* A file name given to the node names its file, as for any format
     * (qemu-img info -f snapshot-access FILE). */
    if (!vd_node_open_child(node, opts, "file", node->filename,
                            VD_ROLE_DATA | VD_ROLE_PRIMARY, false, err))
        return err && err->code ? err->code : -EINVAL;
    return 0;
}

static int no_snapshot(vd_node *node, vd_error *err)
{
    return vd_error_set(err, -ENOTSUP, "Node '%s' offers no snapshot "
                        "access", node->file->node->node_name);
}

static int sa_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                     vd_iov *qiov, unsigned flags, vd_error *err)
{
    vd_node *f = node->file->node;
    /* As QEMU: no copy-on-read or other flag can be honoured here. */
    if (flags)
        return vd_error_set(err, -ENOTSUP, "snapshot-access takes no "
                            "request flags");
    if (!f->drv->preadv_snapshot)
        return no_snapshot(node, err);
    return f->drv->preadv_snapshot(f, off, bytes, qiov, err);
}

static int sa_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                      vd_iov *qiov, unsigned flags, vd_error *err)
{
    (void)node;
    (void)off;
    (void)bytes;
    (void)qiov;
    (void)flags;
    return vd_error_set(err, -ENOTSUP, "A snapshot-access node cannot be "
                        "written");
}

static int sa_pwrite_zeroes(vd_node *node, uint64_t off, uint64_t bytes,
                            unsigned flags, vd_error *err)
{
    /* -ENOTSUP would ask the core for its zero-buffer fallback, which
     * pwritev refuses the same way. */
    return sa_pwritev(node, off, bytes, NULL, flags | VD_REQ_NO_FALLBACK,
                      err);
}

static int sa_pdiscard(vd_node *node, uint64_t off, uint64_t bytes,
                       vd_error *err)
{
    vd_node *f = node->file->node;
    if (!f->drv->pdiscard_snapshot)
        return no_snapshot(node, err);
    return f->drv->pdiscard_snapshot(f, off, bytes, err);
}

static int sa_block_status(vd_node *node, bool want_zero, uint64_t off,
                           uint64_t bytes, uint64_t *pnum, uint64_t *map,
                           vd_node **file, vd_error *err)
{
    vd_node *f = node->file->node;
    if (!f->drv->snapshot_block_status)
        return no_snapshot(node, err);
    return f->drv->snapshot_block_status(f, want_zero, off, bytes, pnum, map,
                                         file, err);
}

static void sa_child_perm(vd_node *node, const vd_child *c, unsigned perm,
                          unsigned shared, unsigned *nperm,
                          unsigned *nshared)
{
    (void)node;
    (void)c;
    (void)perm;
    (void)shared;
    *nperm = 0;
    *nshared = VD_PERM_ALL;
}

const vd_driver vd_driver_snapshot_access = {
    .name = "snapshot-access",
    .is_format = true,
    .opens_children = true,
    .open = sa_open,
    .preadv = sa_preadv,
    .pwritev = sa_pwritev,
    .pwrite_zeroes = sa_pwrite_zeroes,
    .pdiscard = sa_pdiscard,
    .block_status = sa_block_status,
    .getlength = vd_filter_getlength,
    .child_perm = sa_child_perm,
};
