/*
 * The "file" protocol driver: an image stored in a host file accessed
 * through one file descriptor; and the same code as "host_device" and
 * "host_cdrom" for block and character devices (QEMU 7.2's names and
 * checks: "file" refuses a device, they refuse a regular file; a
 * filename that is a device is theirs when no driver is named).
 *
 * Organisation: the lock bytes first (how the node's permissions,
 * handed down by perm.c through check_perm/set_perm/abort_perm, become
 * OFD locks), then open/close with the options, then the request
 * callbacks (read, write, zeroes, discard, flush, block status), then
 * size handling (getlength, truncate with preallocation), and finally
 * create, the driver-specific statistics and the vtable, which also
 * declares that qemu's file-posix answers get_info. Every request runs
 * synchronously in the calling thread with positioned I/O
 * (preadv/pwritev, or under aio=io_uring the thread's own ring: see
 * uring_get()), so concurrent requests on one node need no locking:
 * the descriptor has no shared file position.
 * Buffered writes to a regular file alone queue on a mutex (see
 * file_state.write_lock for why).
 *
 * Behaviour follows QEMU 7.2's file-posix.c where users can see it: error
 * wording, the image locks other QEMU processes check (OFD locks on bytes
 * 100+perm and 200+perm), how preallocation works, and writing the first
 * block of a new image so that O_DIRECT alignment probing later finds
 * allocated data to read.
 */
#include <errno.h>
#include <stdio.h>
#include <pthread.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <linux/magic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/uio.h>
#include <unistd.h>
#ifdef VDISK_HAVE_LIBURING
#include <liburing.h>
#endif

#include "core/block_int.h"

#include <linux/cdrom.h>

extern const vd_driver vd_driver_file;
extern const vd_driver vd_driver_host_device;
extern const vd_driver vd_driver_host_cdrom;

/* The largest logical block size O_DIRECT may need (QEMU's MAX_BLOCKSIZE). */
#define FILE_MAX_BLOCKSIZE 4096

/* Bytes of zeros written at a time for preallocation=full. */
#define FILE_ZERO_CHUNK (64 * 1024)

/*
 * The lock bytes QEMU's file-posix driver uses, so that QEMU's tools and
 * vdisk see each other: a process whose node holds permission bit i
 * (VD_PERM_*, in QEMU's order) keeps a shared OFD lock on byte 100+i;
 * one that does not share bit i keeps a shared lock on byte 200+i. A
 * conflict is another open file description holding the opposite byte,
 * which a test for a write lock finds (our own locks never conflict
 * with us).
 */
#define PERM_COUNT 4
#define LOCK_PERM_BASE   100
#define LOCK_SHARED_BASE 200

static const char *const perm_names[PERM_COUNT] = {
    "consistent read", "write", "write unchanged", "resize",
};

enum { LOCKING_AUTO, LOCKING_ON, LOCKING_OFF };
enum { AIO_THREADS, AIO_NATIVE, AIO_IO_URING };   /* aio_choices' order */
static const char *const locking_choices[] = { "auto", "on", "off", NULL };
static const char *const aio_choices[] = {
    "threads", "native", "io_uring", NULL,
};
static const char *const prealloc_choices[] = {
    "off", "metadata", "falloc", "full", NULL,
};

typedef struct file_state {
    int fd;
    bool is_blockdev;
    bool direct;                    /* opened with O_DIRECT */
    bool use_uring;                 /* aio=io_uring: see uring_rw() */
    /* Cleared when the filesystem turns out not to support an fallocate
     * mode, so later requests go straight to the fallback. */
    atomic_bool has_zero_range;
    atomic_bool has_punch_hole;
    atomic_bool has_fallocate;
    /*
     * Buffered writes to a regular file hold the inode's lock in the
     * kernel (ext4, xfs, btrfs, tmpfs, nfs alike), so they never run in
     * parallel anyway; while they queue, the kernel spins on that lock
     * for as long as its holder runs, which on a small machine takes
     * the CPU from the threads that could be receiving and replying.
     * Queueing on our own mutex sleeps instead: under 4 KiB random
     * writes at queue depth 32 over NBD, 20-30% more requests per
     * second (bench/nbd.sh, docs/nbd.md). O_DIRECT writes and block
     * devices do run in parallel and are left alone.
     */
    bool serialize_writes;
    pthread_mutex_t write_lock;     /* valid while fd >= 0 */
    /* Locking: whether lock bytes are used at all (locking=off, or
     * auto on a filesystem without OFD locks: no), and the permissions
     * whose bytes are held now (set_perm/abort_perm bring them back to
     * the committed ones after check_perm took the union). */
    bool use_lock;
    bool lock_auto;
    unsigned locked_perm;
    unsigned locked_unshared;
    /* The bytes this descriptor holds at this moment (a check holds the
     * union of old and new until the commit): only bytes whose state
     * changes cost a fcntl(). Opening a chain of 1000 overlays
     * re-checks every node's permissions once per node added, and a
     * fcntl() per byte each time made 7 million calls. */
    unsigned held_perm;
    unsigned held_unshared;
} file_state;

/* ---------------------------------------------------------------- */
/* Locks                                                            */
/* ---------------------------------------------------------------- */

static int lock_byte(int fd, int cmd, short type, off_t byte, short *held)
{
    struct flock fl = {
        .l_type = type,
        .l_whence = SEEK_SET,
        .l_start = byte,
        .l_len = 1,
    };

    if (fcntl(fd, cmd, &fl) < 0) {
        return -errno;
    }
    if (held) {
        *held = fl.l_type;
    }
    return 0;
}

/*
 * Holds the bytes of @perm and of @unshared; with @unlock also releases
 * the others (a commit), else only adds (a check keeps the old and the
 * new ones until the graph decides). @held_perm and @held_unshared say
 * which bytes @fd holds now and are kept true: bytes already in the
 * wanted state are not touched (QEMU's raw_apply_lock_bytes() likewise).
 * Returns 0, or -errno with the failing byte in *@failed.
 */
static int apply_lock_bytes(int fd, unsigned *held_perm,
                            unsigned *held_unshared, unsigned perm,
                            unsigned unshared, bool unlock, int *failed)
{
    for (int i = 0; i < PERM_COUNT; i++) {
        static const int base[2] = { LOCK_PERM_BASE, LOCK_SHARED_BASE };
        const unsigned want[2] = { perm, unshared };
        unsigned *held[2] = { held_perm, held_unshared };
        const unsigned bit = 1u << i;

        for (int k = 0; k < 2; k++) {
            int byte = base[k] + i;
            int ret;

            if ((want[k] & bit) && !(*held[k] & bit)) {
                ret = lock_byte(fd, F_OFD_SETLK, F_RDLCK, byte, NULL);
                if (ret == 0) {
                    *held[k] |= bit;
                }
            } else if (unlock && !(want[k] & bit) && (*held[k] & bit)) {
                ret = lock_byte(fd, F_OFD_SETLK, F_UNLCK, byte, NULL);
                if (ret == 0) {
                    *held[k] &= ~bit;
                }
            } else {
                continue;
            }
            if (ret < 0) {
                *failed = byte;
                return ret;
            }
        }
    }
    return 0;
}

/*
 * Tests, in QEMU's order (every held permission first, then every
 * unshared one), whether another open file description holds a byte
 * that conflicts with holding @perm while sharing @shared.
 */
