/*
 * The secret object class (QEMU's crypto/secret.c behaviour, 7.2): data
 * given inline (data=) or read from a file (file=), optionally base64
 * (format=base64), optionally AES-256-CBC-encrypted with the data of
 * another secret as key (keyid=, with a base64 iv=). The plain bytes are
 * computed once, when the object is added; vd_secret_get() hands out
 * copies. Decryption is gnutls's (no cipher code here); a build without
 * gnutls refuses keyid= with a message saying so.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifdef VDISK_HAVE_GNUTLS
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#endif

#include "core/object.h"

/* A secret file larger than this is refused rather than read whole. */
#define SECRET_FILE_MAX (16u << 20)

/* glib's quotes around file names in its messages (“ and ”). */
#define LQ "\xe2\x80\x9c"
#define RQ "\xe2\x80\x9d"

typedef struct secret {
    vd_object obj;
    char *data, *file, *keyid, *iv;
    int format;                 /* index into format_values */
    unsigned char *raw;         /* the plain bytes, NUL after them */
    size_t rawlen;
} secret;

static const char *const format_values[] = { "raw", "base64", NULL };
enum { FORMAT_RAW, FORMAT_BASE64 };

static const obj_type format_type = { OBJ_ENUM, "QCryptoSecretFormat",
                                      format_values, NULL, NULL };

static void wipe_free(unsigned char *p, size_t len)
{
    if (p) {
        explicit_bzero(p, len);
        free(p);
    }
}

/* g_file_get_contents() with its messages behind QEMU's "Unable to read
 * FILE: ". */
static int read_file(const char *path, unsigned char **out, size_t *outlen,
                     vd_error *err)
{
    unsigned char *buf = NULL;
    size_t len = 0, cap = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0) {
        return vd_error_set(err, -errno, "Unable to read %s: Failed to open "
                            "file " LQ "%s" RQ ": %s", path, path,
                            strerror(errno));
    }
    for (;;) {
        ssize_t n;
        if (len + 1 >= cap) {
            unsigned char *nb;
            if (cap >= SECRET_FILE_MAX) {
                wipe_free(buf, len);
                close(fd);
                return vd_error_set(err, -EFBIG, "Unable to read %s: File "
                                    LQ "%s" RQ " is too large", path, path);
            }
            cap = cap ? cap * 2 : 4096;
            nb = malloc(cap);
            if (!nb) {
                wipe_free(buf, len);
                close(fd);
                return vd_error_set(err, -ENOMEM, "Out of memory");
            }
            if (buf) {
                memcpy(nb, buf, len);
            }
            wipe_free(buf, len);
            buf = nb;
        }
        n = read(fd, buf + len, cap - len - 1);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            int e = errno;
            wipe_free(buf, len);
            close(fd);
            return vd_error_set(err, -e, "Unable to read %s: Error reading "
                                "file " LQ "%s" RQ ": %s", path, path,
                                strerror(e));
        }
        if (n == 0) {
            break;
        }
        len += (size_t)n;
    }
    close(fd);
    buf[len] = '\0';
    *out = buf;
    *outlen = len;
    return 0;
}

#ifdef VDISK_HAVE_GNUTLS
static int aes256cbc_decrypt(const unsigned char *key, const unsigned char *iv,
                             unsigned char *buf, size_t len, vd_error *err)
{
    gnutls_cipher_hd_t h;
    gnutls_datum_t k = { (unsigned char *)key, 32 };
    gnutls_datum_t v = { (unsigned char *)iv, 16 };
    int r = gnutls_cipher_init(&h, GNUTLS_CIPHER_AES_256_CBC, &k, &v);

    if (r < 0) {
        return vd_error_set(err, -EINVAL, "Cannot initialize cipher: %s",
                            gnutls_strerror(r));
    }
    r = len ? gnutls_cipher_decrypt2(h, buf, len, buf, len) : 0;
    gnutls_cipher_deinit(h);
    if (r < 0) {
        return vd_error_set(err, -EINVAL, "Cannot decrypt data: %s",
                            gnutls_strerror(r));
    }
    return 0;
}
#else
static int aes256cbc_decrypt(const unsigned char *key, const unsigned char *iv,
                             unsigned char *buf, size_t len, vd_error *err)
{
    (void)key;
    (void)iv;
    (void)buf;
    (void)len;
    return vd_error_set(err, -ENOTSUP, "Cannot decrypt secret: vdisk was "
                        "built without gnutls");
}
#endif

