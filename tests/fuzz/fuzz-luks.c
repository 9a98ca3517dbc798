/*
 * libFuzzer target: an arbitrary byte string as a LUKS volume. First the
 * luks driver's metadata-only open (what qemu-img info does: header
 * checks and the info block, no secret); then crypto/luks.c directly:
 * the header parsed and, when it passes, every active key slot tried
 * with a fixed passphrase (PBKDF2, key material read from the input, the
 * AF merge, the digest check), and on success a few sectors decrypted
 * and encrypted. PBKDF2 is bounded to 4096 iterations per slot and per
 * digest (vd_luks_max_iters) so that one input cannot take minutes; the
 * seeds (run.sh) are made with iter-time=1, which gives QEMU's minimum
 * of 1000.
 */
#define _GNU_SOURCE
#define VDISK_INTERNAL 1
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "crypto/luks.h"
#include "vdisk/vdisk.h"
#include "fuzz-memfd.h"

static void quiet(const char *msg, void *opaque)
{
    (void)msg;
    (void)opaque;
}

typedef struct input {
    const uint8_t *data;
    size_t size;
} input;

/* Reads of the key material: the input, zeros past its end. */
static int input_io(void *opaque, bool write, uint64_t off, uint8_t *buf,
                    size_t len, vd_error *err)
{
    input *in = opaque;

    (void)err;
    if (write) {
        return -EROFS;
    }
    memset(buf, 0, len);
    if (off < in->size) {
        size_t n = in->size - off < len ? in->size - off : len;
        memcpy(buf, in->data + off, n);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t hdr[VD_LUKS_HDR_SIZE] = { 0 };
    input in = { data, size };
    char path[64];
    vd_node *node = NULL;
    vd_luks l;
    int fd;

    vd_luks_max_iters = 4096;
    vd_set_warning_handler(quiet, NULL);
    fd = fuzz_memfd("luks", data, size, 1u << 20, path, sizeof(path));
    if (fd >= 0) {
        if (vd_open(&node, path, "luks", NULL,
                    VD_O_NO_IO | VD_O_QUIET | VD_O_FORCE_SHARE, NULL) == 0) {
            vd_image_info *info = NULL;
            if (vd_get_info(node, &info, NULL) == 0) {
                vd_image_info_free(&info);
            }
            vd_close(&node, NULL);
        }
        close(fd);
    }

    memcpy(hdr, data, size < sizeof(hdr) ? size : sizeof(hdr));
    if (vd_luks_parse(&l, hdr, NULL) < 0) {
        return 0;
    }
    free(vd_luks_info_json(&l));
    if (vd_luks_unlock(&l, "fuzz", input_io, &in, NULL) == 0) {
        uint8_t buf[2 * VD_LUKS_SECTOR];
        memset(buf, 0x5a, sizeof(buf));
        vd_luks_crypt(&l, 7, buf, sizeof(buf), false);
        vd_luks_crypt(&l, 7, buf, sizeof(buf), true);
    }
    vd_luks_free(&l);
    return 0;
}
