/*
 * Regression test: qcow2 internal snapshots taken in the same open as the
 * writes around them. Snapshot create, delete and goto change refcounts,
 * COPIED flags, the L1 table and the snapshot table while the metadata
 * caches, the free-cluster search and the queue of pending discards keep
 * state from the writes before; a separate process per step hides any
 * stale state, so everything here happens within one vd_open().
 *
 * A scenario runs rounds of: snapshot create, in some rounds a goto to
 * or a delete of an earlier snapshot, then writes (one thread, or four
 * threads that own interleaved regions sharing clusters and L2 tables).
 * Snapshot operations run with no request in flight, as the core's
 * drain guarantees. An in-memory model holds the current content and
 * the content of every snapshot. The current state is read back after
 * every round in the same open; after close every snapshot is read
 * through vd_snapshot_load_tmp() on a read-only open, and `qemu-img
 * check` must find neither errors nor leaks.
 *
 * Scenarios differ by cluster size, cache sizes (default, or tiny so
 * that tables are evicted between steps) and thread count. Helpers
 * first, then the writers, the scenario and main(). Exit 0 pass, 1 fail;
 * without qemu-img the check step is skipped.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vdisk/vdisk.h"

#include "check.h"

#define IMG_SIZE (4u << 20)
#define ROUNDS 8
#define NTHREADS 4
/* Not a multiple of any cluster size: neighbouring regions share
 * clusters, so threads allocate in the same clusters and L2 tables. */
#define REGION (40 * 1024 + 512)
#define NREGIONS (IMG_SIZE / REGION)

typedef struct scenario {
    const char *name;
    const char *cluster_size;
    const char *cache_opts;     /* open options, or NULL */
    int threads;                /* 1 or NTHREADS */
} scenario;

typedef struct model_snap {
    char name[16];
    uint8_t *data;              /* NULL once deleted */
} model_snap;

static char dir[] = "/tmp/vdisk-snapsess-XXXXXX";
static char path[300];
static bool have_qemu_img;

static uint8_t *model;
static model_snap snaps[ROUNDS];