/* QEMU's qcrypto_secret_decrypt(): takes @*in (its length @*len) and
 * replaces it with the plain text. */
static int decrypt(secret *s, unsigned char **in, size_t *len, vd_error *err)
{
    unsigned char *key = NULL, *iv = NULL, *ct = NULL;
    size_t keylen = 0, ivlen = 0, ctlen = 0;
    int r, pad;

    r = vd_secret_get(s->keyid, &key, &keylen, err);
    if (r < 0) {
        return r;
    }
    if (keylen != 32) {
        r = vd_error_set(err, -EINVAL, "Key should be 32 bytes in length");
        goto out;
    }
    if (!s->iv) {
        r = vd_error_set(err, -EINVAL, "IV is required to decrypt secret");
        goto out;
    }
    if ((r = obj_base64_decode(s->iv, strlen(s->iv), &iv, &ivlen, err)) < 0) {
        goto out;
    }
    if (ivlen != 16) {
        r = vd_error_set(err, -EINVAL, "IV should be 16 bytes in length not "
                         "%zu", ivlen);
        goto out;
    }
    if (s->format == FORMAT_BASE64) {
        if ((r = obj_base64_decode((char *)*in, *len, &ct, &ctlen,
                                   err)) < 0) {
            goto out;
        }
    } else {
        ct = malloc(*len + 1);
        if (!ct) {
            r = vd_error_set(err, -ENOMEM, "Out of memory");
            goto out;
        }
        memcpy(ct, *in, *len);
        ctlen = *len;
    }
    if (ctlen % 16) {
        r = vd_error_set(err, -EINVAL, "Length %zu must be a multiple of "
                         "block size 16", ctlen);
        goto out;
    }
    if ((r = aes256cbc_decrypt(key, iv, ct, ctlen, err)) < 0) {
        goto out;
    }
    /* QEMU strips as many bytes as the last one says, up to a block,
     * without looking at the others. */
    pad = ctlen ? ct[ctlen - 1] : 0;
    if (ctlen == 0 || pad > 16 || (size_t)pad > ctlen) {
        r = vd_error_set(err, -EINVAL, "Incorrect number of padding bytes "
                         "(%d) found on decrypted data", pad);
        goto out;
    }
    ctlen -= (size_t)pad;
    ct[ctlen] = '\0';
    wipe_free(*in, *len);
    *in = ct;
    *len = ctlen;
    ct = NULL;
out:
    wipe_free(ct, ctlen);
    wipe_free(key, keylen);
    free(iv);
    return r;
}

static int secret_complete(vd_object *obj, vd_error *err)
{
    secret *s = (secret *)obj;
    unsigned char *in = NULL;
    size_t len = 0;
    int r;

    if (s->file) {
        if (s->data) {
            return vd_error_set(err, -EINVAL, "'file' and 'data' are "
                                "mutually exclusive");
        }
        if ((r = read_file(s->file, &in, &len, err)) < 0) {
            return r;
        }
    } else if (s->data) {
        len = strlen(s->data);
        in = (unsigned char *)strdup(s->data);
        if (!in) {
            return vd_error_set(err, -ENOMEM, "Out of memory");
        }
    } else {
        return vd_error_set(err, -EINVAL, "Either 'file' or 'data' must be "
                            "provided");
    }
    if (s->keyid) {
        r = decrypt(s, &in, &len, err);
    } else if (s->format == FORMAT_BASE64) {
        unsigned char *dec;
        size_t declen;
        r = obj_base64_decode((char *)in, len, &dec, &declen, err);
        if (r == 0) {
            wipe_free(in, len);
            in = dec;
            len = declen;
        }
    } else {
        r = 0;
    }
    if (r < 0) {
        wipe_free(in, len);
        return r;
    }
    s->raw = in;
    s->rawlen = len;
    return 0;
}

