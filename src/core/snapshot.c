/*
 * The generic internal-snapshot layer, with QEMU's block/snapshot
 * semantics, for every driver.
 *
 * Single-node operations call the driver's snapshot callback; a node whose
 * driver has none falls back to its primary child, but only when that is
 * safe: the primary child must be its only child holding data, metadata
 * or filtered data (a separate data file would otherwise be left behind).
 * Group operations (vd_snapshot_all_*) apply one operation to several
 * nodes: an explicit list of node names, or every root node of the graph
 * that is writable and has a medium.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/block_int.h"

/* ---- helpers ---- */

static const char *node_label(const vd_node *n)
{
    return n->node_name ? n->node_name : "";
}

/* The child a snapshot operation may fall back to, or NULL. */
static vd_child *snapshot_fallback(vd_node *n)
{
    vd_child *primary = NULL;
    for (vd_child *c = n->children; c; c = c->next)
        if (c->role & VD_ROLE_PRIMARY)
            primary = c;
    if (!primary)
        return NULL;
    for (vd_child *c = n->children; c; c = c->next) {
        if (c != primary &&
            (c->role & (VD_ROLE_DATA | VD_ROLE_METADATA | VD_ROLE_FILTERED)))
            return NULL;
    }
    return primary;
}

VD_API void vd_snapshot_info_clear(vd_snapshot_info *sn)
{
    if (!sn)
        return;
    free(sn->id);
    free(sn->name);
    memset(sn, 0, sizeof(*sn));
}

VD_API void vd_snapshot_list_free(vd_snapshot_info **list, size_t count)
{
    if (!list || !*list)
        return;
    for (size_t i = 0; i < count; i++)
        vd_snapshot_info_clear(&(*list)[i]);
    free(*list);
    *list = NULL;
}

static int copy_info(vd_snapshot_info *dst, const vd_snapshot_info *src)
{
    *dst = *src;
    dst->id = src->id ? strdup(src->id) : NULL;
    dst->name = src->name ? strdup(src->name) : NULL;
    if ((src->id && !dst->id) || (src->name && !dst->name)) {
        vd_snapshot_info_clear(dst);
        return -ENOMEM;
    }
    return 0;
}

/* ---- single node ---- */

VD_API int vd_snapshot_list(vd_node *node, vd_snapshot_info **list,
                            size_t *count, vd_error *err)
{
    *list = NULL;
    *count = 0;
    if (node->drv->snapshot_list)
        return node->drv->snapshot_list(node, list, count, err);
    vd_child *fb = snapshot_fallback(node);
    if (fb)
        return vd_snapshot_list(fb->node, list, count, err);
    return vd_error_set(err, -ENOTSUP, "Block format '%s' used by device "
                        "'%s' does not support internal snapshots",
                        node->drv->name, node_label(node));
}

VD_API int vd_snapshot_find(vd_node *node, const char *id, const char *name,
                            vd_snapshot_info *out, vd_error *err)
{
    if (!id && !name)
        return vd_error_set(err, -EINVAL, "snapshot_id and name are both "
                            "NULL");
    vd_snapshot_info *list;
    size_t n;
    int r = vd_snapshot_list(node, &list, &n, err);
    if (r < 0)
        return r;
    int found = 0;
    for (size_t i = 0; i < n && !found; i++) {
        bool id_ok = !id || (list[i].id && strcmp(list[i].id, id) == 0);
        bool name_ok = !name ||
                       (list[i].name && strcmp(list[i].name, name) == 0);
        if (id_ok && name_ok) {
            found = 1;
            if (out && copy_info(out, &list[i]) < 0)
                found = vd_error_set(err, -ENOMEM, "Out of memory");
        }
    }
    vd_snapshot_list_free(&list, n);
    return found;
}

VD_API bool vd_snapshot_can(vd_node *node)
{
    if (!node || node->read_only)
        return false;
    if (node->drv->snapshot_create)
        return true;
    vd_child *fb = snapshot_fallback(node);
    return fb ? vd_snapshot_can(fb->node) : false;
}

static int snapshot_create_node(vd_node *node, const vd_snapshot_info *sn,
                                vd_error *err)
{
    if (node->drv->snapshot_create)
        return node->drv->snapshot_create(node, sn, err);
    vd_child *fb = snapshot_fallback(node);
    if (fb)
        return snapshot_create_node(fb->node, sn, err);
    return vd_error_set(err, -ENOTSUP, "Block format '%s' used by device "
                        "'%s' does not support internal snapshots",
                        node->drv->name, node_label(node));
}

