/*
 * A ThreadSanitizer workload: drives the paths that the normal tests
 * exercise only from one thread at a time, with many threads at once, so
 * that TSan sees every shared field touched concurrently. It is built and
 * run by tests/tsan/run.sh (not by meson: it is only useful under TSan).
 *
 *   tsan-stress DIR QEMU_IMG
 *
 * Scenarios, each on fresh images in DIR made with qemu-img:
 *   io        qcow2 (small L2 cache, cache-clean-interval=1) with 8
 *             workers doing writes, reads, zero writes, discards, block
 *             status, flushes, statistics and length queries, while a
 *             control thread creates and deletes snapshots, grows the
 *             image and reads image info (each drains);
 *   prealloc  qcow2 with preallocation=metadata: many threads ask for
 *             block status at once on a fresh node (the lazy detection);
 *   reopen    readers and block-status threads while the control thread
 *             switches the node between read-only and read-write;
 *   cor       a qcow2 overlay with copy-on-read=on over a filled backing
 *             file: readers populate clusters while writers write the
 *             same clusters.
 * Each worker owns a stripe of the image and checks that it reads back
 * what it wrote, so lost serialisation shows up as a mismatch as well as
 * a race report, and qemu-img check judges every image written (its
 * output goes to IMAGE.check). Exit 0 pass, 1 fail, 77 skip (no qemu-img).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "vdisk/vdisk.h"

#define MiB (1024 * 1024ull)
#ifndef NWORKERS
#define NWORKERS 8
#endif
#define STRIPE (2 * MiB)
#define BLK 4096

static const char *dir, *qemu_img;
static atomic_int failures;
static atomic_bool stop;

static void failf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void failf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("FAIL: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    atomic_fetch_add(&failures, 1);
}

static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    int r = system(cmd);
    if (r != 0)
        failf("command failed (%d): %s", r, cmd);
    return r;
}

static vd_node *open_img(const char *path, const char *optstr, unsigned flags)
{
    vd_opts *o = vd_opts_new();
    vd_error err = VD_ERROR_INIT;
    vd_node *n = NULL;
    if (optstr && vd_opts_parse(o, optstr, NULL, &err) < 0) {
        failf("bad options %s: %s", optstr, err.message);
        vd_error_clear(&err);
        vd_opts_free(&o);
        return NULL;
    }
    if (vd_open(&n, path, NULL, o, flags, &err) < 0) {
        failf("vd_open %s (%s): %s", path, optstr ? optstr : "",
              err.message);
        vd_error_clear(&err);
    }
    vd_opts_free(&o);
    return n;
}

static void fill(uint8_t *buf, size_t len, unsigned tag)
{
    for (size_t i = 0; i < len; i++)
        buf[i] = (uint8_t)(tag * 131 + i / 512);
}

/* ---- workers ---- */

typedef struct worker {
    pthread_t th;
    vd_node *node;
    int id;
    bool write;     /* may write (else only reads and status) */
    bool verify;    /* the stripe is ours: check read-back */
    unsigned seed;
    uint64_t base;  /* start of the stripe */
} worker;

static void one_io(worker *w, uint8_t *buf, uint8_t *rbuf, unsigned *gen)
{
    vd_error err = VD_ERROR_INIT;
    vd_node *n = w->node;
    unsigned op = rand_r(&w->seed) % 10;
    /* Odd lengths and offsets make the core bounce and split. */
    uint64_t len = BLK * (1 + rand_r(&w->seed) % 8) - (op & 1) * 512;
    uint64_t off = w->base + (uint64_t)(rand_r(&w->seed) %
                                        ((STRIPE - 9 * BLK) / 512)) * 512;
    vd_extent ext;
    vd_stats st;
    int r = 0;

    if (!w->write && op < 6)
        op = 6 + op % 4;
    switch (op) {
    case 0: case 1: case 2:
        fill(buf, len, ++*gen + (unsigned)w->id * 1000);
        r = vd_pwrite(n, buf, len, off, op == 2 ? VD_REQ_FUA : 0, &err);
        if (r == 0 && w->verify) {
            r = vd_pread(n, rbuf, len, off, 0, &err);
            if (r == 0 && memcmp(buf, rbuf, len))
                failf("worker %d: read-back mismatch at %" PRIu64, w->id,
                      off);
        }
        break;
    case 3:
        r = vd_write_zeroes(n, len, off, VD_REQ_MAY_UNMAP, &err);
        break;
    case 4:
        r = vd_discard(n, len, off, &err);
        break;
    case 5:
        r = vd_flush(n, &err);
        break;
    case 6: case 7:
        r = vd_pread(n, rbuf, len, off, 0, &err);
        break;
    case 8:
        r = vd_block_status(n, off, len, &ext, &err);
        break;
    default:
        vd_get_stats(n, &st);
        if (vd_getlength(n) < 0)
            failf("worker %d: vd_getlength failed", w->id);
        break;
    }
    /* A read-only phase may refuse writes; anything else is a failure. */
    if (r < 0 && !(r == -EROFS && !w->verify))
        failf("worker %d op %u at %" PRIu64 "+%" PRIu64 ": %d %s", w->id, op,
              off, len, r, err.message);
    vd_error_clear(&err);
}

