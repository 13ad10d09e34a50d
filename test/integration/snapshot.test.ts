/**
 * `thaw.dev/snapshot: <name>` through the agent process and a real private containerd (runc, CRIU, the demo
 * worker in CRI pods): the first pod of a workload cold-starts and is checkpointed when its worker is ready, the
 * next restores; a new image under the same tag (a new digest) gets a new checkpoint and never the old one; two
 * pods starting together on an empty node: one takes the checkpoint, the other cold-starts without waiting for
 * it, and the claim goes with the pod that held it. `thaw list` (the control API) and /metrics say how each pod
 * started.
 */
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildWorkerImage } from '../../demo/worker-image.js';
import { expectedDigest } from '../../demo/worker/memory.js';
import { getJson, runWorkerPod, waitForServingWorker, type WorkerPod, type WorkerState } from '../../demo/scenario.js';
import { AgentClient } from '../../src/cli/client.js';
import { runCommand } from '../../src/node-stack/index.js';
import { flavorsUnderTest, useNodeStack, waitFor } from '../helpers/stack.js';
import {
  agentEndpoints,
  ensureBuilt,
  pluginDirsUnder,
  readJsonLog,
  startThawPluginProcess,
  waitForLog,
  type ThawPluginDirs,
  type ThawPluginProcess,
} from '../helpers/thaw-plugin-process.js';
import { parseExposition } from '../../src/agent/metrics.js';
import { DEFAULT_SNAPSHOT_RETAKE_AFTER_FAILURES } from '../../src/defaults.js';
import { openLocalStore } from '../../src/store/index.js';
import { startRegistry, type RunningRegistry } from '../../src/node-stack/registry.js';

const MEMORY_MB = 64;
const SEED = 5;
const REF = 'docker.io/thaw/demo-worker:snapshot';

