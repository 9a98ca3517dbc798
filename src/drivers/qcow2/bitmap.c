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
    /* The bitmaps themselves (and node->dirty_bitmaps, which makes
     * snapshot apply refuse as QEMU) come with the core's load
     * (bitmaps_load below). */
    return ret;
}

/* ------------------------------------------------------------------ */
/* Load, store, remove: the driver side of the core's persistent      */
/* bitmaps (struct vd_driver in src/core/block_int.h)                 */
/* ------------------------------------------------------------------ */

#define BME_FLAG_AUTO (1u << 1)
/* What load allocates for bits at most, all bitmaps together: one bitmap
 * may take QEMU's 512 MiB (BME_MAX_PHYS_SIZE), but a crafted image of
 * 65535 such bitmaps must not exhaust memory. */
#define BITMAPS_MEM_LIMIT (1ull << 30)

static void wr32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void wr64(uint8_t *p, uint64_t v)
{
    wr32(p, (uint32_t)(v >> 32));
    wr32(p + 4, (uint32_t)v);
}

static int ctz64(uint64_t v)
{
    return __builtin_ctzll(v);
}

/* Bytes of the in-memory image of a bitmap (one bit per granule). */
static uint64_t image_bytes(uint64_t disk_size, uint8_t gran)
{
    if (disk_size == 0) {
        return 0;
    }
    return ((((disk_size - 1) >> gran) + 1) + 7) / 8;
}

/* Clears the bits past the last granule: they cover nothing. */
static void mask_tail(uint8_t *bits, uint64_t disk_size, uint8_t gran)
{
    uint64_t nbits;

    if (disk_size == 0) {
        return;
    }
    nbits = ((disk_size - 1) >> gran) + 1;
    if (nbits % 8) {
        bits[nbits / 8] &= (uint8_t)((1u << (nbits % 8)) - 1);
    }
}

/* The directory entry size of a name of @len bytes (no extra data). */
static uint64_t dir_entry_bytes(size_t len)
{
    return (DIR_ENTRY_HEADER + len + 7) & ~(uint64_t)7;
}

/* Whether [off, off+size) overlaps metadata other than the bitmap
 * directory: freeing or rewriting it there would destroy that metadata,
 * so such clusters are left alone (leaked) rather than touched. */
static bool hits_metadata(qcow2_state *s, uint64_t off, uint64_t size)
{
    return qcow2_metadata_overlap_kinds(s, QCOW2_OL_ALL &
                                        ~QCOW2_OL_BITMAP_DIRECTORY,
                                        off, size) != 0;
}

/* Reads the data of a bitmap not in use into a new image of the disk
 * (bit order of bitmaps.rst: the clusters are the bitmap's bytes in
 * order), as QEMU's load_bitmap_data(): a table entry 0 is a cluster of
 * zeros, 0 with the all-ones flag a cluster of ones. */
static int read_bitmap_bits(qcow2_state *s, const qcow2_bitmap_info *bm,
                            uint8_t **out, vd_error *err)
{
    uint64_t want = expected_table_size(s, bm->granularity_bits);
    uint64_t nbytes = image_bytes(s->size, bm->granularity_bits);
    uint64_t *table = NULL;
    uint8_t *bits = NULL, *buf = NULL;
    int ret;

    *out = NULL;
    if (want != bm->table_size || want > BME_MAX_TABLE_SIZE) {
        return vd_error_set_errno(err, -EINVAL, "Could not read bitmap '%s' "
                                  "from image", bm->name);
    }
    ret = qcow2_bitmap_table_load(s, bm->table_offset, bm->table_size,
                                  &table);
    if (ret < 0) {
        return vd_error_set_errno(err, ret, "Could not read bitmap_table "
                                  "table from image for bitmap '%s'",
                                  bm->name);
    }
    bits = calloc(nbytes ? nbytes : 1, 1);
    buf = malloc(s->cluster_size);
    if (!bits || !buf) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory for bitmap '%s'",
                           s->filename, bm->name);
        goto out;
    }
    for (uint32_t i = 0; i < bm->table_size; i++) {
        uint64_t pos = (uint64_t)i << s->cluster_bits;
        uint64_t n = nbytes - pos < s->cluster_size ? nbytes - pos
                                                    : s->cluster_size;
        uint64_t data = table[i] & BME_ENTRY_OFFSET_MASK;

        if (pos >= nbytes) {
            break;
        }
        if (data == 0) {
            if (table[i] & BME_ENTRY_ALL_ONES) {
                memset(bits + pos, 0xff, n);
            }
            continue;
        }
        ret = vd_child_pread(s->file, data, buf, s->cluster_size, NULL);
        if (ret < 0) {
            ret = vd_error_set_errno(err, ret, "Could not read bitmap '%s' "
                                     "from image", bm->name);
            goto out;
        }
        memcpy(bits + pos, buf, n);
    }
    mask_tail(bits, s->size, bm->granularity_bits);
    *out = bits;
    bits = NULL;
    ret = 0;
