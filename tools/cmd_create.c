/*
 * vdisk create: qemu-img create. The work is vd_create(); this file
 * validates the -o options against the format's option list (so unknown
 * keys and malformed numbers fail before anything is printed, as in
 * qemu), opens the backing file to check it and take its size, prints
 * the "Formatting ..." line and implements "-o help".
 *
 * The Formatting line lists options in the order of QEMU's merged option
 * list for the format (the format's own options, then its protocol's),
 * which is the library's order, showing set values and the defaults QEMU
 * declares (vd_create_option.def); -o help lists them by name.
 * --output=json (vdisk's own, docs/json.md) prints the same options as
 * one object once the image exists, instead of the Formatting line.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "commands.h"
#include "util.h"

static const vd_create_option *find_opt(const vd_create_option *list,
                                        const char *name)
{
    for (; list && list->name; list++) {
        if (strcmp(list->name, name) == 0) {
            return list;
        }
    }
    return NULL;
}

/* True when "-o" text asks for help ("help" or "?" as one element). */
bool cli_has_help_option(const char *str)
{
    const char *p = str;

    while (*p) {
        const char *start = p;
        size_t len;

        while (*p && !(*p == ',' && p[1] != ',')) {
            p += (*p == ',') ? 2 : 1;
        }
        len = (size_t)(p - start);
        if ((len == 4 && strncmp(start, "help", 4) == 0) ||
            (len == 1 && *start == '?')) {
            return true;
        }
        if (*p == ',') {
            p++;
        }
    }
    return false;
}

static const char *type_label(const char *type)
{
    if (strcmp(type, "bool") == 0) {
        return "bool (on/off)";
    } else if (strcmp(type, "number") == 0) {
        return "num";
    } else if (strcmp(type, "string") == 0) {
        return "str";
    }
    return type;
}

static int cmp_opt_name(const void *a, const void *b)
{
    const vd_create_option *const *x = a, *const *y = b;

    return strcmp((*x)->name, (*y)->name);
}

/* Prints the -o help listing; @filename NULL lists the format's own
 * options only. */
int cli_print_create_help(const char *filename, const char *fmt)
{
    const vd_create_option *list = vd_create_options(fmt);
    const vd_create_option *proto = vd_create_options("file");
    const vd_create_option **sorted;
    vd_error err = VD_ERROR_INIT;
    size_t n = 0, count = 0;

    if (!list) {
        if (!cli_report_unsupported_format(filename, fmt)) {
            cli_error("Unknown file format '%s'", fmt);
        }
        return 1;
    }
    /* With a filename, its protocol's options (rbd's cluster_size, none of
     * the file protocol's), or qemu-img's refusal of the protocol. */
    if (filename) {
        list = vd_create_options_for(fmt, filename, &err);
        if (!list) {
            cli_error("%s", err.message);
            return 1;
        }
    }
    while (list[count].name) {
        count++;
    }
    sorted = calloc(count + 1, sizeof(*sorted));
    if (!sorted) {
        return 1;
    }
    for (size_t i = 0; i < count; i++) {
        const vd_create_option *p = find_opt(proto, list[i].name);
        bool from_proto = p && strcmp(list[i].name, "size") != 0 &&
                          strcmp(p->help ? p->help : "",
                                 list[i].help ? list[i].help : "") == 0;

        /* Without a filename qemu cannot know the protocol yet. */
        if (filename || !from_proto ||
            (vd_driver_features(fmt) & VD_DRIVER_PROTOCOL)) {
            sorted[n++] = &list[i];
        }
    }
    qsort(sorted, n, sizeof(*sorted), cmp_opt_name);

    if (filename) {
        printf("Supported options:\n");
    } else {
        printf("Supported %s options:\n", fmt);
    }
    for (size_t i = 0; i < n; i++) {
        char label[256];

        snprintf(label, sizeof(label), "%s=<%s>", sorted[i]->name,
                 type_label(sorted[i]->type));
        if (sorted[i]->help) {
            printf("  %-22s - %s\n", label, sorted[i]->help);
        } else {
            printf("  %s\n", label);
        }
    }
    if (!filename) {
        printf("\nThe protocol level may support further options.\n"
               "Specify the target filename to include those options.\n");
    }
    free(sorted);
    return 0;
}

