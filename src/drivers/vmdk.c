/*
 * The vmdk driver: VMware's virtual disk format as QEMU 7.2's
 * block/vmdk.c reads, writes and creates it.
 *
 * An image is a list of extents laid end to end. Either the image file
 * is itself one hosted sparse extent ("KDMV" header, version 1 to 3,
 * with a text descriptor embedded at sector 1: monolithicSparse and
 * streamOptimized), or it is a text descriptor file ("# Disk
 * DescriptorFile") whose "RW SECTORS TYPE "NAME" [OFFSET]" lines name
 * the extent files, opened relative to the descriptor's directory (as
 * QEMU: absolute names and ".." are taken as they are): FLAT and VMFS
 * extents are raw data at an offset, SPARSE and VMFSSPARSE extents are
 * hosted sparse files of their own (or old "COWD" VMDK3 files).
 *
 * A hosted sparse extent (little-endian): a grain directory (GD) of
 * 32-bit sector numbers of grain tables (GT), each GT holding
 * num_gtes_per_gt 32-bit sector numbers of grains (clusters of
 * `granularity` sectors); 0 is unallocated, 1 is a zeroed grain when
 * the ZERO_GRAIN flag is set. A redundant GD (RGD flag) points at a
 * second copy of every GT, which writes keep in step. streamOptimized
 * extents store each grain deflated (zlib) behind a 12-byte marker
 * (LBA, size); writes only ever append grains. VMware's own stream
 * images put the GD at the end ("GD at end" header, footer 1536 bytes
 * before EOF), which is read as QEMU does.
 *
 * What QEMU does, and so vdisk: the CID and parentCID are read from the
 * descriptor (at sector 1 of a sparse file, offset 0 of a descriptor
 * file); parentFileNameHint names the backing file, whose format is
 * "vmdk"; reads of unallocated grains go to the backing file only when
 * its CID matches parentCID; the first write of an open rewrites the
 * CID with a random one; new grains are appended at the end of the
 * extent file, the grain written before its GT entries (GT, then the
 * redundant GT).
 *
 * seSparse (ESXi's space-efficient sparse, SESPARSE extents of a
 * descriptor, read only as in QEMU): a 512-byte const header at sector 0
 * (64-bit fields: magic 0xcafebabe, version 2.1, grain size 8 sectors,
 * grain tables of 64 sectors, the offsets and sizes in sectors of the
 * volatile header, journal, grain directory, grain tables, free bitmap,
 * backmap and grains) and a volatile header (magic 0xcafecafe, the
 * replay-journal flag). The GD and GTs hold 64-bit entries: a GD entry
 * is 0 or 0x10000000 in its top half over the index of its GT in the
 * grain tables area; a GT entry's top nibble is its kind (0 unallocated,
 * the whole entry 0; 1 unmapped and 2 zeroed, both read as zeros; 3
 * allocated, the grain's index in the grains area split as its low 12
 * bits in bits 48..59 and the rest in bits 0..47). Only QEMU's strict
 * values are accepted (its "format not officially documented" checks).
 *
 * What vdisk adds for safety, where QEMU reads zeros or damages the
 * file: a GD or GT reaching past the end of its file is refused at open
 * (which also bounds the tables' allocation by the file's size); before
 * the first write, the GDs, GTs and descriptor may not overlap, every
 * allocated GT needs its redundant copy, and a GT loaded for a write
 * may not point a grain into metadata. The descriptor is read up to
 * 1 MiB as QEMU; extents are at most VMDK_MAX_EXTENTS.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>
#include <zlib.h>

#include "core/block_int.h"

#define SECTOR ((uint64_t)512)
#define VMDK4_FLAG_NL_DETECT (1u << 0)
#define VMDK4_FLAG_RGD (1u << 1)
#define VMDK4_FLAG_ZERO_GRAIN (1u << 2)
#define VMDK4_FLAG_COMPRESS (1u << 16)
#define VMDK4_FLAG_MARKER (1u << 17)
#define VMDK4_GD_AT_END 0xffffffffffffffffull
#define VMDK_GTE_ZEROED 1u
#define VMDK_MARKER_EOS 0
#define VMDK_MARKER_FOOTER 3
/* QEMU's descriptor area (DESC_SIZE: 20 sectors) and descriptor read
 * limit (1 MiB - 1). */
#define VMDK_DESC_SIZE (20 * 512)
#define VMDK_DESC_MAX ((1u << 20) - 1)
#define VMDK_MAX_GRAIN_SECTORS 0x200000ull
#define VMDK_MAX_L1 (32u * 1024 * 1024)
#define VMDK_MAX_EXTENTS 4096
#define VMDK_GT_CACHE 16
#define VMDK_EXTENT_MAX_SECTORS (1ull << 32)
#define VMDK_MARKER_BYTES 12
#define SESPARSE_CONST_MAGIC 0xcafebabeull
#define SESPARSE_VOLATILE_MAGIC 0xcafecafeull
#define SESPARSE_VERSION 0x0000000200000001ull
#define SESPARSE_GRAIN_SECTORS 8
#define SESPARSE_GT_SECTORS 64

extern const vd_driver vd_driver_vmdk;

typedef struct vmdk_gt_cache {
    uint64_t off;              /* GT's byte offset, 0 = empty slot */
    uint32_t *gt;              /* host-endian entries */
    uint64_t *gt64;            /* seSparse: host-endian 64-bit entries */
    uint32_t uses;
} vmdk_gt_cache;

typedef struct vmdk_extent {
    vd_child *file;
    bool flat, compressed, has_marker, has_zero_grain, sesparse;
    char *type;                /* descriptor's type word, NULL for the
                                  image's own sparse extent */
    uint32_t version;
    uint64_t sectors, end_sector;
    uint64_t flat_start;       /* bytes */
    uint64_t gd_offset, rgd_offset;    /* bytes; rgd 0: none */
    uint64_t desc_offset, desc_size;   /* sparse: bytes of the embedded
                                          descriptor (metadata) */
    uint64_t grain_offset;     /* bytes: first data */
    uint32_t l1_size, l2_size;
    uint64_t grain_sectors, l1_entry_sectors;
    uint32_t *gd, *rgd;
    uint64_t *gd64;            /* seSparse: the GD's 64-bit entries */
    uint64_t se_gt_sector;     /* seSparse: the grain tables area */
    uint64_t se_grain_sector;  /* seSparse: the grains area */
    uint64_t next_sector;      /* where the next grain goes */
    vmdk_gt_cache cache[VMDK_GT_CACHE];
    /* Writable opens: sorted metadata ranges of the extent's file. */
    uint64_t (*meta)[2];
    size_t n_meta;
} vmdk_extent;

typedef struct vmdk_state {
    pthread_mutex_t lock;
    vd_node *node;
    const char *filename;
    vmdk_extent *extents;
    int n_extents;
    char *create_type;
    uint32_t cid, parent_cid;
    uint64_t desc_offset;      /* where CID lives in node->file */
    uint64_t total_sectors;
    bool cid_updated, cid_checked;
    uint32_t cache_clock;
} vmdk_state;

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 |
           (uint32_t)p[1] << 8 | p[0];
}

static uint64_t le64(const uint8_t *p)
{
    return (uint64_t)le32(p + 4) << 32 | le32(p);
}

static void put_le16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put_le32(uint8_t *p, uint32_t v)
{
    put_le16(p, (uint16_t)v);
    put_le16(p + 2, (uint16_t)(v >> 16));
}

static void put_le64(uint8_t *p, uint64_t v)
{
    put_le32(p, (uint32_t)v);
    put_le32(p + 4, (uint32_t)(v >> 32));
}

static uint32_t random32(void)
{
    uint32_t v = 0;

    if (getrandom(&v, sizeof(v), 0) != sizeof(v)) {
        v = (uint32_t)rand() ^ ((uint32_t)rand() << 16);
    }
    return v;
}

/* ---- probe (QEMU's vmdk_probe) ---- */

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
    if (!memcmp(buf, "KDMV", 4) || !memcmp(buf, "COWD", 4)) {
        return 100;
    }
    return vmdk_descriptor(buf, len) ? 100 : 0;
}

/* ---- descriptor text ---- */

/* The text of @c from @off, at most VMDK_DESC_MAX bytes (the file's
 * length bounds it), NUL-terminated; QEMU's vmdk_read_desc(). */
static char *read_desc(vd_child *c, uint64_t off, vd_error *err)
{
    int64_t len = vd_node_getlength(c->node);
    uint64_t n;
    char *buf;
    int ret;

    if (len < 0) {
        vd_error_set(err, (int)len, "Could not read from file");
        return NULL;
    }
    if (len < 4) {
        vd_error_set(err, -EINVAL, "File is too small, not a valid image");
        return NULL;
    }
    n = (uint64_t)len < VMDK_DESC_MAX ? (uint64_t)len : VMDK_DESC_MAX;
    buf = calloc(1, n + 1);
    if (!buf) {
        vd_error_set(err, -ENOMEM, "out of memory");
        return NULL;
    }
    if (off < (uint64_t)len) {
        uint64_t avail = (uint64_t)len - off;
        ret = vd_child_pread(c, off, buf, avail < n ? avail : n, NULL);
        if (ret < 0) {
            free(buf);
            vd_error_set(err, ret, "Could not read from file");
            return NULL;
        }
    }
    return buf;
}

/* The quoted value of @name ("name=\"value\""), QEMU's
 * vmdk_parse_description: the first occurrence of the name anywhere. */
static bool desc_value(const char *desc, const char *name, char *buf,
                       size_t size)
{
    const char *end = desc + strlen(desc), *p = strstr(desc, name), *q;

    if (!p) {
        return false;
    }
    p += strlen(name) + 2;
    if (p >= end) {
        return false;
    }
    for (q = p; q < end && *q != '"'; q++) {
    }
    if (q == end || size < (size_t)(q - p) + 1) {
        return false;
    }
    memcpy(buf, p, (size_t)(q - p));
    buf[q - p] = '\0';
    return true;
}

/* CID or parentCID (hexadecimal) from the first DESC_SIZE bytes at
 * s->desc_offset, as QEMU's vmdk_read_cid. */
static int read_cid(vd_child *file, uint64_t desc_off, bool parent,
                    uint32_t *out)
{
    const char *key = parent ? "parentCID" : "CID";
    char desc[VMDK_DESC_SIZE];
    unsigned int v;
    int64_t len = vd_node_getlength(file->node);
    const char *p;
    int ret;

    memset(desc, 0, sizeof(desc));
    if (len > 0 && desc_off < (uint64_t)len) {
        uint64_t n = (uint64_t)len - desc_off;
        ret = vd_child_pread(file, desc_off, desc,
                             n < sizeof(desc) ? n : sizeof(desc), NULL);
        if (ret < 0) {
            return ret;
        }
    }
    desc[sizeof(desc) - 1] = '\0';
    p = strstr(desc, key);
    if (!p || sscanf(p + strlen(key) + 1, "%x", &v) != 1) {
        return -EINVAL;
    }
    *out = v;
    return 0;
}

/* ---- extents ---- */

static vmdk_extent *add_extent(vmdk_state *s, vd_child *file, bool flat,
                               uint64_t sectors, uint64_t gd, uint64_t rgd,
                               uint64_t l1_size, uint32_t l2_size,
                               uint64_t grain, vd_error *err)
{
    vmdk_extent *e;
    int64_t flen;

    if (grain > VMDK_MAX_GRAIN_SECTORS) {
        vd_error_set(err, -EFBIG, "Invalid granularity, image may be "
                     "corrupt");
        return NULL;
    }
    if (l1_size > VMDK_MAX_L1) {
        vd_error_set(err, -EFBIG, "L1 size too big");
        return NULL;
    }
    if (s->n_extents >= VMDK_MAX_EXTENTS) {
        vd_error_set(err, -EFBIG, "%s: more than %d extents", s->filename,
                     VMDK_MAX_EXTENTS);
        return NULL;
    }
    if (sectors > VD_MAX_LENGTH / SECTOR - s->total_sectors) {
        vd_error_set(err, -EFBIG, "%s: the extents add up to more than %"
                     PRIu64 " bytes", s->filename, VD_MAX_LENGTH);
        return NULL;
    }
    flen = vd_node_getlength(file->node);
    if (flen < 0) {
        vd_error_set(err, (int)flen, "%s: cannot get the extent's length",
                     s->filename);
        return NULL;
    }
    e = realloc(s->extents, (size_t)(s->n_extents + 1) * sizeof(*e));
    if (!e) {
        vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
        return NULL;
    }
    s->extents = e;
    e = &s->extents[s->n_extents++];
    memset(e, 0, sizeof(*e));
    e->file = file;
    e->flat = flat;
    e->sectors = sectors;
    e->gd_offset = gd;
    e->rgd_offset = rgd;
    e->l1_size = (uint32_t)l1_size;
    e->l2_size = l2_size;
    e->l1_entry_sectors = (uint64_t)l2_size * grain;
    e->grain_sectors = flat ? sectors : grain;
    if (grain) {
        uint64_t fs = ((uint64_t)flen + SECTOR - 1) / SECTOR;
        e->next_sector = (fs + grain - 1) / grain * grain;
    }
    s->total_sectors += sectors;
    e->end_sector = s->total_sectors;
    return e;
}