out:
    free(table);
    free(buf);
    free(bits);
    return ret;
}

/* Serialises @n directory entries (big endian, QEMU's layout) into a
 * new buffer of *size bytes. Every entry must satisfy the constraints
 * open checks (QEMU's bitmap_list_store() checks them too). */
static int build_directory(qcow2_state *s, const qcow2_bitmap_info *bm,
                           uint32_t n, uint8_t **out, uint64_t *size,
                           vd_error *err)
{
    uint64_t total = 0, pos = 0;
    uint8_t *dir;

    *out = NULL;
    for (uint32_t i = 0; i < n; i++) {
        total += dir_entry_bytes(strlen(bm[i].name));
    }
    if (total == 0 || total > QCOW2_MAX_BITMAP_DIRECTORY_SIZE) {
        return vd_error_set(err, -EINVAL, "Bitmap directory is too large");
    }
    dir = calloc(1, total);
    if (!dir) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    for (uint32_t i = 0; i < n; i++) {
        size_t len = strlen(bm[i].name);
        uint8_t *e = dir + pos;

        if (!entry_ok(s, bm[i].table_offset, bm[i].table_size, bm[i].flags,
                      BME_TYPE_DIRTY_TRACKING, bm[i].granularity_bits,
                      (uint16_t)len) || len > BME_MAX_NAME_SIZE) {
            free(dir);
            return vd_error_set(err, -EINVAL, "Bitmap '%s' doesn't satisfy "
                                "the constraints", bm[i].name);
        }
        wr64(e, bm[i].table_offset);
        wr32(e + 8, bm[i].table_size);
        wr32(e + 12, bm[i].flags);
        e[16] = BME_TYPE_DIRTY_TRACKING;
        e[17] = bm[i].granularity_bits;
        e[18] = (uint8_t)(len >> 8);
        e[19] = (uint8_t)len;
        memcpy(e + DIR_ENTRY_HEADER, bm[i].name, len);
        pos += dir_entry_bytes(len);
    }
    *out = dir;
    *size = total;
    return 0;
}

/* Remembers the first bitmap in use of the directory (resize refuses
 * while one exists, as QEMU's qcow2_truncate_bitmaps_check()). */
static void note_inconsistent(qcow2_state *s, const qcow2_bitmap_info *bm,
                              uint32_t n)
{
    free(s->inconsistent_bitmap);
    s->inconsistent_bitmap = NULL;
    for (uint32_t i = 0; i < n; i++) {
        if ((bm[i].flags & BME_FLAG_IN_USE) && bm[i].name) {
            s->inconsistent_bitmap = strdup(bm[i].name);
            break;
        }
    }
}

/*
 * Sets the in-use flag of the bitmaps being loaded in the directory where
 * it lies, as QEMU's update_ext_header_and_dir_in_place(): the autoclear
 * bit is cleared first (a crash in between leaves the bitmaps stale,
 * never consistent-looking with wrong flags), then the directory is
 * rewritten, then the bit is set again. Lock held.
 */
static int mark_in_use(qcow2_state *s, qcow2_bitmap_info *bm, uint32_t n,
                       vd_error *err)
{
    uint64_t off = s->bitmaps_ext.bitmap_directory_offset;
    uint64_t size = 0;
    uint8_t *dir = NULL;
    int ret;

    ret = build_directory(s, bm, n, &dir, &size, err);
    if (ret < 0) {
        return ret;
    }
    if (size != s->bitmaps_ext.bitmap_directory_size) {
        free(dir);
        return vd_error_set(err, -EINVAL, "%s: Can't update bitmap directory: "
                            "its size changed", s->filename);
    }
    if (hits_metadata(s, off, size)) {
        free(dir);
        return vd_error_set(err, -EINVAL, "%s: bitmap directory at 0x%" PRIx64
                            " overlaps other metadata", s->filename, off);
    }
    s->autoclear_features &= ~QCOW2_AUTOCLEAR_BITMAPS;
    ret = qcow2_update_header(s, err);
    if (ret == 0) {
        ret = vd_child_pwrite(s->file, off, dir, size, 0, err);
    }
    if (ret == 0) {
        ret = vd_node_flush(s->file->node, err);
    }
    if (ret == 0) {
        s->autoclear_features |= QCOW2_AUTOCLEAR_BITMAPS;
        ret = qcow2_update_header(s, err);
    }
    free(dir);
    if (ret < 0) {
        vd_error_prepend(err, "Can't update bitmap directory: ");
    }
    return ret;
}

