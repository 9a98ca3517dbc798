/*
 * The stream job (QEMU's block-stream): copies into an overlay what it
 * inherits from the layers of its backing chain above a base, then makes
 * the base the overlay's backing file, in the header and in the graph.
 *
 * The copy is copy-on-read done by the job (vd_node_populate()): each
 * piece the overlay does not hold is read from the layer that does and
 * written into the overlay under a serialising request, so a guest write
 * to the same range either lands before (and the piece is then the
 * overlay's own, not copied) or waits and lands after. The overlay's
 * visible content never changes, which is why the job may run under an
 * exported, written disk. QEMU inserts a copy-on-read filter node for
 * the same purpose; vdisk keeps the graph as it is and tracks writes on
 * the overlay while the job runs.
 *
 * Permissions, as QEMU's stream: the job writes the overlay (sharing
 * reads and writes, not resizing) and keeps the intermediate layers
 * unwritten by anyone (they leave the chain at the end); every operation
 * on those nodes is blocked while the job exists.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "job_int.h"

/* QEMU's STREAM_CHUNK. */
#define STREAM_CHUNK (512 * 1024)

typedef struct stream_state {
    vd_node *top;
    vd_node *base;          /* NULL: stream the whole chain */
    char *backing_file;     /* or NULL: the base's file name */
    bool mask_protocol;
    bool reopened_rw;       /* the top was read-only before the job */
    bool cor;               /* vd_node_cor_begin() done */
} stream_state;

static int stream_run(vd_job *job, vd_error *err)
{
    stream_state *s = job->state;
    int64_t len = vd_node_getlength(s->top);
    if (len < 0)
        return vd_error_set(err, (int)len, "Could not get the length of "
                            "'%s'", vd_node_name(s->top));
    vd_job_progress_set_remaining(job, (uint64_t)len);
    if (!s->top->backing || s->top->backing->node == s->base)
        return 0;      /* nothing between: nothing to copy */

    uint8_t *buf = vd_node_blockalign(s->top, STREAM_CHUNK);
    if (!buf)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    int error = 0;
    for (uint64_t off = 0; off < (uint64_t)len;) {
        vd_block_job_ratelimit_sleep(job);
        if (vd_job_is_cancelled(job))
            break;
        /* As QEMU: one run of the same allocation at a time, at most a
         * chunk; what the top holds or nothing above the base holds is
         * passed over without counting against the speed limit. */
        uint64_t want = (uint64_t)len - off < STREAM_CHUNK
                        ? (uint64_t)len - off : STREAM_CHUNK;
        uint64_t n = 0, map = 0, copied = 0;
        vd_node *file = NULL;
        int depth = 0;
        vd_error e = VD_ERROR_INIT;
        int r = vd_node_block_status_above(s->top, s->base, false, off, want,
                                           &n, &map, &file, &depth, &e);
        if (r >= 0 && n == 0)
            n = (uint64_t)len - off;
        if (r >= 0 && (r & VD_BLOCK_ALLOCATED) && depth > 0)
            r = vd_node_populate(s->top, s->base, off, n, buf, STREAM_CHUNK,
                                 &copied, &e);
        if (r < 0) {
            vd_error_action a = vd_block_job_error_action(job, job->on_error,
                                                          true, -r);
            if (a == VD_ERROR_ACTION_STOP)
                continue;           /* the same piece after the resume */
            if (error == 0) {
                error = r;
                /* QEMU's job ends with the errno's text alone. */
                vd_error_set(err, r, "%s", strerror(-r));
            }
            if (a == VD_ERROR_ACTION_REPORT)
                break;
            n = n ? n : want;
        }
        vd_job_progress_update(job, n);
        if (copied) {
            vd_block_job_ratelimit_processed(job, copied);
            /* The overlay is flushed at the end: its disk writes
             * meanwhile. */
            vd_node_advise(s->top, off, n, VD_ADVISE_WRITEBACK);
        }
        off += n;
    }
    free(buf);
    if (error == 0 && !vd_job_is_cancelled(job)) {
        vd_error e = VD_ERROR_INIT;
        int r = vd_node_flush(s->top, &e);
        if (r < 0) {
            vd_error_set(err, r, "%s", e.message);
            return r;
        }
    }
    /* An ignored error still keeps the backing file (QEMU's rule). */
    return error;
}

