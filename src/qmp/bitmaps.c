/*
 * QMP's dirty bitmap commands, as qemu-storage-daemon 7.2 answers them
 * (../shared/specs/block-core.json: block-dirty-bitmap-add, -remove,
 * -clear, -enable, -disable, -merge, x-debug-block-dirty-bitmap-sha256,
 * and BlockDirtyInfo in query-named-block-nodes), on the library's
 * bitmaps (include/vdisk/bitmap.h, docs/bitmaps.md). The library words
 * the bitmap errors as QEMU does; this file adds QEMU's node lookups
 * ("Cannot find device=... nor node-name=..." for add, "Node 'X' not
 * found" for the rest) and the argument checks QAPI makes (a uint32
 * granularity, the str-or-object elements of a merge). The transaction
 * actions call these same handlers (transaction.c).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vdisk/bitmap.h"
#include "qmp-int.h"

static const char *bitmap_arg(json_object *args, const char *key)
{
    json_object *v;
    return json_object_object_get_ex(args, key, &v) &&
           json_object_is_type(v, json_type_string)
           ? json_object_get_string(v) : NULL;
}

static json_object *bitmap_fail(qmp_error *e, const vd_error *err)
{
    return qmp_fail(e, NULL, "%s", err->message[0] ? err->message
                                                   : "Operation failed");
}

vd_node *qmp_bitmap_node(json_object *args, const char *key, qmp_error *e)
{
    const char *name = bitmap_arg(args, key);
    vd_node *node = name ? vd_find_node(name) : NULL;
    if (!node)
        qmp_fail(e, NULL, "Node '%s' not found", name ? name : "");
    return node;
}

QMP_HANDLER(qmp_cmd_block_dirty_bitmap_add)
{
    json_object *g;
    uint64_t gran = 0;
    (void)d;
    /* QAPI's uint32 check comes before the command runs. */
    if (json_object_object_get_ex(args, "granularity", &g)) {
        /* json-c gives INT64_MAX for anything larger: out of range. */
        int64_t v = json_object_get_int64(g);
        if (v < 0 || v > UINT32_MAX)
            return qmp_fail(e, NULL, "Parameter 'granularity' expects "
                            "uint32_t");
        /* 0 asks for the default in the library: QEMU refuses it. */
        if (v == 0)
            return qmp_fail(e, NULL, "Granularity must be power of 2 and "
                            "at least 512");
        gran = (uint64_t)v;
    }
    const char *name = bitmap_arg(args, "name");
    if (!name || !*name)
        return qmp_fail(e, NULL, "Bitmap name cannot be empty");
    const char *nn = bitmap_arg(args, "node");
    vd_node *node = nn ? vd_find_node(nn) : NULL;
    if (!node)
        return qmp_fail(e, NULL, "Cannot find device='%s' nor "
                        "node-name='%s'", nn ? nn : "", nn ? nn : "");
    json_object *v;
    unsigned flags = 0;
    if (json_object_object_get_ex(args, "persistent", &v) &&
        json_object_get_boolean(v))
        flags |= VD_BITMAP_PERSISTENT;
    if (json_object_object_get_ex(args, "disabled", &v) &&
        json_object_get_boolean(v))
        flags |= VD_BITMAP_DISABLED;
    vd_error err = VD_ERROR_INIT;
    if (vd_bitmap_add(node, name, gran, flags, &err) < 0) {
        /* The library's message has a bounded length; QEMU's repeats
         * the whole name. */
        if (strncmp(err.message, "Bitmap name too long: ", 22) == 0)
            return qmp_fail(e, NULL, "Bitmap name too long: %s", name);
        return bitmap_fail(e, &err);
    }
    return json_object_new_object();
}

/* The commands on one bitmap {node, name}. */
static json_object *on_bitmap(json_object *args, qmp_error *e,
                              int (*fn)(vd_node *, const char *, vd_error *))
{
    vd_node *node = qmp_bitmap_node(args, "node", e);
    if (!node)
        return NULL;
    vd_error err = VD_ERROR_INIT;
    if (fn(node, bitmap_arg(args, "name"), &err) < 0)
        return bitmap_fail(e, &err);
    return json_object_new_object();
}

QMP_HANDLER(qmp_cmd_block_dirty_bitmap_remove)
{
    (void)d;
    return on_bitmap(args, e, vd_bitmap_remove);
}

QMP_HANDLER(qmp_cmd_block_dirty_bitmap_clear)
{
    (void)d;
    return on_bitmap(args, e, vd_bitmap_clear);
}

QMP_HANDLER(qmp_cmd_block_dirty_bitmap_enable)
{
    (void)d;
    return on_bitmap(args, e, vd_bitmap_enable);
}

QMP_HANDLER(qmp_cmd_block_dirty_bitmap_disable)
{
    (void)d;
    return on_bitmap(args, e, vd_bitmap_disable);
}

