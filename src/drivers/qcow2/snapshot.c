/*
 * qcow2 internal snapshots (../shared/specs/qcow2.txt "Snapshots"),
 * with QEMU 7.2's on-disk behaviour.
 *
 * The file is organised bottom-up: parsing and validating the snapshot
 * table at open (a windowed reader so that a large table is never read
 * in one allocation), serialising and writing a new table, the refcount
 * walker shared by create, goto and delete (QEMU's
 * qcow2_update_snapshot_refcount), then the vtable callbacks: create,
 * goto, delete, list, load_tmp and the VM-state area.
 *
 * Crash safety, in the order the writes happen:
 *   create  the copy of the active L1 is written, every cluster it
 *           reaches gets one more reference and the active L1/L2 lose
 *           their COPIED flags (flushed); only then is a new snapshot
 *           table written and flushed, the header switched to it with one
 *           12-byte write (nb_snapshots, snapshots_offset) and the old
 *           table freed. A crash before the header write only leaks.
 *   goto    the snapshot's clusters get one more reference first, the
 *           active L1 is overwritten (synchronously), then the clusters
 *           of the old active state lose one: a crash leaks, never frees
 *           something still in use.
 *   delete  the table without the entry is written first, then the
 *           snapshot's references are dropped.
 * Everything runs with the node drained and qcow2_state.lock held.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/qcow2/qcow2.h"

/* QEMU's limits: unknown extra data per entry and the whole table. */
#define MAX_SNAPSHOT_EXTRA 1024u
#define MAX_SNAPSHOTS_SIZE (1024ull * QCOW2_MAX_SNAPSHOTS)
#define READER_WINDOW (256u << 10)

static uint64_t round_up8(uint64_t v)
{
    return (v + 7) & ~7ull;
}

static void free_one(qcow2_snapshot *sn)
{
    free(sn->id_str);
    free(sn->name);
    free(sn->unknown_extra);
    memset(sn, 0, sizeof(*sn));
}

void qcow2_free_snapshots(qcow2_state *s)
{
    if (s->snapshots) {
        for (uint32_t i = 0; i < s->nb_snapshots; i++) {
            free_one(&s->snapshots[i]);
        }
    }
    free(s->snapshots);
    s->snapshots = NULL;
}

/* ---- reading the table ---------------------------------------------- */

/* Reads the table through a window so that small entries cost no syscall
 * each and a huge nb_snapshots cannot force one huge allocation. */
typedef struct tbl_reader {
    qcow2_state *s;
    uint64_t file_len;
    uint8_t *buf;
    uint64_t win_off;
    uint64_t win_len;
} tbl_reader;

static int tbl_read(tbl_reader *r, uint64_t off, void *dst, uint64_t len,
                    uint32_t index, const char *what, vd_error *err)
{
    if (len == 0) {
        return 0;
    }
    if (off > r->file_len || len > r->file_len - off) {
        return vd_error_set(err, -EINVAL, "%s: snapshot table entry %" PRIu32
                            " %s at 0x%" PRIx64 " lies past the end of the "
                            "file", r->s->filename, index, what, off);
    }
    if (off < r->win_off || off + len > r->win_off + r->win_len) {
        uint64_t n = r->file_len - off;
        int ret;
        if (n > READER_WINDOW) {
            n = READER_WINDOW;
        }
        ret = vd_child_pread(r->s->file, off, r->buf, n, err);
        if (ret < 0) {
            return ret;
        }
        r->win_off = off;
        r->win_len = n;
    }
    memcpy(dst, r->buf + (off - r->win_off), len);
    return 0;
}

static char *tbl_string(tbl_reader *r, uint64_t off, uint16_t len,
                        uint32_t index, const char *what, int *ret,
                        vd_error *err)
{
    char *str = malloc((size_t)len + 1);
    if (!str) {
        *ret = vd_error_set(err, -ENOMEM, "%s: out of memory",
                            r->s->filename);
        return NULL;
    }
    *ret = tbl_read(r, off, str, len, index, what, err);
    if (*ret < 0) {
        free(str);
        return NULL;
    }
    str[len] = 0;
    return str;
}

/* A snapshot's L1 table must be cluster-aligned, inside the file and no
 * larger than QEMU's 32 MB L1 limit. */
static int check_snapshot_l1(qcow2_state *s, const qcow2_snapshot *sn,
                             uint64_t file_len, vd_error *err)
{
    uint64_t bytes = (uint64_t)sn->l1_size * 8;

    if (bytes > QCOW2_MAX_L1_BYTES) {
        return vd_error_set(err, -EFBIG, "%s: snapshot '%s' (id %s) L1 table "
                            "too large (0x%" PRIx32 " entries)", s->filename,
                            sn->name, sn->id_str, sn->l1_size);
    }
    if (sn->l1_table_offset & (s->cluster_size - 1) ||
        sn->l1_table_offset > QCOW2_MAX_HOST_OFFSET ||
        (bytes && (sn->l1_table_offset > file_len ||
                   bytes > file_len - sn->l1_table_offset))) {
        return vd_error_set(err, -EINVAL, "%s: snapshot '%s' (id %s) L1 table "
                            "offset 0x%" PRIx64 " invalid", s->filename,
                            sn->name, sn->id_str, sn->l1_table_offset);
    }
    return 0;
}

/* The reader behind qcow2_read_snapshots() and the check's repair. With
 * @repair the table is read as QEMU's check reads it: bytes past the end
 * of the file as zeros (@file_len is then unbounded), and the snapshot
 * L1 tables are not judged (they are written back as they are). */
