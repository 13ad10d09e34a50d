"""Tests of thaw_worker (stdlib unittest). Run: python3 -m unittest test_thaw_worker (in sdk/python)."""

import json
import os
import shutil
import stat
import tempfile
import threading
import time
import unittest
from unittest import mock

import thaw_worker as tw


def write_later(path, name, delay_s, content=b""):
    """What the agent does: an atomic marker write, after a delay, from another thread."""

    def run():
        time.sleep(delay_s)
        tmp = os.path.join(path, ".tmp-" + name)
        with open(tmp, "wb") as f:
            f.write(content)
        os.rename(tmp, os.path.join(path, name))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


class ControlDirTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="thaw-worker-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def test_path_comes_from_env_then_legacy_env_then_default(self):
        with mock.patch.dict(os.environ, {tw.CONTROL_DIR_ENV: "/a", tw.LEGACY_CONTROL_DIR_ENV: "/b"}):
            self.assertEqual(tw.ControlDir().path, "/a")
        with mock.patch.dict(os.environ, {tw.LEGACY_CONTROL_DIR_ENV: "/b"}, clear=True):
            self.assertEqual(tw.ControlDir().path, "/b")
        with mock.patch.dict(os.environ, {}, clear=True):
            self.assertEqual(tw.ControlDir().path, "/snapshot-control")
        self.assertEqual(tw.ControlDir("/explicit").path, "/explicit")

    def test_ready_for_checkpoint_writes_the_payload_atomically(self):
        cd = tw.ControlDir(self.dir)
        cd.ready_for_checkpoint({"model": "m", "n": 1})
        with open(os.path.join(self.dir, tw.READY_FOR_CHECKPOINT)) as f:
            self.assertEqual(json.load(f), {"model": "m", "n": 1})
        self.assertEqual(os.listdir(self.dir), [tw.READY_FOR_CHECKPOINT])  # no temporary left behind
        mode = stat.S_IMODE(os.stat(os.path.join(self.dir, tw.READY_FOR_CHECKPOINT)).st_mode)
        self.assertEqual(mode & 0o077, 0)

    def test_ready_for_checkpoint_without_payload_is_an_empty_file(self):
        tw.ControlDir(self.dir).ready_for_checkpoint()
        self.assertEqual(os.path.getsize(os.path.join(self.dir, tw.READY_FOR_CHECKPOINT)), 0)

    def test_a_payload_that_is_not_a_dict_is_refused(self):
        with self.assertRaises(tw.ThawWorkerError) as ctx:
            tw.ControlDir(self.dir).ready_for_checkpoint(["not", "a", "dict"])
        self.assertEqual(ctx.exception.code, "SDK_INVALID_PAYLOAD")

    def test_a_missing_directory_fails_with_a_coded_error(self):
        with self.assertRaises(tw.ThawWorkerError) as ctx:
            tw.ControlDir(os.path.join(self.dir, "missing")).ready_for_checkpoint()
        self.assertEqual(ctx.exception.code, "SDK_WRITE_FAILED")

    def test_wait_returns_each_outcome(self):
        for name, expected in [
            (tw.CHECKPOINT_COMPLETE, tw.Outcome.CHECKPOINT_COMPLETE),
            (tw.SNAPSHOT_COMPLETE, tw.Outcome.CHECKPOINT_COMPLETE),  # Dynamo's name
            (tw.RESTORE_COMPLETE, tw.Outcome.RESTORE_COMPLETE),
            (tw.RESTORE_FAILED, tw.Outcome.RESTORE_FAILED),
        ]:
            with self.subTest(name=name):
                d = tempfile.mkdtemp(dir=self.dir)
                write_later(d, name, 0.15)
                t0 = time.monotonic()
                outcome = tw.ControlDir(d).wait(timeout_s=5)
                self.assertIs(outcome, expected)
                self.assertEqual(outcome, expected.value)  # a str too
                self.assertLess(time.monotonic() - t0, 2)

    def test_wait_with_inotify_wakes_without_waiting_for_the_poll(self):
        cd = tw.ControlDir(self.dir, poll_interval_s=30, use_inotify=True)
        try:
            tw._Inotify(self.dir).close()
        except OSError as err:
            self.skipTest("no inotify here: %s" % err)
        write_later(self.dir, tw.RESTORE_COMPLETE, 0.2)
        t0 = time.monotonic()
        self.assertIs(cd.wait(timeout_s=10), tw.Outcome.RESTORE_COMPLETE)
        self.assertLess(time.monotonic() - t0, 5)  # the 30 s poll never ran out

    def test_wait_falls_back_to_polling_when_inotify_cannot_be_set_up(self):
        cd = tw.ControlDir(self.dir, use_inotify=True)
        with mock.patch.object(tw, "_Inotify", side_effect=OSError("no inotify")):
            write_later(self.dir, tw.CHECKPOINT_COMPLETE, 0.15)
            self.assertIs(cd.wait(timeout_s=5), tw.Outcome.CHECKPOINT_COMPLETE)

    def test_wait_times_out_with_a_coded_timeout_error(self):
        t0 = time.monotonic()
        with self.assertRaises(TimeoutError) as ctx:
            tw.ControlDir(self.dir).wait(timeout_s=0.3)
        self.assertIsInstance(ctx.exception, tw.WaitTimeout)
        self.assertEqual(ctx.exception.code, "SDK_WAIT_TIMEOUT")
        self.assertGreaterEqual(time.monotonic() - t0, 0.3)

    def test_a_failure_wins_over_a_restore_and_a_restore_over_a_checkpoint(self):
        cd = tw.ControlDir(self.dir)
        open(os.path.join(self.dir, tw.CHECKPOINT_COMPLETE), "w").close()
        self.assertIs(cd.outcome(), tw.Outcome.CHECKPOINT_COMPLETE)
        open(os.path.join(self.dir, tw.RESTORE_COMPLETE), "w").close()
        self.assertIs(cd.wait(0), tw.Outcome.RESTORE_COMPLETE)
        open(os.path.join(self.dir, tw.RESTORE_FAILED), "w").close()
        self.assertIs(cd.wait(0), tw.Outcome.RESTORE_FAILED)

    def test_temporary_names_are_not_markers(self):
        open(os.path.join(self.dir, ".tmp-restore-complete-1-abcd"), "w").close()
        self.assertIsNone(tw.ControlDir(self.dir).outcome())

    def test_was_restored(self):
        cd = tw.ControlDir(self.dir)
        self.assertFalse(cd.was_restored())
        open(os.path.join(self.dir, tw.RESTORE_COMPLETE), "w").close()
        self.assertTrue(cd.was_restored())

    def test_payload_of_a_marker(self):
        cd = tw.ControlDir(self.dir)
        self.assertIsNone(cd.payload(tw.RESTORE_FAILED))
        with open(os.path.join(self.dir, tw.RESTORE_FAILED), "w") as f:
            f.write('{"reason": "gpu mismatch"}\n')
        self.assertEqual(cd.payload(tw.Outcome.RESTORE_FAILED), {"reason": "gpu mismatch"})
        open(os.path.join(self.dir, tw.RESTORE_COMPLETE), "w").close()
        self.assertEqual(cd.payload(tw.RESTORE_COMPLETE), {})
        with open(os.path.join(self.dir, tw.CHECKPOINT_COMPLETE), "w") as f:
            f.write("[1]")
        with self.assertRaises(tw.ThawWorkerError) as ctx:
            cd.payload(tw.CHECKPOINT_COMPLETE)
        self.assertEqual(ctx.exception.code, "SDK_INVALID_PAYLOAD")


class CheckpointAndWaitTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="thaw-worker-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.calls = []

    def release(self):
        # ready-for-checkpoint must not exist yet: the agent may freeze us as soon as it does.
        self.calls.append(("release", os.path.exists(os.path.join(self.dir, tw.READY_FOR_CHECKPOINT))))

    def resume(self):
        self.calls.append(("resume", None))

    def test_release_then_ready_then_resume_after_restore_complete(self):
        write_later(self.dir, tw.RESTORE_COMPLETE, 0.15)
        outcome = tw.checkpoint_and_wait(self.release, self.resume, timeout_s=5, control_dir=tw.ControlDir(self.dir))
        self.assertIs(outcome, tw.Outcome.RESTORE_COMPLETE)
        self.assertEqual(self.calls, [("release", False), ("resume", None)])
        self.assertTrue(os.path.exists(os.path.join(self.dir, tw.READY_FOR_CHECKPOINT)))

    def test_resume_after_checkpoint_complete(self):
        write_later(self.dir, tw.SNAPSHOT_COMPLETE, 0.15)
        outcome = tw.checkpoint_and_wait(self.release, self.resume, timeout_s=5, control_dir=tw.ControlDir(self.dir))
        self.assertIs(outcome, tw.Outcome.CHECKPOINT_COMPLETE)
        self.assertEqual([c[0] for c in self.calls], ["release", "resume"])

    def test_no_resume_after_restore_failed(self):
        write_later(self.dir, tw.RESTORE_FAILED, 0.15)
        outcome = tw.checkpoint_and_wait(self.release, self.resume, timeout_s=5, control_dir=tw.ControlDir(self.dir))
        self.assertIs(outcome, tw.Outcome.RESTORE_FAILED)
        self.assertEqual([c[0] for c in self.calls], ["release"])

    def test_works_without_hooks_and_uses_the_env_dir(self):
        write_later(self.dir, tw.CHECKPOINT_COMPLETE, 0.1)
        with mock.patch.dict(os.environ, {tw.CONTROL_DIR_ENV: self.dir}):
            self.assertIs(tw.checkpoint_and_wait(timeout_s=5), tw.Outcome.CHECKPOINT_COMPLETE)

    def test_a_callable_payload_is_taken_after_the_release(self):
        write_later(self.dir, tw.CHECKPOINT_COMPLETE, 0.1)
        state = {"released": False}

        def release():
            state["released"] = True

        outcome = tw.checkpoint_and_wait(release, payload=lambda: {"releasedFirst": state["released"]}, control_dir=tw.ControlDir(self.dir), timeout_s=5)
        self.assertIs(outcome, tw.Outcome.CHECKPOINT_COMPLETE)
        with open(os.path.join(self.dir, tw.READY_FOR_CHECKPOINT)) as f:
            self.assertEqual(json.load(f), {"releasedFirst": True})

    def test_a_release_that_raises_writes_no_ready_marker(self):
        def boom():
            raise RuntimeError("cannot free the cache")

        with self.assertRaises(RuntimeError):
            tw.checkpoint_and_wait(boom, control_dir=tw.ControlDir(self.dir), timeout_s=1)
        self.assertFalse(os.path.exists(os.path.join(self.dir, tw.READY_FOR_CHECKPOINT)))


