/*
 * The RBD incremental diff stream reader (include/vdisk/rbd-diff.h,
 * docs/snapshots.md "Change sets"): the format of Ceph's
 * doc/dev/rbd-diff.rst, v1 and v2, validated field by field.
 *
 * The stream is read with pread() from a bounded window of a file
 * descriptor, so a length field can never make the reader allocate or
 * seek past what is there: data bytes are not read at all, only their
 * position handed to the caller. Each check names the stream offset of
 * the record it refuses.
 *
 * Where rbd import-diff is lenient this reader refuses, because the
 * caller validates a whole stream before its first write and a stream
 * rbd would apply half of is better refused whole: a v1 tag it does not
 * know (rbd skips a single byte and reads on out of step), a v2 length
 * that disagrees with the record, a metadata record after the first
 * data record, a data record past the image's end (librbd would fail
 * that write after the ones before it landed), a repeated 'f', 't' or
 * 's'. v2 records of unknown tags are skipped by their length, as rbd
 * does and as the format intends. One quirk is kept: the v2 'p' record
 * holds one byte, and Ceph 16.2 (pacific) writes a length of 8 for it;
 * rbd reads one byte whatever the length, and so does this reader.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vdisk/rbd-diff.h"

#define BANNER_V1 "rbd diff v1\n"
#define BANNER_V2 "rbd diff v2\n"
#define BANNER_LEN (sizeof(BANNER_V1) - 1)

typedef struct reader {
    int fd;
    uint64_t pos, limit;
} reader;

/* Reads @len bytes at the reader's position for record @tag starting at
 * @rec (for the message); a short stream is "truncated". */
static int get(reader *r, void *buf, size_t len, int tag, uint64_t rec,
               const char *what, vd_error *err)
{
    size_t done = 0;

    if (len > r->limit - r->pos) {
        if (tag < 0) {
            return vd_error_set(err, -EINVAL, "truncated stream: %s needs "
                                "%zu bytes at offset %" PRIu64 ", the "
                                "stream ends at offset %" PRIu64, what, len,
                                r->pos, r->limit);
        }
        return vd_error_set(err, -EINVAL, "truncated stream: record '%c' at "
                            "offset %" PRIu64 " needs %zu bytes of %s, the "
                            "stream ends at offset %" PRIu64, tag, rec, len,
                            what, r->limit);
    }
    while (done < len) {
        ssize_t n = pread(r->fd, (char *)buf + done, len - done,
                          (off_t)(r->pos + done));

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            return vd_error_set_errno(err, -errno, "read error at offset "
                                      "%" PRIu64, r->pos + done);
        }
        if (n == 0) {
            return vd_error_set(err, -EINVAL, "truncated stream: the file "
                                "ends at offset %" PRIu64, r->pos + done);
        }
        done += (size_t)n;
    }
    r->pos += len;
    return 0;
}

static uint64_t le64(const uint8_t *p)
{
    uint64_t v = 0;

    for (int i = 7; i >= 0; i--) {
        v = v << 8 | p[i];
    }
    return v;
}

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

