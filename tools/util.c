/*
 * Shared helpers of the vdisk tool (see util.h): the program's name, the
 * command table, then --help, option parsing, message printing, image
 * opening, size
 * parsing and formatting, --output parsing, the progress meter, and
 * loading an internal snapshot for -l.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "commands.h"
#include "util.h"

/* ---- the program's name ---- */

cli_tool cli_as = CLI_VDISK;
const char *cli_prog = "vdisk";

void cli_set_tool(const char *argv0)
{
    static const struct {
        const char *name;
        cli_tool tool;
    } names[] = {
        { "qemu-img", CLI_QEMU_IMG },
        { "qemu-io", CLI_QEMU_IO },
        { "qemu-nbd", CLI_QEMU_NBD },
        { "qemu-storage-daemon", CLI_QEMU_STORAGE_DAEMON },
    };
    const char *base = argv0 ? strrchr(argv0, '/') : NULL;

    base = base ? base + 1 : argv0 ? argv0 : "";
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcmp(base, names[i].name) == 0) {
            cli_as = names[i].tool;
            cli_prog = names[i].name;
            return;
        }
    }
    /* Any other name (vdisk, a renamed copy) is vdisk itself. */
    cli_as = CLI_VDISK;
    cli_prog = "vdisk";
}

void cli_set_prog(const char *prog)
{
    cli_prog = prog;
}

void cli_print_qemu_version(void)
{
    /* qemu-nbd alone has no "version" word. The first line is what
     * scripts parse (major.minor.micro first); the second says what is
     * answering, since it is not QEMU. */
    printf("%s%s %s (vdisk %s)\n"
           "vdisk, a re-implementation of QEMU %s's block layer and tools; "
           "not QEMU\n",
           cli_prog, cli_as == CLI_QEMU_NBD ? "" : " version",
           CLI_QEMU_VERSION, vd_version(), "7.2");
}

/* ---- the command table ---- */

static const struct option check_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
    { "format", required_argument, NULL, 'f' },
    { "repair", required_argument, NULL, 'r' },
    { "output", required_argument, NULL, OPT_OUTPUT },
    { "force-share", no_argument, NULL, 'U' },
    CLI_PROGRESS_LONG_OPTS,
    { NULL, 0, NULL, 0 },
};

static const struct option create_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "output", required_argument, NULL, OPT_OUTPUT },
    { NULL, 0, NULL, 0 },
};

static const struct option info_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
    { "format", required_argument, NULL, 'f' },
    { "output", required_argument, NULL, OPT_OUTPUT },
    { "backing-chain", no_argument, NULL, OPT_BACKING_CHAIN },
    { "force-share", no_argument, NULL, 'U' },
    { NULL, 0, NULL, 0 },
};

static const struct option convert_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
    { "target-image-opts", no_argument, NULL, OPT_TARGET_IMAGE_OPTS },
    { "force-share", no_argument, NULL, 'U' },
    { "target-is-zero", no_argument, NULL, OPT_TARGET_IS_ZERO },
    { "salvage", no_argument, NULL, OPT_SALVAGE },
    { "bitmaps", no_argument, NULL, OPT_BITMAPS },
    { "skip-broken-bitmaps", no_argument, NULL, OPT_SKIP_BROKEN_BITMAPS },
    { "output", required_argument, NULL, OPT_OUTPUT },
    CLI_PROGRESS_LONG_OPTS,
    { NULL, 0, NULL, 0 },
};

static const struct option compare_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
    { "force-share", no_argument, NULL, 'U' },
    { "output", required_argument, NULL, OPT_OUTPUT },
    CLI_PROGRESS_LONG_OPTS,
    { NULL, 0, NULL, 0 },
};

static const struct option map_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
    { "format", required_argument, NULL, 'f' },
    { "output", required_argument, NULL, OPT_OUTPUT },
    { "start-offset", required_argument, NULL, OPT_START_OFFSET },
    { "max-length", required_argument, NULL, OPT_MAX_LENGTH },
    { "force-share", no_argument, NULL, 'U' },
    { NULL, 0, NULL, 0 },
};

static const struct option diff_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
    { "format", required_argument, NULL, 'f' },
    { "output", required_argument, NULL, OPT_OUTPUT },
    { "force-share", no_argument, NULL, 'U' },
    { "exact", no_argument, NULL, OPT_DIFF_EXACT },
    { "bitmap", required_argument, NULL, OPT_DIFF_BITMAP },
    CLI_PROGRESS_LONG_OPTS,
    { NULL, 0, NULL, 0 },
};

static const struct option export_diff_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
    { "format", required_argument, NULL, 'f' },
    { "force-share", no_argument, NULL, 'U' },
    { "from-snap", required_argument, NULL, OPT_XDIFF_FROM_SNAP },
    { "snapshot", required_argument, NULL, OPT_XDIFF_SNAPSHOT },
    { "whole-object", no_argument, NULL, OPT_XDIFF_WHOLE_OBJECT },
    { "export-format", required_argument, NULL, OPT_XDIFF_EXPORT_FORMAT },
    CLI_PROGRESS_LONG_OPTS,
    { NULL, 0, NULL, 0 },
};

static const struct option import_diff_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
    { "format", required_argument, NULL, 'f' },
    CLI_PROGRESS_LONG_OPTS,
    { NULL, 0, NULL, 0 },
};

static const struct option compact_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
    { "format", required_argument, NULL, 'f' },
    { "output", required_argument, NULL, OPT_OUTPUT },
    { "dry-run", no_argument, NULL, OPT_DRY_RUN },
    CLI_PROGRESS_LONG_OPTS,
    { NULL, 0, NULL, 0 },
};

