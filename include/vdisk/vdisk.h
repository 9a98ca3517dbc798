/*
 * vdisk: a block layer for virtual-machine disk images.
 *
 * This is the public C API. A program opens an image as a graph of block
 * nodes (a format driver such as raw or qcow2 over a protocol driver such
 * as file) and gets back the top node, on which it issues byte-addressed
 * requests.
 *
 * Threads: every function here may be called from any thread. Requests
 * (vd_pread ... vd_block_status) to the same node may run concurrently
 * from many threads; they overlap unless the driver must serialise them
 * (for instance two writes allocating the same qcow2 cluster). Opening,
 * closing, truncating and snapshot operations on a node must not race
 * with requests that the same caller issues to that node: finish your own
 * requests first. After fork() only the child's exec() or _exit() is
 * supported while nodes are open in the parent.
 *
 * Errors: functions return 0 (or a non-negative count) on success and a
 * negative errno on failure. Each function that can fail takes a
 * `vd_error *err` as its last argument; when it is not NULL it receives a
 * one-line human message naming the file and the fault. The first error
 * set wins. Pass NULL when you only want the errno.
 *
 * Memory: every pointer returned through an out-parameter is owned by the
 * caller and released with the matching *_free/close function, unless the
 * documentation says "borrowed".
 *
 * Signals: the library never changes signal dispositions; they belong to
 * the host program. Under a file-size limit (RLIMIT_FSIZE, `ulimit -f`) a
 * write past the limit raises SIGXFSZ, whose default action kills the
 * process. A program that wants such a write to fail like any other I/O
 * error (-EFBIG, "File too large", for that request only) must ignore
 * SIGXFSZ itself, e.g. signal(SIGXFSZ, SIG_IGN) before opening images;
 * the vdisk tools do.
 */
#ifndef VDISK_VDISK_H
#define VDISK_VDISK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* VD_API marks what libvdisk exports (its build hides everything else);
 * VD_PRINTF lets GNU compilers check the format strings of the error
 * helpers. Neither changes anything for a program using the library. */
#if defined(__GNUC__) && defined(VDISK_BUILDING)
#define VD_API __attribute__((visibility("default")))
#else
#define VD_API
#endif
#if defined(__GNUC__)
#define VD_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#else
#define VD_PRINTF(fmt, args)
#endif

/* ------------------------------------------------------------------ */
/* Version                                                            */
/* ------------------------------------------------------------------ */

#define VDISK_VERSION_MAJOR 0
#define VDISK_VERSION_MINOR 1
#define VDISK_VERSION_MICRO 0

/** Returns the library version as "MAJOR.MINOR.MICRO" (static string). */
VD_API const char *vd_version(void);

/* ------------------------------------------------------------------ */
/* Errors                                                             */
/* ------------------------------------------------------------------ */

/**
 * An error: a negative errno and a one-line message without trailing
 * punctuation, e.g. "disk.qcow2: L2 table offset 0x1234 is not
 * cluster-aligned". code == 0 means "no error". Initialise with
 * VD_ERROR_INIT or vd_error_clear() before first use.
 */
typedef struct vd_error {
    int code;
    char message[1024];
    /* Optional further line(s) for a human, printed after the message by
     * command-line tools and left out of QMP answers, as QEMU's error
     * hints (e.g. "Is another process using the image [a.qcow2]?").
     * Empty when there is none; ends without a newline. */
    char hint[256];
} vd_error;

#define VD_ERROR_INIT { 0, { 0 }, { 0 } }

/** Resets @err to "no error". @err may be NULL. */
VD_API void vd_error_clear(vd_error *err);

/*
 * The helpers below are what the library itself uses to fill a vd_error;
 * they are public so that code built on vdisk (an NBD or QMP front end,
 * a driver of requests) reports errors the same way. None of them
 * allocates; each touches only @err, so they are thread-safe as long as
 * one vd_error is not shared between threads.
 */

/**
 * Records @code (a negative errno; 0 is recorded as -EIO) and a
 * printf-style message in @err, unless @err is NULL or already holds an
 * error (the first error wins). The message is truncated to fit
 * vd_error.message. Returns @code as given, so that callers can write
 * `return vd_error_set(err, -EINVAL, "bad size '%s'", s);`.
 */
VD_API int vd_error_set(vd_error *err, int code, const char *fmt, ...)
    VD_PRINTF(3, 4);

/** vd_error_set() with ": " and strerror(-@code) appended to the message. */
VD_API int vd_error_set_errno(vd_error *err, int code, const char *fmt, ...)
    VD_PRINTF(3, 4);

/**
 * Prepends the printf-style prefix to the message already in @err, to add
 * context on the way up ("disk.qcow2: " + "L2 table offset ..."). Does
 * nothing when @err is NULL or holds no error. The result is truncated at
 * the end to fit.
 */
VD_API void vd_error_prepend(vd_error *err, const char *fmt, ...)
    VD_PRINTF(2, 3);

/** True when @err is not NULL and holds an error. */
static inline bool vd_error_is_set(const vd_error *err)
{
    return err && err->code != 0;
}

/** Progress callback: @percent from 0 to 100. */
typedef void (*vd_progress_fn)(double percent, void *opaque);

/* ------------------------------------------------------------------ */
/* Options                                                            */
/* ------------------------------------------------------------------ */

/**
 * A set of key=value options, as on qemu-img's command line. Keys may be
 * dotted to reach a child node ("file.locking=off",
 * "backing.file.filename=base.qcow2"). Values are strings; the driver that
 * consumes a key parses it (sizes accept k/M/G/T/P/E suffixes, booleans
 * accept on/off/true/false/yes/no). Keys that no driver consumes make the
 * open or create fail with "... does not support the option 'KEY'".
 *
 * A vd_opts has no lock: use one set from one thread at a time (different
 * sets are independent).
 */
typedef struct vd_opts vd_opts;

/** Allocates an empty option set. Returns NULL only when out of memory. */
VD_API vd_opts *vd_opts_new(void);

/** Frees @*opts and sets it to NULL. Accepts NULL and a NULL pointer. */
VD_API void vd_opts_free(vd_opts **opts);

/**
 * Sets @key to @value, replacing an earlier value. Both are copied.
 * Returns 0 or -ENOMEM / -EINVAL (empty key).
 */
VD_API int vd_opts_set(vd_opts *opts, const char *key, const char *value);

/**
 * Parses "key=value,key2=value2" into @opts (",," is a literal comma in a
 * value). If @implied_key is not NULL, a first element without '=' is
 * taken as the value of @implied_key (qemu's "-o help" style).
 * Returns 0, or -EINVAL with a message for a malformed string.
 */
VD_API int vd_opts_parse(vd_opts *opts, const char *str, const char *implied_key,
                         vd_error *err);

/** Returns the value of @key (borrowed) or NULL when it is not set. */
VD_API const char *vd_opts_get(const vd_opts *opts, const char *key);

/** Number of keys in @opts. */
VD_API size_t vd_opts_count(const vd_opts *opts);

/** The @i-th key and value (borrowed), in insertion order; i < count. */
VD_API void vd_opts_nth(const vd_opts *opts, size_t i, const char **key,
                        const char **value);

/** Returns a deep copy of @opts, or NULL when out of memory. */
VD_API vd_opts *vd_opts_clone(const vd_opts *opts);

/**
 * Parses a size such as "512", "64k", "1.5G", "2T" (suffixes k/K, M, G,
 * T, P, E; binary multiples; "b"/"B" for bytes) into bytes. Rejects
 * negative numbers, junk and values of 2^63 or more. Returns 0 or -EINVAL
 * (malformed) / -ERANGE (too large).
 */
VD_API int vd_parse_size(const char *str, uint64_t *out);

/** vd_parse_size() with the whole 64-bit range allowed (values up to
 * 2^64-1), as qemu parses size options before range-checking them. */
VD_API int vd_parse_size_u64(const char *str, uint64_t *out);

/**
 * Parses a boolean as qemu does: "on", "true", "yes", "1" or "off",
 * "false", "no", "0" (case-sensitive). Returns 0 and sets @*out, or
 * -EINVAL (@*out unchanged).
 */
VD_API int vd_parse_bool(const char *str, bool *out);

/*
 * Taking options. A consumer of an option set (a driver's open, an NBD or
 * QMP front end parsing an --object) *takes* each key it understands, so
 * that whatever is left afterwards is unknown and can be reported by name
 * (vd_opts_first_key()). The typed takers leave @*out = @def and return 0
 * when @key is absent; a malformed value is removed too and gives -EINVAL
 * with qemu's message ("Parameter 'KEY' expects 'on' or 'off'").
 */

/**
 * Removes @key from @opts and returns its value, which the caller owns
 * and releases with free(); NULL when @key is not set (or @opts is NULL).
 */
VD_API char *vd_opts_take(vd_opts *opts, const char *key);

/** Takes @key as a boolean (vd_parse_bool()'s spellings). */
VD_API int vd_opts_take_bool(vd_opts *opts, const char *key, bool def,
                             bool *out, vd_error *err);

/**
 * Takes @key as a size (vd_parse_size()'s grammar, below 2^63). A value
 * of 2^63 or more is refused with qemu's "Value 'V' is out of range for
 * parameter 'KEY'", junk with "Parameter 'KEY' expects a non-negative
 * number below 2^63 (optional suffix: ...)".
 */
VD_API int vd_opts_take_size(vd_opts *opts, const char *key, uint64_t def,
                             uint64_t *out, vd_error *err);

/** Takes @key as a non-negative integer (decimal, 0x hex or 0 octal). */
VD_API int vd_opts_take_uint(vd_opts *opts, const char *key, uint64_t def,
                             uint64_t *out, vd_error *err);

/**
 * Takes @key, whose value must be one of the NULL-terminated @choices;
 * @*out is the index of the match (@def when absent). The error lists
 * the choices.
 */
VD_API int vd_opts_take_enum(vd_opts *opts, const char *key,
                             const char *const *choices, int def, int *out,
                             vd_error *err);

/** Removes @key if it is set. Accepts a NULL @opts. */
VD_API void vd_opts_del(vd_opts *opts, const char *key);

/** The first key left in insertion order (borrowed, valid until @opts
 * changes), or NULL when @opts is empty or NULL. */
VD_API const char *vd_opts_first_key(const vd_opts *opts);

/**
 * Adds the members of the JSON object text @json to @opts as dotted keys,
 * as qemu's json: pseudo-protocol and QMP's blockdev-add flatten their
 * arguments: {"driver": "qcow2", "file": {"filename": "a.qcow2"}} gives
 * driver=qcow2 and file.filename=a.qcow2; booleans become "on"/"off",
 * null becomes "null", numbers their decimal text. vd_open() does this
 * for "json:{...}" filenames. Keys already in @opts are replaced.
 * Returns 0, or -EINVAL for text that is not one JSON object ("Could not
 * parse the JSON options: ...", "Invalid JSON object given"), for arrays
 * ("json: arrays are not supported (option 'KEY')") and for dotted names
 * longer than 511 bytes; -ENOMEM. On failure @opts may hold the members
 * added before the fault. Nesting is limited to 32 levels.
 */
