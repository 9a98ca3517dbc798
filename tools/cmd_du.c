/*
 * vdisk du: space per snapshot, layer, bitmap and for metadata (no peer
 * has it for images; issue 18). `rbd du` is the model:
 *
 *   vdisk du [--object objectdef] [--image-opts] [-f fmt] [-U]
 *            [--backing-chain] [--output=ofmt] filename
 *
 * The accounting is the library's (vd_du(); the qcow2 driver computes it
 * from its tables, other formats get one row from block status and the
 * file's allocation). This file prints it: a table with rbd du's NAME,
 * PROVISIONED and USED columns plus EXCLUSIVE and SHARED, and a <TOTAL>
 * row whose USED is the bytes the file has in use (every row's exclusive
 * bytes plus the shared ones once); or, with --output=json, one object
 * per image (an array top first with --backing-chain), the schema of
 * docs/snapshots.md, "Space per snapshot". With --backing-chain every
 * layer is accounted in its own file, and a last table has one row per
 * layer.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "commands.h"
#include "util.h"

/* Layers accounted at most (a longer chain is refused, as info does). */
#define DU_MAX_CHAIN 1024

static const char *kind_name(vd_du_kind k)
{
    switch (k) {
    case VD_DU_ACTIVE:
        return "active";
    case VD_DU_SNAPSHOT:
        return "snapshot";
    case VD_DU_BITMAP:
        return "bitmap";
    case VD_DU_METADATA:
        return "metadata";
    case VD_DU_LEAKED:
        return "leaked";
    case VD_DU_IMAGE:
    default:
        return "image";
    }
}

static int add_u64(json_object *o, const char *key, uint64_t v)
{
    json_object *n = json_object_new_uint64(v);

    return n ? json_object_object_add(o, key, n) : -1;
}

static int add_str(json_object *o, const char *key, const char *v)
{
    json_object *n = json_object_new_string(v);

    return n ? json_object_object_add(o, key, n) : -1;
}

static json_object *result_to_json(const vd_du_result *r)
{
    json_object *o = json_object_new_object();
    json_object *rows = json_object_new_array();
    int bad = !o || !rows;

    bad = bad || add_str(o, "filename", r->filename) < 0 ||
          add_str(o, "format", r->format) < 0 ||
          add_u64(o, "virtual-size", r->virtual_size) < 0 ||
          add_u64(o, "cluster-size", r->cluster_size) < 0 ||
          add_u64(o, "allocated", r->allocated) < 0 ||
          add_u64(o, "shared", r->shared) < 0 ||
          add_u64(o, "leaked", r->leaked) < 0 ||
          add_u64(o, "unused", r->unused) < 0 ||
          add_u64(o, "file-length", r->file_length) < 0 ||
          (r->disk_usage >= 0 &&
           add_u64(o, "disk-usage", (uint64_t)r->disk_usage) < 0);
    for (size_t i = 0; !bad && i < r->nb_rows; i++) {
        const vd_du_row *w = &r->rows[i];
        json_object *row = json_object_new_object();

        bad = !row || add_str(row, "type", kind_name(w->kind)) < 0 ||
              (w->id && add_str(row, "id", w->id) < 0) ||
              (w->name && add_str(row, "name", w->name) < 0) ||
              add_u64(row, "provisioned", w->provisioned) < 0 ||
              add_u64(row, "used", w->used) < 0 ||
              add_u64(row, "exclusive", w->exclusive) < 0 ||
              add_u64(row, "shared", w->shared) < 0 ||
              add_u64(row, "tables", w->tables) < 0 ||
              add_u64(row, "mapped", w->mapped) < 0 ||
              json_object_array_add(rows, row) < 0;
        if (bad) {
            json_object_put(row);
        }
    }
    if (bad || json_object_object_add(o, "rows", rows) < 0) {
        json_object_put(rows);
        json_object_put(o);
        return NULL;
    }
    return o;
}

static void print_row(const char *name, uint64_t prov, uint64_t used,
                      const uint64_t *excl, const uint64_t *shared)
{
    char p[32], u[32], e[32] = "", s[32] = "";

    cli_size_to_str(p, sizeof(p), prov);
    cli_size_to_str(u, sizeof(u), used);
    if (excl) {
        cli_size_to_str(e, sizeof(e), *excl);
        cli_size_to_str(s, sizeof(s), *shared);
    }
    printf("%-32s %11s %11s %11s %11s\n", name, p, u, e, s);
}

