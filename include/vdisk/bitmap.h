/*
 * vdisk: named dirty bitmaps, part of libvdisk's public API.
 *
 * A dirty bitmap records which parts of a node were written since it was
 * created or last cleared, at a granularity (a power of two from 512 B
 * to 2 GiB). Backup tools use them for incremental backups: they read
 * only the extents a bitmap marks. The model and the messages are QEMU
 * 7.2's (../shared/specs/block-core.json, BlockDirtyBitmap*,
 * ../shared/specs/bitmaps.rst, docs/bitmaps.md):
 *
 *  - every write, zero write and discard of the node marks its range in
 *    every enabled ("recording") bitmap of the node before the request
 *    completes;
 *  - a disabled bitmap keeps its bits and records nothing;
 *  - a busy bitmap is in use by a job or an export and cannot be
 *    changed or removed;
 *  - a persistent bitmap is stored in the image (by formats that can,
 *    qcow2) when the node is closed or reopened read-only, and loaded
 *    when it is opened; a bitmap the image marks in use was not stored
 *    properly (a crash) and is inconsistent: it can only be removed;
 *  - a bitmap loaded from a read-only node is read-only: it can be
 *    enabled or disabled, not cleared or merged into.
 *
 * Errors: functions return 0 or a negative errno and fill @err with
 * QEMU's message ("Dirty bitmap 'b0' not found", "Bitmap already exists:
 * b0", "Bitmap 'b0' is currently in use by another operation and cannot
 * be used", ...).
 *
 * Threads: every function may be called from any thread while requests
 * run on the node. A request marks the bitmaps once its driver is done
 * and before it completes; a change (add, remove, clear, merge, enable,
 * disable) falls between two markings, never inside one, so a request
 * that completes after the change returns is in the changed bitmap
 * (docs/concurrency.md). A program that changes the graph from several
 * threads holds vd_graph_lock() around these calls too, as `vdisk serve`
 * does around every QMP command.
 */
#ifndef VDISK_BITMAP_H
#define VDISK_BITMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vdisk/vdisk.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Flags of vd_bitmap_add(). */
#define VD_BITMAP_PERSISTENT (1u << 0)   /* store in the image */
#define VD_BITMAP_DISABLED   (1u << 1)   /* created not recording */

/** What vd_bitmap_list() reports of one bitmap (QEMU's BlockDirtyInfo). */
typedef struct vd_bitmap_info {
    char *name;
    uint64_t granularity;       /* bytes per bit */
    uint64_t count;             /* dirty bits times the granularity */
    bool recording;             /* enabled: writes mark it */
    bool busy;                  /* in use by a job or an export */
    bool persistent;
    bool inconsistent;          /* not stored properly: remove it */
    bool readonly;              /* loaded from a read-only node */
} vd_bitmap_info;

/** A bitmap named by its node and name (merge sources). */
typedef struct vd_bitmap_ref {
    vd_node *node;
    const char *name;
} vd_bitmap_ref;

/**
 * The granularity a bitmap of @node gets when none is asked for: the
 * image's cluster size clamped to 4 KiB..64 KiB, or 64 KiB when the
 * format has no clusters (QEMU's bdrv_get_default_bitmap_granularity()).
 */
VD_API uint64_t vd_bitmap_default_granularity(vd_node *node);

/**
 * Adds bitmap @name to @node: clean, covering the node's current length,
 * at @granularity bytes (0: the default above), recording unless
 * VD_BITMAP_DISABLED. With VD_BITMAP_PERSISTENT the driver is asked
 * first whether it can store it (-ENOTSUP "Can't store persistent
 * bitmaps to NODE: Operation not supported" for formats that cannot).
 * Errors: -EINVAL for an empty name, a name over 1023 bytes, a
 * granularity that is not a power of two in 512..2 GiB; -EEXIST for a
 * name the node already has. The name is copied.
 */
VD_API int vd_bitmap_add(vd_node *node, const char *name,
                         uint64_t granularity, unsigned flags,
                         vd_error *err);

/**
 * Removes bitmap @name of @node; a persistent one is removed from the
 * image too. Refused (-EBUSY, -EPERM) for a busy or read-only bitmap;
 * an inconsistent one can be removed.
 */
VD_API int vd_bitmap_remove(vd_node *node, const char *name, vd_error *err);

/** Clears every bit. Refused for busy, read-only, inconsistent bitmaps. */
VD_API int vd_bitmap_clear(vd_node *node, const char *name, vd_error *err);

