/**
 * manifest.json: what a checkpoint holds and what a node must match to restore it.
 *
 * Schema version 1 (`schemaVersion: 1`, `kind: "thaw.checkpoint"`):
 *
 *   name, id (random uuid, new for every publish), createdAt (ISO 8601, UTC)
 *   source       where it was taken: node hostname, pod {name, namespace, uid} (the namespace owns the
 *                checkpoint: src/agent/tenancy.ts), container {name, id}, command (the process's argv as
 *                CRIU found it), args (the container spec's process args as the runtime gave them at
 *                CreateContainer: the Kubernetes command and args over the image's entrypoint; a restore
 *                target's must be the same), cwd? and user? {uid, gid} (the process's working directory and
 *                real ids at the dump, which a restore target's spec must give it too), and envKeys: the NAMES
 *                of the container's environment variables only.
 *                Values are left out on purpose: they are often secrets (tokens, keys), and the manifest is
 *                the one file of a checkpoint that tools print and registries index. (The values are still in
 *                the process memory CRIU saved, which is why the whole directory is 0700/0600.)
 *   constraints  what a restore must match: arch {node: process.arch, machine: `uname -m`}, kernelRelease,
 *                criuVersion, containerdVersion, image {ref, digest?}, and gpu? {model?, uuids?,
 *                driverVersion?, cudaApiVersion?, memoryBytes?} (reserved for the CUDA work; all optional).
 *                The image lives here, not under source, because it is the main thing a restore must match.
 *   criu         how the dump was taken, as the restore needs it: pid (in the container's pid namespace as
 *                CRIU saw it), externalMounts [{key, path}], netnsKey (the `External` key of the network
 *                namespace, e.g. "extNetNs"), stdioFds (targets of fds 0..2 like runc's descriptors.json:
 *                "pipe:[123]", "/dev/null"), and options: the scalar dump options used (tcpEstablished, ...).
 *   files        every file of the checkpoint but manifest.json: {path (relative, posix), size, sha256, mode}
 *   totals       {bytes (sum of files[].size), fileCount, liveBytes? (the tree's RSS at dump time)}
 *   timings      {phaseMs: {"cuda-checkpoint": 1234, "criu-dump": 5678, ...}}
 *   snapshot?    {name, key}: a checkpoint a `thaw.dev/snapshot: <name>` pod had taken; key is the 64-hex
 *                snapshot key (src/agent/snapshot.ts: image digest, args, container, GPU) it is valid for. A
 *                snapshot pod restores only a checkpoint whose snapshot record names its own name and key (and
 *                whose source.pod.namespace is its own). Optional: readers that predate it ignore it.
 *
 * Schema version 2 is version 1 whose files include `criu/thaw-pages.zst`: the checkpoint's lazy pages are
 * compressed (src/restore-engine/compressed-pages.ts) and are in no image CRIU reads, so only a thaw that knows to
 * restore it through thaw-fill may take it; a thaw that reads schema 1 only refuses it (its pods cold-start) instead
 * of letting CRIU restore those pages as zeros. A manifest is version 2 exactly when it lists that file.
 *
 * A reader refuses any other schemaVersion (a newer agent may write fields an older one would silently drop
 * on replace), and any JSON without `kind: "thaw.checkpoint"` (a foreign file in the store).
 */
import { StoreError, StoreErrorCode } from './errors.js';

export const MANIFEST_SCHEMA_VERSION = 1;
/** The schema of a checkpoint with compressed pages (see the top). */
export const MANIFEST_SCHEMA_VERSION_COMPRESSED_PAGES = 2;
export type ManifestSchemaVersion = typeof MANIFEST_SCHEMA_VERSION | typeof MANIFEST_SCHEMA_VERSION_COMPRESSED_PAGES;
export const MANIFEST_KIND = 'thaw.checkpoint';
export const MANIFEST_FILE_NAME = 'manifest.json';
/** Files of a checkpoint (design.md, Store), relative to its directory. */
export const CRIU_DIR_NAME = 'criu';
export const ROOTFS_DIFF_FILE_NAME = 'rootfs-diff.tar';
export const DELETED_FILES_FILE_NAME = 'deleted-files.json';
/** The compressed lazy pages beside CRIU's images (written by the checkpoint flow; schema 2). */
export const COMPRESSED_PAGES_FILE_NAME = 'thaw-pages.zst';
const COMPRESSED_PAGES_PATH = `${CRIU_DIR_NAME}/${COMPRESSED_PAGES_FILE_NAME}`;

