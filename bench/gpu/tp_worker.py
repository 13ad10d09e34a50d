"""The reference worker at tensor parallelism N (``worker.py --tensor-parallel N``; issue 16).

One process per GPU in one container: rank 0 is the process the container runs, and it starts ranks
1..N-1 as its children (the same script, ``--rank r``), so the container's tree holds every rank and one
CRIU dump takes them all. Every rank sees every GPU and uses GPU ``rank`` (the checkpoint's GPU map
then pairs all N GPUs of every rank). torch.distributed with NCCL; NVLink multicast stays off
(``NCCL_NVLS_ENABLE=0``: NVLS can put a host's shared GPUs out of service), P2P/NVLink transports on.

The model is worker.py's Qwen3 shape (``--shape 0.6b``, or ``8b`` for the Qwen3-8B shape) with random
weights, sharded Megatron-style: q/k/v and gate/up by output rows (each rank holds nh/N query heads and
nkv/N KV heads, its slice of the KV pool), o_proj and down_proj by input columns with an all-reduce
after each; embedding, norms and lm_head replicated. Every rank computes the same logits, so every rank
picks the same greedy token.

Checkpoint protocol (thaw_worker.checkpoint_and_wait_ranks): after warm-up every rank, at the same step,
releases its KV pool and destroys its process group (NCCL communicators, their bootstrap sockets and the
proxy threads go; a CUDA graph holding NCCL kernels goes with them), rank 0 writes the one
ready-for-checkpoint, and every rank waits on the shared control directory. On checkpoint-complete or
restore-complete every rank remaps its pool, re-creates its process group (a FileStore in the ranks'
sync directory: no TCP connection spans the checkpoint), runs one all-reduce and re-captures its graph;
rank 0 answers /healthz only after that, so "ready" means every rank's communicator is back.

Serving: rank 0 answers HTTP as worker.py does; for each generation it broadcasts the request
(a fixed-size int64 tensor) and every rank generates in lockstep.
"""

import json
import os
import subprocess
import sys
import tempfile

import thaw_cuda
import thaw_worker

QWEN3_8B = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
    attention_bias=False,
)
# The broadcast request: [command, n_prompt, max_new_tokens, prompt ids...]; command 1 = generate, 0 = stop.
REQ_SLOTS = 4096
CMD_STOP, CMD_GENERATE = 0, 1


def rank_env(world, sync_dir):
    env = dict(os.environ)
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLS multicast on the lent machines
    env[thaw_worker.TP_SYNC_DIR_ENV] = sync_dir
    env["WORLD_SIZE"] = str(world)
    return env


def spawn_peers(argv, world):
    """Rank 0: starts ranks 1..world-1 as children (inside the container's tree), same arguments."""
    sync_dir = os.environ.get(thaw_worker.TP_SYNC_DIR_ENV) or tempfile.mkdtemp(prefix="thaw-tp-")
    os.environ.update(rank_env(world, sync_dir))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
    peers = []
    for r in range(1, world):
        peers.append(subprocess.Popen([sys.executable, script, *argv, "--rank", str(r)], env=rank_env(world, sync_dir)))
    return sync_dir, peers


class Group:
    """The ranks' process group, destroyed before a checkpoint and re-created after it."""

    def __init__(self, w, rank, world, sync_dir):
        self.w, self.rank, self.world, self.sync_dir = w, rank, world, sync_dir
        self.generation = 0
        self.up = False

    def init(self):
        dist = self.w.torch.distributed
        store = os.path.join(self.sync_dir, "store.%d" % self.generation)
        dist.init_process_group(
            "nccl", init_method="file://" + store, rank=self.rank, world_size=self.world,
            device_id=self.w.torch.device("cuda", self.rank),
        )
        one = self.w.torch.ones(1, device="cuda")
        dist.all_reduce(one)  # the communicator is really up: every rank took part
        self.w.torch.cuda.synchronize()
        if int(one.item()) != self.world:
            raise RuntimeError("all-reduce over %d ranks gave %s" % (self.world, one.item()))
        self.up = True

    def destroy(self):
        self.w.torch.cuda.synchronize()
        self.w.torch.distributed.barrier()  # no rank still inside a collective
        self.w.torch.distributed.destroy_process_group()
        self.up = False
        self.generation += 1


