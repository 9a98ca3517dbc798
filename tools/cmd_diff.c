/*
 * vdisk diff: what changed, from metadata (no peer has it; issue 18).
 *
 *   vdisk diff IMAGE SNAP_A [SNAP_B]   between two internal snapshots, or
 *                                      SNAP_A and the current state
 *   vdisk diff TOP BASE                what TOP's chain changes over BASE
 *   vdisk diff --bitmap NAME IMAGE     the extents a dirty bitmap holds
 *
 * Two views are opened read-only (the same image twice with a snapshot
 * loaded in each, or TOP and BASE) and walked side by side with
 * vd_block_status(). A range both views map to the same offset of the
 * same file holds the same bytes (a qcow2 cluster shared by a snapshot is
 * copied before it is written, and a backing layer's clusters are seen
 * through the overlay at their own offsets); a range that reads as zeros
 * in both is the same too. Every other range is reported without reading
 * it: a superset of the bytes that differ, exact wherever metadata can
 * tell. With --exact those ranges are read and compared, and only the
 * 512-byte sectors that really differ are reported.
 *
 * Output: qemu-img map's human table shape ("Offset Length") or, with
 * --output=json, a JSON array of { "start", "length" } objects, merged
 * and sorted, as map prints them.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "commands.h"
#include "diff_view.h"
#include "util.h"
#include "vdisk/bitmap.h"

#define DIFF_SECTOR 512u
#define DIFF_BUF (1u << 20)

typedef struct diff_out {
    bool json;
    bool any;                   /* an extent printed already */
    uint64_t start, length;     /* the pending extent (length 0: none) */
    uint64_t total;             /* bytes reported */
    cli_progress prog;          /* --progress=json, --progress-fd only */
} diff_out;

static void out_flush(diff_out *o)
{
    if (!o->length) {
        return;
    }
    if (o->json) {
        printf("%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 " }",
               o->any ? ",\n" : "", o->start, o->length);
    } else {
        printf("%#-16" PRIx64 "%#" PRIx64 "\n", o->start, o->length);
    }
    o->any = true;
    o->total += o->length;
    o->length = 0;
}

/* Adds [start, start + length) to the output, merging it with the
 * pending extent when they touch. Extents come in ascending order. */
static void out_add(diff_out *o, uint64_t start, uint64_t length)
{
    if (o->length && o->start + o->length == start) {
        o->length += length;
        return;
    }
    out_flush(o);
    o->start = start;
    o->length = length;
}

/* Reads [off, off + n) of a view of @size bytes: zeros past its end. */
static int read_view(vd_node *node, uint64_t size, uint8_t *buf, uint64_t n,
                     uint64_t off, vd_error *err)
{
    uint64_t have = off >= size ? 0 : size - off < n ? size - off : n;

    memset(buf + have, 0, n - have);
    return have ? vd_pread(node, buf, have, off, 0, err) : 0;
}

/* --exact: reads [off, off + len) of both views and reports the sectors
 * that differ. */
static int compare_range(vd_node *a, uint64_t size_a, vd_node *b,
                         uint64_t size_b, uint64_t off, uint64_t len,
                         uint8_t *buf_a, uint8_t *buf_b, diff_out *o,
                         vd_error *err)
{
    while (len) {
        uint64_t n = len < DIFF_BUF ? len : DIFF_BUF;
        int r = read_view(a, size_a, buf_a, n, off, err);

        if (r >= 0) {
            r = read_view(b, size_b, buf_b, n, off, err);
        }
        if (r < 0) {
            return r;
        }
        for (uint64_t pos = 0; pos < n; pos += DIFF_SECTOR) {
            uint64_t s = n - pos < DIFF_SECTOR ? n - pos : DIFF_SECTOR;

            if (memcmp(buf_a + pos, buf_b + pos, s) != 0) {
                out_add(o, off + pos, s);
            }
        }
        off += n;
        len -= n;
    }
    return 0;
}

/* Walks two views of equal or different sizes up to the larger one. */
static int diff_views(vd_node *a, vd_node *b, bool exact, diff_out *o)
{
    vd_error err = VD_ERROR_INIT;
    int64_t size_a = vd_getlength(a), size_b = vd_getlength(b);
    uint64_t size, off = 0;
    uint8_t *buf_a = NULL, *buf_b = NULL;
    int r = 0;

    if (size_a < 0 || size_b < 0) {
        cli_error("Could not get the image size: %s",
                  strerror(-(size_a < 0 ? (int)size_a : (int)size_b)));
        return -EIO;
    }
    size = (uint64_t)(size_a > size_b ? size_a : size_b);
    if (exact) {
        buf_a = cli_io_buffer(DIFF_BUF);
        buf_b = cli_io_buffer(DIFF_BUF);
        if (!buf_a || !buf_b) {
            cli_error("Out of memory");
            r = -ENOMEM;
            goto out;
        }
    }
    while (off < size) {
        diff_view_ext va, vb;
        uint64_t n;

        r = diff_view_status(a, (uint64_t)size_a, off, size - off, &va,
                             &err);
        if (r >= 0) {
            r = diff_view_status(b, (uint64_t)size_b, off, size - off,
                                 &vb, &err);
        }
        if (r < 0) {
            cli_error("Could not read file metadata: %s", err.message[0] ?
                      err.message : strerror(-r));
            goto out;
        }
        n = va.length < vb.length ? va.length : vb.length;
        if (diff_view_same(&va, &vb)) {
            /* nothing changed here */
        } else if (exact) {
            r = compare_range(a, (uint64_t)size_a, b, (uint64_t)size_b,
                              off, n, buf_a, buf_b, o, &err);
            if (r < 0) {
                cli_error("Error while reading offset %" PRIu64 ": %s", off,
                          err.message[0] ? err.message : strerror(-r));
                goto out;
            }
        } else {
            out_add(o, off, n);
        }
        off += n;
        cli_progress_print_bytes(&o->prog, off, size);
    }
out:
    free(buf_a);
    free(buf_b);
    vd_error_clear(&err);
    return r;
}

