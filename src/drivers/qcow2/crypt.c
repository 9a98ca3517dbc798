/*
 * qcow2 encryption, read side: images with crypt_method 2 (LUKS, QEMU's
 * encrypt.format=luks: a LUKS1 header in clusters of the file, named by
 * the full disk encryption header extension 0x0537be77 of
 * ../shared/specs/qcow2.txt) and crypt_method 1 (the legacy
 * encrypt.format=aes: AES-128-CBC keyed with the passphrase's first 16
 * bytes, plain64 IVs). The LUKS header, key slots and ciphers are
 * crypto/luks.c's and crypto/cipher.c's (nettle).
 *
 * Data clusters are decrypted per 512-byte sector: LUKS counts sectors
 * by host offset, the legacy AES by guest offset (QEMU's
 * crypt_physical_offset). The node's request alignment becomes 512.
 * Block status never points into the file (the data there is
 * ciphertext) and copy offloading is refused, as in QEMU.
 *
 * LUKS images are also written and created: every write of guest data
 * to a data cluster goes through qcow2_crypt_pwritev() (a bounce buffer
 * encrypted for the host offset it lands at, so copy-on-write data read
 * from the old cluster is encrypted again for the new one), and
 * qcow2_crypt_create() puts a new LUKS1 header into clusters of its own
 * as qemu-img does (QEMU's qcow2_set_up_encryption). Nothing that writes
 * to the file may write plaintext or raw zeros meant to read as zeros:
 * cluster.c skips its zero-the-COW-area shortcut, compressed writes,
 * copy offloading and preallocation are refused for encrypted images.
 * The legacy AES format is read only: writing it is refused, and it is
 * never created.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crypto/luks.h"
#include "qcow2.h"

struct qcow2_crypt {
    uint32_t method;
    bool keyed;                 /* opened with I/O: the ciphers are set */
    vd_luks luks;               /* LUKS */
    vd_cipher aes;              /* legacy AES */
    vd_ivgen ivg;
    uint64_t hdr_off, hdr_len;  /* LUKS header in the file */
    vd_child *file;
    qcow2_state *s;             /* for the header allocation of create */
};

/* Bounce buffer size of the write path. */
#define CRYPT_MAX_IO (1u << 20)

/* QEMU's qcow2_crypto_hdr_{read,write}_func: inside the extension only. */
static int hdr_io(void *opaque, bool write, uint64_t off, uint8_t *buf,
                  size_t len, vd_error *err)
{
    qcow2_crypt *c = opaque;

    if (off > c->hdr_len || len > c->hdr_len - off) {
        return vd_error_set(err, -EINVAL, "Request for data outside of "
                            "extension header");
    }
    return write ? vd_child_pwrite(c->file, c->hdr_off + off, buf, len, 0,
                                   err)
                 : vd_child_pread(c->file, c->hdr_off + off, buf, len, err);
}

static int open_luks(qcow2_state *s, qcow2_crypt *c, const char *secret,
                     bool no_io, int64_t flen, vd_error *err)
{
    uint8_t hdr[VD_LUKS_HDR_SIZE];
    int ret;

    if (!s->has_crypto_ext) {
        return vd_error_set(err, -EINVAL, "Missing CRYPTO header for crypt "
                            "method 2");
    }
    c->hdr_off = s->crypto_ext_offset;
    c->hdr_len = s->crypto_ext_length;
    if (c->hdr_off % s->cluster_size) {
        return vd_error_set(err, -EINVAL, "Encryption header offset '%"
                            PRIu64 "' is not a multiple of cluster size '%"
                            PRIu64 "'", c->hdr_off, s->cluster_size);
    }
    /* Beyond QEMU: the header's clusters lie inside the file. */
    if (c->hdr_len < VD_LUKS_HDR_SIZE || c->hdr_off > (uint64_t)flen ||
        c->hdr_len > (uint64_t)flen - c->hdr_off) {
        return vd_error_set(err, -EINVAL, "%s: encryption header at 0x%"
                            PRIx64 " (0x%" PRIx64 " bytes) is outside the "
                            "file", s->filename, c->hdr_off, c->hdr_len);
    }
    ret = vd_child_pread(c->file, c->hdr_off, hdr, sizeof(hdr), err);
    if (ret < 0) {
        return ret;
    }
    ret = vd_luks_open(&c->luks, hdr, secret, "encrypt.", no_io, hdr_io, c,
                       err);
    if (ret < 0) {
        return ret;
    }
    c->keyed = !no_io;
    return 0;
}

