/*
 * vdisk rebase: qemu-img rebase. Safe mode opens the image with its chain
 * and lets vd_rebase() copy into the overlay every sector that would read
 * differently through the new backing file; -u (unsafe) opens the image
 * without its chain and only rewrites the header. Everything that can be
 * refused (missing -b, unknown -F, a backing name without a format, a name
 * that does not fit) is refused before the image is touched, unlike
 * qemu-img, which finds some of these only after copying. qemu-img
 * rebase prints nothing; --output=json (vdisk's own, docs/json.md)
 * prints what the header now says.
 *
 * --dry-run opens the image (and the new backing file) read-only and
 * prints the header change and, in safe mode, the ranges that
 * vd_rebase_plan() says would be copied into the overlay
 * (docs/snapshots.md, "Dry runs").
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "commands.h"
#include "dry_run.h"
#include "util.h"

/* qcow2.txt: backing_file_size is at most 1023. */
#define MAX_BACKING_NAME 1023

static void show_progress(double percent, void *opaque)
{
    cli_progress_print(opaque, percent);
}

static json_object *json_backing(const char *file, const char *fmt)
{
    json_object *o = json_object_new_object();

    json_object_object_add(o, "filename",
                           file ? json_object_new_string(file) : NULL);
    json_object_object_add(o, "format",
                           fmt ? json_object_new_string(fmt) : NULL);
    return o;
}

/* The dry run: the header change, and what a safe rebase would copy. */
static int dry_run(vd_node *top, const char *filename, const char *backing,
                   const char *backing_fmt, const vd_opts *bopts,
                   bool unsafe, bool json, cli_progress *prog)
{
    const char *old = vd_node_backing_file(top);
    const char *old_fmt = old ? vd_node_backing_format(top) : NULL;
    vd_error err = VD_ERROR_INIT;
    dry_ranges rg = { 0 };
    char a[64];
    int r;

    r = vd_rebase_plan(top, backing, backing_fmt, bopts,
                       unsafe ? VD_REBASE_UNSAFE : 0, dry_ranges_add, &rg,
                       show_progress, prog, &err);
    cli_progress_print(prog, 100);
    cli_progress_end(prog);
    if (r == 0 && rg.oom) {
        r = vd_error_set(&err, -ENOMEM, "Out of memory");
    }
    if (r < 0) {
        cli_report_vd_error(&err, r, filename);
        dry_ranges_free(&rg);
        return 1;
    }
    if (!backing) {
        backing_fmt = NULL;
    }
    if (json) {
        json_object *o = dry_json_new("rebase", filename);
        json_object_object_add(o, "mode", json_object_new_string(
                                   unsafe ? "unsafe" : "safe"));
        json_object_object_add(o, "old-backing", json_backing(old, old_fmt));
        json_object_object_add(o, "new-backing",
                               json_backing(backing, backing_fmt));
        json_object_object_add(o, "bytes",
                               json_object_new_int64((int64_t)rg.bytes));
        json_object_object_add(o, "extent-count",
                               json_object_new_int64((int64_t)rg.n));
        json_object_object_add(o, "extents", dry_json_ranges(&rg));
        dry_json_print(o);
    } else {
        printf("Dry run: nothing was written.\n");
        printf("Backing file: %s%s%s%s -> %s%s%s%s\n",
               old ? old : "(none)", old_fmt ? " (" : "",
               old_fmt ? old_fmt : "", old_fmt ? ")" : "",
               backing ? backing : "(none)", backing_fmt ? " (" : "",
               backing_fmt ? backing_fmt : "", backing_fmt ? ")" : "");
        if (unsafe) {
            printf("Unsafe mode: only the header would change\n");
        } else {
            printf("Would copy into the overlay: %s in %zu extent%s\n",
                   dry_size(a, sizeof(a), rg.bytes), rg.n,
                   rg.n == 1 ? "" : "s");
            dry_print_ranges(&rg);
        }
    }
    dry_ranges_free(&rg);
    return 0;
}

