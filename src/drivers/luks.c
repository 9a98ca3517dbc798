/*
 * The luks driver: a LUKS1 volume in a file, as QEMU 7.2's block/crypto.c
 * opens, reads, writes, creates, resizes and amends it. The header, key
 * slots and ciphers are crypto/luks.c's; this file maps guest requests
 * onto the payload: guest byte B is stored encrypted at payload_offset + B
 * of the file, in 512-byte sectors whose IVs count from guest sector 0.
 *
 * Open takes the runtime option key-secret (the id of a --object secret
 * holding the passphrase), required unless the node is opened without
 * I/O (qemu-img info reads the header only). Data goes through a bounce
 * buffer of at most 1 MiB per piece (the guest's buffers are never
 * encrypted in place); the plaintext of a write never reaches the file.
 * There is no block status of its own: every extent is data, as QEMU
 * reports (the file's holes say nothing about encrypted zeros).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crypto/luks.h"
#include "simple-fmt.h"

#define LUKS_MAX_IO (1u << 20)

typedef struct luks_state {
    vd_luks l;
    vd_child *file;
    const char *filename;
    uint64_t payload;           /* bytes */
} luks_state;

static int luks_probe(const uint8_t *buf, size_t len, const char *filename)
{
    static const uint8_t magic[6] = { 'L', 'U', 'K', 'S', 0xba, 0xbe };

    (void)filename;
    /* As QEMU: the magic and version 1 (a LUKS2 volume is not probed). */
    return len >= 8 && memcmp(buf, magic, 6) == 0 && buf[6] == 0 &&
           buf[7] == 1 ? 100 : 0;
}

static int file_io(void *opaque, bool write, uint64_t off, uint8_t *buf,
                   size_t len, vd_error *err)
{
    vd_child *file = opaque;

    return write ? vd_child_pwrite(file, off, buf, len, 0, err)
                 : vd_child_pread(file, off, buf, len, err);
}

static void luks_close(vd_node *node)
{
    luks_state *s = node->opaque;
    vd_luks_free(&s->l);
}

static int luks_open(vd_node *node, vd_opts *opts, unsigned flags,
                     vd_error *err)
{
    luks_state *s = node->opaque;
    uint8_t hdr[VD_LUKS_HDR_SIZE] = { 0 };
    char *secret = vd_opts_take(opts, "key-secret");
    int64_t flen;
    int ret;

    s->file = node->file;
    s->filename = node->filename ? node->filename : "luks";
    flen = fmt_read_head(s->file, hdr, sizeof(hdr), s->filename, err);
    if (flen < 0) {
        free(secret);
        return (int)flen;
    }
    ret = vd_luks_open(&s->l, hdr, secret, NULL,
                       (flags & VD_NODE_NO_IO) != 0, file_io, s->file, err);
    free(secret);
    if (ret < 0) {
        return ret;
    }
    s->payload = vd_luks_payload_bytes(&s->l);
    if (s->payload > (uint64_t)flen) {
        vd_luks_free(&s->l);
        return vd_error_set(err, -EINVAL, "%s: payload offset 0x%" PRIx64
                            " is beyond the end of the file (0x%" PRIx64 ")",
                            s->filename, s->payload, (uint64_t)flen);
    }
    node->bl.request_alignment = VD_LUKS_SECTOR;
    node->bl.max_transfer = LUKS_MAX_IO;
    return 0;
}

static int64_t luks_getlength(vd_node *node)
{
    luks_state *s = node->opaque;
    int64_t len = vd_node_getlength(s->file->node);

    if (len < 0) {
        return len;
    }
    if ((uint64_t)len < s->payload) {
        return -EIO;
    }
    return len - (int64_t)s->payload;
}

