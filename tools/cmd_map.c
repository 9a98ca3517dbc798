/*
 * vdisk map: qemu-img map. Walks the image with vd_block_status() (which
 * already looks down the backing chain and reports the depth), merges
 * neighbouring extents whose fields agree exactly as qemu-img does, and
 * prints them as JSON lines or as qemu's human table (data extents only).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commands.h"
#include "util.h"

typedef struct map_entry {
    uint64_t start, length, offset;
    int depth;
    bool data, zero, present, has_offset;
    const char *filename;       /* borrowed from the node, or NULL */
} map_entry;

static bool mergeable(const map_entry *cur, const map_entry *next)
{
    if (cur->length == 0) {
        return false;
    }
    if (cur->zero != next->zero || cur->data != next->data ||
        cur->depth != next->depth || cur->present != next->present ||
        !cur->filename != !next->filename ||
        cur->has_offset != next->has_offset) {
        return false;
    }
    if (cur->filename && strcmp(cur->filename, next->filename) != 0) {
        return false;
    }
    if (cur->has_offset && cur->offset + cur->length != next->offset) {
        return false;
    }
    return true;
}

/* Prints @e; @next is the following entry (NULL at the end), which the
 * human format may normalise so that more zero extents coalesce. */
static int dump_entry(bool json, const map_entry *e, map_entry *next)
{
    if (!json) {
        if (e->data && !e->has_offset) {
            cli_error("File contains external, encrypted or compressed "
                      "clusters.");
            return -1;
        }
        if (e->data && !e->zero) {
            printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n",
                   e->start, e->length, e->has_offset ? e->offset : 0,
                   e->filename ? e->filename : "");
        }
        if (next && (!next->data || next->zero)) {
            next->data = false;
            next->zero = true;
        }
        return 0;
    }
    printf("{ \"start\": %" PRId64 ", \"length\": %" PRId64 ", \"depth\": %d,"
           " \"present\": %s, \"zero\": %s, \"data\": %s",
           (int64_t)e->start, (int64_t)e->length, e->depth,
           e->present ? "true" : "false", e->zero ? "true" : "false",
           e->data ? "true" : "false");
    if (e->has_offset) {
        printf(", \"offset\": %" PRId64, (int64_t)e->offset);
    }
    putchar('}');
    if (next) {
        puts(",");
    }
    return 0;
}

static int get_entry(vd_node *node, uint64_t offset, uint64_t bytes,
                     map_entry *e)
{
    vd_error err = VD_ERROR_INIT;
    vd_extent ext;
    int ret;

    memset(&ext, 0, sizeof(ext));
    ret = vd_block_status(node, offset, bytes, &ext, &err);
    if (ret < 0) {
        return ret;
    }
    if (ext.length == 0 || ext.length > bytes) {
        return -EIO;
    }
    memset(e, 0, sizeof(*e));
    e->start = offset;
    e->length = ext.length;
    e->data = ext.flags & VD_BLOCK_DATA;
    e->zero = ext.flags & VD_BLOCK_ZERO;
    e->present = ext.flags & VD_BLOCK_ALLOCATED;
    e->has_offset = ext.flags & VD_BLOCK_OFFSET_VALID;
    e->offset = e->has_offset ? ext.offset : 0;
    e->depth = ext.depth;
    if (e->has_offset && ext.file) {
        e->filename = vd_node_filename(ext.file);
    }
    return 0;
}

int cmd_map(int argc, char **argv)
{
    cli_common co = { 0 };
    const char *filename;
    uint64_t start = 0, max_length = UINT64_MAX;
    map_entry cur, next;
    int64_t length;
    vd_node *node;
    int ch, ret = 1;

    while ((ch = cli_getopt_common("map", argc, argv, &co)) != -1) {
        switch (ch) {
        case OPT_START_OFFSET:
            if (cli_cvtnum("start offset", optarg, &start) < 0) {
                return 1;
            }
            break;
        case OPT_MAX_LENGTH:
            if (cli_cvtnum("max length", optarg, &max_length) < 0) {
                return 1;
            }
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

    node = cli_open_image(filename, co.fmt, co.image_opts, co.flags, NULL);
    if (!node) {
        return 1;
    }
    if (co.json) {
        putchar('[');
    } else {
        printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
    }
    length = vd_getlength(node);
    if (length < 0) {
        cli_error("Failed to get size for '%s'", filename);
        goto out;
    }
    if (max_length != UINT64_MAX && start + max_length < (uint64_t)length) {
        length = (int64_t)(start + max_length);
    }

    memset(&cur, 0, sizeof(cur));
    cur.start = start;
    while (cur.start + cur.length < (uint64_t)length) {
        uint64_t offset = cur.start + cur.length;
        int r = get_entry(node, offset, (uint64_t)length - offset, &next);

        if (r < 0) {
            cli_error("Could not read file metadata: %s", strerror(-r));
            goto out;
        }
        if (mergeable(&cur, &next)) {
            cur.length += next.length;
            continue;
        }
        if (cur.length > 0 && dump_entry(co.json, &cur, &next) < 0) {
            goto out;
        }
        cur = next;
    }
    if (dump_entry(co.json, &cur, NULL) < 0) {
        goto out;
    }
    if (co.json) {
        puts("]");
    }
    ret = 0;
out:
    fflush(stdout);
    vd_close(&node, NULL);
    return ret;
}