static int check_lock_bytes(int fd, unsigned perm, unsigned shared,
                            vd_error *err)
{
    short held;
    int ret;

    for (int i = 0; i < PERM_COUNT; i++) {
        if (!(perm & (1u << i))) {
            continue;
        }
        ret = lock_byte(fd, F_OFD_GETLK, F_WRLCK, LOCK_SHARED_BASE + i,
                        &held);
        if (ret < 0) {
            return ret;
        }
        if (held != F_UNLCK) {
            return vd_error_set(err, -EBUSY, "Failed to get \"%s\" lock",
                                perm_names[i]);
        }
    }
    for (int i = 0; i < PERM_COUNT; i++) {
        if (shared & (1u << i)) {
            continue;
        }
        ret = lock_byte(fd, F_OFD_GETLK, F_WRLCK, LOCK_PERM_BASE + i, &held);
        if (ret < 0) {
            return ret;
        }
        if (held != F_UNLCK) {
            return vd_error_set(err, -EBUSY,
                                "Failed to get shared \"%s\" lock",
                                perm_names[i]);
        }
    }
    return 0;
}

static void lock_hint(vd_error *err, const char *filename)
{
    if (err && !err->hint[0]) {
        snprintf(err->hint, sizeof(err->hint),
                 "Is another process using the image [%s]?", filename);
    }
}

/*
 * Takes the bytes for @perm/@shared in addition to what @s holds (or
 * exactly them with @exact) and tests for conflicts. A filesystem
 * without OFD locks turns locking off under locking=auto and is an
 * error under locking=on. On failure the bytes are back to what @s
 * held before.
 */
static int lock_perms(vd_node *node, file_state *s, unsigned perm,
                      unsigned shared, vd_error *err)
{
    const char *filename = node->filename;
    const unsigned unshared = ~shared & VD_PERM_ALL;
    int failed = 0, ret;

    /* Nothing more than the committed bytes, which were checked when
     * taken and held since: no other process can have taken a
     * conflicting byte meanwhile (its own check would have failed), so
     * there is nothing to lock or test (QEMU's raw_check_perm() skips
     * the same way). */
    if (!(perm & ~s->locked_perm) && !(unshared & ~s->locked_unshared) &&
        s->held_perm == s->locked_perm &&
        s->held_unshared == s->locked_unshared) {
        return 0;
    }
    ret = apply_lock_bytes(s->fd, &s->held_perm, &s->held_unshared,
                           s->locked_perm | perm,
                           s->locked_unshared | unshared, false, &failed);
    if (ret == -EAGAIN || ret == -EACCES) {
        /* A write lock on a byte QEMU only locks shared. */
        ret = vd_error_set(err, -EBUSY, "Failed to lock byte %d", failed);
    } else if (ret < 0) {
        if (s->lock_auto) {
            s->use_lock = false;
            return 0;
        }
        return vd_error_set_errno(err, ret, "Failed to lock byte %d",
                                  failed);
    } else {
        ret = check_lock_bytes(s->fd, perm, shared, err);
        if (ret < 0 && ret != -EBUSY) {
            ret = vd_error_set_errno(err, ret, "Failed to lock '%s'",
                                     filename);
        }
        if (ret < 0) {
            lock_hint(err, filename);
        }
    }
    if (ret < 0) {
        apply_lock_bytes(s->fd, &s->held_perm, &s->held_unshared,
                         s->locked_perm, s->locked_unshared, true, &failed);
    }
    return ret;
}

static int file_check_perm(vd_node *node, unsigned perm, unsigned shared,
                           vd_error *err)
{
    file_state *s = node->opaque;

    if (!s->use_lock || s->fd < 0) {
        return 0;
    }
    return lock_perms(node, s, perm, shared, err);
}

/* Commit and abort cannot fail: dropping a shared lock always works. */
static void file_set_perm(vd_node *node, unsigned perm, unsigned shared)
{
    file_state *s = node->opaque;
    int failed;

    if (!s->use_lock || s->fd < 0) {
        return;
    }
    s->locked_perm = perm;
    s->locked_unshared = ~shared & VD_PERM_ALL;
    apply_lock_bytes(s->fd, &s->held_perm, &s->held_unshared,
                     s->locked_perm, s->locked_unshared, true, &failed);
}

static void file_abort_perm(vd_node *node)
{
    file_state *s = node->opaque;
    int failed;

    if (!s->use_lock || s->fd < 0) {
        return;
    }
    apply_lock_bytes(s->fd, &s->held_perm, &s->held_unshared,
                     s->locked_perm, s->locked_unshared, true, &failed);
}

/* ---------------------------------------------------------------- */
/* Open and close                                                   */
/* ---------------------------------------------------------------- */

static size_t host_max_align(void)
{
    long page = sysconf(_SC_PAGESIZE);

    return page > FILE_MAX_BLOCKSIZE ? (size_t)page : FILE_MAX_BLOCKSIZE;
}

/* An O_DIRECT read of @len bytes into @buf at 0 tells whether that
 * alignment works: only EINVAL means it does not. */
static bool io_aligned(int fd, void *buf, size_t len)
{
    ssize_t n;

    do {
        n = pread(fd, buf, len, 0);
    } while (n < 0 && errno == EINTR);
    return n >= 0 || errno != EINVAL;
}

/* Whether @fd's file system keeps its files in memory (tmpfs, ramfs). */
static bool file_is_in_memory(int fd)
{
    struct statfs st;

    return fstatfs(fd, &st) == 0 &&
           (st.f_type == TMPFS_MAGIC || st.f_type == RAMFS_MAGIC);
}

/*
 * Finds the request and buffer alignment O_DIRECT needs. Block devices
 * report their logical block size; for files we try reads of growing
 * alignment, as QEMU does. A 1-byte read that "works" proves nothing
 * (an empty file reads nothing), so that case falls back to the safe
 * maximum.
 */
static int file_probe_alignment(vd_node *node, file_state *s, vd_error *err)
{
    static const size_t aligns[] = { 1, 512, 1024, 2048, 4096 };
    size_t max_align = host_max_align();
    uint32_t req_align = 0, buf_align = 0;
    void *buf;

    if (!s->direct) {
        node->bl.request_alignment = 1;
        node->bl.min_mem_alignment = 1;
        return 0;
    }

    if (s->is_blockdev) {
        int sector = 0;

        if (ioctl(s->fd, BLKSSZGET, &sector) == 0 && sector > 0 &&
            sector <= 65536) {
            req_align = buf_align = (uint32_t)sector;
        }
    }

    buf = aligned_alloc(max_align, 2 * max_align);
    if (!buf) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory",
                            node->filename);
    }
    for (size_t i = 0; !req_align && i < sizeof(aligns) / sizeof(aligns[0]);
         i++) {
        if (io_aligned(s->fd, buf, aligns[i])) {
            req_align = aligns[i] != 1 ? aligns[i] : max_align;
        }
    }
    for (size_t i = 0; !buf_align && i < sizeof(aligns) / sizeof(aligns[0]);
         i++) {
        if (io_aligned(s->fd, (char *)buf + aligns[i], max_align)) {
            buf_align = aligns[i] != 1 ? aligns[i] : max_align;
        }
    }
    free(buf);

    if (!req_align || !buf_align) {
        return vd_error_set(err, -EINVAL,
                            "Could not find working O_DIRECT alignment for "
                            "'%s' (try cache.direct=off)", node->filename);
    }
    node->bl.request_alignment = req_align;
    node->bl.min_mem_alignment = buf_align;
    return 0;
}

/* The filename without the driver's optional prefix ("file:",
 * "host_device:", "host_cdrom:"), as QEMU's parse_filename. */
