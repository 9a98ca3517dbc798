/*
 * The debugging interface of the block layer, QEMU's bdrv_debug_*():
 * events that format drivers and the request path raise at the points
 * where QEMU raises them (BLKDBG_EVENT), the names of those events
 * (QEMU's BlkdebugEvent enum), and the public breakpoint functions that
 * qemu-io's break, remove_break, resume and wait_break need. The events
 * only matter to the blkdebug filter (src/drivers/blkdebug.c), which
 * injects errors, changes its state or suspends the request when one it
 * has a rule for is raised; every other driver has no debug callbacks
 * and an event on its node costs one pointer test.
 *
 * The breakpoint functions look for the node that has them the way
 * QEMU does: from the node given down its primary ("file") children,
 * so `break l2_update A` on a qcow2 node reaches the blkdebug node
 * under it.
 */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "core/block_int.h"

/* QEMU's BlkdebugEvent values, in the enum's order. */
static const char *const event_names[VD_BLKDBG__MAX] = {
    [VD_BLKDBG_L1_UPDATE] = "l1_update",
    [VD_BLKDBG_L1_GROW_ALLOC_TABLE] = "l1_grow_alloc_table",
    [VD_BLKDBG_L1_GROW_WRITE_TABLE] = "l1_grow_write_table",
    [VD_BLKDBG_L1_GROW_ACTIVATE_TABLE] = "l1_grow_activate_table",
    [VD_BLKDBG_L2_LOAD] = "l2_load",
    [VD_BLKDBG_L2_UPDATE] = "l2_update",
    [VD_BLKDBG_L2_UPDATE_COMPRESSED] = "l2_update_compressed",
    [VD_BLKDBG_L2_ALLOC_COW_READ] = "l2_alloc_cow_read",
    [VD_BLKDBG_L2_ALLOC_WRITE] = "l2_alloc_write",
    [VD_BLKDBG_READ_AIO] = "read_aio",
    [VD_BLKDBG_READ_BACKING_AIO] = "read_backing_aio",
    [VD_BLKDBG_READ_COMPRESSED] = "read_compressed",
    [VD_BLKDBG_WRITE_AIO] = "write_aio",
    [VD_BLKDBG_WRITE_COMPRESSED] = "write_compressed",
    [VD_BLKDBG_VMSTATE_LOAD] = "vmstate_load",
    [VD_BLKDBG_VMSTATE_SAVE] = "vmstate_save",
    [VD_BLKDBG_COW_READ] = "cow_read",
    [VD_BLKDBG_COW_WRITE] = "cow_write",
    [VD_BLKDBG_REFTABLE_LOAD] = "reftable_load",
    [VD_BLKDBG_REFTABLE_GROW] = "reftable_grow",
    [VD_BLKDBG_REFTABLE_UPDATE] = "reftable_update",
    [VD_BLKDBG_REFBLOCK_LOAD] = "refblock_load",
    [VD_BLKDBG_REFBLOCK_UPDATE] = "refblock_update",
    [VD_BLKDBG_REFBLOCK_UPDATE_PART] = "refblock_update_part",
    [VD_BLKDBG_REFBLOCK_ALLOC] = "refblock_alloc",
    [VD_BLKDBG_REFBLOCK_ALLOC_HOOKUP] = "refblock_alloc_hookup",
    [VD_BLKDBG_REFBLOCK_ALLOC_WRITE] = "refblock_alloc_write",
    [VD_BLKDBG_REFBLOCK_ALLOC_WRITE_BLOCKS] = "refblock_alloc_write_blocks",
    [VD_BLKDBG_REFBLOCK_ALLOC_WRITE_TABLE] = "refblock_alloc_write_table",
    [VD_BLKDBG_REFBLOCK_ALLOC_SWITCH_TABLE] = "refblock_alloc_switch_table",
    [VD_BLKDBG_CLUSTER_ALLOC] = "cluster_alloc",
    [VD_BLKDBG_CLUSTER_ALLOC_BYTES] = "cluster_alloc_bytes",
    [VD_BLKDBG_CLUSTER_FREE] = "cluster_free",
    [VD_BLKDBG_FLUSH_TO_OS] = "flush_to_os",
    [VD_BLKDBG_FLUSH_TO_DISK] = "flush_to_disk",
    [VD_BLKDBG_PWRITEV_RMW_HEAD] = "pwritev_rmw_head",
    [VD_BLKDBG_PWRITEV_RMW_AFTER_HEAD] = "pwritev_rmw_after_head",
    [VD_BLKDBG_PWRITEV_RMW_TAIL] = "pwritev_rmw_tail",
    [VD_BLKDBG_PWRITEV_RMW_AFTER_TAIL] = "pwritev_rmw_after_tail",
    [VD_BLKDBG_PWRITEV] = "pwritev",
    [VD_BLKDBG_PWRITEV_ZERO] = "pwritev_zero",
    [VD_BLKDBG_PWRITEV_DONE] = "pwritev_done",
    [VD_BLKDBG_EMPTY_IMAGE_PREPARE] = "empty_image_prepare",
    [VD_BLKDBG_L1_SHRINK_WRITE_TABLE] = "l1_shrink_write_table",
    [VD_BLKDBG_L1_SHRINK_FREE_L2_CLUSTERS] = "l1_shrink_free_l2_clusters",
    [VD_BLKDBG_COR_WRITE] = "cor_write",
    [VD_BLKDBG_CLUSTER_ALLOC_SPACE] = "cluster_alloc_space",
    [VD_BLKDBG_NONE] = "none",
};

