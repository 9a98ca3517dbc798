/*
 * Unit tests for dirty bitmaps: the hierarchical bitmap (src/core/
 * hbitmap.c) against a plain array under random set/reset, its searches,
 * merge across granularities, serialisation in the on-disk bit order,
 * truncation; that its searches cost the extents and not the disk (a
 * 1 TiB bitmap at 64 KiB, with a bound generous enough to hold under the
 * sanitizers and far below what a scan of the disk would cost); marking
 * from many threads at once; and the named bitmaps of src/core/bitmap.c
 * on a test driver: what writes, zero writes and discards mark, QEMU's
 * refusals, merge, undo, and the persistent hooks against a fake driver
 * that stores bitmaps in memory (load after open, store before close and
 * on a reopen read-only, can_store, remove).
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/bitmap_int.h"
#include "core/block_int.h"
#include "core/hbitmap.h"
#include "vdisk/bitmap.h"

#include "check.h"

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static uint64_t rnd_state = 88172645463325252ull;
static uint64_t rnd(void)
{
    rnd_state ^= rnd_state << 13;
    rnd_state ^= rnd_state >> 7;
    rnd_state ^= rnd_state << 17;
    return rnd_state;
}

/* ---- the structure against a plain array ---- */

static void test_random_vs_array(void)
{
    const unsigned shift = 9;
    const uint64_t nbits = 70001;           /* not a multiple of 64 */
    const uint64_t len = nbits * 512 - 100; /* last granule partial */
    vd_hbitmap *hb = vd_hbitmap_new(len, shift);
    unsigned char *ref = calloc(nbits, 1);
    CHECK(hb && ref, "alloc");
    for (int i = 0; i < 4000; i++) {
        uint64_t off = rnd() % (len + 2000);
        uint64_t bytes = (i % 10 == 0) ? rnd() % (len / 4) : rnd() % 40000;
        bool set = rnd() % 3 != 0;
        if (set)
            vd_hbitmap_set(hb, off, bytes);
        else
            vd_hbitmap_reset(hb, off, bytes);
        if (bytes && off < len) {
            uint64_t last = (off + bytes - 1) >> shift;
            if (last >= nbits)
                last = nbits - 1;
            for (uint64_t b = off >> shift; b <= last; b++)
                ref[b] = set;
        }
    }
    uint64_t count = 0;
    for (uint64_t b = 0; b < nbits; b++)
        count += ref[b];
    CHECK(vd_hbitmap_count(hb) == count << shift, "count %llu != %llu",
          (unsigned long long)vd_hbitmap_count(hb),
          (unsigned long long)(count << shift));
    /* Every next_dirty / next_clean from every 97th granule. */
    for (uint64_t b = 0; b < nbits; b += 97) {
        uint64_t d = b, c = b;
        while (d < nbits && !ref[d])
            d++;
        while (c < nbits && ref[c])
            c++;
        int64_t gd = vd_hbitmap_next_dirty(hb, b << shift, len - (b << shift));
        int64_t gc = vd_hbitmap_next_clean(hb, b << shift, len - (b << shift));
        CHECK(gd == (d < nbits ? (int64_t)(d << shift) : -1),
              "next_dirty from bit %llu", (unsigned long long)b);
        CHECK(gc == (c < nbits ? (int64_t)(c << shift) : -1),
              "next_clean from bit %llu", (unsigned long long)b);
        CHECK(vd_hbitmap_get(hb, b << shift) == ref[b], "get %llu",
              (unsigned long long)b);
    }
    /* is_set: every granule overlapping the range (clipped at the end)
     * set, and at least one; ranges short and long, mostly in runs. */
    for (int i = 0; i < 20000; i++) {
        uint64_t o = rnd() % (len + 2000);
        uint64_t bytes = i % 8 == 0 ? rnd() % 300000 : rnd() % 5000;
        bool want = bytes && o < len;
        if (want) {
            uint64_t last = (o + bytes - 1) >> shift;
            if (last >= nbits)
                last = nbits - 1;
            for (uint64_t b = o >> shift; b <= last && want; b++)
                want = ref[b];
        }
        CHECK(vd_hbitmap_is_set(hb, o, bytes) == want, "is_set %llu+%llu",
              (unsigned long long)o, (unsigned long long)bytes);
    }
    /* The dirty areas tile exactly the set bits. */
    uint64_t off = 0, s, n, seen = 0;
    while (vd_hbitmap_next_dirty_area(hb, off, len, UINT64_MAX, &s, &n)) {
        CHECK(s >= off && n > 0 && s + n <= len, "area in range");
        for (uint64_t b = s >> shift; b < (s + n + 511) >> shift; b++)
            CHECK(ref[b], "area bit %llu clean", (unsigned long long)b);
        CHECK(s == 0 || !ref[(s >> shift) - 1] || s == off,
              "area does not start at a run");
        seen += (n + 511) >> shift;
        off = s + n;
    }
    CHECK(seen == count, "areas cover %llu of %llu bits",
          (unsigned long long)seen, (unsigned long long)count);

    /* Serialisation: bit i is bit i % 8 of byte i / 8. */
    size_t sz = vd_hbitmap_serial_size(hb);
    CHECK(sz == (nbits + 7) / 8, "serial size");
    uint8_t *buf = malloc(sz);
    vd_hbitmap_serialize(hb, buf);
    bool order_ok = true;
    for (uint64_t b = 0; b < nbits; b++)
        if (((buf[b / 8] >> (b % 8)) & 1) != ref[b])
            order_ok = false;
    CHECK(order_ok, "serialised bit order");
    vd_hbitmap *back = vd_hbitmap_new(len, shift);
    buf[sz - 1] |= 0x80;      /* padding past nbits: ignored */
    vd_hbitmap_deserialize(back, buf);
    CHECK(vd_hbitmap_count(back) == vd_hbitmap_count(hb), "deserialised");
    char h1[65], h2[65];
    if (vd_hbitmap_sha256(hb, h1) == 0 && vd_hbitmap_sha256(back, h2) == 0)
        CHECK(strcmp(h1, h2) == 0, "same bits, same digest");

    /* Copy, merge at a coarser granularity: every dirty 512 B granule
     * marks the 4 KiB granule it falls in. */
    vd_hbitmap *copy = vd_hbitmap_copy(hb);
    CHECK(vd_hbitmap_count(copy) == vd_hbitmap_count(hb), "copy");
    vd_hbitmap *coarse = vd_hbitmap_new(len, 12);
    CHECK(vd_hbitmap_merge(coarse, hb) == 0, "merge");
    bool coarse_ok = true;
    for (uint64_t b = 0; b < nbits; b++)
        if (ref[b] && !vd_hbitmap_get(coarse, b << shift))
            coarse_ok = false;
    CHECK(coarse_ok, "coarse merge covers every dirty bit");
    vd_hbitmap *other = vd_hbitmap_new(len + 512, shift);
    CHECK(vd_hbitmap_merge(other, hb) == -EINVAL, "merge of lengths");

    /* Truncation drops the bits past the new end, grows clean. */
    CHECK(vd_hbitmap_truncate(copy, len / 2) == 0, "shrink");
    CHECK(vd_hbitmap_next_dirty(copy, len / 2, len) == -1, "shrunk end");
    CHECK(vd_hbitmap_truncate(copy, len * 2) == 0, "grow");
    CHECK(vd_hbitmap_next_dirty(copy, len, len) == -1, "grown clean");
    vd_hbitmap_clear_all(hb);
    CHECK(vd_hbitmap_count(hb) == 0 && vd_hbitmap_next_dirty(hb, 0, len) == -1,
          "clear_all");
    vd_hbitmap_free(hb);
    vd_hbitmap_free(back);
    vd_hbitmap_free(copy);
    vd_hbitmap_free(coarse);
    vd_hbitmap_free(other);
    free(buf);
    free(ref);
}

