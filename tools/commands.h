/*
 * The vdisk command-line tool: one function per subcommand. main() in
 * vdisk.c dispatches on argv[1]; each command parses its own options
 * (argv[0] is the subcommand name) and returns the process exit status.
 */
#ifndef VDISK_TOOLS_COMMANDS_H
#define VDISK_TOOLS_COMMANDS_H

#include <getopt.h>

/* The getopt tables of the commands that parse without cli_getopt()
 * (bench, io, serve: each its own messages); util.c's cli_commands[]
 * points at them, so help and `vdisk --list-options` read the tables
 * the parser uses. */
extern const char cmd_bench_short_opts[], cmd_io_short_opts[],
    cmd_serve_short_opts[];
extern const struct option cmd_bench_long_opts[], cmd_io_long_opts[],
    cmd_serve_long_opts[];

int cmd_create(int argc, char **argv);
int cmd_info(int argc, char **argv);
/* Long-only options of convert (beyond util.h's range). */
enum { OPT_SALVAGE = 0x260, OPT_BITMAPS, OPT_SKIP_BROKEN_BITMAPS };
int cmd_convert(int argc, char **argv);
int cmd_compare(int argc, char **argv);
int cmd_map(int argc, char **argv);
int cmd_resize(int argc, char **argv);
int cmd_dd(int argc, char **argv);
int cmd_check(int argc, char **argv);
int cmd_io(int argc, char **argv);   /* tools/io.c: the qemu-io commands */
int cmd_bench(int argc, char **argv); /* tools/cmd_bench.c: qemu-img bench */
int cmd_serve(int argc, char **argv); /* tools/cmd_serve.c: the NBD server */
/* tools/cmd_snapshot.c: qemu-img snapshot and group snapshots */
enum { OPT_SNAPSHOT_GROUP = 0x240, OPT_SNAPSHOT_VMSTATE,
       OPT_SNAPSHOT_VMSTATE_DATA };
int cmd_snapshot(int argc, char **argv);
/* Long-only options of measure and amend (beyond util.h's range). */
enum { OPT_SIZE = 0x200, OPT_FORCE };
int cmd_measure(int argc, char **argv);
int cmd_amend(int argc, char **argv);
int cmd_commit(int argc, char **argv);
/* tools/cmd_bitmap.c: qemu-img bitmap; its long-only actions. */
enum { OPT_BITMAP_ADD = 0x280, OPT_BITMAP_REMOVE, OPT_BITMAP_CLEAR,
       OPT_BITMAP_ENABLE, OPT_BITMAP_DISABLE, OPT_BITMAP_MERGE };
int cmd_bitmap(int argc, char **argv);
int cmd_rebase(int argc, char **argv);
/* tools/cmd_diff.c: what changed between snapshots, layers, a bitmap. */
enum { OPT_DIFF_EXACT = 0x2a0, OPT_DIFF_BITMAP };
int cmd_diff(int argc, char **argv);
/* tools/cmd_export_diff.c: change sets as RBD diff streams. */
enum { OPT_XDIFF_FROM_SNAP = 0x2e0, OPT_XDIFF_SNAPSHOT, OPT_XDIFF_WHOLE_OBJECT,
       OPT_XDIFF_EXPORT_FORMAT };
int cmd_export_diff(int argc, char **argv);
int cmd_import_diff(int argc, char **argv);
/* tools/cmd_compact.c: in-place compaction of a qcow2 image. */
int cmd_compact(int argc, char **argv);
/* tools/cmd_du.c: space per snapshot, layer, bitmap, metadata. */
int cmd_du(int argc, char **argv);
/* --dry-run of commit, rebase, amend, resize, snapshot (tools/dry_run.h)
 * and compact. */
enum { OPT_DRY_RUN = 0x310 };

#endif
