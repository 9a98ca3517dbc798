/*
 * qcow2 driver: internal header shared by the files of the driver.
 *
 * The driver is split by layer:
 *   qcow2.c     open/close/create/probe/info, header and extensions, the
 *               vtable and the request entry points (read/write/zero/...)
 *   cache.c     the metadata cache (L2 tables and refcount blocks), LRU
 *               with dirty tracking and flush dependencies between caches
 *   refcount.c  refcount lookup/update, cluster allocation and freeing,
 *               refcount table growth
 *   cluster.c   L1/L2 mapping: lookup, L2 allocation, allocating writes,
 *               zero clusters and discard
 *   check.c     consistency check and repair        (second engineer)
 *   compress.c  compressed cluster (de)compression  (second engineer)
 *   validate.c  validation of what a metadata change relies on, before
 *               its first write (docs/qcow2.md "Damaged images")
 *   bitmap.c    the bitmaps extension, validated as QEMU 7.2 loads it
 *   overlap.c, amend.c, measure.c, snapshot.c, du.c (see each file's head)
 *
 * This header holds the on-disk structures (big endian on disk; we convert
 * only at load and store), the constants and flag bits of
 * ../shared/specs/qcow2.txt, the driver state and the prototypes of
 * the internal functions. Names here are stable: other files build on them.
 *
 * Locking: qcow2_state.lock protects every mutable field of the state
 * (header fields, L1 table, caches, allocation decisions, the in-flight
 * allocation list). Functions documented "lock held" must be called with
 * it held; they may do metadata I/O under it. Guest data I/O to allocated
 * clusters is done without the lock.
 */
#ifndef VDISK_DRIVERS_QCOW2_QCOW2_H
#define VDISK_DRIVERS_QCOW2_QCOW2_H

#include <endian.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "core/block_int.h"

/* ------------------------------------------------------------------ */
/* Header (qcow2.txt "Header")                                        */
/* ------------------------------------------------------------------ */

#define QCOW2_MAGIC 0x514649fbu /* "QFI\xfb" */

#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21          /* QEMU implementation limit */
#define QCOW2_DEFAULT_CLUSTER_BITS 16
#define QCOW2_MAX_BACKING_NAME 1023        /* backing_file_size limit */
#define QCOW2_MAX_L1_BYTES (32u << 20)     /* QEMU: 32 MB L1 table */
#define QCOW2_MAX_REFTABLE_BYTES (8u << 20) /* QEMU: 8 MB refcount table */
/* New refcount blocks whose table entry may wait for the next write of
 * the refcount cache; one more is hooked up at once, as QEMU does. */
#define QCOW2_REFTABLE_PENDING_MAX 16
#define QCOW2_MAX_SNAPSHOTS 65536
#define QCOW2_V2_HEADER_LEN 72
#define QCOW2_V3_MIN_HEADER_LEN 104
/* Host offsets in L1/L2/refcount entries are bits 9..55 (64 PB). */
#define QCOW2_MAX_HOST_OFFSET ((1ull << 56) - 1)

/* The fixed part of the header. v2 images end at snapshots_offset (72
 * bytes); v3 images have at least up to header_length (104 bytes);
 * compression_type is present when header_length > 104. */
typedef struct __attribute__((packed)) qcow2_header {
    uint32_t magic;
    uint32_t version;
    uint64_t backing_file_offset;
    uint32_t backing_file_size;
    uint32_t cluster_bits;
    uint64_t size;
    uint32_t crypt_method;
    uint32_t l1_size;
    uint64_t l1_table_offset;
    uint64_t refcount_table_offset;
    uint32_t refcount_table_clusters;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    /* version 3 */
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    uint32_t refcount_order;
    uint32_t header_length;
    /* additional field (header_length > 104) */
    uint8_t compression_type;
    uint8_t padding[7];
} qcow2_header;
_Static_assert(sizeof(qcow2_header) == 112, "qcow2 header size");

/* crypt_method */
#define QCOW2_CRYPT_NONE 0
#define QCOW2_CRYPT_AES  1
#define QCOW2_CRYPT_LUKS 2

/* Incompatible feature bits. */
#define QCOW2_INCOMPAT_DIRTY       (1ull << 0) /* refcounts may be stale */
#define QCOW2_INCOMPAT_CORRUPT     (1ull << 1) /* metadata may be corrupt */
#define QCOW2_INCOMPAT_DATA_FILE   (1ull << 2) /* guest data in external file */
#define QCOW2_INCOMPAT_COMPRESSION (1ull << 3) /* compression_type != zlib */
#define QCOW2_INCOMPAT_EXTL2       (1ull << 4) /* extended L2 (subclusters) */
#define QCOW2_INCOMPAT_MASK        0x1full     /* all bits we understand */

/* Compatible feature bits. */
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0) /* may postpone refcounts */
#define QCOW2_COMPAT_MASK           0x1ull

/* Autoclear feature bits. */
#define QCOW2_AUTOCLEAR_BITMAPS       (1ull << 0) /* bitmaps ext consistent */
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (1ull << 1) /* data file is raw image */
#define QCOW2_AUTOCLEAR_MASK          0x3ull

/* compression_type */
#define QCOW2_COMPRESSION_ZLIB 0
#define QCOW2_COMPRESSION_ZSTD 1

/* ------------------------------------------------------------------ */
/* Header extensions (qcow2.txt "Header extensions")                  */
/* ------------------------------------------------------------------ */

#define QCOW2_EXT_END          0x00000000u
#define QCOW2_EXT_BACKING_FMT  0xe2792acau
#define QCOW2_EXT_FEATURE_NAME 0x6803f857u
#define QCOW2_EXT_BITMAPS      0x23852875u
#define QCOW2_EXT_CRYPTO       0x0537be77u
#define QCOW2_EXT_DATA_FILE    0x44415441u

typedef struct __attribute__((packed)) qcow2_ext_header {
    uint32_t type;
    uint32_t len;   /* data bytes, padded to 8 on disk */
} qcow2_ext_header;
_Static_assert(sizeof(qcow2_ext_header) == 8, "ext header size");

/* Feature name table entry. */
#define QCOW2_FEAT_TYPE_INCOMPAT 0
#define QCOW2_FEAT_TYPE_COMPAT   1
#define QCOW2_FEAT_TYPE_AUTOCLEAR 2
typedef struct __attribute__((packed)) qcow2_feature_name {
    uint8_t type;
    uint8_t bit;
    char name[46];  /* zero padded, not necessarily terminated */
} qcow2_feature_name;
_Static_assert(sizeof(qcow2_feature_name) == 48, "feature name size");

/* Bitmaps extension ("Bitmaps extension"): validated (bitmap.c), kept
 * for header rewrites, not otherwise interpreted. QEMU's limits. */
#define QCOW2_MAX_BITMAPS 65535
#define QCOW2_MAX_BITMAP_DIRECTORY_SIZE (1024u * QCOW2_MAX_BITMAPS)
typedef struct __attribute__((packed)) qcow2_bitmaps_ext {
    uint32_t nb_bitmaps;
    uint32_t reserved;
    uint64_t bitmap_directory_size;
    uint64_t bitmap_directory_offset;
} qcow2_bitmaps_ext;
_Static_assert(sizeof(qcow2_bitmaps_ext) == 24, "bitmaps ext size");

