/*
 * Dirty trackers: what a job (mirror, active commit) needs to know about
 * the writes to a node while it copies it. A tracker is a flat bitmap of
 * the node's length at a power-of-two granularity; the request path
 * (io.c) marks every write, zero write and discard in every tracker of
 * the node once the request has reached the driver, so a range the job
 * cleared before reading it is marked again by any write that lands
 * during or after the read.
 *
 * The bits live in a hierarchical bitmap (hbitmap.c), set and cleared
 * with atomic word operations, so requests and the job never lock. Trackers are added and removed with the node
 * drained (no request in flight), under the node's mutex, so the list a
 * request walks never changes under it.
 *
 * The same bitmap serves unregistered (vd_dirty_bitmap_new()) where a
 * job needs a set of ranges that writes must not mark (backup's copy
 * bitmap).
 *
 * vd_dirty_mark() also marks the node's enabled named bitmaps
 * (bitmap.c), which sit on a list of their own.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "block_int.h"
#include "hbitmap.h"

struct vd_dirty_tracker {
    vd_hbitmap *hb;
    vd_dirty_tracker *next;
};

static vd_dirty_tracker *bitmap_new(uint64_t len, uint64_t granularity)
{
    unsigned shift = 0;
    while ((1ull << shift) < granularity && shift < 40)
        shift++;
    vd_dirty_tracker *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->hb = vd_hbitmap_new(len, shift);
    if (!t->hb) {
        free(t);
        return NULL;
    }
    return t;
}

int vd_dirty_bitmap_new(vd_dirty_tracker **out, uint64_t len,
                        uint64_t granularity, vd_error *err)
{
    *out = bitmap_new(len, granularity);
    return *out ? 0 : vd_error_set(err, -ENOMEM, "Out of memory");
}

int vd_dirty_tracker_new(vd_dirty_tracker **out, vd_node *node,
                         uint64_t granularity, vd_error *err)
{
    int64_t len = vd_node_getlength(node);
    if (len < 0)
        return vd_error_set(err, (int)len, "Could not get the length of "
                            "'%s'", node->node_name);
    /* Writes past the end may raise the node's length while the
     * tracker exists; those bits are simply never set. */
    vd_dirty_tracker *t = bitmap_new((uint64_t)len, granularity);
    if (!t)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    vd_node_drain_begin(node);
    pthread_mutex_lock(&node->lock);
    t->next = node->dirty_trackers;
    atomic_store(&node->dirty_trackers, t);
    pthread_mutex_unlock(&node->lock);
    vd_node_drain_end(node);
    *out = t;
    return 0;
}

void vd_dirty_tracker_free(vd_dirty_tracker **tp, vd_node *node)
{
    vd_dirty_tracker *t = *tp;
    if (!t)
        return;
    if (!node)
        goto free_it;
    vd_node_drain_begin(node);
    pthread_mutex_lock(&node->lock);
    vd_dirty_tracker *head = atomic_load(&node->dirty_trackers);
    if (head == t) {
        atomic_store(&node->dirty_trackers, t->next);
    } else {
        for (vd_dirty_tracker *p = head; p && p->next; p = p->next) {
            if (p->next == t) {
                p->next = t->next;
                break;
            }
        }
    }
    pthread_mutex_unlock(&node->lock);
    vd_node_drain_end(node);
free_it:
    vd_hbitmap_free(t->hb);
    free(t);
    *tp = NULL;
}

uint64_t vd_dirty_tracker_granularity(const vd_dirty_tracker *t)
{
    return 1ull << vd_hbitmap_shift(t->hb);
}

void vd_dirty_tracker_set(vd_dirty_tracker *t, uint64_t off, uint64_t bytes)
{
    vd_hbitmap_set(t->hb, off, bytes);
}

void vd_dirty_tracker_clear(vd_dirty_tracker *t, uint64_t off,
                            uint64_t bytes)
{
    vd_hbitmap_reset(t->hb, off, bytes);
}

void vd_dirty_mark(vd_node *node, uint64_t off, uint64_t bytes)
{
    for (vd_dirty_tracker *t = atomic_load(&node->dirty_trackers); t;
         t = t->next)
        vd_hbitmap_set(t->hb, off, bytes);
    vd_bitmaps_mark(node, off, bytes);
}

vd_hbitmap *vd_dirty_tracker_hbitmap(vd_dirty_tracker *t)
{
    return t->hb;
}

uint64_t vd_dirty_tracker_count(const vd_dirty_tracker *t)
{
    return vd_hbitmap_count(t->hb);
}

bool vd_dirty_tracker_next(const vd_dirty_tracker *t, uint64_t from,
                           uint64_t max, uint64_t *off, uint64_t *bytes)
{
    const vd_hbitmap *hb = t->hb;
    unsigned shift = vd_hbitmap_shift(hb);
    uint64_t len = vd_hbitmap_len(hb);
    uint64_t nbits = vd_hbitmap_nbits(hb);
    /* The first dirty bit at or after @from, wrapping around once. */
    int64_t d = from < len ? vd_hbitmap_next_dirty(hb, from, len - from)
                           : -1;
    if (d < 0)
        d = vd_hbitmap_next_dirty(hb, 0, len);
    if (d < 0)
        return false;
    uint64_t b = (uint64_t)d >> shift;
    int64_t c = vd_hbitmap_next_clean(hb, b << shift, len - (b << shift));
    uint64_t e = c < 0 ? nbits : (uint64_t)c >> shift;
    uint64_t maxbits = max >> shift;
    if (e - b > maxbits)
        e = b + maxbits;
    if (e == b)
        e = b + 1;
    *off = b << shift;
    *bytes = (e - b) << shift;
    return true;
}

void vd_bitmap_images_free(vd_bitmap_image *list, size_t count)
{
    if (!list)
        return;
    for (size_t i = 0; i < count; i++) {
        free(list[i].name);
        free(list[i].bits);
    }
    free(list);
}