/** Starts / stops recording. Refused for busy and inconsistent bitmaps
 * (read-only ones may be enabled and disabled, as in QEMU). */
VD_API int vd_bitmap_enable(vd_node *node, const char *name, vd_error *err);
VD_API int vd_bitmap_disable(vd_node *node, const char *name, vd_error *err);

/**
 * ORs the bitmaps @src[0..n) (on @node or on other nodes) into bitmap
 * @target of @node, all or nothing: on an error the target is
 * unchanged. Sources must cover the same length as the target; their
 * granularities may differ (a dirty source granule marks every target
 * granule it overlaps). Refused for a busy, read-only or inconsistent
 * target and for busy or inconsistent sources.
 */
VD_API int vd_bitmap_merge(vd_node *node, const char *target,
                           const vd_bitmap_ref *src, size_t n,
                           vd_error *err);

/**
 * The bitmaps of @node, newest first as QEMU lists them: *@list is a
 * malloc'd array of *@count entries (NULL, 0 when there are none), which
 * the caller frees with vd_bitmap_list_free(). -ENOMEM.
 */
VD_API int vd_bitmap_list(vd_node *node, vd_bitmap_info **list,
                          size_t *count, vd_error *err);
VD_API void vd_bitmap_list_free(vd_bitmap_info *list, size_t count);

/** Fills @info (name malloc'd; free it) for bitmap @name of @node. */
VD_API int vd_bitmap_get_info(vd_node *node, const char *name,
                              vd_bitmap_info *info, vd_error *err);

/**
 * The first dirty extent of bitmap @name that starts at or after @off:
 * returns 1 and sets *@start, *@bytes (granule aligned, clamped to the
 * bitmap's length), 0 when there is none. Loop with off = start + bytes
 * to walk every extent; the cost follows the number of extents, not the
 * size of the node. Refused (-EINVAL) for an inconsistent bitmap.
 */
VD_API int vd_bitmap_next_dirty(vd_node *node, const char *name,
                                uint64_t off, uint64_t *start,
                                uint64_t *bytes, vd_error *err);

/** Whether @node (or the node a filter filters) can store persistent
 * bitmaps (qcow2 can). */
VD_API bool vd_bitmap_supports_persistent(vd_node *node);

/**
 * The node at or below @node that holds a bitmap named @name, searching
 * as QEMU does for an export's bitmaps: @node, then the node a filter
 * filters or a format's backing node, down the chain. NULL when none
 * has it. The node is borrowed (it lives as long as @node's chain).
 */
VD_API vd_node *vd_bitmap_find(vd_node *node, const char *name);

/**
 * The SHA-256 of the bitmap's contents as QEMU's
 * x-debug-block-dirty-bitmap-sha256 computes it (the same bits give the
 * same digest in both): 64 lower-case hex digits and a NUL in @out.
 * -ENOTSUP when the library was built without gnutls.
 */
VD_API int vd_bitmap_sha256(vd_node *node, const char *name, char out[65],
                            vd_error *err);

/**
 * Marks bitmap @name busy (in use by a job or an export: it cannot be
 * changed through this API meanwhile) or not busy. Refused (-EBUSY) to
 * mark a bitmap busy twice. A user that reads the bits checks first that
 * the bitmap is not inconsistent (vd_bitmap_get_info()).
 */
VD_API int vd_bitmap_set_busy(vd_node *node, const char *name, bool busy,
                              vd_error *err);

/**
 * The contents and state of a bitmap, kept aside to undo a change (the
 * QMP transaction's abort): vd_bitmap_save() copies bitmap @name of
 * @node; vd_bitmap_restore() puts the bits and the recording state back
 * (re-creating the bitmap when it was removed meanwhile, with its
 * granularity and persistence) and frees @saved;
 * vd_bitmap_saved_free() frees it unused. Writes to the node between
 * the save and the restore are kept in the restored bitmap when it was
 * recording at the save (the saved object tracks them), so an undo never
 * loses a write a backup would need. The saved object holds a reference
 * to @node. Errors: -ENOENT (no such bitmap), -ENOMEM.
 */
typedef struct vd_bitmap_saved vd_bitmap_saved;
VD_API int vd_bitmap_save(vd_node *node, const char *name,
                          vd_bitmap_saved **saved, vd_error *err);
VD_API int vd_bitmap_restore(vd_bitmap_saved *saved, vd_error *err);
VD_API void vd_bitmap_saved_free(vd_bitmap_saved *saved);

#ifdef __cplusplus
}
#endif

#endif
