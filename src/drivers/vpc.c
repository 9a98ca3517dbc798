/*
 * The vpc driver: Connectix / Microsoft Virtual PC disk images (VHD), as
 * QEMU 7.2's block/vpc.c reads, writes and creates them.
 *
 * Layout (big-endian). Every VHD ends with a 512-byte footer ("conectix",
 * geometry, sizes, type, a one's-complement byte-sum checksum, a UUID). A
 * fixed disk is the guest's bytes followed by the footer. A dynamic (and
 * a differencing) disk starts with a copy of the footer, whose
 * data_offset points at a 1024-byte dynamic header ("cxsparse", the
 * block size, the BAT's offset and entry count); the BAT holds one
 * big-endian sector number per block (0xffffffff: unallocated), and each
 * allocated block is a sector bitmap followed by the block's data; the
 * footer copy closes the file after the last block.
 *
 * What QEMU does, and so vdisk:
 * - The footer at offset 0 makes a dynamic disk; else the footer at the
 *   end must say "conectix" and type 2 (a fixed disk). Reads and writes
 *   follow the footer's type field: type 2 (fixed) maps the disk 1:1
 *   onto the file, also for a footer copy at offset 0 that says so.
 * - A bad footer checksum refuses the image ("Incorrect header
 *   checksum"); the dynamic header's checksum is not checked.
 * - The virtual size is cylinders x heads x sectors of the footer's CHS
 *   geometry, except for images of the creators that use current_size
 *   ("win ", "qem2", "d2v ", "CTXS", "tap\0"), for the maximum geometry
 *   65535x16x255, or when the open option force_size_calc says so.
 * - The per-sector bitmaps are ignored when reading (an allocated block
 *   is read whole), and set to all ones when written.
 * - A differencing disk (type 4) is read as a dynamic disk of its own:
 *   QEMU 7.2 neither reads the parent locators nor opens a backing file,
 *   so the blocks it does not hold read as zeros (docs/formats.md).
 * - create: fixed or dynamic (2 MiB blocks), the size rounded up to the
 *   CHS grid unless force_size=on (creator "qem2" then, else "qemu").
 *
 * What vdisk adds for safety, where QEMU would damage the file: on a writable
 * open every allocated block must lie after the dynamic header and the
 * BAT and no two blocks may overlap; a write that would reach a fixed
 * disk's footer is refused.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "core/block_int.h"

#define VPC_FOOTER_SIZE 512
#define VPC_DYNHDR_SIZE 1024
#define VPC_TYPE_FIXED 2
#define VPC_TYPE_DYNAMIC 3
#define VPC_TYPE_DIFF 4
#define VPC_BAT_FREE 0xffffffffu
/* Seconds between the Unix epoch and 2000-01-01 00:00 UTC. */
#define VPC_TIME_BASE 946684800
/* QEMU's limits: 2040 GiB of sectors; the largest CHS geometry. */
#define VPC_MAX_SECTORS 0xff000000ull
#define VPC_MAX_GEOMETRY (65535ull * 16 * 255)
#define VPC_BLOCK_SIZE 0x200000u

/* Footer fields (offsets into the 512 bytes). */
enum {
    F_DATA_OFFSET = 16, F_TIMESTAMP = 24, F_APP = 28, F_CUR_SIZE = 48,
    F_CYLS = 56, F_HEADS = 58, F_SECS = 59, F_TYPE = 60, F_CHECKSUM = 64,
    F_UUID = 68,
};
/* Dynamic header fields. */
enum {
    H_TABLE_OFFSET = 16, H_MAX_ENTRIES = 28, H_BLOCK_SIZE = 32,
    H_CHECKSUM = 36,
};

typedef struct vpc_state {
    pthread_mutex_t lock;
    uint8_t footer[VPC_FOOTER_SIZE];
    bool fixed_io;             /* the footer's type says fixed */
    bool has_bat;              /* the footer was at offset 0 */
    uint64_t total_bytes;      /* the virtual size */
    uint64_t fixed_limit;      /* fixed_io: writes must end at or before */
    uint32_t block_size;       /* dynamic: power of two >= 512 */
    uint32_t bitmap_size;      /* sectors bitmap, rounded to 512 */
    uint32_t entries;
    uint32_t *bat;             /* host-endian sector numbers */
    uint64_t bat_offset;
    uint64_t free_offset;      /* where the next block goes (footer) */
    uint64_t last_bitmap;      /* bitmap already set to ones, or ~0 */
} vpc_state;

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
           (uint32_t)p[2] << 8 | p[3];
}

static uint64_t be64(const uint8_t *p)
{
    return (uint64_t)be32(p) << 32 | be32(p + 4);
}

