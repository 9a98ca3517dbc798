/*
 * LUKS1 (see luks.h for the layout): header parsing and QEMU 7.2's
 * sanity checks, the anti-forensic splitter, unlocking a key slot,
 * creating a header and slot 0, amending key slots, the info block.
 * Ciphers, hashes and PBKDF2 come from crypto/cipher.c (nettle). Every
 * buffer that held key material (passphrases, PBKDF2 output, split and
 * master keys) is wiped with explicit_bzero() before it is freed.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "crypto/luks.h"

#define SLOT_ENABLED 0x00AC71F3u
#define SLOT_DISABLED 0x0000DEADu
#define KEY_SLOT_OFFSET 4096
#define STRIPES 4000
#define MIN_ITERS 1000
#define ERASE_ITERATIONS 16
#define DEFAULT_ITER_TIME 2000

/* About 18 s of SHA-256 per slot on a 2020 laptop core; QEMU's default
 * iter-time of 2 s gives a few million. */
uint32_t vd_luks_max_iters = 1u << 26;

static const uint8_t luks_magic[6] = { 'L', 'U', 'K', 'S', 0xba, 0xbe };

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
           (uint32_t)p[2] << 8 | p[3];
}

static void wr_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void wipe_free(void *p, size_t n)
{
    if (p) {
        explicit_bzero(p, n);
        free(p);
    }
}

static void wipe_str(char *s)
{
    if (s) {
        wipe_free(s, strlen(s));
    }
}

/* Header field offsets. */
enum {
    H_MAGIC = 0, H_VERSION = 6, H_CIPHER = 8, H_MODE = 40, H_HASH = 72,
    H_PAYLOAD = 104, H_KEYBYTES = 108, H_MKDIGEST = 112, H_MKSALT = 132,
    H_MKITERS = 164, H_UUID = 168, H_SLOTS = 208, SLOT_SIZE = 48,
};

static void copy_str(char *dst, const uint8_t *src, size_t n)
{
    memcpy(dst, src, n);
    dst[n] = '\0';
}

/* Sectors of one slot's material, rounded up as cryptsetup does (to the
 * 8 sectors of the header area). */
static uint64_t split_sectors(uint32_t key_bytes, uint32_t stripes)
{
    uint64_t s = ((uint64_t)key_bytes * stripes + VD_LUKS_SECTOR - 1) /
                 VD_LUKS_SECTOR;
    uint64_t hs = KEY_SLOT_OFFSET / VD_LUKS_SECTOR;
    return (s + hs - 1) / hs * hs;
}

static int check_header(const vd_luks *l, vd_error *err)
{
    if (l->version != 1) {
        return vd_error_set(err, -ENOTSUP, "LUKS version %" PRIu32 " is not "
                            "supported", (uint32_t)l->version);
    }
    for (int i = 0; i < VD_LUKS_SLOTS; i++) {
        const vd_luks_slot *s1 = &l->slots[i];
        uint64_t len1 = split_sectors(l->key_bytes, s1->stripes);

        /* QEMU 7.2 takes cryptsetup's 4000 stripes only, which also
         * bounds the key material read for a slot. */
        if (s1->stripes != STRIPES) {
            return vd_error_set(err, -EINVAL, "Keyslot %d is corrupted "
                                "(stripes %d != %d)", i, (int)s1->stripes,
                                STRIPES);
        }
        if (s1->active != SLOT_DISABLED && s1->active != SLOT_ENABLED) {
            return vd_error_set(err, -EINVAL, "Keyslot %d state "
                                "(active/disable) is corrupted", i);
        }
        if (s1->key_offset + len1 > l->payload_offset) {
            return vd_error_set(err, -EINVAL, "Keyslot %d is overlapping "
                                "with the encrypted payload", i);
        }
        for (int j = i + 1; j < VD_LUKS_SLOTS; j++) {
            const vd_luks_slot *s2 = &l->slots[j];
            uint64_t len2 = split_sectors(l->key_bytes, s2->stripes);
            if (s1->key_offset + len1 > s2->key_offset &&
                s2->key_offset + len2 > s1->key_offset) {
                return vd_error_set(err, -EINVAL, "Keyslots %d and %d are "
                                    "overlapping in the header", i, j);
            }
        }
    }
    return 0;
}

/* QEMU's dm-crypt quirk: ESSIV keys its cipher with the whole digest,
 * so the ESSIV cipher is the family member whose key is that long. */
static int essiv_cipher(vd_cipher_alg alg, vd_hash_alg h, int *out,
                        vd_error *err)
{
    size_t dlen = vd_hash_digest_len(h);
    int base;
    const char *fam;

    if (dlen == vd_cipher_key_len(alg)) {
        *out = alg;
        return 0;
    }
    switch (alg) {
    case VD_CIPHER_AES_128: case VD_CIPHER_AES_192: case VD_CIPHER_AES_256:
        base = VD_CIPHER_AES_128;
        fam = "AES";
        break;
    case VD_CIPHER_SERPENT_128: case VD_CIPHER_SERPENT_192:
    case VD_CIPHER_SERPENT_256:
        base = VD_CIPHER_SERPENT_128;
        fam = "Serpent";
        break;
    case VD_CIPHER_TWOFISH_128: case VD_CIPHER_TWOFISH_192:
    case VD_CIPHER_TWOFISH_256:
        base = VD_CIPHER_TWOFISH_128;
        fam = "Twofish";
        break;
    default:
        return vd_error_set(err, -ENOTSUP, "Cipher %s not supported with "
                            "essiv", vd_cipher_alg_name(alg));
    }
    for (int i = 0; i < 3; i++) {
        if (vd_cipher_key_len(base + i) == dlen) {
            *out = base + i;
            return 0;
        }
    }
    return vd_error_set(err, -ENOTSUP, "No %s cipher with key size %zu "
                        "available", fam, dlen);
}

