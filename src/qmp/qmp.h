/*
 * The QMP daemon: vdisk's counterpart of qemu-storage-daemon. A daemon
 * holds the monitor-owned nodes, the NBD server with its exports and the
 * QMP monitor sockets; tools/cmd_serve.c builds one from the command
 * line and runs it until `quit` or a signal. See docs/qmp.md.
 *
 * The pieces: schema.c describes every command once (name, arguments,
 * handler) and validates arguments against that description; commands.c
 * holds the daemon state and the handlers; monitor.c speaks the wire
 * protocol on UNIX sockets, one thread per client.
 */
#ifndef VDISK_QMP_QMP_H
#define VDISK_QMP_QMP_H

#include <stdbool.h>

#include <json-c/json.h>

#include "vdisk/vdisk.h"

typedef struct qmp_daemon qmp_daemon;

/* A command's failure: QMP error class and message. */
typedef struct qmp_error {
    const char *cls;        /* "GenericError", "CommandNotFound", ... */
    /* Room for QEMU's longest texts ("Bitmap name too long: " and a
     * name of 1024 bytes or more, cut as the reply would be). */
    char desc[2048];
} qmp_error;

qmp_daemon *qmp_daemon_new(void);

/*
 * Runs command @name with @args (an object or NULL; not consumed).
 * With @keyval the arguments come from a command line: strings stand for
 * booleans and integers and are converted. Returns the command's return
 * value (caller puts it) or NULL with @e filled.
 */
json_object *qmp_daemon_execute(qmp_daemon *d, const char *name,
                                json_object *args, bool keyval, qmp_error *e);

/* Listens for monitor clients on the UNIX socket @path. */
int qmp_daemon_add_monitor(qmp_daemon *d, const char *path, vd_error *err);

/* Serves until `quit` or qmp_daemon_request_quit(), then shuts down:
 * monitors closed, exports removed, every node flushed and closed.
 * Returns 0 or a negative errno (a node failed to flush). */
int qmp_daemon_run(qmp_daemon *d);

/* How the daemon reports what no QMP client sees (the NBD server
 * failing, a node failing to close at shutdown): @fn prints one message
 * with the program's name. Without it, "qmp: MESSAGE" goes to stderr. */
void qmp_set_reporter(void (*fn)(const char *msg));

/* Asks a running daemon to stop (a signal). Async-signal-safe. */
void qmp_daemon_request_quit(qmp_daemon *d);

/* Frees a daemon that qmp_daemon_run() has shut down or never ran (in
 * which case it also closes what it holds), and every object of the
 * process (vd_object_del_all()). */
void qmp_daemon_free(qmp_daemon **d);

/*
 * Parses a command-line option value into a JSON object: either JSON
 * text ("{...}") or qemu's key=value,a.b=value syntax, whose dotted keys
 * become nested objects and whose values stay strings. @implied names
 * the key of a leading bare word ("socket" in --chardev socket,id=x), or
 * NULL. Returns NULL with @err set.
 */
json_object *qmp_parse_cli_object(const char *str, const char *implied,
                                  vd_error *err);

#endif
