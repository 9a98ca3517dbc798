/*
 * TLS for the NBD server (nbd-proto.md, "TLS support"), with gnutls:
 * the credential objects of qemu's command line, the per-connection
 * session, and the byte stream every other part of src/nbd/ reads and
 * writes through.
 *
 * Three groups of functions:
 *
 *   credentials     what qemu's `tls-creds-*` objects load (tls-creds.h):
 *                   the objects themselves live in the library's object
 *                   registry (src/objects/tls-creds.c, from --object or
 *                   QMP object-add/object-del). Credentials are
 *                   reference-counted and immutable once loaded: a
 *                   server takes its own reference with
 *                   vd_nbd_tls_creds_get() and hands it to
 *                   vd_nbd_server_set_tls(), so deleting the object
 *                   (QEMU allows that while a server uses it) leaves the
 *                   running server's credentials intact until the server
 *                   is freed. This header declares the other two groups.
 *   connection      nbd_conn_alloc()/nbd_conn_release() own an nbd_conn
 *                   together with its TLS session (nbd_conn has no field
 *                   for one), nbd_conn_starttls() upgrades a connection
 *                   after the server ACKed NBD_OPT_STARTTLS.
 *   stream          nbd_conn_read()/nbd_conn_read_some()/nbd_conn_write():
 *                   plain fds until TLS starts, gnutls records afterwards.
 *                   One reader (the thread holding conn->read_lock) and
 *                   one writer (the thread holding conn->send_lock) at a
 *                   time may run concurrently, which gnutls allows.
 *
 * Built without gnutls, loading credentials fails with "TLS support is
 * not compiled in" and connections are always plain.
 */
#ifndef VDISK_NBD_TLS_H
#define VDISK_NBD_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "nbd-int.h"
#include "vdisk/nbd-server.h"

/* ---- connection ---- */

/* A zeroed connection with room for a TLS session, or NULL (ENOMEM). */
nbd_conn *nbd_conn_alloc(void);

/* Ends the TLS session of @c (a close_notify when the stream is still
 * healthy) and frees @c. The fds are not closed. Accepts NULL. */
void nbd_conn_release(nbd_conn *c);

/* True after nbd_conn_starttls() succeeded on @c. */
bool nbd_conn_tls_active(const nbd_conn *c);

/*
 * Runs the TLS handshake on @c's fds with the credentials of @c's
 * server (nbd_server_tls()), checking the client certificate when
 * verify-peer is on; from then on
 * nbd_conn_read()/nbd_conn_write() use the session. Returns 0, or a
 * negative errno with a message (-EPROTO for a failed handshake, a
 * rejected certificate or an unknown PSK identity; -ETIMEDOUT).
 */
int nbd_conn_starttls(nbd_conn *c, vd_error *err);

/* ---- stream ---- */

/* Reads exactly @len bytes. Returns 0, -EPIPE when the peer went away
 * (end of stream, with or without close_notify), -ETIMEDOUT when the
 * socket's receive timeout expired, or another negative errno (-EPROTO
 * for a TLS error). */
int nbd_conn_read(nbd_conn *c, void *buf, size_t len);

/* Reads what is available, between 1 and @len bytes, waiting only when
 * nothing is. Returns the count or an error as nbd_conn_read(). */
ssize_t nbd_conn_read_some(nbd_conn *c, void *buf, size_t len);

/* Bytes already received and decrypted but not yet read (TLS buffers
 * whole records); 0 on a plain connection. */
size_t nbd_conn_pending(nbd_conn *c);

/* Writes the @n buffers completely (they may be modified). Returns 0 or
 * a negative errno. */
int nbd_conn_write(nbd_conn *c, struct iovec *iov, int n);

#endif
