/*
 * I/O vector helpers. A vd_iov either borrows an array (a flat buffer or
 * the caller's iovec list) or owns a growable one; slices copy only the
 * iovec entries, never the data.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/iov.h"

void vd_iov_init(vd_iov *v)
{
    v->iov = v->inline_iov;
    v->niov = 0;
    v->nalloc = 0;
    v->size = 0;
}

void vd_iov_init_buf(vd_iov *v, void *buf, size_t len)
{
    vd_iov_init(v);
    v->inline_iov[0].iov_base = buf;
    v->inline_iov[0].iov_len = len;
    v->niov = 1;
    v->size = len;
}

void vd_iov_init_external(vd_iov *v, const struct iovec *iov, int niov)
{
    v->iov = (struct iovec *)iov;
    v->niov = niov;
    v->nalloc = -1; /* borrowed: never grown or freed */
    v->size = 0;
    for (int i = 0; i < niov; i++)
        v->size += iov[i].iov_len;
}

int vd_iov_add(vd_iov *v, void *base, size_t len)
{
    if (len == 0)
        return 0;
    int cap = v->nalloc > 0 ? v->nalloc
              : v->iov == v->inline_iov ? VD_IOV_INLINE : 0;
    if (v->niov >= cap) {
        int ncap = cap < 8 ? 8 : cap * 2;
        struct iovec *n = malloc(sizeof(*n) * ncap);
        if (!n)
            return -ENOMEM;
        memcpy(n, v->iov, sizeof(*n) * v->niov);
        if (v->nalloc > 0)
            free(v->iov);
        v->iov = n;
        v->nalloc = ncap;
    }
    v->iov[v->niov].iov_base = base;
    v->iov[v->niov].iov_len = len;
    v->niov++;
    v->size += len;
    return 0;
}

int vd_iov_init_slice(vd_iov *dst, const vd_iov *src, size_t off, size_t len)
{
    vd_iov_init(dst);
    for (int i = 0; i < src->niov && len > 0; i++) {
        size_t l = src->iov[i].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        size_t take = l - off < len ? l - off : len;
        int r = vd_iov_add(dst, (uint8_t *)src->iov[i].iov_base + off, take);
        if (r < 0) {
            vd_iov_destroy(dst);
            return r;
        }
        len -= take;
        off = 0;
    }
    return 0;
}

void vd_iov_destroy(vd_iov *v)
{
    if (v->nalloc > 0)
        free(v->iov);
    vd_iov_init(v);
}

/*
 * Calls @fn on each piece of [off, off+len) of @v, in order, with the
 * piece's address, its length and how many bytes came before it. Stops
 * early when @fn returns false. Returns the bytes visited.
 */
static size_t iov_walk(const vd_iov *v, size_t off, size_t len,
                       bool (*fn)(uint8_t *piece, size_t n, size_t done,
                                  void *opaque),
                       void *opaque)
{
    size_t done = 0;
    for (int i = 0; i < v->niov && done < len; i++) {
        size_t l = v->iov[i].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        size_t take = l - off < len - done ? l - off : len - done;
        if (!fn((uint8_t *)v->iov[i].iov_base + off, take, done, opaque))
            break;
        done += take;
        off = 0;
    }
    return done;
}

static bool copy_out(uint8_t *piece, size_t n, size_t done, void *buf)
{
    memcpy((uint8_t *)buf + done, piece, n);
    return true;
}

static bool copy_in(uint8_t *piece, size_t n, size_t done, void *buf)
{
    memcpy(piece, (const uint8_t *)buf + done, n);
    return true;
}

static bool fill(uint8_t *piece, size_t n, size_t done, void *c)
{
    (void)done;
    memset(piece, *(int *)c, n);
    return true;
}

static bool piece_is_zero(uint8_t *piece, size_t n, size_t done, void *all)
{
    (void)done;
    if (!vd_buffer_is_zero(piece, n))
        *(bool *)all = false;
    return *(bool *)all;
}

size_t vd_iov_to_buf(const vd_iov *v, size_t off, void *buf, size_t len)
{
    return iov_walk(v, off, len, copy_out, buf);
}

size_t vd_iov_from_buf(vd_iov *v, size_t off, const void *buf, size_t len)
{
    return iov_walk(v, off, len, copy_in, (void *)buf);
}

void vd_iov_memset(vd_iov *v, size_t off, int c, size_t len)
{
    iov_walk(v, off, len, fill, &c);
}

bool vd_buffer_is_zero(const void *buf, size_t len)
{
    const uint8_t *p = buf;
    /* Check a prefix bytewise, then compare the buffer with itself shifted
     * by 16 bytes: memcmp is vectorised and this needs no zero page. */
    size_t head = len < 16 ? len : 16;
    for (size_t i = 0; i < head; i++)
        if (p[i])
            return false;
    if (len <= 16)
        return true;
    return memcmp(p, p + 16, len - 16) == 0;
}

bool vd_iov_is_zero(const vd_iov *v, size_t off, size_t len)
{
    bool all = true;
    iov_walk(v, off, len, piece_is_zero, &all);
    return all;
}
