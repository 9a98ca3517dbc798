/*
 * Named dirty bitmaps on nodes (include/vdisk/bitmap.h, docs/bitmaps.md):
 * QEMU 7.2's BdrvDirtyBitmap with its states (recording, busy,
 * persistent, inconsistent, read-only), its checks and its messages, on
 * the hierarchical bitmap of hbitmap.c; and the core side of persistence
 * (the driver's bitmaps_load / bitmaps_store / bitmap_can_store /
 * bitmap_remove, whose contract is in block_int.h): load after open and
 * after a reopen read-write, store before close and before a reopen
 * read-only, can_store when a persistent bitmap is added, remove when
 * one is removed.
 *
 * Locking. A node's bitmaps hang off one vd_node_bitmaps, made the first
 * time the node gets a bitmap and freed with the node. Its rwlock is
 * taken for reading by the readers of this API; for writing (write_lock())
 * by what changes the list, a bitmap's state, bits other than by marking,
 * or its length (add, remove, enable, disable, busy, clear, merge,
 * freeze, load, store, truncate). A write that marks (vd_bitmaps_mark(),
 * from io.c's choke point through vd_dirty_mark()) does not take the
 * rwlock but passes a gate of two atomics that the write lock shuts
 * (falling back to the read side while it is shut), and sets bits from
 * an array of the recording bitmaps and an intersection bitmap that
 * every holder of the write lock remakes on its way out. The bits
 * themselves are lock-free (hbitmap.c), so marking writers never wait
 * for each other, only for those rare changes; the lock prefers writers,
 * so a stream of requests cannot starve a QMP command. A node without
 * bitmaps costs the request path one relaxed load
 * (vd_node_tracks_dirty()).
 */
#include <errno.h>
#include <inttypes.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap_int.h"
#include "block_int.h"
#include "hbitmap.h"
#include "vdisk/bitmap.h"

/* QEMU's BDRV_BITMAP_MAX_NAME_SIZE. */
#define MAX_NAME 1023
#define MAX_GRANULARITY (1ull << 31)

typedef struct bdm {
    char *name;
    vd_hbitmap *hb;
    atomic_bool enabled;
    bool busy;
    bool persistent;
    bool inconsistent;
    bool readonly;
    /* Where the image's bitmap directory has it (0 first), or -1 while it
     * is not stored: stores keep the directory's order and add new
     * bitmaps after it, newest first, as QEMU's
     * qcow2_store_persistent_dirty_bitmaps(). */
    long image_pos;
    /* Frozen by a job (bitmap_int.h): the anonymous successor that
     * records meanwhile, and whether it does. */
    vd_hbitmap *successor;
    bool succ_enabled;
    struct bdm *next;
} bdm;

struct vd_node_bitmaps {
    pthread_rwlock_t lock;
    bdm *head;                  /* newest first, as QEMU lists them */
    atomic_int count;
    /* The marking writes' gate (vd_bitmaps_mark()): how many are
     * marking without the lock, and whether a holder of the write lock
     * is waiting for them or working. */
    atomic_int markers;
    atomic_bool changing;
    /* What a write marks, remade by every holder of the write lock on
     * its way out (remake_recording()): the recording bitmaps' bits (a
     * bitmap's own, or its successor's while a job has it frozen), so a
     * write does not walk the list and test each bitmap's state; or,
     * when that array could not be allocated, rec_valid false and the
     * list is walked. */
    vd_hbitmap **rec;
    size_t nrec;
    bool rec_valid;
    /* With two or more recording bitmaps of one length: a bit of @all
     * (at their finest granularity) set means the granule is set in
     * every one of them, so a write to granules already dirty, the
     * common case, is one test instead of one per bitmap. Bits are only
     * added to it after the bitmaps' own, by marking writes; anything
     * else (clear, enable, add, freeze, truncate, load...) holds the
     * write lock, and leaving it starts @all afresh. NULL otherwise. */
    vd_hbitmap *all;
    /* Whether the image may hold bitmaps we must store at close: some
     * were loaded, or a persistent one was added. */
    bool store_needed;
};

/* Check flags, QEMU's BDRV_BITMAP_*. */
enum { CK_BUSY = 1, CK_RO = 2, CK_INCONSISTENT = 4 };
#define CK_DEFAULT (CK_BUSY | CK_RO | CK_INCONSISTENT)
#define CK_ALLOW_RO (CK_BUSY | CK_INCONSISTENT)

static vd_node_bitmaps *get_set(vd_node *node, bool create)
{
    vd_node_bitmaps *s = atomic_load(&node->named_bitmaps);
    if (s || !create)
        return s;
    s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    pthread_rwlockattr_t a;
    pthread_rwlockattr_init(&a);
    pthread_rwlockattr_setkind_np(&a,
        PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&s->lock, &a);
    s->rec_valid = true;                /* no bitmap, none recording */
    pthread_rwlockattr_destroy(&a);
    vd_node_bitmaps *expected = NULL;
    if (!atomic_compare_exchange_strong(&node->named_bitmaps, &expected, s)) {
        pthread_rwlock_destroy(&s->lock);
        free(s);
        return expected;
    }
    return s;
}

