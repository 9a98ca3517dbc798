/*
 * qcow2 randomized stress test: several threads issue a seeded mix of
 * reads, writes, zero-writes (with and without MAY_UNMAP), discards and
 * flushes against a qcow2 image and apply the same operations to a raw
 * image, which serves as the model. At the end both images must hold the
 * same bytes (compared through vdisk, then by `qemu-img compare`) and
 * `qemu-img check` must find neither errors nor leaks.
 *
 * Ownership: the work runs in steps separated by a barrier. The image is
 * cut into REGIONS regions whose size is not a multiple of any cluster
 * size, so neighbouring regions share clusters and L2 tables; in step k
 * region r belongs to thread (r + k) % NTHREADS. A thread only touches
 * the regions it owns, so every byte has one writer per step and the
 * final content does not depend on scheduling, while different threads
 * still allocate the same clusters at the same time.
 *
 * Reads compare the two images at once. A discard may leave each byte
 * either as it was or zero (the API calls the content unspecified); the
 * test checks exactly that on the qcow2 side and then copies what qcow2
 * returns into the model.
 *
 * The seed is VDISK_STRESS_SEED (default 1); a failure prints it.
 * Exit 0 pass, 1 fail, 77 without qemu-img.
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vdisk/vdisk.h"
#include "sh.h"

#define NTHREADS 4
#define REGIONS 64
#define REGION_SIZE (97 * 1024 + 512)   /* shares clusters with neighbours */
#define IMG_SIZE ((uint64_t)REGIONS * REGION_SIZE)
#define STEPS 150
#define OPS_PER_STEP 55                 /* 4 threads * 150 * 55 = 33000 */
#define MAX_IO (3 * REGION_SIZE / 2)

typedef struct config {
    const char *name;
    const char *create_opts;
    const char *open_opts;  /* NULL or key=value,... */
} config;

static const config configs[] = {
    /* A tiny L2 cache makes tables leave and re-enter the cache all the
     * time, with refcount blocks 1 bit wide (many refcount updates). */
    { "4k clusters, refcount_bits=1, small caches",
      "cluster_size=4k,refcount_bits=1",
      "l2-cache-size=16k,refcount-cache-size=16k" },
    { "64k clusters, extended L2", "cluster_size=64k,extended_l2=on", NULL },
    { "v2, 16k clusters", "compat=0.10,cluster_size=16k", NULL },
};

static vd_node *qnode, *rnode;
static pthread_barrier_t barrier;
static atomic_int failures;
static atomic_long nops;
static unsigned long seed = 1;
static char dir[256];