/* 'f' or 't': a le32 length and the name. */
static int get_name(reader *r, int tag, uint64_t rec, uint64_t v2_len,
                    bool v2, char **out, vd_error *err)
{
    uint8_t b[4];
    uint32_t len;
    char *name;
    int ret;

    if (*out) {
        return vd_error_set(err, -EINVAL, "record '%c' at offset %" PRIu64
                            " repeats an earlier one", tag, rec);
    }
    ret = get(r, b, 4, tag, rec, "name length", err);
    if (ret < 0) {
        return ret;
    }
    len = le32(b);
    if (len > VD_RBD_DIFF_NAME_MAX) {
        return vd_error_set(err, -EINVAL, "record '%c' at offset %" PRIu64
                            ": snapshot name of %" PRIu32 " bytes is longer "
                            "than %d", tag, rec, len, VD_RBD_DIFF_NAME_MAX);
    }
    if (v2 && v2_len != 4 + (uint64_t)len) {
        return vd_error_set(err, -EINVAL, "record '%c' at offset %" PRIu64
                            ": v2 length %" PRIu64 " does not match its "
                            "%" PRIu32 "-byte name", tag, rec, v2_len, len);
    }
    name = malloc((size_t)len + 1);
    if (!name) {
        return vd_error_set(err, -ENOMEM, "out of memory");
    }
    ret = get(r, name, len, tag, rec, "name", err);
    if (ret < 0) {
        free(name);
        return ret;
    }
    name[len] = '\0';
    if (strlen(name) != len || len == 0) {
        free(name);
        return vd_error_set(err, -EINVAL, "record '%c' at offset %" PRIu64
                            ": the snapshot name is %s", tag, rec,
                            len ? "not a string (it holds a NUL byte)"
                                : "empty");
    }
    *out = name;
    return 0;
}

static int check_v2_len(bool v2, uint64_t v2_len, uint64_t want, int tag,
                        uint64_t rec, vd_error *err)
{
    if (v2 && v2_len != want) {
        return vd_error_set(err, -EINVAL, "record '%c' at offset %" PRIu64
                            ": v2 length %" PRIu64 " where the record holds "
                            "%" PRIu64, tag, rec, v2_len, want);
    }
    return 0;
}

/* 'w' or 'z': offset and length (and for 'w' the bytes, skipped). */
static int get_extent(reader *r, int tag, uint64_t rec, bool v2,
                      uint64_t v2_len, uint64_t bound,
                      vd_rbd_diff_info *info, vd_rbd_diff_extent_fn *fn,
                      void *opaque, vd_error *err)
{
    uint8_t b[16];
    uint64_t off, len, data_pos;
    bool zero = tag == 'z';
    int ret = get(r, b, 16, tag, rec, "offset and length", err);

    if (ret < 0) {
        return ret;
    }
    off = le64(b);
    len = le64(b + 8);
    if (off > bound || len > bound - off) {
        return vd_error_set(err, -EINVAL, "record '%c' at offset %" PRIu64
                            ": extent of %" PRIu64 " bytes at %" PRIu64 " "
                            "lies past the image size %" PRIu64, tag, rec,
                            len, off, bound);
    }
    if (v2 && (zero ? v2_len != 16 : len > UINT64_MAX - 16 ||
                                     v2_len != 16 + len)) {
        return vd_error_set(err, -EINVAL, "record '%c' at offset %" PRIu64
                            ": v2 length %" PRIu64 " does not match its "
                            "%s", tag, rec, v2_len,
                            zero ? "16 bytes" : "extent length");
    }
    data_pos = r->pos;
    if (!zero) {
        if (len > r->limit - r->pos) {
            return vd_error_set(err, -EINVAL, "truncated stream: record "
                                "'w' at offset %" PRIu64 " needs %" PRIu64
                                " bytes of data, the stream ends at offset "
                                "%" PRIu64, rec, len, r->limit);
        }
        r->pos += len;
        info->write_records++;
        info->write_bytes += len;
    } else {
        info->zero_records++;
        info->zero_bytes += len;
    }
    return fn ? fn(opaque, zero, off, len, data_pos, err) : 0;
}

