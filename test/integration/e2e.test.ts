/**
 * thaw end to end, as a node runs it: the plugin process (dist/src/agent/nri-main.js) with its engine, a real
 * private containerd, runc and CRIU, and the demo worker in CRI pods. The in-process flows have their own
 * tests (checkpoint.test.ts, restore.test.ts); this file covers what only the product as a whole shows:
 * concurrent restores from one checkpoint, a restore after the source is gone with the page cache dropped, and
 * the agent's process killed in the middle of a restore.
 */
import { execFileSync } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
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

const MEMORY_MB = 128;
const SEED = 11;
const CHECKPOINT = 'e2e-worker';

describe.each(flavorsUnderTest())('thaw end to end on containerd %s', (flavor) => {
  const handle = useNodeStack({ flavor });
  let workDir: string;
  let dirs: ThawPluginDirs;
  let plugin: ThawPluginProcess | undefined;
  let image: string;
  let sourceState: WorkerState;

  /** Starts the plugin process; a restarted one appends to the same log, so wait for one more sync. */
  const startPlugin = async (): Promise<ThawPluginProcess> => {
    const syncs = async (): Promise<number> => (await readJsonLog(dirs.logFile)).filter((r) => r.msg === 'nri plugin synchronized').length;
    const before = await syncs();
    const p = startThawPluginProcess({ socketPath: handle.stack.nriSocketPath, containerd: { socket: handle.stack.address, root: handle.stack.rootDir }, ...dirs });
    await waitFor(async () => ((await syncs()) > before ? true : undefined), 'the plugin to register and synchronize', 30_000);
    return p;
  };
  const common = () => ({ image, memoryMb: MEMORY_MB, seed: SEED, warmupMs: 500 });
  const restoreEventOf = (containerId: string) =>
    waitForLog(dirs.logFile, (r) => r['event'] === 'restore' && r['containerId'] === containerId && r.msg === 'restore', `the restore event of ${containerId}`, 60_000);

  beforeAll(async () => {
    ensureBuilt();
    workDir = await mkdtemp(join(tmpdir(), 'thaw-e2e-'));
    dirs = pluginDirsUnder(workDir, handle.stack.paths.prefix, join(workDir, 'thaw.log'));
    image = (await buildWorkerImage(handle.stack)).ref;
    plugin = await startPlugin();

    // The source: cold start, serve a few requests, then the worker asks for its checkpoint.
    const source = await runWorkerPod(handle.stack, dirs.controlRoot, { ...common(), name: 'e2e-source', annotations: { 'thaw.dev/checkpoint': CHECKPOINT }, checkpointAfterMs: 300 });
    const first = await waitForServingWorker(source.controlDir);
    for (let i = 0; i < 3; i++) await getJson(first.port, '/healthz');
    const event = await waitForLog(dirs.logFile, (r) => r['event'] === 'checkpoint' && r['name'] === `default/${CHECKPOINT}`, 'the checkpoint', 120_000);
    expect(event['outcome']).toBe('succeeded');
    const resumed = await waitForServingWorker(source.controlDir, { accept: (e) => e.port !== first.port });
    sourceState = await getJson<WorkerState>(resumed.port, '/state');
    // The rest of the file restores after the source is gone.
    await handle.stack.cri.removePod(source.podId);
  }, 240_000);

  afterAll(async () => {
    await plugin?.stop();
    await rm(workDir, { recursive: true, force: true });
  });

  it('restores two pods concurrently from one checkpoint, each with the source state', async () => {
    const stack = handle.stack;
    const pods = await Promise.all(
      ['e2e-a', 'e2e-b'].map((name) => runWorkerPod(stack, dirs.controlRoot, { ...common(), name, annotations: { 'thaw.dev/restore': CHECKPOINT } })),
    );
    const states = await Promise.all(
      pods.map(async (pod) => {
        const endpoint = await waitForServingWorker(pod.controlDir, { accept: (e) => e.restored, timeoutMs: 120_000 });
        return getJson<WorkerState>(endpoint.port, '/state');
      }),
    );
    for (const state of states) {
      expect(state.digest).toBe(expectedDigest(MEMORY_MB, SEED));
      expect(state.bootId).toBe(sourceState.bootId);
      expect(state.restored).toBe(true);
      expect(state.requests).toBeGreaterThan(sourceState.requests - 1);
    }
    for (const pod of pods) {
      expect((await restoreEventOf(pod.containerId))['outcome']).toBe('restored');
      await stack.cri.removePod(pod.podId);
    }
  }, 240_000);

  it('restores after the source pod is gone, with the page cache dropped', async () => {
    const stack = handle.stack;
    execFileSync('sync');
    await writeFile('/proc/sys/vm/drop_caches', '3\n');
    const pod = await runWorkerPod(stack, dirs.controlRoot, { ...common(), name: 'e2e-cold-cache', annotations: { 'thaw.dev/restore': CHECKPOINT } });
    const endpoint = await waitForServingWorker(pod.controlDir, { accept: (e) => e.restored, timeoutMs: 120_000 });
    const state = await getJson<WorkerState>(endpoint.port, '/state');
    expect(state.digest).toBe(expectedDigest(MEMORY_MB, SEED));
    expect(state.requests).toBeGreaterThanOrEqual(sourceState.requests);
    expect((await restoreEventOf(pod.containerId))['outcome']).toBe('restored');
    await stack.cri.removePod(pod.podId);
  }, 240_000);

  it('falls back to a cold start when the agent is killed mid-restore and comes back', async () => {
    const stack = handle.stack;
    // thaw adjusts the container (thaw-pause holds its command), then the agent dies before it can restore.
    const pod = await runWorkerPod(stack, dirs.controlRoot, { ...common(), name: 'e2e-agent-killed', annotations: { 'thaw.dev/restore': CHECKPOINT }, start: false });
    const victim = plugin!;
    victim.proc.kill('SIGKILL');
    await victim.exited;
    plugin = undefined;
    await stack.cri.startContainer(pod.containerId);
    // Without an agent the pod waits in its placeholder: nothing serves yet.
    await new Promise((r) => setTimeout(r, 1_000));
    await expect(readFile(join(pod.controlDir, 'worker-endpoint.json'), 'utf8')).rejects.toThrow();

    plugin = await startPlugin();
    const endpoint = await waitForServingWorker(pod.controlDir, { timeoutMs: 120_000 });
    expect(endpoint.restored, 'a cold start, not a restore').toBe(false);
    const state = await getJson<WorkerState>(endpoint.port, '/state');
    expect(state.digest).toBe(expectedDigest(MEMORY_MB, SEED));
    expect(state.bootId).not.toBe(sourceState.bootId);
    const failed = JSON.parse(await readFile(join(pod.controlDir, 'restore-failed'), 'utf8')) as { cause: string };
    expect(failed.cause).toBe('RESTORE_AGENT_RESTARTED');
    const event = await waitForLog(dirs.logFile, (r) => r['event'] === 'restore' && r['containerId'] === pod.containerId, 'the fallback event');
    expect([event['outcome'], event['cause']]).toEqual(['fallback', 'RESTORE_AGENT_RESTARTED']);
    expect((await stack.cri.containerStatus(pod.containerId)).status.state).toBe('CONTAINER_RUNNING');
    await stack.cri.removePod(pod.podId);
  }, 240_000);

  it('falls back to a cold start when the container was created under an agent that died and starts under the next', async () => {
    const stack = handle.stack;
    const pod = await runWorkerPod(stack, dirs.controlRoot, { ...common(), name: 'e2e-created-then-restarted', annotations: { 'thaw.dev/restore': CHECKPOINT }, start: false });
    const victim = plugin!;
    victim.proc.kill('SIGKILL');
    await victim.exited;
    plugin = await startPlugin(); // learns the created container back at Synchronize; it is not running yet
    await stack.cri.startContainer(pod.containerId);
    const endpoint = await waitForServingWorker(pod.controlDir, { timeoutMs: 120_000 });
    expect(endpoint.restored, 'a cold start, not a restore').toBe(false);
    const failed = JSON.parse(await readFile(join(pod.controlDir, 'restore-failed'), 'utf8')) as { cause: string };
    expect(failed.cause).toBe('RESTORE_AGENT_RESTARTED');
    await stack.cri.removePod(pod.podId);
  }, 240_000);
});