int qcow2_bitmaps_load(vd_node *node, vd_bitmap_image **list, size_t *count,
                       vd_error *err)
{
    qcow2_state *s = node->opaque;
    uint32_t nb = s->bitmaps_ext.nb_bitmaps;
    qcow2_bitmap_info *bm = NULL;
    vd_bitmap_image *img = NULL;
    bool writable = !node->read_only;
    bool need_update = false;
    uint64_t mem = 0;
    size_t n = 0;
    int ret;

    *list = NULL;
    *count = 0;
    pthread_mutex_lock(&s->lock);
    if (!qcow2_bitmaps_valid(s)) {
        /* No bitmaps, or stale ones (open drops those; or this session
         * wrote before loading): nothing to mark; the core's new bitmaps
         * are stored with the autoclear bit set. */
        pthread_mutex_unlock(&s->lock);
        return 0;
    }
    ret = qcow2_bitmap_list_load(s, &bm, err);
    if (ret < 0) {
        goto out;
    }
    img = calloc(nb, sizeof(*img));
    if (!img) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
        goto out;
    }
    for (uint32_t i = 0; i < nb; i++) {
        bool dup = false;

        for (uint32_t j = 0; j < i && !dup; j++) {
            dup = !strcmp(bm[j].name, bm[i].name);
        }
        if (dup && (bm[i].flags & BME_FLAG_IN_USE)) {
            continue;   /* QEMU keeps the first and skips this one */
        }
        if (dup) {
            ret = vd_error_set(err, -EINVAL, "Bitmap already exists: %s",
                               bm[i].name);
            goto out;
        }
        img[n].name = strdup(bm[i].name);
        if (!img[n].name) {
            ret = vd_error_set(err, -ENOMEM, "%s: out of memory",
                               s->filename);
            goto out;
        }
        img[n].granularity = 1ull << bm[i].granularity_bits;
        img[n].enabled = (bm[i].flags & BME_FLAG_AUTO) != 0;
        img[n].in_use = (bm[i].flags & BME_FLAG_IN_USE) != 0;
        img[n].disk_size = s->size;
        n++;
        if (img[n - 1].in_use) {
            continue;
        }
        mem += image_bytes(s->size, bm[i].granularity_bits);
        if (mem > BITMAPS_MEM_LIMIT) {
            ret = vd_error_set(err, -ENOMEM, "%s: the bitmaps need more than "
                               "%llu MiB of memory to load", s->filename,
                               BITMAPS_MEM_LIMIT >> 20);
            goto out;
        }
        ret = read_bitmap_bits(s, &bm[i], &img[n - 1].bits, err);
        if (ret < 0) {
            goto out;
        }
        bm[i].flags |= BME_FLAG_IN_USE;
        need_update = true;
    }
    if (writable && s->bitmaps_autoclear_deferred) {
        /* Open took the autoclear bit away for the case that nobody
         * loads the bitmaps; we do, and mark them in use instead. */
        s->autoclear_features |= QCOW2_AUTOCLEAR_BITMAPS;
        s->bitmaps_autoclear_deferred = false;
    }
    if (writable && need_update) {
        /* What every change checks first; on a damaged image the
         * bitmaps come back as they are and nothing is written (every
         * later write is refused anyway). */
        vd_error verr = VD_ERROR_INIT;
        if (s->corrupt || qcow2_validate_metadata(s, &verr) < 0) {
            vd_error_clear(&verr);
            s->autoclear_features &= ~QCOW2_AUTOCLEAR_BITMAPS;
            s->bitmaps_autoclear_deferred = true;
        } else {
            ret = mark_in_use(s, bm, nb, err);
            if (ret < 0) {
                goto out;
            }
            /* s->inconsistent_bitmap stays: the bitmaps in use now are
             * this session's, the inconsistent ones were so at open. */
            s->header_update_pending = false;
        }
    }
    *list = img;
    *count = n;
    img = NULL;
    ret = 0;
out:
    pthread_mutex_unlock(&s->lock);
    vd_bitmap_images_free(img, n);
    qcow2_bitmap_list_free(bm, nb);
    return ret;
}

/* Clusters to give back once the new directory is in the header. */
typedef struct free_list {
    uint64_t *off;
    uint64_t *len;
    size_t n, cap;
    qcow2_discard_type type;    /* bitmap data: ALWAYS (QEMU discards it
                                   at once), metadata: OTHER */
} free_list;

static int free_list_add(free_list *f, uint64_t off, uint64_t len)
{
    if (f->n == f->cap) {
        size_t cap = f->cap ? f->cap * 2 : 16;
        uint64_t *o = realloc(f->off, cap * sizeof(*o));
        uint64_t *l;

        if (!o) {
            return -ENOMEM;
        }
        f->off = o;
        l = realloc(f->len, cap * sizeof(*l));
        if (!l) {
            return -ENOMEM;
        }
        f->len = l;
        f->cap = cap;
    }
    f->off[f->n] = off;
    f->len[f->n] = len;
    f->n++;
    return 0;
}

