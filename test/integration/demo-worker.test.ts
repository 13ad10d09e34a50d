/**
 * The demo worker and its image against a real private containerd (test/helpers/stack.ts): the image
 * builds and imports (and a second build is a cache hit), the worker serves its deterministic state
 * over loopback from a host-network pod, exits 0 on StopContainer, and takes part in the checkpoint
 * protocol through a mounted control dir. Runs for each flavor in THAW_CONTAINERD (default 1.7).
 */
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { buildWorkerImage, parseLdd, relativeImports, type WorkerImage } from '../../demo/worker-image.js';
import { DEMO_ERROR_CODES } from '../../demo/worker/errors.js';
import { allocateMemory, computeAnswer, digestOf, expectedAnswer, expectedDigest } from '../../demo/worker/memory.js';
import { ENDPOINT_FILE, parseWorkerConfig } from '../../demo/worker/worker.js';
import { parseCriLog } from '../../src/node-stack/cri-client.js';
import { writeMarker } from '../../src/sdk/control-dir.js';
import { READY_FOR_CHECKPOINT } from '../../src/sdk/protocol.js';
import { flavorsUnderTest, useNodeStack, waitFor } from '../helpers/stack.js';

/** Warm-up of 256 MiB plus pod start on a loaded 2-core machine stays well under this. */
const WORKER_READY_TIMEOUT_MS = 60_000;
/** /state hashes all the memory: ~1 s for 256 MiB when the 2 cores are shared. */
const HTTP_TIMEOUT_MS = 15_000;
const IMAGE_BUILD_TIMEOUT_MS = 180_000;

interface WorkerEvent { event: string; [key: string]: unknown }
interface WorkerState {
  digest: string; memoryMb: number; seed: number; requests: number; bootId: string;
  restored: boolean; restoreCount: number; pid: number; uptimeMs: number;
}

async function workerEvents(logPath: string): Promise<WorkerEvent[]> {
  const lines = parseCriLog(await readFile(logPath, 'utf8').catch(() => ''));
  return lines.filter((l) => l.stream === 'stdout' && l.text.startsWith('{')).map((l) => JSON.parse(l.text) as WorkerEvent);
}

function waitForEvent(logPath: string, event: string, nth = 1): Promise<WorkerEvent> {
  return waitFor(async () => (await workerEvents(logPath)).filter((e) => e.event === event)[nth - 1], `worker event "${event}" #${nth}`, WORKER_READY_TIMEOUT_MS, 100);
}

async function getJson<T>(port: number, route: string): Promise<T> {
  const res = await fetch(`http://127.0.0.1:${port}${route}`, { signal: AbortSignal.timeout(HTTP_TIMEOUT_MS) });
  expect(res.status).toBe(200);
  return (await res.json()) as T;
}

