/*
 * Unit tests for the protocol and simple format drivers: file, raw and
 * null-co, driven through the public API (vd_open, vd_pread, ...) on real
 * files in a scratch directory; also what drivers declare to the layers
 * above (vd_driver_features(), vd_get_driver_stats()) and vd_create()'s
 * checks of a backing format. Where the answer is a property of QEMU
 * rather than of the filesystem (what a new image looks like on disk,
 * image locks), qemu-img is asked when it is installed.
 *
 * Each test_*() function covers one feature; main() runs them all and
 * exits 0 on success, 1 on a failed check, 77 when the scratch directory
 * cannot be made.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/block_int.h"

#include "check.h"
#include "sh.h"

static char dir[256];
static bool have_qemu_img;


/* ---- helpers ---- */

static const char *path(const char *name)
{
    static char buf[4][512];
    static int next;
    char *p = buf[next++ % 4];

    snprintf(p, sizeof(buf[0]), "%s/%s", dir, name);
    return p;
}

/* Writes @len bytes of @byte at @off into the file, creating it. */
static void host_write(const char *file, uint64_t off, int byte, size_t len)
{
    int fd = open(file, O_WRONLY | O_CREAT, 0644);
    char *buf = malloc(len ? len : 1);

    memset(buf, byte, len);
    if (fd < 0 || pwrite(fd, buf, len, (off_t)off) != (ssize_t)len) {
        fprintf(stderr, "host_write %s failed\n", file);
        exit(1);
    }
    close(fd);
    free(buf);
}

static void host_read(const char *file, uint64_t off, void *buf, size_t len)
{
    int fd = open(file, O_RDONLY);

    memset(buf, 0, len);
    if (fd < 0 || pread(fd, buf, len, (off_t)off) < 0) {
        fprintf(stderr, "host_read %s failed\n", file);
        exit(1);
    }
    close(fd);
}

static struct stat host_stat(const char *file)
{
    struct stat st;

    memset(&st, 0, sizeof(st));
    stat(file, &st);
    return st;
}

static bool all_bytes(const uint8_t *buf, int byte, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        if (buf[i] != (uint8_t)byte) {
            return false;
        }
    }
    return true;
}

static vd_opts *opts_of(const char *str)
{
    vd_opts *o = vd_opts_new();
    vd_error err = VD_ERROR_INIT;

    if (str && vd_opts_parse(o, str, NULL, &err) < 0) {
        fprintf(stderr, "bad options '%s': %s\n", str, err.message);
        exit(1);
    }
    return o;
}

/* Opens @file with @format and options @str; returns NULL on failure
 * (with the error in @err). */
static vd_node *open_img(const char *file, const char *format,
                         const char *str, unsigned flags, vd_error *err)
{
    vd_opts *o = opts_of(str);
    vd_node *n = NULL;
    int r;

    vd_error_clear(err);
    r = vd_open(&n, file, format, o, flags | VD_O_QUIET, err);
    vd_opts_free(&o);
    return r < 0 ? NULL : n;
}

static int create_img(const char *file, const char *format, const char *str,
                      vd_error *err)
{
    vd_opts *o = opts_of(str);
    int r;

    vd_error_clear(err);
    r = vd_create(file, format, o, err);
    vd_opts_free(&o);
    return r;
}

/* One extent of vd_block_status, returning flags (or -errno). */
static int status(vd_node *n, uint64_t off, uint64_t len, vd_extent *ext)
{
    vd_error err = VD_ERROR_INIT;
    int r = vd_block_status(n, off, len, ext, &err);

    if (r < 0) {
        fprintf(stderr, "block status at %llu: %s\n",
                (unsigned long long)off, err.message);
        return r;
    }
    return (int)ext->flags;
}

/* ---- file: read/write round trip ---- */

static void test_roundtrip(void)
{
    const char *f = path("rt.raw");
    vd_error err = VD_ERROR_INIT;
    uint8_t buf[10000], back[10000];
    vd_node *n;
    int r;

    r = create_img(f, "raw", "size=64k", &err);
    CHECK(r == 0, "create: %s", err.message);

    for (const char *const *fmt = (const char *const[]){ "raw", "file", NULL };
         *fmt; fmt++) {
        n = open_img(f, *fmt, NULL, VD_O_RDWR, &err);
        CHECK(n, "open as %s: %s", *fmt, err.message);
        if (!n) {
            continue;
        }
        CHECK(vd_getlength(n) == 65536, "length %lld",
              (long long)vd_getlength(n));
        for (size_t i = 0; i < sizeof(buf); i++) {
            buf[i] = (uint8_t)(i * 7 + **fmt);
        }
        /* unaligned offset and length, vectored */
        struct iovec iov[3] = {
            { buf, 1 }, { buf + 1, 4000 }, { buf + 4001, 5999 },
        };
        r = vd_pwritev(n, iov, 3, 1234, 0, &err);
        CHECK(r == 0, "pwritev: %s", err.message);
        r = vd_pread(n, back, sizeof(back), 1234, 0, &err);
        CHECK(r == 0 && memcmp(buf, back, sizeof(buf)) == 0,
              "read back via %s", *fmt);
        r = vd_pwrite(n, buf, 512, 0, VD_REQ_FUA, &err);
        CHECK(r == 0, "FUA write: %s", err.message);
        CHECK(vd_flush(n, &err) == 0, "flush: %s", err.message);
        vd_close(&n, NULL);

        host_read(f, 1234, back, sizeof(back));
        CHECK(memcmp(buf, back, sizeof(back)) == 0, "file content");
    }

    /* reads outside the image are refused at the top */
    n = open_img(f, "raw", NULL, 0, &err);
    CHECK(n, "open: %s", err.message);
    if (n) {
        r = vd_pread(n, buf, 10, 65530, 0, &err);
        /* the header says -EINVAL, the core answers like qemu-io (EIO) */
        CHECK(r == -EINVAL || r == -EIO, "read past the end: %d", r);
        r = vd_pwrite(n, buf, 10, 0, 0, NULL);
        CHECK(r == -EROFS, "write to a read-only node: %d", r);
        vd_close(&n, NULL);
    }
}