static void free_list_release(qcow2_state *s, free_list *f)
{
    for (size_t i = 0; i < f->n; i++) {
        /* Errors only leak clusters, which check -r repairs. */
        qcow2_free_clusters(s, f->off[i], f->len[i], f->type, NULL);
    }
    f->n = 0;
}

static void free_list_destroy(free_list *f)
{
    free(f->off);
    free(f->len);
}

/* Queues the table and the data clusters of an old bitmap for freeing.
 * A table that does not load, or clusters that lie on other metadata,
 * are left alone: a leak is safe, freeing what something else uses is
 * not. */
static int queue_old_bitmap(qcow2_state *s, const qcow2_bitmap_info *bm,
                            free_list *f, free_list *data_f)
{
    uint64_t tbytes = (uint64_t)bm->table_size * 8;
    uint64_t *table = NULL;
    int ret = 0;

    if (qcow2_bitmap_table_load(s, bm->table_offset, bm->table_size,
                                &table) < 0 ||
        hits_metadata(s, bm->table_offset, tbytes)) {
        free(table);
        return 0;
    }
    for (uint32_t i = 0; ret == 0 && i < bm->table_size; i++) {
        uint64_t data = table[i] & BME_ENTRY_OFFSET_MASK;
        if (data && !hits_metadata(s, data, s->cluster_size)) {
            ret = free_list_add(data_f, data, s->cluster_size);
        }
    }
    if (ret == 0) {
        ret = free_list_add(f, bm->table_offset, tbytes);
    }
    free(table);
    return ret;
}

/*
 * Writes one bitmap's data and table (QEMU's store_bitmap()): clusters
 * of zeros get table entry 0 and no cluster; every other cluster of the
 * bitmap is allocated and written. Fills bm->table_offset/table_size;
 * every cluster allocated is added to @fresh (freed on failure).
 */
static int write_bitmap(qcow2_state *s, const vd_bitmap_image *img,
                        qcow2_bitmap_info *bm, free_list *fresh,
                        vd_error *err)
{
    uint64_t nbytes = image_bytes(s->size, bm->granularity_bits);
    uint64_t tsize = expected_table_size(s, bm->granularity_bits);
    uint64_t *table = NULL;
    uint8_t *buf = NULL;
    int64_t toff;
    int ret = 0;

    table = calloc(tsize ? tsize : 1, 8);
    buf = vd_node_blockalign(s->node, s->cluster_size);
    if (!table || !buf) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
        goto out;
    }
    for (uint64_t i = 0; i < tsize; i++) {
        uint64_t pos = i << s->cluster_bits;
        uint64_t n = nbytes - pos < s->cluster_size ? nbytes - pos
                                                    : s->cluster_size;
        bool zero = true;
        int64_t off;

        memset(buf, 0, s->cluster_size);
        memcpy(buf, img->bits + pos, n);
        if (pos + n == nbytes && n) {
            /* The last byte may hold bits past the disk: cleared. */
            uint64_t nbits = ((s->size - 1) >> bm->granularity_bits) + 1;
            if (nbits % 8) {
                buf[n - 1] &= (uint8_t)((1u << (nbits % 8)) - 1);
            }
        }
        for (uint64_t j = 0; j < n && zero; j++) {
            zero = buf[j] == 0;
        }
        if (zero) {
            continue;
        }
        off = qcow2_alloc_clusters(s, s->cluster_size, err);
        if (off < 0) {
            ret = (int)off;
            vd_error_prepend(err, "Failed to allocate clusters for bitmap "
                             "'%s': ", bm->name);
            goto out;
        }
        ret = free_list_add(fresh, (uint64_t)off, s->cluster_size);
        if (ret == 0) {
            ret = qcow2_pre_write_overlap_check(s, 0, (uint64_t)off,
                                                s->cluster_size, false, err);
        }
        if (ret == 0) {
            ret = vd_child_pwrite(s->file, (uint64_t)off, buf,
                                  s->cluster_size, 0, err);
        }
        if (ret < 0) {
            vd_error_set(err, ret, "Failed to write bitmap '%s' to file",
                         bm->name);
            goto out;
        }
        table[i] = (uint64_t)off;
    }
    toff = qcow2_alloc_clusters(s, tsize * 8, err);
    if (toff < 0) {
        ret = (int)toff;
        vd_error_prepend(err, "Failed to allocate clusters for bitmap '%s': ",
                         bm->name);
        goto out;
    }
    ret = free_list_add(fresh, (uint64_t)toff, tsize * 8);
    for (uint64_t i = 0; i < tsize; i++) {
        table[i] = htobe64(table[i]);
    }
    if (ret == 0) {
        ret = qcow2_pre_write_overlap_check(s, 0, (uint64_t)toff, tsize * 8,
                                            false, err);
    }
    if (ret == 0) {
        ret = vd_child_pwrite(s->file, (uint64_t)toff, table, tsize * 8, 0,
                              err);
    }
    if (ret < 0) {
        vd_error_set(err, ret, "Failed to write bitmap '%s' to file",
                     bm->name);
        goto out;
    }
    bm->table_offset = (uint64_t)toff;
    bm->table_size = (uint32_t)tsize;
