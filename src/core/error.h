/*
 * Error helpers for the library's internals. The public type is vd_error
 * (vdisk.h): a negative errno plus a one-line message. The first error set
 * wins; context is prepended on the way up ("disk.qcow2: ").
 */
#ifndef VDISK_CORE_ERROR_H
#define VDISK_CORE_ERROR_H

#include "vdisk/vdisk.h"

/* Records @code (a negative errno) and a printf-style message in @err,
 * unless @err is NULL or already holds an error. Returns @code so callers
 * can write `return vd_error_set(err, -EINVAL, "...")`. */
int vd_error_set(vd_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Like vd_error_set() with strerror(-code) appended after ": ". */
int vd_error_set_errno(vd_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prepends "PREFIX" to the message already in @err (no-op when empty). */
void vd_error_prepend(vd_error *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* True when @err holds an error. */
static inline bool vd_error_is_set(const vd_error *err)
{
    return err && err->code != 0;
}

#endif
