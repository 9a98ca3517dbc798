/*
 * The cloop format driver, read only: Knoppix' compressed loop images as
 * QEMU 7.2's block/cloop.c reads them.
 *
 * Layout (big endian): 128 bytes of shell script (the "#V2.0 Format"
 * header, which is all the probe looks at), the uncompressed block size
 * at 128, the block count n at 132, then n + 1 file offsets of 64 bits:
 * block i is the zlib stream (with its zlib header) from offset i to
 * offset i + 1, and inflates to exactly one block. QEMU reads every
 * image through that layout whatever its script says (cloop 2.x's V2.0
 * and the V3.0 header of the same layout alike); it needs -f cloop when
 * the script is not V2.0's.
 *
 * As QEMU: the block size is a non-zero multiple of 512 of at most
 * 64 MiB, the offsets table at most 512 MiB, the offsets never decrease
 * and no block is stored in more than 128 MiB, all checked at open with
 * QEMU's messages; the disk is n blocks (QEMU multiplies in 32 bits and
 * so does vdisk); a block that does not inflate to exactly one block
 * fails the read (EIO); the offsets table and blocks past the end of
 * the file read as zeros. Block status reports the whole disk as data
 * (QEMU's generic answer for a format without it). Writing and creating
 * are refused (QEMU's driver reads only).
 *
 * Beyond QEMU: only the part of the offsets table inside the file is
 * read and kept (the rest is zeros, which the monotonicity check then
 * judges as QEMU would), so a header claiming 64M blocks costs no
 * memory; the block buffers are allocated at the first read.
 *
 * Locking: s->lock guards the inflated-block cache and its buffers.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "simple-fmt.h"

#define CLOOP_MAX_BLOCK (64u * 1024 * 1024)
#define CLOOP_MAX_OFFSETS_BYTES (512u * 1024 * 1024)
#define CLOOP_TABLE 136

typedef struct cloop_state {
    const char *filename;
    uint32_t block_size, n_blocks;
    uint64_t *offsets;        /* the entries inside the file */
    uint64_t n_offsets;       /* how many those are (the rest are 0) */
    uint64_t max_compressed;
    uint64_t size;
    uint8_t *compressed, *block;
    uint32_t cached;          /* the block in s->block, n_blocks: none */
    pthread_mutex_t lock;
} cloop_state;

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

static uint64_t offset_at(const cloop_state *s, uint64_t i)
{
    return i < s->n_offsets ? s->offsets[i] : 0;
}

static void free_state(cloop_state *s)
{
    free(s->offsets);
    free(s->compressed);
    free(s->block);
    s->offsets = NULL;
    s->compressed = s->block = NULL;
}

static int cloop_open(vd_node *node, vd_opts *opts, unsigned flags,
                      vd_error *err)
{
    cloop_state *s = node->opaque;
    uint8_t h[8];
    uint64_t entries;
    int64_t flen;
    int ret;

    (void)opts;
    s->filename = node->filename;
    pthread_mutex_init(&s->lock, NULL);
    if (flags & VD_NODE_RDWR) {
        return vd_error_set(err, -EACCES, "Image is read-only");
    }
    flen = vd_node_getlength(node->file->node);
    if (flen < 0) {
        return vd_error_set(err, (int)flen, "cannot get the file length");
    }
    memset(h, 0, sizeof(h));
    ret = vd_child_pread(node->file, 128, h, sizeof(h), err);
    if (ret < 0) {
        return ret;
    }
    s->block_size = fmt_rd_be32(h);
    s->n_blocks = fmt_rd_be32(h + 4);
    if (s->block_size % 512) {
        return vd_error_set(err, -EINVAL, "block_size %" PRIu32 " must be a "
                            "multiple of 512", s->block_size);
    }
    if (s->block_size == 0) {
        return vd_error_set(err, -EINVAL, "block_size cannot be zero");
    }
    if (s->block_size > CLOOP_MAX_BLOCK) {
        return vd_error_set(err, -EINVAL, "block_size %" PRIu32 " must be %u "
                            "MB or less", s->block_size,
                            CLOOP_MAX_BLOCK / (1024 * 1024));
    }
    if (s->n_blocks > (UINT32_MAX - 1) / 8) {
        return vd_error_set(err, -EINVAL, "n_blocks %" PRIu32 " must be %zu "
                            "or less", s->n_blocks,
                            (size_t)((UINT32_MAX - 1) / 8));
    }
    if (((uint64_t)s->n_blocks + 1) * 8 > CLOOP_MAX_OFFSETS_BYTES) {
        return vd_error_set(err, -EINVAL, "image requires too many offsets, "
                            "try increasing block size");
    }
    entries = (uint64_t)s->n_blocks + 1;
    s->n_offsets = (uint64_t)flen <= CLOOP_TABLE ? 0
                   : ((uint64_t)flen - CLOOP_TABLE + 7) / 8;
    if (s->n_offsets > entries) {
        s->n_offsets = entries;
    }
    s->offsets = calloc(s->n_offsets ? s->n_offsets : 1, 8);
    if (!s->offsets) {
        return vd_error_set(err, -ENOMEM, "Could not allocate offsets table");
    }
    ret = vd_child_pread(node->file, CLOOP_TABLE, s->offsets,
                         s->n_offsets * 8, err);
    if (ret < 0) {
        vd_error_prepend(err, "cannot read the offsets table: ");
        goto fail;
    }
    for (uint64_t i = 0; i < s->n_offsets; i++) {
        s->offsets[i] = fmt_rd_be64((const uint8_t *)&s->offsets[i]);
    }
    /* The entries past the file are zeros: checking up to the first of
     * them covers them all. */
    s->max_compressed = 1;
    for (uint64_t i = 1; i < entries && i <= s->n_offsets; i++) {
        uint64_t prev = offset_at(s, i - 1), cur = offset_at(s, i);

        if (cur < prev) {
            ret = vd_error_set(err, -EINVAL, "offsets not monotonically "
                               "increasing at index %" PRIu64 ", image file "
                               "is corrupt", i);
            goto fail;
        }
        if (cur - prev > 2ull * CLOOP_MAX_BLOCK) {
            ret = vd_error_set(err, -EINVAL, "invalid compressed block size "
                               "at index %" PRIu64 ", image file is corrupt",
                               i);
            goto fail;
        }
        if (cur - prev > s->max_compressed) {
            s->max_compressed = cur - prev;
        }
    }
    s->cached = s->n_blocks;
    /* 32-bit product in QEMU */
    s->size = (uint64_t)(uint32_t)(s->n_blocks * (s->block_size / 512)) * 512;
    node->bl.request_alignment = 512;
    return 0;
fail:
    free_state(s);
    return ret;
}

