/*
 * QMP's transaction: several actions that happen all or not at all, as
 * qemu-storage-daemon 7.2 runs them (../shared/specs/transaction.json).
 * Each action is prepared in order by the command that does it alone
 * (its arguments checked against that command's schema), a backup's job
 * being created but not started; when one fails, the ones before it are
 * undone in reverse order and its error is the transaction's; when all
 * succeeded, the backups start. Undoing: an external snapshot moves its
 * users back (vd_snapshot_unappend()), an internal snapshot is deleted,
 * a backup job is cancelled before it ever ran.
 *
 * With completion-mode "grouped" the jobs become one job transaction
 * (vd_job_group()): they finish together, and one failing cancels the
 * others.
 *
 * Dirty bitmap actions (bitmaps.c's commands): clear, merge, enable and
 * disable keep the bitmap's state aside first (vd_bitmap_save()) and put
 * it back on abort, with whatever the node's writes marked meanwhile; an
 * added bitmap is removed again; a removed one is, as in QEMU, only
 * marked busy while the transaction runs (so a later action of the same
 * transaction cannot use it) and goes away when everything succeeded.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vdisk/bitmap.h"
#include "vdisk/job.h"
#include "qmp-int.h"

typedef struct prepared {
    const char *type;
    json_object *data;
    vd_job *job;
    vd_bitmap_saved *saved;     /* a bitmap's state before the action */
} prepared;

static const char *const supported[] = {
    "abort", "block-dirty-bitmap-add", "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
    "blockdev-backup", "blockdev-snapshot", "blockdev-snapshot-sync",
    "blockdev-snapshot-internal-sync", "drive-backup", NULL,
};
static const char *const known[] = {
    "abort", "block-dirty-bitmap-add", "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
    "blockdev-backup", "blockdev-snapshot", "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-sync", "drive-backup", NULL,
};

static bool in(const char *const *list, const char *s)
{
    for (; *list; list++)
        if (strcmp(*list, s) == 0)
            return true;
    return false;
}

static const char *str(json_object *o, const char *key)
{
    json_object *v;
    return json_object_object_get_ex(o, key, &v) ? json_object_get_string(v)
                                                 : NULL;
}

/* The remove action's prepare: QEMU's checks (busy, then read-only),
 * and the bitmap busy until the end of the transaction. */
static json_object *bitmap_remove_prepare(json_object *data, qmp_error *e)
{
    vd_node *node = qmp_bitmap_node(data, "node", e);
    if (!node)
        return NULL;
    const char *name = str(data, "name");
    vd_error err = VD_ERROR_INIT;
    vd_bitmap_info info;
    if (vd_bitmap_get_info(node, name, &info, &err) < 0 ||
        vd_bitmap_set_busy(node, name, true, &err) < 0) {
        return qmp_fail(e, NULL, "%s", err.message);
    }
    free(info.name);
    if (info.readonly) {
        vd_bitmap_set_busy(node, name, false, NULL);
        return qmp_fail(e, NULL, "Bitmap '%s' is readonly and cannot be "
                        "modified", name);
    }
    return json_object_new_object();
}

/* The end of a remove action: done (@commit) or undone. */
static void bitmap_remove_finish(prepared *p, bool commit)
{
    vd_node *node = vd_find_node(str(p->data, "node"));
    const char *name = str(p->data, "name");
    vd_error err = VD_ERROR_INIT;
    if (!node)
        return;
    vd_bitmap_set_busy(node, name, false, NULL);
    if (commit && vd_bitmap_remove(node, name, &err) < 0)
        fprintf(stderr, "vdisk: transaction: %s\n", err.message);
}

/* Before a bitmap action that changes bits or state: its state, kept for
 * an abort (nothing when the bitmap is not there: the action fails). */
static vd_bitmap_saved *bitmap_save(const char *type, json_object *data)
{
    static const char *const changing[] = {
        "block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable", "block-dirty-bitmap-merge", NULL,
    };
    if (!in(changing, type))
        return NULL;
    const char *nn = str(data, "node");
    const char *name = str(data, strcmp(type, "block-dirty-bitmap-merge")
                                 == 0 ? "target" : "name");
    vd_node *node = nn ? vd_find_node(nn) : NULL;
    vd_bitmap_saved *sv = NULL;
    if (node && name)
        vd_bitmap_save(node, name, &sv, NULL);
    return sv;
}

static void undo(prepared *p)
{
    vd_error err = VD_ERROR_INIT;
    if (p->saved) {
        vd_bitmap_restore(p->saved, &err);
        p->saved = NULL;
    } else if (strcmp(p->type, "block-dirty-bitmap-add") == 0) {
        vd_node *n = vd_find_node(str(p->data, "node"));
        if (n)
            vd_bitmap_remove(n, str(p->data, "name"), &err);
    } else if (strcmp(p->type, "block-dirty-bitmap-remove") == 0) {
        bitmap_remove_finish(p, false);
    } else if (strcmp(p->type, "blockdev-backup") == 0 ||
        strcmp(p->type, "drive-backup") == 0) {
        if (p->job) {
            vd_job_cancel(p->job, true, &err);
            vd_job_unref(&p->job);
        }
    } else if (strcmp(p->type, "blockdev-snapshot") == 0 ||
               strcmp(p->type, "blockdev-snapshot-sync") == 0) {
        const char *ov = str(p->data, strcmp(p->type, "blockdev-snapshot") == 0
                                      ? "overlay" : "snapshot-node-name");
        vd_node *n = ov ? vd_find_node(ov) : NULL;
        if (n)
            vd_snapshot_unappend(n, &err);
    } else if (strcmp(p->type, "blockdev-snapshot-internal-sync") == 0) {
        vd_node *n = vd_find_node(str(p->data, "device"));
        if (n)
            vd_snapshot_delete(n, NULL, str(p->data, "name"), &err);
    }
}