/* ---- file: reads past EOF of the file return zeros ---- */

static void test_read_past_eof(void)
{
    const char *f = path("eof.raw");
    vd_error err = VD_ERROR_INIT;
    uint8_t buf[8192];
    vd_node *n;

    unlink(f);
    host_write(f, 0, 0x5a, 8192);
    n = open_img(f, "raw", NULL, 0, &err);
    CHECK(n, "open: %s", err.message);
    if (!n) {
        return;
    }
    /* Shrink the file under the node: its cached length is now stale
     * and the file driver sees a read that crosses EOF. */
    CHECK(truncate(f, 3000) == 0, "truncate");
    memset(buf, 0xff, sizeof(buf));
    CHECK(vd_pread(n, buf, sizeof(buf), 0, 0, &err) == 0, "read: %s",
          err.message);
    CHECK(all_bytes(buf, 0x5a, 3000), "data before EOF");
    CHECK(all_bytes(buf + 3000, 0, sizeof(buf) - 3000), "zeros past EOF");
    vd_close(&n, NULL);

    /* an unaligned file size read through O_DIRECT */
    n = open_img(f, "raw", "cache=none", 0, &err);
    CHECK(n, "open cache=none: %s", err.message);
    if (n) {
        /* lengths are whole sectors, as in QEMU: 3000 reads as 3072 */
        CHECK(vd_getlength(n) == 3072, "length %lld",
              (long long)vd_getlength(n));
        memset(buf, 0xff, sizeof(buf));
        CHECK(vd_pread(n, buf, 3072, 0, 0, &err) == 0, "read: %s",
              err.message);
        CHECK(all_bytes(buf, 0x5a, 3000) && all_bytes(buf + 3000, 0, 72),
              "direct read of a partial block");
        vd_close(&n, NULL);
    }
}

/* ---- file: SEEK_DATA/SEEK_HOLE block status ---- */

static void test_block_status(void)
{
    const char *f = path("sparse.raw");
    vd_error err = VD_ERROR_INIT;
    vd_extent ext;
    vd_node *n;
    int fl;

    CHECK(create_img(f, "raw", "size=1M", &err) == 0, "create: %s",
          err.message);
    host_write(f, 256 * 1024, 0x11, 4096);
    n = open_img(f, "raw", NULL, 0, &err);
    CHECK(n, "open: %s", err.message);
    if (!n) {
        return;
    }

    /* What qemu-img map shows for the same file: the first block is
     * data (written at create), then a hole, our data, a hole. */
    static const struct { uint64_t start, len; bool data; } want[] = {
        { 0, 4096, true },
        { 4096, 256 * 1024 - 4096, false },
        { 256 * 1024, 4096, true },
        { 260 * 1024, 1024 * 1024 - 260 * 1024, false },
    };
    uint64_t off = 0;
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        fl = status(n, off, 1024 * 1024 - off, &ext);
        CHECK(fl >= 0 && ext.start == want[i].start &&
              ext.length == want[i].len, "extent %zu: got %llu+%llu", i,
              (unsigned long long)ext.start, (unsigned long long)ext.length);
        if (want[i].data) {
            CHECK((fl & VD_BLOCK_DATA) && !(fl & VD_BLOCK_ZERO),
                  "extent %zu flags %#x, want data", i, (unsigned)fl);
        } else {
            CHECK((fl & VD_BLOCK_ZERO) && !(fl & VD_BLOCK_DATA),
                  "extent %zu flags %#x, want zero", i, (unsigned)fl);
        }
        CHECK((fl & VD_BLOCK_OFFSET_VALID) && (fl & VD_BLOCK_ALLOCATED) &&
              ext.offset == ext.start, "extent %zu offset", i);
        off += ext.length;
        if (fl < 0 || ext.length == 0) {
            break;
        }
    }
    CHECK(off == 1024 * 1024, "extents end at %llu",
          (unsigned long long)off);
    vd_close(&n, NULL);

    /* cross-check against qemu-img on the same file */
    if (have_qemu_img) {
        CHECK(sh("qemu-img map -f raw --output=json '%s' | grep -c "
                  "'\"start\"' | grep -qx 4", f) == 0,
              "qemu-img map sees 4 extents too");
    }
}

/* ---- file: zeroes and discard ---- */

static void test_zeroes_discard(void)
{
    const char *f = path("zero.raw");
    vd_error err = VD_ERROR_INIT;
    uint8_t buf[65536];
    vd_extent ext;
    vd_node *n;
    int r;

    unlink(f);
    host_write(f, 0, 0x77, 1024 * 1024);
    n = open_img(f, "raw", "discard=unmap", VD_O_RDWR, &err);
    CHECK(n, "open: %s", err.message);
    if (!n) {
        return;
    }
    /* zero range keeps the blocks allocated */
    r = vd_write_zeroes(n, 65536, 65536, 0, &err);
    CHECK(r == 0, "write_zeroes: %s", err.message);
    CHECK(vd_pread(n, buf, 65536, 65536, 0, &err) == 0 &&
          all_bytes(buf, 0, 65536), "zeroed range reads zeros");
    /* with unmap the range becomes a hole */
    blkcnt_t before = host_stat(f).st_blocks;
    r = vd_write_zeroes(n, 4 * 65536, 65536, VD_REQ_MAY_UNMAP, &err);
    CHECK(r == 0, "write_zeroes unmap: %s", err.message);
    CHECK(host_stat(f).st_blocks < before, "blocks freed by unmap");
    CHECK(status(n, 4 * 65536, 65536, &ext) >= 0 &&
          (ext.flags & VD_BLOCK_ZERO), "unmapped range is a hole");
    CHECK(vd_pread(n, buf, 65536, 4 * 65536, 0, &err) == 0 &&
          all_bytes(buf, 0, 65536), "unmapped range reads zeros");
    /* unaligned zeroing: the core writes the edges itself */
    r = vd_write_zeroes(n, 3, 1000, 0, &err);
    CHECK(r == 0, "small write_zeroes: %s", err.message);
    CHECK(vd_pread(n, buf, 8, 998, 0, &err) == 0 && buf[0] == 0x77 &&
          buf[1] == 0x77 && all_bytes(buf + 2, 0, 3) && buf[5] == 0x77,
          "small zeroing hits only its range");
    /* discard */
    before = host_stat(f).st_blocks;
    r = vd_discard(n, 512 * 1024, 512 * 1024, &err);
    CHECK(r == 0, "discard: %s", err.message);
    CHECK(host_stat(f).st_blocks < before, "discard freed blocks");
    CHECK(vd_getlength(n) == 1024 * 1024, "discard keeps the size");
    vd_close(&n, NULL);
    CHECK(host_stat(f).st_size == 1024 * 1024, "file size kept");
}

