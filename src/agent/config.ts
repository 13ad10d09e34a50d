/**
 * The agent's configuration (contract: /etc/thaw/agent.yaml, every key optional). Precedence: flag >
 * environment > file > default. The environment variable of a key is THAW_ + the upper snake of its dotted
 * name (metrics.listen → THAW_METRICS_LISTEN), its flag --kebab of the dotted name (--metrics-listen,
 * --paths-store-root).
 *
 * `resolveAgentConfig` is pure (the caller reads the file and passes its text): unit tests cover every message.
 * An unknown key, a wrong type or a bad value is an AGENT_CONFIG_INVALID error whose message names the key,
 * where it came from and the expected form; the CLI turns it into exit code 2.
 */
import { isAbsolute, normalize } from 'node:path';
import { parseDocument } from 'yaml';
import {
  DEFAULT_API_SOCKET,
  DEFAULT_CONTAINERD_ROOT,
  DEFAULT_CONTAINERD_SOCKET,
  DEFAULT_CONTROL_ROOT,
  DEFAULT_CUDA_LOCK_TIMEOUT_MS, DEFAULT_THAW_PAUSE_DEADLINE_MS,
  DEFAULT_METRICS_LISTEN,
  DEFAULT_NRI_SOCKET_PATH,
  DEFAULT_RESTORE_WORK_ROOT,
  DEFAULT_STORE_ROOT,
  DEFAULT_TOOLKIT_DIR,
  DEFAULT_STORE_QUOTA_BYTES,
  DEFAULT_NAMESPACE_QUOTA_BYTES,
  DEFAULT_STORE_MIN_FREE_BYTES,
  DEFAULT_MAX_CONCURRENT_HASHING,
  DEFAULT_MAX_CONCURRENT_CRIU,
  PAGES_COMPRESSION_DEFAULT,
  PAGES_COMPRESSIONS,
  WEIGHTS_ORDER_DEFAULT,
  WEIGHTS_ORDERS,
  WEIGHTS_READERS_DEFAULT,
  type PagesCompression,
  type WeightsOrder,
} from '../defaults.js';
import { ThawError } from '../errors.js';
import type { LogLevel } from '../log.js';
import { DEFAULT_ANNOTATION_PREFIX, validateAnnotationPrefix } from '../nri-plugin/index.js';
import { defaultTenancyPolicy, parseTenancyPolicy, type TenancyPolicy } from './tenancy.js';
import { ConfigErrorCode } from './errors.js';
export { ConfigErrorCode } from './errors.js';

export const DEFAULT_CONFIG_PATH = '/etc/thaw/agent.yaml';
/** sun_path holds 108 bytes with its NUL. */
export const UNIX_SOCKET_PATH_MAX_BYTES = 107;

