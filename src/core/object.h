/*
 * The object registry's internal side: how an object class is described
 * (src/objects/ holds one file per family of classes) and what a class's
 * callbacks may use. The public side (vd_object_add() and friends,
 * secrets, throttle limits, authorization) is in vdisk.h; docs/objects.md
 * describes both.
 *
 * A class is a table entry like a driver: its QEMU type name, its
 * properties (name, QAPI type, whether QOM lets them be set after
 * creation), and complete/finalize callbacks. Every property value
 * crosses this interface as a json-c object that object.c has already
 * checked against the property's type, with QEMU's messages: from a
 * command line (key=value strings, converted by the type) or from JSON
 * (QMP object-add, qom-set). The same description gives `--object
 * TYPE,help`, qom-list and qom-get, so they cannot drift apart.
 *
 * Locking: one registry lock guards the list of objects and every
 * object's properties. Property setters and getters run with it held;
 * complete runs without it (it may look up other objects, a secret for
 * instance, and may take long: TLS credentials are read from files), on
 * an object that lookups do not see as complete yet. Finalize runs
 * without it, once nothing can reach the object.
 */
#ifndef VDISK_CORE_OBJECT_H
#define VDISK_CORE_OBJECT_H

#include "internal.h"

#include <stdbool.h>
#include <stddef.h>

#include <json-c/json.h>

#include "vdisk/vdisk.h"

/* ---- types (a small QAPI) ---- */

typedef enum obj_kind {
    OBJ_STR,
    OBJ_BOOL,
    OBJ_INT,        /* QAPI 'int': int64 */
    OBJ_ENUM,
    OBJ_STRUCT,
    OBJ_LIST,
} obj_kind;

typedef struct obj_type obj_type;

/* One member of a struct type, in QAPI's order (the order of checks). */
typedef struct obj_member {
    const char *name;
    const obj_type *type;
    bool optional;
} obj_member;

struct obj_type {
    obj_kind kind;
    /* The name QOM shows (qom-list, --object TYPE,help): "string",
     * "bool", "int", or the QAPI type's ("QCryptoSecretFormat"). */
    const char *name;
    const char *const *values;      /* OBJ_ENUM: NULL-terminated */
    const obj_member *members;      /* OBJ_STRUCT: NULL-name-terminated */
    const obj_type *elem;           /* OBJ_LIST */
};

extern const obj_type obj_type_str;
extern const obj_type obj_type_bool;
extern const obj_type obj_type_int;

/* ---- classes ---- */

typedef struct vd_object vd_object;

/* Property flags. */
#define OBJ_PROP_OPTIONAL  (1u << 0)  /* may be left out at creation */
#define OBJ_PROP_WRITABLE  (1u << 1)  /* QOM has a setter: listed by
                                         TYPE,help, settable by qom-set;
                                         else setting it fails with
                                         "Property 'T.P' is not writable" */

typedef struct obj_prop {
    const char *name;
    const obj_type *type;
    unsigned flags;
    /* @val has been checked against @type (and is borrowed). Called at
     * creation before complete (@obj->completed false) and by qom-set
     * afterwards; a setter refuses what its class cannot change later.
     * Registry lock held. */
    int (*set)(vd_object *obj, const struct obj_prop *prop, json_object *val,
               vd_error *err);
    /* A new value (qom-get), never NULL for a completed object but on
     * ENOMEM. Registry lock held. */
    json_object *(*get)(vd_object *obj, const struct obj_prop *prop);
    /* Free for the class: which field, which bucket, ... */
    size_t arg;
} obj_prop;