static void cloop_close(vd_node *node)
{
    cloop_state *s = node->opaque;

    free_state(s);
    pthread_mutex_destroy(&s->lock);
}

/* Inflates block @b into s->block. Under s->lock. */
static int read_block(vd_node *node, uint32_t b, vd_error *err)
{
    cloop_state *s = node->opaque;
    uint64_t start = offset_at(s, b), bytes = offset_at(s, b + 1) - start;
    z_stream zs;
    int zr, ret;

    if (s->cached == b) {
        return 0;
    }
    if (!s->block) {
        s->compressed = malloc(s->max_compressed + 1);
        s->block = malloc(s->block_size);
        if (!s->compressed || !s->block) {
            free(s->compressed);
            free(s->block);
            s->compressed = s->block = NULL;
            return vd_error_set(err, -ENOMEM, "%s: out of memory",
                                s->filename);
        }
    }
    s->cached = s->n_blocks;
    if (start > (uint64_t)INT64_MAX - bytes) {
        return vd_error_set(err, -EIO, "%s: block %" PRIu32 " at offset "
                            "0x%" PRIx64 " is out of range", s->filename, b,
                            start);
    }
    ret = vd_child_pread(node->file, start, s->compressed, bytes, err);
    if (ret < 0) {
        vd_error_prepend(err, "%s: block %" PRIu32 ": ", s->filename, b);
        return ret;
    }
    memset(&zs, 0, sizeof(zs));
    zs.next_in = s->compressed;
    zs.avail_in = (uInt)bytes;
    zs.next_out = s->block;
    zs.avail_out = s->block_size;
    if (inflateInit(&zs) != Z_OK) {
        return vd_error_set(err, -EIO, "%s: zlib cannot start", s->filename);
    }
    zr = inflate(&zs, Z_FINISH);
    inflateEnd(&zs);
    if (zr != Z_STREAM_END || zs.total_out != s->block_size) {
        return vd_error_set(err, -EIO, "%s: block %" PRIu32 " (%" PRIu64
                            " bytes at 0x%" PRIx64 ") does not inflate to "
                            "one block", s->filename, b, bytes, start);
    }
    s->cached = b;
    return 0;
}

static int cloop_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                        vd_iov *qiov, unsigned flags, vd_error *err)
{
    cloop_state *s = node->opaque;
    uint64_t done = 0;
    int ret = 0;

    (void)flags;
    pthread_mutex_lock(&s->lock);
    while (done < bytes) {
        uint64_t pos = off + done;
        uint32_t b = (uint32_t)(pos / s->block_size);
        uint64_t in = pos % s->block_size;
        uint64_t n = s->block_size - in;

        if (n > bytes - done) {
            n = bytes - done;
        }
        ret = read_block(node, b, err);
        if (ret < 0) {
            break;
        }
        vd_iov_from_buf(qiov, done, s->block + in, n);
        done += n;
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

static int64_t cloop_getlength(vd_node *node)
{
    cloop_state *s = node->opaque;

    return (int64_t)s->size;
}

const vd_driver vd_driver_cloop = {
    .name = "cloop",
    .instance_size = sizeof(cloop_state),
    .is_format = true,
    .probe = cloop_probe,
    .open = cloop_open,
    .close = cloop_close,
    .preadv = cloop_preadv,
    .block_status = fmt_block_status_all_data,
    .getlength = cloop_getlength,
};
