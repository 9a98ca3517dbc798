/*
 * Unit tests for permissions and operation blockers (src/core/perm.c),
 * on test drivers: a protocol whose check_perm can be told to fail and
 * that records what it was told to hold, and a format that takes QEMU's
 * default storage permissions on its file. What they check: the
 * permissions each edge gets, QEMU's conflict message, that a refused
 * change leaves every edge and every driver as it was (no lock byte may
 * move when nothing changes), writers on read-only nodes, reopen checks,
 * users, and blockers.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/block_int.h"

#include "check.h"

/* ---- the test protocol ---- */

typedef struct proto_state {
    unsigned held_perm, held_shared;   /* what set_perm committed */
    bool checking;                     /* between check and set/abort */
} proto_state;

static vd_node *fail_check_on;   /* check_perm of this node fails */
static int checks, commits, aborts;

static int proto_open(vd_node *n, vd_opts *o, unsigned f, vd_error *e)
{
    (void)n, (void)o, (void)f, (void)e;
    proto_state *s = n->opaque;
    s->held_shared = VD_PERM_ALL;
    return 0;
}

static int64_t proto_len(vd_node *n)
{
    (void)n;
    return 1 << 20;
}

static int proto_check(vd_node *n, unsigned perm, unsigned shared,
                       vd_error *err)
{
    proto_state *s = n->opaque;
    (void)perm, (void)shared;
    checks++;
    if (n == fail_check_on)
        return vd_error_set(err, -EBUSY, "check_perm refused");
    CHECK(!s->checking, "check_perm twice in one transaction");
    s->checking = true;
    return 0;
}

static void proto_set(vd_node *n, unsigned perm, unsigned shared)
{
    proto_state *s = n->opaque;
    CHECK(s->checking, "set_perm without check_perm");
    s->checking = false;
    s->held_perm = perm;
    s->held_shared = shared;
    commits++;
}

static void proto_abort(vd_node *n)
{
    proto_state *s = n->opaque;
    CHECK(s->checking, "abort_perm without check_perm");
    s->checking = false;
    aborts++;
}

static const vd_driver proto_drv = {
    .name = "test-proto",
    .instance_size = sizeof(proto_state),
    .open = proto_open,
    .getlength = proto_len,
    .check_perm = proto_check,
    .set_perm = proto_set,
    .abort_perm = proto_abort,
};

/* ---- the test format: default permissions on its file ---- */

static int fmt_open(vd_node *n, vd_opts *o, unsigned f, vd_error *e)
{
    (void)o, (void)f;
    return n->file ? 0 : vd_error_set(e, -EINVAL, "needs a file");
}

static int64_t fmt_len(vd_node *n)
{
    return vd_node_getlength(n->file->node);
}

static const vd_driver fmt_drv = {
    .name = "test-fmt",
    .is_format = true,
    .supports_backing = true,
    .open = fmt_open,
    .getlength = fmt_len,
};

static vd_node *open_proto(const char *name, bool rw)
{
    vd_opts *o = vd_opts_new();
    vd_node *n = NULL;
    vd_error err = VD_ERROR_INIT;

    vd_opts_set(o, "node-name", name);
    if (vd_node_open(&n, "mem", &proto_drv, o,
                     VD_NODE_PROTOCOL | (rw ? VD_NODE_RDWR : 0), &err) < 0) {
        fprintf(stderr, "open %s: %s\n", name, err.message);
        exit(1);
    }
    vd_opts_free(&o);
    return n;
}

/* A format node over the existing node @file; NULL with @err on failure. */
static vd_node *open_fmt(const char *name, const char *file, bool rw,
                         vd_error *err)
{
    vd_opts *o = vd_opts_new();
    vd_node *n = NULL;

    vd_opts_set(o, "node-name", name);
    vd_opts_set(o, "file", file);
    vd_node_open(&n, NULL, &fmt_drv, o, rw ? VD_NODE_RDWR : 0, err);
    vd_opts_free(&o);
    return n;
}

#define RW (VD_PERM_CONSISTENT_READ | VD_PERM_WRITE)

