#!/usr/bin/env python3
"""A CPU stand-in for bench/gpu/worker.py, for checking bench/gpu/product.ts on a machine without a GPU.

It takes worker.py's flags and speaks the same protocols — the control directory (thaw_worker), the JSON lines
(`tokens` at ready, `quiesced` at checkpoint time) and HTTP (/healthz, /tokens) — but its "model" is a
deterministic buffer of --memory-mb (default 64) and its "tokens" are derived from that buffer's bytes, so a
restore that lost or changed memory answers differently. Standard library only.

``--tensor-parallel N``: rank 0 starts ranks 1..N-1 as its children (as worker.py does), each with its own
buffer; the ranks coordinate through thaw_worker.checkpoint_and_wait_ranks (one ready-for-checkpoint for the
container), and rank 0's tokens hash every rank's buffer as each rank reports it at start and after resuming,
so a restore that lost one rank's memory, or a rank, answers differently or never gets ready.
"""

import argparse
import hashlib
import http.server
import json
import os
import random
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.environ.get("THAW_SDK_DIR") or os.path.join(HERE, "..", "..", "sdk", "python"))

import thaw_worker  # noqa: E402


def rss_anon_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def tokens_of(buf, n):
    """n "tokens" from the buffer: a hash chain over its pages, so every byte counts."""
    h = hashlib.sha256()
    for off in range(0, len(buf), 1 << 20):
        h.update(buf[off : off + (1 << 20)])
    seed = h.digest()
    return [int.from_bytes(hashlib.sha256(seed + i.to_bytes(4, "little")).digest()[:4], "little") % 151936 for i in range(n)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--print-tokens", action="store_true")
    p.add_argument("--weights-dir")
    p.add_argument("--keep-pool", action="store_true")
    p.add_argument("--kv-gib", type=float)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--memory-mb", type=int, default=int(os.environ.get("STANDIN_MEMORY_MB", "64")))
    p.add_argument("--prepare-weights", action="store_true")
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument("--rank", type=int, default=0)
    # worker.py's model flags: the shape is only reported (facts), the "weights" are the buffer either way.
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--weights", choices=("vmm", "torch"), default="torch")
    args = p.parse_args(argv)
    sys.path.insert(0, HERE)
    import worker  # noqa: E402  (its model table and parameter count need no torch)

    if args.model not in worker.MODELS:
        raise SystemExit("unknown --model %s" % args.model)
    facts = {"model": args.model, "paramsB": round(worker.params_of(worker.MODELS[args.model]) / 1e9, 3),
             "weights": args.weights, "weightsBytes": args.memory_mb << 20}
    if args.prepare_weights:
        print(json.dumps({"event": "weights", "dir": args.weights_dir, "created": False, "paths": sys.path}), flush=True)
        return 0
    rng = random.Random(1234 + args.rank)
    buf = bytearray(rng.randbytes(args.memory_mb << 20))
    world = args.tensor_parallel
    barrier = None
    if world > 1:
        if args.rank == 0:
            os.environ[thaw_worker.TP_SYNC_DIR_ENV] = tempfile.mkdtemp(prefix="thaw-tp-")
            script = os.path.abspath(__file__)
            peer_argv = [a for a in (sys.argv[1:] if argv is None else argv)]
            for r in range(1, world):
                subprocess.Popen([sys.executable, script, *peer_argv, "--rank", str(r)])
        barrier = thaw_worker.RankBarrier(args.rank, world)
    peers = {"digests": []}

    def report(phase, generation):
        """Every rank posts its buffer's digest; rank 0 collects the peers' (after start, after a resume)."""
        if barrier is None:
            return
        barrier.arrive(phase, generation, {"digest": hashlib.sha256(buf).hexdigest()})
        if args.rank == 0:
            peers["digests"] = [d["digest"] for d in barrier.wait_all(phase, generation, 120)[1:]]

    def current_tokens():
        extra = "".join(peers["digests"]).encode()
        return tokens_of(bytes(buf) + extra, args.new_tokens) if extra else tokens_of(buf, args.new_tokens)

    report("started", 0)
    tokens = current_tokens()
    if args.print_tokens and args.rank == 0:  # rank 0 speaks for the worker
        print(json.dumps({"event": "tokens", "phase": "ready", "tokens": tokens}), flush=True)
    state = {"restored": False, "outcome": None}
    if os.environ.get(thaw_worker.CONTROL_DIR_ENV) or os.environ.get(thaw_worker.LEGACY_CONTROL_DIR_ENV):

        def release():
            rss = rss_anon_bytes()
            print(json.dumps({"event": "quiesced", "rssAnonBytes": rss, "liveBytes": rss}), flush=True)

        payload = {"worker": "bench/gpu/standin-worker.py"}
        if barrier is None:
            outcome = thaw_worker.checkpoint_and_wait(release=release, payload=payload)
        else:
            outcome = thaw_worker.checkpoint_and_wait_ranks(
                barrier,
                release=release if args.rank == 0 else None,
                resume=lambda: report("resumed", 1),
                payload=payload,
            )
        state["outcome"] = str(outcome)
        state["restored"] = outcome == thaw_worker.Outcome.RESTORE_COMPLETE
        if outcome == thaw_worker.Outcome.RESTORE_FAILED:
            return 1
    if args.rank != 0:
        while True:
            signal.pause()  # a peer rank holds its memory; rank 0 serves

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self, code, body):
            data = (json.dumps(body) + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/healthz":
                self._reply(200, {"ok": True, **state, "facts": facts})
            elif self.path == "/tokens":
                self._reply(200, {"tokens": current_tokens()})
            else:
                self._reply(404, {"error": "not found"})

        def log_message(self, *a):
            pass

    http.server.HTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
