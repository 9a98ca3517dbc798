# Shared pieces of the Python binding tests (tests/python/test_*.py).
#
# Each test file imports `vdisk` from the build tree (meson sets
# PYTHONPATH) and compares what the bindings do with what QEMU's own tools
# (qemu-img, qemu-io) see in the same image at test time.
import json
import os
import shutil
import subprocess
import tempfile
import time
import unittest

import vdisk


def need(*tools):
    """Skips the test unless every tool is on PATH."""
    for t in tools:
        if shutil.which(t) is None:
            raise unittest.SkipTest("%s is not installed" % t)


# QEMU's tools run without the sanitizer runtime that the ASan tree
# preloads into this interpreter (python/meson.build): preloaded into
# them it only adds warnings to their output.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def run(*cmd, check=True):
    """Runs a command; returns its stdout and stderr (text). Fails the
    test with that output when it exits non-zero and check is set."""
    p = subprocess.run(list(cmd), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, env=CHILD_ENV)
    if check and p.returncode != 0:
        raise AssertionError("%s exited %d:\n%s" % (" ".join(cmd),
                                                    p.returncode, p.stdout))
    return p.stdout


def qemu_io(img, fmt, *cmds):
    """qemu-io -c CMD... on the image; its output. A failed check
    (Pattern verification failed) makes qemu-io print it; callers look
    for it."""
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    args.append(img)
    out = run(*args)
    if "verification failed" in out or "failed:" in out:
        raise AssertionError("qemu-io %s: %s" % (" ; ".join(cmds), out))
    return out


def qemu_map(img, fmt):
    """qemu-img map --output=json, as a list of dicts."""
    return json.loads(run("qemu-img", "map", "--output=json", "-f", fmt, img))


def merged_map(node):
    """vdisk's block_status() in qemu-img map's terms and merging rule:
    adjacent extents with equal depth, present, zero and data flags and
    contiguous host offsets become one."""
    out = []
    for e in node.block_status():
        off, length, flags = e
        present = bool(flags & vdisk.BLOCK_ALLOCATED)
        d = {"start": off, "length": length,
             "depth": e.depth,
             "present": present,
             "zero": bool(flags & vdisk.BLOCK_ZERO),
             "data": bool(flags & vdisk.BLOCK_DATA)}
        if e.host_offset is not None and d["data"]:
            d["offset"] = e.host_offset
        if out:
            p = out[-1]
            same = all(p[k] == d[k] for k in ("depth", "present", "zero",
                                                "data"))
            contiguous = ("offset" in p) == ("offset" in d) and (
                "offset" not in p or p["offset"] + p["length"] == d["offset"])
            if same and contiguous:
                p["length"] += length
                continue
        out.append(d)
    return out


def qemu_map_comparable(img, fmt):
    """qemu-img map's entries reduced to what merged_map() gives."""
    out = []
    for m in qemu_map(img, fmt):
        d = {k: m[k] for k in ("start", "length", "depth", "present", "zero",
                                "data")}
        if "offset" in m and m["data"]:
            d["offset"] = m["offset"]
        out.append(d)
    return out


class TmpDirCase(unittest.TestCase):
    """A test case with a fresh directory (self.dir) per test."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="vdisk-py-")
        self.dir = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def path(self, name):
        return os.path.join(self.dir, name)

    def assertVdiskError(self, errno_, fragment, fn, *args, **kw):
        """fn(*args, **kw) raises vdisk.Error with that errno and a
        message containing fragment."""
        with self.assertRaises(vdisk.Error) as cm:
            fn(*args, **kw)
        e = cm.exception
        self.assertIsInstance(e, OSError)
        self.assertEqual(e.errno, errno_, e.message)
        self.assertIn(fragment, e.message)
        self.assertEqual(e.strerror, e.message)
        return e


class KeptStatusChecks:
    """The checks of a driver that keeps a block status answer for the
    questions that follow (src/core/status_keep.h): in one open session
    the map after each of our own changes equals qemu-img map of the
    image at that moment, and another client's write shows once the kept
    answer is older than its limit (a second). Mixed into a TmpDirCase
    that sets self.uri (an 8 MiB raw image whose first 6 MiB qemu-io may
    write) and self.library (the driver's library, named when the test
    is skipped because vdisk was built without it)."""

    def open(self):
        try:
            return vdisk.open(self.uri, read_only=False, fmt="raw")
        except vdisk.Error as e:
            if "Unknown protocol" in e.message:
                raise unittest.SkipTest("vdisk was built without " +
                                        self.library)
            raise

    def assertMapIsQemus(self, node, when):
        self.assertEqual(merged_map(node), qemu_map_comparable(self.uri, "raw"),
                         when)

    def test_own_changes_show_at_once(self):
        KiB, MiB = 1 << 10, 1 << 20
        with self.open() as n:
            self.assertMapIsQemus(n, "at first")
            n.write(b"\x33" * (64 * KiB), 4 * MiB)
            self.assertMapIsQemus(n, "after a write into a hole")
            n.zero(1 * MiB, 64 * KiB, may_unmap=True)
            self.assertMapIsQemus(n, "after a zero write that may unmap")
            n.zero(5 * MiB, 64 * KiB)
            self.assertMapIsQemus(n, "after a zero write")
            n.discard(3 * MiB, 128 * KiB)
            self.assertMapIsQemus(n, "after a discard")
            n.write(b"\x44" * MiB, 7 * MiB)
            self.assertMapIsQemus(n, "after a write at the end")

    def test_another_clients_write_shows_later(self):
        with self.open() as n:
            before = merged_map(n)
            run("qemu-io", "-f", "raw", "-c", "write -q -P 0x55 2M 1M",
                self.uri)
            time.sleep(1.2)
            after = merged_map(n)
            self.assertNotEqual(before, after)
            self.assertMapIsQemus(n, "a second after another client wrote")
