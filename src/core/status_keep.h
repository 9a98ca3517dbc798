/*
 * A kept block status answer, for protocol drivers whose block status is
 * a round trip to a server (nbd, rbd).
 *
 * QEMU asks the server once per question, and a copy or a map asks once
 * per extent, in order: `convert` of 1 GiB with 128 extents made 256 of
 * them, each a wait under convert's lock while every worker waited for
 * its next chunk. A driver instead asks about a long range once, keeps
 * the first extents of the answer here, and answers the questions that
 * follow from them, as long as the answer may still be true:
 *
 *   - no write, write-zeroes or discard of this node began since it was
 *     asked, nor is one in flight (the driver brackets each with
 *     vd_status_keep_change_begin() and _end());
 *   - the driver did not drop it (vd_status_keep_drop(): a reconnection,
 *     a resize, a snapshot rollback: anything else that changes what the
 *     storage holds);
 *   - it is younger than its lifetime: another client's change to the
 *     same storage shows that much late at most. A copy of storage that
 *     others write while it is read is never one point in time anyway;
 *     the lifetime bounds how stale a `map` of a live image can be.
 *
 * An answer asked while a change was in flight, or one that began
 * meanwhile, is used for that question only and not kept.
 *
 * Thread-safe: every function may be called from any thread.
 */
#ifndef VDISK_CORE_STATUS_KEEP_H
#define VDISK_CORE_STATUS_KEEP_H

#include "internal.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

/* At most this many extents of an answer are kept. */
#define VD_STATUS_KEEP_EXTENTS 1024
/* ... for at most this long. */
#define VD_STATUS_KEEP_MS 1000

/* One extent of an answer: where it ends, and its VD_BLOCK_DATA and
 * VD_BLOCK_ZERO bits. */
typedef struct vd_kept_extent {
    uint64_t end;
    int status;
} vd_kept_extent;

typedef struct vd_status_keep {
    pthread_mutex_t lock;       /* guards the answer */
    /* The answer, [start, ext[n - 1].end), asked at time_ms
     * (vd_status_keep_now_ms()) when @changes was changes_at. */
    vd_kept_extent *ext;        /* NULL or VD_STATUS_KEEP_EXTENTS long */
    uint32_t n;
    uint64_t start;
    int64_t time_ms;
    unsigned changes_at;
    /* Bumped as each change starts and as it ends, and by a drop; with
     * the count of changes in flight it tells whether an answer may
     * predate a change. */
    atomic_uint changes;
    atomic_uint changes_in_flight;
} vd_status_keep;

/* What was true when a question was sent (vd_status_keep_ask()). */
typedef struct vd_status_ask {
    bool stable;                /* no change was in flight */
    unsigned changes;
    int64_t time_ms;
} vd_status_ask;

void vd_status_keep_init(vd_status_keep *k);
/* Frees the kept answer. No other call may be running. */
void vd_status_keep_destroy(vd_status_keep *k);

/* If the kept answer covers @off and may still be used: returns the
 * status of the extent holding @off (VD_BLOCK_DATA, VD_BLOCK_ZERO) and
 * sets *pnum to its length from @off, at most @bytes, rounded down to
 * @align when longer than that. Else -ENOENT. */
int vd_status_keep_lookup(vd_status_keep *k, uint64_t off, uint64_t bytes,
                          uint32_t align, uint64_t *pnum);

/* The same answer from @n extents (n >= 1) whose last ends past @off. */
int vd_status_keep_answer(const vd_kept_extent *ext, uint32_t n,
                          uint64_t off, uint64_t bytes, uint32_t align,
                          uint64_t *pnum);

/* Called just before a question is sent to the server. */
void vd_status_keep_ask(vd_status_keep *k, vd_status_ask *ask);

/* Keeps the answer to the question @ask describes, @n (>= 1) extents
 * from @start, unless a change began since: then nothing is kept. Takes
 * *@ext (VD_STATUS_KEEP_EXTENTS long, from malloc) when it keeps it and
 * gives back the array it replaces there (or NULL); the caller frees
 * what *@ext holds afterwards. */
void vd_status_keep_store(vd_status_keep *k, const vd_status_ask *ask,
                          uint64_t start, vd_kept_extent **ext, uint32_t n);

/* Brackets a write, write-zeroes or discard of the node. */
void vd_status_keep_change_begin(vd_status_keep *k);
void vd_status_keep_change_end(vd_status_keep *k);

/* Drops the kept answer (and any answer now in flight). */
void vd_status_keep_drop(vd_status_keep *k);

#endif
