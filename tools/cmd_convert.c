/*
 * vdisk convert: qemu-img convert. The sources are treated as one
 * concatenated disk; the target is created with their total size (in
 * whole 512-byte sectors, as qemu) unless -n.
 *
 * The copy is cut into chunks the way qemu-img's convert_iteration_sectors
 * does: block status decides whether a chunk is data or zeros, data
 * chunks are at most 2 MiB, and with -c chunks are whole target clusters.
 * -m N threads take chunks in order from a shared cursor (under one
 * mutex, which also covers block status), read them in parallel and, unless
 * -W, write them strictly in chunk order so that an allocating target
 * such as qcow2 lays its clusters out as qemu-img would (a raw image on
 * a network protocol only starts them in order: issue_order_only()).
 * Zero runs of at least -S bytes inside data chunks are not written
 * (qemu's is_allocated_sectors_min) when the target reads as zeros
 * already; with -S 0 every chunk, zeros included, is written as data.
 *
 * -C copies data chunks with vd_copy_range() (copy_file_range below the
 * formats); the first chunk that cannot be offloaded ends offloading and
 * is copied by reading and writing, as every later one (qemu's
 * s->copy_range = false). --salvage turns unreadable sectors into zeros
 * and a failing block status into data, with qemu's warnings. -r limits
 * the writes to the target with qemu's leaky bucket (bps-write: a bucket
 * of a tenth of a second, then the average). qemu-img convert prints
 * nothing; --output=json (vdisk's own, docs/json.md) prints a summary
 * object at the end.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "vdisk/bitmap.h"
#include "commands.h"
#include "util.h"

#define SECTOR 512
/* qemu-img's data chunk: each coroutine reads up to IO_BUF_SIZE (2 MiB)
 * into a buffer of its own. Chunks are cut as qemu-img cuts them, so
 * that what shows of them is the same: the offsets in error messages,
 * the progress steps, one copy_file_range() per chunk with -C. */
#define BUF_SIZE (2 * 1024 * 1024)
/* What the workers' buffers hold in all: a chunk is read and written in
 * pieces of up to a worker's share, so the peak memory of a copy does not
 * grow with -m. qemu-img touches all of its 8 x 2 MiB wherever block
 * status answers in large extents (curl, qcow2...), and stays lower only
 * where it reads in small pieces (vmdk: a grain per block status answer,
 * 4 KiB on seSparse). Eight workers of 256 KiB copy a local image as fast
 * as eight of 2 MiB: a request of that size costs far more than its
 * overhead, and the smaller working set stays in the CPU's caches. */
#define BUF_BUDGET BUF_SIZE
/* ... but where a side of the copy is an NBD export each request is a
 * round trip and a dispatch on the server: eight workers of 1 MiB
 * (qemu-img's buffers are 16 MiB) took 10-15 % less CPU and time than of
 * 256 KiB writing 512 MiB into nbdkit and qemu-nbd exports, about 10 %
 * less CPU reading from qemu-nbd (issue 15). On RBD likewise (librbd
 * sends a request's objects at once): 1 GiB into an image 1.8x faster,
 * read 1.6x faster. Not into an iSCSI LUN: tgtd
 * takes a write's data in bursts of 256 KiB, each asked for in a round
 * trip, so 1 MiB writes were slower (1.3x the time). */
#define NBD_BUF_BUDGET (4 * BUF_SIZE)
#define CHUNK_ALIGN (64 * 1024)
#define MAX_THREADS 16
#define MAX_SPARSE (16 * 1024 * 1024)

/* BLK_BACKING: left unallocated in a target with a backing file (-B). */
enum { BLK_ZERO, BLK_DATA, BLK_BACKING };

typedef struct convert_state {
    vd_node **src;
    const char **src_names;
    uint64_t *src_size;         /* bytes */
    uint64_t *src_start;        /* offset in the concatenation */
    int nsrc;
    vd_node *target;
    uint64_t total;             /* bytes, a multiple of SECTOR */
    uint64_t min_sparse;        /* bytes, 0 = fully allocate */
    uint64_t cluster;           /* target cluster size for -c */
    uint64_t piece_max;         /* bytes of a data piece, at most */
    bool compressed, has_zero_init, in_order;
    bool big_pieces;            /* NBD_BUF_BUDGET: see there */
    /* In order, but a write hands the turn on as it starts rather than
     * when it ends, so several are in flight (see issue_order_only()). */
    bool issue_in_order;
    bool salvage, quiet;
    bool copy_range;            /* -C, until a chunk cannot offload */
    uint64_t rate_limit;        /* -r: bytes per second, 0 = none */
    pthread_mutex_t rate_lock;
    double rate_level;          /* bytes in the leaky bucket */
    struct timespec rate_last;  /* when it last leaked */
    /* -B: extents decided at this depth of the source chain or deeper
     * come from the target's backing file (0: no backing); zeros past
     * @backing_len read as zeros in the target anyway. */
    int backing_depth;
    uint64_t backing_len;

    pthread_mutex_t lock;
    /* A worker waiting to write chunk seq sleeps on turn[seq %
     * MAX_THREADS]: at most one outstanding chunk per worker makes the
     * slot unique, and waking only the next writer (not every worker on
     * each write) saves most of the context switches. */
    pthread_cond_t turn[MAX_THREADS];
    uint64_t cursor;            /* next offset to hand out */
    uint64_t next_seq, write_seq;
    uint64_t done;              /* bytes of data chunks written */
    uint64_t allocated;         /* bytes of data chunks in all */
    /* The last block status answer, [status_start, status_end) of source
     * status_src: a data extent longer than one buffer is split into many
     * chunks, and asking again for each would cost a round trip per chunk
     * on a remote source (QEMU's convert keeps sector_next_status so). */
    int status_src;
    uint64_t status_start, status_end;
    vd_extent status_ext;
    /* The chunk being handed out in pieces: [chunk_start, chunk_end) of
     * source chunk_src, of status chunk_status. */
    int chunk_src, chunk_status;
    uint64_t chunk_start, chunk_end;
    int ret;                    /* first error, 0 while fine */
    /* The read or write failure to report (see fail_once()). */
    const char *err_what;
    uint64_t err_at;
    int err_ret;
    cli_progress progress;
} convert_state;

/* One piece of a chunk: what a worker reads and writes at once. */
typedef struct chunk {
    int src;
    uint64_t offset, len;       /* in the concatenated disk */
    uint64_t chunk_start;       /* of its whole chunk, for messages */
    bool chunk_done;            /* the chunk's last piece */
    int status;
    uint64_t seq;
} chunk;

/* The largest piece of a data chunk each of @nthreads workers reads at
 * once: their share of BUF_BUDGET, in whole CHUNK_ALIGN units (which keeps
 * pieces on the target's cluster boundaries up to 64 KiB clusters). Whole
 * chunks where the pieces would show: -C offloads a chunk without the
 * buffers, --salvage re-reads a failed chunk sector by sector (so which
 * transient errors it meets follows the chunks), and -c compresses the
 * clusters of one request in parallel. */
static uint64_t piece_bytes(const convert_state *s, int nthreads)
{
    uint64_t n = (s->big_pieces ? NBD_BUF_BUDGET : BUF_BUDGET) /
                 (uint64_t)nthreads;

    if (s->copy_range || s->salvage || s->compressed || n > BUF_SIZE) {
        return BUF_SIZE;
    }
    n -= n % CHUNK_ALIGN;
    return n ? n : CHUNK_ALIGN;
}

