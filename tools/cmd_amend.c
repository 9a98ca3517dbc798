/*
 * vdisk amend: qemu-img amend. Checks the command line in qemu-img 7.2's
 * order, lists the amendable options for "-o help", opens the image
 * read-write and hands the options to vd_amend() (the listing comes
 * from the driver's own descriptions); the driver's messages
 * are printed as qemu-img prints them, with qemu-img's hints for options
 * that only creation accepts and for backing-file changes.
 * --output=json (vdisk's own, docs/json.md) reports what was applied.
 *
 * --dry-run opens the image read-only and prints each option that would
 * change (old -> new) as vd_amend_plan() finds it, or the refusal the
 * real amend would make, worded the same (docs/snapshots.md, "Dry
 * runs").
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "commands.h"
#include "dry_run.h"
#include "util.h"

static int cmp_opt_name(const void *a, const void *b)
{
    const vd_create_option *const *x = a, *const *y = b;

    return strcmp((*x)->name, (*y)->name);
}

/* The driver's amend options, listed by name as qemu-img does. */
static int print_amend_help(const char *fmt)
{
    const vd_create_option *list = vd_amend_options(fmt);
    const vd_create_option **sorted;
    size_t n = 0;

    if (!vd_create_options(fmt)) {
        if (!cli_report_unsupported_format(NULL, fmt)) {
            cli_error("Unknown file format '%s'", fmt);
        }
        return 1;
    }
    if (!list || !(vd_driver_features(fmt) & VD_DRIVER_AMEND)) {
        cli_error("Format driver '%s' does not support option amendment",
                  fmt);
        return 1;
    }
    while (list[n].name) {
        n++;
    }
    sorted = calloc(n + 1, sizeof(*sorted));
    if (!sorted) {
        return 1;
    }
    for (size_t i = 0; i < n; i++) {
        sorted[i] = &list[i];
    }
    qsort(sorted, n, sizeof(*sorted), cmp_opt_name);
    printf("Amend options for '%s':\n", fmt);
    for (size_t i = 0; i < n; i++) {
        const char *t = sorted[i]->type;
        char head[128];
        snprintf(head, sizeof(head), "  %s=<%s>", sorted[i]->name,
                 !strcmp(t, "bool") ? "bool (on/off)" :
                 !strcmp(t, "number") ? "num" :
                 !strcmp(t, "string") ? "str" : t);
        printf("%-24s - %s\n", head, sorted[i]->help);
    }
    free(sorted);
    return 0;
}

static void on_progress(double percent, void *opaque)
{
    cli_progress_print(opaque, percent);
}

/* True when @key is a creation option of @fmt (for qemu-img's hint). */
static bool is_create_option(const char *fmt, const char *key)
{
    const vd_create_option *o = vd_create_options(fmt);
    for (; o && o->name; o++) {
        if (!strcmp(o->name, key)) {
            return true;
        }
    }
    return false;
}

/* Prints a failed amend's message and qemu-img's hints. */
static void report_amend_error(const vd_error *err, const char *filename,
                               const char *fmt)
{
    const char *msg = cli_strip_filename(err->message, filename);

    cli_error("%s", msg[0] ? msg : strerror(-err->code));
    if (!strncmp(msg, "Invalid parameter '", 19)) {
        char key[256];
        if (sscanf(msg + 19, "%255[^']", key) == 1 &&
            is_create_option(fmt, key)) {
            fprintf(stderr, "This option is only supported for image "
                    "creation\n");
        }
    } else if (strstr(msg, "expects a non-negative number")) {
        fprintf(stderr, "Optional suffix k, M, G, T, P or E means kilo-, "
                "mega-, giga-, tera-, peta-\nand exabytes, "
                "respectively.\n");
    } else if (!strcmp(msg, "Cannot amend the backing file")) {
        fprintf(stderr, "You can use '%s rebase' instead.\n", cli_prog);
    }
    cli_print_hint(err);
}

/* A dry run's change, kept as JSON until the dry run has succeeded. */
static void on_change(const char *option, const char *old_value,
                      const char *new_value, void *opaque)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "option", json_object_new_string(option));
    json_object_object_add(o, "old", json_object_new_string(old_value));
    json_object_object_add(o, "new", json_object_new_string(new_value));
    json_object_array_add(opaque, o);
}

