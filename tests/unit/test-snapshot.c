/*
 * Unit tests for the generic snapshot layer (src/core/snapshot.c): the
 * find rules, the fallback to the primary child, the refusals and their
 * messages, and the group operations. Two test drivers stand in for real
 * formats: "snapmem", a protocol that keeps its data and snapshots in
 * memory, and "passthru", a filter with no snapshot support of its own
 * that counts how often it is opened (to see the close/reopen around a
 * revert through the fallback).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/block_int.h"

#include "check.h"


#define SIZE 4096
#define MAX_SN 8

typedef struct snapmem {
    uint8_t data[SIZE];
    struct {
        char id[16], name[32];
        uint64_t vm_state_size;
        uint8_t data[SIZE];
    } sn[MAX_SN];
    int nsn;
    int next_id;
    bool fail_list;
    const uint8_t *view; /* load_tmp: what reads return */
} snapmem;

static int sm_open(vd_node *n, vd_opts *o, unsigned f, vd_error *e)
{
    (void)o; (void)f; (void)e;
    snapmem *s = n->opaque;
    s->next_id = 1;
    s->view = s->data;
    return 0;
}

static int sm_preadv(vd_node *n, uint64_t off, uint64_t bytes, vd_iov *q,
                     unsigned fl, vd_error *e)
{
    (void)fl; (void)e;
    snapmem *s = n->opaque;
    vd_iov_from_buf(q, 0, s->view + off, bytes);
    return 0;
}

static int sm_pwritev(vd_node *n, uint64_t off, uint64_t bytes, vd_iov *q,
                      unsigned fl, vd_error *e)
{
    (void)fl; (void)e;
    snapmem *s = n->opaque;
    vd_iov_to_buf(q, 0, s->data + off, bytes);
    return 0;
}

static int64_t sm_len(vd_node *n)
{
    (void)n;
    return SIZE;
}

static int sm_create(vd_node *n, const vd_snapshot_info *sn, vd_error *e)
{
    snapmem *s = n->opaque;
    if (s->nsn == MAX_SN)
        return vd_error_set(e, -ENOSPC, "too many snapshots");
    if (sn->name && strcmp(sn->name, "fail") == 0)
        return vd_error_set(e, -EIO, "injected failure");
    int i = s->nsn++;
    if (sn->id && *sn->id)
        snprintf(s->sn[i].id, sizeof(s->sn[i].id), "%s", sn->id);
    else
        snprintf(s->sn[i].id, sizeof(s->sn[i].id), "%d", s->next_id++);
    snprintf(s->sn[i].name, sizeof(s->sn[i].name), "%s", sn->name);
    s->sn[i].vm_state_size = sn->vm_state_size;
    memcpy(s->sn[i].data, s->data, SIZE);
    return 0;
}

static int sm_find(snapmem *s, const char *id, const char *name)
{
    for (int i = 0; i < s->nsn; i++)
        if ((!id || strcmp(s->sn[i].id, id) == 0) &&
            (!name || strcmp(s->sn[i].name, name) == 0))
            return i;
    return -1;
}

static int sm_goto(vd_node *n, const char *id, vd_error *e)
{
    snapmem *s = n->opaque;
    int i = sm_find(s, id, NULL);
    if (i < 0)
        i = sm_find(s, NULL, id);
    if (i < 0)
        return vd_error_set(e, -ENOENT, "no snapshot '%s'", id);
    memcpy(s->data, s->sn[i].data, SIZE);
    return 0;
}

static int sm_delete(vd_node *n, const char *id, const char *name,
                     vd_error *e)
{
    snapmem *s = n->opaque;
    int i = sm_find(s, id, name);
    if (i < 0)
        return vd_error_set(e, -ENOENT, "Can't find the snapshot");
    memmove(&s->sn[i], &s->sn[i + 1], sizeof(s->sn[0]) * (s->nsn - i - 1));
    s->nsn--;
    return 0;
}

static int sm_list(vd_node *n, vd_snapshot_info **list, size_t *count,
                   vd_error *e)
{
    snapmem *s = n->opaque;
    if (s->fail_list)
        return vd_error_set(e, -EIO, "cannot read the snapshot table");
    *list = calloc(s->nsn + 1, sizeof(**list));
    for (int i = 0; i < s->nsn; i++) {
        (*list)[i].id = strdup(s->sn[i].id);
        (*list)[i].name = strdup(s->sn[i].name);
        (*list)[i].vm_state_size = s->sn[i].vm_state_size;
    }
    *count = (size_t)s->nsn;
    return 0;
}

