/*
 * The QED format driver (QEMU Enhanced Disk, ../shared/specs/qed_spec.rst;
 * behaviour as QEMU 7.2's block/qed.c and block/qed-check.c).
 *
 * Layout: a 64-byte little-endian header in the first header_size
 * clusters (the backing file name follows it there), a two-level table
 * (L1 at l1_table_offset, L2 tables anywhere after the header, each
 * table_size clusters of 64-bit offsets) mapping guest clusters to data
 * clusters. An L2 entry is 0 (unallocated: read from the backing file,
 * or zeros), 1 (a zero cluster) or the cluster's file offset. New
 * clusters (data first, then a new L2 table) are appended at the end of
 * the file; QED never frees a cluster, so an offset once valid stays
 * valid and in-place writes need no lock.
 *
 * The need-check flag: QEMU sets QED_F_NEED_CHECK before the first
 * allocating write of an image without a backing file (with one, the
 * data is flushed before the L2 update instead), and clears it on a clean
 * close; opening a writable image that has it set runs the consistency
 * check with repairs, as QEMU does. `check` is qed-check.c's: every L1
 * and L2 entry validated, clusters referenced twice counted as
 * corruptions, unreferenced ones as leaks (never repaired), invalid
 * entries cleared with -r.
 *
 * Beyond QEMU, a writable open refuses an L1 table whose L2 tables
 * overlap the L1 table or each other, and every data cluster found is
 * checked against the L1 table before a write goes to it: QEMU would
 * write through such an entry and destroy its own tables.
 *
 * Locking: s->lock guards the tables, the L2 cache and the end of file;
 * s->alloc_lock serialises allocating writes (QEMU's allocating_acb), so
 * that between a lookup and the L2 update of an allocation nobody else
 * changes the range. Lock order: alloc_lock, then lock.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "core/block_int.h"
#include "table-cache.h"

#define QED_MAGIC 0x00444551u           /* "QED\0" little-endian */
#define QED_HEADER_BYTES 64
#define QED_F_BACKING_FILE 0x01ull
#define QED_F_NEED_CHECK 0x02ull
#define QED_F_BACKING_FORMAT_NO_PROBE 0x04ull
#define QED_FEATURE_MASK (QED_F_BACKING_FILE | QED_F_NEED_CHECK | \
                          QED_F_BACKING_FORMAT_NO_PROBE)
#define QED_MIN_CLUSTER (4u * 1024)
#define QED_MAX_CLUSTER (64u * 1024 * 1024)
#define QED_DEFAULT_CLUSTER (64u * 1024)
#define QED_MAX_TABLE 16u
#define QED_DEFAULT_TABLE 4u
#define QED_ZERO_CLUSTER 1ull
/* QEMU reads the backing file name into a PATH_MAX buffer. */
#define QED_MAX_BACKING_NAME 4096u

typedef struct qed_header {
    uint32_t magic, cluster_size, table_size, header_size;
    uint64_t features, compat_features, autoclear_features;
    uint64_t l1_table_offset, image_size;
    uint32_t backing_filename_offset, backing_filename_size;
} qed_header;

typedef struct qed_state {
    vd_node *node;
    const char *filename;
    qed_header h;
    uint64_t file_size;     /* end of the last whole cluster of the file */
    uint64_t table_nelems;
    unsigned l2_shift, l1_shift;
    uint64_t table_bytes;
    uint64_t *l1;
    vd_table_cache l2_cache;
    bool writable;
    pthread_mutex_t lock, alloc_lock;
} qed_state;

/* What a lookup found for a run of clusters. */
enum { QED_FOUND, QED_ZERO, QED_UNALLOC_L2, QED_UNALLOC_L1 };

/* ---- little-endian fields ---- */

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static uint64_t le64(const uint8_t *p)
{
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}

static void put64(uint8_t *p, uint64_t v)
{
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}

static void header_decode(const uint8_t *b, qed_header *h)
{
    h->magic = le32(b);
    h->cluster_size = le32(b + 4);
    h->table_size = le32(b + 8);
    h->header_size = le32(b + 12);
    h->features = le64(b + 16);
    h->compat_features = le64(b + 24);
    h->autoclear_features = le64(b + 32);
    h->l1_table_offset = le64(b + 40);
    h->image_size = le64(b + 48);
    h->backing_filename_offset = le32(b + 56);
    h->backing_filename_size = le32(b + 60);
}

static void header_encode(const qed_header *h, uint8_t *b)
{
    put32(b, h->magic);
    put32(b + 4, h->cluster_size);
    put32(b + 8, h->table_size);
    put32(b + 12, h->header_size);
    put64(b + 16, h->features);
    put64(b + 24, h->compat_features);
    put64(b + 32, h->autoclear_features);
    put64(b + 40, h->l1_table_offset);
    put64(b + 48, h->image_size);
    put32(b + 56, h->backing_filename_offset);
    put32(b + 60, h->backing_filename_size);
}

/* ---- the validity rules of QEMU's qed.h ---- */

static bool is_pow2(uint64_t v)
{
    return v && !(v & (v - 1));
}

static bool cluster_size_valid(uint32_t cs)
{
    return is_pow2(cs) && cs >= QED_MIN_CLUSTER && cs <= QED_MAX_CLUSTER;
}

static bool table_size_valid(uint32_t ts)
{
    return is_pow2(ts) && ts <= QED_MAX_TABLE;
}

/* QEMU's qed_max_image_size(), wrapping around 2^64 as it does for the
 * largest cluster and table sizes (where it then allows no image). */
static uint64_t max_image_size(uint32_t cs, uint32_t ts)
{
    uint64_t entries = (uint64_t)(uint32_t)(cs * ts) / sizeof(uint64_t);

    return entries * cs * entries;
}

