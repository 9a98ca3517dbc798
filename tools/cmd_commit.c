/*
 * vdisk commit: qemu-img commit. Opens the image read-write with its
 * chain, finds the base (the immediate backing file, or the layer named by
 * -b, which implies -d as in qemu-img), and lets vd_commit() copy every
 * allocated range above the base into it and empty the top. The base is
 * looked up the way QEMU's bdrv_find_backing_image() does: by the name
 * stored in the overlay, else by the file it resolves to (relative names
 * are relative to the overlay's directory). --output=json (vdisk's
 * own, docs/json.md) replaces "Image committed." with an object.
 *
 * --dry-run opens the chain read-only and prints what vd_commit_plan()
 * says the commit would copy into the base, whether the base would grow,
 * and what would become of the top (docs/snapshots.md, "Dry runs").
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <json-c/json.h>

#include "commands.h"
#include "dry_run.h"
#include "util.h"

static bool same_file(const char *a, const char *b)
{
    struct stat sa, sb;

    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
           sa.st_ino == sb.st_ino;
}

/* @name resolved against the directory of @overlay (malloc'd). */
static char *relative_to(const char *overlay, const char *name)
{
    const char *slash = strrchr(overlay, '/');
    size_t d = slash ? (size_t)(slash - overlay) + 1 : 0;
    char *p;

    if (name[0] == '/' || !d) {
        return strdup(name);
    }
    p = malloc(d + strlen(name) + 1);
    if (p) {
        memcpy(p, overlay, d);
        strcpy(p + d, name);
    }
    return p;
}

/* The layer below @top that @name designates, or NULL. */
static vd_node *find_backing_image(vd_node *top, const char *name)
{
    for (vd_node *p = top; p; p = vd_node_child(p, "backing")) {
        vd_node *next = vd_node_child(p, "backing");
        vd_image_info *info = NULL;
        bool match = false;

        if (!next) {
            break;
        }
        if (vd_get_info(p, &info, NULL) == 0 && info->backing_filename &&
            strcmp(info->backing_filename, name) == 0) {
            match = true;
        }
        vd_image_info_free(&info);
        if (!match && vd_node_filename(next)) {
            char *full = relative_to(vd_node_filename(p), name);
            match = full && (strcmp(full, vd_node_filename(next)) == 0 ||
                             same_file(full, vd_node_filename(next)));
            free(full);
        }
        if (match) {
            return next;
        }
    }
    return NULL;
}

static void show_progress(double percent, void *opaque)
{
    cli_progress_print(opaque, percent);
}

/* The dry run: what vd_commit() would do to @base and @top. */
static int dry_run(vd_node *top, vd_node *base, const char *filename,
                   bool keep, bool json, cli_progress *prog)
{
    vd_error err = VD_ERROR_INIT;
    dry_ranges rg = { 0 };
    int64_t top_len = vd_getlength(top), base_len = vd_getlength(base);
    bool immediate = base == vd_node_child(top, "backing");
    const char *base_name = vd_node_filename(base);
    char a[64], b[64];
    int r;

    r = vd_commit_plan(top, base, dry_ranges_add, &rg, show_progress, prog,
                       &err);
    cli_progress_print(prog, 100);
    cli_progress_end(prog);
    if (r == 0 && (top_len < 0 || base_len < 0)) {
        r = vd_error_set(&err, -EIO, "Could not get the image sizes");
    }
    if (r == 0 && rg.oom) {
        r = vd_error_set(&err, -ENOMEM, "Out of memory");
    }
    if (r < 0) {
        cli_report_vd_error(&err, r, filename);
        dry_ranges_free(&rg);
        return 1;
    }
    /* The top is emptied only when it reads through to the base. */
    bool emptied = !keep && immediate;
    uint64_t new_len = base_len < top_len ? (uint64_t)top_len
                                          : (uint64_t)base_len;
    if (json) {
        json_object *o = dry_json_new("commit", filename);
        json_object_object_add(o, "base",
                               json_object_new_string(base_name ? base_name
                                                                : ""));
        json_object_object_add(o, "bytes",
                               json_object_new_int64((int64_t)rg.bytes));
        json_object_object_add(o, "extent-count",
                               json_object_new_int64((int64_t)rg.n));
        json_object_object_add(o, "extents", dry_json_ranges(&rg));
        json_object_object_add(o, "base-size",
                               json_object_new_int64(base_len));
        json_object_object_add(o, "base-new-size",
                               json_object_new_int64((int64_t)new_len));
        json_object_object_add(o, "base-grows",
                               json_object_new_boolean(base_len < top_len));
        json_object_object_add(o, "top-emptied",
                               json_object_new_boolean(emptied));
        dry_json_print(o);
    } else {
        printf("Dry run: nothing was written.\n");
        printf("Base: %s\n", base_name ? base_name : "");
        printf("Would copy: %s in %zu extent%s\n",
               dry_size(a, sizeof(a), rg.bytes), rg.n, rg.n == 1 ? "" : "s");
        if (base_len < top_len) {
            cli_size_to_str(a, sizeof(a), (uint64_t)base_len);
            cli_size_to_str(b, sizeof(b), (uint64_t)top_len);
            printf("Base would grow: %s -> %s\n", a, b);
        } else {
            cli_size_to_str(a, sizeof(a), (uint64_t)base_len);
            printf("Base would not grow (%s)\n", a);
        }
        printf("Top: %s\n", emptied ? "would be emptied" :
               immediate ? "would be kept as it is (-d)" :
               "would be kept as it is (-b: the layers in between would no "
               "longer read correctly through it)");
        dry_print_ranges(&rg);
    }
    dry_ranges_free(&rg);
    return 0;
}