/* Reads a GD of @e at @off into a new host-endian table; the table must
 * lie inside the file (vdisk's rule: QEMU would read zeros past it). */
static uint32_t *read_gd(vmdk_state *s, vmdk_extent *e, uint64_t off,
                         const char *what, vd_error *err)
{
    int64_t flen = vd_node_getlength(e->file->node);
    uint64_t bytes = (uint64_t)e->l1_size * 4;
    uint8_t *raw;
    uint32_t *t;
    int ret;

    if (flen < 0 || off > (uint64_t)flen || bytes > (uint64_t)flen - off) {
        vd_error_set(err, -EINVAL, "%s: %s at 0x%" PRIx64 " (%" PRIu32
                     " entries) is past the end of the file",
                     vd_node_filename(e->file->node), what, off, e->l1_size);
        return NULL;
    }
    raw = malloc(bytes ? bytes : 1);
    t = malloc(bytes ? bytes : 1);
    if (!raw || !t) {
        free(raw);
        free(t);
        vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
        return NULL;
    }
    ret = bytes ? vd_child_pread(e->file, off, raw, bytes, NULL) : 0;
    if (ret < 0) {
        free(raw);
        free(t);
        vd_error_set(err, ret, "Could not read %s from extent '%s'", what,
                     vd_node_filename(e->file->node));
        return NULL;
    }
    for (uint32_t i = 0; i < e->l1_size; i++) {
        uint32_t v = le32(raw + 4 * (uint64_t)i);
        uint64_t gt = (uint64_t)v * SECTOR;
        if (v && (gt > (uint64_t)flen ||
                  (uint64_t)e->l2_size * 4 > (uint64_t)flen - gt)) {
            free(raw);
            free(t);
            vd_error_set(err, -EINVAL, "%s: grain table %" PRIu32 " of the "
                         "%s at 0x%" PRIx64 " is past the end of the file",
                         vd_node_filename(e->file->node), i, what, gt);
            return NULL;
        }
        t[i] = v;
    }
    free(raw);
    return t;
}

static int init_tables(vmdk_state *s, vmdk_extent *e, vd_error *err)
{
    e->gd = read_gd(s, e, e->gd_offset, "grain directory", err);
    if (!e->gd) {
        return err && err->code ? err->code : -EINVAL;
    }
    if (e->rgd_offset) {
        e->rgd = read_gd(s, e, e->rgd_offset, "redundant grain directory",
                         err);
        if (!e->rgd) {
            return err && err->code ? err->code : -EINVAL;
        }
    }
    return 0;
}

/* A VMDK3 ("COWD", ESX's vmfsSparse) extent, QEMU's
 * vmdk_open_vmfs_sparse: the header after the magic holds the disk's
 * sectors, the granularity, and the GD's sector and entry count; each GT
 * has 4096 entries. */
static int open_vmdk3(vmdk_state *s, vd_child *file, const uint8_t *h,
                      vd_error *err)
{
    vmdk_extent *e;
    uint64_t grain = le32(h + 16);

    /* QEMU divides by the GT's coverage (4096 grains) on every lookup:
     * a granularity of 0 would crash it there. */
    if (!grain) {
        return vd_error_set(err, -EINVAL, "%s: VMDK3 granularity 0 is "
                            "invalid", vd_node_filename(file->node));
    }
    e = add_extent(s, file, false, le32(h + 12), (uint64_t)le32(h + 20) *
                   SECTOR, 0, le32(h + 24), 4096, grain, err);
    if (!e) {
        return err && err->code ? err->code : -EINVAL;
    }
    e->grain_offset = e->gd_offset + (uint64_t)e->l1_size * 4;
    return init_tables(s, e, err);
}

static int open_desc_file(vmdk_state *s, vd_node *node, const char *buf,
                          vd_opts *opts, vd_error *err);

/* A hosted sparse extent in @file (QEMU's vmdk_open_sparse/vmdk4);
 * @nested: named by a descriptor, where another descriptor is refused. */
static int open_sparse(vmdk_state *s, vd_node *node, vd_child *file,
                       const char *buf, bool nested, vd_opts *opts,
                       vd_error *err)
{
    uint8_t h[80];
    uint64_t cap, grain, l1_entry, l1_size, gd, rgd = 0;
    uint32_t version, flags, ngt;
    int64_t flen = vd_node_getlength(file->node);
    const char *fname = vd_node_filename(file->node);
    vmdk_extent *e;
    bool compressed;
    int ret;

    if (!memcmp(buf, "COWD", 4)) {
        /* (@buf holds the file's bytes only: a short file reads zeros,
         * as in QEMU) */
        memset(h, 0, sizeof(h));
        memcpy(h, buf, flen < 28 ? (size_t)(flen < 0 ? 0 : flen) : 28);
        return open_vmdk3(s, file, h, err);
    }
    if (memcmp(buf, "KDMV", 4)) {
        return vd_error_set(err, -EINVAL, "%s: not a VMDK sparse extent "
                            "(bad magic)", fname);
    }
    memset(h, 0, sizeof(h));
    memcpy(h, buf, flen < 79 ? (size_t)flen : 79);
    cap = le64(h + 12);
    if (cap == 0 && le64(h + 28)) {
        uint64_t doff = le64(h + 28);
        char *d;
        if (nested) {
            return vd_error_set(err, -EINVAL, "%s: a sparse extent holding "
                                "a descriptor of its own is not supported",
                                fname);
        }
        if (doff > VD_MAX_LENGTH / SECTOR) {
            return vd_error_set(err, -EINVAL, "%s: descriptor offset %"
                                PRIu64 " is out of range", fname, doff);
        }
        d = read_desc(file, doff * SECTOR, err);
        if (!d) {
            return -EINVAL;
        }
        ret = open_desc_file(s, node, d, opts, err);
        free(d);
        return ret;
    }
    if (!s->create_type) {
        s->create_type = strdup("monolithicSparse");
    }
    if (le64(h + 56) == VMDK4_GD_AT_END) {
        uint8_t f[1536];
        if (flen < 1536 ||
            vd_child_pread(file, ((uint64_t)flen & ~511ull) - 1536, f,
                           sizeof(f), NULL) < 0) {
            return vd_error_set(err, -EINVAL, "Failed to read footer");
        }
        if (memcmp(f + 512, "KDMV", 4) || le32(f + 8) != 0 ||
            le32(f + 12) != VMDK_MARKER_FOOTER || le64(f + 1024) != 0 ||
            le32(f + 1032) != 0 || le32(f + 1036) != VMDK_MARKER_EOS) {
            return vd_error_set(err, -EINVAL, "Invalid footer");
        }
        memcpy(h + 4, f + 516, 75);
    }
    compressed = (h[77] | h[78] << 8) == 1;
    version = le32(h + 4);
    flags = le32(h + 8);
    if (version > 3) {
        return vd_error_set(err, -ENOTSUP, "Unsupported VMDK version %"
                            PRIu32, version);
    }
    if (version == 3 && !node->read_only && !compressed) {
        return vd_error_set(err, -EINVAL, "VMDK version 3 must be read "
                            "only");
    }
    ngt = le32(h + 44);
    if (ngt > 512) {
        return vd_error_set(err, -EINVAL, "L2 table size too big");
    }
    cap = le64(h + 12);
    grain = le64(h + 20);
    /* QEMU keeps the product in 32 bits; the granularity itself is
     * bounded by add_extent() below. */
    l1_entry = (uint32_t)(ngt * grain);
    if (l1_entry == 0) {
        return vd_error_set(err, -EINVAL, "L1 entry size is invalid");
    }
    l1_size = cap / l1_entry + (cap % l1_entry != 0);
    if (flags & VMDK4_FLAG_RGD) {
        rgd = le64(h + 48);
        if (rgd > VD_MAX_LENGTH / SECTOR) {
            return vd_error_set(err, -EINVAL, "%s: redundant grain directory "
                                "offset %" PRIu64 " is out of range", fname,
                                rgd);
        }
        rgd *= SECTOR;
    }
    gd = le64(h + 56);
    if (gd > VD_MAX_LENGTH / SECTOR) {
        return vd_error_set(err, -EINVAL, "%s: grain directory offset %"
                            PRIu64 " is out of range", fname, gd);
    }
    if ((uint64_t)(flen + 511) / SECTOR < le64(h + 64)) {
        return vd_error_set(err, -EINVAL, "File truncated, expecting at "
                            "least %" PRId64 " bytes",
                            (int64_t)(le64(h + 64) * SECTOR));
    }
    e = add_extent(s, file, false, cap, gd * SECTOR, rgd, l1_size, ngt,
                   grain, err);
    if (!e) {
        return err && err->code ? err->code : -EINVAL;
    }
    e->compressed = compressed;
    if (compressed) {
        free(s->create_type);
        s->create_type = strdup("streamOptimized");
    }
    e->has_marker = flags & VMDK4_FLAG_MARKER;
    e->has_zero_grain = flags & VMDK4_FLAG_ZERO_GRAIN;
    e->version = version;
    e->desc_offset = le64(h + 28) * SECTOR;
    e->desc_size = le64(h + 36) < VD_MAX_LENGTH / SECTOR ?
                   le64(h + 36) * SECTOR : 0;
    e->grain_offset = le64(h + 64) * SECTOR;
    return init_tables(s, e, err);
}

/* @n bytes of @c at @off into @buf, zeros past the end of the file (as
 * QEMU's reads past EOF give). */
static int pread_padded(vd_child *c, uint64_t off, void *buf, uint64_t n)
{
    int64_t len = vd_node_getlength(c->node);

    memset(buf, 0, n);
    if (len < 0) {
        return (int)len;
    }
    if (off >= (uint64_t)len) {
        return 0;
    }
    if (n > (uint64_t)len - off) {
        n = (uint64_t)len - off;
    }
    return vd_child_pread(c, off, buf, n, NULL);
}

static bool all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (p[i]) {
            return false;
        }
    }
    return true;
}

/* QEMU's strict checks of the seSparse const header (the format is not
 * documented, so anything but the values seen in VMware's files is
 * refused), in its order and words. */
static int check_se_const(const uint8_t *h, vd_error *err)
{
    uint64_t v;

    if ((v = le64(h)) != SESPARSE_CONST_MAGIC) {
        return vd_error_set(err, -EINVAL, "Bad const header magic: 0x%016"
                            PRIx64, v);
    }
    if ((v = le64(h + 8)) != SESPARSE_VERSION) {
        return vd_error_set(err, -ENOTSUP, "Unsupported version: 0x%016"
                            PRIx64, v);
    }
    if ((v = le64(h + 24)) != SESPARSE_GRAIN_SECTORS) {
        return vd_error_set(err, -ENOTSUP, "Unsupported grain size: %"
                            PRIu64, v);
    }
    if ((v = le64(h + 32)) != SESPARSE_GT_SECTORS) {
        return vd_error_set(err, -ENOTSUP, "Unsupported grain table size: %"
                            PRIu64, v);
    }
    if ((v = le64(h + 40)) != 0) {
        return vd_error_set(err, -ENOTSUP, "Unsupported flags: 0x%016"
                            PRIx64, v);
    }
    if (!all_zero(h + 48, 32)) {
        return vd_error_set(err, -ENOTSUP, "Unsupported reserved bits: "
                            "0x%016" PRIx64 " 0x%016" PRIx64 " 0x%016" PRIx64
                            " 0x%016" PRIx64, le64(h + 48), le64(h + 56),
                            le64(h + 64), le64(h + 72));
    }
    if (!all_zero(h + 208, 304)) {
        return vd_error_set(err, -ENOTSUP, "Unsupported non-zero const "
                            "header padding");
    }
    return 0;
}

static int check_se_volatile(const uint8_t *h, vd_error *err)
{
    uint64_t v = le64(h);

    if (v != SESPARSE_VOLATILE_MAGIC) {
        return vd_error_set(err, -EINVAL, "Bad volatile header magic: "
                            "0x%016" PRIx64, v);
    }
    if (le64(h + 24)) {
        return vd_error_set(err, -ENOTSUP, "Image is dirty, Replaying "
                            "journal not supported");
    }
    if (!all_zero(h + 32, 480)) {
        return vd_error_set(err, -ENOTSUP, "Unsupported non-zero volatile "
                            "header padding");
    }
    return 0;
}

/* The sector of the GT that seSparse GD entry @v names, or UINT64_MAX
 * when the entry is not one QEMU takes (its top half must be 0x10000000:
 * the GT index fits 32 bits for the largest 64 TiB disk) or the GT lies
 * beyond QEMU's 32-bit sector numbers. */
static uint64_t se_gt_sector(const vmdk_extent *e, uint64_t v)
{
    uint64_t gt;

    if (v >> 32 != 0x10000000) {
        return UINT64_MAX;
    }
    if (e->se_gt_sector > 0xffffffffull) {
        return UINT64_MAX;
    }
    gt = e->se_gt_sector + (v & 0xffffffffull) * SESPARSE_GT_SECTORS;
    return gt > 0xffffffffull ? UINT64_MAX : gt;
}

/* An seSparse extent in @file (QEMU's vmdk_open_se_sparse): read only,
 * the two headers checked, the GD entries that cover the disk read and
 * each GT they name found inside the file. */