static int read_table(qcow2_state *s, uint64_t file_len, bool repair,
                      vd_error *err)
{
    tbl_reader r = { .s = s, .file_len = file_len };
    uint64_t off = s->snapshots_offset, table_len = 0;
    int ret = 0;

    s->snapshots = NULL;
    s->snapshots_size = 0;
    if (s->nb_snapshots == 0) {
        return 0;
    }
    if (s->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
        return vd_error_set(err, -EINVAL, "%s: Too many snapshots (%" PRIu32
                            ")", s->filename, s->nb_snapshots);
    }
    r.buf = malloc(READER_WINDOW);
    s->snapshots = calloc(s->nb_snapshots, sizeof(qcow2_snapshot));
    if (!r.buf || !s->snapshots) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
        goto fail;
    }
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        qcow2_snapshot *sn = &s->snapshots[i];
        qcow2_snapshot_header h;
        qcow2_snapshot_extra extra;
        uint16_t id_len, name_len;
        uint32_t known;

        off = round_up8(off);
        table_len = round_up8(table_len);
        ret = tbl_read(&r, off, &h, sizeof(h), i, "header", err);
        if (ret < 0) {
            goto fail;
        }
        off += sizeof(h);
        sn->l1_table_offset = be64toh(h.l1_table_offset);
        sn->l1_size = be32toh(h.l1_size);
        sn->vm_state_size = be32toh(h.vm_state_size);
        sn->date_sec = be32toh(h.date_sec);
        sn->date_nsec = be32toh(h.date_nsec);
        sn->vm_clock_nsec = be64toh(h.vm_clock_nsec);
        sn->extra_data_size = be32toh(h.extra_data_size);
        id_len = be16toh(h.id_str_size);
        name_len = be16toh(h.name_size);
        if (sn->extra_data_size > MAX_SNAPSHOT_EXTRA) {
            ret = vd_error_set(err, -EFBIG, "%s: Too much extra metadata in "
                               "snapshot table entry %" PRIu32 " (%" PRIu32
                               " bytes)", s->filename, i,
                               sn->extra_data_size);
            goto fail;
        }
        known = sn->extra_data_size < sizeof(extra) ? sn->extra_data_size
                                                    : (uint32_t)sizeof(extra);
        memset(&extra, 0, sizeof(extra));
        ret = tbl_read(&r, off, &extra, known, i, "extra data", err);
        if (ret < 0) {
            goto fail;
        }
        off += known;
        if (known >= 8) {
            sn->vm_state_size = be64toh(extra.vm_state_size_large);
        }
        sn->disk_size = known >= 16 ? be64toh(extra.disk_size) : s->size;
        sn->icount = known >= 24 ? be64toh(extra.icount) : UINT64_MAX;
        if (sn->extra_data_size > sizeof(extra)) {
            uint32_t n = sn->extra_data_size - (uint32_t)sizeof(extra);
            sn->unknown_extra = malloc(n);
            if (!sn->unknown_extra) {
                ret = vd_error_set(err, -ENOMEM, "%s: out of memory",
                                   s->filename);
                goto fail;
            }
            ret = tbl_read(&r, off, sn->unknown_extra, n, i, "extra data",
                           err);
            if (ret < 0) {
                goto fail;
            }
            off += n;
        }
        sn->id_str = tbl_string(&r, off, id_len, i, "id", &ret, err);
        if (!sn->id_str) {
            goto fail;
        }
        off += id_len;
        sn->name = tbl_string(&r, off, name_len, i, "name", &ret, err);
        if (!sn->name) {
            goto fail;
        }
        off += name_len;
        table_len += sizeof(h) + sn->extra_data_size + id_len + name_len;
        if (table_len > MAX_SNAPSHOTS_SIZE) {
            ret = vd_error_set(err, -EFBIG, "%s: Snapshot table is too big "
                               "(entry %" PRIu32 " ends past 64 MiB)",
                               s->filename, i);
            goto fail;
        }
        ret = repair ? 0 : check_snapshot_l1(s, sn, file_len, err);
        if (ret < 0) {
            goto fail;
        }
    }
    s->snapshots_size = off - s->snapshots_offset;
    free(r.buf);
    return 0;

fail:
    free(r.buf);
    qcow2_free_snapshots(s);
    return ret;
}

int qcow2_read_snapshots(qcow2_state *s, uint64_t file_len, vd_error *err)
{
    return read_table(s, file_len, false, err);
}

/* ---- writing the table ---------------------------------------------- */

/* Serialises the in-memory table into a new buffer (*out, *len). */
/* The bytes of the snapshot table as build_table() writes it, without
 * entry @skip (-1: all entries). */
static int table_bytes(qcow2_state *s, int64_t skip, uint64_t *out,
                       vd_error *err)
{
    uint64_t size = 0;

    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        const qcow2_snapshot *sn = &s->snapshots[i];
        uint32_t extra = sn->extra_data_size > sizeof(qcow2_snapshot_extra) ?
                         sn->extra_data_size :
                         (uint32_t)sizeof(qcow2_snapshot_extra);
        if ((int64_t)i == skip) {
            continue;
        }
        size = round_up8(size) + sizeof(qcow2_snapshot_header) + extra +
               strlen(sn->id_str) + strlen(sn->name);
        if (size > MAX_SNAPSHOTS_SIZE) {
            return vd_error_set(err, -EFBIG, "%s: the snapshot table would "
                                "exceed 64 MiB", s->filename);
        }
    }
    *out = size;
    return 0;
}

static int build_table(qcow2_state *s, uint8_t **out, uint64_t *len,
                       vd_error *err)
{
    uint64_t size = 0, pos = 0;
    uint8_t *buf;
    int ret = table_bytes(s, -1, &size, err);

    if (ret < 0) {
        return ret;
    }
    buf = calloc(1, size ? size : 1);
    if (!buf) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        const qcow2_snapshot *sn = &s->snapshots[i];
        qcow2_snapshot_header h;
        qcow2_snapshot_extra x;
        size_t id_len = strlen(sn->id_str), name_len = strlen(sn->name);
        uint32_t unknown = sn->extra_data_size > sizeof(x) ?
                           sn->extra_data_size - (uint32_t)sizeof(x) : 0;

        memset(&h, 0, sizeof(h));
        h.l1_table_offset = htobe64(sn->l1_table_offset);
        h.l1_size = htobe32(sn->l1_size);
        h.id_str_size = htobe16((uint16_t)id_len);
        h.name_size = htobe16((uint16_t)name_len);
        h.date_sec = htobe32(sn->date_sec);
        h.date_nsec = htobe32(sn->date_nsec);
        h.vm_clock_nsec = htobe64(sn->vm_clock_nsec);
        /* Older readers see a VM state too big for 32 bits as none
         * rather than a truncated one. */
        h.vm_state_size = htobe32(sn->vm_state_size <= UINT32_MAX ?
                                  (uint32_t)sn->vm_state_size : 0);
        h.extra_data_size = htobe32((uint32_t)sizeof(x) + unknown);
        x.vm_state_size_large = htobe64(sn->vm_state_size);
        x.disk_size = htobe64(sn->disk_size);
        x.icount = htobe64(sn->icount);

        pos = round_up8(pos);
        memcpy(buf + pos, &h, sizeof(h));
        pos += sizeof(h);
        memcpy(buf + pos, &x, sizeof(x));
        pos += sizeof(x);
        if (unknown) {
            memcpy(buf + pos, sn->unknown_extra, unknown);
            pos += unknown;
        }
        memcpy(buf + pos, sn->id_str, id_len);
        pos += id_len;
        memcpy(buf + pos, sn->name, name_len);
        pos += name_len;
    }
    *out = buf;
    *len = size;
    return 0;
}

/*
 * Writes the in-memory table to newly allocated clusters, makes it and
 * its refcounts stable, points the header at it and frees the old one.
 * On failure the header still names the old table. Lock held.
 */
