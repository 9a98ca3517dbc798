/*
 * The "preallocate" filter (QEMU 7.2's block/preallocate.c), meant
 * between a format and its file: when a write reaches past the end of
 * the file, the file is grown ahead of it by prealloc-size bytes
 * (default 128 MiB), rounded up to prealloc-align (default 1 MiB), with
 * a zero write that may not fall back to writing buffers (fallocate),
 * so that the file system allocates in large extents. What the format
 * sees as the length stays where its data ends (data_end); the file
 * holds the preallocated tail (file_end) until the filter loses its
 * write and resize permissions or closes, when the file is cut back to
 * data_end. A zero write into the preallocated tail costs nothing.
 *
 * The state is only kept while the filter's parents hold write and
 * resize (QEMU's has_prealloc_perms()), and then nobody else may write
 * or resize the file (child_perm unshares both). Requests that change
 * the state are serialised by one mutex.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>

#include "core/block_int.h"

typedef struct prealloc_state {
    uint64_t align, size;           /* prealloc-align, prealloc-size */
    bool valid;                     /* the three below are known */
    int64_t data_end, zero_start, file_end;
    pthread_mutex_t lock;
    bool opened;
} prealloc_state;

static bool can_write_resize(unsigned perm)
{
    return (perm & VD_PERM_WRITE) && (perm & VD_PERM_RESIZE);
}

static int prealloc_open(vd_node *node, vd_opts *opts, unsigned flags,
                         vd_error *err)
{
    prealloc_state *s = node->opaque;
    uint32_t child_align = node->file->node->bl.request_alignment;
    int ret;

    (void)flags;
    if ((ret = vd_opts_take_size(opts, "prealloc-align", 1u << 20, &s->align,
                                 err)) < 0 ||
        (ret = vd_opts_take_size(opts, "prealloc-size", 128u << 20, &s->size,
                                 err)) < 0) {
        return ret;
    }
    if (s->align % 512) {
        return vd_error_set(err, -EINVAL, "prealloc-align parameter of "
                            "preallocate filter is not aligned to 512");
    }
    if (s->align % child_align) {
        return vd_error_set(err, -EINVAL, "prealloc-align parameter of "
                            "preallocate filter is not aligned to underlying "
                            "node request alignment (%" PRIu32 ")",
                            child_align);
    }
    pthread_mutex_init(&s->lock, NULL);
    s->opened = true;
    return 0;
}

/* Gives the preallocated tail back: the file ends where the data does.
 * Lock held (or no request can run). */
static void drop_preallocation(vd_node *node, prealloc_state *s)
{
    if (s->valid && s->file_end > s->data_end &&
        vd_node_truncate(node->file->node, (uint64_t)s->data_end, true,
                         VD_PREALLOC_OFF, NULL) == 0) {
        s->file_end = s->data_end;
    }
    s->valid = false;
}

static void prealloc_close(vd_node *node)
{
    prealloc_state *s = node->opaque;

    if (!s->opened) {
        return;
    }
    drop_preallocation(node, s);
    pthread_mutex_destroy(&s->lock);
    s->opened = false;
}

/* Losing write or resize: the state would go stale, so the
 * preallocation goes now, while the file may still be resized (QEMU
 * does it in check_perm as well). */
static int prealloc_check_perm(vd_node *node, unsigned perm, unsigned shared,
                               vd_error *err)
{
    prealloc_state *s = node->opaque;

    (void)shared;
    (void)err;
    if (s->opened && !can_write_resize(perm)) {
        pthread_mutex_lock(&s->lock);
        drop_preallocation(node, s);
        pthread_mutex_unlock(&s->lock);
    }
    return 0;
}

static void prealloc_child_perm(vd_node *node, const vd_child *c,
                                unsigned perm, unsigned shared,
                                unsigned *nperm, unsigned *nshared)
{
    vd_default_child_perm(node, c, perm, shared, nperm, nshared);
    if (can_write_resize(perm)) {
        *nperm |= VD_PERM_WRITE;
        /* Nobody else may change what data_end and file_end describe. */
        *nshared &= ~(VD_PERM_WRITE | VD_PERM_RESIZE);
    }
}

/* Whether the state may be kept: the filter writes and resizes its file
 * and nobody else does. */
static bool has_prealloc_perms(vd_node *node)
{
    return can_write_resize(node->file->perm);
}

/*
 * QEMU's handle_write(): a write of [off, off+bytes) is about to go to
 * the file. Moves data_end, preallocates when it goes past file_end, and
 * returns true when a zero write (@merge_zero) needs nothing more: the
 * range lies in zeros the filter wrote. Lock held.
 */
