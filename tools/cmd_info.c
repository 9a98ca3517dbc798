/*
 * vdisk info: qemu-img info. Each image of the chain is opened on its own
 * without its backing file (as qemu-img does, so a missing base does not
 * hide the overlay's information), described with vd_get_info() and
 * turned into qemu's ImageInfo, either as JSON (the library's
 * vd_image_info_to_json(), printed in qemu's order by json_out.c) or as
 * qemu's human text.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "commands.h"
#include "json_out.h"
#include "util.h"

#define MAX_CHAIN 1024

/* qemu's ImageInfo as a json-c object, from the library's formatter
 * (members in QAPI order, which json_qemu_print() relies on); NULL when
 * out of memory. */
static json_object *info_to_json(const vd_image_info *info)
{
    char *text = vd_image_info_to_json(info);
    json_object *o = text ? json_tokener_parse(text) : NULL;

    free(text);
    return o;
}

static void dump_snapshot_human(const vd_snapshot_info *sn)
{
    char size[64], date[64] = "", clock[64], icount[32] = "";
    time_t t = sn->date_sec;
    struct tm tm;
    uint64_t secs = sn->vm_clock_nsec / 1000000000;

    if (localtime_r(&t, &tm)) {
        strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
    }
    snprintf(clock, sizeof(clock), "%02d:%02d:%02d.%03d", (int)(secs / 3600),
             (int)((secs / 60) % 60), (int)(secs % 60),
             (int)((sn->vm_clock_nsec / 1000000) % 1000));
    cli_size_to_str(size, sizeof(size), sn->vm_state_size);
    if (sn->icount != UINT64_MAX) {
        snprintf(icount, sizeof(icount), "%" PRId64, (int64_t)sn->icount);
    }
    printf("%-9s %-16s %8s%20s%13s%11s\n", sn->id, sn->name, size, date, clock,
           icount);
}

/* qemu's bdrv_image_info_dump(). */
static void dump_human(const vd_image_info *info)
{
    char buf[64];

    cli_size_to_str(buf, sizeof(buf), info->virtual_size);
    printf("image: %s\nfile format: %s\nvirtual size: %s (%" PRIu64
           " bytes)\n", info->filename, info->format, buf, info->virtual_size);
    if (info->actual_size >= 0) {
        cli_size_to_str(buf, sizeof(buf), (uint64_t)info->actual_size);
        printf("disk size: %s\n", buf);
    } else {
        printf("disk size: unavailable\n");
    }
    if (info->encrypted) {
        printf("encrypted: yes\n");
    }
    if (info->cluster_size) {
        printf("cluster_size: %" PRIu64 "\n", info->cluster_size);
    }
    if (info->has_dirty_flag && info->dirty_flag) {
        printf("cleanly shut down: no\n");
    }
    if (info->backing_filename) {
        printf("backing file: %s", info->backing_filename);
        if (!info->full_backing_filename) {
            printf(" (cannot determine actual path)");
        } else if (strcmp(info->backing_filename,
                          info->full_backing_filename) != 0) {
            printf(" (actual path: %s)", info->full_backing_filename);
        }
        printf("\n");
        if (info->backing_filename_format) {
            printf("backing file format: %s\n", info->backing_filename_format);
        }
    }
    if (info->nb_snapshots) {
        printf("Snapshot list:\n");
        printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE",
               "VM CLOCK", "ICOUNT");
        for (size_t i = 0; i < info->nb_snapshots; i++) {
            dump_snapshot_human(&info->snapshots[i]);
        }
    }
    if (info->format_specific_json) {
        json_object *fs = json_tokener_parse(info->format_specific_json);
        json_object *data;

        if (fs && json_object_object_get_ex(fs, "data", &data)) {
            printf("Format specific information:\n");
            json_qemu_dump_human(stdout, data, 1);
        }
        json_object_put(fs);
    }
}

