/*
 * vdisk bitmap: qemu-img bitmap. Changes the persistent dirty bitmaps of
 * an image offline: --add (with -g), --remove, --clear, --enable,
 * --disable and --merge SOURCE (from the image itself or from -b FILE
 * [-F FMT]), any number of them, run in the order given on one bitmap.
 * The image is opened read-write without its backing chain (the bitmaps
 * are the image's own); the library loads its bitmaps at open and
 * stores them at close, so the command is the same calls a program makes
 * through include/vdisk/bitmap.h. Checks, order and messages are
 * qemu-img 7.2's img_bitmap(): an action that fails stops the command
 * ("Operation add on bitmap b failed: ...") and the actions before it
 * stay done, as in qemu-img. qemu-img bitmap prints nothing;
 * --output=json (vdisk's own, docs/json.md) lists the actions done.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "vdisk/bitmap.h"
#include "commands.h"
#include "util.h"

typedef enum { ACT_ADD, ACT_REMOVE, ACT_CLEAR, ACT_ENABLE, ACT_DISABLE,
               ACT_MERGE } act_kind;

static const char *const act_names[] = {
    [ACT_ADD] = "add", [ACT_REMOVE] = "remove", [ACT_CLEAR] = "clear",
    [ACT_ENABLE] = "enable", [ACT_DISABLE] = "disable", [ACT_MERGE] = "merge",
};

typedef struct bitmap_act {
    act_kind kind;
    const char *src;     /* --merge's source bitmap */
} bitmap_act;

static int run_action(const bitmap_act *a, vd_node *node, vd_node *src,
                      const char *name, uint64_t granularity, vd_error *err)
{
    switch (a->kind) {
    case ACT_ADD:
        return vd_bitmap_add(node, name, granularity, VD_BITMAP_PERSISTENT,
                             err);
    case ACT_REMOVE:
        return vd_bitmap_remove(node, name, err);
    case ACT_CLEAR:
        return vd_bitmap_clear(node, name, err);
    case ACT_ENABLE:
        return vd_bitmap_enable(node, name, err);
    case ACT_DISABLE:
        return vd_bitmap_disable(node, name, err);
    case ACT_MERGE: {
        vd_bitmap_ref ref = { src, a->src };
        return vd_bitmap_merge(node, name, &ref, 1, err);
    }
    }
    return -EINVAL;
}

int cmd_bitmap(int argc, char **argv)
{
    cli_common co = { 0 };
    const char *src_file = NULL, *src_fmt = NULL;
    bool add = false, merge = false;
    uint64_t granularity = 0;
    bitmap_act *acts = NULL;
    size_t nacts = 0;
    vd_node *node = NULL, *src = NULL;
    vd_error err = VD_ERROR_INIT;
    int ch, ret = 1;

    while ((ch = cli_getopt_common("bitmap", argc, argv, &co)) != -1) {
        bitmap_act a = { 0, NULL };
        switch (ch) {
        case 'b':
            src_file = optarg;
            continue;
        case 'F':
            src_fmt = optarg;
            continue;
        case 'g':
            if (cli_cvtnum("granularity", optarg, &granularity) < 0) {
                goto out;
            }
            continue;
        case OPT_BITMAP_ADD:
            a.kind = ACT_ADD;
            add = true;
            break;
        case OPT_BITMAP_REMOVE:
            a.kind = ACT_REMOVE;
            break;
        case OPT_BITMAP_CLEAR:
            a.kind = ACT_CLEAR;
            break;
        case OPT_BITMAP_ENABLE:
            a.kind = ACT_ENABLE;
            break;
        case OPT_BITMAP_DISABLE:
            a.kind = ACT_DISABLE;
            break;
        case OPT_BITMAP_MERGE:
            a.kind = ACT_MERGE;
            a.src = optarg;
            merge = true;
            break;
        default:
            goto out;
        }
        bitmap_act *na = realloc(acts, (nacts + 1) * sizeof(*na));
        if (!na) {
            cli_error("out of memory");
            goto out;
        }
        acts = na;
        acts[nacts++] = a;
    }

    if (nacts == 0) {
        cli_error("Need at least one of --add, --remove, --clear, --enable, "
                  "--disable, or --merge");
        goto out;
    }
    if (granularity && !add) {
        cli_error("granularity only supported with --add");
        goto out;
    }
    if (src_fmt && !src_file) {
        cli_error("-F only supported with -b");
        goto out;
    }
    if (src_file && !merge) {
        cli_error("Merge bitmap source file only supported with --merge");
        goto out;
    }
    if (optind != argc - 2) {
        cli_error("Expecting filename and bitmap name");
        goto out;
    }

    /* The bitmaps are the image's own: no backing chain is needed. */
    node = cli_open_image(argv[optind], co.fmt, co.image_opts,
                          VD_O_RDWR | VD_O_NO_BACKING, NULL);
    if (!node) {
        goto out;
    }
    if (src_file) {
        src = cli_open_image(src_file, src_fmt, false, VD_O_NO_BACKING, NULL);
        if (!src) {
            goto out;
        }
    }
    for (size_t i = 0; i < nacts; i++) {
        vd_error_clear(&err);
        if (run_action(&acts[i], node, src ? src : node, argv[optind + 1],
                       granularity, &err) < 0) {
            cli_error("Operation %s on bitmap %s failed: %s",
                      act_names[acts[i].kind], argv[optind + 1],
                      err.message);
            goto out;
        }
    }
    ret = 0;
out:
    /* Closing stores the bitmaps; a failure there fails the command. */
    if (src) {
        vd_close(&src, NULL);
    }
    if (node) {
        vd_error_clear(&err);
        if (vd_close(&node, &err) < 0 && ret == 0) {
            cli_error("%s", err.message);
            ret = 1;
        }
    }
    if (ret == 0 && co.json) {
        json_object *o = json_object_new_object();
        json_object *list = json_object_new_array();

        json_object_object_add(o, "image", json_object_new_string(
                                   argv[optind]));
        json_object_object_add(o, "bitmap", json_object_new_string(
                                   argv[optind + 1]));
        for (size_t i = 0; i < nacts; i++) {
            json_object *a = json_object_new_object();

            json_object_object_add(a, "action", json_object_new_string(
                                       act_names[acts[i].kind]));
            if (acts[i].kind == ACT_ADD && granularity) {
                json_object_object_add(a, "granularity",
                                       json_object_new_int64(
                                           (int64_t)granularity));
            }
            if (acts[i].kind == ACT_MERGE) {
                json_object_object_add(a, "source", json_object_new_string(
                                           acts[i].src));
                json_object_object_add(a, "source-file", src_file
                                       ? json_object_new_string(src_file)
                                       : NULL);
            }
            json_object_array_add(list, a);
        }
        json_object_object_add(o, "actions", list);
        cli_print_json(o);
    }
    free(acts);
    return ret;
}