static int sm_load_tmp(vd_node *n, const char *id, const char *name,
                       vd_error *e)
{
    snapmem *s = n->opaque;
    int i = sm_find(s, id, name);
    if (i < 0)
        return vd_error_set(e, -ENOENT, "no such snapshot");
    s->view = s->sn[i].data;
    return 0;
}

static const vd_driver snapmem_drv = {
    .name = "snapmem", .instance_size = sizeof(snapmem),
    .open = sm_open, .preadv = sm_preadv, .pwritev = sm_pwritev,
    .getlength = sm_len, .snapshot_create = sm_create,
    .snapshot_goto = sm_goto, .snapshot_delete = sm_delete,
    .snapshot_list = sm_list, .snapshot_load_tmp = sm_load_tmp,
};

/* A filter without snapshot callbacks; counts opens. */
static int passthru_opens;
static int pt_open(vd_node *n, vd_opts *o, unsigned f, vd_error *e)
{
    (void)n; (void)o; (void)f; (void)e;
    passthru_opens++;
    return 0;
}

static const vd_driver passthru_drv = {
    .name = "passthru", .is_filter = true, .open = pt_open,
};

static vd_node *open_snapmem(const char *name, bool rw)
{
    vd_opts *o = vd_opts_new();
    vd_opts_set(o, "node-name", name);
    vd_node *n = NULL;
    vd_error err = VD_ERROR_INIT;
    if (vd_node_open(&n, "mem", &snapmem_drv, o,
                     VD_NODE_PROTOCOL | (rw ? VD_NODE_RDWR : 0), &err) < 0 ||
        vd_node_attach_opener(n, VD_PERM_CONSISTENT_READ |
                              (rw ? VD_PERM_WRITE : 0), VD_PERM_ALL,
                              &err) < 0) {
        fprintf(stderr, "open %s: %s\n", name, err.message);
        exit(1);
    }
    vd_opts_free(&o);
    return n;
}

static vd_node *open_filter_over(const char *name, const char *child)
{
    vd_opts *o = vd_opts_new();
    vd_opts_set(o, "node-name", name);
    vd_opts_set(o, "file", child);
    vd_node *n = NULL;
    vd_error err = VD_ERROR_INIT;
    if (vd_node_open(&n, NULL, &passthru_drv, o, VD_NODE_RDWR, &err) < 0 ||
        vd_node_attach_opener(n, VD_PERM_CONSISTENT_READ | VD_PERM_WRITE,
                              VD_PERM_ALL, &err) < 0) {
        fprintf(stderr, "open %s: %s\n", name, err.message);
        exit(1);
    }
    vd_opts_free(&o);
    return n;
}

static void test_find_rules(void)
{
    vd_node *n = open_snapmem("find0", true);
    snapmem *s = n->opaque;
    const char *ids[] = { "1", "2", "3", "2" };
    const char *names[] = { "a", "b", "a", "c" };
    for (int i = 0; i < 4; i++) {
        vd_snapshot_info sn = { .id = (char *)ids[i], .name = (char *)names[i] };
        CHECK(vd_snapshot_create(n, &sn, NULL) == 0, "create %d", i);
    }
    vd_snapshot_info out = { 0 };
    vd_error err = VD_ERROR_INIT;
    CHECK(vd_snapshot_find(n, NULL, "a", &out, &err) == 1 &&
          strcmp(out.id, "1") == 0, "only name: first with that name");
    vd_snapshot_info_clear(&out);
    CHECK(vd_snapshot_find(n, "2", NULL, &out, &err) == 1 &&
          strcmp(out.name, "b") == 0, "only id: first with that id");
    vd_snapshot_info_clear(&out);
    CHECK(vd_snapshot_find(n, "2", "c", &out, &err) == 1 &&
          strcmp(out.name, "c") == 0, "id and name: the one with both");
    vd_snapshot_info_clear(&out);
    CHECK(vd_snapshot_find(n, "2", "a", &out, &err) == 0 && err.code == 0,
          "not found is a false result, not an error");
    CHECK(vd_snapshot_find(n, NULL, NULL, NULL, &err) == -EINVAL,
          "neither id nor name");
    vd_error_clear(&err);
    s->fail_list = true;
    CHECK(vd_snapshot_find(n, NULL, "a", NULL, &err) == -EIO &&
          strstr(err.message, "snapshot table"),
          "a failure to list is an error: %s", err.message);
    s->fail_list = false;
    vd_close(&n, NULL);
}