int cmd_rebase(int argc, char **argv)
{
    cli_common co = { 0 };
    const char *cache = "writeback", *src_cache = "writeback";
    const char *backing = NULL, *backing_fmt = NULL, *filename;
    bool unsafe = false, dry = false;
    vd_error err = VD_ERROR_INIT;
    vd_opts *opts = NULL, *bopts = NULL;
    vd_node *top = NULL;
    cli_progress prog;
    unsigned flags;
    int ch, ret = 1, r;

    while ((ch = cli_getopt_common("rebase", argc, argv, &co)) != -1) {
        switch (ch) {
        case 'F':
            backing_fmt = optarg;
            break;
        case 'b':
            backing = optarg;
            break;
        case 'u':
            unsafe = true;
            break;
        case 't':
            cache = optarg;
            break;
        case 'T':
            src_cache = optarg;
            break;
        case OPT_DRY_RUN:
            dry = true;
            break;
        default:
            return 1;
        }
    }
    if (co.quiet) {
        co.progress = false;
    }
    if (optind != argc - 1) {
        cli_error_hint("Expecting one image file name");
        return 1;
    }
    if (!unsafe && !backing) {
        cli_error_hint("Must specify backing file (-b) or use unsafe mode "
                       "(-u)");
        return 1;
    }
    filename = argv[optind];
    if (!cli_cache_mode(cache)) {
        cli_error("Invalid cache option: %s", cache);
        return 1;
    }
    if (!cli_cache_mode(src_cache)) {
        cli_error("Invalid source cache option: %s", src_cache);
        return 1;
    }
    if (backing && !*backing) {
        backing = NULL;
    }
    if (backing && !backing_fmt) {
        /* qemu-img 7.2 copies first and then fails with this message. */
        cli_error("Could not change the backing file to '%s': backing format "
                  "must be specified", backing);
        return 1;
    }
    if (backing && strlen(backing) > MAX_BACKING_NAME) {
        cli_error("Could not change the backing file to '%s': Invalid "
                  "argument", backing);
        return 1;
    }

    opts = vd_opts_new();
    bopts = vd_opts_new();
    if (!opts || !bopts ||
        vd_opts_set(opts, "cache", cli_cache_mode(cache)) < 0 ||
        vd_opts_set(bopts, "cache", cli_cache_mode(src_cache)) < 0) {
        cli_error("Out of memory");
        goto out;
    }
    /* A dry run opens read-only: no lock upgrade, no header rewrite. */
    flags = (dry ? 0 : VD_O_RDWR) | (unsafe ? VD_O_NO_BACKING : 0) |
            co.flags;
    top = cli_open_image(filename, co.fmt, co.image_opts, flags, opts);
    if (!top) {
        goto out;
    }
    if (backing_fmt) {
        /* As qemu-img, any driver name it knows passes here (formats,
         * protocols, filters: host_device, nbd, ...): -u only records
         * the name, and a safe rebase refuses a driver vdisk does not
         * have when it opens the new backing file, unless that file is
         * in the chain already. */
        if (!(vd_driver_features(backing_fmt) & VD_DRIVER_QEMU_NAME)) {
            cli_error("Invalid format name: '%s'", backing_fmt);
            goto out;
        }
    }

    cli_progress_init(&prog, co.progress, 2.0f);
    if (dry) {
        ret = dry_run(top, filename, backing, backing_fmt, bopts, unsafe,
                      co.json, &prog);
        goto out;
    }
    r = vd_rebase(top, backing, backing_fmt, bopts,
                  unsafe ? VD_REBASE_UNSAFE : 0, show_progress, &prog, &err);
    /* qemu-img draws 100 even after a failure; the machine forms keep
     * 100 for success. */
    if (r == 0 || !cli_progress_machine()) {
        cli_progress_print(&prog, 100);
    }
    cli_progress_end(&prog);
    if (r < 0) {
        cli_report_vd_error(&err, r, filename);
        goto out;
    }
    ret = 0;
out:
    if (top && vd_close(&top, &err) < 0 && ret == 0) {
        cli_report_vd_error(&err, -EIO, filename);
        ret = 1;
    }
    if (ret == 0 && co.json && !co.quiet && !dry) {
        json_object *o = json_object_new_object();

        json_object_object_add(o, "image", json_object_new_string(filename));
        json_object_object_add(o, "backing-file", backing
                               ? json_object_new_string(backing) : NULL);
        json_object_object_add(o, "backing-fmt", backing && backing_fmt
                               ? json_object_new_string(backing_fmt) : NULL);
        json_object_object_add(o, "unsafe", json_object_new_boolean(unsafe));
        cli_print_json(o);
    }
    vd_opts_free(&opts);
    vd_opts_free(&bopts);
    return ret;
}