static bdm *find(vd_node_bitmaps *s, const char *name)
{
    for (bdm *b = s ? s->head : NULL; b; b = b->next)
        if (strcmp(b->name, name) == 0)
            return b;
    return NULL;
}

static int not_found(vd_error *err, const char *name)
{
    return vd_error_set(err, -ENOENT, "Dirty bitmap '%s' not found", name);
}

static int err_code(vd_error *err, int dflt)
{
    return err && err->code ? err->code : dflt;
}

/* QEMU's bdrv_dirty_bitmap_check(). */
static int check(const bdm *b, unsigned flags, vd_error *err)
{
    if ((flags & CK_BUSY) && b->busy)
        return vd_error_set(err, -EBUSY, "Bitmap '%s' is currently in use "
                            "by another operation and cannot be used",
                            b->name);
    if ((flags & CK_RO) && b->readonly)
        return vd_error_set(err, -EPERM, "Bitmap '%s' is readonly and "
                            "cannot be modified", b->name);
    if ((flags & CK_INCONSISTENT) && b->inconsistent) {
        int r = vd_error_set(err, -EINVAL, "Bitmap '%s' is inconsistent "
                             "and cannot be used", b->name);
        if (err)
            snprintf(err->hint, sizeof(err->hint), "Try "
                     "block-dirty-bitmap-remove to delete this bitmap "
                     "from disk");
        return r;
    }
    return 0;
}

static void bdm_free(bdm *b)
{
    if (!b)
        return;
    vd_hbitmap_free(b->hb);
    vd_hbitmap_free(b->successor);
    free(b->name);
    free(b);
}

static bdm *bdm_new(const char *name, uint64_t len, uint64_t granularity)
{
    bdm *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    b->name = strdup(name);
    b->hb = vd_hbitmap_new(len, (unsigned)__builtin_ctzll(granularity));
    if (!b->name || !b->hb) {
        bdm_free(b);
        return NULL;
    }
    atomic_store(&b->enabled, true);
    b->image_pos = -1;
    return b;
}

/* The recording bitmap of @b (its own, or its successor's while a job
 * has it frozen), or NULL. */
static vd_hbitmap *recording_hb(const bdm *b)
{
    if (atomic_load_explicit(&b->enabled, memory_order_relaxed))
        return b->hb;
    return b->successor && b->succ_enabled ? b->successor : NULL;
}

/* Remakes s->rec and s->all from the list (write lock held, no marker
 * running). */
static void remake_recording(vd_node_bitmaps *s)
{
    vd_hbitmap_free(s->all);
    s->all = NULL;
    free(s->rec);
    s->rec = NULL;
    s->nrec = 0;
    size_t n = 0;
    for (bdm *b = s->head; b; b = b->next)
        n += recording_hb(b) != NULL;
    s->rec = n ? malloc(n * sizeof(*s->rec)) : NULL;
    s->rec_valid = !n || s->rec;
    if (!s->rec_valid)
        return;
    bool one_len = true;
    unsigned shift = 63;
    for (bdm *b = s->head; b; b = b->next) {
        vd_hbitmap *hb = recording_hb(b);
        if (!hb)
            continue;
        s->rec[s->nrec++] = hb;
        one_len &= vd_hbitmap_len(hb) == vd_hbitmap_len(s->rec[0]);
        if (vd_hbitmap_shift(hb) < shift)
            shift = vd_hbitmap_shift(hb);
    }
    /* Without it (one bitmap, lengths that differ, no memory) every
     * write sets the bitmaps' bits itself. */
    if (n >= 2 && one_len)
        s->all = vd_hbitmap_new(vd_hbitmap_len(s->rec[0]), shift);
}

/* The write lock: the rwlock against the API's readers, then the gate
 * shut and the marking writes already in it waited for (they last a few
 * hundred nanoseconds; the rest wait on the rwlock's read side). */
static void write_lock(vd_node_bitmaps *s)
{
    pthread_rwlock_wrlock(&s->lock);
    atomic_store(&s->changing, true);
    while (atomic_load(&s->markers) != 0)
        sched_yield();
}

static void write_unlock(vd_node_bitmaps *s)
{
    remake_recording(s);
    atomic_store(&s->changing, false);
    pthread_rwlock_unlock(&s->lock);
}

/* Links @b in (write lock held). */
static void link_in(vd_node *node, vd_node_bitmaps *s, bdm *b)
{
    b->next = s->head;
    s->head = b;
    atomic_fetch_add(&s->count, 1);
    atomic_fetch_add(&node->dirty_bitmaps, 1);
}

static void unlink_out(vd_node *node, vd_node_bitmaps *s, bdm *b)
{
    for (bdm **p = &s->head; *p; p = &(*p)->next) {
        if (*p == b) {
            *p = b->next;
            atomic_fetch_sub(&s->count, 1);
            atomic_fetch_sub(&node->dirty_bitmaps, 1);
            return;
        }
    }
}