/* Full disk encryption header pointer (crypt.c). */
typedef struct __attribute__((packed)) qcow2_crypto_ext {
    uint64_t offset;
    uint64_t length;
} qcow2_crypto_ext;
_Static_assert(sizeof(qcow2_crypto_ext) == 16, "crypto ext size");

/* An extension we do not interpret, kept verbatim for header rewrites. */
typedef struct qcow2_unknown_ext {
    uint32_t type;
    uint32_t len;
    uint8_t *data;
    struct qcow2_unknown_ext *next;
} qcow2_unknown_ext;

/* ------------------------------------------------------------------ */
/* Snapshot table entry (qcow2.txt "Snapshots")                       */
/* ------------------------------------------------------------------ */

typedef struct __attribute__((packed)) qcow2_snapshot_header {
    uint64_t l1_table_offset;
    uint32_t l1_size;
    uint16_t id_str_size;
    uint16_t name_size;
    uint32_t date_sec;
    uint32_t date_nsec;
    uint64_t vm_clock_nsec;
    uint32_t vm_state_size;
    uint32_t extra_data_size;
} qcow2_snapshot_header;
_Static_assert(sizeof(qcow2_snapshot_header) == 40, "snapshot header size");

typedef struct __attribute__((packed)) qcow2_snapshot_extra {
    uint64_t vm_state_size_large;
    uint64_t disk_size;
    uint64_t icount;
} qcow2_snapshot_extra;
_Static_assert(sizeof(qcow2_snapshot_extra) == 24, "snapshot extra size");

/* ------------------------------------------------------------------ */
/* L1/L2/refcount entries ("Cluster mapping", "Host cluster mgmt")    */
/* ------------------------------------------------------------------ */

/* L1 entry: bits 9..55 offset of the L2 table; bit 63 COPIED. */
#define QCOW2_L1E_OFFSET_MASK 0x00fffffffffffe00ull
#define QCOW2_L1E_RESERVED    0x7f000000000001ffull

/* L2 entry flags. */
#define QCOW2_OFLAG_COPIED     (1ull << 63) /* refcount is exactly one */
#define QCOW2_OFLAG_COMPRESSED (1ull << 62) /* compressed descriptor */
#define QCOW2_OFLAG_ZERO       (1ull << 0)  /* reads as zeros (v3, no extl2) */
/* Standard cluster descriptor: bits 9..55 host offset. */
#define QCOW2_L2E_OFFSET_MASK  0x00fffffffffffe00ull
#define QCOW2_L2E_STD_RESERVED 0x3f000000000001feull

/* Refcount table entry: bits 9..63 offset of the block (bits 0..8 0). */
#define QCOW2_REFT_OFFSET_MASK 0xfffffffffffffe00ull
#define QCOW2_REFT_RESERVED    0x1ffull

/* Extended L2: 32 subclusters per cluster; bitmap low half = allocated,
 * high half = reads as zeros ("Extended L2 Entries"). */
#define QCOW2_EXTL2_SUBCLUSTERS 32
#define QCOW2_EXTL2_MIN_CLUSTER_BITS 14
#define QCOW2_L2B_ALLOC(sc)  (1ull << (sc))
#define QCOW2_L2B_ZERO(sc)   (1ull << (32 + (sc)))
#define QCOW2_L2B_ALLOC_MASK 0x00000000ffffffffull
#define QCOW2_L2B_ZERO_MASK  0xffffffff00000000ull

/* What an L2 entry (and, with extended L2, a subcluster) means. */
typedef enum qcow2_subcluster_type {
    QCOW2_SC_COMPRESSED,       /* compressed cluster (whole cluster) */
    QCOW2_SC_NORMAL,           /* data at a host offset */
    QCOW2_SC_ZERO_PLAIN,       /* reads zeros, no host cluster */
    QCOW2_SC_ZERO_ALLOC,       /* reads zeros, host cluster preallocated */
    QCOW2_SC_UNALLOCATED_PLAIN,/* backing/zeros, no host cluster */
    QCOW2_SC_UNALLOCATED_ALLOC,/* backing/zeros, host cluster allocated
                                  (extended L2 only) */
    QCOW2_SC_INVALID,          /* contradictory bits: corruption */
} qcow2_subcluster_type;

/* Why clusters are freed: selects whether the freed range is passed down
 * to the file as a discard (options pass-discard-*). */
typedef enum qcow2_discard_type {
    QCOW2_DISCARD_NEVER = 0,
    QCOW2_DISCARD_ALWAYS,
    QCOW2_DISCARD_REQUEST,   /* guest discard / write_zeroes unmap */
    QCOW2_DISCARD_SNAPSHOT,  /* snapshot deletion */
    QCOW2_DISCARD_OTHER,     /* everything else (COW freeing, ...) */
    QCOW2_DISCARD_MAX
} qcow2_discard_type;

/* ------------------------------------------------------------------ */
/* Metadata cache (cache.c)                                           */
/* ------------------------------------------------------------------ */

typedef struct qcow2_cache_entry {
    uint64_t offset;    /* host offset of the table, 0 = slot empty */
    uint64_t lru;       /* last use tick (higher = more recent) */
    int ref;            /* users holding the table (never evicted) */
    bool dirty;
    int hash_next;      /* next slot in the same hash bucket, -1 = none */
    int lru_prev;       /* neighbours in the use order (-1 = none) */
    int lru_next;
} qcow2_cache_entry;

typedef struct qcow2_cache {
    const char *name;           /* "L2" or "refcount" (messages) */
    qcow2_cache_entry *entries;
    uint8_t *tables;            /* size * table_size bytes, aligned */
    int size;                   /* number of slots */
    size_t table_size;          /* bytes per slot (cluster size) */
    uint64_t lru_counter;
    /* Before writing any dirty table, flush this cache (and the file):
     * e.g. L2 depends on refcount when new clusters were allocated. */
    struct qcow2_cache *depends;
    /* Slots by host offset: bucket heads (-1 = empty), a power of two
     * at least the number of slots, chained through hash_next. */
    int *buckets;
    unsigned bucket_mask;
    /* Slots in order of last use, most recent first; empty slots are
     * kept at the tail, so eviction takes the first unpinned slot from
     * the tail. */
    int lru_head, lru_tail;
    /* Before writing any dirty table, flush the file (data written
     * before this metadata must be stable first). */
    bool depends_on_flush;
    /* Lookups that found the table in a slot, and tables read from the
     * file into one (query-blockstats' x-vdisk cache members). */
    uint64_t hits;
    uint64_t misses;
} qcow2_cache;

/* ------------------------------------------------------------------ */
/* Driver state                                                       */
/* ------------------------------------------------------------------ */

/* A guest cluster range being allocated (data written, L2 not yet
 * updated). Writers that overlap it wait on qcow2_state.alloc_cond. */
typedef struct qcow2_inflight {
    uint64_t first_cluster;    /* guest cluster index */
    uint64_t nb_clusters;
    struct qcow2_inflight *next;
} qcow2_inflight;