VD_API int vd_snapshot_create(vd_node *node, const vd_snapshot_info *sn,
                              vd_error *err)
{
    if (!node)
        return vd_error_set(err, -ENOMEDIUM, "No medium");
    if (node->read_only)
        return vd_error_set(err, -EROFS, "Device '%s' is read-only",
                            node_label(node));
    if (!sn->name)
        return vd_error_set(err, -EINVAL, "A snapshot needs a name");
    if (vd_op_is_blocked(node, VD_OP_INTERNAL_SNAPSHOT, err))
        return -EBUSY;
    vd_node_drain_begin(node);
    int r = snapshot_create_node(node, sn, err);
    vd_node_drain_end(node);
    return r;
}

static void fill_now(vd_snapshot_info *sn)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    sn->date_sec = (uint32_t)ts.tv_sec;
    sn->date_nsec = (uint32_t)ts.tv_nsec;
}

VD_API int vd_snapshot_create_simple(vd_node *node, const char *name,
                                     vd_error *err)
{
    vd_snapshot_info sn = { 0 };
    sn.name = (char *)name;
    fill_now(&sn);
    return vd_snapshot_create(node, &sn, err);
}

static int snapshot_goto_node(vd_node *node, const char *id, vd_error *err)
{
    if (atomic_load(&node->dirty_bitmaps) > 0)
        return vd_error_set(err, -EBUSY, "Device has active dirty bitmaps");
    if (node->drv->snapshot_goto) {
        vd_error lerr = VD_ERROR_INIT;
        int r = node->drv->snapshot_goto(node, id, &lerr);
        if (r < 0) {
            if (lerr.code)
                vd_error_set(err, r, "Failed to load snapshot: %s",
                             lerr.message);
            else
                vd_error_set_errno(err, r, "Failed to load snapshot");
        }
        return r;
    }
    vd_child *fb = snapshot_fallback(node);
    if (!fb)
        return vd_error_set(err, -ENOTSUP, "Block driver does not support "
                            "snapshots");
    /* The parent may cache what it read from the child (headers,
     * tables): close it, revert the child, and open it again so that it
     * sees the reverted child. The child is kept alive by its edge. */
    vd_node *child = fb->node;
    vd_node_ref(child);
    vd_node_close_driver(node);
    int r = snapshot_goto_node(child, id, err);
    vd_error lerr = VD_ERROR_INIT;
    int open_r = vd_node_open_driver(node, node->flags, &lerr);
    vd_node_unref(child);
    if (open_r < 0) {
        /* The node is marked broken: later requests fail cleanly. */
        vd_error_set(err, open_r, "Could not reopen '%s' after reverting "
                     "its child: %s", node_label(node), lerr.message);
        return open_r;
    }
    return r;
}

VD_API int vd_snapshot_goto(vd_node *node, const char *id_or_name,
                            vd_error *err)
{
    if (!node)
        return vd_error_set(err, -ENOMEDIUM, "Block driver is closed");
    if (node->read_only)
        return vd_error_set(err, -EROFS, "Device '%s' is read-only",
                            node_label(node));
    if (vd_op_is_blocked(node, VD_OP_SNAPSHOT_GOTO, err))
        return -EBUSY;
    vd_node_drain_begin(node);
    int r = snapshot_goto_node(node, id_or_name, err);
    vd_node_drain_end(node);
    if (r == 0)
        vd_node_refresh_length(node);
    return r;
}

static int snapshot_delete_node(vd_node *node, const char *id,
                                const char *name, vd_error *err)
{
    if (node->drv->snapshot_delete)
        return node->drv->snapshot_delete(node, id, name, err);
    vd_child *fb = snapshot_fallback(node);
    if (fb)
        return snapshot_delete_node(fb->node, id, name, err);
    return vd_error_set(err, -ENOTSUP, "Block format '%s' used by device "
                        "'%s' does not support internal snapshot deletion",
                        node->drv->name, node_label(node));
}

