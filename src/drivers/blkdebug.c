/*
 * The "blkdebug" filter: error and crash injection for tests, after
 * QEMU's blkdebug and SQLite's crash simulator. It sits between a format
 * driver and its file (driver=qcow2,file.driver=blkdebug,
 * file.filename=IMG,file.OPTION=...) and passes every request through,
 * except as its options say:
 *
 *   fail-write=N      the N-th write (counting writes, zero-writes and
 *                     discards from 1) fails with errno (once)
 *   fail-flush=N      the N-th flush fails with errno (once)
 *   errno=E           the errno of injected failures: EIO (default),
 *                     ENOSPC or EPERM
 *   crash-write=N     power loss right after the N-th write reached the
 *                     disk: later writes never reach it
 *   crash-action=A    what the writer sees after the crash: "drop"
 *                     (default: writes and flushes succeed but are
 *                     thrown away, a disk that lies) or "fail" (every
 *                     request fails with EIO, so that the writer can tell
 *                     which of its flushes completed before the crash)
 *   crash-unflushed=U what happens at the crash to the writes since the
 *                     last completed flush: "keep" (default: they all
 *                     reached the disk, in order), "drop" (the disk's
 *                     volatile cache loses them all) or "random" (each
 *                     is lost or kept, chosen by crash-seed)
 *   crash-seed=S      seed for crash-unflushed=random
 *   stats=on          print "blkdebug: W writes, F flushes" to stderr
 *                     when the node closes (to size a crash-point loop)
 *   inject-error.N.*  QEMU's error rules (BlkdebugInjectErrorOptions):
 *                     a request of type iotype (read, write,
 *                     write-zeroes, discard, flush, block-status;
 *                     absent: all but block-status) that covers the
 *                     first byte of sector S (any request without
 *                     "sector") fails with errno E (default 5, EIO),
 *                     every time or "once". "event" must be
 *                     "read_aio": the rule becomes active with the first
 *                     read (QEMU's formats send read_aio with their data
 *                     reads), so block status and writes before it pass.
 *                     "immediately" is accepted and ignored; "state" and
 *                     other events are not supported.
 *   image.*           QEMU's name for the child, accepted as file.*
 *
 * Organisation: options and open, then the write path. Dropping
 * unflushed writes needs their old contents: each write first reads what
 * it overwrites into an undo log, which a completed flush empties and
 * the crash replays backwards (skipping entries when "random" says so).
 * The log is bounded (BLKDEBUG_UNDO_MAX bytes); writes beyond it are
 * treated as kept. Counting, the undo log and the crash are serialised by
 * one mutex, so the N-th write is well defined even with many threads;
 * this filter is for tests, not for speed.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/block_int.h"

#define BLKDEBUG_UNDO_MAX (256u << 20)

enum { CRASH_DROP, CRASH_FAIL };
enum { UNFLUSHED_KEEP, UNFLUSHED_DROP, UNFLUSHED_RANDOM };

typedef struct undo_entry {
    uint64_t off;
    uint64_t len;
    uint8_t *old;     /* the bytes before the write (len of them) */
    uint64_t old_len; /* bytes of @old inside the file then; the rest
                         lay past its end */
    struct undo_entry *prev;
} undo_entry;

/* QEMU's BlkdebugIOType, in its order. */
enum { IO_READ, IO_WRITE, IO_WRITE_ZEROES, IO_DISCARD, IO_FLUSH,
       IO_BLOCK_STATUS };
static const char *const iotype_names[] = {
    "read", "write", "write-zeroes", "discard", "flush", "block-status",
    NULL,
};
#define MAX_RULES 64

typedef struct inject_rule {
    unsigned iotype_mask;
    int64_t offset;     /* first byte of the sector, -1: any request */
    int error;          /* positive errno */
    bool once;
    bool used;          /* a "once" rule that fired */
} inject_rule;

/* The rules are active once a read has passed (QEMU's read_aio). */