VD_API int vd_opts_from_json(vd_opts *opts, const char *json, vd_error *err);

/* ------------------------------------------------------------------ */
/* Nodes                                                              */
/* ------------------------------------------------------------------ */

typedef struct vd_node vd_node;

/* Flags for vd_open(). */
#define VD_O_RDWR        (1u << 0) /* open read-write (default read-only) */
#define VD_O_NO_BACKING  (1u << 1) /* do not open the backing chain */
#define VD_O_CHECK       (1u << 2) /* open for check/repair: tolerate corruption */
#define VD_O_FORCE_SHARE (1u << 3) /* no image locking (qemu-img -U) */
#define VD_O_NO_IO       (1u << 4) /* metadata only (info on a busy image) */
#define VD_O_QUIET       (1u << 5) /* no warnings on stderr (probing etc.) */
#define VD_O_RESIZE      (1u << 6) /* the opener also takes VD_PERM_RESIZE
                                      (qemu-img resize) */
#define VD_O_NO_USER     (1u << 7) /* attach no opener: the node holds only
                                      what its children need, as a node
                                      made by QMP blockdev-add; add users
                                      with vd_user_new() */
#define VD_O_NO_BITMAPS  (1u << 25) /* leave the persistent dirty bitmaps
                                      on disk as they are: neither loaded
                                      (nor marked in use) nor stored at
                                      close (vd_compact()) */

/**
 * Opens @filename as an image and returns its top node in @*out.
 *
 * @format names the driver ("raw", "qcow2", "file", "null-co", ...);
 * NULL probes the format from the file's first bytes, falling back to raw
 * with a warning (writes to the first 512 bytes are then refused, as
 * qemu-img does, unless they keep the image raw-looking).
 * @filename may be NULL when @opts gives "driver" and the child
 * filenames (blockdev-add style, e.g. driver=qcow2,file.filename=x).
 *
 * Unless VD_O_NO_USER is given, the returned node has an *opener*, a
 * user (see vd_user_new) that holds VD_PERM_CONSISTENT_READ (not with
 * VD_O_NO_IO), VD_PERM_WRITE with VD_O_RDWR and VD_PERM_RESIZE with
 * VD_O_RESIZE, and shares everything, as a QEMU tool's block backend;
 * the formats below it add what they need (a writable qcow2 lets nobody
 * else write its file). The permissions are checked against the other
 * users of the nodes in this process and, through the image locks,
 * against other processes (vdisk or QEMU) before any write; a conflict
 * fails the open. VD_O_FORCE_SHARE (read-only opens only) lets others
 * hold anything.
 *
 * @opts (may be NULL) gives driver options and these generic ones:
 *   read-only=on|off      overrides VD_O_RDWR
 *   cache=none|writeback|unsafe|directsync|writethrough
 *   aio=threads|native|io_uring
 *   node-name=NAME        unique node name (default: generated "#blockN")
 *   driver=NAME           the format driver (like @format)
 *   backing=null|FILENAME the backing file to use instead of the image's
 *   discard=ignore|unmap, detect-zeroes=off|on|unmap
 * @opts is not modified.
 *
 * Errors: -ENOENT (file missing), -EACCES, -EINVAL (unknown driver or
 * option, bad value, backing file given to a driver that cannot hold one),
 * -ENOTSUP (feature not supported), -EIO/-EUCLEAN (corrupt image),
 * -EROFS (read-write open of a read-only file or corrupt image), -EBUSY
 * (image locked by another process), -EPERM (permission conflict with
 * another user in this process), -ENOMEM.
 */
VD_API int vd_open(vd_node **out, const char *filename, const char *format,
                   const vd_opts *opts, unsigned flags, vd_error *err);

/**
 * Flushes and closes the node (and the children it alone holds), then
 * sets @*node to NULL. Accepts NULL. Returns 0 or the first flush error;
 * the node is closed either way.
 */
VD_API int vd_close(vd_node **node, vd_error *err);

/** The node's unique name (borrowed, valid until close). */
VD_API const char *vd_node_name(const vd_node *node);

/** The node's driver name, e.g. "qcow2" (borrowed, static). */
VD_API const char *vd_node_format(const vd_node *node);

/** The filename the node was opened from (borrowed). */
VD_API const char *vd_node_filename(const vd_node *node);

/** True when the node was opened read-only. */
VD_API bool vd_node_is_read_only(const vd_node *node);

/**
 * The node's child in role @role ("file", "backing", "data-file"), or
 * NULL (borrowed). The backing child of a node is its overlay's base.
 */
VD_API vd_node *vd_node_child(const vd_node *node, const char *role);

/* ------------------------------------------------------------------ */
/* Permissions and users                                              */
/* ------------------------------------------------------------------ */

/*
 * Permissions, QEMU's model (docs/permissions.md). Every edge into a
 * node (a parent node's child, or a user) holds some permissions on the
 * node and shares some with the node's other edges. No edge may hold a
 * permission that another edge of the same node does not share. A
 * node's driver turns what its own edges hold into what it needs from
 * its children, so a conflict anywhere below is found when the edge is
 * made. The file driver mirrors a file node's permissions in lock bytes
 * (QEMU's: 100 + bit held, 200 + bit not shared), so other processes,
 * vdisk or QEMU, see and respect them.
 */
#define VD_PERM_CONSISTENT_READ (1u << 0) /* reads see consistent data */
#define VD_PERM_WRITE           (1u << 1) /* may change the content */
#define VD_PERM_WRITE_UNCHANGED (1u << 2) /* may write what is there */
#define VD_PERM_RESIZE          (1u << 3) /* may change the length */
#define VD_PERM_ALL             0xfu

/** A user of a node: holds permissions on it without being a node. */
typedef struct vd_user vd_user;

/**
 * Makes a new user of @node holding @perm and sharing @shared
 * (VD_PERM_*), as QEMU's blk_new_with_bs(). @desc names the user in
 * conflict messages ("block device 'drive0'", "export 'e1'"); NULL gives
 * QEMU's "an unnamed block device". Takes a reference to @node (the
 * node stays open while the user exists).
 * Errors: -EPERM with QEMU's text ("Permission conflict on node 'f':
 * permissions 'write' are both required by ... and unshared by ...",
 * "Block node is read-only") when another edge of @node or of a node
 * below does not allow it; -EBUSY ("Failed to get \"write\" lock", with
 * the hint "Is another process using the image [FILE]?") when another
 * process holds a conflicting lock; -ENOMEM. Nothing changes on failure.
 * Graph-changing calls (open, close, users, reopen) must not race.
 */
VD_API int vd_user_new(vd_user **out, vd_node *node, const char *desc,
                       unsigned perm, unsigned shared, vd_error *err);

/**
 * Changes what @user holds and shares, checking as vd_user_new() does;
 * on failure the old permissions stay. Loosening never fails.
 */
VD_API int vd_user_set_perm(vd_user *user, unsigned perm, unsigned shared,
                            vd_error *err);

/** What @user holds and shares (either pointer may be NULL). */
VD_API void vd_user_get_perm(const vd_user *user, unsigned *perm,
                             unsigned *shared);

/** The node @user uses (borrowed). */
VD_API vd_node *vd_user_node(const vd_user *user);

/**
 * Brackets a request made on behalf of @user (an export serving
 * clients, a device): returns the node to issue it to, which is
 * @user's node unless a block job has pivoted @user to another node
 * (mirror, active commit). A pivot waits for the requests already
 * between begin and end, holds new ones in vd_user_io_begin(), and lets
 * them on to the new node: a program that keeps writing through its
 * user never writes to a node that has been replaced. Any thread; cheap
 * (two atomic operations) when no pivot runs.
 */
VD_API vd_node *vd_user_io_begin(vd_user *user);
VD_API void vd_user_io_end(vd_user *user);

/**
 * Makes what follows one point in time for every user (QEMU's drained
 * section around a QMP transaction): vd_graph_quiesce_begin() closes the
 * gate of every user of every node, so requests arriving in
 * vd_user_io_begin() wait, and returns once no request made through a
 * user is in flight; vd_graph_quiesce_end() opens the gates again.
 * Calls nest. Graph changes that gate users themselves (snapshots,
 * pivots) work inside, and users moved meanwhile stay held. Block jobs'
 * own requests and the opener handle of vd_open() (whose caller issues
 * its requests itself) are not held. Any thread but one that is inside
 * vd_user_io_begin()/end() itself, which would wait for itself; keep the
 * section short, every export waits.
 */
VD_API void vd_graph_quiesce_begin(void);
VD_API void vd_graph_quiesce_end(void);

/** Releases @*user's permissions and its node reference, sets @*user to
 * NULL. Accepts NULL. */
VD_API void vd_user_free(vd_user **user);

/**
 * Changes the permissions of the opener of @node (the user vd_open()
 * attached), as QEMU's blk_set_perm(). -EINVAL when @node has no opener;
 * errors otherwise as vd_user_set_perm().
 */
VD_API int vd_set_perm(vd_node *node, unsigned perm, unsigned shared,
                       vd_error *err);

/** True when some user (vd_user, or the opener) uses @node, as QEMU's
 * bdrv_has_blk(): such a node is in use by an export, a command or the
 * program that opened it. */
VD_API bool vd_node_has_users(const vd_node *node);

/**
 * The cumulative permissions on @node: what its edges hold together
 * (*perm) and what all of them share (*shared). Either may be NULL.
 */
VD_API void vd_node_get_perm(const vd_node *node, unsigned *perm,
                             unsigned *shared);

/*
 * Operation blockers (QEMU's op_blockers), for what permissions do not
 * express: a node used as a backing file cannot be resized or
 * snapshotted on its own, a node an export serves cannot be reverted to
 * a snapshot under its clients. A blocker is an object with a reason;
 * whoever installs it removes it. An operation is blocked while any
 * blocker is installed for it.
 */
typedef enum vd_op {
    VD_OP_BACKUP_SOURCE,
    VD_OP_BACKUP_TARGET,
    VD_OP_CHANGE,
    VD_OP_COMMIT_SOURCE,
    VD_OP_COMMIT_TARGET,
    VD_OP_DRIVE_DEL,
    VD_OP_EXTERNAL_SNAPSHOT,
    VD_OP_INTERNAL_SNAPSHOT,
    VD_OP_INTERNAL_SNAPSHOT_DELETE,
    VD_OP_MIRROR_SOURCE,
    VD_OP_MIRROR_TARGET,
    VD_OP_RESIZE,
    VD_OP_STREAM,
    VD_OP_REPLACE,
    VD_OP_SNAPSHOT_GOTO,     /* reverting to or loading a snapshot */
    VD_OP__MAX
} vd_op;

