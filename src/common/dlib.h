/*
 * Optional libraries loaded when first needed (dlopen), not linked.
 *
 * The remote protocol drivers are built on large libraries (libnbd,
 * libcurl, libssh, libiscsi, librbd) that pull in dozens more (krb5,
 * ldap, icu, rdma, Ceph's static initialisers). Linked into libvdisk,
 * they cost every vdisk process several megabytes of memory and start-up
 * time, used or not. QEMU loads its block-curl.so, block-rbd.so ... as
 * modules for the same reason. Here a driver names its library and the
 * functions it calls in one list; the core loads the library before the
 * driver's first open or create (vd_driver.library), and the driver calls
 * each function through LIB(f), a pointer with the prototype of the
 * library's own header:
 *
 *     #define NBD_FUNCS(X) X(nbd_create) X(nbd_close) ...
 *     VD_DLIB_DEFINE(nbd_lib, VDISK_LIBNBD_SONAME, NBD_FUNCS);
 *     ... LIB(nbd_create)() ...
 *     const vd_driver vd_driver_nbd = { ..., .library = &nbd_lib };
 *
 * The build finds the library's headers and its soname (meson.build,
 * scripts/soname.sh); a machine without the library at run time gets an
 * error naming it when the protocol is used, nothing else.
 *
 * Header only, with the public vdisk.h alone, because the vdisk tool
 * loads libnbd the same way for `serve -L` (tools/serve_client.c).
 */
#ifndef VDISK_COMMON_DLIB_H
#define VDISK_COMMON_DLIB_H

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "vdisk/vdisk.h"

typedef struct vd_dlib {
    const char *soname;         /* what dlopen() opens ("libnbd.so.0") */
    const char *const *names;   /* the functions, NULL-terminated */
    void *const *slots;         /* for each, the address of its pointer */
    pthread_mutex_t lock;
    int state;                  /* 0 not tried, 1 loaded, -1 failed */
    char error[256];            /* dlerror()'s words when it failed */
} vd_dlib;

/* Loads @lib once (later calls return at once, with the first outcome):
 * every function pointer set, or -ENOTSUP and "cannot load SONAME: WHY"
 * in @err. Thread-safe. The library stays loaded until the process
 * exits. */
static inline int vd_dlib_load(vd_dlib *lib, vd_error *err)
{
    pthread_mutex_lock(&lib->lock);
    if (lib->state == 0) {
        /* RTLD_LOCAL: the library's symbols stay out of the global
         * namespace, so two libraries never bind each other's. */
        void *h = dlopen(lib->soname, RTLD_NOW | RTLD_LOCAL);
        lib->state = h ? 1 : -1;
        if (!h)
            snprintf(lib->error, sizeof(lib->error), "%s", dlerror());
        for (size_t i = 0; h && lib->names[i]; i++) {
            void *sym = dlsym(h, lib->names[i]);
            if (!sym) {
                snprintf(lib->error, sizeof(lib->error), "%s: no symbol %s",
                         lib->soname, lib->names[i]);
                lib->state = -1;
                break;
            }
            /* A data pointer into a function pointer: POSIX guarantees
             * the representation (dlsym's own contract). */
            memcpy(lib->slots[i], &sym, sizeof(sym));
        }
    }
    int state = lib->state;
    pthread_mutex_unlock(&lib->lock);
    /* dlerror() names the file itself ("libnbd.so.0: cannot open shared
     * object file: ..."). */
    if (state < 0)
        return vd_error_set(err, -ENOTSUP, "cannot load %s", lib->error);
    return 0;
}

#define VD_DLIB_POINTER(f) static __typeof__(f) *vd_dl_##f;
#define VD_DLIB_NAME(f) #f,
#define VD_DLIB_SLOT(f) (void *)&vd_dl_##f,

/* Declares a pointer for each function of FUNCS (an X-macro list) and
 * the vd_dlib @var that fills them from @soname. */
#define VD_DLIB_DEFINE(var, soname, FUNCS)                                 \
    FUNCS(VD_DLIB_POINTER)                                                 \
    static const char *const var##_names[] = { FUNCS(VD_DLIB_NAME) NULL }; \
    static void *const var##_slots[] = { FUNCS(VD_DLIB_SLOT) NULL };      \
    static vd_dlib var = { soname, var##_names, var##_slots,              \
                           PTHREAD_MUTEX_INITIALIZER, 0, "" }

/* Calls the library's function f (valid once the driver's library is
 * loaded, which the core guarantees in every callback after open or
 * create began). */
#define LIB(f) (*vd_dl_##f)

#endif /* VDISK_COMMON_DLIB_H */
