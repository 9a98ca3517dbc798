/*
 * I/O throttling (docs/throttle.md): QEMU 7.2's leaky buckets
 * (util/throttle.c) and throttle groups (block/throttle-groups.c) for
 * threads instead of coroutines.
 *
 * A group is the run-time side of a throttle-group object
 * (src/objects/throttle-group.c): one set of buckets shared by the
 * nodes ("members") that use it, one queue of waiting requests per
 * member and direction (read, write), a round-robin token per direction
 * that decides which member's queue goes next, and a timer per member
 * and direction, fired by one thread per group. A request asks the
 * group before it runs (vd_throttle_intercept()) and waits in its own
 * thread until the buckets let it go; it never fails.
 */
#ifndef VDISK_CORE_THROTTLE_H
#define VDISK_CORE_THROTTLE_H

#include "internal.h"

#include <stdbool.h>
#include <stdint.h>

#include "vdisk/vdisk.h"

/* ---- leaky buckets (util/throttle.c) ---- */

typedef struct vd_leaky_bucket {
    uint64_t avg;           /* units per second, 0 = no limit */
    uint64_t max;           /* burst rate, 0 = none */
    double level;           /* units in the bucket */
    double burst_level;     /* units in the burst bucket */
    uint64_t burst_length;  /* seconds a burst may last */
} vd_leaky_bucket;

typedef struct vd_throttle_state {
    vd_leaky_bucket b[VD_THROTTLE_BUCKETS];
    uint64_t op_size;
    int64_t previous_leak;  /* ns, CLOCK_MONOTONIC */
} vd_throttle_state;

/* Takes @l's limits. @reset: empty the buckets and restart the leak
 * clock (QEMU's throttle_config()); else the levels stay (its
 * "limits" property setter). */
void vd_throttle_set_config(vd_throttle_state *ts, const vd_throttle_limits *l,
                            bool reset, int64_t now);
/* Leaks the buckets up to @now and returns how long (ns) a request in
 * direction @is_write must wait, 0 when it may go (QEMU's
 * throttle_compute_timer()). */
int64_t vd_throttle_compute_wait(vd_throttle_state *ts, bool is_write,
                                 int64_t now);
/* Counts a request of @bytes (QEMU's throttle_account()). */
void vd_throttle_account(vd_throttle_state *ts, bool is_write,
                         uint64_t bytes);
/* Whether @l limits anything. */
bool vd_throttle_enabled(const vd_throttle_limits *l);
/* CLOCK_MONOTONIC in ns. */
int64_t vd_throttle_now(void);

/* ---- groups and members (throttle.c) ---- */

typedef struct vd_throttle_group vd_throttle_group;
typedef struct vd_throttle_member vd_throttle_member;

/* A group with limits @l (NULL on ENOMEM); its timer thread starts with
 * the first member. Freed by the object that owns it once no member is
 * left. */
vd_throttle_group *vd_throttle_group_new(const vd_throttle_limits *l);
void vd_throttle_group_free(vd_throttle_group *g);
/* New limits; @restart: as QEMU's throttle_group_config() (levels reset,
 * waiting requests re-examined at once), else as its property setter
 * (levels kept). */
void vd_throttle_group_update(vd_throttle_group *g,
                              const vd_throttle_limits *l, bool restart);

/* Joins / leaves @g. A member leaves with no request of its waiting
 * (drain it first). */
vd_throttle_member *vd_throttle_member_new(vd_throttle_group *g);
void vd_throttle_member_free(vd_throttle_member *m);
/* Waits until a request of @bytes in direction @is_write may run, and
 * counts it. */
void vd_throttle_intercept(vd_throttle_member *m, uint64_t bytes,
                           bool is_write);
/* Drains: while disabled (nestable) the member's requests are not
 * throttled, and disabling lets the waiting ones go. */
void vd_throttle_member_disable(vd_throttle_member *m);
void vd_throttle_member_enable(vd_throttle_member *m);

/* ---- what src/objects/throttle-group.c provides ---- */

/* The group of throttle-group object @id, made on first use, with the
 * object held (object-del refuses it) until vd_throttle_group_release().
 * QEMU's message when there is no such group: "Throttle group 'ID' does
 * not exist". */
vd_throttle_group *vd_throttle_group_acquire(const char *id, void **holder,
                                             vd_error *err);
void vd_throttle_group_release(void *holder);

#endif
