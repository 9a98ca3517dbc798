/*
 * Image information (qemu-img info's ImageInfo), driver-specific
 * statistics, consistency checks and space accounting (vd_du(); the
 * qcow2 driver's space_usage does the real work for its images).
 * Generic fields are filled here from
 * the node and from what its driver declares in the vtable (a pseudo
 * filename, whether it answers qemu's get_info); the format driver's
 * get_info adds what only it knows. The request statistics themselves
 * are counted in io.c.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "core/block_int.h"

/* Host bytes used by a node: the driver's answer, else (as QEMU's
 * bdrv_get_allocated_file_size()) unknown for a protocol driver
 * (blkdebug, blkverify), the filtered child's for a filter, or the sum
 * over the children that hold its data or metadata (not the backing
 * chain). */
static int64_t allocated_size(vd_node *n)
{
    if (n->drv->get_allocated_size)
        return n->drv->get_allocated_size(n);
    if (n->drv->protocol_name)
        return -ENOTSUP;
    int64_t sum = 0;
    bool any = false;
    for (vd_child *c = n->children; c; c = c->next) {
        if (c->role & VD_ROLE_COW)
            continue;
        int64_t s = allocated_size(c->node);
        if (s < 0)
            return s;
        sum += s;
        any = true;
    }
    return any ? sum : -ENOTSUP;
}

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

/* The filename qemu shows for @node: its own, else the first one found
 * down its file children; a driver that opens no file (null-co) names
 * its pseudo filename. */
static const char *shown_filename(const vd_node *node)
{
    for (const vd_node *n = node; n; n = n->file ? n->file->node : NULL) {
        if (n->filename && n->filename[0])
            return n->filename;
        if (n->drv->pseudo_filename)
            return n->drv->pseudo_filename;
    }
    return "";
}

/* Whether qemu's bdrv_get_info() answers for @node, which is when qemu
 * shows a dirty flag: the driver answers itself (get_info or
 * info_self), or passes the question down its file child
 * (info_from_file, filters). */
static bool answers_get_info(const vd_node *node)
{
    for (const vd_node *n = node; n; n = n->file ? n->file->node : NULL) {
        if (n->drv->get_info || n->drv->info_self)
            return true;
        if (!n->drv->info_from_file && !n->drv->is_filter)
            return false;
    }
    return false;
}

VD_API int vd_get_info(vd_node *node, vd_image_info **out, vd_error *err)
{
    *out = NULL;
    vd_image_info *info = calloc(1, sizeof(*info));
    if (!info)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    info->filename = strdup(shown_filename(node));
    info->format = strdup(node->drv->name);
    int64_t len = vd_node_getlength(node);
    info->virtual_size = len > 0 ? (uint64_t)len : 0;
    info->actual_size = allocated_size(node);
    if (info->actual_size < 0)
        info->actual_size = -1;
    info->has_dirty_flag = answers_get_info(node);
    info->backing_filename = dup_or_null(node->backing_file);
    info->full_backing_filename = dup_or_null(node->full_backing_filename);
    info->backing_filename_format = dup_or_null(node->backing_format);
    int r = 0;
    if (node->drv->get_info) {
        r = node->drv->get_info(node, info, err);
    } else if ((node->drv->is_filter || node->drv->info_from_file) &&
               node->file) {
        /* As QEMU's bdrv_get_info(): a filter answers with what the
         * node it filters says (the cluster size), and so does raw
         * (raw_get_info(): an rbd image's object size). */
        vd_image_info *below = NULL;
        if (vd_get_info(node->file->node, &below, NULL) == 0)
            info->cluster_size = below->cluster_size;
        vd_image_info_free(&below);
    }
    if (r == 0 && node->drv->snapshot_list && !info->snapshots) {
        r = node->drv->snapshot_list(node, &info->snapshots,
                                     &info->nb_snapshots, err);
    }
    if (r < 0) {
        vd_image_info_free(&info);
        return r;
    }
    *out = info;
    return 0;
}

VD_API void vd_image_info_free(vd_image_info **pinfo)
{
    if (!pinfo || !*pinfo)
        return;
    vd_image_info *info = *pinfo;
    free(info->filename);
    free(info->format);
    free(info->backing_filename);
    free(info->full_backing_filename);
    free(info->backing_filename_format);
    free(info->format_specific_json);
    for (size_t i = 0; i < info->nb_snapshots; i++) {
        free(info->snapshots[i].id);
        free(info->snapshots[i].name);
    }
    free(info->snapshots);
    free(info);
    *pinfo = NULL;
}

