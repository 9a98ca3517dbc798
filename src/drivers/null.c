/*
 * The "null-co" and "null-aio" protocol drivers: a device of a given
 * size that stores nothing. Writes vanish; reads return zeros. It exists
 * for benchmarks and tests of the layers above, so every callback is as
 * cheap as it can be, apart from the optional per-request delay
 * ("latency-ns") that simulates a slow device.
 *
 * QEMU leaves the read buffer untouched unless "read-zeroes" is on; we
 * always zero it so that results are deterministic, and keep the option
 * for what block status reports (zeros known or not). Its nodes open no
 * file, so the vtable gives qemu's pseudo filename "null-co://"
 * ("null-aio://").
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/block_int.h"

#define NULL_DEFAULT_SIZE (1ull << 30)

typedef struct null_state {
    uint64_t size;
    uint64_t latency_ns;
    bool read_zeroes;
} null_state;

/* Sleeps for the configured latency, resuming after signals. */
static void null_delay(const null_state *s)
{
    struct timespec ts = {
        .tv_sec = (time_t)(s->latency_ns / 1000000000u),
        .tv_nsec = (long)(s->latency_ns % 1000000000u),
    };

    if (!s->latency_ns) {
        return;
    }
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static int null_open(vd_node *node, vd_opts *opts, unsigned flags,
                     vd_error *err)
{
    null_state *s = node->opaque;
    /* "null-co://" or "null-aio://": the driver's own name. */
    const char *only = node->drv->pseudo_filename;
    char *fname;
    int ret;

    (void)flags;
    /* The only name QEMU accepts; an option copy of it is fine too. */
    fname = vd_opts_take(opts, "filename");
    if (fname && fname[0] && strcmp(fname, only) != 0) {
        free(fname);
        return vd_error_set(err, -EINVAL, "The only allowed filename for "
                            "this driver is '%s'", only);
    }
    free(fname);
    if (node->filename && node->filename[0] &&
        strcmp(node->filename, only) != 0 &&
        strncmp(node->filename, "json:", 5) != 0) {
        return vd_error_set(err, -EINVAL, "The only allowed filename for "
                            "this driver is '%s'", only);
    }
    /* Opened from options alone (json:{"driver":"null-co"}): name it as
     * qemu does, since info and map print the name. */
    if (!node->filename && !(node->filename = strdup(only))) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }

    ret = vd_opts_take_size(opts, "size", NULL_DEFAULT_SIZE, &s->size, err);
    if (ret < 0) {
        return ret;
    }
    if (s->size > INT64_MAX) {
        return vd_error_set(err, -EINVAL, "Parameter 'size' is too large");
    }
    ret = vd_opts_take_uint(opts, "latency-ns", 0, &s->latency_ns, err);
    if (ret < 0) {
        return ret;
    }
    ret = vd_opts_take_bool(opts, "read-zeroes", false, &s->read_zeroes,
                            err);
    if (ret < 0) {
        return ret;
    }

    node->bl.request_alignment = 1;
    return 0;
}

static int null_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                       vd_iov *qiov, unsigned flags, vd_error *err)
{
    (void)off;
    (void)flags;
    (void)err;
    vd_iov_memset(qiov, 0, 0, (size_t)bytes);
    null_delay(node->opaque);
    return 0;
}

static int null_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                        vd_iov *qiov, unsigned flags, vd_error *err)
{
    (void)off;
    (void)bytes;
    (void)qiov;
    (void)flags;
    (void)err;
    null_delay(node->opaque);
    return 0;
}

/* Zeroing and discarding cost nothing; without these the core would
 * write buffers of zeros just to throw them away. */
static int null_pwrite_zeroes(vd_node *node, uint64_t off, uint64_t bytes,
                              unsigned flags, vd_error *err)
{
    (void)node;
    (void)off;
    (void)bytes;
    (void)flags;
    (void)err;
    return 0;
}

static int null_pdiscard(vd_node *node, uint64_t off, uint64_t bytes,
                         vd_error *err)
{
    (void)node;
    (void)off;
    (void)bytes;
    (void)err;
    return 0;
}

static int null_flush(vd_node *node, vd_error *err)
{
    (void)err;
    null_delay(node->opaque);
    return 0;
}

/* As QEMU: the offset is always valid; the data is known to be zero only
 * with read-zeroes=on, and only then does the extent count as present. */
static int null_block_status(vd_node *node, bool want_zero, uint64_t off,
                             uint64_t bytes, uint64_t *pnum, uint64_t *map,
                             vd_node **file, vd_error *err)
{
    null_state *s = node->opaque;

    (void)want_zero;
    (void)err;
    *pnum = bytes;
    *map = off;
    *file = node;
    if (s->read_zeroes) {
        return VD_BLOCK_OFFSET_VALID | VD_BLOCK_ZERO | VD_BLOCK_ALLOCATED;
    }
    return VD_BLOCK_OFFSET_VALID;
}

static int64_t null_getlength(vd_node *node)
{
    null_state *s = node->opaque;

    return (int64_t)s->size;
}

static int64_t null_get_allocated_size(vd_node *node)
{
    (void)node;
    return 0;
}

/* What null-co and null-aio share. */
#define NULL_DRIVER_COMMON                                                \
    .instance_size = sizeof(null_state),                                  \
    .open = null_open,                                                    \
    .preadv = null_preadv,                                                \
    .pwritev = null_pwritev,                                              \
    .pwrite_zeroes = null_pwrite_zeroes,                                  \
    .pdiscard = null_pdiscard,                                            \
    .flush = null_flush,                                                  \
    .block_status = null_block_status,                                    \
    .getlength = null_getlength,                                          \
    .get_allocated_size = null_get_allocated_size

const vd_driver vd_driver_null_co = {
    .name = "null-co",
    .pseudo_filename = "null-co://",
    .protocol_name = "null-co",
    NULL_DRIVER_COMMON,
};

/* QEMU's null-aio: the same device through its AIO interface, which a
 * thread-per-request block layer has no need to tell apart. */
const vd_driver vd_driver_null_aio = {
    .name = "null-aio",
    .pseudo_filename = "null-aio://",
    .protocol_name = "null-aio",
    NULL_DRIVER_COMMON,
};
