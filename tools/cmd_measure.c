/*
 * vdisk measure: qemu-img measure. Parses the command line as qemu-img
 * 7.2 does (same checks in the same order, same messages), opens the
 * source image when there is one (optionally at an internal snapshot),
 * asks vd_measure() for the target format's sizes and prints them in
 * human form or as qemu's BlockMeasureInfo JSON.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commands.h"
#include "json_out.h"
#include "util.h"

/* Appends an -o argument to the accumulated ones, as qemu-img joins
 * repeated -o options with commas. */
static char *accumulate(char *acc, const char *arg)
{
    char *out;

    if (!acc) {
        return strdup(arg);
    }
    if (asprintf(&out, "%s,%s", acc, arg) < 0) {
        out = NULL;
    }
    free(acc);
    return out;
}

int cmd_measure(int argc, char **argv)
{
    cli_common co = { 0 };
    const char *out_fmt = "raw", *filename = NULL;
    const char *snapshot = NULL;
    char *options = NULL;
    uint64_t img_size = UINT64_MAX;
    vd_opts *opts = NULL;
    vd_node *src = NULL;
    vd_error err = VD_ERROR_INIT;
    vd_measure_result res;
    int ch, ret = 1;

    while ((ch = cli_getopt_common("measure", argc, argv, &co)) != -1) {
        switch (ch) {
        case 'O':
            out_fmt = optarg;
            break;
        case 'o':
            options = accumulate(options, optarg);
            if (!options) {
                cli_error("out of memory");
                return 1;
            }
            break;
        case 'l':
            snapshot = optarg;
            break;
        case OPT_SIZE:
            if (cli_cvtnum("image size", optarg, &img_size) < 0) {
                goto out;
            }
            break;
        default:
            goto out;
        }
    }

    if (argc - optind > 1) {
        cli_error("At most one filename argument is allowed.");
        goto out;
    } else if (argc - optind == 1) {
        filename = argv[optind];
    }
    if (!filename && (co.image_opts || co.fmt || snapshot)) {
        cli_error("--image-opts, -f, and -l require a filename argument.");
        goto out;
    }
    if (filename && img_size != UINT64_MAX) {
        cli_error("--size N cannot be used together with a filename.");
        goto out;
    }
    if (!filename && img_size == UINT64_MAX) {
        cli_error("Either --size N or one filename must be specified.");
        goto out;
    }

    if (filename) {
        src = cli_open_image(filename, co.fmt, co.image_opts,
                             co.flags, NULL);
        if (!src) {
            goto out;
        }
        if (snapshot && cli_load_snapshot(src, snapshot) < 0) {
            goto out;
        }
    }

    opts = vd_opts_new();
    if (!opts) {
        cli_error("out of memory");
        goto out;
    }
    if (!vd_create_options(out_fmt)) {
        if (!cli_report_unsupported_format(NULL, out_fmt)) {
            cli_error("Unknown file format '%s'", out_fmt);
        }
        goto out;
    }
    if (options && vd_opts_parse(opts, options, NULL, &err) < 0) {
        cli_report_vd_error(&err, -EINVAL, out_fmt);
        cli_error("Invalid options for file format '%s'", out_fmt);
        goto out;
    }
    /* As qemu-img: the option string is checked as a whole before --size
     * replaces its size. */
    if (vd_check_create_opts(out_fmt, opts, &err) < 0) {
        cli_report_vd_error(&err, -EINVAL, out_fmt);
        if (strstr(err.message, "non-negative number")) {
            fprintf(stderr, "Optional suffix k, M, G, T, P or E means kilo-, "
                    "mega-, giga-, tera-, peta-\nand exabytes, "
                    "respectively.\n");
        }
        cli_error("Invalid options for file format '%s'", out_fmt);
        goto out;
    }
    if (img_size != UINT64_MAX) {
        char buf[32];
        snprintf(buf, sizeof(buf), "%" PRIu64, img_size);
        vd_opts_set(opts, "size", buf);
    }
    ret = vd_measure(out_fmt, opts, src, &res, &err);
    if (ret < 0) {
        /* Option syntax errors are reported as qemu-img's QemuOpts
         * parser does, with the second line naming the format. */
        bool syntax = strncmp(err.message, "Invalid parameter '", 19) == 0 ||
                      (strncmp(err.message, "Parameter '", 11) == 0 &&
                       strstr(err.message, "' expects ")) ||
                      (strncmp(err.message, "Value '", 7) == 0 &&
                       strstr(err.message, "' is out of range for "));
        cli_report_vd_error(&err, ret, out_fmt);
        if (syntax && strstr(err.message, "non-negative number")) {
            fprintf(stderr, "Optional suffix k, M, G, T, P or E means kilo-, "
                    "mega-, giga-, tera-, peta-\nand exabytes, "
                    "respectively.\n");
        }
        if (syntax) {
            cli_error("Invalid options for file format '%s'", out_fmt);
        }
        ret = 1;
        goto out;
    }

    if (co.json) {
        json_object *o = json_object_new_object();
        json_object_object_add(o, "required",
                               json_object_new_int64((int64_t)res.required));
        json_object_object_add(o, "fully-allocated",
                               json_object_new_int64(
                                   (int64_t)res.fully_allocated));
        if (res.has_bitmaps) {
            json_object_object_add(o, "bitmaps",
                                   json_object_new_int64(
                                       (int64_t)res.bitmaps));
        }
        json_qemu_print(stdout, o);
        json_object_put(o);
    } else {
        printf("required size: %" PRIu64 "\n", res.required);
        printf("fully allocated size: %" PRIu64 "\n", res.fully_allocated);
        if (res.has_bitmaps) {
            printf("bitmaps size: %" PRIu64 "\n", res.bitmaps);
        }
    }
    ret = 0;
out:
    vd_opts_free(&opts);
    if (src) {
        vd_close(&src, NULL);
    }
    free(options);
    return ret;
}
