/*
 * vdisk snapshot: qemu-img snapshot (-l list, -a apply, -c create, -d
 * delete) with qemu-img 7.2's messages and exit codes, plus a group mode
 * that runs one operation on several images at once through the
 * library's vd_snapshot_all_* calls (the disks of one VM):
 *
 *   vdisk snapshot --group -c NAME [--vmstate IMG] [--vmstate-data FILE]
 *                  IMG1 IMG2 ...
 *
 * --vmstate names the image that holds the VM state (default: the first
 * that can); --vmstate-data stores FILE's bytes as the VM state on -c and
 * writes the snapshot's VM state back to FILE on -a.
 *
 * --output=json (vdisk's own, docs/json.md): -l prints the list as the
 * "snapshots" member of qemu-img info --output=json (QAPI SnapshotInfo,
 * printed the same way); -a, -c and -d print what they did.
 * --dry-run with -d or -a opens the image read-only and prints what
 * vd_snapshot_delete_plan() / vd_snapshot_goto_plan() compute from
 * metadata: the bytes deleting would free, the bytes of the active layer
 * applying would discard (docs/snapshots.md, "Dry runs").
 *
 * The single-image path first, then the group path, then the entry point
 * that parses the options shared by both.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <json-c/json.h>

#include "commands.h"
#include "json_out.h"
#include "dry_run.h"
#include "util.h"

enum { ACT_NONE, ACT_LIST, ACT_APPLY, ACT_CREATE, ACT_DELETE };

/* qemu's QEMUSnapshotInfo keeps 255 bytes of a new snapshot's name. */
#define QEMU_NAME_MAX 255
/* Largest VM state the tool moves through memory in one piece. */
#define VMSTATE_MAX (1ull << 30)

/* qemu's bdrv_snapshot_dump() for one row. */
static void dump_row(const vd_snapshot_info *sn)
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
    printf("%-9s %-16s %8s%20s%13s%11s\n", sn->id, sn->name, size, date,
           clock, icount);
}

/* The list as qemu-img info's "snapshots": QAPI SnapshotInfo. */
static void list_json(const vd_snapshot_info *list, size_t n)
{
    json_object *a = json_object_new_array();

    for (size_t i = 0; i < n; i++) {
        const vd_snapshot_info *sn = &list[i];
        json_object *o = json_object_new_object();

        json_object_object_add(o, "id", json_object_new_string(sn->id));
        json_object_object_add(o, "name", json_object_new_string(sn->name));
        json_object_object_add(o, "vm-state-size", json_object_new_int64(
                                   (int64_t)sn->vm_state_size));
        json_object_object_add(o, "date-sec",
                               json_object_new_int64(sn->date_sec));
        json_object_object_add(o, "date-nsec",
                               json_object_new_int64(sn->date_nsec));
        json_object_object_add(o, "vm-clock-sec", json_object_new_int64(
                                   (int64_t)(sn->vm_clock_nsec / 1000000000)));
        json_object_object_add(o, "vm-clock-nsec", json_object_new_int64(
                                   (int64_t)(sn->vm_clock_nsec % 1000000000)));
        if (sn->icount != UINT64_MAX) {
            json_object_object_add(o, "icount", json_object_new_int64(
                                       (int64_t)sn->icount));
        }
        json_object_array_add(a, o);
    }
    json_qemu_print(stdout, a);
    json_object_put(a);
}

/* qemu-img's dump_snapshots(): nothing at all when there are none or the
 * format has no snapshots. With @json, an array (empty then). */
static void list_snapshots(vd_node *node, bool json)
{
    vd_snapshot_info *list = NULL;
    size_t n = 0;

    if (vd_snapshot_list(node, &list, &n, NULL) < 0) {
        n = 0;
    }
    if (json) {
        list_json(list, n);
        vd_snapshot_list_free(&list, n);
        return;
    }
    if (n == 0) {
        vd_snapshot_list_free(&list, n);
        return;
    }
    printf("Snapshot list:\n");
    printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE",
           "VM CLOCK", "ICOUNT");
    for (size_t i = 0; i < n; i++) {
        dump_row(&list[i]);
    }
    vd_snapshot_list_free(&list, n);
}

/* A new snapshot stamped as qemu-img does: microsecond date, no clocks. */
static void fill_new(vd_snapshot_info *sn, char *name)
{
    struct timeval tv;

    memset(sn, 0, sizeof(*sn));
    if (strlen(name) > QEMU_NAME_MAX) {
        name[QEMU_NAME_MAX] = 0;
    }
    sn->name = name;
    gettimeofday(&tv, NULL);
    sn->date_sec = (uint32_t)tv.tv_sec;
    sn->date_nsec = (uint32_t)tv.tv_usec * 1000;
}