/** The schema a manifest listing `files` has (see the top). Pure. */
export function schemaVersionOf(files: ReadonlyArray<{ path: string }>): ManifestSchemaVersion {
  return files.some((f) => f.path === COMPRESSED_PAGES_PATH) ? MANIFEST_SCHEMA_VERSION_COMPRESSED_PAGES : MANIFEST_SCHEMA_VERSION;
}

export interface GpuConstraints {
  model?: string;
  uuids?: string[];
  driverVersion?: string;
  cudaApiVersion?: number;
  memoryBytes?: number;
  /**
   * How many GPUs the checkpoint's processes may hold state on (every GPU they saw, `uuids.length`): a
   * restore needs at least as many GPUs of the model, each checkpointed GPU mapped onto one of them.
   * Absent in manifests written before tensor-parallel workers: then `uuids.length` stands for it.
   */
  count?: number;
  /**
   * The container's CUDA processes at checkpoint time (a tensor-parallel worker: one per rank). A restore
   * must bring back exactly as many, all restored and unlocked, or it falls back to a cold start.
   */
  cudaProcesses?: number;
}

export interface ImageIdentity {
  ref: string;
  /** `sha256:<64 hex>`; known when the runtime told us (CRI image status), else absent. */
  digest?: string;
}

export interface ManifestSource {
  nodeHostname: string;
  pod?: { name: string; namespace: string; uid: string };
  container: { name: string; id: string };
  command: string[];
  args: string[];
  /** Environment variable names only; see the file comment. */
  envKeys: string[];
  /**
   * The checkpointed process's working directory (inside its container) and user (real uid and gid), which
   * CRIU gives it back: a target whose spec's process.cwd or process.user differs is another workload
   * (RESTORE_INCOMPATIBLE). Absent in manifests written before they were recorded.
   */
  cwd?: string;
  user?: { uid: number; gid: number };
}

export interface RestoreConstraints {
  arch: { node: string; machine: string };
  kernelRelease: string;
  criuVersion: string;
  containerdVersion: string;
  image: ImageIdentity;
  gpu?: GpuConstraints;
}

export interface CriuDumpInfo {
  pid: number;
  externalMounts: Array<{ key: string; path: string }>;
  netnsKey?: string;
  stdioFds: string[];
  options: Record<string, string | number | boolean>;
}

export interface ManifestFile {
  /** Relative to the checkpoint directory, '/'-separated, never `..`, never absolute. */
  path: string;
  size: number;
  sha256: string;
  /** Permission bits (0o600 in a published checkpoint). */
  mode: number;
}

/** What a `thaw.dev/snapshot` checkpoint is for (see the file comment). */
export interface SnapshotRecord {
  name: string;
  /** 64 lower-case hex digits. */
  key: string;
}

export interface Manifest {
  schemaVersion: ManifestSchemaVersion;
  kind: typeof MANIFEST_KIND;
  name: string;
  id: string;
  createdAt: string;
  source: ManifestSource;
  constraints: RestoreConstraints;
  criu: CriuDumpInfo;
  files: ManifestFile[];
  totals: { bytes: number; fileCount: number; liveBytes?: number };
  timings: { phaseMs: Record<string, number> };
  snapshot?: SnapshotRecord;
  /**
   * The worker's weights regions whose bytes are not in the checkpoint (docs/weights.md): their VAs and
   * sources (path, range, size, sha256). Opaque here; the restore engine validates every field
   * (restore-engine/weights/regions-file.ts) before it reads a byte.
   */
  weights?: ManifestWeights;
}

/** The manifest's weights section, as the store checks it (shape only). */
export interface ManifestWeights {
  schema: string;
  regions: unknown[];
  /** Bytes of the weights' file sources (read at restore instead of from the checkpoint). */
  bytes: number;
}

/** What the checkpoint flow supplies to publish(); the store fills in the rest (name, id, dates, files, totals). */
export interface ManifestFields {
  source: ManifestSource;
  constraints: RestoreConstraints;
  criu: CriuDumpInfo;
  timings?: { phaseMs: Record<string, number> };
  liveBytes?: number;
  weights?: ManifestWeights;
  snapshot?: SnapshotRecord;
}