static int write_snapshots(qcow2_state *s, vd_error *err)
{
    uint8_t *buf = NULL;
    uint64_t size = 0;
    int64_t off = 0;
    int ret;

    ret = build_table(s, &buf, &size, err);
    if (ret < 0) {
        return ret;
    }
    if (size) {
        off = qcow2_alloc_clusters(s, size, err);
        if (off < 0) {
            free(buf);
            return (int)off;
        }
        ret = qcow2_pre_write_overlap_check(s, 0, (uint64_t)off, size, false,
                                            err);
        if (ret == 0) {
            ret = vd_child_pwrite(s->file, (uint64_t)off, buf, size, 0, err);
        }
    }
    free(buf);
    if (ret == 0) {
        ret = qcow2_flush_caches(s, err);
    }
    if (ret == 0) {
        struct __attribute__((packed)) {
            uint32_t nb;
            uint64_t offset;
        } hdr = { htobe32(s->nb_snapshots), htobe64((uint64_t)off) };
        _Static_assert(offsetof(qcow2_header, snapshots_offset) ==
                       offsetof(qcow2_header, nb_snapshots) + 4,
                       "nb_snapshots and snapshots_offset are adjacent");
        ret = vd_child_pwrite(s->file, offsetof(qcow2_header, nb_snapshots),
                              &hdr, sizeof(hdr), 0, err);
        if (ret == 0) {
            ret = vd_node_flush(s->file->node, err);
        }
    }
    if (ret < 0) {
        if (size) {
            qcow2_free_clusters(s, (uint64_t)off, size, QCOW2_DISCARD_OTHER,
                                NULL);
        }
        return ret;
    }
    if (s->snapshots_size) {
        qcow2_free_clusters(s, s->snapshots_offset, s->snapshots_size,
                            QCOW2_DISCARD_SNAPSHOT, NULL);
        /* The header no longer names the old table: nothing on disk can
         * reach it, so its discard need not wait for the refcounts. */
        qcow2_process_discards(s);
    }
    s->snapshots_offset = (uint64_t)off;
    s->snapshots_size = size;
    return 0;
}

int qcow2_rewrite_snapshot_table(qcow2_state *s, vd_error *err)
{
    int ret = write_snapshots(s, err);

    if (ret == 0) {
        qcow2_overlap_snapshots_changed(s);
    }
    return ret;
}

/* ---- repair --------------------------------------------------------- */

int qcow2_snapshot_table_repair(qcow2_state *s, uint64_t offset, uint32_t nb,
                                vd_error *err)
{
    int ret;

    qcow2_free_snapshots(s);
    s->nb_snapshots = nb;
    s->snapshots_offset = offset;
    s->snapshots_size = 0;
    qcow2_overlap_snapshots_changed(s);
    ret = read_table(s, UINT64_MAX, true, err);
    if (ret < 0) {
        s->nb_snapshots = 0;
        s->snapshots_unusable = true;
        return ret;
    }
    s->snapshots_unusable = false;
    return write_snapshots(s, err);
}

/* ---- the refcount walker ---------------------------------------------- */

/*
 * Adds @addend (-1, 0 or +1) to the refcount of every cluster reached by
 * the L1 table @l1 (@l1_size entries, host endian): the L2 tables, their
 * data clusters and compressed spans. Then sets COPIED on the L1 and L2
 * entries whose cluster ends with refcount 1 and clears it elsewhere
 * (compressed clusters never carry it). @l1 is updated in memory; when
 * @l1_write is not 0 and an entry changed, the table is written there
 * (not for addend -1: that table is about to be dropped).
 *
 * Callers validate the tree first (qcow2_validate_l1_tree(): every L2
 * table and cluster inside the file, clear of other metadata, counted,
 * and for +1 below the refcount maximum), so a failure here is an I/O
 * error, not a damaged image. Lock held.
 */
static int walk_refcounts(qcow2_state *s, uint64_t *l1, uint32_t l1_size,
                          uint64_t l1_write, int addend, vd_error *err)
{
    qcow2_refblock_hold hold = { 0 };
    bool l1_modified = false;
    int ret = 0;

    if (addend > 0) {
        /* COPIED may only vanish from L2 once the new references are
         * on disk. */
        ret = qcow2_cache_set_dependency(s, s->l2_cache, s->refcount_cache,
                                         err);
    } else if (addend < 0) {
        /* The L2 entries that drop clusters reach the disk before the
         * refcounts that let the clusters be reused (what
         * qcow2_update_refcount() sets for each decrease). */
        ret = qcow2_cache_set_dependency(s, s->refcount_cache, s->l2_cache,
                                         err);
    }
    if (ret < 0) {
        return ret;
    }
    for (uint32_t i = 0; i < l1_size && ret == 0; i++) {
        uint64_t l1e = l1[i], l2_off = l1e & QCOW2_L1E_OFFSET_MASK;
        uint64_t rc;
        void *table;

        if (!l2_off) {
            continue;
        }
        if (l2_off & (s->cluster_size - 1)) {
            qcow2_refblock_release(s, &hold);
            return qcow2_signal_corruption(s, err, "L2 table offset %#" PRIx64
                                           " unaligned (L1 index: %#" PRIx32
                                           ")", l2_off, i);
        }
        ret = qcow2_cache_get(s, s->l2_cache, l2_off, &table, err);
        if (ret < 0) {
            break;
        }
        for (uint64_t j = 0; j < s->l2_size; j++) {
            uint64_t e = qcow2_get_l2_entry(s, table, j), ne;
            uint64_t host = e & QCOW2_L2E_OFFSET_MASK;

            ne = e & ~QCOW2_OFLAG_COPIED;
            rc = 0;
            if (e & QCOW2_OFLAG_COMPRESSED) {
                uint64_t coff, clen;
                qcow2_parse_compressed(s, e, &coff, &clen);
                if (addend) {
                    /* A span over one or two clusters: the general path,
                     * which may look other blocks up. */
                    qcow2_refblock_release(s, &hold);
                    ret = qcow2_update_refcount(s, coff, clen, 1, addend < 0,
                                                QCOW2_DISCARD_SNAPSHOT, err);
                }
                rc = 2;
            } else if (host && s->data_file == s->file) {
                if (host & (s->cluster_size - 1)) {
                    qcow2_cache_put(s->l2_cache, &table);
                    qcow2_refblock_release(s, &hold);
                    return qcow2_signal_corruption(s, err, "Cluster "
                        "allocation offset 0x%" PRIx64 " unaligned (L2 "
                        "offset: 0x%" PRIx64 ", L2 index: 0x%" PRIx64 ")",
                        host, l2_off, j);
                }
                if (addend) {
                    ret = qcow2_held_update_refcount(s, &hold,
                                                     host >> s->cluster_bits,
                                                     addend < 0,
                                                     QCOW2_DISCARD_SNAPSHOT,
                                                     &rc, err);
                } else {
                    ret = qcow2_held_get_refcount(s, &hold,
                                                  host >> s->cluster_bits,
                                                  &rc, err);
                }
            }
            if (ret < 0) {
                break;
            }
            if (rc == 1) {
                ne |= QCOW2_OFLAG_COPIED;
            }
            if (ne != e) {
                qcow2_set_l2_entry(s, table, j, ne);
                qcow2_cache_mark_dirty(s->l2_cache, table);
            }
        }
        qcow2_cache_put(s->l2_cache, &table);
        if (ret == 0 && addend) {
            ret = qcow2_held_update_refcount(s, &hold,
                                             l2_off >> s->cluster_bits,
                                             addend < 0,
                                             QCOW2_DISCARD_SNAPSHOT, &rc, err);
        } else if (ret == 0) {
            ret = qcow2_held_get_refcount(s, &hold, l2_off >> s->cluster_bits,
                                          &rc, err);
        }
        if (ret == 0) {
            uint64_t nl1e = l2_off | (rc == 1 ? QCOW2_OFLAG_COPIED : 0);
            if (nl1e != l1e) {
                l1[i] = nl1e;
                l1_modified = true;
            }
        }
    }
    qcow2_refblock_release(s, &hold);
    if (ret < 0) {
        return ret;
    }
    ret = qcow2_flush_caches(s, err);
    qcow2_process_discards(s);
    if (ret == 0 && addend >= 0 && l1_modified && l1_write) {
        uint64_t *be = malloc((size_t)l1_size * 8);
        if (!be) {
            return vd_error_set(err, -ENOMEM, "%s: out of memory",
                                s->filename);
        }
        for (uint32_t i = 0; i < l1_size; i++) {
            be[i] = htobe64(l1[i]);
        }
        /* The table written is the active one or the snapshot's. */
        ret = qcow2_pre_write_overlap_check(s, l1_write == s->l1_table_offset
                                               ? QCOW2_OL_ACTIVE_L1
                                               : QCOW2_OL_INACTIVE_L1,
                                            l1_write, (uint64_t)l1_size * 8,
                                            false, err);
        if (ret == 0) {
            ret = vd_child_pwrite(s->file, l1_write, be,
                                  (uint64_t)l1_size * 8, 0, err);
        }
        free(be);
        if (ret == 0) {
            ret = vd_node_flush(s->file->node, err);
        }
    }
    return ret;
}