VD_API int vd_snapshot_delete(vd_node *node, const char *id,
                              const char *name, vd_error *err)
{
    if (!node)
        return vd_error_set(err, -ENOMEDIUM, "Device has no medium");
    if (!id && !name)
        return vd_error_set(err, -EINVAL, "snapshot_id and name are both "
                            "NULL");
    if (vd_op_is_blocked(node, VD_OP_INTERNAL_SNAPSHOT_DELETE, err))
        return -EBUSY;
    vd_node_drain_begin(node);
    int r = snapshot_delete_node(node, id, name, err);
    vd_node_drain_end(node);
    return r;
}

/* The node whose driver plans snapshot operations for @node (falling
 * back to the primary child as the real operations do), or NULL. */
static vd_node *snapshot_plan_node(vd_node *node, bool apply)
{
    while (node && !(apply ? node->drv->snapshot_goto != NULL
                           : node->drv->snapshot_delete != NULL)) {
        vd_child *fb = snapshot_fallback(node);
        node = fb ? fb->node : NULL;
    }
    return node;
}

static int snapshot_plan(vd_node *node, const char *id, const char *name,
                         bool apply, vd_snapshot_plan *out, vd_error *err)
{
    memset(out, 0, sizeof(*out));
    if (!node)
        return vd_error_set(err, -ENOMEDIUM, "Device has no medium");
    if (!apply && !id && !name)
        return vd_error_set(err, -EINVAL, "snapshot_id and name are both "
                            "NULL");
    vd_node *n = snapshot_plan_node(node, apply);
    if (!n)
        return vd_error_set(err, -ENOTSUP, "Block format '%s' used by "
                            "device '%s' does not support internal snapshots",
                            node->drv->name, node_label(node));
    if (!n->drv->snapshot_plan)
        return vd_error_set(err, -ENOTSUP, "Block format '%s' cannot tell "
                            "what the snapshot operation would change",
                            n->drv->name);
    vd_node_drain_begin(node);
    vd_error lerr = VD_ERROR_INIT;
    int r = n->drv->snapshot_plan(n, id, name, apply, out, &lerr);
    vd_node_drain_end(node);
    /* Worded as snapshot_goto_node() and the drivers' delete word it. */
    if (r < 0 && apply && lerr.code)
        vd_error_set(err, r, "Failed to load snapshot: %s", lerr.message);
    else if (r < 0 && apply)
        vd_error_set_errno(err, r, "Failed to load snapshot");
    else if (r < 0)
        vd_error_set(err, r, "%s", lerr.message);
    return r;
}

VD_API int vd_snapshot_delete_plan(vd_node *node, const char *id,
                                   const char *name, vd_snapshot_plan *out,
                                   vd_error *err)
{
    return snapshot_plan(node, id, name, false, out, err);
}

VD_API int vd_snapshot_goto_plan(vd_node *node, const char *id_or_name,
                                 vd_snapshot_plan *out, vd_error *err)
{
    if (node && atomic_load(&node->dirty_bitmaps) > 0)
        return vd_error_set(err, -EBUSY, "Device has active dirty bitmaps");
    return snapshot_plan(node, id_or_name, NULL, true, out, err);
}

VD_API int vd_snapshot_load_tmp(vd_node *node, const char *id,
                                const char *name, vd_error *err)
{
    if (!node)
        return vd_error_set(err, -ENOMEDIUM, "Device has no medium");
    if (!id && !name)
        return vd_error_set(err, -EINVAL, "snapshot_id and name are both "
                            "NULL");
    if (!node->read_only)
        return vd_error_set(err, -EINVAL, "Device is not readonly");
    if (vd_op_is_blocked(node, VD_OP_SNAPSHOT_GOTO, err))
        return -EBUSY;
    if (node->drv->snapshot_load_tmp) {
        vd_node_drain_begin(node);
        int r = node->drv->snapshot_load_tmp(node, id, name, err);
        vd_node_drain_end(node);
        if (r == 0)
            vd_node_refresh_length(node);
        return r;
    }
    /* Unlike the other snapshot operations, QEMU 7.2's
     * bdrv_snapshot_load_tmp() has no fallback to a child: a raw node
     * (with or without an offset, qemu-nbd -o) refuses in its own name
     * rather than loading the snapshot of the image below it. The
     * device name QEMU prints is its block backend's, which the tools
     * that load snapshots (qemu-img convert -l, qemu-io -l, qemu-nbd -l)
     * never name: ''. */
    return vd_error_set(err, -ENOTSUP, "Block format '%s' used by device "
                        "'' does not support temporarily loading internal "
                        "snapshots", node->drv->name);
}

