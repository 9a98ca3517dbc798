/*
 * qcow2 metadata cache: a fixed number of cluster-sized slots holding L2
 * tables or refcount blocks, as QEMU's qcow2-cache.c.
 *
 * A slot is found by host offset through a hash index (the L2 cache
 * holds up to 8192 tables: a linear scan per lookup cost more than the
 * I/O on small-cluster images), pinned by get/put reference counts,
 * evicted least-recently-used among the unpinned ones (a use-ordered
 * list, so a miss costs no scan either), and written back when dirty. Write-back honours the
 * ordering rules of the allocation code (see cluster.c): a cache may
 * depend on another cache (that one is flushed first, with a flush of
 * the file) or on a plain file flush. Everything here runs with
 * qcow2_state.lock held.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "drivers/qcow2/qcow2.h"

/* ---- the hash index and the use order ---- */

static unsigned bucket_of(const qcow2_cache *c, uint64_t offset)
{
    uint64_t h = (offset / c->table_size) * 0x9e3779b97f4a7c15ull;
    return (unsigned)(h >> 32) & c->bucket_mask;
}

static int find_slot(const qcow2_cache *c, uint64_t offset)
{
    for (int i = c->buckets[bucket_of(c, offset)]; i >= 0;
         i = c->entries[i].hash_next) {
        if (c->entries[i].offset == offset) {
            return i;
        }
    }
    return -1;
}

static void hash_insert(qcow2_cache *c, int i)
{
    unsigned b = bucket_of(c, c->entries[i].offset);
    c->entries[i].hash_next = c->buckets[b];
    c->buckets[b] = i;
}

static void hash_remove(qcow2_cache *c, int i)
{
    int *link = &c->buckets[bucket_of(c, c->entries[i].offset)];
    while (*link != i) {
        link = &c->entries[*link].hash_next;
    }
    *link = c->entries[i].hash_next;
    c->entries[i].hash_next = -1;
}

static void lru_unlink(qcow2_cache *c, int i)
{
    qcow2_cache_entry *e = &c->entries[i];
    if (e->lru_prev >= 0) {
        c->entries[e->lru_prev].lru_next = e->lru_next;
    } else {
        c->lru_head = e->lru_next;
    }
    if (e->lru_next >= 0) {
        c->entries[e->lru_next].lru_prev = e->lru_prev;
    } else {
        c->lru_tail = e->lru_prev;
    }
    e->lru_prev = e->lru_next = -1;
}

static void lru_push_head(qcow2_cache *c, int i)
{
    qcow2_cache_entry *e = &c->entries[i];
    e->lru_prev = -1;
    e->lru_next = c->lru_head;
    if (c->lru_head >= 0) {
        c->entries[c->lru_head].lru_prev = i;
    } else {
        c->lru_tail = i;
    }
    c->lru_head = i;
}

static void lru_push_tail(qcow2_cache *c, int i)
{
    qcow2_cache_entry *e = &c->entries[i];
    e->lru_next = -1;
    e->lru_prev = c->lru_tail;
    if (c->lru_tail >= 0) {
        c->entries[c->lru_tail].lru_next = i;
    } else {
        c->lru_head = i;
    }
    c->lru_tail = i;
}

/* Empties slot @i (its table forgotten) and moves it to the tail, where
 * eviction looks first. */
static void slot_forget(qcow2_cache *c, int i)
{
    if (c->entries[i].offset) {
        hash_remove(c, i);
    }
    c->entries[i].offset = 0;
    c->entries[i].dirty = false;
    lru_unlink(c, i);
    lru_push_tail(c, i);
}

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
    unsigned nb = 1;
    while (nb < (unsigned)num_tables) {
        nb <<= 1;
    }
    c->bucket_mask = nb - 1;
    c->buckets = malloc(nb * sizeof(*c->buckets));
    c->entries = calloc((size_t)num_tables, sizeof(*c->entries));
    c->tables = vd_node_blockalign(s->node, (size_t)num_tables * table_size);
    if (!c->buckets || !c->entries || !c->tables) {
        qcow2_cache_destroy(c);
        return NULL;
    }
    for (unsigned b = 0; b < nb; b++) {
        c->buckets[b] = -1;
    }
    c->lru_head = c->lru_tail = -1;
    for (int i = 0; i < num_tables; i++) {
        c->entries[i].hash_next = -1;
        lru_push_tail(c, i);
    }
    return c;
}

void qcow2_cache_destroy(qcow2_cache *c)
{
    if (!c) {
        return;
    }
    free(c->buckets);
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
    int i = find_slot(c, offset);
    if (i >= 0) {
        qcow2_cache_entry *e = &c->entries[i];
        c->hits++;
        e->ref++;
        e->lru = ++c->lru_counter;
        lru_unlink(c, i);
        lru_push_head(c, i);
        *table = slot_table(c, i);
        return 0;
    }
    for (i = c->lru_tail; i >= 0; i = c->entries[i].lru_prev) {
        if (c->entries[i].ref == 0) {
            victim = i;
            break;
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
    slot_forget(c, victim);
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
    qcow2_cache_entry *e = &c->entries[victim];
    e->offset = offset;
    e->lru = ++c->lru_counter;
    e->ref = 1;
    e->dirty = false;
    hash_insert(c, victim);
    lru_unlink(c, victim);
    lru_push_head(c, victim);
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
    int i = find_slot(c, offset);
    if (i >= 0 && c->entries[i].ref == 0) {
        slot_forget(c, i);
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
        if (c->entries[i].offset) {
            slot_forget(c, i);
        }
    }
    return 0;
}

void qcow2_cache_clean_unused(qcow2_cache *c, uint64_t *last_lru)
{
    long page = sysconf(_SC_PAGESIZE);

    for (int i = 0; i < c->size; i++) {
        qcow2_cache_entry *e = &c->entries[i];
        if (!e->offset || e->ref || e->dirty || e->lru > *last_lru) {
            continue;
        }
        slot_forget(c, i);
        if (page > 0 && c->table_size % (size_t)page == 0) {
            madvise(slot_table(c, i), c->table_size, MADV_DONTNEED);
        }
    }
    *last_lru = c->lru_counter;
}
