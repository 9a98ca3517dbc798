/*
 * The client sides of qemu-nbd that vdisk serve shares (serve_client.c):
 * listing a server's exports (-L) and the kernel's NBD client (-c, -d).
 * Messages go through cli_error() with qemu-nbd's words.
 */
#ifndef VDISK_TOOLS_SERVE_CLIENT_H
#define VDISK_TOOLS_SERVE_CLIENT_H

#include <stdbool.h>

/* -L: connects to the UNIX socket @sockpath or TCP @host:@port, with TLS
 * when @creds_id names client credentials (@tls_hostname: the name the
 * server's certificate must carry), and prints the exports as qemu-nbd
 * -L does. Returns the exit status. */
int serve_list_exports(const char *sockpath, const char *host,
                       const char *port, const char *creds_id,
                       const char *tls_hostname);

/* -d DEV: unbinds the kernel's NBD device @dev, prints "DEV
 * disconnected". Returns the exit status. */
int serve_kernel_disconnect(const char *dev);

/* -c DEV: opens @dev (qemu-nbd's message and -1 when it cannot), then
 * starts a thread that connects to the server on @sockpath, binds the
 * device to the export, writes 'R' to @ready_fd (--fork's pipe; -1:
 * none) and serves until the device is disconnected; then (or on
 * failure, after qemu-nbd's message, @ready_fd closed unwritten) it
 * calls @stop, which must end the server. On success the thread owns
 * @ready_fd. 0 or -1. */
int serve_kernel_connect_start(const char *dev, const char *sockpath,
                               const char *srcpath, bool verbose,
                               void (*stop)(void), int ready_fd);

/* Joins that thread; the exit status of the -c client. */
int serve_kernel_connect_finish(void);

#endif