/* ---- raw: offset/size windows ---- */

static void test_raw_window(void)
{
    const char *f = path("win.raw");
    vd_error err = VD_ERROR_INIT;
    uint8_t buf[4096];
    vd_extent ext;
    vd_node *n;
    int r;

    unlink(f);
    for (int i = 0; i < 8; i++) {
        host_write(f, (uint64_t)i * 512, 0x10 + i, 512);
    }

    n = open_img(f, "raw", "offset=512,size=1024", VD_O_RDWR, &err);
    CHECK(n, "open window: %s", err.message);
    if (n) {
        CHECK(vd_getlength(n) == 1024, "window length %lld",
              (long long)vd_getlength(n));
        CHECK(vd_pread(n, buf, 1024, 0, 0, &err) == 0 &&
              all_bytes(buf, 0x11, 512) && all_bytes(buf + 512, 0x12, 512),
              "window reads the child at +512");
        r = vd_pread(n, buf, 1, 1024, 0, NULL);
        CHECK(r == -EINVAL || r == -EIO, "read past the window: %d", r);
        memset(buf, 0xee, 100);
        CHECK(vd_pwrite(n, buf, 100, 10, 0, &err) == 0, "write: %s",
              err.message);
        CHECK(status(n, 0, 1024, &ext) >= 0 && ext.offset == 512 &&
              ext.length == 1024, "block status maps to +512 (%llu)",
              (unsigned long long)ext.offset);
        r = vd_truncate(n, 2048, false, VD_PREALLOC_OFF, &err);
        CHECK(r == -ENOTSUP && strstr(err.message, "Cannot resize "
              "fixed-size raw disks"), "truncate a sized window: %d %s", r,
              err.message);
        vd_close(&n, NULL);
        host_read(f, 512, buf, 512);
        CHECK(all_bytes(buf, 0x11, 10) && all_bytes(buf + 10, 0xee, 100) &&
              all_bytes(buf + 110, 0x11, 402), "write landed at +522");
    }

    /* an offset alone: the window runs to the end and can grow */
    n = open_img(f, "raw", "offset=1024", VD_O_RDWR, &err);
    CHECK(n, "open offset only: %s", err.message);
    if (n) {
        CHECK(vd_getlength(n) == 3072, "length %lld",
              (long long)vd_getlength(n));
        r = vd_truncate(n, 8192, false, VD_PREALLOC_OFF, &err);
        CHECK(r == 0, "truncate: %s", err.message);
        CHECK(vd_getlength(n) == 8192, "length after truncate %lld",
              (long long)vd_getlength(n));
        vd_close(&n, NULL);
        CHECK(host_stat(f).st_size == 9216, "child grew to offset+size");
    }

    /* QEMU's validation, message for message */
    static const struct { const char *opts, *msg; } bad[] = {
        { "offset=512,size=1000", "Specified size is not multiple of 512" },
        { "offset=20000", "Offset (20000) cannot be greater than size of the "
                          "containing file (9216)" },
        { "offset=8704,size=1024", "The sum of offset (8704) and size (1024) "
          "has to be smaller or equal to the  actual size of the containing "
          "file (9216)" },
        { "offset=-1", "offset" },
        { "bogus=1", "does not support the option 'bogus'" },
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        n = open_img(f, "raw", bad[i].opts, 0, &err);
        CHECK(!n && err.code == -EINVAL && strstr(err.message, bad[i].msg),
              "%s: got %d '%s'", bad[i].opts, err.code, err.message);
        vd_close(&n, NULL);
    }
}

/* ---- file: truncate with preallocation ---- */

