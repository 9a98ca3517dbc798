/*
 * Permissions and operation blockers: QEMU's model of who may do what
 * to a node (docs/permissions.md).
 *
 * Every edge into a node, a parent node's child or a user (vd_user:
 * the caller of vd_open(), an export, a QMP command), holds permissions
 * on the node and shares some with the node's other edges. A node's
 * cumulative permissions are the OR of what its edges hold and the AND
 * of what they share; its driver's child_perm turns them into what the
 * node needs from each child. A change anywhere (an edge made, dropped
 * or changed, a node reopened) is a *transaction* over the subgraph
 * below the change:
 *   1. collect the nodes below, parents before children (a DAG walk);
 *   2. for each node in that order: sum its edges, refuse a conflict
 *      between two of them (QEMU's "Permission conflict on node ...")
 *      or a writer on a read-only node, let the driver check it
 *      (check_perm: the file driver takes and tests lock bytes), then
 *      compute the edges to its children from the driver's answer;
 *   3. all good: commit (set_perm, new cumulative values); else undo
 *      every edge and abort_perm every checked driver, so nothing
 *      changes, not even a lock byte other processes could see.
 * Transactions are serialised by perm_lock; requests never take it.
 *
 * Attaching and detaching children runs such a transaction, so it lives
 * here, as do users (vd_user_*) and the opener vd_open() attaches.
 *
 * Operation blockers are per-node lists of (operation, blocker) pairs:
 * a blocker is an object with a reason, installed and removed by whoever
 * made it (backing attach blocks most operations on the backing node).
 */
#include <assert.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/block_int.h"

static pthread_mutex_t perm_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned visit_epoch;

static const char *const perm_names[] = {
    "consistent read", "write", "write unchanged", "resize",
};

/* "write, resize": the names of the bits of @perm, as QEMU lists them. */
static void format_perm_names(char *buf, size_t len, unsigned perm)
{
    size_t used = 0;

    buf[0] = '\0';
    for (unsigned i = 0; i < sizeof(perm_names) / sizeof(perm_names[0]);
         i++) {
        if (!(perm & (1u << i))) {
            continue;
        }
        int n = snprintf(buf + used, len - used, "%s%s",
                         used ? ", " : "", perm_names[i]);
        if (n < 0 || (size_t)n >= len - used) {
            break;
        }
        used += (size_t)n;
    }
}

/* ---- default permissions by role ---- */

/* Filters pass their parents' permissions through unchanged. */
static void filter_perms(unsigned perm, unsigned shared, unsigned *nperm,
                         unsigned *nshared)
{
    *nperm = perm & VD_PERM_ALL;
    *nshared = shared & VD_PERM_ALL;
}

/* A backing file is only ever read; writes and resizes by others are
 * fine only when the overlay's users accept changing data. */
static void cow_perms(unsigned perm, unsigned shared, unsigned *nperm,
                      unsigned *nshared)
{
    *nperm = perm & VD_PERM_CONSISTENT_READ;
    *nshared = (shared & VD_PERM_WRITE)
               ? VD_PERM_WRITE | VD_PERM_RESIZE : 0;
    *nshared |= VD_PERM_CONSISTENT_READ | VD_PERM_WRITE_UNCHANGED;
}

/* The file (or data file) of a format: metadata must stay consistent, so
 * nobody else may write or resize it; a writable format writes and grows
 * it even when its own users do not write. */
static void storage_perms(const vd_node *node, unsigned role, unsigned perm,
                          unsigned shared, unsigned *nperm,
                          unsigned *nshared)
{
    filter_perms(perm, shared, &perm, &shared);
    if (role & VD_ROLE_METADATA) {
        if (!node->read_only) {
            perm |= VD_PERM_WRITE | VD_PERM_RESIZE;
        }
        if (!(node->flags & VD_NODE_NO_IO)) {
            perm |= VD_PERM_CONSISTENT_READ;
        }
        shared &= ~(VD_PERM_WRITE | VD_PERM_RESIZE);
    }
    if (role & VD_ROLE_DATA) {
        /* The format may assume the size of its data (it is in its
         * metadata), and rewriting unchanged guest data may still mean
         * writing new clusters, which may grow the file. */
        shared &= ~VD_PERM_RESIZE;
        if (perm & VD_PERM_WRITE_UNCHANGED) {
            perm |= VD_PERM_WRITE;
        }
        if (perm & VD_PERM_WRITE) {
            perm |= VD_PERM_RESIZE;
        }
    }
    *nperm = perm;
    *nshared = shared;
}

