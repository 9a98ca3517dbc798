/*
 * vdisk: the NBD server, part of libvdisk's public API.
 *
 * A program that has opened a node (vd_open(), or a node it found with
 * vd_find_node()) can export it over NBD to other processes or machines,
 * exactly as `vdisk serve` (qemu-nbd, qemu-storage-daemon's
 * nbd-server-start / block-export-add) does: fixed newstyle negotiation,
 * structured replies, the base:allocation metadata context (and
 * qemu:allocation-depth and qemu:dirty-bitmap:NAME on exports that ask
 * for them), multiple
 * connections and optional TLS.
 * docs/nbd.md describes the protocol side.
 *
 * A minimal server:
 *
 *     signal(SIGPIPE, SIG_IGN);
 *     vd_nbd_server *srv = vd_nbd_server_new(4, 0, true);
 *     vd_nbd_server_add_export(srv, "disk", NULL, node, &err);
 *     vd_nbd_server_listen_unix(srv, "/run/disk.sock", &err);
 *     vd_nbd_server_run(srv, &err);  // returns after request_shutdown()
 *     vd_nbd_server_free(&srv);
 *     vd_close(&node, NULL);
 *
 * Threads: vd_nbd_server_run() blocks the calling thread and starts one
 * or more threads per connection; requests reach the exported nodes from
 * those threads, concurrently with any requests the program issues
 * itself (nodes are thread-safe for requests, see vdisk.h). Exports may
 * be added, removed and resized while the server runs, from any thread.
 * vd_nbd_server_request_shutdown() may be called from any thread and from
 * a signal handler. Everything else (listening, TLS, freeing) is set up
 * before vd_nbd_server_run() or done after it returned.
 *
 * Signals: replies are written with plain write calls, so a client that
 * disconnects mid-reply raises SIGPIPE; a program serving NBD must ignore
 * it (the library does not change signal dispositions). The server logs
 * the error that ends a connection abnormally on stderr.
 *
 * Nodes are borrowed: the server never opens or closes them. Keep each
 * exported node open until its export is removed or the server freed.
 *
 * Errors follow vdisk.h: 0 or a negative errno, and a message in the
 * optional vd_error.
 */
#ifndef VDISK_NBD_SERVER_H
#define VDISK_NBD_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vdisk/bitmap.h"
#include "vdisk/vdisk.h"