static void test_truncate_prealloc(void)
{
    const char *f = path("trunc.raw");
    vd_error err = VD_ERROR_INIT;
    uint8_t buf[4096];
    vd_node *n;
    int r;

    unlink(f);
    host_write(f, 0, 0x33, 4096);
    n = open_img(f, "raw", NULL, VD_O_RDWR, &err);
    CHECK(n, "open: %s", err.message);
    if (!n) {
        return;
    }
    r = vd_truncate(n, 1024 * 1024, false, VD_PREALLOC_OFF, &err);
    CHECK(r == 0 && host_stat(f).st_size == 1024 * 1024 &&
          host_stat(f).st_blocks * 512 < 64 * 1024, "off: sparse growth (%s)",
          err.message);
    r = vd_truncate(n, 2 * 1024 * 1024, false, VD_PREALLOC_FALLOC, &err);
    CHECK(r == 0 && host_stat(f).st_blocks * 512 >= 1024 * 1024,
          "falloc allocates the new MiB (%s)", err.message);
    r = vd_truncate(n, 3 * 1024 * 1024, false, VD_PREALLOC_FULL, &err);
    CHECK(r == 0 && host_stat(f).st_blocks * 512 >= 2 * 1024 * 1024,
          "full allocates the new MiB (%s)", err.message);
    CHECK(vd_pread(n, buf, sizeof(buf), 2 * 1024 * 1024 + 4096, 0, &err)
          == 0 && all_bytes(buf, 0, sizeof(buf)), "full growth reads zeros");
    CHECK(vd_getlength(n) == 3 * 1024 * 1024, "length %lld",
          (long long)vd_getlength(n));
    r = vd_truncate(n, 4 * 1024 * 1024, false, VD_PREALLOC_METADATA, &err);
    CHECK(r == -ENOTSUP && strstr(err.message,
          "Unsupported preallocation mode: metadata"), "metadata: %d %s", r,
          err.message);
    vd_error_clear(&err);
    r = vd_truncate(n, 8192, true, VD_PREALLOC_FALLOC, &err);
    CHECK(r < 0, "shrinking with preallocation fails");
    vd_error_clear(&err);
    r = vd_truncate(n, 8192, true, VD_PREALLOC_OFF, &err);
    CHECK(r == 0 && host_stat(f).st_size == 8192, "shrink: %s",
          err.message);
    CHECK(vd_pread(n, buf, 4096, 0, 0, &err) == 0 &&
          all_bytes(buf, 0x33, 4096), "data kept over resizes");
    vd_close(&n, NULL);
}

/* ---- create: options and what the file looks like ---- */

static void test_create(void)
{
    vd_error err = VD_ERROR_INIT;
    int r;

    r = create_img(path("c1.raw"), "raw", "size=1000", &err);
    CHECK(r == 0 && host_stat(path("c1.raw")).st_size == 1024,
          "size rounds up to a sector (%s)", err.message);

    r = create_img(path("c2.raw"), "raw", "size=1M,preallocation=metadata",
                   &err);
    CHECK(r == -ENOTSUP && strstr(err.message, "c2.raw: Unsupported "
          "preallocation mode: metadata"), "metadata: %d '%s'", r,
          err.message);
    r = create_img(path("c3.raw"), "raw", "size=1M,preallocation=foo", &err);
    CHECK(r == -EINVAL, "bad preallocation: %d '%s'", r, err.message);
    r = create_img(path("c3.raw"), "raw", "size=1M,nocow=maybe", &err);
    CHECK(r == -EINVAL && strstr(err.message, "nocow"), "bad nocow: '%s'",
          err.message);
    r = create_img(path("c3.raw"), "raw", "size=1M,extent_size_hint=8G",
                   &err);
    CHECK(r == -EINVAL && strstr(err.message, "Extent size hint is too "
          "large"), "big hint: '%s'", err.message);
    r = create_img(path("c3.raw"), "raw", "size=1M,nocow=on,"
                   "extent_size_hint=2M", &err);
    CHECK(r == 0, "nocow and hint: %s", err.message);
    r = create_img(path("nodir/x.raw"), "raw", "size=1M", &err);
    CHECK(r == -ENOENT, "create in a missing directory: %d", r);

    /* existing content is cleared, as qemu-img create does */
    host_write(path("c4.raw"), 0, 0x44, 65536);
    r = create_img(path("c4.raw"), "raw", "size=8k", &err);
    CHECK(r == 0 && host_stat(path("c4.raw")).st_size == 8192, "recreate");
    {
        uint8_t buf[8192];

        host_read(path("c4.raw"), 0, buf, sizeof(buf));
        CHECK(all_bytes(buf, 0, sizeof(buf)), "recreated image is zero");
    }

    /* A backing format must be a driver name QEMU knows, and one vdisk
     * has when the size comes from the backing file: qcow2's create used
     * to probe c1.raw for "nbd" (and write the image) instead; vvfat,
     * since nbd is a driver when libnbd is found. */
    r = create_img(path("c5.qcow2"), "qcow2", "backing_file=c1.raw,"
                   "backing_fmt=vvfat", &err);
    CHECK(r == -EINVAL && strstr(err.message, "Unknown driver 'vvfat'") &&
          access(path("c5.qcow2"), F_OK) != 0,
          "unknown backing driver: %d '%s'", r, err.message);
    r = create_img(path("c5.qcow2"), "qcow2", "size=1M,backing_file=c1.raw,"
                   "backing_fmt=vmdx", &err);
    CHECK(r == -EINVAL && strstr(err.message, "Parameter 'backing-fmt' does "
          "not accept value 'vmdx'") && access(path("c5.qcow2"), F_OK) != 0,
          "backing format outside QEMU's enum: %d '%s'", r, err.message);

    /* the help list, as qemu-img create -f raw -o help */
    const vd_create_option *o = vd_create_options("raw");
    const char *want[] = { "size", "nocow", "preallocation",
                           "extent_size_hint" };
    size_t k = 0;
    for (; o && o[k].name && k < 4; k++) {
        CHECK(strcmp(o[k].name, want[k]) == 0, "option %zu is %s", k,
              o[k].name);
    }
    CHECK(o && k == 4 && !o[4].name, "raw has 4 creation options");

    /* the same host layout as qemu-img's images, mode by mode */
    if (have_qemu_img) {
        static const char *const modes[] = { "off", "falloc", "full" };

        for (int i = 0; i < 3; i++) {
            char opts[64];

            snprintf(opts, sizeof(opts), "size=1M,preallocation=%s",
                     modes[i]);
            r = create_img(path("v.raw"), "raw", opts, &err);
            CHECK(r == 0, "create %s: %s", modes[i], err.message);
            r = sh("qemu-img create -q -f raw -o preallocation=%s '%s' 1M",
                    modes[i], path("q.raw"));
            CHECK(r == 0, "qemu-img create");
            /* system() runs sh, which lacks <( ) */
            r = sh("bash -c \"cmp -s <(qemu-img map -f raw --output=json "
                    "'%s') <(qemu-img map -f raw --output=json '%s')\"",
                    path("v.raw"), path("q.raw"));
            CHECK(r == 0, "preallocation=%s: qemu-img map differs", modes[i]);
        }
    }
}

