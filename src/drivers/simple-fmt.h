/*
 * Helpers shared by the drivers of the simple image formats (vdi.c,
 * parallels.c, and the read-only bochs.c, cloop.c, dmg.c): a header plus
 * tables mapping guest blocks to host blocks. Little- and big-endian
 * fields, the guest request's piece passed to the file, the header
 * read, creation's protocol file, which QEMU makes empty with the options
 * the format did not take (its create converts its own options to QAPI
 * and deletes them from the list before bdrv_co_create_file, so
 * "preallocation" reaches the protocol with size 0), and QEMU's block
 * status for a format without one.
 */
#ifndef VDISK_DRIVERS_SIMPLE_FMT_H
#define VDISK_DRIVERS_SIMPLE_FMT_H

#include <errno.h>
#include <stdint.h>

#include "core/block_int.h"

static inline uint32_t fmt_rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static inline uint64_t fmt_rd64(const uint8_t *p)
{
    return (uint64_t)fmt_rd32(p) | (uint64_t)fmt_rd32(p + 4) << 32;
}

/* Big-endian fields (cloop, dmg). */
static inline uint32_t fmt_rd_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
           (uint32_t)p[2] << 8 | p[3];
}

static inline uint64_t fmt_rd_be64(const uint8_t *p)
{
    return (uint64_t)fmt_rd_be32(p) << 32 | fmt_rd_be32(p + 4);
}

static inline void fmt_wr32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}

static inline void fmt_wr64(uint8_t *p, uint64_t v)
{
    fmt_wr32(p, (uint32_t)v);
    fmt_wr32(p + 4, (uint32_t)(v >> 32));
}

/* @n bytes of @qiov from @qoff to or from @file at @host. */
static inline int fmt_file_io(vd_child *file, bool write, uint64_t host,
                              vd_iov *qiov, uint64_t qoff, uint64_t n,
                              const char *filename, vd_error *err)
{
    vd_iov sub;
    int ret = vd_iov_init_slice(&sub, qiov, qoff, n);

    if (ret < 0) {
        return vd_error_set(err, ret, "%s: out of memory", filename);
    }
    ret = write ? vd_child_pwritev(file, host, n, &sub, 0, err)
                : vd_child_preadv(file, host, n, &sub, 0, err);
    vd_iov_destroy(&sub);
    return ret;
}

/* Reads the first @len bytes of @file into @buf, zeros past its end (as
 * QEMU's short reads); returns the file's length or a negative errno. */
static inline int64_t fmt_read_head(vd_child *file, void *buf, size_t len,
                                    const char *filename, vd_error *err)
{
    int64_t flen = vd_node_getlength(file->node);
    int ret;

    if (flen < 0) {
        return vd_error_set(err, (int)flen, "%s: cannot get the file length",
                            filename);
    }
    ret = vd_child_pread(file, 0, buf,
                         (uint64_t)flen < len ? (uint64_t)flen : len, err);
    return ret < 0 ? ret : flen;
}

/* Creates the protocol file empty with what is left of @opts (the
 * format took its own), and empties @opts. */
static inline int fmt_create_file(const char *filename, vd_opts *opts,
                                  vd_error *err)
{
    vd_opts *popts = vd_opts_clone(opts);
    int ret;

    if (!popts) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", filename);
    }
    for (const char *k = vd_opts_first_key(opts); k;
         k = vd_opts_first_key(opts)) {
        vd_opts_del(opts, k);
    }
    vd_opts_set(popts, "size", "0");
    ret = vd_create_protocol(filename, popts, err);
    vd_opts_free(&popts);
    return ret;
}

/* QEMU's answer for a format without block status of its own (bochs,
 * cloop, dmg): all of it data, allocated, at no offset. */
static inline int fmt_block_status_all_data(vd_node *node, bool want_zero,
                                            uint64_t off, uint64_t bytes,
                                            uint64_t *pnum, uint64_t *map,
                                            vd_node **file, vd_error *err)
{
    (void)node;
    (void)want_zero;
    (void)off;
    (void)map;
    (void)file;
    (void)err;
    *pnum = bytes;
    return VD_BLOCK_DATA | VD_BLOCK_ALLOCATED;
}

#endif
