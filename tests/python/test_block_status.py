#!/usr/bin/env python3
# vdisk's Python bindings: block_status() walks a range as extents
# (offset, length, flags) with depth and host offset, and over a backing
# chain, merged as qemu-img map merges, equals qemu-img map --output=json
# on the same image (tests/unit/test-core.c's block status cases, with
# QEMU as the referee).
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers  # noqa: E402
import vdisk  # noqa: E402

MiB = 1 << 20


class BlockStatusTest(helpers.TmpDirCase):

    def setUp(self):
        super().setUp()
        helpers.need("qemu-img", "qemu-io")

    def test_extents_cover_the_range(self):
        p = self.path("a.qcow2")
        vdisk.create(p, "qcow2", size=4 * MiB)
        helpers.run("qemu-io", "-f", "qcow2", "-c", "write -P 1 64k 64k",
                    "-c", "write -z 1M 64k", p)
        with vdisk.open(p) as n:
            ext = list(n.block_status())
            self.assertEqual(ext[0].offset, 0)
            pos = 0
            for e in ext:
                off, length, flags = e      # unpacks as a 3-tuple
                self.assertEqual(off, pos)
                self.assertGreater(length, 0)
                pos += length
            self.assertEqual(pos, 4 * MiB)
            data = [e for e in ext if e.flags & vdisk.BLOCK_DATA]
            self.assertEqual([(e.offset, e.length) for e in data],
                             [(64 * 1024, 64 * 1024)])
            self.assertTrue(data[0].flags & vdisk.BLOCK_ALLOCATED)
            self.assertTrue(data[0].flags & vdisk.BLOCK_OFFSET_VALID)
            self.assertIsNotNone(data[0].host_offset)
            self.assertEqual(data[0].depth, 0)
            # A sub-range starts where asked and ends where asked.
            sub = list(n.block_status(100 * 1024, 1 * MiB))
            self.assertEqual(sub[0].offset, 100 * 1024)
            self.assertEqual(sum(e.length for e in sub), 1 * MiB)
            self.assertEqual(list(n.block_status(4 * MiB)), [])
            self.assertRaises(vdisk.Error, n.block_status, 4 * MiB, 1)
            self.assertEqual(helpers.merged_map(n),
                             helpers.qemu_map_comparable(p, "qcow2"))

    def test_chain_equals_qemu_img_map(self):
        base, top = self.path("base.qcow2"), self.path("top.qcow2")
        vdisk.create(base, "qcow2", size=4 * MiB)
        vdisk.create(top, "qcow2", options={"backing_file": base,
                                            "backing_fmt": "qcow2"})
        helpers.run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M",
                    "-c", "write -z 2M 512k", base)
        with vdisk.open(top, read_only=False) as n:
            self.assertEqual(n.size, 4 * MiB)
            self.assertEqual(n.backing.format, "qcow2")
            n.write(b"\x02" * 65536, 512 * 1024)
            n.zero(3 * MiB, 128 * 1024)
        with vdisk.open(top) as n:
            got = helpers.merged_map(n)
            self.assertIn(1, [e.depth for e in n.block_status()])
        self.assertEqual(got, helpers.qemu_map_comparable(top, "qcow2"))

    def test_raw_file(self):
        p = self.path("r.raw")
        vdisk.create(p, "raw", size=2 * MiB)
        with vdisk.open(p, read_only=False, fmt="raw") as n:
            n.write(b"\x09" * 4096, 1 * MiB)
        with vdisk.open(p, fmt="raw") as n:
            got = helpers.merged_map(n)
        self.assertEqual(got, helpers.qemu_map_comparable(p, "raw"))


if __name__ == "__main__":
    unittest.main()
