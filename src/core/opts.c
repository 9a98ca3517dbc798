/*
 * Option sets (vd_opts): an ordered list of key=value strings.
 *
 * Drivers take what they understand (vd_opts_take*), so whatever is left
 * after an open or a create is an option nobody knows and is reported by
 * name. Sizes and booleans are parsed the way qemu-img parses them.
 */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "core/opts.h"

typedef struct opt_entry {
    char *key;
    char *value;
} opt_entry;

struct vd_opts {
    opt_entry *v;
    size_t n, cap;
};

VD_API vd_opts *vd_opts_new(void)
{
    return calloc(1, sizeof(vd_opts));
}

VD_API void vd_opts_free(vd_opts **opts)
{
    if (!opts || !*opts)
        return;
    vd_opts *o = *opts;
    for (size_t i = 0; i < o->n; i++) {
        free(o->v[i].key);
        free(o->v[i].value);
    }
    free(o->v);
    free(o);
    *opts = NULL;
}

static ssize_t opts_find(const vd_opts *o, const char *key)
{
    for (size_t i = 0; i < o->n; i++)
        if (strcmp(o->v[i].key, key) == 0)
            return (ssize_t)i;
    return -1;
}

VD_API int vd_opts_set(vd_opts *o, const char *key, const char *value)
{
    if (!key || !*key || !value)
        return -EINVAL;
    char *nv = strdup(value);
    if (!nv)
        return -ENOMEM;
    ssize_t i = opts_find(o, key);
    if (i >= 0) {
        free(o->v[i].value);
        o->v[i].value = nv;
        return 0;
    }
    if (o->n == o->cap) {
        size_t ncap = o->cap ? o->cap * 2 : 8;
        opt_entry *nvec = realloc(o->v, ncap * sizeof(*nvec));
        if (!nvec) {
            free(nv);
            return -ENOMEM;
        }
        o->v = nvec;
        o->cap = ncap;
    }
    char *nk = strdup(key);
    if (!nk) {
        free(nv);
        return -ENOMEM;
    }
    o->v[o->n].key = nk;
    o->v[o->n].value = nv;
    o->n++;
    return 0;
}

VD_API const char *vd_opts_get(const vd_opts *o, const char *key)
{
    if (!o)
        return NULL;
    ssize_t i = opts_find(o, key);
    return i >= 0 ? o->v[i].value : NULL;
}

VD_API size_t vd_opts_count(const vd_opts *o)
{
    return o ? o->n : 0;
}

VD_API void vd_opts_nth(const vd_opts *o, size_t i, const char **key,
                        const char **value)
{
    *key = o->v[i].key;
    *value = o->v[i].value;
}

VD_API vd_opts *vd_opts_clone(const vd_opts *o)
{
    vd_opts *c = vd_opts_new();
    if (!c || !o)
        return c;
    for (size_t i = 0; i < o->n; i++) {
        if (vd_opts_set(c, o->v[i].key, o->v[i].value) < 0) {
            vd_opts_free(&c);
            return NULL;
        }
    }
    return c;
}

/* Copies one ','-terminated element of @s into a new string, turning
 * ",," into ','. Sets *end past the element (and its comma). */
static char *take_element(const char *s, const char **end)
{
    size_t len = strlen(s);
    char *out = malloc(len + 1);
    if (!out)
        return NULL;
    size_t j = 0;
    const char *p = s;
    while (*p) {
        if (*p == ',') {
            if (p[1] == ',') {
                out[j++] = ',';
                p += 2;
                continue;
            }
            p++;
            break;
        }
        out[j++] = *p++;
    }
    out[j] = '\0';
    *end = p;
    return out;
}

