/*
 * The vdi driver: VirtualBox's Virtual Disk Image, as QEMU 7.2's
 * block/vdi.c reads, writes and creates it.
 *
 * Layout (all little endian): a 512-byte header (a 64-byte text, the
 * signature 0xbeda107f at 0x40, version 1.1, the image type at 0x4c:
 * 1 dynamic, 2 static, the block map and data offsets at 0x154/0x158,
 * the sector size at 0x168, the disk size at 0x170, the block size at
 * 0x178, the number of blocks and of allocated blocks at 0x180/0x184 and
 * four UUIDs at 0x188..0x1c8), then the block map: one 32-bit entry per
 * 1 MiB block of the guest disk, the index of the block in the data area
 * (offset_data + index * block_size), or 0xffffffff (never allocated)
 * or 0xfffffffe (discarded), both reading as zeros.
 *
 * As QEMU: only block size 1 MiB, sector size 512 and version 1.1 are
 * opened, images with a link or parent UUID (VirtualBox's differencing
 * images) are refused, a new block is appended at index blocks_allocated
 * (data first, then the header, then the block map sector, so a crash
 * leaks at most a block), created images are dynamic or static (every
 * block mapped in order, the file sized to hold them, sparse), and
 * `check` reports duplicate or out-of-range map entries and a wrong
 * allocated count, with QEMU's messages, and repairs nothing.
 *
 * Beyond QEMU, every table is validated before use: a block map outside
 * the file or overlapping the header or the data area is refused at
 * open, and an image whose map is inconsistent (an entry used twice, or
 * at or past blocks_allocated, where the next allocation would land on
 * existing data) is opened read-only or for check only: writing to it
 * could overwrite guest data.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "simple-fmt.h"

#define VDI_SECTOR 512u
#define VDI_BLOCK_SIZE 1048576u
#define VDI_SIGNATURE 0xbeda107fu
#define VDI_VERSION_1_1 0x00010001u
#define VDI_TYPE_DYNAMIC 1u
#define VDI_TYPE_STATIC 2u
#define VDI_UNALLOCATED 0xffffffffu
#define VDI_DISCARDED 0xfffffffeu
#define VDI_IS_ALLOCATED(x) ((x) < VDI_DISCARDED)
/* QEMU's limit: the map, rounded up to a sector, must stay below 2 GiB. */
#define VDI_BLOCKS_MAX ((uint32_t)((2147483648u - VDI_SECTOR) / 4))
#define VDI_DISK_SIZE_MAX ((uint64_t)VDI_BLOCKS_MAX * VDI_BLOCK_SIZE)
#define VDI_TEXT "<<< QEMU VM Virtual Disk Image >>>\n"

/* Header field offsets. */
enum {
    H_SIGNATURE = 0x40, H_VERSION = 0x44, H_HEADER_SIZE = 0x48,
    H_IMAGE_TYPE = 0x4c, H_OFFSET_BMAP = 0x154, H_OFFSET_DATA = 0x158,
    H_SECTOR_SIZE = 0x168, H_DISK_SIZE = 0x170, H_BLOCK_SIZE = 0x178,
    H_BLOCKS_IN_IMAGE = 0x180, H_BLOCKS_ALLOCATED = 0x184,
    H_UUID_IMAGE = 0x188, H_UUID_LAST_SNAP = 0x198, H_UUID_LINK = 0x1a8,
    H_UUID_PARENT = 0x1b8,
};

typedef struct vdi_state {
    vd_child *file;
    const char *filename;
    uint8_t header[VDI_SECTOR];     /* as on disk */
    uint32_t image_type;
    uint32_t offset_bmap, offset_data;
    uint32_t blocks_in_image;
    uint32_t blocks_allocated;      /* under @lock */
    uint64_t disk_size;             /* rounded up to a sector */
    uint8_t *bmap;                  /* little-endian entries, under @lock */
    size_t bmap_bytes;              /* rounded up to a sector */
    char *no_write;                 /* why writes are refused, or NULL */
    /* Readers look entries up; an allocation takes it for writing from
     * the lookup until the block's data and metadata are written, so a
     * write into the block never races the block's first full write. */
    pthread_rwlock_t lock;
} vdi_state;

static bool is_null16(const uint8_t *p)
{
    for (int i = 0; i < 16; i++) {
        if (p[i]) {
            return false;
        }
    }
    return true;
}