/* A freed host range waiting to be discarded in the file. */
typedef struct qcow2_discard_range {
    uint64_t offset;
    uint64_t bytes;
    struct qcow2_discard_range *next;
} qcow2_discard_range;

typedef struct qcow2_state {
    vd_node *node;
    vd_child *file;             /* node->file: metadata (and data) */
    vd_child *data_file;        /* == file, or the external data file */
    const char *filename;       /* node filename, for messages */

    pthread_mutex_t lock;
    pthread_cond_t alloc_cond;  /* in-flight allocation finished */
    qcow2_inflight *inflight;

    /* Geometry */
    int version;                /* 2 or 3 */
    int cluster_bits;
    uint64_t cluster_size;
    int l2_bits;                /* log2(l2_size) */
    uint64_t l2_size;           /* entries per L2 table */
    int l2_entry_shift;         /* 3, or 4 with extended L2 */
    bool extended_l2;
    int subcluster_bits;
    uint64_t subcluster_size;
    uint64_t subclusters_per_cluster; /* 1 or 32 */
    uint64_t size;              /* virtual size */

    /* Compressed descriptor geometry ("Compressed Clusters Descriptor") */
    int csize_shift;            /* 62 - (cluster_bits - 8) */
    uint64_t csize_mask;        /* (1 << (cluster_bits - 8)) - 1 */
    uint64_t cluster_offset_mask; /* (1 << csize_shift) - 1 */
    int compression_type;       /* QCOW2_COMPRESSION_* */

    /* L1 table (host endian copy of the active table) */
    uint64_t *l1_table;
    uint32_t l1_size;
    uint64_t l1_table_offset;

    /* Refcounts */
    int refcount_order;
    int refcount_bits;
    uint64_t refcount_max;      /* (1 << refcount_bits) - 1 */
    int refcount_block_bits;    /* log2 entries per refcount block */
    uint64_t refcount_block_size; /* entries per block */
    uint64_t *refcount_table;   /* host endian */
    uint64_t refcount_table_offset;
    uint32_t refcount_table_size; /* entries */
    /* Entries of refcount_table set in memory for new refcount blocks
     * but not yet on disk: written, after a flush that makes the blocks
     * stable, whenever the refcount cache is written (see
     * qcow2_reftable_write_pending()). */
    uint32_t reftable_pending[QCOW2_REFTABLE_PENDING_MAX];
    unsigned n_reftable_pending;
    uint64_t free_cluster_index;  /* search start for free clusters */
    uint64_t free_byte_offset;    /* compressed: next free byte, or 0 */
    uint64_t alloc_end;         /* cluster index past every cluster given
                                   a refcount in this session */
    /* The image file grown ahead of allocation (cluster.c,
     * qcow2_grow_ahead()): the length it was given (0: never), and the
     * offset below which it held anything when it was first grown. */
    uint64_t grown_to, grown_from;
    uint64_t fresh_clusters;    /* allocated past the file's end */

    qcow2_cache *l2_cache;
    qcow2_cache *refcount_cache;

    /* Features */
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    bool lazy_refcounts;        /* option lazy-refcounts / header bit */
    bool dirty_marked;          /* we set the dirty bit in this session */
    bool corrupt;               /* image marked corrupt in this session */
    int overlap_check;          /* QCOW2_OL_* checked before metadata
                                   writes (option overlap-check) */
    /* Raised wherever metadata is allocated, freed or moved (L1, L2,
     * refcount table and blocks; overlap_snap_gen: snapshot table and
     * snapshot L1 tables); overlap.c rebuilds its sorted range sets when
     * they move. Lock held. */
    uint64_t overlap_gen;
    uint64_t overlap_snap_gen;
    struct qcow2_overlap_cache *overlap_cache; /* overlap.c, lazily */
    uint64_t cache_clean_interval; /* seconds; 0 = never (overlap.c) */
    uint64_t cache_clean_last;  /* monotonic seconds of the last clean */
    uint64_t cache_clean_lru[2]; /* L2 / refcount cache lru_counter at
                                    the last clean */
    bool discard_passthrough[QCOW2_DISCARD_MAX];
    qcow2_discard_range *discards;
    bool data_file_raw;

    /* Header bits kept for rewriting */
    uint32_t header_length;     /* 72 for v2 */
    uint8_t *header_extra;      /* bytes 112..header_length (v3), kept */
    uint32_t header_extra_len;
    uint32_t crypt_method;
    /* Encryption (crypt.c): the CRYPTO extension as read, and the open
     * ciphers, or NULL for an unencrypted image. */
    bool has_crypto_ext;
    uint64_t crypto_ext_offset, crypto_ext_length;
    struct qcow2_crypt *crypt;
    char *backing_file;         /* as stored, or NULL */
    char *backing_format;       /* extension, or NULL */
    char *data_file_name;       /* extension, or NULL */
    qcow2_feature_name *feature_table; /* as read, or NULL */
    uint32_t nb_features;
    bool has_bitmaps_ext;       /* present, valid, autoclear bit set */
    bool stale_bitmaps_ext;     /* present without the autoclear bit:
                                   ignored, dropped on a writable open */
    char *inconsistent_bitmap;  /* first bitmap marked in use: QEMU
                                   refuses to resize (bitmap.c) */
    bool bitmaps_kept_in_v2;    /* a downgrade to v2 dropped the autoclear
                                   bit of a valid bitmaps extension: the
                                   close's store still knows the old
                                   directory and frees it, as QEMU (whose
                                   nb_bitmaps outlives the downgrade) */
    bool bitmaps_autoclear_deferred; /* a writable open took the bitmaps
                                   autoclear bit away (cleared before the
                                   first write) until bitmaps_load marks
                                   the bitmaps in use and gives it back */
    qcow2_bitmaps_ext bitmaps_ext;  /* host endian */
    qcow2_unknown_ext *unknown_exts;

    /* Internal snapshots: header fields (the snapshot code owns more). */
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    uint64_t snapshots_size;    /* bytes of the snapshot table */
    struct qcow2_snapshot *snapshots; /* nb_snapshots entries (snapshot.c) */
    bool snapshots_unusable;    /* opened for check with a bad table */
    /* Detected on the first block status (QEMU's heuristic). */
    int metadata_preallocation;   /* -1 unknown, 0 no, 1 yes */

    /* validate.c: the structures every metadata change relies on were
     * checked in this session (validate_ret 0), or found damaged
     * (validate_ret < 0, the message in validate_err: every later change
     * is refused with it). Lock held. */
    bool validated;
    int validate_ret;
    vd_error validate_err;
    /* qcow2_check() is repairing: its writes fix what validation would
     * refuse, so they are not gated. Lock held. */
    bool repairing;
    /* Open cleared autoclear bits (or dropped a stale bitmaps extension)
     * in the state; the header is rewritten before the first write of
     * the session, so that an open followed by a refusal leaves the file
     * as it was. Lock held. */
    bool header_update_pending;
} qcow2_state;

/* ------------------------------------------------------------------ */
/* Small helpers                                                      */
/* ------------------------------------------------------------------ */

static inline uint64_t qcow2_offset_into_cluster(const qcow2_state *s,
                                                 uint64_t off)
{
    return off & (s->cluster_size - 1);
}

