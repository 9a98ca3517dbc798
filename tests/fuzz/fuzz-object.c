/*
 * libFuzzer target for the object registry's parsers (src/core/object.c):
 * QEMU's keyval syntax of --object arguments, the QAPI-style checker with
 * its command-line conversions, JSON ObjectOptions, and what the classes
 * do with what passes (base64 and AES-256-CBC of secrets, throttle
 * rules, authz rules and glob matching).
 *
 * The first input byte picks the way in (bit 0: the text as one
 * --object argument through vd_object_add_cli(), else as JSON through
 * vd_object_add_json(); bit 1: add a 32-byte key secret "k" first, so
 * keyid=k reaches the cipher). Whatever was added is then listed, every
 * property read back and set to what it read, authz objects asked about
 * the text, throttle groups read; then everything is deleted, so leaks
 * show up per input.
 *
 * Safety: texts naming a "file" (secret files) or "dir" (TLS
 * credentials) are skipped: they would read host files, and a FIFO
 * would block.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vdisk/vdisk.h"

#define MAX_INPUT 8192

static const char *text;

static int each_prop(const char *name, const char *type, void *opaque)
{
    const char *id = opaque;
    char *v = vd_object_get_property(id, name, NULL);

    (void)type;
    if (v) {
        vd_object_set_property(id, name, v, NULL);
        free(v);
    }
    return 0;
}

static int each_object(const char *id, const char *type, void *opaque)
{
    vd_throttle_limits l;
    unsigned char *data;
    size_t len;

    (void)opaque;
    vd_object_foreach_property(id, each_prop, (void *)id, NULL);
    if (strncmp(type, "authz", 5) == 0) {
        vd_authz_is_allowed(id, text, NULL);
    }
    vd_throttle_group_get_limits(id, &l, NULL);
    if (vd_secret_get(id, &data, &len, NULL) == 0) {
        free(data);
    }
    free(vd_secret_get_utf8(id, NULL));
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s, *help = NULL;

    if (size < 1 || size > MAX_INPUT) {
        return 0;
    }
    s = malloc(size);
    if (!s) {
        return 0;
    }
    memcpy(s, data + 1, size - 1);
    s[size - 1] = '\0';
    if (strstr(s, "file") || strstr(s, "dir")) {
        free(s);
        return 0;
    }
    text = s;
    if (data[0] & 2) {
        vd_object_add_cli("secret,id=k,format=base64,"
                          "data=MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
                          NULL, NULL);
    }
    if (data[0] & 1) {
        vd_object_add_cli(s, &help, NULL);
        free(help);
    } else {
        vd_object_add_json(s, NULL);
    }
    vd_object_foreach(each_object, NULL);
    vd_object_del_all();
    free(s);
    return 0;
}