int qcow2_read_l1_table(qcow2_state *s, uint64_t offset, uint32_t size,
                        uint32_t alloc, uint64_t **out, vd_error *err)
{
    uint64_t *l1 = calloc(alloc > size ? alloc : (size ? size : 1), 8);
    int ret;

    *out = NULL;
    if (!l1) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    ret = size ? vd_child_pread(s->file, offset, l1, (uint64_t)size * 8, err)
               : 0;
    if (ret < 0) {
        free(l1);
        return ret;
    }
    for (uint32_t i = 0; i < size; i++) {
        l1[i] = be64toh(l1[i]);
    }
    *out = l1;
    return 0;
}

/* Reads a snapshot's L1 table into a new host-endian array of @alloc
 * entries (>= sn->l1_size; the rest zeroed). */
static int read_snapshot_l1(qcow2_state *s, const qcow2_snapshot *sn,
                            uint32_t alloc, uint64_t **out, vd_error *err)
{
    return qcow2_read_l1_table(s, sn->l1_table_offset, sn->l1_size, alloc,
                               out, err);
}

/* ---- lookup ------------------------------------------------------------- */

/* The first snapshot with @id and/or @name (NULL matches anything), or -1. */
static int find_snapshot(qcow2_state *s, const char *id, const char *name)
{
    if (!s->snapshots) {
        return -1;
    }
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        if ((!id || strcmp(s->snapshots[i].id_str, id) == 0) &&
            (!name || strcmp(s->snapshots[i].name, name) == 0)) {
            return (int)i;
        }
    }
    return -1;
}

static int usable(qcow2_state *s, vd_error *err)
{
    if (s->snapshots_unusable) {
        return vd_error_set(err, -EIO, "%s: the snapshot table is damaged",
                            s->filename);
    }
    return 0;
}

uint64_t qcow2_vm_state_offset(const qcow2_state *s)
{
    uint64_t per_l1 = s->cluster_size << s->l2_bits;
    return (s->size + per_l1 - 1) / per_l1 * per_l1;
}

/* The file's length before goto and delete (and their dry runs) change
 * anything, or a negative errno: a corrupt image is refused. */
static int64_t changeable_file_length(qcow2_state *s, vd_error *err)
{
    int64_t flen;

    if (s->corrupt) {
        return vd_error_set(err, -EIO, "%s: image is corrupt; writes refused",
                            s->filename);
    }
    flen = vd_node_getlength(s->file->node);
    if (flen < 0) {
        return vd_error_set_errno(err, (int)flen, "%s: cannot get the file "
                                  "length", s->filename);
    }
    return flen;
}

/* ---- create ------------------------------------------------------------ */

/* QEMU's find_new_snapshot_id(): one more than the largest numeric id. */
static void new_snapshot_id(qcow2_state *s, char *buf, size_t len)
{
    unsigned long max = 0;
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        unsigned long id = strtoul(s->snapshots[i].id_str, NULL, 10);
        if (id > max) {
            max = id;
        }
    }
    snprintf(buf, len, "%lu", max + 1);
}