VD_API int vd_get_driver_stats(vd_node *node, vd_driver_stats *out)
{
    memset(out, 0, sizeof(*out));
    if (!node->drv->get_driver_stats)
        return -ENOTSUP;
    out->driver = node->drv->name;
    return node->drv->get_driver_stats(node, out);
}

VD_API int vd_check(vd_node *node, vd_check_result *res, unsigned fix,
                    vd_error *err)
{
    memset(res, 0, sizeof(*res));
    res->image_end_offset = -1;
    if (!node->drv->check)
        return vd_error_set(err, -ENOTSUP,
                            "This image format does not support checks");
    if (fix && node->read_only)
        return vd_error_set(err, -EROFS, "%s: cannot repair a read-only "
                            "image", node->filename);
    vd_node_drain_begin(node);
    int r = node->drv->check(node, res, fix, err);
    vd_node_drain_end(node);
    return r;
}

/* ---- space accounting (vd_du, `vdisk du`) ---- */

/* A format without accounting of its own: one row, the file's
 * allocation as used, what block status finds allocated as mapped. */
static int du_generic(vd_node *n, vd_du_result *res, vd_error *err)
{
    int64_t len = vd_node_getlength(n);
    uint64_t mapped = 0;
    vd_du_row *row;

    if (len < 0)
        return vd_error_set(err, (int)len, "%s: cannot get the image size",
                            n->filename);
    for (uint64_t off = 0; off < (uint64_t)len;) {
        uint64_t pnum = 0, map = 0;
        vd_node *file = NULL;
        int st = vd_node_block_status(n, true, off, (uint64_t)len - off,
                                      &pnum, &map, &file, err);
        if (st < 0)
            return st;
        if (pnum == 0)
            return vd_error_set(err, -EIO, "%s: block status made no "
                                "progress at offset %" PRIu64, n->filename,
                                off);
        if (st & VD_BLOCK_DATA)
            mapped += pnum;
        off += pnum;
    }
    row = calloc(1, sizeof(*row));
    if (!row)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    row->kind = VD_DU_IMAGE;
    row->provisioned = (uint64_t)len;
    row->used = res->disk_usage >= 0 ? (uint64_t)res->disk_usage
                                     : res->file_length;
    row->exclusive = row->used;
    row->mapped = mapped;
    res->rows = row;
    res->nb_rows = 1;
    res->allocated = row->used;
    return 0;
}

VD_API int vd_du(vd_node *node, vd_du_result **out, vd_error *err)
{
    vd_node *n = node;
    vd_du_result *res;
    int64_t len;
    int r;

    *out = NULL;
    /* A filter's image is the one it filters. */
    while (!n->drv->space_usage && n->drv->is_filter && n->file)
        n = n->file->node;
    res = calloc(1, sizeof(*res));
    if (!res)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    res->filename = strdup(n->filename ? n->filename : "");
    res->format = strdup(n->drv->name);
    if (!res->filename || !res->format) {
        vd_du_result_free(&res);
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    len = vd_node_getlength(n);
    res->virtual_size = len > 0 ? (uint64_t)len : 0;
    len = n->file ? vd_node_getlength(n->file->node) : len;
    res->file_length = len > 0 ? (uint64_t)len : 0;
    res->disk_usage = allocated_size(n);
    if (res->disk_usage < 0)
        res->disk_usage = -1;
    r = n->drv->space_usage ? n->drv->space_usage(n, res, err)
                            : du_generic(n, res, err);
    if (r < 0) {
        vd_du_result_free(&res);
        return r;
    }
    *out = res;
    return 0;
}

VD_API void vd_du_result_free(vd_du_result **pres)
{
    vd_du_result *res = pres ? *pres : NULL;

    if (!res)
        return;
    for (size_t i = 0; i < res->nb_rows; i++) {
        free(res->rows[i].id);
        free(res->rows[i].name);
    }
    free(res->rows);
    free(res->filename);
    free(res->format);
    free(res);
    *pres = NULL;
}
