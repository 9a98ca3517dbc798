/*
 * Symmetric ciphers, hashes, PBKDF2 and IV generators for disk
 * encryption (LUKS, qcow2's encrypt.format=luks and its legacy AES), as
 * QEMU 7.2's crypto/ layer names and combines them. All cryptography is
 * nettle's (AES, Serpent, Twofish, CAST-128, ECB/CBC/CTR/XTS, MD5, SHA-1,
 * SHA-2, RIPEMD-160, HMAC, PBKDF2): nothing here is a hand-written
 * cipher, only the glue and the names.
 *
 * A vd_cipher's key schedule is read-only once set, so one cipher may
 * encrypt and decrypt from several threads at once (each call brings its
 * own IV). vd_cipher_free() wipes the key schedules.
 *
 * One exception to "all nettle": where gnutls is built in, the sector
 * loop runs AES-XTS through gnutls' cipher API, whose AES-NI code
 * pipelines several blocks (nettle's XTS calls the cipher one block at a
 * time, and decryption ran at 0.75x qemu-img's, which uses gnutls).
 */
#ifndef VDISK_CRYPTO_CIPHER_H
#define VDISK_CRYPTO_CIPHER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

/* QEMU's QCryptoCipherAlgorithm names that vdisk can run. */
typedef enum {
    VD_CIPHER_AES_128, VD_CIPHER_AES_192, VD_CIPHER_AES_256,
    VD_CIPHER_CAST5_128,
    VD_CIPHER_SERPENT_128, VD_CIPHER_SERPENT_192, VD_CIPHER_SERPENT_256,
    VD_CIPHER_TWOFISH_128, VD_CIPHER_TWOFISH_192, VD_CIPHER_TWOFISH_256,
    VD_CIPHER__MAX
} vd_cipher_alg;

typedef enum { VD_MODE_ECB, VD_MODE_CBC, VD_MODE_XTS, VD_MODE_CTR,
               VD_MODE__MAX } vd_cipher_mode;
typedef enum { VD_IVGEN_PLAIN, VD_IVGEN_PLAIN64, VD_IVGEN_ESSIV,
               VD_IVGEN__MAX } vd_ivgen_alg;
typedef enum { VD_HASH_MD5, VD_HASH_SHA1, VD_HASH_SHA224, VD_HASH_SHA256,
               VD_HASH_SHA384, VD_HASH_SHA512, VD_HASH_RIPEMD160,
               VD_HASH__MAX } vd_hash_alg;

/* QAPI names ("aes-256", "xts", "plain64", "sha256") and back; the
 * lookups return -1 for an unknown name. QEMU's full cipher enum also
 * names des, 3des and sm4, which LUKS cannot use: *_alg_lookup() knows
 * them (so that messages match) and returns VD_CIPHER__MAX + n. */
const char *vd_cipher_alg_name(int alg);
int vd_cipher_alg_lookup(const char *name);
const char *vd_cipher_mode_name(vd_cipher_mode m);
int vd_cipher_mode_lookup(const char *name);
const char *vd_ivgen_name(vd_ivgen_alg a);
int vd_ivgen_lookup(const char *name);
const char *vd_hash_name(vd_hash_alg h);
int vd_hash_lookup(const char *name);

size_t vd_cipher_key_len(vd_cipher_alg alg);
size_t vd_cipher_block_len(vd_cipher_alg alg);
size_t vd_hash_digest_len(vd_hash_alg h);

typedef struct vd_cipher {
    vd_cipher_alg alg;
    vd_cipher_mode mode;
    const void *meta;           /* nettle's struct nettle_cipher */
    uint8_t *enc, *dec, *twk;   /* key schedules (twk: XTS tweak key) */
    size_t ctx_size;
    size_t block;
    uint8_t *key;               /* a copy for gnutls' AES-XTS (wiped) */
    size_t keylen;
} vd_cipher;

/* Sets up @c for @key (twice the cipher's key for XTS). Messages as
 * QEMU's ("Cipher key length 31 must be 32"). */
int vd_cipher_init(vd_cipher *c, vd_cipher_alg alg, vd_cipher_mode mode,
                   const uint8_t *key, size_t keylen, vd_error *err);
void vd_cipher_free(vd_cipher *c);
/* Length of the IV of @c per call (0 for ECB). */
size_t vd_cipher_iv_len(const vd_cipher *c);
/* En- or decrypts @len bytes (a multiple of the block) in place; @iv is
 * vd_cipher_iv_len() bytes (consumed, not updated for the caller). */
void vd_cipher_crypt(const vd_cipher *c, bool encrypt, const uint8_t *iv,
                     uint8_t *buf, size_t len);

/* Hashes @n pieces into @out (vd_hash_digest_len() bytes). */
void vd_hash_v(vd_hash_alg h, const uint8_t *const *data,
               const size_t *len, int n, uint8_t *out);
/* PBKDF2 with HMAC-@h. */
void vd_pbkdf2(vd_hash_alg h, const uint8_t *pass, size_t passlen,
               const uint8_t *salt, size_t saltlen, uint32_t iters,
               uint8_t *out, size_t outlen);
/* QEMU's qcrypto_pbkdf2_count_iters(): how many iterations one second
 * of this thread's CPU time runs, for a key of @outlen bytes. */
uint64_t vd_pbkdf2_count_iters(vd_hash_alg h, const uint8_t *pass,
                               size_t passlen, const uint8_t *salt,
                               size_t saltlen, size_t outlen);

/* An IV generator (QEMU's QCryptoIVGen): plain (32-bit sector number),
 * plain64 (64-bit), essiv (the sector number encrypted in ECB with the
 * hash of the key as key). */
typedef struct vd_ivgen {
    vd_ivgen_alg alg;
    vd_cipher essiv;            /* ESSIV only */
} vd_ivgen;

int vd_ivgen_init(vd_ivgen *g, vd_ivgen_alg alg, vd_cipher_alg essiv_alg,
                  vd_hash_alg essiv_hash, const uint8_t *key, size_t keylen,
                  vd_error *err);
void vd_ivgen_free(vd_ivgen *g);
void vd_ivgen_calc(const vd_ivgen *g, uint64_t sector, uint8_t *iv,
                   size_t niv);

/* QEMU's qcrypto_block_{en,de}crypt_helper(): @len bytes (a multiple of
 * @sector_size) of consecutive sectors from @sector, each with its IV. */
void vd_crypt_sectors(const vd_cipher *c, const vd_ivgen *g,
                      size_t sector_size, uint64_t sector, uint8_t *buf,
                      size_t len, bool encrypt);

/* Random bytes from the kernel (getrandom). */
int vd_random_bytes(uint8_t *buf, size_t len, vd_error *err);

#endif
