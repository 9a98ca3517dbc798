/*
 * Helpers shared by the vdisk subcommands: the command table that
 * drives option parsing and --help,
 * image opening, size parsing with qemu-img's messages, qemu's human
 * size format and the progress meter.
 *
 * Every subcommand is described once in cli_commands[] (util.c): its
 * synopsis, short options and long options. cli_getopt() parses with that
 * description, so the help text and the parser cannot drift apart.
 */
#ifndef VDISK_TOOLS_UTIL_H
#define VDISK_TOOLS_UTIL_H

#include <getopt.h>
#include <stdbool.h>
#include <stdint.h>

#include "vdisk/vdisk.h"
#include "prog.h"

/* Values returned by getopt_long for long-only options. */
enum {
    OPT_OUTPUT = 256,
    OPT_BACKING_CHAIN,
    OPT_SHRINK,
    OPT_PREALLOCATION,
    OPT_START_OFFSET,
    OPT_MAX_LENGTH,
    OPT_TARGET_IS_ZERO,
    OPT_OBJECT,
    OPT_IMAGE_OPTS,
    OPT_FORCE_SHARE_LONG,
    OPT_TARGET_IMAGE_OPTS,
};

typedef struct cli_command {
    const char *name;
    int (*handler)(int argc, char **argv);
    const char *synopsis;               /* arguments after the name */
    const char *short_opts;             /* getopt string, ':' prefixed */
    const struct option *long_opts;     /* NULL-terminated, or NULL */
} cli_command;

/* The table of subcommands, terminated by a NULL name. */
extern const cli_command cli_commands[];

/* Finds a subcommand by name, or NULL. */
const cli_command *cli_find_command(const char *name);

/* `vdisk CMD --help` and `vdisk help CMD` of a command that parses with
 * cli_getopt() (tools/help.c): its synopsis and every option with all
 * its spellings, from the tables the parser uses. */
void cli_print_command_help(const cli_command *c);

/* The hidden `vdisk --list-options CMD` (tools/help.c): one line per
 * option of @name, its spellings separated by spaces ("-f --format"),
 * a tab, and "arg", "optarg" or "noarg". Returns the exit status. */
int cli_list_options(const char *name);

/* Whether @c is vdisk's own (io, serve): qemu-img has no such command. */
bool cli_command_is_vdisk_only(const cli_command *c);

/*
 * getopt_long() over the options of command @name. Returns the option
 * character, -1 at the end, or '?' after printing qemu-img's message for
 * an unknown option or a missing argument (the caller exits with 1).
 * --object is handled here, in command-line order as qemu-img does
 * (cli_add_object()): the caller never sees OPT_OBJECT, and a bad object
 * ends the process as in qemu-img (status 1; 2 for compare, whose every
 * error is 2).
 */
int cli_getopt(const char *name, int argc, char **argv);

/*
 * The options many commands share, described once: each means the same
 * wherever it appears, so cli_getopt_common() parses it and the
 * command's switch keeps only its own options. A command takes only the
 * options of its cli_commands[] row; a field keeps the command's initial
 * value (create's "raw", info's open flags) until an option sets it, and
 * -U ORs into the flags. An option whose handling differs in some command
 * is left to that command through @skip: compare's bad --output exits 2
 * (every other bad option 1), so compare keeps its --output case.
 * -h here is qemu-img's
 * whole help (vdisk's command help is cli_getopt()'s), -q and -p just set
 * their flag (what quiet or progress means is the command's). bench, io
 * and serve keep their own loops: their messages and -h are their own.
 */
enum {
    CLI_COMMON_OUTPUT = 1u << 0,    /* --output=human|json */
};

typedef struct cli_common {
    unsigned skip;          /* CLI_COMMON_* the command parses itself */
    const char *fmt;        /* -f FMT */
    bool image_opts;        /* --image-opts */
    unsigned flags;         /* |= VD_O_FORCE_SHARE for -U, --force-share */
    bool json;              /* --output=json */
    bool quiet;             /* -q */
    bool progress;          /* -p */
} cli_common;

/*
 * cli_getopt() that consumes the shared options into @co: returns only
 * the command's own options, -1 at the end, or '?' after printing the
 * error of a bad option or a bad shared value (the caller exits with its
 * usual status). -h under qemu-img's name prints its help and exits 0.
 */
