/**
 * thaw end to end, as a node runs it: the plugin process (dist/src/agent/nri-main.js) with its engine, a real
 * private containerd, runc and CRIU, and the demo worker in CRI pods. The in-process flows have their own
 * tests (checkpoint.test.ts, restore.test.ts); this file covers what only the product as a whole shows:
 * concurrent restores from one checkpoint, a restore after the source is gone with the page cache dropped, and
 * the agent's process killed in the middle of a restore.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, lstatSync, readdirSync } from 'node:fs';
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
  const startPlugin = async (extraArgs: string[] = []): Promise<ThawPluginProcess> => {
    const syncs = async (): Promise<number> => (await readJsonLog(dirs.logFile)).filter((r) => r.msg === 'nri plugin synchronized').length;
    const before = await syncs();
    const p = startThawPluginProcess({ socketPath: handle.stack.nriSocketPath, containerd: { socket: handle.stack.address, root: handle.stack.rootDir }, ...dirs, extraArgs });
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
    // checkpointAfterMs leaves time to write a file into the source's rootfs first: every restore's diff carries it.
    const source = await runWorkerPod(handle.stack, dirs.controlRoot, { ...common(), name: 'e2e-source', annotations: { 'thaw.dev/checkpoint': CHECKPOINT }, checkpointAfterMs: 3_000 });
    const first = await waitForServingWorker(source.controlDir);
    expect((await handle.stack.cri.execSync(source.containerId, ['/bin/sh', '-c', 'echo from-source > /tmp/thaw-diff-probe'], 10)).exitCode).toBe(0);
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

  /** The container's rootfs has none of the checkpoint's diff and no undo backup. */
  async function expectImageRootfs(containerId: string): Promise<void> {
    const probe = await handle.stack.cri.execSync(containerId, ['/bin/sh', '-c', 'cat /tmp/thaw-diff-probe; ls -a /'], 10);
    expect(probe.stdout).not.toMatch(/from-source/);
    expect(probe.stdout).not.toMatch(/\.thaw-undo-/);
    expect(probe.stderr).toMatch(/No such file/);
  }

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
      expect((await stack.cri.execSync(pod.containerId, ['/bin/cat', '/tmp/thaw-diff-probe'], 10)).stdout).toBe('from-source\n');
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

  it('a source pod that plants a /dev/zero copy at the ready marker and a symlink to a host canary at a marker the agent writes: the agent reads nothing through them and goes on answering', async () => {
    const stack = handle.stack;
    const canaryDir = await mkdtemp(join(tmpdir(), 'thaw-e2e-canary-'));
    const canary = join(canaryDir, 'canary');
    await writeFile(canary, 'host bytes\n');
    const name = 'e2e-hostile-ready';
    // The worker itself never asks (its checkpoint is an hour away): only what the pod's process plants speaks.
    const pod = await runWorkerPod(stack, dirs.controlRoot, { ...common(), name: 'e2e-hostile-src', annotations: { 'thaw.dev/checkpoint': name }, checkpointAfterMs: 3_600_000 });
    try {
      const serving = await waitForServingWorker(pod.controlDir);
      const plant = [
        'set -e', 'B=/bin/busybox', 'cd /snapshot-control',
        `$B ln -s ${canary} snapshot-complete`, `$B ln -s ${canaryDir}/written-through-a-link checkpoint-complete.tmp`,
        // Last: the agent acts on a ready marker at once.
        '$B mknod ready-for-snapshot c 1 5',
      ].join('; ');
      const r = await stack.cri.execSync(pod.containerId, ['/bin/busybox', 'sh', '-c', plant], 10);
      expect(r.exitCode, r.stderr).toBe(0);
      // The agent takes the device for a ready marker, refuses to read it (not a regular file), and checkpoints
      // (or fails to: the worker never quiesced); either way it then writes checkpoint-complete and
      // snapshot-complete as new directory entries, never through the planted link.
      const event = await waitForLog(dirs.logFile, (l) => l['event'] === 'checkpoint' && l['name'] === `default/${name}`, 'the checkpoint event', 120_000);
      expect(['succeeded', 'failed']).toContain(event['outcome']);
      const records = await readJsonLog(dirs.logFile);
      expect(records.some((l) => l.msg === 'the ready marker has an unreadable payload; going on without it' && l['containerId'] === pod.containerId)).toBe(true);
      await waitFor(() => (existsSync(join(pod.controlDir, 'checkpoint-complete')) ? true : undefined), 'checkpoint-complete', 30_000);
      for (const marker of ['checkpoint-complete', 'snapshot-complete']) expect([marker, lstatSync(join(pod.controlDir, marker)).isFile()]).toEqual([marker, true]);
      expect(lstatSync(join(pod.controlDir, 'ready-for-snapshot')).isCharacterDevice()).toBe(true);
      expect(await readFile(canary, 'utf8')).toBe('host bytes\n');
      expect(readdirSync(canaryDir)).toEqual(['canary']);
      // The pod goes on serving, and the agent on answering NRI: the next pods of this file are adjusted by it.
      expect((await getJson<WorkerState>(serving.port, '/state')).digest).toBe(expectedDigest(MEMORY_MB, SEED));
    } finally {
      await stack.cri.removePod(pod.podId);
      await rm(canaryDir, { recursive: true, force: true });
    }
  }, 240_000);

  it('the native hook with no agent to answer it: the pod starts cold at once on the image\'s own rootfs, cause HOOK_AGENT_UNREACHABLE', async () => {
    const stack = handle.stack;
    // The beforeAll agent gives restores the native hook (native/build/thaw-hook): it does nothing itself but ask.
    const pod = await runWorkerPod(stack, dirs.controlRoot, { ...common(), name: 'e2e-native-no-agent', annotations: { 'thaw.dev/restore': CHECKPOINT }, start: false, checkpointAfterMs: 600_000 });
    const victim = plugin!;
    victim.proc.kill('SIGKILL');
    await victim.exited;
    plugin = undefined;
    try {
      await stack.cri.startContainer(pod.containerId);
      // Nothing was applied and no placeholder covers the entrypoint: the original command serves without waiting
      // for thaw-pause's deadline, on the image's own files.
      const endpoint = await waitForServingWorker(pod.controlDir, { timeoutMs: 120_000 });
      expect(endpoint.restored, 'a cold start, not a restore').toBe(false);
      await expectImageRootfs(pod.containerId);
      const failed = JSON.parse(await readFile(join(pod.controlDir, 'hook-failed'), 'utf8')) as { code: string };
      expect(failed.code).toBe('HOOK_AGENT_UNREACHABLE');
      expect(existsSync(join(dirs.workRoot, 'rootfs-undo', `${pod.containerId}.json`)), 'no undo journal: nothing was applied').toBe(false);
      // overlay mode (1.7): no placeholder at all; args mode (2.x): thaw-pause, told nothing, falls back at its deadline.
      expect(await readFile(pod.logPath, 'utf8')).not.toContain('exiting 75');
    } finally {
      plugin = await startPlugin();
      await stack.cri.removePod(pod.podId);
    }
  }, 240_000);

  // The next three: the Node.js hook (restore.hook: node), which applies the diff itself with no agent alive.
  it('falls back to a cold start when the agent is killed mid-restore and comes back (Node.js hook)', async () => {
    const stack = handle.stack;
    await plugin?.stop();
    plugin = await startPlugin(['--restore-hook', 'node']);
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

    // The hook ran without an agent: it applied the diff and left its undo journal in the agent's work root.
    const journal = join(dirs.workRoot, 'rootfs-undo', `${pod.containerId}.json`);
    expect(existsSync(journal), 'the undo journal the hook left').toBe(true);
    // A journal of a container the runtime no longer has: the next agent removes it.
    const stale = join(dirs.workRoot, 'rootfs-undo', `${'f'.repeat(64)}.json`);
    await writeFile(stale, '{}');
    plugin = await startPlugin();
    const endpoint = await waitForServingWorker(pod.controlDir, { timeoutMs: 120_000 });
    expect(endpoint.restored, 'a cold start, not a restore').toBe(false);
    // The next agent's fallback undid the diff from the journal before the original command ran: the cold start
    // sees the image's own files; the journal is used up, the stale one removed.
    await expectImageRootfs(pod.containerId);
    expect(existsSync(journal)).toBe(false);
    await waitFor(() => (existsSync(stale) ? undefined : true), 'the stale journal to be removed', 30_000);
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

  it('the agent killed for good after the hook applied the diff: at its deadline thaw-pause exits 75 rather than run the original command on the changed rootfs; a fresh container cold-starts on the image\'s own (Node.js hook)', async () => {
    const stack = handle.stack;
    const deadlineMs = 3_000;
    // An agent with a short thaw-pause deadline adjusts the target, then dies for good; the Node.js hook applies
    // the diff without it (and leaves the journal no agent will use).
    await plugin?.stop();
    plugin = await startPlugin(['--restore-pause-deadline-ms', String(deadlineMs), '--restore-hook', 'node']);
    const pod = await runWorkerPod(stack, dirs.controlRoot, { ...common(), name: 'e2e-agent-gone', annotations: { 'thaw.dev/restore': CHECKPOINT }, start: false, checkpointAfterMs: 600_000 });
    const victim = plugin!;
    victim.proc.kill('SIGKILL');
    await victim.exited;
    plugin = undefined;
    try {
      await stack.cri.startContainer(pod.containerId);
      const status = await waitFor(async () => {
        const st = (await stack.cri.containerStatus(pod.containerId)).status;
        return st.state === 'CONTAINER_EXITED' ? st : undefined;
      }, 'thaw-pause to give up', 120_000);
      expect(Number(status.exit_code)).toBe(75);
      const log = await readFile(pod.logPath, 'utf8');
      expect(log).toContain(`thaw-pause: no word from the agent within ${deadlineMs} ms, and the rootfs carries the checkpoint's diff that only the agent can undo; exiting 75`);
      // Never a worker on the changed rootfs.
      await expect(readFile(join(pod.controlDir, 'worker-endpoint.json'), 'utf8')).rejects.toThrow();
      // What the kubelet's restart brings: a fresh container from the image (no agent to adjust it) serves cold.
      const fresh = await runWorkerPod(stack, dirs.controlRoot, { ...common(), name: 'e2e-agent-gone-again', annotations: { 'thaw.dev/restore': CHECKPOINT }, checkpointAfterMs: 600_000 });
      try {
        const probe = await stack.cri.execSync(fresh.containerId, ['/bin/sh', '-c', 'cat /tmp/thaw-diff-probe'], 10);
        expect(probe.stdout).not.toMatch(/from-source/);
      } finally {
        await stack.cri.removePod(fresh.podId);
      }
    } finally {
      plugin = await startPlugin();
      await stack.cri.removePod(pod.podId);
    }
  }, 240_000);

  it('falls back to a cold start when the container was created under an agent that died and starts under the next (Node.js hook)', async () => {
    const stack = handle.stack;
    await plugin?.stop();
    plugin = await startPlugin(['--restore-hook', 'node']);
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
    await expectImageRootfs(pod.containerId);
    await stack.cri.removePod(pod.podId);
    // The container is gone: its journal too (poststop hook, and the agent on RemoveContainer).
    await waitFor(() => (existsSync(join(dirs.workRoot, 'rootfs-undo', `${pod.containerId}.json`)) ? undefined : true), 'the journal to be removed', 30_000);
  }, 240_000);
});
