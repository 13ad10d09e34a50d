/**
 * The engine's CUDA steps through the plugin PROCESS, on a machine without a GPU: the plugin loads the fake
 * driver and NVML (--libcuda/--libnvml) in token mode (native/fake-libcuda/fake-common.h), where a "CUDA
 * process" is one whose environment carries FAKE_CUDA_TOKEN and whose checkpoint state lives in its own memory,
 * so it follows the process through CRIU as the real driver's does. The demo worker is that process.
 *
 * Shown here: a CUDA worker checkpointed (lock → checkpoint → dump → restore → unlock on the source) and
 * restored (restore → unlock on the restored pid) with constraints.gpu in the manifest; a lock timeout failing
 * the checkpoint cleanly; a driver failure at restore falling back to a cold start (RESTORE_DEVICES); a node
 * with another GPU model refusing the checkpoint at CreateContainer (RESTORE_INCOMPATIBLE); a restarted agent
 * restoring and unlocking a source's CUDA processes that a killed predecessor left checkpointed.
 */
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildWorkerImage } from '../../demo/worker-image.js';
import { expectedDigest } from '../../demo/worker/memory.js';
import { getJson, runWorkerPod, waitForServingWorker, type WorkerState } from '../../demo/scenario.js';
import { flavorsUnderTest, useNodeStack, waitFor } from '../helpers/stack.js';
import {
  ensureBuilt,
  pluginDirsUnder,
  readJsonLog,
  startThawPluginProcess,
  waitForLog,
  type ThawPluginDirs,
  type ThawPluginProcess,
} from '../helpers/thaw-plugin-process.js';
import { buildFakeLibraries, FAKE_GPU, FAKE_LIBCUDA, FAKE_NVML, fakeTokenEnv, fakeTokenState, readFakeCalls } from '../helpers/cuda-fake-lib.js';

const MEMORY_MB = 32;
const SEED = 5;
const CHECKPOINT = 'cuda-worker';
const SOURCE_TOKEN = 'tok-source';
/** The fake's defaults (fake-common.h, fake-nvml.c): the GPU model, and the memory NVML reports per process. */
const FAKE_MODEL = 'NVIDIA H100 80GB HBM3';
const FAKE_USED_BYTES = 1 << 30;

