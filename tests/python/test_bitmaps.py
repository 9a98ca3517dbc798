#!/usr/bin/env python3
# vdisk's Python bindings: named dirty bitmaps (tests/unit/
# test-bitmap.c's named cases: add with the default and a given
# granularity, the refusals with QEMU's messages, writes, zero writes and
# discards marking the enabled bitmaps only, the dirty extents, merge from
# this and another node, all or nothing, clear, enable and disable, the
# list newest first), and a persistent bitmap that qemu-img info then
# lists in the image.
import errno
import json
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers  # noqa: E402
import vdisk  # noqa: E402

MiB = 1 << 20
KiB = 1024


class BitmapTest(helpers.TmpDirCase):

    def setUp(self):
        super().setUp()
        helpers.need("qemu-img")
        self.img = self.path("b.qcow2")
        vdisk.create(self.img, "qcow2", size=4 * MiB,
                     options={"cluster_size": 16384})

    def test_named(self):
        with vdisk.open(self.img, read_only=False,
                        options={"discard": "unmap"}) as n:
            self.assertEqual(n.bitmap_default_granularity, 16384)
            self.assertTrue(n.bitmap_supports_persistent)
            n.bitmap_add("a")
            n.bitmap_add("d", 512, disabled=True)
            self.assertVdiskError(errno.EEXIST, "Bitmap already exists: a",
                                  n.bitmap_add, "a")
            self.assertVdiskError(errno.EINVAL,
                                  "Bitmap name cannot be empty",
                                  n.bitmap_add, "")
            self.assertVdiskError(errno.EINVAL, "Granularity must be power "
                                  "of 2 and at least 512", n.bitmap_add,
                                  "g", 1000)
            self.assertVdiskError(errno.ENOENT,
                                  "Dirty bitmap 'nope' not found",
                                  n.bitmap_clear, "nope")

            n.write(b"\x01" * 10, 1000)
            n.zero(100000, 70000)
            n.discard(3 * MiB, 16384)
            self.assertEqual(n.bitmap_info("a")["count"],
                             16384 + 5 * 16384 + 16384)
            self.assertEqual(n.bitmap_info("d")["count"], 0)
            self.assertEqual(n.bitmap_dirty("a"),
                             [(0, 16384), (98304, 5 * 16384),
                              (3 * MiB, 16384)])
            self.assertEqual(n.bitmap_dirty("a", 16384)[0],
                             (98304, 5 * 16384))

            # Merge: this node's and another node's bitmaps, all or
            # nothing.
            other = self.path("o.qcow2")
            vdisk.create(other, "qcow2", size=4 * MiB)
            with vdisk.open(other, read_only=False) as o:
                o.bitmap_add("x", 65536)
                o.write(b"\x02" * 512, 2 * MiB)
                self.assertVdiskError(errno.ENOENT,
                                      "Dirty bitmap 'nope' not found",
                                      n.bitmap_merge, "d",
                                      ["a", (o, "x"), "nope"])
                self.assertEqual(n.bitmap_info("d")["count"], 0)
                n.bitmap_merge("d", ["a", (o, "x")])
                self.assertEqual(n.bitmap_info("d")["count"],
                                 7 * 16384 + 65536)
                self.assertRaises(TypeError, n.bitmap_merge, "d", [42])

            lst = n.bitmap_list()
            self.assertEqual([b["name"] for b in lst], ["d", "a"])
            self.assertFalse(lst[0]["recording"])
            self.assertEqual(lst[0]["granularity"], 512)
            self.assertTrue(lst[1]["recording"])

            n.bitmap_disable("a")
            n.write(b"\x03" * 512, 2 * MiB)
            self.assertNotIn(2 * MiB, [s for s, _ in n.bitmap_dirty("a")])
            n.bitmap_enable("a")
            n.write(b"\x03" * 512, 2 * MiB)
            self.assertIn((2 * MiB, 16384), n.bitmap_dirty("a"))
            try:
                h1 = n.bitmap_sha256("a")
                n.bitmap_clear("a")
                self.assertNotEqual(h1, n.bitmap_sha256("a"))
                self.assertEqual(len(h1), 64)
            except vdisk.Error as e:
                self.assertEqual(e.errno, errno.ENOTSUP)   # no gnutls
                n.bitmap_clear("a")
            self.assertEqual(n.bitmap_dirty("a"), [])
            n.bitmap_remove("a")
            n.bitmap_remove("d")
            self.assertEqual(n.bitmap_list(), [])

    def test_persistent_seen_by_qemu_img(self):
        with vdisk.open(self.img, read_only=False) as n:
            n.bitmap_add("p", 65536, persistent=True)
            n.write(b"\x05" * 4096, 0)
        info = json.loads(helpers.run("qemu-img", "info", "--output=json",
                                      self.img))
        bms = info["format-specific"]["data"]["bitmaps"]
        self.assertEqual([(b["name"], b["granularity"]) for b in bms],
                         [("p", 65536)])
        with vdisk.open(self.img) as n:
            b = n.bitmap_info("p")
            self.assertTrue(b["persistent"] and b["readonly"])
            self.assertEqual(n.bitmap_dirty("p"), [(0, 65536)])
            self.assertVdiskError(errno.EPERM, "", n.bitmap_clear, "p")

    def test_raw_cannot_persist(self):
        p = self.path("r.raw")
        vdisk.create(p, "raw", size=MiB)
        with vdisk.open(p, read_only=False, fmt="raw") as n:
            self.assertFalse(n.bitmap_supports_persistent)
            e = self.assertVdiskError(errno.ENOTSUP, "Can't store persistent "
                                      "bitmaps", n.bitmap_add, "p",
                                      persistent=True)
            self.assertIn("Operation not supported", e.message)


if __name__ == "__main__":
    unittest.main()