/* The LUKS cipher names and key sizes QEMU maps to its algorithms. */
static int cipher_from_name(const char *name, vd_cipher_mode mode,
                            uint32_t key_bytes, int *out, vd_error *err)
{
    static const struct { const char *name; int first, n; } map[] = {
        { "aes", VD_CIPHER_AES_128, 3 },
        { "cast5", VD_CIPHER_CAST5_128, 1 },
        { "serpent", VD_CIPHER_SERPENT_128, 3 },
        { "twofish", VD_CIPHER_TWOFISH_128, 3 },
    };
    if (mode == VD_MODE_XTS) {
        key_bytes /= 2;
    }
    for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++) {
        if (strcmp(map[i].name, name) != 0) {
            continue;
        }
        for (int j = 0; j < map[i].n; j++) {
            if (vd_cipher_key_len(map[i].first + j) == key_bytes) {
                *out = map[i].first + j;
                return 0;
            }
        }
    }
    return vd_error_set(err, -ENOTSUP, "Algorithm '%s' with key size %d bytes "
                        "not supported", name, (int)key_bytes);
}

static const char *cipher_family(vd_cipher_alg alg)
{
    return alg <= VD_CIPHER_AES_256 ? "aes" :
           alg == VD_CIPHER_CAST5_128 ? "cast5" :
           alg <= VD_CIPHER_SERPENT_256 ? "serpent" : "twofish";
}

static int parse_names(vd_luks *l, vd_error *err)
{
    char mode[33], *ivname, *ivhash;
    int v, ret;

    memcpy(mode, l->cipher_mode, sizeof(mode));
    ivname = strchr(mode, '-');
    if (!ivname) {
        return vd_error_set(err, -EINVAL, "Unexpected cipher mode string "
                            "format '%s'", l->cipher_mode);
    }
    *ivname++ = '\0';
    ivhash = strchr(ivname, ':');
    l->has_ivhash = ivhash != NULL;
    l->ivhash = VD_HASH_MD5;
    if (ivhash) {
        *ivhash++ = '\0';
        v = vd_hash_lookup(ivhash);
        if (v < 0) {
            return vd_error_set(err, -ENOTSUP, "Hash algorithm '%s' not "
                                "supported", ivhash);
        }
        l->ivhash = v;
    }
    v = vd_cipher_mode_lookup(mode);
    if (v < 0) {
        return vd_error_set(err, -ENOTSUP, "Cipher mode '%s' not supported",
                            mode);
    }
    l->mode = v;
    ret = cipher_from_name(l->cipher_name, l->mode, l->key_bytes, &v, err);
    if (ret < 0) {
        return ret;
    }
    l->alg = v;
    v = vd_hash_lookup(l->hash_spec);
    if (v < 0) {
        return vd_error_set(err, -ENOTSUP, "Hash algorithm '%s' not supported",
                            l->hash_spec);
    }
    l->hash = v;
    v = vd_ivgen_lookup(ivname);
    if (v < 0) {
        return vd_error_set(err, -ENOTSUP, "IV generator '%s' not supported",
                            ivname);
    }
    l->ivgen = v;
    if (l->ivgen == VD_IVGEN_ESSIV) {
        if (!ivhash) {
            return vd_error_set(err, -EINVAL, "Missing IV generator hash "
                                "specification");
        }
        ret = essiv_cipher(l->alg, l->ivhash, &v, err);
        if (ret < 0) {
            return ret;
        }
        l->ivcipher = v;
    } else {
        /* A hash after plain/plain64 is ignored, as dm-crypt does. */
        l->ivcipher = l->alg;
    }
    return 0;
}

int vd_luks_parse(vd_luks *l, const uint8_t *h, vd_error *err)
{
    memset(l, 0, sizeof(*l));
    if (memcmp(h + H_MAGIC, luks_magic, sizeof(luks_magic)) != 0) {
        return vd_error_set(err, -EINVAL, "Volume is not in LUKS format");
    }
    l->version = (uint16_t)(h[H_VERSION] << 8 | h[H_VERSION + 1]);
    copy_str(l->cipher_name, h + H_CIPHER, 32);
    copy_str(l->cipher_mode, h + H_MODE, 32);
    copy_str(l->hash_spec, h + H_HASH, 32);
    l->payload_offset = be32(h + H_PAYLOAD);
    l->key_bytes = be32(h + H_KEYBYTES);
    memcpy(l->mk_digest, h + H_MKDIGEST, 20);
    memcpy(l->mk_salt, h + H_MKSALT, 32);
    l->mk_iters = be32(h + H_MKITERS);
    copy_str(l->uuid, h + H_UUID, 40);
    for (int i = 0; i < VD_LUKS_SLOTS; i++) {
        const uint8_t *p = h + H_SLOTS + i * SLOT_SIZE;
        l->slots[i].active = be32(p);
        l->slots[i].iters = be32(p + 4);
        memcpy(l->slots[i].salt, p + 8, 32);
        l->slots[i].key_offset = be32(p + 40);
        l->slots[i].stripes = be32(p + 44);
    }
    if (check_header(l, err) < 0) {
        return -EINVAL;
    }
    return parse_names(l, err) < 0 ? -ENOTSUP : 0;
}

static void encode_header(const vd_luks *l, uint8_t *h)
{
    memset(h, 0, VD_LUKS_HDR_SIZE);
    memcpy(h + H_MAGIC, luks_magic, sizeof(luks_magic));
    h[H_VERSION] = 0;
    h[H_VERSION + 1] = 1;
    memcpy(h + H_CIPHER, l->cipher_name, strlen(l->cipher_name));
    memcpy(h + H_MODE, l->cipher_mode, strlen(l->cipher_mode));
    memcpy(h + H_HASH, l->hash_spec, strlen(l->hash_spec));
    wr_be32(h + H_PAYLOAD, l->payload_offset);
    wr_be32(h + H_KEYBYTES, l->key_bytes);
    memcpy(h + H_MKDIGEST, l->mk_digest, 20);
    memcpy(h + H_MKSALT, l->mk_salt, 32);
    wr_be32(h + H_MKITERS, l->mk_iters);
    memcpy(h + H_UUID, l->uuid, strlen(l->uuid));
    for (int i = 0; i < VD_LUKS_SLOTS; i++) {
        uint8_t *p = h + H_SLOTS + i * SLOT_SIZE;
        wr_be32(p, l->slots[i].active);
        wr_be32(p + 4, l->slots[i].iters);
        memcpy(p + 8, l->slots[i].salt, 32);
        wr_be32(p + 40, l->slots[i].key_offset);
        wr_be32(p + 44, l->slots[i].stripes);
    }
}