/* ---- cost: extents, not disk ---- */

static void test_tib(void)
{
    const uint64_t tib = 1ull << 40;
    vd_hbitmap *hb = vd_hbitmap_new(tib, 16);
    vd_hbitmap *dst = vd_hbitmap_new(tib, 16);
    CHECK(hb && dst, "1 TiB bitmap");
    if (!hb || !dst)
        return;
    /* 100000 searches over an empty 1 TiB bitmap: a scan of its 256 Ki
     * words each time would load 26 G words (tens of seconds); walking
     * the levels costs a few loads each. 2 s holds under ASan on a
     * loaded machine and is 10x below the scan. */
    double t0 = now_ms();
    int64_t found = 0;
    for (int i = 0; i < 100000; i++)
        found += vd_hbitmap_next_dirty(hb, (uint64_t)i << 20, tib);
    double t_empty = now_ms() - t0;
    CHECK(found == -100000, "empty bitmap has no dirty bit");
    CHECK(t_empty < 2000, "100000 next_dirty on an empty TiB took %.0f ms",
          t_empty);
    /* A few extents far apart: iterating costs them. */
    for (int i = 0; i < 64; i++)
        vd_hbitmap_set(hb, (uint64_t)i * (tib / 64) + 12345, 1 << 20);
    t0 = now_ms();
    int extents = 0;
    for (int rep = 0; rep < 1000; rep++) {
        uint64_t off = 0, s, n;
        while (vd_hbitmap_next_dirty_area(hb, off, tib, UINT64_MAX, &s, &n)) {
            extents++;
            off = s + n;
        }
    }
    double t_iter = now_ms() - t0;
    CHECK(extents == 64000, "64 extents, %d found in 1000 walks", extents / 1000);
    CHECK(t_iter < 2000, "1000 walks of 64 extents took %.0f ms", t_iter);

    /* The whole-bitmap operations, measured (reported, bounded only
     * against a hang). */
    t0 = now_ms();
    vd_hbitmap_merge(dst, hb);
    double t_merge = now_ms() - t0;
    t0 = now_ms();
    vd_hbitmap *cp = vd_hbitmap_copy(hb);
    double t_copy = now_ms() - t0;
    uint8_t *buf = malloc(vd_hbitmap_serial_size(hb));
    t0 = now_ms();
    vd_hbitmap_serialize(hb, buf);
    double t_ser = now_ms() - t0;
    t0 = now_ms();
    vd_hbitmap_deserialize(dst, buf);
    double t_deser = now_ms() - t0;
    char hex[65];
    t0 = now_ms();
    int hr = vd_hbitmap_sha256(hb, hex);
    double t_sha = now_ms() - t0;
    t0 = now_ms();
    vd_hbitmap_set(dst, 0, tib);
    double t_setall = now_ms() - t0;
    t0 = now_ms();
    vd_hbitmap_clear_all(dst);
    double t_clear = now_ms() - t0;
    CHECK(cp && vd_hbitmap_count(cp) == vd_hbitmap_count(hb), "copy of TiB");
    CHECK(vd_hbitmap_count(dst) == 0, "cleared TiB");
    CHECK(hr == 0 || hr == -ENOTSUP, "sha256");
    printf("1 TiB at 64 KiB: 100000 empty next_dirty %.2f ms, 1000 walks "
           "of 64 extents %.2f ms, merge %.2f ms, copy %.2f ms, serialize "
           "%.2f ms, deserialize %.2f ms, sha256 %.2f ms, set all %.2f ms, "
           "clear all %.2f ms\n", t_empty, t_iter, t_merge, t_copy, t_ser,
           t_deser, t_sha, t_setall, t_clear);
    CHECK(t_merge + t_copy + t_ser + t_deser + t_sha + t_setall + t_clear <
          20000, "whole-bitmap operations hang");
    free(buf);
    vd_hbitmap_free(cp);
    vd_hbitmap_free(hb);
    vd_hbitmap_free(dst);
}