/* Hands out the next piece of the current chunk, cut from @s->cursor to
 * at most @s->piece_max bytes of data. Lock held. */
static void next_piece(convert_state *s, chunk *c)
{
    uint64_t off = s->cursor, n = s->chunk_end - off;

    /* (With -S 0 zero chunks are written as data, from the buffer.) */
    if ((s->chunk_status == BLK_DATA ||
         (s->chunk_status == BLK_ZERO && !s->min_sparse)) &&
        n > s->piece_max) {
        n = s->piece_max;
    }
    c->src = s->chunk_src;
    c->offset = off;
    c->len = n;
    c->chunk_start = s->chunk_start;
    c->chunk_done = off + n == s->chunk_end;
    c->status = s->chunk_status;
    c->seq = s->next_seq++;
    s->cursor = off + n;
}

/* The chunk at @off (below s->total): its source @src, status and length
 * @len, as qemu-img's convert_iteration_sectors() decides them. With
 * @peek, a block status error is returned without a word (the chunk is
 * decided again, and the error reported, when the copy gets there).
 * Called with the lock held. Returns 0 or a negative errno. */
static int decide_chunk(convert_state *s, uint64_t off, bool peek, int *src,
                        int *status, uint64_t *len)
{
    vd_extent ext;
    vd_error err = VD_ERROR_INIT;
    uint64_t src_off, src_left, n;
    int i = 0, r, st;

    while (i < s->nsrc - 1 && off >= s->src_start[i + 1]) {
        i++;
    }
    src_off = off - s->src_start[i];
    /* The source's last sector may be partial: it is read as zeros. */
    src_left = (i + 1 < s->nsrc ? s->src_start[i + 1] : s->total) - off;

    if (src_off >= s->src_size[i]) {
        n = src_left;
        st = BLK_ZERO;
    } else {
        uint64_t want = s->src_size[i] - src_off;

        if (s->status_src == i && src_off >= s->status_start &&
            src_off < s->status_end) {
            ext = s->status_ext;
            ext.start = src_off;
            ext.length = s->status_end - src_off;
            if (ext.flags & VD_BLOCK_OFFSET_VALID) {
                ext.offset += src_off - s->status_start;
            }
            goto decided;
        }
        for (;;) {
            memset(&ext, 0, sizeof(ext));
            vd_error_clear(&err);
            r = vd_block_status(s->src[i], src_off, want, &ext, &err);
            if (r >= 0 && ext.length) {
                break;
            }
            if (r >= 0) {
                r = -EIO;
            }
            if (peek) {
                return r;
            }
            if (!s->salvage) {
                cli_error("error while reading block status at offset %"
                          PRIu64 ": %s", src_off, strerror(-r));
                return r;
            }
            if (want <= SECTOR) {
                /* qemu reads such a sector as data, then. */
                if (!s->quiet) {
                    cli_warn("error while reading block status at offset %"
                             PRIu64 ": %s", src_off, strerror(-r));
                }
                ext.length = want;
                ext.flags = VD_BLOCK_DATA;
                ext.depth = 0;
                break;
            }
            /* Retry on a quarter of the range (in sectors, rounded up). */
            want = ((want + SECTOR - 1) / SECTOR + 3) / 4 * SECTOR;
        }
        s->status_src = i;
        s->status_start = src_off;
        s->status_end = src_off + ext.length;
        s->status_ext = ext;
decided:
        n = ext.length;
        if (src_off + n >= s->src_size[i]) {
            n = src_left;   /* include the padding up to the sector */
        } else if (n >= SECTOR) {
            n -= n % SECTOR;
        } else {
            n = SECTOR;     /* a partial sector is copied as data */
            ext.flags = VD_BLOCK_DATA;
        }
        if (s->backing_depth && ext.depth >= s->backing_depth) {
            st = BLK_BACKING;
        } else if (ext.flags & VD_BLOCK_ZERO) {
            st = s->backing_depth && off >= s->backing_len ? BLK_BACKING
                                                            : BLK_ZERO;
        } else if (ext.flags & VD_BLOCK_DATA) {
            st = BLK_DATA;
        } else {
            st = s->backing_depth ? BLK_BACKING : BLK_DATA;
        }
    }
    /* With -S 0 zero chunks are written as data, a buffer at a time. */
    if ((st == BLK_DATA || (st == BLK_ZERO && !s->min_sparse))
        && n > BUF_SIZE) {
        n = BUF_SIZE;
    }
    if (s->compressed) {
        if (n < s->cluster) {
            n = s->cluster < s->total - off ? s->cluster : s->total - off;
            st = BLK_DATA;
        } else {
            n -= n % s->cluster;
        }
    }
    *src = i;
    *status = st;
    *len = n;
    return 0;
}

/* Decides the next piece, and the next chunk when the last one is all
 * handed out. Called with the lock held. Returns 0, 1 at the end, or a
 * negative errno (reported). */
static int next_chunk(convert_state *s, chunk *c)
{
    uint64_t off = s->cursor, n;
    int i, status, r;

    if (off >= s->total || s->ret) {
        return 1;
    }
    if (off >= s->chunk_start && off < s->chunk_end) {
        next_piece(s, c);
        return 0;
    }
    r = decide_chunk(s, off, false, &i, &status, &n);
    if (r < 0) {
        return r;
    }
    /* -c: data chunks that follow one another go in one chunk, up to a
     * buffer. A data extent that does not start or end on a cluster
     * boundary makes qemu-img's chunks of one cluster at each end (the
     * cluster it shares with a hole); written alone, such a cluster is
     * compressed on one CPU while the others wait. The clusters, their
     * order and the all-zero ones skipped are the same. */
    while (s->compressed && status == BLK_DATA && !s->salvage &&
           off + n < s->total && n < BUF_SIZE) {
        uint64_t more;
        int more_src, more_status;

        if (decide_chunk(s, off + n, true, &more_src, &more_status,
                         &more) < 0 ||
            more_src != i || more_status != BLK_DATA) {
            break;
        }
        if (more > BUF_SIZE - n) {
            more = BUF_SIZE - n;
            more -= more % s->cluster;
            if (!more) {
                break;
            }
        }
        n += more;
    }
    c->status = status;
    s->chunk_src = i;
    s->chunk_status = status;
    s->chunk_start = off;
    s->chunk_end = off + n;
    next_piece(s, c);
    return 0;
}

/* --salvage: [@off, +@len) of source @i failed to read; read it again a
 * sector at a time, unreadable sectors as zeros with qemu's warning. */
static int salvage_read(convert_state *s, int i, uint8_t *buf, uint64_t len,
                        uint64_t off)
{
    for (uint64_t pos = 0; pos < len; pos += SECTOR) {
        uint64_t n = len - pos < SECTOR ? len - pos : SECTOR;
        int r = vd_pread(s->src[i], buf + pos, n, off + pos, 0, NULL);

        if (r < 0) {
            if (!s->quiet) {
                cli_warn("error while reading offset %" PRIu64 ": %s",
                         off + pos, strerror(-r));
            }
            memset(buf + pos, 0, n);
        }
    }
    return 0;
}

