/*
 * Whole-image operations that a format driver carries out for the CLI and
 * the library's users: measuring what a conversion would need (qemu-img
 * measure) and changing creation options in place (qemu-img amend), and
 * the check of creation options that qemu-img's QemuOpts parser makes
 * before a driver sees them (names and value syntax). The options are
 * checked here, once for every driver; the driver's callback does the
 * format-specific work.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core/block_int.h"

/* Checks a value against the option's type, with QemuOpts' messages. */
static int check_type(const vd_create_option *o, const char *value,
                      vd_error *err)
{
    if (!strcmp(o->type, "size")) {
        uint64_t u;
        int r = vd_parse_size_u64(value, &u);
        /* QemuOpts' range: up to 2^64 - 1; what a size of 2^63 and more
         * means is the driver's to say (qemu's do, each its own way). */
        if (r == -ERANGE) {
            return vd_error_set(err, -EINVAL, "Value '%s' is out of range "
                                "for parameter '%s'", value, o->name);
        } else if (r < 0) {
            return vd_error_set(err, -EINVAL, "Parameter '%s' expects a "
                                "non-negative number below 2^64", o->name);
        }
    } else if (!strcmp(o->type, "bool")) {
        if (strcmp(value, "on") && strcmp(value, "off")) {
            return vd_error_set(err, -EINVAL, "Parameter '%s' expects 'on' "
                                "or 'off'", o->name);
        }
    } else if (!strcmp(o->type, "number")) {
        char *end;
        errno = 0;
        (void)strtoull(value, &end, 0);
        if (!*value || *end || errno || value[0] == '-') {
            return vd_error_set(err, -EINVAL, "Parameter '%s' expects a "
                                "number", o->name);
        }
    }
    return 0;
}

VD_API int vd_check_create_opts(const char *format, const vd_opts *opts,
                                 vd_error *err)
{
    return vd_check_create_opts_for(format, NULL, opts, err);
}

VD_API int vd_check_create_opts_for(const char *format, const char *filename,
                                    const vd_opts *opts, vd_error *err)
{
    const vd_create_option *list = vd_create_options_for(format, filename,
                                                         err);

    if (!list) {
        if (err && err->code)
            return err->code;
        return vd_error_set(err, -EINVAL, "Unknown file format '%s'",
                            format ? format : "");
    }
    for (size_t i = 0; opts && i < vd_opts_count(opts); i++) {
        const char *k, *v;
        const vd_create_option *c = list;
        vd_opts_nth(opts, i, &k, &v);
        while (c->name && strcmp(c->name, k) != 0) {
            c++;
        }
        if (!c->name) {
            return vd_error_set(err, -EINVAL, "Invalid parameter '%s'", k);
        }
        int ret = check_type(c, v, err);
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

VD_API int vd_measure(const char *format, const vd_opts *opts, vd_node *src,
                      vd_measure_result *out, vd_error *err)
{
    const vd_driver *drv = format ? vd_find_driver(format) : NULL;
    const vd_create_option *list;
    vd_opts *o;
    int ret;

    memset(out, 0, sizeof(*out));
    if (!drv || !drv->is_format) {
        return vd_error_set(err, -EINVAL, "Unknown file format '%s'",
                            format ? format : "");
    }
    if (!drv->open) {
        return vd_driver_unsupported(drv, NULL, err);
    }
    list = vd_create_options(format);
    if (!drv->create || !list) {
        return vd_error_set(err, -ENOTSUP, "Format driver '%s' does not "
                            "support image creation", format);
    }
    /* Options are checked like qemu-img's QemuOpts before the driver
     * sees them: known names, well-formed values. */
    ret = vd_check_create_opts(format, opts, err);
    if (ret < 0) {
        return ret;
    }
    if (!drv->measure) {
        return vd_error_set(err, -ENOTSUP, "Block driver '%s' does not "
                            "support size measurement", format);
    }
    o = opts ? vd_opts_clone(opts) : vd_opts_new();
    if (!o) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    ret = drv->measure(o, src, out, err);
    vd_opts_free(&o);
    return ret;
}

VD_API int vd_amend(vd_node *node, const vd_opts *opts, bool force,
                    vd_progress_fn progress, void *opaque, vd_error *err)
{
    vd_opts *o;
    int ret;

    if (!node->drv->amend) {
        return vd_error_set(err, -ENOTSUP, "Format driver '%s' does not "
                            "support option amendment", node->drv->name);
    }
    if (node->read_only) {
        return vd_error_set(err, -EROFS, "%s: image is read-only",
                            node->filename);
    }
    o = opts ? vd_opts_clone(opts) : vd_opts_new();
    if (!o) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    if (progress) {
        progress(0.0, opaque);
    }
    vd_node_drain_begin(node);
    ret = node->drv->amend(node, o, force, err);
    vd_node_drain_end(node);
    /* The virtual size may have changed. */
    vd_node_refresh_length(node);
    if (progress && ret == 0) {
        progress(100.0, opaque);
    }
    vd_opts_free(&o);
    return ret;
}

VD_API int vd_compact(vd_node *node, const vd_compact_opts *opts,
                      vd_progress_fn progress, void *opaque,
                      vd_compact_result *res, vd_error *err)
{
    bool dry_run = opts && opts->dry_run;
    int ret;

    memset(res, 0, sizeof(*res));
    if (!node->drv->compact) {
        return vd_error_set(err, -ENOTSUP, "Format '%s' does not support "
                            "compaction", node->drv->name);
    }
    if (!dry_run && node->read_only) {
        return vd_error_set(err, -EROFS, "%s: image is read-only",
                            node->filename);
    }
    /* Bitmaps loaded in memory would be stored again at close, into new
     * clusters past the compacted end; the caller opens without them. */
    if (!dry_run && atomic_load(&node->named_bitmaps)) {
        return vd_error_set(err, -EBUSY, "%s: the node has dirty bitmaps in "
                            "memory; open it with VD_O_NO_BITMAPS to compact",
                            node->filename);
    }
    vd_node_drain_begin(node);
    ret = node->drv->compact(node, dry_run, progress, opaque, res, err);
    vd_node_drain_end(node);
    vd_node_refresh_length(node);
    return ret;
}

VD_API int vd_amend_plan(vd_node *node, const vd_opts *opts, bool force,
                         vd_amend_change_fn fn, void *opaque, vd_error *err)
{
    vd_opts *o;
    int ret;

    if (!node->drv->amend) {
        return vd_error_set(err, -ENOTSUP, "Format driver '%s' does not "
                            "support option amendment", node->drv->name);
    }
    if (!node->drv->amend_plan) {
        return vd_error_set(err, -ENOTSUP, "Format driver '%s' cannot tell "
                            "what amending would change", node->drv->name);
    }
    o = opts ? vd_opts_clone(opts) : vd_opts_new();
    if (!o) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    vd_node_drain_begin(node);
    ret = node->drv->amend_plan(node, o, force, fn, opaque, err);
    vd_node_drain_end(node);
    vd_opts_free(&o);
    return ret;
}