static int luks_rw(vd_node *node, uint64_t off, uint64_t bytes, vd_iov *qiov,
                   bool write, vd_error *err)
{
    luks_state *s = node->opaque;
    size_t cap = bytes < LUKS_MAX_IO ? bytes : LUKS_MAX_IO;
    uint8_t *buf = vd_node_blockalign(s->file->node, cap);
    uint64_t done = 0;
    int ret = 0;

    if (!s->l.unlocked) {
        /* opened without I/O (info): no key to en- or decrypt with */
        free(buf);
        return vd_error_set(err, -EIO, "%s: the image was opened without "
                            "its key", s->filename);
    }
    if (!buf) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    while (done < bytes && ret == 0) {
        size_t n = bytes - done < cap ? bytes - done : cap;
        uint64_t sector = (off + done) / VD_LUKS_SECTOR;

        if (write) {
            vd_iov_to_buf(qiov, done, buf, n);
            vd_luks_crypt(&s->l, sector, buf, n, true);
            ret = vd_child_pwrite(s->file, s->payload + off + done, buf, n, 0,
                                  err);
        } else {
            ret = vd_child_pread(s->file, s->payload + off + done, buf, n,
                                 err);
            if (ret == 0) {
                vd_luks_crypt(&s->l, sector, buf, n, false);
                vd_iov_from_buf(qiov, done, buf, n);
            }
        }
        done += n;
    }
    explicit_bzero(buf, cap);
    free(buf);
    return ret;
}

static int luks_preadv(vd_node *node, uint64_t off, uint64_t bytes,
                       vd_iov *qiov, unsigned flags, vd_error *err)
{
    (void)flags;
    return luks_rw(node, off, bytes, qiov, false, err);
}

static int luks_pwritev(vd_node *node, uint64_t off, uint64_t bytes,
                        vd_iov *qiov, unsigned flags, vd_error *err)
{
    (void)flags;
    return luks_rw(node, off, bytes, qiov, true, err);
}

/* Everything is data (QEMU's default for a driver without block status):
 * not the file's extents, which are ciphertext at another offset. */
static int luks_block_status(vd_node *node, bool want_zero, uint64_t off,
                             uint64_t bytes, uint64_t *pnum, uint64_t *map,
                             vd_node **file, vd_error *err)
{
    (void)node; (void)want_zero; (void)off; (void)map; (void)file;
    (void)err;
    *pnum = bytes;
    return VD_BLOCK_DATA | VD_BLOCK_ALLOCATED;
}

static int luks_truncate(vd_node *node, uint64_t size, bool exact,
                         vd_prealloc prealloc, vd_error *err)
{
    luks_state *s = node->opaque;

    if (size > (uint64_t)INT64_MAX - s->payload) {
        return vd_error_set(err, -EFBIG, "The requested file size is too "
                            "large");
    }
    return vd_node_truncate(s->file->node, s->payload + size, exact, prealloc,
                            err);
}

