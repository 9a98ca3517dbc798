/*
 * vdisk bench: qemu-img bench 7.2 (same options, same output), plus a
 * vdisk-only --random mode for 4 KiB random-I/O benchmarks.
 *
 * qemu-img keeps DEPTH asynchronous requests in flight from one event
 * loop. vdisk requests are synchronous calls (docs/concurrency.md), so
 * queue depth comes from threads: min(DEPTH, COUNT) worker threads (at
 * most BENCH_MAX_WORKERS) each take the next request number from one
 * atomic counter, compute that request's offset from its number alone
 * and issue it. Request k goes to the offset qemu-img's k-th request
 * would use: the start offset, then OFFSET + k * STEP wrapped modulo
 * the image size, the same arithmetic as qemu-img 7.2's "offset += step;
 * offset %= image_size" (so, as there, a wrapped request that crosses
 * the end of the image fails the run). With --random, request k
 * goes to a pseudo-random multiple of STEP derived from k and a fixed
 * seed, so every run (and every thread interleaving) touches the same
 * offsets.
 *
 * --flush-interval: qemu-img drains and flushes whenever the number of
 * requests not yet submitted is a multiple of the interval (checked from
 * the first completion on). We run the requests in segments cut at those
 * points: the workers finish a segment, the main thread flushes, then the
 * next segment starts. With --no-drain there is one segment and the
 * worker that takes the first request after each cut flushes before its
 * own request, while the other workers' requests stay in flight. The
 * final flush is left to close, as qemu-img leaves it outside its timing.
 *
 * --output=json (vdisk's own, docs/json.md) replaces the two sentences
 * with one object carrying the same figures.
 *
 * Layout: option parsing (qemu-img's messages), the offset functions, the
 * worker pool, then cmd_bench() which opens the image and times the run.
 * Only the public API (vdisk/vdisk.h) is used.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "commands.h"
#include <json-c/json.h>

#include "util.h"
#include "vdisk/vdisk.h"
#include "prog.h"

int cmd_bench(int argc, char **argv);

/* Enough threads to saturate any local device; beyond this a larger
 * DEPTH only costs memory (each worker owns a buffer). */
#define BENCH_MAX_WORKERS 256

/* Fixed seed for --random, so runs are repeatable and comparable. */
#define BENCH_RANDOM_SEED UINT64_C(0x766469736b62656e)

enum {
    BENCH_OPT_FLUSH_INTERVAL = 256,
    BENCH_OPT_IMAGE_OPTS,
    BENCH_OPT_PATTERN,
    BENCH_OPT_NO_DRAIN,
    BENCH_OPT_RANDOM,
    BENCH_OPT_OUTPUT,
};

typedef struct bench {
    vd_node *node;
    uint64_t image_size;
    uint64_t offset;            /* first request */
    uint64_t bufsize;
    uint64_t step;              /* STEP, or BUFSIZE when not given */
    uint64_t count;
    uint64_t depth;             /* as requested (sets the flush cuts) */
    uint64_t flush_interval;    /* 0: none */
    bool write;
    bool drain_on_flush;
    bool random;
    uint64_t random_slots;      /* --random: number of aligned offsets */
    uint64_t random_align;

    /* Phase control: the main thread publishes a segment [next, seg_end)
     * and bumps phase; each worker runs it and decrements active. */
    pthread_mutex_t lock;
    pthread_cond_t start_cond;
    pthread_cond_t done_cond;
    unsigned phase;
    uint64_t seg_end;
    int active;
    bool quit;

    _Atomic uint64_t next;      /* next request number to take */
    atomic_bool failed;
    int first_error;            /* under lock */
    char first_message[1024];   /* under lock */
} bench;

typedef struct worker {
    bench *b;
    void *buf;
    pthread_t thread;
} worker;

/* ---- messages, in qemu-img's words with the program's prefix ---- */

static void __attribute__((format(printf, 1, 2)))
bench_error(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    cli_verror(fmt, ap);
    va_end(ap);
}

static void bench_hint(void)
{
    cli_help_hint();
}