static int dry_run(vd_node *node, const vd_opts *opts, bool force,
                   const char *filename, bool json)
{
    json_object *list = json_object_new_array();
    vd_error err = VD_ERROR_INIT;
    size_t n;

    if (vd_amend_plan(node, opts, force, on_change, list, &err) < 0) {
        report_amend_error(&err, filename, vd_node_format(node));
        json_object_put(list);
        return 1;
    }
    if (json) {
        json_object *o = dry_json_new("amend", filename);
        json_object_object_add(o, "changes", list);
        dry_json_print(o);
        return 0;
    }
    printf("Dry run: nothing was written.\n");
    n = json_object_array_length(list);
    for (size_t i = 0; i < n; i++) {
        json_object *c = json_object_array_get_idx(list, i), *v;
        const char *val[3];
        const char *const keys[3] = { "option", "old", "new" };
        for (int k = 0; k < 3; k++) {
            json_object_object_get_ex(c, keys[k], &v);
            val[k] = json_object_get_string(v);
        }
        printf("%s: %s -> %s\n", val[0], val[1][0] ? val[1] : "(none)",
               val[2][0] ? val[2] : "(none)");
    }
    if (!n) {
        printf("Nothing would change\n");
    }
    json_object_put(list);
    return 0;
}

int cmd_amend(int argc, char **argv)
{
    cli_common co = { 0 };
    const char *filename = NULL, *cache = NULL;
    char *options = NULL;
    bool force = false;
    bool dry = false;
    vd_error err = VD_ERROR_INIT;
    vd_opts *opts = NULL, *open_opts = NULL;
    vd_node *node = NULL;
    cli_progress prog = { 0 };
    int ch, ret = 1;

    while ((ch = cli_getopt_common("amend", argc, argv, &co)) != -1) {
        switch (ch) {
        case 'o':
            if (!options) {
                options = strdup(optarg);
            } else {
                char *n = NULL;
                if (asprintf(&n, "%s,%s", options, optarg) < 0) {
                    n = NULL;
                }
                free(options);
                options = n;
            }
            if (!options) {
                cli_error("out of memory");
                return 1;
            }
            break;
        case 't':
            cache = optarg;
            break;
        case OPT_FORCE:
            force = true;
            break;
        case OPT_DRY_RUN:
            dry = true;
            break;
        default:
            goto out;
        }
    }
    if (!options) {
        cli_error_hint("Must specify options (-o)");
        goto out;
    }
    if (co.quiet || dry) {
        co.progress = false;
    }
    cli_progress_init(&prog, co.progress, 1.0f);
    filename = optind == argc - 1 ? argv[argc - 1] : NULL;
    if (co.fmt && cli_has_help_option(options)) {
        ret = print_amend_help(co.fmt);
        goto out;
    }
    if (optind != argc - 1) {
        cli_error("Expecting one image file name");
        goto out;
    }
    if (cache) {
        open_opts = vd_opts_new();
        if (!open_opts || vd_opts_set(open_opts, "cache", cache) < 0) {
            cli_error("out of memory");
            goto out;
        }
    }
    /* A dry run opens read-only: no lock upgrade, no dirty bit. */
    node = cli_open_image(filename, co.fmt, co.image_opts, dry ? 0 : VD_O_RDWR,
                          open_opts);
    if (!node) {
        goto out;
    }
    co.fmt = vd_node_format(node);
    if (cli_has_help_option(options)) {
        ret = print_amend_help(co.fmt);
        goto out;
    }
    opts = vd_opts_new();
    if (!opts || vd_opts_parse(opts, options, NULL, &err) < 0) {
        cli_report_vd_error(&err, -EINVAL, filename);
        goto out;
    }
    if (dry) {
        ret = dry_run(node, opts, force, filename, co.json);
        goto out;
    }
    if (vd_amend(node, opts, force, prog.enabled ? on_progress : NULL, &prog,
                 &err) < 0) {
        report_amend_error(&err, filename, co.fmt);
        goto out;
    }
    if (cli_progress_machine()) {
        cli_progress_print(&prog, 100);
    }
    if (co.json && !co.quiet) {
        /* What was asked and applied, as given (docs/json.md). */
        json_object *o = json_object_new_object();
        json_object *set = json_object_new_object();

        json_object_object_add(o, "image", json_object_new_string(filename));
        json_object_object_add(o, "format", json_object_new_string(co.fmt));
        for (size_t i = 0; i < vd_opts_count(opts); i++) {
            const char *k, *v;

            vd_opts_nth(opts, i, &k, &v);
            json_object_object_add(set, k, json_object_new_string(v));
        }
        json_object_object_add(o, "options", set);
        json_object_object_add(o, "force", json_object_new_boolean(force));
        ret = 0;
        cli_progress_end(&prog);
        prog.enabled = false;
        cli_print_json(o);
    }
    ret = 0;
out:
    if (prog.enabled && ret == 0) {
        cli_progress_end(&prog);
    }
    if (node && vd_close(&node, &err) < 0 && ret == 0) {
        cli_report_vd_error(&err, -EIO, filename);
        ret = 1;
    }
    vd_opts_free(&opts);
    vd_opts_free(&open_opts);
    free(options);
    return ret;
}
