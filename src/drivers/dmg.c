/*
 * The dmg format driver, read only: Apple's UDIF disk images as QEMU
 * 7.2's block/dmg.c (with its dmg-bz2 module) reads them.
 *
 * Layout (big endian): a 512-byte "koly" trailer at the end of the file
 * (QEMU looks for the magic in the last 515 bytes, as files of odd sizes
 * exist) giving the data fork's offset (0x18), the resource fork's
 * offset and length (0x28, 0x30), the XML property list's offset and
 * length (0xd8, 0xe0) and the disk's sector count (0x1ec). The chunk
 * tables are "mish" blocks: a 204-byte header (the first sector it maps
 * at 8, its data's offset in the data fork at 0x18) and 40-byte entries
 * (type, first sector at 8, sector count at 0x10, offset at 0x18 and
 * length at 0x20 in the data fork). They come from the resource fork
 * when it has a length (its data area: a sequence of (length, bytes)
 * resources, each a mish block or skipped), else from the property
 * list (every <data>...</data> element, base64 as glib decodes it).
 * Chunk types: zeros (0) and ignore (2) read as zeros, raw (1) is
 * stored, zlib (0x80000005) and bzip2 (0x80000006) compressed; others
 * (comments, the last-entry marker, ADC, lzfse) are dropped from the
 * table, as QEMU does without a module for them, so their sectors fail
 * to read. QEMU's lzfse module is not built by Debian 12 (no liblzfse
 * there), nor is lzfse here; bzip2 needs libbz2 at build time
 * (VDISK_HAVE_BZIP2), without which bzip2 chunks are dropped too, and a
 * read of them names the missing library. Debian's qemu-img 7.2 has no
 * dmg-bz2 module: it drops bzip2 chunks, so vdisk reads images that it
 * cannot.
 *
 * As QEMU: the bounds of its open (the data fork, resource fork and
 * property list before the trailer, a property list of at most 16 MiB, a
 * non-zero resource data length inside the fork, chunk sector counts of
 * at most 64 MiB / 512 except for zero chunks, chunk lengths of at most
 * 64 MiB), its binary search for a sector's chunk (the tables are
 * assumed sorted; what it finds in unsorted ones, vdisk finds), the
 * last decompressed chunk cached, a chunk that does not decompress to
 * exactly its sectors failing the read (EIO), data past the end of the
 * file reading as zeros. Block status reports the whole disk as data
 * (QEMU's generic answer). Writing and creating are refused (QEMU's
 * driver reads only).
 *
 * Beyond QEMU: a resource running past the end of the file is refused
 * (QEMU allocates its claimed length, up to 4 GiB, and reads zeros);
 * where QEMU would read outside its buffers (a raw chunk
 * whose sector count exceeds its stored length reads stale memory; a
 * search past the last chunk reads past the table), vdisk reads zeros
 * for the sectors past the stored data and finds no chunk. Memory is
 * bounded by the file: every chunk entry comes from distinct bytes of
 * it, and the buffers by QEMU's 64 MiB limits, allocated at the first
 * read.
 *
 * Locking: the chunk table is fixed at open. s->lock guards the cache
 * (the last decompressed chunk, s->current, s->data, s->compressed) and
 * the spare buffers. A read that misses the cache decompresses without
 * the lock into buffers of its own (a spare pair, or new ones), then
 * makes them the cache: readers on several threads inflate on several
 * cores, as QEMU's coroutines cannot. Where a chunk may be large
 * (DMG_PARALLEL_MAX) every read decompresses under the lock instead,
 * so that memory stays one pair of buffers as before.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#ifdef VDISK_HAVE_BZIP2
#include <bzlib.h>
#endif

#include "simple-fmt.h"

#define DMG_LENGTHS_MAX (64u * 1024 * 1024)
#define DMG_SECTORCOUNTS_MAX (DMG_LENGTHS_MAX / 512)
#define DMG_PLIST_MAX (16u * 1024 * 1024)
#define DMG_MISH_MAGIC 0x6d697368u

enum {
    UDZE = 0, UDRW = 1, UDIG = 2,
    UDCO = 0x80000004u, UDZO = 0x80000005u, UDBZ = 0x80000006u,
    ULFO = 0x80000007u, UDCM = 0x7ffffffeu, UDLE = 0xffffffffu,
};

typedef struct dmg_chunk {
    uint32_t type;
    uint64_t sector, count;     /* guest sectors */
    uint64_t offset, length;    /* bytes in the file */
} dmg_chunk;