int qcow2_snapshot_create(vd_node *node, const vd_snapshot_info *info,
                          vd_error *err)
{
    qcow2_state *s = node->opaque;
    qcow2_snapshot sn, *list;
    char idbuf[32];
    uint64_t *l1_be = NULL;
    int64_t l1_off = 0;
    int ret = usable(s, err);

    if (ret < 0) {
        return ret;
    }
    if (s->data_file != s->file) {
        return vd_error_set(err, -ENOTSUP, "%s: internal snapshots are not "
                            "supported with an external data file",
                            s->filename);
    }
    if (s->nb_snapshots >= QCOW2_MAX_SNAPSHOTS) {
        return vd_error_set(err, -EFBIG, "%s: Too many snapshots (limit %d)",
                            s->filename, QCOW2_MAX_SNAPSHOTS);
    }
    if (strlen(info->name) > UINT16_MAX ||
        (info->id && strlen(info->id) > UINT16_MAX)) {
        return vd_error_set(err, -EINVAL, "%s: snapshot name or id longer "
                            "than 65535 bytes", s->filename);
    }
    pthread_mutex_lock(&s->lock);
    if (info->id && info->id[0]) {
        if (find_snapshot(s, info->id, NULL) >= 0) {
            ret = vd_error_set(err, -EEXIST, "%s: a snapshot with id '%s' "
                               "already exists", s->filename, info->id);
            goto out;
        }
        snprintf(idbuf, sizeof(idbuf), "%s", "");
    } else {
        new_snapshot_id(s, idbuf, sizeof(idbuf));
    }
    /* Refuse before touching anything: damaged structures, or a tree
     * whose references would overflow a refcount. */
    ret = qcow2_validate_metadata(s, err);
    if (ret == 0) {
        ret = qcow2_validate_l1_tree(s, s->l1_table, s->l1_size,
                                     QCOW2_VALIDATE_OVERFLOW |
                                     QCOW2_VALIDATE_SIGNAL, err);
    }
    if (ret == 0) {
        ret = qcow2_begin_change(s, err);
    }
    if (ret < 0) {
        goto out;
    }

    memset(&sn, 0, sizeof(sn));
    sn.id_str = strdup(info->id && info->id[0] ? info->id : idbuf);
    sn.name = strdup(info->name);
    if (!sn.id_str || !sn.name) {
        free_one(&sn);
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
        goto out;
    }
    sn.disk_size = s->size;
    sn.vm_state_size = info->vm_state_size;
    sn.date_sec = info->date_sec;
    sn.date_nsec = info->date_nsec;
    sn.vm_clock_nsec = info->vm_clock_nsec;
    sn.icount = info->icount;
    sn.extra_data_size = sizeof(qcow2_snapshot_extra);
    sn.l1_size = s->l1_size;

    /* The copy keeps the active flags, as QEMU's does: COPIED in a
     * snapshot's tables carries no meaning. */
    if (s->l1_size) {
        l1_off = qcow2_alloc_clusters(s, (uint64_t)s->l1_size * 8, err);
        if (l1_off < 0) {
            ret = (int)l1_off;
            free_one(&sn);
            goto out;
        }
        l1_be = malloc((size_t)s->l1_size * 8);
        if (!l1_be) {
            ret = vd_error_set(err, -ENOMEM, "%s: out of memory",
                               s->filename);
            goto fail_l1;
        }
        for (uint32_t i = 0; i < s->l1_size; i++) {
            l1_be[i] = htobe64(s->l1_table[i]);
        }
        ret = qcow2_pre_write_overlap_check(s, 0, (uint64_t)l1_off,
                                            (uint64_t)s->l1_size * 8, false,
                                            err);
        if (ret == 0) {
            ret = vd_child_pwrite(s->file, (uint64_t)l1_off, l1_be,
                                  (uint64_t)s->l1_size * 8, 0, err);
        }
        free(l1_be);
        if (ret < 0) {
            goto fail_l1;
        }
    }
    sn.l1_table_offset = (uint64_t)l1_off;

    ret = walk_refcounts(s, s->l1_table, s->l1_size, s->l1_table_offset, 1,
                         err);
    if (ret < 0) {
        /* Part of the references may be raised: they leak, as in QEMU. */
        free_one(&sn);
        goto out;
    }

    list = realloc(s->snapshots, (s->nb_snapshots + 1) * sizeof(*list));
    if (!list) {
        free_one(&sn);
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
        goto out;
    }
    s->snapshots = list;
    s->snapshots[s->nb_snapshots++] = sn;
    qcow2_overlap_snapshots_changed(s);
    ret = write_snapshots(s, err);
    if (ret < 0) {
        s->nb_snapshots--;
        qcow2_overlap_snapshots_changed(s);
        free_one(&s->snapshots[s->nb_snapshots]);
        goto out;
    }
    pthread_mutex_unlock(&s->lock);

    /* The VM state now lives in the snapshot; the active copy would only
     * cost copy-on-write for the next one. */
    if (sn.vm_state_size) {
        uint64_t len = (sn.vm_state_size + s->cluster_size - 1) &
                       ~(s->cluster_size - 1);
        qcow2_co_pdiscard(s, qcow2_vm_state_offset(s), len, NULL);
    }
    return 0;

fail_l1:
    qcow2_free_clusters(s, (uint64_t)l1_off, (uint64_t)s->l1_size * 8,
                        QCOW2_DISCARD_OTHER, NULL);
    free_one(&sn);
out:
    pthread_mutex_unlock(&s->lock);
    return ret;
}

/* ---- goto -------------------------------------------------------------- */

static int write_disk_size(qcow2_state *s, uint64_t size, vd_error *err)
{
    uint64_t be = htobe64(size);
    int ret = vd_child_pwrite(s->file, offsetof(qcow2_header, size), &be, 8,
                              0, err);
    if (ret == 0) {
        ret = vd_node_flush(s->file->node, err);
    }
    if (ret == 0) {
        s->size = size;
    }
    return ret;
}