static void bench_usage(void)
{
    /* qemu-img's -h shows the whole help; vdisk's documents --random. */
    if (cli_as == CLI_QEMU_IMG) {
        cli_print_help();
        return;
    }
    cli_print_command_help(cli_find_command("bench"));
    printf("\n"
           "Runs COUNT requests (default 75000) of BUFFER_SIZE bytes "
           "(default 4k) with DEPTH\n"
           "(default 64) in flight, starting at OFFSET and advancing by "
           "STEP_SIZE, as\n"
           "qemu-img bench does. --random (vdisk only) sends each request "
           "to a pseudo-random\n"
           "multiple of STEP_SIZE drawn with a fixed seed. --output=json "
           "(vdisk only)\n"
           "prints the figures as one object (docs/json.md).\n");
}

/* qemu_strtoul(str, NULL, 0, ...) with an upper bound: the whole string
 * must be a number (any base prefix). */
static bool parse_ulong(const char *str, unsigned long max,
                        unsigned long *out)
{
    char *end;
    unsigned long v;

    if (!*str) {
        return false;
    }
    errno = 0;
    v = strtoul(str, &end, 0);
    if (errno || *end || v > max) {
        return false;
    }
    *out = v;
    return true;
}

/* qemu-img's cvtnum_full(): a size with suffixes, inside [0, max]. */
static bool parse_size_arg(const char *what, const char *str, uint64_t max,
                           uint64_t *out)
{
    uint64_t v;
    int ret = vd_parse_size(str, &v);

    if (ret == -ERANGE || (ret == 0 && v > max)) {
        bench_error("Invalid %s specified. Must be between 0 and %" PRIu64
                    ".", what, max);
        return false;
    }
    if (ret < 0) {
        bench_error("Invalid %s specified. You may use k, M, G, T, P or E "
                    "suffixes for", what);
        bench_error("kilobytes, megabytes, gigabytes, terabytes, petabytes "
                    "and exabytes.");
        return false;
    }
    *out = v;
    return true;
}

static bool valid_cache_mode(const char *mode)
{
    static const char *const modes[] = {
        "none", "off", "writeback", "unsafe", "directsync", "writethrough",
        NULL,
    };

    for (int i = 0; modes[i]; i++) {
        if (strcmp(mode, modes[i]) == 0) {
            return true;
        }
    }
    return false;
}

static bool valid_aio_mode(const char *mode)
{
    return strcmp(mode, "threads") == 0 || strcmp(mode, "native") == 0 ||
           strcmp(mode, "io_uring") == 0;
}

/* ---- offsets ---- */

/* SplitMix64: a good 64-bit mix of the request number, so --random needs
 * no shared generator state between threads. */
static uint64_t mix64(uint64_t x)
{
    x += UINT64_C(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)) * UINT64_C(0x94d049bb133111eb);
    return x ^ (x >> 31);
}

/* Offset of request number @k. */
static uint64_t request_offset(const bench *b, uint64_t k)
{
    if (b->random) {
        return b->offset +
               (mix64(BENCH_RANDOM_SEED ^ k) % b->random_slots) *
               b->random_align;
    }
    if (k == 0) {
        return b->offset;
    }
    /* qemu-img 7.2 crashes dividing by an empty image's size; later
     * versions send every request to 0, and so do we. */
    if (b->image_size == 0) {
        return 0;
    }
    /* 128 bits: k * step may exceed 64 bits for large counts and steps. */
    return (uint64_t)(((unsigned __int128)b->offset +
                       (unsigned __int128)k * b->step) % b->image_size);
}

/* True when qemu-img would flush once request @k is about to be sent:
 * the number of requests left to send is a multiple of the interval, and
 * at least one request has completed (the first DEPTH go out unchecked). */
static bool flush_point(const bench *b, uint64_t k)
{
    uint64_t first = b->depth < b->count ? b->depth : b->count;

    return b->flush_interval && k >= first && k < b->count &&
           (b->count - k) % b->flush_interval == 0;
}

/* ---- the worker pool ---- */

