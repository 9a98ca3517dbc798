/*
 * The QMP command table and the argument checker derived from it.
 *
 * Every command is described once, below, by its name, the schema of its
 * arguments (QEMU's names and types, from ../shared/specs/block-core.json
 * and ../shared/specs/block-export.json; object-add's and the qom-*
 * commands' from QEMU 7.2's qom.json; object-add's members are the
 * library's object registry's to check) and its handler. Dispatch, argument validation, query-commands and docs/qmp.md
 * all follow this table.
 *
 * Validation walks the schema in order, as QEMU's input visitor does: the
 * first missing or mistyped member is reported, then any member the
 * schema does not know. Messages are QEMU's. Command-line ("keyval")
 * input carries only strings, so in that mode booleans and integers are
 * parsed from strings and replaced by typed values in place.
 *
 * The end of the file turns a command-line option value (JSON or
 * key=value,a.b=value) into a JSON object for the same checker.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qmp-int.h"

/* ---- argument schemas ---- */

static const char *const discard_enum[] = { "ignore", "unmap", NULL };
static const char *const dz_enum[] = { "off", "on", "unmap", NULL };
static const char *const locking_enum[] = { "auto", "on", "off", NULL };
static const char *const aio_enum[] = { "threads", "native", "io_uring",
                                        NULL };
/* The drivers vdisk has, in QEMU's order; QEMU's enum is longer, but an
 * unknown value is refused the same way. */
static const char *const driver_enum[] = {
    "blkdebug", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "file", "snapshot-access",
    "ftp", "ftps", "host_cdrom", "host_device", "http", "https", "iscsi",
    "luks", "nbd",
    "null-aio", "null-co", "parallels", "preallocate", "qcow", "qcow2", "qed",
    "raw", "rbd", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc", NULL
};
/* QEMU's BlkdebugEvent, BlkdebugIOType and BlockPermission. */
static const char *const blkdebug_event_enum[] = {
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table",
    "l1_grow_activate_table", "l2_load", "l2_update", "l2_update_compressed",
    "l2_alloc_cow_read", "l2_alloc_write", "read_aio", "read_backing_aio",
    "read_compressed", "write_aio", "write_compressed", "vmstate_load",
    "vmstate_save", "cow_read", "cow_write", "reftable_load",
    "reftable_grow", "reftable_update", "refblock_load", "refblock_update",
    "refblock_update_part", "refblock_alloc", "refblock_alloc_hookup",
    "refblock_alloc_write", "refblock_alloc_write_blocks",
    "refblock_alloc_write_table", "refblock_alloc_switch_table",
    "cluster_alloc", "cluster_alloc_bytes", "cluster_free", "flush_to_os",
    "flush_to_disk", "pwritev_rmw_head", "pwritev_rmw_after_head",
    "pwritev_rmw_tail", "pwritev_rmw_after_tail", "pwritev",
    "pwritev_zero", "pwritev_done", "empty_image_prepare",
    "l1_shrink_write_table", "l1_shrink_free_l2_clusters", "cor_write",
    "cluster_alloc_space", "none", NULL
};
static const char *const blkdebug_iotype_enum[] = {
    "read", "write", "write-zeroes", "discard", "flush", "block-status",
    NULL
};
static const char *const perm_enum[] = {
    "consistent-read", "write", "write-unchanged", "resize", NULL
};
static const char *const export_type_enum[] = { "nbd", "vhost-user-blk",
                                                "fuse", "vduse-blk", NULL };
static const char *const export_mode_enum[] = { "safe", "hard", NULL };
static const char *const cap_enum[] = { "oob", NULL };

static const qarg cache_args[] = {
    { "direct", QT_BOOL, true, NULL },
    { "no-flush", QT_BOOL, true, NULL },
    { NULL, 0, false, NULL },
};

/* BlockdevOptions' base, in QEMU's order. */
static const qarg blockdev_base[] = {
    { "driver", QT_ENUM, false, driver_enum },
    { "node-name", QT_STR, true, NULL },
    { "discard", QT_ENUM, true, discard_enum },
    { "cache", QT_OBJ, true, cache_args },
    { "read-only", QT_BOOL, true, NULL },
    { "auto-read-only", QT_BOOL, true, NULL },
    { "force-share", QT_BOOL, true, NULL },
    { "detect-zeroes", QT_ENUM, true, dz_enum },
    { NULL, 0, false, NULL },
};

static const qarg blockdev_file[] = {
    { "filename", QT_STR, false, NULL },
    { "pr-manager", QT_STR, true, NULL },
    { "locking", QT_ENUM, true, locking_enum },
    { "aio", QT_ENUM, true, aio_enum },
    { "aio-max-batch", QT_INT, true, NULL },
    { "drop-cache", QT_BOOL, true, NULL },
    { "x-check-cache-dropped", QT_BOOL, true, NULL },
    { NULL, 0, false, NULL },
};

static const qarg blockdev_null[] = {
    { "size", QT_INT, true, NULL },
    { "latency-ns", QT_INT, true, NULL },
    { "read-zeroes", QT_BOOL, true, NULL },
    { NULL, 0, false, NULL },
};

/* BlockdevOptionsCurlFtp, -Ftps, -Http, -Https (src/drivers/curl.c). */
#define CURL_BASE_ARGS                                                    \
    { "url", QT_STR, false, NULL },                                       \
    { "readahead", QT_INT, true, NULL },                                  \
    { "timeout", QT_INT, true, NULL },                                    \
    { "username", QT_STR, true, NULL },                                   \
    { "password-secret", QT_STR, true, NULL },                            \
    { "proxy-username", QT_STR, true, NULL },                             \
    { "proxy-password-secret", QT_STR, true, NULL }
static const qarg blockdev_curl_ftp[] = {
    CURL_BASE_ARGS,
    { NULL, 0, false, NULL },
};
static const qarg blockdev_curl_ftps[] = {
    CURL_BASE_ARGS,
    { "sslverify", QT_BOOL, true, NULL },
    { NULL, 0, false, NULL },
};
static const qarg blockdev_curl_http[] = {
    CURL_BASE_ARGS,
    { "cookie", QT_STR, true, NULL },
    { "cookie-secret", QT_STR, true, NULL },
    { NULL, 0, false, NULL },
};
static const qarg blockdev_curl_https[] = {
    CURL_BASE_ARGS,
    { "cookie", QT_STR, true, NULL },
    { "sslverify", QT_BOOL, true, NULL },
    { "cookie-secret", QT_STR, true, NULL },
    { NULL, 0, false, NULL },
};

static const qarg blockdev_raw[] = {
    { "file", QT_BLOCKREF, false, NULL },
    { "offset", QT_INT, true, NULL },
    { "size", QT_INT, true, NULL },
    { NULL, 0, false, NULL },
};