static int luks_get_info(vd_node *node, vd_image_info *info, vd_error *err)
{
    luks_state *s = node->opaque;
    char *data = vd_luks_info_json(&s->l), *json = NULL;

    info->encrypted = true;
    info->has_dirty_flag = true;
    info->dirty_flag = false;
    if (!data || asprintf(&json, "{\"type\": \"luks\", \"data\": %s}",
                          data) < 0) {
        free(data);
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    free(data);
    free(info->format_specific_json);
    info->format_specific_json = json;
    return 0;
}

static int luks_amend(vd_node *node, vd_opts *opts, bool force,
                      vd_error *err)
{
    luks_state *s = node->opaque;

    return vd_luks_amend(&s->l, opts, "", force, file_io, s->file, err);
}

/* The dry run of luks_amend(): its checks, secrets included, and the key
 * slots that would change. */
static int luks_amend_plan(vd_node *node, vd_opts *opts, bool force,
                           vd_amend_change_fn fn, void *opaque, vd_error *err)
{
    luks_state *s = node->opaque;
    unsigned active, activate, erase;
    int ret = vd_luks_amend_plan(&s->l, opts, "", force, file_io, s->file,
                                 &active, &activate, &erase, err);

    if (ret == 0 && fn) {
        vd_luks_plan_report("", active, activate, erase, fn, opaque);
    }
    return ret;
}

typedef struct create_ctx {
    vd_node *file;
    vd_child fake;
    uint64_t size;
    vd_prealloc prealloc;
} create_ctx;

static int create_io(void *opaque, bool write, uint64_t off, uint8_t *buf,
                     size_t len, vd_error *err)
{
    create_ctx *c = opaque;
    vd_iov v;

    vd_iov_init_buf(&v, buf, len);
    return write ? vd_node_pwritev(c->file, off, len, &v, 0, err)
                 : vd_node_preadv(c->file, off, len, &v, 0, err);
}

static int create_init(void *opaque, uint64_t payload, vd_error *err)
{
    create_ctx *c = opaque;

    if (c->size > (uint64_t)INT64_MAX || payload > INT64_MAX - c->size) {
        return vd_error_set(err, -EFBIG, "The requested file size is too "
                            "large");
    }
    return vd_node_truncate(c->file, payload + c->size, false, c->prealloc,
                            err);
}

static int luks_create(const char *filename, vd_opts *opts, vd_error *err)
{
    static const char *const prealloc_names[] = { "off", "metadata",
                                                  "falloc", "full", NULL };
    vd_luks_create_opts o;
    create_ctx c = { 0 };
    int pa = 0, ret;
    vd_luks l;

    ret = vd_opts_take_size(opts, "size", 0, &c.size, err);
    if (ret == 0) {
        ret = vd_opts_take_enum(opts, "preallocation", prealloc_names, 0, &pa,
                                err);
    }
    if (ret < 0) {
        return ret;
    }
    c.prealloc = (vd_prealloc)pa;
    ret = vd_luks_create_opts_take(opts, "", &o, err);
    if (ret < 0) {
        return ret;
    }
    /* Refusals before the file exists (QEMU deletes it after them). */
    ret = vd_luks_create_check(&o, NULL, err);
    if (ret == 0) {
        ret = fmt_create_file(filename, opts, err);
    }
    if (ret == 0) {
        ret = vd_open_protocol(&c.file, filename, VD_NODE_RDWR, err);
    }
    if (ret == 0) {
        ret = vd_luks_create(&l, &o, NULL, create_init, create_io, &c, err);
        if (ret == 0) {
            vd_luks_free(&l);
            ret = vd_node_flush(c.file, err);
        }
    }
    if (c.file) {
        vd_node_unref(c.file);
    }
    vd_luks_create_opts_free(&o);
    return ret;
}

/* qemu-img create -f luks -o help: QEMU's block_crypto_create_opts_luks. */
static const vd_create_option luks_create_opts[] = {
    { "size", "size", "Virtual disk size", NULL },
    { "key-secret", "string", "ID of the secret that provides the keyslot "
      "passphrase", NULL },
    { "cipher-alg", "string", "Name of encryption cipher algorithm", NULL },
    { "cipher-mode", "string", "Name of encryption cipher mode", NULL },
    { "ivgen-alg", "string", "Name of IV generator algorithm", NULL },
    { "ivgen-hash-alg", "string", "Name of IV generator hash algorithm",
      NULL },
    { "hash-alg", "string", "Name of encryption hash algorithm", NULL },
    { "iter-time", "number", "Time to spend in PBKDF in milliseconds", NULL },
    { NULL, NULL, NULL, NULL },
};

/* qemu-img amend -f luks -o help: block_crypto_amend_opts_luks. */
static const vd_create_option luks_amend_opts[] = {
    { "state", "string", "Select new state of affected keyslots "
      "(active/inactive)", NULL },
    { "keyslot", "number", "Select a single keyslot to modify explicitly",
      NULL },
    { "old-secret", "string", "Select all keyslots that match this password",
      NULL },
    { "new-secret", "string", "New secret to set in the matching keyslots. "
      "Empty string to erase", NULL },
    { "iter-time", "number", "Time to spend in PBKDF in milliseconds", NULL },
    { NULL, NULL, NULL, NULL },
};

const vd_driver vd_driver_luks = {
    .name = "luks",
    .instance_size = sizeof(luks_state),
    .is_format = true,
    .no_zero_init = true,
    .create_opts = luks_create_opts,
    .amend_opts = luks_amend_opts,
    .probe = luks_probe,
    .open = luks_open,
    .close = luks_close,
    .create = luks_create,
    .preadv = luks_preadv,
    .pwritev = luks_pwritev,
    .block_status = luks_block_status,
    .getlength = luks_getlength,
    .truncate = luks_truncate,
    .get_info = luks_get_info,
    .amend = luks_amend,
    .amend_plan = luks_amend_plan,
};