const STEP = 'parse checkpoint manifest';

function invalid(message: string, evidence: Record<string, unknown> = {}): StoreError {
  return new StoreError(StoreErrorCode.MANIFEST_INVALID, message, { step: STEP, evidence });
}

/**
 * A relative posix path that stays inside its directory: no leading '/', no '.' or '..' segment, no empty
 * segment, no NUL or backslash. Returns the reason it is refused, or undefined.
 */
export function checkRelativePath(path: string): string | undefined {
  if (path.length === 0) return 'is empty';
  if (path.includes('\0')) return 'contains a NUL byte';
  if (path.includes('\\')) return "contains '\\'";
  if (path.startsWith('/')) return 'is absolute';
  for (const segment of path.split('/')) {
    if (segment === '') return 'has an empty segment';
    if (segment === '.' || segment === '..') return `has a '${segment}' segment`;
  }
  return undefined;
}

// A small reader that knows where it is, so that every message names the field ("files[3].sha256").
type Json = unknown;
const describe = (v: Json): string => (v === null ? 'null' : Array.isArray(v) ? 'an array' : typeof v);

function obj(v: Json, at: string): Record<string, Json> {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw invalid(`${at} must be an object (got ${describe(v)})`);
  return v as Record<string, Json>;
}
function str(o: Record<string, Json>, key: string, at: string, opts: { nonEmpty?: boolean } = {}): string {
  const v = o[key];
  if (typeof v !== 'string') throw invalid(`${at}.${key} must be a string (got ${describe(v)})`);
  if (opts.nonEmpty !== false && v.length === 0) throw invalid(`${at}.${key} must not be empty`);
  return v;
}
function optStr(o: Record<string, Json>, key: string, at: string): string | undefined {
  return o[key] === undefined ? undefined : str(o, key, at);
}
function num(o: Record<string, Json>, key: string, at: string): number {
  const v = o[key];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) {
    throw invalid(`${at}.${key} must be a non-negative integer (got ${JSON.stringify(v) ?? 'undefined'})`);
  }
  return v;
}
function optNum(o: Record<string, Json>, key: string, at: string): number | undefined {
  return o[key] === undefined ? undefined : num(o, key, at);
}
function arr(o: Record<string, Json>, key: string, at: string): Json[] {
  const v = o[key];
  if (!Array.isArray(v)) throw invalid(`${at}.${key} must be an array (got ${describe(v)})`);
  return v;
}
function strArr(o: Record<string, Json>, key: string, at: string): string[] {
  return arr(o, key, at).map((v, i) => {
    if (typeof v !== 'string') throw invalid(`${at}.${key}[${i}] must be a string (got ${describe(v)})`);
    return v;
  });
}

const SHA256_HEX = /^[0-9a-f]{64}$/;
const IMAGE_DIGEST = /^sha256:[0-9a-f]{64}$/;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

function parseImage(v: Json, at: string): ImageIdentity {
  const o = obj(v, at);
  const image: ImageIdentity = { ref: str(o, 'ref', at) };
  const digest = optStr(o, 'digest', at);
  if (digest !== undefined) {
    if (!IMAGE_DIGEST.test(digest)) throw invalid(`${at}.digest must be "sha256:" and 64 lower-case hex digits (got ${JSON.stringify(digest)})`);
    image.digest = digest;
  }
  return image;
}

function parseGpu(v: Json, at: string): GpuConstraints {
  const o = obj(v, at);
  const gpu: GpuConstraints = {};
  const model = optStr(o, 'model', at);
  if (model !== undefined) gpu.model = model;
  if (o['uuids'] !== undefined) gpu.uuids = strArr(o, 'uuids', at);
  const driverVersion = optStr(o, 'driverVersion', at);
  if (driverVersion !== undefined) gpu.driverVersion = driverVersion;
  const cudaApiVersion = optNum(o, 'cudaApiVersion', at);
  if (cudaApiVersion !== undefined) gpu.cudaApiVersion = cudaApiVersion;
  const memoryBytes = optNum(o, 'memoryBytes', at);
  if (memoryBytes !== undefined) gpu.memoryBytes = memoryBytes;
  const count = optNum(o, 'count', at);
  if (count !== undefined) gpu.count = count;
  const cudaProcesses = optNum(o, 'cudaProcesses', at);
  if (cudaProcesses !== undefined) gpu.cudaProcesses = cudaProcesses;
  return gpu;
}