def _rank_main(rank, world, sync_dir, control_dir, log_dir, timeout_s, skip_quiesce_rank):
    """One rank of a tensor-parallel worker, in its own process: records each hook it runs."""

    def mark(what):
        open(os.path.join(log_dir, "%s.%d" % (what, rank)), "w").close()

    if rank == skip_quiesce_rank:
        return  # a rank that never reaches the checkpoint step
    barrier = tw.RankBarrier(rank, world, sync_dir, poll_interval_s=0.005)
    try:
        outcome = tw.checkpoint_and_wait_ranks(
            barrier,
            release=lambda: mark("released"),
            quiesce=lambda: mark("quiesced"),
            resume=lambda: mark("resumed"),
            timeout_s=timeout_s,
            control_dir=tw.ControlDir(control_dir, poll_interval_s=0.005),
            payload={"rank": rank},
        )
        mark("outcome-" + outcome.name)
    except tw.WaitTimeout:
        mark("timeout")


class TensorParallelRanksTest(unittest.TestCase):
    """checkpoint_and_wait_ranks across real processes (one per rank), with the agent played by the test."""

    def setUp(self):
        root = tempfile.mkdtemp(prefix="thaw-tp-")
        self.addCleanup(shutil.rmtree, root, True)
        self.sync, self.control, self.log = (os.path.join(root, d) for d in ("sync", "control", "log"))
        for d in (self.sync, self.control, self.log):
            os.mkdir(d)

    def start_ranks(self, world, timeout_s=20.0, skip_quiesce_rank=-1):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        procs = [
            ctx.Process(target=_rank_main, args=(r, world, self.sync, self.control, self.log, timeout_s, skip_quiesce_rank))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        self.addCleanup(lambda: [p.kill() for p in procs if p.is_alive()])
        return procs

    def logged(self):
        return sorted(os.listdir(self.log))

    def wait_for(self, path, timeout_s=20.0):
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                self.fail("%s never appeared; log: %s" % (path, self.logged()))
            time.sleep(0.005)

    def test_one_ready_after_every_rank_quiesced_then_every_rank_resumes(self):
        world = 3
        procs = self.start_ranks(world)
        ready = os.path.join(self.control, tw.READY_FOR_CHECKPOINT)
        self.wait_for(ready)
        # The agent's view at ready-for-checkpoint: every rank released and quiesced, none resumed.
        seen = self.logged()
        for r in range(world):
            self.assertIn("released.%d" % r, seen)
            self.assertIn("quiesced.%d" % r, seen)
        self.assertFalse([n for n in seen if n.startswith("resumed")])
        with open(ready) as f:
            payload = json.load(f)
        self.assertEqual(payload["tensorParallel"], world)
        self.assertEqual(payload["ranks"], [{"rank": r} for r in range(world)])
        write_later(self.control, tw.RESTORE_COMPLETE, 0).join()
        for p in procs:
            p.join(20)
        self.assertEqual(
            sorted(n for n in self.logged() if not n.startswith(("released", "quiesced"))),
            sorted(["resumed.%d" % r for r in range(world)] + ["outcome-RESTORE_COMPLETE.%d" % r for r in range(world)]),
        )
        self.assertEqual(os.listdir(self.sync), [], "rank 0 clears the barrier files")

    def test_a_rank_that_never_quiesces_means_no_ready_for_checkpoint(self):
        procs = self.start_ranks(2, timeout_s=0.3, skip_quiesce_rank=1)
        for p in procs:
            p.join(20)
        self.assertFalse(os.path.exists(os.path.join(self.control, tw.READY_FOR_CHECKPOINT)))
        self.assertIn("timeout.0", self.logged())

    def test_restore_failed_resumes_no_rank(self):
        procs = self.start_ranks(2)
        self.wait_for(os.path.join(self.control, tw.READY_FOR_CHECKPOINT))
        write_later(self.control, tw.RESTORE_FAILED, 0).join()
        for p in procs:
            p.join(20)
        logged = self.logged()
        self.assertEqual([n for n in logged if n.startswith("resumed")], [])
        self.assertIn("outcome-RESTORE_FAILED.1", logged)

    def test_rank_outside_the_world_is_refused(self):
        with self.assertRaises(tw.ThawWorkerError):
            tw.RankBarrier(2, 2, self.sync)


if __name__ == "__main__":
    unittest.main()