static const char *strip_prefix(const vd_driver *drv, const char *filename)
{
    size_t n = strlen(drv->protocol_name);

    if (strncmp(filename, drv->protocol_name, n) == 0 && filename[n] == ':') {
        return filename + n + 1;
    }
    return filename;
}

static bool is_device_driver(const vd_driver *drv)
{
    return drv != &vd_driver_file;
}

static int file_open(vd_node *node, vd_opts *opts, unsigned flags,
                     vd_error *err)
{
    file_state *s = node->opaque;
    bool rdwr = (flags & VD_NODE_RDWR) && !node->read_only;
    int locking, aio, oflags, ret;
    char *fname_opt;
    const char *filename;
    struct stat st;

    s->fd = -1;
    /* A new descriptor holds no lock byte (a reopen's old one keeps its
     * own until closed). */
    s->locked_perm = s->locked_unshared = 0;
    s->held_perm = s->held_unshared = 0;

    /* The core normally sets node->filename; blockdev-style opens may
     * still carry the name as an option. */
    fname_opt = vd_opts_take(opts, "filename");
    if (!node->filename && fname_opt) {
        node->filename = fname_opt;
        fname_opt = NULL;
    }
    free(fname_opt);
    if (!node->filename || !node->filename[0]) {
        return vd_error_set(err, -EINVAL,
                            "The 'file' block driver requires a file name");
    }
    filename = strip_prefix(node->drv, node->filename);
    if (filename != node->filename) {
        /* QEMU names the node without the prefix. */
        char *bare = strdup(filename);
        if (!bare) {
            return vd_error_set(err, -ENOMEM, "Out of memory");
        }
        free(node->filename);
        node->filename = bare;
        filename = bare;
    }

    ret = vd_opts_take_enum(opts, "locking", locking_choices, LOCKING_AUTO,
                            &locking, err);
    if (ret < 0) {
        return ret;
    }
    /* Every aio mode is synchronous for the caller: aio=io_uring issues
     * each request through the calling thread's own ring (uring_rw()),
     * the others as preadv/pwritev in that thread. */
    ret = vd_opts_take_enum(opts, "aio", aio_choices, AIO_THREADS, &aio,
                            err);
    if (ret < 0) {
        return ret;
    }
    /* As QEMU's file-posix: native AIO is only asked for with O_DIRECT
     * (it would block on the page cache otherwise), and the refusal is
     * kept so that command lines fail here as they fail there. */
    if (aio == AIO_NATIVE && !(flags & VD_NODE_NOCACHE)) {
        return vd_error_set(err, -EINVAL, "aio=native was specified, but it "
                            "requires cache.direct=on, which was not "
                            "specified.");
    }

    /* O_NONBLOCK so that a FIFO given as an image fails the type check
     * below instead of blocking the open until a writer appears; it is
     * cleared again once the file is known to be regular. */
    oflags = (rdwr ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NONBLOCK;
    if (flags & VD_NODE_NOCACHE) {
        oflags |= O_DIRECT;
        s->direct = true;
    }
    do {
        s->fd = open(filename, oflags);
    } while (s->fd < 0 && errno == EINTR);
    if (s->fd < 0) {
        int e = errno;

        /* The API reports a writable open of a file we may only read as
         * -EROFS; the text stays QEMU's. */
        if (rdwr && (e == EACCES || e == EROFS) &&
            access(filename, R_OK) == 0) {
            return vd_error_set(err, -EROFS, "Could not open '%s': %s",
                                filename, strerror(e));
        }
        return vd_error_set_errno(err, -e, "Could not open '%s'", filename);
    }

    pthread_mutex_init(&s->write_lock, NULL);

    if (fstat(s->fd, &st) < 0) {
        ret = vd_error_set_errno(err, -errno, "Could not stat '%s'",
                                 filename);
        goto fail;
    }
    /* As QEMU's raw_open_common(): "file" takes regular files only,
     * host_device and host_cdrom devices only. */
    if (is_device_driver(node->drv)) {
        if (!S_ISBLK(st.st_mode) && !S_ISCHR(st.st_mode)) {
            ret = vd_error_set(err, -EINVAL, "'%s' driver requires '%s' to "
                               "be either a character or block device",
                               node->drv->name, node->filename);
            goto fail;
        }
        s->is_blockdev = true;
    } else if (!S_ISREG(st.st_mode)) {
        ret = vd_error_set(err, -EINVAL,
                           "'file' driver requires '%s' to be a regular file",
                           node->filename);
        goto fail;
    }
    s->serialize_writes = !s->is_blockdev && !s->direct;
    s->use_uring = aio == AIO_IO_URING;
    if (fcntl(s->fd, F_SETFL, fcntl(s->fd, F_GETFL) & ~O_NONBLOCK) < 0) {
        ret = vd_error_set_errno(err, -errno, "Could not open '%s'",
                                 filename);
        goto fail;
    }

    /* The lock bytes follow the node's permissions (check_perm and
     * friends). A node opened again (reopen) takes back what its edges
     * hold right away; a new node holds nothing until the graph gives
     * it edges. */
    s->use_lock = locking != LOCKING_OFF;
    s->lock_auto = locking == LOCKING_AUTO;
    if (s->use_lock && (node->perm || node->shared != VD_PERM_ALL)) {
        ret = lock_perms(node, s, node->perm, node->shared, err);
        if (ret < 0) {
            goto fail;
        }
        s->locked_perm = node->perm;
        s->locked_unshared = ~node->shared & VD_PERM_ALL;
    }

    ret = file_probe_alignment(node, s, err);
    if (ret < 0) {
        goto fail;
    }
    node->bl.max_transfer = 0;
    node->bl.memory_backed = file_is_in_memory(s->fd);
    atomic_init(&s->has_zero_range, !s->is_blockdev);
    atomic_init(&s->has_punch_hole, !s->is_blockdev);
    atomic_init(&s->has_fallocate, !s->is_blockdev);
    return 0;

fail:
    pthread_mutex_destroy(&s->write_lock);
    close(s->fd);
    s->fd = -1;
    return ret;
}

static void file_close(vd_node *node)
{
    file_state *s = node->opaque;

    if (s->fd >= 0) {
        pthread_mutex_destroy(&s->write_lock);
        close(s->fd);   /* also drops the OFD locks */
        s->fd = -1;
        s->held_perm = s->held_unshared = 0;
    }
}

/* ---------------------------------------------------------------- */
/* Requests                                                         */
/* ---------------------------------------------------------------- */

/*
 * aio=io_uring. The request path stays synchronous (docs/concurrency.md):
 * each thread that issues a request owns a small ring, made on its
 * first request and closed when the thread exits, and waits in it for
 * that request alone. So there is no completion thread and no lock:
 * a ring is only ever touched by its thread, which is what
 * IORING_SETUP_SINGLE_ISSUER promises the kernel, and with
 * IORING_SETUP_DEFER_TASKRUN the completion work runs in that thread's
 * wait rather than interrupting it. One ring serves every file node the
 * thread uses.
 *
 * Whenever a ring cannot be had - liburing missing at build time,
 * io_uring_setup refused at run time (a seccomp filter, a kernel
 * without io_uring, kernel.io_uring_disabled) - the request goes
 * through preadv/pwritev instead, which moves the same bytes; a refusal
 * with ENOSYS, EPERM or EACCES is remembered for the whole process.
 */
#ifdef VDISK_HAVE_LIBURING

/* Entries per ring: one request at a time, a few to spare. */
#define URING_ENTRIES 4

typedef struct uring_slot {
    struct io_uring ring;
    unsigned gen;           /* uring_gen when made */
} uring_slot;

static pthread_once_t uring_once = PTHREAD_ONCE_INIT;
static pthread_key_t uring_key;
static bool uring_key_ok;
static atomic_bool uring_refused;
/* Bumped in a child after fork(): a ring made before it is the
 * parent's too (same mapped queues), so the child makes its own. */
static atomic_uint uring_gen;
static __thread uring_slot *uring_mine;
static __thread bool uring_failed;    /* this thread's setup failed */

static void uring_slot_free(void *p)
{
    uring_slot *u = p;

    io_uring_queue_exit(&u->ring);
    free(u);
}

/* The key's destructor, in the exiting thread: a later destructor that
 * does I/O must not find the freed ring (nor make one to leak). */
static void uring_thread_exit(void *p)
{
    uring_mine = NULL;
    uring_failed = true;
    uring_slot_free(p);
}

static void uring_after_fork(void)
{
    atomic_fetch_add(&uring_gen, 1);
}

static void uring_init_once(void)
{
    uring_key_ok = pthread_key_create(&uring_key, uring_thread_exit) == 0;
    pthread_atfork(NULL, NULL, uring_after_fork);
}

/* Closes the calling thread's ring; its later requests use the system
 * calls. */
static void uring_drop(void)
{
    if (uring_mine) {
        pthread_setspecific(uring_key, NULL);
        uring_slot_free(uring_mine);
        uring_mine = NULL;
    }
    uring_failed = true;
}

/* The calling thread's ring, or NULL when requests must use the system
 * calls instead. */
static struct io_uring *uring_get(void)
{
    uring_slot *u = uring_mine;
    int ret;

    if (u && u->gen == atomic_load_explicit(&uring_gen,
                                            memory_order_relaxed)) {
        return &u->ring;
    }
    if (u) {
        /* Made before a fork: unmapping it here leaves the parent's. */
        pthread_setspecific(uring_key, NULL);
        uring_slot_free(u);
        uring_mine = NULL;
    }
    if (uring_failed || atomic_load_explicit(&uring_refused,
                                             memory_order_relaxed)) {
        return NULL;
    }
    pthread_once(&uring_once, uring_init_once);
    u = uring_key_ok ? calloc(1, sizeof(*u)) : NULL;
    if (!u) {
        uring_failed = true;
        return NULL;
    }
    ret = io_uring_queue_init(URING_ENTRIES, &u->ring,
                              IORING_SETUP_SINGLE_ISSUER |
                              IORING_SETUP_DEFER_TASKRUN);
    if (ret == -EINVAL) {
        /* A kernel before 6.1 has neither flag. */
        ret = io_uring_queue_init(URING_ENTRIES, &u->ring, 0);
    }
    if (ret < 0) {
        free(u);
        uring_failed = true;
        if (ret == -ENOSYS || ret == -EPERM || ret == -EACCES) {
            atomic_store(&uring_refused, true);
        }
        return NULL;
    }
    u->gen = atomic_load(&uring_gen);
    if (pthread_setspecific(uring_key, u) != 0) {
        uring_slot_free(u);
        uring_failed = true;
        return NULL;
    }
    uring_mine = u;
    return &u->ring;
}

/*
 * One preadv/pwritev through @ring: the bytes moved or a negative errno,
 * as the system call would return them (the caller loops on short
 * transfers and EINTR). -ENOTSUP when the ring cannot take it, so the
 * caller uses the system call.
 */
static ssize_t uring_rw(struct io_uring *ring, int fd, bool write,
                        const struct iovec *iov, int niov, off_t off)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    struct io_uring_cqe *cqe;
    ssize_t res;
    int ret;

    if (!sqe) {
        return -ENOTSUP;        /* cannot happen: one request at a time */
    }
    if (write) {
        io_uring_prep_writev(sqe, fd, iov, (unsigned)niov, (uint64_t)off);
    } else {
        io_uring_prep_readv(sqe, fd, iov, (unsigned)niov, (uint64_t)off);
    }
    for (;;) {
        ret = io_uring_submit_and_wait(ring, 1);
        if (ret >= 0 || io_uring_sq_ready(ring) == 0) {
            break;              /* submitted, maybe not yet complete */
        }
        if (ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
            /* Never sent: this thread gives its ring up and the request
             * (and the thread's later ones) go to the system call. */
            uring_drop();
            return -ENOTSUP;
        }
    }
    do {
        ret = io_uring_wait_cqe(ring, &cqe);
    } while (ret == -EINTR || ret == -EAGAIN);
    if (ret < 0) {
        /* Sent, and its completion cannot be waited for (no known
         * cause but a signal, handled above): an I/O error. */
        return ret;
    }
    res = cqe->res;
    io_uring_cqe_seen(ring, cqe);
    return res;
}