static bool image_size_valid(uint64_t size, uint32_t cs, uint32_t ts)
{
    return size % 512 == 0 && size <= max_image_size(cs, ts);
}

static bool cluster_offset_valid(const qed_state *s, uint64_t off)
{
    uint64_t hdr = (uint64_t)s->h.header_size * s->h.cluster_size;

    return !(off & (s->h.cluster_size - 1)) && off >= hdr &&
           off < s->file_size;
}

/* As QEMU: the end check also refuses any table of a single cluster. */
static bool table_offset_valid(const qed_state *s, uint64_t off)
{
    uint64_t end = off + (uint64_t)(s->h.table_size - 1) * s->h.cluster_size;

    if (end <= off) {
        return false;
    }
    return cluster_offset_valid(s, off) && cluster_offset_valid(s, end);
}

static bool overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

/* ---- header and tables on disk ---- */

static int write_header(qed_state *s, vd_error *err)
{
    uint8_t b[QED_HEADER_BYTES];
    int ret;

    header_encode(&s->h, b);
    ret = vd_child_pwrite(s->node->file, 0, b, sizeof(b), 0, err);
    if (ret < 0) {
        vd_error_prepend(err, "%s: cannot write the QED header: ",
                         s->filename);
    }
    return ret;
}

static void table_to_disk(const uint64_t *t, uint8_t *out, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        put64(out + 8 * i, t[i]);
    }
}

/* Writes entries [index, index+n) of a table at @table_off, in whole
 * 512-byte sectors as QEMU's qed_write_table(). */
static int write_table(qed_state *s, uint64_t table_off, const uint64_t *t,
                       uint64_t index, uint64_t n, vd_error *err)
{
    uint64_t start = (index * 8) & ~511ull;
    uint64_t end = ((index + n) * 8 + 511) & ~511ull;
    uint8_t *buf;
    int ret;

    if (end > s->table_bytes) {
        end = s->table_bytes;
    }
    buf = malloc(end - start);
    if (!buf) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    table_to_disk(t + start / 8, buf, (end - start) / 8);
    ret = vd_child_pwrite(s->node->file, table_off + start, buf, end - start,
                          0, err);
    free(buf);
    return ret;
}

static int read_table(qed_state *s, uint64_t off, uint64_t *t, vd_error *err)
{
    int ret = vd_child_pread(s->node->file, off, t, s->table_bytes, err);

    if (ret < 0) {
        return ret;
    }
    for (uint64_t i = 0; i < s->table_nelems; i++) {
        t[i] = le64((const uint8_t *)&t[i]);
    }
    return 0;
}

/* The cached L2 table at @off, read on a miss. Under s->lock. */
static int get_l2(qed_state *s, uint64_t off, uint64_t **out, vd_error *err)
{
    vd_table_slot *v;
    int ret;

    *out = vd_table_cache_find(&s->l2_cache, off);
    if (*out) {
        return 0;
    }
    v = vd_table_cache_victim(&s->l2_cache, s->table_bytes);
    if (!v) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    ret = read_table(s, off, v->table, err);
    if (ret < 0) {
        return ret;
    }
    vd_table_cache_commit(&s->l2_cache, v, off);
    *out = v->table;
    return 0;
}

/*
 * QEMU's qed_find_cluster(): what backs guest offset @pos, and for how
 * many bytes (at most @len, within one L2 table) the same holds (for
 * QED_FOUND, clusters contiguous in the file). *@off: the file offset of
 * @pos's cluster (QED_FOUND only). Under s->lock.
 */
static int find_cluster(qed_state *s, uint64_t pos, uint64_t len,
                        uint64_t *n, uint64_t *off, vd_error *err)
{
    uint64_t cs = s->h.cluster_size;
    uint64_t l1i = pos >> s->l1_shift;
    uint64_t l2i = (pos >> s->l2_shift) & (s->table_nelems - 1);
    uint64_t in = pos & (cs - 1);
    uint64_t l2_off, *l2, first, max_n, i;
    int kind, ret;

    /* Up to the end of this L2 table's coverage. */
    {
        uint64_t cover = ((s->table_nelems - l2i) << s->l2_shift) - in;
        if (len > cover) {
            len = cover;
        }
    }
    if (l1i >= s->table_nelems) {
        return vd_error_set(err, -EINVAL, "%s: QED offset %" PRIu64
                            " is beyond the L1 table", s->filename, pos);
    }
    l2_off = s->l1[l1i];
    if (!l2_off) {
        *n = len;
        return QED_UNALLOC_L1;
    }
    if (!table_offset_valid(s, l2_off)) {
        return vd_error_set(err, -EINVAL, "%s: QED L2 table offset 0x%"
                            PRIx64 " (L1 entry %" PRIu64 ") is invalid",
                            s->filename, l2_off, l1i);
    }
    ret = get_l2(s, l2_off, &l2, err);
    if (ret < 0) {
        return ret;
    }
    first = l2[l2i];
    if (first == 0) {
        kind = QED_UNALLOC_L2;
    } else if (first == QED_ZERO_CLUSTER) {
        kind = QED_ZERO;
    } else {
        kind = QED_FOUND;
    }
    max_n = (in + len + cs - 1) / cs;
    for (i = 0; i < max_n; i++) {
        uint64_t e = l2[l2i + i];
        if (kind == QED_FOUND) {
            if (!cluster_offset_valid(s, e)) {
                if (i == 0) {
                    return vd_error_set(err, -EINVAL, "%s: QED data cluster "
                                        "offset 0x%" PRIx64 " (L2 table 0x%"
                                        PRIx64 " entry %" PRIu64 ") is "
                                        "invalid", s->filename, e, l2_off,
                                        l2i);
                }
                break;
            }
            if (e != first + i * cs) {
                break;
            }
        } else if ((kind == QED_ZERO) != (e == QED_ZERO_CLUSTER) ||
                   (kind == QED_UNALLOC_L2 && e != 0)) {
            break;
        }
    }
    *n = i * cs - in;
    if (*n > len) {
        *n = len;
    }
    *off = kind == QED_FOUND ? first : 0;
    return kind;
}

