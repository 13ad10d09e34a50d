/**
 * The registry variant of `thaw.dev/snapshot` when the namespace's policy requires signatures, through the agent
 * process and a real private containerd (runc, CRIU, the demo worker in CRI pods) and a real docker-registry:
 * node A (an agent with `signingKey`) takes the first checkpoint, signs it and pushes it; node B trusting A's key
 * pulls and restores it; node C trusting another key cold-starts with the signature cause, stores nothing and
 * takes no checkpoint of its own. The nodes are agents run one after the other on one stack, each with its own
 * (empty) store.
 */
import { generateKeyPairSync } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildWorkerImage } from '../../demo/worker-image.js';
import { getJson, runWorkerPod, waitForServingWorker, type WorkerPod, type WorkerState } from '../../demo/scenario.js';
import { AgentClient } from '../../src/cli/client.js';
import { startRegistry, type RunningRegistry } from '../../src/node-stack/registry.js';
import { RegistryClient } from '../../src/store/oci/client.js';
import { signatureTagFor } from '../../src/store/oci/signature.js';
import { cosignVerify } from '../helpers/cosign.js';
import { flavorsUnderTest, useNodeStack, waitFor } from '../helpers/stack.js';
import { agentEndpoints, ensureBuilt, pluginDirsUnder, readJsonLog, startThawPluginProcess, waitForLog, type ThawPluginDirs, type ThawPluginProcess } from '../helpers/thaw-plugin-process.js';

const REF = 'docker.io/thaw/demo-worker:snapshot-signed';

/** Every regular file under `dir` (relative paths); [] when it does not exist. */
async function filesUnder(dir: string, prefix = ''): Promise<string[]> {
  const entries = await readdir(join(dir, prefix), { withFileTypes: true }).catch(() => []);
  const out: string[] = [];
  for (const e of entries) {
    const rel = prefix === '' ? e.name : `${prefix}/${e.name}`;
    if (e.isDirectory()) out.push(...(await filesUnder(dir, rel)));
    else out.push(rel);
  }
  return out.sort();
}

