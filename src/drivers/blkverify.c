/*
 * The "blkverify" filter (QEMU 7.2's block/blkverify.c), for testing a
 * format driver against a raw copy: every read goes to both the image
 * under test (child "test", format-probed) and a raw image with the same
 * guest contents (child "raw"), and the two must agree; writes go to
 * both. Opened as "blkverify:RAW:TEST" or with the raw and test options
 * (x-raw and x-image for the names).
 *
 * A disagreement is reported in QEMU's words ("blkverify: read offset=N
 * bytes=N contents mismatch at offset N", or "return value mismatch A
 * != B"). QEMU then exits the process; a library must not, so the node
 * fails the request with EIO and every request after it: nothing goes on
 * reading or writing an image that has been caught disagreeing with its
 * reference. Zero writes become writes of zeros to both (as QEMU's
 * fallback does), discards do nothing, and flushes reach both.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/block_int.h"

typedef struct blkverify_state {
    vd_child *test;
    atomic_bool failed;      /* a mismatch was found */
} blkverify_state;

/* "blkverify:RAW:TEST", as QEMU's blkverify_parse_filename(); without
 * the prefix the whole name is the test image's. */
static int parse_filename(const char *filename, char **raw, char **test,
                          vd_error *err)
{
    const char *c;

    *raw = *test = NULL;
    if (!filename) {
        return 0;
    }
    if (strncmp(filename, "blkverify:", 10) != 0) {
        *test = strdup(filename);
        return *test ? 0 : vd_error_set(err, -ENOMEM, "Out of memory");
    }
    filename += 10;
    c = strchr(filename, ':');
    if (!c) {
        return vd_error_set(err, -EINVAL, "blkverify requires raw copy and "
                            "original image path");
    }
    *raw = strndup(filename, (size_t)(c - filename));
    *test = strdup(c + 1);
    if (!*raw || !*test) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    return 0;
}

static int blkverify_open(vd_node *node, vd_opts *opts, unsigned flags,
                          vd_error *err)
{
    blkverify_state *s = node->opaque;
    char *raw = NULL, *test = NULL, *fname = vd_opts_take(opts, "filename");
    char *x_raw = vd_opts_take(opts, "x-raw");
    char *x_image = vd_opts_take(opts, "x-image");
    int ret;

    (void)flags;
    ret = parse_filename(fname ? fname : node->filename, &raw, &test, err);
    if (x_raw) {
        free(raw);
        raw = x_raw;
    }
    if (x_image) {
        free(test);
        test = x_image;
    }
    free(fname);
    /* The raw copy is the filtered child; the test image is data, and
     * probed for its format. */
    if (ret == 0 &&
        !vd_node_open_child(node, opts, "raw", raw,
                            VD_ROLE_FILTERED | VD_ROLE_PRIMARY, false, err)) {
        ret = err && err->code ? err->code : -EINVAL;
    }
    if (ret == 0 &&
        !(s->test = vd_node_open_child(node, opts, "test", test,
                                       VD_ROLE_DATA, false, err))) {
        ret = err && err->code ? err->code : -EINVAL;
    }
    free(raw);
    free(test);
    return ret;
}

static void blkverify_refresh_limits(vd_node *node)
{
    blkverify_state *s = node->opaque;

    if (!node->file || !s->test) {
        return;
    }
    /* Requests both children can take. */
    node->bl = node->file->node->bl;
    if (s->test->node->bl.request_alignment > node->bl.request_alignment) {
        node->bl.request_alignment = s->test->node->bl.request_alignment;
    }
}

static int64_t blkverify_getlength(vd_node *node)
{
    blkverify_state *s = node->opaque;

    return vd_node_getlength(s->test->node);
}

/* Reports a disagreement and stops the node for good. */
static int mismatch(vd_node *node, bool write, uint64_t off, uint64_t bytes,
                    vd_error *err, const char *what)
{
    blkverify_state *s = node->opaque;

    atomic_store(&s->failed, true);
    return vd_error_set(err, -EIO, "blkverify: %s offset=%" PRIu64
                        " bytes=%" PRIu64 " %s", write ? "write" : "read",
                        off, bytes, what);
}

/* The two children answered differently: QEMU's "return value
 * mismatch TEST != RAW". */