static inline uint64_t qcow2_start_of_cluster(const qcow2_state *s,
                                              uint64_t off)
{
    return off & ~(s->cluster_size - 1);
}

static inline uint64_t qcow2_size_to_clusters(const qcow2_state *s,
                                              uint64_t size)
{
    return (size + s->cluster_size - 1) >> s->cluster_bits;
}

static inline uint64_t qcow2_offset_to_l1_index(const qcow2_state *s,
                                                uint64_t off)
{
    return off >> (s->l2_bits + s->cluster_bits);
}

static inline uint64_t qcow2_offset_to_l2_index(const qcow2_state *s,
                                                uint64_t off)
{
    return (off >> s->cluster_bits) & (s->l2_size - 1);
}

static inline int qcow2_offset_to_sc_index(const qcow2_state *s,
                                           uint64_t off)
{
    return (int)((off >> s->subcluster_bits) &
                 (s->subclusters_per_cluster - 1));
}

/* L2 table accessors: @table is a cached L2 table (big endian). */
static inline uint64_t qcow2_get_l2_entry(const qcow2_state *s,
                                          const void *table, uint64_t idx)
{
    const uint64_t *t = table;
    return be64toh(t[idx << (s->l2_entry_shift - 3)]);
}

static inline uint64_t qcow2_get_l2_bitmap(const qcow2_state *s,
                                           const void *table, uint64_t idx)
{
    const uint64_t *t = table;
    return s->extended_l2 ? be64toh(t[idx * 2 + 1]) : 0;
}

static inline void qcow2_set_l2_entry(const qcow2_state *s, void *table,
                                      uint64_t idx, uint64_t entry)
{
    uint64_t *t = table;
    t[idx << (s->l2_entry_shift - 3)] = htobe64(entry);
}

static inline void qcow2_set_l2_bitmap(const qcow2_state *s, void *table,
                                       uint64_t idx, uint64_t bitmap)
{
    uint64_t *t = table;
    if (s->extended_l2) {
        t[idx * 2 + 1] = htobe64(bitmap);
    }
}

/* Compressed descriptor: host byte offset and the number of bytes the
 * data may occupy (whole 512-byte sectors from the containing sector). */
static inline void qcow2_parse_compressed(const qcow2_state *s,
                                          uint64_t l2_entry,
                                          uint64_t *host_off,
                                          uint64_t *nb_bytes)
{
    uint64_t off = l2_entry & s->cluster_offset_mask;
    uint64_t nb_sectors = ((l2_entry >> s->csize_shift) & s->csize_mask) + 1;
    *host_off = off;
    *nb_bytes = nb_sectors * 512 - (off & 511);
}

/* Classifies subcluster @sc_index of an L2 entry/bitmap pair (for images
 * without extended L2 the bitmap is ignored and sc_index must be 0). */
qcow2_subcluster_type qcow2_get_subcluster_type(const qcow2_state *s,
                                                uint64_t l2_entry,
                                                uint64_t l2_bitmap,
                                                int sc_index);

/* Reads/writes one refcount from/to a refcount block (big endian, width
 * refcount_bits). */
uint64_t qcow2_refblock_get(const qcow2_state *s, const void *block,
                            uint64_t index);
void qcow2_refblock_set(const qcow2_state *s, void *block, uint64_t index,
                        uint64_t value);

/* ------------------------------------------------------------------ */
/* qcow2.c                                                            */
/* ------------------------------------------------------------------ */

extern const vd_driver vd_driver_qcow2;
/* The amend options, in QEMU's order (amend.c walks them). */
extern const vd_create_option qcow2_amend_opts[];

/* Rewrites the header cluster from the state (header fields, extensions,
 * feature table, backing file name). Lock held or node drained. */
int qcow2_update_header(qcow2_state *s, vd_error *err);
/* Writes the header rewrite open deferred (header_update_pending), if
 * any: before the first write of the session. Lock held. */
int qcow2_write_deferred_header(qcow2_state *s, vd_error *err);

/* Sets/clears incompatible bits in the on-disk header with one write of
 * the 8-byte field (v3 only; no-op on v2), flushing the file before and
 * after as QEMU does. */
int qcow2_mark_dirty(qcow2_state *s, vd_error *err);
int qcow2_mark_clean(qcow2_state *s, vd_error *err);
int qcow2_mark_corrupt(qcow2_state *s, vd_error *err);

/* Records corruption: marks the image corrupt (unless opened for check
 * or read-only), sets @err to "FILE: MESSAGE; image marked corrupt" and
 * returns -EIO. */
int qcow2_signal_corruption(qcow2_state *s, vd_error *err, const char *fmt,
                            ...) __attribute__((format(printf, 3, 4),
                                                nonnull(3)));

/* Whether refcounts on disk must follow every change (QEMU's
 * qcow2_need_accurate_refcounts()): not while the dirty bit is set, when
 * lazy refcounts let the next open repair them. Lock held. */
static inline bool qcow2_need_accurate_refcounts(const qcow2_state *s)
{
    return !(s->incompatible_features & QCOW2_INCOMPAT_DIRTY);
}

/* Writes all dirty metadata (L2 cache, then refcount cache in dependency
 * order) without flushing the file; while the dirty bit is set only the
 * L2 cache (refcount blocks wait for eviction, close or mark_clean), as
 * QEMU's qcow2_write_caches(). Lock held. */
int qcow2_write_caches(qcow2_state *s, vd_error *err);
/* qcow2_write_caches() + flush of the file child. Lock held. */
int qcow2_flush_caches(qcow2_state *s, vd_error *err);

/* ------------------------------------------------------------------ */
/* cache.c                                                            */
/* ------------------------------------------------------------------ */

/* Creates a cache of @num_tables tables of @table_size bytes. */
qcow2_cache *qcow2_cache_create(qcow2_state *s, const char *name,
                                int num_tables, size_t table_size);
/* Frees the cache (dirty tables are lost: flush first). NULL ok. */
void qcow2_cache_destroy(qcow2_cache *c);

/* Returns in *table the table at host @offset, reading it from the file
 * when not cached. The caller holds a reference until qcow2_cache_put().
 * Lock held. Errors: -EIO (read), -ENOMEM (every slot in use). */
int qcow2_cache_get(qcow2_state *s, qcow2_cache *c, uint64_t offset,
                    void **table, vd_error *err);
/* Like qcow2_cache_get() but does not read: for newly allocated tables
 * (contents undefined: the caller fills it). */
int qcow2_cache_get_empty(qcow2_state *s, qcow2_cache *c, uint64_t offset,
                          void **table, vd_error *err);
/* Drops the reference taken by get and sets *table to NULL. */
void qcow2_cache_put(qcow2_cache *c, void **table);
/* Marks the table (pointer returned by get) dirty. */
void qcow2_cache_mark_dirty(qcow2_cache *c, void *table);

/* Writes every dirty table (honouring dependencies), no file flush. */
int qcow2_cache_write(qcow2_state *s, qcow2_cache *c, vd_error *err);
/* qcow2_cache_write() and a flush of the file child. */
int qcow2_cache_flush(qcow2_state *s, qcow2_cache *c, vd_error *err);
/* Makes @c depend on @dep: @dep is flushed before any table of @c is
 * written. Resolves cycles by flushing first. */
