"""thaw worker SDK: the workload side of thaw's checkpoint/restore protocol.

One file, Python standard library only, Python >= 3.8. Copy it into an image or vendor it.

A worker that thaw checkpoints tells the node agent when it is initialised and quiesced, by writing
``ready-for-checkpoint`` into its control directory (env ``SNAPSHOT_CONTROL_DIR``, default
``/snapshot-control``), and then waits for the agent's answer:

==========================  =======  ======================================================
file                        writer   meaning
==========================  =======  ======================================================
``ready-for-checkpoint``    worker   initialised and quiesced; checkpoint me
``checkpoint-complete``     agent    checkpoint done; go on serving (or exit)
``restore-complete``        agent    this process was restored in a new pod; reconnect, serve
``restore-failed``          agent    restore abandoned; the cold start takes over
==========================  =======  ======================================================

The names are NVIDIA Dynamo Snapshot's: its ``snapshot-complete`` is accepted as
``checkpoint-complete``, and the agent accepts its ``ready-for-snapshot``, so Dynamo workers run
unchanged and this module works against a Dynamo agent.

Example::

    import thaw_worker

    engine = load_model()                        # the slow part: done once, in the source pod
    outcome = thaw_worker.checkpoint_and_wait(
        release=lambda: engine.sleep(level=1),   # free what need not be saved (KV cache, ...)
        resume=engine.wake_up,                   # after checkpoint-complete or restore-complete
    )
    if outcome == thaw_worker.Outcome.RESTORE_COMPLETE:
        reconnect()                              # a new pod: re-open network connections
    serve(engine)

Or step by step::

    cd = thaw_worker.ControlDir()
    cd.ready_for_checkpoint({"model": "qwen"})
    outcome = cd.wait(timeout_s=600)
    if cd.was_restored(): ...

Extension point: framework helpers (vLLM ``sleep``/``wake_up``, SGLang memory release,
``torch.cuda.empty_cache``) are pairs of callables given as ``release``/``resume``, e.g.
``checkpoint_and_wait(*torch_hooks())``; ``release`` comes first positionally for that reason.

Waiting polls every 0.01 s by default. Dynamo's workers poll every 0.1 s, but a restored worker sees
``restore-complete`` on its next poll, so the period adds to every restore (~50 ms on average at
0.1 s), while a poll is four stat calls and the wait lasts only as long as a checkpoint. Polling,
deliberately: the wait spans the checkpoint, and an inotify descriptor open during the CRIU dump becomes
part of the image, watching the *source* pod's control directory, which a restore in another pod or on
another node cannot reopen. ``use_inotify=True`` (inotify through ctypes on libc, falling back to
polling when unavailable) is for waits that no checkpoint spans.

Markers are written atomically (temporary name in the same directory, fsync, rename, directory
fsync); a marker's content is empty or a JSON object.
"""

import ctypes
import ctypes.util
import enum
import json
import os
import select
import time

__all__ = [
    "CONTROL_DIR_ENV",
    "LEGACY_CONTROL_DIR_ENV",
    "DEFAULT_CONTROL_DIR",
    "READY_FOR_CHECKPOINT",
    "READY_FOR_SNAPSHOT",
    "CHECKPOINT_COMPLETE",
    "SNAPSHOT_COMPLETE",
    "RESTORE_COMPLETE",
    "RESTORE_FAILED",
    "POLL_INTERVAL_S",
    "Outcome",
    "ThawWorkerError",
    "WaitTimeout",
    "ControlDir",
    "checkpoint_and_wait",
    "add_wait_hook",
    "remove_wait_hook",
    "TP_SYNC_DIR_ENV",
    "RankBarrier",
    "checkpoint_and_wait_ranks",
]

# Names shared with src/sdk/protocol.ts (a test checks that both agree).
CONTROL_DIR_ENV = "SNAPSHOT_CONTROL_DIR"
LEGACY_CONTROL_DIR_ENV = "DYN_SNAPSHOT_CONTROL_DIR"
DEFAULT_CONTROL_DIR = "/snapshot-control"
READY_FOR_CHECKPOINT = "ready-for-checkpoint"
READY_FOR_SNAPSHOT = "ready-for-snapshot"
CHECKPOINT_COMPLETE = "checkpoint-complete"
SNAPSHOT_COMPLETE = "snapshot-complete"
RESTORE_COMPLETE = "restore-complete"
RESTORE_FAILED = "restore-failed"
POLL_INTERVAL_S = 0.01
TEMP_PREFIX = ".tmp-"


