/*
 * The request path: one function per operation, through which every
 * request to every node passes (vd_node_preadv, vd_node_pwritev, ...).
 *
 * Each function checks the range and the node's mode, counts the request
 * in flight (so drains can wait for it) and in the statistics, and then:
 *  - clips reads at the node's end (the rest reads as zeros);
 *  - turns unaligned requests, or buffers a driver with O_DIRECT cannot
 *    take, into aligned ones through a bounce buffer, serialising the
 *    read-modify-write against overlapping writes;
 *  - splits requests at the driver's max_transfer;
 *  - supplies the fallback where the driver has no callback (filters
 *    pass to their child, write_zeroes writes zeros, discard does
 *    nothing, FUA becomes a flush after the write).
 * Reads through a backing chain (with copy-on-read when the node asks for
 * it), block status down a chain, length and truncate, and the request
 * statistics (vd_get_stats()) are here too.
 * The public vd_*() entry points at the bottom add what only the top of
 * a graph needs: a range check against the image size, waiting while the
 * node is drained, detect-zeroes and write-through.
 *
 * Nothing here allocates on the stack in proportion to the request, and
 * the functions recurse only through the graph (a backing chain read
 * recurses once per layer), so frames are kept small.
 *
 * Every call into a driver's request callbacks happens in this file, so
 * this is where the promises of block_int.h's vtable comment are checked
 * (contract_*() below).
 */
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/block_int.h"

/* Bounce buffers are processed in pieces of this size (rounded to the
 * alignment), so an unaligned 1 GiB request needs no 1 GiB buffer. */
#define BOUNCE_CHUNK (1u << 20)

/*
 * Contract checks: what the driver vtable's comment (block_int.h) says a
 * driver may assume about the requests it receives. In debug builds they
 * are asserts, so a change to the request path that breaks a promise
 * stops the tests at the call instead of letting a driver misbehave on
 * an image; release builds (meson's b_ndebug=if-release defines NDEBUG)
 * drop them without evaluating anything (sizeof keeps the operands
 * "used", so no variable goes unused).
 */
#ifdef NDEBUG
#define VD_CONTRACT(cond) ((void)sizeof(!(cond)))
#else
#define VD_CONTRACT(cond) assert(cond)
#endif

static uint64_t now_ns(void)
{
    return vd_acct_now();
}

static inline void stat_add(uint64_t *field, uint64_t v)
{
    __atomic_fetch_add(field, v, __ATOMIC_RELAXED);
}

/* Counts one finished request of @type in the node's accounting
 * (stats.c has the rest, and the semantics): its outcome (@r < 0:
 * failed), its bytes and its latency since @t0. */
static void account(vd_node *n, vd_acct_type type, int r, uint64_t bytes,
                    uint64_t t0)
{
    vd_acct *a = &n->acct;
    uint64_t now = now_ns();
    bool counted = r >= 0 ||
                   __atomic_load_n(&a->account_failed, __ATOMIC_RELAXED);

    if (r < 0) {
        stat_add(&a->c[type].failed, 1);
    } else {
        stat_add(&a->c[type].ops, 1);
        stat_add(&a->c[type].bytes, bytes);
    }
    if (counted) {
        stat_add(&a->c[type].time_ns, now - t0);
        /* Read first: the shared line is written only when the stored
         * time is a grain old, not by every concurrent request. */
        if (now - __atomic_load_n(&a->last_access_ns, __ATOMIC_RELAXED) >=
            VD_ACCT_IDLE_GRAIN)
            __atomic_store_n(&a->last_access_ns, now, __ATOMIC_RELAXED);
    }
    if (__atomic_load_n(&a->extras, __ATOMIC_RELAXED))
        vd_acct_extras(n, type, now - t0, counted);
}

/* A write or zero write reached @n, ending at @end (QEMU's node-level
 * wr_highest_offset, kept whatever the outcome). */
static void account_write_end(vd_node *n, uint64_t end)
{
    uint64_t cur = __atomic_load_n(&n->acct.wr_highest_offset,
                                   __ATOMIC_RELAXED);
    while (end > cur &&
           !__atomic_compare_exchange_n(&n->acct.wr_highest_offset, &cur,
                                        end, true, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED))
        ;
}

static inline uint64_t align_down(uint64_t x, uint64_t a)
{
    return x - x % a;
}

static inline uint64_t align_up(uint64_t x, uint64_t a)
{
    return align_down(x + a - 1, a);
}

/* ---- in-flight accounting and drain ---- */

static void inflight_inc(vd_node *n)
{
    __atomic_add_fetch(&n->in_flight, 1, __ATOMIC_SEQ_CST);
}

/* Decrements *@count and, when it reaches 0 while *@waiters says
 * someone waits for that (under the node's lock), wakes them: the
 * broadcast is taken under the lock, so the wake-up cannot be missed. */
static void dec_and_wake(vd_node *n, int *count, int *waiters)
{
    if (__atomic_sub_fetch(count, 1, __ATOMIC_SEQ_CST) == 0 &&
        __atomic_load_n(waiters, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&n->lock);
        pthread_cond_broadcast(&n->cond);
        pthread_mutex_unlock(&n->lock);
    }
}

static void inflight_dec(vd_node *n)
{
    dec_and_wake(n, &n->in_flight, &n->quiesce);
}

/* Starts a request from outside the graph: counts it in flight, waiting
 * first while the node is drained. Counting before looking at quiesce
 * (both seq_cst) closes the window in which a drain could start between
 * the check and the count, see nothing in flight and change the node
 * under the request; a request that finds the node quiesced steps back
 * out so the drain can finish. */
static void request_begin(vd_node *n)
{
    for (;;) {
        inflight_inc(n);
        if (__atomic_load_n(&n->quiesce, __ATOMIC_SEQ_CST) == 0)
            return;
        inflight_dec(n);
        pthread_mutex_lock(&n->lock);
        while (__atomic_load_n(&n->quiesce, __ATOMIC_SEQ_CST) > 0)
            pthread_cond_wait(&n->cond, &n->lock);
        pthread_mutex_unlock(&n->lock);
    }
}

static void request_end(vd_node *n)
{
    inflight_dec(n);
}

/* ---- serialisation of read-modify-write ---- */

typedef struct vd_tracked_req {
    uint64_t start, end;
    bool serialising;
    bool plain;         /* counted in track_plain, not on the list */
    struct vd_tracked_req *next;
} vd_tracked_req;

static bool tracked_conflict(vd_node *n, const vd_tracked_req *me)
{
    for (vd_tracked_req *t = n->tracked; t; t = t->next) {
        if (t == me || t->end <= me->start || me->end <= t->start)
            continue;
        if (t->serialising || me->serialising)
            return true;
    }
    return false;
}

/* A plain write that skipped the list is over: the last one wakes a
 * serialising request waiting for them. */
static void track_plain_end(vd_node *n)
{
    dec_and_wake(n, &n->track_plain, &n->track_serialising);
}

/*
 * Registers a write over [start, end) (aligned), waiting first for any
 * overlapping write when either side is a read-modify-write.
 *
 * A plain (aligned) write can only ever wait for a serialising request,
 * so while none is about it skips the list and its lock - which 32
 * threads writing 4 KiB with O_DIRECT otherwise take twice per request
 * and queue on - and only counts itself in track_plain. The two
 * counters are a Dekker pair (both seq_cst): a plain write counts
 * itself and then looks for serialising requests, a serialising one
 * counts itself and then (under the lock) waits until no plain write
 * that skipped the list is in flight. At least one of them sees the
 * other, so either the plain write takes the list or the serialising
 * request waits for it; plain writes that arrive meanwhile take the
 * list, so the wait ends. Serialising requests are rare (unaligned
 * writes on O_DIRECT nodes, copy-on-read) and wait at most for the
 * plain writes in flight, not just the overlapping ones.
 */
static void track_begin(vd_node *n, vd_tracked_req *req, uint64_t start,
                        uint64_t end, bool serialising)
{
    req->start = start;
    req->end = end;
    req->serialising = serialising;
    req->plain = false;
    if (serialising) {
        __atomic_add_fetch(&n->track_serialising, 1, __ATOMIC_SEQ_CST);
    } else {
        __atomic_add_fetch(&n->track_plain, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&n->track_serialising, __ATOMIC_SEQ_CST) == 0) {
            req->plain = true;
            return;
        }
        track_plain_end(n);
    }
    pthread_mutex_lock(&n->lock);
    while (tracked_conflict(n, req) ||
           (serialising &&
            __atomic_load_n(&n->track_plain, __ATOMIC_SEQ_CST) > 0))
        pthread_cond_wait(&n->cond, &n->lock);
    req->next = n->tracked;
    n->tracked = req;
    pthread_mutex_unlock(&n->lock);
}