static int open_sesparse(vmdk_state *s, vd_node *node, vd_child *file,
                         vd_error *err)
{
    const char *fname = vd_node_filename(file->node);
    int64_t flen = vd_node_getlength(file->node);
    uint8_t ch[512], vh[512], *raw;
    uint64_t voff, gd, gd_size, bytes, reach;
    vmdk_extent *e;
    int ret;

    if (!node->read_only) {
        return vd_error_set(err, -EACCES, "No write support for seSparse "
                            "images available");
    }
    if (flen < 0) {
        return vd_error_set(err, (int)flen, "%s: cannot get the extent's "
                            "length", fname);
    }
    ret = pread_padded(file, 0, ch, sizeof(ch));
    if (ret < 0) {
        return vd_error_set(err, ret, "Could not read const header from "
                            "file '%s'", fname);
    }
    ret = check_se_const(ch, err);
    if (ret < 0) {
        return ret;
    }
    voff = le64(ch + 80);
    if (voff > VD_MAX_LENGTH / SECTOR) {
        return vd_error_set(err, -EINVAL, "%s: volatile header offset %"
                            PRIu64 " is out of range", fname, voff);
    }
    ret = pread_padded(file, voff * SECTOR, vh, sizeof(vh));
    if (ret < 0) {
        return vd_error_set(err, ret, "Could not read volatile header from "
                            "file '%s'", fname);
    }
    ret = check_se_volatile(vh, err);
    if (ret < 0) {
        return ret;
    }
    gd = le64(ch + 128);
    gd_size = le64(ch + 136);
    /* QEMU truncates the entry count to 32 bits before its 32M limit;
     * vdisk refuses every count over the limit. */
    if (gd_size > VMDK_MAX_L1 / (SECTOR / 8)) {
        return vd_error_set(err, -EFBIG, "L1 size too big");
    }
    if (gd > VD_MAX_LENGTH / SECTOR) {
        return vd_error_set(err, -EINVAL, "%s: grain directory offset %"
                            PRIu64 " is out of range", fname, gd);
    }
    e = add_extent(s, file, false, le64(ch + 16), gd * SECTOR, 0,
                   gd_size * (SECTOR / 8),
                   SESPARSE_GT_SECTORS * (uint32_t)(SECTOR / 8),
                   SESPARSE_GRAIN_SECTORS, err);
    if (!e) {
        return err && err->code ? err->code : -EINVAL;
    }
    e->sesparse = true;
    e->se_gt_sector = le64(ch + 144);
    e->se_grain_sector = le64(ch + 192);
    /* Only the GD entries that cover the disk are ever looked up: read
     * and keep those alone. ESXi's layout reserves 2048 sectors of GD
     * whatever the capacity (1 MiB, where a 2 GiB disk uses 1 KiB of
     * it), which QEMU reads and keeps whole. */
    reach = e->sectors / e->l1_entry_sectors +
            (e->sectors % e->l1_entry_sectors != 0);
    if (e->l1_size > reach) {
        e->l1_size = (uint32_t)reach;
    }
    bytes = (uint64_t)e->l1_size * 8;
    if (e->gd_offset > (uint64_t)flen || bytes > (uint64_t)flen -
        e->gd_offset) {
        return vd_error_set(err, -EINVAL, "%s: grain directory at 0x%"
                            PRIx64 " (%" PRIu32 " entries) is past the end "
                            "of the file", fname, e->gd_offset, e->l1_size);
    }
    raw = malloc(bytes ? bytes : 1);
    e->gd64 = malloc(bytes ? bytes : 1);
    if (!raw || !e->gd64) {
        free(raw);
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    ret = bytes ? vd_child_pread(file, e->gd_offset, raw, bytes, NULL) : 0;
    if (ret < 0) {
        free(raw);
        return vd_error_set(err, ret, "Could not read l1 table from extent "
                            "'%s'", fname);
    }
    for (uint32_t i = 0; i < e->l1_size; i++) {
        uint64_t v = le64(raw + 8 * (uint64_t)i), gt = se_gt_sector(e, v);
        /* Entries QEMU cannot follow fail the reads that reach them, as
         * in QEMU; a GT it would read past the end of the file (zeros)
         * is refused here, as for hosted sparse extents. */
        if (v && gt != UINT64_MAX && gt != 0 &&
            (gt * SECTOR > (uint64_t)flen ||
             SESPARSE_GT_SECTORS * SECTOR > (uint64_t)flen - gt * SECTOR)) {
            free(raw);
            return vd_error_set(err, -EINVAL, "%s: grain table %" PRIu32
                                " of the grain directory at 0x%" PRIx64
                                " is past the end of the file", fname, i,
                                gt * SECTOR);
        }
        e->gd64[i] = v;
    }
    free(raw);
    return 0;
}

/* The directory part of @path with its slash ("" when there is none),
 * QEMU's bdrv_dirname for files. */
static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    size_t n = slash ? (size_t)(slash - path + 1) : 0;
    char *out = malloc(n + 1);

    if (out) {
        memcpy(out, path, n);
        out[n] = '\0';
    }
    return out;
}

static const char *next_line(const char *p)
{
    const char *q = strchr(p, '\n');

    return q ? q + 1 : p + strlen(p);
}

/* Opens the extent file @path as child "extents.N" of @node. */
static vd_child *open_extent_file(vmdk_state *s, vd_node *node,
                                  const char *path, bool data_only,
                                  vd_opts *opts, vd_error *err)
{
    char prefix[32];
    vd_opts *sub;
    vd_node *dn = NULL;
    vd_child *c;
    unsigned flags = node->flags;
    int ret;

    snprintf(prefix, sizeof(prefix), "extents.%d.", s->n_extents);
    sub = vd_opts_extract_prefix(opts, prefix);
    if (node->read_only) {
        flags &= ~VD_NODE_RDWR;
    }
    ret = vd_node_open(&dn, path, NULL, sub,
                       (flags & ~(VD_NODE_NO_BACKING | VD_NODE_CHECK)) |
                       VD_NODE_PROTOCOL | VD_NODE_NO_BACKING, err);
    vd_opts_free(&sub);
    if (ret < 0) {
        return NULL;
    }
    prefix[strlen(prefix) - 1] = '\0';
    c = vd_node_attach_child(node, dn, prefix, data_only ? VD_ROLE_DATA :
                             VD_ROLE_DATA | VD_ROLE_METADATA, err);
    if (!c) {
        vd_node_unref(dn);
    }
    return c;
}