typedef struct blkdebug_state {
    pthread_mutex_t lock;
    uint64_t writes, flushes;
    uint64_t fail_write, fail_flush, crash_write, seed;
    int fail_errno;
    int crash_action, crash_unflushed;
    bool stats;
    bool crashed;
    bool track_undo;          /* crash-unflushed is not "keep" */
    inject_rule rules[MAX_RULES];
    int nb_rules;
    bool rules_active;
    undo_entry *undo;         /* newest first */
    uint64_t undo_bytes;
    bool undo_overflow;
} blkdebug_state;

static const char *const action_names[] = { "drop", "fail", NULL };
static const char *const unflushed_names[] = { "keep", "drop", "random",
                                               NULL };
static const char *const errno_names[] = { "EIO", "ENOSPC", "EPERM", NULL };
static const int errno_values[] = { EIO, ENOSPC, EPERM };

static void undo_clear(blkdebug_state *s)
{
    while (s->undo) {
        undo_entry *e = s->undo;
        s->undo = e->prev;
        free(e->old);
        free(e);
    }
    s->undo_bytes = 0;
    s->undo_overflow = false;
}

/* Reads inject-error.N.* into the rules. */
static int parse_rules(blkdebug_state *s, vd_opts *opts, vd_error *err)
{
    for (int i = 0; i < MAX_RULES; i++) {
        char prefix[32];
        vd_opts *r;
        inject_rule *rule = &s->rules[s->nb_rules];
        uint64_t errnum, sector;
        bool b;
        int type, ret;
        char *v;

        snprintf(prefix, sizeof(prefix), "inject-error.%d.", i);
        r = vd_opts_extract_prefix(opts, prefix);
        if (!r) {
            return vd_error_set(err, -ENOMEM, "blkdebug: out of memory");
        }
        if (!vd_opts_count(r)) {
            vd_opts_free(&r);
            break;
        }
        memset(rule, 0, sizeof(*rule));
        rule->iotype_mask = (1u << IO_READ) | (1u << IO_WRITE) |
                            (1u << IO_WRITE_ZEROES) | (1u << IO_DISCARD) |
                            (1u << IO_FLUSH);
        v = vd_opts_take(r, "iotype");
        if (v) {
            vd_opts_set(r, "iotype", v);
            free(v);
            if ((ret = vd_opts_take_enum(r, "iotype", iotype_names, 0, &type,
                                         err)) < 0) {
                vd_opts_free(&r);
                return ret;
            }
            rule->iotype_mask = 1u << type;
        }
        if ((ret = vd_opts_take_uint(r, "errno", EIO, &errnum, err)) < 0 ||
            (ret = vd_opts_take_uint(r, "sector", UINT64_MAX, &sector,
                                     err)) < 0 ||
            (ret = vd_opts_take_bool(r, "once", false, &rule->once,
                                     err)) < 0 ||
            (ret = vd_opts_take_bool(r, "immediately", false, &b,
                                     err)) < 0) {
            vd_opts_free(&r);
            return ret;
        }
        v = vd_opts_take(r, "event");
        if (!v || strcmp(v, "read_aio")) {
            ret = vd_error_set(err, -EINVAL, "blkdebug: inject-error.%d: "
                               "event '%s' is not supported (only "
                               "read_aio)", i, v ? v : "");
            free(v);
            vd_opts_free(&r);
            return ret;
        }
        free(v);
        if (vd_opts_count(r)) {
            const char *k, *val;
            vd_opts_nth(r, 0, &k, &val);
            ret = vd_error_set(err, -EINVAL, "blkdebug: inject-error "
                               "option '%s' is not supported", k);
            vd_opts_free(&r);
            return ret;
        }
        vd_opts_free(&r);
        if (errnum == 0 || errnum > 4095 || (sector != UINT64_MAX &&
                                             sector > INT64_MAX / 512)) {
            return vd_error_set(err, -EINVAL, "blkdebug: inject-error.%d "
                                "has an invalid errno or sector", i);
        }
        rule->error = (int)errnum;
        rule->offset = sector == UINT64_MAX ? -1 : (int64_t)(sector * 512);
        s->nb_rules++;
    }
    return 0;
}

