/*
 * qcow2 driver: the vtable and everything around the image header.
 *
 * Organisation: header field validation and extension parsing (open),
 * header rewriting and the dirty/corrupt bits, cache sizing from the
 * options, open/close, the request callbacks (thin wrappers over
 * cluster.c), truncate, info, and finally create and the creation option
 * table. Validation follows ../shared/specs/qcow2.txt ("Header",
 * "Header extensions") and QEMU 7.2's limits; every failure names the
 * file and the offending value and writes nothing.
 */
#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crypto/luks.h"
#include "drivers/qcow2/qcow2.h"

#define DEFAULT_L2_CACHE_MAX (32ull << 20)
#define MIN_L2_CACHE_TABLES 2
#define MIN_REFCOUNT_CACHE_TABLES 4
/* Linear-scan cache: keep the slot count sane for tiny clusters. */
#define MAX_CACHE_TABLES 8192

/* ------------------------------------------------------------------ */
/* Corruption, dirty and corrupt bits                                 */
/* ------------------------------------------------------------------ */

int qcow2_signal_corruption(qcow2_state *s, vd_error *err, const char *fmt,
                            ...)
{
    char msg[512];
    va_list ap;
    bool mark = !s->node->read_only && !(s->node->flags & VD_NODE_CHECK) &&
                !s->corrupt;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (mark) {
        qcow2_mark_corrupt(s, NULL);
        vd_error_set(err, -EIO, "%s: %s; image marked corrupt", s->filename,
                     msg);
    } else {
        vd_error_set(err, -EIO, "%s: %s", s->filename, msg);
    }
    return -EIO;
}

static int write_incompat(qcow2_state *s, uint64_t bits, vd_error *err)
{
    uint64_t be = htobe64(bits);
    int ret = vd_child_pwrite(s->file, offsetof(qcow2_header,
                                                incompatible_features),
                              &be, 8, 0, err);
    if (ret == 0) {
        ret = vd_node_flush(s->file->node, err);
    }
    if (ret == 0) {
        s->incompatible_features = bits;
    }
    return ret;
}

int qcow2_mark_dirty(qcow2_state *s, vd_error *err)
{
    int ret;
    if (s->version < 3 || (s->incompatible_features & QCOW2_INCOMPAT_DIRTY)) {
        s->dirty_marked = true;
        return 0;
    }
    ret = vd_node_flush(s->file->node, err);
    if (ret == 0) {
        ret = write_incompat(s, s->incompatible_features | QCOW2_INCOMPAT_DIRTY,
                             err);
    }
    if (ret == 0) {
        s->dirty_marked = true;
    }
    return ret;
}

static int flush_all_caches(qcow2_state *s, vd_error *err);

int qcow2_mark_clean(qcow2_state *s, vd_error *err)
{
    int ret;
    if (!(s->incompatible_features & QCOW2_INCOMPAT_DIRTY)) {
        return 0;
    }
    ret = flush_all_caches(s, err);
    if (ret == 0) {
        ret = write_incompat(s, s->incompatible_features & ~QCOW2_INCOMPAT_DIRTY,
                             err);
    }
    if (ret == 0) {
        s->dirty_marked = false;
    }
    return ret;
}

int qcow2_mark_corrupt(qcow2_state *s, vd_error *err)
{
    s->corrupt = true;
    if (s->version < 3) {
        return 0;
    }
    return write_incompat(s, s->incompatible_features | QCOW2_INCOMPAT_CORRUPT,
                          err);
}

int qcow2_write_caches(qcow2_state *s, vd_error *err)
{
    int ret = qcow2_cache_write(s, s->l2_cache, err);
    if (ret == 0 && qcow2_need_accurate_refcounts(s)) {
        ret = qcow2_cache_write(s, s->refcount_cache, err);
    }
    return ret;
}

/* Every cache, refcounts included even while the dirty bit is set, and
 * a flush of the file: what close and mark_clean need on disk. */
static int flush_all_caches(qcow2_state *s, vd_error *err)
{
    int ret = qcow2_cache_write(s, s->l2_cache, err);
    if (ret == 0) {
        ret = qcow2_cache_write(s, s->refcount_cache, err);
    }
    if (ret == 0) {
        ret = vd_node_flush(s->file->node, err);
    }
    return ret;
}

int qcow2_flush_caches(qcow2_state *s, vd_error *err)
{
    int ret = qcow2_write_caches(s, err);
    if (ret == 0) {
        ret = vd_node_flush(s->file->node, err);
    }
    return ret;
}

/* ------------------------------------------------------------------ */
/* Header rewriting                                                   */
/* ------------------------------------------------------------------ */

static const struct {
    uint8_t type, bit;
    const char *name;
} feature_names[] = {
    { QCOW2_FEAT_TYPE_INCOMPAT, 0, "dirty bit" },
    { QCOW2_FEAT_TYPE_INCOMPAT, 1, "corrupt bit" },
    { QCOW2_FEAT_TYPE_INCOMPAT, 2, "external data file" },
    { QCOW2_FEAT_TYPE_INCOMPAT, 3, "compression type" },
    { QCOW2_FEAT_TYPE_INCOMPAT, 4, "extended L2 entries" },
    { QCOW2_FEAT_TYPE_COMPAT, 0, "lazy refcounts" },
    { QCOW2_FEAT_TYPE_AUTOCLEAR, 0, "bitmaps" },
    { QCOW2_FEAT_TYPE_AUTOCLEAR, 1, "raw external data" },
};

/* Appends one extension at *pos of @buf (size @cap); -ENOSPC when full. */
static int put_ext(uint8_t *buf, size_t cap, size_t *pos, uint32_t type,
                   const void *data, uint32_t len)
{
    size_t padded = ((size_t)len + 7) & ~(size_t)7;
    qcow2_ext_header h = { htobe32(type), htobe32(len) };

    if (*pos + sizeof(h) + padded > cap) {
        return -ENOSPC;
    }
    memcpy(buf + *pos, &h, sizeof(h));
    *pos += sizeof(h);
    if (len) {
        memcpy(buf + *pos, data, len);
    }
    *pos += padded;
    return 0;
}

/* Serialises the header cluster from the state into @buf (cluster_size
 * bytes, zeroed by the caller). */
static int build_header(qcow2_state *s, uint8_t *buf, vd_error *err)
{
    size_t cap = s->cluster_size, pos;
    qcow2_header h;
    int ret = 0;

    memset(&h, 0, sizeof(h));
    h.magic = htobe32(QCOW2_MAGIC);
    h.version = htobe32((uint32_t)s->version);
    h.cluster_bits = htobe32((uint32_t)s->cluster_bits);
    h.size = htobe64(s->size);
    h.crypt_method = htobe32(s->crypt_method);
    h.l1_size = htobe32(s->l1_size);
    h.l1_table_offset = htobe64(s->l1_table_offset);
    h.refcount_table_offset = htobe64(s->refcount_table_offset);
    h.refcount_table_clusters =
        htobe32((uint32_t)(((uint64_t)s->refcount_table_size * 8) >>
                           s->cluster_bits));
    h.nb_snapshots = htobe32(s->nb_snapshots);
    h.snapshots_offset = htobe64(s->snapshots_offset);
    if (s->version >= 3) {
        h.incompatible_features = htobe64(s->incompatible_features);
        h.compatible_features = htobe64(s->compatible_features);
        h.autoclear_features = htobe64(s->autoclear_features);
        h.refcount_order = htobe32((uint32_t)s->refcount_order);
        h.header_length = htobe32(s->header_length);
        h.compression_type = (uint8_t)s->compression_type;
        memcpy(buf, &h, sizeof(h));
        if (s->header_extra_len) {
            memcpy(buf + sizeof(h), s->header_extra, s->header_extra_len);
        }
        pos = s->header_length;
    } else {
        memcpy(buf, &h, QCOW2_V2_HEADER_LEN);
        pos = QCOW2_V2_HEADER_LEN;
    }

    if (s->backing_format) {
        ret = put_ext(buf, cap, &pos, QCOW2_EXT_BACKING_FMT, s->backing_format,
                      (uint32_t)strlen(s->backing_format));
    }
    if (ret == 0 && s->data_file_name) {
        ret = put_ext(buf, cap, &pos, QCOW2_EXT_DATA_FILE, s->data_file_name,
                      (uint32_t)strlen(s->data_file_name));
    }
    /* The full disk encryption header pointer, where QEMU puts it. */
    if (ret == 0 && s->has_crypto_ext) {
        qcow2_crypto_ext e = { htobe64(s->crypto_ext_offset),
                               htobe64(s->crypto_ext_length) };
        ret = put_ext(buf, cap, &pos, QCOW2_EXT_CRYPTO, &e, sizeof(e));
    }
    /* QEMU 7.2 leaves the table out of small header clusters. */
    if (ret == 0 && s->version >= 3 && s->cluster_size > 4096) {
        qcow2_feature_name t[sizeof(feature_names) / sizeof(feature_names[0])];
        memset(t, 0, sizeof(t));
        for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
            t[i].type = feature_names[i].type;
            t[i].bit = feature_names[i].bit;
            strncpy(t[i].name, feature_names[i].name, sizeof(t[i].name));
        }
        ret = put_ext(buf, cap, &pos, QCOW2_EXT_FEATURE_NAME, t, sizeof(t));
    }
    if (ret == 0 && s->has_bitmaps_ext) {
        qcow2_bitmaps_ext b = {
            htobe32(s->bitmaps_ext.nb_bitmaps), 0,
            htobe64(s->bitmaps_ext.bitmap_directory_size),
            htobe64(s->bitmaps_ext.bitmap_directory_offset),
        };
        ret = put_ext(buf, cap, &pos, QCOW2_EXT_BITMAPS, &b, sizeof(b));
    }
    for (qcow2_unknown_ext *u = s->unknown_exts; ret == 0 && u; u = u->next) {
        ret = put_ext(buf, cap, &pos, u->type, u->data, u->len);
    }
    if (ret == 0) {
        ret = put_ext(buf, cap, &pos, QCOW2_EXT_END, NULL, 0);
    }
    if (ret == 0 && s->backing_file) {
        size_t len = strlen(s->backing_file);
        if (pos + len > cap) {
            ret = -ENOSPC;
        } else {
            uint64_t off = htobe64(pos);
            uint32_t sz = htobe32((uint32_t)len);
            memcpy(buf + pos, s->backing_file, len);
            memcpy(buf + offsetof(qcow2_header, backing_file_offset), &off, 8);
            memcpy(buf + offsetof(qcow2_header, backing_file_size), &sz, 4);
        }
    }
    if (ret < 0) {
        return vd_error_set(err, ret, "%s: header extensions do not fit in "
                            "the first cluster", s->filename);
    }
    return 0;
}

int qcow2_update_header(qcow2_state *s, vd_error *err)
{
    uint8_t *buf = vd_node_blockalign(s->node, s->cluster_size);
    int ret;

    if (!buf) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    memset(buf, 0, s->cluster_size);
    ret = build_header(s, buf, err);
    if (ret == 0) {
        ret = vd_child_pwrite(s->file, 0, buf, s->cluster_size, 0, err);
    }
    if (ret == 0) {
        ret = vd_node_flush(s->file->node, err);
    }
    if (ret == 0) {
        s->header_update_pending = false;
    }
    free(buf);
    return ret;
}

int qcow2_write_deferred_header(qcow2_state *s, vd_error *err)
{
    return s->header_update_pending ? qcow2_update_header(s, err) : 0;
}

/* ------------------------------------------------------------------ */
/* Open                                                               */
/* ------------------------------------------------------------------ */

/* As QEMU: any version from 2 up is qcow2 (open then refuses versions it
 * does not know; probing them as raw would show the header as data),
 * version 1 is qcow (its own driver). */
static int qcow2_probe(const uint8_t *buf, size_t len, const char *filename)
{
    (void)filename;
    if (len >= 8 && be32toh(*(const uint32_t *)buf) == QCOW2_MAGIC) {
        uint32_t v = be32toh(*(const uint32_t *)(buf + 4));
        if (v >= 2) {
            return 100;
        }
    }
    return 0;
}

