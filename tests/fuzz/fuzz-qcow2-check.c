/*
 * libFuzzer target: run the qcow2 consistency check on an arbitrary byte
 * string.
 *
 * The input is written to an anonymous memory file, opened with
 * VD_O_CHECK (which tolerates corrupt metadata) and checked without
 * repair, and then checked with repair on a private copy (the memory file
 * itself, opened read-write) so that the refcount rebuild and the
 * OFLAG_COPIED repair paths are fuzzed too. The checker's diagnostics go
 * to stderr: run.sh passes -close_fd_mask=2, which keeps libFuzzer's and
 * the sanitizers' reports.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vdisk/vdisk.h"

/* Repairs may grow the file; keep each run's footprint small. */
#define MAX_INPUT (4u << 20)

static void ignore_warning(const char *msg, void *opaque)
{
    (void)msg;
    (void)opaque;
}

static void check_once(const char *path, unsigned open_flags, unsigned fix)
{
    vd_node *node = NULL;
    vd_check_result res;

    if (vd_open(&node, path, "qcow2", NULL,
                open_flags | VD_O_CHECK | VD_O_NO_BACKING |
                VD_O_FORCE_SHARE | VD_O_QUIET, NULL) < 0) {
        return;
    }
    memset(&res, 0, sizeof(res));
    vd_check(node, &res, fix, NULL);
    vd_close(&node, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64];
    int fd;

    if (size > MAX_INPUT) {
        return 0;
    }
    vd_set_warning_handler(ignore_warning, NULL);
    fd = memfd_create("fuzz-qcow2-check", 0);
    if (fd < 0) {
        return 0;
    }
    if (size && write(fd, data, size) != (ssize_t)size) {
        close(fd);
        return 0;
    }
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    check_once(path, 0, 0);
    check_once(path, VD_O_RDWR, VD_CHECK_FIX_LEAKS | VD_CHECK_FIX_ERRORS);
    close(fd);
    return 0;
}
