/*
 * The object registry (QEMU's user-creatable objects; object.h has the
 * class interface, vdisk.h the public one, docs/objects.md the whole).
 *
 * In order: the class table and QEMU 7.2's list of object types; the
 * registry and its lock; the command-line parser (QEMU's keyval syntax,
 * "TYPE,id=ID,a.b=1,list.0.x=y", into a JSON tree of strings); the type
 * checker (QEMU's QAPI input visitor: the same checks in the same order
 * with the same messages, converting command-line strings to typed
 * values); creating, deleting, listing, getting and setting; the help
 * listings; the helpers classes share (field properties, base64).
 *
 * Every way in (vd_object_add() from vd_opts, vd_object_add_cli() from
 * an --object argument, vd_object_add_json() from QMP) ends in
 * object_create(), which takes the checked tree.
 */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/object.h"
#include "core/opts.h"

/* ---- classes and types ---- */

static const obj_class *const class_table[] = {
    &obj_class_authz_list,
    &obj_class_authz_simple,
    &obj_class_secret,
    &obj_class_throttle_group,
    &obj_class_tls_creds_psk,
    &obj_class_tls_creds_x509,
};
#define N_CLASSES (sizeof(class_table) / sizeof(class_table[0]))

/* QEMU 7.2's ObjectType enum as qemu-storage-daemon's query-qmp-schema
 * lists it: qom-type must be one of these, and those vdisk has no class
 * for are refused by name. */
static const char *const qemu_object_types[] = {
    "authz-list", "authz-listfile", "authz-pam", "authz-simple", "can-bus",
    "can-host-socketcan", "colo-compare", "cryptodev-backend",
    "cryptodev-backend-builtin", "cryptodev-backend-lkcf",
    "cryptodev-vhost-user", "dbus-vmstate", "filter-buffer", "filter-dump",
    "filter-mirror", "filter-redirector", "filter-replay", "filter-rewriter",
    "input-barrier", "input-linux", "iothread", "main-loop",
    "memory-backend-epc", "memory-backend-file", "memory-backend-memfd",
    "memory-backend-ram", "pef-guest", "pr-manager-helper", "qtest",
    "rng-builtin", "rng-egd", "rng-random", "secret", "secret_keyring",
    "sev-guest", "thread-context", "s390-pv-guest", "throttle-group",
    "tls-creds-anon", "tls-creds-psk", "tls-creds-x509", "tls-cipher-suites",
    "x-remote-object", "x-vfio-user-server", NULL,
};

const obj_type obj_type_str = { OBJ_STR, "string", NULL, NULL, NULL };
const obj_type obj_type_bool = { OBJ_BOOL, "bool", NULL, NULL, NULL };
const obj_type obj_type_int = { OBJ_INT, "int", NULL, NULL, NULL };
static const obj_type qom_type_type = { OBJ_ENUM, "ObjectType",
                                        qemu_object_types, NULL, NULL };

static const obj_class *find_class(const char *name)
{
    for (size_t i = 0; i < N_CLASSES; i++) {
        if (strcmp(class_table[i]->name, name) == 0) {
            return class_table[i];
        }
    }
    return NULL;
}

static const obj_prop *find_prop(const obj_class *cls, const char *name)
{
    for (const obj_prop *p = cls->props; p->name; p++) {
        if (strcmp(p->name, name) == 0) {
            return p;
        }
    }
    return NULL;
}

int obj_enum_index(const char *const *values, const char *s)
{
    for (int i = 0; values[i]; i++) {
        if (strcmp(values[i], s) == 0) {
            return i;
        }
    }
    return -1;
}

/* ---- the registry ---- */

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
/* Oldest first; includes objects being completed (completed false). */
static vd_object *objects;

void obj_lock(void)
{
    pthread_mutex_lock(&registry_lock);
}

void obj_unlock(void)
{
    pthread_mutex_unlock(&registry_lock);
}

vd_object *obj_find_any_locked(const char *id)
{
    for (vd_object *o = objects; o; o = o->next) {
        if (strcmp(o->id, id) == 0) {
            return o;
        }
    }
    return NULL;
}

vd_object *obj_find_locked(const char *id)
{
    vd_object *o = obj_find_any_locked(id);

    return o && o->completed ? o : NULL;
}

static void unlink_object(vd_object *obj)
{
    for (vd_object **pp = &objects; *pp; pp = &(*pp)->next) {
        if (*pp == obj) {
            *pp = obj->next;
            obj->next = NULL;
            return;
        }
    }
}

static void free_object(vd_object *obj)
{
    if (!obj) {
        return;
    }
    if (obj->cls->finalize) {
        obj->cls->finalize(obj);
    }
    free(obj->id);
    free(obj);
}

/* ---- the command-line parser (QEMU's keyval) ---- */

