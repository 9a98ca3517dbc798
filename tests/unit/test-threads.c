/*
 * Concurrency test for the request path: many threads issuing requests
 * to one node through the public API (vd_pwrite, vd_pwritev, vd_preadv,
 * vd_pread, vd_flush).
 *
 * The image is divided into "blocks"; every block has exactly one owner
 * thread at a time, so the final content is deterministic, and a model
 * (the generation number of each block) says what each block holds. A
 * block of generation g holds pattern(block, g), so misplaced, stale or
 * torn data is recognisable. Each configuration runs:
 *
 *   phase 1  16 writers: each writes all its blocks, then rewrites random
 *            ones, reading some back at once, flushing now and then;
 *   phase 2  8 writers rewrite half of the blocks while 8 readers read
 *            the other, unchanging half with scattered vectors;
 *   verify   one read of the whole image through vdisk against the
 *            model, then close and check with an independent reader:
 *            plain pread() for raw; `qemu-img check` (must exit 0) and
 *            `qemu-img convert` to raw for qcow2.
 *
 * Configurations: raw with cache=writeback, raw with cache=none
 * (O_DIRECT), raw with cache=none and unaligned 1000-byte blocks at an
 * odd offset from a misaligned buffer, so that neighbours share sectors
 * and the core's read-modify-write must serialise them; then the same on
 * qcow2 images created by qemu-img. The qcow2 runs are skipped (with a
 * note, not a failure) while no qcow2 driver is registered, and without
 * qemu-img. Exit 0 pass, 1 fail.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vdisk/vdisk.h"
#include "core/block_int.h"

#define NTHREADS 16
#define NBLOCKS 512
#define REWRITES 200
#define READS 400

typedef struct config {
    const char *name;
    const char *format;   /* "raw" or "qcow2" */
    const char *cache;    /* "writeback" or "none" */
    bool unaligned;
} config;

static const config configs[] = {
    { "raw, cache=writeback", "raw", "writeback", false },
    { "raw, cache=none", "raw", "none", false },
    { "raw, cache=none, unaligned", "raw", "none", true },
    { "qcow2, cache=writeback", "qcow2", "writeback", false },
    { "qcow2, cache=none, unaligned", "qcow2", "none", true },
};

/* The run in progress. */
typedef struct run {
    const config *cfg;
    vd_node *node;
    uint64_t image_size;
    uint64_t block_size;     /* bytes per block */
    uint64_t first;          /* offset of block 0 */
    unsigned gen[NBLOCKS];   /* written by the block's current owner only */
    atomic_int failed;
    pthread_mutex_t report_lock;
} run;

typedef struct worker {
    run *r;
    int id;
    int role;                /* 0 writer (phase 1), 1 writer, 2 reader */
    unsigned seed;
} worker;

static uint64_t block_offset(const run *r, unsigned b)
{
    return r->first + (uint64_t)b * r->block_size;
}

static uint8_t pattern_byte(unsigned b, unsigned g, uint64_t i)
{
    if (g == 0) {
        return 0;    /* never written: reads as zeros */
    }
    uint32_t x = b * 2654435761u + g * 40503u + (uint32_t)i;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    return (uint8_t)(x | 1);  /* never 0, so a zero-filled block shows */
}

static void fill_pattern(uint8_t *buf, uint64_t len, unsigned b, unsigned g)
{
    for (uint64_t i = 0; i < len; i++) {
        buf[i] = pattern_byte(b, g, i);
    }
}

/* Reports a failure once per thread call site; later threads' reports
 * are still printed (they often say more) but counted once. */