void vd_default_child_perm(vd_node *node, const vd_child *c, unsigned perm,
                           unsigned shared, unsigned *nperm,
                           unsigned *nshared)
{
    if (c->role & VD_ROLE_FILTERED) {
        filter_perms(perm, shared, nperm, nshared);
    } else if (c->role & VD_ROLE_COW) {
        cow_perms(perm, shared, nperm, nshared);
    } else {
        storage_perms(node, c->role, perm, shared, nperm, nshared);
    }
}

static void child_perm(vd_node *node, const vd_child *c, unsigned perm,
                       unsigned shared, unsigned *nperm, unsigned *nshared)
{
    if (node->drv->child_perm) {
        node->drv->child_perm(node, c, perm, shared, nperm, nshared);
    } else {
        vd_default_child_perm(node, c, perm, shared, nperm, nshared);
    }
    /* force-share: the child lets everybody in (read-only nodes only). */
    if (c->node->flags & VD_NODE_FORCE_SHARE) {
        *nshared = VD_PERM_ALL;
    }
}

/* ---- parents ---- */

void vd_node_link_parent(vd_node *node, vd_child *c)
{
    c->next_parent = node->parents;
    node->parents = c;
    if (c->parent) {
        node->n_parents++;
    }
}

void vd_node_unlink_parent(vd_node *node, vd_child *c)
{
    for (vd_child **p = &node->parents; *p; p = &(*p)->next_parent) {
        if (*p == c) {
            *p = c->next_parent;
            break;
        }
    }
    c->next_parent = NULL;
    if (c->parent) {
        node->n_parents--;
    }
}

/* "node 'q'" or the user's own description. */
static void describe_edge(char *buf, size_t len, const vd_child *c)
{
    if (c->parent) {
        snprintf(buf, len, "node '%s'", c->parent->node_name);
    } else {
        snprintf(buf, len, "%s", c->user_desc);
    }
}

/* QEMU's check of one pair: does @a let @b hold what @b holds? */
static bool a_allows_b(const vd_child *a, const vd_child *b, vd_error *err)
{
    char names[64], a_desc[128], b_desc[128];
    const char *node = b->node->node_name;

    if ((b->perm & a->shared) == b->perm) {
        return true;
    }
    format_perm_names(names, sizeof(names), b->perm & ~a->shared);
    describe_edge(a_desc, sizeof(a_desc), a);
    describe_edge(b_desc, sizeof(b_desc), b);
    vd_error_set(err, -EPERM, "Permission conflict on node '%s': "
                 "permissions '%s' are both required by %s (uses node '%s' "
                 "as '%s' child) and unshared by %s (uses node '%s' as '%s' "
                 "child).", node, names, b_desc, node, b->name, a_desc, node,
                 a->name);
    return false;
}

/* Every ordered pair of @node's edges, in QEMU's order. */
static int parents_conflict(vd_node *node, vd_error *err)
{
    for (vd_child *a = node->parents; a; a = a->next_parent) {
        for (vd_child *b = node->parents; b; b = b->next_parent) {
            if (a != b && !a_allows_b(a, b, err)) {
                return -EPERM;
            }
        }
    }
    return 0;
}

/* ---- transactions ---- */

typedef struct perm_tran {
    vd_node **order;       /* parents before children */
    size_t n, cap;
    vd_child **saved;      /* edges changed, to undo */
    size_t nsaved, capsaved;
    size_t nchecked;       /* order[0..nchecked) passed check_perm */
    bool commit;           /* false: check only, then undo */
} perm_tran;

static int push(void ***v, size_t *n, size_t *cap, void *p)
{
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 16;
        void **nv = realloc(*v, c * sizeof(**v));
        if (!nv) {
            return -ENOMEM;
        }
        *v = nv;
        *cap = c;
    }
    (*v)[(*n)++] = p;
    return 0;
}

/*
 * Orders @root and everything below it parents-first: an iterative
 * depth-first walk (chains may be thousands of layers deep) recording
 * each node after its children, then reversed.
 */
