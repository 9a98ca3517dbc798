/*
 * vdisk amend: qemu-img amend. Checks the command line in qemu-img 7.2's
 * order, lists the amendable options for "-o help", opens the image
 * read-write and hands the options to vd_amend(); the driver's messages
 * are printed as qemu-img prints them, with qemu-img's hints for options
 * that only creation accepts and for backing-file changes.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commands.h"
#include "util.h"

/* qcow2's amend options as qemu-img 7.2 lists them (sorted by name). */
static const struct {
    const char *name, *type, *help;
} qcow2_amend_help[] = {
    { "backing_file", "str", "File name of a base image" },
    { "backing_fmt", "str", "Image format of the base image" },
    { "compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])" },
    { "data_file", "str", "File name of an external data file" },
    { "data_file_raw", "bool (on/off)",
      "The external data file must stay valid as a raw image" },
    { "encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds" },
    { "encrypt.keyslot", "num",
      "Select a single keyslot to modify explicitly" },
    { "encrypt.new-secret", "str",
      "New secret to set in the matching keyslots. Empty string to erase" },
    { "encrypt.old-secret", "str",
      "Select all keyslots that match this password" },
    { "encrypt.state", "str",
      "Select new state of affected keyslots (active/inactive)" },
    { "lazy_refcounts", "bool (on/off)", "Postpone refcount updates" },
    { "refcount_bits", "num", "Width of a reference count entry in bits" },
    { "size", "size", "Virtual disk size" },
};

static int print_amend_help(const char *fmt)
{
    if (!vd_create_options(fmt)) {
        if (!cli_report_unsupported_format(NULL, fmt)) {
            cli_error("Unknown file format '%s'", fmt);
        }
        return 1;
    }
    if (!(vd_driver_features(fmt) & VD_DRIVER_AMEND)) {
        cli_error("Format driver '%s' does not support option amendment",
                  fmt);
        return 1;
    }
    printf("Amend options for '%s':\n", fmt);
    for (size_t i = 0; i < sizeof(qcow2_amend_help) /
                           sizeof(qcow2_amend_help[0]); i++) {
        char head[128];
        snprintf(head, sizeof(head), "  %s=<%s>", qcow2_amend_help[i].name,
                 qcow2_amend_help[i].type);
        printf("%-24s - %s\n", head, qcow2_amend_help[i].help);
    }
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

int cmd_amend(int argc, char **argv)
{
    const char *fmt = NULL, *filename = NULL, *cache = NULL;
    char *options = NULL;
    bool progress = false, quiet = false, force = false, image_opts = false;
    vd_error err = VD_ERROR_INIT;
    vd_opts *opts = NULL, *open_opts = NULL;
    vd_node *node = NULL;
    cli_progress prog = { false, 0, 0 };
    int ch, ret = 1;

    while ((ch = cli_getopt("amend", argc, argv)) != -1) {
        switch (ch) {
        case 'h':
            cli_print_help();
            free(options);
            return 0;
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
        case 'f':
            fmt = optarg;
            break;
        case 't':
            cache = optarg;
            break;
        case 'p':
            progress = true;
            break;
        case 'q':
            quiet = true;
            break;
        case OPT_FORCE:
            force = true;
            break;
        case OPT_IMAGE_OPTS:
            image_opts = true;
            break;
        default:
            goto out;
        }
    }
    if (!options) {
        cli_error_hint("Must specify options (-o)");
        goto out;
    }
    if (quiet) {
        progress = false;
    }
    cli_progress_init(&prog, progress, 1.0f);
    filename = optind == argc - 1 ? argv[argc - 1] : NULL;
    if (fmt && cli_has_help_option(options)) {
        ret = print_amend_help(fmt);
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
    node = cli_open_image(filename, fmt, image_opts, VD_O_RDWR, open_opts);
    if (!node) {
        goto out;
    }
    fmt = vd_node_format(node);
    if (cli_has_help_option(options)) {
        ret = print_amend_help(fmt);
        goto out;
    }
    opts = vd_opts_new();
    if (!opts || vd_opts_parse(opts, options, NULL, &err) < 0) {
        cli_report_vd_error(&err, -EINVAL, filename);
        goto out;
    }
    if (vd_amend(node, opts, force, prog.enabled ? on_progress : NULL, &prog,
                 &err) < 0) {
        const char *msg = cli_strip_filename(err.message, filename);
        cli_error("%s", msg[0] ? msg : strerror(-err.code));
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
        goto out;
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
