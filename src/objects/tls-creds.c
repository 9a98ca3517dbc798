/*
 * The tls-creds-x509 and tls-creds-psk object classes: QEMU's TLS
 * credential objects as the NBD server uses them. The object keeps the
 * properties (QEMU 7.2's, in QAPI's order); completing it loads the
 * credentials through the NBD server's TLS code (src/nbd/tls-creds.h),
 * with the password of the passwordid secret for an encrypted X.509 key.
 * Also here: the NBD header's TLS object functions, which predate the
 * registry and now go through it, and vd_nbd_tls_creds_get(), the
 * server's lookup by id, and nbd_tls_client_creds_get(), the NBD
 * client's.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core/object.h"
#include "nbd/tls-creds.h"
#include "vdisk/nbd-server.h"

typedef struct tls_creds {
    vd_object obj;
    bool verify_peer, sanity_check;
    char *dir, *priority, *username, *passwordid;
    int endpoint;                 /* index into endpoint_values */
    vd_nbd_tls_creds *creds;      /* the object's reference */
} tls_creds;

static const char *const endpoint_values[] = { "client", "server", NULL };
enum { ENDPOINT_CLIENT, ENDPOINT_SERVER };
static const obj_type endpoint_type = { OBJ_ENUM, "QCryptoTLSCredsEndpoint",
                                        endpoint_values, NULL, NULL };

static void creds_init(vd_object *obj)
{
    tls_creds *t = (tls_creds *)obj;

    t->verify_peer = true;
    t->sanity_check = true;
}

static int creds_complete(vd_object *obj, vd_error *err)
{
    tls_creds *t = (tls_creds *)obj;
    bool psk = obj->cls == &obj_class_tls_creds_psk;
    bool server = t->endpoint == ENDPOINT_SERVER;
    nbd_tls_creds_config cfg = {
        .psk = psk,
        .server = server,
        .verify_peer = t->verify_peer,
        .dir = t->dir,
        .priority = t->priority,
    };
    char *password = NULL;
    int r;

    if (!t->dir) {
        return vd_error_set(err, -EINVAL, "Missing 'dir' property value");
    }
    if (psk && server && t->username) {
        return vd_error_set(err, -EINVAL, "username should not be set when "
                            "endpoint=server");
    }
    /* qemu's extra certificate checks (sanity-check) are what gnutls
     * does when it loads and verifies: the switch is accepted. */
    if (!psk && server && t->passwordid) {
        password = vd_secret_get_utf8(t->passwordid, err);
        if (!password) {
            return -EINVAL;
        }
        cfg.key_password = password;
    }
    r = nbd_tls_creds_load(&cfg, &t->creds, err);
    if (password) {
        explicit_bzero(password, strlen(password));
        free(password);
    }
    return r;
}

static void creds_finalize(vd_object *obj)
{
    tls_creds *t = (tls_creds *)obj;

    vd_nbd_tls_creds_unref(t->creds);
    free(t->dir);
    free(t->priority);
    free(t->username);
    free(t->passwordid);
}

static json_object *get_loaded(vd_object *obj, const obj_prop *prop)
{
    (void)prop;
    return json_object_new_boolean(((tls_creds *)obj)->creds != NULL);
}

#define RW (OBJ_PROP_OPTIONAL | OBJ_PROP_WRITABLE)
/* TlsCredsProperties, the base of both classes. */
#define BASE_PROPS                                                         \
    { "verify-peer", &obj_type_bool, RW, obj_set_bool_field,               \
      obj_get_bool_field, offsetof(tls_creds, verify_peer) },              \
    { "dir", &obj_type_str, RW, obj_set_str_field, obj_get_str_field,      \
      offsetof(tls_creds, dir) },                                          \
    { "endpoint", &endpoint_type, RW, obj_set_enum_field,                  \
      obj_get_enum_field, offsetof(tls_creds, endpoint) },                 \
    { "priority", &obj_type_str, RW, obj_set_str_field, obj_get_str_field, \
      offsetof(tls_creds, priority) },                                     \
    { "loaded", &obj_type_bool, OBJ_PROP_OPTIONAL, NULL, get_loaded, 0 }

