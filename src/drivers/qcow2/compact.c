/*
 * qcow2 driver: in-place compaction (vdisk compact, vd_compact()).
 *
 * Moves the clusters in use at the end of the file down into free
 * clusters (holes) below them, rewrites every reference to a moved
 * cluster and truncates the file, keeping internal snapshots, persistent
 * bitmaps, the backing link, the LUKS header and every feature bit.
 *
 * The whole metadata tree is loaded first (refcount blocks, every L1 and
 * L2 table, the snapshot table, the bitmap directory and tables), counted
 * as qemu-img check counts it, and the move planned from the top of the
 * file down. The moves are then done level by level, leaves first (data,
 * bitmap data, the LUKS header; then L2 and bitmap tables; then L1
 * tables and the bitmap directory; then the snapshot table; then the
 * refcount blocks one by one; last the refcount table), each level in
 * four phases with a flush after each:
 *
 *   1. copy every moved cluster to its new place (free until now);
 *   2. give the new clusters the old ones' refcounts;
 *   3. point every reference (L2/L1 entries, bitmap tables and
 *      directory, snapshot table, header) at the new place;
 *   4. set the old clusters' refcounts to 0.
 *
 * so that at every moment each reference names a cluster holding the
 * right bytes with a refcount at least its number of references: a run
 * killed at any point leaves at most leaked clusters (docs/qcow2.md,
 * "Compaction"), which the next run (or qemu-img check -r leaks) gives
 * back before it plans. The file is truncated last.
 *
 * Writes go straight to the file child, not through the metadata caches
 * (they are emptied first; the node is drained), so that the order is
 * exactly the one above; the driver state is brought up to date at the
 * end. VDISK_COMPACT_KILL_AT=N (a test hook) kills the process with
 * SIGKILL before its N-th write, flush or truncate, so that the tests
 * cover every step; VDISK_COMPACT_KILL_AT=count prints the number of
 * steps instead.
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qcow2.h"

/* What a cluster holds: the order in which levels move. */
enum {
    LV_NONE = 0,
    LV_DATA,        /* guest data (plain or compressed), bitmap data,
                       LUKS header: referenced from level LV_TABLE or the
                       header */
    LV_TABLE,       /* L2 tables, bitmap tables */
    LV_TOP,         /* L1 tables, the bitmap directory */
    LV_SNAPTABLE,   /* the snapshot table */
    LV_REFBLOCK,    /* refcount blocks */
    LV_REFTABLE,    /* the refcount table */
    LV_FIXED,       /* the header cluster */
};

typedef struct cp_l1 {
    uint64_t off;
    uint32_t size;
    uint64_t *e;        /* host endian */
    int snap;           /* snapshot index, -1 for the active table */
    bool dirty;
} cp_l1;

typedef struct cp_l2 {
    uint64_t off;
    uint8_t *buf;       /* as on disk (big endian) */
    bool dirty;
} cp_l2;

typedef struct cp_bmt {
    uint64_t off;
    uint32_t n;
    uint64_t *e;        /* host endian */
    size_t dirpos;      /* its entry in the directory */
    bool dirty;
} cp_bmt;

typedef struct cp_ctx {
    qcow2_state *s;
    vd_error *err;
    uint64_t cs;
    int cb;
    uint64_t flen;
    uint64_t nclu;          /* clusters of the file (the last may be part) */
    uint32_t *refs;         /* references found per cluster */
    uint8_t *lvl;           /* LV_* per cluster */
    uint8_t *link;          /* moves together with the next cluster */
    uint8_t *enc;           /* encrypted guest data (IVs by host offset) */
    uint8_t *nocopy;        /* named by an L2 or L1 entry without COPIED */
    uint8_t *force;         /* must move to fix its COPIED flag (below) */
    uint64_t *dest;         /* new cluster index, 0 = stays */
    int32_t *l2of;          /* index into l2[] of the table at a cluster */
    /* refcount blocks by refcount table index (NULL: none) */
    uint8_t **rb;
    bool *rb_dirty;
    cp_l1 *l1;
    size_t nl1;
    cp_l2 *l2;
    size_t nl2, capl2;
    uint8_t *snapraw;       /* the snapshot table as on disk */
    size_t *snappos;        /* each entry's position in it */
    bool snap_dirty;
    uint8_t *bmdir;         /* the bitmap directory as on disk */
    cp_bmt *bmt;
    uint32_t nbmt;
    bool bmdir_dirty;
    bool header_dirty;
    bool data_in_file;      /* guest data clusters live in this file */
    /* progress and the test hook */
    vd_progress_fn progress;
    void *opaque;
    uint64_t moved, moved_done;
    long long kill_at;
    bool count_steps;
    unsigned long long steps;
} cp_ctx;

/* ------------------------------------------------------------------ */
/* Writes: every one is a step the crash test can stop before          */
/* ------------------------------------------------------------------ */

static void cp_step(cp_ctx *c)
{
    c->steps++;
    if (c->kill_at > 0 && (long long)c->steps == c->kill_at) {
        raise(SIGKILL);
    }
}

/* With VDISK_COMPACT_KILL_AT=count: where each phase starts (the steps
 * done before it), so that a test can kill inside any phase. */
static void cp_phase(cp_ctx *c, const char *what, int lv)
{
    static const char *const names[] = {
        "", "data", "tables", "top", "snaptable", "refblocks", "reftable",
    };
    if (c->count_steps) {
        fprintf(stderr, "compact: phase %s%s%s at step %llu\n",
                lv ? names[lv] : "", lv ? "-" : "", what, c->steps);
    }
}

static int cp_write(cp_ctx *c, uint64_t off, const void *buf, uint64_t len)
{
    cp_step(c);
    return vd_child_pwrite(c->s->file, off, buf, len, 0, c->err);
}

static int cp_flush(cp_ctx *c)
{
    cp_step(c);
    return vd_node_flush(c->s->file->node, c->err);
}

static int cp_header(cp_ctx *c)
{
    if (!c->header_dirty) {
        return 0;
    }
    c->header_dirty = false;
    cp_step(c);
    return qcow2_update_header(c->s, c->err);
}

/* ------------------------------------------------------------------ */
/* Counting references (as qemu-img check does)                        */
/* ------------------------------------------------------------------ */