/* Reads [@c->offset, +@c->len) of the concatenation, which may span the
 * zero padding of a source's last sector or later sources. */
static int read_chunk(convert_state *s, const chunk *c, uint8_t *buf)
{
    uint64_t pos = 0;

    while (pos < c->len) {
        uint64_t off = c->offset + pos;
        int i = 0;
        uint64_t src_off, in_src, n;

        while (i < s->nsrc - 1 && off >= s->src_start[i + 1]) {
            i++;
        }
        src_off = off - s->src_start[i];
        in_src = (i + 1 < s->nsrc ? s->src_start[i + 1] : s->total) - off;
        n = c->len - pos < in_src ? c->len - pos : in_src;
        if (src_off >= s->src_size[i]) {
            memset(buf + pos, 0, n);
        } else {
            uint64_t rd = s->src_size[i] - src_off < n ? s->src_size[i] - src_off
                                                       : n;
            int r = vd_pread(s->src[i], buf + pos, rd, src_off, 0, NULL);

            if (r < 0 && s->salvage) {
                r = salvage_read(s, i, buf + pos, rd, src_off);
            }
            if (r < 0) {
                return r;
            }
            memset(buf + pos + rd, 0, n - rd);
        }
        pos += n;
    }
    return 0;
}

/* Every sector of a data chunk is tested: a data sector almost always
 * has a non-zero byte among its first eight, which settles it without a
 * call (memcmp was 3-5% of a raw to vpc copy). */
static bool sector_is_zero(const uint8_t *buf)
{
    static const uint8_t zero[SECTOR];
    uint64_t head;

    memcpy(&head, buf, sizeof(head));
    return !head && memcmp(buf, zero, SECTOR) == 0;
}

/* Zero when the first byte is and every byte equals the next one: one
 * memcmp over the buffer instead of a loop a byte at a time. */
static bool buffer_is_zero(const uint8_t *buf, uint64_t len)
{
    return !len || (!buf[0] && memcmp(buf, buf + 1, len - 1) == 0);
}

/* qemu's is_allocated_sectors(): length (in sectors, *pnum) of the first
 * run of data or zero sectors, adjusted so that runs end on @align. */
static bool run_is_data(const uint8_t *buf, int64_t n, int64_t *pnum,
                        int64_t sector, int64_t align)
{
    bool is_zero;
    int64_t i, tail;

    if (n <= 0) {
        *pnum = 0;
        return false;
    }
    is_zero = sector_is_zero(buf);
    for (i = 1; i < n; i++) {
        if (is_zero != sector_is_zero(buf + i * SECTOR)) {
            break;
        }
    }
    if (i == n) {
        *pnum = i;
        return !is_zero;
    }
    tail = (sector + i) & (align - 1);
    if (tail) {
        if (is_zero && i <= tail) {
            /* The data that follows rewrites this tail anyway. */
            is_zero = false;
        }
        if (!is_zero) {
            i += align - tail;
            i = i < n ? i : n;
        } else {
            i -= tail;
        }
    }
    *pnum = i;
    return !is_zero;
}

/* qemu's is_allocated_sectors_min(): zero runs shorter than @min sectors
 * count as data. */
static bool run_is_data_min(const uint8_t *buf, int64_t n, int64_t *pnum,
                            int64_t min, int64_t sector, int64_t align)
{
    int64_t used, checked;

    if (n < min) {
        min = n;
    }
    if (!run_is_data(buf, n, pnum, sector, align)) {
        return false;
    }
    used = *pnum;
    buf += SECTOR * *pnum;
    n -= *pnum;
    sector += *pnum;
    checked = used;
    while (n > 0) {
        bool data = run_is_data(buf, n, pnum, sector, align);

        buf += SECTOR * *pnum;
        n -= *pnum;
        sector += *pnum;
        checked += *pnum;
        if (data) {
            used = checked;
        } else if (*pnum >= min) {
            break;
        }
    }
    *pnum = used;
    return true;
}

/* -r: qemu's leaky bucket for bps-write without a burst setting. A
 * write may start once the bucket holds no more than a tenth of a
 * second's worth; it then adds its bytes. The bucket leaks at the rate. */
static void throttle(convert_state *s, uint64_t bytes)
{
    struct timespec now;
    double wait;

    if (!s->rate_limit) {
        return;
    }
    pthread_mutex_lock(&s->rate_lock);
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        s->rate_level -= ((double)(now.tv_sec - s->rate_last.tv_sec) +
                          (double)(now.tv_nsec - s->rate_last.tv_nsec) / 1e9) *
                         (double)s->rate_limit;
        if (s->rate_level < 0) {
            s->rate_level = 0;
        }
        s->rate_last = now;
        wait = (s->rate_level - (double)s->rate_limit / 10) /
               (double)s->rate_limit;
        if (wait <= 0) {
            break;
        }
        {
            struct timespec ts = { (time_t)wait,
                                   (long)((wait - (double)(time_t)wait) * 1e9) };
            nanosleep(&ts, NULL);
        }
    }
    s->rate_level += (double)bytes;
    pthread_mutex_unlock(&s->rate_lock);
}

static int write_zero_range(convert_state *s, uint64_t off, uint64_t len)
{
    if (s->has_zero_init) {
        return 0;
    }
    throttle(s, len);
    return vd_write_zeroes(s->target, len, off, VD_REQ_MAY_UNMAP, NULL);
}

static int write_data(convert_state *s, const uint8_t *buf, uint64_t len,
                      uint64_t off, unsigned flags)
{
    throttle(s, len);
    return vd_pwrite(s->target, buf, len, off, flags, NULL);
}

/* [@pos, +@len) of chunk @c, whole clusters, in one request: the driver
 * compresses them in parallel (VD_REQ_COMPRESSED takes several). */
static int write_compressed_part(convert_state *s, const chunk *c,
                                 const uint8_t *buf, uint64_t pos,
                                 uint64_t len)
{
    return write_data(s, buf + pos, len, c->offset + pos, VD_REQ_COMPRESSED);
}

static int write_chunk(convert_state *s, const chunk *c, const uint8_t *buf)
{
    int64_t sector = (int64_t)(c->offset / SECTOR);
    int64_t left = (int64_t)(c->len / SECTOR);
    int64_t min = (int64_t)(s->min_sparse / SECTOR);
    int64_t align = min > 1 ? min : 1;
    int r;

    while (align & (align - 1)) {
        align &= align - 1;     /* pow2floor, as qemu's s->alignment */
    }
    if (c->status == BLK_BACKING) {
        return 0;
    }
    if (c->status == BLK_ZERO) {
        return write_zero_range(s, c->offset, c->len);
    }
    /* (With -S 0 a zero chunk arrives here as data, in a zeroed buffer.) */
    if (s->compressed) {
        /* qemu-img copies one cluster at a time when compressing, so an
         * all-zero cluster inside a data chunk is skipped, not stored.
         * The clusters between zero ones go down in one request, whose
         * clusters the driver compresses in parallel. */
        uint64_t run = 0, pos = 0;   /* run: the pending data clusters */
        while (pos < c->len) {
            uint64_t len = c->len - pos < s->cluster ? c->len - pos
                                                     : s->cluster;
            if (s->min_sparse && buffer_is_zero(buf + pos, len)) {
                if (run < pos) {
                    r = write_compressed_part(s, c, buf, run, pos - run);
                    if (r < 0)
                        return r;
                }
                r = write_zero_range(s, c->offset + pos, len);
                if (r < 0)
                    return r;
                run = pos + len;
            }
            pos += len;
        }
        if (run < c->len) {
            r = write_compressed_part(s, c, buf, run, c->len - run);
        }
        return r;
    }
    while (left > 0) {
        int64_t n = left;
        uint64_t off = (uint64_t)sector * SECTOR, len;

        if (!s->min_sparse ||
            run_is_data_min(buf, left, &n, min, sector, align)) {
            len = (uint64_t)n * SECTOR;
            r = write_data(s, buf, len, off, 0);
        } else {
            len = (uint64_t)n * SECTOR;
            r = write_zero_range(s, off, len);
        }
        if (r < 0) {
            return r;
        }
        sector += n;
        left -= n;
        buf += (uint64_t)n * SECTOR;
    }
    return 0;
}

