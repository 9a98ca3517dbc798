/*
 * qcow2 compressed clusters: the codecs and the descriptor arithmetic.
 *
 * A compressed cluster is stored as a byte stream that starts anywhere in
 * the file (not cluster-aligned) and whose length is only known to the
 * 512-byte sector (qcow2.txt, "Compressed Clusters Descriptor"). Two
 * codecs exist, chosen per image by the header's compression_type:
 *
 *   zlib (0): raw deflate, window bits -12, as QEMU writes it; inflation
 *             stops once one cluster is produced, the rest of the last
 *             sector is padding.
 *   zstd (1): one or more zstd frames written by a single
 *             ZSTD_compressStream2(ZSTD_e_end); read back with the
 *             streaming decompressor until exactly one cluster is out,
 *             which must coincide with the end of a frame.
 *
 * The file is organised bottom-up: the two codecs, the codec dispatch
 * (qcow2_compress_buf / qcow2_decompress_buf), then the descriptor
 * helpers that the driver's read path and the checker share. Every size
 * is bounded by the cluster size: the output must be exactly one cluster,
 * and a descriptor whose stream leaves the file is rejected before any
 * buffer is allocated.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "core/error.h"
#include "drivers/qcow2/qcow2.h"

ssize_t qcow2_compress_buf(int type, qcow2_compressor *cz, void *dst,
                           size_t dst_size, const void *src, size_t src_size);
int qcow2_decompress_buf(int type, void *dst, size_t dst_size,
                         const void *src, size_t src_size);

/* ---- zlib ---------------------------------------------------------- */

/* A thread's codec state, kept from one cluster to the next:
 * deflateInit2() allocates and clears some 270 KiB for every stream (and
 * QEMU pays that per cluster), deflateReset() makes the same stream
 * start again, with the same output, without it; the same for a zstd
 * context. */
struct qcow2_compressor {
    z_stream zs;
    bool zs_live;
    ZSTD_CCtx *cctx;
};

qcow2_compressor *qcow2_compressor_new(void)
{
    return calloc(1, sizeof(qcow2_compressor));
}

void qcow2_compressor_free(qcow2_compressor *cz)
{
    if (cz) {
        if (cz->zs_live) {
            deflateEnd(&cz->zs);
        }
        ZSTD_freeCCtx(cz->cctx);
        free(cz);
    }
}

static ssize_t zlib_compress(qcow2_compressor *cz, void *dst,
                             size_t dst_size, const void *src,
                             size_t src_size)
{
    z_stream one, *zs = cz ? &cz->zs : &one;
    ssize_t ret;
    int zr;

    if (cz && cz->zs_live) {
        if (deflateReset(zs) != Z_OK) {
            return -EIO;
        }
    } else {
        memset(zs, 0, sizeof(*zs));
        /* -12: raw deflate with a 4 KiB window, what QEMU has always
         * written; readers rely on the missing zlib header. */
        if (deflateInit2(zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
                         Z_DEFAULT_STRATEGY) != Z_OK) {
            return -EIO;
        }
        if (cz) {
            cz->zs_live = true;
        }
    }
    zs->next_in = (Bytef *)src;
    zs->avail_in = (uInt)src_size;
    zs->next_out = dst;
    zs->avail_out = (uInt)dst_size;
    zr = deflate(zs, Z_FINISH);
    if (zr == Z_STREAM_END) {
        ret = (ssize_t)(dst_size - zs->avail_out);
    } else if (zr == Z_OK || zr == Z_BUF_ERROR) {
        ret = -ENOSPC;      /* did not fit: the caller stores it plainly */
    } else {
        ret = -EIO;
    }
    if (!cz) {
        deflateEnd(zs);
    }
    return ret;
}

static int zlib_decompress(void *dst, size_t dst_size, const void *src,
                           size_t src_size)
{
    z_stream zs;
    int zr, ret;

    memset(&zs, 0, sizeof(zs));
    zs.next_in = (Bytef *)src;
    zs.avail_in = (uInt)src_size;
    zs.next_out = dst;
    zs.avail_out = (uInt)dst_size;
    if (inflateInit2(&zs, -12) != Z_OK) {
        return -EIO;
    }
    zr = inflate(&zs, Z_FINISH);
    /* The stored length is rounded up to a sector, so input may be left
     * over (Z_BUF_ERROR with a full output) and that is fine; what counts
     * is that exactly one cluster came out. */
    if ((zr == Z_STREAM_END || zr == Z_BUF_ERROR) && zs.avail_out == 0) {
        ret = 0;
    } else {
        ret = -EIO;
    }
    inflateEnd(&zs);
    return ret;
}

/* ---- zstd ---------------------------------------------------------- */

static ssize_t zstd_compress(qcow2_compressor *cz, void *dst,
                             size_t dst_size, const void *src,
                             size_t src_size)
{
    ZSTD_CCtx *cctx = cz ? cz->cctx : NULL;
    ZSTD_outBuffer out = { dst, dst_size, 0 };
    ZSTD_inBuffer in = { src, src_size, 0 };
    size_t zr;
    ssize_t ret;

    if (cctx) {
        /* A frame the last cluster left unfinished (-ENOSPC) is dropped;
         * the parameters stay the defaults. */
        ZSTD_CCtx_reset(cctx, ZSTD_reset_session_only);
    } else {
        cctx = ZSTD_createCCtx();
        if (!cctx) {
            return -ENOMEM;
        }
        if (cz) {
            cz->cctx = cctx;
        }
    }
    /* One call with ZSTD_e_end: either the whole frame fits in @dst (zr
     * == 0) or it does not, and then we give up rather than loop, because
     * the buffer cannot grow past what a compressed cluster may take. */
    zr = ZSTD_compressStream2(cctx, &out, &in, ZSTD_e_end);
    if (ZSTD_isError(zr)) {
        ret = ZSTD_getErrorCode(zr) == ZSTD_error_dstSize_tooSmall
              ? -ENOSPC : -EIO;
    } else if (zr != 0) {
        ret = -ENOSPC;
    } else {
        ret = (ssize_t)out.pos;
    }
    if (!cz) {
        ZSTD_freeCCtx(cctx);
    }
    return ret;
}

