/*
 * qcow2 metadata cache: a fixed number of cluster-sized slots holding L2
 * tables or refcount blocks, as QEMU's qcow2-cache.c.
 *
 * A slot is found by host offset (linear scan: caches are small), pinned
 * by get/put reference counts, evicted least-recently-used among the
 * unpinned ones, and written back when dirty. Write-back honours the
 * ordering rules of the allocation code (see cluster.c): a cache may
 * depend on another cache (that one is flushed first, with a flush of
 * the file) or on a plain file flush. Everything here runs with
 * qcow2_state.lock held.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/qcow2/qcow2.h"

qcow2_cache *qcow2_cache_create(qcow2_state *s, const char *name,
                                int num_tables, size_t table_size)
{
    qcow2_cache *c = calloc(1, sizeof(*c));
    if (!c) {
        return NULL;
    }
    c->name = name;
    c->size = num_tables;
    c->table_size = table_size;
    c->entries = calloc((size_t)num_tables, sizeof(*c->entries));
    c->tables = vd_node_blockalign(s->node, (size_t)num_tables * table_size);
    if (!c->entries || !c->tables) {
        qcow2_cache_destroy(c);
        return NULL;
    }
    return c;
}

void qcow2_cache_destroy(qcow2_cache *c)
{
    if (!c) {
        return;
    }
    free(c->entries);
    free(c->tables);
    free(c);
}

static void *slot_table(qcow2_cache *c, int i)
{
    return c->tables + (size_t)i * c->table_size;
}

static int slot_of_table(qcow2_cache *c, const void *table)
{
    size_t delta = (size_t)((const uint8_t *)table - c->tables);
    return (int)(delta / c->table_size);
}

/* Flushes the cache @c depends on, then forgets the dependency. */
static int flush_dependency(qcow2_state *s, qcow2_cache *c, vd_error *err)
{
    int ret = qcow2_cache_flush(s, c->depends, err);
    if (ret < 0) {
        return ret;
    }
    c->depends = NULL;
    c->depends_on_flush = false;
    return 0;
}

static int write_slot(qcow2_state *s, qcow2_cache *c, int i, vd_error *err)
{
    qcow2_cache_entry *e = &c->entries[i];
    int ret;

    if (!e->dirty || !e->offset) {
        return 0;
    }
    if (c->depends) {
        ret = flush_dependency(s, c, err);
        if (ret < 0) {
            return ret;
        }
    } else if (c->depends_on_flush) {
        ret = vd_node_flush(s->file->node, err);
        if (ret < 0) {
            return ret;
        }
        c->depends_on_flush = false;
    }
    ret = qcow2_pre_write_overlap_check(s, c == s->l2_cache ?
                                        QCOW2_OL_ACTIVE_L2 :
                                        QCOW2_OL_REFCOUNT_BLOCK,
                                        e->offset, c->table_size, false, err);
    if (ret < 0) {
        return ret;
    }
    vd_node_debug_event(s->file->node, c == s->l2_cache
                        ? VD_BLKDBG_L2_UPDATE : VD_BLKDBG_REFBLOCK_UPDATE_PART);
    ret = vd_child_pwrite(s->file, e->offset, slot_table(c, i), c->table_size,
                          0, err);
    if (ret < 0) {
        vd_error_prepend(err, "%s: writing %s table at 0x%llx: ", s->filename,
                         c->name, (unsigned long long)e->offset);
        return ret;
    }
    e->dirty = false;
    return 0;
}

int qcow2_cache_write(qcow2_state *s, qcow2_cache *c, vd_error *err)
{
    int result = 0;
    for (int i = 0; i < c->size; i++) {
        int ret = write_slot(s, c, i, err);
        /* Keep going so that as much as possible reaches the disk. */
        if (ret < 0 && result == 0) {
            result = ret;
        }
    }
    /* New blocks' table entries follow the blocks (see refcount.c). */
    if (result == 0 && c == s->refcount_cache) {
        result = qcow2_reftable_write_pending(s, err);
    }
    return result;
}