/* ---- file: open errors ---- */

static void test_open_errors(void)
{
    vd_error err = VD_ERROR_INIT;
    vd_node *n;
    char want[1024];

    n = open_img(path("missing.raw"), "raw", NULL, 0, &err);
    snprintf(want, sizeof(want), "Could not open '%s': No such file or "
             "directory", path("missing.raw"));
    CHECK(!n && err.code == -ENOENT && strcmp(err.message, want) == 0,
          "missing file: %d '%s'", err.code, err.message);

    n = open_img(dir, "raw", NULL, 0, &err);
    CHECK(!n && err.code == -EINVAL &&
          strstr(err.message, "'file' driver requires"),
          "directory read-only: %d '%s'", err.code, err.message);
    n = open_img(dir, "raw", NULL, VD_O_RDWR, &err);
    CHECK(!n && err.code == -EISDIR && strstr(err.message, "Is a directory"),
          "directory read-write: %d '%s'", err.code, err.message);

    host_write(path("o.raw"), 0, 0, 512);
    n = open_img(path("o.raw"), "raw", "locking=maybe", 0, &err);
    CHECK(!n && err.code == -EINVAL, "bad locking value");
    n = open_img(path("o.raw"), "raw", "aio=threads,locking=off", 0, &err);
    CHECK(n, "aio/locking accepted: %s", err.message);
    vd_close(&n, NULL);
    /* As QEMU: native AIO only with cache.direct=on. */
    n = open_img(path("o.raw"), "raw", "aio=native", 0, &err);
    CHECK(!n && err.code == -EINVAL &&
          strstr(err.message, "requires cache.direct=on"),
          "aio=native without O_DIRECT: %d '%s'", err.code, err.message);
    vd_close(&n, NULL);
    n = open_img(path("o.raw"), "file", "aio=io_uring", 0, &err);
    CHECK(n, "aio on the file node: %s", err.message);
    vd_close(&n, NULL);
    n = open_img(path("o.raw"), "file", "file.aio=threads", 0, &err);
    CHECK(!n, "a protocol node has no file child");
    vd_close(&n, NULL);
}

/* ---- file: O_DIRECT with unaligned requests ---- */

static void test_direct(void)
{
    const char *f = path("direct.raw");
    vd_error err = VD_ERROR_INIT;
    uint8_t buf[20000], back[20000];
    vd_node *n, *file;

    CHECK(create_img(f, "raw", "size=1M", &err) == 0, "create: %s",
          err.message);
    n = open_img(f, "raw", "cache=none", VD_O_RDWR, &err);
    if (!n && err.code == -EINVAL && strstr(err.message, "O_DIRECT")) {
        fprintf(stderr, "test_direct: no O_DIRECT here, skipped\n");
        return;
    }
    CHECK(n, "open cache=none: %s", err.message);
    if (!n) {
        return;
    }
    file = vd_node_child(n, "file");
    CHECK(file && file->bl.request_alignment >= 512 &&
          file->bl.min_mem_alignment >= 512,
          "O_DIRECT alignment probed: %u/%u",
          file ? file->bl.request_alignment : 0,
          file ? file->bl.min_mem_alignment : 0);
    for (size_t i = 0; i < sizeof(buf); i++) {
        buf[i] = (uint8_t)(i * 13 + 1);
    }
    /* unaligned in offset, length and memory */
    CHECK(vd_pwrite(n, buf + 1, 777, 3, 0, &err) == 0, "write: %s",
          err.message);
    CHECK(vd_pwrite(n, buf, sizeof(buf) - 1, 5000, 0, &err) == 0,
          "write: %s", err.message);
    CHECK(vd_pread(n, back + 1, 777, 3, 0, &err) == 0 &&
          memcmp(back + 1, buf + 1, 777) == 0, "read back small");
    CHECK(vd_pread(n, back, sizeof(buf) - 1, 5000, 0, &err) == 0 &&
          memcmp(back, buf, sizeof(buf) - 1) == 0, "read back large");
    CHECK(vd_write_zeroes(n, 10, 100, 0, &err) == 0, "zeroes: %s",
          err.message);
    vd_close(&n, NULL);

    host_read(f, 3, back, 777);
    CHECK(all_bytes(back + 97, 0, 10) && memcmp(back, buf + 1, 97) == 0 &&
          memcmp(back + 107, buf + 108, 670) == 0, "file content");
}

/* ---- raw: the probed-image guard on sector 0 ---- */

