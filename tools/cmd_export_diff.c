/*
 * vdisk export-diff / import-diff: change sets in Ceph's RBD diff stream
 * format (include/vdisk/rbd-diff.h, docs/snapshots.md "Change sets"),
 * so that changes move between qcow2 snapshots, between two vdisk
 * images, and into and out of `rbd import-diff` / `rbd export-diff`.
 *
 *   vdisk export-diff [--from-snap A] [--snapshot B | -l B] IMAGE PATH|-
 *
 * writes what changed from snapshot A to snapshot B (or the active
 * layer), found as `vdisk diff` finds it (diff_view.h: from metadata,
 * never by reading both views): where B reads as zeros by metadata a
 * 'z' record, elsewhere the bytes are read and written as a 'w' record
 * (or a 'z' record when they are all zero, as rbd does). Without
 * --from-snap the stream holds everything allocated (what does not read
 * as zeros by metadata). The file is created exclusively and removed
 * on failure, as rbd does, and not fsynced (neither is rbd's).
 *
 *   vdisk import-diff PATH|- IMAGE
 *
 * applies a stream as rbd import-diff does: the image must have a
 * snapshot named like the stream's start snapshot and none named like
 * its end snapshot; the size record resizes the image (shrinking too, as
 * rbd does); data records are written and zeroed; the end snapshot is
 * created last. Unlike rbd, the whole stream is validated before the
 * first write (vd_rbd_diff_scan() twice: check, then apply), so a
 * malformed stream leaves the image byte-identical; a stream on stdin
 * or a pipe is first spooled to an unlinked temporary file ($TMPDIR,
 * else /tmp) for that, which costs its size in temporary space.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "commands.h"
#include "diff_view.h"
#include "util.h"
#include "vdisk/rbd-diff.h"

#define XD_BUF (1u << 20)
/* The longest zero request sent at once (well below any driver's
 * limit). */
#define XD_ZERO_MAX (1ull << 30)

/* ---- writing a stream ---- */

typedef struct xd_out {
    int fd;
    int version;
    uint64_t written;
} xd_out;

static int write_all(xd_out *o, const void *buf, size_t len)
{
    const char *p = buf;

    while (len) {
        ssize_t n = write(o->fd, p, len);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            return -errno;
        }
        p += n;
        len -= (size_t)n;
        o->written += (uint64_t)n;
    }
    return 0;
}

static void put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}

/* A tag, and in v2 the length of what follows. */
static int put_tag(xd_out *o, char tag, uint64_t payload)
{
    uint8_t b[9];

    b[0] = (uint8_t)tag;
    put_le64(b + 1, payload);
    return write_all(o, b, o->version == 2 ? 9 : 1);
}

static int put_name(xd_out *o, char tag, const char *name)
{
    uint32_t len = (uint32_t)strlen(name);
    uint8_t b[4] = { (uint8_t)len, (uint8_t)(len >> 8),
                     (uint8_t)(len >> 16), (uint8_t)(len >> 24) };
    int r = put_tag(o, tag, 4 + (uint64_t)len);

    if (r >= 0) {
        r = write_all(o, b, 4);
    }
    return r < 0 ? r : write_all(o, name, len);
}

static int put_extent(xd_out *o, bool zero, uint64_t off, uint64_t len)
{
    uint8_t b[16];
    int r = put_tag(o, zero ? 'z' : 'w', zero ? 16 : 16 + len);

    put_le64(b, off);
    put_le64(b + 8, len);
    return r < 0 ? r : write_all(o, b, 16);
}

static bool all_zero(const uint8_t *p, size_t len)
{
    return len == 0 || (p[0] == 0 && memcmp(p, p + 1, len - 1) == 0);
}

/* The name of the snapshot @node knows by @want (malloc'd): an id or a
 * name, or qemu-img's snapshot.id=ID,snapshot.name=NAME form (both
 * must match where both are given); NULL after saying it is not there
 * (a malformed form: cli_load_snapshot()'s qemu-img messages). */