static int collect(perm_tran *t, vd_node *root)
{
    typedef struct frame { vd_node *node; vd_child *next; } frame;
    frame *stack = NULL;
    size_t depth = 0, cap = 0;
    unsigned epoch = ++visit_epoch;
    int r = 0;

    if (!epoch) {
        epoch = ++visit_epoch; /* 0 means "never visited" */
    }
    root->tran_visit = epoch;
    cap = 16;
    stack = malloc(cap * sizeof(*stack));
    if (!stack) {
        return -ENOMEM;
    }
    stack[depth++] = (frame){ root, root->children };
    while (depth > 0 && r == 0) {
        frame *f = &stack[depth - 1];
        if (!f->next) {
            r = push((void ***)&t->order, &t->n, &t->cap, f->node);
            depth--;
            continue;
        }
        vd_node *child = f->next->node;
        f->next = f->next->next;
        if (child->tran_visit == epoch) {
            continue;
        }
        child->tran_visit = epoch;
        if (depth == cap) {
            frame *ns = realloc(stack, cap * 2 * sizeof(*stack));
            if (!ns) {
                r = -ENOMEM;
                break;
            }
            stack = ns;
            cap *= 2;
        }
        stack[depth++] = (frame){ child, child->children };
    }
    free(stack);
    for (size_t i = 0; r == 0 && i < t->n / 2; i++) {
        vd_node *tmp = t->order[i];
        t->order[i] = t->order[t->n - 1 - i];
        t->order[t->n - 1 - i] = tmp;
    }
    return r;
}

/* Gives edge @c new permissions, remembering the old ones for undo. */
static int set_edge(perm_tran *t, vd_child *c, unsigned perm,
                    unsigned shared)
{
    if (!c->tran_saved) {
        int r = push((void ***)&t->saved, &t->nsaved, &t->capsaved, c);
        if (r < 0) {
            return r;
        }
        c->tran_saved = true;
        c->tran_perm = c->perm;
        c->tran_shared = c->shared;
    }
    c->perm = perm;
    c->shared = shared;
    return 0;
}

static void tran_undo(perm_tran *t)
{
    for (size_t i = t->nchecked; i-- > 0;) {
        vd_node *n = t->order[i];
        if (n->drv->abort_perm) {
            n->drv->abort_perm(n);
        }
    }
    for (size_t i = 0; i < t->nsaved; i++) {
        vd_child *c = t->saved[i];
        c->perm = c->tran_perm;
        c->shared = c->tran_shared;
        c->tran_saved = false;
    }
}

static void tran_commit(perm_tran *t)
{
    for (size_t i = 0; i < t->n; i++) {
        vd_node *n = t->order[i];
        /* Requests read perm without a lock (io.c: a write needs some
         * edge that holds it); jobs change permissions while they run. */
        __atomic_store_n(&n->perm, n->tran_perm, __ATOMIC_RELAXED);
        __atomic_store_n(&n->shared, n->tran_shared, __ATOMIC_RELAXED);
        if (n->drv->set_perm) {
            n->drv->set_perm(n, n->perm, n->shared);
        }
    }
    for (size_t i = 0; i < t->nsaved; i++) {
        t->saved[i]->tran_saved = false;
    }
}

/* Step 2 of the file comment for every collected node. */
static int tran_check(perm_tran *t, vd_error *err)
{
    for (size_t i = 0; i < t->n; i++) {
        vd_node *n = t->order[i];
        unsigned perm = 0, shared = VD_PERM_ALL;
        int r;

        for (vd_child *e = n->parents; e; e = e->next_parent) {
            perm |= e->perm;
            shared &= e->shared;
        }
        r = parents_conflict(n, err);
        if (r < 0) {
            return r;
        }
        if ((perm & (VD_PERM_WRITE | VD_PERM_WRITE_UNCHANGED)) &&
            n->read_only) {
            return vd_error_set(err, -EPERM, "Block node is read-only");
        }
        if (n->drv->check_perm) {
            r = n->drv->check_perm(n, perm, shared, err);
            if (r < 0) {
                return r;
            }
        }
        t->nchecked = i + 1;
        n->tran_perm = perm;
        n->tran_shared = shared;
        for (vd_child *c = n->children; c; c = c->next) {
            unsigned cp, cs;
            child_perm(n, c, perm, shared, &cp, &cs);
            r = set_edge(t, c, cp, cs);
            if (r < 0) {
                return vd_error_set(err, r, "Out of memory");
            }
        }
    }
    return 0;
}