static void record_error(bench *b, int ret, const vd_error *err)
{
    pthread_mutex_lock(&b->lock);
    if (!b->first_error) {
        b->first_error = ret;
        snprintf(b->first_message, sizeof(b->first_message), "%s",
                 err->message);
    }
    pthread_mutex_unlock(&b->lock);
    atomic_store(&b->failed, true);
}

static void run_segment(bench *b, worker *w, uint64_t end)
{
    vd_error err = VD_ERROR_INIT;
    int ret;

    while (!atomic_load_explicit(&b->failed, memory_order_relaxed)) {
        uint64_t k = atomic_fetch_add(&b->next, 1);
        uint64_t off;

        if (k >= end) {
            break;
        }
        if (!b->drain_on_flush && flush_point(b, k)) {
            ret = vd_flush(b->node, &err);
            if (ret < 0) {
                record_error(b, ret, &err);
                break;
            }
        }
        off = request_offset(b, k);
        if (b->write) {
            ret = vd_pwrite(b->node, w->buf, b->bufsize, off, 0, &err);
        } else {
            ret = vd_pread(b->node, w->buf, b->bufsize, off, 0, &err);
        }
        if (ret < 0) {
            record_error(b, ret, &err);
            break;
        }
    }
}

static void *worker_main(void *opaque)
{
    worker *w = opaque;
    bench *b = w->b;
    unsigned seen = 0;

    pthread_mutex_lock(&b->lock);
    for (;;) {
        while (b->phase == seen && !b->quit) {
            pthread_cond_wait(&b->start_cond, &b->lock);
        }
        if (b->quit) {
            break;
        }
        seen = b->phase;
        uint64_t end = b->seg_end;
        pthread_mutex_unlock(&b->lock);

        run_segment(b, w, end);

        pthread_mutex_lock(&b->lock);
        if (--b->active == 0) {
            pthread_cond_signal(&b->done_cond);
        }
    }
    pthread_mutex_unlock(&b->lock);
    return NULL;
}

/* Runs requests [start, end) on @nworkers threads and waits for them. */
static void run_phase(bench *b, int nworkers, uint64_t start, uint64_t end)
{
    pthread_mutex_lock(&b->lock);
    atomic_store(&b->next, start);
    b->seg_end = end;
    b->active = nworkers;
    b->phase++;
    pthread_cond_broadcast(&b->start_cond);
    while (b->active > 0) {
        pthread_cond_wait(&b->done_cond, &b->lock);
    }
    pthread_mutex_unlock(&b->lock);
}

/* The timed part: every segment, with a drained flush between segments
 * when --flush-interval asks for one. Returns 0 or the first error. */
static int run_bench(bench *b, int nworkers)
{
    vd_error err = VD_ERROR_INIT;
    uint64_t start = 0;
    int ret;

    if (!b->flush_interval || !b->drain_on_flush) {
        run_phase(b, nworkers, 0, b->count);
        return 0;
    }
    while (start < b->count && !atomic_load(&b->failed)) {
        uint64_t end = start + 1;

        while (end < b->count && !flush_point(b, end)) {
            end++;
        }
        run_phase(b, nworkers, start, end);
        if (end < b->count && !atomic_load(&b->failed)) {
            ret = vd_flush(b->node, &err);
            if (ret < 0) {
                record_error(b, ret, &err);
            }
        }
        start = end;
    }
    return 0;
}

/* ---- the command ---- */