describe('demo worker, pure parts', () => {
  it('gives the same digest for the same seed and size, and another for another seed', () => {
    // 70 MiB: one full 64 MiB chunk and a partial one.
    const memory = allocateMemory(70, 3);
    expect(digestOf(memory)).toBe(expectedDigest(70, 3));
    expect(expectedDigest(70, 4)).not.toBe(expectedDigest(70, 3));
    for (const x of [0, 1, 12345, 0xffffffff]) expect(computeAnswer(memory, x)).toBe(expectedAnswer(70, 3, x));
  });

  it('reads its config from env and refuses values it cannot use', () => {
    expect(parseWorkerConfig({})).toEqual({ memoryMb: 256, seed: 1, warmupMs: 2000, controlDir: undefined, checkpointAfterMs: 0 });
    expect(parseWorkerConfig({ WORKER_MEMORY_MB: '64', SNAPSHOT_CONTROL_DIR: '/snapshot-control' })).toMatchObject({ memoryMb: 64, controlDir: '/snapshot-control' });
    for (const bad of [{ WORKER_MEMORY_MB: 'abc' }, { WORKER_MEMORY_MB: '0' }, { WORKER_SEED: '-1' }, { WORKER_WARMUP_MS: '1.5' }]) {
      expect(() => parseWorkerConfig(bad)).toThrow(expect.objectContaining({ code: DEMO_ERROR_CODES.INVALID_CONFIG }));
    }
  });

  it('parses ldd output, loader included, vdso left out', () => {
    const out = [
      '\tlinux-vdso.so.1 (0x00007ffd)',
      '\tlibstdc++.so.6 => /lib/x86_64-linux-gnu/libstdc++.so.6 (0x00007f28)',
      '\t/lib64/ld-linux-x86-64.so.2 (0x00007f28)',
    ].join('\n');
    expect(parseLdd(out)).toEqual(['/lib/x86_64-linux-gnu/libstdc++.so.6', '/lib64/ld-linux-x86-64.so.2']);
    expect(() => parseLdd('\tlibfoo.so => not found')).toThrow(expect.objectContaining({ code: DEMO_ERROR_CODES.IMAGE_BUILD_FAILED }));
  });

  it('follows only real import statements, not examples in doc comments', () => {
    const src = "/**\n * import { x } from '<thaw>/src/sdk/worker.js';\n */\nimport { a } from './a.js';\nimport {\n  b,\n} from '../b.js';\nexport * from './c.js';\nimport type { T } from './types.js';\nexport type { U } from './types.js';\nimport { readFile } from 'node:fs/promises';\n";
    expect(relativeImports(src)).toEqual(['./a.js', '../b.js', './c.js']);
    expect(() => relativeImports("import x from 'lodash';\n")).toThrow(expect.objectContaining({ code: DEMO_ERROR_CODES.IMAGE_BUILD_FAILED }));
  });
});