static void test_probed_guard(void)
{
    const char *f = path("probed.raw");
    vd_error err = VD_ERROR_INIT;
    uint8_t sec[512];
    vd_node *n;
    int r;

    CHECK(create_img(f, "raw", "size=64k", &err) == 0, "create: %s",
          err.message);
    n = open_img(f, NULL, NULL, VD_O_RDWR, &err);
    CHECK(n && strcmp(vd_node_format(n), "raw") == 0, "probe: %s",
          err.message);
    if (!n) {
        return;
    }

    /* What QEMU 7.2's probes take for another format (LUKS needs its
     * version 1, parallels its version 2, as there). */
    static const struct { const char *magic; size_t len; } foreign[] = {
        { "QFI\xfb\0\0\0\3", 8 }, { "QFI\xfb\0\0\0\1", 8 },
        { "QFI\xfb\0\0\0\4", 8 },
        { "KDMV", 4 }, { "COWD", 4 }, { "vhdxfile", 8 }, { "conectix", 8 },
        { "QED\0", 4 }, { "LUKS\xba\xbe\0\1", 8 },
        { "WithoutFreeSpace\2\0\0\0", 20 },
        { "WithouFreSpacExt\2\0\0\0", 20 },
        { "# Disk DescriptorFile\nversion=1\n", 32 },
        { "  \r\n \nversion=3\r\n", 17 },
        { "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r "
          "-t iso9660 /dev/cloop $1\n", 83 },
        { "Bochs Virtual HD Image\0\0\0\0\0\0\0\0\0\0"
          "Redolog\0\0\0\0\0\0\0\0\0Growing\0\0\0\0\0\0\0\0\0"
          "\0\0\2\0", 68 },
    };
    for (size_t i = 0; i < sizeof(foreign) / sizeof(foreign[0]); i++) {
        memset(sec, 0, sizeof(sec));
        memcpy(sec, foreign[i].magic, foreign[i].len);
        vd_error_clear(&err);
        r = vd_pwrite(n, sec, sizeof(sec), 0, 0, &err);
        CHECK(r == -EPERM, "magic %zu: %d", i, r);
    }
    /* Near misses QEMU's probes leave to raw: LUKS2, a parallels header
     * of another version, qcow version 0, a descriptor with text before
     * its version line. */
    static const struct { const char *magic; size_t len; } near[] = {
        { "LUKS\xba\xbe\0\2", 8 }, { "WithoutFreeSpace\1\0\0\0", 20 },
        { "QFI\xfb\0\0\0\0", 8 }, { "x\nversion=1\n", 12 },
    };
    for (size_t i = 0; i < sizeof(near) / sizeof(near[0]); i++) {
        memset(sec, 0, sizeof(sec));
        memcpy(sec, near[i].magic, near[i].len);
        vd_error_clear(&err);
        r = vd_pwrite(n, sec, sizeof(sec), 0, 0, &err);
        CHECK(r == 0, "near miss %zu: %d %s", i, r, err.message);
    }
    /* a small unaligned write that would complete a qcow2 magic */
    r = vd_pwrite(n, "QFI", 3, 0, 0, NULL);
    CHECK(r == 0, "partial magic is still raw: %d", r);
    r = vd_pwrite(n, "\xfb\0\0\0\3", 5, 3, 0, &err);
    CHECK(r == -EPERM, "completing the magic: %d", r);
    /* VDI keeps its signature at 0x40 */
    memset(sec, 0, sizeof(sec));
    memcpy(sec + 0x40, "\x7f\x10\xda\xbe", 4);
    CHECK(vd_pwrite(n, sec, sizeof(sec), 0, 0, NULL) == -EPERM, "vdi");

    memset(sec, 0xab, sizeof(sec));
    CHECK(vd_pwrite(n, sec, sizeof(sec), 0, 0, &err) == 0,
          "raw-looking data: %s", err.message);
    memcpy(sec, "QFI\xfb\0\0\0\3", 8);
    CHECK(vd_pwrite(n, sec, sizeof(sec), 512, 0, &err) == 0,
          "magic outside sector 0: %s", err.message);
    CHECK(vd_write_zeroes(n, 512, 0, 0, &err) == 0, "zeroes: %s",
          err.message);
    vd_close(&n, NULL);

    /* the guard is for probed images only */
    n = open_img(f, "raw", NULL, VD_O_RDWR, &err);
    CHECK(n, "open: %s", err.message);
    if (n) {
        memset(sec, 0, sizeof(sec));
        memcpy(sec, "QFI\xfb\0\0\0\3", 8);
        CHECK(vd_pwrite(n, sec, sizeof(sec), 0, 0, &err) == 0,
              "explicit raw may write anything: %s", err.message);
        vd_close(&n, NULL);
    }
}

/* ---- what drivers declare: features, driver-specific statistics ---- */

static void test_driver_queries(void)
{
    static const struct {
        const char *name;
        unsigned has, lacks;
    } want[] = {
        { "file", VD_DRIVER_OPENS | VD_DRIVER_PROTOCOL | VD_DRIVER_CREATE,
          VD_DRIVER_FORMAT | VD_DRIVER_BACKING | VD_DRIVER_NETWORK |
          VD_DRIVER_BIG_REQUESTS | VD_DRIVER_FLAT },
        { "null-co", VD_DRIVER_OPENS | VD_DRIVER_PROTOCOL,
          VD_DRIVER_FORMAT | VD_DRIVER_CREATE | VD_DRIVER_NETWORK },
        { "raw", VD_DRIVER_OPENS | VD_DRIVER_FORMAT | VD_DRIVER_CREATE |
          VD_DRIVER_FLAT,
          VD_DRIVER_BACKING | VD_DRIVER_COMPRESSED | VD_DRIVER_AMEND |
          VD_DRIVER_NETWORK },
        { "qcow2", VD_DRIVER_OPENS | VD_DRIVER_FORMAT | VD_DRIVER_BACKING |
          VD_DRIVER_COMPRESSED | VD_DRIVER_CREATE | VD_DRIVER_AMEND,
          VD_DRIVER_PROTOCOL | VD_DRIVER_FLAT | VD_DRIVER_NETWORK },
        { "blkdebug", VD_DRIVER_OPENS | VD_DRIVER_FILTER |
          VD_DRIVER_PROTOCOL, VD_DRIVER_FORMAT },
        { "vmdk", VD_DRIVER_OPENS | VD_DRIVER_FORMAT | VD_DRIVER_BACKING |
          VD_DRIVER_COMPRESSED | VD_DRIVER_CREATE, VD_DRIVER_AMEND },
        { "vdi", VD_DRIVER_OPENS | VD_DRIVER_FORMAT | VD_DRIVER_CREATE,
          VD_DRIVER_BACKING | VD_DRIVER_COMPRESSED | VD_DRIVER_AMEND },
    };
    vd_error err = VD_ERROR_INIT;
    vd_driver_stats ds;
    vd_node *n;

    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        unsigned f = vd_driver_features(want[i].name);
        CHECK((f & want[i].has) == want[i].has && !(f & want[i].lacks),
              "features of %s: %#x", want[i].name, f);
    }
    CHECK(vd_driver_features("vmdx") == 0 && vd_driver_features(NULL) == 0,
          "unknown drivers have no features");
    /* The network protocols are optional at build time: checked where
     * they are built in. */
    static const char *const big[] = { "nbd", "rbd" };
    for (size_t i = 0; i < sizeof(big) / sizeof(big[0]); i++) {
        unsigned f = vd_driver_features(big[i]);
        if (!(f & VD_DRIVER_OPENS))
            continue;
        CHECK((f & (VD_DRIVER_NETWORK | VD_DRIVER_BIG_REQUESTS)) ==
              (VD_DRIVER_NETWORK | VD_DRIVER_BIG_REQUESTS),
              "features of %s: %#x", big[i], f);
    }
    if (vd_driver_features("iscsi") & VD_DRIVER_OPENS) {
        unsigned f = vd_driver_features("iscsi");
        CHECK((f & VD_DRIVER_NETWORK) && !(f & VD_DRIVER_BIG_REQUESTS),
              "features of iscsi: %#x", f);
    }

    CHECK(create_img(path("stats.raw"), "raw", "size=1M", &err) == 0,
          "create: %s", err.message);
    n = open_img(path("stats.raw"), "raw", "discard=unmap", VD_O_RDWR, &err);
    CHECK(n, "open: %s", err.message);
    if (n) {
        vd_node *file = vd_node_child(n, "file");

        CHECK(vd_discard(n, 65536, 0, &err) == 0, "discard: %s",
              err.message);
        CHECK(vd_get_driver_stats(n, &ds) == -ENOTSUP && !ds.driver,
              "raw keeps no driver statistics");
        CHECK(file && vd_get_driver_stats(file, &ds) == 0 &&
              strcmp(ds.driver, "file") == 0 && ds.discard_nb_ok == 1 &&
              ds.discard_bytes_ok == 65536 && ds.discard_nb_failed == 0,
              "file's discard counts: %" PRIu64 " ok, %" PRIu64 " bytes",
              ds.discard_nb_ok, ds.discard_bytes_ok);
        vd_close(&n, NULL);
    }
}

