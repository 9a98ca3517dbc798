#!/usr/bin/env python3
# vdisk's Python bindings: opening, reading, writing, zeroing,
# discarding, flushing, resizing and closing, the C API's cases
# (tests/unit/test-core.c: unaligned read-modify-write, range and
# read-only refusals, zero writes with and without unmap, FUA, node names)
# through the module, and errors carrying the errno and the library's
# message. What Python wrote is read back by qemu-io (read -P) and the
# images compared by qemu-img.
import errno
import os
import sys
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers  # noqa: E402
import vdisk  # noqa: E402

MiB = 1 << 20


class IOTest(helpers.TmpDirCase):

    def setUp(self):
        super().setUp()
        helpers.need("qemu-img", "qemu-io")

    def make(self, name, fmt="qcow2", size=4 * MiB, options=None):
        p = self.path(name)
        vdisk.create(p, fmt, size=size, options=options)
        return p

    def test_write_read_back_by_qemu_io(self):
        for fmt in ("qcow2", "raw"):
            p = self.make("a." + fmt, fmt)
            with vdisk.open(p, read_only=False, fmt=fmt) as n:
                self.assertEqual(n.size, 4 * MiB)
                self.assertEqual(n.format, fmt)
                self.assertFalse(n.read_only)
                n.write(b"\xab" * 65536, 0)
                n.write(bytearray(b"\xcd" * 4096), 1 * MiB, fua=True)
                n.write(memoryview(b"\xef" * 512), 2 * MiB + 512)
                n.flush()
                self.assertEqual(n.read(0, 65536), b"\xab" * 65536)
                self.assertEqual(n.read(2 * MiB, 1024),
                                 bytes(512) + b"\xef" * 512)
            self.assertTrue(n.closed)
            helpers.qemu_io(p, fmt, "read -P 0xab 0 64k",
                            "read -P 0xcd 1M 4k", "read -P 0 2M 512",
                            "read -P 0xef 2097664 512", "read -P 0 3M 1M")

    def test_read_what_qemu_io_wrote(self):
        p = self.make("q.qcow2")
        helpers.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 64k 128k",
                    p)
        with vdisk.open(p, fmt="qcow2") as n:
            self.assertTrue(n.read_only)
            self.assertEqual(n.read(64 * 1024, 128 * 1024),
                             b"\x5a" * 128 * 1024)
            buf = bytearray(8192)
            n.pread_into(buf, 60 * 1024)
            self.assertEqual(bytes(buf), bytes(4096) + b"\x5a" * 4096)
            # A memoryview slice is filled in place, no copy.
            big = bytearray(16)
            n.pread_into(memoryview(big)[4:12], 64 * 1024)
            self.assertEqual(bytes(big), bytes(4) + b"\x5a" * 8 + bytes(4))

    def test_unaligned_rmw(self):
        """test-core.c's unaligned read-modify-write: odd offsets and
        lengths across sector and cluster boundaries keep the bytes
        around them."""
        p = self.make("u.qcow2", options={"cluster_size": 4096})
        with vdisk.open(p, read_only=False) as n:
            n.write(b"\x11" * 20000, 0)
            n.write(b"\x22" * 777, 4095)
            n.write(b"\x33" * 3, 511)
            data = n.read(0, 20000)
        model = bytearray(b"\x11" * 20000)
        model[4095:4095 + 777] = b"\x22" * 777
        model[511:514] = b"\x33" * 3
        self.assertEqual(data, bytes(model))
        helpers.qemu_io(p, "qcow2", "read -P 0x11 0 511",
                        "read -P 0x33 511 3", "read -P 0x11 514 3581",
                        "read -P 0x22 4095 777", "read -P 0x11 4872 15128")

    def test_zero_and_discard(self):
        p = self.make("z.qcow2")
        with vdisk.open(p, read_only=False, options={"discard": "unmap"}) \
                as n:
            n.write(b"\x77" * (3 * MiB), 0)
            n.zero(0, 64 * 1024)
            n.zero(1 * MiB, 64 * 1024, may_unmap=True)
            n.zero(5000, 100, no_fallback=False, fua=True)
            n.discard(2 * MiB, 1 * MiB)
            self.assertEqual(n.read(0, 64 * 1024), bytes(64 * 1024))
            self.assertEqual(n.read(1 * MiB, 64 * 1024), bytes(64 * 1024))
        helpers.qemu_io(p, "qcow2", "read -P 0 0 64k",
                        "read -P 0x77 64k 960k", "read -P 0 1M 64k",
                        "read -P 0x77 1088k 960k", "read -P 0 2M 2M")
        # The zeroed, unmapped and discarded clusters read as zero in
        # qemu-img map as well: the same map through both.
        with vdisk.open(p) as n:
            self.assertEqual(helpers.merged_map(n),
                             helpers.qemu_map_comparable(p, "qcow2"))

    def test_truncate(self):
        p = self.make("t.qcow2")
        with vdisk.open(p, read_only=False, resize=True) as n:
            n.write(b"\x44" * 4096, 4 * MiB - 4096)
            n.truncate(8 * MiB)
            self.assertEqual(n.size, 8 * MiB)
            self.assertVdiskError(errno.EINVAL, "shrink", n.truncate,
                                  1 * MiB)
            n.truncate(6 * MiB, shrink=True)
            self.assertEqual(n.size, 6 * MiB)
            self.assertRaises(ValueError, n.truncate, 7 * MiB,
                              prealloc="nosuch")
        info = helpers.run("qemu-img", "info", "--output=json", p)
        self.assertIn('"virtual-size": %d' % (6 * MiB), info)
        helpers.qemu_io(p, "qcow2", "read -P 0x44 4092k 4k",
                        "read -P 0 4M 2M")

    def test_errors_carry_errno_and_message(self):
        missing = self.path("missing.qcow2")
        e = self.assertVdiskError(errno.ENOENT, "missing.qcow2", vdisk.open,
                                  missing)
        self.assertIsInstance(e, vdisk.Error)
        self.assertTrue(issubclass(vdisk.Error, OSError))
        self.assertIn(e.message, str(e))
        p = self.make("r.qcow2")
        with vdisk.open(p) as n:
            # test-core.c's range and read-only rules.
            self.assertVdiskError(errno.EIO, "", n.read, 4 * MiB - 512, 1024)
            with self.assertRaises(vdisk.Error) as cm:
                n.write(b"x", 0)
            self.assertEqual(cm.exception.errno, errno.EROFS)
            self.assertTrue(cm.exception.message)
        self.assertVdiskError(errno.EINVAL, "bogus", vdisk.open, p,
                              options={"bogus": "1"})
        self.assertVdiskError(errno.EINVAL, "", vdisk.open, p, fmt="nosuch")
        # Bad arguments are Python's own exceptions.
        with vdisk.open(p) as n:
            self.assertRaises(ValueError, n.read, -1, 10)
            self.assertRaises(TypeError, n.read, "0", 10)
            self.assertRaises(TypeError, n.pread_into, b"immutable", 0)
        self.assertRaises(ValueError, n.read, 0, 1)
        self.assertRaises(ValueError, lambda: n.size)

    def test_locking_against_qemu(self):
        """A read-write open takes QEMU's image locks: qemu-io cannot open
        the image for writing meanwhile; after close() it can."""
        p = self.make("l.qcow2")
        n = vdisk.open(p, read_only=False)
        out = helpers.run("qemu-io", "-f", "qcow2", "-c", "write 0 512", p,
                          check=False)
        self.assertIn("lock", out)
        n.close()
        n.close()       # twice is harmless
        helpers.qemu_io(p, "qcow2", "write -P 1 0 512")

    def test_options_dict_nested(self):
        p = self.make("o.qcow2")
        with vdisk.open(None, options={"driver": "qcow2",
                                       "file": {"filename": p,
                                                "locking": False}},
                        read_only=False) as n:
            self.assertEqual(n.format, "qcow2")
            self.assertEqual(n.child("file").format, "file")
            self.assertIsNone(n.child("nosuch"))
            n.write(b"\x66" * 512, 0)
        helpers.qemu_io(p, "qcow2", "read -P 0x66 0 512")
        with vdisk.open(p, options={"node-name": "mynode"}) as n:
            self.assertEqual(n.name, "mynode")
            self.assertIn("mynode", repr(n))
            info = n.info()
        ref = helpers.run("qemu-img", "info", "--output=json", p)
        import json
        ref = json.loads(ref)
        for k in ("virtual-size", "format", "cluster-size"):
            self.assertEqual(info[k], ref[k], k)

    def test_threads_share_a_node(self):
        """Requests from several Python threads run with the GIL released
        on one node; each thread's writes land."""
        p = self.make("th.qcow2", size=8 * MiB)
        with vdisk.open(p, read_only=False) as n:
            def work(k):
                for i in range(32):
                    n.write(bytes([k + 1]) * 4096, (i * 4 + k) * 65536)
            ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        cmds = ["read -P %d %d 4096" % (k + 1, (i * 4 + k) * 65536)
                for k in range(4) for i in range(32)]
        helpers.qemu_io(p, "qcow2", *cmds)

    def test_close_refused_while_a_thread_reads(self):
        """close() while another thread is inside a request is refused
        (EBUSY) rather than freeing the node under it."""
        # Bounded: trying close() until it slips between two reads could
        # spin for minutes on a loaded machine (the reader takes the GIL
        # back between its calls), so the reader stops after a while and
        # close() must succeed then.
        p = self.make("c.raw", "raw", size=64 * MiB)
        n = vdisk.open(p, fmt="raw")
        started, stop = threading.Event(), threading.Event()
        errors = []

        def reader():
            try:
                while not stop.is_set():
                    started.set()
                    n.read(0, 16 * MiB)
            except ValueError:
                pass        # closed: the loop ends
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=reader)
        t.start()
        started.wait()
        for _ in range(200):
            if n.closed:
                break
            try:
                n.close()
            except vdisk.Error as e:
                self.assertEqual(e.errno, errno.EBUSY)
        stop.set()
        t.join()
        if not n.closed:
            n.close()
        self.assertTrue(n.closed)
        self.assertEqual(errors, [])


if __name__ == "__main__":
    unittest.main()