int qcow2_cache_flush(qcow2_state *s, qcow2_cache *c, vd_error *err)
{
    int ret = qcow2_cache_write(s, c, err);
    if (ret < 0) {
        return ret;
    }
    return vd_node_flush(s->file->node, err);
}

int qcow2_cache_set_dependency(qcow2_state *s, qcow2_cache *c,
                               qcow2_cache *dep, vd_error *err)
{
    int ret;

    /* A chain (or cycle) of dependencies is cut by flushing now. */
    if (dep->depends) {
        ret = flush_dependency(s, dep, err);
        if (ret < 0) {
            return ret;
        }
    }
    if (c->depends && c->depends != dep) {
        ret = flush_dependency(s, c, err);
        if (ret < 0) {
            return ret;
        }
    }
    c->depends = dep;
    return 0;
}

void qcow2_cache_depends_on_flush(qcow2_cache *c)
{
    c->depends_on_flush = true;
}

static int lookup(qcow2_state *s, qcow2_cache *c, uint64_t offset,
                  void **table, bool read, vd_error *err)
{
    int victim = -1;
    int ret;

    qcow2_cache_clean_maybe(s);
    if (offset == 0 || (offset & (c->table_size - 1))) {
        return qcow2_signal_corruption(s, err,
                                       "%s table offset 0x%llx is not "
                                       "cluster-aligned", c->name,
                                       (unsigned long long)offset);
    }
    for (int i = 0; i < c->size; i++) {
        qcow2_cache_entry *e = &c->entries[i];
        if (e->offset == offset) {
            c->hits++;
            e->ref++;
            e->lru = ++c->lru_counter;
            *table = slot_table(c, i);
            return 0;
        }
        if (e->ref == 0 &&
            (victim < 0 || e->offset == 0 ||
             (c->entries[victim].offset != 0 &&
              e->lru < c->entries[victim].lru))) {
            victim = i;
        }
    }
    if (victim < 0) {
        return vd_error_set(err, -ENOMEM, "%s: %s cache exhausted",
                            s->filename, c->name);
    }
    ret = write_slot(s, c, victim, err);
    if (ret < 0) {
        return ret;
    }
    c->entries[victim].offset = 0;
    if (read) {
        c->misses++;
        if (c == s->l2_cache) {
            vd_node_debug_event(s->file->node, VD_BLKDBG_L2_LOAD);
        }
        ret = vd_child_pread(s->file, offset, slot_table(c, victim),
                             c->table_size, err);
        if (ret < 0) {
            vd_error_prepend(err, "%s: reading %s table at 0x%llx: ",
                             s->filename, c->name,
                             (unsigned long long)offset);
            return ret;
        }
    }
    c->entries[victim] = (qcow2_cache_entry){
        .offset = offset, .lru = ++c->lru_counter, .ref = 1,
    };
    *table = slot_table(c, victim);
    return 0;
}

int qcow2_cache_get(qcow2_state *s, qcow2_cache *c, uint64_t offset,
                    void **table, vd_error *err)
{
    return lookup(s, c, offset, table, true, err);
}

int qcow2_cache_get_empty(qcow2_state *s, qcow2_cache *c, uint64_t offset,
                          void **table, vd_error *err)
{
    return lookup(s, c, offset, table, false, err);
}

void qcow2_cache_put(qcow2_cache *c, void **table)
{
    if (!*table) {
        return;
    }
    c->entries[slot_of_table(c, *table)].ref--;
    *table = NULL;
}

void qcow2_cache_mark_dirty(qcow2_cache *c, void *table)
{
    c->entries[slot_of_table(c, table)].dirty = true;
}

void qcow2_cache_discard(qcow2_cache *c, uint64_t offset)
{
    for (int i = 0; i < c->size; i++) {
        if (c->entries[i].offset == offset && c->entries[i].ref == 0) {
            c->entries[i].offset = 0;
            c->entries[i].dirty = false;
        }
    }
}

int qcow2_cache_empty(qcow2_cache *c)
{
    for (int i = 0; i < c->size; i++) {
        if (c->entries[i].dirty || c->entries[i].ref) {
            return -EBUSY;
        }
    }
    for (int i = 0; i < c->size; i++) {
        c->entries[i].offset = 0;
    }
    return 0;
}