static const struct option du_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
    { "format", required_argument, NULL, 'f' },
    { "output", required_argument, NULL, OPT_OUTPUT },
    { "backing-chain", no_argument, NULL, OPT_BACKING_CHAIN },
    { "force-share", no_argument, NULL, 'U' },
    { NULL, 0, NULL, 0 },
};

static const struct option commit_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
    { "dry-run", no_argument, NULL, OPT_DRY_RUN },
    { "output", required_argument, NULL, OPT_OUTPUT },
    CLI_PROGRESS_LONG_OPTS,
    { NULL, 0, NULL, 0 },
};

static const struct option rebase_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
    { "force-share", no_argument, NULL, 'U' },
    { "dry-run", no_argument, NULL, OPT_DRY_RUN },
    { "output", required_argument, NULL, OPT_OUTPUT },
    CLI_PROGRESS_LONG_OPTS,
    { NULL, 0, NULL, 0 },
};

static const struct option measure_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
    { "output", required_argument, NULL, OPT_OUTPUT },
    { "size", required_argument, NULL, OPT_SIZE },
    { "force-share", no_argument, NULL, 'U' },
    { NULL, 0, NULL, 0 },
};

static const struct option amend_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
    { "force", no_argument, NULL, OPT_FORCE },
    { "dry-run", no_argument, NULL, OPT_DRY_RUN },
    { "output", required_argument, NULL, OPT_OUTPUT },
    CLI_PROGRESS_LONG_OPTS,
    { NULL, 0, NULL, 0 },
};

static const struct option snapshot_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
    { "force-share", no_argument, NULL, 'U' },
    { "group", no_argument, NULL, OPT_SNAPSHOT_GROUP },
    { "vmstate", required_argument, NULL, OPT_SNAPSHOT_VMSTATE },
    { "vmstate-data", required_argument, NULL, OPT_SNAPSHOT_VMSTATE_DATA },
    { "dry-run", no_argument, NULL, OPT_DRY_RUN },
    { "output", required_argument, NULL, OPT_OUTPUT },
    { NULL, 0, NULL, 0 },
};

static const struct option resize_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
    { "preallocation", required_argument, NULL, OPT_PREALLOCATION },
    { "shrink", no_argument, NULL, OPT_SHRINK },
    { "dry-run", no_argument, NULL, OPT_DRY_RUN },
    { "output", required_argument, NULL, OPT_OUTPUT },
    { NULL, 0, NULL, 0 },
};

static const struct option bitmap_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
    { "add", no_argument, NULL, OPT_BITMAP_ADD },
    { "remove", no_argument, NULL, OPT_BITMAP_REMOVE },
    { "clear", no_argument, NULL, OPT_BITMAP_CLEAR },
    { "enable", no_argument, NULL, OPT_BITMAP_ENABLE },
    { "disable", no_argument, NULL, OPT_BITMAP_DISABLE },
    { "merge", required_argument, NULL, OPT_BITMAP_MERGE },
    { "output", required_argument, NULL, OPT_OUTPUT },
    { NULL, 0, NULL, 0 },
};

static const struct option dd_long[] = {
    { "help", no_argument, NULL, 'h' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "image-opts", no_argument, NULL, OPT_IMAGE_OPTS },
    { "force-share", no_argument, NULL, 'U' },
    { "output", required_argument, NULL, OPT_OUTPUT },
    CLI_PROGRESS_LONG_OPTS,
    { NULL, 0, NULL, 0 },
};

