/*
 * QMP's job commands on the library's jobs (include/vdisk/job.h):
 * block-stream, query-jobs, query-block-jobs, the job-* verbs and their
 * block-job-* forms, and the job events, each as qemu-storage-daemon
 * 7.2 words and shapes it (../shared/specs/job.json,
 * ../shared/specs/block-core.json).
 *
 * The handlers run under the daemon's big lock and the library's graph
 * lock (monitor.c); the library does the work and checks what QEMU's
 * job layer checks, so this file only resolves names and builds JSON.
 * Events come from the library's listener, in whichever thread changed
 * the job, and go to every negotiated client.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vdisk/job.h"
#include "qmp-int.h"

static const char *arg_s(json_object *args, const char *name)
{
    json_object *v;
    return json_object_object_get_ex(args, name, &v) ? json_object_get_string(v)
                                                     : NULL;
}

static bool arg_b(json_object *args, const char *name, bool dflt)
{
    json_object *v;
    return json_object_object_get_ex(args, name, &v)
           ? json_object_get_boolean(v) : dflt;
}

static json_object *fail_err(qmp_error *e, const vd_error *err, int r)
{
    (void)r;
    return qmp_fail(e, NULL, "%s", err->message);
}

/* QEMU's bdrv_lookup_bs() with a device and a node name. */
static vd_node *lookup(const char *device, const char *node_name,
                       qmp_error *e)
{
    vd_node *n = node_name ? vd_find_node(node_name) : NULL;
    if (!n)
        qmp_fail(e, NULL, "Cannot find device='%s' nor node-name='%s'",
                 device ? device : "", node_name ? node_name : "");
    return n;
}

static vd_node *backing_of(vd_node *n)
{
    return vd_node_child(n, "backing");
}

/* QEMU's bdrv_find_backing_image(): the layer below @top that @name
 * names, a relative name being relative to the directory of the layer
 * above it (as a backing file name in that layer's header would be).
 * QEMU 7.2 finds nothing in a chain given by node references (those
 * nodes have json: file names there); vdisk compares file names all the
 * same (docs/jobs.md). */
static vd_node *find_backing_image(vd_node *top, const char *name)
{
    char want[PATH_MAX], have[PATH_MAX], joined[PATH_MAX];
    for (vd_node *over = top, *n = backing_of(top); n;
         over = n, n = backing_of(n)) {
        const char *f = vd_node_filename(n);
        const char *of = vd_node_filename(over);
        if (!f || !of)
            continue;
        if (name[0] == '/' || !strchr(of, '/')) {
            snprintf(joined, sizeof(joined), "%s", name);
        } else {
            int dl = (int)(strrchr(of, '/') - of);
            snprintf(joined, sizeof(joined), "%.*s/%s", dl, of, name);
        }
        if (strcmp(f, joined) == 0)
            return n;
        if (realpath(joined, want) && realpath(f, have) &&
            strcmp(want, have) == 0)
            return n;
    }
    return NULL;
}

static bool chain_contains(vd_node *top, vd_node *n)
{
    for (vd_node *p = top; p; p = backing_of(p))
        if (p == n)
            return true;
    return false;
}

static int common_opts(json_object *args, vd_job_options *o, qmp_error *e)
{
    json_object *v;
    memset(o, 0, sizeof(*o));
    /* QEMU falls back to the device name, which nodes of the daemon do
     * not have: an empty id, refused as QEMU refuses it. */
    o->id = arg_s(args, "job-id");
    if (!o->id)
        o->id = "";
    if (json_object_object_get_ex(args, "speed", &v))
        o->speed = json_object_get_int64(v);
    /* on-error (stream, commit) or on-source-error/on-target-error
     * (mirror, backup): the schema has checked the values already. */
    const char *oe = arg_s(args, "on-error");
    if (oe && vd_on_error_parse(oe, &o->on_error) < 0) {
        qmp_fail(e, NULL, "Invalid parameter 'on-error'");
        return -1;
    }
    oe = arg_s(args, "on-source-error");
    if (oe)
        vd_on_error_parse(oe, &o->on_error);
    oe = arg_s(args, "on-target-error");
    if (oe)
        vd_on_error_parse(oe, &o->on_target_error);
    o->manual_finalize = !arg_b(args, "auto-finalize", true);
    o->manual_dismiss = !arg_b(args, "auto-dismiss", true);
    return 0;
}

