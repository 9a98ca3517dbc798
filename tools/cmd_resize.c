/*
 * vdisk resize: qemu-img resize. The size is taken off the end of argv
 * before option parsing so that "-10M" is not mistaken for an option, as
 * qemu-img does; "+N" and "-N" are relative to the current size.
 * --output=json (vdisk's own, docs/json.md) replaces "Image resized."
 * with the old and new sizes.
 *
 * --dry-run opens the image read-only, makes the command line's refusals
 * (a shrink needs --shrink, as in qemu-img) and the library's and
 * driver's (vd_truncate_plan()), and prints old and new size
 * and, when shrinking, the bytes of data stored past the new end
 * (docs/snapshots.md, "Dry runs").
 */
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <json-c/json.h>

#include "commands.h"
#include "dry_run.h"
#include "util.h"

static int parse_prealloc(const char *s, vd_prealloc *out)
{
    static const char *const names[] = { "off", "metadata", "falloc",
                                         "full" };

    for (int i = 0; i < 4; i++) {
        if (strcmp(s, names[i]) == 0) {
            *out = (vd_prealloc)i;
            return 0;
        }
    }
    return -EINVAL;
}

/* Bytes of [from, to) that @node stores data for itself (qemu-img map:
 * "data": true at depth 0), or a negative errno. */
static int data_beyond(vd_node *node, uint64_t from, uint64_t to,
                       uint64_t *out, vd_error *err)
{
    *out = 0;
    while (from < to) {
        vd_extent ext;
        int r = vd_block_status(node, from, to - from, &ext, err);
        if (r < 0) {
            return r;
        }
        if (ext.length == 0) {
            return vd_error_set(err, -EIO, "block status made no progress");
        }
        if ((ext.flags & VD_BLOCK_DATA) && ext.depth == 0) {
            *out += ext.length;
        }
        from += ext.length;
    }
    return 0;
}

static int dry_run(vd_node *node, const char *filename, int64_t current,
                   int64_t total, bool shrink, vd_prealloc prealloc,
                   bool json)
{
    vd_error err = VD_ERROR_INIT;
    uint64_t beyond = 0;
    char a[64], b[64];
    int r = vd_truncate_plan(node, (uint64_t)total, shrink, prealloc, &err);

    if (r < 0) {
        cli_report_vd_error(&err, r, filename);
        return 1;
    }
    if (total < current &&
        data_beyond(node, (uint64_t)total, (uint64_t)current, &beyond,
                    &err) < 0) {
        cli_report_vd_error(&err, -EIO, filename);
        return 1;
    }
    if (json) {
        json_object *o = dry_json_new("resize", filename);
        json_object_object_add(o, "old-size", json_object_new_int64(current));
        json_object_object_add(o, "new-size", json_object_new_int64(total));
        json_object_object_add(o, "shrink",
                               json_object_new_boolean(total < current));
        json_object_object_add(o, "data-beyond-end",
                               json_object_new_int64((int64_t)beyond));
        dry_json_print(o);
        return 0;
    }
    cli_size_to_str(a, sizeof(a), (uint64_t)current);
    cli_size_to_str(b, sizeof(b), (uint64_t)total);
    printf("Dry run: nothing was written.\n");
    printf("Size: %s -> %s (%" PRId64 " -> %" PRId64 " bytes)%s\n", a, b,
           current, total, total < current ? ", shrink" :
           total > current ? ", grow" : ", unchanged");
    if (total < current) {
        printf("Data beyond the new end (would be lost): %s\n",
               dry_size(a, sizeof(a), beyond));
    }
    return 0;
}