static int cp_mark(cp_ctx *c, uint64_t off, uint64_t bytes, int lvl,
                   const char *what)
{
    if (bytes == 0) {
        return 0;
    }
    uint64_t first = off >> c->cb, last = (off + bytes - 1) >> c->cb;
    if (off + bytes < off || last >= c->nclu) {
        return vd_error_set(c->err, -EINVAL, "%s: %s at 0x%" PRIx64
                            " lies past the end of the file",
                            c->s->filename, what, off);
    }
    for (uint64_t i = first; i <= last; i++) {
        if (c->lvl[i] != LV_NONE && c->lvl[i] != lvl) {
            return vd_error_set(c->err, -EINVAL, "%s: %s at 0x%" PRIx64
                                " overlaps other metadata", c->s->filename,
                                what, off);
        }
        if (c->refs[i] == UINT32_MAX) {
            return vd_error_set(c->err, -EINVAL, "%s: cluster 0x%" PRIx64
                                " has too many references", c->s->filename,
                                i << c->cb);
        }
        c->lvl[i] = (uint8_t)lvl;
        c->refs[i]++;
        if (i < last) {
            c->link[i] = 1;
        }
    }
    return 0;
}

static int cp_read(cp_ctx *c, uint64_t off, void *buf, uint64_t len)
{
    return vd_child_pread(c->s->file, off, buf, len, c->err);
}

/* Loads the L2 table at @off once (tables shared by snapshots are
 * counted once per reference, loaded once). */
static int cp_load_l2(cp_ctx *c, uint64_t off)
{
    uint64_t ci = off >> c->cb;
    int ret;

    if (off & (c->cs - 1)) {
        return vd_error_set(c->err, -EINVAL, "%s: L2 table offset 0x%" PRIx64
                            " is not cluster-aligned", c->s->filename, off);
    }
    ret = cp_mark(c, off, c->cs, LV_TABLE, "L2 table");
    if (ret < 0 || c->l2of[ci] >= 0) {
        return ret;
    }
    if (c->nl2 == c->capl2) {
        size_t n = c->capl2 ? c->capl2 * 2 : 64;
        cp_l2 *t = realloc(c->l2, n * sizeof(*t));
        if (!t) {
            return vd_error_set(c->err, -ENOMEM, "out of memory");
        }
        c->l2 = t;
        c->capl2 = n;
    }
    cp_l2 *t = &c->l2[c->nl2];
    t->off = off;
    t->dirty = false;
    t->buf = malloc(c->cs);
    if (!t->buf) {
        return vd_error_set(c->err, -ENOMEM, "out of memory");
    }
    ret = cp_read(c, off, t->buf, c->cs);
    if (ret < 0) {
        free(t->buf);
        return ret;
    }
    c->l2of[ci] = (int32_t)c->nl2++;
    return 0;
}

static int cp_count_l2(cp_ctx *c, const cp_l2 *t)
{
    qcow2_state *s = c->s;
    int ret = 0;

    for (uint64_t i = 0; i < s->l2_size && ret == 0; i++) {
        uint64_t e = qcow2_get_l2_entry(s, t->buf, i);
        if (e & QCOW2_OFLAG_COMPRESSED) {
            uint64_t host, nb;
            qcow2_parse_compressed(s, e, &host, &nb);
            if (s->data_file != s->file) {
                return vd_error_set(c->err, -EINVAL, "%s: compressed cluster "
                                    "with an external data file",
                                    s->filename);
            }
            ret = cp_mark(c, host, nb, LV_DATA, "compressed cluster");
            continue;
        }
        uint64_t off = e & QCOW2_L2E_OFFSET_MASK;
        if (!off || !c->data_in_file) {
            continue;
        }
        if (off & (c->cs - 1)) {
            return vd_error_set(c->err, -EINVAL, "%s: data cluster offset "
                                "0x%" PRIx64 " is not cluster-aligned",
                                s->filename, off);
        }
        ret = cp_mark(c, off, c->cs, LV_DATA, "data cluster");
        if (ret == 0 && s->crypt_method == QCOW2_CRYPT_LUKS) {
            c->enc[off >> c->cb] = 1;
        }
        if (!(e & QCOW2_OFLAG_COPIED)) {
            c->nocopy[off >> c->cb] = 1;
        }
    }
    return ret;
}

static int cp_add_l1(cp_ctx *c, uint64_t off, uint32_t size, int snap)
{
    cp_l1 *t = &c->l1[c->nl1];
    int ret;

    t->off = off;
    t->size = size;
    t->snap = snap;
    t->dirty = false;
    t->e = NULL;
    if (size == 0) {
        c->nl1++;
        return 0;
    }
    if (off & (c->cs - 1)) {
        return vd_error_set(c->err, -EINVAL, "%s: L1 table offset 0x%" PRIx64
                            " is not cluster-aligned", c->s->filename, off);
    }
    ret = cp_mark(c, off, (uint64_t)size * 8, LV_TOP, "L1 table");
    if (ret == 0) {
        ret = qcow2_read_l1_table(c->s, off, size, 0, &t->e, c->err);
    }
    if (ret < 0) {
        return ret;
    }
    c->nl1++;
    for (uint32_t i = 0; i < size; i++) {
        uint64_t l2 = t->e[i] & QCOW2_L1E_OFFSET_MASK;
        if (l2) {
            /* A table shared by several L1 tables (snapshots) adds a
             * reference to each of its clusters per L1 table, as the
             * refcounts count them (qemu-img check's rule). */
            ret = cp_load_l2(c, l2);
            if (!(t->e[i] & QCOW2_OFLAG_COPIED)) {
                c->nocopy[l2 >> c->cb] = 1;
            }
            if (ret == 0) {
                ret = cp_count_l2(c, &c->l2[c->l2of[l2 >> c->cb]]);
            }
            if (ret < 0) {
                return ret;
            }
        }
    }
    return 0;
}

static uint32_t rd32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return be32toh(v);
}

static uint16_t rd16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return be16toh(v);
}

static uint64_t rd64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return be64toh(v);
}

static void wr64(uint8_t *p, uint64_t v)
{
    v = htobe64(v);
    memcpy(p, &v, 8);
}

/* The snapshot table: entry positions (the table was validated at open;
 * the bounds are checked again, this code writes into it). */
