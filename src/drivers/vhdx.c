/*
 * The vhdx driver: Hyper-V's VHDX images (Microsoft's VHDX format
 * specification 1.0), as QEMU 7.2's block/vhdx.c and vhdx-log.c read,
 * write, replay and create them. The log's reading and replay are in
 * this file too: they share the header and region code, and the log is
 * only touched at open.
 *
 * Layout (little-endian; GUIDs stored in Microsoft's mixed order). The
 * first MiB holds the file identifier ("vhdxfile" and a UTF-16 creator
 * name), two 4 KiB headers at 64 and 128 KiB (CRC-32C over the 4 KiB,
 * the one with the higher sequence number is current; they hold the
 * log's place and its GUID, non-zero while the log must be replayed) and
 * two copies of the 64 KiB region table at 192 and 256 KiB, which place
 * the BAT and the metadata region. The metadata region starts with a
 * 64 KiB table of items (file parameters: block size, leave-blocks-
 * allocated, has-parent; the virtual size; page 83 data; the logical and
 * physical sector sizes; a parent locator for differencing images). The
 * BAT has one 64-bit entry per payload block (3 state bits, the file
 * offset in MiB in bits 20..63), with a sector bitmap entry after every
 * chunk_ratio payload entries.
 *
 * What QEMU does, and so vdisk:
 * - Header choice, region table and metadata checks as QEMU's; payload
 *   blocks NOT_PRESENT, UNDEFINED, UNMAPPED and ZERO read as zeros,
 *   FULLY_PRESENT from the file.
 * - A log whose GUID is set in the current header is replayed at a
 *   writable open (then the headers are rewritten with no log GUID); a
 *   read-only open of such an image is refused with QEMU's message.
 * - Writes allocate a whole block at the end of the file (rounded up to
 *   1 MiB), write the data, then the BAT entry. QEMU journals the 8-byte
 *   BAT update through the log; vdisk writes the data, flushes, writes
 *   the entry (one aligned 8-byte write, which a disk cannot tear) and
 *   flushes: a crash leaves either the old entry (the block reads as
 *   before, the new block is a leak past the end) or the new one with
 *   its data on disk, the same guarantee QEMU's log gives.
 * - The first guest write rewrites both headers (new data-write GUID).
 * - create: dynamic and fixed, QEMU's layout (log at 1 MiB, BAT, the
 *   metadata, data from the BAT's end + 5 MiB), block_state_zero.
 *
 * What vdisk refuses where QEMU would go on (docs/formats.md): regions
 * not 1 MiB aligned or past the end of the file, BAT entries that
 * overlap each other or any region, invalid block states, a dirty log
 * with no valid entry or with a broken active sequence.
 *
 * What vdisk adds: differencing images (which QEMU 7.2 refuses) are
 * read, the parent locator's path opened as the backing file and
 * partially present blocks read sector by sector through their chunk's
 * sector bitmap; writing to them is refused.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "core/block_int.h"
#include "drivers/simple-fmt.h"

#define KIB 1024ull
#define MIB (1024ull * 1024)
#define VHDX_HEADER_SIZE (4 * KIB)
#define VHDX_HEADER1_OFF (64 * KIB)
#define VHDX_HEADER2_OFF (128 * KIB)
#define VHDX_RT1_OFF (192 * KIB)
#define VHDX_RT2_OFF (256 * KIB)
#define VHDX_TABLE_SIZE (64 * KIB)
#define VHDX_SECTION_END MIB
#define VHDX_MAX_ENTRIES 2047
#define VHDX_BLOCK_MIN MIB
#define VHDX_BLOCK_MAX (256 * MIB)
#define VHDX_MAX_SIZE (64ull * 1024 * 1024 * MIB)
#define VHDX_MAX_SECTORS_PER_BLOCK (1ull << 23)
#define VHDX_LOG_SECTOR 4096u
/* The whole log is read into memory to be searched: bounded. */
#define VHDX_LOG_MAX (256 * MIB)

#define BAT_STATE_MASK 7ull
#define BAT_OFF_MASK 0xfffffffffff00000ull
enum {
    PAYLOAD_NOT_PRESENT = 0, PAYLOAD_UNDEFINED = 1, PAYLOAD_ZERO = 2,
    PAYLOAD_UNMAPPED = 3, PAYLOAD_UNMAPPED_V095 = 5,
    PAYLOAD_FULLY_PRESENT = 6, PAYLOAD_PARTIALLY_PRESENT = 7,
    SB_NOT_PRESENT = 0, SB_PRESENT = 6,
};

/* Header fields. */
enum {
    H_CHECKSUM = 4, H_SEQ = 8, H_FILE_GUID = 16, H_DATA_GUID = 32,
    H_LOG_GUID = 48, H_LOG_VERSION = 64, H_VERSION = 66, H_LOG_LENGTH = 68,
    H_LOG_OFFSET = 72,
};

/* A GUID in its on-disk bytes: data1..3 little-endian, then data4. */
#define GUID(d1, d2, d3, a, b, c, d, e, f, g, h)                          \
    { (d1) & 0xff, ((d1) >> 8) & 0xff, ((d1) >> 16) & 0xff,               \
      ((unsigned)(d1) >> 24) & 0xff, (d2) & 0xff, ((d2) >> 8) & 0xff,     \
      (d3) & 0xff, ((d3) >> 8) & 0xff, a, b, c, d, e, f, g, h }

static const uint8_t bat_guid[16] =
    GUID(0x2dc27766, 0xf623, 0x4200, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
         0x4a, 0x08);
static const uint8_t metadata_guid[16] =
    GUID(0x8b7ca206, 0x4790, 0x4b9a, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f,
         0x88, 0x6e);
static const uint8_t file_param_guid[16] =
    GUID(0xcaa16737, 0xfa36, 0x4d43, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44,
         0xe7, 0x6b);
static const uint8_t virtual_size_guid[16] =
    GUID(0x2fa54224, 0xcd1b, 0x4876, 0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b,
         0xf4, 0xb8);
static const uint8_t page83_guid[16] =
    GUID(0xbeca12ab, 0xb2e6, 0x4523, 0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00,
         0xc7, 0x46);
static const uint8_t logical_sector_guid[16] =
    GUID(0x8141bf1d, 0xa96f, 0x4709, 0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa,
         0xab, 0x5f);
static const uint8_t phys_sector_guid[16] =
    GUID(0xcda348c7, 0x445d, 0x4471, 0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51,
         0xc5, 0x56);
static const uint8_t parent_locator_guid[16] =
    GUID(0xa8d35f2d, 0xb30b, 0x454d, 0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34,
         0xab, 0x0c);

/* The metadata items (bits of vhdx_state.meta_present), in table order. */
enum { M_PARAMS, M_SIZE, M_PAGE83, M_LOGICAL, M_PHYSICAL, M_PARENT, M_N };
static const uint8_t *const meta_guids[M_N] = {
    file_param_guid, virtual_size_guid, page83_guid, logical_sector_guid,
    phys_sector_guid, parent_locator_guid,
};
static const uint32_t meta_len[M_N] = { 8, 8, 16, 4, 4, 0 };
static const char *const meta_names[M_N] = {
    "file parameters", "virtual disk size", "page 83 data",
    "logical sector size", "physical sector size", "parent locator",
};

typedef struct vhdx_region {
    uint64_t start, end;
    const char *what;
} vhdx_region;

typedef struct vhdx_state {
    pthread_mutex_t lock;
    const char *filename;
    uint8_t hdr[2][VHDX_HEADER_SIZE];   /* raw, as on disk */
    int cur;                            /* current header */
    uint8_t session_guid[16];
    bool first_write_done;
    bool log_replayed;
    bool corrupt;               /* BAT problems (only a check open goes on) */
    bool has_parent;            /* differencing: reads fall through */
    vhdx_region regions[4 + VHDX_MAX_ENTRIES];
    int nregions;
    uint64_t bat_offset, bat_rt_length, meta_offset, meta_length;
    uint32_t block_size, logical_sector, physical_sector;
    uint8_t page83[16];
    uint32_t param_bits;
    uint64_t virtual_size;
    uint64_t chunk_ratio;
    uint64_t data_blocks;
    uint64_t bat_entries;
    uint64_t *bat;
} vhdx_state;

/* ---- CRC-32C (Castagnoli), reflected, table-driven ---- */

static uint32_t crc32c_table[256];
static pthread_once_t crc32c_once = PTHREAD_ONCE_INIT;

static void crc32c_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) {
            c = c & 1 ? (c >> 1) ^ 0x82f63b78u : c >> 1;
        }
        crc32c_table[i] = c;
    }
}

static uint32_t crc32c(uint32_t crc, const uint8_t *p, size_t n)
{
    pthread_once(&crc32c_once, crc32c_init);
    while (n--) {
        crc = crc32c_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    }
    return crc;
}

/* VHDX's checksum of @buf with its 4-byte field at @ck counted as zero:
 * the standard CRC-32C (seeded with all ones, inverted at the end). */