static int store_header(const vd_luks *l, vd_luks_io_fn io, void *opaque,
                        vd_error *err)
{
    uint8_t h[VD_LUKS_HDR_SIZE];

    encode_header(l, h);
    return io(opaque, true, 0, h, sizeof(h), err);
}

/* The splitter's diffusion: each digest-sized piece i of @block becomes
 * H(be32(i) || piece), the last piece cut to what is left. */
static void af_hash(vd_hash_alg h, uint8_t *block, size_t len)
{
    size_t dlen = vd_hash_digest_len(h);
    uint8_t out[64];

    for (size_t i = 0, off = 0; off < len; i++, off += dlen) {
        size_t n = len - off < dlen ? len - off : dlen;
        uint8_t iv[4];
        const uint8_t *d[2] = { iv, block + off };
        size_t dl[2] = { 4, n };

        wr_be32(iv, (uint32_t)i);
        vd_hash_v(h, d, dl, 2, out);
        memcpy(block + off, out, n);
    }
    explicit_bzero(out, sizeof(out));
}

static void xor_into(uint8_t *d, const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        d[i] ^= s[i];
    }
}

/* AF merge: the master key from @stripes blocks of @len bytes. */
static void af_decode(vd_hash_alg h, size_t len, uint32_t stripes,
                      const uint8_t *in, uint8_t *out, uint8_t *tmp)
{
    memset(tmp, 0, len);
    for (uint32_t i = 0; i + 1 < stripes; i++) {
        xor_into(tmp, in + (size_t)i * len, len);
        af_hash(h, tmp, len);
    }
    memcpy(out, in + (size_t)(stripes - 1) * len, len);
    xor_into(out, tmp, len);
    explicit_bzero(tmp, len);
}

/* AF split: random blocks, the last one chosen so that the merge gives
 * @key. */
static int af_encode(vd_hash_alg h, size_t len, uint32_t stripes,
                     const uint8_t *key, uint8_t *out, uint8_t *tmp,
                     vd_error *err)
{
    int ret = vd_random_bytes(out, (size_t)(stripes - 1) * len, err);

    if (ret < 0) {
        return ret;
    }
    memset(tmp, 0, len);
    for (uint32_t i = 0; i + 1 < stripes; i++) {
        xor_into(tmp, out + (size_t)i * len, len);
        af_hash(h, tmp, len);
    }
    memcpy(out + (size_t)(stripes - 1) * len, key, len);
    xor_into(out + (size_t)(stripes - 1) * len, tmp, len);
    explicit_bzero(tmp, len);
    return 0;
}

/* 1: slot @idx opened with @password and @mk holds the master key; 0:
 * inactive, wrong password, or skipped (*skipped set); < 0: error. */
static int load_key(vd_luks *l, int idx, const char *password, uint8_t *mk,
                    vd_luks_io_fn io, void *opaque, bool *skipped,
                    vd_error *err)
{
    const vd_luks_slot *s = &l->slots[idx];
    size_t klen = l->key_bytes, splen;
    uint8_t *split = NULL, *pkey = NULL, *tmp = NULL, digest[20];
    vd_cipher c;
    vd_ivgen g;
    int ret;

    if (s->active != SLOT_ENABLED) {
        return 0;
    }
    /* PBKDF2 is undefined for 0 iterations (nettle asserts): a damaged
     * header, refused before the key is derived. */
    if (s->iters == 0) {
        return vd_error_set(err, -EINVAL, "Keyslot %d iteration count is "
                            "zero", idx);
    }
    if (l->mk_iters == 0) {
        return vd_error_set(err, -EINVAL, "Master key digest iteration "
                            "count is zero");
    }
    if (s->iters > vd_luks_max_iters || l->mk_iters > vd_luks_max_iters) {
        *skipped = true;
        return 0;
    }
    if (s->stripes == 0 || s->stripes > VD_LUKS_MAX_STRIPES) {
        return vd_error_set(err, -EINVAL, "Keyslot %d has %" PRIu32
                            " anti-forensic stripes, not 1 to %u", idx,
                            s->stripes, VD_LUKS_MAX_STRIPES);
    }
    splen = klen * s->stripes;
    split = malloc(splen);
    pkey = malloc(klen);
    tmp = malloc(klen);
    if (!split || !pkey || !tmp) {
        ret = vd_error_set(err, -ENOMEM, "Out of memory");
        goto out;
    }
    vd_pbkdf2(l->hash, (const uint8_t *)password, strlen(password), s->salt,
              32, s->iters, pkey, klen);
    ret = io(opaque, false, (uint64_t)s->key_offset * VD_LUKS_SECTOR, split,
             splen, err);
    if (ret < 0) {
        goto out;
    }
    ret = vd_cipher_init(&c, l->alg, l->mode, pkey, klen, err);
    if (ret < 0) {
        goto out;
    }
    ret = vd_ivgen_init(&g, l->ivgen, l->ivcipher, l->ivhash, pkey, klen,
                        err);
    if (ret < 0) {
        vd_cipher_free(&c);
        goto out;
    }
    vd_crypt_sectors(&c, &g, VD_LUKS_SECTOR, 0, split, splen, false);
    vd_cipher_free(&c);
    vd_ivgen_free(&g);
    af_decode(l->hash, klen, s->stripes, split, mk, tmp);
    vd_pbkdf2(l->hash, mk, klen, l->mk_salt, 32, l->mk_iters, digest,
              sizeof(digest));
    ret = memcmp(digest, l->mk_digest, sizeof(digest)) == 0;
out:
    explicit_bzero(digest, sizeof(digest));
    wipe_free(split, splen);
    wipe_free(pkey, klen);
    wipe_free(tmp, klen);
    return ret;
}

static int find_key(vd_luks *l, const char *password, uint8_t *mk,
                    vd_luks_io_fn io, void *opaque, vd_error *err)
{
    bool skipped = false;

    for (int i = 0; i < VD_LUKS_SLOTS; i++) {
        int r = load_key(l, i, password, mk, io, opaque, &skipped, err);
        if (r != 0) {
            return r < 0 ? r : 0;
        }
    }
    if (skipped) {
        return vd_error_set(err, -EACCES, "Invalid password, cannot unlock "
                            "any keyslot (slots asking for more than %"
                            PRIu32 " PBKDF2 iterations were not tried)",
                            vd_luks_max_iters);
    }
    return vd_error_set(err, -EACCES, "Invalid password, cannot unlock any "
                        "keyslot");
}

