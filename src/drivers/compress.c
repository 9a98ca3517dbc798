/*
 * The "compress" filter (QEMU 7.2's block/filter-compress.c): every
 * write through it is stored compressed by the format below, which must
 * be one that can (qcow2); reads, zero writes, discards and flushes pass
 * through. Its requests are aligned to the format's cluster size, so
 * the core turns a partial-cluster write into a read-modify-write of
 * whole clusters, as QEMU's refresh_limits makes it do.
 */
#include <errno.h>

#include "core/block_int.h"

static int compress_open(vd_node *node, vd_opts *opts, unsigned flags,
                         vd_error *err)
{
    vd_node *child = node->file->node;

    (void)opts;
    (void)flags;
    if (!child->drv->supports_compressed) {
        return vd_error_set(err, -ENOTSUP, "Compression is not supported for "
                            "underlying format: %s", child->drv->name);
    }
    return 0;
}

/* The child's limits, with requests in whole clusters (QEMU asks the
 * child's bdrv_get_info() for its cluster size). */
static void compress_refresh_limits(vd_node *node)
{
    vd_node *child = node->file->node;
    vd_image_info *info = NULL;

    node->bl = child->bl;
    if (vd_get_info(child, &info, NULL) == 0 && info->cluster_size &&
        info->cluster_size <= (1u << 30)) {
        node->bl.request_alignment = (uint32_t)info->cluster_size;
        /* A piece of max_transfer must stay a whole number of them. */
        if (node->bl.max_transfer &&
            node->bl.max_transfer % info->cluster_size) {
            node->bl.max_transfer -= node->bl.max_transfer %
                                     info->cluster_size;
            if (!node->bl.max_transfer) {
                node->bl.max_transfer = info->cluster_size;
            }
        }
    }
    vd_image_info_free(&info);
}

static int compress_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                            vd_iov *qiov, unsigned flags, vd_error *err)
{
    return vd_node_pwritev(node->file->node, off, bytes, qiov,
                           flags | VD_REQ_COMPRESSED, err);
}

const vd_driver vd_driver_compress = {
    .name = "compress",
    .is_filter = true,
    .supports_compressed = true,
    .open = compress_open,
    .pwritev = compress_pwritev,
    .getlength = vd_filter_getlength,
    .refresh_limits = compress_refresh_limits,
};
