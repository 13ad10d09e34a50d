/**
 * deploy/kubernetes/ through the real tools (kustomize 5.8.1 and kubectl 1.36, provisioned by scripts/setup.sh):
 * - `kustomize build` renders it, and the rendered objects are the source files' objects with the image set by the
 *   kustomization (so test/unit/deploy-manifests.test.ts's checks of the sources hold for what is applied), and
 *   agree with the code: the host paths the agent mounts, the image, the metrics port and probe;
 * - `kustomize edit set image`, the step the kustomization's comment tells an operator to take, moves every thaw
 *   container to the new image;
 * - kubectl decodes every rendered workload into its typed API object (`kubectl set image --local`, which needs
 *   no cluster; `kubectl apply/create --dry-run=client` both need an API server for discovery here) and keeps
 *   every field: a mistyped value fails the decoding, and a misspelled field, which typed decoding drops, is a
 *   leaf missing from kubectl's output.
 */
import { cp, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseAllDocuments, parse as parseYaml } from 'yaml';
import { resolveAgentConfig } from '../../src/agent/config.js';
import { INSTALL_PATHS } from '../../src/cli/install.js';
import {
  DEFAULT_API_SOCKET,
  DEFAULT_CONTROL_ROOT,
  DEFAULT_NRI_SOCKET_PATH,
  DEFAULT_RESTORE_WORK_ROOT,
  DEFAULT_STORE_ROOT,
  DEFAULT_TOOLKIT_DIR,
} from '../../src/defaults.js';
import { peerToolOk, runPeerTool } from '../helpers/peer-tools.js';

const REPO = path.resolve(import.meta.dirname, '../..');
const K8S = path.join(REPO, 'deploy/kubernetes');
const VERSION = (JSON.parse(await readFile(path.join(REPO, 'package.json'), 'utf8')) as { version: string }).version;
const IMAGE = `registry.example.com/thaw:${VERSION}`;

type Obj = Record<string, unknown>;
const isObj = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v);

interface Mount { name: string; mountPath: string; readOnly?: boolean }
interface Container { name: string; image: string; env?: Array<{ name: string; value?: string }>; ports?: Array<{ name?: string; containerPort: number }>; readinessProbe?: { httpGet?: { path: string; port: string | number } }; volumeMounts?: Mount[] }
interface K8sObject { apiVersion: string; kind: string; metadata: { name: string; namespace?: string }; spec?: Obj; data?: Record<string, string> }
interface PodTemplateSpec { template: { spec: { containers: Container[]; initContainers?: Container[]; volumes?: Array<{ name: string; hostPath?: { path: string } }> } } }

function parseDocs(text: string): K8sObject[] {
  const out: K8sObject[] = [];
  for (const d of parseAllDocuments(text)) {
    expect(d.errors.map((e) => e.message)).toEqual([]);
    const v = d.toJS() as unknown;
    if (v !== null) out.push(v as K8sObject);
  }
  return out;
}

/** Every leaf of `v` as "dotted.path" → value (list items by index; containers and such by their name). */
function leaves(v: unknown, prefix = '', out = new Map<string, unknown>()): Map<string, unknown> {
  if (Array.isArray(v)) {
    v.forEach((item, i) => leaves(item, `${prefix}[${isObj(item) && typeof item['name'] === 'string' ? item['name'] : i}].`, out));
  } else if (isObj(v)) {
    for (const [k, child] of Object.entries(v)) leaves(child, `${prefix}${k}.`, out);
  } else {
    out.set(prefix.slice(0, -1), v);
  }
  return out;
}

const key = (o: K8sObject): string => `${o.kind}/${o.metadata.namespace ?? ''}/${o.metadata.name}`;
const containersOf = (o: K8sObject): Container[] => {
  const t = (o.spec as unknown as PodTemplateSpec).template.spec;
  return [...(t.initContainers ?? []), ...t.containers];
};

