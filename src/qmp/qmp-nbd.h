/*
 * Run-time export management that src/nbd/server.c provides for the QMP
 * monitor. These belong in nbd-server.h; they are declared here until
 * that header (owned by the NBD engineer) carries them.
 */
#ifndef VDISK_QMP_NBD_H
#define VDISK_QMP_NBD_H

#include "nbd/nbd-server.h"

/* nbd_server_add_export() with the export forced read-only when
 * @read_only (a writable node may be exported read-only). */
int nbd_server_add_export_ro(nbd_server *srv, const char *name,
                             const char *description, vd_node *node,
                             bool read_only, vd_error *err);

/* Unlists export @name and waits until no connection transmits on it.
 * Without @hard, fails with -EBUSY while clients use it; with @hard their
 * sockets are shut down first (they drain their requests). -ENOENT when
 * there is no such export. */
int nbd_server_remove_export(nbd_server *srv, const char *name, bool hard,
                             vd_error *err);

/* Re-reads the length of @node into the exports of it (after a resize);
 * clients connected before keep the size they negotiated. */
void nbd_server_update_export_size(nbd_server *srv, vd_node *node);

/* Connections currently in transmission on export @name. */
unsigned nbd_server_export_clients(nbd_server *srv, const char *name);

#endif