static void test_storage_perms(void)
{
    vd_error err = VD_ERROR_INIT;
    vd_node *f = open_proto("f1", true);
    vd_node *q = open_fmt("q1", "f1", true, &err);
    CHECK(q, "format: %s", err.message);

    /* A writable format writes and resizes its file and lets nobody
     * else do either, even without users of its own. */
    CHECK(q->file->perm == (RW | VD_PERM_RESIZE), "file perm %#x",
          q->file->perm);
    CHECK(q->file->shared == (VD_PERM_CONSISTENT_READ |
                              VD_PERM_WRITE_UNCHANGED),
          "file shared %#x", q->file->shared);
    proto_state *ps = f->opaque;
    CHECK(ps->held_perm == f->perm && ps->held_shared == f->shared,
          "driver holds what was committed");

    /* A user of the format passes its write-unchanged through. */
    vd_user *u = NULL;
    CHECK(vd_user_new(&u, q, NULL, VD_PERM_WRITE_UNCHANGED, VD_PERM_ALL,
                      &err) == 0, "user: %s", err.message);
    CHECK(q->file->perm & VD_PERM_WRITE_UNCHANGED, "passed through");
    vd_user_free(&u);
    CHECK(!(q->file->perm & VD_PERM_WRITE_UNCHANGED), "released");

    vd_node_unref(q);
    /* Detached: the file holds nothing any more. */
    CHECK(f->perm == 0 && f->shared == VD_PERM_ALL, "released: %#x %#x",
          f->perm, f->shared);
    CHECK(ps->held_perm == 0 && ps->held_shared == VD_PERM_ALL,
          "driver released");
    vd_node_unref(f);
}

static void test_conflict_and_rollback(void)
{
    vd_error err = VD_ERROR_INIT;
    vd_node *f = open_proto("f2", true);
    vd_node *q = open_fmt("q2", "f2", true, &err);
    proto_state *ps = f->opaque;
    unsigned perm = f->perm, shared = f->shared;

    /* A second writable format on the same file: QEMU's message. */
    int c0 = checks;
    vd_node *q2 = open_fmt("q3", "f2", true, &err);
    CHECK(!q2, "second writer accepted");
    CHECK(strcmp(err.message, "Permission conflict on node 'f2': "
                 "permissions 'write, resize' are both required by node "
                 "'q2' (uses node 'f2' as 'file' child) and unshared by node "
                 "'q3' (uses node 'f2' as 'file' child).") == 0,
          "message: %s", err.message);
    CHECK(checks == c0, "the driver was asked although the graph refused");
    CHECK(f->perm == perm && f->shared == shared && f->n_parents == 1,
          "refused attach changed the file");

    /* The driver refuses (another process): everything goes back. */
    vd_error_clear(&err);
    unsigned qp = q->file->perm, qs = q->file->shared;
    int a0 = aborts;
    fail_check_on = f;
    vd_user *u = NULL;
    CHECK(vd_user_new(&u, q, NULL, VD_PERM_WRITE_UNCHANGED, VD_PERM_ALL,
                      &err) == -EBUSY, "driver refusal: %s", err.message);
    fail_check_on = NULL;
    CHECK(!u && !vd_node_has_users(q), "refused user stayed");
    CHECK(q->file->perm == qp && q->file->shared == qs,
          "edge not restored: %#x %#x", q->file->perm, q->file->shared);
    CHECK(ps->held_perm == perm && ps->held_shared == shared,
          "driver state moved");
    CHECK(aborts == a0, "a refusing check_perm must undo itself only");

    vd_node_unref(q);
    vd_node_unref(f);
}

static void test_read_only(void)
{
    vd_error err = VD_ERROR_INIT;
    vd_node *f = open_proto("f4", false);
    vd_node *q = open_fmt("q4", "f4", false, &err);
    CHECK(q, "read-only format: %s", err.message);
    /* Read-only: it reads its file and still lets nobody write it. */
    CHECK(q->file->perm == VD_PERM_CONSISTENT_READ, "ro perm %#x",
          q->file->perm);
    CHECK(!(q->file->shared & VD_PERM_WRITE), "ro still unshares write");

    vd_user *u = NULL;
    CHECK(vd_user_new(&u, q, "block device 'd'", RW, VD_PERM_ALL,
                      &err) == -EPERM &&
          strcmp(err.message, "Block node is read-only") == 0,
          "writer on read-only: %s", err.message);

    /* A writable format over a read-only file. */
    vd_error_clear(&err);
    vd_node *f5 = open_proto("f5", false);
    vd_node *q5 = open_fmt("q5", "f5", true, &err);
    CHECK(!q5, "writable format over read-only file");
    vd_node_unref(q);
    vd_node_unref(f);
    vd_node_unref(f5);
}