typedef struct dmg_state {
    const char *filename;
    dmg_chunk *chunks;
    uint32_t n_chunks, cap;
    uint32_t n_bzip2_dropped, n_lzfse_dropped, n_unknown_dropped;
    uint64_t size;
    uint64_t max_compressed, max_sectors;
    uint8_t *compressed, *data;
    uint32_t current;          /* the chunk in s->data, n_chunks: none */
    uint8_t *spare_compressed, *spare_data;  /* a pair for the next miss */
    pthread_mutex_t lock;
} dmg_state;

/* Buffers of one chunk's size at most this (compressed plus data) are
 * taken per reader; the largest chunks QEMU allows (64 MiB each way)
 * would make that a pair of 128 MiB per thread. */
#define DMG_PARALLEL_MAX (8u << 20)

/* What dmg_open's table parsing keeps between mish blocks. */
typedef struct dmg_parse {
    uint64_t data_fork_offset;
} dmg_parse;

/* QEMU goes by the name alone: the trailer is at the end of the file. */
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

static bool known_type(uint32_t type)
{
    switch (type) {
    case UDZE:
    case UDRW:
    case UDIG:
    case UDZO:
        return true;
    case UDBZ:
#ifdef VDISK_HAVE_BZIP2
        return true;
#else
        return false;
#endif
    default:
        return false;
    }
}

static int read_be(vd_node *node, uint64_t off, void *buf, size_t n,
                   vd_error *err)
{
    if (off > (uint64_t)INT64_MAX - n) {
        return vd_error_set(err, -EINVAL, "offset 0x%" PRIx64 " is out of "
                            "range", off);
    }
    return vd_child_pread(node->file, off, buf, n, err);
}

static int read_u32(vd_node *node, uint64_t off, uint32_t *v, vd_error *err)
{
    uint8_t b[4];
    int ret = read_be(node, off, b, 4, err);

    *v = fmt_rd_be32(b);
    return ret;
}

static int read_u64(vd_node *node, uint64_t off, uint64_t *v, vd_error *err)
{
    uint8_t b[8];
    int ret = read_be(node, off, b, 8, err);

    *v = fmt_rd_be64(b);
    return ret;
}

/* A chunk of type @type is left out of the table: QEMU's warnings (once
 * per open here, once per process there), in its words. */
static void warn_dropped(dmg_state *s, uint32_t type)
{
    switch (type) {
    case UDBZ:
        if (!s->n_bzip2_dropped++) {
            vd_warn_report("dmg-bzip2 module is missing, accessing bzip2 "
                           "compressed blocks will result in I/O errors");
        }
        break;
    case ULFO:
        if (!s->n_lzfse_dropped++) {
            vd_warn_report("dmg-lzfse module is missing, accessing lzfse "
                           "compressed blocks will result in I/O errors");
        }
        break;
    case UDCM:
    case UDLE:
        break;
    default:
        if (!s->n_unknown_dropped++) {
            vd_warn_report("Image contains chunks of unknown type %x, "
                           "accessing them will result in I/O errors", type);
        }
        break;
    }
}

/* Adds the chunk entries of the mish block @buf (@count bytes); anything
 * else (another magic, too short) is skipped, as QEMU does. */