typedef struct vd_blocker vd_blocker;

/** A new blocker whose reason (printf-style, copied) completes "Node
 * 'NAME' is busy: REASON". NULL when out of memory. */
VD_API vd_blocker *vd_blocker_new(const char *fmt, ...)
    VD_PRINTF(1, 2);

/** Frees @*blocker (it must be installed nowhere), sets it to NULL. */
VD_API void vd_blocker_free(vd_blocker **blocker);

/** Installs / removes @blocker for @op on @node. Installing twice is
 * allowed (removed once). Returns 0 or -ENOMEM. */
VD_API int vd_op_block(vd_node *node, vd_op op, vd_blocker *blocker);
VD_API void vd_op_unblock(vd_node *node, vd_op op, vd_blocker *blocker);

/** Installs / removes @blocker for every operation of @node. */
VD_API int vd_op_block_all(vd_node *node, vd_blocker *blocker);
VD_API void vd_op_unblock_all(vd_node *node, vd_blocker *blocker);

/**
 * True when @op is blocked on @node; @err (may be NULL) then gets
 * -EBUSY and "Node 'NAME' is busy: REASON" of the first blocker.
 */
VD_API bool vd_op_is_blocked(vd_node *node, vd_op op, vd_error *err);

/* ------------------------------------------------------------------ */
/* The node graph                                                     */
/* ------------------------------------------------------------------ */

/*
 * Every open node, whether a top node returned by vd_open() or a child
 * opened with it, is registered under its unique name. The functions
 * below look at that graph; the nodes and strings they return are
 * borrowed. A borrowed node stays valid until its last user closes it:
 * the caller must know that nothing closes it meanwhile (in vdisk serve,
 * every graph change runs under the daemon's one lock). The getters read
 * state that only opening, reopening, vd_rebase()/vd_change_backing_file()
 * and closing change; do not race them with those on the same node.
 */

/** What a child holds for its parent (bits of a child's role; QEMU's
 * BdrvChildRole). */
#define VD_ROLE_DATA     (1u << 0) /* guest data */
#define VD_ROLE_METADATA (1u << 1) /* format metadata */
#define VD_ROLE_FILTERED (1u << 2) /* the parent is a filter over it */
#define VD_ROLE_COW      (1u << 3) /* backing: reads through, copy-on-write */
#define VD_ROLE_PRIMARY  (1u << 4) /* the parent's primary child */

/** The open node named @name (borrowed), or NULL when there is none. */
VD_API vd_node *vd_find_node(const char *name);

/**
 * Calls @fn(node, @opaque) for every open node, in the order they were
 * opened (children before the node opened over them). Runs under the
 * library's graph lock: @fn must not open, close or reopen nodes, and
 * should only collect what it needs (other threads opening or closing
 * nodes wait meanwhile).
 */
VD_API void vd_foreach_node(void (*fn)(vd_node *node, void *opaque),
                            void *opaque);

/**
 * The @i-th child of @node in attach order (borrowed), or NULL when @i is
 * past the last one. When not NULL, @*name receives the child's role
 * name ("file", "backing", "data-file", ...; borrowed) and @*role its
 * VD_ROLE_* bits.
 */
VD_API vd_node *vd_node_nth_child(const vd_node *node, size_t i,
                                  const char **name, unsigned *role);

/** How many parent nodes use @node as a child (0 for a root node). */
VD_API int vd_node_parent_count(const vd_node *node);

/** True when neither a node nor a block job (include/vdisk/job.h) uses
 * @node, only users such as exports or the opener: QEMU's
 * bdrv_is_root_node(), which commands that want a top node ask. */
VD_API bool vd_node_is_root(const vd_node *node);

/* Cache mode bits (qemu's cache.writeback, cache.direct, cache.no-flush;
 * cache=none is WRITEBACK|DIRECT, cache=unsafe WRITEBACK|NO_FLUSH). */
#define VD_CACHE_WRITEBACK (1u << 0) /* completes writes before they are
                                        stable (no implicit flush) */
#define VD_CACHE_DIRECT    (1u << 1) /* O_DIRECT: bypasses the host cache */
#define VD_CACHE_NO_FLUSH  (1u << 2) /* flushes are ignored */

/** The node's cache mode as VD_CACHE_* bits. */
VD_API unsigned vd_node_cache_flags(const vd_node *node);

/** The node's detect-zeroes mode (qemu's BlockdevDetectZeroesOptions). */
typedef enum vd_detect_zeroes {
    VD_DETECT_ZEROES_OFF = 0,
    VD_DETECT_ZEROES_ON,
    VD_DETECT_ZEROES_UNMAP,
} vd_detect_zeroes;

/** The node's detect-zeroes mode. */
VD_API vd_detect_zeroes vd_node_detect_zeroes(const vd_node *node);

/** True when discard requests reach the storage (discard=unmap), false
 * when they are ignored (discard=ignore, the default). */
VD_API bool vd_node_discard_unmap(const vd_node *node);

/** The alignment the node's requests are best made in, in bytes (QEMU's
 * bl.request_alignment: 512 for an image probed as raw, else what its
 * driver needs, usually 1). Requests of any alignment still work: the
 * library does read-modify-write. */
VD_API uint32_t vd_node_request_alignment(const vd_node *node);

/**
 * The backing file name recorded in @node's image header, exactly as
 * stored (maybe relative to the image), or NULL when there is none or
 * the format has no backing files. Borrowed: valid until the node is
 * closed or its backing file is changed.
 */
VD_API const char *vd_node_backing_file(const vd_node *node);

/** The backing format recorded in @node's image header, or NULL when none
 * is recorded (borrowed, as vd_node_backing_file()). */
VD_API const char *vd_node_backing_format(const vd_node *node);

/* ------------------------------------------------------------------ */
/* I/O                                                                */
/* ------------------------------------------------------------------ */

/* Request flags. */
#define VD_REQ_FUA         (1u << 0) /* write through to stable storage */
#define VD_REQ_MAY_UNMAP   (1u << 1) /* write_zeroes may deallocate */
#define VD_REQ_NO_FALLBACK (1u << 2) /* write_zeroes: fail with -ENOTSUP
                                        rather than write a zero buffer */
#define VD_REQ_COMPRESSED  (1u << 3) /* write: store compressed (whole
                                        clusters, formats that can; else
                                        -ENOTSUP) */

/**
 * Reads @len bytes at @offset into @buf. The range must lie inside the
 * node's length (-EIO with a message otherwise, as QEMU answers). Returns 0 or a
 * negative errno. Thread-safe.
 */
VD_API int vd_pread(vd_node *node, void *buf, uint64_t len, uint64_t offset,
                    unsigned flags, vd_error *err);

/** vd_pread() into the @iovcnt buffers of @iov (total length = request). */
VD_API int vd_preadv(vd_node *node, const struct iovec *iov, int iovcnt,
                     uint64_t offset, unsigned flags, vd_error *err);

/**
 * Writes @len bytes from @buf at @offset. The range must lie inside the
 * node's length; the node must be writable (-EROFS). @flags may hold
 * VD_REQ_FUA. Returns 0 or a negative errno. Thread-safe.
 */
VD_API int vd_pwrite(vd_node *node, const void *buf, uint64_t len,
                     uint64_t offset, unsigned flags, vd_error *err);

/** vd_pwrite() from the @iovcnt buffers of @iov. */
VD_API int vd_pwritev(vd_node *node, const struct iovec *iov, int iovcnt,
                      uint64_t offset, unsigned flags, vd_error *err);

/**
 * Makes [@offset, @offset+@len) read as zeros. With VD_REQ_MAY_UNMAP the
 * driver may deallocate the range; with VD_REQ_NO_FALLBACK it fails with
 * -ENOTSUP instead of writing a buffer of zeros.
 */
VD_API int vd_write_zeroes(vd_node *node, uint64_t len, uint64_t offset,
                           unsigned flags, vd_error *err);

/**
 * Tells the node that the range's contents are no longer needed. Reads
 * afterwards return unspecified data (zeros for most drivers). Advisory:
 * a driver that cannot discard returns 0.
 */
VD_API int vd_discard(vd_node *node, uint64_t len, uint64_t offset,
                      vd_error *err);

/** Writes every cache of the node and its children to stable storage. */
VD_API int vd_flush(vd_node *node, vd_error *err);

/**
 * Copies [@src_off, +@len) of @src to @dst_off of @dst with copy
 * offloading (qemu-img convert -C): the request goes down both graphs
 * to the files, which copy with copy_file_range(2), and the formats on
 * the way allocate and map as a write would. Both ranges must lie
 * inside their nodes and @dst must be writable. Returns 0, -ENOTSUP
 * when some node on the way cannot offload (the caller then reads and
 * writes; nothing was written), or another negative errno on failure
 * (part of the range may have been copied). Thread-safe.
 */
VD_API int vd_copy_range(vd_node *src, uint64_t src_off, vd_node *dst,
                         uint64_t dst_off, uint64_t len, vd_error *err);

/* Block status flags (the bits of vd_extent.flags). */
#define VD_BLOCK_DATA         (1u << 0) /* reads come from stored data */
#define VD_BLOCK_ZERO         (1u << 1) /* reads return zeros */
#define VD_BLOCK_OFFSET_VALID (1u << 2) /* offset/file locate the data */
#define VD_BLOCK_ALLOCATED    (1u << 4) /* the node itself (not a backing
                                           image) determines the content */
#define VD_BLOCK_EOF          (1u << 5) /* the extent reaches the end */
#define VD_BLOCK_COMPRESSED   (1u << 6) /* stored compressed */

/** One extent, as returned by vd_block_status(). */
typedef struct vd_extent {
    uint64_t start;     /* guest offset of the extent */
    uint64_t length;    /* bytes with the same status, > 0 */
    unsigned flags;     /* VD_BLOCK_* */
    int depth;          /* the backing-chain layer that decided the
                           status: 0 = @node itself (as qemu-img map) */
    uint64_t offset;    /* host offset in @file when OFFSET_VALID */
    vd_node *file;      /* protocol node holding the data (borrowed) */
} vd_extent;

/**
 * Describes how [@offset, @offset+@len) is stored, looking down the
 * backing chain: fills @ext for the longest prefix with one status
 * (ext->length <= @len). ALLOCATED is set when some layer of the chain
 * holds the extent (depth tells which). Returns 0 or a negative errno.
 */
VD_API int vd_block_status(vd_node *node, uint64_t offset, uint64_t len,
                           vd_extent *ext, vd_error *err);

/** The node's virtual size in bytes, or a negative errno. */
VD_API int64_t vd_getlength(vd_node *node);

/** Preallocation modes for create and truncate. */
typedef enum vd_prealloc {
    VD_PREALLOC_OFF = 0,
    VD_PREALLOC_METADATA,
    VD_PREALLOC_FALLOC,
    VD_PREALLOC_FULL,
} vd_prealloc;