/*
 * Runs a transaction below @root after the caller changed edges into
 * @root (already recorded in @t->saved where they must be undone).
 * Returns 0 (committed, or checked only when !t->commit) or the error
 * (everything undone). Frees the transaction's arrays either way.
 */
static int tran_run(perm_tran *t, vd_node *root, vd_error *err)
{
    int r = collect(t, root);

    if (r < 0) {
        vd_error_set(err, r, "Out of memory");
    } else {
        r = tran_check(t, err);
    }
    if (r < 0 || !t->commit) {
        tran_undo(t);
    } else {
        tran_commit(t);
    }
    free(t->order);
    free(t->saved);
    return r;
}

int vd_node_refresh_perms(vd_node *node, vd_error *err)
{
    perm_tran t = { .commit = true };

    pthread_mutex_lock(&perm_lock);
    int r = tran_run(&t, node, err);
    pthread_mutex_unlock(&perm_lock);
    return r;
}

/* Marks @node and the children a reopen switches along (not the backing
 * chain) read-only or not, returning the old values in @old (a bit per
 * node in walk order; at most 64 levels are switched, which is more than
 * any format's file chain). */
static void mark_read_only(vd_node *node, bool ro, uint64_t *old,
                           unsigned *idx, bool restore)
{
    if (*idx < 64) {
        if (restore) {
            node->read_only = (*old >> *idx) & 1;
        } else {
            *old |= (uint64_t)node->read_only << *idx;
            node->read_only = ro;
        }
    }
    (*idx)++;
    for (vd_child *c = node->children; c; c = c->next) {
        if (!(c->role & VD_ROLE_COW)) {
            mark_read_only(c->node, ro, old, idx, restore);
        }
    }
}

int vd_node_reopen_perms(vd_node *node, bool read_only, bool commit,
                         vd_error *err)
{
    perm_tran t = { .commit = commit };
    uint64_t old = 0;
    unsigned idx = 0;

    pthread_mutex_lock(&perm_lock);
    mark_read_only(node, read_only, &old, &idx, false);
    int r = tran_run(&t, node, err);
    if (r == -EPERM && read_only && err &&
        strcmp(err->message, "Block node is read-only") == 0) {
        /* QEMU's wording when a writer keeps a node from going
         * read-only. */
        vd_error_clear(err);
        vd_error_set(err, -EPERM, "Cannot make block node read-only, "
                     "there is a writer on it");
    }
    idx = 0;
    mark_read_only(node, read_only, &old, &idx, true);
    pthread_mutex_unlock(&perm_lock);
    return r;
}

/* ---- edges: attaching children, users ---- */

/*
 * A backing node belongs to its overlay: resizing it, snapshotting it,
 * deleting it and the like are refused while it is attached, as QEMU's
 * backing blocker does; committing into it, streaming from it and
 * backing it up stay possible.
 */
static void block_backing(vd_node *parent, vd_node *backing)
{
    static const vd_op allowed[] = {
        VD_OP_COMMIT_TARGET, VD_OP_STREAM, VD_OP_BACKUP_SOURCE,
        VD_OP_BACKUP_TARGET,
    };

    if (!parent->backing_blocker) {
        parent->backing_blocker = vd_blocker_new(
            "node is used as backing hd of '%s'", parent->node_name);
    }
    /* Out of memory leaves the node unblocked: no worse than before. */
    if (!parent->backing_blocker ||
        vd_op_block_all(backing, parent->backing_blocker) < 0) {
        return;
    }
    for (size_t i = 0; i < sizeof(allowed) / sizeof(allowed[0]); i++) {
        vd_op_unblock(backing, allowed[i], parent->backing_blocker);
    }
}

static void unblock_backing(vd_node *parent, vd_node *backing)
{
    if (parent->backing_blocker) {
        vd_op_unblock_all(backing, parent->backing_blocker);
        vd_blocker_free(&parent->backing_blocker);
    }
}

