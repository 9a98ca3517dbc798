/*
 * Unit test for option sets and size parsing (src/core/opts.c).
 *
 * Part one drives the public vd_opts_* calls and the internal
 * vd_opts_extract_prefix() of core/opts.h: parsing with ",," escapes and
 * an implied key, malformed strings, replacement, cloning, prefix
 * extraction, and the typed takers with their "Parameter 'KEY' expects
 * ..." messages.
 *
 * Part two checks vd_parse_size twice: against a short table of what the
 * header promises (suffixes, fractions, rejection of junk, -ERANGE from
 * 2^63 up), and against qemu-img itself: for a list of size strings the
 * test runs `qemu-img create -f raw` in a scratch directory and requires
 * vdisk to accept exactly the strings qemu-img accepts, with the same
 * value. That second part is skipped (with a note) without qemu-img.
 *
 * Each failed check prints the call and what came back; exit 1 if any.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "vdisk/vdisk.h"
#include "core/opts.h"

#include "check.h"



static const char *nn(const char *s)
{
    return s ? s : "(null)";
}

static bool streq(const char *a, const char *b)
{
    return a && b && strcmp(a, b) == 0;
}

static vd_opts *new_opts(void)
{
    vd_opts *o = vd_opts_new();
    if (!o) {
        fprintf(stderr, "vd_opts_new returned NULL\n");
        exit(1);
    }
    return o;
}

/* A message is one phrase: non-empty, no newline, no trailing period. */
static void check_message(const vd_error *err, const char *what)
{
    size_t n = strlen(err->message);
    CHECK(n > 0, "%s: empty error message", what);
    CHECK(strchr(err->message, '\n') == NULL,
          "%s: message has a newline: \"%s\"", what, err->message);
    CHECK(n == 0 || (err->message[n - 1] != '.' &&
                     err->message[n - 1] != ' '),
          "%s: message ends with punctuation: \"%s\"", what,
          err->message);
}

/* Parses @str into a fresh set; returns the set (or NULL) and the
 * result through *ret. */
static vd_opts *parse(const char *str, const char *implied, int *ret,
                      vd_error *err)
{
    vd_opts *o = new_opts();
    vd_error_clear(err);
    *ret = vd_opts_parse(o, str, implied, err);
    return o;
}

