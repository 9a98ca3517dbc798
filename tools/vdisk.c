/*
 * vdisk: the command-line tool, a drop-in for qemu-img 7.2 (and, through
 * "vdisk io", for qemu-io; through "vdisk serve", for qemu-nbd and
 * qemu-storage-daemon). main() picks the program from argv[0]: invoked
 * as qemu-io, qemu-nbd or qemu-storage-daemon (the symlinks of
 * qemu-compat/, docs/compat.md) it runs `vdisk io` or `vdisk serve`
 * with that tool's command line and name; as qemu-img or vdisk it
 * handles the global --help/--version and dispatches argv[1] through
 * the command table in util.c. Each subcommand lives in its own cmd_*.c
 * file.
 */
#include <malloc.h>
#include <signal.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "commands.h"
#include "util.h"

static void print_version(void)
{
    if (cli_as == CLI_QEMU_IMG) {
        cli_print_qemu_version();
        return;
    }
    printf("vdisk version %s\n"
           "Command-line compatible with qemu-img version 7.2\n",
           vd_version());
}

int main(int argc, char **argv)
{
    const cli_command *cmd;
    int ret;

    /*
     * Under a file-size limit (ulimit -f) a write past it raises SIGXFSZ,
     * whose default kills the process: vdisk io would die mid-script,
     * convert without a message, and vdisk serve with every client. As
     * qemu-img, qemu-io and qemu-nbd, ignore it so the write fails with
     * EFBIG ("File too large"), reported per request. The library leaves
     * signal dispositions to its host program (see vdisk.h); the tools
     * are that program. Set before any thread starts so all inherit it.
     */
    signal(SIGXFSZ, SIG_IGN);

    /*
     * One malloc arena for the whole process (glibc's tcache still gives
     * each thread its small blocks without a lock). By default glibc opens
     * an arena per thread that allocates, up to 8 per CPU, and each keeps
     * what it freed: librbd's and the copy workers' threads made `vdisk
     * convert` of 256 MiB to RBD peak at 70 MB against qemu-img's 57 MB,
     * and `convert -c -m 8` at 65 MB; with one arena 55 MB and 36 MB, for
     * the same CPU time (docs/remote.md, "Memory"). The library leaves
     * malloc tuning to its host program; the tools are that program. A
     * MALLOC_ARENA_MAX in the environment still wins.
     */
    if (!getenv("MALLOC_ARENA_MAX")) {
        mallopt(M_ARENA_MAX, 1);
    }

    cli_set_tool(argv[0]);
    switch (cli_as) {
    case CLI_QEMU_IO:
    case CLI_QEMU_NBD:
    case CLI_QEMU_STORAGE_DAEMON:
        /* The whole command line is the tool's, argv[0] included. */
        ret = (cli_as == CLI_QEMU_IO ? cmd_io : cmd_serve)(argc, argv);
        vd_object_del_all();
        return ret;
    case CLI_VDISK:
    case CLI_QEMU_IMG:
        break;
    }

    if (argc < 2) {
        cli_error_hint("Not enough arguments");
        return 1;
    }
    /* "help" is vdisk's; qemu-img calls it an unknown command.
     * `vdisk help CMD` is `vdisk CMD --help`. */
    if (cli_as == CLI_VDISK && strcmp(argv[1], "help") == 0 && argc > 2) {
        char *help_argv[] = { argv[2], (char *)"--help", NULL };

        cmd = cli_find_command(argv[2]);
        if (!cmd) {
            cli_error_hint("Command not found: %s", argv[2]);
            return 1;
        }
        ret = cmd->handler(2, help_argv);
        vd_object_del_all();
        return ret;
    }
    /* The hidden machine-readable dump of a command's getopt tables
     * (tools/help.c): tests/cli/man.sh and contrib/vdisk.bash read it. */
    if (cli_as == CLI_VDISK && strcmp(argv[1], "--list-options") == 0) {
        return cli_list_options(argc > 2 ? argv[2] : NULL);
    }
    if (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0 ||
        (cli_as == CLI_VDISK && strcmp(argv[1], "help") == 0)) {
        cli_print_help();
        return 0;
    }
    if (strcmp(argv[1], "-V") == 0 || strcmp(argv[1], "--version") == 0) {
        print_version();
        return 0;
    }
    if (argv[1][0] == '-') {
        cli_error_hint("unrecognized option '%s'", argv[1]);
        return 1;
    }

    cmd = cli_find_command(argv[1]);
    if (!cmd || (cli_as == CLI_QEMU_IMG && cli_command_is_vdisk_only(cmd))) {
        cli_error_hint("Command not found: %s", argv[1]);
        return 1;
    }
    /* Subcommands see their own name as argv[0], as getopt expects.
     * The objects their --object options made go with them. */
    ret = cmd->handler(argc - 1, argv + 1);
    vd_object_del_all();
    return ret;
}
