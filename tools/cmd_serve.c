/*
 * vdisk serve: export images over NBD, with qemu-nbd's options (see
 * ../shared/specs/qemu-nbd.rst and docs/nbd.md). This file only parses
 * the command line, opens the images and drives the server in src/nbd/.
 * Invoked as qemu-nbd it takes qemu-nbd's form only (one image), as
 * qemu-storage-daemon the daemon form only, each with that tool's help,
 * version and messages (docs/compat.md); `vdisk serve` takes both and
 * vdisk's extras.
 *
 * Order matters for --fork: the listening sockets are created first, the
 * process then forks, and the child opens the images (nodes must not be
 * open across fork(), see vdisk.h) and tells the parent through a pipe
 * that it is serving; only then does the parent exit, so a script that
 * runs `vdisk serve --fork ...` can connect as soon as it returns.
 *
 * Several images may be exported at once: `-x NAME` and `-D DESC` may be
 * repeated and pair with the images in order.
 *
 * The second form is qemu-storage-daemon's: --blockdev, --nbd-server,
 * --export, --chardev with --monitor, and --qmp build a QMP daemon
 * (src/qmp/, docs/qmp.md) that serves until `quit` or a signal. Each
 * option is turned into the QMP command it stands for (blockdev-add,
 * nbd-server-start, block-export-add) and checked by the same schema.
 * --daemonize (daemon form) forks before anything is opened, as QEMU's
 * os_daemonize() does: the parent waits on a pipe and exits 0 only when
 * the daemon has its nodes, exports and monitors and wrote its pid file
 * (locked, as qemu_write_pidfile() does), or 1 when the daemon died
 * first, having printed its error on the stderr it still shared; the
 * daemon then leaves the terminal (stdio on /dev/null, cwd /).
 * -T/--trace is accepted as a QEMU built without a tracing backend
 * accepts it: checked, and ignored.
 * --object works in both forms: it adds to the library's object
 * registry (secrets, TLS credentials, ...), which --tls-creds (qemu-nbd
 * form) or the tls-creds of --nbd-server and QMP nbd-server-start
 * (daemon form) then name. Objects are added once the command line is
 * read (the form decides how errors are worded), in their order, before
 * anything else is checked or opened.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "commands.h"
#include "serve_client.h"
#include "util.h"
#include "qmp.h"
#include "vdisk/nbd-server.h"
#include "vdisk/vdisk.h"

#define SERVE_DEFAULT_PORT "10809"
#define SERVE_WORKERS      16
#define SERVE_MAX_EXPORTS  64
/* The NBD protocol's longest export name or description; qemu-nbd
 * refuses longer ones when it parses -x and -D. */
#define SERVE_MAX_STRING   4096
/* qemu-nbd -c's socket when -k is not given (DEVICE: the device's base
 * name). */
#define SERVE_SOCKET_PATH  "/var/lock/qemu-nbd-DEVICE"
/* sizeof(sockaddr_un.sun_path) on Linux, as qemu-nbd counts it. */
#define SERVE_SUN_PATH_MAX 108

enum {
    SERVE_OPT_CACHE = 300,
    SERVE_OPT_AIO,
    SERVE_OPT_DISCARD,
    SERVE_OPT_DETECT_ZEROES,
    SERVE_OPT_PIDFILE,
    SERVE_OPT_FORK,
    SERVE_OPT_WORKERS,
    SERVE_OPT_OBJECT,
    SERVE_OPT_TLS_CREDS,
    SERVE_OPT_TLS_AUTHZ,
    SERVE_OPT_IMAGE_OPTS,
    SERVE_OPT_BLOCKDEV,
    SERVE_OPT_NBD_SERVER,
    SERVE_OPT_EXPORT,
    SERVE_OPT_CHARDEV,
    SERVE_OPT_MONITOR,
    SERVE_OPT_QMP,
    SERVE_OPT_DAEMONIZE,
    SERVE_OPT_TLS_HOSTNAME,
    SERVE_OPT_HANDSHAKE_LIMIT,
};

/* The daemon-form options, kept in command-line order per kind. */
#define SERVE_MAX_DAEMON_OPTS 64
enum { D_BLOCKDEV, D_NBD, D_EXPORT, D_CHARDEV, D_MONITOR, D_QMP, D_KINDS };
static const char *const daemon_opt_names[D_KINDS] = {
    "--blockdev", "--nbd-server", "--export", "--chardev", "--monitor",
    "--qmp",
};

/* The options of both forms (util.c's cli_commands[] points here too);
 * serve_opt_allowed() says which ones each program takes. */
const char cmd_serve_short_opts[] = ":hk:b:p:e:trx:D:f:l:nT:Vo:sc:dvAB:L";
const struct option cmd_serve_long_opts[] = {
    { "help", no_argument, NULL, 'h' },
    { "socket", required_argument, NULL, 'k' },
    { "bind", required_argument, NULL, 'b' },
    { "port", required_argument, NULL, 'p' },
    { "shared", required_argument, NULL, 'e' },
    { "persistent", no_argument, NULL, 't' },
    { "read-only", no_argument, NULL, 'r' },
    { "export-name", required_argument, NULL, 'x' },
    { "description", required_argument, NULL, 'D' },
    { "format", required_argument, NULL, 'f' },
    { "load-snapshot", required_argument, NULL, 'l' },
    { "nocache", no_argument, NULL, 'n' },
    { "cache", required_argument, NULL, SERVE_OPT_CACHE },
    { "aio", required_argument, NULL, SERVE_OPT_AIO },
    { "discard", required_argument, NULL, SERVE_OPT_DISCARD },
    { "detect-zeroes", required_argument, NULL, SERVE_OPT_DETECT_ZEROES },
    { "pid-file", required_argument, NULL, SERVE_OPT_PIDFILE },
    { "pidfile", required_argument, NULL, SERVE_OPT_PIDFILE },
    { "fork", no_argument, NULL, SERVE_OPT_FORK },
    { "workers", required_argument, NULL, SERVE_OPT_WORKERS },
    { "object", required_argument, NULL, SERVE_OPT_OBJECT },
    { "tls-creds", required_argument, NULL, SERVE_OPT_TLS_CREDS },
    { "tls-authz", required_argument, NULL, SERVE_OPT_TLS_AUTHZ },
    { "image-opts", no_argument, NULL, SERVE_OPT_IMAGE_OPTS },
    { "blockdev", required_argument, NULL, SERVE_OPT_BLOCKDEV },
    { "nbd-server", required_argument, NULL, SERVE_OPT_NBD_SERVER },
    { "export", required_argument, NULL, SERVE_OPT_EXPORT },
    { "chardev", required_argument, NULL, SERVE_OPT_CHARDEV },
    { "monitor", required_argument, NULL, SERVE_OPT_MONITOR },
    { "qmp", required_argument, NULL, SERVE_OPT_QMP },
    { "daemonize", no_argument, NULL, SERVE_OPT_DAEMONIZE },
    { "trace", required_argument, NULL, 'T' },
    { "version", no_argument, NULL, 'V' },
    { "offset", required_argument, NULL, 'o' },
    { "allocation-depth", no_argument, NULL, 'A' },
    { "bitmap", required_argument, NULL, 'B' },
    { "connect", required_argument, NULL, 'c' },
    { "disconnect", no_argument, NULL, 'd' },
    { "list", no_argument, NULL, 'L' },
    { "snapshot", no_argument, NULL, 's' },
    { "verbose", no_argument, NULL, 'v' },
    { "tls-hostname", required_argument, NULL, SERVE_OPT_TLS_HOSTNAME },
    { "handshake-limit", required_argument, NULL, SERVE_OPT_HANDSHAKE_LIMIT },
    { NULL, 0, NULL, 0 },
};

