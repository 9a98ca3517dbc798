/*
 * NBD wire protocol: magic numbers, option/reply/command codes, flag bits
 * and the fixed-size messages, as in ../shared/specs/nbd-proto.md
 * (section numbers below refer to it) plus QEMU's metadata context from
 * ../shared/specs/nbd-qemu-extensions.rst. Everything on the wire is
 * big-endian; the packed structs hold wire order and are converted only
 * where they are read or written (handshake.c, transmission.c).
 *
 * Organisation: handshake constants, then transmission constants, then
 * the limits this server enforces, then the wire structs.
 */
#ifndef VDISK_NBD_PROTO_H
#define VDISK_NBD_PROTO_H

#include <stdint.h>

/* ---- Handshake ("Newstyle negotiation") ---- */

#define NBD_INIT_MAGIC      UINT64_C(0x4e42444d41474943) /* "NBDMAGIC" */
#define NBD_OPTS_MAGIC      UINT64_C(0x49484156454F5054) /* "IHAVEOPT" */
#define NBD_REP_MAGIC       UINT64_C(0x0003e889045565a9)

/* Handshake flags (server, 16 bits). */
#define NBD_FLAG_FIXED_NEWSTYLE   (1u << 0) /* fixed newstyle understood */
#define NBD_FLAG_NO_ZEROES        (1u << 1) /* may skip 124 zero bytes */

/* Client flags (32 bits); any other bit makes us drop the connection. */
#define NBD_FLAG_C_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_C_NO_ZEROES      (1u << 1)

/* Option types ("Option types"). */
#define NBD_OPT_EXPORT_NAME       1
#define NBD_OPT_ABORT             2
#define NBD_OPT_LIST              3
#define NBD_OPT_STARTTLS          5
#define NBD_OPT_INFO              6
#define NBD_OPT_GO                7
#define NBD_OPT_STRUCTURED_REPLY  8
#define NBD_OPT_LIST_META_CONTEXT 9
#define NBD_OPT_SET_META_CONTEXT  10

/* Option reply types ("Option reply types"); errors have bit 31 set. */
#define NBD_REP_ACK               1u
#define NBD_REP_SERVER            2u
#define NBD_REP_INFO              3u
#define NBD_REP_META_CONTEXT      4u
#define NBD_REP_ERR_UNSUP         (0x80000000u + 1)
#define NBD_REP_ERR_POLICY        (0x80000000u + 2)
#define NBD_REP_ERR_INVALID       (0x80000000u + 3)
#define NBD_REP_ERR_PLATFORM      (0x80000000u + 4)
#define NBD_REP_ERR_TLS_REQD      (0x80000000u + 5)
#define NBD_REP_ERR_UNKNOWN       (0x80000000u + 6)
#define NBD_REP_ERR_SHUTDOWN      (0x80000000u + 7)
#define NBD_REP_ERR_BLOCK_SIZE_REQD (0x80000000u + 8)
#define NBD_REP_ERR_TOO_BIG       (0x80000000u + 9)

/* Information types for NBD_OPT_INFO / NBD_OPT_GO. */
#define NBD_INFO_EXPORT           0
#define NBD_INFO_NAME             1
#define NBD_INFO_DESCRIPTION      2
#define NBD_INFO_BLOCK_SIZE       3

/* Transmission flags (16 bits, "Transmission flags"). */
#define NBD_FLAG_HAS_FLAGS        (1u << 0)  /* always set */
#define NBD_FLAG_READ_ONLY        (1u << 1)  /* writes fail with EPERM */
#define NBD_FLAG_SEND_FLUSH       (1u << 2)  /* NBD_CMD_FLUSH understood */
#define NBD_FLAG_SEND_FUA         (1u << 3)  /* NBD_CMD_FLAG_FUA understood */
#define NBD_FLAG_ROTATIONAL       (1u << 4)  /* seek-sensitive medium */
#define NBD_FLAG_SEND_TRIM        (1u << 5)  /* NBD_CMD_TRIM understood */
#define NBD_FLAG_SEND_WRITE_ZEROES (1u << 6) /* WRITE_ZEROES + NO_HOLE */
#define NBD_FLAG_SEND_DF          (1u << 7)  /* READ honours FLAG_DF */
#define NBD_FLAG_CAN_MULTI_CONN   (1u << 8)  /* flush visible to all conns */
#define NBD_FLAG_SEND_CACHE       (1u << 10) /* NBD_CMD_CACHE understood */
#define NBD_FLAG_SEND_FAST_ZERO   (1u << 11) /* WRITE_ZEROES + FAST_ZERO */

/* ---- Transmission ---- */

#define NBD_REQUEST_MAGIC         0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC    0x67446698u
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efu

/* Command types ("Request types"). */
#define NBD_CMD_READ              0
#define NBD_CMD_WRITE             1
#define NBD_CMD_DISC              2
#define NBD_CMD_FLUSH             3
#define NBD_CMD_TRIM              4
#define NBD_CMD_CACHE             5
#define NBD_CMD_WRITE_ZEROES      6
#define NBD_CMD_BLOCK_STATUS      7