int qcow2_snapshot_goto(vd_node *node, const char *id, vd_error *err)
{
    qcow2_state *s = node->opaque;
    qcow2_snapshot *sn;
    uint64_t *sn_l1 = NULL, *be = NULL;
    int64_t flen;
    int idx, ret = usable(s, err);

    if (ret < 0) {
        return ret;
    }
    idx = find_snapshot(s, id, NULL);
    if (idx < 0) {
        idx = find_snapshot(s, NULL, id);
    }
    if (idx < 0) {
        /* No message: the caller words "not found" as qemu-img does. */
        return -ENOENT;
    }
    flen = changeable_file_length(s, err);
    if (flen < 0) {
        return (int)flen;
    }
    pthread_mutex_lock(&s->lock);
    sn = &s->snapshots[idx];
    ret = check_snapshot_l1(s, sn, (uint64_t)flen, err);
    /* Before the first write: the structures, the snapshot's tree (which
     * gains a reference) and the active tree (which loses one). */
    if (ret == 0) {
        ret = qcow2_validate_metadata(s, err);
    }
    if (ret == 0) {
        ret = read_snapshot_l1(s, sn, sn->l1_size, &sn_l1, err);
    }
    if (ret == 0) {
        ret = qcow2_validate_l1_tree(s, sn_l1, sn->l1_size,
                                     QCOW2_VALIDATE_SNAPSHOT |
                                     QCOW2_VALIDATE_OVERFLOW |
                                     QCOW2_VALIDATE_SIGNAL, err);
        free(sn_l1);
        sn_l1 = NULL;
    }
    if (ret == 0) {
        ret = qcow2_validate_l1_tree(s, s->l1_table, s->l1_size,
                                     QCOW2_VALIDATE_SIGNAL, err);
    }
    if (ret == 0) {
        ret = qcow2_begin_change(s, err);
    }
    if (ret < 0) {
        goto out;
    }
    if (sn->disk_size != s->size) {
        uint64_t per_l1 = s->cluster_size << s->l2_bits;
        uint64_t need = (sn->disk_size + per_l1 - 1) / per_l1;
        if (sn->disk_size > (1ull << 62) ||
            need * 8 > QCOW2_MAX_L1_BYTES) {
            ret = vd_error_set(err, -EFBIG, "%s: snapshot '%s' has an invalid "
                               "disk size 0x%" PRIx64, s->filename, sn->name,
                               sn->disk_size);
            goto out;
        }
        ret = qcow2_grow_l1_table(s, need, true, err);
        if (ret == 0) {
            ret = write_disk_size(s, sn->disk_size, err);
        }
        if (ret < 0) {
            goto out;
        }
    }
    ret = qcow2_grow_l1_table(s, sn->l1_size, true, err);
    if (ret < 0) {
        goto out;
    }
    ret = read_snapshot_l1(s, sn, s->l1_size, &sn_l1, err);
    if (ret < 0) {
        goto out;
    }
    /* First the new references, with COPIED fixed in shared tables... */
    ret = walk_refcounts(s, sn_l1, sn->l1_size, sn->l1_table_offset, 1, err);
    if (ret < 0) {
        goto out;
    }
    /* ...then the switch, synchronously... */
    be = malloc((size_t)s->l1_size * 8 + 8);
    if (!be) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
        goto out;
    }
    for (uint32_t i = 0; i < s->l1_size; i++) {
        be[i] = htobe64(sn_l1[i]);
    }
    ret = qcow2_pre_write_overlap_check(s, QCOW2_OL_ACTIVE_L1,
                                        s->l1_table_offset,
                                        (uint64_t)s->l1_size * 8, false, err);
    if (ret == 0) {
        ret = vd_child_pwrite(s->file, s->l1_table_offset, be,
                              (uint64_t)s->l1_size * 8, 0, err);
    }
    if (ret == 0) {
        ret = vd_node_flush(s->file->node, err);
    }
    if (ret < 0) {
        goto out;
    }
    /* ...then the old state loses its references (its L1 only lives in
     * memory now, so nothing is written back for it)... */
    ret = walk_refcounts(s, s->l1_table, s->l1_size, 0, -1, err);
    memcpy(s->l1_table, sn_l1, (size_t)s->l1_size * 8);
    qcow2_overlap_changed(s);
    if (ret < 0) {
        goto out;
    }
    /* ...and COPIED is set where the new active state is sole owner. */
    ret = walk_refcounts(s, s->l1_table, s->l1_size, s->l1_table_offset, 0,
                         err);
out:
    pthread_mutex_unlock(&s->lock);
    free(sn_l1);
    free(be);
    return ret;
}

/* ---- delete ------------------------------------------------------------ */

int qcow2_snapshot_delete(vd_node *node, const char *id, const char *name,
                          vd_error *err)
{
    qcow2_state *s = node->opaque;
    qcow2_snapshot sn;
    uint64_t *l1 = NULL;
    int64_t flen;
    int idx, ret = usable(s, err);

    if (ret < 0) {
        return ret;
    }
    idx = find_snapshot(s, id, name);
    if (idx < 0) {
        return vd_error_set(err, -ENOENT, "Can't find the snapshot");
    }
    flen = changeable_file_length(s, err);
    if (flen < 0) {
        return (int)flen;
    }
    pthread_mutex_lock(&s->lock);
    ret = check_snapshot_l1(s, &s->snapshots[idx], (uint64_t)flen, err);
    if (ret == 0) {
        ret = qcow2_validate_metadata(s, err);
    }
    if (ret == 0) {
        ret = read_snapshot_l1(s, &s->snapshots[idx],
                               s->snapshots[idx].l1_size, &l1, err);
    }
    /* The snapshot's tree loses a reference: validate it first. */
    if (ret == 0) {
        ret = qcow2_validate_l1_tree(s, l1, s->snapshots[idx].l1_size,
                                     QCOW2_VALIDATE_SNAPSHOT |
                                     QCOW2_VALIDATE_SIGNAL, err);
    }
    /* ... and the active one, whose COPIED flags are fixed up last. */
    if (ret == 0) {
        ret = qcow2_validate_l1_tree(s, s->l1_table, s->l1_size,
                                     QCOW2_VALIDATE_SIGNAL, err);
    }
    if (ret == 0) {
        ret = qcow2_begin_change(s, err);
    }
    if (ret < 0) {
        goto out;
    }
    sn = s->snapshots[idx];
    memmove(&s->snapshots[idx], &s->snapshots[idx + 1],
            (s->nb_snapshots - (uint32_t)idx - 1) * sizeof(sn));
    s->nb_snapshots--;
    qcow2_overlap_snapshots_changed(s);
    ret = write_snapshots(s, err);
    if (ret < 0) {
        memmove(&s->snapshots[idx + 1], &s->snapshots[idx],
                (s->nb_snapshots - (uint32_t)idx) * sizeof(sn));
        s->snapshots[idx] = sn;
        s->nb_snapshots++;
        qcow2_overlap_snapshots_changed(s);
        vd_error_prepend(err, "Failed to remove snapshot from snapshot list: ");
        goto out;
    }
    if (s->nb_snapshots == 0) {
        free(s->snapshots);
        s->snapshots = NULL;
        qcow2_overlap_snapshots_changed(s);
    }
    /* From here on a failure only leaks clusters. */
    ret = walk_refcounts(s, l1, sn.l1_size, 0, -1, err);
    if (ret == 0 && sn.l1_size) {
        ret = qcow2_free_clusters(s, sn.l1_table_offset,
                                  (uint64_t)sn.l1_size * 8,
                                  QCOW2_DISCARD_SNAPSHOT, err);
    }
    if (ret == 0) {
        ret = walk_refcounts(s, s->l1_table, s->l1_size, s->l1_table_offset,
                             0, err);
    }
    free_one(&sn);
out:
    pthread_mutex_unlock(&s->lock);
    free(l1);
    return ret;
}

/* ---- dry runs (vd_snapshot_delete_plan(), vd_snapshot_goto_plan()) ----- */

/* Host cluster indexes, one per reference: a cluster that a tree
 * references twice is there twice, as walk_refcounts() would count it. */
typedef struct ref_list {
    uint64_t *v;
    size_t n, cap;
} ref_list;

/* One reference to every cluster touching [offset, offset + bytes). */
static int ref_add(qcow2_state *s, ref_list *l, uint64_t offset,
                   uint64_t bytes, vd_error *err)
{
    uint64_t first = offset >> s->cluster_bits;
    uint64_t last = (offset + bytes - 1) >> s->cluster_bits;

    for (uint64_t c = first; c <= last; c++) {
        if (l->n == l->cap) {
            size_t cap = l->cap ? l->cap * 2 : 4096;
            uint64_t *v = realloc(l->v, cap * sizeof(*v));
            if (!v) {
                return vd_error_set(err, -ENOMEM, "%s: out of memory",
                                    s->filename);
            }
            l->v = v;
            l->cap = cap;
        }
        l->v[l->n++] = c;
    }
    return 0;
}