/* qemu-nbd's --help, in its layout, with the options this tool takes. */
static void nbd_usage(void)
{
    printf(
"Usage: qemu-nbd [OPTIONS] FILE\n"
"  or:  qemu-nbd -L [OPTIONS]\n"
"QEMU Disk Network Block Device Utility\n"
"\n"
"  -h, --help                display this help and exit\n"
"  -V, --version             output version information and exit\n"
"\n"
"Connection properties:\n"
"  -p, --port=PORT           port to listen on (default `%s')\n"
"  -b, --bind=IFACE          interface to bind to (default `0.0.0.0')\n"
"  -k, --socket=PATH         path to the unix socket\n"
"                            (default '" SERVE_SOCKET_PATH "')\n"
"  -e, --shared=NUM          device can be shared by NUM clients (default '1')\n"
"  -t, --persistent          don't exit on the last connection\n"
"  -v, --verbose             display extra debugging information\n"
"  -x, --export-name=NAME    expose export by name (default is empty string)\n"
"  -D, --description=TEXT    export a human-readable description\n"
"\n"
"Exposing part of the image:\n"
"  -o, --offset=OFFSET       offset into the image\n"
"  -A, --allocation-depth    expose the allocation depth\n"
"  -B, --bitmap=NAME         expose a persistent dirty bitmap\n"
"\n"
"General purpose options:\n"
"  -L, --list                list exports available from another NBD server\n"
"  --object type,id=ID,...   define an object such as 'secret' for providing\n"
"                            passwords and/or encryption keys\n"
"  --tls-creds=ID            use id of an earlier --object to provide TLS\n"
"  --tls-authz=ID            use id of an earlier --object to provide\n"
"                            authorization\n"
"  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]\n"
"                            specify tracing options\n"
"  --fork                    fork off the server process and exit the parent\n"
"                            once the server is running\n"
"  --pid-file=PATH           store the server's process ID in the given file\n"
"\n"
"Kernel NBD client support:\n"
"  -c, --connect=DEV         connect FILE to the local NBD device DEV\n"
"  -d, --disconnect          disconnect the specified device\n"
"\n"
"Block device options:\n"
"  -f, --format=FORMAT       set image format (raw, qcow2, ...)\n"
"  -r, --read-only           export read-only\n"
"  -s, --snapshot            use FILE as an external snapshot, create a temporary\n"
"                            file with backing_file=FILE, redirect the write to\n"
"                            the temporary one\n"
"  -l, --load-snapshot=SNAPSHOT_PARAM\n"
"                            load an internal snapshot inside FILE and export it\n"
"                            as an read-only device, SNAPSHOT_PARAM format is\n"
"                            'snapshot.id=[ID],snapshot.name=[NAME]', or\n"
"                            '[ID_OR_NAME]'\n"
"  -n, --nocache             disable host cache\n"
"      --cache=MODE          set cache mode used to access the disk image, the\n"
"                            valid options are: 'none', 'writeback' (default),\n"
"                            'writethrough', 'directsync' and 'unsafe'\n"
"      --aio=MODE            set AIO mode (native, io_uring or threads)\n"
"      --discard=MODE        set discard mode (ignore, unmap)\n"
"      --detect-zeroes=MODE  set detect-zeroes mode (off, on, unmap)\n"
"      --image-opts          treat FILE as a full set of image options\n"
"\n",
           SERVE_DEFAULT_PORT);
}

/* qemu-storage-daemon's --help, likewise. */
static void daemon_usage(void)
{
    printf(
"Usage: qemu-storage-daemon [options]\n"
"QEMU storage daemon\n"
"\n"
"  -h, --help             display this help and exit\n"
"  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]\n"
"                         specify tracing options\n"
"  -V, --version          output version information and exit\n"
"\n"
"  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]\n"
"             [,cache.direct=on|off][,cache.no-flush=on|off]\n"
"             [,read-only=on|off][,auto-read-only=on|off]\n"
"             [,force-share=on|off][,detect-zeroes=on|off|unmap]\n"
"             [,driver specific parameters...]\n"
"                         configure a block backend\n"
"\n"
"  --chardev socket,id=<id>,path=<path>,server=on,wait=off\n"
"                         configure a character device backend\n"
"\n"
"  --daemonize            daemonize the process, and have the parent exit\n"
"                         once startup is complete\n"
"\n"
"  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]\n"
"           [,writable=on|off]\n"
"                         export the specified block node over NBD\n"
"                         (requires --nbd-server)\n"
"\n"
"  --monitor [chardev=]name[,mode=control]\n"
"                         configure a QMP monitor\n"
"\n"
"  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>\n"
"               [,tls-creds=<id>][,max-connections=<n>]\n"
"  --nbd-server addr.type=unix,addr.path=<path>\n"
"               [,tls-creds=<id>][,max-connections=<n>]\n"
"                         start an NBD server for exporting block nodes\n"
"\n"
"  --object help          list object types that can be added\n"
"  --object <type>,help   list properties for the given object type\n"
"  --object <type>[,<property>=<value>...]\n"
"                         create a new object of type <type>, setting\n"
"                         properties in the order they are specified. Note\n"
"                         that the 'id' property must be set.\n"
"\n"
"  --pidfile <path>       write process ID to a file after startup\n");
}

static void serve_usage(void)
{
    if (cli_as == CLI_QEMU_NBD) {
        nbd_usage();
        return;
    }
    if (cli_as == CLI_QEMU_STORAGE_DAEMON) {
        daemon_usage();
        return;
    }
    printf(
"Usage: vdisk serve [OPTIONS] FILE [FILE...]\n"
"       vdisk serve --blockdev ... [--nbd-server ...] [--export ...]\n"
"                   [--chardev ... --monitor ... | --qmp unix:PATH]\n"
"Export disk images over NBD (compatible with qemu-nbd's options), or run\n"
"as a storage daemon controlled over QMP (qemu-storage-daemon's options).\n"
"\n"
"  -k, --socket=PATH        listen on a UNIX socket\n"
"  -b, --bind=ADDR          TCP address to listen on (default 0.0.0.0)\n"
"  -p, --port=PORT          TCP port (default 10809)\n"
"  -e, --shared=NUM         at most NUM clients at once (default 1, 0 = any)\n"
"  -t, --persistent         keep serving after the last client leaves\n"
"  -v, --verbose            with -c: stay in the foreground and report\n"
"  -r, --read-only          export read-only\n"
"  -o, --offset=OFFSET      export the image from byte OFFSET on\n"
"  -A, --allocation-depth   offer the qemu:allocation-depth context\n"
"  -B, --bitmap=NAME        offer qemu:dirty-bitmap:NAME (repeatable)\n"
"  -s, --snapshot           writes go to a temporary overlay\n"
"  -x, --export-name=NAME   export name (default \"\"); once per FILE\n"
"  -D, --description=DESC   export description; once per FILE\n"
"  -f, --format=FMT         image format (default: probe)\n"
"  -l, --load-snapshot=SN   export internal snapshot SN read-only (an id\n"
"                           or name, or snapshot.id=ID,snapshot.name=NAME)\n"
"  -n, --nocache            same as --cache=none\n"
"      --cache=MODE         none, writeback, writethrough, directsync, unsafe\n"
"      --aio=MODE           threads, native, io_uring\n"
"      --discard=MODE       ignore (default) or unmap\n"
"      --detect-zeroes=MODE off, on or unmap\n"
"      --pid-file=PATH      write the server's process id to PATH\n"
"      --fork               run in the background once the server listens\n"
"      --image-opts         treat FILE as a full set of image options\n"
"      --workers=N          at most N I/O threads per connection (default %d)\n"
"      --handshake-limit=N  drop clients that take over N s to negotiate\n"
"                           (default 10, 0 = no limit)\n"
"      --tls-authz=ID       admit only X.509 clients authz object ID allows\n"
"      --tls-hostname=NAME  with -L: the name the server's certificate must\n"
"                           carry (default: the -b address)\n"
"  -L, --list               list another server's exports (-k, -b, -p,\n"
"                           --tls-creds, --tls-hostname)\n"
"  -c, --connect=DEV        bind the kernel's NBD device DEV to FILE\n"
"  -d, --disconnect         unbind the device given as FILE\n"
"\n"
"Daemon form (see docs/qmp.md):\n"
"      --blockdev OPTS      add a node: driver=...,node-name=...,file... or\n"
"                           a JSON object (QMP blockdev-add)\n"
"      --nbd-server OPTS    addr.type=unix,addr.path=P or addr.type=inet,\n"
"                           addr.host=H,addr.port=N[,max-connections=N]\n"
"                           [,tls-creds=ID]\n"
"      --export OPTS        type=nbd,id=ID,node-name=N[,name=..][,writable=on]\n"
"      --chardev socket,id=ID,path=P,server=on,wait=off\n"
"      --monitor chardev=ID a QMP monitor on that socket\n"
"      --qmp unix:PATH      shorthand for the two above\n"
"      --object=SPEC        define an object (both forms; the daemon also has\n"
"                           object-add): tls-creds-x509,id=ID,endpoint=server,\n"
"                           dir=DIR[,verify-peer=on|off], tls-creds-psk,...,\n"
"                           secret, ...; --object help lists the types\n"
"      --tls-creds=ID       require TLS with the credentials object ID\n"
"                           (the daemon form: --nbd-server ...,tls-creds=ID)\n"
"      --daemonize          daemon form: run in the background once set up\n"
"      --pidfile=PATH       daemon form: write (and lock) the pid file\n"
"  -T, --trace [[enable=]PATTERN][,events=FILE][,file=FILE]\n"
"                           accepted and ignored (no tracing backend)\n"
"  -V, --version            print the version and exit\n"
"  -h, --help               this help\n", SERVE_WORKERS);
}

