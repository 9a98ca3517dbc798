/*
 * The throttle-group object class: a named set of I/O limits that nodes
 * share (QEMU's block/throttle-groups.c and util/throttle.c rules, 7.2).
 * This file keeps and checks the limits, with QEMU's properties
 * ("limits", a ThrottleLimits struct, and its unstable "x-" aliases) and
 * messages; vd_throttle_group_get_limits() hands them to whoever
 * enforces them. Nodes that use a group hold it with
 * vd_object_find_use(), and object-del refuses a group in use, as QEMU
 * does.
 *
 * One table (THROTTLE_FIELDS) names the 19 limits once, in QAPI's order;
 * the ThrottleLimits members, the x- properties and the copying between
 * them are all made from it.
 */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/object.h"
#include "core/throttle.h"

/* What a limit is of its bucket. */
enum { CAT_AVG, CAT_MAX, CAT_LENGTH, CAT_SIZE };

/* QEMU's THROTTLE_VALUE_MAX. */
#define THROTTLE_VALUE_MAX 1000000000000000ULL

/* ThrottleLimits' members in QAPI's order: name, bucket, category. */
#define THROTTLE_FIELDS(X)                                                 \
    X("iops-total", VD_THROTTLE_OPS_TOTAL, CAT_AVG)                        \
    X("iops-total-max", VD_THROTTLE_OPS_TOTAL, CAT_MAX)                    \
    X("iops-total-max-length", VD_THROTTLE_OPS_TOTAL, CAT_LENGTH)          \
    X("iops-read", VD_THROTTLE_OPS_READ, CAT_AVG)                          \
    X("iops-read-max", VD_THROTTLE_OPS_READ, CAT_MAX)                      \
    X("iops-read-max-length", VD_THROTTLE_OPS_READ, CAT_LENGTH)            \
    X("iops-write", VD_THROTTLE_OPS_WRITE, CAT_AVG)                        \
    X("iops-write-max", VD_THROTTLE_OPS_WRITE, CAT_MAX)                    \
    X("iops-write-max-length", VD_THROTTLE_OPS_WRITE, CAT_LENGTH)          \
    X("bps-total", VD_THROTTLE_BPS_TOTAL, CAT_AVG)                         \
    X("bps-total-max", VD_THROTTLE_BPS_TOTAL, CAT_MAX)                     \
    X("bps-total-max-length", VD_THROTTLE_BPS_TOTAL, CAT_LENGTH)           \
    X("bps-read", VD_THROTTLE_BPS_READ, CAT_AVG)                           \
    X("bps-read-max", VD_THROTTLE_BPS_READ, CAT_MAX)                       \
    X("bps-read-max-length", VD_THROTTLE_BPS_READ, CAT_LENGTH)             \
    X("bps-write", VD_THROTTLE_BPS_WRITE, CAT_AVG)                         \
    X("bps-write-max", VD_THROTTLE_BPS_WRITE, CAT_MAX)                     \
    X("bps-write-max-length", VD_THROTTLE_BPS_WRITE, CAT_LENGTH)           \
    X("iops-size", 0, CAT_SIZE)

#define FIELD_ARG(bucket, cat) ((size_t)(bucket) * 4 + (cat))

static const struct field {
    const char *name;
    size_t arg;
} fields[] = {
#define X(n, b, c) { n, FIELD_ARG(b, c) },
    THROTTLE_FIELDS(X)
#undef X
};
#define N_FIELDS (sizeof(fields) / sizeof(fields[0]))

typedef struct tgroup {
    vd_object obj;
    vd_throttle_limits cfg;
    /* The run-time side (src/core/throttle.c): buckets and queues,
     * made when the first node uses the group, kept until the object
     * goes (the registry lock guards the pointer). */
    vd_throttle_group *rt;
} tgroup;

/* ---- the limits ---- */

static uint64_t *value_of(vd_throttle_limits *l, size_t arg)
{
    size_t b = arg / 4;

    switch (arg % 4) {
    case CAT_AVG:
        return &l->bucket[b].avg;
    case CAT_MAX:
        return &l->bucket[b].max;
    default:
        return &l->op_size;
    }
}

static int64_t get_field(const vd_throttle_limits *l, size_t arg)
{
    if (arg % 4 == CAT_LENGTH) {
        return l->bucket[arg / 4].burst_length;
    }
    return (int64_t)*value_of((vd_throttle_limits *)l, arg);
}

/* Stores @v as QEMU's ThrottleConfig fields do: unsigned, so a negative
 * value wraps and then fails the range checks. */
static void set_field(vd_throttle_limits *l, size_t arg, int64_t v)
{
    if (arg % 4 == CAT_LENGTH) {
        l->bucket[arg / 4].burst_length = (uint32_t)v;
    } else {
        *value_of(l, arg) = (uint64_t)v;
    }
}