static uint32_t vhdx_csum(const uint8_t *buf, size_t len, size_t ck)
{
    static const uint8_t zero[4];
    uint32_t c = crc32c(0xffffffffu, buf, ck);

    c = crc32c(c, zero, 4);
    return ~crc32c(c, buf + ck + 4, len - ck - 4);
}

static bool csum_ok(const uint8_t *buf, size_t len, size_t ck)
{
    return vhdx_csum(buf, len, ck) == fmt_rd32(buf + ck);
}

static void csum_set(uint8_t *buf, size_t len, size_t ck)
{
    fmt_wr32(buf + ck, vhdx_csum(buf, len, ck));
}

static bool guid_zero(const uint8_t *g)
{
    static const uint8_t z[16];
    return memcmp(g, z, 16) == 0;
}

static void guid_generate(uint8_t *g)
{
    size_t got = 0;

    while (got < 16) {
        ssize_t r = getrandom(g + got, 16 - got, 0);
        if (r <= 0) {
            for (; got < 16; got++) {
                g[got] = (uint8_t)rand();
            }
            break;
        }
        got += (size_t)r;
    }
    /* A version 4 UUID, as QEMU's uuid_generate() bytes. */
    g[6] = (g[6] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
}

static bool is_pow2(uint64_t v)
{
    return v && !(v & (v - 1));
}

static int vhdx_probe(const uint8_t *buf, size_t len, const char *filename)
{
    (void)filename;
    return len >= 8 && memcmp(buf, "vhdxfile", 8) == 0 ? 100 : 0;
}

/* ---- regions: what must never overlap ---- */

static const vhdx_region *region_overlap(vhdx_state *s, uint64_t start,
                                         uint64_t len)
{
    /* Newest first, as QEMU's list (its messages name the same one). */
    for (int i = s->nregions - 1; i >= 0; i--) {
        if (start < s->regions[i].end && start + len > s->regions[i].start) {
            return &s->regions[i];
        }
    }
    return NULL;
}

static void region_add(vhdx_state *s, uint64_t start, uint64_t len,
                       const char *what)
{
    s->regions[s->nregions++] = (vhdx_region){ start, start + len, what };
}

/* ---- headers ---- */

static const uint8_t *cur_hdr(vhdx_state *s)
{
    return s->hdr[s->cur];
}

static int vhdx_read_headers(vd_node *node, vhdx_state *s, vd_error *err)
{
    bool valid[2];
    uint64_t seq[2];
    int ret;

    for (int i = 0; i < 2; i++) {
        ret = vd_child_pread(node->file, i ? VHDX_HEADER2_OFF
                                           : VHDX_HEADER1_OFF,
                             s->hdr[i], VHDX_HEADER_SIZE, NULL);
        if (ret < 0) {
            return vd_error_set(err, ret, "cannot read the VHDX headers");
        }
        valid[i] = memcmp(s->hdr[i], "head", 4) == 0 &&
                   csum_ok(s->hdr[i], VHDX_HEADER_SIZE, H_CHECKSUM) &&
                   fmt_rd32(s->hdr[i] + H_LOG_VERSION) >> 16 == 1;
        seq[i] = fmt_rd64(s->hdr[i] + H_SEQ);
    }
    if (valid[0] && valid[1]) {
        if (seq[0] == seq[1]) {
            /* Disk2VHD writes two identical headers: not corrupt. */
            if (memcmp(s->hdr[0], s->hdr[1], 80) != 0) {
                return vd_error_set(err, -EINVAL, "No valid VHDX header "
                                    "found (both headers have sequence "
                                    "number %" PRIu64 ")", seq[0]);
            }
            s->cur = 0;
        } else {
            s->cur = seq[1] > seq[0];
        }
    } else if (valid[0] || valid[1]) {
        s->cur = valid[1];
    } else {
        return vd_error_set(err, -EINVAL, "No valid VHDX header found "
                            "(bad signature, version or checksum)");
    }
    return 0;
}

/* Writes the non-current header as the new current one (QEMU's
 * vhdx_update_header): sequence + 1, this session's file-write GUID, a
 * new data-write GUID if @new_data, and @log_guid. Flushed. */
static int vhdx_update_header(vd_node *node, vhdx_state *s, bool new_data,
                              const uint8_t *log_guid, vd_error *err)
{
    int idx = !s->cur;
    uint8_t *h = s->hdr[idx];
    int ret;

    memcpy(h, s->hdr[s->cur], VHDX_HEADER_SIZE);
    fmt_wr64(h + H_SEQ, fmt_rd64(s->hdr[s->cur] + H_SEQ) + 1);
    memcpy(h + H_FILE_GUID, s->session_guid, 16);
    if (new_data) {
        guid_generate(h + H_DATA_GUID);
    }
    if (log_guid) {
        memcpy(h + H_LOG_GUID, log_guid, 16);
    }
    csum_set(h, VHDX_HEADER_SIZE, H_CHECKSUM);
    ret = vd_child_pwrite(node->file, idx ? VHDX_HEADER2_OFF
                                          : VHDX_HEADER1_OFF,
                          h, VHDX_HEADER_SIZE, 0, err);
    if (ret == 0) {
        ret = vd_node_flush(node->file->node, err);
    }
    if (ret < 0) {
        vd_error_prepend(err, "%s: cannot write a VHDX header: ",
                         s->filename);
        return ret;
    }
    s->cur = idx;
    return 0;
}

static int vhdx_update_headers(vd_node *node, vhdx_state *s, bool new_data,
                               const uint8_t *log_guid, vd_error *err)
{
    int ret = vhdx_update_header(node, s, new_data, log_guid, err);
    return ret < 0 ? ret : vhdx_update_header(node, s, new_data, log_guid,
                                              err);
}

/* ---- region table ---- */

static int vhdx_read_regions(vd_node *node, vhdx_state *s, int64_t flen,
                             vd_error *err)
{
    uint8_t *rt = malloc(VHDX_TABLE_SIZE);
    bool have_bat = false, have_meta = false;
    uint32_t count;
    int ret = 0;

    if (!rt) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    ret = vd_child_pread(node->file, VHDX_RT1_OFF, rt, VHDX_TABLE_SIZE,
                         NULL);
    if (ret < 0) {
        vd_error_set(err, ret, "cannot read the region table");
        goto out;
    }
    if (memcmp(rt, "regi", 4) != 0) {
        ret = vd_error_set(err, -EINVAL, "bad region table signature");
        goto out;
    }
    if (!csum_ok(rt, VHDX_TABLE_SIZE, 4)) {
        ret = vd_error_set(err, -EINVAL, "region table checksum "
                           "mismatch");
        goto out;
    }
    count = fmt_rd32(rt + 8);
    if (count > VHDX_MAX_ENTRIES) {
        ret = vd_error_set(err, -EINVAL, "region table has %" PRIu32
                           " entries (at most 2047)", count);
        goto out;
    }
    for (uint32_t i = 0; i < count; i++) {
        const uint8_t *e = rt + 16 + 32 * (size_t)i;
        uint64_t off = fmt_rd64(e + 16), len = fmt_rd32(e + 24);
        uint32_t bits = fmt_rd32(e + 28);
        bool is_bat = !memcmp(e, bat_guid, 16);
        bool is_meta = !memcmp(e, metadata_guid, 16);
        const char *what = is_bat ? "BAT" : is_meta ? "metadata region"
                                                    : "region";
        const vhdx_region *o;

        if (off % MIB || len % MIB || len == 0) {
            ret = vd_error_set(err, -EINVAL, "%s at 0x%" PRIx64 " (length"
                               " 0x%" PRIx64 ") is not 1 MiB aligned",
                               what, off, len);
            goto out;
        }
        if (off > (uint64_t)flen || len > (uint64_t)flen - off) {
            ret = vd_error_set(err, -EINVAL, "%s at 0x%" PRIx64 " (length"
                               " 0x%" PRIx64 ") is past the end of the file",
                               what, off, len);
            goto out;
        }
        o = region_overlap(s, off, len);
        if (o) {
            ret = vd_error_set(err, -EINVAL, "%s at 0x%" PRIx64
                               " overlaps the %s", what, off,
                               o->what);
            goto out;
        }
        region_add(s, off, len, what);
        if (is_bat || is_meta) {
            if ((is_bat && have_bat) || (is_meta && have_meta)) {
                ret = vd_error_set(err, -EINVAL, "the region table has "
                                   "two %s entries", what);
                goto out;
            }
            if (is_bat) {
                have_bat = true;
                s->bat_offset = off;
                s->bat_rt_length = len;
            } else {
                have_meta = true;
                s->meta_offset = off;
                s->meta_length = len;
            }
        } else if (bits & 1) {
            ret = vd_error_set(err, -ENOTSUP, "unsupported required "
                               "region in the region table");
            goto out;
        }
    }
    if (!have_bat || !have_meta) {
        ret = vd_error_set(err, -EINVAL, "the region table has no %s",
                           have_bat ? "metadata region" : "BAT");
    }
out:
    free(rt);
    return ret;
}

/* ---- the log ---- */

typedef struct vhdx_log {
    uint8_t *buf;           /* the whole log */
    uint64_t off, len;      /* where it is in the file */
    const uint8_t *guid;
} vhdx_log;

/* A 4 KiB log sector at @pos (circular). */
static const uint8_t *log_sector(const vhdx_log *l, uint64_t pos)
{
    return l->buf + pos % l->len;
}

/* Whether the entry at @pos is complete and consistent; sets *@len and
 * *@seq. *@bad: what is wrong with an entry that has the signature and
 * the log's GUID (NULL when it is not one of this log's at all). */
static bool log_entry_valid(const vhdx_log *l, uint64_t pos, uint64_t flen,
                            uint64_t *len, uint64_t *seq, const char **bad)
{
    const uint8_t *h = log_sector(l, pos);
    uint32_t elen = fmt_rd32(h + 8), tail = fmt_rd32(h + 12);
    uint32_t ndesc = fmt_rd32(h + 24);
    uint64_t last = fmt_rd64(h + 56), dsec, ndata = 0;
    uint32_t crc = 0xffffffffu;
    static const uint8_t zero[4];

    *bad = NULL;
    if (memcmp(h, "loge", 4) != 0 || memcmp(h + 32, l->guid, 16) != 0) {
        return false;
    }
    *seq = fmt_rd64(h + 16);
    if (elen == 0 || elen % VHDX_LOG_SECTOR || elen > l->len ||
        tail % VHDX_LOG_SECTOR || tail >= l->len) {
        *bad = "bad length or tail";
        return false;
    }
    /* The checksum covers the entry, which may wrap around the end. */
    for (uint64_t o = 0; o < elen; o += VHDX_LOG_SECTOR) {
        const uint8_t *sec = log_sector(l, pos + o);
        if (o == 0) {
            crc = crc32c(crc, sec, 4);
            crc = crc32c(crc, zero, 4);
            crc = crc32c(crc, sec + 8, VHDX_LOG_SECTOR - 8);
        } else {
            crc = crc32c(crc, sec, VHDX_LOG_SECTOR);
        }
    }
    if (~crc != fmt_rd32(h + 4)) {
        *bad = "bad checksum";
        return false;
    }
    dsec = (64 + 32 * (uint64_t)ndesc + VHDX_LOG_SECTOR - 1) / VHDX_LOG_SECTOR;
    /* A replay may grow the file to the size the entry saw (QEMU does),
     * but by no more than one largest block. */
    if (dsec * VHDX_LOG_SECTOR > elen || last % MIB ||
        last > flen + VHDX_BLOCK_MAX) {
        *bad = "bad descriptor count or file size";
        return false;
    }
    for (uint32_t i = 0; i < ndesc; i++) {
        uint64_t at = 64 + 32 * (uint64_t)i;
        const uint8_t *d = log_sector(l, pos + at / VHDX_LOG_SECTOR *
                                      VHDX_LOG_SECTOR) + at % VHDX_LOG_SECTOR;
        uint64_t foff = fmt_rd64(d + 16), n;
        if (fmt_rd64(d + 24) != *seq) {
            *bad = "descriptor sequence number mismatch";
            return false;
        }
        if (!memcmp(d, "desc", 4)) {
            const uint8_t *ds;
            uint64_t dseq;
            n = VHDX_LOG_SECTOR;
            ndata++;
            if ((dsec + ndata) * VHDX_LOG_SECTOR > elen) {
                *bad = "more data descriptors than data sectors";
                return false;
            }
            ds = log_sector(l, pos + (dsec + ndata - 1) * VHDX_LOG_SECTOR);
            dseq = (uint64_t)fmt_rd32(ds + 4) << 32 | fmt_rd32(ds + 4092);
            if (memcmp(ds, "data", 4) != 0 || dseq != *seq) {
                *bad = "bad data sector";
                return false;
            }
        } else if (!memcmp(d, "zero", 4)) {
            n = fmt_rd64(d + 8);
            if (n == 0 || n % VHDX_LOG_SECTOR) {
                *bad = "bad zero descriptor length";
                return false;
            }
        } else {
            *bad = "bad descriptor signature";
            return false;
        }
        /* Where it writes: past the header section, not into the log
         * itself, inside the file or the size the entry gives it. */
        if (foff % VHDX_LOG_SECTOR || foff < VHDX_SECTION_END ||
            foff > VD_MAX_LENGTH || n > VD_MAX_LENGTH - foff ||
            foff + n > (last > flen ? last : flen) ||
            (foff < l->off + l->len && foff + n > l->off)) {
            *bad = "descriptor writes outside the file's data";
            return false;
        }
    }
    *len = elen;
    return true;
}

/* Replays one valid entry. */
static int log_replay_entry(vd_node *node, vhdx_state *s, const vhdx_log *l,
                            uint64_t pos, vd_error *err)
{
    const uint8_t *h = log_sector(l, pos);
    uint32_t ndesc = fmt_rd32(h + 24);
    uint64_t dsec = (64 + 32 * (uint64_t)ndesc + VHDX_LOG_SECTOR - 1) /
                    VHDX_LOG_SECTOR, ndata = 0;
    uint8_t sec[VHDX_LOG_SECTOR];
    int ret = 0;

    for (uint32_t i = 0; i < ndesc && ret == 0; i++) {
        uint64_t at = 64 + 32 * (uint64_t)i;
        const uint8_t *d = log_sector(l, pos + at / VHDX_LOG_SECTOR *
                                      VHDX_LOG_SECTOR) + at % VHDX_LOG_SECTOR;
        uint64_t foff = fmt_rd64(d + 16);
        if (!memcmp(d, "desc", 4)) {
            const uint8_t *ds = log_sector(l, pos + (dsec + ndata++) *
                                           VHDX_LOG_SECTOR);
            /* The sector is the descriptor's 8 leading bytes, the data
             * sector's 4084 and the descriptor's 4 trailing ones. */
            memcpy(sec, d + 8, 8);
            memcpy(sec + 8, ds + 8, 4084);
            memcpy(sec + 4092, d + 4, 4);
            ret = vd_child_pwrite(node->file, foff, sec, sizeof(sec), 0, err);
        } else {
            ret = vd_node_pwrite_zeroes(node->file->node, foff,
                                        fmt_rd64(d + 8), 0, err);
        }
    }
    (void)s;
    return ret;
}

/* The log's place (QEMU's checks), registered as a region before the
 * region table is read so that no region may overlap it. */
static int vhdx_log_region(vhdx_state *s, vd_error *err)
{
    const uint8_t *h = cur_hdr(s);
    uint64_t off = fmt_rd64(h + H_LOG_OFFSET);
    uint64_t len = fmt_rd32(h + H_LOG_LENGTH);

    if (off < MIB || off % MIB) {
        return vd_error_set(err, -EINVAL, "log offset 0x%" PRIx64 " is "
                            "not a multiple of 1 MiB past the header section",
                            off);
    }
    if (fmt_rd32(h + H_LOG_VERSION) & 0xffff) {
        return vd_error_set(err, -EINVAL, "unsupported log version %"
                            PRIu32, fmt_rd32(h + H_LOG_VERSION) & 0xffff);
    }
    /* QEMU wants whole MiB only of a log it replays (vhdx_parse_log). */
    if (off > VD_MAX_LENGTH - len ||
        (len % MIB && !guid_zero(h + H_LOG_GUID))) {
        return vd_error_set(err, -EINVAL, "log length 0x%" PRIx64 " is "
                            "not a multiple of 1 MiB", len);
    }
    region_add(s, off, len, "log");
    return 0;
}

static int vhdx_parse_log(vd_node *node, vhdx_state *s, int64_t flen,
                          bool writable, vd_error *err)
{
    const uint8_t *h = cur_hdr(s);
    uint64_t off = fmt_rd64(h + H_LOG_OFFSET);
    uint64_t len = fmt_rd32(h + H_LOG_LENGTH);
    uint64_t best = UINT64_MAX, best_seq = 0, pos, elen, seq, last_file = 0;
    uint64_t *chain = NULL, n = 0, want = 0;
    const char *bad, *first_bad = NULL;
    uint64_t first_bad_pos = 0;
    vhdx_log l = { NULL, off, len, h + H_LOG_GUID };
    int ret = 0;

    if (guid_zero(h + H_LOG_GUID) || len == 0) {
        return 0;
    }
    if (off + len > (uint64_t)flen) {
        return vd_error_set(err, -EINVAL, "the log (0x%" PRIx64 ", length"
                            " 0x%" PRIx64 ") is past the end of the file",
                            off, len);
    }
    if (len > VHDX_LOG_MAX) {
        return vd_error_set(err, -EFBIG, "the log is too large to "
                            "replay (%" PRIu64 " bytes)", len);
    }
    l.buf = malloc(len);
    chain = malloc(len / VHDX_LOG_SECTOR * sizeof(*chain));
    if (!l.buf || !chain) {
        ret = vd_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    ret = vd_child_pread(node->file, off, l.buf, len, err);
    if (ret < 0) {
        goto out;
    }
    /* The head: the valid entry with the highest sequence number. */
    for (pos = 0; pos < len; pos += VHDX_LOG_SECTOR) {
        if (log_entry_valid(&l, pos, (uint64_t)flen, &elen, &seq, &bad)) {
            if (best == UINT64_MAX || seq > best_seq) {
                best = pos;
                best_seq = seq;
            }
        } else if (bad && !first_bad) {
            first_bad = bad;
            first_bad_pos = pos;
        }
    }
    if (best == UINT64_MAX) {
        if (first_bad) {
            ret = vd_error_set(err, -EINVAL, "the log needs replaying "
                               "but its entry at 0x%" PRIx64 " is invalid "
                               "(%s)", off + first_bad_pos,
                               first_bad);
        }
        /* No entry of this log at all: nothing was journalled. */
        goto out;
    }
    /* The active sequence runs from the head's tail to the head, every
     * entry valid and numbered one after the other; anything else would
     * be a partial replay. */
    pos = fmt_rd32(log_sector(&l, best) + 12);
    for (;;) {
        bool ok = n < len / VHDX_LOG_SECTOR &&
                  log_entry_valid(&l, pos, (uint64_t)flen, &elen, &seq, &bad);
        if (!ok || (n > 0 && seq != want) || seq > best_seq ||
            (seq == best_seq && pos != best)) {
            ret = vd_error_set(err, -EINVAL, "the log's active sequence "
                               "is broken at 0x%" PRIx64 " (%s)",
                               off + pos,
                               bad ? bad : "missing or out-of-order entry");
            goto out;
        }
        chain[n++] = pos;
        if (pos == best) {
            break;
        }
        want = seq + 1;
        pos = (pos + elen) % len;
    }
    if (!writable) {
        ret = vd_error_set(err, -EPERM, "VHDX image file '%s' opened "
                           "read-only, but contains a log that needs to be "
                           "replayed", s->filename);
        if (err && err->code == -EPERM && !err->hint[0]) {
            snprintf(err->hint, sizeof(err->hint), "To replay the log, "
                     "run:\nqemu-img check -r all '%s'", s->filename);
        }
        goto out;
    }
    for (uint64_t i = 0; i < n; i++) {
        uint64_t lf = fmt_rd64(log_sector(&l, chain[i]) + 56);
        if (lf > last_file) {
            last_file = lf;
        }
    }
    if (last_file > (uint64_t)flen) {
        ret = vd_node_truncate(node->file->node, last_file, false,
                               VD_PREALLOC_OFF, err);
    }
    for (uint64_t i = 0; i < n && ret == 0; i++) {
        ret = log_replay_entry(node, s, &l, chain[i], err);
    }
    if (ret == 0) {
        ret = vd_node_flush(node->file->node, err);
    }
    if (ret == 0) {
        static const uint8_t zero_guid[16];
        ret = vhdx_update_headers(node, s, false, zero_guid, err);
    }
    if (ret < 0) {
        vd_error_prepend(err, "replaying the log: ");
        goto out;
    }
    s->log_replayed = true;
out:
    free(l.buf);
    free(chain);
    return ret;
}

/* ---- differencing images: the parent locator ---- */

static const uint8_t parent_vhdx_guid[16] =
    GUID(0xb04aefb7, 0xd19e, 0x4a81, 0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44,
         0x59, 0x13);

/* @len bytes of UTF-16LE at @p as UTF-8 (NUL-terminated), backslashes
 * turned into slashes; NULL when not representable. */
static char *utf16_path(const uint8_t *p, size_t len)
{
    char *out = malloc(len / 2 * 3 + 1), *o = out;

    if (!out) {
        return NULL;
    }
    for (size_t i = 0; i + 1 < len; i += 2) {
        unsigned c = p[i] | p[i + 1] << 8;
        if (c == 0 || (c >= 0xd800 && c < 0xe000)) {
            free(out);
            return NULL;
        }
        if (c == '\\') {
            c = '/';
        }
        if (c < 0x80) {
            *o++ = (char)c;
        } else if (c < 0x800) {
            *o++ = (char)(0xc0 | c >> 6);
            *o++ = (char)(0x80 | (c & 0x3f));
        } else {
            *o++ = (char)(0xe0 | c >> 12);
            *o++ = (char)(0x80 | ((c >> 6) & 0x3f));
            *o++ = (char)(0x80 | (c & 0x3f));
        }
    }
    *o = 0;
    return out;
}

/* The parent locator item (@len bytes at @off): its type must be VHDX's;
 * the parent is its relative_path, else its absolute_win32_path (with
 * "/" for "\\"; a Windows drive letter then names no file here), else
 * its volume_path, opened as a vhdx backing file. */
static int vhdx_parent_locator(vd_node *node, vhdx_state *s, uint64_t off,
                               uint32_t len, vd_error *err)
{
    static const char *const keys[] = { "relative_path",
                                         "absolute_win32_path",
                                         "volume_path" };
    uint8_t *loc;
    uint32_t count;
    char *path = NULL;
    int best = 3, ret;

    if (len > 64 * KIB) {
        return vd_error_set(err, -EINVAL, "parent locator too large (%"
                            PRIu32 " bytes)", len);
    }
    loc = malloc(len);
    if (!loc) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    ret = vd_child_pread(node->file, off, loc, len, err);
    if (ret < 0) {
        goto out;
    }
    if (memcmp(loc, parent_vhdx_guid, 16) != 0) {
        ret = vd_error_set(err, -ENOTSUP, "unsupported parent locator type");
        goto out;
    }
    count = fmt_rd32(loc + 16) >> 16;
    if (20 + 12 * (uint64_t)count > len) {
        ret = vd_error_set(err, -EINVAL, "parent locator has %" PRIu32
                           " entries, more than its %" PRIu32 " bytes hold",
                           count, len);
        goto out;
    }
    for (uint32_t i = 0; i < count; i++) {
        const uint8_t *e = loc + 20 + 12 * (size_t)i;
        uint32_t ko = fmt_rd32(e), vo = fmt_rd32(e + 4);
        uint32_t kl = e[8] | e[9] << 8, vl = e[10] | e[11] << 8;
        char *key;
        if (ko > len || kl > len - ko || vo > len || vl > len - vo ||
            kl % 2 || vl % 2) {
            ret = vd_error_set(err, -EINVAL, "parent locator entry %" PRIu32
                               " lies outside the locator", i);
            goto out;
        }
        key = utf16_path(loc + ko, kl);
        for (int k = 0; key && k < best; k++) {
            if (!strcmp(key, keys[k])) {
                char *v = utf16_path(loc + vo, vl);
                if (v && v[0]) {
                    free(path);
                    path = v;
                    best = k;
                } else {
                    free(v);
                }
                break;
            }
        }
        free(key);
    }
    if (!path) {
        ret = vd_error_set(err, -EINVAL, "parent locator names no parent "
                           "path");
        goto out;
    }
    /* A relative path starts ".\\" on Windows. */
    if (!strncmp(path, "./", 2)) {
        memmove(path, path + 2, strlen(path + 2) + 1);
    }
    free(node->backing_file);
    node->backing_file = path;
    free(node->backing_format);
    node->backing_format = strdup("vhdx");
    s->has_parent = true;
out:
    free(loc);
    return ret;
}

/* ---- metadata ---- */

static int vhdx_read_metadata(vd_node *node, vhdx_state *s, vd_error *err)
{
    uint8_t *t = malloc(VHDX_TABLE_SIZE), item[16];
    uint32_t count, present = 0, moff[M_N] = { 0 }, mlen[M_N] = { 0 };
    int ret;

    if (!t) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    ret = vd_child_pread(node->file, s->meta_offset, t, VHDX_TABLE_SIZE, err);
    if (ret < 0) {
        goto out;
    }
    if (memcmp(t, "metadata", 8) != 0) {
        ret = vd_error_set(err, -EINVAL, "bad metadata table signature");
        goto out;
    }
    count = fmt_rd32(t + 8) >> 16;
    if (count > VHDX_MAX_ENTRIES) {
        ret = vd_error_set(err, -EINVAL, "metadata table has %" PRIu32
                           " entries (at most 2047)", count);
        goto out;
    }
    for (uint32_t i = 0; i < count; i++) {
        const uint8_t *e = t + 32 + 32 * (size_t)i;
        uint32_t off = fmt_rd32(e + 16), len = fmt_rd32(e + 20);
        uint32_t bits = fmt_rd32(e + 24);
        int m;
        for (m = 0; m < M_N && memcmp(e, meta_guids[m], 16); m++) {
        }
        if (m == M_N) {
            if (bits & 4) {
                ret = vd_error_set(err, -ENOTSUP, "unsupported required "
                                   "metadata item");
                goto out;
            }
            continue;
        }
        if (present & (1u << m)) {
            ret = vd_error_set(err, -EINVAL, "two %s metadata items",
                               meta_names[m]);
            goto out;
        }
        if (off < VHDX_TABLE_SIZE || off > s->meta_length ||
            len > s->meta_length - off ||
            (meta_len[m] && len < meta_len[m]) ||
            (m == M_PARENT && len < 20)) {
            ret = vd_error_set(err, -EINVAL, "%s metadata item (offset "
                               "0x%" PRIx32 ", length %" PRIu32 ") is outside"
                               " the metadata region", meta_names[m], off,
                               len);
            goto out;
        }
        present |= 1u << m;
        moff[m] = off;
        mlen[m] = len;
    }
    for (int m = 0; m < M_PARENT; m++) {
        if (!(present & (1u << m))) {
            ret = vd_error_set(err, -ENOTSUP, "the %s metadata item is "
                               "missing", meta_names[m]);
            goto out;
        }
    }
    for (int m = 0; m < M_PARENT; m++) {
        ret = vd_child_pread(node->file, s->meta_offset + moff[m], item,
                             meta_len[m], err);
        if (ret < 0) {
            goto out;
        }
        switch (m) {
        case M_PARAMS:
            s->block_size = fmt_rd32(item);
            s->param_bits = fmt_rd32(item + 4);
            break;
        case M_SIZE:
            s->virtual_size = fmt_rd64(item);
            break;
        case M_PAGE83:
            memcpy(s->page83, item, 16);
            break;
        case M_LOGICAL:
            s->logical_sector = fmt_rd32(item);
            break;
        default:
            s->physical_sector = fmt_rd32(item);
            break;
        }
    }
    if (s->param_bits & 2) {
        if (!(present & (1u << M_PARENT))) {
            ret = vd_error_set(err, -EINVAL, "has-parent is set but there "
                               "is no parent locator");
            goto out;
        }
        ret = vhdx_parent_locator(node, s, s->meta_offset + moff[M_PARENT],
                                  mlen[M_PARENT], err);
        if (ret < 0) {
            goto out;
        }
    }
    if (s->block_size < VHDX_BLOCK_MIN || s->block_size > VHDX_BLOCK_MAX ||
        !is_pow2(s->block_size)) {
        ret = vd_error_set(err, -EINVAL, "invalid block size %" PRIu32,
                           s->block_size);
        goto out;
    }
    if (s->logical_sector != 512 && s->logical_sector != 4096) {
        ret = vd_error_set(err, -EINVAL, "invalid logical sector size %"
                           PRIu32, s->logical_sector);
        goto out;
    }
    if (s->virtual_size > VHDX_MAX_SIZE) {
        ret = vd_error_set(err, -EINVAL, "virtual disk size %" PRIu64
                           " is larger than 64 TiB", s->virtual_size);
        goto out;
    }
    /* QEMU takes whole logical sectors. */
    s->virtual_size -= s->virtual_size % s->logical_sector;
out:
    free(t);
    return ret;
}

/* ---- the BAT ---- */

static bool bat_is_bitmap(const vhdx_state *s, uint64_t i)
{
    return i % (s->chunk_ratio + 1) == s->chunk_ratio;
}

typedef struct bat_range {
    uint64_t start, end, index;
} bat_range;

static int cmp_range(const void *a, const void *b)
{
    const bat_range *x = a, *y = b;
    return x->start < y->start ? -1 : x->start > y->start;
}

/* Every entry's state, and where a present block lies: past the header
 * section, inside the file (a short last block allowed, as QEMU created
 * such), clear of the regions and of each other. With @res (check),
 * each fault is printed in QEMU's words and counted as a corruption;
 * without, the first one fails. */
static int vhdx_check_bat(vhdx_state *s, int64_t flen, vd_check_result *res,
                          vd_error *err)
{
    bat_range *r = malloc((s->bat_entries ? s->bat_entries : 1) *
                          sizeof(*r));
    uint64_t n = 0;
    char msg[256];
    int ret = 0;

    if (!r) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
#define BAT_FAULT(...)                                                    \
    do {                                                                  \
        snprintf(msg, sizeof(msg), __VA_ARGS__);                          \
        if (!res) {                                                       \
            ret = vd_error_set(err, -EINVAL, "%s", msg);                  \
            goto out;                                                     \
        }                                                                 \
        fprintf(stderr, "%s: %s\n", program_invocation_short_name, msg);  \
        res->corruptions++;                                               \
        bad = true;                                                       \
    } while (0)
    for (uint64_t i = 0; i < s->bat_entries; i++) {
        uint64_t e = s->bat[i], st = e & BAT_STATE_MASK;
        uint64_t off = e & BAT_OFF_MASK;
        uint64_t blen = s->block_size;
        const vhdx_region *o;
        bool bad = false;
        if (bat_is_bitmap(s, i)) {
            if (st != SB_NOT_PRESENT && st != SB_PRESENT) {
                BAT_FAULT("VHDX BAT entry %" PRIu64 " (sector bitmap) has an "
                          "invalid state %" PRIu64, i, st);
                continue;
            }
            blen = MIB;
            if (st != SB_PRESENT) {
                continue;
            }
        } else {
            uint64_t blk = i - i / (s->chunk_ratio + 1);
            uint64_t sb = i / (s->chunk_ratio + 1) * (s->chunk_ratio + 1) +
                          s->chunk_ratio;
            if (st == 4 || (st == PAYLOAD_PARTIALLY_PRESENT &&
                            (!s->has_parent || sb >= s->bat_entries ||
                             (s->bat[sb] & BAT_STATE_MASK) != SB_PRESENT))) {
                BAT_FAULT("VHDX BAT entry %" PRIu64 " has an invalid state %"
                          PRIu64 "%s", i, st,
                          st == 4 ? "" : s->has_parent
                          ? " (partially present without a sector bitmap)"
                          : " (partially present without a parent)");
                continue;
            }
            if ((st != PAYLOAD_FULLY_PRESENT &&
                 st != PAYLOAD_PARTIALLY_PRESENT) || blk >= s->data_blocks) {
                continue;
            }
            if (s->virtual_size - blk * s->block_size < blen) {
                blen = s->virtual_size - blk * s->block_size;
            }
        }
        if (off >= (uint64_t)flen) {
            BAT_FAULT("VHDX BAT entry %" PRIu64 " start offset %" PRIu64
                      " points after end of file (%" PRId64 "). Image has "
                      "probably been truncated.", i, off, flen);
        } else if (blen > (uint64_t)flen - off) {
            BAT_FAULT("VHDX BAT entry %" PRIu64 " end offset %" PRIu64
                      " points after end of file (%" PRId64 "). Image has "
                      "probably been truncated.", i, off + blen - 1, flen);
        }
        /* QEMU checks a whole block against the regions. */
        o = region_overlap(s, off, bat_is_bitmap(s, i) ? MIB : s->block_size);
        if (o) {
            uint64_t end = off + (bat_is_bitmap(s, i) ? (uint64_t)MIB
                                                      : s->block_size);
            BAT_FAULT("VHDX region %" PRIu64 "-%" PRIu64 " overlaps with "
                      "region %" PRIu64 "-%" PRIu64, off, end, o->start,
                      o->end);
        }
        if (!bad) {
            r[n++] = (bat_range){ off, off + blen, i };
        }
    }
    qsort(r, n, sizeof(*r), cmp_range);
    for (uint64_t k = 1; k < n; k++) {
        if (r[k].start < r[k - 1].end) {
            bool bad;
            BAT_FAULT("VHDX BAT entries %" PRIu64 " and %" PRIu64 " overlap "
                      "(offsets %" PRIu64 " and %" PRIu64 ")",
                      r[k - 1].index, r[k].index, r[k - 1].start,
                      r[k].start);
            (void)bad;
        }
    }
#undef BAT_FAULT
out:
    free(r);
    return ret;
}

static int vhdx_read_bat(vd_node *node, vhdx_state *s, int64_t flen,
                         vd_error *err)
{
    uint64_t bytes;
    uint8_t *raw;
    int ret;

    s->chunk_ratio = VHDX_MAX_SECTORS_PER_BLOCK * s->logical_sector /
                     s->block_size;
    s->data_blocks = (s->virtual_size + s->block_size - 1) / s->block_size;
    if (s->has_parent) {
        /* A sector bitmap entry after every chunk, the last one too. */
        s->bat_entries = (s->data_blocks + s->chunk_ratio - 1) /
                         s->chunk_ratio * (s->chunk_ratio + 1);
    } else {
        s->bat_entries = s->data_blocks ? s->data_blocks +
                         (s->data_blocks - 1) / s->chunk_ratio : 0;
    }
    bytes = s->bat_entries * 8;
    if (bytes > s->bat_rt_length) {
        return vd_error_set(err, -EINVAL, "the BAT region (%" PRIu64
                            " bytes) is too small for %" PRIu64 " entries",
                            s->bat_rt_length, s->bat_entries);
    }
    raw = malloc(bytes ? bytes : 1);
    s->bat = malloc(bytes ? bytes : 1);
    if (!raw || !s->bat) {
        free(raw);
        return vd_error_set(err, -ENOMEM, "out of memory for the BAT");
    }
    if (bytes) {
        ret = vd_child_pread(node->file, s->bat_offset, raw, bytes, err);
        if (ret < 0) {
            free(raw);
            return ret;
        }
    }
    for (uint64_t i = 0; i < s->bat_entries; i++) {
        s->bat[i] = fmt_rd64(raw + 8 * i);
    }
    free(raw);
    (void)flen;
    return 0;
}

/* ---- open ---- */

static int vhdx_open(vd_node *node, vd_opts *opts, unsigned flags,
                     vd_error *err)
{
    vhdx_state *s = node->opaque;
    uint8_t sig[8] = { 0 };
    int64_t flen;
    int ret;

    (void)opts;
    s->filename = node->filename;
    flen = vd_node_getlength(node->file->node);
    if (flen < 0) {
        return vd_error_set_errno(err, (int)flen, "cannot get the file "
                                  "length");
    }
    if (flen < (int64_t)VHDX_SECTION_END) {
        ret = vd_child_pread(node->file, 0, sig, flen < 8 ? (uint64_t)flen : 8,
                             NULL);
        return vd_error_set(err, -EINVAL, "%s",
                            ret == 0 && !memcmp(sig, "vhdxfile", 8)
                            ? "the file is shorter than the VHDX header "
                              "section" : "Not a VHDX image");
    }
    ret = vd_child_pread(node->file, 0, sig, 8, err);
    if (ret < 0) {
        return ret;
    }
    if (memcmp(sig, "vhdxfile", 8) != 0) {
        return vd_error_set(err, -EINVAL, "Not a VHDX image");
    }
    pthread_mutex_init(&s->lock, NULL);
    guid_generate(s->session_guid);
    region_add(s, 0, VHDX_SECTION_END, "header section");
    ret = vhdx_read_headers(node, s, err);
    if (ret == 0) {
        ret = vhdx_log_region(s, err);
    }
    if (ret == 0) {
        ret = vhdx_read_regions(node, s, flen, err);
    }
    if (ret == 0) {
        ret = vhdx_parse_log(node, s, flen, flags & VD_NODE_RDWR, err);
    }
    if (ret == 0 && s->log_replayed) {
        flen = vd_node_getlength(node->file->node);
        if (flen < 0) {
            ret = vd_error_set(err, (int)flen, "cannot get the file "
                               "length");
        }
    }
    if (ret == 0) {
        ret = vhdx_read_metadata(node, s, err);
    }
    if (ret == 0) {
        ret = vhdx_read_bat(node, s, flen, err);
    }
    if (ret == 0) {
        if (flags & VD_NODE_CHECK) {
            /* check reports what is wrong (as QEMU, which skips this
             * at a check open); no write goes near a bad BAT. */
            s->corrupt = vhdx_check_bat(s, flen, NULL, NULL) < 0;
        } else {
            ret = vhdx_check_bat(s, flen, NULL, err);
        }
    }
    if (ret < 0) {
        free(s->bat);
        s->bat = NULL;
        pthread_mutex_destroy(&s->lock);
        return ret;
    }
    node->bl.request_alignment = 512;
    return 0;
}

static void vhdx_close(vd_node *node)
{
    vhdx_state *s = node->opaque;

    free(s->bat);
    s->bat = NULL;
    pthread_mutex_destroy(&s->lock);
}

static int64_t vhdx_getlength(vd_node *node)
{
    vhdx_state *s = node->opaque;

    return (int64_t)s->virtual_size;
}

/* ---- I/O ---- */

static uint64_t bat_index(const vhdx_state *s, uint64_t off)
{
    uint64_t blk = off / s->block_size;
    return blk + blk / s->chunk_ratio;
}

/* The sector bitmap bits of the @n bytes at guest offset @o (inside one
 * partially present block): *@run gets how many bytes from @o share the
 * first one's bit, which is returned (1: in this file), or an errno. */
static int vhdx_bitmap_run(vd_node *node, vhdx_state *s, uint64_t o,
                           uint64_t n, uint64_t *run, vd_error *err)
{
    uint64_t blk = o / s->block_size, chunk = blk / s->chunk_ratio;
    uint64_t sb = s->bat[chunk * (s->chunk_ratio + 1) + s->chunk_ratio];
    uint64_t rel = o - chunk * s->chunk_ratio * s->block_size;
    uint64_t first = rel / s->logical_sector;
    uint64_t count = (rel + n - 1) / s->logical_sector - first + 1;
    uint8_t bits[512];
    int bit = -1, ret;

    *run = 0;
    for (uint64_t k = 0; k < count;) {
        uint64_t byte0 = (first + k) / 8, nb = (count - k + 7) / 8 + 1;
        if (nb > sizeof(bits)) {
            nb = sizeof(bits);
        }
        if (byte0 + nb > MIB) {
            nb = MIB - byte0;
        }
        ret = vd_child_pread(node->file, (sb & BAT_OFF_MASK) + byte0, bits,
                             nb, err);
        if (ret < 0) {
            return ret;
        }
        for (; k < count && (first + k) / 8 - byte0 < nb; k++) {
            int b = bits[(first + k) / 8 - byte0] >> ((first + k) % 8) & 1;
            if (bit < 0) {
                bit = b;
            } else if (b != bit) {
                /* Up to the first sector with the other bit (a request
                 * may start inside a 4 KiB sector). */
                *run = (first + k) * s->logical_sector - rel;
                return bit;
            }
        }
    }
    *run = n;
    return bit;
}

/* @n bytes at guest @o into @qiov at @qoff from the parent (zeros when
 * none was opened). */
static int vhdx_read_parent(vd_node *node, uint64_t o, vd_iov *qiov,
                            uint64_t qoff, uint64_t n, vd_error *err)
{
    if (!node->backing) {
        vd_iov_memset(qiov, qoff, 0, n);
        return 0;
    }
    return fmt_file_io(node->backing, false, o, qiov, qoff, n,
                       node->filename, err);
}

static int vhdx_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                       vd_iov *qiov, unsigned flags, vd_error *err)
{
    vhdx_state *s = node->opaque;
    uint64_t done = 0;
    int ret = 0;

    (void)flags;
    while (done < bytes) {
        uint64_t o = off + done, e, n = s->block_size - o % s->block_size;
        if (n > bytes - done) {
            n = bytes - done;
        }
        if (bat_index(s, o) >= s->bat_entries) {
            return vd_error_set(err, -EIO, "%s: read at 0x%" PRIx64 " is "
                                "past the BAT", s->filename, o);
        }
        pthread_mutex_lock(&s->lock);
        e = s->bat[bat_index(s, o)];
        pthread_mutex_unlock(&s->lock);
        switch (e & BAT_STATE_MASK) {
        case PAYLOAD_FULLY_PRESENT:
            ret = fmt_file_io(node->file, false, (e & BAT_OFF_MASK) +
                              o % s->block_size, qiov, done, n, s->filename,
                              err);
            break;
        case PAYLOAD_PARTIALLY_PRESENT:
            /* Checked at open: only in a differencing image, with its
             * chunk's sector bitmap present (a check open goes on with
             * a bad BAT: no bitmap to look up then). */
            if (!s->has_parent || s->corrupt) {
                return vd_error_set(err, -EIO, "%s: block at 0x%" PRIx64
                                    " has an unreadable state",
                                    s->filename, o);
            }
            ret = vhdx_bitmap_run(node, s, o, n, &n, err);
            if (ret == 1) {
                ret = fmt_file_io(node->file, false, (e & BAT_OFF_MASK) +
                                  o % s->block_size, qiov, done, n,
                                  s->filename, err);
            } else if (ret == 0) {
                ret = vhdx_read_parent(node, o, qiov, done, n, err);
            }
            break;
        case 4:
            return vd_error_set(err, -EIO, "%s: block at 0x%" PRIx64 " has "
                                "an unreadable state", s->filename, o);
        case PAYLOAD_ZERO:
            vd_iov_memset(qiov, done, 0, n);
            break;
        default:
            /* Not present: the parent's data, or zeros without one. */
            if (s->has_parent) {
                ret = vhdx_read_parent(node, o, qiov, done, n, err);
            } else {
                vd_iov_memset(qiov, done, 0, n);
            }
            break;
        }
        if (ret < 0) {
            return ret;
        }
        done += n;
    }
    return 0;
}

/* A new block of the guest byte @o at the end of the file, whole, read
 * as zeros: then its data, a flush, its BAT entry, a flush. Lock held. */
static int vhdx_alloc(vd_node *node, vhdx_state *s, uint64_t o,
                      vd_iov *qiov, uint64_t qoff, uint64_t n, vd_error *err)
{
    uint64_t idx = bat_index(s, o), start, entry;
    int64_t flen = vd_node_getlength(node->file->node);
    uint8_t le[8];
    int ret;

    if (flen < 0) {
        return vd_error_set(err, (int)flen, "%s: cannot get the file length",
                            s->filename);
    }
    start = ((uint64_t)flen + MIB - 1) & ~(MIB - 1);
    if (start > VD_MAX_LENGTH - s->block_size ||
        region_overlap(s, start, s->block_size)) {
        return vd_error_set(err, -EFBIG, "%s: no room for a new block at 0x%"
                            PRIx64, s->filename, start);
    }
    ret = vd_node_truncate(node->file->node, start + s->block_size, false,
                           VD_PREALLOC_OFF, err);
    if (ret == 0) {
        ret = fmt_file_io(node->file, true, start + o % s->block_size, qiov,
                          qoff, n, s->filename, err);
    }
    if (ret == 0) {
        ret = vd_node_flush(node->file->node, err);
    }
    if (ret < 0) {
        return ret;
    }
    entry = start | PAYLOAD_FULLY_PRESENT;
    fmt_wr64(le, entry);
    ret = vd_child_pwrite(node->file, s->bat_offset + 8 * idx, le, 8, 0, err);
    if (ret == 0) {
        ret = vd_node_flush(node->file->node, err);
    }
    if (ret < 0) {
        return ret;
    }
    s->bat[idx] = entry;
    return 0;
}

static int vhdx_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                        vd_iov *qiov, unsigned flags, vd_error *err)
{
    vhdx_state *s = node->opaque;
    uint64_t done = 0;
    int ret = 0;

    (void)flags;
    if (s->corrupt) {
        return vd_error_set(err, -EIO, "%s: refusing to write: the BAT is "
                            "corrupt", s->filename);
    }
    if (s->has_parent) {
        return vd_error_set(err, -ENOTSUP, "%s: writing to a differencing "
                            "VHDX image is not supported", s->filename);
    }
    while (done < bytes) {
        uint64_t o = off + done, e, n = s->block_size - o % s->block_size;
        if (n > bytes - done) {
            n = bytes - done;
        }
        if (bat_index(s, o) >= s->bat_entries) {
            return vd_error_set(err, -EIO, "%s: write at 0x%" PRIx64 " is "
                                "past the BAT", s->filename, o);
        }
        /* The metadata changes under the lock; data into a present
         * block goes without it (QEMU drops its lock there too), so
         * that convert's parallel writes overlap. */
        pthread_mutex_lock(&s->lock);
        if (!s->first_write_done) {
            ret = vhdx_update_headers(node, s, true, NULL, err);
            s->first_write_done = ret == 0;
        }
        e = s->bat[bat_index(s, o)];
        if (ret == 0 && (e & BAT_STATE_MASK) == PAYLOAD_PARTIALLY_PRESENT) {
            ret = vd_error_set(err, -EIO, "%s: block at 0x%" PRIx64 " has an "
                               "unwritable state", s->filename, o);
        } else if (ret == 0 && (e & BAT_STATE_MASK) != PAYLOAD_FULLY_PRESENT) {
            /* Every other state reads as zeros (4 is refused at open). */
            ret = vhdx_alloc(node, s, o, qiov, done, n, err);
            e = 0;
        }
        pthread_mutex_unlock(&s->lock);
        if (ret == 0 && e) {
            ret = fmt_file_io(node->file, true, (e & BAT_OFF_MASK) +
                              o % s->block_size, qiov, done, n, s->filename,
                              err);
        }
        if (ret < 0) {
            return ret;
        }
        done += n;
    }
    return 0;
}

