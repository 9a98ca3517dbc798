/*
 * Unit tests for qcow2 internal snapshots through the library API: the
 * fields of a table entry survive a reopen (64-bit VM-state size, clocks,
 * icount, explicit ids), ids are allocated as QEMU does, unknown extra
 * data written by a newer program is kept when the table is rewritten,
 * the VM-state area round-trips through a snapshot, load_tmp shows the
 * snapshot read-only, and the refusals give their errno.
 *
 * Each test works on a fresh image in a scratch directory; helpers first,
 * then one function per behaviour, then main().
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/block_int.h"

#include "check.h"

static char dir[] = "/tmp/vdisk-qsnap-XXXXXX";
static char path[256];

static vd_node *open_img(unsigned flags)
{
    vd_node *n = NULL;
    vd_error err = VD_ERROR_INIT;
    int r = vd_open(&n, path, "qcow2", NULL, flags | VD_O_QUIET, &err);
    CHECK(r == 0, "open %s: %s", path, err.message);
    return n;
}

static void fresh(const char *cluster_size)
{
    vd_opts *o = vd_opts_new();
    vd_error err = VD_ERROR_INIT;
    snprintf(path, sizeof(path), "%s/t.qcow2", dir);
    unlink(path);
    vd_opts_set(o, "size", "4M");
    vd_opts_set(o, "cluster_size", cluster_size);
    CHECK(vd_create(path, "qcow2", o, &err) == 0, "create: %s", err.message);
    vd_opts_free(&o);
}

static void fill(vd_node *n, int byte, uint64_t off, uint64_t len)
{
    uint8_t *buf = malloc(len);
    memset(buf, byte, len);
    CHECK(vd_pwrite(n, buf, len, off, 0, NULL) == 0, "write at %llu",
          (unsigned long long)off);
    free(buf);
}

static bool holds(vd_node *n, int byte, uint64_t off, uint64_t len)
{
    uint8_t *buf = malloc(len);
    bool ok = vd_pread(n, buf, len, off, 0, NULL) == 0;
    for (uint64_t i = 0; ok && i < len; i++) {
        ok = buf[i] == byte;
    }
    free(buf);
    return ok;
}

static void test_fields(void)
{
    vd_snapshot_info sn = { 0 }, *list = NULL;
    vd_error err = VD_ERROR_INIT;
    size_t n = 0;
    vd_node *node;

    fresh("65536");
    node = open_img(VD_O_RDWR);
    sn.name = "big";
    sn.vm_state_size = 5ull << 30;    /* needs the 64-bit field */
    sn.date_sec = 1234567890;
    sn.date_nsec = 987654321;
    sn.vm_clock_nsec = 3723004000000ull;
    sn.icount = UINT64_MAX;
    CHECK(vd_snapshot_create(node, &sn, &err) == 0, "%s", err.message);
    sn.name = "explicit";
    sn.id = "42";
    sn.icount = 7;
    CHECK(vd_snapshot_create(node, &sn, &err) == 0, "%s", err.message);
    CHECK(vd_snapshot_create(node, &sn, NULL) == -EEXIST, "duplicate id");
    sn.id = NULL;
    sn.name = "next";
    CHECK(vd_snapshot_create(node, &sn, &err) == 0, "%s", err.message);
    vd_close(&node, NULL);

    node = open_img(0);
    CHECK(vd_snapshot_list(node, &list, &n, &err) == 0, "%s", err.message);
    CHECK(n == 3, "%zu snapshots", n);
    if (n == 3) {
        CHECK(strcmp(list[0].id, "1") == 0, "id %s", list[0].id);
        CHECK(list[0].vm_state_size == 5ull << 30, "vm state size");
        CHECK(list[0].date_sec == 1234567890 &&
              list[0].date_nsec == 987654321, "date");
        CHECK(list[0].vm_clock_nsec == 3723004000000ull, "vm clock");
        CHECK(list[0].icount == UINT64_MAX, "icount not recorded");
        CHECK(list[0].disk_size == 4u << 20, "disk size");
        CHECK(strcmp(list[1].id, "42") == 0 && list[1].icount == 7, "id 42");
        CHECK(strcmp(list[2].id, "43") == 0, "next id %s", list[2].id);
    }
    vd_snapshot_list_free(&list, n);
    CHECK(vd_snapshot_goto(node, "1", NULL) == -EROFS, "goto read-only");
    vd_close(&node, NULL);
}

/* Rewrites entry 0 of the table with 8 more bytes of extra data at the
 * end of the file (the old table leaks, which this test ignores; the new
 * one is counted in the refcount block, or vdisk rightly refuses to
 * write next to a table the allocator would consider free). */