static char *dup_string(const void *p, size_t len)
{
    char *s = malloc(len + 1);
    if (s) {
        memcpy(s, p, len);
        s[len] = 0;
    }
    return s;
}

/* Feature names for unknown incompatible bits, from the image's own
 * feature name table, as QEMU's report_unsupported_feature(): the
 * table's entries in their order up to the first without a name, then
 * the bits nobody named as one hex mask ("Unsupported qcow2 feature(s):
 * my feature, Unknown incompatible feature: 200"). A bit number past 63
 * is taken modulo 64, as QEMU's shift does on x86. */
static void report_unsupported(qcow2_state *s, uint64_t mask, vd_error *err)
{
    char list[sizeof(err->message)] = "";
    size_t used = 0;

    for (uint32_t i = 0; i < s->nb_features && s->feature_table[i].name[0];
         i++) {
        const qcow2_feature_name *f = &s->feature_table[i];
        uint64_t bit = 1ull << (f->bit & 63);

        if (f->type != QCOW2_FEAT_TYPE_INCOMPAT || !(mask & bit)) {
            continue;
        }
        mask &= ~bit;
        if (used < sizeof(list)) {
            used += (size_t)snprintf(list + used, sizeof(list) - used,
                                     "%s%.46s", used ? ", " : "", f->name);
        }
    }
    if (mask && used < sizeof(list)) {
        snprintf(list + used, sizeof(list) - used,
                 "%sUnknown incompatible feature: %llx", used ? ", " : "",
                 (unsigned long long)mask);
    }
    vd_error_set(err, -ENOTSUP, "Unsupported qcow2 feature(s): %s", list);
}

/* Parses the header extensions in [start, end) of the header cluster. */
static int read_extensions(qcow2_state *s, const uint8_t *buf, uint64_t start,
                           uint64_t end, vd_error *err)
{
    uint64_t pos = start;

    while (pos + sizeof(qcow2_ext_header) <= end) {
        qcow2_ext_header h;
        const uint8_t *data;
        memcpy(&h, buf + pos, sizeof(h));
        h.type = be32toh(h.type);
        h.len = be32toh(h.len);
        pos += sizeof(h);
        if (h.type == QCOW2_EXT_END) {
            return 0;
        }
        if (h.len > end - pos) {
            return vd_error_set(err, -EINVAL, "%s: header extension 0x%x at "
                                "0x%llx: length 0x%x exceeds the header area",
                                s->filename, h.type,
                                (unsigned long long)(pos - sizeof(h)), h.len);
        }
        data = buf + pos;
        switch (h.type) {
        case QCOW2_EXT_BACKING_FMT:
            if (h.len >= 16) {
                return vd_error_set(err, -EINVAL, "%s: backing format "
                                    "extension length 0x%x too large",
                                    s->filename, h.len);
            }
            free(s->backing_format);
            s->backing_format = dup_string(data, h.len);
            break;
        case QCOW2_EXT_FEATURE_NAME:
            free(s->feature_table);
            s->nb_features = h.len / sizeof(qcow2_feature_name);
            s->feature_table = malloc(s->nb_features ?
                                      s->nb_features * sizeof(qcow2_feature_name)
                                      : 1);
            if (s->feature_table) {
                memcpy(s->feature_table, data,
                       s->nb_features * sizeof(qcow2_feature_name));
            }
            break;
        case QCOW2_EXT_BITMAPS: {
            /* QEMU 7.2's checks, order and wording (qcow2_read_extensions);
             * the directory is read later, in qcow2_validate_bitmaps(). */
            qcow2_bitmaps_ext *b = &s->bitmaps_ext;
            if (h.len != sizeof(qcow2_bitmaps_ext)) {
                return vd_error_set(err, -EINVAL, "bitmaps_ext: Invalid "
                                    "extension length");
            }
            if (!(s->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS)) {
                /* Written by a program without bitmap support: the
                 * bitmaps are stale and the extension is ignored. QEMU
                 * ends its hint without a newline (error_printf); vdisk
                 * ends the line (docs/compat.md). */
                s->stale_bitmaps_ext = true;
                vd_warn_report("%s\nSome clusters may be leaked, run "
                               "'qemu-img check -r' on the image file to "
                               "fix.", s->version < 3
                               ? "This qcow2 v2 image contains bitmaps, but "
                                 "they may have been modified by a program "
                                 "without persistent bitmap support; so now "
                                 "they must all be considered inconsistent"
                               : "a program lacking bitmap support modified "
                                 "this file, so all bitmaps are now "
                                 "considered inconsistent");
                break;
            }
            memcpy(b, data, sizeof(*b));
            b->nb_bitmaps = be32toh(b->nb_bitmaps);
            b->bitmap_directory_size = be64toh(b->bitmap_directory_size);
            b->bitmap_directory_offset = be64toh(b->bitmap_directory_offset);
            if (b->reserved != 0) {
                return vd_error_set(err, -EINVAL, "bitmaps_ext: Reserved "
                                    "field is not zero");
            }
            if (b->nb_bitmaps > QCOW2_MAX_BITMAPS) {
                return vd_error_set(err, -EINVAL, "bitmaps_ext: Image has %u "
                                    "bitmaps, exceeding the QEMU supported "
                                    "maximum of %d", b->nb_bitmaps,
                                    QCOW2_MAX_BITMAPS);
            }
            if (b->nb_bitmaps == 0) {
                return vd_error_set(err, -EINVAL, "found bitmaps extension "
                                    "with zero bitmaps");
            }
            if (b->bitmap_directory_offset & (s->cluster_size - 1)) {
                return vd_error_set(err, -EINVAL, "bitmaps_ext: invalid "
                                    "bitmap directory offset");
            }
            if (b->bitmap_directory_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE) {
                return vd_error_set(err, -EINVAL, "bitmaps_ext: bitmap "
                                    "directory size (%llu) exceeds the "
                                    "maximum supported size (%u)",
                                    (unsigned long long)
                                    b->bitmap_directory_size,
                                    QCOW2_MAX_BITMAP_DIRECTORY_SIZE);
            }
            s->has_bitmaps_ext = true;
            break;
        }
        case QCOW2_EXT_CRYPTO: {
            qcow2_crypto_ext e;
            if (h.len != sizeof(e)) {
                return vd_error_set(err, -EINVAL, "CRYPTO header extension "
                                    "size %u, but expected size %zu", h.len,
                                    sizeof(e));
            }
            memcpy(&e, data, sizeof(e));
            s->has_crypto_ext = true;
            s->crypto_ext_offset = be64toh(e.offset);
            s->crypto_ext_length = be64toh(e.length);
            break;
        }
        case QCOW2_EXT_DATA_FILE:
            free(s->data_file_name);
            s->data_file_name = dup_string(data, h.len);
            break;
        default: {
            qcow2_unknown_ext *u = calloc(1, sizeof(*u)), **tail;
            if (!u || !(u->data = malloc(h.len ? h.len : 1))) {
                free(u);
                return vd_error_set(err, -ENOMEM, "%s: out of memory",
                                    s->filename);
            }
            u->type = h.type;
            u->len = h.len;
            memcpy(u->data, data, h.len);
            for (tail = &s->unknown_exts; *tail; tail = &(*tail)->next) {
            }
            *tail = u;
            break;
        }
        }
        pos += ((uint64_t)h.len + 7) & ~7ull;
    }
    return 0;
}

/* A table of @bytes at @offset must be cluster-aligned and lie inside the
 * file. */
static int check_table(qcow2_state *s, const char *what, uint64_t offset,
                       uint64_t bytes, uint64_t file_len, vd_error *err)
{
    if (offset & (s->cluster_size - 1)) {
        return vd_error_set(err, -EINVAL, "%s: %s offset 0x%llx is not "
                            "cluster-aligned", s->filename, what,
                            (unsigned long long)offset);
    }
    /* Opened for check, a table past the end reads as zeros and check
     * reports what that breaks (qemu-img check opens such images too). */
    bool past_end = bytes > file_len || offset > file_len - bytes;
    if (offset > QCOW2_MAX_HOST_OFFSET || bytes > QCOW2_MAX_HOST_OFFSET ||
        (past_end && !(s->node->flags & VD_NODE_CHECK))) {
        return vd_error_set(err, -EINVAL, "%s: %s at 0x%llx (0x%llx bytes) "
                            "lies outside the file (length 0x%llx)",
                            s->filename, what, (unsigned long long)offset,
                            (unsigned long long)bytes,
                            (unsigned long long)file_len);
    }
    return 0;
}

static char *resolve_relative(const char *base, const char *name)
{
    char *copy, *dir, *out;
    if (name[0] == '/' || !strchr(base, '/')) {
        return strdup(name);
    }
    copy = strdup(base);
    if (!copy) {
        return NULL;
    }
    dir = dirname(copy);
    if (asprintf(&out, "%s/%s", dir, name) < 0) {
        out = NULL;
    }
    free(copy);
    return out;
}

/* Cache sizes from the options, as QEMU 7.2's read_cache_sizes(). */
static int cache_sizes(qcow2_state *s, vd_opts *opts, uint64_t *l2_bytes,
                       uint64_t *rc_bytes, vd_error *err)
{
    char *v_comb = vd_opts_take(opts, "cache-size");
    char *v_l2 = vd_opts_take(opts, "l2-cache-size");
    char *v_rc = vd_opts_take(opts, "refcount-cache-size");
    uint64_t comb = 0, l2 = 0, rc = 0, entry = 0, interval;
    uint64_t max_l2 = ((qcow2_size_to_clusters(s, s->size) <<
                        s->l2_entry_shift) + s->cluster_size - 1) &
                      ~(s->cluster_size - 1);
    uint64_t min_rc = MIN_REFCOUNT_CACHE_TABLES * s->cluster_size;
    int ret = 0;

    if ((v_comb && vd_parse_size(v_comb, &comb) < 0) ||
        (v_l2 && vd_parse_size(v_l2, &l2) < 0) ||
        (v_rc && vd_parse_size(v_rc, &rc) < 0)) {
        ret = vd_error_set(err, -EINVAL, "%s: invalid cache size",
                           s->filename);
        goto out;
    }
    ret = vd_opts_take_size(opts, "l2-cache-entry-size", s->cluster_size,
                            &entry, err);
    if (ret == 0) {
        ret = vd_opts_take_uint(opts, "cache-clean-interval", 600, &interval,
                                err);
    }
    if (ret < 0) {
        goto out;
    }
    if (entry < 512 || entry > s->cluster_size || (entry & (entry - 1))) {
        ret = vd_error_set(err, -EINVAL, "%s: L2 cache entry size must be a "
                           "power of two between 512 and the cluster size "
                           "(%llu)", s->filename,
                           (unsigned long long)s->cluster_size);
        goto out;
    }
    if (entry != s->cluster_size) {
        /* The cache holds whole L2 tables; partial-table slots would need
         * a different cache layout. Refuse rather than ignore. */
        ret = vd_error_set(err, -ENOTSUP, "%s: l2-cache-entry-size other "
                           "than the cluster size (%llu) is not supported",
                           s->filename, (unsigned long long)s->cluster_size);
        goto out;
    }
    s->cache_clean_interval = interval;
    if (v_comb) {
        if (v_l2 && v_rc) {
            ret = vd_error_set(err, -EINVAL, "%s: cache-size, l2-cache-size "
                               "and refcount-cache-size may not be set at "
                               "the same time", s->filename);
            goto out;
        } else if (v_l2 && l2 > comb) {
            ret = vd_error_set(err, -EINVAL, "%s: l2-cache-size may not "
                               "exceed cache-size", s->filename);
            goto out;
        } else if (v_rc && rc > comb) {
            ret = vd_error_set(err, -EINVAL, "%s: refcount-cache-size may "
                               "not exceed cache-size", s->filename);
            goto out;
        }
        if (v_l2) {
            rc = comb - l2;
        } else if (v_rc) {
            l2 = comb - rc;
        } else if (comb >= max_l2 + min_rc) {
            l2 = max_l2;
            rc = comb - l2;
        } else {
            rc = comb < min_rc ? comb : min_rc;
            l2 = comb - rc;
        }
    } else {
        if (!v_l2) {
            l2 = max_l2 < DEFAULT_L2_CACHE_MAX ? max_l2 : DEFAULT_L2_CACHE_MAX;
        }
        if (!v_rc) {
            rc = min_rc;
        }
    }
    *l2_bytes = l2;
    *rc_bytes = rc;
out:
    free(v_comb);
    free(v_l2);
    free(v_rc);
    return ret;
}