static int vdi_probe(const uint8_t *buf, size_t len, const char *filename)
{
    (void)filename;
    return len >= VDI_SECTOR && fmt_rd32(buf + H_SIGNATURE) == VDI_SIGNATURE ?
           100 : 0;
}

/* The header checks of QEMU's vdi_open, in its order and with its texts. */
static int check_header(const uint8_t *h, vd_error *err)
{
    uint64_t disk_size = fmt_rd64(h + H_DISK_SIZE);
    uint32_t version = fmt_rd32(h + H_VERSION);
    uint32_t blocks = fmt_rd32(h + H_BLOCKS_IN_IMAGE);
    uint32_t bsize = fmt_rd32(h + H_BLOCK_SIZE);

    if (disk_size > VDI_DISK_SIZE_MAX) {
        return vd_error_set(err, -ENOTSUP, "Unsupported VDI image size (size "
                            "is 0x%" PRIx64 ", max supported is 0x%" PRIx64
                            ")", disk_size, VDI_DISK_SIZE_MAX);
    }
    /* Odd sizes (VBoxManage convertfromraw) are rounded up to a sector. */
    disk_size = (disk_size + VDI_SECTOR - 1) & ~(uint64_t)(VDI_SECTOR - 1);
    if (fmt_rd32(h + H_SIGNATURE) != VDI_SIGNATURE) {
        return vd_error_set(err, -EINVAL, "Image not in VDI format (bad "
                            "signature %08" PRIx32 ")", fmt_rd32(h + H_SIGNATURE));
    }
    if (version != VDI_VERSION_1_1) {
        return vd_error_set(err, -ENOTSUP, "unsupported VDI image (version %"
                            PRIu32 ".%" PRIu32 ")", version >> 16,
                            version & 0xffff);
    }
    if (fmt_rd32(h + H_OFFSET_BMAP) % VDI_SECTOR) {
        return vd_error_set(err, -ENOTSUP, "unsupported VDI image (unaligned "
                            "block map offset 0x%" PRIx32 ")",
                            fmt_rd32(h + H_OFFSET_BMAP));
    }
    if (fmt_rd32(h + H_OFFSET_DATA) % VDI_SECTOR) {
        return vd_error_set(err, -ENOTSUP, "unsupported VDI image (unaligned "
                            "data offset 0x%" PRIx32 ")",
                            fmt_rd32(h + H_OFFSET_DATA));
    }
    if (fmt_rd32(h + H_SECTOR_SIZE) != VDI_SECTOR) {
        return vd_error_set(err, -ENOTSUP, "unsupported VDI image (sector "
                            "size %" PRIu32 " is not %u)",
                            fmt_rd32(h + H_SECTOR_SIZE), VDI_SECTOR);
    }
    if (bsize != VDI_BLOCK_SIZE) {
        return vd_error_set(err, -ENOTSUP, "unsupported VDI image (block "
                            "size %" PRIu32 " is not %u)", bsize,
                            VDI_BLOCK_SIZE);
    }
    if (disk_size > (uint64_t)blocks * bsize) {
        return vd_error_set(err, -ENOTSUP, "unsupported VDI image (disk size "
                            "%" PRIu64 ", image bitmap has room for %" PRIu64
                            ")", disk_size, (uint64_t)blocks * bsize);
    }
    if (!is_null16(h + H_UUID_LINK)) {
        return vd_error_set(err, -ENOTSUP, "unsupported VDI image (non-NULL "
                            "link UUID)");
    }
    if (!is_null16(h + H_UUID_PARENT)) {
        return vd_error_set(err, -ENOTSUP, "unsupported VDI image (non-NULL "
                            "parent UUID)");
    }
    if (blocks > VDI_BLOCKS_MAX) {
        return vd_error_set(err, -ENOTSUP, "unsupported VDI image (too many "
                            "blocks %" PRIu32 ", max is %" PRIu32 ")", blocks,
                            VDI_BLOCKS_MAX);
    }
    return 0;
}

/* Whether [a, a+alen) and [b, b+blen) overlap (both non-empty). */
static bool overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return alen && blen && a < b + blen && b < a + alen;
}

/* The map entries that would make an allocation overwrite data: one
 * used twice, or one at or past blocks_allocated (where the next block
 * goes). Returns a message (malloc'd) or NULL when consistent. */