/* ---- threads ---- */

typedef struct mt_arg {
    vd_hbitmap *hb;
    int id;
} mt_arg;

#define MT_THREADS 4
#define MT_LEN (64ull << 20)

/* Thread i sets granules i, i + 4, ... (sharing every word with the
 * others) and resets then sets again pieces of them. */
static void *mt_fn(void *p)
{
    mt_arg *a = p;
    for (int rep = 0; rep < 3; rep++) {
        for (uint64_t g = (uint64_t)a->id; g < MT_LEN / 4096; g += MT_THREADS)
            vd_hbitmap_set(a->hb, g * 4096, 4096);
        for (uint64_t g = (uint64_t)a->id; g < MT_LEN / 4096;
             g += MT_THREADS * 7)
            vd_hbitmap_reset(a->hb, g * 4096, 4096);
    }
    for (uint64_t g = (uint64_t)a->id; g < MT_LEN / 4096; g += MT_THREADS)
        vd_hbitmap_set(a->hb, g * 4096, 4096);
    return NULL;
}

static void test_threads(void)
{
    vd_hbitmap *hb = vd_hbitmap_new(MT_LEN, 12);
    pthread_t t[MT_THREADS];
    mt_arg a[MT_THREADS];
    for (int i = 0; i < MT_THREADS; i++) {
        a[i] = (mt_arg){ hb, i };
        pthread_create(&t[i], NULL, mt_fn, &a[i]);
    }
    for (int i = 0; i < MT_THREADS; i++)
        pthread_join(t[i], NULL);
    CHECK(vd_hbitmap_count(hb) == MT_LEN, "all set: count %llu",
          (unsigned long long)vd_hbitmap_count(hb));
    /* Summaries exact: one area covering everything. */
    uint64_t s, n;
    CHECK(vd_hbitmap_next_dirty_area(hb, 0, MT_LEN, UINT64_MAX, &s, &n) &&
          s == 0 && n == MT_LEN, "one dirty area");
    /* Resets racing with sets on shared words: afterwards every summary
     * bit agrees with the words (a missed one would hide bits). */
    vd_hbitmap_clear_all(hb);
    for (int i = 0; i < MT_THREADS; i++)
        pthread_create(&t[i], NULL, mt_fn, &a[i]);
    for (int i = 0; i < MT_THREADS; i++) {
        pthread_join(t[i], NULL);
    }
    uint64_t off = 0, total = 0;
    while (vd_hbitmap_next_dirty_area(hb, off, MT_LEN, UINT64_MAX, &s, &n)) {
        total += n;
        off = s + n;
    }
    CHECK(total == MT_LEN && vd_hbitmap_count(hb) == MT_LEN,
          "areas after racing resets: %llu", (unsigned long long)total);
    vd_hbitmap_free(hb);
}

/* ---- named bitmaps on a test driver ---- */

#define DISK (4ull << 20)

static uint64_t cluster_size;
/* The fake image's stored bitmaps. */
static vd_bitmap_image *stored;
static size_t nstored;
static int loads, stores, removes, in_use_marks;

static int mem_open(vd_node *n, vd_opts *o, unsigned f, vd_error *e)
{
    (void)n, (void)o, (void)f, (void)e;
    return 0;
}

static int64_t mem_len(vd_node *n)
{
    (void)n;
    return DISK;
}