VD_API int vd_snapshot_load_tmp_by_id_or_name(vd_node *node,
                                              const char *id_or_name,
                                              vd_error *err)
{
    vd_error lerr = VD_ERROR_INIT;
    int r = vd_snapshot_load_tmp(node, id_or_name, NULL, &lerr);
    if (r == -ENOENT || r == -EINVAL) {
        vd_error_clear(&lerr);
        r = vd_snapshot_load_tmp(node, NULL, id_or_name, &lerr);
    }
    if (r < 0)
        vd_error_set(err, r, "%s", lerr.message);
    return r;
}

VD_API int vd_save_vmstate(vd_node *node, const void *buf, uint64_t len,
                           uint64_t pos, vd_error *err)
{
    for (vd_node *n = node; n;) {
        if (n->drv->save_vmstate) {
            vd_iov v;
            vd_iov_init_buf(&v, (void *)buf, len);
            return n->drv->save_vmstate(n, &v, pos, err);
        }
        vd_child *fb = snapshot_fallback(n);
        n = fb ? fb->node : NULL;
    }
    return vd_error_set(err, -ENOTSUP, "Block format '%s' has no VM state "
                        "area", node->drv->name);
}

VD_API int vd_load_vmstate(vd_node *node, void *buf, uint64_t len,
                           uint64_t pos, vd_error *err)
{
    for (vd_node *n = node; n;) {
        if (n->drv->load_vmstate) {
            vd_iov v;
            vd_iov_init_buf(&v, buf, len);
            return n->drv->load_vmstate(n, &v, pos, err);
        }
        vd_child *fb = snapshot_fallback(n);
        n = fb ? fb->node : NULL;
    }
    return vd_error_set(err, -ENOTSUP, "Block format '%s' has no VM state "
                        "area", node->drv->name);
}

/* ---- groups ---- */

typedef struct node_list {
    vd_node **v;
    size_t n, cap;
    bool explicit_list;
} node_list;

static void collect_root(vd_node *n, void *opaque)
{
    node_list *l = opaque;
    if (n->n_parents != 0)
        return;
    if (l->n == l->cap) {
        size_t ncap = l->cap ? l->cap * 2 : 8;
        vd_node **nv = realloc(l->v, ncap * sizeof(*nv));
        if (!nv)
            return;
        l->v = nv;
        l->cap = ncap;
    }
    l->v[l->n++] = n;
}

/* The nodes a group operation works on. With an explicit list every
 * named node must exist; otherwise the roots of the graph. */
static int group_nodes(const char *const *devices, node_list *l,
                       vd_error *err)
{
    memset(l, 0, sizeof(*l));
    if (!devices) {
        vd_foreach_node(collect_root, l);
        return 0;
    }
    l->explicit_list = true;
    if (!devices[0])
        return vd_error_set(err, -EINVAL, "At least one device is required "
                            "for snapshot");
    size_t count = 0;
    while (devices[count])
        count++;
    l->v = calloc(count, sizeof(*l->v));
    if (!l->v)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    for (size_t i = 0; i < count; i++) {
        vd_node *n = vd_find_node(devices[i]);
        if (!n) {
            free(l->v);
            l->v = NULL;
            return vd_error_set(err, -ENOENT, "No block device node '%s'",
                                devices[i]);
        }
        l->v[l->n++] = n;
    }
    return 0;
}

/* Whether an implicitly selected node takes part: writable and with a
 * medium (a node with a driver). Explicitly named nodes always do. */
static bool group_includes(const node_list *l, vd_node *n)
{
    if (l->explicit_list)
        return true;
    return n->drv && !n->read_only;
}

VD_API int vd_snapshot_all_can(const char *const *devices, vd_error *err)
{
    node_list l;
    int r = group_nodes(devices, &l, err);
    for (size_t i = 0; r == 0 && i < l.n; i++) {
        if (group_includes(&l, l.v[i]) && !vd_snapshot_can(l.v[i]))
            r = vd_error_set(err, -ENOTSUP, "Device '%s' is writable but "
                             "does not support snapshots",
                             node_label(l.v[i]));
    }
    free(l.v);
    return r;
}

