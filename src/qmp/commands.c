/*
 * The QMP command handlers and the daemon state they act on.
 *
 * Each handler receives arguments already checked against its schema in
 * schema.c and runs under the daemon's big lock (qmp-int.h), so the
 * tables of monitor-owned nodes and of exports need no other locking.
 * Return values and error texts follow what QEMU 7.2's
 * qemu-storage-daemon answers; tests/cli/qmp-compat.sh compares the two.
 *
 * Order of the file: helpers, the protocol commands, nodes
 * (blockdev-add/del, queries, resize), the NBD server and exports,
 * snapshots, objects (the library's registry: object-add, object-del,
 * qom-list, qom-get, qom-set), then daemon teardown.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "qmp-int.h"


/* ---- helpers ---- */

static const char *arg_str(json_object *args, const char *name)
{
    json_object *v;

    if (args && json_object_object_get_ex(args, name, &v) &&
        json_object_is_type(v, json_type_string)) {
        return json_object_get_string(v);
    }
    return NULL;
}

static bool arg_bool(json_object *args, const char *name, bool def)
{
    json_object *v;

    if (args && json_object_object_get_ex(args, name, &v) &&
        json_object_is_type(v, json_type_boolean)) {
        return json_object_get_boolean(v);
    }
    return def;
}

static json_object *fail_vd(qmp_error *e, const vd_error *err, int r,
                            const char *fallback)
{
    if (err->message[0]) {
        return qmp_fail(e, NULL, "%s", err->message);
    }
    return qmp_fail(e, NULL, "%s: %s", fallback, strerror(-r));
}

/* fail_vd() for an error about @node: QMP answers, as QEMU's, do not
 * start with the file name the library puts first. */
static json_object *fail_vd_node(qmp_error *e, const vd_error *err, int r,
                                 vd_node *node, const char *fallback)
{
    const char *f = vd_node_filename(node);
    size_t n = f ? strlen(f) : 0;

    if (n && strncmp(err->message, f, n) == 0 &&
        strncmp(err->message + n, ": ", 2) == 0) {
        return qmp_fail(e, NULL, "%s", err->message + n + 2);
    }
    return fail_vd(e, err, r, fallback);
}

static ssize_t owned_index(qmp_daemon *d, vd_node *node)
{
    for (size_t i = 0; i < d->nb_nodes; i++) {
        if (d->nodes[i] == node) {
            return (ssize_t)i;
        }
    }
    return -1;
}

static qmp_export *find_export_id(qmp_daemon *d, const char *id)
{
    for (size_t i = 0; i < d->nb_exports; i++) {
        if (strcmp(d->exports[i].id, id) == 0) {
            return &d->exports[i];
        }
    }
    return NULL;
}

static json_object *jint(int64_t v)
{
    return json_object_new_int64(v);
}

/* ---- protocol commands ---- */

QMP_HANDLER(qmp_cmd_capabilities)
{
    (void)d;
    (void)args;
    (void)e;
    /* The monitor handles negotiation state; reaching here is success. */
    return json_object_new_object();
}

QMP_HANDLER(qmp_cmd_query_version)
{
    json_object *r = json_object_new_object();
    json_object *q = json_object_new_object();

    (void)d;
    (void)args;
    (void)e;
    /* vdisk answers with the QEMU release whose behaviour it follows. */
    json_object_object_add(q, "micro", jint(0));
    json_object_object_add(q, "minor", jint(2));
    json_object_object_add(q, "major", jint(7));
    json_object_object_add(r, "qemu", q);
    {
        char pkg[64];
        snprintf(pkg, sizeof(pkg), "vdisk %s", vd_version());
        json_object_object_add(r, "package", json_object_new_string(pkg));
    }
    return r;
}

QMP_HANDLER(qmp_cmd_query_commands)
{
    json_object *r = json_object_new_array();

    (void)d;
    (void)args;
    (void)e;
    for (const qmp_cmd *c = qmp_commands; c->name; c++) {
        json_object *o = json_object_new_object();
        json_object_object_add(o, "name", json_object_new_string(c->name));
        json_object_array_add(r, o);
    }
    return r;
}

QMP_HANDLER(qmp_cmd_quit)
{
    (void)args;
    (void)e;
    qmp_daemon_quit(d, "host-qmp-quit");
    return json_object_new_object();
}

/* ---- nodes ---- */

QMP_HANDLER(qmp_cmd_blockdev_add)
{
    const char *name = arg_str(args, "node-name");
    vd_error err = VD_ERROR_INIT;
    vd_opts *o;
    vd_node *node = NULL, **nv;
    unsigned flags = arg_bool(args, "read-only", false) ? 0 : VD_O_RDWR;
    int r;

    if (!name) {
        return qmp_fail(e, NULL, "'node-name' must be specified for the root "
                        "node");
    }
    o = vd_opts_new();
    if (!o) {
        return qmp_fail(e, NULL, "out of memory");
    }
    /* BlockdevOptions become the dotted keys vd_open() takes, flattened
     * as json: filenames are. */
    r = vd_opts_from_json(o, json_object_to_json_string_ext(
                                 args, JSON_C_TO_STRING_PLAIN), &err);
    if (r < 0) {
        vd_opts_free(&o);
        return fail_vd(e, &err, r, "Invalid options");
    }
    /* read-only is a flag here: let the children inherit it. */
    vd_opts_del(o, "read-only");
    /* A node of the daemon has no user of its own: only exports and
     * commands that use it take permissions, as in qemu-storage-daemon. */
    r = vd_open(&node, NULL, NULL, o, flags | VD_O_QUIET | VD_O_NO_USER,
                &err);
    vd_opts_free(&o);
    if (r < 0) {
        return fail_vd(e, &err, r, "Could not open node");
    }
    nv = realloc(d->nodes, (d->nb_nodes + 1) * sizeof(*nv));
    if (!nv) {
        vd_close(&node, NULL);
        return qmp_fail(e, NULL, "out of memory");
    }
    d->nodes = nv;
    d->nodes[d->nb_nodes++] = node;
    return json_object_new_object();
}