static uint64_t rng_next(uint64_t *s)
{
    /* splitmix64: independent per thread and reproducible. */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rng_below(uint64_t *s, uint64_t n)
{
    return rng_next(s) % n;
}

static void failf(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    fprintf(stderr, "FAIL (seed %lu): ", seed);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    failures++;
}

/* A random range inside the regions thread @t owns in step @k: the start
 * lies in an owned region and the range is clipped at its end, or runs
 * into the next region when that one is owned too (never, with more than
 * one thread: neighbours belong to different threads). */
static void pick_range(uint64_t *rs, uint64_t *off, uint64_t *len,
                       unsigned t, unsigned k)
{
    unsigned nmine = 0, mine[REGIONS];

    for (unsigned r = 0; r < REGIONS; r++) {
        if ((r + k) % NTHREADS == t) {
            mine[nmine++] = r;
        }
    }
    unsigned r = mine[rng_below(rs, nmine)];
    uint64_t start = (uint64_t)r * REGION_SIZE;
    uint64_t end = start + REGION_SIZE;
    uint64_t o, l;

    switch (rng_below(rs, 4)) {
    case 0: /* unaligned bytes */
        o = start + rng_below(rs, REGION_SIZE);
        l = 1 + rng_below(rs, 9000);
        break;
    case 1: /* sectors */
        o = start + rng_below(rs, REGION_SIZE / 512) * 512;
        l = 512 * (1 + rng_below(rs, 16));
        break;
    case 2: /* the whole region: covers full clusters */
        o = start;
        l = REGION_SIZE;
        break;
    default: /* 4k-aligned, up to 64k */
        o = start + rng_below(rs, REGION_SIZE / 4096) * 4096;
        l = 4096 * (1 + rng_below(rs, 16));
        break;
    }
    if (o + l > end) {
        l = end - o;
    }
    *off = o;
    *len = l;
}

static bool compare_range(uint8_t *a, uint8_t *b, uint64_t off, uint64_t len,
                          vd_error *err)
{
    if (vd_pread(qnode, a, len, off, 0, err) < 0 ||
        vd_pread(rnode, b, len, off, 0, err) < 0) {
        failf("read %#llx+%llu: %s", (unsigned long long)off,
              (unsigned long long)len, err->message);
        return false;
    }
    if (memcmp(a, b, len) != 0) {
        for (uint64_t i = 0; i < len; i++) {
            if (a[i] != b[i]) {
                failf("byte %#llx: qcow2 0x%02x, model 0x%02x",
                      (unsigned long long)(off + i), a[i], b[i]);
                break;
            }
        }
        return false;
    }
    return true;
}

static void *worker(void *opaque)
{
    unsigned t = (unsigned)(uintptr_t)opaque;
    uint8_t *a = malloc(MAX_IO), *b = malloc(MAX_IO);
    vd_error err = VD_ERROR_INIT;

    if (!a || !b) {
        failf("out of memory");
        goto out;
    }
    for (unsigned k = 0; k < STEPS; k++) {
        uint64_t rs = seed * 1000003u + (uint64_t)k * NTHREADS + t;

        for (unsigned i = 0; i < OPS_PER_STEP && !failures; i++) {
            uint64_t off, len, kind = rng_below(&rs, 100);
            int r1 = 0, r2 = 0;

            pick_range(&rs, &off, &len, t, k);
            vd_error_clear(&err);
            if (kind < 30) {
                compare_range(a, b, off, len, &err);
            } else if (kind < 65) {
                uint8_t p = (uint8_t)rng_next(&rs);
                for (uint64_t j = 0; j < len; j++) {
                    a[j] = (uint8_t)(p + j / 512 + (j & 7));
                }
                r1 = vd_pwrite(qnode, a, len, off, 0, &err);
                r2 = vd_pwrite(rnode, a, len, off, 0, &err);
            } else if (kind < 85) {
                unsigned fl = (kind & 1) ? VD_REQ_MAY_UNMAP : 0;
                r1 = vd_write_zeroes(qnode, len, off, fl, &err);
                r2 = vd_write_zeroes(rnode, len, off, 0, &err);
            } else if (kind < 97) {
                /* Discard: every byte stays or becomes zero. */
                r1 = vd_pread(qnode, b, len, off, 0, &err);
                if (r1 == 0) {
                    r1 = vd_discard(qnode, len, off, &err);
                }
                if (r1 == 0) {
                    r1 = vd_pread(qnode, a, len, off, 0, &err);
                }
                for (uint64_t j = 0; r1 == 0 && j < len; j++) {
                    if (a[j] != 0 && a[j] != b[j]) {
                        failf("after discard of %#llx+%llu byte %#llx is "
                              "0x%02x, neither zero nor 0x%02x",
                              (unsigned long long)off,
                              (unsigned long long)len,
                              (unsigned long long)(off + j), a[j], b[j]);
                        break;
                    }
                }
                if (r1 == 0) {
                    r2 = vd_pwrite(rnode, a, len, off, 0, &err);
                }
            } else {
                r1 = vd_flush(qnode, &err);
            }
            if (r1 < 0 || r2 < 0) {
                failf("op %llu at %#llx+%llu: %s", (unsigned long long)kind,
                      (unsigned long long)off, (unsigned long long)len,
                      err.message);
            }
            nops++;
        }
        pthread_barrier_wait(&barrier);
    }
out:
    free(a);
    free(b);
    return NULL;
}

static int run_config(const config *c)
{
    char img[300], raw[300], sizestr[32];
    vd_opts *co = vd_opts_new(), *oo = NULL;
    vd_error err = VD_ERROR_INIT;
    pthread_t th[NTHREADS];
    uint8_t *a = NULL, *b = NULL;
    int ret = 1;

    printf("== %s\n", c->name);
    snprintf(img, sizeof(img), "%s/img.qcow2", dir);
    snprintf(raw, sizeof(raw), "%s/img.raw", dir);
    snprintf(sizestr, sizeof(sizestr), "%llu", (unsigned long long)IMG_SIZE);
    unlink(img);
    unlink(raw);
    if (!co || vd_opts_parse(co, c->create_opts, NULL, &err) < 0 ||
        vd_opts_set(co, "size", sizestr) < 0 ||
        vd_create(img, "qcow2", co, &err) < 0) {
        failf("create %s: %s", img, err.message);
        goto out;
    }
    vd_opts_free(&co);
    co = vd_opts_new();
    if (!co || vd_opts_set(co, "size", sizestr) < 0 ||
        vd_create(raw, "raw", co, &err) < 0) {
        failf("create %s: %s", raw, err.message);
        goto out;
    }
    if (c->open_opts) {
        oo = vd_opts_new();
        if (!oo || vd_opts_parse(oo, c->open_opts, NULL, &err) < 0) {
            failf("open options: %s", err.message);
            goto out;
        }
    }
    if (vd_open(&qnode, img, "qcow2", oo, VD_O_RDWR, &err) < 0 ||
        vd_open(&rnode, raw, "raw", NULL, VD_O_RDWR, &err) < 0) {
        failf("open: %s", err.message);
        goto out;
    }

    nops = 0;
    pthread_barrier_init(&barrier, NULL, NTHREADS);
    for (unsigned t = 0; t < NTHREADS; t++) {
        pthread_create(&th[t], NULL, worker, (void *)(uintptr_t)t);
    }
    for (unsigned t = 0; t < NTHREADS; t++) {
        pthread_join(th[t], NULL);
    }
    pthread_barrier_destroy(&barrier);
    printf("%ld operations\n", (long)nops);

    /* Every byte, through vdisk, in 1 MiB pieces. */
    a = malloc(1 << 20);
    b = malloc(1 << 20);
    for (uint64_t off = 0; a && b && !failures && off < IMG_SIZE;
         off += 1 << 20) {
        uint64_t len = IMG_SIZE - off < (1 << 20) ? IMG_SIZE - off : 1 << 20;
        compare_range(a, b, off, len, &err);
    }
    if (vd_close(&qnode, &err) < 0 || vd_close(&rnode, &err) < 0) {
        failf("close: %s", err.message);
    }
    if (failures) {
        goto out;
    }
    if (sh("qemu-img check -q '%s'", img) != 0) {
        failf("qemu-img check found errors or leaks in %s", img);
        goto out;
    }
    if (sh("qemu-img compare -q -f raw -F qcow2 '%s' '%s'", raw, img) != 0) {
        failf("qemu-img compare: %s differs from the model", img);
        goto out;
    }
    ret = 0;
out:
    vd_close(&qnode, NULL);
    vd_close(&rnode, NULL);
    vd_opts_free(&co);
    vd_opts_free(&oo);
    free(a);
    free(b);
    return ret;
}

int main(void)
{
    const char *env = getenv("VDISK_STRESS_SEED");
    int ret = 0;

    if (system("qemu-img --version >/dev/null 2>&1") != 0) {
        printf("SKIP: qemu-img not installed\n");
        return 77;
    }
    if (env) {
        seed = strtoul(env, NULL, 0);
    }
    snprintf(dir, sizeof(dir), "%s/vdisk-stress.XXXXXX",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    printf("seed %lu\n", seed);
    for (size_t i = 0; i < sizeof(configs) / sizeof(configs[0]); i++) {
        if (run_config(&configs[i]) != 0) {
            ret = 1;
            if (getenv("KEEP_TMP")) {
                fprintf(stderr, "keeping %s\n", dir);
                return ret;
            }
            break;
        }
    }
    sh("rm -rf '%s'", dir);
    return ret;
}