static int vhdx_block_status(vd_node *node, bool want_zero, uint64_t off,
                             uint64_t bytes, uint64_t *pnum, uint64_t *map,
                             vd_node **file, vd_error *err)
{
    vhdx_state *s = node->opaque;
    uint64_t n = 0, e, st;
    int ret;

    (void)want_zero;
    pthread_mutex_lock(&s->lock);
    e = s->bat[bat_index(s, off)];
    pthread_mutex_unlock(&s->lock);
    st = e & BAT_STATE_MASK;
    n = s->block_size - off % s->block_size;
    if (n > bytes) {
        n = bytes;
    }
    if (st == PAYLOAD_PARTIALLY_PRESENT && s->has_parent && !s->corrupt) {
        /* Sectors in this file, or the parent's (unallocated here). */
        ret = vhdx_bitmap_run(node, s, off, n, &n, err);
        if (ret < 0) {
            return ret;
        }
        ret = ret ? VD_BLOCK_DATA | VD_BLOCK_OFFSET_VALID |
                    VD_BLOCK_ALLOCATED : 0;
    } else if (st == PAYLOAD_FULLY_PRESENT ||
               st == PAYLOAD_PARTIALLY_PRESENT) {
        ret = VD_BLOCK_DATA | VD_BLOCK_OFFSET_VALID | VD_BLOCK_ALLOCATED;
    } else {
        /* Blocks in a row that read as zeros (ZERO, or not present
         * without a parent) or from the parent (not present). */
        bool zero = st == PAYLOAD_ZERO;
        ret = zero ? VD_BLOCK_ZERO | VD_BLOCK_ALLOCATED
                   : s->has_parent ? 0 : VD_BLOCK_ZERO;
        pthread_mutex_lock(&s->lock);
        while (n < bytes) {
            uint64_t e2 = s->bat[bat_index(s, off + n)] & BAT_STATE_MASK;
            if (e2 == PAYLOAD_FULLY_PRESENT || e2 == 4 ||
                e2 == PAYLOAD_PARTIALLY_PRESENT ||
                (e2 == PAYLOAD_ZERO) != zero) {
                break;
            }
            n += s->block_size - (off + n) % s->block_size;
        }
        pthread_mutex_unlock(&s->lock);
    }
    if (ret & VD_BLOCK_OFFSET_VALID) {
        *map = (e & BAT_OFF_MASK) + off % s->block_size;
        *file = node->file->node;
    }
    *pnum = n < bytes ? n : bytes;
    return ret;
}

