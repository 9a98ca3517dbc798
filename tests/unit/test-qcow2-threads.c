/*
 * qcow2 concurrent allocation test: many threads write to a fresh qcow2
 * image at once, with blocks much smaller than a cluster so that several
 * threads allocate the same cluster (and the same L2 table) at the same
 * time. The driver must serialise those allocations: a lost update shows
 * up as a block reading zeros or backing data instead of its pattern.
 *
 * Each block (BLOCK bytes) belongs to exactly one thread, so the final
 * content is deterministic: generation g of block b holds pattern(b, g).
 * Threads write their blocks in random order, rewrite random ones, and
 * read some back at once. Then the whole image is verified through
 * vdisk, closed, and handed to `qemu-img check` (must exit 0: no leaks,
 * no corruption) and `qemu-img compare` against a raw file written from
 * the model. Configurations cover small and large clusters, extended L2
 * and a backing file (copy-on-write of partial clusters from the base).
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

#define NTHREADS 12
#define BLOCK 1536            /* deliberately not a power of two */
#define NBLOCKS 2048
#define REWRITES 150
#define IMG_SIZE ((uint64_t)NBLOCKS * BLOCK + 4096)

typedef struct config {
    const char *name;
    const char *opts;
    bool backing;
} config;

static const config configs[] = {
    { "64k clusters", "cluster_size=64k", false },
    { "4k clusters, refcount_bits=1", "cluster_size=4k,refcount_bits=1", false },
    { "512-byte clusters", "cluster_size=512", false },
    { "64k clusters over a backing file", "cluster_size=64k", true },
    { "extended L2 over a backing file", "cluster_size=64k,extended_l2=on",
      true },
    { "v2 over a backing file", "compat=0.10,cluster_size=16k", true },
};

static vd_node *node;
static unsigned gen[NBLOCKS];
static atomic_int failures;
static char dir[256];

static uint8_t pattern(unsigned block, unsigned g, unsigned i)
{
    return (uint8_t)(block * 31 + g * 7 + i / 64 + 1);
}

static uint8_t base_byte(uint64_t off)
{
    return (uint8_t)(0xa0 + (off >> 16) % 16);
}

static void fill(uint8_t *buf, unsigned block, unsigned g)
{
    for (unsigned i = 0; i < BLOCK; i++) {
        buf[i] = pattern(block, g, i);
    }
}

static bool check_block(const uint8_t *buf, unsigned block, unsigned g,
                        bool backing)
{
    for (unsigned i = 0; i < BLOCK; i++) {
        uint8_t want = g ? pattern(block, g, i)
                         : backing ? base_byte((uint64_t)block * BLOCK + i)
                                   : 0;
        if (buf[i] != want) {
            fprintf(stderr, "block %u gen %u byte %u: 0x%02x, want 0x%02x\n",
                    block, g, i, buf[i], want);
            return false;
        }
    }
    return true;
}

typedef struct worker {
    unsigned id;
    unsigned seed;
    bool backing;
} worker;

static void *run_worker(void *opaque)
{
    worker *w = opaque;
    uint8_t buf[BLOCK], rbuf[BLOCK];
    unsigned mine[NBLOCKS / NTHREADS + 1], n = 0;
    vd_error err = VD_ERROR_INIT;

    for (unsigned b = w->id; b < NBLOCKS; b += NTHREADS) {
        mine[n++] = b;
    }
    for (unsigned i = n; i > 1; i--) {
        unsigned j = (unsigned)rand_r(&w->seed) % i, t = mine[i - 1];
        mine[i - 1] = mine[j];
        mine[j] = t;
    }
    for (unsigned k = 0; k < n + REWRITES; k++) {
        unsigned b = k < n ? mine[k] : mine[(unsigned)rand_r(&w->seed) % n];
        unsigned g = ++gen[b];
        fill(buf, b, g);
        if (vd_pwrite(node, buf, BLOCK, (uint64_t)b * BLOCK, 0, &err) < 0) {
            fprintf(stderr, "write block %u: %s\n", b, err.message);
            failures++;
            return NULL;
        }
        if (rand_r(&w->seed) % 4 == 0) {
            if (vd_pread(node, rbuf, BLOCK, (uint64_t)b * BLOCK, 0, &err) < 0 ||
                !check_block(rbuf, b, g, w->backing)) {
                fprintf(stderr, "read-back of block %u failed %s\n", b,
                        err.message);
                failures++;
                return NULL;
            }
        }
        if (rand_r(&w->seed) % 64 == 0) {
            vd_flush(node, NULL);
        }
    }
    return NULL;
}

