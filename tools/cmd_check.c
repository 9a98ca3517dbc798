/*
 * vdisk check: qemu-img check. Runs vd_check(), and after a repair runs
 * it again without repairing to report the state the image is left in,
 * as qemu-img does. Exit status: 0 clean, 2 corruptions, 3 leaks only,
 * 63 no check for this format, 1 the check could not run.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "commands.h"
#include "json_out.h"
#include "util.h"

static void add_int(json_object *o, const char *key, int64_t v, bool always)
{
    if (always || v != 0) {
        json_object_object_add(o, key, json_object_new_int64(v));
    }
}

/* qemu's ImageCheck in QAPI field order; optional members appear only
 * when non-zero. */
static void dump_json(const char *filename, const char *format,
                      const vd_check_result *r, bool quiet)
{
    json_object *o = json_object_new_object();

    json_object_object_add(o, "filename", json_object_new_string(filename));
    json_object_object_add(o, "format", json_object_new_string(format));
    add_int(o, "check-errors", r->check_errors, true);
    add_int(o, "image-end-offset",
            r->image_end_offset > 0 ? r->image_end_offset : 0, false);
    add_int(o, "corruptions", r->corruptions, false);
    add_int(o, "leaks", r->leaks, false);
    add_int(o, "corruptions-fixed", r->corruptions_fixed, false);
    add_int(o, "leaks-fixed", r->leaks_fixed, false);
    add_int(o, "total-clusters", r->total_clusters, false);
    add_int(o, "allocated-clusters", r->allocated_clusters, false);
    add_int(o, "fragmented-clusters", r->fragmented_clusters, false);
    add_int(o, "compressed-clusters", r->compressed_clusters, false);
    if (!quiet) {
        json_qemu_print(stdout, o);
    }
    json_object_put(o);
}

static void dump_human(const vd_check_result *r, bool quiet)
{
    if (r->corruptions == 0 && r->leaks == 0 && r->check_errors == 0) {
        cli_qprintf(quiet, "No errors were found on the image.\n");
    } else {
        if (r->corruptions) {
            cli_qprintf(quiet, "\n%" PRId64 " errors were found on the image.\n"
                        "Data may be corrupted, or further writes to the image "
                        "may corrupt it.\n", r->corruptions);
        }
        if (r->leaks) {
            cli_qprintf(quiet, "\n%" PRId64 " leaked clusters were found on "
                        "the image.\nThis means waste of disk space, but no "
                        "harm to data.\n", r->leaks);
        }
        if (r->check_errors) {
            cli_qprintf(quiet, "\n%" PRId64 " internal errors have occurred "
                        "during the check.\n", r->check_errors);
        }
    }
    if (r->total_clusters != 0 && r->allocated_clusters != 0) {
        cli_qprintf(quiet, "%" PRId64 "/%" PRId64 " = %0.2f%% allocated, "
                    "%0.2f%% fragmented, %0.2f%% compressed clusters\n",
                    r->allocated_clusters, r->total_clusters,
                    r->allocated_clusters * 100.0 / r->total_clusters,
                    r->fragmented_clusters * 100.0 / r->allocated_clusters,
                    r->compressed_clusters * 100.0 / r->allocated_clusters);
    }
    if (r->image_end_offset > 0) {
        cli_qprintf(quiet, "Image end offset: %" PRId64 "\n",
                    r->image_end_offset);
    }
}

int cmd_check(int argc, char **argv)
{
    cli_common co = { .flags = VD_O_CHECK };
    const char *filename;
    unsigned fix = 0;
    vd_check_result res;
    vd_error err = VD_ERROR_INIT;
    vd_node *node;
    cli_progress prog;
    int ch, ret;

    while ((ch = cli_getopt_common("check", argc, argv, &co)) != -1) {
        switch (ch) {
        case 'r':
            co.flags |= VD_O_RDWR;
            if (strcmp(optarg, "leaks") == 0) {
                fix = VD_CHECK_FIX_LEAKS;
            } else if (strcmp(optarg, "all") == 0) {
                fix = VD_CHECK_FIX_LEAKS | VD_CHECK_FIX_ERRORS;
            } else {
                cli_error_hint("Unknown option value for -r (expecting "
                               "'leaks' or 'all'): %s", optarg);
                return 1;
            }
            break;
        case 'T':
            break;
        default:
            return 1;
        }
    }
    if (optind != argc - 1) {
        cli_error_hint("Expecting one image file name");
        return 1;
    }
    filename = argv[optind];

    node = cli_open_image(filename, co.fmt, co.image_opts, co.flags, NULL);
    if (!node) {
        return 1;
    }
    memset(&res, 0, sizeof(res));
    /* Only the machine forms (qemu-img check has no meter), and coarse:
     * the library's check has no progress hook, so 0, 50 between the
     * check and the double check of a repair, and 100 (docs/json.md). */
    cli_progress_init(&prog, false, 1.0f);
    ret = vd_check(node, &res, fix, &err);
    if (ret == -ENOTSUP) {
        cli_error("This image format does not support checks");
        ret = 63;
        goto out;
    }
    if (ret == 0 && (res.corruptions_fixed || res.leaks_fixed)) {
        int64_t cf = res.corruptions_fixed, lf = res.leaks_fixed;

        if (!co.json) {
            cli_qprintf(co.quiet, "The following inconsistencies were found "
                        "and repaired:\n\n    %" PRId64 " leaked clusters\n"
                        "    %" PRId64 " corruptions\n\nDouble checking the "
                        "fixed image now...\n", lf, cf);
        }
        memset(&res, 0, sizeof(res));
        cli_progress_print(&prog, 50);
        ret = vd_check(node, &res, 0, &err);
        res.corruptions_fixed = cf;
        res.leaks_fixed = lf;
    }
    if (ret == 0) {
        cli_progress_print(&prog, 100);
    }
    cli_progress_end(&prog);
    if (ret == 0) {
        if (co.json) {
            dump_json(filename, vd_node_format(node), &res, co.quiet);
        } else {
            dump_human(&res, co.quiet);
        }
    }
    if (ret < 0 || res.check_errors) {
        if (ret < 0) {
            cli_error("Check failed: %s", strerror(-ret));
        } else {
            cli_error("Check failed");
        }
        ret = 1;
    } else if (res.corruptions) {
        ret = 2;
    } else if (res.leaks) {
        ret = 3;
    } else {
        ret = 0;
    }
out:
    vd_close(&node, NULL);
    return ret;
}
