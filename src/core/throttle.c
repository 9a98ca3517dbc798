/*
 * I/O throttling: QEMU 7.2's leaky buckets (util/throttle.c) and
 * throttle groups (block/throttle-groups.c), with threads where QEMU
 * has coroutines. The design is QEMU's; docs/throttle.md explains it.
 *
 * Buckets. Each of the six buckets (bytes and operations; total, read,
 * write) fills with what requests do and leaks at its average rate. A
 * request waits while a bucket it counts in holds more than its size:
 * a tenth of a second's worth without a burst rate, burst rate times
 * burst length with one (and then a second bucket that leaks at the
 * burst rate keeps the burst itself at that rate). The wait is the time
 * the excess takes to leak.
 *
 * Groups. The nodes of a group share its buckets. Each member keeps a
 * queue of waiting requests per direction (read, write); a round-robin
 * token per direction says whose queue goes next, so members with
 * pending requests take turns. When the buckets are full, a timer is
 * armed on the member whose request must wait, and no other request of
 * that direction in the group starts until it fires
 * (any_timer_armed); when it fires, the member's first waiting request
 * goes, counts itself and picks the next one (schedule_next()). The
 * timers of a group are fired by one thread of the group's. Requests
 * wait on a condition variable in their own thread, never fail.
 *
 * Locking: one mutex per group guards its buckets, members, queues and
 * timers; nothing else is locked under it.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/throttle.h"

#define NS_PER_SEC 1000000000.0

/* ---- leaky buckets ---- */

int64_t vd_throttle_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

bool vd_throttle_enabled(const vd_throttle_limits *l)
{
    for (int i = 0; i < VD_THROTTLE_BUCKETS; i++) {
        if (l->bucket[i].avg) {
            return true;
        }
    }
    return false;
}

void vd_throttle_set_config(vd_throttle_state *ts, const vd_throttle_limits *l,
                            bool reset, int64_t now)
{
    for (int i = 0; i < VD_THROTTLE_BUCKETS; i++) {
        vd_leaky_bucket *b = &ts->b[i];
        b->avg = l->bucket[i].avg;
        b->max = l->bucket[i].max;
        b->burst_length = l->bucket[i].burst_length ? l->bucket[i].burst_length
                                                    : 1;
        if (reset) {
            b->level = 0;
            b->burst_level = 0;
        }
    }
    ts->op_size = l->op_size;
    if (reset) {
        ts->previous_leak = now;
    }
}

static void leak_bucket(vd_leaky_bucket *b, int64_t delta_ns)
{
    double leak = (double)b->avg * (double)delta_ns / NS_PER_SEC;

    b->level = b->level > leak ? b->level - leak : 0;
    /* Bursts longer than a second need the burst bucket to keep the
     * burst at its rate. */
    if (b->burst_length > 1) {
        leak = (double)b->max * (double)delta_ns / NS_PER_SEC;
        b->burst_level = b->burst_level > leak ? b->burst_level - leak : 0;
    }
}

/* How long @extra units take to leak at @limit per second (truncated
 * to whole ns, as QEMU's throttle_do_compute_wait()). */
static int64_t time_to_leak(uint64_t limit, double extra)
{
    return (int64_t)(extra * NS_PER_SEC / (double)limit);
}

/* QEMU's throttle_compute_wait() for one bucket. */
static int64_t bucket_wait(const vd_leaky_bucket *b)
{
    double bucket_size, burst_bucket_size, extra;

    if (!b->avg) {
        return 0;
    }
    if (!b->max) {
        /* Short bursts of a tenth of a second are let through, or every
         * other request would wait. */
        bucket_size = (double)b->avg / 10;
        burst_bucket_size = 0;
    } else {
        /* With a burst rate the burst may use max * burst_length before
         * the average applies. */
        bucket_size = (double)b->max * (double)b->burst_length;
        burst_bucket_size = (double)b->max / 10;
    }
    extra = b->level - bucket_size;
    if (extra > 0) {
        return time_to_leak(b->avg, extra);
    }
    if (b->burst_length > 1) {
        extra = b->burst_level - burst_bucket_size;
        if (extra > 0) {
            return time_to_leak(b->max, extra);
        }
    }
    return 0;
}