/**
 * Resizes the node to @size bytes. Shrinking needs @allow_shrink (else
 * -EINVAL with qemu-img's hint about --shrink); growing fills with zeros
 * and preallocates as @prealloc says. The node must be writable. Sizes
 * of 2^63 or more fail with -EINVAL ("Image size cannot be negative"),
 * sizes above qemu's maximum length 2^63 - 2^30 with -EIO ("offset(N)
 * exceeds maximum(M)"), as qemu's bdrv_co_truncate() does.
 */
VD_API int vd_truncate(vd_node *node, uint64_t size, bool allow_shrink,
                       vd_prealloc prealloc, vd_error *err);

/**
 * The dry run of vd_truncate() (`vdisk resize --dry-run`): the refusals
 * vd_truncate() and the node's driver make before their first write, and
 * the validations they run (qcow2: a size not a multiple of 512, a v2
 * image with snapshots, preallocation when shrinking, the metadata a
 * shrink frees), with the same errors; nothing is written and @node may
 * be read-only. A driver that cannot tell passes (0). Returns 0 or a
 * negative errno.
 */
VD_API int vd_truncate_plan(vd_node *node, uint64_t size, bool allow_shrink,
                            vd_prealloc prealloc, vd_error *err);

/* ------------------------------------------------------------------ */
/* Debugging: blkdebug breakpoints                                    */
/* ------------------------------------------------------------------ */

/*
 * What qemu-io's break, remove_break, resume and wait_break do (QEMU's
 * bdrv_debug_*()). Each looks for the node that keeps breakpoints (a
 * blkdebug node) from @node down its primary ("file") children, so the
 * node of an image opened as "blkdebug::img.qcow2" or with
 * file.driver=blkdebug finds it. Events are named as in QEMU's
 * BlkdebugEvent ("l2_update", "write_aio", "pwritev", ...;
 * docs/filters.md lists where vdisk raises them).
 *
 * A request that reaches a breakpoint's event waits in its own thread
 * (an asynchronous request of `vdisk io`) until the breakpoint's tag is
 * resumed; the breakpoint is used up by the hit, as in QEMU. Draining
 * the blkdebug node (closing the image, reopening it) resumes every
 * suspended request first, so nothing waits forever. Thread-safe.
 */

/** Sets a breakpoint named @tag on @event. -ENOENT: no such event;
 * -ENOTSUP: no blkdebug node under @node. */
VD_API int vd_debug_breakpoint(vd_node *node, const char *event,
                               const char *tag);

/** Removes the breakpoints named @tag and resumes the requests suspended
 * at them. -ENOENT when no breakpoint named @tag was set (a hit uses its
 * breakpoint up: resuming its request alone still answers -ENOENT, as
 * QEMU 7.2); -ENOTSUP as above. */
VD_API int vd_debug_remove_breakpoint(vd_node *node, const char *tag);

/** Resumes one request suspended at breakpoint @tag. -ENOENT when none
 * is; -ENOTSUP as above. */
VD_API int vd_debug_resume(vd_node *node, const char *tag);

/** Whether a request is suspended at breakpoint @tag now (qemu-io's
 * wait_break polls this); false without a blkdebug node. */
VD_API bool vd_debug_is_suspended(vd_node *node, const char *tag);

/**
 * Installs @fn (NULL: none, the default) to receive QEMU's messages of
 * suspended requests, "blkdebug: Suspended request 'TAG'" when a request
 * stops at a breakpoint and "blkdebug: Resuming request 'TAG'" when it
 * goes on (no newline; qemu-io prints them on stdout). @fn runs in the
 * thread of the request that stops, or of the call that resumes it, with
 * the blkdebug node's lock held: it must not call the vd_debug_*()
 * functions, nor wait for a thread that may be calling them.
 */
VD_API void vd_debug_set_handler(void (*fn)(const char *msg, void *opaque),
                                 void *opaque);

/* ------------------------------------------------------------------ */
/* Creating images                                                    */
/* ------------------------------------------------------------------ */

/**
 * Creates an image file @filename of @format with the creation options in
 * @opts (qemu-img's -o: "size" is required unless a backing file gives
 * it; "preallocation", "backing_file", "cluster_size", ...). Unknown
 * options fail with -EINVAL, and so does a backing file for a format that
 * cannot hold one ("Backing file not supported for file format 'raw'").
 */
VD_API int vd_create(const char *filename, const char *format,
                     const vd_opts *opts, vd_error *err);

/** One creation option of a format, for "-o help". */
typedef struct vd_create_option {
    const char *name;
    const char *type;    /* "size", "bool", "number", "string" */
    const char *help;
    const char *def;     /* QEMU's default value, which qemu-img create's
                            "Formatting ..." line shows for an option not
                            given, or NULL */
} vd_create_option;

/**
 * Returns the creation options of @format (its own followed by its
 * protocol's, in QEMU's order: that of the "Formatting ..." line of
 * qemu-img create), terminated by an entry with name == NULL, or NULL for an
 * unknown format or one vdisk cannot open (see vd_format_check()).
 * Static data.
 */
VD_API const vd_create_option *vd_create_options(const char *format);

/**
 * The creation options of @format for an image at @filename: the format's
 * own followed by those of the protocol @filename names (rbd's
 * cluster_size for "rbd:pool/img", none of the file protocol's), as
 * qemu-img create and convert merge them. @filename NULL (or a @format
 * that is a protocol itself) gives vd_create_options(@format). NULL with
 * @err set, as qemu-img refuses before it formats anything: "Unknown file
 * format 'F'", "Unknown protocol 'P'", "Format driver 'F' does not
 * support image creation", "Protocol driver 'P' does not support image
 * creation" (http, for one). Static data; thread-safe.
 */
VD_API const vd_create_option *vd_create_options_for(const char *format,
                                                     const char *filename,
                                                     vd_error *err);

/**
 * Returns the options vd_amend() takes for @format, in the driver's
 * order, terminated by an entry with name == NULL, or NULL when the
 * format cannot be amended. Static data.
 */
VD_API const vd_create_option *vd_amend_options(const char *format);

/**
 * Checks creation options as qemu-img's QemuOpts parser does before a
 * driver sees them: every name must be one of vd_create_options(@format)
 * ("Invalid parameter 'x'") and every value must read as its type
 * ("Parameter 'x' expects 'on' or 'off'", "... expects a non-negative
 * number below 2^64", "Value 'v' is out of range for parameter 'x'"
 * past 2^64 - 1), in the order given. Returns 0 or -EINVAL.
 */
VD_API int vd_check_create_opts(const char *format, const vd_opts *opts,
                                vd_error *err);

/** vd_check_create_opts() against vd_create_options_for(@format,
 * @filename): the options of the protocol @filename names are valid too.
 * Its errors as well as vd_create_options_for()'s. */
VD_API int vd_check_create_opts_for(const char *format, const char *filename,
                                    const vd_opts *opts, vd_error *err);

/**
 * Whether vdisk can open images of @format. 0: it can. -ENOTSUP: @format
 * is an image format QEMU knows and vdisk recognises when probing but
 * cannot open yet (vmdk, vhdx, vpc, qed, qcow, luks, dmg, cloop,
 * bochs); @err gets "FILENAME: format 'vmdk' is not supported"
 * (@filename may be NULL). vd_open(), vd_create() and vd_measure()
 * refuse such a format, named or probed, with that error. -EINVAL: an
 * unknown name ("Unknown driver 'foo'").
 */
VD_API int vd_format_check(const char *format, const char *filename,
                           vd_error *err);

/** Calls @fn for each driver vdisk can open, in a stable order (formats
 * that vd_format_check() calls unsupported are left out). */
VD_API void vd_list_drivers(void (*fn)(const char *name, void *opaque),
                            void *opaque);

/* What a driver is and can do (vd_driver_features()), so that front ends
 * ask instead of testing driver names. */
#define VD_DRIVER_OPENS      (1u << 0) /* vdisk can open it (see
                                          vd_format_check()) */
#define VD_DRIVER_PROTOCOL   (1u << 1) /* opens a filename itself: file,
                                          null-co, and the filters with a
                                          prefix (blkdebug:, blkverify:) */
#define VD_DRIVER_FORMAT     (1u << 2) /* sits on a file child: raw, qcow2 */
#define VD_DRIVER_FILTER     (1u << 3) /* passes requests to one child */
#define VD_DRIVER_BACKING    (1u << 4) /* may have a backing file */
#define VD_DRIVER_COMPRESSED (1u << 5) /* stores compressed clusters (also
                                          said of probe-only formats that
                                          do in QEMU: vmdk, qcow) */
#define VD_DRIVER_CREATE     (1u << 6) /* creates images (vd_create()) */
#define VD_DRIVER_AMEND      (1u << 7) /* changes creation options of an
                                          existing image (vd_amend()) */
#define VD_DRIVER_QEMU_NAME  (1u << 8) /* QEMU 7.2 has a driver of that
                                          name (host_device, nbd, ...),
                                          whether vdisk has it or not */
#define VD_DRIVER_NO_ZERO_INIT (1u << 9) /* a new image does not read as
                                          zeros (luks: its payload is the
                                          decryption of nothing), so a
                                          copy into one writes zeros too
                                          (QEMU's bdrv_has_zero_init() 0) */
#define VD_DRIVER_NETWORK    (1u << 10) /* a protocol whose storage is
                                          behind a server (nbd, iscsi, rbd,
                                          ssh, http...): each request
                                          waits for a round trip, requests
                                          may complete in any order, and
                                          only requests in flight hide the
                                          wait */
#define VD_DRIVER_BIG_REQUESTS (1u << 11) /* a network protocol whose
                                          server takes large requests
                                          whole (nbd, rbd): fewer, larger
                                          requests (1 MiB) save round
                                          trips; the others ask for a
                                          write's data in bursts (iSCSI:
                                          256 KiB) */
#define VD_DRIVER_FLAT       (1u << 12) /* a format whose guest bytes sit
                                          at fixed places of its file
                                          (raw): writes allocate nothing,
                                          so the order in which they
                                          complete does not shape it */

/** The VD_DRIVER_* bits of the driver named @name (only
 * VD_DRIVER_QEMU_NAME for a QEMU driver vdisk does not have); 0 for an
 * unknown name. Static answers: they do not depend on any image. */
VD_API unsigned vd_driver_features(const char *name);

/** What an image of some format would need on the host (qemu-img
 * measure's BlockMeasureInfo). */
typedef struct vd_measure_result {
    uint64_t required;        /* bytes for the data and metadata to write */
    uint64_t fully_allocated; /* bytes when every cluster is allocated */
    bool has_bitmaps;         /* @bitmaps is meaningful (both the source
                                 and the target format keep bitmaps) */
    uint64_t bitmaps;         /* bytes for the source's persistent bitmaps */
} vd_measure_result;