QMP_HANDLER(qmp_cmd_block_stream)
{
    (void)d;
    const char *device = arg_s(args, "device");
    const char *base = arg_s(args, "base");
    const char *base_node = arg_s(args, "base-node");
    const char *bottom = arg_s(args, "bottom");
    const char *backing_file = arg_s(args, "backing-file");
    vd_node *top, *base_bs = NULL;
    vd_job_options o;
    vd_error err = VD_ERROR_INIT;

    if (base && base_node)
        return qmp_fail(e, NULL, "'base' and 'base-node' cannot be specified "
                        "at the same time");
    if (base && bottom)
        return qmp_fail(e, NULL, "'base' and 'bottom' cannot be specified "
                        "at the same time");
    if (bottom && base_node)
        return qmp_fail(e, NULL, "'bottom' and 'base-node' cannot be "
                        "specified at the same time");
    if (common_opts(args, &o, e) < 0)
        return NULL;
    if (!(top = lookup(device, device, e)))
        return NULL;
    if (base && !(base_bs = find_backing_image(top, base)))
        return qmp_fail(e, NULL, "Can't find '%s' in the backing chain",
                        base);
    if (base_node) {
        if (!(base_bs = lookup(NULL, base_node, e)))
            return NULL;
        if (base_bs == top || !chain_contains(top, base_bs))
            return qmp_fail(e, NULL, "Node '%s' is not a backing image of "
                            "'%s'", base_node, device);
    }
    if (bottom) {
        vd_node *b = lookup(NULL, bottom, e);
        if (!b)
            return NULL;
        if (!chain_contains(top, b))
            return qmp_fail(e, NULL, "Node '%s' is not in a chain starting "
                            "from '%s'", bottom, device);
        base_bs = backing_of(b);
    }
    for (vd_node *n = top; n && n != base_bs; n = backing_of(n))
        if (vd_op_is_blocked(n, VD_OP_STREAM, &err))
            return fail_err(e, &err, err.code);
    if (!base_bs && backing_file)
        return qmp_fail(e, NULL, "backing file specified, but streaming the "
                        "entire chain");

    vd_job *job = NULL;
    int r = vd_stream_start(&job, top, base_bs, backing_file,
                            arg_b(args, "backing-mask-protocol", false), &o,
                            &err);
    if (r < 0)
        return fail_err(e, &err, r);
    vd_job_unref(&job);
    return json_object_new_object();
}

/* QEMU's qmp_get_root_bs() as block-commit words its failure. */
static vd_node *root_node(const char *device, qmp_error *e)
{
    vd_node *n = device ? vd_find_node(device) : NULL;
    if (!n) {
        qmp_fail(e, "DeviceNotFound", "Device '%s' not found",
                 device ? device : "");
        return NULL;
    }
    if (!vd_node_is_root(n)) {
        qmp_fail(e, NULL, "Need a root block node");
        return NULL;
    }
    return n;
}

