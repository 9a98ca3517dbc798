/*
 * `vdisk io`: qemu-io's command set over the public vdisk API. Invoked as
 * qemu-io (docs/compat.md) it is that tool: qemu-io's name in messages,
 * help and version, and without vdisk io's -l, -o and randrw.
 *
 * The output of every command is meant to be byte-for-byte what qemu-io
 * 7.2 prints (timings aside), so tests can diff the two tools. The file is
 * laid out bottom-up: output helpers shared by all commands (number
 * parsing, qemu's cvtstr/timestr formats, hex dump, the I/O report), then
 * one function per command, the command table, the line dispatcher and
 * finally cmd_io() which parses qemu-io's options, opens the image and
 * runs the -c commands or the stdin loop.
 *
 * Threads: aio_read/aio_write run each request on its own worker thread
 * and return at once; the request prints its report when it completes,
 * and aio_flush (or truncate, close, exit) joins every worker. randrw
 * (vdisk only) runs a fixed number of worker threads to completion.
 * Output from workers and from the main thread is serialised by
 * out_lock so a multi-line report never interleaves with another.
 *
 * Exit status, as qemu-io: 1 when any synchronous command failed (bad
 * arguments, I/O error, pattern mismatch), else 0; asynchronous request
 * failures are only reported.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "vdisk/vdisk.h"
#include "commands.h"
#include "util.h"

/* qemu's BDRV_REQUEST_MAX_BYTES: the largest single request qemu-io
 * accepts, which also bounds every buffer a command line can ask for. */
#define MAX_REQUEST_BYTES ((uint64_t)(INT_MAX >> 9) << 9)
#define SECTOR_SIZE 512
/* Longest command line read from stdin. */
#define MAX_LINE 65536
/* aio requests in flight at once; more wait for the oldest to finish. */
#define MAX_AIO 256

/* ------------------------------------------------------------------ */
/* Session state                                                      */
/* ------------------------------------------------------------------ */

typedef struct aio_req aio_req;

static struct {
    vd_node *node;        /* NULL after close or when no file was given */
    bool quit;
    aio_req *aio_head;    /* outstanding aio requests, oldest first */
    aio_req *aio_tail;
    int aio_count;
} io;

static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

/*
 * Output discipline. The main thread holds out_lock while a command runs
 * and lets go only while it waits (for a request, a join, a sleep), so
 * aio completions print between commands or during waits, never inside
 * another report: the places where qemu-io's main loop runs callbacks.
 * Worker threads take the lock for each complete report.
 */
static bool main_holds_out;

static void out_begin(void)
{
    pthread_mutex_lock(&out_lock);
}

static void out_end(void)
{
    fflush(stdout);
    pthread_mutex_unlock(&out_lock);
}

static void main_out_acquire(void)
{
    pthread_mutex_lock(&out_lock);
    main_holds_out = true;
}

static void main_out_release(void)
{
    fflush(stdout);
    main_holds_out = false;
    pthread_mutex_unlock(&out_lock);
}

/* Around anything the main thread blocks on. Nests with nothing. */
static bool wait_begin(void)
{
    bool held = main_holds_out;
    if (held) {
        main_out_release();
    }
    return held;
}

static void wait_end(bool held)
{
    if (held) {
        main_out_acquire();
    }
}

static void aio_drain(void);

/* Prints the library's message for a failed call, when it gave one. */
static void report_vd_error(const vd_error *err)
{
    if (err->code != 0 && err->message[0]) {
        fflush(stdout);
        cli_error("%s", err->message);
    }
}

/* ------------------------------------------------------------------ */
/* Numbers and formatting (qemu-io's cvtnum, cvtstr, timestr)          */
/* ------------------------------------------------------------------ */

/*
 * Parses a size the way qemu_strtosz does for qemu-io: decimal with an
 * optional fraction and a binary suffix (b k m g t p e, any case), or hex
 * (a suffix on hex is deprecated but accepted). Returns the value, or
 * -EINVAL (junk) / -ERANGE (2^63 or more).
 */
static int64_t cvtnum(const char *s)
{
    const char *p = s;
    uint64_t mul = 1, val = 0;
    double frac = 0;
    bool hex = false, has_frac = false;

    while (isspace((unsigned char)*p)) {
        p++;
    }
    if (*p == '+') {
        p++;
    }
    if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
        const char *start = p + 2;
        char *end;
        if (!isxdigit((unsigned char)*start)) {
            return -EINVAL;
        }
        errno = 0;
        val = strtoull(start, &end, 16);
        if (errno == ERANGE) {
            return -ERANGE;
        }
        p = end;
        hex = true;
    } else {
        if (!isdigit((unsigned char)*p)) {
            return -EINVAL;
        }
        while (isdigit((unsigned char)*p)) {
            if (val > (UINT64_MAX - 9) / 10) {
                return -ERANGE;
            }
            val = val * 10 + (uint64_t)(*p - '0');
            p++;
        }
        if (*p == '.') {
            char *end;
            if (isdigit((unsigned char)p[1])) {
                frac = strtod(p, &end);
                p = end;
            } else {
                p++; /* "1.k": an empty fraction */
            }
            has_frac = true;
        }
    }
    if (*p) {
        switch (tolower((unsigned char)*p)) {
        case 'b': mul = 1; break;
        case 'k': mul = 1ull << 10; break;
        case 'm': mul = 1ull << 20; break;
        case 'g': mul = 1ull << 30; break;
        case 't': mul = 1ull << 40; break;
        case 'p': mul = 1ull << 50; break;
        case 'e': mul = 1ull << 60; break;
        default: return -EINVAL;
        }
        p++;
        if (hex) {
            fflush(stdout);
            cli_warn("Using a multiplier suffix on "
                     "hex numbers is deprecated: %s", s);
        }
    }
    if (*p) {
        return -EINVAL;
    }
    /* A fraction of a byte is meaningless. */
    if (has_frac && mul == 1 && frac != 0) {
        return -EINVAL;
    }
    if (val > INT64_MAX / mul) {
        return -ERANGE;
    }
    val *= mul;
    if (has_frac) {
        uint64_t extra = (uint64_t)(frac * (double)mul);
        if (val > INT64_MAX - extra) {
            return -ERANGE;
        }
        val += extra;
    }
    if (val > INT64_MAX) {
        return -ERANGE;
    }
    return (int64_t)val;
}

static void print_cvtnum_err(int64_t rc, const char *arg)
{
    if (rc == -EINVAL) {
        printf("Parsing error: non-numeric argument,"
               " or extraneous/unrecognized suffix -- %s\n", arg);
    } else if (rc == -ERANGE) {
        printf("Parsing error: argument too large -- %s\n", arg);
    } else {
        printf("Parsing error: %s\n", arg);
    }
}

/* qemu's human size: "512 bytes", "1.500 KiB", "64 KiB". */
static void cvtstr(double value, char *str, size_t size)
{
    static const char *const units[] = {
        " EiB", " PiB", " TiB", " GiB", " MiB", " KiB",
    };
    const char *suffix = " bytes";
    char *trim;
    int i;

    snprintf(str, size - 6, "%f", value);
    for (i = 0; i < 6; i++) {
        double unit = (double)(1ull << (10 * (6 - i)));
        if (value >= unit) {
            suffix = units[i];
            snprintf(str, size - 4, "%.3f", value / unit);
            break;
        }
    }
    trim = strstr(str, ".000");
    if (trim) {
        strcpy(trim, suffix);
    } else {
        strcat(str, suffix);
    }
}

static struct timespec now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts;
}

static double seconds_between(struct timespec a, struct timespec b)
{
    return (double)(b.tv_sec - a.tv_sec) +
           (double)(b.tv_nsec - a.tv_nsec) / 1e9;
}

static void timestr(double secs, char *ts, size_t size, bool verbose)
{
    unsigned long whole = (unsigned long)secs;
    double frac = secs - (double)whole;

    if (verbose || whole) {
        snprintf(ts, size, "%lu:%02lu:%05.2f", whole / 3600,
                 (whole % 3600) / 60, (double)(whole % 60) + frac);
    } else {
        snprintf(ts, size, "%05.2f sec", frac);
    }
}

/* The two report lines (or one -C line) every I/O command prints. */
static void print_report(const char *op, double secs, int64_t offset,
                         int64_t count, int64_t total, int cnt, bool Cflag)
{
    char s1[64], s2[64], ts[64];

    timestr(secs, ts, sizeof(ts), Cflag);
    if (!Cflag) {
        cvtstr((double)total, s1, sizeof(s1));
        cvtstr((double)total / secs, s2, sizeof(s2));
        printf("%s %" PRId64 "/%" PRId64 " bytes at offset %" PRId64 "\n",
               op, total, count, offset);
        printf("%s, %d ops; %s (%s/sec and %.4f ops/sec)\n",
               s1, cnt, ts, s2, (double)cnt / secs);
    } else {
        printf("%" PRId64 ",%d,%s,%.3f,%.3f\n", total, cnt, ts,
               (double)total / secs, (double)cnt / secs);
    }
}

static void dump_buffer(const uint8_t *buf, int64_t offset, uint64_t len)
{
    uint64_t i;
    unsigned j;

    for (i = 0; i < len; i += 16) {
        printf("%08" PRIx64 ":  ", (uint64_t)offset + i);
        for (j = 0; j < 16 && i + j < len; j++) {
            printf("%02x ", buf[i + j]);
        }
        printf(" ");
        for (j = 0; j < 16 && i + j < len; j++) {
            putchar(isalnum(buf[i + j]) ? buf[i + j] : '.');
        }
        printf("\n");
    }
}

/* A pattern byte for -P; prints qemu-io's complaint and returns -1. */
static int parse_pattern(const char *arg)
{
    char *end = NULL;
    long v = strtol(arg, &end, 0);

    if (v < 0 || v > UCHAR_MAX || *end != '\0') {
        printf("%s is not a valid pattern byte\n", arg);
        return -1;
    }
    return (int)v;
}

/* Parses a length argument of read/write/discard into @out. */
static int parse_len(const char *arg, int64_t *out)
{
    int64_t v = cvtnum(arg);

    *out = 0;

    if (v < 0) {
        print_cvtnum_err(v, arg);
        return (int)v;
    }
    if ((uint64_t)v > MAX_REQUEST_BYTES) {
        printf("length cannot exceed %" PRIu64 ", given %s\n",
               MAX_REQUEST_BYTES, arg);
        return -EINVAL;
    }
    *out = v;
    return 0;
}

static int parse_offset(const char *arg, int64_t *out)
{
    int64_t v = cvtnum(arg);

    *out = 0;

    if (v < 0) {
        print_cvtnum_err(v, arg);
        return (int)v;
    }
    *out = v;
    return 0;
}

/*
 * qemu's block backend refuses requests past the end with -EIO before any
 * driver sees them; vdisk's core says -EINVAL, so check here to print the
 * same "Input/output error" qemu-io does.
 */
static int check_range(int64_t offset, int64_t bytes)
{
    int64_t len = vd_getlength(io.node);

    if (len < 0) {
        return (int)len;
    }
    if (offset > len || bytes > len - offset) {
        return -EIO;
    }
    return 0;
}

static uint8_t *alloc_buf(size_t len, int fill)
{
    void *p = cli_io_buffer(len);

    if (!p) {
        return NULL;
    }
    memset(p, fill, len);
    return p;
}

/* ------------------------------------------------------------------ */
/* Vectored helpers: "off len [len..]" into one buffer split in iovecs */
/* ------------------------------------------------------------------ */

typedef struct iovbuf {
    uint8_t *buf;
    struct iovec *iov;
    int cnt;
    uint64_t size;
} iovbuf;

static void iovbuf_free(iovbuf *v)
{
    free(v->buf);
    free(v->iov);
    memset(v, 0, sizeof(*v));
}