/*
 * -n, --cache, --aio, --discard, --detect-zeroes: checked as qemu-nbd
 * checks them, when they are parsed and in its words, then set in @opts.
 * @seen holds the bits of the options already given. Returns 0 or -1
 * after printing the error.
 */
static int block_option(vd_opts *opts, int c, const char *arg,
                        unsigned *seen)
{
    static const char *const zero_modes[] = { "off", "on", "unmap", NULL };
    /* -n is --cache=none: they share a bit. */
    unsigned bit = c == 'n' ? 0 : (unsigned)(c - SERVE_OPT_CACHE);
    const char *discard;

    if (c != SERVE_OPT_DETECT_ZEROES && (*seen & (1u << bit))) {
        cli_error("%s can only be specified once",
                  c == SERVE_OPT_AIO ? "--aio" :
                  c == SERVE_OPT_DISCARD ? "--discard" : "-n and --cache");
        return -1;
    }
    *seen |= 1u << bit;
    switch (c) {
    case 'n':
    case SERVE_OPT_CACHE:
        arg = c == 'n' ? "none" : arg;
        if (!cli_cache_mode(arg)) {
            cli_error("Invalid cache mode `%s'", arg);
            return -1;
        }
        return vd_opts_set(opts, "cache", cli_cache_mode(arg));
    case SERVE_OPT_AIO:
        if (!cli_aio_mode_valid(arg)) {
            cli_error("Invalid aio mode '%s'", arg);
            return -1;
        }
        return vd_opts_set(opts, "aio", arg);
    case SERVE_OPT_DISCARD:
        if (!cli_discard_mode_valid(arg)) {
            cli_error("Invalid discard mode `%s'", arg);
            return -1;
        }
        /* qemu-nbd also takes on/off for unmap/ignore. */
        return vd_opts_set(opts, "discard",
                           strcmp(arg, "on") == 0 ? "unmap"
                           : strcmp(arg, "off") == 0 ? "ignore" : arg);
    default:
        if (!cli_one_of(arg, zero_modes)) {
            cli_error("Failed to parse detect_zeroes mode: invalid "
                      "parameter value: %s", arg);
            return -1;
        }
        /* As qemu-nbd, only a --discard given before counts. */
        discard = vd_opts_get(opts, "discard");
        if (strcmp(arg, "unmap") == 0 &&
            !(discard && strcmp(discard, "unmap") == 0)) {
            cli_error("setting detect-zeroes to unmap is not allowed "
                      "without setting discard operation to unmap");
            return -1;
        }
        return vd_opts_set(opts, "detect-zeroes", arg);
    }
}

/*
 * The options each program takes: qemu-nbd has no daemon options,
 * qemu-storage-daemon only those (and --object, --pidfile, --daemonize,
 * -T); `vdisk serve` takes both sets and its own --qmp and --workers.
 */
static bool serve_opt_allowed(int c, const char *long_name)
{
    bool daemon_opt = c >= SERVE_OPT_BLOCKDEV && c <= SERVE_OPT_QMP;
    bool pidfile = long_name && strcmp(long_name, "pidfile") == 0;

    switch (cli_as) {
    case CLI_QEMU_NBD:
        return !daemon_opt && c != SERVE_OPT_WORKERS && !pidfile &&
               c != SERVE_OPT_DAEMONIZE;
    case CLI_QEMU_STORAGE_DAEMON:
        return (daemon_opt && c != SERVE_OPT_QMP) || c == 'h' || c == 'V' ||
               c == 'T' || c == SERVE_OPT_OBJECT ||
               c == SERVE_OPT_DAEMONIZE || pidfile;
    default:
        return true;
    }
}

/* After a bad option: the program's pointer to its --help. */
static void serve_help_hint(void)
{
    switch (cli_as) {
    case CLI_QEMU_NBD:
        cli_error("Try `qemu-nbd --help' for more information.");
        break;
    case CLI_QEMU_STORAGE_DAEMON:
        break;      /* qemu-storage-daemon says nothing more */
    default:
        fprintf(stderr, "Try '%s --help' for more information.\n",
                cli_prog);
        break;
    }
}

static vd_nbd_server *the_server;

/*
 * Adds the --object arguments @objs in order (cli_add_object()). The
 * daemon form words an error as qemu-storage-daemon ("--object ARG:
 * MESSAGE"), the qemu-nbd form as qemu-nbd. Returns 0 or -1.
 */
static int add_objects(const char *const *objs, int n, bool daemon_form)
{
    for (int i = 0; i < n; i++) {
        char ctx[4200];

        snprintf(ctx, sizeof(ctx), "--object %s", objs[i]);
        if (cli_add_object(objs[i], daemon_form ? ctx : NULL) < 0) {
            return -1;
        }
    }
    return 0;
}

/* The kernel client's way to end the server (qemu-nbd -c ends when the
 * device is disconnected). */
static void stop_server(void)
{
    if (the_server) {
        vd_nbd_server_request_shutdown(the_server);
    }
}

static void on_signal(int sig)
{
    (void)sig;
    if (the_server) {
        vd_nbd_server_request_shutdown(the_server);
    }
}

static int parse_uint(const char *s, unsigned max, unsigned *out)
{
    char *end;
    unsigned long v;

    errno = 0;
    v = strtoul(s, &end, 10);
    if (errno || end == s || *end || v > max || s[0] == '-') {
        return -EINVAL;
    }
    *out = (unsigned)v;
    return 0;
}

/* QEMU's qemu_strtoi() with base 0, as qemu-nbd reads -e and
 * --handshake-limit: decimal, octal or hex, leading blanks allowed, the
 * whole string, within int. */
static int parse_qemu_int(const char *s, int *out)
{
    char *end;
    long long v;

    errno = 0;
    v = strtoll(s, &end, 0);
    if (errno || end == s || *end || v > INT_MAX || v < INT_MIN) {
        return -EINVAL;
    }
    *out = (int)v;
    return 0;
}

/* QEMU's qemu_strtou64() with base 0, as qemu-nbd reads -o: like
 * strtoull, so "-1" wraps to 2^64-1 (refused later, where the offset
 * meets the raw layer, with the raw driver's words). */
static int parse_qemu_u64(const char *s, uint64_t *out)
{
    char *end;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 0);
    if (errno || end == s || *end) {
        return -EINVAL;
    }
    *out = v;
    return 0;
}

/* Parent side of --fork: exits with the child's verdict. */
static void wait_for_child(int rfd)
{
    char c = 0;
    ssize_t n;

    do {
        n = read(rfd, &c, 1);
    } while (n < 0 && errno == EINTR);
    _exit(n == 1 && c == 'R' ? 0 : 1);
}

/* -T/--trace as QEMU built with the "nop" backend takes it: the
 * syntax is checked, an events file must be readable (QEMU reads it and
 * only warns), and file= is refused as such a build refuses it. */
