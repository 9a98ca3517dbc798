/*
 * Two views of an image compared from metadata, shared by `vdisk diff`
 * (cmd_diff.c) and `vdisk export-diff` (cmd_export_diff.c): where a
 * view's bytes come from, and whether two views hold the same bytes
 * there without reading them. A range both views map to the same offset
 * of the same file holds the same bytes (a qcow2 cluster shared by a
 * snapshot is copied before it is written, and a backing layer's
 * clusters are seen through the overlay at their own offsets); a range
 * that reads as zeros in both is the same too.
 */
#ifndef VDISK_TOOLS_DIFF_VIEW_H
#define VDISK_TOOLS_DIFF_VIEW_H

#include <stdbool.h>
#include <stdint.h>

#include "vdisk/vdisk.h"

/* Where a view's byte at some offset comes from, for @length bytes. */
typedef struct diff_view_ext {
    uint64_t length;
    bool zero;                  /* reads as zeros */
    bool mapped;                /* file/offset say where the bytes are */
    const char *file;
    uint64_t offset;
} diff_view_ext;

/* Fills @v for [@off, @off + @bytes) of @node, a view of @size bytes
 * (past its end it reads as zeros, as compare does). Returns 0 or a
 * negative errno with @err filled. */
int diff_view_status(vd_node *node, uint64_t size, uint64_t off,
                     uint64_t bytes, diff_view_ext *v, vd_error *err);

/* Whether two extents at the same offset hold the same bytes. */
bool diff_view_same(const diff_view_ext *a, const diff_view_ext *b);

/* Whether @name is the id or name of a snapshot of @node. */
bool diff_view_has_snapshot(vd_node *node, const char *name);

#endif