/* ---- the consistency check (QEMU's qed-check.c) ---- */

typedef struct qed_check_ctx {
    qed_state *s;
    vd_check_result *res;
    uint64_t nclusters;
    uint8_t *used;          /* one bit per file cluster */
    bool fix;
} qed_check_ctx;

/* Marks @n clusters from @off used; false when one already was. */
static bool mark_used(qed_check_ctx *c, uint64_t off, uint64_t n)
{
    uint64_t cl = off / c->s->h.cluster_size;
    int64_t dup = 0;

    for (; n; n--, cl++) {
        if (cl >= c->nclusters) {
            continue;
        }
        if (c->used[cl / 8] & (1u << (cl % 8))) {
            dup++;
        }
        c->used[cl / 8] |= (uint8_t)(1u << (cl % 8));
    }
    c->res->corruptions += dup;
    return dup == 0;
}

static uint64_t check_l2(qed_check_ctx *c, uint64_t *t)
{
    qed_state *s = c->s;
    uint64_t last = 0, invalid = 0;

    for (uint64_t i = 0; i < s->table_nelems; i++) {
        uint64_t off = t[i];
        if (off == 0 || off == QED_ZERO_CLUSTER) {
            continue;
        }
        c->res->allocated_clusters++;
        if (last && last + s->h.cluster_size != off) {
            c->res->fragmented_clusters++;
        }
        last = off;
        if (!cluster_offset_valid(s, off)) {
            if (c->fix) {
                t[i] = 0;
                c->res->corruptions_fixed++;
            } else {
                c->res->corruptions++;
            }
            invalid++;
            continue;
        }
        mark_used(c, off, 1);
    }
    return invalid;
}

