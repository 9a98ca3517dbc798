/*
 * The "blkdebug" filter: error injection for tests, with QEMU 7.2's
 * interface (block/blkdebug.c), and vdisk's own crash simulator beside
 * it.
 *
 * QEMU's interface. The node sits on a child "image" (a filename
 * "blkdebug:CONFIG:IMAGE", the option x-image or filename, or image.*
 * options) and reads rules from a config file ("config", INI sections
 * [inject-error] and [set-state] with `key = "value"` lines, parsed as
 * QEMU's qemu_config_parse()) and from options (inject-error.N.event,
 * ..., or one unnumbered section inject-error.event, ...). A rule names
 * an event (QEMU's BlkdebugEvent, raised by the qcow2 driver and the
 * request path through vd_node_debug_event(), src/core/debug.c) and
 * optionally a state it applies in (the node starts in state 1):
 *
 *   inject-error  when the event is raised, the rule becomes active:
 *                 from then on requests of its iotype (default read,
 *                 write, write-zeroes, discard, flush) that touch its
 *                 sector (default any) fail with its errno (default
 *                 EIO), until another event activates other rules;
 *                 once=on makes it fail one request and vanish
 *   set-state     when the event is raised, the node's state becomes
 *                 new_state (effective after all rules of the event)
 *   breakpoints   set by vd_debug_breakpoint(): the request that raises
 *                 the event waits until the tag is resumed
 *
 * align, max-transfer, opt-write-zero, max-write-zero, opt-discard and
 * max-discard override the node's limits, checked with QEMU's messages;
 * take-child-perms and unshare-child-perms adjust what the node asks of
 * its child. The event "none" is raised once when the node opens.
 *
 * vdisk's crash simulator (tests/cli/qcow2-crash-points.sh and others):
 *
 *   fail-write=N      the N-th write (counting writes, zero-writes and
 *                     discards from 1) fails with errno (once)
 *   fail-flush=N      the N-th flush fails with errno (once)
 *   errno=E           the errno of those failures: EIO (default),
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
 *
 * Dropping unflushed writes needs their old contents: each write first
 * reads what it overwrites into an undo log, which a completed flush
 * empties and the crash replays backwards (skipping entries when
 * "random" says so). The log is bounded (BLKDEBUG_UNDO_MAX bytes); writes
 * beyond it are treated as kept.
 *
 * Organisation: the crash simulator, the rules (parsing, events,
 * breakpoints), then the request callbacks and the vtable. Locking: the
 * rules, active rules and suspended requests are guarded by rule_lock
 * (never held across I/O, so a breakpoint's waiter does not block the
 * others); the crash simulator's counting, undo log and crash by
 * crash_lock, held across the write it counts so that the N-th write is
 * well defined with many threads (this filter is for tests, not speed).
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/block_int.h"
#include "core/opts.h"

#define BLKDEBUG_UNDO_MAX (256u << 20)

enum { CRASH_DROP, CRASH_FAIL };
enum { UNFLUSHED_KEEP, UNFLUSHED_DROP, UNFLUSHED_RANDOM };

/* QEMU's BlkdebugIOType, in its order. */
enum {
    IO_READ, IO_WRITE, IO_WRITE_ZEROES, IO_DISCARD, IO_FLUSH,
    IO_BLOCK_STATUS, IO__MAX
};
static const char *const iotype_names[] = {
    "read", "write", "write-zeroes", "discard", "flush", "block-status",
    NULL
};
#define IO_DEFAULT_MASK ((1u << IO_READ) | (1u << IO_WRITE) |              \
                         (1u << IO_WRITE_ZEROES) | (1u << IO_DISCARD) |    \
                         (1u << IO_FLUSH))

enum { ACTION_INJECT_ERROR, ACTION_SET_STATE, ACTION_SUSPEND };

typedef struct rule {
    int event;
    int action;
    int state;              /* 0: any */
    /* inject-error */
    unsigned iotype_mask;
    int error;
    bool once;
    int64_t offset;         /* -1: any */
    /* set-state */
    int new_state;
    /* suspend */
    char *tag;
    struct rule *next;      /* in rules[event], newest first */
    struct rule *active_next;
    bool active;
} rule;

/* A request stopped at a breakpoint. */
typedef struct suspended {
    char *tag;
    bool resumed;
    struct suspended *next;
} suspended;

typedef struct undo_entry {
    uint64_t off;
    uint64_t len;
    uint8_t *old;     /* the bytes before the write (len of them) */
    uint64_t old_len; /* bytes of @old inside the file then; the rest
                         lay past its end */
    struct undo_entry *prev;
} undo_entry;

