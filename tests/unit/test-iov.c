/*
 * Unit test for the I/O vector helpers (src/core/iov.c).
 *
 * Every check compares the vector against a flat "model" buffer holding
 * the bytes the vector should contain. The vector is built from pieces of
 * awkward sizes (including more than VD_IOV_INLINE of them, so slices
 * must allocate), and the copy, slice, memset and zero-test helpers are
 * tried exhaustively at every offset and length of a small vector.
 * Each failed check prints what was called and what came back; the
 * program exits 1 when any check failed.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/iov.h"

#include "check.h"



/* Stop reporting one kind of failure after a few; the first ones say it. */
#define MAX_REPORTS 20

/* Piece sizes: a 1-byte piece, a zero-length piece and uneven tails. */
static const size_t piece_len[] = { 1, 3, 0, 7, 64, 5, 2, 13 };
#define NPIECES (sizeof(piece_len) / sizeof(piece_len[0]))

typedef struct fixture {
    vd_iov v;
    uint8_t *pieces[NPIECES];
    uint8_t model[128];
    size_t size;
} fixture;

static void fixture_init(fixture *f)
{
    memset(f, 0, sizeof(*f));
    vd_iov_init(&f->v);
    for (size_t i = 0; i < NPIECES; i++) {
        /* +1 so a zero-length piece still has a distinct address. */
        f->pieces[i] = calloc(1, piece_len[i] + 1);
        if (!f->pieces[i]) {
            fprintf(stderr, "out of memory\n");
            exit(1);
        }
        int r = vd_iov_add(&f->v, f->pieces[i], piece_len[i]);
        CHECK(r == 0, "vd_iov_add(piece %zu, len %zu) returned %d", i,
              piece_len[i], r);
        f->size += piece_len[i];
    }
}

static void fixture_destroy(fixture *f)
{
    vd_iov_destroy(&f->v);
    for (size_t i = 0; i < NPIECES; i++) {
        free(f->pieces[i]);
    }
}

/* Fills the model with a pattern and pushes it into the vector. */
static void fixture_fill(fixture *f, uint8_t seed)
{
    for (size_t i = 0; i < f->size; i++) {
        f->model[i] = (uint8_t)(seed + i * 7 + 1);
    }
    size_t n = vd_iov_from_buf(&f->v, 0, f->model, f->size);
    CHECK(n == f->size, "vd_iov_from_buf(0, %zu) returned %zu", f->size, n);
}

/* The vector's pieces, concatenated, must equal the model. */
static void check_against_model(const fixture *f, const char *what)
{
    size_t pos = 0;
    for (size_t i = 0; i < NPIECES; i++) {
        if (memcmp(f->pieces[i], f->model + pos, piece_len[i]) != 0) {
            CHECK(0, "after %s: piece %zu (bytes %zu..%zu) differs from "
                  "the model", what, i, pos, pos + piece_len[i]);
            return;
        }
        pos += piece_len[i];
    }
}

static void test_build(void)
{
    fixture f;
    fixture_init(&f);
    CHECK(f.v.size == f.size, "size %zu, expected %zu", f.v.size, f.size);
    CHECK(f.v.niov >= (int)NPIECES - 1 && f.v.niov <= (int)NPIECES,
          "niov %d after adding %zu pieces (one empty)", f.v.niov,
          NPIECES);
    fixture_fill(&f, 3);
    check_against_model(&f, "vd_iov_from_buf of the whole vector");
    fixture_destroy(&f);

    /* A flat buffer and a foreign array describe the same bytes. */
    uint8_t buf[10] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 };
    uint8_t out[10] = { 0 };
    vd_iov flat;
    vd_iov_init_buf(&flat, buf, sizeof(buf));
    CHECK(flat.size == 10 && flat.niov == 1, "init_buf: size %zu niov %d",
          flat.size, flat.niov);
    CHECK(vd_iov_to_buf(&flat, 2, out, 5) == 5, "init_buf: to_buf count");
    CHECK(memcmp(out, buf + 2, 5) == 0, "init_buf: to_buf bytes");
    vd_iov_destroy(&flat);

    struct iovec ext[3] = {
        { buf, 2 }, { buf + 2, 0 }, { buf + 2, 8 },
    };
    vd_iov e;
    vd_iov_init_external(&e, ext, 3);
    CHECK(e.size == 10, "init_external: size %zu, expected 10", e.size);
    memset(out, 0, sizeof(out));
    CHECK(vd_iov_to_buf(&e, 0, out, 10) == 10, "init_external: to_buf");
    CHECK(memcmp(out, buf, 10) == 0, "init_external: bytes differ");
    vd_iov_destroy(&e);
}