/* The buckets a request of each direction counts in. */
static const int dir_buckets[2][4] = {
    { VD_THROTTLE_BPS_TOTAL, VD_THROTTLE_OPS_TOTAL, VD_THROTTLE_BPS_READ,
      VD_THROTTLE_OPS_READ },
    { VD_THROTTLE_BPS_TOTAL, VD_THROTTLE_OPS_TOTAL, VD_THROTTLE_BPS_WRITE,
      VD_THROTTLE_OPS_WRITE },
};

int64_t vd_throttle_compute_wait(vd_throttle_state *ts, bool is_write,
                                 int64_t now)
{
    int64_t delta = now - ts->previous_leak, wait = 0;

    ts->previous_leak = now;
    if (delta > 0) {
        for (int i = 0; i < VD_THROTTLE_BUCKETS; i++) {
            leak_bucket(&ts->b[i], delta);
        }
    }
    for (int i = 0; i < 4; i++) {
        int64_t w = bucket_wait(&ts->b[dir_buckets[is_write][i]]);
        if (w > wait) {
            wait = w;
        }
    }
    return wait;
}

void vd_throttle_account(vd_throttle_state *ts, bool is_write,
                         uint64_t bytes)
{
    /* iops-size: a request larger than it counts as several. */
    double units = ts->op_size && bytes > ts->op_size
                   ? (double)bytes / (double)ts->op_size : 1.0;

    for (int i = 0; i < 4; i++) {
        int idx = dir_buckets[is_write][i];
        vd_leaky_bucket *b = &ts->b[idx];
        double add = idx == VD_THROTTLE_BPS_TOTAL ||
                     idx == VD_THROTTLE_BPS_READ ||
                     idx == VD_THROTTLE_BPS_WRITE ? (double)bytes : units;
        b->level += add;
        if (b->burst_length > 1) {
            b->burst_level += add;
        }
    }
}

/* ---- groups ---- */

typedef struct waiter {
    bool go;
    struct waiter *next;
} waiter;

struct vd_throttle_member {
    vd_throttle_group *g;
    vd_throttle_member *next;       /* in the group, round-robin order */
    unsigned pending[2];            /* requests waiting or being woken */
    waiter *head[2], *tail[2];      /* the waiting ones, oldest first */
    int64_t timer[2];               /* when the timer fires, -1 unarmed */
    int disabled;                   /* drains in progress */
};

struct vd_throttle_group {
    pthread_mutex_t lock;
    pthread_cond_t wake;            /* waiters look at their flag */
    pthread_cond_t timer_cond;      /* the timer thread looks again */
    vd_throttle_state ts;
    vd_throttle_member *members;
    vd_throttle_member *tokens[2];
    bool any_timer_armed[2];
    pthread_t thread;
    bool thread_started;
    bool stop;
};

static vd_throttle_member *next_member(vd_throttle_member *m)
{
    return m->next ? m->next : m->g->members;
}

/* Which member's request of direction @w goes next: the one after the
 * current token that has requests waiting, or @m (QEMU's
 * next_throttle_token()). */
static vd_throttle_member *next_token(vd_throttle_member *m, int w)
{
    vd_throttle_group *g = m->g;
    vd_throttle_member *start, *token;

    /* A member being drained is not made to wait for the others. */
    if (m->pending[w] && m->disabled) {
        return m;
    }
    start = token = g->tokens[w] ? g->tokens[w] : m;
    token = next_member(token);
    while (token != start && !token->pending[w]) {
        token = next_member(token);
    }
    if (token == start && !token->pending[w]) {
        token = m;
    }
    return token;
}

static void arm_timer(vd_throttle_member *m, int w, int64_t when)
{
    m->timer[w] = when;
    m->g->any_timer_armed[w] = true;
    pthread_cond_signal(&m->g->timer_cond);
}

/* Whether @m's next request of direction @w must wait; if so a timer is
 * armed on it (QEMU's throttle_group_schedule_timer()). */