static char *snapshot_name(vd_node *node, const char *image,
                           const char *want)
{
    vd_snapshot_info *list = NULL;
    vd_opts *o = NULL;
    const char *id = NULL, *nm = NULL;
    size_t count = 0;
    char *name = NULL;

    if (strncmp(want, "snapshot.", 9) == 0) {
        o = vd_opts_new();
        if (o && vd_opts_parse(o, want, NULL, NULL) == 0) {
            id = vd_opts_get(o, "snapshot.id");
            nm = vd_opts_get(o, "snapshot.name");
        }
        if (!id && !nm) {
            vd_opts_free(&o);
            if (cli_load_snapshot(node, want) == 0) {
                cli_error("%s: snapshot '%s' not found", image, want);
            }
            return NULL;
        }
    }
    if (vd_snapshot_list(node, &list, &count, NULL) < 0) {
        count = 0;
    }
    for (size_t i = 0; i < count && !name && o; i++) {
        if (list[i].name && (!id || (list[i].id && !strcmp(list[i].id, id))) &&
            (!nm || !strcmp(list[i].name, nm))) {
            name = strdup(list[i].name);
        }
    }
    for (size_t i = 0; i < count && !name && !o; i++) {
        if (list[i].name && strcmp(list[i].name, want) == 0) {
            name = strdup(want);
        }
    }
    for (size_t i = 0; i < count && !name && !o; i++) {
        if (list[i].id && list[i].name && strcmp(list[i].id, want) == 0) {
            name = strdup(list[i].name);
        }
    }
    vd_snapshot_list_free(&list, count);
    vd_opts_free(&o);
    if (!name) {
        cli_error("%s: snapshot '%s' not found", image, want);
    }
    return name;
}

/* Writes [off, off + len) of @to as records, @to reading data there. */
static int export_data(vd_node *to, xd_out *o, uint8_t *buf, uint64_t off,
                       uint64_t len, vd_error *err)
{
    while (len) {
        uint64_t n = len < XD_BUF ? len : XD_BUF;
        bool zero;
        int r = vd_pread(to, buf, n, off, 0, err);

        if (r < 0) {
            return r;
        }
        zero = all_zero(buf, n);
        r = put_extent(o, zero, off, n);
        if (r >= 0 && !zero) {
            r = write_all(o, buf, n);
        }
        if (r < 0) {
            return vd_error_set_errno(err, r, "write error");
        }
        off += n;
        len -= n;
    }
    return 0;
}

/* Walks @to (and @from, or nothing: everything allocated) and writes
 * the data records. */
static int export_walk(vd_node *from, vd_node *to, uint64_t size, xd_out *o,
                       bool progress, vd_error *err)
{
    int64_t from_size = from ? vd_getlength(from) : 0;
    uint8_t *buf = cli_io_buffer(XD_BUF);
    cli_progress prog;
    uint64_t off = 0;
    int r = 0;

    if (!buf) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    if (from_size < 0) {
        free(buf);
        return vd_error_set_errno(err, (int)from_size, "could not get the "
                                  "size of the start snapshot");
    }
    cli_progress_init(&prog, progress, 1.0);
    cli_progress_print(&prog, 0);
    while (off < size) {
        diff_view_ext vt, vf;
        uint64_t n;

        r = diff_view_status(to, size, off, size - off, &vt, err);
        if (r >= 0) {
            r = diff_view_status(from, (uint64_t)from_size, off,
                                 size - off, &vf, err);
        }
        if (r < 0) {
            break;
        }
        n = vt.length < vf.length ? vt.length : vf.length;
        if (diff_view_same(&vt, &vf)) {
            /* unchanged (without a start: zero and not worth a record) */
        } else if (vt.zero) {
            r = put_extent(o, true, off, n);
            if (r < 0) {
                r = vd_error_set_errno(err, r, "write error");
            }
        } else {
            r = export_data(to, o, buf, off, n, err);
        }
        if (r < 0) {
            break;
        }
        off += n;
        cli_progress_print(&prog, (double)off * 100 / (double)size);
    }
    cli_progress_end(&prog);
    free(buf);
    return r;
}

