/*
 * Unit test for the object registry (src/core/object.c, src/objects/):
 * what the command-line tests cannot see from outside.
 *
 *   - secrets: the bytes vd_secret_get() hands out for inline, base64
 *     (glib's lenient decoding: newlines, missing padding), file and
 *     AES-256-CBC-encrypted data (the cipher text made here with gnutls,
 *     QEMU's padding), and vd_secret_get_utf8()'s check;
 *   - throttle groups: vd_throttle_group_get_limits(), and object-del
 *     refused while a node uses the group (vd_object_find_use());
 *   - authorization: vd_authz_is_allowed() with exact and glob rules, the
 *     first match winning, the default policy, and QEMU's errors;
 *   - the registry: vd_object_add() from vd_opts (dotted keys, list
 *     indices), listing, types, properties, deletion, and threads adding,
 *     reading and deleting at once (for the sanitizer and TSan runs).
 *
 * Each failed check prints the call and what came back; exit 1 if any.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifdef VDISK_HAVE_GNUTLS
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#endif

#include "vdisk/vdisk.h"
#include "core/object.h"

#include "check.h"

/* Adds one --object argument; returns its status, printing errors. */
static int add(const char *arg)
{
    vd_error err = VD_ERROR_INIT;
    int r = vd_object_add_cli(arg, NULL, &err);

    if (r < 0) {
        fprintf(stderr, "  (%s: %s)\n", arg, err.message);
    }
    return r;
}

static void check_secret(const char *id, const char *want, size_t wantlen)
{
    vd_error err = VD_ERROR_INIT;
    unsigned char *data = NULL;
    size_t len = 0;
    int r = vd_secret_get(id, &data, &len, &err);

    CHECK(r == 0, "vd_secret_get(%s) = %d (%s)", id, r, err.message);
    if (r == 0) {
        CHECK(len == wantlen && memcmp(data, want, len) == 0 &&
              data[len] == '\0', "secret %s is '%.*s' (%zu bytes), want "
              "'%s'", id, (int)len, data, len, want);
    }
    free(data);
}

