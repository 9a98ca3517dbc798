/*
 * vd_compact() in the session that wrote the image, as a library user
 * (a backup tool, `vdisk serve`) calls it: with lazy refcounts the
 * session's first allocating write marks the image dirty, and compact
 * used to refuse it ("marked dirty; repair it first") although every
 * refcount was in the session's caches. Now it writes them out and
 * compacts. Checked: the call succeeds, the file shrinks, the content
 * reads the same before and after a reopen, and qemu-img check finds
 * the image clean (when qemu-img is installed). A dirty mark the
 * session did not set (a crash's) is still refused on a read-only dry
 * run, before anything is written.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vdisk/vdisk.h"

#include "check.h"
#include "open.h"

#define MiB (1024 * 1024)
#define SIZE (16 * MiB)

static char dir[] = "/tmp/vdisk-compactsess-XXXXXX";
static char path[300];

static int64_t file_size(void)
{
    struct stat st;

    return stat(path, &st) == 0 ? (int64_t)st.st_size : -1;
}

static vd_node *open_img(unsigned flags)
{
    return open_checked(path, "qcow2", flags);
}

static bool same_content(vd_node *n, const uint8_t *want, const char *when)
{
    uint8_t *buf = malloc(SIZE);
    vd_error err = VD_ERROR_INIT;
    bool same = false;

    if (buf && vd_pread(n, buf, SIZE, 0, 0, &err) == 0) {
        same = memcmp(buf, want, SIZE) == 0;
    }
    CHECK(same, "%s: the content differs (%s)", when, err.message);
    free(buf);
    return same;
}

int main(void)
{
    char cmd[600];
    vd_error err = VD_ERROR_INIT;
    vd_compact_result res;
    uint8_t *model;
    vd_node *n;
    int64_t before;
    int r;

    if (system("qemu-img --version >/dev/null 2>&1") != 0) {
        printf("qemu-img is not installed: skipped\n");
        return 77;
    }
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(path, sizeof(path), "%s/lazy.qcow2", dir);
    snprintf(cmd, sizeof(cmd), "qemu-img create -q -f qcow2 -o "
             "cluster_size=65536,lazy_refcounts=on '%s' %d", path, SIZE);
    CHECK(system(cmd) == 0, "qemu-img create");

    model = calloc(1, SIZE);
    n = open_img(VD_O_RDWR);
    if (!model || !n) {
        return 1;
    }
    /* 16 MiB of data, then every other MiB discarded: holes all over. */
    for (int i = 0; i < SIZE / MiB; i++) {
        memset(model + (size_t)i * MiB, 0x40 + i, MiB);
    }
    CHECK(vd_pwrite(n, model, SIZE, 0, 0, &err) == 0, "write: %s",
          err.message);
    for (int i = 0; i < SIZE / MiB; i += 2) {
        CHECK(vd_discard(n, MiB, (uint64_t)i * MiB, &err) == 0,
              "discard: %s", err.message);
        memset(model + (size_t)i * MiB, 0, MiB);
    }
    CHECK(vd_flush(n, &err) == 0, "flush: %s", err.message);
    before = file_size();

    r = vd_compact(n, NULL, NULL, NULL, &res, &err);
    CHECK(r == 0, "compact after this session's writes: %s", err.message);
    same_content(n, model, "after compact, same session");
    vd_close(&n, NULL);
    CHECK(file_size() < before, "the file did not shrink: %lld -> %lld",
          (long long)before, (long long)file_size());
    snprintf(cmd, sizeof(cmd), "qemu-img check -q '%s' >/dev/null 2>&1",
             path);
    CHECK(system(cmd) == 0, "qemu-img check found errors or leaks");
    n = open_img(0);
    if (n) {
        same_content(n, model, "reopened");
        vd_close(&n, NULL);
    }

    /* A dirty mark left by a crash: the session did not set it. A
     * read-only open cannot repair it, so a dry run refuses. */
    n = open_img(VD_O_RDWR);
    if (n) {
        CHECK(vd_pwrite(n, model + MiB, MiB, 0, 0, &err) == 0, "write: %s",
              err.message);
        CHECK(vd_flush(n, &err) == 0, "flush: %s", err.message);
        /* Copy the dirty file as a crash would leave it. */
        snprintf(cmd, sizeof(cmd), "cp '%s' '%s/crashed.qcow2'", path, dir);
        CHECK(system(cmd) == 0, "cp");
        vd_close(&n, NULL);
    }
    snprintf(path, sizeof(path), "%s/crashed.qcow2", dir);
    n = open_img(0);
    if (n) {
        vd_compact_opts o = { .dry_run = true };
        vd_error_clear(&err);
        r = vd_compact(n, &o, NULL, NULL, &res, &err);
        CHECK(r < 0 && strstr(err.message, "dirty"),
              "a dry run of a crashed lazy image: %d %s", r, err.message);
        vd_close(&n, NULL);
    }

    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    (void)!system(cmd);
    free(model);
    TEST_EXIT("test-compact-session");
}