#endif /* VDISK_HAVE_LIBURING */

/* One positioned transfer of the request path, through the thread's
 * ring under aio=io_uring when it has one, else a system call. */
static ssize_t file_sys_rw(file_state *s, bool write, const struct iovec *iov,
                           int niov, off_t off)
{
    ssize_t n;

#ifdef VDISK_HAVE_LIBURING
    if (s->use_uring) {
        struct io_uring *ring = uring_get();

        if (ring) {
            n = uring_rw(ring, s->fd, write, iov, niov, off);
            if (n != -ENOTSUP) {
                return n;
            }
        }
    }
#endif
    n = write ? pwritev(s->fd, iov, niov, off) : preadv(s->fd, iov, niov, off);
    return n < 0 ? -errno : n;
}

/*
 * Transfers [off, off+bytes) between the file and @qiov, retrying on
 * EINTR and short transfers. Returns the bytes moved (less than @bytes
 * only when a read hits the end of the file) or a negative errno.
 */
static int64_t file_rw(file_state *s, bool write, vd_iov *qiov,
                       uint64_t off, uint64_t bytes, uint32_t align)
{
    uint64_t done = 0;

    while (done < bytes) {
        vd_iov rest;
        struct iovec *iov = qiov->iov;
        int niov = qiov->niov;
        ssize_t n;

        if (done > 0) {
            if (vd_iov_init_slice(&rest, qiov, done, bytes - done) < 0) {
                return -ENOMEM;
            }
            iov = rest.iov;
            niov = rest.niov;
        }
        if (niov > IOV_MAX) {
            niov = IOV_MAX;
        }
        n = file_sys_rw(s, write, iov, niov, (off_t)(off + done));
        if (done > 0) {
            vd_iov_destroy(&rest);
        }

        if (n == -EINTR) {
            continue;
        }
        if (n < 0) {
            return n;
        }
        if (n == 0) {
            if (write) {
                return -ENOSPC;
            }
            break;
        }
        done += (uint64_t)n;
        /* With O_DIRECT a short read that stops off the alignment can
         * only be the end of the file; reading on would fail with
         * EINVAL rather than return 0. */
        if (!write && s->direct && done < bytes && align > 1 &&
            (done % align) != 0) {
            break;
        }
    }
    return (int64_t)done;
}

static int file_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                       vd_iov *qiov, unsigned flags, vd_error *err)
{
    file_state *s = node->opaque;
    int64_t n;

    (void)flags;
    n = file_rw(s, false, qiov, off, bytes, node->bl.request_alignment);
    if (n < 0) {
        return vd_error_set_errno(err, (int)n,
                                  "%s: read of %" PRIu64 " bytes at offset "
                                  "%" PRIu64 " failed", node->filename,
                                  bytes, off);
    }
    if ((uint64_t)n < bytes) {
        /* Past the end of the file everything reads as zeros. */
        vd_iov_memset(qiov, (size_t)n, 0, (size_t)(bytes - (uint64_t)n));
    }
    return 0;
}