static int mem_pwritev(vd_node *n, uint64_t off, uint64_t bytes,
                       vd_iov *qiov, unsigned flags, vd_error *err)
{
    (void)n, (void)off, (void)bytes, (void)qiov, (void)flags, (void)err;
    return 0;
}

static int mem_zero(vd_node *n, uint64_t off, uint64_t bytes,
                    unsigned flags, vd_error *err)
{
    (void)n, (void)off, (void)bytes, (void)flags, (void)err;
    return 0;
}

static int mem_discard(vd_node *n, uint64_t off, uint64_t bytes,
                       vd_error *err)
{
    (void)n, (void)off, (void)bytes, (void)err;
    return 0;
}

static int mem_info(vd_node *n, vd_image_info *info, vd_error *err)
{
    (void)n, (void)err;
    info->cluster_size = cluster_size;
    return 0;
}

static int fake_load(vd_node *n, vd_bitmap_image **list, size_t *count,
                     vd_error *err)
{
    (void)err;
    loads++;
    *list = calloc(nstored ? nstored : 1, sizeof(**list));
    *count = nstored;
    for (size_t i = 0; i < nstored; i++) {
        (*list)[i] = stored[i];
        (*list)[i].name = strdup(stored[i].name);
        if (stored[i].bits && !stored[i].in_use) {
            size_t sz = (DISK / stored[i].granularity + 7) / 8;
            (*list)[i].bits = malloc(sz);
            memcpy((*list)[i].bits, stored[i].bits, sz);
        } else {
            (*list)[i].bits = NULL;
        }
        /* Loaded by a writer: in use from now on, as the contract says. */
        if (!n->read_only) {
            stored[i].in_use = true;
            in_use_marks++;
        }
    }
    return 0;
}

static int fake_store(vd_node *n, const vd_bitmap_image *list, size_t count,
                      vd_error *err)
{
    (void)n, (void)err;
    stores++;
    vd_bitmap_images_free(stored, nstored);
    stored = calloc(count ? count : 1, sizeof(*stored));
    nstored = count;
    for (size_t i = 0; i < count; i++) {
        stored[i] = list[i];
        stored[i].name = strdup(list[i].name);
        if (list[i].bits) {
            size_t sz = (DISK / list[i].granularity + 7) / 8;
            stored[i].bits = malloc(sz);
            memcpy(stored[i].bits, list[i].bits, sz);
        }
    }
    return 0;
}

static int fake_can_store(vd_node *n, const char *name, uint64_t g,
                          vd_error *err)
{
    (void)n, (void)g;
    if (strcmp(name, "nostore") == 0)
        return vd_error_set(err, -ENOSPC, "Too many bitmaps");
    return 0;
}

static int fake_remove(vd_node *n, const char *name, vd_error *err)
{
    (void)n, (void)err;
    removes++;
    for (size_t i = 0; i < nstored; i++) {
        if (strcmp(stored[i].name, name) == 0) {
            free(stored[i].name);
            free(stored[i].bits);
            memmove(&stored[i], &stored[i + 1],
                    (nstored - i - 1) * sizeof(*stored));
            nstored--;
            break;
        }
    }
    return 0;
}

/* A protocol that keeps nothing: only the bitmaps matter here. */
#define MEM_CALLBACKS                                                   \
    .open = mem_open, .getlength = mem_len, .pwritev = mem_pwritev,     \
    .pwrite_zeroes = mem_zero, .pdiscard = mem_discard,                 \
    .get_info = mem_info

static const vd_driver mem_drv = { .name = "test-mem", MEM_CALLBACKS };

/* The same with persistent bitmaps in the fake image. */
static const vd_driver store_drv = {
    .name = "test-store",
    MEM_CALLBACKS,
    .bitmaps_load = fake_load,
    .bitmaps_store = fake_store,
    .bitmap_can_store = fake_can_store,
    .bitmap_remove = fake_remove,
};

static vd_node *open_mem(const vd_driver *drv, const char *name, bool rw)
{
    vd_opts *o = vd_opts_new();
    vd_node *n = NULL;
    vd_error err = VD_ERROR_INIT;
    vd_opts_set(o, "node-name", name);
    if (vd_node_open(&n, "mem", drv, o,
                     VD_NODE_PROTOCOL | (rw ? VD_NODE_RDWR : 0), &err) < 0) {
        fprintf(stderr, "open %s: %s\n", name, err.message);
        exit(1);
    }
    vd_opts_free(&o);
    return n;
}

/* A user that may write (the request path asserts one exists). */
static vd_user *writer(vd_node *n)
{
    vd_user *u = NULL;
    vd_error err = VD_ERROR_INIT;
    CHECK(vd_user_new(&u, n, NULL, VD_PERM_WRITE, VD_PERM_ALL, &err) == 0,
          "writer: %s", err.message);
    return u;
}

