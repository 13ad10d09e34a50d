/**
 * Checkpoints across nodes, end to end: the plugin process with a real containerd, runc and CRIU, and a real
 * docker-registry on loopback. "Node A" (store dir A) checkpoints the demo worker and the checkpoint is pushed;
 * "node B" (the plugin restarted on an empty store dir B, with registry access) restores a pod whose
 * `thaw.dev/restore` names the reference: pulled at CreateContainer, restored with the source's state; also from a
 * copy of the checkpoint moved with oras alone (test/helpers/oras.ts). Then
 * bad input, each a cold start with its cause and no checkpoint left in store B: a truncated blob, a blob of
 * the wrong digest, a manifest of another artifact type (refused at CreateContainer), and the registry killed
 * in the middle of the pull.
 */
import { copyFile, mkdtemp, open as openFile, readdir, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildWorkerImage } from '../../demo/worker-image.js';
import { expectedDigest } from '../../demo/worker/memory.js';
import { getJson, runWorkerPod, waitForServingWorker, type WorkerState } from '../../demo/scenario.js';
import { startRegistry, type RunningRegistry } from '../../src/node-stack/registry.js';
import { openLocalStore } from '../../src/store/local-store.js';
import { OCI_MANIFEST_MEDIA_TYPE } from '../../src/store/oci/artifact.js';
import { RegistryClient, sha256Digest } from '../../src/store/oci/client.js';
import { FILE_CACHE_DIR_NAME } from '../../src/store/oci/file-cache.js';
import { pushCheckpoint } from '../../src/store/oci/push.js';
import { orasPullCheckpoint, orasPushThawLayout } from '../helpers/oras.js';
import { startBreakingProxy } from '../helpers/registry.js';
import { flavorsUnderTest, useNodeStack, waitFor } from '../helpers/stack.js';
import { ensureBuilt, pluginDirsUnder, readJsonLog, startThawPluginProcess, waitForLog, type ThawPluginDirs, type ThawPluginProcess } from '../helpers/thaw-plugin-process.js';

const MEMORY_MB = 96;
const SEED = 23;
const CHECKPOINT = 'reg-e2e';