QMP_HANDLER(qmp_cmd_blockdev_del)
{
    const char *name = arg_str(args, "node-name");
    vd_node *node = vd_find_node(name);
    vd_error err = VD_ERROR_INIT;
    ssize_t i;

    if (!node) {
        return qmp_fail(e, NULL, "Failed to find node with node-name='%s'",
                        name);
    }
    if (vd_node_has_users(node)) {
        return qmp_fail(e, NULL, "Node %s is in use", name);
    }
    if (vd_op_is_blocked(node, VD_OP_DRIVE_DEL, &err)) {
        return fail_vd(e, &err, -EBUSY, "in use");
    }
    i = owned_index(d, node);
    if (i < 0) {
        return qmp_fail(e, NULL, "Node %s is not owned by the monitor", name);
    }
    if (vd_node_parent_count(node) > 0) {
        return qmp_fail(e, NULL, "Block device %s is in use", name);
    }
    memmove(&d->nodes[i], &d->nodes[i + 1],
            (d->nb_nodes - (size_t)i - 1) * sizeof(*d->nodes));
    d->nb_nodes--;
    if (vd_close(&node, &err) < 0) {
        /* Closed anyway; the flush error is worth reporting. */
        return fail_vd(e, &err, -EIO, "flush failed");
    }
    return json_object_new_object();
}

/* Collects every open node, newest first, as QEMU lists them. */
typedef struct node_vec {
    vd_node *v[1024];
    size_t n;
} node_vec;

static void collect_node(vd_node *node, void *opaque)
{
    node_vec *nv = opaque;

    if (nv->n < sizeof(nv->v) / sizeof(nv->v[0])) {
        nv->v[nv->n++] = node;
    }
}

static void all_nodes(node_vec *nv)
{
    nv->n = 0;
    vd_foreach_node(collect_node, nv);
    for (size_t i = 0; i < nv->n / 2; i++) {
        vd_node *t = nv->v[i];
        nv->v[i] = nv->v[nv->n - 1 - i];
        nv->v[nv->n - 1 - i] = t;
    }
}

/* QEMU's ImageInfo of @node, with its backing chain nested in
 * "backing-image"; the members come from the library's formatter, as
 * `vdisk info --output=json` prints them. */
static json_object *image_info(vd_node *node, int depth)
{
    vd_image_info *info = NULL;
    json_object *o;
    vd_node *backing;
    char *text;

    if (vd_get_info(node, &info, NULL) < 0 || !info) {
        return NULL;
    }
    text = vd_image_info_to_json(info);
    vd_image_info_free(&info);
    o = text ? json_tokener_parse(text) : NULL;
    free(text);
    if (!o) {
        return NULL;
    }
    backing = vd_node_child(node, "backing");
    if (backing && depth < 64) {
        json_object *b = image_info(backing, depth + 1);
        if (b) {
            json_object_object_add(o, "backing-image", b);
        }
    }
    return o;
}

static json_object *block_device_info(vd_node *node)
{
    static const char *const dz[] = { "off", "on", "unmap" };
    json_object *o = json_object_new_object();
    json_object *cache = json_object_new_object();
    json_object *img, *shown = NULL;
    vd_node *b = vd_node_child(node, "backing");
    unsigned cf = vd_node_cache_flags(node);
    const char *file;
    int depth = 0;

    for (vd_node *n = b; n && depth < 100000; n = vd_node_child(n, "backing")) {
        depth++;
    }
    json_object_object_add(o, "iops_rd", jint(0));
    json_object_object_add(o, "detect_zeroes", json_object_new_string(
                               dz[vd_node_detect_zeroes(node) % 3]));
    img = image_info(node, 0);
    if (img) {
        json_object_object_add(o, "image", img);
    }
    json_object_object_add(o, "iops_wr", jint(0));
    json_object_object_add(o, "ro", json_object_new_boolean(
                               vd_node_is_read_only(node)));
    json_object_object_add(o, "node-name",
                           json_object_new_string(vd_node_name(node)));
    json_object_object_add(o, "backing_file_depth", jint(depth));
    json_object_object_add(o, "drv",
                           json_object_new_string(vd_node_format(node)));
    json_object_object_add(o, "iops", jint(0));
    json_object_object_add(o, "bps_wr", jint(0));
    json_object_object_add(o, "write_threshold", jint(0));
    if (b) {
        const char *bf = vd_node_backing_file(node);
        json_object_object_add(o, "backing_file", json_object_new_string(
                                   bf ? bf : vd_node_filename(b)));
    }
    json_object_object_add(o, "encrypted", json_object_new_boolean(0));
    json_object_object_add(o, "bps", jint(0));
    json_object_object_add(o, "bps_rd", jint(0));
    json_object_object_add(cache, "no-flush", json_object_new_boolean(
                               (cf & VD_CACHE_NO_FLUSH) != 0));
    json_object_object_add(cache, "direct", json_object_new_boolean(
                               (cf & VD_CACHE_DIRECT) != 0));
    json_object_object_add(cache, "writeback", json_object_new_boolean(
                               (cf & VD_CACHE_WRITEBACK) != 0));
    json_object_object_add(o, "cache", cache);
    /* The filename QEMU shows, which the image's info already holds. */
    if (img) {
        json_object_object_get_ex(img, "filename", &shown);
    }
    file = shown ? json_object_get_string(shown) : vd_node_filename(node);
    json_object_object_add(o, "file", json_object_new_string(file ? file
                                                                   : ""));
    return o;
}

