#!/usr/bin/env python3
# vdisk's Python bindings: block jobs (tests/unit/test-job.c's cases):
# stream of a three-layer qcow2 chain with a progress callback, a stream
# down to a base, commit of the middle layer, an active commit made READY
# and cancelled, a mirror made READY and completed, a full backup and an
# incremental one by a bitmap, a backup while a Python thread writes the
# source, the error policies stop and report, a cancel, the verbs refused
# in states that do not take them with QEMU's texts, close() refused
# while a job uses a node, a job that keeps its nodes alive when Python
# drops them, and a dropped job that is cancelled. The results are
# checked with qemu-img (info, compare) and qemu-io (read -P).
import errno
import gc
import json
import os
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers  # noqa: E402
import vdisk  # noqa: E402

MiB = 1 << 20
KiB = 1024
SIZE = 4 * MiB

# What the top of the chain shows: base 0x11 in [0, 2M), mid 0x22 in
# [1M, 2M), top 0x33 in [1.5M, 1.5M+64k).
CONTENT = ["read -P 0x11 0 1M", "read -P 0x22 1M 512k",
           "read -P 0x33 1536k 64k", "read -P 0x22 1600k 448k",
           "read -P 0 2M 2M"]


class JobTest(helpers.TmpDirCase):

    def setUp(self):
        super().setUp()
        helpers.need("qemu-img", "qemu-io")
        self.base = self.path("base.qcow2")
        self.mid = self.path("mid.qcow2")
        self.top = self.path("top.qcow2")
        vdisk.create(self.base, "qcow2", size=SIZE)
        vdisk.create(self.mid, "qcow2", options={"backing_file": self.base,
                                                 "backing_fmt": "qcow2"})
        vdisk.create(self.top, "qcow2", options={"backing_file": self.mid,
                                                 "backing_fmt": "qcow2"})
        helpers.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 2M",
                    self.base)
        helpers.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 1M",
                    self.mid)
        helpers.run("qemu-io", "-f", "qcow2", "-c",
                    "write -P 0x33 1536k 64k", self.top)

    def backing_of(self, img):
        info = json.loads(helpers.run("qemu-img", "info", "--output=json",
                                      "-U", img))
        return info.get("backing-filename")

    def chain_length(self, n):
        k = 1
        while n.backing is not None:
            n = n.backing
            k += 1
        return k

    def new_target(self, name):
        p = self.path(name)
        vdisk.create(p, "qcow2", size=SIZE)
        # The job writes its target alone: no opener that writes it.
        return p, vdisk.open(p, read_only=False, no_user=True)

    def test_stream_with_progress(self):
        seen = []
        with vdisk.open(self.top, read_only=False) as top:
            self.assertEqual(self.chain_length(top), 3)
            job = vdisk.stream("s1", top,
                               progress=lambda c, t: seen.append((c, t)))
            self.assertEqual(job.id, "s1")
            job.wait()
            self.assertIn(job.status, ("concluded", "null"))
            self.assertEqual(self.chain_length(top), 1)
            self.assertEqual(job.info()["type"], "stream")
        self.assertGreater(len(seen), 0)
        cur, tot = seen[-1]
        self.assertEqual(cur, tot)
        self.assertGreater(tot, 0)
        self.assertEqual([c for c, _ in seen], sorted(c for c, _ in seen))
        self.assertIsNone(self.backing_of(self.top))
        helpers.qemu_io(self.top, "qcow2", *CONTENT)

    def test_stream_to_base(self):
        with vdisk.open(self.top, read_only=False) as top:
            base = top.backing.backing
            self.assertEqual(base.filename, self.base)
            vdisk.stream("s2", top, base).wait()
            self.assertEqual(self.chain_length(top), 2)
            self.assertEqual(top.backing.name, base.name)
        self.assertEqual(self.backing_of(self.top), self.base)
        helpers.qemu_io(self.top, "qcow2", *CONTENT)

    def test_commit_middle_layer(self):
        calls = []
        with vdisk.open(self.top, read_only=False) as top:
            mid = top.backing
            base = mid.backing
            self.assertVdiskError(errno.EINVAL, "cannot commit an image "
                                  "into itself", vdisk.commit, "m", top,
                                  mid, mid)
            job = vdisk.commit("m", top, mid, base)
            job.wait(progress=lambda c, t: calls.append((c, t)))
            self.assertEqual(self.chain_length(top), 2)
            self.assertEqual(top.backing.filename, self.base)
            # The node the commit dropped is gone; its Node says so.
            self.assertVdiskError(errno.ENOENT, "no longer exists",
                                  lambda: mid.size)
        self.assertEqual(calls[-1][0], calls[-1][1])
        self.assertEqual(self.backing_of(self.top), self.base)
        helpers.qemu_io(self.top, "qcow2", *CONTENT)

    def test_active_commit_ready_then_cancelled(self):
        with vdisk.open(self.top, read_only=False) as top:
            job = vdisk.commit("ac", top)        # top into its backing
            job.wait_ready(timeout=120)
            self.assertEqual(job.status, "ready")
            self.assertTrue(job.info()["ready"])
            job.cancel(force=True)
            e = self.assertVdiskError(errno.ECANCELED, "", job.wait)
            self.assertEqual(self.chain_length(top), 3)
        helpers.qemu_io(self.top, "qcow2", *CONTENT)

    def test_mirror_complete(self):
        tp, tgt = self.new_target("tgt.qcow2")
        ready_progress = []
        with vdisk.open(self.top, read_only=False) as top:
            job = vdisk.mirror("mi", top, tgt, sync="full")
            job.wait_ready(progress=lambda c, t:
                           ready_progress.append((c, t)), timeout=120)
            job.complete()
            job.wait()
        tgt.close()
        self.assertTrue(ready_progress)
        self.assertIsNone(self.backing_of(tp))
        helpers.run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                    self.top, tp)
        helpers.qemu_io(tp, "qcow2", *CONTENT)
        self.assertRaises(ValueError, vdisk.mirror, "x", tgt, tgt,
                          sync="bitmap")

    def test_backup_full_then_incremental(self):
        tp, tgt = self.new_target("bak.qcow2")
        seen = []
        with vdisk.open(self.top, read_only=False) as top:
            top.bitmap_add("b")
            self.assertVdiskError(errno.EINVAL, "must provide a valid bitmap "
                                  "name for 'bitmap' sync mode",
                                  vdisk.backup, "ib", top, tgt, sync="bitmap")
            self.assertVdiskError(errno.EINVAL, "Bitmap sync mode must be "
                                  "given when providing a bitmap",
                                  vdisk.backup, "ib", top, tgt, bitmap="b")
            job = vdisk.backup("full", top, tgt, bitmap="b",
                               bitmap_mode="on-success",
                               progress=lambda c, t: seen.append((c, t)))
            self.assertTrue(top.bitmap_info("b")["busy"])
            job.wait()
            self.assertFalse(top.bitmap_info("b")["busy"])
            self.assertEqual(seen[-1][0], seen[-1][1])
            top.flush()
            # The full backup equals the source.
            a = top.read(0, SIZE)
            self.assertEqual(tgt.read(0, SIZE), a)
            # Writes after it, then an incremental backup by the bitmap
            # copies just those.
            top.write(b"\x44" * 65536, 3 * MiB)
            top.write(b"\x55" * 4096, 0)
            self.assertEqual(top.bitmap_dirty("b"),
                             [(0, 65536), (3 * MiB, 65536)])
            vdisk.backup("inc", top, tgt, sync="incremental",
                         bitmap="b").wait()
            self.assertEqual(top.bitmap_info("b")["count"], 0)
        tgt.close()
        helpers.run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                    self.top, tp)
        helpers.qemu_io(tp, "qcow2", "read -P 0x55 0 4k",
                        "read -P 0x44 3M 64k", "read -P 0x11 4k 1020k")

    def test_backup_under_writes(self):
        """test-job.c's backup under writes from another thread: the
        target is the source as it was when the job started."""
        tp, tgt = self.new_target("live.qcow2")
        with vdisk.open(self.top, read_only=False) as top:
            start = top.read(0, SIZE)
            job = vdisk.backup("bk", top, tgt, speed=4 * MiB)

            def writer():
                for k in range(48):
                    top.write(bytes([0x90 + (k & 15)]) * 8192,
                              (k * 83 * KiB) % (SIZE - 8192))

            t = threading.Thread(target=writer)
            t.start()
            t.join()
            job.wait()
            self.assertEqual(tgt.read(0, SIZE), start)
            self.assertNotEqual(top.read(0, SIZE), start)
        tgt.close()

    def test_cancel_and_verbs(self):
        with vdisk.open(self.top, read_only=False) as top:
            job = vdisk.stream("v", top, speed=256 * KiB)
            self.assertVdiskError(errno.EPERM, "Job 'v' in state 'running' "
                                  "cannot accept command verb 'complete'",
                                  job.complete)
            self.assertVdiskError(errno.EPERM, "Can't resume a job that was "
                                  "not paused", job.resume)
            self.assertVdiskError(errno.EINVAL, "Parameter 'speed' expects "
                                  "a non-negative value", job.set_speed, -1)
            self.assertVdiskError(errno.EBUSY, "", vdisk.stream, "w", top)
            job.pause()
            self.assertVdiskError(errno.EPERM, "Job is already paused",
                                  job.pause)
            # close() while the job runs is refused.
            self.assertVdiskError(errno.EBUSY, "block job", top.close)
            job.resume()
            job.cancel(force=True)
            with self.assertRaises(vdisk.Error) as cm:
                job.wait()
            self.assertEqual(cm.exception.errno, errno.ECANCELED)
            self.assertEqual(self.chain_length(top), 3)
        self.assertEqual(self.backing_of(self.top), self.mid)
        helpers.qemu_io(self.top, "qcow2", *CONTENT)
        with vdisk.open(self.top) as top:
            self.assertRaises(ValueError, vdisk.stream, "x", top,
                              on_error="nosuch")

    def test_job_keeps_nodes_alive(self):
        tp, tgt = self.new_target("keep.qcow2")
        top = vdisk.open(self.top, read_only=False)
        job = vdisk.backup("k", top, tgt, speed=8 * MiB)
        del top, tgt
        gc.collect()
        job.wait()
        del job
        gc.collect()
        helpers.run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                    self.top, tp)

    def test_error_policy(self):
        """test-job.c's error policies: the first read of the top's own
        data fails (blkdebug); with on_error="stop" the mirror pauses
        with its I/O status failed and the resume retries; with "report"
        the job fails with EIO."""
        with vdisk.open(self.top) as plain:
            ext = next(plain.block_status(1536 * KiB, 4096))
            self.assertIsNotNone(ext.host_offset)
            sector = ext.host_offset // 512
        for policy in ("stop", "report"):
            tp, tgt = self.new_target("err-%s.qcow2" % policy)
            opts = {"driver": "qcow2",
                    "file": {"driver": "blkdebug",
                             "image": {"filename": self.top},
                             "inject-error": {"0": {
                                 "iotype": "read", "event": "read_aio",
                                 "sector": sector, "once": True}}}}
            with vdisk.open(None, options=opts, read_only=False) as top:
                job = vdisk.mirror("e", top, tgt, sync="top",
                                   on_error=policy)
                if policy == "stop":
                    for _ in range(3000):
                        if job.status == "paused":
                            break
                        time.sleep(0.01)
                    info = job.info()
                    self.assertEqual((info["status"], info["io_status"]),
                                     ("paused", "failed"))
                    job.resume()
                    job.wait_ready(timeout=120)
                    job.cancel()
                    job.wait()
                else:
                    self.assertVdiskError(errno.EIO, "", job.wait)
            tgt.close()

    def test_dropped_job_is_cancelled(self):
        with vdisk.open(self.top, read_only=False) as top:
            vdisk.stream("d", top, speed=64 * KiB)
            gc.collect()
            # The Job was dropped at once: cancelled and waited for, so
            # the node can be closed and the chain is unchanged.
            self.assertEqual(self.chain_length(top), 3)
        self.assertEqual(self.backing_of(self.top), self.mid)
        # A Job in a reference cycle through its progress callback is
        # found by the collector, and cancelled as well.
        with vdisk.open(self.top, read_only=False) as top:
            holder = {}
            holder["job"] = vdisk.stream("cyc", top, speed=64 * KiB,
                                         progress=lambda c, t: holder)
            del holder
            gc.collect()
            self.assertEqual(self.chain_length(top), 3)
        self.assertEqual(self.backing_of(self.top), self.mid)


if __name__ == "__main__":
    unittest.main()