static int cp_load_snapshots(cp_ctx *c)
{
    qcow2_state *s = c->s;
    size_t pos = 0;
    int ret;

    if (s->nb_snapshots == 0) {
        return 0;
    }
    if (s->snapshots_unusable || !s->snapshots) {
        return vd_error_set(c->err, -EINVAL, "%s: the snapshot table is "
                            "damaged", s->filename);
    }
    c->snapraw = malloc(s->snapshots_size);
    c->snappos = calloc(s->nb_snapshots, sizeof(*c->snappos));
    if (!c->snapraw || !c->snappos) {
        return vd_error_set(c->err, -ENOMEM, "out of memory");
    }
    ret = cp_read(c, s->snapshots_offset, c->snapraw, s->snapshots_size);
    if (ret == 0) {
        ret = cp_mark(c, s->snapshots_offset, s->snapshots_size,
                      LV_SNAPTABLE, "snapshot table");
    }
    for (uint32_t i = 0; i < s->nb_snapshots && ret == 0; i++) {
        if (pos + sizeof(qcow2_snapshot_header) > s->snapshots_size) {
            return vd_error_set(c->err, -EINVAL, "%s: snapshot table entry "
                                "%" PRIu32 " is truncated", s->filename, i);
        }
        const uint8_t *p = c->snapraw + pos;
        c->snappos[i] = pos;
        if (rd64(p) != s->snapshots[i].l1_table_offset) {
            return vd_error_set(c->err, -EINVAL, "%s: snapshot table changed "
                                "on disk", s->filename);
        }
        pos += sizeof(qcow2_snapshot_header) + rd32(p + 36) + rd16(p + 12) +
               rd16(p + 14);
        pos = (pos + 7) & ~(size_t)7;
    }
    return ret;
}

/* The bitmap directory and tables (validated at open as QEMU loads
 * them; bitmaps marked in use are moved like the others). */
static int cp_load_bitmaps(cp_ctx *c)
{
    qcow2_state *s = c->s;
    uint64_t size = s->bitmaps_ext.bitmap_directory_size;
    size_t pos = 0;
    int ret;

    if (!qcow2_bitmaps_valid(s) || s->bitmaps_ext.nb_bitmaps == 0) {
        return 0;
    }
    c->bmdir = malloc(size);
    c->bmt = calloc(s->bitmaps_ext.nb_bitmaps, sizeof(*c->bmt));
    if (!c->bmdir || !c->bmt) {
        return vd_error_set(c->err, -ENOMEM, "out of memory");
    }
    ret = cp_read(c, s->bitmaps_ext.bitmap_directory_offset, c->bmdir, size);
    if (ret == 0) {
        ret = cp_mark(c, s->bitmaps_ext.bitmap_directory_offset, size,
                      LV_TOP, "bitmap directory");
    }
    for (uint32_t i = 0; i < s->bitmaps_ext.nb_bitmaps && ret == 0; i++) {
        if (pos + 24 > size) {
            return vd_error_set(c->err, -EINVAL, "%s: bitmap directory "
                                "entry %" PRIu32 " is truncated",
                                s->filename, i);
        }
        const uint8_t *p = c->bmdir + pos;
        cp_bmt *t = &c->bmt[i];
        t->off = rd64(p);
        t->n = rd32(p + 8);
        t->dirpos = pos;
        c->nbmt++;
        ret = cp_mark(c, t->off, (uint64_t)t->n * 8, LV_TABLE,
                      "bitmap table");
        if (ret == 0) {
            ret = qcow2_bitmap_table_load(s, t->off, t->n, &t->e);
            if (ret < 0) {
                vd_error_set(c->err, ret, "%s: cannot load the table of "
                             "bitmap %" PRIu32, s->filename, i);
            }
        }
        for (uint32_t j = 0; j < t->n && ret == 0; j++) {
            uint64_t off = t->e[j] & QCOW2_L2E_OFFSET_MASK;
            if (off) {
                ret = cp_mark(c, off, c->cs, LV_DATA, "bitmap data");
            }
        }
        pos += 24 + rd32(p + 20) + rd16(p + 18);
        pos = (pos + 7) & ~(size_t)7;
    }
    return ret;
}

static int cp_count(cp_ctx *c)
{
    qcow2_state *s = c->s;
    int ret;

    ret = cp_mark(c, 0, c->cs, LV_FIXED, "header");
    if (ret == 0 && s->has_crypto_ext) {
        if (s->crypto_ext_offset & (c->cs - 1)) {
            return vd_error_set(c->err, -EINVAL, "%s: LUKS header offset is "
                                "not cluster-aligned", s->filename);
        }
        ret = cp_mark(c, s->crypto_ext_offset, s->crypto_ext_length, LV_DATA,
                      "LUKS header");
    }
    if (ret == 0) {
        ret = cp_mark(c, s->refcount_table_offset,
                      (uint64_t)s->refcount_table_size * 8, LV_REFTABLE,
                      "refcount table");
    }
    c->rb = calloc(s->refcount_table_size, sizeof(*c->rb));
    c->rb_dirty = calloc(s->refcount_table_size, sizeof(*c->rb_dirty));
    if (ret == 0 && (!c->rb || !c->rb_dirty)) {
        ret = vd_error_set(c->err, -ENOMEM, "out of memory");
    }
    for (uint32_t i = 0; i < s->refcount_table_size && ret == 0; i++) {
        uint64_t off = s->refcount_table[i] & QCOW2_REFT_OFFSET_MASK;
        if (!off) {
            continue;
        }
        if (off & (c->cs - 1)) {
            return vd_error_set(c->err, -EINVAL, "%s: refcount block offset "
                                "0x%" PRIx64 " is not cluster-aligned",
                                s->filename, off);
        }
        ret = cp_mark(c, off, c->cs, LV_REFBLOCK, "refcount block");
        if (ret == 0) {
            c->rb[i] = malloc(c->cs);
            ret = c->rb[i] ? cp_read(c, off, c->rb[i], c->cs)
                           : vd_error_set(c->err, -ENOMEM, "out of memory");
        }
    }
    c->l1 = calloc((size_t)s->nb_snapshots + 1, sizeof(*c->l1));
    if (ret == 0 && !c->l1) {
        ret = vd_error_set(c->err, -ENOMEM, "out of memory");
    }
    if (ret == 0) {
        ret = cp_add_l1(c, s->l1_table_offset, s->l1_size, -1);
    }
    if (ret == 0) {
        ret = cp_load_snapshots(c);
    }
    for (uint32_t i = 0; i < s->nb_snapshots && ret == 0; i++) {
        ret = cp_add_l1(c, s->snapshots[i].l1_table_offset,
                        s->snapshots[i].l1_size, (int)i);
    }
    if (ret == 0) {
        ret = cp_load_bitmaps(c);
    }
    return ret;
}

/* ------------------------------------------------------------------ */
/* Refcounts (in the loaded blocks, written at the phase's end)        */
/* ------------------------------------------------------------------ */

static uint8_t *cp_block_of(cp_ctx *c, uint64_t ci, uint64_t *idx)
{
    uint64_t i = ci >> c->s->refcount_block_bits;
    *idx = i;
    return i < c->s->refcount_table_size ? c->rb[i] : NULL;
}

static uint64_t cp_get_ref(cp_ctx *c, uint64_t ci)
{
    uint64_t idx;
    uint8_t *b = cp_block_of(c, ci, &idx);
    return b ? qcow2_refblock_get(c->s, b, ci & (c->s->refcount_block_size - 1))
             : 0;
}