/* QEMU's rule_check(): the error of the first rule for @type whose
 * sector's first byte [off, off+bytes) covers (or that has no sector),
 * 0 when none. */
static int rule_check(vd_node *node, int type, uint64_t off, uint64_t bytes,
                      vd_error *err)
{
    blkdebug_state *s = node->opaque;
    int error = 0;

    if (!s->nb_rules) {
        return 0;
    }
    pthread_mutex_lock(&s->lock);
    if (type == IO_READ) {
        s->rules_active = true;
    }
    for (int i = 0; s->rules_active && i < s->nb_rules; i++) {
        inject_rule *r = &s->rules[i];
        if (r->used || !(r->iotype_mask & (1u << type)) ||
            (r->offset >= 0 && !(bytes && (uint64_t)r->offset >= off &&
                                 (uint64_t)r->offset < off + bytes))) {
            continue;
        }
        error = r->error;
        r->used = r->once;
        break;
    }
    pthread_mutex_unlock(&s->lock);
    /* As QEMU's, the request just fails: no message of its own. */
    (void)err;
    return -error;
}

static int blkdebug_open(vd_node *node, vd_opts *opts, unsigned flags,
                         vd_error *err)
{
    blkdebug_state *s = node->opaque;
    int idx, ret;

    (void)flags;
    if (!node->file) {
        return vd_error_set(err, -EINVAL, "blkdebug: no image given");
    }
    pthread_mutex_init(&s->lock, NULL);
    if ((ret = vd_opts_take_uint(opts, "fail-write", 0, &s->fail_write,
                                 err)) < 0 ||
        (ret = vd_opts_take_uint(opts, "fail-flush", 0, &s->fail_flush,
                                 err)) < 0 ||
        (ret = vd_opts_take_uint(opts, "crash-write", 0, &s->crash_write,
                                 err)) < 0 ||
        (ret = vd_opts_take_uint(opts, "crash-seed", 1, &s->seed, err)) < 0 ||
        (ret = vd_opts_take_bool(opts, "stats", false, &s->stats, err)) < 0) {
        return ret;
    }
    if ((ret = vd_opts_take_enum(opts, "errno", errno_names, 0, &idx,
                                 err)) < 0) {
        return ret;
    }
    s->fail_errno = errno_values[idx];
    if ((ret = vd_opts_take_enum(opts, "crash-action", action_names,
                                 CRASH_DROP, &s->crash_action, err)) < 0 ||
        (ret = vd_opts_take_enum(opts, "crash-unflushed", unflushed_names,
                                 UNFLUSHED_KEEP, &s->crash_unflushed,
                                 err)) < 0) {
        return ret;
    }
    if ((ret = parse_rules(s, opts, err)) < 0) {
        return ret;
    }
    s->track_undo = s->crash_write && s->crash_unflushed != UNFLUSHED_KEEP;
    node->bl.request_alignment = node->file->node->bl.request_alignment;
    node->bl.min_mem_alignment = node->file->node->bl.min_mem_alignment;
    return 0;
}

static void blkdebug_close(vd_node *node)
{
    blkdebug_state *s = node->opaque;

    if (s->stats) {
        fprintf(stderr, "blkdebug: %llu writes, %llu flushes\n",
                (unsigned long long)s->writes,
                (unsigned long long)s->flushes);
    }
    undo_clear(s);
    pthread_mutex_destroy(&s->lock);
}

static void blkdebug_refresh_limits(vd_node *node)
{
    if (node->file) {
        node->bl.request_alignment = node->file->node->bl.request_alignment;
        node->bl.min_mem_alignment = node->file->node->bl.min_mem_alignment;
    }
}

/* ---- the crash ---- */

