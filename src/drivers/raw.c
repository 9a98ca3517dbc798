/*
 * The "raw" format driver: the guest sees the bytes of its file child
 * unchanged, optionally through a window [offset, offset+size) of it.
 *
 * Organisation: the probed-image guard for sector 0, the window
 * (options, validation, translating requests), then the callbacks, which
 * each shift the request by the window's offset and hand it to the
 * child, the child permissions, measure and create. The vtable declares
 * the guard (guard_when_probed) and that get_info is the file child's.
 *
 * The guard: when the format was guessed by probing, a guest could write
 * another format's header into sector 0 and, on the next probing open,
 * get the host to interpret the image as that format (and follow, say, a
 * backing file name of the guest's choosing). As QEMU does, a probed raw
 * node works in whole sectors and refuses a write that would make sector
 * 0 look like anything but raw.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "core/block_int.h"

/* Bytes the format probes look at (QEMU's BLOCK_PROBE_BUF_SIZE). */
#define RAW_PROBE_SIZE 512

extern const vd_driver vd_driver_raw;

typedef struct raw_state {
    uint64_t offset;    /* where the window starts in the child */
    uint64_t size;      /* window length when has_size */
    bool has_size;
} raw_state;

/* ---------------------------------------------------------------- */
/* Probing guard                                                    */
/* ---------------------------------------------------------------- */

/*
 * True when QEMU's probing (whose probes see the same first sector) would
 * take @buf for a format other than raw. Every format QEMU probes has an
 * entry in the registry (a driver), so asking
 * every registered probe is asking QEMU's: a file written through vdisk
 * never becomes another format for a QEMU that opens it later. As QEMU's
 * guard, no file name is given (dmg goes by name alone).
 */
static bool sector0_is_foreign(const uint8_t *buf)
{
    const vd_driver *drv;

    for (int i = 0; (drv = vd_driver_at(i)) != NULL; i++) {
        if (drv != &vd_driver_raw && drv->probe &&
            drv->probe(buf, RAW_PROBE_SIZE, NULL) > 0) {
            return true;
        }
    }
    return false;
}

/*
 * Checks the sector 0 that a write at @off would leave behind. @buf
 * receives that sector. Returns 0, -EPERM, or a read error.
 */
static int check_sector0(vd_node *node, uint64_t off, uint64_t bytes,
                         vd_iov *qiov, uint8_t *buf, vd_error *err)
{
    raw_state *s = node->opaque;
    uint64_t end = off + bytes < RAW_PROBE_SIZE ? off + bytes
                                                : RAW_PROBE_SIZE;
    int ret;

    if (off > 0 || end < RAW_PROBE_SIZE) {
        /* Only a misaligned caller gets here: probed nodes ask the core
         * for whole sectors. Merge with what is there. */
        ret = vd_child_pread(node->file, s->offset, buf, RAW_PROBE_SIZE,
                             err);
        if (ret < 0) {
            return ret;
        }
    }
    vd_iov_to_buf(qiov, 0, buf + off, (size_t)(end - off));

    if (sector0_is_foreign(buf)) {
        return vd_error_set(err, -EPERM,
                            "%s: write to sector 0 of an image probed as raw "
                            "would change its format; specify the format "
                            "'raw' explicitly to allow it", node->filename);
    }
    return 0;
}

/* ---------------------------------------------------------------- */
/* Window                                                           */
/* ---------------------------------------------------------------- */

/*
 * Moves a request into the child. Requests past an explicit size are
 * refused so that nothing leaks out of the window (-ENOSPC for writes,
 * as QEMU, since a write there means the parent ran out of room).
 */
static int raw_adjust(vd_node *node, uint64_t *off, uint64_t bytes,
                      bool is_write, vd_error *err)
{
    raw_state *s = node->opaque;

    if (*off > INT64_MAX - s->offset) {
        return vd_error_set(err, -EINVAL,
                            "%s: offset %" PRIu64 " is out of range",
                            node->filename, *off);
    }
    if (s->has_size && (*off > s->size || bytes > s->size - *off)) {
        return vd_error_set(err, is_write ? -ENOSPC : -EINVAL,
                            "%s: request at %" PRIu64 " for %" PRIu64
                            " bytes is outside the %" PRIu64 "-byte window",
                            node->filename, *off, bytes, s->size);
    }
    *off += s->offset;
    return 0;
}