/* Marks [off, off + bytes) in every recording bitmap of @s, which the
 * caller keeps from changing (the gate or the read lock). */
static void mark_in(vd_node_bitmaps *s, uint64_t off, uint64_t bytes)
{
    vd_hbitmap_range r;
    if (!s->rec_valid) {
        /* The range's bits are worked out once per geometry: the
         * bitmaps of a node mostly share one granularity. */
        bool have_range = false, any_bit = false;
        for (bdm *b = s->head; b; b = b->next) {
            vd_hbitmap *hb = recording_hb(b);
            if (!hb)
                continue;
            if (!have_range || !vd_hbitmap_same_geometry(hb, &r)) {
                any_bit = vd_hbitmap_range_of(hb, off, bytes, &r);
                have_range = true;
                if (!any_bit)
                    r = (vd_hbitmap_range){ 0 };   /* matches no bitmap */
            }
            if (any_bit)
                vd_hbitmap_set_range(hb, &r);
        }
        return;
    }
    if (s->nrec == 0)
        return;
    if (s->all && vd_hbitmap_is_set(s->all, off, bytes))
        return;
    bool any_bit = vd_hbitmap_range_of(s->rec[0], off, bytes, &r);
    if (!any_bit)
        r = (vd_hbitmap_range){ 0 };               /* matches no bitmap */
    for (size_t i = 0; i < s->nrec; i++) {
        vd_hbitmap *hb = s->rec[i];
        if (i > 0 && !vd_hbitmap_same_geometry(hb, &r)) {
            any_bit = vd_hbitmap_range_of(hb, off, bytes, &r);
            if (!any_bit)
                r = (vd_hbitmap_range){ 0 };       /* matches no bitmap */
        }
        if (any_bit)
            vd_hbitmap_set_range(hb, &r);
    }
    /* Only now: a set bit of @all promises the bitmaps' bits. */
    if (s->all)
        vd_hbitmap_set(s->all, off, bytes);
}

void vd_bitmaps_mark(vd_node *node, uint64_t off, uint64_t bytes)
{
    vd_node_bitmaps *s = atomic_load(&node->named_bitmaps);
    if (!s || atomic_load_explicit(&s->count, memory_order_relaxed) == 0)
        return;
    /* In through the gate (two uncontended atomics, where the rwlock's
     * read side costs a few times more): a holder of the write lock
     * sets @changing before it reads @markers, we add to @markers
     * before we read @changing (both sequentially consistent), so
     * either it waits for us or we see it and queue on the rwlock. */
    atomic_fetch_add(&s->markers, 1);
    if (!atomic_load(&s->changing)) {
        mark_in(s, off, bytes);
        atomic_fetch_sub_explicit(&s->markers, 1, memory_order_release);
        return;
    }
    atomic_fetch_sub(&s->markers, 1);
    pthread_rwlock_rdlock(&s->lock);
    mark_in(s, off, bytes);
    pthread_rwlock_unlock(&s->lock);
}

static const char *node_label(vd_node *node)
{
    return node->node_name ? node->node_name : "";
}

VD_API uint64_t vd_bitmap_default_granularity(vd_node *node)
{
    uint64_t cluster = 0;
    /* QEMU's bdrv_get_info(): the driver's, or a filter's child's. */
    vd_node *n = node;
    while (n && !n->drv->get_info && n->drv->is_filter && n->file)
        n = n->file->node;
    if (n && n->drv->get_info) {
        vd_image_info *info = calloc(1, sizeof(*info));
        if (info && n->drv->get_info(n, info, NULL) == 0)
            cluster = info->cluster_size;
        vd_image_info_free(&info);
    }
    if (cluster == 0)
        return 65536;
    if (cluster < 4096)
        return 4096;
    return cluster > 65536 ? 65536 : cluster;
}

static bool granularity_ok(uint64_t g)
{
    return g >= 512 && g <= MAX_GRANULARITY && (g & (g - 1)) == 0;
}

VD_API int vd_bitmap_add(vd_node *node, const char *name,
                         uint64_t granularity, unsigned flags,
                         vd_error *err)
{
    if (!name || !*name)
        return vd_error_set(err, -EINVAL, "Bitmap name cannot be empty");
    if (granularity == 0)
        granularity = vd_bitmap_default_granularity(node);
    else if (!granularity_ok(granularity))
        return vd_error_set(err, -EINVAL, "Granularity must be power of 2 "
                            "and at least 512");
    bool persistent = flags & VD_BITMAP_PERSISTENT;
    /* QEMU asks the driver before it looks at the name. */
    if (persistent) {
        if (!node->drv->bitmap_can_store)
            return vd_error_set_errno(err, -ENOTSUP, "Can't store "
                                      "persistent bitmaps to %s",
                                      node_label(node));
        int r = node->drv->bitmap_can_store(node, name, granularity, err);
        if (r < 0)
            return r;
    }
    vd_node_bitmaps *s = get_set(node, true);
    if (!s)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    int64_t len = vd_node_getlength(node);
    if (len < 0)
        return vd_error_set_errno(err, (int)len, "could not get length of "
                                  "device");
    bdm *b = bdm_new(name, (uint64_t)len, granularity);
    if (!b)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    b->persistent = persistent;
    atomic_store(&b->enabled, !(flags & VD_BITMAP_DISABLED));
    int r = 0;
    write_lock(s);
    if (find(s, name)) {
        r = vd_error_set(err, -EEXIST, "Bitmap already exists: %s", name);
    } else if (strlen(name) > MAX_NAME) {
        r = vd_error_set(err, -EINVAL, "Bitmap name too long: %s", name);
    } else {
        link_in(node, s, b);
        if (persistent)
            s->store_needed = true;
        b = NULL;
    }
    write_unlock(s);
    bdm_free(b);
    return r;
}

