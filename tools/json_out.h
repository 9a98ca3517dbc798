/*
 * JSON output exactly as qemu-img prints it. QEMU builds its JSON from
 * QDicts, hash tables of 512 buckets whose iteration order is the bucket
 * order (and, inside a bucket, the newest entry first); its pretty printer
 * indents by four spaces and puts even an empty list's bracket on its own
 * line. json_qemu_print() reproduces both over a json-c object built in
 * QAPI field order, so callers just add keys in the order QEMU's schema
 * declares them.
 */
#ifndef VDISK_TOOLS_JSON_OUT_H
#define VDISK_TOOLS_JSON_OUT_H

#include <json-c/json.h>
#include <stdio.h>

/* Prints @obj pretty, objects in QDict order, followed by "\n". */
void json_qemu_print(FILE *out, json_object *obj);

/*
 * Prints the members of @dict as qemu-img's human "Format specific
 * information" does ("    key: value", dashes in keys shown as spaces,
 * lists as "[0]:"), starting at @indent levels of four spaces.
 */
void json_qemu_dump_human(FILE *out, json_object *obj, int indent);

#endif
