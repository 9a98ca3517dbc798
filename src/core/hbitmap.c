/*
 * The hierarchical bitmap of hbitmap.h: the dirty bits of named bitmaps
 * (bitmap.c) and of the jobs' trackers (dirty.c).
 *
 * Layout. lv[0] holds the bits themselves (nbits of them, in words[0]
 * 64-bit words); bit i of lv[k + 1] is set when word i of lv[k] is not
 * zero. The top level is one word. @count is the number of set bits of
 * lv[0], kept exact by counting what each atomic operation changed.
 *
 * Lock-free updates. Every word is changed with an atomic fetch_or /
 * fetch_and, which returns the old value: a setter that turns a word
 * from zero to non-zero sets its summary bit one level up (and goes on
 * while that word was zero too); a resetter that turns a word to zero
 * clears the summary bit and then looks at the word again: if a setter
 * made it non-zero in between, it sets the summary bit back. So once
 * the writers are done every summary bit is exact, and while they run a
 * summary bit may only be missing for a word whose setter has not
 * returned yet (its request has not completed). Searches accept a stale
 * set summary bit (they find a zero word and go on).
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#ifdef VDISK_HAVE_GNUTLS
#include <gnutls/crypto.h>
#endif

#include "hbitmap.h"

#define MAX_LEVELS 12

struct vd_hbitmap {
    uint64_t len;
    unsigned shift;
    uint64_t nbits;
    unsigned nlevels;
    uint64_t words[MAX_LEVELS];   /* words of each level */
    _Atomic uint64_t *lv[MAX_LEVELS];
    _Atomic uint64_t count;
};

static uint64_t words_for(uint64_t bits)
{
    uint64_t w = (bits + 63) / 64;
    return w ? w : 1;
}

/* Sizes the levels for @nbits and allocates them (zeroed). */
static int alloc_levels(vd_hbitmap *hb, uint64_t nbits)
{
    memset(hb->lv, 0, sizeof(hb->lv));
    hb->nbits = nbits;
    uint64_t bits = nbits;
    unsigned k = 0;
    do {
        hb->words[k] = words_for(bits);
        hb->lv[k] = calloc(hb->words[k], sizeof(uint64_t));
        if (!hb->lv[k]) {
            for (unsigned i = 0; i < k; i++)
                free((void *)hb->lv[i]);
            return -ENOMEM;
        }
        bits = hb->words[k];
        k++;
    } while (hb->words[k - 1] > 1);
    hb->nlevels = k;
    return 0;
}

vd_hbitmap *vd_hbitmap_new(uint64_t len, unsigned shift)
{
    if (shift > 40)
        return NULL;
    vd_hbitmap *hb = calloc(1, sizeof(*hb));
    if (!hb)
        return NULL;
    hb->len = len;
    hb->shift = shift;
    if (alloc_levels(hb, (len + (1ull << shift) - 1) >> shift) < 0) {
        free(hb);
        return NULL;
    }
    return hb;
}

void vd_hbitmap_free(vd_hbitmap *hb)
{
    if (!hb)
        return;
    for (unsigned k = 0; k < hb->nlevels; k++)
        free((void *)hb->lv[k]);
    free(hb);
}

uint64_t vd_hbitmap_len(const vd_hbitmap *hb)
{
    return hb->len;
}

unsigned vd_hbitmap_shift(const vd_hbitmap *hb)
{
    return hb->shift;
}

uint64_t vd_hbitmap_nbits(const vd_hbitmap *hb)
{
    return hb->nbits;
}

uint64_t vd_hbitmap_count(const vd_hbitmap *hb)
{
    return atomic_load(&hb->count) << hb->shift;
}

/* Word @i of level @k became non-zero: set its summary bits upwards. */
static void mark_up(vd_hbitmap *hb, unsigned k, uint64_t i)
{
    for (k++; k < hb->nlevels; k++) {
        uint64_t old = atomic_fetch_or(&hb->lv[k][i / 64], 1ull << (i % 64));
        if (old != 0)
            return;
        i /= 64;
    }
}

/* Word @i of level @k became zero: clear its summary bit, and recheck
 * the word afterwards (a setter may have raced with us). */
static void clear_up(vd_hbitmap *hb, unsigned k, uint64_t i)
{
    for (; k + 1 < hb->nlevels; k++) {
        uint64_t bit = 1ull << (i % 64);
        uint64_t now = atomic_fetch_and(&hb->lv[k + 1][i / 64], ~bit) & ~bit;
        if (atomic_load(&hb->lv[k][i]) != 0) {
            mark_up(hb, k, i);
            return;
        }
        if (now != 0)
            return;
        i /= 64;
    }
}