/* The references the tree of @l1 holds (what walk_refcounts() adds or
 * drops): its L2 tables and the host clusters of their entries. */
static int collect_refs(qcow2_state *s, const uint64_t *l1, uint32_t l1_size,
                        ref_list *l, vd_error *err)
{
    int ret = 0;

    for (uint32_t i = 0; i < l1_size && ret == 0; i++) {
        uint64_t l2_off = l1[i] & QCOW2_L1E_OFFSET_MASK;
        void *table;

        if (!l2_off) {
            continue;
        }
        ret = qcow2_cache_get(s, s->l2_cache, l2_off, &table, err);
        if (ret < 0) {
            return ret;
        }
        for (uint64_t j = 0; j < s->l2_size && ret == 0; j++) {
            uint64_t e = qcow2_get_l2_entry(s, table, j);
            uint64_t host = e & QCOW2_L2E_OFFSET_MASK;

            if (e & QCOW2_OFLAG_COMPRESSED) {
                uint64_t coff, clen;
                qcow2_parse_compressed(s, e, &coff, &clen);
                ret = ref_add(s, l, coff, clen, err);
            } else if (host && s->data_file == s->file) {
                ret = ref_add(s, l, host, s->cluster_size, err);
            }
        }
        qcow2_cache_put(s->l2_cache, &table);
        if (ret == 0) {
            ret = ref_add(s, l, l2_off, s->cluster_size, err);
        }
    }
    return ret;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Bytes of the clusters whose refcount reaches 0 once every reference in
 * @drop is gone and every one in @add is there (both get sorted). */
static int count_freed(qcow2_state *s, ref_list *drop, ref_list *add,
                       uint64_t *freed, vd_error *err)
{
    size_t a = 0;

    /* (qsort() must not see the NULL of an empty list.) */
    if (drop->n) {
        qsort(drop->v, drop->n, sizeof(uint64_t), cmp_u64);
    }
    if (add->n) {
        qsort(add->v, add->n, sizeof(uint64_t), cmp_u64);
    }
    for (size_t i = 0; i < drop->n;) {
        uint64_t c = drop->v[i], k = 0, plus = 0, rc;
        int ret;

        while (i < drop->n && drop->v[i] == c) {
            i++;
            k++;
        }
        while (a < add->n && add->v[a] < c) {
            a++;
        }
        while (a < add->n && add->v[a] == c) {
            a++;
            plus++;
        }
        ret = qcow2_get_refcount(s, c, &rc, err);
        if (ret < 0) {
            return ret;
        }
        if (rc + plus <= k) {
            *freed += s->cluster_size;
        }
    }
    return 0;
}

/* Guest bytes below @limit whose L2 entries (without COPIED) differ
 * between the trees of @a and @b. */
static int count_changed(qcow2_state *s, const uint64_t *a, uint32_t na,
                         const uint64_t *b, uint32_t nb, uint64_t limit,
                         uint64_t *changed, vd_error *err)
{
    uint64_t per_l2 = s->cluster_size << s->l2_bits;
    uint8_t *copy = malloc(s->cluster_size);
    int ret = 0;

    if (!copy) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    for (uint32_t i = 0; i < (na > nb ? na : nb) && ret == 0; i++) {
        uint64_t ea = i < na ? a[i] & QCOW2_L1E_OFFSET_MASK : 0;
        uint64_t eb = i < nb ? b[i] & QCOW2_L1E_OFFSET_MASK : 0;
        uint64_t base = (uint64_t)i * per_l2;
        void *tb = NULL, *t;

        if (base >= limit) {
            break;
        }
        if (ea == eb) {
            continue;           /* the same L2 table, or none in both */
        }
        memset(copy, 0, s->cluster_size);
        if (ea) {
            ret = qcow2_cache_get(s, s->l2_cache, ea, &t, err);
            if (ret < 0) {
                break;
            }
            memcpy(copy, t, s->cluster_size);
            qcow2_cache_put(s->l2_cache, &t);
        }
        if (eb) {
            ret = qcow2_cache_get(s, s->l2_cache, eb, &tb, err);
            if (ret < 0) {
                break;
            }
        }
        for (uint64_t j = 0; j < s->l2_size; j++) {
            uint64_t g = base + j * s->cluster_size;
            uint64_t xa = qcow2_get_l2_entry(s, copy, j);
            uint64_t xb = tb ? qcow2_get_l2_entry(s, tb, j) : 0;
            uint64_t ba = qcow2_get_l2_bitmap(s, copy, j);
            uint64_t bb = tb ? qcow2_get_l2_bitmap(s, tb, j) : 0;

            if (g >= limit) {
                break;
            }
            if ((xa & ~QCOW2_OFLAG_COPIED) != (xb & ~QCOW2_OFLAG_COPIED) ||
                ba != bb) {
                *changed += limit - g < s->cluster_size ? limit - g
                                                        : s->cluster_size;
            }
        }
        if (tb) {
            qcow2_cache_put(s->l2_cache, &tb);
        }
    }
    free(copy);
    return ret;
}

int qcow2_snapshot_plan(vd_node *node, const char *id, const char *name,
                        bool apply, vd_snapshot_plan *out, vd_error *err)
{
    qcow2_state *s = node->opaque;
    ref_list drop = { 0 }, add = { 0 };
    const qcow2_snapshot *sn;
    uint64_t *l1 = NULL;
    int64_t flen;
    int idx, ret = usable(s, err);

    if (ret < 0) {
        return ret;
    }
    /* Looked up as goto and delete look it up, refused as they refuse
     * (their validations, without marking anything corrupt). */
    idx = apply ? find_snapshot(s, id, NULL) : find_snapshot(s, id, name);
    if (apply && idx < 0) {
        idx = find_snapshot(s, NULL, id);
    }
    if (idx < 0) {
        return apply ? -ENOENT
                     : vd_error_set(err, -ENOENT, "Can't find the snapshot");
    }
    flen = changeable_file_length(s, err);
    if (flen < 0) {
        return (int)flen;
    }
    pthread_mutex_lock(&s->lock);
    sn = &s->snapshots[idx];
    out->old_size = out->new_size = s->size;
    ret = check_snapshot_l1(s, sn, (uint64_t)flen, err);
    if (ret == 0) {
        ret = qcow2_validate_metadata(s, err);
    }
    if (ret == 0) {
        ret = read_snapshot_l1(s, sn, sn->l1_size, &l1, err);
    }
    if (ret == 0) {
        ret = qcow2_validate_l1_tree(s, l1, sn->l1_size,
                                     QCOW2_VALIDATE_SNAPSHOT |
                                     (apply ? QCOW2_VALIDATE_OVERFLOW : 0),
                                     err);
    }
    if (ret == 0) {
        ret = qcow2_validate_l1_tree(s, s->l1_table, s->l1_size, 0, err);
    }
    if (ret == 0 && apply && sn->disk_size != s->size &&
        (sn->disk_size > (1ull << 62) ||
         (sn->disk_size + (s->cluster_size << s->l2_bits) - 1) /
         (s->cluster_size << s->l2_bits) * 8 > QCOW2_MAX_L1_BYTES)) {
        ret = vd_error_set(err, -EFBIG, "%s: snapshot '%s' has an invalid "
                           "disk size 0x%" PRIx64, s->filename, sn->name,
                           sn->disk_size);
    }
    if (ret < 0) {
        goto out;
    }
    ret = collect_refs(s, l1, sn->l1_size, apply ? &add : &drop, err);
    if (ret == 0 && apply) {
        /* The active tree loses its references, the snapshot's gains
         * one each; what the active layer maps differently changes. */
        out->new_size = sn->disk_size;
        ret = collect_refs(s, s->l1_table, s->l1_size, &drop, err);
        if (ret == 0) {
            ret = count_changed(s, s->l1_table, s->l1_size, l1, sn->l1_size,
                                s->size > sn->disk_size ? s->size
                                                        : sn->disk_size,
                                &out->changed, err);
        }
    } else if (ret == 0 && sn->l1_size) {
        /* Deleting also frees the snapshot's L1 table... */
        ret = ref_add(s, &drop, sn->l1_table_offset,
                      (uint64_t)sn->l1_size * 8, err);
    }
    if (ret == 0) {
        ret = count_freed(s, &drop, &add, &out->freed, err);
    }
    if (ret == 0 && !apply) {
        /* ...and rewrites the snapshot table without the entry. */
        uint64_t now = qcow2_size_to_clusters(s, s->snapshots_size), later = 0;
        ret = table_bytes(s, idx, &later, err);
        later = qcow2_size_to_clusters(s, later);
        if (ret == 0 && now > later) {
            out->freed += (now - later) << s->cluster_bits;
        }
    }
out:
    pthread_mutex_unlock(&s->lock);
    free(l1);
    free(drop.v);
    free(add.v);
    return ret;
}

/* ---- list and load_tmp ------------------------------------------------- */

int qcow2_snapshot_list(vd_node *node, vd_snapshot_info **list,
                        size_t *count, vd_error *err)
{
    qcow2_state *s = node->opaque;
    vd_snapshot_info *v;
    int ret = usable(s, err);

    *list = NULL;
    *count = 0;
    if (ret < 0 || s->nb_snapshots == 0) {
        return ret;
    }
    v = calloc(s->nb_snapshots, sizeof(*v));
    if (!v) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        const qcow2_snapshot *sn = &s->snapshots[i];
        v[i].id = strdup(sn->id_str);
        v[i].name = strdup(sn->name);
        if (!v[i].id || !v[i].name) {
            vd_snapshot_list_free(&v, i + 1);
            return vd_error_set(err, -ENOMEM, "%s: out of memory",
                                s->filename);
        }
        v[i].vm_state_size = sn->vm_state_size;
        v[i].date_sec = sn->date_sec;
        v[i].date_nsec = sn->date_nsec;
        v[i].vm_clock_nsec = sn->vm_clock_nsec;
        v[i].icount = sn->icount;
        v[i].disk_size = sn->disk_size;
    }
    *list = v;
    *count = s->nb_snapshots;
    return 0;
}