static void print_human(const vd_du_result *r)
{
    uint64_t excl = 0, shared = r->shared;
    char name[1024], len[32], unused[32], blocks[32];

    printf("%-32s %11s %11s %11s %11s\n", "NAME", "PROVISIONED", "USED",
           "EXCLUSIVE", "SHARED");
    for (size_t i = 0; i < r->nb_rows; i++) {
        const vd_du_row *w = &r->rows[i];

        switch (w->kind) {
        case VD_DU_SNAPSHOT:
            snprintf(name, sizeof(name), "%s@%s", r->filename,
                     w->name ? w->name : w->id ? w->id : "");
            break;
        case VD_DU_BITMAP:
            snprintf(name, sizeof(name), "<bitmap %s>", w->name);
            break;
        case VD_DU_METADATA:
            snprintf(name, sizeof(name), "<metadata>");
            break;
        case VD_DU_LEAKED:
            snprintf(name, sizeof(name), "<leaked>");
            break;
        default:
            snprintf(name, sizeof(name), "%s", r->filename);
            break;
        }
        print_row(name, w->provisioned, w->used, &w->exclusive, &w->shared);
        excl += w->exclusive;
    }
    print_row("<TOTAL>", r->virtual_size, excl + shared, &excl, &shared);
    /* What the table does not add up: the file's own figures. */
    cli_size_to_str(len, sizeof(len), r->file_length);
    cli_size_to_str(unused, sizeof(unused), r->unused);
    if (r->disk_usage >= 0) {
        cli_size_to_str(blocks, sizeof(blocks), (uint64_t)r->disk_usage);
    }
    printf("file length %s, ", len);
    if (r->cluster_size) {
        printf("%s unused clusters inside it, ", unused);
    }
    printf("on disk %s (st_blocks)\n", r->disk_usage >= 0 ? blocks
                                                         : "unknown");
}

/* The last table of --backing-chain: one row per layer, each layer's
 * bytes in use in its own file. */
static void print_chain(vd_du_result **res, size_t n)
{
    uint64_t prov = 0, used = 0;

    printf("%-32s %11s %11s\n", "LAYER", "PROVISIONED", "USED");
    for (size_t i = 0; i < n; i++) {
        uint64_t u = res[i]->allocated + res[i]->leaked;

        print_row(res[i]->filename, res[i]->virtual_size, u, NULL, NULL);
        prov = res[i]->virtual_size > prov ? res[i]->virtual_size : prov;
        used += u;
    }
    print_row("<TOTAL>", prov, used, NULL, NULL);
}

int cmd_du(int argc, char **argv)
{
    cli_common co = { 0 };
    bool chain = false;
    vd_du_result **res = NULL;
    size_t n = 0;
    vd_node *top = NULL;
    int ch, ret = 1;

    while ((ch = cli_getopt_common("du", argc, argv, &co)) != -1) {
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
    /* Without --backing-chain the backing files are not needed (nor
     * opened: a missing one does not stop the accounting of this file).
     * Metadata only, as info: an encrypted image needs no key. */
    top = cli_open_image(argv[optind], co.fmt, co.image_opts,
                         co.flags | VD_O_NO_IO |
                         (chain ? 0 : VD_O_NO_BACKING), NULL);
    if (!top) {
        return 1;
    }
    res = calloc(DU_MAX_CHAIN, sizeof(*res));
    if (!res) {
        cli_error("Out of memory");
        goto out;
    }
    for (vd_node *node = top; node; node = vd_node_child(node, "backing")) {
        vd_error err = VD_ERROR_INIT;
        int r;

        if (n == DU_MAX_CHAIN) {
            cli_error("Backing chain of '%s' is too long", argv[optind]);
            goto out;
        }
        r = vd_du(node, &res[n], &err);
        if (r < 0) {
            cli_error("%s", err.message[0] ? err.message : strerror(-r));
            vd_error_clear(&err);
            goto out;
        }
        n++;
        if (!chain) {
            break;
        }
    }

    if (co.json) {
        json_object *o = chain ? json_object_new_array() : NULL;

        for (size_t i = 0; i < n; i++) {
            json_object *one = result_to_json(res[i]);

            if (!one) {
                json_object_put(o);
                cli_error("Out of memory");
                goto out;
            }
            if (!chain) {
                o = one;
            } else if (json_object_array_add(o, one) < 0) {
                json_object_put(one);
                json_object_put(o);
                cli_error("Out of memory");
                goto out;
            }
        }
        puts(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PRETTY |
                                               JSON_C_TO_STRING_SPACED |
                                               JSON_C_TO_STRING_NOSLASHESCAPE));
        json_object_put(o);
    } else {
        for (size_t i = 0; i < n; i++) {
            if (i) {
                printf("\n");
            }
            print_human(res[i]);
        }
        if (chain) {
            printf("\n");
            print_chain(res, n);
        }
    }
    ret = 0;
out:
    fflush(stdout);
    for (size_t i = 0; i < n; i++) {
        vd_du_result_free(&res[i]);
    }
    free(res);
    vd_close(&top, NULL);
    return ret;
}
