/*
 * The internal block layer: the driver vtable, the node structure and the
 * functions drivers call on their children.
 *
 * Layering. A node is a driver instance. Format drivers (raw, qcow2) and
 * filters sit on a child node in role "file"; protocol drivers (file,
 * null-co) open a filename directly. Every request goes through one
 * function per operation (vd_node_preadv() and friends in io.c): it
 * checks the range, handles the node's alignment with read-modify-write,
 * splits at max_transfer, counts statistics and supplies a fallback where
 * the driver has no callback. Drivers never call each other's callbacks
 * directly; they call vd_child_*() which re-enter that choke point.
 *
 * Threads: see docs/concurrency.md. Callbacks may run concurrently from
 * many threads on the same node; a driver protects its own state. open,
 * close, truncate and snapshot callbacks run with the node drained (no
 * request in flight).
 */
#ifndef VDISK_CORE_BLOCK_INT_H
#define VDISK_CORE_BLOCK_INT_H

#include "internal.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "vdisk/vdisk.h"
#include "error.h"
#include "iov.h"
#include "opts.h"

/* Internal block status bit: the extent is stored unchanged at
 * (*map, *file): ask the file node for the real status. */
#define VD_BLOCK_RAW (1u << 3)
/* Internal block status bit: the data at (*map, *file) may be a hole in
 * the file; ask it whether the extent reads as zeros (QEMU's RECURSE,
 * set by qcow2 for images preallocated with metadata). */
#define VD_BLOCK_RECURSE (1u << 7)

/* Internal request flag, beside the public VD_REQ_*: a read that
 * populates the node it reaches (the first with a backing chain) from
 * that chain, as QEMU's BDRV_REQ_COPY_ON_READ (the copy-on-read
 * filter). Drivers pass it on to their children with the other flags;
 * the core takes it off before calling a driver that reads data. */
#define VD_REQ_COPY_ON_READ (1u << 16)

/* Largest request the core passes in one piece to a driver that sets no
 * max_transfer (keeps bounce buffers bounded). */
#define VD_MAX_REQUEST (1u << 30)
/* Largest image length, qemu's BDRV_MAX_LENGTH: INT64_MAX rounded down
 * to the largest alignment (1 GiB), so that aligning an offset up never
 * overflows. Larger sizes are refused on resize and create. */
#define VD_MAX_LENGTH ((uint64_t)INT64_MAX & ~(((uint64_t)1 << 30) - 1))

typedef struct vd_driver vd_driver;
typedef struct vd_dlib vd_dlib;
typedef struct vd_child vd_child;
typedef struct vd_dirty_tracker vd_dirty_tracker;
typedef struct vd_node_bitmaps vd_node_bitmaps;

/* One persistent dirty bitmap as a driver stores it (bitmaps_load /
 * bitmaps_store of struct vd_driver): bit i covers bytes
 * [i * granularity, (i + 1) * granularity) of the node, bit i is bit
 * (i % 8) of byte i / 8 (the on-disk order of ../shared/specs/
 * bitmaps.rst); nbits = ceil(disk_size / granularity). */
typedef struct vd_bitmap_image {
    char *name;
    uint64_t granularity;       /* a power of two, 512 .. 2 GiB */
    bool enabled;               /* recording (QEMU's BME_FLAG_AUTO) */
    bool in_use;                /* inconsistent: bits not usable */
    uint64_t disk_size;         /* bytes the bits cover */
    uint8_t *bits;              /* ceil(nbits / 8) bytes; NULL if in_use */
} vd_bitmap_image;
void vd_bitmap_images_free(vd_bitmap_image *list, size_t count);

/*
 * A node's accounting, QEMU's BlockAcctStats (stats.c; the public view
 * is vd_block_stats). The counters are updated with relaxed atomics on
 * the request path; @extras is non-zero while timed statistics or a
 * histogram exist, and only then does a finished request take the
 * node's stats_lock to feed them.
 */
typedef struct vd_timed_window {
    uint64_t min, max, sum, count;
    int64_t expiration;
} vd_timed_window;

typedef struct vd_timed_avg {
    vd_timed_window w[2];
    uint64_t period;                /* ns: 4/3 of the interval */
    int current;                    /* the older window */
} vd_timed_avg;

typedef struct vd_acct_interval {
    unsigned length;                /* seconds */
    vd_timed_avg lat[VD_ACCT_MAX];
    struct vd_acct_interval *next;  /* newest first, as QEMU's list */
} vd_acct_interval;

/* One type's counters, one cache line: a request touches only its own
 * line, and threads doing different operations do not share one. */
typedef struct vd_acct_counters {
    uint64_t bytes, ops, failed, invalid, merged, time_ns;
} __attribute__((aligned(64))) vd_acct_counters;

typedef struct vd_acct {
    vd_acct_counters c[VD_ACCT_MAX];
    /* Read on every request, written only by configuration. */
    bool account_invalid, account_failed;
    int extras;
    /* Written on every request (last_access_ns at most every
     * VD_ACCT_IDLE_GRAIN ns, see io.c), each on a line of its own. */
    uint64_t last_access_ns __attribute__((aligned(64)));  /* 0: never */
    uint64_t wr_highest_offset __attribute__((aligned(64)));
    uint64_t zero_ops, zero_bytes;  /* zero writes, also in WRITE */
    vd_acct_interval *intervals;    /* under stats_lock */
    vd_latency_histogram hist[VD_ACCT_MAX];   /* under stats_lock */
} vd_acct;

/* The idle time's resolution: a busy node's last access time is
 * rewritten at most this often, so that concurrent requests do not
 * fight over its cache line. */
#define VD_ACCT_IDLE_GRAIN 100000

/* stats.c: the clock of the accounting, the part of a finished request's
 * accounting that needs the lock (called only while acct.extras is
 * set), an invalid request, and the release of what a node's accounting
 * allocated. */
uint64_t vd_acct_now(void);
void vd_acct_extras(vd_node *n, vd_acct_type type, uint64_t latency_ns,
                    bool counted);
void vd_acct_invalid(vd_node *n, vd_acct_type type);
void vd_acct_cleanup(vd_node *n);

/*
 * An edge of the graph: a parent node's child in some role, or a *user*
 * of a node (parent == NULL: the caller of vd_open(), an NBD export, a
 * QMP command; public type vd_user). Every edge carries the permissions
 * it takes on its node and those it lets the node's other edges take
 * (VD_PERM_*, QEMU's BlockPermission); perm.c keeps them consistent
 * (docs/permissions.md).
 */
