/*
 * A hierarchical bitmap (QEMU's HBitmap is the model): the bits of a
 * range of bytes at a power-of-two granularity, kept as levels of 64-bit
 * words where a bit of level k+1 says "word i of level k is not zero".
 * Searching the next dirty bit walks up and down the levels, so it costs
 * the number of levels plus the dirty words it passes, never the size of
 * the disk; a 1 TiB disk at 64 KiB granularity has 4 levels (256 Ki
 * words, 4 Ki, 64, 1).
 *
 * Offsets and lengths are in bytes of the covered range; bit i covers
 * [i << shift, (i + 1) << shift). The serialised form is the on-disk
 * order of ../shared/specs/bitmaps.rst and of vd_bitmap_image: bit i is
 * bit (i % 8) of byte i / 8.
 *
 * Threads: set, reset, merge and the searches may run from any number of
 * threads at once without a lock (atomic word operations; see the
 * comment in hbitmap.c and docs/concurrency.md). new, free, truncate and
 * deserialize need the bitmap to themselves.
 */
#ifndef VDISK_CORE_HBITMAP_H
#define VDISK_CORE_HBITMAP_H

#include "internal.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct vd_hbitmap vd_hbitmap;

/* A clean bitmap of @len bytes at 1 << @shift; NULL when out of memory. */
vd_hbitmap *vd_hbitmap_new(uint64_t len, unsigned shift);
void vd_hbitmap_free(vd_hbitmap *hb);
/* A copy of @hb's bits (the copy is taken word by word: a bit set
 * concurrently may or may not be in it). */
vd_hbitmap *vd_hbitmap_copy(const vd_hbitmap *hb);

uint64_t vd_hbitmap_len(const vd_hbitmap *hb);
unsigned vd_hbitmap_shift(const vd_hbitmap *hb);
uint64_t vd_hbitmap_nbits(const vd_hbitmap *hb);

void vd_hbitmap_set(vd_hbitmap *hb, uint64_t off, uint64_t bytes);
/* The bits of a byte range, worked out once for several bitmaps of the
 * same geometry (granularity and length): a write marks every recording
 * bitmap of its node, and most have the same granularity.
 * vd_hbitmap_range_of() fills @r for @hb (false: no bit, nothing to
 * set); vd_hbitmap_set_range() sets them in @hb, which must have the
 * geometry of the bitmap @r was made for (vd_hbitmap_same_geometry()). */
typedef struct vd_hbitmap_range {
    unsigned shift;
    uint64_t nbits;
    uint64_t fw, lw;          /* first and last word of level 0 */
    uint64_t head, tail;      /* the masks of those words */
} vd_hbitmap_range;
bool vd_hbitmap_range_of(const vd_hbitmap *hb, uint64_t off, uint64_t bytes,
                         vd_hbitmap_range *r);
bool vd_hbitmap_same_geometry(const vd_hbitmap *hb, const vd_hbitmap_range *r);
void vd_hbitmap_set_range(vd_hbitmap *hb, const vd_hbitmap_range *r);
/* Whether every granule overlapping [off, off + bytes) is set (false
 * when there is none): plain loads, a bit set concurrently may or may
 * not be seen. */
bool vd_hbitmap_is_set(const vd_hbitmap *hb, uint64_t off, uint64_t bytes);
void vd_hbitmap_reset(vd_hbitmap *hb, uint64_t off, uint64_t bytes);
void vd_hbitmap_clear_all(vd_hbitmap *hb);
bool vd_hbitmap_get(const vd_hbitmap *hb, uint64_t off);
/* Dirty bits times the granularity (QEMU's hbitmap_count()). */
uint64_t vd_hbitmap_count(const vd_hbitmap *hb);

/* The byte offset of the first dirty (clean) granule that overlaps
 * [off, off + bytes), clamped to @off, or -1 when there is none. */
int64_t vd_hbitmap_next_dirty(const vd_hbitmap *hb, uint64_t off,
                              uint64_t bytes);
int64_t vd_hbitmap_next_clean(const vd_hbitmap *hb, uint64_t off,
                              uint64_t bytes);
/* The first dirty run that starts in [off, end), granule aligned, at
 * most @max bytes (rounded down to granules, at least one), and clamped
 * to the bitmap's length. */
bool vd_hbitmap_next_dirty_area(const vd_hbitmap *hb, uint64_t off,
                                uint64_t end, uint64_t max,
                                uint64_t *start, uint64_t *bytes);

/* dst |= src. Granularities may differ (each dirty run of @src marks the
 * granules of @dst it overlaps), lengths must be equal: -EINVAL. */
int vd_hbitmap_merge(vd_hbitmap *dst, const vd_hbitmap *src);

/* ceil(nbits / 8): the size of the serialised bits. */
size_t vd_hbitmap_serial_size(const vd_hbitmap *hb);
void vd_hbitmap_serialize(const vd_hbitmap *hb, uint8_t *buf);
/* Replaces the bits with @buf's (vd_hbitmap_serial_size() bytes); bits
 * past the end in the last byte are ignored. */
void vd_hbitmap_deserialize(vd_hbitmap *hb, const uint8_t *buf);

/* The SHA-256 (64 lower-case hex digits and a NUL) of the bitmap's
 * words as QEMU's hbitmap_sha256() hashes them: its last level of
 * 64-bit little-endian words, at least one. -ENOTSUP without gnutls,
 * -ENOMEM. */
int vd_hbitmap_sha256(const vd_hbitmap *hb, char out[65]);

/* Changes the covered length; bits past a shrunk end are dropped, a
 * grown end is clean. -ENOMEM leaves @hb as it was. */
int vd_hbitmap_truncate(vd_hbitmap *hb, uint64_t len);

/* The bits of a job's dirty tracker (dirty.c). */
struct vd_dirty_tracker;
vd_hbitmap *vd_dirty_tracker_hbitmap(struct vd_dirty_tracker *t);

#endif