static const qarg blockdev_qcow2[] = {
    { "file", QT_BLOCKREF, false, NULL },
    { "backing", QT_BLOCKREF_NULL, true, NULL },
    { "lazy-refcounts", QT_BOOL, true, NULL },
    { "pass-discard-request", QT_BOOL, true, NULL },
    { "pass-discard-snapshot", QT_BOOL, true, NULL },
    { "pass-discard-other", QT_BOOL, true, NULL },
    { "cache-size", QT_INT, true, NULL },
    { "l2-cache-size", QT_INT, true, NULL },
    { "l2-cache-entry-size", QT_INT, true, NULL },
    { "refcount-cache-size", QT_INT, true, NULL },
    { "cache-clean-interval", QT_INT, true, NULL },
    { "data-file", QT_BLOCKREF, true, NULL },
    { NULL, 0, false, NULL },
};

static const qarg blkdebug_inject_error[] = {
    { "event", QT_ENUM, false, blkdebug_event_enum },
    { "state", QT_INT, true, NULL },
    { "iotype", QT_ENUM, true, blkdebug_iotype_enum },
    { "errno", QT_INT, true, NULL },
    { "sector", QT_INT, true, NULL },
    { "once", QT_BOOL, true, NULL },
    { "immediately", QT_BOOL, true, NULL },
    { NULL, 0, false, NULL },
};

static const qarg blkdebug_set_state[] = {
    { "event", QT_ENUM, false, blkdebug_event_enum },
    { "state", QT_INT, true, NULL },
    { "new_state", QT_INT, false, NULL },
    { NULL, 0, false, NULL },
};

static const qarg blockdev_blkdebug[] = {
    { "image", QT_BLOCKREF, false, NULL },
    { "config", QT_STR, true, NULL },
    { "align", QT_INT, true, NULL },
    { "max-transfer", QT_INT, true, NULL },
    { "opt-write-zero", QT_INT, true, NULL },
    { "max-write-zero", QT_INT, true, NULL },
    { "opt-discard", QT_INT, true, NULL },
    { "max-discard", QT_INT, true, NULL },
    { "inject-error", QT_OBJLIST, true, blkdebug_inject_error },
    { "set-state", QT_OBJLIST, true, blkdebug_set_state },
    { "take-child-perms", QT_STRLIST, true, perm_enum },
    { "unshare-child-perms", QT_STRLIST, true, perm_enum },
    { NULL, 0, false, NULL },
};

static const qarg blockdev_blkverify[] = {
    { "test", QT_BLOCKREF, false, NULL },
    { "raw", QT_BLOCKREF, false, NULL },
    { NULL, 0, false, NULL },
};

/* BlockdevOptionsGenericFormat: compress. */
static const qarg blockdev_generic[] = {
    { "file", QT_BLOCKREF, false, NULL },
    { NULL, 0, false, NULL },
};

/* BlockdevOptionsLUKS (7.2: no detached header). */
static const qarg blockdev_luks[] = {
    { "file", QT_BLOCKREF, false, NULL },
    { "key-secret", QT_STR, true, NULL },
    { NULL, 0, false, NULL },
};

/* BlockdevOptionsGenericCOWFormat (qed) and BlockdevOptionsQcow (the
 * driver refuses encrypted images). */
static const qarg blockdev_generic_cow[] = {
    { "file", QT_BLOCKREF, false, NULL },
    { "backing", QT_BLOCKREF_NULL, true, NULL },
    { NULL, 0, false, NULL },
};
static const qarg blockdev_qcow[] = {
    { "file", QT_BLOCKREF, false, NULL },
    { "backing", QT_BLOCKREF_NULL, true, NULL },
    { "encrypt", QT_ANY, true, NULL },
    { NULL, 0, false, NULL },
};

static const qarg blockdev_cor[] = {
    { "file", QT_BLOCKREF, false, NULL },
    { "bottom", QT_STR, true, NULL },
    { NULL, 0, false, NULL },
};

/* QEMU 7.2's OnCbwError, BlockDirtyBitmap and BlockdevOptionsCbw
 * (min-cluster-size came in 9.2: refused as QEMU 7.2 does). */
static const char *const on_cbw_error_enum[] = { "break-guest-write",
                                                 "break-snapshot", NULL };
static const qarg dirty_bitmap_ref[] = {
    { "node", QT_STR, false, NULL },
    { "name", QT_STR, false, NULL },
    { NULL, 0, false, NULL },
};

static const qarg blockdev_cbw[] = {
    { "file", QT_BLOCKREF, false, NULL },
    { "target", QT_BLOCKREF, false, NULL },
    { "bitmap", QT_OBJ, true, dirty_bitmap_ref },
    { "on-cbw-error", QT_ENUM, true, on_cbw_error_enum },
    { "cbw-timeout", QT_UINT32, true, NULL },
    { NULL, 0, false, NULL },
};

static const qarg blockdev_preallocate[] = {
    { "file", QT_BLOCKREF, false, NULL },
    { "prealloc-align", QT_INT, true, NULL },
    { "prealloc-size", QT_INT, true, NULL },
    { NULL, 0, false, NULL },
};

/* QEMU's BlockdevOptionsRbd (the driver refuses encrypt). */
static const char *const rbd_auth_enum[] = { "cephx", "none", NULL };
static const qarg rbd_server[] = {
    { "host", QT_STR, false, NULL },
    { "port", QT_STR, false, NULL },
    { NULL, 0, false, NULL },
};
static const qarg blockdev_rbd[] = {
    { "pool", QT_STR, false, NULL },
    { "namespace", QT_STR, true, NULL },
    { "image", QT_STR, false, NULL },
    { "conf", QT_STR, true, NULL },
    { "snapshot", QT_STR, true, NULL },
    { "encrypt", QT_ANY, true, NULL },
    { "user", QT_STR, true, NULL },
    { "auth-client-required", QT_STRLIST, true, rbd_auth_enum },
    { "key-secret", QT_STR, true, NULL },
    { "server", QT_OBJLIST, true, rbd_server },
    { NULL, 0, false, NULL },
};

/* BlockdevOptionsNbd (src/drivers/nbd.c). The server is QEMU's flat
 * SocketAddress union, checked here as one object of all its members;
 * the driver refuses the types it has no transport for (vsock, fd). */
static const char *const socket_type_enum[] = { "inet", "unix", "vsock",
                                                "fd", NULL };
static const qarg socket_address[] = {
    { "type", QT_ENUM, false, socket_type_enum },
    { "host", QT_STR, true, NULL },
    { "port", QT_STR, true, NULL },
    { "numeric", QT_BOOL, true, NULL },
    { "to", QT_INT, true, NULL },
    { "ipv4", QT_BOOL, true, NULL },
    { "ipv6", QT_BOOL, true, NULL },
    { "keep-alive", QT_BOOL, true, NULL },
    { "mptcp", QT_BOOL, true, NULL },
    { "path", QT_STR, true, NULL },
    { "abstract", QT_BOOL, true, NULL },
    { "tight", QT_BOOL, true, NULL },
    { "cid", QT_STR, true, NULL },
    { "str", QT_STR, true, NULL },
    { NULL, 0, false, NULL },
};
static const qarg blockdev_nbd[] = {
    { "server", QT_OBJ, false, socket_address },
    { "export", QT_STR, true, NULL },
    { "tls-creds", QT_STR, true, NULL },
    { "tls-hostname", QT_STR, true, NULL },
    { "x-dirty-bitmap", QT_STR, true, NULL },
    { "reconnect-delay", QT_UINT32, true, NULL },
    { "open-timeout", QT_UINT32, true, NULL },
    { NULL, 0, false, NULL },
};