struct vd_child {
    vd_node *node;     /* the child (one reference held) */
    vd_node *parent;   /* NULL for a user */
    char *name;        /* "file", "backing", "data-file"; "root" for users */
    char *user_desc;   /* users: how messages name them ("an unnamed
                          block device"); NULL for node edges */
    unsigned role;     /* VD_ROLE_* */
    bool job_edge;     /* users: a block job's (QEMU's child_job), which
                          is no block backend for vd_node_has_users() */
    unsigned perm;     /* VD_PERM_* this edge holds on @node */
    unsigned shared;   /* VD_PERM_* it lets the other edges hold */
    vd_child *next;    /* in parent->children */
    vd_child *next_parent; /* in node->parents, newest first */
    /* Scratch of a permission transaction (perm.c). */
    unsigned tran_perm, tran_shared;
    bool tran_saved;
};

/* A user of a node: an edge without a parent node. Requests made
 * through the user (vd_user_io_begin) are counted so that a pivot can
 * hold them at the gate, move the edge and let them on to the new node. */
struct vd_user {
    vd_child edge;
    atomic_int io_in_flight;
    atomic_bool io_gate;
};

/* I/O limits a driver sets in open() or refresh_limits(). 0 = no limit. */
typedef struct vd_limits {
    uint32_t request_alignment;   /* every request is a multiple; >= 1 */
    uint64_t max_transfer;        /* largest request, multiple of align */
    uint32_t pdiscard_alignment;  /* preferred discard granularity */
    uint32_t pwrite_zeroes_alignment;
    uint32_t min_mem_alignment;   /* buffer alignment (O_DIRECT) */
    uint64_t max_pwrite_zeroes;   /* largest zero write (besides
                                     max_transfer), multiple of align */
    uint64_t max_pdiscard;        /* largest discard, likewise */
    /* The storage is memory (tmpfs): allocating ahead of the writes
     * gains no larger extents there, it only moves the page allocation
     * earlier, into one long call (qcow2's grow_ahead() skips it). */
    bool memory_backed;
} vd_limits;

/* Node open flags, internal superset of VD_O_*. */
#define VD_NODE_RDWR        VD_O_RDWR
#define VD_NODE_NO_BACKING  VD_O_NO_BACKING
#define VD_NODE_CHECK       VD_O_CHECK
#define VD_NODE_FORCE_SHARE VD_O_FORCE_SHARE
#define VD_NODE_NO_IO       VD_O_NO_IO
#define VD_NODE_QUIET       VD_O_QUIET
#define VD_NODE_NOCACHE     (1u << 16) /* O_DIRECT */
#define VD_NODE_NO_FLUSH    (1u << 17) /* cache=unsafe: flush is a no-op */
#define VD_NODE_PROTOCOL    (1u << 18) /* open as a protocol (no probing) */
#define VD_NODE_COPY_ON_READ (1u << 24) /* copy-on-read=on: reads of the
                                           backing chain populate the node */
/* The core neither loads nor stores the node's persistent bitmaps: for
 * tests that drive a format's bitmaps_load/bitmaps_store themselves
 * (tests/unit/test-qcow2-bitmaps.c); vd_open() passes it through. */
#define VD_NODE_NO_BITMAPS  VD_O_NO_BITMAPS

struct vd_node {
    const vd_driver *drv;
    void *opaque;              /* driver state, drv->instance_size, zeroed */
    char *node_name;
    char *filename;            /* file name as given (protocol) or child's */
    unsigned flags;            /* VD_NODE_* */
    bool read_only;
    bool writethrough;         /* cache=directsync/writethrough */
    bool probed_raw;           /* raw chosen by probing: guard sector 0 */
    bool broken;               /* a reopen failed: every request fails */
    int detect_zeroes;         /* 0 off, 1 on, 2 unmap */
    bool discard_unmap;        /* discard=unmap (else ignored at the top) */

    vd_child *children;        /* all children, in attach order */
    vd_child *parents;         /* every edge pointing here (parent nodes'
                                  children and users), newest first */
    int n_parents;             /* how many of them come from parent nodes */
    /* Committed cumulative permissions of the edges in @parents: the OR
     * of what they hold, the AND of what they share (perm.c). */
    unsigned perm, shared;
    vd_user *opener;           /* the user vd_open() attached, or NULL */
    struct vd_op_blockers *op_blockers; /* or NULL (perm.c) */
    vd_blocker *backing_blocker; /* what this node installs on its
                                    backing node (perm.c) */
    unsigned tran_visit;       /* perm.c: visited mark of a walk */
    unsigned tran_perm, tran_shared; /* perm.c: a transaction's values */
    vd_opts *open_opts;        /* the driver's options, for reopening */
    /* Active dirty bitmaps (block jobs, backup); snapshot goto refuses
     * to run while there are any. */
    atomic_int dirty_bitmaps;
    /* Hooks called before every write reaches the node (backup's copy
     * before write); added and removed with the node drained. */
    _Atomic(struct vd_write_hook *) write_hooks;
    /* Dirty trackers of jobs (dirty.c): every write marks them. */
    _Atomic(vd_dirty_tracker *) dirty_trackers;
    /* Named dirty bitmaps (bitmap.c), NULL until the first one. */
    _Atomic(vd_node_bitmaps *) named_bitmaps;
    /* Jobs and copy-on-read filters populating the node by copy-on-read
     * (stream): while > 0, writes are tracked so that a copy never
     * overwrites them. */
    atomic_int cor_users;
    vd_child *file;            /* role "file", or NULL */
    vd_child *backing;         /* role "backing", or NULL */

    /* Backing file recorded in the image header (set by the format
     * driver's open; the core opens the chain from it). */
    char *backing_file;        /* as stored */
    char *backing_format;      /* or NULL */
    char *full_backing_filename;

    vd_limits bl;
    /* Cached length: set after open from drv->getlength, raised by writes
     * past the end, reset by truncate. Read with vd_node_getlength(). */
    _Atomic int64_t total_size;
    /* Writes, zero writes, discards and truncates that reached the node,
     * and that count when its last flush began: a protocol node with no
     * write since its last completed flush skips the next one, and a
     * flush with nothing written since raises no flush_to_disk event, as
     * QEMU's write_gen/flushed_gen. */
    _Atomic uint64_t write_gen;
    _Atomic uint64_t flushed_gen;
    atomic_int refcnt;

    /* Draining: requests increment in_flight; vd_node_drain_begin()
     * raises quiesce and waits until in_flight is 0; new requests wait
     * while quiesce > 0. */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int in_flight;
    int quiesce;

    /* Serialisation of read-modify-write for nodes with alignment > 1:
     * the list under lock, and (io.c, track_begin) the plain writes in
     * flight that skipped it while no serialising request was about. */
    struct vd_tracked_req *tracked;
    int track_plain;
    int track_serialising;