static int write_at(vd_node *n, uint64_t off, uint64_t bytes)
{
    static char buf[1 << 16];
    vd_iov v;
    vd_error err = VD_ERROR_INIT;
    vd_iov_init_buf(&v, buf, bytes);
    int r = vd_node_pwritev(n, off, bytes, &v, 0, &err);
    vd_iov_destroy(&v);
    return r;
}

static uint64_t count_of(vd_node *n, const char *name)
{
    vd_bitmap_info i;
    vd_error err = VD_ERROR_INIT;
    if (vd_bitmap_get_info(n, name, &i, &err) < 0)
        return UINT64_MAX;
    free(i.name);
    return i.count;
}

static void expect_err(int r, vd_error *err, const char *msg)
{
    CHECK(r < 0 && strcmp(err->message, msg) == 0, "expected '%s', got %d "
          "'%s'", msg, r, err->message);
    vd_error_clear(err);
}

static void test_named(void)
{
    vd_error err = VD_ERROR_INIT;
    vd_node *n = open_mem(&mem_drv, "m", true);
    vd_user *un = writer(n);

    /* Default granularities: cluster clamped to 4..64 KiB, else 64 KiB. */
    cluster_size = 0;
    CHECK(vd_bitmap_default_granularity(n) == 65536, "no clusters");
    cluster_size = 512;
    CHECK(vd_bitmap_default_granularity(n) == 4096, "small clusters");
    cluster_size = 2 << 20;
    CHECK(vd_bitmap_default_granularity(n) == 65536, "large clusters");
    cluster_size = 16384;
    CHECK(vd_bitmap_default_granularity(n) == 16384, "cluster size");

    CHECK(vd_bitmap_add(n, "a", 0, 0, &err) == 0, "add a: %s", err.message);
    CHECK(vd_bitmap_add(n, "d", 512, VD_BITMAP_DISABLED, &err) == 0, "add d");
    expect_err(vd_bitmap_add(n, "a", 0, 0, &err), &err,
               "Bitmap already exists: a");
    expect_err(vd_bitmap_add(n, "", 0, 0, &err), &err,
               "Bitmap name cannot be empty");
    expect_err(vd_bitmap_add(n, "g", 1000, 0, &err), &err,
               "Granularity must be power of 2 and at least 512");
    expect_err(vd_bitmap_add(n, "g", 256, 0, &err), &err,
               "Granularity must be power of 2 and at least 512");
    expect_err(vd_bitmap_add(n, "p", 0, VD_BITMAP_PERSISTENT, &err), &err,
               "Can't store persistent bitmaps to m: Operation not "
               "supported");
    char longname[1100];
    memset(longname, 'x', 1024);
    longname[1024] = 0;
    CHECK(vd_bitmap_add(n, longname, 0, 0, &err) == -EINVAL &&
          strncmp(err.message, "Bitmap name too long: xxx", 25) == 0,
          "long name: %s", err.message);
    vd_error_clear(&err);
    longname[1023] = 0;
    CHECK(vd_bitmap_add(n, longname, 0, 0, &err) == 0 &&
          vd_bitmap_remove(n, longname, &err) == 0, "1023 bytes are fine");
    CHECK(atomic_load(&n->dirty_bitmaps) == 2, "two bitmaps counted");

    /* Writes, zero writes and discards mark the enabled ones. */
    CHECK(write_at(n, 1000, 10) == 0, "write");
    CHECK(vd_node_pwrite_zeroes(n, 100000, 70000, 0, &err) == 0, "zero");
    CHECK(vd_node_pdiscard(n, 3 << 20, 4096, &err) == 0, "discard");
    CHECK(count_of(n, "a") == 16384 + 5 * 16384 + 16384, "a counts %llu",
          (unsigned long long)count_of(n, "a"));
    CHECK(count_of(n, "d") == 0, "disabled records nothing");
    uint64_t s, b;
    CHECK(vd_bitmap_next_dirty(n, "a", 0, &s, &b, &err) == 1 && s == 0 &&
          b == 16384, "first extent");
    CHECK(vd_bitmap_next_dirty(n, "a", 16384, &s, &b, &err) == 1 &&
          s == 98304 && b == 5 * 16384, "second extent %llu+%llu",
          (unsigned long long)s, (unsigned long long)b);
    char h1[65], h2[65];
    int hr = vd_bitmap_sha256(n, "a", h1, &err);
    vd_error_clear(&err);

    /* Merge: sources on other nodes, any granularity; all or nothing. */
    vd_node *o = open_mem(&mem_drv, "o", true);
    vd_user *uo = writer(o);
    CHECK(vd_bitmap_add(o, "x", 65536, 0, &err) == 0, "add x");
    write_at(o, 2 << 20, 512);
    vd_bitmap_ref refs[] = { { NULL, "a" }, { o, "x" }, { NULL, "nope" } };
    expect_err(vd_bitmap_merge(n, "d", refs, 3, &err), &err,
               "Dirty bitmap 'nope' not found");
    CHECK(count_of(n, "d") == 0, "failed merge changed nothing");
    CHECK(vd_bitmap_merge(n, "d", refs, 2, &err) == 0, "merge: %s",
          err.message);
    CHECK(count_of(n, "d") == 7 * 16384 + 65536, "merged count %llu",
          (unsigned long long)count_of(n, "d"));
    expect_err(vd_bitmap_merge(n, "nope", refs, 1, &err), &err,
               "Dirty bitmap 'nope' not found");

    /* Busy and its refusals. */
    CHECK(vd_bitmap_set_busy(n, "a", true, &err) == 0, "busy");
    expect_err(vd_bitmap_clear(n, "a", &err), &err, "Bitmap 'a' is "
               "currently in use by another operation and cannot be used");
    expect_err(vd_bitmap_remove(n, "a", &err), &err, "Bitmap 'a' is "
               "currently in use by another operation and cannot be used");
    expect_err(vd_bitmap_merge(n, "a", refs + 1, 1, &err), &err,
               "Bitmap 'a' is currently in use by another operation and "
               "cannot be used");
    CHECK(vd_bitmap_set_busy(n, "a", false, &err) == 0, "not busy");

    /* Undo: a clear and a disable, restored, keep what was written in
     * between (the bitmap was recording). */
    vd_bitmap_saved *sv = NULL;
    CHECK(vd_bitmap_save(n, "a", &sv, &err) == 0, "save");
    CHECK(vd_bitmap_clear(n, "a", &err) == 0, "clear");
    CHECK(vd_bitmap_disable(n, "a", &err) == 0, "disable");
    write_at(n, 1 << 20, 512);
    CHECK(count_of(n, "a") == 0, "cleared and disabled");
    CHECK(vd_bitmap_restore(sv, &err) == 0, "restore");
    CHECK(count_of(n, "a") == 8 * 16384, "restored with the new write: %llu",
          (unsigned long long)count_of(n, "a"));
    write_at(n, 2 << 20, 512);
    CHECK(count_of(n, "a") == 9 * 16384, "recording again");
    if (hr == 0) {
        CHECK(vd_bitmap_sha256(n, "a", h2, &err) == 0 &&
              strcmp(h1, h2) != 0, "digest follows the bits");
    }
    /* Undo of a remove re-creates it. */
    CHECK(vd_bitmap_save(n, "d", &sv, &err) == 0, "save d");
    CHECK(vd_bitmap_remove(n, "d", &err) == 0, "remove d");
    expect_err(vd_bitmap_clear(n, "d", &err), &err,
               "Dirty bitmap 'd' not found");
    CHECK(vd_bitmap_restore(sv, &err) == 0, "restore d");
    CHECK(count_of(n, "d") == 7 * 16384 + 65536, "d back");

    vd_bitmap_info *list;
    size_t cnt;
    CHECK(vd_bitmap_list(n, &list, &cnt, &err) == 0 && cnt == 2, "list");
    if (cnt == 2)
        CHECK(strcmp(list[0].name, "d") == 0 && !list[0].recording &&
              list[0].granularity == 512 && list[1].recording,
              "newest first, with their state");
    vd_bitmap_list_free(list, cnt);

    /* Snapshot goto refuses while there are bitmaps (QEMU). */
    CHECK(atomic_load(&n->dirty_bitmaps) == 2, "counted");
    expect_err(vd_snapshot_goto(n, "s1", &err), &err,
               "Device has active dirty bitmaps");
    CHECK(vd_bitmap_remove(n, "a", &err) == 0 &&
          vd_bitmap_remove(n, "d", &err) == 0, "remove");
    CHECK(atomic_load(&n->dirty_bitmaps) == 0, "none counted");
    vd_user_free(&uo);
    vd_user_free(&un);
    vd_node_unref(o);
    vd_node_unref(n);
}

