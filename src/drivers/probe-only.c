/*
 * Probe-only format entries: the image formats QEMU 7.2 recognises by
 * their first bytes (block/ *.c, each driver's bdrv_probe) for which vdisk
 * has no driver yet: vhdx, luks, dmg, cloop and bochs.
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
 * and @filename may be NULL (the raw guard passes none, so dmg, which QEMU
 * recognises only by its ".dmg" suffix, never blocks a write). Scores:
 * 100 for a magic number, 2 for the weak guesses (dmg's suffix, cloop's
 * shell-script header), so that they beat raw's 1 and nothing else.
 * Layouts: from QEMU's drivers (block/vhdx.c, crypto/block-luks.c,
 * dmg.c, cloop.c, bochs.c).
 */
#include <stdint.h>
#include <string.h>

#include "core/block_int.h"

static uint32_t rd_le32(const uint8_t *p)
{
    return (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 |
           (uint32_t)p[1] << 8 | p[0];
}

static bool has_magic(const uint8_t *buf, size_t len, const char *magic,
                      size_t mlen)
{
    return len >= mlen && memcmp(buf, magic, mlen) == 0;
}

/* ---- vhdx: file type identifier "vhdxfile" ---- */

static int vhdx_probe(const uint8_t *buf, size_t len, const char *filename)
{
    (void)filename;
    return has_magic(buf, len, "vhdxfile", 8) ? 100 : 0;
}

/* ---- luks: "LUKS\xba\xbe" and version 1 (BE16); LUKS2 is not probed ---- */

static int luks_probe(const uint8_t *buf, size_t len, const char *filename)
{
    (void)filename;
    return len >= 8 && has_magic(buf, len, "LUKS\xba\xbe", 6) &&
           buf[6] == 0 && buf[7] == 1 ? 100 : 0;
}

/* ---- dmg: the UDIF trailer is at the end of the file, so QEMU goes by
 * the name alone: anything called *.dmg that nothing else claims ---- */

static int dmg_probe(const uint8_t *buf, size_t len, const char *filename)
{
    size_t n;

    (void)buf;
    (void)len;
    if (!filename) {
        return 0;
    }
    n = strlen(filename);
    return n > 4 && strcmp(filename + n - 4, ".dmg") == 0 ? 2 : 0;
}

/* ---- cloop: the V2.0 shell-script header; QEMU compares as much of it
 * as the buffer holds ---- */

static int cloop_probe(const uint8_t *buf, size_t len, const char *filename)
{
    static const char magic[] =
        "#!/bin/sh\n"
        "#V2.0 Format\n"
        "modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
    size_t n = sizeof(magic) - 1;

    (void)filename;
    if (n > len) {
        n = len;
    }
    return memcmp(buf, magic, n) == 0 ? 2 : 0;
}

/* ---- bochs: NUL-terminated strings in fixed fields (magic[32],
 * type[16], subtype[16]) of a growing redolog, version 1 or 2 ---- */

static bool field_is(const uint8_t *field, size_t size, const char *s)
{
    size_t n = strlen(s);

    return n < size && memcmp(field, s, n + 1) == 0;
}

static int bochs_probe(const uint8_t *buf, size_t len, const char *filename)
{
    uint32_t version;

    (void)filename;
    if (len < 512) {
        return 0;
    }
    version = rd_le32(buf + 64);
    if (field_is(buf, 32, "Bochs Virtual HD Image") &&
        field_is(buf + 32, 16, "Redolog") &&
        field_is(buf + 48, 16, "Growing") &&
        (version == 0x00020000 || version == 0x00010000)) {
        return 100;
    }
    return 0;
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

PROBE_ONLY(vd_driver_vhdx, "vhdx", vhdx_probe, false);
PROBE_ONLY(vd_driver_luks, "luks", luks_probe, false);
PROBE_ONLY(vd_driver_dmg, "dmg", dmg_probe, false);
PROBE_ONLY(vd_driver_cloop, "cloop", cloop_probe, false);
PROBE_ONLY(vd_driver_bochs, "bochs", bochs_probe, false);
