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

static void (*reporter)(const char *msg);

void qmp_set_reporter(void (*fn)(const char *msg))
{
    reporter = fn;
}

static void report(const char *msg)
{
    if (reporter) {
        reporter(msg);
    } else {
        fprintf(stderr, "qmp: %s\n", msg);
    }
}

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

static void export_remove_at(qmp_daemon *d, size_t i);

QMP_HANDLER(qmp_cmd_quit)
{
    (void)args;
    (void)e;
    /* As qemu-storage-daemon: the exports are gone, each with its
     * BLOCK_EXPORT_DELETED, before the reply. */
    while (d->nb_exports) {
        if (d->nbd) {
            vd_nbd_server_remove_export(d->nbd, d->exports[0].name, true,
                                        NULL);
        }
        export_remove_at(d, 0);
    }
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
static json_object *image_info(vd_node *node, int depth, bool flat)
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
    backing = flat ? NULL : vd_node_child(node, "backing");
    if (backing && depth < 64) {
        json_object *b = image_info(backing, depth + 1, false);
        if (b) {
            json_object_object_add(o, "backing-image", b);
        }
    }
    return o;
}

/* QEMU's BlockDeviceInfo of @node. With @flat (query-named-block-nodes'
 * argument) the image has no "backing-image" and the depth stays 0, as
 * QEMU stops walking the chain at once. */