/* The extent lines of a descriptor (QEMU's vmdk_parse_extents). */
static int parse_extents(vmdk_state *s, vd_node *node, const char *desc,
                         vd_opts *opts, vd_error *err)
{
    char *dir = NULL;
    int ret = 0;

    for (const char *p = desc; *p; p = next_line(p)) {
        char access[11], type[11], fname[512], *path;
        int64_t sectors = 0, flat_off = -1;
        vd_child *c;
        int m = sscanf(p, "%10s %" SCNd64 " %10s \"%511[^\n\r\"]\" %"
                       SCNd64, access, &sectors, type, fname, &flat_off);
        bool flat;

        if (m < 4 || strcmp(access, "RW")) {
            continue;
        }
        if (!strcmp(type, "FLAT")) {
            if (m != 5 || flat_off < 0) {
                goto invalid;
            }
        } else if (!strcmp(type, "VMFS")) {
            if (m != 4) {
                goto invalid;
            }
            flat_off = 0;
        } else if (m != 4) {
            goto invalid;
        }
        if (sectors <= 0 ||
            (strcmp(type, "FLAT") && strcmp(type, "SPARSE") &&
             strcmp(type, "VMFS") && strcmp(type, "VMFSSPARSE") &&
             strcmp(type, "SESPARSE"))) {
            continue;
        }
        flat = !strcmp(type, "FLAT") || !strcmp(type, "VMFS");
        if (flat && (uint64_t)flat_off > VD_MAX_LENGTH / SECTOR) {
            goto invalid;
        }
        if (fname[0] == '/') {
            path = strdup(fname);
        } else {
            if (!dir) {
                dir = dir_of(vd_node_filename(node->file->node));
                if (!dir) {
                    ret = vd_error_set(err, -ENOMEM, "out of memory");
                    goto out;
                }
            }
            path = malloc(strlen(dir) + strlen(fname) + 1);
            if (path) {
                strcpy(path, dir);
                strcat(path, fname);
            }
        }
        if (!path) {
            ret = vd_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        c = open_extent_file(s, node, path, flat, opts, err);
        free(path);
        if (!c) {
            ret = -EINVAL;
            goto out;
        }
        if (flat) {
            vmdk_extent *e = add_extent(s, c, true, (uint64_t)sectors, 0, 0,
                                        0, 0, 0, err);
            if (!e) {
                ret = err && err->code ? err->code : -EINVAL;
                goto out;
            }
            e->flat_start = (uint64_t)flat_off * SECTOR;
        } else if (!strcmp(type, "SESPARSE")) {
            ret = open_sesparse(s, node, c, err);
            if (ret < 0) {
                goto out;
            }
        } else {
            char *buf = read_desc(c, 0, err);
            if (!buf) {
                ret = -EINVAL;
                goto out;
            }
            ret = open_sparse(s, node, c, buf, true, opts, err);
            free(buf);
            if (ret < 0) {
                goto out;
            }
        }
        s->extents[s->n_extents - 1].type = strdup(type);
        if (!s->extents[s->n_extents - 1].type) {
            ret = vd_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        continue;
invalid:
        {
            const char *np = next_line(p);
            if (np > p && np[-1] == '\n') {
                np--;
            }
            ret = vd_error_set(err, -EINVAL, "Invalid extent line: %.*s",
                               (int)(np - p), p);
            goto out;
        }
    }
out:
    free(dir);
    return ret;
}

static int open_desc_file(vmdk_state *s, vd_node *node, const char *buf,
                          vd_opts *opts, vd_error *err)
{
    char ct[128];

    if (!desc_value(buf, "createType", ct, sizeof(ct))) {
        return vd_error_set(err, -EINVAL, "invalid VMDK image descriptor");
    }
    if (strcmp(ct, "monolithicFlat") && strcmp(ct, "vmfs") &&
        strcmp(ct, "vmfsSparse") && strcmp(ct, "seSparse") &&
        strcmp(ct, "twoGbMaxExtentSparse") &&
        strcmp(ct, "twoGbMaxExtentFlat")) {
        return vd_error_set(err, -ENOTSUP, "Unsupported image type '%s'",
                            ct);
    }
    free(s->create_type);
    s->create_type = strdup(ct);
    s->desc_offset = 0;
    return parse_extents(s, node, buf, opts, err);
}

/* parentFileNameHint="NAME" in the descriptor: the backing file, whose
 * format is vmdk (QEMU's vmdk_parent_open). */
static int parent_open(vmdk_state *s, vd_node *node)
{
    char desc[VMDK_DESC_SIZE + 1];
    int64_t len = vd_node_getlength(node->file->node);
    const char *p, *q;
    int ret;

    memset(desc, 0, sizeof(desc));
    if (len > 0 && s->desc_offset < (uint64_t)len) {
        uint64_t n = (uint64_t)len - s->desc_offset;
        ret = vd_child_pread(node->file, s->desc_offset, desc,
                             n < VMDK_DESC_SIZE ? n : VMDK_DESC_SIZE, NULL);
        if (ret < 0) {
            return ret;
        }
    }
    p = strstr(desc, "parentFileNameHint");
    if (!p) {
        return 0;
    }
    p += strlen("parentFileNameHint") + 2;
    q = strchr(p, '"');
    if (!q || q - p > 4095) {
        return -EINVAL;
    }
    free(node->backing_file);
    free(node->backing_format);
    node->backing_file = strndup(p, (size_t)(q - p));
    node->backing_format = strdup("vmdk");
    return node->backing_file && node->backing_format ? 0 : -ENOMEM;
}

static int cmp_range(const void *a, const void *b)
{
    const uint64_t *x = a, *y = b;

    return x[0] < y[0] ? -1 : x[0] > y[0];
}

/* Before any write: the metadata ranges of each sparse extent (header,
 * descriptor, GDs and every GT) must not overlap, and every GT needs
 * its redundant copy (QEMU would write the copy's entry at offset 0). */
static int check_layout(vmdk_state *s, vmdk_extent *e, vd_error *err)
{
    const char *fname = vd_node_filename(e->file->node);
    uint64_t gtb = (uint64_t)e->l2_size * 4, n = 0, cap;

    if (e->flat) {
        return 0;
    }
    cap = 4 + 2 * (uint64_t)e->l1_size;
    e->meta = malloc(cap * sizeof(*e->meta));
    if (!e->meta) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    e->meta[n][0] = 0;
    e->meta[n++][1] = SECTOR;
    if (e->desc_offset >= SECTOR && e->desc_size) {
        e->meta[n][0] = e->desc_offset;
        e->meta[n++][1] = e->desc_offset + e->desc_size;
    }
    e->meta[n][0] = e->gd_offset;
    e->meta[n++][1] = e->gd_offset + (uint64_t)e->l1_size * 4;
    if (e->rgd) {
        e->meta[n][0] = e->rgd_offset;
        e->meta[n++][1] = e->rgd_offset + (uint64_t)e->l1_size * 4;
    }
    for (uint32_t i = 0; i < e->l1_size; i++) {
        if (e->gd[i]) {
            if (e->rgd && !e->rgd[i]) {
                return vd_error_set(err, -EINVAL, "%s: grain table %" PRIu32
                                    " has no redundant copy", fname, i);
            }
            e->meta[n][0] = (uint64_t)e->gd[i] * SECTOR;
            e->meta[n++][1] = (uint64_t)e->gd[i] * SECTOR + gtb;
        }
        if (e->rgd && e->rgd[i]) {
            e->meta[n][0] = (uint64_t)e->rgd[i] * SECTOR;
            e->meta[n++][1] = (uint64_t)e->rgd[i] * SECTOR + gtb;
        }
    }
    qsort(e->meta, n, sizeof(*e->meta), cmp_range);
    for (uint64_t k = 1; k < n; k++) {
        if (e->meta[k][0] < e->meta[k - 1][1]) {
            return vd_error_set(err, -EINVAL, "%s: metadata at 0x%" PRIx64
                                " overlaps metadata at 0x%" PRIx64, fname,
                                e->meta[k][0], e->meta[k - 1][0]);
        }
    }
    e->n_meta = n;
    return 0;
}

/* Whether [off, off+len) overlaps metadata of @e (writable opens). */
static bool hits_meta(const vmdk_extent *e, uint64_t off, uint64_t len)
{
    size_t lo = 0, hi = e->n_meta;

    /* The last range starting before off + len. */
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (e->meta[mid][0] < off + len) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo > 0 && e->meta[lo - 1][1] > off;
}

static void vmdk_close(vd_node *node)
{
    vmdk_state *s = node->opaque;

    for (int i = 0; i < s->n_extents; i++) {
        vmdk_extent *e = &s->extents[i];
        free(e->gd);
        free(e->rgd);
        free(e->gd64);
        free(e->type);
        free(e->meta);
        for (int k = 0; k < VMDK_GT_CACHE; k++) {
            free(e->cache[k].gt);
            free(e->cache[k].gt64);
        }
    }
    free(s->extents);
    free(s->create_type);
    s->extents = NULL;
    s->n_extents = 0;
    s->create_type = NULL;
    pthread_mutex_destroy(&s->lock);
}

static int vmdk_open(vd_node *node, vd_opts *opts, unsigned flags,
                     vd_error *err)
{
    vmdk_state *s = node->opaque;
    char *buf;
    int ret;

    (void)flags;
    memset(s, 0, sizeof(*s));
    pthread_mutex_init(&s->lock, NULL);
    s->node = node;
    s->filename = node->filename ? node->filename : "vmdk";
    buf = read_desc(node->file, 0, err);
    if (!buf) {
        ret = -EINVAL;
        goto fail;
    }
    if (!memcmp(buf, "KDMV", 4) || !memcmp(buf, "COWD", 4)) {
        ret = open_sparse(s, node, node->file, buf, false, opts, err);
        s->desc_offset = 0x200;
    } else {
        /* The descriptor file holds no guest data. */
        node->file->role &= ~VD_ROLE_DATA;
        ret = open_desc_file(s, node, buf, opts, err);
    }
    free(buf);
    if (ret < 0) {
        goto fail;
    }
    if (!s->create_type) {
        s->create_type = strdup("monolithicSparse");
    }
    ret = parent_open(s, node);
    if (ret == 0) {
        ret = read_cid(node->file, s->desc_offset, false, &s->cid);
    }
    if (ret == 0) {
        ret = read_cid(node->file, s->desc_offset, true, &s->parent_cid);
    }
    if (ret < 0) {
        vd_error_set(err, ret, "Could not open '%s': %s", s->filename,
                     strerror(-ret));
        goto fail;
    }
    if (!node->read_only) {
        for (int i = 0; i < s->n_extents; i++) {
            ret = check_layout(s, &s->extents[i], err);
            if (ret < 0) {
                goto fail;
            }
        }
    }
    return 0;
fail:
    vmdk_close(node);
    return ret;
}

static int64_t vmdk_getlength(vd_node *node)
{
    vmdk_state *s = node->opaque;

    return (int64_t)(s->total_sectors * SECTOR);
}

/* ---- grain lookup ---- */

enum { VMDK_OK, VMDK_UNALLOC, VMDK_ZEROED };

static vmdk_extent *find_extent(vmdk_state *s, uint64_t sector)
{
    int lo = 0, hi = s->n_extents;

    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (s->extents[mid].end_sector <= sector) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo < s->n_extents ? &s->extents[lo] : NULL;
}

/* The cache slot holding the GT at byte @off of @e (*@hit), else the
 * least recently used slot. Lock held. */
static vmdk_gt_cache *gt_slot(vmdk_state *s, vmdk_extent *e, uint64_t off,
                              bool *hit)
{
    vmdk_gt_cache *victim = &e->cache[0];

    for (int i = 0; i < VMDK_GT_CACHE; i++) {
        if (e->cache[i].off == off) {
            e->cache[i].uses = ++s->cache_clock;
            *hit = true;
            return &e->cache[i];
        }
        if (e->cache[i].uses < victim->uses) {
            victim = &e->cache[i];
        }
    }
    *hit = false;
    return victim;
}

/* The raw bytes of the GT at byte @off (*@raw, malloc'd) for a cache
 * slot whose table *@table (@bytes long) is allocated at its first use:
 * a descriptor may name thousands of extents that are never read. */
static int read_gt(vmdk_state *s, vmdk_extent *e, void **table,
                   uint64_t off, uint64_t bytes, uint8_t **raw,
                   vd_error *err)
{
    int ret;

    if (!*table) {
        *table = malloc(bytes);
        if (!*table) {
            return vd_error_set(err, -ENOMEM, "%s: out of memory",
                                s->filename);
        }
    }
    *raw = malloc(bytes);
    if (!*raw) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    ret = vd_child_pread(e->file, off, *raw, bytes, err);
    if (ret < 0) {
        free(*raw);
        *raw = NULL;
    }
    return ret;
}

/* The GT at @gt (sector) of @e, from the cache or the file. Lock held. */
static int load_gt(vmdk_state *s, vmdk_extent *e, uint32_t gt,
                   uint32_t **out, vd_error *err)
{
    uint64_t off = (uint64_t)gt * SECTOR, bytes = (uint64_t)e->l2_size * 4;
    bool hit;
    vmdk_gt_cache *victim = gt_slot(s, e, off, &hit);
    uint8_t *raw;
    int ret;

    if (hit) {
        *out = victim->gt;
        return 0;
    }
    ret = read_gt(s, e, (void **)&victim->gt, off, bytes, &raw, err);
    if (ret < 0) {
        return ret;
    }
    for (uint32_t i = 0; i < e->l2_size; i++) {
        uint32_t v = le32(raw + 4 * (uint64_t)i);
        uint64_t g = (uint64_t)v * SECTOR;
        /* A writer must not be sent into metadata by a grain entry. */
        if (e->meta && !e->compressed && v &&
            !(v == VMDK_GTE_ZEROED && e->has_zero_grain) &&
            hits_meta(e, g, e->grain_sectors * SECTOR)) {
            free(raw);
            victim->off = 0;
            return vd_error_set(err, -EIO, "%s: grain table at 0x%" PRIx64
                                " entry %" PRIu32 " points into metadata "
                                "(0x%" PRIx64 ")",
                                vd_node_filename(e->file->node), off, i, g);
        }
        victim->gt[i] = v;
    }
    free(raw);
    victim->off = off;
    victim->uses = ++s->cache_clock;
    *out = victim->gt;
    return 0;
}

/* The seSparse GT at sector @gt of @e (64-bit entries), from the cache
 * or the file. Lock held. */
static int load_gt64(vmdk_state *s, vmdk_extent *e, uint64_t gt,
                     uint64_t **out, vd_error *err)
{
    uint64_t off = gt * SECTOR, bytes = (uint64_t)e->l2_size * 8;
    bool hit;
    vmdk_gt_cache *slot = gt_slot(s, e, off, &hit);
    uint8_t *raw;
    int ret;

    if (hit) {
        *out = slot->gt64;
        return 0;
    }
    ret = read_gt(s, e, (void **)&slot->gt64, off, bytes, &raw, err);
    if (ret < 0) {
        return ret;
    }
    for (uint32_t i = 0; i < e->l2_size; i++) {
        slot->gt64[i] = le64(raw + 8 * (uint64_t)i);
    }
    free(raw);
    slot->off = off;
    slot->uses = ++s->cache_clock;
    *out = slot->gt64;
    return 0;
}

/* get_cluster() for an seSparse extent, QEMU's decoding: faults it
 * reports as errors (VMDK_ERROR) are errors here too, naming the entry;
 * a grain number that would take the offset past vdisk's limit is one
 * more. */
static int se_get_cluster(vmdk_state *s, vmdk_extent *e, uint64_t rel,
                          uint64_t *host, vd_error *err)
{
    const char *fname = vd_node_filename(e->file->node);
    uint64_t l1 = rel / e->l1_entry_sectors, v, gt, *t, idx;
    uint32_t l2 = (uint32_t)((rel / e->grain_sectors) % e->l2_size);
    int ret;

    v = e->gd64[l1];
    if (!v) {
        return VMDK_UNALLOC;
    }
    gt = se_gt_sector(e, v);
    if (gt == UINT64_MAX) {
        return vd_error_set(err, -EIO, "%s: grain directory entry %" PRIu64
                            " (0x%016" PRIx64 ") names no grain table",
                            fname, l1, v);
    }
    if (gt == 0) {
        /* QEMU takes a GT at sector 0 (grain tables area at 0, GT 0) for
         * none: the grains it covers are unallocated. */
        return VMDK_UNALLOC;
    }
    ret = load_gt64(s, e, gt, &t, err);
    if (ret < 0) {
        return ret;
    }
    v = t[l2];
    switch (v >> 60) {
    case 0:
        if (v) {
            break;
        }
        return VMDK_UNALLOC;
    case 1:                    /* unmapped (SCSI UNMAP): reads zeros */
    case 2:                    /* zeroed */
        return VMDK_ZEROED;
    case 3:
        idx = (v >> 48 & 0xfff) | (v & 0xffffffffffffull) << 12;
        if (e->se_grain_sector > VD_MAX_LENGTH / SECTOR ||
            idx > (VD_MAX_LENGTH / SECTOR - e->se_grain_sector) /
                  e->grain_sectors) {
            return vd_error_set(err, -EIO, "%s: grain table at 0x%" PRIx64
                                " entry %" PRIu32 ": grain %" PRIu64
                                " is out of range", fname, gt * SECTOR, l2,
                                idx);
        }
        *host = (e->se_grain_sector + idx * e->grain_sectors) * SECTOR;
        return VMDK_OK;
    }
    return vd_error_set(err, -EIO, "%s: grain table at 0x%" PRIx64 " entry %"
                        PRIu32 " (0x%016" PRIx64 ") is of no known kind",
                        fname, gt * SECTOR, l2, v);
}

typedef struct vmdk_loc {
    uint32_t l1_index, l2_index, gt;
    uint32_t *entry;           /* in the cache */
} vmdk_loc;

/* Where guest byte @off of @e lives: VMDK_OK with *host (the grain's
 * byte offset; a flat extent's start), VMDK_UNALLOC or VMDK_ZEROED.
 * Lock held. */
static int get_cluster(vmdk_state *s, vmdk_extent *e, uint64_t off,
                       uint64_t *host, vmdk_loc *loc, vd_error *err)
{
    uint64_t rel, l1;
    uint32_t *gt = NULL, v;
    int ret;

    if (loc) {
        memset(loc, 0, sizeof(*loc));
    }
    if (e->flat) {
        *host = e->flat_start;
        return VMDK_OK;
    }
    rel = off / SECTOR - (e->end_sector - e->sectors);
    l1 = rel / e->l1_entry_sectors;
    if (l1 >= e->l1_size) {
        return vd_error_set(err, -EIO, "%s: sector %" PRIu64 " is past the "
                            "grain directory", vd_node_filename(e->file->node),
                            off / SECTOR);
    }
    if (e->sesparse) {
        return se_get_cluster(s, e, rel, host, err);
    }
    if (!e->gd[l1]) {
        return VMDK_UNALLOC;
    }
    ret = load_gt(s, e, e->gd[l1], &gt, err);
    if (ret < 0) {
        return ret;
    }
    if (loc) {
        loc->l1_index = (uint32_t)l1;
        loc->l2_index = (uint32_t)((rel / e->grain_sectors) % e->l2_size);
        loc->gt = e->gd[l1];
        loc->entry = &gt[loc->l2_index];
    }
    v = gt[(rel / e->grain_sectors) % e->l2_size];
    if (e->has_zero_grain && v == VMDK_GTE_ZEROED) {
        return VMDK_ZEROED;
    }
    if (!v) {
        return VMDK_UNALLOC;
    }
    *host = (uint64_t)v * SECTOR;
    return VMDK_OK;
}

static uint64_t offset_in_cluster(const vmdk_extent *e, uint64_t off)
{
    uint64_t rel = off - (e->end_sector - e->sectors) * SECTOR;

    return rel % (e->grain_sectors * SECTOR);
}

/* Whether reads may go to the backing file: its CID is parentCID (QEMU's
 * vmdk_is_cid_valid; a backing file of another format never is). */
static bool cid_valid(vmdk_state *s)
{
    vd_node *b = s->node->backing ? s->node->backing->node : NULL;

    if (!s->cid_checked && b) {
        uint32_t cid;
        if (b->drv != &vd_driver_vmdk) {
            return false;
        }
        if (read_cid(b->file, ((vmdk_state *)b->opaque)->desc_offset, false,
                     &cid) < 0 || cid != s->parent_cid) {
            return false;
        }
    }
    s->cid_checked = true;
    return true;
}

/* ---- read ---- */

/* What is read of a compressed grain first: its marker and the whole
 * data of any grain deflated to less than this, which is most of them;
 * a longer grain is read on. Reading the largest possible grain (two
 * grains' worth, as QEMU) cost more in copying than the inflating of
 * well-compressed data. */
#define VMDK_GRAIN_PEEK (16 * 1024)

/* zlib's uncompress() in one inflate(Z_FINISH) call: the output is made
 * at once, so zlib neither allocates nor fills its 32 KiB window (as
 * uncompress, which inflates with Z_NO_FLUSH, does for every grain).
 * Returns the bytes made, or -1 for a stream that is damaged, ends
 * early, or does not fit in @olen. */
static int64_t inflate_grain(uint8_t *out, uint64_t olen, const uint8_t *in,
                             uint64_t ilen)
{
    z_stream z;
    int r;
    int64_t made;

    memset(&z, 0, sizeof(z));
    if (olen > UINT32_MAX || ilen > UINT32_MAX || inflateInit(&z) != Z_OK) {
        return -1;
    }
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)ilen;
    z.next_out = out;
    z.avail_out = (uInt)olen;
    r = inflate(&z, Z_FINISH);
    made = (int64_t)z.total_out;
    inflateEnd(&z);
    return r == Z_STREAM_END ? made : -1;
}

/* The flat buffer at [@off, +@len) of @v when one iovec holds all of it. */
static uint8_t *iov_flat(const vd_iov *v, uint64_t off, uint64_t len)
{
    for (int i = 0; i < v->niov; i++) {
        if (off < v->iov[i].iov_len) {
            return len <= v->iov[i].iov_len - off
                   ? (uint8_t *)v->iov[i].iov_base + off : NULL;
        }
        off -= v->iov[i].iov_len;
    }
    return NULL;
}

static int read_compressed(vmdk_state *s, vmdk_extent *e, uint64_t host,
                           uint64_t in_cl, vd_iov *qiov, uint64_t qoff,
                           uint64_t n, vd_error *err)
{
    uint64_t cb = e->grain_sectors * SECTOR, bufb = 2 * cb, dlen, head;
    uint64_t avail = 0, got, need;
    int64_t flen = vd_node_getlength(e->file->node), olen;
    uint8_t *buf = malloc(bufb), *out = NULL, *direct, *data = buf;
    const char *fname = vd_node_filename(e->file->node);
    int ret = 0;

    (void)s;
    if (!buf) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    /* Past the end of the file the grain reads as zeros (a bad size or
     * a stream that does not inflate, below). */
    if (flen > 0 && host < (uint64_t)flen) {
        avail = (uint64_t)flen - host < bufb ? (uint64_t)flen - host : bufb;
    }
    got = avail < VMDK_GRAIN_PEEK ? avail : VMDK_GRAIN_PEEK;
    if (got) {
        ret = vd_child_pread(e->file, host, buf, got, err);
        if (ret < 0) {
            goto out;
        }
    }
    head = e->has_marker ? VMDK_MARKER_BYTES : 0;
    if (got < head) {
        memset(buf + got, 0, head - got);
    }
    dlen = cb;
    if (e->has_marker) {
        data = buf + VMDK_MARKER_BYTES;
        dlen = le32(buf + 8);
    }
    if (!dlen || dlen > bufb - head) {
        ret = vd_error_set(err, -EINVAL, "%s: compressed grain at 0x%" PRIx64
                           " has a bad size (%" PRIu64 ")", fname, host,
                           dlen);
        goto out;
    }
    need = head + dlen;
    if (need > got) {
        uint64_t more = (avail < need ? avail : need) - got;
        if (avail > got) {
            ret = vd_child_pread(e->file, host + got, buf + got, more, err);
            if (ret < 0) {
                goto out;
            }
            got += more;
        }
        if (need > got) {
            memset(buf + got, 0, need - got);
        }
    }
    /* A whole grain into one flat buffer of the caller is inflated in
     * place, without the copy through a grain buffer. */
    direct = in_cl == 0 && n == cb ? iov_flat(qiov, qoff, n) : NULL;
    if (!direct) {
        out = malloc(cb);
        if (!out) {
            ret = vd_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
    }
    olen = inflate_grain(direct ? direct : out, cb, data, dlen);
    if (olen < 0) {
        ret = vd_error_set(err, -EINVAL, "%s: compressed grain at 0x%" PRIx64
                           " cannot be inflated", fname, host);
        goto out;
    }
    if (in_cl + n > (uint64_t)olen) {
        ret = vd_error_set(err, -EINVAL, "%s: compressed grain at 0x%" PRIx64
                           " is too short", fname, host);
        goto out;
    }
    if (!direct) {
        vd_iov_from_buf(qiov, qoff, out + in_cl, n);
    }
out:
    free(buf);
    free(out);
    return ret;
}

/* seSparse data at [@host, +@n) for guest byte @off must lie inside the
 * extent's file: a grain number past it is a fault (QEMU reads zeros). */
static int grain_past_eof(vmdk_extent *e, uint64_t host, uint64_t n,
                          uint64_t off, vd_error *err)
{
    int64_t flen = vd_node_getlength(e->file->node);
    uint64_t skip;

    if (flen >= 0 && host <= (uint64_t)flen && n <= (uint64_t)flen - host) {
        return 0;
    }
    /* The first byte past the end. */
    skip = flen > 0 && (uint64_t)flen > host ? (uint64_t)flen - host : 0;
    return vd_error_set(err, -EIO, "%s: grain data at 0x%" PRIx64 " (guest "
                        "offset 0x%" PRIx64 ") is past the end of the file",
                        vd_node_filename(e->file->node), host + skip,
                        off + skip);
}

static int vmdk_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                       vd_iov *qiov, unsigned flags, vd_error *err)
{
    vmdk_state *s = node->opaque;
    uint64_t done = 0;

    (void)flags;
    while (done < bytes) {
        uint64_t o = off + done, host = 0, in_cl, n;
        vmdk_extent *e = find_extent(s, o / SECTOR);
        int r;

        if (!e) {
            return vd_error_set(err, -EIO, "%s: offset 0x%" PRIx64 " is in "
                                "no extent", s->filename, o);
        }
        pthread_mutex_lock(&s->lock);
        r = get_cluster(s, e, o, &host, NULL, err);
        in_cl = offset_in_cluster(e, o);
        n = e->grain_sectors * SECTOR - in_cl;
        /* Grains that follow each other in the file are read at once. */
        while (r == VMDK_OK && !e->flat && !e->compressed &&
               n < bytes - done && o + n < e->end_sector * SECTOR) {
            uint64_t h2 = 0;
            if (get_cluster(s, e, o + n, &h2, NULL, NULL) != VMDK_OK ||
                h2 != host + in_cl + n) {
                break;
            }
            n += e->grain_sectors * SECTOR;
        }
        pthread_mutex_unlock(&s->lock);
        if (r < 0) {
            return r;
        }
        if (n > e->end_sector * SECTOR - o) {
            n = e->end_sector * SECTOR - o;
        }
        if (n > bytes - done) {
            n = bytes - done;
        }
        if (r != VMDK_OK) {
            if (node->backing && r != VMDK_ZEROED) {
                vd_iov part;
                bool ok;
                pthread_mutex_lock(&s->lock);
                ok = cid_valid(s);
                pthread_mutex_unlock(&s->lock);
                if (!ok) {
                    return vd_error_set(err, -EINVAL, "%s: the backing "
                                        "file's CID is not the image's "
                                        "parentCID", s->filename);
                }
                r = vd_iov_init_slice(&part, qiov, done, n);
                if (r < 0) {
                    return vd_error_set(err, r, "out of memory");
                }
                r = vd_child_preadv(node->backing, o, n, &part, 0, err);
                vd_iov_destroy(&part);
                if (r < 0) {
                    return r;
                }
            } else {
                vd_iov_memset(qiov, done, 0, n);
            }
        } else if (e->sesparse &&
                   grain_past_eof(e, host + in_cl, n, o, err) < 0) {
            return -EIO;
        } else if (e->compressed) {
            r = read_compressed(s, e, host, in_cl, qiov, done, n, err);
            if (r < 0) {
                return r;
            }
        } else {
            vd_iov part;
            r = vd_iov_init_slice(&part, qiov, done, n);
            if (r < 0) {
                return vd_error_set(err, r, "out of memory");
            }
            r = vd_child_preadv(e->file, host + in_cl, n, &part, 0, err);
            vd_iov_destroy(&part);
            if (r < 0) {
                return r;
            }
        }
        done += n;
    }
    return 0;
}

/* ---- write ---- */

/* Rewrites the CID in the descriptor (QEMU's vmdk_write_cid: the
 * descriptor area is rewritten whole, DESC_SIZE bytes). */
static int write_cid(vmdk_state *s, uint32_t cid, vd_error *err)
{
    char desc[VMDK_DESC_SIZE], tail[VMDK_DESC_SIZE];
    int64_t len = vd_node_getlength(s->node->file->node);
    char *p, *t;
    int ret;

    memset(desc, 0, sizeof(desc));
    if (len > 0 && s->desc_offset < (uint64_t)len) {
        uint64_t n = (uint64_t)len - s->desc_offset;
        ret = vd_child_pread(s->node->file, s->desc_offset, desc,
                             n < sizeof(desc) ? n : sizeof(desc), err);
        if (ret < 0) {
            return ret;
        }
    }
    desc[sizeof(desc) - 1] = '\0';
    t = strstr(desc, "parentCID");
    if (!t) {
        return vd_error_set(err, -EINVAL, "%s: the descriptor has no "
                            "parentCID", s->filename);
    }
    snprintf(tail, sizeof(tail), "%s", t);
    p = strstr(desc, "CID");
    if (p) {
        size_t used;
        p += 4;
        snprintf(p, sizeof(desc) - (size_t)(p - desc), "%" PRIx32 "\n", cid);
        used = strlen(desc);
        snprintf(desc + used, sizeof(desc) - used, "%s", tail);
    }
    /* QEMU's write stops at the file's end rounded up to a sector (a
     * descriptor file of 356 bytes becomes 512 bytes long). */
    {
        uint64_t end = len > 0 ? ((uint64_t)len + SECTOR - 1) / SECTOR * SECTOR
                               : 0, n = sizeof(desc);
        if (end <= s->desc_offset) {
            return 0;
        }
        if (n > end - s->desc_offset) {
            n = end - s->desc_offset;
        }
        ret = vd_child_pwrite(s->node->file, s->desc_offset, desc, n, 0, err);
    }
    if (ret == 0) {
        ret = vd_node_flush(s->node->file->node, err);
    }
    return ret;
}

/* A GT entry and its redundant copy (QEMU's vmdk_L2update). */
static int update_gte(vmdk_state *s, vmdk_extent *e, const vmdk_loc *loc,
                      uint32_t v, vd_error *err)
{
    uint8_t le[4];
    int ret;

    (void)s;
    put_le32(le, v);
    ret = vd_child_pwrite(e->file, (uint64_t)loc->gt * SECTOR +
                          4ull * loc->l2_index, le, 4, 0, err);
    if (ret == 0 && e->rgd) {
        ret = vd_child_pwrite(e->file, (uint64_t)e->rgd[loc->l1_index] *
                              SECTOR + 4ull * loc->l2_index, le, 4, 0, err);
    }
    if (ret == 0) {
        *loc->entry = v;
    }
    return ret;
}

/* The new grain @host of guest byte @off: the parts the write leaves
 * out, [0, @skip_start) and [@skip_end, grain), from the backing file or
 * zeros (QEMU's get_whole_cluster). */
static int fill_grain(vmdk_state *s, vmdk_extent *e, uint64_t host,
                      uint64_t off, uint64_t skip_start, uint64_t skip_end,
                      bool zeroed, vd_error *err)
{
    uint64_t cb = e->grain_sectors * SECTOR;
    uint64_t start = off - offset_in_cluster(e, off);
    bool from_backing = s->node->backing && !zeroed;
    uint8_t *buf;
    int ret = 0;

    if (skip_start == 0 && skip_end == cb) {
        return 0;
    }
    buf = calloc(1, cb);
    if (!buf) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    if (s->node->backing && !cid_valid(s)) {
        free(buf);
        return vd_error_set(err, -EINVAL, "%s: the backing file's CID is "
                            "not the image's parentCID", s->filename);
    }
    if (skip_start) {
        if (from_backing) {
            ret = vd_child_pread(s->node->backing, start, buf, skip_start,
                                 err);
        }
        if (ret == 0) {
            ret = vd_child_pwrite(e->file, host, buf, skip_start, 0, err);
        }
    }
    if (ret == 0 && skip_end < cb) {
        if (from_backing) {
            ret = vd_child_pread(s->node->backing, start + skip_end,
                                 buf + skip_end, cb - skip_end, err);
        }
        if (ret == 0) {
            ret = vd_child_pwrite(e->file, host + skip_end, buf + skip_end,
                                  cb - skip_end, 0, err);
        }
    }
    free(buf);
    return ret;
}

/* One grain deflated behind its marker (guest byte @off), padded to a
 * sector: *@out (malloc'd, at least a grain long, zeros after the data)
 * and its length *@total. Needs no lock: pwritev deflates before it
 * takes the lock, so that convert's workers compress in parallel. @z: a
 * stream from deflateInit at the default level, as zlib's compress()
 * makes one for each call; kept across grains (deflateReset makes the
 * same output as a new stream) it spares the 256 KiB of state that each
 * compress() allocates and clears. NULL: one for this grain. */
static int deflate_grain(vmdk_state *s, z_stream *z, uint64_t cb,
                         uint64_t off, vd_iov *qiov, uint64_t qoff,
                         uint64_t n, uint8_t **out, uint64_t *total,
                         vd_error *err)
{
    uint64_t cap = 2 * cb, clen, keep;
    uint8_t *flat = iov_flat(qiov, qoff, n);
    uint8_t *src = flat ? flat : malloc(n ? n : 1);
    uint8_t *dst = malloc(cap + VMDK_MARKER_BYTES + SECTOR);
    z_stream own;
    int r;

    if (!src || !dst) {
        if (!flat) {
            free(src);
        }
        free(dst);
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    if (!flat) {
        vd_iov_to_buf(qiov, qoff, src, n);
    }
    if (!z) {
        memset(&own, 0, sizeof(own));
        z = deflateInit(&own, Z_DEFAULT_COMPRESSION) == Z_OK ? &own : NULL;
    } else if (deflateReset(z) != Z_OK) {
        z = NULL;
    }
    r = Z_STREAM_ERROR;
    if (z && n <= UINT32_MAX && cap <= UINT32_MAX) {
        z->next_in = src;
        z->avail_in = (uInt)n;
        z->next_out = dst + VMDK_MARKER_BYTES;
        z->avail_out = (uInt)cap;
        r = deflate(z, Z_FINISH);
    }
    clen = z ? z->total_out : 0;
    if (z == &own) {
        deflateEnd(&own);
    }
    if (!flat) {
        free(src);
    }
    if (r != Z_STREAM_END || clen == 0) {
        free(dst);
        return vd_error_set(err, -EINVAL, "%s: compressing a grain failed",
                            s->filename);
    }
    put_le64(dst, off / SECTOR);
    put_le32(dst + 8, (uint32_t)clen);
    *total = (VMDK_MARKER_BYTES + clen + SECTOR - 1) / SECTOR * SECTOR;
    /* append_grain writes at least a grain: zeros after the data. */
    keep = *total > cb ? *total : cb;
    memset(dst + VMDK_MARKER_BYTES + clen, 0,
           keep - VMDK_MARKER_BYTES - clen);
    *out = dst;
    return 0;
}

/* Appends a deflated grain at the extent's end (QEMU's vmdk_write_extent
 * for compressed extents). Lock held. */
static int append_grain(vmdk_extent *e, const uint8_t *buf, uint64_t total,
                        uint64_t *host, vd_error *err)
{
    uint64_t cb = e->grain_sectors * SECTOR;
    int ret;

    *host = e->next_sector * SECTOR;
    /* QEMU allocates a whole grain of zeros first, then writes the
     * compressed data over its start: the zeros past the data stay at
     * the end of the file (the next grain overwrites them). */
    ret = vd_child_pwrite(e->file, *host, buf, total > cb ? total : cb, 0,
                          err);
    if (ret == 0) {
        e->next_sector += total / SECTOR;
    }
    return ret;
}

/* @zero: a zero write (only whole grains of a zeroed-grain extent;
 * -ENOTSUP otherwise, so the core writes zeros instead). @dry: only
 * check that it would work. @pre: the request (one grain of a
 * compressed extent) already deflated, @pre_total bytes. Lock held. */
static int do_write(vmdk_state *s, uint64_t off, uint64_t bytes,
                    vd_iov *qiov, bool zero, bool dry, const uint8_t *pre,
                    uint64_t pre_total, vd_error *err)
{
    uint64_t done = 0;
    int ret;

    if (off + bytes > s->total_sectors * SECTOR) {
        return vd_error_set(err, -EIO, "Wrong offset: offset=0x%" PRIx64
                            " total_sectors=0x%" PRIx64, off,
                            s->total_sectors);
    }
    while (done < bytes) {
        uint64_t o = off + done, host = 0, in_cl, n, cb;
        vmdk_extent *e = find_extent(s, o / SECTOR);
        vmdk_loc loc;
        int r;

        if (!e) {
            return vd_error_set(err, -EIO, "%s: offset 0x%" PRIx64 " is in "
                                "no extent", s->filename, o);
        }
        if (e->sesparse) {
            /* Never reached: seSparse extents are opened read only. */
            return -ENOTSUP;
        }
        cb = e->grain_sectors * SECTOR;
        in_cl = offset_in_cluster(e, o);
        n = cb - in_cl;
        if (n > bytes - done) {
            n = bytes - done;
        }
        r = get_cluster(s, e, o, &host, &loc, err);
        if (r < 0) {
            return r;
        }
        if (e->compressed && r == VMDK_OK) {
            return vd_error_set(err, -EIO, "Could not write to allocated "
                                "cluster for streamOptimized");
        }
        if (zero) {
            if (!e->has_zero_grain || in_cl || n < cb || e->flat) {
                return -ENOTSUP;
            }
            if (!loc.entry) {
                return vd_error_set(err, -EIO, "%s: no grain table for "
                                    "offset 0x%" PRIx64, s->filename, o);
            }
            if (!dry && r != VMDK_ZEROED) {
                ret = update_gte(s, e, &loc, VMDK_GTE_ZEROED, err);
                if (ret < 0) {
                    return ret;
                }
            }
            done += n;
            continue;
        }
        if (!e->flat && !loc.entry) {
            return vd_error_set(err, -EIO, "%s: no grain table for offset "
                                "0x%" PRIx64 " (grain directory entry %"
                                PRIu64 " is 0)", vd_node_filename(
                                e->file->node), o,
                                (o / SECTOR - (e->end_sector - e->sectors)) /
                                e->l1_entry_sectors);
        }
        if (e->compressed) {
            if (in_cl || (n < cb && o + n != e->end_sector * SECTOR)) {
                return vd_error_set(err, -EINVAL, "%s: streamOptimized "
                                    "images take whole grains only (write "
                                    "at 0x%" PRIx64 ")", s->filename, o);
            }
            if (!e->has_marker) {
                return vd_error_set(err, -EINVAL, "%s: compressed extent "
                                    "without markers", s->filename);
            }
            if (e->next_sector >= VMDK_EXTENT_MAX_SECTORS) {
                return vd_error_set(err, -EFBIG, "%s: the extent is full",
                                    s->filename);
            }
            if (pre && done == 0 && n == bytes) {
                ret = append_grain(e, pre, pre_total, &host, err);
            } else {
                uint8_t *buf = NULL;
                uint64_t total = 0;
                ret = deflate_grain(s, NULL, cb, o, qiov, done, n, &buf,
                                    &total, err);
                if (ret == 0) {
                    ret = append_grain(e, buf, total, &host, err);
                }
                free(buf);
            }
            if (ret == 0) {
                ret = update_gte(s, e, &loc, (uint32_t)(host / SECTOR), err);
            }
            if (ret < 0) {
                return ret;
            }
        } else {
            bool fresh = false;
            vd_iov part;
            if (r != VMDK_OK) {
                /* A new grain at the end of the file, its data first. */
                if (e->next_sector + e->grain_sectors >
                    VMDK_EXTENT_MAX_SECTORS) {
                    return vd_error_set(err, -EFBIG, "%s: the extent is "
                                        "full", s->filename);
                }
                host = e->next_sector * SECTOR;
                ret = fill_grain(s, e, host, o, in_cl, in_cl + n,
                                 r == VMDK_ZEROED, err);
                if (ret < 0) {
                    return ret;
                }
                e->next_sector += e->grain_sectors;
                fresh = true;
            }
            ret = vd_iov_init_slice(&part, qiov, done, n);
            if (ret < 0) {
                return vd_error_set(err, ret, "out of memory");
            }
            ret = vd_child_pwritev(e->file, host + in_cl, n, &part, 0, err);
            vd_iov_destroy(&part);
            if (ret == 0 && fresh) {
                ret = update_gte(s, e, &loc, (uint32_t)(host / SECTOR), err);
            }
            if (ret < 0) {
                return ret;
            }
        }
        done += n;
    }
    if (!s->cid_updated && !dry) {
        ret = write_cid(s, random32(), err);
        if (ret < 0) {
            return ret;
        }
        s->cid_updated = true;
    }
    return 0;
}

/* The threads that deflate the grains of one write to a compressed
 * extent (the CPU count, at most). */
#define VMDK_DEFLATE_THREADS 8

/* Grains deflated ahead of the one to append next, at most (per
 * thread: two). */
#define VMDK_DEFLATE_WINDOW (2 * VMDK_DEFLATE_THREADS)

typedef struct deflated_grain {
    uint8_t *buf;
    uint64_t total;
    int ret;
    bool ready;
} deflated_grain;

/* A write of several grains to a compressed extent: each thread takes the
 * next grain, deflates it with no lock held and leaves it in its slot;
 * whichever thread finds the grain next in order ready appends it and
 * those after it (grain order, the layout QEMU writes one grain after
 * the other). No thread waits for its own grain's turn, which on a busy
 * host cost a wake-up per grain: only for a free slot, the window
 * bounding the memory by the threads, not by the request. */
typedef struct deflate_batch {
    vmdk_state *s;
    vd_iov *qiov;
    uint64_t off, bytes, cb;
    size_t ngrains, window;
    size_t next;                /* the next grain to deflate; s->lock */
    size_t turn;                /* the next grain to append; s->lock */
    deflated_grain slot[VMDK_DEFLATE_WINDOW];   /* grain i: i % window */
    pthread_cond_t room;        /* turn moved on, or a failure */
    int ret;                    /* the first failure; s->lock */
    vd_error *err;
} deflate_batch;

/* Appends the ready grains that come next. s->lock held. */
static void append_ready(deflate_batch *b)
{
    vmdk_state *s = b->s;

    while (!b->ret && b->turn < b->ngrains &&
           b->slot[b->turn % b->window].ready) {
        deflated_grain *g = &b->slot[b->turn % b->window];
        uint64_t done = b->turn * b->cb;
        uint64_t n = b->bytes - done < b->cb ? b->bytes - done : b->cb;
        int r = g->ret;

        if (r == -ENOMEM) {
            vd_error_set(b->err, r, "out of memory");
        } else if (r < 0) {
            vd_error_set(b->err, r, "%s: compressing a grain failed",
                         s->filename);
        } else {
            r = do_write(s, b->off + done, n, b->qiov, false, false, g->buf,
                         g->total, b->err);
        }
        free(g->buf);
        g->buf = NULL;
        g->ready = false;
        if (r < 0) {
            b->ret = r;
        } else {
            b->turn++;
        }
        pthread_cond_broadcast(&b->room);
    }
}

static void *deflate_worker(void *opaque)
{
    deflate_batch *b = opaque;
    vmdk_state *s = b->s;
    z_stream z;
    bool have_z;

    memset(&z, 0, sizeof(z));
    have_z = deflateInit(&z, Z_DEFAULT_COMPRESSION) == Z_OK;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        uint64_t done, n, total = 0;
        uint8_t *buf = NULL;
        size_t i;
        int r;

        while (!b->ret && b->next < b->ngrains &&
               b->next >= b->turn + b->window) {
            pthread_cond_wait(&b->room, &s->lock);
        }
        if (b->ret || b->next >= b->ngrains) {
            break;
        }
        i = b->next++;
        pthread_mutex_unlock(&s->lock);

        done = i * b->cb;
        n = b->bytes - done < b->cb ? b->bytes - done : b->cb;
        r = have_z ? deflate_grain(s, &z, b->cb, b->off + done, b->qiov, done,
                                   n, &buf, &total, NULL)
                   : -ENOMEM;

        pthread_mutex_lock(&s->lock);
        if (b->ret) {
            free(buf);
            break;
        }
        b->slot[i % b->window] = (deflated_grain){ buf, total, r, true };
        append_ready(b);
    }
    pthread_mutex_unlock(&s->lock);
    if (have_z) {
        deflateEnd(&z);
    }
    return NULL;
}

/* [@off, +@bytes): whole grains of compressed extent @e (the last one may
 * end with the extent), deflated on up to the CPU count of threads, this
 * one included. Grains before a failing one stay written, as when the
 * grains go one by one. */
static int write_grains_parallel(vmdk_state *s, vmdk_extent *e, uint64_t off,
                                 uint64_t bytes, vd_iov *qiov, vd_error *err)
{
    static atomic_long ncpu;
    pthread_t tid[VMDK_DEFLATE_THREADS];
    deflate_batch b = {
        .s = s, .qiov = qiov, .off = off, .bytes = bytes,
        .cb = e->grain_sectors * SECTOR, .err = err,
    };
    size_t threads, started = 0;
    long cpus = atomic_load(&ncpu);

    if (!cpus) {
        cpus = sysconf(_SC_NPROCESSORS_ONLN);
        cpus = cpus > 0 ? cpus : 1;
        atomic_store(&ncpu, cpus);
    }
    b.ngrains = (bytes + b.cb - 1) / b.cb;
    pthread_cond_init(&b.room, NULL);
    threads = (size_t)cpus < b.ngrains ? (size_t)cpus : b.ngrains;
    if (threads > VMDK_DEFLATE_THREADS) {
        threads = VMDK_DEFLATE_THREADS;
    }
    b.window = 2 * threads;
    /* A thread that cannot be started leaves its grains to the others. */
    while (started + 1 < threads &&
           pthread_create(&tid[started], NULL, deflate_worker, &b) == 0) {
        started++;
    }
    deflate_worker(&b);
    for (size_t i = 0; i < started; i++) {
        pthread_join(tid[i], NULL);
    }
    /* After a failure: grains deflated but not appended. */
    for (size_t i = 0; i < b.window; i++) {
        free(b.slot[i].buf);
    }
    pthread_cond_destroy(&b.room);
    return b.ret;
}

static int vmdk_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                        vd_iov *qiov, unsigned flags, vd_error *err)
{
    vmdk_state *s = node->opaque;
    vmdk_extent *e = find_extent(s, off / SECTOR);
    uint8_t *pre = NULL;
    uint64_t pre_total = 0;
    int ret;

    (void)flags;
    if (e && e->compressed && offset_in_cluster(e, off) == 0 &&
        bytes > e->grain_sectors * SECTOR &&
        bytes <= e->end_sector * SECTOR - off) {
        return write_grains_parallel(s, e, off, bytes, qiov, err);
    }
    if (e && e->compressed && offset_in_cluster(e, off) == 0 &&
        bytes <= e->grain_sectors * SECTOR) {
        ret = deflate_grain(s, NULL, e->grain_sectors * SECTOR, off, qiov,
                            0, bytes, &pre, &pre_total, err);
        if (ret < 0) {
            return ret;
        }
    }
    pthread_mutex_lock(&s->lock);
    ret = do_write(s, off, bytes, qiov, false, false, pre, pre_total, err);
    pthread_mutex_unlock(&s->lock);
    free(pre);
    return ret;
}