static bool schedule_timer(vd_throttle_member *m, int w)
{
    vd_throttle_group *g = m->g;
    int64_t now, wait;

    if (m->disabled) {
        return false;
    }
    if (g->any_timer_armed[w]) {
        return true;
    }
    now = vd_throttle_now();
    wait = vd_throttle_compute_wait(&g->ts, w, now);
    if (!wait) {
        return false;
    }
    if (m->timer[w] < 0) {
        arm_timer(m, w, now + wait);
    }
    g->tokens[w] = m;
    g->any_timer_armed[w] = true;
    return true;
}

/* Lets the oldest waiting request of @m in direction @w go; false when
 * none waits. */
static bool restart_queue(vd_throttle_member *m, int w)
{
    waiter *wt = m->head[w];

    if (!wt) {
        return false;
    }
    m->head[w] = wt->next;
    if (!m->head[w]) {
        m->tail[w] = NULL;
    }
    wt->go = true;
    pthread_cond_broadcast(&m->g->wake);
    return true;
}

/* After a request of @m went (or a timer fired with nothing queued):
 * starts or schedules the next request of direction @w in the group.
 * @from_request: called by a request, whose member's own queue is
 * preferred (QEMU gives preference to the current member). */
static void schedule_next(vd_throttle_member *m, int w, bool from_request)
{
    vd_throttle_member *token = next_token(m, w);

    if (!token->pending[w]) {
        return;
    }
    if (!schedule_timer(token, w)) {
        if (from_request && restart_queue(m, w)) {
            token = m;
        } else {
            /* Fire the token's timer right away. */
            arm_timer(token, w, vd_throttle_now());
        }
        m->g->tokens[w] = token;
    }
}

/* QEMU's timer_cb(): the request the timer waited for goes. */
static void timer_fire(vd_throttle_member *m, int w)
{
    m->timer[w] = -1;
    m->g->any_timer_armed[w] = false;
    if (!restart_queue(m, w)) {
        schedule_next(m, w, false);
    }
}

static void *timer_thread(void *opaque)
{
    vd_throttle_group *g = opaque;

    pthread_mutex_lock(&g->lock);
    while (!g->stop) {
        vd_throttle_member *first = NULL;
        int fw = 0;
        for (vd_throttle_member *m = g->members; m; m = m->next) {
            for (int w = 0; w < 2; w++) {
                if (m->timer[w] >= 0 &&
                    (!first || m->timer[w] < first->timer[fw])) {
                    first = m;
                    fw = w;
                }
            }
        }
        if (!first) {
            pthread_cond_wait(&g->timer_cond, &g->lock);
            continue;
        }
        int64_t when = first->timer[fw];
        if (when <= vd_throttle_now()) {
            timer_fire(first, fw);
            continue;
        }
        struct timespec ts = {
            .tv_sec = (time_t)(when / 1000000000),
            .tv_nsec = (long)(when % 1000000000),
        };
        pthread_cond_timedwait(&g->timer_cond, &g->lock, &ts);
    }
    pthread_mutex_unlock(&g->lock);
    return NULL;
}

vd_throttle_group *vd_throttle_group_new(const vd_throttle_limits *l)
{
    vd_throttle_group *g = calloc(1, sizeof(*g));
    pthread_condattr_t ca;

    if (!g) {
        return NULL;
    }
    pthread_mutex_init(&g->lock, NULL);
    pthread_cond_init(&g->wake, NULL);
    /* The timer thread's deadlines are CLOCK_MONOTONIC. */
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&g->timer_cond, &ca);
    pthread_condattr_destroy(&ca);
    vd_throttle_set_config(&g->ts, l, true, vd_throttle_now());
    return g;
}

void vd_throttle_group_free(vd_throttle_group *g)
{
    if (!g) {
        return;
    }
    pthread_mutex_lock(&g->lock);
    g->stop = true;
    pthread_cond_signal(&g->timer_cond);
    pthread_mutex_unlock(&g->lock);
    if (g->thread_started) {
        pthread_join(g->thread, NULL);
    }
    pthread_mutex_destroy(&g->lock);
    pthread_cond_destroy(&g->wake);
    pthread_cond_destroy(&g->timer_cond);
    free(g);
}