VD_API int vd_bitmap_remove(vd_node *node, const char *name, vd_error *err)
{
    vd_node_bitmaps *s = get_set(node, false);
    if (!s)
        return not_found(err, name);
    write_lock(s);
    bdm *b = find(s, name);
    int r = b ? check(b, CK_BUSY | CK_RO, err) : not_found(err, name);
    if (r == 0 && b->persistent && node->drv->bitmap_remove)
        r = node->drv->bitmap_remove(node, name, err);
    if (r == 0)
        unlink_out(node, s, b);
    write_unlock(s);
    if (r == 0)
        bdm_free(b);
    return r;
}

/* Looks @name up under the write lock and checks @flags; on success the
 * lock stays held and the bitmap is returned. */
static bdm *lock_checked(vd_node *node, const char *name, unsigned flags,
                         vd_node_bitmaps **sp, vd_error *err)
{
    vd_node_bitmaps *s = get_set(node, false);
    if (!s) {
        not_found(err, name);
        return NULL;
    }
    write_lock(s);
    bdm *b = find(s, name);
    if (!b)
        not_found(err, name);
    else if (check(b, flags, err) < 0)
        b = NULL;
    if (!b) {
        write_unlock(s);
        return NULL;
    }
    *sp = s;
    return b;
}

VD_API int vd_bitmap_clear(vd_node *node, const char *name, vd_error *err)
{
    vd_node_bitmaps *s;
    bdm *b = lock_checked(node, name, CK_DEFAULT, &s, err);
    if (!b)
        return err_code(err, -EINVAL);
    vd_hbitmap_clear_all(b->hb);
    write_unlock(s);
    return 0;
}

static int set_enabled(vd_node *node, const char *name, bool on,
                       vd_error *err)
{
    vd_node_bitmaps *s;
    bdm *b = lock_checked(node, name, CK_ALLOW_RO, &s, err);
    if (!b)
        return err_code(err, -EINVAL);
    atomic_store(&b->enabled, on);
    write_unlock(s);
    return 0;
}

VD_API int vd_bitmap_enable(vd_node *node, const char *name, vd_error *err)
{
    return set_enabled(node, name, true, err);
}

VD_API int vd_bitmap_disable(vd_node *node, const char *name, vd_error *err)
{
    return set_enabled(node, name, false, err);
}

VD_API int vd_bitmap_set_busy(vd_node *node, const char *name, bool busy,
                              vd_error *err)
{
    vd_node_bitmaps *s;
    bdm *b = lock_checked(node, name, busy ? CK_BUSY : 0, &s, err);
    if (!b)
        return err_code(err, -EINVAL);
    b->busy = busy;
    write_unlock(s);
    return 0;
}

/* Looks @name up with the read lock; on success the lock stays held. */
static bdm *lock_read(vd_node *node, const char *name, vd_node_bitmaps **sp,
                      vd_error *err)
{
    vd_node_bitmaps *s = get_set(node, false);
    bdm *b = NULL;
    if (s) {
        pthread_rwlock_rdlock(&s->lock);
        b = find(s, name);
        if (!b)
            pthread_rwlock_unlock(&s->lock);
    }
    if (!b)
        not_found(err, name);
    *sp = s;
    return b;
}

/* ORs bitmap @name of @node into @acc (QEMU checks each source for
 * consistency and size as it merges it). */
static int merge_source(vd_hbitmap *acc, vd_node *node, const char *name,
                        vd_error *err)
{
    vd_node_bitmaps *s;
    bdm *b = lock_read(node, name, &s, err);
    if (!b)
        return err_code(err, -ENOENT);
    /* QEMU's bdrv_merge_dirty_bitmap(): a busy source (a job's, an
     * export's) is refused too. */
    int r = check(b, CK_ALLOW_RO, err);
    if (r == 0 && vd_hbitmap_len(b->hb) != vd_hbitmap_len(acc))
        r = vd_error_set(err, -EINVAL, "Bitmaps are of different sizes "
                         "(destination size is %" PRIu64 ", source size is "
                         "%" PRIu64 ") and can't be merged",
                         vd_hbitmap_len(acc), vd_hbitmap_len(b->hb));
    if (r == 0)
        vd_hbitmap_merge(acc, b->hb);
    pthread_rwlock_unlock(&s->lock);
    return r;
}