static int open_aes(qcow2_crypt *c, const char *secret, bool no_io,
                    vd_error *err)
{
    uint8_t key[16] = { 0 };
    char *pw;
    size_t n;
    int ret;

    if (no_io) {
        return 0;
    }
    if (!secret) {
        return vd_error_set(err, -EINVAL, "Parameter 'encrypt.key-secret' "
                            "is required for cipher");
    }
    pw = vd_secret_get_utf8(secret, err);
    if (!pw) {
        return -EINVAL;
    }
    n = strlen(pw);
    memcpy(key, pw, n > sizeof(key) ? sizeof(key) : n);
    explicit_bzero(pw, n);
    free(pw);
    ret = vd_cipher_init(&c->aes, VD_CIPHER_AES_128, VD_MODE_CBC, key,
                         sizeof(key), err);
    explicit_bzero(key, sizeof(key));
    if (ret == 0) {
        ret = vd_ivgen_init(&c->ivg, VD_IVGEN_PLAIN64, VD_CIPHER_AES_128,
                            VD_HASH_SHA256, NULL, 0, err);
        if (ret < 0) {
            vd_cipher_free(&c->aes);
        }
    }
    c->keyed = ret == 0;
    return ret;
}

int qcow2_crypt_open(qcow2_state *s, vd_opts *opts, unsigned flags,
                     vd_error *err)
{
    static const char *const names[] = { "", "aes", "luks" };
    bool no_io = (flags & VD_NODE_NO_IO) != 0;
    char *format = vd_opts_take(opts, "encrypt.format");
    char *secret = vd_opts_take(opts, "encrypt.key-secret");
    int64_t flen = vd_node_getlength(s->file->node);
    qcow2_crypt *c;
    int ret;

    if (s->has_crypto_ext && s->crypt_method != QCOW2_CRYPT_LUKS) {
        ret = vd_error_set(err, -EINVAL, "CRYPTO header extension only "
                           "expected with LUKS encryption method");
        goto out;
    }
    if (format && strcmp(format, names[s->crypt_method]) != 0) {
        ret = vd_error_set(err, -EINVAL, "Header reported '%s' encryption "
                           "format but options specify '%s'",
                           names[s->crypt_method], format);
        goto out;
    }
    if (flen < 0) {
        ret = vd_error_set(err, (int)flen, "%s: cannot get the file length",
                           s->filename);
        goto out;
    }
    c = calloc(1, sizeof(*c));
    if (!c) {
        ret = vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
        goto out;
    }
    c->method = s->crypt_method;
    c->file = s->file;
    c->s = s;
    ret = c->method == QCOW2_CRYPT_LUKS
          ? open_luks(s, c, secret, no_io, flen, err)
          : open_aes(c, secret, no_io, err);
    if (ret < 0) {
        free(c);
        goto out;
    }
    s->crypt = c;
    if (c->method == QCOW2_CRYPT_AES && !s->node->read_only && !no_io) {
        qcow2_crypt_close(s);
        ret = vd_error_set(err, -ENOTSUP, "%s: vdisk does not write qcow2 "
                           "images with the legacy AES encryption "
                           "(encrypt.format=aes, which QEMU no longer opens "
                           "in system emulators); open it read-only, or "
                           "convert it to encrypt.format=luks", s->filename);
    }
out:
    free(format);
    free(secret);
    return ret;
}

void qcow2_crypt_close(qcow2_state *s)
{
    qcow2_crypt *c = s->crypt;

    if (!c) {
        return;
    }
    if (c->method == QCOW2_CRYPT_LUKS) {
        vd_luks_free(&c->luks);
    } else if (c->keyed) {
        vd_cipher_free(&c->aes);
        vd_ivgen_free(&c->ivg);
    }
    explicit_bzero(c, sizeof(*c));
    free(c);
    s->crypt = NULL;
}