VD_API int vd_opts_parse(vd_opts *o, const char *str, const char *implied_key,
                         vd_error *err)
{
    const char *p = str;
    bool first = true;
    while (*p) {
        const char *next;
        char *elem = take_element(p, &next);
        if (!elem)
            return vd_error_set(err, -ENOMEM, "Out of memory");
        char *eq = strchr(elem, '=');
        int r;
        if (!eq) {
            if (first && implied_key && *elem) {
                r = vd_opts_set(o, implied_key, elem);
            } else if (*elem) {
                /* qemu treats a bare "name" as "name=on" */
                r = vd_opts_set(o, elem, "on");
            } else {
                free(elem);
                return vd_error_set(err, -EINVAL,
                                    "Invalid option list: empty element in '%s'",
                                    str);
            }
        } else {
            *eq = '\0';
            if (!*elem) {
                free(elem);
                return vd_error_set(err, -EINVAL,
                                    "Invalid option list: missing name in '%s'",
                                    str);
            }
            r = vd_opts_set(o, elem, eq + 1);
        }
        free(elem);
        if (r < 0)
            return vd_error_set(err, r, "Out of memory");
        first = false;
        p = next;
    }
    return 0;
}

VD_API char *vd_opts_take(vd_opts *o, const char *key)
{
    if (!o)
        return NULL;
    ssize_t i = opts_find(o, key);
    if (i < 0)
        return NULL;
    char *v = o->v[i].value;
    free(o->v[i].key);
    memmove(&o->v[i], &o->v[i + 1], (o->n - i - 1) * sizeof(o->v[0]));
    o->n--;
    return v;
}

VD_API void vd_opts_del(vd_opts *o, const char *key)
{
    free(vd_opts_take(o, key));
}

VD_API const char *vd_opts_first_key(const vd_opts *o)
{
    return o && o->n ? o->v[0].key : NULL;
}

/* @s as one of the spellings of @yes or @no (same length lists). */
static int parse_bool_from(const char *s, const char *const *yes,
                           const char *const *no, bool *out)
{
    for (int i = 0; yes[i]; i++) {
        if (strcmp(s, yes[i]) == 0) {
            *out = true;
            return 0;
        }
        if (strcmp(s, no[i]) == 0) {
            *out = false;
            return 0;
        }
    }
    return -EINVAL;
}

VD_API int vd_parse_bool(const char *s, bool *out)
{
    static const char *const yes[] = { "on", "true", "yes", "1", NULL };
    static const char *const no[] = { "off", "false", "no", "0", NULL };

    return parse_bool_from(s, yes, no, out);
}

int vd_parse_keyval_bool(const char *s, bool *out)
{
    static const char *const yes[] = { "on", "yes", "true", "y", NULL };
    static const char *const no[] = { "off", "no", "false", "n", NULL };

    return parse_bool_from(s, yes, no, out);
}

VD_API int vd_opts_take_bool(vd_opts *o, const char *key, bool def,
                             bool *out, vd_error *err)
{
    char *v = vd_opts_take(o, key);
    *out = def;
    if (!v)
        return 0;
    int r = vd_parse_bool(v, out);
    if (r < 0)
        vd_error_set(err, -EINVAL,
                     "Parameter '%s' expects 'on' or 'off'", key);
    free(v);
    return r < 0 ? -EINVAL : 0;
}

VD_API int vd_opts_take_size(vd_opts *o, const char *key, uint64_t def,
                             uint64_t *out, vd_error *err)
{
    char *v = vd_opts_take(o, key);
    *out = def;
    if (!v)
        return 0;
    int r = vd_parse_size(v, out);
    /* qemu's words for a value past its limit, though ours is 2^63 (the
     * largest image length) where qemu's QemuOpts take up to 2^64 - 1. */
    if (r == -ERANGE)
        vd_error_set(err, -EINVAL, "Value '%s' is out of range for "
                     "parameter '%s'", v, key);
    else if (r < 0)
        vd_error_set(err, -EINVAL,
                     "Parameter '%s' expects a non-negative number below "
                     "2^63 (optional suffix: k, M, G, T, P or E)", key);
    free(v);
    return r < 0 ? -EINVAL : 0;
}

VD_API int vd_opts_take_uint(vd_opts *o, const char *key, uint64_t def,
                             uint64_t *out, vd_error *err)
{
    char *v = vd_opts_take(o, key);
    *out = def;
    if (!v)
        return 0;
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 0);
    int r = 0;
    if (!*v || *end || errno || v[0] == '-') {
        r = vd_error_set(err, -EINVAL,
                         "Parameter '%s' expects a non-negative number", key);
    } else {
        *out = x;
    }
    free(v);
    return r;
}