function parseSource(v: Json, at: string): ManifestSource {
  const o = obj(v, at);
  const container = obj(o['container'], `${at}.container`);
  const source: ManifestSource = {
    nodeHostname: str(o, 'nodeHostname', at),
    container: { name: str(container, 'name', `${at}.container`), id: str(container, 'id', `${at}.container`) },
    command: strArr(o, 'command', at),
    args: strArr(o, 'args', at),
    envKeys: strArr(o, 'envKeys', at),
  };
  source.envKeys.forEach((key, i) => {
    if (key.includes('=')) throw invalid(`${at}.envKeys[${i}] contains '=' (only variable names are stored, never values)`);
  });
  if (o['pod'] !== undefined) {
    const pod = obj(o['pod'], `${at}.pod`);
    source.pod = { name: str(pod, 'name', `${at}.pod`), namespace: str(pod, 'namespace', `${at}.pod`), uid: str(pod, 'uid', `${at}.pod`) };
  }
  if (o['cwd'] !== undefined) {
    source.cwd = str(o, 'cwd', at);
    if (!source.cwd.startsWith('/')) throw invalid(`${at}.cwd must be an absolute path (got ${JSON.stringify(source.cwd)})`);
  }
  if (o['user'] !== undefined) {
    const user = obj(o['user'], `${at}.user`);
    source.user = { uid: num(user, 'uid', `${at}.user`), gid: num(user, 'gid', `${at}.user`) };
  }
  return source;
}

function parseConstraints(v: Json, at: string): RestoreConstraints {
  const o = obj(v, at);
  const arch = obj(o['arch'], `${at}.arch`);
  const constraints: RestoreConstraints = {
    arch: { node: str(arch, 'node', `${at}.arch`), machine: str(arch, 'machine', `${at}.arch`) },
    kernelRelease: str(o, 'kernelRelease', at),
    criuVersion: str(o, 'criuVersion', at),
    containerdVersion: str(o, 'containerdVersion', at),
    image: parseImage(o['image'], `${at}.image`),
  };
  if (o['gpu'] !== undefined) constraints.gpu = parseGpu(o['gpu'], `${at}.gpu`);
  return constraints;
}

function parseCriu(v: Json, at: string): CriuDumpInfo {
  const o = obj(v, at);
  const pid = num(o, 'pid', at);
  if (pid === 0) throw invalid(`${at}.pid must be a process id (got 0)`);
  const criu: CriuDumpInfo = {
    pid,
    externalMounts: arr(o, 'externalMounts', at).map((m, i) => {
      const mo = obj(m, `${at}.externalMounts[${i}]`);
      return { key: str(mo, 'key', `${at}.externalMounts[${i}]`), path: str(mo, 'path', `${at}.externalMounts[${i}]`) };
    }),
    stdioFds: strArr(o, 'stdioFds', at),
    options: {},
  };
  const netnsKey = optStr(o, 'netnsKey', at);
  if (netnsKey !== undefined) criu.netnsKey = netnsKey;
  for (const [key, value] of Object.entries(obj(o['options'], `${at}.options`))) {
    if (typeof value !== 'string' && typeof value !== 'number' && typeof value !== 'boolean') {
      throw invalid(`${at}.options.${key} must be a string, number or boolean (got ${describe(value)})`);
    }
    criu.options[key] = value;
  }
  return criu;
}