static inline void set_word(vd_hbitmap *hb, uint64_t w, uint64_t mask)
{
    /* Bits already set (the common case of rewrites): a plain load, no
     * read-modify-write that would take the cache line from the other
     * request threads. A reset that clears them after this load comes
     * after the write that is marking them, as if it came after the
     * fetch_or. */
    if ((atomic_load_explicit(&hb->lv[0][w], memory_order_acquire) & mask) ==
        mask)
        return;
    uint64_t old = atomic_fetch_or(&hb->lv[0][w], mask);
    uint64_t added = mask & ~old;
    if (added) {
        atomic_fetch_add(&hb->count, (uint64_t)__builtin_popcountll(added));
        if (old == 0)
            mark_up(hb, 0, w);
    }
}

static void reset_word(vd_hbitmap *hb, uint64_t w, uint64_t mask)
{
    uint64_t old = atomic_fetch_and(&hb->lv[0][w], ~mask);
    uint64_t gone = mask & old;
    if (gone) {
        atomic_fetch_sub(&hb->count, (uint64_t)__builtin_popcountll(gone));
        if ((old & ~mask) == 0)
            clear_up(hb, 0, w);
    }
}

/* Bits [first, last] within word @w. */
static uint64_t word_mask(uint64_t w, uint64_t first, uint64_t last)
{
    uint64_t lo = w * 64 > first ? 0 : first % 64;
    uint64_t hi = w * 64 + 63 < last ? 63 : last % 64;
    return (hi == 63 ? ~0ull : ((1ull << (hi + 1)) - 1)) &
           ~((1ull << lo) - 1);
}

/* The granules overlapping [off, off + bytes) as bits [*first, *last];
 * false when there are none. */
static bool bit_range(const vd_hbitmap *hb, uint64_t off, uint64_t bytes,
                      uint64_t *first, uint64_t *last)
{
    if (bytes == 0 || hb->nbits == 0)
        return false;
    *first = off >> hb->shift;
    if (*first >= hb->nbits)
        return false;
    uint64_t end = off + bytes - 1 < off ? UINT64_MAX : off + bytes - 1;
    *last = end >> hb->shift;
    if (*last >= hb->nbits)
        *last = hb->nbits - 1;
    return true;
}

bool vd_hbitmap_range_of(const vd_hbitmap *hb, uint64_t off, uint64_t bytes,
                         vd_hbitmap_range *r)
{
    uint64_t first, last;
    if (!bit_range(hb, off, bytes, &first, &last))
        return false;
    r->shift = hb->shift;
    r->nbits = hb->nbits;
    r->fw = first / 64;
    r->lw = last / 64;
    r->head = ~0ull << (first % 64);
    r->tail = ~0ull >> (63 - last % 64);
    return true;
}

bool vd_hbitmap_same_geometry(const vd_hbitmap *hb, const vd_hbitmap_range *r)
{
    return hb->shift == r->shift && hb->nbits == r->nbits;
}

void vd_hbitmap_set_range(vd_hbitmap *hb, const vd_hbitmap_range *r)
{
    /* Most requests touch one word: the path of every write. */
    if (r->fw == r->lw) {
        set_word(hb, r->fw, r->head & r->tail);
        return;
    }
    set_word(hb, r->fw, r->head);
    for (uint64_t w = r->fw + 1; w < r->lw; w++)
        set_word(hb, w, ~0ull);
    set_word(hb, r->lw, r->tail);
}

static inline bool word_has(const vd_hbitmap *hb, uint64_t w, uint64_t mask)
{
    return (atomic_load_explicit(&hb->lv[0][w], memory_order_acquire) &
            mask) == mask;
}

static bool range_is_set(const vd_hbitmap *hb, const vd_hbitmap_range *r)
{
    if (r->fw == r->lw)
        return word_has(hb, r->fw, r->head & r->tail);
    if (!word_has(hb, r->fw, r->head) || !word_has(hb, r->lw, r->tail))
        return false;
    for (uint64_t w = r->fw + 1; w < r->lw; w++)
        if (!word_has(hb, w, ~0ull))
            return false;
    return true;
}

bool vd_hbitmap_is_set(const vd_hbitmap *hb, uint64_t off, uint64_t bytes)
{
    uint64_t first = off >> hb->shift;
    uint64_t last = (off + bytes - 1) >> hb->shift;
    /* Inside the bitmap and one word: the rewrite of a dirty granule,
     * which is most writes, without vd_hbitmap_range_of()'s generality. */
    if (bytes && off + bytes > off && last < hb->nbits &&
        first / 64 == last / 64)
        return word_has(hb, first / 64, (~0ull << (first % 64)) &
                                        (~0ull >> (63 - last % 64)));
    vd_hbitmap_range r;
    return vd_hbitmap_range_of(hb, off, bytes, &r) && range_is_set(hb, &r);
}