static int cp_set_ref(cp_ctx *c, uint64_t ci, uint64_t v)
{
    uint64_t idx;
    uint8_t *b = cp_block_of(c, ci, &idx);

    if (!b || v > c->s->refcount_max) {
        return vd_error_set(c->err, -EIO, "%s: cannot set the refcount of "
                            "cluster 0x%" PRIx64, c->s->filename,
                            ci << c->cb);
    }
    if (qcow2_refblock_get(c->s, b, ci & (c->s->refcount_block_size - 1)) !=
        v) {
        qcow2_refblock_set(c->s, b, ci & (c->s->refcount_block_size - 1), v);
        c->rb_dirty[idx] = true;
    }
    return 0;
}

/* Writes the changed refcount blocks and flushes. */
static int cp_commit_refs(cp_ctx *c)
{
    int ret = 0;
    for (uint32_t i = 0; i < c->s->refcount_table_size && ret == 0; i++) {
        if (c->rb_dirty[i]) {
            ret = cp_write(c, c->s->refcount_table[i] & QCOW2_REFT_OFFSET_MASK,
                           c->rb[i], c->cs);
            c->rb_dirty[i] = false;
        }
    }
    return ret < 0 ? ret : cp_flush(c);
}

/* ------------------------------------------------------------------ */
/* Planning                                                            */
/* ------------------------------------------------------------------ */

#define CP_CURSORS 8

static int cp_cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Finds @len free clusters in a row below @limit from *cursor on. */
static uint64_t cp_find(cp_ctx *c, const uint8_t *isfree, uint64_t *cursor,
                        uint64_t len, uint64_t limit)
{
    for (uint64_t p = *cursor; p + len <= limit; p++) {
        uint64_t k = 0;
        while (k < len && isfree[p + k]) {
            k++;
        }
        if (k == len) {
            *cursor = p + len;
            return p;
        }
        if (len > 1) {
            p += k;
        }
    }
    *cursor = c->nclu;
    return 0;
}

/* Decides dest[] for every movable unit, from the top of the file. A
 * hole is a cluster without references whose refcount block exists. */
