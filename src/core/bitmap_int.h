/*
 * The core's internal side of named dirty bitmaps for jobs (bitmap.c,
 * docs/bitmaps.md "Incremental backup"): what a backup with a bitmap
 * does to it, after QEMU 7.2's successor model. Freezing a bitmap gives
 * it an anonymous successor that records the node's writes from then on
 * (if the bitmap recorded) while the bitmap itself keeps its bits, stops
 * recording and is busy. At the end of the job the bitmap either
 * abdicates (its bits are replaced by the successor's: what the job
 * copied is no longer dirty) or reclaims the successor (the successor's
 * bits are ORed back in: nothing is lost). Both are atomic with respect
 * to the node's writes: a write marks either the successor before the
 * switch or the bitmap after it.
 *
 * Graph lock held by the callers (QMP commands, job finalization).
 */
#ifndef VDISK_CORE_BITMAP_INT_H
#define VDISK_CORE_BITMAP_INT_H

#include <stdbool.h>

#include "block_int.h"
#include "hbitmap.h"

/* Whether @node itself (not its chain) has a bitmap @name
 * (QEMU's bdrv_find_dirty_bitmap()). */
bool vd_bitmap_exists(vd_node *node, const char *name);

/* QEMU's bdrv_dirty_bitmap_check() on bitmap @name of @node: busy and
 * inconsistent always, read-only unless @allow_ro. "Dirty bitmap 'X'
 * not found" when there is none. */
int vd_bitmap_check(vd_node *node, const char *name, bool allow_ro,
                    vd_error *err);

/* Creates the successor (recording when the bitmap was), and makes the
 * bitmap busy and not recording (QEMU's
 * bdrv_dirty_bitmap_create_successor()); its messages. */
int vd_bitmap_freeze(vd_node *node, const char *name, vd_error *err);

/* ORs the bits of frozen bitmap @name into @dst (of @dst's length;
 * granularities may differ). -ENOENT, -EINVAL when not frozen. */
int vd_bitmap_frozen_merge_into(vd_node *node, const char *name,
                                vd_hbitmap *dst);

/* Ends a freeze: with @abdicate the successor's bits replace the
 * bitmap's (QEMU's bdrv_dirty_bitmap_abdicate()), otherwise they are
 * ORed into the bitmap (bdrv_reclaim_dirty_bitmap()); then @also (may be
 * NULL: the bits a failed job did not copy) is ORed in. The bitmap is
 * no longer busy and records again when the successor did. */
int vd_bitmap_unfreeze(vd_node *node, const char *name, bool abdicate,
                       const vd_hbitmap *also, vd_error *err);

#endif
