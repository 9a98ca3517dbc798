/*
 * vdisk: the RBD incremental diff stream, part of libvdisk's public API.
 *
 * Ceph's `rbd export-diff` writes the changes between two snapshots of
 * an image (or everything allocated, without a start snapshot) as a
 * stream that `rbd import-diff` applies (Ceph's doc/dev/rbd-diff.rst):
 * a banner ("rbd diff v1\n" or "rbd diff v2\n"), metadata records
 * ('f' start snapshot, 't' end snapshot, 's' image size at the end; v2
 * adds 'p', the end snapshot's protection flag), then data records ('w'
 * offset, length and the bytes; 'z' offset and length of a range that
 * reads as zeros) and the end record 'e'. Every integer is
 * little-endian; v2 puts a 64-bit length of the record's payload after
 * every tag but 'e', so that a reader can skip tags it does not know.
 *
 * vd_rbd_diff_scan() reads one stream from a file descriptor and checks
 * every field before it hands out anything: the banner, each tag, each
 * length (names at most 4096 bytes as rbd reads them, v2 lengths equal
 * to what the record holds), data records inside the image size the
 * stream names, metadata before data, nothing cut short. `vdisk
 * import-diff` runs it twice: once to validate the whole stream before
 * the first write, once to apply it (docs/snapshots.md "Change sets").
 *
 * Errors: 0 or a negative errno (-EINVAL for a malformed stream, -EIO
 * for a read error, or what the callback returned), with a message
 * naming the fault and its stream offset in @err ("truncated stream:
 * record 'w' at offset 42 needs 4096 bytes of data, the stream ends at
 * offset 1000"). Threads: a scan touches only its arguments.
 */
#ifndef VDISK_RBD_DIFF_H
#define VDISK_RBD_DIFF_H

#include <stdbool.h>
#include <stdint.h>

#include "vdisk/vdisk.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The longest snapshot name a stream may carry (rbd's own limit). */
#define VD_RBD_DIFF_NAME_MAX 4096

/** What a scanned stream says (filled by vd_rbd_diff_scan()). */
typedef struct vd_rbd_diff_info {
    int version;            /* 1 or 2 */
    char *from_snap;        /* 'f': malloc'd, NUL-terminated, or NULL */
    char *to_snap;          /* 't': likewise */
    bool has_size;          /* an 's' record was seen */
    uint64_t size;          /* its image size */
    bool is_protected;      /* v2 'p': the end snapshot was protected */
    uint64_t write_records, write_bytes;  /* 'w' records and their bytes */
    uint64_t zero_records, zero_bytes;    /* 'z' records and their bytes */
    uint64_t skipped;       /* v2 records of unknown tags skipped */
    uint64_t end;           /* stream offset just past the 'e' */
} vd_rbd_diff_info;

/**
 * Called for each data record in stream order: [@offset, @offset +
 * @length) of the image is to read as zeros (@zero) or as the @length
 * bytes at stream offset @data_pos (an offset of the scanned file
 * descriptor). A negative return stops the scan and is returned.
 */
typedef int vd_rbd_diff_extent_fn(void *opaque, bool zero, uint64_t offset,
                                  uint64_t length, uint64_t data_pos,
                                  vd_error *err);

/**
 * Scans the stream that starts at offset @start of @fd (read with
 * pread(); the descriptor's position is left alone) and whose bytes end
 * at offset @limit at the latest (the file's size): every record is
 * checked, @info filled (free its names with vd_rbd_diff_info_clear()
 * even on failure), and @fn (may be NULL) called for each data record
 * that passed its checks. Data records must lie inside @image_size when
 * the stream has no size record (pass UINT64_MAX for no bound), inside
 * the size record's value when it has one. Bytes after the end record
 * are not read.
 */
VD_API int vd_rbd_diff_scan(int fd, uint64_t start, uint64_t limit,
                            uint64_t image_size, vd_rbd_diff_info *info,
                            vd_rbd_diff_extent_fn *fn, void *opaque,
                            vd_error *err);

/** Frees the names of @info and zeroes it. @info may be NULL. */
VD_API void vd_rbd_diff_info_clear(vd_rbd_diff_info *info);

#ifdef __cplusplus
}
#endif

#endif
