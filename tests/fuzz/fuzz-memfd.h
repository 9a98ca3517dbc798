/*
 * For the libFuzzer targets that open their input as an image file: the
 * input written to an anonymous memory file, named by a /proc path that
 * vd_open() takes. Older targets spell this out themselves.
 */
#ifndef VDISK_FUZZ_MEMFD_H
#define VDISK_FUZZ_MEMFD_H

#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vdisk/vdisk.h"

/* Returns the descriptor (close it when done) and fills @path, or -1
 * (also for inputs over @max bytes, which the target skips). */
static inline int fuzz_memfd(const char *name, const uint8_t *data,
                             size_t size, size_t max, char *path,
                             size_t path_size)
{
    int fd = size > max ? -1 : memfd_create(name, 0);

    if (fd < 0) {
        return -1;
    }
    if (size && write(fd, data, size) != (ssize_t)size) {
        close(fd);
        return -1;
    }
    snprintf(path, path_size, "/proc/self/fd/%d", fd);
    return fd;
}

/* Walks block status from the start of @node's @len bytes for at most
 * @max extents (the lookups of a format's tables without reading data). */
static inline void fuzz_walk_extents(vd_node *node, int64_t len, int max)
{
    uint64_t off = 0;

    for (int i = 0; i < max && len > 0 && off < (uint64_t)len; i++) {
        vd_extent ext;
        if (vd_block_status(node, off, (uint64_t)len - off, &ext, NULL) < 0 ||
            ext.length == 0) {
            break;
        }
        off += ext.length;
    }
}

#endif