    /* Accounting (stats.c): counters by relaxed atomics; the timed
     * statistics and histograms under stats_lock. */
    pthread_mutex_t stats_lock;
    vd_acct acct;

    vd_node *next_global;      /* in the global node list */
    vd_node *free_next;        /* in the closing thread's list (node.c) */
};

/* Internal request flag of copy offloading: the range reads as zeros
 * in the source, so the destination gets a zero write instead. */
#define VD_REQ_ZERO_WRITE (1u << 16)

/* Hints a caller gives a node about a range (the vtable's advise). */
typedef enum vd_advice {
    /* Written data will be flushed soon: start writing it back now,
     * without waiting. */
    VD_ADVISE_WRITEBACK,
    /* The range will not be read again soon: what is cached of it may
     * go. */
    VD_ADVISE_DONTNEED,
} vd_advice;

/*
 * The driver vtable. Every callback is optional unless marked REQUIRED.
 *
 * I/O callbacks receive byte offsets and lengths. Contract (checked by
 * asserts in io.c in debug builds): for preadv, pwritev, pwrite_zeroes
 * and pdiscard, @off and @bytes are multiples of bl.request_alignment,
 * @bytes is not 0 and never larger than bl.max_transfer (or
 * VD_MAX_REQUEST), @qiov->size == @bytes, and the writing ones are
 * called on writable nodes only.
 * Reads are clipped by the core: the part of a read past the node's
 * length reads as zeros and the driver sees only the part inside
 * (rounded up to the alignment). Writes are not range-checked below the
 * top node: format drivers write past the end of their file child to
 * grow it (the core then updates the cached length). block_status is
 * asked about a non-empty range inside the node's length.
 * Callbacks return 0 or a negative errno, and may put a message into @err
 * (which may be NULL).
 */
struct vd_driver {
    const char *name;           /* REQUIRED: "file", "raw", "qcow2" */
    size_t instance_size;       /* bytes of node->opaque */
    bool is_format;             /* opens over a "file" child */
    bool is_filter;             /* passes everything to its primary child */
    bool supports_backing;      /* may hold a backing file */
    bool supports_compressed;   /* pwritev accepts VD_REQ_COMPRESSED */
    bool no_zero_init;          /* a new image does not read as zeros */
    /* Its storage is behind a server: each request waits for a round
     * trip, the server may complete requests in any order, and only
     * requests in flight hide the wait (VD_DRIVER_NETWORK). */
    bool network;
    bool big_requests;          /* VD_DRIVER_BIG_REQUESTS */
    bool flat;                  /* VD_DRIVER_FLAT */
    /* A format may grow this node ahead of its allocation with a zero
     * write past the end (which then reads as zeros) and cut it back at
     * close: cheap and exact on a regular file (qcow2's grow_ahead()). */
    bool grows_ahead;
    const vd_create_option *create_opts; /* NULL-terminated, or NULL */
    /* What amend takes (qemu-img amend -o help), NULL-terminated, or
     * NULL for a driver without amend. */
    const vd_create_option *amend_opts;
    /* Another name QEMU gives the primary child's options ("image" for
     * blkdebug): used instead of "file" when the options use it. */
    const char *file_alias;

    /* What the layers above would otherwise have to guess from the name
     * (vd_get_info(), the probing in node.c): */
    /* The filename shown for a node that opens no file ("null-co://",
     * as qemu names null-co nodes); NULL when nodes have a real one. */
    const char *pseudo_filename;
    /* Whether qemu's bdrv_get_info() answers for the driver's nodes, which
     * is when `info` shows a dirty flag: a driver with get_info does;
     * info_self says so for one without (file, whose qemu counterpart
     * answers and which has nothing to add); info_from_file for one that
     * passes the question to its file child (raw). Filters pass it to
     * the node they filter. */
    bool info_self;
    bool info_from_file;
    /* When probing chose this driver (no format named), its nodes guard
     * what probing reads: writes that would make sector 0 look like
     * another format are refused (node->probed_raw), and opening
     * read-write warns (raw). */
    bool guard_when_probed;

    /* Score 0..100 that @buf (the first @len bytes of the file, len may
     * be short) is this format. Raw answers 1; nothing else should. */
    int (*probe)(const uint8_t *buf, size_t len, const char *filename);

    /* Protocol drivers: the prefix of filenames that names the driver
     * ("blkdebug" for "blkdebug:CONFIG:IMAGE", "null-co" for
     * "null-co://"), QEMU's protocol_name; NULL for none. */
    const char *protocol_name;
    /* Score 0..100 that @filename is a host device this driver serves
     * (QEMU's bdrv_probe_device: host_device, host_cdrom), asked before
     * any protocol prefix. */
    int (*probe_device)(const char *filename);
    /* The library the driver is built on when it is loaded at first use
     * instead of linked (common/dlib.h): the core loads it before the
     * driver's open or create is called, and fails the open or create
     * with "cannot load SONAME" when it cannot. NULL for none. */
    vd_dlib *library;
    /* The driver opens its children itself (blkdebug's "image",
     * blkverify's "raw" and "test", with vd_node_open_child()): the core
     * opens no "file" child for it even when it is a filter. */
    bool opens_children;

    /* REQUIRED, except in probe-only entries (src/core/drivers.c):
     * a driver without open names a format vdisk recognises but cannot
     * open, and the core refuses it (vd_driver_unsupported()).
     * Opens the node. Format drivers find node->file already
     * attached. Consume each option used from @opts with vd_opts_take*;
     * the core rejects what is left. Set node->bl and, for formats with a
     * backing file, node->backing_file/backing_format. */
    int (*open)(vd_node *node, vd_opts *opts, unsigned flags, vd_error *err);

    /* Frees driver state. Children are released by the core afterwards. */
    void (*close)(vd_node *node);

    /* Creates an image. @opts holds the creation options (validated
     * against create_opts; "size" parsed by the driver). Format drivers
     * create their protocol file with vd_create_protocol(). */
    int (*create)(const char *filename, vd_opts *opts, vd_error *err);