static int setup_payload(vd_luks *l, const uint8_t *mk, vd_error *err)
{
    int ret = vd_ivgen_init(&l->ivg, l->ivgen, l->ivcipher, l->ivhash, mk,
                            l->key_bytes, err);
    if (ret < 0) {
        return ret;
    }
    ret = vd_cipher_init(&l->cipher, l->alg, l->mode, mk, l->key_bytes, err);
    if (ret < 0) {
        vd_ivgen_free(&l->ivg);
        return ret;
    }
    l->unlocked = true;
    return 0;
}

int vd_luks_unlock(vd_luks *l, const char *password, vd_luks_io_fn io,
                   void *opaque, vd_error *err)
{
    uint8_t *mk = malloc(l->key_bytes);
    int ret;

    if (!mk) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    ret = find_key(l, password, mk, io, opaque, err);
    if (ret == 0) {
        ret = setup_payload(l, mk, err);
    }
    wipe_free(mk, l->key_bytes);
    return ret;
}

static char *get_password(const char *id, const char *prefix, vd_error *err)
{
    if (!id) {
        vd_error_set(err, -EINVAL, "Parameter '%skey-secret' is required "
                     "for cipher", prefix ? prefix : "");
        return NULL;
    }
    return vd_secret_get_utf8(id, err);
}

int vd_luks_open(vd_luks *l, const uint8_t *hdr, const char *secret_id,
                 const char *optprefix, bool no_io, vd_luks_io_fn io,
                 void *opaque, vd_error *err)
{
    char *password = NULL;
    int ret;

    memset(l, 0, sizeof(*l));
    if (!no_io) {
        password = get_password(secret_id, optprefix, err);
        if (!password) {
            return -EINVAL;
        }
    }
    ret = vd_luks_parse(l, hdr, err);
    if (ret == 0 && !no_io) {
        ret = vd_luks_unlock(l, password, io, opaque, err);
    }
    if (ret == 0 && secret_id) {
        l->secret = strdup(secret_id);
        if (!l->secret) {
            ret = vd_error_set(err, -ENOMEM, "Out of memory");
        }
    }
    wipe_str(password);
    if (ret < 0) {
        vd_luks_free(l);
    }
    return ret;
}

void vd_luks_free(vd_luks *l)
{
    if (l->unlocked) {
        vd_cipher_free(&l->cipher);
        vd_ivgen_free(&l->ivg);
    }
    free(l->secret);
    explicit_bzero(l, sizeof(*l));
}

void vd_luks_crypt(const vd_luks *l, uint64_t sector, uint8_t *buf,
                   size_t len, bool encrypt)
{
    vd_crypt_sectors(&l->cipher, &l->ivg, VD_LUKS_SECTOR, sector, buf, len,
                     encrypt);
}

char *vd_luks_info_json(const vd_luks *l)
{
    json_object *o = json_object_new_object(), *slots;
    char uuid[41];
    char *out;

    json_object_object_add(o, "cipher-alg", json_object_new_string(
                               vd_cipher_alg_name(l->alg)));
    json_object_object_add(o, "cipher-mode", json_object_new_string(
                               vd_cipher_mode_name(l->mode)));
    json_object_object_add(o, "ivgen-alg", json_object_new_string(
                               vd_ivgen_name(l->ivgen)));
    if (l->ivgen == VD_IVGEN_ESSIV) {
        json_object_object_add(o, "ivgen-hash-alg", json_object_new_string(
                                   vd_hash_name(l->ivhash)));
    }
    json_object_object_add(o, "hash-alg", json_object_new_string(
                               vd_hash_name(l->hash)));
    json_object_object_add(o, "payload-offset", json_object_new_int64(
                               (int64_t)vd_luks_payload_bytes(l)));
    json_object_object_add(o, "master-key-iters",
                           json_object_new_int64(l->mk_iters));
    /* The UUID is text from the file: anything not printable ASCII is
     * shown as '?' rather than passed on as bytes. */
    for (size_t i = 0; i <= 40; i++) {
        unsigned char ch = (unsigned char)l->uuid[i];
        uuid[i] = ch == 0 || (ch >= 0x20 && ch < 0x7f) ? (char)ch : '?';
    }
    json_object_object_add(o, "uuid", json_object_new_string(uuid));
    slots = json_object_new_array();
    for (int i = 0; i < VD_LUKS_SLOTS; i++) {
        json_object *s = json_object_new_object();
        bool active = l->slots[i].active == SLOT_ENABLED;
        json_object_object_add(s, "active", json_object_new_boolean(active));
        if (active) {
            json_object_object_add(s, "iters", json_object_new_int64(
                                       l->slots[i].iters));
            json_object_object_add(s, "stripes", json_object_new_int64(
                                       l->slots[i].stripes));
        }
        json_object_object_add(s, "key-offset", json_object_new_int64(
            (int64_t)l->slots[i].key_offset * VD_LUKS_SECTOR));
        json_object_array_add(slots, s);
    }
    json_object_object_add(o, "slots", slots);
    out = strdup(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN));
    json_object_put(o);
    return out;
}

/* ---- creation ---- */

void vd_luks_create_opts_free(vd_luks_create_opts *o)
{
    free(o->key_secret);
    o->key_secret = NULL;
}

static int take_enum(vd_opts *opts, const char *prefix, const char *name,
                     int (*lookup)(const char *), int def, int *out,
                     bool *given, vd_error *err)
{
    char key[64];
    char *v;

    snprintf(key, sizeof(key), "%s%s", prefix, name);
    v = vd_opts_take(opts, key);
    *out = def;
    if (given) {
        *given = v != NULL;
    }
    if (!v) {
        return 0;
    }
    *out = lookup(v);
    if (*out < 0) {
        vd_error_set(err, -EINVAL, "Parameter '%s' does not accept value "
                     "'%s'", key, v);
        free(v);
        return -EINVAL;
    }
    free(v);
    return 0;
}