static void test_users_and_messages(void)
{
    vd_error err = VD_ERROR_INIT;
    vd_node *f = open_proto("f6", true);
    vd_user *a = NULL, *b = NULL;

    CHECK(vd_user_new(&a, f, NULL, VD_PERM_CONSISTENT_READ,
                      VD_PERM_ALL & ~VD_PERM_RESIZE, &err) == 0, "a");
    CHECK(vd_user_new(&b, f, "export 'e'", VD_PERM_RESIZE, VD_PERM_ALL,
                      &err) == -EPERM, "b must conflict");
    CHECK(strcmp(err.message, "Permission conflict on node 'f6': "
                 "permissions 'resize' are both required by export 'e' "
                 "(uses node 'f6' as 'root' child) and unshared by an "
                 "unnamed block device (uses node 'f6' as 'root' child).") == 0,
          "message: %s", err.message);
    /* Loosening then allows it. */
    vd_error_clear(&err);
    CHECK(vd_user_set_perm(a, VD_PERM_CONSISTENT_READ, VD_PERM_ALL, &err) == 0,
          "loosen: %s", err.message);
    CHECK(vd_user_new(&b, f, NULL, VD_PERM_RESIZE, VD_PERM_ALL, &err) == 0,
          "b after loosening: %s", err.message);
    /* Tightening a into a conflict fails and keeps a as it was. */
    CHECK(vd_user_set_perm(a, VD_PERM_CONSISTENT_READ,
                           VD_PERM_ALL & ~VD_PERM_RESIZE, NULL) == -EPERM,
          "tighten into conflict");
    unsigned ap, as;
    vd_user_get_perm(a, &ap, &as);
    CHECK(ap == VD_PERM_CONSISTENT_READ && as == VD_PERM_ALL, "a kept");
    CHECK(vd_user_node(a) == f && vd_node_has_users(f), "accessors");
    vd_user_free(&a);
    vd_user_free(&b);
    CHECK(!a && !b && !vd_node_has_users(f), "freed");
    vd_node_unref(f);
}

static void test_blockers(void)
{
    vd_error err = VD_ERROR_INIT;
    vd_node *f = open_proto("f7", true);
    vd_node *base = open_fmt("base7", "f7", true, &err);
    vd_node *f8 = open_proto("f8", true);
    vd_node *top = open_fmt("top7", "f8", true, &err);

    CHECK(!vd_op_is_blocked(base, VD_OP_RESIZE, NULL), "free before");
    vd_node_ref(base);
    CHECK(vd_node_attach_child(top, base, "backing",
                               VD_ROLE_COW | VD_ROLE_DATA, &err), "attach");
    CHECK(vd_op_is_blocked(base, VD_OP_RESIZE, &err) &&
          strcmp(err.message, "Node 'base7' is busy: node is used as "
                 "backing hd of 'top7'") == 0, "backing blocker: %s",
          err.message);
    CHECK(!vd_op_is_blocked(base, VD_OP_COMMIT_TARGET, NULL) &&
          !vd_op_is_blocked(base, VD_OP_STREAM, NULL), "allowed ops");
    vd_error_clear(&err);
    CHECK(vd_truncate(base, 4096, true, VD_PREALLOC_OFF, &err) == -EBUSY,
          "resize of a backing node: %s", err.message);

    /* A refusal at the last node of a transaction (top's file comes
     * after the backing chain): the backing file's driver, checked
     * before, is aborted, and every edge is as before. */
    proto_state *p7 = f->opaque, *p8 = f8->opaque;
    unsigned h7 = p7->held_perm, h8 = p8->held_perm;
    unsigned tf = top->file->perm, tb = top->backing->perm;
    int a0 = aborts;
    vd_user *u = NULL;
    fail_check_on = f8;
    vd_error_clear(&err);
    CHECK(vd_user_new(&u, top, NULL, VD_PERM_CONSISTENT_READ, VD_PERM_ALL,
                      &err) == -EBUSY, "refusal at the end: %s", err.message);
    fail_check_on = NULL;
    CHECK(aborts == a0 + 1, "checked driver not aborted: %d", aborts - a0);
    CHECK(top->file->perm == tf && top->backing->perm == tb &&
          p7->held_perm == h7 && p8->held_perm == h8, "not rolled back");

    vd_blocker *b = vd_blocker_new("testing %d", 7);
    vd_op_block(top, VD_OP_INTERNAL_SNAPSHOT, b);
    vd_error_clear(&err);
    CHECK(vd_snapshot_create_simple(top, "s", &err) == -EBUSY &&
          strcmp(err.message, "Node 'top7' is busy: testing 7") == 0,
          "snapshot blocked: %s", err.message);
    vd_op_unblock(top, VD_OP_INTERNAL_SNAPSHOT, b);
    CHECK(!vd_op_is_blocked(top, VD_OP_INTERNAL_SNAPSHOT, NULL), "unblocked");
    vd_blocker_free(&b);

    vd_node_detach_child(top, top->backing);
    CHECK(!vd_op_is_blocked(base, VD_OP_RESIZE, NULL), "free after detach");
    vd_node_unref(top);
    vd_node_unref(f8);
    vd_node_unref(base);
    vd_node_unref(f);
}

int main(void)
{
    test_storage_perms();
    test_conflict_and_rollback();
    test_read_only();
    test_users_and_messages();
    test_blockers();
    TEST_EXIT("test-perm");
}
