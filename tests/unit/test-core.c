/*
 * Unit tests for the core request path (src/core/io.c) and graph
 * (src/core/node.c), driven through a test-only in-memory protocol driver
 * that asserts the contract the core promises drivers: aligned offsets
 * and lengths, requests no larger than max_transfer, buffers aligned in
 * memory when asked.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/block_int.h"
#include "core/status_keep.h"
#include "vdisk/job.h"

#include "check.h"


/* ---- the test driver: memory with configurable limits ---- */

typedef struct mem_state {
    uint8_t *data;
    uint64_t size;
    uint32_t align, mem_align;
    uint64_t max_transfer;
    bool has_zeroes;
    int contract_violations;
    int flushes, zero_calls, write_calls;
    useconds_t delay;
    pthread_mutex_t lock;
} mem_state;

static mem_state *cfg_next;

static int mem_open(vd_node *n, vd_opts *opts, unsigned flags, vd_error *err)
{
    (void)opts;
    (void)flags;
    (void)err;
    mem_state *s = n->opaque;
    *s = *cfg_next;
    s->data = calloc(1, s->size);
    pthread_mutex_init(&s->lock, NULL);
    n->bl.request_alignment = s->align;
    n->bl.max_transfer = s->max_transfer;
    n->bl.min_mem_alignment = s->mem_align;
    cfg_next->data = NULL;
    return s->data ? 0 : -ENOMEM;
}

static void mem_close(vd_node *n)
{
    mem_state *s = n->opaque;
    /* Report violations through the config so tests can see them. */
    cfg_next->contract_violations += s->contract_violations;
    cfg_next->flushes = s->flushes;
    cfg_next->zero_calls = s->zero_calls;
    cfg_next->write_calls = s->write_calls;
    free(s->data);
    pthread_mutex_destroy(&s->lock);
}

static void check_contract(mem_state *s, uint64_t off, uint64_t bytes,
                           vd_iov *qiov)
{
    bool bad = off % s->align || bytes % s->align ||
               (s->max_transfer && bytes > s->max_transfer) ||
               (qiov && qiov->size != bytes);
    if (qiov && s->mem_align > 1)
        for (int i = 0; i < qiov->niov; i++)
            if ((uintptr_t)qiov->iov[i].iov_base % s->mem_align)
                bad = true;
    if (bad)
        __atomic_add_fetch(&s->contract_violations, 1, __ATOMIC_SEQ_CST);
}

static int mem_preadv(vd_node *n, uint64_t off, uint64_t bytes, vd_iov *q,
                      unsigned flags, vd_error *err)
{
    (void)flags;
    (void)err;
    mem_state *s = n->opaque;
    check_contract(s, off, bytes, q);
    if (off + bytes > s->size)
        __atomic_add_fetch(&s->contract_violations, 1, __ATOMIC_SEQ_CST);
    if (s->delay)
        usleep(s->delay);
    vd_iov_from_buf(q, 0, s->data + off, bytes);
    return 0;
}

static int mem_pwritev(vd_node *n, uint64_t off, uint64_t bytes, vd_iov *q,
                       unsigned flags, vd_error *err)
{
    (void)flags;
    mem_state *s = n->opaque;
    check_contract(s, off, bytes, q);
    if (off + bytes > s->size)
        return vd_error_set(err, -ENOSPC, "mem: write past the end");
    if (s->delay)
        usleep(s->delay);
    vd_iov_to_buf(q, 0, s->data + off, bytes);
    __atomic_add_fetch(&s->write_calls, 1, __ATOMIC_SEQ_CST);
    return 0;
}

static int mem_zeroes(vd_node *n, uint64_t off, uint64_t bytes,
                      unsigned flags, vd_error *err)
{
    (void)flags;
    (void)err;
    mem_state *s = n->opaque;
    if (!s->has_zeroes)
        return -ENOTSUP;
    check_contract(s, off, bytes, NULL);
    memset(s->data + off, 0, bytes);
    __atomic_add_fetch(&s->zero_calls, 1, __ATOMIC_SEQ_CST);
    return 0;
}

static int mem_flush(vd_node *n, vd_error *err)
{
    (void)err;
    mem_state *s = n->opaque;
    __atomic_add_fetch(&s->flushes, 1, __ATOMIC_SEQ_CST);
    return 0;
}

static int64_t mem_getlength(vd_node *n)
{
    return (int64_t)((mem_state *)n->opaque)->size;
}