/* QEMU's throttle_is_valid(), in its order. */
static int limits_check(const vd_throttle_limits *l, vd_error *err)
{
    const __typeof__(l->bucket[0]) *b = l->bucket;
    bool bps = b[VD_THROTTLE_BPS_TOTAL].avg &&
               (b[VD_THROTTLE_BPS_READ].avg || b[VD_THROTTLE_BPS_WRITE].avg);
    bool ops = b[VD_THROTTLE_OPS_TOTAL].avg &&
               (b[VD_THROTTLE_OPS_READ].avg || b[VD_THROTTLE_OPS_WRITE].avg);
    bool bps_max = b[VD_THROTTLE_BPS_TOTAL].max &&
                   (b[VD_THROTTLE_BPS_READ].max ||
                    b[VD_THROTTLE_BPS_WRITE].max);
    bool ops_max = b[VD_THROTTLE_OPS_TOTAL].max &&
                   (b[VD_THROTTLE_OPS_READ].max ||
                    b[VD_THROTTLE_OPS_WRITE].max);

    if (bps || ops || bps_max || ops_max) {
        return vd_error_set(err, -EINVAL, "bps/iops/max total values and "
                            "read/write values cannot be used at the same "
                            "time");
    }
    if (l->op_size && !b[VD_THROTTLE_OPS_TOTAL].avg &&
        !b[VD_THROTTLE_OPS_READ].avg && !b[VD_THROTTLE_OPS_WRITE].avg) {
        return vd_error_set(err, -EINVAL, "iops size requires an iops value "
                            "to be set");
    }
    for (int i = 0; i < VD_THROTTLE_BUCKETS; i++) {
        if (b[i].avg > THROTTLE_VALUE_MAX || b[i].max > THROTTLE_VALUE_MAX) {
            return vd_error_set(err, -EINVAL, "bps/iops/max values must be "
                                "within [0, %llu]", THROTTLE_VALUE_MAX);
        }
        if (!b[i].burst_length) {
            return vd_error_set(err, -EINVAL, "the burst length cannot be 0");
        }
        if (b[i].burst_length > 1 && !b[i].max) {
            return vd_error_set(err, -EINVAL, "burst length set without "
                                "burst rate");
        }
        if (b[i].max && b[i].burst_length > THROTTLE_VALUE_MAX / b[i].max) {
            return vd_error_set(err, -EINVAL, "burst length too high for this "
                                "burst rate");
        }
        if (b[i].max && !b[i].avg) {
            return vd_error_set(err, -EINVAL, "bps_max/iops_max require "
                                "corresponding bps/iops values");
        }
        if (b[i].max && b[i].max < b[i].avg) {
            return vd_error_set(err, -EINVAL, "bps_max/iops_max cannot be "
                                "lower than bps/iops");
        }
    }
    return 0;
}

/* ---- properties ---- */

/* "limits": the members given replace those limits; the result must
 * pass the checks (once the group is complete; before, completion
 * checks everything at once), or nothing changes. */
static int set_limits(vd_object *obj, const obj_prop *prop, json_object *val,
                      vd_error *err)
{
    tgroup *g = (tgroup *)obj;
    vd_throttle_limits l = g->cfg;
    int r;

    (void)prop;
    for (size_t i = 0; i < N_FIELDS; i++) {
        json_object *v;
        int64_t n;
        if (!json_object_object_get_ex(val, fields[i].name, &v)) {
            continue;
        }
        n = json_object_get_int64(v);
        if (fields[i].arg % 4 == CAT_LENGTH && n > (int64_t)UINT_MAX) {
            return vd_error_set(err, -EINVAL, "%s value must be in the range "
                                "[0, %u]", fields[i].name, UINT_MAX);
        }
        set_field(&l, fields[i].arg, n);
    }
    if (obj->completed && (r = limits_check(&l, err)) < 0) {
        return r;
    }
    g->cfg = l;
    /* As QEMU's setter: the nodes use the new limits from their next
     * request on; the buckets keep their levels. */
    if (g->rt) {
        vd_throttle_group_update(g->rt, &l, false);
    }
    return 0;
}

static json_object *get_limits(vd_object *obj, const obj_prop *prop)
{
    tgroup *g = (tgroup *)obj;
    json_object *o = json_object_new_object();

    (void)prop;
    for (size_t i = 0; o && i < N_FIELDS; i++) {
        json_object_object_add(o, fields[i].name,
                               json_object_new_int64(get_field(&g->cfg,
                                                               fields[i].arg)));
    }
    return o;
}

/* An "x-" alias: settable only while the group is being made. */
static int set_x(vd_object *obj, const obj_prop *prop, json_object *val,
                 vd_error *err)
{
    tgroup *g = (tgroup *)obj;
    int64_t n = json_object_get_int64(val);

    if (obj->completed) {
        return vd_error_set(err, -EPERM, "Property cannot be set after "
                            "initialization");
    }
    if (n < 0) {
        return vd_error_set(err, -EINVAL, "Property values cannot be "
                            "negative");
    }
    if (prop->arg % 4 == CAT_LENGTH && n > (int64_t)UINT_MAX) {
        /* sic: QEMU's message lacks a space. */
        return vd_error_set(err, -EINVAL, "%s value must be in therange "
                            "[0, %u]", prop->name, UINT_MAX);
    }
    set_field(&g->cfg, prop->arg, n);
    return 0;
}