static int vmdk_pwrite_zeroes(vd_node *node, uint64_t off, uint64_t bytes,
                              unsigned flags, vd_error *err)
{
    vmdk_state *s = node->opaque;
    int ret;

    (void)flags;
    pthread_mutex_lock(&s->lock);
    ret = do_write(s, off, bytes, NULL, true, true, NULL, 0, err);
    if (ret == 0) {
        ret = do_write(s, off, bytes, NULL, true, false, NULL, 0, err);
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

static int vmdk_block_status(vd_node *node, bool want_zero, uint64_t off,
                             uint64_t bytes, uint64_t *pnum, uint64_t *map,
                             vd_node **file, vd_error *err)
{
    vmdk_state *s = node->opaque;
    vmdk_extent *e = find_extent(s, off / SECTOR);
    uint64_t host = 0, in_cl, n;
    bool stale;
    int r;

    (void)want_zero;
    if (!e) {
        return vd_error_set(err, -EIO, "%s: offset 0x%" PRIx64 " is in no "
                            "extent", s->filename, off);
    }
    pthread_mutex_lock(&s->lock);
    r = get_cluster(s, e, off, &host, NULL, err);
    in_cl = offset_in_cluster(e, off);
    n = e->grain_sectors * SECTOR - in_cl;
    /* Following grains of the same kind (data at the following host
     * offsets) in the same extent join the answer: one call per run
     * rather than per grain. In a compressed extent deflated grains
     * join whatever their host offsets (the answer has none), so that a
     * streamOptimized image is read in runs of grains, not a grain per
     * answer (convert: one chunk, one hand-off between its workers). */
    while (r >= 0 && !e->flat && n < bytes &&
           off + n < e->end_sector * SECTOR) {
        uint64_t h2 = 0;
        int r2 = get_cluster(s, e, off + n, &h2, NULL, NULL);
        if (r2 != r || (r == VMDK_OK && !e->compressed &&
                        h2 != host + in_cl + n)) {
            break;
        }
        n += e->grain_sectors * SECTOR;
    }
    /* The core reads unallocated ranges from the backing file itself,
     * without this driver: while the backing file's CID is not the
     * image's parentCID, they are answered as the image's own data, so
     * that their reads come here and fail as QEMU's do (vmdk_preadv). */
    stale = r == VMDK_UNALLOC && node->backing && !cid_valid(s);
    pthread_mutex_unlock(&s->lock);
    if (r < 0) {
        return r;
    }
    if (n > e->end_sector * SECTOR - off) {
        n = e->end_sector * SECTOR - off;
    }
    *pnum = n < bytes ? n : bytes;
    switch (r) {
    case VMDK_UNALLOC:
        return stale ? VD_BLOCK_DATA | VD_BLOCK_ALLOCATED : 0;
    case VMDK_ZEROED:
        return VD_BLOCK_ZERO | VD_BLOCK_ALLOCATED;
    default:
        *file = e->file->node;
        if (e->compressed) {
            return VD_BLOCK_DATA | VD_BLOCK_ALLOCATED;
        }
        *map = host + in_cl;
        return VD_BLOCK_DATA | VD_BLOCK_OFFSET_VALID | VD_BLOCK_ALLOCATED |
               (e->flat ? VD_BLOCK_RECURSE : 0);
    }
}

/* ---- info ---- */

static char *json_str(const char *in)
{
    size_t n = 0;
    char *out, *o;

    for (const char *p = in; *p; p++) {
        n += ((unsigned char)*p < 0x20 || *p == '"' || *p == '\\') ? 6 : 1;
    }
    out = o = malloc(n + 1);
    if (!out) {
        return NULL;
    }
    for (const char *p = in; *p; p++) {
        if ((unsigned char)*p < 0x20 || *p == '"' || *p == '\\') {
            o += sprintf(o, "\\u%04x", (unsigned char)*p);
        } else {
            *o++ = *p;
        }
    }
    *o = '\0';
    return out;
}

static int vmdk_get_info(vd_node *node, vd_image_info *info, vd_error *err)
{
    vmdk_state *s = node->opaque;
    char *json = NULL, *ct = json_str(s->create_type);
    size_t len = 0;
    FILE *f;

    /* QEMU's vmdk_get_info answers only when the extents are alike
     * (qemu-img then shows neither a cluster size nor a dirty flag). */
    bool alike = s->n_extents > 0;
    for (int i = 1; i < s->n_extents; i++) {
        const vmdk_extent *a = &s->extents[0], *b = &s->extents[i];
        if (a->flat != b->flat || a->compressed != b->compressed ||
            (!a->flat && a->grain_sectors != b->grain_sectors)) {
            alike = false;
        }
    }
    if (alike && !s->extents[0].flat) {
        info->cluster_size = s->extents[0].grain_sectors * SECTOR;
    }
    info->has_dirty_flag = alike;
    info->dirty_flag = false;
    info->needs_compressed_writes = alike && s->extents[0].compressed;
    f = open_memstream(&json, &len);
    if (!f || !ct) {
        free(ct);
        if (f) {
            fclose(f);
            free(json);
        }
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    fprintf(f, "{\"type\": \"vmdk\", \"data\": {\"cid\": %" PRIu32 ", "
            "\"parent-cid\": %" PRIu32 ", \"create-type\": \"%s\", "
            "\"extents\": [", s->cid, s->parent_cid, ct);
    free(ct);
    for (int i = 0; i < s->n_extents; i++) {
        const vmdk_extent *e = &s->extents[i];
        char *fn = json_str(vd_node_filename(e->file->node));
        char *ty = json_str(e->type ? e->type : "");
        fprintf(f, "%s{", i ? ", " : "");
        if (e->compressed) {
            fprintf(f, "\"compressed\": true, ");
        }
        fprintf(f, "\"virtual-size\": %" PRIu64 ", \"filename\": \"%s\", ",
                e->sectors * SECTOR, fn ? fn : "");
        if (!e->flat) {
            fprintf(f, "\"cluster-size\": %" PRIu64 ", ",
                    e->grain_sectors * SECTOR);
        }
        fprintf(f, "\"format\": \"%s\"}", ty ? ty : "");
        free(fn);
        free(ty);
    }
    fprintf(f, "]}}");
    if (fclose(f) != 0) {
        free(json);
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    free(info->format_specific_json);
    info->format_specific_json = json;
    return 0;
}

/* QEMU's vmdk_co_check: every grain of every extent lies before the end
 * of its file; the first fault stops the check (one corruption, and the
 * check fails, as qemu-img reports it). No repairs. */
static int vmdk_check(vd_node *node, vd_check_result *res, unsigned fix,
                      vd_error *err)
{
    vmdk_state *s = node->opaque;
    uint64_t sector = 0;
    int ret = 0;

    (void)err;
    if (fix) {
        return -ENOTSUP;
    }
    pthread_mutex_lock(&s->lock);
    while (sector < s->total_sectors) {
        vmdk_extent *e = find_extent(s, sector);
        uint64_t host = 0;
        int r = e ? get_cluster(s, e, sector * SECTOR, &host, NULL, NULL)
                  : -EINVAL;
        if (!e) {
            fprintf(stderr, "ERROR: could not find extent for sector %"
                    PRIu64 "\n", sector);
            ret = -EINVAL;
            break;
        }
        if (r < 0) {
            fprintf(stderr, "ERROR: could not get cluster_offset for sector %"
                    PRIu64 "\n", sector);
            /* QEMU returns its VMDK_ERROR (-1) here: qemu-img says
             * "Check failed: Operation not permitted". */
            ret = -EPERM;
            break;
        }
        if (r == VMDK_OK) {
            int64_t len = vd_node_getlength(e->file->node);
            if (len < 0) {
                fprintf(stderr, "ERROR: could not get extent file length for "
                        "sector %" PRIu64 "\n", sector);
                ret = (int)len;
                break;
            }
            if (host >= (uint64_t)len) {
                fprintf(stderr, "ERROR: cluster offset for sector %" PRIu64
                        " points after EOF\n", sector);
                ret = -EINVAL;
                break;
            }
        }
        sector += e->grain_sectors;
    }
    pthread_mutex_unlock(&s->lock);
    if (ret < 0) {
        res->corruptions++;
    }
    return ret;
}

static int vmdk_truncate(vd_node *node, uint64_t size, bool exact,
                         vd_prealloc prealloc, vd_error *err)
{
    (void)node;
    (void)size;
    (void)exact;
    (void)prealloc;
    return vd_error_set(err, -ENOTSUP, "Image format driver does not "
                        "support resize");
}

/* ---- create (QEMU's vmdk_co_do_create and vmdk_init_extent) ---- */

static const vd_create_option vmdk_create_opts[] = {
    { "size", "size", "Virtual disk size", NULL },
    { "adapter_type", "string", "Virtual adapter type, can be one of ide "
      "(default), lsilogic, buslogic or legacyESX", NULL },
    { "backing_file", "string", "File name of a base image", NULL },
    { "backing_fmt", "string", "Must be 'vmdk' if present", NULL },
    { "compat6", "bool", "VMDK version 6 image", "off" },
    { "hwversion", "string", "VMDK hardware version", "undefined" },
    { "toolsversion", "string", "VMware guest tools version", NULL },
    { "subformat", "string", "VMDK flat extent format, can be one of "
      "{monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse "
      "| twoGbMaxExtentFlat | streamOptimized} ", NULL },
    { "zeroed_grain", "bool", "Enable efficient zero writes using the "
      "zeroed-grain GTE feature", NULL },
    { NULL, NULL, NULL, NULL },
};

static const char *const vmdk_subformats[] = {
    "monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat", "streamOptimized", NULL,
};
static const char *const vmdk_adapters[] = {
    "ide", "buslogic", "lsilogic", "legacyESX", NULL,
};

/* An enum option: the index of its value in @list (0 when not given),
 * or QEMU's qapi_enum_parse error. */
static int take_choice(vd_opts *opts, const char *key,
                       const char *const *list, const char *filename,
                       int *out, vd_error *err)
{
    char *v = vd_opts_take(opts, key);
    int i = 0;

    if (v) {
        while (list[i] && strcmp(v, list[i])) {
            i++;
        }
        if (!list[i]) {
            vd_error_set(err, -EINVAL, "%s: invalid parameter value: %s",
                         filename, v);
            free(v);
            return -EINVAL;
        }
        free(v);
    }
    *out = i;
    return 0;
}

/* The header, GDs and (sparse, zero) GTs of a new hosted sparse extent
 * of @size bytes in @file, or a flat extent's length. */
static int init_extent(vd_node *file, uint64_t size, bool flat,
                       bool compress, bool zeroed_grain, vd_error *err)
{
    uint8_t hdr[512];
    uint64_t grains, gt_sectors = 4, gt_count, gd_sectors, rgd, gd, gofs;
    uint8_t *gdb;
    vd_iov v;
    int ret;

    if (flat) {
        return vd_node_truncate(file, size, false, VD_PREALLOC_OFF, err);
    }
    grains = (size / SECTOR + 127) / 128;
    gt_count = (grains + 511) / 512;
    gd_sectors = (gt_count * 4 + SECTOR - 1) / SECTOR;
    rgd = 1 + 20;
    gd = rgd + gd_sectors + gt_sectors * gt_count;
    gofs = (gd + gd_sectors + gt_sectors * gt_count + 127) / 128 * 128;
    if (gofs + gt_count > VMDK_EXTENT_MAX_SECTORS) {
        return vd_error_set(err, -EFBIG, "extent of %" PRIu64 " bytes is "
                            "too large", size);
    }
    memset(hdr, 0, sizeof(hdr));
    memcpy(hdr, "KDMV", 4);
    put_le32(hdr + 4, compress ? 3 : zeroed_grain ? 2 : 1);
    put_le32(hdr + 8, VMDK4_FLAG_RGD | VMDK4_FLAG_NL_DETECT |
             (compress ? VMDK4_FLAG_COMPRESS | VMDK4_FLAG_MARKER : 0) |
             (zeroed_grain ? VMDK4_FLAG_ZERO_GRAIN : 0));
    put_le64(hdr + 12, size / SECTOR);
    put_le64(hdr + 20, 128);
    put_le64(hdr + 28, 1);
    put_le64(hdr + 36, 20);
    put_le32(hdr + 44, 512);
    put_le64(hdr + 48, rgd);
    put_le64(hdr + 56, gd);
    put_le64(hdr + 64, gofs);
    memcpy(hdr + 73, "\n \r\n", 4);
    put_le16(hdr + 77, compress ? 1 : 0);
    vd_iov_init_buf(&v, hdr, 79);
    ret = vd_node_pwritev(file, 0, 79, &v, 0, err);
    if (ret == 0) {
        ret = vd_node_truncate(file, gofs * SECTOR, false, VD_PREALLOC_OFF,
                               err);
    }
    if (ret < 0) {
        return ret;
    }
    gdb = calloc(1, gd_sectors * SECTOR);
    if (!gdb) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    for (int pass = 0; pass < 2 && ret == 0; pass++) {
        uint64_t at = pass ? gd : rgd;
        for (uint64_t i = 0; i < gt_count; i++) {
            put_le32(gdb + 4 * i, (uint32_t)(at + gd_sectors +
                                             i * gt_sectors));
        }
        vd_iov_init_buf(&v, gdb, gd_sectors * SECTOR);
        ret = vd_node_pwritev(file, at * SECTOR, gd_sectors * SECTOR, &v, 0,
                              err);
    }
    free(gdb);
    return ret;
}

/* Creates extent file @path (protocol options @popts) and its content. */
static int create_extent(const char *path, vd_opts *popts, uint64_t size,
                         bool flat, bool compress, bool zeroed_grain,
                         vd_node **keep, vd_error *err)
{
    vd_opts *o = vd_opts_clone(popts);
    vd_node *file = NULL;
    int ret;

    if (!o) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    vd_opts_set(o, "size", "0");
    ret = vd_create_protocol(path, o, err);
    vd_opts_free(&o);
    if (ret == 0) {
        ret = vd_open_protocol(&file, path, VD_NODE_RDWR, err);
    }
    if (ret == 0) {
        ret = init_extent(file, size, flat, compress, zeroed_grain, err);
    }
    if (ret == 0 && keep) {
        *keep = file;
    } else if (file) {
        vd_node_unref(file);
    }
    return ret;
}

static int backing_cid(const char *filename, const char *bfile,
                       uint32_t *cid, vd_error *err)
{
    const char *slash = strrchr(filename, '/');
    char *full;
    vd_node *b = NULL;
    int ret;

    if (bfile[0] == '/' || !slash) {
        full = strdup(bfile);
    } else if (asprintf(&full, "%.*s%s", (int)(slash - filename + 1),
                        filename, bfile) < 0) {
        full = NULL;
    }
    if (!full) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    ret = vd_node_open(&b, full, NULL, NULL, VD_NODE_NO_BACKING, err);
    free(full);
    if (ret < 0) {
        return ret;
    }
    if (b->drv != &vd_driver_vmdk) {
        ret = vd_error_set(err, -EINVAL, "%s: Invalid backing file format: "
                           "%s. Must be vmdk.", filename, b->drv->name);
    } else {
        *cid = ((vmdk_state *)b->opaque)->cid;
    }
    vd_node_unref(b);
    return ret;
}

static int vmdk_create(const char *filename, vd_opts *opts, vd_error *err)
{
    uint64_t size = 0, extent_size, created;
    char *v, *bfile = NULL, *bfmt = NULL, *hw = NULL, *tools = NULL;
    char *path = NULL, *prefix = NULL, *postfix = NULL, *desc = NULL;
    char *lines = NULL, parent_line[4200] = "";
    size_t lines_len = 0;
    FILE *lf = NULL;
    bool compat6 = false, zeroed = false, flat, split, compress;
    int sub = 0, adapter = 0, idx, ret;
    uint32_t parent_cid = 0xffffffff;
    vd_node *blk = NULL;
    vd_opts *popts = NULL;

    v = vd_opts_take(opts, "size");
    if (v) {
        ret = vd_parse_size(v, &size);
        free(v);
        if (ret < 0) {
            return vd_error_set(err, -EINVAL, "%s: Parameter 'size' expects "
                                "a non-negative number below 2^64", filename);
        }
        if (size > VD_MAX_LENGTH) {
            return vd_error_set(err, -EFBIG, "%s: Image size is too large",
                                filename);
        }
        size = (size + SECTOR - 1) / SECTOR * SECTOR;
    }
    bfile = vd_opts_take(opts, "backing_file");
    bfmt = vd_opts_take(opts, "backing_fmt");
    hw = vd_opts_take(opts, "hwversion");
    tools = vd_opts_take(opts, "toolsversion");
    ret = vd_opts_take_bool(opts, "compat6", false, &compat6, err);
    if (ret == 0) {
        ret = vd_opts_take_bool(opts, "zeroed_grain", false, &zeroed, err);
    }
    if (ret < 0) {
        goto out;
    }
    ret = take_choice(opts, "adapter_type", vmdk_adapters, filename,
                      &adapter, err);
    if (ret == 0) {
        ret = take_choice(opts, "subformat", vmdk_subformats, filename, &sub,
                          err);
    }
    if (ret < 0) {
        goto out;
    }
    if (compat6) {
        if (hw && strcmp(hw, "undefined")) {
            ret = vd_error_set(err, -EINVAL, "%s: compat6 cannot be enabled "
                               "with hwversion set", filename);
            goto out;
        }
        free(hw);
        hw = strdup("6");
    }
    if (hw && !strcmp(hw, "undefined")) {
        free(hw);
        hw = NULL;
    }
    if (bfmt && strcmp(bfmt, "vmdk")) {
        ret = vd_error_set(err, -EINVAL, "%s: backing_file must be a vmdk "
                           "image", filename);
        goto out;
    }
    flat = sub == 1 || sub == 3;
    split = sub == 2 || sub == 3;
    compress = sub == 4;
    if (flat && bfile) {
        ret = vd_error_set(err, -ENOTSUP, "%s: Flat image can't have backing "
                           "file", filename);
        goto out;
    }
    if (flat && zeroed) {
        ret = vd_error_set(err, -ENOTSUP, "%s: Flat image can't enable "
                           "zeroed grain", filename);
        goto out;
    }
    if (bfile) {
        ret = backing_cid(filename, bfile, &parent_cid, err);
        if (ret < 0) {
            goto out;
        }
        snprintf(parent_line, sizeof(parent_line),
                 "parentFileNameHint=\"%s\"", bfile);
    }

    /* The file names: DIR/PREFIX-s001.POSTFIX (QEMU's filename_decompose). */
    {
        const char *base = strrchr(filename, '/'), *dot;
        base = base ? base + 1 : filename;
        dot = strrchr(base, '.');
        path = strndup(filename, (size_t)(base - filename));
        prefix = strndup(base, dot ? (size_t)(dot - base) : strlen(base));
        postfix = strdup(dot ? dot : "");
        lf = open_memstream(&lines, &lines_len);
        popts = vd_opts_clone(opts);
        if (!path || !prefix || !postfix || !lf || !popts) {
            ret = vd_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        for (const char *k = vd_opts_first_key(opts); k;
             k = vd_opts_first_key(opts)) {
            vd_opts_del(opts, k);
        }
    }
    extent_size = split ? 2ull << 30 : size;
    created = !split && !flat ? extent_size : 0;
    /* The image file: the sparse extent itself, or (empty) the file the
     * descriptor goes into. */
    ret = create_extent(filename, popts, created, split || flat, compress,
                        zeroed, &blk, err);
    if (ret < 0) {
        goto out;
    }
    if (!split && !flat) {
        fprintf(lf, "RW %" PRIu64 " SPARSE \"%s%s\"\n", created / SECTOR,
                prefix, postfix);
    }
    for (idx = 1; created < size; idx++) {
        uint64_t cur = size - created < extent_size ? size - created
                                                     : extent_size;
        char *ext, *name;
        if (split) {
            ret = asprintf(&name, "%s-%c%03d%s", prefix, flat ? 'f' : 's',
                           idx, postfix);
        } else {
            ret = asprintf(&name, "%s-flat%s", prefix, postfix);
        }
        if (ret < 0 || asprintf(&ext, "%s%s", path, name) < 0) {
            if (ret >= 0) {
                free(name);
            }
            ret = vd_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
        ret = create_extent(ext, popts, cur, flat, compress, zeroed, NULL,
                            err);
        free(ext);
        if (ret < 0) {
            free(name);
            goto out;
        }
        fprintf(lf, flat ? "RW %" PRIu64 " FLAT \"%s\" 0\n"
                         : "RW %" PRIu64 " SPARSE \"%s\"\n",
                cur / SECTOR, name);
        free(name);
        created += cur;
    }
    fclose(lf);
    lf = NULL;
    {
        uint32_t heads = adapter == 0 ? 16 : 255;
        ret = asprintf(&desc,
                       "# Disk DescriptorFile\n"
                       "version=1\n"
                       "CID=%" PRIx32 "\n"
                       "parentCID=%" PRIx32 "\n"
                       "createType=\"%s\"\n"
                       "%s"
                       "\n"
                       "# Extent description\n"
                       "%s"
                       "\n"
                       "# The Disk Data Base\n"
                       "#DDB\n"
                       "\n"
                       "ddb.virtualHWVersion = \"%s\"\n"
                       "ddb.geometry.cylinders = \"%" PRIu64 "\"\n"
                       "ddb.geometry.heads = \"%" PRIu32 "\"\n"
                       "ddb.geometry.sectors = \"63\"\n"
                       "ddb.adapterType = \"%s\"\n"
                       "ddb.toolsVersion = \"%s\"\n",
                       random32(), parent_cid, vmdk_subformats[sub],
                       parent_line, lines, hw ? hw : "4",
                       size / ((uint64_t)63 * heads * SECTOR), heads,
                       vmdk_adapters[adapter], tools ? tools : "2147483647");
        if (ret < 0) {
            desc = NULL;
            ret = vd_error_set(err, -ENOMEM, "out of memory");
            goto out;
        }
    }
    {
        size_t dlen = strlen(desc);
        uint64_t doff = !split && !flat ? 0x200 : 0;
        if (doff && dlen > VMDK_DESC_SIZE) {
            ret = vd_error_set(err, -EINVAL, "%s: the descriptor is too long "
                               "(%zu bytes)", filename, dlen);
            goto out;
        }
        vd_iov dv;
        vd_iov_init_buf(&dv, desc, dlen);
        ret = vd_node_pwritev(blk, doff, dlen, &dv, 0, err);
        if (ret < 0) {
            vd_error_prepend(err, "%s: Could not write description: ",
                             filename);
            goto out;
        }
        if (doff == 0) {
            ret = vd_node_truncate(blk, dlen, false, VD_PREALLOC_OFF, err);
        }
    }
out:
    if (lf) {
        fclose(lf);
    }
    if (blk) {
        vd_node_unref(blk);
    }
    vd_opts_free(&popts);
    free(lines);
    free(desc);
    free(path);
    free(prefix);
    free(postfix);
    free(bfile);
    free(bfmt);
    free(hw);
    free(tools);
    return ret;
}

const vd_driver vd_driver_vmdk = {
    .name = "vmdk",
    .instance_size = sizeof(vmdk_state),
    .is_format = true,
    .supports_backing = true,
    .supports_compressed = true,
    .create_opts = vmdk_create_opts,
    .probe = vmdk_probe,
    .create = vmdk_create,
    .open = vmdk_open,
    .close = vmdk_close,
    .preadv = vmdk_preadv,
    .pwritev = vmdk_pwritev,
    .pwrite_zeroes = vmdk_pwrite_zeroes,
    .block_status = vmdk_block_status,
    .getlength = vmdk_getlength,
    .get_info = vmdk_get_info,
    .truncate = vmdk_truncate,
    .check = vmdk_check,
};
