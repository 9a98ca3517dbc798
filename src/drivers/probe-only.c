/*
 * Probe-only format entries: the image formats QEMU 7.2 recognises by
 * their first bytes (block/ *.c, each driver's bdrv_probe) for which vdisk
 * has no driver yet: vmdk.
 *
 * Why they exist: without them, probing falls back to raw for all of
 * these, so `vdisk info disk.vmdk` would call a VMDK "raw" and `vdisk
 * convert` would copy its header bytes as the guest's disk. Each entry
 * gives the format's name, a probe with QEMU's score and whether QEMU's
 * driver stores compressed clusters (convert -c asks); it has no open
 * callback, which tells the core (node.c) that the format is recognised
 * but cannot be opened, so opening, creating or naming it refuses with
 * "FILE: format 'vmdk' is not supported" (ENOTSUP) and never falls back
 * to raw. The probes also make the raw driver's sector-0 guard refuse a
 * guest write that would turn a probed raw image into one of these.
 *
 * When a real driver for one of these formats is written (as its own file
 * under src/drivers/), its probe moves there and the entry here is
 * deleted; drivers.c keeps referring to vd_driver_NAME.
 *
 * The probes follow QEMU 7.2 exactly, including its quirks: @buf is the
 * first 2048 bytes of the file, zero-padded (512 bytes for the raw guard),
 * and @filename may be NULL (the raw guard passes none). Scores: 100 for
 * a magic number, which beats raw's 1. Layouts: from QEMU's drivers
 * (block/vmdk.c).
 */
#include <stdint.h>
#include <string.h>

#include "core/block_int.h"

static bool has_magic(const uint8_t *buf, size_t len, const char *magic,
                      size_t mlen)
{
    return len >= mlen && memcmp(buf, magic, mlen) == 0;
}

/* ---- vmdk: "KDMV" (VMDK4 sparse), "COWD" (VMDK3), or a descriptor ---- */

/* A descriptor file is text: comment lines ('#'), lines of blanks, then
 * "version=1", "version=2" or "version=3" ending in LF or CRLF. Any other
 * line before it means not a descriptor. */
static bool vmdk_descriptor(const uint8_t *buf, size_t len)
{
    const char *p = (const char *)buf, *end = p + len;

    while (p < end) {
        if (*p == '#') {
            while (p < end && *p != '\n') {
                p++;
            }
            if (p < end) {
                p++;
            }
            continue;
        }
        if (*p == ' ') {
            while (p < end && *p == ' ') {
                p++;
            }
            if (p < end && *p == '\r') {
                p++;
            }
            if (p == end || *p != '\n') {
                return false;
            }
            p++;
            continue;
        }
        if (end - p >= 10 && memcmp(p, "version=", 8) == 0 &&
            p[8] >= '1' && p[8] <= '3') {
            return p[9] == '\n' ||
                   (end - p >= 11 && p[9] == '\r' && p[10] == '\n');
        }
        return false;
    }
    return false;
}

static int vmdk_probe(const uint8_t *buf, size_t len, const char *filename)
{
    (void)filename;
    if (len < 4) {
        return 0;
    }
    if (has_magic(buf, len, "KDMV", 4) || has_magic(buf, len, "COWD", 4)) {
        return 100;
    }
    return vmdk_descriptor(buf, len) ? 100 : 0;
}

/* ---- the entries: a name, a probe, and no open ---- */

/* @compressed: QEMU's driver writes compressed clusters (convert -c
 * accepts the format before finding vdisk cannot create it). */
#define PROBE_ONLY(sym, fmt, probe_fn, compressed) \
    const vd_driver sym = {                        \
        .name = fmt,                               \
        .is_format = true,                         \
        .supports_compressed = compressed,         \
        .probe = probe_fn,                         \
    }

PROBE_ONLY(vd_driver_vmdk, "vmdk", vmdk_probe, true);