static void test_parse(void)
{
    vd_error err;
    int r;
    vd_opts *o;

    o = parse("a=1,b=two,c.d=x", NULL, &r, &err);
    CHECK(r == 0, "parse \"a=1,b=two,c.d=x\" returned %d (%s)", r,
          err.message);
    CHECK(vd_opts_count(o) == 3, "count %zu, expected 3", vd_opts_count(o));
    CHECK(streq(vd_opts_get(o, "a"), "1"), "a=%s", nn(vd_opts_get(o, "a")));
    CHECK(streq(vd_opts_get(o, "b"), "two"), "b=%s",
          nn(vd_opts_get(o, "b")));
    CHECK(streq(vd_opts_get(o, "c.d"), "x"), "c.d=%s",
          nn(vd_opts_get(o, "c.d")));
    CHECK(vd_opts_get(o, "c") == NULL, "\"c\" should not be set");
    if (vd_opts_count(o) == 3) {
        static const char *const keys[] = { "a", "b", "c.d" };
        for (size_t i = 0; i < 3; i++) {
            const char *k = NULL, *v = NULL;
            vd_opts_nth(o, i, &k, &v);
            CHECK(streq(k, keys[i]), "nth(%zu) key %s, expected %s", i,
                  nn(k), keys[i]);
        }
    }
    /* A later value replaces an earlier one and keeps the count. */
    vd_error_clear(&err);
    r = vd_opts_parse(o, "b=three", NULL, &err);
    CHECK(r == 0 && streq(vd_opts_get(o, "b"), "three"),
          "re-parse b=three: r=%d b=%s", r, nn(vd_opts_get(o, "b")));
    CHECK(vd_opts_count(o) == 3, "count after replace %zu",
          vd_opts_count(o));
    vd_opts_free(&o);
    CHECK(o == NULL, "vd_opts_free did not clear the pointer");
    vd_opts_free(&o);
    vd_opts_free(NULL);

    /* ",," is a literal comma, in the middle and at the end. */
    o = parse("file=a,,b,,,,c,x=y,,", NULL, &r, &err);
    CHECK(r == 0, "parse with ,, returned %d (%s)", r, err.message);
    CHECK(streq(vd_opts_get(o, "file"), "a,b,,c"), "file=\"%s\", expected "
          "\"a,b,,c\"", nn(vd_opts_get(o, "file")));
    CHECK(streq(vd_opts_get(o, "x"), "y,"), "x=\"%s\", expected \"y,\"",
          nn(vd_opts_get(o, "x")));
    vd_opts_free(&o);

    /* '=' inside a value is part of the value. */
    o = parse("backing=a=b", NULL, &r, &err);
    CHECK(r == 0 && streq(vd_opts_get(o, "backing"), "a=b"),
          "parse backing=a=b: r=%d value %s", r,
          nn(vd_opts_get(o, "backing")));
    vd_opts_free(&o);

    /* The implied key takes a first element without '='. */
    o = parse("help,size=1M", "fmt", &r, &err);
    CHECK(r == 0, "parse with implied key returned %d (%s)", r,
          err.message);
    CHECK(streq(vd_opts_get(o, "fmt"), "help"), "implied fmt=%s",
          nn(vd_opts_get(o, "fmt")));
    CHECK(streq(vd_opts_get(o, "size"), "1M"), "size=%s",
          nn(vd_opts_get(o, "size")));
    vd_opts_free(&o);

    o = parse("size=1M", "fmt", &r, &err);
    CHECK(r == 0 && vd_opts_get(o, "fmt") == NULL && vd_opts_count(o) == 1,
          "implied key must not appear when every element has '=': r=%d "
          "count %zu", r, vd_opts_count(o));
    vd_opts_free(&o);

    /* Malformed: empty key. */
    static const char *const bad[] = { "=1", "a=1,=2" };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        o = parse(bad[i], NULL, &r, &err);
        CHECK(r == -EINVAL, "parse \"%s\" returned %d, expected -EINVAL",
              bad[i], r);
        CHECK(err.code == -EINVAL, "parse \"%s\": err.code %d", bad[i],
              err.code);
        if (r < 0) {
            check_message(&err, bad[i]);
        }
        vd_opts_free(&o);
    }

    /* A NULL error pointer is allowed. */
    o = new_opts();
    r = vd_opts_parse(o, "=x", NULL, NULL);
    CHECK(r == -EINVAL, "parse \"=x\" with err NULL returned %d", r);
    vd_opts_free(&o);
}