export interface AgentConfig {
  annotationPrefix: string;
  nri: { socket: string; pluginName: string; pluginIndex: string };
  api: { socket: string };
  /**
   * containerd's gRPC socket and root directory: a checkpoint asks containerd where the container's rootfs
   * snapshot is, and takes its upperdir only from under `<root>/io.containerd.snapshotter.v1.overlayfs`.
   */
  containerd: { socket: string; root: string };
  /** host:port of /metrics; "" disables it. */
  metrics: { listen: string };
  /** sharedStoreRoot: a shared store (RWX volume) looked up after the local one; "" = none. */
  paths: { controlRoot: string; storeRoot: string; workRoot: string; toolkitDir: string; thawPause: string; sharedStoreRoot: string };
  /** config: the registry access file (JSON, src/agent/registry-config.ts); "" = registry references cold-start. */
  registry: { config: string };
  /** "" = the system's library (libcuda.so.1 / libnvidia-ml.so.1, found by the dynamic loader). */
  cuda: { libcuda: string; libnvml: string; lockTimeoutMs: number };
  /**
   * modelDirs: host directories (":"-separated absolute paths; "" = none) a restore may read weights sources
   * from through the target's bind mounts (docs/weights.md). Root reads them for the pod: list only
   * directories every pod allowed to mount them may read. readers: parallel reads of a restore's weights (each
   * one 32 MiB chunk in flight; WEIGHTS_READERS_DEFAULT). order: when they start reading (WeightsOrder:
   * `checkpoint-first` once the checkpoint's own read ended, `together` beside it; WEIGHTS_ORDER_DEFAULT).
   */
  weights: { modelDirs: string; readers: number; order: WeightsOrder };
  /**
   * pauseDeadlineMs: thaw-pause falls back by itself after this long without a word from the agent. hook: which
   * createRuntime hook restores get: `native` (native/build/thaw-hook handing the work to this agent; the Node.js
   * hook when it is not built) or `node` (the Node.js hook, which works without a live agent at hook time).
   * memoryFill: who places a restored process's memory: `thaw-fill` (native/build/thaw-fill through userfaultfd,
   * in parallel while the process runs; CRIU's own fill when it is not built, the kernel or CRIU lacks lazy pages,
   * or the checkpoint has no plan) or `criu` (CRIU's restorer, one thread, before the process runs).
   * fillThreads: thaw-fill's threads (0: one per core up to DEFAULT_MEMORY_FILL_MAX_THREADS).
   */
  restore: { pauseDeadlineMs: number; hook: 'native' | 'node'; memoryFill: 'thaw-fill' | 'criu'; fillThreads: number };
  /**
   * compressPages: `zstd` compresses a checkpoint's lazy pages (native/build/thaw-pack; its restores then need
   * thaw-fill, and cold-start on a node without it), `off` keeps them plain (PAGES_COMPRESSION_DEFAULT).
   */
  checkpoint: { compressPages: PagesCompression };
  /** file "" = stderr. */
  log: { level: LogLevel; file: string };
  /**
   * The local store's bounds (declared bytes; 0: none): all checkpoints, a namespace's when the tenancy policy
   * names no quota for it, the free space kept. Least recently used checkpoints no restore uses are collected
   * to keep them (src/store/gc.ts).
   */
  store: { quotaBytes: number; namespaceQuotaBytes: number; minFreeBytes: number };
  /** Global bounds on concurrent work: files hashed at once, CRIU processes at once. */
  limits: { hashing: number; criuRuns: number };
  /**
   * Who may checkpoint and restore what (src/agent/tenancy.ts): the file's `tenancy` section only (no flag or
   * environment variable: a structured policy, and one place to audit it). Absent: defaultTenancyPolicy().
   */
  tenancy: TenancyPolicy;
}


export class ConfigError extends ThawError {
  declare readonly code: ConfigErrorCode;
  constructor(code: ConfigErrorCode, message: string, options: { step: string; cause?: unknown; evidence?: Record<string, unknown> }) {
    super(code, message, options);
    this.name = 'ConfigError';
  }
}

type Value = string | number;
interface KeySpec {
  /** Dotted key, as in the file. */
  key: string;
  /** The expected form, quoted in errors. */
  expected: string;
  kind: 'string' | 'integer';
  /** A reason when the (typed) value is bad, undefined when good. */
  check: (v: Value) => string | undefined;
}

const nonNegative = (v: Value): string | undefined => (Number.isSafeInteger(v) && (v as number) >= 0 ? undefined : 'not a non-negative integer');
const positive = (v: Value): string | undefined => (Number.isSafeInteger(v) && (v as number) > 0 ? undefined : 'not a positive integer');
const absolutePath = (v: Value): string | undefined => (isAbsolute(String(v)) ? undefined : 'not an absolute path');
const absoluteOrEmpty = (v: Value): string | undefined => (v === '' ? undefined : absolutePath(v));

function checkListen(v: Value): string | undefined {
  const s = String(v);
  if (s === '') return undefined;
  const m = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(s);
  if (!m || Number(m[2]) > 65535) return 'not host:port';
  return undefined;
}