/**
 * Computes the host size an image of @format would take when created with
 * the creation options @opts (as for vd_create(); "size" gives the
 * virtual size when @src is NULL) and filled with the contents of @src
 * (may be NULL; borrowed, not modified). @opts is not modified.
 * Errors: -EINVAL (unknown format or option, bad value), -ENOTSUP (the
 * format cannot measure: "Block driver 'FMT' does not support size
 * measurement"), -EIO (reading @src failed). Thread-safe as long as no
 * request is writing @src.
 */
VD_API int vd_measure(const char *format, const vd_opts *opts, vd_node *src,
                      vd_measure_result *out, vd_error *err);

/**
 * Changes creation options of the open image @node (qemu-img amend):
 * @opts holds creation option names of the node's format (qcow2:
 * compat, lazy_refcounts, refcount_bits, data_file, data_file_raw,
 * backing_file, backing_fmt). Options whose change the format cannot make
 * fail with -ENOTSUP and a message naming the option; @force allows
 * changes QEMU only does with --force. @progress (may be NULL) is called
 * with the percentage done. The node must be writable and have no request
 * in flight. Returns 0 or a negative errno (-EINVAL for bad values,
 * -ENOTSUP, -EIO).
 */
VD_API int vd_amend(vd_node *node, const vd_opts *opts, bool force,
                    vd_progress_fn progress, void *opaque, vd_error *err);

/** What vd_compact() does. */
typedef struct vd_compact_opts {
    bool dry_run;             /* plan only: report, write nothing */
} vd_compact_opts;

/** What vd_compact() gave back (or would, with dry_run). */
typedef struct vd_compact_result {
    uint64_t original_size;   /* bytes of the image file before */
    uint64_t new_size;        /* bytes after (planned, with dry_run) */
    uint64_t moved_clusters;  /* clusters moved down */
    uint64_t cluster_size;
} vd_compact_result;

/**
 * Compacts the image of @node in place (vdisk compact): clusters in use
 * at the end of the file move down into free ones, every reference to
 * them is rewritten (internal snapshots, persistent bitmaps, the LUKS
 * header included) and the file is truncated. Crash-safe: a process
 * killed at any point leaves an image whose every snapshot reads the
 * same, with at most leaked clusters, which a new call gives back. An
 * image that the format's check finds corrupt is refused before
 * anything is written. @opts may be NULL (no dry run). @progress (may
 * be NULL) gets the percentage done. Fills @res (may not be NULL).
 * The node must have no request in flight and, unless dry_run, be
 * writable and opened with VD_O_NO_BITMAPS when the image has
 * persistent bitmaps. Errors: -ENOTSUP ("Format 'X' does not support
 * compaction"), -EROFS, -EBUSY, -EIO (corrupt image, I/O error).
 */
VD_API int vd_compact(vd_node *node, const vd_compact_opts *opts,
                      vd_progress_fn progress, void *opaque,
                      vd_compact_result *res, vd_error *err);
/** One option an amend would change (vd_amend_plan()): its name, the
 * current and the new value as amend's -o spells them (strings valid
 * during the call). A key slot of an encrypted image is named as
 * `qemu-img info` names it, "encrypt.slots[N].active" (qcow2) or
 * "slots[N].active" (luks), with "true"/"false". */
typedef void (*vd_amend_change_fn)(const char *option, const char *old_value,
                                   const char *new_value, void *opaque);

/**
 * The dry run of vd_amend() (`vdisk amend --dry-run`): the same checks
 * and refusals, in the same order and with the same errors, as far as
 * they do not need the change itself; key-slot changes of an encrypted
 * image are checked with their secrets (trying a password takes its
 * slot's PBKDF time, as in the real amend). Nothing is written and @node
 * may be read-only. @fn (may be NULL) gets each option that would
 * change, only once every check has passed.
 * -ENOTSUP when the format cannot amend or cannot tell.
 */
VD_API int vd_amend_plan(vd_node *node, const vd_opts *opts, bool force,
                         vd_amend_change_fn fn, void *opaque, vd_error *err);

/* ------------------------------------------------------------------ */
/* Information                                                        */
/* ------------------------------------------------------------------ */

/** One internal snapshot, as qemu-img info shows it. */
typedef struct vd_snapshot_info {
    char *id;
    char *name;
    uint64_t vm_state_size;
    uint32_t date_sec;
    uint32_t date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t icount;      /* UINT64_MAX when not recorded */
    uint64_t disk_size;
} vd_snapshot_info;

/** What `vdisk info` reports about one node (qemu-img's ImageInfo). */
typedef struct vd_image_info {
    char *filename;                /* as qemu shows it ("null-co://") */
    char *format;
    uint64_t virtual_size;
    int64_t actual_size;           /* bytes used on the host, -1 unknown */
    uint64_t cluster_size;         /* 0 when the format has none */
    bool encrypted;
    bool has_dirty_flag;           /* dirty_flag is meaningful (where
                                      qemu shows one: qcow2, file, and
                                      raw or a filter over those) */
    bool dirty_flag;
    char *backing_filename;        /* as stored in the image, or NULL */
    char *full_backing_filename;   /* resolved, or NULL */
    char *backing_filename_format; /* or NULL */
    /* JSON object {"type": FORMAT, "data": {...}} with the format-specific
       fields in qemu-img's order and names, or NULL. */
    char *format_specific_json;
    vd_snapshot_info *snapshots;
    size_t nb_snapshots;
    /* Where the format keeps the VM state of a live snapshot, in the
     * guest address space (qemu-io's "vm state offset"); 0 when it has
     * none. Added in 0.1: only the library allocates this struct. */
    uint64_t vm_state_offset;
    /* Writes must be whole compressed clusters (a streamOptimized vmdk;
     * QEMU's needs_compressed_writes): convert writes as with -c. */
    bool needs_compressed_writes;
} vd_image_info;

/** Fills @*out with a newly allocated description of @node. */
VD_API int vd_get_info(vd_node *node, vd_image_info **out, vd_error *err);

/** Frees @*info and sets it to NULL. Accepts NULL. */
VD_API void vd_image_info_free(vd_image_info **info);

/**
 * Formats @info as qemu's ImageInfo JSON object: the members of QAPI's
 * schema under their QAPI names ("filename", "format", "dirty-flag",
 * "actual-size", "virtual-size", "cluster-size", "encrypted",
 * "backing-filename", "full-backing-filename", "backing-filename-format",
 * "snapshots", "format-specific"), added in that order, each optional
 * member only when @info has it. This is the one formatter behind
 * `vdisk info --output=json` and the "image" of QMP's
 * query-named-block-nodes; qemu's own output follows no fixed member
 * order, so compare the parsed values. Returns a new NUL-terminated
 * compact JSON string, which the caller releases with free(), or NULL
 * when out of memory. Thread-safe; @info is not modified.
 */
VD_API char *vd_image_info_to_json(const vd_image_info *info);

/** Per-node I/O statistics (QMP BlockDeviceStats names). */
typedef struct vd_stats {
    uint64_t rd_bytes, wr_bytes, zone_bytes_unused;
    uint64_t rd_operations, wr_operations, flush_operations;
    uint64_t unmap_operations, unmap_bytes;
    uint64_t zero_operations, zero_bytes;
    uint64_t failed_rd_operations, failed_wr_operations;
    uint64_t failed_flush_operations, failed_unmap_operations;
    uint64_t rd_total_time_ns, wr_total_time_ns;
    uint64_t flush_total_time_ns, unmap_total_time_ns;
} vd_stats;

/**
 * Copies the node's statistics into @out. Kept for compatibility: the
 * complete set is vd_get_block_stats(). Here wr_operations and wr_bytes
 * leave out zero writes (counted in zero_operations and zero_bytes).
 */
VD_API void vd_get_stats(vd_node *node, vd_stats *out);

/*
 * Complete I/O accounting, with the semantics of QEMU's BlockAcctStats
 * (what query-blockstats shows as BlockDeviceStats). Every node counts
 * every request that passes through it (io.c), whoever sent it: a
 * format node's file child also counts the format's metadata I/O.
 *
 *  - operations, bytes: requests that succeeded, and their bytes; a zero
 *    write counts as a write (as QEMU's devices account it);
 *  - failed: requests that returned an error;
 *  - invalid: requests refused before any I/O for their range (or that a
 *    front end declared invalid with vd_stats_account_invalid());
 *  - merged: requests a front end merged into others
 *    (vd_stats_account_merged(); the library itself never merges);
 *  - total_time_ns: the summed latency of the successful requests, and
 *    of the failed ones when account_failed is set;
 *  - idle time: since the last request that finished (a failed one only
 *    with account_failed, an invalid one only with account_invalid);
 *  - wr_highest_offset: the end of the highest write or zero write that
 *    reached the node, in its request alignment (QEMU's node-level
 *    figure, counted whatever the outcome);
 *  - timed statistics: for each interval set with vd_stats_setup(), the
 *    minimum, maximum and average latency and the average queue depth
 *    over a window of about that many seconds (QEMU's TimedAverage: two
 *    windows of 4/3 the interval, offset by half of it);
 *  - latency histograms, per type, once set with
 *    vd_latency_histogram_set().
 * Counting costs a few relaxed atomic additions per request; timed
 * statistics and histograms take a per-node lock, only when set.
 */
typedef enum vd_acct_type {
    VD_ACCT_READ,
    VD_ACCT_WRITE,
    VD_ACCT_FLUSH,
    VD_ACCT_UNMAP,
    VD_ACCT_MAX
} vd_acct_type;

/** One interval's figures (QEMU's BlockDeviceTimedStats). */
typedef struct vd_timed_stats {
    unsigned interval_length;                /* seconds */
    uint64_t min_latency_ns[VD_ACCT_MAX];
    uint64_t max_latency_ns[VD_ACCT_MAX];
    uint64_t avg_latency_ns[VD_ACCT_MAX];
    double avg_queue_depth[VD_ACCT_MAX];
} vd_timed_stats;

/** A latency histogram: bins[i] counts latencies in [boundaries[i-1],
 * boundaries[i]) with boundaries[-1] = 0 and boundaries[nbins-1] =
 * infinity (QEMU's BlockLatencyHistogramInfo). nbins == 0: none set. */
typedef struct vd_latency_histogram {
    size_t nbins;
    uint64_t *boundaries;                    /* nbins - 1 of them */
    uint64_t *bins;                          /* nbins of them */
} vd_latency_histogram;

/**
 * A snapshot of a node's accounting, allocated by the library (so later
 * versions may append members) and released with vd_block_stats_free().
 * The arrays are indexed by vd_acct_type.
 */