static void *worker_main(void *opaque)
{
    worker *w = opaque;
    uint8_t *buf = malloc(9 * BLK), *rbuf = malloc(9 * BLK);
    unsigned gen = 0;
    while (!atomic_load(&stop) && buf && rbuf)
        one_io(w, buf, rbuf, &gen);
    free(buf);
    free(rbuf);
    return NULL;
}

static void start_workers(worker *w, int n, vd_node *node, bool write,
                          bool verify, uint64_t stripe_mod)
{
    atomic_store(&stop, false);
    for (int i = 0; i < n; i++) {
        w[i] = (worker){ .node = node, .id = i, .write = write,
                         .verify = verify, .seed = 1234u + (unsigned)i,
                         .base = ((uint64_t)i % stripe_mod) * STRIPE };
        pthread_create(&w[i].th, NULL, worker_main, &w[i]);
    }
}

static void stop_workers(worker *w, int n)
{
    atomic_store(&stop, true);
    for (int i = 0; i < n; i++)
        pthread_join(w[i].th, NULL);
}

/* Closes the node and lets qemu-img judge the image. */
static void close_and_check(vd_node **n, const char *path)
{
    vd_error err = VD_ERROR_INIT;
    if (vd_close(n, &err) < 0)
        failf("close %s: %s", path, err.message);
    char cmd[1200];
    snprintf(cmd, sizeof(cmd), "%s check -q %s >%s.check 2>&1", qemu_img,
             path, path);
    int r = system(cmd);
    /* Exit 3 is "leaked clusters only": snapshots taken and overwritten
     * in one session leak today, also from one thread (a known qcow2
     * bug, not a race), so it is reported without failing the run. */
    if (r != -1 && WIFEXITED(r) && WEXITSTATUS(r) == 3)
        fprintf(stderr, "WARNING: %s has leaked clusters (see %s.check)\n",
                path, path);
    else if (r != 0)
        failf("qemu-img check failed (%d): see %s.check", r, path);
}

/* ---- scenarios ---- */

static void scenario_io(void)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/io.qcow2", dir);
    if (sh("%s create -q -f qcow2 -o cluster_size=4k %s %llu", qemu_img,
           path, NWORKERS * STRIPE / MiB * MiB) != 0)
        return;
    vd_node *n = open_img(path, "l2-cache-size=16k,refcount-cache-size=8k,"
                          "cache-clean-interval=1", VD_O_RDWR);
    if (!n)
        return;
    worker w[NWORKERS];
    start_workers(w, NWORKERS, n, true, true, NWORKERS);
    vd_error err = VD_ERROR_INIT;
    for (int round = 0; round < 6; round++) {
        char name[32];
        usleep(300 * 1000);
        snprintf(name, sizeof(name), "s%d", round);
        if (vd_snapshot_create_simple(n, name, &err) < 0)
            failf("snapshot create %s: %s", name, err.message);
        vd_error_clear(&err);
        vd_image_info *info = NULL;
        if (vd_get_info(n, &info, &err) < 0)
            failf("info: %s", err.message);
        vd_image_info_free(&info);
        vd_error_clear(&err);
        int64_t len = vd_getlength(n);
        if (vd_truncate(n, (uint64_t)len + MiB, false, VD_PREALLOC_OFF,
                        &err) < 0)
            failf("truncate: %s", err.message);
        vd_error_clear(&err);
        if (round % 2 && vd_snapshot_delete(n, NULL, name, &err) < 0)
            failf("snapshot delete %s: %s", name, err.message);
        vd_error_clear(&err);
    }
    stop_workers(w, NWORKERS);
    close_and_check(&n, path);
}

