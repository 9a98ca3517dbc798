/*
 * The breakpoint interface of blkdebug through the public API
 * (vd_debug_breakpoint(), _remove_breakpoint(), _resume(),
 * _is_suspended(), vd_debug_set_handler()), which qemu-io's break,
 * remove_break, resume and wait_break are built on. The test plays the
 * commands of a qemu-io session with the library, writes down what
 * qemu-io would print from the answers and messages it gets, and
 * compares that transcript with what qemu-io prints for the same
 * commands on a twin image, run at test time. It also checks that a
 * drain (a resize, which drains the node) lets a request stopped at a
 * breakpoint go instead of waiting for it forever, and that the
 * request's data arrives.
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vdisk/vdisk.h"

#include "check.h"

static char dir[64];
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;
static char transcript[4096];

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    va_list ap;
    size_t n;

    pthread_mutex_lock(&out_lock);
    n = strlen(transcript);
    va_start(ap, fmt);
    vsnprintf(transcript + n, sizeof(transcript) - n, fmt, ap);
    va_end(ap);
    pthread_mutex_unlock(&out_lock);
}

static void on_debug(const char *msg, void *opaque)
{
    (void)opaque;
    say("%s\n", msg);
}

static const char *path(const char *name)
{
    static char buf[256];
    snprintf(buf, sizeof(buf), "%s/%s", dir, name);
    return buf;
}

typedef struct writer {
    vd_node *node;
    uint64_t off;
    int ret;
    pthread_t thread;
} writer;

static void *write_4k(void *opaque)
{
    writer *w = opaque;
    static uint8_t buf[4096];
    vd_error err = VD_ERROR_INIT;

    memset(buf, 0xcd, sizeof(buf));
    w->ret = vd_pwrite(w->node, buf, sizeof(buf), w->off, 0, &err);
    if (w->ret == 0) {
        say("wrote 4096/4096 bytes at offset %llu\n",
            (unsigned long long)w->off);
    }
    return NULL;
}

/* qemu-io's wait_break: until a request stops at @tag (bounded). */
static bool wait_break(vd_node *n, const char *tag)
{
    for (int i = 0; i < 5000; i++) {
        if (vd_debug_is_suspended(n, tag)) {
            return true;
        }
        usleep(1000);
    }
    return false;
}

static vd_node *open_img(const char *spec, vd_error *err)
{
    vd_node *n = NULL;
    vd_open(&n, spec, NULL, NULL, VD_O_RDWR | VD_O_QUIET, err);
    return n;
}

static int make_img(const char *name)
{
    vd_error err = VD_ERROR_INIT;
    vd_opts *o = vd_opts_new();
    int r;

    vd_opts_set(o, "size", "1M");
    r = vd_create(path(name), "qcow2", o, &err);
    vd_opts_free(&o);
    CHECK(r == 0, "create %s: %s", name, err.message);
    return r;
}

/* The session, played with the library. */
static void play(void)
{
    vd_error err = VD_ERROR_INIT;
    char spec[300];
    writer w = { 0 };
    vd_node *n;
    int r;

    snprintf(spec, sizeof(spec), "blkdebug::%s", path("v.qcow2"));
    n = open_img(spec, &err);
    CHECK(n, "open %s: %s", spec, err.message);
    if (!n) {
        return;
    }
    /* break write_aio A; aio_write 0 4k; wait_break A; resume A;
     * aio_flush */
    r = vd_debug_breakpoint(n, "write_aio", "A");
    if (r < 0) {
        say("Could not set breakpoint: %s\n", strerror(-r));
    }
    w.node = n;
    w.off = 0;
    pthread_create(&w.thread, NULL, write_4k, &w);
    CHECK(wait_break(n, "A"), "no request stopped at A");
    CHECK(!vd_debug_is_suspended(n, "B"), "a request stopped at B");
    r = vd_debug_resume(n, "A");
    if (r < 0) {
        say("Could not resume request: %s\n", strerror(-r));
    }
    pthread_join(w.thread, NULL);
    CHECK(w.ret == 0, "aio_write: %d", w.ret);
    /* break nosuch B; remove_break B; resume B */
    r = vd_debug_breakpoint(n, "nosuch", "B");
    if (r < 0) {
        say("Could not set breakpoint: %s\n", strerror(-r));
    }
    r = vd_debug_remove_breakpoint(n, "B");
    if (r < 0) {
        say("Could not remove breakpoint %s: %s\n", "B", strerror(-r));
    }
    r = vd_debug_resume(n, "B");
    if (r < 0) {
        say("Could not resume request: %s\n", strerror(-r));
    }
    /* break l2_update C; remove_break C; write 64k 4k */
    r = vd_debug_breakpoint(n, "l2_update", "C");
    if (r < 0) {
        say("Could not set breakpoint: %s\n", strerror(-r));
    }
    r = vd_debug_remove_breakpoint(n, "C");
    if (r < 0) {
        say("Could not remove breakpoint %s: %s\n", "C", strerror(-r));
    }
    w.off = 65536;
    write_4k(&w);
    vd_close(&n, NULL);

    /* break write_aio A on an image without blkdebug */
    n = open_img(path("plain.qcow2"), &err);
    CHECK(n, "open plain: %s", err.message);
    if (n) {
        r = vd_debug_breakpoint(n, "write_aio", "A");
        if (r < 0) {
            say("Could not set breakpoint: %s\n", strerror(-r));
        }
        vd_close(&n, NULL);
    }
}