static void put_be16(uint8_t *p, uint16_t v)
{
    p[0] = v >> 8;
    p[1] = (uint8_t)v;
}

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24;
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void put_be64(uint8_t *p, uint64_t v)
{
    put_be32(p, (uint32_t)(v >> 32));
    put_be32(p + 4, (uint32_t)v);
}

/* One's complement of the byte sum, with the checksum field counted as
 * zero (@ck: its offset). */
static uint32_t vpc_checksum(const uint8_t *buf, size_t len, size_t ck)
{
    uint32_t sum = 0;

    for (size_t i = 0; i < len; i++) {
        if (i < ck || i >= ck + 4) {
            sum += buf[i];
        }
    }
    return ~sum;
}

static int vpc_probe(const uint8_t *buf, size_t len, const char *filename)
{
    (void)filename;
    return len >= 8 && memcmp(buf, "conectix", 8) == 0 ? 100 : 0;
}

/* ---- geometry (QEMU's calculate_geometry) ---- */

/* The CHS geometry of the VHD specification's algorithm for @sectors
 * (capped at the largest geometry). */
static void vpc_geometry(uint64_t sectors, uint16_t *cyls, uint8_t *heads,
                         uint8_t *spt)
{
    uint32_t cth;

    if (sectors > VPC_MAX_GEOMETRY) {
        sectors = VPC_MAX_GEOMETRY;
    }
    if (sectors >= 65535ull * 16 * 63) {
        *spt = 255;
        *heads = 16;
        cth = (uint32_t)(sectors / 255);
    } else {
        uint32_t h;
        *spt = 17;
        cth = (uint32_t)(sectors / 17);
        h = (cth + 1023) / 1024;
        if (h < 4) {
            h = 4;
        }
        if (cth >= h * 1024 || h > 16) {
            *spt = 31;
            h = 16;
            cth = (uint32_t)(sectors / 31);
        }
        if (cth >= h * 1024) {
            *spt = 63;
            h = 16;
            cth = (uint32_t)(sectors / 63);
        }
        *heads = (uint8_t)h;
    }
    *cyls = (uint16_t)(cth / *heads);
}

/* The geometry and the sector count of a new image of @size bytes
 * (QEMU's calculate_rounded_image_size): the smallest geometry holding
 * at least @size, or the largest one with the exact size when the size
 * is past it or @force_size. Returns false past 2040 GiB. */
static bool vpc_rounded_size(uint64_t size, bool force_size, uint16_t *cyls,
                             uint8_t *heads, uint8_t *spt, uint64_t *sectors)
{
    uint16_t c = 0;
    uint8_t h = 0, s = 0;

    if (force_size) {
        c = 65535;
        h = 16;
        s = 255;
    } else {
        uint64_t want = size / 512;
        if (want > VPC_MAX_GEOMETRY) {
            want = VPC_MAX_GEOMETRY;
        }
        for (uint64_t i = 0; want > (uint64_t)c * h * s; i++) {
            vpc_geometry(want + i, &c, &h, &s);
        }
    }
    if ((uint64_t)c * h * s == VPC_MAX_GEOMETRY) {
        *sectors = size / 512;
        if (*sectors > VPC_MAX_SECTORS) {
            return false;
        }
    } else {
        *sectors = (uint64_t)c * h * s;
    }
    *cyls = c;
    *heads = h;
    *spt = s;
    return true;
}

/* ---- open ---- */

static int vpc_read_footer(vd_node *node, vpc_state *s, int64_t flen,
                           vd_error *err)
{
    int ret;

    memset(s->footer, 0, sizeof(s->footer));
    ret = vd_child_pread(node->file, 0, s->footer,
                         flen < VPC_FOOTER_SIZE ? (uint64_t)flen & ~511ull
                                                : VPC_FOOTER_SIZE, NULL);
    if (ret < 0) {
        return vd_error_set(err, ret, "Unable to read VHD header");
    }
    if (memcmp(s->footer, "conectix", 8) == 0) {
        s->has_bat = true;
        return 0;
    }
    if (flen < VPC_FOOTER_SIZE) {
        return vd_error_set(err, -EINVAL, "File too small for a VHD header");
    }
    /* A fixed disk keeps its footer only at the end. */
    ret = vd_child_pread(node->file, (uint64_t)flen - VPC_FOOTER_SIZE,
                         s->footer, VPC_FOOTER_SIZE, NULL);
    if (ret < 0) {
        return vd_error_set(err, ret, "Unable to read VHD header");
    }
    if (memcmp(s->footer, "conectix", 8) != 0 ||
        be32(s->footer + F_TYPE) != VPC_TYPE_FIXED) {
        return vd_error_set(err, -EINVAL, "invalid VPC image");
    }
    s->has_bat = false;
    return 0;
}