out:
    free(table);
    free(buf);
    return ret;
}

/*
 * Makes @bm (@n entries) the bitmap directory, as QEMU's
 * update_ext_header_and_dir(): the new directory is written to new
 * clusters and everything (data, tables, directory, refcounts) is
 * flushed before the header points at it; with no entry the extension
 * goes and the autoclear bit is cleared. New clusters are added to
 * @fresh. On success the old directory is queued in @old. Lock held.
 */
/* What the store or remove found before its first write: whether the
 * directory on disk was valid (a stale one's clusters are left alone,
 * leaked as QEMU leaves them: nothing vouches for its contents), and
 * whether the open's deferral of the autoclear bit was still pending
 * (bitmaps never loaded, nothing written: it stays deferred). */
typedef struct dir_state {
    bool valid;
    bool redefer;
} dir_state;

static dir_state dir_state_now(const qcow2_state *s)
{
    dir_state d = {
        qcow2_bitmaps_valid(s) || s->bitmaps_kept_in_v2,
        s->bitmaps_autoclear_deferred && s->header_update_pending,
    };
    return d;
}

static int commit_directory(qcow2_state *s, const qcow2_bitmap_info *bm,
                            uint32_t n, dir_state ds, free_list *fresh,
                            free_list *old, vd_error *err)
{
    qcow2_bitmaps_ext saved = s->bitmaps_ext;
    bool had_ext = s->has_bitmaps_ext;
    bool free_old = ds.valid && had_ext;
    uint64_t saved_autoclear = s->autoclear_features;
    uint64_t size = 0;
    uint8_t *dir = NULL;
    int64_t off = 0;
    int ret = 0;

    if (n > QCOW2_MAX_BITMAPS) {
        return vd_error_set(err, -EINVAL, "Too many persistent bitmaps");
    }
    if (n) {
        ret = build_directory(s, bm, n, &dir, &size, err);
        if (ret < 0) {
            return ret;
        }
        off = qcow2_alloc_clusters(s, size, err);
        if (off < 0) {
            free(dir);
            return (int)off;
        }
        ret = free_list_add(fresh, (uint64_t)off, size);
        if (ret == 0) {
            ret = qcow2_pre_write_overlap_check(s, 0, (uint64_t)off, size,
                                                false, err);
        }
        if (ret == 0) {
            ret = vd_child_pwrite(s->file, (uint64_t)off, dir, size, 0, err);
        }
        free(dir);
        if (ret < 0) {
            return ret;
        }
    }
    /* Data, tables, directory and their refcounts on disk first. */
    ret = qcow2_flush_caches(s, err);
    if (ret < 0) {
        return ret;
    }
    if (free_old) {
        ret = free_list_add(old, saved.bitmap_directory_offset,
                            saved.bitmap_directory_size);
        if (ret < 0) {
            return vd_error_set(err, ret, "%s: out of memory", s->filename);
        }
    }
    s->bitmaps_ext.nb_bitmaps = n;
    s->bitmaps_ext.bitmap_directory_offset = (uint64_t)off;
    s->bitmaps_ext.bitmap_directory_size = size;
    s->has_bitmaps_ext = n > 0;
    if (n) {
        s->autoclear_features |= QCOW2_AUTOCLEAR_BITMAPS;
    } else {
        s->autoclear_features &= ~QCOW2_AUTOCLEAR_BITMAPS;
    }
    ret = qcow2_update_header(s, err);
    if (ret < 0) {
        /* The header may or may not point at the new directory: keep
         * both the old and the new structures (a leak at worst). */
        s->bitmaps_ext = saved;
        s->has_bitmaps_ext = had_ext;
        s->autoclear_features = saved_autoclear;
        fresh->n = 0;
        if (free_old) {
            old->n--;
        }
        return ret;
    }
    return 0;
}