static uint64_t next_random(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

/* Puts back the old contents of unflushed writes, newest first, as the
 * crash-unflushed option says. Lock held. */
static void crash_now(vd_node *node, blkdebug_state *s)
{
    uint64_t rnd = s->seed ? s->seed : 1;

    s->crashed = true;
    for (undo_entry *e = s->undo; e; e = e->prev) {
        if (s->crash_unflushed == UNFLUSHED_RANDOM &&
            (next_random(&rnd) & 1)) {
            continue;
        }
        if (e->old_len) {
            vd_child_pwrite(node->file, e->off, e->old, e->old_len, 0, NULL);
        }
        /* What lay past the end of the file then reads as zeros again
         * (the file keeps its new length: a grown inode is harmless). */
        if (e->old_len < e->len) {
            vd_node_pwrite_zeroes(node->file->node, e->off + e->old_len,
                                  e->len - e->old_len, 0, NULL);
        }
    }
    undo_clear(s);
}

/* Records what [off, off+len) holds before a write. Lock held. */
static void undo_record(vd_node *node, blkdebug_state *s, uint64_t off,
                        uint64_t len)
{
    int64_t flen = vd_node_getlength(node->file->node);
    undo_entry *e;

    if (s->undo_overflow || s->undo_bytes + len > BLKDEBUG_UNDO_MAX) {
        s->undo_overflow = true;
        return;
    }
    e = calloc(1, sizeof(*e));
    if (!e || !(e->old = malloc(len ? len : 1))) {
        free(e);
        s->undo_overflow = true;
        return;
    }
    e->off = off;
    e->len = len;
    if (flen > 0 && off < (uint64_t)flen) {
        e->old_len = (uint64_t)flen - off < len ? (uint64_t)flen - off : len;
        if (vd_child_pread(node->file, off, e->old, e->old_len, NULL) < 0) {
            free(e->old);
            free(e);
            s->undo_overflow = true;
            return;
        }
    }
    e->prev = s->undo;
    s->undo = e;
    s->undo_bytes += len;
}

/*
 * Common part of every modifying request: counts it, injects a failure
 * or the crash. Returns 1 when the request should go to the file, 0 when
 * it is silently dropped, or a negative errno. Lock held.
 */
static int write_gate(vd_node *node, blkdebug_state *s, uint64_t off,
                      uint64_t len, vd_error *err)
{
    uint64_t n;

    if (s->crashed) {
        return s->crash_action == CRASH_FAIL
            ? vd_error_set(err, -EIO, "%s: blkdebug: write after the "
                           "simulated crash", node->filename)
            : 0;
    }
    n = ++s->writes;
    if (s->fail_write && n == s->fail_write) {
        return vd_error_set(err, -s->fail_errno, "%s: blkdebug: injected "
                            "failure of write %llu", node->filename,
                            (unsigned long long)n);
    }
    if (s->track_undo) {
        undo_record(node, s, off, len);
    }
    return 1;
}

/* After the N-th write reached the file: the power goes. Lock held. */
static void after_write(vd_node *node, blkdebug_state *s)
{
    if (s->crash_write && !s->crashed && s->writes >= s->crash_write) {
        crash_now(node, s);
    }
}

static int blkdebug_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                           vd_iov *qiov, unsigned flags, vd_error *err)
{
    blkdebug_state *s = node->opaque;

    int ret;

    if (s->crashed && s->crash_action == CRASH_FAIL) {
        return vd_error_set(err, -EIO, "%s: blkdebug: read after the "
                            "simulated crash", node->filename);
    }
    if ((ret = rule_check(node, IO_READ, off, bytes, err)) < 0) {
        return ret;
    }
    return vd_node_preadv(node->file->node, off, bytes, qiov, flags, err);
}