static void test_copy(void)
{
    fixture f;
    fixture_init(&f);
    fixture_fill(&f, 11);
    uint8_t out[160];
    int reports = 0;

    /* to_buf at every offset and length, including past the end where
     * the count is clipped to what the vector holds. */
    for (size_t off = 0; off <= f.size; off++) {
        for (size_t len = 0; off + len <= f.size + 4; len++) {
            memset(out, 0xee, sizeof(out));
            size_t n = vd_iov_to_buf(&f.v, off, out, len);
            size_t want = off + len <= f.size ? len : f.size - off;
            if ((n != want || memcmp(out, f.model + off, want) != 0 ||
                 out[want] != 0xee) && reports++ < MAX_REPORTS) {
                CHECK(0, "vd_iov_to_buf(off %zu, len %zu) returned %zu "
                      "(want %zu) or copied wrong bytes", off, len, n, want);
            }
        }
    }

    /* from_buf at every offset and length: only the range changes. */
    for (size_t off = 0; off <= f.size; off++) {
        for (size_t len = 0; off + len <= f.size; len++) {
            fixture_fill(&f, (uint8_t)(off + len));
            uint8_t src[128];
            for (size_t i = 0; i < len; i++) {
                src[i] = (uint8_t)(0x80 ^ (i * 13));
            }
            size_t n = vd_iov_from_buf(&f.v, off, src, len);
            memcpy(f.model + off, src, len);
            if (n != len && reports++ < MAX_REPORTS) {
                CHECK(0, "vd_iov_from_buf(off %zu, len %zu) returned %zu",
                      off, len, n);
            }
            if (reports < MAX_REPORTS) {
                int before = failures;
                check_against_model(&f, "vd_iov_from_buf");
                reports += failures - before;
            }
        }
    }
    fixture_destroy(&f);
}

static void test_slice(void)
{
    fixture f;
    fixture_init(&f);
    fixture_fill(&f, 5);
    int reports = 0;

    for (size_t off = 0; off <= f.size; off++) {
        for (size_t len = 0; off + len <= f.size; len++) {
            vd_iov s;
            int r = vd_iov_init_slice(&s, &f.v, off, len);
            if (r != 0) {
                if (reports++ < MAX_REPORTS) {
                    CHECK(0, "vd_iov_init_slice(off %zu, len %zu) "
                          "returned %d", off, len, r);
                }
                continue;
            }
            uint8_t out[128];
            size_t sum = 0;
            for (int i = 0; i < s.niov; i++) {
                sum += s.iov[i].iov_len;
            }
            size_t n = vd_iov_to_buf(&s, 0, out, len);
            if ((s.size != len || sum != len || n != len ||
                 memcmp(out, f.model + off, len) != 0) &&
                reports++ < MAX_REPORTS) {
                CHECK(0, "slice(off %zu, len %zu): size %zu, pieces sum "
                      "to %zu, to_buf %zu, or bytes differ", off, len,
                      s.size, sum, n);
            }

            /* A slice of a slice, and writing through it reaches the
             * parent's buffers. */
            if (len >= 2) {
                vd_iov s2;
                r = vd_iov_init_slice(&s2, &s, 1, len - 2);
                if (r == 0) {
                    uint8_t x[128];
                    memset(x, 0x5c, len - 2);
                    vd_iov_from_buf(&s2, 0, x, len - 2);
                    memset(f.model + off + 1, 0x5c, len - 2);
                    int before = failures;
                    check_against_model(&f, "writing through a slice of "
                                        "a slice");
                    if (failures != before && reports++ >= MAX_REPORTS) {
                        failures = before + 1;
                    }
                    vd_iov_destroy(&s2);
                } else if (reports++ < MAX_REPORTS) {
                    CHECK(0, "slice of slice (off 1, len %zu) returned %d",
                          len - 2, r);
                }
                fixture_fill(&f, 5);
            }
            vd_iov_destroy(&s);
        }
    }
    fixture_destroy(&f);
}