static int zstd_decompress(void *dst, size_t dst_size, const void *src,
                           size_t src_size)
{
    ZSTD_DCtx *dctx = ZSTD_createDCtx();
    ZSTD_outBuffer out = { dst, dst_size, 0 };
    ZSTD_inBuffer in = { src, src_size, 0 };
    size_t zr = 0;
    int ret = 0;

    if (!dctx) {
        return -ENOMEM;
    }
    /* The stream may hold several frames; keep going until the cluster is
     * full. A call that consumes nothing and produces nothing means the
     * input is truncated or garbage: stop instead of spinning. */
    while (out.pos < out.size) {
        size_t in_pos = in.pos, out_pos = out.pos;

        zr = ZSTD_decompressStream(dctx, &out, &in);
        if (ZSTD_isError(zr)) {
            ret = -EIO;
            break;
        }
        if (in.pos == in_pos && out.pos == out_pos) {
            ret = -EIO;
            break;
        }
    }
    /* A frame still open here would decode to more than one cluster. */
    if (ret == 0 && zr != 0) {
        ret = -EIO;
    }
    ZSTD_freeDCtx(dctx);
    return ret;
}

/* ---- dispatch ------------------------------------------------------ */

ssize_t qcow2_compress_buf(int type, qcow2_compressor *cz, void *dst,
                           size_t dst_size, const void *src, size_t src_size)
{
    switch (type) {
    case QCOW2_COMPRESSION_ZLIB:
        return zlib_compress(cz, dst, dst_size, src, src_size);
    case QCOW2_COMPRESSION_ZSTD:
        return zstd_compress(cz, dst, dst_size, src, src_size);
    default:
        return -ENOTSUP;
    }
}

int qcow2_decompress_buf(int type, void *dst, size_t dst_size,
                         const void *src, size_t src_size)
{
    switch (type) {
    case QCOW2_COMPRESSION_ZLIB:
        return zlib_decompress(dst, dst_size, src, src_size);
    case QCOW2_COMPRESSION_ZSTD:
        return zstd_decompress(dst, dst_size, src, src_size);
    default:
        return -ENOTSUP;
    }
}

/* ---- clusters ------------------------------------------------------ */

int qcow2_compress_cluster(qcow2_state *s, qcow2_compressor *cz,
                           const uint8_t *in, uint8_t *out, size_t out_cap,
                           size_t *out_len)
{
    ssize_t n;

    if (out_cap < 2) {
        return -ENOSPC;
    }
    /* QEMU only stores a cluster compressed when that saves at least one
     * byte, so the codec gets one byte less than the caller's buffer. */
    n = qcow2_compress_buf(s->compression_type, cz, out, out_cap - 1, in,
                           s->cluster_size);
    if (n < 0) {
        return (int)n;
    }
    *out_len = (size_t)n;
    return 0;
}

int qcow2_decompress_cluster(qcow2_state *s, uint64_t l2_entry,
                             uint8_t *out, vd_error *err)
{
    uint64_t host_off, nb_bytes;
    int64_t file_len;
    uint8_t *in;
    int ret;

    qcow2_parse_compressed(s, l2_entry, &host_off, &nb_bytes);
    file_len = vd_node_getlength(s->file->node);
    if (file_len < 0) {
        return vd_error_set_errno(err, (int)file_len,
                                  "%s: cannot get the file length",
                                  s->filename);
    }
    /* The descriptor's sector count may reach into the last, partial
     * sector of the file but no further: a writer never reserves sectors
     * it did not write. This also bounds the buffer below by the file. */
    if (host_off >= (uint64_t)file_len ||
        host_off + nb_bytes > (((uint64_t)file_len + 511) & ~511ull)) {
        /* A plain I/O error, as QEMU gives: this runs without the driver
         * lock, so it does not mark the image corrupt. */
        return vd_error_set(err, -EIO, "%s: compressed cluster at 0x%" PRIx64
                            " (%" PRIu64 " bytes) lies outside the file (L2 "
                            "entry 0x%" PRIx64 ")", s->filename, host_off,
                            nb_bytes, l2_entry);
    }
    if (host_off + nb_bytes > (uint64_t)file_len) {
        nb_bytes = (uint64_t)file_len - host_off;
    }

    /* Aligned: the kernel copies into a buffer that is not 32-byte
     * aligned up to four times slower on some CPUs. */
    in = vd_node_blockalign(s->file->node, nb_bytes);
    if (!in) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory reading a "
                            "compressed cluster", s->filename);
    }
    vd_node_debug_event(s->file->node, VD_BLKDBG_READ_COMPRESSED);
    ret = vd_child_pread(s->file, host_off, in, nb_bytes, err);
    if (ret < 0) {
        free(in);
        return ret;
    }
    ret = qcow2_decompress_buf(s->compression_type, out, s->cluster_size,
                               in, nb_bytes);
    free(in);
    if (ret < 0) {
        return vd_error_set(err, -EIO, "%s: compressed cluster at 0x%"
                            PRIx64 " does not decompress to one cluster",
                            s->filename, host_off);
    }
    return 0;
}
