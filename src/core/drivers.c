/*
 * The driver registry: a fixed table of the drivers built into the
 * library, in probing and listing order. The references are strong so
 * that linking the static library pulls every driver in.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "core/block_int.h"

extern const vd_driver vd_driver_file;
extern const vd_driver vd_driver_null_co;
extern const vd_driver vd_driver_raw;
extern const vd_driver vd_driver_qcow2;
extern const vd_driver vd_driver_blkdebug;

static const vd_driver *const driver_table[] = {
    &vd_driver_file,
    &vd_driver_null_co,
    &vd_driver_raw,
    &vd_driver_qcow2,
    &vd_driver_blkdebug,   /* test filter: error and crash injection */
};
#define N_DRIVERS (sizeof(driver_table) / sizeof(driver_table[0]))

const vd_driver *vd_driver_at(int i)
{
    return i >= 0 && (size_t)i < N_DRIVERS ? driver_table[i] : NULL;
}

const vd_driver *vd_find_driver(const char *name)
{
    if (!name)
        return NULL;
    for (size_t k = 0; k < N_DRIVERS; k++)
        if (strcmp(driver_table[k]->name, name) == 0)
            return driver_table[k];
    return NULL;
}

VD_API void vd_list_drivers(void (*fn)(const char *name, void *opaque),
                            void *opaque)
{
    for (size_t k = 0; k < N_DRIVERS; k++)
        fn(driver_table[k]->name, opaque);
}

/* Merged option lists (format's own, then its protocol's), built once. */
static pthread_mutex_t merged_lock = PTHREAD_MUTEX_INITIALIZER;
static vd_create_option *merged[N_DRIVERS];

VD_API const vd_create_option *vd_create_options(const char *format)
{
    const vd_driver *drv = vd_find_driver(format);
    if (!drv)
        return NULL;
    size_t idx = 0;
    while (driver_table[idx] != drv)
        idx++;
    const vd_driver *proto = drv->is_format ? vd_find_driver("file") : NULL;
    pthread_mutex_lock(&merged_lock);
    if (!merged[idx]) {
        size_t n = 0, m = 0;
        for (const vd_create_option *o = drv->create_opts; o && o->name; o++)
            n++;
        for (const vd_create_option *o = proto ? proto->create_opts : NULL;
             o && o->name; o++)
            m++;
        vd_create_option *list = calloc(n + m + 1, sizeof(*list));
        if (list) {
            size_t k = 0;
            for (size_t i = 0; i < n; i++)
                list[k++] = drv->create_opts[i];
            for (size_t i = 0; i < m; i++) {
                bool dup = false;
                for (size_t j = 0; j < n; j++)
                    if (strcmp(drv->create_opts[j].name,
                               proto->create_opts[i].name) == 0)
                        dup = true;
                if (!dup)
                    list[k++] = proto->create_opts[i];
            }
            merged[idx] = list;
        }
    }
    const vd_create_option *r = merged[idx];
    pthread_mutex_unlock(&merged_lock);
    return r;
}
