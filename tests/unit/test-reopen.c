/*
 * vd_reopen(): switching a raw-over-file graph between read-only and
 * read-write keeps the data, enforces the mode at every step, and a
 * failed reopen (the file made read-only underneath) leaves the node
 * usable in its old mode.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <vdisk/vdisk.h>

#include "check.h"


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
    unlink(path);
    rmdir(dir);
    if (failures) {
        fprintf(stderr, "test-reopen: %d failure(s)\n", failures);
        return 1;
    }
    printf("test-reopen: all passed\n");
    return 0;
}