/* qemu-img's bdrv_snapshot_find(): by name only. */
static int find_by_name(vd_node *node, const char *name, vd_snapshot_info *out)
{
    return vd_snapshot_find(node, NULL, name, out, NULL);
}

/* qemu-img's only line for a failed create is the errno one; qcow2 has
 * said before it, when it marked the image corrupt, what it found. The
 * library returns that finding as "FILE: WHAT; image marked corrupt". */
static void report_corruption(const char *msg, const char *filename)
{
    static const char suffix[] = "; image marked corrupt";
    size_t len = strlen(msg), slen = sizeof(suffix) - 1;
    size_t flen = filename ? strlen(filename) : 0;
    const char *what = msg;

    if (len < slen || strcmp(msg + len - slen, suffix) != 0) {
        return;
    }
    len -= slen;
    if (flen && len >= flen + 2 && strncmp(msg, filename, flen) == 0 &&
        strncmp(msg + flen, ": ", 2) == 0) {
        what += flen + 2;
        len -= flen + 2;
    }
    fprintf(stderr, "qcow2: Marking image as corrupt: %.*s; further "
            "corruption events will be suppressed\n", (int)len, what);
}

/* The dry run of -d (@sn found as the real delete finds it) or -a. */
static int dry_run(vd_node *node, int action, const char *name,
                   const vd_snapshot_info *sn, const char *filename,
                   bool json)
{
    vd_error err = VD_ERROR_INIT;
    vd_snapshot_plan plan;
    bool unknown = false;
    char a[64], b[64];
    int r;

    if (action == ACT_DELETE) {
        r = vd_snapshot_delete_plan(node, sn->id, sn->name, &plan, &err);
    } else {
        r = vd_snapshot_goto_plan(node, name, &plan, &err);
    }
    if (r == -ENOTSUP) {
        unknown = true;
    } else if (r < 0) {
        cli_error("Could not %s snapshot '%s': %s",
                  action == ACT_DELETE ? "delete" : "apply", name,
                  err.message[0] ? err.message : strerror(-r));
        return 1;
    }
    if (json) {
        json_object *o = dry_json_new("snapshot", filename);
        json_object_object_add(o, "action", json_object_new_string(
                                   action == ACT_DELETE ? "delete"
                                                        : "apply"));
        json_object_object_add(o, "snapshot", json_object_new_string(name));
        json_object_object_add(o, "known", json_object_new_boolean(!unknown));
        if (!unknown) {
            json_object_object_add(o, "freed",
                                   json_object_new_int64((int64_t)plan.freed));
        }
        if (!unknown && action == ACT_APPLY) {
            json_object_object_add(o, "changed", json_object_new_int64(
                                       (int64_t)plan.changed));
            json_object_object_add(o, "old-size", json_object_new_int64(
                                       (int64_t)plan.old_size));
            json_object_object_add(o, "new-size", json_object_new_int64(
                                       (int64_t)plan.new_size));
        }
        dry_json_print(o);
        return 0;
    }
    printf("Dry run: nothing was written.\n");
    if (unknown) {
        printf("What %s snapshot '%s' would change is unknown for format "
               "'%s': %s\n", action == ACT_DELETE ? "deleting" : "applying",
               name, vd_node_format(node), err.message);
        return 0;
    }
    if (action == ACT_DELETE) {
        printf("Deleting snapshot '%s' would free %s\n", name,
               dry_size(a, sizeof(a), plan.freed));
        return 0;
    }
    printf("Applying snapshot '%s' would discard or change %s of the "
           "active layer\n", name, dry_size(a, sizeof(a), plan.changed));
    printf("It would free %s\n", dry_size(a, sizeof(a), plan.freed));
    if (plan.old_size != plan.new_size) {
        cli_size_to_str(a, sizeof(a), plan.old_size);
        cli_size_to_str(b, sizeof(b), plan.new_size);
        printf("Size: %s -> %s\n", a, b);
    }
    return 0;
}

