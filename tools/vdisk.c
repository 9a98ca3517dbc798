/*
 * vdisk: the command-line tool, a drop-in for qemu-img 7.2 (and, through
 * "vdisk io", for qemu-io; through "vdisk serve", for qemu-nbd and
 * qemu-storage-daemon). main() handles the global --help/--version
 * and dispatches argv[1] through the command table in util.c; each
 * subcommand lives in its own cmd_*.c file.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "commands.h"
#include "util.h"

static void print_version(void)
{
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

    if (argc < 2) {
        cli_error_hint("Not enough arguments");
        return 1;
    }
    if (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0 ||
        strcmp(argv[1], "help") == 0) {
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
    if (!cmd) {
        cli_error_hint("Command not found: %s", argv[1]);
        return 1;
    }
    /* Subcommands see their own name as argv[0], as getopt expects.
     * The objects their --object options made go with them. */
    ret = cmd->handler(argc - 1, argv + 1);
    vd_object_del_all();
    return ret;
}