static void track_end(vd_node *n, vd_tracked_req *req)
{
    if (req->plain) {
        track_plain_end(n);
        return;
    }
    pthread_mutex_lock(&n->lock);
    for (vd_tracked_req **p = &n->tracked; *p; p = &(*p)->next) {
        if (*p == req) {
            *p = req->next;
            break;
        }
    }
    if (req->serialising)
        __atomic_sub_fetch(&n->track_serialising, 1, __ATOMIC_SEQ_CST);
    pthread_cond_broadcast(&n->cond);
    pthread_mutex_unlock(&n->lock);
}

/* Whether writes to @n must be tracked because copy-on-read may be
 * populating it: the node's copy-on-read option, or a job
 * (vd_node_cor_begin()). */
static bool cor_active(vd_node *n)
{
    return (n->flags & VD_NODE_COPY_ON_READ) ||
           atomic_load(&n->cor_users) > 0;
}

/* ---- write hooks (backup's copy before write) ---- */

void vd_node_add_write_hook(vd_node *node, vd_write_hook *hook)
{
    vd_node_drain_begin(node);
    pthread_mutex_lock(&node->lock);
    hook->next = atomic_load(&node->write_hooks);
    atomic_store(&node->write_hooks, hook);
    pthread_mutex_unlock(&node->lock);
    vd_node_drain_end(node);
}

void vd_node_remove_write_hook(vd_node *node, vd_write_hook *hook)
{
    vd_node_drain_begin(node);
    pthread_mutex_lock(&node->lock);
    vd_write_hook *head = atomic_load(&node->write_hooks);
    if (head == hook) {
        atomic_store(&node->write_hooks, hook->next);
    } else {
        for (vd_write_hook *h = head; h && h->next; h = h->next) {
            if (h->next == hook) {
                h->next = hook->next;
                break;
            }
        }
    }
    pthread_mutex_unlock(&node->lock);
    vd_node_drain_end(node);
}

/* The hooks' @after for the request that ran them (up to @stop, the
 * hook whose fn failed). The list cannot change meanwhile: the request
 * is in flight, and hooks come and go with the node drained. */
static void run_after_hooks(vd_node *n, vd_write_hook *stop, uint64_t off,
                            uint64_t bytes, vd_iov *qiov, unsigned flags,
                            int ret)
{
    for (vd_write_hook *h = atomic_load_explicit(&n->write_hooks,
                                                 memory_order_acquire);
         h && h != stop; h = h->next)
        if (h->after)
            h->after(h->opaque, off, bytes, qiov, flags, ret);
}

static int run_write_hooks(vd_node *n, uint64_t off, uint64_t bytes,
                           unsigned flags, vd_error *err)
{
    for (vd_write_hook *h = atomic_load_explicit(&n->write_hooks,
                                                 memory_order_acquire);
         h; h = h->next) {
        int r = h->fn(h->opaque, off, bytes, err);
        if (r < 0) {
            run_after_hooks(n, h, off, bytes, NULL, flags, r);
            return r;
        }
    }
    return 0;
}

/* ---- helpers ---- */

void *vd_node_blockalign(vd_node *node, size_t size)
{
    size_t a = node && node->bl.min_mem_alignment > sizeof(void *)
               ? node->bl.min_mem_alignment : 4096;
    void *p = NULL;
    if (posix_memalign(&p, a, size ? size : 1) != 0)
        return NULL;
    return p;
}

static bool iov_mem_aligned(const vd_iov *v, size_t a)
{
    if (a <= 1)
        return true;
    for (int i = 0; i < v->niov; i++) {
        if ((uintptr_t)v->iov[i].iov_base % a || v->iov[i].iov_len % a)
            return false;
    }
    return true;
}

static int check_range(vd_node *n, uint64_t off, uint64_t bytes,
                       vd_error *err)
{
    if (n->broken)
        return vd_error_set(err, -EIO, "%s: node is unusable after a failed "
                            "reopen", n->filename ? n->filename
                                                  : n->node_name);
    if (off > INT64_MAX || bytes > INT64_MAX || off + bytes > INT64_MAX)
        return vd_error_set(err, -EINVAL, "%s: request at offset %" PRIu64
                            " of %" PRIu64 " bytes overflows",
                            n->filename ? n->filename : n->node_name, off,
                            bytes);
    return 0;
}

static uint64_t max_transfer(vd_node *n)
{
    uint64_t m = n->bl.max_transfer ? n->bl.max_transfer : VD_MAX_REQUEST;
    if (m > VD_MAX_REQUEST)
        m = VD_MAX_REQUEST;
    uint32_t a = n->bl.request_alignment;
    m = align_down(m, a);
    return m ? m : a;
}

/* Before a driver's preadv/pwritev: the request is aligned, not empty,
 * no larger than the driver's max_transfer, described by a vector of
 * exactly its size, and a write goes to a writable node on which some
 * edge holds the write permission (docs/permissions.md). */
static void contract_rw(vd_node *n, bool write, uint64_t off, uint64_t bytes,
                        const vd_iov *qiov)
{
    uint32_t a = n->bl.request_alignment;

    VD_CONTRACT(a >= 1);
    VD_CONTRACT(off % a == 0 && bytes % a == 0);
    VD_CONTRACT(bytes > 0 && bytes <= max_transfer(n));
    VD_CONTRACT(qiov->size == bytes);
    VD_CONTRACT(!write || !n->read_only);
    VD_CONTRACT(!write ||
                (__atomic_load_n(&n->perm, __ATOMIC_RELAXED) &
                 (VD_PERM_WRITE | VD_PERM_WRITE_UNCHANGED)));
}

/* Before a driver's pwrite_zeroes/pdiscard: aligned, not empty, no larger
 * than max_transfer, on a writable node some edge holds write on. */
static void contract_range(vd_node *n, uint64_t off, uint64_t bytes)
{
    uint32_t a = n->bl.request_alignment;

    VD_CONTRACT(a >= 1);
    VD_CONTRACT(off % a == 0 && bytes % a == 0);
    VD_CONTRACT(bytes > 0 && bytes <= max_transfer(n));
    VD_CONTRACT(!n->read_only);
    VD_CONTRACT(__atomic_load_n(&n->perm, __ATOMIC_RELAXED) & VD_PERM_WRITE);
}

static vd_node *filtered_child(vd_node *n)
{
    return n->drv->is_filter && n->file ? n->file->node : NULL;
}

/* ---- read ---- */

/* Calls the driver for an aligned request, split at max_transfer. */
/* The driver's read or write callback, with the request shape all
 * callbacks share. */
typedef int (*rw_fn)(vd_node *, uint64_t, uint64_t, vd_iov *, unsigned,
                     vd_error *);

/* Calls the driver for an aligned read or write, split at max_transfer.
 * A driver without the callback (a filter) passes it to its file child. */
static int driver_rw(vd_node *n, bool write, uint64_t off, uint64_t bytes,
                     vd_iov *qiov, size_t qoff, unsigned flags,
                     vd_error *err)
{
    rw_fn fn = write ? n->drv->pwritev : n->drv->preadv;
    if (!fn) {
        vd_node *child = n->file ? n->file->node : NULL;
        if (!child)
            return vd_error_set(err, -ENOTSUP, "%s: driver '%s' cannot %s",
                                n->filename, n->drv->name,
                                write ? "write" : "read");
        vd_iov part;
        int r = vd_iov_init_slice(&part, qiov, qoff, bytes);
        if (r == 0)
            r = write ? vd_node_pwritev(child, off, bytes, &part, flags, err)
                      : vd_node_preadv(child, off, bytes, &part, flags, err);
        vd_iov_destroy(&part);
        return r;
    }
    uint64_t mt = max_transfer(n);
    while (bytes > 0) {
        uint64_t len = bytes < mt ? bytes : mt;
        int r;
        if (qoff == 0 && len == qiov->size) {
            contract_rw(n, write, off, len, qiov);
            r = fn(n, off, len, qiov, flags, err);
        } else {
            vd_iov part;
            r = vd_iov_init_slice(&part, qiov, qoff, len);
            if (r == 0) {
                contract_rw(n, write, off, len, &part);
                r = fn(n, off, len, &part, flags, err);
            }
            vd_iov_destroy(&part);
        }
        if (r < 0)
            return r;
        off += len;
        qoff += len;
        bytes -= len;
    }
    return 0;
}