typedef struct vd_block_stats {
    uint64_t bytes[VD_ACCT_MAX];
    uint64_t operations[VD_ACCT_MAX];
    uint64_t merged[VD_ACCT_MAX];
    uint64_t failed[VD_ACCT_MAX];
    uint64_t invalid[VD_ACCT_MAX];
    uint64_t total_time_ns[VD_ACCT_MAX];
    uint64_t wr_highest_offset;
    bool has_idle_time;                      /* false: no request yet */
    uint64_t idle_time_ns;
    bool account_invalid;
    bool account_failed;
    size_t nb_timed_stats;                   /* in the order configured */
    vd_timed_stats *timed_stats;
    vd_latency_histogram histogram[VD_ACCT_MAX];
} vd_block_stats;

/**
 * Fills @*out with a new snapshot of @node's accounting. Returns 0, or
 * -ENOMEM (@*out NULL). Thread-safe against requests in flight (each
 * counter is read atomically; counters of one request may be seen
 * half-updated).
 */
VD_API int vd_get_block_stats(vd_node *node, vd_block_stats **out);

/** Frees @*stats and sets it to NULL. Accepts NULL. */
VD_API void vd_block_stats_free(vd_block_stats **stats);

/**
 * Configures @node's accounting as QEMU's -drive stats-account-invalid,
 * stats-account-failed and stats-intervals options do. @account_invalid
 * and @account_failed: 1 on, 0 off, -1 unchanged (both start off, as on
 * qemu-storage-daemon's nodes). @intervals: @nb_intervals lengths in
 * seconds, each > 0, each starting a timed statistic (added to those
 * already set; nb_intervals 0 adds none). Returns 0 or -EINVAL with
 * "Invalid interval length: N" (nothing changed).
 */
VD_API int vd_stats_setup(vd_node *node, int account_invalid,
                          int account_failed, const unsigned *intervals,
                          size_t nb_intervals, vd_error *err);

/**
 * Sets (or resets to empty) the latency histogram of @type on @node
 * with @n boundaries in nanoseconds, strictly increasing and above 0,
 * giving n + 1 bins; @n == 0 removes it. Returns 0 or -EINVAL (nothing
 * changed) when the boundaries are not strictly increasing.
 */
VD_API int vd_latency_histogram_set(vd_node *node, vd_acct_type type,
                                    const uint64_t *boundaries, size_t n,
                                    vd_error *err);

/** Counts a request of @type that a front end refused before sending it
 * (QEMU's block_acct_invalid): an NBD request past the export's end. */
VD_API void vd_stats_account_invalid(vd_node *node, vd_acct_type type);

/** Counts @n requests of @type that a front end merged into others
 * (QEMU's block_acct_merge_done). */
VD_API void vd_stats_account_merged(vd_node *node, vd_acct_type type,
                                    uint64_t n);

/** Statistics that only some drivers keep (qemu's BlockStatsSpecific,
 * which query-blockstats shows as "driver-specific"). */
typedef struct vd_driver_stats {
    const char *driver;          /* borrowed: whose numbers these are */
    uint64_t discard_nb_ok;      /* discards that reached the driver and */
    uint64_t discard_nb_failed;  /* succeeded / failed */
    uint64_t discard_bytes_ok;   /* bytes the successful ones covered */
    /* qcow2 (has_cache set, the discard counts then unused): its
     * metadata caches, sized automatically to cover the whole image up
     * to a cap (docs/qcow2.md, "Metadata caches"). A hit is a lookup
     * that found the table cached, a miss a table read from the file. */
    bool has_cache;
    uint64_t l2_cache_bytes;
    uint64_t l2_cache_hits;
    uint64_t l2_cache_misses;
    uint64_t refcount_cache_bytes;
    uint64_t refcount_cache_hits;
    uint64_t refcount_cache_misses;
} vd_driver_stats;

/**
 * Fills @out with the driver-specific statistics of @node. Returns 0, or
 * -ENOTSUP (@out zeroed) when the node's driver keeps none (today every
 * driver but file and qcow2).
 */
VD_API int vd_get_driver_stats(vd_node *node, vd_driver_stats *out);

/* ------------------------------------------------------------------ */
/* Backing chains                                                     */
/* ------------------------------------------------------------------ */


/**
 * Switches @node (and the children holding its data, not its backing
 * chain) between read-only and read-write. Requests must not be in flight
 * from the caller. Returns 0 or a negative errno (-EROFS when the file
 * cannot be opened for writing).
 */
VD_API int vd_reopen(vd_node *node, bool read_write, vd_error *err);

/**
 * Changes @node's open options in place, as QEMU's bdrv_reopen() with the
 * old options kept (qemu-io's reopen): @opts holds only what changes.
 *   read-only=on|off        the mode; going read-only is refused while a
 *                           user still writes ("Read-only block node 'N'
 *                           cannot support read-write users": give up
 *                           the opener's write with vd_set_perm() first);
 *                           going read-write gives the opener write
 *   cache=MODE, cache.direct=, cache.no-flush=
 *                           the cache mode (as vd_open()), on @node and
 *                           the files below it
 *   discard=, detect-zeroes= as vd_open()
 *   driver=, node-name=     must name the current ones
 *   any other key           an option of @node's driver, which is opened
 *                           again with its options updated
 * Options of children (file.*, ...) and options the driver does not take
 * fail with QEMU's "Cannot change the option 'KEY'". Nothing changes when
 * a check fails; a failing driver reopen goes back to the old options.
 * Requests must not be in flight from the caller.
 */
VD_API int vd_reopen_opts(vd_node *node, const vd_opts *opts, vd_error *err);

/**
 * Records @backing (NULL or "" for none) and @backing_fmt (may be NULL)
 * as @node's backing file without touching data (qemu-img rebase -u).
 * The open backing chain is not changed. -ENOTSUP for formats without
 * backing files.
 */
VD_API int vd_change_backing_file(vd_node *node, const char *backing,
                                  const char *backing_fmt, vd_error *err);

/**
 * Deallocates everything in @node so that it reads through to its backing
 * file. -ENOTSUP when the format cannot.
 */
VD_API int vd_make_empty(vd_node *node, vd_error *err);

/**
 * Puts @overlay on top of @node while @node is in use (QEMU's
 * blockdev-snapshot): @node becomes @overlay's backing node, and every
 * user and parent of @node moves to @overlay (not the opener of
 * vd_open(), whose caller holds the node itself). The users' requests
 * are held at their gates meanwhile (vd_user_io_begin()): what they
 * wrote before is flushed into @node, what they write next goes to
 * @overlay; none is lost or lands in the wrong layer. @overlay's header
 * is not changed (create it with @node's file as backing file).
 * Errors (QEMU's texts): "The overlay is already in use", "The overlay
 * already has a backing image", "The overlay does not support backing
 * images", busy nodes, permission conflicts. Graph changes must not race
 * (see include/vdisk/job.h, vd_graph_lock()).
 */
VD_API int vd_snapshot_append(vd_node *node, vd_node *overlay,
                              vd_error *err);

/** Makes @backing (NULL: none) @node's backing node in the open graph
 * only, the header untouched (QEMU's bdrv_set_backing_hd()). -ENOTSUP for
 * drivers without backing files, -EINVAL for a cycle; permission errors
 * as vd_user_new(). */
VD_API int vd_node_set_backing(vd_node *node, vd_node *backing,
                               vd_error *err);

/** Undoes vd_snapshot_append() (a transaction that failed later): every
 * user and parent of @overlay moves back to its backing node, with the
 * same gates, and @overlay loses its backing node. Writes made to
 * @overlay meanwhile stay in @overlay. */
VD_API int vd_snapshot_unappend(vd_node *overlay, vd_error *err);

/* Flags for vd_commit(). */
#define VD_COMMIT_KEEP_TOP (1u << 0) /* -d: do not empty the top image */

/**
 * Writes the data of @top and of every layer above @base into @base
 * (qemu-img commit). @base NULL means @top's immediate backing file; it
 * must be in @top's chain. @base is reopened read-write for the duration
 * and grown if it is smaller than @top. Afterwards @top is emptied unless
 * VD_COMMIT_KEEP_TOP is given or @base is not the immediate backing file
 * (the layers in between no longer read correctly then, as in QEMU).
 * @rate_limit in bytes per second (0: none). The visible content of @top
 * does not change.
 */
VD_API int vd_commit(vd_node *top, vd_node *base, unsigned flags,
                     uint64_t rate_limit, vd_progress_fn progress,
                     void *opaque, vd_error *err);

/* Flags for vd_rebase(). */
#define VD_REBASE_UNSAFE (1u << 0) /* -u: only rewrite the header */

/**
 * Changes @top's backing file to @backing (relative names are relative to
 * @top's directory; "" or NULL: no backing file) of format @backing_fmt
 * (NULL: probe). In safe mode every range that @top does not hold itself
 * and that reads differently through the new backing file than through
 * the old chain is first copied into @top, so the visible content does
 * not change. @backing_opts (may be NULL) are options for opening the new
 * backing file (e.g. cache). @top must be writable.
 */
VD_API int vd_rebase(vd_node *top, const char *backing,
                     const char *backing_fmt, const vd_opts *backing_opts,
                     unsigned flags, vd_progress_fn progress, void *opaque,
                     vd_error *err);

/*
 * Dry runs (`--dry-run` of commit and rebase, docs/snapshots.md "Dry
 * runs"): what vd_commit() and vd_rebase() would write, computed by the
 * same code, nothing written. @top may be read-only; every refusal the
 * real operation makes before its first write is made here too (a base
 * outside the chain, a format that cannot change its backing file, a new
 * backing file that cannot be opened). @fn (may be NULL) is called with
 * each range, in ascending order, that the real run would write (commit:
 * into @base; rebase: into @top); @progress as for the real calls.
 * Returns 0 or a negative errno. Thread-safety as vd_commit().
 */
typedef void (*vd_range_fn)(uint64_t offset, uint64_t length, void *opaque);

VD_API int vd_commit_plan(vd_node *top, vd_node *base, vd_range_fn fn,
                          void *opaque, vd_progress_fn progress,
                          void *popaque, vd_error *err);

/* vd_rebase_plan() with VD_REBASE_UNSAFE makes the refusals only (an
 * unsafe rebase writes no data). */
VD_API int vd_rebase_plan(vd_node *top, const char *backing,
                          const char *backing_fmt,
                          const vd_opts *backing_opts, unsigned flags,
                          vd_range_fn fn, void *opaque,
                          vd_progress_fn progress, void *popaque,
                          vd_error *err);

/* ------------------------------------------------------------------ */
/* Consistency check                                                  */
/* ------------------------------------------------------------------ */

#define VD_CHECK_FIX_LEAKS  1u  /* repair leaked clusters */
#define VD_CHECK_FIX_ERRORS 2u  /* repair refcount errors too */

/** Result of a check (qemu-img check's ImageCheck). */
typedef struct vd_check_result {
    int64_t corruptions, leaks, check_errors;
    int64_t corruptions_fixed, leaks_fixed;
    int64_t image_end_offset;      /* -1 when unknown */
    int64_t allocated_clusters, total_clusters;
    int64_t fragmented_clusters, compressed_clusters;
} vd_check_result;

