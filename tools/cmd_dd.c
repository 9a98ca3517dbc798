/*
 * vdisk dd: qemu-img dd. Operands are parsed like dd(1) (bs=, count=,
 * skip=, if=, of=); the output image is created and then written block by
 * block. Sizes follow qemu-img exactly, including its quirk that count
 * limits the input size before skip is subtracted. vdisk's own
 * --output=json and --progress forms are in docs/json.md.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "commands.h"
#include "util.h"

int cmd_dd(int argc, char **argv)
{
    cli_common co = { 0 };
    const char *out_fmt = "raw";
    const char *in_name = NULL, *out_name = NULL;
    uint64_t bs = 512, count = 0, skip = 0;
    bool has_count = false, has_skip = false;
    cli_progress prog = { 0 };
    int64_t start_pos;
    vd_node *in = NULL, *out = NULL;
    vd_opts *opts = NULL;
    vd_error err = VD_ERROR_INIT;
    uint8_t *buf = NULL;
    int64_t size, in_pos, out_pos = 0;
    int ch, ret = 1;

    while ((ch = cli_getopt_common("dd", argc, argv, &co)) != -1) {
        switch (ch) {
        case 'O':
            out_fmt = optarg;
            break;
        default:
            return 1;
        }
    }

    for (int i = optind; i < argc; i++) {
        const char *eq = strchr(argv[i], '=');
        const char *val = eq ? eq + 1 : NULL;
        size_t klen = eq ? (size_t)(eq - argv[i]) : 0;

#define KEY_IS(k) (eq && klen == strlen(k) && strncmp(argv[i], k, klen) == 0)
        if (KEY_IS("bs")) {
            int r = vd_parse_size(val, &bs);

            if (r == -EINVAL) {
                cli_cvtnum("bs", val, &bs);
                return 1;
            }
            if (r < 0 || bs < 1 || bs > INT_MAX) {
                cli_error("Invalid bs specified. Must be between 1 and %d.",
                          INT_MAX);
                return 1;
            }
        } else if (KEY_IS("count")) {
            if (cli_cvtnum("count", val, &count) < 0) {
                return 1;
            }
            has_count = true;
        } else if (KEY_IS("skip")) {
            if (cli_cvtnum("skip", val, &skip) < 0) {
                return 1;
            }
            has_skip = true;
        } else if (KEY_IS("if")) {
            in_name = val;
        } else if (KEY_IS("of")) {
            out_name = val;
        } else {
            cli_error("unrecognized operand %.*s",
                      (int)(eq ? klen : strlen(argv[i])), argv[i]);
            return 1;
        }
#undef KEY_IS
    }
    if (!in_name || !out_name) {
        cli_error("Must specify both input and output files");
        return 1;
    }

    /* --image-opts is for the input only: qemu-img creates and opens
     * the output by name. */
    in = cli_open_image(in_name, co.fmt, co.image_opts, co.flags, NULL);
    if (!in) {
        return 1;
    }
    if (!vd_create_options(out_fmt)) {
        if (!cli_report_unsupported_format(out_name, out_fmt)) {
            cli_error("Unknown file format");
        }
        goto out;
    }
    size = vd_getlength(in);
    if (size < 0) {
        cli_error("Failed to get size for '%s'", in_name);
        goto out;
    }
    if (has_count && count <= (uint64_t)INT64_MAX / bs &&
        (int64_t)(count * bs) < size) {
        size = (int64_t)(count * bs);
    }

    bool skip_past_end = has_skip && (skip > (uint64_t)INT64_MAX / bs ||
                                      (uint64_t)size < skip * bs);
    char sizebuf[32];

    snprintf(sizebuf, sizeof(sizebuf), "%" PRId64,
             skip_past_end ? 0 : size - (int64_t)(skip * bs));
    opts = vd_opts_new();
    if (!opts || vd_opts_set(opts, "size", sizebuf) < 0) {
        goto out;
    }
    if (vd_create(out_name, out_fmt, opts, &err) < 0) {
        cli_error("%s: error while creating output image: %s", out_name,
                  cli_strip_filename(err.message, out_name));
        goto out;
    }
    out = cli_open(out_name, out_fmt, VD_O_RDWR, NULL);
    if (!out) {
        goto out;
    }
    if (skip_past_end) {
        cli_error("%s: cannot skip to specified offset", in_name);
        in_pos = size;
    } else {
        in_pos = (int64_t)(skip * bs);
    }

    buf = cli_io_buffer(bs);
    if (!buf) {
        cli_error("Out of memory");
        goto out;
    }
    /* Only the machine forms: qemu-img dd has no meter. */
    start_pos = in_pos;
    cli_progress_init(&prog, false, 1.0f);
    for (out_pos = 0; in_pos < size;) {
        uint64_t bytes = (uint64_t)(in_pos + (int64_t)bs > size ? size - in_pos
                                                                : (int64_t)bs);
        int r;

        r = vd_pread(in, buf, bytes, (uint64_t)in_pos, 0, &err);
        if (r < 0) {
            cli_error("error while reading from input image file: %s",
                      strerror(-r));
            goto out;
        }
        in_pos += (int64_t)bytes;
        r = vd_pwrite(out, buf, bytes, (uint64_t)out_pos, 0, &err);
        if (r < 0) {
            cli_error("error while writing to output image file: %s",
                      strerror(-r));
            goto out;
        }
        out_pos += (int64_t)bytes;
        cli_progress_print_bytes(&prog, (uint64_t)out_pos,
                                 (uint64_t)(size - start_pos));
    }
    cli_progress_print_bytes(&prog, (uint64_t)out_pos,
                             (uint64_t)(size - start_pos));
    cli_progress_end(&prog);
    ret = 0;
out:
    free(buf);
    vd_opts_free(&opts);
    vd_close(&in, NULL);
    if (out) {
        vd_error_clear(&err);
        if (vd_close(&out, &err) < 0 && ret == 0) {
            cli_report_vd_error(&err, -EIO, out_name);
            ret = 1;
        }
    }
    if (ret == 0 && co.json) {
        json_object *o = json_object_new_object();

        json_object_object_add(o, "input", json_object_new_string(in_name));
        json_object_object_add(o, "output", json_object_new_string(out_name));
        json_object_object_add(o, "output-format",
                               json_object_new_string(out_fmt));
        json_object_object_add(o, "block-size",
                               json_object_new_int64((int64_t)bs));
        json_object_object_add(o, "skip", has_skip ? json_object_new_int64(
                                   (int64_t)skip) : NULL);
        json_object_object_add(o, "count", has_count ? json_object_new_int64(
                                   (int64_t)count) : NULL);
        json_object_object_add(o, "bytes", json_object_new_int64(out_pos));
        cli_print_json(o);
    }
    return ret;
}
