/*
 * What the --dry-run of commit, rebase, amend, resize and snapshot -a/-d
 * share (docs/snapshots.md, "Dry runs"): the
 * ranges a library dry run reports, collected and merged, and the two
 * ways of printing a result (human lines on stdout, or one JSON object
 * with --output=json). A dry run opens every image read-only and writes
 * nothing.
 */
#ifndef VDISK_TOOLS_DRY_RUN_H
#define VDISK_TOOLS_DRY_RUN_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stdint.h>

/* Ranges in ascending order, touching ones merged. */
typedef struct dry_ranges {
    uint64_t *start, *length;
    size_t n, cap;
    uint64_t bytes;             /* the sum of the lengths */
    bool oom;                   /* a range could not be stored */
} dry_ranges;

/* A vd_range_fn: adds [offset, offset + length) to the dry_ranges
 * @opaque. */
void dry_ranges_add(uint64_t offset, uint64_t length, void *opaque);
void dry_ranges_free(dry_ranges *r);

/* A new JSON object { "dry-run": true, "command": @command, "image":
 * @image } that the command completes. */
json_object *dry_json_new(const char *command, const char *image);
/* @r as a JSON array of { "start", "length" } (as vdisk diff, qemu-img
 * map). */
json_object *dry_json_ranges(const dry_ranges *r);
/* Prints @obj (pretty, members in insertion order) and frees it. */
void dry_json_print(json_object *obj);
/* A size as "1.5 MiB (1572864 bytes)" into @buf. */
const char *dry_size(char *buf, size_t len, uint64_t bytes);
/* The human table of @r ("Offset          Length"), nothing when empty. */
void dry_print_ranges(const dry_ranges *r);

#endif