const cli_command cli_commands[] = {
    { "amend", cmd_amend,
      "[--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] "
      "[--force] [--dry-run] [--output=ofmt] [--progress=pfmt] "
      "[--progress-fd=N] -o options filename",
      ":ho:f:t:pq", amend_long },
    { "bench", cmd_bench,
      "[-c count] [-d depth] [-f fmt] [--image-opts] "
      "[--flush-interval=flush_interval] "
      "[-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] "
      "[-s buffer_size] [-S step_size] [-t cache] [-w] [-U] [--random] "
      "[--output=ofmt] filename", cmd_bench_short_opts, cmd_bench_long_opts },
    { "bitmap", cmd_bitmap,
      "(--merge SOURCE | --add | --remove | --clear | --enable | "
      "--disable)... [-b source_file [-F source_fmt]] [-g granularity] "
      "[--object objectdef] [--image-opts | -f fmt] [--output=ofmt] "
      "filename bitmap",
      ":b:f:F:g:h", bitmap_long },
    { "check", cmd_check,
      "[--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] "
      "[-r [leaks | all]] [-T src_cache] [-U] [--progress=pfmt] "
      "[--progress-fd=N] filename",
      ":hf:r:T:qU", check_long },
    { "commit", cmd_commit,
      "[--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] "
      "[-b base] [-r rate_limit] [-d] [-p] [--dry-run] [--output=ofmt] "
      "[--progress=pfmt] [--progress-fd=N] filename",
      ":hf:t:b:dpqr:", commit_long },
    { "compact", cmd_compact,
      "[--object objectdef] [--image-opts] [-f fmt] [-q] [-p] [--dry-run] "
      "[--output=ofmt] [--progress=pfmt] [--progress-fd=N] filename",
      ":f:hqp", compact_long },
    { "compare", cmd_compare,
      "[--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] "
      "[-p] [-q] [-s] [-U] [--output=ofmt] [--progress=pfmt] "
      "[--progress-fd=N] filename1 filename2",
      ":hf:F:T:pqsU", compare_long },
    { "convert", cmd_convert,
      "[--object objectdef] [--image-opts] [--target-image-opts] "
      "[--target-is-zero] [--bitmaps [--skip-broken-bitmaps]] [-U] [-C] [-c] "
      "[-p] [-q] [-n] [-f fmt] [-t cache] "
      "[-T src_cache] [-O output_fmt] [-B backing_file [-F backing_fmt]] "
      "[-o options] [-l snapshot_param] [-s snapshot_id] [-S sparse_size] "
      "[-r rate_limit] "
      "[-m num_coroutines] [-W] [--salvage] [--output=ofmt] "
      "[--progress=pfmt] [--progress-fd=N] filename "
      "[filename2 [...]] output_filename",
      ":hf:O:o:S:pt:T:qnm:WUCcl:s:B:F:r:", convert_long },
    { "create", cmd_create,
      "[--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] "
      "[-u] [-o options] [--output=ofmt] filename [size]",
      ":F:b:f:ho:qu", create_long },
    { "diff", cmd_diff,
      "[--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [-U] "
      "[--exact] [--progress=pfmt] [--progress-fd=N] filename snapshot_a "
      "[snapshot_b]\n"
      "  diff [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] "
      "[-U] [--exact] top_filename base_filename\n"
      "  diff [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] "
      "[-U] --bitmap name filename",
      ":f:hU", diff_long },
    { "du", cmd_du,
      "[--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] "
      "[--backing-chain] [-U] filename",
      ":f:hU", du_long },
    { "dd", cmd_dd,
      "[--object objectdef] [--image-opts] [-U] [-f fmt] [-O output_fmt] "
      "[bs=block_size] "
      "[count=blocks] [skip=blocks] [--output=ofmt] [--progress=pfmt] "
      "[--progress-fd=N] if=input of=output",
      ":hf:O:U", dd_long },
    { "export-diff", cmd_export_diff,
      "[--object objectdef] [--image-opts] [-f fmt] [-U] [-p] "
      "[--from-snap snapshot] [--snapshot snapshot | -l snapshot] "
      "[--whole-object] [--export-format 1|2] [--progress=pfmt] "
      "[--progress-fd=N] filename path",
      ":f:hl:pU", export_diff_long },
    { "import-diff", cmd_import_diff,
      "[--object objectdef] [--image-opts] [-f fmt] [-p] [--progress=pfmt] "
      "[--progress-fd=N] path filename",
      ":f:hp", import_diff_long },
    { "info", cmd_info,
      "[--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] "
      "[--backing-chain] [-U] filename",
      ":f:hU", info_long },
    { "io", cmd_io,
      "[--object objectdef] [--image-opts] [-f fmt] [-r] [-s] "
      "[-l snapshot_param] [-n] [-t cache] [-i aio] [-k] [-d discard] [-C] "
      "[-m] [-o options] [-T trace] [-U] [-c command]... filename "
      "(qemu-io's commands)",
      cmd_io_short_opts, cmd_io_long_opts },
    { "map", cmd_map,
      "[--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] "
      "[--max-length=len] [--output=ofmt] [-U] filename",
      ":f:hU", map_long },
    { "measure", cmd_measure,
      "[--output=ofmt] [-O output_fmt] [-o options] [--size N | "
      "[--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] "
      "[-U] filename]",
      ":hf:O:o:l:U", measure_long },
    { "rebase", cmd_rebase,
      "[--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] "
      "[-T src_cache] [-p] [-u] [--dry-run] [--output=ofmt] [--progress=pfmt] "
      "[--progress-fd=N] -b backing_file "
      "[-F backing_fmt] filename",
      ":hf:F:b:upt:T:qU", rebase_long },
    { "resize", cmd_resize,
      "[--object objectdef] [--image-opts] [-f fmt] "
      "[--preallocation=prealloc] [-q] [--shrink] [--dry-run] "
      "[--output=ofmt] filename [+ | -]size",
      ":f:hq", resize_long },
    { "serve", cmd_serve,
      "[-f fmt] [-r] [-x name] [-D description] [-k socket | -b addr "
      "-p port] [-e shared] [-t] [--fork] [--pid-file=file] [--cache=mode] "
      "[--aio=mode] [--discard=mode] [--detect-zeroes=mode] filename...\n"
      "  serve --blockdev options [--nbd-server options] [--export options] "
      "[--chardev options --monitor options | --qmp unix:path] "
      "(every option of qemu-nbd's and qemu-storage-daemon's forms: "
      "vdisk serve --help)", cmd_serve_short_opts, cmd_serve_long_opts },
    { "snapshot", cmd_snapshot,
      "[--object objectdef] [--image-opts] [-U] [-q] [-f fmt] "
      "[--output=ofmt] [-l | -a snapshot | -c snapshot | -d snapshot] "
      "[--dry-run] filename\n"
      "  snapshot --group [-f fmt] [-c snapshot | -a snapshot | -d snapshot] "
      "[--vmstate filename] [--vmstate-data file] filename...",
      ":hf:qUla:c:d:", snapshot_long },
    { NULL, NULL, NULL, NULL, NULL },
};

const cli_command *cli_find_command(const char *name)
{
    for (const cli_command *c = cli_commands; c->name; c++) {
        if (strcmp(c->name, name) == 0) {
            return c;
        }
    }
    return NULL;
}

bool cli_command_is_vdisk_only(const cli_command *c)
{
    return c->handler == cmd_io || c->handler == cmd_serve ||
           c->handler == cmd_diff || c->handler == cmd_export_diff ||
           c->handler == cmd_import_diff || c->handler == cmd_compact ||
           c->handler == cmd_du;
}

static void print_driver(const char *name, void *opaque)
{
    (void)opaque;
    printf(" %s", name);
}

/*
 * vdisk's own options of qemu-img's subcommands: unknown options under
 * qemu-img's name, as in QEMU (cli_getopt(), cmd_bench.c), and left out
 * of its help.
 */