static void secret_finalize(vd_object *obj)
{
    secret *s = (secret *)obj;

    wipe_free(s->raw, s->rawlen);
    if (s->data) {
        explicit_bzero(s->data, strlen(s->data));
    }
    free(s->data);
    free(s->file);
    free(s->keyid);
    free(s->iv);
}

static json_object *get_loaded(vd_object *obj, const obj_prop *prop)
{
    (void)prop;
    return json_object_new_boolean(((secret *)obj)->raw != NULL);
}

#define STR_PROP(name, field)                                              \
    { name, &obj_type_str, OBJ_PROP_OPTIONAL | OBJ_PROP_WRITABLE,          \
      obj_set_str_field, obj_get_str_field, offsetof(secret, field) }

/* SecretCommonProperties, then SecretProperties (QEMU's qom.json). */
static const obj_prop secret_props[] = {
    { "loaded", &obj_type_bool, OBJ_PROP_OPTIONAL, NULL, get_loaded, 0 },
    { "format", &format_type, OBJ_PROP_OPTIONAL | OBJ_PROP_WRITABLE,
      obj_set_enum_field, obj_get_enum_field, offsetof(secret, format) },
    STR_PROP("keyid", keyid),
    STR_PROP("iv", iv),
    STR_PROP("data", data),
    STR_PROP("file", file),
    { NULL, NULL, 0, NULL, NULL, 0 },
};

const obj_class obj_class_secret = {
    .name = "secret",
    .size = sizeof(secret),
    .props = secret_props,
    .complete = secret_complete,
    .finalize = secret_finalize,
};

/* ---- the public accessors ---- */

VD_API int vd_secret_get(const char *id, unsigned char **data, size_t *len,
                         vd_error *err)
{
    vd_object *obj;
    secret *s;
    int r = 0;

    *data = NULL;
    *len = 0;
    obj_lock();
    obj = obj_find_any_locked(id);
    s = obj && obj->cls == &obj_class_secret ? (secret *)obj : NULL;
    if (!obj) {
        r = vd_error_set(err, -ENOENT, "No secret with id '%s'", id);
    } else if (!s) {
        r = vd_error_set(err, -EINVAL, "Object with id '%s' is not a secret",
                         id);
    } else if (!obj->completed || !s->raw) {
        /* Being added (its own keyid, or a race with another thread). */
        r = vd_error_set(err, -EINVAL, "Secret with id '%s' has no data", id);
    } else if (!(*data = malloc(s->rawlen + 1))) {
        r = vd_error_set(err, -ENOMEM, "Out of memory");
    } else {
        memcpy(*data, s->raw, s->rawlen + 1);
        *len = s->rawlen;
    }
    obj_unlock();
    return r;
}

/* g_utf8_validate() with a length: well-formed UTF-8, no overlong forms,
 * no surrogates, nothing above U+10FFFF, and no NUL byte. */
static bool utf8_valid(const unsigned char *p, size_t len)
{
    size_t i = 0;

    while (i < len) {
        unsigned c = p[i], n, cp;
        if (c == 0) {
            return false;
        }
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf) {
            n = 1;
            cp = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
            n = 2;
            cp = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (len - i <= n) {
            return false;
        }
        for (unsigned k = 1; k <= n; k++) {
            if ((p[i + k] & 0xc0) != 0x80) {
                return false;
            }
            cp = (cp << 6) | (p[i + k] & 0x3f);
        }
        if ((n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
            cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
            return false;
        }
        i += n + 1;
    }
    return true;
}

VD_API char *vd_secret_get_utf8(const char *id, vd_error *err)
{
    unsigned char *data;
    size_t len;

    if (vd_secret_get(id, &data, &len, err) < 0) {
        return NULL;
    }
    if (!utf8_valid(data, len)) {
        vd_error_set(err, -EINVAL, "Data from secret %s is not valid UTF-8",
                     id);
        wipe_free(data, len);
        return NULL;
    }
    return (char *)data;
}