static int run_check(qed_state *s, vd_check_result *res, bool fix,
                     vd_error *err)
{
    qed_check_ctx c = { .s = s, .res = res, .fix = fix };
    uint64_t *l2 = NULL, invalid_l1 = 0;
    int ret, last_error = 0;

    c.nclusters = s->file_size / s->h.cluster_size;
    c.used = calloc(c.nclusters / 8 + 1, 1);
    l2 = malloc(s->table_bytes);
    if (!c.used || !l2) {
        free(c.used);
        free(l2);
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    res->total_clusters = (int64_t)((s->h.image_size + s->h.cluster_size - 1)
                                    / s->h.cluster_size);
    mark_used(&c, s->h.l1_table_offset, s->h.table_size);
    for (uint64_t i = 0; i < s->table_nelems; i++) {
        uint64_t off = s->l1[i], bad;
        if (!off) {
            continue;
        }
        if (!table_offset_valid(s, off)) {
            if (fix) {
                s->l1[i] = 0;
                res->corruptions_fixed++;
            } else {
                res->corruptions++;
            }
            invalid_l1++;
            continue;
        }
        if (!mark_used(&c, off, s->h.table_size)) {
            continue;
        }
        ret = read_table(s, off, l2, NULL);
        if (ret < 0) {
            res->check_errors++;
            last_error = ret;
            continue;
        }
        bad = check_l2(&c, l2);
        if (bad && fix) {
            ret = write_table(s, off, l2, 0, s->table_nelems, NULL);
            if (ret < 0) {
                res->check_errors++;
                last_error = ret;
            }
        }
    }
    if (invalid_l1 && fix) {
        ret = write_table(s, s->h.l1_table_offset, s->l1, 0, s->table_nelems,
                          NULL);
        if (ret < 0) {
            res->check_errors++;
            last_error = ret;
        }
    }
    vd_table_cache_free(&s->l2_cache);
    if (last_error == 0) {
        /* Leaks are counted only when the whole image was scanned. */
        for (uint64_t cl = s->h.header_size; cl < c.nclusters; cl++) {
            if (!(c.used[cl / 8] & (1u << (cl % 8)))) {
                res->leaks++;
            }
        }
        if (fix && res->corruptions == 0 && res->check_errors == 0 &&
            (s->h.features & QED_F_NEED_CHECK)) {
            ret = vd_node_flush(s->node->file->node, NULL);
            s->h.features &= ~QED_F_NEED_CHECK;
            if (ret == 0) {
                ret = write_header(s, NULL);
            }
            if (ret < 0) {
                s->h.features |= QED_F_NEED_CHECK;
            }
        }
    }
    free(c.used);
    free(l2);
    if (last_error < 0) {
        vd_error_set(err, last_error, "%s: the QED check could not read or "
                     "write a table", s->filename);
    }
    return last_error;
}

/* ---- open and close ---- */

static int qed_probe(const uint8_t *buf, size_t len, const char *filename)
{
    (void)filename;
    return len >= QED_HEADER_BYTES && le32(buf) == QED_MAGIC ? 100 : 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Before anything is written: the L2 tables must not overlap the L1
 * table or each other, or an L2 update would overwrite another table. */
static int validate_l1(qed_state *s, vd_error *err)
{
    uint64_t *offs = malloc(s->table_bytes), n = 0;
    int ret = 0;

    if (!offs) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    for (uint64_t i = 0; i < s->table_nelems; i++) {
        uint64_t o = s->l1[i];
        if (!o || !table_offset_valid(s, o)) {
            continue;   /* refused when used, fixed by check -r */
        }
        if (overlaps(o, s->table_bytes, s->h.l1_table_offset,
                     s->table_bytes)) {
            ret = vd_error_set(err, -EINVAL, "%s: QED L2 table 0x%" PRIx64
                               " (L1 entry %" PRIu64 ") overlaps the L1 "
                               "table", s->filename, o, i);
            goto out;
        }
        offs[n++] = o;
    }
    qsort(offs, n, sizeof(*offs), cmp_u64);
    for (uint64_t i = 1; i < n; i++) {
        if (offs[i - 1] + s->table_bytes > offs[i]) {
            ret = vd_error_set(err, -EINVAL, "%s: QED L2 tables 0x%" PRIx64
                               " and 0x%" PRIx64 " overlap", s->filename,
                               offs[i - 1], offs[i]);
            goto out;
        }
    }
out:
    free(offs);
    return ret;
}

static void free_state(qed_state *s)
{
    vd_table_cache_free(&s->l2_cache);
    free(s->l1);
    s->l1 = NULL;
}

static int qed_open(vd_node *node, vd_opts *opts, unsigned flags,
                    vd_error *err)
{
    qed_state *s = node->opaque;
    uint8_t b[QED_HEADER_BYTES];
    qed_header *h = &s->h;
    int64_t flen;
    int ret;

    (void)opts;
    s->node = node;
    s->filename = node->filename;
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->alloc_lock, NULL);
    s->writable = (flags & VD_NODE_RDWR) != 0;

    ret = vd_child_pread(node->file, 0, b, sizeof(b), err);
    if (ret < 0) {
        vd_error_prepend(err, "Failed to read QED header: ");
        return ret;
    }
    header_decode(b, h);
    if (h->magic != QED_MAGIC) {
        return vd_error_set(err, -EINVAL, "Image not in QED format");
    }
    if (h->features & ~QED_FEATURE_MASK) {
        return vd_error_set(err, -ENOTSUP, "Unsupported QED features: %"
                            PRIx64, (uint64_t)(h->features & ~QED_FEATURE_MASK));
    }
    if (!cluster_size_valid(h->cluster_size)) {
        return vd_error_set(err, -EINVAL, "QED cluster size is invalid");
    }
    flen = vd_node_getlength(node->file->node);
    if (flen < 0) {
        return vd_error_set(err, (int)flen, "Failed to get file length");
    }
    s->file_size = (uint64_t)flen & ~(uint64_t)(h->cluster_size - 1);
    if (!table_size_valid(h->table_size)) {
        return vd_error_set(err, -EINVAL, "QED table size is invalid");
    }
    if (!image_size_valid(h->image_size, h->cluster_size, h->table_size)) {
        return vd_error_set(err, -EINVAL, "QED image size is invalid");
    }
    if (!table_offset_valid(s, h->l1_table_offset)) {
        return vd_error_set(err, -EINVAL, "QED table offset is invalid");
    }
    s->table_nelems = (uint64_t)h->cluster_size * h->table_size / 8;
    s->table_bytes = s->table_nelems * 8;
    s->l2_shift = (unsigned)__builtin_ctz(h->cluster_size);
    s->l1_shift = s->l2_shift + (unsigned)__builtin_ctzll(s->table_nelems);
    if (h->header_size > UINT32_MAX / h->cluster_size) {
        return vd_error_set(err, -EINVAL, "QED header size is too large");
    }
    if (h->features & QED_F_BACKING_FILE) {
        char *name;
        if ((uint64_t)h->backing_filename_offset + h->backing_filename_size >
            (uint64_t)h->cluster_size * h->header_size) {
            return vd_error_set(err, -EINVAL, "QED backing filename offset "
                                "is invalid");
        }
        if (h->backing_filename_size >= QED_MAX_BACKING_NAME) {
            return vd_error_set(err, -EINVAL, "Failed to read backing "
                                "filename: its length %" PRIu32 " is too "
                                "long", h->backing_filename_size);
        }
        name = calloc(1, h->backing_filename_size + 1);
        if (!name) {
            return vd_error_set(err, -ENOMEM, "out of memory");
        }
        ret = vd_child_pread(node->file, h->backing_filename_offset, name,
                             h->backing_filename_size, err);
        if (ret < 0) {
            free(name);
            vd_error_prepend(err, "Failed to read backing filename: ");
            return ret;
        }
        free(node->backing_file);
        node->backing_file = name;
        free(node->backing_format);
        node->backing_format = (h->features & QED_F_BACKING_FORMAT_NO_PROBE)
                               ? strdup("raw") : NULL;
    }
    /* Older programs knock out autoclear bits they do not know. */
    if (h->autoclear_features && s->writable) {
        h->autoclear_features = 0;
        ret = write_header(s, err);
        if (ret == 0) {
            ret = vd_node_flush(node->file->node, err);
        }
        if (ret < 0) {
            vd_error_prepend(err, "Failed to update header: ");
            return ret;
        }
    }
    s->l1 = malloc(s->table_bytes);
    if (!s->l1) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    ret = read_table(s, h->l1_table_offset, s->l1, err);
    if (ret < 0) {
        vd_error_prepend(err, "Failed to read L1 table: ");
        goto fail;
    }
    if (!(flags & VD_NODE_CHECK) && (h->features & QED_F_NEED_CHECK) &&
        s->writable) {
        vd_check_result res;
        memset(&res, 0, sizeof(res));
        ret = run_check(s, &res, true, err);
        if (ret < 0) {
            vd_error_prepend(err, "Image corrupted: ");
            goto fail;
        }
    }
    if (s->writable && !(flags & VD_NODE_CHECK)) {
        ret = validate_l1(s, err);
        if (ret < 0) {
            goto fail;
        }
    }
    node->bl.request_alignment = 512;
    node->bl.pwrite_zeroes_alignment = h->cluster_size;
    node->bl.max_pwrite_zeroes = (INT32_MAX / h->cluster_size) *
                                 (uint64_t)h->cluster_size;
    return 0;
fail:
    free_state(s);
    return ret;
}

static void qed_close(vd_node *node)
{
    qed_state *s = node->opaque;

    if (s->writable && s->l1 && (s->h.features & QED_F_NEED_CHECK)) {
        /* A clean shutdown: the data is on disk, no check next time. */
        if (vd_node_flush(node->file->node, NULL) == 0) {
            s->h.features &= ~QED_F_NEED_CHECK;
            write_header(s, NULL);
        }
    }
    free_state(s);
    pthread_mutex_destroy(&s->lock);
    pthread_mutex_destroy(&s->alloc_lock);
}

/* ---- reads ---- */

static int qed_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                      vd_iov *qiov, unsigned flags, vd_error *err)
{
    qed_state *s = node->opaque;
    uint64_t done = 0;
    int ret = 0;

    (void)flags;
    while (done < bytes) {
        uint64_t n, host, pos = off + done;
        int kind;

        pthread_mutex_lock(&s->lock);
        kind = find_cluster(s, pos, bytes - done, &n, &host, err);
        pthread_mutex_unlock(&s->lock);
        if (kind < 0) {
            return kind;
        }
        if (kind == QED_ZERO || (kind != QED_FOUND && !node->backing)) {
            vd_iov_memset(qiov, done, 0, n);
        } else {
            if (kind == QED_FOUND) {
                vd_node_debug_event(node->file->node, VD_BLKDBG_READ_AIO);
                ret = vd_child_preadv_part(node->file, host +
                                           (pos & (s->h.cluster_size - 1)),
                                           n, qiov, done, err);
            } else {
                vd_node_debug_event(node->file->node,
                                    VD_BLKDBG_READ_BACKING_AIO);
                ret = vd_child_preadv_part(node->backing, pos, n, qiov, done,
                                           err);
            }
            if (ret < 0) {
                return ret;
            }
        }
        done += n;
    }
    return 0;
}