static int tables_for(qcow2_state *s, uint64_t bytes, int min)
{
    uint64_t n = bytes / s->cluster_size;
    if (n < (uint64_t)min) {
        n = (uint64_t)min;
    }
    if (n > MAX_CACHE_TABLES) {
        n = MAX_CACHE_TABLES;
    }
    return (int)n;
}

static void free_state(qcow2_state *s)
{
    qcow2_crypt_close(s);
    qcow2_cache_destroy(s->l2_cache);
    qcow2_cache_destroy(s->refcount_cache);
    s->l2_cache = s->refcount_cache = NULL;
    qcow2_refcount_close(s);
    free(s->l1_table);
    s->l1_table = NULL;
    qcow2_free_snapshots(s);
    qcow2_overlap_free(s);
    free(s->inconsistent_bitmap);
    s->inconsistent_bitmap = NULL;
    free(s->header_extra);
    free(s->backing_file);
    free(s->backing_format);
    free(s->data_file_name);
    free(s->feature_table);
    s->header_extra = NULL;
    s->backing_file = s->backing_format = s->data_file_name = NULL;
    s->feature_table = NULL;
    while (s->unknown_exts) {
        qcow2_unknown_ext *u = s->unknown_exts;
        s->unknown_exts = u->next;
        free(u->data);
        free(u);
    }
    while (s->discards) {
        qcow2_discard_range *d = s->discards;
        s->discards = d->next;
        free(d);
    }
}

static int open_data_file(qcow2_state *s, vd_node *node, vd_opts *opts,
                          unsigned flags, vd_error *err)
{
    /* As qemu's BlockdevRef: a string names an existing node, an object
     * ("data-file.driver=...") describes a new one. */
    char *opt = vd_opts_take(opts, "data-file");
    vd_opts *sub = vd_opts_extract_prefix(opts, "data-file.");
    char *path = NULL;
    vd_node *dn = NULL;
    int ret;

    if (!(s->incompatible_features & QCOW2_INCOMPAT_DATA_FILE)) {
        if (opt || (sub && vd_opts_count(sub))) {
            ret = vd_error_set(err, -EINVAL, "%s: 'data-file' can only be "
                               "set for images with an external data file",
                               s->filename);
        } else {
            s->data_file = s->file;
            ret = 0;
        }
        goto out;
    }
    if (!opt && !s->data_file_name && !vd_opts_get(sub, "filename")) {
        ret = vd_error_set(err, -EINVAL, "%s: Missing data file name in the "
                           "image header and no 'data-file' option",
                           s->filename);
        goto out;
    }
    if (opt) {
        dn = vd_find_node(opt);
        if (!dn) {
            ret = vd_error_set(err, -ENOENT, "Cannot find device='%s' nor "
                               "node-name='%s'", opt, opt);
            goto out;
        }
        if ((flags & VD_NODE_RDWR) && dn->read_only) {
            ret = vd_error_set(err, -EROFS, "Node '%s' is read-only", opt);
            dn = NULL;
            goto out;
        }
        vd_node_ref(dn);
        ret = 0;
    } else {
        /* Options of a new node may name the file; else the header does. */
        path = vd_opts_get(sub, "filename")
               ? NULL : resolve_relative(s->filename, s->data_file_name);
        if (!path && !vd_opts_get(sub, "filename")) {
            ret = vd_error_set(err, -ENOMEM, "%s: out of memory",
                               s->filename);
            goto out;
        }
        ret = vd_node_open(&dn, path, NULL, sub,
                           (flags & ~(VD_NODE_NO_BACKING | VD_NODE_CHECK)) |
                           VD_NODE_PROTOCOL | VD_NODE_NO_BACKING, err);
        if (ret < 0) {
            vd_error_prepend(err, "%s: opening the data file: ",
                             s->filename);
            goto out;
        }
    }
    s->data_file = vd_node_attach_child(node, dn, "data-file",
                                        VD_ROLE_DATA, err);
    if (!s->data_file) {
        vd_node_unref(dn);
        ret = err && err->code ? err->code : -ENOMEM;
    } else if (node->file) {
        /* The guest data lives in the data file; the file holds only
         * metadata (what it lets others do follows from that). */
        node->file->role &= ~VD_ROLE_DATA;
    }
out:
    if (sub && vd_opts_count(sub) && ret == 0) {
        /* Leftover child options are reported by the core as unknown. */
        for (size_t i = 0; i < vd_opts_count(sub); i++) {
            const char *k, *v;
            char key[256];
            vd_opts_nth(sub, i, &k, &v);
            snprintf(key, sizeof(key), "data-file.%s", k);
            vd_opts_set(opts, key, v);
        }
    }
    vd_opts_free(&sub);
    free(opt);
    free(path);
    return ret;
}