/* Command flags ("Command flags"). */
#define NBD_CMD_FLAG_FUA          (1u << 0) /* persist before replying */
#define NBD_CMD_FLAG_NO_HOLE      (1u << 1) /* WRITE_ZEROES: no deallocation */
#define NBD_CMD_FLAG_DF           (1u << 2) /* READ: one content chunk */
#define NBD_CMD_FLAG_REQ_ONE      (1u << 3) /* BLOCK_STATUS: one extent */
#define NBD_CMD_FLAG_FAST_ZERO    (1u << 4) /* WRITE_ZEROES: fail if slow */

/* Structured reply flags and chunk types. */
#define NBD_REPLY_FLAG_DONE       (1u << 0)
#define NBD_REPLY_TYPE_NONE       0
#define NBD_REPLY_TYPE_OFFSET_DATA 1
#define NBD_REPLY_TYPE_OFFSET_HOLE 2
#define NBD_REPLY_TYPE_BLOCK_STATUS 5
#define NBD_REPLY_TYPE_ERROR      ((1u << 15) + 1)
#define NBD_REPLY_TYPE_ERROR_OFFSET ((1u << 15) + 2)

/* base:allocation status bits. */
#define NBD_STATE_HOLE            (1u << 0)
#define NBD_STATE_ZERO            (1u << 1)

/* Error values ("Error values"): the only ones we may put on the wire. */
#define NBD_EPERM                 1
#define NBD_EIO                   5
#define NBD_ENOMEM                12
#define NBD_EINVAL                22
#define NBD_ENOSPC                28
#define NBD_EOVERFLOW             75
#define NBD_ENOTSUP               95
#define NBD_ESHUTDOWN             108

/* ---- Limits this server enforces ---- */

/* Longest string the spec allows (export names, queries, messages). */
#define NBD_MAX_STRING            4096
/* Largest option payload we accept. The longest legitimate option is a
 * META_CONTEXT with a few 4 KiB queries; more is treated as abuse and
 * ends the connection (the spec lets a server hard-disconnect on DoS). */
#define NBD_MAX_OPTION_LEN        (64u * 1024)
/* Largest READ/WRITE payload, as QEMU: the spec's default maximum. */
#define NBD_MAX_PAYLOAD           (32u * 1024 * 1024)
/* Preferred block size advertised in NBD_INFO_BLOCK_SIZE. */
#define NBD_PREFERRED_BLOCK       4096u
/* Cap on descriptors in one BLOCK_STATUS chunk (spec: SHOULD NOT exceed
 * 2^20; fewer keeps one request's work and memory small). */
#define NBD_MAX_EXTENTS           (64u * 1024)
/* Metadata contexts offered, and the ids given to them by SET. */
#define NBD_CTX_BASE_ALLOCATION   "base:allocation"
#define NBD_CTX_ALLOCATION_DEPTH  "qemu:allocation-depth"
#define NBD_CTX_ID_BASE           1u
#define NBD_CTX_ID_DEPTH          2u
/* qemu:dirty-bitmap:NAME of an export's bitmap i has id NBD_CTX_ID_BITMAP0
 * + i; its extents carry NBD_STATE_DIRTY (../shared/specs/
 * nbd-qemu-extensions.rst). */
#define NBD_CTX_DIRTY_BITMAP      "qemu:dirty-bitmap:"
#define NBD_CTX_ID_BITMAP0        3u
#define NBD_STATE_DIRTY           (1u << 0)

/* ---- Wire structs (big-endian fields) ---- */

/* Option request header sent by the client. */
struct nbd_option_hdr {
    uint64_t magic;   /* NBD_OPTS_MAGIC */
    uint32_t option;
    uint32_t length;  /* bytes of option data that follow */
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_option_hdr) == 16, "option header");

/* Option reply header sent by the server. */
struct nbd_option_reply {
    uint64_t magic;   /* NBD_REP_MAGIC */
    uint32_t option;
    uint32_t type;    /* NBD_REP_* */
    uint32_t length;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_option_reply) == 20, "option reply");

/* Transmission request header. */
struct nbd_request_hdr {
    uint32_t magic;   /* NBD_REQUEST_MAGIC */
    uint16_t flags;   /* NBD_CMD_FLAG_* */
    uint16_t type;    /* NBD_CMD_* */
    uint64_t cookie;  /* opaque, echoed in the reply */
    uint64_t offset;
    uint32_t length;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_request_hdr) == 28, "request header");

struct nbd_simple_reply {
    uint32_t magic;   /* NBD_SIMPLE_REPLY_MAGIC */
    uint32_t error;   /* NBD_E* */
    uint64_t cookie;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_simple_reply) == 16, "simple reply");

struct nbd_chunk_hdr {
    uint32_t magic;   /* NBD_STRUCTURED_REPLY_MAGIC */
    uint16_t flags;   /* NBD_REPLY_FLAG_* */
    uint16_t type;    /* NBD_REPLY_TYPE_* */
    uint64_t cookie;
    uint32_t length;  /* payload bytes that follow */
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_chunk_hdr) == 20, "chunk header");

#endif