static void raw_refresh_limits(vd_node *node)
{
    vd_node *child = node->file ? node->file->node : NULL;

    /* The child does its own alignment; a probed image works in whole
     * sectors so that sector 0 is always written complete. */
    node->bl.request_alignment = node->probed_raw ? RAW_PROBE_SIZE : 1;
    if (child) {
        node->bl.min_mem_alignment = child->bl.min_mem_alignment;
        node->bl.pdiscard_alignment = child->bl.pdiscard_alignment;
        node->bl.pwrite_zeroes_alignment = child->bl.pwrite_zeroes_alignment;
    }
}

static int raw_open(vd_node *node, vd_opts *opts, unsigned flags,
                    vd_error *err)
{
    raw_state *s = node->opaque;
    int64_t real_size;
    int ret;

    (void)flags;
    if (!node->file) {
        return vd_error_set(err, -EINVAL,
                            "The 'raw' driver needs a file child");
    }

    s->has_size = vd_opts_get(opts, "size") != NULL;
    ret = vd_opts_take_size(opts, "offset", 0, &s->offset, err);
    if (ret < 0) {
        return ret;
    }
    ret = vd_opts_take_size(opts, "size", 0, &s->size, err);
    if (ret < 0) {
        return ret;
    }

    real_size = vd_node_getlength(node->file->node);
    if (real_size < 0) {
        return vd_error_set_errno(err, (int)real_size,
                                  "Could not get the size of '%s'",
                                  node->filename);
    }
    /* QEMU's messages, its double space included. */
    if (s->offset > (uint64_t)real_size) {
        return vd_error_set(err, -EINVAL,
                            "Offset (%" PRIu64 ") cannot be greater than size "
                            "of the containing file (%" PRId64 ")",
                            s->offset, real_size);
    }
    if (s->has_size && (uint64_t)real_size - s->offset < s->size) {
        return vd_error_set(err, -EINVAL,
                            "The sum of offset (%" PRIu64 ") and size (%"
                            PRIu64 ") has to be smaller or equal to the  "
                            "actual size of the containing file (%" PRId64
                            ")", s->offset, s->size, real_size);
    }
    /* Keeps getlength a whole number of sectors when a size is given. */
    if (s->has_size && s->size % 512) {
        return vd_error_set(err, -EINVAL,
                            "Specified size is not multiple of 512");
    }

    raw_refresh_limits(node);
    return 0;
}

/* ---------------------------------------------------------------- */
/* Callbacks                                                        */
/* ---------------------------------------------------------------- */

static int raw_probe(const uint8_t *buf, size_t len, const char *filename)
{
    (void)buf;
    (void)len;
    (void)filename;
    return 1;   /* anything is raw, if nothing better claims it */
}

static int raw_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                      vd_iov *qiov, unsigned flags, vd_error *err)
{
    int ret = raw_adjust(node, &off, bytes, false, err);

    if (ret < 0) {
        return ret;
    }
    /* QEMU's raw format announces its data requests to blkdebug. */
    vd_node_debug_event(node->file->node, VD_BLKDBG_READ_AIO);
    return vd_child_preadv(node->file, off, bytes, qiov, flags, err);
}

