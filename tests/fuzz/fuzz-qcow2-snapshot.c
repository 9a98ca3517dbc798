/*
 * libFuzzer target: internal snapshot operations on an arbitrary byte
 * string opened as a qcow2 image.
 *
 * The input is written to an anonymous memory file. Read-only: the
 * snapshot table is listed, the space is accounted (vd_du(), which walks
 * every snapshot's tables) and each of the first few snapshots is loaded
 * with vd_snapshot_load_tmp() on a fresh read-only node, which is then
 * read and walked with block status (this parses the snapshot's own L1
 * table). Read-write, on the same memory file (a private copy of the
 * input): a snapshot is created, the first listed snapshot is applied
 * and the new one deleted, which runs the refcount updates of the
 * snapshot code over fuzzed metadata.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vdisk/vdisk.h"

#define MAX_INPUT (1u << 20)
#define MAX_LOADS 4
#define READ_LEN 4096
#define MAX_EXTENTS 16

static void ignore_warning(const char *msg, void *opaque)
{
    (void)msg;
    (void)opaque;
}

static int open_image(vd_node **node, const char *path, unsigned flags)
{
    return vd_open(node, path, "qcow2", NULL,
                   flags | VD_O_NO_BACKING | VD_O_FORCE_SHARE | VD_O_QUIET,
                   NULL);
}

static void walk(vd_node *node)
{
    static uint8_t buf[READ_LEN];
    int64_t len = vd_getlength(node);
    uint64_t off = 0;

    if (len <= 0) {
        return;
    }
    vd_pread(node, buf, len < READ_LEN ? (uint64_t)len : READ_LEN, 0, 0,
             NULL);
    for (int i = 0; i < MAX_EXTENTS && off < (uint64_t)len; i++) {
        vd_extent ext;
        if (vd_block_status(node, off, (uint64_t)len - off, &ext, NULL) < 0 ||
            ext.length == 0) {
            break;
        }
        off += ext.length;
    }
}

static void load_each(const char *path, const vd_snapshot_info *list,
                      size_t count)
{
    for (size_t i = 0; i < count && i < MAX_LOADS; i++) {
        vd_node *node = NULL;

        if (open_image(&node, path, 0) < 0) {
            return;
        }
        if (vd_snapshot_load_tmp(node, list[i].id, NULL, NULL) == 0) {
            walk(node);
        }
        vd_close(&node, NULL);
    }
}

static void modify(const char *path, const char *first_id)
{
    vd_node *node = NULL;

    if (open_image(&node, path, VD_O_RDWR) < 0) {
        return;
    }
    if (vd_snapshot_create_simple(node, "fuzz", NULL) == 0) {
        if (first_id) {
            vd_snapshot_goto(node, first_id, NULL);
        }
        vd_snapshot_delete(node, NULL, "fuzz", NULL);
    }
    vd_close(&node, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    vd_snapshot_info *list = NULL;
    size_t count = 0;
    char path[64];
    vd_node *node = NULL;
    char *first_id = NULL;
    int fd;

    if (size > MAX_INPUT) {
        return 0;
    }
    vd_set_warning_handler(ignore_warning, NULL);
    fd = memfd_create("fuzz-qcow2-snapshot", 0);
    if (fd < 0) {
        return 0;
    }
    if (size && write(fd, data, size) != (ssize_t)size) {
        close(fd);
        return 0;
    }
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);

    if (open_image(&node, path, 0) == 0) {
        vd_du_result *du = NULL;

        if (vd_snapshot_list(node, &list, &count, NULL) == 0) {
            if (count && list[0].id) {
                first_id = strdup(list[0].id);
            }
        }
        /* Space accounting walks every snapshot's tree, the refcount
         * blocks and the bitmaps over the fuzzed metadata. */
        if (vd_du(node, &du, NULL) == 0) {
            vd_du_result_free(&du);
        }
        vd_close(&node, NULL);
        load_each(path, list, count);
        vd_snapshot_list_free(&list, count);
        modify(path, first_id);
        free(first_id);
    }
    close(fd);
    return 0;
}
