#!/usr/bin/env python3
"""What the CUDA driver saves of the reference worker, and what a worker can still release before it.

A GPU investigation tool, not part of the product: the parent process starts ``worker.py``'s cold start in a
child (model, VMM KV pool, CUDA graph), releases the pool as the worker does before a checkpoint, and then, for
each release step below, asks the driver to checkpoint the child (``cuCheckpointProcessLock`` +
``Checkpoint``, exactly what thaw's agent calls) and measures what it saved: the growth of the child's anonymous
host memory (the driver's host copy of the device state, which CRIU then dumps). It restores and unlocks the
child after each step; at the end the child remaps its pool and checks that the CUDA graph still gives the
tokens it gave before any step.

    python3 bench/gpu/memory-probe.py [--json PATH]      (root or the child's owner; one GPU)

Steps (each on top of the ones before): ``released`` (pool released + PyTorch's cache emptied, what the worker
does today), ``cublas-workspaces`` (PyTorch's cuBLAS workspaces freed), ``stack-limit-reset`` (the context's
stack-size limit set again, which makes the driver size its local-memory reserve anew), ``malloc-trim``
(glibc's free host memory returned to the kernel). After the first checkpoint it also counts the resident
anonymous pages of the child that hold only zeros (what a sparse pages image would leave out).
"""
import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CU_LIMIT_STACK_SIZE = 0x00
STEPS = ("released", "cublas-workspaces", "stack-limit-reset", "malloc-trim")


def anon_mappings(pid, top=15):
    """The process's largest anonymous resident mappings (what CRIU dumps of its host memory), from smaps."""
    maps, cur = [], None
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            head = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                cur = {"range": head[0], "perms": head[1], "name": head[5] if len(head) > 5 else ""}
                maps.append(cur)
            elif head and head[0] in ("Anonymous:", "Rss:", "AnonHugePages:") and cur is not None:
                cur[head[0][:-1]] = int(head[1]) * 1024
    maps = [m for m in maps if m.get("Anonymous", 0) > 0]
    maps.sort(key=lambda m: -m["Anonymous"])
    return {"anonymousBytes": sum(m["Anonymous"] for m in maps), "mappings": len(maps), "top": maps[:top]}


PAGE = 4096
ZERO_PAGE = bytes(PAGE)