bool qmp_bitmap_list_check(json_object *list, const char *key,
                           qmp_error *e)
{
    size_t n = json_object_array_length(list);

    for (size_t i = 0; i < n; i++) {
        json_object *it = json_object_array_get_idx(list, i), *v;
        if (json_object_is_type(it, json_type_string))
            continue;
        if (!json_object_is_type(it, json_type_object)) {
            qmp_fail(e, NULL, "Invalid parameter type for 'null', "
                     "expected: BlockDirtyBitmapOrStr");
            return false;
        }
        static const char *const keys[] = { "node", "name" };
        for (int k = 0; k < 2; k++) {
            if (!json_object_object_get_ex(it, keys[k], &v)) {
                qmp_fail(e, NULL, "Parameter '%s[%zu].%s' is missing", key,
                         i, keys[k]);
                return false;
            }
            if (!json_object_is_type(v, json_type_string)) {
                qmp_fail(e, NULL, "Invalid parameter type for '%s[%zu].%s', "
                         "expected: string", key, i, keys[k]);
                return false;
            }
        }
    }
    return true;
}

vd_bitmap_ref *qmp_bitmap_list_refs(json_object *list, vd_node *node,
                                    qmp_error *e)
{
    size_t n = json_object_array_length(list);
    vd_bitmap_ref *refs = calloc(n ? n : 1, sizeof(*refs));

    if (!refs) {
        qmp_fail(e, NULL, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        json_object *it = json_object_array_get_idx(list, i);
        if (json_object_is_type(it, json_type_string)) {
            refs[i] = (vd_bitmap_ref){ node, json_object_get_string(it) };
            continue;
        }
        vd_node *src = qmp_bitmap_node(it, "node", e);
        if (!src) {
            free(refs);
            return NULL;
        }
        refs[i] = (vd_bitmap_ref){ src, bitmap_arg(it, "name") };
    }
    return refs;
}

QMP_HANDLER(qmp_cmd_block_dirty_bitmap_merge)
{
    (void)d;
    vd_node *node = qmp_bitmap_node(args, "node", e);
    if (!node)
        return NULL;
    json_object *list = NULL;
    json_object_object_get_ex(args, "bitmaps", &list);
    size_t n = json_object_array_length(list);
    /* QEMU checks the elements' types while it parses the arguments,
     * and looks up the target before the sources. */
    if (!qmp_bitmap_list_check(list, "bitmaps", e))
        return NULL;
    vd_error err = VD_ERROR_INIT;
    vd_bitmap_info info;
    if (vd_bitmap_get_info(node, bitmap_arg(args, "target"), &info, &err) < 0)
        return bitmap_fail(e, &err);
    free(info.name);
    vd_bitmap_ref *refs = qmp_bitmap_list_refs(list, node, e);
    if (!refs)
        return NULL;
    int r = vd_bitmap_merge(node, bitmap_arg(args, "target"), refs, n, &err);
    free(refs);
    if (r < 0)
        return bitmap_fail(e, &err);
    return json_object_new_object();
}

QMP_HANDLER(qmp_cmd_x_debug_block_dirty_bitmap_sha256)
{
    (void)d;
    vd_node *node = qmp_bitmap_node(args, "node", e);
    if (!node)
        return NULL;
    char hex[65];
    vd_error err = VD_ERROR_INIT;
    if (vd_bitmap_sha256(node, bitmap_arg(args, "name"), hex, &err) < 0)
        return bitmap_fail(e, &err);
    json_object *r = json_object_new_object();
    json_object_object_add(r, "sha256", json_object_new_string(hex));
    return r;
}

json_object *qmp_dirty_bitmaps_json(vd_node *node)
{
    vd_bitmap_info *list = NULL;
    size_t n = 0;
    if (vd_bitmap_list(node, &list, &n, NULL) < 0 || n == 0)
        return NULL;
    json_object *a = json_object_new_array();
    for (size_t i = 0; i < n; i++) {
        json_object *o = json_object_new_object();
        json_object_object_add(o, "name", json_object_new_string(
                                   list[i].name));
        json_object_object_add(o, "count", json_object_new_int64(
                                   (int64_t)list[i].count));
        json_object_object_add(o, "granularity", json_object_new_int64(
                                   (int64_t)list[i].granularity));
        json_object_object_add(o, "recording", json_object_new_boolean(
                                   list[i].recording));
        json_object_object_add(o, "busy", json_object_new_boolean(
                                   list[i].busy));
        json_object_object_add(o, "persistent", json_object_new_boolean(
                                   list[i].persistent));
        if (list[i].inconsistent)
            json_object_object_add(o, "inconsistent",
                                   json_object_new_boolean(true));
        json_object_array_add(a, o);
    }
    vd_bitmap_list_free(list, n);
    return a;
}