static json_object *block_device_info(vd_node *node, bool flat)
{
    static const char *const dz[] = { "off", "on", "unmap" };
    json_object *o = json_object_new_object();
    json_object *cache = json_object_new_object();
    json_object *img, *shown = NULL;
    vd_node *b = vd_node_child(node, "backing");
    unsigned cf = vd_node_cache_flags(node);
    const char *file;
    int depth = 0;

    for (vd_node *n = flat ? NULL : b; n && depth < 100000;
         n = vd_node_child(n, "backing")) {
        depth++;
    }
    json_object_object_add(o, "iops_rd", jint(0));
    json_object_object_add(o, "detect_zeroes", json_object_new_string(
                               dz[vd_node_detect_zeroes(node) % 3]));
    img = image_info(node, 0, flat);
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
    json_object *bitmaps = qmp_dirty_bitmaps_json(node);
    if (bitmaps) {
        json_object_object_add(o, "dirty-bitmaps", bitmaps);
    }
    if (b) {
        /* QEMU shows the open backing node's filename (absolute, as it
         * was resolved), not the name the image header holds. */
        const char *bf = vd_node_filename(b);
        json_object_object_add(o, "backing_file", json_object_new_string(
                                   bf ? bf : vd_node_backing_file(node)));
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
    if (!nv) {
        json_object_put(r);
        return qmp_fail(e, NULL, "out of memory");
    }
    all_nodes(nv);
    for (size_t i = 0; i < nv->n; i++) {
        json_object_array_add(r, block_device_info(
                                  nv->v[i], arg_bool(args, "flat", false)));
    }
    free(nv);
    return r;
}

/* BlockLatencyHistogramInfo of one histogram. */
static json_object *histogram_json(const vd_latency_histogram *h)
{
    json_object *o = json_object_new_object();
    json_object *b = json_object_new_array();
    json_object *bins = json_object_new_array();

    for (size_t i = 0; i + 1 < h->nbins; i++) {
        json_object_array_add(b, jint((int64_t)h->boundaries[i]));
    }
    for (size_t i = 0; i < h->nbins; i++) {
        json_object_array_add(bins, jint((int64_t)h->bins[i]));
    }
    json_object_object_add(o, "boundaries", b);
    json_object_object_add(o, "bins", bins);
    return o;
}

/* BlockDeviceTimedStats of one interval, QEMU 7.2's members. */
static json_object *timed_stats_json(const vd_timed_stats *t)
{
    static const char *const tn[] = { "rd", "wr", "flush" };
    static const vd_acct_type tt[] = { VD_ACCT_READ, VD_ACCT_WRITE,
                                       VD_ACCT_FLUSH };
    json_object *o = json_object_new_object();
    char k[64];

    json_object_object_add(o, "interval_length", jint(t->interval_length));
    for (int i = 0; i < 3; i++) {
        snprintf(k, sizeof(k), "min_%s_latency_ns", tn[i]);
        json_object_object_add(o, k, jint((int64_t)t->min_latency_ns[tt[i]]));
        snprintf(k, sizeof(k), "max_%s_latency_ns", tn[i]);
        json_object_object_add(o, k, jint((int64_t)t->max_latency_ns[tt[i]]));
        snprintf(k, sizeof(k), "avg_%s_latency_ns", tn[i]);
        json_object_object_add(o, k, jint((int64_t)t->avg_latency_ns[tt[i]]));
    }
    json_object_object_add(o, "avg_rd_queue_depth", json_object_new_double(
                               t->avg_queue_depth[VD_ACCT_READ]));
    json_object_object_add(o, "avg_wr_queue_depth", json_object_new_double(
                               t->avg_queue_depth[VD_ACCT_WRITE]));
    return o;
}

/*
 * BlockDeviceStats of @node from the library's accounting (QEMU 7.2's
 * members; the zone_append ones came in 8.1). qemu-storage-daemon shows
 * only wr_highest_offset of a node, its other counters belonging to
 * device models it does not have; vdisk counts every request of every
 * node (docs/qmp.md).
 */
static json_object *stats_json(vd_node *node)
{
    static const char *const tn[VD_ACCT_MAX] = { "rd", "wr", "flush",
                                                 "unmap" };
    vd_block_stats *s = NULL;
    json_object *o = json_object_new_object();
    json_object *ts;
    char k[64];

    if (vd_get_block_stats(node, &s) < 0) {
        return o;
    }
    for (int t = 0; t < VD_ACCT_MAX; t++) {
        if (t != VD_ACCT_FLUSH) {
            snprintf(k, sizeof(k), "%s_bytes", tn[t]);
            json_object_object_add(o, k, jint((int64_t)s->bytes[t]));
            snprintf(k, sizeof(k), "%s_merged", tn[t]);
            json_object_object_add(o, k, jint((int64_t)s->merged[t]));
        }
        snprintf(k, sizeof(k), "%s_operations", tn[t]);
        json_object_object_add(o, k, jint((int64_t)s->operations[t]));
        snprintf(k, sizeof(k), "%s_total_time_ns", tn[t]);
        json_object_object_add(o, k, jint((int64_t)s->total_time_ns[t]));
        snprintf(k, sizeof(k), "failed_%s_operations", tn[t]);
        json_object_object_add(o, k, jint((int64_t)s->failed[t]));
        snprintf(k, sizeof(k), "invalid_%s_operations", tn[t]);
        json_object_object_add(o, k, jint((int64_t)s->invalid[t]));
    }
    json_object_object_add(o, "wr_highest_offset",
                           jint((int64_t)s->wr_highest_offset));
    if (s->has_idle_time) {
        json_object_object_add(o, "idle_time_ns",
                               jint((int64_t)s->idle_time_ns));
    }
    json_object_object_add(o, "account_invalid",
                           json_object_new_boolean(s->account_invalid));
    json_object_object_add(o, "account_failed",
                           json_object_new_boolean(s->account_failed));
    ts = json_object_new_array();
    for (size_t i = 0; i < s->nb_timed_stats; i++) {
        json_object_array_add(ts, timed_stats_json(&s->timed_stats[i]));
    }
    json_object_object_add(o, "timed_stats", ts);
    for (int t = 0; t < VD_ACCT_MAX; t++) {
        if (t != VD_ACCT_UNMAP && s->histogram[t].nbins) {
            snprintf(k, sizeof(k), "%s_latency_histogram", tn[t]);
            json_object_object_add(o, k, histogram_json(&s->histogram[t]));
        }
    }
    vd_block_stats_free(&s);
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
        json_object_object_add(ds, "driver", json_object_new_string(s.driver));
        if (s.has_cache) {
            /* QEMU's union has no qcow2 branch: only the discriminator
             * and vdisk's experimental (x-) members, which a QEMU client
             * that does not know them ignores. */
            json_object_object_add(ds, "x-vdisk-l2-cache-size",
                                   jint((int64_t)s.l2_cache_bytes));
            json_object_object_add(ds, "x-vdisk-l2-cache-hits",
                                   jint((int64_t)s.l2_cache_hits));
            json_object_object_add(ds, "x-vdisk-l2-cache-misses",
                                   jint((int64_t)s.l2_cache_misses));
            json_object_object_add(ds, "x-vdisk-refcount-cache-size",
                                   jint((int64_t)s.refcount_cache_bytes));
            json_object_object_add(ds, "x-vdisk-refcount-cache-hits",
                                   jint((int64_t)s.refcount_cache_hits));
            json_object_object_add(ds, "x-vdisk-refcount-cache-misses",
                                   jint((int64_t)s.refcount_cache_misses));
        } else {
            json_object_object_add(ds, "discard-bytes-ok",
                                   jint((int64_t)s.discard_bytes_ok));
            json_object_object_add(ds, "discard-nb-ok",
                                   jint((int64_t)s.discard_nb_ok));
            json_object_object_add(ds, "discard-nb-failed",
                                   jint((int64_t)s.discard_nb_failed));
        }
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
        report(err.message);
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
    json_object *bm, *ad;
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
    /* QEMU's order: the node, whether it may be written, then the NBD
     * server (qemu-storage-daemon answers so). */
    node = vd_find_node(nn);
    if (!node) {
        return qmp_fail(e, NULL, "Cannot find device='' nor node-name='%s'",
                        nn);
    }
    if (writable && vd_node_is_read_only(node)) {
        return qmp_fail(e, NULL, "Cannot export read-only node as writable");
    }
    if (!d->nbd) {
        return qmp_fail(e, NULL, "NBD server not running");
    }
    if (!json_object_object_get_ex(args, "bitmaps", &bm)) {
        bm = NULL;
    }
    if (bm && !qmp_bitmap_list_check(bm, "bitmaps", e)) {
        return NULL;
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
    vd_nbd_export_opts eo = {
        .name = name, .description = desc, .node = node,
        .read_only = !writable,
        .allocation_depth =
            json_object_object_get_ex(args, "allocation-depth", &ad) &&
            json_object_get_boolean(ad),
        .nb_bitmaps = bm ? json_object_array_length(bm) : 0,
    };
    vd_bitmap_ref *refs = NULL;
    if (eo.nb_bitmaps) {
        refs = qmp_bitmap_list_refs(bm, NULL, e);
        if (!refs) {
            free(nv->id);
            free(nv->name);
            return NULL;
        }
        eo.bitmaps = refs;
    }
    r = vd_nbd_server_add_export_opts(d->nbd, &eo, &err);
    free(refs);
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

/*
 * The legacy export commands, as QEMU implements them: nbd-server-add
 * is block-export-add with the export name (by default the device) as
 * the id, and a read-only node is exported read-only instead of
 * refused; nbd-server-remove is block-export-del of that id.
 */
QMP_HANDLER(qmp_cmd_nbd_server_add)
{
    const char *dev = arg_str(args, "device");
    const char *name = arg_str(args, "name");
    const char *desc = arg_str(args, "description");
    const char *bitmap = arg_str(args, "bitmap");
    vd_node *node = vd_find_node(dev);
    json_object *x, *r;

    if (!node) {
        return qmp_fail(e, NULL, "Cannot find device='%s' nor node-name='%s'",
                        dev, dev);
    }
    x = json_object_new_object();
    json_object_object_add(x, "type", json_object_new_string("nbd"));
    json_object_object_add(x, "id", json_object_new_string(name ? name
                                                                : dev));
    json_object_object_add(x, "node-name",
                           json_object_new_string(vd_node_name(node)));
    json_object_object_add(x, "writable", json_object_new_boolean(
                               arg_bool(args, "writable", false) &&
                               !vd_node_is_read_only(node)));
    json_object_object_add(x, "name", json_object_new_string(name ? name
                                                                  : dev));
    if (desc) {
        json_object_object_add(x, "description",
                               json_object_new_string(desc));
    }
    if (bitmap) {
        json_object *l = json_object_new_array();
        json_object_array_add(l, json_object_new_string(bitmap));
        json_object_object_add(x, "bitmaps", l);
    }
    r = qmp_cmd_block_export_add(d, x, e);
    json_object_put(x);
    return r;
}

QMP_HANDLER(qmp_cmd_nbd_server_remove)
{
    json_object *x = json_object_new_object(), *r;
    const char *mode = arg_str(args, "mode");

    json_object_object_add(x, "id",
                           json_object_new_string(arg_str(args, "name")));
    if (mode) {
        json_object_object_add(x, "mode", json_object_new_string(mode));
    }
    r = qmp_cmd_block_export_del(d, x, e);
    json_object_put(x);
    return r;
}

/* ---- devices, reopen, statistics ---- */

/* query-block lists block backends that have a name or a device model;
 * qemu-storage-daemon, and so vdisk serve, has neither (its exports'
 * backends are anonymous), so the list is always empty. */
QMP_HANDLER(qmp_cmd_query_block)
{
    (void)d;
    (void)args;
    (void)e;
    return json_object_new_array();
}

/*
 * blockdev-reopen, checked whole before anything changes. Every element
 * names an existing node; its options replace the node's, so an option
 * left out means its default (read-only: off). vdisk can change the
 * read-only mode, through the core's reopen and its permission checks;
 * every other option must keep the node's current value (a child given
 * by the name of the current child, or by options that hold for it),
 * else QEMU's "Cannot change the option" refusal names it. QEMU can
 * also change some of those (detect-zeroes, a raw window, replacing or
 * detaching a child); docs/qmp.md lists what vdisk refuses.
 */
typedef struct reopen_item {
    vd_node *node;
    bool ro;
} reopen_item;

typedef struct reopen_plan {
    reopen_item v[256];
    size_t n;
} reopen_plan;

static json_object *reopen_check(vd_node *node, json_object *o,
                                 const char *prefix, reopen_plan *p,
                                 qmp_error *e);

/* A child option (file, backing, data-file) @val of @node in @role. */
static json_object *reopen_child(vd_node *node, const char *role,
                                 json_object *val, const char *prefix,
                                 reopen_plan *p, qmp_error *e)
{
    vd_node *cur = vd_node_child(node, role);
    char sub[256];

    if (!val && !cur) {
        return json_object_new_object();        /* null for no child */
    }
    if (json_object_is_type(val, json_type_string)) {
        if (cur && strcmp(json_object_get_string(val),
                          vd_node_name(cur)) == 0) {
            return json_object_new_object();
        }
    } else if (json_object_is_type(val, json_type_object) && cur) {
        const char *nn = arg_str(val, "node-name");
        snprintf(sub, sizeof(sub), "%s%s.", prefix, role);
        if (nn && strcmp(nn, vd_node_name(cur)) != 0) {
            return qmp_fail(e, NULL, "Cannot change the option '%snode-name'",
                            sub);
        }
        return reopen_check(cur, val, sub, p, e);
    }
    return qmp_fail(e, NULL, "Cannot change the option '%s%s'", prefix, role);
}

static json_object *reopen_check(vd_node *node, json_object *o,
                                 const char *prefix, reopen_plan *p,
                                 qmp_error *e)
{
    static const char *const dz[] = { "off", "on", "unmap" };
    unsigned cf = vd_node_cache_flags(node);
    json_object *r;

    if (strcmp(arg_str(o, "driver"), vd_node_format(node)) != 0) {
        return qmp_fail(e, NULL, "Cannot change the option '%sdriver'",
                        prefix);
    }
    json_object_object_foreach(o, key, val) {
        const char *sv = json_object_is_type(val, json_type_string)
                         ? json_object_get_string(val) : NULL;
        bool same;

        if (!strcmp(key, "driver") || !strcmp(key, "node-name") ||
            !strcmp(key, "read-only")) {
            continue;
        }
        if (!strcmp(key, "file") || !strcmp(key, "backing") ||
            !strcmp(key, "data-file")) {
            r = reopen_child(node, key, val, prefix, p, e);
            if (!r) {
                return NULL;
            }
            json_object_put(r);
            continue;
        }
        if (!strcmp(key, "detect-zeroes")) {
            same = !strcmp(sv, dz[vd_node_detect_zeroes(node) % 3]);
        } else if (!strcmp(key, "discard")) {
            same = !strcmp(sv, vd_node_discard_unmap(node) ? "unmap"
                                                           : "ignore");
        } else if (!strcmp(key, "cache")) {
            same = arg_bool(val, "direct", false) ==
                   ((cf & VD_CACHE_DIRECT) != 0) &&
                   arg_bool(val, "no-flush", false) ==
                   ((cf & VD_CACHE_NO_FLUSH) != 0);
        } else if (!strcmp(key, "auto-read-only") ||
                   !strcmp(key, "force-share")) {
            same = !json_object_get_boolean(val);
        } else if (!strcmp(key, "filename")) {
            const char *f = vd_node_filename(node);
            same = f && !strcmp(sv, f);
        } else {
            same = false;
        }
        if (!same) {
            return qmp_fail(e, NULL, "Cannot change the option '%s%s'",
                            prefix, key);
        }
    }
    if (vd_node_child(node, "backing") &&
        !json_object_object_get_ex(o, "backing", NULL)) {
        return qmp_fail(e, NULL, "backing is missing for '%s'",
                        vd_node_name(node));
    }
    if (p->n >= sizeof(p->v) / sizeof(p->v[0])) {
        return qmp_fail(e, NULL, "too many nodes to reopen");
    }
    p->v[p->n].node = node;
    p->v[p->n].ro = arg_bool(o, "read-only", false);
    p->n++;
    return json_object_new_object();
}

QMP_HANDLER(qmp_cmd_blockdev_reopen)
{
    json_object *list, *r;
    reopen_plan *p = calloc(1, sizeof(*p));
    size_t n;

    (void)d;
    if (!p) {
        return qmp_fail(e, NULL, "out of memory");
    }
    json_object_object_get_ex(args, "options", &list);
    n = json_object_array_length(list);
    for (size_t i = 0; i < n; i++) {
        json_object *o = json_object_array_get_idx(list, i);
        const char *nn = arg_str(o, "node-name");
        vd_node *node;

        if (!nn) {
            free(p);
            return qmp_fail(e, NULL, "node-name not specified");
        }
        node = vd_find_node(nn);
        if (!node) {
            free(p);
            return qmp_fail(e, NULL, "Failed to find node with "
                            "node-name='%s'", nn);
        }
        r = reopen_check(node, o, "", p, e);
        if (!r) {
            free(p);
            return NULL;
        }
        json_object_put(r);
    }
    /* Writers give way first: nodes going read-only before those going
     * read-write, each through the core's permission checks. */
    for (int pass = 0; pass < 2; pass++) {
        for (size_t i = 0; i < p->n; i++) {
            vd_error err = VD_ERROR_INIT;
            vd_node *node = p->v[i].node;
            int rr;

            if (p->v[i].ro != (pass == 0) ||
                p->v[i].ro == vd_node_is_read_only(node)) {
                continue;
            }
            if (p->v[i].ro) {
                unsigned perm = 0;
                /* QEMU's words: the check is its permission refresh
                 * finding a writer on a node about to be read-only. */
                vd_node_get_perm(node, &perm, NULL);
                if (perm & VD_PERM_WRITE) {
                    free(p);
                    return qmp_fail(e, NULL, "Read-only block node '%s' "
                                    "cannot support read-write users",
                                    vd_node_name(node));
                }
            }
            rr = vd_reopen(node, !p->v[i].ro, &err);
            if (rr < 0) {
                free(p);
                return fail_vd_node(e, &err, rr, node, "Could not reopen");
            }
        }
    }
    free(p);
    return json_object_new_object();
}

/* block-latency-histogram-set: QEMU names a device; vdisk, which has
 * none, takes a node name in @id. Each list replaces one histogram
 * ("boundaries" those not given their own), in QEMU's order and with
 * its errors; no list at all removes every histogram. */
QMP_HANDLER(qmp_cmd_block_latency_histogram_set)
{
    static const struct {
        const char *key, *what;
        vd_acct_type type;
    } h[] = {
        { "boundaries-read", "read", VD_ACCT_READ },
        { "boundaries-write", "write", VD_ACCT_WRITE },
        { "boundaries-flush", "flush", VD_ACCT_FLUSH },
    };
    const char *id = arg_str(args, "id");
    vd_node *node = vd_find_node(id);
    json_object *all = NULL;

    (void)d;
    if (!node) {
        return qmp_fail(e, "DeviceNotFound", "Device '%s' not found", id);
    }
    json_object_object_get_ex(args, "boundaries", &all);
    for (size_t i = 0; i < sizeof(h) / sizeof(h[0]); i++) {
        json_object *l = all, *own;
        uint64_t b[4096];
        size_t n;
        int r;

        if (json_object_object_get_ex(args, h[i].key, &own)) {
            l = own;
        }
        if (!l) {
            continue;
        }
        n = json_object_array_length(l);
        for (size_t k = 0; k < n && k < 4096; k++) {
            b[k] = (uint64_t)json_object_get_int64(
                       json_object_array_get_idx(l, k));
        }
        r = n && n <= 4096 ? vd_latency_histogram_set(node, h[i].type, b, n,
                                                      NULL)
                           : -EINVAL;
        if (r < 0) {
            return qmp_fail(e, NULL, "Device '%s' set %s boundaries fail",
                            id, h[i].what);
        }
    }
    if (!all && !json_object_object_get_ex(args, "boundaries-read", NULL) &&
        !json_object_object_get_ex(args, "boundaries-write", NULL) &&
        !json_object_object_get_ex(args, "boundaries-flush", NULL)) {
        for (int t = 0; t < VD_ACCT_MAX; t++) {
            vd_latency_histogram_set(node, (vd_acct_type)t, NULL, 0, NULL);
        }
    }
    return json_object_new_object();
}

/* x-vdisk-block-stats-set: what QEMU's -drive stats-intervals,
 * stats-account-invalid and stats-account-failed set on a drive. */
QMP_HANDLER(qmp_cmd_vdisk_block_stats_set)
{
    const char *nn = arg_str(args, "node-name");
    vd_node *node = vd_find_node(nn);
    json_object *l = NULL, *v;
    unsigned iv[64];
    size_t n = 0;
    vd_error err = VD_ERROR_INIT;
    int inv = -1, fail = -1, r;

    (void)d;
    if (!node) {
        return qmp_fail(e, NULL, "Cannot find device='' nor node-name='%s'",
                        nn);
    }
    if (json_object_object_get_ex(args, "stats-intervals", &l)) {
        n = json_object_array_length(l);
        if (n > 64) {
            return qmp_fail(e, NULL, "At most 64 stats intervals");
        }
        for (size_t i = 0; i < n; i++) {
            int64_t x = json_object_get_int64(json_object_array_get_idx(l, i));
            iv[i] = x > UINT32_MAX ? 0 : (unsigned)x;
        }
    }
    if (json_object_object_get_ex(args, "stats-account-invalid", &v)) {
        inv = json_object_get_boolean(v);
    }
    if (json_object_object_get_ex(args, "stats-account-failed", &v)) {
        fail = json_object_get_boolean(v);
    }
    r = vd_stats_setup(node, inv, fail, iv, n, &err);
    if (r < 0) {
        return fail_vd(e, &err, r, "Could not set up statistics");
    }
    return json_object_new_object();
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
    /* A node a job uses is no root either (QEMU's bdrv_is_root_node). */
    if (!vd_node_is_root(node)) {
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
            report(err.message);
            ret = -EIO;
        }
    }
    return ret;
}