/* Returns 0, or a negative errno after printing qemu-io's complaint. */
static int iovbuf_create(iovbuf *v, char **argv, int n, int fill)
{
    uint64_t *sizes;
    uint64_t total = 0;
    uint8_t *p;
    int i;

    memset(v, 0, sizeof(*v));
    if (n > IOV_MAX) {
        printf("too many length arguments\n");
        return -EINVAL;
    }
    sizes = calloc((size_t)n, sizeof(*sizes));
    if (!sizes) {
        return -ENOMEM;
    }
    for (i = 0; i < n; i++) {
        int64_t len = cvtnum(argv[i]);
        if (len < 0) {
            print_cvtnum_err(len, argv[i]);
            free(sizes);
            return (int)len;
        }
        if ((uint64_t)len > MAX_REQUEST_BYTES) {
            printf("Argument '%s' exceeds maximum size %" PRIu64 "\n",
                   argv[i], MAX_REQUEST_BYTES);
            free(sizes);
            return -EINVAL;
        }
        if (total > MAX_REQUEST_BYTES - (uint64_t)len) {
            printf("The total number of bytes exceed the maximum size %"
                   PRIu64 "\n", MAX_REQUEST_BYTES);
            free(sizes);
            return -EINVAL;
        }
        sizes[i] = (uint64_t)len;
        total += (uint64_t)len;
    }
    v->buf = alloc_buf(total, fill);
    v->iov = calloc((size_t)n, sizeof(*v->iov));
    if (!v->buf || !v->iov) {
        free(sizes);
        iovbuf_free(v);
        return -ENOMEM;
    }
    p = v->buf;
    for (i = 0; i < n; i++) {
        v->iov[i].iov_base = p;
        v->iov[i].iov_len = sizes[i];
        p += sizes[i];
    }
    v->cnt = n;
    v->size = total;
    free(sizes);
    return 0;
}

/* ------------------------------------------------------------------ */
/* The command table                                                  */
/* ------------------------------------------------------------------ */

#define CMD_GLOBAL    0x1  /* runs without a file, no argument checks */
#define CMD_NOFILE_OK 0x2  /* runs without a file */
#define CMD_WRITE     0x4  /* needs a writable node */

typedef struct cmdinfo {
    const char *name;
    const char *altname;
    int (*fn)(int argc, char **argv);
    int argmin, argmax;   /* argmax -1: unlimited */
    unsigned flags;
    const char *args;
    const char *oneline;
    const char *help;
} cmdinfo;

static const cmdinfo *find_command(const char *name);

static int command_usage(const cmdinfo *ct)
{
    printf("%s %s -- %s\n", ct->name, ct->args, ct->oneline);
    return -EINVAL;
}

static int usage_of(const char *name)
{
    return command_usage(find_command(name));
}

/* ------------------------------------------------------------------ */
/* read, readv, write, writev                                         */
/* ------------------------------------------------------------------ */

/*
 * read -b / write -b: @count bytes at @offset of the image's VM state area
 * (qcow2's, past the guest disk), through the library's vmstate calls.
 * As qemu-io, there is no range check against the disk's length. A
 * format without such an area fails with ENOTSUP and, as QEMU, nothing
 * more than "read failed: Operation not supported" is said.
 */
static int vmstate_io(bool write, uint8_t *buf, int64_t count, int64_t offset,
                      vd_error *err)
{
    int ret = write ? vd_save_vmstate(io.node, buf, (uint64_t)count,
                                      (uint64_t)offset, err)
                    : vd_load_vmstate(io.node, buf, (uint64_t)count,
                                      (uint64_t)offset, err);
    if (ret == -ENOTSUP) {
        vd_error_clear(err);
    }
    return ret;
}

static int read_f(int argc, char **argv)
{
    bool held;
    bool Cflag = false, qflag = false, vflag = false;
    bool Pflag = false, sflag = false, lflag = false, bflag = false;
    int64_t offset = 0, count = 0, pattern_offset = 0, pattern_count = 0;
    int c, pattern = 0, ret;
    struct timespec t1, t2;
    uint8_t *buf;
    vd_error err = VD_ERROR_INIT;

    while ((c = getopt(argc, argv, "abCl:pP:qs:v")) != -1) {
        switch (c) {
        case 'a':
        case 'p':
            break; /* accepted by qemu-io for compatibility */
        case 'b':
            bflag = true;
            break;
        case 'C':
            Cflag = true;
            break;
        case 'l':
            lflag = true;
            pattern_count = cvtnum(optarg);
            if (pattern_count < 0) {
                print_cvtnum_err(pattern_count, optarg);
                return (int)pattern_count;
            }
            break;
        case 'P':
            Pflag = true;
            pattern = parse_pattern(optarg);
            if (pattern < 0) {
                return -EINVAL;
            }
            break;
        case 'q':
            qflag = true;
            break;
        case 's':
            sflag = true;
            pattern_offset = cvtnum(optarg);
            if (pattern_offset < 0) {
                print_cvtnum_err(pattern_offset, optarg);
                return (int)pattern_offset;
            }
            break;
        case 'v':
            vflag = true;
            break;
        default:
            return usage_of("read");
        }
    }
    if (optind != argc - 2) {
        return usage_of("read");
    }
    if ((ret = parse_offset(argv[optind], &offset)) < 0 ||
        (ret = parse_len(argv[optind + 1], &count)) < 0) {
        return ret;
    }
    if (!Pflag && (lflag || sflag)) {
        return usage_of("read");
    }
    if (!lflag) {
        pattern_count = count - pattern_offset;
    }
    if (pattern_count < 0 || pattern_count + pattern_offset > count) {
        printf("pattern verification range exceeds end of read data\n");
        return -EINVAL;
    }
    if (bflag) {
        if (offset % SECTOR_SIZE) {
            printf("%" PRId64 " is not a sector-aligned value for 'offset'\n",
                   offset);
            return -EINVAL;
        }
        if (count % SECTOR_SIZE) {
            printf("%" PRId64 " is not a sector-aligned value for 'count'\n",
                   count);
            return -EINVAL;
        }
    }

    buf = alloc_buf((size_t)count, 0xab);
    if (!buf) {
        printf("read failed: %s\n", strerror(ENOMEM));
        return -ENOMEM;
    }
    held = wait_begin();
    t1 = now();
    if (bflag) {
        ret = vmstate_io(false, buf, count, offset, &err);
    } else {
        ret = check_range(offset, count);
        if (ret == 0) {
            ret = vd_pread(io.node, buf, (uint64_t)count, (uint64_t)offset,
                           0, &err);
        }
    }
    t2 = now();
    wait_end(held);
    if (ret < 0) {
        printf("read failed: %s\n", strerror(-ret));
        report_vd_error(&err);
        goto out;
    }

    if (Pflag) {
        int64_t i;
        for (i = 0; i < pattern_count; i++) {
            if (buf[pattern_offset + i] != pattern) {
                printf("Pattern verification failed at offset %" PRId64
                       ", %" PRId64 " bytes\n",
                       offset + pattern_offset, pattern_count);
                ret = -EINVAL;
                break;
            }
        }
    }
    if (!qflag) {
        if (vflag) {
            dump_buffer(buf, offset, (uint64_t)count);
        }
        print_report("read", seconds_between(t1, t2), offset, count, count,
                     1, Cflag);
    }
out:
    free(buf);
    return ret;
}

static int readv_f(int argc, char **argv)
{
    bool held;
    bool Cflag = false, qflag = false, vflag = false, Pflag = false;
    int c, pattern = 0, ret;
    int64_t offset;
    struct timespec t1, t2;
    iovbuf v;
    vd_error err = VD_ERROR_INIT;

    while ((c = getopt(argc, argv, "CP:qv")) != -1) {
        switch (c) {
        case 'C':
            Cflag = true;
            break;
        case 'P':
            Pflag = true;
            pattern = parse_pattern(optarg);
            if (pattern < 0) {
                return -EINVAL;
            }
            break;
        case 'q':
            qflag = true;
            break;
        case 'v':
            vflag = true;
            break;
        default:
            return usage_of("readv");
        }
    }
    if (optind > argc - 2) {
        return usage_of("readv");
    }
    if ((ret = parse_offset(argv[optind], &offset)) < 0) {
        return ret;
    }
    optind++;
    if ((ret = iovbuf_create(&v, &argv[optind], argc - optind, 0xab)) < 0) {
        return ret;
    }

    held = wait_begin();
    t1 = now();
    ret = check_range(offset, (int64_t)v.size);
    if (ret == 0) {
        ret = vd_preadv(io.node, v.iov, v.cnt, (uint64_t)offset, 0, &err);
    }
    t2 = now();
    wait_end(held);
    if (ret < 0) {
        printf("readv failed: %s\n", strerror(-ret));
        report_vd_error(&err);
        goto out;
    }
    if (Pflag) {
        uint64_t i;
        for (i = 0; i < v.size; i++) {
            if (v.buf[i] != pattern) {
                printf("Pattern verification failed at offset %" PRId64
                       ", %" PRIu64 " bytes\n", offset, v.size);
                ret = -EINVAL;
                break;
            }
        }
    }
    if (!qflag) {
        if (vflag) {
            dump_buffer(v.buf, offset, v.size);
        }
        print_report("read", seconds_between(t1, t2), offset,
                     (int64_t)v.size, (int64_t)v.size, 1, Cflag);
    }
out:
    iovbuf_free(&v);
    return ret;
}

/*
 * Fills @buf with the contents of @path, repeated as often as needed
 * (qemu-io's "write -s"). Returns 0 or -errno after printing the fault.
 */
static int fill_from_file(uint8_t *buf, size_t len, const char *path)
{
    FILE *f = fopen(path, "r");
    size_t got, done;

    if (!f) {
        int e = errno;
        fflush(stdout);
        fprintf(stderr, "%s: %s\n", path, strerror(e));
        return -e;
    }
    got = fread(buf, 1, len, f);
    if (ferror(f)) {
        int e = errno ? errno : EIO;
        fclose(f);
        fflush(stdout);
        fprintf(stderr, "%s: %s\n", path, strerror(e));
        return -e;
    }
    fclose(f);
    if (got == 0 && len > 0) {
        printf("Failed to read from the file\n");
        return -EINVAL;
    }
    for (done = got; done < len; ) {
        size_t n = len - done < got ? len - done : got;
        memcpy(buf + done, buf, n);
        done += n;
    }
    return 0;
}

static int write_f(int argc, char **argv)
{
    bool held;
    bool Cflag = false, qflag = false, bflag = false;
    bool Pflag = false, zflag = false, cflag = false, sflag = false;
    unsigned flags = 0;
    int c, pattern = 0xcd, ret;
    int64_t offset = 0, count = 0;
    const char *file_name = NULL;
    struct timespec t1, t2;
    uint8_t *buf = NULL;
    vd_error err = VD_ERROR_INIT;

    while ((c = getopt(argc, argv, "bcCfnpP:qs:uz")) != -1) {
        switch (c) {
        case 'b':
            bflag = true;
            break;
        case 'c':
            cflag = true;
            break;
        case 'C':
            Cflag = true;
            break;
        case 'f':
            flags |= VD_REQ_FUA;
            break;
        case 'n':
            flags |= VD_REQ_NO_FALLBACK;
            break;
        case 'p':
            break;
        case 'P':
            Pflag = true;
            pattern = parse_pattern(optarg);
            if (pattern < 0) {
                return -EINVAL;
            }
            break;
        case 'q':
            qflag = true;
            break;
        case 's':
            sflag = true;
            file_name = optarg;
            break;
        case 'u':
            flags |= VD_REQ_MAY_UNMAP;
            break;
        case 'z':
            zflag = true;
            break;
        default:
            return usage_of("write");
        }
    }
    if (optind != argc - 2) {
        return usage_of("write");
    }
    if (bflag && zflag) {
        printf("-b and -z cannot be specified at the same time\n");
        return -EINVAL;
    }
    if ((flags & VD_REQ_FUA) && (bflag || cflag)) {
        printf("-f and -b or -c cannot be specified at the same time\n");
        return -EINVAL;
    }
    if ((flags & VD_REQ_NO_FALLBACK) && !zflag) {
        printf("-n requires -z to be specified\n");
        return -EINVAL;
    }
    if ((flags & VD_REQ_MAY_UNMAP) && !zflag) {
        printf("-u requires -z to be specified\n");
        return -EINVAL;
    }
    if ((int)zflag + (int)Pflag + (int)sflag > 1) {
        printf("Only one of -z, -P, and -s can be specified at the same "
               "time\n");
        return -EINVAL;
    }
    if ((ret = parse_offset(argv[optind], &offset)) < 0 ||
        (ret = parse_len(argv[optind + 1], &count)) < 0) {
        return ret;
    }
    if (bflag || cflag) {
        if (offset % SECTOR_SIZE) {
            printf("%" PRId64 " is not a sector-aligned value for 'offset'\n",
                   offset);
            return -EINVAL;
        }
        if (count % SECTOR_SIZE) {
            printf("%" PRId64 " is not a sector-aligned value for 'count'\n",
                   count);
            return -EINVAL;
        }
    }
    if (!zflag) {
        buf = alloc_buf((size_t)count, pattern);
        if (!buf) {
            printf("write failed: %s\n", strerror(ENOMEM));
            return -ENOMEM;
        }
        if (sflag && (ret = fill_from_file(buf, (size_t)count,
                                           file_name)) < 0) {
            free(buf);
            return ret;
        }
    }

    held = wait_begin();
    t1 = now();
    if (bflag) {
        ret = vmstate_io(true, buf, count, offset, &err);
    } else {
        ret = check_range(offset, count);
        if (ret == 0 && zflag) {
            ret = vd_write_zeroes(io.node, (uint64_t)count, (uint64_t)offset,
                                  flags, &err);
        } else if (ret == 0 && cflag) {
            ret = vd_pwrite(io.node, buf, (uint64_t)count, (uint64_t)offset,
                            VD_REQ_COMPRESSED, &err);
        } else if (ret == 0) {
            ret = vd_pwrite(io.node, buf, (uint64_t)count, (uint64_t)offset,
                            flags & VD_REQ_FUA, &err);
        }
    }
    t2 = now();
    wait_end(held);
    if (ret < 0) {
        printf("write failed: %s\n", strerror(-ret));
        report_vd_error(&err);
    } else if (!qflag) {
        print_report("wrote", seconds_between(t1, t2), offset, count, count,
                     1, Cflag);
    }
    free(buf);
    return ret;
}