static const struct {
    const char *command, *option;
} vdisk_only_options[] = {
    { "bench", "random" },
    { "amend", "dry-run" },
    { "amend", "output" },
    { "commit", "dry-run" },
    { "commit", "output" },
    { "rebase", "dry-run" },
    { "rebase", "output" },
    { "resize", "dry-run" },
    { "resize", "output" },
    { "snapshot", "dry-run" },
    { "snapshot", "group" },
    { "snapshot", "vmstate" },
    { "snapshot", "vmstate-data" },
    { "snapshot", "output" },
};

/* qemu-img's commands that have --output (all others: vdisk's own). */
static const char *const qemu_output_commands[] = { "check", "info", "map",
                                                     "measure", NULL };

bool cli_option_is_vdisk_only(const char *command, const char *option)
{
    /* The machine-readable forms: vdisk's own where qemu-img lacks them
     * (docs/json.md). */
    if (strcmp(option, "progress") == 0 ||
        strcmp(option, "progress-fd") == 0) {
        return true;
    }
    if (strcmp(option, "output") == 0) {
        return !cli_one_of(command, qemu_output_commands);
    }
    for (size_t i = 0;
         i < sizeof(vdisk_only_options) / sizeof(vdisk_only_options[0]); i++) {
        if (strcmp(vdisk_only_options[i].command, command) == 0 &&
            strcmp(vdisk_only_options[i].option, option) == 0) {
            return true;
        }
    }
    return false;
}

/* A synopsis under qemu-img's name: its first line (the others are
 * vdisk's own forms), without the brackets of vdisk's own options. */
static void print_qemu_synopsis(const cli_command *c)
{
    const char *p = c->synopsis;
    size_t len = strcspn(p, "\n");

    printf("  %s ", c->name);
    while (len > 0) {
        const char *next = memchr(p, '[', len);
        size_t n = next ? (size_t)(next - p) : len;
        char opt[64];

        fwrite(p, 1, n, stdout);
        p += n;
        len -= n;
        if (!next) {
            break;
        }
        /* "[--name]" or "[--name ...]": skipped when vdisk's own. */
        if (sscanf(p, "[--%63[a-z-]", opt) == 1 &&
            cli_option_is_vdisk_only(c->name, opt)) {
            size_t skip = strcspn(p, "]") + 1;
            if (skip > len) {
                skip = len;
            }
            /* The separating space before it goes too. */
            if (p > c->synopsis && p[-1] == ' ' && skip < len &&
                p[skip] == ' ') {
                skip++;
            }
            p += skip;
            len -= skip;
        } else {
            fputc('[', stdout);
            p++;
            len--;
        }
    }
    fputc('\n', stdout);
}