function checkSocketPath(v: Value): string | undefined {
  const s = String(v);
  if (!isAbsolute(s)) return 'not an absolute path';
  if (Buffer.byteLength(s) > UNIX_SOCKET_PATH_MAX_BYTES) return `longer than ${UNIX_SOCKET_PATH_MAX_BYTES} bytes (a unix socket path limit)`;
  return undefined;
}

/** Every key the agent knows, in the file's order. */
export const CONFIG_KEYS: readonly KeySpec[] = [
  { key: 'annotationPrefix', expected: `a DNS subdomain followed by '/', like "${DEFAULT_ANNOTATION_PREFIX}"`, kind: 'string', check: (v) => (validateAnnotationPrefix(String(v)) ? 'not a valid prefix' : undefined) },
  { key: 'nri.socket', expected: 'an absolute path of a unix socket', kind: 'string', check: checkSocketPath },
  { key: 'nri.pluginName', expected: 'a plugin name of letters, digits, "-" and "_"', kind: 'string', check: (v) => (/^[A-Za-z0-9_-]{1,64}$/.test(String(v)) ? undefined : 'not a plugin name') },
  { key: 'nri.pluginIndex', expected: 'two digits, as a string ("00".."99")', kind: 'string', check: (v) => (/^\d\d$/.test(String(v)) ? undefined : 'not two digits') },
  { key: 'containerd.socket', expected: 'an absolute path of a unix socket (containerd\'s gRPC address)', kind: 'string', check: checkSocketPath },
  { key: 'containerd.root', expected: 'an absolute path (containerd\'s root directory, its `root` setting)', kind: 'string', check: absolutePath },
  { key: 'api.socket', expected: 'an absolute path of a unix socket (at most 107 bytes)', kind: 'string', check: checkSocketPath },
  { key: 'metrics.listen', expected: 'host:port (e.g. "127.0.0.1:9464"), or "" to disable', kind: 'string', check: checkListen },
  { key: 'paths.controlRoot', expected: 'an absolute path', kind: 'string', check: absolutePath },
  { key: 'paths.storeRoot', expected: 'an absolute path', kind: 'string', check: absolutePath },
  { key: 'paths.workRoot', expected: 'an absolute path', kind: 'string', check: absolutePath },
  { key: 'paths.toolkitDir', expected: 'an absolute path (the same on the host and in containers)', kind: 'string', check: absolutePath },
  { key: 'paths.thawPause', expected: 'an absolute path', kind: 'string', check: absolutePath },
  { key: 'paths.sharedStoreRoot', expected: 'an absolute path, or "" for none', kind: 'string', check: absoluteOrEmpty },
  { key: 'registry.config', expected: 'an absolute path of the registry access file (JSON), or "" for none', kind: 'string', check: absoluteOrEmpty },
  { key: 'cuda.libcuda', expected: 'an absolute path, or "" for the system library', kind: 'string', check: absoluteOrEmpty },
  { key: 'cuda.libnvml', expected: 'an absolute path, or "" for the system library', kind: 'string', check: absoluteOrEmpty },
  { key: 'cuda.lockTimeoutMs', expected: 'a positive integer (milliseconds)', kind: 'integer', check: (v) => (Number.isSafeInteger(v) && (v as number) > 0 ? undefined : 'not a positive integer') },
  { key: 'weights.modelDirs', expected: '":"-separated absolute paths, or "" for none', kind: 'string', check: (v) => (String(v) === '' || String(v).split(':').every((p) => isAbsolute(p) && normalize(p) === p) ? undefined : 'not absolute, normal paths') },
  { key: 'weights.readers', expected: 'an integer 1..64 (parallel reads of a restore\'s weights)', kind: 'integer', check: (v) => (Number.isSafeInteger(v) && (v as number) >= 1 && (v as number) <= 64 ? undefined : 'not an integer 1..64') },
  { key: 'weights.order', expected: `one of ${WEIGHTS_ORDERS.join(', ')} (when a restore reads its weights: after its checkpoint's read, or beside it)`, kind: 'string', check: (v) => ((WEIGHTS_ORDERS as readonly unknown[]).includes(v) ? undefined : `not ${WEIGHTS_ORDERS.join(' or ')}`) },
  { key: 'restore.pauseDeadlineMs', expected: 'a positive integer (milliseconds, at most a day)', kind: 'integer', check: (v) => (Number.isSafeInteger(v) && (v as number) > 0 && (v as number) <= 86_400_000 ? undefined : 'not a positive integer of at most 86400000') },
  { key: 'restore.hook', expected: 'native or node', kind: 'string', check: (v) => (v === 'native' || v === 'node' ? undefined : 'not native or node') },
  { key: 'restore.memoryFill', expected: 'thaw-fill or criu', kind: 'string', check: (v) => (v === 'thaw-fill' || v === 'criu' ? undefined : 'not thaw-fill or criu') },
  { key: 'restore.fillThreads', expected: 'an integer 0..64 (0: one per core up to 8)', kind: 'integer', check: (v) => (Number.isSafeInteger(v) && (v as number) >= 0 && (v as number) <= 64 ? undefined : 'not an integer 0..64') },
  { key: 'checkpoint.compressPages', expected: `one of ${PAGES_COMPRESSIONS.join(', ')} (the lazy pages of a checkpoint: zstd frames, or as CRIU wrote them)`, kind: 'string', check: (v) => ((PAGES_COMPRESSIONS as readonly unknown[]).includes(v) ? undefined : `not ${PAGES_COMPRESSIONS.join(' or ')}`) },
  { key: 'store.quotaBytes', expected: 'a non-negative integer (bytes; 0: no total quota)', kind: 'integer', check: nonNegative },
  { key: 'store.namespaceQuotaBytes', expected: 'a non-negative integer (bytes; 0: none beyond tenancy.namespaces.<ns>.quotaBytes)', kind: 'integer', check: nonNegative },
  { key: 'store.minFreeBytes', expected: 'a non-negative integer (bytes the store\'s filesystem keeps free)', kind: 'integer', check: nonNegative },
  { key: 'limits.hashing', expected: 'a positive integer (files hashed at once in the agent)', kind: 'integer', check: positive },
  { key: 'limits.criuRuns', expected: 'a positive integer (CRIU processes at once in the agent)', kind: 'integer', check: positive },
  { key: 'log.level', expected: 'one of debug, info, warn, error', kind: 'string', check: (v) => (['debug', 'info', 'warn', 'error'].includes(String(v)) ? undefined : 'not a level') },
  { key: 'log.file', expected: 'an absolute path, or "" for stderr', kind: 'string', check: absoluteOrEmpty },
];

