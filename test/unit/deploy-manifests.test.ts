/**
 * deploy/kubernetes/, deploy/image/Containerfile and config/: parsed, required fields present, and consistent
 * with the code: every host path the DaemonSet mounts is one the code uses (constants imported from src/),
 * mounted at the same path in the agent; the ConfigMap holds only the contract's keys; images carry
 * package.json's version; the example Deployment's annotations are accepted by the NRI policy's parser.
 */
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { parseAllDocuments, parse as parseYaml, stringify as stringifyYaml } from 'yaml';
import { resolveAgentConfig } from '../../src/agent/config.js';
import { INSTALL_PATHS, renderWrapper } from '../../src/cli/install.js';
import { DEFAULT_CONTAINERD_ROOT, DEFAULT_CONTAINERD_SOCKET, DEFAULT_CONTROL_ROOT, DEFAULT_NRI_SOCKET_PATH, DEFAULT_RESTORE_WORK_ROOT, DEFAULT_STORE_ROOT, DEFAULT_TOOLKIT_DIR, DEFAULT_STORE_QUOTA_BYTES, DEFAULT_NAMESPACE_QUOTA_BYTES, DEFAULT_STORE_MIN_FREE_BYTES, DEFAULT_MAX_CONCURRENT_HASHING, DEFAULT_MAX_CONCURRENT_CRIU } from '../../src/defaults.js';
import { checkCheckpointName, decide, DEFAULT_ANNOTATION_PREFIX } from '../../src/nri-plugin/policy.js';
import { stackPaths } from '../../src/node-stack/paths.js';

const REPO = path.resolve(import.meta.dirname, '../..');
const K8S = path.join(REPO, 'deploy/kubernetes');
const VERSION = (JSON.parse(readFileSync(path.join(REPO, 'package.json'), 'utf8')) as { version: string }).version;
const IMAGE = `registry.example.com/thaw:${VERSION}`;

/**
 * The agent configuration of config-contract.md, every key at its default. The lead swaps this for the
 * agent's own validator (src/agent/config.ts) at merge.
 */
const CONTRACT_DEFAULTS = {
  annotationPrefix: 'thaw.dev/',
  nri: { socket: '/var/run/nri/nri.sock', pluginName: 'thaw', pluginIndex: '50' },
  api: { socket: '/run/thaw/agent.sock' },
  metrics: { listen: '127.0.0.1:9464' },
  paths: {
    controlRoot: '/run/thaw/control',
    storeRoot: '/var/lib/thaw/checkpoints',
    workRoot: '/run/thaw/restore',
    toolkitDir: '/opt/thaw/stack/1.7',
    thawPause: '/opt/thaw/lib/native/build/thaw-pause',
  },
  cuda: { libcuda: '', libnvml: '', lockTimeoutMs: 10000 },
  weights: { modelDirs: '', readers: 8, order: 'checkpoint-first' },
  containerd: { socket: '/run/containerd/containerd.sock', root: '/var/lib/containerd' },
  store: { quotaBytes: 0, namespaceQuotaBytes: 0, minFreeBytes: 1073741824 },
  limits: { hashing: 4, criuRuns: 2 },
  log: { level: 'info', file: '' },
};

type Obj = Record<string, unknown>;
const isObj = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v);

/** Dotted key → value of every leaf. */
function leaves(o: Obj, prefix = ''): Map<string, unknown> {
  const out = new Map<string, unknown>();
  for (const [k, v] of Object.entries(o)) {
    if (isObj(v)) for (const [kk, vv] of leaves(v, `${prefix}${k}.`)) out.set(kk, vv);
    else out.set(`${prefix}${k}`, v);
  }
  return out;
}

/** Contract check of an agent.yaml object: unknown keys and wrong types, as messages. */
function contractProblems(config: unknown): string[] {
  if (!isObj(config)) return ['not a mapping'];
  const known = leaves(CONTRACT_DEFAULTS);
  const problems: string[] = [];
  for (const [key, value] of leaves(config)) {
    if (!known.has(key)) problems.push(`unknown key ${key}`);
    else if (typeof value !== typeof known.get(key)) problems.push(`${key} must be a ${typeof known.get(key)}`);
  }
  return problems;
}

interface Doc { file: string; apiVersion: string; kind: string; metadata: { name: string; namespace?: string; labels?: Record<string, string> }; spec?: Obj; data?: Record<string, string> }

