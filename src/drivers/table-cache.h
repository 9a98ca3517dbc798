/*
 * What the qed and qcow (v1) drivers share: a small LRU cache of
 * whole-table copies (their L2 tables, kept as host-endian uint64_t
 * arrays and keyed by file offset), and a read of part of a request's
 * vector from a child. Callers serialise access to a cache themselves.
 */
#ifndef VDISK_DRIVERS_TABLE_CACHE_H
#define VDISK_DRIVERS_TABLE_CACHE_H

#include <errno.h>
#include <stdlib.h>

#include "core/block_int.h"

#define VD_TABLE_CACHE_SLOTS 16

typedef struct vd_table_slot {
    uint64_t offset;        /* 0: free */
    uint64_t *table;
    uint64_t used;          /* LRU stamp */
} vd_table_slot;

typedef struct vd_table_cache {
    vd_table_slot slot[VD_TABLE_CACHE_SLOTS];
    uint64_t stamp;
} vd_table_cache;

/* The cached table at file offset @off, or NULL. */
static inline uint64_t *vd_table_cache_find(vd_table_cache *c, uint64_t off)
{
    for (int i = 0; i < VD_TABLE_CACHE_SLOTS; i++) {
        vd_table_slot *e = &c->slot[i];
        if (e->table && e->offset == off) {
            e->used = ++c->stamp;
            return e->table;
        }
    }
    return NULL;
}

/* The least recently used slot, marked free, its table of @bytes
 * allocated; NULL when out of memory. Fill the table, then
 * vd_table_cache_commit(). */
static inline vd_table_slot *vd_table_cache_victim(vd_table_cache *c,
                                                   size_t bytes)
{
    vd_table_slot *v = &c->slot[0];

    for (int i = 1; i < VD_TABLE_CACHE_SLOTS; i++) {
        if (c->slot[i].used < v->used) {
            v = &c->slot[i];
        }
    }
    if (!v->table) {
        v->table = malloc(bytes);
        if (!v->table) {
            return NULL;
        }
    }
    v->offset = 0;
    return v;
}

static inline void vd_table_cache_commit(vd_table_cache *c, vd_table_slot *v,
                                         uint64_t off)
{
    v->offset = off;
    v->used = ++c->stamp;
}

/* Forgets the table at @off (it no longer says what the disk does). */
static inline void vd_table_cache_drop(vd_table_cache *c, uint64_t off)
{
    for (int i = 0; i < VD_TABLE_CACHE_SLOTS; i++) {
        if (c->slot[i].offset == off) {
            c->slot[i].offset = 0;
        }
    }
}

static inline void vd_table_cache_free(vd_table_cache *c)
{
    for (int i = 0; i < VD_TABLE_CACHE_SLOTS; i++) {
        free(c->slot[i].table);
        c->slot[i].table = NULL;
        c->slot[i].offset = 0;
        c->slot[i].used = 0;
    }
}

/* Reads @n bytes at @off of child @c into bytes [@qoff, @qoff+@n) of
 * @qiov. */
static inline int vd_child_preadv_part(vd_child *c, uint64_t off, uint64_t n,
                                       vd_iov *qiov, size_t qoff,
                                       vd_error *err)
{
    vd_iov slice;
    int ret = vd_iov_init_slice(&slice, qiov, qoff, n);

    if (ret < 0) {
        return vd_error_set(err, ret, "out of memory");
    }
    ret = vd_child_preadv(c, off, n, &slice, 0, err);
    vd_iov_destroy(&slice);
    return ret;
}

#endif