int cmd_export_diff(int argc, char **argv)
{
    cli_common co = { 0 };
    const char *from_arg = NULL, *snap_arg = NULL, *path;
    char *from_name = NULL, *to_name = NULL;
    bool created = false;
    vd_node *from = NULL, *to = NULL;
    vd_error err = VD_ERROR_INIT;
    xd_out o = { .fd = -1, .version = 1 };
    int64_t size;
    int ch, r, ret = 1;
    uint8_t b[8];

    while ((ch = cli_getopt_common("export-diff", argc, argv, &co)) != -1) {
        switch (ch) {
        case 'l':
        case OPT_XDIFF_SNAPSHOT:
            snap_arg = optarg;
            break;
        case OPT_XDIFF_FROM_SNAP:
            from_arg = optarg;
            break;
        case OPT_XDIFF_WHOLE_OBJECT:
            /* rbd's object granularity; vdisk's extents are exact. */
            break;
        case OPT_XDIFF_EXPORT_FORMAT:
            if (strcmp(optarg, "1") && strcmp(optarg, "2")) {
                cli_error("--export-format must be 1 or 2, not '%s'", optarg);
                return 1;
            }
            o.version = optarg[0] - '0';
            break;
        default:
            return 1;
        }
    }
    if (argc - optind != 2) {
        cli_error_hint("Expecting an image and an output file ('-' for "
                       "stdout)");
        return 1;
    }
    path = argv[optind + 1];

    to = cli_open_image(argv[optind], co.fmt, co.image_opts, co.flags, NULL);
    if (!to) {
        return 1;
    }
    if (snap_arg) {
        to_name = snapshot_name(to, argv[optind], snap_arg);
        if (!to_name || cli_load_snapshot(to, snap_arg) < 0) {
            goto out;
        }
    }
    if (from_arg) {
        from = cli_open_image(argv[optind], co.fmt, co.image_opts, co.flags,
                              NULL);
        if (!from) {
            goto out;
        }
        from_name = snapshot_name(from, argv[optind], from_arg);
        if (!from_name || cli_load_snapshot(from, from_arg) < 0) {
            goto out;
        }
    }
    size = vd_getlength(to);
    if (size < 0) {
        cli_error("%s: could not get the image size: %s", argv[optind],
                  strerror((int)-size));
        goto out;
    }

    if (strcmp(path, "-") == 0) {
        /* The meter writes to stdout, which carries the stream. */
        co.progress = false;
        o.fd = STDOUT_FILENO;
    } else {
        o.fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (o.fd < 0) {
            cli_error("%s: %s", path, strerror(errno));
            goto out;
        }
        created = true;
    }

    r = write_all(&o, o.version == 2 ? "rbd diff v2\n" : "rbd diff v1\n",
                  12);
    if (r >= 0 && from_name) {
        r = put_name(&o, 'f', from_name);
    }
    if (r >= 0 && to_name) {
        r = put_name(&o, 't', to_name);
    }
    if (r >= 0 && to_name && o.version == 2) {
        /* rbd's protection flag: vdisk's snapshots have none. */
        r = put_tag(&o, 'p', 1);
        if (r >= 0) {
            r = write_all(&o, "", 1);
        }
    }
    if (r >= 0) {
        r = put_tag(&o, 's', 8);
    }
    if (r >= 0) {
        put_le64(b, (uint64_t)size);
        r = write_all(&o, b, 8);
    }
    if (r < 0) {
        cli_error("%s: write error: %s", path, strerror(-r));
        goto out;
    }
    r = export_walk(from, to, (uint64_t)size, &o, co.progress, &err);
    if (r < 0) {
        cli_error("%s: %s", strstr(err.message, "write error") ? path :
                  argv[optind], err.message[0] ? err.message : strerror(-r));
        goto out;
    }
    /* Not fsynced, as rbd export-diff and qemu-img convert (cache=unsafe
     * by default) leave theirs: a flush of the whole stream doubled the
     * time (docs/snapshots.md). */
    r = write_all(&o, "e", 1);
    if (r < 0) {
        cli_error("%s: write error: %s", path, strerror(-r));
        goto out;
    }
    ret = 0;
out:
    if (created) {
        if (close(o.fd) < 0 && ret == 0) {
            cli_error("%s: write error: %s", path, strerror(errno));
            ret = 1;
        }
        if (ret != 0) {
            unlink(path);
        }
    }
    free(from_name);
    free(to_name);
    vd_error_clear(&err);
    vd_close(&from, NULL);
    vd_close(&to, NULL);
    return ret;
}