static void b64(const unsigned char *in, size_t len, char *out)
{
    static const char alpha[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;

    for (size_t i = 0; i < len; i += 3) {
        unsigned v = (unsigned)in[i] << 16;
        if (i + 1 < len) {
            v |= (unsigned)in[i + 1] << 8;
        }
        if (i + 2 < len) {
            v |= in[i + 2];
        }
        out[o++] = alpha[(v >> 18) & 63];
        out[o++] = alpha[(v >> 12) & 63];
        out[o++] = i + 1 < len ? alpha[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < len ? alpha[v & 63] : '=';
    }
    out[o] = '\0';
}

static void test_secrets(void)
{
    vd_error err = VD_ERROR_INIT;
    char path[] = "/tmp/vdisk-test-secret-XXXXXX";
    char arg[512];
    char *s;
    int fd;

    CHECK(add("secret,id=s0,data=hello") == 0, "inline secret refused");
    check_secret("s0", "hello", 5);
    CHECK(add("secret,id=s1,data=aGVsbG8gd29ybGQ=,format=base64") == 0,
          "base64 secret refused");
    check_secret("s1", "hello world", 11);
    /* glib's decoder: an incomplete last group is dropped. */
    CHECK(add("secret,id=s2,data=aGVsbG8,format=base64") == 0,
          "unpadded base64 refused");
    check_secret("s2", "hel", 3);
    CHECK(add("{\"qom-type\": \"secret\", \"id\": \"s3\", \"format\": "
              "\"base64\", \"data\": \"aGVs\\nbG8=\"}") == 0,
          "base64 with a newline refused");
    check_secret("s3", "hello", 5);

    fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp");
    if (fd >= 0) {
        CHECK(write(fd, "a\0b", 3) == 3, "write");
        close(fd);
        snprintf(arg, sizeof(arg), "secret,id=f0,file=%s", path);
        CHECK(add(arg) == 0, "file secret refused");
        check_secret("f0", "a\0b", 3);
        /* A NUL byte is not UTF-8 for QEMU's password lookups. */
        s = vd_secret_get_utf8("f0", &err);
        CHECK(!s && strstr(err.message, "is not valid UTF-8"),
              "utf8 of a NUL: %s", err.message);
        free(s);
        vd_error_clear(&err);
        snprintf(arg, sizeof(arg), "secret,id=f1,file=%s,format=base64",
                 path);
        CHECK(vd_object_add_cli(arg, NULL, &err) == -EINVAL &&
              strcmp(err.message, "Base64 data contains embedded NUL "
                     "characters") == 0, "NUL in base64 file: %s",
              err.message);
        unlink(path);
    }
    s = vd_secret_get_utf8("s1", &err);
    CHECK(s && strcmp(s, "hello world") == 0, "utf8: %s", s ? s : "NULL");
    free(s);
    CHECK(add("secret,id=u0,data=w7w=,format=base64") == 0, "ü refused");
    s = vd_secret_get_utf8("u0", &err);
    CHECK(s && strcmp(s, "\xc3\xbc") == 0, "utf8 of ü");
    free(s);
    CHECK(add("secret,id=u1,data=wA==,format=base64") == 0, "0xc0 refused");
    vd_error_clear(&err);
    s = vd_secret_get_utf8("u1", &err);
    CHECK(!s, "0xc0 passed as UTF-8");
    free(s);

    vd_error_clear(&err);
    CHECK(vd_secret_get("nope", &(unsigned char *){ NULL }, &(size_t){ 0 },
                        &err) == -ENOENT &&
          strcmp(err.message, "No secret with id 'nope'") == 0,
          "missing secret: %s", err.message);
    CHECK(add("authz-simple,id=notsecret,identity=x") == 0, "authz refused");
    vd_error_clear(&err);
    CHECK(vd_secret_get("notsecret", &(unsigned char *){ NULL },
                        &(size_t){ 0 }, &err) == -EINVAL &&
          strcmp(err.message, "Object with id 'notsecret' is not a "
                 "secret") == 0, "not a secret: %s", err.message);

#ifdef VDISK_HAVE_GNUTLS
    {
        /* Encrypt "pass phrase" with PKCS#7 padding as QEMU's users do. */
        unsigned char key[32], iv[16], buf[32];
        char key64[64], iv64[32], ct64[64];
        gnutls_cipher_hd_t h;
        gnutls_datum_t k = { key, 32 }, v = { iv, 16 };
        const char *plain = "pass phrase";
        size_t n = strlen(plain), pad = 16 - n % 16;

        for (int i = 0; i < 32; i++) {
            key[i] = (unsigned char)(i * 7 + 1);
        }
        for (int i = 0; i < 16; i++) {
            iv[i] = (unsigned char)(i * 13 + 5);
        }
        memcpy(buf, plain, n);
        memset(buf + n, (int)pad, pad);
        CHECK(gnutls_cipher_init(&h, GNUTLS_CIPHER_AES_256_CBC, &k, &v) == 0,
              "gnutls_cipher_init");
        CHECK(gnutls_cipher_encrypt(h, buf, n + pad) == 0, "encrypt");
        gnutls_cipher_deinit(h);
        b64(key, 32, key64);
        b64(iv, 16, iv64);
        b64(buf, n + pad, ct64);
        snprintf(arg, sizeof(arg), "secret,id=key,data=%s,format=base64",
                 key64);
        CHECK(add(arg) == 0, "key refused");
        snprintf(arg, sizeof(arg), "secret,id=enc,data=%s,format=base64,"
                 "keyid=key,iv=%s", ct64, iv64);
        CHECK(add(arg) == 0, "encrypted secret refused");
        check_secret("enc", plain, n);
        /* qom-get shows the properties, never the plain text. */
        s = vd_object_get_property("enc", "data", &err);
        CHECK(s && strstr(s, ct64), "enc data: %s", s ? s : "NULL");
        free(s);
    }
#endif
}

static void test_throttle(void)
{
    vd_error err = VD_ERROR_INIT;
    vd_throttle_limits l;
    vd_object *use;

    CHECK(add("throttle-group,id=tg,limits.bps-total=1048576,"
              "limits.bps-total-max=2097152,limits.bps-total-max-length=4,"
              "x-iops-read=100,limits.iops-size=4096") == 0,
          "throttle group refused");
    CHECK(vd_throttle_group_get_limits("tg", &l, &err) == 0,
          "get_limits: %s", err.message);
    CHECK(l.bucket[VD_THROTTLE_BPS_TOTAL].avg == 1048576 &&
          l.bucket[VD_THROTTLE_BPS_TOTAL].max == 2097152 &&
          l.bucket[VD_THROTTLE_BPS_TOTAL].burst_length == 4 &&
          l.bucket[VD_THROTTLE_OPS_READ].avg == 100 &&
          l.bucket[VD_THROTTLE_OPS_READ].burst_length == 1 &&
          l.bucket[VD_THROTTLE_OPS_WRITE].avg == 0 && l.op_size == 4096,
          "limits read back wrong");
    vd_error_clear(&err);
    CHECK(vd_throttle_group_get_limits("s0", &l, &err) == -EINVAL,
          "a secret's limits: %s", err.message);

    /* A group in use cannot be deleted; then it can. */
    use = vd_object_find_use("tg", &obj_class_throttle_group, &err);
    CHECK(use != NULL, "find_use: %s", err.message);
    vd_error_clear(&err);
    CHECK(vd_object_del("tg", &err) == -EBUSY &&
          strcmp(err.message, "object 'tg' is in use, can not be "
                 "deleted") == 0, "del in use: %s", err.message);
    vd_object_put_use(use);
    CHECK(vd_object_del("tg", NULL) == 0, "del after use");
}

/* vd_object_del_all() at the end leaves a group in use alone. */
static void test_del_all(void)
{
    vd_object *use;
    char *t;

    CHECK(add("throttle-group,id=busy") == 0, "throttle group refused");
    use = vd_object_find_use("busy", &obj_class_throttle_group, NULL);
    vd_object_del_all();
    t = vd_object_type("busy");
    CHECK(use && t, "del_all removed a group in use");
    free(t);
    vd_object_put_use(use);
    vd_object_del_all();
    CHECK(vd_object_type("busy") == NULL, "del_all left an unused group");
}

static void test_authz(void)
{
    static const struct {
        const char *who;
        int want;
    } cases[] = {
        { "fred", 0 },          /* rule 0: exact deny */
        { "bob", 1 },           /* rule 1: glob bo* */
        { "bo", 1 },
        { "bert", 0 },          /* default deny */
        { "eve-1", 1 },         /* rule 2: e?e-* */
        { "eve-", 1 },
        { "\xc3\xa9" "ve-x", 0 },  /* '?' is one character, not one byte */
        { "\xc3\xa9" "v-x", 0 },
        { "e\xc3\xa9" "e-x", 1 },
        { "", 0 },
    };
    vd_error err = VD_ERROR_INIT;
    vd_opts *o = vd_opts_new();

    CHECK(add("authz-simple,id=as,identity=CN=bob,,O=example") == 0,
          "authz-simple refused");
    CHECK(vd_authz_is_allowed("as", "CN=bob,O=example", &err) == 1,
          "simple allow");
    CHECK(vd_authz_is_allowed("as", "CN=bob", &err) == 0, "simple deny");

    /* From vd_opts, dotted keys and list indices as on a command line. */
    vd_opts_set(o, "policy", "deny");
    vd_opts_set(o, "rules.0.match", "fred");
    vd_opts_set(o, "rules.0.policy", "deny");
    vd_opts_set(o, "rules.1.match", "bo*");
    vd_opts_set(o, "rules.1.policy", "allow");
    vd_opts_set(o, "rules.1.format", "glob");
    vd_opts_set(o, "rules.2.match", "e?e-*");
    vd_opts_set(o, "rules.2.policy", "allow");
    vd_opts_set(o, "rules.2.format", "glob");
    CHECK(vd_object_add("authz-list", "al", o, &err) == 0,
          "authz-list from vd_opts: %s", err.message);
    vd_opts_free(&o);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int r = vd_authz_is_allowed("al", cases[i].who, &err);
        CHECK(r == cases[i].want, "is_allowed(%s) = %d, want %d",
              cases[i].who, r, cases[i].want);
    }
    CHECK(vd_object_set_property("al", "policy", "\"allow\"", &err) == 0,
          "set policy: %s", err.message);
    CHECK(vd_authz_is_allowed("al", "bert", &err) == 1, "default allow");
    CHECK(vd_object_set_property("al", "rules", "[{\"match\": \"x\"}]",
                                 &err) < 0, "bad rules accepted");
    /* A refused rule set leaves the old rules (QEMU would drop them). */
    CHECK(vd_authz_is_allowed("al", "fred", NULL) == 0,
          "rules lost after a failed set");

    vd_error_clear(&err);
    CHECK(vd_authz_is_allowed("nope", "x", &err) == -ENOENT &&
          strcmp(err.message, "Cannot find QAuthZ object ID nope") == 0,
          "missing authz: %s", err.message);
    vd_error_clear(&err);
    CHECK(vd_authz_is_allowed("s0", "x", &err) == -EINVAL &&
          strcmp(err.message, "Object 's0' is not a QAuthZ subclass") == 0,
          "not authz: %s", err.message);
}

static int count_cb(const char *id, const char *type, void *opaque)
{
    (void)id;
    (void)type;
    (*(int *)opaque)++;
    return 0;
}

static int stop_cb(const char *id, const char *type, void *opaque)
{
    (void)type;
    (void)opaque;
    return strcmp(id, "s1") == 0 ? 42 : 0;
}

static void test_registry(void)
{
    vd_error err = VD_ERROR_INIT;
    int n = 0;
    char *t, *v, *help;

    CHECK(vd_object_foreach(count_cb, &n) == 0 && n > 5, "foreach: %d", n);
    CHECK(vd_object_foreach(stop_cb, NULL) == 42, "foreach stop");
    t = vd_object_type("s0");
    CHECK(t && strcmp(t, "secret") == 0, "type of s0: %s", t ? t : "NULL");
    free(t);
    CHECK(vd_object_type("nope") == NULL, "type of nothing");
    n = 0;
    CHECK(vd_object_foreach_property("s0", count_cb, &n, &err) == 0 &&
          n == 7, "secret has %d properties", n);
    v = vd_object_get_property("s0", "format", &err);
    CHECK(v && strcmp(v, "\"raw\"") == 0, "format: %s", v ? v : "NULL");
    free(v);
    CHECK(vd_object_set_property("s0", "loaded", "false", &err) == -EPERM &&
          strstr(err.message, "'secret.loaded' is not writable"),
          "loaded writable: %s", err.message);
    vd_error_clear(&err);
    CHECK(vd_object_add("secret", "s0", NULL, &err) == -EEXIST ||
          vd_error_is_set(&err), "duplicate id");
    vd_error_clear(&err);
    CHECK(vd_object_add_cli("secret,id=h,help", NULL, &err) == -EINVAL,
          "help without a place for it");
    help = NULL;
    CHECK(vd_object_add_cli("secret,id=h,help", &help, &err) == 0 && help &&
          strncmp(help, "secret options:\n  data=<string>\n", 32) == 0,
          "help text: %s", help ? help : "NULL");
    free(help);
    CHECK(vd_object_type("h") == NULL, "help added an object");
    vd_error_clear(&err);
    CHECK(vd_object_add_cli("main-loop,id=m", NULL, &err) == -ENOTSUP,
          "main-loop: %s", err.message);
    CHECK(vd_object_del("s0", NULL) == 0 && vd_object_del("s0", &err) ==
          -ENOENT, "del twice");
}

/* Threads adding, reading and deleting objects of their own while the
 * others do the same. */
static void *worker(void *arg)
{
    int id = (int)(intptr_t)arg;

    for (int i = 0; i < 200; i++) {
        char spec[128], name[32];
        unsigned char *data;
        size_t len;

        snprintf(name, sizeof(name), "w%d-%d", id, i);
        snprintf(spec, sizeof(spec), "secret,id=%s,data=d%d", name, i);
        if (vd_object_add_cli(spec, NULL, NULL) < 0) {
            return (void *)1;
        }
        if (vd_secret_get(name, &data, &len, NULL) < 0) {
            return (void *)2;
        }
        free(data);
        free(vd_object_get_property("s1", "format", NULL));
        vd_object_foreach(count_cb, &(int){ 0 });
        if (vd_object_del(name, NULL) < 0) {
            return (void *)3;
        }
    }
    return NULL;
}

static void test_threads(void)
{
    pthread_t th[4];

    for (int i = 0; i < 4; i++) {
        pthread_create(&th[i], NULL, worker, (void *)(intptr_t)i);
    }
    for (int i = 0; i < 4; i++) {
        void *r;
        pthread_join(th[i], &r);
        CHECK(r == NULL, "worker %d failed at step %d", i, (int)(intptr_t)r);
    }
}

int main(void)
{
    test_secrets();
    test_throttle();
    test_authz();
    test_registry();
    test_threads();
    test_del_all();
    TEST_EXIT("test-object");
}
