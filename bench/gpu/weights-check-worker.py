"""The weights service on a real driver, the worker's half (bench/gpu/check-weights.sh).

Makes seeded random bf16 safetensors files (once), loads them with thaw_cuda.WeightsRegion, computes
per-tensor checksums and captures a CUDA graph that reads one weight tensor (y = x @ W), writes the
weights file, releases the memory (keeping the VA), and on "go" on stdin receives thaw's fds, waits
(so thaw has already dropped its own handles), maps them at the same VA, and replays the graph: the output
must be bit-equal and every checksum the same. Prints one JSON line.
"""
import json, os, sys, time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "sdk", "python"))
import thaw_cuda  # noqa: E402
import torch  # noqa: E402


def write_safetensors(path, tensors):
    header, at = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in tensors.values():
            f.write(t.contiguous().view(torch.uint16).numpy().tobytes())


def main():
    control, data_dir, gib = sys.argv[1], sys.argv[2], float(sys.argv[3])
    os.makedirs(data_dir, exist_ok=True)
    files = []
    per_file = 1 << 30
    n_files = max(1, int(gib * (1 << 30)) // per_file)
    g = torch.Generator().manual_seed(0)
    for i in range(n_files):
        path = os.path.join(data_dir, "model-%05d.safetensors" % i)
        files.append(path)
        if not os.path.exists(path):
            rows = per_file // (4096 * 2) // 8
            write_safetensors(path, {"layer.%d.w%d" % (i, k): torch.randn(rows, 4096, generator=g).to(torch.bfloat16) for k in range(8)})
    t0 = time.monotonic()
    region = thaw_cuda.WeightsRegion.load(files)
    load_s = time.monotonic() - t0
    names = sorted(region.tensors_info)
    sums = {n: float(region.tensor(n).float().sum().item()) for n in names}
    w = region.tensor(names[0])[:4096]  # (4096, 4096) bf16
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(64, 4096, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.matmul(x, w.t(), out=y)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.matmul(x, w.t(), out=y)
    graph.replay()
    torch.cuda.synchronize()
    y_before = y.clone()
    thaw_cuda.write_weights_file([region], control)
    va = region.ptr
    free_before = torch.cuda.mem_get_info()[0]
    region.release()
    freed = torch.cuda.mem_get_info()[0] - free_before
    print("released %d" % os.getpid(), flush=True)
    sys.stdin.readline()
    handles = thaw_cuda.receive_weight_handles(control, timeout_s=120)
    time.sleep(0.5)  # thaw has released its handles and closed its fds by now
    t1 = time.monotonic()
    region.map_handles(handles["weights"])
    map_s = time.monotonic() - t1
    y.zero_()
    graph.replay()
    torch.cuda.synchronize()
    sums_after = {n: float(region.tensor(n).float().sum().item()) for n in names}
    ok = region.ptr == va and torch.equal(y, y_before) and sums == sums_after
    print(json.dumps({
        "ok": ok,
        "sameVa": region.ptr == va, "graphOutputEqual": bool(torch.equal(y, y_before)), "checksumsEqual": sums == sums_after,
        "weightsBytes": sum(a.source["length"] for a in region.file_allocations), "sdkLoadS": round(load_s, 3),
        "releasedBytes": freed, "mapHandlesMs": round(map_s * 1000, 1), "files": len(files),
    }), flush=True)
    return 0 if ok else 1


sys.exit(main())