/* -C: copies data chunk @c source by source with copy offloading.
 * Returns 0, or < 0 when some part could not be offloaded. */
static int copy_chunk(convert_state *s, const chunk *c)
{
    uint64_t pos = 0;

    while (pos < c->len) {
        uint64_t off = c->offset + pos, src_off, in_src, n;
        int i = 0, r;

        while (i < s->nsrc - 1 && off >= s->src_start[i + 1]) {
            i++;
        }
        src_off = off - s->src_start[i];
        in_src = (i + 1 < s->nsrc ? s->src_start[i + 1] : s->total) - off;
        n = c->len - pos < in_src ? c->len - pos : in_src;
        if (src_off + n > s->src_size[i]) {
            return -ENOTSUP;    /* the padding past the source's end */
        }
        r = vd_copy_range(s->src[i], src_off, s->target, off, n, NULL);
        if (r < 0) {
            return r;
        }
        pos += n;
    }
    return 0;
}

/* Like qemu-img, progress counts only the chunks that carry data (and
 * zero chunks with -S 0, which are written too). */
static bool counts_for_progress(const convert_state *s, const chunk *c)
{
    return c->status == BLK_DATA ||
           (c->status == BLK_ZERO && !s->min_sparse);
}

/* A dry run of the chunking: the total for the progress meter. */
static int count_allocated(convert_state *s)
{
    chunk c;
    int r;

    while ((r = next_chunk(s, &c)) == 0) {
        if (counts_for_progress(s, &c)) {
            s->allocated += c.len;
        }
    }
    s->cursor = 0;
    s->chunk_start = s->chunk_end = 0;
    s->next_seq = 0;
    return r < 0 ? r : 0;
}

static void fail(convert_state *s, int ret)
{
    if (!s->ret) {
        s->ret = ret;
    }
    for (int i = 0; i < MAX_THREADS; i++) {
        pthread_cond_broadcast(&s->turn[i]);
    }
}

/* With s->lock held.  A chunk is read in pieces by several workers and
 * writes may be in flight together, so failures come back more than
 * once and in any order. qemu-img goes chunk by chunk and reports one:
 * the failure at the lowest offset. That is the one kept here, among
 * the failures of the pieces that were under way when the conversion
 * failed; run_copy() prints it once the workers are done. */
static void fail_once(convert_state *s, int ret, const char *what,
                      uint64_t chunk_start)
{
    if (!s->ret || (s->err_what && chunk_start < s->err_at)) {
        s->err_what = what;
        s->err_at = chunk_start;
        s->err_ret = ret;
    }
    fail(s, ret);
}

static void *worker(void *opaque)
{
    convert_state *s = opaque;
    uint8_t *buf = cli_io_buffer(s->piece_max > s->cluster ? s->piece_max
                                                           : s->cluster);

    pthread_mutex_lock(&s->lock);
    if (!buf) {
        fail(s, -ENOMEM);
    }
    for (;;) {
        chunk c;
        bool copy;
        pthread_cond_t *next;
        int r = next_chunk(s, &c);

        if (r) {
            if (r < 0) {
                fail(s, r);
            }
            break;
        }
        copy = s->copy_range && c.status == BLK_DATA;
        pthread_mutex_unlock(&s->lock);

        r = 0;
        if (c.status == BLK_DATA && !copy) {
            r = read_chunk(s, &c, buf);
        } else if (c.status == BLK_ZERO && !s->min_sparse) {
            /* -S 0: written as data. */
            memset(buf, 0, c.len);
            c.status = BLK_DATA;
        }

        pthread_mutex_lock(&s->lock);
        if (r < 0) {
            fail_once(s, r, "reading", c.chunk_start);
            break;
        }
        while (s->in_order && s->write_seq != c.seq && !s->ret) {
            pthread_cond_wait(&s->turn[c.seq % MAX_THREADS], &s->lock);
        }
        if (s->ret) {
            break;
        }
        next = NULL;
        if (s->in_order && s->issue_in_order) {
            s->write_seq++;
            next = &s->turn[s->write_seq % MAX_THREADS];
        }
        pthread_mutex_unlock(&s->lock);
        /* Woken after the unlock, the next writer does not block on the
         * lock at once (a context switch more per piece). */
        if (next) {
            pthread_cond_signal(next);
        }

        if (copy && copy_chunk(s, &c) < 0) {
            /* As qemu: offloading ends here, this chunk and all later
             * ones are read and written. */
            pthread_mutex_lock(&s->lock);
            s->copy_range = false;
            pthread_mutex_unlock(&s->lock);
            copy = false;
            r = read_chunk(s, &c, buf);
            if (r < 0) {
                pthread_mutex_lock(&s->lock);
                fail_once(s, r, "reading", c.chunk_start);
                break;
            }
        }
        r = copy ? 0 : write_chunk(s, &c, buf);

        pthread_mutex_lock(&s->lock);
        if (r < 0) {
            fail_once(s, r, "writing", c.chunk_start);
            break;
        }
        if (!s->in_order || !s->issue_in_order) {
            s->write_seq++;
        }
        if (counts_for_progress(s, &c) && s->allocated) {
            s->done += c.len;
            /* Once per chunk, as qemu-img steps. */
            if (c.chunk_done) {
                cli_progress_print_bytes(&s->progress, s->done,
                                         s->allocated);
            }
        }
        if (s->in_order && !s->issue_in_order) {
            next = &s->turn[s->write_seq % MAX_THREADS];
            pthread_mutex_unlock(&s->lock);
            pthread_cond_signal(next);
            pthread_mutex_lock(&s->lock);
        }
    }
    pthread_mutex_unlock(&s->lock);
    free(buf);
    return NULL;
}

/* Whether the target's layout cannot follow the order in which its
 * writes complete, so that convert's in-order rule only needs them to
 * start in order: a raw image (its format allocates nothing) straight on
 * a network protocol (VD_DRIVER_NETWORK). Its storage is the server's,
 * which sees the requests in the order they were sent but may complete
 * them in any order (qemu-nbd and tgtd run them in parallel anyway), as
 * QEMU's manual says of -W for "raw block devices". Waiting for each
 * write to come back before the next starts kept one request at a time
 * on the wire: one network round trip per piece (issue 15). */
