/*
 * libFuzzer target: the qcow2 bitmaps extension, directory and tables
 * parsed, loaded, stored and removed through the driver's persistent
 * bitmap callbacks (src/drivers/qcow2/bitmap.c) on an arbitrary byte
 * string.
 *
 * The input is written to an anonymous memory file. A read-only open
 * loads every bitmap (directory, tables, data clusters, all-ones
 * entries). A read-write open then loads them again (which marks them
 * in use in place), removes the first one, flips a bit of every loaded
 * bitmap and stores the set back (new data, tables and directory,
 * old clusters freed), as the core does on close. Errors are the
 * expected outcome for most inputs; the sanitizers report what matters.
 * A white-box target: it reaches the driver vtable, so it is built with
 * VDISK_INTERNAL like the unit tests.
 */
#define _GNU_SOURCE
#define VDISK_INTERNAL 1
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/block_int.h"

#include "fuzz-memfd.h"

/* Stores may grow the file; keep each run's footprint small. */
#define MAX_INPUT (4u << 20)

static void ignore_warning(const char *msg, void *opaque)
{
    (void)msg;
    (void)opaque;
}

static void exercise(const char *path, bool rw)
{
    vd_node *node = NULL;
    vd_bitmap_image *list = NULL;
    size_t count = 0;

    if (vd_open(&node, path, "qcow2", NULL,
                (rw ? VD_O_RDWR : 0) | VD_O_NO_BACKING | VD_O_QUIET,
                NULL) < 0) {
        return;
    }
    if (node->drv->bitmaps_load &&
        node->drv->bitmaps_load(node, &list, &count, NULL) == 0 && rw) {
        if (count) {
            node->drv->bitmap_remove(node, list[0].name, NULL);
        }
        for (size_t i = 0; i < count; i++) {
            if (list[i].bits) {
                list[i].bits[0] ^= 1;
            }
        }
        node->drv->bitmap_can_store(node, "fuzz", 65536, NULL);
        node->drv->bitmaps_store(node, count > 1 ? list + 1 : list,
                                 count > 1 ? count - 1 : 0, NULL);
    }
    vd_bitmap_images_free(list, count);
    vd_close(&node, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64];
    int fd = fuzz_memfd("fuzz-qcow2-bitmaps", data, size, MAX_INPUT, path,
                        sizeof(path));

    if (fd >= 0) {
        vd_set_warning_handler(ignore_warning, NULL);
        exercise(path, false);
        exercise(path, true);
        close(fd);
    }
    return 0;
}