/* Checks one -o value against its declared type, with qemu's messages
 * (prefixed by the image name). */
static int check_value(const char *filename, const vd_create_option *o,
                       const char *value)
{
    if (strcmp(o->type, "size") == 0) {
        uint64_t v;
        int r = vd_parse_size(value, &v);

        /* qemu's parser takes up to 2^64 - 1 and says this past that;
         * vdisk's stops at 2^63, the largest image length. */
        if (r == -ERANGE) {
            cli_error("%s: Value '%s' is out of range for parameter '%s'",
                      filename, value, o->name);
            return -EINVAL;
        } else if (r < 0) {
            cli_error("%s: Parameter '%s' expects a non-negative number "
                      "below 2^64", filename, o->name);
            fprintf(stderr, "Optional suffix k, M, G, T, P or E means kilo-, "
                    "mega-, giga-, tera-, peta-\nand exabytes, respectively.\n");
            return -EINVAL;
        }
    } else if (strcmp(o->type, "number") == 0) {
        char *end;

        errno = 0;
        (void)strtoull(value, &end, 0);
        if (!*value || *end || errno || value[0] == '-') {
            cli_error("%s: Parameter '%s' expects a number", filename,
                      o->name);
            return -EINVAL;
        }
    } else if (strcmp(o->type, "bool") == 0) {
        if (strcmp(value, "on") && strcmp(value, "off") &&
            strcmp(value, "true") && strcmp(value, "false") &&
            strcmp(value, "yes") && strcmp(value, "no")) {
            cli_error("%s: Parameter '%s' expects 'on' or 'off'", filename,
                      o->name);
            return -EINVAL;
        }
    }
    return 0;
}

static void print_escaped(const char *s)
{
    for (; *s; s++) {
        if (*s == ',') {
            putchar(',');
        }
        putchar(*s);
    }
}

static void print_one(const char *sep, const vd_create_option *o,
                      const char *value, bool is_set)
{
    printf("%s%s=", sep, o->name);
    if (strcmp(o->type, "string") == 0) {
        print_escaped(value);
    } else if (strcmp(o->type, "size") == 0 ||
               strcmp(o->type, "number") == 0) {
        uint64_t v;

        if (strcmp(o->type, "size") == 0 ? vd_parse_size(value, &v) == 0
                                         : (v = strtoull(value, NULL, 0), 1)) {
            printf("%" PRIu64, v);
        } else {
            printf("%s", value);
        }
    } else {
        printf("%s", value);
    }
    (void)is_set;
}

/* The "Formatting 'x', fmt=..." line: the options in the library's
 * order (QEMU's merged list: the format's own, then its protocol's),
 * each given one or, if it has one, its QEMU default. */
static void print_formatting(const char *filename, const char *fmt,
                             const vd_create_option *list, const vd_opts *opts)
{
    const char *sep = "";

    printf("Formatting '%s', fmt=%s ", filename, fmt);
    for (const vd_create_option *o = list; o->name; o++) {
        const char *value = vd_opts_get(opts, o->name);

        if (!value) {
            value = o->def;
        }
        if (value) {
            print_one(sep, o, value, true);
            sep = " ";
        }
    }
    printf("\n");
    fflush(stdout);
}

/* The Formatting line's options as JSON: sizes and numbers as integers,
 * booleans as booleans, the rest as strings. */