/* QEMU's rule for a key fragment: a list index (digits) or a name (a
 * letter, then letters, digits, '-', '_'). */
static bool key_fragment_ok(const char *s, size_t len)
{
    size_t i;

    if (len == 0) {
        return false;
    }
    if (s[0] >= '0' && s[0] <= '9') {
        for (i = 0; i < len; i++) {
            if (s[i] < '0' || s[i] > '9') {
                return false;
            }
        }
        return true;
    }
    if (!((s[0] >= 'a' && s[0] <= 'z') || (s[0] >= 'A' && s[0] <= 'Z'))) {
        return false;
    }
    for (i = 1; i < len; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '-' || c == '_')) {
            return false;
        }
    }
    return true;
}

/* Sets the dotted @key to the string @value in the tree @root, creating
 * the objects on the way; a later value replaces an earlier one. */
static int keyval_set(json_object *root, const char *key, const char *value,
                      vd_error *err)
{
    json_object *cur = root;
    const char *p = key;

    for (;;) {
        size_t len = strcspn(p, ".");
        char frag[256];
        json_object *next;

        if (!key_fragment_ok(p, len) || len >= sizeof(frag)) {
            return vd_error_set(err, -EINVAL, "Invalid parameter '%s'", key);
        }
        memcpy(frag, p, len);
        frag[len] = '\0';
        if (!p[len]) {
            if (json_object_object_get_ex(cur, frag, &next) &&
                json_object_is_type(next, json_type_object)) {
                return vd_error_set(err, -EINVAL, "Parameters '%.*s.*' used "
                                    "inconsistently", (int)(p + len - key),
                                    key);
            }
            next = json_object_new_string(value);
            if (!next || json_object_object_add(cur, frag, next) < 0) {
                json_object_put(next);
                return vd_error_set(err, -ENOMEM, "Out of memory");
            }
            return 0;
        }
        if (!json_object_object_get_ex(cur, frag, &next)) {
            next = json_object_new_object();
            if (!next || json_object_object_add(cur, frag, next) < 0) {
                json_object_put(next);
                return vd_error_set(err, -ENOMEM, "Out of memory");
            }
        } else if (!json_object_is_type(next, json_type_object)) {
            return vd_error_set(err, -EINVAL, "Parameters '%.*s.*' used "
                                "inconsistently", (int)(p + len - key), key);
        }
        cur = next;
        p += len + 1;
    }
}

static bool all_digits(const char *s)
{
    if (!*s) {
        return false;
    }
    for (; *s; s++) {
        if (*s < '0' || *s > '9') {
            return false;
        }
    }
    return true;
}

/* Turns every object of @parent's tree whose keys are all list indices
 * into an array (QEMU's keyval_listify()), depth first. @prefix is the
 * dotted path of @obj. Returns the replacement (a new reference) through
 * @out, or NULL when @obj stays. */
static int listify(json_object *obj, const char *prefix, json_object **out,
                   vd_error *err)
{
    size_t n = 0, digits = 0;
    json_object *arr;

    *out = NULL;
    json_object_object_foreach(obj, key, val) {
        n++;
        digits += all_digits(key);
        if (json_object_is_type(val, json_type_object)) {
            char sub[512];
            json_object *rep;
            int r;
            snprintf(sub, sizeof(sub), "%s%s%s", prefix, *prefix ? "." : "",
                     key);
            r = listify(val, sub, &rep, err);
            if (r < 0) {
                return r;
            }
            if (rep) {
                /* Replacing the value of an existing key keeps the
                 * iteration valid. */
                json_object_object_add(obj, key, rep);
            }
        }
    }
    if (!*prefix || digits == 0) {
        return 0;
    }
    if (digits != n) {
        return vd_error_set(err, -EINVAL, "Parameters '%s.*' used "
                            "inconsistently", prefix);
    }
    arr = json_object_new_array();
    if (!arr) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        char idx[32];
        json_object *val;
        snprintf(idx, sizeof(idx), "%zu", i);
        if (!json_object_object_get_ex(obj, idx, &val)) {
            json_object_put(arr);
            return vd_error_set(err, -EINVAL, "Parameter '%s.%zu' missing",
                                prefix, i);
        }
        json_object_array_add(arr, json_object_get(val));
    }
    *out = arr;
    return 0;
}

/*
 * Parses an --object argument in QEMU's keyval syntax into @*out, a tree
 * of strings with "qom-type" for a leading bare word. A bare "help" or
 * "?" anywhere sets @*help instead of being a key.
 */