static const vd_driver mem_driver = {
    .name = "test-mem",
    .instance_size = sizeof(mem_state),
    .open = mem_open,
    .close = mem_close,
    .preadv = mem_preadv,
    .pwritev = mem_pwritev,
    .pwrite_zeroes = mem_zeroes,
    .flush = mem_flush,
    .getlength = mem_getlength,
};

/* A user, as vd_open() attaches: public writes need one with write
 * (a mirror's target gets one that asks for nothing: the job alone
 * reads and writes it). */
static vd_node *open_mem_as(mem_state *cfg, unsigned flags, bool writer)
{
    cfg_next = cfg;
    vd_node *n = NULL;
    vd_error err = VD_ERROR_INIT;
    int r = vd_node_open(&n, "mem", &mem_driver, NULL,
                         flags | VD_NODE_PROTOCOL, &err);
    if (r == 0)
        r = vd_node_attach_opener(n, !writer ? 0 : VD_PERM_CONSISTENT_READ |
                                  (n->read_only ? 0 : VD_PERM_WRITE),
                                  VD_PERM_ALL, &err);
    if (r < 0) {
        fprintf(stderr, "open_mem: %s\n", err.message);
        exit(1);
    }
    return n;
}

static vd_node *open_mem(mem_state *cfg, unsigned flags)
{
    return open_mem_as(cfg, flags, true);
}

static void fill_pattern(uint8_t *buf, size_t len, unsigned seed)
{
    for (size_t i = 0; i < len; i++)
        buf[i] = (uint8_t)(seed * 131 + i * 7 + (i >> 9));
}

/* ---- tests ---- */

static void test_unaligned_rmw(void)
{
    mem_state cfg = { .size = 1 << 20, .align = 512, .mem_align = 512,
                      .max_transfer = 8192, .has_zeroes = true };
    vd_node *n = open_mem(&cfg, VD_NODE_RDWR);
    uint8_t *model = calloc(1, cfg.size);
    uint8_t *buf = malloc(100000), *rd = malloc(100000);
    vd_error err = VD_ERROR_INIT;
    srand(1);
    for (int i = 0; i < 300; i++) {
        uint64_t off = (uint64_t)rand() % (cfg.size - 70000);
        uint64_t len = 1 + (uint64_t)rand() % 70000;
        fill_pattern(buf, len, (unsigned)i);
        /* Deliberately misaligned buffers: the core must bounce. */
        uint8_t *src = buf + (i % 3);
        memmove(src, buf, len);
        int r = vd_pwrite(n, src, len, off, 0, &err);
        CHECK(r == 0, "write %d: %s", i, err.message);
        memcpy(model + off, src, len);
        uint64_t roff = (uint64_t)rand() % (cfg.size - 70000);
        uint64_t rlen = 1 + (uint64_t)rand() % 70000;
        r = vd_pread(n, rd + 1, rlen, roff, 0, &err);
        CHECK(r == 0, "read %d: %s", i, err.message);
        CHECK(memcmp(rd + 1, model + roff, rlen) == 0,
              "read %d at %llu+%llu differs from the model", i,
              (unsigned long long)roff, (unsigned long long)rlen);
    }
    vd_close(&n, NULL);
    CHECK(cfg.contract_violations == 0, "%d requests broke the driver "
          "contract (alignment/max_transfer/memory)", cfg.contract_violations);
    free(model);
    free(buf);
    free(rd);
}

static void test_range_and_readonly(void)
{
    mem_state cfg = { .size = 65536, .align = 1 };
    vd_node *n = open_mem(&cfg, 0);
    uint8_t buf[4096];
    vd_error err = VD_ERROR_INIT;
    int r = vd_pread(n, buf, 4096, 65536 - 100, 0, &err);
    CHECK(r == -EIO, "read past the end returned %d", r);
    CHECK(strstr(err.message, "beyond the end") != NULL, "message: %s",
          err.message);
    vd_error_clear(&err);
    r = vd_pwrite(n, buf, 512, 0, 0, &err);
    CHECK(r == -EROFS, "write to a read-only node returned %d", r);
    CHECK(strstr(err.message, "read-only") != NULL, "message: %s",
          err.message);
    vd_error_clear(&err);
    r = vd_pread(n, buf, 1, UINT64_MAX - 1, 0, &err);
    CHECK(r < 0, "huge offset accepted");
    /* Below the top node, reads past the end are zero-filled. */
    memset(buf, 0xff, sizeof(buf));
    vd_iov v;
    vd_iov_init_buf(&v, buf, 4096);
    r = vd_node_preadv(n, 65536 - 1024, 4096, &v, 0, &err);
    CHECK(r == 0, "internal read across the end: %s", err.message);
    CHECK(vd_buffer_is_zero(buf, 4096), "tail past the end is not zero");
    vd_close(&n, NULL);
    CHECK(cfg.contract_violations == 0, "driver saw a read past its end");
}