// One flavor is enough: the registry path is the same on both, and the stack runs are the slow part of npm test.
describe.each(flavorsUnderTest().slice(0, 1))('checkpoints across nodes through a registry, on containerd %s', (flavor) => {
  const handle = useNodeStack({ flavor });
  let workDir: string;
  let dirsA: ThawPluginDirs;
  let dirsB: ThawPluginDirs;
  let plugin: ThawPluginProcess | undefined;
  let registry: RunningRegistry;
  let proxy: Awaited<ReturnType<typeof startBreakingProxy>>;
  let killAfterBytes: number | undefined;
  let image: string;
  let sourceState: WorkerState;
  let pushedDigest: string;
  let registryConfig: string;

  const startPlugin = async (dirs: ThawPluginDirs, extraArgs: string[] = []): Promise<ThawPluginProcess> => {
    const syncs = async (): Promise<number> => (await readJsonLog(dirs.logFile).catch(() => [])).filter((r) => r.msg === 'nri plugin synchronized').length;
    const before = await syncs();
    const p = startThawPluginProcess({ socketPath: handle.stack.nriSocketPath, containerd: { socket: handle.stack.address, root: handle.stack.rootDir }, ...dirs, extraArgs });
    await waitFor(async () => ((await syncs()) > before ? true : undefined), 'the plugin to register and synchronize', 30_000);
    return p;
  };
  const common = () => ({ image, memoryMb: MEMORY_MB, seed: SEED, warmupMs: 500 });
  const restoreEventOf = (containerId: string) =>
    waitForLog(dirsB.logFile, (r) => r['event'] === 'restore' && r['containerId'] === containerId, `the restore event of ${containerId}`, 120_000);

  /** Store B as a fresh node has it: no pulled checkpoint, an empty file cache. */
  const forgetPulls = async (): Promise<void> => {
    const store = await openLocalStore({ root: dirsB.storeRoot });
    for (const c of await store.list()) await store.delete(c.name);
    await rm(join(dirsB.storeRoot, FILE_CACHE_DIR_NAME), { recursive: true, force: true });
  };
  /** The largest layer of the pushed checkpoint (a chunk of the CRIU pages image). */
  const largestLayer = async (): Promise<{ digest: string; size: number }> => {
    const client = new RegistryClient({ registry: registry.host, plainHttp: true });
    try {
      const image = JSON.parse((await client.getManifest('team/worker', pushedDigest)).body.toString('utf8')) as { layers: Array<{ digest: string; size: number }> };
      return [...image.layers].sort((a, b) => b.size - a.size)[0]!;
    } finally {
      client.close();
    }
  };
  /** Node B's checkpoints (pulled ones, in .oci/; any namespace's) and unfinished directories. */
  const storeBEntries = async (): Promise<string[]> => [
    ...(await readdir(dirsB.storeRoot)).filter((e) => !e.startsWith('.') || e.startsWith('.tmp-')),
    ...(await readdir(join(dirsB.storeRoot, '.oci')).catch(() => [] as string[])),
  ];

  /** A pod restoring from `reference` must cold-start: the worker serves, not restored, and the cause is logged. */
  const expectColdStart = async (name: string, reference: string): Promise<Record<string, unknown>> => {
    const pod = await runWorkerPod(handle.stack, dirsB.controlRoot, { ...common(), name, annotations: { 'thaw.dev/restore': reference } });
    const event = await restoreEventOf(pod.containerId);
    expect(event['outcome']).toBe('fallback');
    expect(event['cause']).toBe('RESTORE_PULL_FAILED');
    const adjusted = await readdir(pod.controlDir).then(() => true, () => false);
    if (adjusted) {
      // thaw had adjusted the container: the placeholder execs the original command.
      const endpoint = await waitForServingWorker(pod.controlDir, { timeoutMs: 120_000 });
      expect(endpoint.restored).toBe(false);
      const state = await getJson<WorkerState>(endpoint.port, '/state');
      expect(state.digest).toBe(expectedDigest(MEMORY_MB, SEED));
      expect(state.bootId).not.toBe(sourceState.bootId);
      expect(JSON.parse(await readFile(join(pod.controlDir, 'restore-failed'), 'utf8'))).toMatchObject({ cause: 'RESTORE_PULL_FAILED' });
    }
    await waitFor(async () => ((await handle.stack.cri.containerStatus(pod.containerId)).status.state === 'CONTAINER_RUNNING' ? true : undefined), 'the cold-started container to run', 60_000);
    expect(await storeBEntries()).toEqual([]);
    await handle.stack.cri.removePod(pod.podId);
    return event;
  };

  beforeAll(async () => {
    ensureBuilt();
    workDir = await mkdtemp(join(tmpdir(), 'thaw-rege2e-'));
    dirsA = pluginDirsUnder(join(workDir, 'a'), handle.stack.paths.prefix, join(workDir, 'a.log'));
    dirsB = pluginDirsUnder(join(workDir, 'b'), handle.stack.paths.prefix, join(workDir, 'b.log'));
    image = (await buildWorkerImage(handle.stack)).ref;
    registry = await startRegistry();
    proxy = await startBreakingProxy({ host: '127.0.0.1', port: registry.port }, {
      afterBytes: Number.MAX_SAFE_INTEGER,
      breaks: 0,
      onBytes: (total) => {
        if (killAfterBytes !== undefined && total > killAfterBytes) {
          killAfterBytes = undefined;
          void registry.kill();
        }
      },
    });
    registryConfig = join(workDir, 'registries.json');
    await writeFile(registryConfig, JSON.stringify({ access: { [registry.host]: { plainHttp: true }, [proxy.host]: { plainHttp: true } }, pull: { retries: 2 } }), { mode: 0o600 });

    // Node A: checkpoint the worker, then push it.
    plugin = await startPlugin(dirsA);
    const source = await runWorkerPod(handle.stack, dirsA.controlRoot, { ...common(), name: 'reg-source', annotations: { 'thaw.dev/checkpoint': CHECKPOINT }, checkpointAfterMs: 300 });
    const first = await waitForServingWorker(source.controlDir);
    for (let i = 0; i < 3; i++) await getJson(first.port, '/healthz');
    const event = await waitForLog(dirsA.logFile, (r) => r['event'] === 'checkpoint' && r['name'] === `default/${CHECKPOINT}`, 'the checkpoint', 120_000);
    expect(event['outcome']).toBe('succeeded');
    const resumed = await waitForServingWorker(source.controlDir, { accept: (e) => e.port !== first.port });
    sourceState = await getJson<WorkerState>(resumed.port, '/state');
    await handle.stack.cri.removePod(source.podId);
    await plugin.stop();
    const storeA = await openLocalStore({ root: dirsA.storeRoot });
    pushedDigest = (await pushCheckpoint({ store: storeA, name: `default/${CHECKPOINT}`, reference: `${registry.host}/team/worker:v1`, access: { plainHttp: true } })).digest;

    // Node B: an empty store, registry access.
    // The pods run in namespace default; the policy lets it restore from both hosts' team/ unsigned (signatures
    // are tenancy-sources.test.ts's subject).
    const agentConfig = join(workDir, 'agent.yaml');
    await writeFile(agentConfig, `tenancy:\n  namespaces:\n    default:\n      registries:\n${[registry.host, proxy.host].map((h) => `        - {prefix: "${h}/team", allowUnsigned: true}\n`).join('')}`, { mode: 0o600 });
    plugin = await startPlugin(dirsB, ['--registry-config', registryConfig, '--config', agentConfig]);
  }, 300_000);

  afterAll(async () => {
    await plugin?.stop();
    await proxy?.close();
    await registry?.stop();
    await rm(workDir, { recursive: true, force: true });
  });

  it('restores a pod on node B from the registry reference, with the source state', async () => {
    const pod = await runWorkerPod(handle.stack, dirsB.controlRoot, { ...common(), name: 'reg-restore', annotations: { 'thaw.dev/restore': `${registry.host}/team/worker:v1` } });
    const endpoint = await waitForServingWorker(pod.controlDir, { accept: (e) => e.restored, timeoutMs: 120_000 });
    const state = await getJson<WorkerState>(endpoint.port, '/state');
    expect(state.digest).toBe(expectedDigest(MEMORY_MB, SEED));
    expect(state.bootId).toBe(sourceState.bootId);
    expect(state.restored).toBe(true);
    const event = await restoreEventOf(pod.containerId);
    expect(event['outcome']).toBe('restored');
    const name = `oci-${pushedDigest.slice('sha256:'.length)}`;
    expect(event['checkpoint']).toBe(name);
    expect((event['phases'] as Record<string, number>)['transferMs']).toBeGreaterThanOrEqual(0);
    expect(await storeBEntries()).toEqual([name]);
    await handle.stack.cri.removePod(pod.podId);
  }, 240_000);

  it('restores on node B from a copy made with oras alone (oras pull of the push, oras push in thaw\'s layout)', async () => {
    // Only the checkpoints go: the agent's file cache stays in place under it (the copy's files are blobs
    // of other digests where the push chunked them).
    const storeB = await openLocalStore({ root: dirsB.storeRoot });
    for (const c of await storeB.list()) await storeB.delete(c.name);
    const home = join(workDir, 'oras-home');
    const copy = join(workDir, 'oras-copy');
    await orasPullCheckpoint(`${registry.host}/team/worker@${pushedDigest}`, copy, { home });
    const reference = `${registry.host}/team/oras-copy:v1`;
    const copyDigest = await orasPushThawLayout(copy, reference, { home });
    expect(copyDigest).not.toBe(pushedDigest); // one layer per file, oras's own annotations: another manifest
    const pod = await runWorkerPod(handle.stack, dirsB.controlRoot, { ...common(), name: 'reg-oras-copy', annotations: { 'thaw.dev/restore': reference } });
    const endpoint = await waitForServingWorker(pod.controlDir, { accept: (e) => e.restored, timeoutMs: 120_000 });
    const state = await getJson<WorkerState>(endpoint.port, '/state');
    expect(state.digest).toBe(expectedDigest(MEMORY_MB, SEED));
    expect(state.bootId).toBe(sourceState.bootId);
    const event = await restoreEventOf(pod.containerId);
    expect(event['outcome']).toBe('restored');
    expect(event['checkpoint']).toBe(`oci-${copyDigest.slice('sha256:'.length)}`);
    await handle.stack.cri.removePod(pod.podId);
  }, 240_000);

  it('cold-starts when a blob of the checkpoint is truncated in the registry, keeping nothing', async () => {
    await forgetPulls();
    const largest = await largestLayer();
    const data = registry.blobDataPath(largest.digest);
    await copyFile(data, `${data}.saved`);
    try {
      await truncate(data, Math.floor(largest.size / 2));
      await expectColdStart('reg-truncated', `${registry.host}/team/worker:v1`);
    } finally {
      await copyFile(`${data}.saved`, data);
      await rm(`${data}.saved`);
    }
    const log = await readJsonLog(dirsB.logFile);
    expect(log.some((r) => r.msg === 'pull failed; nothing was kept' && r['code'] === 'OCI_TRUNCATED')).toBe(true);
  }, 240_000);

  it('cold-starts when a blob holds bytes of another digest, keeping nothing', async () => {
    await forgetPulls();
    const largest = await largestLayer();
    const data = registry.blobDataPath(largest.digest);
    await copyFile(data, `${data}.saved`);
    try {
      const fh = await openFile(data, 'r+');
      await fh.write(Buffer.from('not the bytes that were pushed'), 0, undefined, 1000);
      await fh.close();
      await expectColdStart('reg-wrong-digest', `${registry.host}/team/worker:v1`);
    } finally {
      await copyFile(`${data}.saved`, data);
      await rm(`${data}.saved`);
    }
    const log = await readJsonLog(dirsB.logFile);
    expect(log.some((r) => r.msg === 'pull failed; nothing was kept' && r['code'] === 'OCI_DIGEST_MISMATCH')).toBe(true);
  }, 240_000);

  it('cold-starts, without adjusting the container, when the reference is an artifact of another type', async () => {
    await forgetPulls();
    const client = new RegistryClient({ registry: registry.host, plainHttp: true });
    try {
      const config = Buffer.from('{"kind":"sbom"}');
      const session = await client.startUpload('team/other');
      await client.putBlob('team/other', session, sha256Digest(config), config.length, () => Readable.from([config]));
      const manifest = { schemaVersion: 2, mediaType: OCI_MANIFEST_MEDIA_TYPE, artifactType: 'application/vnd.example.sbom.v1', config: { mediaType: 'application/vnd.example.sbom.config.v1+json', digest: sha256Digest(config), size: config.length }, layers: [] };
      await client.putManifest('team/other', 'v1', Buffer.from(JSON.stringify(manifest)), OCI_MANIFEST_MEDIA_TYPE);
    } finally {
      client.close();
    }
    const event = await expectColdStart('reg-foreign', `${registry.host}/team/other:v1`);
    expect(event['code']).toBe('OCI_FOREIGN_ARTIFACT');
  }, 240_000);

  it('cold-starts when the registry dies in the middle of the pull, keeping nothing', async () => {
    await forgetPulls();
    killAfterBytes = 4 * 1024 * 1024;
    await expectColdStart('reg-registry-dies', `${proxy.host}/team/worker@${pushedDigest}`);
    expect(registry.process.signalCode).toBe('SIGKILL');
    const log = await readJsonLog(dirsB.logFile);
    expect(log.some((r) => r.msg === 'pull failed; nothing was kept' && r['code'] === 'OCI_REGISTRY_UNAVAILABLE')).toBe(true);
  }, 240_000);
});
