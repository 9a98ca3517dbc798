/*
 * vd_graph_quiesce_begin()/end() (include/vdisk/vdisk.h), the one point
 * in time of a QMP transaction.
 *
 * A transaction that appended an overlay and then added a bitmap to it
 * let guest writes land in the overlay between the two actions, in no
 * bitmap: the next incremental backup restored a wrong disk without
 * error. Here a thread writes through a user without pause while the main
 * thread, inside a quiesced section, appends an overlay (whose own gate
 * and ungate of the users must not open the section), waits, and adds a
 * bitmap to the overlay: no write may complete inside the section, every
 * write after it must be in the bitmap, and writes resume at its end.
 * Sections nest. Exit 0 pass, 1 fail.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vdisk/bitmap.h"
#include "vdisk/vdisk.h"

#include "check.h"

#define SIZE (4u << 20)
#define BLOCK 4096u

static char dir[] = "/tmp/vdisk-quiesce-XXXXXX";
static vd_user *dev;
static atomic_bool stop;
static atomic_uint completed;    /* writes done */
static atomic_uint failed;
/* The offset of every completed write, in order of completion. */
static uint64_t done_off[1 << 20];

static void *writer(void *opaque)
{
    (void)opaque;
    uint8_t buf[BLOCK];
    memset(buf, 0x5a, sizeof(buf));
    for (unsigned i = 0; !atomic_load(&stop); i++) {
        vd_error err = VD_ERROR_INIT;
        uint64_t off = (uint64_t)(i % (SIZE / BLOCK)) * BLOCK;
        vd_node *n = vd_user_io_begin(dev);
        int r = vd_pwrite(n, buf, BLOCK, off, 0, &err);
        /* Counted before the request ends: a section that has begun
         * sees every write that will ever count as before it. */
        if (r < 0) {
            atomic_fetch_add(&failed, 1);
        } else {
            unsigned k = atomic_load(&completed);
            if (k < sizeof(done_off) / sizeof(done_off[0]))
                done_off[k] = off;
            atomic_store(&completed, k + 1);
        }
        vd_user_io_end(dev);
        vd_error_clear(&err);
    }
    return NULL;
}

static void path_of(char *out, const char *name)
{
    snprintf(out, 512, "%s/%s", dir, name);
}

static void wait_for_writes(unsigned from, unsigned count)
{
    for (int i = 0; i < 500 && atomic_load(&completed) < from + count; i++)
        usleep(2000);
}

int main(void)
{
    vd_error err = VD_ERROR_INIT;
    char base[512], ov[512];

    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    path_of(base, "base.qcow2");
    path_of(ov, "ov.qcow2");
    vd_opts *o = vd_opts_new();
    vd_opts_set(o, "size", "4M");
    CHECK(vd_create(base, "qcow2", o, &err) == 0, "create: %s", err.message);
    vd_opts_set(o, "backing_file", base);
    vd_opts_set(o, "backing_fmt", "qcow2");
    CHECK(vd_create(ov, "qcow2", o, &err) == 0, "create ov: %s",
          err.message);
    vd_opts_free(&o);

    vd_node *top = NULL, *overlay = NULL;
    CHECK(vd_open(&top, base, "qcow2", NULL, VD_O_RDWR | VD_O_NO_USER,
                  &err) == 0, "open: %s", err.message);
    CHECK(vd_open(&overlay, ov, "qcow2", NULL,
                  VD_O_RDWR | VD_O_NO_USER | VD_O_NO_BACKING, &err) == 0,
          "open overlay: %s", err.message);
    CHECK(vd_user_new(&dev, top, "device", VD_PERM_CONSISTENT_READ |
                      VD_PERM_WRITE, VD_PERM_ALL, &err) == 0, "user: %s",
          err.message);
    if (failures)
        TEST_EXIT("test-quiesce");

    pthread_t t;
    pthread_create(&t, NULL, writer, NULL);
    wait_for_writes(0, 50);
    CHECK(atomic_load(&completed) >= 50, "the writer does not write");

    /* Nested sections, an overlay appended and a bitmap added inside. */
    vd_graph_quiesce_begin();
    vd_graph_quiesce_begin();
    unsigned before = atomic_load(&completed);
    CHECK(vd_snapshot_append(top, overlay, &err) == 0, "append: %s",
          err.message);
    CHECK(vd_user_node(dev) == overlay, "the user did not move");
    usleep(50000);
    vd_graph_quiesce_end();
    usleep(20000);
    CHECK(vd_bitmap_add(overlay, "b", 0, 0, &err) == 0, "bitmap: %s",
          err.message);
    unsigned inside = atomic_load(&completed);
    CHECK(inside == before, "%u writes completed inside the section",
          inside - before);
    vd_graph_quiesce_end();

    wait_for_writes(inside, 50);
    unsigned after = atomic_load(&completed);
    CHECK(after >= inside + 50, "writes did not resume (%u)",
          after - inside);
    atomic_store(&stop, true);
    pthread_join(t, NULL);
    after = atomic_load(&completed);
    CHECK(atomic_load(&failed) == 0, "%u writes failed",
          atomic_load(&failed));

    /* Every write after the section is in the bitmap. */
    for (unsigned k = inside;
         k < after && k < sizeof(done_off) / sizeof(done_off[0]); k++) {
        uint64_t start = 0, bytes = 0;
        int r = vd_bitmap_next_dirty(overlay, "b", done_off[k], &start,
                                     &bytes, &err);
        if (r != 1 || start > done_off[k]) {
            CHECK(0, "write %u at %llu is not in the bitmap", k,
                  (unsigned long long)done_off[k]);
            break;
        }
    }

    vd_user_free(&dev);
    CHECK(vd_close(&overlay, &err) == 0, "close: %s", err.message);
    CHECK(vd_close(&top, &err) == 0, "close: %s", err.message);
    unlink(ov);
    unlink(base);
    rmdir(dir);
    TEST_EXIT("test-quiesce");
}
