/*
 * The driver registry: a fixed table of the drivers built into the
 * library, in probing and listing order. The references are strong so
 * that linking the static library pulls every driver in. Also what is
 * asked of the table by name: lookups, vd_driver_features(), creation
 * options, and QEMU's list of driver names (its BlockdevDriver enum).
 *
 * An entry may be probe-only: a format QEMU probes that vdisk cannot
 * open, found by name and asked when probing but without an open
 * callback, so that every path that would use it refuses with ENOTSUP
 * (vd_driver_unsupported()) and listings of what vdisk supports leave it
 * out. Every format QEMU 7.2 probes has a driver now, so none is left;
 * the rule stays for a format added to QEMU's list before vdisk's.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "core/block_int.h"

extern const vd_driver vd_driver_file;
extern const vd_driver vd_driver_host_device;
extern const vd_driver vd_driver_host_cdrom;
extern const vd_driver vd_driver_null_co;
extern const vd_driver vd_driver_null_aio;
extern const vd_driver vd_driver_raw;
extern const vd_driver vd_driver_qcow2;
extern const vd_driver vd_driver_blkdebug;
extern const vd_driver vd_driver_throttle;
extern const vd_driver vd_driver_blkverify;
extern const vd_driver vd_driver_copy_on_read;
extern const vd_driver vd_driver_copy_before_write;
extern const vd_driver vd_driver_snapshot_access;
extern const vd_driver vd_driver_compress;
extern const vd_driver vd_driver_preallocate;
/* Remote protocols (docs/remote.md), each present when the library it
 * is built on was found. */
#ifdef VDISK_HAVE_NBD_CLIENT
extern const vd_driver vd_driver_nbd;
extern const vd_driver vd_driver_nbd_tcp;
extern const vd_driver vd_driver_nbd_unix;
#endif

#ifdef VDISK_HAVE_CURL
extern const vd_driver vd_driver_http;
extern const vd_driver vd_driver_https;
extern const vd_driver vd_driver_ftp;
extern const vd_driver vd_driver_ftps;
#endif

#ifdef VDISK_HAVE_LIBSSH
extern const vd_driver vd_driver_ssh;
#endif

#ifdef VDISK_HAVE_LIBISCSI
extern const vd_driver vd_driver_iscsi;
#endif

#ifdef VDISK_HAVE_RBD
extern const vd_driver vd_driver_rbd;
#endif

extern const vd_driver vd_driver_vmdk;
extern const vd_driver vd_driver_vdi;
extern const vd_driver vd_driver_vhdx;
extern const vd_driver vd_driver_vpc;
extern const vd_driver vd_driver_qed;
extern const vd_driver vd_driver_qcow;
extern const vd_driver vd_driver_luks;
extern const vd_driver vd_driver_parallels;
extern const vd_driver vd_driver_dmg;
extern const vd_driver vd_driver_cloop;
extern const vd_driver vd_driver_bochs;

static const vd_driver *const driver_table[] = {
    &vd_driver_file,
    /* host_cdrom before host_device: both claim a CD-ROM drive, and
     * QEMU's list gives it to host_cdrom. */
    &vd_driver_host_cdrom,
    &vd_driver_host_device,
    &vd_driver_null_co,
    &vd_driver_null_aio,
    &vd_driver_raw,
    &vd_driver_qcow2,
    &vd_driver_blkdebug,   /* test filter: error and crash injection */
    &vd_driver_blkverify,  /* test filter: reads compared to a raw copy */
    &vd_driver_throttle,
    &vd_driver_copy_on_read,
    &vd_driver_copy_before_write,  /* fleecing: with snapshot-access */
    &vd_driver_snapshot_access,
    &vd_driver_compress,
    &vd_driver_preallocate,
    /* remote protocols */
#ifdef VDISK_HAVE_NBD_CLIENT
    &vd_driver_nbd,
    &vd_driver_nbd_tcp,
    &vd_driver_nbd_unix,
#endif

#ifdef VDISK_HAVE_CURL
    &vd_driver_http,
    &vd_driver_https,
    &vd_driver_ftp,
    &vd_driver_ftps,
#endif

#ifdef VDISK_HAVE_LIBSSH
    &vd_driver_ssh,
#endif

#ifdef VDISK_HAVE_LIBISCSI
    &vd_driver_iscsi,
#endif

#ifdef VDISK_HAVE_RBD
    &vd_driver_rbd,
#endif

    /* the other image formats */
    &vd_driver_vmdk,
    &vd_driver_vdi,
    &vd_driver_vhdx,
    &vd_driver_vpc,
    &vd_driver_qed,
    &vd_driver_qcow,
    &vd_driver_luks,
    &vd_driver_parallels,
    &vd_driver_dmg,
    &vd_driver_cloop,
    &vd_driver_bochs,
};
#define N_DRIVERS (sizeof(driver_table) / sizeof(driver_table[0]))