/**
 * Checks the image behind @node (opened with VD_O_CHECK, and VD_O_RDWR
 * when @fix is not 0) and fills @res. Returns 0 when the check ran (look
 * at @res for what it found), -ENOTSUP when the format has no check, or
 * another negative errno when the check could not run.
 */
VD_API int vd_check(vd_node *node, vd_check_result *res, unsigned fix,
                    vd_error *err);

/* ------------------------------------------------------------------ */
/* Space accounting (vdisk du; docs/snapshots.md, Space per snapshot)  */
/* ------------------------------------------------------------------ */

/** What a row of a space report accounts for. */
typedef enum vd_du_kind {
    VD_DU_IMAGE,        /* the whole image (formats without accounting) */
    VD_DU_ACTIVE,       /* the current state: its L1/L2 tables and data */
    VD_DU_SNAPSHOT,     /* an internal snapshot: its L1/L2 tables, data */
    VD_DU_BITMAP,       /* a persistent dirty bitmap: table, bits and its
                           directory entry's bytes */
    VD_DU_METADATA,     /* header, extensions, refcount table and blocks,
                           snapshot table, bitmap directory (but for the
                           entries), LUKS header */
    VD_DU_LEAKED,       /* clusters with a refcount nothing references */
} vd_du_kind;

/** One row of a space report. Bytes are host bytes of the image file,
 * whole clusters (a compressed cluster's row counts every host cluster
 * its bytes touch), but for a bitmap's directory entry. */
typedef struct vd_du_row {
    vd_du_kind kind;
    char *id;                 /* snapshot id, or NULL */
    char *name;               /* snapshot or bitmap name, or NULL */
    uint64_t provisioned;     /* guest bytes it describes (the snapshot's
                                 or image's virtual size; a bitmap's
                                 covered size); 0 for metadata, leaks */
    uint64_t used;            /* bytes it references */
    uint64_t exclusive;       /* of those, referenced by no other row:
                                 what deleting it would give back */
    uint64_t shared;          /* used - exclusive */
    uint64_t tables;          /* of used: its own tables (L1/L2, bitmap
                                 table, directory entry) */
    uint64_t mapped;          /* guest bytes it maps to host storage:
                                 whole guest clusters (for the active
                                 layer qemu-img check's allocated-clusters
                                 times the cluster size); an IMAGE row:
                                 the bytes block status finds allocated;
                                 0 for bitmaps, metadata, leaks */
} vd_du_row;

/** A space report (vd_du()), allocated by the library (later versions
 * may append members), released with vd_du_result_free(). */
typedef struct vd_du_result {
    char *filename;           /* the image's file */
    char *format;             /* its driver */
    uint64_t virtual_size;
    uint64_t cluster_size;    /* the accounting's unit; 0 for formats
                                 without accounting (bytes) */
    /* Bytes in use: every row's exclusive bytes plus the shared ones
     * counted once; for qcow2, the clusters the metadata references
     * (refcounts rebuilt from the tables, as qemu-img check does) times
     * the cluster size, leaks left out. */
    uint64_t allocated;
    uint64_t shared;          /* bytes referenced by more than one row,
                                 each counted once */
    uint64_t leaked;          /* bytes with a refcount and no reference */
    uint64_t unused;          /* bytes of whole clusters inside the file
                                 that nothing references and no refcount
                                 claims (space freed inside the file) */
    uint64_t file_length;     /* the file's length */
    int64_t disk_usage;       /* the file's st_blocks * 512 (qemu-img
                                 info's actual-size), -1 unknown */
    size_t nb_rows;
    vd_du_row *rows;          /* active, snapshots in table order,
                                 bitmaps, metadata, leaked (when any) */
} vd_du_result;

/**
 * Accounts for the space @node's image takes in its file: per internal
 * snapshot, for the current state, per persistent bitmap and for the
 * metadata, split into exclusive and shared bytes (`vdisk du`). Computed
 * from the metadata alone (L1/L2 tables, refcount blocks, bitmap
 * tables), never from guest data. A format without its own accounting
 * gets one VD_DU_IMAGE row whose used bytes are the file's allocation
 * (st_blocks) and whose mapped bytes are the extents block status
 * finds allocated. Only @node is accounted, not its backing
 * chain (call it on each layer). Fills @*out with a new report (free it
 * with vd_du_result_free()). Returns 0, -ENOMEM, or -EIO / -EINVAL with
 * a message naming the file and the fault when the metadata is damaged
 * (a table outside the file, misaligned, or a refcount block that cannot
 * be read). Reads only; holds the format's lock while it walks the
 * tables (requests to the node wait). Thread-safe.
 */
VD_API int vd_du(vd_node *node, vd_du_result **out, vd_error *err);

/** Frees @*res and sets it to NULL. Accepts NULL. */
VD_API void vd_du_result_free(vd_du_result **res);

/* ------------------------------------------------------------------ */
/* Internal snapshots                                                 */
/* ------------------------------------------------------------------ */

/*
 * Snapshot operations follow QEMU's block/snapshot semantics. A node whose
 * driver cannot snapshot falls back to its primary child when that child
 * is its only child holding data, metadata or filtered data (so raw over
 * a qcow2 file, or a filter, passes snapshots down; qcow2 with an
 * external data file does not).
 */

/**
 * Lists the snapshots of @node into a new array @*list of @*count entries
 * (free with vd_snapshot_list_free). -ENOTSUP when the format has none.
 */
VD_API int vd_snapshot_list(vd_node *node, vd_snapshot_info **list,
                            size_t *count, vd_error *err);

/** Frees a list from vd_snapshot_list() and sets @*list to NULL. */
VD_API void vd_snapshot_list_free(vd_snapshot_info **list, size_t count);

/**
 * Finds a snapshot: with @id and @name, the first having both; with only
 * @id, the first with that id; with only @name, the first with that name.
 * Passing neither is a programming error (returns -EINVAL). Returns 1 and
 * fills @out (if not NULL; free its strings with vd_snapshot_info_clear)
 * when found, 0 when not found (no error set), or a negative errno when
 * the list could not be read.
 */
VD_API int vd_snapshot_find(vd_node *node, const char *id, const char *name,
                            vd_snapshot_info *out, vd_error *err);

/** Frees the strings of one snapshot description and zeroes it. */
VD_API void vd_snapshot_info_clear(vd_snapshot_info *sn);

/** True when a snapshot can be created on @node (writable, supported
 * by its driver or by its fallback child). */
VD_API bool vd_snapshot_can(vd_node *node);

/**
 * Creates a snapshot described by @sn: @sn->name is required, @sn->id may
 * be NULL or "" (the driver picks the next free id, as QEMU does), date
 * and clocks are stored as given (vd_snapshot_create_simple fills the
 * current time). The node must be writable.
 */
VD_API int vd_snapshot_create(vd_node *node, const vd_snapshot_info *sn,
                              vd_error *err);

/** Creates snapshot @name stamped with the current time, no VM state. */
VD_API int vd_snapshot_create_simple(vd_node *node, const char *name,
                                     vd_error *err);

/**
 * Reverts @node to snapshot @id_or_name (qemu-img snapshot -a). Refused
 * with -EBUSY while the node has active dirty bitmaps.
 */
VD_API int vd_snapshot_goto(vd_node *node, const char *id_or_name,
                            vd_error *err);

/**
 * Deletes the snapshot matching @id and/or @name (at least one given,
 * else -EINVAL). -ENOENT when none matches; -ENOTSUP when the format
 * cannot delete snapshots. In-flight requests are drained first.
 */
VD_API int vd_snapshot_delete(vd_node *node, const char *id,
                              const char *name, vd_error *err);

/** What deleting or applying an internal snapshot would change
 * (vd_snapshot_delete_plan(), vd_snapshot_goto_plan()). */
typedef struct vd_snapshot_plan {
    uint64_t freed;     /* host bytes whose refcount would drop to 0
                           (clusters given back to the image) */
    uint64_t changed;   /* goto: guest bytes of the active layer whose
                           mapping differs from the snapshot's (what
                           applying discards or changes); delete: 0 */
    uint64_t old_size;  /* goto: virtual size now and after (the */
    uint64_t new_size;  /* snapshot's); delete: both the current size */
} vd_snapshot_plan;

/**
 * What vd_snapshot_delete(@node, @id, @name) and vd_snapshot_goto(@node,
 * @id_or_name) would change, computed from metadata only (qcow2: the L1
 * and L2 tables and refcounts; no guest data is read); nothing is
 * written, and @node may be read-only. The snapshot is looked up as the
 * real call looks it up; the structures the real call validates before
 * its first write are validated here, with the same errors. Returns 0
 * and fills @out; -ENOENT when no snapshot matches; -ENOTSUP when the
 * format cannot compute it (it may still delete/apply snapshots).
 */
VD_API int vd_snapshot_delete_plan(vd_node *node, const char *id,
                                   const char *name, vd_snapshot_plan *out,
                                   vd_error *err);
VD_API int vd_snapshot_goto_plan(vd_node *node, const char *id_or_name,
                                 vd_snapshot_plan *out, vd_error *err);

/**
 * Makes the read-only @node show the snapshot's content instead of the
 * current state (qemu-img convert -l / qemu-io -l). The node must have
 * been opened read-only ("Device is not readonly").
 */
VD_API int vd_snapshot_load_tmp(vd_node *node, const char *id,
                                const char *name, vd_error *err);

/** vd_snapshot_load_tmp() by id first, then by name. */
VD_API int vd_snapshot_load_tmp_by_id_or_name(vd_node *node,
                                              const char *id_or_name,
                                              vd_error *err);

/*
 * Group operations over several nodes at once (one VM's disks). @devices
 * is a NULL-terminated list of node names, or NULL for every open node
 * that is a root of the graph, skipping read-only and empty ones.
 * An explicit empty list fails ("At least one device is required for
 * snapshot"). Errors name the snapshot and the node.
 */

/** 0 when every selected node can snapshot, else -ENOTSUP with the
 * first node that cannot. */
VD_API int vd_snapshot_all_can(const char *const *devices, vd_error *err);

/**
 * Creates snapshot @sn on every selected node; the VM-state size
 * @vm_state_size is recorded on @vmstate_node only (0 on the others).
 */
VD_API int vd_snapshot_all_create(const char *const *devices,
                                  const vd_snapshot_info *sn,
                                  vd_node *vmstate_node,
                                  uint64_t vm_state_size, vd_error *err);

/** Reverts every selected node to snapshot @name. */
VD_API int vd_snapshot_all_goto(const char *const *devices, const char *name,
                                vd_error *err);

/** Deletes snapshot @name from every selected node that has it. */
VD_API int vd_snapshot_all_delete(const char *const *devices,
                                  const char *name, vd_error *err);