static int qcow2_open(vd_node *node, vd_opts *opts, unsigned flags,
                      vd_error *err)
{
    qcow2_state *s = node->opaque;
    uint8_t *hbuf = NULL;
    qcow2_header h;
    int64_t flen;
    uint64_t l2_bytes = 0, rc_bytes = 0, ext_end;
    bool rw = !node->read_only;
    bool lazy;
    int ret;

    memset(s, 0, sizeof(*s));
    s->node = node;
    s->metadata_preallocation = -1;
    s->file = node->file;
    s->data_file = node->file;
    s->filename = node->filename ? node->filename : "qcow2";
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->alloc_cond, NULL);

    flen = vd_node_getlength(s->file->node);
    if (flen < 0) {
        return vd_error_set(err, (int)flen, "%s: cannot get the file length",
                            s->filename);
    }
    memset(&h, 0, sizeof(h));
    if ((uint64_t)flen < QCOW2_V2_HEADER_LEN) {
        return vd_error_set(err, -EINVAL, "Image is not in qcow2 format");
    }
    ret = vd_child_pread(s->file, 0, &h,
                         (uint64_t)flen < sizeof(h) ? (uint64_t)flen
                                                    : sizeof(h), err);
    if (ret < 0) {
        return ret;
    }
    if (be32toh(h.magic) != QCOW2_MAGIC) {
        return vd_error_set(err, -EINVAL, "Image is not in qcow2 format");
    }
    s->version = (int)be32toh(h.version);
    if (s->version < 2 || s->version > 3) {
        return vd_error_set(err, -ENOTSUP, "Unsupported qcow2 version %d",
                            s->version);
    }
    s->cluster_bits = (int)be32toh(h.cluster_bits);
    if (s->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
        s->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
        return vd_error_set(err, -EINVAL, "Unsupported cluster size: 2^%d",
                            s->cluster_bits);
    }
    s->cluster_size = 1ull << s->cluster_bits;

    if (s->version == 2) {
        s->header_length = QCOW2_V2_HEADER_LEN;
        s->refcount_order = 4;
        memset((uint8_t *)&h + QCOW2_V2_HEADER_LEN, 0,
               sizeof(h) - QCOW2_V2_HEADER_LEN);
    } else {
        s->header_length = be32toh(h.header_length);
        s->incompatible_features = be64toh(h.incompatible_features);
        s->compatible_features = be64toh(h.compatible_features);
        s->autoclear_features = be64toh(h.autoclear_features);
        s->refcount_order = (int)be32toh(h.refcount_order);
        if (s->header_length < QCOW2_V3_MIN_HEADER_LEN) {
            return vd_error_set(err, -EINVAL, "%s: qcow2 header too short "
                                "(header_length 0x%x)", s->filename,
                                s->header_length);
        }
        if (s->header_length > s->cluster_size) {
            return vd_error_set(err, -EINVAL, "%s: qcow2 header exceeds "
                                "cluster size (header_length 0x%x)",
                                s->filename, s->header_length);
        }
        if (s->header_length % 8) {
            return vd_error_set(err, -EINVAL, "%s: header_length 0x%x is not "
                                "a multiple of 8", s->filename,
                                s->header_length);
        }
        if (s->header_length <= offsetof(qcow2_header, compression_type)) {
            h.compression_type = 0;
        }
    }
    hbuf = vd_node_blockalign(node, s->cluster_size);
    if (!hbuf) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    memset(hbuf, 0, s->cluster_size);
    ret = vd_child_pread(s->file, 0, hbuf,
                         (uint64_t)flen < s->cluster_size ? (uint64_t)flen
                                                          : s->cluster_size,
                         err);
    if (ret < 0) {
        goto fail;
    }
    if (s->header_length > sizeof(qcow2_header)) {
        s->header_extra_len = s->header_length - (uint32_t)sizeof(qcow2_header);
        s->header_extra = malloc(s->header_extra_len);
        if (!s->header_extra) {
            ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
            goto fail;
        }
        memcpy(s->header_extra, hbuf + sizeof(qcow2_header),
               s->header_extra_len);
    }

    /* Extensions first: the feature name table names unknown bits. */
    s->backing_file = NULL;
    {
        uint64_t bfo = be64toh(h.backing_file_offset);
        uint32_t bfs = be32toh(h.backing_file_size);
        if (bfo) {
            if (bfo > s->cluster_size || bfs > QCOW2_MAX_BACKING_NAME ||
                bfs > s->cluster_size - bfo) {
                ret = vd_error_set(err, -EINVAL, "%s: backing file name at "
                                   "0x%llx (0x%x bytes) is invalid or too "
                                   "long", s->filename,
                                   (unsigned long long)bfo, bfs);
                goto fail;
            }
            ext_end = bfo;
        } else {
            ext_end = s->cluster_size;
        }
        ret = read_extensions(s, hbuf, s->header_length, ext_end, err);
        if (ret < 0) {
            goto fail;
        }
        if (bfo) {
            s->backing_file = dup_string(hbuf + bfo, bfs);
        }
    }

    if (s->incompatible_features & ~QCOW2_INCOMPAT_MASK) {
        report_unsupported(s, s->incompatible_features & ~QCOW2_INCOMPAT_MASK,
                           err);
        ret = -ENOTSUP;
        goto fail;
    }
    if ((s->incompatible_features & QCOW2_INCOMPAT_CORRUPT) && rw &&
        !(flags & VD_NODE_CHECK)) {
        ret = vd_error_set(err, -EROFS, "qcow2: Image is corrupt; cannot be "
                           "opened read/write");
        goto fail;
    }
    if (s->refcount_order < 0 || s->refcount_order > 6) {
        ret = vd_error_set(err, -EINVAL, "%s: Reference count entry width too "
                           "large; may not exceed 64 bits (refcount_order %d)",
                           s->filename, s->refcount_order);
        goto fail;
    }
    s->crypt_method = be32toh(h.crypt_method);
    if (s->crypt_method > QCOW2_CRYPT_LUKS) {
        ret = vd_error_set(err, -EINVAL, "%s: Unsupported encryption method: "
                           "%u", s->filename, s->crypt_method);
        goto fail;
    }
    if (s->crypt_method || s->has_crypto_ext) {
        ret = qcow2_crypt_open(s, opts, flags, err);
        if (ret < 0) {
            goto fail;
        }
    }
    s->compression_type = h.compression_type;
    if (s->compression_type > QCOW2_COMPRESSION_ZSTD) {
        ret = vd_error_set(err, -ENOTSUP, "%s: unknown compression type %d",
                           s->filename, s->compression_type);
        goto fail;
    }
    if ((s->compression_type != QCOW2_COMPRESSION_ZLIB) !=
        !!(s->incompatible_features & QCOW2_INCOMPAT_COMPRESSION)) {
        ret = vd_error_set(err, -EINVAL, "%s: Compression type incompatible "
                           "feature bit must %sbe set", s->filename,
                           s->compression_type ? "" : "not ");
        goto fail;
    }
    s->extended_l2 = (s->incompatible_features & QCOW2_INCOMPAT_EXTL2) != 0;
    if (s->extended_l2 && s->cluster_bits < QCOW2_EXTL2_MIN_CLUSTER_BITS) {
        ret = vd_error_set(err, -EINVAL, "%s: Extended L2 entries are only "
                           "supported with cluster sizes of at least 16384 "
                           "bytes", s->filename);
        goto fail;
    }
    s->data_file_raw = (s->autoclear_features &
                        QCOW2_AUTOCLEAR_DATA_FILE_RAW) != 0;
    if (s->data_file_raw &&
        !(s->incompatible_features & QCOW2_INCOMPAT_DATA_FILE)) {
        ret = vd_error_set(err, -EINVAL, "%s: data-file-raw requires a data "
                           "file", s->filename);
        goto fail;
    }

    /* Geometry */
    s->l2_entry_shift = s->extended_l2 ? 4 : 3;
    s->l2_bits = s->cluster_bits - s->l2_entry_shift;
    s->l2_size = 1ull << s->l2_bits;
    s->subclusters_per_cluster = s->extended_l2 ? QCOW2_EXTL2_SUBCLUSTERS : 1;
    s->subcluster_bits = s->cluster_bits - (s->extended_l2 ? 5 : 0);
    s->subcluster_size = 1ull << s->subcluster_bits;
    s->csize_shift = 62 - (s->cluster_bits - 8);
    s->csize_mask = (1ull << (s->cluster_bits - 8)) - 1;
    s->cluster_offset_mask = (1ull << s->csize_shift) - 1;
    s->refcount_bits = 1 << s->refcount_order;
    s->refcount_max = s->refcount_bits == 64 ? UINT64_MAX
                                             : (1ull << s->refcount_bits) - 1;
    s->refcount_block_bits = s->cluster_bits + 3 - s->refcount_order;
    s->refcount_block_size = 1ull << s->refcount_block_bits;
    s->size = be64toh(h.size);

    /* Refcount table */
    s->refcount_table_offset = be64toh(h.refcount_table_offset);
    {
        uint64_t clusters = be32toh(h.refcount_table_clusters);
        if (clusters == 0 ||
            clusters > QCOW2_MAX_REFTABLE_BYTES / s->cluster_size) {
            ret = vd_error_set(err, -EINVAL, "%s: Reference count table size "
                               "0x%llx clusters is invalid (limit 8 MB)",
                               s->filename, (unsigned long long)clusters);
            goto fail;
        }
        ret = check_table(s, "Reference count table",
                          s->refcount_table_offset,
                          clusters << s->cluster_bits, (uint64_t)flen, err);
        if (ret < 0) {
            goto fail;
        }
        s->refcount_table_size = (uint32_t)((clusters << s->cluster_bits) / 8);
    }

    /* Snapshot table: bounds here, entries in snapshot.c. */
    s->nb_snapshots = be32toh(h.nb_snapshots);
    s->snapshots_offset = be64toh(h.snapshots_offset);
    if (s->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
        ret = vd_error_set(err, -EINVAL, "%s: Too many snapshots (%u)",
                           s->filename, s->nb_snapshots);
        goto fail;
    }
    if (s->nb_snapshots) {
        ret = check_table(s, "Snapshot table", s->snapshots_offset,
                          (uint64_t)s->nb_snapshots * sizeof(qcow2_snapshot_header),
                          (uint64_t)flen, err);
        if (ret == 0) {
            ret = qcow2_read_snapshots(s, (uint64_t)flen,
                                       (flags & VD_NODE_CHECK) ? NULL : err);
        }
        if (ret < 0 && (flags & VD_NODE_CHECK)) {
            /* check reads the table itself and reports what is wrong. */
            s->snapshots_unusable = true;
            ret = 0;
        }
        if (ret < 0) {
            goto fail;
        }
    }

    /* L1 table */
    s->l1_size = be32toh(h.l1_size);
    s->l1_table_offset = be64toh(h.l1_table_offset);
    if ((uint64_t)s->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
        ret = vd_error_set(err, -EFBIG, "%s: Active L1 table too large "
                           "(0x%x entries)", s->filename, s->l1_size);
        goto fail;
    }
    {
        uint64_t per_l1 = s->cluster_size << s->l2_bits;
        uint64_t needed = s->size / per_l1 + (s->size % per_l1 != 0);
        if (s->size > (1ull << 62) || needed > s->l1_size) {
            ret = vd_error_set(err, -EINVAL, "%s: L1 table is too small "
                               "(0x%x entries for size 0x%llx)", s->filename,
                               s->l1_size, (unsigned long long)s->size);
            goto fail;
        }
    }
    if (s->l1_size) {
        ret = check_table(s, "L1 table", s->l1_table_offset,
                          (uint64_t)s->l1_size * 8, (uint64_t)flen, err);
        if (ret < 0) {
            goto fail;
        }
    }
    s->l1_table = calloc(s->l1_size ? s->l1_size : 1, 8);
    if (!s->l1_table) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
        goto fail;
    }
    if (s->l1_size) {
        ret = vd_child_pread(s->file, s->l1_table_offset, s->l1_table,
                             (uint64_t)s->l1_size * 8, err);
        if (ret < 0) {
            goto fail;
        }
        for (uint32_t i = 0; i < s->l1_size; i++) {
            s->l1_table[i] = be64toh(s->l1_table[i]);
        }
    }
    ret = qcow2_refcount_init(s, err);
    if (ret < 0) {
        goto fail;
    }

    /* Options */
    ret = cache_sizes(s, opts, &l2_bytes, &rc_bytes, err);
    if (ret < 0) {
        goto fail;
    }
    ret = vd_opts_take_bool(opts, "lazy-refcounts",
                            (s->compatible_features &
                             QCOW2_COMPAT_LAZY_REFCOUNTS) != 0, &lazy, err);
    if (ret < 0) {
        goto fail;
    }
    if (lazy && s->version < 3) {
        ret = vd_error_set(err, -EINVAL, "%s: Lazy refcounts require a qcow2 "
                           "image with at least qemu 1.1 compatibility level",
                           s->filename);
        goto fail;
    }
    s->lazy_refcounts = lazy;
    {
        bool b;
        s->discard_passthrough[QCOW2_DISCARD_NEVER] = false;
        s->discard_passthrough[QCOW2_DISCARD_ALWAYS] = true;
        ret = vd_opts_take_bool(opts, "pass-discard-request",
                                node->discard_unmap, &b, err);
        s->discard_passthrough[QCOW2_DISCARD_REQUEST] = b;
        if (ret == 0) {
            ret = vd_opts_take_bool(opts, "pass-discard-snapshot", true, &b,
                                    err);
            s->discard_passthrough[QCOW2_DISCARD_SNAPSHOT] = b;
        }
        if (ret == 0) {
            ret = vd_opts_take_bool(opts, "pass-discard-other", false, &b, err);
            s->discard_passthrough[QCOW2_DISCARD_OTHER] = b;
        }
        if (ret < 0) {
            goto fail;
        }
        ret = qcow2_parse_overlap_opts(s, opts, err);
        if (ret < 0) {
            goto fail;
        }
    }
    ret = open_data_file(s, node, opts, flags, err);
    if (ret < 0) {
        goto fail;
    }

    s->l2_cache = qcow2_cache_create(s, "L2", tables_for(s, l2_bytes,
                                                         MIN_L2_CACHE_TABLES),
                                     s->cluster_size);
    s->refcount_cache = qcow2_cache_create(s, "refcount",
                                           tables_for(s, rc_bytes,
                                                      MIN_REFCOUNT_CACHE_TABLES),
                                           s->cluster_size);
    if (!s->l2_cache || !s->refcount_cache) {
        ret = vd_error_set(err, -ENOMEM, "%s: cannot allocate the metadata "
                           "caches", s->filename);
        goto fail;
    }

    if (s->backing_file) {
        free(node->backing_file);
        node->backing_file = strdup(s->backing_file);
        free(node->backing_format);
        node->backing_format = s->backing_format ? strdup(s->backing_format)
                                                 : NULL;
    }

    /* Encrypted data is decrypted by whole 512-byte sectors. */
    node->bl.request_alignment = s->crypt ? 512 : 1;
    node->bl.pdiscard_alignment = (uint32_t)s->cluster_size;
    node->bl.pwrite_zeroes_alignment = (uint32_t)s->subcluster_size;

    if ((s->incompatible_features & QCOW2_INCOMPAT_CORRUPT) && !rw) {
        vd_warn("%s: qcow2: Image is corrupt; opened read-only",
                s->filename);
    }

    /* QEMU loads the bitmaps here (after the snapshot table, before the
     * header update and the dirty repair) on every open, and fails the
     * open with the first fault it finds. */
    if (s->has_bitmaps_ext) {
        ret = qcow2_validate_bitmaps(s, err);
        if (ret < 0) {
            goto fail;
        }
    }

    if (rw && !(flags & VD_NODE_CHECK) && !(flags & VD_NODE_NO_IO)) {
        /* Unknown autoclear bits go, and a stale bitmaps extension is
         * dropped, as QEMU drops them. */
        uint64_t keep = s->autoclear_features & QCOW2_AUTOCLEAR_MASK;
        if (s->autoclear_features != keep || s->stale_bitmaps_ext) {
            /* Written before the first write (qcow2_begin_change()): an
             * open that writes nothing changes nothing. */
            s->autoclear_features = keep;
            s->header_update_pending = true;
        }
        if (s->incompatible_features & QCOW2_INCOMPAT_DIRTY) {
            vd_check_result res;
            ret = qcow2_write_deferred_header(s, err);
            if (ret < 0) {
                goto fail;
            }
            ret = qcow2_check(node, &res,
                              VD_CHECK_FIX_ERRORS | VD_CHECK_FIX_LEAKS, err);
            if (ret == 0 && (res.corruptions || res.check_errors)) {
                ret = vd_error_set(err, -EIO, "%s: could not repair dirty "
                                   "image", s->filename);
            }
            if (ret == 0) {
                pthread_mutex_lock(&s->lock);
                ret = qcow2_mark_clean(s, err);
                pthread_mutex_unlock(&s->lock);
            }
            if (ret < 0) {
                goto fail;
            }
        }
        /* The bitmaps bit stays, as in QEMU, but only if bitmaps_load
         * (bitmap.c) marks the bitmaps in use: until then it is taken
         * away before the first write, so that a session that writes
         * without maintaining the bitmaps leaves them stale. Not before
         * the repair above: QEMU repairs with its bitmaps loaded, and
         * their clusters must be counted, not freed as leaks. */
        if (s->has_bitmaps_ext) {
            s->autoclear_features &= ~QCOW2_AUTOCLEAR_BITMAPS;
            s->bitmaps_autoclear_deferred = true;
            s->header_update_pending = true;
        }
    }
    free(hbuf);
    return 0;

fail:
    free(hbuf);
    free_state(s);
    return ret;
}

static void qcow2_close(vd_node *node)
{
    qcow2_state *s = node->opaque;

    if (!s->l2_cache) {
        return;
    }
    if (!node->read_only) {
        pthread_mutex_lock(&s->lock);
        if (flush_all_caches(s, NULL) == 0 && s->dirty_marked &&
            !s->corrupt) {
            qcow2_mark_clean(s, NULL);
        }
        qcow2_process_discards(s);
        pthread_mutex_unlock(&s->lock);
    }
    /* Also when the node was made read-only since it grew the file: the
     * file may still be writable (a failure leaves a sparse tail). */
    qcow2_trim_grown(s);
    free_state(s);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->alloc_cond);
}

/* ------------------------------------------------------------------ */
/* Request callbacks                                                  */
/* ------------------------------------------------------------------ */

static int qcow2_preadv_cb(vd_node *node, uint64_t off, uint64_t bytes,
                           vd_iov *qiov, unsigned flags, vd_error *err)
{
    (void)flags;
    return qcow2_co_preadv(node->opaque, off, bytes, qiov, 0, err);
}

static int qcow2_pwritev_cb(vd_node *node, uint64_t off, uint64_t bytes,
                            vd_iov *qiov, unsigned flags, vd_error *err)
{
    qcow2_state *s = node->opaque;
    if (s->corrupt) {
        return vd_error_set(err, -EIO, "%s: image is corrupt; writes refused",
                            s->filename);
    }
    return qcow2_co_pwritev(s, off, bytes, qiov, flags, err);
}