/* QEMU 7.2's BlockdevDriver enum (../shared/specs/block-core.json) as
 * Debian builds it: with HAVE_HOST_BLOCK_DEVICE and CONFIG_REPLICATION,
 * without CONFIG_BLKIO (io_uring, nvme-io_uring, virtio-blk-*). */
static const char *const qemu_driver_names[] = {
    "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop",
    "compress", "copy-before-write", "copy-on-read", "dmg", "file",
    "snapshot-access", "ftp", "ftps", "gluster", "host_cdrom",
    "host_device", "http", "https", "iscsi", "luks", "nbd", "nfs",
    "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow",
    "qcow2", "qed", "quorum", "raw", "rbd", "replication", "ssh",
    "throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat",
};

bool vd_qemu_driver_name(const char *name)
{
    for (size_t i = 0; i < sizeof(qemu_driver_names) /
                           sizeof(qemu_driver_names[0]); i++)
        if (strcmp(name, qemu_driver_names[i]) == 0)
            return true;
    return false;
}

const vd_driver *vd_driver_at(int i)
{
    return i >= 0 && (size_t)i < N_DRIVERS ? driver_table[i] : NULL;
}

const vd_driver *vd_find_driver(const char *name)
{
    if (!name)
        return NULL;
    for (size_t k = 0; k < N_DRIVERS; k++)
        if (strcmp(driver_table[k]->name, name) == 0)
            return driver_table[k];
    return NULL;
}

int vd_driver_unsupported(const vd_driver *drv, const char *filename,
                          vd_error *err)
{
    if (filename && *filename)
        return vd_error_set(err, -ENOTSUP, "%s: format '%s' is not "
                            "supported", filename, drv->name);
    return vd_error_set(err, -ENOTSUP, "format '%s' is not supported",
                        drv->name);
}

VD_API int vd_format_check(const char *format, const char *filename,
                           vd_error *err)
{
    const vd_driver *drv = vd_find_driver(format);

    if (!drv)
        return vd_error_set(err, -EINVAL, "Unknown driver '%s'",
                            format ? format : "");
    if (!drv->open)
        return vd_driver_unsupported(drv, filename, err);
    return 0;
}

VD_API unsigned vd_driver_features(const char *name)
{
    const vd_driver *d = name ? vd_find_driver(name) : NULL;
    unsigned f = name && vd_qemu_driver_name(name) ? VD_DRIVER_QEMU_NAME : 0;
    if (!d)
        return f;
    if (d->open)
        f |= VD_DRIVER_OPENS;
    if (d->is_format)
        f |= VD_DRIVER_FORMAT;
    if (d->is_filter)
        f |= VD_DRIVER_FILTER;
    /* A filter with a protocol prefix (blkdebug:, blkverify:) opens as a
     * protocol too, as in QEMU. */
    if (!d->is_format && (!d->is_filter || d->protocol_name))
        f |= VD_DRIVER_PROTOCOL;
    if (d->supports_backing)
        f |= VD_DRIVER_BACKING;
    if (d->supports_compressed)
        f |= VD_DRIVER_COMPRESSED;
    if (d->create)
        f |= VD_DRIVER_CREATE;
    if (d->amend)
        f |= VD_DRIVER_AMEND;
    if (d->no_zero_init)
        f |= VD_DRIVER_NO_ZERO_INIT;
    if (d->network)
        f |= VD_DRIVER_NETWORK;
    if (d->big_requests)
        f |= VD_DRIVER_BIG_REQUESTS;
    if (d->flat)
        f |= VD_DRIVER_FLAT;
    return f;
}