/* QEMU's check_constraints_on_bitmap(), its messages unprefixed. */
static int constraints(qcow2_state *s, const char *name, uint64_t g,
                       vd_error *err)
{
    int bits;

    if (g == 0 || (g & (g - 1))) {
        return vd_error_set(err, -EINVAL, "Granularity must be a power of "
                            "2");
    }
    bits = ctz64(g);
    if (bits > BME_MAX_GRANULARITY_BITS) {
        return vd_error_set(err, -EINVAL, "Granularity exceeds maximum (%llu "
                            "bytes)", 1ULL << BME_MAX_GRANULARITY_BITS);
    }
    if (bits < BME_MIN_GRANULARITY_BITS) {
        return vd_error_set(err, -EINVAL, "Granularity is under minimum (%llu "
                            "bytes)", 1ULL << BME_MIN_GRANULARITY_BITS);
    }
    if (image_bytes(s->size, (uint8_t)bits) > BME_MAX_PHYS_SIZE ||
        image_bytes(s->size, (uint8_t)bits) >
        (uint64_t)BME_MAX_TABLE_SIZE * s->cluster_size) {
        return vd_error_set(err, -EINVAL, "Too much space will be occupied by "
                            "the bitmap. Use larger granularity");
    }
    if (strlen(name) > BME_MAX_NAME_SIZE) {
        return vd_error_set(err, -EINVAL, "Name length exceeds maximum (%u "
                            "characters)", BME_MAX_NAME_SIZE);
    }
    return 0;
}

/* After a store or remove and the frees that follow it (their refcount
 * updates would write a deferred header): the bitmaps bit is set on disk
 * now. If the bitmaps were never loaded and nothing else was written,
 * the first write of the session still takes it away, as open arranged;
 * otherwise the bit stays. */
static void finish_deferral(qcow2_state *s, dir_state ds)
{
    if (ds.redefer && s->has_bitmaps_ext) {
        s->autoclear_features &= ~QCOW2_AUTOCLEAR_BITMAPS;
        s->header_update_pending = true;
    } else {
        s->bitmaps_autoclear_deferred = false;
    }
}

/* Checks one image of the core's set before anything is written. */
static int check_image(qcow2_state *s, const vd_bitmap_image *img,
                       vd_error *err)
{
    int ret;

    if (!img->name) {
        return vd_error_set(err, -EINVAL, "%s: bitmap without a name",
                            s->filename);
    }
    ret = constraints(s, img->name, img->granularity, err);
    if (ret < 0) {
        vd_error_prepend(err, "Bitmap '%s' doesn't satisfy the constraints: ",
                         img->name);
        return ret;
    }
    if (img->disk_size != s->size) {
        return vd_error_set(err, -EINVAL, "%s: bitmap '%s' covers %" PRIu64
                            " bytes, the image has %" PRIu64, s->filename,
                            img->name, img->disk_size, s->size);
    }
    if (!img->in_use && !img->bits) {
        return vd_error_set(err, -EINVAL, "%s: bitmap '%s' has no bits",
                            s->filename, img->name);
    }
    return 0;
}

static int find_entry(const qcow2_bitmap_info *bm, uint32_t n,
                      const char *name)
{
    for (uint32_t i = 0; i < n; i++) {
        if (bm[i].name && !strcmp(bm[i].name, name)) {
            return (int)i;
        }
    }
    return -1;
}