/* ---- writes ---- */

/* Refuses a data cluster run that would overwrite the header or the L1
 * table (a corrupt L2 entry): QEMU would write there. */
static int check_data_target(qed_state *s, uint64_t host, uint64_t n,
                             vd_error *err)
{
    uint64_t hdr = (uint64_t)s->h.header_size * s->h.cluster_size;

    if (host < hdr || overlaps(host, n, s->h.l1_table_offset,
                               s->table_bytes)) {
        return vd_error_set(err, -EIO, "%s: QED data cluster 0x%" PRIx64
                            " overlaps the image's metadata; refusing to "
                            "write (run 'check -r all')", s->filename, host);
    }
    return 0;
}

/* Fills [start, start+len) of the new cluster at file offset @host with
 * what the guest saw there: the backing file's data, or zeros. */
static int copy_from_backing(qed_state *s, uint64_t start, uint64_t len,
                             uint64_t host, bool was_zero, vd_error *err)
{
    uint8_t *buf;
    int ret = 0;

    if (!len) {
        return 0;
    }
    buf = vd_node_blockalign(s->node->file->node, len);
    if (!buf) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    if (s->node->backing && !was_zero) {
        vd_node_debug_event(s->node->file->node, VD_BLKDBG_COW_READ);
        ret = vd_child_pread(s->node->backing, start, buf, len, err);
    } else {
        memset(buf, 0, len);
    }
    if (ret == 0) {
        vd_node_debug_event(s->node->file->node, VD_BLKDBG_COW_WRITE);
        ret = vd_child_pwrite(s->node->file, host, buf, len, 0, err);
    }
    free(buf);
    return ret;
}

static void fill_entries(const qed_state *s, uint64_t *e, uint64_t n,
                         uint64_t host)
{
    for (uint64_t i = 0; i < n; i++) {
        e[i] = host == QED_ZERO_CLUSTER ? host : host + i * s->h.cluster_size;
    }
}

/* Points @nclusters L2 entries from guest @pos to @host (or all to
 * QED_ZERO_CLUSTER when @host is 1), allocating the L2 table when the L1
 * entry is empty. Under both locks. */
static int update_l2(qed_state *s, uint64_t pos, uint64_t nclusters,
                     uint64_t host, vd_error *err)
{
    uint64_t l1i = pos >> s->l1_shift;
    uint64_t l2i = (pos >> s->l2_shift) & (s->table_nelems - 1);
    uint64_t *l2, l2_off = s->l1[l1i];
    bool fresh = l2_off == 0;
    int ret;

    if (fresh) {
        vd_table_slot *slot = vd_table_cache_victim(&s->l2_cache,
                                                    s->table_bytes);
        if (!slot) {
            return vd_error_set(err, -ENOMEM, "%s: out of memory",
                                s->filename);
        }
        memset(slot->table, 0, s->table_bytes);
        l2_off = s->file_size;
        s->file_size += s->table_bytes;
        l2 = slot->table;
        fill_entries(s, l2 + l2i, nclusters, host);
        vd_node_debug_event(s->node->file->node, VD_BLKDBG_L2_ALLOC_WRITE);
        ret = write_table(s, l2_off, l2, 0, s->table_nelems, err);
        if (ret < 0) {
            return ret;
        }
        vd_table_cache_commit(&s->l2_cache, slot, l2_off);
        s->l1[l1i] = l2_off;
        vd_node_debug_event(s->node->file->node, VD_BLKDBG_L1_UPDATE);
        ret = write_table(s, s->h.l1_table_offset, s->l1, l1i, 1, err);
        if (ret < 0) {
            /* The table on disk is not referenced: as if never made. */
            s->l1[l1i] = 0;
            slot->offset = 0;
        }
        return ret;
    }
    ret = get_l2(s, l2_off, &l2, err);
    if (ret < 0) {
        return ret;
    }
    fill_entries(s, l2 + l2i, nclusters, host);
    vd_node_debug_event(s->node->file->node, VD_BLKDBG_L2_UPDATE);
    ret = write_table(s, l2_off, l2, l2i, nclusters, err);
    if (ret < 0) {
        vd_table_cache_drop(&s->l2_cache, l2_off);
    }
    return ret;
}

