/*
 * vd_reopen(): switching a raw-over-file graph between read-only and
 * read-write keeps the data, enforces the mode at every step, and a
 * failed reopen (the file made read-only underneath) leaves the node
 * usable in its old mode.
 *
 * vd_reopen_opts() (qemu-io's reopen): the driver's options change in
 * place (raw's window), options the driver or the node cannot change
 * are refused with QEMU's words and change nothing, and a writer keeps
 * the node from going read-only until it gives up its write.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <vdisk/vdisk.h>

#include "check.h"


static vd_opts *opts_of(const char *str)
{
    vd_opts *o = vd_opts_new();
    CHECK(o && vd_opts_parse(o, str, NULL, NULL) == 0, "parse %s", str);
    return o;
}

/* vd_reopen_opts(@str) on @n: its status and, on failure, its message
 * must be @want (NULL: success). */
static void reopen_opts(vd_node *n, const char *str, const char *want)
{
    vd_opts *o = opts_of(str);
    vd_error err = VD_ERROR_INIT;
    int r = vd_reopen_opts(n, o, &err);

    if (want) {
        CHECK(r < 0 && strcmp(err.message, want) == 0,
              "reopen %s: %d '%s', expected '%s'", str, r, err.message,
              want);
    } else {
        CHECK(r == 0, "reopen %s: %s", str, err.message);
    }
    vd_opts_free(&o);
}

static void test_reopen_opts(const char *path)
{
    vd_node *n = NULL;
    vd_error err = VD_ERROR_INIT;
    unsigned char buf[512];

    CHECK(vd_open(&n, path, "raw", NULL, VD_O_RDWR, &err) == 0, "open: %s",
          err.message);
    if (!n)
        return;
    /* raw's window: the length follows the new options, and the bytes
     * are read from the new offset. */
    memset(buf, 0x6b, sizeof(buf));
    CHECK(vd_pwrite(n, buf, 512, 4096, 0, &err) == 0, "write: %s",
          err.message);
    reopen_opts(n, "offset=4096,size=8192", NULL);
    CHECK(vd_getlength(n) == 8192, "length after reopen: %lld",
          (long long)vd_getlength(n));
    memset(buf, 0, sizeof(buf));
    CHECK(vd_pread(n, buf, 512, 0, 0, &err) == 0 && buf[0] == 0x6b &&
          buf[511] == 0x6b, "window moved: %s", err.message);

    /* Refused, and the node keeps its options and its mode. */
    reopen_opts(n, "nosuch=1", "Cannot change the option 'nosuch'");
    reopen_opts(n, "driver=qcow2", "Cannot change the option 'driver'");
    reopen_opts(n, "file.locking=off", "Cannot change the option 'locking'");
    reopen_opts(n, "detect-zeroes=bogus", "invalid parameter value: bogus");
    reopen_opts(n, "discard=bogus", "Invalid discard option");
    CHECK(vd_getlength(n) == 8192 && !vd_node_is_read_only(n),
          "a refused reopen changed the node");
    CHECK(vd_pwrite(n, buf, 512, 512, 0, &err) == 0,
          "write after a refused reopen: %s", err.message);

    reopen_opts(n, "discard=unmap,detect-zeroes=unmap", NULL);
    CHECK(vd_node_discard_unmap(n) &&
          vd_node_detect_zeroes(n) == VD_DETECT_ZEROES_UNMAP,
          "discard/detect-zeroes not changed");
    reopen_opts(n, "cache=writethrough", NULL);
    CHECK(!(vd_node_cache_flags(n) & VD_CACHE_WRITEBACK),
          "cache=writethrough not applied: %#x", vd_node_cache_flags(n));

    /* The opener writes: read-only is refused until it stops. */
    vd_error_clear(&err);
    CHECK(vd_reopen_opts(n, NULL, &err) == 0, "empty reopen: %s",
          err.message);
    vd_opts *ro = opts_of("read-only=on");
    CHECK(vd_reopen_opts(n, ro, &err) == -EPERM &&
          strstr(err.message, "cannot support read-write users"),
          "read-only under a writer: '%s'", err.message);
    CHECK(vd_set_perm(n, VD_PERM_CONSISTENT_READ, VD_PERM_ALL, NULL) == 0,
          "drop write");
    vd_error_clear(&err);
    CHECK(vd_reopen_opts(n, ro, &err) == 0 && vd_node_is_read_only(n),
          "read-only: %s", err.message);
    vd_opts_free(&ro);
    CHECK(vd_pwrite(n, buf, 512, 0, 0, NULL) < 0, "write while read-only");
    reopen_opts(n, "read-only=off", NULL);
    CHECK(vd_pwrite(n, buf, 512, 0, 0, &err) == 0,
          "the opener writes again after read-only=off: %s", err.message);
    vd_close(&n, NULL);
}

int main(void)
{
    char dir[] = "/tmp/vdisk-test-reopen.XXXXXX";
    if (!mkdtemp(dir))
        return 1;
    char path[512];
    snprintf(path, sizeof(path), "%s/img.raw", dir);
    vd_opts *o = vd_opts_new();
    vd_opts_set(o, "size", "1M");
    vd_error err = VD_ERROR_INIT;
    CHECK(vd_create(path, "raw", o, &err) == 0, "create: %s", err.message);
    vd_opts_free(&o);

    vd_node *n = NULL;
    CHECK(vd_open(&n, path, "raw", NULL, 0, &err) == 0, "open: %s",
          err.message);
    if (!n)
        return 1;
    char buf[4096];
    memset(buf, 0x5a, sizeof(buf));
    CHECK(vd_pwrite(n, buf, 4096, 0, 0, NULL) == -EROFS, "write while RO");
    CHECK(vd_reopen(n, true, &err) == 0, "reopen rw: %s", err.message);
    CHECK(!vd_node_is_read_only(n), "still read-only");
    CHECK(vd_pwrite(n, buf, 4096, 8192, 0, &err) == 0, "write: %s",
          err.message);
    CHECK(vd_reopen(n, false, &err) == 0, "reopen ro: %s", err.message);
    CHECK(vd_pwrite(n, buf, 4096, 0, 0, NULL) == -EROFS, "write after RO");
    memset(buf, 0, sizeof(buf));
    CHECK(vd_pread(n, buf, 4096, 8192, 0, &err) == 0 && buf[0] == 0x5a &&
          buf[4095] == 0x5a, "data kept across reopens");

    /* Refuse: the file itself becomes read-only. Root ignores file
     * modes, so this part only runs for other users. */
    if (geteuid() != 0) {
        chmod(path, 0444);
        vd_error_clear(&err);
        CHECK(vd_reopen(n, true, &err) < 0, "reopen rw of a 0444 file");
        CHECK(vd_pread(n, buf, 4096, 8192, 0, NULL) == 0,
              "node unusable after a failed reopen");
    }
    vd_close(&n, NULL);
    chmod(path, 0644);
    test_reopen_opts(path);
    unlink(path);
    rmdir(dir);
    if (failures) {
        fprintf(stderr, "test-reopen: %d failure(s)\n", failures);
        return 1;
    }
    printf("test-reopen: all passed\n");
    return 0;
}