QMP_HANDLER(qmp_cmd_query_named_block_nodes)
{
    json_object *r = json_object_new_array();
    node_vec *nv = malloc(sizeof(*nv));

    (void)d;
    (void)args;
    if (!nv) {
        json_object_put(r);
        return qmp_fail(e, NULL, "out of memory");
    }
    all_nodes(nv);
    for (size_t i = 0; i < nv->n; i++) {
        json_object_array_add(r, block_device_info(nv->v[i]));
    }
    free(nv);
    return r;
}

static json_object *stats_json(vd_node *node)
{
    vd_stats s;
    json_object *o = json_object_new_object();
    int64_t len = vd_getlength(node);

    vd_get_stats(node, &s);
    json_object_object_add(o, "unmap_operations",
                           jint((int64_t)s.unmap_operations));
    json_object_object_add(o, "unmap_merged", jint(0));
    json_object_object_add(o, "flush_total_time_ns",
                           jint((int64_t)s.flush_total_time_ns));
    /* Not tracked per request; the end of the written area is the best
     * bound we have once anything was written. */
    json_object_object_add(o, "wr_highest_offset",
                           jint(s.wr_operations && len > 0 ? len : 0));
    json_object_object_add(o, "wr_total_time_ns",
                           jint((int64_t)s.wr_total_time_ns));
    json_object_object_add(o, "failed_wr_operations",
                           jint((int64_t)s.failed_wr_operations));
    json_object_object_add(o, "failed_rd_operations",
                           jint((int64_t)s.failed_rd_operations));
    json_object_object_add(o, "wr_merged", jint(0));
    json_object_object_add(o, "wr_bytes", jint((int64_t)s.wr_bytes));
    json_object_object_add(o, "timed_stats", json_object_new_array());
    json_object_object_add(o, "failed_unmap_operations",
                           jint((int64_t)s.failed_unmap_operations));
    json_object_object_add(o, "failed_flush_operations",
                           jint((int64_t)s.failed_flush_operations));
    json_object_object_add(o, "account_invalid", json_object_new_boolean(0));
    json_object_object_add(o, "rd_total_time_ns",
                           jint((int64_t)s.rd_total_time_ns));
    json_object_object_add(o, "invalid_unmap_operations", jint(0));
    json_object_object_add(o, "flush_operations",
                           jint((int64_t)s.flush_operations));
    json_object_object_add(o, "wr_operations",
                           jint((int64_t)s.wr_operations));
    json_object_object_add(o, "unmap_bytes", jint((int64_t)s.unmap_bytes));
    json_object_object_add(o, "rd_merged", jint(0));
    json_object_object_add(o, "rd_bytes", jint((int64_t)s.rd_bytes));
    json_object_object_add(o, "unmap_total_time_ns",
                           jint((int64_t)s.unmap_total_time_ns));
    json_object_object_add(o, "invalid_flush_operations", jint(0));
    json_object_object_add(o, "account_failed", json_object_new_boolean(0));
    json_object_object_add(o, "rd_operations",
                           jint((int64_t)s.rd_operations));
    json_object_object_add(o, "invalid_wr_operations", jint(0));
    json_object_object_add(o, "invalid_rd_operations", jint(0));
    return o;
}

static json_object *block_stats(vd_node *node, int depth)
{
    json_object *o = json_object_new_object();
    vd_node *file = vd_node_child(node, "file");

    /* Node-level statistics follow the file child only ("parent", as
     * QEMU names it); QEMU adds "backing" only for block backends. */
    if (file && depth < 64) {
        json_object_object_add(o, "parent", block_stats(file, depth + 1));
    }
    json_object_object_add(o, "stats", stats_json(node));
    json_object_object_add(o, "node-name",
                           json_object_new_string(vd_node_name(node)));
    vd_driver_stats s;
    if (vd_get_driver_stats(node, &s) == 0) {
        json_object *ds = json_object_new_object();
        json_object_object_add(ds, "discard-bytes-ok",
                               jint((int64_t)s.discard_bytes_ok));
        json_object_object_add(ds, "discard-nb-ok",
                               jint((int64_t)s.discard_nb_ok));
        json_object_object_add(ds, "driver", json_object_new_string(s.driver));
        json_object_object_add(ds, "discard-nb-failed",
                               jint((int64_t)s.discard_nb_failed));
        json_object_object_add(o, "driver-specific", ds);
    }
    return o;
}

QMP_HANDLER(qmp_cmd_query_blockstats)
{
    json_object *r = json_object_new_array();
    node_vec *nv;

    (void)d;
    /* Without query-nodes QEMU lists its named block backends, which a
     * storage daemon has none of. */
    if (!arg_bool(args, "query-nodes", false)) {
        return r;
    }
    nv = malloc(sizeof(*nv));
    if (!nv) {
        json_object_put(r);
        return qmp_fail(e, NULL, "out of memory");
    }
    all_nodes(nv);
    for (size_t i = 0; i < nv->n; i++) {
        json_object_array_add(r, block_stats(nv->v[i], 0));
    }
    free(nv);
    return r;
}