static int set_need_check(qed_state *s, vd_error *err)
{
    int ret;

    /* With a backing file the flush before the L2 update keeps the image
     * consistent instead (QEMU's qed_should_set_need_check()). */
    if (s->node->backing || (s->h.features & QED_F_NEED_CHECK)) {
        return 0;
    }
    s->h.features |= QED_F_NEED_CHECK;
    ret = write_header(s, err);
    if (ret < 0) {
        s->h.features &= ~QED_F_NEED_CHECK;
    }
    return ret;
}

/*
 * One allocating piece: guest [pos, pos+n) inside one L2 table, found
 * unallocated or zero (@kind). @data NULL: a zero write, which only marks
 * the clusters zero. Called with alloc_lock and lock held; drops lock for
 * the data I/O.
 */
static int write_alloc(qed_state *s, uint64_t pos, uint64_t n, int kind,
                       vd_iov *qiov, size_t qoff, bool zero, vd_error *err)
{
    uint64_t cs = s->h.cluster_size;
    uint64_t in = pos & (cs - 1);
    uint64_t nclusters = (in + n + cs - 1) / cs;
    uint64_t host = QED_ZERO_CLUSTER;
    int ret;

    if (zero) {
        if (kind == QED_ZERO) {
            return 0;
        }
    } else {
        host = s->file_size;
        s->file_size += nclusters * cs;
    }
    ret = set_need_check(s, err);
    if (ret < 0) {
        return ret;
    }
    if (!zero) {
        uint64_t tail = pos + n;
        uint64_t tail_len = ((tail + cs - 1) & ~(cs - 1)) - tail;
        vd_iov slice;

        pthread_mutex_unlock(&s->lock);
        ret = copy_from_backing(s, pos - in, in, host, kind == QED_ZERO,
                                err);
        if (ret == 0) {
            ret = copy_from_backing(s, tail, tail_len, host + in + n,
                                    kind == QED_ZERO, err);
        }
        if (ret == 0) {
            ret = vd_iov_init_slice(&slice, qiov, qoff, n);
            if (ret < 0) {
                vd_error_set(err, ret, "%s: out of memory", s->filename);
            } else {
                vd_node_debug_event(s->node->file->node, VD_BLKDBG_WRITE_AIO);
                ret = vd_child_pwritev(s->node->file, host + in, n, &slice, 0,
                                       err);
                vd_iov_destroy(&slice);
            }
        }
        if (ret == 0 && s->node->backing) {
            /* The data reaches the disk before the L2 entry that makes
             * the backing file's version invisible. */
            ret = vd_node_flush(s->node->file->node, err);
        }
        pthread_mutex_lock(&s->lock);
        if (ret < 0) {
            return ret;     /* the clusters leak, as in QEMU */
        }
    }
    return update_l2(s, pos, nclusters, host, err);
}

static int write_inplace(qed_state *s, uint64_t host, uint64_t n,
                         vd_iov *qiov, size_t qoff, bool zero, vd_error *err)
{
    vd_iov slice;
    int ret = check_data_target(s, host, n, err);

    if (ret < 0) {
        return ret;
    }
    if (zero) {
        return vd_node_pwrite_zeroes(s->node->file->node, host, n, 0, err);
    }
    ret = vd_iov_init_slice(&slice, qiov, qoff, n);
    if (ret < 0) {
        return vd_error_set(err, ret, "%s: out of memory", s->filename);
    }
    vd_node_debug_event(s->node->file->node, VD_BLKDBG_WRITE_AIO);
    ret = vd_child_pwritev(s->node->file, host, n, &slice, 0, err);
    vd_iov_destroy(&slice);
    return ret;
}

static int do_write(vd_node *node, uint64_t off, uint64_t bytes,
                    vd_iov *qiov, bool zero, vd_error *err)
{
    qed_state *s = node->opaque;
    uint64_t done = 0;
    int ret;

    while (done < bytes) {
        uint64_t n, host, pos = off + done;
        int kind;

        pthread_mutex_lock(&s->lock);
        kind = find_cluster(s, pos, bytes - done, &n, &host, err);
        pthread_mutex_unlock(&s->lock);
        if (kind < 0) {
            return kind;
        }
        if (kind != QED_FOUND) {
            /* Allocate under alloc_lock, after looking again: another
             * writer may have allocated the range meanwhile. */
            pthread_mutex_lock(&s->alloc_lock);
            pthread_mutex_lock(&s->lock);
            kind = find_cluster(s, pos, bytes - done, &n, &host, err);
            if (kind >= 0 && kind != QED_FOUND) {
                ret = write_alloc(s, pos, n, kind, qiov, done, zero, err);
            } else {
                ret = kind < 0 ? kind : 1;
            }
            pthread_mutex_unlock(&s->lock);
            pthread_mutex_unlock(&s->alloc_lock);
            if (ret < 0) {
                return ret;
            }
            if (ret == 0) {
                done += n;
                continue;
            }
        }
        ret = write_inplace(s, host + (pos & (s->h.cluster_size - 1)), n,
                            qiov, done, zero, err);
        if (ret < 0) {
            return ret;
        }
        done += n;
    }
    return 0;
}

static int qed_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                       vd_iov *qiov, unsigned flags, vd_error *err)
{
    (void)flags;
    return do_write(node, off, bytes, qiov, false, err);
}

static int qed_pwrite_zeroes(vd_node *node, uint64_t off, uint64_t bytes,
                             unsigned flags, vd_error *err)
{
    qed_state *s = node->opaque;
    uint64_t mask = s->h.cluster_size - 1;

    (void)flags;
    /* As QEMU: only whole clusters, the rest takes the fallback. */
    if ((off & mask) || (bytes & mask)) {
        return -ENOTSUP;
    }
    return do_write(node, off, bytes, NULL, true, err);
}