/* An aligned read, clipped at the node's end. */
static int aligned_read(vd_node *n, uint64_t off, uint64_t bytes,
                        vd_iov *qiov, size_t qoff, unsigned flags,
                        vd_error *err)
{
    int64_t len = atomic_load(&n->total_size);
    uint64_t readable = 0;
    if (len > 0 && off < (uint64_t)len) {
        readable = align_up((uint64_t)len - off, n->bl.request_alignment);
        if (readable > bytes)
            readable = bytes;
    }
    /* The driver sees only what lies inside the node (rounded up to the
     * alignment): the rest reads as zeros without asking it. */
    VD_CONTRACT(readable == 0 ||
                off + readable <= align_up((uint64_t)len,
                                           n->bl.request_alignment));
    if (readable > 0) {
        int r = driver_rw(n, false, off, readable, qiov, qoff, flags, err);
        if (r < 0)
            return r;
    }
    if (readable < bytes)
        vd_iov_memset(qiov, qoff + readable, 0, bytes - readable);
    return 0;
}

static int bounce_chunk_size(vd_node *n)
{
    uint32_t a = n->bl.request_alignment;
    uint64_t c = align_up(BOUNCE_CHUNK, a);
    return (int)c;
}

static int do_preadv(vd_node *n, uint64_t off, uint64_t bytes, vd_iov *qiov,
                     unsigned flags, vd_error *err)
{
    uint32_t a = n->bl.request_alignment;
    bool aligned = off % a == 0 && bytes % a == 0;
    if (aligned && iov_mem_aligned(qiov, n->bl.min_mem_alignment))
        return aligned_read(n, off, bytes, qiov, 0, flags, err);

    /* Bounce: read aligned pieces into one buffer and copy out. */
    uint64_t chunk = (uint64_t)bounce_chunk_size(n);
    uint64_t start = align_down(off, a), end = align_up(off + bytes, a);
    uint64_t blen = end - start < chunk ? end - start : chunk;
    uint8_t *buf = vd_node_blockalign(n, blen);
    if (!buf)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    int r = 0;
    for (uint64_t pos = start; pos < end && r == 0;) {
        uint64_t len = end - pos < chunk ? end - pos : chunk;
        vd_iov b;
        vd_iov_init_buf(&b, buf, len);
        r = aligned_read(n, pos, len, &b, 0, flags, err);
        if (r == 0) {
            uint64_t from = pos > off ? pos : off;
            uint64_t to = pos + len < off + bytes ? pos + len : off + bytes;
            vd_iov_from_buf(qiov, from - off, buf + (from - pos), to - from);
        }
        pos += len;
    }
    free(buf);
    return r;
}

static int do_pwritev(vd_node *n, uint64_t off, uint64_t bytes, vd_iov *qiov,
                      unsigned flags, vd_error *err);
static int do_pwrite_zeroes(vd_node *n, uint64_t off, uint64_t bytes,
                            unsigned flags, vd_error *err);

/* Copy-on-read: the range just read from a lower layer goes into @top.
 * The caller holds a serialising tracked request over the range, so no
 * guest write can land in between and be overwritten with older data;
 * hence the direct do_*() calls, which do not track again. */
static int cor_write(vd_node *top, uint64_t off, uint64_t bytes,
                     vd_iov *data, bool zero, vd_error *err)
{
    vd_node_debug_event_here(top, VD_BLKDBG_COR_WRITE);
    int r = zero ? do_pwrite_zeroes(top, off, bytes, 0, err)
                 : do_pwritev(top, off, bytes, data, 0, err);
    if (r == 0) {
        stat_add(&top->acct.c[VD_ACCT_WRITE].ops, 1);
        stat_add(&top->acct.c[VD_ACCT_WRITE].bytes, bytes);
        if (zero) {
            stat_add(&top->acct.zero_ops, 1);
            stat_add(&top->acct.zero_bytes, bytes);
        }
    }
    return r;
}

/*
 * Reads from a node that has a backing chain without recursing once per
 * layer: block status walks down the chain in a loop to the layer that
 * holds each extent, and only that layer's driver reads it (the driver
 * then never needs its backing child). A chain of any depth costs one
 * stack frame here, and a read of an extent deep in the chain costs one
 * status lookup per layer, as the recursion did. A write to the top that
 * races with this read may land before or after it, like any two
 * overlapping requests.
 *
 * With copy-on-read, the request is widened to the node's cluster
 * granularity (pdiscard_alignment, as QEMU rounds to clusters) so that
 * whole clusters are populated, and serialised against writes.
 */
static int chain_preadv(vd_node *top, uint64_t off, uint64_t bytes,
                        vd_iov *qiov, unsigned flags, vd_error *err)
{
    bool cor = ((top->flags & VD_NODE_COPY_ON_READ) ||
                (flags & VD_REQ_COPY_ON_READ)) && !top->read_only;
    flags &= ~VD_REQ_COPY_ON_READ;
    uint8_t *cbuf = NULL;
    vd_tracked_req req;
    vd_iov wide;
    uint64_t start = off, end = off + bytes;
    int r = 0;

    if (cor) {
        int64_t len = atomic_load(&top->total_size);
        uint64_t g = top->bl.pdiscard_alignment > top->bl.request_alignment
                     ? top->bl.pdiscard_alignment : top->bl.request_alignment;
        if (g > BOUNCE_CHUNK)
            g = BOUNCE_CHUNK;
        start = align_down(off, g);
        end = align_up(off + bytes, g);
        if (len >= 0 && end > (uint64_t)len)
            end = (uint64_t)len > off + bytes ? (uint64_t)len : off + bytes;
        track_begin(top, &req, align_down(start, top->bl.request_alignment),
                    align_up(end, top->bl.request_alignment), true);
    }
    /* Past the node's end reads as zeros, whatever lies below. */
    int64_t top_len = atomic_load(&top->total_size);
    uint64_t stop = top_len < 0 ? 0 : (uint64_t)top_len;
    if (end > stop) {
        uint64_t z = off > stop ? off : stop;
        if (off + bytes > z)
            vd_iov_memset(qiov, z - off, 0, off + bytes - z);
        end = stop > start ? stop : start;
    }
    for (uint64_t pos = start; pos < end && r == 0;) {
        uint64_t want = end - pos;
        uint64_t pnum = 0, map = 0;
        vd_node *file = NULL;
        int depth = 0;
        if (cor && want > BOUNCE_CHUNK)
            want = BOUNCE_CHUNK;
        int st = vd_node_block_status_above(top, NULL, false, pos, want,
                                            &pnum, &map, &file, &depth, err);
        if (st < 0) {
            r = st;
            break;
        }
        vd_node *layer = top;
        for (int i = 0; i < depth && layer->backing; i++)
            layer = layer->backing->node;
        /* Where QEMU's qcow2 reads from its backing file. */
        if (depth > 0 && top->file)
            vd_node_debug_event(top->file->node, VD_BLKDBG_READ_BACKING_AIO);
        /* The part of [pos, pos+pnum) that the caller asked for. */
        uint64_t from = pos > off ? pos : off;
        uint64_t to = pos + pnum < off + bytes ? pos + pnum : off + bytes;
        bool zero = (st & VD_BLOCK_ZERO) &&
                    (depth > 0 || !(st & VD_BLOCK_ALLOCATED));
        vd_iov part;
        if (cor && depth > 0) {
            /* Whole piece into a bounce buffer, then written to the top. */
            if (!cbuf && !(cbuf = vd_node_blockalign(top, BOUNCE_CHUNK))) {
                r = vd_error_set(err, -ENOMEM, "Out of memory");
                break;
            }
            vd_iov_init_buf(&wide, cbuf, pnum);
            if (zero)
                memset(cbuf, 0, pnum);
            else
                r = do_preadv(layer, pos, pnum, &wide, flags, err);
            if (r == 0)
                r = cor_write(top, pos, pnum, &wide, zero, err);
            if (r == 0 && to > from)
                vd_iov_from_buf(qiov, from - off, cbuf + (from - pos),
                                to - from);
        } else if (to > from) {
            if (zero) {
                vd_iov_memset(qiov, from - off, 0, to - from);
            } else {
                r = vd_iov_init_slice(&part, qiov, from - off, to - from);
                if (r == 0) {
                    r = do_preadv(layer, from, to - from, &part, flags, err);
                    vd_iov_destroy(&part);
                }
            }
        }
        pos += pnum;
    }
    if (cor)
        track_end(top, &req);
    free(cbuf);
    return r;
}

void vd_node_cor_begin(vd_node *n)
{
    if (atomic_fetch_add(&n->cor_users, 1) == 0) {
        /* A write already past the tracking decision would not wait for
         * the copy: let those finish first. */
        vd_node_drain_begin(n);
        vd_node_drain_end(n);
    }
}

void vd_node_cor_end(vd_node *n)
{
    atomic_fetch_sub(&n->cor_users, 1);
}