/* ---- null-co ---- */

static void test_null(void)
{
    vd_error err = VD_ERROR_INIT;
    uint8_t buf[4096];
    vd_extent ext;
    vd_node *n;

    n = open_img(NULL, "null-co", NULL, VD_O_RDWR, &err);
    CHECK(n, "open: %s", err.message);
    if (n) {
        CHECK(vd_getlength(n) == 1073741824LL, "default size %lld",
              (long long)vd_getlength(n));
        memset(buf, 0x99, sizeof(buf));
        CHECK(vd_pwrite(n, buf, sizeof(buf), 12345, 0, &err) == 0, "write");
        CHECK(vd_pread(n, buf, sizeof(buf), 12345, 0, &err) == 0 &&
              all_bytes(buf, 0, sizeof(buf)), "reads zeros");
        CHECK(vd_write_zeroes(n, 1 << 20, 0, VD_REQ_NO_FALLBACK, &err) == 0,
              "zeroes");
        CHECK(vd_flush(n, &err) == 0, "flush");
        CHECK(status(n, 0, 1 << 20, &ext) >= 0 &&
              !(ext.flags & (VD_BLOCK_DATA | VD_BLOCK_ZERO)),
              "status without read-zeroes: %#x", ext.flags);
        vd_close(&n, NULL);
    }

    n = open_img("null-co://", "raw",
                 "file.size=1M,file.read-zeroes=on,file.latency-ns=1000",
                 0, &err);
    CHECK(n, "raw over null-co: %s", err.message);
    if (n) {
        CHECK(vd_getlength(n) == 1 << 20, "size %lld",
              (long long)vd_getlength(n));
        CHECK(status(n, 0, 1 << 20, &ext) >= 0 &&
              (ext.flags & VD_BLOCK_ZERO) && ext.length == 1 << 20,
              "read-zeroes status: %#x", ext.flags);
        vd_close(&n, NULL);
    }

    n = open_img(NULL, "null-co", "size=1000", 0, &err);
    CHECK(n && vd_getlength(n) == 1024, "size option (rounded up to a "
          "sector, as QEMU): %s", err.message);
    vd_close(&n, NULL);
    n = open_img("/some/file", "null-co", NULL, 0, &err);
    CHECK(!n && strstr(err.message, "null-co://"), "bad name: '%s'",
          err.message);
    n = open_img(NULL, "null-co", "read-zeroes=perhaps", 0, &err);
    CHECK(!n && err.code == -EINVAL, "bad bool");
}

/* ---- locking against qemu-img ---- */