describe('deploy/kubernetes with kustomize and kubectl', () => {
  let work: string;
  let home: string;
  let rendered: K8sObject[];

  beforeAll(async () => {
    work = await mkdtemp(path.join(tmpdir(), 'thaw-interop-k8s-'));
    home = path.join(work, 'home');
    rendered = parseDocs((await peerToolOk('kustomize', ['build', K8S], { home })).stdout);
  });
  afterAll(async () => {
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('kustomize renders exactly the resources the kustomization lists, each the source file\'s object with the image set', async () => {
    const kustomization = parseYaml(await readFile(path.join(K8S, 'kustomization.yaml'), 'utf8')) as { resources: string[] };
    const sources = (await Promise.all(kustomization.resources.map(async (f) => parseDocs(await readFile(path.join(K8S, f), 'utf8'))))).flat();
    expect(rendered.map(key).sort()).toEqual(sources.map(key).sort());
    expect(rendered.map(key).sort()).toEqual(['ConfigMap/thaw-system/thaw-agent-config', 'DaemonSet/thaw-system/thaw-agent', 'Namespace//thaw-system', 'NetworkPolicy/thaw-system/thaw-agent-metrics']);
    for (const source of sources) {
      const out = rendered.find((r) => key(r) === key(source))!;
      const withImage = (m: Map<string, unknown>): Map<string, unknown> =>
        new Map([...m].map(([k, v]) => [k, /\.image$/.test(k) ? String(v).replace(/:[^:/]+$/, '') : v]));
      expect(withImage(leaves(out)), key(source)).toEqual(withImage(leaves(source)));
    }
    const images = rendered.filter((o) => o.kind === 'DaemonSet').flatMap(containersOf).map((c) => c.image);
    expect(images).toEqual([IMAGE, IMAGE]);
  });

  it('the rendered agent mounts the paths the code uses at the same path, exposes the metrics port of its config, and probes /metrics', async () => {
    const ds = rendered.find((o) => o.kind === 'DaemonSet')!;
    const spec = (ds.spec as unknown as PodTemplateSpec).template.spec;
    const agent = spec.containers.find((c) => c.name === 'agent')!;
    const hostPathOf = new Map((spec.volumes ?? []).flatMap((v) => (v.hostPath ? [[v.name, v.hostPath.path] as const] : [])));
    const samePath = (p: string): boolean => (agent.volumeMounts ?? []).some((m) => (p === m.mountPath || p.startsWith(`${m.mountPath}/`)) && hostPathOf.get(m.name) === m.mountPath);
    for (const p of [DEFAULT_NRI_SOCKET_PATH, DEFAULT_CONTROL_ROOT, DEFAULT_RESTORE_WORK_ROOT, DEFAULT_STORE_ROOT, DEFAULT_TOOLKIT_DIR, DEFAULT_API_SOCKET, INSTALL_PATHS.node]) {
      expect(samePath(p), `${p} is not mounted at its own path in the rendered agent`).toBe(true);
    }
    const cm = rendered.find((o) => o.kind === 'ConfigMap')!;
    // The container's environment overrides the file (flag > env > file): the DaemonSet sets the metrics listener to
    // the pod's own address through THAW_METRICS_LISTEN="$(POD_IP):9464" (a documentation address stands in here).
    const env = Object.fromEntries((agent.env ?? []).flatMap((e) => (e.value !== undefined ? [[e.name, e.value.replace('$(POD_IP)', '192.0.2.10')]] : [])));
    const config = resolveAgentConfig({ packageRoot: REPO, file: { path: 'rendered:agent.yaml', text: cm.data!['agent.yaml']! }, env });
    for (const p of [config.nri.socket, config.api.socket, config.paths.controlRoot, config.paths.storeRoot, config.paths.workRoot, config.paths.toolkitDir, config.paths.thawPause]) {
      expect(samePath(p), `${p} (rendered ConfigMap) is not mounted at its own path`).toBe(true);
    }
    // The probe reaches the listener from outside the pod: not loopback, and the port the container declares.
    const [host, port] = [config.metrics.listen.replace(/:\d+$/, ''), Number(config.metrics.listen.split(':').at(-1))];
    expect(host).not.toMatch(/^(127\.|localhost$|\[?::1\]?$)/);
    const metricsPort = agent.ports?.find((p) => p.name === 'metrics');
    expect(metricsPort?.containerPort).toBe(port);
    expect(agent.readinessProbe?.httpGet).toEqual({ path: '/metrics', port: 'metrics' });
    // The agent's HTTP server answers that path (src/agent/agent.ts serves GET /metrics only).
    expect(await readFile(path.join(REPO, 'src/agent/agent.ts'), 'utf8')).toContain("!== '/metrics'");
  });

  it('kustomize edit set image (the kustomization\'s documented step) moves every thaw container to the new image', async () => {
    const copy = path.join(work, 'kubernetes');
    await cp(K8S, copy, { recursive: true });
    await peerToolOk('kustomize', ['edit', 'set', 'image', 'registry.example.com/thaw=registry.internal:5000/platform/thaw:9.9.9'], { home, cwd: copy });
    const out = parseDocs((await peerToolOk('kustomize', ['build', copy], { home })).stdout);
    const images = out.filter((o) => o.kind === 'DaemonSet').flatMap(containersOf).map((c) => c.image);
    expect(images).toEqual(['registry.internal:5000/platform/thaw:9.9.9', 'registry.internal:5000/platform/thaw:9.9.9']);
  });

  /** The workload as kubectl's typed decoding gives it back; the leaves kubectl dropped and any decoding error. */
  const typedRoundTrip = async (o: K8sObject, name: string): Promise<{ code: number; stderr: string; dropped: string[] }> => {
    const file = path.join(work, `${name}.yaml`);
    await writeFile(file, JSON.stringify(o));
    const first = containersOf(o)[0]!;
    // kubectl decodes the typed object to set an image (it prints nothing when nothing changes, hence another
    // image, whose leaf is then left out of the comparison).
    const r = await runPeerTool('kubectl', ['set', 'image', '--local', '-f', file, '-o', 'json', `${first.name}=thaw.test/round-trip:1`], { home });
    if (r.code !== 0) return { code: r.code, stderr: r.stderr, dropped: [] };
    const back = leaves(JSON.parse(r.stdout));
    const changed = [...back].filter(([, v]) => v === 'thaw.test/round-trip:1').map(([k]) => k);
    expect(changed).toHaveLength(1);
    // Compared as text: kubectl writes a resource quantity given as a number (nvidia.com/gpu: 1) as a string.
    const kept = (k: string, v: unknown): boolean => changed.includes(k) || (back.has(k) && String(back.get(k)) === String(v));
    return { code: 0, stderr: r.stderr, dropped: [...leaves(o)].filter(([k, v]) => !kept(k, v)).map(([k]) => k) };
  };

  it('kubectl decodes every rendered workload (and the example Deployments) into its typed object, dropping no field', async () => {
    const examples = parseDocs(await readFile(path.join(K8S, 'example-inference.yaml'), 'utf8'));
    const workloads = [...rendered, ...examples].filter((o) => o.kind === 'DaemonSet' || o.kind === 'Deployment');
    expect(workloads.length).toBeGreaterThanOrEqual(2);
    for (const w of workloads) {
      const r = await typedRoundTrip(w, w.metadata.name);
      expect(r.code, `${key(w)}: ${r.stderr}`).toBe(0);
      expect(r.dropped, key(w)).toEqual([]);
    }
  });

  it('the kubectl check is not vacuous: a misspelled field is dropped, a mistyped value refused', async () => {
    const ds = structuredClone(rendered.find((o) => o.kind === 'DaemonSet')!);
    const agent = (ds.spec as unknown as PodTemplateSpec).template.spec.containers.find((c) => c.name === 'agent')! as unknown as Obj;
    agent['volumeMount'] = agent['volumeMounts'];
    expect((await typedRoundTrip(ds, 'misspelled')).dropped.filter((k) => k.includes('volumeMount.')).length).toBeGreaterThan(0);
    const typed = structuredClone(rendered.find((o) => o.kind === 'DaemonSet')!);
    ((typed.spec as unknown as PodTemplateSpec).template.spec.containers[0]!.ports![0]! as unknown as Obj)['containerPort'] = 'nine';
    const r = await typedRoundTrip(typed, 'mistyped');
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/containerPort/);
  });
});