function parseFiles(v: Json[], at: string): ManifestFile[] {
  const seen = new Set<string>();
  return v.map((f, i) => {
    const here = `${at}[${i}]`;
    const o = obj(f, here);
    const path = str(o, 'path', here);
    const bad = checkRelativePath(path);
    if (bad !== undefined) throw invalid(`${here}.path ${JSON.stringify(path)} ${bad} (paths must stay inside the checkpoint)`, { path });
    if (path === MANIFEST_FILE_NAME) throw invalid(`${here}.path must not be ${MANIFEST_FILE_NAME} itself`);
    if (seen.has(path)) throw invalid(`${here}.path ${JSON.stringify(path)} is listed twice`);
    seen.add(path);
    const sha256 = str(o, 'sha256', here);
    if (!SHA256_HEX.test(sha256)) throw invalid(`${here}.sha256 must be 64 lower-case hex digits (got ${JSON.stringify(sha256)})`);
    const mode = num(o, 'mode', here);
    if (mode > 0o7777) throw invalid(`${here}.mode must be permission bits, at most 0o7777 (got ${mode})`);
    return { path, size: num(o, 'size', here), sha256, mode };
  });
}

/**
 * Parses and validates manifest.json (text or an already-parsed value). Pure. Throws STORE_MANIFEST_INVALID
 * whose message names the first bad field, e.g. `manifest.files[2].sha256 must be 64 lower-case hex digits`.
 */
export function parseManifest(json: string | unknown): Manifest {
  let value: Json = json;
  if (typeof json === 'string') {
    try {
      value = JSON.parse(json);
    } catch (err) {
      throw new StoreError(StoreErrorCode.MANIFEST_INVALID, `manifest is not JSON: ${(err as Error).message}`, { step: STEP, cause: err });
    }
  }
  const at = 'manifest';
  const o = obj(value, at);
  if (o['kind'] !== MANIFEST_KIND) {
    throw invalid(`not a thaw checkpoint manifest: manifest.kind is ${JSON.stringify(o['kind']) ?? 'missing'} (expected ${JSON.stringify(MANIFEST_KIND)})`);
  }
  if (o['schemaVersion'] !== MANIFEST_SCHEMA_VERSION && o['schemaVersion'] !== MANIFEST_SCHEMA_VERSION_COMPRESSED_PAGES) {
    throw invalid(
      `manifest.schemaVersion ${JSON.stringify(o['schemaVersion']) ?? 'is missing'} is not supported (this thaw reads schemas ${MANIFEST_SCHEMA_VERSION} and ${MANIFEST_SCHEMA_VERSION_COMPRESSED_PAGES})`,
      { schemaVersion: o['schemaVersion'] },
    );
  }
  const schemaVersion = o['schemaVersion'] as ManifestSchemaVersion;
  const id = str(o, 'id', at);
  if (!UUID.test(id)) throw invalid(`manifest.id must be a lower-case uuid (got ${JSON.stringify(id)})`);
  const createdAt = str(o, 'createdAt', at);
  if (Number.isNaN(Date.parse(createdAt))) throw invalid(`manifest.createdAt must be an ISO 8601 date (got ${JSON.stringify(createdAt)})`);
  const files = parseFiles(arr(o, 'files', at), `${at}.files`);
  const totalsObj = obj(o['totals'], `${at}.totals`);
  const totals: Manifest['totals'] = { bytes: num(totalsObj, 'bytes', `${at}.totals`), fileCount: num(totalsObj, 'fileCount', `${at}.totals`) };
  const liveBytes = optNum(totalsObj, 'liveBytes', `${at}.totals`);
  if (liveBytes !== undefined) totals.liveBytes = liveBytes;
  // Schema 2 exactly when the compressed pages are listed: a schema-1 reader must never be handed them.
  if (schemaVersionOf(files) !== schemaVersion) {
    throw invalid(`manifest.schemaVersion is ${schemaVersion}, but its files ${schemaVersion === MANIFEST_SCHEMA_VERSION ? 'list' : 'do not list'} ${COMPRESSED_PAGES_PATH} (schema ${MANIFEST_SCHEMA_VERSION_COMPRESSED_PAGES} is the one with it)`, { schemaVersion });
  }
  const sum = files.reduce((acc, f) => acc + f.size, 0);
  if (totals.bytes !== sum) throw invalid(`manifest.totals.bytes is ${totals.bytes} but the files add up to ${sum}`);
  if (totals.fileCount !== files.length) throw invalid(`manifest.totals.fileCount is ${totals.fileCount} but ${files.length} files are listed`);
  const timingsObj = obj(o['timings'], `${at}.timings`);
  const phaseMs: Record<string, number> = {};
  const phases = obj(timingsObj['phaseMs'], `${at}.timings.phaseMs`);
  for (const key of Object.keys(phases)) phaseMs[key] = num(phases, key, `${at}.timings.phaseMs`);
  let snapshot: SnapshotRecord | undefined;
  if (o['snapshot'] !== undefined) {
    const so = obj(o['snapshot'], `${at}.snapshot`);
    const key = str(so, 'key', `${at}.snapshot`);
    if (!SHA256_HEX.test(key)) throw invalid(`manifest.snapshot.key must be 64 lower-case hex digits (got ${JSON.stringify(key)})`);
    snapshot = { name: str(so, 'name', `${at}.snapshot`), key };
  }
  const manifest: Manifest = {
    schemaVersion,
    kind: MANIFEST_KIND,
    name: str(o, 'name', at),
    id,
    createdAt,
    source: parseSource(o['source'], `${at}.source`),
    constraints: parseConstraints(o['constraints'], `${at}.constraints`),
    criu: parseCriu(o['criu'], `${at}.criu`),
    files,
    totals,
    timings: { phaseMs },
    ...(snapshot !== undefined ? { snapshot } : {}),
  };
  if (o['weights'] !== undefined) {
    const w = obj(o['weights'], `${at}.weights`);
    manifest.weights = { schema: str(w, 'schema', `${at}.weights`), regions: arr(w, 'regions', `${at}.weights`), bytes: num(w, 'bytes', `${at}.weights`) };
  }
  return manifest;
}