static int qcow2_pwrite_zeroes_cb(vd_node *node, uint64_t off, uint64_t bytes,
                                  unsigned flags, vd_error *err)
{
    qcow2_state *s = node->opaque;
    if (s->corrupt) {
        return vd_error_set(err, -EIO, "%s: image is corrupt; writes refused",
                            s->filename);
    }
    return qcow2_co_pwrite_zeroes(s, off, bytes, flags, err);
}

static int qcow2_pdiscard_cb(vd_node *node, uint64_t off, uint64_t bytes,
                             vd_error *err)
{
    qcow2_state *s = node->opaque;
    if (s->corrupt) {
        return vd_error_set(err, -EIO, "%s: image is corrupt; writes refused",
                            s->filename);
    }
    return qcow2_co_pdiscard(s, off, bytes, err);
}

static int qcow2_copy_range_from_cb(vd_node *node, uint64_t soff,
                                    vd_node *dst, uint64_t doff,
                                    uint64_t bytes, unsigned flags,
                                    vd_error *err)
{
    (void)flags;
    return qcow2_co_copy_range_from(node->opaque, soff, dst, doff, bytes,
                                    err);
}

static int qcow2_copy_range_to_cb(vd_node *node, vd_node *src, uint64_t soff,
                                  uint64_t doff, uint64_t bytes,
                                  unsigned flags, vd_error *err)
{
    qcow2_state *s = node->opaque;
    (void)flags;
    if (s->corrupt) {
        return vd_error_set(err, -EIO, "%s: image is corrupt; writes refused",
                            s->filename);
    }
    return qcow2_co_copy_range_to(s, src, soff, doff, bytes, err);
}

static int qcow2_flush_cb(vd_node *node, vd_error *err)
{
    qcow2_state *s = node->opaque;
    int ret;

    if (node->read_only) {
        return 0;
    }
    pthread_mutex_lock(&s->lock);
    /* L2 before refcounts where they depend on each other; cache.c
     * follows the recorded dependencies. The core flushes the file. */
    ret = qcow2_write_caches(s, err);
    pthread_mutex_unlock(&s->lock);
    if (ret == 0 && s->data_file != s->file) {
        ret = vd_node_flush(s->data_file->node, err);
    }
    return ret;
}

static int qcow2_block_status_cb(vd_node *node, bool want_zero, uint64_t off,
                                 uint64_t bytes, uint64_t *pnum,
                                 uint64_t *map, vd_node **file, vd_error *err)
{
    return qcow2_co_block_status(node->opaque, want_zero, off, bytes, pnum,
                                 map, file, err);
}

static int64_t qcow2_getlength(vd_node *node)
{
    qcow2_state *s = node->opaque;
    return (int64_t)s->size;
}

int qcow2_discard_full(qcow2_state *s, uint64_t off, uint64_t bytes,
                       vd_error *err);

static int write_size(qcow2_state *s, uint64_t size, vd_error *err)
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

/* Makes guest [off, off+len) read as zeros, with zero clusters where the
 * version allows and zero buffers elsewhere. */
/* Makes guest [off, off+len) read as zeros, for a grown image.
 * qcow2_co_pwrite_zeroes() takes what the core hands it: whole
 * subclusters, or a piece inside one subcluster. The range is cut the
 * same way here (the old size need not be subcluster-aligned); a piece
 * the driver cannot mark as zeros gets a zero buffer written. */
static int zero_range(qcow2_state *s, uint64_t off, uint64_t len,
                      vd_error *err)
{
    uint64_t sc = s->subcluster_size;
    uint8_t *buf = NULL;
    int ret = 0;

    while (ret == 0 && len > 0) {
        uint64_t n = len;
        if (off & (sc - 1)) {
            n = sc - (off & (sc - 1));
            if (n > len) {
                n = len;
            }
        } else if (len >= sc && off + len != s->size) {
            n = len & ~(sc - 1);
        }
        ret = qcow2_co_pwrite_zeroes(s, off, n, VD_REQ_MAY_UNMAP, err);
        if (ret == -ENOTSUP) {
            uint64_t chunk = 1u << 20, done = 0;
            if (!buf) {
                buf = calloc(1, chunk);
            }
            if (!buf) {
                ret = vd_error_set(err, -ENOMEM, "%s: out of memory",
                                   s->filename);
                break;
            }
            ret = 0;
            while (ret == 0 && done < n) {
                uint64_t m = n - done < chunk ? n - done : chunk;
                vd_iov v;
                vd_iov_init_buf(&v, buf, m);
                ret = qcow2_co_pwritev(s, off + done, m, &v, 0, err);
                done += m;
            }
        }
        off += n;
        len -= n;
    }
    free(buf);
    return ret;
}

/* The refusals of a resize to @size before its first write (also the
 * dry run's, qcow2_truncate_check()); nothing written. */
static int truncate_refusals(qcow2_state *s, uint64_t size,
                             vd_prealloc prealloc, vd_error *err)
{
    uint64_t old = s->size;

    if (size & 511) {
        return vd_error_set(err, -EINVAL, "The new size must be a multiple "
                            "of 512");
    }
    /* v3 snapshots record their own disk size (QEMU 7.2 resizes them). */
    if (s->nb_snapshots && s->version < 3) {
        return vd_error_set(err, -ENOTSUP, "Can't resize a v2 image which "
                            "has snapshots");
    }
    if (size == old) {
        return 0;
    }
    if (size < old && prealloc != VD_PREALLOC_OFF) {
        return vd_error_set(err, -ENOTSUP, "%s: Preallocation can't be used "
                            "for shrinking an image", s->filename);
    }
    /* Beyond QEMU (whose preallocated clusters of an encrypted image read
     * as the decryption of zeros, i.e. garbage): refused. */
    if (s->crypt_method && prealloc != VD_PREALLOC_OFF) {
        return vd_error_set(err, -ENOTSUP, "%s: Preallocation is not "
                            "supported with encryption: the preallocated "
                            "clusters would read as garbage", s->filename);
    }
    /* QEMU resizes consistent bitmaps with the image and refuses while
     * one is marked in use (qcow2_truncate_bitmaps_check()). */
    if (s->inconsistent_bitmap) {
        return vd_error_set(err, -ENOTSUP, "Bitmap '%s' is inconsistent and "
                            "cannot be used", s->inconsistent_bitmap);
    }
    return 0;
}

/* Before the first write of a resize from the current size to @size: the
 * structures it relies on; when shrinking also every L2 table and
 * cluster of the image (the tail is freed, and the file is cut after the
 * last cluster with a refcount: a cluster still in use must not look
 * free). Lock held; nothing written. */
static int truncate_validate(qcow2_state *s, uint64_t size, vd_error *err)
{
    uint64_t old = s->size;
    uint64_t per_l1 = s->cluster_size << s->l2_bits;
    uint64_t l1_needed = size / per_l1 + (size % per_l1 != 0);
    int ret = qcow2_validate_metadata(s, err);

    if (ret == 0 && size < old) {
        int64_t flen = vd_node_getlength(s->file->node);
        ret = qcow2_validate_guest_range(s, 0, old, err);
        for (uint64_t i = l1_needed; ret == 0 && i < s->l1_size; i++) {
            ret = qcow2_validate_l2_table_ref(s, s->l1_table[i], i, 0,
                                              flen < 0 ? 0 : (uint64_t)flen,
                                              err);
        }
    }
    return ret;
}

static int qcow2_truncate_check(vd_node *node, uint64_t size,
                                vd_prealloc prealloc, vd_error *err)
{
    qcow2_state *s = node->opaque;
    int ret = truncate_refusals(s, size, prealloc, err);

    if (ret < 0 || size == s->size) {
        return ret;
    }
    pthread_mutex_lock(&s->lock);
    ret = truncate_validate(s, size, err);
    pthread_mutex_unlock(&s->lock);
    return ret;
}

static int do_truncate(qcow2_state *s, uint64_t size, vd_prealloc prealloc,
                       vd_error *err)
{
    uint64_t old = s->size;
    uint64_t per_l1 = s->cluster_size << s->l2_bits;
    uint64_t l1_needed = size / per_l1 + (size % per_l1 != 0);
    int ret = truncate_refusals(s, size, prealloc, err);

    if (ret < 0 || size == old) {
        return ret;
    }
    pthread_mutex_lock(&s->lock);
    ret = truncate_validate(s, size, err);
    if (ret == 0) {
        ret = qcow2_begin_change(s, err);
    }
    pthread_mutex_unlock(&s->lock);
    if (ret < 0) {
        return ret;
    }
    if (size < old) {
        uint64_t from = (size + s->cluster_size - 1) & ~(s->cluster_size - 1);
        if (from < old) {
            ret = qcow2_discard_full(s, from, old - from, err);
            if (ret < 0) {
                return ret;
            }
        }
        pthread_mutex_lock(&s->lock);
        /* L2 tables wholly past the end are dropped from L1. */
        if (l1_needed < s->l1_size) {
            vd_node_debug_event(s->file->node,
                                VD_BLKDBG_L1_SHRINK_WRITE_TABLE);
        }
        for (uint64_t i = l1_needed; i < s->l1_size; i++) {
            uint64_t l2 = s->l1_table[i] & QCOW2_L1E_OFFSET_MASK;
            if (!l2) {
                continue;
            }
            s->l1_table[i] = 0;
            qcow2_overlap_changed(s);
            ret = qcow2_write_l1_entry(s, i, err);
            if (ret < 0) {
                pthread_mutex_unlock(&s->lock);
                return ret;
            }
            vd_node_debug_event(s->file->node,
                                VD_BLKDBG_L1_SHRINK_FREE_L2_CLUSTERS);
            qcow2_free_clusters(s, l2, s->cluster_size, QCOW2_DISCARD_ALWAYS,
                                NULL);
        }
        ret = qcow2_flush_caches(s, err);
        if (ret == 0) {
            /* Refcount blocks that count nothing any more go too (after
             * the L2 and L1 changes above are on disk). */
            ret = qcow2_shrink_reftable(s, err);
        }
        if (ret == 0) {
            ret = qcow2_flush_caches(s, err);
        }
        if (ret == 0) {
            ret = write_size(s, size, err);
        }
        qcow2_process_discards(s);
        if (ret == 0) {
            /* Give a free tail of the file back, as QEMU does; failing
             * to is harmless (the clusters stay free). */
            int64_t flen = vd_node_getlength(s->file->node);
            uint64_t last = flen > 0 ? qcow2_size_to_clusters(s, flen) : 0;
            while (last > 0) {
                uint64_t rc = 1;
                if (qcow2_get_refcount(s, last - 1, &rc, NULL) < 0 || rc) {
                    break;
                }
                last--;
            }
            if (flen > 0 && (last << s->cluster_bits) < (uint64_t)flen) {
                if (vd_node_truncate(s->file->node, last << s->cluster_bits,
                                     false, VD_PREALLOC_OFF, NULL) == 0) {
                    if (s->alloc_end > last) {
                        s->alloc_end = last;
                    }
                    if (s->free_cluster_index > last) {
                        s->free_cluster_index = last;
                    }
                }
            }
        }
        pthread_mutex_unlock(&s->lock);
        return ret;
    }

    pthread_mutex_lock(&s->lock);
    if (l1_needed * 8 > QCOW2_MAX_L1_BYTES) {
        /* QEMU's words (its qcow2_grow_l1_table() says only -EFBIG). */
        ret = vd_error_set(err, -EFBIG, "Failed to grow the L1 table: %s",
                           strerror(EFBIG));
    } else {
        ret = qcow2_grow_l1_table(s, l1_needed, true, err);
    }
    if (ret == 0) {
        ret = qcow2_flush_caches(s, err);
    }
    pthread_mutex_unlock(&s->lock);
    if (ret < 0) {
        return ret;
    }
    if (prealloc != VD_PREALLOC_OFF) {
        ret = qcow2_preallocate(s, old, size - old, prealloc, err);
        if (ret < 0) {
            return ret;
        }
    }
    pthread_mutex_lock(&s->lock);
    ret = write_size(s, size, err);
    pthread_mutex_unlock(&s->lock);
    if (ret == 0 && prealloc == VD_PREALLOC_OFF) {
        /* The new range must read as zeros: neither stale bytes of a
         * partial last cluster nor a longer backing file may show
         * through. QEMU 7.2 zeroes it only for a longer backing file,
         * refuses where its zero flags cannot (v2, part of a compressed
         * cluster), and lets what a shrink cut off show again: both
         * differences are kept on purpose (docs/qcow2.md, Findings). */
        vd_node *b = s->node->backing ? s->node->backing->node : NULL;
        bool shows = b && vd_node_getlength(b) > (int64_t)old;
        uint64_t zend = shows ? size
                        : (old + s->cluster_size - 1) & ~(s->cluster_size - 1);
        if (zend > size) {
            zend = size;
        }
        if (zend > old) {
            ret = zero_range(s, old, zend - old, err);
        }
    }
    return ret;
}