static int parse_mish(dmg_state *s, dmg_parse *ps, const uint8_t *buf,
                      uint64_t count, vd_error *err)
{
    uint64_t out_offset, in_offset, entries;

    if (count < 244 || fmt_rd_be32(buf) != DMG_MISH_MAGIC) {
        return 0;
    }
    out_offset = fmt_rd_be64(buf + 8);
    in_offset = ps->data_fork_offset + fmt_rd_be64(buf + 0x18);
    entries = (count - 204) / 40;
    if (s->n_chunks + entries > UINT32_MAX - 1) {
        return vd_error_set(err, -EFBIG, "too many chunks");
    }
    if (s->n_chunks + entries > s->cap) {
        uint64_t cap = s->n_chunks + entries;

        /* doubling, capped (the entries come from the file's bytes) */
        if (cap < 2ull * s->cap && 2ull * s->cap < UINT32_MAX) {
            cap = 2ull * s->cap;
        }
        dmg_chunk *c = realloc(s->chunks, cap * sizeof(*c));

        if (!c) {
            return vd_error_set(err, -ENOMEM, "out of memory for %" PRIu64
                                " chunks", cap);
        }
        s->chunks = c;
        s->cap = (uint32_t)cap;
    }
    for (uint64_t k = 0; k < entries; k++) {
        const uint8_t *e = buf + 204 + 40 * k;
        dmg_chunk *c = &s->chunks[s->n_chunks];
        uint64_t need;

        c->type = fmt_rd_be32(e);
        if (!known_type(c->type)) {
            warn_dropped(s, c->type);
            continue;
        }
        c->sector = fmt_rd_be64(e + 8) + out_offset;
        c->count = fmt_rd_be64(e + 0x10);
        if (c->type != UDZE && c->type != UDIG &&
            c->count > DMG_SECTORCOUNTS_MAX) {
            return vd_error_set(err, -EINVAL, "sector count %" PRIu64 " for "
                                "chunk %" PRIu32 " is larger than max (%u)",
                                c->count, s->n_chunks, DMG_SECTORCOUNTS_MAX);
        }
        c->offset = fmt_rd_be64(e + 0x18) + in_offset;
        c->length = fmt_rd_be64(e + 0x20);
        if (c->length > DMG_LENGTHS_MAX) {
            return vd_error_set(err, -EINVAL, "length %" PRIu64 " for chunk "
                                "%" PRIu32 " is larger than max (%u)",
                                c->length, s->n_chunks, DMG_LENGTHS_MAX);
        }
        /* QEMU's buffer sizes, plus a raw chunk's sector count (QEMU
         * reads past its buffer there). */
        switch (c->type) {
        case UDZO:
        case UDBZ:
            if (c->length > s->max_compressed) {
                s->max_compressed = c->length;
            }
            need = c->count;
            break;
        case UDRW:
            need = (c->length + 511) / 512;
            if (c->count > need) {
                need = c->count;
            }
            break;
        default:
            need = 0;
            break;
        }
        if (need > s->max_sectors) {
            s->max_sectors = need;
        }
        s->n_chunks++;
    }
    return 0;
}

static int read_resource_fork(vd_node *node, dmg_parse *ps, uint64_t begin,
                              uint64_t length, vd_error *err)
{
    dmg_state *s = node->opaque;
    uint32_t data_off, count;
    uint64_t off, end;
    uint8_t *buf = NULL;
    int64_t flen = vd_node_getlength(node->file->node);
    int ret;

    if (flen < 0) {
        return vd_error_set(err, (int)flen, "cannot get the file length");
    }
    ret = read_u32(node, begin, &data_off, err);
    if (ret < 0) {
        return ret;
    }
    if (data_off > length) {
        return vd_error_set(err, -EINVAL, "resource data offset %" PRIu32
                            " lies past the resource fork (%" PRIu64
                            " bytes)", data_off, length);
    }
    ret = read_u32(node, begin + 8, &count, err);
    if (ret < 0) {
        return ret;
    }
    /* 32-bit sum, as QEMU's */
    if (count == 0 || (uint32_t)(data_off + count) > length) {
        return vd_error_set(err, -EINVAL, "resource data length %" PRIu32
                            " does not fit the resource fork (%" PRIu64
                            " bytes)", count, length);
    }
    off = begin + data_off;
    end = off + count;
    while (off < end) {
        uint8_t *nb;

        ret = read_u32(node, off, &count, err);
        if (ret < 0) {
            break;
        }
        if (count == 0 || count > end - off) {
            ret = vd_error_set(err, -EINVAL, "resource at 0x%" PRIx64 " has "
                               "length %" PRIu32 ", past the resource data",
                               off, count);
            break;
        }
        off += 4;
        /* Beyond QEMU, which would allocate it: a resource is never
         * larger than what the file holds of it. */
        if (count > flen || off > (uint64_t)flen - count) {
            ret = vd_error_set(err, -EINVAL, "resource at 0x%" PRIx64 " (%"
                               PRIu32 " bytes) runs past the end of the "
                               "file", off - 4, count);
            break;
        }
        nb = realloc(buf, count);
        if (!nb) {
            ret = vd_error_set(err, -ENOMEM, "out of memory");
            break;
        }
        buf = nb;
        ret = read_be(node, off, buf, count, err);
        if (ret < 0) {
            break;
        }
        ret = parse_mish(s, ps, buf, count, err);
        if (ret < 0) {
            break;
        }
        off += count;
    }
    free(buf);
    return ret;
}