void cli_print_help(void)
{
    bool qemu = cli_as == CLI_QEMU_IMG;

    if (qemu) {
        cli_print_qemu_version();
        printf("usage: qemu-img [standard options] command "
               "[command options]\n"
               "QEMU disk image utility\n");
    } else {
        printf("vdisk version %s\n"
               "usage: vdisk command [command options]\n"
               "Disk image utility, compatible with qemu-img 7.2\n",
               vd_version());
    }
    printf("\n"
           "    '-h', '--help'       display this help and exit\n"
           "    '-V', '--version'    output version information and exit\n"
           "\n"
           "Command syntax:\n");
    for (const cli_command *c = cli_commands; c->name; c++) {
        if (qemu && cli_command_is_vdisk_only(c)) {
            continue;
        }
        if (qemu) {
            print_qemu_synopsis(c);
        } else {
            printf("  %s %s\n", c->name, c->synopsis);
        }
    }
    printf("\n"
"Command parameters:\n"
"  'filename' is a disk image filename\n"
"  'objectdef' is a user creatable object definition (docs/objects.md): a\n"
"    secret, a throttle-group, authz-simple, authz-list, tls-creds-x509 or\n"
"    tls-creds-psk; '--object help' lists them, '--object TYPE,help' their\n"
"    properties\n"
"  'fmt' is the disk image format. It is guessed automatically in most cases\n"
"  'cache' is the cache mode used to write the output disk image, the valid\n"
"    options are: 'none', 'writeback' (default, except for convert), 'writethrough',\n"
"    'directsync' and 'unsafe' (default for convert)\n"
"  'src_cache' is the cache mode used to read input disk images, the valid\n"
"    options are the same as for the 'cache' option\n"
"  'size' is the disk image size in bytes. Optional suffixes\n"
"    'k' or 'K' (kilobyte, 1024), 'M' (megabyte, 1024k), 'G' (gigabyte, 1024M),\n"
"    'T' (terabyte, 1024G), 'P' (petabyte, 1024T) and 'E' (exabyte, 1024P)  are\n"
"    supported. 'b' is ignored.\n"
"  'output_filename' is the destination disk image filename\n"
"  'output_fmt' is the destination format\n"
"  'options' is a comma separated list of format specific options in a\n"
"    name=value format. Use -o help for an overview of the options supported by\n"
"    the used format\n"
"  '-c' indicates that target image must be compressed (qcow format only)\n"
"  '-u' allows unsafe backing chains. For image creation, allow creating\n"
"       without attempting to open the backing file.\n"
"%s"
"  '-p' show progress of command (only certain commands)\n"
"  '-q' use Quiet mode - do not print any output (except errors)\n"
"  '-S' indicates the consecutive number of bytes (defaults to 4k) that must\n"
"       contain only zeros for %s to create a sparse image during\n"
"       conversion. If the number of bytes is 0, the source will not be scanned for\n"
"       unallocated or zero sectors, and the destination image will always be\n"
"       fully allocated\n"
"  '--output' takes the format in which the output must be done (human or json)\n"
"  '-n' skips the target volume creation (useful if the volume is created\n"
"       prior to running %s)\n"
"\n"
"Parameters to check subcommand:\n"
"  '-r' tries to repair any inconsistencies that are found during the check.\n"
"       '-r leaks' repairs only cluster leaks, whereas '-r all' fixes all\n"
"       kinds of errors, with a higher risk of choosing the wrong fix or\n"
"       hiding corruption that has already occurred.\n"
"\n"
"Parameters to convert subcommand:\n"
"  '-m' specifies how many threads work in parallel during the convert\n"
"       process (defaults to 8)\n"
"  '-W' allow to write to the target out of order rather than sequential\n"
"  '-C' use copy offloading (copy_file_range) where source and target allow it\n"
"  '-r' limits the write rate to rate_limit bytes per second\n"
"  '--salvage' reads past read errors: unreadable sectors become zeros\n"
"  '--bitmaps' copies the source's persistent dirty bitmaps to the target\n"
"       (qcow2 to qcow2); '--skip-broken-bitmaps' leaves out inconsistent ones\n"
"\n"
"Parameters to compare subcommand:\n"
"  '-f' first image format\n"
"  '-F' second image format\n"
"  '-s' run in Strict mode - fail on different image size or sector allocation\n"
"\n"
"Parameters to snapshot subcommand:\n"
"  'snapshot' is the name of the snapshot to create, apply or delete\n"
"  '-a' applies a snapshot (revert disk to saved state)\n"
"  '-c' creates a snapshot\n"
"  '-d' deletes a snapshot\n"
"  '-l' lists all snapshots in the given image\n",
           /* vdisk's CMD -h is that command's own help (tools/help.c) */
           qemu ? "  '-h' with or without a command shows this help and lists "
                  "the supported formats\n"
                : "  '-h' shows this help and lists the supported formats;\n"
                  "       'vdisk CMD -h' and 'vdisk help CMD' show one "
                  "command's options\n",
           cli_prog, cli_prog);
    if (!qemu) {
        printf(
"  '--group' runs -c, -a or -d on all the given images at once (one VM's\n"
"       disks); '--vmstate' names the image holding the VM state and\n"
"       '--vmstate-data' a file stored as VM state (-c) or restored (-a)\n"
"\n"
"Dry runs (commit, rebase, amend, resize, snapshot -a/-d):\n"
"  '--dry-run' prints what the command would change and writes nothing;\n"
"       '--output=json' prints it as one JSON object\n");
    }
    printf("\n"
"Parameters to dd subcommand:\n"
"  'bs=BYTES' read and write up to BYTES bytes at a time (default: 512)\n"
"  'count=N' copy only N input blocks\n"
"  'if=FILE' read from FILE\n"
"  'of=FILE' write to FILE\n"
"  'skip=N' skip N bs-sized blocks at the start of input\n"
"\n");
    if (!qemu) {
        printf(
"Machine-readable forms (docs/json.md):\n"
"  '--output=json' prints a command's result as JSON (every command that\n"
"       prints something)\n"
"  '--progress=json' writes progress as one JSON object per line on stderr\n"
"       (convert, commit, rebase, compare, dd, check, diff, amend)\n"
"  '--progress-fd=N' writes progress to file descriptor N: nbdcopy's\n"
"       \"N/100\" lines, or the JSON lines with '--progress=json'\n"
"\n");
    }
    printf("Supported formats:");
    vd_list_drivers(print_driver, NULL);
    printf("\n");
}

/* The command whose options cli_getopt() parsed last: its progress
 * lines name it. */
static const char *progress_command = "vdisk";

int cli_getopt(const char *name, int argc, char **argv)
{
    const cli_command *c = cli_find_command(name);
    int ch;

    int longidx;

    progress_command = name;
    for (;;) {
        longidx = -1;
        ch = getopt_long(argc, argv, c->short_opts, c->long_opts, &longidx);
        if (cli_as == CLI_QEMU_IMG && longidx >= 0 && ch != ':' &&
            ch != '?' &&
            cli_option_is_vdisk_only(name, c->long_opts[longidx].name)) {
            cli_foreign_option_error(ch, longidx, argv);
            cli_help_hint();
            return '?';
        }
        if (ch == OPT_OBJECT) {
            if (cli_add_object(optarg, NULL) < 0) {
                exit(strcmp(name, "compare") == 0 ? 2 : 1);
            }
        } else if (ch == OPT_PROGRESS || ch == OPT_PROGRESS_FD) {
            if (cli_parse_progress_arg(ch, optarg) < 0) {
                return '?';
            }
        } else {
            break;
        }
    }
    /* vdisk's -h is the command's own help; qemu-img's (and so the
     * command's 'h' case) the whole of it. */
    if (ch == 'h' && cli_as == CLI_VDISK) {
        cli_print_command_help(c);
        vd_object_del_all();
        exit(0);
    }
    if (ch == ':') {
        cli_error_hint("missing argument for option '%s'", argv[optind - 1]);
        return '?';
    }
    if (ch == '?') {
        cli_error_hint("unrecognized option '%s'", argv[optind - 1]);
        return '?';
    }
    return ch;
}

int cli_getopt_common(const char *name, int argc, char **argv,
                      cli_common *co)
{
    int ch;

    while ((ch = cli_getopt(name, argc, argv)) != -1) {
        switch (ch) {
        case 'h':
            /* Only under qemu-img's name: cli_getopt() took vdisk's. */
            cli_print_help();
            vd_object_del_all();
            exit(0);
        case 'f':
            co->fmt = optarg;
            continue;
        case 'U':
        case OPT_FORCE_SHARE_LONG:
            co->flags |= VD_O_FORCE_SHARE;
            continue;
        case OPT_IMAGE_OPTS:
            co->image_opts = true;
            continue;
        case 'q':
            co->quiet = true;
            continue;
        case 'p':
            co->progress = true;
            continue;
        case OPT_OUTPUT:
            if (co->skip & CLI_COMMON_OUTPUT) {
                return ch;
            }
            if (cli_parse_output(optarg, &co->json) < 0) {
                return '?';
            }
            continue;
        }
        return ch;
    }
    return -1;
}

