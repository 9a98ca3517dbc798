/*
 * vdisk compact: in-place compaction of a qcow2 image (no peer has it;
 * issue 18).
 *
 *   vdisk compact [--object objectdef] [--image-opts] [-f fmt] [-q] [-p]
 *                 [--dry-run] [--output=ofmt] filename
 *
 * The image is opened read-only first and the library plans the move
 * (vd_compact() with dry_run: the format's check, every reference
 * counted): a corrupt image, a format that cannot compact or one another
 * process writes is refused there, with the file untouched. --dry-run
 * prints that plan. Otherwise the image is opened again for writing,
 * taking the write lock as every writer does, without loading its
 * persistent bitmaps (VD_O_NO_BITMAPS: they are moved as they are on
 * disk, never marked in use), and compacted; the backing chain is not
 * opened (the backing link is kept as it is). The report: the sizes
 * before and after and the clusters moved, as text or, with
 * --output=json, { "original-size", "new-size", "moved-clusters" }
 * (docs/qcow2.md, "Compaction").
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "commands.h"
#include "util.h"

static void progress_cb(double percent, void *opaque)
{
    cli_progress_print(opaque, percent);
}

static void report(const vd_compact_result *r, bool json, bool dry_run,
                   bool quiet)
{
    char a[64], b[64], g[64];

    if (json) {
        printf("{\n    \"original-size\": %" PRIu64 ",\n"
               "    \"new-size\": %" PRIu64 ",\n"
               "    \"moved-clusters\": %" PRIu64 "\n}\n",
               r->original_size, r->new_size, r->moved_clusters);
        return;
    }
    cli_size_to_str(a, sizeof(a), r->original_size);
    cli_size_to_str(b, sizeof(b), r->new_size);
    cli_size_to_str(g, sizeof(g), r->original_size - r->new_size);
    cli_qprintf(quiet, "%s %" PRIu64 " clusters of %" PRIu64 " bytes; "
                "file size %s -> %s (%s given back)%s\n",
                dry_run ? "Would move" : "Moved", r->moved_clusters,
                r->cluster_size, a, b, g,
                dry_run ? "; nothing was written" : "");
}

/* The library reports the file's length rounded up to 512 bytes, as the
 * block layer sees it; a plain file name gives the exact one. */
static void exact_sizes(const char *filename, bool image_opts,
                        vd_compact_result *r, bool after)
{
    struct stat st;

    if (image_opts || stat(filename, &st) < 0 || !S_ISREG(st.st_mode)) {
        return;
    }
    if (after) {
        r->new_size = (uint64_t)st.st_size;
    } else {
        if (r->new_size >= r->original_size) {
            r->new_size = (uint64_t)st.st_size;
        }
        r->original_size = (uint64_t)st.st_size;
    }
}

/* "vdisk: FILE: message", FILE the image's file name (not the option
 * string of --image-opts), once. */
static void compact_error(vd_node *node, const vd_error *err)
{
    const char *name = vd_node_filename(node);
    cli_error("%s: %s", name, cli_strip_filename(err->message, name));
}

int cmd_compact(int argc, char **argv)
{
    cli_common co = { 0 };
    const char *filename;
    bool dry_run = false;
    vd_compact_opts opts = { 0 };
    vd_compact_result res;
    vd_error err = VD_ERROR_INIT;
    cli_progress prog;
    vd_node *node;
    int ch, ret = 1;

    while ((ch = cli_getopt_common("compact", argc, argv, &co)) != -1) {
        switch (ch) {
        case OPT_DRY_RUN:
            dry_run = true;
            break;
        default:
            return 1;
        }
    }
    if (argc - optind != 1) {
        cli_error_hint("Expecting one image file name");
        return 1;
    }
    filename = argv[optind];

    /* The plan, read-only: nothing is written when it refuses. */
    node = cli_open_image(filename, co.fmt, co.image_opts,
                          VD_O_NO_BACKING | VD_O_NO_BITMAPS, NULL);
    if (!node) {
        return 1;
    }
    opts.dry_run = true;
    if (vd_compact(node, &opts, NULL, NULL, &res, &err) < 0) {
        compact_error(node, &err);
        goto out;
    }
    exact_sizes(filename, co.image_opts, &res, false);
    if (dry_run) {
        report(&res, co.json, true, co.quiet);
        ret = 0;
        goto out;
    }
    vd_close(&node, NULL);

    node = cli_open_image(filename, co.fmt, co.image_opts,
                          VD_O_RDWR | VD_O_NO_BACKING | VD_O_NO_BITMAPS,
                          NULL);
    if (!node) {
        return 1;
    }
    uint64_t original = res.original_size;
    opts.dry_run = false;
    cli_progress_init(&prog, co.progress && !co.quiet, 1.0);
    ret = vd_compact(node, &opts, progress_cb, &prog, &res, &err);
    cli_progress_end(&prog);
    if (ret < 0) {
        compact_error(node, &err);
        ret = 1;
        goto out;
    }
    if (vd_close(&node, &err) < 0) {
        /* The node is gone; the message names its file. */
        cli_error("%s", err.message);
        ret = 1;
        goto out;
    }
    exact_sizes(filename, co.image_opts, &res, false);
    res.original_size = original;
    exact_sizes(filename, co.image_opts, &res, true);
    report(&res, co.json, false, co.quiet);
    ret = 0;
out:
    fflush(stdout);
    vd_close(&node, NULL);
    vd_error_clear(&err);
    return ret;
}