/* glib's g_base64_decode (2.74): characters outside the alphabet are
 * skipped, '=' counts as a zero digit, an incomplete last group is
 * dropped, and in each group of four the second and third output bytes
 * are dropped when the digit before the last, or the last, is '='.
 * Decodes in place; returns the length. */
static size_t base64_decode(char *text)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    uint8_t *out = (uint8_t *)text;
    size_t n = 0;
    uint32_t v = 0;
    int digits = 0;
    char last0 = 0, last1 = 0;

    for (const char *p = text; *p; p++) {
        const char *a = strchr(alphabet, *p);

        if (*p != '=' && !a) {
            continue;
        }
        last1 = last0;
        last0 = *p;
        v = v << 6 | (uint32_t)(a ? a - alphabet : 0);
        if (++digits == 4) {
            out[n++] = (uint8_t)(v >> 16);
            if (last1 != '=') {
                out[n++] = (uint8_t)(v >> 8);
            }
            if (last0 != '=') {
                out[n++] = (uint8_t)v;
            }
            digits = 0;
        }
    }
    return n;
}

static int read_plist(vd_node *node, dmg_parse *ps, uint64_t begin,
                      uint64_t length, vd_error *err)
{
    dmg_state *s = node->opaque;
    char *buf, *p, *start, *stop;
    int ret;

    if (length == 0 || length > DMG_PLIST_MAX) {
        return vd_error_set(err, -EINVAL, "property list length %" PRIu64
                            " is not between 1 and %u", length,
                            DMG_PLIST_MAX);
    }
    buf = malloc(length + 1);
    if (!buf) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    buf[length] = '\0';
    ret = read_be(node, begin, buf, length, err);
    /* C strings, as QEMU's strstr: a NUL byte ends the list early. */
    for (p = buf; ret == 0 && (start = strstr(p, "<data>")); p = stop + 1) {
        size_t n;

        start += 6;
        stop = strstr(start, "</data>");
        if (!stop) {
            ret = vd_error_set(err, -EINVAL, "property list: <data> at "
                               "byte %td is not closed",
                               start - 6 - buf);
            break;
        }
        *stop = '\0';
        n = base64_decode(start);
        ret = parse_mish(s, ps, (const uint8_t *)start, n, err);
    }
    free(buf);
    return ret;
}

/* The trailer's offset: "koly" in the last 515 bytes. */
static int64_t find_koly(vd_node *node, vd_error *err)
{
    uint8_t buf[515];
    int64_t len = vd_node_getlength(node->file->node), off = 0;
    int ret;

    if (len < 0) {
        return vd_error_set(err, (int)len, "Failed to get file size while "
                            "reading UDIF trailer");
    }
    if (len < 512) {
        return vd_error_set(err, -EINVAL, "dmg file must be at least 512 "
                            "bytes long");
    }
    if (len > 511 + 512) {
        off = len - 511 - 512;
    }
    if (len > 515) {
        len = 515;
    }
    ret = vd_child_pread(node->file, (uint64_t)off, buf, (uint64_t)len, err);
    if (ret < 0) {
        vd_error_prepend(err, "Failed while reading UDIF trailer: ");
        return ret;
    }
    for (int64_t i = 0; i < len - 3; i++) {
        if (memcmp(buf + i, "koly", 4) == 0) {
            return off + i;
        }
    }
    return vd_error_set(err, -EINVAL, "Could not locate UDIF trailer in dmg "
                        "file");
}

static void free_state(dmg_state *s)
{
    free(s->chunks);
    free(s->compressed);
    free(s->data);
    free(s->spare_compressed);
    free(s->spare_data);
    s->chunks = NULL;
    s->compressed = s->data = NULL;
    s->spare_compressed = s->spare_data = NULL;
    s->n_chunks = s->cap = 0;
}