static void report(run *r, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void report(run *r, const char *fmt, ...)
{
    va_list ap;
    int n = atomic_fetch_add(&r->failed, 1);
    if (n >= 10) {
        return;
    }
    pthread_mutex_lock(&r->report_lock);
    fprintf(stderr, "[%s] ", r->cfg->name);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    pthread_mutex_unlock(&r->report_lock);
}

/* Compares @buf with block @b's generation @g; reports the first
 * differing byte. Returns true when equal. */
static bool check_block(run *r, const uint8_t *buf, unsigned b, unsigned g,
                        const char *how)
{
    for (uint64_t i = 0; i < r->block_size; i++) {
        if (buf[i] != pattern_byte(b, g, i)) {
            /* Name the generation the byte belongs to, if any. */
            int seen = -1;
            for (unsigned k = 0; k <= g + 2 && seen < 0; k++) {
                if (buf[i] == pattern_byte(b, k, i)) {
                    seen = (int)k;
                }
            }
            report(r, "%s: block %u (offset %" PRIu64 ", %" PRIu64
                   " bytes) differs at byte %" PRIu64 ": got 0x%02x, want "
                   "0x%02x (generation %u; the byte matches generation %d)",
                   how, b, block_offset(r, b), r->block_size, i, buf[i],
                   pattern_byte(b, g, i), g, seen);
            return false;
        }
    }
    return true;
}

/* Buffers: aligned for O_DIRECT, or deliberately misaligned by one byte
 * in the unaligned configurations so the core has to bounce. */
static uint8_t *alloc_buf(run *r, void **base)
{
    if (posix_memalign(base, 4096, r->block_size + 4096) != 0) {
        return NULL;
    }
    return (uint8_t *)*base + (r->cfg->unaligned ? 1 : 0);
}

/* Splits a block into three pieces: sector-aligned pieces in the aligned
 * runs, odd lengths in the unaligned ones. */
static void split3(run *r, uint8_t *buf, struct iovec iov[3])
{
    uint64_t a = r->cfg->unaligned ? 333 : 1024;
    uint64_t b = r->cfg->unaligned ? 17 : 2048;
    iov[0] = (struct iovec){ buf, a };
    iov[1] = (struct iovec){ buf + a, b };
    iov[2] = (struct iovec){ buf + a + b, r->block_size - a - b };
}

static int write_block(run *r, uint8_t *buf, unsigned b, unsigned g,
                       bool vectored)
{
    vd_error err = VD_ERROR_INIT;
    int ret;
    fill_pattern(buf, r->block_size, b, g);
    if (vectored) {
        struct iovec iov[3];
        split3(r, buf, iov);
        ret = vd_pwritev(r->node, iov, 3, block_offset(r, b), 0, &err);
    } else {
        ret = vd_pwrite(r->node, buf, r->block_size, block_offset(r, b), 0,
                        &err);
    }
    if (ret < 0) {
        report(r, "vd_pwrite%s(offset %" PRIu64 ", %" PRIu64 " bytes) "
               "returned %d (%s): %s", vectored ? "v" : "",
               block_offset(r, b), r->block_size, ret, strerror(-ret),
               err.message);
    }
    return ret;
}

static int read_block(run *r, uint8_t *buf, unsigned b, bool vectored)
{
    vd_error err = VD_ERROR_INIT;
    int ret;
    memset(buf, 0, r->block_size);
    if (vectored) {
        struct iovec iov[3];
        split3(r, buf, iov);
        ret = vd_preadv(r->node, iov, 3, block_offset(r, b), 0, &err);
    } else {
        ret = vd_pread(r->node, buf, r->block_size, block_offset(r, b), 0,
                       &err);
    }
    if (ret < 0) {
        report(r, "vd_pread%s(offset %" PRIu64 ", %" PRIu64 " bytes) "
               "returned %d (%s): %s", vectored ? "v" : "",
               block_offset(r, b), r->block_size, ret, strerror(-ret),
               err.message);
    }
    return ret;
}

/* In phase 1 thread t owns blocks b % NTHREADS == t. In phase 2 the
 * blocks with b % 4 == 0 are read-only ("stable"); writer w owns the
 * others with (b / 4) % 8 == w. */
static bool owns(const worker *w, unsigned b)
{
    if (w->role == 0) {
        return b % NTHREADS == (unsigned)w->id;
    }
    return b % 4 != 0 && (b / 4) % 8 == (unsigned)w->id;
}

static unsigned random_owned(worker *w)
{
    for (;;) {
        unsigned b = (unsigned)rand_r(&w->seed) % NBLOCKS;
        if (owns(w, b)) {
            return b;
        }
    }
}

static void *writer_main(void *opaque)
{
    worker *w = opaque;
    run *r = w->r;
    void *base;
    uint8_t *buf = alloc_buf(r, &base);
    if (!buf) {
        report(r, "out of memory");
        return NULL;
    }
    int n = 0;

    /* Phase 1 first writes each owned block once, so every block has
     * data before phase 2 reads the stable half. */
    if (w->role == 0) {
        for (unsigned b = 0; b < NBLOCKS && !atomic_load(&r->failed); b++) {
            if (owns(w, b) &&
                write_block(r, buf, b, ++r->gen[b], (b / NTHREADS) & 1) < 0) {
                goto out;
            }
        }
    }
    for (int i = 0; i < REWRITES && !atomic_load(&r->failed); i++) {
        unsigned b = random_owned(w);
        if (write_block(r, buf, b, ++r->gen[b], i & 1) < 0) {
            goto out;
        }
        if ((i % 4) == 0) {
            if (read_block(r, buf, b, i & 2) < 0 ||
                !check_block(r, buf, b, r->gen[b], "read after write")) {
                goto out;
            }
        }
        if ((++n % 32) == 0) {
            vd_error err = VD_ERROR_INIT;
            int ret = vd_flush(r->node, &err);
            if (ret < 0) {
                report(r, "vd_flush returned %d (%s): %s", ret,
                       strerror(-ret), err.message);
                goto out;
            }
        }
    }
out:
    free(base);
    return NULL;
}

static void *reader_main(void *opaque)
{
    worker *w = opaque;
    run *r = w->r;
    void *base;
    uint8_t *buf = alloc_buf(r, &base);
    if (!buf) {
        report(r, "out of memory");
        return NULL;
    }
    for (int i = 0; i < READS && !atomic_load(&r->failed); i++) {
        unsigned b = ((unsigned)rand_r(&w->seed) % (NBLOCKS / 4)) * 4;
        if (read_block(r, buf, b, i & 1) < 0 ||
            !check_block(r, buf, b, r->gen[b], "concurrent read of a "
                         "block nobody writes")) {
            break;
        }
    }
    free(base);
    return NULL;
}

static void run_threads(run *r, int phase)
{
    pthread_t th[NTHREADS];
    worker w[NTHREADS];
    for (int t = 0; t < NTHREADS; t++) {
        w[t] = (worker){ .r = r, .seed = 1000u * (unsigned)phase + t };
        if (phase == 1) {
            w[t].id = t;
            w[t].role = 0;
        } else {
            w[t].id = t % 8;
            w[t].role = t < 8 ? 1 : 2;
        }
        int ret = pthread_create(&th[t], NULL,
                                 w[t].role == 2 ? reader_main : writer_main,
                                 &w[t]);
        if (ret != 0) {
            fprintf(stderr, "pthread_create: %s\n", strerror(ret));
            exit(1);
        }
    }
    for (int t = 0; t < NTHREADS; t++) {
        pthread_join(th[t], NULL);
    }
}

/* The whole image as the model says it should be. */
static uint8_t *expected_image(const run *r)
{
    uint8_t *img = calloc(1, r->image_size);
    if (!img) {
        return NULL;
    }
    for (unsigned b = 0; b < NBLOCKS; b++) {
        fill_pattern(img + block_offset(r, b), r->block_size, b, r->gen[b]);
    }
    return img;
}

/* Compares a whole-image buffer with the expected one; names the first
 * difference by block. */
static bool compare_image(run *r, const uint8_t *got, const uint8_t *want,
                          const char *how)
{
    if (memcmp(got, want, r->image_size) == 0) {
        return true;
    }
    uint64_t i = 0;
    while (got[i] == want[i]) {
        i++;
    }
    if (i < r->first || i >= block_offset(r, NBLOCKS)) {
        report(r, "%s: byte at offset %" PRIu64 " outside every block is "
               "0x%02x, want 0x%02x", how, i, got[i], want[i]);
    } else {
        unsigned b = (unsigned)((i - r->first) / r->block_size);
        if (check_block(r, got + block_offset(r, b), b, r->gen[b], how)) {
            report(r, "%s: byte at offset %" PRIu64 " is 0x%02x, want "
                   "0x%02x", how, i, got[i], want[i]);
        }
    }
    return false;
}

static int sh(const char *cmd)
{
    int st = system(cmd);
    if (st == -1 || !WIFEXITED(st)) {
        return -1;
    }
    return WEXITSTATUS(st);
}

/* Returns 0 pass, 1 fail, 77 skip. */
static int run_config(const config *cfg, const char *dir)
{
    static run r;   /* big (the model); one run at a time */
    char path[1024], cmd[4096];
    vd_error err = VD_ERROR_INIT;
    int ret;

    memset(&r, 0, sizeof(r));
    r.cfg = cfg;
    pthread_mutex_init(&r.report_lock, NULL);
    if (cfg->unaligned) {
        r.block_size = 1000;
        r.first = 7;
        r.image_size = 1024 * 1024;
    } else {
        r.block_size = 4096;
        r.first = 0;
        r.image_size = (uint64_t)NBLOCKS * 4096;
    }
    snprintf(path, sizeof(path), "%s/img.%s", dir, cfg->format);
    unlink(path);

    bool qcow2 = strcmp(cfg->format, "qcow2") == 0;
    if (qcow2) {
        if (!vd_find_driver("qcow2")) {
            printf("SKIP [%s]: no qcow2 driver registered yet\n", cfg->name);
            return 77;
        }
        if (sh("qemu-img --version >/dev/null 2>&1") != 0) {
            printf("SKIP [%s]: qemu-img not installed\n", cfg->name);
            return 77;
        }
        snprintf(cmd, sizeof(cmd), "qemu-img create -q -f qcow2 '%s' %" PRIu64,
                 path, r.image_size);
        if (sh(cmd) != 0) {
            fprintf(stderr, "[%s] %s failed\n", cfg->name, cmd);
            return 1;
        }
    } else {
        int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
        if (fd < 0 || ftruncate(fd, (off_t)r.image_size) < 0) {
            fprintf(stderr, "[%s] creating %s: %s\n", cfg->name, path,
                    strerror(errno));
            if (fd >= 0) {
                close(fd);
            }
            return 1;
        }
        close(fd);
    }

    vd_opts *opts = vd_opts_new();
    if (!opts || vd_opts_set(opts, "cache", cfg->cache) < 0) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    ret = vd_open(&r.node, path, cfg->format, opts, VD_O_RDWR, &err);
    vd_opts_free(&opts);
    if (ret < 0) {
        if (qcow2 && (ret == -EINVAL || ret == -ENOTSUP) &&
            strstr(err.message, "nknown driver")) {
            printf("SKIP [%s]: %s\n", cfg->name, err.message);
            return 77;
        }
        fprintf(stderr, "[%s] vd_open(%s, \"%s\", cache=%s, RDWR) returned "
                "%d (%s): %s\n", cfg->name, path, cfg->format, cfg->cache,
                ret, strerror(-ret), err.message);
        return 1;
    }
    int64_t len = vd_getlength(r.node);
    if (len != (int64_t)r.image_size) {
        report(&r, "vd_getlength returned %" PRId64 ", want %" PRIu64, len,
               r.image_size);
    }

    if (!atomic_load(&r.failed)) {
        run_threads(&r, 1);
    }
    if (!atomic_load(&r.failed)) {
        run_threads(&r, 2);
    }

    uint8_t *want = expected_image(&r);
    uint8_t *got = NULL;
    if (!want || posix_memalign((void **)&got, 4096, r.image_size) != 0) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    if (!atomic_load(&r.failed)) {
        vd_error_clear(&err);
        ret = vd_pread(r.node, got, r.image_size, 0, 0, &err);
        if (ret < 0) {
            report(&r, "vd_pread of the whole image returned %d (%s): %s",
                   ret, strerror(-ret), err.message);
        } else {
            compare_image(&r, got, want, "whole-image read through vdisk");
        }
    }
    vd_error_clear(&err);
    ret = vd_close(&r.node, &err);
    if (ret < 0) {
        report(&r, "vd_close returned %d (%s): %s", ret, strerror(-ret),
               err.message);
    }

    /* An independent reader of what reached the file. */
    if (!atomic_load(&r.failed)) {
        const char *raw_path = path;
        char conv[1100];
        if (qcow2) {
            snprintf(cmd, sizeof(cmd), "qemu-img check -q -f qcow2 '%s'",
                     path);
            int st = sh(cmd);
            if (st != 0) {
                report(&r, "qemu-img check exited %d after the run", st);
                snprintf(cmd, sizeof(cmd), "qemu-img check -f qcow2 '%s' "
                         ">&2", path);
                sh(cmd);
            }
            snprintf(conv, sizeof(conv), "%s.raw", path);
            snprintf(cmd, sizeof(cmd), "qemu-img convert -f qcow2 -O raw "
                     "'%s' '%s'", path, conv);
            if (sh(cmd) != 0) {
                report(&r, "qemu-img convert of the qcow2 image failed");
            }
            raw_path = conv;
        }
        int fd = open(raw_path, O_RDONLY);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) < 0) {
            report(&r, "open %s: %s", raw_path, strerror(errno));
        } else if ((uint64_t)st.st_size != r.image_size) {
            report(&r, "%s is %jd bytes, want %" PRIu64, raw_path,
                   (intmax_t)st.st_size, r.image_size);
        } else {
            memset(got, 0, r.image_size);
            uint64_t done = 0;
            while (done < r.image_size) {
                ssize_t n = pread(fd, got + done, r.image_size - done,
                                  (off_t)done);
                if (n <= 0) {
                    break;
                }
                done += (uint64_t)n;
            }
            compare_image(&r, got, want, qcow2 ? "image converted by "
                          "qemu-img" : "file read with pread()");
        }
        if (fd >= 0) {
            close(fd);
        }
        if (qcow2) {
            unlink(conv);
        }
    }
    free(want);
    free(got);
    unlink(path);
    pthread_mutex_destroy(&r.report_lock);
    int failed = atomic_load(&r.failed);
    printf("%s [%s]\n", failed ? "FAIL" : "ok", cfg->name);
    return failed ? 1 : 0;
}