    int (*preadv)(vd_node *node, uint64_t off, uint64_t bytes, vd_iov *qiov,
                  unsigned flags, vd_error *err);
    int (*pwritev)(vd_node *node, uint64_t off, uint64_t bytes, vd_iov *qiov,
                   unsigned flags, vd_error *err);
    /* Fallback when absent: a zero buffer written with pwritev (unless
     * VD_REQ_NO_FALLBACK). Return -ENOTSUP to ask for the fallback. */
    int (*pwrite_zeroes)(vd_node *node, uint64_t off, uint64_t bytes,
                         unsigned flags, vd_error *err);
    /* Advisory. Absent: nothing happens. */
    int (*pdiscard)(vd_node *node, uint64_t off, uint64_t bytes,
                    vd_error *err);
    /* Writes the driver's own caches down to its children. The core then
     * flushes the children. Protocol drivers sync to disk here. */
    int (*flush)(vd_node *node, vd_error *err);
    /* The core flushes only the primary child (copy-before-write: a
     * flush of the guest's disk does not wait for, nor fail with, the
     * fleecing target, as QEMU's cbw_co_flush()). */
    bool flush_primary_only;
    /*
     * Hints about [off, off+bytes) of the node (vd_advice): they make
     * nothing durable and order nothing (only flush does), change no
     * byte that reads return, may do nothing and cannot fail.
     * @bytes may reach past the node's end (UINT64_MAX: all of it).
     * Absent: filters pass them to the node they filter; other nodes
     * pass VD_ADVISE_WRITEBACK for the whole of each non-backing child
     * (they cannot map the range) and drop VD_ADVISE_DONTNEED.
     */
    void (*advise)(vd_node *node, uint64_t off, uint64_t bytes,
                   vd_advice advice);

    /*
     * Copy offloading (QEMU's copy_range_from/copy_range_to): @bytes are
     * copied from @src at @soff to @dst at @doff without passing through
     * the caller's buffers. The core calls copy_range_from on the source
     * (@node == @src), which passes the request down to where its data
     * lives and ends in copy_range_to on the destination (@node ==
     * @dst), which allocates and passes it down in turn; the protocol at
     * the bottom copies (copy_file_range). VD_REQ_ZERO_WRITE in @flags:
     * the source range reads as zeros, write zeros instead. -ENOTSUP:
     * not possible here, the caller reads and writes. Absent: -ENOTSUP.
     */
    int (*copy_range_from)(vd_node *node, uint64_t soff, vd_node *dst,
                           uint64_t doff, uint64_t bytes, unsigned flags,
                           vd_error *err);
    int (*copy_range_to)(vd_node *node, vd_node *src, uint64_t soff,
                         uint64_t doff, uint64_t bytes, unsigned flags,
                         vd_error *err);

    /* Status of [off, off+bytes): returns VD_BLOCK_* flags (>= 0) and
     * sets *pnum (1 <= *pnum <= bytes) to the length with that status.
     * With VD_BLOCK_OFFSET_VALID or VD_BLOCK_RAW, *map and *file say where
     * the data lives. @want_zero asks for precise ZERO information (slower
     * is fine); without it the driver may just report allocation.
     * Absent: protocols report DATA|ALLOCATED; filters and formats with a
     * file child report RAW at the same offset in that child. */
    int (*block_status)(vd_node *node, bool want_zero, uint64_t off,
                        uint64_t bytes, uint64_t *pnum, uint64_t *map,
                        vd_node **file, vd_error *err);

    /* REQUIRED for protocols and formats: virtual size in bytes. */
    int64_t (*getlength)(vd_node *node);
    /* Host bytes used. Absent: the sum over the children. */
    int64_t (*get_allocated_size)(vd_node *node);
    /* Resizes. @exact: the size must match exactly (formats); a protocol
     * node asked non-exactly may leave a larger file. */
    int (*truncate)(vd_node *node, uint64_t size, bool exact,
                    vd_prealloc prealloc, vd_error *err);
    /* The refusals truncate would make before its first write, and the
     * validations it would run, writing nothing (vd_truncate_plan()). */
    int (*truncate_check)(vd_node *node, uint64_t size, vd_prealloc prealloc,
                          vd_error *err);
    /* Fills format-specific fields of @info (cluster_size, dirty flag,
     * format_specific_json, snapshots). Generic fields are done. */
    int (*get_info)(vd_node *node, vd_image_info *info, vd_error *err);
    /* Sets limits after open or when children change. */
    void (*refresh_limits)(vd_node *node);

    /*
     * Permissions (docs/permissions.md). child_perm decides what @node
     * takes on its child @c (*nperm) and lets others take (*nshared),
     * given the cumulative permissions of @node's own parents and users
     * (@perm held, @shared shared). It may look at @c->role, at
     * node->read_only (already the value being switched to during a
     * reopen) and at its own state (it is called before open, with the
     * state zeroed, and again after). Absent: vd_default_child_perm().
     */
    void (*child_perm)(vd_node *node, const vd_child *c, unsigned perm,
                       unsigned shared, unsigned *nperm, unsigned *nshared);
    /*
     * For drivers that enforce permissions outside the process (the file
     * driver's lock bytes). check_perm: the node's cumulative permissions
     * are about to become @perm/@shared; hold what both the old and the
     * new ones need and fail (-EBUSY with the message) on a conflict.
     * Exactly one of set_perm (now hold only the new ones) or abort_perm
     * (back to the old ones) follows a successful check_perm; neither
     * may fail. All three run with the graph's permission lock held.
     */
    int (*check_perm)(vd_node *node, unsigned perm, unsigned shared,
                      vd_error *err);
    void (*set_perm)(vd_node *node, unsigned perm, unsigned shared);
    void (*abort_perm)(vd_node *node);

    /* Statistics only the driver keeps (qemu's BlockStatsSpecific, e.g.
     * file-posix's discard counts), for vd_get_driver_stats(). Absent:
     * there are none. */
    int (*get_driver_stats)(vd_node *node, vd_driver_stats *out);

    /* Space accounting (vd_du()): fills @res's cluster_size, allocated,
     * shared, leaked and rows from metadata; the core has filled the
     * rest. Reads only. Absent: one VD_DU_IMAGE row (info.c). */
    int (*space_usage)(vd_node *node, vd_du_result *res, vd_error *err);
    /* Consistency check (and repair when @fix has VD_CHECK_FIX_*). */
    int (*check)(vd_node *node, vd_check_result *res, unsigned fix,
                 vd_error *err);
    /* Changes creation options of an open image (qemu-img amend). */
    int (*amend)(vd_node *node, vd_opts *opts, bool force, vd_error *err);
    /* In-place compaction (vd_compact()). Node drained. Absent: the
     * format cannot compact. */
    int (*compact)(vd_node *node, bool dry_run, vd_progress_fn progress,
                   void *opaque, vd_compact_result *res, vd_error *err);
    /* What amend would change (vd_amend_plan()): the same checks and
     * refusals, in the same order, nothing written; @fn gets each option
     * that would change. */
    int (*amend_plan)(vd_node *node, vd_opts *opts, bool force,
                      vd_amend_change_fn fn, void *opaque, vd_error *err);
    /* Host size an image created with @create_opts (size in "size"
     * unless @src is given) and filled from @src (may be NULL) would
     * need, as qemu-img measure. Consume the options used. */
    int (*measure)(vd_opts *create_opts, vd_node *src,
                   vd_measure_result *out, vd_error *err);