VD_API int vd_snapshot_all_create(const char *const *devices,
                                  const vd_snapshot_info *sn,
                                  vd_node *vmstate_node,
                                  uint64_t vm_state_size, vd_error *err)
{
    node_list l;
    int r = group_nodes(devices, &l, err);
    for (size_t i = 0; r == 0 && i < l.n; i++) {
        vd_node *n = l.v[i];
        if (n != vmstate_node && !group_includes(&l, n))
            continue;
        vd_snapshot_info one = *sn;
        one.vm_state_size = n == vmstate_node ? vm_state_size : 0;
        vd_error lerr = VD_ERROR_INIT;
        r = vd_snapshot_create(n, &one, &lerr);
        if (r < 0)
            vd_error_set(err, r, "Could not create snapshot '%s' on '%s': "
                         "%s", sn->name, node_label(n), lerr.message);
    }
    free(l.v);
    return r;
}

VD_API int vd_snapshot_all_goto(const char *const *devices, const char *name,
                                vd_error *err)
{
    node_list l;
    int r = group_nodes(devices, &l, err);
    for (size_t i = 0; r == 0 && i < l.n; i++) {
        vd_node *n = l.v[i];
        if (!group_includes(&l, n))
            continue;
        vd_error lerr = VD_ERROR_INIT;
        r = vd_snapshot_goto(n, name, &lerr);
        if (r < 0)
            vd_error_set(err, r, "Could not load snapshot '%s' on '%s': %s",
                         name, node_label(n), lerr.message);
    }
    free(l.v);
    return r;
}

VD_API int vd_snapshot_all_delete(const char *const *devices,
                                  const char *name, vd_error *err)
{
    node_list l;
    int r = group_nodes(devices, &l, err);
    for (size_t i = 0; r == 0 && i < l.n; i++) {
        vd_node *n = l.v[i];
        if (!group_includes(&l, n))
            continue;
        vd_error lerr = VD_ERROR_INIT;
        vd_snapshot_info sn = { 0 };
        /* As QEMU: the first snapshot with that name, on each node that
         * has one. */
        int found = vd_snapshot_find(n, NULL, name, &sn, &lerr);
        if (found < 0) {
            r = found;
        } else if (found > 0) {
            r = vd_snapshot_delete(n, sn.id, sn.name, &lerr);
            vd_snapshot_info_clear(&sn);
        }
        if (r < 0)
            vd_error_set(err, r, "Could not delete snapshot '%s' on '%s': "
                         "%s", name, node_label(n), lerr.message);
    }
    free(l.v);
    return r;
}

VD_API int vd_snapshot_all_has(const char *const *devices, const char *name,
                               vd_error *err)
{
    node_list l;
    int r = group_nodes(devices, &l, err);
    if (r < 0)
        return r;
    int result = 1;
    for (size_t i = 0; i < l.n && result == 1; i++) {
        vd_node *n = l.v[i];
        if (!group_includes(&l, n))
            continue;
        vd_error lerr = VD_ERROR_INIT;
        int found = vd_snapshot_find(n, NULL, name, NULL, &lerr);
        if (found < 0) {
            result = vd_error_set(err, found, "Could not check snapshot "
                                  "'%s' on '%s': %s", name, node_label(n),
                                  lerr.message);
        } else if (found == 0) {
            result = 0;
        }
    }
    free(l.v);
    return result;
}

VD_API int vd_snapshot_all_find_vmstate(const char *const *devices,
                                        const char *vmstate_name,
                                        vd_node **out, vd_error *err)
{
    *out = NULL;
    node_list l;
    int r = group_nodes(devices, &l, err);
    if (r < 0)
        return r;
    for (size_t i = 0; i < l.n && !*out; i++) {
        vd_node *n = l.v[i];
        bool found;
        if (vmstate_name)
            found = strcmp(vmstate_name, node_label(n)) == 0;
        else
            found = group_includes(&l, n) && vd_snapshot_can(n);
        if (!found)
            continue;
        if (!vd_snapshot_can(n)) {
            free(l.v);
            return vd_error_set(err, -ENOTSUP, "vmstate block device '%s' "
                                "does not support snapshots",
                                node_label(n));
        }
        *out = n;
    }
    free(l.v);
    if (*out)
        return 0;
    if (vmstate_name)
        return vd_error_set(err, -ENOENT, "No block device node '%s'",
                            vmstate_name);
    return vd_error_set(err, -ENOTSUP, "No block device can accept "
                        "snapshots");
}
