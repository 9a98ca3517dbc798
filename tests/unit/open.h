/*
 * open_checked(): vd_open() of an image for a unit test, quietly (no
 * probing warnings), a failure recorded with CHECK. Include after
 * check.h.
 */
#ifndef VDISK_TESTS_OPEN_H
#define VDISK_TESTS_OPEN_H

#include "vdisk/vdisk.h"

/* The node, or NULL after a recorded failure. */
static inline vd_node *open_checked(const char *path, const char *fmt,
                                    unsigned flags)
{
    vd_error err = VD_ERROR_INIT;
    vd_node *n = NULL;
    int r = vd_open(&n, path, fmt, NULL, flags | VD_O_QUIET, &err);

    CHECK(r == 0, "open %s: %s", path, err.message);
    return r == 0 ? n : NULL;
}

#endif