/* The new backing file: in the header, then in the graph. */
static int stream_prepare(vd_job *job, vd_error *err)
{
    stream_state *s = job->state;
    vd_node *top = s->top;
    if (!top->backing)
        return 0;
    return vd_block_job_set_backing(top, s->base, s->backing_file,
                                    s->mask_protocol, err);
}

static void stream_clean(vd_job *job)
{
    stream_state *s = job->state;
    if (s->cor) {
        vd_node_cor_end(s->top);
        s->cor = false;
    }
    vd_block_job_remove_nodes(job);
    vd_block_job_restore_read_only(s->top, &s->reopened_rw);
    /* The nodes go now, not when the last reference to the job does. */
    vd_node_unref(s->base);
    vd_node_unref(s->top);
    s->base = s->top = NULL;
}

static void stream_free(vd_job *job)
{
    stream_state *s = job->state;
    if (!s)
        return;
    vd_node_unref(s->base);
    vd_node_unref(s->top);
    free(s->backing_file);
    free(s);
}

static const vd_job_driver stream_driver = {
    .type = VD_JOB_TYPE_STREAM,
    .run = stream_run,
    .prepare = stream_prepare,
    .clean = stream_clean,
    .free = stream_free,
};

static bool in_chain(vd_node *top, vd_node *base)
{
    for (vd_node *n = top->backing ? top->backing->node : NULL; n;
         n = n->backing ? n->backing->node : NULL)
        if (n == base)
            return true;
    return false;
}

VD_API int vd_stream_start(vd_job **out, vd_node *top, vd_node *base,
                           const char *backing_file, bool mask_protocol,
                           const vd_job_options *opts, vd_error *err)
{
    *out = NULL;
    if (base && !in_chain(top, base))
        return vd_error_set(err, -EINVAL, "Node '%s' is not a backing image "
                            "of '%s'", vd_node_name(base), vd_node_name(top));
    /* QEMU checks the overlay and every layer that goes away. */
    for (vd_node *n = top; n && n != base;
         n = n->backing ? n->backing->node : NULL)
        if (vd_op_is_blocked(n, VD_OP_STREAM, err))
            return -EBUSY;

    stream_state *s = calloc(1, sizeof(*s));
    if (!s || (backing_file && !(s->backing_file = strdup(backing_file)))) {
        free(s);
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    s->top = top;
    s->base = base;
    s->mask_protocol = mask_protocol;
    vd_node_ref(top);
    if (base)
        vd_node_ref(base);

    vd_job *job;
    int r = vd_block_job_create(&job, &stream_driver, s, opts, err);
    if (r < 0) {
        vd_node_unref(base);
        vd_node_unref(top);
        free(s->backing_file);
        free(s);
        return r;
    }
    r = vd_block_job_make_writable(top, &s->reopened_rw, err);
    if (r < 0)
        goto fail;
    r = vd_block_job_add_node(job, top, VD_PERM_WRITE,
                              VD_PERM_CONSISTENT_READ | VD_PERM_WRITE |
                              VD_PERM_WRITE_UNCHANGED, err);
    for (vd_node *n = top->backing ? top->backing->node : NULL;
         r == 0 && n && n != base; n = n->backing ? n->backing->node : NULL)
        r = vd_block_job_add_node(job, n, 0, VD_PERM_CONSISTENT_READ |
                                  VD_PERM_WRITE_UNCHANGED, err);
    if (r < 0)
        goto fail;
    vd_node_cor_begin(top);
    s->cor = true;
    return vd_block_job_launch(job, top, out, err);

fail:
    vd_job_early_fail(job);
    return r;
}