int vd_luks_create_opts_take(vd_opts *opts, const char *prefix,
                             vd_luks_create_opts *o, vd_error *err)
{
    char key[64];
    int ret;

    memset(o, 0, sizeof(*o));
    snprintf(key, sizeof(key), "%skey-secret", prefix);
    o->key_secret = vd_opts_take(opts, key);
    ret = take_enum(opts, prefix, "cipher-alg", vd_cipher_alg_lookup,
                    VD_CIPHER_AES_256, &o->cipher_alg, NULL, err);
    if (ret == 0) {
        ret = take_enum(opts, prefix, "cipher-mode", vd_cipher_mode_lookup,
                        VD_MODE_XTS, &o->cipher_mode, NULL, err);
    }
    if (ret == 0) {
        ret = take_enum(opts, prefix, "ivgen-alg", vd_ivgen_lookup,
                        VD_IVGEN_PLAIN64, &o->ivgen_alg, NULL, err);
    }
    if (ret == 0) {
        ret = take_enum(opts, prefix, "ivgen-hash-alg", vd_hash_lookup,
                        VD_HASH_SHA256, &o->ivgen_hash_alg,
                        &o->has_ivgen_hash, err);
    }
    if (ret == 0) {
        ret = take_enum(opts, prefix, "hash-alg", vd_hash_lookup,
                        VD_HASH_SHA256, &o->hash_alg, NULL, err);
    }
    if (ret == 0) {
        snprintf(key, sizeof(key), "%siter-time", prefix);
        ret = vd_opts_take_uint(opts, key, DEFAULT_ITER_TIME, &o->iter_time,
                                err);
    }
    if (ret == 0 && o->ivgen_alg == VD_IVGEN_ESSIV) {
        o->has_ivgen_hash = true;
    }
    if (ret < 0) {
        vd_luks_create_opts_free(o);
    }
    return ret;
}

/* QEMU's iteration count for @iter_time ms, from a one-second count. */
static int scale_iters(uint64_t per_sec, uint64_t iter_time, unsigned div,
                       uint32_t *out, vd_error *err)
{
    uint64_t iters;

    if (iter_time && per_sec > UINT64_MAX / iter_time) {
        return vd_error_set(err, -ERANGE, "PBKDF iterations %llu too large "
                            "to scale: %s", (unsigned long long)per_sec,
                            strerror(ERANGE));
    }
    iters = per_sec * iter_time / 1000 / div;
    if (iters > UINT32_MAX) {
        return vd_error_set(err, -ERANGE, "PBKDF iterations %llu larger "
                            "than %u: %s", (unsigned long long)iters,
                            UINT32_MAX, strerror(ERANGE));
    }
    *out = iters < MIN_ITERS ? MIN_ITERS : (uint32_t)iters;
    return 0;
}

/* The PBKDF iterations a key slot gets for @password to take @iter_time
 * ms (measured here, as QEMU does): the refusals of a key-slot write
 * that come before its first write, which a dry run makes too. */
static int slot_iters(vd_luks *l, const char *password, const uint8_t *salt,
                      uint64_t iter_time, uint32_t *iters, vd_error *err)
{
    return scale_iters(vd_pbkdf2_count_iters(l->hash,
                                             (const uint8_t *)password,
                                             strlen(password), salt, 32,
                                             l->key_bytes),
                       iter_time, 1, iters, err);
}

/* Puts @mk into slot @idx for @password (QEMU's store_key), and writes
 * the material then the header. */
static int store_key(vd_luks *l, int idx, const char *password,
                     const uint8_t *mk, uint64_t iter_time, vd_luks_io_fn io,
                     void *opaque, vd_error *err)
{
    vd_luks_slot *s = &l->slots[idx];
    size_t klen = l->key_bytes, splen = klen * s->stripes;
    uint8_t *split = NULL, *skey = NULL, *tmp = NULL;
    uint32_t iters = 0;
    vd_cipher c;
    vd_ivgen g;
    int ret;

    ret = vd_random_bytes(s->salt, sizeof(s->salt), err);
    if (ret < 0) {
        return ret;
    }
    ret = slot_iters(l, password, s->salt, iter_time, &iters, err);
    if (ret < 0) {
        return ret;
    }
    split = malloc(splen);
    skey = malloc(klen);
    tmp = malloc(klen);
    if (!split || !skey || !tmp) {
        ret = vd_error_set(err, -ENOMEM, "Out of memory");
        goto out;
    }
    vd_pbkdf2(l->hash, (const uint8_t *)password, strlen(password), s->salt,
              32, iters, skey, klen);
    ret = vd_cipher_init(&c, l->alg, l->mode, skey, klen, err);
    if (ret < 0) {
        goto out;
    }
    ret = vd_ivgen_init(&g, l->ivgen, l->ivcipher, l->ivhash, skey, klen,
                        err);
    if (ret < 0) {
        vd_cipher_free(&c);
        goto out;
    }
    ret = af_encode(l->hash, klen, s->stripes, mk, split, tmp, err);
    if (ret == 0) {
        vd_crypt_sectors(&c, &g, VD_LUKS_SECTOR, 0, split, splen, true);
        ret = io(opaque, true, (uint64_t)s->key_offset * VD_LUKS_SECTOR,
                 split, splen, err);
    }
    vd_cipher_free(&c);
    vd_ivgen_free(&g);
    if (ret == 0) {
        s->iters = iters;
        s->active = SLOT_ENABLED;
        ret = store_header(l, io, opaque, err);
    }
out:
    wipe_free(split, splen);
    wipe_free(skey, klen);
    wipe_free(tmp, klen);
    return ret;
}

static void uuid_gen(char *out, const uint8_t *r)
{
    uint8_t u[16];

    memcpy(u, r, 16);
    u[6] = (uint8_t)((u[6] & 0x0f) | 0x40);
    u[8] = (uint8_t)((u[8] & 0x3f) | 0x80);
    snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-"
             "%02x%02x%02x%02x%02x%02x", u[0], u[1], u[2], u[3], u[4], u[5],
             u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14],
             u[15]);
}

