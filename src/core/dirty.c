/*
 * Dirty trackers: what a job (mirror, active commit) needs to know about
 * the writes to a node while it copies it. A tracker is a flat bitmap of
 * the node's length at a power-of-two granularity; the request path
 * (io.c) marks every write, zero write and discard in every tracker of
 * the node once the request has reached the driver, so a range the job
 * cleared before reading it is marked again by any write that lands
 * during or after the read.
 *
 * Bits are set and cleared with atomic word operations, so requests and
 * the job never lock. Trackers are added and removed with the node
 * drained (no request in flight), under the node's mutex, so the list a
 * request walks never changes under it.
 *
 * The same bitmap serves unregistered (vd_dirty_bitmap_new()) where a
 * job needs a set of ranges that writes must not mark (backup's copy
 * bitmap).
 *
 * Issue 10's dirty bitmaps (named, persistent, exported) will replace
 * this with a hierarchical structure; the contract stays.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "block_int.h"

struct vd_dirty_tracker {
    unsigned shift;                 /* log2 of the granularity */
    uint64_t nbits;
    _Atomic uint64_t *words;
    vd_dirty_tracker *next;
};

static vd_dirty_tracker *bitmap_new(uint64_t len, uint64_t granularity)
{
    vd_dirty_tracker *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    while ((1ull << t->shift) < granularity)
        t->shift++;
    t->nbits = (len + (1ull << t->shift) - 1) >> t->shift;
    t->words = calloc(t->nbits / 64 + 1, sizeof(uint64_t));
    if (!t->words) {
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
    free((void *)t->words);
    free(t);
    *tp = NULL;
}

uint64_t vd_dirty_tracker_granularity(const vd_dirty_tracker *t)
{
    return 1ull << t->shift;
}

static void change(vd_dirty_tracker *t, uint64_t off, uint64_t bytes,
                   bool set)
{
    if (bytes == 0)
        return;
    uint64_t first = off >> t->shift;
    uint64_t last = (off + bytes - 1) >> t->shift;
    if (first >= t->nbits)
        return;
    if (last >= t->nbits)
        last = t->nbits - 1;
    for (uint64_t w = first / 64; w <= last / 64; w++) {
        uint64_t lo = w * 64 > first ? 0 : first % 64;
        uint64_t hi = w * 64 + 63 < last ? 63 : last % 64;
        uint64_t mask = (hi == 63 ? ~0ull : ((1ull << (hi + 1)) - 1)) &
                        ~((1ull << lo) - 1);
        if (set)
            atomic_fetch_or(&t->words[w], mask);
        else
            atomic_fetch_and(&t->words[w], ~mask);
    }
}

void vd_dirty_tracker_set(vd_dirty_tracker *t, uint64_t off, uint64_t bytes)
{
    change(t, off, bytes, true);
}

void vd_dirty_tracker_clear(vd_dirty_tracker *t, uint64_t off,
                            uint64_t bytes)
{
    change(t, off, bytes, false);
}

void vd_dirty_mark(vd_node *node, uint64_t off, uint64_t bytes)
{
    for (vd_dirty_tracker *t = atomic_load(&node->dirty_trackers); t;
         t = t->next)
        change(t, off, bytes, true);
}

uint64_t vd_dirty_tracker_count(const vd_dirty_tracker *t)
{
    uint64_t n = 0;
    for (uint64_t w = 0; w <= t->nbits / 64; w++)
        n += (uint64_t)__builtin_popcountll(atomic_load(&t->words[w]));
    return n << t->shift;
}

bool vd_dirty_tracker_next(const vd_dirty_tracker *t, uint64_t from,
                           uint64_t max, uint64_t *off, uint64_t *bytes)
{
    uint64_t b = from >> t->shift;
    /* The first dirty bit at or after @from, wrapping around once. */
    for (uint64_t pass = 0; pass < 2; pass++) {
        while (b < t->nbits) {
            uint64_t word = atomic_load(&t->words[b / 64]) >> (b % 64);
            if (word == 0) {
                b = (b / 64 + 1) * 64;
                continue;
            }
            b += (uint64_t)__builtin_ctzll(word);
            if (b >= t->nbits)
                break;
            uint64_t e = b;
            while (e < t->nbits && ((e - b + 1) << t->shift) <= max &&
                   (atomic_load(&t->words[e / 64]) >> (e % 64)) & 1)
                e++;
            if (e == b)
                e = b + 1;
            *off = b << t->shift;
            *bytes = (e - b) << t->shift;
            return true;
        }
        b = 0;
    }
    return false;
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
