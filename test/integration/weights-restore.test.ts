/**
 * The weights service through the agent process and a real containerd, on a machine without a GPU (the fake
 * driver: native/fake-libcuda). The worker (test/helpers/weights-worker.py, the Python SDK) runs in a pod whose
 * image is a few directories, with the host's Python, the SDK and the fake driver bind-mounted read-only, and its
 * model files on a bind mount of a host directory that the agent's config allows (`--weights-model-dirs`).
 * The fake's shareable memory is memfds, so the weights' bytes cross from the agent's process to the restored
 * worker as on a GPU; the worker's VMM bookkeeping lives in its own memory and goes through CRIU with it.
 *
 * Shown here:
 *   - a checkpoint of a worker with a weights region records the region (VA, sources, sha256) in the manifest,
 *     and its bytes are not in the checkpoint (the whole checkpoint is smaller than the weights);
 *   - a restore loads the weights from CreateContainer on (the event's phases: the load starts before CRIU
 *     ends), hands them to the restored worker, which holds the source's bytes at the source's VA;
 *   - a source file changed since the checkpoint: cold start with cause WEIGHTS_SOURCE_CHANGED;
 *   - the restored worker cannot import the handles: cold start with cause WEIGHTS_IMPORT;
 *   - between nodes (a real registry on loopback, a second agent with its own store and no model files): a
 *     checkpoint pushed plainly carries no weight bytes, and restores there only as a cold start with cause
 *     WEIGHTS_SOURCE_MISSING; pushed with its weights layers, it is pulled with them into the node's weights
 *     cache and restored from there; a tampered weights layer fails the pull before anything is stored;
 *   - thaw.dev/snapshot with `snapshotWeightsLayers`: node A's snapshot push carries the weights layers, and node B
 *     (no model files) restores the snapshot pod, its agent's pull bringing the weights into its cache.
 */
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, lstatSync, readlinkSync } from 'node:fs';
import { mkdir, mkdtemp, open as openFile, readdir, readFile, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Mount } from '../../src/node-stack/index.js';
import { flavorsUnderTest, useNodeStack, waitFor } from '../helpers/stack.js';
import { ensureBuilt, pluginDirsUnder, readJsonLog, startThawPluginProcess, waitForLog, type ThawPluginDirs, type ThawPluginProcess } from '../helpers/thaw-plugin-process.js';
import { buildFakeLibraries, FAKE_LIBCUDA, FAKE_NVML, fakeTokenEnv } from '../helpers/cuda-fake-lib.js';
import { startRegistry } from '../../src/node-stack/registry.js';
import { openLocalStore } from '../../src/store/local-store.js';
import { pullCheckpoint, pushCheckpoint, RegistryClient, WEIGHTS_LAYER_MEDIA_TYPE, weightsCacheDir } from '../../src/store/index.js';

const REPO = resolve(import.meta.dirname, '../..');
const SDK_DIR = join(REPO, 'sdk/python');
const WORKER = join(REPO, 'test/helpers/weights-worker.py');
const IMAGE = 'docker.io/thaw/weights-worker-shell:1';
const CHECKPOINT = 'weights-worker';
/** Its store key: the source pod's namespace owns it. */
const KEY = `default/${CHECKPOINT}`;
const TOKEN = 'tok-weights';
const MiB = 1 << 20;
/** Larger than the whole checkpoint of the worker (a Python process of ~30 MB): weights in the image would show. */
const WEIGHTS_MIB = [40, 24];
const PATH_ENV = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

function safetensors(name: string, data: Buffer): Buffer {
  const json = Buffer.from(JSON.stringify({ [name]: { dtype: 'U8', shape: [data.length], data_offsets: [0, data.length] } }));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([len, json, data]);
}

interface WorkerFileState {
  boot: string;
  va: string;
  loadedSha: string;
  sha: string;
  phase: string;
  restored: boolean;
}

