/*
 * The qcow2 driver's persistent dirty bitmaps (bitmap.c), driven through
 * the driver vtable (bitmaps_load, bitmaps_store, bitmap_can_store,
 * bitmap_remove) on images QEMU made, and checked by QEMU's tools.
 *
 * Images are created at test time: qemu-img create + qemu-img bitmap
 * --add, then qemu-io writes, zero-writes and discards, which the
 * enabled persistent bitmaps record (qemu-io loads them, marks the
 * ranges and stores them at close). The expected bits are computed from
 * that list of requests; the contents QEMU sees are taken from a
 * qemu-storage-daemon (x-debug-block-dirty-bitmap-sha256, whose hash is
 * over the bitmap's 64-bit words: our bit order, padded to 8 bytes).
 *
 *  - load: every bitmap's flags, granularity and bits equal what the
 *    requests imply and QEMU's sha256 of the same image; a read-only
 *    load writes nothing; an all-ones table entry loads as ones;
 *  - a writable load marks the bitmaps in use on disk (qemu-img info),
 *    and a process killed after it leaves them in use;
 *  - store: a changed set (bits set and cleared, one dropped, one new,
 *    one enabled) passes qemu-img check, qemu-img info lists it, QEMU's
 *    sha256 of every bitmap and of a qemu-img convert --bitmaps copy is
 *    the expected one; storing the unchanged set gives the file QEMU
 *    itself writes (qemu-img check -r all loads and stores);
 *  - invalid input is refused with the file byte-identical; in-use
 *    bitmaps keep their flag and data; remove; can_store's messages;
 *  - the autoclear bit: a writer that does not load the bitmaps leaves
 *    them stale, one that loads keeps them; a stale extension loads no
 *    bitmap;
 *  - a crash at every write of a load and a store (the file driver
 *    fails every write after the Nth, the process exits without close)
 *    leaves an image qemu-img check finds no error in, with the old
 *    bitmaps, bitmaps in use, stale ones, or the new ones with the new
 *    contents: never a consistent bitmap with wrong contents.
 * Runs twice: 64 KiB clusters, and 512-byte clusters where bitmaps span
 * several clusters.
 * Exit 0 pass, 1 fail, 77 without qemu-img, qemu-io or
 * qemu-storage-daemon.
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/block_int.h"

#include "check.h"

static char dir[] = "/tmp/vdisk-bmq-XXXXXX";

/* ---- helpers --------------------------------------------------------- */

static char *fmt_alloc(const char *fmt, va_list ap)
{
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0) {
        s = NULL;
    }
    return s;
}