static int keyval_parse(const char *str, json_object **out, bool *help,
                        vd_error *err)
{
    json_object *root = json_object_new_object(), *rep;
    const char *p = str;
    bool first = true;
    char *buf = malloc(strlen(str) + 1);
    int r = 0;

    *help = false;
    if (!root || !buf) {
        r = vd_error_set(err, -ENOMEM, "Out of memory");
        goto out;
    }
    while (*p) {
        size_t klen = strcspn(p, "=,");
        size_t vlen = 0;

        if (p[klen] != '=') {
            /* A bare word: the type, a help request or a mistake. */
            if ((klen == 4 && strncmp(p, "help", 4) == 0) ||
                (klen == 1 && p[0] == '?')) {
                *help = true;
            } else if (first && klen) {
                memcpy(buf, p, klen);
                buf[klen] = '\0';
                if ((r = keyval_set(root, "qom-type", buf, err)) < 0) {
                    goto out;
                }
            } else if (klen == 0) {
                r = vd_error_set(err, -EINVAL, "Invalid parameter ''");
                goto out;
            } else {
                r = vd_error_set(err, -EINVAL, "Expected '=' after parameter "
                                 "'%.*s'", (int)klen, p);
                goto out;
            }
            p += klen;
            if (*p == ',') {
                p++;
            }
            first = false;
            continue;
        }
        {
            char key[512];
            const char *v = p + klen + 1;

            if (klen >= sizeof(key)) {
                r = vd_error_set(err, -EINVAL, "Invalid parameter '%.*s...'",
                                 40, p);
                goto out;
            }
            memcpy(key, p, klen);
            key[klen] = '\0';
            /* The value runs to a lone comma; ",," is a comma. */
            while (*v) {
                if (*v == ',') {
                    if (v[1] != ',') {
                        break;
                    }
                    v++;
                }
                buf[vlen++] = *v++;
            }
            buf[vlen] = '\0';
            if ((r = keyval_set(root, key, buf, err)) < 0) {
                goto out;
            }
            p = *v ? v + 1 : v;
        }
        first = false;
    }
    r = listify(root, "", &rep, err);
out:
    free(buf);
    if (r < 0) {
        json_object_put(root);
        root = NULL;
    }
    *out = root;
    return r;
}

/* ---- the type checker (QEMU's QAPI input visitor) ---- */

static const char *kind_name(obj_kind k)
{
    switch (k) {
    case OBJ_BOOL:
        return "boolean";
    case OBJ_INT:
        return "integer";
    case OBJ_STRUCT:
        return "object";
    case OBJ_LIST:
        return "array";
    case OBJ_STR:
    case OBJ_ENUM:
    default:
        return "string";
    }
}

static int bad_type(const char *name, obj_kind k, vd_error *err)
{
    return vd_error_set(err, -EINVAL, "Invalid parameter type for '%s', "
                        "expected: %s", name, kind_name(k));
}

/* QEMU names an enum's member without its path ("format", not
 * "rules.0.format") when refusing a value. */
static const char *last_component(const char *name)
{
    const char *dot = strrchr(name, '.');
    const char *br = strrchr(name, ']');
    const char *p = dot > br ? dot : br;

    return p ? p + 1 : name;
}

static int check_struct(json_object *obj, const obj_member *members,
                        const char *prefix, bool keyval, vd_error *err);