/* A rewrite of granules every bitmap has is one test of the node's
 * intersection bitmap: whatever takes bits from one bitmap or makes a
 * new one record (clear, disable+enable, a job's freeze, add) must make
 * the next rewrite mark it again. */
static void test_rewrites(void)
{
    vd_error err = VD_ERROR_INIT;
    vd_node *n = open_mem(&mem_drv, "r", true);
    vd_user *u = writer(n);
    const char *names[] = { "g4k", "g64k", "g512" };
    const uint64_t gran[] = { 4096, 65536, 512 };
    for (int i = 0; i < 3; i++)
        CHECK(vd_bitmap_add(n, names[i], gran[i], 0, &err) == 0, "add %s",
              names[i]);
    /* Two writes inside one 64 KiB granule, 5000 bytes apart: each
     * bitmap's count is its granules overlapping them. */
    const uint64_t w1 = 70000, w2 = 75000, wl = 1000;
    uint64_t want[3];
    for (int i = 0; i < 3; i++) {
        uint64_t g = gran[i], c = 0;
        for (uint64_t x = 0; x < DISK; x += g)
            c += (x < w1 + wl && x + g > w1) || (x < w2 + wl && x + g > w2);
        want[i] = c * g;
    }
    for (int pass = 0; pass < 2; pass++) {
        write_at(n, w1, wl);
        write_at(n, w2, wl);
    }
    for (int i = 0; i < 3; i++)
        CHECK(count_of(n, names[i]) == want[i], "%s counts %llu, want %llu",
              names[i], (unsigned long long)count_of(n, names[i]),
              (unsigned long long)want[i]);
    CHECK(vd_bitmap_clear(n, "g4k", &err) == 0, "clear");
    write_at(n, w1, wl);
    write_at(n, w2, wl);
    CHECK(count_of(n, "g4k") == want[0], "rewrite after a clear: %llu",
          (unsigned long long)count_of(n, "g4k"));
    CHECK(vd_bitmap_disable(n, "g512", &err) == 0 &&
          vd_bitmap_clear(n, "g512", &err) == 0, "disable, clear");
    write_at(n, w1, wl);
    CHECK(count_of(n, "g512") == 0, "disabled records nothing");
    CHECK(vd_bitmap_enable(n, "g512", &err) == 0, "enable");
    write_at(n, w1, wl);
    write_at(n, w2, wl);
    CHECK(count_of(n, "g512") == want[2], "rewrite after an enable: %llu",
          (unsigned long long)count_of(n, "g512"));
    CHECK(vd_bitmap_add(n, "new", 4096, 0, &err) == 0, "add new");
    write_at(n, w1, wl);
    write_at(n, w2, wl);
    CHECK(count_of(n, "new") == want[0], "rewrite into a new bitmap: %llu",
          (unsigned long long)count_of(n, "new"));
    /* Frozen: the empty successor records the rewrite, which an
     * abdicating unfreeze makes the bitmap's bits. */
    CHECK(vd_bitmap_freeze(n, "g64k", &err) == 0, "freeze: %s",
          err.message);
    write_at(n, w2, wl);
    CHECK(vd_bitmap_unfreeze(n, "g64k", true, NULL, &err) == 0, "unfreeze");
    CHECK(count_of(n, "g64k") == 65536, "the successor recorded: %llu",
          (unsigned long long)count_of(n, "g64k"));
    vd_user_free(&u);
    vd_node_unref(n);
}