static json_object *get_x(vd_object *obj, const obj_prop *prop)
{
    return json_object_new_int64(get_field(&((tgroup *)obj)->cfg, prop->arg));
}

static const obj_member limits_members[] = {
#define X(n, b, c) { n, &obj_type_int, true },
    THROTTLE_FIELDS(X)
#undef X
    { NULL, NULL, false },
};

static const obj_type limits_type = { OBJ_STRUCT, "ThrottleLimits", NULL,
                                      limits_members, NULL };

/* ThrottleGroupProperties: limits, then the aliases. */
static const obj_prop tgroup_props[] = {
    { "limits", &limits_type, OBJ_PROP_OPTIONAL | OBJ_PROP_WRITABLE,
      set_limits, get_limits, 0 },
#define X(n, b, c) { "x-" n, &obj_type_int,                                \
                     OBJ_PROP_OPTIONAL | OBJ_PROP_WRITABLE, set_x, get_x,  \
                     FIELD_ARG(b, c) },
    THROTTLE_FIELDS(X)
#undef X
    { NULL, NULL, 0, NULL, NULL, 0 },
};

static int tgroup_complete(vd_object *obj, vd_error *err)
{
    /* The id is the group's name; ids are unique, so QEMU's "A group
     * with this name already exists" cannot happen here. */
    return limits_check(&((tgroup *)obj)->cfg, err);
}

/* QEMU's throttle_config_init(): no limits, bursts of one second. */
static void tgroup_init(vd_object *obj)
{
    tgroup *g = (tgroup *)obj;

    for (int i = 0; i < VD_THROTTLE_BUCKETS; i++) {
        g->cfg.bucket[i].burst_length = 1;
    }
}

static void tgroup_finalize(vd_object *obj)
{
    tgroup *g = (tgroup *)obj;

    vd_throttle_group_free(g->rt);
    g->rt = NULL;
}

const obj_class obj_class_throttle_group = {
    .name = "throttle-group",
    .size = sizeof(tgroup),
    .props = tgroup_props,
    .init = tgroup_init,
    .complete = tgroup_complete,
    .finalize = tgroup_finalize,
    .busy_blocks_delete = true,
};

/* The throttle group @id, or NULL with the public functions' errors.
 * Registry lock held. */
static tgroup *find_group_locked(const char *id, vd_error *err)
{
    vd_object *obj = obj_find_locked(id);

    if (!obj) {
        vd_error_set(err, -ENOENT, "Throttle group '%s' does not exist", id);
        return NULL;
    }
    if (obj->cls != &obj_class_throttle_group) {
        vd_error_set(err, -EINVAL, "Object with id '%s' is not a "
                     "throttle-group", id);
        return NULL;
    }
    return (tgroup *)obj;
}

VD_API int vd_throttle_group_get_limits(const char *id,
                                        vd_throttle_limits *out,
                                        vd_error *err)
{
    vd_error e = VD_ERROR_INIT;
    tgroup *g;

    obj_lock();
    g = find_group_locked(id, &e);
    if (g) {
        *out = g->cfg;
    }
    obj_unlock();
    return g ? 0 : vd_error_set(err, e.code, "%s", e.message);
}

vd_throttle_group *vd_throttle_group_acquire(const char *id, void **holder,
                                             vd_error *err)
{
    vd_object *obj;
    tgroup *g;

    *holder = NULL;
    obj_lock();
    obj = obj_find_locked(id);
    if (!obj || obj->cls != &obj_class_throttle_group) {
        obj_unlock();
        vd_error_set(err, -ENOENT, "Throttle group '%s' does not exist", id);
        return NULL;
    }
    g = (tgroup *)obj;
    if (!g->rt && !(g->rt = vd_throttle_group_new(&g->cfg))) {
        obj_unlock();
        vd_error_set(err, -ENOMEM, "Out of memory");
        return NULL;
    }
    /* A use, as vd_object_find_use() takes one: object-del refuses the
     * group while a node throttles through it. */
    obj->users++;
    obj_unlock();
    *holder = obj;
    return g->rt;
}

void vd_throttle_group_release(void *holder)
{
    vd_object_put_use(holder);
}

VD_API int vd_throttle_group_set_limits(const char *id,
                                        const vd_throttle_limits *l,
                                        vd_error *err)
{
    vd_error e = VD_ERROR_INIT;
    tgroup *g;
    int r;

    obj_lock();
    g = find_group_locked(id, &e);
    if (!g) {
        r = vd_error_set(err, e.code, "%s", e.message);
    } else if ((r = limits_check(l, err)) == 0) {
        g->cfg = *l;
        /* As QEMU's throttle_group_config(): fresh buckets, and the
         * waiting requests are looked at again under the new limits. */
        if (g->rt) {
            vd_throttle_group_update(g->rt, l, true);
        }
    }
    obj_unlock();
    return r;
}