static uint64_t rnd(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static vd_node *open_img(const char *optstr, unsigned flags)
{
    vd_opts *o = vd_opts_new();
    vd_error err = VD_ERROR_INIT;
    vd_node *n = NULL;
    int r;

    if (optstr) {
        CHECK(vd_opts_parse(o, optstr, NULL, &err) == 0, "options %s: %s",
              optstr, err.message);
    }
    r = vd_open(&n, path, "qcow2", o, flags | VD_O_QUIET, &err);
    CHECK(r == 0, "open %s: %s", path, err.message);
    vd_opts_free(&o);
    return r == 0 ? n : NULL;
}

/* Compares the node's whole content with @want; reports the first
 * differing byte. */
static bool same_content(vd_node *n, const uint8_t *want, const char *what)
{
    uint8_t *buf = malloc(IMG_SIZE);
    vd_error err = VD_ERROR_INIT;
    bool ok = buf != NULL;

    if (ok && vd_pread(n, buf, IMG_SIZE, 0, 0, &err) < 0) {
        CHECK(0, "%s: read: %s", what, err.message);
        ok = false;
    }
    for (uint64_t i = 0; ok && i < IMG_SIZE; i++) {
        if (buf[i] != want[i]) {
            CHECK(0, "%s: byte 0x%" PRIx64 " is 0x%02x, expected 0x%02x",
                  what, i, buf[i], want[i]);
            ok = false;
        }
    }
    free(buf);
    return ok;
}

/* ---- writers --------------------------------------------------------- */

typedef struct writer {
    vd_node *node;
    int round;
    int index;                  /* thread index */
    int stride;                 /* number of threads */
    uint64_t seed;
    int errors;
} writer;

/* One write (or zero write) of [off, off+len) with a pattern derived
 * from the round, applied to the model too. The model is shared, but
 * writers own disjoint byte ranges. */
static void do_write(writer *w, uint64_t off, uint64_t len, int byte,
                     bool zero)
{
    vd_error err = VD_ERROR_INIT;
    int r;

    if (zero) {
        r = vd_write_zeroes(w->node, len, off, VD_REQ_MAY_UNMAP, &err);
        byte = 0;
    } else {
        uint8_t *buf = malloc(len);
        if (!buf) {
            w->errors++;
            return;
        }
        memset(buf, byte, len);
        r = vd_pwrite(w->node, buf, len, off, 0, &err);
        free(buf);
    }
    if (r < 0) {
        fprintf(stderr, "%s at 0x%" PRIx64 "+0x%" PRIx64 ": %s\n",
                zero ? "write_zeroes" : "write", off, len, err.message);
        w->errors++;
        return;
    }
    memset(model + off, byte, len);
}

/* Writes pieces of each owned region: a few random extents inside it,
 * sometimes the whole region, sometimes zeros. */
static void *writer_main(void *opaque)
{
    writer *w = opaque;

    for (uint64_t r = (uint64_t)w->index; r < NREGIONS;
         r += (uint64_t)w->stride) {
        uint64_t base = r * REGION;
        uint64_t k = rnd(&w->seed) % 4;
        int byte = (int)((w->round * 37 + r) % 255) + 1;

        if (k == 0) {
            do_write(w, base, REGION, byte, false);
            continue;
        }
        for (uint64_t i = 0; i < k; i++) {
            uint64_t off = rnd(&w->seed) % REGION;
            uint64_t len = 1 + rnd(&w->seed) % (REGION - off);
            do_write(w, base + off, len, byte + (int)i,
                     rnd(&w->seed) % 8 == 0);
        }
    }
    return NULL;
}

static int write_round(vd_node *n, int round, int threads)
{
    pthread_t tid[NTHREADS];
    writer w[NTHREADS];
    int errors = 0;

    for (int t = 0; t < threads; t++) {
        w[t] = (writer){ n, round, t, threads,
                         (uint64_t)(round * 1000 + t + 1), 0 };
    }
    if (threads == 1) {
        writer_main(&w[0]);
    } else {
        for (int t = 0; t < threads; t++) {
            pthread_create(&tid[t], NULL, writer_main, &w[t]);
        }
        for (int t = 0; t < threads; t++) {
            pthread_join(tid[t], NULL);
        }
    }
    for (int t = 0; t < threads; t++) {
        errors += w[t].errors;
    }
    return errors;
}

/* ---- the scenario ----------------------------------------------------- */

static int latest_alive(int before)
{
    for (int i = before - 1; i >= 0; i--) {
        if (snaps[i].data) {
            return i;
        }
    }
    return -1;
}

static void run_scenario(const scenario *sc)
{
    vd_error err = VD_ERROR_INIT;
    vd_opts *o = vd_opts_new();
    vd_node *n;
    char what[512];

    snprintf(path, sizeof(path), "%s/%s.qcow2", dir, sc->name);
    unlink(path);
    vd_opts_set(o, "size", "4M");
    vd_opts_set(o, "cluster_size", sc->cluster_size);
    CHECK(vd_create(path, "qcow2", o, &err) == 0, "%s: create: %s",
          sc->name, err.message);
    vd_opts_free(&o);
    memset(model, 0, IMG_SIZE);
    memset(snaps, 0, sizeof(snaps));

    n = open_img(sc->cache_opts, VD_O_RDWR);
    if (!n) {
        return;
    }
    for (int round = 0; round < ROUNDS; round++) {
        model_snap *ms = &snaps[round];
        int target;

        snprintf(ms->name, sizeof(ms->name), "s%d", round);
        err = (vd_error)VD_ERROR_INIT;
        CHECK(vd_snapshot_create_simple(n, ms->name, &err) == 0,
              "%s: create %s: %s", sc->name, ms->name, err.message);
        ms->data = malloc(IMG_SIZE);
        memcpy(ms->data, model, IMG_SIZE);

        if (round % 3 == 2 && (target = latest_alive(round - 1)) >= 0) {
            /* Drop an older snapshot: its clusters may become private
             * (COPIED again) or free, then be reused by the writes. */
            err = (vd_error)VD_ERROR_INIT;
            CHECK(vd_snapshot_delete(n, NULL, snaps[target].name, &err) == 0,
                  "%s: delete %s: %s", sc->name, snaps[target].name,
                  err.message);
            free(snaps[target].data);
            snaps[target].data = NULL;
        }
        if (round % 4 == 3 && (target = latest_alive(round)) >= 0) {
            err = (vd_error)VD_ERROR_INIT;
            CHECK(vd_snapshot_goto(n, snaps[target].name, &err) == 0,
                  "%s: goto %s: %s", sc->name, snaps[target].name,
                  err.message);
            memcpy(model, snaps[target].data, IMG_SIZE);
            snprintf(what, sizeof(what), "%s: after goto %s", sc->name,
                     snaps[target].name);
            same_content(n, model, what);
        }

        CHECK(write_round(n, round, sc->threads) == 0,
              "%s: round %d: writes failed", sc->name, round);
        snprintf(what, sizeof(what), "%s: round %d, same open", sc->name,
                 round);
        same_content(n, model, what);
    }
    err = (vd_error)VD_ERROR_INIT;
    CHECK(vd_close(&n, &err) == 0, "%s: close: %s", sc->name, err.message);

    /* Every surviving snapshot, then the current state, from disk. */
    for (int i = 0; i < ROUNDS; i++) {
        if (!snaps[i].data) {
            continue;
        }
        n = open_img(NULL, 0);
        if (!n) {
            break;
        }
        err = (vd_error)VD_ERROR_INIT;
        if (vd_snapshot_load_tmp(n, NULL, snaps[i].name, &err) < 0) {
            CHECK(0, "%s: load_tmp %s: %s", sc->name, snaps[i].name,
                  err.message);
        } else {
            snprintf(what, sizeof(what), "%s: snapshot %s after close",
                     sc->name, snaps[i].name);
            same_content(n, snaps[i].data, what);
        }
        vd_close(&n, NULL);
    }
    n = open_img(NULL, 0);
    if (n) {
        snprintf(what, sizeof(what), "%s: current state after close",
                 sc->name);
        same_content(n, model, what);
        vd_close(&n, NULL);
    }
    if (have_qemu_img) {
        char cmd[600];
        snprintf(cmd, sizeof(cmd), "qemu-img check -q '%s' >/dev/null 2>&1", path);
        CHECK(system(cmd) == 0, "%s: qemu-img check found errors or leaks "
              "in %s", sc->name, path);
    }
    for (int i = 0; i < ROUNDS; i++) {
        free(snaps[i].data);
        snaps[i].data = NULL;
    }
}

int main(void)
{
    static const scenario scenarios[] = {
        { "c64k-default-1t", "65536", NULL, 1 },
        { "c64k-default-4t", "65536", NULL, NTHREADS },
        { "c64k-tiny-4t", "65536",
          "l2-cache-size=16k,refcount-cache-size=8k", NTHREADS },
        { "c4k-tiny-1t", "4096",
          "l2-cache-size=8k,refcount-cache-size=16k", 1 },
        { "c4k-tiny-4t", "4096",
          "l2-cache-size=8k,refcount-cache-size=16k", NTHREADS },
        { "c4k-nodiscard-4t", "4096",
          "pass-discard-snapshot=off,pass-discard-other=on", NTHREADS },
    };

    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    model = malloc(IMG_SIZE);
    if (!model) {
        return 1;
    }
    have_qemu_img = system("qemu-img --version >/dev/null 2>&1") == 0;
    if (!have_qemu_img) {
        printf("note: qemu-img not installed, skipping qemu-img check\n");
    }
    for (size_t i = 0; i < sizeof(scenarios) / sizeof(scenarios[0]); i++) {
        int before = failures;
        run_scenario(&scenarios[i]);
        printf("%s: %s\n", scenarios[i].name,
               failures == before ? "ok" : "FAILED");
        fflush(stdout);
    }
    free(model);
    if (failures == 0) {
        char cmd[300];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
        if (system(cmd) != 0) {
            fprintf(stderr, "could not remove %s\n", dir);
        }
    }
    TEST_EXIT("test-qcow2-snapshot-session");
}