/* ---- applying a stream ---- */

typedef struct xd_in {
    vd_node *node;
    int fd;
    uint8_t *buf;
    cli_progress prog;
    uint64_t stream_size;
} xd_in;

static int apply_extent(void *opaque, bool zero, uint64_t off, uint64_t len,
                        uint64_t data_pos, vd_error *err)
{
    xd_in *in = opaque;
    int r = 0;

    while (len && r >= 0) {
        uint64_t n;

        if (zero) {
            n = len < XD_ZERO_MAX ? len : XD_ZERO_MAX;
            r = vd_write_zeroes(in->node, n, off, VD_REQ_MAY_UNMAP, err);
        } else {
            ssize_t got;

            n = len < XD_BUF ? len : XD_BUF;
            got = pread(in->fd, in->buf, n, (off_t)data_pos);
            if (got != (ssize_t)n) {
                return vd_error_set(err, got < 0 ? -errno : -EIO, "read "
                                    "error at stream offset %" PRIu64
                                    " (did the stream change?)", data_pos);
            }
            r = vd_pwrite(in->node, in->buf, n, off, 0, err);
            data_pos += n;
        }
        off += n;
        len -= n;
    }
    if (!zero) {
        cli_progress_print(&in->prog, (double)data_pos * 100 /
                           (double)in->stream_size);
    }
    return r;
}

/* A descriptor that pread() works on holding the stream at @path ("-":
 * stdin): the file itself, or for a pipe, a terminal or a socket, an
 * unlinked temporary copy. Returns the descriptor, or -1 after saying
 * why. */
static int open_stream(const char *path, const char *label)
{
    struct stat st;
    const char *tmpdir = getenv("TMPDIR");
    char tmp[4096];
    int fd = strcmp(path, "-") == 0 ? dup(STDIN_FILENO)
                                    : open(path, O_RDONLY | O_CLOEXEC);
    int out;
    uint8_t *buf;

    if (fd < 0) {
        cli_error("%s: %s", label, strerror(errno));
        return -1;
    }
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
        return fd;
    }
    snprintf(tmp, sizeof(tmp), "%s/vdisk-import-diff-XXXXXX",
             tmpdir && *tmpdir ? tmpdir : "/tmp");
    out = mkstemp(tmp);
    buf = malloc(XD_BUF);
    if (out < 0 || !buf) {
        cli_error("%s: cannot spool the stream to a temporary file: %s",
                  label, out < 0 ? strerror(errno) : "out of memory");
        if (out >= 0) {
            close(out);
            unlink(tmp);
        }
        free(buf);
        close(fd);
        return -1;
    }
    unlink(tmp);
    for (;;) {
        ssize_t n = read(fd, buf, XD_BUF), w = 0;

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            cli_error("%s: read error: %s", label, strerror(errno));
            goto fail;
        }
        if (n == 0) {
            break;
        }
        while (w < n) {
            ssize_t k = write(out, buf + w, (size_t)(n - w));
            if (k < 0 && errno != EINTR) {
                cli_error("%s: cannot spool the stream to a temporary file: "
                          "%s", label, strerror(errno));
                goto fail;
            }
            w += k > 0 ? k : 0;
        }
    }
    free(buf);
    close(fd);
    return out;
fail:
    free(buf);
    close(fd);
    close(out);
    return -1;
}