QMP_HANDLER(qmp_cmd_block_commit)
{
    (void)d;
    const char *device = arg_s(args, "device");
    const char *top = arg_s(args, "top"), *top_node = arg_s(args, "top-node");
    const char *base = arg_s(args, "base");
    const char *base_node = arg_s(args, "base-node");
    const char *backing_file = arg_s(args, "backing-file");
    vd_node *bs, *top_bs, *base_bs = NULL;
    vd_job_options o;
    vd_error err = VD_ERROR_INIT;

    if (common_opts(args, &o, e) < 0)
        return NULL;
    if (!(bs = root_node(device, e)))
        return NULL;
    if (vd_op_is_blocked(bs, VD_OP_COMMIT_SOURCE, &err))
        return fail_err(e, &err, err.code);
    top_bs = bs;
    if (top_node && top)
        return qmp_fail(e, NULL, "'top-node' and 'top' are mutually "
                        "exclusive");
    if (top_node) {
        if (!(top_bs = lookup(NULL, top_node, e)))
            return NULL;
        if (!chain_contains(bs, top_bs))
            return qmp_fail(e, NULL, "'%s' is not in this backing file "
                            "chain", top_node);
    } else if (top && strcmp(vd_node_filename(bs), top) != 0) {
        top_bs = find_backing_image(bs, top);
    }
    if (!top_bs)
        return qmp_fail(e, NULL, "Top image file %s not found",
                        top ? top : "NULL");
    if (base_node && base)
        return qmp_fail(e, NULL, "'base-node' and 'base' are mutually "
                        "exclusive");
    if (base_node) {
        if (!(base_bs = lookup(NULL, base_node, e)))
            return NULL;
        if (!chain_contains(top_bs, base_bs))
            return qmp_fail(e, NULL, "'%s' is not in this backing file "
                            "chain", base_node);
    } else if (base) {
        if (!(base_bs = find_backing_image(top_bs, base)))
            return qmp_fail(e, NULL, "Can't find '%s' in the backing chain",
                            base);
    } else {
        for (base_bs = top_bs; backing_of(base_bs);)
            base_bs = backing_of(base_bs);
    }
    for (vd_node *n = top_bs; n; n = n == base_bs ? NULL : backing_of(n))
        if (vd_op_is_blocked(n, VD_OP_COMMIT_TARGET, &err))
            return fail_err(e, &err, err.code);
    if (top_bs == base_bs)
        return qmp_fail(e, NULL, "cannot commit an image into itself");
    unsigned perm;
    vd_node_get_perm(top_bs, &perm, NULL);
    if ((perm & VD_PERM_WRITE) || top_bs == bs) {
        if (backing_file)
            return qmp_fail(e, NULL, top_bs == bs
                            ? "'backing-file' specified, but 'top' is the "
                              "active layer"
                            : "'backing-file' specified, but 'top' has a "
                              "writer on it");
        /* QEMU names an active commit after the device it was asked
         * for when no id is given. */
        if (!arg_s(args, "job-id"))
            o.id = "";
    } else {
        vd_node *overlay = bs;
        while (backing_of(overlay) != top_bs)
            overlay = backing_of(overlay);
        if (vd_op_is_blocked(overlay, VD_OP_COMMIT_TARGET, &err))
            return fail_err(e, &err, err.code);
    }
    vd_job *job = NULL;
    int r = vd_commit_start(&job, bs, top_bs, base_bs, backing_file,
                            arg_b(args, "backing-mask-protocol", false), &o,
                            &err);
    if (r < 0)
        return fail_err(e, &err, r);
    vd_job_unref(&job);
    return json_object_new_object();
}

QMP_HANDLER(qmp_cmd_blockdev_mirror)
{
    (void)d;
    const char *device = arg_s(args, "device");
    const char *target = arg_s(args, "target");
    const char *replaces = arg_s(args, "replaces");
    const char *sync = arg_s(args, "sync");
    json_object *v;
    vd_job_options o;
    vd_mirror_options mo = { 0 };
    vd_error err = VD_ERROR_INIT;

    if (common_opts(args, &o, e) < 0)
        return NULL;
    vd_node *bs = lookup(device, device, e);
    if (!bs)
        return NULL;
    if (!vd_node_is_root(bs))
        return qmp_fail(e, NULL, "Need a root block node");
    vd_node *target_bs = lookup(target, target, e);
    if (!target_bs)
        return NULL;
    if (strcmp(sync, "incremental") == 0 || strcmp(sync, "bitmap") == 0)
        return qmp_fail(e, NULL, "Sync mode '%s' not supported", sync);
    mo.sync = strcmp(sync, "full") == 0 ? VD_MIRROR_SYNC_FULL
              : strcmp(sync, "top") == 0 ? VD_MIRROR_SYNC_TOP
              : VD_MIRROR_SYNC_NONE;
    if (json_object_object_get_ex(args, "granularity", &v))
        mo.granularity = (uint64_t)json_object_get_int64(v);
    if (json_object_object_get_ex(args, "buf-size", &v))
        mo.buf_size = json_object_get_int64(v);
    const char *cm = arg_s(args, "copy-mode");
    mo.write_blocking = cm && strcmp(cm, "write-blocking") == 0;
    if (replaces) {
        mo.replaces = vd_find_node(replaces);
        if (!mo.replaces)
            return qmp_fail(e, NULL, "Failed to find node with "
                            "node-name='%s'", replaces);
    }
    vd_job *job = NULL;
    int r = vd_mirror_start(&job, bs, target_bs, &mo, &o, &err);
    if (r < 0)
        return fail_err(e, &err, r);
    vd_job_unref(&job);
    return json_object_new_object();
}

