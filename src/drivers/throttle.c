/*
 * The "throttle" filter (QEMU 7.2's block/throttle.c): the node's reads,
 * writes, zero writes and discards go through the throttle group named
 * by its "throttle-group" option (a throttle-group object, which must
 * exist) before they reach its "file" child; flushes and block status
 * are not throttled. The leaky buckets, queues and round robin are in
 * src/core/throttle.c (docs/throttle.md). Requests wait in their own
 * thread, never fail; draining the node lets the waiting ones through
 * at once, as QEMU does.
 */
#include <errno.h>
#include <stdlib.h>

#include "core/block_int.h"
#include "core/throttle.h"

typedef struct throttle_state {
    vd_throttle_member *member;
    void *holder;              /* the group object, held while used */
} throttle_state;

static int throttle_open(vd_node *node, vd_opts *opts, unsigned flags,
                         vd_error *err)
{
    throttle_state *s = node->opaque;
    char *group = vd_opts_take(opts, "throttle-group");
    vd_throttle_group *g;

    (void)flags;
    if (!group) {
        return vd_error_set(err, -EINVAL, "Please specify a throttle group");
    }
    g = vd_throttle_group_acquire(group, &s->holder, err);
    free(group);
    if (!g) {
        return err && err->code ? err->code : -ENOENT;
    }
    s->member = vd_throttle_member_new(g);
    if (!s->member) {
        vd_throttle_group_release(s->holder);
        s->holder = NULL;
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    return 0;
}

static void throttle_close(vd_node *node)
{
    throttle_state *s = node->opaque;

    vd_throttle_member_free(s->member);
    vd_throttle_group_release(s->holder);
    s->member = NULL;
    s->holder = NULL;
}

static int throttle_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                           vd_iov *qiov, unsigned flags, vd_error *err)
{
    throttle_state *s = node->opaque;

    vd_throttle_intercept(s->member, bytes, false);
    return vd_node_preadv(node->file->node, off, bytes, qiov, flags, err);
}

static int throttle_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                            vd_iov *qiov, unsigned flags, vd_error *err)
{
    throttle_state *s = node->opaque;

    vd_throttle_intercept(s->member, bytes, true);
    return vd_node_pwritev(node->file->node, off, bytes, qiov, flags, err);
}

static int throttle_pwrite_zeroes(vd_node *node, uint64_t off, uint64_t bytes,
                                  unsigned flags, vd_error *err)
{
    throttle_state *s = node->opaque;

    vd_throttle_intercept(s->member, bytes, true);
    return vd_node_pwrite_zeroes(node->file->node, off, bytes, flags, err);
}

static int throttle_pdiscard(vd_node *node, uint64_t off, uint64_t bytes,
                             vd_error *err)
{
    throttle_state *s = node->opaque;

    vd_throttle_intercept(s->member, bytes, true);
    return vd_node_pdiscard(node->file->node, off, bytes, err);
}

static void throttle_drain_begin(vd_node *node)
{
    throttle_state *s = node->opaque;

    if (s->member) {
        vd_throttle_member_disable(s->member);
    }
}

static void throttle_drain_end(vd_node *node)
{
    throttle_state *s = node->opaque;

    if (s->member) {
        vd_throttle_member_enable(s->member);
    }
}

const vd_driver vd_driver_throttle = {
    .name = "throttle",
    .instance_size = sizeof(throttle_state),
    .is_filter = true,
    /* Compressed writes pass through to a format that takes them. */
    .supports_compressed = true,
    .open = throttle_open,
    .close = throttle_close,
    .preadv = throttle_preadv,
    .pwritev = throttle_pwritev,
    .pwrite_zeroes = throttle_pwrite_zeroes,
    .pdiscard = throttle_pdiscard,
    .getlength = vd_filter_getlength,
    .drain_begin = throttle_drain_begin,
    .drain_end = throttle_drain_end,
};