static const obj_prop x509_props[] = {
    BASE_PROPS,
    { "sanity-check", &obj_type_bool, RW, obj_set_bool_field,
      obj_get_bool_field, offsetof(tls_creds, sanity_check) },
    { "passwordid", &obj_type_str, RW, obj_set_str_field, obj_get_str_field,
      offsetof(tls_creds, passwordid) },
    { NULL, NULL, 0, NULL, NULL, 0 },
};

static const obj_prop psk_props[] = {
    BASE_PROPS,
    { "username", &obj_type_str, RW, obj_set_str_field, obj_get_str_field,
      offsetof(tls_creds, username) },
    { NULL, NULL, 0, NULL, NULL, 0 },
};

const obj_class obj_class_tls_creds_x509 = {
    .name = "tls-creds-x509",
    .size = sizeof(tls_creds),
    .props = x509_props,
    .init = creds_init,
    .complete = creds_complete,
    .finalize = creds_finalize,
};

const obj_class obj_class_tls_creds_psk = {
    .name = "tls-creds-psk",
    .size = sizeof(tls_creds),
    .props = psk_props,
    .init = creds_init,
    .complete = creds_complete,
    .finalize = creds_finalize,
};

/* ---- the NBD server's side ---- */

VD_API vd_nbd_tls_creds *vd_nbd_tls_creds_get(const char *id, vd_error *err)
{
    vd_nbd_tls_creds *c = NULL;
    vd_object *obj;

    obj_lock();
    obj = obj_find_locked(id);
    if (!obj) {
        vd_error_set(err, -ENOENT, "No TLS credentials with id '%s'", id);
    } else if (obj->cls != &obj_class_tls_creds_x509 &&
               obj->cls != &obj_class_tls_creds_psk) {
        vd_error_set(err, -EINVAL, "Object with id '%s' is not TLS "
                     "credentials", id);
    } else {
        c = nbd_tls_creds_ref(((tls_creds *)obj)->creds);
    }
    obj_unlock();
    return c;
}

VD_API int vd_nbd_tls_add_object(const char *spec, vd_error *err)
{
    return vd_object_add_cli(spec, NULL, err);
}

VD_API int vd_nbd_tls_add_object_opts(vd_opts *opts, vd_error *err)
{
    char *type = vd_opts_take(opts, "qom-type");
    char *id = vd_opts_take(opts, "id");
    int r;

    if (!type) {
        r = vd_error_set(err, -EINVAL, "Parameter 'qom-type' is missing");
    } else if (!id) {
        r = vd_error_set(err, -EINVAL, "Parameter 'id' is missing");
    } else {
        r = vd_object_add(type, id, opts, err);
    }
    if (r == 0) {
        while (vd_opts_count(opts)) {
            vd_opts_del(opts, vd_opts_first_key(opts));
        }
    }
    free(type);
    free(id);
    return r;
}

VD_API int vd_nbd_tls_del_object(const char *id, vd_error *err)
{
    return vd_object_del(id, err);
}

VD_API void vd_nbd_tls_cleanup(void)
{
    vd_object_del_all();
}

int nbd_tls_client_creds_get(const char *id, nbd_tls_client_creds *out,
                             vd_error *err)
{
    vd_object *obj;
    tls_creds *t;
    int r = 0;

    memset(out, 0, sizeof(*out));
    obj_lock();
    obj = obj_find_locked(id);
    t = (tls_creds *)obj;
    if (!obj) {
        r = vd_error_set(err, -ENOENT, "No TLS credentials with id '%s'",
                         id);
    } else if (obj->cls != &obj_class_tls_creds_x509 &&
               obj->cls != &obj_class_tls_creds_psk) {
        r = vd_error_set(err, -EINVAL, "Object with id '%s' is not TLS "
                         "credentials", id);
    } else if (t->endpoint != ENDPOINT_CLIENT) {
        r = vd_error_set(err, -EINVAL, "Expected TLS credentials for a "
                         "client endpoint");
    } else {
        out->psk = obj->cls == &obj_class_tls_creds_psk;
        out->verify_peer = t->verify_peer;
        out->dir = t->dir ? strdup(t->dir) : NULL;
        out->username = t->username ? strdup(t->username) : NULL;
        if ((t->dir && !out->dir) || (t->username && !out->username)) {
            free(out->dir);
            free(out->username);
            out->dir = out->username = NULL;
            r = vd_error_set(err, -ENOMEM, "Out of memory");
        }
    }
    obj_unlock();
    return r;
}