void vd_hbitmap_set(vd_hbitmap *hb, uint64_t off, uint64_t bytes)
{
    vd_hbitmap_range r;
    if (vd_hbitmap_range_of(hb, off, bytes, &r))
        vd_hbitmap_set_range(hb, &r);
}

/* The first set bit of level 0 at or after @b, or -1. Walks up while
 * the rest of the current word is empty, down through set summary bits;
 * a summary bit whose word turned out empty (a concurrent reset) just
 * moves the search on. */
static int64_t find_dirty(const vd_hbitmap *hb, uint64_t b)
{
    unsigned k = 0;
    uint64_t pos = b;           /* a bit index at level k */
    for (;;) {
        if (pos / 64 >= hb->words[k])
            return -1;
        uint64_t w = atomic_load(&hb->lv[k][pos / 64]) &
                     (~0ull << (pos % 64));
        if (w == 0) {
            /* Nothing left in this word: the next word, one level up. */
            if (k + 1 >= hb->nlevels)
                return -1;
            pos = pos / 64 + 1;
            k++;
            continue;
        }
        pos = (pos & ~63ull) + (uint64_t)__builtin_ctzll(w);
        if (k == 0)
            return pos < hb->nbits ? (int64_t)pos : -1;
        /* Descend into word @pos of level k - 1. */
        k--;
        pos *= 64;
    }
}

/* The first clear bit at or after @b below nbits, or nbits. */
static uint64_t find_clean(const vd_hbitmap *hb, uint64_t b)
{
    while (b < hb->nbits) {
        uint64_t w = ~atomic_load(&hb->lv[0][b / 64]) & (~0ull << (b % 64));
        if (w) {
            b = (b & ~63ull) + (uint64_t)__builtin_ctzll(w);
            return b < hb->nbits ? b : hb->nbits;
        }
        b = (b / 64 + 1) * 64;
    }
    return hb->nbits;
}

void vd_hbitmap_reset(vd_hbitmap *hb, uint64_t off, uint64_t bytes)
{
    uint64_t first, last;
    if (!bit_range(hb, off, bytes, &first, &last))
        return;
    /* Only the words with bits set: the cost follows the dirty part. */
    int64_t b = find_dirty(hb, first);
    while (b >= 0 && (uint64_t)b <= last) {
        uint64_t w = (uint64_t)b / 64;
        reset_word(hb, w, word_mask(w, first, last));
        b = find_dirty(hb, (w + 1) * 64);
    }
}

void vd_hbitmap_clear_all(vd_hbitmap *hb)
{
    vd_hbitmap_reset(hb, 0, hb->len);
}

bool vd_hbitmap_get(const vd_hbitmap *hb, uint64_t off)
{
    uint64_t b = off >> hb->shift;
    if (b >= hb->nbits)
        return false;
    return (atomic_load(&hb->lv[0][b / 64]) >> (b % 64)) & 1;
}

/* The next dirty (@dirty) or clean granule overlapping [off, off+bytes). */
static int64_t next_of(const vd_hbitmap *hb, uint64_t off, uint64_t bytes,
                       bool dirty)
{
    uint64_t first, last;
    if (!bit_range(hb, off, bytes, &first, &last))
        return -1;
    int64_t b = dirty ? find_dirty(hb, first) : (int64_t)find_clean(hb, first);
    if (b < 0 || (uint64_t)b > last)
        return -1;
    uint64_t o = (uint64_t)b << hb->shift;
    return (int64_t)(o < off ? off : o);
}

int64_t vd_hbitmap_next_dirty(const vd_hbitmap *hb, uint64_t off,
                              uint64_t bytes)
{
    return next_of(hb, off, bytes, true);
}

int64_t vd_hbitmap_next_clean(const vd_hbitmap *hb, uint64_t off,
                              uint64_t bytes)
{
    return next_of(hb, off, bytes, false);
}

bool vd_hbitmap_next_dirty_area(const vd_hbitmap *hb, uint64_t off,
                                uint64_t end, uint64_t max,
                                uint64_t *start, uint64_t *bytes)
{
    if (end <= off)
        return false;
    uint64_t first, last;
    if (!bit_range(hb, off, end - off, &first, &last))
        return false;
    int64_t b = find_dirty(hb, first);
    if (b < 0 || (uint64_t)b > last)
        return false;
    uint64_t maxbits = max >> hb->shift;
    if (maxbits == 0)
        maxbits = 1;
    uint64_t e = find_clean(hb, (uint64_t)b);
    if (e - (uint64_t)b > maxbits)
        e = (uint64_t)b + maxbits;
    *start = (uint64_t)b << hb->shift;
    uint64_t stop = e << hb->shift;
    if (stop > hb->len)
        stop = hb->len;
    *bytes = stop - *start;
    return true;
}