int vd_node_populate(vd_node *top, vd_node *base, uint64_t off,
                     uint64_t bytes, uint8_t *buf, uint64_t buflen,
                     uint64_t *copied, vd_error *err)
{
    *copied = 0;
    request_begin(top);
    int r = check_range(top, off, bytes, err);
    if (r < 0 || bytes == 0) {
        request_end(top);
        return r;
    }
    uint32_t a = top->bl.request_alignment;
    vd_tracked_req req;
    track_begin(top, &req, align_down(off, a), align_up(off + bytes, a),
                true);
    for (uint64_t pos = off; pos < off + bytes && r == 0;) {
        uint64_t want = off + bytes - pos, pnum = 0, map = 0;
        vd_node *file = NULL;
        int depth = 0;
        if (want > buflen)
            want = buflen;
        int st = vd_node_block_status_above(top, base, false, pos, want,
                                            &pnum, &map, &file, &depth, err);
        if (st < 0) {
            r = st;
            break;
        }
        if ((st & VD_BLOCK_ALLOCATED) && depth > 0) {
            vd_node *layer = top;
            for (int i = 0; i < depth && layer->backing; i++)
                layer = layer->backing->node;
            vd_iov v;
            vd_iov_init_buf(&v, buf, pnum);
            bool zero = st & VD_BLOCK_ZERO;
            if (!zero)
                r = do_preadv(layer, pos, pnum, &v, 0, err);
            if (r == 0)
                r = cor_write(top, pos, pnum, &v, zero, err);
            if (r == 0)
                *copied += pnum;
        }
        pos += pnum;
    }
    track_end(top, &req);
    request_end(top);
    return r;
}

int vd_node_preadv(vd_node *n, uint64_t off, uint64_t bytes, vd_iov *qiov,
                   unsigned flags, vd_error *err)
{
    int r = check_range(n, off, bytes, err);
    if (r < 0 || bytes == 0)
        return r;
    inflight_inc(n);
    uint64_t t0 = now_ns();
    if (n->backing && n->drv->supports_backing)
        r = chain_preadv(n, off, bytes, qiov, flags, err);
    else if (n->drv->is_filter)
        r = do_preadv(n, off, bytes, qiov, flags, err);
    else    /* nothing to copy from: the flag stops here */
        r = do_preadv(n, off, bytes, qiov, flags & ~VD_REQ_COPY_ON_READ,
                      err);
    account(n, VD_ACCT_READ, r, bytes, t0);
    inflight_dec(n);
    return r;
}

/* ---- write ---- */


static void raise_length(vd_node *n, uint64_t end)
{
    int64_t cur = atomic_load(&n->total_size);
    while ((int64_t)end > cur &&
           !atomic_compare_exchange_weak(&n->total_size, &cur, (int64_t)end))
        ;
}

/* An aligned write to the driver, between the events QEMU's
 * bdrv_aligned_pwritev() raises on the node (blkdebug's pwritev). */
static int aligned_write(vd_node *n, uint64_t off, uint64_t bytes,
                         vd_iov *qiov, unsigned flags, vd_error *err)
{
    vd_node_debug_event_here(n, VD_BLKDBG_PWRITEV);
    int r = driver_rw(n, true, off, bytes, qiov, 0, flags, err);
    vd_node_debug_event_here(n, VD_BLKDBG_PWRITEV_DONE);
    return r;
}

static int do_pwritev(vd_node *n, uint64_t off, uint64_t bytes, vd_iov *qiov,
                      unsigned flags, vd_error *err)
{
    uint32_t a = n->bl.request_alignment;
    bool aligned = off % a == 0 && bytes % a == 0;
    if (aligned && iov_mem_aligned(qiov, n->bl.min_mem_alignment))
        return aligned_write(n, off, bytes, qiov, flags, err);

    uint64_t chunk = (uint64_t)bounce_chunk_size(n);
    uint64_t start = align_down(off, a), end = align_up(off + bytes, a);
    uint64_t blen = end - start < chunk ? end - start : chunk;
    uint8_t *buf = vd_node_blockalign(n, blen);
    if (!buf)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    int r = 0;
    for (uint64_t pos = start; pos < end && r == 0;) {
        uint64_t len = end - pos < chunk ? end - pos : chunk;
        uint64_t from = pos > off ? pos : off;
        uint64_t to = pos + len < off + bytes ? pos + len : off + bytes;
        vd_iov b;
        vd_iov_init_buf(&b, buf, len);
        /* The read of a read-modify-write, between QEMU's events for
         * the unaligned head and tail (one read when both are in it). */
        bool head = from != pos && from % a, tail = to != pos + len && to % a;
        if (head)
            vd_node_debug_event_here(n, VD_BLKDBG_PWRITEV_RMW_HEAD);
        if (tail)
            vd_node_debug_event_here(n, VD_BLKDBG_PWRITEV_RMW_TAIL);
        if (from != pos || to != pos + len)
            r = aligned_read(n, pos, len, &b, 0, 0, err);
        if (head)
            vd_node_debug_event_here(n, VD_BLKDBG_PWRITEV_RMW_AFTER_HEAD);
        if (tail)
            vd_node_debug_event_here(n, VD_BLKDBG_PWRITEV_RMW_AFTER_TAIL);
        if (r == 0) {
            vd_iov_to_buf(qiov, from - off, buf + (from - pos), to - from);
            r = aligned_write(n, pos, len, &b, flags, err);
        }
        pos += len;
    }
    free(buf);
    return r;
}

static int check_writable(vd_node *n, vd_error *err)
{
    if (n->read_only)
        return vd_error_set(err, -EROFS, "%s: Block node is read-only",
                            n->filename ? n->filename : n->node_name);
    return 0;
}

int vd_node_pwritev(vd_node *n, uint64_t off, uint64_t bytes, vd_iov *qiov,
                    unsigned flags, vd_error *err)
{
    int r = check_range(n, off, bytes, err);
    if (r == 0)
        r = check_writable(n, err);
    if (r == 0 && (flags & VD_REQ_COMPRESSED) && !n->drv->supports_compressed)
        r = vd_error_set(err, -ENOTSUP, "%s: Image format '%s' does not "
                         "support compressed writes",
                         n->filename ? n->filename : n->node_name,
                         n->drv->name);
    if (r < 0 || bytes == 0)
        return r;
    inflight_inc(n);
    uint64_t t0 = now_ns();
    uint32_t a = n->bl.request_alignment;
    vd_tracked_req req;
    bool tracked = a > 1 || cor_active(n);
    bool hooked = atomic_load_explicit(&n->write_hooks, memory_order_relaxed);
    if (hooked && (r = run_write_hooks(n, off, bytes, 0, err)) < 0) {
        account(n, VD_ACCT_WRITE, r, bytes, t0);
        inflight_dec(n);
        return r;
    }
    if (tracked)
        track_begin(n, &req, align_down(off, a), align_up(off + bytes, a),
                    off % a || bytes % a);
    /* FUA is done generically: write, then flush this node. */
    r = do_pwritev(n, off, bytes, qiov, flags & ~VD_REQ_FUA, err);
    /* A protocol node counts the write before its FUA flush, which must
     * not find the node clean and skip the sync; any other node once the
     * write is over, as QEMU does (its emulated FUA flush then raises no
     * flush_to_disk event on the node below). */
    bool is_protocol = !n->file && !n->children;
    if (is_protocol)
        atomic_fetch_add(&n->write_gen, 1);
    if (vd_node_tracks_dirty(n))
        vd_dirty_mark(n, off, bytes);
    if (hooked)
        run_after_hooks(n, NULL, off, bytes, qiov, flags, r);
    if (r == 0 && (flags & VD_REQ_FUA))
        r = vd_node_flush(n, err);
    if (!is_protocol)
        atomic_fetch_add(&n->write_gen, 1);
    if (tracked)
        track_end(n, &req);
    if (r == 0)
        raise_length(n, off + bytes);
    account_write_end(n, align_up(off + bytes, a));
    account(n, VD_ACCT_WRITE, r, bytes, t0);
    inflight_dec(n);
    return r;
}

/* ---- write zeroes ---- */

static pthread_once_t zero_once = PTHREAD_ONCE_INIT;
static uint8_t *zero_buf;

static void zero_buf_init(void)
{
    if (posix_memalign((void **)&zero_buf, 4096, BOUNCE_CHUNK) == 0)
        memset(zero_buf, 0, BOUNCE_CHUNK);
}

/* Writes zeros from a shared zero buffer. */
static int write_zero_buffer(vd_node *n, uint64_t off, uint64_t bytes,
                             unsigned flags, vd_error *err)
{
    pthread_once(&zero_once, zero_buf_init);
    if (!zero_buf)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    while (bytes > 0) {
        uint64_t len = bytes < BOUNCE_CHUNK ? bytes : BOUNCE_CHUNK;
        vd_iov v;
        vd_iov_init_buf(&v, zero_buf, len);
        int r = vd_node_pwritev(n, off, len, &v, flags & VD_REQ_FUA, err);
        if (r < 0)
            return r;
        off += len;
        bytes -= len;
    }
    return 0;
}