static int check_trace_opt(const char *arg)
{
    char *copy = strdup(arg), *save = NULL;
    int ret = 0;

    if (!copy) {
        return -1;
    }
    for (char *tok = strtok_r(copy, ",", &save); tok && ret == 0;
         tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        /* The first item may be a bare pattern (QemuOpts' implied key). */
        if ((!eq && tok == copy) || strncmp(tok, "enable=", 7) == 0) {
            continue;
        }
        if (strncmp(tok, "events=", 7) == 0) {
            FILE *f = fopen(eq + 1, "r");
            if (!f) {
                /* qemu-nbd's own format, without the space. */
                fprintf(stderr, "%s:%s: %s\n", cli_prog, eq + 1,
                        strerror(errno));
            } else {
                fclose(f);
            }
            continue;
        }
        if (strncmp(tok, "file=", 5) == 0) {
            fprintf(stderr, "error: --trace file=...: option not supported "
                    "by the selected tracing backends\n");
            ret = -1;
            continue;
        }
        if (eq) {
            *eq = '\0';
        }
        /* qemu-nbd reports the option without naming it. */
        if (cli_as == CLI_QEMU_NBD) {
            cli_error("Invalid parameter '%s'", tok);
        } else {
            cli_error("--trace %s: Invalid parameter '%s'", arg, tok);
        }
        ret = -1;
    }
    free(copy);
    return ret;
}

static void print_serve_version(void)
{
    /* "version X.Y.Z" as QEMU's tools print it, for scripts that parse
     * it: the QEMU release whose behaviour vdisk follows. */
    printf("vdisk serve version 7.2.0 (vdisk %s)\n"
           "Command-line compatible with qemu-storage-daemon and qemu-nbd "
           "version 7.2\n", vd_version());
}

/* The pid file, as qemu_write_pidfile(): created without truncation,
 * locked with a record lock that lives as long as the process (so a
 * second server given the same file is refused), checked to still be
 * the file at @path, then truncated and written. The lock's descriptor
 * stays open on purpose. @what starts the error messages:
 * qemu-storage-daemon says "cannot create PID file: ", qemu-nbd
 * nothing. */
static int write_locked_pidfile(const char *path, const char *what)
{
    char buf[32];
    int fd;

    for (;;) {
        struct stat a, b;
        struct flock lk = { .l_type = F_WRLCK, .l_whence = SEEK_SET };

        fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
        if (fd < 0) {
            cli_error("%sCould not create '%s': %s", what, path,
                      strerror(errno));
            return -1;
        }
        if (fstat(fd, &b) < 0) {
            cli_error("%sCannot stat file: %s", what, strerror(errno));
            close(fd);
            return -1;
        }
        if (fcntl(fd, F_SETLK, &lk) < 0) {
            cli_error("%sCannot lock pid file: %s", what, strerror(errno));
            close(fd);
            return -1;
        }
        /* Someone may have replaced the file between open and lock. */
        if (stat(path, &a) == 0 && a.st_ino == b.st_ino &&
            a.st_dev == b.st_dev) {
            break;
        }
        close(fd);
    }
    snprintf(buf, sizeof(buf), "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) < 0 ||
        write(fd, buf, strlen(buf)) != (ssize_t)strlen(buf)) {
        cli_error("%sFailed to write pid file", what);
        unlink(path);
        close(fd);
        return -1;
    }
    return 0;
}

/* --daemonize, first half (QEMU's os_daemonize()): returns in the
 * daemon with the write end of the parent's pipe in *@ready; the parent
 * never returns. */
static int daemonize_start(int *ready)
{
    int fds[2];
    pid_t pid;

    if (pipe2(fds, O_CLOEXEC) < 0) {
        cli_error("pipe: %s", strerror(errno));
        return -1;
    }
    fflush(NULL);
    pid = fork();
    if (pid < 0) {
        cli_error("fork: %s", strerror(errno));
        return -1;
    }
    if (pid > 0) {
        unsigned char st = 1;
        ssize_t n;
        close(fds[1]);
        do {
            n = read(fds[0], &st, 1);
        } while (n < 0 && errno == EINTR);
        _exit(n == 1 && st == 0 ? 0 : 1);
    }
    close(fds[0]);
    setsid();
    /* A second fork, so the daemon is no session leader and can never
     * acquire a controlling terminal. */
    pid = fork();
    if (pid < 0) {
        _exit(1);
    }
    if (pid > 0) {
        _exit(0);
    }
    umask(027);
    signal(SIGTSTP, SIG_IGN);
    signal(SIGTTOU, SIG_IGN);
    signal(SIGTTIN, SIG_IGN);
    *ready = fds[1];
    return 0;
}

/* --daemonize, second half (QEMU's os_setup_post()): the daemon is set
 * up; leave the terminal and release the parent with success. */
static int daemonize_finish(int ready)
{
    unsigned char st = 0;
    int fd;

    if (chdir("/") < 0) {
        cli_error("not able to chdir to /: %s",
                  strerror(errno));
        return -1;
    }
    fd = open("/dev/null", O_RDWR);
    if (fd < 0) {
        return -1;
    }
    dup2(fd, 0);
    dup2(fd, 1);
    dup2(fd, 2);
    close(fd);
    if (write(ready, &st, 1) != 1) {
        return -1;
    }
    close(ready);
    return 0;
}

/* ---- the daemon form ---- */

static void daemon_report(const char *msg)
{
    cli_error("%s", msg);
}

static qmp_daemon *the_daemon;

static void on_daemon_signal(int sig)
{
    (void)sig;
    if (the_daemon) {
        qmp_daemon_request_quit(the_daemon);
    }
}

/* True when the key=value option @str has a bare "help" or "?" element,
 * which qemu-storage-daemon answers for its options. */
static bool asks_help(const char *str)
{
    const char *p = str;

    if (str[0] == '{') {
        return false;
    }
    while (*p) {
        size_t n = 0;
        /* An element runs to a lone comma (",," is part of a value). */
        while (p[n] && !(p[n] == ',' && p[n + 1] != ',')) {
            n += p[n] == ',' ? 2 : 1;
        }
        if ((n == 4 && strncmp(p, "help", 4) == 0) || (n == 1 && *p == '?')) {
            return true;
        }
        p += n;
        p += *p == ',';
    }
    return false;
}

/* Runs QMP command @cmd with the option value @str (a JSON object or
 * key=value list). Returns 0 or -1 after printing the error, worded as
 * qemu-storage-daemon's ("--blockdev ARG: MESSAGE"). */
static int daemon_apply(qmp_daemon *d, const char *opt, const char *cmd,
                        const char *str, json_object *(*fix)(json_object *))
{
    vd_error err = VD_ERROR_INIT;
    qmp_error e = { 0 };
    json_object *args, *ret;

    args = qmp_parse_cli_object(str, NULL, &err);
    if (!args) {
        cli_error("%s %s: %s", opt, str, err.message);
        return -1;
    }
    if (fix) {
        args = fix(args);
    }
    ret = qmp_daemon_execute(d, cmd, args, str[0] != '{', &e);
    json_object_put(args);
    if (!ret) {
        /* QEMU names the option with its value ("--blockdev ARG: "). The
         * schema checked nbd_addr_to_legacy()'s form: name the member as
         * qemu-storage-daemon does ('addr.path', not 'addr.data.path';
         * the union's tag is plain 'type'). */
        char *legacy = fix ? strstr(e.desc, "'addr.data.") : NULL;
        if (legacy) {
            memmove(legacy + 6, legacy + 11, strlen(legacy + 11) + 1);
        } else if (fix && (legacy = strstr(e.desc, "'addr.type'"))) {
            memmove(legacy + 1, legacy + 6, strlen(legacy + 6) + 1);
        }
        cli_error("%s %s: %s", opt, str, e.desc);
        return -1;
    }
    json_object_put(ret);
    return 0;
}

/* --nbd-server takes a flat SocketAddress; nbd-server-start takes the
 * legacy {type, data} form. Moves addr's members other than type into
 * addr.data. */