/* The same session through qemu-io, timings dropped. */
static int referee(char *out, size_t len)
{
    char cmd[1024];
    FILE *p;
    size_t n = 0;

    /* (qemu-io exits 1 here: some of the commands fail on purpose.) */
    snprintf(cmd, sizeof(cmd),
             "command -v qemu-io >/dev/null || exit 127; "
             "qemu-io -c 'break write_aio A' -c 'aio_write 0 4k' "
             "-c 'wait_break A' -c 'resume A' -c 'aio_flush' "
             "-c 'break nosuch B' -c 'remove_break B' -c 'resume B' "
             "-c 'break l2_update C' -c 'remove_break C' "
             "-c 'write 64k 4k' 'blkdebug::%s' 2>&1; "
             "qemu-io -c 'break write_aio A' '%s' 2>&1; exit 0",
             path("q.qcow2"), path("plain.qcow2"));
    p = popen(cmd, "r");
    if (!p) {
        return -1;
    }
    while (n + 1 < len && fgets(out + n, (int)(len - n), p)) {
        if (strstr(out + n, "ops; ")) {
            out[n] = '\0';      /* a timing line */
        }
        n = strlen(out);
    }
    return pclose(p) == 0 ? 0 : -1;
}

/* A request stopped at a breakpoint while the node is drained: the
 * drain lets it go and its data is written. */
static void drain_releases(void)
{
    vd_error err = VD_ERROR_INIT;
    char spec[300];
    uint8_t buf[4096];
    writer w = { 0 };
    vd_node *n;

    snprintf(spec, sizeof(spec), "blkdebug::%s", path("d.qcow2"));
    n = open_img(spec, &err);
    CHECK(n, "open %s: %s", spec, err.message);
    if (!n) {
        return;
    }
    CHECK(vd_debug_breakpoint(n, "write_aio", "D") == 0, "break D");
    w.node = n;
    w.off = 4096;
    pthread_create(&w.thread, NULL, write_4k, &w);
    CHECK(wait_break(n, "D"), "no request stopped at D");
    /* Resizing to the same size drains the graph. */
    CHECK(vd_truncate(n, 1 << 20, false, VD_PREALLOC_OFF, &err) == 0,
          "truncate: %s", err.message);
    pthread_join(w.thread, NULL);
    CHECK(w.ret == 0, "the write stopped at D failed: %d", w.ret);
    CHECK(!vd_debug_is_suspended(n, "D"), "still stopped at D");
    CHECK(vd_pread(n, buf, sizeof(buf), 4096, 0, &err) == 0 &&
          buf[0] == 0xcd && buf[4095] == 0xcd, "the data did not arrive");
    vd_close(&n, NULL);
}

int main(void)
{
    char want[4096] = "";

    snprintf(dir, sizeof(dir), "/tmp/vdisk-blkdebug.XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    vd_debug_set_handler(on_debug, NULL);
    if (make_img("v.qcow2") == 0 && make_img("q.qcow2") == 0 &&
        make_img("plain.qcow2") == 0 && make_img("d.qcow2") == 0) {
        play();
        if (referee(want, sizeof(want)) == 0) {
            CHECK(strstr(want, "blkdebug: Suspended request 'A'\n"
                         "blkdebug: Resuming request 'A'\n"),
                  "qemu-io said: %s", want);
            CHECK(strcmp(want, transcript) == 0,
                  "transcripts differ:\n--- qemu-io\n%s--- vdisk\n%s", want,
                  transcript);
        } else {
            printf("qemu-io cannot run: the transcript is not compared\n");
        }
        drain_releases();
    }
    vd_debug_set_handler(NULL, NULL);
    for (const char *const *f = (const char *const[]){ "v.qcow2", "q.qcow2",
                                                       "plain.qcow2",
                                                       "d.qcow2", NULL };
         *f; f++) {
        unlink(path(*f));
    }
    rmdir(dir);
    TEST_EXIT("test-blkdebug");
}