static int file_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                        vd_iov *qiov, unsigned flags, vd_error *err)
{
    file_state *s = node->opaque;
    int64_t n;

    if (s->serialize_writes) {
        pthread_mutex_lock(&s->write_lock);
    }
    n = file_rw(s, true, qiov, off, bytes, node->bl.request_alignment);
    if (s->serialize_writes) {
        pthread_mutex_unlock(&s->write_lock);
    }
    if (n < 0) {
        return vd_error_set_errno(err, (int)n,
                                  "%s: write of %" PRIu64 " bytes at offset "
                                  "%" PRIu64 " failed", node->filename,
                                  bytes, off);
    }
    if ((flags & VD_REQ_FUA) && fdatasync(s->fd) < 0) {
        return vd_error_set_errno(err, -errno, "%s: fdatasync failed",
                                  node->filename);
    }
    return 0;
}

/* Copy offloading: the source side only hands the request to the
 * destination, which holds the other descriptor. */
static int file_copy_range_from(vd_node *node, uint64_t soff, vd_node *dst,
                                uint64_t doff, uint64_t bytes, unsigned flags,
                                vd_error *err)
{
    return vd_node_copy_range_to(node, soff, dst, doff, bytes, flags, err);
}

/* copy_file_range(2) between two files, as QEMU's file-posix: no
 * progress (the source ends early) or an error ends the offload, and
 * the caller copies what is left itself. */
static int file_copy_range_to(vd_node *node, vd_node *src, uint64_t soff,
                              uint64_t doff, uint64_t bytes, unsigned flags,
                              vd_error *err)
{
    file_state *s = node->opaque, *ss;
    loff_t in = (loff_t)soff, out = (loff_t)doff;

    (void)flags;
    if (src->drv != node->drv) {
        return -ENOTSUP;
    }
    ss = src->opaque;
    while (bytes > 0) {
        ssize_t n = copy_file_range(ss->fd, &in, s->fd, &out, bytes, 0);

        if (n == 0) {
            return -ENOTSUP;
        }
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == ENOSYS || errno == EXDEV || errno == EOPNOTSUPP ||
                errno == EINVAL) {
                return -ENOTSUP;
            }
            return vd_error_set_errno(err, -errno, "%s: copy of %" PRIu64
                                      " bytes at offset %" PRIu64 " failed",
                                      node->filename, bytes, (uint64_t)out);
        }
        bytes -= (uint64_t)n;
    }
    return 0;
}

static int do_fallocate(int fd, int mode, uint64_t off, uint64_t len)
{
    int ret;

    do {
        ret = fallocate(fd, mode, (off_t)off, (off_t)len);
    } while (ret < 0 && errno == EINTR);
    if (ret == 0) {
        return 0;
    }
    return errno == EOPNOTSUPP ? -ENOTSUP : -errno;
}

static int64_t file_size(file_state *s)
{
    struct stat st;
    off_t end;

    if (!s->is_blockdev) {
        if (fstat(s->fd, &st) < 0) {
            return -errno;
        }
        return st.st_size;
    }
    {
        uint64_t size;

        if (ioctl(s->fd, BLKGETSIZE64, &size) == 0 && size <= INT64_MAX) {
            return (int64_t)size;
        }
    }
    end = lseek(s->fd, 0, SEEK_END);
    return end < 0 ? -errno : end;
}

/* Block devices: BLKZEROOUT writes zeros without a buffer. */
static int blockdev_zeroes(file_state *s, uint64_t off, uint64_t bytes)
{
    uint64_t range[2] = { off, bytes };

    if (ioctl(s->fd, BLKZEROOUT, range) == 0) {
        return 0;
    }
    return (errno == EOPNOTSUPP || errno == ENOTTY || errno == EINVAL)
           ? -ENOTSUP : -errno;
}

/*
 * Zeroes a range without a data buffer, in QEMU's order of preference:
 * punch a hole when unmapping is allowed, else FALLOC_FL_ZERO_RANGE,
 * else punch a hole and allocate it again, else (past the end only)
 * plain fallocate. -ENOTSUP makes the core write a zero buffer.
 */
static int file_pwrite_zeroes(vd_node *node, uint64_t off, uint64_t bytes,
                              unsigned flags, vd_error *err)
{
    file_state *s = node->opaque;
    int64_t size;
    int ret;

    if (s->is_blockdev) {
        ret = blockdev_zeroes(s, off, bytes);
        goto out;
    }

    if ((flags & VD_REQ_MAY_UNMAP) && atomic_load(&s->has_punch_hole)) {
        size = file_size(s);
        if (size < 0) {
            ret = (int)size;
            goto out;
        }
        ret = 0;
        if (off < (uint64_t)size) {
            uint64_t in_file = (uint64_t)size - off < bytes
                               ? (uint64_t)size - off : bytes;

            ret = do_fallocate(s->fd,
                               FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                               off, in_file);
        }
        /* Writes below the top node may extend the file; the extension
         * is a hole, which reads as zeros. */
        if (ret == 0 && off + bytes > (uint64_t)size &&
            ftruncate(s->fd, (off_t)(off + bytes)) < 0) {
            ret = -errno;
        }
        if (ret != -ENOTSUP) {
            goto out;
        }
        atomic_store(&s->has_punch_hole, false);
    }

    if (atomic_load(&s->has_zero_range)) {
        ret = do_fallocate(s->fd, FALLOC_FL_ZERO_RANGE, off, bytes);
        if (ret == -ENOTSUP) {
            atomic_store(&s->has_zero_range, false);
        } else if (ret != -EINVAL) {
            /* Some filesystems reject unaligned ranges with EINVAL
             * although they should not; the fallbacks may still work. */
            goto out;
        }
    }

    if (atomic_load(&s->has_punch_hole) && atomic_load(&s->has_fallocate)) {
        ret = do_fallocate(s->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           off, bytes);
        if (ret == 0) {
            ret = do_fallocate(s->fd, 0, off, bytes);
            if (ret != -ENOTSUP) {
                goto out;
            }
            atomic_store(&s->has_fallocate, false);
        } else if (ret == -ENOTSUP) {
            atomic_store(&s->has_punch_hole, false);
        } else if (ret != -EINVAL) {
            goto out;
        }
    }

    size = file_size(s);
    if (atomic_load(&s->has_fallocate) && size >= 0 &&
        off >= (uint64_t)size) {
        ret = do_fallocate(s->fd, 0, off, bytes);
        if (ret != -ENOTSUP) {
            goto out;
        }
        atomic_store(&s->has_fallocate, false);
    }
    ret = -ENOTSUP;

out:
    if (ret < 0 && ret != -ENOTSUP) {
        return vd_error_set_errno(err, ret,
                                  "%s: zeroing %" PRIu64 " bytes at offset "
                                  "%" PRIu64 " failed", node->filename,
                                  bytes, off);
    }
    return ret;
}