class Outcome(str, enum.Enum):
    """What the agent reported. A str, so ``outcome == "restore-complete"`` holds too."""

    CHECKPOINT_COMPLETE = CHECKPOINT_COMPLETE
    RESTORE_COMPLETE = RESTORE_COMPLETE
    RESTORE_FAILED = RESTORE_FAILED

    def __str__(self):
        return self.value


# Checked in this order: a failure wins over a restore, a restore over a checkpoint (a restored
# process must not act as the source that was checkpointed).
_OUTCOME_FILES = (
    (RESTORE_FAILED, Outcome.RESTORE_FAILED),
    (RESTORE_COMPLETE, Outcome.RESTORE_COMPLETE),
    (CHECKPOINT_COMPLETE, Outcome.CHECKPOINT_COMPLETE),
    (SNAPSHOT_COMPLETE, Outcome.CHECKPOINT_COMPLETE),
)


class ThawWorkerError(Exception):
    """Base of this module's errors; ``code`` is stable (same codes as the TypeScript SDK)."""

    code = "SDK_ERROR"

    def __init__(self, message, code=None):
        super().__init__(message)
        if code is not None:
            self.code = code


class WaitTimeout(ThawWorkerError, TimeoutError):
    """No outcome marker appeared within the timeout."""

    code = "SDK_WAIT_TIMEOUT"


# Callables run at every poll of ControlDir.wait, before the outcome is looked at (add_wait_hook): how a
# restored worker takes part in the restore before restore-complete (thaw_cuda.weights_hooks maps the
# weights thaw hands over on weights.sock). Module-level, since the wait and the hooks' owner need not share
# a ControlDir object.
_WAIT_HOOKS = []


def add_wait_hook(fn):
    """Runs ``fn()`` at every poll of ``ControlDir.wait`` until ``remove_wait_hook(fn)``."""
    if fn not in _WAIT_HOOKS:
        _WAIT_HOOKS.append(fn)


def remove_wait_hook(fn):
    if fn in _WAIT_HOOKS:
        _WAIT_HOOKS.remove(fn)


def _resolve_path(path):
    if path is not None:
        return os.fspath(path)
    return os.environ.get(CONTROL_DIR_ENV) or os.environ.get(LEGACY_CONTROL_DIR_ENV) or DEFAULT_CONTROL_DIR


def _write_atomic(directory, name, payload, mode=0o600):
    if payload is not None and not isinstance(payload, dict):
        raise ThawWorkerError("payload must be a dict (a JSON object)", "SDK_INVALID_PAYLOAD")
    data = b"" if payload is None else (json.dumps(payload) + "\n").encode("utf-8")
    tmp = os.path.join(directory, "%s%s-%d-%s" % (TEMP_PREFIX, name, os.getpid(), os.urandom(4).hex()))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(directory, name))
    except OSError as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ThawWorkerError("writing %s in %s failed: %s" % (name, directory, err), "SDK_WRITE_FAILED") from err
    # The rename is durable only once the directory is synced; not all filesystems allow it.
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


class _Inotify:
    """A minimal inotify watch on one directory, through ctypes on libc. Raises OSError if unavailable."""

    _IN_NONBLOCK = 0o4000
    _IN_CLOEXEC = 0o2000000
    _IN_CLOSE_WRITE = 0x00000008
    _IN_MOVED_TO = 0x00000080
    _IN_CREATE = 0x00000100

    def __init__(self, directory):
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name, use_errno=True)
        if not hasattr(libc, "inotify_init1"):
            raise OSError("libc has no inotify_init1")
        fd = libc.inotify_init1(self._IN_NONBLOCK | self._IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        mask = self._IN_CREATE | self._IN_MOVED_TO | self._IN_CLOSE_WRITE
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, os.strerror(err))
        self.fd = fd

    def wait(self, timeout_s):
        """Sleeps until an event or timeout_s; drains the events (their content does not matter)."""
        ready, _, _ = select.select([self.fd], [], [], timeout_s)
        if ready:
            try:
                while os.read(self.fd, 4096):
                    pass
            except BlockingIOError:
                pass

    def close(self):
        os.close(self.fd)


