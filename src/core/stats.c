/*
 * I/O accounting: what QEMU's block/accounting.c keeps for a device
 * (BlockAcctStats), kept here for every node. io.c counts each finished
 * request with relaxed atomic additions (ops, bytes, failures, latency,
 * last access); this file holds the rest: the timed statistics over the
 * configured intervals (QEMU's TimedAverage), the latency histograms,
 * invalid and merged requests, the configuration, and the snapshot the
 * public API hands out (vd_get_block_stats(), and vd_get_stats() for
 * the original subset).
 *
 * The timed statistics and histograms are fed under the node's
 * stats_lock, and only while acct.extras says some exist, so a node
 * without them never takes the lock on the request path.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/block_int.h"

uint64_t vd_acct_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t load(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

/* ---- timed averages ----
 *
 * Two windows of @period ns, their ends half a period apart; a value
 * goes into both, and the figures come from the older one, which has
 * seen between half a period and a whole one. The period is 4/3 of the
 * interval asked for, so what is reported covers 2/3 to 4/3 of it. */

static void window_reset(vd_timed_window *w)
{
    w->min = UINT64_MAX;
    w->max = 0;
    w->sum = 0;
    w->count = 0;
}

static void timed_init(vd_timed_avg *ta, uint64_t interval_ns, int64_t now)
{
    ta->period = interval_ns / 3 * 4 + interval_ns % 3 * 4 / 3;
    ta->current = 0;
    window_reset(&ta->w[0]);
    window_reset(&ta->w[1]);
    ta->w[0].expiration = now + (int64_t)(ta->period / 2);
    ta->w[1].expiration = now + (int64_t)ta->period;
}

/* Restarts the windows that ended, each on its own grid of periods, and
 * points ta->current at the older one; returns how long it has run. */
static uint64_t timed_expire(vd_timed_avg *ta, int64_t now)
{
    for (int i = 0; i < 2; i++) {
        vd_timed_window *w = &ta->w[i];
        if (w->expiration <= now) {
            int64_t late = (now - w->expiration) % (int64_t)ta->period;
            window_reset(w);
            w->expiration = now + ((int64_t)ta->period - late);
        }
    }
    ta->current = ta->w[0].expiration < ta->w[1].expiration ? 0 : 1;
    return ta->period - (uint64_t)(ta->w[ta->current].expiration - now);
}

static void timed_account(vd_timed_avg *ta, uint64_t v, int64_t now)
{
    timed_expire(ta, now);
    for (int i = 0; i < 2; i++) {
        vd_timed_window *w = &ta->w[i];
        w->sum += v;
        w->count++;
        if (v < w->min)
            w->min = v;
        if (v > w->max)
            w->max = v;
    }
}

/* ---- the request path's locked part ---- */