describe.each(flavorsUnderTest())('weights outside the checkpoint, through the agent on containerd %s', (flavor) => {
  const handle = useNodeStack({ flavor });
  let workDir: string;
  let dirs: ThawPluginDirs;
  let modelsDir: string;
  let workerCtl: string;
  let plugin: ThawPluginProcess | undefined;
  let python: string;
  let mounts: Mount[];
  let files: string[];
  let weightsSha: string;
  let source: WorkerFileState;

  const statePath = (containerId: string): string => join(dirs.controlRoot, containerId, 'worker-state.json');
  const stateOf = async (containerId: string): Promise<WorkerFileState | undefined> =>
    readFile(statePath(containerId), 'utf8').then((t) => JSON.parse(t) as WorkerFileState, () => undefined);
  const runWorker = (name: string, annotations: Record<string, string>, env: Record<string, string> = {}) =>
    handle.stack.cri.runPod({
      name,
      containerName: 'worker',
      uid: `${name}-uid`,
      annotations,
      image: IMAGE,
      command: [python, WORKER, SDK_DIR, FAKE_LIBCUDA, ...files],
      env: { PATH: PATH_ENV, PYTHONDONTWRITEBYTECODE: '1', PYTHONUNBUFFERED: '1', FAKE_CUDA_CONTROL_FILE: workerCtl, ...fakeTokenEnv(TOKEN), ...env },
      mounts,
    });
  let nodeA: ThawPluginDirs;
  /** An agent on `d` (its store, control root, log); the model dir is allowed on every node. */
  const synchronized = async (logFile: string): Promise<number> => (await readJsonLog(logFile).catch(() => [])).filter((r) => r.msg === 'nri plugin synchronized').length;
  const startAgent = async (d: ThawPluginDirs, extraArgs: string[] = []): Promise<ThawPluginProcess> => {
    const before = await synchronized(d.logFile);
    const p = startThawPluginProcess({
      socketPath: handle.stack.nriSocketPath,
      containerd: { socket: handle.stack.address, root: handle.stack.rootDir },
      ...d,
      extraArgs: ['--cuda-libcuda', FAKE_LIBCUDA, '--cuda-libnvml', FAKE_NVML, '--weights-model-dirs', modelsDir, ...extraArgs],
      env: { FAKE_CUDA_STATE_DIR: join(workDir, 'fake-state') },
    });
    await waitFor(async () => ((await synchronized(d.logFile)) > before ? true : undefined), 'the plugin to synchronize', 30_000);
    return p;
  };
  const restoreEventOf = (containerId: string) =>
    waitForLog(dirs.logFile, (r) => r['event'] === 'restore' && r['containerId'] === containerId && r.msg === 'restore', `the restore event of ${containerId}`, 90_000);

  beforeAll(async () => {
    buildFakeLibraries();
    ensureBuilt();
    workDir = await mkdtemp(join(tmpdir(), 'thaw-weights-e2e-'));
    dirs = pluginDirsUnder(workDir, handle.stack.paths.prefix, join(workDir, 'thaw.log'));
    modelsDir = join(workDir, 'models');
    await mkdir(modelsDir);
    await mkdir(join(workDir, 'worker-ctl'));
    workerCtl = join(workDir, 'worker-ctl/fake.ctl');
    await writeFile(workerCtl, '');
    files = WEIGHTS_MIB.map((_, i) => join(modelsDir, `model-0000${i + 1}.safetensors`));
    const hash = createHash('sha256');
    for (const [i, mib] of WEIGHTS_MIB.entries()) {
      const data = randomBytes(mib * MiB);
      hash.update(data);
      await writeFile(files[i]!, safetensors(`t${i}`, data));
    }
    weightsSha = hash.digest('hex');

    // The image: merged-/usr links and the dirs a container needs; the host's Python and the rest are mounted.
    python = execFileSync('python3', ['-c', 'import sys; print(sys.executable)'], { encoding: 'utf8' }).trim();
    const prefix = execFileSync(python, ['-c', 'import sys; print(sys.base_prefix)'], { encoding: 'utf8' }).trim();
    const rootfs = join(workDir, 'rootfs');
    for (const d of ['etc', 'tmp', 'proc', 'sys', 'dev', 'run', 'root', 'usr']) await mkdir(join(rootfs, d), { recursive: true, mode: d === 'tmp' ? 0o1777 : 0o755 });
    const roots = new Set(['/usr']);
    for (const name of ['bin', 'sbin', 'lib', 'lib32', 'lib64']) {
      const p = `/${name}`;
      if (!existsSync(p)) continue;
      if (lstatSync(p).isSymbolicLink()) await symlink(readlinkSync(p), join(rootfs, name));
      else roots.add(p);
    }
    await writeFile(join(rootfs, 'etc/passwd'), 'root:x:0:0:root:/root:/bin/sh\n');
    const ro = (p: string): Mount => ({ host_path: p, container_path: p, readonly: true });
    mounts = [...[...roots].map(ro), ro('/etc/ld.so.cache'), ...(prefix.startsWith('/usr/') ? [] : [ro(prefix)]), ro(SDK_DIR), ro(dirname(WORKER)), ro(dirname(FAKE_LIBCUDA)), ro(join(workDir, 'worker-ctl')), ro(modelsDir)];
    // Every mount point in the image, so that runc creates none in the container's upperdir: the rootfs diff
    // then holds only what the worker wrote. (Mount points runc makes there end up in the diff, and undoing the
    // diff on a failed restore trips over them: see the report of issue 14.)
    for (const m of mounts) {
      if (m.container_path === '/etc/ld.so.cache') await writeFile(join(rootfs, m.container_path), '');
      else await mkdir(join(rootfs, m.container_path), { recursive: true, mode: 0o755 });
    }
    await handle.stack.importImage({ ref: IMAGE, rootfsDir: rootfs, env: [`PATH=${PATH_ENV}`] });

    await mkdir(join(workDir, 'fake-state'));
    nodeA = dirs;
    plugin = await startAgent(dirs);

    const pod = await runWorker('weights-source', { 'thaw.dev/checkpoint': CHECKPOINT }, { WORKER_CHECKPOINT: '1' });
    const event = await waitForLog(dirs.logFile, (r) => r['event'] === 'checkpoint' && r['name'] === KEY, 'the checkpoint', 90_000);
    expect(event['outcome'], JSON.stringify(event['error'])).toBe('succeeded');
    source = await waitFor(async () => {
      const s = await stateOf(pod.containerId);
      return s?.phase === 'checkpoint-complete' ? s : undefined;
    }, 'the source to go on after its checkpoint', 60_000);
    await handle.stack.cri.removePod(pod.podId);
  }, 240_000);

  afterAll(async () => {
    await plugin?.stop();
    if (process.env['THAW_KEEP_TEST_DIR'] === '1') console.error(`kept ${workDir}`);
    else await rm(workDir, { recursive: true, force: true });
  });

  it('records the region in the manifest and keeps its bytes out of the checkpoint', async () => {
    const manifest = JSON.parse(await readFile(join(dirs.storeRoot, 'default', CHECKPOINT, 'manifest.json'), 'utf8')) as {
      weights?: { bytes: number; regions: Array<{ va: string; allocations: Array<{ kind: string; source?: { path: string; sha256: string; fileSize: number } }> }> };
      totals: { bytes: number };
    };
    const weightsBytes = WEIGHTS_MIB.reduce((a, m) => a + m * MiB, 0);
    expect(manifest.weights?.bytes).toBe(weightsBytes);
    expect(manifest.weights?.regions.map((r) => r.va)).toEqual([source.va]);
    const sources = manifest.weights?.regions[0]?.allocations.map((a) => a.source) ?? [];
    const fileSha = async (p: string): Promise<string> => createHash('sha256').update(await readFile(p)).digest('hex');
    expect(sources.map((s) => [s?.path, s?.sha256])).toEqual(await Promise.all(files.map(async (f) => [f, await fileSha(f)])));
    // The checkpoint (CRIU images, rootfs diff) is smaller than the weights alone: they are not in it.
    expect(manifest.totals.bytes).toBeLessThan(weightsBytes);
    // The source held them before and after (it reloaded them after checkpoint-complete).
    expect([source.loadedSha, source.sha]).toEqual([weightsSha, weightsSha]);
  });

  it('restores: the weights load starts before CRIU ends, the restored worker maps the source\'s bytes at its VA', async () => {
    const pod = await runWorker('weights-restored', { 'thaw.dev/restore': CHECKPOINT });
    const event = await restoreEventOf(pod.containerId);
    expect([event['outcome'], event['cause']], String(event['reason'])).toEqual(['restored', undefined]);
    const at = (event['phases'] as { at: Record<string, number> }).at;
    expect(at['weightsLoadStart']).toBeLessThan(at['criuEnd']!);
    expect(at['criuStart']).toBeLessThan(at['criuEnd']!);
    expect(at['weightsHandedOver']).toBeGreaterThanOrEqual(at['criuEnd']!);
    expect((event['weights'] as { bytes: number }).bytes).toBe(WEIGHTS_MIB.reduce((a, m) => a + m * MiB, 0));
    // The default order: the weights' reads waited for the checkpoint's read into the page cache (here it is cached).
    expect(event['weights']).toMatchObject({ order: 'checkpoint-first', readWaitMs: expect.any(Number) });
    const state = await waitFor(async () => {
      const s = await stateOf(pod.containerId);
      return s?.phase === 'restore-complete' ? s : undefined;
    }, 'the restored worker to report', 60_000);
    expect(state).toMatchObject({ restored: true, boot: source.boot, va: source.va, sha: weightsSha });
    await handle.stack.cri.removePod(pod.podId);
  }, 120_000);

  it('cold-starts with cause WEIGHTS_IMPORT when the restored worker cannot import the handles', async () => {
    // The restored worker's fake driver reads this file at every call (its environment is the source's).
    await writeFile(workerCtl, 'FAKE_CUDA_FAIL=mem-import:invalid\n');
    try {
      const pod = await runWorker('weights-import-fails', { 'thaw.dev/restore': CHECKPOINT });
      const event = await restoreEventOf(pod.containerId);
      expect([event['outcome'], event['cause']]).toEqual(['fallback', 'WEIGHTS_IMPORT']);
      await writeFile(workerCtl, '');
      // The cold start: a fresh worker (another boot id) that loaded the files itself.
      const state = await waitFor(async () => {
        const s = await stateOf(pod.containerId);
        return s?.phase === 'loaded' ? s : undefined;
      }, 'the cold-started worker to load', 60_000);
      expect(state.boot).not.toBe(source.boot);
      expect(state.sha).toBe(weightsSha);
      await handle.stack.cri.removePod(pod.podId);
    } finally {
      await writeFile(workerCtl, '');
    }
  }, 120_000);

  it('between nodes: weights travel as layers only when asked; restored from the weights cache on a node without the model', async () => {
    const registry = await startRegistry();
    const client = new RegistryClient({ registry: registry.host, plainHttp: true });
    const dirsB = pluginDirsUnder(join(workDir, 'b'), handle.stack.paths.prefix, join(workDir, 'b.log'));
    const fileSha = async (p: string): Promise<string> => createHash('sha256').update(await readFile(p)).digest('hex');
    const shas = await Promise.all(files.map(fileSha));
    let moved = false;
    try {
      const storeA = await openLocalStore({ root: nodeA.storeRoot });
      // Plain: the manifest names the sources by digest; no layer holds their bytes, nor does the registry.
      const plain = await pushCheckpoint({ store: storeA, name: KEY, reference: `${registry.host}/team/weights:plain`, access: { plainHttp: true } });
      expect([plain.weightsLayers, plain.weightsBytes]).toEqual([0, 0]);
      const plainImage = JSON.parse((await client.getManifest('team/weights', 'plain')).body.toString('utf8')) as { layers: Array<{ mediaType: string; digest: string; size: number }> };
      expect(plainImage.layers.filter((l) => shas.includes(l.digest.slice('sha256:'.length)) || l.mediaType === WEIGHTS_LAYER_MEDIA_TYPE)).toEqual([]);
      expect(plainImage.layers.reduce((a, l) => a + l.size, 0)).toBeLessThan(WEIGHTS_MIB[1]! * MiB);
      for (const sha of shas) expect(await client.headBlob('team/weights', `sha256:${sha}`)).toBeUndefined();
      // With weights: one layer per source file, its digest the file's sha256, streamed from the model dir.
      const full = await pushCheckpoint({ store: storeA, name: KEY, reference: `${registry.host}/team/weights:full`, access: { plainHttp: true }, withWeights: { dirs: [modelsDir] } });
      expect([full.weightsLayers, full.weightsBytes]).toEqual([files.length, (await Promise.all(files.map(async (f) => (await readFile(f)).length))).reduce((a, b) => a + b, 0)]);
      const fullImage = JSON.parse((await client.getManifest('team/weights', 'full')).body.toString('utf8')) as { layers: Array<{ mediaType: string; digest: string; annotations: Record<string, string> }> };
      const weightsLayers = fullImage.layers.filter((l) => l.mediaType === WEIGHTS_LAYER_MEDIA_TYPE);
      expect(weightsLayers.map((l) => [l.digest, l.annotations['dev.thaw.weights.path']])).toEqual(files.map((f, i) => [`sha256:${shas[i]}`, f]));

      // Node B: its own agent and store, registry access (namespace default may restore from team/ unsigned), and
      // the model files are not on it. Its agent pulls each reference when a pod names it.
      await plugin?.stop();
      plugin = undefined;
      for (const f of files) await rename(f, `${f}.away`);
      moved = true;
      const registryConfig = join(workDir, 'registries.json');
      await writeFile(registryConfig, JSON.stringify({ access: { [registry.host]: { plainHttp: true } } }), { mode: 0o600 });
      const agentConfig = join(workDir, 'agent-b.yaml');
      await writeFile(agentConfig, `tenancy:\n  namespaces:\n    default:\n      registries:\n        - {prefix: "${registry.host}/team", allowUnsigned: true}\n`, { mode: 0o600 });
      plugin = await startAgent(dirsB, ['--registry-config', registryConfig, '--config', agentConfig]);
      dirs = dirsB;

      // The plain one first: the weights cache of node B is still empty.
      const cold = await runWorker('weights-nowhere', { 'thaw.dev/restore': `${registry.host}/team/weights:plain` });
      const coldEvent = await restoreEventOf(cold.containerId);
      expect([coldEvent['outcome'], coldEvent['cause']]).toEqual(['fallback', 'WEIGHTS_SOURCE_MISSING']);
      await handle.stack.cri.removePod(cold.podId);

      const restored = await runWorker('weights-from-cache', { 'thaw.dev/restore': `${registry.host}/team/weights:full` });
      const event = await restoreEventOf(restored.containerId);
      expect([event['outcome'], event['cause']], String(event['reason'])).toEqual(['restored', undefined]);
      const state = await waitFor(async () => {
        const s = await stateOf(restored.containerId);
        return s?.phase === 'restore-complete' ? s : undefined;
      }, 'the worker restored on node B to report', 60_000);
      expect(state).toMatchObject({ restored: true, boot: source.boot, va: source.va, sha: weightsSha });
      expect((await readdir(weightsCacheDir(dirsB.storeRoot))).sort()).toEqual([...shas].sort());
      await handle.stack.cri.removePod(restored.podId);

      // A weights layer whose bytes are not its digest's: the pull fails and a third store keeps nothing.
      const rootC = join(workDir, 'c-store');
      await mkdir(rootC);
      const storeC = await openLocalStore({ root: rootC });
      const fh = await openFile(registry.blobDataPath(`sha256:${shas[1]}`), 'r+');
      await fh.write(Buffer.from('tampered'), 0, undefined, 4096);
      await fh.close();
      await expect(pullCheckpoint({ store: storeC, reference: `${registry.host}/team/weights:full`, access: { plainHttp: true } })).rejects.toMatchObject({ code: 'OCI_DIGEST_MISMATCH' });
      expect((await readdir(rootC)).filter((e) => !e.startsWith('.') || e.startsWith('.tmp-'))).toEqual([]);
      expect(await readdir(weightsCacheDir(rootC))).toEqual([]);
    } finally {
      dirs = nodeA;
      if (moved) for (const f of files) await rename(`${f}.away`, f);
      await plugin?.stop();
      plugin = await startAgent(nodeA);
      client.close();
      await registry.stop();
    }
  }, 240_000);

  it('thaw.dev/snapshot with snapshotWeightsLayers: node A pushes the weights as layers, node B without the model restores from them', async () => {
    const registry = await startRegistry();
    const client = new RegistryClient({ registry: registry.host, plainHttp: true });
    const base = join(workDir, 'snapshot-nodes');
    await mkdir(base, { recursive: true });
    const snapA = pluginDirsUnder(join(base, 'a'), handle.stack.paths.prefix, join(base, 'a.log'));
    const snapB = pluginDirsUnder(join(base, 'b'), handle.stack.paths.prefix, join(base, 'b.log'));
    const registryConfig = join(workDir, 'snapshot-registries.json');
    await writeFile(registryConfig, JSON.stringify({ access: { [registry.host]: { plainHttp: true } } }), { mode: 0o600 });
    const agentConfig = join(workDir, 'agent-snapshot.yaml');
    await writeFile(agentConfig, `tenancy:\n  namespaces:\n    default:\n      registries:\n        - {prefix: "${registry.host}/team", allowUnsigned: true}\n      snapshotRepository: "${registry.host}/team/snapshots"\n      snapshotWeightsLayers: true\n`, { mode: 0o600 });
    const args = ['--config', agentConfig, '--registry-config', registryConfig];
    let moved = false;
    try {
      await plugin?.stop();
      plugin = undefined;
      plugin = await startAgent(snapA, args);
      dirs = snapA;
      const src = await runWorker('wsnap-a', { 'thaw.dev/snapshot': 'wsnap' }, { WORKER_CHECKPOINT: '1' });
      const pushed = await waitForLog(snapA.logFile, (r) => r['event'] === 'snapshot-push', 'the push of the snapshot', 120_000);
      expect(pushed['outcome'], String(pushed['error'])).toBe('succeeded');
      const tag = String(pushed['reference']).split(':').pop()!;
      const image = JSON.parse((await client.getManifest('team/snapshots', tag)).body.toString('utf8')) as { layers: Array<{ mediaType: string; digest: string }> };
      const shas = await Promise.all(files.map(async (f) => createHash('sha256').update(await readFile(f)).digest('hex')));
      expect(image.layers.filter((l) => l.mediaType === WEIGHTS_LAYER_MEDIA_TYPE).map((l) => l.digest)).toEqual(shas.map((h) => `sha256:${h}`));
      await waitFor(async () => ((await stateOf(src.containerId))?.phase === 'checkpoint-complete' ? true : undefined), 'the snapshot source to go on', 60_000);
      await handle.stack.cri.removePod(src.podId);
      await plugin.stop();
      plugin = undefined;

      for (const f of files) await rename(f, `${f}.away`);
      moved = true;
      plugin = await startAgent(snapB, args);
      dirs = snapB;
      const target = await runWorker('wsnap-b', { 'thaw.dev/snapshot': 'wsnap' });
      const event = await restoreEventOf(target.containerId);
      expect([event['outcome'], event['cause']], String(event['reason'])).toEqual(['restored', undefined]);
      const state = await waitFor(async () => {
        const s = await stateOf(target.containerId);
        return s?.phase === 'restore-complete' ? s : undefined;
      }, 'the snapshot pod on node B to report', 60_000);
      expect(state).toMatchObject({ restored: true, sha: weightsSha });
      expect((await readdir(weightsCacheDir(snapB.storeRoot))).sort()).toEqual([...shas].sort());
      await handle.stack.cri.removePod(target.podId);
    } finally {
      dirs = nodeA;
      if (moved) for (const f of files) await rename(`${f}.away`, f);
      await plugin?.stop();
      plugin = await startAgent(nodeA);
      client.close();
      await registry.stop();
    }
  }, 300_000);

  it('cold-starts with cause WEIGHTS_SOURCE_CHANGED when a source file changed since the checkpoint', async () => {
    const first = WEIGHTS_MIB[0]! * MiB;
    await writeFile(files[0]!, safetensors('t0', randomBytes(first))); // same size, other bytes
    const pod = await runWorker('weights-changed', { 'thaw.dev/restore': CHECKPOINT });
    const event = await restoreEventOf(pod.containerId);
    expect([event['outcome'], event['cause']]).toEqual(['fallback', 'WEIGHTS_SOURCE_CHANGED']);
    const state = await waitFor(async () => {
      const s = await stateOf(pod.containerId);
      return s?.phase === 'loaded' ? s : undefined;
    }, 'the cold-started worker to load', 60_000);
    expect([state.restored, state.boot === source.boot]).toEqual([false, false]);
    await handle.stack.cri.removePod(pod.podId);
  }, 120_000);
});
