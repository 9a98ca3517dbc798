/*
 * qcow2 metadata overlap checks and cache cleaning, as QEMU 7.2's
 * qcow2_check_metadata_overlap() and cache-clean-interval.
 *
 * Organisation: the option parsing (overlap-check as a mode or a
 * template, one boolean per structure); the walks, one per list of
 * structures (L2 tables, refcount blocks, snapshot L1 tables and their
 * L2 tables), which define what "overlaps" means exactly as QEMU does;
 * the sorted range sets that answer the same question by binary search;
 * the check itself (fixed structures by one compare each, lists from the
 * sets, in QEMU's order so the structure named in the message is the one
 * QEMU names); the pre-write hook that turns an overlap into a corruption
 * event; and last the lazy cache cleaner.
 *
 * Why: a corrupt refcount or L2 entry can make the driver believe a
 * metadata cluster is free or is guest data; writing there would destroy
 * the image for good. QEMU walks the L1 and refcount tables on every
 * write (and in "all" mode reads every snapshot L1 table); we keep the
 * same answers but look them up in sets rebuilt only when the metadata
 * moves (qcow2_overlap_changed() and qcow2_overlap_snapshots_changed()),
 * so a guest write costs O(log n).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "drivers/qcow2/qcow2.h"

/* Option names and message names, indexed by bit number. */
static const char *const ol_opt_names[] = {
    "main-header", "active-l1", "active-l2", "refcount-table",
    "refcount-block", "snapshot-table", "inactive-l1", "inactive-l2",
    "bitmap-directory",
};
static const char *const ol_names[] = {
    "qcow2_header", "active L1 table", "active L2 table", "refcount table",
    "refcount block", "snapshot table", "inactive L1 table",
    "inactive L2 table", "bitmap directory",
};
#define OL_COUNT ((int)(sizeof(ol_names) / sizeof(ol_names[0])))

static int parse_mode(qcow2_state *s, const char *key, const char *v,
                      int *out, vd_error *err)
{
    if (!strcmp(v, "none")) {
        *out = 0;
    } else if (!strcmp(v, "constant")) {
        *out = QCOW2_OL_CONSTANT;
    } else if (!strcmp(v, "cached")) {
        *out = QCOW2_OL_CACHED;
    } else if (!strcmp(v, "all")) {
        *out = QCOW2_OL_ALL;
    } else {
        return vd_error_set(err, -EINVAL, "%s: Unsupported value '%s' for "
                            "qcow2 option '%s'. Allowed are any of the "
                            "following: none, constant, cached, all",
                            s->filename, v, key);
    }
    return 0;
}

int qcow2_parse_overlap_opts(qcow2_state *s, vd_opts *opts, vd_error *err)
{
    char *mode = vd_opts_take(opts, "overlap-check");
    char *tmpl = vd_opts_take(opts, "overlap-check.template");
    int bits = QCOW2_OL_CACHED, ret = 0;

    if (mode && tmpl && strcmp(mode, tmpl) != 0) {
        ret = vd_error_set(err, -EINVAL, "%s: Conflicting values for qcow2 "
                           "options 'overlap-check' ('%s') and "
                           "'overlap-check.template' ('%s')", s->filename,
                           mode, tmpl);
    } else if (mode || tmpl) {
        ret = parse_mode(s, mode ? "overlap-check" : "overlap-check.template",
                         mode ? mode : tmpl, &bits, err);
    }
    for (int i = 0; ret == 0 && i < OL_COUNT; i++) {
        char key[64];
        bool on;
        snprintf(key, sizeof(key), "overlap-check.%s", ol_opt_names[i]);
        ret = vd_opts_take_bool(opts, key, (bits >> i) & 1, &on, err);
        bits = on ? bits | (1 << i) : bits & ~(1 << i);
    }
    free(mode);
    free(tmpl);
    s->overlap_check = bits;
    return ret;
}

static bool overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return alen && blen && a < b + blen && b < a + alen;
}

/* ------------------------------------------------------------------ */
/* The walks: the reference semantics, one per kind of list            */
/* ------------------------------------------------------------------ */

/*
 * Each walk answers for one structure kind by looking at every entry, as
 * QEMU does. They are the definition the range sets below must agree
 * with, and the fallback when a set cannot be built (no memory, an
 * unreadable snapshot L1 table, too many inactive L2 tables).
 */