static void hist_account(vd_latency_histogram *h, uint64_t v)
{
    size_t lo = 0, hi;

    if (!h->bins)
        return;
    /* The first boundary above @v is the bin's index. */
    hi = h->nbins - 1;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v < h->boundaries[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    h->bins[lo]++;
}

void vd_acct_extras(vd_node *n, vd_acct_type type, uint64_t latency_ns,
                    bool counted)
{
    int64_t now = (int64_t)vd_acct_now();

    pthread_mutex_lock(&n->stats_lock);
    hist_account(&n->acct.hist[type], latency_ns);
    if (counted) {
        for (vd_acct_interval *i = n->acct.intervals; i; i = i->next)
            timed_account(&i->lat[type], latency_ns, now);
    }
    pthread_mutex_unlock(&n->stats_lock);
}

void vd_acct_invalid(vd_node *n, vd_acct_type type)
{
    __atomic_fetch_add(&n->acct.c[type].invalid, 1, __ATOMIC_RELAXED);
    if (__atomic_load_n(&n->acct.account_invalid, __ATOMIC_RELAXED))
        __atomic_store_n(&n->acct.last_access_ns, vd_acct_now(),
                         __ATOMIC_RELAXED);
}

static void update_extras(vd_node *n)
{
    int any = n->acct.intervals != NULL;
    for (int t = 0; t < VD_ACCT_MAX; t++)
        any |= n->acct.hist[t].bins != NULL;
    __atomic_store_n(&n->acct.extras, any, __ATOMIC_RELAXED);
}

void vd_acct_cleanup(vd_node *n)
{
    while (n->acct.intervals) {
        vd_acct_interval *i = n->acct.intervals;
        n->acct.intervals = i->next;
        free(i);
    }
    for (int t = 0; t < VD_ACCT_MAX; t++) {
        free(n->acct.hist[t].boundaries);
        free(n->acct.hist[t].bins);
        memset(&n->acct.hist[t], 0, sizeof(n->acct.hist[t]));
    }
    n->acct.extras = 0;
}

/* ---- the public API ---- */

VD_API void vd_stats_account_invalid(vd_node *node, vd_acct_type type)
{
    if (node && (unsigned)type < VD_ACCT_MAX)
        vd_acct_invalid(node, type);
}

VD_API void vd_stats_account_merged(vd_node *node, vd_acct_type type,
                                    uint64_t n)
{
    if (node && (unsigned)type < VD_ACCT_MAX)
        __atomic_fetch_add(&node->acct.c[type].merged, n, __ATOMIC_RELAXED);
}

VD_API int vd_stats_setup(vd_node *node, int account_invalid,
                          int account_failed, const unsigned *intervals,
                          size_t nb_intervals, vd_error *err)
{
    vd_acct_interval *head = NULL, **tail = &head;
    int64_t now = (int64_t)vd_acct_now();

    for (size_t i = 0; i < nb_intervals; i++) {
        if (intervals[i] == 0) {
            while (head) {
                vd_acct_interval *x = head;
                head = x->next;
                free(x);
            }
            return vd_error_set(err, -EINVAL, "Invalid interval length: %u",
                                intervals[i]);
        }
        vd_acct_interval *x = calloc(1, sizeof(*x));
        if (!x) {
            while (head) {
                vd_acct_interval *y = head;
                head = y->next;
                free(y);
            }
            return vd_error_set(err, -ENOMEM, "Out of memory");
        }
        x->length = intervals[i];
        for (int t = 0; t < VD_ACCT_MAX; t++)
            timed_init(&x->lat[t], (uint64_t)intervals[i] * 1000000000ull,
                       now);
        /* Kept in the caller's order here; each then goes to the head
         * of the node's list below, newest first. */
        x->next = NULL;
        *tail = x;
        tail = &x->next;
    }
    pthread_mutex_lock(&node->stats_lock);
    if (account_invalid >= 0)
        __atomic_store_n(&node->acct.account_invalid, account_invalid != 0,
                         __ATOMIC_RELAXED);
    if (account_failed >= 0)
        __atomic_store_n(&node->acct.account_failed, account_failed != 0,
                         __ATOMIC_RELAXED);
    /* Newest first, as each is inserted at the head of QEMU's list. */
    while (head) {
        vd_acct_interval *x = head;
        head = x->next;
        x->next = node->acct.intervals;
        node->acct.intervals = x;
    }
    update_extras(node);
    pthread_mutex_unlock(&node->stats_lock);
    return 0;
}

VD_API int vd_latency_histogram_set(vd_node *node, vd_acct_type type,
                                    const uint64_t *boundaries, size_t n,
                                    vd_error *err)
{
    uint64_t *b = NULL, *bins = NULL;

    if ((unsigned)type >= VD_ACCT_MAX)
        return vd_error_set(err, -EINVAL, "Invalid accounting type %d",
                            (int)type);
    for (size_t i = 0; i < n; i++) {
        if (boundaries[i] <= (i ? boundaries[i - 1] : 0))
            return vd_error_set(err, -EINVAL, "Histogram boundaries must "
                                "be strictly increasing and above 0");
    }
    if (n) {
        b = malloc(n * sizeof(*b));
        bins = calloc(n + 1, sizeof(*bins));
        if (!b || !bins) {
            free(b);
            free(bins);
            return vd_error_set(err, -ENOMEM, "Out of memory");
        }
        memcpy(b, boundaries, n * sizeof(*b));
    }
    pthread_mutex_lock(&node->stats_lock);
    vd_latency_histogram *h = &node->acct.hist[type];
    free(h->boundaries);
    free(h->bins);
    h->nbins = n ? n + 1 : 0;
    h->boundaries = b;
    h->bins = bins;
    update_extras(node);
    pthread_mutex_unlock(&node->stats_lock);
    return 0;
}

VD_API void vd_block_stats_free(vd_block_stats **stats)
{
    vd_block_stats *s = stats ? *stats : NULL;

    if (!s)
        return;
    free(s->timed_stats);
    for (int t = 0; t < VD_ACCT_MAX; t++) {
        free(s->histogram[t].boundaries);
        free(s->histogram[t].bins);
    }
    free(s);
    *stats = NULL;
}

VD_API int vd_get_block_stats(vd_node *node, vd_block_stats **out)
{
    vd_acct *a = &node->acct;
    vd_block_stats *s = calloc(1, sizeof(*s));
    uint64_t last, now;
    size_t n = 0;

    *out = NULL;
    if (!s)
        return -ENOMEM;
    for (int t = 0; t < VD_ACCT_MAX; t++) {
        s->bytes[t] = load(&a->c[t].bytes);
        s->operations[t] = load(&a->c[t].ops);
        s->merged[t] = load(&a->c[t].merged);
        s->failed[t] = load(&a->c[t].failed);
        s->invalid[t] = load(&a->c[t].invalid);
        s->total_time_ns[t] = load(&a->c[t].time_ns);
    }
    s->wr_highest_offset = load(&a->wr_highest_offset);
    last = load(&a->last_access_ns);
    now = vd_acct_now();
    s->has_idle_time = last != 0;
    s->idle_time_ns = last && now > last ? now - last : 0;
    s->account_invalid = __atomic_load_n(&a->account_invalid,
                                         __ATOMIC_RELAXED);
    s->account_failed = __atomic_load_n(&a->account_failed,
                                        __ATOMIC_RELAXED);

    pthread_mutex_lock(&node->stats_lock);
    for (vd_acct_interval *i = a->intervals; i; i = i->next)
        n++;
    if (n && !(s->timed_stats = calloc(n, sizeof(*s->timed_stats))))
        goto oom;
    /* QEMU lists them in the order they were configured: its list is
     * newest first and each is prepended to the answer. */
    s->nb_timed_stats = n;
    size_t k = n;
    for (vd_acct_interval *i = a->intervals; i; i = i->next) {
        vd_timed_stats *ts = &s->timed_stats[--k];
        ts->interval_length = i->length;
        for (int t = 0; t < VD_ACCT_MAX; t++) {
            vd_timed_avg *ta = &i->lat[t];
            uint64_t elapsed = timed_expire(ta, (int64_t)now);
            vd_timed_window *w = &ta->w[ta->current];
            ts->min_latency_ns[t] = w->min < UINT64_MAX ? w->min : 0;
            ts->max_latency_ns[t] = w->max;
            ts->avg_latency_ns[t] = w->count ? w->sum / w->count : 0;
            ts->avg_queue_depth[t] = elapsed ? (double)w->sum / elapsed
                                             : 0.0;
        }
    }
    for (int t = 0; t < VD_ACCT_MAX; t++) {
        vd_latency_histogram *h = &a->hist[t];
        vd_latency_histogram *o = &s->histogram[t];
        if (!h->bins)
            continue;
        o->boundaries = malloc((h->nbins - 1) * sizeof(uint64_t));
        o->bins = malloc(h->nbins * sizeof(uint64_t));
        if (!o->boundaries || !o->bins)
            goto oom;
        o->nbins = h->nbins;
        memcpy(o->boundaries, h->boundaries,
               (h->nbins - 1) * sizeof(uint64_t));
        memcpy(o->bins, h->bins, h->nbins * sizeof(uint64_t));
    }
    pthread_mutex_unlock(&node->stats_lock);
    *out = s;
    return 0;

oom:
    pthread_mutex_unlock(&node->stats_lock);
    vd_block_stats_free(&s);
    return -ENOMEM;
}

VD_API void vd_get_stats(vd_node *node, vd_stats *out)
{
    vd_acct *a = &node->acct;
    uint64_t zo = load(&a->zero_ops), zb = load(&a->zero_bytes);

    memset(out, 0, sizeof(*out));
    out->rd_bytes = load(&a->c[VD_ACCT_READ].bytes);
    out->rd_operations = load(&a->c[VD_ACCT_READ].ops);
    out->failed_rd_operations = load(&a->c[VD_ACCT_READ].failed);
    out->rd_total_time_ns = load(&a->c[VD_ACCT_READ].time_ns);
    /* The write counters may run ahead of the zero ones by a request
     * in flight; never let the difference wrap. */
    uint64_t wo = load(&a->c[VD_ACCT_WRITE].ops);
    uint64_t wb = load(&a->c[VD_ACCT_WRITE].bytes);
    out->wr_operations = wo > zo ? wo - zo : 0;
    out->wr_bytes = wb > zb ? wb - zb : 0;
    out->zero_operations = zo;
    out->zero_bytes = zb;
    out->failed_wr_operations = load(&a->c[VD_ACCT_WRITE].failed);
    out->wr_total_time_ns = load(&a->c[VD_ACCT_WRITE].time_ns);
    out->flush_operations = load(&a->c[VD_ACCT_FLUSH].ops);
    out->failed_flush_operations = load(&a->c[VD_ACCT_FLUSH].failed);
    out->flush_total_time_ns = load(&a->c[VD_ACCT_FLUSH].time_ns);
    out->unmap_operations = load(&a->c[VD_ACCT_UNMAP].ops);
    out->unmap_bytes = load(&a->c[VD_ACCT_UNMAP].bytes);
    out->failed_unmap_operations = load(&a->c[VD_ACCT_UNMAP].failed);
    out->unmap_total_time_ns = load(&a->c[VD_ACCT_UNMAP].time_ns);
}
