/*
 * qcow2 persistent dirty bitmaps: validation of the bitmaps extension
 * (../shared/specs/qcow2.rst "Bitmaps extension", ../shared/specs/
 * bitmaps.rst), where and as QEMU 7.2 validates it.
 *
 * vdisk does not use bitmaps (a read-write open clears the autoclear
 * bit, which tells QEMU they are stale), but it must refuse the images
 * QEMU refuses: QEMU loads the bitmap directory and the tables of the
 * bitmaps not marked in use on every open, info, convert and check
 * included, and fails the open on any fault. The header fields are
 * checked while the extensions are parsed (qcow2.c); the directory and
 * tables here, after the snapshot table as in qcow2_do_open(). The
 * conditions and messages follow QEMU's bitmap_list_load(),
 * check_dir_entry(), load_bitmap(), bitmap_table_load() and
 * load_bitmap_data(); the bitmap data itself is never read (QEMU only
 * fails there on an I/O error). check.c shares the directory and table
 * readers to count the bitmaps' clusters.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/qcow2/qcow2.h"

/* Limits of bitmaps.rst / QEMU's qcow2-bitmap.c. */
#define BME_MAX_TABLE_SIZE 0x8000000u
#define BME_MAX_PHYS_SIZE 0x20000000ull
#define BME_MAX_GRANULARITY_BITS 31
#define BME_MIN_GRANULARITY_BITS 9
#define BME_MAX_NAME_SIZE 1023
#define BME_RESERVED_FLAGS 0xfffffffcu
#define BME_FLAG_IN_USE (1u << 0)
#define BME_TYPE_DIRTY_TRACKING 1
#define BME_ENTRY_RESERVED_MASK 0xff000000000001feull
#define BME_ENTRY_OFFSET_MASK 0x00fffffffffffe00ull
#define BME_ENTRY_ALL_ONES 1ull
#define DIR_ENTRY_HEADER 24

static uint32_t rd32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
           ((uint32_t)p[2] << 8) | p[3];
}

static uint64_t rd64(const uint8_t *p)
{
    return ((uint64_t)rd32(p) << 32) | rd32(p + 4);
}

void qcow2_bitmap_list_free(qcow2_bitmap_info *list, uint32_t n)
{
    if (list) {
        for (uint32_t i = 0; i < n; i++) {
            free(list[i].name);
        }
        free(list);
    }
}

/* The size QEMU gives a directory entry: computed in a C int, so an
 * absurd extra data size wraps (and then fails as "extra data"). */
static int64_t entry_size(uint16_t name_size, uint32_t extra)
{
    uint32_t sz = DIR_ENTRY_HEADER + (uint32_t)name_size + extra;
    sz = (sz + 7) & ~7u;
    return (int64_t)(int32_t)sz;
}

/* QEMU's check_dir_entry(): the constraints of one directory entry. */
static bool entry_ok(const qcow2_state *s, uint64_t toff, uint32_t tsize,
                     uint32_t flags, uint8_t type, uint8_t gran,
                     uint16_t name_size)
{
    uint64_t phys;

    if (tsize == 0 || toff == 0 || (toff & (s->cluster_size - 1)) ||
        tsize > BME_MAX_TABLE_SIZE || gran > BME_MAX_GRANULARITY_BITS ||
        gran < BME_MIN_GRANULARITY_BITS || (flags & BME_RESERVED_FLAGS) ||
        name_size > BME_MAX_NAME_SIZE || type != BME_TYPE_DIRTY_TRACKING) {
        return false;
    }
    phys = (uint64_t)tsize * s->cluster_size;
    if (phys > BME_MAX_PHYS_SIZE) {
        return false;
    }
    /* A consistent bitmap's table must cover the whole disk. */
    return (flags & BME_FLAG_IN_USE) || s->size <= ((phys * 8) << gran);
}

int qcow2_bitmap_list_load(qcow2_state *s, qcow2_bitmap_info **list,
                           vd_error *err)
{
    uint64_t size = s->bitmaps_ext.bitmap_directory_size;
    uint32_t nb = s->bitmaps_ext.nb_bitmaps, count = 0;
    qcow2_bitmap_info *bm = NULL;
    uint8_t *dir = NULL;
    int64_t pos = 0;
    int ret;

    *list = NULL;
    if (size == 0) {
        return vd_error_set(err, -EINVAL, "Requested bitmap directory size "
                            "is zero");
    }
    if (size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE) {
        return vd_error_set(err, -EINVAL, "Requested bitmap directory size "
                            "is too big");
    }
    dir = malloc(size);
    bm = calloc(nb ? nb : 1, sizeof(*bm));
    if (!dir || !bm) {
        ret = vd_error_set(err, -ENOMEM, "Failed to allocate space for "
                           "bitmap directory");
        goto fail;
    }
    /* Past the end of the file the directory reads as zeros, as in
     * QEMU; its entries then fail the constraints. */
    ret = vd_child_pread(s->file, s->bitmaps_ext.bitmap_directory_offset,
                         dir, size, NULL);
    if (ret < 0) {
        ret = vd_error_set_errno(err, ret, "Failed to read bitmap "
                                 "directory");
        goto fail;
    }
    while (pos < (int64_t)size) {
        const uint8_t *e = dir + pos;
        uint64_t toff;
        uint32_t tsize, flags, extra;
        uint16_t name_size;
        int64_t next;

        if (pos + DIR_ENTRY_HEADER > (int64_t)size) {
            goto broken;
        }
        if (++count > nb) {
            ret = vd_error_set(err, -EINVAL, "More bitmaps found than "
                               "specified in header extension");
            goto fail;
        }
        toff = rd64(e);
        tsize = rd32(e + 8);
        flags = rd32(e + 12);
        name_size = (uint16_t)(e[18] << 8 | e[19]);
        extra = rd32(e + 20);
        next = pos + entry_size(name_size, extra);
        if (next > (int64_t)size) {
            goto broken;
        }
        if (extra != 0) {
            ret = vd_error_set(err, -EINVAL, "Bitmap extra data is not "
                               "supported");
            goto fail;
        }
        if (!entry_ok(s, toff, tsize, flags, e[16], e[17], name_size)) {
            ret = vd_error_set(err, -EINVAL, "Bitmap '%.*s' doesn't satisfy "
                               "the constraints", (int)name_size,
                               (const char *)e + DIR_ENTRY_HEADER);
            goto fail;
        }
        bm[count - 1].table_offset = toff;
        bm[count - 1].table_size = tsize;
        bm[count - 1].flags = flags;
        bm[count - 1].granularity_bits = e[17];
        /* The name ends at its size or at a NUL, as g_strndup() ends it. */
        bm[count - 1].name = strndup((const char *)e + DIR_ENTRY_HEADER,
                                     name_size);
        if (!bm[count - 1].name) {
            ret = vd_error_set(err, -ENOMEM, "out of memory");
            goto fail;
        }
        pos = next;
    }
    if (count != nb) {
        ret = vd_error_set(err, -EINVAL, "Less bitmaps found than specified "
                           "in header extension");
        goto fail;
    }
    if (pos != (int64_t)size) {
        goto broken;
    }
    free(dir);
    *list = bm;
    return 0;

broken:
    ret = vd_error_set(err, -EINVAL, "Broken bitmap directory");
fail:
    free(dir);
    qcow2_bitmap_list_free(bm, nb);
    return ret;
}