static char *bmap_fault(vdi_state *s, int *oom)
{
    uint8_t *seen = calloc((size_t)s->blocks_in_image / 8 + 1, 1);
    char *msg = NULL;

    *oom = 0;
    if (!seen) {
        *oom = 1;
        return NULL;
    }
    if (s->blocks_allocated > s->blocks_in_image) {
        if (asprintf(&msg, "allocated block count %" PRIu32 " exceeds the "
                     "%" PRIu32 " blocks of the image", s->blocks_allocated,
                     s->blocks_in_image) < 0) {
            msg = NULL;
            *oom = 1;
        }
        free(seen);
        return msg;
    }
    for (uint32_t i = 0; i < s->blocks_in_image && !msg; i++) {
        uint32_t e = fmt_rd32(s->bmap + (size_t)i * 4);
        int r = 0;

        if (!VDI_IS_ALLOCATED(e)) {
            continue;
        }
        if (e >= s->blocks_allocated) {
            r = asprintf(&msg, "block map entry %" PRIu32 " points to block "
                         "%" PRIu32 ", past the %" PRIu32 " allocated "
                         "blocks", i, e, s->blocks_allocated);
        } else if (seen[e / 8] & (1u << (e % 8))) {
            r = asprintf(&msg, "block map entry %" PRIu32 " points to block "
                         "%" PRIu32 ", which another entry uses", i, e);
        } else {
            seen[e / 8] |= (uint8_t)(1u << (e % 8));
        }
        if (r < 0) {
            msg = NULL;
            *oom = 1;
            break;
        }
    }
    free(seen);
    return msg;
}

static void free_state(vdi_state *s)
{
    free(s->bmap);
    free(s->no_write);
    pthread_rwlock_destroy(&s->lock);
    memset(s, 0, sizeof(*s));
}

/* Also called on a node whose open failed (the core closes a broken
 * node): the state is zero then. */
static void vdi_close(vd_node *node)
{
    vdi_state *s = node->opaque;

    if (s->bmap) {
        free_state(s);
    }
}

static int vdi_open(vd_node *node, vd_opts *opts, unsigned flags,
                    vd_error *err)
{
    vdi_state *s = node->opaque;
    int64_t flen;
    uint64_t bmap_end, data_len;
    int ret, oom;

    (void)opts;
    memset(s, 0, sizeof(*s));
    s->file = node->file;
    s->filename = node->filename ? node->filename : "vdi";
    pthread_rwlock_init(&s->lock, NULL);

    /* A short file reads as zeros past its end, as in QEMU. */
    flen = fmt_read_head(s->file, s->header, VDI_SECTOR, s->filename, err);
    if (flen < 0) {
        ret = (int)flen;
        goto fail;
    }
    ret = check_header(s->header, err);
    if (ret < 0) {
        goto fail;
    }
    s->image_type = fmt_rd32(s->header + H_IMAGE_TYPE);
    s->offset_bmap = fmt_rd32(s->header + H_OFFSET_BMAP);
    s->offset_data = fmt_rd32(s->header + H_OFFSET_DATA);
    s->blocks_in_image = fmt_rd32(s->header + H_BLOCKS_IN_IMAGE);
    s->blocks_allocated = fmt_rd32(s->header + H_BLOCKS_ALLOCATED);
    s->disk_size = (fmt_rd64(s->header + H_DISK_SIZE) + VDI_SECTOR - 1) &
                   ~(uint64_t)(VDI_SECTOR - 1);
    s->bmap_bytes = ((size_t)s->blocks_in_image * 4 + VDI_SECTOR - 1) &
                    ~(size_t)(VDI_SECTOR - 1);

    /* vdisk's own validation: the map must be in the file (which bounds
     * the allocation) and clear of the header and of the data area. */
    bmap_end = (uint64_t)s->offset_bmap + s->bmap_bytes;
    data_len = (uint64_t)s->blocks_in_image * VDI_BLOCK_SIZE;
    if (s->bmap_bytes && s->offset_bmap < VDI_SECTOR) {
        ret = vd_error_set(err, -EINVAL, "%s: block map offset 0x%" PRIx32
                           " overlaps the header", s->filename,
                           s->offset_bmap);
        goto fail;
    }
    if (bmap_end > (uint64_t)flen) {
        ret = vd_error_set(err, -EINVAL, "%s: block map at 0x%" PRIx32
                           " (%zu bytes for %" PRIu32 " blocks) extends "
                           "beyond the end of the file (0x%" PRIx64 ")",
                           s->filename, s->offset_bmap, s->bmap_bytes,
                           s->blocks_in_image, (uint64_t)flen);
        goto fail;
    }
    if (overlaps(s->offset_data, data_len, 0, VDI_SECTOR) ||
        overlaps(s->offset_data, data_len, s->offset_bmap, s->bmap_bytes)) {
        ret = vd_error_set(err, -EINVAL, "%s: data area at 0x%" PRIx32
                           " overlaps the header or the block map at 0x%"
                           PRIx32, s->filename, s->offset_data,
                           s->offset_bmap);
        goto fail;
    }
    s->bmap = malloc(s->bmap_bytes ? s->bmap_bytes : 1);
    if (!s->bmap) {
        ret = vd_error_set(err, -ENOMEM, "%s: cannot allocate the block map "
                           "(%zu bytes)", s->filename, s->bmap_bytes);
        goto fail;
    }
    if (s->bmap_bytes) {
        ret = vd_child_pread(s->file, s->offset_bmap, s->bmap, s->bmap_bytes,
                             err);
        if (ret < 0) {
            goto fail;
        }
    }
    s->no_write = bmap_fault(s, &oom);
    if (oom) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
        goto fail;
    }
    if (s->no_write && !node->read_only && !(flags & VD_NODE_CHECK)) {
        ret = vd_error_set(err, -EINVAL, "%s: %s; the image is corrupt and "
                           "cannot be opened for writing", s->filename,
                           s->no_write);
        goto fail;
    }
    node->bl.request_alignment = VDI_SECTOR;
    return 0;