static void test_single_node_rules(void)
{
    vd_error err = VD_ERROR_INIT;
    vd_node *ro = open_snapmem("ro0", false);
    CHECK(!vd_snapshot_can(ro), "read-only node can snapshot");
    CHECK(vd_snapshot_create_simple(ro, "x", &err) == -EROFS,
          "create on a read-only node");
    vd_error_clear(&err);
    CHECK(vd_snapshot_load_tmp_by_id_or_name(ro, "nope", &err) == -ENOENT,
          "load_tmp of a missing snapshot: %s", err.message);
    vd_close(&ro, NULL);

    vd_node *n = open_snapmem("rw0", true);
    uint8_t buf[SIZE];
    memset(buf, 1, SIZE);
    vd_pwrite(n, buf, SIZE, 0, 0, NULL);
    CHECK(vd_snapshot_create_simple(n, "s1", NULL) == 0, "create s1");
    memset(buf, 2, SIZE);
    vd_pwrite(n, buf, SIZE, 0, 0, NULL);

    vd_error_clear(&err);
    CHECK(vd_snapshot_load_tmp(n, NULL, "s1", &err) == -EINVAL &&
          strcmp(err.message, "Device is not readonly") == 0,
          "load_tmp on a writable node: %s", err.message);

    atomic_store(&n->dirty_bitmaps, 1);
    vd_error_clear(&err);
    CHECK(vd_snapshot_goto(n, "s1", &err) == -EBUSY &&
          strcmp(err.message, "Device has active dirty bitmaps") == 0,
          "goto with dirty bitmaps: %s", err.message);
    atomic_store(&n->dirty_bitmaps, 0);
    CHECK(vd_snapshot_goto(n, "s1", NULL) == 0, "goto s1");
    vd_pread(n, buf, SIZE, 0, 0, NULL);
    CHECK(buf[0] == 1 && buf[SIZE - 1] == 1, "content after goto");

    vd_error_clear(&err);
    CHECK(vd_snapshot_delete(n, NULL, NULL, &err) == -EINVAL,
          "delete without id or name");
    vd_error_clear(&err);
    CHECK(vd_snapshot_delete(n, NULL, "zz", &err) == -ENOENT,
          "delete of a missing snapshot");
    CHECK(vd_snapshot_delete(n, NULL, "s1", NULL) == 0, "delete s1");
    vd_close(&n, NULL);
}

static void test_fallback(void)
{
    vd_error err = VD_ERROR_INIT;
    vd_node *base = open_snapmem("fbbase", true);
    vd_node *top = open_filter_over("fbtop", "fbbase");
    /* The filter holds the only reference the test needs. */
    vd_node_unref(base);
    CHECK(vd_snapshot_can(top), "filter over a snapshot-capable node");
    uint8_t buf[SIZE];
    memset(buf, 7, SIZE);
    vd_pwrite(top, buf, SIZE, 0, 0, NULL);
    CHECK(vd_snapshot_create_simple(top, "s", &err) == 0, "create: %s",
          err.message);
    memset(buf, 8, SIZE);
    vd_pwrite(top, buf, SIZE, 0, 0, NULL);
    int opens = passthru_opens;
    CHECK(vd_snapshot_goto(top, "s", &err) == 0, "goto: %s", err.message);
    CHECK(passthru_opens == opens + 1, "the parent was not reopened");
    vd_pread(top, buf, SIZE, 0, 0, NULL);
    CHECK(buf[0] == 7, "content through the filter after goto: %d", buf[0]);
    vd_snapshot_info *list;
    size_t cnt;
    CHECK(vd_snapshot_list(top, &list, &cnt, NULL) == 0 && cnt == 1,
          "list through the filter");
    vd_snapshot_list_free(&list, cnt);

    /* A second data child makes the fallback unsafe. */
    vd_node *extra = open_snapmem("fbextra", true);
    vd_node_attach_child(top, extra, "data-file", VD_ROLE_DATA, NULL);
    CHECK(!vd_snapshot_can(top), "fallback with a data-file child");
    vd_error_clear(&err);
    CHECK(vd_snapshot_goto(top, "s", &err) == -ENOTSUP &&
          strcmp(err.message, "Block driver does not support snapshots") == 0,
          "goto without safe fallback: %s", err.message);
    vd_error_clear(&err);
    CHECK(vd_snapshot_delete(top, NULL, "s", &err) == -ENOTSUP &&
          strcmp(err.message, "Block format 'passthru' used by device "
                 "'fbtop' does not support internal snapshot deletion") == 0,
          "delete without safe fallback: %s", err.message);
    vd_close(&top, NULL);
}