int cmd_resize(int argc, char **argv)
{
    cli_common co = { 0 };
    const char *size, *filename;
    bool shrink = false, dry = false;
    vd_prealloc prealloc = VD_PREALLOC_OFF;
    vd_error err = VD_ERROR_INIT;
    int relative = 0, ch, ret = 1, r;
    uint64_t n;
    int64_t current = -1, total = -1;
    vd_node *node;

    /* qemu-img counts the arguments before it reads an option (its
     * `resize --help` is "Not enough arguments"); vdisk's help works. */
    if (argc == 2 && cli_as == CLI_VDISK &&
        (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0)) {
        cli_print_command_help(cli_find_command("resize"));
        return 0;
    }
    if (argc < 3) {
        cli_error_hint("Not enough arguments");
        return 1;
    }
    size = argv[--argc];

    while ((ch = cli_getopt_common("resize", argc, argv, &co)) != -1) {
        switch (ch) {
        case OPT_SHRINK:
            shrink = true;
            break;
        case OPT_PREALLOCATION:
            if (parse_prealloc(optarg, &prealloc) < 0) {
                cli_error("Invalid preallocation mode '%s'", optarg);
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
    if (optind != argc - 1) {
        cli_error_hint("Expecting image file name and size");
        return 1;
    }
    filename = argv[optind];

    if (size[0] == '+') {
        relative = 1;
        size++;
    } else if (size[0] == '-') {
        relative = -1;
        size++;
    }
    /* qemu parses the whole 64-bit range here and finds sizes of 2^63
     * and more negative only after opening the image. */
    r = vd_parse_size_u64(size, &n);
    if (r == -ERANGE) {
        cli_error("Value '%s' is out of range for parameter 'size'", size);
        return 1;
    } else if (r < 0) {
        cli_error("Parameter 'size' expects a non-negative number below 2^64");
        fprintf(stderr, "Optional suffix k, M, G, T, P or E means kilo-, "
                "mega-, giga-, tera-, peta-\nand exabytes, respectively.\n");
        return 1;
    }

    /* A dry run opens read-only: no lock upgrade, no dirty bit. */
    node = cli_open_image(filename, co.fmt, co.image_opts,
                          dry ? 0 : VD_O_RDWR | VD_O_RESIZE, NULL);
    if (!node) {
        return 1;
    }
    current = vd_getlength(node);
    if (current < 0) {
        cli_error("Failed to inquire current image length: %s",
                  strerror((int)-current));
        goto out;
    }
    if (relative) {
        /* Unsigned wrap-around, as qemu's int64 arithmetic gives in
         * practice, without signed overflow. */
        total = (int64_t)((uint64_t)current +
                          (relative > 0 ? n : (uint64_t)0 - n));
    } else {
        total = (int64_t)n;
    }
    if (total <= 0) {
        cli_error("New image size must be positive");
        goto out;
    }
    if (total <= current && prealloc != VD_PREALLOC_OFF) {
        cli_error("Preallocation can only be used for growing images");
        goto out;
    }
    if (total < current && !shrink) {
        cli_error("Use the --shrink option to perform a shrink operation.");
        cli_warn("Shrinking an image will delete all data beyond the "
                 "shrunken image's end. Before performing such an "
                 "operation, make sure there is no important data there.");
        goto out;
    }
    if (dry) {
        ret = dry_run(node, filename, current, total, shrink, prealloc,
                      co.json);
        vd_close(&node, NULL);
        return ret;
    }
    r = vd_truncate(node, (uint64_t)total, shrink, prealloc, &err);
    if (r < 0) {
        cli_report_vd_error(&err, r, filename);
        goto out;
    }
    ret = 0;
out:
    if (vd_close(&node, &err) < 0 && ret == 0) {
        cli_report_vd_error(&err, -EIO, filename);
        ret = 1;
    }
    if (ret == 0 && co.json && !co.quiet) {
        static const char *const names[] = { "off", "metadata", "falloc",
                                             "full" };
        json_object *o = json_object_new_object();

        json_object_object_add(o, "image", json_object_new_string(filename));
        json_object_object_add(o, "old-size", json_object_new_int64(current));
        json_object_object_add(o, "new-size", json_object_new_int64(total));
        json_object_object_add(o, "preallocation",
                               json_object_new_string(names[prealloc]));
        cli_print_json(o);
    } else if (ret == 0) {
        cli_qprintf(co.quiet, "Image resized.\n");
    }
    return ret;
}