static bool handle_write(vd_node *node, prealloc_state *s, uint64_t off,
                         uint64_t bytes, bool merge_zero)
{
    vd_node *file = node->file->node;
    int64_t end = (int64_t)(off + bytes);
    uint64_t file_align = file->bl.request_alignment;
    uint64_t align = s->align > file_align ? s->align : file_align;
    int64_t start, stop;

    if (!has_prealloc_perms(node)) {
        return false;
    }
    if (!s->valid) {
        int64_t len = vd_node_getlength(file);
        if (len < 0) {
            return false;
        }
        s->data_end = s->file_end = len;
        s->zero_start = -1;
        s->valid = true;
    }
    if (end <= s->data_end) {
        return false;
    }
    s->data_end = end;
    if (s->zero_start < 0 || !merge_zero) {
        s->zero_start = end;
    }
    if (end <= s->file_end) {
        return merge_zero && (int64_t)off >= s->zero_start;
    }
    start = merge_zero && (int64_t)off < s->file_end ? (int64_t)off
                                                     : s->file_end;
    start = (int64_t)((((uint64_t)start + file_align - 1) / file_align) *
                      file_align);
    stop = (start > end ? start : end) + (int64_t)s->size;
    stop = (int64_t)((((uint64_t)stop + align - 1) / align) * align);
    if (vd_node_pwrite_zeroes(file, (uint64_t)start, (uint64_t)(stop - start),
                              VD_REQ_NO_FALLBACK, NULL) < 0) {
        /* Nothing preallocated: the file's end is not known any more. */
        s->file_end = vd_node_getlength(file);
        if (s->file_end < 0) {
            s->valid = false;
        }
        return false;
    }
    s->file_end = stop;
    return merge_zero;
}

static int prealloc_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                            vd_iov *qiov, unsigned flags, vd_error *err)
{
    prealloc_state *s = node->opaque;

    pthread_mutex_lock(&s->lock);
    handle_write(node, s, off, bytes, false);
    pthread_mutex_unlock(&s->lock);
    return vd_node_pwritev(node->file->node, off, bytes, qiov, flags, err);
}

static int prealloc_pwrite_zeroes(vd_node *node, uint64_t off, uint64_t bytes,
                                  unsigned flags, vd_error *err)
{
    prealloc_state *s = node->opaque;
    bool done;

    pthread_mutex_lock(&s->lock);
    done = handle_write(node, s, off, bytes,
                        !(flags & ~VD_REQ_NO_FALLBACK));
    pthread_mutex_unlock(&s->lock);
    if (done) {
        return 0;
    }
    return vd_node_pwrite_zeroes(node->file->node, off, bytes, flags, err);
}

/* QEMU's preallocate_co_truncate(). */
static int prealloc_truncate(vd_node *node, uint64_t size, bool exact,
                             vd_prealloc prealloc, vd_error *err)
{
    prealloc_state *s = node->opaque;
    vd_node *file = node->file->node;
    int ret = 0;

    pthread_mutex_lock(&s->lock);
    if (s->valid && (int64_t)size > s->data_end) {
        if (prealloc == VD_PREALLOC_FALLOC && (int64_t)size <= s->file_end) {
            /* Already there: the user's preallocation now. */
            s->data_end = (int64_t)size;
            goto out;
        }
        if (prealloc != VD_PREALLOC_FALLOC && s->file_end > s->data_end) {
            ret = vd_node_truncate(file, (uint64_t)s->data_end, true,
                                   VD_PREALLOC_OFF, err);
            if (ret < 0) {
                vd_error_prepend(err, "preallocate-filter: failed to drop "
                                 "write-zero preallocation: ");
                s->valid = false;
                goto out;
            }
            s->file_end = s->data_end;
        }
        s->data_end = (int64_t)size;
    }
    ret = vd_node_truncate(file, size, exact, prealloc, err);
    if (ret < 0) {
        s->valid = false;
    } else if (has_prealloc_perms(node)) {
        s->data_end = s->file_end = (int64_t)size;
        s->zero_start = -1;
        s->valid = true;
    }
out:
    pthread_mutex_unlock(&s->lock);
    return ret;
}

/* The length the format sees: where its data ends. */
static int64_t prealloc_getlength(vd_node *node)
{
    prealloc_state *s = node->opaque;
    int64_t len;

    if (!s->opened) {
        return vd_filter_getlength(node);
    }
    pthread_mutex_lock(&s->lock);
    len = s->valid ? s->data_end : vd_filter_getlength(node);
    pthread_mutex_unlock(&s->lock);
    return len;
}

const vd_driver vd_driver_preallocate = {
    .name = "preallocate",
    .instance_size = sizeof(prealloc_state),
    .is_filter = true,
    .open = prealloc_open,
    .close = prealloc_close,
    .pwritev = prealloc_pwritev,
    .pwrite_zeroes = prealloc_pwrite_zeroes,
    .truncate = prealloc_truncate,
    .getlength = prealloc_getlength,
    .child_perm = prealloc_child_perm,
    .check_perm = prealloc_check_perm,
};