static void test_groups(void)
{
    vd_error err = VD_ERROR_INIT;
    vd_node *a = open_snapmem("diska", true);
    vd_node *b = open_snapmem("diskb", true);
    vd_node *c = open_snapmem("diskc", false); /* read-only: skipped */
    const char *both[] = { "diska", "diskb", NULL };
    const char *none[] = { NULL };
    const char *missing[] = { "diska", "nosuch", NULL };

    CHECK(vd_snapshot_all_can(none, &err) == -EINVAL &&
          strcmp(err.message, "At least one device is required for "
                 "snapshot") == 0, "empty list: %s", err.message);
    vd_error_clear(&err);
    CHECK(vd_snapshot_all_can(missing, &err) == -ENOENT &&
          strcmp(err.message, "No block device node 'nosuch'") == 0,
          "missing node: %s", err.message);
    CHECK(vd_snapshot_all_can(NULL, NULL) == 0, "implicit set can snapshot");

    vd_node *vm = NULL;
    vd_error_clear(&err);
    CHECK(vd_snapshot_all_find_vmstate(both, "diskz", &vm, &err) < 0 &&
          strcmp(err.message, "No block device node 'diskz'") == 0,
          "named vmstate node missing: %s", err.message);
    const char *withc[] = { "diska", "diskc", NULL };
    vd_error_clear(&err);
    CHECK(vd_snapshot_all_find_vmstate(withc, "diskc", &vm, &err) == -ENOTSUP
          && strcmp(err.message, "vmstate block device 'diskc' does not "
                    "support snapshots") == 0,
          "vmstate node cannot snapshot: %s", err.message);
    CHECK(vd_snapshot_all_find_vmstate(both, NULL, &vm, NULL) == 0 && vm == a,
          "first capable node holds the VM state");
    CHECK(vd_snapshot_all_find_vmstate(both, "diskb", &vm, NULL) == 0 &&
          vm == b, "named VM-state node");

    vd_snapshot_info sn = { .name = "vm1" };
    CHECK(vd_snapshot_all_create(NULL, &sn, b, 12345, &err) == 0,
          "group create: %s", err.message);
    snapmem *sa = a->opaque, *sb = b->opaque, *sc = c->opaque;
    CHECK(sa->nsn == 1 && sb->nsn == 1 && sc->nsn == 0,
          "implicit set: %d %d %d", sa->nsn, sb->nsn, sc->nsn);
    CHECK(sa->sn[0].vm_state_size == 0 && sb->sn[0].vm_state_size == 12345,
          "VM state size only on the VM-state node");
    CHECK(vd_snapshot_all_has(both, "vm1", NULL) == 1, "all have vm1");
    sn.name = "only-a";
    const char *just_a[] = { "diska", NULL };
    CHECK(vd_snapshot_all_create(just_a, &sn, NULL, 0, NULL) == 0, "only a");
    CHECK(vd_snapshot_all_has(both, "only-a", NULL) == 0, "b lacks only-a");

    sn.name = "fail";
    vd_error_clear(&err);
    CHECK(vd_snapshot_all_create(both, &sn, a, 0, &err) < 0 &&
          strncmp(err.message, "Could not create snapshot 'fail' on 'diska'",
                  43) == 0, "create failure names snapshot and node: %s",
          err.message);

    uint8_t buf[SIZE];
    memset(buf, 9, SIZE);
    vd_pwrite(a, buf, SIZE, 0, 0, NULL);
    vd_pwrite(b, buf, SIZE, 0, 0, NULL);
    CHECK(vd_snapshot_all_goto(both, "vm1", &err) == 0, "group goto");
    vd_pread(a, buf, SIZE, 0, 0, NULL);
    CHECK(buf[0] == 0, "a reverted");
    vd_pread(b, buf, SIZE, 0, 0, NULL);
    CHECK(buf[0] == 0, "b reverted");
    vd_error_clear(&err);
    CHECK(vd_snapshot_all_goto(both, "only-a", &err) < 0 &&
          strncmp(err.message, "Could not load snapshot 'only-a' on 'diskb'",
                  43) == 0, "goto failure names node: %s", err.message);
    CHECK(vd_snapshot_all_delete(both, "vm1", NULL) == 0, "group delete");
    CHECK(vd_snapshot_all_has(just_a, "vm1", NULL) == 0, "vm1 gone");
    vd_close(&a, NULL);
    vd_close(&b, NULL);
    vd_close(&c, NULL);
}

int main(void)
{
    test_find_rules();
    test_single_node_rules();
    test_fallback();
    test_groups();
    if (failures) {
        fprintf(stderr, "test-snapshot: %d failure(s)\n", failures);
        return 1;
    }
    printf("test-snapshot: all passed\n");
    return 0;
}