int qcow2_cache_set_dependency(qcow2_state *s, qcow2_cache *c,
                               qcow2_cache *dep, vd_error *err);
/* The file must be flushed before any table of @c is written. */
void qcow2_cache_depends_on_flush(qcow2_cache *c);
/* Forgets the table at @offset if cached (its cluster was freed), dirty
 * or not. */
void qcow2_cache_discard(qcow2_cache *c, uint64_t offset);
/* Drops every (clean) table; returns -EBUSY if one is dirty or in use. */
int qcow2_cache_empty(qcow2_cache *c);
/* cache-clean-interval: drops the clean, unpinned tables nobody used
 * since the tick in *@last_lru and gives their memory back (whole pages
 * only); sets *@last_lru to the current tick. */
void qcow2_cache_clean_unused(qcow2_cache *c, uint64_t *last_lru);

/* ------------------------------------------------------------------ */
/* refcount.c                                                         */
/* ------------------------------------------------------------------ */

/* Loads the refcount table at open (validated). */
int qcow2_refcount_init(qcow2_state *s, vd_error *err);
void qcow2_refcount_close(qcow2_state *s);

/* Refcount of host cluster @cluster_index (0 when beyond the table or
 * the block is absent). Lock held. */
int qcow2_get_refcount(qcow2_state *s, uint64_t cluster_index,
                       uint64_t *refcount, vd_error *err);

/* Adds (or with @decrease subtracts) @addend to the refcount of every
 * cluster touching [offset, offset+length). Allocates refcount blocks
 * and grows the refcount table as needed. Clusters reaching 0 are
 * queued for discard per @type. Fails with -EINVAL on overflow or
 * underflow (no partial update is left in the cache). Lock held. */
int qcow2_update_refcount(qcow2_state *s, uint64_t offset, uint64_t length,
                          uint64_t addend, bool decrease,
                          qcow2_discard_type type, vd_error *err);

/* A refcount block kept pinned in the refcount cache across consecutive
 * questions and changes: the clusters of one L2 table mostly share a
 * refcount block, so a walk over them looks the block up once instead
 * of once per cluster (snapshot create, apply and delete, the check of a
 * tree before them). Start zeroed; release it before anything may
 * flush or empty the refcount cache and before calling
 * qcow2_update_refcount() or an allocator (they may create refcount
 * blocks or grow the table). Lock held throughout. */
typedef struct qcow2_refblock_hold {
    void *block;            /* the cached block; NULL: nothing held */
    uint64_t rt_index;      /* its refcount table index */
} qcow2_refblock_hold;

/* Drops what @h holds (nothing when it holds nothing). */
void qcow2_refblock_release(qcow2_state *s, qcow2_refblock_hold *h);

/* qcow2_get_refcount() through @h. */
int qcow2_held_get_refcount(qcow2_state *s, qcow2_refblock_hold *h,
                            uint64_t cluster_index, uint64_t *refcount,
                            vd_error *err);

/* qcow2_update_refcount() of the one host cluster @cluster_index by 1
 * (down with @decrease) through @h, with the same checks, events and
 * effects, and its new refcount in @refcount. For clusters already
 * referenced and validated (a snapshot tree after
 * qcow2_validate_l1_tree()): a cluster without a refcount block fails
 * with -EIO instead of creating one. A decrease needs the dependency
 * qcow2_update_refcount() sets (the refcount cache after the L2 cache)
 * set by the caller before its first one. */
int qcow2_held_update_refcount(qcow2_state *s, qcow2_refblock_hold *h,
                               uint64_t cluster_index, bool decrease,
                               qcow2_discard_type type, uint64_t *refcount,
                               vd_error *err);

/* Allocates @size bytes (rounded up to clusters) of contiguous host
 * clusters with refcount 1 and returns the offset (>= 0) or -errno.
 * Reuses free clusters before growing the file. Lock held. */
int64_t qcow2_alloc_clusters(qcow2_state *s, uint64_t size, vd_error *err);
/* Sets refcount 1 on [offset, offset+nb_clusters) which must be free;
 * returns the number of clusters actually allocated (stops at the first
 * used one) or -errno. Used for preallocation at a fixed place. */
int64_t qcow2_alloc_clusters_at(qcow2_state *s, uint64_t offset,
                                uint64_t nb_clusters, vd_error *err);
/* Allocates @size bytes (<= cluster size) for compressed data, packed
 * after the previous compressed allocation as QEMU does (may straddle
 * into the next cluster, which is then also referenced). Returns the
 * byte offset or -errno. Lock held. */
int64_t qcow2_alloc_bytes(qcow2_state *s, uint64_t size, vd_error *err);

/* Decrements the refcount of the clusters of [offset, offset+size). */
int qcow2_free_clusters(qcow2_state *s, uint64_t offset, uint64_t size,
                        qcow2_discard_type type, vd_error *err);
/* Frees whatever host clusters an L2 entry references (standard or
 * compressed; nothing for unallocated/zero-plain). External data file
 * clusters are not refcounted: with a data file, passes the discard
 * down instead when @type says so. */
int qcow2_free_any_cluster(qcow2_state *s, uint64_t l2_entry,
                           qcow2_discard_type type, vd_error *err);

/* Issues the queued discards to the file (after the refcount updates
 * that freed them are on disk) and empties the queue. Lock held. */
void qcow2_process_discards(qcow2_state *s);

/* After a shrink (caches flushed): drops from the refcount table every
 * refcount block that counts nothing but, possibly, itself, writes the
 * table (synchronously) and then gives the blocks' clusters back, as
 * QEMU's qcow2_shrink_reftable(). Lock held. */
int qcow2_shrink_reftable(qcow2_state *s, vd_error *err);

/*
 * Writes the refcount table entries of new refcount blocks that are so
 * far only in memory, after a flush of the file so that the blocks they
 * point at are stable first. Called by qcow2_cache_write() after it has
 * written the refcount cache, so whatever orders a reference after the
 * refcount cache (the L2 cache's dependency, an explicit cache flush)
 * also orders it after the entry. Lock held. Returns 0 or -errno (the
 * entries stay pending).
 */
int qcow2_reftable_write_pending(qcow2_state *s, vd_error *err);

/* Forgets pending entries: the refcount table was replaced as a whole. */
void qcow2_reftable_forget_pending(qcow2_state *s);

/* ------------------------------------------------------------------ */
/* cluster.c                                                          */
/* ------------------------------------------------------------------ */

/* Maps guest @offset: *type, *host (host offset of @offset for NORMAL /
 * *_ALLOC, the raw L2 entry for COMPRESSED) and *bytes, on entry the
 * wanted length, on exit the length (>= 1 subcluster piece) with the
 * same type and contiguous host mapping. Lock held. */
int qcow2_get_host_offset(qcow2_state *s, uint64_t offset, uint64_t *bytes,
                          uint64_t *host, qcow2_subcluster_type *type,
                          vd_error *err);

/* Gets the L2 table holding guest @offset in *table (cache reference,
 * put with qcow2_cache_put(s->l2_cache, ...)) and its index in *l2_index.
 * With @alloc, allocates the L2 table (or copies it when its refcount is
 * not 1) and updates L1; without, *table is NULL when there is none.
 * Lock held. */
