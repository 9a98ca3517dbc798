/*
 * The program being run and how it speaks: one binary answers to vdisk's
 * names (`vdisk`, `vdisk io`, `vdisk serve`) and, through the symlinks of
 * qemu-compat/ (docs/compat.md), to QEMU's four tools, and every message
 * of the tools starts with the name it was called by. The functions live
 * in util.c; this header is apart so that files with their own option
 * enums (cmd_bench.c) can report without util.h.
 */
#ifndef VDISK_TOOLS_PROG_H
#define VDISK_TOOLS_PROG_H

#include <stdarg.h>
#include <stdbool.h>

/* Which program: main() calls cli_set_tool() with argv[0] before
 * anything is printed. */
typedef enum cli_tool {
    CLI_VDISK,
    CLI_QEMU_IMG,
    CLI_QEMU_IO,
    CLI_QEMU_NBD,
    CLI_QEMU_STORAGE_DAEMON,
} cli_tool;

extern cli_tool cli_as;
/* The name every message of the tool starts with: "vdisk", "vdisk serve",
 * "qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon". */
extern const char *cli_prog;

/* The QEMU release whose tools vdisk stands in for. */
#define CLI_QEMU_VERSION "7.2.0"

/* Sets cli_as and cli_prog from argv[0]'s base name. */
void cli_set_tool(const char *argv0);
/* Sets the message prefix (e.g. "vdisk serve" for that subcommand). */
void cli_set_prog(const char *prog);

/* QEMU's version line for the tool being run ("qemu-img version 7.2.0
 * (vdisk 0.1.0)"; qemu-nbd's says "qemu-nbd 7.2.0 (vdisk 0.1.0)") and a
 * line saying what vdisk is; scripts parse the first line. */
void cli_print_qemu_version(void);

/* Prints the usage text (vdisk --help, qemu-img --help). */
void cli_print_help(void);
/* Whether --@option of qemu-img subcommand @command is vdisk's own
 * (unknown under qemu-img's name). */
bool cli_option_is_vdisk_only(const char *command, const char *option);

/* Every message of the tools that carries the program's name goes
 * through these, so the name is written in one place. */
/* "PROG: MESSAGE\n" on stderr (PROG is cli_prog). */
void cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* cli_error() with a va_list. */
void cli_verror(const char *fmt, va_list ap)
    __attribute__((format(printf, 1, 0)));
/* cli_error() followed by the "Try 'PROG --help'" hint. */
void cli_error_hint(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The hint alone: "Try 'qemu-img --help' for more information". */
void cli_help_hint(void);
/* After getopt_long() with a ':'-prefixed option string returned @ch
 * (':' or '?'): glibc's own message for it, as QEMU's tools print it
 * ("invalid option -- 'Z'", "unrecognized option '--foo'", "option
 * requires an argument -- 'k'", "option '--socket' requires an
 * argument"). */
void cli_getopt_error(int ch, char **argv);
/* After getopt_long() returned option @ch that the program being run
 * does not have (vdisk's own, or another QEMU tool's): what glibc says
 * of an unknown option. @longidx is getopt_long's, -1 for a short one. */
void cli_foreign_option_error(int ch, int longidx, char **argv);
/* "PROG: warning: MESSAGE\n" on stderr. */
void cli_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