    /* Draining (vd_node_drain_begin/end): called before the core waits
     * for the node's requests, so a driver that holds requests back
     * (throttle's queues, blkdebug's breakpoints) lets them go. */
    void (*drain_begin)(vd_node *node);
    void (*drain_end)(vd_node *node);

    /* blkdebug's interface (QEMU's bdrv_debug_*): an event raised on the
     * node (VD_BLKDBG_*), and the breakpoints of qemu-io's break,
     * remove_break, resume and wait_break (src/core/debug.c finds the
     * node that has them). */
    void (*debug_event)(vd_node *node, int event);
    int (*debug_breakpoint)(vd_node *node, const char *event,
                            const char *tag);
    int (*debug_remove_breakpoint)(vd_node *node, const char *tag);
    int (*debug_resume)(vd_node *node, const char *tag);
    bool (*debug_is_suspended)(vd_node *node, const char *tag);

    /* Rewrites the backing file name and format recorded in the image
     * (qemu-img rebase). @backing NULL or "" removes the backing file. */
    int (*change_backing_file)(vd_node *node, const char *backing,
                               const char *backing_fmt, vd_error *err);
    /* Deallocates every cluster so that the image reads through to its
     * backing file (qemu-img commit without -d). */
    int (*make_empty)(vd_node *node, vd_error *err);

    /* Internal snapshots. */
    int (*snapshot_create)(vd_node *node, const vd_snapshot_info *sn,
                           vd_error *err);
    int (*snapshot_goto)(vd_node *node, const char *id, vd_error *err);
    int (*snapshot_delete)(vd_node *node, const char *id, const char *name,
                           vd_error *err);
    int (*snapshot_list)(vd_node *node, vd_snapshot_info **list,
                         size_t *count, vd_error *err);
    int (*snapshot_load_tmp)(vd_node *node, const char *id,
                             const char *name, vd_error *err);
    /* What snapshot_delete (@apply false: @id and/or @name as there) or
     * snapshot_goto (@apply true: @id is the id or name, as there) would
     * change, from metadata, writing nothing (vd_snapshot_delete_plan());
     * the snapshot is looked up and the structures are validated as the
     * real operation does, with its errors; -ENOENT when none matches. */
    int (*snapshot_plan)(vd_node *node, const char *id, const char *name,
                         bool apply, vd_snapshot_plan *out, vd_error *err);
    /* VM state save area (for snapshots with VM state). */
    int (*save_vmstate)(vd_node *node, vd_iov *qiov, uint64_t pos,
                        vd_error *err);
    int (*load_vmstate)(vd_node *node, vd_iov *qiov, uint64_t pos,
                        vd_error *err);

    /*
     * Persistent dirty bitmaps (QEMU's qcow2 bitmaps extension,
     * ../shared/specs/bitmaps.rst). All optional: a driver without
     * bitmaps_load has no persistent bitmaps and refuses persistent=true.
     *
     * bitmaps_load: called by the core once after open (and after a
     * reopen read-only -> read-write). Returns every bitmap the image
     * stores in *@list (*@count entries; malloc'd array and strings, the
     * caller frees with vd_bitmap_images_free()). Bits are filled for
     * bitmaps not marked in use; in_use ones come back with bits NULL and
     * are inconsistent. When the node is writable the driver marks the
     * loaded bitmaps in use in the image before returning (so a crash
     * leaves them inconsistent, as QEMU does), and from then on owns the
     * duty to store them.
     *
     * bitmaps_store: called by the core on flush-before-close and on
     * inactivation/reopen to read-only (never on a read-only node) with
     * the full set of persistent bitmaps of the node: the driver replaces
     * the stored set with @list (bitmaps not in @list are removed from the
     * image, in_use cleared on those stored), writes bits, and sets the
     * autoclear bit. Metadata ordering: bitmap data and tables first,
     * then the directory, then the header extension.
     *
     * bitmap_can_store: whether a new persistent bitmap @name of
     * @granularity bytes fits (name length, count limits, granularity
     * range); QEMU's error texts.
     * bitmap_remove: removes @name from the image now (QEMU removes a
     * persistent bitmap from the image at block-dirty-bitmap-remove).
     */
    int (*bitmaps_load)(vd_node *node, vd_bitmap_image **list,
                        size_t *count, vd_error *err);
    int (*bitmaps_store)(vd_node *node, const vd_bitmap_image *list,
                         size_t count, vd_error *err);
    int (*bitmap_can_store)(vd_node *node, const char *name,
                            uint64_t granularity, vd_error *err);
    int (*bitmap_remove)(vd_node *node, const char *name, vd_error *err);

    /* QEMU's snapshot-access API, which a copy-before-write filter offers
     * the snapshot-access node above it: reads, block status and
     * discards of the image as it was when the filter was inserted
     * (block_status's contract). Absent: -ENOTSUP. */
    int (*preadv_snapshot)(vd_node *node, uint64_t off, uint64_t bytes,
                           vd_iov *qiov, vd_error *err);
    int (*snapshot_block_status)(vd_node *node, bool want_zero,
                                 uint64_t off, uint64_t bytes,
                                 uint64_t *pnum, uint64_t *map,
                                 vd_node **file, vd_error *err);
    int (*pdiscard_snapshot)(vd_node *node, uint64_t off, uint64_t bytes,
                             vd_error *err);
};


/* ---- driver registry (drivers.c) ---- */

/* Looks a driver up by name; NULL when unknown. */
const vd_driver *vd_find_driver(const char *name);
/* The @i-th registered driver, or NULL past the end (for probing). */
const vd_driver *vd_driver_at(int i);
/* vd_find_node() and vd_foreach_node() are public (vdisk.h). */
/* Whether @name is a value of QEMU's BlockdevDriver enum, which QAPI
 * options naming a driver (a qcow2 image's backing-fmt) must be. */
bool vd_qemu_driver_name(const char *name);
/* Refuses a probe-only driver (one without open): -ENOTSUP, "FILE:
 * format 'NAME' is not supported" (without "FILE: " when NULL). */
int vd_driver_unsupported(const vd_driver *drv, const char *filename,
                          vd_error *err);

/* ---- blkdebug events (debug.c) ---- */