/** What the restoring node offers; gathered by the caller (host facts, the target container's image, the GPU). */
export interface NodeFacts {
  arch: { node: string; machine: string };
  kernelRelease: string;
  criuVersion?: string;
  containerdVersion?: string;
  /** The image of the container about to be restored into. */
  image: ImageIdentity;
  gpu?: GpuConstraints;
  /**
   * Whether this node can place compressed pages (schema 2): thaw-fill built and on, and CRIU and the kernel
   * offering lazy pages (the agent asks once at start). Absent: not compared (`thaw inspect` on a CLI without an agent).
   */
  placesCompressedPages?: boolean;
  /**
   * The target container: its name and its spec's process args (NRI CreateContainer). Absent: not compared
   * (callers that check a checkpoint against a node only, such as `thaw inspect`).
   */
  container?: { name: string; args: readonly string[] };
}

export type MismatchSeverity = 'fatal' | 'warning';

export interface Mismatch {
  /**
   * A stable key: 'arch', 'image', 'kernel', 'criu', 'containerd', 'gpu', 'gpu.model', 'gpu.driverVersion',
   * 'gpu.cudaApiVersion', 'gpu.count', 'container.name', 'container.args', 'pages'.
   */
  what: string;
  expected: string;
  actual: string;
  severity: MismatchSeverity;
}

export interface CompatibilityOptions {
  /** Treat a kernel release difference as fatal (default false: a warning). */
  strictKernel?: boolean;
}

/**
 * Compares a manifest's restore constraints with this node. Pure. Returns every difference; the restore goes
 * ahead only when none is fatal (see isRestorable).
 *
 * Which are fatal, and why:
 * - arch: CRIU images hold machine code and register state of one architecture. Fatal.
 * - image: the restored process maps files of its image (libraries, the interpreter, model code); other
 *   bytes under the same paths break it in ways seen only later. Fatal. Digests decide when both sides know
 *   one (a retag of the same digest is fine); otherwise the refs must be equal.
 * - kernel release: CRIU restores across kernel releases as long as the features it used exist, and the
 *   restore itself checks that; a warning, unless `strictKernel`.
 * - CRIU and containerd versions: informational warnings (CRIU reads older images).
 * - gpu: a checkpoint with GPU state onto a node without a GPU (`node.gpu` absent) is fatal: its processes
 *   would come back checkpointed in the driver's eyes, with nothing to restore them onto. Model and driver
 *   version fatal when both sides know them (the driver's checkpoint API restores onto the same driver and
 *   GPU kind); a lower CUDA API version on the node is fatal; fewer GPUs than the checkpoint's count is fatal
 *   (a tensor-parallel worker's every rank needs its GPU); GPU UUIDs are not compared (restore maps them).
 * - container (when the caller gives the target's): its spec's process args must equal the recorded ones — the
 *   restored process is the source's, so a target asking for another command (or other arguments, another
 *   model path, other flags) would silently run what it did not ask for. A checkpoint that recorded no args
 *   (taken outside the agent's CreateContainer) cannot show it matches: fatal too. The container name must
 *   match when the checkpoint recorded one (a pod's sidecar is not its worker).
 * - pages: a checkpoint whose lazy pages are compressed (schema 2) onto a node that cannot run thaw-fill is fatal:
 *   CRIU alone would restore those pages as zeros (compressed-pages.ts in the restore engine).
 */