/** `metrics.listen` → `THAW_METRICS_LISTEN`; `cuda.lockTimeoutMs` → `THAW_CUDA_LOCK_TIMEOUT_MS`. */
export function envNameOf(key: string): string {
  return `THAW_${key.replace(/\./g, '_').replace(/([a-z0-9])([A-Z])/g, '$1_$2').toUpperCase()}`;
}

/** `metrics.listen` → `metrics-listen`; `paths.storeRoot` → `paths-store-root` (without the dashes in front). */
export function flagNameOf(key: string): string {
  return key.replace(/\./g, '-').replace(/([a-z0-9])([A-Z])/g, '$1-$2').toLowerCase();
}

/** The defaults of a stock node; `thawPause` is `<package root>/native/build/thaw-pause`. */
export function defaultAgentConfig(packageRoot: string): AgentConfig {
  return {
    annotationPrefix: DEFAULT_ANNOTATION_PREFIX,
    nri: { socket: DEFAULT_NRI_SOCKET_PATH, pluginName: 'thaw', pluginIndex: '50' },
    api: { socket: DEFAULT_API_SOCKET },
    containerd: { socket: DEFAULT_CONTAINERD_SOCKET, root: DEFAULT_CONTAINERD_ROOT },
    metrics: { listen: DEFAULT_METRICS_LISTEN },
    paths: {
      controlRoot: DEFAULT_CONTROL_ROOT,
      storeRoot: DEFAULT_STORE_ROOT,
      workRoot: DEFAULT_RESTORE_WORK_ROOT,
      toolkitDir: DEFAULT_TOOLKIT_DIR,
      thawPause: `${packageRoot.replace(/\/$/, '')}/native/build/thaw-pause`,
      sharedStoreRoot: '',
    },
    registry: { config: '' },
    cuda: { libcuda: '', libnvml: '', lockTimeoutMs: DEFAULT_CUDA_LOCK_TIMEOUT_MS },
    weights: { modelDirs: '', readers: WEIGHTS_READERS_DEFAULT, order: WEIGHTS_ORDER_DEFAULT },
    restore: { pauseDeadlineMs: DEFAULT_THAW_PAUSE_DEADLINE_MS, hook: 'native', memoryFill: 'thaw-fill', fillThreads: 0 },
    checkpoint: { compressPages: PAGES_COMPRESSION_DEFAULT },
    log: { level: 'info', file: '' },
    store: { quotaBytes: DEFAULT_STORE_QUOTA_BYTES, namespaceQuotaBytes: DEFAULT_NAMESPACE_QUOTA_BYTES, minFreeBytes: DEFAULT_STORE_MIN_FREE_BYTES },
    limits: { hashing: DEFAULT_MAX_CONCURRENT_HASHING, criuRuns: DEFAULT_MAX_CONCURRENT_CRIU },
    tenancy: defaultTenancyPolicy(),
  };
}