int cmd_import_diff(int argc, char **argv)
{
    cli_common co = { 0 };
    const char *path, *image, *label;
    vd_node *node = NULL;
    vd_error err = VD_ERROR_INIT;
    vd_rbd_diff_info info = { 0 };
    xd_in in = { .fd = -1 };
    struct stat st;
    int64_t size;
    int ch, r, ret = 1;

    while ((ch = cli_getopt_common("import-diff", argc, argv, &co)) != -1) {
        switch (ch) {
        default:
            return 1;
        }
    }
    if (argc - optind != 2) {
        cli_error_hint("Expecting a diff stream ('-' for stdin) and an "
                       "image");
        return 1;
    }
    path = argv[optind];
    image = argv[optind + 1];
    label = strcmp(path, "-") == 0 ? "(stdin)" : path;

    in.fd = open_stream(path, label);
    if (in.fd < 0) {
        return 1;
    }
    node = cli_open_image(image, co.fmt, co.image_opts,
                          VD_O_RDWR | VD_O_RESIZE, NULL);
    if (!node) {
        goto out;
    }
    size = vd_getlength(node);
    if (size < 0 || fstat(in.fd, &st) < 0) {
        cli_error("%s: could not get the size: %s", size < 0 ? image : label,
                  strerror(size < 0 ? (int)-size : errno));
        goto out;
    }
    in.stream_size = (uint64_t)st.st_size;

    /* Pass 1: the whole stream checked, nothing written. */
    r = vd_rbd_diff_scan(in.fd, 0, in.stream_size, (uint64_t)size, &info,
                         NULL, NULL, &err);
    if (r < 0) {
        cli_error("%s: %s", label, err.message[0] ? err.message
                                                  : strerror(-r));
        goto out;
    }
    if (info.from_snap && !diff_view_has_snapshot(node, info.from_snap)) {
        cli_error("%s: start snapshot '%s' of %s does not exist in the "
                  "image", image, info.from_snap, label);
        goto out;
    }
    if (info.to_snap) {
        if (!vd_snapshot_can(node)) {
            cli_error("%s: %s ends at snapshot '%s', and the image cannot "
                      "take snapshots", image, label, info.to_snap);
            goto out;
        }
        if (diff_view_has_snapshot(node, info.to_snap)) {
            cli_error("%s: end snapshot '%s' of %s already exists",
                      image, info.to_snap, label);
            goto out;
        }
    }
    if (info.has_size && info.size != (uint64_t)size) {
        r = vd_truncate(node, info.size, true, VD_PREALLOC_OFF, &err);
        if (r < 0) {
            cli_error("%s: could not resize to %" PRIu64 " bytes as %s "
                      "says: %s", image, info.size, label,
                      err.message[0] ? err.message : strerror(-r));
            goto out;
        }
    }

    /* Pass 2: apply. */
    in.node = node;
    in.buf = cli_io_buffer(XD_BUF);
    if (!in.buf) {
        cli_error("Out of memory");
        goto out;
    }
    cli_progress_init(&in.prog, co.progress, 1.0);
    cli_progress_print(&in.prog, 0);
    vd_rbd_diff_info_clear(&info);
    r = vd_rbd_diff_scan(in.fd, 0, in.stream_size, (uint64_t)size, &info,
                         apply_extent, &in, &err);
    if (r >= 0) {
        r = vd_flush(node, &err);
    }
    if (r >= 0 && info.to_snap) {
        r = vd_snapshot_create_simple(node, info.to_snap, &err);
    }
    cli_progress_print(&in.prog, 100);
    cli_progress_end(&in.prog);
    if (r < 0) {
        cli_error("%s: applying %s failed: %s", image, label,
                  err.message[0] ? err.message : strerror(-r));
        goto out;
    }
    ret = 0;
out:
    free(in.buf);
    vd_rbd_diff_info_clear(&info);
    if (in.fd >= 0) {
        close(in.fd);
    }
    vd_error_clear(&err);
    if (vd_close(&node, &err) < 0 && ret == 0) {
        cli_error("%s: %s", image, err.message);
        ret = 1;
    }
    vd_error_clear(&err);
    return ret;
}