static int diff_bitmap(vd_node *node, const char *name, diff_out *o)
{
    vd_error err = VD_ERROR_INIT;
    uint64_t off = 0, start, bytes;
    int64_t size = vd_getlength(node);
    int r;

    while ((r = vd_bitmap_next_dirty(node, name, off, &start, &bytes,
                                     &err)) == 1) {
        out_add(o, start, bytes);
        off = start + bytes;
        if (size > 0) {
            cli_progress_print_bytes(&o->prog, off, (uint64_t)size);
        }
    }
    if (r < 0) {
        cli_error("%s", err.message[0] ? err.message : strerror(-r));
    }
    vd_error_clear(&err);
    return r;
}

static int load_snapshot(vd_node *node, const char *name)
{
    vd_error err = VD_ERROR_INIT;
    int r = vd_snapshot_load_tmp_by_id_or_name(node, name, &err);

    if (r < 0) {
        cli_error("Failed to load snapshot '%s': %s", name,
                  err.message[0] ? err.message : strerror(-r));
    }
    vd_error_clear(&err);
    return r;
}

int cmd_diff(int argc, char **argv)
{
    cli_common co = { 0 };
    const char *bitmap = NULL;
    bool exact = false;
    vd_node *a = NULL, *b = NULL;
    diff_out o;
    int ch, nargs, ret = 1;

    while ((ch = cli_getopt_common("diff", argc, argv, &co)) != -1) {
        switch (ch) {
        case OPT_DIFF_EXACT:
            exact = true;
            break;
        case OPT_DIFF_BITMAP:
            bitmap = optarg;
            break;
        default:
            return 1;
        }
    }
    nargs = argc - optind;
    if (bitmap ? nargs != 1 : nargs != 2 && nargs != 3) {
        cli_error_hint(bitmap ? "Expecting one image file name"
                       : "Expecting an image and one or two snapshots, or "
                         "an image and a base image");
        return 1;
    }
    if (bitmap && exact) {
        cli_error_hint("--exact compares two views; a bitmap is one");
        return 1;
    }

    a = cli_open_image(argv[optind], co.fmt, co.image_opts, co.flags, NULL);
    if (!a) {
        return 1;
    }
    memset(&o, 0, sizeof(o));
    o.json = co.json;
    if (bitmap) {
        if (!vd_bitmap_find(a, bitmap)) {
            cli_error("Dirty bitmap '%s' not found", bitmap);
            goto out;
        }
        goto walk;
    }
    if (nargs == 3 || diff_view_has_snapshot(a, argv[optind + 1])) {
        /* IMAGE SNAP_A [SNAP_B]: the same image opened again, read-only
         * as a snapshot view must be. */
        b = cli_open_image(argv[optind], co.fmt, co.image_opts, co.flags,
                           NULL);
        if (!b || load_snapshot(a, argv[optind + 1]) < 0 ||
            (nargs == 3 && load_snapshot(b, argv[optind + 2]) < 0)) {
            goto out;
        }
    } else {
        /* TOP BASE: BASE's format is probed; TOP's view is its whole
         * chain. A name that is neither says so, not "Could not open". */
        if (!co.image_opts && access(argv[optind + 1], F_OK) != 0) {
            cli_error("'%s' is neither a snapshot of '%s' nor an image",
                      argv[optind + 1], argv[optind]);
            goto out;
        }
        b = cli_open_image(argv[optind + 1], NULL, co.image_opts, co.flags,
                           NULL);
        if (!b) {
            goto out;
        }
    }
walk:
    cli_progress_init(&o.prog, false, 1.0f);
    if (co.json) {
        putchar('[');
    } else {
        printf("%-16s%s\n", "Offset", "Length");
    }
    if (bitmap ? diff_bitmap(a, bitmap, &o) < 0
               : diff_views(b, a, exact, &o) < 0) {
        goto out;
    }
    out_flush(&o);
    if (co.json) {
        puts("]");
    }
    cli_progress_print(&o.prog, 100);
    cli_progress_end(&o.prog);
    ret = 0;
out:
    fflush(stdout);
    vd_close(&b, NULL);
    vd_close(&a, NULL);
    return ret;
}