static void test_set_clone_del(void)
{
    vd_opts *o = new_opts();
    CHECK(vd_opts_set(o, "", "x") == -EINVAL, "set with empty key");
    CHECK(vd_opts_set(o, "k1", "v1") == 0, "set k1");
    CHECK(vd_opts_set(o, "k2", "v2") == 0, "set k2");
    CHECK(vd_opts_set(o, "k1", "v1b") == 0, "replace k1");
    CHECK(vd_opts_count(o) == 2, "count %zu after replace",
          vd_opts_count(o));
    CHECK(streq(vd_opts_get(o, "k1"), "v1b"), "k1=%s",
          nn(vd_opts_get(o, "k1")));

    vd_opts *c = vd_opts_clone(o);
    CHECK(c != NULL, "clone returned NULL");
    if (c) {
        vd_opts_set(o, "k2", "changed");
        CHECK(streq(vd_opts_get(c, "k2"), "v2"),
              "clone is not deep: k2=%s", nn(vd_opts_get(c, "k2")));
        CHECK(vd_opts_count(c) == 2, "clone count %zu", vd_opts_count(c));
        vd_opts_free(&c);
    }

    vd_opts_del(o, "k1");
    vd_opts_del(o, "absent");
    CHECK(vd_opts_get(o, "k1") == NULL && vd_opts_count(o) == 1,
          "del k1: count %zu", vd_opts_count(o));
    CHECK(streq(vd_opts_first_key(o), "k2"), "first key %s",
          nn(vd_opts_first_key(o)));
    vd_opts_del(o, "k2");
    CHECK(vd_opts_first_key(o) == NULL, "first key of an empty set %s",
          nn(vd_opts_first_key(o)));

    char *v;
    vd_opts_set(o, "t", "taken");
    v = vd_opts_take(o, "t");
    CHECK(streq(v, "taken"), "take returned %s", nn(v));
    free(v);
    CHECK(vd_opts_get(o, "t") == NULL, "take did not remove the key");
    v = vd_opts_take(o, "t");
    CHECK(v == NULL, "take of an absent key returned %s", v);
    free(v);
    vd_opts_free(&o);
}

static void test_extract_prefix(void)
{
    vd_error err = VD_ERROR_INIT;
    vd_opts *o = new_opts();
    int r = vd_opts_parse(o, "driver=qcow2,file.driver=file,file.filename="
                          "a.img,filex.y=1,file=keep,backing.file.filename="
                          "b.img", NULL, &err);
    CHECK(r == 0, "parse returned %d (%s)", r, err.message);

    /* The prefix includes its dot, as the core passes it ("file."). */
    vd_opts *f = vd_opts_extract_prefix(o, "file.");
    CHECK(f != NULL, "extract_prefix returned NULL");
    if (f) {
        CHECK(vd_opts_count(f) == 2, "extracted %zu keys, expected 2",
              vd_opts_count(f));
        CHECK(streq(vd_opts_get(f, "driver"), "file"), "file.driver -> %s",
              nn(vd_opts_get(f, "driver")));
        CHECK(streq(vd_opts_get(f, "filename"), "a.img"),
              "file.filename -> %s", nn(vd_opts_get(f, "filename")));
        vd_opts_free(&f);
    }
    CHECK(vd_opts_get(o, "file.driver") == NULL &&
          vd_opts_get(o, "file.filename") == NULL,
          "extracted keys are still in the source");
    CHECK(streq(vd_opts_get(o, "filex.y"), "1"),
          "\"filex.y\" must not match prefix \"file.\"");
    CHECK(streq(vd_opts_get(o, "file"), "keep"),
          "the bare key \"file\" must stay");
    CHECK(vd_opts_count(o) == 4, "%zu keys left, expected 4",
          vd_opts_count(o));

    vd_opts *b = vd_opts_extract_prefix(o, "backing.");
    CHECK(b && streq(vd_opts_get(b, "file.filename"), "b.img"),
          "nested prefix: backing.file.filename -> %s",
          b ? nn(vd_opts_get(b, "file.filename")) : "(no set)");
    vd_opts_free(&b);

    vd_opts *none = vd_opts_extract_prefix(o, "data-file.");
    CHECK(none && vd_opts_count(none) == 0,
          "extracting an absent prefix gives an empty set");
    vd_opts_free(&none);
    vd_opts_free(&o);
}

/* The typed takers: a good value, the default, and a bad value with the
 * "Parameter 'KEY' expects" message. */
static void check_bad_taker(int r, const vd_error *err, const char *key,
                            const char *what)
{
    char want[128];
    snprintf(want, sizeof(want), "Parameter '%s' expects", key);
    CHECK(r == -EINVAL, "%s returned %d, expected -EINVAL", what, r);
    CHECK(err->code == -EINVAL, "%s: err.code %d", what, err->code);
    CHECK(strstr(err->message, want) != NULL,
          "%s: message \"%s\" lacks \"%s\"", what, err->message, want);
    check_message(err, what);
}

