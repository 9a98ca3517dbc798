#!/usr/bin/env python3
# vdisk's Python bindings: internal snapshots (tests/unit/
# test-snapshot.c's single-node rules: create, list, find by id and by
# name, goto, load_tmp only on a read-only node, delete by id or name,
# the refusals with their errno and message), checked against qemu-img
# snapshot -l and qemu-io on the same image.
import errno
import os
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers  # noqa: E402
import vdisk  # noqa: E402

MiB = 1 << 20


class SnapshotTest(helpers.TmpDirCase):

    def setUp(self):
        super().setUp()
        helpers.need("qemu-img", "qemu-io")
        self.img = self.path("s.qcow2")
        vdisk.create(self.img, "qcow2", size=4 * MiB)

    def test_create_list_goto_delete(self):
        with vdisk.open(self.img, read_only=False) as n:
            n.write(b"\x01" * MiB, 0)
            n.snapshot_create("s1")
            n.write(b"\x02" * MiB, 0)
            n.snapshot_create("s2", id="7")
            n.write(b"\x03" * MiB, 0)
            snaps = n.snapshot_list()
            self.assertEqual([(s["id"], s["name"]) for s in snaps],
                             [("1", "s1"), ("7", "s2")])
            self.assertGreater(snaps[0]["date_sec"], 0)
            self.assertEqual(n.snapshot_find(name="s2")["id"], "7")
            self.assertEqual(n.snapshot_find(id="1")["name"], "s1")
            self.assertIsNone(n.snapshot_find(id="1", name="s2"))
            self.assertRaises(TypeError, n.snapshot_find)
        out = helpers.run("qemu-img", "snapshot", "-l", self.img)
        self.assertRegex(out, r"\n1\s+s1\s")
        self.assertRegex(out, r"\n7\s+s2\s")
        # qemu-img convert -l reads a snapshot's content: s1 holds what
        # was written before it.
        helpers.run("qemu-img", "convert", "-l", "snapshot.name=s1", "-O",
                    "raw", self.img, self.path("s1.raw"))
        with open(self.path("s1.raw"), "rb") as f:
            self.assertEqual(f.read(MiB), b"\x01" * MiB)

        with vdisk.open(self.img, read_only=False) as n:
            n.snapshot_goto("s2")
            self.assertEqual(n.read(0, MiB), b"\x02" * MiB)
            n.snapshot_goto("1")
            self.assertEqual(n.read(0, MiB), b"\x01" * MiB)
            self.assertVdiskErrorNames(n)
            n.snapshot_delete(name="s1")
            n.snapshot_delete(id="7")
            self.assertEqual(n.snapshot_list(), [])
        self.assertEqual(helpers.run("qemu-img", "snapshot", "-l",
                                     self.img).strip(), "")
        helpers.qemu_io(self.img, "qcow2", "read -P 1 0 1M")

    def assertVdiskErrorNames(self, n):
        self.assertVdiskError(errno.ENOENT, "", n.snapshot_goto, "nosuch")
        self.assertVdiskError(errno.ENOENT, "", n.snapshot_delete,
                              name="zz")
        self.assertRaises(TypeError, n.snapshot_delete)
        # load_tmp is for read-only nodes (the C API's message).
        self.assertVdiskError(errno.EINVAL, "Device is not readonly",
                              n.snapshot_load_tmp, "s1")

    def test_read_only_rules(self):
        helpers.run("qemu-img", "snapshot", "-c", "q1", self.img)
        helpers.run("qemu-io", "-f", "qcow2", "-c", "write -P 9 0 64k",
                    self.img)
        with vdisk.open(self.img) as n:
            self.assertEqual([s["name"] for s in n.snapshot_list()], ["q1"])
            self.assertVdiskError(errno.EROFS, "", n.snapshot_create, "x")
            self.assertVdiskError(errno.ENOENT, "", n.snapshot_load_tmp,
                                  "nope")
            self.assertEqual(n.read(0, 4), b"\x09" * 4)
            n.snapshot_load_tmp("q1")
            self.assertEqual(n.read(0, 65536), bytes(65536))

    def test_goto_refused_with_bitmaps(self):
        with vdisk.open(self.img, read_only=False) as n:
            n.snapshot_create("s1")
            n.bitmap_add("b")
            self.assertVdiskError(errno.EBUSY,
                                  "Device has active dirty bitmaps",
                                  n.snapshot_goto, "s1")
            n.bitmap_remove("b")
            n.snapshot_goto("s1")

    def test_exclusive_against_other_threads(self):
        """A snapshot (like a truncate) must not race the caller's own
        requests (include/vdisk/vdisk.h): while another Python thread
        has a read in flight it is refused with EBUSY, and while it runs
        that thread's reads are refused, never run alongside."""
        with vdisk.open(self.img, read_only=False) as n:
            n.write(b"\x01" * MiB, 0)
            # Each snapshot is tried a bounded number of times while the
            # reader runs; then the reader is paused between two calls
            # and the snapshot must go through. Retrying until it slips
            # between two reads could spin for minutes on a loaded
            # machine.
            stop, pause, paused = (threading.Event(), threading.Event(),
                                   threading.Event())
            errors, busy = [], []

            def reader():
                while not stop.is_set():
                    if pause.is_set():
                        paused.set()        # outside any call
                        time.sleep(0.001)
                        continue
                    try:
                        self.assertEqual(n.read(0, MiB)[:1], b"\x01")
                    except vdisk.Error as e:
                        busy.append(e.errno)
                    except Exception as e:  # noqa: BLE001
                        errors.append(e)

            t = threading.Thread(target=reader)
            t.start()
            refused = []
            try:
                for k in range(5):
                    done = False
                    for _ in range(20):
                        try:
                            n.snapshot_create("t%d" % k)
                            done = True
                            break
                        except vdisk.Error as e:
                            refused.append(e.errno)
                            time.sleep(0.0005)
                    if not done:
                        paused.clear()
                        pause.set()
                        self.assertTrue(paused.wait(30))
                        n.snapshot_create("t%d" % k)
                        pause.clear()
            finally:
                stop.set()
                t.join()
            self.assertEqual(errors, [])
            self.assertTrue(all(e == errno.EBUSY for e in refused + busy))
            self.assertEqual(len(n.snapshot_list()), 5)
        out = helpers.run("qemu-img", "check", self.img)
        self.assertIn("No errors", out)

    def test_raw_has_no_snapshots(self):
        p = self.path("r.raw")
        vdisk.create(p, "raw", size=MiB)
        with vdisk.open(p, read_only=False, fmt="raw") as n:
            with self.assertRaises(vdisk.Error) as cm:
                n.snapshot_create("s")
            self.assertEqual(cm.exception.errno, errno.ENOTSUP)


if __name__ == "__main__":
    unittest.main()