export function checkCompatibility(manifest: Manifest, node: NodeFacts, options: CompatibilityOptions = {}): Mismatch[] {
  const c = manifest.constraints;
  const out: Mismatch[] = [];
  const add = (what: string, expected: string, actual: string, severity: MismatchSeverity): void => {
    out.push({ what, expected, actual, severity });
  };
  if (c.arch.node !== node.arch.node || c.arch.machine !== node.arch.machine) {
    add('arch', `${c.arch.node} (${c.arch.machine})`, `${node.arch.node} (${node.arch.machine})`, 'fatal');
  }
  if (c.image.digest !== undefined && node.image.digest !== undefined) {
    if (c.image.digest !== node.image.digest) add('image', `${c.image.ref}@${c.image.digest}`, `${node.image.ref}@${node.image.digest}`, 'fatal');
  } else if (c.image.ref !== node.image.ref) {
    add('image', c.image.ref, node.image.ref, 'fatal');
  }
  if (c.kernelRelease !== node.kernelRelease) add('kernel', c.kernelRelease, node.kernelRelease, options.strictKernel ? 'fatal' : 'warning');
  if (node.criuVersion !== undefined && c.criuVersion !== node.criuVersion) add('criu', c.criuVersion, node.criuVersion, 'warning');
  if (node.containerdVersion !== undefined && c.containerdVersion !== node.containerdVersion) {
    add('containerd', c.containerdVersion, node.containerdVersion, 'warning');
  }
  const want = c.gpu;
  const have = node.gpu;
  if (want !== undefined && have === undefined) {
    add('gpu', want.model ?? 'a GPU', 'no GPU', 'fatal');
  } else if (want !== undefined) {
    if (want.model !== undefined && have?.model !== undefined && want.model !== have.model) add('gpu.model', want.model, have.model, 'fatal');
    if (want.driverVersion !== undefined && have?.driverVersion !== undefined && want.driverVersion !== have.driverVersion) {
      add('gpu.driverVersion', want.driverVersion, have.driverVersion, 'fatal');
    }
    if (want.cudaApiVersion !== undefined && have?.cudaApiVersion !== undefined && have.cudaApiVersion < want.cudaApiVersion) {
      add('gpu.cudaApiVersion', `>= ${want.cudaApiVersion}`, String(have.cudaApiVersion), 'fatal');
    }
    const wantCount = want.count ?? want.uuids?.length;
    const haveCount = have?.count ?? have?.uuids?.length;
    if (wantCount !== undefined && haveCount !== undefined && haveCount < wantCount) {
      add('gpu.count', `>= ${wantCount} GPU(s)`, `${haveCount} GPU(s)`, 'fatal');
    }
  }
  if (manifest.schemaVersion === MANIFEST_SCHEMA_VERSION_COMPRESSED_PAGES && node.placesCompressedPages === false) {
    add('pages', 'compressed (placed by thaw-fill)', 'no thaw-fill here (restore.memoryFill criu, not built, or no lazy pages in CRIU or the kernel)', 'fatal');
  }
  const target = node.container;
  if (target !== undefined) {
    const recorded = manifest.source.args;
    if (recorded.length === 0) {
      add('container.args', '(not recorded by the checkpoint)', JSON.stringify(target.args), 'fatal');
    } else if (recorded.length !== target.args.length || recorded.some((a, i) => a !== target.args[i])) {
      add('container.args', JSON.stringify(recorded), JSON.stringify(target.args), 'fatal');
    }
    const name = manifest.source.container.name;
    if (name !== '' && name !== target.name) add('container.name', name, target.name, 'fatal');
  }
  return out;
}

/** True when no mismatch is fatal. */
export function isRestorable(mismatches: readonly Mismatch[]): boolean {
  return mismatches.every((m) => m.severity !== 'fatal');
}
