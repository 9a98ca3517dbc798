/*
 * libFuzzer target for the NBD server's parsers: the handshake state
 * machine and the transmission request path, driven exactly as a client
 * would drive them, against a 1 MiB null-co export.
 *
 * The input is the byte stream a client sends. Its first byte picks a
 * mode: even = the rest is sent raw (the fuzzer explores the handshake),
 * odd = a canned handshake (fixed newstyle, structured replies, both
 * metadata contexts, GO "") is sent first and the rest is transmission
 * requests. The stream is served from a memfd with replies going to
 * /dev/null, with no worker threads (jobs run in the reader), so a run is
 * deterministic and single-threaded.
 *
 * The server is part of libvdisk.a, which tests/fuzz/run.sh links whole;
 * nbd_conn_serve(), the entry point for one connection, is internal (a
 * hidden symbol of the shared library), which a static link reaches.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../../src/nbd/nbd-int.h"
#include "../../src/nbd/nbd-proto.h"

static vd_nbd_server *fuzz_srv;
static int fuzz_devnull = -1;

static void fuzz_init(void)
{
    vd_opts *opts = vd_opts_new();
    vd_node *node = NULL;
    vd_error err = VD_ERROR_INIT;

    vd_opts_set(opts, "size", "1M");
    vd_opts_set(opts, "read-zeroes", "on");
    if (vd_open(&node, NULL, "null-co", opts, VD_O_RDWR, &err) < 0) {
        fprintf(stderr, "fuzz-nbd-server: cannot open null-co: %s\n",
                err.message);
        abort();
    }
    vd_opts_free(&opts);
    fuzz_srv = vd_nbd_server_new(0, 0, true);
    if (!fuzz_srv || vd_nbd_server_add_export(fuzz_srv, "", "default", node,
                                              &err) < 0 ||
        vd_nbd_server_add_export(fuzz_srv, "x", NULL, node, &err) < 0 ||
        /* The default export offers both contexts, "x" only
         * base:allocation, so both paths of the context code run. */
        vd_nbd_server_set_allocation_depth(fuzz_srv, "", true, &err) < 0) {
        abort();
    }
    fuzz_devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (fuzz_devnull < 0) {
        abort();
    }
}

/* Appends an option to @buf at @pos; returns the new position. */
static size_t put_opt(unsigned char *buf, size_t pos, uint32_t opt,
                      const void *data, uint32_t len)
{
    uint64_t m = htobe64(NBD_OPTS_MAGIC);
    uint32_t o = htobe32(opt), l = htobe32(len);

    memcpy(buf + pos, &m, 8);
    memcpy(buf + pos + 8, &o, 4);
    memcpy(buf + pos + 12, &l, 4);
    memcpy(buf + pos + 16, data, len);
    return pos + 16 + len;
}

static size_t canned_handshake(unsigned char *buf)
{
    static const unsigned char meta[] =
        "\0\0\0\0" "\0\0\0\2"
        "\0\0\0\x0f" "base:allocation"
        "\0\0\0\x15" "qemu:allocation-depth";
    static const unsigned char go[] = "\0\0\0\0" "\0\0";
    uint32_t flags = htobe32(NBD_FLAG_C_FIXED_NEWSTYLE |
                             NBD_FLAG_C_NO_ZEROES);
    size_t pos = 4;

    memcpy(buf, &flags, 4);
    pos = put_opt(buf, pos, NBD_OPT_STRUCTURED_REPLY, "", 0);
    pos = put_opt(buf, pos, NBD_OPT_SET_META_CONTEXT, meta,
                  sizeof(meta) - 1);
    pos = put_opt(buf, pos, NBD_OPT_GO, go, sizeof(go) - 1);
    return pos;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned char prefix[256];
    size_t plen = 0;
    int fd;

    if (!fuzz_srv) {
        fuzz_init();
    }
    if (size < 1) {
        return 0;
    }
    if (data[0] & 1) {
        plen = canned_handshake(prefix);
    }
    fd = memfd_create("nbd-fuzz", MFD_CLOEXEC);
    if (fd < 0) {
        abort();
    }
    if ((plen && write(fd, prefix, plen) != (ssize_t)plen) ||
        (size > 1 && write(fd, data + 1, size - 1) != (ssize_t)(size - 1))) {
        abort();
    }
    lseek(fd, 0, SEEK_SET);
    nbd_conn_serve(fuzz_srv, fd, fuzz_devnull, NULL);
    close(fd);
    return 0;
}