/* Runs a shell command; returns its exit status (-1 if it died). */
static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
    va_list ap;
    char *cmd;
    int st;

    va_start(ap, fmt);
    cmd = fmt_alloc(fmt, ap);
    va_end(ap);
    if (!cmd) {
        return -1;
    }
    st = system(cmd);
    free(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* Runs a shell command and returns its standard output (malloc'd). */
static char *sh_out(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *sh_out(const char *fmt, ...)
{
    va_list ap;
    char *cmd, *buf = NULL;
    size_t len = 0;
    FILE *p, *m;
    int c;

    va_start(ap, fmt);
    cmd = fmt_alloc(fmt, ap);
    va_end(ap);
    if (!cmd) {
        return strdup("");
    }
    p = popen(cmd, "r");
    free(cmd);
    m = open_memstream(&buf, &len);
    while (p && m && (c = fgetc(p)) != EOF) {
        fputc(c, m);
    }
    if (p) {
        pclose(p);
    }
    if (m) {
        fclose(m);
    }
    return buf ? buf : strdup("");
}

/* @s without whitespace (in place). */
static char *squeeze(char *s)
{
    char *w = s;
    for (char *r = s; *r; r++) {
        if (*r != ' ' && *r != '\n' && *r != '\t') {
            *w++ = *r;
        }
    }
    *w = 0;
    return s;
}

static char *file_sha(const char *path)
{
    char *out = sh_out("sha256sum '%s' | cut -c1-64", path);
    return squeeze(out);
}

/* sha256 of a bitmap image as QEMU hashes it: padded to 64-bit words. */
static char *bits_sha(const uint8_t *bits, uint64_t nbytes)
{
    char path[300];
    uint8_t zero[8] = { 0 };
    FILE *f;

    snprintf(path, sizeof(path), "%s/bits", dir);
    f = fopen(path, "wb");
    if (!f) {
        return strdup("");
    }
    if (nbytes) {
        fwrite(bits, 1, nbytes, f);
    }
    fwrite(zero, 1, (8 - nbytes % 8) % 8, f);
    fclose(f);
    return file_sha(path);
}

/* QEMU's x-debug-block-dirty-bitmap-sha256 of bitmap @name of @path
 * (opened read-only, so that QEMU writes nothing); "" on error. */
static char *qemu_sha(const char *path, const char *name)
{
    char *out = sh_out(
        "printf '%%s\\n' '{\"execute\":\"qmp_capabilities\"}' "
        "'{\"execute\":\"x-debug-block-dirty-bitmap-sha256\",\"arguments\":"
        "{\"node\":\"q\",\"name\":\"%s\"}}' '{\"execute\":\"quit\"}' | "
        "timeout 20 qemu-storage-daemon --chardev stdio,id=m --monitor m "
        "--blockdev driver=file,filename='%s',node-name=f,read-only=on "
        "--blockdev driver=qcow2,file=f,node-name=q,read-only=on 2>&1 | "
        "sed -n 's/.*\"sha256\": \"\\([0-9a-f]*\\)\".*/\\1/p'", name, path);
    return squeeze(out);
}

static vd_node *open_img(const char *path, bool rw)
{
    vd_error err = VD_ERROR_INIT;
    vd_node *n = NULL;

    if (vd_open(&n, path, "qcow2", NULL,
                (rw ? VD_O_RDWR : 0) | VD_O_NO_BACKING | VD_O_QUIET |
                VD_NODE_NO_BITMAPS,
                &err) < 0) {
        CHECK(0, "open %s: %s", path, err.message);
        return NULL;
    }
    return n;
}

static void close_img(vd_node **n)
{
    vd_error err = VD_ERROR_INIT;
    if (*n) {
        CHECK(vd_close(n, &err) == 0, "close: %s", err.message);
    }
}

static int load(vd_node *n, vd_bitmap_image **list, size_t *count)
{
    vd_error err = VD_ERROR_INIT;
    int ret = n->drv->bitmaps_load(n, list, count, &err);
    CHECK(ret == 0, "bitmaps_load: %s", err.message);
    return ret;
}

static const vd_bitmap_image *find(const vd_bitmap_image *l, size_t n,
                                   const char *name)
{
    for (size_t i = 0; i < n; i++) {
        if (!strcmp(l[i].name, name)) {
            return &l[i];
        }
    }
    return NULL;
}

static char *path_of(const char *name)
{
    char *p = NULL;
    if (asprintf(&p, "%s/%s", dir, name) < 0) {
        abort();
    }
    return p;
}

/* ---- the requests QEMU records --------------------------------------- */

typedef struct req {
    const char *cmd;    /* qemu-io command */
    uint64_t off, len;
} req;

#define DISK (16 * 1024 * 1024 + 4096)   /* a partial last granule */
static const req reqs[] = {
    { "write 0 64k", 0, 65536 },
    { "write 1M 4k", 1 << 20, 4096 },
    { "write -z 8M 128k", 8 << 20, 131072 },
    { "discard 12M 64k", 12 << 20, 65536 },
    { "write 16M 4k", 16 << 20, 4096 },
};
#define NREQS (sizeof(reqs) / sizeof(reqs[0]))

static uint64_t nbytes_of(uint64_t disk, uint64_t gran)
{
    return ((disk + gran - 1) / gran + 7) / 8;
}

static void set_range(uint8_t *bits, uint64_t gran, uint64_t off,
                      uint64_t len)
{
    for (uint64_t b = off / gran; b <= (off + len - 1) / gran; b++) {
        bits[b / 8] |= (uint8_t)(1u << (b % 8));
    }
}

static uint8_t *expected(uint64_t disk, uint64_t gran, bool enabled)
{
    uint8_t *bits = calloc(1, nbytes_of(disk, gran) + 1);
    for (size_t i = 0; enabled && i < NREQS; i++) {
        set_range(bits, gran, reqs[i].off, reqs[i].len);
    }
    return bits;
}

/* The bitmaps of the base image: name, granularity, enabled. */
typedef struct bdesc {
    const char *name;
    uint64_t gran;
    bool enabled;
} bdesc;
static const bdesc base[] = {
    { "b1", 0, true },          /* 0: QEMU's default granularity */
    { "b2", 4096, true },
    { "b3", 0, false },
    { "b4", 512, true },
};
/* QEMU's default: the cluster size clamped to 4 KiB .. 64 KiB. */
static uint64_t default_gran;

static uint64_t gran_of(const bdesc *d)
{
    return d->gran ? d->gran : default_gran;
}
#define NBASE (sizeof(base) / sizeof(base[0]))

static int make_base(const char *path, const char *cluster_size)
{
    char io[512] = "";
    size_t pos = 0;

    for (size_t i = 0; i < NREQS; i++) {
        pos += (size_t)snprintf(io + pos, sizeof(io) - pos, " -c '%s'",
                                reqs[i].cmd);
    }
    return sh("qemu-img create -q -f qcow2 -o cluster_size=%s '%s' %d && "
              "qemu-img bitmap --add '%s' b1 && "
              "qemu-img bitmap --add -g 4096 '%s' b2 && "
              "qemu-img bitmap --add --disable '%s' b3 && "
              "qemu-img bitmap --add -g 512 '%s' b4 && "
              "qemu-io -f qcow2 %s '%s' >/dev/null",
              cluster_size, path, DISK, path, path, path, path, io, path);
}

/* Compares a loaded bitmap with the expected bits and QEMU's sha256. */
static void compare_loaded(const vd_bitmap_image *b, const char *path,
                           const uint8_t *want, const char *what)
{
    uint64_t nb = nbytes_of(b->disk_size, b->granularity);
    char *q, *v;

    CHECK(b->bits != NULL, "%s %s: no bits", what, b->name);
    if (!b->bits) {
        return;
    }
    if (want) {
        CHECK(!memcmp(b->bits, want, nb), "%s %s: bits differ from what "
              "the requests imply", what, b->name);
    }
    q = qemu_sha(path, b->name);
    v = bits_sha(b->bits, nb);
    CHECK(strlen(q) == 64 && !strcmp(q, v), "%s %s: QEMU's sha256 %s, "
          "loaded %s", what, b->name, q, v);
    free(q);
    free(v);
}

/* The "bitmaps" member qemu-img info --output=json gives (no spaces). */
static char *info_bitmaps(const char *path, bool force_share)
{
    char *out = squeeze(sh_out("qemu-img info %s --output=json '%s' "
                               "2>/dev/null",
                               force_share ? "-U" : "", path));
    char *p = strstr(out, "\"bitmaps\":[");
    char *res;

    if (!p) {
        free(out);
        return strdup("");
    }
    /* The array ends at the first "}]" (a flags list ends in "],"). */
    res = strndup(p, (size_t)(strstr(p, "}]") ? strstr(p, "}]") - p + 2
                                              : (ptrdiff_t)strlen(p)));
    free(out);
    return res;
}

static bool qemu_check_clean(const char *path, const char *what)
{
    char *out = sh_out("qemu-img check '%s' 2>&1; echo rc=$?", path);
    bool ok = strstr(out, "No errors were found") && strstr(out, "rc=0") &&
              !strstr(out, "leak");
    CHECK(ok, "%s: qemu-img check: %s", what, out);
    free(out);
    return ok;
}

/* ---- tests ------------------------------------------------------------ */

static void test_load(const char *basep)
{
    vd_bitmap_image *l = NULL;
    size_t n = 0;
    char *before = file_sha(basep), *after;
    vd_node *node = open_img(basep, false);

    if (!node || load(node, &l, &n) < 0) {
        close_img(&node);
        free(before);
        return;
    }
    CHECK(n == NBASE, "loaded %zu bitmaps, expected %zu", n, NBASE);
    for (size_t i = 0; i < NBASE; i++) {
        const vd_bitmap_image *b = find(l, n, base[i].name);
        uint8_t *want;

        CHECK(b != NULL, "bitmap %s not loaded", base[i].name);
        if (!b) {
            continue;
        }
        CHECK(b->granularity == gran_of(&base[i]) && b->enabled ==
              base[i].enabled && !b->in_use && b->disk_size == DISK,
              "%s: granularity %" PRIu64 " enabled %d in_use %d size %"
              PRIu64, b->name, b->granularity, b->enabled, b->in_use,
              b->disk_size);
        want = expected(DISK, gran_of(&base[i]), base[i].enabled);
        compare_loaded(b, basep, want, "load");
        free(want);
    }
    vd_bitmap_images_free(l, n);
    close_img(&node);
    after = file_sha(basep);
    CHECK(!strcmp(before, after), "a read-only load changed the file");
    free(before);
    free(after);
}

/* Store the unchanged set: the file QEMU writes when it loads and stores
 * the same bitmaps (qemu-img check -r all opens read-write). */
static void test_twin_store(const char *basep)
{
    char *a = path_of("twin-qemu.qcow2"), *b = path_of("twin-vdisk.qcow2");
    vd_bitmap_image *l = NULL;
    size_t n = 0;
    vd_node *node;
    vd_error err = VD_ERROR_INIT;

    sh("cp '%s' '%s' && cp '%s' '%s'", basep, a, basep, b);
    sh("qemu-img check -q -r all '%s'", a);
    node = open_img(b, true);
    if (node && load(node, &l, &n) == 0) {
        CHECK(node->drv->bitmaps_store(node, l, n, &err) == 0, "store: %s",
              err.message);
    }
    vd_bitmap_images_free(l, n);
    close_img(&node);
    CHECK(sh("cmp -s '%s' '%s'", a, b) == 0, "storing the unchanged "
          "bitmaps gives another file than QEMU's (%s, %s)", a, b);
    free(a);
    free(b);
}

static void test_store(const char *basep)
{
    char *p = path_of("store.qcow2"), *c = path_of("convert.qcow2");
    vd_bitmap_image *l = NULL, *nl = NULL;
    size_t n = 0, nn = 0;
    vd_error err = VD_ERROR_INIT;
    vd_node *node;
    char *info, *want;
    uint64_t nb;

    sh("cp '%s' '%s'", basep, p);
    node = open_img(p, true);
    if (!node || load(node, &l, &n) < 0) {
        close_img(&node);
        goto out;
    }
    /* A writable load marks every bitmap in use on disk. */
    info = info_bitmaps(p, true);
    CHECK(asprintf(&want, "\"bitmaps\":[{\"flags\":[\"in-use\",\"auto\"],"
                   "\"name\":\"b1\",\"granularity\":%" PRIu64 "},{\"flags\":"
                   "[\"in-use\",\"auto\"],\"name\":\"b2\",\"granularity\":"
                   "4096},{\"flags\":[\"in-use\"],\"name\":\"b3\","
                   "\"granularity\":%" PRIu64 "},{\"flags\":[\"in-use\","
                   "\"auto\"],\"name\":\"b4\",\"granularity\":512}]",
                   default_gran, default_gran) > 0, "asprintf");
    CHECK(!strcmp(info, want), "after a writable load qemu-img info says "
          "%s", info);
    free(info);
    free(want);

    /* The new set: b1 gains a range, b2 is emptied, b3 goes, b4 is
     * disabled, b5 is new (128 KiB, enabled, two ranges). */
    nl = calloc(4, sizeof(*nl));
    for (size_t i = 0; i < n; i++) {
        if (!strcmp(l[i].name, "b3")) {
            continue;
        }
        nl[nn] = l[i];
        nl[nn].name = strdup(l[i].name);
        nb = nbytes_of(l[i].disk_size, l[i].granularity);
        nl[nn].bits = malloc(nb);
        memcpy(nl[nn].bits, l[i].bits, nb);
        if (!strcmp(l[i].name, "b1")) {
            set_range(nl[nn].bits, l[i].granularity, 2 << 20, 200000);
        } else if (!strcmp(l[i].name, "b2")) {
            memset(nl[nn].bits, 0, nb);
        } else if (!strcmp(l[i].name, "b4")) {
            nl[nn].enabled = false;
        }
        nn++;
    }
    nl[nn].name = strdup("b5");
    nl[nn].granularity = 131072;
    nl[nn].enabled = true;
    nl[nn].disk_size = DISK;
    nl[nn].bits = calloc(1, nbytes_of(DISK, 131072));
    set_range(nl[nn].bits, 131072, 0, 1);
    set_range(nl[nn].bits, 131072, DISK - 1, 1);
    nn++;
    CHECK(node->drv->bitmaps_store(node, nl, nn, &err) == 0, "store: %s",
          err.message);
    close_img(&node);

    qemu_check_clean(p, "after store");
    info = info_bitmaps(p, false);
    CHECK(asprintf(&want, "\"bitmaps\":[{\"flags\":[\"auto\"],\"name\":"
                   "\"b1\",\"granularity\":%" PRIu64 "},{\"flags\":"
                   "[\"auto\"],\"name\":\"b2\",\"granularity\":4096},"
                   "{\"flags\":[],\"name\":\"b4\",\"granularity\":512},"
                   "{\"flags\":[\"auto\"],\"name\":\"b5\",\"granularity\":"
                   "131072}]", default_gran) > 0, "asprintf");
    CHECK(!strcmp(info, want), "after store qemu-img info says %s", info);
    free(info);
    free(want);
    /* QEMU reads what vdisk wrote, also through a convert --bitmaps. */
    CHECK(sh("qemu-img convert -f qcow2 -O qcow2 --bitmaps '%s' '%s'", p,
             c) == 0, "qemu-img convert --bitmaps failed");
    for (size_t i = 0; i < nn; i++) {
        nb = nbytes_of(nl[i].disk_size, nl[i].granularity);
        compare_loaded(&nl[i], p, NULL, "stored");
        compare_loaded(&nl[i], c, NULL, "converted");
    }
    /* And vdisk reads back what it wrote. */
    node = open_img(p, false);
    vd_bitmap_images_free(l, n);
    l = NULL;
    n = 0;
    if (node && load(node, &l, &n) == 0) {
        CHECK(n == nn, "reloaded %zu bitmaps, stored %zu", n, nn);
        for (size_t i = 0; i < nn && i < n; i++) {
            nb = nbytes_of(nl[i].disk_size, nl[i].granularity);
            CHECK(!strcmp(l[i].name, nl[i].name) && l[i].bits &&
                  !memcmp(l[i].bits, nl[i].bits, nb) &&
                  l[i].enabled == nl[i].enabled, "reloaded %s differs",
                  nl[i].name);
        }
    }
    close_img(&node);
out:
    vd_bitmap_images_free(l, n);
    vd_bitmap_images_free(nl, nn);
    free(p);
    free(c);
}

/* Invalid sets are refused before anything is written. */
static void test_invalid(const char *basep)
{
    char *p = path_of("invalid.qcow2");
    vd_bitmap_image *l = NULL;
    size_t n = 0;
    vd_node *node;
    char *before, *after;
    char longname[1100];

    sh("cp '%s' '%s'", basep, p);
    node = open_img(p, true);
    if (!node || load(node, &l, &n) < 0 || n < 2) {
        close_img(&node);
        vd_bitmap_images_free(l, n);
        free(p);
        return;
    }
    memset(longname, 'x', 1024);
    longname[1024] = 0;
    before = file_sha(p);
    for (int k = 0; k < 7; k++) {
        vd_bitmap_image saved = l[0];
        char *saved1 = l[1].name;
        vd_error err = VD_ERROR_INIT;
        const char *want = "";

        switch (k) {
        case 0: l[0].granularity = 3000; want = "power of 2"; break;
        case 1: l[0].granularity = 256; want = "Granularity is under "
                "minimum (512 bytes)"; break;
        case 2: l[0].granularity = 1ull << 32; want = "Granularity exceeds "
                "maximum (2147483648 bytes)"; break;
        case 3: l[0].disk_size = DISK + 512; want = "covers"; break;
        case 4: l[1].name = l[0].name; want = "Bitmap already exists: b1";
                break;
        case 5: l[0].name = longname; want = "Name length exceeds maximum "
                "(1023 characters)"; break;
        case 6: free(l[0].bits); l[0].bits = NULL; saved.bits = NULL;
                want = "has no bits"; break;
        }
        CHECK(node->drv->bitmaps_store(node, l, n, &err) < 0 &&
              strstr(err.message, want), "invalid set %d: '%s'", k,
              err.message);
        l[0] = saved;
        l[1].name = saved1;
    }
    vd_node_flush(node, NULL);
    after = file_sha(p);
    CHECK(!strcmp(before, after), "a refused store changed the file");
    /* b1 has no bits any more: given in use, it keeps its entry. */
    l[0].in_use = true;
    {
        vd_error err = VD_ERROR_INIT;
        CHECK(node->drv->bitmaps_store(node, l, n, &err) == 0, "store: %s",
              err.message);
    }
    close_img(&node);
    {
        char *info = info_bitmaps(p, false);
        CHECK(strstr(info, "{\"flags\":[\"in-use\",\"auto\"],\"name\":\"b1\"")
              && strstr(info, "{\"flags\":[\"auto\"],\"name\":\"b2\""),
              "in-use b1 and stored b2 expected: %s", info);
        free(info);
    }
    qemu_check_clean(p, "after an in-use store");
    free(before);
    free(after);
    vd_bitmap_images_free(l, n);
    free(p);
}

/* A process killed after a writable load leaves the bitmaps in use;
 * they load as in use and stay so when stored as such. */
static void test_crash(const char *basep)
{
    char *p = path_of("crash.qcow2");
    vd_bitmap_image *l = NULL;
    size_t n = 0;
    vd_node *node;
    pid_t pid;
    int st = 0;
    char *info;

    sh("cp '%s' '%s'", basep, p);
    fflush(NULL);
    pid = fork();
    if (pid == 0) {
        vd_node *c = NULL;
        vd_bitmap_image *cl = NULL;
        size_t cn = 0;
        if (vd_open(&c, p, "qcow2", NULL, VD_O_RDWR | VD_O_QUIET |
                    VD_NODE_NO_BITMAPS, NULL) ==
            0 && c->drv->bitmaps_load(c, &cl, &cn, NULL) == 0) {
            vd_pwrite(c, "x", 1, 0, 0, NULL);
            kill(getpid(), SIGKILL);
        }
        _exit(3);
    }
    waitpid(pid, &st, 0);
    CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL, "child status %d", st);
    info = info_bitmaps(p, false);
    CHECK(strstr(info, "{\"flags\":[\"in-use\",\"auto\"],\"name\":\"b1\"") &&
          strstr(info, "{\"flags\":[\"in-use\"],\"name\":\"b3\""),
          "after kill -9 qemu-img info says %s", info);
    free(info);
    node = open_img(p, true);
    if (node && load(node, &l, &n) == 0) {
        vd_error err = VD_ERROR_INIT;
        for (size_t i = 0; i < n; i++) {
            CHECK(l[i].in_use && !l[i].bits, "%s: not in use after a crash",
                  l[i].name);
        }
        CHECK(node->drv->bitmaps_store(node, l, n, &err) == 0, "store: %s",
              err.message);
    }
    close_img(&node);
    info = info_bitmaps(p, false);
    CHECK(strstr(info, "{\"flags\":[\"in-use\",\"auto\"],\"name\":\"b1\""),
          "in-use bitmaps lost their flag: %s", info);
    free(info);
    vd_bitmap_images_free(l, n);
    free(p);
}

static void test_remove_can_store(const char *basep)
{
    char *p = path_of("remove.qcow2"), *v2 = path_of("v2.qcow2");
    vd_error err = VD_ERROR_INIT;
    vd_node *node;
    char *info, *qmsg;

    sh("cp '%s' '%s'", basep, p);
    node = open_img(p, true);
    if (node) {
        CHECK(node->drv->bitmap_remove(node, "b2", &err) == 0, "remove: %s",
              err.message);
        CHECK(node->drv->bitmap_remove(node, "nope", &err) == 0,
              "remove of an absent bitmap: %s", err.message);
        vd_error_clear(&err);
        CHECK(node->drv->bitmap_can_store(node, "b1", 65536, &err) < 0 &&
              !strcmp(err.message, "Bitmap already exists: b1"),
              "can_store existing: '%s'", err.message);
        vd_error_clear(&err);
        CHECK(node->drv->bitmap_can_store(node, "new", 1ull << 32, &err) <
              0 && strstr(err.message, "Can't make bitmap 'new' persistent "
                          "in '") && strstr(err.message, "': Granularity "
                          "exceeds maximum (2147483648 bytes)"),
              "can_store granularity: '%s'", err.message);
        vd_error_clear(&err);
        CHECK(node->drv->bitmap_can_store(node, "new", 65536, &err) == 0,
              "can_store: '%s'", err.message);
    }
    close_img(&node);
    info = info_bitmaps(p, false);
    CHECK(strstr(info, "\"b1\"") && !strstr(info, "\"b2\"") &&
          strstr(info, "\"b3\""), "after remove: %s", info);
    free(info);
    qemu_check_clean(p, "after remove");

    /* v2: QEMU's text after the prefix, taken from qemu-img. */
    sh("qemu-img create -q -f qcow2 -o compat=0.10 '%s' 1M", v2);
    qmsg = sh_out("qemu-img bitmap --add '%s' x 2>&1 | sed 's/.*: //'", v2);
    qmsg[strcspn(qmsg, "\n")] = 0;
    node = open_img(v2, true);
    vd_error_clear(&err);
    if (node) {
        CHECK(node->drv->bitmap_can_store(node, "x", 65536, &err) < 0 &&
              *qmsg && strstr(err.message, qmsg), "v2: '%s' (QEMU: '%s')",
              err.message, qmsg);
    }
    close_img(&node);
    free(qmsg);
    free(p);
    free(v2);
}

/* The autoclear bit: writing without loading leaves the bitmaps stale
 * (QEMU then lists none); loading keeps them; a stale extension (bit
 * cleared by an older writer) loads no bitmap. */
static void test_autoclear(const char *basep)
{
    char *p = path_of("autoclear.qcow2");
    vd_bitmap_image *l = NULL;
    size_t n = 0;
    vd_node *node;
    char *info;

    sh("cp '%s' '%s'", basep, p);
    node = open_img(p, true);
    if (node) {
        CHECK(vd_pwrite(node, "y", 1, 0, 0, NULL) == 0, "write");
    }
    close_img(&node);
    info = info_bitmaps(p, false);
    CHECK(!strcmp(info, ""), "a write without load left bitmaps: %s", info);
    free(info);

    sh("cp '%s' '%s'", basep, p);
    node = open_img(p, true);
    if (node && load(node, &l, &n) == 0) {
        vd_error err = VD_ERROR_INIT;
        CHECK(vd_pwrite(node, "y", 1, 0, 0, NULL) == 0, "write");
        CHECK(node->drv->bitmaps_store(node, l, n, &err) == 0, "store: %s",
              err.message);
    }
    close_img(&node);
    vd_bitmap_images_free(l, n);
    l = NULL;
    n = 0;
    info = info_bitmaps(p, false);
    CHECK(strstr(info, "{\"flags\":[\"auto\"],\"name\":\"b1\""),
          "a loaded and stored set is gone: %s", info);
    free(info);

    /* Clear the autoclear bit (header bytes 88..95) by hand. */
    sh("printf '\\000\\000\\000\\000\\000\\000\\000\\000' | dd of='%s' bs=1 "
       "seek=88 conv=notrunc status=none", p);
    node = open_img(p, false);
    if (node && load(node, &l, &n) == 0) {
        CHECK(n == 0, "a stale extension loaded %zu bitmaps", n);
    }
    close_img(&node);
    vd_bitmap_images_free(l, n);

    /* A remove without a load, then a write: the bitmaps nobody loaded
     * did not see the write, so they must end up stale all the same. */
    sh("cp '%s' '%s'", basep, p);
    node = open_img(p, true);
    if (node) {
        vd_error err = VD_ERROR_INIT;
        CHECK(node->drv->bitmap_remove(node, "b2", &err) == 0, "remove: %s",
              err.message);
        CHECK(vd_pwrite(node, "y", 1, 0, 0, NULL) == 0, "write");
    }
    close_img(&node);
    info = info_bitmaps(p, false);
    CHECK(!strcmp(info, ""), "a write after a remove without load left "
          "bitmaps: %s", info);
    free(info);

    free(p);
}

/* A table entry with the all-ones flag loads as a cluster of ones: every
 * table entry of b4 (512 B granules) made all-ones by hand; its old data
 * clusters leak, which does not matter to a read-only load. */
static void test_all_ones(const char *basep)
{
    char *p = path_of("ones.qcow2");
    vd_bitmap_image *l = NULL;
    size_t n = 0;
    vd_node *node;
    char *out;
    unsigned long long toff = 0;

    sh("cp '%s' '%s'", basep, p);
    /* The directory: from the bitmaps extension; b4 is its 4th entry. */
    out = sh_out("python3 - '%s' <<'EOF'\n"
                 "import struct,sys\n"
                 "f=open(sys.argv[1],'rb'); h=f.read(65536)\n"
                 "hl=struct.unpack('>I',h[100:104])[0]; pos=hl\n"
                 "while True:\n"
                 "  t,ln=struct.unpack('>II',h[pos:pos+8])\n"
                 "  if t==0x23852875:\n"
                 "    nb,_,sz,off=struct.unpack('>IIQQ',h[pos+8:pos+32]); break\n"
                 "  pos+=8+(ln+7)//8*8\n"
                 "f.seek(off); d=f.read(sz); p=0\n"
                 "while p<len(d):\n"
                 "  to,ts,fl,ty,g,nl,ex=struct.unpack('>QIIBBHI',d[p:p+24])\n"
                 "  name=d[p+24:p+24+nl].decode()\n"
                 "  if name=='b4':\n"
                 "    g=open(sys.argv[1],'r+b'); g.seek(to)\n"
                 "    g.write(struct.pack('>Q',1)*ts); g.close(); print(to)\n"
                 "  p+=(24+nl+7)//8*8\n"
                 "EOF", p);
    toff = strtoull(out, NULL, 10);
    free(out);
    CHECK(toff != 0, "no table offset for b4");
    if (!toff) {
        free(p);
        return;
    }
    node = open_img(p, false);
    if (node && load(node, &l, &n) == 0) {
        const vd_bitmap_image *b = find(l, n, "b4");
        uint64_t nbits = (DISK + 511) / 512;
        bool ok = b && b->bits;
        for (uint64_t i = 0; ok && i < nbits; i++) {
            ok = (b->bits[i / 8] >> (i % 8)) & 1;
        }
        CHECK(ok, "an all-ones entry did not load as ones");
        if (ok) {
            /* QEMU sets the whole last 64-bit word: hash it that way. */
            uint64_t nb = (nbits + 7) / 8, words = (nb + 7) / 8 * 8;
            uint8_t *w = malloc(words);
            char *q = qemu_sha(p, "b4"), *v;
            memset(w, 0xff, words);
            v = bits_sha(w, words);
            CHECK(strlen(q) == 64 && !strcmp(q, v), "all-ones: QEMU's "
                  "sha256 %s, expected %s", q, v);
            free(w);
            free(q);
            free(v);
        }
    }
    close_img(&node);
    vd_bitmap_images_free(l, n);
    free(p);
}


/* Regression: the repair of a dirty image at open ran with the bitmaps
 * autoclear bit already taken away, so it freed the bitmaps' clusters as
 * leaks, and the load and store that followed wrote into freed clusters
 * and freed them twice. */
static void test_dirty_repair(const char *basep)
{
    char *p = path_of("dirty.qcow2");
    vd_bitmap_image *l = NULL;
    size_t n = 0;
    vd_node *node;
    char *info;

    /* Set the dirty bit (incompatible features, bit 0 at byte 79). */
    sh("cp '%s' '%s' && printf '\\001' | dd of='%s' bs=1 seek=79 "
       "conv=notrunc status=none", basep, p, p);
    node = open_img(p, true);
    if (node && load(node, &l, &n) == 0) {
        vd_error err = VD_ERROR_INIT;
        CHECK(n == NBASE, "loaded %zu bitmaps after the repair", n);
        for (size_t i = 0; i < n; i++) {
            CHECK(!l[i].in_use && l[i].bits, "%s unusable after the repair",
                  l[i].name);
        }
        CHECK(node->drv->bitmaps_store(node, l, n, &err) == 0, "store: %s",
              err.message);
    }
    close_img(&node);
    qemu_check_clean(p, "after the repair, load and store");
    info = info_bitmaps(p, false);
    CHECK(strstr(info, "{\"flags\":[\"auto\"],\"name\":\"b1\"") &&
          !strstr(info, "in-use"), "after the repair: %s", info);
    free(info);
    for (size_t i = 0; i < n; i++) {
        if (l[i].bits) {
            uint8_t *want = expected(DISK, l[i].granularity, l[i].enabled);
            CHECK(!memcmp(l[i].bits, want, nbytes_of(DISK, l[i].granularity)),
                  "%s: bits after the repair", l[i].name);
            compare_loaded(&l[i], p, want, "repaired");
            free(want);
        }
    }
    vd_bitmap_images_free(l, n);
    free(p);
}

/* Three bitmaps of QEMU's largest size (512 MiB each: 2 TiB at 512-byte
 * granules) need more memory than load allows itself: refused with a
 * message, nothing allocated past the limit; qemu-img info still works. */
static void test_mem_limit(void)
{
    char *p = path_of("big.qcow2");
    vd_bitmap_image *l = NULL;
    size_t n = 0;
    vd_node *node;

    CHECK(sh("qemu-img create -q -f qcow2 '%s' 2T && for b in x y z; do "
             "qemu-img bitmap --add -g 512 '%s' $b || exit 1; done", p,
             p) == 0, "could not make the 2 TiB image");
    node = open_img(p, false);
    if (node) {
        vd_error err = VD_ERROR_INIT;
        CHECK(node->drv->bitmaps_load(node, &l, &n, &err) == -ENOMEM &&
              strstr(err.message, "MiB of memory to load") && !l && !n,
              "load of 1.5 GiB of bitmaps: '%s'", err.message);
    }
    close_img(&node);
    free(p);
}

/* ---- crash at every write of a load and a store ----------------------- */

/* The file node's driver, wrapped: after @writes_left writes (and zero
 * writes, discards) every further one fails, and the process then exits
 * without closing: the file holds exactly what a machine that crashed
 * at that point would keep if every write before reached the disk. */
static const vd_driver *real_file;
static vd_driver crashing_file;
static int writes_left;

static int crash_pwritev(vd_node *n, uint64_t off, uint64_t bytes,
                         vd_iov *qiov, unsigned flags, vd_error *err)
{
    if (writes_left-- <= 0) {
        return vd_error_set(err, -EIO, "crashed");
    }
    return real_file->pwritev(n, off, bytes, qiov, flags, err);
}

static int crash_pwrite_zeroes(vd_node *n, uint64_t off, uint64_t bytes,
                               unsigned flags, vd_error *err)
{
    if (writes_left-- <= 0) {
        return vd_error_set(err, -EIO, "crashed");
    }
    return real_file->pwrite_zeroes ?
           real_file->pwrite_zeroes(n, off, bytes, flags, err) : -ENOTSUP;
}

static int crash_pdiscard(vd_node *n, uint64_t off, uint64_t bytes,
                          vd_error *err)
{
    if (writes_left-- <= 0) {
        return vd_error_set(err, -EIO, "crashed");
    }
    return real_file->pdiscard ? real_file->pdiscard(n, off, bytes, err)
                               : 0;
}

static int count_of(const char *s, const char *what)
{
    int n = 0;
    for (const char *p = strstr(s, what); p; p = strstr(p + 1, what)) {
        n++;
    }
    return n;
}

/* The child: load, change the set as test_store() does (b1 gains a
 * range, b3 goes, b5 is new), store, then exit at once. Status 0 when
 * the store succeeded. */
static void crash_child(const char *p, int budget)
{
    vd_node *node = NULL;
    vd_bitmap_image *l = NULL;
    size_t n = 0;
    int ok;

    if (vd_open(&node, p, "qcow2", NULL, VD_O_RDWR | VD_O_NO_BACKING |
                VD_O_QUIET | VD_NODE_NO_BITMAPS, NULL) < 0) {
        _exit(2);
    }
    real_file = node->file->node->drv;
    crashing_file = *real_file;
    crashing_file.pwritev = crash_pwritev;
    crashing_file.pwrite_zeroes = crash_pwrite_zeroes;
    crashing_file.pdiscard = crash_pdiscard;
    node->file->node->drv = &crashing_file;
    writes_left = budget;
    ok = node->drv->bitmaps_load(node, &l, &n, NULL) == 0;
    for (size_t i = 0; ok && i < n; i++) {
        if (!strcmp(l[i].name, "b1")) {
            set_range(l[i].bits, l[i].granularity, 2 << 20, 200000);
        } else if (!strcmp(l[i].name, "b3")) {
            l[i] = l[--n];
            i--;
        }
    }
    if (ok) {
        vd_bitmap_image *nl = realloc(l, (n + 1) * sizeof(*l));
        ok = nl != NULL;
        if (ok) {
            l = nl;
            memset(&l[n], 0, sizeof(l[n]));
            l[n].name = strdup("b5");
            l[n].granularity = 131072;
            l[n].disk_size = DISK;
            l[n].bits = calloc(1, nbytes_of(DISK, 131072));
            set_range(l[n].bits, 131072, 0, 1);
            n++;
        }
    }
    ok = ok && node->drv->bitmaps_store(node, l, n, NULL) == 0;
    _exit(ok && writes_left >= 0 ? 0 : 1);
}

static void test_crash_points(const char *basep)
{
    char *p = path_of("points.qcow2");
    char *old_info = info_bitmaps(basep, false), *new_info = NULL;
    const char *names[] = { "b1", "b2", "b3", "b4", "b5" };
    char *old_sha[5] = { 0 }, *new_sha[5] = { 0 };
    int budget, seen_new = 0, seen_old = 0, seen_other = 0;

    for (int i = 0; i < 4; i++) {
        old_sha[i] = qemu_sha(basep, names[i]);
    }
    for (budget = 0; budget < 400; budget++) {
        pid_t pid;
        int st = 0, rc;
        char *info, *out;

        sh("cp '%s' '%s'", basep, p);
        fflush(NULL);
        pid = fork();
        if (pid == 0) {
            crash_child(p, budget);
        }
        waitpid(pid, &st, 0);
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) <= 1, "budget %d: child "
              "status %d", budget, st);
        /* Never corrupt: leaks (exit 3) are what a crash may leave. */
        out = sh_out("qemu-img check '%s' >/dev/null 2>&1; echo $?", p);
        rc = atoi(out);
        free(out);
        CHECK(rc == 0 || rc == 3, "budget %d: qemu-img check exit %d",
              budget, rc);
        /* The bitmaps are the old ones, marked in use, stale, or the new
         * ones with the new contents: never consistent and wrong. */
        info = info_bitmaps(p, false);
        if (WEXITSTATUS(st) == 0 && !new_info) {
            new_info = strdup(info);
            for (int i = 0; i < 5; i++) {
                new_sha[i] = i == 2 ? strdup("") : qemu_sha(p, names[i]);
            }
        }
        if (!strcmp(info, old_info)) {
            seen_old++;
            for (int i = 0; i < 4; i++) {
                char *q = qemu_sha(p, names[i]);
                CHECK(!strcmp(q, old_sha[i]), "budget %d: %s consistent "
                      "with other contents", budget, names[i]);
                free(q);
            }
        } else if (new_info && !strcmp(info, new_info)) {
            seen_new++;
        } else {
            seen_other++;
            CHECK(count_of(info, "\"name\"") ==
                  count_of(info, "\"in-use\""), "budget %d: a "
                  "consistent bitmap in a state that is neither the old "
                  "nor the new: %s", budget, info);
        }
        free(info);
        if (WEXITSTATUS(st) == 0) {
            break;
        }
    }
    CHECK(new_info != NULL, "the store never completed");
    if (new_info) {
        /* The new contents: what the requests and the changes imply. */
        const uint64_t gran[5] = { default_gran, 4096, 0, 512, 131072 };
        for (int i = 0; i < 5; i++) {
            uint8_t *want;
            char *v;
            if (i == 2) {
                continue;
            }
            want = expected(DISK, gran[i], i != 4);
            if (i == 0) {
                set_range(want, gran[i], 2 << 20, 200000);
            } else if (i == 4) {
                set_range(want, gran[i], 0, 1);
            }
            v = bits_sha(want, nbytes_of(DISK, gran[i]));
            CHECK(!strcmp(v, new_sha[i]), "stored %s: QEMU's sha256 %s, "
                  "expected %s", names[i], new_sha[i], v);
            free(v);
            free(want);
        }
    }
    printf("crash points: %d, old state %d, in use or stale %d, new %d\n",
           budget + 1, seen_old, seen_other, seen_new);
    for (int i = 0; i < 5; i++) {
        free(old_sha[i]);
        free(new_sha[i]);
    }
    free(old_info);
    free(new_info);
    free(p);
}