typedef struct blkdebug_state {
    /* QEMU's interface */
    pthread_mutex_t rule_lock;
    pthread_cond_t resume_cond;
    int state;
    rule *rules[VD_BLKDBG__MAX];
    rule *active;             /* active inject-error rules, in order */
    suspended *suspended;
    int draining;             /* drains in progress: no suspending */
    uint64_t align, max_transfer, opt_write_zero, max_write_zero;
    uint64_t opt_discard, max_discard;
    unsigned take_perms, unshare_perms;
    char *config_file;

    /* the crash simulator */
    pthread_mutex_t crash_lock;
    uint64_t writes, flushes;
    uint64_t fail_write, fail_flush, crash_write, seed;
    int fail_errno;
    int crash_action, crash_unflushed;
    bool stats;
    bool crashed;
    bool track_undo;          /* crash-unflushed is not "keep" */
    undo_entry *undo;         /* newest first */
    uint64_t undo_bytes;
    bool undo_overflow;
    bool opened;              /* the locks exist (close after open) */
} blkdebug_state;

static const char *const action_names[] = { "drop", "fail", NULL };
static const char *const unflushed_names[] = { "keep", "drop", "random",
                                               NULL };
static const char *const errno_names[] = { "EIO", "ENOSPC", "EPERM", NULL };
static const int errno_values[] = { EIO, ENOSPC, EPERM };

/* ------------------------------------------------------------------ */
/* The crash simulator                                                */
/* ------------------------------------------------------------------ */

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

