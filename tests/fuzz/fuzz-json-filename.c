/*
 * libFuzzer target for the option parsers that take text from the user:
 * vd_parse_size() and vd_parse_size_u64(), vd_opts_parse() (qemu-img's
 * -o key=value,... syntax) and vd_open()'s json: pseudo-protocol, whose
 * object is flattened into dotted options and opens a whole node graph.
 *
 * The first input byte carries flags (bit 0: parse with "driver" as the
 * implied key; bit 1: open read-write; bit 2: open with VD_O_NO_BACKING);
 * the rest is the text. Each input is parsed as a size and as an option
 * string; the option set is then cloned and walked. The text is opened
 * both as "json:TEXT" and as the option set (blockdev style, no
 * filename). When an open succeeds the node is read, queried for block
 * status and info, and closed.
 *
 * Safety: opens run in an empty scratch directory and only for texts
 * without '/' and '\\'. Without a slash no host path outside that
 * directory can be named, and without a backslash no JSON escape can
 * produce one, so every file the drivers try to open is missing.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vdisk/vdisk.h"

#define MAX_INPUT 16384

static bool initialised;

static void ignore_warning(const char *msg, void *opaque)
{
    (void)msg;
    (void)opaque;
}

static void fuzz_init(void)
{
    char dir[] = "/tmp/fuzz-json-XXXXXX";

    if (!mkdtemp(dir) || chdir(dir) < 0) {
        abort();
    }
    vd_set_warning_handler(ignore_warning, NULL);
    initialised = true;
}

static void exercise(vd_node *node)
{
    static uint8_t buf[4096];
    int64_t len = vd_getlength(node);
    vd_image_info *info = NULL;
    vd_extent ext;

    if (len > 0) {
        uint64_t n = len < (int64_t)sizeof(buf) ? (uint64_t)len : sizeof(buf);
        vd_pread(node, buf, n, 0, 0, NULL);
        vd_block_status(node, 0, (uint64_t)len, &ext, NULL);
    }
    if (vd_get_info(node, &info, NULL) == 0) {
        vd_image_info_free(&info);
    }
}

static void try_open(const char *filename, const vd_opts *opts,
                     unsigned flags)
{
    vd_node *node = NULL;
    vd_error err = VD_ERROR_INIT;

    if (vd_open(&node, filename, NULL, opts, flags, &err) == 0) {
        exercise(node);
        vd_close(&node, NULL);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text;
    vd_opts *opts, *copy;
    vd_error err = VD_ERROR_INIT;
    unsigned flags = VD_O_QUIET | VD_O_FORCE_SHARE;
    uint64_t v;
    bool can_open;

    if (!initialised) {
        fuzz_init();
    }
    if (size < 1 || size > MAX_INPUT) {
        return 0;
    }
    if (data[0] & 2) {
        flags |= VD_O_RDWR;
    }
    if (data[0] & 4) {
        flags |= VD_O_NO_BACKING;
    }
    /* "json:" prefix, the text, and its terminator. */
    text = malloc(size + 5);
    if (!text) {
        return 0;
    }
    memcpy(text, "json:", 5);
    memcpy(text + 5, data + 1, size - 1);
    text[size + 4] = '\0';
    /* Embedded NULs cut the text where every parser would stop. */
    can_open = !strpbrk(text, "/\\");

    vd_parse_size(text + 5, &v);
    vd_parse_size_u64(text + 5, &v);

    opts = vd_opts_new();
    if (!opts) {
        free(text);
        return 0;
    }
    if (vd_opts_parse(opts, text + 5, (data[0] & 1) ? "driver" : NULL,
                      &err) == 0) {
        copy = vd_opts_clone(opts);
        for (size_t i = 0; i < vd_opts_count(copy); i++) {
            const char *k, *val;
            vd_opts_nth(copy, i, &k, &val);
            /* The clone must hold every key it lists. */
            if (!val || !vd_opts_get(copy, k)) {
                abort();
            }
        }
        vd_opts_free(&copy);
        if (can_open && vd_opts_count(opts) > 0) {
            try_open(NULL, opts, flags);
        }
    }
    vd_opts_free(&opts);
    if (can_open) {
        try_open(text, NULL, flags);
    }
    free(text);
    return 0;
}
