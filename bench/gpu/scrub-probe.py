#!/usr/bin/env python3
"""How long after another process freed GPU memory a new allocation of it is slow (the driver's scrub).

A GPU investigation tool, not part of the product. bench:gpu deletes each restored pod (its ~110 GB KV pool
goes back to the driver) and restores the next one at once; the restored worker's remap of its pool
(cuMemCreate + cuMemMap + cuMemSetAccess) then took 3 ms after a pause and ~65 ms without one. This probe
measures that apart from thaw: a child process maps and zeroes a pool of PROBE_GB and exits; after `delay`
seconds the parent (CUDA context up, pool address range reserved) maps the same size and times it, and samples
`nvidia-smi`'s memory.used from the child's exit on.

    python3 bench/gpu/scrub-probe.py [--gb 110] [--json PATH]      (one GPU, nothing else on it)
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "sdk", "python"))
import thaw_cuda  # noqa: E402

CHILD = """
import sys
sys.path.insert(0, %r)
import thaw_cuda
pool = thaw_cuda.VmmPool(%d, zero_fill=True)
pool.driver.synchronize()
"""


def used_mib():
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.strip() else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=int, default=110)
    ap.add_argument("--json")
    ap.add_argument("--delays", default="0,0.5,1,2,3,5")
    args = ap.parse_args()
    size = args.gb << 30
    pool = thaw_cuda.VmmPool(size, zero_fill=False)
    pool.release()
    sdk = os.path.join(HERE, "..", "..", "sdk", "python")

    def map_ms():
        t = time.monotonic()
        pool.remap(zero_fill=False)
        ms = (time.monotonic() - t) * 1000
        pool.release()
        return round(ms, 1)

    report = {"gb": args.gb, "idleMapMs": [map_ms() for _ in range(3)], "rounds": []}
    for delay in [float(d) for d in args.delays.split(",")]:
        for rep in range(2):
            subprocess.run([sys.executable, "-c", CHILD % (sdk, size)], check=True)
            exited = time.monotonic()
            samples = []
            stop = threading.Event()

            def sample():
                while not stop.is_set() and time.monotonic() - exited < delay + 0.5:
                    samples.append((round((time.monotonic() - exited) * 1000), used_mib()))

            th = threading.Thread(target=sample)
            th.start()
            time.sleep(delay)
            ms = map_ms()
            stop.set()
            th.join()
            report["rounds"].append({"delayS": delay, "mapMs": ms, "usedMibAfterExit": samples})
            print("delay %.1f s: map %.1f ms; memory.used %s" % (delay, ms, samples[:12]), flush=True)
    print("idle map ms %s" % report["idleMapMs"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
