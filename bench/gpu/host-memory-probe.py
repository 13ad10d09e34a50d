#!/usr/bin/env python3
"""Where the reference worker's anonymous host memory comes from (what CRIU dumps of the process): RssAnon and
the [heap] after each cold-start step, for the worker's way of loading the weights (to the CPU, then .to("cuda"))
and for loading them straight onto the GPU. A GPU investigation tool: python3 bench/gpu/host-memory-probe.py"""
import json, os, subprocess, sys

STEPS = r'''
import json, os, sys, time
sys.path.insert(0, os.path.join(%(here)r))
def anon():
    heap = 0
    with open("/proc/self/smaps") as f:
        cur = None
        for line in f:
            if "[heap]" in line: cur = "heap"
            elif line[0] in "0123456789abcdef" and "-" in line.split()[0]: cur = None
            elif cur == "heap" and line.startswith("Anonymous:"): heap = int(line.split()[1]) * 1024
    with open("/proc/self/status") as f:
        rss = [int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:")][0]
    return {"rssAnon": rss, "heap": heap}
out = []
def mark(name): out.append(dict(step=name, **anon()))
mark("start")
import torch; mark("import torch")
torch.cuda.init(); torch.zeros(1, device="cuda"); mark("cuda init")
import transformers; mark("import transformers")
import worker
worker.torch, worker.transformers = torch, transformers
cls = transformers.Qwen3ForCausalLM
kw = {"dtype": torch.bfloat16}
if %(direct)r: kw["device_map"] = "cuda"
model = cls.from_pretrained(%(weights)r, **kw); mark("from_pretrained")
model = model.to("cuda").eval(); torch.cuda.synchronize(); mark("to cuda")
import gc; gc.collect(); mark("gc")
print(json.dumps(out))
'''

def main():
    here = os.path.dirname(os.path.abspath(__file__))
    weights = os.environ.get("THAW_WEIGHTS_DIR", "/tmp/thaw-qwen3-0.6b-random")
    report = {}
    for direct in (False, True):
        code = STEPS % {"here": here, "weights": weights, "direct": direct}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        lines = [l for l in r.stdout.splitlines() if l.startswith("[")]
        report["device_map_cuda" if direct else "cpu_then_cuda"] = json.loads(lines[-1]) if lines else r.stderr[-2000:]
    text = json.dumps(report, indent=1)
    print(text)
    if os.environ.get("OUT"):
        open(os.path.join(os.environ["OUT"], "host-memory-probe.json"), "w").write(text)

if __name__ == "__main__":
    main()