VD_API void vd_list_drivers(void (*fn)(const char *name, void *opaque),
                            void *opaque)
{
    for (size_t k = 0; k < N_DRIVERS; k++) {
        /* One name per driver: nbd has an entry per URI prefix. */
        if (!driver_table[k]->open ||
            vd_find_driver(driver_table[k]->name) != driver_table[k])
            continue;
        fn(driver_table[k]->name, opaque);
    }
}

VD_API const vd_create_option *vd_amend_options(const char *format)
{
    const vd_driver *drv = vd_find_driver(format);
    return drv && drv->open && drv->amend ? drv->amend_opts : NULL;
}

/* Merged option lists (a format's own, then its protocol's), built once
 * for each pair of format and protocol that is asked for. */
static pthread_mutex_t merged_lock = PTHREAD_MUTEX_INITIALIZER;
static vd_create_option *merged[N_DRIVERS][N_DRIVERS];

static size_t driver_index(const vd_driver *drv)
{
    size_t idx = 0;
    while (driver_table[idx] != drv)
        idx++;
    return idx;
}

static size_t count_opts(const vd_create_option *o)
{
    size_t n = 0;
    while (o && o[n].name)
        n++;
    return n;
}

/* QEMU's qemu_opts_append(): @drv's options, then those of @proto whose
 * names @drv does not have. */
static const vd_create_option *merged_options(const vd_driver *drv,
                                              const vd_driver *proto)
{
    size_t i = driver_index(drv), j = proto ? driver_index(proto) : i;
    pthread_mutex_lock(&merged_lock);
    if (!merged[i][j]) {
        size_t n = count_opts(drv->create_opts);
        size_t m = proto ? count_opts(proto->create_opts) : 0;
        vd_create_option *list = calloc(n + m + 1, sizeof(*list));
        if (list) {
            size_t k = 0;
            for (size_t a = 0; a < n; a++)
                list[k++] = drv->create_opts[a];
            for (size_t b = 0; b < m; b++) {
                bool dup = false;
                for (size_t a = 0; a < n; a++)
                    if (strcmp(drv->create_opts[a].name,
                               proto->create_opts[b].name) == 0)
                        dup = true;
                if (!dup)
                    list[k++] = proto->create_opts[b];
            }
            merged[i][j] = list;
        }
    }
    const vd_create_option *r = merged[i][j];
    pthread_mutex_unlock(&merged_lock);
    return r;
}

VD_API const vd_create_option *vd_create_options(const char *format)
{
    const vd_driver *drv = vd_find_driver(format);
    if (!drv || !drv->open)
        return NULL;
    return merged_options(drv, drv->is_format ? vd_find_driver("file")
                                              : NULL);
}

VD_API const vd_create_option *vd_create_options_for(const char *format,
                                                     const char *filename,
                                                     vd_error *err)
{
    const vd_driver *drv = vd_find_driver(format);
    if (!drv) {
        vd_error_set(err, -EINVAL, "Unknown file format '%s'",
                     format ? format : "");
        return NULL;
    }
    if (!drv->open) {
        vd_driver_unsupported(drv, NULL, err);
        return NULL;
    }
    if (!filename || !drv->is_format)
        return vd_create_options(format);
    /* As qemu-img create and convert: the protocol is found, then each
     * driver must be able to create, before any option is parsed. */
    const vd_driver *proto = vd_protocol_for_filename(filename, err);
    if (!proto)
        return NULL;
    if (!drv->create || !drv->create_opts) {
        vd_error_set(err, -ENOTSUP, "Format driver '%s' does not support "
                     "image creation", drv->name);
        return NULL;
    }
    if (!proto->create || !proto->create_opts) {
        vd_error_set(err, -ENOTSUP, "Protocol driver '%s' does not support "
                     "image creation", proto->name);
        return NULL;
    }
    return merged_options(drv, proto);
}