static void test_memset_zero(void)
{
    fixture f;
    fixture_init(&f);
    int reports = 0;

    for (size_t off = 0; off <= f.size; off++) {
        for (size_t len = 0; off + len <= f.size; len++) {
            fixture_fill(&f, 9);
            vd_iov_memset(&f.v, off, 0, len);
            memset(f.model + off, 0, len);
            int before = failures;
            check_against_model(&f, "vd_iov_memset");
            if (failures != before) {
                if (reports++ >= MAX_REPORTS) {
                    failures = before + 1;
                    continue;
                }
                fprintf(stderr, "  (vd_iov_memset off %zu len %zu)\n",
                        off, len);
            }

            /* is_zero must equal "the model range is zero" for ranges
             * that start and end at, just inside and just outside the
             * zeroed one (exhaustive pairs would be too slow under
             * the sanitizers). */
            size_t lo = off > 3 ? off - 3 : 0;
            size_t end = off + len;
            size_t hi = end + 3 < f.size ? end + 3 : f.size;
            size_t starts[] = { lo, off, off + 1 < hi ? off + 1 : hi };
            size_t ends[] = { hi, end, end > 0 ? end - 1 : 0 };
            for (size_t i = 0; i < 3; i++) {
                for (size_t j = 0; j < 3; j++) {
                    size_t a = starts[i], b = ends[j];
                    if (b < a) {
                        continue;
                    }
                    bool want = vd_buffer_is_zero(f.model + a, b - a);
                    bool model_zero = true;
                    for (size_t k = a; k < b; k++) {
                        model_zero = model_zero && f.model[k] == 0;
                    }
                    bool got = vd_iov_is_zero(&f.v, a, b - a);
                    if ((got != model_zero || want != model_zero) &&
                        reports++ < MAX_REPORTS) {
                        CHECK(0, "is_zero(off %zu, len %zu): iov says %d, "
                              "buffer says %d, model %d", a, b - a, got,
                              want, model_zero);
                    }
                }
            }
        }
    }

    /* Non-zero memset value across every piece boundary. */
    fixture_fill(&f, 1);
    vd_iov_memset(&f.v, 2, 0xa5, f.size - 4);
    memset(f.model + 2, 0xa5, f.size - 4);
    check_against_model(&f, "vd_iov_memset(0xa5)");
    fixture_destroy(&f);
}

/* vd_buffer_is_zero is the fast path; vectorised code tends to miss a
 * stray byte near the edges, so try every length, alignment and
 * position of a single non-zero byte. */
static void test_buffer_is_zero(void)
{
    enum { MAXLEN = 300 };
    uint8_t *buf = calloc(1, MAXLEN + 64);
    int reports = 0;
    if (!buf) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (size_t align = 0; align < 16; align++) {
        uint8_t *p = buf + align;
        for (size_t len = 0; len <= MAXLEN; len++) {
            if (!vd_buffer_is_zero(p, len) && reports++ < MAX_REPORTS) {
                CHECK(0, "vd_buffer_is_zero(align %zu, len %zu) of zeros "
                      "returned false", align, len);
            }
            for (size_t pos = 0; pos < len; pos++) {
                p[pos] = 0x10;
                if (vd_buffer_is_zero(p, len) && reports++ < MAX_REPORTS) {
                    CHECK(0, "vd_buffer_is_zero(align %zu, len %zu) missed "
                          "a non-zero byte at %zu", align, len, pos);
                }
                p[pos] = 0;
            }
        }
    }
    /* Non-zero bytes just outside the range must not count. */
    memset(buf, 0xff, MAXLEN + 64);
    memset(buf + 8, 0, 100);
    CHECK(vd_buffer_is_zero(buf + 8, 100), "zeros between 0xff guards");
    /* Large buffer (4 MiB), last byte set. */
    size_t big = 4u << 20;
    uint8_t *b = calloc(1, big);
    if (b) {
        CHECK(vd_buffer_is_zero(b, big), "4 MiB of zeros");
        b[big - 1] = 1;
        CHECK(!vd_buffer_is_zero(b, big), "4 MiB with the last byte set");
        free(b);
    }
    free(buf);
}

int main(void)
{
    test_build();
    test_copy();
    test_slice();
    test_memset_zero();
    test_buffer_is_zero();
    if (failures) {
        fprintf(stderr, "test-iov: %d check(s) failed\n", failures);
        return 1;
    }
    printf("test-iov: all checks passed\n");
    return 0;
}