static int dmg_open(vd_node *node, vd_opts *opts, unsigned flags,
                    vd_error *err)
{
    dmg_state *s = node->opaque;
    dmg_parse ps = { 0 };
    uint64_t koly, rsrc_off, rsrc_len, xml_off, xml_len, sectors;
    int64_t k;
    int ret;

    (void)opts;
    s->filename = node->filename;
    pthread_mutex_init(&s->lock, NULL);
    if (flags & VD_NODE_RDWR) {
        return vd_error_set(err, -EACCES, "Image is read-only");
    }
    s->max_compressed = 1;
    s->max_sectors = 1;
    k = find_koly(node, err);
    if (k < 0) {
        return (int)k;
    }
    koly = (uint64_t)k;
    if ((ret = read_u64(node, koly + 0x18, &ps.data_fork_offset, err)) < 0 ||
        (ret = read_u64(node, koly + 0x28, &rsrc_off, err)) < 0 ||
        (ret = read_u64(node, koly + 0x30, &rsrc_len, err)) < 0 ||
        (ret = read_u64(node, koly + 0xd8, &xml_off, err)) < 0 ||
        (ret = read_u64(node, koly + 0xe0, &xml_len, err)) < 0 ||
        (ret = read_u64(node, koly + 0x1ec, &sectors, err)) < 0) {
        vd_error_prepend(err, "cannot read the UDIF trailer: ");
        return ret;
    }
    if (ps.data_fork_offset > koly) {
        return vd_error_set(err, -EINVAL, "data fork offset 0x%" PRIx64
                            " lies past the UDIF trailer (0x%" PRIx64 ")",
                            ps.data_fork_offset, koly);
    }
    if (rsrc_off >= koly || rsrc_len > koly - rsrc_off) {
        return vd_error_set(err, -EINVAL, "resource fork (0x%" PRIx64 ", %"
                            PRIu64 " bytes) does not lie before the UDIF "
                            "trailer (0x%" PRIx64 ")", rsrc_off, rsrc_len,
                            koly);
    }
    if (xml_off >= koly || xml_len > koly - xml_off) {
        return vd_error_set(err, -EINVAL, "property list (0x%" PRIx64 ", %"
                            PRIu64 " bytes) does not lie before the UDIF "
                            "trailer (0x%" PRIx64 ")", xml_off, xml_len,
                            koly);
    }
    /* QEMU's total_sectors is signed, and its length in bytes must not
     * overflow (bdrv_getlength's EFBIG). */
    if (sectors > (uint64_t)INT64_MAX / 512) {
        return vd_error_set(err, -EFBIG, "sector count %" PRIu64 " is too "
                            "large", sectors);
    }
    s->size = sectors * 512;
    if (rsrc_len) {
        ret = read_resource_fork(node, &ps, rsrc_off, rsrc_len, err);
    } else if (xml_len) {
        ret = read_plist(node, &ps, xml_off, xml_len, err);
    } else {
        ret = vd_error_set(err, -EINVAL, "the UDIF trailer names neither a "
                           "resource fork nor a property list");
    }
    if (ret < 0) {
        free_state(s);
        return ret;
    }
    s->current = s->n_chunks;
    node->bl.request_alignment = 512;
    return 0;
}

static void dmg_close(vd_node *node)
{
    dmg_state *s = node->opaque;

    free_state(s);
    pthread_mutex_destroy(&s->lock);
}

static bool in_chunk(const dmg_state *s, uint32_t i, uint64_t sector)
{
    return i < s->n_chunks && s->chunks[i].sector <= sector &&
           s->chunks[i].sector + s->chunks[i].count > sector;
}

/* QEMU's binary search (the same probes, so the same answer for tables
 * that are not sorted); n_chunks when no chunk holds @sector. */
static uint32_t search_chunk(const dmg_state *s, uint64_t sector)
{
    uint32_t lo = 0, hi = s->n_chunks, mid;

    while (lo <= hi) {
        mid = lo + (hi - lo) / 2;
        if (mid >= s->n_chunks) {
            break;
        }
        if (s->chunks[mid].sector > sector) {
            if (mid == 0) {
                break;
            }
            hi = mid - 1;
        } else if (s->chunks[mid].sector + s->chunks[mid].count > sector) {
            return mid;
        } else {
            lo = mid + 1;
        }
    }
    return s->n_chunks;
}

/* Decompresses chunk @c from @in into @out: 0, or -EIO when it does not
 * make exactly its sectors. */
