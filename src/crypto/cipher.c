/*
 * The glue between QEMU's crypto names and nettle (see cipher.h): cipher
 * contexts through nettle's generic struct nettle_cipher, its CBC, CTR
 * and XTS functions, hashes through struct nettle_hash, HMAC and PBKDF2
 * through nettle's per-hash functions (the fast paths), the IV
 * generators of dm-crypt and the sector loop of QEMU's
 * qcrypto_block_cipher_*_helper(). Key schedules are wiped on free.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include <nettle/cbc.h>
#include <nettle/ctr.h>
#include <nettle/hmac.h>
#include <nettle/md5.h>
#include <nettle/nettle-meta.h>
#include <nettle/pbkdf2.h>
#include <nettle/ripemd160.h>
#include <nettle/sha1.h>
#include <nettle/sha2.h>
#include <nettle/xts.h>

#ifdef VDISK_HAVE_GNUTLS
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#endif

#include "crypto/cipher.h"

/* QEMU's QCryptoCipherAlgorithm in its order; those past the ones vdisk
 * runs (des, 3des, sm4) only so that names are recognised. */
static const char *const cipher_names[] = {
    "aes-128", "aes-192", "aes-256", "cast5-128",
    "serpent-128", "serpent-192", "serpent-256",
    "twofish-128", "twofish-192", "twofish-256",
    "des", "3des", "sm4", NULL
};
static const char *const mode_names[] = { "ecb", "cbc", "xts", "ctr", NULL };
static const char *const ivgen_names[] = { "plain", "plain64", "essiv",
                                           NULL };
static const char *const hash_names[] = { "md5", "sha1", "sha224", "sha256",
                                          "sha384", "sha512", "ripemd160",
                                          NULL };

static int lookup(const char *const *names, const char *name)
{
    for (int i = 0; name && names[i]; i++) {
        if (strcmp(names[i], name) == 0) {
            return i;
        }
    }
    return -1;
}

const char *vd_cipher_alg_name(int alg)
{
    return alg >= 0 && alg < (int)(sizeof(cipher_names) /
                                   sizeof(cipher_names[0])) - 1 ?
           cipher_names[alg] : "?";
}
int vd_cipher_alg_lookup(const char *name) { return lookup(cipher_names, name); }
const char *vd_cipher_mode_name(vd_cipher_mode m) { return mode_names[m]; }
int vd_cipher_mode_lookup(const char *name) { return lookup(mode_names, name); }
const char *vd_ivgen_name(vd_ivgen_alg a) { return ivgen_names[a]; }
int vd_ivgen_lookup(const char *name) { return lookup(ivgen_names, name); }
const char *vd_hash_name(vd_hash_alg h) { return hash_names[h]; }
int vd_hash_lookup(const char *name) { return lookup(hash_names, name); }

static const struct nettle_cipher *cipher_meta(vd_cipher_alg alg)
{
    static const struct nettle_cipher *const m[VD_CIPHER__MAX] = {
        &nettle_aes128, &nettle_aes192, &nettle_aes256, &nettle_cast128,
        &nettle_serpent128, &nettle_serpent192, &nettle_serpent256,
        &nettle_twofish128, &nettle_twofish192, &nettle_twofish256,
    };
    return m[alg];
}

size_t vd_cipher_key_len(vd_cipher_alg alg)
{
    return cipher_meta(alg)->key_size;
}

size_t vd_cipher_block_len(vd_cipher_alg alg)
{
    return cipher_meta(alg)->block_size;
}

static const struct nettle_hash *hash_meta(vd_hash_alg h)
{
    static const struct nettle_hash *const m[VD_HASH__MAX] = {
        &nettle_md5, &nettle_sha1, &nettle_sha224, &nettle_sha256,
        &nettle_sha384, &nettle_sha512, &nettle_ripemd160,
    };
    return m[h];
}

size_t vd_hash_digest_len(vd_hash_alg h)
{
    return hash_meta(h)->digest_size;
}

static void wipe_free(uint8_t *p, size_t n)
{
    if (p) {
        explicit_bzero(p, n);
        free(p);
    }
}

