/*
 * The commit job for an intermediate layer (QEMU's block-commit with a
 * top below the active layer): copies into a base what the layers from
 * the top down to the base's overlay hold, then drops those layers from
 * the chain: the top's overlay gets the base as its backing file, in its
 * header and in the graph.
 *
 * Nothing writes the committed layers while the job runs (they are
 * below the active layer), so a plain read of the top through the
 * chain and a write into the base is a faithful copy; what the active
 * layer above holds stays on top of it. The copy is flushed before the
 * overlay's header names the base, so a crash leaves either the old
 * chain or the new one, both showing the same disk. As in QEMU, the
 * layers between the top and the base no longer show what they showed
 * once the base has changed: they leave the chain.
 *
 * Permissions, as QEMU's commit: the job shares everything on the active
 * layer, keeps resizes off the layers that go away, and writes (and
 * resizes when it is shorter) the base, sharing reading and unchanged
 * writes. Nothing writes the layers that go away: they are nobody's
 * active layer, and the job holds the operation blockers.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "job_int.h"

/* QEMU's COMMIT_BUFFER_SIZE. */
#define COMMIT_CHUNK (512 * 1024)

typedef struct commit_state {
    vd_node *active, *top, *base;
    vd_node *base_overlay;    /* the node whose backing is @base */
    char *backing_file;       /* or NULL: the base's file name */
    bool mask_protocol;
    bool base_reopened_rw;
    vd_user *base_writer;     /* QEMU's s->base: a block backend */
} commit_state;

static vd_node *backing_of(vd_node *n)
{
    return n->backing ? n->backing->node : NULL;
}

static int commit_run(vd_job *job, vd_error *err)
{
    commit_state *s = job->state;
    int64_t len = vd_node_getlength(s->top);
    if (len < 0)
        return vd_error_set(err, (int)len, "Could not get the length of "
                            "'%s'", s->top->node_name);
    vd_job_progress_set_remaining(job, (uint64_t)len);
    int64_t base_len = vd_node_getlength(s->base);
    if (base_len < 0)
        return vd_error_set(err, (int)base_len, "Could not get the length "
                            "of '%s'", s->base->node_name);
    if (base_len < len) {
        vd_node_drain_begin(s->base);
        int r = vd_node_truncate(s->base, (uint64_t)len, false,
                                 VD_PREALLOC_OFF, err);
        vd_node_drain_end(s->base);
        if (r < 0)
            return r;
    }
    uint8_t *buf = vd_node_blockalign(s->top, COMMIT_CHUNK);
    if (!buf)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    int ret = 0;
    for (uint64_t off = 0; off < (uint64_t)len;) {
        vd_block_job_ratelimit_sleep(job);
        if (vd_job_is_cancelled(job))
            break;
        uint64_t want = (uint64_t)len - off < COMMIT_CHUNK
                        ? (uint64_t)len - off : COMMIT_CHUNK;
        uint64_t n = 0, map = 0;
        vd_node *file = NULL;
        int depth = 0;
        bool in_source = true;
        vd_error e = VD_ERROR_INIT;
        int r = vd_node_block_status_above(s->top, s->base, false, off,
                                           want, &n, &map, &file, &depth,
                                           &e);
        bool copy = r >= 0 && (r & VD_BLOCK_ALLOCATED);
        if (r >= 0 && n == 0)
            n = want;
        if (copy) {
            vd_iov v;
            vd_iov_init_buf(&v, buf, n);
            r = vd_node_preadv(s->top, off, n, &v, 0, &e);
            if (r >= 0) {
                r = vd_node_pwritev(s->base, off, n, &v, 0, &e);
                in_source = r >= 0;
            }
        }
        if (r < 0) {
            vd_error_action a = vd_block_job_error_action(job, job->on_error,
                                                          in_source, -r);
            if (a == VD_ERROR_ACTION_REPORT) {
                /* QEMU's job ends with the errno's text alone. */
                vd_error_set(err, r, "%s", strerror(-r));
                ret = r;
                break;
            }
            continue;       /* stopped or ignored: the same piece again */
        }
        vd_job_progress_update(job, n);
        if (copy) {
            vd_block_job_ratelimit_processed(job, n);
            /* The base is flushed at the end: its disk writes meanwhile. */
            vd_node_advise(s->base, off, n, VD_ADVISE_WRITEBACK);
        }
        off += n;
    }
    free(buf);
    if (ret == 0 && !vd_job_is_cancelled(job))
        ret = vd_node_flush(s->base, err);
    return ret;
}