class ControlDir:
    """The worker's control directory.

    ``path``: default env ``SNAPSHOT_CONTROL_DIR``, then ``DYN_SNAPSHOT_CONTROL_DIR``, then
    ``/snapshot-control``. ``use_inotify``: wake on inotify events as well as on the 0.01 s poll
    (default False: see the module docstring on why the wait across a checkpoint polls).
    """

    def __init__(self, path=None, poll_interval_s=POLL_INTERVAL_S, use_inotify=False):
        self.path = _resolve_path(path)
        self.poll_interval_s = poll_interval_s
        self.use_inotify = use_inotify

    def __repr__(self):
        return "ControlDir(%r)" % (self.path,)

    def ready_for_checkpoint(self, payload=None):
        """Writes ready-for-checkpoint (content: ``payload`` as JSON, or empty).

        Call after releasing what need not be saved: the agent may freeze the process at any
        moment after this returns.
        """
        _write_atomic(self.path, READY_FOR_CHECKPOINT, payload)

    def outcome(self):
        """The Outcome present now, or None."""
        for name, outcome in _OUTCOME_FILES:
            if os.path.exists(os.path.join(self.path, name)):
                return outcome
        return None

    def wait(self, timeout_s=None):
        """Blocks until the agent reports an Outcome and returns it.

        ``timeout_s=None`` waits forever; otherwise raises WaitTimeout (a TimeoutError).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        watch = None
        if self.use_inotify:
            try:
                watch = _Inotify(self.path)
            except (OSError, AttributeError, TypeError):
                watch = None  # no inotify here: poll
        try:
            while True:
                for hook in list(_WAIT_HOOKS):
                    hook()
                found = self.outcome()
                if found is not None:
                    return found
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise WaitTimeout("no outcome in %s within %s s" % (self.path, timeout_s))
                step = self.poll_interval_s if left is None else min(self.poll_interval_s, left)
                if watch is not None:
                    watch.wait(step)
                else:
                    time.sleep(step)
        finally:
            if watch is not None:
                watch.close()

    def was_restored(self):
        """True when this process was restored from a checkpoint (restore-complete is present)."""
        return os.path.exists(os.path.join(self.path, RESTORE_COMPLETE))

    def payload(self, name):
        """The JSON object in marker ``name``: None if absent, {} if empty."""
        try:
            with open(os.path.join(self.path, str(name)), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if not data.strip():
            return {}
        try:
            value = json.loads(data.decode("utf-8"))
        except ValueError as err:
            raise ThawWorkerError("%s does not hold JSON" % name, "SDK_INVALID_PAYLOAD") from err
        if not isinstance(value, dict):
            raise ThawWorkerError("%s holds JSON that is not an object" % name, "SDK_INVALID_PAYLOAD")
        return value


def checkpoint_and_wait(release=None, resume=None, timeout_s=None, control_dir=None, payload=None):
    """The whole worker side in one call; returns the Outcome.

    Calls ``release()`` (free what need not be saved), writes ready-for-checkpoint, waits, and calls
    ``resume()`` after checkpoint-complete or restore-complete. On restore-failed ``resume`` is not
    called: the agent is abandoning this process and the cold start takes over. ``control_dir``: a
    ControlDir (default ``ControlDir()``). ``timeout_s=None`` waits forever. ``payload``: a dict, or a
    callable returning one, called after ``release()`` (e.g. ``thaw_cuda.memory_payload``: what the GPU
    holds once released is what the agent sets against the checkpoint's size).
    """
    cd = control_dir if control_dir is not None else ControlDir()
    if release is not None:
        release()
    cd.ready_for_checkpoint(payload() if callable(payload) else payload)
    outcome = cd.wait(timeout_s)
    if outcome != Outcome.RESTORE_FAILED and resume is not None:
        resume()
    return outcome


# ---- tensor-parallel workers: several ranks (one process per GPU) in one container ----

TP_SYNC_DIR_ENV = "THAW_TP_SYNC_DIR"


class RankBarrier:
    """A barrier of the ranks of one container through files in a directory they share.

    Files, not the ranks' own process group: the ranks meet here after their communicators are
    quiesced (destroyed or suspended) and before they come back, when no collective may run. Polling,
    no descriptor held: the wait spans the checkpoint (see the module docstring). ``sync_dir``: any
    directory of the container every rank can write (default env ``THAW_TP_SYNC_DIR``); not the
    control directory, which is the agent's protocol. ``generation`` tells checkpoints apart, so a
    stale file of an earlier one never counts.
    """

    def __init__(self, rank, world_size, sync_dir=None, poll_interval_s=POLL_INTERVAL_S):
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ThawWorkerError("rank %r is not in a world of %r" % (rank, world_size), "SDK_INVALID_RANK")
        path = sync_dir if sync_dir is not None else os.environ.get(TP_SYNC_DIR_ENV)
        if not path:
            raise ThawWorkerError("no sync directory for the ranks (%s)" % TP_SYNC_DIR_ENV, "SDK_NO_SYNC_DIR")
        self.rank = rank
        self.world_size = world_size
        self.path = path
        self.poll_interval_s = poll_interval_s

    def _name(self, phase, generation, rank):
        return "%s.%d.%d" % (phase, generation, rank)

    def arrive(self, phase, generation=0, payload=None):
        """Records that this rank reached ``phase`` (content: ``payload`` as JSON, or empty)."""
        _write_atomic(self.path, self._name(phase, generation, self.rank), payload)

    def wait_all(self, phase, generation=0, timeout_s=None):
        """Blocks until every rank arrived at ``phase``; returns their payloads by rank (None: empty)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        names = [self._name(phase, generation, r) for r in range(self.world_size)]
        while True:
            missing = [n for n in names if not os.path.exists(os.path.join(self.path, n))]
            if not missing:
                return [self._read(n) for n in names]
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout("ranks not at %s after %ss: %s" % (phase, timeout_s, ", ".join(missing)), "SDK_WAIT_TIMEOUT")
            time.sleep(self.poll_interval_s)

    def clear(self, phase, generation=0):
        """Removes every rank's file of ``phase`` (rank 0 does, once all have been seen)."""
        for r in range(self.world_size):
            try:
                os.unlink(os.path.join(self.path, self._name(phase, generation, r)))
            except FileNotFoundError:
                pass

    def _read(self, name):
        with open(os.path.join(self.path, name), "rb") as f:
            data = f.read()
        return json.loads(data) if data else None


def checkpoint_and_wait_ranks(
    barrier,
    release=None,
    quiesce=None,
    resume=None,
    timeout_s=None,
    control_dir=None,
    payload=None,
    generation=0,
):
    """checkpoint_and_wait for a tensor-parallel worker; every rank calls it, at the same step.

    Every rank calls ``release()`` (its KV pool) then ``quiesce()`` (its communicators: destroyed, or
    suspended where NCCL has ncclCommSuspend; after it no collective runs), and records that in the
    ``barrier``. Rank 0 waits for all ranks and writes the container's one ready-for-checkpoint
    (``payload``: a dict or a callable, plus ``tensorParallel`` and each rank's barrier payload under
    ``ranks``). So when the agent locks the ranks one after another, none is inside a collective
    waiting for a locked peer. Every rank then waits for the agent's answer in the shared control
    directory and, unless restore-failed, calls ``resume()`` (communicators back, KV pool back);
    ``resume`` of every rank must return before the worker reports healthy, which a collective inside
    it (an all-reduce over the re-created group) ensures for rank 0's health check.

    A rank that does not arrive within ``timeout_s`` means no ready-for-checkpoint: rank 0 raises
    WaitTimeout, and the caller resumes the ranks (nothing was checkpointed).
    """
    cd = control_dir if control_dir is not None else ControlDir()
    if release is not None:
        release()
    if quiesce is not None:
        quiesce()
    mine = payload() if callable(payload) else payload
    barrier.arrive("quiesced", generation, mine if barrier.rank != 0 else None)
    if barrier.rank == 0:
        ranks = barrier.wait_all("quiesced", generation, timeout_s)
        ready = dict(mine or {})
        ready["tensorParallel"] = barrier.world_size
        ready["ranks"] = [mine] + ranks[1:]
        cd.ready_for_checkpoint(ready)
    outcome = cd.wait(timeout_s)
    if barrier.rank == 0:
        barrier.clear("quiesced", generation)
    if outcome != Outcome.RESTORE_FAILED and resume is not None:
        resume()
    return outcome