describe.each(flavorsUnderTest())('thaw.dev/snapshot on containerd %s', (flavor) => {
  const handle = useNodeStack({ flavor });
  let workDir: string;
  let dirs: ThawPluginDirs;
  let plugin: ThawPluginProcess | undefined;
  let client: AgentClient;
  let registry: RunningRegistry | undefined;
  const pods: string[] = [];

  const run = async (name: string, snapshot: string, checkpointAfterMs: number): Promise<WorkerPod> => {
    const pod = await runWorkerPod(handle.stack, dirs.controlRoot, { name, image: REF, annotations: { 'thaw.dev/snapshot': snapshot }, memoryMb: MEMORY_MB, seed: SEED, warmupMs: 300, checkpointAfterMs });
    pods.push(pod.podId);
    return pod;
  };
  const remove = async (pod: WorkerPod): Promise<void> => {
    await handle.stack.cri.removePod(pod.podId);
    pods.splice(pods.indexOf(pod.podId), 1);
  };
  /** The snapshot decision the agent logged for a container: a checkpoint source, a restore, or a cold start. */
  const decisionOf = (containerId: string) =>
    waitForLog(dirs.logFile, (r) => r['containerId'] === containerId && (r.msg === 'thaw: checkpoint source' || r.msg === 'thaw: restore target' || r['event'] === 'snapshot'), `the snapshot decision for ${containerId}`, 30_000);
  const checkpointEventOf = (containerId: string) =>
    waitForLog(dirs.logFile, (r) => r['event'] === 'checkpoint' && r['containerId'] === containerId && r.msg === 'checkpoint', `the checkpoint event of ${containerId}`, 120_000);
  const restoreEventOf = (containerId: string) =>
    waitForLog(dirs.logFile, (r) => r['event'] === 'restore' && r['containerId'] === containerId && r.msg === 'restore', `the restore event of ${containerId}`, 120_000);
  /** The digest containerd's image record of REF points at, as ctr lists it. */
  const imageDigest = async (): Promise<string> => {
    const r = await runCommand(handle.stack.paths.ctr, ['-a', handle.stack.address, '-n', 'k8s.io', 'images', 'ls', `name==${REF}`], { step: 'ctr images ls' });
    const digest = r.stdout.split(/\s+/).find((c) => /^sha256:[0-9a-f]{64}$/.test(c));
    expect(digest).toBeDefined();
    return digest!;
  };
  /** A worker without a control dir (thaw left the pod alone) announces its port only in its container log. */
  const portFromLog = (pod: WorkerPod): Promise<number> =>
    waitFor(async () => {
      const text = await readFile(pod.logPath, 'utf8').catch(() => '');
      for (const line of text.split('\n')) {
        const at = line.indexOf('{"event":"listening"');
        if (at >= 0) return (JSON.parse(line.slice(at)) as { port: number }).port;
      }
      return undefined;
    }, `the listening line in ${pod.logPath}`, 60_000);

  beforeAll(async () => {
    ensureBuilt();
    workDir = await mkdtemp(join(tmpdir(), 'thaw-snapshot-'));
    dirs = pluginDirsUnder(workDir, handle.stack.paths.prefix, join(workDir, 'thaw.log'));
    await buildWorkerImage(handle.stack, { ref: REF, extraEnv: ['THAW_TEST_IMAGE=a'] });
    plugin = startThawPluginProcess({ socketPath: handle.stack.nriSocketPath, containerd: { socket: handle.stack.address, root: handle.stack.rootDir }, ...dirs });
    await waitForLog(dirs.logFile, (r) => r.msg === 'nri plugin synchronized', 'the plugin to register and synchronize', 30_000);
    client = new AgentClient((await agentEndpoints(dirs.logFile)).apiSocket);
  }, 240_000);

  afterAll(async () => {
    for (const id of pods) await handle.stack.cri.removePod(id).catch(() => undefined);
    client?.close();
    await plugin?.stop();
    await registry?.stop();
    await rm(workDir, { recursive: true, force: true });
  });

  it('checkpoints the first pod, restores the next; a new image digest under the same tag gets a new checkpoint, never the old one', async () => {
    const digestA = await imageDigest();
    // First pod: no checkpoint for its key yet → cold start, and it is the checkpoint source.
    const first = await run('snap-1', 'snap-worker', 300);
    const firstDecision = await decisionOf(first.containerId);
    expect(firstDecision.msg).toBe('thaw: checkpoint source');
    const keyA = String(firstDecision['key']);
    expect(keyA).toMatch(/^[0-9a-f]{64}$/);
    expect((await checkpointEventOf(first.containerId))['outcome']).toBe('succeeded');
    const firstState = await getJson<WorkerState>((await waitForServingWorker(first.controlDir, { timeoutMs: 60_000 })).port, '/state');
    expect(firstState.restored).toBe(false);
    const listed = (await client.list()).checkpoints.filter((c) => c.snapshot === 'snap-worker');
    expect(listed.map((c) => [c.snapshot_key, c.image.endsWith(`@${digestA}`), c.source_pod])).toEqual([[keyA, true, 'default/snap-1']]);
    await remove(first);

    // Second pod, same workload: restored from it, with the first pod's process state.
    const second = await run('snap-2', 'snap-worker', 300);
    expect((await decisionOf(second.containerId)).msg).toBe('thaw: restore target');
    const secondEndpoint = await waitForServingWorker(second.controlDir, { accept: (e) => e.restored, timeoutMs: 120_000 });
    const secondState = await getJson<WorkerState>(secondEndpoint.port, '/state');
    expect(secondState.bootId).toBe(firstState.bootId);
    expect(secondState.digest).toBe(expectedDigest(MEMORY_MB, SEED));
    expect((await restoreEventOf(second.containerId))['outcome']).toBe('restored');
    await remove(second);

    // A new image under the same tag: containerd's record of REF now names another digest.
    await buildWorkerImage(handle.stack, { ref: REF, extraEnv: ['THAW_TEST_IMAGE=b'] });
    const digestB = await imageDigest();
    expect(digestB).not.toBe(digestA);
    const third = await run('snap-3', 'snap-worker', 300);
    const thirdDecision = await decisionOf(third.containerId);
    expect(thirdDecision.msg, 'a new key: checkpointed again, not restored from the old image\'s checkpoint').toBe('thaw: checkpoint source');
    const keyB = String(thirdDecision['key']);
    expect(keyB).not.toBe(keyA);
    expect((await checkpointEventOf(third.containerId))['outcome']).toBe('succeeded');
    const thirdState = await getJson<WorkerState>((await waitForServingWorker(third.controlDir, { timeoutMs: 60_000 })).port, '/state');
    expect(thirdState.restored).toBe(false);
    expect(thirdState.bootId).not.toBe(firstState.bootId);
    const both = (await client.list()).checkpoints.filter((c) => c.snapshot === 'snap-worker');
    expect(new Map(both.map((c) => [c.snapshot_key, c.image.split('@')[1]]))).toEqual(new Map([[keyA, digestA], [keyB, digestB]]));
    await remove(third);

    // The next pod of the new image restores the new checkpoint (the third pod's state, not the first's).
    const fourth = await run('snap-4', 'snap-worker', 300);
    const fourthState = await getJson<WorkerState>((await waitForServingWorker(fourth.controlDir, { accept: (e) => e.restored, timeoutMs: 120_000 })).port, '/state');
    expect(fourthState.bootId).toBe(thirdState.bootId);
    expect((await restoreEventOf(fourth.containerId))['checkpoint']).toBe(both.find((c) => c.snapshot_key === keyB)!.name);
    await remove(fourth);

    const { snapshot_pods } = await client.list();
    expect(snapshot_pods.filter((p) => p.snapshot === 'snap-worker').map((p) => [p.outcome, p.cause, p.count])).toEqual([
      ['checkpointed', '', 2],
      ['restored', '', 2],
    ]);
  }, 600_000);

  it('two pods at once on an empty node: one takes the checkpoint, the other cold-starts without waiting; the claim goes with its pod', async () => {
    // The workers ask for their checkpoint late: the cold-started one must be serving long before.
    const pair = await Promise.all([run('pair-a', 'snap-pair', 120_000), run('pair-b', 'snap-pair', 120_000)]);
    const decisions = await Promise.all(pair.map((p) => decisionOf(p.containerId)));
    const sourceIndex = decisions.findIndex((d) => d.msg === 'thaw: checkpoint source');
    expect(sourceIndex).toBeGreaterThanOrEqual(0);
    const source = pair[sourceIndex]!;
    const cold = pair[1 - sourceIndex]!;
    expect([decisions[1 - sourceIndex]!['outcome'], decisions[1 - sourceIndex]!['cause']]).toEqual(['cold', 'AGENT_SNAPSHOT_CHECKPOINT_IN_PROGRESS']);
    // The cold one is left unchanged (no control dir) and serves while the source still waits for its worker.
    const coldPort = await portFromLog(cold);
    expect(await getJson<{ ok: boolean }>(coldPort, '/healthz')).toEqual({ ok: true });
    await expect(readFile(join(cold.controlDir, 'worker-endpoint.json'))).rejects.toThrow();
    const status = await client.status();
    expect(status.checkpoints.filter((c) => c.container_id === source.containerId).map((c) => c.state)).toEqual(['waiting-for-worker']);

    // The source dies before its checkpoint: its claim goes, and the next pod takes the checkpoint.
    await remove(source);
    expect((await checkpointEventOf(source.containerId))['outcome']).toBe('cancelled');
    const next = await run('pair-c', 'snap-pair', 300);
    expect((await decisionOf(next.containerId)).msg).toBe('thaw: checkpoint source');
    expect((await checkpointEventOf(next.containerId))['outcome']).toBe('succeeded');
    await waitForServingWorker(next.controlDir, { timeoutMs: 60_000 });

    const metrics = parseExposition(await (await fetch((await agentEndpoints(dirs.logFile)).metricsUrl)).text());
    const series = (outcome: string, cause: string) => metrics.get(`thaw_snapshot_pods_total{namespace="default",snapshot="snap-pair",outcome="${outcome}",cause="${cause}"}`);
    expect([series('cold', 'AGENT_SNAPSHOT_CHECKPOINT_IN_PROGRESS'), series('cold', 'AGENT_SNAPSHOT_CHECKPOINT_CANCELLED'), series('checkpointed', '')]).toEqual([1, 1, 1]);
    expect(metrics.get('thaw_snapshot_checkpoints_stored{namespace="default",snapshot="snap-pair"}')).toBe(1);
    const logged = await readJsonLog(dirs.logFile);
    expect(logged.filter((r) => r.level === 'error' && r.msg === 'thaw: createContainer handler failed; the container is created unchanged')).toEqual([]);
    for (const p of [cold, next]) await remove(p);
  }, 600_000);

  it('an agent killed while a snapshot source waits: the next agent takes the claim back and its checkpoint restores', async () => {
    const source = await run('recover-a', 'snap-recover', 4_000);
    expect((await decisionOf(source.containerId)).msg).toBe('thaw: checkpoint source');
    const victim = plugin!;
    victim.proc.kill('SIGKILL');
    await victim.exited;
    client.close();
    // The next agent: same node (store, control dirs), its own log.
    dirs = { ...dirs, logFile: join(workDir, 'thaw-after-kill.log') };
    plugin = startThawPluginProcess({ socketPath: handle.stack.nriSocketPath, containerd: { socket: handle.stack.address, root: handle.stack.rootDir }, ...dirs });
    await waitForLog(dirs.logFile, (r) => r.msg === 'nri plugin synchronized', 'the next agent to register and synchronize', 30_000);
    client = new AgentClient((await agentEndpoints(dirs.logFile)).apiSocket);
    // A pod that starts now finds the claim held by the recovered source.
    const other = await run('recover-b', 'snap-recover', 4_000);
    expect([(await decisionOf(other.containerId))['cause']]).toEqual(['AGENT_SNAPSHOT_CHECKPOINT_IN_PROGRESS']);
    expect((await checkpointEventOf(source.containerId))['outcome']).toBe('succeeded');
    const sourceState = await getJson<WorkerState>((await waitForServingWorker(source.controlDir, { timeoutMs: 60_000 })).port, '/state');
    const [stored] = (await client.list()).checkpoints.filter((c) => c.snapshot === 'snap-recover');
    expect(stored?.source_pod).toBe('default/recover-a');
    // Its manifest has the spec args (read back from the container at Synchronize): the next pod restores it.
    const next = await run('recover-c', 'snap-recover', 4_000);
    const state = await getJson<WorkerState>((await waitForServingWorker(next.controlDir, { accept: (e) => e.restored, timeoutMs: 120_000 })).port, '/state');
    expect(state.bootId).toBe(sourceState.bootId);
    for (const p of [source, other, next]) await remove(p);
  }, 600_000);

  it('a checkpoint whose restores keep falling back is taken again by the next pod, which replaces it', async () => {
    const source = await run('retake-a', 'snap-retake', 300);
    expect((await checkpointEventOf(source.containerId))['outcome']).toBe('succeeded');
    const sourceState = await getJson<WorkerState>((await waitForServingWorker(source.controlDir, { timeoutMs: 60_000 })).port, '/state');
    await remove(source);
    // Damage it: one byte of a pages image flipped, so every restore's verification fails (a cold start each).
    const [listed] = (await client.list()).checkpoints.filter((c) => c.snapshot === 'snap-retake');
    const store = await openLocalStore({ root: dirs.storeRoot });
    const opened = await store.open(listed!.name);
    const pages = join(opened.paths.dir, opened.manifest.files.map((f) => f.path).find((p) => /pages-\d+\.img$/.test(p))!);
    const bytes = await readFile(pages);
    bytes[100] = (bytes[100] ?? 0) ^ 0xff;
    await writeFile(pages, bytes);
    for (let i = 0; i < DEFAULT_SNAPSHOT_RETAKE_AFTER_FAILURES; i++) {
      const pod = await run(`retake-f${i}`, 'snap-retake', 300);
      expect((await decisionOf(pod.containerId)).msg).toBe('thaw: restore target');
      expect((await restoreEventOf(pod.containerId))['cause']).toBe('RESTORE_CHECKPOINT_CORRUPT');
      const cold = await waitForServingWorker(pod.controlDir, { timeoutMs: 60_000 });
      expect(cold.restored).toBe(false);
      await remove(pod);
    }
    // The next pod takes a new checkpoint under the same name (replacing the damaged one); the one after restores it.
    const retaker = await run('retake-new', 'snap-retake', 300);
    expect((await decisionOf(retaker.containerId)).msg).toBe('thaw: checkpoint source');
    expect((await checkpointEventOf(retaker.containerId))['outcome']).toBe('succeeded');
    const retakerState = await getJson<WorkerState>((await waitForServingWorker(retaker.controlDir, { timeoutMs: 60_000 })).port, '/state');
    expect(retakerState.bootId).not.toBe(sourceState.bootId);
    const [replaced] = (await client.list()).checkpoints.filter((c) => c.snapshot === 'snap-retake');
    expect([replaced!.name, replaced!.source_pod]).toEqual([listed!.name, 'default/retake-new']);
    await remove(retaker);
    const after = await run('retake-after', 'snap-retake', 300);
    const state = await getJson<WorkerState>((await waitForServingWorker(after.controlDir, { accept: (e) => e.restored, timeoutMs: 120_000 })).port, '/state');
    expect(state.bootId).toBe(retakerState.bootId);
    await remove(after);
    const rows = (await client.list()).snapshot_pods.filter((p) => p.snapshot === 'snap-retake').map((p) => [p.outcome, p.cause, p.count]);
    expect(rows).toEqual([['checkpointed', '', 2], ['cold', 'RESTORE_CHECKPOINT_CORRUPT', DEFAULT_SNAPSHOT_RETAKE_AFTER_FAILURES], ['restored', '', 1]]);
  }, 600_000);

  it('with a snapshotRepository for the namespace: node A pushes its first checkpoint, node B pulls it instead of taking its own', async () => {
    // Node A and node B: two agents, one after the other, on this stack, each with its own (empty) store.
    await plugin?.stop();
    plugin = undefined;
    client.close();
    registry = await startRegistry();
    const base = join(workDir, 'registry-nodes');
    await mkdir(base, { recursive: true });
    const agentConfig = join(workDir, 'agent-snapshot.yaml');
    const registryConfig = join(workDir, 'registries.json');
    await writeFile(agentConfig, `tenancy:\n  namespaces:\n    default:\n      registries:\n        - {prefix: "${registry.host}/team", allowUnsigned: true}\n      snapshotRepository: "${registry.host}/team/snapshots"\n`, { mode: 0o600 });
    await writeFile(registryConfig, JSON.stringify({ access: { [registry.host]: { plainHttp: true } } }), { mode: 0o600 });
    const startNode = async (node: string): Promise<void> => {
      dirs = pluginDirsUnder(join(base, node), handle.stack.paths.prefix, join(base, `${node}.log`));
      plugin = startThawPluginProcess({ socketPath: handle.stack.nriSocketPath, containerd: { socket: handle.stack.address, root: handle.stack.rootDir }, ...dirs, extraArgs: ['--config', agentConfig, '--registry-config', registryConfig] });
      await waitForLog(dirs.logFile, (r) => r.msg === 'nri plugin synchronized', `agent ${node} to register and synchronize`, 30_000);
      client = new AgentClient((await agentEndpoints(dirs.logFile)).apiSocket);
    };

    await startNode('a');
    const source = await run('reg-a', 'snap-reg', 300);
    expect((await decisionOf(source.containerId)).msg, 'the tag is not in the repository yet: node A takes the checkpoint').toBe('thaw: checkpoint source');
    const checkpointed = await checkpointEventOf(source.containerId);
    expect(checkpointed['outcome']).toBe('succeeded');
    const pushed = await waitForLog(dirs.logFile, (r) => r['event'] === 'snapshot-push', 'the push of the snapshot', 120_000);
    // Stored in the pod's namespace; tagged by the name within it (a tag holds no '/').
    const [ns, storedName] = String(checkpointed['name']).split('/');
    expect(ns).toBe('default');
    expect([pushed['outcome'], pushed['reference']]).toEqual(['succeeded', `${registry.host}/team/snapshots:${storedName}`]);
    const sourceState = await getJson<WorkerState>((await waitForServingWorker(source.controlDir, { timeoutMs: 60_000 })).port, '/state');
    await remove(source);
    await plugin!.stop();
    client.close();

    await startNode('b');
    expect((await client.list()).checkpoints).toEqual([]);
    const target = await run('reg-b', 'snap-reg', 300);
    const decision = await decisionOf(target.containerId);
    expect(decision.msg, 'node B pulls the pushed checkpoint instead of taking its own').toBe('thaw: restore target');
    const state = await getJson<WorkerState>((await waitForServingWorker(target.controlDir, { accept: (e) => e.restored, timeoutMs: 120_000 })).port, '/state');
    expect(state.bootId).toBe(sourceState.bootId);
    expect((await restoreEventOf(target.containerId))['outcome']).toBe('restored');
    const inB = (await client.list()).checkpoints;
    expect(inB.map((c) => [c.snapshot, c.source_pod])).toEqual([['snap-reg', 'default/reg-a']]);
    const logB = await readJsonLog(dirs.logFile);
    expect(logB.filter((r) => r['event'] === 'checkpoint'), 'node B took no checkpoint of its own').toEqual([]);
    await remove(target);
  }, 600_000);
});