static bool issue_order_only(vd_node *target)
{
    if (vd_driver_features(vd_node_format(target)) & VD_DRIVER_FLAT) {
        target = vd_node_child(target, "file");
        if (!target) {
            return false;
        }
    }
    return (vd_driver_features(vd_node_format(target)) &
            VD_DRIVER_NETWORK) != 0;
}

/* The VD_DRIVER_* bits of the protocol at the bottom of @node's file
 * children. */
static unsigned storage_features(vd_node *node)
{
    vd_node *file;

    while ((file = vd_node_child(node, "file")) != NULL) {
        node = file;
    }
    return vd_driver_features(vd_node_format(node));
}

/* Whether the pieces are to be 1 MiB (NBD_BUF_BUDGET): where a side is
 * stored on a server that takes large requests whole and no side on one
 * that asks for data in smaller bursts (a 1 MiB write into a tgtd LUN
 * took 1.3x the time of 256 KiB ones). */
static bool wants_big_pieces(const convert_state *s)
{
    bool big = false;

    for (int i = -1; i < s->nsrc; i++) {
        unsigned f = storage_features(i < 0 ? s->target : s->src[i]);
        if ((f & VD_DRIVER_NETWORK) && !(f & VD_DRIVER_BIG_REQUESTS)) {
            return false;
        }
        big = big || (f & VD_DRIVER_BIG_REQUESTS);
    }
    return big;
}

/* Whether every request to @node ends in the host's page cache: a
 * local protocol node (no VD_DRIVER_NETWORK) without O_DIRECT, or a
 * node over such nodes (its file, data file and backing chain). Network
 * protocols and O_DIRECT are not: there a request waits for the device
 * or the server, and only more requests in flight hide that wait. */
static bool node_is_page_cached(const vd_node *node)
{
    static const char *const roles[] = { "backing", "data-file" };
    const vd_node *file = vd_node_child(node, "file");

    if (!file) {
        return (vd_driver_features(vd_node_format(node)) &
                (VD_DRIVER_PROTOCOL | VD_DRIVER_NETWORK)) ==
                   VD_DRIVER_PROTOCOL &&
               !(vd_node_cache_flags(node) & VD_CACHE_DIRECT);
    }
    if (!node_is_page_cached(file)) {
        return false;
    }
    for (size_t i = 0; i < sizeof(roles) / sizeof(roles[0]); i++) {
        const vd_node *c = vd_node_child(node, roles[i]);
        if (c && !node_is_page_cached(c)) {
            return false;
        }
    }
    return true;
}

/* Whether @node stores all its data deflated (a streamOptimized vmdk):
 * reading it is inflating, the CPU's work whatever the storage. */
static bool node_is_deflated(vd_node *node)
{
    vd_image_info *info = NULL;
    bool deflated = vd_get_info(node, &info, NULL) == 0 &&
                    info->needs_compressed_writes;

    vd_image_info_free(&info);
    return deflated;
}

/* The default -m: qemu-img's 8 requests in flight. When every source and
 * the target go through the page cache, a copy is the CPU's work (the
 * kernel copying pages), and workers beyond the CPU count only switch
 * contexts and share the caches: one worker per CPU, at least two so
 * that one reads while another writes. On the 2-CPU machine that costs
 * a 2 GiB raw to vpc copy 27% less CPU time than eight workers did.
 * Not so for a deflated source: there each piece is milliseconds of
 * inflating, next to which a context switch costs nothing, and on a
 * shared host, whose scheduler shares the CPUs out per thread, 8
 * workers finished a 2 GiB streamOptimized image 1.25x sooner than 2
 * (load average 9 on 2 CPUs, the same CPU time). */
static int default_threads(const convert_state *s)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);

    for (int i = 0; i < s->nsrc; i++) {
        if (!node_is_page_cached(s->src[i]) || node_is_deflated(s->src[i])) {
            return 8;
        }
    }
    if (!node_is_page_cached(s->target)) {
        return 8;
    }
    return cpus < 2 ? 2 : cpus > 8 ? 8 : (int)cpus;
}

static int run_copy(convert_state *s, int nthreads)
{
    pthread_t tids[MAX_THREADS];
    int started = 0;

    pthread_mutex_init(&s->lock, NULL);
    for (int i = 0; i < MAX_THREADS; i++) {
        pthread_cond_init(&s->turn[i], NULL);
    }
    for (int i = 0; i < nthreads; i++) {
        if (pthread_create(&tids[i], NULL, worker, s) != 0) {
            break;
        }
        started++;
    }
    if (started == 0) {
        worker(s);
    }
    for (int i = 0; i < started; i++) {
        pthread_join(tids[i], NULL);
    }
    if (s->err_what) {
        cli_error("error while %s at byte %" PRIu64 ": %s", s->err_what,
                  s->err_at, strerror(-s->err_ret));
        s->err_what = NULL;
    }
    for (int i = 0; i < MAX_THREADS; i++) {
        pthread_cond_destroy(&s->turn[i]);
    }
    pthread_mutex_destroy(&s->lock);
    return s->ret;
}

/* Whether @fmt can store compressed clusters (qemu refuses -c before
 * creating anything when it cannot). */
static bool format_compresses(const char *fmt)
{
    return (vd_driver_features(fmt) & VD_DRIVER_COMPRESSED) != 0;
}

/* -l snapshot.id=ID,snapshot.name=NAME: only those keys, as qemu-img's
 * internal_snapshot_opts; an unknown key is reported by name. */
static bool snapshot_opts_valid(const vd_opts *o)
{
    for (size_t i = 0; i < vd_opts_count(o); i++) {
        const char *key, *val;
        vd_opts_nth(o, i, &key, &val);
        if (strcmp(key, "snapshot.id") != 0 &&
            strcmp(key, "snapshot.name") != 0) {
            cli_error("Invalid parameter '%s'", key);
            return false;
        }
    }
    return true;
}

static bool create_option_known(const vd_create_option *list,
                                const char *name)
{
    for (; list && list->name; list++) {
        if (strcmp(list->name, name) == 0) {
            return true;
        }
    }
    return false;
}

/*
 * --bitmaps, before anything is created: the source can hold persistent
 * bitmaps and none of them is inconsistent (unless --skip-broken-bitmaps
 * leaves those out), as qemu-img's convert_check_bitmaps().
 */
static int check_bitmaps(vd_node *src, bool skip_broken)
{
    vd_bitmap_info *list = NULL;
    size_t n = 0;
    vd_error err = VD_ERROR_INIT;
    int r = 0;

    if (!vd_bitmap_supports_persistent(src)) {
        cli_error("Source lacks bitmap support");
        return -1;
    }
    if (vd_bitmap_list(src, &list, &n, &err) < 0) {
        cli_error("%s", err.message);
        return -1;
    }
    for (size_t i = 0; i < n && r == 0; i++) {
        if (list[i].persistent && list[i].inconsistent && !skip_broken) {
            cli_error("Cannot copy inconsistent bitmap '%s'", list[i].name);
            fprintf(stderr, "Try --skip-broken-bitmaps, or use 'qemu-img "
                    "bitmap --remove' to delete it\n");
            r = -1;
        }
    }
    vd_bitmap_list_free(list, n);
    return r;
}

