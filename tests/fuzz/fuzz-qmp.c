/*
 * libFuzzer target for the QMP monitor: the request-line parser, the
 * envelope checks, the schema-driven argument validation and the command
 * handlers, driven without sockets.
 *
 * The first input byte picks a mode; the rest is text split at newlines.
 *   bit 0 clear: each line goes to the monitor's line handler exactly as
 *     a client's socket line would (bit 1 set: qmp_capabilities is sent
 *     first, so commands are reachable without the fuzzer rediscovering
 *     negotiation every time);
 *   bit 0 set: command-line ("keyval") mode, as `vdisk serve --blockdev`
 *     uses it: the first line names a command, every further line is an
 *     option string for qmp_parse_cli_object() whose result is executed
 *     with keyval conversion.
 * Every input gets a fresh daemon, freed at the end, so leaks in the
 * handlers surface as leaks.
 *
 * Safety: handlers open images, so a request naming a host file could
 * open (and resize) a real file. The target therefore refuses (skips) any
 * request holding a string that contains '/', '\\' or ':' (paths, json:
 * and protocol prefixes), equals "file" (the file protocol driver) or
 * names nbd-server-start (a listening socket). What remains reaches
 * null-co, raw and qcow2 nodes only, in an empty working directory.
 *
 * The QMP sources are not in libvdisk.a (the NBD server is), so they are
 * compiled in here.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../src/qmp/commands.c"
#include "../../src/qmp/monitor.c"
#include "../../src/qmp/schema.c"
#include "../../src/qmp/jobs.c"
#include "../../src/qmp/transaction.c"
#include "../../src/qmp/bitmaps.c"

#define MAX_LINES 32
#define MAX_DEPTH 64

static int fuzz_devnull = -1;

static void ignore_warning(const char *msg, void *opaque)
{
    (void)msg;
    (void)opaque;
}

static void fuzz_init(void)
{
    char dir[] = "/tmp/fuzz-qmp-XXXXXX";

    if (!mkdtemp(dir) || chdir(dir) < 0) {
        abort();
    }
    fuzz_devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (fuzz_devnull < 0) {
        abort();
    }
    vd_set_warning_handler(ignore_warning, NULL);
}

/* True when @s could reach the host outside the target's sandbox. */
static bool unsafe_string(const char *s)
{
    return strpbrk(s, "/\\:") != NULL || strcmp(s, "file") == 0 ||
           strcmp(s, "nbd-server-start") == 0;
}

static bool unsafe_json(json_object *o, int depth)
{
    if (depth > MAX_DEPTH) {
        return true;
    }
    switch (json_object_get_type(o)) {
    case json_type_string:
        return unsafe_string(json_object_get_string(o));
    case json_type_object: {
        json_object_object_foreach(o, key, val) {
            if (strpbrk(key, "/\\:") || unsafe_json(val, depth + 1)) {
                return true;
            }
        }
        return false;
    }
    case json_type_array:
        for (size_t i = 0; i < json_object_array_length(o); i++) {
            if (unsafe_json(json_object_array_get_idx(o, i), depth + 1)) {
                return true;
            }
        }
        return false;
    default:
        return false;
    }
}

/* Parses @line as handle_line() will; unparsable lines are safe (they
 * stop at the parser). */
static bool unsafe_line(const char *line, size_t len)
{
    json_tokener *tok = json_tokener_new();
    json_object *req;
    bool bad;

    if (!tok) {
        return true;
    }
    req = json_tokener_parse_ex(tok, line, (int)len);
    bad = req && unsafe_json(req, 0);
    json_object_put(req);
    json_tokener_free(tok);
    return bad;
}

static void run_lines(qmp_client *c, char *text, size_t len)
{
    size_t start = 0;
    int n = 0;

    while (start < len && n++ < MAX_LINES) {
        char *nl = memchr(text + start, '\n', len - start);
        size_t end = nl ? (size_t)(nl - text) : len;
        char *line = text + start;
        size_t l = end - start;

        line[l] = '\0';
        if (l && !unsafe_line(line, l)) {
            handle_line(c, line, l);
        }
        start = end + 1;
    }
}

static void run_keyval(qmp_daemon *d, char *text, size_t len)
{
    char *nl = memchr(text, '\n', len);
    const char *cmd = text;
    size_t start;
    int n = 0;

    if (!nl) {
        return;
    }
    *nl = '\0';
    if (unsafe_string(cmd)) {
        return;
    }
    start = (size_t)(nl - text) + 1;
    while (start < len && n++ < MAX_LINES) {
        char *end = memchr(text + start, '\n', len - start);
        size_t stop = end ? (size_t)(end - text) : len;
        vd_error err = VD_ERROR_INIT;
        qmp_error e = { 0 };
        json_object *args, *ret;

        text[stop] = '\0';
        args = qmp_parse_cli_object(text + start, "driver", &err);
        if (args && !unsafe_json(args, 0)) {
            ret = qmp_daemon_execute(d, cmd, args, true, &e);
            json_object_put(ret);
        }
        json_object_put(args);
        start = stop + 1;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char caps[] = "{\"execute\": \"qmp_capabilities\"}";
    qmp_daemon *d;
    qmp_client c;
    char *text;

    if (fuzz_devnull < 0) {
        fuzz_init();
    }
    if (size < 1 || size > 65536) {
        return 0;
    }
    /* One spare byte: the last line is terminated in place. */
    text = malloc(size);
    if (!text) {
        return 0;
    }
    memcpy(text, data + 1, size - 1);
    text[size - 1] = '\0';
    d = qmp_daemon_new();
    if (!d) {
        abort();
    }
    memset(&c, 0, sizeof(c));
    c.d = d;
    c.fd = fuzz_devnull;
    pthread_mutex_init(&c.send_lock, NULL);
    if (data[0] & 1) {
        run_keyval(d, text, size - 1);
    } else {
        if (data[0] & 2) {
            handle_line(&c, caps, sizeof(caps) - 1);
        }
        run_lines(&c, text, size - 1);
    }
    pthread_mutex_destroy(&c.send_lock);
    qmp_daemon_free(&d);
    free(text);
    return 0;
}