static int single(int action, char *name, const char *filename,
                  const char *fmt, bool image_opts, bool force_share,
                  bool dry, bool json)
{
    /* A dry run opens read-only: no lock upgrade, no dirty bit. */
    unsigned flags = action == ACT_LIST || dry ? 0 : VD_O_RDWR;
    vd_error err = VD_ERROR_INIT;
    vd_snapshot_info sn;
    vd_node *node;
    int ret = 0, r;

    if (force_share) {
        if (action != ACT_LIST) {
            cli_error("Could not open '%s': force-share=on can only be used "
                      "with read-only images", filename);
            return 1;
        }
        flags |= VD_O_FORCE_SHARE;
    }
    node = cli_open_image(filename, fmt, image_opts, flags, NULL);
    if (!node) {
        return 1;
    }
    switch (action) {
    case ACT_LIST:
        list_snapshots(node, json);
        break;
    case ACT_CREATE:
        fill_new(&sn, name);
        r = vd_snapshot_create(node, &sn, &err);
        if (r < 0) {
            report_corruption(err.message, vd_node_filename(node));
            cli_error("Could not create snapshot '%s': %d (%s)", name, r,
                      strerror(-r));
            /* qemu-img's lines first, so scripts matching them still do;
             * then ours, which names the file and what is wrong with it. */
            if (err.message[0]) {
                cli_error("%s", err.message);
            }
            ret = 1;
        }
        break;
    case ACT_APPLY:
        if (dry) {
            ret = dry_run(node, action, name, NULL, filename, json);
            break;
        }
        r = vd_snapshot_goto(node, name, &err);
        if (r < 0) {
            cli_error("Could not apply snapshot '%s': %s", name,
                      err.message[0] ? err.message : strerror(-r));
            ret = 1;
        }
        break;
    case ACT_DELETE:
        r = find_by_name(node, name, &sn);
        if (r <= 0) {
            cli_error("Could not delete snapshot '%s': snapshot not found",
                      name);
            ret = 1;
            break;
        }
        if (dry) {
            ret = dry_run(node, action, name, &sn, filename, json);
            vd_snapshot_info_clear(&sn);
            break;
        }
        r = vd_snapshot_delete(node, sn.id, sn.name, &err);
        vd_snapshot_info_clear(&sn);
        if (r < 0) {
            cli_error("Could not delete snapshot '%s': %s", name,
                      err.message[0] ? err.message : strerror(-r));
            ret = 1;
        }
        break;
    }
    vd_error_clear(&err);
    if (vd_close(&node, &err) < 0 && ret == 0) {
        cli_report_vd_error(&err, -EIO, filename);
        ret = 1;
    }
    if (ret == 0 && json && action != ACT_LIST && !dry) {
        static const char *const names[] = { "", "list", "apply", "create",
                                             "delete" };
        json_object *o = json_object_new_object();

        json_object_object_add(o, "image", json_object_new_string(filename));
        json_object_object_add(o, "action",
                               json_object_new_string(names[action]));
        json_object_object_add(o, "snapshot", json_object_new_string(name));
        cli_print_json(o);
    }
    return ret;
}

/* ---- group mode ---- */

static int read_file(const char *path, uint8_t **buf, uint64_t *len)
{
    FILE *f = fopen(path, "rb");
    long n;

    if (!f) {
        cli_error("Could not open '%s': %s", path, strerror(errno));
        return -1;
    }
    if (fseek(f, 0, SEEK_END) < 0 || (n = ftell(f)) < 0 ||
        (uint64_t)n > VMSTATE_MAX || fseek(f, 0, SEEK_SET) < 0) {
        cli_error("'%s': cannot read it as VM state (at most 1 GiB)", path);
        fclose(f);
        return -1;
    }
    *buf = malloc(n ? (size_t)n : 1);
    if (!*buf || fread(*buf, 1, (size_t)n, f) != (size_t)n) {
        cli_error("'%s': read error", path);
        free(*buf);
        *buf = NULL;
        fclose(f);
        return -1;
    }
    fclose(f);
    *len = (uint64_t)n;
    return 0;
}