/* ---- messages ---- */

static void vreport(const char *prefix, const char *fmt, va_list ap)
{
    /* One line at a time: convert's workers warn concurrently. */
    flockfile(stderr);
    fprintf(stderr, "%s: %s", cli_prog, prefix);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    funlockfile(stderr);
}

void cli_verror(const char *fmt, va_list ap)
{
    vreport("", fmt, ap);
}

void cli_error(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vreport("", fmt, ap);
    va_end(ap);
}

void cli_error_hint(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vreport("", fmt, ap);
    va_end(ap);
    cli_help_hint();
}

void cli_help_hint(void)
{
    fprintf(stderr, "Try '%s --help' for more information\n", cli_prog);
}

void cli_getopt_error(int ch, char **argv)
{
    const char *arg = argv[optind - 1];
    bool is_long = arg[0] == '-' && arg[1] == '-';

    if (ch == ':') {
        if (is_long) {
            cli_error("option '%s' requires an argument", arg);
        } else {
            cli_error("option requires an argument -- '%c'", optopt);
        }
    } else if (is_long && optopt) {
        /* glibc sets optopt for a known long option given a value. */
        cli_error("option '%.*s' doesn't allow an argument",
                  (int)strcspn(arg, "="), arg);
    } else if (is_long) {
        cli_error("unrecognized option '%s'", arg);
    } else {
        cli_error("invalid option -- '%c'", optopt);
    }
}

void cli_foreign_option_error(int ch, int longidx, char **argv)
{
    /* An option with a separate argument is the element before it. */
    const char *arg = optarg && optarg == argv[optind - 1]
                      ? argv[optind - 2] : argv[optind - 1];

    if (longidx >= 0) {
        cli_error("unrecognized option '%s'", arg);
    } else {
        cli_error("invalid option -- '%c'", ch);
    }
}

void cli_warn(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vreport("warning: ", fmt, ap);
    va_end(ap);
}

void cli_qprintf(bool quiet, const char *fmt, ...)
{
    va_list ap;

    if (quiet) {
        return;
    }
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
}

void cli_print_hint(const vd_error *err)
{
    if (err->code && err->hint[0]) {
        fprintf(stderr, "%s\n", err->hint);
    }
}

void cli_report_vd_error(const vd_error *err, int ret, const char *fallback)
{
    if (err->code && err->message[0]) {
        cli_error("%s", err->message);
    } else {
        cli_error("%s: %s", fallback, strerror(ret < 0 ? -ret : EIO));
    }
    cli_print_hint(err);
}

bool cli_report_unsupported_format(const char *filename, const char *fmt)
{
    vd_error err = VD_ERROR_INIT;

    if (!fmt || vd_format_check(fmt, filename, &err) != -ENOTSUP) {
        return false;
    }
    cli_error("%s", err.message);
    return true;
}

void *cli_io_buffer(size_t size)
{
    void *p = NULL;

    if (posix_memalign(&p, 4096, size ? size : 1) != 0) {
        return NULL;
    }
    return p;
}

const char *cli_strip_filename(const char *msg, const char *filename)
{
    size_t n = strlen(filename);

    if (strncmp(msg, filename, n) == 0 && msg[n] == ':' && msg[n + 1] == ' ') {
        return msg + n + 2;
    }
    return msg;
}

/* ---- objects ---- */

int cli_add_object(const char *arg, const char *context)
{
    vd_error err = VD_ERROR_INIT;
    char *help = NULL;
    int r = vd_object_add_cli(arg, &help, &err);

    if (r < 0) {
        if (context) {
            vd_error_prepend(&err, "%s: ", context);
        }
        cli_report_vd_error(&err, r, "Could not add object");
        return -1;
    }
    if (help) {
        fputs(help, stdout);
        free(help);
        vd_object_del_all();
        exit(0);
    }
    return 0;
}

/* ---- images ---- */

/* cli_open() of @file (NULL: @opts say what to open) whose messages call
 * it @name. */
static vd_node *cli_open_named(const char *name, const char *file,
                               const char *fmt, unsigned flags,
                               const vd_opts *opts)
{
    const char *filename = name;
    vd_error err = VD_ERROR_INIT;
    vd_node *node = NULL;
    int ret;

    /* qemu-img warns about a probed raw image only when it may write. */
    if (!(flags & VD_O_RDWR)) {
        flags |= VD_O_QUIET;
    }
    ret = vd_open(&node, file, fmt, opts, flags, &err);
    if (ret < 0) {
        if (err.message[0]) {
            /* qemu's own prefix already names the file. */
            cli_error("Could not open '%s': %s", filename,
                      cli_strip_filename(err.message, filename));
            cli_print_hint(&err);
        } else {
            cli_error("Could not open '%s': %s", filename, strerror(-ret));
        }
        return NULL;
    }
    return node;
}


vd_node *cli_open(const char *filename, const char *fmt, unsigned flags,
                  const vd_opts *opts)
{
    return cli_open_named(filename, filename, fmt, flags, opts);
}