/* QEMU's BlkdebugEvent, in its order (../shared/specs/block-core.json). */
enum {
    VD_BLKDBG_L1_UPDATE,
    VD_BLKDBG_L1_GROW_ALLOC_TABLE,
    VD_BLKDBG_L1_GROW_WRITE_TABLE,
    VD_BLKDBG_L1_GROW_ACTIVATE_TABLE,
    VD_BLKDBG_L2_LOAD,
    VD_BLKDBG_L2_UPDATE,
    VD_BLKDBG_L2_UPDATE_COMPRESSED,
    VD_BLKDBG_L2_ALLOC_COW_READ,
    VD_BLKDBG_L2_ALLOC_WRITE,
    VD_BLKDBG_READ_AIO,
    VD_BLKDBG_READ_BACKING_AIO,
    VD_BLKDBG_READ_COMPRESSED,
    VD_BLKDBG_WRITE_AIO,
    VD_BLKDBG_WRITE_COMPRESSED,
    VD_BLKDBG_VMSTATE_LOAD,
    VD_BLKDBG_VMSTATE_SAVE,
    VD_BLKDBG_COW_READ,
    VD_BLKDBG_COW_WRITE,
    VD_BLKDBG_REFTABLE_LOAD,
    VD_BLKDBG_REFTABLE_GROW,
    VD_BLKDBG_REFTABLE_UPDATE,
    VD_BLKDBG_REFBLOCK_LOAD,
    VD_BLKDBG_REFBLOCK_UPDATE,
    VD_BLKDBG_REFBLOCK_UPDATE_PART,
    VD_BLKDBG_REFBLOCK_ALLOC,
    VD_BLKDBG_REFBLOCK_ALLOC_HOOKUP,
    VD_BLKDBG_REFBLOCK_ALLOC_WRITE,
    VD_BLKDBG_REFBLOCK_ALLOC_WRITE_BLOCKS,
    VD_BLKDBG_REFBLOCK_ALLOC_WRITE_TABLE,
    VD_BLKDBG_REFBLOCK_ALLOC_SWITCH_TABLE,
    VD_BLKDBG_CLUSTER_ALLOC,
    VD_BLKDBG_CLUSTER_ALLOC_BYTES,
    VD_BLKDBG_CLUSTER_FREE,
    VD_BLKDBG_FLUSH_TO_OS,
    VD_BLKDBG_FLUSH_TO_DISK,
    VD_BLKDBG_PWRITEV_RMW_HEAD,
    VD_BLKDBG_PWRITEV_RMW_AFTER_HEAD,
    VD_BLKDBG_PWRITEV_RMW_TAIL,
    VD_BLKDBG_PWRITEV_RMW_AFTER_TAIL,
    VD_BLKDBG_PWRITEV,
    VD_BLKDBG_PWRITEV_ZERO,
    VD_BLKDBG_PWRITEV_DONE,
    VD_BLKDBG_EMPTY_IMAGE_PREPARE,
    VD_BLKDBG_L1_SHRINK_WRITE_TABLE,
    VD_BLKDBG_L1_SHRINK_FREE_L2_CLUSTERS,
    VD_BLKDBG_COR_WRITE,
    VD_BLKDBG_CLUSTER_ALLOC_SPACE,
    VD_BLKDBG_NONE,
    VD_BLKDBG__MAX
};

/* The event's QAPI name ("l2_update"), or NULL out of range. */
const char *vd_blkdebug_event_name(int event);
/* The event named @name, or -1. */
int vd_blkdebug_event_by_name(const char *name);

/* What format drivers do where QEMU's raise BLKDBG_EVENT(bs->file, EV):
 * raises @event on @node (the format's file child), or, when @node's
 * driver takes no events and is a filter, on the first node down its
 * filtered children that does (so a throttle or copy-on-read node
 * between a format and its blkdebug node lets the events through; QEMU
 * would drop them). NULL @node: nothing. */
void vd_node_debug_event(vd_node *node, int event);
/* The core's own events (flush_to_os on a node's primary child,
 * pwritev on the node written): raised on @node alone, as QEMU's
 * bdrv_debug_event(). */
void vd_node_debug_event_here(vd_node *node, int event);

/* Tells the program (vd_debug_set_handler()) that a request stopped at
 * breakpoint @tag or goes on: QEMU's "blkdebug: Suspended request 'TAG'"
 * and "blkdebug: Resuming request 'TAG'" lines. */
void vd_debug_notify(const char *tag, bool resuming);

/* ---- node lifecycle (node.c) ---- */

/*
 * Opens a node of driver @drv (or probed when NULL and the node is not a
 * protocol). The generic open used by vd_open() and by drivers that open
 * extra children. Consumes @opts (the caller keeps ownership of the
 * object; consumed keys are removed).
 */
int vd_node_open(vd_node **out, const char *filename, const vd_driver *drv,
                 vd_opts *opts, unsigned flags, vd_error *err);

/* Takes / drops a reference; the last unref closes the node. */
void vd_node_ref(vd_node *node);
void vd_node_unref(vd_node *node);

/*
 * Opens a child of @parent the way QEMU's bdrv_open_child() does, for
 * drivers that open their own children (opens_children): the option
 * @name as a string names an existing node; "@name.*" options describe
 * a new one (consumed from @opts); else @filename (may be NULL) is
 * opened. The new node inherits @parent's flags; a pure data child of a
 * filter is format-probed (blkverify's "test"), a filtered one is not
 * unless @parent was. Attaches it as @name with @role (with
 * VD_ROLE_PRIMARY it becomes node->file). With @allow_none, nothing
 * given is not an error: NULL is returned and *@err stays unset; else
 * it fails with QEMU's 'A block device must be specified for "NAME"'.
 * Returns the child, or NULL with @err set.
 */
vd_child *vd_node_open_child(vd_node *parent, vd_opts *opts,
                             const char *name, const char *filename,
                             unsigned role, bool allow_none, vd_error *err);

/* Attaches @child_node under @parent in role @name and takes the
 * permissions @parent's driver asks for it, checking the subgraph below
 * (perm.c). Takes over the caller's reference to @child_node on
 * success. Returns the child, or NULL with @err set (ENOMEM, or a
 * permission conflict); the caller keeps its reference then. */
vd_child *vd_node_attach_child(vd_node *parent, vd_node *child_node,
                               const char *name, unsigned role,
                               vd_error *err);
/* Detaches and unrefs a child; the permissions it held are released. */
void vd_node_detach_child(vd_node *parent, vd_child *child);

/* Maps a filename to its protocol driver as QEMU's bdrv_find_protocol()
 * does: a host device a driver claims (host_device, host_cdrom) first,
 * then a "NAME:" prefix naming a driver's protocol ("null-co://",
 * "blkdebug:CONFIG:IMAGE"); anything else is a file. NULL with
 * "Unknown protocol 'NAME'" in @err for a protocol QEMU has and this build
 * lacks. */
const vd_driver *vd_protocol_for_filename(const char *filename,
                                          vd_error *err);

/* Creates the protocol file of @filename (with the driver
 * vd_protocol_for_filename() finds) for format drivers: @opts may hold
 * size and the protocol's own options. */
