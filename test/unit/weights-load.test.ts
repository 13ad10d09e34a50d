/**
 * The weights service end to end without a GPU, through the fake CUDA driver: a Python worker (the SDK's
 * WeightsRegion) loads safetensors files, writes its weights file and releases its memory; thaw's side
 * (regions-file, loader, handover) reads the sources into shareable allocations of its own process and
 * sends their fds over weights.sock; the worker imports and maps them at its recorded VA and checks the
 * bytes. The fake backs shareable memory with memfds, so the bytes cross processes as on a GPU.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { constants, readSync } from 'node:fs';
import { mkdir, mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import koffi from 'koffi';
import { afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';

import { loadCuda } from '../../src/cuda/libcuda.js';
import { CudaVmm } from '../../src/cuda/vmm.js';
import { WeightsErrorCode } from '../../src/restore-engine/weights/errors.js';
import { listenForWorker } from '../../src/restore-engine/weights/handover.js';
import { loadWeights } from '../../src/restore-engine/weights/loader.js';
import { readWeightsFile } from '../../src/restore-engine/weights/regions-file.js';
import { SourceDigests } from '../../src/restore-engine/weights/source-digests.js';
import { FAKE_LIBCUDA, buildFakeLibraries } from '../helpers/cuda-fake-lib.js';

const SDK_DIR = resolve(import.meta.dirname, '../../sdk/python');
const MiB = 1 << 20;

function safetensors(tensors: Record<string, { dtype: string; shape: number[]; data: Buffer }>): Buffer {
  const header: Record<string, unknown> = {};
  let at = 0;
  for (const [name, t] of Object.entries(tensors)) {
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [at, at + t.data.length] };
    at += t.data.length;
  }
  const json = Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([len, json, ...Object.values(tensors).map((t) => t.data)]);
}

// The worker: load, describe, release; on "go" receive thaw's fds, map them, and print each tensor's sha256.
const WORKER = String.raw`
import ctypes, hashlib, sys
sys.path.insert(0, sys.argv[1])
import thaw_cuda as tc
control, files = sys.argv[2], sys.argv[3:]
region = tc.WeightsRegion.load(files, driver=tc.Driver(${JSON.stringify(FAKE_LIBCUDA)}))
tc.write_weights_file([region], control)
va = region.ptr
region.release()
print("released", flush=True)
sys.stdin.readline()
handles = tc.receive_weight_handles(control, timeout_s=20)
region.map_handles(handles["weights"])
assert region.ptr == va
for name in sorted(region.tensors_info):
    cai = region.view(name).__cuda_array_interface__
    n = 1
    for d in cai["shape"]:
        n *= d
    n *= int(cai["typestr"][2:])
    print(name, hashlib.sha256(ctypes.string_at(cai["data"][0], n)).hexdigest(), flush=True)
print("done", flush=True)
`;

describe('weights service (fake CUDA)', () => {
  let dir: string;
  let control: string;
  let files: string[];
  let tensors: Record<string, Buffer>;
  let worker: ChildProcessWithoutNullStreams | undefined;
  let vmm: CudaVmm;
  let allocated: () => number;

  beforeAll(() => {
    buildFakeLibraries();
    vmm = new CudaVmm(loadCuda({ path: FAKE_LIBCUDA }));
    const fn = koffi.load(FAKE_LIBCUDA).func('fakeCudaAllocatedBytes', 'uint64_t', []);
    allocated = () => Number(fn());
  });

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'thaw-weights-'));
    control = join(dir, 'control');
    await mkdir(control);
    tensors = { 'layer.0.wq': randomBytes(64 * 128 * 2), embed: randomBytes(3 * MiB + 4), norm: randomBytes(16) };
    files = [join(dir, 'model-1.safetensors'), join(dir, 'model-2.safetensors')];
    await writeFile(files[0]!, safetensors({ 'layer.0.wq': { dtype: 'BF16', shape: [64, 128], data: tensors['layer.0.wq']! }, norm: { dtype: 'BF16', shape: [8], data: tensors.norm! } }));
    await writeFile(files[1]!, safetensors({ embed: { dtype: 'U8', shape: [3 * MiB + 4], data: tensors.embed! } }));
  });

  afterEach(async () => {
    worker?.kill('SIGKILL');
    worker = undefined;
    await rm(dir, { recursive: true, force: true });
  });

  function startWorker(): { lines: AsyncIterableIterator<string>; child: ChildProcessWithoutNullStreams } {
    const child = spawn('python3', ['-c', WORKER, SDK_DIR, control, ...files], { env: { ...process.env, PYTHONDONTWRITEBYTECODE: '1' } });
    worker = child;
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('exit', (code) => {
      if (code) console.error(`worker exited ${code}: ${stderr}`);
    });
    return { lines: createInterface({ input: child.stdout })[Symbol.asyncIterator](), child };
  }

  const openSource = (path: string) => open(path, constants.O_RDONLY | constants.O_NOFOLLOW);

  it('hands the worker GPU memory holding every byte of its files, mapped at its own VA', async () => {
    const { lines, child } = startWorker();
    expect((await lines.next()).value).toBe('released');
    const regions = (await readWeightsFile(control))!;
    expect(regions[0]!.allocations.map((a) => a.source!.path)).toEqual(files);
    const digests = new SourceDigests(join(dir, 'digests.json'));
    // Small chunks and several readers: the chunks of one file are read by different readers.
    const loaded = await loadWeights({ regions, vmm, deviceFor: (d) => d, openSource, digests, readers: 3, chunkBytes: MiB });
    expect(loaded.bytes).toBe(regions[0]!.allocations.reduce((n, a) => n + a.source!.length, 0));
    const handover = await listenForWorker(control, loaded.regions, (pid) => pid === child.pid);
    child.stdin.write('go\n');
    expect((await handover.delivered).peerPid).toBe(child.pid);
    await handover.close();
    loaded.release();
    const got: Record<string, string> = {};
    for (;;) {
      const line = (await lines.next()).value as string;
      if (line === 'done') break;
      const [name, sha] = line.split(' ');
      got[name!] = sha!;
    }
    const want = Object.fromEntries(Object.entries(tensors).map(([k, v]) => [k, createHash('sha256').update(v).digest('hex')]));
    expect(got).toEqual(want);
    expect(allocated()).toBe(0); // thaw's side holds nothing once the worker has the memory
  });

  it('refuses a source that changed since the checkpoint, leaving nothing allocated', async () => {
    const { lines } = startWorker();
    expect((await lines.next()).value).toBe('released');
    const regions = (await readWeightsFile(control))!;
    const changed = safetensors({ embed: { dtype: 'U8', shape: [3 * MiB + 4], data: randomBytes(3 * MiB + 4) } });
    await writeFile(files[1]!, changed); // same size, other bytes
    await expect(loadWeights({ regions, vmm, deviceFor: (d) => d, openSource, digests: new SourceDigests(), chunkBytes: MiB })).rejects.toMatchObject({
      code: WeightsErrorCode.SOURCE_CHANGED,
    });
    expect(allocated()).toBe(0);
    await rm(files[0]!);
    await expect(loadWeights({ regions, vmm, deviceFor: (d) => d, openSource, digests: new SourceDigests() })).rejects.toMatchObject({
      code: WeightsErrorCode.SOURCE_MISSING,
    });
    expect(allocated()).toBe(0);
  });

  it('hashes a source inline with its first load, then loads it from its stamp in parallel chunks; the bytes either way', async () => {
    const { lines } = startWorker();
    expect((await lines.next()).value).toBe('released');
    const regions = (await readWeightsFile(control))!;
    const digests = new SourceDigests(join(dir, 'digests.json'));
    const stampOf = async (f: string): Promise<string | undefined> => {
      const fh = await open(f, 'r');
      try {
        return (await digests.stamped(fh)).sha256;
      } finally {
        await fh.close();
      }
    };
    const stampedBefore = await Promise.all(files.map(stampOf));
    expect(stampedBefore).toEqual([undefined, undefined]);
    const dataOf = (f: Buffer): Buffer => f.subarray(8 + Number(f.readBigUInt64LE(0)));
    const want = await Promise.all(files.map(async (f) => dataOf(await readFile(f))));
    for (const round of ['inline hash', 'stamped']) {
      const loaded = await loadWeights({ regions, vmm, deviceFor: (d) => d, openSource, digests, readers: 4, chunkBytes: MiB });
      // The fake's shareable memory is a memfd: the exported fd reads back what the GPU holds.
      const fds = loaded.regions[0]!.fds;
      const got = fds.map((fd, i) => {
        const buf = Buffer.alloc(want[i]!.length);
        readSync(fd, buf, 0, buf.length, 0);
        return buf;
      });
      expect(got.map((b, i) => b.equals(want[i]!)), round).toEqual([true, true]);
      loaded.release();
      const stamps = await Promise.all(files.map(stampOf));
      expect(stamps, round).toEqual(regions[0]!.allocations.map((a) => a.source!.sha256));
    }
    expect(allocated()).toBe(0);
  });

  it('sends nothing to a peer that is not the restored worker', async () => {
    const { lines, child } = startWorker();
    expect((await lines.next()).value).toBe('released');
    const regions = (await readWeightsFile(control))!;
    const loaded = await loadWeights({ regions, vmm, deviceFor: (d) => d, openSource, digests: new SourceDigests() });
    const seen: number[] = [];
    const handover = await listenForWorker(control, loaded.regions, (pid) => (seen.push(pid), false));
    child.stdin.write('go\n');
    const exit = await new Promise<number | null>((r) => child.on('exit', r));
    expect(exit).not.toBe(0); // its connection was closed unanswered: the SDK's message check fails
    expect(seen).toEqual([child.pid]);
    await handover.close();
    await expect(handover.delivered).rejects.toMatchObject({ code: WeightsErrorCode.HANDOVER });
    loaded.release();
    expect(allocated()).toBe(0);
  });

  it('reads nothing before readsAfter (the checkpoint read first), then every byte; an abort while waiting leaves nothing allocated', async () => {
    const { lines } = startWorker();
    expect((await lines.next()).value).toBe('released');
    const regions = (await readWeightsFile(control))!;
    const dataOf = (f: Buffer): Buffer => f.subarray(8 + Number(f.readBigUInt64LE(0)));
    const want = await Promise.all(files.map(async (f) => dataOf(await readFile(f))));
    let release: () => void = () => undefined;
    const readsAfter = new Promise<void>((r) => (release = r));
    let settled = false;
    const load = loadWeights({ regions, vmm, deviceFor: (d) => d, openSource, digests: new SourceDigests(), readers: 2, chunkBytes: MiB, readsAfter });
    void load.finally(() => (settled = true)).catch(() => undefined);
    // The allocations are made (the setup runs at once) and the readers wait.
    for (let i = 0; i < 500 && allocated() === 0; i++) await new Promise((r) => setTimeout(r, 10));
    expect(allocated()).toBeGreaterThan(0);
    await new Promise((r) => setTimeout(r, 200));
    expect(settled).toBe(false);
    release();
    const loaded = await load;
    expect(loaded.readWaitMs).toBeGreaterThanOrEqual(150);
    const got = loaded.regions[0]!.fds.map((fd, i) => {
      const buf = Buffer.alloc(want[i]!.length);
      readSync(fd, buf, 0, buf.length, 0);
      return buf;
    });
    expect(got.map((b, i) => b.equals(want[i]!))).toEqual([true, true]);
    loaded.release();
    expect(allocated()).toBe(0);

    const stop = new AbortController();
    const waiting = loadWeights({ regions, vmm, deviceFor: (d) => d, openSource, digests: new SourceDigests(), readsAfter: new Promise<void>(() => undefined), signal: stop.signal });
    for (let i = 0; i < 500 && allocated() === 0; i++) await new Promise((r) => setTimeout(r, 10));
    stop.abort(new Error('the restore is over'));
    await expect(waiting).rejects.toThrow(/the restore is over/);
    expect(allocated()).toBe(0);
  });
});