/* The header's names and sizes from the options, with QEMU's refusals. */
static int create_params(vd_luks *l, const vd_luks_create_opts *o,
                         vd_error *err)
{
    uint8_t rnd[16];
    int ret, v;

    memset(l, 0, sizeof(*l));
    l->alg = o->cipher_alg;
    l->mode = o->cipher_mode;
    l->ivgen = o->ivgen_alg;
    l->ivhash = o->ivgen_hash_alg;
    l->has_ivhash = o->has_ivgen_hash;
    l->hash = o->hash_alg;
    if (o->cipher_alg >= VD_CIPHER__MAX) {
        return vd_error_set(err, -ENOTSUP, "Algorithm '%s' not supported",
                            vd_cipher_alg_name(o->cipher_alg));
    }
    if (o->cipher_mode == VD_MODE_XTS &&
        vd_cipher_block_len(o->cipher_alg) != 16) {
        return vd_error_set(err, -ENOTSUP, "Unsupported cipher mode xts");
    }
    l->version = 1;
    ret = vd_random_bytes(rnd, sizeof(rnd), err);
    if (ret < 0) {
        return ret;
    }
    uuid_gen(l->uuid, rnd);
    snprintf(l->cipher_name, sizeof(l->cipher_name), "%s",
             cipher_family(l->alg));
    if (l->has_ivhash) {
        snprintf(l->cipher_mode, sizeof(l->cipher_mode), "%s-%s:%s",
                 vd_cipher_mode_name(l->mode), vd_ivgen_name(l->ivgen),
                 vd_hash_name(l->ivhash));
    } else {
        snprintf(l->cipher_mode, sizeof(l->cipher_mode), "%s-%s",
                 vd_cipher_mode_name(l->mode), vd_ivgen_name(l->ivgen));
    }
    snprintf(l->hash_spec, sizeof(l->hash_spec), "%s",
             vd_hash_name(l->hash));
    if (l->ivgen == VD_IVGEN_ESSIV) {
        ret = essiv_cipher(l->alg, l->ivhash, &v, err);
        if (ret < 0) {
            return ret;
        }
        l->ivcipher = v;
    } else {
        l->ivcipher = l->alg;
    }
    l->key_bytes = (uint32_t)vd_cipher_key_len(l->alg) *
                   (l->mode == VD_MODE_XTS ? 2 : 1);
    /* QEMU 7.2 asserts (and aborts) on key material that does not fill
     * whole sectors (24-byte keys outside XTS): refused, since no QEMU
     * could open the image. */
    if ((uint64_t)l->key_bytes * STRIPES % VD_LUKS_SECTOR) {
        ret = vd_error_set(err, -ENOTSUP, "Cipher %s in mode %s is not "
                           "supported: its key material (%u bytes) is not a "
                           "multiple of the %d-byte sector, which QEMU 7.2 "
                           "cannot open", vd_cipher_alg_name(l->alg),
                           vd_cipher_mode_name(l->mode),
                           l->key_bytes * STRIPES, VD_LUKS_SECTOR);
        return ret;
    }
    return 0;
}

int vd_luks_create_payload(const vd_luks_create_opts *o,
                           const char *optprefix, uint64_t *payload,
                           vd_error *err)
{
    char *password = get_password(o->key_secret, optprefix, err);
    vd_luks l;
    int ret;

    if (!password) {
        return -EINVAL;
    }
    wipe_str(password);
    ret = create_params(&l, o, err);
    if (ret == 0 && payload) {
        /* vd_luks_create()'s layout: header, then 8 slots of material. */
        *payload = KEY_SLOT_OFFSET + VD_LUKS_SLOTS *
                   split_sectors(l.key_bytes, STRIPES) * VD_LUKS_SECTOR;
    }
    explicit_bzero(&l, sizeof(l));
    return ret;
}

int vd_luks_create_check(const vd_luks_create_opts *o, const char *optprefix,
                         vd_error *err)
{
    return vd_luks_create_payload(o, optprefix, NULL, err);
}

int vd_luks_create(vd_luks *l, const vd_luks_create_opts *o,
                   const char *optprefix,
                   int (*init)(void *opaque, uint64_t payload, vd_error *err),
                   vd_luks_io_fn io, void *opaque, vd_error *err)
{
    uint8_t *mk = NULL;
    char *password = NULL;
    uint32_t iters = 0;
    uint64_t sks;
    int ret;

    memset(l, 0, sizeof(*l));
    password = get_password(o->key_secret, optprefix, err);
    if (!password) {
        return -EINVAL;
    }
    ret = create_params(l, o, err);
    if (ret < 0) {
        goto out;
    }
    ret = vd_random_bytes(l->mk_salt, sizeof(l->mk_salt), err);
    mk = malloc(l->key_bytes);
    if (ret == 0 && !mk) {
        ret = vd_error_set(err, -ENOMEM, "Out of memory");
    }
    if (ret == 0) {
        ret = vd_random_bytes(mk, l->key_bytes, err);
    }
    if (ret == 0) {
        ret = setup_payload(l, mk, err);
    }
    if (ret < 0) {
        goto out;
    }
    /* The digest gets an eighth of iter-time, as cryptsetup. */
    ret = scale_iters(vd_pbkdf2_count_iters(l->hash, mk, l->key_bytes,
                                            l->mk_salt, 32, 20),
                      o->iter_time, 8, &iters, err);
    if (ret < 0) {
        goto out;
    }
    l->mk_iters = iters;
    vd_pbkdf2(l->hash, mk, l->key_bytes, l->mk_salt, 32, iters, l->mk_digest,
              20);
    sks = split_sectors(l->key_bytes, STRIPES);
    for (int i = 0; i < VD_LUKS_SLOTS; i++) {
        l->slots[i].active = SLOT_DISABLED;
        l->slots[i].key_offset = (uint32_t)(KEY_SLOT_OFFSET / VD_LUKS_SECTOR +
                                            i * sks);
        l->slots[i].stripes = STRIPES;
    }
    l->payload_offset = (uint32_t)(KEY_SLOT_OFFSET / VD_LUKS_SECTOR +
                                   VD_LUKS_SLOTS * sks);
    ret = init(opaque, vd_luks_payload_bytes(l), err);
    if (ret == 0) {
        ret = store_key(l, 0, password, mk, o->iter_time, io, opaque, err);
    }
    if (ret == 0 && o->key_secret) {
        l->secret = strdup(o->key_secret);
    }
out:
    if (mk) {
        wipe_free(mk, l->key_bytes);
    }
    wipe_str(password);
    if (ret < 0) {
        vd_luks_free(l);
    }
    return ret;
}