int vd_hbitmap_merge(vd_hbitmap *dst, const vd_hbitmap *src)
{
    if (dst->len != src->len)
        return -EINVAL;
    if (dst == src)
        return 0;
    if (dst->shift == src->shift) {
        for (int64_t b = find_dirty(src, 0); b >= 0;
             b = find_dirty(src, ((uint64_t)b / 64 + 1) * 64)) {
            uint64_t w = (uint64_t)b / 64;
            set_word(dst, w, atomic_load(&src->lv[0][w]));
        }
        return 0;
    }
    uint64_t off = 0, s, n;
    while (vd_hbitmap_next_dirty_area(src, off, src->len, UINT64_MAX, &s,
                                      &n)) {
        vd_hbitmap_set(dst, s, n);
        off = s + n;
    }
    return 0;
}

vd_hbitmap *vd_hbitmap_copy(const vd_hbitmap *hb)
{
    vd_hbitmap *c = vd_hbitmap_new(hb->len, hb->shift);
    if (c)
        vd_hbitmap_merge(c, hb);
    return c;
}

size_t vd_hbitmap_serial_size(const vd_hbitmap *hb)
{
    return (size_t)((hb->nbits + 7) / 8);
}

void vd_hbitmap_serialize(const vd_hbitmap *hb, uint8_t *buf)
{
    size_t n = vd_hbitmap_serial_size(hb);
    memset(buf, 0, n);
    for (int64_t b = find_dirty(hb, 0); b >= 0;
         b = find_dirty(hb, ((uint64_t)b / 64 + 1) * 64)) {
        uint64_t w = (uint64_t)b / 64;
        uint64_t v = atomic_load(&hb->lv[0][w]);
        for (size_t j = 0; j < 8 && w * 8 + j < n; j++)
            buf[w * 8 + j] = (uint8_t)(v >> (8 * j));
    }
}

void vd_hbitmap_deserialize(vd_hbitmap *hb, const uint8_t *buf)
{
    size_t n = vd_hbitmap_serial_size(hb);
    vd_hbitmap_clear_all(hb);
    for (uint64_t w = 0; w * 8 < n; w++) {
        uint64_t v = 0;
        for (size_t j = 0; j < 8 && w * 8 + j < n; j++)
            v |= (uint64_t)buf[w * 8 + j] << (8 * j);
        /* The spec's padding bits past nbits are not ours. */
        if ((w + 1) * 64 > hb->nbits)
            v &= hb->nbits % 64 ? (1ull << (hb->nbits % 64)) - 1 : ~0ull;
        if (v)
            set_word(hb, w, v);
    }
}

int vd_hbitmap_sha256(const vd_hbitmap *hb, char out[65])
{
#ifdef VDISK_HAVE_GNUTLS
    size_t n = hb->words[0] * 8;
    uint8_t *buf = malloc(n);
    uint8_t digest[32];
    if (!buf)
        return -ENOMEM;
    /* QEMU hashes its words as they lie in memory; little-endian here
     * on every host, as x86 and aarch64 QEMU would. */
    for (uint64_t w = 0; w < hb->words[0]; w++) {
        uint64_t v = atomic_load(&hb->lv[0][w]);
        for (size_t j = 0; j < 8; j++)
            buf[w * 8 + j] = (uint8_t)(v >> (8 * j));
    }
    int r = gnutls_hash_fast(GNUTLS_DIG_SHA256, buf, n, digest);
    free(buf);
    if (r < 0)
        return -EIO;
    for (int i = 0; i < 32; i++) {
        static const char hex[] = "0123456789abcdef";
        out[2 * i] = hex[digest[i] >> 4];
        out[2 * i + 1] = hex[digest[i] & 15];
    }
    out[64] = '\0';
    return 0;
#else
    (void)hb;
    (void)out;
    return -ENOTSUP;
#endif
}

int vd_hbitmap_truncate(vd_hbitmap *hb, uint64_t len)
{
    vd_hbitmap *n = vd_hbitmap_new(len, hb->shift);
    if (!n)
        return -ENOMEM;
    uint64_t keep = len < hb->len ? len : hb->len;
    uint64_t off = 0, s, b;
    while (vd_hbitmap_next_dirty_area(hb, off, keep, UINT64_MAX, &s, &b)) {
        vd_hbitmap_set(n, s, b);
        off = s + b;
    }
    for (unsigned k = 0; k < hb->nlevels; k++)
        free((void *)hb->lv[k]);
    hb->len = n->len;
    hb->nbits = n->nbits;
    hb->nlevels = n->nlevels;
    memcpy(hb->words, n->words, sizeof(hb->words));
    memcpy(hb->lv, n->lv, sizeof(hb->lv));
    atomic_store(&hb->count, atomic_load(&n->count));
    free(n);
    return 0;
}
