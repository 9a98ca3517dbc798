#!/usr/bin/env python3
# Block status through the nbd client, which keeps a reply about a large
# range to answer later questions: in one open session, the map after
# each of our own writes, zero writes and discards equals qemu-img map of
# the export at that moment, and a write by another client shows in it
# once the kept reply is older than its limit (a second).
import os
import socket
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers  # noqa: E402
import vdisk  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NbdStatusTest(helpers.TmpDirCase):

    def setUp(self):
        super().setUp()
        helpers.need("qemu-img", "qemu-io", "qemu-nbd")
        img = self.path("a.raw")
        with open(img, "wb") as f:
            f.truncate(8 * MiB)
            f.seek(1 * MiB)
            f.write(b"\x11" * (64 * KiB))
        pidfile = self.path("qemu-nbd.pid")
        for _ in range(5):
            self.port = free_port()
            # Several clients at once: ours (two connections where
            # multi-conn is offered) and qemu-img's or qemu-io's.
            # (Its output to a file: the daemon keeps a pipe open.)
            with open(self.path("qemu-nbd.log"), "w") as log:
                p = subprocess.run(["qemu-nbd", "--fork", "-t", "-e", "4",
                                    "-f", "raw", "--discard=unmap",
                                    "-b", "127.0.0.1", "-p", str(self.port),
                                    "--pid-file", pidfile, img],
                                   env=helpers.CHILD_ENV,
                                   stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=log)
            if p.returncode == 0:
                break
        else:
            with open(self.path("qemu-nbd.log")) as log:
                self.fail("qemu-nbd did not start: " + log.read())
        for _ in range(50):
            if os.path.exists(pidfile) and os.path.getsize(pidfile):
                break
            time.sleep(0.1)
        with open(pidfile) as f:
            self.server = int(f.read())
        self.uri = "nbd://127.0.0.1:%d" % self.port

    def tearDown(self):
        try:
            os.kill(self.server, 15)
        except ProcessLookupError:
            pass
        super().tearDown()

    def open(self):
        try:
            return vdisk.open(self.uri, read_only=False, fmt="raw")
        except vdisk.Error as e:
            if "Unknown protocol" in e.message:
                raise unittest.SkipTest("vdisk was built without libnbd")
            raise

    def assertMapIsQemus(self, node, when):
        self.assertEqual(helpers.merged_map(node),
                         helpers.qemu_map_comparable(self.uri, "raw"), when)

    def test_own_changes_show_at_once(self):
        with self.open() as n:
            self.assertMapIsQemus(n, "at first")
            n.write(b"\x33" * (64 * KiB), 4 * MiB)
            self.assertMapIsQemus(n, "after a write into a hole")
            n.zero(1 * MiB, 64 * KiB, may_unmap=True)
            self.assertMapIsQemus(n, "after a zero write that may unmap")
            n.discard(4 * MiB, 64 * KiB)
            self.assertMapIsQemus(n, "after a discard")
            n.write(b"\x44" * MiB, 7 * MiB)
            self.assertMapIsQemus(n, "after a write at the end")

    def test_another_clients_write_shows_later(self):
        with self.open() as n:
            before = helpers.merged_map(n)
            helpers.run("qemu-io", "-f", "raw", "-c",
                        "write -q -P 0x55 2M 1M", self.uri)
            time.sleep(1.2)
            after = helpers.merged_map(n)
            self.assertNotEqual(before, after)
            self.assertMapIsQemus(n, "a second after another client wrote")


if __name__ == "__main__":
    unittest.main()