static int qcow2_truncate_cb(vd_node *node, uint64_t size, bool exact,
                             vd_prealloc prealloc, vd_error *err)
{
    (void)exact;
    return do_truncate(node->opaque, size, prealloc, err);
}

static int qcow2_check_cb(vd_node *node, vd_check_result *res, unsigned fix,
                          vd_error *err)
{
    return qcow2_check(node, res, fix, err);
}

/* ------------------------------------------------------------------ */
/* Info                                                               */
/* ------------------------------------------------------------------ */

static char *json_escape(const char *in)
{
    size_t n = strlen(in);
    char *out = malloc(n * 6 + 1), *p = out;
    if (!out) {
        return NULL;
    }
    for (const unsigned char *c = (const unsigned char *)in; *c; c++) {
        if (*c == '"' || *c == '\\') {
            *p++ = '\\';
            *p++ = (char)*c;
        } else if (*c < 0x20) {
            p += sprintf(p, "\\u%04x", *c);
        } else {
            *p++ = (char)*c;
        }
    }
    *p = 0;
    return out;
}

/* The "bitmaps" member of the format-specific data, as QEMU's
 * qcow2_get_bitmap_info_list() reads it from the directory on disk
 * (flags "in-use" then "auto"); "" without bitmaps. NULL on error. */