static int qed_flush(vd_node *node, vd_error *err)
{
    (void)node;
    (void)err;
    return 0;   /* tables are written through */
}

static int qed_block_status(vd_node *node, bool want_zero, uint64_t off,
                            uint64_t bytes, uint64_t *pnum, uint64_t *map,
                            vd_node **file, vd_error *err)
{
    qed_state *s = node->opaque;
    uint64_t n, host;
    int kind;

    (void)want_zero;
    pthread_mutex_lock(&s->lock);
    kind = find_cluster(s, off, bytes, &n, &host, err);
    pthread_mutex_unlock(&s->lock);
    if (kind < 0) {
        return kind;
    }
    *pnum = n;
    switch (kind) {
    case QED_FOUND:
        *map = host + (off & (s->h.cluster_size - 1));
        *file = node->file->node;
        return VD_BLOCK_DATA | VD_BLOCK_OFFSET_VALID | VD_BLOCK_ALLOCATED;
    case QED_ZERO:
        return VD_BLOCK_ZERO | VD_BLOCK_ALLOCATED;
    default:
        return 0;
    }
}

static int64_t qed_getlength(vd_node *node)
{
    qed_state *s = node->opaque;
    return (int64_t)s->h.image_size;
}

static int qed_truncate(vd_node *node, uint64_t size, bool exact,
                        vd_prealloc prealloc, vd_error *err)
{
    static const char *const names[] = { "off", "metadata", "falloc",
                                         "full" };
    qed_state *s = node->opaque;
    uint64_t old = s->h.image_size;
    int ret;

    (void)exact;
    if (prealloc != VD_PREALLOC_OFF) {
        return vd_error_set(err, -ENOTSUP, "Unsupported preallocation mode "
                            "'%s'", (unsigned)prealloc < 4 ? names[prealloc]
                            : "?");
    }
    if (!image_size_valid(size, s->h.cluster_size, s->h.table_size)) {
        return vd_error_set(err, -EINVAL, "Invalid image size specified");
    }
    if (size < old) {
        return vd_error_set(err, -ENOTSUP, "Shrinking images is currently "
                            "not supported");
    }
    s->h.image_size = size;
    ret = write_header(s, NULL);
    if (ret < 0) {
        s->h.image_size = old;
        return vd_error_set_errno(err, ret, "Failed to update the image "
                                  "size");
    }
    return 0;
}

static int qed_get_info(vd_node *node, vd_image_info *info, vd_error *err)
{
    qed_state *s = node->opaque;

    (void)err;
    info->cluster_size = s->h.cluster_size;
    /* qemu-img 7.2 shows "dirty-flag": false for QED images even while
     * QED_F_NEED_CHECK is set (tests/cli/fmt-qed.sh compares): the flag
     * is QED's own business, seen with check. */
    info->has_dirty_flag = true;
    info->dirty_flag = false;
    return 0;
}

static int qed_check(vd_node *node, vd_check_result *res, unsigned fix,
                     vd_error *err)
{
    qed_state *s = node->opaque;

    if (fix && !s->writable) {
        return vd_error_set(err, -EACCES, "%s: the image is opened "
                            "read-only", s->filename);
    }
    return run_check(s, res, fix != 0, err);
}

static int qed_change_backing_file(vd_node *node, const char *backing,
                                   const char *backing_fmt, vd_error *err)
{
    qed_state *s = node->opaque;
    qed_header nh = s->h;
    size_t blen = backing && backing[0] ? strlen(backing) : 0;
    uint8_t *buf;
    int ret;

    if (blen && nh.compat_features) {
        return vd_error_set(err, -ENOTSUP, "%s: cannot change the backing "
                            "file of a QED image with unknown compat "
                            "features", s->filename);
    }
    nh.features &= ~(QED_F_BACKING_FILE | QED_F_BACKING_FORMAT_NO_PROBE);
    if (blen) {
        nh.features |= QED_F_BACKING_FILE;
        if (backing_fmt && strcmp(backing_fmt, "raw") == 0) {
            nh.features |= QED_F_BACKING_FORMAT_NO_PROBE;
        }
    }
    nh.backing_filename_offset = QED_HEADER_BYTES;
    nh.backing_filename_size = (uint32_t)blen;
    if (QED_HEADER_BYTES + blen >
        (uint64_t)nh.header_size * nh.cluster_size) {
        return vd_error_set(err, -ENOSPC, "%s: the backing file name does "
                            "not fit in the QED header", s->filename);
    }
    buf = malloc(QED_HEADER_BYTES + blen);
    if (!buf) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    header_encode(&nh, buf);
    if (blen) {
        memcpy(buf + QED_HEADER_BYTES, backing, blen);
    }
    ret = vd_child_pwrite(node->file, 0, buf, QED_HEADER_BYTES + blen, 0,
                          err);
    if (ret == 0) {
        ret = vd_node_flush(node->file->node, err);
    }
    free(buf);
    if (ret < 0) {
        return ret;
    }
    s->h = nh;
    free(node->backing_file);
    free(node->backing_format);
    node->backing_file = blen ? strdup(backing) : NULL;
    node->backing_format = blen && backing_fmt ? strdup(backing_fmt) : NULL;
    return 0;
}

/* ---- create ---- */

static const vd_create_option qed_create_opts[] = {
    { "size", "size", "Virtual disk size", NULL },
    { "backing_file", "string", "File name of a base image", NULL },
    { "backing_fmt", "string", "Image format of the base image", NULL },
    { "cluster_size", "size", "Cluster size (in bytes)", "65536" },
    { "table_size", "size", "L1/L2 table size (in clusters)", NULL },
    { NULL, NULL, NULL, NULL },
};