static int ret_mismatch(vd_node *node, bool write, uint64_t off,
                        uint64_t bytes, int ret, int raw_ret, vd_error *err)
{
    char what[64];

    snprintf(what, sizeof(what), "return value mismatch %d != %d", ret,
             raw_ret);
    vd_error_clear(err);
    return mismatch(node, write, off, bytes, err, what);
}

static int check_failed(vd_node *node, vd_error *err)
{
    blkverify_state *s = node->opaque;

    if (atomic_load(&s->failed)) {
        return vd_error_set(err, -EIO, "blkverify: %s: stopped after a "
                            "mismatch", node->filename ? node->filename : "");
    }
    return 0;
}

static int blkverify_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                            vd_iov *qiov, unsigned flags, vd_error *err)
{
    blkverify_state *s = node->opaque;
    vd_error raw_err = VD_ERROR_INIT;
    uint8_t *buf, *mine;
    vd_iov raw;
    int ret, raw_ret;

    if ((ret = check_failed(node, err)) < 0) {
        return ret;
    }
    buf = vd_node_blockalign(node->file->node, bytes);
    mine = malloc(bytes ? bytes : 1);
    if (!buf || !mine) {
        free(buf);
        free(mine);
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    ret = vd_node_preadv(s->test->node, off, bytes, qiov, flags, err);
    vd_iov_init_buf(&raw, buf, bytes);
    raw_ret = vd_node_preadv(node->file->node, off, bytes, &raw, flags,
                             &raw_err);
    if (raw_ret != ret) {
        ret = ret_mismatch(node, false, off, bytes, ret, raw_ret, err);
    } else if (ret == 0) {
        vd_iov_to_buf(qiov, 0, mine, bytes);
        for (uint64_t i = 0; i < bytes; i++) {
            if (mine[i] != buf[i]) {
                char what[64];
                snprintf(what, sizeof(what), "contents mismatch at offset "
                         "%" PRIu64, off + i);
                ret = mismatch(node, false, off, bytes, err, what);
                break;
            }
        }
    }
    free(buf);
    free(mine);
    return ret;
}

static int blkverify_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                             vd_iov *qiov, unsigned flags, vd_error *err)
{
    blkverify_state *s = node->opaque;
    vd_error raw_err = VD_ERROR_INIT;
    int ret, raw_ret;

    if ((ret = check_failed(node, err)) < 0) {
        return ret;
    }
    ret = vd_node_pwritev(s->test->node, off, bytes, qiov, flags, err);
    raw_ret = vd_node_pwritev(node->file->node, off, bytes, qiov, flags,
                              &raw_err);
    if (raw_ret != ret) {
        ret = ret_mismatch(node, true, off, bytes, ret, raw_ret, err);
    }
    return ret;
}

/* Zeros go to both as written zeros (QEMU has no zero write here). */
static int blkverify_pwrite_zeroes(vd_node *node, uint64_t off,
                                   uint64_t bytes, unsigned flags,
                                   vd_error *err)
{
    (void)node;
    (void)off;
    (void)bytes;
    (void)flags;
    (void)err;
    return -ENOTSUP;
}

/* QEMU's blkverify has no discard: it does nothing. */
static int blkverify_pdiscard(vd_node *node, uint64_t off, uint64_t bytes,
                              vd_error *err)
{
    (void)off;
    (void)bytes;
    return check_failed(node, err);
}

/* Like a driver without block status in QEMU: data, here. */
static int blkverify_block_status(vd_node *node, bool want_zero, uint64_t off,
                                  uint64_t bytes, uint64_t *pnum,
                                  uint64_t *map, vd_node **file,
                                  vd_error *err)
{
    (void)want_zero;
    (void)err;
    *pnum = bytes;
    *map = off;
    *file = node;
    return VD_BLOCK_DATA | VD_BLOCK_OFFSET_VALID;
}

const vd_driver vd_driver_blkverify = {
    .name = "blkverify",
    .protocol_name = "blkverify",
    .instance_size = sizeof(blkverify_state),
    .is_filter = true,
    .opens_children = true,
    .open = blkverify_open,
    .preadv = blkverify_preadv,
    .pwritev = blkverify_pwritev,
    .pwrite_zeroes = blkverify_pwrite_zeroes,
    .pdiscard = blkverify_pdiscard,
    .block_status = blkverify_block_status,
    .getlength = blkverify_getlength,
    .refresh_limits = blkverify_refresh_limits,
};