static bool walk_inactive_l1(qcow2_state *s, uint64_t off, uint64_t size)
{
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        if (overlaps(off, size, s->snapshots[i].l1_table_offset,
                     (uint64_t)s->snapshots[i].l1_size * 8)) {
            return true;
        }
    }
    return false;
}

static bool walk_active_l2(qcow2_state *s, uint64_t off, uint64_t size)
{
    for (uint32_t i = 0; i < s->l1_size; i++) {
        uint64_t l2 = s->l1_table[i] & QCOW2_L1E_OFFSET_MASK;
        if (l2 && overlaps(off, size, l2, s->cluster_size)) {
            return true;
        }
    }
    return false;
}

static bool walk_refblocks(qcow2_state *s, uint64_t off, uint64_t size)
{
    for (uint32_t i = 0; i < s->refcount_table_size; i++) {
        uint64_t rb = s->refcount_table[i] & QCOW2_REFT_OFFSET_MASK;
        if (rb && overlaps(off, size, rb, s->cluster_size)) {
            return true;
        }
    }
    return false;
}

/* An unreadable entry ends that snapshot's walk, as it always did. */
static bool walk_inactive_l2(qcow2_state *s, uint64_t off, uint64_t size)
{
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        uint64_t l1_off = s->snapshots[i].l1_table_offset;
        uint32_t n = s->snapshots[i].l1_size;
        for (uint32_t j = 0; j < n; j++) {
            uint64_t e;
            if (vd_child_pread(s->file, l1_off + (uint64_t)j * 8, &e, 8,
                               NULL) < 0) {
                break;
            }
            e = be64toh(e) & QCOW2_L1E_OFFSET_MASK;
            if (e && overlaps(off, size, e, s->cluster_size)) {
                return true;
            }
        }
    }
    return false;
}

/* ------------------------------------------------------------------ */
/* Sorted range sets                                                   */
/* ------------------------------------------------------------------ */

/*
 * L2 tables and refcount blocks are one cluster each, so their set is a
 * sorted array of start offsets: [off, end) meets one iff the first start
 * past off - cluster_size lies before end. Inactive L1 tables differ in
 * length; their set is sorted by start with the running maximum of the
 * ends, so the ranges starting before end meet [off, end) iff the
 * largest of their ends is past off. Both answers are exactly the walk's
 * "some entry overlaps", duplicates and overlapping entries included.
 *
 * The sets are rebuilt lazily, under the state lock like everything they
 * mirror: the active ones (active L2, refcount blocks) when overlap_gen
 * moved, the snapshot ones when overlap_snap_gen moved. The pointer and
 * size fingerprints are a second guard: a table replaced without a bump
 * still forces a rebuild.
 */

/* Bound on inactive L2 offsets kept (8 bytes each) before giving up and
 * walking: snapshots mostly share L2 tables, so this is rarely reached. */
#define OL_MAX_INACTIVE_L2 (1u << 22)

#define OL_ACTIVE_KINDS (QCOW2_OL_ACTIVE_L2 | QCOW2_OL_REFCOUNT_BLOCK)
#define OL_SNAP_KINDS   (QCOW2_OL_INACTIVE_L1 | QCOW2_OL_INACTIVE_L2)

/* The kinds whose sets are kept: the checked ones, or all of them in the
 * self-checking build (see qcow2_check_metadata_overlap()). */
#ifdef QCOW2_OVERLAP_VERIFY
#define OL_KEPT(s) QCOW2_OL_ALL
#else
#define OL_KEPT(s) ((s)->overlap_check)
#endif

typedef struct ol_starts {
    uint64_t *v;            /* sorted cluster start offsets */
    size_t n, cap;
} ol_starts;

typedef struct ol_range {
    uint64_t start, end;    /* end as the walk computes it (may wrap) */
} ol_range;

struct qcow2_overlap_cache {
    bool active_built, snap_built;
    int active_kinds, snap_kinds;   /* kinds the built sets cover */
    int slow;                       /* kinds answered by their walk */
    uint64_t gen, snap_gen;
    /* fingerprints of what the sets were built from */
    const uint64_t *l1_table;
    uint32_t l1_size;
    const uint64_t *refcount_table;
    uint32_t refcount_table_size;
    const qcow2_snapshot *snapshots;
    uint32_t nb_snapshots;

