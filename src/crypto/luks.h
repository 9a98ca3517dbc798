/*
 * LUKS1 headers, key slots and the anti-forensic splitter, as QEMU 7.2's
 * crypto/block-luks.c reads, creates and amends them: shared by the luks
 * block driver (src/drivers/luks.c, header at offset 0 of the file) and
 * qcow2's encrypt.format=luks (header inside the qcow2 file, at the
 * offset of the full disk encryption header extension). The caller
 * gives a read/write callback at byte offsets relative to the start of
 * the LUKS header.
 *
 * Layout (big endian, 592 bytes): magic "LUKS\xba\xbe", version 1,
 * cipher name, mode ("xts-plain64", "cbc-essiv:sha256") and hash (32
 * bytes each, NUL-padded), payload offset (512-byte sectors), key bytes,
 * master key digest (20), its salt (32) and PBKDF2 iterations, UUID text
 * (40), then 8 key slots of 48 bytes: state (0x00AC71F3 active,
 * 0x0000DEAD inactive), iterations, salt (32), key material offset
 * (sectors), anti-forensic stripes. A slot's material is the master key
 * split into @stripes blocks (AF split over the header's hash) and
 * encrypted with the PBKDF2 of the passphrase, sector by sector with the
 * image's IV generator from sector 0.
 *
 * QEMU 7.2 opens LUKS version 1 only ("LUKS version 2 is not
 * supported"), and so does vdisk.
 */
#ifndef VDISK_CRYPTO_LUKS_H
#define VDISK_CRYPTO_LUKS_H

#include <stdbool.h>
#include <stdint.h>

#include "crypto/cipher.h"
#include "core/opts.h"
#include "vdisk/vdisk.h"

#define VD_LUKS_HDR_SIZE 592
#define VD_LUKS_SECTOR 512
#define VD_LUKS_SLOTS 8

/* Bounds beyond QEMU's checks (it has none): a key slot asking for more
 * PBKDF2 iterations (or a master key digest asking for more) than
 * vd_luks_max_iters is not tried (2^31 iterations would take minutes per
 * slot), and a slot with more anti-forensic stripes than
 * vd_luks_max_stripes is refused (its material would be key_bytes *
 * stripes bytes). The fuzz target lowers the first. */
extern uint32_t vd_luks_max_iters;
#define VD_LUKS_MAX_STRIPES 65536u

/* Reads (@write false) or writes @len bytes at @off from the start of
 * the LUKS header. */
typedef int (*vd_luks_io_fn)(void *opaque, bool write, uint64_t off,
                             uint8_t *buf, size_t len, vd_error *err);

typedef struct vd_luks_slot {
    uint32_t active, iters, key_offset, stripes;
    uint8_t salt[32];
} vd_luks_slot;

typedef struct vd_luks {
    char cipher_name[33], cipher_mode[33], hash_spec[33], uuid[41];
    uint16_t version;
    uint32_t payload_offset;        /* sectors */
    uint32_t key_bytes;
    uint8_t mk_digest[20], mk_salt[32];
    uint32_t mk_iters;
    vd_luks_slot slots[VD_LUKS_SLOTS];

    /* Parsed from the names. */
    vd_cipher_alg alg, ivcipher;
    vd_cipher_mode mode;
    vd_ivgen_alg ivgen;
    vd_hash_alg hash, ivhash;
    bool has_ivhash;

    /* After a successful unlock: the payload's cipher and IV generator. */
    bool unlocked;
    vd_cipher cipher;
    vd_ivgen ivg;
    char *secret;                   /* the key-secret id opened with */
} vd_luks;

/* Checks and parses the first VD_LUKS_HDR_SIZE bytes of @hdr into @l
 * with QEMU's messages ("Volume is not in LUKS format", "Keyslot 3 is
 * overlapping with the encrypted payload", "Cipher mode foo not
 * supported"). */
int vd_luks_parse(vd_luks *l, const uint8_t *hdr, vd_error *err);
/* Finds the key slot @password opens and sets up the payload cipher:
 * "Invalid password, cannot unlock any keyslot" when none. */
int vd_luks_unlock(vd_luks *l, const char *password, vd_luks_io_fn io,
                   void *opaque, vd_error *err);