int obj_check_value(json_object **val, const obj_type *t, const char *name,
                    bool keyval, vd_error *err)
{
    json_object *v = *val;
    json_type jt = json_object_get_type(v);

    /* On a command line every scalar is a string; a tree where a scalar
     * belongs means dotted keys under a scalar's name. */
    if (keyval && t->kind != OBJ_STRUCT && t->kind != OBJ_LIST &&
        jt != json_type_string) {
        return vd_error_set(err, -EINVAL, "Parameters '%s.*' are unexpected",
                            name);
    }
    switch (t->kind) {
    case OBJ_STR:
        return jt == json_type_string ? 0 : bad_type(name, t->kind, err);
    case OBJ_ENUM:
        if (jt != json_type_string) {
            return bad_type(name, t->kind, err);
        }
        if (obj_enum_index(t->values, json_object_get_string(v)) < 0) {
            return vd_error_set(err, -EINVAL, "Parameter '%s' does not "
                                "accept value '%s'", last_component(name),
                                json_object_get_string(v));
        }
        return 0;
    case OBJ_BOOL:
        if (keyval) {
            bool b;
            json_object *nv;
            if (vd_parse_keyval_bool(json_object_get_string(v), &b) < 0) {
                return vd_error_set(err, -EINVAL, "Parameter '%s' expects "
                                    "'on' or 'off'", name);
            }
            if (!(nv = json_object_new_boolean(b))) {
                return vd_error_set(err, -ENOMEM, "Out of memory");
            }
            json_object_put(v);
            *val = nv;
            return 0;
        }
        return jt == json_type_boolean ? 0 : bad_type(name, t->kind, err);
    case OBJ_INT:
        if (keyval) {
            const char *s = json_object_get_string(v);
            char *end;
            long long n;
            json_object *nv;
            errno = 0;
            n = strtoll(s, &end, 0);
            if (errno || end == s || *end) {
                return vd_error_set(err, -EINVAL, "Parameter '%s' expects "
                                    "integer", name);
            }
            if (!(nv = json_object_new_int64(n))) {
                return vd_error_set(err, -ENOMEM, "Out of memory");
            }
            json_object_put(v);
            *val = nv;
            return 0;
        }
        /* json-c keeps integers above INT64_MAX as unsigned; QAPI's
         * 'int' refuses them like any non-integer. */
        if (jt != json_type_int ||
            (json_object_get_int64(v) == INT64_MAX &&
             json_object_get_uint64(v) > (uint64_t)INT64_MAX)) {
            return bad_type(name, t->kind, err);
        }
        return 0;
    case OBJ_STRUCT:
        if (jt != json_type_object) {
            return bad_type(name, t->kind, err);
        }
        return check_struct(v, t->members, name, keyval, err);
    case OBJ_LIST:
        if (jt != json_type_array) {
            return bad_type(name, t->kind, err);
        }
        for (size_t i = 0; i < json_object_array_length(v); i++) {
            char sub[512];
            json_object *e = json_object_get(json_object_array_get_idx(v, i));
            int r;
            snprintf(sub, sizeof(sub), keyval ? "%s.%zu" : "%s[%zu]", name, i);
            r = obj_check_value(&e, t->elem, sub, keyval, err);
            if (r < 0) {
                json_object_put(e);
                return r;
            }
            json_object_array_put_idx(v, i, e);
        }
        return 0;
    }
    return 0;
}

/* One member of a struct: missing, or present and checked (and
 * replaced by its typed value). */
static int check_member(json_object *obj, const char *key,
                        const obj_type *t, bool optional, const char *prefix,
                        bool keyval, vd_error *err)
{
    char name[512];
    json_object *v;
    int r;

    snprintf(name, sizeof(name), "%s%s%s", prefix, *prefix ? "." : "", key);
    if (!json_object_object_get_ex(obj, key, &v)) {
        return optional ? 0 : vd_error_set(err, -EINVAL, "Parameter '%s' is "
                                           "missing", name);
    }
    v = json_object_get(v);
    r = obj_check_value(&v, t, name, keyval, err);
    if (r < 0) {
        json_object_put(v);
        return r;
    }
    json_object_object_add(obj, key, v);
    return 0;
}

/* The first member of @obj that @known does not accept, or NULL. */
static const char *first_unexpected(json_object *obj,
                                    bool (*known)(const char *, const void *),
                                    const void *arg)
{
    json_object_object_foreach(obj, key, val) {
        (void)val;
        if (!known(key, arg)) {
            return key;
        }
    }
    return NULL;
}

static bool member_known(const char *key, const void *arg)
{
    for (const obj_member *m = arg; m->name; m++) {
        if (strcmp(m->name, key) == 0) {
            return true;
        }
    }
    return false;
}

static int check_struct(json_object *obj, const obj_member *members,
                        const char *prefix, bool keyval, vd_error *err)
{
    const char *bad;

    for (const obj_member *m = members; m->name; m++) {
        int r = check_member(obj, m->name, m->type, m->optional, prefix,
                             keyval, err);
        if (r < 0) {
            return r;
        }
    }
    bad = first_unexpected(obj, member_known, members);
    if (bad) {
        return vd_error_set(err, -EINVAL, "Parameter '%s%s%s' is unexpected",
                            prefix, *prefix ? "." : "", bad);
    }
    return 0;
}

static bool object_member_known(const char *key, const void *arg)
{
    const obj_class *cls = arg;

    return strcmp(key, "qom-type") == 0 || strcmp(key, "id") == 0 ||
           find_prop(cls, key) != NULL;
}

/* QEMU's id_wellformed(). */
static bool id_wellformed(const char *id)
{
    if (!((id[0] >= 'a' && id[0] <= 'z') || (id[0] >= 'A' && id[0] <= 'Z'))) {
        return false;
    }
    for (const char *p = id + 1; *p; p++) {
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
              (*p >= '0' && *p <= '9') || *p == '-' || *p == '.' ||
              *p == '_')) {
            return false;
        }
    }
    return true;
}

/* ---- creating ---- */

static int duplicate_error(const char *id, vd_error *err)
{
    return vd_error_set(err, -EEXIST, "attempt to add duplicate property "
                        "'%s' to object (type 'container')", id);
}

/*
 * Creates the object ObjectOptions @args describes (a tree of strings
 * with @keyval, typed JSON otherwise), in QEMU's order: the type, id and
 * members are checked first (qom-type, id, then the class's properties,
 * then anything unexpected), then the id's form and the class, then the
 * properties are set, the id reserved and the object completed.
 */