/*
 * block_resize as qemu-storage-daemon: an operation blocker (a backing
 * node belongs to its overlay) answers "Device ... is in use"; then the
 * command becomes a user of the node holding resize, which the core
 * refuses with QEMU's permission conflict when an export or a format
 * above does not share it.
 */
QMP_HANDLER(qmp_cmd_block_resize)
{
    const char *dev = arg_str(args, "device");
    const char *nn = arg_str(args, "node-name");
    json_object *sz;
    int64_t size;
    vd_node *node = nn ? vd_find_node(nn) : NULL;
    vd_error err = VD_ERROR_INIT;
    vd_user *user = NULL;
    int r;

    json_object_object_get_ex(args, "size", &sz);
    size = json_object_get_int64(sz);
    if (!node) {
        return qmp_fail(e, NULL, "Cannot find device='%s' nor node-name='%s'",
                        dev ? dev : "", nn ? nn : "");
    }
    if (size < 0) {
        return qmp_fail(e, NULL, "Parameter 'size' expects a >0 size");
    }
    if (vd_op_is_blocked(node, VD_OP_RESIZE, NULL)) {
        /* QEMU prints the absent device argument with glibc's "(null)". */
        return qmp_fail(e, NULL, "Device '%s' is in use",
                        dev ? dev : "(null)");
    }
    r = vd_user_new(&user, node, NULL, VD_PERM_RESIZE, VD_PERM_ALL, &err);
    if (r < 0) {
        return fail_vd(e, &err, r, "Could not resize");
    }
    if (vd_node_is_read_only(node)) {
        vd_user_free(&user);
        return qmp_fail(e, NULL, "Image is read-only");
    }
    r = vd_truncate(node, (uint64_t)size, true, VD_PREALLOC_OFF, &err);
    vd_user_free(&user);
    if (r < 0) {
        return fail_vd_node(e, &err, r, node, "Could not resize");
    }
    /* Exports do not share resize, so none of them serves this node;
     * this keeps an export's advertised length true all the same. */
    if (d->nbd) {
        vd_nbd_server_update_export_size(d->nbd, node);
    }
    return json_object_new_object();
}

/* ---- NBD server and exports ---- */

static void *nbd_thread_main(void *opaque)
{
    qmp_daemon *d = opaque;
    vd_error err = VD_ERROR_INIT;

    if (vd_nbd_server_run(d->nbd, &err) < 0) {
        fprintf(stderr, "vdisk serve: %s\n", err.message);
    }
    return NULL;
}

QMP_HANDLER(qmp_cmd_nbd_server_start)
{
    json_object *addr, *data;
    const char *type;
    const char *tls_id = arg_str(args, "tls-creds");
    vd_error err = VD_ERROR_INIT;
    vd_nbd_server *srv;
    vd_nbd_tls_creds *creds = NULL;
    int r;
    int64_t maxc = 0;
    json_object *mc;

    if (d->nbd) {
        return qmp_fail(e, NULL, "NBD server already running");
    }
    if (arg_str(args, "tls-authz")) {
        /* QEMU would check client identities against an authz object;
         * vdisk has none, and ignoring the option would let in clients
         * the caller meant to keep out. */
        return qmp_fail(e, NULL, "'tls-authz' is not supported: vdisk has "
                        "no authorization objects");
    }
    if (json_object_object_get_ex(args, "max-connections", &mc)) {
        maxc = json_object_get_int64(mc);
        if (maxc < 0 || maxc > 65535) {
            return qmp_fail(e, NULL, "Parameter 'max-connections' expects "
                            "a value between 0 and 65535");
        }
    }
    if (tls_id) {
        creds = vd_nbd_tls_creds_get(tls_id, &err);
        if (!creds) {
            return fail_vd(e, &err, -ENOENT, "Cannot use TLS credentials");
        }
        if (!vd_nbd_tls_creds_is_server(creds)) {
            vd_nbd_tls_creds_unref(creds);
            return qmp_fail(e, NULL, "Expected TLS credentials for a server "
                            "endpoint");
        }
    }
    json_object_object_get_ex(args, "addr", &addr);
    json_object_object_get_ex(addr, "data", &data);
    type = arg_str(addr, "type");
    srv = vd_nbd_server_new(16, (unsigned)maxc, true);
    if (!srv) {
        vd_nbd_tls_creds_unref(creds);
        return qmp_fail(e, NULL, "out of memory");
    }
    /* The server owns the reference from here: object-del may drop the
     * object while the server still runs with it, as in QEMU. */
    vd_nbd_server_set_tls(srv, creds);
    if (strcmp(type, "unix") == 0) {
        r = vd_nbd_server_listen_unix(srv, arg_str(data, "path"), &err);
    } else if (strcmp(type, "inet") == 0) {
        r = vd_nbd_server_listen_tcp(srv, arg_str(data, "host"),
                                     arg_str(data, "port"), &err);
    } else {
        vd_nbd_server_free(&srv);
        return qmp_fail(e, NULL, "Socket address type '%s' is not supported",
                        type);
    }
    if (r < 0) {
        vd_nbd_server_free(&srv);
        return fail_vd(e, &err, r, "Failed to listen");
    }
    d->nbd = srv;
    r = pthread_create(&d->nbd_thread, NULL, nbd_thread_main, d);
    if (r != 0) {
        d->nbd = NULL;
        vd_nbd_server_free(&srv);
        return qmp_fail(e, NULL, "cannot start the NBD server thread: %s",
                        strerror(r));
    }
    return json_object_new_object();
}