static int writev_f(int argc, char **argv)
{
    bool held;
    bool Cflag = false, qflag = false;
    unsigned flags = 0;
    int c, pattern = 0xcd, ret;
    int64_t offset;
    struct timespec t1, t2;
    iovbuf v;
    vd_error err = VD_ERROR_INIT;

    while ((c = getopt(argc, argv, "CfqP:")) != -1) {
        switch (c) {
        case 'C':
            Cflag = true;
            break;
        case 'f':
            flags |= VD_REQ_FUA;
            break;
        case 'q':
            qflag = true;
            break;
        case 'P':
            pattern = parse_pattern(optarg);
            if (pattern < 0) {
                return -EINVAL;
            }
            break;
        default:
            return usage_of("writev");
        }
    }
    if (optind > argc - 2) {
        return usage_of("writev");
    }
    if ((ret = parse_offset(argv[optind], &offset)) < 0) {
        return ret;
    }
    optind++;
    if ((ret = iovbuf_create(&v, &argv[optind], argc - optind, pattern)) < 0) {
        return ret;
    }
    held = wait_begin();
    t1 = now();
    ret = check_range(offset, (int64_t)v.size);
    if (ret == 0) {
        ret = vd_pwritev(io.node, v.iov, v.cnt, (uint64_t)offset, flags, &err);
    }
    t2 = now();
    wait_end(held);
    if (ret < 0) {
        printf("writev failed: %s\n", strerror(-ret));
        report_vd_error(&err);
    } else if (!qflag) {
        print_report("wrote", seconds_between(t1, t2), offset,
                     (int64_t)v.size, (int64_t)v.size, 1, Cflag);
    }
    iovbuf_free(&v);
    return ret;
}

/* ------------------------------------------------------------------ */
/* aio_read, aio_write, aio_flush                                     */
/* ------------------------------------------------------------------ */

struct aio_req {
    pthread_t thread;
    aio_req *next;
    bool is_write, zflag, qflag, vflag, Cflag, Pflag;
    int pattern;
    unsigned flags;
    int64_t offset;
    iovbuf v;
    uint64_t zero_len;
    struct timespec t1;
};

static void *aio_worker(void *opaque)
{
    aio_req *r = opaque;
    vd_error err = VD_ERROR_INIT;
    uint64_t size = r->zflag ? r->zero_len : r->v.size;
    struct timespec t2;
    int ret;

    ret = check_range(r->offset, (int64_t)size);
    if (ret == 0 && r->zflag) {
        ret = vd_write_zeroes(io.node, size, (uint64_t)r->offset, r->flags,
                              &err);
    } else if (ret == 0 && r->is_write) {
        ret = vd_pwritev(io.node, r->v.iov, r->v.cnt, (uint64_t)r->offset,
                         r->flags, &err);
    } else if (ret == 0) {
        ret = vd_preadv(io.node, r->v.iov, r->v.cnt, (uint64_t)r->offset, 0,
                        &err);
    }
    t2 = now();

    out_begin();
    if (ret < 0) {
        /* qemu-io says "readv failed" for a failed aio_read. */
        printf("%s failed: %s\n", r->is_write ? "aio_write" : "readv",
               strerror(-ret));
        fflush(stdout);
        report_vd_error(&err);
    } else {
        if (r->Pflag) {
            uint64_t i;
            for (i = 0; i < size; i++) {
                if (r->v.buf[i] != r->pattern) {
                    printf("Pattern verification failed at offset %" PRId64
                           ", %" PRIu64 " bytes\n", r->offset, size);
                    break;
                }
            }
        }
        if (!r->qflag) {
            if (r->vflag) {
                dump_buffer(r->v.buf, r->offset, size);
            }
            print_report(r->is_write ? "wrote" : "read",
                         seconds_between(r->t1, t2), r->offset,
                         (int64_t)size, (int64_t)size, 1, r->Cflag);
        }
    }
    out_end();
    return NULL;
}

static void aio_join_oldest(void)
{
    aio_req *r = io.aio_head;

    bool held = wait_begin();

    pthread_join(r->thread, NULL);
    wait_end(held);
    io.aio_head = r->next;
    if (!io.aio_head) {
        io.aio_tail = NULL;
    }
    io.aio_count--;
    iovbuf_free(&r->v);
    free(r);
}

/* Waits for every outstanding aio request (qemu-io's blk_drain_all). */
static void aio_drain(void)
{
    while (io.aio_head) {
        aio_join_oldest();
    }
}

static int aio_submit(aio_req *r)
{
    int ret;

    if (io.aio_count >= MAX_AIO) {
        aio_join_oldest();
    }
    r->t1 = now();
    ret = pthread_create(&r->thread, NULL, aio_worker, r);
    if (ret != 0) {
        /* Out of threads: run it inline rather than fail. */
        bool held = wait_begin();
        aio_worker(r);
        wait_end(held);
        iovbuf_free(&r->v);
        free(r);
        return 0;
    }
    if (io.aio_tail) {
        io.aio_tail->next = r;
    } else {
        io.aio_head = r;
    }
    io.aio_tail = r;
    io.aio_count++;
    return 0;
}

static int aio_read_f(int argc, char **argv)
{
    aio_req *r = calloc(1, sizeof(*r));
    int c, ret;

    if (!r) {
        return -ENOMEM;
    }
    while ((c = getopt(argc, argv, "CP:iqv")) != -1) {
        switch (c) {
        case 'C':
            r->Cflag = true;
            break;
        case 'P':
            r->Pflag = true;
            r->pattern = parse_pattern(optarg);
            if (r->pattern < 0) {
                free(r);
                return -EINVAL;
            }
            break;
        case 'i':
            printf("injecting invalid read request\n");
            free(r);
            return 0;
        case 'q':
            r->qflag = true;
            break;
        case 'v':
            r->vflag = true;
            break;
        default:
            free(r);
            return usage_of("aio_read");
        }
    }
    if (optind > argc - 2) {
        free(r);
        return usage_of("aio_read");
    }
    if ((ret = parse_offset(argv[optind], &r->offset)) < 0) {
        free(r);
        return ret;
    }
    optind++;
    ret = iovbuf_create(&r->v, &argv[optind], argc - optind, 0xab);
    if (ret < 0) {
        free(r);
        return ret;
    }
    return aio_submit(r);
}

static int aio_write_f(int argc, char **argv)
{
    aio_req *r = calloc(1, sizeof(*r));
    int c, ret, pattern = 0xcd;

    if (!r) {
        return -ENOMEM;
    }
    r->is_write = true;
    while ((c = getopt(argc, argv, "CfiqP:uz")) != -1) {
        switch (c) {
        case 'C':
            r->Cflag = true;
            break;
        case 'f':
            r->flags |= VD_REQ_FUA;
            break;
        case 'q':
            r->qflag = true;
            break;
        case 'u':
            r->flags |= VD_REQ_MAY_UNMAP;
            break;
        case 'P':
            r->Pflag = true;
            pattern = parse_pattern(optarg);
            if (pattern < 0) {
                free(r);
                return -EINVAL;
            }
            break;
        case 'i':
            printf("injecting invalid write request\n");
            free(r);
            return 0;
        case 'z':
            r->zflag = true;
            break;
        default:
            free(r);
            return usage_of("aio_write");
        }
    }
    ret = -EINVAL;
    if (optind > argc - 2) {
        free(r);
        return usage_of("aio_write");
    }
    if (r->zflag && optind != argc - 2) {
        printf("-z supports only a single length parameter\n");
        goto fail;
    }
    if ((r->flags & VD_REQ_MAY_UNMAP) && !r->zflag) {
        printf("-u requires -z to be specified\n");
        goto fail;
    }
    /* qemu-io 7.2 means to refuse -z with -P here but tests a flag its
     * aio_write never sets, so -P is silently ignored with -z; so here.
     * The pattern only fills the buffer: a write has nothing to verify. */
    r->Pflag = false;
    if ((ret = parse_offset(argv[optind], &r->offset)) < 0) {
        goto fail;
    }
    optind++;
    if (r->zflag) {
        int64_t count = cvtnum(argv[optind]);
        if (count < 0) {
            print_cvtnum_err(count, argv[optind]);
            ret = (int)count;
            goto fail;
        }
        r->zero_len = (uint64_t)count;
    } else {
        ret = iovbuf_create(&r->v, &argv[optind], argc - optind, pattern);
        if (ret < 0) {
            goto fail;
        }
    }
    return aio_submit(r);
fail:
    free(r);
    return ret;
}

static int aio_flush_f(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    aio_drain();
    return 0;
}

/* ------------------------------------------------------------------ */
/* flush, truncate, length, info, discard, alloc, map                 */
/* ------------------------------------------------------------------ */

static int flush_f(int argc, char **argv)
{
    bool held;
    vd_error err = VD_ERROR_INIT;
    int ret;

    (void)argc;
    (void)argv;
    held = wait_begin();
    ret = vd_flush(io.node, &err);
    wait_end(held);
    if (ret < 0) {
        report_vd_error(&err);
    }
    return ret;
}

static int truncate_f(int argc, char **argv)
{
    static const char *const modes[] = { "off", "metadata", "falloc",
                                         "full" };
    vd_prealloc prealloc = VD_PREALLOC_OFF;
    bool held;
    vd_error err = VD_ERROR_INIT;
    int64_t offset = 0;
    int c, ret;

    while ((c = getopt(argc, argv, "m:")) != -1) {
        switch (c) {
        case 'm': {
            size_t i;
            for (i = 0; i < 4 && strcmp(optarg, modes[i]); i++) {
            }
            if (i == 4) {
                fflush(stdout);
                cli_error("Invalid preallocation mode '%s'",
                          optarg);
                return -EINVAL;
            }
            prealloc = (vd_prealloc)i;
            break;
        }
        default:
            return usage_of("truncate");
        }
    }
    if (optind != argc - 1) {
        return usage_of("truncate");
    }
    if ((ret = parse_offset(argv[optind], &offset)) < 0) {
        return ret;
    }
    /* Resizing must not race with our own requests. */
    aio_drain();
    held = wait_begin();
    ret = vd_truncate(io.node, (uint64_t)offset, true, prealloc, &err);
    wait_end(held);
    if (ret < 0) {
        fflush(stdout);
        cli_error("%s",
                  err.message[0] ? err.message : strerror(-ret));
        cli_print_hint(&err);
    }
    return ret;
}

static int length_f(int argc, char **argv)
{
    int64_t size = vd_getlength(io.node);
    char s1[64];

    (void)argc;
    (void)argv;
    if (size < 0) {
        printf("getlength: %s\n", strerror((int)-size));
        return (int)size;
    }
    cvtstr((double)size, s1, sizeof(s1));
    printf("%s\n", s1);
    return 0;
}

/* qemu's dump_qobject for the "Format specific information" block. */
static void dump_json(int indent, json_object *o);

static void dump_json_scalar(json_object *o)
{
    switch (json_object_get_type(o)) {
    case json_type_boolean:
        printf("%s", json_object_get_boolean(o) ? "true" : "false");
        break;
    case json_type_int:
        printf("%" PRId64, json_object_get_int64(o));
        break;
    case json_type_double:
        printf("%.17g", json_object_get_double(o));
        break;
    case json_type_string:
        printf("%s", json_object_get_string(o));
        break;
    default:
        printf("null");
        break;
    }
}

static bool json_composite(json_object *o)
{
    json_type t = json_object_get_type(o);
    return t == json_type_object || t == json_type_array;
}