static json_object *nbd_addr_to_legacy(json_object *args)
{
    json_object *addr, *data;

    if (!json_object_object_get_ex(args, "addr", &addr) ||
        !json_object_is_type(addr, json_type_object) ||
        json_object_object_get_ex(addr, "data", NULL)) {
        return args;
    }
    data = json_object_new_object();
    json_object_object_foreach(addr, key, val) {
        if (strcmp(key, "type") != 0) {
            json_object_object_add(data, key, json_object_get(val));
        }
    }
    for (;;) {
        const char *drop = NULL;
        json_object_object_foreach(addr, k2, v2) {
            (void)v2;
            if (strcmp(k2, "type") != 0) {
                drop = k2;
                break;
            }
        }
        if (!drop) {
            break;
        }
        json_object_object_del(addr, drop);
    }
    json_object_object_add(addr, "data", data);
    return args;
}

/* The UNIX socket path of a --chardev socket,id=ID,path=P,server=on. */
static const char *chardev_path(json_object *const *chardevs, int n,
                                const char *id)
{
    for (int i = 0; i < n; i++) {
        json_object *v;
        if (json_object_object_get_ex(chardevs[i], "id", &v) &&
            strcmp(json_object_get_string(v), id) == 0 &&
            json_object_object_get_ex(chardevs[i], "path", &v)) {
            return json_object_get_string(v);
        }
    }
    return NULL;
}

/* QEMU's character device backends: vdisk has only 'socket', and says
 * so; another name is no backend at all. */
static const char *const chardev_backends[] = {
    "socket", "null", "udp", "ringbuf", "memory", "file", "pipe", "pty",
    "stdio", "serial", "tty", "parallel", "parport", "msmouse", "wctablet",
    "braille", "testdev", "spicevmc", "spiceport", "qemu-vdagent", "dbus",
    "vc", NULL,
};

static int daemon_monitors(qmp_daemon *d, const char *const *opts,
                           const int *n)
{
    json_object *chardevs[SERVE_MAX_DAEMON_OPTS] = { 0 };
    vd_error err = VD_ERROR_INIT;
    int ret = -1, nc = 0;

    for (int i = 0; i < n[D_CHARDEV]; i++) {
        const char *str = opts[D_CHARDEV * SERVE_MAX_DAEMON_OPTS + i];
        json_object *o = qmp_parse_cli_object(str, "backend", &err);
        json_object *v;
        if (!o) {
            cli_error("--chardev %s: %s", str, err.message);
            goto out;
        }
        chardevs[nc++] = o;
        if (json_object_object_get_ex(o, "backend", &v) &&
            !cli_one_of(json_object_get_string(v), chardev_backends)) {
            cli_error("--chardev %s: '%s' is not a valid char driver name",
                      str, json_object_get_string(v));
            goto out;
        }
        if (!json_object_object_get_ex(o, "backend", &v) ||
            strcmp(json_object_get_string(v), "socket") != 0 ||
            !json_object_object_get_ex(o, "path", &v) ||
            !json_object_object_get_ex(o, "id", &v)) {
            cli_error("--chardev %s: only 'socket,id=ID,path=PATH,"
                      "server=on,wait=off' is supported", str);
            goto out;
        }
    }
    for (int i = 0; i < n[D_MONITOR]; i++) {
        const char *str = opts[D_MONITOR * SERVE_MAX_DAEMON_OPTS + i];
        json_object *o = qmp_parse_cli_object(str, "chardev", &err);
        json_object *v;
        const char *path;
        if (!o) {
            cli_error("--monitor %s: %s", str, err.message);
            goto out;
        }
        if (json_object_object_get_ex(o, "mode", &v) &&
            strcmp(json_object_get_string(v), "control") != 0) {
            cli_error("--monitor %s: Only QMP is supported", str);
            json_object_put(o);
            goto out;
        }
        path = json_object_object_get_ex(o, "chardev", &v)
               ? chardev_path(chardevs, nc, json_object_get_string(v)) : NULL;
        if (!path) {
            cli_error("--monitor %s: chardev \"%s\" not found", str,
                      v ? json_object_get_string(v) : "");
            json_object_put(o);
            goto out;
        }
        vd_error_clear(&err);
        if (qmp_daemon_add_monitor(d, path, &err) < 0) {
            cli_error("%s", err.message);
            json_object_put(o);
            goto out;
        }
        json_object_put(o);
    }
    for (int i = 0; i < n[D_QMP]; i++) {
        const char *str = opts[D_QMP * SERVE_MAX_DAEMON_OPTS + i];
        char path[4096];
        size_t len;
        if (strncmp(str, "unix:", 5) != 0) {
            cli_error("--qmp %s: only unix:PATH is supported", str);
            goto out;
        }
        len = strcspn(str + 5, ",");
        if (len == 0 || len >= sizeof(path)) {
            cli_error("--qmp %s: bad socket path", str);
            goto out;
        }
        memcpy(path, str + 5, len);
        path[len] = '\0';
        vd_error_clear(&err);
        if (qmp_daemon_add_monitor(d, path, &err) < 0) {
            cli_error("%s", err.message);
            goto out;
        }
    }
    ret = 0;
out:
    for (int i = 0; i < nc; i++) {
        json_object_put(chardevs[i]);
    }
    return ret;
}

static int serve_daemon(const char *opts[D_KINDS][SERVE_MAX_DAEMON_OPTS],
                        const int *n, const char *pidfile, bool daemonize)
{
    qmp_daemon *d;
    struct sigaction sa;
    int ret = 1, ready = -1;

    /* Before anything is opened: nodes must not be open across fork(). */
    if (daemonize && daemonize_start(&ready) < 0) {
        return 1;
    }
    d = qmp_daemon_new();
    qmp_set_reporter(daemon_report);

    if (!d) {
        cli_error("out of memory");
        return 1;
    }
    /* Before any socket exists: a client that sees the monitor's socket
     * may send SIGTERM at once, which must be a quit, not a kill (the
     * request waits in the daemon's wake-up pipe until it runs). */
    the_daemon = d;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_daemon_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
    for (int i = 0; i < n[D_BLOCKDEV]; i++) {
        if (daemon_apply(d, "--blockdev", "blockdev-add",
                         opts[D_BLOCKDEV][i], NULL) < 0) {
            goto out;
        }
    }
    for (int i = 0; i < n[D_NBD]; i++) {
        if (daemon_apply(d, "--nbd-server", "nbd-server-start",
                         opts[D_NBD][i], nbd_addr_to_legacy) < 0) {
            goto out;
        }
    }
    for (int i = 0; i < n[D_EXPORT]; i++) {
        if (daemon_apply(d, "--export", "block-export-add",
                         opts[D_EXPORT][i], NULL) < 0) {
            goto out;
        }
    }
    if (daemon_monitors(d, &opts[0][0], n) < 0) {
        goto out;
    }
    /* As qemu-storage-daemon: after the nodes, servers, exports and
     * monitors, before any connection is accepted (the monitors' and the
     * NBD server's threads are running but nothing was served). */
    if (pidfile && write_locked_pidfile(pidfile, "cannot create PID file: ")
                   < 0) {
        goto out;
    }
    if (ready >= 0 && daemonize_finish(ready) < 0) {
        if (pidfile) {
            unlink(pidfile);
        }
        goto out;
    }
    ret = qmp_daemon_run(d) < 0 ? 1 : 0;
    if (pidfile) {
        unlink(pidfile);
    }
out:
    the_daemon = NULL;
    qmp_daemon_free(&d);
    return ret;
}

/*
 * -s: a temporary qcow2 overlay over @base, as qemu-nbd's (a file in
 * $TMPDIR or /var/tmp, the image as its backing node, the writes going
 * to it). The file is unlinked as soon as it is open, so nothing is left
 * behind whatever way the server ends. Returns 0 or -1 after an error.
 */