int vd_rbd_diff_scan(int fd, uint64_t start, uint64_t limit,
                     uint64_t image_size, vd_rbd_diff_info *info,
                     vd_rbd_diff_extent_fn *fn, void *opaque, vd_error *err)
{
    reader r = { .fd = fd, .pos = start, .limit = limit };
    char banner[BANNER_LEN];
    bool v2, data_seen = false;
    int ret;

    memset(info, 0, sizeof(*info));
    if (start > limit) {
        return vd_error_set(err, -EINVAL, "the stream starts past its end");
    }
    ret = get(&r, banner, BANNER_LEN, -1, 0, "the banner", err);
    if (ret < 0) {
        return ret;
    }
    if (memcmp(banner, BANNER_V1, BANNER_LEN) == 0) {
        info->version = 1;
    } else if (memcmp(banner, BANNER_V2, BANNER_LEN) == 0) {
        info->version = 2;
    } else {
        return vd_error_set(err, -EINVAL, "not an RBD diff stream (no "
                            "\"rbd diff v1\" or \"rbd diff v2\" banner)");
    }
    v2 = info->version == 2;

    for (;;) {
        uint64_t rec = r.pos, v2_len = 0;
        uint8_t tag, b[8];

        ret = get(&r, &tag, 1, -1, 0, "a record tag (no end record)", err);
        if (ret < 0) {
            return ret;
        }
        if (tag == 'e') {
            info->end = r.pos;
            return 0;
        }
        if (v2) {
            ret = get(&r, b, 8, tag, rec, "v2 length", err);
            if (ret < 0) {
                return ret;
            }
            v2_len = le64(b);
        }
        switch (tag) {
        case 'f':
        case 't':
        case 's':
        case 'p':
            if (data_seen) {
                return vd_error_set(err, -EINVAL, "metadata record '%c' at "
                                    "offset %" PRIu64 " follows data "
                                    "records", tag, rec);
            }
            break;
        }
        switch (tag) {
        case 'f':
            ret = get_name(&r, tag, rec, v2_len, v2, &info->from_snap, err);
            break;
        case 't':
            ret = get_name(&r, tag, rec, v2_len, v2, &info->to_snap, err);
            break;
        case 's':
            ret = check_v2_len(v2, v2_len, 8, tag, rec, err);
            if (ret >= 0 && info->has_size) {
                ret = vd_error_set(err, -EINVAL, "record 's' at offset %"
                                   PRIu64 " repeats an earlier one", rec);
            }
            if (ret >= 0) {
                ret = get(&r, b, 8, tag, rec, "image size", err);
            }
            if (ret >= 0) {
                info->has_size = true;
                info->size = le64(b);
            }
            break;
        case 'p':
            if (!v2) {
                ret = vd_error_set(err, -EINVAL, "unknown record tag 'p' "
                                   "at offset %" PRIu64 " (a v2 record in "
                                   "a v1 stream)", rec);
                break;
            }
            /* rbd reads one byte whatever the length says, and Ceph
             * up to 16.2 (pacific) wrote a length of 8 before it. */
            ret = 0;
            if (v2_len != 8) {
                ret = check_v2_len(v2, v2_len, 1, tag, rec, err);
            }
            if (ret >= 0) {
                ret = get(&r, b, 1, tag, rec, "protection flag", err);
            }
            if (ret >= 0) {
                info->is_protected = b[0] != 0;
            }
            break;
        case 'w':
        case 'z':
            data_seen = true;
            ret = get_extent(&r, tag, rec, v2, v2_len,
                             info->has_size ? info->size : image_size, info,
                             fn, opaque, err);
            break;
        default:
            if (!v2) {
                ret = vd_error_set(err, -EINVAL, "unknown record tag 0x%02x "
                                   "at offset %" PRIu64 " (a v1 stream "
                                   "cannot skip it)", tag, rec);
                break;
            }
            if (v2_len > r.limit - r.pos) {
                ret = vd_error_set(err, -EINVAL, "truncated stream: record "
                                   "of unknown tag 0x%02x at offset %" PRIu64
                                   " needs %" PRIu64 " bytes, the stream "
                                   "ends at offset %" PRIu64, tag, rec,
                                   v2_len, r.limit);
                break;
            }
            r.pos += v2_len;
            info->skipped++;
            break;
        }
        if (ret < 0) {
            return ret;
        }
    }
}

void vd_rbd_diff_info_clear(vd_rbd_diff_info *info)
{
    if (!info) {
        return;
    }
    free(info->from_snap);
    free(info->to_snap);
    memset(info, 0, sizeof(*info));
}