static char *bitmaps_json(qcow2_state *s, vd_error *err)
{
    uint32_t n = qcow2_bitmaps_valid(s) ? s->bitmaps_ext.nb_bitmaps : 0;
    qcow2_bitmap_info *bm = NULL;
    char *out = NULL;
    size_t len = 0;
    FILE *f;

    if (n == 0) {
        return strdup("");
    }
    pthread_mutex_lock(&s->lock);
    if (qcow2_bitmap_list_load(s, &bm, err) < 0) {
        pthread_mutex_unlock(&s->lock);
        return NULL;
    }
    pthread_mutex_unlock(&s->lock);
    f = open_memstream(&out, &len);
    if (f) {
        fputs("\"bitmaps\": [", f);
        for (uint32_t i = 0; i < n; i++) {
            char *esc = json_escape(bm[i].name);
            fprintf(f, "%s{\"flags\": [%s%s%s], \"name\": \"%s\", "
                    "\"granularity\": %llu}", i ? ", " : "",
                    (bm[i].flags & 1) ? "\"in-use\"" : "",
                    (bm[i].flags & 3) == 3 ? ", " : "",
                    (bm[i].flags & 2) ? "\"auto\"" : "",
                    esc ? esc : "", 1ULL << bm[i].granularity_bits);
            free(esc);
        }
        fputs("], ", f);
        fclose(f);
    }
    qcow2_bitmap_list_free(bm, n);
    if (!out) {
        vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    return out;
}

/* The metadata caches' size and hit counts, which QEMU does not report:
 * query-blockstats shows them as x-vdisk members of driver-specific. */
static int qcow2_get_driver_stats(vd_node *node, vd_driver_stats *out)
{
    qcow2_state *s = node->opaque;

    pthread_mutex_lock(&s->lock);
    out->has_cache = true;
    if (s->l2_cache) {
        out->l2_cache_bytes = (uint64_t)s->l2_cache->size *
                              s->l2_cache->table_size;
        out->l2_cache_hits = s->l2_cache->hits;
        out->l2_cache_misses = s->l2_cache->misses;
    }
    if (s->refcount_cache) {
        out->refcount_cache_bytes = (uint64_t)s->refcount_cache->size *
                                    s->refcount_cache->table_size;
        out->refcount_cache_hits = s->refcount_cache->hits;
        out->refcount_cache_misses = s->refcount_cache->misses;
    }
    pthread_mutex_unlock(&s->lock);
    return 0;
}

static int qcow2_get_info(vd_node *node, vd_image_info *info, vd_error *err)
{
    qcow2_state *s = node->opaque;
    const char *ctype = s->compression_type == QCOW2_COMPRESSION_ZSTD ?
                        "zstd" : "zlib";
    char *json = NULL, *enc = NULL;
    int n;

    info->cluster_size = s->cluster_size;
    /* The VM state lives right after the guest-visible L1 range. */
    info->vm_state_offset = qcow2_vm_state_offset(s);
    info->has_dirty_flag = true;
    info->dirty_flag = (s->incompatible_features & QCOW2_INCOMPAT_DIRTY) != 0;
    info->encrypted = s->crypt_method != 0;
    if (s->crypt) {
        /* "encrypt" goes in front of the other members (the tools print
         * them in QEMU's QDict order anyway). */
        char *c = qcow2_crypt_info_json(s);
        n = c ? asprintf(&enc, "\"encrypt\": %s, ", c) : -1;
        free(c);
        if (n < 0) {
            return vd_error_set(err, -ENOMEM, "%s: out of memory",
                                s->filename);
        }
    }
    if (s->version == 2) {
        n = asprintf(&json, "{\"type\": \"qcow2\", \"data\": {%s\"compat\": "
                     "\"0.10\", \"compression-type\": \"%s\", "
                     "\"refcount-bits\": %d}}", enc ? enc : "", ctype,
                     s->refcount_bits);
    } else {
        char *df = NULL, *bm = bitmaps_json(s, err);
        if (!bm) {
            return -EINVAL;
        }
        if (s->data_file_name || s->data_file != s->file) {
            char *esc = json_escape(s->data_file_name ? s->data_file_name
                                    : vd_node_filename(s->data_file->node));
            if (!esc || asprintf(&df, "\"data-file\": \"%s\", "
                                 "\"data-file-raw\": %s, ", esc,
                                 s->data_file_raw ? "true" : "false") < 0) {
                df = NULL;
            }
            free(esc);
        }
        n = asprintf(&json, "{\"type\": \"qcow2\", \"data\": {%s\"compat\": "
                     "\"1.1\", \"compression-type\": \"%s\", "
                     "\"lazy-refcounts\": %s, %s\"refcount-bits\": %d, "
                     "%s\"corrupt\": %s, \"extended-l2\": %s}}",
                     enc ? enc : "", ctype,
                     (s->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS) ?
                     "true" : "false", bm, s->refcount_bits, df ? df : "",
                     (s->incompatible_features & QCOW2_INCOMPAT_CORRUPT) ?
                     "true" : "false", s->extended_l2 ? "true" : "false");
        free(df);
        free(bm);
    }
    free(enc);
    if (n < 0) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    free(info->format_specific_json);
    info->format_specific_json = json;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Create                                                             */
/* ------------------------------------------------------------------ */

/* The options creation and amend share, in QEMU's order (its
 * QCOW_COMMON_OPTIONS): one description for qemu-img create's listing
 * and Formatting line and for amend's listing. */
#define QCOW2_COMMON_OPTIONS \
    { "size", "size", "Virtual disk size", NULL }, \
    { "compat", "string", "Compatibility level (v2 [0.10] or v3 [1.1])", \
      NULL }, \
    { "backing_file", "string", "File name of a base image", NULL }, \
    { "backing_fmt", "string", "Image format of the base image", NULL }, \
    { "data_file", "string", "File name of an external data file", NULL }, \
    { "data_file_raw", "bool", \
      "The external data file must stay valid as a raw image", NULL }, \
    { "lazy_refcounts", "bool", "Postpone refcount updates", "off" }, \
    { "refcount_bits", "number", "Width of a reference count entry in bits", \
      "16" }

/* In the order of QEMU's qcow2_amend_opts (amend walks them in this
 * order; qemu-img amend -o help lists them by name). */
const vd_create_option qcow2_amend_opts[] = {
    { "encrypt.state", "string",
      "Select new state of affected keyslots (active/inactive)", NULL },
    { "encrypt.keyslot", "number",
      "Select a single keyslot to modify explicitly", NULL },
    { "encrypt.old-secret", "string",
      "Select all keyslots that match this password", NULL },
    { "encrypt.new-secret", "string",
      "New secret to set in the matching keyslots. Empty string to erase",
      NULL },
    { "encrypt.iter-time", "number",
      "Time to spend in PBKDF in milliseconds", NULL },
    QCOW2_COMMON_OPTIONS,
    { NULL, NULL, NULL, NULL },
};

/* In the order of QEMU's qcow2_create_opts, which is the order of qemu-img
 * create's "Formatting ..." line; @def is QEMU's def_value_str, the value
 * that line shows for an option not given (-o help lists by name). */
static const vd_create_option qcow2_create_opts[] = {
    { "encryption", "bool",
      "Encrypt the image with format 'aes'. (Deprecated in favor of "
      "encrypt.format=aes)", NULL },
    { "encrypt.format", "string",
      "Encrypt the image, format choices: 'aes', 'luks'", NULL },
    { "encrypt.key-secret", "string",
      "ID of secret providing qcow AES key or LUKS passphrase", NULL },
    { "encrypt.cipher-alg", "string", "Name of encryption cipher algorithm",
      NULL },
    { "encrypt.cipher-mode", "string", "Name of encryption cipher mode",
      NULL },
    { "encrypt.ivgen-alg", "string", "Name of IV generator algorithm", NULL },
    { "encrypt.ivgen-hash-alg", "string",
      "Name of IV generator hash algorithm", NULL },
    { "encrypt.hash-alg", "string", "Name of encryption hash algorithm",
      NULL },
    { "encrypt.iter-time", "number",
      "Time to spend in PBKDF in milliseconds", NULL },
    { "cluster_size", "size", "qcow2 cluster size", "65536" },
    { "extended_l2", "bool", "Extended L2 tables", "off" },
    { "preallocation", "string",
      "Preallocation mode (allowed values: off, metadata, falloc, full)",
      NULL },
    { "compression_type", "string",
      "Compression method used for image cluster compression", "zlib" },
    QCOW2_COMMON_OPTIONS,
    { NULL, NULL, NULL, NULL },
};

typedef struct create_params {
    uint64_t size;
    bool has_size;
    int version;
    uint64_t cluster_size;
    vd_prealloc prealloc;
    bool lazy_refcounts;
    int refcount_order;
    int compression_type;
    bool extended_l2;
    bool data_file_raw;
    char *backing_file;
    char *backing_fmt;
    char *data_file;
    bool encrypt;               /* encrypt.format=luks */
    vd_luks_create_opts luks;
} create_params;

static void free_params(create_params *p)
{
    vd_luks_create_opts_free(&p->luks);
    free(p->backing_file);
    free(p->backing_fmt);
    free(p->data_file);
}

/* A QAPI enum member of BlockdevCreateOptionsQcow2 given as -o @key:
 * QEMU's visitor refuses other values as "Parameter 'qapi-name' does
 * not accept value 'v'". @values[i] (NULL-terminated) maps to @ids[i]. */
static int take_qapi_enum(vd_opts *opts, const char *key,
                          const char *qapi_name, const char *const *values,
                          const int *ids, int def, int *out,
                          const char *filename, vd_error *err)
{
    char *v = vd_opts_take(opts, key);

    *out = def;
    if (!v) {
        return 0;
    }
    for (int i = 0; values[i]; i++) {
        if (!strcmp(v, values[i])) {
            *out = ids[i];
            free(v);
            return 0;
        }
    }
    vd_error_set(err, -EINVAL, "%s: Parameter '%s' does not accept value "
                 "'%s'", filename, qapi_name, v);
    free(v);
    return -EINVAL;
}

/*
 * The encryption options of BlockdevCreateOptionsQcow2 (its "encrypt"
 * member), as qcow2_co_create_opts() and QEMU's visitor take them:
 * "encryption" is the deprecated alias of encrypt.format=aes. LUKS is
 * created (crypt.c); the legacy AES is refused, as vdisk never creates
 * it (qemu-img 7.2 still does: its sector IVs and single passphrase-
 * derived key are QEMU's deprecated format, refused by its system
 * emulators).
 */
static int take_encrypt(const char *filename, vd_opts *opts,
                        create_params *p, vd_error *err)
{
    bool alias = vd_opts_get(opts, "encryption") != NULL, on = false;
    char *fmt;
    int ret;

    ret = vd_opts_take_bool(opts, "encryption", false, &on, err);
    if (ret < 0) {
        return ret;
    }
    fmt = vd_opts_take(opts, "encrypt.format");
    if (alias && fmt) {
        free(fmt);
        return vd_error_set(err, -EINVAL, "%s: 'encrypt.format' and its "
                            "alias 'encryption' can't be used at the same "
                            "time", filename);
    }
    if (on || (fmt && !strcmp(fmt, "aes"))) {
        free(fmt);
        return vd_error_set(err, -ENOTSUP, "%s: vdisk does not create qcow2 "
                            "images with the legacy AES encryption "
                            "(encrypt.format=aes, which QEMU no longer opens "
                            "in system emulators): use encrypt.format=luks",
                            filename);
    }
    if (fmt && strcmp(fmt, "luks") != 0) {
        vd_error_set(err, -EINVAL, "%s: Parameter 'format' does not accept "
                     "value '%s'", filename, fmt);
        free(fmt);
        return -EINVAL;
    }
    if (!fmt) {
        for (size_t i = 0; i < vd_opts_count(opts); i++) {
            const char *k, *v;
            vd_opts_nth(opts, i, &k, &v);
            if (!strncmp(k, "encrypt.", 8)) {
                return vd_error_set(err, -EINVAL, "%s: Parameter "
                                    "'encrypt.format' is missing", filename);
            }
        }
        return 0;
    }
    free(fmt);
    p->encrypt = true;
    ret = vd_luks_create_opts_take(opts, "encrypt.", &p->luks, err);
    if (ret < 0) {
        vd_error_prepend(err, "%s: ", filename);
    }
    return ret;
}

/*
 * The creation options, after vd_create() checked their names and value
 * syntax: the members of QEMU's BlockdevCreateOptionsQcow2 in the order
 * its visitor takes them (data-file-raw, extended-l2, size, version,
 * backing-file, backing-fmt, encrypt, cluster-size, preallocation,
 * lazy-refcounts, refcount-bits, compression-type), then the checks of
 * qcow2_co_create() that combine them.
 */
static int parse_create(const char *filename, vd_opts *opts, create_params *p,
                        vd_error *err)
{
    static const char *const prealloc_names[] = {
        "off", "metadata", "falloc", "full", NULL,
    };
    static const int prealloc_ids[] = {
        VD_PREALLOC_OFF, VD_PREALLOC_METADATA, VD_PREALLOC_FALLOC,
        VD_PREALLOC_FULL,
    };
    static const char *const versions[] = { "0.10", "v2", "1.1", "v3", NULL };
    static const int version_ids[] = { 2, 2, 3, 3 };
    static const char *const ctypes[] = { "zlib", "zstd", NULL };
    static const int ctype_ids[] = { QCOW2_COMPRESSION_ZLIB,
                                     QCOW2_COMPRESSION_ZSTD };
    char *v;
    uint64_t u;
    int idx, ret;

    memset(p, 0, sizeof(*p));
    p->data_file = vd_opts_take(opts, "data_file");
    ret = vd_opts_take_bool(opts, "data_file_raw", false, &p->data_file_raw,
                            err);
    if (ret == 0) {
        ret = vd_opts_take_bool(opts, "extended_l2", false, &p->extended_l2,
                                err);
    }
    if (ret < 0) {
        return ret;
    }
    v = vd_opts_take(opts, "size");
    if (v) {
        int r = vd_parse_size(v, &p->size);
        if (r == -ERANGE) {
            /* 2^63 and up: the words of src/core/opts.c and the tools. */
            vd_error_set(err, -EINVAL, "%s: Value '%s' is out of range for "
                         "parameter 'size'", filename, v);
        } else if (r < 0) {
            vd_error_set(err, -EINVAL, "%s: Parameter 'size' expects a "
                         "non-negative number below 2^64", filename);
        }
        if (r < 0) {
            free(v);
            return -EINVAL;
        }
        p->has_size = true;
        free(v);
        /* QEMU rounds the virtual size up to whole sectors. */
        p->size = (p->size + 511) & ~511ull;
    }
    ret = take_qapi_enum(opts, "compat", "version", versions, version_ids, 3,
                         &p->version, filename, err);
    if (ret < 0) {
        return ret;
    }
    p->backing_file = vd_opts_take(opts, "backing_file");
    p->backing_fmt = vd_opts_take(opts, "backing_fmt");
    ret = vd_create_check_backing_fmt(filename, p->backing_file,
                                      p->backing_fmt, p->has_size, err);
    if (ret < 0) {
        return ret;
    }
    ret = take_encrypt(filename, opts, p, err);
    if (ret < 0) {
        return ret;
    }
    ret = vd_opts_take_size(opts, "cluster_size", 65536, &p->cluster_size,
                            err);
    if (ret < 0) {
        return ret;
    }
    ret = take_qapi_enum(opts, "preallocation", "preallocation",
                         prealloc_names, prealloc_ids, VD_PREALLOC_OFF, &idx,
                         filename, err);
    if (ret < 0) {
        return ret;
    }
    p->prealloc = (vd_prealloc)idx;
    ret = vd_opts_take_bool(opts, "lazy_refcounts", false, &p->lazy_refcounts,
                            err);
    if (ret < 0) {
        return ret;
    }
    ret = vd_opts_take_uint(opts, "refcount_bits", 16, &u, err);
    if (ret < 0) {
        return ret;
    }
    ret = take_qapi_enum(opts, "compression_type", "compression-type", ctypes,
                         ctype_ids, QCOW2_COMPRESSION_ZLIB,
                         &p->compression_type, filename, err);
    if (ret < 0) {
        return ret;
    }
    /* qcow2_co_create()'s checks, in its order and words. */
    if (p->extended_l2 && p->version < 3) {
        return vd_error_set(err, -EINVAL, "%s: Extended L2 entries are only "
                            "supported with compatibility level 1.1 and "
                            "above (use version=v3 or greater)", filename);
    }
    if (p->cluster_size < 512 || p->cluster_size > (2u << 20) ||
        (p->cluster_size & (p->cluster_size - 1))) {
        return vd_error_set(err, -EINVAL, "%s: Cluster size must be a power "
                            "of two between 512 and 2048k", filename);
    }
    if (p->extended_l2 && p->cluster_size < 16384) {
        return vd_error_set(err, -EINVAL, "%s: Extended L2 entries are only "
                            "supported with cluster sizes of at least 16384 "
                            "bytes", filename);
    }
    if (p->backing_file && p->prealloc != VD_PREALLOC_OFF &&
        !p->extended_l2) {
        return vd_error_set(err, -EINVAL, "%s: Backing file and preallocation "
                            "can only be used at the same time if "
                            "extended_l2 is on", filename);
    }
    if (p->backing_fmt && !p->backing_file) {
        return vd_error_set(err, -EINVAL, "%s: Backing format cannot be used "
                            "without backing file", filename);
    }
    if (p->lazy_refcounts && p->version < 3) {
        return vd_error_set(err, -EINVAL, "%s: Lazy refcounts only supported "
                            "with compatibility level 1.1 and above (use "
                            "version=v3 or greater)", filename);
    }
    if (u == 0 || u > 64 || (u & (u - 1))) {
        return vd_error_set(err, -EINVAL, "%s: Refcount width must be a "
                            "power of two and may not exceed 64 bits",
                            filename);
    }
    p->refcount_order = __builtin_ctzll(u);
    if (p->refcount_order != 4 && p->version < 3) {
        return vd_error_set(err, -EINVAL, "%s: Different refcount widths than "
                            "16 bits require compatibility level 1.1 or above "
                            "(use version=v3 or greater)", filename);
    }
    if (p->data_file_raw && !p->data_file) {
        return vd_error_set(err, -EINVAL, "%s: data-file-raw requires "
                            "data-file", filename);
    }
    if (p->data_file_raw && p->backing_file) {
        return vd_error_set(err, -EINVAL, "%s: Backing file and "
                            "data-file-raw cannot be used at the same time",
                            filename);
    }
    if (p->data_file && p->version < 3) {
        return vd_error_set(err, -EINVAL, "%s: External data files are only "
                            "supported with compatibility level 1.1 and "
                            "above (use version=v3 or greater)", filename);
    }
    if (p->compression_type != QCOW2_COMPRESSION_ZLIB && p->version < 3) {
        return vd_error_set(err, -EINVAL, "%s: Non-zlib compression type is "
                            "only supported with compatibility level 1.1 and "
                            "above (use version=v3 or greater)", filename);
    }
    /* Beyond QEMU, which preallocates before it sets up encryption: the
     * preallocated clusters would read as the decryption of zeros. */
    if (p->encrypt && p->prealloc != VD_PREALLOC_OFF) {
        return vd_error_set(err, -ENOTSUP, "%s: Preallocation is not "
                            "supported with encryption: the preallocated "
                            "clusters would read as garbage (qemu-img 7.2 "
                            "makes such images)", filename);
    }
    /* The secret and the cipher choices, before the file exists (QEMU
     * finds them after it made the image). */
    if (p->encrypt) {
        ret = vd_luks_create_check(&p->luks, "encrypt.", err);
        if (ret < 0) {
            vd_error_prepend(err, "%s: ", filename);
            return ret;
        }
    }
    /* Refused before anything is written: qemu-img creates the file and
     * only then fails to store the name (qcow2.txt: at most 1023 bytes). */
    if (p->backing_file && strlen(p->backing_file) > QCOW2_MAX_BACKING_NAME) {
        return vd_error_set(err, -EINVAL, "%s: Could not assign backing file "
                            "'%s' with format '%s': Invalid argument",
                            filename, p->backing_file,
                            p->backing_fmt ? p->backing_fmt : "");
    }
    return 0;
}

/* Size of the backing file when the caller gave none. */
static int backing_size(const char *filename, create_params *p, vd_error *err)
{
    char *path = resolve_relative(filename, p->backing_file);
    vd_node *bn = NULL;
    vd_opts *o = vd_opts_new();
    int64_t len;
    int ret;

    if (!path || !o) {
        free(path);
        vd_opts_free(&o);
        return vd_error_set(err, -ENOMEM, "%s: out of memory", filename);
    }
    ret = vd_node_open(&bn, path,
                       p->backing_fmt ? vd_find_driver(p->backing_fmt) : NULL,
                       o, VD_NODE_NO_BACKING | VD_NODE_QUIET |
                       VD_NODE_FORCE_SHARE, err);
    vd_opts_free(&o);
    free(path);
    if (ret < 0) {
        vd_error_prepend(err, "%s: Could not open backing image: ", filename);
        return ret;
    }
    len = vd_node_getlength(bn);
    vd_node_unref(bn);
    if (len < 0) {
        return vd_error_set(err, (int)len, "%s: cannot get the backing file "
                            "size", filename);
    }
    p->size = (uint64_t)len;
    p->has_size = true;
    return 0;
}

static int qcow2_create(const char *filename, vd_opts *opts, vd_error *err)
{
    create_params p;
    vd_opts *popts = NULL;
    vd_node *file = NULL, *img = NULL;
    uint8_t *buf = NULL;
    int cluster_bits;
    uint64_t cs;
    int ret;

    ret = parse_create(filename, opts, &p, err);
    if (ret < 0) {
        goto out;
    }
    if (!p.has_size && p.backing_file) {
        ret = backing_size(filename, &p, err);
        if (ret < 0) {
            goto out;
        }
    }
    if (!p.has_size) {
        ret = vd_error_set(err, -EINVAL, "%s: Image creation needs a size "
                           "parameter", filename);
        goto out;
    }
    /* qemu sizes a new image with a truncate (the size is already
     * rounded to sectors): the same limits in the same order. */
    if (p.size > INT64_MAX) {
        ret = vd_error_set(err, -EINVAL, "%s: Could not resize image: Image "
                           "size cannot be negative", filename);
        goto out;
    }
    if (p.size > VD_MAX_LENGTH) {
        ret = vd_error_set(err, -EIO, "%s: Could not resize image: offset(%"
                           PRIu64 ") exceeds maximum(%" PRIu64 ")", filename,
                           p.size, VD_MAX_LENGTH);
        goto out;
    }
    cs = p.cluster_size;
    cluster_bits = __builtin_ctzll(cs);
    {
        /* L1 must fit QEMU's 32 MB limit. */
        uint64_t l2_entries = cs >> (p.extended_l2 ? 4 : 3);
        uint64_t per_l1 = cs * l2_entries;
        uint64_t l1 = p.size / per_l1 + (p.size % per_l1 != 0);
        if (l1 * 8 > QCOW2_MAX_L1_BYTES) {
            ret = vd_error_set(err, -EFBIG, "%s: Could not resize image: "
                               "Image size is too large for this cluster "
                               "size", filename);
            goto out;
        }
    }

    /* The protocol file: the rest of @opts (nocow, extent_size_hint) is
     * for it; the size is set by preallocation below. */
    popts = vd_opts_clone(opts);
    if (!popts) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", filename);
        goto out;
    }
    vd_opts_set(popts, "size", "0");
    ret = vd_create_protocol(filename, popts, err);
    if (ret < 0) {
        goto out;
    }
    for (const char *k = vd_opts_first_key(opts); k;
         k = vd_opts_first_key(opts)) {
        vd_opts_del(opts, k);
    }
    if (p.data_file) {
        vd_opts *d = vd_opts_new();
        char *dpath = resolve_relative(filename, p.data_file);
        if (!d || !dpath) {
            vd_opts_free(&d);
            free(dpath);
            ret = vd_error_set(err, -ENOMEM, "%s: out of memory", filename);
            goto out;
        }
        {
            /* QEMU sizes the data file like the guest disk. */
            char sz[32];
            snprintf(sz, sizeof(sz), "%llu", (unsigned long long)p.size);
            vd_opts_set(d, "size", sz);
        }
        ret = vd_create_protocol(dpath, d, err);
        vd_opts_free(&d);
        free(dpath);
        if (ret < 0) {
            goto out;
        }
    }
    ret = vd_open_protocol(&file, filename, VD_NODE_RDWR, err);
    if (ret < 0) {
        goto out;
    }

    /* Header, refcount table (cluster 1) and first refcount block
     * (cluster 2) covering the first three clusters, as QEMU lays it out;
     * L1 and the rest come from the driver itself below. */
    buf = vd_node_blockalign(file, 3 * cs);
    if (!buf) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", filename);
        goto out;
    }
    memset(buf, 0, 3 * cs);
    {
        qcow2_header h;
        qcow2_state tmp;
        memset(&h, 0, sizeof(h));
        h.magic = htobe32(QCOW2_MAGIC);
        h.version = htobe32((uint32_t)p.version);
        h.cluster_bits = htobe32((uint32_t)cluster_bits);
        h.refcount_table_offset = htobe64(cs);
        h.refcount_table_clusters = htobe32(1);
        if (p.version >= 3) {
            uint64_t incompat = 0;
            if (p.data_file) {
                incompat |= QCOW2_INCOMPAT_DATA_FILE;
            }
            if (p.compression_type != QCOW2_COMPRESSION_ZLIB) {
                incompat |= QCOW2_INCOMPAT_COMPRESSION;
            }
            if (p.extended_l2) {
                incompat |= QCOW2_INCOMPAT_EXTL2;
            }
            h.incompatible_features = htobe64(incompat);
            h.compatible_features =
                htobe64(p.lazy_refcounts ? QCOW2_COMPAT_LAZY_REFCOUNTS : 0);
            h.autoclear_features =
                htobe64(p.data_file_raw ? QCOW2_AUTOCLEAR_DATA_FILE_RAW : 0);
            h.refcount_order = htobe32((uint32_t)p.refcount_order);
            h.header_length = htobe32(sizeof(qcow2_header));
            h.compression_type = (uint8_t)p.compression_type;
            memcpy(buf, &h, sizeof(h));
        } else {
            memcpy(buf, &h, QCOW2_V2_HEADER_LEN);
        }
        *(uint64_t *)(buf + cs) = htobe64(2 * cs);
        memset(&tmp, 0, sizeof(tmp));
        tmp.refcount_order = p.refcount_order;
        for (int i = 0; i < 3; i++) {
            qcow2_refblock_set(&tmp, buf + 2 * cs, (uint64_t)i, 1);
        }
    }
    {
        vd_iov v;
        vd_iov_init_buf(&v, buf, 3 * cs);
        ret = vd_node_pwritev(file, 0, 3 * cs, &v, 0, err);
    }
    if (ret == 0) {
        ret = vd_node_flush(file, err);
    }
    vd_node_unref(file);
    file = NULL;
    if (ret < 0) {
        goto out;
    }

    /* Open what we wrote and let the driver do the rest: extensions,
     * backing file, L1 table, preallocation. */
    {
        vd_opts *o = vd_opts_new();
        if (!o) {
            ret = vd_error_set(err, -ENOMEM, "%s: out of memory", filename);
            goto out;
        }
        if (p.data_file) {
            char *dpath = resolve_relative(filename, p.data_file);
            /* A new node, not a reference to an existing one. */
            vd_opts_set(o, "data-file.driver", "file");
            vd_opts_set(o, "data-file.filename", dpath ? dpath : p.data_file);
            free(dpath);
        }
        ret = vd_node_open(&img, filename, &vd_driver_qcow2, o,
                           VD_NODE_RDWR | VD_NODE_NO_BACKING | VD_NODE_QUIET,
                           err);
        vd_opts_free(&o);
        if (ret < 0) {
            goto out;
        }
    }
    {
        qcow2_state *s = img->opaque;
        pthread_mutex_lock(&s->lock);
        if (p.backing_file) {
            s->backing_file = strdup(p.backing_file);
            s->backing_format = p.backing_fmt ? strdup(p.backing_fmt) : NULL;
        }
        if (p.data_file) {
            s->data_file_name = strdup(p.data_file);
        }
        ret = qcow2_update_header(s, err);
        pthread_mutex_unlock(&s->lock);
        if (ret == 0) {
            ret = do_truncate(s, p.size, p.prealloc, err);
        }
        /* After the size, as qcow2_co_create(): the LUKS header goes
         * after the L1 table. */
        if (ret == 0 && p.encrypt) {
            ret = qcow2_crypt_create(s, &p.luks, err);
            if (ret < 0) {
                vd_error_prepend(err, "%s: ", filename);
            }
        }
    }
    if (ret == 0) {
        ret = vd_node_flush(img, err);
    }

out:
    if (img) {
        vd_node_unref(img);
    }
    if (file) {
        vd_node_unref(file);
    }
    vd_opts_free(&popts);
    free(buf);
    free_params(&p);
    return ret;
}

