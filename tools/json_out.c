/*
 * qemu-compatible JSON printing (see json_out.h). The ordering helper
 * sorts a json-c object's members into QDict iteration order; the pretty
 * printer and the human dumper both walk members in that order.
 */
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "json_out.h"

#define QDICT_BUCKETS 512

/* QEMU's qdict hash (tdb_hash), reduced to a bucket index. */
static unsigned qdict_bucket(const char *name)
{
    uint32_t value = 0x238F13AFu * (uint32_t)strlen(name);

    for (unsigned i = 0; name[i]; i++) {
        value += (uint32_t)(unsigned char)name[i] << (i * 5 % 24);
    }
    return (1103515243u * value + 12345u) % QDICT_BUCKETS;
}

typedef struct member {
    const char *key;
    json_object *val;
    unsigned bucket;
    size_t index;
} member;

static int member_cmp(const void *a, const void *b)
{
    const member *x = a, *y = b;

    if (x->bucket != y->bucket) {
        return x->bucket < y->bucket ? -1 : 1;
    }
    /* QDict inserts at the head of a bucket's list. */
    return x->index > y->index ? -1 : (x->index < y->index ? 1 : 0);
}

/* Returns the members of @obj in QDict order (caller frees), count in *n. */
static member *ordered_members(json_object *obj, size_t *n)
{
    size_t count = (size_t)json_object_object_length(obj), i = 0;
    member *m = calloc(count ? count : 1, sizeof(*m));

    if (!m) {
        abort();
    }
    json_object_object_foreach(obj, key, val) {
        m[i].key = key;
        m[i].val = val;
        m[i].bucket = qdict_bucket(key);
        m[i].index = i;
        i++;
    }
    qsort(m, count, sizeof(*m), member_cmp);
    *n = count;
    return m;
}

/* Decodes one UTF-8 code point; -1 for a malformed sequence. */
static int utf8_next(const unsigned char *s, const unsigned char **end)
{
    int len, cp;

    if (s[0] < 0x80) {
        *end = s + 1;
        return s[0];
    } else if ((s[0] & 0xe0) == 0xc0) {
        len = 2;
        cp = s[0] & 0x1f;
    } else if ((s[0] & 0xf0) == 0xe0) {
        len = 3;
        cp = s[0] & 0x0f;
    } else if ((s[0] & 0xf8) == 0xf0) {
        len = 4;
        cp = s[0] & 0x07;
    } else {
        *end = s + 1;
        return -1;
    }
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) {
            *end = s + i;
            return -1;
        }
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    *end = s + len;
    return cp;
}

static void print_string(FILE *out, const char *str)
{
    const unsigned char *p = (const unsigned char *)str, *end;

    fputc('"', out);
    for (; *p; p = end) {
        int cp = utf8_next(p, &end);

        switch (cp) {
        case '"': fputs("\\\"", out); break;
        case '\\': fputs("\\\\", out); break;
        case '\b': fputs("\\b", out); break;
        case '\f': fputs("\\f", out); break;
        case '\n': fputs("\\n", out); break;
        case '\r': fputs("\\r", out); break;
        case '\t': fputs("\\t", out); break;
        default:
            if (cp < 0) {
                cp = 0xFFFD;
            }
            if (cp > 0xFFFF) {
                fprintf(out, "\\u%04X\\u%04X", 0xD800 + ((cp - 0x10000) >> 10),
                        0xDC00 + ((cp - 0x10000) & 0x3FF));
            } else if (cp < 0x20 || cp >= 0x7F) {
                fprintf(out, "\\u%04X", cp);
            } else {
                fputc(cp, out);
            }
        }
    }
    fputc('"', out);
}

static void print_int(FILE *out, json_object *obj)
{
    int64_t v = json_object_get_int64(obj);

    if (v == INT64_MAX && json_object_get_uint64(obj) > (uint64_t)INT64_MAX) {
        fprintf(out, "%" PRIu64, json_object_get_uint64(obj));
    } else {
        fprintf(out, "%" PRId64, v);
    }
}

static void newline(FILE *out, int indent)
{
    fprintf(out, "\n%*s", indent * 4, "");
}

static void print_value(FILE *out, json_object *obj, int indent)
{
    switch (json_object_get_type(obj)) {
    case json_type_null:
        fputs("null", out);
        break;
    case json_type_boolean:
        fputs(json_object_get_boolean(obj) ? "true" : "false", out);
        break;
    case json_type_int:
        print_int(out, obj);
        break;
    case json_type_double:
        fprintf(out, "%.17g", json_object_get_double(obj));
        break;
    case json_type_string:
        print_string(out, json_object_get_string(obj));
        break;
    case json_type_object: {
        size_t n;
        member *m = ordered_members(obj, &n);

        fputc('{', out);
        for (size_t i = 0; i < n; i++) {
            if (i) {
                fputc(',', out);
            }
            newline(out, indent + 1);
            print_string(out, m[i].key);
            fputs(": ", out);
            print_value(out, m[i].val, indent + 1);
        }
        newline(out, indent);
        fputc('}', out);
        free(m);
        break;
    }
    case json_type_array: {
        size_t n = json_object_array_length(obj);

        fputc('[', out);
        for (size_t i = 0; i < n; i++) {
            if (i) {
                fputc(',', out);
            }
            newline(out, indent + 1);
            print_value(out, json_object_array_get_idx(obj, i), indent + 1);
        }
        newline(out, indent);
        fputc(']', out);
        break;
    }
    }
}

void json_qemu_print(FILE *out, json_object *obj)
{
    print_value(out, obj, 0);
    fputc('\n', out);
}

static bool is_composite(json_object *obj)
{
    json_type t = json_object_get_type(obj);

    return t == json_type_object || t == json_type_array;
}

static void dump_scalar(FILE *out, json_object *obj)
{
    switch (json_object_get_type(obj)) {
    case json_type_boolean:
        fputs(json_object_get_boolean(obj) ? "true" : "false", out);
        break;
    case json_type_int:
        print_int(out, obj);
        break;
    case json_type_double:
        fprintf(out, "%f", json_object_get_double(obj));
        break;
    case json_type_string:
        fputs(json_object_get_string(obj), out);
        break;
    default:
        break;
    }
}

void json_qemu_dump_human(FILE *out, json_object *obj, int indent)
{
    if (json_object_get_type(obj) == json_type_object) {
        size_t n;
        member *m = ordered_members(obj, &n);

        for (size_t i = 0; i < n; i++) {
            bool comp = is_composite(m[i].val);

            fprintf(out, "%*s", indent * 4, "");
            for (const char *k = m[i].key; *k; k++) {
                fputc(*k == '-' ? ' ' : *k, out);
            }
            fprintf(out, ":%c", comp ? '\n' : ' ');
            json_qemu_dump_human(out, m[i].val, indent + 1);
            if (!comp) {
                fputc('\n', out);
            }
        }
        free(m);
    } else if (json_object_get_type(obj) == json_type_array) {
        size_t n = json_object_array_length(obj);

        for (size_t i = 0; i < n; i++) {
            json_object *v = json_object_array_get_idx(obj, i);
            bool comp = is_composite(v);

            fprintf(out, "%*s[%zu]:%c", indent * 4, "", i, comp ? '\n' : ' ');
            json_qemu_dump_human(out, v, indent + 1);
            if (!comp) {
                fputc('\n', out);
            }
        }
    } else {
        dump_scalar(out, obj);
    }
}