/* ---- amend ---- */

static int count_active(const vd_luks *l)
{
    int n = 0;
    for (int i = 0; i < VD_LUKS_SLOTS; i++) {
        n += l->slots[i].active == SLOT_ENABLED;
    }
    return n;
}

static int erase_key(vd_luks *l, int idx, vd_luks_io_fn io, void *opaque,
                     vd_error *err)
{
    vd_luks_slot *s = &l->slots[idx];
    size_t splen = (size_t)l->key_bytes * s->stripes;
    uint8_t *garbage;
    int ret, r2 = 0;

    if (s->stripes > VD_LUKS_MAX_STRIPES) {
        return vd_error_set(err, -EINVAL, "Keyslot %d has %" PRIu32
                            " anti-forensic stripes, more than %u", idx,
                            s->stripes, VD_LUKS_MAX_STRIPES);
    }
    garbage = calloc(1, splen ? splen : 1);
    if (!garbage) {
        return vd_error_set(err, -ENOMEM, "Out of memory");
    }
    memset(s->salt, 0, sizeof(s->salt));
    s->iters = 0;
    s->active = SLOT_DISABLED;
    ret = store_header(l, io, opaque, err);
    /* The material is overwritten even when the header write failed. */
    for (int i = 0; i < ERASE_ITERATIONS && r2 == 0; i++) {
        r2 = vd_random_bytes(garbage, splen, err);
        if (r2 < 0 && i > 0) {
            break;
        }
        r2 = io(opaque, true, (uint64_t)s->key_offset * VD_LUKS_SECTOR,
                garbage, splen, err);
    }
    free(garbage);
    return ret < 0 ? ret : r2;
}

typedef struct amend_opts {
    int state;                  /* 0 active, 1 inactive */
    bool has_keyslot, has_iter_time;
    uint64_t keyslot, iter_time;
    char *old_secret, *new_secret;
} amend_opts;

/* The key slots an amend turns active and inactive (bit i: slot i),
 * when it only plans (vd_luks_amend_plan()). */
typedef struct amend_plan {
    unsigned activate, erase;
} amend_plan;

/* With @plan, every check (the passwords tried included) and no write:
 * the slot that would be written goes into @plan. */
static int amend_add(vd_luks *l, amend_opts *a, bool force,
                     vd_luks_io_fn io, void *opaque, amend_plan *plan,
                     vd_error *err)
{
    char *oldpw = NULL, *newpw = NULL;
    uint8_t *mk = NULL;
    int slot = -1, ret;

    if (!a->new_secret) {
        return vd_error_set(err, -EINVAL, "'new-secret' is required to "
                            "activate a keyslot");
    }
    if (a->old_secret) {
        return vd_error_set(err, -EINVAL, "'old-secret' must not be given "
                            "when activating keyslots");
    }
    if (a->has_keyslot) {
        if (a->keyslot >= VD_LUKS_SLOTS) {
            return vd_error_set(err, -EINVAL, "Invalid keyslot %u specified, "
                                "must be between 0 and %u",
                                (unsigned)a->keyslot, VD_LUKS_SLOTS - 1);
        }
        slot = (int)a->keyslot;
    } else {
        for (int i = 0; i < VD_LUKS_SLOTS && slot < 0; i++) {
            if (l->slots[i].active != SLOT_ENABLED) {
                slot = i;
            }
        }
        if (slot < 0) {
            return vd_error_set(err, -EINVAL, "Can't add a keyslot - all "
                                "keyslots are in use");
        }
    }
    if (!force && l->slots[slot].active == SLOT_ENABLED) {
        return vd_error_set(err, -EINVAL, "Refusing to overwrite active "
                            "keyslot %i - please erase it first", slot);
    }
    oldpw = get_password(l->secret, NULL, err);
    if (!oldpw) {
        return -EINVAL;
    }
    mk = malloc(l->key_bytes);
    if (!mk) {
        ret = vd_error_set(err, -ENOMEM, "Out of memory");
        goto out;
    }
    ret = find_key(l, oldpw, mk, io, opaque, err);
    if (ret == 0) {
        newpw = vd_secret_get_utf8(a->new_secret, err);
        ret = newpw ? 0 : -EINVAL;
    }
    if (ret == 0 && (l->slots[slot].stripes == 0 ||
                     l->slots[slot].stripes > VD_LUKS_MAX_STRIPES)) {
        ret = vd_error_set(err, -EINVAL, "Keyslot %d is corrupted", slot);
    } else if (ret == 0) {
        uint64_t iter_time = a->has_iter_time ? a->iter_time
                                              : DEFAULT_ITER_TIME;
        if (plan) {
            uint8_t salt[32] = { 0 };   /* the speed does not depend on it */
            uint32_t iters;
            ret = slot_iters(l, newpw, salt, iter_time, &iters, err);
            if (ret == 0) {
                plan->activate |= 1u << slot;
            }
        } else {
            ret = store_key(l, slot, newpw, mk, iter_time, io, opaque, err);
        }
        /* QEMU's hint after a failed key-slot write. */
        if (ret < 0 && err && !err->hint[0]) {
            snprintf(err->hint, sizeof(err->hint), "Failed to write to "
                     "keyslot %d", slot);
        }
    }
out:
    wipe_free(mk, l->key_bytes);
    wipe_str(oldpw);
    wipe_str(newpw);
    return ret;
}