static double now_seconds(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static vd_node *bench_open(const char *filename, const char *fmt,
                           bool image_opts, const char *cache,
                           const char *aio, unsigned flags)
{
    vd_error err = VD_ERROR_INIT;
    vd_opts *opts;
    vd_node *node = NULL;
    int ret;

    if (image_opts) {
        /* The shared --image-opts parser prints its own errors. */
        opts = cli_parse_image_opts(filename, NULL);
        if (!opts) {
            return NULL;
        }
    } else if (!(opts = vd_opts_new())) {
        bench_error("Could not open '%s': %s", filename, strerror(ENOMEM));
        return NULL;
    }
    if ((cache && (ret = vd_opts_set(opts, "cache", cache)) < 0) ||
        (aio && (ret = vd_opts_set(opts, "aio", aio)) < 0)) {
        bench_error("Could not open '%s': %s", filename, strerror(-ret));
        goto out;
    }
    ret = vd_open(&node, image_opts ? NULL : filename, fmt, opts, flags,
                  &err);
    if (ret < 0) {
        /* qemu-img's img_open() wording: its own prefix, then the
         * driver's message (which names the file again). */
        const char *msg = err.message[0] ? err.message : strerror(-ret);
        size_t n = strlen(filename);

        /* Drivers name the file ("disk.qcow2: ..."); qemu-img's message
         * names it once, in the prefix. */
        if (strncmp(msg, filename, n) == 0 && strncmp(msg + n, ": ", 2) == 0) {
            msg += n + 2;
        }
        bench_error("Could not open '%s': %s", filename, msg);
        node = NULL;
    }
out:
    vd_opts_free(&opts);
    return node;
}

/* bench's options (util.c's cli_commands[] points here too). */
const char cmd_bench_short_opts[] = ":hc:d:f:ni:o:qs:S:t:wU";
const struct option cmd_bench_long_opts[] = {
    { "help", no_argument, NULL, 'h' },
    { "flush-interval", required_argument, NULL, BENCH_OPT_FLUSH_INTERVAL },
    { "image-opts", no_argument, NULL, BENCH_OPT_IMAGE_OPTS },
    { "pattern", required_argument, NULL, BENCH_OPT_PATTERN },
    { "no-drain", no_argument, NULL, BENCH_OPT_NO_DRAIN },
    { "force-share", no_argument, NULL, 'U' },
    { "random", no_argument, NULL, BENCH_OPT_RANDOM },
    { "output", required_argument, NULL, BENCH_OPT_OUTPUT },
    { NULL, 0, NULL, 0 },
};

/* A measured figure with the digits it deserves, as a JSON number. */
static void add_figure(json_object *o, const char *key, const char *fmt,
                       double v)
{
    char text[64];

    snprintf(text, sizeof(text), fmt, v);
    json_object_object_add(o, key, json_object_new_double_s(v, text));
}

int cmd_bench(int argc, char **argv)
{
    const char *fmt = NULL, *cache = NULL, *aio = NULL, *filename;
    unsigned long count = 75000, depth = 64, pattern = 0, flush_interval = 0;
    uint64_t offset = 0, bufsize = 4096, step = 0;
    bool image_opts = false, is_write = false, drain = true, random = false;
    bool native = false, json = false;
    unsigned flags = 0;
    bench b;
    worker *workers = NULL;
    uint64_t nbufs = 0;
    int nworkers = 0, status = 1;
    int64_t len;
    double t1, t2;
    int c, longidx = -1;

    optind = 0;    /* reset getopt for this argv (glibc: full reset) */
    opterr = 0;
    while ((c = getopt_long(argc, argv, cmd_bench_short_opts,
                            cmd_bench_long_opts, &longidx)) != -1) {
        if (cli_as == CLI_QEMU_IMG && longidx >= 0 &&
            cli_option_is_vdisk_only("bench",
                                     cmd_bench_long_opts[longidx].name)) {
            c = '?';
        }
        longidx = -1;
        switch (c) {
        case ':':
            bench_error("missing argument for option '%s'", argv[optind - 1]);
            bench_hint();
            return 1;
        case '?':
            bench_error("unrecognized option '%s'", argv[optind - 1]);
            bench_hint();
            return 1;
        case 'h':
            bench_usage();
            return 0;
        case 'c':
            if (!parse_ulong(optarg, INT_MAX, &count)) {
                bench_error("Invalid request count specified");
                return 1;
            }
            break;
        case 'd':
            if (!parse_ulong(optarg, INT_MAX, &depth)) {
                bench_error("Invalid queue depth specified");
                return 1;
            }
            break;
        case 'f':
            fmt = optarg;
            break;
        case 'n':
            native = true;
            break;
        case 'i':
            if (!valid_aio_mode(optarg)) {
                bench_error("Invalid aio option: %s", optarg);
                return 1;
            }
            aio = optarg;
            break;
        case 'o':
            if (!parse_size_arg("offset", optarg, INT64_MAX, &offset)) {
                return 1;
            }
            break;
        case 'q':
            /* qemu-img bench prints its two lines even with -q. */
            break;
        case 's':
            if (!parse_size_arg("buffer size", optarg, INT_MAX, &bufsize)) {
                return 1;
            }
            break;
        case 'S':
            if (!parse_size_arg("step_size", optarg, INT_MAX, &step)) {
                return 1;
            }
            break;
        case 't':
            if (!valid_cache_mode(optarg)) {
                bench_error("Invalid cache mode");
                return 1;
            }
            cache = optarg;
            break;
        case 'w':
            flags |= VD_O_RDWR;
            is_write = true;
            break;
        case 'U':
            flags |= VD_O_FORCE_SHARE;
            break;
        case BENCH_OPT_PATTERN:
            if (!parse_ulong(optarg, 0xff, &pattern)) {
                bench_error("Invalid pattern byte specified");
                return 1;
            }
            break;
        case BENCH_OPT_FLUSH_INTERVAL:
            if (!parse_ulong(optarg, INT_MAX, &flush_interval)) {
                bench_error("Invalid flush interval specified");
                return 1;
            }
            break;
        case BENCH_OPT_NO_DRAIN:
            drain = false;
            break;
        case BENCH_OPT_IMAGE_OPTS:
            image_opts = true;
            break;
        case BENCH_OPT_RANDOM:
            random = true;
            break;
        case BENCH_OPT_OUTPUT:
            if (cli_parse_output(optarg, &json) < 0) {
                return 1;
            }
            break;
        }
    }
    if (optind != argc - 1) {
        bench_error("Expecting one image file name");
        bench_hint();
        return 1;
    }
    filename = argv[optind];

    if (!is_write && flush_interval) {
        bench_error("--flush-interval is only available in write tests");
        return 1;
    }
    if (flush_interval && flush_interval < depth) {
        bench_error("Flush interval can't be smaller than depth");
        return 1;
    }
    if (image_opts && fmt) {
        bench_error("--image-opts and --format are mutually exclusive");
        return 1;
    }
    /* -n is qemu-img's BDRV_O_NATIVE_AIO; an explicit -i wins. */
    if (native && !aio) {
        aio = "native";
    }

    memset(&b, 0, sizeof(b));
    pthread_mutex_init(&b.lock, NULL);
    pthread_cond_init(&b.start_cond, NULL);
    pthread_cond_init(&b.done_cond, NULL);

    b.node = bench_open(filename, fmt, image_opts, cache, aio, flags);
    if (!b.node) {
        goto out;
    }
    len = vd_getlength(b.node);
    if (len < 0) {
        bench_error("%s: Could not get the image size: %s", filename,
                    strerror((int)-len));
        goto out;
    }

    b.image_size = (uint64_t)len;
    b.offset = offset;
    b.bufsize = bufsize;
    b.step = step ? step : bufsize;
    b.count = count;
    b.depth = depth;
    b.flush_interval = flush_interval;
    b.write = is_write;
    b.drain_on_flush = drain;
    b.random = random;
    if (random) {
        /* Aligned slots inside [offset, size - bufsize]; an image too
         * small for one request still gets one slot, whose request then
         * fails the range check as a sequential run would. */
        b.random_align = b.step ? b.step : 512;
        b.random_slots = 1;
        if (b.image_size >= offset && b.image_size - offset >= bufsize) {
            b.random_slots = (b.image_size - offset - bufsize) /
                             b.random_align + 1;
        }
    }
    if (json) {
        /* The object at the end says it all. */
    } else if (random) {
        printf("Sending %lu random %s requests, %d bytes each, %lu in "
               "parallel (offsets from %" PRIu64 ", aligned to %d)\n",
               count, is_write ? "write" : "read", (int)bufsize, depth,
               offset, (int)b.random_align);
    } else {
        printf("Sending %lu %s requests, %d bytes each, %lu in parallel "
               "(starting at offset %" PRIu64 ", step size %d)\n",
               count, is_write ? "write" : "read", (int)bufsize, depth,
               offset, (int)b.step);
    }
    if (flush_interval && !json) {
        printf("Sending flush every %lu requests\n", flush_interval);
    }
    fflush(stdout);

    /* At least one worker, so that -d 0 finishes (qemu-img would wait
     * forever with nothing in flight). */
    {
        uint64_t want = depth < count ? depth : count;

        if (want > BENCH_MAX_WORKERS) {
            want = BENCH_MAX_WORKERS;
        }
        if (want == 0) {
            want = 1;
        }
        workers = calloc(want, sizeof(*workers));
        if (!workers) {
            bench_error("Could not allocate %" PRIu64 " workers", want);
            goto out;
        }
        for (uint64_t i = 0; i < want; i++, nbufs++) {
            workers[i].b = &b;
            if (posix_memalign(&workers[i].buf, 4096,
                               bufsize ? bufsize : 1) != 0) {
                workers[i].buf = NULL;
                bench_error("Could not allocate a %" PRIu64 " byte buffer",
                            bufsize);
                goto out;
            }
            memset(workers[i].buf, (int)pattern, bufsize);
        }
        for (uint64_t i = 0; i < want; i++) {
            /* Running with fewer threads than asked beats failing. */
            if (pthread_create(&workers[i].thread, NULL, worker_main,
                               &workers[i]) != 0) {
                break;
            }
            nworkers++;
        }
        if (nworkers == 0) {
            bench_error("Could not start worker threads");
            goto out;
        }
    }

    t1 = now_seconds();
    run_bench(&b, nworkers);
    t2 = now_seconds();

    if (atomic_load(&b.failed)) {
        bench_error("Failed request: %s", strerror(-b.first_error));
        if (b.first_message[0]) {
            bench_error("%s", b.first_message);
        }
        goto out;
    }
    if (json) {
        json_object *o = json_object_new_object();
        double secs = t2 - t1;

        json_object_object_add(o, "filename", json_object_new_string(
                                   filename));
        json_object_object_add(o, "mode", json_object_new_string(
                                   is_write ? "write" : "read"));
        json_object_object_add(o, "random", json_object_new_boolean(random));
        json_object_object_add(o, "count", json_object_new_int64(
                                   (int64_t)count));
        json_object_object_add(o, "buffer-size", json_object_new_int64(
                                   (int64_t)bufsize));
        json_object_object_add(o, "depth", json_object_new_int64(
                                   (int64_t)depth));
        json_object_object_add(o, "offset", json_object_new_int64(
                                   (int64_t)offset));
        json_object_object_add(o, "step", json_object_new_int64(
                                   (int64_t)(random ? b.random_align
                                                    : b.step)));
        json_object_object_add(o, "flush-interval", json_object_new_int64(
                                   (int64_t)flush_interval));
        add_figure(o, "seconds", "%.6f", secs);
        add_figure(o, "iops", "%.1f", secs > 0 ? (double)count / secs : 0);
        add_figure(o, "bytes-per-second", "%.0f",
                   secs > 0 ? (double)count * (double)bufsize / secs : 0);
        cli_print_json(o);
    } else {
        printf("Run completed in %3.3f seconds.\n", t2 - t1);
    }
    status = 0;

out:
    if (nworkers > 0) {
        pthread_mutex_lock(&b.lock);
        b.quit = true;
        pthread_cond_broadcast(&b.start_cond);
        pthread_mutex_unlock(&b.lock);
        for (int i = 0; i < nworkers; i++) {
            pthread_join(workers[i].thread, NULL);
        }
    }
    if (workers) {
        for (uint64_t i = 0; i < nbufs; i++) {
            free(workers[i].buf);
        }
        free(workers);
    }
    if (b.node) {
        vd_error err = VD_ERROR_INIT;

        if (vd_close(&b.node, &err) < 0 && status == 0) {
            bench_error("%s", err.message);
            status = 1;
        }
    }
    pthread_cond_destroy(&b.done_cond);
    pthread_cond_destroy(&b.start_cond);
    pthread_mutex_destroy(&b.lock);
    return status;
}