int qcow2_get_l2_table(qcow2_state *s, uint64_t offset, bool alloc,
                       void **table, uint64_t *l2_index, vd_error *err);

/* Writes the 512-byte sector of the L1 table holding entry @l1_index
 * (QEMU's granularity) to disk. Lock held. */
int qcow2_write_l1_entry(qcow2_state *s, uint64_t l1_index, vd_error *err);
/* Grows the L1 table to hold at least @min_size entries (moves it). */
int qcow2_grow_l1_table(qcow2_state *s, uint64_t min_size, bool exact,
                        vd_error *err);

/* The guest-visible operations (entry points from the vtable). */
int qcow2_co_preadv(qcow2_state *s, uint64_t off, uint64_t bytes,
                    vd_iov *qiov, size_t qiov_off, vd_error *err);
void qcow2_trim_grown(qcow2_state *s);
int qcow2_co_pwritev(qcow2_state *s, uint64_t off, uint64_t bytes,
                     vd_iov *qiov, unsigned flags, vd_error *err);
/* Copy offloading (QEMU's qcow2_co_copy_range_from/_to): the source
 * side passes each piece down to where its data lives; the destination
 * side allocates and maps as a write does and copies into the data
 * file. -ENOTSUP where a piece cannot be offloaded. */
int qcow2_co_copy_range_from(qcow2_state *s, uint64_t soff, vd_node *dst,
                             uint64_t doff, uint64_t bytes, vd_error *err);
int qcow2_co_copy_range_to(qcow2_state *s, vd_node *src, uint64_t soff,
                           uint64_t doff, uint64_t bytes, vd_error *err);
int qcow2_co_pwrite_zeroes(qcow2_state *s, uint64_t off, uint64_t bytes,
                           unsigned flags, vd_error *err);
int qcow2_co_pdiscard(qcow2_state *s, uint64_t off, uint64_t bytes,
                      vd_error *err);
/* Writes whole clusters compressed at cluster-aligned guest @off (@bytes
 * a multiple of the cluster size, or ending at the end of the image). The
 * clusters are compressed on up to QCOW2_COMPRESS_THREADS threads (the
 * caller's and short-lived helpers, no lock held), at most two per thread
 * ahead of the one being stored, and stored in guest order by the caller
 * as they are ready; an incompressible cluster is stored as a normal one. */
#define QCOW2_COMPRESS_THREADS 8
int qcow2_co_pwritev_compressed(qcow2_state *s, uint64_t off,
                                uint64_t bytes, vd_iov *qiov,
                                vd_error *err);
/* Whether the image looks preallocated with metadata (takes the lock). */
bool qcow2_detect_metadata_preallocation(qcow2_state *s);
int qcow2_co_block_status(qcow2_state *s, bool want_zero, uint64_t off,
                          uint64_t bytes, uint64_t *pnum, uint64_t *map,
                          vd_node **file, vd_error *err);
/* Preallocates metadata (and for falloc/full the data) of guest range
 * [off, off+bytes). Node drained. */
int qcow2_preallocate(qcow2_state *s, uint64_t off, uint64_t bytes,
                      vd_prealloc mode, vd_error *err);

/* ------------------------------------------------------------------ */
/* snapshot.c                                                         */
/* ------------------------------------------------------------------ */

/* One entry of the snapshot table, host endian (qcow2.txt "Snapshots"). */
typedef struct qcow2_snapshot {
    uint64_t l1_table_offset;
    uint32_t l1_size;
    char *id_str;
    char *name;
    uint64_t disk_size;
    uint64_t vm_state_size;
    uint32_t date_sec;
    uint32_t date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t icount;            /* UINT64_MAX when not recorded */
    uint32_t extra_data_size;   /* as stored (>= 24 once rewritten) */
    uint8_t *unknown_extra;     /* extra data past the known 24 bytes */
} qcow2_snapshot;

/* Parses and validates the snapshot table named by nb_snapshots and
 * snapshots_offset (file of @file_len bytes). At open. */
int qcow2_read_snapshots(qcow2_state *s, uint64_t file_len, vd_error *err);
/* Guest offset of the VM state: the first L1 index past the disk, in
 * bytes (QEMU's qcow2_vm_state_offset()). */
uint64_t qcow2_vm_state_offset(const qcow2_state *s);
/* Writes the loaded table anew (every entry with the 24 bytes of v3
 * extra data), points the header at it and frees the old one, as QEMU's
 * qcow2_write_snapshots(). Lock held. */
int qcow2_rewrite_snapshot_table(qcow2_state *s, vd_error *err);
/* Reads the L1 table of @size entries at @offset into a new host-endian
 * array of max(@size, @alloc) entries (the rest zeroed). */
int qcow2_read_l1_table(qcow2_state *s, uint64_t offset, uint32_t size,
                        uint32_t alloc, uint64_t **out, vd_error *err);
/* The check's repair of the snapshot table (QEMU's
 * qcow2_check_fix_snapshot_table()): reads the @nb entries at @offset as
 * QEMU's check does (bytes past the end of the file read as zeros) and
 * writes them as a new table in which every entry is complete (the v3
 * extra data); the header then points at it and the old table is freed
 * (as far as its refcounts allow). Lock held. */
int qcow2_snapshot_table_repair(qcow2_state *s, uint64_t offset, uint32_t nb,
                                vd_error *err);
void qcow2_free_snapshots(qcow2_state *s);

/* The vtable callbacks (node drained). */
int qcow2_snapshot_create(vd_node *node, const vd_snapshot_info *sn,
                          vd_error *err);
int qcow2_snapshot_goto(vd_node *node, const char *id, vd_error *err);
int qcow2_snapshot_plan(vd_node *node, const char *id, const char *name,
                        bool apply, vd_snapshot_plan *out, vd_error *err);
int qcow2_snapshot_delete(vd_node *node, const char *id, const char *name,
                          vd_error *err);
int qcow2_snapshot_list(vd_node *node, vd_snapshot_info **list,
                        size_t *count, vd_error *err);
int qcow2_snapshot_load_tmp(vd_node *node, const char *id, const char *name,
                            vd_error *err);
int qcow2_save_vmstate(vd_node *node, vd_iov *qiov, uint64_t pos,
                       vd_error *err);
int qcow2_load_vmstate(vd_node *node, vd_iov *qiov, uint64_t pos,
                       vd_error *err);

/* ------------------------------------------------------------------ */
/* measure.c, amend.c, overlap.c                                      */
/* ------------------------------------------------------------------ */

/* Bytes of refcount table and blocks that count @clusters clusters and
 * themselves; *nb_blocks (may be NULL) gets the number of blocks. */
uint64_t qcow2_refcount_metadata_size(uint64_t clusters, uint64_t cluster_size,
                                      int refcount_order, uint64_t *nb_blocks);
/* The vtable's measure callback (qemu-img measure). */
int qcow2_measure(vd_opts *opts, vd_node *src, vd_measure_result *out,
                  vd_error *err);
/* The vtable's amend callback (qemu-img amend). Node drained. */
int qcow2_amend(vd_node *node, vd_opts *opts, bool force, vd_error *err);
int qcow2_amend_plan(vd_node *node, vd_opts *opts, bool force,
                     vd_amend_change_fn fn, void *opaque, vd_error *err);

