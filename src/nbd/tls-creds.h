/*
 * The NBD server's TLS credentials as the object registry makes them:
 * the tls-creds-x509 and tls-creds-psk classes (src/objects/tls-creds.c,
 * in the library proper) keep the objects, their properties and their
 * ids; when one is added they call nbd_tls_creds_load() here, where the
 * gnutls code lives, and keep the reference it returns. A server takes
 * its own reference (vd_nbd_tls_creds_get() -> nbd_tls_creds_ref()), so
 * deleting the object leaves a running server's credentials alone.
 *
 * Only public types cross this header, so src/nbd/ keeps building
 * against the public API alone.
 */
#ifndef VDISK_NBD_TLS_CREDS_H
#define VDISK_NBD_TLS_CREDS_H

#include <stdbool.h>

#include "vdisk/nbd-server.h"

/* What a tls-creds-* object says, once its checks have passed. */
typedef struct nbd_tls_creds_config {
    bool psk;                   /* tls-creds-psk, else tls-creds-x509 */
    bool server;                /* endpoint=server */
    bool verify_peer;
    const char *dir;
    const char *priority;       /* NULL: gnutls's "NORMAL" */
    const char *key_password;   /* X.509: the passwordid secret, or NULL */
} nbd_tls_creds_config;

/*
 * Loads server credentials from @cfg->dir (ca-cert.pem, server-cert.pem,
 * server-key.pem, optional ca-crl.pem and dh-params.pem; keys.psk for
 * PSK) and checks the priority string; client credentials are kept
 * unloaded (a server refuses them). Returns 0 and a reference in @*out,
 * or a negative errno with the file and the fault in @err (-ENOTSUP
 * without gnutls).
 */
int nbd_tls_creds_load(const nbd_tls_creds_config *cfg,
                       vd_nbd_tls_creds **out, vd_error *err);

/* Another reference to @creds (released with vd_nbd_tls_creds_unref()). */
vd_nbd_tls_creds *nbd_tls_creds_ref(vd_nbd_tls_creds *creds);

/* What the NBD client (src/drivers/nbd.c) needs of the tls-creds-*
 * object @id to hand to libnbd: its directory, kind, PSK username and
 * verify-peer; the strings are the caller's to free. Refused, with
 * QEMU's messages, when there is no such object, it is no TLS
 * credentials, or its endpoint is not "client". */
typedef struct nbd_tls_client_creds {
    bool psk;
    bool verify_peer;
    char *dir;
    char *username;             /* PSK: NULL when not set */
} nbd_tls_client_creds;
int nbd_tls_client_creds_get(const char *id, nbd_tls_client_creds *out,
                             vd_error *err);

#endif