static void dump_json(int indent, json_object *o)
{
    if (json_object_get_type(o) == json_type_object) {
        json_object_object_foreach(o, key, val) {
            bool comp = json_composite(val);
            char *k = strdup(key);
            char *p;
            if (!k) {
                return;
            }
            for (p = k; *p; p++) {
                if (*p == '-') {
                    *p = ' ';
                }
            }
            printf("%*s%s:%c", indent * 4, "", k, comp ? '\n' : ' ');
            free(k);
            if (comp) {
                dump_json(indent + 1, val);
            } else {
                dump_json_scalar(val);
                printf("\n");
            }
        }
    } else if (json_object_get_type(o) == json_type_array) {
        size_t i, n = json_object_array_length(o);
        for (i = 0; i < n; i++) {
            json_object *val = json_object_array_get_idx(o, i);
            bool comp = json_composite(val);
            printf("%*s[%zu]:%c", indent * 4, "", i, comp ? '\n' : ' ');
            if (comp) {
                dump_json(indent + 1, val);
            } else {
                dump_json_scalar(val);
                printf("\n");
            }
        }
    } else {
        dump_json_scalar(o);
    }
}

static int info_f(int argc, char **argv)
{
    const char *fmt = vd_node_format(io.node);
    vd_image_info *info = NULL;
    json_object *spec = NULL, *data = NULL;
    vd_error err = VD_ERROR_INIT;
    char s1[64], s2[64];
    int ret;

    (void)argc;
    (void)argv;
    printf("format name: %s\n", fmt);
    /* Protocol drivers have a protocol name too, which qemu-io prints. */
    if (vd_driver_features(fmt) & VD_DRIVER_PROTOCOL) {
        printf("format name: %s\n", fmt);
    }
    ret = vd_get_info(io.node, &info, &err);
    if (ret < 0) {
        report_vd_error(&err);
        return ret;
    }
    if (info->format_specific_json) {
        spec = json_tokener_parse(info->format_specific_json);
        if (spec && !json_object_object_get_ex(spec, "data", &data)) {
            data = NULL;
        }
    }
    cvtstr((double)info->cluster_size, s1, sizeof(s1));
    cvtstr((double)info->vm_state_offset, s2, sizeof(s2));
    printf("cluster size: %s\n", s1);
    printf("vm state offset: %s\n", s2);
    if (data) {
        printf("Format specific information:\n");
        dump_json(1, data);
    }
    json_object_put(spec);
    vd_image_info_free(&info);
    return 0;
}

static int discard_f(int argc, char **argv)
{
    bool held;
    bool Cflag = false, qflag = false;
    int64_t offset = 0, bytes = 0;
    struct timespec t1, t2;
    vd_error err = VD_ERROR_INIT;
    int c, ret;

    while ((c = getopt(argc, argv, "Cq")) != -1) {
        switch (c) {
        case 'C':
            Cflag = true;
            break;
        case 'q':
            qflag = true;
            break;
        default:
            return usage_of("discard");
        }
    }
    if (optind != argc - 2) {
        return usage_of("discard");
    }
    if ((ret = parse_offset(argv[optind], &offset)) < 0 ||
        (ret = parse_len(argv[optind + 1], &bytes)) < 0) {
        return ret;
    }
    held = wait_begin();
    t1 = now();
    ret = check_range(offset, bytes);
    /* As QEMU's bdrv_co_pdiscard(): with discard=ignore (-d, open -d,
     * reopen -o discard=) a discard in range succeeds and does nothing. */
    if (ret == 0 && vd_node_discard_unmap(io.node)) {
        ret = vd_discard(io.node, (uint64_t)bytes, (uint64_t)offset, &err);
    }
    t2 = now();
    wait_end(held);
    if (ret < 0) {
        printf("discard failed: %s\n", strerror(-ret));
        report_vd_error(&err);
    } else if (!qflag) {
        print_report("discard", seconds_between(t1, t2), offset, bytes, bytes,
                     1, Cflag);
    }
    return ret;
}

/*
 * qemu's bdrv_is_allocated(): whether the node itself (not its backing
 * chain) holds [offset, offset+bytes), and for how many bytes that
 * answer holds. Past the end it answers 0 bytes.
 */
static int is_allocated(int64_t offset, int64_t bytes, int64_t *pnum)
{
    int64_t len = vd_getlength(io.node);
    vd_extent ext;
    int ret;

    if (len < 0) {
        return (int)len;
    }
    if (offset >= len || bytes <= 0) {
        *pnum = 0;
        return 0;
    }
    if (bytes > len - offset) {
        bytes = len - offset;
    }
    ret = vd_block_status(io.node, (uint64_t)offset, (uint64_t)bytes, &ext,
                          NULL);
    if (ret < 0) {
        return ret;
    }
    *pnum = ext.length > (uint64_t)bytes ? bytes : (int64_t)ext.length;
    return (ext.flags & VD_BLOCK_ALLOCATED) && ext.depth == 0;
}

static int alloc_f(int argc, char **argv)
{
    int64_t offset = 0, start, remaining, count = 0, num = 0, sum_alloc = 0;
    char s1[64];
    int ret;

    if ((ret = parse_offset(argv[1], &offset)) < 0) {
        return ret;
    }
    start = offset;
    count = SECTOR_SIZE;
    if (argc == 3 && (ret = parse_offset(argv[2], &count)) < 0) {
        return ret;
    }
    remaining = count;
    while (remaining) {
        ret = is_allocated(offset, remaining, &num);
        if (ret < 0) {
            printf("is_allocated failed: %s\n", strerror(-ret));
            return ret;
        }
        offset += num;
        remaining -= num;
        if (ret) {
            sum_alloc += num;
        }
        if (num == 0) {
            count -= remaining;
            remaining = 0;
        }
    }
    cvtstr((double)start, s1, sizeof(s1));
    printf("%" PRId64 "/%" PRId64 " bytes allocated at offset %s\n",
           sum_alloc, count, s1);
    return 0;
}