int vd_create_protocol(const char *filename, vd_opts *opts, vd_error *err);

/* QEMU's bdrv_co_create_opts_simple(), the create callback (with
 * vd_create_opts_simple as create_opts: size, preallocation=off) of
 * protocols that cannot make an image but reach an existing one (nbd,
 * iscsi): "creating" opens it read-write, shrinks it where the driver can
 * (a size larger than it has is the driver's refusal) and zeroes its first
 * sector, so no stale header is probed in what was written before. */
extern const vd_create_option vd_create_opts_simple[];
int vd_create_simple(const char *filename, vd_opts *opts, vd_error *err);

/* Opens @filename with the protocol driver as a standalone node, for
 * format create() functions that write their headers. With
 * VD_NODE_RDWR the node holds write and resize and lets nobody else
 * resize (its lock bytes say so) until it is unreferenced. */
int vd_open_protocol(vd_node **out, const char *filename, unsigned flags,
                     vd_error *err);

/* Closes and reopens the driver of @node with its saved options and
 * @flags (e.g. to switch between read-only and read-write, or to make a
 * parent see a reverted child). Non-backing children are reopened the
 * same way first. On failure the old mode is restored when possible. */
int vd_node_reopen(vd_node *node, unsigned flags, vd_error *err);

/* Closes the driver state of @node (not its children), so that it can be
 * opened again with vd_node_open_driver(). */
void vd_node_close_driver(vd_node *node);
/* Opens the driver of @node again with its saved options and @flags. On
 * failure the node is marked broken. */
int vd_node_open_driver(vd_node *node, unsigned flags, vd_error *err);

/* Drain: block new requests and wait for in-flight ones (nestable). */
void vd_node_drain_begin(vd_node *node);
void vd_node_drain_end(vd_node *node);

/* ---- permissions and operation blockers (perm.c) ---- */

/* QEMU's default permissions of a child by its role: filtered children
 * get the parent's permissions passed through; backing (COW) children
 * are only read; storage (DATA/METADATA) children of a writable node are
 * written and resized, and their metadata is never shared for writing
 * (docs/permissions.md has the table). */
void vd_default_child_perm(vd_node *node, const vd_child *c, unsigned perm,
                           unsigned shared, unsigned *nperm,
                           unsigned *nshared);

/* Recomputes the permissions of @node's edges to its children and of
 * every node below, checks them (conflicts between the edges of one
 * node, writers on read-only nodes, other processes through
 * check_perm) and commits them; on failure nothing changes and @err
 * names the conflict. Call after anything that changes what a node's
 * driver asks of its children (open, reopen, its options). */
int vd_node_refresh_perms(vd_node *node, vd_error *err);

/* The permissions @node and the children a reopen switches along (not
 * its backing chain) would have once switched to @read_only: checked
 * only, or with @commit also taken (the read-only flags themselves are
 * left alone: the reopen sets them). */
int vd_node_reopen_perms(vd_node *node, bool read_only, bool commit,
                         vd_error *err);

/* Edges into @node: links @c into node->parents (newest first) /
 * unlinks it, without touching permissions. */
void vd_node_link_parent(vd_node *node, vd_child *c);
void vd_node_unlink_parent(vd_node *node, vd_child *c);

/* The opener of a node vd_open() returns: a user that holds no node
 * reference of its own (the caller's handle is the reference). */
int vd_node_attach_opener(vd_node *node, unsigned perm, unsigned shared,
                          vd_error *err);
void vd_node_drop_opener(vd_node *node);

/* Drops every blocker of @node's operation table (node.c at free). */
void vd_node_free_op_blockers(vd_node *node);

/* Emits a warning through the warning handler (unless VD_NODE_QUIET).
 * Without a handler it goes to stderr as "WARNING: MSG" (the form of
 * QEMU's few old-style warnings, such as the probing one). */
void vd_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The same for a warning QEMU emits with warn_report(): without a
 * handler it goes to stderr as "PROG: warning: MSG", PROG being the
 * program's name as invoked (qemu-img, vdisk, ...). A handler gets MSG. */
void vd_warn_report(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));

/* ---- the request path (io.c) ---- */

int vd_node_preadv(vd_node *node, uint64_t off, uint64_t bytes, vd_iov *qiov,
                   unsigned flags, vd_error *err);
int vd_node_pwritev(vd_node *node, uint64_t off, uint64_t bytes, vd_iov *qiov,
                    unsigned flags, vd_error *err);
int vd_node_pwrite_zeroes(vd_node *node, uint64_t off, uint64_t bytes,
                          unsigned flags, vd_error *err);
int vd_node_pdiscard(vd_node *node, uint64_t off, uint64_t bytes,
                     vd_error *err);
int vd_node_flush(vd_node *node, vd_error *err);
/* The vtable's advise: a hint, nothing to check afterwards. */
void vd_node_advise(vd_node *node, uint64_t off, uint64_t bytes,
                    vd_advice advice);
int64_t vd_node_getlength(vd_node *node);
/* Asks the driver for the length again and caches it, rounded up to 512
 * bytes as QEMU does (a 1000-byte raw file is a 1024-byte disk). Returns
 * the new length or a negative errno. */
int64_t vd_node_refresh_length(vd_node *node);
int vd_node_truncate(vd_node *node, uint64_t size, bool exact,
                     vd_prealloc prealloc, vd_error *err);

/* Block status of one node, following VD_BLOCK_RAW into the file child
 * (so the result never has RAW set). */
int vd_node_block_status(vd_node *node, bool want_zero, uint64_t off,
                         uint64_t bytes, uint64_t *pnum, uint64_t *map,
                         vd_node **file, vd_error *err);
/* Block status looking down the backing chain from @top until @base
 * (exclusive, NULL = whole chain). *depth is the layer that holds the
 * extent (or the chain length when none does). */
/*
 * The backing format a creation names, where a driver's QAPI options put
 * it: qemu's backing-fmt is the BlockdevDriver enum, so any other name
 * is refused ("Parameter 'backing-fmt' does not accept value 'x'"), and
 * a driver that must open the backing file for its size (@has_size
 * false) needs the format to be one vdisk has, or it would probe.
 */
int vd_create_check_backing_fmt(const char *filename, const char *bfile,
                                const char *bfmt, bool has_size,
                                vd_error *err);

/* Copy offloading between nodes (the vtable's copy_range_from and
 * copy_range_to): -ENOTSUP where a node on the way cannot. */
int vd_node_copy_range_from(vd_node *src, uint64_t soff, vd_node *dst,
                            uint64_t doff, uint64_t bytes, unsigned flags,
                            vd_error *err);
