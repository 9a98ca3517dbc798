/*
 * The error object: the first error recorded wins, later context is
 * prepended ("disk.qcow2: " + "L2 table offset ... is not aligned").
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "core/error.h"

VD_API void vd_error_clear(vd_error *err)
{
    if (err) {
        err->code = 0;
        err->message[0] = '\0';
    }
}

static int error_vset(vd_error *err, int code, bool with_errno,
                      const char *fmt, va_list ap)
{
    if (!err || err->code != 0)
        return code;
    /* A zero code would make the error invisible; callers mean failure. */
    err->code = code ? code : -EIO;
    int n = vsnprintf(err->message, sizeof(err->message), fmt, ap);
    if (with_errno && n >= 0 && (size_t)n < sizeof(err->message)) {
        snprintf(err->message + n, sizeof(err->message) - n, ": %s",
                 strerror(code < 0 ? -code : code));
    }
    return code;
}

VD_API int vd_error_set(vd_error *err, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = error_vset(err, code, false, fmt, ap);
    va_end(ap);
    return r;
}

VD_API int vd_error_set_errno(vd_error *err, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = error_vset(err, code, true, fmt, ap);
    va_end(ap);
    return r;
}

VD_API void vd_error_prepend(vd_error *err, const char *fmt, ...)
{
    if (!err || err->code == 0)
        return;
    char prefix[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof(prefix), fmt, ap);
    va_end(ap);
    size_t plen = strnlen(prefix, sizeof(prefix) - 1);
    size_t olen = strnlen(err->message, sizeof(err->message) - 1);
    if (plen + olen > sizeof(err->message) - 1)
        olen = sizeof(err->message) - 1 - plen;
    memmove(err->message + plen, err->message, olen);
    memcpy(err->message, prefix, plen);
    err->message[plen + olen] = '\0';
}
