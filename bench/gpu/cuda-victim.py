#!/usr/bin/env python3
"""A tiny CUDA process for bench/gpu/check-real-driver.sh: holds a tensor on the GPU (default 1 GiB of
fp32 ones) and prints its sum as a JSON line every 50 ms. While thaw has it locked the prints stop; after
restore + unlock they go on with the same sum (the first line's, recorded as "expected")."""
import json
import os
import sys
import time

import torch

n = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 28
x = torch.ones(n, device="cuda")
first = float(x.sum())
print(json.dumps({"event": "ready", "pid": os.getpid(), "bytes": n * 4, "expected": first, "sum": first}), flush=True)
while True:
    print(json.dumps({"sum": float(x.sum()), "t": round(time.time(), 3)}), flush=True)
    time.sleep(0.05)