static int open_overlay(vd_node **out, vd_node *base, const vd_opts *opts,
                        unsigned flags)
{
    const char *dir = getenv("TMPDIR");
    char path[PATH_MAX], size[32];
    vd_opts *copts = vd_opts_new(), *oopts = vd_opts_clone(opts);
    vd_error err = VD_ERROR_INIT;
    int64_t len = vd_getlength(base);
    int fd, r = -1;

    snprintf(path, sizeof(path), "%s/vl.XXXXXX", dir && *dir ? dir
                                                              : "/var/tmp");
    fd = len < 0 || !copts || !oopts ? -1 : mkstemp(path);
    if (fd < 0) {
        cli_error("Could not get temporary filename: %s",
                  strerror(len < 0 ? (int)-len : errno));
        goto out;
    }
    close(fd);
    snprintf(size, sizeof(size), "%" PRId64, len);
    if (vd_opts_set(copts, "size", size) < 0 ||
        vd_create(path, "qcow2", copts, &err) < 0) {
        cli_error("Could not create temporary overlay '%s': %s", path,
                  err.message[0] ? err.message : "out of memory");
        unlink(path);
        goto out;
    }
    vd_error_clear(&err);
    if (vd_opts_set(oopts, "backing", vd_node_name(base)) < 0 ||
        vd_open(out, path, "qcow2", oopts, flags, &err) < 0) {
        cli_error("Could not open temporary overlay '%s': %s", path,
                  err.message[0] ? err.message : "out of memory");
        unlink(path);
        goto out;
    }
    unlink(path);
    r = 0;
out:
    vd_opts_free(&copts);
    vd_opts_free(&oopts);
    return r;
}

/* Sets @key in @dst to its value in @src, if any. 0 or -ENOMEM. */
static int copy_opt(vd_opts *dst, const vd_opts *src, const char *key)
{
    const char *v = vd_opts_get(src, key);

    return v ? vd_opts_set(dst, key, v) : 0;
}

/*
 * Opens what one export serves, as qemu-nbd builds it: the image @file
 * (or the option string, with --image-opts), then with @overlay (-s) a
 * temporary overlay on it, then with @offset (-o) a raw layer starting
 * @offset bytes in. The top node goes to @*top, the ones under it to
 * @lower (closed after the top). Returns 0 or -1 after qemu-nbd's
 * message.
 */
static int open_export_node(const char *file, const char *fmt,
                            bool image_opts, const vd_opts *opts,
                            bool read_only, bool overlay, uint64_t offset,
                            vd_node **top, vd_node *lower[2])
{
    unsigned rw = read_only ? 0 : VD_O_RDWR;
    /* Nodes under another are inner nodes: the export's user on the top
     * node holds the permissions (VD_O_NO_USER), and the image under an
     * overlay is only read, as QEMU opens a -s image's backing. */
    unsigned flags = overlay ? VD_O_NO_USER : offset ? rw | VD_O_NO_USER : rw;
    vd_error err = VD_ERROR_INIT;
    vd_node *cur = NULL;
    int r;

    if (image_opts) {
        /* FILE is the whole set of options, as blockdev-add's. */
        vd_opts *all = cli_parse_image_opts(file, opts);
        if (!all) {
            return -1;
        }
        r = vd_open(&cur, NULL, NULL, all, flags, &err);
        vd_opts_free(&all);
    } else {
        r = vd_open(&cur, file, fmt, opts, flags, &err);
    }
    if (r < 0) {
        /* qemu-nbd's words, naming the file. */
        cli_error("Failed to blk_new_open '%s': %s",
                  file, err.message[0]
                        ? cli_strip_filename(err.message, file)
                        : strerror(-r));
        cli_print_hint(&err);
        return -1;
    }
    if (overlay) {
        vd_node *ov = NULL;
        if (open_overlay(&ov, cur, opts, offset ? rw | VD_O_NO_USER : rw)
            < 0) {
            vd_close(&cur, NULL);
            return -1;
        }
        lower[0] = cur;
        cur = ov;
    }
    if (offset) {
        vd_opts *ro = vd_opts_new();
        char num[32];
        vd_node *raw = NULL;

        if (offset > INT64_MAX) {
            /* qemu-nbd hands the offset to the raw driver as a signed
             * number, which the driver's size parser refuses so. */
            cli_error("Parameter 'offset' expects a non-negative number "
                      "below 2^64");
            fprintf(stderr, "Optional suffix k, M, G, T, P or E means kilo-, "
                    "mega-, giga-, tera-, peta-\nand exabytes, "
                    "respectively.\n");
            vd_opts_free(&ro);
            r = -1;
        } else {
            snprintf(num, sizeof(num), "%" PRIu64, offset);
            vd_error_clear(&err);
            r = !ro || vd_opts_set(ro, "driver", "raw") < 0 ||
                vd_opts_set(ro, "file", vd_node_name(cur)) < 0 ||
                vd_opts_set(ro, "offset", num) < 0 ||
                copy_opt(ro, opts, "discard") < 0 ||
                copy_opt(ro, opts, "detect-zeroes") < 0 ? -ENOMEM
                : vd_open(&raw, NULL, NULL, ro, rw, &err);
            if (r < 0) {
                cli_error("%s", err.message[0] ? err.message
                                               : "out of memory");
            }
            vd_opts_free(&ro);
        }
        if (r < 0) {
            vd_close(&cur, NULL);
            if (lower[0]) {
                vd_close(&lower[0], NULL);
            }
            return -1;
        }
        lower[lower[0] ? 1 : 0] = cur;
        cur = raw;
    }
    *top = cur;
    return 0;
}

