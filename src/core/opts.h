/*
 * Internal side of vd_opts: drivers *take* the options they understand,
 * so that what remains after open or create is an unknown option and can
 * be reported by name.
 */
#ifndef VDISK_CORE_OPTS_H
#define VDISK_CORE_OPTS_H

#include <stdbool.h>
#include <stdint.h>

#include "vdisk/vdisk.h"

/* Removes @key and returns its value (caller frees), or NULL. */
char *vd_opts_take(vd_opts *opts, const char *key);

/* Typed takers: when @key is absent *out = @def and 0 is returned; a
 * malformed value gives -EINVAL with "Parameter 'KEY' expects ...". */
int vd_opts_take_bool(vd_opts *opts, const char *key, bool def, bool *out,
                      vd_error *err);
int vd_opts_take_size(vd_opts *opts, const char *key, uint64_t def,
                      uint64_t *out, vd_error *err);
int vd_opts_take_uint(vd_opts *opts, const char *key, uint64_t def,
                      uint64_t *out, vd_error *err);
/* Takes a value that must be one of the NULL-terminated @choices; *out
 * is its index (or @def when absent). */
int vd_opts_take_enum(vd_opts *opts, const char *key,
                      const char *const *choices, int def, int *out,
                      vd_error *err);

/* Moves every key that starts with @prefix (given with its dot, "file.")
 * into a new set without the prefix. Returns the new
 * set (possibly empty) or NULL on ENOMEM. */
vd_opts *vd_opts_extract_prefix(vd_opts *opts, const char *prefix);

/* Removes @key if present. */
void vd_opts_del(vd_opts *opts, const char *key);

/* The first key left (borrowed), or NULL when empty. */
const char *vd_opts_first_key(const vd_opts *opts);

/* Parses a boolean "on/off/true/false/yes/no/1/0". */
int vd_parse_bool(const char *str, bool *out);

#endif