/*
 * One piece of a zero write: the driver's callback where the piece keeps
 * the request alignment (the vtable's contract), else, or when the
 * driver answers -ENOTSUP, a zero buffer. QEMU's generic layer does the
 * same, piece by piece.
 */
static int zero_piece(vd_node *n, uint64_t off, uint64_t len, unsigned flags,
                      vd_error *err)
{
    uint32_t ra = n->bl.request_alignment;
    if (n->drv->pwrite_zeroes && off % ra == 0 && len % ra == 0) {
        contract_range(n, off, len);
        int r = n->drv->pwrite_zeroes(n, off, len, flags & ~VD_REQ_FUA, err);
        if (r != -ENOTSUP)
            return r;
    }
    if (flags & VD_REQ_NO_FALLBACK)
        return -ENOTSUP;
    return write_zero_buffer(n, off, len, flags & ~VD_REQ_FUA, err);
}

/*
 * Cut as QEMU's bdrv_co_do_pwrite_zeroes() cuts: a head up to the first
 * boundary of the zeroing granule (pwrite_zeroes_alignment), the bulk in
 * whole granules and at most max_transfer at a time, and a tail; a
 * driver may thus see a piece smaller than its granule, never one that
 * crosses a granule boundary, and decides itself what to do with it
 * (qcow2 makes it a zero cluster when the rest already reads as zeros).
 */
static int do_pwrite_zeroes(vd_node *n, uint64_t off, uint64_t bytes,
                            unsigned flags, vd_error *err)
{
    vd_node *child = filtered_child(n);
    if (!n->drv->pwrite_zeroes && child)
        return vd_node_pwrite_zeroes(child, off, bytes, flags, err);

    uint32_t a = n->bl.request_alignment;
    if (n->bl.pwrite_zeroes_alignment > a)
        a = n->bl.pwrite_zeroes_alignment;
    /* Pieces of at most max_transfer, as for every callback (the vtable's
     * contract), and at most the driver's largest zero write, in whole
     * zeroing granules. */
    uint64_t piece = max_transfer(n);
    if (n->bl.max_pwrite_zeroes && n->bl.max_pwrite_zeroes < piece)
        piece = n->bl.max_pwrite_zeroes;
    piece = align_down(piece, a);
    if (piece == 0)
        piece = a;
    uint64_t end = off + bytes;
    int r = 0;
    while (r == 0 && off < end) {
        uint64_t len;
        if (off % a) {
            len = a - off % a;
        } else if (end - off > a && end % a) {
            len = align_down(end, a) - off;
        } else {
            len = end - off;
        }
        if (len > end - off)
            len = end - off;
        if (len > piece)
            len = piece;
        r = zero_piece(n, off, len, flags, err);
        off += len;
    }
    /* Counted before the FUA flush on a protocol node (see
     * vd_node_pwritev()), by the caller on any other. */
    if (!n->file && !n->children)
        atomic_fetch_add(&n->write_gen, 1);
    if (r == 0 && (flags & VD_REQ_FUA))
        r = vd_node_flush(n, err);
    return r;
}

int vd_node_pwrite_zeroes(vd_node *n, uint64_t off, uint64_t bytes,
                          unsigned flags, vd_error *err)
{
    int r = check_range(n, off, bytes, err);
    if (r == 0)
        r = check_writable(n, err);
    if (r < 0 || bytes == 0)
        return r;
    inflight_inc(n);
    uint64_t t0 = now_ns();
    bool hooked = atomic_load_explicit(&n->write_hooks, memory_order_relaxed);
    if (hooked && (r = run_write_hooks(n, off, bytes,
                                       flags | VD_REQ_ZERO_WRITE, err)) < 0) {
        inflight_dec(n);
        return r;
    }
    /* Copy-on-read must not overwrite zeros written meanwhile. */
    vd_tracked_req req;
    bool tracked = cor_active(n);
    if (tracked)
        track_begin(n, &req, align_down(off, n->bl.request_alignment),
                    align_up(off + bytes, n->bl.request_alignment), false);
    vd_node_debug_event_here(n, VD_BLKDBG_PWRITEV_ZERO);
    r = do_pwrite_zeroes(n, off, bytes, flags, err);
    vd_node_debug_event_here(n, VD_BLKDBG_PWRITEV_DONE);
    if (n->file || n->children)
        atomic_fetch_add(&n->write_gen, 1);
    if (vd_node_tracks_dirty(n))
        vd_dirty_mark(n, off, bytes);
    if (hooked)
        run_after_hooks(n, NULL, off, bytes, NULL,
                        flags | VD_REQ_ZERO_WRITE, r);
    if (tracked)
        track_end(n, &req);
    if (r == 0)
        raise_length(n, off + bytes);
    account_write_end(n, align_up(off + bytes, n->bl.request_alignment));
    if (r == 0) {
        stat_add(&n->acct.zero_ops, 1);
        stat_add(&n->acct.zero_bytes, bytes);
    }
    account(n, VD_ACCT_WRITE, r, bytes, t0);
    inflight_dec(n);
    return r;
}

/* ---- discard ---- */

int vd_node_pdiscard(vd_node *n, uint64_t off, uint64_t bytes,
                     vd_error *err)
{
    int r = check_range(n, off, bytes, err);
    if (r == 0)
        r = check_writable(n, err);
    if (r < 0 || bytes == 0)
        return r;
    inflight_inc(n);
    uint64_t t0 = now_ns();
    /* Discard is advisory: shrink to whole aligned blocks. */
    uint32_t a = n->bl.request_alignment;
    if (n->bl.pdiscard_alignment > a)
        a = n->bl.pdiscard_alignment;
    uint64_t start = align_up(off, a), end = align_down(off + bytes, a);
    if (off + bytes >= (uint64_t)atomic_load(&n->total_size))
        end = align_up(off + bytes, n->bl.request_alignment);
    bool hooked = start < end &&
                  atomic_load_explicit(&n->write_hooks, memory_order_relaxed);
    if (hooked && (r = run_write_hooks(n, start, end - start, 0, err)) < 0) {
        inflight_dec(n);
        return r;
    }
    vd_node *child = filtered_child(n);
    if (start < end && !n->drv->pdiscard && child) {
        r = vd_node_pdiscard(child, start, end - start, err);
    } else if (start < end && n->drv->pdiscard) {
        /* Pieces of at most max_transfer (the vtable's contract), in
         * whole discard granules; an advisory failure ends the loop. */
        uint64_t piece = max_transfer(n);
        if (n->bl.max_pdiscard && n->bl.max_pdiscard < piece)
            piece = n->bl.max_pdiscard;
        piece = align_down(piece, a);
        if (piece == 0)
            piece = a;
        for (uint64_t pos = start; pos < end && r == 0;) {
            uint64_t len = end - pos < piece ? end - pos : piece;
            contract_range(n, pos, len);
            r = n->drv->pdiscard(n, pos, len, err);
            pos += len;
        }
    }
    atomic_fetch_add(&n->write_gen, 1);
    if (start < end && vd_node_tracks_dirty(n))
        vd_dirty_mark(n, start, end - start);
    if (r == -ENOTSUP || r == -EOPNOTSUPP)
        r = 0;
    if (hooked)
        run_after_hooks(n, NULL, start, end - start, NULL, 0, r);
    account(n, VD_ACCT_UNMAP, r, bytes, t0);
    inflight_dec(n);
    return r;
}

/* ---- hints ---- */

void vd_node_advise(vd_node *n, uint64_t off, uint64_t bytes,
                    vd_advice advice)
{
    /* Filters pass it down. */
    while (n && !n->drv->advise && filtered_child(n))
        n = filtered_child(n);
    if (!n || n->broken || bytes == 0)
        return;
    if (!n->drv->advise) {
        /* A format node: where the range lies in its files only the
         * driver knows. Starting the writeback of all they hold is
         * still what "flushed soon" asks (more than asked, and a hint);
         * dropping cache is not, as it could drop what is read next.
         * Backing files are only read. */
        if (advice != VD_ADVISE_WRITEBACK || n->read_only)
            return;
        /* In flight, as a flush walks them: the children stay. */
        inflight_inc(n);
        for (vd_child *c = n->children; c; c = c->next)
            if (!(c->role & VD_ROLE_COW))
                vd_node_advise(c->node, 0, UINT64_MAX, advice);
        inflight_dec(n);
        return;
    }
    if (advice == VD_ADVISE_WRITEBACK && n->read_only)
        return;
    inflight_inc(n);
    n->drv->advise(n, off, bytes, advice);
    inflight_dec(n);
}