fail:
    free_state(s);
    return ret;
}

static int64_t vdi_getlength(vd_node *node)
{
    vdi_state *s = node->opaque;
    return (int64_t)s->disk_size;
}

static uint32_t entry_at(vdi_state *s, uint64_t block)
{
    return fmt_rd32(s->bmap + block * 4);
}

/* The piece of a request at @pos (@left bytes to go) inside one block:
 * its map index in *@block, its offset in the block in *@in; returns its
 * length. */
static uint64_t block_piece(uint64_t pos, uint64_t left, uint64_t *block,
                            uint64_t *in)
{
    uint64_t n;

    *block = pos / VDI_BLOCK_SIZE;
    *in = pos % VDI_BLOCK_SIZE;
    n = VDI_BLOCK_SIZE - *in;
    return n < left ? n : left;
}

static uint64_t block_offset(vdi_state *s, uint32_t e, uint64_t in)
{
    return s->offset_data + (uint64_t)e * VDI_BLOCK_SIZE + in;
}

static int vdi_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                      vd_iov *qiov, unsigned flags, vd_error *err)
{
    vdi_state *s = node->opaque;
    uint64_t done = 0, block, in, n;
    uint32_t e = VDI_UNALLOCATED;
    int ret;

    (void)flags;
    for (; done < bytes; done += n) {
        n = block_piece(off + done, bytes - done, &block, &in);
        if (block < s->blocks_in_image) {
            pthread_rwlock_rdlock(&s->lock);
            e = entry_at(s, block);
            pthread_rwlock_unlock(&s->lock);
        }
        if (block >= s->blocks_in_image || !VDI_IS_ALLOCATED(e)) {
            vd_iov_memset(qiov, done, 0, n);
            continue;
        }
        ret = fmt_file_io(s->file, false, block_offset(s, e, in), qiov,
                          done, n, s->filename, err);
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

/* Allocates a block for map entry @block and writes @n bytes of @qiov at
 * @qoff into it at @in, zeros around them; then the header's count and
 * the map's sector. Lock held for writing. */
static int allocate_block(vdi_state *s, uint64_t block, uint64_t in,
                          uint64_t n, vd_iov *qiov, uint64_t qoff,
                          vd_error *err)
{
    uint32_t idx = s->blocks_allocated;
    uint64_t sec = block * 4 / VDI_SECTOR * VDI_SECTOR;
    uint8_t hdr[VDI_SECTOR];
    uint8_t *buf;
    int ret;

    if (idx >= s->blocks_in_image) {
        return vd_error_set(err, -EIO, "%s: no free block left (%" PRIu32
                            " of %" PRIu32 " allocated)", s->filename, idx,
                            s->blocks_in_image);
    }
    buf = calloc(1, VDI_BLOCK_SIZE);
    if (!buf) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    vd_iov_to_buf(qiov, qoff, buf + in, n);
    ret = vd_child_pwrite(s->file, s->offset_data +
                          (uint64_t)idx * VDI_BLOCK_SIZE, buf,
                          VDI_BLOCK_SIZE, 0, err);
    free(buf);
    if (ret < 0) {
        return ret;
    }
    /* The count first: a crash before the map is written leaks a block,
     * never maps one twice. */
    memcpy(hdr, s->header, VDI_SECTOR);
    fmt_wr32(hdr + H_BLOCKS_ALLOCATED, idx + 1);
    ret = vd_child_pwrite(s->file, 0, hdr, VDI_SECTOR, 0, err);
    if (ret < 0) {
        return ret;
    }
    fmt_wr32(s->header + H_BLOCKS_ALLOCATED, idx + 1);
    s->blocks_allocated = idx + 1;
    fmt_wr32(s->bmap + block * 4, idx);
    ret = vd_child_pwrite(s->file, s->offset_bmap + sec, s->bmap + sec,
                          VDI_SECTOR, 0, err);
    if (ret < 0) {
        /* The map on disk may be stale: refuse further writes rather than
         * hand the block out again. */
        fmt_wr32(s->bmap + block * 4, VDI_UNALLOCATED);
        if (!s->no_write) {
            s->no_write = strdup("a block map update failed");
        }
    }
    return ret;
}

static int vdi_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                       vd_iov *qiov, unsigned flags, vd_error *err)
{
    vdi_state *s = node->opaque;
    uint64_t done = 0, block, in, n;
    uint32_t e;
    int ret;

    (void)flags;
    for (; done < bytes; done += n) {
        n = block_piece(off + done, bytes - done, &block, &in);
        if (block >= s->blocks_in_image) {
            return vd_error_set(err, -EIO, "%s: write at 0x%" PRIx64
                                " beyond the block map", s->filename,
                                off + done);
        }
        pthread_rwlock_rdlock(&s->lock);
        e = entry_at(s, block);
        ret = s->no_write ? vd_error_set(err, -EIO, "%s: %s; writes refused",
                                         s->filename, s->no_write) : 0;
        pthread_rwlock_unlock(&s->lock);
        if (ret < 0) {
            return ret;
        }
        if (!VDI_IS_ALLOCATED(e)) {
            /* Looked up again under the write lock: another writer may
             * have allocated it meanwhile. */
            pthread_rwlock_wrlock(&s->lock);
            e = entry_at(s, block);
            ret = VDI_IS_ALLOCATED(e) ? 1 :
                  allocate_block(s, block, in, n, qiov, done, err);
            pthread_rwlock_unlock(&s->lock);
            if (ret <= 0) {
                if (ret < 0) {
                    return ret;
                }
                continue;
            }
        }
        ret = fmt_file_io(s->file, true, block_offset(s, e, in), qiov,
                          done, n, s->filename, err);
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

/* Runs of unallocated blocks read as zeros; runs of blocks stored one
 * after the other are one extent of the file (QEMU answers block by
 * block; the merged answer is the same map). Static images' blocks may
 * be holes of the file: RECURSE lets it say so, as QEMU. */
static int vdi_block_status(vd_node *node, bool want_zero, uint64_t off,
                            uint64_t bytes, uint64_t *pnum, uint64_t *map,
                            vd_node **file, vd_error *err)
{
    vdi_state *s = node->opaque;
    uint64_t block = off / VDI_BLOCK_SIZE, in = off % VDI_BLOCK_SIZE;
    uint64_t n = VDI_BLOCK_SIZE - in;
    uint32_t e, prev;

    (void)want_zero;
    (void)err;
    if (block >= s->blocks_in_image) {
        *pnum = bytes;
        return VD_BLOCK_ZERO;
    }
    pthread_rwlock_rdlock(&s->lock);
    e = entry_at(s, block);
    prev = e;
    while (n < bytes && block + 1 < s->blocks_in_image) {
        uint32_t next = entry_at(s, block + 1);
        if (VDI_IS_ALLOCATED(e) ? next != prev + 1 : VDI_IS_ALLOCATED(next)) {
            break;
        }
        prev = next;
        block++;
        n += VDI_BLOCK_SIZE;
    }
    pthread_rwlock_unlock(&s->lock);
    *pnum = n < bytes ? n : bytes;
    if (!VDI_IS_ALLOCATED(e)) {
        return VD_BLOCK_ZERO;
    }
    *map = s->offset_data + (uint64_t)e * VDI_BLOCK_SIZE + in;
    *file = s->file->node;
    return VD_BLOCK_DATA | VD_BLOCK_OFFSET_VALID |
           (s->image_type == VDI_TYPE_STATIC ? VD_BLOCK_RECURSE : 0);
}

static int vdi_get_info(vd_node *node, vd_image_info *info, vd_error *err)
{
    (void)node;
    (void)err;
    info->cluster_size = VDI_BLOCK_SIZE;
    info->has_dirty_flag = true;
    info->dirty_flag = false;
    return 0;
}

/* QEMU's vdi check: duplicate and out-of-range map entries, and the
 * allocated count; messages on stderr as QEMU prints them. */
static int vdi_check(vd_node *node, vd_check_result *res, unsigned fix,
                     vd_error *err)
{
    vdi_state *s = node->opaque;
    uint32_t *owner, counted = 0;

    if (fix) {
        return vd_error_set(err, -ENOTSUP, "This image format does not "
                            "support checks");
    }
    owner = malloc(((size_t)s->blocks_in_image ? s->blocks_in_image : 1) *
                   sizeof(*owner));
    if (!owner) {
        res->check_errors++;
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    memset(owner, 0xff, (size_t)s->blocks_in_image * sizeof(*owner));
    pthread_rwlock_rdlock(&s->lock);
    for (uint32_t b = 0; b < s->blocks_in_image; b++) {
        uint32_t e = entry_at(s, b);
        if (!VDI_IS_ALLOCATED(e)) {
            continue;
        }
        if (e < s->blocks_in_image) {
            counted++;
            if (!VDI_IS_ALLOCATED(owner[e])) {
                owner[e] = e;
            } else {
                fprintf(stderr, "ERROR: block index %" PRIu32 " also used "
                        "by %" PRIu32 "\n", owner[e], e);
                res->corruptions++;
            }
        } else {
            fprintf(stderr, "ERROR: block index %" PRIu32 " too large, is %"
                    PRIu32 "\n", b, e);
            res->corruptions++;
        }
    }
    if (counted != s->blocks_allocated) {
        fprintf(stderr, "ERROR: allocated blocks mismatch, is %" PRIu32
                ", should be %" PRIu32 "\n", counted, s->blocks_allocated);
        res->corruptions++;
    }
    pthread_rwlock_unlock(&s->lock);
    free(owner);
    return 0;
}

/* ---- create ---- */

/* A random (version 4) UUID in VDI's byte order: the first three fields
 * little endian, as QEMU stores qemu_uuid_generate()'s. */
static int random_uuid(uint8_t *out, const char *filename, vd_error *err)
{
    uint8_t u[16];
    size_t got = 0;

    while (got < sizeof(u)) {
        ssize_t r = getrandom(u + got, sizeof(u) - got, 0);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return vd_error_set_errno(err, -errno, "%s: no random UUID",
                                      filename);
        }
        got += (size_t)r;
    }
    u[6] = (uint8_t)((u[6] & 0x0f) | 0x40);
    u[8] = (uint8_t)((u[8] & 0x3f) | 0x80);
    out[0] = u[3]; out[1] = u[2]; out[2] = u[1]; out[3] = u[0];
    out[4] = u[5]; out[5] = u[4];
    out[6] = u[7]; out[7] = u[6];
    memcpy(out + 8, u + 8, 8);
    return 0;
}

static int vdi_create(const char *filename, vd_opts *opts, vd_error *err)
{
    uint64_t size = 0, blocks, bmap_bytes;
    bool is_static = false;
    vd_node *file = NULL;
    uint8_t *buf = NULL;
    int ret;

    ret = vd_opts_take_size(opts, "size", 0, &size, err);
    if (ret == 0) {
        ret = vd_opts_take_bool(opts, "static", false, &is_static, err);
    }
    if (ret < 0) {
        return ret;
    }
    /* Silently rounded up to a sector, as QEMU. */
    size = (size + VDI_SECTOR - 1) & ~(uint64_t)(VDI_SECTOR - 1);
    /* The rest (preallocation, nocow, ...) is the protocol's, which QEMU
     * creates empty: the vdi options, size included, are gone by then. */
    ret = fmt_create_file(filename, opts, err);
    if (ret < 0) {
        return ret;
    }
    if (size > VDI_DISK_SIZE_MAX) {
        return vd_error_set(err, -ENOTSUP, "%s: Unsupported VDI image size "
                            "(size is 0x%" PRIx64 ", max supported is 0x%"
                            PRIx64 ")", filename, size, VDI_DISK_SIZE_MAX);
    }
    ret = vd_open_protocol(&file, filename, VD_NODE_RDWR, err);
    if (ret < 0) {
        return ret;
    }
    blocks = (size + VDI_BLOCK_SIZE - 1) / VDI_BLOCK_SIZE;
    bmap_bytes = (blocks * 4 + VDI_SECTOR - 1) & ~(uint64_t)(VDI_SECTOR - 1);
    buf = calloc(1, VDI_SECTOR + bmap_bytes);
    if (!buf) {
        ret = vd_error_set(err, -ENOMEM, "%s: Could not allocate bmap",
                           filename);
        goto out;
    }
    memcpy(buf, VDI_TEXT, sizeof(VDI_TEXT) - 1);
    fmt_wr32(buf + H_SIGNATURE, VDI_SIGNATURE);
    fmt_wr32(buf + H_VERSION, VDI_VERSION_1_1);
    fmt_wr32(buf + H_HEADER_SIZE, 0x180);
    fmt_wr32(buf + H_IMAGE_TYPE, is_static ? VDI_TYPE_STATIC : VDI_TYPE_DYNAMIC);
    fmt_wr32(buf + H_OFFSET_BMAP, VDI_SECTOR);
    fmt_wr32(buf + H_OFFSET_DATA, (uint32_t)(VDI_SECTOR + bmap_bytes));
    fmt_wr32(buf + H_SECTOR_SIZE, VDI_SECTOR);
    fmt_wr64(buf + H_DISK_SIZE, size);
    fmt_wr32(buf + H_BLOCK_SIZE, VDI_BLOCK_SIZE);
    fmt_wr32(buf + H_BLOCKS_IN_IMAGE, (uint32_t)blocks);
    fmt_wr32(buf + H_BLOCKS_ALLOCATED, is_static ? (uint32_t)blocks : 0);
    ret = random_uuid(buf + H_UUID_IMAGE, filename, err);
    if (ret == 0) {
        ret = random_uuid(buf + H_UUID_LAST_SNAP, filename, err);
    }
    if (ret < 0) {
        goto out;
    }
    for (uint64_t i = 0; i < blocks; i++) {
        fmt_wr32(buf + VDI_SECTOR + i * 4,
             is_static ? (uint32_t)i : VDI_UNALLOCATED);
    }
    {
        vd_iov v;
        vd_iov_init_buf(&v, buf, VDI_SECTOR + bmap_bytes);
        ret = vd_node_pwritev(file, 0, VDI_SECTOR + bmap_bytes, &v, 0, err);
    }
    if (ret == 0 && is_static) {
        /* Sized to hold every block, left sparse (QEMU truncates with
         * preallocation off). */
        ret = vd_node_truncate(file, VDI_SECTOR + bmap_bytes +
                               blocks * VDI_BLOCK_SIZE, false,
                               VD_PREALLOC_OFF, err);
        if (ret < 0) {
            vd_error_prepend(err, "Failed to statically allocate file");
        }
    }
    if (ret == 0) {
        ret = vd_node_flush(file, err);
    }
out:
    vd_node_unref(file);
    free(buf);
    return ret;
}

/* qemu-img create -f vdi -o help: QEMU's vdi_create_opts (the protocol's
 * preallocation and the others follow from the file driver). */
static const vd_create_option vdi_create_opts[] = {
    { "size", "size", "Virtual disk size", NULL },
    { "static", "bool", "VDI static (pre-allocated) image", "off" },
    { NULL, NULL, NULL, NULL },
};

const vd_driver vd_driver_vdi = {
    .name = "vdi",
    .instance_size = sizeof(vdi_state),
    .is_format = true,
    .create_opts = vdi_create_opts,
    .probe = vdi_probe,
    .open = vdi_open,
    .close = vdi_close,
    .create = vdi_create,
    .preadv = vdi_preadv,
    .pwritev = vdi_pwritev,
    .block_status = vdi_block_status,
    .getlength = vdi_getlength,
    .get_info = vdi_get_info,
    .check = vdi_check,
};