/* ------------------------------------------------------------------ */
/* Backing chain                                                      */
/* ------------------------------------------------------------------ */

/*
 * Records a new backing file name and format. The whole header cluster is
 * rewritten in one write, as qcow2_update_header always does, so a crash
 * leaves either the old or the new header; the name must fit the spec's
 * 1023 bytes and, with the extensions, the first cluster. Node drained.
 */
static int qcow2_change_backing_file(vd_node *node, const char *backing,
                                     const char *backing_fmt, vd_error *err)
{
    qcow2_state *s = node->opaque;
    char *old_file = s->backing_file, *old_fmt = s->backing_format;
    int ret;

    if (backing && strlen(backing) > QCOW2_MAX_BACKING_NAME) {
        return vd_error_set(err, -EINVAL, "%s: backing file name '%s' is "
                            "longer than %d bytes", s->filename, backing,
                            QCOW2_MAX_BACKING_NAME);
    }
    if (backing_fmt && !backing) {
        return vd_error_set(err, -EINVAL, "%s: backing format without a "
                            "backing file", s->filename);
    }
    if (backing && s->data_file_raw) {
        return vd_error_set(err, -EINVAL, "%s: Cannot use a backing file "
                            "with data-file-raw", s->filename);
    }
    s->backing_file = backing ? strdup(backing) : NULL;
    s->backing_format = backing_fmt ? strdup(backing_fmt) : NULL;
    if ((backing && !s->backing_file) || (backing_fmt && !s->backing_format)) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    } else {
        ret = qcow2_update_header(s, err);
    }
    if (ret < 0) {
        free(s->backing_file);
        free(s->backing_format);
        s->backing_file = old_file;
        s->backing_format = old_fmt;
        return ret;
    }
    free(old_file);
    free(old_fmt);
    return 0;
}

/* Deallocates every cluster (qcow2_make_empty's discard path): the image
 * then reads through to its backing file. Node drained. */
static int qcow2_make_empty(vd_node *node, vd_error *err)
{
    qcow2_state *s = node->opaque;
    int ret;

    if (s->corrupt) {
        return vd_error_set(err, -EIO, "%s: image is corrupt; writes refused",
                            s->filename);
    }
    vd_node_debug_event(s->file->node, VD_BLKDBG_EMPTY_IMAGE_PREPARE);
    ret = qcow2_discard_full(s, 0, s->size, err);
    if (ret == 0) {
        pthread_mutex_lock(&s->lock);
        ret = qcow2_flush_caches(s, err);
        pthread_mutex_unlock(&s->lock);
    }
    return ret;
}

const vd_driver vd_driver_qcow2 = {
    .name = "qcow2",
    .instance_size = sizeof(qcow2_state),
    .is_format = true,
    .supports_backing = true,
    .supports_compressed = true,
    .create_opts = qcow2_create_opts,
    .amend_opts = qcow2_amend_opts,
    .probe = qcow2_probe,
    .open = qcow2_open,
    .close = qcow2_close,
    .create = qcow2_create,
    .preadv = qcow2_preadv_cb,
    .pwritev = qcow2_pwritev_cb,
    .pwrite_zeroes = qcow2_pwrite_zeroes_cb,
    .pdiscard = qcow2_pdiscard_cb,
    .copy_range_from = qcow2_copy_range_from_cb,
    .copy_range_to = qcow2_copy_range_to_cb,
    .flush = qcow2_flush_cb,
    .block_status = qcow2_block_status_cb,
    .getlength = qcow2_getlength,
    .truncate = qcow2_truncate_cb,
    .truncate_check = qcow2_truncate_check,
    .get_info = qcow2_get_info,
    .get_driver_stats = qcow2_get_driver_stats,
    .check = qcow2_check_cb,
    .space_usage = qcow2_space_usage,
    .snapshot_create = qcow2_snapshot_create,
    .snapshot_goto = qcow2_snapshot_goto,
    .snapshot_delete = qcow2_snapshot_delete,
    .snapshot_plan = qcow2_snapshot_plan,
    .snapshot_list = qcow2_snapshot_list,
    .snapshot_load_tmp = qcow2_snapshot_load_tmp,
    .save_vmstate = qcow2_save_vmstate,
    .load_vmstate = qcow2_load_vmstate,
    .measure = qcow2_measure,
    .amend = qcow2_amend,
    .compact = qcow2_compact,
    .amend_plan = qcow2_amend_plan,
    .change_backing_file = qcow2_change_backing_file,
    .make_empty = qcow2_make_empty,
    .bitmaps_load = qcow2_bitmaps_load,
    .bitmaps_store = qcow2_bitmaps_store,
    .bitmap_can_store = qcow2_bitmap_can_store,
    .bitmap_remove = qcow2_bitmap_remove,
};