typedef struct obj_class {
    const char *name;               /* QEMU's qom-type */
    size_t size;                    /* of the instance, vd_object first */
    const obj_prop *props;          /* NULL-name-terminated, QAPI order */
    /* Sets the defaults of a zeroed instance. May be NULL. */
    void (*init)(vd_object *obj);
    /* Checks the properties and does the work (loads the secret, the
     * credentials). Registry lock NOT held; the object is not visible
     * as complete. May be NULL. */
    int (*complete)(vd_object *obj, vd_error *err);
    /* Releases what the instance holds (not the instance). May be NULL. */
    void (*finalize)(vd_object *obj);
    /* QEMU refuses object-del while something uses such an object
     * (throttle-group); others are deleted and live on in their users'
     * references. */
    bool busy_blocks_delete;
} obj_class;

struct vd_object {
    const obj_class *cls;
    char *id;
    bool completed;         /* lookups see only completed objects */
    unsigned users;         /* vd_object_find_use() references */
    struct vd_object *next;
};

/* The class table (object.c); classes live in src/objects/. */
extern const obj_class obj_class_secret;
extern const obj_class obj_class_throttle_group;
extern const obj_class obj_class_authz_simple;
extern const obj_class obj_class_authz_list;
extern const obj_class obj_class_tls_creds_x509;
extern const obj_class obj_class_tls_creds_psk;

/* ---- what classes use ---- */

/* Finds the completed object @id with the registry lock held by the
 * caller (getters of one object looking at another never need this; a
 * class's public accessor does, see obj_lock()). NULL when absent. */
vd_object *obj_find_locked(const char *id);
/* ... or being added (not completed yet), which a secret lookup reports
 * as "has no data" rather than as absent. */
vd_object *obj_find_any_locked(const char *id);
void obj_lock(void);
void obj_unlock(void);

/* Marks the completed object @id of class @cls as used (a throttle group
 * attached to a node): object-del refuses it while any use remains for a
 * class with busy_blocks_delete. Returns the object or NULL with QEMU's
 * error ("No object with id ...", "... is not a CLS"). Release with
 * vd_object_put_use(). */
vd_object *vd_object_find_use(const char *id, const obj_class *cls,
                               vd_error *err);
void vd_object_put_use(vd_object *obj);

/* "Property 'CLASS.NAME' ..." helpers that classes share. */
int obj_error_not_writable(vd_object *obj, const obj_prop *prop,
                           vd_error *err);

/* Getter/setter pairs for a char * field at offset @prop->arg of the
 * instance (NULL shows as "", as QOM's string properties do). */
int obj_set_str_field(vd_object *obj, const obj_prop *prop,
                      json_object *val, vd_error *err);
json_object *obj_get_str_field(vd_object *obj, const obj_prop *prop);
/* ... and for a bool field. */
int obj_set_bool_field(vd_object *obj, const obj_prop *prop,
                       json_object *val, vd_error *err);
json_object *obj_get_bool_field(vd_object *obj, const obj_prop *prop);
/* ... and for an int field holding an index into the enum's values. */
int obj_set_enum_field(vd_object *obj, const obj_prop *prop,
                       json_object *val, vd_error *err);
json_object *obj_get_enum_field(vd_object *obj, const obj_prop *prop);

/* The index of @s in the NULL-terminated @values, or -1. */
int obj_enum_index(const char *const *values, const char *s);

/* Checks @val against @t as QEMU's QAPI input visitor does, naming
 * members by @name (a dotted path: "limits.bps-total", "rules.0.match"
 * for command-line input, "rules[0].match" for JSON). With @keyval the
 * scalars are strings from a command line and are replaced in place by
 * the typed values. Returns 0 or -EINVAL with QEMU's message. */
int obj_check_value(json_object **val, const obj_type *t, const char *name,
                    bool keyval, vd_error *err);

/* Base64 as QEMU's qbase64_decode() takes it (glib's decoder after a
 * check of the alphabet): @in of @len bytes (NUL-terminated at @len).
 * Returns 0 and a new buffer (one spare NUL byte after @*outlen), or
 * -EINVAL with QEMU's message. */
int obj_base64_decode(const char *in, size_t len, unsigned char **out,
                      size_t *outlen, vd_error *err);

#endif
