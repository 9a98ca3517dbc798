/*
 * A program outside the tree, built by tests/cli/lib-install.sh against
 * the installed libvdisk.so with nothing but `pkg-config --cflags --libs
 * vdisk`: what an embedder does with the public API.
 *
 *   embed rw IMAGE INFO.json
 *       opens the qcow2 IMAGE read-write under the node name "disk0",
 *       checks the 0xab pattern qemu-io wrote at [0, 64k), writes 0xcd at
 *       [1M, 1M+64k), walks the graph (lookup by name, the file child and
 *       its parent count, the cache mode), and writes the image's info as
 *       ImageInfo JSON to INFO.json;
 *   embed serve IMAGE SOCKET
 *       exports IMAGE read-only over NBD on the UNIX socket SOCKET as
 *       export "disk" until its one client leaves (qemu-nbd without
 *       --persistent).
 *
 * Exit status 0 on success; 1 with a message on stderr otherwise.
 */
#include <vdisk/nbd-server.h>
#include <vdisk/vdisk.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LEN 65536

static int fail(const char *what, const vd_error *err)
{
    fprintf(stderr, "embed: %s: %s\n", what, err ? err->message : "failed");
    return 1;
}

static int check_graph(vd_node *node)
{
    const char *name = NULL;
    unsigned role = 0;
    vd_node *file = vd_node_nth_child(node, 0, &name, &role);

    if (vd_find_node("disk0") != node) {
        return fail("vd_find_node(\"disk0\") is not the opened node", NULL);
    }
    if (!file || !name || strcmp(name, "file") != 0 ||
        !(role & VD_ROLE_PRIMARY) || vd_node_child(node, "file") != file) {
        return fail("the first child is not the primary 'file' child", NULL);
    }
    if (vd_node_parent_count(file) != 1 || vd_node_parent_count(node) != 0) {
        return fail("parent counts", NULL);
    }
    if (vd_node_nth_child(node, 1, NULL, NULL) != NULL ||
        vd_node_backing_file(node) != NULL) {
        return fail("an image without a backing file has a backing child",
                    NULL);
    }
    if (!(vd_node_cache_flags(node) & VD_CACHE_WRITEBACK) ||
        vd_node_detect_zeroes(node) != VD_DETECT_ZEROES_OFF) {
        return fail("default cache mode and detect-zeroes", NULL);
    }
    return 0;
}

static int do_rw(const char *image, const char *info_path)
{
    vd_error err = VD_ERROR_INIT;
    vd_opts *opts = vd_opts_new();
    vd_node *node = NULL;
    vd_image_info *info = NULL;
    unsigned char *buf = malloc(LEN);
    char *json = NULL;
    FILE *f;
    int ret = 1;

    if (!opts || !buf || vd_opts_set(opts, "node-name", "disk0") < 0) {
        fail("out of memory", NULL);
        goto out;
    }
    if (vd_open(&node, image, "qcow2", opts, VD_O_RDWR, &err) < 0) {
        fail(image, &err);
        goto out;
    }
    if (vd_pread(node, buf, LEN, 0, 0, &err) < 0) {
        fail("read", &err);
        goto out;
    }
    for (size_t i = 0; i < LEN; i++) {
        if (buf[i] != 0xab) {
            fprintf(stderr, "embed: byte %zu reads 0x%02x, not 0xab\n", i,
                    buf[i]);
            goto out;
        }
    }
    memset(buf, 0xcd, LEN);
    if (vd_pwrite(node, buf, LEN, 1 << 20, 0, &err) < 0 ||
        vd_flush(node, &err) < 0) {
        fail("write", &err);
        goto out;
    }
    if (check_graph(node) != 0) {
        goto out;
    }
    if (vd_get_info(node, &info, &err) < 0) {
        fail("info", &err);
        goto out;
    }
    json = vd_image_info_to_json(info);
    f = json ? fopen(info_path, "w") : NULL;
    if (!f || fprintf(f, "%s\n", json) < 0 || fclose(f) != 0) {
        fail(info_path, NULL);
        goto out;
    }
    ret = 0;
out:
    free(json);
    vd_image_info_free(&info);
    if (vd_close(&node, &err) < 0 && ret == 0) {
        ret = fail("close", &err);
    }
    vd_opts_free(&opts);
    free(buf);
    return ret;
}

static int do_serve(const char *image, const char *sock)
{
    vd_error err = VD_ERROR_INIT;
    vd_node *node = NULL;
    vd_nbd_server *srv = NULL;
    int ret = 1;

    /* The library leaves signal dispositions alone (nbd-server.h). */
    signal(SIGPIPE, SIG_IGN);
    if (vd_open(&node, image, "qcow2", NULL, 0, &err) < 0) {
        return fail(image, &err);
    }
    srv = vd_nbd_server_new(2, 0, false);
    if (!srv) {
        fail("vd_nbd_server_new", NULL);
    } else if (vd_nbd_server_add_export(srv, "disk", NULL, node, &err) < 0 ||
               !vd_nbd_server_has_export(srv, "disk") ||
               vd_nbd_server_listen_unix(srv, sock, &err) < 0) {
        fail("export", &err);
    } else if (vd_nbd_server_run(srv, &err) < 0) {
        fail("serve", &err);
    } else {
        ret = 0;
    }
    vd_nbd_server_free(&srv);
    vd_close(&node, NULL);
    return ret;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "rw") == 0) {
        return do_rw(argv[2], argv[3]);
    }
    if (argc == 4 && strcmp(argv[1], "serve") == 0) {
        return do_serve(argv[2], argv[3]);
    }
    fprintf(stderr, "usage: embed rw IMAGE INFO.json | serve IMAGE SOCKET\n");
    return 1;
}