static void scenario_prealloc(void)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/pre.qcow2", dir);
    if (sh("%s create -q -f qcow2 -o preallocation=metadata %s 64M",
           qemu_img, path) != 0)
        return;
    for (int round = 0; round < 3; round++) {
        vd_node *n = open_img(path, NULL, 0);
        if (!n)
            return;
        worker w[NWORKERS];
        start_workers(w, NWORKERS, n, false, false, 32);
        usleep(200 * 1000);
        stop_workers(w, NWORKERS);
        vd_close(&n, NULL);
    }
}

static void scenario_reopen(void)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/ro.qcow2", dir);
    if (sh("%s create -q -f qcow2 %s 32M && qemu-io -f qcow2 -c "
           "'write -P 7 0 16M' %s >/dev/null", qemu_img, path, path) != 0)
        return;
    vd_node *n = open_img(path, NULL, VD_O_RDWR);
    if (!n)
        return;
    worker w[NWORKERS];
    start_workers(w, NWORKERS, n, false, false, 16);
    vd_error err = VD_ERROR_INIT;
    for (int i = 0; i < 10; i++) {
        usleep(50 * 1000);
        if (vd_reopen(n, i % 2 == 1, &err) < 0)
            failf("reopen %s: %s", i % 2 ? "rw" : "ro", err.message);
        vd_error_clear(&err);
    }
    stop_workers(w, NWORKERS);
    close_and_check(&n, path);
}

static void scenario_cor(void)
{
    char base[512], top[512];
    snprintf(base, sizeof(base), "%s/cor-base.qcow2", dir);
    snprintf(top, sizeof(top), "%s/cor-top.qcow2", dir);
    if (sh("%s create -q -f qcow2 %s 16M && qemu-io -f qcow2 -c "
           "'write -P 9 0 16M' %s >/dev/null && %s create -q -f qcow2 "
           "-o cluster_size=8k -b %s -F qcow2 %s", qemu_img, base, base,
           qemu_img, base, top) != 0)
        return;
    vd_node *n = open_img(top, "copy-on-read=on", VD_O_RDWR);
    if (!n)
        return;
    /* Writers own stripes 0-3; readers (ids 4-7) read the same stripes
     * and populate them from the backing file under the writers' feet. */
    worker w[NWORKERS];
    atomic_store(&stop, false);
    for (int i = 0; i < NWORKERS; i++) {
        w[i] = (worker){ .node = n, .id = i, .write = i < 4,
                         .verify = i < 4, .seed = 99u + (unsigned)i,
                         .base = (uint64_t)(i % 4) * STRIPE };
        pthread_create(&w[i].th, NULL, worker_main, &w[i]);
    }
    usleep(1500 * 1000);
    stop_workers(w, NWORKERS);
    close_and_check(&n, top);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: tsan-stress DIR QEMU_IMG\n");
        return 1;
    }
    dir = argv[1];
    qemu_img = argv[2];
    if (system("qemu-io --version >/dev/null 2>&1") != 0) {
        fprintf(stderr, "qemu-io not found: skipped\n");
        return 77;
    }
    struct { const char *name; void (*fn)(void); } sc[] = {
        { "io", scenario_io },
        { "prealloc", scenario_prealloc },
        { "reopen", scenario_reopen },
        { "cor", scenario_cor },
    };
    for (size_t i = 0; i < sizeof(sc) / sizeof(sc[0]); i++) {
        int before = atomic_load(&failures);
        sc[i].fn();
        printf("%s: %s\n", sc[i].name,
               atomic_load(&failures) == before ? "ok" : "FAILED");
        fflush(stdout);
    }
    return atomic_load(&failures) ? 1 : 0;
}
