/*
 * Internals shared by the QMP files: the argument schema, the command
 * table and the daemon structure.
 *
 * Locking: d->lock is the daemon's one big lock. Every command runs under
 * it, so the tables of monitor-owned nodes and exports change only there;
 * NBD I/O never takes it (the NBD server keeps its own export lock and
 * drains an export before removal). d->mon_lock guards the list of
 * monitor clients, which events walk; a client's send_lock orders the
 * lines written to its socket.
 */
#ifndef VDISK_QMP_INT_H
#define VDISK_QMP_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

#include "vdisk/nbd-server.h"
#include "qmp.h"

/* ---- schema (schema.c) ---- */

typedef enum qtype {
    QT_STR,
    QT_BOOL,
    QT_INT,
    QT_ENUM,         /* sub: NULL-terminated const char *const[] */
    QT_OBJ,          /* sub: qarg[] ended by a NULL name */
    QT_STRLIST,      /* array of strings */
    QT_ANY,
    QT_BLOCKDEV,     /* BlockdevOptions: a union on "driver" */
    QT_BLOCKREF,     /* BlockdevRef: BlockdevOptions or a node name */
    QT_BLOCKREF_NULL,/* BlockdevRefOrNull */
    QT_SOCKADDR_LEGACY, /* SocketAddressLegacy {type, data} */
    QT_OBJECT,       /* ObjectOptions: a union on "qom-type" */
    QT_OBJLIST,      /* array of objects; sub: their members, qarg[] */
    QT_UINTLIST,     /* array of non-negative integers (uint64, uint32) */
    QT_BLOCKDEVLIST, /* array of BlockdevOptions */
    QT_ARRAY,        /* an array, its elements checked by the command */
    QT_UINT32,       /* an integer in [0, 2^32) */
} qtype;

typedef struct qarg {
    const char *name;
    qtype type;
    bool optional;
    const void *sub;
} qarg;

typedef struct qmp_cmd {
    const char *name;
    const qarg *args;          /* NULL: takes no arguments */
    json_object *(*fn)(qmp_daemon *d, json_object *args, qmp_error *e);
    bool before_caps;          /* allowed before capabilities negotiation */
} qmp_cmd;

extern const qmp_cmd qmp_commands[];

const qmp_cmd *qmp_find_command(const char *name);

/* Checks @obj against @args (and converts keyval strings when @keyval).
 * @prefix names the enclosing member in messages ("file."). Returns 0 or
 * -1 with @e filled as QEMU words it. */
int qmp_check_args(json_object *obj, const qarg *args, const char *prefix,
                   bool keyval, qmp_error *e);