/* Request threads writing while the bitmaps of the node change: every
 * write must be in the bitmap that records throughout, and nothing may
 * deadlock or race (the sanitizers watch). */
#define W_THREADS 4
#define W_WRITES 3000

typedef struct w_arg {
    vd_node *node;
    uint64_t seed;
    uint64_t offs[W_WRITES];
} w_arg;

static void *writer_fn(void *p)
{
    w_arg *a = p;
    for (int i = 0; i < W_WRITES; i++) {
        a->seed = a->seed * 6364136223846793005ull + 1442695040888963407ull;
        a->offs[i] = (a->seed >> 20) % (DISK / 512) * 512;
        write_at(a->node, a->offs[i], 512);
    }
    return NULL;
}

static void test_named_threads(void)
{
    vd_error err = VD_ERROR_INIT;
    vd_node *n = open_mem(&mem_drv, "t", true);
    vd_user *u = writer(n);
    CHECK(vd_bitmap_add(n, "all", 4096, 0, &err) == 0, "add all");
    CHECK(vd_bitmap_add(n, "churn", 512, 0, &err) == 0, "add churn");
    static w_arg args[W_THREADS];
    pthread_t t[W_THREADS];
    for (int i = 0; i < W_THREADS; i++) {
        args[i] = (w_arg){ .node = n, .seed = (uint64_t)i + 1 };
        pthread_create(&t[i], NULL, writer_fn, &args[i]);
    }
    vd_bitmap_ref src[] = { { NULL, "all" } };
    for (int i = 0; i < 200; i++) {
        vd_bitmap_add(n, "tmp", 65536, i % 2 ? VD_BITMAP_DISABLED : 0, &err);
        vd_bitmap_clear(n, "churn", &err);
        vd_bitmap_merge(n, "tmp", src, 1, &err);
        if (i % 3 == 0)
            vd_bitmap_disable(n, "churn", &err);
        else
            vd_bitmap_enable(n, "churn", &err);
        vd_bitmap_remove(n, "tmp", &err);
        vd_error_clear(&err);
    }
    for (int i = 0; i < W_THREADS; i++)
        pthread_join(t[i], NULL);
    bool all_marked = true;
    vd_bitmap_info info;
    for (int i = 0; i < W_THREADS; i++) {
        for (int k = 0; k < W_WRITES; k++) {
            uint64_t s, b;
            if (vd_bitmap_next_dirty(n, "all", args[i].offs[k], &s, &b,
                                     &err) != 1 || s > args[i].offs[k])
                all_marked = false;
        }
    }
    CHECK(all_marked, "a write is missing from the recording bitmap");
    CHECK(vd_bitmap_get_info(n, "all", &info, &err) == 0, "info");
    free(info.name);
    vd_user_free(&u);
    vd_node_unref(n);
}