static int do_store(qcow2_state *s, const vd_bitmap_image *list,
                    size_t count, vd_error *err)
{
    dir_state ds = dir_state_now(s);
    uint32_t nold = ds.valid ? s->bitmaps_ext.nb_bitmaps : 0;
    qcow2_bitmap_info *old = NULL, *nw = NULL;
    const vd_bitmap_image **src = NULL;   /* per new entry: to write */
    free_list fresh = { .type = QCOW2_DISCARD_OTHER };
    free_list gone = { .type = QCOW2_DISCARD_OTHER };
    free_list gone_data = { .type = QCOW2_DISCARD_ALWAYS };
    uint64_t dir_size = 0;
    uint32_t n = 0;
    bool any_write = false;
    int ret;

    if (s->node->read_only) {
        return vd_error_set(err, -EACCES, "%s: No write access",
                            s->filename);
    }
    if (s->corrupt) {
        return vd_error_set(err, -EIO, "%s: image is corrupt; writes refused",
                            s->filename);
    }
    for (size_t i = 0; i < count; i++) {
        ret = check_image(s, &list[i], err);
        if (ret < 0) {
            return ret;
        }
        for (size_t j = 0; j < i; j++) {
            if (!strcmp(list[j].name, list[i].name)) {
                return vd_error_set(err, -EINVAL, "Bitmap already exists: %s",
                                    list[i].name);
            }
        }
        any_write |= !list[i].in_use;
    }
    if (nold) {
        ret = qcow2_bitmap_list_load(s, &old, err);
        if (ret < 0) {
            return ret;
        }
    }
    nw = calloc(nold + count + 1, sizeof(*nw));
    src = calloc(nold + count + 1, sizeof(*src));
    if (!nw || !src) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
        goto out;
    }
    /* The old entries keep their place: those in the set are replaced
     * (or, given in use, kept as they are, data and flag), those the
     * core loaded (in use) and no longer has are removed; an entry not
     * in use that the core does not have was never loaded in this
     * session and is kept as QEMU keeps it. */
    for (uint32_t i = 0; i < nold; i++) {
        int k = -1;
        for (size_t j = 0; j < count && k < 0; j++) {
            if (!strcmp(list[j].name, old[i].name)) {
                k = (int)j;
            }
        }
        if (find_entry(old, i, old[i].name) >= 0) {
            /* A duplicate in use that open skipped: it goes. */
            ret = queue_old_bitmap(s, &old[i], &gone, &gone_data);
            if (ret < 0) {
                goto nomem;
            }
            continue;
        }
        if (k < 0 && (old[i].flags & BME_FLAG_IN_USE)) {
            ret = queue_old_bitmap(s, &old[i], &gone, &gone_data);
            if (ret < 0) {
                goto nomem;
            }
            continue;
        }
        if (k >= 0 && !list[k].in_use) {
            if (!(old[i].flags & BME_FLAG_IN_USE)) {
                ret = vd_error_set(err, -EEXIST, "Bitmap '%s' already exists "
                                   "in the image", old[i].name);
                goto out;
            }
            ret = queue_old_bitmap(s, &old[i], &gone, &gone_data);
            if (ret < 0) {
                goto nomem;
            }
            src[n] = &list[k];
        }
        nw[n] = old[i];
        nw[n].name = old[i].name;
        n++;
    }
    for (size_t j = 0; j < count; j++) {
        if (find_entry(old, nold, list[j].name) >= 0 || list[j].in_use) {
            continue;   /* placed above; an in-use newcomer has no data */
        }
        nw[n].name = (char *)list[j].name;
        src[n] = &list[j];
        n++;
    }
    for (uint32_t i = 0; i < n; i++) {
        dir_size += dir_entry_bytes(strlen(nw[i].name));
        if (src[i]) {
            uint8_t g = (uint8_t)ctz64(src[i]->granularity);
            uint64_t t = expected_table_size(s, g);
            if (t == 0) {
                /* An empty disk: the format has no empty bitmap table. */
                ret = vd_error_set(err, -EINVAL, "Bitmap '%s' doesn't "
                                   "satisfy the constraints: the image is "
                                   "empty", nw[i].name);
                goto out;
            }
            if (t > BME_MAX_TABLE_SIZE ||
                t * s->cluster_size > BME_MAX_PHYS_SIZE) {
                ret = vd_error_set(err, -EINVAL, "Bitmap '%s' is too big",
                                   nw[i].name);
                goto out;
            }
        }
    }
    if (n > QCOW2_MAX_BITMAPS) {
        ret = vd_error_set(err, -EINVAL, "Too many persistent bitmaps");
        goto out;
    }
    if (dir_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE) {
        ret = vd_error_set(err, -EINVAL, "Bitmap directory is too large");
        goto out;
    }
    if (!any_write && n == nold && gone.n == 0 && gone_data.n == 0) {
        ret = 0;        /* nothing changes on disk */
        goto out;
    }
    ret = qcow2_begin_change(s, err);
    if (ret < 0) {
        goto out;
    }
    for (uint32_t i = 0; i < n; i++) {
        if (!src[i]) {
            continue;
        }
        nw[i].flags = src[i]->enabled ? BME_FLAG_AUTO : 0;
        nw[i].granularity_bits = (uint8_t)ctz64(src[i]->granularity);
        ret = write_bitmap(s, src[i], &nw[i], &fresh, err);
        if (ret < 0) {
            goto rollback;
        }
    }
    ret = commit_directory(s, nw, n, ds, &fresh, &gone, err);
    if (ret < 0) {
        goto rollback;
    }
    note_inconsistent(s, nw, n);
    /* The header no longer names the old structures: give them back. */
    free_list_release(s, &gone);
    free_list_release(s, &gone_data);
    finish_deferral(s, ds);
    ret = 0;
    goto out;

nomem:
    ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    goto out;
rollback:
    vd_error_prepend(err, "Failed to update bitmap extension: ");
    free_list_release(s, &fresh);
out:
    free_list_destroy(&fresh);
    free_list_destroy(&gone);
    free_list_destroy(&gone_data);
    free(nw);
    free(src);
    qcow2_bitmap_list_free(old, nold);
    return ret;
}

int qcow2_bitmaps_store(vd_node *node, const vd_bitmap_image *list,
                        size_t count, vd_error *err)
{
    qcow2_state *s = node->opaque;
    int ret;

    pthread_mutex_lock(&s->lock);
    ret = do_store(s, list, count, err);
    pthread_mutex_unlock(&s->lock);
    return ret;
}