static int raw_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                       vd_iov *qiov, unsigned flags, vd_error *err)
{
    uint64_t child_off = off;
    uint8_t *sector0 = NULL;
    vd_iov checked;
    bool use_checked = false;
    int ret;

    ret = raw_adjust(node, &child_off, bytes, true, err);
    if (ret < 0) {
        return ret;
    }

    if (node->probed_raw && off < RAW_PROBE_SIZE && bytes > 0) {
        sector0 = vd_node_blockalign(node, RAW_PROBE_SIZE);
        if (!sector0) {
            return vd_error_set(err, -ENOMEM, "%s: out of memory",
                                node->filename);
        }
        ret = check_sector0(node, off, bytes, qiov, sector0, err);
        if (ret < 0) {
            goto out;
        }
        /* Write the sector that was checked, not the caller's buffer,
         * which a guest could change between the check and the write. */
        if (off == 0 && bytes >= RAW_PROBE_SIZE) {
            vd_iov_init(&checked);
            ret = vd_iov_add(&checked, sector0, RAW_PROBE_SIZE);
            if (ret == 0 && bytes > RAW_PROBE_SIZE) {
                vd_iov rest;

                ret = vd_iov_init_slice(&rest, qiov, RAW_PROBE_SIZE,
                                        (size_t)bytes - RAW_PROBE_SIZE);
                if (ret == 0) {
                    for (int j = 0; ret == 0 && j < rest.niov; j++) {
                        ret = vd_iov_add(&checked, rest.iov[j].iov_base,
                                         rest.iov[j].iov_len);
                    }
                    vd_iov_destroy(&rest);
                }
            }
            if (ret < 0) {
                vd_iov_destroy(&checked);
                ret = vd_error_set(err, -ENOMEM, "%s: out of memory",
                                   node->filename);
                goto out;
            }
            use_checked = true;
        }
    }

    vd_node_debug_event(node->file->node, VD_BLKDBG_WRITE_AIO);
    ret = vd_child_pwritev(node->file, child_off, bytes,
                           use_checked ? &checked : qiov, flags, err);
    if (use_checked) {
        vd_iov_destroy(&checked);
    }
out:
    free(sector0);
    return ret;
}

static int raw_pwrite_zeroes(vd_node *node, uint64_t off, uint64_t bytes,
                             unsigned flags, vd_error *err)
{
    int ret = raw_adjust(node, &off, bytes, true, err);

    if (ret < 0) {
        return ret;
    }
    return vd_node_pwrite_zeroes(node->file->node, off, bytes, flags, err);
}

static int raw_pdiscard(vd_node *node, uint64_t off, uint64_t bytes,
                        vd_error *err)
{
    int ret = raw_adjust(node, &off, bytes, true, err);

    if (ret < 0) {
        return ret;
    }
    return vd_node_pdiscard(node->file->node, off, bytes, err);
}

static int raw_block_status(vd_node *node, bool want_zero, uint64_t off,
                            uint64_t bytes, uint64_t *pnum, uint64_t *map,
                            vd_node **file, vd_error *err)
{
    raw_state *s = node->opaque;

    (void)want_zero;
    (void)err;
    *pnum = bytes;
    *map = off + s->offset;
    *file = node->file->node;
    return VD_BLOCK_RAW | VD_BLOCK_OFFSET_VALID;
}

static int64_t raw_getlength(vd_node *node)
{
    raw_state *s = node->opaque;
    int64_t len = vd_node_getlength(node->file->node);

    if (len < 0) {
        return len;
    }
    /* The child may have shrunk under us: never reach past its end. */
    if ((uint64_t)len < s->offset) {
        return 0;
    }
    len -= (int64_t)s->offset;
    if (s->has_size && s->size < (uint64_t)len) {
        return (int64_t)s->size;
    }
    return len;
}

static int raw_truncate(vd_node *node, uint64_t size, bool exact,
                        vd_prealloc prealloc, vd_error *err)
{
    raw_state *s = node->opaque;

    if (s->has_size) {
        return vd_error_set(err, -ENOTSUP,
                            "%s: Cannot resize fixed-size raw disks",
                            node->filename);
    }
    if (size > INT64_MAX - s->offset) {
        return vd_error_set(err, -EINVAL,
                            "%s: Disk size too large for the chosen offset",
                            node->filename);
    }
    return vd_node_truncate(node->file->node, size + s->offset, exact,
                            prealloc, err);
}

static int raw_create(const char *filename, vd_opts *opts, vd_error *err)
{
    return vd_create_protocol(filename, opts, err);
}

/* Raw's own list, as "qemu-img create -f raw -o help" prints it; the
 * protocol's options (preallocation, ...) come from the file driver. */
static const vd_create_option raw_create_opts[] = {
    { "size", "size", "Virtual disk size", NULL },
    { NULL, NULL, NULL, NULL },
};