static void test_persistent(void)
{
    vd_error err = VD_ERROR_INIT;
    /* The image holds one good bitmap and one left in use by a crash. */
    stored = calloc(2, sizeof(*stored));
    nstored = 2;
    stored[0] = (vd_bitmap_image){ strdup("good"), 65536, true, false,
                                   DISK, calloc(DISK / 65536 / 8, 1) };
    stored[0].bits[1] = 0x81;            /* bits 8 and 15 */
    stored[1] = (vd_bitmap_image){ strdup("crashed"), 65536, true, true,
                                   DISK, NULL };

    vd_node *n = open_mem(&store_drv, "s", true);
    vd_user *u = writer(n);
    CHECK(loads == 1, "loaded at open");
    vd_bitmap_info i;
    CHECK(vd_bitmap_get_info(n, "good", &i, &err) == 0 && i.persistent &&
          i.recording && !i.inconsistent && i.count == 2 * 65536,
          "good loaded with its bits");
    free(i.name);
    CHECK(vd_bitmap_get_info(n, "crashed", &i, &err) == 0 &&
          i.inconsistent && !i.recording, "crashed is inconsistent");
    free(i.name);
    expect_err(vd_bitmap_clear(n, "crashed", &err), &err,
               "Bitmap 'crashed' is inconsistent and cannot be used");
    uint64_t s, b;
    CHECK(vd_bitmap_next_dirty(n, "good", 0, &s, &b, &err) == 1 &&
          s == 8 * 65536 && b == 65536, "loaded bit order");

    expect_err(vd_bitmap_add(n, "nostore", 0, VD_BITMAP_PERSISTENT, &err),
               &err, "Too many bitmaps");
    CHECK(vd_bitmap_add(n, "new", 0, VD_BITMAP_PERSISTENT, &err) == 0,
          "add persistent");
    CHECK(vd_bitmap_add(n, "temp", 0, 0, &err) == 0, "add transient");
    write_at(n, 0, 4096);

    /* Reopen read-only: stored, then read-only. */
    vd_user_free(&u);
    CHECK(vd_node_reopen(n, VD_NODE_PROTOCOL, &err) == 0, "reopen ro: %s",
          err.message);
    CHECK(stores == 1 && nstored == 3, "stored at reopen ro: %d, %zu",
          stores, nstored);
    expect_err(vd_bitmap_clear(n, "good", &err), &err,
               "Bitmap 'good' is readonly and cannot be modified");
    CHECK(vd_bitmap_disable(n, "good", &err) == 0, "read-only may disable");
    CHECK(vd_bitmap_enable(n, "good", &err) == 0, "and enable");
    CHECK(vd_node_reopen(n, VD_NODE_PROTOCOL | VD_NODE_RDWR, &err) == 0,
          "reopen rw: %s", err.message);
    CHECK(loads == 2, "loaded again at reopen rw");
    u = writer(n);
    CHECK(vd_bitmap_clear(n, "new", &err) == 0, "writable again: %s",
          err.message);

    /* Remove a persistent one: gone from the image at once. */
    CHECK(vd_bitmap_remove(n, "crashed", &err) == 0, "remove crashed");
    CHECK(removes == 1 && nstored == 2, "removed from the image");
    write_at(n, 3 << 20, 4096);
    vd_user_free(&u);
    vd_node_unref(n);
    CHECK(stores == 2, "stored at close");
    bool good_ok = false;
    for (size_t k = 0; k < nstored; k++) {
        CHECK(strcmp(stored[k].name, "temp") != 0, "transient not stored");
        CHECK(!stored[k].in_use, "stored bitmaps not in use");
        if (strcmp(stored[k].name, "good") == 0)
            good_ok = stored[k].bits && stored[k].bits[0] == 1 &&
                      stored[k].bits[1] == 0x81 && stored[k].bits[6] == 1;
    }
    CHECK(good_ok, "good stored with the writes");
    vd_bitmap_images_free(stored, nstored);

    /* A bitmap the core cannot take fails the open; nothing is stored
     * back (dropping it would have removed it from the image). */
    stored = calloc(2, sizeof(*stored));
    nstored = 2;
    stored[0] = (vd_bitmap_image){ strdup("fine"), 65536, true, false,
                                   DISK, calloc(DISK / 65536 / 8, 1) };
    stored[1] = (vd_bitmap_image){ strdup("odd"), 3000, true, false,
                                   DISK, calloc(DISK / 3000 / 8 + 1, 1) };
    int before = stores;
    vd_opts *o = vd_opts_new();
    vd_node *bad = NULL;
    vd_opts_set(o, "node-name", "bad");
    int r = vd_node_open(&bad, "mem", &store_drv, o,
                         VD_NODE_PROTOCOL | VD_NODE_RDWR, &err);
    vd_opts_free(&o);
    CHECK(r == -EINVAL && strstr(err.message, "bitmap 'odd' has an invalid "
                                 "granularity 3000"), "bad load: %d %s", r,
          err.message);
    CHECK(stores == before && nstored == 2, "nothing stored after a failed "
          "load");
    if (bad)
        vd_node_unref(bad);
    vd_bitmap_images_free(stored, nstored);
}

int main(void)
{
    test_random_vs_array();
    test_tib();
    test_threads();
    test_named();
    test_rewrites();
    test_named_threads();
    test_persistent();
    TEST_EXIT("test-bitmap");
}