int qcow2_bitmap_table_load(qcow2_state *s, uint64_t offset, uint32_t n,
                            uint64_t **table)
{
    uint64_t *t;
    int ret;

    *table = NULL;
    if (n == 0 || n > BME_MAX_TABLE_SIZE) {
        return -EINVAL;
    }
    t = malloc((size_t)n * 8);
    if (!t) {
        return -ENOMEM;
    }
    ret = vd_child_pread(s->file, offset, t, (uint64_t)n * 8, NULL);
    for (uint32_t i = 0; ret == 0 && i < n; i++) {
        uint64_t e = be64toh(t[i]);
        uint64_t off = e & BME_ENTRY_OFFSET_MASK;
        t[i] = e;
        if ((e & BME_ENTRY_RESERVED_MASK) ||
            (off && ((e & BME_ENTRY_ALL_ONES) ||
                     (off & (s->cluster_size - 1))))) {
            ret = -EINVAL;
        }
    }
    if (ret < 0) {
        free(t);
        return ret;
    }
    *table = t;
    return 0;
}

/* The table size QEMU's load_bitmap_data() expects for a bitmap of the
 * disk at granularity 2^@gran: the serialised bitmap (64-bit words of
 * one bit per granule) in whole clusters. */
static uint64_t expected_table_size(const qcow2_state *s, uint8_t gran)
{
    uint64_t words, bytes;

    if (s->size == 0) {
        return 0;
    }
    words = (((s->size - 1) >> gran) >> 6) + 1;
    bytes = words * 8;
    return (bytes + s->cluster_size - 1) >> s->cluster_bits;
}

int qcow2_validate_bitmaps(qcow2_state *s, vd_error *err)
{
    uint32_t nb = s->bitmaps_ext.nb_bitmaps;
    qcow2_bitmap_info *bm;
    int loaded = 0;
    int ret = qcow2_bitmap_list_load(s, &bm, err);

    if (ret < 0) {
        return ret;
    }
    for (uint32_t i = 0; ret == 0 && i < nb; i++) {
        bool exists = false;
        uint64_t *table = NULL;

        for (uint32_t j = 0; j < i && !exists; j++) {
            exists = bm[j].name && !strcmp(bm[j].name, bm[i].name);
        }
        if (exists && (bm[i].flags & BME_FLAG_IN_USE)) {
            /* QEMU keeps the bitmap it already has and skips this one. */
            free(bm[i].name);
            bm[i].name = NULL;
            continue;
        }
        if (exists) {
            ret = vd_error_set(err, -EINVAL, "Bitmap already exists: %s",
                               bm[i].name);
            break;
        }
        loaded++;
        if (bm[i].flags & BME_FLAG_IN_USE) {
            /* Its data is unusable: QEMU reads nothing, and refuses to
             * resize the image while it exists. */
            if (!s->inconsistent_bitmap) {
                s->inconsistent_bitmap = strdup(bm[i].name);
            }
            continue;
        }
        ret = qcow2_bitmap_table_load(s, bm[i].table_offset,
                                      bm[i].table_size, &table);
        if (ret < 0) {
            vd_error_set_errno(err, ret, "Could not read bitmap_table table "
                               "from image for bitmap '%s'", bm[i].name);
            break;
        }
        free(table);
        {
            uint64_t want = expected_table_size(s, bm[i].granularity_bits);
            if (want != bm[i].table_size || want > BME_MAX_TABLE_SIZE) {
                ret = vd_error_set_errno(err, -EINVAL, "Could not read "
                                         "bitmap '%s' from image",
                                         bm[i].name);
            }
        }
    }
    qcow2_bitmap_list_free(bm, nb);
    if (ret == 0) {
        /* The node has these dirty bitmaps for QEMU: snapshot apply
         * refuses ("Device has active dirty bitmaps"). */
        s->nb_loaded_bitmaps = loaded;
        atomic_fetch_add(&s->node->dirty_bitmaps, loaded);
    }
    return ret;
}