/* The vtable's compact callback (compact.c, vd_compact()). */
int qcow2_compact(vd_node *node, bool dry_run, vd_progress_fn progress,
                  void *opaque, vd_compact_result *res, vd_error *err);

/* Metadata structures for the overlap checks (QEMU's QCOW2_OL_*). */
#define QCOW2_OL_MAIN_HEADER      (1 << 0)
#define QCOW2_OL_ACTIVE_L1        (1 << 1)
#define QCOW2_OL_ACTIVE_L2        (1 << 2)
#define QCOW2_OL_REFCOUNT_TABLE   (1 << 3)
#define QCOW2_OL_REFCOUNT_BLOCK   (1 << 4)
#define QCOW2_OL_SNAPSHOT_TABLE   (1 << 5)
#define QCOW2_OL_INACTIVE_L1      (1 << 6)
#define QCOW2_OL_INACTIVE_L2      (1 << 7)
#define QCOW2_OL_BITMAP_DIRECTORY (1 << 8)
#define QCOW2_OL_CONSTANT (QCOW2_OL_MAIN_HEADER | QCOW2_OL_ACTIVE_L1 | \
                           QCOW2_OL_REFCOUNT_TABLE | QCOW2_OL_SNAPSHOT_TABLE | \
                           QCOW2_OL_BITMAP_DIRECTORY)
#define QCOW2_OL_CACHED   (QCOW2_OL_CONSTANT | QCOW2_OL_ACTIVE_L2 | \
                           QCOW2_OL_REFCOUNT_BLOCK | QCOW2_OL_INACTIVE_L1)
#define QCOW2_OL_ALL      (QCOW2_OL_CACHED | QCOW2_OL_INACTIVE_L2)

/* Parses overlap-check, overlap-check.template and overlap-check.<name>
 * into s->overlap_check (default cached). At open. */
int qcow2_parse_overlap_opts(qcow2_state *s, vd_opts *opts, vd_error *err);
/* Returns the QCOW2_OL_* bit of the first metadata structure (outside
 * @ign) that [offset, offset+size) overlaps, or 0. Lock held. */
int qcow2_check_metadata_overlap(qcow2_state *s, int ign, uint64_t offset,
                                 uint64_t size);
/* Call after changing where active metadata lives: an L1 entry, the L1
 * table, a refcount table entry or the refcount table. Lock held. */
static inline void qcow2_overlap_changed(qcow2_state *s)
{
    s->overlap_gen++;
}
/* Call after changing the snapshot list or a snapshot's L1 table (on
 * disk too); also counts as qcow2_overlap_changed(). Lock held. */
static inline void qcow2_overlap_snapshots_changed(qcow2_state *s)
{
    s->overlap_gen++;
    s->overlap_snap_gen++;
}
/* Like qcow2_check_metadata_overlap() for exactly the kinds in @chk,
 * whatever the overlap-check option says (validation before writes). */
int qcow2_metadata_overlap_kinds(qcow2_state *s, int chk, uint64_t offset,
                                 uint64_t size);
/* qcow2_metadata_overlap_kinds(), and where it finds nothing, also
 * *@clear_until: the end of the run of clusters from @offset's cluster
 * on that meets no structure of @chk (the next one's cluster start;
 * UINT64_MAX when none follows). A walk over data clusters that mostly
 * lie side by side then checks once per run, not once per cluster (the
 * runs hold while no metadata moves: within one read-only pass). */
int qcow2_metadata_overlap_window(qcow2_state *s, int chk, uint64_t offset,
                                  uint64_t size, uint64_t *clear_until);
/* The structure name of one QCOW2_OL_* bit, as QEMU's messages say it. */
const char *qcow2_overlap_name(int bit);
/* Frees the overlap range sets (at close). */
void qcow2_overlap_free(qcow2_state *s);
/* Before a write to the metadata file: on overlap marks the image
 * corrupt and fails with -EIO ("Preventing invalid write on metadata
 * (overlaps with ...)"). @data: the write is guest data (never checked
 * when the data lives in an external file). Lock held. */
int qcow2_pre_write_overlap_check(qcow2_state *s, int ign, uint64_t offset,
                                  uint64_t size, bool data, vd_error *err);
/* Frees the clean, unused tables of both caches when the
 * cache-clean-interval has passed since the last time. Lock held. */
void qcow2_cache_clean_maybe(qcow2_state *s);

/* ------------------------------------------------------------------ */
/* validate.c: what a metadata change relies on, checked before it    */
/* ------------------------------------------------------------------ */

/* Whether [offset, offset+bytes) lies inside a file of @flen bytes by
 * QEMU check's rule: it may end at most inside the cluster that follows
 * the last byte of the file (a cluster at the end may be partly
 * written). */
bool qcow2_range_in_file(const qcow2_state *s, uint64_t offset,
                         uint64_t bytes, uint64_t flen);

/* Validates, once per session and before the first write that changes
 * metadata, the structures every change relies on: the refcount table
 * and blocks, the header, L1, refcount and snapshot tables and the
 * active L2 tables lie inside the file, do not overlap each other and
 * have a nonzero refcount. A failure is remembered and refuses every
 * later change with the same message; nothing is written. Skipped while
 * qcow2_check() repairs. Lock held. */
int qcow2_validate_metadata(qcow2_state *s, vd_error *err);

/* The first write of a change: qcow2_validate_metadata(), then the
 * header rewrite open deferred. Callers validate whatever else their
 * change touches before calling it; the allocators and refcount updates
 * call it too, so no metadata change can skip it. Lock held. */
int qcow2_begin_change(qcow2_state *s, vd_error *err);

/* What the per-operation validations below check and how they fail. */
#define QCOW2_VALIDATE_SNAPSHOT 1u  /* the L1 table is a snapshot's */
#define QCOW2_VALIDATE_OVERFLOW 2u  /* one more reference must fit */
#define QCOW2_VALIDATE_SIGNAL   4u  /* an unaligned offset is a corruption
                                       event (QEMU signals one at this
                                       point), else a plain refusal */

/* Before an operation adds or drops a reference to the L2 table named by
 * L1 entry @l1e (index @l1_index): cluster-aligned, inside the file,
 * clear of every other kind of metadata, refcount at least 1. Lock
 * held. */
int qcow2_validate_l2_table_ref(qcow2_state *s, uint64_t l1e,
                                uint64_t l1_index, unsigned flags,
                                uint64_t flen, vd_error *err);

/* Before an operation adds or drops a reference to the host clusters of
 * L2 entry @e (index @l2_index of the table at @l2_off): a standard
 * cluster is cluster-aligned, a compressed one has no external data file
 * (a corruption event); both lie inside the file, clear of every kind of
 * metadata, with refcounts of at least 1. Entries without host clusters
 * pass. Lock held. */
int qcow2_validate_cluster_ref(qcow2_state *s, uint64_t e, uint64_t l2_off,
                               uint64_t l2_index, unsigned flags,
                               uint64_t flen, vd_error *err);