int qcow2_snapshot_load_tmp(vd_node *node, const char *id, const char *name,
                            vd_error *err)
{
    qcow2_state *s = node->opaque;
    qcow2_snapshot *sn;
    uint64_t *l1;
    int64_t flen;
    int idx, ret = usable(s, err);

    if (ret < 0) {
        return ret;
    }
    if (!node->read_only) {
        return vd_error_set(err, -EINVAL, "Device is not readonly");
    }
    idx = find_snapshot(s, id, name);
    if (idx < 0) {
        return vd_error_set(err, -ENOENT, "Can't find snapshot");
    }
    sn = &s->snapshots[idx];
    flen = vd_node_getlength(s->file->node);
    if (flen < 0) {
        return vd_error_set_errno(err, (int)flen, "%s: cannot get the file "
                                  "length", s->filename);
    }
    pthread_mutex_lock(&s->lock);
    ret = check_snapshot_l1(s, sn, (uint64_t)flen, err);
    if (ret == 0) {
        ret = read_snapshot_l1(s, sn, sn->l1_size, &l1, err);
    }
    if (ret == 0) {
        free(s->l1_table);
        s->l1_table = l1;
        s->l1_size = sn->l1_size;
        s->l1_table_offset = sn->l1_table_offset;
        s->size = sn->disk_size;
        qcow2_overlap_changed(s);
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

/* ---- VM state ------------------------------------------------------------ */

/* The VM state lives in guest address space right after the last L2
 * range of the disk (QEMU's qcow2_vm_state_offset), so it is saved and
 * shared with snapshots exactly like guest data. */
int qcow2_save_vmstate(vd_node *node, vd_iov *qiov, uint64_t pos,
                       vd_error *err)
{
    qcow2_state *s = node->opaque;

    if (node->read_only) {
        return vd_error_set(err, -EROFS, "%s: cannot save VM state on a "
                            "read-only image", s->filename);
    }
    if (s->corrupt) {
        return vd_error_set(err, -EIO, "%s: image is corrupt; writes refused",
                            s->filename);
    }
    if (pos > QCOW2_MAX_HOST_OFFSET || qiov->size > QCOW2_MAX_HOST_OFFSET - pos) {
        return vd_error_set(err, -EINVAL, "%s: VM state position 0x%" PRIx64
                            " out of range", s->filename, pos);
    }
    if (qiov->size == 0) {
        return 0;
    }
    vd_node_debug_event(s->file->node, VD_BLKDBG_VMSTATE_SAVE);
    return qcow2_co_pwritev(s, qcow2_vm_state_offset(s) + pos, qiov->size,
                            qiov, 0, err);
}

int qcow2_load_vmstate(vd_node *node, vd_iov *qiov, uint64_t pos,
                       vd_error *err)
{
    qcow2_state *s = node->opaque;

    if (pos > QCOW2_MAX_HOST_OFFSET || qiov->size > QCOW2_MAX_HOST_OFFSET - pos) {
        return vd_error_set(err, -EINVAL, "%s: VM state position 0x%" PRIx64
                            " out of range", s->filename, pos);
    }
    if (qiov->size == 0) {
        return 0;
    }
    vd_node_debug_event(s->file->node, VD_BLKDBG_VMSTATE_LOAD);
    return qcow2_co_preadv(s, qcow2_vm_state_offset(s) + pos, qiov->size,
                           qiov, 0, err);
}