void vd_cipher_free(vd_cipher *c)
{
    wipe_free(c->enc, c->ctx_size);
    wipe_free(c->dec, c->ctx_size);
    wipe_free(c->twk, c->ctx_size);
    wipe_free(c->key, c->keylen);
    c->enc = c->dec = c->twk = c->key = NULL;
}

int vd_cipher_init(vd_cipher *c, vd_cipher_alg alg, vd_cipher_mode mode,
                   const uint8_t *key, size_t keylen, vd_error *err)
{
    const struct nettle_cipher *m = cipher_meta(alg);
    size_t want = m->key_size;

    memset(c, 0, sizeof(*c));
    if (mode == VD_MODE_XTS) {
        if (m->block_size != XTS_BLOCK_SIZE) {
            return vd_error_set(err, -EINVAL, "Cipher block size %u must "
                                "equal XTS block size %d", m->block_size,
                                XTS_BLOCK_SIZE);
        }
        if (keylen % 2) {
            return vd_error_set(err, -EINVAL, "XTS cipher key length "
                                "should be a multiple of 2");
        }
        want *= 2;
    }
    if (keylen != want) {
        return vd_error_set(err, -EINVAL, "Cipher key length %zu should be "
                            "%zu", keylen, want);
    }
    c->alg = alg;
    c->mode = mode;
    c->meta = m;
    c->ctx_size = m->context_size;
    c->block = m->block_size;
    c->enc = malloc(c->ctx_size);
    c->dec = malloc(c->ctx_size);
    c->twk = mode == VD_MODE_XTS ? malloc(c->ctx_size) : NULL;
    if (!c->enc || !c->dec || (mode == VD_MODE_XTS && !c->twk)) {
        vd_cipher_free(c);
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    m->set_encrypt_key(c->enc, key);
    m->set_decrypt_key(c->dec, key);
    if (mode == VD_MODE_XTS) {
        m->set_encrypt_key(c->twk, key + m->key_size);
#ifdef VDISK_HAVE_GNUTLS
        if (alg == VD_CIPHER_AES_128 || alg == VD_CIPHER_AES_256) {
            c->key = malloc(keylen);
            if (c->key) {
                memcpy(c->key, key, keylen);
                c->keylen = keylen;
            }
        }
#endif
    }
    return 0;
}

size_t vd_cipher_iv_len(const vd_cipher *c)
{
    return c->mode == VD_MODE_ECB ? 0 : c->block;
}

void vd_cipher_crypt(const vd_cipher *c, bool encrypt, const uint8_t *iv,
                     uint8_t *buf, size_t len)
{
    const struct nettle_cipher *m = c->meta;
    uint8_t ivb[32];

    switch (c->mode) {
    case VD_MODE_ECB:
        (encrypt ? m->encrypt : m->decrypt)(encrypt ? c->enc : c->dec, len,
                                             buf, buf);
        break;
    case VD_MODE_CBC:
        memcpy(ivb, iv, c->block);
        if (encrypt) {
            cbc_encrypt(c->enc, m->encrypt, c->block, ivb, len, buf, buf);
        } else {
            cbc_decrypt(c->dec, m->decrypt, c->block, ivb, len, buf, buf);
        }
        break;
    case VD_MODE_CTR:
        memcpy(ivb, iv, c->block);
        ctr_crypt(c->enc, m->encrypt, c->block, ivb, len, buf, buf);
        break;
    case VD_MODE_XTS:
        if (encrypt) {
            xts_encrypt_message(c->enc, c->twk, m->encrypt, iv, len, buf,
                                buf);
        } else {
            xts_decrypt_message(c->dec, c->twk, m->decrypt, m->encrypt, iv,
                                len, buf, buf);
        }
        break;
    default:
        break;
    }
    explicit_bzero(ivb, sizeof(ivb));
}

void vd_hash_v(vd_hash_alg h, const uint8_t *const *data, const size_t *len,
               int n, uint8_t *out)
{
    const struct nettle_hash *m = hash_meta(h);
    uint8_t ctx[512];           /* larger than any nettle hash context */

    m->init(ctx);
    for (int i = 0; i < n; i++) {
        m->update(ctx, len[i], data[i]);
    }
    m->digest(ctx, m->digest_size, out);
    explicit_bzero(ctx, sizeof(ctx));
}

/* HMAC contexts for the hashes without a pbkdf2_hmac_* of their own. */
#define PBKDF2_WITH(type, name, upd)                                        \
    do {                                                                    \
        struct hmac_##type##_ctx ctx;                                       \
        hmac_##name##_set_key(&ctx, passlen, pass);                         \
        PBKDF2(&ctx, hmac_##upd##_update, hmac_##name##_digest,             \
               name##_DIGEST_SIZE_, iters, saltlen, salt, outlen, out);     \
        explicit_bzero(&ctx, sizeof(ctx));                                  \
    } while (0)

#define md5_DIGEST_SIZE_ MD5_DIGEST_SIZE
#define sha224_DIGEST_SIZE_ SHA224_DIGEST_SIZE
#define ripemd160_DIGEST_SIZE_ RIPEMD160_DIGEST_SIZE

void vd_pbkdf2(vd_hash_alg h, const uint8_t *pass, size_t passlen,
               const uint8_t *salt, size_t saltlen, uint32_t iters,
               uint8_t *out, size_t outlen)
{
    switch (h) {
    case VD_HASH_SHA1:
        pbkdf2_hmac_sha1(passlen, pass, iters, saltlen, salt, outlen, out);
        break;
    case VD_HASH_SHA256:
        pbkdf2_hmac_sha256(passlen, pass, iters, saltlen, salt, outlen, out);
        break;
    case VD_HASH_SHA384:
        pbkdf2_hmac_sha384(passlen, pass, iters, saltlen, salt, outlen, out);
        break;
    case VD_HASH_SHA512:
        pbkdf2_hmac_sha512(passlen, pass, iters, saltlen, salt, outlen, out);
        break;
    case VD_HASH_MD5:
        PBKDF2_WITH(md5, md5, md5);
        break;
    case VD_HASH_SHA224:
        PBKDF2_WITH(sha256, sha224, sha256);
        break;
    case VD_HASH_RIPEMD160:
        PBKDF2_WITH(ripemd160, ripemd160, ripemd160);
        break;
    default:
        break;
    }
}

static uint64_t thread_cpu_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* As QEMU, but measured over about 100-200 ms of CPU time instead of
 * 500-1000 (creating an image measured twice for a second and more
 * before): grow the count until one run takes over 100 ms, then scale
 * to a second. */
uint64_t vd_pbkdf2_count_iters(vd_hash_alg h, const uint8_t *pass,
                               size_t passlen, const uint8_t *salt,
                               size_t saltlen, size_t outlen)
{
    uint64_t iters = 1 << 15, delta;
    uint8_t *out = malloc(outlen ? outlen : 1);

    if (!out) {
        return 0;
    }
    for (;;) {
        uint64_t start = thread_cpu_ms();
        vd_pbkdf2(h, pass, passlen, salt, saltlen,
                  iters > UINT32_MAX ? UINT32_MAX : (uint32_t)iters, out,
                  outlen);
        delta = thread_cpu_ms() - start;
        if (delta == 0) {
            iters *= 2;
        } else if (delta > 100) {
            break;
        } else if (delta < 20) {
            iters *= 10;
        } else {
            iters = iters * 200 / delta;
        }
    }
    wipe_free(out, outlen);
    return iters * 1000 / delta;
}

int vd_ivgen_init(vd_ivgen *g, vd_ivgen_alg alg, vd_cipher_alg essiv_alg,
                  vd_hash_alg essiv_hash, const uint8_t *key, size_t keylen,
                  vd_error *err)
{
    memset(g, 0, sizeof(*g));
    g->alg = alg;
    if (alg == VD_IVGEN_ESSIV) {
        uint8_t salt[64] = { 0 };
        const uint8_t *d[1] = { key };
        int ret;

        /* The ESSIV key is the digest, cut or zero-padded to the
         * cipher's key length, as QEMU's ivgen-essiv. */
        vd_hash_v(essiv_hash, d, &keylen, 1, salt);
        ret = vd_cipher_init(&g->essiv, essiv_alg, VD_MODE_ECB, salt,
                             vd_cipher_key_len(essiv_alg), err);
        explicit_bzero(salt, sizeof(salt));
        return ret;
    }
    return 0;
}

void vd_ivgen_free(vd_ivgen *g)
{
    if (g->alg == VD_IVGEN_ESSIV) {
        vd_cipher_free(&g->essiv);
    }
}

void vd_ivgen_calc(const vd_ivgen *g, uint64_t sector, uint8_t *iv,
                   size_t niv)
{
    size_t n = g->alg == VD_IVGEN_PLAIN ? 4 : 8;

    if (g->alg == VD_IVGEN_PLAIN) {
        sector &= 0xffffffffu;
    }
    memset(iv, 0, niv);
    for (size_t i = 0; i < n && i < niv; i++) {
        iv[i] = (uint8_t)(sector >> (8 * i));
    }
    if (g->alg == VD_IVGEN_ESSIV) {
        vd_cipher_crypt(&g->essiv, true, NULL, iv, niv);
    }
}

#ifdef VDISK_HAVE_GNUTLS
/* The sectors through gnutls' AES-XTS, as far as gnutls takes them:
 * returns the bytes done (whole sectors; 0 when it refuses the key), the
 * caller does the rest with nettle. A handle per call: it holds the IV. */
static size_t gnutls_xts_sectors(const vd_cipher *c, const vd_ivgen *g,
                                 size_t sector_size, uint64_t sector,
                                 uint8_t *buf, size_t len, bool encrypt)
{
    gnutls_datum_t k = { c->key, (unsigned)c->keylen };
    gnutls_cipher_hd_t h;
    uint8_t iv[16];
    size_t done = 0;

    if (gnutls_cipher_init(&h, c->alg == VD_CIPHER_AES_128
                                   ? GNUTLS_CIPHER_AES_128_XTS
                                   : GNUTLS_CIPHER_AES_256_XTS,
                           &k, NULL) < 0) {
        return 0;
    }
    for (; done + sector_size <= len; done += sector_size, sector++) {
        vd_ivgen_calc(g, sector, iv, sizeof(iv));
        gnutls_cipher_set_iv(h, iv, sizeof(iv));
        if ((encrypt ? gnutls_cipher_encrypt(h, buf + done, sector_size)
                     : gnutls_cipher_decrypt(h, buf + done, sector_size))
            < 0) {
            break;              /* this sector is left as it was */
        }
    }
    gnutls_cipher_deinit(h);
    explicit_bzero(iv, sizeof(iv));
    return done;
}
#endif

void vd_crypt_sectors(const vd_cipher *c, const vd_ivgen *g,
                      size_t sector_size, uint64_t sector, uint8_t *buf,
                      size_t len, bool encrypt)
{
    size_t niv = vd_cipher_iv_len(c);
    uint8_t iv[32];

#ifdef VDISK_HAVE_GNUTLS
    if (c->key && len >= 4 * sector_size && sector_size % 16 == 0) {
        size_t done = gnutls_xts_sectors(c, g, sector_size, sector, buf, len,
                                         encrypt);
        buf += done;
        len -= done;
        sector += done / sector_size;
    }
#endif

    for (size_t done = 0; done < len; done += sector_size, sector++) {
        size_t n = len - done < sector_size ? len - done : sector_size;
        if (niv) {
            vd_ivgen_calc(g, sector, iv, niv);
        }
        vd_cipher_crypt(c, encrypt, iv, buf + done, n);
    }
}

int vd_random_bytes(uint8_t *buf, size_t len, vd_error *err)
{
    while (len) {
        ssize_t n = getrandom(buf, len, 0);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            return vd_error_set(err, -errno, "Unable to read random bytes: "
                                "%s", strerror(errno));
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}