QMP_HANDLER(qmp_cmd_blockdev_backup)
{
    const char *device = arg_s(args, "device");
    const char *target = arg_s(args, "target");
    const char *sync = arg_s(args, "sync");
    vd_job_options o;
    vd_error err = VD_ERROR_INIT;

    if (common_opts(args, &o, e) < 0)
        return NULL;
    vd_node *bs = lookup(device, device, e);
    if (!bs)
        return NULL;
    vd_node *target_bs = lookup(target, target, e);
    if (!target_bs)
        return NULL;
    /* The schema has checked sync's and bitmap-mode's values. */
    static const char *const syncs[] = {
        [VD_BACKUP_SYNC_FULL] = "full", [VD_BACKUP_SYNC_TOP] = "top",
        [VD_BACKUP_SYNC_NONE] = "none",
        [VD_BACKUP_SYNC_INCREMENTAL] = "incremental",
        [VD_BACKUP_SYNC_BITMAP] = "bitmap",
    };
    vd_backup_options bo = { .compress = arg_b(args, "compress", false),
                             .bitmap = arg_s(args, "bitmap") };
    for (size_t i = 0; i < sizeof(syncs) / sizeof(syncs[0]); i++)
        if (strcmp(sync, syncs[i]) == 0)
            bo.sync = (vd_backup_sync)i;
    const char *bm = arg_s(args, "bitmap-mode");
    if (bm)
        bo.bitmap_mode = strcmp(bm, "always") == 0 ? VD_BITMAP_SYNC_ALWAYS
                         : strcmp(bm, "never") == 0 ? VD_BITMAP_SYNC_NEVER
                         : VD_BITMAP_SYNC_ON_SUCCESS;
    vd_job *job = NULL;
    o.defer_start = d->txn_defer;
    int r = vd_backup_start_opts(&job, bs, target_bs, &bo, &o, &err);
    if (r < 0)
        return fail_err(e, &err, r);
    if (d->txn_defer)
        d->txn_job = job;         /* the transaction starts it */
    else
        vd_job_unref(&job);
    return json_object_new_object();
}

/* ---- drive-backup and drive-mirror: the target image made first ---- */

/* Creates @file as QEMU's bdrv_img_create() does for the drive-*
 * commands: @size bytes of @format, over @backing (or none). */
static int create_target(const char *file, const char *format,
                         vd_node *backing, int64_t size, qmp_error *e)
{
    vd_error err = VD_ERROR_INIT;
    if (vd_driver_features(format) == 0) {
        qmp_fail(e, NULL, "Unknown file format '%s'", format);
        return -EINVAL;
    }
    vd_opts *o = vd_opts_new();
    char sz[32];
    snprintf(sz, sizeof(sz), "%" PRId64, size);
    vd_opts_set(o, "size", sz);
    if (backing) {
        vd_opts_set(o, "backing_file", vd_node_filename(backing));
        vd_opts_set(o, "backing_fmt", vd_node_format(backing));
    }
    int r = vd_create(file, format, o, &err);
    vd_opts_free(&o);
    if (r < 0)
        fail_err(e, &err, r);
    return r;
}

/* Opens the target of a drive-* command, without its backing chain
 * unless @with_backing. */
static vd_node *open_target(const char *file, const char *format,
                            const char *node_name, bool unmap,
                            bool with_backing, qmp_error *e)
{
    vd_error err = VD_ERROR_INIT;
    vd_opts *o = vd_opts_new();
    if (node_name)
        vd_opts_set(o, "node-name", node_name);
    if (unmap) {
        vd_opts_set(o, "discard", "unmap");
        vd_opts_set(o, "detect-zeroes", "unmap");
    }
    vd_node *n = NULL;
    int r = vd_open(&n, file, format, o, VD_O_RDWR | VD_O_NO_USER |
                    VD_O_QUIET | (with_backing ? 0 : VD_O_NO_BACKING), &err);
    vd_opts_free(&o);
    if (r < 0) {
        fail_err(e, &err, r);
        return NULL;
    }
    return n;
}