const char *vd_blkdebug_event_name(int event)
{
    return event >= 0 && event < VD_BLKDBG__MAX ? event_names[event] : NULL;
}

int vd_blkdebug_event_by_name(const char *name)
{
    for (int i = 0; name && i < VD_BLKDBG__MAX; i++) {
        if (strcmp(event_names[i], name) == 0) {
            return i;
        }
    }
    return -1;
}

void vd_node_debug_event_here(vd_node *node, int event)
{
    if (node && node->drv->debug_event) {
        node->drv->debug_event(node, event);
    }
}

void vd_node_debug_event(vd_node *node, int event)
{
    while (node && !node->drv->debug_event && node->drv->is_filter &&
           node->file) {
        node = node->file->node;
    }
    vd_node_debug_event_here(node, event);
}

/* ---- breakpoints (public) ---- */

/* The node whose driver has the breakpoint callback @off (a member
 * offset in vd_driver), from @node down its primary children, as
 * QEMU's bdrv_debug_breakpoint() and friends look for it. */
static vd_node *debug_node(vd_node *node, size_t off)
{
    while (node) {
        const void *fn = *(const void *const *)((const char *)node->drv + off);
        if (fn) {
            return node;
        }
        node = node->file ? node->file->node : NULL;
    }
    return NULL;
}

#define DEBUG_NODE(node, member) \
    debug_node((node), offsetof(vd_driver, member))

VD_API int vd_debug_breakpoint(vd_node *node, const char *event,
                               const char *tag)
{
    vd_node *n = DEBUG_NODE(node, debug_breakpoint);

    return n ? n->drv->debug_breakpoint(n, event, tag) : -ENOTSUP;
}

VD_API int vd_debug_remove_breakpoint(vd_node *node, const char *tag)
{
    vd_node *n = DEBUG_NODE(node, debug_remove_breakpoint);

    return n ? n->drv->debug_remove_breakpoint(n, tag) : -ENOTSUP;
}

VD_API int vd_debug_resume(vd_node *node, const char *tag)
{
    vd_node *n = DEBUG_NODE(node, debug_resume);

    return n ? n->drv->debug_resume(n, tag) : -ENOTSUP;
}

VD_API bool vd_debug_is_suspended(vd_node *node, const char *tag)
{
    vd_node *n = DEBUG_NODE(node, debug_is_suspended);

    return n ? n->drv->debug_is_suspended(n, tag) : false;
}

/* ---- the messages of suspended requests ---- */

static void (*notify_fn)(const char *msg, void *opaque);
static void *notify_opaque;

VD_API void vd_debug_set_handler(void (*fn)(const char *msg, void *opaque),
                                 void *opaque)
{
    notify_opaque = opaque;
    __atomic_store_n(&notify_fn, fn, __ATOMIC_RELEASE);
}

void vd_debug_notify(const char *tag, bool resuming)
{
    void (*fn)(const char *, void *) =
        __atomic_load_n(&notify_fn, __ATOMIC_ACQUIRE);
    char msg[512];

    if (!fn) {
        return;
    }
    snprintf(msg, sizeof(msg), "blkdebug: %s request '%s'",
             resuming ? "Resuming" : "Suspended", tag);
    fn(msg, notify_opaque);
}