    ol_starts active_l2, refblocks, inactive_l2;
    ol_range *inactive_l1;          /* sorted by start */
    uint64_t *inactive_l1_maxend;   /* running maximum of the ends */
    size_t nb_inactive_l1;
};

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* By start, then end: one order for equal inputs (the self-check
 * compares sets built at different times). */
static int cmp_range(const void *a, const void *b)
{
    const ol_range *x = a, *y = b;
    int r = cmp_u64(&x->start, &y->start);
    return r ? r : cmp_u64(&x->end, &y->end);
}

static int starts_push(ol_starts *st, uint64_t v)
{
    if (st->n == st->cap) {
        size_t cap = st->cap ? st->cap * 2 : 64;
        uint64_t *nv = realloc(st->v, cap * sizeof(*nv));
        if (!nv) {
            return -ENOMEM;
        }
        st->v = nv;
        st->cap = cap;
    }
    st->v[st->n++] = v;
    return 0;
}

/* Sorts (tables are usually laid out in order already: skip the sort
 * then) and drops duplicates. */
static void starts_finish(ol_starts *st)
{
    size_t i, k;

    for (i = 1; i < st->n && st->v[i - 1] <= st->v[i]; i++) {
    }
    if (i < st->n) {
        qsort(st->v, st->n, sizeof(*st->v), cmp_u64);
    }
    for (i = k = 0; i < st->n; i++) {
        if (!k || st->v[k - 1] != st->v[i]) {
            st->v[k++] = st->v[i];
        }
    }
    st->n = k;
}

/* Whether a cluster starting at one of the offsets meets [off, end),
 * with off < end or end wrapped past zero as the walk lets it. */
static bool starts_hit(const ol_starts *st, uint64_t cs, uint64_t off,
                       uint64_t end)
{
    size_t lo = 0, hi = st->n;

    /* First start whose cluster ends past off (starts are < 2^56, so
     * start + cs does not wrap). */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (st->v[mid] + cs > off) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    return lo < st->n && st->v[lo] < end;
}

static void starts_reset(ol_starts *st)
{
    free(st->v);
    *st = (ol_starts){ 0 };
}

/* The number of snapshot L1 tables (sorted by start) starting before
 * @x. */
