/*
 * Error helpers for the library's internals. The helpers themselves
 * (vd_error_set(), vd_error_set_errno(), vd_error_prepend(),
 * vd_error_is_set()) are public and documented in vdisk.h: a negative
 * errno plus a one-line message, the first error set wins, context is
 * prepended on the way up ("disk.qcow2: "). This header stays so that
 * library sources keep one internal entry point for them.
 */
#ifndef VDISK_CORE_ERROR_H
#define VDISK_CORE_ERROR_H

#include "internal.h"

#include "vdisk/vdisk.h"

#endif
