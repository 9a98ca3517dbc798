/*
 * Unit tests of the copy-before-write filter and the snapshot-access
 * node over it (src/drivers/copy-before-write.c, snapshot-access.c): a
 * raw source over a file whose every 512-byte sector holds its own
 * number, a raw target, the filter and the snapshot node built as QMP's
 * blockdev-add builds them (no opener; users for the guest and the
 * reader). Threads write data, zeros and discards through the filter
 * while others read the snapshot: every snapshot read must show the
 * sectors' numbers, whatever the writers did meanwhile (the point in
 * time), and the source must hold what the writers wrote last. Also the
 * snapshot's discard (the range can no longer be read), writes refused
 * on the snapshot, and the permissions the filter takes once it has a
 * parent.
 *
 * Exits 0 on success, 1 on a failed check, 77 when the scratch directory
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
#include <unistd.h>

#include "core/block_int.h"

#include "check.h"

#define SIZE (8u << 20)
#define SECTOR 512u

static char dir[256];

static void make_file(const char *name, bool numbered)
{
    char p[512];
    snprintf(p, sizeof(p), "%s/%s", dir, name);
    int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    uint8_t *buf = calloc(1, SIZE);
    if (fd < 0 || !buf) {
        fprintf(stderr, "cannot make %s\n", p);
        exit(1);
    }
    for (uint32_t s = 0; numbered && s < SIZE / SECTOR; s++)
        memcpy(buf + (size_t)s * SECTOR, &s, sizeof(s));
    if (write(fd, buf, SIZE) != (ssize_t)SIZE) {
        fprintf(stderr, "cannot write %s\n", p);
        exit(1);
    }
    close(fd);
    free(buf);
}

static vd_node *add(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static vd_node *add(const char *fmt, ...)
{
    char json[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(json, sizeof(json), fmt, ap);
    va_end(ap);
    vd_error err = VD_ERROR_INIT;
    vd_opts *o = vd_opts_new();
    vd_node *n = NULL;
    int r = vd_opts_from_json(o, json, &err);
    if (r == 0)
        r = vd_open(&n, NULL, NULL, o, VD_O_RDWR | VD_O_NO_USER | VD_O_QUIET,
                    &err);
    vd_opts_free(&o);
    CHECK(r == 0, "%s: %s", json, err.message);
    return r == 0 ? n : NULL;
}

/* Whether [off, off+len) of @buf holds the sectors' numbers. */
static bool numbered(const uint8_t *buf, uint64_t off, uint64_t len)
{
    for (uint64_t s = off / SECTOR; s * SECTOR < off + len; s++) {
        uint32_t v;
        memcpy(&v, buf + (s * SECTOR - off), sizeof(v));
        if (v != s)
            return false;
    }
    return true;
}

typedef struct worker {
    vd_node *node;
    unsigned seed;
    int errors;
    int mismatches;
} worker;

static void *writer(void *opaque)
{
    worker *w = opaque;
    uint8_t *buf = malloc(256 * 1024);
    for (int i = 0; i < 800; i++) {
        uint64_t off = (uint64_t)(rand_r(&w->seed) % (SIZE / SECTOR)) * SECTOR;
        uint64_t len = (1 + rand_r(&w->seed) % 400) * SECTOR;
        if (off + len > SIZE)
            len = SIZE - off;
        memset(buf, 0xa0 + i % 16, len);
        vd_error err = VD_ERROR_INIT;
        int r;
        switch (i % 5) {
        case 3:
            r = vd_node_pwrite_zeroes(w->node, off, len, 0, &err);
            break;
        case 4:
            r = vd_node_pdiscard(w->node, off, len, &err);
            break;
        default: {
            vd_iov v;
            vd_iov_init_buf(&v, buf, len);
            r = vd_node_pwritev(w->node, off, len, &v, 0, &err);
        }
        }
        if (r < 0)
            w->errors++;
    }
    free(buf);
    return NULL;
}

static void *reader(void *opaque)
{
    worker *w = opaque;
    uint8_t *buf = malloc(512 * 1024);
    for (int i = 0; i < 800; i++) {
        uint64_t off = (uint64_t)(rand_r(&w->seed) % (SIZE / SECTOR)) * SECTOR;
        uint64_t len = (1 + rand_r(&w->seed) % 1000) * SECTOR;
        if (off + len > SIZE)
            len = SIZE - off;
        vd_error err = VD_ERROR_INIT;
        vd_iov v;
        vd_iov_init_buf(&v, buf, len);
        if (vd_node_preadv(w->node, off, len, &v, 0, &err) < 0)
            w->errors++;
        else if (!numbered(buf, off, len))
            w->mismatches++;
    }
    free(buf);
    return NULL;
}