static int map_f(int argc, char **argv)
{
    int64_t offset = 0, bytes = vd_getlength(io.node);
    char s1[64], s2[64];

    (void)argc;
    (void)argv;
    if (bytes < 0) {
        fflush(stdout);
        cli_error("Failed to query image length: %s",
                  strerror((int)-bytes));
        return (int)bytes;
    }
    while (bytes) {
        int64_t num = 0, n = 0;
        int ret = is_allocated(offset, bytes, &num), r2 = ret;

        if (ret < 0) {
            fflush(stdout);
            cli_error("Failed to get allocation status: %s",
                      strerror(-ret));
            return ret;
        }
        /* Merge following extents with the same answer. */
        while (num > 0 && num < bytes) {
            r2 = is_allocated(offset + num, bytes - num, &n);
            if (r2 != ret || n == 0) {
                break;
            }
            num += n;
        }
        if (!num) {
            fflush(stdout);
            cli_error("Unexpected end of image");
            return -EIO;
        }
        cvtstr((double)num, s1, sizeof(s1));
        cvtstr((double)offset, s2, sizeof(s2));
        printf("%s (0x%" PRIx64 ") bytes %s at offset %s (0x%" PRIx64 ")\n",
               s1, (uint64_t)num, ret ? "    allocated" : "not allocated",
               s2, (uint64_t)offset);
        offset += num;
        bytes -= num;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* randrw: vdisk's many-requests-in-flight stress command             */
/* ------------------------------------------------------------------ */

/*
 * Each of J threads owns the blocks whose index is congruent to its
 * number modulo J, so no two threads touch the same block and every
 * block's content is known: generation g of block b is a byte stream
 * derived from (seed, b, g). A thread draws its operations from its own
 * PRNG seeded by (seed, thread), so the final image content depends only
 * on the arguments, not on scheduling: two images driven with the same
 * arguments must end up identical. Reads of blocks the run has written
 * are verified at once; at the end every written block is read back.
 */

typedef struct randrw_ctx {
    int64_t off;
    uint64_t bs, nblocks;
    uint64_t seed;
    int threads;
    unsigned write_pct;
    uint64_t count;
    uint32_t *gen;             /* per block; 0 = not written by this run */
    atomic_uint_fast64_t reads, writes, mismatches, errors, bytes;
    atomic_int first_err;
} randrw_ctx;

typedef struct randrw_thread {
    randrw_ctx *ctx;
    int id;
    uint64_t ops;
    pthread_t thread;
} randrw_thread;

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void randrw_fill(const randrw_ctx *c, uint64_t block, uint32_t gen,
                        uint8_t *buf)
{
    uint64_t s = c->seed * 0x100000001b3ull ^ block * 0x9e3779b97f4a7c15ull ^
                 (uint64_t)gen << 40;
    uint64_t i;

    for (i = 0; i + 8 <= c->bs; i += 8) {
        uint64_t w = splitmix64(&s);
        memcpy(buf + i, &w, 8);
    }
    if (i < c->bs) {
        uint64_t w = splitmix64(&s);
        memcpy(buf + i, &w, c->bs - i);
    }
}

static void randrw_fail(randrw_ctx *c, int err)
{
    int zero = 0;
    atomic_compare_exchange_strong(&c->first_err, &zero, err);
}

static void randrw_verify(randrw_ctx *c, uint64_t block, const uint8_t *buf,
                          uint8_t *expect)
{
    uint32_t g = c->gen[block];

    if (g == 0) {
        return;
    }
    randrw_fill(c, block, g, expect);
    if (memcmp(buf, expect, c->bs)) {
        atomic_fetch_add(&c->mismatches, 1);
        out_begin();
        printf("randrw: block %" PRIu64 " at offset %" PRIu64
               " does not hold generation %" PRIu32 "\n", block,
               (uint64_t)c->off + block * c->bs, g);
        out_end();
    }
}

static void *randrw_worker(void *opaque)
{
    randrw_thread *t = opaque;
    randrw_ctx *c = t->ctx;
    uint64_t rng = c->seed ^ ((uint64_t)t->id + 1) * 0xd1b54a32d192ed03ull;
    uint64_t mine = (c->nblocks - (uint64_t)t->id + (uint64_t)c->threads - 1) /
                    (uint64_t)c->threads;
    uint8_t *buf = alloc_buf(c->bs, 0), *expect = alloc_buf(c->bs, 0);
    uint64_t i;

    if (!buf || !expect || mine == 0) {
        if (mine) {
            randrw_fail(c, -ENOMEM);
        }
        free(buf);
        free(expect);
        return NULL;
    }
    for (i = 0; i < t->ops; i++) {
        uint64_t block = (splitmix64(&rng) % mine) * (uint64_t)c->threads +
                         (uint64_t)t->id;
        bool write = splitmix64(&rng) % 100 < c->write_pct;
        uint64_t pos = (uint64_t)c->off + block * c->bs;
        vd_error err = VD_ERROR_INIT;
        int ret;

        if (write) {
            randrw_fill(c, block, c->gen[block] + 1, buf);
            ret = vd_pwrite(io.node, buf, c->bs, pos, 0, &err);
            if (ret == 0) {
                c->gen[block]++;
                atomic_fetch_add(&c->writes, 1);
            }
        } else {
            ret = vd_pread(io.node, buf, c->bs, pos, 0, &err);
            if (ret == 0) {
                atomic_fetch_add(&c->reads, 1);
                randrw_verify(c, block, buf, expect);
            }
        }
        if (ret < 0) {
            atomic_fetch_add(&c->errors, 1);
            randrw_fail(c, ret);
            out_begin();
            printf("randrw: %s at offset %" PRIu64 " failed: %s\n",
                   write ? "write" : "read", pos, strerror(-ret));
            fflush(stdout);
            report_vd_error(&err);
            out_end();
            break;
        }
        atomic_fetch_add(&c->bytes, c->bs);
    }
    free(buf);
    free(expect);
    return NULL;
}

static int randrw_f(int argc, char **argv)
{
    bool held;
    randrw_ctx c;
    randrw_thread *th;
    int64_t off, len, v;
    uint64_t i, written = 0;
    uint8_t *buf = NULL, *expect = NULL;
    struct timespec t1, t2;
    bool qflag = false;
    int k, opt, ret;
    char *end;

    memset(&c, 0, sizeof(c));
    c.seed = 1;
    c.count = 1000;
    c.threads = 4;
    c.bs = 4096;
    c.write_pct = 50;
    while ((opt = getopt(argc, argv, "b:j:n:qs:w:")) != -1) {
        switch (opt) {
        case 'b':
            v = cvtnum(optarg);
            if (v <= 0 || v > (16 << 20)) {
                printf("block size must be between 1 and 16M -- %s\n", optarg);
                return -EINVAL;
            }
            c.bs = (uint64_t)v;
            break;
        case 'j':
            v = strtol(optarg, &end, 10);
            if (*end || v < 1 || v > 64) {
                printf("thread count must be between 1 and 64 -- %s\n",
                       optarg);
                return -EINVAL;
            }
            c.threads = (int)v;
            break;
        case 'n':
            v = cvtnum(optarg);
            if (v < 0) {
                print_cvtnum_err(v, optarg);
                return (int)v;
            }
            c.count = (uint64_t)v;
            break;
        case 'q':
            qflag = true;
            break;
        case 's':
            errno = 0;
            c.seed = strtoull(optarg, &end, 0);
            if (*end || errno) {
                printf("%s is not a valid seed\n", optarg);
                return -EINVAL;
            }
            break;
        case 'w':
            v = strtol(optarg, &end, 10);
            if (*end || v < 0 || v > 100) {
                printf("write percentage must be between 0 and 100 -- %s\n",
                       optarg);
                return -EINVAL;
            }
            c.write_pct = (unsigned)v;
            break;
        default:
            return usage_of("randrw");
        }
    }
    if (optind != argc - 2) {
        return usage_of("randrw");
    }
    if ((ret = parse_offset(argv[optind], &off)) < 0 ||
        (ret = parse_offset(argv[optind + 1], &len)) < 0) {
        return ret;
    }
    c.off = off;
    c.nblocks = (uint64_t)len / c.bs;
    if (c.nblocks == 0) {
        printf("randrw: range holds no whole block\n");
        return -EINVAL;
    }
    if (c.nblocks > (1u << 24)) {
        printf("randrw: range holds more than 16M blocks\n");
        return -EINVAL;
    }
    if ((ret = check_range(off, (int64_t)(c.nblocks * c.bs))) < 0) {
        printf("randrw failed: %s\n", strerror(-ret));
        return ret;
    }
    c.gen = calloc(c.nblocks, sizeof(*c.gen));
    th = calloc((size_t)c.threads, sizeof(*th));
    if (!c.gen || !th) {
        free(c.gen);
        free(th);
        return -ENOMEM;
    }
    aio_drain();

    held = wait_begin();
    t1 = now();
    for (k = 0; k < c.threads; k++) {
        th[k].ctx = &c;
        th[k].id = k;
        th[k].ops = c.count / (uint64_t)c.threads +
                    ((uint64_t)k < c.count % (uint64_t)c.threads);
        if (pthread_create(&th[k].thread, NULL, randrw_worker, &th[k])) {
            randrw_worker(&th[k]);
            th[k].ctx = NULL; /* already ran; nothing to join */
        }
    }
    for (k = 0; k < c.threads; k++) {
        if (th[k].ctx) {
            pthread_join(th[k].thread, NULL);
        }
    }
    t2 = now();

    /* Read every block this run wrote and check its last generation. */
    buf = alloc_buf(c.bs, 0);
    expect = alloc_buf(c.bs, 0);
    for (i = 0; buf && expect && i < c.nblocks; i++) {
        vd_error err = VD_ERROR_INIT;
        if (!c.gen[i]) {
            continue;
        }
        written++;
        ret = vd_pread(io.node, buf, c.bs, (uint64_t)off + i * c.bs, 0, &err);
        if (ret < 0) {
            printf("randrw: read back at offset %" PRIu64 " failed: %s\n",
                   (uint64_t)off + i * c.bs, strerror(-ret));
            report_vd_error(&err);
            randrw_fail(&c, ret);
            atomic_fetch_add(&c.errors, 1);
            break;
        }
        randrw_verify(&c, i, buf, expect);
    }
    if (!buf || !expect) {
        randrw_fail(&c, -ENOMEM);
    }
    wait_end(held);

    printf("randrw: %" PRIu64 " reads, %" PRIu64 " writes, %d threads, "
           "block size %" PRIu64 "\n", (uint64_t)atomic_load(&c.reads),
           (uint64_t)atomic_load(&c.writes), c.threads, c.bs);
    printf("randrw: verified %" PRIu64 " written blocks, %" PRIu64
           " mismatches, %" PRIu64 " errors\n", written,
           (uint64_t)atomic_load(&c.mismatches),
           (uint64_t)atomic_load(&c.errors));
    if (!qflag) {
        char s1[64], s2[64], ts[64];
        double secs = seconds_between(t1, t2);
        uint64_t n = atomic_load(&c.reads) + atomic_load(&c.writes);
        cvtstr((double)atomic_load(&c.bytes), s1, sizeof(s1));
        cvtstr((double)atomic_load(&c.bytes) / secs, s2, sizeof(s2));
        timestr(secs, ts, sizeof(ts), false);
        printf("%s, %" PRIu64 " ops; %s (%s/sec and %.4f ops/sec)\n",
               s1, n, ts, s2, (double)n / secs);
    }

    ret = atomic_load(&c.first_err);
    if (ret == 0 && atomic_load(&c.mismatches)) {
        ret = -EIO;
    }
    free(buf);
    free(expect);
    free(c.gen);
    free(th);
    return ret;
}

/* ------------------------------------------------------------------ */
/* Opening, closing and the small commands                            */
/* ------------------------------------------------------------------ */

typedef struct open_args {
    const char *format;
    const char *cache;
    const char *aio;
    const char *discard;
    bool readonly, force_share, image_opts;
    bool copy_on_read;    /* -C: reads fill the top image from its backing */
    bool snapshot;        /* -s: writes go to a temporary overlay */
    vd_opts *opts;        /* -o options, may be NULL */
} open_args;

static bool valid_cache_mode(const char *mode)
{
    static const char *const modes[] = {
        "none", "off", "writeback", "unsafe", "directsync", "writethrough",
    };
    size_t i;

    for (i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
        if (!strcmp(mode, modes[i])) {
            return true;
        }
    }
    return false;
}

/* qemu-io opens every image with BDRV_O_UNMAP: discards and zero writes
 * with -u may free clusters and punch holes, unless -d says otherwise. */
static int set_default_discard(vd_opts *opts)
{
    if (vd_opts_get(opts, "discard")) {
        return 0;
    }
    return vd_opts_set(opts, "discard", "unmap");
}

/* -d (discard) and -i (aio) of qemu-io and of its open command: whether
 * the mode is one qemu takes; if not, prints qemu-io's message. */
static bool check_mode_option(int c, const char *mode)
{
    if (c == 'd' ? cli_discard_mode_valid(mode) : cli_aio_mode_valid(mode)) {
        return true;
    }
    fflush(stdout);
    cli_error("Invalid %s option: %s", c == 'd' ? "discard" : "aio", mode);
    return false;
}

/* The options of -s's temporary overlay itself; the others (the
 * driver's, the file's) belong to the image under it. */
static const char *const overlay_keys[] = {
    "cache", "aio", "discard", "detect-zeroes", "copy-on-read", NULL,
};

/*
 * -s, as qemu-io's BDRV_O_SNAPSHOT: the image is opened read-only and a
 * temporary qcow2 overlay of the same length, made in $TMPDIR (else
 * /var/tmp) as QEMU names it ("vl.XXXXXX"), is put on top with the image
 * as its backing node, so every write lands in the overlay and is lost
 * when the image is closed. The image is never written. Sets io.node.
 */
static int open_temp_overlay(const char *filename, const char *format,
                             vd_opts *opts, unsigned flags, vd_error *err)
{
    const char *tmpdir = getenv("TMPDIR");
    vd_opts *oopts = vd_opts_new(), *copts = vd_opts_new();
    vd_node *base = NULL;
    char *path = NULL, size[32];
    int fd, ret;

    if (!oopts || !copts) {
        ret = vd_error_set(err, -ENOMEM, "Out of memory");
        goto out;
    }
    for (size_t i = 0; overlay_keys[i]; i++) {
        const char *v = vd_opts_get(opts, overlay_keys[i]);
        if (v && (ret = vd_opts_set(oopts, overlay_keys[i], v)) < 0) {
            goto out;
        }
    }
    /* The image below is read, never written (copy-on-read fills the
     * overlay), whatever -o read-only says. */
    vd_opts_del(opts, "copy-on-read");
    vd_opts_del(opts, "read-only");
    ret = vd_open(&base, filename, format, opts, flags & ~VD_O_RDWR, err);
    if (ret < 0) {
        goto out;
    }
    if (asprintf(&path, "%s/vl.XXXXXX", tmpdir && *tmpdir ? tmpdir
                                                         : "/var/tmp") < 0) {
        path = NULL;
        ret = vd_error_set(err, -ENOMEM, "Out of memory");
        goto out;
    }
    fd = mkstemp(path);
    if (fd < 0) {
        ret = vd_error_set_errno(err, -errno, "Could not get temporary "
                                 "filename");
        free(path);
        path = NULL;
        goto out;
    }
    close(fd);
    snprintf(size, sizeof(size), "%" PRId64, vd_getlength(base));
    ret = vd_opts_set(copts, "size", size);
    if (ret == 0) {
        ret = vd_create(path, "qcow2", copts, err);
    }
    if (ret == 0) {
        ret = vd_opts_set(oopts, "backing", vd_node_name(base));
    }
    if (ret == 0) {
        ret = vd_open(&io.node, path, "qcow2", oopts,
                      (flags & VD_O_RDWR) ? flags & ~VD_O_FORCE_SHARE : flags,
                      err);
    }
    /* As QEMU's BDRV_O_TEMPORARY: the name goes at once, so nothing is
     * left behind however the program ends (a reopen, which opens the
     * file again by name, then fails as QEMU's does). */
    unlink(path);
out:
    /* The overlay holds the image now; this handle is no longer needed. */
    vd_close(&base, NULL);
    free(path);
    vd_opts_free(&oopts);
    vd_opts_free(&copts);
    return ret;
}

/* Opens @name into io.node; prints qemu-io's message on failure. */
static int open_image(const char *name, const open_args *a)
{
    vd_opts *opts = a->opts ? vd_opts_clone(a->opts) : vd_opts_new();
    vd_error err = VD_ERROR_INIT;
    const char *filename = name, *format = a->format;
    unsigned flags = a->readonly ? 0 : VD_O_RDWR;
    int ret;

    if (!opts) {
        return -ENOMEM;
    }
    if (a->force_share) {
        flags |= VD_O_FORCE_SHARE;
    }
    if (a->cache && (ret = vd_opts_set(opts, "cache",
                                       strcmp(a->cache, "off") ? a->cache :
                                       "none")) < 0) {
        goto out;
    }
    if (a->aio && (ret = vd_opts_set(opts, "aio", a->aio)) < 0) {
        goto out;
    }
    if (a->discard && (ret = vd_opts_set(opts, "discard", a->discard)) < 0) {
        goto out;
    }
    if (a->copy_on_read &&
        (ret = vd_opts_set(opts, "copy-on-read", "on")) < 0) {
        goto out;
    }
    if (name && !a->image_opts && vd_opts_get(opts, "file.filename")) {
        /* As QEMU: the path names the protocol file too. */
        ret = vd_error_set(&err, -EINVAL, "Can't specify 'file' and "
                           "'filename' options at the same time");
        goto fail;
    }
    if (a->image_opts) {
        /* The whole of @name is options, as blockdev-add takes them. */
        vd_opts *all;
        if (a->format) {
            fflush(stdout);
            cli_error("--image-opts and -f are mutually exclusive");
            ret = -EINVAL;
            goto out;
        }
        fflush(stdout);
        all = cli_parse_image_opts(name, opts);
        if (!all) {
            ret = -EINVAL;
            goto out;
        }
        vd_opts_free(&opts);
        opts = all;
        filename = NULL;
    }
    ret = set_default_discard(opts);
    if (ret == 0 && a->snapshot) {
        ret = open_temp_overlay(filename, format, opts, flags, &err);
    } else if (ret == 0) {
        ret = vd_open(&io.node, filename, format, opts, flags, &err);
    }
    if (ret < 0) {
        goto fail;
    }
    goto out;
fail:
    fflush(stdout);
    /* As qemu-io: an option string is no device name. */
    cli_error("can't open%s%s: %s", a->image_opts || !name ? "" : " device ",
              a->image_opts || !name ? "" : name,
              err.message[0] ? err.message : strerror(-ret));
    cli_print_hint(&err);
out:
    vd_opts_free(&opts);
    return ret;
}

static int close_image(void)
{
    bool held;
    vd_error err = VD_ERROR_INIT;
    int ret;

    aio_drain();
    held = wait_begin();
    ret = vd_close(&io.node, &err);
    wait_end(held);
    if (ret < 0) {
        report_vd_error(&err);
    }
    return ret;
}

static int open_f(int argc, char **argv)
{
    open_args a;
    vd_error err = VD_ERROR_INIT;
    int c, ret;

    memset(&a, 0, sizeof(a));
    while ((c = getopt(argc, argv, "snCro:kt:d:i:U")) != -1) {
        switch (c) {
        case 'C':
            a.copy_on_read = true;
            break;
        case 's':
            a.snapshot = true;
            break;
        case 'k':
            a.aio = "native";
            break;
        case 'n':
            a.cache = "none";
            break;
        case 'r':
            a.readonly = true;
            break;
        case 'o':
            if (!a.opts && !(a.opts = vd_opts_new())) {
                return -ENOMEM;
            }
            if ((ret = vd_opts_parse(a.opts, optarg, NULL, &err)) < 0) {
                fflush(stdout);
                cli_error("%s", err.message);
                vd_opts_free(&a.opts);
                return ret;
            }
            break;
        case 't':
            if (!valid_cache_mode(optarg)) {
                fflush(stdout);
                cli_error("Invalid cache option: %s", optarg);
                vd_opts_free(&a.opts);
                return -EINVAL;
            }
            a.cache = optarg;
            break;
        case 'd':
        case 'i':
            /* Checked as parsed, in qemu-io's words. */
            if (!check_mode_option(c, optarg)) {
                vd_opts_free(&a.opts);
                return -EINVAL;
            }
            *(c == 'd' ? &a.discard : &a.aio) = optarg;
            break;
        case 'U':
            a.force_share = true;
            break;
        default:
            vd_opts_free(&a.opts);
            return usage_of("open");
        }
    }
    if (io.node) {
        fflush(stdout);
        cli_error("file open already, try 'help close'");
        vd_opts_free(&a.opts);
        return -EBUSY;
    }
    /* No path: the options name the image (open -o driver=qcow2,
     * file.filename=x), as qemu-io's open takes them. */
    if (optind < argc - 1) {
        vd_opts_free(&a.opts);
        return usage_of("open");
    }
    ret = open_image(optind == argc - 1 ? argv[optind] : NULL, &a);
    vd_opts_free(&a.opts);
    return ret;
}

/*
 * reopen, as qemu-io's: -r/-w switch the mode, -c the cache mode, -o the
 * driver's options (the others keep their values). Going read-only, the
 * program gives up writing first (as qemu-io drops its BlockBackend's
 * write permission), so only another writer can keep the node writable.
 * Going read-write takes the image's write lock, and fails with QEMU's
 * lock message when another process has the image open.
 */
static int reopen_f(int argc, char **argv)
{
    vd_opts *o = vd_opts_new();
    vd_error err = VD_ERROR_INIT;
    const char *cache = NULL;
    bool has_rw = false, rw = !vd_node_is_read_only(io.node), held;
    unsigned perm = 0, shared = 0;
    int c, ret = -EINVAL;

    if (!o) {
        return -ENOMEM;
    }
    while ((c = getopt(argc, argv, "c:o:rw")) != -1) {
        switch (c) {
        case 'c':
            if (!valid_cache_mode(optarg)) {
                fflush(stdout);
                cli_error("Invalid cache option: %s", optarg);
                goto out;
            }
            cache = strcmp(optarg, "off") ? optarg : "none";
            break;
        case 'o':
            if (vd_opts_parse(o, optarg, NULL, &err) < 0) {
                fflush(stdout);
                cli_error("%s", err.message);
                goto out;
            }
            break;
        case 'r':
        case 'w':
            if (has_rw) {
                fflush(stdout);
                cli_error("Only one -r/-w option may be given");
                goto out;
            }
            rw = c == 'w';
            has_rw = true;
            break;
        default:
            ret = usage_of("reopen");
            goto out;
        }
    }
    if (optind != argc) {
        ret = usage_of("reopen");
        goto out;
    }
    if (vd_opts_get(o, "read-only")) {
        if (has_rw) {
            fflush(stdout);
            cli_error("Cannot set both -r/-w and 'read-only'");
            goto out;
        }
    } else if ((ret = vd_opts_set(o, "read-only", rw ? "off" : "on")) < 0) {
        goto out;
    }
    if (cache) {
        if (vd_opts_get(o, "cache.direct") || vd_opts_get(o, "cache.no-flush")) {
            fflush(stdout);
            cli_error("Cannot set both -c and the cache options");
            ret = -EINVAL;
            goto out;
        }
        if ((ret = vd_opts_set(o, "cache", cache)) < 0) {
            goto out;
        }
    }
    aio_drain();
    vd_node_get_perm(io.node, &perm, &shared);
    if (!rw) {
        vd_set_perm(io.node, perm & ~(VD_PERM_WRITE | VD_PERM_WRITE_UNCHANGED),
                    shared, NULL);
    }
    held = wait_begin();
    ret = vd_reopen_opts(io.node, o, &err);
    wait_end(held);
    if (ret < 0) {
        /* Whatever failed, the image stays as it was, and so does what
         * the program may do with it. */
        vd_set_perm(io.node, perm, shared, NULL);
        report_vd_error(&err);
        cli_print_hint(&err);
    }
out:
    vd_opts_free(&o);
    return ret;
}

static int close_f(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    return close_image();
}

static int quit_f(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    io.quit = true;
    return 0;
}

static int sleep_f(int argc, char **argv)
{
    char *end;
    long ms = strtol(argv[1], &end, 0);
    struct timespec ts;
    bool held;

    (void)argc;
    if (ms < 0 || *end != '\0') {
        printf("%s is not a valid number\n", argv[1]);
        return -EINVAL;
    }
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    fflush(stdout);
    held = wait_begin();
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
    wait_end(held);
    return 0;
}

static int abort_f(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    abort();
}

static int sigraise_f(int argc, char **argv)
{
    int64_t sig = cvtnum(argv[1]);

    (void)argc;
    if (sig < 0) {
        print_cvtnum_err(sig, argv[1]);
        return (int)sig;
    }
    if (sig > NSIG) {
        printf("signal argument '%s' is too large to be a valid signal\n",
               argv[1]);
        return -EINVAL;
    }
    fflush(stdout);
    fflush(stderr);
    raise((int)sig);
    return 0;
}

/* ------------------------------------------------------------------ */
/* break, remove_break, resume, wait_break (blkdebug)                 */
/* ------------------------------------------------------------------ */

/*
 * blkdebug's lines ("blkdebug: Suspended request 'A'", "... Resuming
 * ..."), on stdout as qemu-io prints them: from the request's worker
 * thread when it stops, from the main thread when a command resumes it.
 * The main thread lets go of out_lock around the library calls below, so
 * a worker stopping at a breakpoint (holding blkdebug's lock while it
 * prints) never waits for the main thread while the main thread waits
 * for blkdebug's lock.
 */
static pthread_t main_thread;

static void debug_message(const char *msg, void *opaque)
{
    bool mine = pthread_equal(pthread_self(), main_thread) && main_holds_out;

    (void)opaque;
    if (!mine) {
        out_begin();
    }
    printf("%s\n", msg);
    if (!mine) {
        out_end();
    }
}

/* qemu-io's messages: strerror() of the library's errno, on stdout. */
static int break_f(int argc, char **argv)
{
    bool held = wait_begin();
    int ret = vd_debug_breakpoint(io.node, argv[1], argv[2]);

    wait_end(held);
    (void)argc;
    if (ret < 0) {
        printf("Could not set breakpoint: %s\n", strerror(-ret));
    }
    return ret;
}

static int remove_break_f(int argc, char **argv)
{
    bool held = wait_begin();
    int ret = vd_debug_remove_breakpoint(io.node, argv[1]);

    wait_end(held);
    (void)argc;
    if (ret < 0) {
        printf("Could not remove breakpoint %s: %s\n", argv[1],
               strerror(-ret));
    }
    return ret;
}

static int resume_f(int argc, char **argv)
{
    bool held = wait_begin();
    int ret = vd_debug_resume(io.node, argv[1]);

    wait_end(held);
    (void)argc;
    if (ret < 0) {
        printf("Could not resume request: %s\n", strerror(-ret));
    }
    return ret;
}

/* Until a request stops at @tag. As qemu-io, it waits for as long as
 * that takes (forever if nothing ever gets there); the output lock is
 * released meanwhile so that completing requests can report. */
static int wait_break_f(int argc, char **argv)
{
    struct timespec ts = { 0, 1000000 };
    bool held;

    (void)argc;
    fflush(stdout);
    held = wait_begin();
    while (!vd_debug_is_suspended(io.node, argv[1])) {
        nanosleep(&ts, NULL);
    }
    wait_end(held);
    return 0;
}

static int help_f(int argc, char **argv);

static const cmdinfo cmdtab[] = {
    { "abort", NULL, abort_f, 0, 0, CMD_NOFILE_OK, NULL,
      "simulate a program crash using abort(3)", NULL },
    { "aio_flush", NULL, aio_flush_f, 0, 0, 0, NULL,
      "completes all outstanding aio requests", NULL },
    { "aio_read", NULL, aio_read_f, 2, -1, 0,
      "[-Ciqv] [-P pattern] off len [len..]",
      "asynchronously reads a number of bytes",
      "\n"
      " asynchronously reads a range of bytes from the given offset\n"
      "\n"
      " Example:\n"
      " 'aio_read -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes "
      "into the file\n"
      "\n"
      " Reads a segment of the currently open file, optionally dumping it "
      "to the\n"
      " standard output stream (with -v option) for subsequent inspection.\n"
      " The read is performed asynchronously and the aio_flush command must "
      "be\n"
      " used to ensure all outstanding aio requests have been completed.\n"
      " Note that due to its asynchronous nature, this command will be\n"
      " considered successful once the request is submitted, independently\n"
      " of potential I/O errors or pattern mismatches.\n"
      " -C, -- report statistics in a machine parsable format\n"
      " -P, -- use a pattern to verify read data\n"
      " -i, -- treat request as invalid, for exercising stats\n"
      " -v, -- dump buffer to standard output\n"
      " -q, -- quiet mode, do not show I/O statistics\n"
      "\n" },
    { "aio_write", NULL, aio_write_f, 2, -1, CMD_WRITE,
      "[-Cfiquz] [-P pattern] off len [len..]",
      "asynchronously writes a number of bytes",
      "\n"
      " asynchronously writes a range of bytes from the given offset source\n"
      " from multiple buffers\n"
      "\n"
      " Example:\n"
      " 'aio_write 512 1k 1k' - writes 2 kilobytes at 512 bytes into the "
      "open file\n"
      "\n"
      " Writes into a segment of the currently open file, using a buffer\n"
      " filled with a set pattern (0xcdcdcdcd).\n"
      " The write is performed asynchronously and the aio_flush command must "
      "be\n"
      " used to ensure all outstanding aio requests have been completed.\n"
      " Note that due to its asynchronous nature, this command will be\n"
      " considered successful once the request is submitted, independently\n"
      " of potential I/O errors or pattern mismatches.\n"
      " -P, -- use different pattern to fill file\n"
      " -C, -- report statistics in a machine parsable format\n"
      " -f, -- use Force Unit Access semantics\n"
      " -i, -- treat request as invalid, for exercising stats\n"
      " -q, -- quiet mode, do not show I/O statistics\n"
      " -u, -- with -z, allow unmapping\n"
      " -z, -- write zeroes using blk_aio_pwrite_zeroes\n"
      "\n" },
    { "alloc", "a", alloc_f, 1, 2, 0, "offset [count]",
      "checks if offset is allocated in the file", NULL },
    { "break", NULL, break_f, 2, 2, 0, "event tag",
      "sets a breakpoint on event and tags the stopped request as tag",
      NULL },
    { "close", "c", close_f, 0, 0, 0, NULL,
      "close the current open file", NULL },
    { "discard", "d", discard_f, 2, -1, CMD_WRITE, "[-Cq] off len",
      "discards a number of bytes at a specified offset",
      "\n"
      " discards a range of bytes from the given offset\n"
      "\n"
      " Example:\n"
      " 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file\n"
      "\n"
      " Discards a segment of the currently open file.\n"
      " -C, -- report statistics in a machine parsable format\n"
      " -q, -- quiet mode, do not show I/O statistics\n"
      "\n" },
    { "flush", "f", flush_f, 0, 0, 0, NULL,
      "flush all in-core file state to disk", NULL },
    { "help", "?", help_f, 0, 1, CMD_GLOBAL, "[command]",
      "help for one or all commands", NULL },
    { "info", "i", info_f, 0, 0, 0, NULL,
      "prints information about the current file", NULL },
    { "length", "l", length_f, 0, 0, 0, NULL,
      "gets the length of the current file", NULL },
    { "map", NULL, map_f, 0, 0, 0, "",
      "prints the allocated areas of a file", NULL },
    { "open", "o", open_f, 1, -1, CMD_NOFILE_OK,
      "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]",
      "open the file specified by path",
      "\n"
      " opens a new file in the requested mode\n"
      "\n"
      " Example:\n"
      " 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, "
      "uncached\n"
      "\n"
      " Opens a file for subsequent use by all of the other qemu-io "
      "commands.\n"
      " -r, -- open file read-only\n"
      " -s, -- use snapshot file\n"
      " -C, -- use copy-on-read\n"
      " -n, -- disable host cache, short for -t none\n"
      " -U, -- force shared permissions\n"
      " -k, -- use kernel AIO implementation (Linux only, prefer use of -i)\n"
      " -i, -- use AIO mode (threads, native or io_uring)\n"
      " -t, -- use the given cache mode for the image\n"
      " -d, -- use the given discard mode for the image\n"
      " -o, -- options to be given to the block driver\n" },
    { "quit", "q", quit_f, 0, 0, CMD_GLOBAL, NULL,
      "exit the program", NULL },
    { "randrw", NULL, randrw_f, 2, -1, CMD_WRITE,
      "[-q] [-s seed] [-n count] [-j threads] [-b bs] [-w percent] off len",
      "random reads and writes from several threads, verified (vdisk only)",
      "\n"
      " runs random whole-block reads and writes on [off, off+len)\n"
      "\n"
      " Example:\n"
      " 'randrw -j 8 -n 10000 -b 4k 0 16M' - 10000 requests from 8 threads\n"
      "\n"
      " Thread t owns the blocks whose index modulo the thread count is t,\n"
      " writes them with data derived from (seed, block, generation) and\n"
      " verifies every read of a block it has written; at the end every\n"
      " written block is read back. The final content depends only on the\n"
      " arguments, so two images driven alike must compare equal.\n"
      " Fails when any request fails or any block mismatches.\n"
      " -b, -- block size (default 4k)\n"
      " -j, -- number of threads, 1 to 64 (default 4)\n"
      " -n, -- total number of requests (default 1000)\n"
      " -q, -- do not print the timing line\n"
      " -s, -- seed (default 1)\n"
      " -w, -- percentage of writes (default 50)\n"
      "\n" },
    { "read", "r", read_f, 2, -1, 0,
      "[-abCqv] [-P pattern [-s off] [-l len]] off len",
      "reads a number of bytes at a specified offset",
      "\n"
      " reads a range of bytes from the given offset\n"
      "\n"
      " Example:\n"
      " 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the "
      "file\n"
      "\n"
      " Reads a segment of the currently open file, optionally dumping it "
      "to the\n"
      " standard output stream (with -v option) for subsequent inspection.\n"
      " -b, -- read from the VM state rather than the virtual disk\n"
      " -C, -- report statistics in a machine parsable format\n"
      " -l, -- length for pattern verification (only with -P)\n"
      " -p, -- ignored for backwards compatibility\n"
      " -P, -- use a pattern to verify read data\n"
      " -q, -- quiet mode, do not show I/O statistics\n"
      " -s, -- start offset for pattern verification (only with -P)\n"
      " -v, -- dump buffer to standard output\n"
      "\n" },
    { "readv", NULL, readv_f, 2, -1, 0, "[-Cqv] [-P pattern] off len [len..]",
      "reads a number of bytes at a specified offset",
      "\n"
      " reads a range of bytes from the given offset into multiple buffers\n"
      "\n"
      " Example:\n"
      " 'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into "
      "the file\n"
      "\n"
      " Reads a segment of the currently open file, optionally dumping it "
      "to the\n"
      " standard output stream (with -v option) for subsequent inspection.\n"
      " Uses multiple iovec buffers if more than one byte range is "
      "specified.\n"
      " -C, -- report statistics in a machine parsable format\n"
      " -P, -- use a pattern to verify read data\n"
      " -v, -- dump buffer to standard output\n"
      " -q, -- quiet mode, do not show I/O statistics\n"
      "\n" },
    { "remove_break", NULL, remove_break_f, 1, 1, 0, "tag",
      "remove a breakpoint by tag", NULL },
    { "reopen", NULL, reopen_f, 0, -1, 0,
      "[(-r|-w)] [-c cache] [-o options]",
      "reopens an image with new options",
      "\n"
      " Changes the open options of an already opened image\n"
      "\n"
      " Example:\n"
      " 'reopen -o lazy-refcounts=on' - activates lazy refcount writeback on "
      "a qcow2 image\n"
      "\n"
      " -r, -- Reopen the image read-only\n"
      " -w, -- Reopen the image read-write\n"
      " -c, -- Change the cache mode to the given value\n"
      " -o, -- Changes block driver options (cf. 'open' command)\n"
      "\n" },
    { "resume", NULL, resume_f, 1, 1, 0, "tag",
      "resumes the request tagged as tag", NULL },
    { "sigraise", NULL, sigraise_f, 1, 1, CMD_NOFILE_OK, "signal",
      "raises a signal",
      "\n"
      " raises the given signal\n"
      "\n"
      " Example:\n"
      " 'sigraise 15' - raises SIGTERM\n"
      "\n"
      " Invokes raise(signal), where \"signal\" is the mandatory integer "
      "argument\n"
      " given to sigraise.\n"
      "\n" },
    { "sleep", NULL, sleep_f, 1, 1, CMD_NOFILE_OK, NULL,
      "waits for the given value in milliseconds", NULL },
    { "truncate", "t", truncate_f, 1, 3, CMD_WRITE, "[-m prealloc_mode] off",
      "truncates the current file at the given offset", NULL },
    { "wait_break", NULL, wait_break_f, 1, 1, 0, "tag",
      "waits for the suspension of a request", NULL },
    { "write", "w", write_f, 2, -1, CMD_WRITE,
      "[-bcCfnquz] [-P pattern | -s source_file] off len",
      "writes a number of bytes at a specified offset",
      "\n"
      " writes a range of bytes from the given offset\n"
      "\n"
      " Example:\n"
      " 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file\n"
      "\n"
      " Writes into a segment of the currently open file, using a buffer\n"
      " filled with a set pattern (0xcdcdcdcd).\n"
      " -b, -- write to the VM state rather than the virtual disk\n"
      " -c, -- write compressed data with blk_write_compressed\n"
      " -f, -- use Force Unit Access semantics\n"
      " -n, -- with -z, don't allow slow fallback\n"
      " -p, -- ignored for backwards compatibility\n"
      " -P, -- use different pattern to fill file\n"
      " -s, -- use a pattern file to fill the write buffer\n"
      " -C, -- report statistics in a machine parsable format\n"
      " -q, -- quiet mode, do not show I/O statistics\n"
      " -u, -- with -z, allow unmapping\n"
      " -z, -- write zeroes using blk_co_pwrite_zeroes\n"
      "\n" },
    { "writev", NULL, writev_f, 2, -1, CMD_WRITE,
      "[-Cfq] [-P pattern] off len [len..]",
      "writes a number of bytes at a specified offset",
      "\n"
      " writes a range of bytes from the given offset source from multiple "
      "buffers\n"
      "\n"
      " Example:\n"
      " 'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open "
      "file\n"
      "\n"
      " Writes into a segment of the currently open file, using a buffer\n"
      " filled with a set pattern (0xcdcdcdcd).\n"
      " -P, -- use different pattern to fill file\n"
      " -C, -- report statistics in a machine parsable format\n"
      " -f, -- use Force Unit Access semantics\n"
      " -q, -- quiet mode, do not show I/O statistics\n"
      "\n" },
};

#define NCMDS (sizeof(cmdtab) / sizeof(cmdtab[0]))

/* randrw is vdisk io's own: qemu-io has no such command. */
static bool command_hidden(const cmdinfo *ct)
{
    return cli_as == CLI_QEMU_IO && ct->fn == randrw_f;
}

static const cmdinfo *find_command(const char *name)
{
    size_t i;

    for (i = 0; i < NCMDS; i++) {
        if (command_hidden(&cmdtab[i])) {
            continue;
        }
        if (!strcmp(cmdtab[i].name, name) ||
            (cmdtab[i].altname && !strcmp(cmdtab[i].altname, name))) {
            return &cmdtab[i];
        }
    }
    return NULL;
}

static void help_oneline(const char *name, const cmdinfo *ct)
{
    printf("%s ", name);
    if (ct->args) {
        printf("%s ", ct->args);
    }
    printf("-- %s\n", ct->oneline);
}

static int help_f(int argc, char **argv)
{
    const cmdinfo *ct;
    size_t i;

    if (argc == 1) {
        for (i = 0; i < NCMDS; i++) {
            if (!command_hidden(&cmdtab[i])) {
                help_oneline(cmdtab[i].name, &cmdtab[i]);
            }
        }
        printf("\nUse 'help commandname' for extended help.\n");
        return 0;
    }
    ct = find_command(argv[1]);
    if (!ct) {
        printf("command %s not found\n", argv[1]);
        return -EINVAL;
    }
    help_oneline(argv[1], ct);
    if (ct->help) {
        fputs(ct->help, stdout);
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Dispatch                                                           */
/* ------------------------------------------------------------------ */

/*
 * Runs one command line. Words are separated by single spaces only, as
 * qemu-io's breakline() does (no quoting, no tabs). Returns 0 or a
 * negative errno; the caller records failures for the exit status.
 */
static int run_command(const char *line)
{
    char *input = strdup(line);
    char **argv = NULL;
    int argc = 0, ret = 0;
    const cmdinfo *ct;
    char *p, *word;

    if (!input) {
        return -ENOMEM;
    }
    /* At most one word per two characters, plus the terminator. */
    argv = calloc(strlen(input) / 2 + 2, sizeof(*argv));
    if (!argv) {
        free(input);
        return -ENOMEM;
    }
    for (p = input; (word = strsep(&p, " ")) != NULL; ) {
        if (*word) {
            argv[argc++] = word;
        }
    }
    main_out_acquire();
    if (argc == 0) {
        goto out;
    }
    ct = find_command(argv[0]);
    if (!ct) {
        fflush(stdout);
        fprintf(stderr, "command \"%s\" not found\n", argv[0]);
        ret = -EINVAL;
        goto out;
    }
    if (!(ct->flags & (CMD_GLOBAL | CMD_NOFILE_OK)) && !io.node) {
        fflush(stdout);
        fprintf(stderr, "no file open, try 'help open'\n");
        ret = -EINVAL;
        goto out;
    }
    if (argc - 1 < ct->argmin ||
        (ct->argmax != -1 && argc - 1 > ct->argmax)) {
        fflush(stdout);
        if (ct->argmax == -1) {
            fprintf(stderr, "bad argument count %d to %s, expected at least "
                    "%d arguments\n", argc - 1, argv[0], ct->argmin);
        } else if (ct->argmin == ct->argmax) {
            fprintf(stderr, "bad argument count %d to %s, expected %d "
                    "arguments\n", argc - 1, argv[0], ct->argmin);
        } else {
            fprintf(stderr, "bad argument count %d to %s, expected between "
                    "%d and %d arguments\n", argc - 1, argv[0], ct->argmin,
                    ct->argmax);
        }
        ret = -EINVAL;
        goto out;
    }
    if ((ct->flags & CMD_WRITE) && io.node && vd_node_is_read_only(io.node)) {
        fflush(stdout);
        cli_error("Block node is read-only");
        ret = -EPERM;
        goto out;
    }
    optind = 0; /* glibc: full getopt reset for the command's own options */
    ret = ct->fn(argc, argv);
out:
    main_out_release();
    free(argv);
    free(input);
    return ret;
}

/* The interactive loop: prints qemu-io's prompt, runs one line at a time. */
static int command_loop_stdin(void)
{
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    int last_error = 0;

    while (!io.quit) {
        /* qemu-io prompts whether or not stdin is a terminal. */
        main_out_acquire();
        printf("qemu-io> ");
        main_out_release();
        n = getline(&line, &cap, stdin);
        if (n < 0) {
            break;
        }
        if (n > MAX_LINE) {
            cli_error("command line longer than %d bytes",
                      MAX_LINE);
            last_error = -EINVAL;
            continue;
        }
        if (n > 0 && line[n - 1] == '\n') {
            line[--n] = '\0';
        }
        int ret = run_command(line);
        if (ret < 0) {
            last_error = ret;
        }
    }
    free(line);
    return last_error;
}

/* -l: "snapshot.id=ID,snapshot.name=NAME" (either key may be left out)
 * or a bare id-or-name, as qemu-img convert -l takes it. */
static int load_snapshot(const char *param)
{
    vd_error err = VD_ERROR_INIT;
    int ret;

    if (strncmp(param, "snapshot.", 9) == 0) {
        vd_opts *o = vd_opts_new();
        ret = o ? vd_opts_parse(o, param, NULL, &err) : -ENOMEM;
        for (size_t i = 0; ret == 0 && i < vd_opts_count(o); i++) {
            const char *k, *v;
            vd_opts_nth(o, i, &k, &v);
            if (strcmp(k, "snapshot.id") && strcmp(k, "snapshot.name")) {
                ret = -EINVAL;
            }
        }
        if (ret < 0) {
            cli_error("Failed in parsing snapshot param '%s'",
                      param);
        } else {
            ret = vd_snapshot_load_tmp(io.node, vd_opts_get(o, "snapshot.id"),
                                       vd_opts_get(o, "snapshot.name"), &err);
        }
        vd_opts_free(&o);
        if (ret < 0 && !err.code) {
            return ret;
        }
    } else {
        ret = vd_snapshot_load_tmp_by_id_or_name(io.node, param, &err);
    }
    if (ret < 0) {
        cli_error("Failed to load snapshot: %s",
                  err.message[0] ? err.message : strerror(-ret));
    }
    return ret;
}

/*
 * -T/--trace, as a QEMU build with no trace backend takes it:
 * [enable=]PATTERN, events=FILE (one pattern a line, '#' comments) and
 * file=FILE (the log file, created empty as QEMU's log backend does).
 * vdisk has no trace events, so a name that is not a pattern ('*')
 * draws QEMU's "does not exist" warning and a pattern matches nothing;
 * "help" lists the (no) events and exits. Returns 0, 1 for an error
 * (after QEMU's message) or 2 for "exit 0 now".
 */
static void trace_pattern(const char *pat, const char *file, int line)
{
    if (*pat == '-') {
        pat++;     /* "-name" disables: the same check */
    }
    if (strchr(pat, '*')) {
        return;
    }
    fflush(stdout);
    if (file) {
        fprintf(stderr, "%s:%s:%d: warning: trace event '%s' does not exist\n",
                cli_prog, file, line, pat);
    } else {
        cli_warn("trace event '%s' does not exist", pat);
    }
}

static int trace_opt(const char *arg)
{
    vd_opts *o = vd_opts_new();
    vd_error err = VD_ERROR_INIT;
    const char *enable, *events, *file;
    int ret = 0;

    if (!o) {
        return 1;
    }
    if (vd_opts_parse(o, arg, "enable", &err) < 0) {
        cli_error("%s", err.message);
        ret = 1;
        goto out;
    }
    for (size_t i = 0; i < vd_opts_count(o); i++) {
        const char *k, *v;
        vd_opts_nth(o, i, &k, &v);
        if (strcmp(k, "enable") && strcmp(k, "events") && strcmp(k, "file")) {
            cli_error("Invalid parameter '%s'", k);
            ret = 1;
            goto out;
        }
    }
    enable = vd_opts_get(o, "enable");
    events = vd_opts_get(o, "events");
    file = vd_opts_get(o, "file");
    if (enable && !strcmp(enable, "help")) {
        ret = 2;    /* the list of trace events, empty */
        goto out;
    }
    if (enable) {
        trace_pattern(enable, NULL, 0);
    }
    if (events) {
        FILE *f = fopen(events, "r");
        char line[1024];
        int n = 0;
        if (!f) {
            fflush(stdout);
            fprintf(stderr, "%s:%s: %s\n", cli_prog, events, strerror(errno));
            ret = 1;
            goto out;
        }
        while (fgets(line, sizeof(line), f)) {
            size_t len = strcspn(line, "\n");
            n++;
            line[len] = '\0';
            if (len && line[0] != '#') {
                trace_pattern(line, events, n);
            }
        }
        fclose(f);
    }
    if (file) {
        FILE *f = fopen(file, "w");
        if (!f) {
            fflush(stdout);
            cli_error("Error opening logfile %s: %s", file, strerror(errno));
            ret = 1;
            goto out;
        }
        fclose(f);
    }
out:
    vd_opts_free(&o);
    return ret;
}

/*
 * The signals QEMU's main loop takes over (SIGUSR1, SIGIO, SIGALRM,
 * SIGBUS, read from a signalfd and dropped when nothing handles them)
 * and SIGPIPE, which QEMU ignores: qemu-io survives "sigraise" of any
 * of them, so vdisk io blocks or ignores them alike.
 */
static void block_qemu_signals(void)
{
    sigset_t set;

    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGIO);
    sigaddset(&set, SIGALRM);
    sigaddset(&set, SIGBUS);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
}

static void usage(void)
{
    bool qemu = cli_as == CLI_QEMU_IO;

    /* qemu-io's layout; the options listed are the ones this tool takes
     * (-l and -o are vdisk io's only). */
    printf("Usage: %s [OPTIONS]... [-c STRING]... [file]\n"
           "%s\n"
           "\n"
           "  --object OBJECTDEF   define an object such as 'secret' for\n"
           "                       passwords and/or encryption keys\n"
           "  --image-opts         treat file as option string\n"
           "  -c, --cmd STRING     execute command with its arguments\n"
           "                       from the given string\n"
           "  -f, --format FMT     specifies the block driver to use\n"
           "  -r, --read-only      export read-only\n",
           qemu ? "qemu-io" : "vdisk io",
           qemu ? "QEMU Disk exerciser"
                : "vdisk disk exerciser (the qemu-io command set)");
    printf("  -s, --snapshot       use snapshot file\n");
    if (!qemu) {
        printf(
"  -l, --load-snapshot=SNAPSHOT  show internal snapshot SNAPSHOT (an id or\n"
"                       name, or snapshot.id=ID,snapshot.name=NAME), read-only\n");
    }
    printf(
"  -n, --nocache        disable host cache, short for -t none\n"
"  -C, --copy-on-read   enable copy-on-read\n"
"  -m, --misalign       misalign allocations for O_DIRECT\n"
"  -k, --native-aio     use kernel AIO implementation\n"
"                       (Linux only, prefer use of -i)\n");
    if (!qemu) {
        printf(
"  -o, --options OPTS   driver options (key=value,...)\n");
    }
    printf(
"  -i, --aio=MODE       use AIO mode (threads, native or io_uring)\n"
"  -t, --cache=MODE     use the given cache mode for the image\n"
"  -d, --discard=MODE   use the given discard mode for the image\n"
"  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]\n"
"                       specify tracing options\n"
"                       see qemu-img(1) man page for full description\n"
"  -U, --force-share    force shared permissions\n"
"  -h, --help           display this help and exit\n"
"  -V, --version        output version information and exit\n"
"\n"
"See '%s -c help' for information on available commands.\n",
           qemu ? "qemu-io" : "vdisk io");
}

/* The command line's options (util.c's cli_commands[] points here too). */
const char cmd_io_short_opts[] = ":hVc:d:f:rl:snCmki:t:o:T:U";
const struct option cmd_io_long_opts[] = {
    { "help", no_argument, NULL, 'h' },
    { "version", no_argument, NULL, 'V' },
    { "cmd", required_argument, NULL, 'c' },
    { "format", required_argument, NULL, 'f' },
    { "read-only", no_argument, NULL, 'r' },
    { "load-snapshot", required_argument, NULL, 'l' },
    { "snapshot", no_argument, NULL, 's' },
    { "nocache", no_argument, NULL, 'n' },
    { "copy-on-read", no_argument, NULL, 'C' },
    { "misalign", no_argument, NULL, 'm' },
    { "native-aio", no_argument, NULL, 'k' },
    { "discard", required_argument, NULL, 'd' },
    { "cache", required_argument, NULL, 't' },
    { "aio", required_argument, NULL, 'i' },
    { "options", required_argument, NULL, 'o' },
    { "force-share", no_argument, NULL, 'U' },
    { "image-opts", no_argument, NULL, 'I' },
    { "object", required_argument, NULL, OPT_OBJECT },
    { "trace", required_argument, NULL, 'T' },
    { NULL, 0, NULL, 0 },
};

int cmd_io(int argc, char **argv)
{
    open_args a;
    char **cmds = NULL;
    int ncmds = 0, c, i, last_error = 0, ret, longidx = -1;
    vd_error err = VD_ERROR_INIT;
    const char *sn_param = NULL;

    memset(&a, 0, sizeof(a));
    memset(&io, 0, sizeof(io));
    block_qemu_signals();
    main_thread = pthread_self();
    vd_debug_set_handler(debug_message, NULL);
    cmds = calloc((size_t)argc + 1, sizeof(*cmds));
    if (!cmds) {
        return 1;
    }
    opterr = 0;
    optind = 0;
    while ((c = getopt_long(argc, argv, cmd_io_short_opts, cmd_io_long_opts,
                            &longidx)) != -1) {
        /* -l and -o are vdisk io's: unknown to qemu-io. */
        if (cli_as == CLI_QEMU_IO && (c == 'l' || c == 'o')) {
            cli_foreign_option_error(c, longidx, argv);
            usage();
            ret = 1;
            goto done;
        }
        longidx = -1;
        switch (c) {
        case 'h':
            usage();
            ret = 0;
            goto done;
        case 'V':
            if (cli_as == CLI_QEMU_IO) {
                cli_print_qemu_version();
                ret = 0;
                goto done;
            }
            printf("vdisk io version %s\n", vd_version());
            ret = 0;
            goto done;
        case 'c':
            cmds[ncmds++] = optarg;
            break;
        case 'f':
            a.format = optarg;
            break;
        case 'r':
            a.readonly = true;
            break;
        case 'l':
            /* A snapshot is only ever shown read-only. */
            sn_param = optarg;
            a.readonly = true;
            break;
        case 'n':
            a.cache = "none";
            break;
        case 'C':
            a.copy_on_read = true;
            break;
        case 's':
            a.snapshot = true;
            break;
        case 'm':
            break; /* buffers are always aligned */
        case 'k':
            a.aio = "native";
            break;
        case 'T':
            ret = trace_opt(optarg);
            if (ret) {
                ret = ret == 2 ? 0 : 1;
                goto done;
            }
            break;
        case 'd':
            if (!check_mode_option(c, optarg)) {
                ret = 1;
                goto done;
            }
            a.discard = optarg;
            break;
        case 't':
            if (!valid_cache_mode(optarg)) {
                cli_error("Invalid cache option: %s", optarg);
                ret = 1;
                goto done;
            }
            a.cache = optarg;
            break;
        case 'i':
            if (!check_mode_option(c, optarg)) {
                ret = 1;
                goto done;
            }
            a.aio = optarg;
            break;
        case 'o':
            if (!a.opts && !(a.opts = vd_opts_new())) {
                ret = 1;
                goto done;
            }
            if (vd_opts_parse(a.opts, optarg, NULL, &err) < 0) {
                cli_error("%s", err.message);
                ret = 1;
                goto done;
            }
            break;
        case 'U':
            a.force_share = true;
            break;
        case 'I':
            a.image_opts = true;
            break;
        case OPT_OBJECT:
            /* Added in command-line order, before the image opens. */
            if (cli_add_object(optarg, NULL) < 0) {
                ret = 1;
                goto done;
            }
            break;
        default:    /* ':' or '?' */
            cli_getopt_error(c, argv);
            usage();
            ret = 1;
            goto done;
        }
    }
    opterr = 1; /* commands let getopt print qemu-io's complaints */
    if (optind < argc - 1) {
        usage();
        ret = 1;
        goto done;
    }
    if (optind == argc - 1) {
        if (open_image(argv[optind], &a) < 0) {
            ret = 1;
            goto done;
        }
        if (sn_param && load_snapshot(sn_param) < 0) {
            close_image();
            ret = 1;
            goto done;
        }
    }

    if (ncmds) {
        for (i = 0; i < ncmds && !io.quit; i++) {
            ret = run_command(cmds[i]);
            if (ret < 0) {
                last_error = ret;
            }
        }
    } else {
        last_error = command_loop_stdin();
    }

    if (io.node && close_image() < 0) {
        last_error = -EIO;
    }
    aio_drain();
    ret = last_error < 0;
done:
    fflush(stdout);
    vd_opts_free(&a.opts);
    free(cmds);
    return ret;
}