def resident_zero_pages(pid, ranges):
    """Of the resident pages in ``ranges`` (pagemap bit 63), how many hold only zeros: bytes a sparse image
    would not need to store. Reads /proc/<pid>/mem (the process is locked by the driver while this runs)."""
    resident = zero = 0
    with open("/proc/%d/pagemap" % pid, "rb") as pm, open("/proc/%d/mem" % pid, "rb", buffering=0) as mem:
        for start, end in ranges:
            pm.seek(start // PAGE * 8)
            entries = pm.read((end - start) // PAGE * 8)
            for i in range(0, len(entries) // 8):
                if not entries[i * 8 + 7] & 0x80:
                    continue
                resident += 1
                mem.seek(start + i * PAGE)
                try:
                    if mem.read(PAGE) == ZERO_PAGE:
                        zero += 1
                except OSError:
                    pass
    return {"residentBytes": resident * PAGE, "zeroBytes": zero * PAGE}


def anon_ranges(pid):
    out = []
    for m in anon_mappings(pid, top=10 ** 6)["top"]:
        a, b = m["range"].split("-")
        out.append((int(a, 16), int(b, 16)))
    return out


def status_bytes(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------- the child
def child_main():
    sys.argv = [sys.argv[0]]
    sys.path.insert(0, HERE)
    import worker  # noqa: E402  (bench/gpu/worker.py: the reference worker's cold start)

    def out(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    args = argparse.Namespace(weights_dir=worker.DEFAULT_WEIGHTS_DIR, seed=1234, kv_backend="vmm", kv_gib=None,
                              kv_fraction=0.8, max_len=2048, new_tokens=32)
    worker.load_libraries()
    torch = worker.torch
    out({"event": "context", "usedGpuBytes": worker.used_gpu_bytes(), "rssAnon": status_bytes(os.getpid(), "RssAnon")})
    model, pool, decoder, facts = worker.build(args)
    del model
    before = decoder.generate(worker.FIXED_PROMPT, args.new_tokens)
    libcuda = ctypes.CDLL("libcuda.so.1")
    libc = ctypes.CDLL("libc.so.6")

    def facts_now(step):
        torch.cuda.synchronize()
        return {"event": "step", "step": step, "usedGpuBytes": worker.used_gpu_bytes(),
                "torchAllocated": torch.cuda.memory_allocated(), "torchReserved": torch.cuda.memory_reserved(),
                "rssAnon": status_bytes(os.getpid(), "RssAnon")}

    for line in sys.stdin:
        step = line.strip()
        if step == "released":
            pool.release()
        elif step == "cublas-workspaces":
            torch._C._cuda_clearCublasWorkspaces()
            torch.cuda.empty_cache()
        elif step == "stack-limit-reset":
            value = ctypes.c_size_t(0)
            rc_get = libcuda.cuCtxGetLimit(ctypes.byref(value), CU_LIMIT_STACK_SIZE)
            rc_set = libcuda.cuCtxSetLimit(CU_LIMIT_STACK_SIZE, value)
            out({"event": "note", "stackLimit": value.value, "cuCtxGetLimit": rc_get, "cuCtxSetLimit": rc_set})
        elif step == "malloc-trim":
            import gc
            gc.collect()
            libc.malloc_trim(0)
        elif step == "finish":
            pool.resume()
            after = decoder.generate(worker.FIXED_PROMPT, args.new_tokens)
            out({"event": "finish", "tokensMatch": after == before, "usedGpuBytes": worker.used_gpu_bytes()})
            return 0
        out(facts_now(step))
    return 1


# --------------------------------------------------------------------------------------------- the parent
class LockArgs(ctypes.Structure):
    _fields_ = [("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint), ("reserved1", ctypes.c_uint64 * 7)]


def checkpoint_cycle(libcuda, pid, scan_zero_pages=False):
    """Lock + checkpoint the child, read what its host memory grew by, restore + unlock. Times in ms."""
    def call(name, *a):
        t = time.monotonic()
        rc = getattr(libcuda, name)(*a)
        if rc != 0:
            raise RuntimeError("%s(%d) -> CUresult %d" % (name, pid, rc))
        return round((time.monotonic() - t) * 1000, 1)

    anon_before = status_bytes(pid, "RssAnon")
    lock = LockArgs(timeoutMs=10000)
    times = {"lockMs": call("cuCheckpointProcessLock", pid, ctypes.byref(lock)),
             "checkpointMs": call("cuCheckpointProcessCheckpoint", pid, None)}
    saved = status_bytes(pid, "RssAnon") - anon_before
    if scan_zero_pages:
        t = time.monotonic()
        times["zeroPages"] = resident_zero_pages(pid, anon_ranges(pid))
        times["zeroScanMs"] = round((time.monotonic() - t) * 1000)
    anon_checkpointed = status_bytes(pid, "RssAnon")
    times["restoreMs"] = call("cuCheckpointProcessRestore", pid, None)
    times["unlockMs"] = call("cuCheckpointProcessUnlock", pid, None)
    return {"savedHostBytes": saved, "rssAnonAtCheckpoint": anon_checkpointed, **times}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "memory-probe.json"))
    a = p.parse_args()
    if a.child:
        return child_main()
    libcuda = ctypes.CDLL("libcuda.so.1")
    assert libcuda.cuInit(0) == 0
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    report = {"steps": []}

    def read_event():
        while True:
            line = child.stdout.readline()
            if not line:
                raise RuntimeError("the child ended (exit %s)" % child.poll())
            if line.startswith("{"):
                return json.loads(line)

    report["context"] = read_event()
    for step in STEPS:
        child.stdin.write(step + "\n")
        child.stdin.flush()
        event = read_event()
        while event.get("event") == "note":
            report.setdefault("notes", []).append(event)
            event = read_event()
        if step == "released":
            event["anonMappings"] = anon_mappings(child.pid)
        event.update(checkpoint_cycle(libcuda, child.pid, scan_zero_pages=step == "released"))
        report["steps"].append(event)
        print(json.dumps(event), flush=True)
    child.stdin.write("finish\n")
    child.stdin.flush()
    report["finish"] = read_event()
    child.wait(timeout=60)
    print(json.dumps(report["finish"]), flush=True)
    with open(a.json, "w") as f:
        json.dump(report, f, indent=2)
    return 0 if report["finish"].get("tokensMatch") else 1


if __name__ == "__main__":
    sys.exit(main())