function loadManifests(): Doc[] {
  const docs: Doc[] = [];
  // kustomization.yaml is kustomize's, not an API object: read on its own below.
  for (const file of readdirSync(K8S).filter((f) => f.endsWith('.yaml') && f !== 'kustomization.yaml').sort()) {
    for (const d of parseAllDocuments(readFileSync(path.join(K8S, file), 'utf8'))) {
      expect(d.errors.map((e) => `${file}: ${e.message}`)).toEqual([]);
      expect(d.warnings.map((e) => `${file}: ${e.message}`)).toEqual([]);
      const value = d.toJS() as unknown;
      if (value === null) continue;
      expect(isObj(value), `${file}: a document is not a mapping`).toBe(true);
      docs.push({ file, ...(value as Omit<Doc, 'file'>) });
    }
  }
  return docs;
}

interface Volume { name: string; hostPath?: { path: string; type?: string }; configMap?: { name: string }; emptyDir?: Obj }
interface Mount { name: string; mountPath: string; readOnly?: boolean }
interface Container { name: string; image: string; command?: string[]; args?: string[]; securityContext?: { privileged?: boolean }; volumeMounts?: Mount[]; ports?: Array<{ name?: string; containerPort: number }> }
interface PodSpec { hostPID?: boolean; hostNetwork?: boolean; automountServiceAccountToken?: boolean; serviceAccountName?: string; containers: Container[]; initContainers?: Container[]; volumes?: Volume[] }
interface Workload { selector: { matchLabels: Record<string, string> }; template: { metadata: { labels: Record<string, string>; annotations?: Record<string, string> }; spec: PodSpec } }

const docs = loadManifests();
const byKind = (kind: string): Doc[] => docs.filter((d) => d.kind === kind);
const daemonSet = byKind('DaemonSet')[0] as Doc;
const ds = daemonSet.spec as unknown as Workload;
const pod = ds.template.spec;
const agent = pod.containers.find((c) => c.name === 'agent') as Container;
const install = pod.initContainers?.find((c) => c.name === 'install') as Container;
const volumes = new Map((pod.volumes ?? []).map((v) => [v.name, v]));
const configMap = byKind('ConfigMap').find((d) => d.metadata.name === 'thaw-agent-config') as Doc;
const agentYaml = parseYaml(configMap.data?.['agent.yaml'] ?? '') as Obj;
const agentConfig = leaves(agentYaml);

/** The host path behind a mount of `c` (undefined for non-hostPath volumes). */
const hostPathOf = (m: Mount): string | undefined => volumes.get(m.name)?.hostPath?.path;
/** The agent's mount holding `p`, when it is a hostPath mounted at its own path (the same-path rule). */
function samePathMountOf(p: string): Mount | undefined {
  return (agent.volumeMounts ?? []).find((m) => (p === m.mountPath || p.startsWith(`${m.mountPath}/`)) && hostPathOf(m) === m.mountPath);
}

/**
 * Host paths the code uses, from its constants, and why the DaemonSet mounts each. Paths the code finds at
 * run time (no constant) name the source file and a string in it that shows the use, so that this list goes
 * stale loudly if the code changes.
 */
const parentOf = (p: string): string => path.dirname(p);
const CODE_HOST_PATHS: Array<{ path: string; why: string; source?: { file: string; contains: string } }> = [
  { path: parentOf(DEFAULT_NRI_SOCKET_PATH), why: 'containerd NRI socket (src/nri-plugin/plugin.ts)' },
  { path: parentOf(DEFAULT_CONTROL_ROOT), why: 'control dirs, work root, API socket (src/defaults.ts)' },
  { path: parentOf(DEFAULT_STORE_ROOT), why: 'checkpoint store (src/defaults.ts)' },
  { path: parentOf(INSTALL_PATHS.lib), why: 'installed package, node, toolkit (src/cli/install.ts)' },
  { path: parentOf(INSTALL_PATHS.wrapper), why: 'the CLI wrapper on the host PATH' },
  { path: parentOf(INSTALL_PATHS.agentConfig), why: 'the host CLI\'s agent.yaml' },
  { path: parentOf(INSTALL_PATHS.containerdDropIn), why: 'the NRI drop-in' },
  { path: '/sys/fs/cgroup', why: 'restore joins the target\'s cgroups', source: { file: 'src/restore-engine/restore-cgroups.ts', contains: "'cgroup.procs'" } },
  { path: parentOf(DEFAULT_CONTAINERD_SOCKET), why: 'containerd\'s API: the container\'s snapshot and its upperdir (src/restore-engine/rootfs-diff/containerd-upperdir.ts)' },
  { path: '/var/lib/containerd', why: 'checkpoint captures the overlay upperdir', source: { file: 'src/restore-engine/rootfs-diff/capture.ts', contains: 'upperdir' } },
  { path: '/dev', why: 'GPU device nodes for the driver', source: { file: 'src/cuda/libcuda.ts', contains: 'libcuda.so.1' } },
  { path: '/usr/lib/x86_64-linux-gnu', why: 'host driver libraries (cuda.libcuda)', source: { file: 'src/cuda/libcuda.ts', contains: 'libcuda.so.1' } },
];

