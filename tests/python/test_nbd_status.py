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

KiB = 1 << 10
MiB = 1 << 20


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NbdStatusTest(helpers.KeptStatusChecks, helpers.TmpDirCase):

    library = "libnbd"

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


if __name__ == "__main__":
    unittest.main()