export interface ConfigSources {
  /** The config file's text and path (absent: no file). */
  file?: { path: string; text: string };
  /** The process environment (only THAW_<KEY> variables of known keys are read). */
  env?: Readonly<Record<string, string | undefined>>;
  /** Flag values by flag name without dashes (`metrics-listen`), as parseArgs returns them. */
  flags?: Readonly<Record<string, string | undefined>>;
  packageRoot: string;
}

const STEP = 'load agent configuration';

function invalid(key: string, source: string, expected: string, got: unknown, reason?: string): ConfigError {
  const shown = JSON.stringify(got) ?? String(got);
  return new ConfigError(ConfigErrorCode.INVALID, `${key} (${source}): expected ${expected}, got ${shown}${reason ? ` (${reason})` : ''}`, {
    step: STEP,
    evidence: { key, source, expected, got },
  });
}

/** A string from the environment or a flag, converted to the key's type. */
function fromText(spec: KeySpec, text: string, source: string): Value {
  if (spec.kind === 'integer') {
    if (!/^\d+$/.test(text.trim())) throw invalid(spec.key, source, spec.expected, text);
    return Number(text.trim());
  }
  return text;
}

function checked(spec: KeySpec, value: Value, source: string): Value {
  const reason = spec.check(value);
  if (reason !== undefined) throw invalid(spec.key, source, spec.expected, value, reason);
  return value;
}

/** Walks the parsed YAML: every leaf must be a known key of the right type. */
/** The section read whole by its own parser (src/agent/tenancy.ts), not key by key. */
const TENANCY_SECTION = 'tenancy';