static uint64_t next_random(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

/* Puts back the old contents of unflushed writes, newest first, as the
 * crash-unflushed option says. crash_lock held. */
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

/* Records what [off, off+len) holds before a write. crash_lock held. */
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
 * it is silently dropped, or a negative errno. crash_lock held.
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

/* After the N-th write reached the file: the power goes. crash_lock
 * held. */
static void after_write(vd_node *node, blkdebug_state *s)
{
    if (s->crash_write && !s->crashed && s->writes >= s->crash_write) {
        crash_now(node, s);
    }
}

static int crash_open(blkdebug_state *s, vd_opts *opts, vd_error *err)
{
    int idx, ret;

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
    s->track_undo = s->crash_write && s->crash_unflushed != UNFLUSHED_KEEP;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Rules: what the config file and the options say                    */
/* ------------------------------------------------------------------ */

/* One [inject-error] or [set-state] section, its values parsed as
 * QEMU's QemuOpts parse them when they are set (numbers and booleans
 * are checked there; the event name later, when the rule is made). */
typedef struct section {
    int action;
    char *event, *iotype;
    uint64_t state, errno_, sector, new_state;
    bool once;
    struct section *next;
} section;

typedef struct section_list {
    section *head, **tail;
} section_list;

static void sections_free(section_list *l)
{
    while (l->head) {
        section *sec = l->head;
        l->head = sec->next;
        free(sec->event);
        free(sec->iotype);
        free(sec);
    }
    l->tail = &l->head;
}

/* QEMU's parse_option_number(): strtoull's syntax, whole string. */
static int parse_number(const char *name, const char *v, uint64_t *out,
                        vd_error *err)
{
    char *end;

    errno = 0;
    *out = strtoull(v, &end, 0);
    if (errno == ERANGE) {
        return vd_error_set(err, -EINVAL, "Value '%s' is too large for "
                            "parameter '%s'", v, name);
    }
    if (end == v || *end) {
        return vd_error_set(err, -EINVAL, "Parameter '%s' expects a number",
                            name);
    }
    return 0;
}

static section *section_new(int action)
{
    section *sec = calloc(1, sizeof(*sec));

    if (sec) {
        sec->action = action;
        sec->state = 0;
        sec->errno_ = EIO;
        sec->sector = UINT64_MAX;   /* -1: any */
    }
    return sec;
}

/* Sets @key of @sec to @v; -ENOENT when the group has no such key. */
static int section_set(section *sec, const char *key, const char *v,
                       vd_error *err)
{
    bool inject = sec->action == ACTION_INJECT_ERROR;
    char **str = NULL;
    uint64_t *num = NULL;

    if (strcmp(key, "event") == 0) {
        str = &sec->event;
    } else if (strcmp(key, "state") == 0) {
        num = &sec->state;
    } else if (inject && strcmp(key, "iotype") == 0) {
        str = &sec->iotype;
    } else if (inject && strcmp(key, "errno") == 0) {
        num = &sec->errno_;
    } else if (inject && strcmp(key, "sector") == 0) {
        num = &sec->sector;
    } else if (inject && (strcmp(key, "once") == 0 ||
                          strcmp(key, "immediately") == 0)) {
        bool b;
        if (vd_parse_keyval_bool(v, &b) < 0) {
            return vd_error_set(err, -EINVAL, "Parameter '%s' expects 'on' "
                                "or 'off'", key);
        }
        if (key[0] == 'o') {
            sec->once = b;
        }
        /* "immediately" changes when a failure is reported to a
         * coroutine in QEMU; a synchronous request has no such choice. */
        return 0;
    } else if (!inject && strcmp(key, "new_state") == 0) {
        num = &sec->new_state;
    } else {
        return -ENOENT;
    }
    if (num) {
        return parse_number(key, v, num, err);
    }
    free(*str);
    *str = strdup(v);
    return *str ? 0 : vd_error_set(err, -ENOMEM, "Out of memory");
}

static void section_append(section_list *l, section *sec)
{
    *l->tail = sec;
    l->tail = &sec->next;
}

/*
 * The config file, as QEMU's qemu_config_parse() reads it: blank lines
 * and lines starting with '#' are skipped, "[group]" or '[group "id"]'
 * starts a section, and every other line is read as `key = "value"`
 * (a line whose first word is not followed by that is taken as the key
 * with an empty value, which is how QEMU reports "Invalid parameter" for
 * a stray word).
 */
static int read_config_file(const char *path, section_list *inject,
                            section_list *set_state, vd_error *err)
{
    FILE *f = fopen(path, "r");
    char line[1024], arg[64], value[1024], group[64];
    section *cur = NULL;
    int ret = 0;

    if (!f) {
        return vd_error_set_errno(err, -errno, "Could not read blkdebug "
                                  "config file");
    }
    while (ret == 0 && fgets(line, sizeof(line), f)) {
        if (line[0] == '\n' || line[0] == '#') {
            continue;
        }
        if (line[0] == '[') {
            bool is_group = sscanf(line, "[%63s \"%1023[^\"]\"]", group,
                                   value) == 2 ||
                            sscanf(line, "[%63[^]]]", group) == 1;
            if (is_group) {
                int action;
                if (strcmp(group, "inject-error") == 0) {
                    action = ACTION_INJECT_ERROR;
                } else if (strcmp(group, "set-state") == 0) {
                    action = ACTION_SET_STATE;
                } else {
                    ret = vd_error_set(err, -EINVAL, "There is no option "
                                       "group '%s'", group);
                    break;
                }
                if (!(cur = section_new(action))) {
                    ret = vd_error_set(err, -ENOMEM, "Out of memory");
                    break;
                }
                section_append(action == ACTION_INJECT_ERROR ? inject
                                                             : set_state,
                               cur);
                continue;
            }
        }
        value[0] = '\0';
        if (sscanf(line, " %63s = \"%1023[^\"]\"", arg, value) == 2 ||
            sscanf(line, " %63s = \"\"", arg) == 1) {
            if (!cur) {
                ret = vd_error_set(err, -EINVAL, "no group defined");
            } else if ((ret = section_set(cur, arg, value, err)) == -ENOENT) {
                ret = vd_error_set(err, -EINVAL, "Invalid parameter '%s'",
                                   arg);
            }
            continue;
        }
        ret = vd_error_set(err, -EINVAL, "parse error");
    }
    if (ret == 0 && ferror(f)) {
        ret = vd_error_set(err, -EIO, "Cannot read config file");
    }
    fclose(f);
    return ret;
}

/* Fills @sec from the keys of @o (all of them must be the group's);
 * QEMU's messages for the two ways of giving sections. */
static int section_from_opts(section *sec, vd_opts *o, const char *group,
                             bool numbered, vd_error *err)
{
    while (vd_opts_count(o)) {
        const char *k, *v;
        vd_opts_nth(o, 0, &k, &v);
        int r = section_set(sec, k, v, err);
        if (r == -ENOENT) {
            return numbered
                ? vd_error_set(err, -EINVAL, "[%s] section doesn't support "
                               "the option '%s'", group, k)
                : vd_error_set(err, -EINVAL, "Unknown option '%s' for [%s]",
                               k, group);
        }
        if (r < 0) {
            return r;
        }
        vd_opts_del(o, k);
    }
    return 0;
}

static bool is_group_key(int action, const char *k)
{
    section probe = { .action = action };
    int r = section_set(&probe, k, "0", NULL);

    free(probe.event);
    free(probe.iotype);
    return r != -ENOENT;
}

/*
 * The sections given as options "GROUP.KEY" (one unnumbered section) or
 * "GROUP.N.KEY" (a list from 0 up), as QEMU's
 * config_parse_qdict_section() takes them. Consumes them from @opts.
 */
static int read_option_sections(vd_opts *opts, const char *group, int action,
                                section_list *l, vd_error *err)
{
    char prefix[32];
    vd_opts *sub;
    int ret = 0;

    snprintf(prefix, sizeof(prefix), "%s.", group);
    sub = vd_opts_extract_prefix(opts, prefix);
    if (!sub) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    if (!vd_opts_count(sub)) {
        goto out;
    }
    size_t plain = 0;
    for (size_t i = 0; i < vd_opts_count(sub); i++) {
        const char *k, *v;
        vd_opts_nth(sub, i, &k, &v);
        plain += is_group_key(action, k);
    }
    if (plain) {
        /* One section: every key must be the group's. */
        section *sec = section_new(action);
        if (!sec) {
            ret = vd_error_set(err, -ENOMEM, "Out of memory");
            goto out;
        }
        section_append(l, sec);
        ret = section_from_opts(sec, sub, group, false, err);
        goto out;
    }
    /* A list: sections 0, 1, ... as long as they follow each other. */
    for (unsigned idx = 0;; idx++) {
        char ip[24];
        snprintf(ip, sizeof(ip), "%u.", idx);
        snprintf(prefix, sizeof(prefix), "%u", idx);
        if (vd_opts_get(sub, prefix)) {
            ret = vd_error_set(err, -EINVAL, "[%s] section (index %u) does "
                               "not consist of keys", group, idx);
            goto out;
        }
        vd_opts *one = vd_opts_extract_prefix(sub, ip);
        if (!one) {
            ret = vd_error_set(err, -ENOMEM, "Out of memory");
            goto out;
        }
        if (!vd_opts_count(one)) {
            vd_opts_free(&one);
            break;
        }
        section *sec = section_new(action);
        if (!sec) {
            vd_opts_free(&one);
            ret = vd_error_set(err, -ENOMEM, "Out of memory");
            goto out;
        }
        section_append(l, sec);
        ret = section_from_opts(sec, one, group, true, err);
        vd_opts_free(&one);
        if (ret < 0) {
            goto out;
        }
    }
    if (vd_opts_count(sub)) {
        ret = vd_error_set(err, -EINVAL, "Unused option '%s' for [%s]",
                           vd_opts_first_key(sub), group);
    }
out:
    vd_opts_free(&sub);
    return ret;
}

/* Makes a rule of @sec (QEMU's add_rule()); newest rules come first. */
static int add_rule(blkdebug_state *s, const section *sec, vd_error *err)
{
    int event, iotype = -1;
    rule *r;

    if (!sec->event) {
        return vd_error_set(err, -EINVAL, "Missing event name for rule");
    }
    event = vd_blkdebug_event_by_name(sec->event);
    if (event < 0) {
        return vd_error_set(err, -EINVAL, "invalid parameter value: %s",
                            sec->event);
    }
    if (sec->action == ACTION_INJECT_ERROR && sec->iotype) {
        for (int i = 0; iotype_names[i]; i++) {
            if (strcmp(iotype_names[i], sec->iotype) == 0) {
                iotype = i;
            }
        }
        if (iotype < 0) {
            return vd_error_set(err, -EINVAL, "invalid parameter value: %s",
                                sec->iotype);
        }
    }
    r = calloc(1, sizeof(*r));
    if (!r) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    r->event = event;
    r->action = sec->action;
    r->state = (int)sec->state;
    r->error = (int)sec->errno_;
    r->once = sec->once;
    r->offset = sec->sector == UINT64_MAX ? -1
                : (int64_t)(sec->sector * 512);
    r->iotype_mask = iotype < 0 ? IO_DEFAULT_MASK : 1u << iotype;
    r->new_state = (int)sec->new_state;
    r->next = s->rules[event];
    s->rules[event] = r;
    return 0;
}

/* QEMU's read_config(): the file's sections, then the options'; every
 * inject-error rule is made before the set-state rules. */
static int read_rules(blkdebug_state *s, vd_opts *opts, vd_error *err)
{
    section_list inject = { NULL, &inject.head };
    section_list set_state = { NULL, &set_state.head };
    int ret = 0;

    if (s->config_file) {
        ret = read_config_file(s->config_file, &inject, &set_state, err);
    }
    if (ret == 0) {
        ret = read_option_sections(opts, "inject-error", ACTION_INJECT_ERROR,
                                   &inject, err);
    }
    if (ret == 0) {
        ret = read_option_sections(opts, "set-state", ACTION_SET_STATE,
                                   &set_state, err);
    }
    for (section *sec = inject.head; ret == 0 && sec; sec = sec->next) {
        ret = add_rule(s, sec, err);
    }
    for (section *sec = set_state.head; ret == 0 && sec; sec = sec->next) {
        ret = add_rule(s, sec, err);
    }
    sections_free(&inject);
    sections_free(&set_state);
    return ret;
}

/* take-child-perms / unshare-child-perms: lists of BlockPermission. */
static int read_perm_list(vd_opts *opts, const char *name, unsigned *out,
                          vd_error *err)
{
    static const char *const perm_names[] = {
        "consistent-read", "write", "write-unchanged", "resize", NULL
    };
    char key[64];

    *out = 0;
    for (unsigned i = 0;; i++) {
        snprintf(key, sizeof(key), "%s.%u", name, i);
        char *v = vd_opts_take(opts, key);
        int p = -1;
        if (!v) {
            break;
        }
        for (int k = 0; perm_names[k]; k++) {
            if (strcmp(perm_names[k], v) == 0) {
                p = k;
            }
        }
        if (p < 0) {
            /* sic: QEMU's visitor has no name for list elements. */
            vd_error_set(err, -EINVAL, "Parameter 'null' does not accept "
                         "value '%s'", v);
            free(v);
            return -EINVAL;
        }
        free(v);
        *out |= 1u << p;
    }
    return 0;
}

static void rule_free(rule *r)
{
    free(r->tag);
    free(r);
}

/* Takes @r out of its event's list and the active list, and frees it.
 * rule_lock held. */
static void remove_rule(blkdebug_state *s, rule *r)
{
    for (rule **p = &s->rules[r->event]; *p; p = &(*p)->next) {
        if (*p == r) {
            *p = r->next;
            break;
        }
    }
    if (r->active) {
        for (rule **p = &s->active; *p; p = &(*p)->active_next) {
            if (*p == r) {
                *p = r->active_next;
                break;
            }
        }
    }
    rule_free(r);
}

static void clear_active(blkdebug_state *s)
{
    for (rule *r = s->active; r; r = r->active_next) {
        r->active = false;
    }
    s->active = NULL;
}

/* ------------------------------------------------------------------ */
/* Events and breakpoints                                             */
/* ------------------------------------------------------------------ */

/*
 * An event on the node (QEMU's blkdebug_debug_event()): every rule of
 * the event that applies in the current state acts, newest first; the
 * first inject-error rule replaces the active set; the state changes
 * after all of them; a breakpoint suspends the calling request until
 * its tag is resumed.
 */
static void blkdebug_debug_event(vd_node *node, int event)
{
    blkdebug_state *s = node->opaque;
    suspended *mine[8];
    int nmine = 0;
    bool injected = false;

    if (event < 0 || event >= VD_BLKDBG__MAX) {
        return;
    }
    pthread_mutex_lock(&s->rule_lock);
    int new_state = s->state;
    rule *next;
    for (rule *r = s->rules[event]; r; r = next) {
        next = r->next;
        if (r->state && r->state != s->state) {
            continue;
        }
        switch (r->action) {
        case ACTION_INJECT_ERROR:
            if (!injected) {
                clear_active(s);
                injected = true;
            }
            r->active = true;
            r->active_next = s->active;
            s->active = r;
            break;
        case ACTION_SET_STATE:
            new_state = r->new_state;
            break;
        case ACTION_SUSPEND: {
            /* A drain waits for every request: the breakpoint stays
             * for later. */
            if (s->draining) {
                break;
            }
            suspended *sr = calloc(1, sizeof(*sr));
            if (!sr || nmine == (int)(sizeof(mine) / sizeof(mine[0]))) {
                free(sr);
                break;      /* no memory: the request goes on */
            }
            sr->tag = r->tag;
            r->tag = NULL;
            remove_rule(s, r);
            sr->next = s->suspended;
            s->suspended = sr;
            mine[nmine++] = sr;
            vd_debug_notify(sr->tag, false);
            break;
        }
        }
    }
    s->state = new_state;
    /* Each breakpoint hit waits for its own resume, as QEMU's coroutine
     * yields once per suspension. */
    for (int i = 0; i < nmine; i++) {
        while (!mine[i]->resumed) {
            pthread_cond_wait(&s->resume_cond, &s->rule_lock);
        }
        free(mine[i]->tag);
        free(mine[i]);
    }
    pthread_mutex_unlock(&s->rule_lock);
}

static int blkdebug_debug_breakpoint(vd_node *node, const char *event,
                                     const char *tag)
{
    blkdebug_state *s = node->opaque;
    int ev = vd_blkdebug_event_by_name(event);
    rule *r;

    if (ev < 0) {
        return -ENOENT;
    }
    r = calloc(1, sizeof(*r));
    if (!r || !(r->tag = strdup(tag))) {
        free(r);
        return -ENOMEM;
    }
    r->event = ev;
    r->action = ACTION_SUSPEND;
    pthread_mutex_lock(&s->rule_lock);
    r->next = s->rules[ev];
    s->rules[ev] = r;
    pthread_mutex_unlock(&s->rule_lock);
    return 0;
}

/* Resumes the requests suspended at @tag (the first one, or all).
 * rule_lock held. */
static int resume_by_tag(blkdebug_state *s, const char *tag, bool all)
{
    int ret = -ENOENT;

    for (suspended **p = &s->suspended; *p;) {
        suspended *sr = *p;
        if (!tag || strcmp(sr->tag, tag) == 0) {
            vd_debug_notify(sr->tag, true);
            *p = sr->next;
            sr->resumed = true;
            ret = 0;
            if (!all) {
                break;
            }
        } else {
            p = &sr->next;
        }
    }
    if (ret == 0) {
        pthread_cond_broadcast(&s->resume_cond);
    }
    return ret;
}

static int blkdebug_debug_resume(vd_node *node, const char *tag)
{
    blkdebug_state *s = node->opaque;

    pthread_mutex_lock(&s->rule_lock);
    int ret = resume_by_tag(s, tag, false);
    pthread_mutex_unlock(&s->rule_lock);
    return ret;
}

static int blkdebug_debug_remove_breakpoint(vd_node *node, const char *tag)
{
    blkdebug_state *s = node->opaque;
    int ret = -ENOENT;

    pthread_mutex_lock(&s->rule_lock);
    for (int i = 0; i < VD_BLKDBG__MAX; i++) {
        rule *next;
        for (rule *r = s->rules[i]; r; r = next) {
            next = r->next;
            if (r->action == ACTION_SUSPEND && strcmp(r->tag, tag) == 0) {
                remove_rule(s, r);
                ret = 0;
            }
        }
    }
    /* As QEMU 7.2: the requests stopped at @tag go on, but only a
     * breakpoint still set counts as found (a hit used its own up). */
    resume_by_tag(s, tag, true);
    pthread_mutex_unlock(&s->rule_lock);
    return ret;
}

static bool blkdebug_debug_is_suspended(vd_node *node, const char *tag)
{
    blkdebug_state *s = node->opaque;
    bool found = false;

    pthread_mutex_lock(&s->rule_lock);
    for (suspended *sr = s->suspended; sr && !found; sr = sr->next) {
        found = strcmp(sr->tag, tag) == 0;
    }
    pthread_mutex_unlock(&s->rule_lock);
    return found;
}

/* A drain waits for every request: none may stay at a breakpoint, and
 * none stops at one until the drain ends. */
static void blkdebug_drain_begin(vd_node *node)
{
    blkdebug_state *s = node->opaque;

    if (!s->opened) {
        return;
    }
    pthread_mutex_lock(&s->rule_lock);
    s->draining++;
    resume_by_tag(s, NULL, true);
    pthread_mutex_unlock(&s->rule_lock);
}

static void blkdebug_drain_end(vd_node *node)
{
    blkdebug_state *s = node->opaque;

    if (!s->opened) {
        return;
    }
    pthread_mutex_lock(&s->rule_lock);
    if (s->draining > 0) {
        s->draining--;
    }
    pthread_mutex_unlock(&s->rule_lock);
}

/*
 * Whether a request of @iotype over [off, off+bytes) fails (QEMU's
 * rule_check()): the first active rule that matches decides; an errno of
 * 0 lets the request through. Returns 0 or the negative errno.
 */
static int rule_check(blkdebug_state *s, uint64_t off, uint64_t bytes,
                      int iotype)
{
    rule *r;
    int error;

    pthread_mutex_lock(&s->rule_lock);
    for (r = s->active; r; r = r->active_next) {
        bool here = r->offset < 0 ||
                    (bytes && (uint64_t)r->offset >= off &&
                     (uint64_t)r->offset < off + bytes);
        if (here && (r->iotype_mask & (1u << iotype))) {
            break;
        }
    }
    if (!r || !r->error) {
        pthread_mutex_unlock(&s->rule_lock);
        return 0;
    }
    error = r->error;
    if (r->once) {
        remove_rule(s, r);
    }
    pthread_mutex_unlock(&s->rule_lock);
    return -error;
}

/* ------------------------------------------------------------------ */
/* Open, limits, permissions                                          */
/* ------------------------------------------------------------------ */

/* "blkdebug:CONFIG:IMAGE" (CONFIG may be empty) or a plain image name,
 * as QEMU's blkdebug_parse_filename(). */
static int parse_filename(blkdebug_state *s, const char *filename,
                          char **image, vd_error *err)
{
    const char *c;

    *image = NULL;
    if (!filename) {
        return 0;
    }
    if (strncmp(filename, "blkdebug:", 9) != 0) {
        *image = strdup(filename);
        return *image ? 0 : vd_error_set(err, -ENOMEM, "Out of memory");
    }
    filename += 9;
    c = strchr(filename, ':');
    if (!c) {
        return vd_error_set(err, -EINVAL, "blkdebug requires both config "
                            "file and image path");
    }
    if (c != filename && !s->config_file &&
        !(s->config_file = strndup(filename, (size_t)(c - filename)))) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    *image = strdup(c + 1);
    return *image ? 0 : vd_error_set(err, -ENOMEM, "Out of memory");
}

/* A limit that must be a multiple of @align and below INT_MAX. */
static int check_limit(const char *name, uint64_t v, uint64_t align,
                       vd_error *err)
{
    if (v && (v >= INT_MAX || v % align)) {
        return vd_error_set(err, -EINVAL, "Cannot meet constraints with "
                            "%s %" PRIu64, name, v);
    }
    return 0;
}

static void blkdebug_close(vd_node *node);

static int blkdebug_open(vd_node *node, vd_opts *opts, unsigned flags,
                         vd_error *err)
{
    blkdebug_state *s = node->opaque;
    char *image = NULL, *x_image, *fname;
    uint64_t align;
    int ret;

    (void)flags;
    pthread_mutex_init(&s->rule_lock, NULL);
    pthread_cond_init(&s->resume_cond, NULL);
    pthread_mutex_init(&s->crash_lock, NULL);
    s->opened = true;

    s->config_file = vd_opts_take(opts, "config");
    x_image = vd_opts_take(opts, "x-image");
    fname = vd_opts_take(opts, "filename");
    ret = parse_filename(s, fname ? fname : node->filename, &image, err);
    if (x_image) {
        free(image);
        image = x_image;
    }
    free(fname);
    if (ret == 0) {
        ret = read_rules(s, opts, err);
    }
    s->state = 1;
    if (ret == 0) {
        ret = read_perm_list(opts, "take-child-perms", &s->take_perms, err);
    }
    if (ret == 0) {
        ret = read_perm_list(opts, "unshare-child-perms", &s->unshare_perms,
                             err);
    }
    if (ret == 0) {
        ret = crash_open(s, opts, err);
    }
    if (ret == 0 &&
        !vd_node_open_child(node, opts, "image", image,
                            VD_ROLE_FILTERED | VD_ROLE_PRIMARY, false,
                            err)) {
        ret = err && err->code ? err->code : -EINVAL;
    }
    free(image);
    if (ret < 0) {
        goto fail;
    }

    if ((ret = vd_opts_take_size(opts, "align", 0, &s->align, err)) < 0 ||
        (ret = vd_opts_take_size(opts, "max-transfer", 0, &s->max_transfer,
                                 err)) < 0 ||
        (ret = vd_opts_take_size(opts, "opt-write-zero", 0,
                                 &s->opt_write_zero, err)) < 0 ||
        (ret = vd_opts_take_size(opts, "max-write-zero", 0,
                                 &s->max_write_zero, err)) < 0 ||
        (ret = vd_opts_take_size(opts, "opt-discard", 0, &s->opt_discard,
                                 err)) < 0 ||
        (ret = vd_opts_take_size(opts, "max-discard", 0, &s->max_discard,
                                 err)) < 0) {
        goto fail;
    }
    if (s->align && (s->align >= INT_MAX || (s->align & (s->align - 1)))) {
        ret = vd_error_set(err, -EINVAL, "Cannot meet constraints with align "
                           "%" PRIu64, s->align);
        goto fail;
    }
    align = node->file->node->bl.request_alignment;
    if (s->align > align) {
        align = s->align;
    }
    if ((ret = check_limit("max-transfer", s->max_transfer, align, err)) < 0 ||
        (ret = check_limit("opt-write-zero", s->opt_write_zero, align,
                           err)) < 0 ||
        (ret = check_limit("max-write-zero", s->max_write_zero,
                           s->opt_write_zero > align ? s->opt_write_zero
                                                     : align, err)) < 0 ||
        (ret = check_limit("opt-discard", s->opt_discard, align, err)) < 0 ||
        (ret = check_limit("max-discard", s->max_discard,
                           s->opt_discard > align ? s->opt_discard : align,
                           err)) < 0) {
        goto fail;
    }
    if (!node->filename) {
        /* What QEMU's refresh_filename makes of it. */
        const char *inner = node->file->node->filename;
        size_t n = strlen(s->config_file ? s->config_file : "") +
                   strlen(inner ? inner : "") + 16;
        node->filename = malloc(n);
        if (!node->filename) {
            ret = vd_error_set(err, -ENOMEM, "Out of memory");
            goto fail;
        }
        snprintf(node->filename, n, "blkdebug:%s:%s",
                 s->config_file ? s->config_file : "", inner ? inner : "");
    }
    /* Rules for "none" act right away. */
    blkdebug_debug_event(node, VD_BLKDBG_NONE);
    return 0;

fail:
    /* The core does not call close after a failed open. */
    blkdebug_close(node);
    return ret;
}

static void blkdebug_close(vd_node *node)
{
    blkdebug_state *s = node->opaque;

    if (!s->opened) {
        return;
    }
    if (s->stats) {
        fprintf(stderr, "blkdebug: %llu writes, %llu flushes\n",
                (unsigned long long)s->writes,
                (unsigned long long)s->flushes);
    }
    for (int i = 0; i < VD_BLKDBG__MAX; i++) {
        while (s->rules[i]) {
            rule *r = s->rules[i];
            s->rules[i] = r->next;
            rule_free(r);
        }
    }
    s->active = NULL;
    undo_clear(s);
    free(s->config_file);
    s->config_file = NULL;
    pthread_mutex_destroy(&s->rule_lock);
    pthread_cond_destroy(&s->resume_cond);
    pthread_mutex_destroy(&s->crash_lock);
    s->opened = false;
}

static void blkdebug_refresh_limits(vd_node *node)
{
    blkdebug_state *s = node->opaque;

    if (!node->file) {
        return;
    }
    node->bl = node->file->node->bl;
    if (s->align) {
        node->bl.request_alignment = (uint32_t)s->align;
    }
    if (s->max_transfer) {
        node->bl.max_transfer = s->max_transfer;
    }
    if (s->opt_write_zero) {
        node->bl.pwrite_zeroes_alignment = (uint32_t)s->opt_write_zero;
    }
    if (s->max_write_zero) {
        node->bl.max_pwrite_zeroes = s->max_write_zero;
    }
    if (s->opt_discard) {
        node->bl.pdiscard_alignment = (uint32_t)s->opt_discard;
    }
    if (s->max_discard) {
        node->bl.max_pdiscard = s->max_discard;
    }
}

/* A filter's permissions, plus what take-child-perms and
 * unshare-child-perms add. */
static void blkdebug_child_perm(vd_node *node, const vd_child *c,
                                unsigned perm, unsigned shared,
                                unsigned *nperm, unsigned *nshared)
{
    blkdebug_state *s = node->opaque;

    vd_default_child_perm(node, c, perm, shared, nperm, nshared);
    *nperm |= s->take_perms;
    *nshared &= ~s->unshare_perms;
}

/* ------------------------------------------------------------------ */
/* Requests                                                           */
/* ------------------------------------------------------------------ */

static int blkdebug_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                           vd_iov *qiov, unsigned flags, vd_error *err)
{
    blkdebug_state *s = node->opaque;
    int ret = rule_check(s, off, bytes, IO_READ);

    if (ret < 0) {
        return ret;
    }
    if (s->crash_write || s->fail_write) {
        pthread_mutex_lock(&s->crash_lock);
        bool failed = s->crashed && s->crash_action == CRASH_FAIL;
        pthread_mutex_unlock(&s->crash_lock);
        if (failed) {
            return vd_error_set(err, -EIO, "%s: blkdebug: read after the "
                                "simulated crash", node->filename);
        }
    }
    return vd_node_preadv(node->file->node, off, bytes, qiov, flags, err);
}

static int blkdebug_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                            vd_iov *qiov, unsigned flags, vd_error *err)
{
    blkdebug_state *s = node->opaque;
    int ret = rule_check(s, off, bytes, IO_WRITE);

    if (ret < 0) {
        return ret;
    }
    pthread_mutex_lock(&s->crash_lock);
    ret = write_gate(node, s, off, bytes, err);
    if (ret > 0) {
        ret = vd_node_pwritev(node->file->node, off, bytes, qiov, flags,
                              err);
        after_write(node, s);
    }
    pthread_mutex_unlock(&s->crash_lock);
    return ret;
}