/** 1 when every selected node has snapshot @name, 0 when one lacks it,
 * negative errno on error. */
VD_API int vd_snapshot_all_has(const char *const *devices, const char *name,
                               vd_error *err);

/**
 * Chooses the node that will hold the VM state: the node named
 * @vmstate_name (which must exist among the selected nodes and support
 * snapshots), or else the first selected node that can snapshot.
 * Returns 0 and sets @*out (borrowed), or a negative errno.
 */
VD_API int vd_snapshot_all_find_vmstate(const char *const *devices,
                                        const char *vmstate_name,
                                        vd_node **out, vd_error *err);

/**
 * Saves / loads @len bytes of VM state at @pos in @node's VM-state area
 * (formats that have one, e.g. qcow2). -ENOTSUP otherwise.
 */
VD_API int vd_save_vmstate(vd_node *node, const void *buf, uint64_t len,
                           uint64_t pos, vd_error *err);
VD_API int vd_load_vmstate(vd_node *node, void *buf, uint64_t len,
                           uint64_t pos, vd_error *err);

/* ------------------------------------------------------------------ */
/* Objects                                                            */
/* ------------------------------------------------------------------ */

/*
 * QEMU's user-creatable objects (--object TYPE,id=ID,..., QMP
 * object-add): a process-wide registry of named objects that other
 * parts refer to by id. vdisk has these classes, with QEMU 7.2's
 * properties and messages (docs/objects.md):
 *
 *   secret           data= or file=, format=raw|base64, keyid= and iv=
 *                    for an AES-256-CBC-encrypted secret
 *   throttle-group   limits.* (QEMU's ThrottleLimits) and x-* aliases
 *   authz-simple     identity=
 *   authz-list       policy=deny|allow, rules.N.match/policy/format
 *   tls-creds-x509   TLS credentials for the NBD server
 *   tls-creds-psk    (include/vdisk/nbd-server.h)
 *
 * The other types QEMU knows are refused by name ("object type 'X' is
 * not supported by vdisk"); names QEMU does not know are refused with
 * QEMU's "Parameter 'qom-type' does not accept value 'X'".
 *
 * Object ids follow QEMU's rule (a letter, then letters, digits, '-',
 * '.', '_') and are unique in the process. An object is complete once
 * added: a secret has read and decoded its data, credentials have been
 * loaded. Threads: every function here may be called from any thread; a
 * lock guards the registry. Values handed out are copies.
 */

/**
 * Adds an object of class @type named @id with the properties @props
 * (may be NULL): key=value strings as on QEMU's command line, dotted
 * keys for nested members ("limits.bps-total=1000", "rules.0.match=bob")
 * and numbers for list indices. @type or @id NULL: taken from @props'
 * "qom-type" or "id" key, as QMP's object-add carries them. Values are
 * checked against the class's types with QEMU's messages ("Parameter
 * 'x-bps-total' expects integer", "Parameter 'bogus' is unexpected"),
 * then the object is completed. Nothing is added on error. Returns 0, or -EINVAL (bad
 * value, unknown type or property, malformed id: "Parameter 'id'
 * expects an identifier" with a hint), -EEXIST ("attempt to add
 * duplicate property 'ID' to object (type 'container')"), -ENOTSUP (a
 * type vdisk does not have), or the class's error (-ENOENT/-EACCES for a
 * secret's file, ...). @props is not modified.
 */
VD_API int vd_object_add(const char *type, const char *id,
                         const vd_opts *props, vd_error *err);

/**
 * vd_object_add() from one JSON object holding "qom-type", "id" and the
 * properties with their JSON types (QMP object-add's arguments).
 */
VD_API int vd_object_add_json(const char *json, vd_error *err);

/**
 * vd_object_add() from one --object argument: "TYPE,id=ID,key=value,..."
 * (",," is a comma inside a value) or a JSON object "{...}". An argument
 * that asks for help ("help", "?", "TYPE,help", "TYPE,id=x,?") adds
 * nothing: *@help receives the listing QEMU prints (the classes, or the
 * class's settable properties "  name=<type>"), which the caller prints
 * and releases with free(). Otherwise *@help is set to NULL. @help may be
 * NULL, and a help request is then refused with -EINVAL.
 */
VD_API int vd_object_add_cli(const char *arg, char **help, vd_error *err);

/**
 * The listing `--object TYPE,help` prints for @type, or the list of
 * classes ("List of user creatable objects:") when @type is NULL or not
 * a class of vdisk. The caller releases it with free(); NULL when out of
 * memory.
 */
VD_API char *vd_object_help(const char *type);

/**
 * Removes object @id. Users that hold what it made (a running NBD server
 * its TLS credentials) keep it; a throttle group that a node uses is
 * refused ("object 'ID' is in use, can not be deleted", -EBUSY).
 * -ENOENT: "object 'ID' not found".
 */
VD_API int vd_object_del(const char *id, vd_error *err);

/** Removes every object (at program end); objects in use stay. */
VD_API void vd_object_del_all(void);

/** The class name of object @id as a new string (free()), or NULL when
 * there is no such object (or out of memory). */
VD_API char *vd_object_type(const char *id);

/**
 * Calls @fn for every object, oldest first, with its id and class name
 * (borrowed for the call), on a snapshot taken under the lock (@fn may
 * call the functions here). Stops at the first non-zero return of @fn
 * and returns it; 0 otherwise, -ENOMEM.
 */
VD_API int vd_object_foreach(int (*fn)(const char *id, const char *type,
                                       void *opaque),
                             void *opaque);

/**
 * Calls @fn for each property of object @id as qom-list shows it: "type"
 * ("string") first, then the class's properties with their QOM type
 * names ("string", "bool", "int", "QCryptoSecretFormat",
 * "ThrottleLimits", ...). Returns what vd_object_foreach() does, or
 * -ENOENT ("Device 'ID' not found" is the caller's QMP wording).
 */
VD_API int vd_object_foreach_property(const char *id,
                                      int (*fn)(const char *name,
                                                const char *type,
                                                void *opaque),
                                      void *opaque, vd_error *err);

/**
 * The value of property @name of object @id as JSON text (qom-get):
 * "\"raw\"", "true", "1000", {...}, [...]. The caller frees it. NULL with
 * -ENOENT "Property 'CLASS.NAME' not found" in @err, or no object.
 */
VD_API char *vd_object_get_property(const char *id, const char *name,
                                    vd_error *err);

/**
 * Sets property @name of object @id to the JSON text @json (qom-set),
 * with QEMU's checks and messages ("Property 'secret.loaded' is not
 * writable", "Property cannot be set after initialization"). Setting a
 * property never redoes the object's work: a secret keeps the data it
 * read, credentials stay loaded, as in QEMU. Returns 0 or a negative
 * errno; nothing changes on error.
 */
VD_API int vd_object_set_property(const char *id, const char *name,
                                  const char *json, vd_error *err);

/**
 * The data of secret @id (QEMU's qcrypto_secret_lookup()): after
 * decryption and base64 decoding, @*len bytes in a new buffer that also
 * has a NUL byte after them; release it with free() (wiping it first is
 * the caller's choice). Errors are QEMU's: "No secret with id 'ID'"
 * (-ENOENT), "Object with id 'ID' is not a secret" (-EINVAL).
 */
VD_API int vd_secret_get(const char *id, unsigned char **data, size_t *len,
                         vd_error *err);

/** vd_secret_get() as a NUL-terminated string that must be valid UTF-8
 * ("Data from secret ID is not valid UTF-8", -EINVAL), as QEMU's
 * password-secret options read it. Returns NULL on error. */
VD_API char *vd_secret_get_utf8(const char *id, vd_error *err);

/* The buckets of a throttle group, QEMU's order (BucketType). */
enum {
    VD_THROTTLE_BPS_TOTAL,
    VD_THROTTLE_BPS_READ,
    VD_THROTTLE_BPS_WRITE,
    VD_THROTTLE_OPS_TOTAL,
    VD_THROTTLE_OPS_READ,
    VD_THROTTLE_OPS_WRITE,
    VD_THROTTLE_BUCKETS
};

/** A throttle group's limits, as QEMU's ThrottleConfig holds them. */
typedef struct vd_throttle_limits {
    struct {
        uint64_t avg;           /* units (bytes or operations) per second,
                                   0 = unlimited */
        uint64_t max;           /* burst rate, 0 = none */
        uint32_t burst_length;  /* seconds the burst may last (>= 1) */
    } bucket[VD_THROTTLE_BUCKETS];
    uint64_t op_size;           /* iops-size: bytes counted as one
                                   operation, 0 = every request is one */
} vd_throttle_limits;

/**
 * Copies the limits of throttle group @id into @out; they satisfy QEMU's
 * rules (checked when the group was made or its limits set). -ENOENT
 * "Throttle group 'ID' does not exist", -EINVAL when the object is not
 * a throttle group. A node that enforces the limits holds the group so
 * that object-del refuses it meanwhile (src/core/object.h).
 */
VD_API int vd_throttle_group_get_limits(const char *id,
                                        vd_throttle_limits *out,
                                        vd_error *err);

/**
 * Replaces the limits of throttle group @id by @l at run time, as QEMU's
 * block_set_io_throttle does for a group (throttle_group_config()): the
 * limits are checked with QEMU's rules and messages (nothing changes on
 * error), the buckets start empty, and requests waiting in the group's
 * nodes are looked at again under the new limits at once. (Setting the
 * "limits" property with vd_object_set_property(), QEMU's qom-set, keeps
 * the buckets' levels and lets waiting requests finish their waits, as
 * in QEMU.) Errors as vd_throttle_group_get_limits(). Thread-safe.
 */
VD_API int vd_throttle_group_set_limits(const char *id,
                                        const vd_throttle_limits *l,
                                        vd_error *err);

/**
 * Asks authorization object @id (authz-simple or authz-list) whether
 * @identity (an X.509 distinguished name, a PSK username) is allowed, as
 * QEMU's qauthz_is_allowed(). Returns 1 allowed, 0 denied, or a negative
 * errno with QEMU's messages: -ENOENT "Cannot find QAuthZ object ID ID",
 * -EINVAL "Object 'ID' is not a QAuthZ subclass".
 */
VD_API int vd_authz_is_allowed(const char *id, const char *identity,
                               vd_error *err);

/* ------------------------------------------------------------------ */
/* Warnings                                                           */
/* ------------------------------------------------------------------ */

/**
 * Sets the function that receives warnings (e.g. "image format was not
 * specified ... probing guessed raw"). The default prints
 * "WARNING: MESSAGE" to stderr. NULL restores the default. Not thread-safe
 * against concurrent warnings: set it once at start-up.
 */
VD_API void vd_set_warning_handler(void (*fn)(const char *msg, void *opaque),
                                   void *opaque);

#ifdef __cplusplus
}
#endif

#endif /* VDISK_VDISK_H */