/* Whether the creator application is one that sizes the disk by the
 * footer's current_size rather than by its geometry (QEMU's table). */
static bool vpc_app_uses_size(const uint8_t *app)
{
    return !memcmp(app, "win ", 4) || !memcmp(app, "qem2", 4) ||
           !memcmp(app, "d2v ", 4) || !memcmp(app, "CTXS", 4) ||
           !memcmp(app, "tap\0", 4);
}

typedef struct vpc_range {
    uint64_t start, end;
    uint32_t index;            /* BAT index, or UINT32_MAX for metadata */
} vpc_range;

static int cmp_range(const void *a, const void *b)
{
    const vpc_range *x = a, *y = b;

    return x->start < y->start ? -1 : x->start > y->start;
}

/* Before the first write: every allocated block lies after the
 * metadata and apart from the others (a block on top of the BAT would
 * let a guest write rewrite the table). */
static int vpc_check_layout(vd_node *node, vpc_state *s, uint64_t hdr_off,
                            vd_error *err)
{
    uint64_t n = 2;
    vpc_range *r;
    int ret = 0;

    for (uint32_t i = 0; i < s->entries; i++) {
        n += s->bat[i] != VPC_BAT_FREE;
    }
    r = malloc(n * sizeof(*r));
    if (!r) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory",
                            node->filename);
    }
    n = 0;
    r[n++] = (vpc_range){ hdr_off, hdr_off + VPC_DYNHDR_SIZE, UINT32_MAX };
    r[n++] = (vpc_range){ s->bat_offset,
                          s->bat_offset + (uint64_t)s->entries * 4,
                          UINT32_MAX };
    for (uint32_t i = 0; i < s->entries; i++) {
        if (s->bat[i] != VPC_BAT_FREE) {
            uint64_t b = (uint64_t)s->bat[i] * 512;
            if (b < VPC_FOOTER_SIZE) {
                ret = vd_error_set(err, -EINVAL, "%s: BAT entry %" PRIu32
                                   " (offset 0x%" PRIx64 ") overlaps the "
                                   "footer copy", node->filename, i, b);
                goto out;
            }
            r[n++] = (vpc_range){ b, b + s->bitmap_size + s->block_size, i };
        }
    }
    qsort(r, n, sizeof(*r), cmp_range);
    for (uint64_t k = 1; k < n; k++) {
        if (r[k].start < r[k - 1].end) {
            const vpc_range *a = &r[k - 1], *b = &r[k];
            if (a->index == UINT32_MAX && b->index == UINT32_MAX) {
                ret = vd_error_set(err, -EINVAL, "%s: the BAT at 0x%" PRIx64
                                   " overlaps the dynamic header",
                                   node->filename, s->bat_offset);
            } else if (a->index == UINT32_MAX || b->index == UINT32_MAX) {
                const vpc_range *blk = a->index == UINT32_MAX ? b : a;
                ret = vd_error_set(err, -EINVAL, "%s: BAT entry %" PRIu32
                                   " (offset 0x%" PRIx64 ") overlaps the "
                                   "dynamic header or the BAT",
                                   node->filename, blk->index, blk->start);
            } else {
                ret = vd_error_set(err, -EINVAL, "%s: BAT entries %" PRIu32
                                   " and %" PRIu32 " overlap (offsets 0x%"
                                   PRIx64 " and 0x%" PRIx64 ")",
                                   node->filename, a->index, b->index,
                                   a->start, b->start);
            }
            goto out;
        }
    }
out:
    free(r);
    return ret;
}

