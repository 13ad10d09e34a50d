#!/usr/bin/env python3
"""The GPU reference worker of issue 4: what thaw checkpoints and restores on the H100.

A Qwen3-0.6B-shaped model (28 layers, hidden 1024, vocab 151936, bf16) with RANDOM weights (no hub
access: created once and saved as safetensors), loaded through transformers; a KV pool from
``thaw_cuda.VmmPool`` taking most free GPU memory (``--kv-backend torch`` for a plain tensor instead);
warm-up and a CUDA graph of one decode step that reads and writes the pool; then greedy generation.

Modes:
  --selftest   load → capture → generate → release the pool → remap → generate, and check that the
               tokens are equal, that the graph matches eager execution and that release really gave the
               memory back. No CRIU, no agent. Writes a JSON report (--json, else $OUT/worker-selftest.json
               when $OUT is set) and exits 0 only when every check passed.
  --tensor-parallel N  serve as N ranks, one process per GPU, the model sharded (bench/gpu/tp_worker.py).
  (default)    serve: with SNAPSHOT_CONTROL_DIR set, release the pool + empty PyTorch's cache, write
               ready-for-checkpoint and wait (thaw_worker.checkpoint_and_wait), remap on
               checkpoint-complete / restore-complete; then answer HTTP on 127.0.0.1:--port:
               GET /healthz, GET /tokens (the fixed prompt's tokens), POST /generate
               {"prompt_ids": [...], "max_new_tokens": n}. --print-tokens prints the fixed prompt's tokens
               as a JSON line before the checkpoint and after checkpoint-complete (a restored worker
               serves at once; ask its /tokens), to compare across a checkpoint.

Phase times (seconds since the process started, from /proc) go to stderr as JSON lines.

The decode step is written out in plain torch over the model's weights (embedding, per-layer RMSNorm,
q/k/v with Qwen3's per-head q/k RMSNorm, RoPE, grouped-query attention over the pool, SwiGLU MLP,
final norm, tied lm_head) instead of transformers' generate: static shapes, one token, positions in a
device tensor, so one CUDA graph serves every step and its KV pointers are the pool's addresses.
"""

import argparse
import json
import os
import sys
import time

_T0 = time.monotonic()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.environ.get("THAW_SDK_DIR") or os.path.join(HERE, "..", "..", "sdk", "python"))

import thaw_cuda  # noqa: E402  (stdlib only)
import thaw_worker  # noqa: E402