/* The layers from the top to the base's overlay leave the chain. */
static int commit_prepare(vd_job *job, vd_error *err)
{
    commit_state *s = job->state;
    vd_node *overlay = NULL;
    for (vd_node *n = s->active; n && n != s->top; n = backing_of(n))
        overlay = n;
    if (!overlay || backing_of(overlay) != s->top)
        return vd_error_set(err, -EINVAL, "The chain of '%s' changed during "
                            "the commit", s->active->node_name);
    /* The base's writer goes before the chain changes, as QEMU's. */
    vd_user_free(&s->base_writer);
    return vd_block_job_set_backing(overlay, s->base, s->backing_file,
                                    s->mask_protocol, err);
}

static void commit_clean(vd_job *job)
{
    commit_state *s = job->state;
    vd_user_free(&s->base_writer);
    vd_block_job_remove_nodes(job);
    vd_block_job_restore_read_only(s->base, &s->base_reopened_rw);
    /* The nodes go now, not when the last reference to the job does:
     * a caller that waited for the job may close and reopen them. */
    vd_node_unref(s->active);
    vd_node_unref(s->top);
    vd_node_unref(s->base);
    s->active = s->top = s->base = NULL;
}

static void state_free(commit_state *s)
{
    vd_node_unref(s->active);
    vd_node_unref(s->top);
    vd_node_unref(s->base);
    free(s->backing_file);
    free(s);
}

static void commit_free(vd_job *job)
{
    state_free(job->state);
}

static const vd_job_driver commit_driver = {
    .type = VD_JOB_TYPE_COMMIT,
    .run = commit_run,
    .prepare = commit_prepare,
    .clean = commit_clean,
    .free = commit_free,
};

static bool chain_contains(vd_node *from, vd_node *n)
{
    for (vd_node *p = from; p; p = backing_of(p))
        if (p == n)
            return true;
    return false;
}

VD_API int vd_commit_start(vd_job **out, vd_node *active, vd_node *top,
                           vd_node *base, const char *backing_file,
                           bool mask_protocol, const vd_job_options *opts,
                           vd_error *err)
{
    *out = NULL;
    if (!chain_contains(active, top) || !chain_contains(top, base))
        return vd_error_set(err, -EINVAL, "'%s' is not in this backing file "
                            "chain", !chain_contains(active, top)
                            ? top->node_name : base->node_name);
    if (top == base)
        return vd_error_set(err, -EINVAL, "cannot commit an image into "
                            "itself");
    unsigned perm;
    vd_node_get_perm(top, &perm, NULL);
    if (top == active || (perm & VD_PERM_WRITE)) {
        /* on-error covers the base's writes too (QEMU's
         * commit_active_start() passes it as both policies). */
        vd_job_options o = *opts;
        o.on_target_error = o.on_error;
        return vd_active_commit_start(out, top, base, &o, err);
    }

    commit_state *s = calloc(1, sizeof(*s));
    if (!s || (backing_file && !(s->backing_file = strdup(backing_file)))) {
        free(s);
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    s->active = active;
    s->top = top;
    s->base = base;
    s->mask_protocol = mask_protocol;
    vd_node_ref(active);
    vd_node_ref(top);
    vd_node_ref(base);

    vd_job *job;
    int r = vd_block_job_create(&job, &commit_driver, s, opts, err);
    if (r < 0) {
        state_free(s);
        return r;
    }
    r = vd_block_job_make_writable(base, &s->base_reopened_rw, err);
    if (r < 0)
        goto fail;
    r = vd_block_job_add_node(job, active, 0, VD_PERM_ALL, err);
    /* QEMU shares writes on the layers that go away too, or a writer
     * of the base would block itself (a node that lets nobody write it
     * lets nobody write its backing file either), and its commit filter
     * reads them for the overlay; vdisk has no filter, so it shares
     * consistent reads for the overlay's readers. */
    for (vd_node *n = top; r == 0 && n != base; n = backing_of(n))
        r = vd_block_job_add_node(job, n, 0, VD_PERM_CONSISTENT_READ |
                                  VD_PERM_WRITE | VD_PERM_WRITE_UNCHANGED,
                                  err);
    /* As QEMU: the base is resized only when it is shorter. */
    int64_t base_len = vd_node_getlength(base), top_len = vd_node_getlength(top);
    unsigned base_perm = VD_PERM_CONSISTENT_READ | VD_PERM_WRITE;
    if (base_len < top_len)
        base_perm |= VD_PERM_RESIZE;
    /* The job's edge on the base blocks its operations; what writes it
     * is a user of its own, a block backend as QEMU's s->base (so that
     * blockdev-del of the base says "in use"). */
    if (r == 0)
        r = vd_block_job_add_node(job, base, 0, VD_PERM_ALL, err);
    if (r == 0)
        r = vd_user_new(&s->base_writer, base, NULL,
                        base_perm, VD_PERM_CONSISTENT_READ |
                        VD_PERM_WRITE_UNCHANGED, err);
    if (r < 0)
        goto fail;
    return vd_block_job_launch(job, top, out, err);

fail:
    vd_job_early_fail(job);
    return r;
}