static int blkdebug_pwrite_zeroes(vd_node *node, uint64_t off,
                                  uint64_t bytes, unsigned flags,
                                  vd_error *err)
{
    blkdebug_state *s = node->opaque;
    int ret = rule_check(s, off, bytes, IO_WRITE_ZEROES);

    if (ret < 0) {
        return ret;
    }
    pthread_mutex_lock(&s->crash_lock);
    ret = write_gate(node, s, off, bytes, err);
    if (ret > 0) {
        ret = vd_node_pwrite_zeroes(node->file->node, off, bytes, flags,
                                    err);
        after_write(node, s);
    }
    pthread_mutex_unlock(&s->crash_lock);
    return ret;
}

static int blkdebug_pdiscard(vd_node *node, uint64_t off, uint64_t bytes,
                             vd_error *err)
{
    blkdebug_state *s = node->opaque;
    int ret = rule_check(s, off, bytes, IO_DISCARD);

    if (ret < 0) {
        return ret;
    }
    pthread_mutex_lock(&s->crash_lock);
    ret = write_gate(node, s, off, bytes, err);
    if (ret > 0) {
        ret = vd_node_pdiscard(node->file->node, off, bytes, err);
        after_write(node, s);
    }
    pthread_mutex_unlock(&s->crash_lock);
    return ret;
}