/* --bitmaps, after the copy: each persistent bitmap of @src re-created on
 * @dst with its granularity and recording state, and its bits merged in
 * (qemu-img's convert_copy_bitmaps(), in the same order and words). */
static int copy_bitmaps(vd_node *src, vd_node *dst, bool skip_broken)
{
    vd_bitmap_info *list = NULL;
    size_t n = 0;
    vd_error err = VD_ERROR_INIT;
    int r = 0;

    if (vd_bitmap_list(src, &list, &n, &err) < 0) {
        cli_error("%s", err.message);
        return -1;
    }
    for (size_t i = 0; i < n && r == 0; i++) {
        const vd_bitmap_info *b = &list[i];
        vd_bitmap_ref ref = { src, b->name };

        if (!b->persistent) {
            continue;
        }
        if (skip_broken && b->inconsistent) {
            cli_warn("Skipping inconsistent bitmap '%s'", b->name);
            continue;
        }
        vd_error_clear(&err);
        if (vd_bitmap_add(dst, b->name, b->granularity,
                          VD_BITMAP_PERSISTENT |
                          (b->recording ? 0 : VD_BITMAP_DISABLED),
                          &err) < 0) {
            cli_error("Failed to create bitmap %s: %s", b->name, err.message);
            r = -1;
        } else if (vd_bitmap_merge(dst, b->name, &ref, 1, &err) < 0) {
            cli_error("Failed to populate bitmap %s: %s", b->name,
                      err.message);
            vd_bitmap_remove(dst, b->name, NULL);
            r = -1;
        }
    }
    vd_bitmap_list_free(list, n);
    return r;
}

