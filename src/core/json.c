/*
 * JSON at the library's edge, in one place: the flattening of nested
 * option objects into dotted vd_opts keys (json: filenames in vd_open()
 * and QMP's blockdev-add both go through vd_opts_from_json()), and the
 * one formatter of qemu's ImageInfo (vd_image_info_to_json(), behind
 * `vdisk info --output=json` and QMP's query-named-block-nodes). json-c
 * stays an implementation detail: the public functions take and return
 * text.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "core/block_int.h"

/* ---- options ---- */

/* Longest dotted option name a nested object may produce, NUL included. */
#define MAX_OPT_NAME 512

static int flatten(vd_opts *o, const char *prefix, json_object *obj,
                   vd_error *err);

/* Adds @val as option @name: objects and arrays nested under it with
 * dotted names, array elements numbered from 0 as QEMU's qdict_flatten()
 * does ("inject-error.0.sector"). */
static int flatten_value(vd_opts *o, const char *name, json_object *val,
                         vd_error *err)
{
    char sub[MAX_OPT_NAME + 1];
    int r;

    switch (json_object_get_type(val)) {
    case json_type_object:
        snprintf(sub, sizeof(sub), "%s.", name);
        return flatten(o, sub, val, err);
    case json_type_array:
        for (size_t i = 0; i < json_object_array_length(val); i++) {
            int n = snprintf(sub, sizeof(sub), "%s.%zu", name, i);
            if (n < 0 || (size_t)n >= MAX_OPT_NAME)
                return vd_error_set(err, -EINVAL, "json: option name too "
                                    "long");
            r = flatten_value(o, sub, json_object_array_get_idx(val, i), err);
            if (r < 0)
                return r;
        }
        return 0;
    case json_type_boolean:
        r = vd_opts_set(o, name, json_object_get_boolean(val) ? "on" : "off");
        break;
    case json_type_null:
        r = vd_opts_set(o, name, "null");
        break;
    default:
        /* Strings as they are; numbers as json-c prints them (integers
         * in decimal). */
        r = vd_opts_set(o, name, json_object_get_string(val));
        break;
    }
    if (r < 0)
        return vd_error_set(err, r, "json: cannot set '%s'", name);
    return 0;
}

/* Adds the members of @obj under @prefix ("" or "file.") to @o; an error
 * in a nested object stops the walk and is returned as it is. */
static int flatten(vd_opts *o, const char *prefix, json_object *obj,
                   vd_error *err)
{
    json_object_object_foreach(obj, key, val) {
        char name[MAX_OPT_NAME - 32];
        int n = snprintf(name, sizeof(name), "%s%s", prefix, key);
        if (n < 0 || (size_t)n >= sizeof(name))
            return vd_error_set(err, -EINVAL, "json: option name too long");
        int r = flatten_value(o, name, val, err);
        if (r < 0)
            return r;
    }
    return 0;
}

VD_API int vd_opts_from_json(vd_opts *opts, const char *json, vd_error *err)
{
    /* 32 levels are far more than any graph needs and bound the
     * recursion of flatten(). */
    json_tokener *tok = json_tokener_new_ex(32);
    if (!tok)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    size_t len = strlen(json);
    if (len > INT32_MAX) {
        json_tokener_free(tok);
        return vd_error_set(err, -EINVAL, "Could not parse the JSON "
                            "options: too long");
    }
    json_object *obj = json_tokener_parse_ex(tok, json, (int)len);
    enum json_tokener_error jerr = json_tokener_get_error(tok);
    int r;
    if (!obj || jerr != json_tokener_success ||
        json_tokener_get_parse_end(tok) != len) {
        const char *why = jerr == json_tokener_continue
                          ? "unexpected end of input"
                          : jerr != json_tokener_success
                          ? json_tokener_error_desc(jerr) : "trailing text";
        r = vd_error_set(err, -EINVAL, "Could not parse the JSON options: "
                         "%s", why);
    } else if (!json_object_is_type(obj, json_type_object)) {
        r = vd_error_set(err, -EINVAL, "Invalid JSON object given");
    } else {
        r = flatten(opts, "", obj, err);
    }
    json_object_put(obj);
    json_tokener_free(tok);
    return r;
}

/* ---- ImageInfo ---- */

static json_object *jint(int64_t v)
{
    return json_object_new_int64(v);
}

/* qemu's SnapshotInfo, members in QAPI order. */
static json_object *snapshot_to_json(const vd_snapshot_info *sn)
{
    json_object *o = json_object_new_object();

    json_object_object_add(o, "id", json_object_new_string(sn->id));
    json_object_object_add(o, "name", json_object_new_string(sn->name));
    json_object_object_add(o, "vm-state-size",
                           jint((int64_t)sn->vm_state_size));
    json_object_object_add(o, "date-sec", jint(sn->date_sec));
    json_object_object_add(o, "date-nsec", jint(sn->date_nsec));
    json_object_object_add(o, "vm-clock-sec",
                           jint((int64_t)(sn->vm_clock_nsec / 1000000000)));
    json_object_object_add(o, "vm-clock-nsec",
                           jint((int64_t)(sn->vm_clock_nsec % 1000000000)));
    if (sn->icount != UINT64_MAX)
        json_object_object_add(o, "icount", jint((int64_t)sn->icount));
    return o;
}

/* qemu's ImageInfo, members in QAPI order (json-c keeps the order of
 * insertion, and the CLI's QDict-order printer breaks ties by it). */
static json_object *image_info_to_json(const vd_image_info *info)
{
    json_object *o = json_object_new_object();

    json_object_object_add(o, "filename", json_object_new_string(
                               info->filename ? info->filename : ""));
    json_object_object_add(o, "format", json_object_new_string(
                               info->format ? info->format : ""));
    if (info->has_dirty_flag)
        json_object_object_add(o, "dirty-flag",
                               json_object_new_boolean(info->dirty_flag));
    if (info->actual_size >= 0)
        json_object_object_add(o, "actual-size", jint(info->actual_size));
    json_object_object_add(o, "virtual-size",
                           jint((int64_t)info->virtual_size));
    if (info->cluster_size)
        json_object_object_add(o, "cluster-size",
                               jint((int64_t)info->cluster_size));
    if (info->encrypted)
        json_object_object_add(o, "encrypted", json_object_new_boolean(1));
    /* qemu fills the resolved name and the format only along with the
     * name itself. */
    if (info->backing_filename) {
        json_object_object_add(o, "backing-filename",
                               json_object_new_string(info->backing_filename));
        if (info->full_backing_filename)
            json_object_object_add(o, "full-backing-filename",
                json_object_new_string(info->full_backing_filename));
        if (info->backing_filename_format)
            json_object_object_add(o, "backing-filename-format",
                json_object_new_string(info->backing_filename_format));
    }
    if (info->nb_snapshots) {
        json_object *list = json_object_new_array();
        for (size_t i = 0; i < info->nb_snapshots; i++)
            json_object_array_add(list, snapshot_to_json(&info->snapshots[i]));
        json_object_object_add(o, "snapshots", list);
    }
    if (info->format_specific_json) {
        json_object *fs = json_tokener_parse(info->format_specific_json);
        if (fs)
            json_object_object_add(o, "format-specific", fs);
    }
    return o;
}

VD_API char *vd_image_info_to_json(const vd_image_info *info)
{
    json_object *o = image_info_to_json(info);
    if (!o)
        return NULL;
    const char *s = json_object_to_json_string_ext(
        o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
    char *out = s ? strdup(s) : NULL;
    json_object_put(o);
    return out;
}