int main(void)
{
    char *basep = NULL;

    if (sh("command -v qemu-img && command -v qemu-io && "
           "command -v qemu-storage-daemon && command -v python3") != 0) {
        printf("test-qcow2-bitmaps: QEMU's tools missing, skipped\n");
        return 77;
    }
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    /* 64 KiB clusters: every bitmap in one cluster; 512 B clusters:
     * b4 (4097 bytes) spans 9 clusters, 5 of them zero (table entry 0). */
    for (int i = 0; i < 2 && !failures; i++) {
        const char *cs = i ? "512" : "65536";
        default_gran = i ? 4096 : 65536;
        printf("cluster size %s\n", cs);
        fflush(stdout);
        free(basep);
        basep = path_of(i ? "base512.qcow2" : "base.qcow2");
        CHECK(make_base(basep, cs) == 0, "could not make the base image");
        if (!failures) {
            test_load(basep);
            test_twin_store(basep);
            test_store(basep);
            test_invalid(basep);
            test_crash(basep);
            test_remove_can_store(basep);
            test_autoclear(basep);
            test_all_ones(basep);
            test_crash_points(basep);
            test_dirty_repair(basep);
        }
    }
    if (!failures) {
        test_mem_limit();
    }
    if (!failures) {
        sh("rm -rf '%s'", dir);
    } else {
        fprintf(stderr, "images left in %s\n", dir);
    }
    free(basep);
    TEST_EXIT("test-qcow2-bitmaps");
}