describe('deploy/kubernetes manifests', () => {
  it('parse, and every object has apiVersion, kind, metadata.name and a namespace where it needs one', () => {
    expect(docs.map((d) => `${d.file}:${d.kind}/${d.metadata.name}`).sort()).toEqual([
      'configmap.yaml:ConfigMap/thaw-agent-config',
      'daemonset.yaml:DaemonSet/thaw-agent',
      'example-inference.yaml:Deployment/llm',
      'namespace.yaml:Namespace/thaw-system',
      'networkpolicy.yaml:NetworkPolicy/thaw-agent-metrics',
    ]);
    for (const d of docs) {
      expect(d.apiVersion, `${d.file} ${d.kind}`).toMatch(/^(v1|apps\/v1|networking\.k8s\.io\/v1)$/);
      expect(d.metadata.name).toMatch(/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/);
      if (d.kind !== 'Namespace') expect(d.metadata.namespace, `${d.kind}/${d.metadata.name}`).toBe(d.file === 'example-inference.yaml' ? 'default' : 'thaw-system');
    }
  });

  it('workloads: the selector matches the template labels, and every container has a name and an image', () => {
    for (const d of docs.filter((x) => x.kind === 'DaemonSet' || x.kind === 'Deployment')) {
      const w = d.spec as unknown as Workload;
      expect(Object.keys(w.selector.matchLabels).length).toBeGreaterThan(0);
      for (const [k, v] of Object.entries(w.selector.matchLabels)) expect(w.template.metadata.labels[k], `${d.metadata.name} ${k}`).toBe(v);
      expect(w.template.spec.containers.length).toBeGreaterThan(0);
      for (const c of [...w.template.spec.containers, ...(w.template.spec.initContainers ?? [])]) {
        expect(c.name).toMatch(/^[a-z0-9-]+$/);
        expect(c.image).toMatch(/^[\w.-]+(:\d+)?\/[\w./-]+:[\w.-]+$/);
      }
    }
  });

  it('the DaemonSet is privileged with hostPID, without hostNetwork, and without any API-server credentials', () => {
    expect(pod.hostPID).toBe(true);
    expect(pod.hostNetwork ?? false).toBe(false);
    expect(pod.automountServiceAccountToken).toBe(false);
    expect(pod.serviceAccountName).toBeUndefined();
    for (const c of [...pod.containers, ...(pod.initContainers ?? [])]) expect(c.securityContext?.privileged, c.name).toBe(true);
    // No RBAC, because the agent does not talk to the API server: nothing in src/ reaches for it.
    expect(docs.filter((d) => /Role|ServiceAccount/.test(d.kind))).toEqual([]);
    const src = (dir: string): string[] => readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? src(path.join(dir, e.name)) : [path.join(dir, e.name)]));
    for (const f of src(path.join(REPO, 'src'))) {
      expect(readFileSync(f, 'utf8'), f).not.toMatch(/KUBERNETES_SERVICE_HOST|serviceaccount\/token|kubeconfig/i);
    }
  });

  it('every hostPath is one the code uses, and every mount names a defined volume (all volumes used)', () => {
    const allowed = new Set(CODE_HOST_PATHS.map((p) => p.path));
    const hostPaths = [...volumes.values()].flatMap((v) => (v.hostPath ? [v.hostPath.path] : []));
    expect(hostPaths.length).toBeGreaterThan(5);
    for (const p of hostPaths) expect(allowed.has(p), `hostPath ${p} is not a path the code uses`).toBe(true);
    for (const entry of CODE_HOST_PATHS.filter((e) => e.source)) {
      expect(readFileSync(path.join(REPO, entry.source!.file), 'utf8'), `${entry.path}: ${entry.why}`).toContain(entry.source!.contains);
    }
    const used = new Set<string>();
    for (const c of [...pod.containers, ...(pod.initContainers ?? [])]) {
      for (const m of c.volumeMounts ?? []) {
        expect(volumes.has(m.name), `${c.name} mounts undefined volume ${m.name}`).toBe(true);
        used.add(m.name);
      }
    }
    expect([...volumes.keys()].filter((n) => !used.has(n))).toEqual([]);
  });

  it('the agent sees each host path the code hands to containerd, runc and CRIU at the same path', () => {
    for (const p of [DEFAULT_NRI_SOCKET_PATH, DEFAULT_CONTROL_ROOT, DEFAULT_RESTORE_WORK_ROOT, DEFAULT_STORE_ROOT, DEFAULT_TOOLKIT_DIR,
      INSTALL_PATHS.node, `${INSTALL_PATHS.lib}/dist/src/oci-hooks/main.js`, '/sys/fs/cgroup', '/dev']) {
      expect(samePathMountOf(p), `${p} is not mounted at its own path in the agent`).toBeDefined();
    }
    expect(stackPaths('1.7').prefix).toBe(DEFAULT_TOOLKIT_DIR);
    // The package and toolkit come from the host (the init container put them there), read-only.
    expect(samePathMountOf(INSTALL_PATHS.lib)?.readOnly).toBe(true);
  });

  it('every path in the ConfigMap is inside a same-path host mount of the agent (cuda libraries inside the driver mount)', () => {
    for (const key of ['nri.socket', 'api.socket', 'paths.controlRoot', 'paths.storeRoot', 'paths.workRoot', 'paths.toolkitDir', 'paths.thawPause']) {
      const value = agentConfig.get(key);
      expect(typeof value, key).toBe('string');
      expect(samePathMountOf(value as string), `${key} = ${String(value)}`).toBeDefined();
    }
    for (const key of ['cuda.libcuda', 'cuda.libnvml']) {
      const value = agentConfig.get(key) as string;
      const mount = (agent.volumeMounts ?? []).find((m) => value.startsWith(`${m.mountPath}/`));
      expect(mount, key).toBeDefined();
      expect(hostPathOf(mount!), key).toBe(mount!.mountPath.replace(/^\/host/, ''));
    }
    const port = Number((agentConfig.get('metrics.listen') as string).split(':').at(-1));
    expect(agent.ports?.find((p) => p.name === 'metrics')?.containerPort).toBe(port);
  });

  it('/metrics listens on the pod IP (never 0.0.0.0), and only the monitoring namespace may reach it', () => {
    expect(agentConfig.get('metrics.listen')).toBe('127.0.0.1:9464');
    const env = (agent as { env?: Array<{ name: string; value?: string; valueFrom?: { fieldRef?: { fieldPath: string } } }> }).env ?? [];
    expect(env.find((e) => e.name === 'POD_IP')?.valueFrom?.fieldRef?.fieldPath).toBe('status.podIP');
    expect(env.find((e) => e.name === 'THAW_METRICS_LISTEN')?.value).toBe('$(POD_IP):9464');
    const np = docs.find((d) => d.kind === 'NetworkPolicy') as unknown as {
      spec: { podSelector: { matchLabels: Record<string, string> }; policyTypes: string[]; ingress: Array<{ from: unknown[]; ports: Array<{ port: number }> }> };
    };
    expect(np.spec.podSelector.matchLabels).toEqual({ 'app.kubernetes.io/name': 'thaw-agent' });
    expect(np.spec.policyTypes).toEqual(['Ingress']);
    expect(np.spec.ingress.flatMap((r) => r.ports.map((p) => p.port))).toEqual([9464]);
    expect(np.spec.ingress.every((r) => r.from.length > 0)).toBe(true);
  });

  it('the agent runs the installed wrapper with the ConfigMap as /etc/thaw/agent.yaml, in the host cgroup namespace', () => {
    const argv = [...(agent.command ?? []), ...(agent.args ?? [])];
    const wrapperAt = argv.indexOf(INSTALL_PATHS.wrapper);
    expect(argv.slice(0, wrapperAt)).toEqual(['/usr/bin/nsenter', '--target', '1', '--cgroup', '--']);
    expect(argv.slice(wrapperAt)).toEqual([INSTALL_PATHS.wrapper, 'agent', '--config', INSTALL_PATHS.agentConfig]);
    const configMount = agent.volumeMounts?.find((m) => m.mountPath === path.dirname(INSTALL_PATHS.agentConfig));
    expect(volumes.get(configMount!.name)?.configMap?.name).toBe(configMap.metadata.name);
    expect(Object.keys(configMap.data ?? {})).toEqual([path.basename(INSTALL_PATHS.agentConfig)]);
  });

  it('the init container installs onto the host: each installed directory is a host mount under /host at its own path', () => {
    const argv = [...(install.command ?? []), ...(install.args ?? [])];
    expect(argv).toEqual([INSTALL_PATHS.wrapper, 'install', '--root', '/host', '--force']);
    const mountFor = (hostDir: string): Mount | undefined => install.volumeMounts?.find((m) => m.mountPath === `/host${hostDir}`);
    for (const dir of [parentOf(INSTALL_PATHS.lib), parentOf(INSTALL_PATHS.wrapper), parentOf(INSTALL_PATHS.agentConfig), parentOf(INSTALL_PATHS.containerdDropIn), INSTALL_PATHS.stateDir]) {
      expect(hostPathOf(mountFor(dir)!), dir).toBe(dir);
    }
    // The systemd unit is not for DaemonSet nodes: it lands in a throwaway dir.
    expect(volumes.get(mountFor(parentOf(INSTALL_PATHS.systemdUnit))!.name)?.emptyDir).toBeDefined();
    // The toolkit goes inside the /opt/thaw mount.
    expect(DEFAULT_TOOLKIT_DIR.startsWith(`${parentOf(INSTALL_PATHS.lib)}/`)).toBe(true);
  });

  it('uses the thaw image of package.json\'s version everywhere (DaemonSet, kustomization, Containerfile)', () => {
    expect(install.image).toBe(IMAGE);
    expect(agent.image).toBe(IMAGE);
    const kustomization = parseYaml(readFileSync(path.join(K8S, 'kustomization.yaml'), 'utf8')) as { kind: string; resources: string[]; images: Array<{ name: string; newTag: string }> };
    expect(kustomization.kind).toBe('Kustomization');
    expect(kustomization.images).toEqual([{ name: IMAGE.split(':')[0], newTag: VERSION }]);
    expect(kustomization.resources.sort()).toEqual(['configmap.yaml', 'daemonset.yaml', 'namespace.yaml', 'networkpolicy.yaml']);
    const containerfile = readFileSync(path.join(REPO, 'deploy/image/Containerfile'), 'utf8');
    expect(containerfile).toContain(`-t ${IMAGE} .`);
    expect(containerfile).toMatch(/installThaw\(\{ root: '\/out', \.\.\.defaultInstallSources\(\)/);
    expect(containerfile).toContain('COPY --from=build /out/ /');
    expect(containerfile).toContain(`ENTRYPOINT ["${INSTALL_PATHS.wrapper}"]`);
    expect(containerfile).toContain(`CMD ["agent", "--config", "${INSTALL_PATHS.agentConfig}"]`);
    // The image copies what stagePackage needs from the checkout.
    for (const dir of ['proto', 'src', 'native', 'config']) expect(containerfile).toContain(`COPY ${dir} ${dir}`);
    expect(renderWrapper()).toContain(`exec ${INSTALL_PATHS.node} `);
  });

  it('the ConfigMap\'s agent.yaml and config/agent.yaml pass the agent\'s own validator', () => {
    const configMapText = stringifyYaml(agentYaml);
    const fromConfigMap = resolveAgentConfig({ packageRoot: REPO, file: { path: 'configmap:agent.yaml', text: configMapText } });
    expect(fromConfigMap.metrics.listen).toBe((agentYaml as { metrics: { listen: string } }).metrics.listen);
    const fromDefaultFile = resolveAgentConfig({ packageRoot: REPO, file: { path: 'config/agent.yaml', text: readFileSync(path.join(REPO, 'config/agent.yaml'), 'utf8') } });
    expect(fromDefaultFile.paths.storeRoot).toBe(DEFAULT_STORE_ROOT);
    // The validator is not lenient: a key the agent does not know is refused, naming it.
    expect(() => resolveAgentConfig({ packageRoot: REPO, file: { path: 'x.yaml', text: 'metrics:\n  port: 9464\n' } })).toThrow(/metrics\.port/);
  });

  it('the ConfigMap\'s agent.yaml holds only contract keys with the contract\'s types', () => {
    expect(contractProblems(agentYaml)).toEqual([]);
    // The check is not vacuous.
    expect(contractProblems({ metrics: { port: 9464 }, cuda: { lockTimeoutMs: '10s' } })).toEqual(['unknown key metrics.port', 'cuda.lockTimeoutMs must be a number']);
    expect(agentConfig.get('annotationPrefix')).toBe(DEFAULT_ANNOTATION_PREFIX);
  });

  it('the example Deployment is one annotation: thaw.dev/snapshot, accepted by the NRI policy', () => {
    const deployments = byKind('Deployment');
    expect(deployments.map((d) => d.metadata.name)).toEqual(['llm']);
    const w = deployments[0]!.spec as unknown as Workload;
    const annotations = w.template.metadata.annotations ?? {};
    const container = w.template.spec.containers[0]!;
    expect(decide({ podAnnotations: annotations, containerName: container.name }, { annotationPrefix: DEFAULT_ANNOTATION_PREFIX })).toEqual({ kind: 'snapshot', snapshotName: 'qwen3-8b', onCheckpoint: 'continue' });
    // Its other containers (none today) are left alone: the annotation names the worker.
    expect(decide({ podAnnotations: annotations, containerName: 'sidecar' }, { annotationPrefix: DEFAULT_ANNOTATION_PREFIX }).kind).toBe('other-container');
    expect(checkCheckpointName('qwen3-8b')).toBeUndefined();
    // One pod per node checkpoints while the others serve: more than one replica is the point.
    expect((deployments[0]!.spec as { replicas?: number }).replicas).toBeGreaterThan(1);
  });
});