static int inflate_chunk(const uint8_t *in, uint8_t *out, const dmg_chunk *c)
{
    z_stream zs;
    int zr;

    memset(&zs, 0, sizeof(zs));
    zs.next_in = (Bytef *)in;
    zs.avail_in = (uInt)c->length;
    zs.next_out = out;
    zs.avail_out = (uInt)(c->count * 512);
    if (inflateInit(&zs) != Z_OK) {
        return -EIO;
    }
    zr = inflate(&zs, Z_FINISH);
    inflateEnd(&zs);
    if (zr != Z_STREAM_END || zs.total_out != c->count * 512) {
        return -EIO;
    }
    return 0;
}

static int bunzip_chunk(const uint8_t *in, uint8_t *out, const dmg_chunk *c)
{
#ifdef VDISK_HAVE_BZIP2
    bz_stream bz;
    uint64_t made;
    int r;

    memset(&bz, 0, sizeof(bz));
    if (BZ2_bzDecompressInit(&bz, 0, 0) != BZ_OK) {
        return -EIO;
    }
    bz.next_in = (char *)in;
    bz.avail_in = (unsigned)c->length;
    bz.next_out = (char *)out;
    bz.avail_out = (unsigned)(c->count * 512);
    r = BZ2_bzDecompress(&bz);
    made = (uint64_t)bz.total_out_hi32 << 32 | bz.total_out_lo32;
    BZ2_bzDecompressEnd(&bz);
    return r == BZ_STREAM_END && made == c->count * 512 ? 0 : -EIO;
#else
    (void)in;
    (void)out;
    (void)c;
    return -EIO;
#endif
}

/* The chunk holding @sector: its index in *@out, or the error naming
 * what is missing. */
static int find_chunk(const dmg_state *s, uint64_t sector, uint32_t *out,
                      vd_error *err)
{
    uint32_t i = search_chunk(s, sector);

    if (i >= s->n_chunks) {
        return vd_error_set(err, -EIO, "%s: no chunk maps sector %" PRIu64
                            "%s", s->filename, sector,
                            s->n_lzfse_dropped ? " (the image has lzfse "
                            "chunks, which vdisk cannot read)"
                            : s->n_bzip2_dropped ? " (the image has bzip2 "
                            "chunks, and vdisk was built without libbz2)"
                            : s->n_unknown_dropped ? " (the image has chunks "
                            "of unknown types)" : "");
    }
    *out = i;
    return 0;
}

/* Reads data chunk @i (raw, zlib or bzip2) into @data, through
 * @compressed; both of the largest chunk's size. Needs no lock. */
static int decode_chunk(vd_node *node, uint32_t i, uint8_t *compressed,
                        uint8_t *data, vd_error *err)
{
    dmg_state *s = node->opaque;
    const dmg_chunk *c = &s->chunks[i];
    int ret;

    if (c->offset > (uint64_t)INT64_MAX - c->length) {
        return vd_error_set(err, -EIO, "%s: chunk %" PRIu32 " at 0x%" PRIx64
                            " is out of range", s->filename, i, c->offset);
    }
    if (c->type == UDRW) {
        memset(data + c->length, 0, c->count * 512 > c->length
                                    ? c->count * 512 - c->length : 0);
        return vd_child_pread(node->file, c->offset, data, c->length, err);
    }
    ret = vd_child_pread(node->file, c->offset, compressed, c->length, err);
    if (ret < 0) {
        return ret;
    }
    ret = c->type == UDZO ? inflate_chunk(compressed, data, c)
                          : bunzip_chunk(compressed, data, c);
    if (ret < 0) {
        return vd_error_set(err, -EIO, "%s: %s chunk %" PRIu32 " (%" PRIu64
                            " bytes at 0x%" PRIx64 ") does not decompress "
                            "to its %" PRIu64 " sectors", s->filename,
                            c->type == UDZO ? "zlib" : "bzip2", i, c->length,
                            c->offset, c->count);
    }
    return 0;
}

/* A pair of buffers of the largest chunk's size: the spare pair, or new
 * ones. Under s->lock. */