/* BlockdevOptionsSsh: InetSocketAddress, and SshHostKeyCheck's union
 * as one object (the driver refuses type and hash outside mode=hash, as
 * QEMU's visitor does). */
static const char *const ssh_hkc_mode_enum[] = { "none", "hash",
                                                 "known_hosts", NULL };
static const char *const ssh_hkc_type_enum[] = { "md5", "sha1", "sha256",
                                                 NULL };
static const qarg inet_address[] = {
    { "host", QT_STR, false, NULL },
    { "port", QT_STR, false, NULL },
    { "numeric", QT_BOOL, true, NULL },
    { "to", QT_INT, true, NULL },
    { "ipv4", QT_BOOL, true, NULL },
    { "ipv6", QT_BOOL, true, NULL },
    { "keep-alive", QT_BOOL, true, NULL },
    { NULL, 0, false, NULL },
};
static const qarg ssh_host_key_check[] = {
    { "mode", QT_ENUM, false, ssh_hkc_mode_enum },
    { "type", QT_ENUM, true, ssh_hkc_type_enum },
    { "hash", QT_STR, true, NULL },
    { NULL, 0, false, NULL },
};
static const qarg blockdev_ssh[] = {
    { "server", QT_OBJ, false, inet_address },
    { "path", QT_STR, false, NULL },
    { "user", QT_STR, true, NULL },
    { "host-key-check", QT_OBJ, true, ssh_host_key_check },
    { NULL, 0, false, NULL },
};

static const qarg blockdev_throttle[] = {
    { "throttle-group", QT_STR, false, NULL },
    { "file", QT_BLOCKREF, false, NULL },
    { NULL, 0, false, NULL },
};

/* BlockdevOptionsIscsi (src/drivers/iscsi.c; a vdisk built without
 * libiscsi refuses the driver when it opens the node). */
static const char *const iscsi_transport_enum[] = { "tcp", "iser", NULL };
static const char *const iscsi_digest_enum[] = { "crc32c", "none",
                                                 "crc32c-none",
                                                 "none-crc32c", NULL };
static const qarg blockdev_iscsi[] = {
    { "transport", QT_ENUM, false, iscsi_transport_enum },
    { "portal", QT_STR, false, NULL },
    { "target", QT_STR, false, NULL },
    { "lun", QT_INT, true, NULL },
    { "user", QT_STR, true, NULL },
    { "password-secret", QT_STR, true, NULL },
    { "initiator-name", QT_STR, true, NULL },
    { "header-digest", QT_ENUM, true, iscsi_digest_enum },
    { "timeout", QT_INT, true, NULL },
    { NULL, 0, false, NULL },
};

static const struct {
    const char *driver;
    const qarg *args;
} blockdev_variants[] = {
    { "blkdebug", blockdev_blkdebug },
    { "blkverify", blockdev_blkverify },
    { "bochs", blockdev_generic },
    { "cloop", blockdev_generic },
    { "compress", blockdev_generic },
    { "copy-before-write", blockdev_cbw },
    { "copy-on-read", blockdev_cor },
    { "dmg", blockdev_generic },
    { "file", blockdev_file },
    { "ftp", blockdev_curl_ftp },
    { "ftps", blockdev_curl_ftps },
    { "host_cdrom", blockdev_file },
    { "host_device", blockdev_file },
    { "http", blockdev_curl_http },
    { "https", blockdev_curl_https },
    { "iscsi", blockdev_iscsi },
    { "luks", blockdev_luks },
    { "nbd", blockdev_nbd },
    { "null-aio", blockdev_null },
    { "null-co", blockdev_null },
    { "parallels", blockdev_generic },
    { "preallocate", blockdev_preallocate },
    { "raw", blockdev_raw },
    { "qcow", blockdev_qcow },
    { "qcow2", blockdev_qcow2 },
    { "qed", blockdev_generic_cow },
    { "rbd", blockdev_rbd },
    { "snapshot-access", blockdev_generic },
    { "ssh", blockdev_ssh },
    { "throttle", blockdev_throttle },
    { "vdi", blockdev_generic },
    { "vhdx", blockdev_generic },
    { "vmdk", blockdev_generic_cow },
    { "vpc", blockdev_generic },
};

static const qarg args_capabilities[] = {
    { "enable", QT_STRLIST, true, cap_enum },
    { NULL, 0, false, NULL },
};