static int vpc_open_dynamic(vd_node *node, vpc_state *s, int64_t flen,
                            bool writable, vd_error *err)
{
    uint8_t hdr[VPC_DYNHDR_SIZE];
    uint64_t hdr_off = be64(s->footer + F_DATA_OFFSET), bat_bytes, end;
    uint8_t *raw;
    int ret;

    memset(hdr, 0, sizeof(hdr));
    /* Past the end of the file the header reads as zeros (as QEMU's
     * file driver answers), so it has no magic. */
    if (hdr_off > VD_MAX_LENGTH - VPC_DYNHDR_SIZE) {
        return vd_error_set(err, -EIO, "Error reading dynamic VHD header");
    }
    if (hdr_off < (uint64_t)flen) {
        uint64_t n = (uint64_t)flen - hdr_off;
        ret = vd_child_pread(node->file, hdr_off, hdr,
                             n < sizeof(hdr) ? n : sizeof(hdr), NULL);
        if (ret < 0) {
            return vd_error_set(err, ret, "Error reading dynamic VHD header");
        }
    }
    if (memcmp(hdr, "cxsparse", 8) != 0) {
        return vd_error_set(err, -EINVAL, "Invalid header magic");
    }
    s->block_size = be32(hdr + H_BLOCK_SIZE);
    if (s->block_size < 512 || (s->block_size & (s->block_size - 1))) {
        return vd_error_set(err, -EINVAL, "Invalid block size %" PRIu32,
                            s->block_size);
    }
    s->bitmap_size = ((s->block_size / (8 * 512)) + 511) & ~511u;
    s->entries = be32(hdr + H_MAX_ENTRIES);
    if (s->total_bytes / s->block_size > 0xffffffffull) {
        return vd_error_set(err, -EINVAL, "Too many blocks");
    }
    if ((uint64_t)s->entries * s->block_size < s->total_bytes) {
        return vd_error_set(err, -EINVAL, "Page table too small");
    }
    if (s->entries > INT32_MAX / 4) {
        return vd_error_set(err, -EINVAL, "Max Table Entries too large (%"
                            PRId32 ")", (int32_t)s->entries);
    }
    bat_bytes = (uint64_t)s->entries * 4;
    s->bat_offset = be64(hdr + H_TABLE_OFFSET);
    /* A table reaching past the end of the file is refused before it
     * is read, which bounds its allocation by the file's size. QEMU
     * reads it (zeros past the end) and then refuses it the same way:
     * the first free offset is at least the table's end. */
    if (s->bat_offset > VD_MAX_LENGTH - bat_bytes) {
        return vd_error_set(err, -EIO, "Error reading pagetable");
    }
    if (s->bat_offset > (uint64_t)flen ||
        bat_bytes > (uint64_t)flen - s->bat_offset ||
        ((s->bat_offset + bat_bytes + 511) & ~511ull) > (uint64_t)flen) {
        return vd_error_set(err, -EINVAL, "block-vpc: free_data_block_offset "
                            "points after the end of file. The image has "
                            "been truncated.");
    }
    raw = malloc(bat_bytes ? bat_bytes : 1);
    s->bat = malloc(bat_bytes ? bat_bytes : 1);
    if (!raw || !s->bat) {
        free(raw);
        return vd_error_set(err, -ENOMEM, "Unable to allocate memory for "
                            "page table");
    }
    if (bat_bytes) {
        ret = vd_child_pread(node->file, s->bat_offset, raw, bat_bytes,
                             NULL);
        if (ret < 0) {
            free(raw);
            return vd_error_set(err, ret, "Error reading pagetable");
        }
    }
    end = (s->bat_offset + bat_bytes + 511) & ~511ull;
    for (uint32_t i = 0; i < s->entries; i++) {
        s->bat[i] = be32(raw + 4 * (uint64_t)i);
        if (s->bat[i] != VPC_BAT_FREE) {
            uint64_t next = (uint64_t)s->bat[i] * 512 + s->bitmap_size +
                            s->block_size;
            if (next > end) {
                end = next;
            }
        }
    }
    free(raw);
    s->free_offset = end;
    if (s->free_offset > (uint64_t)flen) {
        return vd_error_set(err, -EINVAL, "block-vpc: free_data_block_offset "
                            "points after the end of file. The image has "
                            "been truncated.");
    }
    s->last_bitmap = UINT64_MAX;
    if (writable) {
        return vpc_check_layout(node, s, hdr_off, err);
    }
    return 0;
}