int cli_getopt_common(const char *name, int argc, char **argv,
                      cli_common *co);

/*
 * --object ARG (every tool): adds the object (vd_object_add_cli()). A
 * help request ("help", "TYPE,help") prints QEMU's listing and exits 0,
 * as QEMU's tools do. Returns 0, or -1 after printing the error, after
 * "@context: " when @context is not NULL (qemu-storage-daemon names the
 * option: "--object ARG: ...").
 */
int cli_add_object(const char *arg, const char *context);

/*
 * --image-opts: parses @str, QEMU's key=value image options
 * ("driver=qcow2,file.filename=a.qcow2"), into a new option set that
 * vd_open() takes without a filename: a copy of @base (may be NULL; the
 * options a command adds, cache=...) with @str's keys set over it.
 * Prints the error and returns NULL on failure.
 */
vd_opts *cli_parse_image_opts(const char *str, const vd_opts *base);

/*
 * cli_open() for commands that have --image-opts: with @image_opts,
 * @filename is an option string (cli_parse_image_opts(), merged over
 * @opts) and a format is refused ("--image-opts and --format are
 * mutually exclusive"), as qemu-img's img_open() does.
 */
vd_node *cli_open_image(const char *filename, const char *fmt,
                        bool image_opts, unsigned flags, const vd_opts *opts);