int cmd_commit(int argc, char **argv)
{
    cli_common co = { 0 };
    const char *cache = "writeback", *base = NULL, *filename;
    bool keep = false, dry = false;
    char *base_name = NULL;
    uint64_t rate = 0;
    vd_error err = VD_ERROR_INIT;
    vd_opts *opts = NULL;
    vd_node *top = NULL, *base_node;
    cli_progress prog;
    int ch, ret = 1, r;

    while ((ch = cli_getopt_common("commit", argc, argv, &co)) != -1) {
        switch (ch) {
        case 't':
            cache = optarg;
            break;
        case 'b':
            /* Layers between the top and the base stop reading correctly,
             * so the top is kept as it is (qemu-img: -b implies -d). */
            base = optarg;
            keep = true;
            break;
        case 'd':
            keep = true;
            break;
        case 'r':
            if (cli_cvtnum("rate limit", optarg, &rate) < 0) {
                return 1;
            }
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
    filename = argv[optind];

    opts = vd_opts_new();
    if (!opts || vd_opts_set(opts, "cache", cache) < 0) {
        cli_error("Out of memory");
        vd_opts_free(&opts);
        return 1;
    }
    /* A dry run opens everything read-only: no lock upgrade, no dirty
     * bit, no header rewrite. */
    top = cli_open_image(filename, co.fmt, co.image_opts, dry ? 0 : VD_O_RDWR,
                         opts);
    vd_opts_free(&opts);
    if (!top) {
        return 1;
    }

    cli_progress_init(&prog, co.progress, 1.0f);
    if (base) {
        base_node = find_backing_image(top, base);
        if (!base_node) {
            cli_progress_end(&prog);
            cli_error("Did not find '%s' in the backing chain of '%s'", base,
                      filename);
            goto out;
        }
    } else {
        base_node = vd_node_child(top, "backing");
        if (!base_node) {
            cli_progress_end(&prog);
            cli_error("Image does not have a backing file");
            goto out;
        }
    }
    if (dry) {
        ret = dry_run(top, base_node, filename, keep, co.json, &prog);
        vd_close(&top, NULL);
        return ret;
    }
    if (vd_node_filename(base_node)) {
        base_name = strdup(vd_node_filename(base_node));
    }
    r = vd_commit(top, base_node, keep ? VD_COMMIT_KEEP_TOP : 0, rate,
                  show_progress, &prog, &err);
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
    if (vd_close(&top, &err) < 0 && ret == 0) {
        cli_report_vd_error(&err, -EIO, filename);
        ret = 1;
    }
    if (ret == 0 && co.json && !co.quiet) {
        json_object *o = json_object_new_object();

        json_object_object_add(o, "image", json_object_new_string(filename));
        json_object_object_add(o, "base", base_name
                               ? json_object_new_string(base_name) : NULL);
        json_object_object_add(o, "top-emptied",
                               json_object_new_boolean(!keep));
        json_object_object_add(o, "rate-limit", json_object_new_int64(
                                   (int64_t)rate));
        cli_print_json(o);
    } else if (ret == 0) {
        cli_qprintf(co.quiet, "Image committed.\n");
    }
    free(base_name);
    return ret;
}
