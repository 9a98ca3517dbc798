/*
 * The clear runs of qcow2_metadata_overlap_window(): validation before a
 * snapshot operation checks a run of data clusters that meets no
 * metadata once instead of cluster by cluster, so a run that reaches
 * one cluster too far lets a data entry pointing into metadata through
 * (the damage validation exists to refuse). The property tested, on
 * images QEMU lays out at test time (4 KiB clusters: many L2 tables and
 * refcount blocks between the data; two snapshots, the active L2 tables
 * copied after them, a persistent bitmap's directory): for every
 * cluster of the file, every set of kinds a caller uses and each kind
 * alone, the window answers what the per-cluster check answers, and
 * where that finds nothing, the run ends exactly at the next cluster the
 * per-cluster check flags (or past the end of the file when none
 * follows), also for a range that starts inside a cluster and spans two.
 *
 * Exit 0 pass, 1 fail, 77 without qemu-img or qemu-io.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/block_int.h"
#include "drivers/qcow2/qcow2.h"

#include "check.h"
#include "sh.h"

static char dir[] = "/tmp/vdisk-olwin-XXXXXX";

/* Builds @name with QEMU's tools: data spread over the disk so that L2
 * tables and refcount blocks land between data clusters, two snapshots
 * with writes after each (copied L2 tables), and with @bitmap a
 * persistent bitmap (its directory is one more kind). */
static void make_image(const char *name, bool bitmap)
{
    char cmds[4096] = "";
    size_t len = 0;

    for (int i = 0; i < 24; i++) {
        len += (size_t)snprintf(cmds + len, sizeof(cmds) - len,
                                " -c 'write -P %d %dM 96k'", i + 1, i * 3);
    }
    CHECK(sh("cd %s && qemu-img create -q -f qcow2 -o cluster_size=4k,"
              "refcount_bits=16 %s 80M && qemu-io%s %s >/dev/null &&"
              " qemu-img snapshot -c s1 %s &&"
              " qemu-io -c 'write -P 90 1M 64k' -c 'write -P 91 40M 200k' %s"
              " >/dev/null && qemu-img snapshot -c s2 %s &&"
              " qemu-io -c 'write -P 92 5M 8k' -c 'write -P 93 70M 300k' %s"
              " >/dev/null", dir, name, cmds, name, name, name, name,
              name) == 0, "building %s", name);
    if (bitmap) {
        CHECK(sh("cd %s && qemu-img bitmap --add %s b0 &&"
                  " qemu-io -c 'write -P 94 9M 64k' %s >/dev/null", dir,
                  name, name) == 0, "adding a bitmap to %s", name);
    }
}

/* The property for one set of kinds over every cluster of the file. */
static void check_kinds(qcow2_state *s, int chk, uint64_t flen,
                        const char *name)
{
    uint64_t cs = s->cluster_size;
    uint64_t n = flen / cs + 4;     /* a few clusters past the end */
    int *bits = calloc(n, sizeof(*bits));
    uint64_t next = UINT64_MAX;     /* next flagged cluster's offset */
    int runs = 0;

    for (uint64_t c = 0; c < n; c++) {
        bits[c] = qcow2_metadata_overlap_kinds(s, chk, c * cs, cs);
    }
    for (uint64_t c = n; c-- > 0;) {
        uint64_t until = 0, until2 = 0;
        int bit = qcow2_metadata_overlap_window(s, chk, c * cs, cs, &until);

        CHECK(bit == bits[c], "%s kinds 0x%x cluster 0x%" PRIx64 ": window"
              " says %d, the check %d", name, chk, c * cs, bit, bits[c]);
        if (bits[c]) {
            next = c * cs;
            continue;
        }
        if (next == UINT64_MAX) {
            CHECK(until >= n * cs, "%s kinds 0x%x cluster 0x%" PRIx64 ": the"
                  " run ends at 0x%" PRIx64 " where nothing follows", name,
                  chk, c * cs, until);
        } else {
            CHECK(until == next, "%s kinds 0x%x cluster 0x%" PRIx64 ": the"
                  " run ends at 0x%" PRIx64 ", the next structure is at 0x%"
                  PRIx64, name, chk, c * cs, until, next);
        }
        runs += until > (c + 1) * cs;
        /* From inside the cluster, over two clusters. */
        if (c + 1 < n && !bits[c + 1]) {
            bit = qcow2_metadata_overlap_window(s, chk, c * cs + 100,
                                                cs + 50, &until2);
            CHECK(bit == 0 && until2 == until, "%s kinds 0x%x at 0x%" PRIx64
                  "+100: %d, run to 0x%" PRIx64 " (expected 0x%" PRIx64 ")",
                  name, chk, c * cs, bit, until2, until);
        }
    }
    /* The images interleave data and metadata: the property must have
     * met runs longer than one cluster, or it tested nothing. */
    CHECK(runs > 0, "%s kinds 0x%x: no run longer than a cluster", name,
          chk);
    free(bits);
}

static void check_image(const char *name, bool bitmap)
{
    char path[512];
    vd_error err = VD_ERROR_INIT;
    vd_node *node = NULL;
    qcow2_state *s;
    int64_t flen;
    int kinds[] = {
        QCOW2_OL_ALL,
        QCOW2_OL_ALL & ~(QCOW2_OL_ACTIVE_L2 | QCOW2_OL_INACTIVE_L2),
        QCOW2_OL_CACHED, QCOW2_OL_CONSTANT,
        QCOW2_OL_MAIN_HEADER, QCOW2_OL_ACTIVE_L1, QCOW2_OL_ACTIVE_L2,
        QCOW2_OL_REFCOUNT_TABLE, QCOW2_OL_REFCOUNT_BLOCK,
        QCOW2_OL_SNAPSHOT_TABLE, QCOW2_OL_INACTIVE_L1, QCOW2_OL_INACTIVE_L2,
        QCOW2_OL_BITMAP_DIRECTORY,
    };

    make_image(name, bitmap);
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    if (vd_open(&node, path, "qcow2", NULL, VD_O_QUIET | VD_O_NO_BITMAPS,
                &err) < 0) {
        CHECK(0, "open %s: %s", path, err.message);
        vd_error_clear(&err);
        return;
    }
    s = node->opaque;
    flen = vd_node_getlength(s->file->node);
    CHECK(flen > 0, "%s: length %" PRId64, name, flen);
    CHECK(s->nb_snapshots == 2, "%s: %u snapshots", name, s->nb_snapshots);
    CHECK(!bitmap || s->has_bitmaps_ext, "%s: no bitmap directory", name);
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; flen > 0 && i < sizeof(kinds) / sizeof(*kinds); i++) {
        check_kinds(s, kinds[i], (uint64_t)flen, name);
    }
    pthread_mutex_unlock(&s->lock);
    vd_close(&node, NULL);
}

int main(void)
{
    if (system("qemu-img --version >/dev/null 2>&1") != 0 ||
        system("qemu-io --version >/dev/null 2>&1") != 0) {
        printf("SKIP: needs qemu-img and qemu-io\n");
        return 77;
    }
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    check_image("plain.qcow2", false);
    check_image("bitmap.qcow2", true);
    sh("rm -rf %s", dir);
    TEST_EXIT("test-qcow2-overlap-window");
}