/* qcow2_validate_l2_table_ref() and qcow2_validate_cluster_ref() for
 * every L2 table and entry an L1 table of @l1_size entries (host
 * endian) reaches. Reads L2 tables through the cache, writes nothing.
 * Lock held. */
int qcow2_validate_l1_tree(qcow2_state *s, const uint64_t *l1,
                           uint32_t l1_size, unsigned flags, vd_error *err);

/* The same for the L1 and L2 entries covering guest [off, off+bytes) of
 * the active table: what discard, zeroing with unmap, shrinking and
 * emptying are about to free. Lock held. */
int qcow2_validate_guest_range(qcow2_state *s, uint64_t off, uint64_t bytes,
                               vd_error *err);

/* ------------------------------------------------------------------ */
/* bitmap.c: the bitmaps extension, validated as QEMU 7.2 loads it     */
/* ------------------------------------------------------------------ */

/* Validates the bitmap directory and the bitmap tables named by the
 * bitmaps extension exactly where and how QEMU 7.2 loads them at open
 * (bitmap_list_load(), load_bitmap()), with its messages. Called at
 * open when the extension is present and the autoclear bit is set. */
int qcow2_validate_bitmaps(qcow2_state *s, vd_error *err);

/* Whether the bitmap directory on disk is valid now: the extension with
 * the autoclear bit, or a writable open's deferral of the bit (taken
 * away in memory, not yet on disk: nothing was written yet). Once the
 * cleared bit is written the bitmaps are stale for this session too. */
static inline bool qcow2_bitmaps_valid(const qcow2_state *s)
{
    return s->has_bitmaps_ext &&
           ((s->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS) ||
            (s->bitmaps_autoclear_deferred && s->header_update_pending));
}

/* One bitmap of the directory (the fields check and open need). */
typedef struct qcow2_bitmap_info {
    uint64_t table_offset;
    uint32_t table_size;
    uint32_t flags;
    uint8_t granularity_bits;
    char *name;
} qcow2_bitmap_info;

/* Reads and validates the bitmap directory as QEMU's bitmap_list_load()
 * (the message in @err); *list gets s->bitmaps_ext.nb_bitmaps entries. */
int qcow2_bitmap_list_load(qcow2_state *s, qcow2_bitmap_info **list,
                           vd_error *err);
void qcow2_bitmap_list_free(qcow2_bitmap_info *list, uint32_t n);
/* Reads a bitmap table (@n entries at @offset) and validates every entry
 * as QEMU's bitmap_table_load() (-EINVAL on a bad entry). *table gets
 * host-endian entries; free() it. */
int qcow2_bitmap_table_load(qcow2_state *s, uint64_t offset, uint32_t n,
                            uint64_t **table);

/* The driver's persistent bitmap callbacks (struct vd_driver's
 * bitmaps_load, bitmaps_store, bitmap_can_store, bitmap_remove; their
 * contract is in src/core/block_int.h). */
int qcow2_bitmaps_load(vd_node *node, vd_bitmap_image **list, size_t *count,
                       vd_error *err);
int qcow2_bitmaps_store(vd_node *node, const vd_bitmap_image *list,
                        size_t count, vd_error *err);
int qcow2_bitmap_can_store(vd_node *node, const char *name,
                           uint64_t granularity, vd_error *err);
int qcow2_bitmap_remove(vd_node *node, const char *name, vd_error *err);

/* ------------------------------------------------------------------ */
/* check.c and compress.c (second engineer)                           */
/* ------------------------------------------------------------------ */

int qcow2_check(vd_node *node, vd_check_result *res, unsigned fix,
                vd_error *err);

/* du.c: the vtable's space_usage (vd_du(), `vdisk du`). */
int qcow2_space_usage(vd_node *node, vd_du_result *res, vd_error *err);

/* Reads the compressed descriptor's bytes from the file child and
 * inflates one cluster into @out (cluster_size bytes). */
int qcow2_decompress_cluster(qcow2_state *s, uint64_t l2_entry,
                             uint8_t *out, vd_error *err);

/* A thread's compression state, reused from one cluster to the next
 * (NULL where none: each cluster then sets one up and frees it). */
typedef struct qcow2_compressor qcow2_compressor;
qcow2_compressor *qcow2_compressor_new(void);
void qcow2_compressor_free(qcow2_compressor *cz);

/* Compresses one cluster (@in, cluster_size bytes) into @out with @cz
 * (may be NULL); -ENOSPC when the result would not be smaller than
 * @out_cap. */
int qcow2_compress_cluster(qcow2_state *s, qcow2_compressor *cz,
                           const uint8_t *in, uint8_t *out, size_t out_cap,
                           size_t *out_len);

/* ---- crypt.c: encrypted images ---- */

typedef struct qcow2_crypt qcow2_crypt;
struct vd_luks_create_opts;
/* Sets up s->crypt for crypt_method 1 or 2 (options encrypt.format and
 * encrypt.key-secret); refuses a writable open of the legacy AES. */
int qcow2_crypt_open(qcow2_state *s, vd_opts *opts, unsigned flags,
                     vd_error *err);
void qcow2_crypt_close(qcow2_state *s);
/* Reads @bytes of a data cluster at @host (guest offset @guest) into
 * @qiov at @qiov_off, decrypted. All three are multiples of 512. */
int qcow2_crypt_read(qcow2_state *s, uint64_t host, uint64_t guest,
                     uint64_t bytes, vd_iov *qiov, size_t qiov_off,
                     vd_error *err);
/* Writes @bytes of @qiov (from @qiov_off) encrypted for host offset
 * @host of the data file (LUKS: IVs by host sector). @host and @bytes
 * are multiples of 512. */
int qcow2_crypt_pwritev(qcow2_state *s, uint64_t host, uint64_t bytes,
                        vd_iov *qiov, size_t qiov_off, unsigned flags,
                        vd_error *err);
/* Gives the new image @s (no encryption yet) a LUKS header made with @o
 * in clusters of its own, the CRYPTO extension and crypt_method 2. */
int qcow2_crypt_create(qcow2_state *s, const struct vd_luks_create_opts *o,
                       vd_error *err);
/* qemu-img amend's encrypt.* key slot changes. Lock held. */
int qcow2_crypt_amend(qcow2_state *s, vd_opts *opts, bool force,
                      vd_error *err);
/* qcow2_crypt_amend() as a dry run (vd_luks_amend_plan()): the same
 * checks, the secrets tried, nothing written; the key slots active now
 * in *@active, those it would write a key into and erase in *@activate
 * and *@erase. Lock held. */
int qcow2_crypt_amend_plan(qcow2_state *s, vd_opts *opts, bool force,
                           unsigned *active, unsigned *activate,
                           unsigned *erase, vd_error *err);
/* Re-encrypts @bytes of @buf read at host @old_host for host @new_host
 * (LUKS IVs by host sector; compaction). -ENOTSUP without the key. */
int qcow2_crypt_rehost(qcow2_state *s, uint8_t *buf, uint64_t bytes,
                       uint64_t old_host, uint64_t new_host, vd_error *err);
/* The LUKS header moved to @off (compaction). */
void qcow2_crypt_header_moved(qcow2_state *s, uint64_t off);
/* The "encrypt" member of the format-specific information. */
char *qcow2_crypt_info_json(const qcow2_state *s);

#endif