static size_t inactive_l1_before(const struct qcow2_overlap_cache *c,
                                 uint64_t x)
{
    size_t lo = 0, hi = c->nb_inactive_l1;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (c->inactive_l1[mid].start < x) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

static bool inactive_l1_hit(const struct qcow2_overlap_cache *c,
                            uint64_t off, uint64_t end)
{
    size_t before = inactive_l1_before(c, end);

    return before && c->inactive_l1_maxend[before - 1] > off;
}

static void free_active(struct qcow2_overlap_cache *c)
{
    starts_reset(&c->active_l2);
    starts_reset(&c->refblocks);
    c->slow &= ~OL_ACTIVE_KINDS;
    c->active_built = false;
}

static void free_snap(struct qcow2_overlap_cache *c)
{
    starts_reset(&c->inactive_l2);
    free(c->inactive_l1);
    free(c->inactive_l1_maxend);
    c->inactive_l1 = NULL;
    c->inactive_l1_maxend = NULL;
    c->nb_inactive_l1 = 0;
    c->slow &= ~OL_SNAP_KINDS;
    c->snap_built = false;
}

void qcow2_overlap_free(qcow2_state *s)
{
    if (s->overlap_cache) {
        free_active(s->overlap_cache);
        free_snap(s->overlap_cache);
        free(s->overlap_cache);
        s->overlap_cache = NULL;
    }
}

static void build_active(qcow2_state *s, struct qcow2_overlap_cache *c,
                         int kinds)
{
    free_active(c);
    if ((kinds & QCOW2_OL_ACTIVE_L2) && s->l1_table) {
        for (uint32_t i = 0; i < s->l1_size; i++) {
            uint64_t l2 = s->l1_table[i] & QCOW2_L1E_OFFSET_MASK;
            if (l2 && starts_push(&c->active_l2, l2) < 0) {
                starts_reset(&c->active_l2);
                c->slow |= QCOW2_OL_ACTIVE_L2;
                break;
            }
        }
        starts_finish(&c->active_l2);
    }
    if ((kinds & QCOW2_OL_REFCOUNT_BLOCK) && s->refcount_table) {
        for (uint32_t i = 0; i < s->refcount_table_size; i++) {
            uint64_t rb = s->refcount_table[i] & QCOW2_REFT_OFFSET_MASK;
            if (rb && starts_push(&c->refblocks, rb) < 0) {
                starts_reset(&c->refblocks);
                c->slow |= QCOW2_OL_REFCOUNT_BLOCK;
                break;
            }
        }
        starts_finish(&c->refblocks);
    }
    c->active_kinds = kinds;
    c->gen = s->overlap_gen;
    c->l1_table = s->l1_table;
    c->l1_size = s->l1_size;
    c->refcount_table = s->refcount_table;
    c->refcount_table_size = s->refcount_table_size;
    c->active_built = true;
}

static int build_inactive_l1(qcow2_state *s, struct qcow2_overlap_cache *c)
{
    size_t n = 0;

    c->inactive_l1 = malloc((s->nb_snapshots ? s->nb_snapshots : 1) *
                            sizeof(*c->inactive_l1));
    c->inactive_l1_maxend = malloc((s->nb_snapshots ? s->nb_snapshots : 1) *
                                   sizeof(*c->inactive_l1_maxend));
    if (!c->inactive_l1 || !c->inactive_l1_maxend) {
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        uint64_t start = s->snapshots[i].l1_table_offset;
        uint64_t len = (uint64_t)s->snapshots[i].l1_size * 8;
        if (len) {      /* an empty table overlaps nothing */
            c->inactive_l1[n++] = (ol_range){ start, start + len };
        }
    }
    qsort(c->inactive_l1, n, sizeof(*c->inactive_l1), cmp_range);
    for (size_t i = 0; i < n; i++) {
        uint64_t e = c->inactive_l1[i].end;
        c->inactive_l1_maxend[i] =
            i && c->inactive_l1_maxend[i - 1] > e ? c->inactive_l1_maxend[i - 1]
                                                  : e;
    }
    c->nb_inactive_l1 = n;
    return 0;
}

/* Reads every snapshot L1 table once. Any failure (read error, memory,
 * too many tables) leaves the kind to its walk, which reads entry by
 * entry and so treats a partly unreadable table as it always did. */
static int build_inactive_l2(qcow2_state *s, struct qcow2_overlap_cache *c)
{
    enum { CHUNK = 8192 };      /* entries per read */
    uint64_t *buf = malloc(CHUNK * 8);
    int ret = 0;

    if (!buf) {
        return -ENOMEM;
    }
    for (uint32_t i = 0; ret == 0 && i < s->nb_snapshots; i++) {
        uint64_t l1_off = s->snapshots[i].l1_table_offset;
        uint32_t size = s->snapshots[i].l1_size;
        for (uint32_t j = 0; ret == 0 && j < size; j += CHUNK) {
            uint32_t n = size - j < CHUNK ? size - j : CHUNK;
            ret = vd_child_pread(s->file, l1_off + (uint64_t)j * 8, buf,
                                 (uint64_t)n * 8, NULL);
            for (uint32_t k = 0; ret == 0 && k < n; k++) {
                uint64_t e = be64toh(buf[k]) & QCOW2_L1E_OFFSET_MASK;
                if (!e) {
                    continue;
                }
                if (c->inactive_l2.n == OL_MAX_INACTIVE_L2) {
                    starts_finish(&c->inactive_l2);
                    if (c->inactive_l2.n > OL_MAX_INACTIVE_L2 / 2) {
                        ret = -EFBIG;
                        break;
                    }
                }
                ret = starts_push(&c->inactive_l2, e);
            }
        }
    }
    free(buf);
    if (ret == 0) {
        starts_finish(&c->inactive_l2);
    }
    return ret < 0 ? ret : 0;
}

static void build_snap(qcow2_state *s, struct qcow2_overlap_cache *c,
                       int kinds)
{
    free_snap(c);
    if ((kinds & QCOW2_OL_INACTIVE_L1) && s->snapshots &&
        build_inactive_l1(s, c) < 0) {
        free(c->inactive_l1);
        free(c->inactive_l1_maxend);
        c->inactive_l1 = NULL;
        c->inactive_l1_maxend = NULL;
        c->slow |= QCOW2_OL_INACTIVE_L1;
    }
    if ((kinds & QCOW2_OL_INACTIVE_L2) && s->snapshots &&
        build_inactive_l2(s, c) < 0) {
        starts_reset(&c->inactive_l2);
        c->slow |= QCOW2_OL_INACTIVE_L2;
    }
    c->snap_kinds = kinds;
    c->snap_gen = s->overlap_snap_gen;
    c->snapshots = s->snapshots;
    c->nb_snapshots = s->nb_snapshots;
    c->snap_built = true;
}

/* Makes the sets @chk needs current; NULL (walk everything) without
 * memory for the cache itself. The sets kept are those of the
 * overlap-check option plus any kind a caller asked for explicitly
 * (qcow2_metadata_overlap_kinds(): validation before writes), so that
 * alternating callers do not rebuild them. */
static struct qcow2_overlap_cache *get_cache(qcow2_state *s, int chk)
{
    struct qcow2_overlap_cache *c = s->overlap_cache;
    int active, snap;

    if (!c) {
        c = s->overlap_cache = calloc(1, sizeof(*c));
        if (!c) {
            return NULL;
        }
    }
    active = (OL_KEPT(s) | chk | (c->active_built ? c->active_kinds : 0)) &
             OL_ACTIVE_KINDS;
    snap = (OL_KEPT(s) | chk | (c->snap_built ? c->snap_kinds : 0)) &
           OL_SNAP_KINDS;
    if ((chk & OL_ACTIVE_KINDS) &&
        (!c->active_built || c->gen != s->overlap_gen ||
         c->active_kinds != active || c->l1_table != s->l1_table ||
         c->l1_size != s->l1_size || c->refcount_table != s->refcount_table ||
         c->refcount_table_size != s->refcount_table_size)) {
        build_active(s, c, active);
    }
    if ((chk & OL_SNAP_KINDS) &&
        (!c->snap_built || c->snap_gen != s->overlap_snap_gen ||
         c->snap_kinds != snap || c->snapshots != s->snapshots ||
         c->nb_snapshots != s->nb_snapshots)) {
        build_snap(s, c, snap);
    }
    return c;
}

/* ------------------------------------------------------------------ */
/* The check                                                           */
/* ------------------------------------------------------------------ */

/* Whether structures of list kind @kind meet [off, off+size), from the
 * set when there is one, else by walking. */
static bool list_hit(qcow2_state *s, const struct qcow2_overlap_cache *c,
                     int kind, uint64_t off, uint64_t size)
{
    uint64_t end = off + size, cs = s->cluster_size;

    if (!c || (c->slow & kind)) {
        switch (kind) {
        case QCOW2_OL_INACTIVE_L1:
            return walk_inactive_l1(s, off, size);
        case QCOW2_OL_ACTIVE_L2:
            return walk_active_l2(s, off, size);
        case QCOW2_OL_REFCOUNT_BLOCK:
            return walk_refblocks(s, off, size);
        default:
            return walk_inactive_l2(s, off, size);
        }
    }
    switch (kind) {
    case QCOW2_OL_INACTIVE_L1:
        return inactive_l1_hit(c, off, end);
    case QCOW2_OL_ACTIVE_L2:
        return starts_hit(&c->active_l2, cs, off, end);
    case QCOW2_OL_REFCOUNT_BLOCK:
        return starts_hit(&c->refblocks, cs, off, end);
    default:
        return starts_hit(&c->inactive_l2, cs, off, end);
    }
}

/*
 * The structures are tested in QEMU's order so that the one named in the
 * message is the one QEMU names; the fixed ones are single compares, the
 * lists are binary searches in the sets (the walks when
 * @use_sets is false, which is also the reference for the self-check).
 */
static int check_overlap(qcow2_state *s, int chk, uint64_t offset,
                         uint64_t size, bool use_sets)
{
    uint64_t cs = s->cluster_size;
    const struct qcow2_overlap_cache *c = NULL;

    if ((chk & QCOW2_OL_MAIN_HEADER) && offset < cs) {
        return QCOW2_OL_MAIN_HEADER;
    }
    /* Whole clusters, as the structures own whole clusters. */
    size = qcow2_start_of_cluster(s, offset + size + cs - 1) -
           qcow2_start_of_cluster(s, offset);
    offset = qcow2_start_of_cluster(s, offset);
    if (!size) {
        return 0;   /* overlaps nothing, as every compare below says */
    }

    if ((chk & QCOW2_OL_ACTIVE_L1) && s->l1_size &&
        overlaps(offset, size, s->l1_table_offset, (uint64_t)s->l1_size * 8)) {
        return QCOW2_OL_ACTIVE_L1;
    }
    if ((chk & QCOW2_OL_REFCOUNT_TABLE) &&
        overlaps(offset, size, s->refcount_table_offset,
                 (uint64_t)s->refcount_table_size * 8)) {
        return QCOW2_OL_REFCOUNT_TABLE;
    }
    if ((chk & QCOW2_OL_SNAPSHOT_TABLE) && s->nb_snapshots &&
        overlaps(offset, size, s->snapshots_offset, s->snapshots_size)) {
        return QCOW2_OL_SNAPSHOT_TABLE;
    }
    if (use_sets && (chk & (OL_ACTIVE_KINDS | OL_SNAP_KINDS))) {
        c = get_cache(s, chk);
    }
    if ((chk & QCOW2_OL_INACTIVE_L1) && s->snapshots &&
        list_hit(s, c, QCOW2_OL_INACTIVE_L1, offset, size)) {
        return QCOW2_OL_INACTIVE_L1;
    }
    if ((chk & QCOW2_OL_ACTIVE_L2) && s->l1_table &&
        list_hit(s, c, QCOW2_OL_ACTIVE_L2, offset, size)) {
        return QCOW2_OL_ACTIVE_L2;
    }
    if ((chk & QCOW2_OL_REFCOUNT_BLOCK) && s->refcount_table &&
        list_hit(s, c, QCOW2_OL_REFCOUNT_BLOCK, offset, size)) {
        return QCOW2_OL_REFCOUNT_BLOCK;
    }
    /* From the sets, "all" mode no longer reads every snapshot L1 table
     * per write. */
    if ((chk & QCOW2_OL_INACTIVE_L2) && s->snapshots &&
        list_hit(s, c, QCOW2_OL_INACTIVE_L2, offset, size)) {
        return QCOW2_OL_INACTIVE_L2;
    }
    if ((chk & QCOW2_OL_BITMAP_DIRECTORY) && s->has_bitmaps_ext &&
        (s->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS) &&
        overlaps(offset, size, s->bitmaps_ext.bitmap_directory_offset,
                 s->bitmaps_ext.bitmap_directory_size)) {
        return QCOW2_OL_BITMAP_DIRECTORY;
    }
    return 0;
}

#ifdef QCOW2_OVERLAP_VERIFY
/* Failures also go to QCOW2_OVERLAP_VERIFY_LOG when defined: test
 * scripts often swallow a tool's stderr and exit status. */
static void verify_failed(const char *fmt, ...)
    __attribute__((format(printf, 1, 2), noreturn));
static void verify_failed(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
#ifdef QCOW2_OVERLAP_VERIFY_LOG
    {
#define OL_STR2(x) #x
#define OL_STR(x) OL_STR2(x)
        FILE *f = fopen(OL_STR(QCOW2_OVERLAP_VERIFY_LOG), "a");
        if (f) {
            va_start(ap, fmt);
            vfprintf(f, fmt, ap);
            va_end(ap);
            fclose(f);
        }
    }
#endif
    abort();
}

static bool same_starts(const ol_starts *a, const ol_starts *b)
{
    return a->n == b->n && (!a->n || !memcmp(a->v, b->v, a->n * 8));
}

/* Rebuilds every set from scratch and compares it with the kept one: a
 * kept set that is stale (a missing bump) aborts even when no query
 * happens to touch the structure it lacks. */
static void verify_sets(qcow2_state *s)
{
    struct qcow2_overlap_cache *c = get_cache(s, QCOW2_OL_ALL);
    struct qcow2_overlap_cache f = { 0 };
    int bad = 0;

    if (!c) {
        return;
    }
    build_active(s, &f, c->active_kinds);
    build_snap(s, &f, c->snap_kinds);
    if (!((c->slow | f.slow) & QCOW2_OL_ACTIVE_L2) &&
        !same_starts(&c->active_l2, &f.active_l2)) {
        bad |= QCOW2_OL_ACTIVE_L2;
    }
    if (!((c->slow | f.slow) & QCOW2_OL_REFCOUNT_BLOCK) &&
        !same_starts(&c->refblocks, &f.refblocks)) {
        bad |= QCOW2_OL_REFCOUNT_BLOCK;
    }
    if (!((c->slow | f.slow) & QCOW2_OL_INACTIVE_L2) &&
        !same_starts(&c->inactive_l2, &f.inactive_l2)) {
        bad |= QCOW2_OL_INACTIVE_L2;
    }
    if (!((c->slow | f.slow) & QCOW2_OL_INACTIVE_L1) &&
        (c->nb_inactive_l1 != f.nb_inactive_l1 ||
         (f.nb_inactive_l1 &&
          (memcmp(c->inactive_l1, f.inactive_l1,
                  f.nb_inactive_l1 * sizeof(ol_range)) ||
           memcmp(c->inactive_l1_maxend, f.inactive_l1_maxend,
                  f.nb_inactive_l1 * 8))))) {
        bad |= QCOW2_OL_INACTIVE_L1;
    }
    free_active(&f);
    free_snap(&f);
    if (bad) {
        verify_failed("%s: stale overlap sets (kinds 0x%x)\n", s->filename,
                      bad);
    }
}
#endif

int qcow2_check_metadata_overlap(qcow2_state *s, int ign, uint64_t offset,
                                 uint64_t size)
{
    int chk = s->overlap_check & ~ign;

    if (!size) {
        return 0;
    }
#ifdef QCOW2_OVERLAP_VERIFY
    /* The self-checking build (-DQCOW2_OVERLAP_VERIFY) proves the sets
     * against the walks on every check, for every kind whatever the
     * mode: a missing generation bump shows up here. */
    {
        int all = QCOW2_OL_ALL & ~ign;
        int got;
        verify_sets(s);
        got = check_overlap(s, all, offset, size, true);
        int ref = check_overlap(s, all, offset, size, false);
        if (ref != got) {
            verify_failed("%s: overlap sets disagree with the walk at 0x%"
                          PRIx64 "+0x%" PRIx64 " (chk 0x%x): %d != %d\n",
                          s->filename, offset, size, all, got, ref);
        }
    }
#endif
    return chk ? check_overlap(s, chk, offset, size, true) : 0;
}

int qcow2_metadata_overlap_kinds(qcow2_state *s, int chk, uint64_t offset,
                                 uint64_t size)
{
    return size ? check_overlap(s, chk & QCOW2_OL_ALL, offset, size, true) : 0;
}

/* ------------------------------------------------------------------ */
/* Clear runs: where the next structure starts                         */
/* ------------------------------------------------------------------ */

/* The first cluster start >= @from at which a structure whose cluster
 * starts are in @st begins (UINT64_MAX: none). */
static uint64_t starts_next(const qcow2_state *s, const ol_starts *st,
                            uint64_t from)
{
    size_t lo = 0, hi = st->n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (st->v[mid] < from) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo < st->n ? qcow2_start_of_cluster(s, st->v[lo]) : UINT64_MAX;
}

static uint64_t inactive_l1_next(const qcow2_state *s,
                                 const struct qcow2_overlap_cache *c,
                                 uint64_t from)
{
    size_t first = inactive_l1_before(c, from);

    return first < c->nb_inactive_l1 ?
           qcow2_start_of_cluster(s, c->inactive_l1[first].start) :
           UINT64_MAX;
}

/* The cluster where a fixed structure [start, start+len) begins, if it
 * begins at or after @from; UINT64_MAX otherwise (one that began before
 * and reaches @from overlaps @from's cluster, which the caller's check
 * has already ruled out). */
static uint64_t fixed_next(const qcow2_state *s, uint64_t from,
                           uint64_t start, uint64_t len)
{
    return len && start >= from ? qcow2_start_of_cluster(s, start)
                                : UINT64_MAX;
}

static uint64_t min_u64(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

/*
 * The end of the run of clusters from @from (a cluster start whose
 * range check found nothing) that meets no structure of @chk: the
 * nearest start of such a structure at or after it. The kinds and their
 * conditions are check_overlap()'s, one for one; a kind answered by its
 * walk (no set) ends the run after one cluster.
 */
static uint64_t clear_end(qcow2_state *s, int chk, uint64_t from)
{
    uint64_t cs = s->cluster_size, end = UINT64_MAX;
    const struct qcow2_overlap_cache *c = NULL;

    /* The header is cluster 0, before every @from that passed. */
    if ((chk & QCOW2_OL_ACTIVE_L1) && s->l1_size) {
        end = min_u64(end, fixed_next(s, from, s->l1_table_offset,
                                      (uint64_t)s->l1_size * 8));
    }
    if (chk & QCOW2_OL_REFCOUNT_TABLE) {
        end = min_u64(end, fixed_next(s, from, s->refcount_table_offset,
                                      (uint64_t)s->refcount_table_size * 8));
    }
    if ((chk & QCOW2_OL_SNAPSHOT_TABLE) && s->nb_snapshots) {
        end = min_u64(end, fixed_next(s, from, s->snapshots_offset,
                                      s->snapshots_size));
    }
    if ((chk & QCOW2_OL_BITMAP_DIRECTORY) && s->has_bitmaps_ext &&
        (s->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS)) {
        end = min_u64(end, fixed_next(s, from,
                                      s->bitmaps_ext.bitmap_directory_offset,
                                      s->bitmaps_ext.bitmap_directory_size));
    }
    if (chk & (OL_ACTIVE_KINDS | OL_SNAP_KINDS)) {
        c = get_cache(s, chk);
    }
    if ((chk & QCOW2_OL_INACTIVE_L1) && s->snapshots) {
        end = min_u64(end, !c || (c->slow & QCOW2_OL_INACTIVE_L1) ?
                      from + cs : inactive_l1_next(s, c, from));
    }
    if ((chk & QCOW2_OL_ACTIVE_L2) && s->l1_table) {
        end = min_u64(end, !c || (c->slow & QCOW2_OL_ACTIVE_L2) ?
                      from + cs : starts_next(s, &c->active_l2, from));
    }
    if ((chk & QCOW2_OL_REFCOUNT_BLOCK) && s->refcount_table) {
        end = min_u64(end, !c || (c->slow & QCOW2_OL_REFCOUNT_BLOCK) ?
                      from + cs : starts_next(s, &c->refblocks, from));
    }
    if ((chk & QCOW2_OL_INACTIVE_L2) && s->snapshots) {
        end = min_u64(end, !c || (c->slow & QCOW2_OL_INACTIVE_L2) ?
                      from + cs : starts_next(s, &c->inactive_l2, from));
    }
    return end;
}

int qcow2_metadata_overlap_window(qcow2_state *s, int chk, uint64_t offset,
                                  uint64_t size, uint64_t *clear_until)
{
    int bit;

    chk &= QCOW2_OL_ALL;
    bit = size ? check_overlap(s, chk, offset, size, true) : 0;
    if (bit == 0) {
        *clear_until = clear_end(s, chk, qcow2_start_of_cluster(s, offset));
    }
    return bit;
}

const char *qcow2_overlap_name(int bit)
{
    return bit ? ol_names[__builtin_ctz((unsigned)bit)] : "nothing";
}

int qcow2_pre_write_overlap_check(qcow2_state *s, int ign, uint64_t offset,
                                  uint64_t size, bool data, vd_error *err)
{
    int bit;

    if (data && s->data_file != s->file) {
        return 0;
    }
    bit = qcow2_check_metadata_overlap(s, ign, offset, size);
    if (!bit) {
        return 0;
    }
    return qcow2_signal_corruption(s, err, "Preventing invalid write on "
                                   "metadata (overlaps with %s)",
                                   qcow2_overlap_name(bit));
}

/* ------------------------------------------------------------------ */
/* cache-clean-interval                                               */
/* ------------------------------------------------------------------ */

static uint64_t now_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec;
}

void qcow2_cache_clean_maybe(qcow2_state *s)
{
    uint64_t now;

    if (!s->cache_clean_interval) {
        return;
    }
    now = now_sec();
    if (!s->cache_clean_last) {
        s->cache_clean_last = now;
        return;
    }
    if (now - s->cache_clean_last < s->cache_clean_interval) {
        return;
    }
    s->cache_clean_last = now;
    if (s->l2_cache) {
        qcow2_cache_clean_unused(s->l2_cache, &s->cache_clean_lru[0]);
    }
    if (s->refcount_cache) {
        qcow2_cache_clean_unused(s->refcount_cache, &s->cache_clean_lru[1]);
    }
}