static int file_pdiscard(vd_node *node, uint64_t off, uint64_t bytes,
                         vd_error *err)
{
    file_state *s = node->opaque;
    int ret;

    if (s->is_blockdev) {
        uint64_t range[2] = { off, bytes };

        if (ioctl(s->fd, BLKDISCARD, range) == 0) {
            return 0;
        }
        ret = (errno == EOPNOTSUPP || errno == ENOTTY) ? -ENOTSUP : -errno;
    } else if (!atomic_load(&s->has_punch_hole)) {
        return -ENOTSUP;
    } else {
        ret = do_fallocate(s->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           off, bytes);
        if (ret == -ENOTSUP) {
            atomic_store(&s->has_punch_hole, false);
        }
    }
    if (ret < 0 && ret != -ENOTSUP) {
        return vd_error_set_errno(err, ret,
                                  "%s: discard of %" PRIu64 " bytes at "
                                  "offset %" PRIu64 " failed",
                                  node->filename, bytes, off);
    }
    return ret;
}

static int file_flush(vd_node *node, vd_error *err)
{
    file_state *s = node->opaque;

    if (node->flags & VD_NODE_NO_FLUSH) {
        return 0;
    }
    if (fdatasync(s->fd) < 0) {
        return vd_error_set_errno(err, -errno, "%s: fdatasync failed",
                                  node->filename);
    }
    return 0;
}

/* WRITEBACK queues the range's dirty pages for writing and returns: the
 * flush that must come (fdatasync) then mostly waits for writes already
 * under way; under cache=unsafe nothing is pushed, as nothing is
 * flushed. DONTNEED drops the range's clean pages from the page cache
 * (dirty ones only start their writeback), so that memory goes back to
 * the pages being written instead of growing the cache. A failure is no
 * error: nothing depends on either. */
static void file_advise(vd_node *node, uint64_t off, uint64_t bytes,
                        vd_advice advice)
{
    file_state *s = node->opaque;
    /* Both calls take 0 for "to the end of the file". */
    off64_t len = off > (uint64_t)INT64_MAX ? -1
                  : bytes > (uint64_t)INT64_MAX - off ? 0
                  : (off64_t)bytes;

    if (len < 0) {
        return;
    }
    switch (advice) {
    case VD_ADVISE_WRITEBACK:
        if (!(node->flags & VD_NODE_NO_FLUSH)) {
            (void)sync_file_range(s->fd, (off64_t)off, len,
                                  SYNC_FILE_RANGE_WRITE);
        }
        break;
    case VD_ADVISE_DONTNEED:
        (void)posix_fadvise(s->fd, (off_t)off, (off_t)len,
                            POSIX_FADV_DONTNEED);
        break;
    }
}

/*
 * Finds the extent around @start with SEEK_DATA/SEEK_HOLE: on success
 * either *data == start (data up to *hole) or *hole == start (a hole up
 * to *data). -ENXIO means @start is in the trailing hole or past EOF.
 */
static int find_allocation(int fd, off_t start, off_t *data, off_t *hole)
{
    off_t d, h;

    d = lseek(fd, start, SEEK_DATA);
    if (d < 0) {
        return -errno;
    }
    if (d < start) {
        return -EIO;        /* the filesystem is confused */
    }
    if (d > start) {
        *hole = start;
        *data = d;
        return 0;
    }
    h = lseek(fd, start, SEEK_HOLE);
    if (h < 0) {
        return -errno;
    }
    if (h <= start) {
        /* Data appeared and vanished between the two calls (a discard
         * racing with us): let the caller treat it as data. */
        return -EBUSY;
    }
    *data = start;
    *hole = h;
    return 0;
}

static int file_block_status(vd_node *node, bool want_zero, uint64_t off,
                             uint64_t bytes, uint64_t *pnum, uint64_t *map,
                             vd_node **file, vd_error *err)
{
    file_state *s = node->opaque;
    const int base = VD_BLOCK_OFFSET_VALID | VD_BLOCK_ALLOCATED;
    uint32_t align = node->bl.request_alignment ? node->bl.request_alignment
                                                : 1;
    off_t data = 0, hole = 0;
    int ret, flags;
    uint64_t n;

    (void)err;
    *map = off;
    *file = node;
    if (!want_zero || off > INT64_MAX) {
        *pnum = bytes;
        return VD_BLOCK_DATA | base;
    }

    ret = find_allocation(s->fd, (off_t)off, &data, &hole);
    if (ret == -ENXIO) {
        n = bytes;
        flags = VD_BLOCK_ZERO;
    } else if (ret < 0) {
        /* No information (e.g. a block device): no holes, then. */
        n = bytes;
        flags = VD_BLOCK_DATA;
    } else if ((uint64_t)data == off) {
        n = (uint64_t)hole - off;
        /* A data extent ends off the alignment only at EOF; the partial
         * block it leaves is data too, as far as requests can tell. */
        if (n % align) {
            n += align - n % align;
        }
        flags = VD_BLOCK_DATA;
    } else {
        n = (uint64_t)data - off;
        /* Holes start and end on filesystem blocks, but a caller with a
         * coarser alignment must not see a partial block as zero. */
        if (n >= align) {
            n -= n % align;
        } else {
            n = align;
            flags = VD_BLOCK_DATA;
            goto done;
        }
        flags = VD_BLOCK_ZERO;
    }
done:
    *pnum = n < bytes ? n : bytes;
    if (*pnum == 0) {
        *pnum = bytes;
    }
    return flags | base;
}

/* ---------------------------------------------------------------- */
/* Size                                                             */
/* ---------------------------------------------------------------- */

static int64_t file_getlength(vd_node *node)
{
    return file_size(node->opaque);
}

static int64_t file_get_allocated_size(vd_node *node)
{
    file_state *s = node->opaque;
    struct stat st;

    if (fstat(s->fd, &st) < 0) {
        return -errno;
    }
    return (int64_t)st.st_blocks * 512;
}

/*
 * Writes zeros over the first block of a new image. Later O_DIRECT
 * alignment probing reads at offset 0; on a hole (or a file that was
 * fallocated) unaligned reads succeed and would mislead it. Failure does
 * not matter.
 */
static void allocate_first_block(int fd, uint64_t size)
{
    size_t len = size < FILE_MAX_BLOCKSIZE ? 512 : FILE_MAX_BLOCKSIZE;
    void *buf = aligned_alloc(host_max_align(), host_max_align());
    ssize_t n;

    if (!buf) {
        return;
    }
    memset(buf, 0, len);
    do {
        n = pwrite(fd, buf, len, 0);
    } while (n < 0 && errno == EINTR);
    free(buf);
}

static const char *prealloc_name(vd_prealloc p)
{
    return (unsigned)p < 4 ? prealloc_choices[p] : "unknown";
}

/* Writes zeros over [from, to) for preallocation=full. */
static int write_zeros(int fd, uint64_t from, uint64_t to)
{
    void *buf = aligned_alloc(host_max_align(), FILE_ZERO_CHUNK);

    if (!buf) {
        return -ENOMEM;
    }
    memset(buf, 0, FILE_ZERO_CHUNK);
    while (from < to) {
        size_t len = to - from < FILE_ZERO_CHUNK ? (size_t)(to - from)
                                                 : FILE_ZERO_CHUNK;
        ssize_t n = pwrite(fd, buf, len, (off_t)from);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            int ret = n < 0 ? -errno : -ENOSPC;

            free(buf);
            return ret;
        }
        from += (uint64_t)n;
    }
    free(buf);
    return 0;
}

/*
 * Resizes a regular file to @size, preallocating the new part as QEMU's
 * handle_aiocb_truncate() does. Shrinking is allowed (the core asks for
 * --shrink), but not with preallocation.
 */