static void export_remove_at(qmp_daemon *d, size_t i)
{
    json_object *data = json_object_new_object();

    json_object_object_add(data, "id",
                           json_object_new_string(d->exports[i].id));
    free(d->exports[i].id);
    free(d->exports[i].name);
    memmove(&d->exports[i], &d->exports[i + 1],
            (d->nb_exports - i - 1) * sizeof(*d->exports));
    d->nb_exports--;
    qmp_emit_event(d, "BLOCK_EXPORT_DELETED", data);
}

void qmp_daemon_stop_nbd(qmp_daemon *d)
{
    if (!d->nbd) {
        return;
    }
    while (d->nb_exports) {
        vd_nbd_server_remove_export(d->nbd, d->exports[0].name, true, NULL);
        export_remove_at(d, 0);
    }
    vd_nbd_server_request_shutdown(d->nbd);
    pthread_join(d->nbd_thread, NULL);
    vd_nbd_server_free(&d->nbd);
}

QMP_HANDLER(qmp_cmd_nbd_server_stop)
{
    (void)args;
    if (!d->nbd) {
        return qmp_fail(e, NULL, "NBD server not running");
    }
    qmp_daemon_stop_nbd(d);
    return json_object_new_object();
}

QMP_HANDLER(qmp_cmd_block_export_add)
{
    const char *type = arg_str(args, "type");
    const char *id = arg_str(args, "id");
    const char *nn = arg_str(args, "node-name");
    const char *name = arg_str(args, "name");
    const char *desc = arg_str(args, "description");
    bool writable = arg_bool(args, "writable", false);
    json_object *bm;
    vd_error err = VD_ERROR_INIT;
    vd_node *node;
    qmp_export *nv;
    int r;

    if (strcmp(type, "nbd") != 0) {
        return qmp_fail(e, NULL, "Export type '%s' is not supported", type);
    }
    if (find_export_id(d, id)) {
        return qmp_fail(e, NULL, "Block export id '%s' is already in use",
                        id);
    }
    if (!d->nbd) {
        return qmp_fail(e, NULL, "NBD server not running");
    }
    node = vd_find_node(nn);
    if (!node) {
        return qmp_fail(e, NULL, "Cannot find device='' nor node-name='%s'",
                        nn);
    }
    if (writable && vd_node_is_read_only(node)) {
        return qmp_fail(e, NULL, "Cannot export read-only node as writable");
    }
    if (json_object_object_get_ex(args, "bitmaps", &bm) &&
        json_object_array_length(bm) > 0) {
        return qmp_fail(e, NULL, "Bitmap '%s' is not found",
                        json_object_get_string(
                            json_object_array_get_idx(bm, 0)));
    }
    if (!name) {
        name = nn;
    }
    if (strlen(name) > 4096) {
        return qmp_fail(e, NULL, "export name '%.40s...' too long", name);
    }
    if (vd_nbd_server_has_export(d->nbd, name)) {
        return qmp_fail(e, NULL, "NBD server already has export named '%s'",
                        name);
    }
    nv = realloc(d->exports, (d->nb_exports + 1) * sizeof(*nv));
    if (!nv) {
        return qmp_fail(e, NULL, "out of memory");
    }
    d->exports = nv;
    nv = &d->exports[d->nb_exports];
    nv->id = strdup(id);
    nv->name = strdup(name);
    nv->node = node;
    if (!nv->id || !nv->name) {
        free(nv->id);
        free(nv->name);
        return qmp_fail(e, NULL, "out of memory");
    }
    r = vd_nbd_server_add_export_ro(d->nbd, name, desc, node, !writable,
                                    &err);
    if (r < 0) {
        free(nv->id);
        free(nv->name);
        return fail_vd(e, &err, r, "Could not add export");
    }
    d->nb_exports++;
    return json_object_new_object();
}

QMP_HANDLER(qmp_cmd_block_export_del)
{
    const char *id = arg_str(args, "id");
    const char *mode = arg_str(args, "mode");
    bool hard = mode && strcmp(mode, "hard") == 0;
    qmp_export *x = find_export_id(d, id);
    vd_error err = VD_ERROR_INIT;
    int r;

    if (!x) {
        return qmp_fail(e, NULL, "Export '%s' is not found", id);
    }
    r = vd_nbd_server_remove_export(d->nbd, x->name, hard, &err);
    if (r == -EBUSY) {
        return qmp_fail(e, NULL, "export '%s' still in use", id);
    }
    if (r < 0 && r != -ENOENT) {
        return fail_vd(e, &err, r, "Could not remove export");
    }
    export_remove_at(d, (size_t)(x - d->exports));
    return json_object_new_object();
}

QMP_HANDLER(qmp_cmd_query_block_exports)
{
    json_object *r = json_object_new_array();

    (void)args;
    (void)e;
    /* Newest first, as QEMU's list. */
    for (size_t i = d->nb_exports; i-- > 0;) {
        json_object *o = json_object_new_object();
        json_object_object_add(o, "node-name", json_object_new_string(
                                   vd_node_name(d->exports[i].node)));
        json_object_object_add(o, "shutting-down",
                               json_object_new_boolean(0));
        json_object_object_add(o, "type", json_object_new_string("nbd"));
        json_object_object_add(o, "id",
                               json_object_new_string(d->exports[i].id));
        json_object_array_add(r, o);
    }
    return r;
}