/* Lets @m's waiting requests be looked at again now (QEMU's
 * throttle_group_restart_tgm()): an armed timer fires at once, else the
 * queue restarts. Lock held. */
static void restart_member(vd_throttle_member *m)
{
    for (int w = 0; w < 2; w++) {
        if (m->timer[w] >= 0) {
            timer_fire(m, w);
        } else if (!restart_queue(m, w)) {
            schedule_next(m, w, false);
        }
    }
}

void vd_throttle_group_update(vd_throttle_group *g,
                              const vd_throttle_limits *l, bool restart)
{
    pthread_mutex_lock(&g->lock);
    vd_throttle_set_config(&g->ts, l, restart, vd_throttle_now());
    if (restart) {
        for (vd_throttle_member *m = g->members; m; m = m->next) {
            restart_member(m);
        }
    }
    pthread_mutex_unlock(&g->lock);
}

vd_throttle_member *vd_throttle_member_new(vd_throttle_group *g)
{
    vd_throttle_member *m = calloc(1, sizeof(*m));
    vd_throttle_member **p;

    if (!m) {
        return NULL;
    }
    m->g = g;
    m->timer[0] = m->timer[1] = -1;
    pthread_mutex_lock(&g->lock);
    if (!g->thread_started) {
        if (pthread_create(&g->thread, NULL, timer_thread, g) != 0) {
            pthread_mutex_unlock(&g->lock);
            free(m);
            return NULL;
        }
        g->thread_started = true;
    }
    for (p = &g->members; *p; p = &(*p)->next) {
    }
    *p = m;
    for (int w = 0; w < 2; w++) {
        if (!g->tokens[w]) {
            g->tokens[w] = m;
        }
    }
    pthread_mutex_unlock(&g->lock);
    return m;
}

void vd_throttle_member_free(vd_throttle_member *m)
{
    vd_throttle_group *g;

    if (!m) {
        return;
    }
    g = m->g;
    pthread_mutex_lock(&g->lock);
    for (int w = 0; w < 2; w++) {
        /* An armed timer of the member held the direction for the whole
         * group: let it pass on to the others first. */
        if (m->timer[w] >= 0) {
            timer_fire(m, w);
        }
        if (g->tokens[w] == m) {
            vd_throttle_member *t = next_member(m);
            g->tokens[w] = t == m ? NULL : t;
        }
    }
    for (vd_throttle_member **p = &g->members; *p; p = &(*p)->next) {
        if (*p == m) {
            *p = m->next;
            break;
        }
    }
    pthread_cond_signal(&g->timer_cond);
    pthread_mutex_unlock(&g->lock);
    free(m);
}

void vd_throttle_intercept(vd_throttle_member *m, uint64_t bytes,
                           bool is_write)
{
    vd_throttle_group *g = m->g;
    int w = is_write;

    pthread_mutex_lock(&g->lock);
    vd_throttle_member *token = next_token(m, w);
    bool must_wait = schedule_timer(token, w);
    /* Requests of a direction go in order: behind a timer, or behind
     * this member's own waiting ones. */
    if (must_wait || m->pending[w]) {
        waiter me = { false, NULL };
        m->pending[w]++;
        if (m->tail[w]) {
            m->tail[w]->next = &me;
        } else {
            m->head[w] = &me;
        }
        m->tail[w] = &me;
        while (!me.go) {
            pthread_cond_wait(&g->wake, &g->lock);
        }
        m->pending[w]--;
    }
    vd_throttle_account(&g->ts, is_write, bytes);
    schedule_next(m, w, true);
    pthread_mutex_unlock(&g->lock);
}

void vd_throttle_member_disable(vd_throttle_member *m)
{
    pthread_mutex_lock(&m->g->lock);
    if (m->disabled++ == 0) {
        restart_member(m);
    }
    pthread_mutex_unlock(&m->g->lock);
}

void vd_throttle_member_enable(vd_throttle_member *m)
{
    pthread_mutex_lock(&m->g->lock);
    /* A node reopened during its drain ends it on a new member. */
    if (m->disabled > 0) {
        m->disabled--;
    }
    pthread_mutex_unlock(&m->g->lock);
}