static int regular_truncate(int fd, uint64_t size, vd_prealloc prealloc,
                            const char *filename, vd_error *err)
{
    struct stat st;
    uint64_t cur;
    int ret;

    if (size > INT64_MAX) {
        return vd_error_set(err, -EFBIG, "%s: size %" PRIu64 " is too large",
                            filename, size);
    }
    if (fstat(fd, &st) < 0) {
        return vd_error_set_errno(err, -errno, "%s: Could not stat file",
                                  filename);
    }
    cur = (uint64_t)st.st_size;
    if (cur > size && prealloc != VD_PREALLOC_OFF) {
        return vd_error_set(err, -ENOTSUP,
                            "%s: Cannot use preallocation for shrinking files",
                            filename);
    }

    switch (prealloc) {
    case VD_PREALLOC_OFF:
        if (ftruncate(fd, (off_t)size) < 0) {
            return vd_error_set_errno(err, -errno,
                                      "%s: Could not resize file", filename);
        }
        if (cur == 0 && size > 0) {
            allocate_first_block(fd, size);
        }
        return 0;

    case VD_PREALLOC_FALLOC:
        if (size == cur) {
            return 0;
        }
        /* posix_fallocate returns the error instead of setting errno */
        ret = posix_fallocate(fd, (off_t)cur, (off_t)(size - cur));
        if (ret != 0) {
            return vd_error_set_errno(err, -ret,
                                      "%s: Could not preallocate new data",
                                      filename);
        }
        if (cur == 0) {
            allocate_first_block(fd, size);
        }
        return 0;

    case VD_PREALLOC_FULL:
        /* Setting the final size first lets the filesystem allocate the
         * extent in one go. */
        if (ftruncate(fd, (off_t)size) < 0) {
            return vd_error_set_errno(err, -errno,
                                      "%s: Could not resize file", filename);
        }
        ret = write_zeros(fd, cur, size);
        if (ret < 0) {
            return vd_error_set_errno(err, ret,
                                      "%s: Could not write zeros for "
                                      "preallocation", filename);
        }
        if (fsync(fd) < 0) {
            return vd_error_set_errno(err, -errno,
                                      "%s: Could not flush file to disk",
                                      filename);
        }
        return 0;

    default:
        return vd_error_set(err, -ENOTSUP,
                            "%s: Unsupported preallocation mode: %s",
                            filename, prealloc_name(prealloc));
    }
}

static int file_truncate(vd_node *node, uint64_t size, bool exact,
                         vd_prealloc prealloc, vd_error *err)
{
    file_state *s = node->opaque;
    int64_t cur;

    if (!s->is_blockdev) {
        return regular_truncate(s->fd, size, prealloc, node->filename, err);
    }

    /* A device has the size it has: only "shrinking" into it works. */
    if (prealloc != VD_PREALLOC_OFF) {
        return vd_error_set(err, -ENOTSUP,
                            "%s: Preallocation mode '%s' unsupported for this "
                            "non-regular file", node->filename,
                            prealloc_name(prealloc));
    }
    cur = file_size(s);
    if (cur < 0) {
        return vd_error_set_errno(err, (int)cur, "%s: Could not get size",
                                  node->filename);
    }
    if (size != (uint64_t)cur && exact) {
        return vd_error_set(err, -ENOTSUP, "%s: Cannot resize device files",
                            node->filename);
    }
    if (size > (uint64_t)cur) {
        return vd_error_set(err, -EINVAL, "%s: Cannot grow device files",
                            node->filename);
    }
    return 0;
}

/* ---------------------------------------------------------------- */
/* Create                                                           */
/* ---------------------------------------------------------------- */

/* Listed in QEMU's order, which is the order "Formatting ..." shows. */
static const vd_create_option file_create_opts[] = {
    { "size", "size", "Virtual disk size", NULL },
    { "nocow", "bool", "Turn off copy-on-write (valid only on btrfs)", NULL },
    { "preallocation", "string",
      "Preallocation mode (allowed values: off, falloc, full)", NULL },
    { "extent_size_hint", "size",
      "Extent size hint for the image file, 0 to disable", NULL },
    { NULL, NULL, NULL, NULL },
};

/* Best effort, as in QEMU: btrfs honours it, other filesystems refuse. */
static void set_nocow(int fd)
{
    int attr;

    if (ioctl(fd, FS_IOC_GETFLAGS, &attr) == 0) {
        attr |= FS_NOCOW_FL;
        (void)ioctl(fd, FS_IOC_SETFLAGS, &attr);
    }
}

/* XFS uses the hint to allocate in large extents; a warning only when
 * the user asked for a hint explicitly. */
static void set_extent_size_hint(int fd, uint32_t hint, bool explicit,
                                 const char *filename)
{
    struct fsxattr attr;
    int ret = ioctl(fd, FS_IOC_FSGETXATTR, &attr);

    if (ret == 0) {
        attr.fsx_xflags |= FS_XFLAG_EXTSIZE;
        attr.fsx_extsize = hint;
        ret = ioctl(fd, FS_IOC_FSSETXATTR, &attr);
    }
    if (ret < 0 && explicit && hint) {
        vd_warn("%s: Failed to set extent size hint: %s", filename,
                strerror(errno));
    }
}

static int file_create(const char *filename, vd_opts *opts, vd_error *err)
{
    uint64_t size, hint;
    bool nocow, hint_given;
    int prealloc, fd, ret;

    filename = strip_prefix(&vd_driver_file, filename);
    if (!vd_opts_get(opts, "size")) {
        return vd_error_set(err, -EINVAL, "%s: Parameter 'size' is required",
                            filename);
    }
    ret = vd_opts_take_size(opts, "size", 0, &size, err);
    if (ret < 0) {
        return ret;
    }
    ret = vd_opts_take_bool(opts, "nocow", false, &nocow, err);
    if (ret < 0) {
        return ret;
    }
    ret = vd_opts_take_enum(opts, "preallocation", prealloc_choices,
                            VD_PREALLOC_OFF, &prealloc, err);
    if (ret < 0) {
        return ret;
    }
    hint_given = vd_opts_get(opts, "extent_size_hint") != NULL;
    ret = vd_opts_take_size(opts, "extent_size_hint", 1024 * 1024, &hint,
                            err);
    if (ret < 0) {
        return ret;
    }
    if (hint > UINT32_MAX) {
        return vd_error_set(err, -EINVAL, "%s: Extent size hint is too large",
                            filename);
    }
    /* qemu-img creates whole sectors: size=1000 makes a 1024-byte file.
     * qemu rounds in an int64, so from 2^63-511 on ftruncate() gets a
     * negative length and fails with EINVAL. */
    if (size > INT64_MAX - 511) {
        return vd_error_set(err, -EINVAL, "%s: Could not resize file: %s",
                            filename, strerror(EINVAL));
    }
    size = (size + 511) & ~(uint64_t)511;

    do {
        fd = open(filename, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        return vd_error_set_errno(err, -errno, "Could not create '%s'",
                                  filename);
    }

    /* Do not clobber an image that another process has open: take
     * write and resize and let nobody else resize, as QEMU's create. */
    {
        const unsigned perm = VD_PERM_WRITE | VD_PERM_RESIZE;
        const unsigned shared = VD_PERM_ALL & ~VD_PERM_RESIZE;
        unsigned held_perm = 0, held_unshared = 0;
        int failed;

        ret = apply_lock_bytes(fd, &held_perm, &held_unshared, perm,
                               ~shared & VD_PERM_ALL, false, &failed);
        if (ret == -EAGAIN || ret == -EACCES) {
            ret = vd_error_set(err, -EBUSY, "Failed to lock byte %d",
                               failed);
            goto out;
        }
        if (ret == 0) {
            ret = check_lock_bytes(fd, perm, shared, err);
            if (ret == -EBUSY) {
                lock_hint(err, filename);
                goto out;
            }
        }
        /* A filesystem without OFD locks: nothing to protect with. */
        ret = 0;
    }

    if (ftruncate(fd, 0) < 0) {
        ret = vd_error_set_errno(err, -errno, "%s: Could not clear file",
                                 filename);
        goto out;
    }
    if (nocow) {
        set_nocow(fd);
    }
    if (hint) {
        set_extent_size_hint(fd, (uint32_t)hint, hint_given, filename);
    }
    ret = regular_truncate(fd, size, (vd_prealloc)prealloc, filename, err);

out:
    if (close(fd) < 0 && ret == 0) {
        ret = vd_error_set_errno(err, -errno, "%s: Could not close file",
                                 filename);
    }
    return ret;
}

/* file-posix's BlockStatsSpecificFile: the discards that reached the
 * file, which are the node's own unmap counts. */
static int file_get_driver_stats(vd_node *node, vd_driver_stats *out)
{
    vd_stats s;

    vd_get_stats(node, &s);
    out->discard_nb_ok = s.unmap_operations - s.failed_unmap_operations;
    out->discard_nb_failed = s.failed_unmap_operations;
    out->discard_bytes_ok = s.unmap_bytes;
    return 0;
}

/* ---------------------------------------------------------------- */
/* Host devices                                                     */
/* ---------------------------------------------------------------- */

/* QEMU's hdev_probe_device(): devices are host_device's, and a name
 * under /dev/cdrom goes half-way towards it (host_cdrom may claim it). */
static int hdev_probe_device(const char *filename)
{
    struct stat st;

    filename = strip_prefix(&vd_driver_host_device, filename);
    if (strncmp(filename, "/dev/cdrom", 10) == 0) {
        return 50;
    }
    if (stat(filename, &st) == 0 &&
        (S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode))) {
        return 100;
    }
    return 0;
}

