/*
 * The parallels driver: Parallels' expandable images
 * (../shared/specs/parallels.rst), as QEMU 7.2's block/parallels.c reads,
 * writes, creates and checks them.
 *
 * Layout (little endian): a 64-byte header (magic "WithoutFreeSpace",
 * whose BAT counts sectors, or "WithouFreSpacExt", whose BAT counts
 * clusters; version 2; the cluster size in sectors ("tracks"); the BAT's
 * entry count; the disk size in sectors; the in-use mark; the data
 * offset in sectors), the BAT right after it (one 32-bit entry per
 * cluster: 0 unallocated, reading as zeros), then the data area.
 *
 * As QEMU: a writable open marks the header in use (0x746f6e59) and
 * close clears the mark and cuts the file at the end of the last
 * cluster; an image found in use is refused to writers except for
 * check, which reports it; a new cluster goes at the end of the data
 * (zeros where the request does not cover it); created images are
 * "WithouFreSpacExt" with the BAT padded to a whole number of clusters.
 * As QEMU, the file grows by zero writes 128 MiB (prealloc-size) ahead of
 * the clusters handed out and is cut back at close. The format
 * extension (dirty bitmaps) is
 * ignored, with QEMU's warning to writers.
 *
 * Beyond QEMU, tables are validated before use: a BAT reaching past the
 * end of the file is refused at open (it also bounds the allocation); a
 * BAT entry pointing into the header or the BAT, two entries sharing
 * storage, a virtual size larger than the BAT covers, or a data offset
 * the BAT cannot express make the image readable and checkable but not
 * writable (QEMU would overwrite its own metadata or one cluster with
 * another's data, or assert).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "simple-fmt.h"

#define PRL_MAGIC "WithoutFreeSpace"
#define PRL_MAGIC2 "WithouFreSpacExt"
#define PRL_VERSION 2
#define PRL_INUSE 0x746f6e59u
#define PRL_HEADER 64u
#define PRL_SECTOR 512u
#define PRL_DEFAULT_CLUSTER 1048576u
#define PRL_IMAGE_FACTOR ((uint64_t)1 << 32)

/* Header field offsets. */
enum {
    P_VERSION = 16, P_HEADS = 20, P_CYLINDERS = 24, P_TRACKS = 28,
    P_BAT_ENTRIES = 32, P_NB_SECTORS = 36, P_INUSE = 44, P_DATA_OFF = 48,
    P_FLAGS = 52, P_EXT_OFF = 56,
};

typedef struct prl_state {
    vd_node *node;
    vd_child *file;
    const char *filename;
    uint8_t *hdr;               /* header and BAT as on disk, under @lock */
    uint32_t tracks;            /* cluster size in sectors */
    uint32_t bat_size;
    uint32_t off_multiplier;    /* sectors per BAT unit */
    uint64_t cluster_size;
    uint64_t total_sectors;
    uint64_t data_start;        /* sectors */
    uint64_t data_end;          /* sectors, under @lock */
    uint64_t prealloc_sectors;  /* the file grows by this much more */
    uint64_t zero_end;          /* sectors: [data_end, zero_end) written
                                   as zeros by this node, under @lock */
    bool unclean;               /* found in use at open */
    bool writable;
    char *no_write;             /* why writes are refused, or NULL */
    pthread_mutex_t lock;
} prl_state;

static int parallels_probe(const uint8_t *buf, size_t len,
                           const char *filename)
{
    (void)filename;
    if (len < PRL_HEADER) {
        return 0;
    }
    if ((memcmp(buf, PRL_MAGIC, 16) == 0 ||
         memcmp(buf, PRL_MAGIC2, 16) == 0) &&
        fmt_rd32(buf + P_VERSION) == PRL_VERSION) {
        return 100;
    }
    return 0;
}