static int blkdebug_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                            vd_iov *qiov, unsigned flags, vd_error *err)
{
    blkdebug_state *s = node->opaque;
    int ret = rule_check(node, IO_WRITE, off, bytes, err);

    if (ret < 0) {
        return ret;
    }
    pthread_mutex_lock(&s->lock);
    ret = write_gate(node, s, off, bytes, err);
    if (ret > 0) {
        ret = vd_node_pwritev(node->file->node, off, bytes, qiov, flags,
                              err);
        after_write(node, s);
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

static int blkdebug_pwrite_zeroes(vd_node *node, uint64_t off,
                                  uint64_t bytes, unsigned flags,
                                  vd_error *err)
{
    blkdebug_state *s = node->opaque;
    int ret = rule_check(node, IO_WRITE_ZEROES, off, bytes, err);

    if (ret < 0) {
        return ret;
    }
    pthread_mutex_lock(&s->lock);
    ret = write_gate(node, s, off, bytes, err);
    if (ret > 0) {
        ret = vd_node_pwrite_zeroes(node->file->node, off, bytes, flags,
                                    err);
        after_write(node, s);
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

static int blkdebug_pdiscard(vd_node *node, uint64_t off, uint64_t bytes,
                             vd_error *err)
{
    blkdebug_state *s = node->opaque;
    int ret = rule_check(node, IO_DISCARD, off, bytes, err);

    if (ret < 0) {
        return ret;
    }
    pthread_mutex_lock(&s->lock);
    ret = write_gate(node, s, off, bytes, err);
    if (ret > 0) {
        ret = vd_node_pdiscard(node->file->node, off, bytes, err);
        after_write(node, s);
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

/* The core flushes the file after this callback; the undo log can go
 * only once that flush is done, which a later request cannot tell apart
 * from this point, so the filter flushes the file itself first. */
static int blkdebug_flush(vd_node *node, vd_error *err)
{
    blkdebug_state *s = node->opaque;
    int ret = rule_check(node, IO_FLUSH, 0, 0, err);

    if (ret < 0) {
        return ret;
    }

    pthread_mutex_lock(&s->lock);
    if (s->crashed) {
        ret = s->crash_action == CRASH_FAIL
            ? vd_error_set(err, -EIO, "%s: blkdebug: flush after the "
                           "simulated crash", node->filename)
            : 0;
        goto out;
    }
    s->flushes++;
    if (s->fail_flush && s->flushes == s->fail_flush) {
        ret = vd_error_set(err, -s->fail_errno, "%s: blkdebug: injected "
                           "failure of flush %llu", node->filename,
                           (unsigned long long)s->flushes);
        goto out;
    }
    ret = vd_node_flush(node->file->node, err);
    if (ret == 0) {
        undo_clear(s);
    }
out:
    pthread_mutex_unlock(&s->lock);
    return ret;
}

static int blkdebug_block_status(vd_node *node, bool want_zero, uint64_t off,
                                 uint64_t bytes, uint64_t *pnum,
                                 uint64_t *map, vd_node **file, vd_error *err)
{
    int ret = rule_check(node, IO_BLOCK_STATUS, off, bytes, err);

    if (ret < 0) {
        return ret;
    }
    return vd_block_status_from_file(node, want_zero, off, bytes, pnum, map,
                                     file, err);
}

static int64_t blkdebug_getlength(vd_node *node)
{
    return vd_node_getlength(node->file->node);
}

static int blkdebug_truncate(vd_node *node, uint64_t size, bool exact,
                             vd_prealloc prealloc, vd_error *err)
{
    blkdebug_state *s = node->opaque;
    int ret;

    pthread_mutex_lock(&s->lock);
    ret = write_gate(node, s, size, 0, err);
    if (ret > 0) {
        ret = vd_node_truncate(node->file->node, size, exact, prealloc, err);
        after_write(node, s);
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

const vd_driver vd_driver_blkdebug = {
    .name = "blkdebug",
    .instance_size = sizeof(blkdebug_state),
    .is_filter = true,
    .file_alias = "image",
    .open = blkdebug_open,
    .close = blkdebug_close,
    .preadv = blkdebug_preadv,
    .pwritev = blkdebug_pwritev,
    .pwrite_zeroes = blkdebug_pwrite_zeroes,
    .pdiscard = blkdebug_pdiscard,
    .flush = blkdebug_flush,
    .block_status = blkdebug_block_status,
    .getlength = blkdebug_getlength,
    .truncate = blkdebug_truncate,
    .refresh_limits = blkdebug_refresh_limits,
};