vd_opts *cli_parse_image_opts(const char *str, const vd_opts *base)
{
    vd_error err = VD_ERROR_INIT;
    vd_opts *o = base ? vd_opts_clone(base) : vd_opts_new();

    if (!o) {
        cli_error("out of memory");
        return NULL;
    }
    /* Later keys replace earlier ones: the user's win over @base's. */
    if (vd_opts_parse(o, str, NULL, &err) < 0) {
        cli_report_vd_error(&err, -EINVAL, str);
        vd_opts_free(&o);
    }
    return o;
}

vd_node *cli_open_image(const char *filename, const char *fmt,
                        bool image_opts, unsigned flags, const vd_opts *opts)
{
    vd_opts *o;
    vd_node *node;

    if (!image_opts) {
        return cli_open(filename, fmt, flags, opts);
    }
    if (fmt) {
        cli_error("--image-opts and --format are mutually exclusive");
        return NULL;
    }
    o = cli_parse_image_opts(filename, opts);
    if (!o) {
        return NULL;
    }
    node = cli_open_named(filename, NULL, NULL, flags, o);
    vd_opts_free(&o);
    return node;
}

/* ---- sizes ---- */

int cli_cvtnum(const char *what, const char *str, uint64_t *out)
{
    int ret = vd_parse_size(str, out);

    if (ret == -ERANGE) {
        cli_error("Invalid %s specified. Must be between 0 and "
                  "9223372036854775807.", what);
    } else if (ret < 0) {
        cli_error("Invalid %s specified. You may use k, M, G, T, P "
                  "or E suffixes for", what);
        cli_error("kilobytes, megabytes, gigabytes, terabytes, petabytes "
                  "and exabytes.");
    }
    return ret;
}

void cli_size_to_str(char *buf, size_t len, uint64_t val)
{
    static const char *const suffixes[] = { "", "Ki", "Mi", "Gi", "Ti",
                                            "Pi", "Ei" };
    int exp;

    /* Scaling by 1024/1000 switches to the next unit once the integer part
     * would reach 1000, which is how qemu keeps three significant digits. */
    frexp(val / (1000.0 / 1024.0), &exp);
    exp = (exp - 1) / 10;
    if (exp < 0) {
        exp = 0;
    }
    if (exp > 6) {
        exp = 6;
    }
    snprintf(buf, len, "%0.3g %sB", (double)val / (double)(1ULL << (exp * 10)),
             suffixes[exp]);
}

const char *cli_cache_mode(const char *mode)
{
    static const char *const modes[] = { "none", "writeback", "unsafe",
                                         "directsync", "writethrough" };

    if (strcmp(mode, "off") == 0) {
        return "none";
    }
    for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
        if (strcmp(mode, modes[i]) == 0) {
            return modes[i];
        }
    }
    return NULL;
}

bool cli_one_of(const char *mode, const char *const *modes)
{
    for (; *modes; modes++) {
        if (strcmp(mode, *modes) == 0) {
            return true;
        }
    }
    return false;
}

bool cli_aio_mode_valid(const char *mode)
{
    static const char *const modes[] = { "threads", "native", "io_uring",
                                         NULL };

    return cli_one_of(mode, modes);
}

bool cli_discard_mode_valid(const char *mode)
{
    static const char *const modes[] = { "ignore", "off", "unmap", "on",
                                         NULL };

    return cli_one_of(mode, modes);
}

int cli_parse_output(const char *arg, bool *json)
{
    if (strcmp(arg, "json") == 0) {
        *json = true;
    } else if (strcmp(arg, "human") == 0) {
        *json = false;
    } else {
        cli_error("--output must be used with human or json as argument.");
        return -EINVAL;
    }
    return 0;
}

void cli_print_json(json_object *obj)
{
    fputs(json_object_to_json_string_ext(obj, JSON_C_TO_STRING_PRETTY |
                                              JSON_C_TO_STRING_SPACED |
                                              JSON_C_TO_STRING_NOSLASHESCAPE),
          stdout);
    fputc('\n', stdout);
    fflush(stdout);
    json_object_put(obj);
}

/* ---- progress ---- */

/* The process-wide choice of --progress and --progress-fd. */
enum { PROGRESS_HUMAN, PROGRESS_JSON, PROGRESS_FD_PERCENT };
static bool progress_json;
static int progress_fd = -1;

int cli_parse_progress_arg(int opt, const char *arg)
{
    if (opt == OPT_PROGRESS) {
        if (strcmp(arg, "json") == 0) {
            progress_json = true;
        } else if (strcmp(arg, "human") == 0) {
            progress_json = false;
        } else {
            cli_error("--progress must be used with human or json as "
                      "argument.");
            return -1;
        }
        return 0;
    }
    char *end;
    long fd;

    errno = 0;
    fd = strtol(arg, &end, 10);
    if (!*arg || *end || errno || fd < 0 || fd > INT32_MAX) {
        cli_error("--progress-fd: '%s' is not a file descriptor number", arg);
        return -1;
    }
    /* Refused now, not at the first line: the command has not started.
     * Standard output carries the command's result, never progress. */
    int fl = fcntl((int)fd, F_GETFL);

    if (fl < 0) {
        cli_error("--progress-fd: file descriptor %ld is not open: %s", fd,
                  strerror(errno));
        return -1;
    }
    if ((fl & O_ACCMODE) == O_RDONLY) {
        cli_error("--progress-fd: file descriptor %ld is not open for "
                  "writing", fd);
        return -1;
    }
    if (fd == STDOUT_FILENO) {
        cli_error("--progress-fd: progress never goes to standard output "
                  "(1), where the result goes");
        return -1;
    }
    progress_fd = (int)fd;
    return 0;
}

bool cli_progress_machine(void)
{
    return progress_json || progress_fd >= 0;
}

static double progress_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* write() all of @buf to @p's fd. A consumer that went away does not
 * stop the command: SIGPIPE is held off around the write (and a pending
 * one taken back), and after a failed write the meter goes quiet. */