static int write_file(const char *path, const uint8_t *buf, uint64_t len)
{
    FILE *f = fopen(path, "wb");

    if (!f || fwrite(buf, 1, len, f) != len || fclose(f) != 0) {
        cli_error("Could not write '%s': %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

static int group(int action, char *name, char **files, int nfiles,
                 const char *fmt, bool image_opts, const char *vmstate_file,
                 const char *vmstate_data)
{
    vd_node **nodes = calloc((size_t)nfiles, sizeof(*nodes));
    const char **devs = calloc((size_t)nfiles + 1, sizeof(*devs));
    const char *vm_name = NULL;
    vd_error err = VD_ERROR_INIT;
    vd_node *vm_node = NULL;
    uint8_t *data = NULL;
    uint64_t data_len = 0;
    int ret = 1, r;

    if (!nodes || !devs) {
        cli_error("Out of memory");
        goto out;
    }
    for (int i = 0; i < nfiles; i++) {
        nodes[i] = cli_open_image(files[i], fmt, image_opts, VD_O_RDWR,
                                  NULL);
        if (!nodes[i]) {
            goto out;
        }
        devs[i] = vd_node_name(nodes[i]);
        if (vmstate_file && strcmp(vmstate_file, files[i]) == 0) {
            vm_name = devs[i];
        }
    }
    if (vmstate_file && !vm_name) {
        cli_error("vmstate image '%s' is not one of the images", vmstate_file);
        goto out;
    }

    switch (action) {
    case ACT_CREATE: {
        vd_snapshot_info sn;
        r = vd_snapshot_all_can(devs, &err);
        if (r == 0) {
            r = vd_snapshot_all_find_vmstate(devs, vm_name, &vm_node, &err);
        }
        if (r == 0 && vmstate_data) {
            r = read_file(vmstate_data, &data, &data_len) < 0 ? -EIO : 0;
            if (r == 0) {
                r = vd_save_vmstate(vm_node, data, data_len, 0, &err);
            }
        }
        if (r == 0) {
            fill_new(&sn, name);
            r = vd_snapshot_all_create(devs, &sn, vm_node, data_len, &err);
        }
        break;
    }
    case ACT_APPLY:
        r = vd_snapshot_all_has(devs, name, &err);
        if (r == 0) {
            r = err.code = -ENOENT;
            snprintf(err.message, sizeof(err.message), "Snapshot '%s' does "
                     "not exist on every image", name);
        }
        if (r > 0) {
            r = vd_snapshot_all_goto(devs, name, &err);
        }
        if (r == 0 && vmstate_data) {
            vd_snapshot_info sn = { 0 };
            r = vd_snapshot_all_find_vmstate(devs, vm_name, &vm_node, &err);
            if (r == 0 && vd_snapshot_find(vm_node, NULL, name, &sn, &err) > 0
                && sn.vm_state_size <= VMSTATE_MAX) {
                data_len = sn.vm_state_size;
                data = malloc(data_len ? data_len : 1);
                r = data ? vd_load_vmstate(vm_node, data, data_len, 0, &err)
                         : -ENOMEM;
                if (r == 0 && write_file(vmstate_data, data, data_len) < 0) {
                    r = -EIO;
                }
            }
            vd_snapshot_info_clear(&sn);
        }
        break;
    case ACT_DELETE:
        r = vd_snapshot_all_delete(devs, name, &err);
        break;
    default:
        cli_error_hint("--group needs one of -c, -a or -d");
        goto out;
    }
    if (r < 0) {
        if (err.message[0]) {
            cli_error("%s", err.message);
        } else if (r != -EIO) {
            cli_error("%s", strerror(-r));
        }
        goto out;
    }
    ret = 0;
out:
    for (int i = 0; nodes && i < nfiles; i++) {
        vd_error_clear(&err);
        if (nodes[i] && vd_close(&nodes[i], &err) < 0 && ret == 0) {
            cli_report_vd_error(&err, -EIO, files[i]);
            ret = 1;
        }
    }
    free(nodes);
    free(devs);
    free(data);
    return ret;
}

int cmd_snapshot(int argc, char **argv)
{
    cli_common co = { 0 };
    const char *vmstate_file = NULL, *vmstate_data = NULL;
    bool is_group = false, dry = false;
    char *name = NULL;
    int action = ACT_NONE, ch;

    while ((ch = cli_getopt_common("snapshot", argc, argv, &co)) != -1) {
        int act = ACT_NONE;
        switch (ch) {
        case 'l':
            act = ACT_LIST;
            break;
        case 'a':
            act = ACT_APPLY;
            break;
        case 'c':
            act = ACT_CREATE;
            break;
        case 'd':
            act = ACT_DELETE;
            break;
        case OPT_SNAPSHOT_GROUP:
            is_group = true;
            break;
        case OPT_SNAPSHOT_VMSTATE:
            vmstate_file = optarg;
            break;
        case OPT_SNAPSHOT_VMSTATE_DATA:
            vmstate_data = optarg;
            break;
        case OPT_DRY_RUN:
            dry = true;
            break;
        default:
            return 1;
        }
        if (act != ACT_NONE) {
            if (action != ACT_NONE) {
                cli_error_hint("Cannot mix '-l', '-a', '-c', '-d'");
                return 1;
            }
            action = act;
            name = act == ACT_LIST ? NULL : optarg;
        }
    }
    if (dry && (is_group || (action != ACT_APPLY && action != ACT_DELETE))) {
        cli_error_hint("--dry-run works with -a or -d on one image");
        return 1;
    }
    if (is_group) {
        if (co.json) {
            cli_error_hint("--output=json does not apply to --group");
            return 1;
        }
        if (optind >= argc) {
            cli_error_hint("At least one device is required for snapshot");
            return 1;
        }
        return group(action, name, argv + optind, argc - optind, co.fmt,
                     co.image_opts, vmstate_file, vmstate_data);
    }
    if (vmstate_file || vmstate_data) {
        cli_error_hint("--vmstate and --vmstate-data need --group");
        return 1;
    }
    if (optind != argc - 1) {
        cli_error_hint("Expecting one image file name");
        return 1;
    }
    if (action == ACT_NONE) {
        return 0;
    }
    return single(action, name, argv[optind], co.fmt, co.image_opts,
                  co.flags & VD_O_FORCE_SHARE, dry, co.json);
}