describe.each(flavorsUnderTest())('signed thaw.dev/snapshot across nodes on containerd %s', (flavor) => {
  const handle = useNodeStack({ flavor });
  let workDir: string;
  let dirs: ThawPluginDirs;
  let plugin: ThawPluginProcess | undefined;
  let client: AgentClient | undefined;
  let registry: RunningRegistry;
  const pods: string[] = [];

  const run = async (name: string): Promise<WorkerPod> => {
    const pod = await runWorkerPod(handle.stack, dirs.controlRoot, { name, image: REF, annotations: { 'thaw.dev/snapshot': 'snap-signed' }, memoryMb: 64, seed: 7, warmupMs: 300, checkpointAfterMs: 300 });
    pods.push(pod.podId);
    return pod;
  };
  const remove = async (pod: WorkerPod): Promise<void> => {
    await handle.stack.cri.removePod(pod.podId);
    pods.splice(pods.indexOf(pod.podId), 1);
  };
  const decisionOf = (containerId: string) =>
    waitForLog(dirs.logFile, (r) => r['containerId'] === containerId && (r.msg === 'thaw: checkpoint source' || r.msg === 'thaw: restore target' || r['event'] === 'snapshot'), `the snapshot decision for ${containerId}`, 30_000);
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
  const keyPair = async (name: string): Promise<{ keyFile: string; publicKeyFile: string }> => {
    const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const keyFile = join(workDir, `${name}.key`);
    const publicKeyFile = join(workDir, `${name}.pub`);
    await writeFile(keyFile, privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 });
    await writeFile(publicKeyFile, publicKey.export({ type: 'spki', format: 'pem' }));
    return { keyFile, publicKeyFile };
  };
  /** Starts agent `node` with its own store and the given tenancy lines for namespace default. */
  const startNode = async (node: string, nsLines: string): Promise<void> => {
    const config = join(workDir, `agent-${node}.yaml`);
    await writeFile(config, `tenancy:\n  namespaces:\n    default:\n${nsLines}`, { mode: 0o600 });
    const registryConfig = join(workDir, 'registries.json');
    await writeFile(registryConfig, JSON.stringify({ access: { [registry.host]: { plainHttp: true } } }), { mode: 0o600 });
    dirs = pluginDirsUnder(join(workDir, node), handle.stack.paths.prefix, join(workDir, `${node}.log`));
    plugin = startThawPluginProcess({ socketPath: handle.stack.nriSocketPath, containerd: { socket: handle.stack.address, root: handle.stack.rootDir }, ...dirs, extraArgs: ['--config', config, '--registry-config', registryConfig] });
    await waitForLog(dirs.logFile, (r) => r.msg === 'nri plugin synchronized', `agent ${node} to register and synchronize`, 30_000);
    client = new AgentClient((await agentEndpoints(dirs.logFile)).apiSocket);
  };
  const stopNode = async (): Promise<void> => {
    client?.close();
    client = undefined;
    await plugin?.stop();
    plugin = undefined;
  };

  beforeAll(async () => {
    ensureBuilt();
    workDir = await mkdtemp(join(tmpdir(), 'thaw-snapshot-signed-'));
    await mkdir(workDir, { recursive: true });
    await buildWorkerImage(handle.stack, { ref: REF });
    registry = await startRegistry();
  }, 240_000);

  afterAll(async () => {
    for (const id of pods) await handle.stack.cri.removePod(id).catch(() => undefined);
    await stopNode();
    await registry?.stop();
    await rm(workDir, { recursive: true, force: true });
  });

  it('node A signs its push; B with A\'s key restores it; C with another key cold-starts (RESTORE_SIGNATURE), storing nothing', async () => {
    const a = await keyPair('node-a');
    const other = await keyPair('other');
    const repository = `${registry.host}/team/snapshots`;
    const grant = (pub: string) => `      registries:\n        - {prefix: "${registry.host}/team", keys: ["${pub}"]}\n      snapshotRepository: "${repository}"\n`;

    await startNode('a', `${grant(a.publicKeyFile)}      signingKey: "${a.keyFile}"\n`);
    const source = await run('signed-a');
    expect((await decisionOf(source.containerId)).msg).toBe('thaw: checkpoint source');
    const pushed = await waitForLog(dirs.logFile, (r) => r['event'] === 'snapshot-push', 'the push of the snapshot', 180_000);
    expect([pushed['outcome'], pushed['signedBy']], JSON.stringify(pushed)).toEqual(['succeeded', a.keyFile]);
    const digest = String(pushed['digest']);
    expect(pushed['signatureTag']).toBe(signatureTagFor(digest));
    // What node A wrote is a signature cosign accepts too.
    const v = await cosignVerify({ registryHost: registry.host, repository: 'team/snapshots', digest, publicKeyFile: a.publicKeyFile, home: join(workDir, 'cosign-home') });
    expect(v.code, v.stderr).toBe(0);
    const sourceState = await getJson<WorkerState>((await waitForServingWorker(source.controlDir, { timeoutMs: 60_000 })).port, '/state');
    await remove(source);
    await stopNode();

    // Node C trusts another key: the pushed checkpoint is refused before any byte is stored; the pod cold-starts.
    await startNode('c', grant(other.publicKeyFile));
    const refused = await run('signed-c');
    const decision = await decisionOf(refused.containerId);
    expect([decision['event'], decision['outcome'], decision['cause'], decision['code']], JSON.stringify(decision)).toEqual(['snapshot', 'cold', 'RESTORE_SIGNATURE', 'OCI_SIGNATURE_INVALID']);
    // Left unchanged (no control dir): its own cold start, serving.
    const coldState = await getJson<WorkerState>(await portFromLog(refused), '/state');
    expect([coldState.restored, coldState.bootId === sourceState.bootId]).toEqual([false, false]);
    expect((await client!.list()).checkpoints).toEqual([]);
    expect(await filesUnder(dirs.storeRoot), 'no byte of the refused checkpoint in the store').toEqual([]);
    const logC = await readJsonLog(dirs.logFile);
    expect(logC.filter((r) => r['event'] === 'checkpoint' || r['event'] === 'snapshot-push'), 'node C took no checkpoint of its own').toEqual([]);
    const { snapshot_pods } = await client!.list();
    expect(snapshot_pods.map((p) => [p.outcome, p.cause, p.count])).toEqual([['cold', 'RESTORE_SIGNATURE', 1]]);
    await remove(refused);
    await stopNode();

    // Node B trusts A's key: it pulls the signed checkpoint and restores from it.
    await startNode('b', grant(a.publicKeyFile));
    const target = await run('signed-b');
    expect((await decisionOf(target.containerId)).msg).toBe('thaw: restore target');
    const state = await getJson<WorkerState>((await waitForServingWorker(target.controlDir, { accept: (e) => e.restored, timeoutMs: 120_000 })).port, '/state');
    expect(state.bootId).toBe(sourceState.bootId);
    const inB = (await client!.list()).checkpoints;
    expect(inB.map((c) => [c.snapshot, c.source_pod])).toEqual([['snap-signed', 'default/signed-a']]);
    await remove(target);

    // The tag's signature manifest holds one layer: A signed once.
    const rc = new RegistryClient({ registry: registry.host, plainHttp: true });
    try {
      const sig = JSON.parse((await rc.getManifest('team/snapshots', signatureTagFor(digest))).body.toString('utf8')) as { layers: unknown[] };
      expect(sig.layers).toHaveLength(1);
    } finally {
      rc.close();
    }
  }, 600_000);
});