static int object_create(json_object *args, bool keyval, vd_error *err)
{
    const obj_class *cls;
    const char *type, *id, *bad;
    vd_object *obj = NULL;
    int r;

    if ((r = check_member(args, "qom-type", &qom_type_type, false, "",
                          keyval, err)) < 0 ||
        (r = check_member(args, "id", &obj_type_str, false, "", keyval,
                          err)) < 0) {
        return r;
    }
    type = json_object_get_string(json_object_object_get(args, "qom-type"));
    id = json_object_get_string(json_object_object_get(args, "id"));
    cls = find_class(type);
    if (cls) {
        for (const obj_prop *p = cls->props; p->name; p++) {
            r = check_member(args, p->name, p->type,
                             (p->flags & OBJ_PROP_OPTIONAL) != 0, "", keyval,
                             err);
            if (r < 0) {
                return r;
            }
        }
        bad = first_unexpected(args, object_member_known, cls);
        if (bad) {
            return vd_error_set(err, -EINVAL, "Parameter '%s' is unexpected",
                                bad);
        }
    }
    if (!id_wellformed(id)) {
        r = vd_error_set(err, -EINVAL, "Parameter 'id' expects an "
                         "identifier");
        if (err && !err->hint[0]) {
            snprintf(err->hint, sizeof(err->hint), "Identifiers consist of "
                     "letters, digits, '-', '.', '_', starting with a "
                     "letter.");
        }
        return r;
    }
    if (!cls) {
        return vd_error_set(err, -ENOTSUP, "object type '%s' is not "
                            "supported by vdisk", type);
    }

    obj = calloc(1, cls->size);
    if (!obj || !(obj->id = strdup(id))) {
        free(obj);
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    obj->cls = cls;
    if (cls->init) {
        cls->init(obj);
    }
    /* The instance is private until the id is reserved below, but
     * setters are written for the lock; take it for uniformity. */
    obj_lock();
    for (const obj_prop *p = cls->props; p->name && r == 0; p++) {
        json_object *v;
        if (!json_object_object_get_ex(args, p->name, &v)) {
            continue;
        }
        r = (p->flags & OBJ_PROP_WRITABLE) ? p->set(obj, p, v, err)
                                           : obj_error_not_writable(obj, p,
                                                                    err);
    }
    if (r == 0 && obj_find_any_locked(id)) {
        r = duplicate_error(id, err);
    }
    if (r < 0) {
        obj_unlock();
        free_object(obj);
        return r;
    }
    /* Reserve the id; lookups ignore the object until it is complete. */
    obj->next = NULL;
    {
        vd_object **pp = &objects;
        while (*pp) {
            pp = &(*pp)->next;
        }
        *pp = obj;
    }
    obj_unlock();

    r = cls->complete ? cls->complete(obj, err) : 0;

    obj_lock();
    if (r < 0) {
        unlink_object(obj);
    } else {
        obj->completed = true;
    }
    obj_unlock();
    if (r < 0) {
        free_object(obj);
    }
    return r;
}

VD_API int vd_object_add(const char *type, const char *id,
                         const vd_opts *props, vd_error *err)
{
    json_object *root = json_object_new_object(), *rep = NULL;
    int r = 0;

    if (!root) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    for (size_t i = 0; props && i < vd_opts_count(props) && r == 0; i++) {
        const char *k, *v;
        vd_opts_nth(props, i, &k, &v);
        r = keyval_set(root, k, v, err);
    }
    if (r == 0 && type) {
        r = keyval_set(root, "qom-type", type, err);
    }
    if (r == 0 && id) {
        r = keyval_set(root, "id", id, err);
    }
    if (r == 0) {
        r = listify(root, "", &rep, err);
    }
    if (r == 0) {
        r = object_create(root, true, err);
    }
    json_object_put(root);
    return r;
}

/* Parses JSON text that must be one object. */
static json_object *parse_json_object(const char *json, vd_error *err)
{
    json_tokener *tok = json_tokener_new();
    json_object *o;
    size_t len = strlen(json);

    if (!tok) {
        vd_error_set(err, -ENOMEM, "Out of memory");
        return NULL;
    }
    o = json_tokener_parse_ex(tok, json, (int)len);
    if (!o || json_tokener_get_error(tok) != json_tokener_success) {
        enum json_tokener_error e = json_tokener_get_error(tok);
        vd_error_set(err, -EINVAL, "JSON parse error, %s",
                     e == json_tokener_continue ? "premature EOI"
                                                : json_tokener_error_desc(e));
        json_object_put(o);
        o = NULL;
    } else {
        /* Only white space may follow the value. */
        for (size_t i = json_tokener_get_parse_end(tok); i < len; i++) {
            if (!strchr(" \t\r\n", json[i])) {
                vd_error_set(err, -EINVAL, "JSON parse error, expecting "
                             "value");
                json_object_put(o);
                o = NULL;
                break;
            }
        }
    }
    json_tokener_free(tok);
    if (o && !json_object_is_type(o, json_type_object)) {
        vd_error_set(err, -EINVAL, "Invalid parameter type, expected: "
                     "object");
        json_object_put(o);
        o = NULL;
    }
    return o;
}

VD_API int vd_object_add_json(const char *json, vd_error *err)
{
    json_object *args = parse_json_object(json, err);
    int r;

    if (!args) {
        return -EINVAL;
    }
    r = object_create(args, false, err);
    json_object_put(args);
    return r;
}

VD_API int vd_object_add_cli(const char *arg, char **help, vd_error *err)
{
    json_object *args = NULL;
    bool want_help = false;
    int r;

    if (help) {
        *help = NULL;
    }
    if (arg[0] == '{') {
        args = parse_json_object(arg, err);
        if (!args) {
            return -EINVAL;
        }
        r = object_create(args, false, err);
        json_object_put(args);
        return r;
    }
    r = keyval_parse(arg, &args, &want_help, err);
    if (r < 0) {
        return r;
    }
    if (want_help) {
        json_object *t;
        const char *type = json_object_object_get_ex(args, "qom-type", &t) &&
                           json_object_is_type(t, json_type_string)
                           ? json_object_get_string(t) : NULL;
        if (!help) {
            json_object_put(args);
            return vd_error_set(err, -EINVAL, "Help is not available here");
        }
        *help = vd_object_help(type);
        json_object_put(args);
        return *help ? 0 : vd_error_set(err, -ENOMEM, "Out of memory");
    }
    r = object_create(args, true, err);
    json_object_put(args);
    return r;
}

/* ---- deleting, finding, listing ---- */

VD_API int vd_object_del(const char *id, vd_error *err)
{
    vd_object *obj;

    obj_lock();
    obj = obj_find_locked(id);
    if (!obj) {
        obj_unlock();
        return vd_error_set(err, -ENOENT, "object '%s' not found", id);
    }
    if (obj->users && obj->cls->busy_blocks_delete) {
        obj_unlock();
        return vd_error_set(err, -EBUSY, "object '%s' is in use, can not be "
                            "deleted", id);
    }
    unlink_object(obj);
    obj_unlock();
    free_object(obj);
    return 0;
}

VD_API void vd_object_del_all(void)
{
    for (;;) {
        vd_object *victim = NULL;

        obj_lock();
        for (vd_object *o = objects; o; o = o->next) {
            if (o->completed && !(o->users && o->cls->busy_blocks_delete)) {
                victim = o;
                break;
            }
        }
        if (victim) {
            unlink_object(victim);
        }
        obj_unlock();
        if (!victim) {
            return;
        }
        free_object(victim);
    }
}

VD_API char *vd_object_type(const char *id)
{
    char *type = NULL;
    vd_object *obj;

    obj_lock();
    obj = obj_find_locked(id);
    if (obj) {
        type = strdup(obj->cls->name);
    }
    obj_unlock();
    return type;
}

VD_API int vd_object_foreach(int (*fn)(const char *id, const char *type,
                                       void *opaque),
                             void *opaque)
{
    size_t n = 0, i = 0;
    char **ids = NULL;
    const char **types = NULL;
    int r = 0;

    obj_lock();
    for (vd_object *o = objects; o; o = o->next) {
        n += o->completed;
    }
    ids = calloc(n + 1, sizeof(*ids));
    types = calloc(n + 1, sizeof(*types));
    for (vd_object *o = objects; o && ids && types; o = o->next) {
        if (!o->completed) {
            continue;
        }
        types[i] = o->cls->name;
        if (!(ids[i++] = strdup(o->id))) {
            r = -ENOMEM;
            break;
        }
    }
    obj_unlock();
    if (!ids || !types) {
        r = -ENOMEM;
    }
    for (i = 0; r == 0 && i < n; i++) {
        r = fn(ids[i], types[i], opaque);
    }
    for (i = 0; ids && i < n; i++) {
        free(ids[i]);
    }
    free(ids);
    free(types);
    return r;
}

VD_API int vd_object_foreach_property(const char *id,
                                      int (*fn)(const char *name,
                                                const char *type,
                                                void *opaque),
                                      void *opaque, vd_error *err)
{
    const obj_class *cls;
    vd_object *obj;
    int r;

    obj_lock();
    obj = obj_find_locked(id);
    cls = obj ? obj->cls : NULL;
    obj_unlock();
    if (!cls) {
        return vd_error_set(err, -ENOENT, "object '%s' not found", id);
    }
    /* The class table is static: nothing to copy. */
    r = fn("type", "string", opaque);
    for (const obj_prop *p = cls->props; r == 0 && p->name; p++) {
        r = fn(p->name, p->type->name, opaque);
    }
    return r;
}

int obj_error_not_writable(vd_object *obj, const obj_prop *prop,
                           vd_error *err)
{
    return vd_error_set(err, -EPERM, "Property '%s.%s' is not writable",
                        obj->cls->name, prop->name);
}

VD_API char *vd_object_get_property(const char *id, const char *name,
                                    vd_error *err)
{
    vd_object *obj;
    const obj_prop *p;
    json_object *v = NULL;
    char *text = NULL;

    obj_lock();
    obj = obj_find_locked(id);
    if (!obj) {
        obj_unlock();
        vd_error_set(err, -ENOENT, "object '%s' not found", id);
        return NULL;
    }
    if (strcmp(name, "type") == 0) {
        v = json_object_new_string(obj->cls->name);
    } else if ((p = find_prop(obj->cls, name))) {
        v = p->get(obj, p);
    } else {
        vd_error_set(err, -ENOENT, "Property '%s.%s' not found",
                     obj->cls->name, name);
        obj_unlock();
        return NULL;
    }
    obj_unlock();
    if (v) {
        text = strdup(json_object_to_json_string_ext(v,
                                                     JSON_C_TO_STRING_PLAIN));
        json_object_put(v);
    }
    if (!text) {
        vd_error_set(err, -ENOMEM, "Out of memory");
    }
    return text;
}

VD_API int vd_object_set_property(const char *id, const char *name,
                                  const char *json, vd_error *err)
{
    json_object *v = json_tokener_parse(json);
    vd_object *obj;
    const obj_prop *p;
    int r;

    if (!v && strcmp(json, "null") != 0) {
        return vd_error_set(err, -EINVAL, "JSON parse error in value");
    }
    obj_lock();
    obj = obj_find_locked(id);
    if (!obj) {
        r = vd_error_set(err, -ENOENT, "object '%s' not found", id);
    } else if (strcmp(name, "type") == 0) {
        r = vd_error_set(err, -EPERM, "Property '%s.type' is not writable",
                         obj->cls->name);
    } else if (!(p = find_prop(obj->cls, name))) {
        r = vd_error_set(err, -ENOENT, "Property '%s.%s' not found",
                         obj->cls->name, name);
    } else if (!(p->flags & OBJ_PROP_WRITABLE)) {
        r = obj_error_not_writable(obj, p, err);
    } else if (!v) {
        r = bad_type(name, p->type->kind, err);
    } else if ((r = obj_check_value(&v, p->type, name, false, err)) == 0) {
        r = p->set(obj, p, v, err);
    }
    obj_unlock();
    json_object_put(v);
    return r;
}

/* ---- uses ---- */

vd_object *vd_object_find_use(const char *id, const obj_class *cls,
                              vd_error *err)
{
    vd_object *obj;

    obj_lock();
    obj = obj_find_locked(id);
    if (obj && obj->cls == cls) {
        obj->users++;
    }
    obj_unlock();
    if (!obj) {
        vd_error_set(err, -ENOENT, "No object with id '%s'", id);
        return NULL;
    }
    if (obj->cls != cls) {
        vd_error_set(err, -EINVAL, "Object with id '%s' is not a %s", id,
                     cls->name);
        return NULL;
    }
    return obj;
}

void vd_object_put_use(vd_object *obj)
{
    if (obj) {
        obj_lock();
        obj->users--;
        obj_unlock();
    }
}

/* ---- help ---- */

/* A growing string; NULL after a failed allocation. */
typedef struct strbuf {
    char *s;
    size_t len, cap;
    bool failed;
} strbuf;

static void sb_add(strbuf *b, const char *text)
{
    size_t n = strlen(text);

    if (b->failed) {
        return;
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = (b->len + n + 1) * 2;
        char *s = realloc(b->s, cap);
        if (!s) {
            b->failed = true;
            return;
        }
        b->s = s;
        b->cap = cap;
    }
    memcpy(b->s + b->len, text, n + 1);
    b->len += n;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

VD_API char *vd_object_help(const char *type)
{
    const obj_class *cls = type ? find_class(type) : NULL;
    strbuf b = { NULL, 0, 0, false };

    if (cls) {
        /* QEMU's listing: the settable properties, each "  NAME=<TYPE>",
         * sorted as whole lines. */
        char *lines[64];
        size_t n = 0;
        char head[128];

        for (const obj_prop *p = cls->props; p->name && n < 64; p++) {
            if ((p->flags & OBJ_PROP_WRITABLE) &&
                asprintf(&lines[n], "  %s=<%s>\n", p->name,
                         p->type->name) >= 0) {
                n++;
            }
        }
        qsort(lines, n, sizeof(lines[0]), cmp_str);
        if (n) {
            snprintf(head, sizeof(head), "%s options:\n", cls->name);
        } else {
            snprintf(head, sizeof(head), "There are no options for %s.\n",
                     cls->name);
        }
        sb_add(&b, head);
        for (size_t i = 0; i < n; i++) {
            sb_add(&b, lines[i]);
            free(lines[i]);
        }
    } else {
        const char *names[N_CLASSES];

        for (size_t i = 0; i < N_CLASSES; i++) {
            names[i] = class_table[i]->name;
        }
        qsort(names, N_CLASSES, sizeof(names[0]), cmp_str);
        sb_add(&b, "List of user creatable objects:\n");
        for (size_t i = 0; i < N_CLASSES; i++) {
            sb_add(&b, "  ");
            sb_add(&b, names[i]);
            sb_add(&b, "\n");
        }
    }
    if (b.failed) {
        free(b.s);
        return NULL;
    }
    return b.s;
}

/* ---- field properties ---- */

#define FIELD(obj, prop, type) ((type *)(void *)((char *)(obj) + (prop)->arg))

int obj_set_str_field(vd_object *obj, const obj_prop *prop, json_object *val,
                      vd_error *err)
{
    char **f = FIELD(obj, prop, char *);
    char *s = strdup(json_object_get_string(val));

    if (!s) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    free(*f);
    *f = s;
    return 0;
}

json_object *obj_get_str_field(vd_object *obj, const obj_prop *prop)
{
    char *s = *FIELD(obj, prop, char *);

    return json_object_new_string(s ? s : "");
}

int obj_set_bool_field(vd_object *obj, const obj_prop *prop,
                       json_object *val, vd_error *err)
{
    (void)err;
    *FIELD(obj, prop, bool) = json_object_get_boolean(val);
    return 0;
}

json_object *obj_get_bool_field(vd_object *obj, const obj_prop *prop)
{
    return json_object_new_boolean(*FIELD(obj, prop, bool));
}

int obj_set_enum_field(vd_object *obj, const obj_prop *prop,
                       json_object *val, vd_error *err)
{
    (void)err;
    /* Checked against the values already. */
    *FIELD(obj, prop, int) = obj_enum_index(prop->type->values,
                                            json_object_get_string(val));
    return 0;
}

json_object *obj_get_enum_field(vd_object *obj, const obj_prop *prop)
{
    return json_object_new_string(
        prop->type->values[*FIELD(obj, prop, int)]);
}

/* ---- base64 ---- */

/* The value of a base64 character, 64 for '=' (padding), -1 else. */
static int b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') {
        return c - 'A';
    }
    if (c >= 'a' && c <= 'z') {
        return c - 'a' + 26;
    }
    if (c >= '0' && c <= '9') {
        return c - '0' + 52;
    }
    if (c == '+') {
        return 62;
    }
    if (c == '/') {
        return 63;
    }
    return c == '=' ? 64 : -1;
}