QMP_HANDLER(qmp_cmd_drive_backup)
{
    const char *device = arg_s(args, "device");
    const char *file = arg_s(args, "target");
    const char *format = arg_s(args, "format");
    const char *mode = arg_s(args, "mode");
    const char *sync = arg_s(args, "sync");
    bool existing = mode && strcmp(mode, "existing") == 0;
    vd_node *bs = lookup(device, device, e);
    vd_error err = VD_ERROR_INIT;
    if (!bs)
        return NULL;
    if (!format && !existing)
        format = vd_node_format(bs);
    if (vd_op_is_blocked(bs, VD_OP_BACKUP_SOURCE, &err))
        return fail_err(e, &err, err.code);
    vd_node *source = NULL;
    if (strcmp(sync, "top") == 0) {
        source = backing_of(bs);
        if (!source)
            sync = "full";
    }
    if (strcmp(sync, "none") == 0)
        source = bs;
    if (!existing && create_target(file, format, source, vd_getlength(bs), e) < 0)
        return NULL;
    vd_node *target = open_target(file, format, NULL, true, false, e);
    if (!target)
        return NULL;
    int r = 0;
    if (strcmp(sync, "none") == 0) {
        /* The target reads through the source (QEMU's set_backing_hd). */
        r = vd_node_set_backing(target, bs, &err);
        if (r < 0) {
            vd_close(&target, NULL);
            return fail_err(e, &err, r);
        }
    }
    /* The rest is blockdev-backup's, on the node just opened. */
    json_object *a = json_object_new_object();
    json_object_object_foreach(args, k, v) {
        if (strcmp(k, "format") && strcmp(k, "mode") && strcmp(k, "target"))
            json_object_object_add(a, k, json_object_get(v));
    }
    json_object_object_add(a, "target",
                           json_object_new_string(vd_node_name(target)));
    json_object_object_add(a, "sync", json_object_new_string(sync));
    json_object *ret = qmp_cmd_blockdev_backup(d, a, e);
    json_object_put(a);
    vd_close(&target, NULL);
    return ret;
}

QMP_HANDLER(qmp_cmd_drive_mirror)
{
    (void)d;
    const char *device = arg_s(args, "device");
    const char *file = arg_s(args, "target");
    const char *format = arg_s(args, "format");
    const char *mode = arg_s(args, "mode");
    const char *sync = arg_s(args, "sync");
    const char *node_name = arg_s(args, "node-name");
    const char *replaces = arg_s(args, "replaces");
    bool existing = mode && strcmp(mode, "existing") == 0;
    vd_error err = VD_ERROR_INIT;
    json_object *v;
    vd_job_options o;
    vd_mirror_options mo = { 0 };

    if (common_opts(args, &o, e) < 0)
        return NULL;
    vd_node *bs = lookup(device, device, e);
    if (!bs)
        return NULL;
    if (!vd_node_is_root(bs))
        return qmp_fail(e, NULL, "Need a root block node");
    if (vd_op_is_blocked(bs, VD_OP_MIRROR_SOURCE, &err))
        return fail_err(e, &err, err.code);
    if (!format && !existing)
        format = vd_node_format(bs);
    vd_node *target_backing = backing_of(bs);
    if (!target_backing && strcmp(sync, "top") == 0)
        sync = "full";
    if (strcmp(sync, "none") == 0)
        target_backing = bs;
    if (replaces && !node_name)
        return qmp_fail(e, NULL, "a node-name must be provided when "
                        "replacing a named node of the graph");
    if (!existing &&
        create_target(file, format, strcmp(sync, "full") == 0
                      ? NULL : target_backing, vd_getlength(bs), e) < 0)
        return NULL;
    /* mode=existing: the target keeps the backing chain its header names
     * (QEMU opens it at job-complete; a target of a sync=top mirror
     * would otherwise lose what lies below the source's own layer). */
    vd_node *target = open_target(file, format, node_name, false, existing,
                                  e);
    if (!target)
        return NULL;
    mo.sync = strcmp(sync, "full") == 0 ? VD_MIRROR_SYNC_FULL
              : strcmp(sync, "top") == 0 ? VD_MIRROR_SYNC_TOP
              : VD_MIRROR_SYNC_NONE;
    /* A new image reads as zeros: only what the source holds is copied. */
    mo.target_is_zero = !existing;
    /* absolute-paths: the target gets the source's backing chain. */
    if (!existing && mo.sync != VD_MIRROR_SYNC_FULL)
        mo.target_backing = target_backing;
    if (json_object_object_get_ex(args, "granularity", &v))
        mo.granularity = (uint64_t)json_object_get_int64(v);
    if (json_object_object_get_ex(args, "buf-size", &v))
        mo.buf_size = json_object_get_int64(v);
    mo.no_unmap = !arg_b(args, "unmap", true);
    const char *cm = arg_s(args, "copy-mode");
    mo.write_blocking = cm && strcmp(cm, "write-blocking") == 0;
    if (replaces && !(mo.replaces = vd_find_node(replaces))) {
        vd_close(&target, NULL);
        return qmp_fail(e, NULL, "Failed to find node with "
                            "node-name='%s'", replaces);
    }
    vd_job *job = NULL;
    int r = vd_mirror_start(&job, bs, target, &mo, &o, &err);
    vd_close(&target, NULL);
    if (r < 0)
        return fail_err(e, &err, r);
    vd_job_unref(&job);
    return json_object_new_object();
}