static int vpc_open(vd_node *node, vd_opts *opts, unsigned flags,
                    vd_error *err)
{
    vpc_state *s = node->opaque;
    bool force_chs = false, force_sz = false;
    uint32_t ck;
    uint64_t sectors;
    int64_t flen;
    char *calc;
    int ret;

    calc = vd_opts_take(opts, "force_size_calc");
    if (calc) {
        if (!strcmp(calc, "current_size")) {
            force_sz = true;
        } else if (!strcmp(calc, "chs")) {
            force_chs = true;
        } else {
            ret = vd_error_set(err, -EINVAL, "Invalid size calculation mode: "
                               "'%s'", calc);
            free(calc);
            return ret;
        }
        free(calc);
    }
    pthread_mutex_init(&s->lock, NULL);
    flen = vd_node_getlength(node->file->node);
    if (flen < 0) {
        return vd_error_set_errno(err, (int)flen, "Invalid file size");
    }
    ret = vpc_read_footer(node, s, flen, err);
    if (ret < 0) {
        return ret;
    }
    ck = be32(s->footer + F_CHECKSUM);
    if (vpc_checksum(s->footer, VPC_FOOTER_SIZE, F_CHECKSUM) != ck) {
        return vd_error_set(err, -EINVAL, "Incorrect header checksum");
    }
    /* Virtual PC sizes the disk by its geometry; Hyper-V and others by
     * current_size, and so does everyone for the largest geometry. */
    sectors = (uint64_t)(s->footer[F_CYLS] << 8 | s->footer[F_CYLS + 1]) *
              s->footer[F_HEADS] * s->footer[F_SECS];
    if ((vpc_app_uses_size(s->footer + F_APP) && !force_chs) ||
        sectors == VPC_MAX_GEOMETRY || force_sz) {
        sectors = be64(s->footer + F_CUR_SIZE) / 512;
    }
    if (sectors > VPC_MAX_SECTORS) {
        /* QEMU sets no message: its block layer says what failed. */
        return vd_error_set(err, -EFBIG, "Could not open '%s': %s",
                            node->filename, strerror(EFBIG));
    }
    s->total_bytes = sectors * 512;
    s->fixed_io = be32(s->footer + F_TYPE) == VPC_TYPE_FIXED;
    if (s->has_bat) {
        ret = vpc_open_dynamic(node, s, flen, flags & VD_NODE_RDWR, err);
        if (ret < 0) {
            free(s->bat);
            s->bat = NULL;
            return ret;
        }
    }
    /* A fixed disk's data ends where its footer starts; a footer copy
     * at offset 0 that claims a fixed disk leaves no room at all. */
    s->fixed_limit = s->has_bat ? 0 : (uint64_t)flen - VPC_FOOTER_SIZE;
    node->bl.request_alignment = 512;
    return 0;
}

static void vpc_close(vd_node *node)
{
    vpc_state *s = node->opaque;

    free(s->bat);
    s->bat = NULL;
    pthread_mutex_destroy(&s->lock);
}

static int64_t vpc_getlength(vd_node *node)
{
    vpc_state *s = node->opaque;

    return (int64_t)s->total_bytes;
}

/* ---- I/O ---- */

/* The file offset of guest byte @off, or UINT64_MAX when its block is
 * not allocated. */
static uint64_t vpc_map(vpc_state *s, uint64_t off)
{
    uint64_t idx = off / s->block_size;

    if (idx >= s->entries || s->bat[idx] == VPC_BAT_FREE) {
        return UINT64_MAX;
    }
    return (uint64_t)s->bat[idx] * 512 + s->bitmap_size +
           off % s->block_size;
}

static int vpc_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                      vd_iov *qiov, unsigned flags, vd_error *err)
{
    vpc_state *s = node->opaque;
    uint64_t done = 0;
    int ret = 0;

    if (s->fixed_io) {
        return vd_child_preadv(node->file, off, bytes, qiov, flags, err);
    }
    while (done < bytes) {
        uint64_t o = off + done, host, n;
        n = s->block_size ? s->block_size - o % s->block_size : bytes - done;
        if (n > bytes - done) {
            n = bytes - done;
        }
        /* The table changes under the lock (allocations): a block
         * allocated after the lookup was zeros before it. */
        pthread_mutex_lock(&s->lock);
        host = s->block_size ? vpc_map(s, o) : UINT64_MAX;
        pthread_mutex_unlock(&s->lock);
        if (host == UINT64_MAX) {
            vd_iov_memset(qiov, done, 0, n);
        } else {
            vd_iov part;
            ret = vd_iov_init_slice(&part, qiov, done, n);
            if (ret < 0) {
                return vd_error_set(err, ret, "%s: out of memory",
                                    node->filename);
            }
            ret = vd_child_preadv(node->file, host, n, &part, 0, err);
            vd_iov_destroy(&part);
            if (ret < 0) {
                return ret;
            }
        }
        done += n;
    }
    return 0;
}

static int vpc_write_bitmap(vd_node *node, vpc_state *s, uint64_t at,
                            vd_error *err)
{
    uint8_t *bm = malloc(s->bitmap_size);
    int ret;

    if (!bm) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory",
                            node->filename);
    }
    memset(bm, 0xff, s->bitmap_size);
    ret = vd_child_pwrite(node->file, at, bm, s->bitmap_size, 0, err);
    free(bm);
    return ret;
}

/* Allocates the block of guest byte @off at the end of the file, as
 * QEMU's alloc_block: its bitmap (all ones), the footer after it, then
 * the BAT entry, the file flushed before the entry so that a BAT entry
 * on disk never points past the file's footer. Lock held. */