static void test_zeroes_fallback_and_fua(void)
{
    mem_state cfg = { .size = 1 << 20, .align = 512, .has_zeroes = false };
    vd_node *n = open_mem(&cfg, VD_NODE_RDWR);
    vd_error err = VD_ERROR_INIT;
    uint8_t *buf = malloc(1 << 20);
    memset(buf, 0xaa, 1 << 20);
    CHECK(vd_pwrite(n, buf, 1 << 20, 0, 0, &err) == 0, "%s", err.message);
    int r = vd_write_zeroes(n, 3000, 1000, VD_REQ_NO_FALLBACK, &err);
    CHECK(r == -ENOTSUP, "NO_FALLBACK without driver support gave %d", r);
    r = vd_write_zeroes(n, 3000, 1000, 0, &err);
    CHECK(r == 0, "fallback: %s", err.message);
    CHECK(vd_pread(n, buf, 8192, 0, 0, &err) == 0, "%s", err.message);
    bool ok = true;
    for (int i = 0; i < 8192; i++)
        if (buf[i] != ((i >= 1000 && i < 4000) ? 0 : 0xaa))
            ok = false;
    CHECK(ok, "zeroes fallback wrote the wrong bytes");
    CHECK(vd_pwrite(n, buf, 512, 0, VD_REQ_FUA, &err) == 0, "%s",
          err.message);
    vd_stats st;
    vd_get_stats(n, &st);
    CHECK(st.wr_operations >= 2 && st.zero_operations == 1 &&
          st.rd_operations == 1 && st.rd_bytes == 8192,
          "stats: wr %llu zero %llu rd %llu rd_bytes %llu",
          (unsigned long long)st.wr_operations,
          (unsigned long long)st.zero_operations,
          (unsigned long long)st.rd_operations,
          (unsigned long long)st.rd_bytes);
    vd_close(&n, NULL);
    CHECK(cfg.flushes >= 1, "FUA write did not flush");
    free(buf);

    /* With driver support, the aligned middle goes to the driver and the
     * unaligned edges are written as zero buffers. */
    mem_state cfg2 = { .size = 1 << 20, .align = 512, .has_zeroes = true };
    n = open_mem(&cfg2, VD_NODE_RDWR);
    CHECK(vd_write_zeroes(n, 10000, 100, 0, &err) == 0, "%s", err.message);
    vd_close(&n, NULL);
    CHECK(cfg2.zero_calls == 1, "driver pwrite_zeroes calls: %d",
          cfg2.zero_calls);
    CHECK(cfg2.contract_violations == 0, "zeroes broke the contract");
}

struct thr_arg {
    vd_node *n;
    int id;
    int errors;
};

/* Each thread owns bytes [id*100 + k*1000, +100) for k = 0.., which share
 * 512-byte blocks with other threads: any lost update shows. */
static void *rmw_thread(void *p)
{
    struct thr_arg *a = p;
    uint8_t buf[100];
    for (int k = 0; k < 200; k++) {
        memset(buf, (uint8_t)(a->id + 1 + k), sizeof(buf));
        if (vd_pwrite(a->n, buf, 100, (uint64_t)k * 1000 + a->id * 100, 0,
                      NULL) < 0)
            a->errors++;
    }
    return NULL;
}

static void test_concurrent_rmw(void)
{
    mem_state cfg = { .size = 1 << 20, .align = 512, .delay = 50 };
    vd_node *n = open_mem(&cfg, VD_NODE_RDWR);
    pthread_t t[10];
    struct thr_arg a[10];
    for (int i = 0; i < 10; i++) {
        a[i] = (struct thr_arg){ n, i, 0 };
        pthread_create(&t[i], NULL, rmw_thread, &a[i]);
    }
    for (int i = 0; i < 10; i++) {
        pthread_join(t[i], NULL);
        CHECK(a[i].errors == 0, "thread %d had write errors", i);
    }
    uint8_t *buf = malloc(200000);
    vd_error err = VD_ERROR_INIT;
    CHECK(vd_pread(n, buf, 200000, 0, 0, &err) == 0, "%s", err.message);
    int bad = 0;
    for (int k = 0; k < 200; k++)
        for (int id = 0; id < 10; id++)
            for (int j = 0; j < 100; j++)
                if (buf[k * 1000 + id * 100 + j] != (uint8_t)(id + 1 + k))
                    bad++;
    CHECK(bad == 0, "%d bytes lost by concurrent read-modify-write", bad);
    free(buf);
    vd_close(&n, NULL);
}

