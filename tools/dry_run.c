/*
 * The --dry-run helpers (dry_run.h): collecting the ranges a library dry
 * run reports and printing a result as human lines or JSON.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "dry_run.h"
#include "util.h"

void dry_ranges_add(uint64_t offset, uint64_t length, void *opaque)
{
    dry_ranges *r = opaque;

    if (!length) {
        return;
    }
    r->bytes += length;
    if (r->n && r->start[r->n - 1] + r->length[r->n - 1] == offset) {
        r->length[r->n - 1] += length;
        return;
    }
    if (r->n == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 64;
        uint64_t *s = realloc(r->start, cap * sizeof(*s));
        if (s) {
            r->start = s;
        }
        uint64_t *l = s ? realloc(r->length, cap * sizeof(*l)) : NULL;
        if (!l) {
            r->oom = true;
            return;
        }
        r->length = l;
        r->cap = cap;
    }
    r->start[r->n] = offset;
    r->length[r->n] = length;
    r->n++;
}

void dry_ranges_free(dry_ranges *r)
{
    free(r->start);
    free(r->length);
    r->start = r->length = NULL;
    r->n = r->cap = 0;
}

json_object *dry_json_new(const char *command, const char *image)
{
    json_object *o = json_object_new_object();

    json_object_object_add(o, "dry-run", json_object_new_boolean(1));
    json_object_object_add(o, "command", json_object_new_string(command));
    json_object_object_add(o, "image", json_object_new_string(image));
    return o;
}

json_object *dry_json_ranges(const dry_ranges *r)
{
    json_object *a = json_object_new_array();

    for (size_t i = 0; i < r->n; i++) {
        json_object *e = json_object_new_object();
        json_object_object_add(e, "start",
                               json_object_new_int64((int64_t)r->start[i]));
        json_object_object_add(e, "length",
                               json_object_new_int64((int64_t)r->length[i]));
        json_object_array_add(a, e);
    }
    return a;
}

void dry_json_print(json_object *obj)
{
    printf("%s\n", json_object_to_json_string_ext(obj,
               JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED |
               JSON_C_TO_STRING_NOSLASHESCAPE));
    json_object_put(obj);
}

const char *dry_size(char *buf, size_t len, uint64_t bytes)
{
    char h[32];

    cli_size_to_str(h, sizeof(h), bytes);
    snprintf(buf, len, "%s (%" PRIu64 " bytes)", h, bytes);
    return buf;
}

void dry_print_ranges(const dry_ranges *r)
{
    if (!r->n) {
        return;
    }
    printf("%-16s%s\n", "Offset", "Length");
    for (size_t i = 0; i < r->n; i++) {
        printf("%#-16" PRIx64 "%#" PRIx64 "\n", r->start[i], r->length[i]);
    }
}