int vd_node_copy_range_to(vd_node *src, uint64_t soff, vd_node *dst,
                          uint64_t doff, uint64_t bytes, unsigned flags,
                          vd_error *err);
/* Copy-on-read for jobs. Between vd_node_cor_begin() and
 * vd_node_cor_end(), writes to @n are tracked; vd_node_populate() then
 * copies into @top what it inherits in [off, off+bytes) from the layers
 * of its chain above @base (NULL: all), in pieces of at most @buflen
 * bytes through @buf, serialised against writes to @top so that no write
 * is overwritten with older data. Waits while @top is drained, as a
 * public request. *copied: the bytes written into @top. */
void vd_node_cor_begin(vd_node *n);
void vd_node_cor_end(vd_node *n);
int vd_node_populate(vd_node *top, vd_node *base, uint64_t off,
                     uint64_t bytes, uint8_t *buf, uint64_t buflen,
                     uint64_t *copied, vd_error *err);

/* Dirty trackers (dirty.c): a bitmap of @node's length at @granularity
 * (rounded up to a power of two) that every write, zero write and
 * discard of @node marks once it reached the driver. New and free drain
 * the node. next() finds the first dirty run at or after @from (wrapping
 * around), at most @max bytes long. */
int vd_dirty_tracker_new(vd_dirty_tracker **out, vd_node *node,
                         uint64_t granularity, vd_error *err);
void vd_dirty_tracker_free(vd_dirty_tracker **t, vd_node *node);
/* The same bitmap, registered nowhere (free with node NULL). */
int vd_dirty_bitmap_new(vd_dirty_tracker **out, uint64_t len,
                        uint64_t granularity, vd_error *err);
uint64_t vd_dirty_tracker_granularity(const vd_dirty_tracker *t);
void vd_dirty_tracker_set(vd_dirty_tracker *t, uint64_t off, uint64_t bytes);
void vd_dirty_tracker_clear(vd_dirty_tracker *t, uint64_t off,
                            uint64_t bytes);
uint64_t vd_dirty_tracker_count(const vd_dirty_tracker *t);
bool vd_dirty_tracker_next(const vd_dirty_tracker *t, uint64_t from,
                           uint64_t max, uint64_t *off, uint64_t *bytes);
/* Pivots (perm.c). vd_node_gate_users() stops requests made through
 * the users of @node (not the block jobs' edges) at their gate and waits
 * until none is in flight; vd_node_replace() then moves every edge into
 * @from (users and parent nodes, except block jobs' edges and edges from
 * @to's own backing chain) to @to, checking permissions (nothing moves
 * on failure); vd_node_ungate_users() opens the gates of the users of
 * @node again. Graph lock held; parent nodes are drained meanwhile. */
void vd_node_gate_users(vd_node *node);
void vd_node_ungate_users(vd_node *node);
int vd_node_replace(vd_node *from, vd_node *to, vd_error *err);

/* A hook run before every write, zero write, discard and copy into a
 * node reaches its driver (io.c), with the range; an error fails the
 * write. Hooks may read the node. vd_node_add_write_hook() and
 * vd_node_remove_write_hook() drain the node. Copy offloading into a
 * hooked node is refused (-ENOTSUP: the caller copies by hand).
 * @after, optional, runs once the request is over (also when it or a
 * later hook's @fn failed: @ret), on the same thread, for every request
 * whose @fn succeeded: @qiov holds a write's data; NULL for a zero write
 * (@flags has VD_REQ_ZERO_WRITE) or a discard. */
typedef struct vd_write_hook {
    int (*fn)(void *opaque, uint64_t off, uint64_t bytes, vd_error *err);
    void *opaque;
    struct vd_write_hook *next;
    void (*after)(void *opaque, uint64_t off, uint64_t bytes,
                  vd_iov *qiov, unsigned flags, int ret);
} vd_write_hook;
void vd_node_add_write_hook(vd_node *node, vd_write_hook *hook);
void vd_node_remove_write_hook(vd_node *node, vd_write_hook *hook);

/* io.c: marks [off, off+bytes) in every tracker and every enabled
 * named bitmap of @node; io.c calls it when vd_node_tracks_dirty(). */
void vd_dirty_mark(vd_node *node, uint64_t off, uint64_t bytes);
static inline bool vd_node_tracks_dirty(vd_node *n)
{
    return atomic_load_explicit(&n->dirty_trackers, memory_order_relaxed) ||
           atomic_load_explicit(&n->named_bitmaps, memory_order_relaxed);
}

/* Named dirty bitmaps, the core's side (bitmap.c, docs/bitmaps.md):
 * marking, the driver's persistent bitmaps after open (and a reopen
 * read-write: bitmaps already known become writable) and before close
 * (and a reopen read-only: @readonly_after), the length after a resize,
 * freeing with the node. close stores and drops every bitmap. */
void vd_bitmaps_mark(vd_node *node, uint64_t off, uint64_t bytes);
int vd_bitmaps_load(vd_node *node, vd_error *err);
int vd_bitmaps_store(vd_node *node, bool readonly_after, vd_error *err);
void vd_bitmaps_close(vd_node *node);
void vd_bitmaps_truncate(vd_node *node);
void vd_bitmaps_free(vd_node *node);

int vd_node_block_status_above(vd_node *top, vd_node *base, bool want_zero,
                               uint64_t off, uint64_t bytes, uint64_t *pnum,
                               uint64_t *map, vd_node **file, int *depth,
                               vd_error *err);

/* Convenience wrappers for drivers: flat buffers on a child. */
int vd_child_pread(vd_child *c, uint64_t off, void *buf, uint64_t bytes,
                   vd_error *err);
int vd_child_pwrite(vd_child *c, uint64_t off, const void *buf,
                    uint64_t bytes, unsigned flags, vd_error *err);
int vd_child_preadv(vd_child *c, uint64_t off, uint64_t bytes, vd_iov *qiov,
                    unsigned flags, vd_error *err);
int vd_child_pwritev(vd_child *c, uint64_t off, uint64_t bytes, vd_iov *qiov,
                     unsigned flags, vd_error *err);

/* Block-status implementations drivers may point their vtable at. */
int vd_block_status_from_file(vd_node *node, bool want_zero, uint64_t off,
                              uint64_t bytes, uint64_t *pnum, uint64_t *map,
                              vd_node **file, vd_error *err);

/* The length of a filter: its file child's (a getlength for filters,
 * whose cached length the core keeps like any other node's). */
int64_t vd_filter_getlength(vd_node *node);

/* Bounce buffer aligned for the node (O_DIRECT safe); free with free(). */
void *vd_node_blockalign(vd_node *node, size_t size);

#endif /* VDISK_CORE_BLOCK_INT_H */