VD_API int vd_bitmap_merge(vd_node *node, const char *target,
                           const vd_bitmap_ref *src, size_t n,
                           vd_error *err)
{
    vd_node_bitmaps *s = get_set(node, false);
    uint64_t len = 0;
    unsigned shift = 0;
    if (s) {
        pthread_rwlock_rdlock(&s->lock);
        bdm *t = find(s, target);
        if (t) {
            len = vd_hbitmap_len(t->hb);
            shift = vd_hbitmap_shift(t->hb);
        }
        pthread_rwlock_unlock(&s->lock);
        if (!t)
            s = NULL;
    }
    if (!s)
        return not_found(err, target);
    /* As QEMU: the sources go into an anonymous bitmap first, so that
     * the target is unchanged when one of them fails. */
    vd_hbitmap *acc = vd_hbitmap_new(len, shift);
    if (!acc)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    int r = 0;
    for (size_t i = 0; i < n && r == 0; i++)
        r = merge_source(acc, src[i].node ? src[i].node : node, src[i].name,
                         err);
    if (r == 0) {
        bdm *t = lock_checked(node, target, CK_DEFAULT, &s, err);
        if (!t) {
            r = err_code(err, -EINVAL);
        } else {
            if (vd_hbitmap_len(t->hb) != len)
                r = vd_error_set(err, -EINVAL, "Bitmaps are of different "
                                 "sizes (destination size is %" PRIu64
                                 ", source size is %" PRIu64 ") and can't "
                                 "be merged", vd_hbitmap_len(t->hb), len);
            else
                vd_hbitmap_merge(t->hb, acc);
            write_unlock(s);
        }
    }
    vd_hbitmap_free(acc);
    return r;
}

static int fill_info(const bdm *b, vd_bitmap_info *i)
{
    memset(i, 0, sizeof(*i));
    i->name = strdup(b->name);
    if (!i->name)
        return -ENOMEM;
    i->granularity = 1ull << vd_hbitmap_shift(b->hb);
    i->count = vd_hbitmap_count(b->hb);
    i->recording = (atomic_load(&b->enabled) ||
                    (b->successor && b->succ_enabled)) && !b->inconsistent;
    i->busy = b->busy;
    i->persistent = b->persistent;
    i->inconsistent = b->inconsistent;
    i->readonly = b->readonly;
    return 0;
}

VD_API void vd_bitmap_list_free(vd_bitmap_info *list, size_t count)
{
    if (!list)
        return;
    for (size_t i = 0; i < count; i++)
        free(list[i].name);
    free(list);
}

VD_API int vd_bitmap_list(vd_node *node, vd_bitmap_info **list,
                          size_t *count, vd_error *err)
{
    *list = NULL;
    *count = 0;
    vd_node_bitmaps *s = get_set(node, false);
    if (!s)
        return 0;
    pthread_rwlock_rdlock(&s->lock);
    size_t n = 0;
    for (bdm *b = s->head; b; b = b->next)
        n++;
    vd_bitmap_info *l = n ? calloc(n, sizeof(*l)) : NULL;
    int r = n && !l ? -ENOMEM : 0;
    size_t i = 0;
    for (bdm *b = s->head; b && r == 0; b = b->next, i++)
        r = fill_info(b, &l[i]);
    pthread_rwlock_unlock(&s->lock);
    if (r < 0) {
        vd_bitmap_list_free(l, n);
        return vd_error_set(err, r, "Out of memory");
    }
    *list = l;
    *count = n;
    return 0;
}

VD_API int vd_bitmap_get_info(vd_node *node, const char *name,
                              vd_bitmap_info *info, vd_error *err)
{
    vd_node_bitmaps *s;
    bdm *b = lock_read(node, name, &s, err);
    if (!b)
        return err_code(err, -ENOENT);
    int r = fill_info(b, info);
    pthread_rwlock_unlock(&s->lock);
    if (r == -ENOMEM)
        vd_error_set(err, r, "Out of memory");
    return r;
}

VD_API int vd_bitmap_next_dirty(vd_node *node, const char *name,
                                uint64_t off, uint64_t *start,
                                uint64_t *bytes, vd_error *err)
{
    vd_node_bitmaps *s;
    bdm *b = lock_read(node, name, &s, err);
    if (!b)
        return err_code(err, -ENOENT);
    int r = check(b, CK_INCONSISTENT, err);
    if (r == 0)
        r = vd_hbitmap_next_dirty_area(b->hb, off, vd_hbitmap_len(b->hb),
                                       UINT64_MAX, start, bytes);
    pthread_rwlock_unlock(&s->lock);
    return r;
}

VD_API int vd_bitmap_sha256(vd_node *node, const char *name, char out[65],
                            vd_error *err)
{
    vd_node_bitmaps *s;
    bdm *b = lock_read(node, name, &s, err);
    if (!b)
        return err_code(err, -ENOENT);
    int r = vd_hbitmap_sha256(b->hb, out);
    pthread_rwlock_unlock(&s->lock);
    if (r < 0)
        vd_error_set_errno(err, r, "Could not compute the SHA-256 of "
                           "bitmap '%s'", name);
    return r;
}