describe('config/', () => {
  it('agent.yaml is the contract\'s defaults, every key present', () => {
    expect(parseYaml(readFileSync(path.join(REPO, 'config/agent.yaml'), 'utf8'))).toEqual(CONTRACT_DEFAULTS);
    // And the code's own defaults agree with it.
    expect(CONTRACT_DEFAULTS.paths.storeRoot).toBe(DEFAULT_STORE_ROOT);
    expect(CONTRACT_DEFAULTS.paths.controlRoot).toBe(DEFAULT_CONTROL_ROOT);
    expect(CONTRACT_DEFAULTS.paths.workRoot).toBe(DEFAULT_RESTORE_WORK_ROOT);
    expect(CONTRACT_DEFAULTS.paths.toolkitDir).toBe(DEFAULT_TOOLKIT_DIR);
    expect(CONTRACT_DEFAULTS.nri.socket).toBe(DEFAULT_NRI_SOCKET_PATH);
    expect(CONTRACT_DEFAULTS.containerd).toEqual({ socket: DEFAULT_CONTAINERD_SOCKET, root: DEFAULT_CONTAINERD_ROOT });
    expect(CONTRACT_DEFAULTS.paths.thawPause).toBe(`${INSTALL_PATHS.lib}/native/build/thaw-pause`);
    expect(CONTRACT_DEFAULTS.store).toEqual({ quotaBytes: DEFAULT_STORE_QUOTA_BYTES, namespaceQuotaBytes: DEFAULT_NAMESPACE_QUOTA_BYTES, minFreeBytes: DEFAULT_STORE_MIN_FREE_BYTES });
    expect(CONTRACT_DEFAULTS.limits).toEqual({ hashing: DEFAULT_MAX_CONCURRENT_HASHING, criuRuns: DEFAULT_MAX_CONCURRENT_CRIU });
  });

  it('the containerd configs name the NRI socket the agent connects to, with NRI enabled and connections allowed', () => {
    for (const file of ['config/containerd.toml.example', 'config/containerd-1.7.toml.example', 'config/containerd-2.x.toml.example', 'config/conf.d/thaw-nri.toml']) {
      const text = readFileSync(path.join(REPO, file), 'utf8');
      const setting = (key: string): string | undefined => new RegExp(`^\\s*${key} = ["']?([^"'\\n]*)["']?$`, 'm').exec(text)?.[1];
      expect(setting('socket_path'), file).toBe(CONTRACT_DEFAULTS.nri.socket);
      expect(setting('socket_path'), file).toBe(agentConfig.get('nri.socket'));
      expect(setting('disable'), file).toBe('false');
      expect(setting('disable_connections'), file).toBe('false');
      expect(setting('plugin_request_timeout'), file).toBe('2s');
      expect(setting('plugin_registration_timeout'), file).toBe('5s');
    }
  });
});