static int vhdx_get_info(vd_node *node, vd_image_info *info, vd_error *err)
{
    vhdx_state *s = node->opaque;

    (void)err;
    info->cluster_size = s->block_size;
    info->has_dirty_flag = true;
    info->dirty_flag = false;
    return 0;
}

/* QEMU's check: a log replayed at open counts as a fixed corruption;
 * every bad BAT entry as a corruption. */
static int vhdx_check(vd_node *node, vd_check_result *res, unsigned fix,
                      vd_error *err)
{
    vhdx_state *s = node->opaque;
    int64_t flen = vd_node_getlength(node->file->node);

    (void)fix;
    if (flen < 0) {
        res->check_errors++;
        return vd_error_set(err, (int)flen, "%s: cannot get the file length",
                            s->filename);
    }
    if (s->log_replayed) {
        res->corruptions_fixed++;
    }
    pthread_mutex_lock(&s->lock);
    vhdx_check_bat(s, flen, res, err);
    pthread_mutex_unlock(&s->lock);
    return 0;
}

static int vhdx_truncate(vd_node *node, uint64_t size, bool exact,
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

static const vd_create_option vhdx_create_opts[] = {
    { "size", "size", "Virtual disk size; max of 64TB.", NULL },
    { "log_size", "size", "Log size; min 1MB.", "1048576" },
    { "block_size", "size", "Block Size; min 1MB, max 256MB. 0 means "
      "auto-calculate based on image size.", "0" },
    { "subformat", "string", "VHDX format type, can be either 'dynamic' or "
      "'fixed'. Default is 'dynamic'.", NULL },
    { "block_state_zero", "bool", "Force use of payload blocks of type "
      "'ZERO'. Non-standard, but default.  Do not set to 'off' when using "
      "'qemu-img convert' with subformat=dynamic.", NULL },
    { NULL, NULL, NULL, NULL },
};

static int node_pwrite(vd_node *file, uint64_t off, const void *buf,
                       uint64_t len, unsigned flags, vd_error *err)
{
    vd_iov v;

    vd_iov_init_buf(&v, (void *)buf, len);
    return vd_node_pwritev(file, off, len, &v, flags, err);
}

/* The image's first bytes, as QEMU's vhdx_co_create writes them. */
static int vhdx_write_new(vd_node *file, uint64_t size, uint64_t log_size,
                          uint32_t block_size, bool fixed, bool zero_blocks,
                          vd_error *err)
{
    uint64_t chunk = VHDX_MAX_SECTORS_PER_BLOCK * 512 / block_size;
    uint64_t blocks = (size + block_size - 1) / block_size;
    /* QEMU counts in 32 bits: an empty disk gets (2^32 - 1) / chunk
     * entries (a 64 MiB BAT for 8 MiB blocks), and so does vdisk's. */
    uint64_t entries = blocks + (uint32_t)(blocks - 1) / chunk;
    uint64_t bat_off = (VHDX_SECTION_END + log_size + MIB - 1) & ~(MIB - 1);
    uint64_t bat_len = (entries * 8 + MIB - 1) & ~(MIB - 1);
    uint64_t meta_off = bat_off + bat_len, data_off = bat_off + bat_len +
                        5 * MIB;
    char creator[64];
    uint8_t *buf = calloc(1, VHDX_TABLE_SIZE), *bat = NULL;
    uint8_t h[VHDX_HEADER_SIZE];
    uint32_t seq;
    int ret;

    if (!buf) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    /* (A) the file identifier; the creator is diagnostic only */
    snprintf(creator, sizeof(creator), "vdisk v%s", vd_version());
    memcpy(buf, "vhdxfile", 8);
    for (size_t i = 0; creator[i]; i++) {
        buf[8 + 2 * i] = (uint8_t)creator[i];
    }
    ret = node_pwrite(file, 0, buf, 8 + 2 * strlen(creator), 0, err);
    if (ret < 0) {
        vd_error_prepend(err, "Failed to write file signature: ");
        goto out;
    }
    /* (B), (C) the headers */
    memset(h, 0, sizeof(h));
    memcpy(h, "head", 4);
    if (getrandom(&seq, sizeof(seq), 0) != sizeof(seq)) {
        seq = (uint32_t)rand();
    }
    fmt_wr64(h + H_SEQ, seq);
    guid_generate(h + H_FILE_GUID);
    guid_generate(h + H_DATA_GUID);
    fmt_wr32(h + H_LOG_VERSION, 1u << 16);
    fmt_wr32(h + H_LOG_LENGTH, (uint32_t)log_size);
    fmt_wr64(h + H_LOG_OFFSET, VHDX_SECTION_END);
    for (int i = 0; i < 2 && ret == 0; i++) {
        fmt_wr64(h + H_SEQ, (uint64_t)seq + (uint64_t)i);
        csum_set(h, sizeof(h), H_CHECKSUM);
        ret = node_pwrite(file, i ? VHDX_HEADER2_OFF : VHDX_HEADER1_OFF, h,
                             sizeof(h), 0, err);
    }
    if (ret < 0) {
        vd_error_prepend(err, "Failed to write image headers: ");
        goto out;
    }
    /* (G) the BAT, the file's length */
    ret = vd_node_truncate(file, data_off + (fixed ? size : 0), false,
                           VD_PREALLOC_OFF, err);
    if (ret < 0) {
        goto out;
    }
    if (fixed || zero_blocks) {
        bat = calloc(1, bat_len ? bat_len : 1);
        if (!bat) {
            ret = vd_error_set(err, -ENOMEM, "Failed to allocate memory for "
                               "the BAT");
            goto out;
        }
        for (uint64_t b = 0; b < blocks; b++) {
            uint64_t e = zero_blocks ? PAYLOAD_ZERO
                         : (((data_off + b * block_size) + MIB - 1) &
                            ~(MIB - 1)) | PAYLOAD_FULLY_PRESENT;
            fmt_wr64(bat + 8 * (b + b / chunk), e);
        }
        ret = node_pwrite(file, bat_off, bat, bat_len, 0, err);
        if (ret < 0) {
            vd_error_prepend(err, "Failed to write the BAT: ");
            goto out;
        }
    }
    /* (D), (E) the region tables */
    memset(buf, 0, VHDX_TABLE_SIZE);
    memcpy(buf, "regi", 4);
    fmt_wr32(buf + 8, 2);
    memcpy(buf + 16, bat_guid, 16);
    fmt_wr64(buf + 32, bat_off);
    fmt_wr32(buf + 40, (uint32_t)bat_len);
    memcpy(buf + 48, metadata_guid, 16);
    fmt_wr64(buf + 64, meta_off);
    fmt_wr32(buf + 72, (uint32_t)MIB);
    csum_set(buf, VHDX_TABLE_SIZE, 4);
    ret = node_pwrite(file, VHDX_RT1_OFF, buf, VHDX_TABLE_SIZE, 0, err);
    if (ret == 0) {
        ret = node_pwrite(file, VHDX_RT2_OFF, buf, VHDX_TABLE_SIZE, 0, err);
    }
    if (ret < 0) {
        vd_error_prepend(err, "Failed to write the region tables: ");
        goto out;
    }
    /* (H) the metadata: the table, then the items from 64 KiB */
    memset(buf, 0, VHDX_TABLE_SIZE);
    memcpy(buf, "metadata", 8);
    fmt_wr32(buf + 8, 5u << 16);
    {
        uint32_t off = VHDX_TABLE_SIZE;
        uint8_t items[40] = { 0 };
        for (int m = 0; m < M_PARENT; m++) {
            uint8_t *e = buf + 32 + 32 * m;
            memcpy(e, meta_guids[m], 16);
            fmt_wr32(e + 16, off);
            fmt_wr32(e + 20, meta_len[m]);
            fmt_wr32(e + 24, m == M_PARAMS ? 4 : 6);
            off += meta_len[m];
        }
        fmt_wr32(items, block_size);
        fmt_wr32(items + 4, fixed ? 1 : 0);
        fmt_wr64(items + 8, size);
        guid_generate(items + 16);
        fmt_wr32(items + 32, 512);
        fmt_wr32(items + 36, 512);
        ret = node_pwrite(file, meta_off, buf, VHDX_TABLE_SIZE, 0, err);
        if (ret == 0) {
            ret = node_pwrite(file, meta_off + VHDX_TABLE_SIZE, items,
                                 sizeof(items), 0, err);
        }
    }
    if (ret < 0) {
        vd_error_prepend(err, "Failed to initialize metadata: ");
    }
out:
    free(buf);
    free(bat);
    return ret;
}

static int vhdx_create(const char *filename, vd_opts *opts, vd_error *err)
{
    uint64_t size = 0, log_size = MIB, block_size = 0;
    bool zero_blocks = true, fixed = false;
    vd_node *file = NULL;
    char *sub;
    int ret;

    ret = vd_opts_take_size(opts, "size", 0, &size, err);
    if (ret == 0) {
        ret = vd_opts_take_size(opts, "log_size", MIB, &log_size, err);
    }
    if (ret == 0) {
        ret = vd_opts_take_size(opts, "block_size", 0, &block_size, err);
    }
    if (ret == 0) {
        ret = vd_opts_take_bool(opts, "block_state_zero", true, &zero_blocks,
                                err);
    }
    if (ret < 0) {
        vd_error_prepend(err, "%s: ", filename);
        return ret;
    }
    sub = vd_opts_take(opts, "subformat");
    ret = fmt_create_file(filename, opts, err);
    if (ret < 0) {
        free(sub);
        return ret;
    }
    /* QEMU's visitor reads the subformat once the file exists. */
    if (sub) {
        if (!strcmp(sub, "fixed")) {
            fixed = true;
        } else if (strcmp(sub, "dynamic") != 0) {
            vd_error_set(err, -EINVAL, "%s: Parameter 'subformat' does not "
                         "accept value '%s'", filename, sub);
            free(sub);
            return -EINVAL;
        }
        free(sub);
    }
    /* QEMU rounds silently: the size to 512 bytes, the log and block
     * sizes up to whole MiB (a block size of 0 means automatic). */
    size = (size + 511) & ~511ull;
    log_size = (log_size + MIB - 1) & ~(MIB - 1);
    block_size = (block_size + MIB - 1) & ~(MIB - 1);
    if (block_size > VHDX_BLOCK_MAX) {
        block_size = VHDX_BLOCK_MAX;
    }
    if (size > VHDX_MAX_SIZE) {
        return vd_error_set(err, -EINVAL, "%s: Image size too large; max of "
                            "64TB", filename);
    }
    if (log_size > UINT32_MAX) {
        return vd_error_set(err, -EINVAL, "%s: Log size must be smaller than "
                            "4 GB", filename);
    }
    if (log_size < MIB) {
        return vd_error_set(err, -EINVAL, "%s: Log size must be a multiple of "
                            "1 MB", filename);
    }
    if (!block_size) {
        block_size = size > 32 * 1024 * 1024 * MIB ? 64 * MIB
                     : size > 100 * 1024 * MIB ? 32 * MIB
                     : size > 1024 * MIB ? 16 * MIB : 8 * MIB;
    }
    if (!is_pow2(block_size)) {
        return vd_error_set(err, -EINVAL, "%s: Block size must be a power of "
                            "two", filename);
    }
    ret = vd_open_protocol(&file, filename, VD_NODE_RDWR, err);
    if (ret < 0) {
        return ret;
    }
    ret = vhdx_write_new(file, size, log_size, (uint32_t)block_size, fixed,
                         zero_blocks, err);
    if (ret < 0) {
        vd_error_prepend(err, "%s: ", filename);
    }
    vd_node_unref(file);
    return ret;
}

const vd_driver vd_driver_vhdx = {
    .name = "vhdx",
    .instance_size = sizeof(vhdx_state),
    .is_format = true,
    .supports_backing = true,
    .create_opts = vhdx_create_opts,
    .probe = vhdx_probe,
    .open = vhdx_open,
    .close = vhdx_close,
    .create = vhdx_create,
    .preadv = vhdx_preadv,
    .pwritev = vhdx_pwritev,
    .block_status = vhdx_block_status,
    .getlength = vhdx_getlength,
    .get_info = vhdx_get_info,
    .check = vhdx_check,
    .truncate = vhdx_truncate,
};