static void test_takers(void)
{
    vd_error err;
    vd_opts *o = new_opts();
    int r;

    /* booleans */
    static const struct { const char *s; bool v; } bools[] = {
        { "on", true }, { "off", false }, { "true", true },
        { "false", false }, { "yes", true }, { "no", false },
    };
    for (size_t i = 0; i < sizeof(bools) / sizeof(bools[0]); i++) {
        bool out = !bools[i].v;
        vd_error_clear(&err);
        vd_opts_set(o, "flag", bools[i].s);
        r = vd_opts_take_bool(o, "flag", !bools[i].v, &out, &err);
        CHECK(r == 0 && out == bools[i].v, "take_bool(\"%s\"): r=%d out=%d",
              bools[i].s, r, out);
        CHECK(vd_opts_get(o, "flag") == NULL, "take_bool left the key");
        bool pb;
        CHECK(vd_parse_bool(bools[i].s, &pb) == 0 && pb == bools[i].v,
              "vd_parse_bool(\"%s\")", bools[i].s);
    }
    bool b = false;
    r = vd_opts_take_bool(o, "absent", true, &b, NULL);
    CHECK(r == 0 && b == true, "take_bool default: r=%d out=%d", r, b);
    vd_opts_set(o, "flag", "maybe");
    vd_error_clear(&err);
    r = vd_opts_take_bool(o, "flag", false, &b, &err);
    check_bad_taker(r, &err, "flag", "take_bool(\"maybe\")");
    vd_opts_del(o, "flag");

    /* sizes */
    uint64_t u = 0;
    vd_opts_set(o, "size", "64k");
    vd_error_clear(&err);
    r = vd_opts_take_size(o, "size", 0, &u, &err);
    CHECK(r == 0 && u == 65536, "take_size(\"64k\"): r=%d out=%" PRIu64, r,
          u);
    r = vd_opts_take_size(o, "size", 12345, &u, NULL);
    CHECK(r == 0 && u == 12345, "take_size default: r=%d out=%" PRIu64, r,
          u);
    vd_opts_set(o, "size", "lots");
    vd_error_clear(&err);
    r = vd_opts_take_size(o, "size", 0, &u, &err);
    check_bad_taker(r, &err, "size", "take_size(\"lots\")");
    vd_opts_del(o, "size");

    /* unsigned numbers */
    vd_opts_set(o, "n", "42");
    vd_error_clear(&err);
    r = vd_opts_take_uint(o, "n", 0, &u, &err);
    CHECK(r == 0 && u == 42, "take_uint(\"42\"): r=%d out=%" PRIu64, r, u);
    static const char *const bad_uints[] = { "-1", "12x", "", "k" };
    for (size_t i = 0; i < sizeof(bad_uints) / sizeof(bad_uints[0]); i++) {
        char what[64];
        snprintf(what, sizeof(what), "take_uint(\"%s\")", bad_uints[i]);
        vd_opts_set(o, "n", bad_uints[i]);
        vd_error_clear(&err);
        r = vd_opts_take_uint(o, "n", 0, &u, &err);
        check_bad_taker(r, &err, "n", what);
        vd_opts_del(o, "n");
    }

    /* enums */
    static const char *const modes[] = { "none", "writeback", "unsafe",
                                         NULL };
    int idx = -1;
    vd_opts_set(o, "cache", "unsafe");
    vd_error_clear(&err);
    r = vd_opts_take_enum(o, "cache", modes, 1, &idx, &err);
    CHECK(r == 0 && idx == 2, "take_enum(\"unsafe\"): r=%d idx=%d", r, idx);
    r = vd_opts_take_enum(o, "cache", modes, 1, &idx, NULL);
    CHECK(r == 0 && idx == 1, "take_enum default: r=%d idx=%d", r, idx);
    vd_opts_set(o, "cache", "sometimes");
    vd_error_clear(&err);
    r = vd_opts_take_enum(o, "cache", modes, 1, &idx, &err);
    CHECK(r == -EINVAL, "take_enum(\"sometimes\") returned %d", r);
    CHECK(strstr(err.message, "Parameter 'cache'") != NULL,
          "take_enum(\"sometimes\"): message \"%s\" lacks \"Parameter "
          "'cache'\"", err.message);
    if (r < 0) {
        check_message(&err, "take_enum(\"sometimes\")");
    }
    vd_opts_free(&o);
}