int main(void)
{
    const char *tmp = getenv("TMPDIR");
    char dir[512];
    /* O_DIRECT needs a real file system; /tmp may be tmpfs elsewhere,
     * so prefer /var/tmp. */
    snprintf(dir, sizeof(dir), "%s/vdisk-test-threads.XXXXXX",
             tmp ? tmp : "/var/tmp");
    if (!mkdtemp(dir)) {
        fprintf(stderr, "mkdtemp %s: %s\n", dir, strerror(errno));
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);

    int failed = 0, passed = 0;
    for (size_t i = 0; i < sizeof(configs) / sizeof(configs[0]); i++) {
        int st = run_config(&configs[i], dir);
        if (st == 1) {
            failed++;
        } else if (st == 0) {
            passed++;
        }
    }
    /* Early failures return before their own clean-up. */
    static const char *const leftovers[] = { "img.raw", "img.qcow2",
                                             "img.qcow2.raw" };
    for (size_t i = 0; i < sizeof(leftovers) / sizeof(leftovers[0]); i++) {
        char p[600];
        snprintf(p, sizeof(p), "%s/%s", dir, leftovers[i]);
        unlink(p);
    }
    rmdir(dir);
    printf("test-threads: %d configuration(s) passed, %d failed\n", passed,
           failed);
    if (failed) {
        return 1;
    }
    return passed ? 0 : 77;
}