# Qwen3-0.6B's shape (its config.json on the hub).
QWEN3_0_6B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    attention_bias=False,
)
# The public Qwen3 shapes (each model's config.json on the hub); --model picks one (random weights, bf16).
MODELS = {
    "qwen3-0.6b": dict(QWEN3_0_6B),
    "qwen3-4b": dict(QWEN3_0_6B, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(QWEN3_0_6B, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen3-14b": dict(QWEN3_0_6B, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
}


def params_of(cfg):
    """The parameter count of a Qwen3 shape (embedding, per-layer attention + q/k norms + MLP + 2 norms, final
    norm, lm_head unless tied)."""
    h, i, n, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    layer = h * q + 2 * h * kv + q * h + 2 * hd + 3 * h * i + 2 * h
    emb = cfg["vocab_size"] * h
    return emb + n * layer + h + (0 if cfg["tie_word_embeddings"] else emb)


FIXED_PROMPT = [151643, 785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13]
DEFAULT_WEIGHTS_DIR = "/tmp/thaw-qwen3-0.6b-random"
GiB = 1 << 30


def since_process_start():
    """Seconds since this process started (/proc/self/stat starttime vs /proc/uptime); monotonic fallback."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        return round(time.monotonic() - _T0, 3)


PHASES = {}


def phase(name):
    PHASES[name] = since_process_start()
    # "t" (epoch seconds) lines a restored process's phases up with the agent's restore event (bench:gpu).
    sys.stderr.write(json.dumps({"event": "phase", "name": name, "s": PHASES[name], "t": round(time.time(), 4)}) + "\n")
    sys.stderr.flush()


def load_libraries():
    global torch, F, transformers
    import torch  # noqa: F811
    import torch.nn.functional as F  # noqa: F811

    phase("import torch")
    import transformers  # noqa: F811

    phase("import transformers")
    torch.cuda.init()
    torch.cuda.synchronize()
    phase("CUDA initialised")


def qwen3_config():
    return transformers.Qwen3Config(**QWEN3_0_6B)


def rope_theta(cfg):
    """transformers 4.x has config.rope_theta; 5.x moved it into config.rope_parameters."""
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    return float(theta if theta is not None else QWEN3_0_6B["rope_theta"])


def ensure_weights(weights_dir, seed):
    """Random weights, created once (seeded, so every node makes the same ones) and saved as safetensors."""
    marker = os.path.join(weights_dir, "model.safetensors")
    if os.path.exists(marker) or os.path.exists(os.path.join(weights_dir, "model.safetensors.index.json")):
        return False
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = transformers.Qwen3ForCausalLM(qwen3_config()).to(torch.bfloat16)
    tmp = weights_dir + ".tmp-%d" % os.getpid()
    # Shards of at most 5 GB, as the published Qwen3 checkpoints are (Qwen3-8B: 5 files, 14B: 8): a node hashes and
    # reads each file on a stream of its own, so one 16 GB file would measure a layout no model ships in.
    try:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
    except TypeError:  # versions where safetensors is the only format
        model.save_pretrained(tmp, max_shard_size="5GB")
    os.rename(tmp, weights_dir)
    del model
    torch.cuda.empty_cache()
    return True


def weight_files(weights_dir):
    """The safetensors files save_pretrained wrote (one, or the shards its index names)."""
    index = os.path.join(weights_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(weights_dir, n) for n in names]
    return [os.path.join(weights_dir, "model.safetensors")]


def load_model_vmm(weights_dir):
    """The model with its parameters as views into one thaw_cuda.WeightsRegion (weights outside the checkpoint).

    The module tree is built on the meta device (no memory), then every parameter is replaced by the region's
    tensor of the same name, so the region is the only copy on the GPU and a CUDA graph captured later reads
    the region's addresses (which a restore maps back at the same VA). Returns (model, region).
    """
    region = thaw_cuda.WeightsRegion.load(weight_files(weights_dir))
    cfg = transformers.Qwen3Config.from_pretrained(weights_dir)
    with torch.device("meta"):
        model = transformers.Qwen3ForCausalLM(cfg)
    names = set(region.tensors_info)
    for name, _param in list(model.named_parameters()):
        if name not in names:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise SystemExit("%s: no tensor %s in the weights files" % (weights_dir, name))
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(region.tensor(name), requires_grad=False))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval(), region


def pinned_h2d_gbps(nbytes=1 << 30, rounds=3):
    """The best of `rounds` copies of `nbytes` from pinned host memory to the GPU (decimal GB/s): the ceiling
    of the weights service's copies on this machine."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = 0.0
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.monotonic()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, nbytes / 1e9 / (time.monotonic() - t))
    del host, dev
    torch.cuda.empty_cache()
    return round(best, 2)


def load_model(weights_dir):
    cls = transformers.Qwen3ForCausalLM
    try:  # transformers 5 names it dtype; 4.x torch_dtype
        model = cls.from_pretrained(weights_dir, dtype=torch.bfloat16)
    except TypeError:
        model = cls.from_pretrained(weights_dir, torch_dtype=torch.bfloat16)
    return model.to("cuda").eval()


class KvPool:
    """The KV pool: a thaw_cuda.VmmPool (release/remap keep its addresses) or a plain torch tensor."""

    def __init__(self, backend, size_bytes, device=0):
        self.backend = backend
        if backend == "vmm":
            self.vmm = thaw_cuda.VmmPool(size_bytes, device=device)
            self.flat = self.vmm.as_tensor(torch.bfloat16)
            self.size = self.vmm.size
        else:
            self.vmm = None
            self.flat = torch.zeros(size_bytes // 2, dtype=torch.bfloat16, device="cuda")
            self.size = self.flat.numel() * 2

    @property
    def ptr(self):
        return self.flat.data_ptr()

    def release(self, keep_pool=False):
        """Frees what need not be saved: the pool's physical memory (unless keep_pool) and PyTorch's cache."""
        if self.vmm is not None and not keep_pool:
            self.vmm.release()
        thaw_cuda.release_pytorch_cache()

    @property
    def mapped_bytes(self):
        """GPU bytes the pool holds now (a released VMM pool holds none)."""
        if self.vmm is not None:
            return self.vmm.size if self.vmm.mapped else 0
        return self.size

    def resume(self):
        if self.vmm is not None and not self.vmm.mapped:
            # Timed apart for bench:gpu: what the context still had queued (a restore's tail), then the remap itself.
            self.vmm.driver.synchronize()
            phase("resume: earlier GPU work done")
            # The mapping (cuMemCreate + cuMemMap + cuMemSetAccess) apart from the zeroing, which is what
            # remap(zero_fill=True) does in one call: masked positions must not hold NaN bits (0 * NaN = NaN).
            self.vmm.remap(zero_fill=False)
            phase("resume: pool mapped")
            self.vmm.driver.call("zero the pool", "cuMemsetD8_v2", self.vmm.ptr, 0, self.vmm.size)
            phase("resume: pool zero queued")
            self.vmm.driver.synchronize()
            phase("resume: pool remapped")


class Decoder:
    """Greedy decoding of one token per step over the pool, capturable as one CUDA graph."""

    def __init__(self, model, pool, max_len):
        cfg = model.config
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.max_len = max_len
        m = model.model
        self.embed = m.embed_tokens.weight
        self.layers = list(m.layers)
        self.norm = m.norm.weight
        self.lm_head = model.lm_head.weight
        n_layers = len(self.layers)
        kv_elems = 2 * n_layers * max_len * self.nkv * self.hd
        if kv_elems * 2 > pool.size:
            raise SystemExit("KV cache of %d bytes does not fit the pool (%d)" % (kv_elems * 2, pool.size))
        self.kv = pool.flat[:kv_elems].view(2, n_layers, max_len, self.nkv, self.hd)
        inv_freq = 1.0 / (rope_theta(cfg) ** (torch.arange(0, self.hd, 2, device="cuda", dtype=torch.float32) / self.hd))
        freqs = torch.outer(torch.arange(max_len, device="cuda", dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
        self.positions = torch.arange(max_len, device="cuda")
        self.tok = torch.zeros(1, dtype=torch.long, device="cuda")
        self.pos = torch.zeros(1, dtype=torch.long, device="cuda")
        self.out = torch.zeros(max_len, dtype=torch.long, device="cuda")
        self.logits = torch.zeros(cfg.vocab_size, dtype=torch.float32, device="cuda")
        # The winning logit of every step: random weights make greedy tokens repetitive, so equal tokens
        # alone prove little; equal logits (bit for bit) show the remapped run computed the same thing.
        self.top = torch.zeros(max_len, dtype=torch.float32, device="cuda")
        self.graph = None

    def _rms(self, x, w):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    @staticmethod
    def _rot(x):
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

    def step(self):
        """Consumes self.tok at self.pos; writes the next token to self.tok and self.out[pos]; pos += 1."""
        nh, nkv, hd = self.nh, self.nkv, self.hd
        x = self.embed.index_select(0, self.tok)  # (1, hidden)
        cos, sin = self.cos.index_select(0, self.pos), self.sin.index_select(0, self.pos)  # (1, hd)
        bias = torch.where(self.positions <= self.pos, 0.0, float("-inf"))  # (T,)
        scale = hd ** -0.5
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            h = self._rms(x, layer.input_layernorm.weight)
            q = self._rms(F.linear(h, a.q_proj.weight).view(nh, hd), a.q_norm.weight)
            k = self._rms(F.linear(h, a.k_proj.weight).view(nkv, hd), a.k_norm.weight)
            v = F.linear(h, a.v_proj.weight).view(nkv, hd)
            q = q * cos + self._rot(q) * sin
            k = k * cos + self._rot(k) * sin
            self.kv[0, i].index_copy_(0, self.pos, k.unsqueeze(0))
            self.kv[1, i].index_copy_(0, self.pos, v.unsqueeze(0))
            qg = q.view(nkv, nh // nkv, hd).float()
            scores = torch.einsum("kgd,tkd->kgt", qg, self.kv[0, i].float()) * scale + bias
            p = torch.softmax(scores, dim=-1)
            o = torch.einsum("kgt,tkd->kgd", p, self.kv[1, i].float()).to(x.dtype).reshape(1, nh * hd)
            x = x + F.linear(o, a.o_proj.weight)
            h = self._rms(x, layer.post_attention_layernorm.weight)
            mlp = layer.mlp
            x = x + F.linear(F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight), mlp.down_proj.weight)
        logits = F.linear(self._rms(x, self.norm), self.lm_head).float()  # (1, V)
        self.logits.copy_(logits[0])
        best = torch.max(logits, dim=-1)
        nxt = best.indices
        self.top.index_copy_(0, self.pos, best.values)
        self.out.index_copy_(0, self.pos, nxt)
        self.tok.copy_(nxt)
        self.pos.add_(1)

    def capture(self, warmups=3):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(warmups):
                self.tok.fill_(0)
                self.pos.fill_(0)
                self.step()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        self.tok.fill_(0)
        self.pos.fill_(0)
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.step()
        torch.cuda.synchronize()

    def generate(self, prompt_ids, max_new_tokens, use_graph=True):
        if not prompt_ids or len(prompt_ids) + max_new_tokens > self.max_len:
            raise ValueError("prompt of %d + %d new tokens exceeds %d" % (len(prompt_ids), max_new_tokens, self.max_len))
        run = self.graph.replay if use_graph and self.graph is not None else self.step
        with torch.no_grad():
            for i, t in enumerate(prompt_ids):
                self.tok.fill_(int(t))
                self.pos.fill_(i)
                run()
            for _ in range(max_new_tokens - 1):
                run()
        torch.cuda.synchronize()
        start = len(prompt_ids) - 1
        self.last_top = self.top[start:start + max_new_tokens].tolist()
        return self.out[start:start + max_new_tokens].tolist()


def used_gpu_bytes():
    free, total = torch.cuda.mem_get_info()
    return total - free


def pool_size_bytes(args):
    if args.kv_gib is not None:
        return int(args.kv_gib * GiB)
    free, _ = torch.cuda.mem_get_info()
    return int(free * args.kv_fraction)


def build(args):
    """Everything a cold start does; returns (model, pool, decoder, facts)."""
    load_libraries()
    created = ensure_weights(args.weights_dir, args.seed)
    phase("weights on disk" + (" (created)" if created else ""))
    region = None
    if args.weights == "vmm":
        model, region = load_model_vmm(args.weights_dir)
    else:
        model = load_model(args.weights_dir)
    torch.cuda.synchronize()
    phase("weights loaded to GPU")
    pool = KvPool(args.kv_backend, pool_size_bytes(args))
    phase("KV pool allocated")
    decoder = Decoder(model, pool, args.max_len)
    decoder.capture()
    phase("CUDA graph captured: ready")
    facts = {
        "model": args.model,
        "paramsB": round(params_of(QWEN3_0_6B) / 1e9, 3),
        "weights": args.weights,
        "weightsBytes": sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()),
        "kvBackend": args.kv_backend,
        "kvPoolBytes": pool.size,
        "kvPoolPtr": pool.ptr,
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "usedGpuBytesReady": used_gpu_bytes(),
    }
    global WEIGHTS_REGION
    WEIGHTS_REGION = region
    return model, pool, decoder, facts


WEIGHTS_REGION = None


def hf_check(model, decoder, prompt):
    """How close the hand-written step is to transformers' own forward (informational: random weights)."""
    try:
        decoder.generate(prompt, 1, use_graph=False)
        mine = decoder.logits.clone()
        with torch.no_grad():
            ref = model(torch.tensor([prompt], device="cuda")).logits[0, -1].float()
        return {
            "maxAbsDiff": float((mine - ref).abs().max()),
            "refMaxAbs": float(ref.abs().max()),
            "argmaxEqual": int(mine.argmax()) == int(ref.argmax()),
        }
    except Exception as e:  # the check must never break the selftest
        return {"error": "%s: %s" % (type(e).__name__, e)}


def selftest(args):
    model, pool, decoder, facts = build(args)
    report = {"mode": "selftest", "facts": facts, "checks": {}}
    n = args.new_tokens
    t = time.monotonic()
    before = decoder.generate(FIXED_PROMPT, n)
    top_before = decoder.last_top
    report["generateMs"] = round((time.monotonic() - t) * 1000, 1)
    eager = decoder.generate(FIXED_PROMPT, n, use_graph=False)
    used_before = used_gpu_bytes()
    ptr = pool.ptr
    t = time.monotonic()
    pool.release()
    torch.cuda.synchronize()
    report["releaseMs"] = round((time.monotonic() - t) * 1000, 1)
    used_released = used_gpu_bytes()
    t = time.monotonic()
    pool.resume()
    torch.cuda.synchronize()
    report["remapMs"] = round((time.monotonic() - t) * 1000, 1)
    used_remapped = used_gpu_bytes()
    after = decoder.generate(FIXED_PROMPT, n)
    top_after = decoder.last_top
    report["tokens"] = {"before": before, "eager": eager, "afterRemap": after}
    report["usedGpuBytes"] = {"beforeRelease": used_before, "released": used_released, "remapped": used_remapped}
    report["topLogits"] = {"before": top_before, "afterRemap": top_after}
    report["checks"]["tokensEqualAfterRemap"] = before == after
    report["checks"]["logitsEqualAfterRemap"] = top_before == top_after
    report["checks"]["logitsVary"] = len(set(top_before)) > 1  # the prompt really was computed on
    report["checks"]["graphEqualsEager"] = before == eager
    report["checks"]["poolAddressKept"] = pool.ptr == ptr
    if args.kv_backend == "vmm":
        report["checks"]["releaseFreedThePool"] = used_before - used_released >= 0.9 * pool.size
    report["hfCheck"] = hf_check(model, decoder, FIXED_PROMPT)
    report["phases"] = PHASES
    report["ok"] = all(report["checks"].values())
    return report


def rss_anon_bytes():
    """The process's anonymous resident memory: what CRIU dumps of its host memory (file pages are not)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def quiesce_report(pool):
    """What is live at checkpoint time: the bytes a checkpoint must keep, printed as one JSON line."""
    torch.cuda.synchronize()
    tensors = torch.cuda.memory_allocated()
    report = {
        "event": "quiesced",
        "torchAllocatedBytes": tensors,
        "torchReservedBytes": torch.cuda.memory_reserved(),
        "kvPoolMappedBytes": pool.mapped_bytes,
        "usedGpuBytes": used_gpu_bytes(),
        "rssAnonBytes": rss_anon_bytes(),
    }
    # The pool is not PyTorch's allocation (VMM), so its mapped bytes count on top of the tensors'.
    report["liveBytes"] = tensors + report["kvPoolMappedBytes"] + report["rssAnonBytes"]
    print(json.dumps(report), flush=True)
    return report


def print_tokens(decoder, label, n):
    tokens = decoder.generate(FIXED_PROMPT, n)
    print(json.dumps({"event": "tokens", "phase": label, "tokens": tokens}), flush=True)
    return tokens


def serve(args):
    import http.server

    model, pool, decoder, facts = build(args)
    del model  # the decoder holds the weights it uses
    if args.print_tokens:
        print_tokens(decoder, "ready", args.new_tokens)
    state = {"restored": False, "outcome": None}
    if os.environ.get(thaw_worker.CONTROL_DIR_ENV) or os.environ.get(thaw_worker.LEGACY_CONTROL_DIR_ENV):
        def release():
            pool.release(keep_pool=args.keep_pool)
            quiesce_report(pool)

        def payload():
            return {
                "worker": "bench/gpu/worker.py",
                "kvPoolBytes": pool.size,
                "kvBackend": pool.backend,
                "keepPool": args.keep_pool,
                **thaw_cuda.memory_payload(extra_tensor_bytes=pool.mapped_bytes if pool.vmm is not None else 0),
            }

        resume = pool.resume
        if WEIGHTS_REGION is not None:
            # The weights go too (thaw records their sources and hands them back after a restore); the pool's
            # release comes after theirs, so what is quiesced is what the checkpoint keeps.
            release_weights, resume_weights = thaw_cuda.weights_hooks([WEIGHTS_REGION])
            release_pool = release

            def release():
                release_weights()
                release_pool()

            def resume():
                phase("resume: begin")
                resume_weights()
                phase("resume: weights mapped")
                pool.resume()

        outcome = thaw_worker.checkpoint_and_wait(release=release, resume=resume, payload=payload)
        state["outcome"] = str(outcome)
        state["restored"] = outcome == thaw_worker.Outcome.RESTORE_COMPLETE
        phase("resumed: %s" % outcome)
        if outcome == thaw_worker.Outcome.RESTORE_FAILED:
            return 1
        # A restored worker serves first (restore-to-ready is what bench:gpu times); its /tokens answers the same.
        if args.print_tokens and not state["restored"]:
            print_tokens(decoder, str(outcome), args.new_tokens)

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
                self._reply(200, {"tokens": decoder.generate(FIXED_PROMPT, args.new_tokens)})
            else:
                self._reply(404, {"error": "not found"})

        def do_POST(self):
            if self.path != "/generate":
                return self._reply(404, {"error": "not found"})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                t = time.monotonic()
                tokens = decoder.generate([int(x) for x in req["prompt_ids"]], int(req.get("max_new_tokens", 16)))
                self._reply(200, {"tokens": tokens, "ms": round((time.monotonic() - t) * 1000, 1)})
            except (KeyError, ValueError, TypeError) as e:
                self._reply(400, {"error": str(e)})

        def log_message(self, *a):
            pass

    # Single-threaded on purpose: every request replays the graph from this thread.
    server = http.server.HTTPServer(("127.0.0.1", args.port), Handler)
    phase("serving on 127.0.0.1:%d" % args.port)
    server.serve_forever()
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--selftest", action="store_true")
    p.add_argument("--json", help="selftest report path (default $OUT/worker-selftest.json when $OUT is set)")
    p.add_argument("--weights-dir", default=os.environ.get("THAW_WEIGHTS_DIR", DEFAULT_WEIGHTS_DIR))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--kv-backend", choices=("vmm", "torch"), default="vmm")
    p.add_argument("--kv-gib", type=float, default=None, help="KV pool size (default: --kv-fraction of free memory)")
    p.add_argument("--kv-fraction", type=float, default=0.8, help="share of free GPU memory for the pool")
    p.add_argument("--max-len", type=int, default=2048, help="positions of the KV cache")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--print-tokens", action="store_true")
    p.add_argument("--keep-pool", action="store_true", help="serve mode: keep the KV pool mapped through the checkpoint (the baseline)")
    p.add_argument("--prepare-weights", action="store_true", help="create the random weights in --weights-dir and exit")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="serve at tensor parallelism N: one process per GPU (bench/gpu/tp_worker.py)")
    p.add_argument("--rank", type=int, default=0, help="set by rank 0 for the ranks it starts")
    p.add_argument("--shape", choices=("0.6b", "8b"), default=None, help="the Qwen3 shape (older name of --model)")
    p.add_argument("--model", choices=sorted(MODELS), default=None, help="the Qwen3 shape (random weights; default qwen3-0.6b)")
    p.add_argument("--weights", choices=("vmm", "torch"), default="torch",
                   help="vmm: a thaw_cuda.WeightsRegion (outside the checkpoint); torch: PyTorch's allocator (in it)")
    args = p.parse_args(argv)
    if args.model is None:
        args.model = "qwen3-8b" if args.shape == "8b" else "qwen3-0.6b"
    args.shape = {"qwen3-0.6b": "0.6b", "qwen3-8b": "8b"}.get(args.model, args.model)
    if args.weights == "vmm" and args.tensor_parallel > 1:
        raise SystemExit("--weights vmm is for one GPU (the tensor-parallel worker shards at load)")
    if args.model != "qwen3-0.6b" and args.shape != "8b":
        QWEN3_0_6B.update(MODELS[args.model])
        if args.weights_dir == DEFAULT_WEIGHTS_DIR:
            args.weights_dir = "/tmp/thaw-%s-random" % args.model
    if args.shape == "8b":
        import tp_worker

        # The config the weights are created with (a saved dir's own config.json wins at load: see tp_worker).
        QWEN3_0_6B.update(tp_worker.QWEN3_8B)
        if args.weights_dir == DEFAULT_WEIGHTS_DIR:
            args.weights_dir = "/tmp/thaw-qwen3-8b-random"
    if args.tensor_parallel > 1 and not (args.selftest or args.prepare_weights):
        import tp_worker

        return tp_worker.main_rank(sys.modules[__name__], args, list(sys.argv[1:] if argv is None else argv))
    if args.prepare_weights:
        load_libraries()
        created = ensure_weights(args.weights_dir, args.seed)
        # The paths a container of this worker must reach (bench/gpu/product.ts mounts them).
        paths = sys.path + [torch.__file__, transformers.__file__]
        print(json.dumps({"event": "weights", "dir": args.weights_dir, "created": created, "paths": paths,
                          "pinnedH2DGBps": pinned_h2d_gbps()}), flush=True)
        return 0
    if args.selftest:
        report = selftest(args)
        text = json.dumps(report, indent=2)
        path = args.json or (os.path.join(os.environ["OUT"], "worker-selftest.json") if os.environ.get("OUT") else None)
        if path:
            with open(path, "w") as f:
                f.write(text + "\n")
        print(text)
        return 0 if report["ok"] else 1
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