static void test_point_in_time(void)
{
    make_file("src.img", true);
    make_file("tgt.img", false);
    vd_node *src = add("{\"driver\": \"raw\", \"node-name\": \"src\", "
                       "\"discard\": \"unmap\", \"file\": {\"driver\": "
                       "\"file\", \"filename\": \"%s/src.img\"}}", dir);
    vd_node *tgt = add("{\"driver\": \"raw\", \"node-name\": \"tgt\", "
                       "\"file\": {\"driver\": \"file\", \"filename\": "
                       "\"%s/tgt.img\"}}", dir);
    vd_node *cbw = add("{\"driver\": \"copy-before-write\", \"node-name\": "
                       "\"cbw\", \"file\": \"src\", \"target\": \"tgt\"}");
    vd_node *sa = add("{\"driver\": \"snapshot-access\", \"node-name\": "
                      "\"sa\", \"file\": \"cbw\"}");
    if (!src || !tgt || !cbw || !sa)
        return;

    /* Once the filter has a parent, nobody else may write the source. */
    vd_error err = VD_ERROR_INIT;
    vd_user *other = NULL;
    int r = vd_user_new(&other, src, "another writer", VD_PERM_WRITE,
                        VD_PERM_ALL, &err);
    CHECK(r == -EPERM, "a second writer of the source: %d", r);
    vd_user_free(&other);

    vd_user *guest = NULL, *rd = NULL;
    err = (vd_error)VD_ERROR_INIT;
    r = vd_user_new(&guest, cbw, "guest", VD_PERM_WRITE |
                    VD_PERM_CONSISTENT_READ, VD_PERM_ALL, &err);
    CHECK(r == 0, "guest user: %s", err.message);
    /* As a writable export of the snapshot (writes are refused by the
     * driver; discards give ranges up). */
    r = vd_user_new(&rd, sa, "reader", VD_PERM_CONSISTENT_READ |
                    VD_PERM_WRITE, VD_PERM_ALL, &err);
    CHECK(r == 0, "reader user: %s", err.message);

    worker w[4] = {
        { cbw, 1, 0, 0 }, { cbw, 2, 0, 0 }, { sa, 3, 0, 0 }, { sa, 4, 0, 0 },
    };
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, i < 2 ? writer : reader, &w[i]);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    CHECK(w[0].errors + w[1].errors == 0, "writes through the filter failed");
    CHECK(w[2].errors + w[3].errors == 0, "snapshot reads failed");
    CHECK(w[2].mismatches + w[3].mismatches == 0,
          "%d snapshot reads showed new data",
          w[2].mismatches + w[3].mismatches);

    /* The whole snapshot, once more, and the source changed. */
    uint8_t *buf = malloc(SIZE);
    vd_iov v;
    vd_iov_init_buf(&v, buf, SIZE);
    r = vd_node_preadv(sa, 0, SIZE, &v, 0, &err);
    CHECK(r == 0 && numbered(buf, 0, SIZE), "the snapshot is not the start");
    vd_iov_init_buf(&v, buf, SIZE);
    r = vd_node_preadv(src, 0, SIZE, &v, 0, &err);
    CHECK(r == 0 && !numbered(buf, 0, SIZE), "the source did not change");

    /* A write through the snapshot is refused. */
    err = (vd_error)VD_ERROR_INIT;
    vd_iov_init_buf(&v, buf, SECTOR);
    CHECK(vd_node_pwritev(sa, 0, SECTOR, &v, 0, &err) == -ENOTSUP,
          "a write of the snapshot");

    /* A discard of the snapshot gives up whole clusters only. */
    err = (vd_error)VD_ERROR_INIT;
    r = vd_node_pdiscard(sa, 65536 + 512, 3 * 65536, &err);
    CHECK(r == 0, "snapshot discard: %s", err.message);
    vd_iov_init_buf(&v, buf, 4096);
    err = (vd_error)VD_ERROR_INIT;
    CHECK(vd_node_preadv(sa, 65536, 4096, &v, 0, &err) == 0 &&
          numbered(buf, 65536, 4096), "the partly discarded cluster");
    err = (vd_error)VD_ERROR_INIT;
    CHECK(vd_node_preadv(sa, 2 * 65536, 4096, &v, 0, &err) == -EACCES,
          "a discarded cluster is read");
    err = (vd_error)VD_ERROR_INIT;
    vd_iov_init_buf(&v, buf, 65536 * 2);
    CHECK(vd_node_preadv(sa, 65536 * 3, 65536 * 2, &v, 0, &err) == -EACCES,
          "a read across a discarded cluster");
    err = (vd_error)VD_ERROR_INIT;
    CHECK(vd_node_preadv(sa, 65536 * 4, 65536 * 2, &v, 0, &err) == 0 &&
          numbered(buf, 65536 * 4, 65536 * 2), "the cluster after");
    free(buf);

    vd_user_free(&rd);
    vd_user_free(&guest);
    /* The snapshot node is a parent too; without any, the filter shares
     * the source again. */
    err = (vd_error)VD_ERROR_INIT;
    r = vd_user_new(&other, src, "another writer", VD_PERM_WRITE,
                    VD_PERM_ALL, &err);
    CHECK(r == -EPERM, "the source is shared under the snapshot: %d", r);
    vd_user_free(&other);
    vd_close(&sa, NULL);
    err = (vd_error)VD_ERROR_INIT;
    r = vd_user_new(&other, src, "another writer", VD_PERM_WRITE,
                    VD_PERM_ALL, &err);
    CHECK(r == 0, "the source is still not shared: %s", err.message);
    vd_user_free(&other);
    vd_close(&sa, NULL);
    vd_close(&cbw, NULL);
    vd_close(&tgt, NULL);
    vd_close(&src, NULL);
}

int main(void)
{
    snprintf(dir, sizeof(dir), "%s/vdisk-cbw.XXXXXX",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(dir))
        return 77;
    test_point_in_time();
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
    TEST_EXIT("test-cbw");
}
