/*
 * The authorization object classes (QEMU's authz/simple.c and
 * authz/list.c, 7.2): authz-simple allows one identity; authz-list walks
 * its rules in order (an exact string or a glob with '*' and '?'), the
 * first match deciding, else its default policy. vd_authz_is_allowed()
 * is the question a server asks with a client's identity (an X.509
 * distinguished name, a PSK username).
 *
 * One difference from QEMU, on purpose: a qom-set of "rules" that fails
 * its checks leaves the old rules in place, where QEMU is left with none
 * (and so, with policy=allow, would let everybody in).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core/object.h"

/* ---- authz-simple ---- */

typedef struct authz_simple {
    vd_object obj;
    char *identity;
} authz_simple;

static const obj_prop simple_props[] = {
    { "identity", &obj_type_str, OBJ_PROP_WRITABLE, obj_set_str_field,
      obj_get_str_field, offsetof(authz_simple, identity) },
    { NULL, NULL, 0, NULL, NULL, 0 },
};

static void simple_finalize(vd_object *obj)
{
    free(((authz_simple *)obj)->identity);
}

const obj_class obj_class_authz_simple = {
    .name = "authz-simple",
    .size = sizeof(authz_simple),
    .props = simple_props,
    .finalize = simple_finalize,
};

/* ---- authz-list ---- */

static const char *const policy_values[] = { "deny", "allow", NULL };
static const char *const format_values[] = { "exact", "glob", NULL };
enum { POLICY_DENY, POLICY_ALLOW };
enum { FORMAT_EXACT, FORMAT_GLOB };

static const obj_type policy_type = { OBJ_ENUM, "QAuthZListPolicy",
                                      policy_values, NULL, NULL };
static const obj_type format_type = { OBJ_ENUM, "QAuthZListFormat",
                                      format_values, NULL, NULL };
static const obj_member rule_members[] = {
    { "match", &obj_type_str, false },
    { "policy", &policy_type, false },
    { "format", &format_type, true },
    { NULL, NULL, false },
};
static const obj_type rule_type = { OBJ_STRUCT, "QAuthZListRule", NULL,
                                    rule_members, NULL };
/* QOM calls the list property by its element's type name. */
static const obj_type rules_type = { OBJ_LIST, "QAuthZListRule", NULL, NULL,
                                     &rule_type };

typedef struct rule {
    char *match;
    int policy;
    int format;
    bool has_format;     /* qom-get shows format only when it was given */
} rule;

typedef struct authz_list {
    vd_object obj;
    int policy;
    rule *rules;
    size_t nrules;
} authz_list;

static void free_rules(rule *rules, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(rules[i].match);
    }
    free(rules);
}

static int set_rules(vd_object *obj, const obj_prop *prop, json_object *val,
                     vd_error *err)
{
    authz_list *l = (authz_list *)obj;
    size_t n = json_object_array_length(val);
    rule *rules = calloc(n ? n : 1, sizeof(*rules));

    (void)prop;
    if (!rules) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        json_object *r = json_object_array_get_idx(val, i), *f;
        rules[i].match = strdup(json_object_get_string(
            json_object_object_get(r, "match")));
        if (!rules[i].match) {
            free_rules(rules, n);
            return vd_error_set(err, -ENOMEM, "Out of memory");
        }
        rules[i].policy = obj_enum_index(policy_values, json_object_get_string(
            json_object_object_get(r, "policy")));
        rules[i].has_format = json_object_object_get_ex(r, "format", &f);
        rules[i].format = rules[i].has_format
            ? obj_enum_index(format_values, json_object_get_string(f))
            : FORMAT_EXACT;
    }
    free_rules(l->rules, l->nrules);
    l->rules = rules;
    l->nrules = n;
    return 0;
}

static json_object *get_rules(vd_object *obj, const obj_prop *prop)
{
    authz_list *l = (authz_list *)obj;
    json_object *a = json_object_new_array();

    (void)prop;
    for (size_t i = 0; a && i < l->nrules; i++) {
        json_object *r = json_object_new_object();
        if (!r) {
            json_object_put(a);
            return NULL;
        }
        json_object_object_add(r, "match",
                               json_object_new_string(l->rules[i].match));
        json_object_object_add(r, "policy", json_object_new_string(
            policy_values[l->rules[i].policy]));
        if (l->rules[i].has_format) {
            json_object_object_add(r, "format", json_object_new_string(
                format_values[l->rules[i].format]));
        }
        json_object_array_add(a, r);
    }
    return a;
}

static const obj_prop list_props[] = {
    { "policy", &policy_type, OBJ_PROP_OPTIONAL | OBJ_PROP_WRITABLE,
      obj_set_enum_field, obj_get_enum_field, offsetof(authz_list, policy) },
    { "rules", &rules_type, OBJ_PROP_OPTIONAL | OBJ_PROP_WRITABLE,
      set_rules, get_rules, 0 },
    { NULL, NULL, 0, NULL, NULL, 0 },
};

static void list_finalize(vd_object *obj)
{
    authz_list *l = (authz_list *)obj;

    free_rules(l->rules, l->nrules);
}

const obj_class obj_class_authz_list = {
    .name = "authz-list",
    .size = sizeof(authz_list),
    .props = list_props,
    .finalize = list_finalize,
};

/* ---- the question ---- */

/* Length of the UTF-8 character at @s (1 for a stray byte). */
static size_t utf8_len(const char *s)
{
    size_t n = 1;

    while (((unsigned char)s[n] & 0xc0) == 0x80) {
        n++;
    }
    return n;
}

/* glib's g_pattern_match_simple(): '*' matches any run of characters,
 * '?' exactly one (UTF-8) character, everything else itself. */
static bool glob_match(const char *pat, const char *s)
{
    const char *star = NULL, *resume = NULL;

    while (*s) {
        if (*pat == '*') {
            star = ++pat;
            resume = s;
        } else if (*pat == '?') {
            pat++;
            s += utf8_len(s);
        } else if (*pat && *pat == *s) {
            pat++;
            s++;
        } else if (star) {
            /* Let the last star eat one more character. */
            pat = star;
            resume += utf8_len(resume);
            s = resume;
        } else {
            return false;
        }
    }
    while (*pat == '*') {
        pat++;
    }
    return *pat == '\0';
}

VD_API int vd_authz_is_allowed(const char *id, const char *identity,
                               vd_error *err)
{
    vd_object *obj;
    int r;

    obj_lock();
    obj = obj_find_locked(id);
    if (!obj) {
        r = vd_error_set(err, -ENOENT, "Cannot find QAuthZ object ID %s", id);
    } else if (obj->cls == &obj_class_authz_simple) {
        r = strcmp(((authz_simple *)obj)->identity, identity) == 0;
    } else if (obj->cls == &obj_class_authz_list) {
        authz_list *l = (authz_list *)obj;
        r = l->policy == POLICY_ALLOW;
        for (size_t i = 0; i < l->nrules; i++) {
            const rule *ru = &l->rules[i];
            bool hit = ru->format == FORMAT_GLOB
                       ? glob_match(ru->match, identity)
                       : strcmp(ru->match, identity) == 0;
            if (hit) {
                r = ru->policy == POLICY_ALLOW;
                break;
            }
        }
    } else {
        r = vd_error_set(err, -EINVAL, "Object '%s' is not a QAuthZ "
                         "subclass", id);
    }
    obj_unlock();
    return r;
}