static int run_config(const config *c)
{
    char img[512], raw[512], base[512];
    vd_opts *opts = vd_opts_new();
    vd_error err = VD_ERROR_INIT;
    pthread_t th[NTHREADS];
    worker w[NTHREADS];
    uint8_t *all = NULL;
    FILE *f;
    int ret = 1;

    snprintf(img, sizeof(img), "%s/img.qcow2", dir);
    snprintf(raw, sizeof(raw), "%s/model.raw", dir);
    snprintf(base, sizeof(base), "%s/base.raw", dir);
    unlink(img);
    memset(gen, 0, sizeof(gen));
    failures = 0;

    /* The model starts as the base (or zeros). */
    all = malloc(IMG_SIZE);
    for (uint64_t i = 0; i < IMG_SIZE; i++) {
        all[i] = c->backing ? base_byte(i) : 0;
    }
    if (c->backing) {
        f = fopen(base, "wb");
        fwrite(all, 1, IMG_SIZE, f);
        fclose(f);
        vd_opts_set(opts, "backing_file", base);
        vd_opts_set(opts, "backing_fmt", "raw");
    }
    vd_opts_parse(opts, c->opts, NULL, NULL);
    {
        char sz[32];
        snprintf(sz, sizeof(sz), "%llu", (unsigned long long)IMG_SIZE);
        vd_opts_set(opts, "size", sz);
    }
    if (vd_create(img, "qcow2", opts, &err) < 0) {
        fprintf(stderr, "create: %s\n", err.message);
        goto out;
    }
    if (vd_open(&node, img, "qcow2", NULL, VD_O_RDWR, &err) < 0) {
        fprintf(stderr, "open: %s\n", err.message);
        goto out;
    }
    for (unsigned i = 0; i < NTHREADS; i++) {
        w[i] = (worker){ i, 1234u + i * 77u, c->backing };
        pthread_create(&th[i], NULL, run_worker, &w[i]);
    }
    for (unsigned i = 0; i < NTHREADS; i++) {
        pthread_join(th[i], NULL);
    }
    if (failures) {
        vd_close(&node, NULL);
        goto out;
    }
    {
        uint8_t *buf = malloc(IMG_SIZE);
        if (vd_pread(node, buf, IMG_SIZE, 0, 0, &err) < 0) {
            fprintf(stderr, "final read: %s\n", err.message);
            free(buf);
            vd_close(&node, NULL);
            goto out;
        }
        for (unsigned b = 0; b < NBLOCKS; b++) {
            if (!check_block(buf + (uint64_t)b * BLOCK, b, gen[b],
                             c->backing)) {
                free(buf);
                vd_close(&node, NULL);
                goto out;
            }
            fill(all + (uint64_t)b * BLOCK, b, gen[b]);
        }
        free(buf);
    }
    if (vd_close(&node, &err) < 0) {
        fprintf(stderr, "close: %s\n", err.message);
        goto out;
    }
    f = fopen(raw, "wb");
    fwrite(all, 1, IMG_SIZE, f);
    fclose(f);
    if (sh("qemu-img check -q '%s'", img) != 0) {
        fprintf(stderr, "qemu-img check failed\n");
        goto out;
    }
    if (sh("qemu-img compare -q -f raw -F qcow2 '%s' '%s'", raw, img) != 0) {
        fprintf(stderr, "qemu-img compare: image differs from the model\n");
        goto out;
    }
    ret = 0;
out:
    free(all);
    vd_opts_free(&opts);
    return ret;
}

int main(void)
{
    const char *tmp = getenv("TMPDIR");
    int failed = 0;

    if (system("qemu-img --version >/dev/null 2>&1") != 0) {
        printf("SKIP: qemu-img not installed\n");
        return 77;
    }
    snprintf(dir, sizeof(dir), "%s/vdisk-qcow2-threads-XXXXXX",
             tmp ? tmp : "/tmp");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    for (size_t i = 0; i < sizeof(configs) / sizeof(configs[0]); i++) {
        int r = run_config(&configs[i]);
        printf("%s: %s\n", r ? "FAIL" : "ok", configs[i].name);
        failed |= r;
    }
    sh("rm -rf '%s'", dir);
    return failed ? 1 : 0;
}