static int qed_create(const char *filename, vd_opts *opts, vd_error *err)
{
    char *v, *bfile = NULL, *bfmt = NULL;
    uint64_t size = 0, cs, ts;
    qed_header h;
    vd_opts *popts = NULL;
    vd_node *file = NULL;
    uint8_t *buf = NULL;
    uint64_t l1_bytes;
    int ret;

    v = vd_opts_take(opts, "size");
    if (v) {
        ret = vd_parse_size(v, &size);
        free(v);
        if (ret < 0) {
            return vd_error_set(err, -EINVAL, "%s: Parameter 'size' expects "
                                "a non-negative number below 2^64", filename);
        }
        /* QEMU rounds the virtual size up to whole sectors (a size this
         * close to 2^64 is refused below as too large). */
        size = size > UINT64_MAX - 511 ? UINT64_MAX : (size + 511) & ~511ull;
    }
    bfile = vd_opts_take(opts, "backing_file");
    bfmt = vd_opts_take(opts, "backing_fmt");
    ret = vd_create_check_backing_fmt(filename, bfile, bfmt, true, err);
    if (ret == 0) {
        ret = vd_opts_take_size(opts, "cluster_size", QED_DEFAULT_CLUSTER,
                                &cs, err);
    }
    if (ret == 0) {
        ret = vd_opts_take_size(opts, "table_size", QED_DEFAULT_TABLE, &ts,
                                err);
    }
    if (ret < 0) {
        goto out;
    }
    if (bfmt && !bfile) {
        ret = vd_error_set(err, -EINVAL, "%s: Backing format cannot be used "
                           "without backing file", filename);
        goto out;
    }
    /* QEMU creates the file before it looks at the options. */
    popts = vd_opts_clone(opts);
    if (!popts) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", filename);
        goto out;
    }
    vd_opts_set(popts, "size", "0");
    ret = vd_create_protocol(filename, popts, err);
    if (ret < 0) {
        goto out;
    }
    for (const char *k = vd_opts_first_key(opts); k;
         k = vd_opts_first_key(opts)) {
        vd_opts_del(opts, k);
    }
    if (cs > UINT32_MAX || !cluster_size_valid((uint32_t)cs)) {
        ret = vd_error_set(err, -EINVAL, "%s: QED cluster size must be "
                           "within range [%u, %u] and power of 2", filename,
                           QED_MIN_CLUSTER, QED_MAX_CLUSTER);
        goto out;
    }
    if (ts > UINT32_MAX || !table_size_valid((uint32_t)ts)) {
        ret = vd_error_set(err, -EINVAL, "%s: QED table size must be within "
                           "range [%u, %u] and power of 2", filename, 1u,
                           QED_MAX_TABLE);
        goto out;
    }
    if (!image_size_valid(size, (uint32_t)cs, (uint32_t)ts)) {
        ret = vd_error_set(err, -EINVAL, "%s: QED image size must be a "
                           "non-zero multiple of cluster size and less than %"
                           PRIu64 " bytes", filename,
                           max_image_size((uint32_t)cs, (uint32_t)ts));
        goto out;
    }
    if (bfile && QED_HEADER_BYTES + strlen(bfile) > cs) {
        ret = vd_error_set(err, -EINVAL, "%s: the backing file name is too "
                           "long for a QED header of %" PRIu64 " bytes",
                           filename, cs);
        goto out;
    }
    memset(&h, 0, sizeof(h));
    h.magic = QED_MAGIC;
    h.cluster_size = (uint32_t)cs;
    h.table_size = (uint32_t)ts;
    h.header_size = 1;
    h.l1_table_offset = cs;
    h.image_size = size;
    if (bfile) {
        h.features |= QED_F_BACKING_FILE;
        h.backing_filename_offset = QED_HEADER_BYTES;
        h.backing_filename_size = (uint32_t)strlen(bfile);
        if (bfmt && strcmp(bfmt, "raw") == 0) {
            h.features |= QED_F_BACKING_FORMAT_NO_PROBE;
        }
    }
    ret = vd_open_protocol(&file, filename, VD_NODE_RDWR, err);
    if (ret < 0) {
        goto out;
    }
    /* Header cluster and the zeroed L1 table, in one write. */
    l1_bytes = cs * ts;
    buf = calloc(1, cs + l1_bytes);
    if (!buf) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", filename);
        goto out;
    }
    header_encode(&h, buf);
    if (bfile) {
        memcpy(buf + QED_HEADER_BYTES, bfile, strlen(bfile));
    }
    {
        vd_iov iov;
        vd_iov_init_buf(&iov, buf, cs + l1_bytes);
        ret = vd_node_pwritev(file, 0, cs + l1_bytes, &iov, 0, err);
    }
    if (ret < 0) {
        vd_error_prepend(err, "%s: ", filename);
    }
out:
    if (file) {
        vd_node_unref(file);
    }
    vd_opts_free(&popts);
    free(buf);
    free(bfile);
    free(bfmt);
    return ret;
}

const vd_driver vd_driver_qed = {
    .name = "qed",
    .instance_size = sizeof(qed_state),
    .is_format = true,
    .supports_backing = true,
    .create_opts = qed_create_opts,
    .probe = qed_probe,
    .open = qed_open,
    .close = qed_close,
    .create = qed_create,
    .preadv = qed_preadv,
    .pwritev = qed_pwritev,
    .pwrite_zeroes = qed_pwrite_zeroes,
    .flush = qed_flush,
    .block_status = qed_block_status,
    .getlength = qed_getlength,
    .truncate = qed_truncate,
    .get_info = qed_get_info,
    .check = qed_check,
    .change_backing_file = qed_change_backing_file,
};