int obj_base64_decode(const char *in, size_t len, unsigned char **out,
                      size_t *outlen, vd_error *err)
{
    unsigned char *buf;
    unsigned acc = 0;
    size_t n = 0, q = 0;
    bool pad1 = false, pad2 = false;

    if (memchr(in, '\0', len)) {
        return vd_error_set(err, -EINVAL, "Base64 data contains embedded "
                            "NUL characters");
    }
    for (size_t i = 0; i < len; i++) {
        if (in[i] != '\n' && b64_value((unsigned char)in[i]) < 0) {
            return vd_error_set(err, -EINVAL, "Base64 data contains invalid "
                                "characters");
        }
    }
    buf = malloc(len * 3 / 4 + 2);
    if (!buf) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    /*
     * glib's decoder, which QEMU uses: every character but newline counts
     * in groups of four ('=' as zero bits); a group yields three bytes,
     * less one for each '=' among its last two characters; a trailing
     * incomplete group yields nothing.
     */
    for (size_t i = 0; i < len; i++) {
        int v = b64_value((unsigned char)in[i]);
        if (v < 0) {
            continue;
        }
        pad1 = pad2;
        pad2 = v == 64;
        acc = (acc << 6) | (unsigned)(v == 64 ? 0 : v);
        if (++q == 4) {
            buf[n++] = (unsigned char)(acc >> 16);
            if (!pad1) {
                buf[n++] = (unsigned char)(acc >> 8);
            }
            if (!pad2) {
                buf[n++] = (unsigned char)acc;
            }
            q = 0;
            acc = 0;
        }
    }
    buf[n] = '\0';
    *out = buf;
    *outlen = n;
    return 0;
}
