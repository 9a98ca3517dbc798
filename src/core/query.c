/*
 * Read-only questions about a node, for code outside the core: its
 * children with their roles, how many parents it has, its cache,
 * detect-zeroes and discard modes, and the backing file its header
 * records. They are what QMP's query-named-block-nodes and an embedder
 * walking the graph need, answered without exposing struct vd_node
 * (vdisk.h, "The node graph", says what may change under them).
 */
#include "core/block_int.h"

VD_API vd_node *vd_node_nth_child(const vd_node *node, size_t i,
                                  const char **name, unsigned *role)
{
    const vd_child *c = node->children;

    while (c && i > 0) {
        c = c->next;
        i--;
    }
    if (!c)
        return NULL;
    if (name)
        *name = c->name;
    if (role)
        *role = c->role;
    return c->node;
}

VD_API int vd_node_parent_count(const vd_node *node)
{
    return node->n_parents;
}

VD_API bool vd_node_is_root(const vd_node *node)
{
    if (node->n_parents > 0)
        return false;
    for (const vd_child *c = node->parents; c; c = c->next_parent)
        if (c->job_edge)
            return false;
    return true;
}

VD_API unsigned vd_node_cache_flags(const vd_node *node)
{
    unsigned f = 0;

    if (!node->writethrough)
        f |= VD_CACHE_WRITEBACK;
    if (node->flags & VD_NODE_NOCACHE)
        f |= VD_CACHE_DIRECT;
    if (node->flags & VD_NODE_NO_FLUSH)
        f |= VD_CACHE_NO_FLUSH;
    return f;
}

VD_API vd_detect_zeroes vd_node_detect_zeroes(const vd_node *node)
{
    switch (node->detect_zeroes) {
    case 1:
        return VD_DETECT_ZEROES_ON;
    case 2:
        return VD_DETECT_ZEROES_UNMAP;
    default:
        return VD_DETECT_ZEROES_OFF;
    }
}

VD_API bool vd_node_discard_unmap(const vd_node *node)
{
    return node->discard_unmap;
}

VD_API const char *vd_node_backing_file(const vd_node *node)
{
    return node->backing_file;
}

VD_API const char *vd_node_backing_format(const vd_node *node)
{
    return node->backing_format;
}