/* Fills @e (class GenericError unless @cls) and returns NULL. */
json_object *qmp_fail(qmp_error *e, const char *cls, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ---- handlers (commands.c) ---- */

#define QMP_HANDLER(n) \
    json_object *n(qmp_daemon *d, json_object *args, qmp_error *e)
QMP_HANDLER(qmp_cmd_capabilities);
QMP_HANDLER(qmp_cmd_query_version);
QMP_HANDLER(qmp_cmd_query_commands);
QMP_HANDLER(qmp_cmd_quit);
QMP_HANDLER(qmp_cmd_blockdev_add);
QMP_HANDLER(qmp_cmd_blockdev_del);
QMP_HANDLER(qmp_cmd_query_named_block_nodes);
QMP_HANDLER(qmp_cmd_query_blockstats);
QMP_HANDLER(qmp_cmd_block_resize);
QMP_HANDLER(qmp_cmd_nbd_server_start);
QMP_HANDLER(qmp_cmd_nbd_server_stop);
QMP_HANDLER(qmp_cmd_block_export_add);
QMP_HANDLER(qmp_cmd_block_export_del);
QMP_HANDLER(qmp_cmd_query_block_exports);
QMP_HANDLER(qmp_cmd_snapshot_internal);
QMP_HANDLER(qmp_cmd_snapshot_delete_internal);
QMP_HANDLER(qmp_cmd_vdisk_snapshot_save);
QMP_HANDLER(qmp_cmd_vdisk_snapshot_load);
QMP_HANDLER(qmp_cmd_vdisk_snapshot_delete);
QMP_HANDLER(qmp_cmd_object_add);
QMP_HANDLER(qmp_cmd_query_block);
QMP_HANDLER(qmp_cmd_nbd_server_add);
QMP_HANDLER(qmp_cmd_nbd_server_remove);
QMP_HANDLER(qmp_cmd_blockdev_reopen);
QMP_HANDLER(qmp_cmd_block_latency_histogram_set);
QMP_HANDLER(qmp_cmd_vdisk_block_stats_set);
QMP_HANDLER(qmp_cmd_object_del);
QMP_HANDLER(qmp_cmd_qom_list);
QMP_HANDLER(qmp_cmd_qom_get);
QMP_HANDLER(qmp_cmd_qom_set);

/* ---- job commands (jobs.c) ---- */
QMP_HANDLER(qmp_cmd_block_stream);
QMP_HANDLER(qmp_cmd_block_commit);
QMP_HANDLER(qmp_cmd_blockdev_mirror);
QMP_HANDLER(qmp_cmd_blockdev_backup);
QMP_HANDLER(qmp_cmd_blockdev_snapshot);
QMP_HANDLER(qmp_cmd_blockdev_snapshot_sync);
QMP_HANDLER(qmp_cmd_transaction);
QMP_HANDLER(qmp_cmd_drive_backup);
QMP_HANDLER(qmp_cmd_drive_mirror);
QMP_HANDLER(qmp_cmd_query_jobs);
QMP_HANDLER(qmp_cmd_query_block_jobs);
QMP_HANDLER(qmp_cmd_job_pause);
QMP_HANDLER(qmp_cmd_job_resume);
QMP_HANDLER(qmp_cmd_job_cancel);
QMP_HANDLER(qmp_cmd_job_complete);
QMP_HANDLER(qmp_cmd_job_finalize);
QMP_HANDLER(qmp_cmd_job_dismiss);
QMP_HANDLER(qmp_cmd_block_job_pause);
QMP_HANDLER(qmp_cmd_block_job_resume);
QMP_HANDLER(qmp_cmd_block_job_cancel);
QMP_HANDLER(qmp_cmd_block_job_complete);
QMP_HANDLER(qmp_cmd_block_job_finalize);
QMP_HANDLER(qmp_cmd_block_job_dismiss);
QMP_HANDLER(qmp_cmd_block_job_set_speed);

/* ---- dirty bitmaps (bitmaps.c) ---- */
QMP_HANDLER(qmp_cmd_block_dirty_bitmap_add);
QMP_HANDLER(qmp_cmd_block_dirty_bitmap_remove);
QMP_HANDLER(qmp_cmd_block_dirty_bitmap_clear);
QMP_HANDLER(qmp_cmd_block_dirty_bitmap_enable);
QMP_HANDLER(qmp_cmd_block_dirty_bitmap_disable);
QMP_HANDLER(qmp_cmd_block_dirty_bitmap_merge);
QMP_HANDLER(qmp_cmd_x_debug_block_dirty_bitmap_sha256);
/* The node named by the string member @key of @args, or NULL with QEMU's
 * "Node 'X' not found" in @e. */
struct vd_node *qmp_bitmap_node(json_object *args, const char *key,
                                qmp_error *e);
/* Checks the elements of a list of BlockDirtyBitmapOrStr (argument @key)
 * as QAPI does; false with QAPI's message in @e. */
bool qmp_bitmap_list_check(json_object *list, const char *key,
                           qmp_error *e);
/* The references the checked @list names: a string names a bitmap of
 * @node (NULL: searched for by the callee), an object {node, name} the
 * named node's. malloc'd (free it), or NULL with "Node 'X' not found" or
 * an out-of-memory error in @e. */
vd_bitmap_ref *qmp_bitmap_list_refs(json_object *list, struct vd_node *node,
                                    qmp_error *e);
/* BlockDirtyInfo of every bitmap of @node, or NULL when it has none. */
json_object *qmp_dirty_bitmaps_json(struct vd_node *node);

/* ---- the daemon ---- */

typedef struct qmp_export {
    char *id;
    char *name;          /* the NBD export name */
    vd_node *node;       /* borrowed from the node table */
} qmp_export;

typedef struct qmp_client qmp_client;
typedef struct qmp_listener qmp_listener;

struct qmp_daemon {
    pthread_mutex_t lock;          /* the big lock, see above */
    /* Inside a transaction's prepare (transaction.c): job commands
     * create their job without starting it and leave it here. */
    bool txn_defer;
    struct vd_job *txn_job;
    bool keyval;                   /* the running command's arguments come
                                      from a command line (under lock) */
    vd_node **nodes;               /* monitor-owned, in creation order */
    size_t nb_nodes;
    qmp_export *exports;
    size_t nb_exports;
    vd_nbd_server *nbd;
    pthread_t nbd_thread;

    pthread_mutex_t mon_lock;
    qmp_client *clients;
    qmp_listener *listeners;

    int wake[2];                   /* quit requests (signals, `quit`) */
    atomic_bool quitting;
    const char *quit_reason;       /* for the SHUTDOWN event */
};

/* Sends an event to every negotiated client (monitor.c). @data is
 * consumed (may be NULL). */
void qmp_emit_event(qmp_daemon *d, const char *name, json_object *data);

/* Asks the main loop to shut down with @reason (commands.c's quit). */
void qmp_daemon_quit(qmp_daemon *d, const char *reason);

/* Stops the NBD server and removes every export (commands.c). */
void qmp_daemon_stop_nbd(qmp_daemon *d);

/* Job events to the monitors from the library's listener (jobs.c):
 * registered when the daemon is made, removed when it is freed. */
int qmp_jobs_init(qmp_daemon *d);
void qmp_jobs_fini(qmp_daemon *d);

/* Closes every monitor-owned node, newest first (commands.c). */
int qmp_daemon_close_nodes(qmp_daemon *d);

#endif
