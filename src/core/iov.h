/*
 * I/O vectors: a list of buffers with a total size, the unit requests
 * carry through the graph. Small vectors live inline; slicing a vector
 * allocates only when it has more than VD_IOV_INLINE pieces.
 */
#ifndef VDISK_CORE_IOV_H
#define VDISK_CORE_IOV_H

#include "internal.h"

#include <stdbool.h>
#include <stddef.h>
#include <sys/uio.h>

#define VD_IOV_INLINE 4

typedef struct vd_iov {
    struct iovec *iov;
    int niov;
    int nalloc;              /* 0 when iov points at inline or foreign */
    size_t size;             /* sum of iov_len */
    struct iovec inline_iov[VD_IOV_INLINE];
} vd_iov;

/* A vector of one flat buffer (no allocation). */
void vd_iov_init_buf(vd_iov *v, void *buf, size_t len);
/* A vector that refers to the caller's array (no copy; not owned). */
void vd_iov_init_external(vd_iov *v, const struct iovec *iov, int niov);
/* An empty vector to which pieces are added. */
void vd_iov_init(vd_iov *v);
/* Appends a piece. Returns 0 or -ENOMEM. */
int vd_iov_add(vd_iov *v, void *base, size_t len);
/* @dst = bytes [off, off+len) of @src. Returns 0 or -ENOMEM. */
int vd_iov_init_slice(vd_iov *dst, const vd_iov *src, size_t off, size_t len);
/* Frees what the vector allocated (not the buffers). */
void vd_iov_destroy(vd_iov *v);

/* Copies out of / into the vector at @off; returns bytes copied. */
size_t vd_iov_to_buf(const vd_iov *v, size_t off, void *buf, size_t len);
size_t vd_iov_from_buf(vd_iov *v, size_t off, const void *buf, size_t len);
/* Fills [off, off+len) with byte @c. */
void vd_iov_memset(vd_iov *v, size_t off, int c, size_t len);
/* True when [off, off+len) is all zero bytes. */
bool vd_iov_is_zero(const vd_iov *v, size_t off, size_t len);
/* True when a flat buffer is all zero bytes (fast). */
bool vd_buffer_is_zero(const void *buf, size_t len);

#endif
