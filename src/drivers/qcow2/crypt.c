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
 * vdisk opens such images read-only: writing them (and creating them)
 * is refused with a message saying so, not half done.
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
};

/* QEMU's qcow2_crypto_hdr_read_func: reads inside the extension only. */
static int hdr_io(void *opaque, bool write, uint64_t off, uint8_t *buf,
                  size_t len, vd_error *err)
{
    qcow2_crypt *c = opaque;

    if (write) {
        return -EROFS;
    }
    if (off > c->hdr_len || len > c->hdr_len - off) {
        return vd_error_set(err, -EINVAL, "Request for data outside of "
                            "extension header");
    }
    return vd_child_pread(c->file, c->hdr_off + off, buf, len, err);
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
    ret = c->method == QCOW2_CRYPT_LUKS
          ? open_luks(s, c, secret, no_io, flen, err)
          : open_aes(c, secret, no_io, err);
    if (ret < 0) {
        free(c);
        goto out;
    }
    s->crypt = c;
    if (!s->node->read_only && !no_io) {
        qcow2_crypt_close(s);
        ret = vd_error_set(err, -ENOTSUP, "%s: vdisk reads encrypted qcow2 "
                           "images only; open it read-only", s->filename);
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
