/*
 * Internal side of vd_opts. Taking options (vd_opts_take*(), so that what
 * remains after open or create is an unknown option reported by name),
 * vd_opts_del(), vd_opts_first_key(), vd_parse_bool() and
 * vd_opts_from_json() are public (vdisk.h); what only the core needs to
 * split option sets between nodes is here.
 */
#ifndef VDISK_CORE_OPTS_H
#define VDISK_CORE_OPTS_H

#include "internal.h"

#include "vdisk/vdisk.h"

/* Moves every key that starts with @prefix (given with its dot, "file.")
 * into a new set without the prefix. Returns the new
 * set (possibly empty) or NULL on ENOMEM. */
vd_opts *vd_opts_extract_prefix(vd_opts *opts, const char *prefix);

/* A boolean as QEMU's keyval input (--object, qapi_bool_parse()) spells
 * it: on/yes/true/y or off/no/false/n. 0 or -EINVAL. */
int vd_parse_keyval_bool(const char *s, bool *out);

#endif