/* Prints to stdout unless @quiet. */
void cli_qprintf(bool quiet, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/*
 * Opens an image for a subcommand and reports a failure as qemu-img does
 * ("Could not open 'FILE': ..."). Returns NULL on failure.
 */
vd_node *cli_open(const char *filename, const char *fmt, unsigned flags,
                  const vd_opts *opts);

/*
 * For a format QEMU knows that vdisk cannot open yet (vd_format_check()
 * says -ENOTSUP), prints "PROG: FILE: format 'vmdk' is not supported"
 * (without "FILE: " when @filename is NULL) and returns true; otherwise
 * prints nothing and returns false, and the caller reports an unknown
 * format its own way.
 */
bool cli_report_unsupported_format(const char *filename, const char *fmt);

/* Returns @msg without a leading "FILENAME: " (for messages that qemu
 * prints with its own prefix). */
const char *cli_strip_filename(const char *msg, const char *filename);

/* A data buffer of @size bytes aligned to 4096 (free with free()), or
 * NULL. Page alignment keeps O_DIRECT images working, and the kernel
 * copies into and out of a buffer that is not 64-byte aligned (malloc's
 * large blocks start 16 bytes into a page) up to five times slower on
 * some CPUs: a convert read its source at a fifth of the speed. */
void *cli_io_buffer(size_t size);

/*
 * Parses a size argument as qemu-img's cvtnum() does; on error prints
 * qemu-img's message naming @what (e.g. "image size") and returns a
 * negative errno.
 */
int cli_cvtnum(const char *what, const char *str, uint64_t *out);

/* qemu's size_to_str(): "1 MiB", "1.39 MiB", "516 KiB", "0 B". */
void cli_size_to_str(char *buf, size_t len, uint64_t val);

/* The cache mode @mode names as the library spells it ("off" is qemu's
 * other name for "none"), or NULL when qemu would refuse it. */
const char *cli_cache_mode(const char *mode);

/* Whether @mode is one of the NULL-terminated @modes. */
bool cli_one_of(const char *mode, const char *const *modes);
/* The aio and discard modes qemu's tools take (bdrv_parse_aio(),
 * bdrv_parse_discard_flags()). */
bool cli_aio_mode_valid(const char *mode);
bool cli_discard_mode_valid(const char *mode);

/* Parses "human" / "json" for --output; prints qemu-img's error. */
int cli_parse_output(const char *arg, bool *json);

struct json_object;
/* Prints a vdisk-only --output=json object (docs/json.md): compact json-c
 * text on one line of stdout, keys in the order they were added. Frees
 * @obj. */
void cli_print_json(struct json_object *obj);

/*
 * Progress meter. Human form (-p; --progress=human only names this
 * default form, undoing an earlier --progress=json): qemu-img's
 * "    (12.34/100%)\r" on stdout. --progress=json: one JSON object per
 * line on stderr, {"command":"convert","progress":12.5,"bytes":N,
 * "total":N,"elapsed":0.42} ("bytes"/"total" only when the command
 * reported them through cli_progress_print_bytes()). --progress-fd=N:
 * nbdcopy's "N/100\n" lines (an integer percentage) written to fd N, or
 * the JSON lines there with --progress=json too. The machine forms never
 * go to stdout, never go backwards, and are not silenced by -q (they
 * were asked for explicitly); docs/json.md documents them.
 *
 * How a command opts in (a long command of its own):
 *   1. add CLI_PROGRESS_LONG_OPTS to its long-option table: cli_getopt()
 *      then parses --progress=FMT and --progress-fd=N itself (through
 *      cli_parse_progress_arg(), the caller never sees them) and refuses
 *      them under qemu-img's name, as qemu-img has neither;
 *   2. cli_progress_init(&p, want_human_meter, min_skip) once the work is
 *      about to start: the machine forms switch the meter on by
 *      themselves (cli_progress_machine() says whether one was asked);
 *   3. cli_progress_print(&p, percent) or cli_progress_print_bytes(&p,
 *      done, total) as the work goes (callers serialise calls);
 *   4. on success cli_progress_print(&p, 100), then cli_progress_end(&p)
 *      on every path (the machine forms print nothing there, so a failed
 *      command never claims 100).
 * A command with its own getopt loop calls cli_parse_progress_arg() for
 * OPT_PROGRESS and OPT_PROGRESS_FD itself.
 */
typedef struct cli_progress {
    bool enabled;
    float last;
    float min_skip;   /* redraw after this many percent (qemu: per command) */
    int mode;         /* 0 human, 1 json, 2 nbdcopy's N/100 (internal) */
    int fd;           /* where the machine forms go */
    int last_int;     /* last N/100 written */
    bool have_bytes;
    uint64_t bytes, total;
    double start;     /* CLOCK_MONOTONIC seconds at init */
    const char *command;
} cli_progress;

/* Long-only options of the progress forms (0x300 range). */
enum { OPT_PROGRESS = 0x300, OPT_PROGRESS_FD };
#define CLI_PROGRESS_LONG_OPTS \
    { "progress", required_argument, NULL, OPT_PROGRESS }, \
    { "progress-fd", required_argument, NULL, OPT_PROGRESS_FD }

/* Parses --progress=human|json (@opt OPT_PROGRESS) or --progress-fd=N
 * (OPT_PROGRESS_FD: an open file descriptor) into the process-wide
 * progress settings that cli_progress_init() reads. Returns 0, or prints
 * the error and returns -1. */
int cli_parse_progress_arg(int opt, const char *arg);
/* Whether --progress=json or --progress-fd was given. */
bool cli_progress_machine(void);

/* @min_skip as qemu-img's commands use: 2.0 for compare, 1.0 for convert. */
void cli_progress_init(cli_progress *p, bool enabled, float min_skip);
void cli_progress_print(cli_progress *p, double percent);
/* cli_progress_print() of @done * 100 / @total that also reports both
 * counts in the JSON form. */
void cli_progress_print_bytes(cli_progress *p, uint64_t done, uint64_t total);
void cli_progress_end(cli_progress *p);

/* "-o help" support shared by create and convert (cmd_create.c):
 * whether an -o string asks for help, and the listing itself (@filename
 * NULL lists only the format's own options). Returns the exit status. */
bool cli_has_help_option(const char *str);
int cli_print_create_help(const char *filename, const char *fmt);

/* Copies the creation/open failure message to stderr with the prefix. */
/* Prints the hint of @err (QEMU's error hints: a line of its own after
 * the message, e.g. "Is another process using the image [a.qcow2]?"),
 * if it has one. */
void cli_print_hint(const vd_error *err);
void cli_report_vd_error(const vd_error *err, int ret, const char *fallback);

/* Loads snapshot @param ("snapshot.id=X,snapshot.name=Y" or a plain id
 * or name, as qemu-img -l and qemu-nbd -l) into the read-only @node.
 * Returns 0, or prints the error and returns -1. */
int cli_load_snapshot(vd_node *node, const char *param);

#endif