static int cp_plan(cp_ctx *c)
{
    uint8_t *isfree = calloc(c->nclu, 1);
    uint64_t cur[CP_CURSORS + 1];

    if (!isfree) {
        return vd_error_set(c->err, -ENOMEM, "out of memory");
    }
    for (uint64_t i = 1; i < c->nclu; i++) {
        uint64_t idx;
        isfree[i] = c->refs[i] == 0 && cp_block_of(c, i, &idx) != NULL;
    }
    for (int i = 0; i <= CP_CURSORS; i++) {
        cur[i] = 1;
    }
    /* Forced moves first, to any hole (even one above them). */
    uint64_t fcur = 1;
    for (uint64_t i = 1; i < c->nclu; i++) {
        if (c->force[i]) {
            uint64_t d = cp_find(c, isfree, &fcur, 1, c->nclu);
            if (d) {
                c->dest[i] = d;
                isfree[d] = 0;
                c->moved++;
            } else {
                c->force[i] = 0;   /* stays a leak; a later run moves it */
            }
        }
    }
    for (uint64_t end = c->nclu; end > 1;) {
        uint64_t last = end - 1, start = last;
        if (c->refs[last] == 0) {
            end--;
            continue;
        }
        while (start > 0 && c->link[start - 1]) {
            start--;
        }
        end = start;
        uint64_t len = last - start + 1;
        if (c->lvl[start] == LV_FIXED || c->lvl[start] == LV_NONE ||
            c->dest[start]) {
            continue;
        }
        uint64_t scratch = cur[1];
        uint64_t *cursor = len <= CP_CURSORS ? &cur[len] : &scratch;
        uint64_t d = cp_find(c, isfree, cursor, len, start);
        if (!d) {
            continue;
        }
        for (uint64_t k = 0; k < len; k++) {
            c->dest[start + k] = d + k;
            isfree[d + k] = 0;
        }
        c->moved += len;
    }
    free(isfree);

    /* The greedy pass pairs the highest cluster with the lowest hole, so
     * a run of clusters would land in reverse order: the single-cluster
     * units get the same holes again in ascending order, so that runs
     * stay runs (one read and one write each, and the guest's
     * sequential data stays sequential). */
    if (c->moved == 0) {
        return 0;
    }
    uint64_t *src = malloc(c->moved * sizeof(*src));
    uint64_t *dst = malloc(c->moved * sizeof(*dst));
    uint64_t n = 0;
    if (!src || !dst) {
        free(src);
        free(dst);
        return vd_error_set(c->err, -ENOMEM, "out of memory");
    }
    for (uint64_t i = 1; i < c->nclu; i++) {
        if (c->dest[i] && !c->link[i] && !c->link[i - 1]) {
            src[n] = i;
            dst[n++] = c->dest[i];
        }
    }
    qsort(dst, n, sizeof(*dst), cp_cmp_u64);
    for (uint64_t j = 0; j < n; j++) {
        c->dest[src[j]] = dst[j];
    }
    free(src);
    free(dst);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Moving one level                                                    */
/* ------------------------------------------------------------------ */

#define CP_BATCH (8u << 20)

/* Copies one run of @n clusters from cluster @from to cluster @to inside
 * the file without passing through our buffers (copy_file_range where
 * the protocol has it): 1 when it did, 0 when the caller must read and
 * write, or a negative errno. Not for encrypted clusters (re-encrypted
 * for their new place) nor for a run reaching past the end of the file
 * (its partial last cluster is completed with zeros). */
static int cp_copy_offload(cp_ctx *c, uint64_t from, uint64_t to, uint64_t n)
{
    vd_node *file = c->s->file->node;
    uint64_t bytes = n * c->cs;

    if ((from << c->cb) + bytes > c->flen) {
        return 0;
    }
    for (uint64_t k = 0; k < n; k++) {
        if (c->enc[from + k]) {
            return 0;
        }
    }
    int ret = vd_node_copy_range_to(file, from << c->cb, file, to << c->cb,
                                    bytes, 0, c->err);
    return ret == -ENOTSUP ? 0 : ret < 0 ? ret : 1;
}

/* Copies the moved clusters of level @lv, merging runs. Each run's
 * writeback starts as soon as it is written, so that the disk writes
 * while the next runs are copied and the flush after the copies (which
 * must find every copy on disk) has little left to wait for; and what
 * the page cache holds of the old places goes, as nothing reads them
 * again: the copies reuse that memory instead of growing the cache
 * (which halved the copy phase of bench/compact.sh). */
static int cp_copy(cp_ctx *c, int lv)
{
    uint64_t maxn = CP_BATCH / c->cs ? CP_BATCH / c->cs : 1;
    uint8_t *buf = NULL;
    uint64_t bufn = 0;
    int ret = 0;

    for (uint64_t i = 1; i < c->nclu && ret == 0;) {
        if (!c->dest[i] || c->lvl[i] != lv) {
            i++;
            continue;
        }
        uint64_t n = 1;
        while (i + n < c->nclu && c->dest[i + n] == c->dest[i] + n &&
               c->lvl[i + n] == lv && (n < maxn || c->link[i + n - 1])) {
            n++;
        }
        if (n > bufn) {
            free(buf);
            buf = malloc(n * c->cs);
            bufn = buf ? n : 0;
            if (!buf) {
                return vd_error_set(c->err, -ENOMEM, "out of memory");
            }
        }
        /* One step for the crash test, whichever way the run goes. */
        cp_step(c);
        ret = cp_copy_offload(c, i, c->dest[i], n);
        if (ret == 0) {
            /* The last cluster of the file may be partial. */
            uint64_t bytes = n * c->cs;
            if ((i << c->cb) + bytes > c->flen) {
                memset(buf, 0, bytes);
                bytes = c->flen - (i << c->cb);
            }
            ret = cp_read(c, i << c->cb, buf, bytes);
            for (uint64_t k = 0; k < n && ret == 0; k++) {
                if (c->enc[i + k]) {
                    ret = qcow2_crypt_rehost(c->s, buf + k * c->cs, c->cs,
                                             (i + k) << c->cb,
                                             (c->dest[i] + k) << c->cb,
                                             c->err);
                }
            }
            if (ret == 0) {
                ret = vd_child_pwrite(c->s->file, c->dest[i] << c->cb, buf,
                                      n * c->cs, 0, c->err);
            }
        } else if (ret == 1) {
            ret = 0;
        }
        if (ret == 0) {
            vd_node_advise(c->s->file->node, c->dest[i] << c->cb, n * c->cs,
                           VD_ADVISE_WRITEBACK);
            vd_node_advise(c->s->file->node, i << c->cb, n * c->cs,
                           VD_ADVISE_DONTNEED);
        }
        c->moved_done += n;
        if (c->progress && c->moved) {
            c->progress(5.0 + 90.0 * (double)c->moved_done / (double)c->moved,
                        c->opaque);
        }
        i += n;
    }
    free(buf);
    return ret;
}

/* The new place of a reference to host offset @off (same offset within
 * the cluster), or @off when its cluster stays. */
static uint64_t cp_new(const cp_ctx *c, uint64_t off)
{
    uint64_t ci = off >> c->cb;
    if (ci < c->nclu && c->dest[ci]) {
        return (c->dest[ci] << c->cb) | (off & (c->cs - 1));
    }
    return off;
}

/* Points every reference to a moved cluster of level @lv at its new
 * place, in memory; cp_write_refs() writes them. */
static void cp_rewrite(cp_ctx *c, int lv)
{
    qcow2_state *s = c->s;

    if (lv == LV_DATA) {
        for (size_t t = 0; t < c->nl2; t++) {
            for (uint64_t i = 0; i < s->l2_size; i++) {
                uint64_t e = qcow2_get_l2_entry(s, c->l2[t].buf, i), ne = e;
                if (e & QCOW2_OFLAG_COMPRESSED) {
                    uint64_t off = e & s->cluster_offset_mask;
                    ne = (e & ~s->cluster_offset_mask) | cp_new(c, off);
                } else if (c->data_in_file && (e & QCOW2_L2E_OFFSET_MASK)) {
                    uint64_t off = e & QCOW2_L2E_OFFSET_MASK;
                    ne = (e & ~QCOW2_L2E_OFFSET_MASK) | cp_new(c, off);
                    if (ne != e && c->force[off >> c->cb]) {
                        ne |= QCOW2_OFLAG_COPIED;
                    }
                }
                if (ne != e) {
                    qcow2_set_l2_entry(s, c->l2[t].buf, i, ne);
                    c->l2[t].dirty = true;
                }
            }
        }
        for (uint32_t t = 0; t < c->nbmt; t++) {
            for (uint32_t j = 0; j < c->bmt[t].n; j++) {
                uint64_t e = c->bmt[t].e[j], off = e & QCOW2_L2E_OFFSET_MASK;
                if (off && cp_new(c, off) != off) {
                    c->bmt[t].e[j] = (e & ~QCOW2_L2E_OFFSET_MASK) |
                                     cp_new(c, off);
                    c->bmt[t].dirty = true;
                }
            }
        }
        if (s->has_crypto_ext &&
            cp_new(c, s->crypto_ext_offset) != s->crypto_ext_offset) {
            s->crypto_ext_offset = cp_new(c, s->crypto_ext_offset);
            qcow2_crypt_header_moved(s, s->crypto_ext_offset);
            c->header_dirty = true;
        }
    } else if (lv == LV_TABLE) {
        for (size_t t = 0; t < c->nl1; t++) {
            for (uint32_t i = 0; i < c->l1[t].size; i++) {
                uint64_t e = c->l1[t].e[i], off = e & QCOW2_L1E_OFFSET_MASK;
                if (off && cp_new(c, off) != off) {
                    c->l1[t].e[i] = (e & ~QCOW2_L1E_OFFSET_MASK) |
                                    cp_new(c, off);
                    if (c->force[off >> c->cb]) {
                        c->l1[t].e[i] |= QCOW2_OFLAG_COPIED;
                    }
                    c->l1[t].dirty = true;
                }
            }
        }
        for (size_t t = 0; t < c->nl2; t++) {
            c->l2[t].off = cp_new(c, c->l2[t].off);
        }
        for (uint32_t t = 0; t < c->nbmt; t++) {
            uint64_t off = c->bmt[t].off;
            if (off && cp_new(c, off) != off) {
                c->bmt[t].off = cp_new(c, off);
                wr64(c->bmdir + c->bmt[t].dirpos, c->bmt[t].off);
                c->bmdir_dirty = true;
            }
        }
    } else if (lv == LV_TOP) {
        for (size_t t = 0; t < c->nl1; t++) {
            cp_l1 *l1 = &c->l1[t];
            if (!l1->size || cp_new(c, l1->off) == l1->off) {
                continue;
            }
            l1->off = cp_new(c, l1->off);
            if (l1->snap < 0) {
                s->l1_table_offset = l1->off;
                c->header_dirty = true;
            } else {
                s->snapshots[l1->snap].l1_table_offset = l1->off;
                wr64(c->snapraw + c->snappos[l1->snap], l1->off);
                c->snap_dirty = true;
            }
        }
        if (c->bmdir) {
            uint64_t off = s->bitmaps_ext.bitmap_directory_offset;
            if (cp_new(c, off) != off) {
                s->bitmaps_ext.bitmap_directory_offset = cp_new(c, off);
                c->header_dirty = true;
            }
        }
    } else if (lv == LV_SNAPTABLE) {
        if (s->nb_snapshots &&
            cp_new(c, s->snapshots_offset) != s->snapshots_offset) {
            s->snapshots_offset = cp_new(c, s->snapshots_offset);
            c->header_dirty = true;
        }
    }
}

/* Writes every changed table, lowest level first, then the header. */
static int cp_write_refs(cp_ctx *c)
{
    qcow2_state *s = c->s;
    int ret = 0;

    for (size_t t = 0; t < c->nl2 && ret == 0; t++) {
        if (c->l2[t].dirty) {
            ret = cp_write(c, c->l2[t].off, c->l2[t].buf, c->cs);
            c->l2[t].dirty = false;
        }
    }
    for (uint32_t t = 0; t < c->nbmt && ret == 0; t++) {
        if (c->bmt[t].dirty) {
            uint64_t *be = malloc((size_t)c->bmt[t].n * 8);
            if (!be) {
                return vd_error_set(c->err, -ENOMEM, "out of memory");
            }
            for (uint32_t j = 0; j < c->bmt[t].n; j++) {
                be[j] = htobe64(c->bmt[t].e[j]);
            }
            ret = cp_write(c, c->bmt[t].off, be, (uint64_t)c->bmt[t].n * 8);
            free(be);
            c->bmt[t].dirty = false;
        }
    }
    for (size_t t = 0; t < c->nl1 && ret == 0; t++) {
        if (c->l1[t].dirty) {
            uint64_t *be = malloc((size_t)c->l1[t].size * 8);
            if (!be) {
                return vd_error_set(c->err, -ENOMEM, "out of memory");
            }
            for (uint32_t j = 0; j < c->l1[t].size; j++) {
                be[j] = htobe64(c->l1[t].e[j]);
            }
            ret = cp_write(c, c->l1[t].off, be, (uint64_t)c->l1[t].size * 8);
            free(be);
            c->l1[t].dirty = false;
        }
    }
    if (ret == 0 && c->bmdir_dirty) {
        ret = cp_write(c, s->bitmaps_ext.bitmap_directory_offset, c->bmdir,
                       s->bitmaps_ext.bitmap_directory_size);
        c->bmdir_dirty = false;
    }
    if (ret == 0 && c->snap_dirty) {
        ret = cp_write(c, s->snapshots_offset, c->snapraw, s->snapshots_size);
        c->snap_dirty = false;
    }
    if (ret == 0) {
        ret = cp_header(c);
    }
    return ret < 0 ? ret : cp_flush(c);
}

/* The four phases of one level (LV_DATA .. LV_SNAPTABLE). */
static int cp_move_level(cp_ctx *c, int lv)
{
    bool any = false;
    int ret;

    for (uint64_t i = 1; i < c->nclu && !any; i++) {
        any = c->dest[i] && c->lvl[i] == lv;
    }
    if (!any) {
        return 0;
    }
    cp_phase(c, "copy", lv);
    ret = cp_copy(c, lv);
    if (ret == 0) {
        ret = cp_flush(c);
    }
    cp_phase(c, "count", lv);
    for (uint64_t i = 1; i < c->nclu && ret == 0; i++) {
        if (c->dest[i] && c->lvl[i] == lv) {
            ret = cp_set_ref(c, c->dest[i], c->refs[i]);
        }
    }
    if (ret == 0) {
        ret = cp_commit_refs(c);
    }
    cp_phase(c, "rewrite", lv);
    if (ret == 0) {
        cp_rewrite(c, lv);
        ret = cp_write_refs(c);
    }
    cp_phase(c, "release", lv);
    for (uint64_t i = 1; i < c->nclu && ret == 0; i++) {
        if (c->dest[i] && c->lvl[i] == lv) {
            ret = cp_set_ref(c, i, 0);
        }
    }
    if (ret == 0) {
        ret = cp_commit_refs(c);
    }
    return ret;
}

/* Refcount blocks, one at a time: the new block gets a refcount (in
 * whichever block counts it), then the block's current contents, then
 * the refcount table entry; the old cluster's refcount goes last. */
static int cp_move_refblocks(cp_ctx *c)
{
    qcow2_state *s = c->s;
    int ret = 0;

    for (uint32_t idx = 0; idx < s->refcount_table_size && ret == 0; idx++) {
        uint64_t off = s->refcount_table[idx] & QCOW2_REFT_OFFSET_MASK;
        uint64_t ci = off >> c->cb;
        if (!off || !c->dest[ci]) {
            continue;
        }
        uint64_t d = c->dest[ci];
        cp_phase(c, "move", LV_REFBLOCK);
        ret = cp_set_ref(c, d, 1);
        if (ret == 0) {
            ret = cp_commit_refs(c);
        }
        if (ret == 0) {
            ret = cp_write(c, d << c->cb, c->rb[idx], c->cs);
        }
        if (ret == 0) {
            ret = cp_flush(c);
        }
        if (ret == 0) {
            uint64_t be = htobe64(d << c->cb);
            s->refcount_table[idx] = d << c->cb;
            ret = cp_write(c, s->refcount_table_offset + (uint64_t)idx * 8,
                           &be, 8);
        }
        if (ret == 0) {
            ret = cp_flush(c);
        }
        if (ret == 0) {
            ret = cp_set_ref(c, ci, 0);
        }
        if (ret == 0) {
            ret = cp_commit_refs(c);
        }
        c->moved_done++;
    }
    return ret;
}

/* The refcount table: new clusters counted, the table written there,
 * the header switched, the old clusters given back. */
static int cp_move_reftable(cp_ctx *c)
{
    qcow2_state *s = c->s;
    uint64_t t = s->refcount_table_offset >> c->cb;
    uint64_t n = ((uint64_t)s->refcount_table_size * 8 + c->cs - 1) >> c->cb;
    uint64_t d = c->dest[t];
    uint64_t *be;
    int ret = 0;

    if (!d) {
        return 0;
    }
    cp_phase(c, "move", LV_REFTABLE);
    for (uint64_t k = 0; k < n && ret == 0; k++) {
        ret = cp_set_ref(c, d + k, 1);
    }
    if (ret == 0) {
        ret = cp_commit_refs(c);
    }
    be = malloc(n * c->cs);
    if (!be) {
        return vd_error_set(c->err, -ENOMEM, "out of memory");
    }
    memset(be, 0, n * c->cs);
    for (uint32_t i = 0; i < s->refcount_table_size; i++) {
        be[i] = htobe64(s->refcount_table[i]);
    }
    if (ret == 0) {
        ret = cp_write(c, d << c->cb, be, n * c->cs);
    }
    free(be);
    if (ret == 0) {
        ret = cp_flush(c);
    }
    if (ret == 0) {
        s->refcount_table_offset = d << c->cb;
        c->header_dirty = true;
        ret = cp_header(c);
    }
    for (uint64_t k = 0; k < n && ret == 0; k++) {
        ret = cp_set_ref(c, t + k, 0);
    }
    if (ret == 0) {
        ret = cp_commit_refs(c);
    }
    c->moved_done += n;
    return ret;
}

/* ------------------------------------------------------------------ */
/* The entry point                                                     */
/* ------------------------------------------------------------------ */

static void cp_free(cp_ctx *c)
{
    free(c->refs);
    free(c->lvl);
    free(c->link);
    free(c->enc);
    free(c->nocopy);
    free(c->force);
    free(c->dest);
    free(c->l2of);
    if (c->rb) {
        for (uint32_t i = 0; i < c->s->refcount_table_size; i++) {
            free(c->rb[i]);
        }
    }
    free(c->rb);
    free(c->rb_dirty);
    for (size_t i = 0; i < c->nl1; i++) {
        free(c->l1[i].e);
    }
    free(c->l1);
    for (size_t i = 0; i < c->nl2; i++) {
        free(c->l2[i].buf);
    }
    free(c->l2);
    free(c->snapraw);
    free(c->snappos);
    for (uint32_t i = 0; i < c->nbmt; i++) {
        free(c->bmt[i].e);
    }
    free(c->bmt);
    free(c->bmdir);
}

/* Refuses what compaction cannot move safely. Lock held. */
static int cp_precheck(qcow2_state *s, vd_node *node, bool dry_run,
                       vd_error *err)
{
    if (!dry_run && node->read_only) {
        return vd_error_set(err, -EROFS, "%s: image is read-only",
                            s->filename);
    }
    if (s->incompatible_features &
        (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT)) {
        return vd_error_set(err, -EINVAL, "%s: image is %s; repair it first "
                            "(vdisk check -r all)", s->filename,
                            (s->incompatible_features &
                             QCOW2_INCOMPAT_CORRUPT) ? "marked corrupt"
                                                     : "marked dirty");
    }
    if (s->corrupt) {
        return vd_error_set(err, -EIO, "%s: image is corrupt", s->filename);
    }
    if (s->crypt_method == QCOW2_CRYPT_AES) {
        return vd_error_set(err, -ENOTSUP, "%s: compaction of images with "
                            "the legacy AES encryption is not supported",
                            s->filename);
    }
    return 0;
}

static int compact_once(vd_node *node, bool dry_run, vd_progress_fn progress,
                        void *opaque, vd_compact_result *res,
                        uint64_t *forced, vd_error *err)
{
    qcow2_state *s = node->opaque;
    vd_check_result chk;
    cp_ctx c;
    int64_t flen;
    int ret;

    memset(res, 0, sizeof(*res));
    memset(&c, 0, sizeof(c));
    c.s = s;
    c.err = err;
    c.cs = s->cluster_size;
    c.cb = s->cluster_bits;
    c.progress = progress;
    c.opaque = opaque;
    c.data_in_file = s->data_file == s->file;
    const char *k = getenv("VDISK_COMPACT_KILL_AT");
    if (k && !dry_run) {
        c.count_steps = strcmp(k, "count") == 0;
        c.kill_at = c.count_steps ? 0 : atoll(k);
    }

    /* Marked dirty by this session's own writes (lazy refcounts): the
     * open repaired what an earlier one left, and every refcount since
     * is in the caches, so writing them out makes the image clean, as
     * close would. A dirty mark from elsewhere is refused below. */
    if (!dry_run && s->dirty_marked && !s->corrupt &&
        (s->incompatible_features & QCOW2_INCOMPAT_DIRTY)) {
        pthread_mutex_lock(&s->lock);
        ret = qcow2_mark_clean(s, err);
        pthread_mutex_unlock(&s->lock);
        if (ret < 0) {
            return ret;
        }
    }
    /* A dirty or corrupt mark is named as such, not as what the check
     * would find behind it (refcounts a crash left behind). */
    pthread_mutex_lock(&s->lock);
    ret = cp_precheck(s, node, dry_run, err);
    pthread_mutex_unlock(&s->lock);
    if (ret < 0) {
        return ret;
    }
    /* What qemu-img check finds corrupt is refused before anything is
     * written; leaks are given back by the run. */
    ret = qcow2_check(node, &chk, 0, err);
    if (ret < 0) {
        return ret;
    }
    if (chk.corruptions || chk.check_errors) {
        return vd_error_set(err, -EIO, "%s: image is corrupt (check found %"
                            PRId64 " corruptions and %" PRId64 " errors); "
                            "nothing was changed", s->filename,
                            chk.corruptions, chk.check_errors);
    }

    pthread_mutex_lock(&s->lock);
    ret = cp_precheck(s, node, dry_run, err);
    if (ret < 0) {
        goto out;
    }
    if (!dry_run) {
        /* The bitmaps were not loaded (vd_compact() opens nothing, the
         * caller opened with VD_O_NO_BITMAPS or stored them): they are
         * moved as they are and stay valid, so the autoclear bit that a
         * writable open withholds until a load stays. */
        if (s->bitmaps_autoclear_deferred) {
            s->autoclear_features |= QCOW2_AUTOCLEAR_BITMAPS;
            s->bitmaps_autoclear_deferred = false;
        }
        ret = qcow2_flush_caches(s, err);
        if (ret == 0) {
            ret = qcow2_begin_change(s, err);
        }
        if (ret == 0 && (qcow2_cache_empty(s->l2_cache) < 0 ||
                         qcow2_cache_empty(s->refcount_cache) < 0)) {
            ret = vd_error_set(err, -EBUSY, "%s: metadata cache in use",
                               s->filename);
        }
        if (ret < 0) {
            goto out;
        }
    }
    flen = vd_node_getlength(s->file->node);
    if (flen < 0) {
        ret = vd_error_set_errno(err, (int)flen, "%s: cannot get the file "
                                 "size", s->filename);
        goto out;
    }
    c.flen = (uint64_t)flen;
    c.nclu = (c.flen + c.cs - 1) >> c.cb;
    if (c.nclu < 1 || c.nclu > INT32_MAX) {
        ret = vd_error_set(err, -EFBIG, "%s: the file is too large to "
                           "compact", s->filename);
        goto out;
    }
    c.refs = calloc(c.nclu, sizeof(*c.refs));
    c.lvl = calloc(c.nclu, 1);
    c.link = calloc(c.nclu, 1);
    c.enc = calloc(c.nclu, 1);
    c.nocopy = calloc(c.nclu, 1);
    c.force = calloc(c.nclu, 1);
    c.dest = calloc(c.nclu, sizeof(*c.dest));
    c.l2of = malloc(c.nclu * sizeof(*c.l2of));
    if (!c.refs || !c.lvl || !c.link || !c.enc || !c.dest || !c.l2of ||
        !c.nocopy || !c.force) {
        ret = vd_error_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    memset(c.l2of, 0xff, c.nclu * sizeof(*c.l2of));
    ret = cp_count(&c);
    if (ret < 0) {
        goto out;
    }
    /* The count must agree with the refcounts: a refcount below the
     * references would be a corruption check missed. */
    for (uint64_t i = 0; i < c.nclu; i++) {
        if (cp_get_ref(&c, i) < c.refs[i]) {
            ret = vd_error_set(err, -EIO, "%s: cluster 0x%" PRIx64 " has "
                               "refcount %" PRIu64 " but %" PRIu32
                               " references; nothing was changed",
                               s->filename, i << c.cb, cp_get_ref(&c, i),
                               c.refs[i]);
            goto out;
        }
    }
    /* A killed run can leave a cluster that several tables shared (no
     * COPIED flag in their entries) named by one entry only, with its
     * refcount above 1 (a leak). Lowering the refcount to 1 would make
     * the entry's missing COPIED flag an error for qemu-img check, and
     * no order of two writes avoids that; such a cluster moves instead,
     * to a cluster given refcount 1, and the entry that names the new
     * place has the flag. */
    for (uint64_t i = 1; i < c.nclu; i++) {
        c.force[i] = c.refs[i] == 1 && c.nocopy[i] &&
                     (c.lvl[i] == LV_DATA || c.lvl[i] == LV_TABLE) &&
                     cp_get_ref(&c, i) > 1;
    }
    ret = cp_plan(&c);
    if (ret < 0) {
        goto out;
    }
    for (uint64_t i = 1; i < c.nclu; i++) {
        *forced += c.force[i] && c.dest[i];
    }
    if (c.count_steps) {
        fprintf(stderr, "compact: %" PRIu64 " clusters move for their "
                "COPIED flag\n", *forced);
    }
    uint64_t new_end = 1;
    for (uint64_t i = 0; i < c.nclu; i++) {
        if (c.refs[i]) {
            uint64_t p = c.dest[i] ? c.dest[i] : i;
            new_end = p + 1 > new_end ? p + 1 : new_end;
        }
    }
    res->original_size = c.flen;
    res->new_size = new_end << c.cb < c.flen ? new_end << c.cb : c.flen;
    res->moved_clusters = c.moved;
    res->cluster_size = c.cs;
    if (dry_run) {
        ret = 0;
        goto out;
    }
    if (progress) {
        progress(0.0, opaque);
    }

    cp_phase(&c, "leaks", 0);
    /* Leaks first (a killed run leaves some): a refcount above the
     * references drops to them, which changes no reference. */
    for (uint32_t i = 0; i < s->refcount_table_size && ret == 0; i++) {
        if (!c.rb[i]) {
            continue;
        }
        for (uint64_t j = 0; j < s->refcount_block_size && ret == 0; j++) {
            uint64_t ci = ((uint64_t)i << s->refcount_block_bits) + j;
            uint64_t want = ci < c.nclu ? c.refs[ci] : 0;
            if (ci < c.nclu && c.force[ci]) {
                continue;       /* given back when it has moved */
            }
            if (qcow2_refblock_get(s, c.rb[i], j) > want) {
                ret = cp_set_ref(&c, ci, want);
            }
        }
    }
    if (ret == 0) {
        ret = cp_commit_refs(&c);
    }
    for (int lv = LV_DATA; lv <= LV_SNAPTABLE && ret == 0; lv++) {
        ret = cp_move_level(&c, lv);
    }
    if (ret == 0) {
        ret = cp_move_refblocks(&c);
    }
    if (ret == 0) {
        ret = cp_move_reftable(&c);
    }
    /* Nothing names the tail any more, and that is on disk (the flushes
     * above): a crash before the truncation reaches the disk leaves a
     * longer file whose tail no reference names, with refcount 0, which
     * qemu-img check finds clean. The flush after it only makes the new
     * size durable before the command returns (a fraction of a
     * millisecond). The truncation waits for the file system to free the
     * tail (ext4 mounted with -o discard and without a journal sends one
     * discard per freed extent and waits for each); it cannot overlap
     * the copies, which write under the same inode lock (docs/qcow2.md,
     * "Performance"). */
    if (ret == 0 && res->new_size < c.flen) {
        cp_phase(&c, "truncate", 0);
        cp_step(&c);
        ret = vd_node_truncate(s->file->node, res->new_size, true,
                               VD_PREALLOC_OFF, err);
        if (ret == 0) {
            ret = cp_flush(&c);
        }
    }
    /* The driver's state follows what is on disk now. */
    if (c.nl1 && c.l1[0].size && s->l1_table) {
        memcpy(s->l1_table, c.l1[0].e, (size_t)c.l1[0].size * 8);
    }
    s->free_cluster_index = 0;
    s->free_byte_offset = 0;
    if (s->alloc_end > new_end) {
        s->alloc_end = new_end;
    }
    if (s->grown_to > res->new_size) {
        s->grown_to = 0;
        s->grown_from = 0;
    }
    qcow2_overlap_snapshots_changed(s);
    if (c.count_steps) {
        fprintf(stderr, "compact: %llu steps\n", c.steps);
    }
    if (ret == 0 && progress) {
        progress(100.0, opaque);
    }
out:
    pthread_mutex_unlock(&s->lock);
    cp_free(&c);
    return ret;
}

int qcow2_compact(vd_node *node, bool dry_run, vd_progress_fn progress,
                  void *opaque, vd_compact_result *res, vd_error *err)
{
    uint64_t forced = 0;
    int ret = compact_once(node, dry_run, progress, opaque, res, &forced,
                           err);

    /* Clusters moved for their COPIED flag (after a killed run) went to
     * the lowest holes before the plan of the rest: a second pass packs
     * what that left (it has no such cluster left to move). */
    if (ret == 0 && !dry_run && forced) {
        vd_compact_result again;
        forced = 0;
        ret = compact_once(node, false, progress, opaque, &again, &forced,
                           err);
        if (ret == 0) {
            res->new_size = again.new_size;
            res->moved_clusters += again.moved_clusters;
        }
    }
    return ret;
}