/* parse + unlock with the password of secret @secret_id, as QEMU's
 * qcrypto_block_luks_open: without @no_io the secret is required
 * ("Parameter '%skey-secret' is required for cipher", @optprefix
 * "encrypt." for qcow2). */
int vd_luks_open(vd_luks *l, const uint8_t *hdr, const char *secret_id,
                 const char *optprefix, bool no_io, vd_luks_io_fn io,
                 void *opaque, vd_error *err);
void vd_luks_free(vd_luks *l);

/* Payload bytes from @off (of the payload, a multiple of 512, which
 * gives the IV's sector number), in place. */
void vd_luks_crypt(const vd_luks *l, uint64_t sector, uint8_t *buf,
                   size_t len, bool encrypt);
static inline uint64_t vd_luks_payload_bytes(const vd_luks *l)
{
    return (uint64_t)l->payload_offset * VD_LUKS_SECTOR;
}

/* QEMU's QCryptoBlockInfoLUKS as a JSON object text (malloc'd). */
char *vd_luks_info_json(const vd_luks *l);

/* The creation options (QEMU's QCryptoBlockCreateOptionsLUKS). */
typedef struct vd_luks_create_opts {
    char *key_secret;
    int cipher_alg, cipher_mode, ivgen_alg, ivgen_hash_alg, hash_alg;
    uint64_t iter_time;
    bool has_ivgen_hash;
} vd_luks_create_opts;

/* Takes "@prefix"key-secret, cipher-alg, ... from @opts with QEMU's
 * messages for bad values. */
int vd_luks_create_opts_take(vd_opts *opts, const char *prefix,
                             vd_luks_create_opts *o, vd_error *err);
void vd_luks_create_opts_free(vd_luks_create_opts *o);

/* What vd_luks_create() would refuse before writing anything (the
 * secret, the cipher choices), for checking before the file exists. */
int vd_luks_create_check(const vd_luks_create_opts *o, const char *optprefix,
                         vd_error *err);
/* The same checks, and the payload offset in bytes (header and key
 * material) of the header vd_luks_create() would make: QEMU's
 * qcrypto_block_calculate_payload_offset(), for qcow2's measure. */
int vd_luks_create_payload(const vd_luks_create_opts *o,
                           const char *optprefix, uint64_t *payload,
                           vd_error *err);
/* Creates a LUKS1 header as qemu-img does: random master key, key slot
 * 0 holding it for the key-secret's passphrase, PBKDF2 iterations
 * measured for iter-time. @init is called with the payload offset in
 * bytes before anything is written (the caller makes room); then slot 0
 * and the header are written through @io. On success @l is unlocked. */
int vd_luks_create(vd_luks *l, const vd_luks_create_opts *o,
                   const char *optprefix,
                   int (*init)(void *opaque, uint64_t payload, vd_error *err),
                   vd_luks_io_fn io, void *opaque, vd_error *err);

/* qemu-img amend's key slot changes (state, keyslot, old-secret,
 * new-secret, iter-time taken from @opts with @prefix), QEMU's checks
 * and messages; writes through @io. */
int vd_luks_amend(vd_luks *l, vd_opts *opts, const char *prefix,
                  bool force, vd_luks_io_fn io, void *opaque,
                  vd_error *err);
/* vd_luks_amend() as a dry run: the same checks and messages, the
 * passwords tried on the key slots included (each costs that slot's
 * PBKDF time, as in the real amend) and a new key's iteration count
 * measured (100-200 ms), and no write. *@active gets the
 * key slots active now (bit i: slot i); on success *@activate and
 * *@erase the slots the amend would write a key into and erase. Reads
 * through @io only. */
int vd_luks_amend_plan(vd_luks *l, vd_opts *opts, const char *prefix,
                       bool force, vd_luks_io_fn io, void *opaque,
                       unsigned *active, unsigned *activate,
                       unsigned *erase, vd_error *err);
/* Reports a plan of vd_luks_amend_plan() to @fn, one call per key slot
 * that changes, named as qemu-img info names it ("PREFIXslots[N].active",
 * old and new "true"/"false"; a slot given a new key while active, with
 * force, shows true -> true). */
void vd_luks_plan_report(const char *prefix, unsigned active,
                         unsigned activate, unsigned erase,
                         vd_amend_change_fn fn, void *opaque);

#endif
