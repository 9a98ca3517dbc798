#!/usr/bin/env python3
# Block status through the rbd driver, which keeps the extents of one
# walk of the object map to answer later questions: in one open session,
# the map after each of our own writes, zero writes and discards equals
# qemu-img map of the image at that moment, and a write by another client
# shows in it once the kept answer is older than its limit (a second).
# Against a real single-node Ceph cluster (tests/ceph-cluster.sh).
import os
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
CLUSTER_SH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                          "ceph-cluster.sh")


def cluster(action, d):
    """tests/ceph-cluster.sh start or stop on directory @d."""
    return subprocess.run(["bash", CLUSTER_SH, action, d],
                          env=helpers.CHILD_ENV, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


class RbdStatusTest(helpers.KeptStatusChecks, helpers.TmpDirCase):

    library = "librbd"

    @classmethod
    def setUpClass(cls):
        helpers.need("qemu-img", "qemu-io", "ceph-mon", "ceph-mgr",
                     "ceph-osd", "ceph", "rbd")
        cls._ctmp = tempfile.TemporaryDirectory(prefix="vdisk-py-ceph-")
        cls.ceph = os.path.join(cls._ctmp.name, "ceph")
        os.mkdir(cls.ceph)
        p = cluster("start", cls.ceph)
        if p.returncode == 77:
            cls._ctmp.cleanup()
            raise unittest.SkipTest("no Ceph cluster here: " + p.stdout)
        if p.returncode != 0:
            cluster("stop", cls.ceph)
            cls._ctmp.cleanup()
            raise AssertionError("the Ceph cluster did not come up:\n" +
                                 p.stdout)
        # Stopped by tearDownClass, or, should this interpreter die
        # without it (an abort), by a watchdog that outlives it: the
        # daemons are stopped by the PIDs in the cluster's directory.
        subprocess.Popen(["bash", "-c", 'while kill -0 "$0" 2>/dev/null; '
                          'do sleep 1; done; bash "$1" stop "$2"; '
                          'rm -rf "$3"',
                          str(os.getpid()), CLUSTER_SH, cls.ceph,
                          cls._ctmp.name],
                         env=helpers.CHILD_ENV, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
        conf = os.path.join(cls.ceph, "ceph.conf")
        # librados in this process (the vdisk module) and in QEMU's tools.
        os.environ["CEPH_CONF"] = conf
        helpers.CHILD_ENV["CEPH_CONF"] = conf

    @classmethod
    def tearDownClass(cls):
        cluster("stop", cls.ceph)
        cls._ctmp.cleanup()

    def setUp(self):
        super().setUp()
        # 64 KiB objects (64 object map bits per 4 MiB), some written.
        self.image = "st%d" % (int(time.time() * 1000) % 100000000)
        raw = self.path("src.raw")
        with open(raw, "wb") as f:
            f.truncate(8 * MiB)
            f.seek(1 * MiB)
            f.write(b"\x11" * (64 * KiB))
            f.seek(3 * MiB)
            f.write(b"\x12" * (192 * KiB))
        helpers.run("rbd", "import", "--object-size", "64K", raw,
                    "rbd/" + self.image)
        self.uri = "rbd:rbd/" + self.image


if __name__ == "__main__":
    unittest.main()