/* ---- copy offloading ---- */

/* Both ranges keep both nodes' request alignment: a protocol copies
 * whole blocks or not at all. */
static bool copy_aligned(vd_node *src, uint64_t soff, vd_node *dst,
                         uint64_t doff, uint64_t bytes)
{
    uint32_t a = src->bl.request_alignment, b = dst->bl.request_alignment;
    return soff % a == 0 && bytes % a == 0 && doff % b == 0 && bytes % b == 0;
}

/* What both directions settle first: nothing to copy, a source range
 * that reads as zeros (QEMU writes zeros then, before it looks at the
 * source at all), a node that cannot copy. Returns 1 to go on, else the
 * result. */
static int copy_start(bool to, vd_node *src, uint64_t soff, vd_node *dst,
                      uint64_t doff, uint64_t bytes, unsigned flags,
                      vd_error *err)
{
    if (bytes == 0)
        return 0;
    if (flags & VD_REQ_ZERO_WRITE)
        return vd_node_pwrite_zeroes(dst, doff, bytes, 0, err);
    if (to) {
        int r = check_writable(dst, err);
        if (r < 0)
            return r;
    }
    if (!(to ? dst->drv->copy_range_to != NULL
             : src->drv->copy_range_from != NULL) ||
        !copy_aligned(src, soff, dst, doff, bytes))
        return -ENOTSUP;
    return 1;
}

int vd_node_copy_range_from(vd_node *src, uint64_t soff, vd_node *dst,
                            uint64_t doff, uint64_t bytes, unsigned flags,
                            vd_error *err)
{
    int r = copy_start(false, src, soff, dst, doff, bytes, flags, err);
    if (r <= 0)
        return r;
    inflight_inc(src);
    r = src->drv->copy_range_from(src, soff, dst, doff, bytes, flags, err);
    inflight_dec(src);
    return r;
}

int vd_node_copy_range_to(vd_node *src, uint64_t soff, vd_node *dst,
                          uint64_t doff, uint64_t bytes, unsigned flags,
                          vd_error *err)
{
    int r = copy_start(true, src, soff, dst, doff, bytes, flags, err);
    if (r <= 0)
        return r;
    /* Copy offloading bypasses what a write hook needs to see first. */
    if (atomic_load(&dst->write_hooks))
        return -ENOTSUP;
    inflight_inc(dst);
    uint64_t t0 = now_ns();
    r = dst->drv->copy_range_to(dst, src, soff, doff, bytes, flags, err);
    if (r != -ENOTSUP) {
        atomic_fetch_add(&dst->write_gen, 1);
        if (vd_node_tracks_dirty(dst))
            vd_dirty_mark(dst, doff, bytes);
        if (r == 0)
            raise_length(dst, doff + bytes);
        account_write_end(dst, doff + bytes);
        account(dst, VD_ACCT_WRITE, r, bytes, t0);
    }
    inflight_dec(dst);
    return r;
}

/* ---- flush ---- */

int vd_node_flush(vd_node *n, vd_error *err)
{
    if (n->read_only)
        return 0;
    /* A failed reopen left the driver closed: there is nothing of it to
     * write back, and its callbacks must not run on its cleared state. */
    if (n->broken)
        return check_range(n, 0, 0, err);
    inflight_inc(n);
    uint64_t t0 = now_ns();
    int r = 0;
    bool is_protocol = !n->file && !n->children;
    uint64_t gen = atomic_load(&n->write_gen);
    /* QEMU's events on the primary child: flush_to_os always, then
     * flush_to_disk unless nothing was written since the last flush. A
     * format's callback writes its caches (QEMU's flush_to_os, before
     * the second event); any other driver's syncs (flush_to_disk). A
     * format writes its caches back on every flush; a protocol node
     * that nothing reached since its last flush has nothing to make
     * stable (QEMU skips bdrv_co_flush_to_disk() then). */
    vd_node *primary = n->file ? n->file->node : NULL;
    bool to_disk = !(n->flags & VD_NODE_NO_FLUSH) &&
                   gen != atomic_load(&n->flushed_gen);
    bool clean = is_protocol && gen == atomic_load(&n->flushed_gen);
    bool synced = false;
    vd_node_debug_event_here(primary, VD_BLKDBG_FLUSH_TO_OS);
    if (!n->drv->is_format && to_disk)
        vd_node_debug_event_here(primary, VD_BLKDBG_FLUSH_TO_DISK);
    if (n->drv->flush && !clean &&
        !(is_protocol && (n->flags & VD_NODE_NO_FLUSH))) {
        r = n->drv->flush(n, err);
        synced = true;
    }
    if (r == 0 && n->drv->is_format && to_disk)
        vd_node_debug_event_here(primary, VD_BLKDBG_FLUSH_TO_DISK);
    for (vd_child *c = n->children; c && r == 0; c = c->next)
        if (!n->drv->flush_primary_only || c == n->file)
            r = vd_node_flush(c->node, err);
    if (r == 0 && (synced || !is_protocol))
        atomic_store(&n->flushed_gen, gen);
    account(n, VD_ACCT_FLUSH, r, 0, t0);
    inflight_dec(n);
    return r;
}

/* ---- length and truncate ---- */

int64_t vd_node_getlength(vd_node *n)
{
    if (!n->drv->getlength) {
        vd_node *child = n->file ? n->file->node : NULL;
        return child ? vd_node_getlength(child) : -ENOTSUP;
    }
    return atomic_load(&n->total_size);
}

int64_t vd_filter_getlength(vd_node *node)
{
    return node->file ? vd_node_getlength(node->file->node) : -ENOMEDIUM;
}

int64_t vd_node_refresh_length(vd_node *n)
{
    if (!n->drv->getlength)
        return vd_node_getlength(n);
    int64_t len = n->drv->getlength(n);
    if (len < 0)
        return len;
    /* Rounding up to a sector must not overflow (null-co size=2^63-1):
     * QEMU answers such a length with EFBIG as well. */
    if (len > INT64_MAX - 511)
        return -EFBIG;
    if (len % 512)
        len += 512 - len % 512;
    atomic_store(&n->total_size, len);
    return len;
}

int vd_node_truncate(vd_node *n, uint64_t size, bool exact,
                     vd_prealloc prealloc, vd_error *err)
{
    int r = check_writable(n, err);
    if (r < 0)
        return r;
    /* qemu's bdrv_co_truncate() takes an int64 and then checks it as a
     * request offset; same messages, no file name. */
    if (size > INT64_MAX)
        return vd_error_set(err, -EINVAL, "Image size cannot be negative");
    if (size > VD_MAX_LENGTH)
        return vd_error_set(err, -EIO, "offset(%" PRIu64 ") exceeds "
                            "maximum(%" PRIu64 ")", size, VD_MAX_LENGTH);
    vd_node *child = filtered_child(n);
    if (!n->drv->truncate) {
        if (child) {
            /* The filter's cached length follows its child's. */
            r = vd_node_truncate(child, size, exact, prealloc, err);
            if (r == 0) {
                vd_node_refresh_length(n);
                vd_bitmaps_truncate(n);
                atomic_fetch_add(&n->write_gen, 1);
            }
            return r;
        }
        /* qemu's bdrv_co_truncate() text, without a file name. */
        return vd_error_set(err, -ENOTSUP, "Image format driver does not "
                            "support resize");
    }
    r = n->drv->truncate(n, size, exact, prealloc, err);
    atomic_fetch_add(&n->write_gen, 1);
    if (r == 0) {
        vd_node_refresh_length(n);
        vd_bitmaps_truncate(n);
    }
    return r;
}

/* ---- block status ---- */

int vd_block_status_from_file(vd_node *node, bool want_zero, uint64_t off,
                              uint64_t bytes, uint64_t *pnum, uint64_t *map,
                              vd_node **file, vd_error *err)
{
    (void)want_zero;
    (void)err;
    *pnum = bytes;
    *map = off;
    *file = node->file ? node->file->node : NULL;
    return VD_BLOCK_RAW | VD_BLOCK_OFFSET_VALID;
}