/* ---- live external snapshots ---- */

QMP_HANDLER(qmp_cmd_blockdev_snapshot)
{
    vd_error err = VD_ERROR_INIT;
    const char *node = arg_s(args, "node"), *overlay = arg_s(args, "overlay");
    vd_node *old = lookup(node, node, e);
    if (!old)
        return NULL;
    if (vd_op_is_blocked(old, VD_OP_EXTERNAL_SNAPSHOT, &err))
        return fail_err(e, &err, err.code);
    vd_node *new = lookup(overlay, overlay, e);
    if (!new)
        return NULL;
    (void)d;
    int r = vd_snapshot_append(old, new, &err);
    return r < 0 ? fail_err(e, &err, r) : json_object_new_object();
}

QMP_HANDLER(qmp_cmd_blockdev_snapshot_sync)
{
    vd_error err = VD_ERROR_INIT;
    const char *device = arg_s(args, "device");
    const char *node_name = arg_s(args, "node-name");
    const char *file = arg_s(args, "snapshot-file");
    const char *snap_name = arg_s(args, "snapshot-node-name");
    const char *format = arg_s(args, "format");
    const char *mode = arg_s(args, "mode");
    if (!format)
        format = "qcow2";
    /* QEMU's bdrv_lookup_bs(device, node-name): a daemon's nodes have
     * no device names, so only node-name finds one. */
    vd_node *old = lookup(device, node_name, e);
    if (!old)
        return NULL;
    if (vd_op_is_blocked(old, VD_OP_EXTERNAL_SNAPSHOT, &err))
        return fail_err(e, &err, err.code);
    if (node_name && !snap_name)
        return qmp_fail(e, NULL, "New overlay node-name missing");
    if (snap_name && vd_find_node(snap_name))
        return qmp_fail(e, NULL, "New overlay node-name already in use");
    int r;
    if (!mode || strcmp(mode, "existing") != 0) {
        if (vd_driver_features(format) == 0)
            return qmp_fail(e, NULL, "Unknown file format '%s'", format);
        vd_opts *o = vd_opts_new();
        char size[32];
        snprintf(size, sizeof(size), "%" PRId64, vd_getlength(old));
        vd_opts_set(o, "size", size);
        vd_opts_set(o, "backing_file", vd_node_filename(old));
        vd_opts_set(o, "backing_fmt", vd_node_format(old));
        r = vd_create(file, format, o, &err);
        vd_opts_free(&o);
        if (r < 0)
            return fail_err(e, &err, r);
    }
    vd_opts *o = vd_opts_new();
    if (snap_name)
        vd_opts_set(o, "node-name", snap_name);
    vd_node *new = NULL;
    r = vd_open(&new, file, format, o, VD_O_RDWR | VD_O_NO_BACKING |
                VD_O_NO_USER | VD_O_QUIET, &err);
    vd_opts_free(&o);
    if (r < 0)
        return fail_err(e, &err, r);
    r = vd_snapshot_append(old, new, &err);
    /* As QEMU: the new overlay lives on through what uses it now; used
     * by nothing, it goes again (the monitor does not own it). */
    vd_close(&new, NULL);
    (void)d;
    return r < 0 ? fail_err(e, &err, r) : json_object_new_object();
}

/* ---- queries ---- */

