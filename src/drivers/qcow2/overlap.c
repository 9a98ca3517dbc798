/*
 * qcow2 metadata overlap checks and cache cleaning, as QEMU 7.2's
 * qcow2_check_metadata_overlap() and cache-clean-interval.
 *
 * Organisation: the option parsing (overlap-check as a mode or a
 * template, one boolean per structure), the overlap test itself (one
 * range compare per structure, in QEMU's order, so the structure named in
 * the message is the one QEMU names), the pre-write hook that turns an
 * overlap into a corruption event, and last the lazy cache cleaner.
 *
 * Why: a corrupt refcount or L2 entry can make the driver believe a
 * metadata cluster is free or is guest data; writing there would destroy
 * the image for good. The check costs a scan of the L1 and refcount
 * tables per write in the default "cached" mode, as in QEMU.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
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

int qcow2_check_metadata_overlap(qcow2_state *s, int ign, uint64_t offset,
                                 uint64_t size)
{
    int chk = s->overlap_check & ~ign;
    uint64_t cs = s->cluster_size;

    if (!size || !chk) {
        return 0;
    }
    if ((chk & QCOW2_OL_MAIN_HEADER) && offset < cs) {
        return QCOW2_OL_MAIN_HEADER;
    }
    /* Whole clusters, as the structures own whole clusters. */
    size = qcow2_start_of_cluster(s, offset + size + cs - 1) -
           qcow2_start_of_cluster(s, offset);
    offset = qcow2_start_of_cluster(s, offset);

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
    if ((chk & QCOW2_OL_INACTIVE_L1) && s->snapshots) {
        for (uint32_t i = 0; i < s->nb_snapshots; i++) {
            if (overlaps(offset, size, s->snapshots[i].l1_table_offset,
                         (uint64_t)s->snapshots[i].l1_size * 8)) {
                return QCOW2_OL_INACTIVE_L1;
            }
        }
    }
    if ((chk & QCOW2_OL_ACTIVE_L2) && s->l1_table) {
        for (uint32_t i = 0; i < s->l1_size; i++) {
            uint64_t l2 = s->l1_table[i] & QCOW2_L1E_OFFSET_MASK;
            if (l2 && overlaps(offset, size, l2, cs)) {
                return QCOW2_OL_ACTIVE_L2;
            }
        }
    }
    if ((chk & QCOW2_OL_REFCOUNT_BLOCK) && s->refcount_table) {
        for (uint32_t i = 0; i < s->refcount_table_size; i++) {
            uint64_t rb = s->refcount_table[i] & QCOW2_REFT_OFFSET_MASK;
            if (rb && overlaps(offset, size, rb, cs)) {
                return QCOW2_OL_REFCOUNT_BLOCK;
            }
        }
    }
    if ((chk & QCOW2_OL_INACTIVE_L2) && s->snapshots) {
        /* Reads every snapshot L1 table: the expensive "all" mode. */
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
                if (e && overlaps(offset, size, e, cs)) {
                    return QCOW2_OL_INACTIVE_L2;
                }
            }
        }
    }
    if ((chk & QCOW2_OL_BITMAP_DIRECTORY) && s->has_bitmaps_ext &&
        (s->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS) &&
        overlaps(offset, size, s->bitmaps_ext.bitmap_directory_offset,
                 s->bitmaps_ext.bitmap_directory_size)) {
        return QCOW2_OL_BITMAP_DIRECTORY;
    }
    return 0;
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
                                   ol_names[__builtin_ctz((unsigned)bit)]);
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

/* Drops the clean tables nobody used since the last clean and gives
 * their memory back (whole pages only). */
static void clean_unused(qcow2_cache *c, uint64_t *last_lru)
{
    long page = sysconf(_SC_PAGESIZE);

    for (int i = 0; i < c->size; i++) {
        qcow2_cache_entry *e = &c->entries[i];
        if (!e->offset || e->ref || e->dirty || e->lru > *last_lru) {
            continue;
        }
        e->offset = 0;
        if (page > 0 && c->table_size % (size_t)page == 0) {
            madvise(c->tables + (size_t)i * c->table_size, c->table_size,
                    MADV_DONTNEED);
        }
    }
    *last_lru = c->lru_counter;
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
        clean_unused(s->l2_cache, &s->cache_clean_lru[0]);
    }
    if (s->refcount_cache) {
        clean_unused(s->refcount_cache, &s->cache_clean_lru[1]);
    }
}