int qcow2_crypt_read(qcow2_state *s, uint64_t host, uint64_t guest,
                     uint64_t bytes, vd_iov *qiov, size_t qiov_off,
                     vd_error *err)
{
    qcow2_crypt *c = s->crypt;
    uint8_t *buf;
    int ret;

    if (!c->keyed) {
        return vd_error_set(err, -EIO, "%s: the image was opened without "
                            "its key", s->filename);
    }
    if (host % VD_LUKS_SECTOR || guest % VD_LUKS_SECTOR ||
        bytes % VD_LUKS_SECTOR) {
        return vd_error_set(err, -EIO, "%s: unaligned encrypted read",
                            s->filename);
    }
    buf = malloc(bytes);
    if (!buf) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    ret = vd_child_pread(s->data_file, host, buf, bytes, err);
    if (ret == 0) {
        if (c->method == QCOW2_CRYPT_LUKS) {
            vd_luks_crypt(&c->luks, host / VD_LUKS_SECTOR, buf, bytes, false);
        } else {
            vd_crypt_sectors(&c->aes, &c->ivg, VD_LUKS_SECTOR,
                             guest / VD_LUKS_SECTOR, buf, bytes, false);
        }
        vd_iov_from_buf(qiov, qiov_off, buf, bytes);
    }
    explicit_bzero(buf, bytes);
    free(buf);
    return ret;
}

char *qcow2_crypt_info_json(const qcow2_state *s)
{
    const qcow2_crypt *c = s->crypt;
    char *luks, *out = NULL;

    if (c->method != QCOW2_CRYPT_LUKS) {
        return strdup("{\"format\": \"aes\"}");
    }
    luks = vd_luks_info_json(&c->luks);
    /* The LUKS object with "format" in front of its members. */
    if (luks && luks[0] == '{' &&
        asprintf(&out, "{\"format\": \"luks\", %s", luks + 1) < 0) {
        out = NULL;
    }
    free(luks);
    return out;
}

int qcow2_crypt_pwritev(qcow2_state *s, uint64_t host, uint64_t bytes,
                        vd_iov *qiov, size_t qiov_off, unsigned flags,
                        vd_error *err)
{
    qcow2_crypt *c = s->crypt;
    size_t cap = bytes < CRYPT_MAX_IO ? bytes : CRYPT_MAX_IO;
    uint8_t *buf;
    uint64_t done = 0;
    int ret = 0;

    /* Open refuses a writable AES image; without the key (no I/O) there
     * is nothing to encrypt with. */
    if (!c->keyed || c->method != QCOW2_CRYPT_LUKS) {
        return vd_error_set(err, -EIO, "%s: the image was opened without "
                            "its key", s->filename);
    }
    if (host % VD_LUKS_SECTOR || bytes % VD_LUKS_SECTOR) {
        return vd_error_set(err, -EIO, "%s: unaligned encrypted write",
                            s->filename);
    }
    if (bytes == 0) {
        return 0;
    }
    /* Beyond QEMU, whose overlap checks do not know the LUKS header: a
     * damaged L2 entry pointing into it would destroy the key material. */
    if (s->data_file == s->file && host < c->hdr_off + c->hdr_len &&
        c->hdr_off < host + bytes) {
        return vd_error_set(err, -EIO, "%s: a write at 0x%" PRIx64 " would "
                            "overlap the encryption header at 0x%" PRIx64
                            "; refused", s->filename, host, c->hdr_off);
    }
    buf = vd_node_blockalign(s->data_file->node, cap);
    if (!buf) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    /* The guest's buffers are never encrypted in place. */
    while (ret == 0 && done < bytes) {
        size_t n = bytes - done < cap ? (size_t)(bytes - done) : cap;
        vd_iov_to_buf(qiov, qiov_off + done, buf, n);
        vd_luks_crypt(&c->luks, (host + done) / VD_LUKS_SECTOR, buf, n, true);
        ret = vd_child_pwrite(s->data_file, host + done, buf, n,
                              flags & VD_REQ_FUA, err);
        done += n;
    }
    explicit_bzero(buf, cap);
    free(buf);
    return ret;
}

/* QEMU's qcow2_crypto_hdr_init_func: the header's clusters, zero-filled
 * so that the parts LUKS leaves unwritten have a known content. */
