"""The worker of test/integration/weights-restore.test.ts: the Python SDK's WeightsRegion through thaw.

argv: <sdk dir> <libcuda> <safetensors file>...  (the fake driver: native/fake-libcuda)
env:  WORKER_CHECKPOINT=1 asks thaw for a checkpoint (the source pod); otherwise the worker just serves.

It loads the files into one WeightsRegion, then (source) releases the region and waits for thaw with
``weights_hooks``: a restored copy takes thaw's handles during the wait and maps them at its VA. After
every step it writes ``worker-state.json`` in its control directory: its boot id (random at start, so a
restored process shows its source's), the region's VA, the sha256 of the bytes the region holds now
(read at the VA) and whether it was restored.
"""

import ctypes
import hashlib
import os
import sys
import time

sys.path.insert(0, sys.argv[1])
import thaw_cuda  # noqa: E402
import thaw_worker  # noqa: E402

STATE = "worker-state.json"


def main():
    libcuda, files = sys.argv[2], sys.argv[3:]
    control = thaw_worker.ControlDir()
    region = thaw_cuda.WeightsRegion.load(files, driver=thaw_cuda.Driver(libcuda))

    def held_sha():
        h = hashlib.sha256()
        for a in region.file_allocations:
            h.update(ctypes.string_at(region.ptr + a.offset, a.source["length"]))
        return h.hexdigest()

    boot = os.urandom(8).hex()
    base = {"boot": boot, "va": "0x%x" % region.ptr, "loadedSha": held_sha()}
    thaw_worker._write_atomic(control.path, STATE, dict(base, phase="loaded", restored=False, sha=base["loadedSha"]))
    if os.environ.get("WORKER_CHECKPOINT") == "1":
        release, resume = thaw_cuda.weights_hooks([region], control, timeout_s=20)
        outcome = thaw_worker.checkpoint_and_wait(release, resume, control_dir=control)
        thaw_worker._write_atomic(control.path, STATE, dict(
            base, phase=str(outcome), restored=control.was_restored(), sha=held_sha(), va="0x%x" % region.ptr))
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