static json_object *formatting_json(const char *filename, const char *fmt,
                                    const vd_create_option *list,
                                    const vd_opts *opts)
{
    json_object *o = json_object_new_object();
    json_object *set = json_object_new_object();

    json_object_object_add(o, "filename", json_object_new_string(filename));
    json_object_object_add(o, "format", json_object_new_string(fmt));
    for (const vd_create_option *c = list; c->name; c++) {
        const char *value = vd_opts_get(opts, c->name);
        json_object *v;
        uint64_t n;

        if (!value) {
            value = c->def;
        }
        if (!value) {
            continue;
        }
        if (strcmp(c->type, "size") == 0 && vd_parse_size(value, &n) == 0) {
            v = json_object_new_int64((int64_t)n);
        } else if (strcmp(c->type, "number") == 0) {
            v = json_object_new_int64((int64_t)strtoull(value, NULL, 0));
        } else if (strcmp(c->type, "bool") == 0) {
            v = json_object_new_boolean(!strcmp(value, "on") ||
                                        !strcmp(value, "true") ||
                                        !strcmp(value, "yes"));
        } else {
            v = json_object_new_string(value);
        }
        json_object_object_add(set, c->name, v);
    }
    json_object_object_add(o, "options", set);
    return o;
}

/* The backing file's name as seen from the new image's directory. */
static char *full_backing_name(const char *filename, const char *backing)
{
    const char *slash = strrchr(filename, '/');
    char *out;

    if (backing[0] == '/' || !slash || strstr(backing, "://")) {
        return strdup(backing);
    }
    if (asprintf(&out, "%.*s/%s", (int)(slash - filename), filename,
                 backing) < 0) {
        return NULL;
    }
    return out;
}

