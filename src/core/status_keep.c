/*
 * A kept block status answer: see status_keep.h.
 */
#include "status_keep.h"

#include <errno.h>
#include <stdlib.h>
#include <time.h>

static int64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void vd_status_keep_init(vd_status_keep *k)
{
    pthread_mutex_init(&k->lock, NULL);
    k->ext = NULL;
    k->n = 0;
    k->start = 0;
    k->time_ms = 0;
    k->changes_at = 0;
    atomic_init(&k->changes, 0);
    atomic_init(&k->changes_in_flight, 0);
}

void vd_status_keep_destroy(vd_status_keep *k)
{
    free(k->ext);
    k->ext = NULL;
    k->n = 0;
    pthread_mutex_destroy(&k->lock);
}

int vd_status_keep_answer(const vd_kept_extent *ext, uint32_t n,
                          uint64_t off, uint64_t bytes, uint32_t align,
                          uint64_t *pnum)
{
    uint32_t lo = 0, hi = n;
    uint64_t len;

    /* The first extent ending past @off. */
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (ext[mid].end > off) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    len = ext[lo].end - off;
    *pnum = len < bytes ? len : bytes;
    /* A server honouring its block size answers in whole blocks; never
     * report less than one. */
    if (align && *pnum > align) {
        *pnum -= *pnum % align;
    }
    return ext[lo].status;
}

/* Lock held. */
static bool usable(vd_status_keep *k, uint64_t off)
{
    return k->n && off >= k->start && off < k->ext[k->n - 1].end &&
           atomic_load(&k->changes) == k->changes_at &&
           atomic_load(&k->changes_in_flight) == 0 &&
           now_ms() - k->time_ms <= VD_STATUS_KEEP_MS;
}

int vd_status_keep_lookup(vd_status_keep *k, uint64_t off, uint64_t bytes,
                          uint32_t align, uint64_t *pnum)
{
    int ret = -ENOENT;

    pthread_mutex_lock(&k->lock);
    if (usable(k, off)) {
        ret = vd_status_keep_answer(k->ext, k->n, off, bytes, align, pnum);
    }
    pthread_mutex_unlock(&k->lock);
    return ret;
}

void vd_status_keep_ask(vd_status_keep *k, vd_status_ask *ask)
{
    /* Read before asking: a change in flight, or one that begins while
     * the question is out, may or may not show in the answer. */
    ask->stable = atomic_load(&k->changes_in_flight) == 0;
    ask->changes = atomic_load(&k->changes);
    ask->time_ms = now_ms();
}

void vd_status_keep_store(vd_status_keep *k, const vd_status_ask *ask,
                          uint64_t start, vd_kept_extent **ext, uint32_t n)
{
    if (!n) {
        return;
    }
    pthread_mutex_lock(&k->lock);
    if (ask->stable && atomic_load(&k->changes_in_flight) == 0 &&
        atomic_load(&k->changes) == ask->changes) {
        vd_kept_extent *old = k->ext;
        k->ext = *ext;
        k->n = n;
        k->start = start;
        k->time_ms = ask->time_ms;
        k->changes_at = ask->changes;
        *ext = old;
    }
    pthread_mutex_unlock(&k->lock);
}

void vd_status_keep_change_begin(vd_status_keep *k)
{
    atomic_fetch_add(&k->changes_in_flight, 1);
    atomic_fetch_add(&k->changes, 1);
}

void vd_status_keep_change_end(vd_status_keep *k)
{
    atomic_fetch_add(&k->changes, 1);
    atomic_fetch_sub(&k->changes_in_flight, 1);
}

void vd_status_keep_drop(vd_status_keep *k)
{
    atomic_fetch_add(&k->changes, 1);
}