function readFileValues(path: string, text: string): { values: Map<string, Value>; tenancy?: TenancyPolicy } {
  const source = `file ${path}`;
  const doc = parseDocument(text, { prettyErrors: false, uniqueKeys: true });
  if (doc.errors.length > 0) {
    const e = doc.errors[0]!;
    throw new ConfigError(ConfigErrorCode.INVALID, `${path}: not valid YAML: ${e.message}`, { step: STEP, evidence: { source, yamlError: e.code } });
  }
  const root: unknown = doc.toJS();
  const out = new Map<string, Value>();
  if (root === null || root === undefined) return { values: out }; // an empty (all comments) file
  const specs = new Map(CONFIG_KEYS.map((s) => [s.key, s]));
  const sections = new Set(CONFIG_KEYS.filter((s) => s.key.includes('.')).map((s) => s.key.split('.')[0]!));
  const visit = (node: unknown, prefix: string): void => {
    if (typeof node !== 'object' || node === null || Array.isArray(node)) {
      throw invalid(prefix || '(top level)', source, 'a mapping of keys', node);
    }
    for (const [k, v] of Object.entries(node)) {
      const key = prefix ? `${prefix}.${k}` : k;
      const spec = specs.get(key);
      if (spec === undefined) {
        if (!prefix && sections.has(k)) {
          visit(v, key);
          continue;
        }
        const known = prefix ? CONFIG_KEYS.filter((s) => s.key.startsWith(`${prefix}.`)).map((s) => s.key) : [...new Set([...CONFIG_KEYS.map((s) => s.key.split('.')[0]!), TENANCY_SECTION])];
        throw new ConfigError(ConfigErrorCode.INVALID, `unknown key ${key} (${source}): expected one of ${known.join(', ')}`, {
          step: STEP,
          evidence: { key, source, expected: known },
        });
      }
      if (spec.kind === 'integer' ? typeof v !== 'number' : typeof v !== 'string') {
        throw invalid(key, source, spec.expected, v, `${v === null ? 'null' : Array.isArray(v) ? 'a list' : `a ${typeof v}`}, not ${spec.kind === 'integer' ? 'an integer' : 'a string'}`);
      }
      out.set(key, checked(spec, v as Value, source));
    }
  };
  if (typeof root === 'object' && !Array.isArray(root) && TENANCY_SECTION in root) {
    const { [TENANCY_SECTION]: raw, ...rest } = root as Record<string, unknown>;
    let tenancy: TenancyPolicy;
    try {
      tenancy = parseTenancyPolicy(raw);
    } catch (err) {
      throw new ConfigError(ConfigErrorCode.INVALID, `${(err as Error).message} (${source})`, { step: STEP, evidence: { key: TENANCY_SECTION, source } });
    }
    visit(rest, '');
    return { values: out, tenancy };
  }
  visit(root, '');
  return { values: out };
}

function setKey(config: AgentConfig, key: string, value: Value): void {
  const parts = key.split('.');
  let node = config as unknown as Record<string, unknown>;
  for (const p of parts.slice(0, -1)) node = node[p] as Record<string, unknown>;
  node[parts[parts.length - 1]!] = value;
}

/** The configuration from defaults, file, environment and flags, in that order of increasing precedence. */
export function resolveAgentConfig(sources: ConfigSources): AgentConfig {
  const config = defaultAgentConfig(sources.packageRoot);
  const read = sources.file ? readFileValues(sources.file.path, sources.file.text) : { values: new Map<string, Value>() };
  const fileValues = read.values;
  if (read.tenancy !== undefined) config.tenancy = read.tenancy;
  for (const spec of CONFIG_KEYS) {
    const env = sources.env?.[envNameOf(spec.key)];
    const flag = sources.flags?.[flagNameOf(spec.key)];
    let value: Value | undefined = fileValues.get(spec.key);
    if (env !== undefined) value = checked(spec, fromText(spec, env, `environment ${envNameOf(spec.key)}`), `environment ${envNameOf(spec.key)}`);
    if (flag !== undefined) value = checked(spec, fromText(spec, flag, `flag --${flagNameOf(spec.key)}`), `flag --${flagNameOf(spec.key)}`);
    if (value !== undefined) setKey(config, spec.key, value);
  }
  return config;
}

/** parseArgs options for every config key (all strings) — the CLI adds its own (--config, --json, ...). */
export function configFlagOptions(): Record<string, { type: 'string' }> {
  return Object.fromEntries(CONFIG_KEYS.map((s) => [flagNameOf(s.key), { type: 'string' as const }]));
}
