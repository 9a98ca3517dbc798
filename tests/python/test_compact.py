#!/usr/bin/env python3
# vdisk's Python bindings: Node.compact() (vd_compact(); tests/unit/
# test-compact-session.c's cases from Python): a compaction in the
# session that wrote the image (lazy refcounts, so the session marked it
# dirty) succeeds, the file shrinks, every byte reads the same before,
# after and after a reopen, and qemu-img check finds the image clean and
# qemu-img compare equal to a raw copy taken before; a dry run reports
# the same plan and leaves the file byte-identical; the progress
# callback sees rising percentages up to 100, and an exception it raises
# comes out after the compaction ended (the image still good); the
# refusals (read-only node, a format without compaction, bitmaps loaded
# in memory) with their errno and message, nothing written.
import errno
import hashlib
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers  # noqa: E402
import vdisk  # noqa: E402

MiB = 1 << 20
SIZE = 16 * MiB


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class CompactTest(helpers.TmpDirCase):

    def setUp(self):
        super().setUp()
        helpers.need("qemu-img")
        self.img = self.path("c.qcow2")
        vdisk.create(self.img, "qcow2", size=SIZE,
                     options={"lazy_refcounts": True})

    def fill_and_punch(self, n):
        """Every MiB written with its own pattern, every other one
        discarded: half the file's clusters become holes in the middle."""
        for i in range(SIZE // MiB):
            n.write(bytes([i + 1]) * MiB, i * MiB)
        for i in range(0, SIZE // MiB, 2):
            n.discard(i * MiB, MiB)

    def test_in_the_writing_session(self):
        with vdisk.open(self.img, read_only=False) as n:
            self.fill_and_punch(n)
            n.flush()
            before = n.read(0, SIZE)
            size_before = os.path.getsize(self.img)
            seen = []
            res = n.compact(progress=seen.append)
            self.assertEqual(res["original_size"], size_before)
            self.assertLess(res["new_size"], size_before)
            self.assertGreater(res["moved_clusters"], 0)
            self.assertEqual(res["cluster_size"], 65536)
            self.assertEqual(n.read(0, SIZE), before)
            self.assertTrue(seen, "no progress reported")
            self.assertEqual(seen, sorted(seen))
            self.assertEqual(seen[-1], 100.0)
        self.assertEqual(os.path.getsize(self.img), res["new_size"])
        with vdisk.open(self.img) as n:
            self.assertEqual(n.read(0, SIZE), before)
        helpers.run("qemu-img", "check", self.img)
        raw = self.path("before.raw")
        with open(raw, "wb") as f:
            f.write(before)
        helpers.run("qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                    self.img, raw)

    def test_dry_run_writes_nothing(self):
        with vdisk.open(self.img, read_only=False) as n:
            self.fill_and_punch(n)
        digest = sha256(self.img)
        with vdisk.open(self.img) as n:
            plan = n.compact(dry_run=True)
        self.assertEqual(sha256(self.img), digest)
        self.assertLess(plan["new_size"], plan["original_size"])
        with vdisk.open(self.img, read_only=False) as n:
            done = n.compact()
        self.assertEqual(done, plan)

    def test_progress_exception_after_the_end(self):
        with vdisk.open(self.img, read_only=False) as n:
            self.fill_and_punch(n)
            before = n.read(0, SIZE)

            def progress(percent):
                raise KeyError("stop")

            with self.assertRaises(KeyError):
                n.compact(progress=progress)
            self.assertEqual(n.read(0, SIZE), before)
        self.assertLess(os.path.getsize(self.img), SIZE)
        helpers.run("qemu-img", "check", self.img)

    def test_refusals(self):
        with vdisk.open(self.img, read_only=False) as n:
            self.fill_and_punch(n)
            self.assertRaises(TypeError, n.compact, progress=3)
            n.bitmap_add("b", persistent=True)
        digest = sha256(self.img)
        size = os.path.getsize(self.img)
        with vdisk.open(self.img) as n:
            self.assertVdiskError(errno.EROFS, "image is read-only",
                                  n.compact)
        self.assertEqual(sha256(self.img), digest)
        # A read-write open itself marks the loaded bitmaps in use and
        # stores them at close (as QEMU does): the file changes, but
        # nothing is compacted.
        with vdisk.open(self.img, read_only=False) as n:
            self.assertVdiskError(errno.EBUSY, "VD_O_NO_BITMAPS", n.compact)
        self.assertEqual(os.path.getsize(self.img), size)
        with vdisk.open(self.img, read_only=False, no_bitmaps=True) as n:
            self.assertGreater(n.compact()["moved_clusters"], 0)
        helpers.run("qemu-img", "check", self.img)
        out = helpers.run("qemu-img", "info", self.img)
        self.assertIn("name: b", out)
        raw = self.path("r.raw")
        vdisk.create(raw, "raw", size=MiB)
        with vdisk.open(raw, read_only=False, fmt="raw") as n:
            self.assertVdiskError(errno.ENOTSUP, "Format 'raw' does not "
                                  "support compaction", n.compact)


if __name__ == "__main__":
    unittest.main()