int vd_node_block_status(vd_node *n, bool want_zero, uint64_t off,
                         uint64_t bytes, uint64_t *pnum, uint64_t *map,
                         vd_node **file, vd_error *err)
{
    int64_t len = vd_node_getlength(n);
    if (len < 0)
        return (int)len;
    if (off >= (uint64_t)len) {
        *pnum = bytes;
        *map = 0;
        *file = NULL;
        return VD_BLOCK_ZERO | VD_BLOCK_EOF;
    }
    bool eof = false;
    if (bytes >= (uint64_t)len - off) {
        bytes = (uint64_t)len - off;
        eof = true;
    }
    uint64_t lmap = 0;
    vd_node *lfile = NULL;
    int r;
    inflight_inc(n);
    /* The driver is asked only about a non-empty range inside the node. */
    VD_CONTRACT(bytes > 0 && off + bytes <= (uint64_t)len);
    if (n->drv->block_status) {
        r = n->drv->block_status(n, want_zero, off, bytes, pnum, &lmap,
                                 &lfile, err);
    } else if (n->file) {
        r = vd_block_status_from_file(n, want_zero, off, bytes, pnum, &lmap,
                                      &lfile, err);
    } else {
        *pnum = bytes;
        lmap = off;
        lfile = n;
        r = VD_BLOCK_DATA | VD_BLOCK_OFFSET_VALID;
    }
    inflight_dec(n);
    if (r < 0)
        return r;
    if (*pnum == 0 || *pnum > bytes)
        return vd_error_set(err, -EIO, "%s: driver '%s' returned an invalid "
                            "block status length", n->filename, n->drv->name);
    if (r & VD_BLOCK_RAW) {
        if (!lfile)
            return vd_error_set(err, -EIO, "%s: raw block status without a "
                                "file", n->filename);
        uint64_t sub = 0;
        r = vd_node_block_status(lfile, want_zero, lmap, *pnum, &sub, &lmap,
                                 &lfile, err);
        if (r < 0)
            return r;
        *pnum = sub;
        r &= ~VD_BLOCK_EOF;
    } else if (want_zero && (r & VD_BLOCK_RECURSE) &&
               (r & VD_BLOCK_DATA) && !(r & VD_BLOCK_ZERO) &&
               (r & VD_BLOCK_OFFSET_VALID) && lfile && lfile != n) {
        /* Data stored in a region of the file that is a hole reads as
         * zeros: let the file refine the answer. */
        uint64_t fnum = 0, fmap = 0;
        vd_node *ff = NULL;
        int r2 = vd_node_block_status(lfile, true, lmap, *pnum, &fnum, &fmap,
                                      &ff, NULL);
        if (r2 >= 0) {
            if ((r2 & VD_BLOCK_EOF) && (r2 & VD_BLOCK_ZERO)) {
                /* A hole (or nothing) up to the file's end, and zeros
                 * past it: the whole extent reads as zeros. */
                r |= VD_BLOCK_ZERO;
            } else {
                *pnum = fnum;
                r |= r2 & VD_BLOCK_ZERO;
            }
        }
    }
    r &= ~VD_BLOCK_RECURSE;
    if (r & (VD_BLOCK_DATA | VD_BLOCK_ZERO)) {
        r |= VD_BLOCK_ALLOCATED;
    } else if (n->drv->supports_backing) {
        /* Unallocated reads as zeros when nothing lies beneath. */
        vd_node *b = n->backing ? n->backing->node : NULL;
        if (!b || (want_zero && (int64_t)off >= vd_node_getlength(b)))
            r |= VD_BLOCK_ZERO;
    }
    if (eof && off + *pnum == (uint64_t)len)
        r |= VD_BLOCK_EOF;
    *map = lmap;
    *file = lfile;
    return r;
}

/*
 * The walk behind vd_node_block_status_above(). With @stop_at_zero the
 * walk also ends at a layer that reads as zeros without holding the
 * range (unallocated and past the end of its backing file): that is
 * qemu-img map's walk, which reports such a range at that layer as not
 * present. Without it the range is found "allocated" as zeros in the
 * short layer below, as QEMU's bdrv_is_allocated_above() sees it, which
 * commit needs to cover a base that is longer than that layer.
 */
static int status_above(vd_node *top, vd_node *base, bool want_zero,
                        bool stop_at_zero, uint64_t off, uint64_t bytes,
                        uint64_t *pnum, uint64_t *map, vd_node **file,
                        int *depth, vd_error *err)
{
    int d = 0;
    for (vd_node *p = top;;) {
        uint64_t n = 0;
        int r = vd_node_block_status(p, want_zero, off, bytes, &n, map, file,
                                     err);
        if (r < 0)
            return r;
        if (p != top && (r & VD_BLOCK_EOF) && !(r & VD_BLOCK_ALLOCATED) &&
            off >= (uint64_t)vd_node_getlength(p)) {
            /* Past the end of a shorter backing layer: zeros, as if
             * allocated there. */
            *pnum = bytes;
            *depth = d;
            *file = p;
            return VD_BLOCK_ZERO | VD_BLOCK_ALLOCATED;
        }
        /* Past the end of the top itself nothing below shows through. */
        bool top_eof = p == top && (r & VD_BLOCK_EOF) &&
                       off >= (uint64_t)vd_node_getlength(p);
        vd_node *next = p->backing ? p->backing->node : NULL;
        /* A filter shows its child's chain: go on down it (QEMU's
         * bdrv_filter_or_cow_bs()), or a mirror of a filter would take
         * what lies below the child's own layer for unallocated. The
         * step is no layer of the depth (qemu-img map skips filters). */
        bool into_filtered = false;
        if (!next && p->drv->is_filter && p->file) {
            next = p->file->node;
            into_filtered = true;
        }
        if ((r & VD_BLOCK_ALLOCATED) || !next || next == base || top_eof ||
            (stop_at_zero && (r & VD_BLOCK_ZERO))) {
            /* Decided here, or nothing below: the last layer's answer
             * stands (qemu-img map's depth is this layer's index). When
             * it says neither data nor zero, nothing is known. */
            *pnum = n;
            *depth = d;
            if (!(r & (VD_BLOCK_DATA | VD_BLOCK_ZERO)))
                r = 0;
            return r;
        }
        /* Unallocated here: the next layer decides this prefix. */
        bytes = n;
        p = next;
        if (!into_filtered)
            d++;
    }
}

int vd_node_block_status_above(vd_node *top, vd_node *base, bool want_zero,
                               uint64_t off, uint64_t bytes, uint64_t *pnum,
                               uint64_t *map, vd_node **file, int *depth,
                               vd_error *err)
{
    return status_above(top, base, want_zero, false, off, bytes, pnum, map,
                        file, depth, err);
}

/* ---- helpers for drivers ---- */

int vd_child_preadv(vd_child *c, uint64_t off, uint64_t bytes, vd_iov *qiov,
                    unsigned flags, vd_error *err)
{
    return vd_node_preadv(c->node, off, bytes, qiov, flags, err);
}

int vd_child_pwritev(vd_child *c, uint64_t off, uint64_t bytes, vd_iov *qiov,
                     unsigned flags, vd_error *err)
{
    return vd_node_pwritev(c->node, off, bytes, qiov, flags, err);
}

int vd_child_pread(vd_child *c, uint64_t off, void *buf, uint64_t bytes,
                   vd_error *err)
{
    vd_iov v;
    vd_iov_init_buf(&v, buf, bytes);
    return vd_node_preadv(c->node, off, bytes, &v, 0, err);
}

int vd_child_pwrite(vd_child *c, uint64_t off, const void *buf,
                    uint64_t bytes, unsigned flags, vd_error *err)
{
    vd_iov v;
    vd_iov_init_buf(&v, (void *)buf, bytes);
    return vd_node_pwritev(c->node, off, bytes, &v, flags, err);
}

/* ---- the public entry points ---- */

/* A write through the public API needs a user that holds the write
 * permission (the opener of a writable vd_open(), an export): a node
 * opened with VD_O_NO_USER, or one whose users gave up writing, refuses
 * instead of writing under the graph's rules. Read-only nodes answer
 * -EROFS below as before. */
static int check_write_perm(vd_node *n, vd_error *err)
{
    if (n->read_only ||
        (__atomic_load_n(&n->perm, __ATOMIC_RELAXED) & VD_PERM_WRITE))
        return 0;
    return vd_error_set(err, -EPERM, "%s: no user of node '%s' holds the "
                        "write permission", n->filename ? n->filename : "",
                        n->node_name);
}

/* The range check of the public entry points; a request it refuses
 * counts as invalid (QEMU's devices account it so) under @type
 * (VD_ACCT_MAX: not I/O, not counted). */
static int check_request(vd_node *n, vd_acct_type type, uint64_t off,
                         uint64_t len, vd_error *err)
{
    int64_t size = vd_node_getlength(n);
    if (size < 0)
        return vd_error_set(err, (int)size, "%s: could not get the image "
                            "size", n->filename);
    if (off > (uint64_t)size || len > (uint64_t)size - off) {
        if (type < VD_ACCT_MAX)
            vd_acct_invalid(n, type);
        return vd_error_set(err, -EIO, "%s: request of %" PRIu64 " bytes at "
                            "offset %" PRIu64 " is beyond the end of the "
                            "image (%" PRId64 " bytes)", n->filename, len,
                            off, size);
    }
    return 0;
}