vd_child *vd_node_attach_child(vd_node *parent, vd_node *child_node,
                               const char *name, unsigned role,
                               vd_error *err)
{
    vd_child *c = calloc(1, sizeof(*c));
    perm_tran t = { .commit = true };
    int r;

    if (!c || !(c->name = strdup(name))) {
        free(c);
        vd_error_set(err, -ENOMEM, "Out of memory");
        return NULL;
    }
    c->node = child_node;
    c->parent = parent;
    c->role = role;
    pthread_mutex_lock(&perm_lock);
    child_perm(parent, c, parent->perm, parent->shared, &c->perm,
               &c->shared);
    vd_node_link_parent(child_node, c);
    r = tran_run(&t, child_node, err);
    if (r < 0) {
        vd_node_unlink_parent(child_node, c);
        pthread_mutex_unlock(&perm_lock);
        free(c->name);
        free(c);
        return NULL;
    }
    pthread_mutex_unlock(&perm_lock);

    vd_child **p = &parent->children;
    while (*p) {
        p = &(*p)->next;
    }
    *p = c;
    if (strcmp(name, "file") == 0) {
        parent->file = c;
    } else if (strcmp(name, "backing") == 0) {
        parent->backing = c;
    }
    if (role & VD_ROLE_COW) {
        block_backing(parent, child_node);
    }
    return c;
}

/* Releases what the edge @c held on @node (a detached child or a freed
 * user). Loosening cannot conflict; a driver error is ignored as QEMU
 * does, the old locks then simply stay until the file is closed. */
static void release_edge(vd_node *node, vd_child *c)
{
    perm_tran t = { .commit = true };

    pthread_mutex_lock(&perm_lock);
    vd_node_unlink_parent(node, c);
    tran_run(&t, node, NULL);
    pthread_mutex_unlock(&perm_lock);
}

void vd_node_detach_child(vd_node *parent, vd_child *child)
{
    if (child->role & VD_ROLE_COW) {
        unblock_backing(parent, child->node);
    }
    for (vd_child **p = &parent->children; *p; p = &(*p)->next) {
        if (*p == child) {
            *p = child->next;
            break;
        }
    }
    if (parent->file == child) {
        parent->file = NULL;
    }
    if (parent->backing == child) {
        parent->backing = NULL;
    }
    release_edge(child->node, child);
    vd_node_unref(child->node);
    free(child->name);
    free(child);
}

/* Makes a user of @node; @ref: take a node reference (not for the
 * opener, whose reference is the caller's handle itself). */