#ifdef __cplusplus
extern "C" {
#endif

/** A server: its exports, listening sockets and connections. */
typedef struct vd_nbd_server vd_nbd_server;

/** A reference to TLS credentials (a qemu tls-creds-* object). */
typedef struct vd_nbd_tls_creds vd_nbd_tls_creds;

/* ------------------------------------------------------------------ */
/* Servers and exports                                                */
/* ------------------------------------------------------------------ */

/**
 * Creates a server. Each connection uses at most @nworkers threads (0 is
 * taken as 1); at most @max_clients connections are served at once (0:
 * unlimited; further clients wait in the listen backlog, as with qemu-nbd
 * --shared), and clients are told multi-connection is safe unless
 * @max_clients is 1. Without @persistent, vd_nbd_server_run() returns once
 * the last client has gone after at least one came (qemu-nbd without
 * --persistent). Returns NULL when out of memory or file descriptors.
 */
VD_API vd_nbd_server *vd_nbd_server_new(unsigned nworkers,
                                        unsigned max_clients,
                                        bool persistent);

/**
 * Frees the server: closes its listening sockets (unlinking a UNIX socket
 * it created), drops its exports and its reference to TLS credentials,
 * and sets @*srv to NULL. Accepts NULL. The server must not be running.
 * Exported nodes are not closed.
 */
VD_API void vd_nbd_server_free(vd_nbd_server **srv);

/**
 * Adds an export of @node named @name (at most 4096 bytes; "" is the
 * default export) with an optional @description (NULL for none). The
 * export is read-only when @node is. The export is a user of @node
 * (vd_user_new) that holds read, and write unless read-only, and lets
 * nobody resize the node while it is served, as qemu-nbd's export; it
 * also blocks reverting @node to a snapshot (VD_OP_SNAPSHOT_GOTO).
 * Returns 0, or -EINVAL (name or description too long), -EEXIST (name in
 * use), -ENOMEM, the error of reading @node's length, or the permission
 * error (-EPERM, -EBUSY: see vd_user_new) with QEMU's message.
 */
VD_API int vd_nbd_server_add_export(vd_nbd_server *srv, const char *name,
                                    const char *description, vd_node *node,
                                    vd_error *err);

/** vd_nbd_server_add_export() with the export read-only when @read_only,
 * even over a writable node. */
VD_API int vd_nbd_server_add_export_ro(vd_nbd_server *srv, const char *name,
                                       const char *description,
                                       vd_node *node, bool read_only,
                                       vd_error *err);

/** Everything an export can be given, for vd_nbd_server_add_export_opts()
 * (block-export-add's BlockExportOptionsNbd, qemu-nbd's options). */
typedef struct vd_nbd_export_opts {
    const char *name;           /* may be "" (the default export) */
    const char *description;    /* NULL: none */
    vd_node *node;              /* borrowed, see above */
    bool read_only;             /* read-only even over a writable node */
    bool allocation_depth;      /* offer qemu:allocation-depth */
    /* Dirty bitmaps offered as qemu:dirty-bitmap:NAME contexts (at most
     * 64). A reference without a node is searched for from @node down
     * with vd_bitmap_find(), as QEMU's bitmap names; one with a node
     * names that node's bitmap. */
    const vd_bitmap_ref *bitmaps;
    size_t nb_bitmaps;
} vd_nbd_export_opts;

/**
 * Adds an export described by @o, as vd_nbd_server_add_export_ro() does,
 * with the optional contexts. Each exported bitmap is marked busy (see
 * vd_bitmap_set_busy()) until the export is removed: it goes on recording
 * writes, but cannot be changed or removed meanwhile. Errors as
 * vd_nbd_server_add_export_ro(), and QEMU's for bitmaps: "Bitmap 'b' is
 * not found" (-ENOENT), a busy or inconsistent bitmap (-EINVAL, the
 * message of vd_bitmap_set_busy()), "Enabled bitmap 'b' incompatible
 * with readonly export" (-EINVAL) for a recording bitmap on a read-only
 * export of a writable node. Nothing is added on error.
 */
VD_API int vd_nbd_server_add_export_opts(vd_nbd_server *srv,
                                         const vd_nbd_export_opts *o,
                                         vd_error *err);

/**
 * Makes export @name offer the qemu:allocation-depth metadata context
 * (@on) or not, as qemu-nbd -A and block-export-add's allocation-depth:
 * exports do not offer it until asked, as QEMU's. Clients that already
 * negotiated keep what they have. -ENOENT when there is no such export.
 */
VD_API int vd_nbd_server_set_allocation_depth(vd_nbd_server *srv,
                                              const char *name, bool on,
                                              vd_error *err);

/** True when the server has an export named @name. */
VD_API bool vd_nbd_server_has_export(vd_nbd_server *srv, const char *name);

/**
 * Unlists export @name and waits until no connection transmits on it;
 * afterwards its node may be closed. Without @hard, fails with -EBUSY
 * while clients use it; with @hard their sockets are shut down first
 * (each finishes the requests it has already read). -ENOENT when there
 * is no such export.
 */
VD_API int vd_nbd_server_remove_export(vd_nbd_server *srv, const char *name,
                                       bool hard, vd_error *err);

/** Re-reads the length of @node into every export of it, after the
 * program resized it; clients connected before keep the size they
 * negotiated. */
VD_API void vd_nbd_server_update_export_size(vd_nbd_server *srv,
                                             vd_node *node);

/* ------------------------------------------------------------------ */
/* Running                                                            */
/* ------------------------------------------------------------------ */

/**
 * Listens on the UNIX socket @path (at most 8 sockets per server). A
 * socket file left at @path by an earlier server is replaced; the file
 * is unlinked when the server is freed. Returns 0 or a negative errno
 * (-ENAMETOOLONG, the errno of socket()/bind()/listen()).
 */
VD_API int vd_nbd_server_listen_unix(vd_nbd_server *srv, const char *path,
                                     vd_error *err);

/**
 * Listens on TCP @port of @addr (NULL: every local address), one socket
 * per address family getaddrinfo() returns. Returns 0 when at least one
 * socket listens, -EINVAL when the address does not resolve, or the
 * errno of the last failed bind()/listen().
 */
VD_API int vd_nbd_server_listen_tcp(vd_nbd_server *srv, const char *addr,
                                    const char *port, vd_error *err);

/**
 * Serves connections until vd_nbd_server_request_shutdown() or, without
 * persistence, until the last client left; then stops accepting, lets
 * every connection finish the requests it has read and joins all its
 * threads. Call it once per server, after any fork(). Returns 0 or a
 * negative errno (poll() failed).
 */
VD_API int vd_nbd_server_run(vd_nbd_server *srv, vd_error *err);

/**
 * Sets how long a client may take to complete the handshake (TLS
 * included) before it is dropped: @seconds, or no limit for 0 (qemu-nbd
 * --handshake-limit; the default is 10). Call before
 * vd_nbd_server_run().
 */
VD_API void vd_nbd_server_set_handshake_limit(vd_nbd_server *srv,
                                              unsigned seconds);

/** Asks a running server to stop. Async-signal-safe. */
VD_API void vd_nbd_server_request_shutdown(vd_nbd_server *srv);

/* ------------------------------------------------------------------ */
/* TLS                                                                */
/* ------------------------------------------------------------------ */

/*
 * Credentials come from the library's object registry (vdisk.h,
 * "Objects"): qemu's --object tls-creds-x509 / tls-creds-psk and QMP
 * object-add make them, vd_object_add() and friends in a program. For
 * endpoint=server the credentials are loaded from the object's dir when
 * it is added (ca-cert.pem, server-cert.pem, server-key.pem, optional
 * ca-crl.pem and dh-params.pem; keys.psk for PSK; passwordid names the
 * secret that decrypts server-key.pem) and the priority string is
 * checked; client credentials are kept, never loaded, and refused by a
 * server. Credentials are reference-counted and immutable once loaded.
 * Built without gnutls, adding such an object fails with -ENOTSUP ("TLS
 * support is not compiled in").
 *
 * The four functions below predate the registry and are kept for
 * programs written against them; they act on any object.
 */

/** vd_object_add_cli() without help: adds the object one qemu --object
 * argument describes, e.g.
 * "tls-creds-x509,id=ID,dir=DIR,endpoint=server,verify-peer=off". */
VD_API int vd_nbd_tls_add_object(const char *spec, vd_error *err);

/** vd_object_add() with the type and id in @opts ("qom-type", "id");
 * on success every key of @opts has been taken. */
VD_API int vd_nbd_tls_add_object_opts(vd_opts *opts, vd_error *err);

/** vd_object_del(): servers holding the credentials keep using them. */
VD_API int vd_nbd_tls_del_object(const char *id, vd_error *err);

/** vd_object_del_all() (at program end); servers keep their
 * credentials. */
VD_API void vd_nbd_tls_cleanup(void);

/**
 * A new reference to the credentials of object @id, or NULL with QEMU's
 * "No TLS credentials with id 'ID'" or "Object with id 'ID' is not TLS
 * credentials". Check the endpoint with vd_nbd_tls_creds_is_server()
 * before giving it to a server.
 */
VD_API vd_nbd_tls_creds *vd_nbd_tls_creds_get(const char *id, vd_error *err);

/** True when @creds were made with endpoint=server. */
VD_API bool vd_nbd_tls_creds_is_server(const vd_nbd_tls_creds *creds);

/** Drops a reference; the last one frees the credentials. Accepts NULL.
 * Never drop one a running server may still use. */
VD_API void vd_nbd_tls_creds_unref(vd_nbd_tls_creds *creds);

/**
 * Makes the server require TLS (FORCEDTLS, qemu-nbd --tls-creds) with
 * @creds, taking over the caller's reference (released when the server is
 * freed). @creds must be server-endpoint credentials; NULL makes the
 * server plain again. Call before vd_nbd_server_run().
 */
VD_API void vd_nbd_server_set_tls(vd_nbd_server *srv,
                                  vd_nbd_tls_creds *creds);

/**
 * Makes the server admit only TLS clients whose identity authorization
 * object @authz_id (authz-simple, authz-list, vd_authz_is_allowed())
 * allows, as qemu-nbd --tls-authz: the distinguished name of the X.509
 * client certificate, with verify-peer=on credentials (as in QEMU 7.2,
 * PSK clients and X.509 without verify-peer are not checked). A refused
 * client's connection ends after the TLS handshake.
 * NULL removes the check. The object is looked up at each connection.
 * Returns 0 or -ENOMEM. Call before vd_nbd_server_run().
 */
VD_API int vd_nbd_server_set_tls_authz(vd_nbd_server *srv,
                                       const char *authz_id);

#ifdef __cplusplus
}
#endif

#endif /* VDISK_NBD_SERVER_H */