int cmd_serve(int argc, char **argv)
{
    /* Request buffers above 256 KiB come from mmap and go back to the
     * system when freed. glibc would otherwise raise its threshold after
     * the first free of such a buffer and keep later ones in per-thread
     * heaps: with many threads serving 1 MiB requests that costs more
     * peak memory than qemu-nbd. */
    mallopt(M_MMAP_THRESHOLD, 256 * 1024);

    const char *sockpath = NULL, *bind_addr = NULL, *port = NULL;
    const char *fmt = NULL, *pidfile = NULL, *tls_creds = NULL;
    const char *tls_authz = NULL, *tls_hostname = NULL, *bitmap = NULL;
    vd_bitmap_ref *bitmaps = NULL;
    size_t nbitmaps = 0;
    const char *device = NULL;
    const char **objects = NULL;
    int nobjects = 0;
    bool image_opts = false;
    const char *names[SERVE_MAX_EXPORTS], *descs[SERVE_MAX_EXPORTS];
    unsigned nnames = 0, ndescs = 0, shared = 1, workers = SERVE_WORKERS;
    bool persistent = false, read_only = false, do_fork = false;
    /* qemu-nbd's -v, -A, -s, -L, -d; -o's offset (0: none) and whether
     * a per-device option was given (list mode refuses them). */
    bool verbose = false, alloc_depth = false, overlay = false;
    bool list = false, disconnect = false, per_device = false;
    uint64_t offset = 0;
    int handshake_limit = -1;
    /* Nodes under an export's top node (the image under -s's overlay
     * and under -o's raw layer), closed after it. */
    vd_node *lower[SERVE_MAX_EXPORTS][2] = { { 0 } };
    bool kernel_client = false;
    const char *snapshot = NULL;
    vd_node *nodes[SERVE_MAX_EXPORTS] = { 0 };
    int nimages = 0, ret = 1, ready_fd = -1, c;
    vd_opts *opts = NULL;
    vd_error err = VD_ERROR_INIT;
    vd_nbd_server *srv = NULL;
    vd_nbd_tls_creds *creds = NULL;
    struct sigaction sa;
    const char *daemon_opts[D_KINDS][SERVE_MAX_DAEMON_OPTS];
    int ndaemon[D_KINDS] = { 0 };
    int longidx = -1;
    unsigned seen_block_opts = 0;
    char default_sock[128];
    /* qemu-storage-daemon is the daemon form even with no options. */
    bool daemon_mode = cli_as == CLI_QEMU_STORAGE_DAEMON, daemonize = false;

    if (cli_as == CLI_VDISK) {
        cli_set_prog("vdisk serve");
    }

    opts = vd_opts_new();
    objects = calloc((size_t)argc + 1, sizeof(*objects));
    if (!opts || !objects) {
        cli_error("out of memory");
        vd_opts_free(&opts);
        free(objects);
        return 1;
    }
    optind = 1;
    while ((c = getopt_long(argc, argv, cmd_serve_short_opts,
                            cmd_serve_long_opts, &longidx)) != -1) {
        if (c != ':' && c != '?' &&
            !serve_opt_allowed(c, longidx >= 0
                                  ? cmd_serve_long_opts[longidx].name
                                  : NULL)) {
            /* Another program's option: unknown to this one. */
            cli_foreign_option_error(c, longidx, argv);
            serve_help_hint();
            goto out;
        }
        longidx = -1;
        switch (c) {
        case 'h':
            serve_usage();
            ret = 0;
            goto out;
        case 'V':
            if (cli_as == CLI_VDISK) {
                print_serve_version();
            } else {
                cli_print_qemu_version();
            }
            ret = 0;
            goto out;
        case 'T':
            if (check_trace_opt(optarg) < 0) {
                goto out;
            }
            break;
        case SERVE_OPT_DAEMONIZE:
            /* Alone it makes an idle daemon, as qemu-storage-daemon. */
            daemonize = true;
            daemon_mode = true;
            break;
        case 'k':
            sockpath = optarg;
            if (cli_as == CLI_QEMU_NBD && sockpath[0] != '/') {
                cli_error("socket path must be absolute");
                goto out;
            }
            break;
        case 'b':
            bind_addr = optarg;
            break;
        case 'p':
            port = optarg;
            break;
        case 'e': {
            int v;
            if (parse_qemu_int(optarg, &v) < 0 || v < 0) {
                cli_error("Invalid shared device number "
                          "'%s'", optarg);
                goto out;
            }
            shared = (unsigned)v;
            break;
        }
        case SERVE_OPT_HANDSHAKE_LIMIT:
            if (parse_qemu_int(optarg, &handshake_limit) < 0 ||
                handshake_limit < 0) {
                cli_error("Invalid handshake limit '%s'", optarg);
                goto out;
            }
            break;
        case 'o':
            if (parse_qemu_u64(optarg, &offset) < 0) {
                cli_error("Invalid offset '%s'", optarg);
                goto out;
            }
            break;
        case 'A':
            alloc_depth = true;
            break;
        case 'B': {
            /* qemu-nbd prepends each to its list: the last one given is
             * checked and listed first. */
            vd_bitmap_ref *nb = realloc(bitmaps,
                                        (nbitmaps + 1) * sizeof(*nb));
            if (!nb) {
                cli_error("out of memory");
                goto out;
            }
            bitmaps = nb;
            memmove(&bitmaps[1], &bitmaps[0], nbitmaps * sizeof(*nb));
            bitmaps[0] = (vd_bitmap_ref){ .node = NULL, .name = optarg };
            nbitmaps++;
            bitmap = optarg;
            break;
        }
        case 's':
            overlay = true;
            break;
        case 'L':
            list = true;
            break;
        case 'c':
            device = optarg;
            break;
        case 'd':
            disconnect = true;
            break;
        case 'v':
            verbose = true;
            break;
        case SERVE_OPT_TLS_HOSTNAME:
            tls_hostname = optarg;
            break;
        case 't':
            persistent = true;
            break;
        case 'r':
            read_only = true;
            break;
        case 'x':
            if (nnames == SERVE_MAX_EXPORTS) {
                cli_error("too many export names");
                goto out;
            }
            if (strlen(optarg) > SERVE_MAX_STRING) {
                cli_error("export name '%s' too long", optarg);
                goto out;
            }
            names[nnames++] = optarg;
            per_device = true;
            break;
        case 'D':
            if (ndescs == SERVE_MAX_EXPORTS) {
                cli_error("too many descriptions");
                goto out;
            }
            if (strlen(optarg) > SERVE_MAX_STRING) {
                cli_error("export description '%s' too long", optarg);
                goto out;
            }
            descs[ndescs++] = optarg;
            per_device = true;
            break;
        case 'f':
            fmt = optarg;
            per_device = true;
            break;
        case 'l':
            /* As qemu-nbd: the snapshot is exported read-only. */
            snapshot = optarg;
            read_only = true;
            /* As qemu-nbd, only the plain ID_OR_NAME form counts as a
             * per-device setting for -L. */
            per_device |= strncmp(optarg, "snapshot.", 9) != 0;
            break;
        case 'n':
        case SERVE_OPT_CACHE:
        case SERVE_OPT_AIO:
        case SERVE_OPT_DISCARD:
        case SERVE_OPT_DETECT_ZEROES:
            if (block_option(opts, c, optarg, &seen_block_opts) < 0) {
                goto out;
            }
            per_device |= c != SERVE_OPT_DETECT_ZEROES;
            break;
        case SERVE_OPT_PIDFILE:
            pidfile = optarg;
            break;
        case SERVE_OPT_FORK:
            do_fork = true;
            break;
        case SERVE_OPT_BLOCKDEV:
        case SERVE_OPT_NBD_SERVER:
        case SERVE_OPT_EXPORT:
        case SERVE_OPT_CHARDEV:
        case SERVE_OPT_MONITOR:
        case SERVE_OPT_QMP: {
            int k = c - SERVE_OPT_BLOCKDEV;
            if (asks_help(optarg)) {
                /* qemu-storage-daemon lists chardev backends (vdisk has
                 * one) and has no help for the others. */
                if (k == D_CHARDEV) {
                    printf("Available chardev backend types: \n  socket\n");
                    ret = 0;
                } else {
                    cli_error("%s %s: Help is not "
                              "available for this option",
                              daemon_opt_names[k], optarg);
                }
                goto out;
            }
            if (ndaemon[k] == SERVE_MAX_DAEMON_OPTS) {
                cli_error("too many %s options",
                          daemon_opt_names[k]);
                goto out;
            }
            daemon_opts[k][ndaemon[k]++] = optarg;
            daemon_mode = true;
            break;
        }
        case SERVE_OPT_WORKERS:
            if (parse_uint(optarg, 1024, &workers) < 0 || workers == 0) {
                cli_error("invalid worker count '%s'",
                          optarg);
                goto out;
            }
            break;
        case SERVE_OPT_OBJECT:
            /* qemu-nbd creates each object as it reads it (an error, or
             * "help", ends the command there); the other forms wait for
             * the whole command line, which decides how to word errors. */
            if (cli_as == CLI_QEMU_NBD) {
                if (cli_add_object(optarg, NULL) < 0) {
                    goto out;
                }
                break;
            }
            objects[nobjects++] = optarg;
            break;
        case SERVE_OPT_TLS_CREDS:
            tls_creds = optarg;
            break;
        case SERVE_OPT_TLS_AUTHZ:
            tls_authz = optarg;
            break;
        case SERVE_OPT_IMAGE_OPTS:
            image_opts = true;
            break;
        default:    /* ':' or '?' */
            cli_getopt_error(c, argv);
            serve_help_hint();
            goto out;
        }
    }

    if (add_objects(objects, nobjects, daemon_mode) < 0) {
        goto out;
    }
    if (daemon_mode && (tls_creds || tls_authz || tls_hostname || list ||
                        device || disconnect || offset || alloc_depth ||
                        overlay || bitmap || verbose ||
                        handshake_limit >= 0)) {
        cli_error("qemu-nbd's options (--tls-creds, -L, -c, -o, -A, -s, "
                  "...) do not combine with the daemon options; give the "
                  "daemon --nbd-server ...,tls-creds=ID");
        goto out;
    }
    /* From here on qemu-nbd's checks, in qemu-nbd's order. */
    per_device |= offset || device || disconnect || bitmap || alloc_depth;
    if (!daemon_mode && list) {
        if (argc != optind) {
            cli_error("List mode is incompatible with a file name");
            goto out;
        }
        if (per_device) {
            cli_error("List mode is incompatible with per-device settings");
            goto out;
        }
        if (do_fork) {
            cli_error("List mode is incompatible with forking");
            goto out;
        }
    } else if (!daemon_mode && cli_as == CLI_QEMU_NBD &&
               argc - optind != 1) {
        cli_error("Invalid number of arguments");
        fprintf(stderr, "Try `qemu-nbd --help' for more information.\n");
        goto out;
    }
    if (tls_creds) {
        if (device) {
            cli_error("TLS is not supported with a host device");
            goto out;
        }
        if (tls_authz && list) {
            cli_error("TLS authorization is incompatible with export list");
            goto out;
        }
        if (tls_hostname && !list) {
            cli_error("TLS hostname is only supported with export list");
            goto out;
        }
        /* Checked before any image is opened, as qemu-nbd does; -L
         * wants a client's credentials, the server a server's. */
        vd_error_clear(&err);
        creds = vd_nbd_tls_creds_get(tls_creds, &err);
        if (!creds) {
            cli_error("Failed to get TLS creds: %s", err.message);
            goto out;
        }
        if (vd_nbd_tls_creds_is_server(creds) == list) {
            cli_error("Failed to get TLS creds: Expecting TLS credentials "
                      "with a %s endpoint", list ? "client" : "server");
            goto out;
        }
    } else if (tls_authz) {
        cli_error("--tls-authz is not permitted without --tls-creds");
        goto out;
    } else if (tls_hostname) {
        cli_error("--tls-hostname is not permitted without --tls-creds");
        goto out;
    }
    if (list) {
        const char *host = bind_addr ? bind_addr : "0.0.0.0";
        ret = serve_list_exports(sockpath, host,
                                 port ? port : SERVE_DEFAULT_PORT,
                                 tls_creds,
                                 tls_hostname ? tls_hostname : host);
        goto out;
    }
    if (disconnect) {
        ret = serve_kernel_disconnect(argv[optind]);
        goto out;
    }
    if (image_opts && fmt) {
        cli_error("--image-opts and -f are mutually "
                  "exclusive");
        goto out;
    }
    if (daemon_mode) {
        if (cli_as == CLI_QEMU_STORAGE_DAEMON && argc - optind > 0) {
            cli_error("%s: Unexpected argument", argv[optind]);
            goto out;
        }
        if (argc - optind > 0 || do_fork) {
            cli_error("image arguments and --fork do not "
                      "combine with the daemon options");
            goto out;
        }
        ret = serve_daemon(daemon_opts, ndaemon, pidfile, daemonize);
        goto out;
    }

    nimages = argc - optind;
    if (nimages < 1) {
        cli_error("Not enough arguments");
        serve_help_hint();
        goto out;
    }
    if (nimages > SERVE_MAX_EXPORTS) {
        cli_error("at most %d images",
                  SERVE_MAX_EXPORTS);
        goto out;
    }
    if (nimages > 1 && nnames != (unsigned)nimages) {
        cli_error("give one -x NAME per image when "
                  "exporting %d images", nimages);
        goto out;
    }
    if (nnames > (unsigned)nimages || ndescs > (unsigned)nimages) {
        cli_error("more -x/-D options than images");
        goto out;
    }
    if (device && nimages > 1) {
        cli_error("-c binds one image to the device");
        goto out;
    }
    /* qemu-nbd's defaults: discards are ignored unless --discard says
     * otherwise; -c listens on a socket named after the device and
     * forks unless -v keeps it in the foreground. */
    if (!vd_opts_get(opts, "discard") &&
        vd_opts_set(opts, "discard", "ignore") < 0) {
        cli_error("out of memory");
        goto out;
    }
    if (device && !sockpath) {
        const char *base = strrchr(device, '/');
        snprintf(default_sock, sizeof(default_sock), "/var/lock/qemu-nbd-%s",
                 base ? base + 1 : device);
        sockpath = default_sock;
    }
    if (device && !verbose) {
        do_fork = true;
    }
    srv = vd_nbd_server_new(workers, shared, persistent);
    if (!srv) {
        cli_error("out of memory");
        goto out;
    }
    the_server = srv;
    if (sockpath && strlen(sockpath) >= SERVE_SUN_PATH_MAX) {
        /* qemu-nbd's words (and its hint line). */
        cli_error("UNIX socket path '%s' is too long", sockpath);
        fprintf(stderr, "Path must be less than %d bytes\n",
                SERVE_SUN_PATH_MAX);
        goto out;
    }
    vd_nbd_server_set_tls(srv, creds);
    creds = NULL;
    if (sockpath &&
        vd_nbd_server_listen_unix(srv, sockpath, &err) < 0) {
        cli_error("%s", err.message);
        goto out;
    }
    if ((!sockpath || bind_addr || port) &&
        vd_nbd_server_listen_tcp(srv, bind_addr ? bind_addr : "0.0.0.0",
                                 port ? port : SERVE_DEFAULT_PORT, &err) < 0) {
        cli_error("%s", err.message);
        goto out;
    }

    if (do_fork) {
        int pfd[2];
        pid_t pid;

        fflush(NULL);
        if (pipe2(pfd, O_CLOEXEC) < 0) {
            cli_error("pipe: %s", strerror(errno));
            goto out;
        }
        pid = fork();
        if (pid < 0) {
            cli_error("fork: %s", strerror(errno));
            goto out;
        }
        if (pid > 0) {
            close(pfd[1]);
            wait_for_child(pfd[0]);
        }
        close(pfd[0]);
        ready_fd = pfd[1];
        setsid();
    }

    if (handshake_limit >= 0) {
        vd_nbd_server_set_handshake_limit(srv, (unsigned)handshake_limit);
    }
    if (tls_authz && vd_nbd_server_set_tls_authz(srv, tls_authz) < 0) {
        cli_error("out of memory");
        goto out;
    }
    for (int i = 0; i < nimages; i++) {
        const char *file = argv[optind + i];
        const char *name = nnames > (unsigned)i ? names[i] : "";

        if (open_export_node(file, fmt, image_opts, opts, read_only, overlay,
                             offset, &nodes[i], lower[i]) < 0) {
            goto out;
        }
        if (snapshot && cli_load_snapshot(nodes[i], snapshot) < 0) {
            goto out;
        }
        vd_error_clear(&err);
        vd_nbd_export_opts eo = {
            .name = name,
            .description = ndescs > (unsigned)i ? descs[i] : NULL,
            .node = nodes[i],
            .read_only = vd_node_is_read_only(nodes[i]),
            .allocation_depth = alloc_depth,
            .bitmaps = bitmaps,
            .nb_bitmaps = nbitmaps,
        };
        if (vd_nbd_server_add_export_opts(srv, &eo, &err) < 0) {
            cli_error("%s", err.message);
            cli_print_hint(&err);
            goto out;
        }
    }
    if (pidfile && write_locked_pidfile(pidfile, "") < 0) {
        goto out;
    }

    the_server = srv;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);

    if (ready_fd >= 0) {
        int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
        char ok = 'R';

        if (devnull >= 0) {
            dup2(devnull, STDIN_FILENO);
            dup2(devnull, STDOUT_FILENO);
            close(devnull);
        }
        /* With -c the parent is released once the device is bound. */
        if (!device) {
            if (write(ready_fd, &ok, 1) != 1) {
                goto out;
            }
            close(ready_fd);
            ready_fd = -1;
        }
    }
    if (device) {
        /* As qemu-nbd -c: a thread binds the device to the export; the
         * foreground (or, with the fork, the parent) learns of failure
         * as an error and exit status 1. */
        if (serve_kernel_connect_start(device, sockpath, argv[optind],
                                       verbose, stop_server, ready_fd) < 0) {
            goto out;
        }
        ready_fd = -1;      /* the thread's now */
        kernel_client = true;
    }

    vd_error_clear(&err);
    if (vd_nbd_server_run(srv, &err) < 0) {
        cli_error("%s", err.message);
    } else {
        ret = 0;
    }
    if (kernel_client) {
        /* qemu-nbd -c exits with the kernel client's status. */
        kernel_client = false;
        ret = serve_kernel_connect_finish();
    }

out:
    the_server = NULL;
    vd_nbd_server_free(&srv);
    for (int i = 0; i < nimages && i < SERVE_MAX_EXPORTS; i++) {
        vd_error_clear(&err);
        if (nodes[i] && vd_close(&nodes[i], &err) < 0) {
            cli_error("%s", err.message);
            ret = 1;
        }
        for (int j = 1; j >= 0; j--) {
            vd_error_clear(&err);
            if (lower[i][j] && vd_close(&lower[i][j], &err) < 0) {
                cli_error("%s", err.message);
                ret = 1;
            }
        }
    }
    if (pidfile && ret == 0) {
        unlink(pidfile);
    }
    if (ready_fd >= 0) {
        close(ready_fd);
    }
    vd_opts_free(&opts);
    free(objects);
    free(bitmaps);
    vd_nbd_tls_creds_unref(creds);
    vd_object_del_all();
    return ret;
}