/* ---- sizes ----------------------------------------------------------- */

typedef struct size_case {
    const char *str;
    int ret;          /* 0, -EINVAL or -ERANGE */
    uint64_t value;   /* when ret == 0 */
} size_case;

#define KiB 1024ull
#define MiB (KiB * 1024)
#define GiB (MiB * 1024)
#define TiB (GiB * 1024)
#define PiB (TiB * 1024)
#define EiB (PiB * 1024)

/* What vdisk.h promises, independent of any referee. */
static const size_case promised[] = {
    { "0", 0, 0 },
    { "512", 0, 512 },
    { "64k", 0, 64 * KiB },
    { "64K", 0, 64 * KiB },
    { "1M", 0, MiB },
    { "1.5G", 0, GiB + GiB / 2 },
    { "2T", 0, 2 * TiB },
    { "3P", 0, 3 * PiB },
    { "7E", 0, 7 * EiB },
    { "1b", 0, 1 },
    { "100B", 0, 100 },
    { "9223372036854775807", 0, INT64_MAX },
    { "9223372036854775808", -ERANGE, 0 },
    { "8E", -ERANGE, 0 },
    { "8192P", -ERANGE, 0 },
    { "18446744073709551615", -ERANGE, 0 },
    { "99999999999999999999999", -ERANGE, 0 },
    { "-1", -EINVAL, 0 },
    { "-1k", -EINVAL, 0 },
    { "12Q", -EINVAL, 0 },
    { "", -EINVAL, 0 },
    { "k", -EINVAL, 0 },
    { "1kB", -EINVAL, 0 },
    { "1k5", -EINVAL, 0 },
    { "1e3", -EINVAL, 0 },
    { "1 k", -EINVAL, 0 },
    { "1k ", -EINVAL, 0 },
    { "1.5", -EINVAL, 0 },   /* a fraction needs a suffix, as in qemu */
};

static void test_sizes_promised(void)
{
    for (size_t i = 0; i < sizeof(promised) / sizeof(promised[0]); i++) {
        const size_case *c = &promised[i];
        uint64_t v = 0xdeadbeef;
        int r = vd_parse_size(c->str, &v);
        if (c->ret == 0) {
            CHECK(r == 0 && v == c->value, "vd_parse_size(\"%s\"): r=%d "
                  "value %" PRIu64 ", expected %" PRIu64, c->str, r, v,
                  c->value);
        } else {
            CHECK(r == c->ret, "vd_parse_size(\"%s\") returned %d, expected "
                  "%s", c->str, r, c->ret == -ERANGE ? "-ERANGE" : "-EINVAL");
        }
    }
}

/* Strings given to qemu-img as the referee. Hex with a suffix is left
 * out (qemu-img accepts it with a deprecation warning). "-1" cannot be
 * passed (qemu-img takes it for an option); " -1" covers it. */
static const char *const referee_strings[] = {
    "0", "512", "64k", "64K", "1.5G", "1M", "2T", "1P", "1E", "7E", "8E",
    "4.5E", "1.5e", "8191P", "8192P", "8388607T", "8388608T", "12Q", "",
    "1e3", "0x10", "0X10", "010", "00012", "1.5", "0.5", "0.1", "0.5k",
    "1b", "1B", "1.0b", "1.1b", "1.5b", "1kB", " 1k", "\t1k", "1k ", "1 k",
    "1.k", "1.", ".5k", "1..5k", "1k5", "1.5G5", "+1", "+1k", " -1", "1n",
    "1g", "1m", "1t", "1p", "1.25k", "1.5M", "0.001k", "1.0000001k",
    "1.0009765625k", "9223372036854775807", "9223372036854775808",
    "18446744073709551615", "18446744073709551616",
};