/* Whether two nodes read the same file (same device and inode). */
static bool same_image(vd_node *a, vd_node *b)
{
    struct stat sa, sb;
    const char *fa = vd_node_filename(a), *fb = vd_node_filename(b);

    return fa && fb && stat(fa, &sa) == 0 && stat(fb, &sb) == 0 &&
           sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* --output=json: what was copied where (docs/json.md). */
static void print_summary(const convert_state *s, const char *out_name,
                          const char *out_fmt, bool skip_create, bool bitmaps)
{
    json_object *o = json_object_new_object();
    json_object *srcs = json_object_new_array();

    for (int i = 0; i < s->nsrc; i++) {
        json_object_array_add(srcs, json_object_new_string(s->src_names[i]));
    }
    json_object_object_add(o, "sources", srcs);
    json_object_object_add(o, "target", json_object_new_string(out_name));
    json_object_object_add(o, "target-format",
                           json_object_new_string(out_fmt));
    json_object_object_add(o, "created", json_object_new_boolean(
                               !skip_create));
    json_object_object_add(o, "virtual-size",
                           json_object_new_int64((int64_t)s->total));
    json_object_object_add(o, "data-bytes",
                           json_object_new_int64((int64_t)s->allocated));
    json_object_object_add(o, "compressed",
                           json_object_new_boolean(s->compressed));
    json_object_object_add(o, "bitmaps", json_object_new_boolean(bitmaps));
    cli_print_json(o);
}

int cmd_convert(int argc, char **argv)
{
    cli_common co = { 0 };
    const char *out_fmt = "raw", *cache = "unsafe";
    const char *src_cache = NULL, *out_name = NULL;
    const char *out_base = NULL, *out_base_fmt = NULL;
    const char *out_base_param = NULL;   /* -B or -o backing_file */
    bool explicit_sparse = false;
    char *options = NULL;
    bool skip_create = false;
    bool target_is_zero = false, out_of_order = false;
    bool target_image_opts = false, out_fmt_given = false;
    bool bitmaps = false, skip_broken = false;
    const char *sn_name = NULL;   /* -s NAME or -l NAME: id, then name */
    vd_opts *sn_opts = NULL;      /* -l snapshot.id=...,snapshot.name=... */
    uint64_t min_sparse = 8 * SECTOR, nthreads = 8;
    bool nthreads_given = false;
    convert_state s;
    vd_opts *copts = NULL, *topts = NULL, *sopts = NULL;
    vd_error err = VD_ERROR_INIT;
    int ch, ret = 1;

    memset(&s, 0, sizeof(s));
    while ((ch = cli_getopt_common("convert", argc, argv, &co)) != -1) {
        switch (ch) {
        case 'O':
            out_fmt = optarg;
            out_fmt_given = true;
            break;
        case 'o': {
            char *joined;

            if (options) {
                if (asprintf(&joined, "%s,%s", options, optarg) < 0) {
                    goto out;
                }
                free(options);
                options = joined;
            } else {
                options = strdup(optarg);
            }
            break;
        }
        case 'S': {
            if (cli_cvtnum("buffer size for sparse output", optarg,
                           &min_sparse) < 0) {
                goto out;
            }
            if (min_sparse % SECTOR || min_sparse > MAX_SPARSE) {
                cli_error("Invalid buffer size for sparse output specified. "
                          "Valid sizes are multiples of %d up to %d. Select 0 "
                          "to disable sparse detection (fully allocates "
                          "output).", SECTOR, MAX_SPARSE);
                goto out;
            }
            explicit_sparse = true;
            break;
        }
        case 'C':
            s.copy_range = true;
            break;
        case 'r':
            if (cli_cvtnum("rate limit", optarg, &s.rate_limit) < 0) {
                goto out;
            }
            break;
        case OPT_SALVAGE:
            s.salvage = true;
            break;
        case OPT_BITMAPS:
            bitmaps = true;
            break;
        case OPT_SKIP_BROKEN_BITMAPS:
            skip_broken = true;
            break;
        case 't':
            cache = optarg;
            break;
        case 'T':
            src_cache = optarg;
            break;
        case 'n':
            skip_create = true;
            break;
        case 'm': {
            char *end;

            nthreads = strtoull(optarg, &end, 10);
            nthreads_given = true;
            if (*end || !*optarg || nthreads < 1 || nthreads > MAX_THREADS) {
                cli_error("Invalid number of coroutines. Allowed number of "
                          "coroutines is between 1 and %d", MAX_THREADS);
                goto out;
            }
            break;
        }
        case 'W':
            out_of_order = true;
            break;
        case 'c':
            s.compressed = true;
            break;
        case 'B':
            out_base = optarg;
            break;
        case 'F':
            out_base_fmt = optarg;
            break;
        case 's':
            sn_name = optarg;
            break;
        case 'l':
            if (strncmp(optarg, "snapshot.", 9) == 0) {
                vd_opts_free(&sn_opts);
                sn_opts = vd_opts_new();
                if (!sn_opts || vd_opts_parse(sn_opts, optarg, NULL, &err) < 0
                    || !snapshot_opts_valid(sn_opts)) {
                    cli_error("Failed in parsing snapshot param '%s'", optarg);
                    goto out;
                }
            } else {
                sn_name = optarg;
            }
            break;
        case OPT_TARGET_IS_ZERO:
            target_is_zero = true;
            break;
        case OPT_TARGET_IMAGE_OPTS:
            target_image_opts = true;
            break;
        default:
            goto out;
        }
    }
    if (co.quiet) {
        co.progress = false;
    }
    s.quiet = co.quiet;

    /* Checked in qemu-img 7.2's order, so that the first complaint is
     * the same one. */
    if (s.compressed && s.copy_range) {
        cli_error("Cannot enable copy offloading when -c is used");
        goto out;
    }
    if (explicit_sparse && s.copy_range) {
        cli_error("Cannot enable copy offloading when -S is used");
        goto out;
    }
    if (s.copy_range && s.salvage) {
        cli_error("Cannot use copy offloading in salvaging mode");
        goto out;
    }
    if (target_image_opts && !skip_create) {
        cli_error("--target-image-opts requires use of -n flag");
        goto out;
    }
    if (skip_create && options) {
        cli_error("-o has no effect when skipping image creation");
        goto out;
    }
    if (target_is_zero && !skip_create) {
        cli_error("--target-is-zero requires use of -n flag");
        goto out;
    }
    if (skip_broken && !bitmaps) {
        cli_error("Use of --skip-broken-bitmaps requires --bitmaps");
        goto out;
    }
    s.nsrc = argc - optind - 1;
    if (options && cli_has_help_option(options)) {
        /* As qemu-img: the target's protocol options are listed too once
         * a source and a target are named. */
        ret = cli_print_create_help(s.nsrc >= 1 ? argv[argc - 1] : NULL,
                                    out_fmt);
        goto out;
    }
    if (s.nsrc < 1) {
        cli_error("Must specify image file name");
        goto out;
    }
    out_name = argv[argc - 1];

    s.src = calloc((size_t)s.nsrc, sizeof(*s.src));
    s.src_names = calloc((size_t)s.nsrc, sizeof(*s.src_names));
    s.src_size = calloc((size_t)s.nsrc, sizeof(*s.src_size));
    s.src_start = calloc((size_t)s.nsrc, sizeof(*s.src_start));
    if (!s.src || !s.src_names || !s.src_size || !s.src_start) {
        goto out;
    }
    if (src_cache) {
        if (!cli_cache_mode(src_cache)) {
            cli_error("Invalid source cache option: %s", src_cache);
            goto out;
        }
        sopts = vd_opts_new();
        if (!sopts ||
            vd_opts_set(sopts, "cache", cli_cache_mode(src_cache)) < 0) {
            goto out;
        }
    }
    for (int i = 0; i < s.nsrc; i++) {
        s.src_names[i] = argv[optind + i];
        s.src[i] = cli_open_image(s.src_names[i], co.fmt, co.image_opts,
                                  co.flags, sopts);
        if (!s.src[i]) {
            goto out;
        }
    }
    if (s.nsrc > 1 && sn_name) {
        cli_error("No support for concatenating multiple snapshot");
        goto out;
    }
    /* Loaded before the sizes are taken: the target gets the size the
     * disk had when the snapshot was made (qemu-img keeps the current
     * size, which only differs after a resize). */
    if (sn_opts || sn_name) {
        int r = sn_opts ?
            vd_snapshot_load_tmp(s.src[0],
                                 vd_opts_get(sn_opts, "snapshot.id"),
                                 vd_opts_get(sn_opts, "snapshot.name"),
                                 &err) :
            vd_snapshot_load_tmp_by_id_or_name(s.src[0], sn_name, &err);
        if (r < 0) {
            cli_error("Failed to load snapshot: %s",
                      err.message[0] ? err.message : strerror(-r));
            goto out;
        }
    }
    if (bitmaps) {
        if (s.nsrc > 1) {
            cli_error("Copying bitmaps only possible with single source");
            goto out;
        }
        if (check_bitmaps(s.src[0], skip_broken) < 0) {
            goto out;
        }
    }
    for (int i = 0; i < s.nsrc; i++) {
        int64_t len = vd_getlength(s.src[i]);

        if (len < 0) {
            cli_error("Could not get size of %s: %s", s.src_names[i],
                      strerror((int)-len));
            goto out;
        }
        s.src_size[i] = (uint64_t)len;
        s.src_start[i] = s.total;
        s.total += ((uint64_t)len + SECTOR - 1) / SECTOR * SECTOR;
    }

    if (!skip_create) {
        const vd_create_option *list = vd_create_options(out_fmt);
        char size[32];

        if (!list) {
            if (!cli_report_unsupported_format(out_name, out_fmt)) {
                cli_error("Unknown file format '%s'", out_fmt);
            }
            goto out;
        }
        /* The target's protocol merges its options in (rbd's
         * cluster_size), or refuses before anything is read. */
        list = vd_create_options_for(out_fmt, out_name, &err);
        if (!list) {
            cli_error("%s", err.message);
            goto out;
        }
        copts = vd_opts_new();
        if (!copts) {
            goto out;
        }
        /* Names and value syntax as qemu-img's QemuOpts parser checks
         * them, with its messages (no file name). */
        if ((options && vd_opts_parse(copts, options, NULL, &err) < 0) ||
            vd_check_create_opts_for(out_fmt, out_name, copts, &err) < 0) {
            cli_error("%s", err.message);
            if (strstr(err.message, "non-negative number")) {
                fprintf(stderr, "Optional suffix k, M, G, T, P or E means "
                        "kilo-, mega-, giga-, tera-, peta-\nand exabytes, "
                        "respectively.\n");
            }
            goto out;
        }
        snprintf(size, sizeof(size), "%" PRIu64, s.total);
        vd_opts_set(copts, "size", size);
        /* -B and -F are the options backing_file and backing_fmt, as
         * qemu-img's add_old_style_options(). */
        if (out_base && !create_option_known(list, "backing_file")) {
            cli_error("Backing file not supported for file format '%s'",
                      out_fmt);
            goto out;
        }
        if (out_base_fmt && !create_option_known(list, "backing_fmt")) {
            cli_error("Backing file format not supported for file format "
                      "'%s'", out_fmt);
            goto out;
        }
        if (out_base) {
            vd_opts_set(copts, "backing_file", out_base);
        }
        if (out_base_fmt) {
            vd_opts_set(copts, "backing_fmt", out_base_fmt);
        }
        out_base_param = vd_opts_get(copts, "backing_file");
        if (out_base_param) {
            out_base = out_base_param;
        }
    }
    if (target_is_zero && out_base) {
        /* qemu-img 7.2 says this and then exits with 0 without having
         * converted anything; a failure is what it is. */
        cli_error("Cannot use --target-is-zero when the destination image "
                  "has a backing file");
        goto out;
    }
    if (s.nsrc > 1 && out_base) {
        cli_error("Having a backing file for the target makes no sense when "
                  "concatenating multiple input images");
        goto out;
    }
    if (out_base_param && !vd_opts_get(copts, "backing_fmt")) {
        cli_error("Use of backing file requires explicit backing format");
        goto out;
    }
    if (s.compressed) {
        const char *prealloc = copts ? vd_opts_get(copts, "preallocation")
                                     : NULL;

        if (!skip_create && !format_compresses(out_fmt)) {
            cli_error("Compression not supported for this file format");
            goto out;
        }
        if (copts && (vd_opts_get(copts, "encrypt.format") ||
                      (vd_opts_get(copts, "encryption") &&
                       strcmp(vd_opts_get(copts, "encryption"), "off")))) {
            cli_error("Compression and encryption not supported at the same "
                      "time");
            goto out;
        }
        if (prealloc && strcmp(prealloc, "off")) {
            cli_error("Compression and preallocation not supported at the "
                      "same time");
            goto out;
        }
    }

    /* As qemu-img (img_add_key_secrets): the options naming a key
     * secret (key-secret, encrypt.key-secret) are kept for opening the
     * new target, which needs them to write. */
    topts = vd_opts_new();
    if (!topts) {
        goto out;
    }
    for (size_t i = 0; !skip_create && copts && i < vd_opts_count(copts);
         i++) {
        const char *k, *v;
        size_t kl;
        vd_opts_nth(copts, i, &k, &v);
        kl = strlen(k);
        if (kl >= 10 && strcmp(k + kl - 10, "key-secret") == 0 &&
            vd_opts_set(topts, k, v) < 0) {
            goto out;
        }
    }
    if (!skip_create) {
        if (vd_create(out_name, out_fmt, copts, &err) < 0) {
            const char *msg = cli_strip_filename(err.message, out_name);

            /* qemu-img checks that the format creates before anything
             * else and says so without a file name. */
            if (err.code == -ENOTSUP &&
                strncmp(msg, "Format driver '", 15) == 0 &&
                strstr(msg, "does not support image creation")) {
                cli_error("%s", msg);
                goto out;
            }
            cli_error("%s: error while converting %s: %s", out_name, out_fmt,
                      msg);
            cli_print_hint(&err);
            goto out;
        }
    }

    /* As qemu-img: checked once the target exists. */
    if (!cli_cache_mode(cache)) {
        cli_error("Invalid cache option: %s", cache);
        goto out;
    }
    if (vd_opts_set(topts, "cache", cli_cache_mode(cache)) < 0) {
        goto out;
    }
    /* As qemu-img: the target is opened as -O says (raw by default), even
     * with -n, so an existing target is never probed. */
    s.target = cli_open_image(out_name,
                              target_image_opts && !out_fmt_given ? NULL
                                                                  : out_fmt,
                              target_image_opts,
                              VD_O_RDWR | (skip_create || out_base
                                           ? 0 : VD_O_NO_BACKING), topts);
    if (!s.target && skip_create) {
        goto out;
    }
    if (!s.target) {
        goto out;
    }
    if (bitmaps && !vd_bitmap_supports_persistent(s.target)) {
        cli_error("Format driver '%s' does not support bitmaps",
                  vd_node_format(s.target));
        goto out;
    }
    /* As qemu-img: an existing target is asked once it is open. */
    if (s.compressed && skip_create &&
        !format_compresses(vd_node_format(s.target))) {
        cli_error("Compression not supported for this file format");
        goto out;
    }
    if (skip_create) {
        int64_t tlen = vd_getlength(s.target);

        if (tlen < 0) {
            cli_error("Could not get size of %s: %s", out_name,
                      strerror((int)-tlen));
            goto out;
        }
        if ((uint64_t)tlen < s.total) {
            cli_error("output file is smaller than input file");
            goto out;
        }
    }
    if (!s.compressed) {
        /* A target that takes compressed writes only (a streamOptimized
         * vmdk) is written as with -c, as qemu-img does. */
        vd_image_info *info = NULL;

        if (vd_get_info(s.target, &info, NULL) == 0 &&
            info->needs_compressed_writes) {
            s.compressed = true;
        }
        vd_image_info_free(&info);
    }
    if (s.compressed) {
        vd_image_info *info = NULL;

        if (vd_get_info(s.target, &info, NULL) < 0 || !info->cluster_size) {
            vd_image_info_free(&info);
            cli_error("Compression not supported for this file format");
            goto out;
        }
        /* Beyond qemu-img, which writes such clusters unencrypted into
         * an existing encrypted target (-n). */
        if (info->encrypted) {
            vd_image_info_free(&info);
            cli_error("Compression and encryption not supported at the "
                      "same time");
            goto out;
        }
        s.cluster = info->cluster_size;
        vd_image_info_free(&info);
    }

    if (out_base) {
        /* The data below the layer that -B names in the source's chain
         * is the backing file's (qemu-img assumes the source's backing
         * file, i.e. depth 1, and so loses deeper layers' data when -B
         * names one of them; here they are copied). */
        vd_node *tb = vd_node_child(s.target, "backing");
        int64_t blen = tb ? vd_getlength(tb) : 0;
        s.backing_depth = 1;
        s.backing_len = blen > 0 ? (uint64_t)blen : 0;
        if (tb) {
            int d = 1;
            for (vd_node *p = vd_node_child(s.src[0], "backing"); p;
                 p = vd_node_child(p, "backing"), d++) {
                if (same_image(p, tb)) {
                    s.backing_depth = d;
                    break;
                }
            }
        }
    }
    s.min_sparse = min_sparse;
    /* As qemu-img: a target whose new image does not read as zeros
     * (luks) gets the source's zeros written. */
    s.has_zero_init = min_sparse && !out_base &&
                      (target_is_zero ||
                       (!skip_create &&
                        !(vd_driver_features(vd_node_format(s.target)) &
                          VD_DRIVER_NO_ZERO_INIT)));
    s.in_order = !out_of_order;
    s.issue_in_order = !s.compressed && issue_order_only(s.target);
    s.big_pieces = wants_big_pieces(&s);
    pthread_mutex_init(&s.rate_lock, NULL);
    clock_gettime(CLOCK_MONOTONIC, &s.rate_last);
    cli_progress_init(&s.progress, co.progress, 1.0f);
    /* Compressed writes go one after the other (in order, as qemu-img
     * requires) and the driver compresses each request's clusters on
     * every CPU: more copy threads only read ahead, and compete with the
     * compression for the CPUs and memory (256 MiB of text: 5.3 s and
     * 14 MB with one, 7.5 s and 67 MB with eight). */
    if (s.compressed && !nthreads_given) {
        nthreads = 1;
    } else if (!nthreads_given) {
        nthreads = (uint64_t)default_threads(&s);
    }
    s.piece_max = piece_bytes(&s, (int)nthreads);
    /* As qemu-img, the whole source is walked once before the copy (for
     * the progress total): block status errors show up before anything
     * is written, and --salvage warns about them in both walks. */
    if (count_allocated(&s) < 0) {
        goto out;
    }
    if (run_copy(&s, (int)nthreads) < 0) {
        goto out;
    }
    cli_progress_print(&s.progress, 100);
    cli_progress_end(&s.progress);
    if (bitmaps && copy_bitmaps(s.src[0], s.target, skip_broken) < 0) {
        goto out;
    }
    if (vd_flush(s.target, &err) < 0) {
        cli_report_vd_error(&err, -EIO, out_name);
        goto out;
    }
    ret = 0;
out:
    if (s.target) {
        vd_error_clear(&err);
        if (vd_close(&s.target, &err) < 0 && ret == 0) {
            cli_report_vd_error(&err, -EIO, out_name);
            ret = 1;
        }
    }
    if (ret == 0 && co.json && !co.quiet) {
        print_summary(&s, out_name, out_fmt, skip_create, bitmaps);
    }
    for (int i = 0; s.src && i < s.nsrc; i++) {
        vd_close(&s.src[i], NULL);
    }
    free(s.src);
    free(s.src_names);
    free(s.src_size);
    free(s.src_start);
    vd_opts_free(&copts);
    vd_opts_free(&topts);
    vd_opts_free(&sopts);
    vd_opts_free(&sn_opts);
    free(options);
    return ret;
}