static int vpc_alloc(vd_node *node, vpc_state *s, uint64_t off,
                     vd_error *err)
{
    uint64_t idx = off / s->block_size, start = s->free_offset;
    uint64_t next = start + s->bitmap_size + s->block_size;
    uint8_t be[4];
    int ret;

    if (start % 512 || start / 512 >= VPC_BAT_FREE) {
        return vd_error_set(err, -EFBIG, "%s: no room for a new block at "
                            "0x%" PRIx64, node->filename, start);
    }
    ret = vpc_write_bitmap(node, s, start, err);
    if (ret < 0) {
        return ret;
    }
    ret = vd_child_pwrite(node->file, next, s->footer, VPC_FOOTER_SIZE, 0,
                          err);
    if (ret == 0) {
        ret = vd_node_flush(node->file->node, err);
    }
    if (ret < 0) {
        return ret;
    }
    put_be32(be, (uint32_t)(start / 512));
    ret = vd_child_pwrite(node->file, s->bat_offset + 4 * idx, be, 4, 0, err);
    if (ret < 0) {
        return ret;
    }
    s->bat[idx] = (uint32_t)(start / 512);
    s->free_offset = next;
    s->last_bitmap = start;
    return 0;
}

static int vpc_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                       vd_iov *qiov, unsigned flags, vd_error *err)
{
    vpc_state *s = node->opaque;
    uint64_t done = 0;
    int ret = 0;

    if (s->fixed_io) {
        if (off + bytes > s->fixed_limit) {
            return vd_error_set(err, -EIO, "%s: refusing a write at 0x%" PRIx64
                                " that would overwrite the VHD metadata",
                                node->filename, off);
        }
        return vd_child_pwritev(node->file, off, bytes, qiov, flags, err);
    }
    pthread_mutex_lock(&s->lock);
    while (done < bytes) {
        uint64_t o = off + done, host, n;
        vd_iov part;
        n = s->block_size - o % s->block_size;
        if (n > bytes - done) {
            n = bytes - done;
        }
        if (o / s->block_size >= s->entries) {
            ret = vd_error_set(err, -EIO, "%s: write at 0x%" PRIx64 " is "
                               "past the block table", node->filename, o);
            break;
        }
        host = vpc_map(s, o);
        if (host == UINT64_MAX) {
            ret = vpc_alloc(node, s, o, err);
            if (ret < 0) {
                break;
            }
            host = vpc_map(s, o);
        } else {
            uint64_t bm = host - o % s->block_size - s->bitmap_size;
            if (bm != s->last_bitmap) {
                /* A block another tool wrote may have clear bits: QEMU
                 * sets them all before writing into it. */
                ret = vpc_write_bitmap(node, s, bm, err);
                if (ret < 0) {
                    break;
                }
                s->last_bitmap = bm;
            }
        }
        ret = vd_iov_init_slice(&part, qiov, done, n);
        if (ret < 0) {
            vd_error_set(err, ret, "%s: out of memory", node->filename);
            break;
        }
        ret = vd_child_pwritev(node->file, host, n, &part, flags, err);
        vd_iov_destroy(&part);
        if (ret < 0) {
            break;
        }
        done += n;
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

static int vpc_block_status(vd_node *node, bool want_zero, uint64_t off,
                            uint64_t bytes, uint64_t *pnum, uint64_t *map,
                            vd_node **file, vd_error *err)
{
    vpc_state *s = node->opaque;
    uint64_t n = 0;

    (void)want_zero;
    (void)err;
    if (s->fixed_io) {
        *pnum = bytes;
        *map = off;
        *file = node->file->node;
        return VD_BLOCK_DATA | VD_BLOCK_OFFSET_VALID | VD_BLOCK_RECURSE;
    }
    if (!s->block_size) {
        *pnum = bytes;
        return VD_BLOCK_ZERO;
    }
    pthread_mutex_lock(&s->lock);
    {
        uint64_t host = vpc_map(s, off);
        if (host != UINT64_MAX) {
            n = s->block_size - off % s->block_size;
            *pnum = n < bytes ? n : bytes;
            *map = host;
            *file = node->file->node;
            pthread_mutex_unlock(&s->lock);
            return VD_BLOCK_DATA | VD_BLOCK_OFFSET_VALID;
        }
        /* Unallocated blocks in a row read as zeros. */
        while (n < bytes && vpc_map(s, off + n) == UINT64_MAX) {
            n += s->block_size - (off + n) % s->block_size;
        }
    }
    pthread_mutex_unlock(&s->lock);
    *pnum = n < bytes ? n : bytes;
    return VD_BLOCK_ZERO;
}

static int vpc_get_info(vd_node *node, vd_image_info *info, vd_error *err)
{
    vpc_state *s = node->opaque;

    (void)err;
    if (be32(s->footer + F_TYPE) != VPC_TYPE_FIXED) {
        info->cluster_size = s->block_size;
    }
    info->has_dirty_flag = true;
    info->dirty_flag = false;
    return 0;
}

/* QEMU's vpc has no truncate: qemu-img resize refuses with the block
 * layer's words. */
static int vpc_truncate(vd_node *node, uint64_t size, bool exact,
                        vd_prealloc prealloc, vd_error *err)
{
    (void)node;
    (void)size;
    (void)exact;
    (void)prealloc;
    return vd_error_set(err, -ENOTSUP, "Image format driver does not "
                        "support resize");
}

/* ---- create ---- */

static const vd_create_option vpc_create_opts[] = {
    { "size", "size", "Virtual disk size", NULL },
    { "subformat", "string", "Type of virtual hard disk format. Supported "
      "formats are {dynamic (default) | fixed} ", NULL },
    { "force_size", "bool", "Force disk size calculation to use the actual "
      "size specified, rather than using the nearest CHS-based calculation",
      NULL },
    { NULL, NULL, NULL, NULL },
};

/* The footer of a new image (QEMU's vpc_co_create). */
static void vpc_make_footer(uint8_t *f, uint64_t size, bool fixed,
                            bool force_size, uint16_t cyls, uint8_t heads,
                            uint8_t spt)
{
    uint8_t uuid[16];
    size_t got = 0;

    memset(f, 0, VPC_FOOTER_SIZE);
    memcpy(f, "conectix", 8);
    put_be32(f + 8, 2);                    /* features: reserved bit */
    put_be32(f + 12, 0x00010000);          /* version 1.0 */
    put_be64(f + F_DATA_OFFSET, fixed ? UINT64_MAX : VPC_FOOTER_SIZE);
    put_be32(f + F_TIMESTAMP, (uint32_t)(time(NULL) - VPC_TIME_BASE));
    memcpy(f + F_APP, force_size ? "qem2" : "qemu", 4);
    put_be16(f + 32, 5);                   /* Virtual PC 2007's version */
    put_be16(f + 34, 3);
    memcpy(f + 36, "Wi2k", 4);
    put_be64(f + 40, size);                /* original size */
    put_be64(f + F_CUR_SIZE, size);
    put_be16(f + F_CYLS, cyls);
    f[F_HEADS] = heads;
    f[F_SECS] = spt;
    put_be32(f + F_TYPE, fixed ? VPC_TYPE_FIXED : VPC_TYPE_DYNAMIC);
    /* A random (version 4) UUID, as qemu_uuid_generate(). */
    while (got < sizeof(uuid)) {
        ssize_t r = getrandom(uuid + got, sizeof(uuid) - got, 0);
        if (r <= 0) {
            for (; got < sizeof(uuid); got++) {
                uuid[got] = (uint8_t)rand();
            }
            break;
        }
        got += (size_t)r;
    }
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    memcpy(f + F_UUID, uuid, 16);
    put_be32(f + F_CHECKSUM, vpc_checksum(f, VPC_FOOTER_SIZE, F_CHECKSUM));
}

/* A dynamic disk's first bytes (QEMU's create_dynamic_disk): footer
 * copy, dynamic header, the BAT (all free) from sector 3, the footer. */
static int vpc_write_dynamic(vd_node *file, const uint8_t *footer,
                             uint64_t sectors, vd_error *err)
{
    uint64_t entries = (sectors + VPC_BLOCK_SIZE / 512 - 1) /
                       (VPC_BLOCK_SIZE / 512);
    uint64_t bat_bytes = (entries * 4 + 511) & ~511ull;
    uint64_t len = 1536 + bat_bytes + VPC_FOOTER_SIZE;
    uint8_t *buf = calloc(1, len), *h;
    vd_iov v;
    int ret;

    if (!buf) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    memcpy(buf, footer, VPC_FOOTER_SIZE);
    h = buf + VPC_FOOTER_SIZE;
    memcpy(h, "cxsparse", 8);
    /* All 64 bits set: the specification says 0xffffffff, Microsoft's
     * tools want this. */
    put_be64(h + 8, UINT64_MAX);
    put_be64(h + H_TABLE_OFFSET, 1536);
    put_be32(h + 24, 0x00010000);
    put_be32(h + H_MAX_ENTRIES, (uint32_t)entries);
    put_be32(h + H_BLOCK_SIZE, VPC_BLOCK_SIZE);
    put_be32(h + H_CHECKSUM, vpc_checksum(h, VPC_DYNHDR_SIZE, H_CHECKSUM));
    memset(buf + 1536, 0xff, bat_bytes);
    memcpy(buf + 1536 + bat_bytes, footer, VPC_FOOTER_SIZE);
    vd_iov_init_buf(&v, buf, len);
    ret = vd_node_pwritev(file, 0, len, &v, 0, err);
    free(buf);
    return ret;
}

static int vpc_create(const char *filename, vd_opts *opts, vd_error *err)
{
    uint64_t size = 0, sectors;
    bool force_size = false, fixed = false;
    uint16_t cyls;
    uint8_t heads, spt, footer[VPC_FOOTER_SIZE];
    vd_opts *popts = NULL;
    vd_node *file = NULL;
    char *v;
    int ret;

    v = vd_opts_take(opts, "size");
    if (!v) {
        return vd_error_set(err, -EINVAL, "%s: Image creation needs a size "
                            "parameter", filename);
    }
    ret = vd_parse_size(v, &size);
    if (ret < 0) {
        if (ret == -ERANGE) {
            vd_error_set(err, -EINVAL, "%s: Value '%s' is out of range for "
                         "parameter 'size'", filename, v);
        } else {
            vd_error_set(err, -EINVAL, "%s: Parameter 'size' expects a "
                         "non-negative number below 2^64", filename);
        }
        free(v);
        return -EINVAL;
    }
    free(v);
    size = (size + 511) & ~511ull;
    ret = vd_opts_take_bool(opts, "force_size", false, &force_size, err);
    if (ret < 0) {
        return ret;
    }

    /* The protocol file, empty (its options are what is left). */
    v = vd_opts_take(opts, "subformat");
    popts = vd_opts_clone(opts);
    if (!popts) {
        free(v);
        return vd_error_set(err, -ENOMEM, "%s: out of memory", filename);
    }
    vd_opts_set(popts, "size", "0");
    ret = vd_create_protocol(filename, popts, err);
    vd_opts_free(&popts);
    if (ret < 0) {
        free(v);
        return ret;
    }
    for (const char *k = vd_opts_first_key(opts); k;
         k = vd_opts_first_key(opts)) {
        vd_opts_del(opts, k);
    }
    /* QEMU's visitor reads the subformat once the file exists. */
    if (v) {
        if (!strcmp(v, "fixed")) {
            fixed = true;
        } else if (strcmp(v, "dynamic") != 0) {
            vd_error_set(err, -EINVAL, "%s: Parameter 'subformat' does not "
                         "accept value '%s'", filename, v);
            free(v);
            return -EINVAL;
        }
        free(v);
    }

    /* QEMU rounds the size up to the geometry silently, then checks the
     * rounded size against the limit. */
    if (!vpc_rounded_size(size, force_size, &cyls, &heads, &spt, &sectors)) {
        return vd_error_set(err, -EFBIG, "%s: The image size is too large "
                            "for file format 'vpc'", filename);
    }
    if (!force_size) {
        size = sectors * 512;
    }
    vpc_make_footer(footer, size, fixed, force_size, cyls, heads, spt);

    ret = vd_open_protocol(&file, filename, VD_NODE_RDWR, err);
    if (ret < 0) {
        return ret;
    }
    if (fixed) {
        ret = vd_node_truncate(file, size + VPC_FOOTER_SIZE, false,
                               VD_PREALLOC_OFF, err);
        if (ret == 0) {
            vd_iov v;
            vd_iov_init_buf(&v, footer, VPC_FOOTER_SIZE);
            ret = vd_node_pwritev(file, size, VPC_FOOTER_SIZE, &v, 0, err);
            if (ret < 0) {
                vd_error_prepend(err, "%s: Unable to write VHD header: ",
                                 filename);
            }
        }
    } else {
        ret = vpc_write_dynamic(file, footer, sectors, err);
        if (ret < 0) {
            vd_error_prepend(err, "%s: Unable to create or write VHD header: ",
                             filename);
        }
    }
    vd_node_unref(file);
    return ret;
}

const vd_driver vd_driver_vpc = {
    .name = "vpc",
    .instance_size = sizeof(vpc_state),
    .is_format = true,
    .create_opts = vpc_create_opts,
    .probe = vpc_probe,
    .open = vpc_open,
    .close = vpc_close,
    .create = vpc_create,
    .preadv = vpc_preadv,
    .pwritev = vpc_pwritev,
    .block_status = vpc_block_status,
    .getlength = vpc_getlength,
    .get_info = vpc_get_info,
    .truncate = vpc_truncate,
};