static const qarg args_blockdev_del[] = {
    { "node-name", QT_STR, false, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_query_nodes[] = {
    { "flat", QT_BOOL, true, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_blockstats[] = {
    { "query-nodes", QT_BOOL, true, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_block_resize[] = {
    { "device", QT_STR, true, NULL },
    { "node-name", QT_STR, true, NULL },
    { "size", QT_INT, false, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_nbd_start[] = {
    { "addr", QT_SOCKADDR_LEGACY, false, NULL },
    { "tls-creds", QT_STR, true, NULL },
    { "tls-authz", QT_STR, true, NULL },
    { "max-connections", QT_INT, true, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_export_add[] = {
    { "type", QT_ENUM, false, export_type_enum },
    { "id", QT_STR, false, NULL },
    { "fixed-iothread", QT_BOOL, true, NULL },
    { "iothread", QT_STR, true, NULL },
    { "node-name", QT_STR, false, NULL },
    { "writable", QT_BOOL, true, NULL },
    { "writethrough", QT_BOOL, true, NULL },
    { "name", QT_STR, true, NULL },
    { "description", QT_STR, true, NULL },
    { "bitmaps", QT_ARRAY, true, NULL },
    { "allocation-depth", QT_BOOL, true, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_export_del[] = {
    { "id", QT_STR, false, NULL },
    { "mode", QT_ENUM, true, export_mode_enum },
    { NULL, 0, false, NULL },
};

static const qarg args_snapshot_internal[] = {
    { "device", QT_STR, false, NULL },
    { "name", QT_STR, false, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_snapshot_delete_internal[] = {
    { "device", QT_STR, false, NULL },
    { "id", QT_STR, true, NULL },
    { "name", QT_STR, true, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_vdisk_snapshot[] = {
    { "name", QT_STR, false, NULL },
    { "devices", QT_STRLIST, true, NULL },
    { "vmstate", QT_STR, true, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_nbd_server_add[] = {
    { "name", QT_STR, true, NULL },
    { "description", QT_STR, true, NULL },
    { "device", QT_STR, false, NULL },
    { "writable", QT_BOOL, true, NULL },
    { "bitmap", QT_STR, true, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_nbd_server_remove[] = {
    { "name", QT_STR, false, NULL },
    { "mode", QT_ENUM, true, export_mode_enum },
    { NULL, 0, false, NULL },
};

static const qarg args_blockdev_reopen[] = {
    { "options", QT_BLOCKDEVLIST, false, NULL },
    { NULL, 0, false, NULL },
};

/* block.json's block-latency-histogram-set (boundaries-zap, for zoned
 * devices, came after 7.2). */
static const qarg args_histogram_set[] = {
    { "id", QT_STR, false, NULL },
    { "boundaries", QT_UINTLIST, true, NULL },
    { "boundaries-read", QT_UINTLIST, true, NULL },
    { "boundaries-write", QT_UINTLIST, true, NULL },
    { "boundaries-flush", QT_UINTLIST, true, NULL },
    { NULL, 0, false, NULL },
};

/* vdisk's own: QEMU sets these with -drive's stats-* options, which a
 * node added by blockdev-add cannot take. */
static const qarg args_vdisk_stats_set[] = {
    { "node-name", QT_STR, false, NULL },
    { "stats-intervals", QT_UINTLIST, true, NULL },
    { "stats-account-invalid", QT_BOOL, true, NULL },
    { "stats-account-failed", QT_BOOL, true, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_none[] = {
    { NULL, 0, false, NULL },
};

/* blockdev-add's arguments are one BlockdevOptions, checked as such. */
static const qarg args_blockdev_add[] = {
    { "", QT_BLOCKDEV, false, NULL },
    { NULL, 0, false, NULL },
};

/* object-add's arguments are one ObjectOptions, which the library's
 * object registry checks (its types differ per qom-type). */
static const qarg args_object_add[] = {
    { "", QT_OBJECT, false, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_object_del[] = {
    { "id", QT_STR, false, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_qom_list[] = {
    { "path", QT_STR, false, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_qom_get[] = {
    { "path", QT_STR, false, NULL },
    { "property", QT_STR, false, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_qom_set[] = {
    { "path", QT_STR, false, NULL },
    { "property", QT_STR, false, NULL },
    { "value", QT_ANY, false, NULL },
    { NULL, 0, false, NULL },
};

static const char *const on_error_enum[] = { "report", "ignore", "enospc",
                                            "stop", "auto", NULL };

/* block-stream, QEMU 7.2's members in its order (backing-mask-protocol
 * is QEMU 8.0's, taken already). */
static const qarg args_block_stream[] = {
    { "job-id", QT_STR, true, NULL },
    { "device", QT_STR, false, NULL },
    { "base", QT_STR, true, NULL },
    { "base-node", QT_STR, true, NULL },
    { "backing-file", QT_STR, true, NULL },
    { "backing-mask-protocol", QT_BOOL, true, NULL },
    { "bottom", QT_STR, true, NULL },
    { "speed", QT_INT, true, NULL },
    { "on-error", QT_ENUM, true, on_error_enum },
    { "filter-node-name", QT_STR, true, NULL },
    { "auto-finalize", QT_BOOL, true, NULL },
    { "auto-dismiss", QT_BOOL, true, NULL },
    { NULL, 0, false, NULL },
};

/* block-commit, QEMU 7.2's members in its order (backing-mask-protocol
 * is QEMU 8.0's, taken already). */
static const qarg args_block_commit[] = {
    { "job-id", QT_STR, true, NULL },
    { "device", QT_STR, false, NULL },
    { "base-node", QT_STR, true, NULL },
    { "base", QT_STR, true, NULL },
    { "top-node", QT_STR, true, NULL },
    { "top", QT_STR, true, NULL },
    { "backing-file", QT_STR, true, NULL },
    { "backing-mask-protocol", QT_BOOL, true, NULL },
    { "speed", QT_INT, true, NULL },
    { "on-error", QT_ENUM, true, on_error_enum },
    { "filter-node-name", QT_STR, true, NULL },
    { "auto-finalize", QT_BOOL, true, NULL },
    { "auto-dismiss", QT_BOOL, true, NULL },
    { NULL, 0, false, NULL },
};

static const char *const sync_enum[] = { "top", "full", "none",
                                        "incremental", "bitmap", NULL };
static const char *const copy_mode_enum[] = { "background",
                                             "write-blocking", NULL };

/* blockdev-mirror, QEMU 7.2's members in its order. */
static const qarg args_blockdev_mirror[] = {
    { "job-id", QT_STR, true, NULL },
    { "device", QT_STR, false, NULL },
    { "target", QT_STR, false, NULL },
    { "replaces", QT_STR, true, NULL },
    { "sync", QT_ENUM, false, sync_enum },
    { "speed", QT_INT, true, NULL },
    { "granularity", QT_INT, true, NULL },
    { "buf-size", QT_INT, true, NULL },
    { "on-source-error", QT_ENUM, true, on_error_enum },
    { "on-target-error", QT_ENUM, true, on_error_enum },
    { "filter-node-name", QT_STR, true, NULL },
    { "copy-mode", QT_ENUM, true, copy_mode_enum },
    { "auto-finalize", QT_BOOL, true, NULL },
    { "auto-dismiss", QT_BOOL, true, NULL },
    { NULL, 0, false, NULL },
};

static const char *const bitmap_mode_enum[] = { "on-success", "never",
                                               "always", NULL };

/* blockdev-backup (BackupCommon and target), QEMU 7.2's order. */
static const qarg args_blockdev_backup[] = {
    { "job-id", QT_STR, true, NULL },
    { "device", QT_STR, false, NULL },
    { "sync", QT_ENUM, false, sync_enum },
    { "speed", QT_INT, true, NULL },
    { "bitmap", QT_STR, true, NULL },
    { "bitmap-mode", QT_ENUM, true, bitmap_mode_enum },
    { "compress", QT_BOOL, true, NULL },
    { "on-source-error", QT_ENUM, true, on_error_enum },
    { "on-target-error", QT_ENUM, true, on_error_enum },
    { "auto-finalize", QT_BOOL, true, NULL },
    { "auto-dismiss", QT_BOOL, true, NULL },
    { "filter-node-name", QT_STR, true, NULL },
    { "x-perf", QT_ANY, true, NULL },
    { "target", QT_STR, false, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_blockdev_snapshot[] = {
    { "node", QT_STR, false, NULL },
    { "overlay", QT_STR, false, NULL },
    { NULL, 0, false, NULL },
};

static const char *const new_image_mode_enum[] = { "existing",
                                                  "absolute-paths", NULL };

static const qarg args_blockdev_snapshot_sync[] = {
    { "device", QT_STR, true, NULL },
    { "node-name", QT_STR, true, NULL },
    { "snapshot-file", QT_STR, false, NULL },
    { "snapshot-node-name", QT_STR, true, NULL },
    { "format", QT_STR, true, NULL },
    { "mode", QT_ENUM, true, new_image_mode_enum },
    { NULL, 0, false, NULL },
};

/* transaction: each action's data is checked against its command's
 * schema by transaction.c. */
static const qarg args_transaction[] = {
    { "actions", QT_ANY, false, NULL },
    { "properties", QT_ANY, true, NULL },
    { NULL, 0, false, NULL },
};

/* drive-backup (BackupCommon, target, format, mode), QEMU 7.2's order. */
static const qarg args_drive_backup[] = {
    { "job-id", QT_STR, true, NULL },
    { "device", QT_STR, false, NULL },
    { "sync", QT_ENUM, false, sync_enum },
    { "speed", QT_INT, true, NULL },
    { "bitmap", QT_STR, true, NULL },
    { "bitmap-mode", QT_ENUM, true, bitmap_mode_enum },
    { "compress", QT_BOOL, true, NULL },
    { "on-source-error", QT_ENUM, true, on_error_enum },
    { "on-target-error", QT_ENUM, true, on_error_enum },
    { "auto-finalize", QT_BOOL, true, NULL },
    { "auto-dismiss", QT_BOOL, true, NULL },
    { "filter-node-name", QT_STR, true, NULL },
    { "x-perf", QT_ANY, true, NULL },
    { "target", QT_STR, false, NULL },
    { "format", QT_STR, true, NULL },
    { "mode", QT_ENUM, true, new_image_mode_enum },
    { NULL, 0, false, NULL },
};

/* drive-mirror, QEMU 7.2's members in its order. */
static const qarg args_drive_mirror[] = {
    { "job-id", QT_STR, true, NULL },
    { "device", QT_STR, false, NULL },
    { "target", QT_STR, false, NULL },
    { "format", QT_STR, true, NULL },
    { "node-name", QT_STR, true, NULL },
    { "replaces", QT_STR, true, NULL },
    { "sync", QT_ENUM, false, sync_enum },
    { "mode", QT_ENUM, true, new_image_mode_enum },
    { "speed", QT_INT, true, NULL },
    { "granularity", QT_INT, true, NULL },
    { "buf-size", QT_INT, true, NULL },
    { "on-source-error", QT_ENUM, true, on_error_enum },
    { "on-target-error", QT_ENUM, true, on_error_enum },
    { "unmap", QT_BOOL, true, NULL },
    { "copy-mode", QT_ENUM, true, copy_mode_enum },
    { "auto-finalize", QT_BOOL, true, NULL },
    { "auto-dismiss", QT_BOOL, true, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_job_id[] = {
    { "id", QT_STR, false, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_job_device[] = {
    { "device", QT_STR, false, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_block_job_cancel[] = {
    { "device", QT_STR, false, NULL },
    { "force", QT_BOOL, true, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_block_job_set_speed[] = {
    { "device", QT_STR, false, NULL },
    { "speed", QT_INT, false, NULL },
    { NULL, 0, false, NULL },
};

/* The dirty bitmap commands (BlockDirtyBitmap, BlockDirtyBitmapAdd,
 * BlockDirtyBitmapMerge); bitmaps.c checks the granularity's range and
 * the str-or-object elements of a merge as QAPI does. */
static const qarg args_bitmap[] = {
    { "node", QT_STR, false, NULL },
    { "name", QT_STR, false, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_bitmap_add[] = {
    { "node", QT_STR, false, NULL },
    { "name", QT_STR, false, NULL },
    { "granularity", QT_INT, true, NULL },
    { "persistent", QT_BOOL, true, NULL },
    { "disabled", QT_BOOL, true, NULL },
    { NULL, 0, false, NULL },
};

static const qarg args_bitmap_merge[] = {
    { "node", QT_STR, false, NULL },
    { "target", QT_STR, false, NULL },
    { "bitmaps", QT_ARRAY, false, NULL },
    { NULL, 0, false, NULL },
};

/* The table. query-commands lists it in this order. */
const qmp_cmd qmp_commands[] = {
    { "qmp_capabilities", args_capabilities, qmp_cmd_capabilities, true },
    { "query-version", args_none, qmp_cmd_query_version, false },
    { "query-commands", args_none, qmp_cmd_query_commands, false },
    { "quit", args_none, qmp_cmd_quit, false },
    { "blockdev-add", args_blockdev_add, qmp_cmd_blockdev_add, false },
    { "blockdev-del", args_blockdev_del, qmp_cmd_blockdev_del, false },
    { "query-named-block-nodes", args_query_nodes,
      qmp_cmd_query_named_block_nodes, false },
    { "query-blockstats", args_blockstats, qmp_cmd_query_blockstats, false },
    { "block_resize", args_block_resize, qmp_cmd_block_resize, false },
    { "nbd-server-start", args_nbd_start, qmp_cmd_nbd_server_start, false },
    { "nbd-server-stop", args_none, qmp_cmd_nbd_server_stop, false },
    { "block-export-add", args_export_add, qmp_cmd_block_export_add, false },
    { "block-export-del", args_export_del, qmp_cmd_block_export_del, false },
    { "query-block-exports", args_none, qmp_cmd_query_block_exports, false },
    { "blockdev-snapshot-internal-sync", args_snapshot_internal,
      qmp_cmd_snapshot_internal, false },
    { "blockdev-snapshot-delete-internal-sync", args_snapshot_delete_internal,
      qmp_cmd_snapshot_delete_internal, false },
    { "x-vdisk-snapshot-save", args_vdisk_snapshot,
      qmp_cmd_vdisk_snapshot_save, false },
    { "x-vdisk-snapshot-load", args_vdisk_snapshot,
      qmp_cmd_vdisk_snapshot_load, false },
    { "x-vdisk-snapshot-delete", args_vdisk_snapshot,
      qmp_cmd_vdisk_snapshot_delete, false },
    { "object-add", args_object_add, qmp_cmd_object_add, false },
    { "object-del", args_object_del, qmp_cmd_object_del, false },
    { "qom-list", args_qom_list, qmp_cmd_qom_list, false },
    { "qom-get", args_qom_get, qmp_cmd_qom_get, false },
    { "qom-set", args_qom_set, qmp_cmd_qom_set, false },
    { "query-block", args_none, qmp_cmd_query_block, false },
    { "nbd-server-add", args_nbd_server_add, qmp_cmd_nbd_server_add, false },
    { "nbd-server-remove", args_nbd_server_remove, qmp_cmd_nbd_server_remove,
      false },
    { "blockdev-reopen", args_blockdev_reopen, qmp_cmd_blockdev_reopen,
      false },
    { "block-latency-histogram-set", args_histogram_set,
      qmp_cmd_block_latency_histogram_set, false },
    { "x-vdisk-block-stats-set", args_vdisk_stats_set,
      qmp_cmd_vdisk_block_stats_set, false },
    { "block-stream", args_block_stream, qmp_cmd_block_stream, false },
    { "block-commit", args_block_commit, qmp_cmd_block_commit, false },
    { "blockdev-mirror", args_blockdev_mirror, qmp_cmd_blockdev_mirror,
      false },
    { "blockdev-backup", args_blockdev_backup, qmp_cmd_blockdev_backup,
      false },
    { "blockdev-snapshot", args_blockdev_snapshot, qmp_cmd_blockdev_snapshot,
      false },
    { "blockdev-snapshot-sync", args_blockdev_snapshot_sync,
      qmp_cmd_blockdev_snapshot_sync, false },
    { "drive-backup", args_drive_backup, qmp_cmd_drive_backup, false },
    { "drive-mirror", args_drive_mirror, qmp_cmd_drive_mirror, false },
    { "transaction", args_transaction, qmp_cmd_transaction, false },
    { "query-jobs", args_none, qmp_cmd_query_jobs, false },
    { "query-block-jobs", args_none, qmp_cmd_query_block_jobs, false },
    { "job-pause", args_job_id, qmp_cmd_job_pause, false },
    { "job-resume", args_job_id, qmp_cmd_job_resume, false },
    { "job-cancel", args_job_id, qmp_cmd_job_cancel, false },
    { "job-complete", args_job_id, qmp_cmd_job_complete, false },
    { "job-finalize", args_job_id, qmp_cmd_job_finalize, false },
    { "job-dismiss", args_job_id, qmp_cmd_job_dismiss, false },
    { "block-job-pause", args_job_device, qmp_cmd_block_job_pause, false },
    { "block-job-resume", args_job_device, qmp_cmd_block_job_resume, false },
    { "block-job-cancel", args_block_job_cancel, qmp_cmd_block_job_cancel,
      false },
    { "block-job-complete", args_job_device, qmp_cmd_block_job_complete,
      false },
    { "block-job-finalize", args_job_id, qmp_cmd_block_job_finalize, false },
    { "block-job-dismiss", args_job_id, qmp_cmd_block_job_dismiss, false },
    { "block-job-set-speed", args_block_job_set_speed,
      qmp_cmd_block_job_set_speed, false },
    { "block-dirty-bitmap-add", args_bitmap_add,
      qmp_cmd_block_dirty_bitmap_add, false },
    { "block-dirty-bitmap-remove", args_bitmap,
      qmp_cmd_block_dirty_bitmap_remove, false },
    { "block-dirty-bitmap-clear", args_bitmap,
      qmp_cmd_block_dirty_bitmap_clear, false },
    { "block-dirty-bitmap-enable", args_bitmap,
      qmp_cmd_block_dirty_bitmap_enable, false },
    { "block-dirty-bitmap-disable", args_bitmap,
      qmp_cmd_block_dirty_bitmap_disable, false },
    { "block-dirty-bitmap-merge", args_bitmap_merge,
      qmp_cmd_block_dirty_bitmap_merge, false },
    { "x-debug-block-dirty-bitmap-sha256", args_bitmap,
      qmp_cmd_x_debug_block_dirty_bitmap_sha256, false },
    { NULL, NULL, NULL, false },
};

const qmp_cmd *qmp_find_command(const char *name)
{
    for (const qmp_cmd *c = qmp_commands; c->name; c++) {
        if (strcmp(c->name, name) == 0) {
            return c;
        }
    }
    return NULL;
}

json_object *qmp_fail(qmp_error *e, const char *cls, const char *fmt, ...)
{
    va_list ap;

    e->cls = cls ? cls : "GenericError";
    va_start(ap, fmt);
    vsnprintf(e->desc, sizeof(e->desc), fmt, ap);
    va_end(ap);
    return NULL;
}

/* ---- validation ---- */

static int bad_type(qmp_error *e, const char *prefix, const char *name,
                    const char *expected)
{
    qmp_fail(e, NULL, "Invalid parameter type for '%s%s', expected: %s",
             prefix, name, expected);
    return -1;
}

/* Converts a keyval string in @parent's member @name to type @t. */
static int keyval_convert(json_object *parent, const char *name,
                          json_object *val, qtype t, const char *prefix,
                          qmp_error *e)
{
    const char *s = json_object_get_string(val);

    if (t == QT_BOOL) {
        bool b;
        if (vd_parse_bool(s, &b) < 0) {
            qmp_fail(e, NULL, "Parameter '%s%s' expects 'on' or 'off'",
                     prefix, name);
            return -1;
        }
        json_object_object_add(parent, name, json_object_new_boolean(b));
    } else {
        char *end;
        long long v;
        uint64_t sz;

        errno = 0;
        v = strtoll(s, &end, 0);
        if (errno || end == s || *end) {
            /* Sizes may carry a suffix on the command line. */
            if (vd_parse_size(s, &sz) < 0 || sz > INT64_MAX) {
                qmp_fail(e, NULL, "Parameter '%s%s' expects a number",
                         prefix, name);
                return -1;
            }
            v = (long long)sz;
        }
        json_object_object_add(parent, name, json_object_new_int64(v));
    }
    return 0;
}

static int check_blockdev(json_object *obj, const char *prefix, bool keyval,
                          qmp_error *e);
static int check_object(json_object *obj, const char *prefix, bool keyval,
                        qmp_error *e);

static bool in_list(const char *const *list, const char *s)
{
    for (; *list; list++) {
        if (strcmp(*list, s) == 0) {
            return true;
        }
    }
    return false;
}

/* A list member: JSON has an array; a command line (keyval) has an
 * object whose keys are the indices from 0, which becomes the array in
 * @parent (*@val then points at it). */
static int list_items(json_object *parent, const qarg *a, json_object **val,
                      const char *prefix, bool keyval, qmp_error *e)
{
    if (keyval && json_object_is_type(*val, json_type_object)) {
        size_t n = (size_t)json_object_object_length(*val);
        json_object *arr = json_object_new_array();
        for (size_t i = 0; arr && i < n; i++) {
            char key[24];
            json_object *it;
            snprintf(key, sizeof(key), "%zu", i);
            if (!json_object_object_get_ex(*val, key, &it)) {
                json_object_put(arr);
                qmp_fail(e, NULL, "Parameter '%s%s.%zu' missing", prefix,
                         a->name, i);
                return -1;
            }
            json_object_array_add(arr, json_object_get(it));
        }
        if (!arr) {
            qmp_fail(e, NULL, "out of memory");
            return -1;
        }
        json_object_object_add(parent, a->name, arr);
        *val = arr;
        return 0;
    }
    if (!json_object_is_type(*val, json_type_array)) {
        return bad_type(e, prefix, a->name, "array");
    }
    return 0;
}

/* Checks one member @val of @parent against @a. */
static int check_member(json_object *parent, const qarg *a, json_object *val,
                        const char *prefix, bool keyval, qmp_error *e)
{
    json_type jt = json_object_get_type(val);
    char sub[256];

    snprintf(sub, sizeof(sub), "%s%s.", prefix, a->name);
    switch (a->type) {
    case QT_STR:
        return jt == json_type_string ? 0
               : bad_type(e, prefix, a->name, "string");
    case QT_BOOL:
        if (keyval && jt == json_type_string) {
            return keyval_convert(parent, a->name, val, a->type, prefix, e);
        }
        return jt == json_type_boolean ? 0
               : bad_type(e, prefix, a->name, "boolean");
    case QT_INT:
        if (keyval && jt == json_type_string) {
            return keyval_convert(parent, a->name, val, a->type, prefix, e);
        }
        return jt == json_type_int ? 0
               : bad_type(e, prefix, a->name, "integer");
    case QT_UINT32:
        /* QEMU's visit_type_uint32(): anything but a number is no
         * uint64 for it; a number out of range, no uint32_t. On the
         * command line, strtoull's wrap-around makes "-1" a large
         * number too. */
        if (keyval && jt == json_type_string) {
            const char *s = json_object_get_string(val);
            char *end;
            unsigned long long v;
            errno = 0;
            v = strtoull(s, &end, 0);
            if (errno || end == s || *end) {
                qmp_fail(e, NULL, "Parameter '%s%s' expects integer", prefix,
                         a->name);
                return -1;
            }
            if (v > UINT32_MAX) {
                qmp_fail(e, NULL, "Parameter '%s%s' expects uint32_t",
                         prefix, a->name);
                return -1;
            }
            json_object_object_add(parent, a->name,
                                   json_object_new_int64((int64_t)v));
            return 0;
        }
        if (jt != json_type_int) {
            qmp_fail(e, NULL, "Parameter '%s%s' expects uint64", prefix,
                     a->name);
            return -1;
        }
        if (json_object_get_int64(val) < 0 ||
            json_object_get_int64(val) > (int64_t)UINT32_MAX) {
            qmp_fail(e, NULL, "Parameter '%s%s' expects uint32_t", prefix,
                     a->name);
            return -1;
        }
        return 0;
    case QT_ENUM:
        if (jt != json_type_string) {
            return bad_type(e, prefix, a->name, "string");
        }
        if (!in_list(a->sub, json_object_get_string(val))) {
            /* QEMU's visitor names the member alone, even nested. */
            qmp_fail(e, NULL, "Parameter '%s' does not accept value '%s'",
                     a->name, json_object_get_string(val));
            return -1;
        }
        return 0;
    case QT_OBJ:
        if (jt != json_type_object) {
            return bad_type(e, prefix, a->name, "object");
        }
        return qmp_check_args(val, a->sub, sub, keyval, e);
    case QT_STRLIST:
        if (list_items(parent, a, &val, prefix, keyval, e) < 0) {
            return -1;
        }
        for (size_t i = 0; i < json_object_array_length(val); i++) {
            json_object *it = json_object_array_get_idx(val, i);
            if (!json_object_is_type(it, json_type_string)) {
                char nm[256];
                snprintf(nm, sizeof(nm), keyval ? "%s.%zu" : "%s[%zu]",
                         a->name, i);
                return bad_type(e, prefix, nm, "string");
            }
            if (a->sub && !in_list(a->sub, json_object_get_string(it))) {
                /* sic: QEMU's visitor has no name for list elements. */
                qmp_fail(e, NULL, "Parameter 'null' does not accept value "
                         "'%s'", json_object_get_string(it));
                return -1;
            }
        }
        return 0;
    case QT_OBJLIST:
        if (list_items(parent, a, &val, prefix, keyval, e) < 0) {
            return -1;
        }
        for (size_t i = 0; i < json_object_array_length(val); i++) {
            json_object *it = json_object_array_get_idx(val, i);
            char nm[256], sub2[512];
            snprintf(nm, sizeof(nm), keyval ? "%s.%zu" : "%s[%zu]", a->name,
                     i);
            if (!json_object_is_type(it, json_type_object)) {
                return bad_type(e, prefix, nm, "object");
            }
            snprintf(sub2, sizeof(sub2), "%s%s.", prefix, nm);
            if (qmp_check_args(it, a->sub, sub2, keyval, e) < 0) {
                return -1;
            }
        }
        return 0;
    case QT_UINTLIST:
        if (jt != json_type_array) {
            return bad_type(e, prefix, a->name, "array");
        }
        for (size_t i = 0; i < json_object_array_length(val); i++) {
            json_object *it = json_object_array_get_idx(val, i);
            if (!json_object_is_type(it, json_type_int) ||
                json_object_get_int64(it) < 0) {
                char nm[256];
                snprintf(nm, sizeof(nm), "%s[%zu]", a->name, i);
                return bad_type(e, prefix, nm, "uint64");
            }
        }
        return 0;
    case QT_BLOCKDEVLIST:
        if (jt != json_type_array) {
            return bad_type(e, prefix, a->name, "array");
        }
        for (size_t i = 0; i < json_object_array_length(val); i++) {
            json_object *it = json_object_array_get_idx(val, i);
            char nm[256];
            snprintf(nm, sizeof(nm), "%s%s[%zu].", prefix, a->name, i);
            if (!json_object_is_type(it, json_type_object)) {
                snprintf(nm, sizeof(nm), "%s[%zu]", a->name, i);
                return bad_type(e, prefix, nm, "object");
            }
            if (check_blockdev(it, nm, keyval, e) < 0) {
                return -1;
            }
        }
        return 0;
    case QT_ANY:
        return 0;
    case QT_ARRAY:
        return jt == json_type_array ? 0 : bad_type(e, prefix, a->name,
                                                    "array");
    case QT_BLOCKDEV:
        if (jt != json_type_object) {
            return bad_type(e, prefix, a->name, "object");
        }
        return check_blockdev(val, sub, keyval, e);
    case QT_OBJECT:
        if (jt != json_type_object) {
            return bad_type(e, prefix, a->name, "object");
        }
        return check_object(val, sub, keyval, e);
    case QT_BLOCKREF_NULL:
        if (jt == json_type_null) {
            return 0;
        }
        /* fall through */
    case QT_BLOCKREF:
        if (jt == json_type_string) {
            return 0;
        }
        if (jt == json_type_object) {
            return check_blockdev(val, sub, keyval, e);
        }
        return bad_type(e, prefix, a->name,
                        a->type == QT_BLOCKREF ? "BlockdevRef"
                                               : "BlockdevRefOrNull");
    case QT_SOCKADDR_LEGACY: {
        static const char *const types[] = { "inet", "unix", "vsock", "fd",
                                             NULL };
        static const qarg inet[] = {
            { "host", QT_STR, false, NULL },
            { "port", QT_STR, false, NULL },
            { "numeric", QT_BOOL, true, NULL },
            { "to", QT_INT, true, NULL },
            { "ipv4", QT_BOOL, true, NULL },
            { "ipv6", QT_BOOL, true, NULL },
            { "keep-alive", QT_BOOL, true, NULL },
            { NULL, 0, false, NULL },
        };
        static const qarg unix_[] = {
            { "path", QT_STR, false, NULL },
            { "abstract", QT_BOOL, true, NULL },
            { "tight", QT_BOOL, true, NULL },
            { NULL, 0, false, NULL },
        };
        static const qarg other[] = {
            { "str", QT_STR, false, NULL },
            { NULL, 0, false, NULL },
        };
        json_object *t, *data;
        const char *ts;
        const qarg *dargs;
        qarg outer[3] = {
            { "type", QT_ENUM, false, types },
            { "data", QT_OBJ, false, NULL },
            { NULL, 0, false, NULL },
        };

        if (jt != json_type_object) {
            return bad_type(e, prefix, a->name, "object");
        }
        if (!json_object_object_get_ex(val, "type", &t)) {
            qmp_fail(e, NULL, "Parameter '%stype' is missing", sub);
            return -1;
        }
        if (check_member(val, &outer[0], t, sub, keyval, e) < 0) {
            return -1;
        }
        ts = json_object_get_string(t);
        dargs = strcmp(ts, "inet") == 0 ? inet
                : strcmp(ts, "unix") == 0 ? unix_ : other;
        outer[1].sub = dargs;
        if (!json_object_object_get_ex(val, "data", &data)) {
            qmp_fail(e, NULL, "Parameter '%sdata' is missing", sub);
            return -1;
        }
        return qmp_check_args(val, outer, sub, keyval, e);
    }
    }
    return 0;
}

int qmp_check_args(json_object *obj, const qarg *args, const char *prefix,
                   bool keyval, qmp_error *e)
{
    if (args[0].name && args[0].type == QT_BLOCKDEV && !args[0].name[0]) {
        return check_blockdev(obj, prefix, keyval, e);
    }
    if (args[0].name && args[0].type == QT_OBJECT && !args[0].name[0]) {
        return check_object(obj, prefix, keyval, e);
    }
    for (const qarg *a = args; a->name; a++) {
        json_object *val;
        if (!json_object_object_get_ex(obj, a->name, &val)) {
            if (!a->optional) {
                qmp_fail(e, NULL, "Parameter '%s%s' is missing", prefix,
                         a->name);
                return -1;
            }
            continue;
        }
        if (check_member(obj, a, val, prefix, keyval, e) < 0) {
            return -1;
        }
    }
    json_object_object_foreach(obj, key, val) {
        bool known = false;
        (void)val;
        for (const qarg *a = args; a->name && !known; a++) {
            known = strcmp(a->name, key) == 0;
        }
        if (!known) {
            qmp_fail(e, NULL, "Parameter '%s%s' is unexpected", prefix, key);
            return -1;
        }
    }
    return 0;
}

/* BlockdevOptions: the base, then the members of the chosen driver. */
static int check_blockdev(json_object *obj, const char *prefix, bool keyval,
                          qmp_error *e)
{
    qarg all[40];
    size_t n = 0;
    json_object *drv;

    for (const qarg *a = blockdev_base; a->name; a++) {
        all[n++] = *a;
    }
    all[n] = (qarg){ NULL, 0, false, NULL };
    if (!json_object_object_get_ex(obj, "driver", &drv)) {
        qmp_fail(e, NULL, "Parameter '%sdriver' is missing", prefix);
        return -1;
    }
    if (check_member(obj, &blockdev_base[0], drv, prefix, keyval, e) < 0) {
        return -1;
    }
    for (size_t i = 0; i < sizeof(blockdev_variants) /
                           sizeof(blockdev_variants[0]); i++) {
        if (strcmp(blockdev_variants[i].driver,
                   json_object_get_string(drv)) == 0) {
            for (const qarg *a = blockdev_variants[i].args; a->name; a++) {
                all[n++] = *a;
            }
        }
    }
    all[n] = (qarg){ NULL, 0, false, NULL };
    return qmp_check_args(obj, all, prefix, keyval, e);
}

/* ObjectOptions: the library's object registry checks the members with
 * QEMU's messages (vd_object_add_json(), vd_object_add()); here it only
 * has to be an object. */
static int check_object(json_object *obj, const char *prefix, bool keyval,
                        qmp_error *e)
{
    (void)obj;
    (void)prefix;
    (void)keyval;
    (void)e;
    return 0;
}

/* ---- command-line objects ---- */

/* Sets @path (dotted) to the string @value inside @root. */
static int keyval_set(json_object *root, const char *path, const char *value,
                      vd_error *err)
{
    char buf[512];
    char *p = buf, *dot;
    json_object *cur = root;

    if (strlen(path) >= sizeof(buf)) {
        return vd_error_set(err, -EINVAL, "option name '%.40s...' is too "
                            "long", path);
    }
    strcpy(buf, path);
    while ((dot = strchr(p, '.'))) {
        json_object *next;
        *dot = '\0';
        if (!*p) {
            return vd_error_set(err, -EINVAL, "Invalid parameter '%s'",
                                path);
        }
        if (!json_object_object_get_ex(cur, p, &next)) {
            next = json_object_new_object();
            json_object_object_add(cur, p, next);
        } else if (!json_object_is_type(next, json_type_object)) {
            return vd_error_set(err, -EINVAL, "Parameters '%s.*' conflict "
                                "with parameter '%s'", p, p);
        }
        cur = next;
        p = dot + 1;
    }
    if (!*p) {
        return vd_error_set(err, -EINVAL, "Invalid parameter '%s'", path);
    }
    {
        json_object *old;
        if (json_object_object_get_ex(cur, p, &old) &&
            json_object_is_type(old, json_type_object)) {
            return vd_error_set(err, -EINVAL, "Parameters '%s.*' conflict "
                                "with parameter '%s'", p, p);
        }
    }
    json_object_object_add(cur, p, json_object_new_string(value));
    return 0;
}

json_object *qmp_parse_cli_object(const char *str, const char *implied,
                                  vd_error *err)
{
    json_object *root;
    vd_opts *opts;

    if (str[0] == '{') {
        json_tokener *tok = json_tokener_new();
        int len = (int)strlen(str);

        if (!tok) {
            vd_error_set(err, -ENOMEM, "out of memory");
            return NULL;
        }
        root = json_tokener_parse_ex(tok, str, len);
        if (!root || json_tokener_get_error(tok) != json_tokener_success ||
            json_tokener_get_parse_end(tok) != (size_t)len ||
            !json_object_is_type(root, json_type_object)) {
            vd_error_set(err, -EINVAL, "Invalid JSON object: %s",
                         root ? "not a single object"
                         : json_tokener_error_desc(
                               json_tokener_get_error(tok)));
            json_object_put(root);
            root = NULL;
        }
        json_tokener_free(tok);
        return root;
    }
    opts = vd_opts_new();
    root = json_object_new_object();
    if (!opts || !root) {
        vd_opts_free(&opts);
        json_object_put(root);
        vd_error_set(err, -ENOMEM, "out of memory");
        return NULL;
    }
    if (vd_opts_parse(opts, str, implied, err) < 0) {
        goto fail;
    }
    for (size_t i = 0; i < vd_opts_count(opts); i++) {
        const char *k, *v;
        vd_opts_nth(opts, i, &k, &v);
        if (keyval_set(root, k, v, err) < 0) {
            goto fail;
        }
    }
    vd_opts_free(&opts);
    return root;

fail:
    vd_opts_free(&opts);
    json_object_put(root);
    return NULL;
}
