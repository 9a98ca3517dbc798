/* Bug: a partial zero write checked "cluster holds no data" and then waited for another thread's in-flight allocation of that cluster, which linked data, and zeroed the whole cluster anyway: the other thread's bytes read back as 0x00. */
/*
 * Regression test: concurrent zero writes and data writes to disjoint
 * byte ranges of the same qcow2 clusters. qcow2 turns a zero write of
 * part of a (sub)cluster into a whole zero (sub)cluster when the rest of
 * it reads as zeros and it holds no data (QEMU 7.2's
 * qcow2_co_pwrite_zeroes()); that decision must stay serialised against
 * an allocating write to the same cluster, which is in flight (data
 * being written, L2 entry not yet linked) while the zero write looks.
 *
 * Every cluster of the image is cut into NTHREADS slices with unaligned
 * boundaries; thread t owns slice t of every cluster. The threads meet
 * at a barrier before each cluster, so all of them hit the same cluster
 * at once; each writes its slice with data or zeros (VD_REQ_MAY_UNMAP),
 * chosen at random. Between rounds the whole image is zeroed, with unmap
 * (zero clusters without a host cluster: allocating writes) or without
 * (preallocated zero clusters: writes that fill them in place). The
 * content is compared with an in-memory model after every round and
 * after close; `qemu-img check` must find neither errors nor leaks.
 * Scenarios: 4 KiB and 64 KiB clusters, and 64 KiB with extended L2
 * (subclusters of 2 KiB, the slices cut through them). Exit 0 pass, 1
 * fail; without qemu-img the check step is skipped.
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
#include "open.h"

#define NTHREADS 4
#define ROUNDS 12

typedef struct scenario {
    const char *name;
    uint64_t cluster_size;
    bool extended_l2;
    uint64_t clusters;          /* image size in clusters */
} scenario;

static char dir[] = "/tmp/vdisk-zerorace-XXXXXX";
static char path[300];
static bool have_qemu_img;

static uint8_t *model;
static pthread_barrier_t barrier;

typedef struct worker {
    vd_node *node;
    const scenario *sc;
    int round;
    int index;
    int errors;
} worker;