static int take_buffers(dmg_state *s, uint8_t **compressed, uint8_t **data,
                        vd_error *err)
{
    if (s->spare_data) {
        *compressed = s->spare_compressed;
        *data = s->spare_data;
        s->spare_compressed = s->spare_data = NULL;
        return 0;
    }
    *compressed = malloc(s->max_compressed + 1);
    *data = malloc(s->max_sectors * 512);
    if (!*compressed || !*data) {
        free(*compressed);
        free(*data);
        *compressed = *data = NULL;
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    return 0;
}

/* Keeps a pair as the spare one, or frees it. Under s->lock. */
static void give_buffers(dmg_state *s, uint8_t *compressed, uint8_t *data)
{
    if (!s->spare_data && data) {
        s->spare_compressed = compressed;
        s->spare_data = data;
        return;
    }
    free(compressed);
    free(data);
}

/* Makes chunk @i current (decompressed into s->data unless it is
 * zeros). Under s->lock, which it drops while it decompresses into the
 * caller's pair @mine_c, @mine_d (taken when NULL) where that is
 * allowed (@parallel); the decompressed pair becomes the cache and the
 * cache's old pair comes back in the caller's. */
static int load_chunk(vd_node *node, uint32_t i, bool parallel,
                      uint8_t **mine_c, uint8_t **mine_d, vd_error *err)
{
    dmg_state *s = node->opaque;
    const dmg_chunk *c = &s->chunks[i];
    uint8_t *swap;
    int ret;

    if (c->type == UDZE || c->type == UDIG) {
        s->current = i;
        return 0;
    }
    if (!parallel) {
        /* One pair, the cache's own, as before the parallel reads. */
        if (!s->data) {
            ret = take_buffers(s, &s->compressed, &s->data, err);
            if (ret < 0) {
                return ret;
            }
        }
        s->current = s->n_chunks;
        ret = decode_chunk(node, i, s->compressed, s->data, err);
        if (ret == 0) {
            s->current = i;
        }
        return ret;
    }
    if (!*mine_d) {
        ret = take_buffers(s, mine_c, mine_d, err);
        if (ret < 0) {
            return ret;
        }
    }
    pthread_mutex_unlock(&s->lock);
    ret = decode_chunk(node, i, *mine_c, *mine_d, err);
    pthread_mutex_lock(&s->lock);
    if (ret < 0) {
        return ret;
    }
    swap = s->compressed;
    s->compressed = *mine_c;
    *mine_c = swap;
    swap = s->data;
    s->data = *mine_d;
    *mine_d = swap;
    s->current = i;
    return 0;
}

static int dmg_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                      vd_iov *qiov, unsigned flags, vd_error *err)
{
    dmg_state *s = node->opaque;
    bool parallel = s->max_compressed + 1 + s->max_sectors * 512 <=
                    DMG_PARALLEL_MAX;
    uint8_t *mine_c = NULL, *mine_d = NULL;
    uint64_t done = 0;
    int ret = 0;

    (void)flags;
    pthread_mutex_lock(&s->lock);
    /* A run of sectors of one chunk at a time. */
    while (done < bytes) {
        uint64_t sector = (off + done) / 512, n;
        const dmg_chunk *c;
        uint32_t i = 0;

        if (!in_chunk(s, s->current, sector)) {
            ret = find_chunk(s, sector, &i, err);
            if (ret == 0) {
                ret = load_chunk(node, i, parallel, &mine_c, &mine_d, err);
            }
            if (ret < 0) {
                break;
            }
        }
        c = &s->chunks[s->current];
        /* sectors left in the chunk (a zero chunk's count is unbounded) */
        n = c->sector + c->count - sector;
        n = n > (bytes - done) / 512 ? bytes - done : n * 512;
        if (c->type == UDZE || c->type == UDIG) {
            vd_iov_memset(qiov, done, 0, n);
        } else {
            vd_iov_from_buf(qiov, done,
                            s->data + (sector - c->sector) * 512, n);
        }
        done += n;
    }
    give_buffers(s, mine_c, mine_d);
    pthread_mutex_unlock(&s->lock);
    return ret;
}

static int64_t dmg_getlength(vd_node *node)
{
    dmg_state *s = node->opaque;

    return (int64_t)s->size;
}

const vd_driver vd_driver_dmg = {
    .name = "dmg",
    .instance_size = sizeof(dmg_state),
    .is_format = true,
    .probe = dmg_probe,
    .open = dmg_open,
    .close = dmg_close,
    .preadv = dmg_preadv,
    .block_status = fmt_block_status_all_data,
    .getlength = dmg_getlength,
};