static int user_new(vd_user **out, vd_node *node, const char *desc,
                    unsigned perm, unsigned shared, bool ref, vd_error *err)
{
    vd_user *u = calloc(1, sizeof(*u));
    perm_tran t = { .commit = true };
    int r;

    *out = NULL;
    if (!u) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    u->edge.name = strdup("root");
    u->edge.user_desc = strdup(desc ? desc : "an unnamed block device");
    if (!u->edge.name || !u->edge.user_desc) {
        free(u->edge.name);
        free(u->edge.user_desc);
        free(u);
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    u->edge.node = node;
    u->edge.role = VD_ROLE_DATA | VD_ROLE_PRIMARY;
    u->edge.perm = perm & VD_PERM_ALL;
    u->edge.shared = shared & VD_PERM_ALL;
    pthread_mutex_lock(&perm_lock);
    vd_node_link_parent(node, &u->edge);
    r = tran_run(&t, node, err);
    if (r < 0) {
        vd_node_unlink_parent(node, &u->edge);
    }
    pthread_mutex_unlock(&perm_lock);
    if (r < 0) {
        free(u->edge.name);
        free(u->edge.user_desc);
        free(u);
        return r;
    }
    if (ref) {
        vd_node_ref(node);
    }
    *out = u;
    return 0;
}

static void user_free(vd_user *u)
{
    release_edge(u->edge.node, &u->edge);
    free(u->edge.name);
    free(u->edge.user_desc);
    free(u);
}

VD_API int vd_user_new(vd_user **out, vd_node *node, const char *desc,
                       unsigned perm, unsigned shared, vd_error *err)
{
    return user_new(out, node, desc, perm, shared, true, err);
}

VD_API int vd_user_set_perm(vd_user *user, unsigned perm, unsigned shared,
                            vd_error *err)
{
    perm_tran t = { .commit = true };
    vd_child *c = &user->edge;
    int r;

    pthread_mutex_lock(&perm_lock);
    r = set_edge(&t, c, perm & VD_PERM_ALL, shared & VD_PERM_ALL);
    if (r < 0) {
        vd_error_set(err, r, "Out of memory");
        pthread_mutex_unlock(&perm_lock);
        return r;
    }
    r = tran_run(&t, c->node, err);
    pthread_mutex_unlock(&perm_lock);
    return r;
}

VD_API void vd_user_get_perm(const vd_user *user, unsigned *perm,
                             unsigned *shared)
{
    if (perm) {
        *perm = user->edge.perm;
    }
    if (shared) {
        *shared = user->edge.shared;
    }
}

VD_API vd_node *vd_user_node(const vd_user *user)
{
    return user->edge.node;
}

VD_API void vd_user_free(vd_user **user)
{
    if (!user || !*user) {
        return;
    }
    vd_user *u = *user;
    vd_node *node = u->edge.node;
    *user = NULL;
    user_free(u);
    vd_node_unref(node);
}

/* The opener (node.c): a user without its own node reference. */
int vd_node_attach_opener(vd_node *node, unsigned perm, unsigned shared,
                          vd_error *err)
{
    return user_new(&node->opener, node, NULL, perm, shared, false, err);
}

void vd_node_drop_opener(vd_node *node)
{
    if (node->opener) {
        vd_user *u = node->opener;
        node->opener = NULL;
        user_free(u);
    }
}

VD_API int vd_set_perm(vd_node *node, unsigned perm, unsigned shared,
                       vd_error *err)
{
    if (!node->opener) {
        return vd_error_set(err, -EINVAL, "Node '%s' has no opener",
                            node->node_name);
    }
    return vd_user_set_perm(node->opener, perm, shared, err);
}

VD_API bool vd_node_has_users(const vd_node *node)
{
    for (const vd_child *c = node->parents; c; c = c->next_parent) {
        if (!c->parent && !c->job_edge) {
            return true;
        }
    }
    return false;
}

VD_API void vd_node_get_perm(const vd_node *node, unsigned *perm,
                             unsigned *shared)
{
    if (perm) {
        *perm = node->perm;
    }
    if (shared) {
        *shared = node->shared;
    }
}

/* ---- operation blockers ---- */

struct vd_blocker {
    char *reason;
};

typedef struct op_entry {
    vd_blocker *blocker;
    struct op_entry *next;
} op_entry;

struct vd_op_blockers {
    op_entry *ops[VD_OP__MAX];
};

VD_API vd_blocker *vd_blocker_new(const char *fmt, ...)
{
    vd_blocker *b = calloc(1, sizeof(*b));
    va_list ap;

    if (!b) {
        return NULL;
    }
    va_start(ap, fmt);
    int n = vasprintf(&b->reason, fmt, ap);
    va_end(ap);
    if (n < 0) {
        free(b);
        return NULL;
    }
    return b;
}

VD_API void vd_blocker_free(vd_blocker **blocker)
{
    if (blocker && *blocker) {
        free((*blocker)->reason);
        free(*blocker);
        *blocker = NULL;
    }
}

VD_API int vd_op_block(vd_node *node, vd_op op, vd_blocker *blocker)
{
    if ((unsigned)op >= VD_OP__MAX) {
        return -EINVAL;
    }
    if (!node->op_blockers &&
        !(node->op_blockers = calloc(1, sizeof(*node->op_blockers)))) {
        return -ENOMEM;
    }
    op_entry *e = malloc(sizeof(*e));
    if (!e) {
        return -ENOMEM;
    }
    pthread_mutex_lock(&perm_lock);
    e->blocker = blocker;
    e->next = node->op_blockers->ops[op];
    node->op_blockers->ops[op] = e;
    pthread_mutex_unlock(&perm_lock);
    return 0;
}

VD_API void vd_op_unblock(vd_node *node, vd_op op, vd_blocker *blocker)
{
    if ((unsigned)op >= VD_OP__MAX || !node->op_blockers) {
        return;
    }
    pthread_mutex_lock(&perm_lock);
    for (op_entry **p = &node->op_blockers->ops[op]; *p; p = &(*p)->next) {
        if ((*p)->blocker == blocker) {
            op_entry *e = *p;
            *p = e->next;
            free(e);
            break;
        }
    }
    pthread_mutex_unlock(&perm_lock);
}

VD_API int vd_op_block_all(vd_node *node, vd_blocker *blocker)
{
    for (int op = 0; op < VD_OP__MAX; op++) {
        int r = vd_op_block(node, (vd_op)op, blocker);
        if (r < 0) {
            vd_op_unblock_all(node, blocker);
            return r;
        }
    }
    return 0;
}

VD_API void vd_op_unblock_all(vd_node *node, vd_blocker *blocker)
{
    for (int op = 0; op < VD_OP__MAX; op++) {
        vd_op_unblock(node, (vd_op)op, blocker);
    }
}

VD_API bool vd_op_is_blocked(vd_node *node, vd_op op, vd_error *err)
{
    bool blocked = false;

    if ((unsigned)op >= VD_OP__MAX || !node->op_blockers) {
        return false;
    }
    pthread_mutex_lock(&perm_lock);
    op_entry *e = node->op_blockers->ops[op];
    if (e) {
        blocked = true;
        vd_error_set(err, -EBUSY, "Node '%s' is busy: %s", node->node_name,
                     e->blocker->reason);
    }
    pthread_mutex_unlock(&perm_lock);
    return blocked;
}

void vd_node_free_op_blockers(vd_node *node)
{
    if (!node->op_blockers) {
        return;
    }
    for (int op = 0; op < VD_OP__MAX; op++) {
        while (node->op_blockers->ops[op]) {
            op_entry *e = node->op_blockers->ops[op];
            node->op_blockers->ops[op] = e->next;
            free(e);
        }
    }
    free(node->op_blockers);
    node->op_blockers = NULL;
}

/* ---- request gates and pivots ---- */

static pthread_mutex_t gate_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cond = PTHREAD_COND_INITIALIZER;
/* Nesting depth of vd_graph_quiesce_begin(): while above 0 every user's
 * gate is closed, whatever the pivots open and close meanwhile. */
static atomic_int quiesce_depth;

static bool gate_closed(const vd_user *user)
{
    return atomic_load(&user->io_gate) || atomic_load(&quiesce_depth) > 0;
}

VD_API vd_node *vd_user_io_begin(vd_user *user)
{
    for (;;) {
        /* In flight first, then the gate; the gate keepers close the
         * gate first, then count (both sequentially consistent), so
         * either the request sees the gate or the keeper sees it. */
        atomic_fetch_add(&user->io_in_flight, 1);
        if (!gate_closed(user))
            return __atomic_load_n(&user->edge.node, __ATOMIC_ACQUIRE);
        /* Step back out so the pivot can finish, then wait for it. */
        if (atomic_fetch_sub(&user->io_in_flight, 1) == 1) {
            pthread_mutex_lock(&gate_lock);
            pthread_cond_broadcast(&gate_cond);
            pthread_mutex_unlock(&gate_lock);
        }
        pthread_mutex_lock(&gate_lock);
        while (gate_closed(user))
            pthread_cond_wait(&gate_cond, &gate_lock);
        pthread_mutex_unlock(&gate_lock);
    }
}

VD_API void vd_user_io_end(vd_user *user)
{
    if (atomic_fetch_sub(&user->io_in_flight, 1) == 1 &&
        gate_closed(user)) {
        pthread_mutex_lock(&gate_lock);
        pthread_cond_broadcast(&gate_cond);
        pthread_mutex_unlock(&gate_lock);
    }
}

/* The users a pivot holds and moves: not a job's own edges, and not the
 * opener of vd_open(), whose caller holds the node itself (and issues
 * its requests to it directly). */
static bool gated_kind(const vd_child *c)
{
    return !c->parent && !c->job_edge &&
           (vd_user *)c != c->node->opener;
}

void vd_node_gate_users(vd_node *node)
{
    pthread_mutex_lock(&perm_lock);
    for (vd_child *c = node->parents; c; c = c->next_parent)
        if (gated_kind(c))
            atomic_store(&((vd_user *)c)->io_gate, true);
    pthread_mutex_unlock(&perm_lock);
    pthread_mutex_lock(&gate_lock);
    for (;;) {
        bool busy = false;
        pthread_mutex_lock(&perm_lock);
        for (vd_child *c = node->parents; c; c = c->next_parent)
            if (gated_kind(c) && atomic_load(&((vd_user *)c)->io_in_flight))
                busy = true;
        pthread_mutex_unlock(&perm_lock);
        if (!busy)
            break;
        pthread_cond_wait(&gate_cond, &gate_lock);
    }
    pthread_mutex_unlock(&gate_lock);
}

static void user_requests_in_flight(vd_node *node, void *opaque)
{
    bool *busy = opaque;
    pthread_mutex_lock(&perm_lock);
    for (vd_child *c = node->parents; c; c = c->next_parent)
        if (gated_kind(c) && atomic_load(&((vd_user *)c)->io_in_flight))
            *busy = true;
    pthread_mutex_unlock(&perm_lock);
}

VD_API void vd_graph_quiesce_begin(void)
{
    atomic_fetch_add(&quiesce_depth, 1);
    for (;;) {
        bool busy = false;
        /* Counted without gate_lock: pivots take it under the graph lock
         * that vd_foreach_node() takes. A wake-up missed between the
         * count and the wait costs one timeout, never a hang. */
        vd_foreach_node(user_requests_in_flight, &busy);
        if (!busy)
            return;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 10 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_mutex_lock(&gate_lock);
        pthread_cond_timedwait(&gate_cond, &gate_lock, &ts);
        pthread_mutex_unlock(&gate_lock);
    }
}

VD_API void vd_graph_quiesce_end(void)
{
    int before = atomic_fetch_sub(&quiesce_depth, 1);
    assert(before > 0);
    (void)before;
    pthread_mutex_lock(&gate_lock);
    pthread_cond_broadcast(&gate_cond);
    pthread_mutex_unlock(&gate_lock);
}

void vd_node_ungate_users(vd_node *node)
{
    pthread_mutex_lock(&perm_lock);
    for (vd_child *c = node->parents; c; c = c->next_parent)
        if (gated_kind(c))
            atomic_store(&((vd_user *)c)->io_gate, false);
    pthread_mutex_unlock(&perm_lock);
    pthread_mutex_lock(&gate_lock);
    pthread_cond_broadcast(&gate_cond);
    pthread_mutex_unlock(&gate_lock);
}

/* Whether @c's parent is @to or in @to's backing chain: replacing there
 * would make @to its own backing file. */
static bool from_to_chain(const vd_child *c, vd_node *to)
{
    for (vd_node *n = to; n; n = n->backing ? n->backing->node : NULL)
        if (c->parent == n)
            return true;
    return false;
}

static void move_edge(vd_child *c, vd_node *from, vd_node *to)
{
    vd_node_unlink_parent(from, c);
    __atomic_store_n(&c->node, to, __ATOMIC_RELEASE);
    vd_node_link_parent(to, c);
}

int vd_node_replace(vd_node *from, vd_node *to, vd_error *err)
{
    vd_child *moved[256];
    size_t n = 0;
    int r = 0;

    pthread_mutex_lock(&perm_lock);
    for (vd_child *c = from->parents; c && n < 256;) {
        vd_child *next = c->next_parent;
        if (!c->job_edge && !from_to_chain(c, to) &&
            (c->parent || gated_kind(c))) {
            if (c->parent)
                vd_node_drain_begin(c->parent);
            move_edge(c, from, to);
            moved[n++] = c;
        }
        c = next;
    }
    perm_tran t = { .commit = true };
    r = tran_run(&t, to, err);
    if (r < 0) {
        for (size_t i = 0; i < n; i++)
            move_edge(moved[i], to, from);
    }
    perm_tran t2 = { .commit = true };
    tran_run(&t2, r < 0 ? to : from, NULL);
    pthread_mutex_unlock(&perm_lock);
    for (size_t i = 0; i < n; i++) {
        vd_child *c = moved[i];
        if (r == 0) {
            vd_node_ref(to);
            if (c->parent && (c->role & VD_ROLE_COW)) {
                unblock_backing(c->parent, from);
                block_backing(c->parent, to);
            }
        }
        if (c->parent)
            vd_node_drain_end(c->parent);
    }
    if (r == 0)
        for (size_t i = 0; i < n; i++)
            vd_node_unref(from);
    return r;
}