/* Aligned writes skip the core's list of tracked requests while no
 * read-modify-write is in flight (io.c, track_begin): one thread writes
 * whole 512-byte sectors, round after round with a new pattern, while
 * others keep rewriting 100 bytes in the middle of the same sectors.
 * Whatever the order, every byte outside those 100 must end up the last
 * round's: an RMW that read a sector before a whole-sector write landed
 * and wrote it back after would bring an older round's bytes back. */
#define MIXED_SECTORS 16
#define MIXED_ROUNDS 40

static void *mixed_plain_thread(void *p)
{
    struct thr_arg *a = p;
    uint8_t buf[512];
    for (int r = 1; r <= MIXED_ROUNDS; r++) {
        memset(buf, r, sizeof(buf));
        for (int s = 0; s < MIXED_SECTORS; s++)
            if (vd_pwrite(a->n, buf, 512, (uint64_t)s * 512, 0, NULL) < 0)
                a->errors++;
    }
    return NULL;
}

static void *mixed_rmw_thread(void *p)
{
    struct thr_arg *a = p;
    uint8_t buf[100];
    memset(buf, 0xee, sizeof(buf));
    for (int round = 0; round < MIXED_ROUNDS; round++)
        for (int s = 0; s < MIXED_SECTORS; s++)
            if (vd_pwrite(a->n, buf, 100, (uint64_t)s * 512 + 200, 0,
                          NULL) < 0)
                a->errors++;
    return NULL;
}