static int create_init(void *opaque, uint64_t payload, vd_error *err)
{
    qcow2_crypt *c = opaque;
    qcow2_state *s = c->s;
    uint64_t len = (payload + s->cluster_size - 1) & ~(s->cluster_size - 1);
    int64_t off;

    off = qcow2_alloc_clusters(s, payload, err);
    if (off < 0) {
        return (int)off;
    }
    c->hdr_off = (uint64_t)off;
    c->hdr_len = payload;
    return vd_node_pwrite_zeroes(s->file->node, c->hdr_off, len, 0, err);
}

int qcow2_crypt_create(qcow2_state *s, const struct vd_luks_create_opts *o,
                       vd_error *err)
{
    qcow2_crypt *c = calloc(1, sizeof(*c));
    int ret;

    if (!c) {
        return vd_error_set(err, -ENOMEM, "%s: out of memory", s->filename);
    }
    c->method = QCOW2_CRYPT_LUKS;
    c->file = s->file;
    c->s = s;
    pthread_mutex_lock(&s->lock);
    ret = vd_luks_create(&c->luks, o, "encrypt.", create_init, hdr_io, c,
                         err);
    if (ret == 0) {
        /* The refcounts of the header's clusters reach the disk before
         * the header that names them. */
        ret = qcow2_flush_caches(s, err);
        if (ret < 0) {
            vd_luks_free(&c->luks);
        }
    }
    if (ret == 0) {
        c->keyed = true;
        s->crypt = c;
        s->crypt_method = QCOW2_CRYPT_LUKS;
        s->has_crypto_ext = true;
        s->crypto_ext_offset = c->hdr_off;
        s->crypto_ext_length = c->hdr_len;
        ret = qcow2_update_header(s, err);
    } else {
        free(c);
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

/* QEMU's qcow2_amend_options() refusals and its words. */
static int crypt_amendable(qcow2_state *s, vd_error *err)
{
    if (!s->crypt) {
        return vd_error_set(err, -EINVAL, "Can't amend encryption options "
                            "- encryption not present");
    }
    if (s->crypt->method != QCOW2_CRYPT_LUKS) {
        return vd_error_set(err, -EINVAL, "Only LUKS encryption options can "
                            "be amended");
    }
    return 0;
}

int qcow2_crypt_amend(qcow2_state *s, vd_opts *opts, bool force,
                      vd_error *err)
{
    int ret = crypt_amendable(s, err);

    return ret < 0 ? ret : vd_luks_amend(&s->crypt->luks, opts, "encrypt.",
                                         force, hdr_io, s->crypt, err);
}

int qcow2_crypt_amend_plan(qcow2_state *s, vd_opts *opts, bool force,
                           unsigned *active, unsigned *activate,
                           unsigned *erase, vd_error *err)
{
    int ret = crypt_amendable(s, err);

    return ret < 0 ? ret : vd_luks_amend_plan(&s->crypt->luks, opts,
                                              "encrypt.", force, hdr_io,
                                              s->crypt, active, activate, erase,
                                              err);
}

/* Compaction (compact.c) moves encrypted clusters: LUKS derives each
 * sector's IV from its host offset, so the bytes are decrypted with the
 * old place's IVs and encrypted with the new place's. */
int qcow2_crypt_rehost(qcow2_state *s, uint8_t *buf, uint64_t bytes,
                       uint64_t old_host, uint64_t new_host, vd_error *err)
{
    qcow2_crypt *c = s->crypt;

    if (!c || !c->keyed || c->method != QCOW2_CRYPT_LUKS) {
        return vd_error_set(err, -ENOTSUP, "%s: moving encrypted clusters "
                            "needs the image's LUKS key (encrypt.key-secret)",
                            s->filename);
    }
    if (old_host % VD_LUKS_SECTOR || new_host % VD_LUKS_SECTOR ||
        bytes % VD_LUKS_SECTOR) {
        return vd_error_set(err, -EIO, "%s: unaligned encrypted move",
                            s->filename);
    }
    vd_luks_crypt(&c->luks, old_host / VD_LUKS_SECTOR, buf, bytes, false);
    vd_luks_crypt(&c->luks, new_host / VD_LUKS_SECTOR, buf, bytes, true);
    return 0;
}

/* The LUKS header was moved by compaction to @off. */
void qcow2_crypt_header_moved(qcow2_state *s, uint64_t off)
{
    if (s->crypt) {
        s->crypt->hdr_off = off;
    }
}