/* QEMU's cdrom_probe_device(): a device that answers the CD-ROM drive
 * status request. */
static int cdrom_probe_device(const char *filename)
{
    struct stat st;
    int fd, ret = 0;

    filename = strip_prefix(&vd_driver_host_cdrom, filename);
    if (stat(filename, &st) < 0 || !S_ISBLK(st.st_mode)) {
        return 0;
    }
    fd = open(filename, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        return 0;
    }
    if (ioctl(fd, CDROM_DRIVE_STATUS, CDSL_CURRENT) >= 0) {
        ret = 100;
    }
    close(fd);
    return ret;
}

/*
 * "Creating" an image on a device, as QEMU's bdrv_co_create_opts_simple()
 * does for host_device: no preallocation, the device must be at least
 * as large as asked (it cannot grow), and its first sector is zeroed so
 * that nothing probes as a format that was there before.
 */
static int hdev_create(const char *filename, vd_opts *opts, vd_error *err)
{
    uint64_t size;
    struct stat st;
    off_t end;
    int fd, ret, prealloc;

    filename = strip_prefix(&vd_driver_host_device, filename);
    ret = vd_opts_take_size(opts, "size", 0, &size, err);
    if (ret < 0) {
        return ret;
    }
    ret = vd_opts_take_enum(opts, "preallocation", prealloc_choices,
                            VD_PREALLOC_OFF, &prealloc, err);
    if (ret < 0) {
        return ret;
    }
    if (prealloc != VD_PREALLOC_OFF) {
        return vd_error_set(err, -ENOTSUP, "Unsupported preallocation mode "
                            "'%s'", prealloc_choices[prealloc]);
    }
    /* What the regular file's creation takes means nothing here. */
    vd_opts_del(opts, "nocow");
    vd_opts_del(opts, "extent_size_hint");
    do {
        fd = open(filename, O_RDWR | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        return vd_error_set_errno(err, -errno, "Protocol driver "
                                  "'host_device' does not support image "
                                  "creation, and opening the image failed: "
                                  "Could not open '%s'", filename);
    }
    if (fstat(fd, &st) < 0 || (!S_ISBLK(st.st_mode) &&
                               !S_ISCHR(st.st_mode))) {
        ret = vd_error_set(err, -EINVAL, "Protocol driver 'host_device' "
                           "does not support image creation, and opening "
                           "the image failed: 'host_device' driver requires "
                           "'%s' to be either a character or block device",
                           filename);
    } else if ((end = lseek(fd, 0, SEEK_END)) < 0) {
        ret = vd_error_set_errno(err, -errno, "Failed to inquire the new "
                                 "image file's length");
    } else if ((uint64_t)end < size) {
        ret = vd_error_set(err, -EINVAL, "Cannot grow device files");
    } else if (end > 0) {
        static const uint8_t zero[512];
        size_t len = end < 512 ? (size_t)end : 512;
        ssize_t n;
        do {
            n = pwrite(fd, zero, len, 0);
        } while (n < 0 && errno == EINTR);
        if (n != (ssize_t)len) {
            ret = vd_error_set_errno(err, n < 0 ? -errno : -EIO,
                                     "Failed to clear the new image's first "
                                     "sector");
        } else if (fdatasync(fd) < 0) {
            ret = vd_error_set_errno(err, -errno, "Failed to clear the new "
                                     "image's first sector");
        }
    }
    close(fd);
    return ret;
}

/* What the file and device drivers share: everything but the name,
 * the prefix, device probing and creation. */
#define POSIX_DRIVER_COMMON                                               \
    .instance_size = sizeof(file_state),                                  \
    .info_self = true,  /* qemu's file-posix answers bdrv_get_info() */   \
    .get_driver_stats = file_get_driver_stats,                            \
    .open = file_open,                                                    \
    .close = file_close,                                                  \
    .preadv = file_preadv,                                                \
    .pwritev = file_pwritev,                                              \
    .pwrite_zeroes = file_pwrite_zeroes,                                  \
    .pdiscard = file_pdiscard,                                            \
    .copy_range_from = file_copy_range_from,                              \
    .copy_range_to = file_copy_range_to,                                  \
    .flush = file_flush,                                                  \
    .advise = file_advise,                                                \
    .block_status = file_block_status,                                    \
    .getlength = file_getlength,                                          \
    .get_allocated_size = file_get_allocated_size,                        \
    .truncate = file_truncate,                                            \
    .check_perm = file_check_perm,                                        \
    .set_perm = file_set_perm,                                            \
    .abort_perm = file_abort_perm

const vd_driver vd_driver_file = {
    .name = "file",
    .grows_ahead = true,
    .protocol_name = "file",
    .create_opts = file_create_opts,
    .create = file_create,
    POSIX_DRIVER_COMMON,
};

/* The same driver under QEMU's names for devices: host_device for
 * block (and character) devices, host_cdrom for CD-ROM drives. */
const vd_driver vd_driver_host_device = {
    .name = "host_device",
    .protocol_name = "host_device",
    .probe_device = hdev_probe_device,
    .create_opts = file_create_opts,
    .create = hdev_create,
    POSIX_DRIVER_COMMON,
};

const vd_driver vd_driver_host_cdrom = {
    .name = "host_cdrom",
    .protocol_name = "host_cdrom",
    .probe_device = cdrom_probe_device,
    POSIX_DRIVER_COMMON,
};