/* qemu's path_combine(): @name relative to the directory of @base. */
static char *path_combine(const char *base, const char *name)
{
    const char *slash = strrchr(base, '/');
    char *out;

    if (name[0] == '/' || !slash || strstr(name, "://")) {
        return strdup(name);
    }
    if (asprintf(&out, "%.*s%s", (int)(slash - base + 1), base, name) < 0) {
        return NULL;
    }
    return out;
}

/*
 * Fills what vd_get_info() leaves out when the image is opened without
 * its backing chain, as qemu-img info does: the resolved backing name and
 * the snapshot list.
 */
static void complete_info(vd_node *node, vd_image_info *info)
{
    if (info->backing_filename && info->backing_filename[0] &&
        !info->full_backing_filename) {
        info->full_backing_filename = path_combine(info->filename,
                                                   info->backing_filename);
    }
    if (!info->nb_snapshots) {
        vd_snapshot_info *list = NULL;
        size_t count = 0;

        if (vd_snapshot_list(node, &list, &count, NULL) == 0 && count) {
            vd_snapshot_list_free(&info->snapshots, info->nb_snapshots);
            info->snapshots = list;
            info->nb_snapshots = count;
        } else if (list) {
            vd_snapshot_list_free(&list, count);
        }
    }
}

/* Describes one image; NULL after printing the error. */
static vd_image_info *collect_one(const char *filename, const char *fmt,
                                  bool image_opts, unsigned flags)
{
    vd_error err = VD_ERROR_INIT;
    vd_image_info *info = NULL;
    vd_node *node = cli_open_image(filename, fmt, image_opts, flags, NULL);

    if (!node) {
        return NULL;
    }
    if (vd_get_info(node, &info, &err) < 0) {
        cli_report_vd_error(&err, -EIO, filename);
        info = NULL;
    } else {
        complete_info(node, info);
    }
    vd_close(&node, NULL);
    return info;
}

int cmd_info(int argc, char **argv)
{
    cli_common co = { .flags = VD_O_NO_BACKING | VD_O_NO_IO };
    const char *filename;
    bool chain = false;
    vd_image_info *infos[MAX_CHAIN];
    size_t n = 0;
    int ch, ret = 1;

    while ((ch = cli_getopt_common("info", argc, argv, &co)) != -1) {
        switch (ch) {
        case OPT_BACKING_CHAIN:
            chain = true;
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

    while (filename) {
        vd_image_info *info;

        for (size_t i = 0; i < n; i++) {
            if (strcmp(infos[i]->filename, filename) == 0) {
                cli_error("Backing file '%s' creates an infinite loop.",
                          filename);
                goto out;
            }
        }
        if (n == MAX_CHAIN) {
            cli_error("Backing chain of '%s' is too long", argv[optind]);
            goto out;
        }
        /* Only the top image is an option string; its backing files
         * are named by it. */
        info = collect_one(filename, co.fmt, co.image_opts && n == 0,
                           co.flags);
        if (!info) {
            goto out;
        }
        infos[n++] = info;
        if (!chain) {
            break;
        }
        filename = info->full_backing_filename;
        co.fmt = info->backing_filename_format;
        if (!filename && info->backing_filename) {
            cli_error("Could not determine absolute backing filename, but "
                      "backing filename '%s' present", info->backing_filename);
            goto out;
        }
    }

    if (co.json) {
        json_object *top;

        if (chain) {
            top = json_object_new_array();
            for (size_t i = 0; top && i < n; i++) {
                json_object *o = info_to_json(infos[i]);
                if (!o || json_object_array_add(top, o) < 0) {
                    json_object_put(o);
                    json_object_put(top);
                    top = NULL;
                }
            }
        } else {
            top = info_to_json(infos[0]);
        }
        if (!top) {
            cli_error("Out of memory");
            goto out;
        }
        json_qemu_print(stdout, top);
        json_object_put(top);
    } else {
        for (size_t i = 0; i < n; i++) {
            if (i) {
                printf("\n");
            }
            dump_human(infos[i]);
        }
    }
    ret = 0;
out:
    for (size_t i = 0; i < n; i++) {
        vd_image_info_free(&infos[i]);
    }
    return ret;
}