/* With @plan as amend_add(): the slots that would be erased go there. */
static int amend_erase(vd_luks *l, amend_opts *a, bool force,
                       vd_luks_io_fn io, void *opaque, amend_plan *plan,
                       vd_error *err)
{
    char *oldpw = NULL;
    uint8_t *tmp = NULL;
    int ret = 0;

    if (a->new_secret) {
        return vd_error_set(err, -EINVAL, "'new-secret' must not be given "
                            "when erasing keyslots");
    }
    if (a->has_iter_time) {
        return vd_error_set(err, -EINVAL, "'iter-time' must not be given "
                            "when erasing keyslots");
    }
    if (a->old_secret) {
        oldpw = vd_secret_get_utf8(a->old_secret, err);
        if (!oldpw) {
            return -EINVAL;
        }
        tmp = malloc(l->key_bytes);
        if (!tmp) {
            ret = vd_error_set(err, -ENOMEM, "Out of memory");
            goto out;
        }
    }
    if (a->has_keyslot) {
        int slot = (int)a->keyslot;
        bool skipped = false;

        if (a->keyslot >= VD_LUKS_SLOTS) {
            ret = vd_error_set(err, -EINVAL, "Invalid keyslot %i specified, "
                               "must be between 0 and %i", (int)a->keyslot,
                               VD_LUKS_SLOTS - 1);
            goto out;
        }
        if (oldpw) {
            ret = load_key(l, slot, oldpw, tmp, io, opaque, &skipped, err);
            if (ret < 0) {
                goto out;
            }
            if (ret == 0) {
                ret = vd_error_set(err, -EINVAL, "Given keyslot %i doesn't "
                                   "contain the given old password for erase "
                                   "operation", slot);
                goto out;
            }
        }
        if (!force && l->slots[slot].active != SLOT_ENABLED) {
            ret = vd_error_set(err, -EINVAL, "Given keyslot %i is already "
                               "erased (inactive) ", slot);
            goto out;
        }
        if (!force && count_active(l) == 1) {
            ret = vd_error_set(err, -EINVAL, "Attempt to erase the only "
                               "active keyslot %i which will erase all the "
                               "data in the image irreversibly - refusing "
                               "operation", slot);
            goto out;
        }
        if (plan) {
            plan->erase |= 1u << slot;
        } else {
            ret = erase_key(l, slot, io, opaque, err);
        }
    } else if (oldpw) {
        unsigned mask = 0;
        int n = 0;
        bool skipped = false;

        for (int i = 0; i < VD_LUKS_SLOTS; i++) {
            ret = load_key(l, i, oldpw, tmp, io, opaque, &skipped, err);
            if (ret < 0) {
                goto out;
            }
            if (ret == 1) {
                mask |= 1u << i;
                n++;
            }
        }
        ret = 0;
        if (n == 0) {
            ret = vd_error_set(err, -EINVAL, "No keyslots match given (old) "
                               "password for erase operation");
            goto out;
        }
        if (!force && n == count_active(l)) {
            ret = vd_error_set(err, -EINVAL, "All the active keyslots match "
                               "the (old) password that was given and "
                               "erasing them will erase all the data in the "
                               "image irreversibly - refusing operation");
            goto out;
        }
        if (plan) {
            plan->erase |= mask;
        } else {
            for (int i = 0; i < VD_LUKS_SLOTS && ret == 0; i++) {
                if (mask & (1u << i)) {
                    ret = erase_key(l, i, io, opaque, err);
                }
            }
        }
    } else {
        ret = vd_error_set(err, -EINVAL, "To erase keyslot(s), either "
                           "explicit keyslot index or the password currently "
                           "contained in them must be given");
    }
out:
    if (tmp) {
        wipe_free(tmp, l->key_bytes);
    }
    wipe_str(oldpw);
    return ret;
}

static int amend(vd_luks *l, vd_opts *opts, const char *prefix, bool force,
                 vd_luks_io_fn io, void *opaque, amend_plan *plan,
                 vd_error *err)
{
    static const char *const states[] = { "active", "inactive", NULL };
    amend_opts a;
    char key[64];
    int ret;

    memset(&a, 0, sizeof(a));
    snprintf(key, sizeof(key), "%sstate", prefix);
    if (!vd_opts_get(opts, key)) {
        return vd_error_set(err, -EINVAL, "Parameter '%s' is missing", key);
    }
    ret = vd_opts_take_enum(opts, key, states, 0, &a.state, err);
    snprintf(key, sizeof(key), "%skeyslot", prefix);
    a.has_keyslot = vd_opts_get(opts, key) != NULL;
    if (ret == 0) {
        ret = vd_opts_take_uint(opts, key, 0, &a.keyslot, err);
    }
    snprintf(key, sizeof(key), "%siter-time", prefix);
    a.has_iter_time = vd_opts_get(opts, key) != NULL;
    if (ret == 0) {
        ret = vd_opts_take_uint(opts, key, 0, &a.iter_time, err);
    }
    snprintf(key, sizeof(key), "%sold-secret", prefix);
    a.old_secret = vd_opts_take(opts, key);
    snprintf(key, sizeof(key), "%snew-secret", prefix);
    a.new_secret = vd_opts_take(opts, key);
    if (ret == 0) {
        ret = a.state == 0 ? amend_add(l, &a, force, io, opaque, plan, err)
                           : amend_erase(l, &a, force, io, opaque, plan,
                                         err);
    }
    free(a.old_secret);
    free(a.new_secret);
    return ret;
}

int vd_luks_amend(vd_luks *l, vd_opts *opts, const char *prefix, bool force,
                  vd_luks_io_fn io, void *opaque, vd_error *err)
{
    return amend(l, opts, prefix, force, io, opaque, NULL, err);
}

int vd_luks_amend_plan(vd_luks *l, vd_opts *opts, const char *prefix,
                       bool force, vd_luks_io_fn io, void *opaque,
                       unsigned *active, unsigned *activate,
                       unsigned *erase, vd_error *err)
{
    amend_plan plan = { 0, 0 };
    int ret = amend(l, opts, prefix, force, io, opaque, &plan, err);

    *active = 0;
    for (int i = 0; i < VD_LUKS_SLOTS; i++) {
        if (l->slots[i].active == SLOT_ENABLED) {
            *active |= 1u << i;
        }
    }
    *activate = ret == 0 ? plan.activate : 0;
    *erase = ret == 0 ? plan.erase : 0;
    return ret;
}

void vd_luks_plan_report(const char *prefix, unsigned active,
                         unsigned activate, unsigned erase,
                         vd_amend_change_fn fn, void *opaque)
{
    for (int i = 0; i < VD_LUKS_SLOTS; i++) {
        unsigned bit = 1u << i;
        char name[64];

        if (!((activate | erase) & bit)) {
            continue;
        }
        snprintf(name, sizeof(name), "%sslots[%d].active", prefix, i);
        fn(name, (active & bit) ? "true" : "false",
           (activate & bit) ? "true" : "false", opaque);
    }
}