/* ---- snapshots ---- */

/* The node for a snapshot command's 'device' (a node name here). */
static vd_node *snapshot_node(const char *dev, qmp_error *e)
{
    vd_node *node = vd_find_node(dev);

    if (!node) {
        qmp_fail(e, NULL, "Cannot find device='%s' nor node-name='%s'", dev,
                 dev);
        return NULL;
    }
    if (vd_node_parent_count(node) > 0) {
        qmp_fail(e, NULL, "Need a root block node");
        return NULL;
    }
    return node;
}

QMP_HANDLER(qmp_cmd_snapshot_internal)
{
    const char *dev = arg_str(args, "device");
    const char *name = arg_str(args, "name");
    vd_error err = VD_ERROR_INIT;
    vd_node *node;
    int r;

    (void)d;
    node = snapshot_node(dev, e);
    if (!node) {
        return NULL;
    }
    if (vd_node_is_read_only(node)) {
        return qmp_fail(e, NULL, "Device '%s' is read only", dev);
    }
    if (!vd_snapshot_can(node)) {
        return qmp_fail(e, NULL, "Block format '%s' used by device '%s' does "
                        "not support internal snapshots",
                        vd_node_format(node), dev);
    }
    if (!name[0]) {
        return qmp_fail(e, NULL, "Name is empty");
    }
    r = vd_snapshot_find(node, NULL, name, NULL, &err);
    if (r > 0) {
        return qmp_fail(e, NULL, "Snapshot with name '%s' already exists on "
                        "device '%s'", name, dev);
    }
    if (r < 0) {
        return fail_vd(e, &err, r, "Could not list snapshots");
    }
    r = vd_snapshot_create_simple(node, name, &err);
    if (r < 0) {
        return fail_vd(e, &err, r, "Could not create snapshot");
    }
    return json_object_new_object();
}

QMP_HANDLER(qmp_cmd_snapshot_delete_internal)
{
    const char *dev = arg_str(args, "device");
    const char *id = arg_str(args, "id");
    const char *name = arg_str(args, "name");
    vd_error err = VD_ERROR_INIT;
    vd_snapshot_info sn = { 0 };
    vd_node *node;
    json_object *o;
    int r;

    (void)d;
    node = snapshot_node(dev, e);
    if (!node) {
        return NULL;
    }
    if (!id && !name) {
        return qmp_fail(e, NULL, "Name or id must be provided");
    }
    if (vd_node_is_read_only(node)) {
        return qmp_fail(e, NULL, "Device '%s' is read only", dev);
    }
    r = vd_snapshot_find(node, id, name, &sn, &err);
    if (r < 0) {
        return fail_vd(e, &err, r, "Could not list snapshots");
    }
    if (r == 0) {
        return qmp_fail(e, NULL, "Snapshot with id '%s' and name '%s' does "
                        "not exist on device '%s'", id ? id : "null",
                        name ? name : "null", dev);
    }
    r = vd_snapshot_delete(node, sn.id, sn.name, &err);
    if (r < 0) {
        vd_snapshot_info_clear(&sn);
        return fail_vd(e, &err, r, "Could not delete snapshot");
    }
    o = json_object_new_object();
    json_object_object_add(o, "vm-clock-nsec",
                           jint((int64_t)(sn.vm_clock_nsec % 1000000000u)));
    json_object_object_add(o, "name", json_object_new_string(sn.name));
    json_object_object_add(o, "date-sec", jint(sn.date_sec));
    json_object_object_add(o, "date-nsec", jint(sn.date_nsec));
    json_object_object_add(o, "vm-clock-sec",
                           jint((int64_t)(sn.vm_clock_nsec / 1000000000u)));
    json_object_object_add(o, "id", json_object_new_string(sn.id));
    json_object_object_add(o, "vm-state-size",
                           jint((int64_t)sn.vm_state_size));
    vd_snapshot_info_clear(&sn);
    return o;
}

/* The 'devices' list as the NULL-terminated array vd_snapshot_all_*
 * take, or NULL for "every root node" (*out_none). */