static void test_locking(void)
{
    const char *f = path("lock.raw");
    vd_error err = VD_ERROR_INIT;
    vd_node *n;

    if (!have_qemu_img) {
        return;
    }
    CHECK(create_img(f, "raw", "size=1M", &err) == 0, "create: %s",
          err.message);
    n = open_img(f, "raw", NULL, VD_O_RDWR, &err);
    CHECK(n, "open: %s", err.message);
    if (!n) {
        return;
    }
    /* A tool's opener shares everything on raw, as qemu-io does ... */
    CHECK(sh("qemu-img resize -q -f raw '%s' 2M", f) == 0,
          "qemu-img resize of a raw image a tool writes");
    /* ... and like a running QEMU (an export) unsharing resize, we keep
     * others from resizing it */
    CHECK(vd_set_perm(n, VD_PERM_CONSISTENT_READ | VD_PERM_WRITE,
                      VD_PERM_ALL & ~VD_PERM_RESIZE, &err) == 0,
          "unshare resize: %s", err.message);
    CHECK(sh("qemu-img resize -q -f raw '%s' 1M 2>/dev/null", f) != 0,
          "qemu-img resize must fail while we hold the image");
    CHECK(sh("qemu-img info -f raw '%s' >/dev/null 2>&1", f) == 0,
          "qemu-img info may still read it");
    /* and qemu-img create (which truncates) conflicts with us too */
    CHECK(sh("qemu-img create -q -f raw '%s' 1M 2>/dev/null", f) != 0,
          "qemu-img create over an image in use must fail");
    vd_close(&n, NULL);
    CHECK(sh("qemu-img resize -q -f raw '%s' 2M", f) == 0,
          "resize after close");

    n = open_img(f, "raw", "locking=off", VD_O_RDWR, &err);
    CHECK(n, "open locking=off: %s", err.message);
    CHECK(sh("qemu-img resize -q -f raw '%s' 3M", f) == 0,
          "resize with locking=off");
    vd_close(&n, NULL);

    /* the other way round: a resize lock held by someone else */
    n = open_img(f, "raw", NULL, 0, &err);
    CHECK(n, "read-only open: %s", err.message);
    if (n) {
        CHECK(vd_set_perm(n, VD_PERM_CONSISTENT_READ,
                          VD_PERM_ALL & ~VD_PERM_RESIZE, &err) == 0,
              "unshare resize read-only: %s", err.message);
        vd_error cerr = VD_ERROR_INIT;
        int r = create_img(f, "raw", "size=1M", &cerr);

        CHECK(r == -EBUSY && strstr(cerr.message, "\"resize\" lock"),
              "vd_create over an open image: %d '%s'", r, cerr.message);
        vd_close(&n, NULL);
    }
}

/* ---- concurrency: many threads on one node ---- */

struct worker {
    vd_node *n;
    int id;
    int errors;
};

static void *worker_main(void *opaque)
{
    struct worker *w = opaque;
    uint8_t buf[3000], back[3000];

    for (int round = 0; round < 50; round++) {
        uint64_t off = (uint64_t)(w->id * 50 + round) * 3000;

        memset(buf, w->id * 16 + round % 16, sizeof(buf));
        if (vd_pwrite(w->n, buf, sizeof(buf), off, 0, NULL) < 0 ||
            vd_pread(w->n, back, sizeof(back), off, 0, NULL) < 0 ||
            memcmp(buf, back, sizeof(buf)) != 0) {
            w->errors++;
        }
    }
    return NULL;
}

static void test_threads(void)
{
    const char *f = path("threads.raw");
    vd_error err = VD_ERROR_INIT;
    struct worker w[8];
    pthread_t th[8];
    vd_node *n;

    CHECK(create_img(f, "raw", "size=2M", &err) == 0, "create: %s",
          err.message);
    n = open_img(f, "raw", NULL, VD_O_RDWR, &err);
    CHECK(n, "open: %s", err.message);
    if (!n) {
        return;
    }
    for (int i = 0; i < 8; i++) {
        w[i] = (struct worker){ n, i, 0 };
        pthread_create(&th[i], NULL, worker_main, &w[i]);
    }
    for (int i = 0; i < 8; i++) {
        pthread_join(th[i], NULL);
        CHECK(w[i].errors == 0, "thread %d: %d errors", i, w[i].errors);
    }
    vd_close(&n, NULL);
}

/* ---- file: memory-backed storage (tmpfs) is told apart ---- */

static void test_memory_backed(void)
{
    static const struct { const char *dir; const char *what; } where[] = {
        { "/dev/shm", "tmpfs" }, { NULL, "the test directory" },
    };
    vd_error err = VD_ERROR_INIT;
    char f[400], cmd[500];

    for (size_t i = 0; i < 2; i++) {
        vd_node *n, *file;
        bool tmpfs;
        if (where[i].dir) {
            snprintf(f, sizeof(f), "%s/vdisk-test-mem.%d.raw", where[i].dir,
                     (int)getpid());
        } else {
            snprintf(f, sizeof(f), "%s", path("mem.raw"));
        }
        /* The referee: what stat(1) calls the file system. */
        snprintf(cmd, sizeof(cmd), "stat -f -c %%T '%s' | grep -qx tmpfs",
                 where[i].dir ? where[i].dir : dir);
        tmpfs = sh("%s", cmd) == 0;
        if (create_img(f, "raw", "size=1M", &err) < 0) {
            fprintf(stderr, "test_memory_backed: no file in %s, skipped\n",
                    where[i].what);
            vd_error_clear(&err);
            continue;
        }
        n = open_img(f, "raw", NULL, 0, &err);
        CHECK(n, "open %s: %s", f, err.message);
        file = n ? vd_node_child(n, "file") : NULL;
        CHECK(file && file->bl.memory_backed == tmpfs,
              "%s: memory_backed %d, stat says tmpfs %d", where[i].what,
              file ? file->bl.memory_backed : -1, tmpfs);
        vd_close(&n, NULL);
        unlink(f);
    }
}

int main(void)
{
    const char *tmp = getenv("TMPDIR");

    snprintf(dir, sizeof(dir), "%s/vdisk-test-drivers.XXXXXX",
             tmp ? tmp : "/tmp");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 77;
    }
    have_qemu_img = sh("qemu-img --version >/dev/null 2>&1") == 0;

    test_roundtrip();
    test_read_past_eof();
    test_block_status();
    test_zeroes_discard();
    test_raw_window();
    test_truncate_prealloc();
    test_create();
    test_open_errors();
    test_direct();
    test_memory_backed();
    test_probed_guard();
    test_driver_queries();
    test_null();
    test_locking();
    test_threads();

    sh("rm -rf '%s'", dir);
    if (failures) {
        fprintf(stderr, "test-drivers: %d check(s) failed\n", failures);
        return 1;
    }
    printf("test-drivers: all passed%s\n",
           have_qemu_img ? "" : " (qemu-img checks skipped)");
    return 0;
}