static uint64_t rnd(uint64_t x)
{
    uint64_t z = x + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Start of slice @t inside a cluster: quarters moved off every
 * (sub)cluster and sector boundary. */
static uint64_t slice_start(uint64_t cs, int t)
{
    static const uint64_t skew[NTHREADS + 1] = { 0, 333, 77, 1001, 0 };
    return t == NTHREADS ? cs : cs / NTHREADS * (uint64_t)t + skew[t];
}

static void *worker_main(void *opaque)
{
    worker *w = opaque;
    uint64_t cs = w->sc->cluster_size;
    uint64_t s0 = slice_start(cs, w->index);
    uint64_t len = slice_start(cs, w->index + 1) - s0;
    uint8_t *buf = malloc(len);

    for (uint64_t c = 0; c < w->sc->clusters; c++) {
        uint64_t off = c * cs + s0;
        uint64_t r = rnd(((uint64_t)w->round << 40) ^ (c << 8) ^
                         (uint64_t)w->index);
        bool zero = r & 1;
        int byte = (int)(r >> 8) % 255 + 1;
        vd_error err = VD_ERROR_INIT;
        int ret;

        pthread_barrier_wait(&barrier);
        if (!buf) {
            w->errors++;
            continue;
        }
        if (zero) {
            ret = vd_write_zeroes(w->node, len, off, VD_REQ_MAY_UNMAP, &err);
            byte = 0;
        } else {
            memset(buf, byte, len);
            ret = vd_pwrite(w->node, buf, len, off, 0, &err);
        }
        if (ret < 0) {
            fprintf(stderr, "%s at 0x%" PRIx64 "+0x%" PRIx64 ": %s\n",
                    zero ? "write_zeroes" : "write", off, len, err.message);
            w->errors++;
            continue;
        }
        memset(model + off, byte, len);
    }
    free(buf);
    return NULL;
}

/* Whether the node reads as the model; the first differing byte is
 * reported. */
static bool matches_model(vd_node *n, uint64_t size, const char *what)
{
    uint8_t *got = malloc(size);
    vd_error err = VD_ERROR_INIT;
    uint64_t i = 0;

    if (!got || vd_pread(n, got, size, 0, 0, &err) < 0) {
        CHECK(0, "%s: read: %s", what, got ? err.message : "out of memory");
        free(got);
        return false;
    }
    while (i < size && got[i] == model[i]) {
        i++;
    }
    CHECK(i == size, "%s: byte 0x%" PRIx64 " is 0x%02x, expected 0x%02x",
          what, i, i < size ? got[i] : 0, i < size ? model[i] : 0);
    free(got);
    return i == size;
}

static vd_node *open_img(unsigned flags)
{
    return open_checked(path, "qcow2", flags);
}

static void run_scenario(const scenario *sc)
{
    uint64_t size = sc->cluster_size * sc->clusters;
    int before = failures;
    vd_error err = VD_ERROR_INIT;
    vd_opts *o = vd_opts_new();
    char what[256], num[32];
    vd_node *n;

    snprintf(path, sizeof(path), "%s/%s.qcow2", dir, sc->name);
    unlink(path);
    snprintf(num, sizeof(num), "%" PRIu64, size);
    vd_opts_set(o, "size", num);
    snprintf(num, sizeof(num), "%" PRIu64, sc->cluster_size);
    vd_opts_set(o, "cluster_size", num);
    if (sc->extended_l2) {
        vd_opts_set(o, "extended_l2", "on");
    }
    CHECK(vd_create(path, "qcow2", o, &err) == 0, "%s: create: %s",
          sc->name, err.message);
    vd_opts_free(&o);
    memset(model, 0, size);

    n = open_img(VD_O_RDWR);
    if (!n) {
        return;
    }
    for (int round = 0; round < ROUNDS; round++) {
        pthread_t tid[NTHREADS];
        worker w[NTHREADS];
        int errors = 0;

        /* Unmapped zero clusters (allocating writes) in even rounds,
         * preallocated ones (filled in place) in odd rounds. */
        err = (vd_error)VD_ERROR_INIT;
        CHECK(vd_write_zeroes(n, size, 0, round % 2 ? 0 : VD_REQ_MAY_UNMAP,
                              &err) == 0,
              "%s: zero the image: %s", sc->name, err.message);
        memset(model, 0, size);
        for (int t = 0; t < NTHREADS; t++) {
            w[t] = (worker){ n, sc, round, t, 0 };
            pthread_create(&tid[t], NULL, worker_main, &w[t]);
        }
        for (int t = 0; t < NTHREADS; t++) {
            pthread_join(tid[t], NULL);
            errors += w[t].errors;
        }
        CHECK(errors == 0, "%s: round %d: %d requests failed", sc->name,
              round, errors);
        snprintf(what, sizeof(what), "%s: round %d, same open", sc->name,
                 round);
        if (!matches_model(n, size, what)) {
            break;
        }
    }
    err = (vd_error)VD_ERROR_INIT;
    CHECK(vd_close(&n, &err) == 0, "%s: close: %s", sc->name, err.message);

    n = open_img(0);
    if (n) {
        snprintf(what, sizeof(what), "%s: after close", sc->name);
        matches_model(n, size, what);
        vd_close(&n, NULL);
    }
    if (have_qemu_img) {
        char cmd[600];
        snprintf(cmd, sizeof(cmd), "qemu-img check -q '%s' >/dev/null 2>&1",
                 path);
        CHECK(system(cmd) == 0, "%s: qemu-img check found errors or leaks "
              "in %s", sc->name, path);
    }
    printf("%s: %s%s\n", sc->name, failures == before ? "ok" : "FAILED",
           have_qemu_img ? "" : " (qemu-img check skipped)");
    fflush(stdout);
}

int main(void)
{
    static const scenario scenarios[] = {
        { "c4k", 4096, false, 512 },
        { "c64k", 65536, false, 128 },
        { "c64k-extl2", 65536, true, 128 },
    };
    uint64_t max = 0;

    for (size_t i = 0; i < sizeof(scenarios) / sizeof(scenarios[0]); i++) {
        uint64_t size = scenarios[i].cluster_size * scenarios[i].clusters;
        max = size > max ? size : max;
    }
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    model = malloc(max);
    if (!model || pthread_barrier_init(&barrier, NULL, NTHREADS) != 0) {
        return 1;
    }
    /* Without qemu-img only the content is checked. */
    have_qemu_img = system("qemu-img --version >/dev/null 2>&1") == 0;
    for (size_t i = 0; i < sizeof(scenarios) / sizeof(scenarios[0]); i++) {
        run_scenario(&scenarios[i]);
    }
    pthread_barrier_destroy(&barrier);
    free(model);
    /* A failed run keeps its images for a look. */
    if (failures == 0) {
        char cmd[300];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
        CHECK(system(cmd) == 0, "could not remove %s", dir);
    }
    TEST_EXIT("test-qcow2-zero-race");
}