int qcow2_bitmap_remove(vd_node *node, const char *name, vd_error *err)
{
    qcow2_state *s = node->opaque;
    uint32_t nold = s->bitmaps_ext.nb_bitmaps, n = 0;
    qcow2_bitmap_info *old = NULL, *nw = NULL;
    free_list fresh = { .type = QCOW2_DISCARD_OTHER };
    free_list gone = { .type = QCOW2_DISCARD_OTHER };
    free_list gone_data = { .type = QCOW2_DISCARD_ALWAYS };
    dir_state ds;
    int idx, ret;

    pthread_mutex_lock(&s->lock);
    ds = dir_state_now(s);
    if (!ds.valid) {
        /* Absent is not an error (QEMU's remove). */
        pthread_mutex_unlock(&s->lock);
        return 0;
    }
    ret = qcow2_bitmap_list_load(s, &old, err);
    if (ret < 0) {
        goto out;
    }
    idx = find_entry(old, nold, name);
    if (idx < 0) {
        goto out;
    }
    if (s->node->read_only) {
        ret = vd_error_set(err, -EACCES, "%s: No write access", s->filename);
        goto out;
    }
    if (s->corrupt) {
        ret = vd_error_set(err, -EIO, "%s: image is corrupt; writes refused",
                           s->filename);
        goto out;
    }
    nw = calloc(nold, sizeof(*nw));
    if (!nw) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
        goto out;
    }
    for (uint32_t i = 0; i < nold; i++) {
        if (i != (uint32_t)idx) {
            nw[n++] = old[i];
        }
    }
    ret = qcow2_begin_change(s, err);
    if (ret == 0) {
        ret = queue_old_bitmap(s, &old[idx], &gone, &gone_data);
        if (ret < 0) {
            ret = vd_error_set(err, ret, "%s: out of memory", s->filename);
        }
    }
    if (ret == 0) {
        ret = commit_directory(s, nw, n, ds, &fresh, &gone, err);
        if (ret < 0) {
            vd_error_prepend(err, "Failed to update bitmap extension: ");
            free_list_release(s, &fresh);
        }
    }
    if (ret == 0) {
        /* In use on disk are this session's loaded bitmaps too: only
         * the removed one stops being the inconsistent one. */
        if (s->inconsistent_bitmap && !strcmp(s->inconsistent_bitmap, name)) {
            free(s->inconsistent_bitmap);
            s->inconsistent_bitmap = NULL;
        }
        free_list_release(s, &gone);
        free_list_release(s, &gone_data);
        finish_deferral(s, ds);
    }
out:
    pthread_mutex_unlock(&s->lock);
    free_list_destroy(&fresh);
    free_list_destroy(&gone);
    free_list_destroy(&gone_data);
    free(nw);
    qcow2_bitmap_list_free(old, nold);
    return ret;
}

int qcow2_bitmap_can_store(vd_node *node, const char *name,
                           uint64_t granularity, vd_error *err)
{
    qcow2_state *s = node->opaque;
    uint32_t nold = qcow2_bitmaps_valid(s) ? s->bitmaps_ext.nb_bitmaps : 0;
    qcow2_bitmap_info *old = NULL;
    uint64_t dir_size;
    const char *who = node->node_name ? node->node_name : "";
    int ret = 0;

    pthread_mutex_lock(&s->lock);
    if (nold && qcow2_bitmap_list_load(s, &old, err) < 0) {
        ret = -EINVAL;
        goto out;
    }
    if (find_entry(old, nold, name) >= 0) {
        ret = vd_error_set(err, -EEXIST, "Bitmap already exists: %s", name);
        goto out;
    }
    if (s->version < 3) {
        ret = vd_error_set(err, -ENOTSUP, "Cannot store dirty bitmaps in "
                           "qcow2 v2 files");
        goto prefix;
    }
    ret = constraints(s, name, granularity, err);
    if (ret < 0) {
        goto prefix;
    }
    dir_size = nold ? s->bitmaps_ext.bitmap_directory_size : 0;
    dir_size += dir_entry_bytes(strlen(name));
    if (nold + 1 > QCOW2_MAX_BITMAPS) {
        ret = vd_error_set(err, -EINVAL, "Maximum number of persistent "
                           "bitmaps is already reached");
        goto prefix;
    }
    if (dir_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE) {
        ret = vd_error_set(err, -EINVAL, "Not enough space in the bitmap "
                           "directory");
        goto prefix;
    }
    goto out;
prefix:
    vd_error_prepend(err, "Can't make bitmap '%s' persistent in '%s': ",
                     name, who);
out:
    pthread_mutex_unlock(&s->lock);
    qcow2_bitmap_list_free(old, nold);
    return ret;
}