static const char **device_list(json_object *args, qmp_error *e, bool *ok)
{
    json_object *l;
    const char **v;
    size_t n;

    *ok = true;
    if (!json_object_object_get_ex(args, "devices", &l)) {
        return NULL;
    }
    n = json_object_array_length(l);
    if (n > 4096) {
        *ok = false;
        qmp_fail(e, NULL, "too many devices");
        return NULL;
    }
    v = calloc(n + 1, sizeof(*v));
    if (!v) {
        *ok = false;
        qmp_fail(e, NULL, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        v[i] = json_object_get_string(json_object_array_get_idx(l, i));
    }
    return v;
}

QMP_HANDLER(qmp_cmd_vdisk_snapshot_save)
{
    const char *name = arg_str(args, "name");
    const char *vmstate = arg_str(args, "vmstate");
    vd_error err = VD_ERROR_INIT;
    vd_snapshot_info sn = { 0 };
    vd_node *vm = NULL;
    struct timespec ts;
    bool ok;
    const char **devs = device_list(args, e, &ok);
    int r;

    (void)d;
    if (!ok) {
        return NULL;
    }
    r = vd_snapshot_all_can(devs, &err);
    if (r >= 0) {
        r = vd_snapshot_all_has(devs, name, &err);
        if (r > 0) {
            free(devs);
            return qmp_fail(e, NULL, "Snapshot '%s' already exists in one or "
                            "more devices", name);
        }
    }
    if (r >= 0) {
        r = vd_snapshot_all_find_vmstate(devs, vmstate, &vm, &err);
    }
    if (r >= 0) {
        clock_gettime(CLOCK_REALTIME, &ts);
        sn.name = (char *)name;
        sn.id = NULL;
        sn.date_sec = (uint32_t)ts.tv_sec;
        sn.date_nsec = (uint32_t)ts.tv_nsec;
        sn.icount = UINT64_MAX;
        r = vd_snapshot_all_create(devs, &sn, vm, 0, &err);
    }
    free(devs);
    if (r < 0) {
        return fail_vd(e, &err, r, "Could not save snapshot");
    }
    return json_object_new_object();
}

QMP_HANDLER(qmp_cmd_vdisk_snapshot_load)
{
    const char *name = arg_str(args, "name");
    vd_error err = VD_ERROR_INIT;
    bool ok;
    const char **devs = device_list(args, e, &ok);
    int r;

    (void)d;
    if (!ok) {
        return NULL;
    }
    r = vd_snapshot_all_can(devs, &err);
    if (r >= 0) {
        r = vd_snapshot_all_has(devs, name, &err);
        if (r == 0) {
            free(devs);
            return qmp_fail(e, NULL, "Snapshot '%s' does not exist in one or "
                            "more devices", name);
        }
    }
    if (r >= 0) {
        r = vd_snapshot_all_goto(devs, name, &err);
    }
    free(devs);
    if (r < 0) {
        return fail_vd(e, &err, r, "Could not load snapshot");
    }
    if (d->nbd) {
        for (size_t i = 0; i < d->nb_exports; i++) {
            vd_nbd_server_update_export_size(d->nbd, d->exports[i].node);
        }
    }
    return json_object_new_object();
}

QMP_HANDLER(qmp_cmd_vdisk_snapshot_delete)
{
    const char *name = arg_str(args, "name");
    vd_error err = VD_ERROR_INIT;
    bool ok;
    const char **devs = device_list(args, e, &ok);
    int r;

    (void)d;
    if (!ok) {
        return NULL;
    }
    r = vd_snapshot_all_delete(devs, name, &err);
    free(devs);
    if (r < 0) {
        return fail_vd(e, &err, r, "Could not delete snapshot");
    }
    return json_object_new_object();
}

/* ---- objects ---- */

QMP_HANDLER(qmp_cmd_object_add)
{
    vd_error err = VD_ERROR_INIT;
    int r;

    if (d->keyval) {
        /* From a command line: strings in nested objects, which the
         * registry takes as dotted keys and converts itself. */
        vd_opts *o = vd_opts_new();
        r = o ? vd_opts_from_json(o, json_object_to_json_string(args), &err)
              : -ENOMEM;
        if (r == 0) {
            r = vd_object_add(NULL, NULL, o, &err);
        }
        vd_opts_free(&o);
    } else {
        r = vd_object_add_json(json_object_to_json_string_ext(
                                   args, JSON_C_TO_STRING_PLAIN), &err);
    }
    if (r < 0) {
        return fail_vd(e, &err, r, "Could not add object");
    }
    return json_object_new_object();
}

QMP_HANDLER(qmp_cmd_object_del)
{
    vd_error err = VD_ERROR_INIT;
    int r;

    (void)d;
    r = vd_object_del(arg_str(args, "id"), &err);
    if (r < 0) {
        return fail_vd(e, &err, r, "Could not delete object");
    }
    return json_object_new_object();
}

/*
 * QOM paths. vdisk's tree is the root, its "objects" container and the
 * objects in it. An absolute path names them ("/", "/objects",
 * "/objects/ID"; empty components are skipped, as QEMU does); a partial
 * path ("ID", "objects/ID", "objects") must match exactly one of them.
 */
typedef enum qom_node { QOM_ROOT, QOM_OBJECTS, QOM_OBJECT } qom_node;

static bool object_exists(const char *id)
{
    char *type = vd_object_type(id);

    free(type);
    return type != NULL;
}

/* Resolves @path; for an object, @id receives a copy of its id. */
static int qom_resolve(const char *path, qom_node *kind, char **id,
                       qmp_error *e)
{
    char *copy = strdup(path), *save = NULL, *parts[3];
    int n = 0, matches = 0;

    *id = NULL;
    if (!copy) {
        qmp_fail(e, NULL, "out of memory");
        return -1;
    }
    for (char *t = strtok_r(copy, "/", &save); t; t = strtok_r(NULL, "/",
                                                                &save)) {
        if (n < 3) {
            parts[n] = t;
        }
        n++;
    }
    if (path[0] == '/') {
        if (n == 0) {
            *kind = QOM_ROOT;
            matches = 1;
        } else if (n == 1 && strcmp(parts[0], "objects") == 0) {
            *kind = QOM_OBJECTS;
            matches = 1;
        } else if (n == 2 && strcmp(parts[0], "objects") == 0 &&
                   object_exists(parts[1])) {
            *kind = QOM_OBJECT;
            *id = strdup(parts[1]);
            matches = 1;
        }
    } else if (path[0] == '\0') {
        matches = 2;
    } else {
        if (n == 1 && strcmp(parts[0], "objects") == 0) {
            *kind = QOM_OBJECTS;
            matches++;
        }
        if (n == 1 && object_exists(parts[0])) {
            *kind = QOM_OBJECT;
            free(*id);
            *id = strdup(parts[0]);
            matches++;
        }
        if (n == 2 && strcmp(parts[0], "objects") == 0 &&
            object_exists(parts[1])) {
            *kind = QOM_OBJECT;
            *id = strdup(parts[1]);
            matches++;
        }
    }
    free(copy);
    if (matches == 1 && *kind == QOM_OBJECT && !*id) {
        qmp_fail(e, NULL, "out of memory");
        return -1;
    }
    if (matches == 0) {
        qmp_fail(e, "DeviceNotFound", "Device '%s' not found", path);
    } else if (matches > 1) {
        free(*id);
        *id = NULL;
        qmp_fail(e, NULL, "Path '%s' is ambiguous", path);
    }
    return matches == 1 ? 0 : -1;
}

static json_object *prop_info(const char *name, const char *type)
{
    json_object *o = json_object_new_object();

    json_object_object_add(o, "name", json_object_new_string(name));
    json_object_object_add(o, "type", json_object_new_string(type));
    return o;
}

static int list_prop(const char *name, const char *type, void *opaque)
{
    json_object_array_add(opaque, prop_info(name, type));
    return 0;
}

static int list_child(const char *id, const char *type, void *opaque)
{
    char t[256];

    snprintf(t, sizeof(t), "child<%s>", type);
    json_object_array_add(opaque, prop_info(id, t));
    return 0;
}

QMP_HANDLER(qmp_cmd_qom_list)
{
    vd_error err = VD_ERROR_INIT;
    json_object *ret;
    qom_node kind;
    char *id;
    int r = 0;

    (void)d;
    if (qom_resolve(arg_str(args, "path"), &kind, &id, e) < 0) {
        return NULL;
    }
    ret = json_object_new_array();
    if (kind == QOM_OBJECT) {
        r = vd_object_foreach_property(id, list_prop, ret, &err);
    } else {
        json_object_array_add(ret, prop_info("type", "string"));
        if (kind == QOM_ROOT) {
            json_object_array_add(ret, prop_info("objects",
                                                 "child<container>"));
        } else {
            r = vd_object_foreach(list_child, ret);
        }
    }
    free(id);
    if (r < 0) {
        json_object_put(ret);
        return fail_vd(e, &err, r, "Could not list properties");
    }
    return ret;
}

QMP_HANDLER(qmp_cmd_qom_get)
{
    const char *prop = arg_str(args, "property");
    vd_error err = VD_ERROR_INIT;
    json_object *ret;
    qom_node kind;
    char *id, *text;

    (void)d;
    if (qom_resolve(arg_str(args, "path"), &kind, &id, e) < 0) {
        return NULL;
    }
    if (kind != QOM_OBJECT) {
        /* A container has its type and its children, as link paths. */
        if (strcmp(prop, "type") == 0) {
            return json_object_new_string("container");
        }
        if (kind == QOM_ROOT && strcmp(prop, "objects") == 0) {
            return json_object_new_string("/objects");
        }
        if (kind == QOM_OBJECTS && object_exists(prop)) {
            char path[512];
            snprintf(path, sizeof(path), "/objects/%s", prop);
            return json_object_new_string(path);
        }
        return qmp_fail(e, NULL, "Property 'container.%s' not found", prop);
    }
    text = vd_object_get_property(id, prop, &err);
    free(id);
    if (!text) {
        return fail_vd(e, &err, -EINVAL, "Could not read property");
    }
    ret = json_tokener_parse(text);
    free(text);
    return ret ? ret : qmp_fail(e, NULL, "out of memory");
}

QMP_HANDLER(qmp_cmd_qom_set)
{
    const char *prop = arg_str(args, "property");
    vd_error err = VD_ERROR_INIT;
    json_object *value = NULL;
    qom_node kind;
    char *id;
    int r;

    (void)d;
    if (qom_resolve(arg_str(args, "path"), &kind, &id, e) < 0) {
        return NULL;
    }
    if (kind != QOM_OBJECT) {
        if (strcmp(prop, "type") == 0 ||
            (kind == QOM_ROOT && strcmp(prop, "objects") == 0) ||
            (kind == QOM_OBJECTS && object_exists(prop))) {
            return qmp_fail(e, NULL, "Property 'container.%s' is not "
                            "writable", prop);
        }
        return qmp_fail(e, NULL, "Property 'container.%s' not found", prop);
    }
    json_object_object_get_ex(args, "value", &value);
    r = vd_object_set_property(id, prop, json_object_to_json_string_ext(
                                   value, JSON_C_TO_STRING_PLAIN), &err);
    free(id);
    if (r < 0) {
        return fail_vd(e, &err, r, "Could not set property");
    }
    return json_object_new_object();
}

/* ---- teardown ---- */

int qmp_daemon_close_nodes(qmp_daemon *d)
{
    int ret = 0;

    /* Newest first: a node added later may use an older one as a child. */
    while (d->nb_nodes) {
        vd_error err = VD_ERROR_INIT;
        vd_node *n = d->nodes[--d->nb_nodes];
        if (vd_close(&n, &err) < 0) {
            fprintf(stderr, "vdisk serve: %s\n", err.message);
            ret = -EIO;
        }
    }
    return ret;
}