/* The core flushes the file after this callback; the undo log can go
 * only once that flush is done, which a later request cannot tell apart
 * from this point, so the filter flushes the file itself first. */
static int blkdebug_flush(vd_node *node, vd_error *err)
{
    blkdebug_state *s = node->opaque;
    int ret = 0;

    /* QEMU asks the rules only when something was written since the
     * last flush (its flush_to_disk is skipped otherwise). */
    if (atomic_load(&node->write_gen) != atomic_load(&node->flushed_gen) &&
        (ret = rule_check(s, 0, 0, IO_FLUSH)) < 0) {
        return ret;
    }
    pthread_mutex_lock(&s->crash_lock);
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
    pthread_mutex_unlock(&s->crash_lock);
    return ret;
}

static int blkdebug_block_status(vd_node *node, bool want_zero, uint64_t off,
                                 uint64_t bytes, uint64_t *pnum,
                                 uint64_t *map, vd_node **file,
                                 vd_error *err)
{
    blkdebug_state *s = node->opaque;
    int ret = rule_check(s, off, bytes, IO_BLOCK_STATUS);

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

    pthread_mutex_lock(&s->crash_lock);
    ret = write_gate(node, s, size, 0, err);
    if (ret > 0) {
        ret = vd_node_truncate(node->file->node, size, exact, prealloc, err);
        after_write(node, s);
    }
    pthread_mutex_unlock(&s->crash_lock);
    return ret;
}

const vd_driver vd_driver_blkdebug = {
    .name = "blkdebug",
    .protocol_name = "blkdebug",
    .instance_size = sizeof(blkdebug_state),
    .is_filter = true,
    /* As its file does, so that the crash tests reach that path. */
    .grows_ahead = true,
    .opens_children = true,
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
    .child_perm = blkdebug_child_perm,
    .drain_begin = blkdebug_drain_begin,
    .drain_end = blkdebug_drain_end,
    .debug_event = blkdebug_debug_event,
    .debug_breakpoint = blkdebug_debug_breakpoint,
    .debug_remove_breakpoint = blkdebug_debug_remove_breakpoint,
    .debug_resume = blkdebug_debug_resume,
    .debug_is_suspended = blkdebug_debug_is_suspended,
};
