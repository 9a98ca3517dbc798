/*
 * Views of an image compared from metadata (diff_view.h): block status
 * reduced to "zero", "mapped at FILE:OFFSET" or neither.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "diff_view.h"

int diff_view_status(vd_node *node, uint64_t size, uint64_t off,
                     uint64_t bytes, diff_view_ext *v, vd_error *err)
{
    vd_extent ext;
    int r;

    memset(v, 0, sizeof(*v));
    if (off >= size) {
        /* Past a shorter view's end: reads as zeros (as compare does). */
        v->length = bytes;
        v->zero = true;
        return 0;
    }
    if (bytes > size - off) {
        bytes = size - off;
    }
    memset(&ext, 0, sizeof(ext));
    r = vd_block_status(node, off, bytes, &ext, err);
    if (r < 0) {
        return r;
    }
    if (ext.length == 0 || ext.length > bytes) {
        return vd_error_set(err, -EIO, "block status out of range at "
                            "offset %" PRIu64, off);
    }
    v->length = ext.length;
    v->zero = ext.flags & VD_BLOCK_ZERO;
    if ((ext.flags & VD_BLOCK_DATA) && (ext.flags & VD_BLOCK_OFFSET_VALID) &&
        ext.file) {
        v->mapped = true;
        v->file = vd_node_filename(ext.file);
        v->offset = ext.offset;
    }
    return 0;
}

bool diff_view_same(const diff_view_ext *a, const diff_view_ext *b)
{
    if (a->zero && b->zero) {
        return true;
    }
    return a->mapped && b->mapped && a->file && b->file &&
           strcmp(a->file, b->file) == 0 && a->offset == b->offset;
}

bool diff_view_has_snapshot(vd_node *node, const char *name)
{
    vd_snapshot_info *list = NULL;
    size_t count = 0;
    bool found = false;

    if (vd_snapshot_list(node, &list, &count, NULL) < 0) {
        return false;
    }
    for (size_t i = 0; i < count && !found; i++) {
        found = (list[i].id && strcmp(list[i].id, name) == 0) ||
                (list[i].name && strcmp(list[i].name, name) == 0);
    }
    vd_snapshot_list_free(&list, count);
    return found;
}