/* raw needs exactly the virtual size, allocated or not. */
static int raw_measure(vd_opts *opts, vd_node *src, vd_measure_result *out,
                       vd_error *err)
{
    uint64_t size = 0;
    char *v = vd_opts_take(opts, "size");

    memset(out, 0, sizeof(*out));
    if (src) {
        int64_t len = vd_getlength(src);
        free(v);
        if (len < 0) {
            return vd_error_set_errno(err, (int)len, "Unable to get image "
                                      "size");
        }
        size = (uint64_t)len;
    } else {
        int r = v ? vd_parse_size_u64(v, &size) : 0;
        /* qemu's texts: junk, or past 2^64 - 1 (QemuOpts' range). */
        if (r == -ERANGE) {
            vd_error_set(err, -EINVAL, "Value '%s' is out of range for "
                         "parameter 'size'", v);
            free(v);
            return -EINVAL;
        } else if (r < 0) {
            free(v);
            return vd_error_set(err, -EINVAL, "Parameter 'size' expects a "
                                "non-negative number below 2^64");
        }
        free(v);
        /* Rounded up in 64 bits, as QEMU's ROUND_UP() (2^64 - 1 wraps). */
        size = (size + 511) & ~511ull;
    }
    out->required = size;
    out->fully_allocated = size;
    return 0;
}

/*
 * Without a window raw is a filter: its users' permissions go to the
 * file unchanged (two writers on a raw image are allowed, as in QEMU).
 * With a window it is a format over guest data: nobody may resize the
 * file under the window, but it writes and resizes only when its own
 * users do.
 */
static void raw_child_perm(vd_node *node, const vd_child *c, unsigned perm,
                           unsigned shared, unsigned *nperm,
                           unsigned *nshared)
{
    raw_state *s = node->opaque;
    vd_child data = *c;

    data.role = (s->offset || s->has_size) ? VD_ROLE_DATA | VD_ROLE_PRIMARY
                                           : VD_ROLE_FILTERED | VD_ROLE_PRIMARY;
    vd_default_child_perm(node, &data, perm, shared, nperm, nshared);
    *nperm &= ~(VD_PERM_WRITE | VD_PERM_RESIZE);
    *nperm |= perm & (VD_PERM_WRITE | VD_PERM_RESIZE);
}

/* Copy offloading passes through the window; sector 0 of a probed
 * image is guarded, so a copy there is done by writes (-ENOTSUP). */
static int raw_copy_range_from(vd_node *node, uint64_t soff, vd_node *dst,
                               uint64_t doff, uint64_t bytes, unsigned flags,
                               vd_error *err)
{
    int ret = raw_adjust(node, &soff, bytes, false, err);

    if (ret < 0) {
        return ret;
    }
    return vd_node_copy_range_from(node->file->node, soff, dst, doff, bytes,
                                   flags, err);
}

static int raw_copy_range_to(vd_node *node, vd_node *src, uint64_t soff,
                             uint64_t doff, uint64_t bytes, unsigned flags,
                             vd_error *err)
{
    int ret;

    if (node->probed_raw && doff < RAW_PROBE_SIZE) {
        return -ENOTSUP;
    }
    ret = raw_adjust(node, &doff, bytes, true, err);
    if (ret < 0) {
        return ret;
    }
    return vd_node_copy_range_to(src, soff, node->file->node, doff, bytes,
                                 flags, err);
}

const vd_driver vd_driver_raw = {
    .child_perm = raw_child_perm,
    .measure = raw_measure,
    .name = "raw",
    .instance_size = sizeof(raw_state),
    .is_format = true,
    .flat = true,
    .info_from_file = true,    /* as qemu's raw_get_info() */
    .guard_when_probed = true, /* the probing fallback guards sector 0 */
    .create_opts = raw_create_opts,
    .probe = raw_probe,
    .open = raw_open,
    .create = raw_create,
    .preadv = raw_preadv,
    .pwritev = raw_pwritev,
    .pwrite_zeroes = raw_pwrite_zeroes,
    .pdiscard = raw_pdiscard,
    .copy_range_from = raw_copy_range_from,
    .copy_range_to = raw_copy_range_to,
    .block_status = raw_block_status,
    .getlength = raw_getlength,
    .truncate = raw_truncate,
    .refresh_limits = raw_refresh_limits,
};
