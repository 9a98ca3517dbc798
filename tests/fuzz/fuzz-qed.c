/*
 * libFuzzer target: an arbitrary byte string as a QED image, opened
 * writable (src/drivers/qed.c).
 *
 * A writable open is the path with the most to get wrong: the header
 * checks, the L1 validation, and the consistency check with repairs that
 * runs when the need-check flag is set. When the open succeeds the
 * target reads the first and last clusters, walks block status for a
 * bounded number of extents, makes an allocating write and a zero write
 * (the L2 allocation and update paths) and runs check with repairs.
 * Every size the driver allocates is bounded by the file's own length
 * (the L1 table must lie inside it), so a 256 KiB input cannot ask for
 * more. Errors are the expected outcome for most inputs.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <string.h>

#include "vdisk/vdisk.h"
#include "fuzz-memfd.h"

#define CHUNK 4096
#define MAX_EXTENTS 64

static void quiet(const char *msg, void *opaque)
{
    (void)msg;
    (void)opaque;
}

static void exercise(vd_node *node)
{
    static uint8_t buf[CHUNK];
    int64_t len = vd_getlength(node);
    vd_check_result res;

    if (len < CHUNK) {
        return;
    }
    vd_pread(node, buf, CHUNK, 0, 0, NULL);
    vd_pread(node, buf, CHUNK, (uint64_t)(len - CHUNK) & ~511ull, 0, NULL);
    fuzz_walk_extents(node, len, MAX_EXTENTS);
    memset(buf, 0x5a, sizeof(buf));
    vd_pwrite(node, buf, CHUNK, ((uint64_t)len / 2) & ~511ull, 0, NULL);
    vd_write_zeroes(node, CHUNK, 0, 0, NULL);
    memset(&res, 0, sizeof(res));
    vd_check(node, &res, VD_CHECK_FIX_LEAKS | VD_CHECK_FIX_ERRORS, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64];
    vd_node *node = NULL;
    int fd;

    vd_set_warning_handler(quiet, NULL);
    fd = fuzz_memfd("fuzz-qed", data, size, 1 << 18, path, sizeof(path));
    if (fd < 0) {
        return 0;
    }
    if (vd_open(&node, path, "qed", NULL,
                VD_O_RDWR | VD_O_NO_BACKING | VD_O_QUIET,
                NULL) == 0) {
        exercise(node);
        vd_close(&node, NULL);
    }
    close(fd);
    return 0;
}