describe.each(flavorsUnderTest())('demo worker, containerd %s', (flavor) => {
  const handle = useNodeStack({ flavor });
  let image: WorkerImage | undefined;

  it('builds and imports the image; a second build with the same inputs reuses it', async () => {
    const { stack } = handle;
    const first = await buildWorkerImage(stack);
    const second = await buildWorkerImage(stack);
    console.log(`demo worker image: first build ${first.buildMs} ms (archive cached=${first.cached}), second ${second.buildMs} ms (reused=${second.reused})`);
    expect(first.reused).toBe(false);
    expect(second.manifestDigest).toBe(first.manifestDigest);
    expect(second.reused).toBe(true);
    expect(first.appFiles).toEqual(expect.arrayContaining(['demo/worker/worker.js', 'demo/worker/memory.js', 'src/sdk/worker.js', 'src/errors.js']));
    expect(first.libraries).toEqual(expect.arrayContaining([expect.stringMatching(/libc\.so/), expect.stringMatching(/ld-linux/)]));
    const tags = (await stack.cri.listImages()).flatMap((i) => i.repo_tags);
    expect(tags).toContain(first.ref);
    image = first;
  }, IMAGE_BUILD_TIMEOUT_MS);

  it('serves its deterministic state over loopback and exits 0 on SIGTERM', async () => {
    const { stack } = handle;
    if (!image) throw new Error('the image test did not run');
    const seed = 7;
    const t0 = Date.now();
    const pod = await stack.cri.runPod({
      name: 'demo-worker', image: image.ref, command: [],
      env: { WORKER_MEMORY_MB: '256', WORKER_SEED: String(seed), WORKER_WARMUP_MS: '500' },
    });
    try {
      const ready = await waitForEvent(pod.logPath, 'ready');
      console.log(`demo worker 256 MiB: pod to ready ${Date.now() - t0} ms (worker warm-up ${String(ready.warmupMs)} ms)`);
      const listening = await waitForEvent(pod.logPath, 'listening');
      const port = listening.port as number;
      const want = expectedDigest(256, seed);
      expect(ready.digest).toBe(want);

      const s1 = await getJson<WorkerState>(port, '/state');
      expect(s1).toMatchObject({ digest: want, memoryMb: 256, seed, requests: 1, restored: false, restoreCount: 0, pid: 1 });
      expect(await getJson(port, '/compute?x=42')).toEqual({ x: 42, answer: expectedAnswer(256, seed, 42) });
      expect(await getJson(port, '/healthz')).toEqual({ ok: true });
      const s2 = await getJson<WorkerState>(port, '/state');
      expect(s2.requests).toBe(4);
      expect(s2.bootId).toBe(s1.bootId);
      const bad = await fetch(`http://127.0.0.1:${port}/compute?x=-1`, { signal: AbortSignal.timeout(HTTP_TIMEOUT_MS) });
      expect(bad.status).toBe(400);

      // The image env reaches the worker: libuv must not use io_uring (CRIU cannot dump it).
      const env = await stack.cri.execSync(pod.containerId, ['/bin/sh', '-c', 'tr "\\0" "\\n" < /proc/1/environ'], 5);
      expect(env.stdout).toContain('UV_USE_IO_URING=0');

      await stack.cri.stopContainer(pod.containerId, 10);
      const status = await stack.cri.containerStatus(pod.containerId);
      expect(status.status.state).toBe('CONTAINER_EXITED');
      expect(status.status.exit_code).toBe(0);
      expect((await workerEvents(pod.logPath)).map((e) => e.event)).toContain('stopping');
    } finally {
      await stack.cri.removePod(pod.podId);
    }
  }, 120_000);

  it('with a control dir: writes ready-for-checkpoint, and serves again on a new port after checkpoint-complete', async () => {
    const { stack } = handle;
    if (!image) throw new Error('the image test did not run');
    const controlDir = await mkdtemp(path.join(os.tmpdir(), 'thaw-demo-control-'));
    const pod = await stack.cri.runPod({
      name: 'demo-worker-ckpt', image: image.ref, command: [],
      env: { WORKER_MEMORY_MB: '64', WORKER_SEED: '2', WORKER_WARMUP_MS: '200', WORKER_CHECKPOINT_AFTER_MS: '2000', SNAPSHOT_CONTROL_DIR: '/snapshot-control' },
      mounts: [{ container_path: '/snapshot-control', host_path: controlDir }],
    });
    try {
      const readEndpoint = async (): Promise<{ port: number; pid: number; startedAt: string } | undefined> => {
        const text = await readFile(path.join(controlDir, ENDPOINT_FILE), 'utf8').catch(() => undefined);
        return text === undefined ? undefined : JSON.parse(text) as { port: number; pid: number; startedAt: string };
      };
      const before = await waitFor(readEndpoint, ENDPOINT_FILE, WORKER_READY_TIMEOUT_MS, 50);
      expect(before.pid).toBe(1);
      const s1 = await getJson<WorkerState>(before.port, '/state');
      expect(s1.digest).toBe(expectedDigest(64, 2));

      // The release hook withdraws the endpoint and closes the server before the ready marker.
      await waitFor(async () => ((await readdir(controlDir)).includes(READY_FOR_CHECKPOINT) ? true : undefined), READY_FOR_CHECKPOINT, WORKER_READY_TIMEOUT_MS, 50);
      expect(await readEndpoint()).toBeUndefined();
      await expect(fetch(`http://127.0.0.1:${before.port}/healthz`, { signal: AbortSignal.timeout(HTTP_TIMEOUT_MS) })).rejects.toThrow();
      const readyPayload = JSON.parse(await readFile(path.join(controlDir, READY_FOR_CHECKPOINT), 'utf8')) as Record<string, unknown>;
      expect(readyPayload).toMatchObject({ digest: expectedDigest(64, 2), memoryMb: 64, seed: 2, bootId: s1.bootId });

      await writeMarker(controlDir, 'checkpoint-complete');
      const after = await waitFor(readEndpoint, `${ENDPOINT_FILE} after checkpoint-complete`, WORKER_READY_TIMEOUT_MS, 50);
      expect(after.startedAt > before.startedAt).toBe(true);
      const s2 = await getJson<WorkerState>(after.port, '/state');
      expect(s2).toMatchObject({ digest: s1.digest, bootId: s1.bootId, requests: s1.requests + 1, restored: false, restoreCount: 0 });
      await waitForEvent(pod.logPath, 'checkpoint-complete');

      await stack.cri.stopContainer(pod.containerId, 10);
      expect((await stack.cri.containerStatus(pod.containerId)).status.exit_code).toBe(0);
    } finally {
      await stack.cri.removePod(pod.podId);
      await rm(controlDir, { recursive: true, force: true });
    }
  }, 120_000);
});