static void test_mixed_rmw(void)
{
    mem_state cfg = { .size = 1 << 20, .align = 512, .delay = 20 };
    vd_node *n = open_mem(&cfg, VD_NODE_RDWR);
    pthread_t t[4];
    struct thr_arg a[4];
    for (int i = 0; i < 4; i++) {
        a[i] = (struct thr_arg){ n, i, 0 };
        pthread_create(&t[i], NULL, i ? mixed_rmw_thread : mixed_plain_thread,
                       &a[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        CHECK(a[i].errors == 0, "thread %d had write errors", i);
    }
    uint8_t *buf = malloc(MIXED_SECTORS * 512);
    vd_error err = VD_ERROR_INIT;
    CHECK(vd_pread(n, buf, MIXED_SECTORS * 512, 0, 0, &err) == 0, "%s",
          err.message);
    int bad = 0;
    for (int s = 0; s < MIXED_SECTORS; s++)
        for (int j = 0; j < 512; j++)
            if ((j < 200 || j >= 300) && buf[s * 512 + j] != MIXED_ROUNDS)
                bad++;
    CHECK(bad == 0, "%d bytes of aligned writes lost to read-modify-writes",
          bad);
    free(buf);
    vd_close(&n, NULL);
}

static void *slow_reader(void *p)
{
    vd_node *n = p;
    uint8_t buf[512];
    for (int i = 0; i < 20; i++)
        vd_pread(n, buf, 512, 0, 0, NULL);
    return NULL;
}

static void test_drain(void)
{
    mem_state cfg = { .size = 65536, .align = 1, .delay = 2000 };
    vd_node *n = open_mem(&cfg, VD_NODE_RDWR);
    pthread_t t;
    pthread_create(&t, NULL, slow_reader, n);
    usleep(5000);
    vd_node_drain_begin(n);
    CHECK(n->in_flight == 0, "drain returned with %d requests in flight",
          n->in_flight);
    vd_node_drain_end(n);
    pthread_join(t, NULL);
    vd_close(&n, NULL);
}

static void test_node_names(void)
{
    mem_state cfg = { .size = 4096, .align = 1 };
    vd_opts *o = vd_opts_new();
    vd_opts_set(o, "node-name", "disk0");
    cfg_next = &cfg;
    vd_node *a = NULL, *b = NULL;
    vd_error err = VD_ERROR_INIT;
    int r = vd_node_open(&a, "mem", &mem_driver, o, VD_NODE_PROTOCOL, &err);
    CHECK(r == 0 && strcmp(vd_node_name(a), "disk0") == 0, "named open: %s",
          err.message);
    vd_opts_set(o, "node-name", "disk0");
    r = vd_node_open(&b, "mem", &mem_driver, o, VD_NODE_PROTOCOL, &err);
    CHECK(r == -EEXIST, "duplicate node name accepted (%d)", r);
    CHECK(strstr(err.message, "Duplicate") != NULL, "message: %s",
          err.message);
    vd_error_clear(&err);
    vd_opts_set(o, "node-name", "0bad name");
    r = vd_node_open(&b, "mem", &mem_driver, o, VD_NODE_PROTOCOL, &err);
    CHECK(r == -EINVAL, "invalid node name accepted (%d)", r);
    vd_error_clear(&err);
    vd_opts_set(o, "no-such-option", "1");
    r = vd_node_open(&b, "mem", &mem_driver, o, VD_NODE_PROTOCOL, &err);
    CHECK(r == -EINVAL && strstr(err.message, "no-such-option"),
          "unknown option: %d %s", r, err.message);
    vd_opts_free(&o);
    CHECK(vd_find_node("disk0") == a, "lookup by name");
    vd_close(&a, NULL);
    CHECK(vd_find_node("disk0") == NULL, "closed node still registered");
}

static void test_block_status_default(void)
{
    mem_state cfg = { .size = 1 << 20, .align = 1 };
    vd_node *n = open_mem(&cfg, 0);
    vd_extent e;
    vd_error err = VD_ERROR_INIT;
    CHECK(vd_block_status(n, 4096, 1 << 19, &e, &err) == 0, "%s",
          err.message);
    CHECK(e.length == 1 << 19 && (e.flags & VD_BLOCK_DATA) &&
          (e.flags & VD_BLOCK_ALLOCATED) && e.offset == 4096 && e.file == n &&
          e.depth == 0, "default status: len %llu flags %#x",
          (unsigned long long)e.length, e.flags);
    vd_close(&n, NULL);
}

static void on_ready(const vd_job_event *ev, void *opaque)
{
    if (ev->type == VD_JOB_EVENT_READY)
        __atomic_store_n((int *)opaque, 1, __ATOMIC_SEQ_CST);
}

/* A FUA write to the source of a write-blocking mirror was written
 * through to the target without FUA: after the pivot the target is the
 * disk, and it had the write only in its cache. The target must see a
 * flush (the mem driver has no FUA of its own) for a FUA write, and
 * none for a plain one. */
static void test_mirror_write_blocking_fua(void)
{
    mem_state scfg = { .size = 1 << 20, .align = 512, .has_zeroes = true };
    mem_state tcfg = { .size = 1 << 20, .align = 512, .has_zeroes = true };
    vd_node *src = open_mem(&scfg, VD_NODE_RDWR);
    vd_node *tgt = open_mem_as(&tcfg, VD_NODE_RDWR, false);
    mem_state *ts = tgt->opaque;        /* the live counters */
    vd_error err = VD_ERROR_INIT;
    uint8_t buf[4096];
    fill_pattern(buf, sizeof(buf), 5);
    int ready = 0;
    vd_job *job = NULL;
    vd_job_listen(on_ready, &ready);
    vd_job_options jo = { .id = "wb" };
    vd_mirror_options mo = { .sync = VD_MIRROR_SYNC_FULL,
                             .write_blocking = true };
    CHECK(vd_mirror_start(&job, src, tgt, &mo, &jo, &err) == 0,
          "mirror: %s", err.message);
    for (int i = 0; i < 3000 && !__atomic_load_n(&ready, __ATOMIC_SEQ_CST); i++)
        usleep(10000);
    CHECK(ready, "the mirror never became ready");
    int before = __atomic_load_n(&ts->flushes, __ATOMIC_SEQ_CST);
    CHECK(vd_pwrite(src, buf, sizeof(buf), 65536, 0, &err) == 0, "%s",
          err.message);
    int plain = __atomic_load_n(&ts->flushes, __ATOMIC_SEQ_CST) - before;
    CHECK(vd_pwrite(src, buf, sizeof(buf), 131072, VD_REQ_FUA, &err) == 0,
          "%s", err.message);
    int fua = __atomic_load_n(&ts->flushes, __ATOMIC_SEQ_CST) - before - plain;
    CHECK(plain == 0 && fua >= 1, "target flushes: %d for a plain write, "
          "%d for a FUA write", plain, fua);
    CHECK(memcmp(ts->data + 131072, buf, sizeof(buf)) == 0,
          "the FUA write did not reach the target");
    CHECK(vd_job_cancel(job, true, &err) == 0, "cancel: %s", err.message);
    vd_job_wait(job, NULL);
    vd_job_unref(&job);
    vd_job_unlisten(on_ready, &ready);
    vd_close(&tgt, NULL);
    vd_close(&src, NULL);
}

/* A kept block status answer (core/status_keep.h): answers inside it,
 * not outside; not used once a change began or while one is in flight;
 * an answer asked while a change was in flight, or one that began while
 * it was asked, is not kept; a drop forgets it. */
static vd_kept_extent *kept_extents(void)
{
    vd_kept_extent *e = malloc(VD_STATUS_KEEP_EXTENTS * sizeof(*e));

    /* [1000, 5000) data, [5000, 9000) zero, [9000, 10000) data */
    e[0] = (vd_kept_extent){ 5000, VD_BLOCK_DATA };
    e[1] = (vd_kept_extent){ 9000, VD_BLOCK_ZERO };
    e[2] = (vd_kept_extent){ 10000, VD_BLOCK_DATA };
    return e;
}

static void test_status_keep(void)
{
    vd_status_keep k;
    vd_status_ask ask;
    vd_kept_extent *e;
    uint64_t pnum = 0;

    vd_status_keep_init(&k);
    CHECK(vd_status_keep_lookup(&k, 0, 10, 0, &pnum) == -ENOENT,
          "an empty keep answered");

    vd_status_keep_ask(&k, &ask);
    e = kept_extents();
    vd_status_keep_store(&k, &ask, 1000, &e, 3);
    CHECK(e == NULL, "the first answer did not take the array");
    free(e);
    CHECK(vd_status_keep_lookup(&k, 1000, 100000, 0, &pnum) ==
          VD_BLOCK_DATA && pnum == 4000, "at the start: pnum %llu",
          (unsigned long long)pnum);
    CHECK(vd_status_keep_lookup(&k, 6000, 100000, 512, &pnum) ==
          VD_BLOCK_ZERO && pnum == 2560, "inside, aligned: pnum %llu",
          (unsigned long long)pnum);
    CHECK(vd_status_keep_lookup(&k, 9500, 100, 0, &pnum) == VD_BLOCK_DATA &&
          pnum == 100, "clipped to bytes: pnum %llu",
          (unsigned long long)pnum);
    CHECK(vd_status_keep_lookup(&k, 999, 10, 0, &pnum) == -ENOENT,
          "answered before the start");
    CHECK(vd_status_keep_lookup(&k, 10000, 10, 0, &pnum) == -ENOENT,
          "answered past the end");

    vd_status_keep_change_begin(&k);
    CHECK(vd_status_keep_lookup(&k, 1000, 10, 0, &pnum) == -ENOENT,
          "used while a change is in flight");
    /* Asked while the change is in flight: not kept. */
    vd_status_keep_ask(&k, &ask);
    vd_status_keep_change_end(&k);
    e = kept_extents();
    vd_status_keep_store(&k, &ask, 1000, &e, 3);
    CHECK(e != NULL, "an answer asked during a change was kept");
    free(e);
    CHECK(vd_status_keep_lookup(&k, 1000, 10, 0, &pnum) == -ENOENT,
          "the answer from before the change is still used");

    /* A change that begins and ends while the question is out. */
    vd_status_keep_ask(&k, &ask);
    vd_status_keep_change_begin(&k);
    vd_status_keep_change_end(&k);
    e = kept_extents();
    vd_status_keep_store(&k, &ask, 1000, &e, 3);
    CHECK(e != NULL, "an answer that may predate a change was kept");
    free(e);

    vd_status_keep_ask(&k, &ask);
    e = kept_extents();
    vd_status_keep_store(&k, &ask, 1000, &e, 3);
    free(e);
    CHECK(vd_status_keep_lookup(&k, 1000, 10, 0, &pnum) == VD_BLOCK_DATA,
          "a clean answer was not kept");
    vd_status_keep_drop(&k);
    CHECK(vd_status_keep_lookup(&k, 1000, 10, 0, &pnum) == -ENOENT,
          "used after a drop");
    vd_status_keep_destroy(&k);
}

int main(void)
{
    test_unaligned_rmw();
    test_range_and_readonly();
    test_zeroes_fallback_and_fua();
    test_concurrent_rmw();
    test_mixed_rmw();
    test_drain();
    test_node_names();
    test_block_status_default();
    test_mirror_write_blocking_fua();
    test_status_keep();
    if (failures) {
        fprintf(stderr, "test-core: %d failure(s)\n", failures);
        return 1;
    }
    printf("test-core: all passed\n");
    return 0;
}