describe.each(flavorsUnderTest())('CUDA checkpoint and restore through the plugin process on containerd %s', (flavor) => {
  const handle = useNodeStack({ flavor });
  let workDir: string;
  let dirs: ThawPluginDirs;
  let stateDir: string;
  let controlFile: string;
  let plugin: ThawPluginProcess | undefined;
  let image: string;
  let sourceState: WorkerState;
  let sourcePid: number;

  const startPlugin = async (env: Record<string, string> = {}): Promise<ThawPluginProcess> => {
    const syncs = async (): Promise<number> => (await readJsonLog(dirs.logFile)).filter((r) => r.msg === 'nri plugin synchronized').length;
    const before = await syncs();
    const p = startThawPluginProcess({
      socketPath: handle.stack.nriSocketPath, containerd: { socket: handle.stack.address, root: handle.stack.rootDir },
      ...dirs,
      extraArgs: ['--cuda-libcuda', FAKE_LIBCUDA, '--cuda-libnvml', FAKE_NVML, '--cuda-lock-timeout-ms', '2000'],
      env: { FAKE_CUDA_STATE_DIR: stateDir, FAKE_CUDA_CONTROL_FILE: controlFile, ...env },
    });
    await waitFor(async () => ((await syncs()) > before ? true : undefined), 'the plugin to register and synchronize', 30_000);
    return p;
  };
  /** Steers the fake inside the running plugin (it reads the control file at every call). */
  const setFake = (settings: Record<string, string>): Promise<void> =>
    writeFile(controlFile, Object.entries(settings).map(([k, v]) => `${k}=${v}\n`).join(''));
  /** The worker's pid on the host (the one the agent hands the driver); the endpoint file has the container's. */
  const hostPidOf = async (containerId: string): Promise<number> => {
    const pid = (await handle.stack.cri.containerStatus(containerId, true)).pid;
    if (pid === undefined) throw new Error(`no pid in the status of ${containerId}`);
    return pid;
  };
  const common = () => ({ image, memoryMb: MEMORY_MB, seed: SEED, warmupMs: 200 });
  const restoreEventOf = (containerId: string) =>
    waitForLog(dirs.logFile, (r) => r['event'] === 'restore' && r['containerId'] === containerId && r.msg === 'restore', `the restore event of ${containerId}`, 60_000);

  beforeAll(async () => {
    buildFakeLibraries();
    ensureBuilt();
    workDir = await mkdtemp(join(tmpdir(), 'thaw-cuda-e2e-'));
    dirs = pluginDirsUnder(workDir, handle.stack.paths.prefix, join(workDir, 'thaw.log'));
    stateDir = join(workDir, 'fake-cuda');
    controlFile = join(workDir, 'fake-cuda.ctl');
    await mkdir(stateDir);
    await setFake({});
    image = (await buildWorkerImage(handle.stack)).ref;
    plugin = await startPlugin();
    expect((await waitForLog(dirs.logFile, (r) => r.msg === 'CUDA driver loaded', 'the driver load'))['gpus']).toEqual([FAKE_GPU]);

    const source = await runWorkerPod(handle.stack, dirs.controlRoot, {
      ...common(),
      name: 'cuda-source',
      annotations: { 'thaw.dev/checkpoint': CHECKPOINT },
      checkpointAfterMs: 200,
      env: fakeTokenEnv(SOURCE_TOKEN),
    });
    const first = await waitForServingWorker(source.controlDir);
    sourcePid = await hostPidOf(source.containerId);
    await getJson(first.port, '/healthz');
    const event = await waitForLog(dirs.logFile, (r) => r['event'] === 'checkpoint' && r['name'] === `default/${CHECKPOINT}`, 'the checkpoint', 60_000);
    expect(event['outcome'], JSON.stringify(event['error'])).toBe('succeeded');
    const resumed = await waitForServingWorker(source.controlDir, { accept: (e) => e.port !== first.port });
    sourceState = await getJson<WorkerState>(resumed.port, '/state');
    await handle.stack.cri.removePod(source.podId);
  }, 180_000);

  afterAll(async () => {
    await plugin?.stop();
    await rm(workDir, { recursive: true, force: true });
  });

  it('checkpoints a CUDA worker (lock, checkpoint, dump, restore, unlock) and restores it (restore, unlock on the new pid)', async () => {
    const manifest = JSON.parse(await readFile(join(dirs.storeRoot, 'default', CHECKPOINT, 'manifest.json'), 'utf8')) as {
      constraints: { gpu?: Record<string, unknown> };
    };
    expect(manifest.constraints.gpu).toMatchObject({ model: FAKE_MODEL, uuids: [FAKE_GPU], cudaApiVersion: 13000, memoryBytes: FAKE_USED_BYTES, count: 1, cudaProcesses: 1 });
    expect(typeof manifest.constraints.gpu?.['driverVersion']).toBe('string');

    const pod = await runWorkerPod(handle.stack, dirs.controlRoot, { ...common(), name: 'cuda-restored', annotations: { 'thaw.dev/restore': CHECKPOINT }, env: fakeTokenEnv(SOURCE_TOKEN) });
    const endpoint = await waitForServingWorker(pod.controlDir, { accept: (e) => e.restored, timeoutMs: 60_000 });
    const state = await getJson<WorkerState>(endpoint.port, '/state');
    expect(state.digest).toBe(expectedDigest(MEMORY_MB, SEED));
    expect(state.bootId).toBe(sourceState.bootId);
    const event = await restoreEventOf(pod.containerId);
    expect(event['outcome']).toBe('restored');
    const restoredPid = event['restoredPid'] as number;

    // The restore of the restored pid succeeding is the proof that the dump carried the CHECKPOINTED state.
    const calls = (await readFakeCalls(stateDir, SOURCE_TOKEN)).map((c) => [c.op, c.pid, c.result]);
    expect(calls).toEqual([
      ['lock', sourcePid, 'CUDA_SUCCESS'],
      ['checkpoint', sourcePid, 'CUDA_SUCCESS'],
      ['restore', sourcePid, 'CUDA_SUCCESS'],
      ['unlock', sourcePid, 'CUDA_SUCCESS'],
      ['restore', restoredPid, 'CUDA_SUCCESS'],
      ['unlock', restoredPid, 'CUDA_SUCCESS'],
    ]);
    expect(restoredPid).not.toBe(sourcePid);
    expect(await fakeTokenState(restoredPid)).toBe(0);
    await handle.stack.cri.removePod(pod.podId);
  }, 90_000);

  it('fails a checkpoint whose lock times out: nothing published, the worker unlocked and serving', async () => {
    const name = 'cuda-lock-timeout';
    const token = 'tok-timeout';
    await setFake({ FAKE_CUDA_FAIL: 'lock:timeout' });
    try {
      const pod = await runWorkerPod(handle.stack, dirs.controlRoot, { ...common(), name, annotations: { 'thaw.dev/checkpoint': name }, checkpointAfterMs: 100, env: fakeTokenEnv(token) });
      const first = await waitForServingWorker(pod.controlDir);
      const workerPid = await hostPidOf(pod.containerId);
      const event = await waitForLog(dirs.logFile, (r) => r['event'] === 'checkpoint' && r['name'] === `default/${name}`, 'the failed checkpoint', 60_000);
      expect(event['outcome']).toBe('failed');
      const error = event['error'] as { code: string; evidence: { phase: string; causeCode: string } };
      expect([error.code, error.evidence.phase, error.evidence.causeCode]).toEqual(['CHECKPOINT_FAILED', 'cuda-checkpoint', 'CUDA_CALL_FAILED']);
      const complete = JSON.parse(await readFile(join(pod.controlDir, 'checkpoint-complete'), 'utf8')) as { ok: boolean };
      expect(complete.ok).toBe(false);
      await expect(stat(join(dirs.storeRoot, 'default', name))).rejects.toThrow();

      const resumed = await waitForServingWorker(pod.controlDir, { accept: (e) => e.port !== first.port });
      expect((await getJson<WorkerState>(resumed.port, '/state')).digest).toBe(expectedDigest(MEMORY_MB, SEED));
      expect((await readFakeCalls(stateDir, token)).map((c) => [c.op, c.pid, c.result])).toEqual([['lock', workerPid, 'CUDA_ERROR_TIMEOUT']]);
      expect(await fakeTokenState(workerPid), 'the driver left the worker running').toBe(0);
      await handle.stack.cri.removePod(pod.podId);
    } finally {
      await setFake({});
    }
  }, 90_000);

  it('cold-starts with cause RESTORE_DEVICES when the driver fails the restore', async () => {
    await setFake({ FAKE_CUDA_FAIL: 'restore:missing-gpu' });
    try {
      const pod = await runWorkerPod(handle.stack, dirs.controlRoot, { ...common(), name: 'cuda-restore-fails', annotations: { 'thaw.dev/restore': CHECKPOINT }, env: fakeTokenEnv(SOURCE_TOKEN) });
      const endpoint = await waitForServingWorker(pod.controlDir, { timeoutMs: 60_000 });
      expect(endpoint.restored, 'a cold start, not a restore').toBe(false);
      const event = await restoreEventOf(pod.containerId);
      expect([event['outcome'], event['cause']]).toEqual(['fallback', 'RESTORE_DEVICES']);
      const failed = JSON.parse(await readFile(join(pod.controlDir, 'restore-failed'), 'utf8')) as { cause: string };
      expect(failed.cause).toBe('RESTORE_DEVICES');
      const last = (await readFakeCalls(stateDir, SOURCE_TOKEN)).at(-1);
      expect([last?.op, last?.result]).toEqual(['restore', 'CUDA_ERROR_INVALID_DEVICE']);
      expect((await getJson<WorkerState>(endpoint.port, '/state')).bootId).not.toBe(sourceState.bootId);
      await handle.stack.cri.removePod(pod.podId);
    } finally {
      await setFake({});
    }
  }, 90_000);

  it('a restarted agent restores and unlocks a source\'s CUDA processes that its killed predecessor left checkpointed', async () => {
    // The source's worker is CHECKPOINTED in the driver's eyes (what a killed agent leaves between the CUDA
    // checkpoint and the CUDA restore of a source) and has not asked for a checkpoint.
    const token = 'tok-orphan';
    const pod = await runWorkerPod(handle.stack, dirs.controlRoot, {
      ...common(),
      name: 'cuda-orphan',
      annotations: { 'thaw.dev/checkpoint': 'cuda-orphan' },
      checkpointAfterMs: 3_600_000,
      env: { ...fakeTokenEnv(token), FAKE_CUDA_STATE: '2' },
    });
    await waitForServingWorker(pod.controlDir);
    const pid = await hostPidOf(pod.containerId);
    expect(await fakeTokenState(pid)).toBe(2);
    await plugin?.stop();
    plugin = await startPlugin();
    await waitFor(async () => ((await fakeTokenState(pid)) === 0 ? true : undefined), 'the worker\'s CUDA state to be running again', 30_000);
    expect((await readFakeCalls(stateDir, token)).map((c) => [c.op, c.pid, c.result])).toEqual([
      ['restore', pid, 'CUDA_SUCCESS'],
      ['unlock', pid, 'CUDA_SUCCESS'],
    ]);
    const warned = await waitForLog(dirs.logFile, (r) => r.msg === 'CUDA processes left locked or checkpointed by a previous agent: restoring and unlocking them' && r['containerId'] === pod.containerId, 'the recovery warning');
    expect(warned['pids']).toEqual([pid]);
    await handle.stack.cri.removePod(pod.podId);
  }, 90_000);

  it('refuses at CreateContainer a checkpoint taken on another GPU model (RESTORE_INCOMPATIBLE)', async () => {
    await plugin?.stop();
    plugin = await startPlugin({ FAKE_CUDA_GPU_NAME: 'NVIDIA A100-SXM4-80GB' });
    const callsBefore = (await readFakeCalls(stateDir)).length;
    const pod = await runWorkerPod(handle.stack, dirs.controlRoot, { ...common(), name: 'cuda-other-gpu', annotations: { 'thaw.dev/restore': CHECKPOINT }, env: fakeTokenEnv(SOURCE_TOKEN) });
    const record = await waitForLog(dirs.logFile, (r) => r['cause'] === 'RESTORE_INCOMPATIBLE' && r['containerId'] === pod.containerId, 'the refusal at CreateContainer');
    expect(record['mismatches']).toEqual([{ what: 'gpu.model', expected: FAKE_MODEL, actual: 'NVIDIA A100-SXM4-80GB', severity: 'fatal' }]);
    // Nothing touched: the container runs its own command from the start (no control dir, no driver call).
    const logs = await readJsonLog(dirs.logFile);
    expect(logs.some((r) => r.msg === 'thaw: restore target' && r['containerId'] === pod.containerId)).toBe(false);
    expect((await readFakeCalls(stateDir)).length).toBe(callsBefore);
    await waitFor(
      async () => ((await handle.stack.cri.containerStatus(pod.containerId)).status.state === 'CONTAINER_RUNNING' ? true : undefined),
      'the cold-started container to run',
      30_000,
    );
    await handle.stack.cri.removePod(pod.podId);
  }, 90_000);
});