int cmd_create(int argc, char **argv)
{
    cli_common co = { .fmt = "raw" };
    const char *base = NULL, *base_fmt = NULL;
    char *options = NULL;
    bool unsafe = false;
    const char *filename;
    uint64_t img_size = UINT64_MAX;
    const vd_create_option *list;
    vd_opts *opts = NULL;
    vd_error err = VD_ERROR_INIT;
    int ch, ret = 1;

    while ((ch = cli_getopt_common("create", argc, argv, &co)) != -1) {
        switch (ch) {
        case 'F':
            base_fmt = optarg;
            break;
        case 'b':
            base = optarg;
            break;
        case 'o': {
            char *joined;

            if (options) {
                if (asprintf(&joined, "%s,%s", options, optarg) < 0) {
                    return 1;
                }
                free(options);
                options = joined;
            } else {
                options = strdup(optarg);
            }
            break;
        }
        case 'u':
            unsafe = true;
            break;
        default:
            goto out;
        }
    }

    if (options && cli_has_help_option(options)) {
        ret = cli_print_create_help(optind < argc ? argv[optind] : NULL,
                                    co.fmt);
        goto out;
    }
    if (optind >= argc) {
        cli_error_hint("Expecting image file name");
        goto out;
    }
    filename = argv[optind++];
    if (optind < argc) {
        if (cli_cvtnum("image size", argv[optind++], &img_size) < 0) {
            goto out;
        }
    }
    if (optind != argc) {
        cli_error_hint("Unexpected argument: %s", argv[optind]);
        goto out;
    }

    if (!vd_create_options(co.fmt)) {
        if (!cli_report_unsupported_format(filename, co.fmt)) {
            cli_error("%s: Unknown file format '%s'", filename, co.fmt);
        }
        goto out;
    }
    /* The protocol is checked before anything is formatted, as qemu-img
     * does: "Unknown protocol 'P'", "Protocol driver 'http' does not
     * support image creation". */
    list = vd_create_options_for(co.fmt, filename, &err);
    if (!list) {
        cli_error("%s: %s", filename, err.message);
        goto out;
    }
    opts = vd_opts_new();
    if (!opts) {
        goto out;
    }
    if (options && vd_opts_parse(opts, options, NULL, &err) < 0) {
        cli_error("%s: %s", filename, err.message);
        goto out;
    }
    for (size_t i = 0; i < vd_opts_count(opts); i++) {
        const char *key, *value;
        const vd_create_option *o;

        vd_opts_nth(opts, i, &key, &value);
        o = find_opt(list, key);
        if (!o) {
            cli_error("%s: Invalid parameter '%s'", filename, key);
            goto out;
        }
        if (check_value(filename, o, value) < 0) {
            goto out;
        }
    }

    if (!vd_opts_get(opts, "size")) {
        if (img_size != UINT64_MAX) {
            char buf[32];

            snprintf(buf, sizeof(buf), "%" PRIu64, img_size);
            vd_opts_set(opts, "size", buf);
        }
    } else if (img_size != UINT64_MAX) {
        cli_error("%s: The image size must be specified only once", filename);
        goto out;
    }
    if (base) {
        if (!find_opt(list, "backing_file")) {
            cli_error("%s: Backing file not supported for file format '%s'",
                      filename, co.fmt);
            goto out;
        }
        vd_opts_set(opts, "backing_file", base);
    }
    if (base_fmt) {
        if (!find_opt(list, "backing_fmt")) {
            cli_error("%s: Backing file format not supported for file "
                      "format '%s'", filename, co.fmt);
            goto out;
        }
        vd_opts_set(opts, "backing_fmt", base_fmt);
    }

    base = vd_opts_get(opts, "backing_file");
    base_fmt = vd_opts_get(opts, "backing_fmt");
    if (base) {
        if (strcmp(base, filename) == 0) {
            cli_error("%s: Error: Trying to create an image with the same "
                      "filename as the backing file", filename);
            goto out;
        }
        if (!base[0]) {
            cli_error("%s: Expected backing file name, got empty string",
                      filename);
            goto out;
        }
    }
    if (base && !unsafe) {
        char *full = full_backing_name(filename, base);
        vd_node *bs = NULL;
        int r;

        r = vd_open(&bs, full, base_fmt, NULL,
                    VD_O_NO_IO | VD_O_FORCE_SHARE | VD_O_QUIET, &err);
        free(full);
        if (r < 0) {
            cli_error("%s: %s", filename, err.message[0] ? err.message
                                                         : strerror(-r));
            fprintf(stderr, "Could not open backing image.\n");
            goto out;
        }
        if (!base_fmt) {
            cli_error("%s: Backing file specified without backing format",
                      filename);
            fprintf(stderr, "Detected format of %s.", vd_node_format(bs));
            vd_close(&bs, NULL);
            goto out;
        }
        if (!vd_opts_get(opts, "size")) {
            char buf[32];

            snprintf(buf, sizeof(buf), "%" PRId64, vd_getlength(bs));
            vd_opts_set(opts, "size", buf);
        }
        vd_close(&bs, NULL);
    } else if (base && !base_fmt) {
        cli_error("%s: Backing file specified without backing format",
                  filename);
        goto out;
    }
    if (!vd_opts_get(opts, "size")) {
        cli_error("%s: Image creation needs a size parameter", filename);
        goto out;
    }

    if (!co.quiet && !co.json) {
        print_formatting(filename, co.fmt, list, opts);
    }
    vd_error_clear(&err);
    ret = vd_create(filename, co.fmt, opts, &err);
    if (ret < 0) {
        const char *msg = err.message[0] ? err.message : strerror(-ret);

        if (ret == -EFBIG) {
            /* qemu-img's bdrv_img_create() words every EFBIG this way. */
            cli_error("%s: The image size is too large for file format "
                      "'%s'%s", filename, co.fmt,
                      find_opt(list, "cluster_size")
                      ? " (try using a larger cluster size)" : "");
        } else {
            cli_error("%s: %s", filename, cli_strip_filename(msg, filename));
            cli_print_hint(&err);
        }
        ret = 1;
        goto out;
    }
    if (co.json && !co.quiet) {
        cli_print_json(formatting_json(filename, co.fmt, list, opts));
    }
    ret = 0;
out:
    vd_opts_free(&opts);
    free(options);
    return ret;
}