/* The host sector of BAT entry @i, 0 when unallocated. */
static uint64_t bat2sect(prl_state *s, uint32_t i)
{
    return (uint64_t)fmt_rd32(s->hdr + PRL_HEADER + (size_t)i * 4) *
           s->off_multiplier;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* What would make a write destroy data: returns a message (malloc'd) or
 * NULL; *oom on allocation failure. */
static char *bat_fault(prl_state *s, uint64_t bat_end, bool *oom)
{
    uint64_t *offs, n = 0;
    char *msg = NULL;
    int r = 0;

    *oom = false;
    if (s->data_start * PRL_SECTOR < bat_end) {
        r = asprintf(&msg, "data offset 0x%" PRIx64 " lies inside the BAT "
                     "(which ends at 0x%" PRIx64 ")",
                     s->data_start * PRL_SECTOR, bat_end);
    } else if (s->off_multiplier > 1 &&
               s->data_start % s->off_multiplier) {
        r = asprintf(&msg, "data offset 0x%" PRIx64 " is not a multiple of "
                     "the cluster size", s->data_start * PRL_SECTOR);
    } else if (s->total_sectors > (uint64_t)s->bat_size * s->tracks) {
        r = asprintf(&msg, "virtual size %" PRIu64 " exceeds the %" PRIu32
                     " clusters of the BAT", s->total_sectors * PRL_SECTOR,
                     s->bat_size);
    }
    if (r < 0 || msg) {
        *oom = r < 0;
        return r < 0 ? NULL : msg;
    }
    offs = malloc(((size_t)s->bat_size + 1) * sizeof(*offs));
    if (!offs) {
        *oom = true;
        return NULL;
    }
    for (uint32_t i = 0; i < s->bat_size; i++) {
        uint64_t off = bat2sect(s, i);
        if (!off) {
            continue;
        }
        if (off < s->data_start) {
            r = asprintf(&msg, "BAT entry %" PRIu32 " points to offset 0x%"
                         PRIx64 ", inside the header and BAT", i,
                         off * PRL_SECTOR);
            break;
        }
        offs[n++] = off;
    }
    if (!msg && r == 0 && n > 1) {
        qsort(offs, n, sizeof(*offs), cmp_u64);
        for (uint64_t i = 1; i < n; i++) {
            if (offs[i] - offs[i - 1] < s->tracks) {
                r = asprintf(&msg, "two BAT entries share the cluster at "
                             "offset 0x%" PRIx64, offs[i] * PRL_SECTOR);
                break;
            }
        }
    }
    free(offs);
    if (r < 0) {
        *oom = true;
        return NULL;
    }
    return msg;
}

static int write_header(prl_state *s, vd_error *err)
{
    return vd_child_pwrite(s->file, 0, s->hdr, PRL_HEADER, 0, err);
}

static void free_state(prl_state *s)
{
    free(s->hdr);
    free(s->no_write);
    pthread_mutex_destroy(&s->lock);
    memset(s, 0, sizeof(*s));
}

/* As QEMU's close: the in-use mark cleared and the file cut after the
 * last cluster (errors ignored, as there). Also called on a node whose
 * open failed (the core closes a broken node): the state is zero then. */
static void parallels_close(vd_node *node)
{
    prl_state *s = node->opaque;

    if (!s->hdr) {
        return;
    }
    if (s->writable) {
        fmt_wr32(s->hdr + P_INUSE, 0);
        if (write_header(s, NULL) == 0) {
            vd_node_truncate(s->file->node, s->data_end * PRL_SECTOR, true,
                             VD_PREALLOC_OFF, NULL);
        }
    }
    free_state(s);
}

/* prealloc-mode and prealloc-size: QEMU's runtime options. Both modes
 * grow the file with zero writes (QEMU's truncate mode needs a file that
 * reads zeros when grown, and falls back to them otherwise). */
static int take_runtime_opts(prl_state *s, vd_opts *opts, vd_error *err)
{
    static const char *const modes[] = { "falloc", "truncate", NULL };
    uint64_t size;
    int mode, ret;

    ret = vd_opts_take_size(opts, "prealloc-size", 128 << 20, &size, err);
    s->prealloc_sectors = size / PRL_SECTOR > s->tracks ? size / PRL_SECTOR
                                                          : s->tracks;
    if (ret == 0) {
        char *v = vd_opts_take(opts, "prealloc-mode");
        if (v) {
            ret = -EINVAL;
            for (mode = 0; modes[mode]; mode++) {
                if (strcmp(v, modes[mode]) == 0) {
                    ret = 0;
                }
            }
            if (ret < 0) {
                vd_error_set(err, -EINVAL, "%s: invalid prealloc-mode '%s' "
                             "(allowed values: falloc, truncate)",
                             s->filename, v);
            }
            free(v);
        }
    }
    return ret;
}

static int parallels_open(vd_node *node, vd_opts *opts, unsigned flags,
                          vd_error *err)
{
    prl_state *s = node->opaque;
    uint8_t h[PRL_HEADER] = { 0 };
    uint64_t bat_end;
    int64_t flen;
    bool oom;
    int ret;

    memset(s, 0, sizeof(*s));
    s->node = node;
    s->file = node->file;
    s->filename = node->filename ? node->filename : "parallels";
    pthread_mutex_init(&s->lock, NULL);

    flen = fmt_read_head(s->file, h, PRL_HEADER, s->filename, err);
    if (flen < 0) {
        ret = (int)flen;
        goto fail;
    }
    /* QEMU's checks, in its order and with its texts. */
    s->total_sectors = fmt_rd64(h + P_NB_SECTORS);
    if (fmt_rd32(h + P_VERSION) != PRL_VERSION) {
        ret = vd_error_set(err, -EINVAL, "Image not in Parallels format");
        goto fail;
    }
    if (memcmp(h, PRL_MAGIC, 16) == 0) {
        s->off_multiplier = 1;
        s->total_sectors &= 0xffffffff;
    } else if (memcmp(h, PRL_MAGIC2, 16) == 0) {
        s->off_multiplier = fmt_rd32(h + P_TRACKS);
    } else {
        ret = vd_error_set(err, -EINVAL, "Image not in Parallels format");
        goto fail;
    }
    s->tracks = fmt_rd32(h + P_TRACKS);
    if (s->tracks == 0) {
        ret = vd_error_set(err, -EINVAL, "Invalid image: Zero sectors per "
                           "track");
        goto fail;
    }
    if (s->tracks > INT32_MAX / 513) {
        ret = vd_error_set(err, -EFBIG, "Invalid image: Too big cluster");
        goto fail;
    }
    s->cluster_size = (uint64_t)s->tracks * PRL_SECTOR;
    s->bat_size = fmt_rd32(h + P_BAT_ENTRIES);
    if (s->bat_size > INT32_MAX / 4) {
        ret = vd_error_set(err, -EFBIG, "Catalog too large");
        goto fail;
    }
    /* vdisk's: the BAT must be in the file (this bounds the allocation)
     * and the disk no larger than the block layer's limit. */
    bat_end = PRL_HEADER + (uint64_t)s->bat_size * 4;
    if (bat_end > (uint64_t)flen) {
        ret = vd_error_set(err, -EINVAL, "%s: BAT of %" PRIu32 " entries "
                           "(to 0x%" PRIx64 ") extends beyond the end of the "
                           "file (0x%" PRIx64 ")", s->filename, s->bat_size,
                           bat_end, (uint64_t)flen);
        goto fail;
    }
    if (s->total_sectors > VD_MAX_LENGTH / PRL_SECTOR) {
        ret = vd_error_set(err, -EFBIG, "%s: virtual size of %" PRIu64
                           " sectors is too large", s->filename,
                           s->total_sectors);
        goto fail;
    }
    s->hdr = malloc(bat_end);
    if (!s->hdr) {
        ret = vd_error_set(err, -ENOMEM, "%s: cannot allocate the BAT",
                           s->filename);
        goto fail;
    }
    ret = vd_child_pread(s->file, 0, s->hdr, bat_end, err);
    if (ret < 0) {
        goto fail;
    }
    s->data_start = fmt_rd32(h + P_DATA_OFF);
    if (s->data_start == 0) {
        s->data_start = (bat_end + PRL_SECTOR - 1) / PRL_SECTOR;
    }
    s->data_end = s->data_start;
    for (uint32_t i = 0; i < s->bat_size; i++) {
        uint64_t off = bat2sect(s, i);
        if (off >= s->data_end) {
            s->data_end = off + s->tracks;
        }
    }
    if (fmt_rd32(h + P_INUSE) == PRL_INUSE) {
        /* Not closed correctly: check is mandatory. */
        s->unclean = true;
        if (!node->read_only && !(flags & VD_NODE_CHECK)) {
            ret = vd_error_set(err, -EACCES, "parallels: Image was not "
                               "closed correctly; cannot be opened "
                               "read/write");
            goto fail;
        }
    }
    ret = take_runtime_opts(s, opts, err);
    if (ret < 0) {
        goto fail;
    }
    s->no_write = bat_fault(s, bat_end, &oom);
    if (oom) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
        goto fail;
    }
    if (s->no_write && !node->read_only && !(flags & VD_NODE_CHECK)) {
        ret = vd_error_set(err, -EINVAL, "%s: %s; the image is corrupt and "
                           "cannot be opened for writing", s->filename,
                           s->no_write);
        goto fail;
    }
    if (!node->read_only) {
        if (fmt_rd64(h + P_EXT_OFF)) {
            vd_warn_report("Format Extension ignored in RW mode");
        }
        fmt_wr32(s->hdr + P_INUSE, PRL_INUSE);
        ret = write_header(s, err);
        if (ret < 0) {
            goto fail;
        }
        s->writable = true;
    }
    node->bl.request_alignment = PRL_SECTOR;
    return 0;

fail:
    free_state(s);
    return ret;
}

static int64_t parallels_getlength(vd_node *node)
{
    prl_state *s = node->opaque;
    return (int64_t)(s->total_sectors * PRL_SECTOR);
}

/* The extent at guest byte @off (at most @bytes): its host byte offset
 * in *@host (0: unallocated), and its length: a run of unallocated
 * clusters or of clusters stored one after another. Lock held. */
static uint64_t extent_at(prl_state *s, uint64_t off, uint64_t bytes,
                          uint64_t *host)
{
    uint64_t idx = off / s->cluster_size, in = off % s->cluster_size;
    uint64_t first = idx < s->bat_size ? bat2sect(s, (uint32_t)idx) : 0;
    uint64_t n = s->cluster_size - in, prev = first;

    while (n < bytes && idx + 1 < s->bat_size) {
        uint64_t next = bat2sect(s, (uint32_t)(idx + 1));
        if (first ? next != prev + s->tracks : next != 0) {
            break;
        }
        prev = next;
        idx++;
        n += s->cluster_size;
    }
    if (!first && idx + 1 >= s->bat_size) {
        n = bytes;      /* past the BAT: all unallocated */
    }
    *host = first ? first * PRL_SECTOR + in : 0;
    return n < bytes ? n : bytes;
}

static int parallels_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                            vd_iov *qiov, unsigned flags, vd_error *err)
{
    prl_state *s = node->opaque;
    uint64_t done = 0, host, n;
    int ret;

    (void)flags;
    for (; done < bytes; done += n) {
        pthread_mutex_lock(&s->lock);
        n = extent_at(s, off + done, bytes - done, &host);
        pthread_mutex_unlock(&s->lock);
        if (!host && node->backing) {
            vd_iov sub;
            ret = vd_iov_init_slice(&sub, qiov, done, n);
            if (ret == 0) {
                ret = vd_child_preadv(node->backing, off + done, n, &sub, 0,
                                      err);
                vd_iov_destroy(&sub);
            }
        } else if (!host) {
            vd_iov_memset(qiov, done, 0, n);
            continue;
        } else {
            ret = fmt_file_io(s->file, false, host, qiov, done, n,
                              s->filename, err);
        }
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

/* Gives cluster @idx a place at the end of the data, in zeros (or the
 * backing file's data), and records it in memory; the caller writes the
 * data, then the BAT entry. Lock held. */
static int allocate_cluster(prl_state *s, uint32_t idx, vd_error *err)
{
    uint64_t host = s->data_end;
    int64_t flen = vd_node_getlength(s->file->node);
    int ret;

    if (host / s->off_multiplier > UINT32_MAX) {
        return vd_error_set(err, -EFBIG, "%s: no room for another cluster "
                            "in the BAT's range", s->filename);
    }
    if (flen < 0) {
        return vd_error_set(err, (int)flen, "%s: cannot get the file length",
                            s->filename);
    }
    if ((host + s->tracks) * PRL_SECTOR > (uint64_t)flen) {
        /* As QEMU's prealloc-mode=falloc: the file grows by the cluster
         * and prealloc-size more, in zeros (close cuts what is left). */
        uint64_t grow = s->tracks + s->prealloc_sectors;
        ret = vd_node_pwrite_zeroes(s->file->node, host * PRL_SECTOR,
                                    grow * PRL_SECTOR, 0, err);
        s->zero_end = ret == 0 ? host + grow : 0;
    } else if (host + s->tracks > s->zero_end) {
        /* Bytes of the file past the data (a crash's leftovers). */
        ret = vd_node_pwrite_zeroes(s->file->node, host * PRL_SECTOR,
                                    s->cluster_size, 0, err);
    } else {
        ret = 0;    /* inside what this node wrote as zeros */
    }
    if (ret == 0 && s->node->backing) {
        /* The cluster starts as the backing file's (QEMU's copy). */
        uint8_t *buf = malloc(s->cluster_size);
        if (!buf) {
            return vd_error_set(err, -ENOMEM, "%s: out of memory",
                                s->filename);
        }
        ret = vd_child_pread(s->node->backing, (uint64_t)idx *
                             s->cluster_size, buf, s->cluster_size, err);
        if (ret == 0) {
            ret = vd_child_pwrite(s->file, host * PRL_SECTOR, buf,
                                  s->cluster_size, 0, err);
        }
        free(buf);
    }
    if (ret < 0) {
        return ret;
    }
    fmt_wr32(s->hdr + PRL_HEADER + (size_t)idx * 4,
         (uint32_t)(host / s->off_multiplier));
    s->data_end = host + s->tracks;
    return 0;
}

static int parallels_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                             vd_iov *qiov, unsigned flags, vd_error *err)
{
    prl_state *s = node->opaque;
    uint64_t done = 0, host = 0, n = 0;
    int ret;

    (void)flags;
    for (; done < bytes; done += n) {
        uint64_t pos = off + done;
        uint64_t idx = pos / s->cluster_size;
        bool fresh = false;

        pthread_mutex_lock(&s->lock);
        if (s->no_write) {
            ret = vd_error_set(err, -EIO, "%s: %s; writes refused",
                               s->filename, s->no_write);
        } else if (idx >= s->bat_size) {
            ret = vd_error_set(err, -EIO, "%s: write at 0x%" PRIx64
                               " beyond the BAT", s->filename, pos);
        } else {
            ret = 0;
            if (!bat2sect(s, (uint32_t)idx)) {
                ret = allocate_cluster(s, (uint32_t)idx, err);
                fresh = true;
            }
        }
        if (ret == 0) {
            /* One cluster at a time: each new one is recorded after its
             * data. */
            n = extent_at(s, pos, bytes - done, &host);
            if (n > s->cluster_size - pos % s->cluster_size) {
                n = s->cluster_size - pos % s->cluster_size;
            }
        }
        pthread_mutex_unlock(&s->lock);
        if (ret < 0) {
            return ret;
        }
        ret = fmt_file_io(s->file, true, host, qiov, done, n,
                          s->filename, err);
        if (ret == 0 && fresh) {
            uint8_t e[4];
            pthread_mutex_lock(&s->lock);
            memcpy(e, s->hdr + PRL_HEADER + idx * 4, 4);
            pthread_mutex_unlock(&s->lock);
            ret = vd_child_pwrite(s->file, PRL_HEADER + idx * 4, e, 4, 0,
                                  err);
        }
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

/* Unallocated extents answer nothing: the core makes them zeros (the
 * driver may hold a backing file, as QEMU's). */
static int parallels_block_status(vd_node *node, bool want_zero,
                                  uint64_t off, uint64_t bytes,
                                  uint64_t *pnum, uint64_t *map,
                                  vd_node **file, vd_error *err)
{
    prl_state *s = node->opaque;
    uint64_t host;

    (void)want_zero;
    (void)err;
    pthread_mutex_lock(&s->lock);
    *pnum = extent_at(s, off, bytes, &host);
    pthread_mutex_unlock(&s->lock);
    if (!host) {
        return 0;
    }
    *map = host;
    *file = s->file->node;
    return VD_BLOCK_DATA | VD_BLOCK_OFFSET_VALID;
}

static int parallels_flush(vd_node *node, vd_error *err)
{
    (void)node;
    (void)err;
    return 0;       /* every BAT entry is written with its cluster */
}

/* Cuts the file at @end; leaks count cluster by cluster. */
static int fix_leak(prl_state *s, vd_check_result *res, int64_t size,
                    unsigned fix, vd_error *err)
{
    uint64_t end = (uint64_t)res->image_end_offset;
    uint64_t count = ((uint64_t)size - end + s->cluster_size - 1) /
                     s->cluster_size;
    int ret;

    fprintf(stderr, "%s space leaked at the end of the image %" PRId64 "\n",
            (fix & VD_CHECK_FIX_LEAKS) ? "Repairing" : "ERROR",
            size - (int64_t)end);
    res->leaks += (int64_t)count;
    if (!(fix & VD_CHECK_FIX_LEAKS)) {
        return 0;
    }
    ret = vd_node_truncate(s->file->node, end, true, VD_PREALLOC_OFF, err);
    if (ret < 0) {
        res->check_errors++;
        return ret;
    }
    res->leaks_fixed += (int64_t)count;
    return 0;
}

/* QEMU 7.2's parallels check: the in-use mark, clusters past the end of
 * the file (repair: unmapped), fragmentation and the space leaked after
 * the last cluster (repair: cut). Messages on stderr as QEMU's. */
static int parallels_check(vd_node *node, vd_check_result *res,
                           unsigned fix, vd_error *err)
{
    prl_state *s = node->opaque;
    bool fix_err = fix & VD_CHECK_FIX_ERRORS, flush_bat = false;
    uint64_t high = 0, prev = 0;
    int64_t size = vd_node_getlength(s->file->node);
    int ret = 0;

    if (size < 0) {
        return vd_error_set(err, (int)size, "%s: cannot get the file length",
                            s->filename);
    }
    pthread_mutex_lock(&s->lock);
    if (s->unclean) {
        fprintf(stderr, "%s image was not closed correctly\n",
                fix_err ? "Repairing" : "ERROR");
        res->corruptions++;
        if (fix_err) {
            res->corruptions_fixed++;
            s->unclean = false;     /* close clears the mark */
        }
    }
    res->total_clusters = s->bat_size;
    res->compressed_clusters = 0;
    for (uint32_t i = 0; i < s->bat_size; i++) {
        uint64_t off = bat2sect(s, i) * PRL_SECTOR;
        if (!off) {
            prev = 0;
            continue;
        }
        if (off > (uint64_t)size) {
            fprintf(stderr, "%s cluster %" PRIu32 " is outside image\n",
                    fix_err ? "Repairing" : "ERROR", i);
            res->corruptions++;
            if (fix_err) {
                prev = 0;
                fmt_wr32(s->hdr + PRL_HEADER + (size_t)i * 4, 0);
                res->corruptions_fixed++;
                flush_bat = true;
                continue;
            }
        }
        res->allocated_clusters++;
        if (off > high) {
            high = off;
        }
        if (prev && prev + s->cluster_size != off) {
            res->fragmented_clusters++;
        }
        prev = off;
    }
    if (flush_bat) {
        ret = vd_child_pwrite(s->file, 0, s->hdr,
                              PRL_HEADER + (uint64_t)s->bat_size * 4, 0, err);
        if (ret == 0) {
            ret = vd_node_flush(s->file->node, err);
        }
        if (ret < 0) {
            res->check_errors++;
            goto out;
        }
    }
    res->image_end_offset = (int64_t)(high + s->cluster_size);
    if (size > res->image_end_offset) {
        ret = fix_leak(s, res, size, fix, err);
    }
out:
    pthread_mutex_unlock(&s->lock);
    return ret;
}

/* ---- create ---- */

static int parallels_create(const char *filename, vd_opts *opts,
                            vd_error *err)
{
    uint64_t size = 0, cl = PRL_DEFAULT_CLUSTER, bat_entries, bat_sectors;
    vd_node *file = NULL;
    uint8_t sec[PRL_SECTOR] = { 0 };
    int ret;

    ret = vd_opts_take_size(opts, "size", 0, &size, err);
    if (ret == 0) {
        ret = vd_opts_take_size(opts, "cluster_size", PRL_DEFAULT_CLUSTER,
                                &cl, err);
    }
    if (ret < 0) {
        return ret;
    }
    /* Silently rounded up to sectors, as QEMU. */
    size = (size + PRL_SECTOR - 1) & ~(uint64_t)(PRL_SECTOR - 1);
    cl = (cl + PRL_SECTOR - 1) & ~(uint64_t)(PRL_SECTOR - 1);
    /* The rest (preallocation, ...) is the protocol's, which QEMU creates
     * empty: the parallels options, size included, are gone by then. */
    ret = fmt_create_file(filename, opts, err);
    if (ret < 0) {
        return ret;
    }
    if (cl >= (uint64_t)INT64_MAX / PRL_IMAGE_FACTOR) {
        return vd_error_set(err, -EINVAL, "%s: Cluster size is too large",
                            filename);
    }
    if (size >= PRL_IMAGE_FACTOR * cl) {
        return vd_error_set(err, -E2BIG, "%s: Image size is too large for "
                            "this cluster size", filename);
    }
    bat_entries = (size + cl - 1) / cl;
    bat_sectors = (PRL_HEADER + bat_entries * 4 + cl - 1) / cl * cl /
                  PRL_SECTOR;

    memcpy(sec, PRL_MAGIC2, 16);
    fmt_wr32(sec + P_VERSION, PRL_VERSION);
    /* Geometry, unused by the format: QEMU's 16 heads, 32 sectors. */
    fmt_wr32(sec + P_HEADS, 16);
    fmt_wr32(sec + P_CYLINDERS, (uint32_t)(size / PRL_SECTOR / 16 / 32));
    fmt_wr32(sec + P_TRACKS, (uint32_t)(cl / PRL_SECTOR));
    fmt_wr32(sec + P_BAT_ENTRIES, (uint32_t)bat_entries);
    fmt_wr64(sec + P_NB_SECTORS, size / PRL_SECTOR);
    fmt_wr32(sec + P_DATA_OFF, (uint32_t)bat_sectors);

    ret = vd_open_protocol(&file, filename, VD_NODE_RDWR, err);
    if (ret < 0) {
        return ret;
    }
    ret = vd_node_pwrite_zeroes(file, PRL_SECTOR,
                                (bat_sectors - 1) * PRL_SECTOR, 0, err);
    if (ret == 0) {
        vd_iov v;
        vd_iov_init_buf(&v, sec, PRL_SECTOR);
        ret = vd_node_pwritev(file, 0, PRL_SECTOR, &v, 0, err);
    }
    if (ret == 0) {
        ret = vd_node_flush(file, err);
    }
    vd_node_unref(file);
    return ret;
}

/* qemu-img create -f parallels -o help: QEMU's parallels_create_opts (the
 * protocol's preallocation and the others follow from the file driver). */
static const vd_create_option parallels_create_opts[] = {
    { "size", "size", "Virtual disk size", NULL },
    { "cluster_size", "size", "Parallels image cluster size", "1048576" },
    { NULL, NULL, NULL, NULL },
};

const vd_driver vd_driver_parallels = {
    .name = "parallels",
    .instance_size = sizeof(prl_state),
    .is_format = true,
    /* As QEMU's driver: unallocated clusters are the backing file's (none
     * can be recorded in the image, but one can be given at open). */
    .supports_backing = true,
    .create_opts = parallels_create_opts,
    .probe = parallels_probe,
    .open = parallels_open,
    .close = parallels_close,
    .create = parallels_create,
    .preadv = parallels_preadv,
    .pwritev = parallels_pwritev,
    .flush = parallels_flush,
    .block_status = parallels_block_status,
    .getlength = parallels_getlength,
    .check = parallels_check,
};