VD_API int vd_opts_take_enum(vd_opts *o, const char *key,
                             const char *const *choices, int def, int *out,
                             vd_error *err)
{
    char *v = vd_opts_take(o, key);
    *out = def;
    if (!v)
        return 0;
    for (int i = 0; choices[i]; i++) {
        if (strcmp(v, choices[i]) == 0) {
            *out = i;
            free(v);
            return 0;
        }
    }
    char list[256] = "";
    for (int i = 0; choices[i]; i++) {
        if (i)
            strncat(list, ", ", sizeof(list) - strlen(list) - 1);
        strncat(list, choices[i], sizeof(list) - strlen(list) - 1);
    }
    vd_error_set(err, -EINVAL, "Parameter '%s' does not accept value '%s' "
                 "(expected one of: %s)", key, v, list);
    free(v);
    return -EINVAL;
}

vd_opts *vd_opts_extract_prefix(vd_opts *o, const char *prefix)
{
    vd_opts *sub = vd_opts_new();
    if (!sub || !o)
        return sub;
    size_t plen = strlen(prefix);
    for (size_t i = 0; i < o->n;) {
        if (strncmp(o->v[i].key, prefix, plen) == 0 && o->v[i].key[plen]) {
            if (vd_opts_set(sub, o->v[i].key + plen, o->v[i].value) < 0) {
                vd_opts_free(&sub);
                return NULL;
            }
            free(o->v[i].key);
            free(o->v[i].value);
            memmove(&o->v[i], &o->v[i + 1], (o->n - i - 1) * sizeof(o->v[0]));
            o->n--;
        } else {
            i++;
        }
    }
    return sub;
}

/*
 * qemu_strtosz's grammar: optional blanks and '+', a decimal or 0x-hex
 * integer, an optional decimal fraction (which needs a suffix other than
 * B), one optional suffix B/K/M/G/T/P/E in either case, and nothing else.
 */
static int parse_size(const char *str, uint64_t max, uint64_t *out);

VD_API int vd_parse_size(const char *str, uint64_t *out)
{
    return parse_size(str, INT64_MAX, out);
}

VD_API int vd_parse_size_u64(const char *str, uint64_t *out)
{
    return parse_size(str, UINT64_MAX, out);
}

static int parse_size(const char *str, uint64_t max, uint64_t *out)
{
    const char *p = str;
    if (!p)
        return -EINVAL;
    while (isspace((unsigned char)*p))
        p++;
    if (*p == '+')
        p++;
    bool hex = p[0] == '0' && (p[1] == 'x' || p[1] == 'X');
    if (!(hex ? isxdigit((unsigned char)p[2]) : isdigit((unsigned char)*p)))
        return -EINVAL;
    char *end;
    errno = 0;
    unsigned long long ival = strtoull(p, &end, hex ? 16 : 10);
    if (errno == ERANGE)
        return -ERANGE;
    p = end;
    double frac = 0;
    bool has_frac = false;
    if (*p == '.' && !hex) {
        has_frac = true;
        p++;
        double scale = 0.1;
        while (isdigit((unsigned char)*p)) {
            frac += (*p - '0') * scale;
            scale /= 10;
            p++;
        }
    }
    uint64_t mul = 1;
    if (*p) {
        switch (toupper((unsigned char)*p)) {
        case 'B': mul = 1; break;
        case 'K': mul = 1ULL << 10; break;
        case 'M': mul = 1ULL << 20; break;
        case 'G': mul = 1ULL << 30; break;
        case 'T': mul = 1ULL << 40; break;
        case 'P': mul = 1ULL << 50; break;
        case 'E': mul = 1ULL << 60; break;
        default: return -EINVAL;
        }
        p++;
    }
    /* A fraction needs a multiplier, unless it is zero ("1." or "1.0b"). */
    if (has_frac && mul == 1 && frac != 0)
        return -EINVAL;
    if (*p)
        return -EINVAL;
    if (ival > max / mul)
        return -ERANGE;
    uint64_t val = ival * mul;
    uint64_t fpart = (uint64_t)(frac * (double)mul);
    if (val > max - fpart)
        return -ERANGE;
    *out = val + fpart;
    return 0;
}