/* ---- undo (the QMP transaction's abort) ---- */

struct vd_bitmap_saved {
    vd_node *node;
    char *name;
    uint64_t granularity;
    bool enabled;
    bool persistent;
    vd_hbitmap *bits;
    /* What the node's writes mark from the save on: a restore of a
     * recording bitmap keeps them. */
    vd_dirty_tracker *shadow;
};

VD_API void vd_bitmap_saved_free(vd_bitmap_saved *sv)
{
    if (!sv)
        return;
    vd_dirty_tracker_free(&sv->shadow, sv->node);
    vd_hbitmap_free(sv->bits);
    vd_node_unref(sv->node);
    free(sv->name);
    free(sv);
}

VD_API int vd_bitmap_save(vd_node *node, const char *name,
                          vd_bitmap_saved **out, vd_error *err)
{
    vd_bitmap_saved *sv = calloc(1, sizeof(*sv));
    if (!sv)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    vd_node_ref(node);
    sv->node = node;
    sv->name = strdup(name);
    if (!sv->name) {
        vd_bitmap_saved_free(sv);
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    /* The shadow first: no write falls between it and the copy. */
    vd_node_bitmaps *s = get_set(node, false);
    bdm *b = NULL;
    int r = 0;
    if (s) {
        pthread_rwlock_rdlock(&s->lock);
        b = find(s, name);
        if (b)
            sv->granularity = 1ull << vd_hbitmap_shift(b->hb);
        pthread_rwlock_unlock(&s->lock);
    }
    if (!b)
        r = not_found(err, name);
    if (r == 0)
        r = vd_dirty_tracker_new(&sv->shadow, node, sv->granularity, err);
    if (r == 0) {
        pthread_rwlock_rdlock(&s->lock);
        b = find(s, name);
        if (!b) {
            r = not_found(err, name);
        } else {
            sv->enabled = atomic_load(&b->enabled);
            sv->persistent = b->persistent;
            sv->bits = vd_hbitmap_copy(b->hb);
            if (!sv->bits)
                r = vd_error_set(err, -ENOMEM, "Out of memory");
        }
        pthread_rwlock_unlock(&s->lock);
    }
    if (r < 0) {
        vd_bitmap_saved_free(sv);
        return r;
    }
    *out = sv;
    return 0;
}

VD_API int vd_bitmap_restore(vd_bitmap_saved *sv, vd_error *err)
{
    vd_node *node = sv->node;
    vd_node_bitmaps *s = get_set(node, true);
    if (!s) {
        vd_bitmap_saved_free(sv);
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    int r = 0;
    write_lock(s);
    bdm *b = find(s, sv->name);
    if (!b) {
        b = bdm_new(sv->name, vd_hbitmap_len(sv->bits), sv->granularity);
        if (b) {
            b->persistent = sv->persistent;
            link_in(node, s, b);
        } else {
            r = vd_error_set(err, -ENOMEM, "Out of memory");
        }
    }
    if (b) {
        vd_hbitmap_clear_all(b->hb);
        vd_hbitmap_merge(b->hb, sv->bits);
        if (sv->enabled)
            vd_hbitmap_merge(b->hb, vd_dirty_tracker_hbitmap(sv->shadow));
        atomic_store(&b->enabled, sv->enabled);
    }
    write_unlock(s);
    vd_bitmap_saved_free(sv);
    return r;
}

/* ---- the core's hooks ---- */

/* Adds or updates the loaded bitmap @img (write lock held), the
 * image's @pos'th. A bitmap we cannot represent fails the load (and the
 * open): dropping it would remove it from the image at the next store. */
static int load_one(vd_node *node, vd_node_bitmaps *s,
                    const vd_bitmap_image *img, uint64_t len, long pos,
                    vd_error *err)
{
    bdm *b = find(s, img->name);
    if (b) {
        /* Reopened read-write: the bitmap we had becomes writable. */
        b->readonly = node->read_only;
        b->image_pos = pos;
        return 0;
    }
    if (!granularity_ok(img->granularity))
        return vd_error_set(err, -EINVAL, "%s: bitmap '%s' has an invalid "
                            "granularity %" PRIu64, node->filename,
                            img->name, img->granularity);
    b = bdm_new(img->name, len, img->granularity);
    if (!b)
        return vd_error_set(err, -ENOMEM, "Out of memory");
    b->persistent = true;
    b->image_pos = pos;
    b->readonly = node->read_only;
    b->inconsistent = img->in_use || !img->bits || img->disk_size != len;
    atomic_store(&b->enabled, img->enabled && !b->inconsistent);
    if (!b->inconsistent)
        vd_hbitmap_deserialize(b->hb, img->bits);
    link_in(node, s, b);
    return 0;
}

int vd_bitmaps_load(vd_node *node, vd_error *err)
{
    if (!node->drv->bitmaps_load || (node->flags & VD_NODE_NO_BITMAPS))
        return 0;
    vd_bitmap_image *list = NULL;
    size_t count = 0;
    int r = node->drv->bitmaps_load(node, &list, &count, err);
    if (r < 0)
        return r;
    if (count == 0) {
        vd_bitmap_images_free(list, count);
        return 0;
    }
    vd_node_bitmaps *s = get_set(node, true);
    int64_t len = vd_node_getlength(node);
    if (!s || len < 0) {
        vd_bitmap_images_free(list, count);
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    write_lock(s);
    /* In the image's order; QEMU lists the last loaded first. */
    r = 0;
    bdm *before = s->head;
    bool had_store = s->store_needed;
    for (size_t i = 0; i < count && r == 0; i++)
        r = load_one(node, s, &list[i], (uint64_t)len, (long)i, err);
    if (r == 0) {
        s->store_needed = true;
    } else {
        /* Nothing of a failed load stays (new bitmaps are linked in
         * before the ones we had). */
        s->store_needed = had_store;
        while (s->head != before) {
            bdm *b = s->head;
            unlink_out(node, s, b);
            bdm_free(b);
        }
    }
    write_unlock(s);
    vd_bitmap_images_free(list, count);
    return r;
}

int vd_bitmaps_store(vd_node *node, bool readonly_after, vd_error *err)
{
    vd_node_bitmaps *s = get_set(node, false);
    /* A broken node (a reopen failed) has no driver state to store
     * into; its image keeps the bitmaps in use, i.e. inconsistent. */
    if (!s || !node->drv->bitmaps_store || node->read_only || node->broken)
        return 0;
    write_lock(s);
    int r = 0;
    if (s->store_needed) {
        size_t n = 0;
        for (bdm *b = s->head; b; b = b->next)
            n += b->persistent;
        vd_bitmap_image *list = n ? calloc(n, sizeof(*list)) : NULL;
        bdm **order = n ? calloc(n, sizeof(*order)) : NULL;
        if (n && (!list || !order))
            r = vd_error_set(err, -ENOMEM, "Out of memory");
        /* Those the image has, in its order, then the new ones newest
         * first (see image_pos). */
        size_t k = 0;
        for (bdm *b = s->head; b && r == 0; b = b->next)
            if (b->persistent && b->image_pos >= 0)
                order[k++] = b;
        for (size_t x = 1; x < k; x++)
            for (size_t y = x; y > 0 &&
                 order[y - 1]->image_pos > order[y]->image_pos; y--) {
                bdm *t = order[y];
                order[y] = order[y - 1];
                order[y - 1] = t;
            }
        for (bdm *b = s->head; b && r == 0; b = b->next)
            if (b->persistent && b->image_pos < 0)
                order[k++] = b;
        for (size_t i = 0; i < n && r == 0; i++) {
            bdm *b = order[i];
            vd_bitmap_image *img = &list[i];
            img->name = strdup(b->name);
            img->granularity = 1ull << vd_hbitmap_shift(b->hb);
            img->enabled = atomic_load(&b->enabled) ||
                           (b->successor && b->succ_enabled);
            img->in_use = b->inconsistent;
            img->disk_size = vd_hbitmap_len(b->hb);
            if (!b->inconsistent) {
                img->bits = malloc(vd_hbitmap_serial_size(b->hb) + 1);
                if (img->bits)
                    vd_hbitmap_serialize(b->hb, img->bits);
            }
            if (!img->name || (!b->inconsistent && !img->bits))
                r = vd_error_set(err, -ENOMEM, "Out of memory");
        }
        if (r == 0)
            r = node->drv->bitmaps_store(node, list, n, err);
        for (size_t i = 0; i < n && r == 0; i++)
            order[i]->image_pos = (long)i;
        vd_bitmap_images_free(list, n);
        free(order);
    }
    if (r == 0 && readonly_after)
        for (bdm *b = s->head; b; b = b->next)
            if (b->persistent)
                b->readonly = true;
    write_unlock(s);
    return r;
}

void vd_bitmaps_close(vd_node *node)
{
    vd_node_bitmaps *s = get_set(node, false);
    if (!s)
        return;
    vd_error err = VD_ERROR_INIT;
    if (vd_bitmaps_store(node, false, &err) < 0)
        vd_warn("Failed to store persistent dirty bitmaps of '%s': %s",
                node_label(node), err.message);
    write_lock(s);
    while (s->head) {
        bdm *b = s->head;
        unlink_out(node, s, b);
        bdm_free(b);
    }
    write_unlock(s);
}

void vd_bitmaps_truncate(vd_node *node)
{
    vd_node_bitmaps *s = get_set(node, false);
    if (!s || atomic_load(&s->count) == 0)
        return;
    int64_t len = vd_node_getlength(node);
    if (len < 0)
        return;
    write_lock(s);
    for (bdm *b = s->head; b; b = b->next)
        if (vd_hbitmap_truncate(b->hb, (uint64_t)len) < 0 ||
            (b->successor &&
             vd_hbitmap_truncate(b->successor, (uint64_t)len) < 0))
            vd_warn("Out of memory resizing dirty bitmap '%s'", b->name);
    write_unlock(s);
}

void vd_bitmaps_free(vd_node *node)
{
    vd_node_bitmaps *s = atomic_load(&node->named_bitmaps);
    if (!s)
        return;
    while (s->head) {
        bdm *b = s->head;
        unlink_out(node, s, b);
        bdm_free(b);
    }
    vd_hbitmap_free(s->all);
    free(s->rec);
    pthread_rwlock_destroy(&s->lock);
    free(s);
    node->named_bitmaps = NULL;
}

VD_API vd_node *vd_bitmap_find(vd_node *node, const char *name)
{
    /* QEMU's walk in nbd_export_create(): the node, then what it filters
     * or its backing node (bdrv_filter_or_cow_bs()), down the chain. */
    for (vd_node *n = node; n;) {
        vd_node_bitmaps *s = get_set(n, false);
        bool hit = false;
        if (s) {
            pthread_rwlock_rdlock(&s->lock);
            hit = find(s, name) != NULL;
            pthread_rwlock_unlock(&s->lock);
        }
        if (hit)
            return n;
        vd_child *next = n->drv->is_filter ? n->file : n->backing;
        n = next ? next->node : NULL;
    }
    return NULL;
}

VD_API bool vd_bitmap_supports_persistent(vd_node *node)
{
    /* QEMU's bdrv_supports_persistent_dirty_bitmap(): the format's answer,
     * through filters. */
    vd_node *n = node;
    while (n && !n->drv->bitmaps_load && n->drv->is_filter && n->file)
        n = n->file->node;
    return n && n->drv->bitmaps_load;
}

/* ---- jobs: freezing a bitmap (bitmap_int.h) ---- */

bool vd_bitmap_exists(vd_node *node, const char *name)
{
    vd_node_bitmaps *s;
    bdm *b = lock_read(node, name, &s, NULL);
    if (b)
        pthread_rwlock_unlock(&s->lock);
    return b != NULL;
}

int vd_bitmap_check(vd_node *node, const char *name, bool allow_ro,
                    vd_error *err)
{
    vd_node_bitmaps *s;
    bdm *b = lock_read(node, name, &s, err);
    if (!b)
        return err_code(err, -ENOENT);
    int r = check(b, allow_ro ? CK_ALLOW_RO : CK_DEFAULT, err);
    pthread_rwlock_unlock(&s->lock);
    return r;
}

int vd_bitmap_freeze(vd_node *node, const char *name, vd_error *err)
{
    vd_node_bitmaps *s;
    bdm *b = lock_checked(node, name, 0, &s, err);
    if (!b)
        return err_code(err, -ENOENT);
    int r = 0;
    if (b->busy)
        r = vd_error_set(err, -EBUSY, "Cannot create a successor for a "
                         "bitmap that is in-use by an operation");
    else if (b->successor)
        r = vd_error_set(err, -EBUSY, "Cannot create a successor for a "
                         "bitmap that already has one");
    else if (!(b->successor = vd_hbitmap_new(vd_hbitmap_len(b->hb),
                                             vd_hbitmap_shift(b->hb))))
        r = vd_error_set(err, -ENOMEM, "Out of memory");
    if (r == 0) {
        /* Under the write lock no write is marking: each one marks
         * either the bitmap before this or the successor after it. */
        b->succ_enabled = atomic_load(&b->enabled);
        atomic_store(&b->enabled, false);
        b->busy = true;
    }
    write_unlock(s);
    return r;
}

int vd_bitmap_frozen_merge_into(vd_node *node, const char *name,
                                vd_hbitmap *dst)
{
    vd_node_bitmaps *s;
    bdm *b = lock_read(node, name, &s, NULL);
    if (!b)
        return -ENOENT;
    int r = b->successor ? vd_hbitmap_merge(dst, b->hb) : -EINVAL;
    pthread_rwlock_unlock(&s->lock);
    return r;
}

int vd_bitmap_unfreeze(vd_node *node, const char *name, bool abdicate,
                       const vd_hbitmap *also, vd_error *err)
{
    vd_node_bitmaps *s;
    bdm *b = lock_checked(node, name, 0, &s, err);
    if (!b)
        return err_code(err, -ENOENT);
    if (!b->successor) {
        write_unlock(s);
        return vd_error_set(err, -EINVAL, "Cannot reclaim a successor when "
                            "none is present");
    }
    if (abdicate) {
        vd_hbitmap *old = b->hb;
        b->hb = b->successor;
        vd_hbitmap_free(old);
    } else {
        vd_hbitmap_merge(b->hb, b->successor);
        vd_hbitmap_free(b->successor);
    }
    b->successor = NULL;
    if (also)
        vd_hbitmap_merge(b->hb, also);
    atomic_store(&b->enabled, b->succ_enabled);
    b->succ_enabled = false;
    b->busy = false;
    write_unlock(s);
    return 0;
}