static void progress_write(cli_progress *p, const char *buf, size_t len)
{
    sigset_t pipe_set, old;
    bool broken = false;

    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
    while (len > 0) {
        ssize_t n = write(p->fd, buf, len);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            broken = true;
            break;
        }
        buf += n;
        len -= (size_t)n;
    }
    if (broken && errno == EPIPE && !sigismember(&old, SIGPIPE)) {
        const struct timespec now = { 0, 0 };

        sigtimedwait(&pipe_set, NULL, &now);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (broken) {
        p->enabled = false;
    }
}

static void progress_show(cli_progress *p, float v)
{
    if (p->mode == PROGRESS_HUMAN) {
        printf("    (%3.2f/100%%)\r", v);
        fflush(stdout);
    } else if (p->mode == PROGRESS_FD_PERCENT) {
        /* nbdcopy --progress=FD: an integer, each value once. */
        int n = (int)v;
        char line[16];

        if (n != p->last_int) {
            p->last_int = n;
            progress_write(p, line,
                           (size_t)snprintf(line, sizeof(line), "%d/100\n",
                                            n));
        }
    } else {
        char line[256];
        int len;

        len = snprintf(line, sizeof(line),
                       "{\"command\": \"%s\", \"progress\": %.2f", p->command,
                       v);
        if (p->have_bytes) {
            len += snprintf(line + len, sizeof(line) - (size_t)len,
                            ", \"bytes\": %" PRIu64 ", \"total\": %" PRIu64,
                            p->bytes, p->total);
        }
        len += snprintf(line + len, sizeof(line) - (size_t)len,
                        ", \"elapsed\": %.3f}\n", progress_now() - p->start);
        progress_write(p, line, (size_t)len);
    }
    p->last = v;
}

void cli_progress_init(cli_progress *p, bool enabled, float min_skip)
{
    p->enabled = enabled || cli_progress_machine();
    p->last = 0;
    p->min_skip = min_skip;
    p->last_int = -1;
    p->have_bytes = false;
    p->bytes = p->total = 0;
    p->start = progress_now();
    p->command = progress_command;
    p->fd = progress_fd >= 0 ? progress_fd : STDERR_FILENO;
    p->mode = progress_json ? PROGRESS_JSON
            : progress_fd >= 0 ? PROGRESS_FD_PERCENT : PROGRESS_HUMAN;
    if (p->enabled) {
        progress_show(p, 0);
    }
}

void cli_progress_print(cli_progress *p, double percent)
{
    if (!p->enabled) {
        return;
    }
    if (percent > 100) {
        percent = 100;
    }
    /* Like qemu: redraw once the value moved by min_skip, and at 100.
     * Single precision, as qemu computes it. */
    float cur = (float)percent;
    if (p->mode != PROGRESS_HUMAN) {
        /* The machine forms promise a value that never goes back, and
         * 100 once. */
        if (cur < p->last || (cur == 100 && p->last == 100)) {
            return;
        }
        if (cur > p->last + p->min_skip || cur == 100) {
            progress_show(p, cur);
        }
        return;
    }
    if (cur > p->last + p->min_skip || cur < p->last - p->min_skip ||
        cur == 100) {
        progress_show(p, cur);
    }
}

void cli_progress_print_bytes(cli_progress *p, uint64_t done, uint64_t total)
{
    if (!p->enabled) {
        return;
    }
    p->have_bytes = true;
    p->bytes = done;
    p->total = total;
    cli_progress_print(p, total ? (double)done * 100.0 / (double)total : 100);
}

void cli_progress_end(cli_progress *p)
{
    if (p->enabled && p->mode == PROGRESS_HUMAN) {
        printf("\n");
        fflush(stdout);
    }
}

static void parse_snapshot_failed(const char *param)
{
    /* qemu-nbd quotes it `so', qemu-img 'so'. */
    if (cli_as == CLI_QEMU_NBD) {
        cli_error("Failed in parsing snapshot param `%s'", param);
    } else {
        cli_error("Failed in parsing snapshot param '%s'", param);
    }
}

/* Loads snapshot @param ("snapshot.id=X,snapshot.name=Y" or a plain id or
 * name) into the read-only @node. Returns 0 or prints and returns -1. */
int cli_load_snapshot(vd_node *node, const char *param)
{
    vd_error err = VD_ERROR_INIT;
    int ret;

    if (strncmp(param, "snapshot.", 9) == 0) {
        vd_opts *o = vd_opts_new();
        const char *bad = NULL;
        if (!o || vd_opts_parse(o, param, NULL, &err) < 0) {
            vd_opts_free(&o);
            parse_snapshot_failed(param);
            return -1;
        }
        for (size_t i = 0; i < vd_opts_count(o) && !bad; i++) {
            const char *k, *v;
            vd_opts_nth(o, i, &k, &v);
            if (strcmp(k, "snapshot.id") && strcmp(k, "snapshot.name")) {
                bad = k;
            }
        }
        if (bad) {
            cli_error("Invalid parameter '%s'", bad);
            parse_snapshot_failed(param);
            vd_opts_free(&o);
            return -1;
        }
        ret = vd_snapshot_load_tmp(node, vd_opts_get(o, "snapshot.id"),
                                   vd_opts_get(o, "snapshot.name"), &err);
        vd_opts_free(&o);
    } else {
        ret = vd_snapshot_load_tmp_by_id_or_name(node, param, &err);
    }
    if (ret < 0) {
        cli_error("Failed to load snapshot: %s",
                  err.message[0] ? cli_strip_filename(err.message,
                                                      vd_node_filename(node))
                                 : strerror(-ret));
        return -1;
    }
    return 0;
}