/* Runs qemu-img create -f raw DIR/img STR; returns 1 and *value when it
 * accepted the size, 0 when it rejected it, -1 when the outcome is not
 * recognisable. */
static int qemu_img_size(const char *dir, const char *str, uint64_t *value)
{
    char path[512], out[4096];
    int pipefd[2];
    snprintf(path, sizeof(path), "%s/img", dir);
    if (pipe(pipefd) < 0) {
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        close(pipefd[0]);
        close(pipefd[1]);
        return -1;
    }
    if (pid == 0) {
        dup2(pipefd[1], 1);
        dup2(pipefd[1], 2);
        close(pipefd[0]);
        close(pipefd[1]);
        int devnull = open("/dev/null", O_RDONLY);
        if (devnull >= 0) {
            dup2(devnull, 0);
        }
        execlp("qemu-img", "qemu-img", "create", "-f", "raw", path, str,
               (char *)NULL);
        _exit(127);
    }
    close(pipefd[1]);
    size_t len = 0;
    ssize_t n;
    while ((n = read(pipefd[0], out + len, sizeof(out) - 1 - len)) > 0) {
        len += (size_t)n;
        if (len == sizeof(out) - 1) {
            break;
        }
    }
    out[len] = '\0';
    close(pipefd[0]);
    int status;
    waitpid(pid, &status, 0);
    unlink(path);

    const char *f = strstr(out, "Formatting ");
    const char *s = f ? strstr(f, " size=") : NULL;
    if (s) {
        char *end;
        errno = 0;
        unsigned long long v = strtoull(s + 6, &end, 10);
        if (errno || end == s + 6) {
            return -1;
        }
        *value = v;
        return 1;
    }
    if (strstr(out, "Invalid image size")) {
        return 0;
    }
    fprintf(stderr, "note: qemu-img create with size \"%s\" said: %s\n",
            str, out);
    return -1;
}

static void test_sizes_against_qemu(void)
{
    if (system("qemu-img --version >/dev/null 2>&1") != 0) {
        printf("note: qemu-img not found; skipping the comparison of size "
               "strings with qemu-img\n");
        return;
    }
    char dir[] = "/tmp/vdisk-test-opts.XXXXXX";
    if (!mkdtemp(dir)) {
        CHECK(0, "mkdtemp: %s", strerror(errno));
        return;
    }
    int compared = 0;
    for (size_t i = 0;
         i < sizeof(referee_strings) / sizeof(referee_strings[0]); i++) {
        const char *str = referee_strings[i];
        uint64_t qv = 0, vv = 0;
        int q = qemu_img_size(dir, str, &qv);
        if (q < 0) {
            continue;
        }
        compared++;
        int r = vd_parse_size(str, &vv);
        if (q == 1) {
            CHECK(r == 0 && vv == qv, "vd_parse_size(\"%s\"): r=%d value "
                  "%" PRIu64 "; qemu-img accepts it as %" PRIu64, str, r,
                  vv, qv);
        } else {
            CHECK(r < 0, "vd_parse_size(\"%s\") accepted %" PRIu64
                  "; qemu-img rejects it", str, vv);
        }
    }
    rmdir(dir);
    printf("compared %d size strings with qemu-img\n", compared);
}

int main(void)
{
    test_parse();
    test_set_clone_del();
    test_extract_prefix();
    test_takers();
    test_sizes_promised();
    test_sizes_against_qemu();
    if (failures) {
        fprintf(stderr, "test-opts: %d check(s) failed\n", failures);
        return 1;
    }
    printf("test-opts: all checks passed\n");
    return 0;
}