static void add_job_info(vd_job *job, const vd_job_info *i, void *opaque)
{
    (void)job;
    json_object *o = json_object_new_object();
    json_object_object_add(o, "id", json_object_new_string(i->id));
    json_object_object_add(o, "type",
                           json_object_new_string(vd_job_type_name(i->type)));
    json_object_object_add(o, "status", json_object_new_string(
                               vd_job_status_name(i->status)));
    json_object_object_add(o, "current-progress", json_object_new_int64(
                               (int64_t)i->current_progress));
    json_object_object_add(o, "total-progress", json_object_new_int64(
                               (int64_t)i->total_progress));
    if (i->error)
        json_object_object_add(o, "error", json_object_new_string(i->error));
    json_object_array_add(opaque, o);
}

QMP_HANDLER(qmp_cmd_query_jobs)
{
    (void)d;
    (void)args;
    (void)e;
    json_object *list = json_object_new_array();
    vd_foreach_job(add_job_info, list);
    return list;
}

/* The members BlockJobInfo and the block-job events open with. */
static void add_type_device_progress(json_object *o, const vd_job_info *i)
{
    json_object_object_add(o, "type",
                           json_object_new_string(vd_job_type_name(i->type)));
    json_object_object_add(o, "device", json_object_new_string(i->id));
    json_object_object_add(o, "len",
                           json_object_new_int64((int64_t)i->total_progress));
    json_object_object_add(o, "offset", json_object_new_int64(
                               (int64_t)i->current_progress));
}

static json_object *block_job_info(const vd_job_info *i)
{
    json_object *o = json_object_new_object();
    add_type_device_progress(o, i);
    json_object_object_add(o, "busy", json_object_new_boolean(i->busy));
    json_object_object_add(o, "paused", json_object_new_boolean(i->paused));
    json_object_object_add(o, "speed", json_object_new_int64(i->speed));
    json_object_object_add(o, "io-status", json_object_new_string(
                               vd_io_status_name(i->io_status)));
    json_object_object_add(o, "ready", json_object_new_boolean(i->ready));
    json_object_object_add(o, "status", json_object_new_string(
                               vd_job_status_name(i->status)));
    json_object_object_add(o, "auto-finalize",
                           json_object_new_boolean(i->auto_finalize));
    json_object_object_add(o, "auto-dismiss",
                           json_object_new_boolean(i->auto_dismiss));
    if (i->error)
        json_object_object_add(o, "error", json_object_new_string(i->error));
    return o;
}

static void add_block_job_info(vd_job *job, const vd_job_info *i,
                               void *opaque)
{
    (void)job;
    json_object_array_add(opaque, block_job_info(i));
}

QMP_HANDLER(qmp_cmd_query_block_jobs)
{
    (void)d;
    (void)args;
    (void)e;
    json_object *list = json_object_new_array();
    vd_foreach_job(add_block_job_info, list);
    return list;
}

/* ---- verbs ---- */

/* job-*: "Job not found" (GenericError). */
static vd_job *find_job(json_object *args, qmp_error *e)
{
    vd_job *job = vd_job_find(arg_s(args, "id"));
    if (!job)
        qmp_fail(e, NULL, "Job not found");
    return job;
}

/* block-job-*: "Block job 'X' not found" (DeviceNotActive). */
static vd_job *find_block_job(const char *id, qmp_error *e)
{
    vd_job *job = vd_job_find(id);
    if (!job)
        qmp_fail(e, "DeviceNotActive", "Block job '%s' not found", id);
    return job;
}

static json_object *verb_result(int r, const vd_error *err, qmp_error *e)
{
    if (r < 0)
        return fail_err(e, err, r);
    return json_object_new_object();
}

#define JOB_VERB(handler, lookup_expr, call)                         \
    QMP_HANDLER(handler)                                              \
    {                                                                 \
        (void)d;                                                      \
        vd_error err = VD_ERROR_INIT;                                 \
        vd_job *job = lookup_expr;                                    \
        if (!job)                                                     \
            return NULL;                                              \
        int r = call;                                                 \
        return verb_result(r, &err, e);                               \
    }

JOB_VERB(qmp_cmd_job_pause, find_job(args, e), vd_job_pause(job, &err))
JOB_VERB(qmp_cmd_job_resume, find_job(args, e), vd_job_resume(job, &err))
JOB_VERB(qmp_cmd_job_cancel, find_job(args, e),
         vd_job_cancel(job, true, &err))
JOB_VERB(qmp_cmd_job_complete, find_job(args, e),
         vd_job_complete(job, &err))