static void add_unknown_extra(void)
{
    FILE *f = fopen(path, "r+b");
    uint8_t hdr[12], ent[40 + 24 + 64];
    uint64_t off;
    uint32_t extra;
    long end;

    fseek(f, 60, SEEK_SET);
    CHECK(fread(hdr, 1, 12, f) == 12, "header");
    memcpy(&off, hdr + 4, 8);
    off = be64toh(off);
    fseek(f, (long)off, SEEK_SET);
    memset(ent, 0, sizeof(ent));
    CHECK(fread(ent, 1, sizeof(ent), f) >= 64 + 4, "entry");
    memcpy(&extra, ent + 36, 4);
    extra = be32toh(extra);
    CHECK(extra == 24, "extra %u", extra);
    uint16_t idl, nml;
    memcpy(&idl, ent + 12, 2);
    idl = be16toh(idl);
    memcpy(&nml, ent + 14, 2);
    nml = be16toh(nml);
    uint8_t out[40 + 32 + 64];
    memcpy(out, ent, 40 + 24);
    memcpy(out + 64, "UNKNOWN!", 8);
    memcpy(out + 72, ent + 64, idl + nml);
    { uint32_t v_ = htobe32(32); memcpy(out + 36, &v_, sizeof(v_)); }
    fseek(f, 0, SEEK_END);
    end = (ftell(f) + 65535) & ~65535L;
    fseek(f, end, SEEK_SET);
    fwrite(out, 1, 72 + idl + nml, f);
    /* keep the file a whole number of clusters */
    fseek(f, end + 65535, SEEK_SET);
    fputc(0, f);
    { uint32_t v_ = htobe32(1); memcpy(hdr, &v_, sizeof(v_)); }
    { uint64_t v_ = htobe64((uint64_t)end); memcpy(hdr + 4, &v_, sizeof(v_)); }
    fseek(f, 60, SEEK_SET);
    fwrite(hdr, 1, 12, f);
    {
        /* qemu-img's layout: refcount table at 64k, its first block (16-bit
         * entries) where the table's first entry says. */
        uint64_t rb;
        uint16_t one = htobe16(1);
        fseek(f, 65536, SEEK_SET);
        CHECK(fread(&rb, 1, 8, f) == 8, "refcount table");
        fseek(f, (long)(be64toh(rb) + 2 * ((uint64_t)end >> 16)), SEEK_SET);
        fwrite(&one, 1, 2, f);
    }
    fclose(f);
}

static void test_unknown_extra(void)
{
    vd_node *node;
    vd_error err = VD_ERROR_INIT;
    char buf[1 << 16];
    size_t got;
    FILE *f;

    fresh("65536");
    node = open_img(VD_O_RDWR);
    CHECK(vd_snapshot_create_simple(node, "old", &err) == 0, "%s",
          err.message);
    vd_close(&node, NULL);
    add_unknown_extra();
    node = open_img(VD_O_RDWR);
    CHECK(vd_snapshot_create_simple(node, "new", &err) == 0, "%s",
          err.message);
    vd_close(&node, NULL);
    f = fopen(path, "rb");
    got = 0;
    bool found = false;
    while ((got = fread(buf, 1, sizeof(buf), f)) > 0 && !found) {
        found = memmem(buf, got, "UNKNOWN!1old", 12) != NULL;
    }
    fclose(f);
    CHECK(found, "unknown extra data was not kept");
}

static void test_vmstate_and_load_tmp(void)
{
    vd_snapshot_info sn = { 0 };
    vd_error err = VD_ERROR_INIT;
    uint8_t state[100000], back[100000];
    vd_node *node;

    for (size_t i = 0; i < sizeof(state); i++) {
        state[i] = (uint8_t)(i * 7 + 3);
    }
    fresh("512");
    node = open_img(VD_O_RDWR);
    fill(node, 0x11, 0, 1 << 20);
    CHECK(vd_save_vmstate(node, state, sizeof(state), 0, &err) == 0, "%s",
          err.message);
    sn.name = "vm";
    sn.vm_state_size = sizeof(state);
    CHECK(vd_snapshot_create(node, &sn, &err) == 0, "%s", err.message);
    /* The active state no longer holds it... */
    CHECK(vd_load_vmstate(node, back, sizeof(back), 0, NULL) == 0, "load");
    CHECK(memcmp(back, state, sizeof(state)) != 0, "VM state kept active");
    fill(node, 0x22, 0, 2 << 20);
    /* ...the snapshot does. */
    CHECK(vd_snapshot_goto(node, "vm", &err) == 0, "%s", err.message);
    CHECK(vd_load_vmstate(node, back, sizeof(back), 0, &err) == 0, "%s",
          err.message);
    CHECK(memcmp(back, state, sizeof(state)) == 0, "VM state differs");
    CHECK(holds(node, 0x11, 0, 1 << 20) && holds(node, 0, 1 << 20, 1 << 20),
          "content after goto");
    fill(node, 0x33, 0, 4096);
    CHECK(vd_snapshot_load_tmp(node, NULL, "vm", NULL) == -EINVAL,
          "load_tmp on a writable node");
    vd_close(&node, NULL);

    node = open_img(0);
    CHECK(vd_snapshot_load_tmp(node, NULL, "nosuch", NULL) == -ENOENT,
          "load_tmp of a missing snapshot");
    CHECK(holds(node, 0x33, 0, 4096), "active content");
    CHECK(vd_snapshot_load_tmp_by_id_or_name(node, "vm", &err) == 0, "%s",
          err.message);
    CHECK(holds(node, 0x11, 0, 4096), "snapshot content via load_tmp");
    vd_close(&node, NULL);

    node = open_img(VD_O_RDWR);
    CHECK(vd_snapshot_delete(node, NULL, "nosuch", NULL) == -ENOENT,
          "delete missing");
    CHECK(vd_snapshot_delete(node, "1", NULL, &err) == 0, "%s", err.message);
    CHECK(vd_snapshot_find(node, NULL, "vm", NULL, NULL) == 0, "deleted");
    vd_close(&node, NULL);

    vd_check_result res;
    node = open_img(VD_O_CHECK);
    CHECK(vd_check(node, &res, 0, &err) == 0, "%s", err.message);
    CHECK(res.corruptions == 0 && res.leaks == 0, "check: %lld corruptions, "
          "%lld leaks", (long long)res.corruptions, (long long)res.leaks);
    vd_close(&node, NULL);
}

int main(void)
{
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 77;
    }
    test_fields();
    test_unknown_extra();
    test_vmstate_and_load_tmp();
    unlink(path);
    rmdir(dir);
    TEST_EXIT("test-qcow2-snapshot");
}