def make_decoder_class(w):
    """TpDecoder, built on worker.py's Decoder once torch is imported (w is the worker module)."""
    torch, F = w.torch, w.F
    dist = torch.distributed

    class TpDecoder(w.Decoder):
        def __init__(self, model, pool, max_len, rank, world):
            cfg = model.config
            if cfg.num_attention_heads % world or cfg.num_key_value_heads % world or cfg.intermediate_size % world:
                raise SystemExit("heads/intermediate size do not divide by tensor parallelism %d" % world)
            self.rank, self.world = rank, world
            # The base class sizes the pool and the rotary tables from these; the shard has nh/N, nkv/N heads.
            self.nh_full, self.nkv_full = cfg.num_attention_heads, cfg.num_key_value_heads
            cfg_heads = (cfg.num_attention_heads, cfg.num_key_value_heads)
            cfg.num_attention_heads, cfg.num_key_value_heads = cfg_heads[0] // world, cfg_heads[1] // world
            try:
                super().__init__(model, pool, max_len)
            finally:
                cfg.num_attention_heads, cfg.num_key_value_heads = cfg_heads
            hd, nh, nkv = self.hd, self.nh, self.nkv
            inter = cfg.intermediate_size // world

            # Copies, not views: a view would keep the whole unsharded weight alive after the model goes.
            def rows(t, n):
                return t[rank * n:(rank + 1) * n].clone()

            def cols(t, n):
                return t[:, rank * n:(rank + 1) * n].contiguous().clone()

            self.shards = []
            for layer in self.layers:
                a, mlp = layer.self_attn, layer.mlp
                self.shards.append(dict(
                    q=rows(a.q_proj.weight, nh * hd), k=rows(a.k_proj.weight, nkv * hd), v=rows(a.v_proj.weight, nkv * hd),
                    o=cols(a.o_proj.weight, nh * hd), gate=rows(mlp.gate_proj.weight, inter), up=rows(mlp.up_proj.weight, inter),
                    down=cols(mlp.down_proj.weight, inter),
                    q_norm=a.q_norm.weight, k_norm=a.k_norm.weight,
                    ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
                ))
            self.layers = [None] * len(self.shards)  # the full layers are freed once the model is dropped

        def step(self):
            nh, nkv, hd = self.nh, self.nkv, self.hd
            x = self.embed.index_select(0, self.tok)
            cos, sin = self.cos.index_select(0, self.pos), self.sin.index_select(0, self.pos)
            bias = torch.where(self.positions <= self.pos, 0.0, float("-inf"))
            scale = hd ** -0.5
            for i, s in enumerate(self.shards):
                h = self._rms(x, s["ln1"])
                q = self._rms(F.linear(h, s["q"]).view(nh, hd), s["q_norm"])
                k = self._rms(F.linear(h, s["k"]).view(nkv, hd), s["k_norm"])
                v = F.linear(h, s["v"]).view(nkv, hd)
                q = q * cos + self._rot(q) * sin
                k = k * cos + self._rot(k) * sin
                self.kv[0, i].index_copy_(0, self.pos, k.unsqueeze(0))
                self.kv[1, i].index_copy_(0, self.pos, v.unsqueeze(0))
                qg = q.view(nkv, nh // nkv, hd).float()
                scores = torch.einsum("kgd,tkd->kgt", qg, self.kv[0, i].float()) * scale + bias
                p = torch.softmax(scores, dim=-1)
                o = torch.einsum("kgt,tkd->kgd", p, self.kv[1, i].float()).to(x.dtype).reshape(1, nh * hd)
                attn = F.linear(o, s["o"])
                dist.all_reduce(attn)
                x = x + attn
                h = self._rms(x, s["ln2"])
                mlp = F.linear(F.silu(F.linear(h, s["gate"])) * F.linear(h, s["up"]), s["down"])
                dist.all_reduce(mlp)
                x = x + mlp
            logits = F.linear(self._rms(x, self.norm), self.lm_head).float()
            self.logits.copy_(logits[0])
            best = torch.max(logits, dim=-1)
            self.top.index_copy_(0, self.pos, best.values)
            self.out.index_copy_(0, self.pos, best.indices)
            self.tok.copy_(best.indices)
            self.pos.add_(1)

    return TpDecoder


def run_rank(w, args):
    """Every rank: build, checkpoint protocol, then serve (rank 0) or follow rank 0's requests."""
    world, rank = args.tensor_parallel, args.rank
    sync_dir, peers = (spawn_peers(args.argv_for_peers, world) if rank == 0 else (os.environ[thaw_worker.TP_SYNC_DIR_ENV], []))
    import torch
    import torch.distributed  # noqa: F401

    torch.cuda.set_device(rank)  # before load_libraries' CUDA init: no rank makes a context on GPU 0
    w.load_libraries()
    group = Group(w, rank, world, sync_dir)
    group.init()
    w.phase("rank %d/%d: process group up" % (rank, world))
    if rank == 0:
        w.ensure_weights(args.weights_dir, args.seed)
    torch.distributed.barrier()  # the weights exist before any rank loads them
    model = w.load_model(args.weights_dir)
    if model.config.hidden_size != w.QWEN3_0_6B["hidden_size"]:
        # from_pretrained takes the saved config.json: weights of another shape in --weights-dir.
        raise SystemExit("%s holds hidden size %d, --shape %s wants %d" % (args.weights_dir, model.config.hidden_size, args.shape, w.QWEN3_0_6B["hidden_size"]))
    pool = w.KvPool(args.kv_backend, w.pool_size_bytes(args), device=rank)
    decoder = make_decoder_class(w)(model, pool, args.max_len, rank, world)
    del model
    torch.cuda.empty_cache()
    decoder.capture()
    w.phase("rank %d: CUDA graph captured: ready" % rank)
    facts = {"tensorParallel": world, "gpu": torch.cuda.get_device_name(rank), "kvPoolBytes": pool.size, "torch": torch.__version__}

    def generate(prompt, n):
        if rank == 0:
            req = torch.zeros(REQ_SLOTS, dtype=torch.long, device="cuda")
            req[:3] = torch.tensor([CMD_GENERATE, len(prompt), n])
            req[3:3 + len(prompt)] = torch.tensor(prompt)
            torch.distributed.broadcast(req, 0)
        return decoder.generate(prompt, n)

    state = {"restored": False, "outcome": None}
    if os.environ.get(thaw_worker.CONTROL_DIR_ENV) or os.environ.get(thaw_worker.LEGACY_CONTROL_DIR_ENV):
        def resume():
            pool.resume()
            group.init()
            decoder.capture()  # the old graph's NCCL kernels belonged to the destroyed communicators

        def payload():
            return {"rank": rank, **thaw_cuda.memory_payload(extra_tensor_bytes=pool.mapped_bytes if pool.vmm is not None else 0)}

        decoder.graph = None
        outcome = thaw_worker.checkpoint_and_wait_ranks(
            thaw_worker.RankBarrier(rank, world, sync_dir),
            release=lambda: pool.release(keep_pool=args.keep_pool),
            quiesce=group.destroy,
            resume=resume,
            payload=payload,
            generation=group.generation,
        )
        state["outcome"], state["restored"] = str(outcome), outcome == thaw_worker.Outcome.RESTORE_COMPLETE
        w.phase("rank %d resumed: %s" % (rank, outcome))
        if outcome == thaw_worker.Outcome.RESTORE_FAILED:
            return 1
    if rank != 0:
        req = torch.zeros(REQ_SLOTS, dtype=torch.long, device="cuda")
        while True:
            torch.distributed.broadcast(req, 0)
            cmd, n_prompt, n = (int(x) for x in req[:3].tolist())
            if cmd == CMD_STOP:
                return 0
            decoder.generate(req[3:3 + n_prompt].tolist(), n)
    return serve_http(w, args, state, facts, generate)


def serve_http(w, args, state, facts, generate):
    """Rank 0's HTTP: worker.py's endpoints, each generation broadcast to the peers first."""
    import http.server
    import time

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
                self._reply(200, {"tokens": generate(w.FIXED_PROMPT, args.new_tokens)})
            else:
                self._reply(404, {"error": "not found"})

        def do_POST(self):
            if self.path != "/generate":
                return self._reply(404, {"error": "not found"})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                prompt = [int(x) for x in req["prompt_ids"]]
                n = int(req.get("max_new_tokens", 16))
                if not prompt or len(prompt) + 3 > REQ_SLOTS or len(prompt) + n > args.max_len:
                    raise ValueError("prompt of %d + %d new tokens does not fit" % (len(prompt), n))
                t = time.monotonic()
                tokens = generate(prompt, n)
                self._reply(200, {"tokens": tokens, "ms": round((time.monotonic() - t) * 1000, 1)})
            except (KeyError, ValueError, TypeError) as e:
                self._reply(400, {"error": str(e)})

        def log_message(self, *a):
            pass

    # Single-threaded: generations are broadcast to the peers in order, one at a time.
    server = http.server.HTTPServer(("127.0.0.1", args.port), Handler)
    w.phase("rank 0 serving on 127.0.0.1:%d (tensor parallel %d)" % (args.port, args.tensor_parallel))
    server.serve_forever()
    return 0


def main_rank(w, args, argv):
    """Entry from worker.py main(): `argv` minus any --rank, for the peers rank 0 starts."""
    out = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--rank":
            skip = True
        elif not a.startswith("--rank="):
            out.append(a)
    args.argv_for_peers = out
    return run_rank(w, args)


if __name__ == "__main__":
    sys.stderr.write(json.dumps({"error": "run bench/gpu/worker.py --tensor-parallel N"}) + "\n")
    sys.exit(2)