JOB_VERB(qmp_cmd_job_finalize, find_job(args, e),
         vd_job_finalize(job, &err))
JOB_VERB(qmp_cmd_job_dismiss, find_job(args, e), vd_job_dismiss(job, &err))
JOB_VERB(qmp_cmd_block_job_pause, find_block_job(arg_s(args, "device"), e),
         vd_job_pause(job, &err))
JOB_VERB(qmp_cmd_block_job_resume, find_block_job(arg_s(args, "device"), e),
         vd_job_resume(job, &err))
JOB_VERB(qmp_cmd_block_job_complete,
         find_block_job(arg_s(args, "device"), e),
         vd_job_complete(job, &err))
JOB_VERB(qmp_cmd_block_job_finalize, find_block_job(arg_s(args, "id"), e),
         vd_job_finalize(job, &err))
JOB_VERB(qmp_cmd_block_job_dismiss, find_block_job(arg_s(args, "id"), e),
         vd_job_dismiss(job, &err))

QMP_HANDLER(qmp_cmd_block_job_cancel)
{
    (void)d;
    vd_error err = VD_ERROR_INIT;
    const char *device = arg_s(args, "device");
    vd_job *job = find_block_job(device, e);
    if (!job)
        return NULL;
    bool force = arg_b(args, "force", false);
    vd_job_info i;
    if (!force && vd_job_get_info(job, &i) == 0) {
        bool paused = i.paused && i.status != VD_JOB_STATUS_CONCLUDED;
        vd_job_info_clear(&i);
        if (paused)
            return qmp_fail(e, NULL, "The block job for device '%s' is "
                            "currently paused", device);
    }
    return verb_result(vd_job_cancel(job, force, &err), &err, e);
}

QMP_HANDLER(qmp_cmd_block_job_set_speed)
{
    (void)d;
    vd_error err = VD_ERROR_INIT;
    json_object *v;
    vd_job *job = find_block_job(arg_s(args, "device"), e);
    if (!job)
        return NULL;
    json_object_object_get_ex(args, "speed", &v);
    return verb_result(vd_job_set_speed(job, json_object_get_int64(v), &err),
                       &err, e);
}

/* ---- events ---- */

static void job_event(const vd_job_event *ev, void *opaque)
{
    qmp_daemon *d = opaque;
    const vd_job_info *i = ev->info;
    const char *type = vd_job_type_name(i->type);
    json_object *data = json_object_new_object();
    const char *name = NULL;

    switch (ev->type) {
    case VD_JOB_EVENT_STATUS_CHANGE:
        name = "JOB_STATUS_CHANGE";
        json_object_object_add(data, "id", json_object_new_string(i->id));
        json_object_object_add(data, "status", json_object_new_string(
                                   vd_job_status_name(i->status)));
        break;
    case VD_JOB_EVENT_PENDING:
        name = "BLOCK_JOB_PENDING";
        json_object_object_add(data, "type", json_object_new_string(type));
        json_object_object_add(data, "id", json_object_new_string(i->id));
        break;
    case VD_JOB_EVENT_ERROR:
        name = "BLOCK_JOB_ERROR";
        json_object_object_add(data, "device", json_object_new_string(i->id));
        json_object_object_add(data, "operation", json_object_new_string(
                                   ev->is_read ? "read" : "write"));
        json_object_object_add(data, "action", json_object_new_string(
                                   vd_error_action_name(ev->action)));
        break;
    case VD_JOB_EVENT_READY:
    case VD_JOB_EVENT_COMPLETED:
    case VD_JOB_EVENT_CANCELLED:
        name = ev->type == VD_JOB_EVENT_READY ? "BLOCK_JOB_READY"
               : ev->type == VD_JOB_EVENT_COMPLETED ? "BLOCK_JOB_COMPLETED"
               : "BLOCK_JOB_CANCELLED";
        add_type_device_progress(data, i);
        json_object_object_add(data, "speed", json_object_new_int64(i->speed));
        if (ev->type == VD_JOB_EVENT_COMPLETED && i->error)
            json_object_object_add(data, "error",
                                   json_object_new_string(i->error));
        break;
    }
    qmp_emit_event(d, name, data);
}

int qmp_jobs_init(qmp_daemon *d)
{
    return vd_job_listen(job_event, d);
}

void qmp_jobs_fini(qmp_daemon *d)
{
    vd_job_unlisten(job_event, d);
}