static int top_preadv(vd_node *node, const struct iovec *iov, int iovcnt,
                      uint64_t offset, unsigned flags, vd_error *err)
{
    vd_iov v;
    vd_iov_init_external(&v, iov, iovcnt);
    int r = check_request(node, VD_ACCT_READ, offset, v.size, err);
    if (r < 0)
        return r;
    return vd_node_preadv(node, offset, v.size, &v, flags, err);
}

VD_API int vd_pread(vd_node *node, void *buf, uint64_t len, uint64_t offset,
                    unsigned flags, vd_error *err)
{
    struct iovec iov = { buf, len };
    return vd_preadv(node, &iov, 1, offset, flags, err);
}

static int top_pwritev(vd_node *node, const struct iovec *iov, int iovcnt,
                       uint64_t offset, unsigned flags, vd_error *err)
{
    vd_iov v;
    vd_iov_init_external(&v, iov, iovcnt);
    int r = check_request(node, VD_ACCT_WRITE, offset, v.size, err);
    if (r == 0)
        r = check_write_perm(node, err);
    if (r < 0)
        return r;
    if (node->writethrough)
        flags |= VD_REQ_FUA;
    if (node->detect_zeroes && !(flags & VD_REQ_COMPRESSED) &&
        vd_iov_is_zero(&v, 0, v.size)) {
        unsigned zf = flags & VD_REQ_FUA;
        if (node->detect_zeroes == 2)
            zf |= VD_REQ_MAY_UNMAP;
        return vd_node_pwrite_zeroes(node, offset, v.size, zf, err);
    }
    return vd_node_pwritev(node, offset, v.size, &v, flags, err);
}

VD_API int vd_pwrite(vd_node *node, const void *buf, uint64_t len,
                     uint64_t offset, unsigned flags, vd_error *err)
{
    struct iovec iov = { (void *)buf, len };
    return vd_pwritev(node, &iov, 1, offset, flags, err);
}

static int top_write_zeroes(vd_node *node, uint64_t len, uint64_t offset,
                            unsigned flags, vd_error *err)
{
    int r = check_request(node, VD_ACCT_WRITE, offset, len, err);
    if (r == 0)
        r = check_write_perm(node, err);
    if (r < 0)
        return r;
    if (node->writethrough)
        flags |= VD_REQ_FUA;
    return vd_node_pwrite_zeroes(node, offset, len, flags, err);
}

static int top_discard(vd_node *node, uint64_t len, uint64_t offset,
                       vd_error *err)
{
    int r = check_request(node, VD_ACCT_UNMAP, offset, len, err);
    if (r == 0)
        r = check_write_perm(node, err);
    if (r < 0)
        return r;
    return vd_node_pdiscard(node, offset, len, err);
}

static int top_flush(vd_node *node, vd_error *err)
{
    return vd_node_flush(node, err);
}

VD_API int64_t vd_getlength(vd_node *node)
{
    return vd_node_getlength(node);
}

static int top_block_status(vd_node *node, uint64_t offset, uint64_t len,
                            vd_extent *ext, vd_error *err)
{
    int r = check_request(node, VD_ACCT_MAX, offset, len, err);
    if (r < 0)
        return r;
    if (len == 0)
        return vd_error_set(err, -EINVAL, "%s: block status of an empty "
                            "range", node->filename);
    uint64_t pnum = 0, map = 0;
    vd_node *file = NULL;
    int depth = 0;
    r = status_above(node, NULL, true, true, offset, len, &pnum, &map, &file,
                     &depth, err);
    if (r < 0)
        return r;
    ext->start = offset;
    ext->length = pnum;
    ext->flags = (unsigned)r;
    ext->depth = depth;
    ext->offset = (r & VD_BLOCK_OFFSET_VALID) ? map : 0;
    ext->file = file;
    return 0;
}

/* The public entry points proper: the whole call, from the range check
 * against the image size to the last child request, counts in flight on
 * the node, so a drain (reopen, truncate, snapshot) never overlaps it. */

VD_API int vd_preadv(vd_node *node, const struct iovec *iov, int iovcnt,
                     uint64_t offset, unsigned flags, vd_error *err)
{
    request_begin(node);
    int r = top_preadv(node, iov, iovcnt, offset, flags, err);
    request_end(node);
    return r;
}

VD_API int vd_pwritev(vd_node *node, const struct iovec *iov, int iovcnt,
                      uint64_t offset, unsigned flags, vd_error *err)
{
    request_begin(node);
    int r = top_pwritev(node, iov, iovcnt, offset, flags, err);
    request_end(node);
    return r;
}

VD_API int vd_write_zeroes(vd_node *node, uint64_t len, uint64_t offset,
                           unsigned flags, vd_error *err)
{
    request_begin(node);
    int r = top_write_zeroes(node, len, offset, flags, err);
    request_end(node);
    return r;
}

VD_API int vd_discard(vd_node *node, uint64_t len, uint64_t offset,
                      vd_error *err)
{
    request_begin(node);
    int r = top_discard(node, len, offset, err);
    request_end(node);
    return r;
}

VD_API int vd_copy_range(vd_node *src, uint64_t src_off, vd_node *dst,
                         uint64_t dst_off, uint64_t len, vd_error *err)
{
    request_begin(src);
    if (dst != src)
        request_begin(dst);
    int r = check_request(src, VD_ACCT_MAX, src_off, len, err);
    if (r == 0)
        r = check_request(dst, VD_ACCT_MAX, dst_off, len, err);
    if (r == 0)
        r = check_write_perm(dst, err);
    if (r == 0 && (dst->detect_zeroes || dst->writethrough ||
                   cor_active(dst)))
        r = -ENOTSUP;   /* what the top of a graph adds to writes */
    if (r == 0)
        r = vd_node_copy_range_from(src, src_off, dst, dst_off, len, 0, err);
    if (dst != src)
        request_end(dst);
    request_end(src);
    return r;
}

VD_API int vd_flush(vd_node *node, vd_error *err)
{
    request_begin(node);
    int r = top_flush(node, err);
    request_end(node);
    return r;
}

VD_API int vd_block_status(vd_node *node, uint64_t offset, uint64_t len,
                           vd_extent *ext, vd_error *err)
{
    request_begin(node);
    int r = top_block_status(node, offset, len, ext, err);
    request_end(node);
    return r;
}

VD_API int vd_truncate_plan(vd_node *node, uint64_t size, bool allow_shrink,
                            vd_prealloc prealloc, vd_error *err)
{
    int64_t cur = vd_node_getlength(node);
    if (cur >= 0 && size < (uint64_t)cur && !allow_shrink)
        return vd_error_set(err, -EINVAL, "Use the --shrink option to "
                            "perform a shrink operation.");
    /* vd_node_truncate()'s refusals, down the filters to the driver that
     * resizes, then that driver's own. */
    for (vd_node *n = node; n; n = filtered_child(n)) {
        if (size > INT64_MAX)
            return vd_error_set(err, -EINVAL, "Image size cannot be "
                                "negative");
        if (size > VD_MAX_LENGTH)
            return vd_error_set(err, -EIO, "offset(%" PRIu64 ") exceeds "
                                "maximum(%" PRIu64 ")", size, VD_MAX_LENGTH);
        if (n->drv->truncate) {
            if (!n->drv->truncate_check)
                return 0;
            vd_node_drain_begin(node);
            int r = n->drv->truncate_check(n, size, prealloc, err);
            vd_node_drain_end(node);
            return r;
        }
    }
    return vd_error_set(err, -ENOTSUP, "Image format driver does not "
                        "support resize");
}

VD_API int vd_truncate(vd_node *node, uint64_t size, bool allow_shrink,
                       vd_prealloc prealloc, vd_error *err)
{
    int r = check_writable(node, err);
    if (r < 0)
        return r;
    int64_t cur = vd_node_getlength(node);
    if (cur >= 0 && size < (uint64_t)cur && !allow_shrink)
        return vd_error_set(err, -EINVAL, "Use the --shrink option to "
                            "perform a shrink operation.");
    if (vd_op_is_blocked(node, VD_OP_RESIZE, err))
        return -EBUSY;
    /* Resizing needs the resize permission: unless a user of the node
     * holds it already, take it for the duration, so a format above or
     * an export that relies on the size (or another process) refuses. */
    vd_user *tmp = NULL;
    if (!(node->perm & VD_PERM_RESIZE)) {
        r = vd_user_new(&tmp, node, NULL, VD_PERM_RESIZE, VD_PERM_ALL, err);
        if (r < 0)
            return r;
    }
    vd_node_drain_begin(node);
    r = vd_node_truncate(node, size, true, prealloc, err);
    vd_node_drain_end(node);
    vd_user_free(&tmp);
    return r;
}