QMP_HANDLER(qmp_cmd_transaction)
{
    json_object *actions, *props;
    bool grouped = false;
    json_object_object_get_ex(args, "actions", &actions);
    if (!json_object_is_type(actions, json_type_array))
        return qmp_fail(e, NULL, "Invalid parameter type for 'actions', "
                        "expected: array");
    size_t n = json_object_array_length(actions);
    /* Everything checked first: nothing happens for a bad action. */
    for (size_t i = 0; i < n; i++) {
        json_object *a = json_object_array_get_idx(actions, i), *data;
        if (!json_object_is_type(a, json_type_object))
            return qmp_fail(e, NULL, "Invalid parameter type for "
                            "'actions[%zu]', expected: object", i);
        const char *type = str(a, "type");
        if (!type)
            return qmp_fail(e, NULL, "Parameter 'actions[%zu].type' is "
                            "missing", i);
        if (!in(known, type))
            return qmp_fail(e, NULL, "Parameter 'type' does not accept value "
                            "'%s'", type);
        if (!in(supported, type))
            return qmp_fail(e, NULL, "Transaction action '%s' is not "
                            "supported yet", type);
        /* Even abort's (empty) data is required, as QEMU's union. */
        if (!json_object_object_get_ex(a, "data", &data))
            return qmp_fail(e, NULL, "Parameter 'actions[%zu].data' is "
                            "missing", i);
        if (strcmp(type, "abort") != 0) {
            char prefix[64];
            snprintf(prefix, sizeof(prefix), "actions[%zu].data.", i);
            if (qmp_check_args(data, qmp_find_command(type)->args, prefix,
                               false, e) < 0)
                return NULL;
        }
    }
    /* QEMU visits the properties after the actions. */
    if (json_object_object_get_ex(args, "properties", &props)) {
        const char *mode = str(props, "completion-mode");
        if (mode && strcmp(mode, "grouped") != 0 &&
            strcmp(mode, "individual") != 0)
            return qmp_fail(e, NULL, "Parameter 'completion-mode' does not "
                            "accept value '%s'", mode);
        grouped = mode && strcmp(mode, "grouped") == 0;
    }
    prepared *done = calloc(n ? n : 1, sizeof(*done));
    if (!done)
        return qmp_fail(e, NULL, "out of memory");
    /*
     * One point in time, as QEMU's drained section: every user's
     * requests wait at their gates until the last action is done, so a
     * guest write lands either before all of them (in every backup, in
     * no new bitmap) or after all of them (in every new bitmap and
     * overlay), whatever the order of the actions. A user's gate, not a
     * drain of the nodes: a snapshot action gates the users of its node
     * itself and would wait for a request held inside the node.
     */
    size_t k = 0;
    vd_graph_quiesce_begin();
    size_t i = 0;
    for (; i < n; i++) {
        json_object *a = json_object_array_get_idx(actions, i), *data = NULL;
        const char *type = str(a, "type");
        if (strcmp(type, "abort") == 0) {
            qmp_fail(e, NULL, "Transaction aborted using Abort action");
            break;
        }
        json_object_object_get_ex(a, "data", &data);
        vd_bitmap_saved *saved = bitmap_save(type, data);
        d->txn_defer = true;
        d->txn_job = NULL;
        json_object *r = strcmp(type, "block-dirty-bitmap-remove") == 0
                         ? bitmap_remove_prepare(data, e)
                         : qmp_find_command(type)->fn(d, data, e);
        d->txn_defer = false;
        if (!r) {
            vd_bitmap_saved_free(saved);
            break;
        }
        json_object_put(r);
        done[k++] = (prepared){ type, data, d->txn_job, saved };
        d->txn_job = NULL;
    }
    if (i < n) {
        while (k-- > 0)
            undo(&done[k]);
        vd_graph_quiesce_end();
        free(done);
        return NULL;
    }
    if (grouped) {
        /* The jobs of a grouped transaction finish together. */
        vd_job *jobs[64];
        size_t nj = 0;
        for (size_t i = 0; i < n && nj < 64; i++)
            if (done[i].job)
                jobs[nj++] = done[i].job;
        vd_error err = VD_ERROR_INIT;
        vd_job_group(jobs, nj, &err);
    }
    for (size_t i = 0; i < n; i++) {
        vd_bitmap_saved_free(done[i].saved);
        if (strcmp(done[i].type, "block-dirty-bitmap-remove") == 0)
            bitmap_remove_finish(&done[i], true);
        if (done[i].job) {
            vd_error err = VD_ERROR_INIT;
            vd_job_start_deferred(done[i].job, &err);
            vd_job_unref(&done[i].job);
        }
    }
    vd_graph_quiesce_end();
    free(done);
    return json_object_new_object();
}
