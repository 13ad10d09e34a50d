/**
 * `thaw install --root DIR`: lays thaw's installed layout (config-contract "Installed layout") into DIR, an
 * image root for node image builds or `/` on a node (the DaemonSet's init container runs it with DIR = the
 * host's root):
 *
 *   opt/thaw/lib/                 the package: package.json, package-lock.json, dist/src/ (less the test harness,
 *                                 src/node-stack), proto/, config/, bin/, native/build/, node_modules/ (production only)
 *   opt/thaw/bin/node             the Node.js binary that runs it
 *   <toolkitDir>                  CRIU, GNU tar, gzip and their libraries, at the same absolute path (their
 *                                 ELF interpreter is patched to it; restore targets bind-mount it there)
 *   usr/local/bin/thaw            #!/bin/sh wrapper: exec /opt/thaw/bin/node /opt/thaw/lib/dist/src/cli/main.js
 *   etc/thaw/agent.yaml           the default configuration (kept when it exists: it is the operator's)
 *   etc/containerd/conf.d/thaw-nri.toml          NRI-enabling drop-in for containerd's `imports`
 *   etc/systemd/system/thaw-agent.service        the agent as a service (installed, not enabled)
 *   var/lib/thaw/checkpoints/     the store's root, 0700 (checkpoints hold process memory)
 *
 * Production node_modules come from copying the package's own node_modules, pruned by its package-lock.json
 * (entries npm marked `dev`): no registry access, so it works offline, on a node and in an image build, and
 * installs exactly the versions the package was built and tested with.
 *
 * Atomic per part: each directory or file is staged beside its destination (same filesystem), and only when
 * every part is staged are they renamed into place; a failed swap puts back what it replaced. A part already
 * there with the same content is left as it is (idempotent; the package by a content stamp, node by digest,
 * the toolkit by its provisioning stamp, so an upgrade of the package leaves the toolkit alone); one of other
 * content is replaced only with `force` (INSTALL_EXISTS otherwise). Nothing is ever half-replaced: a crash leaves `.thaw-new-*` staging
 * entries, which the next install removes.
 */
import { createHash } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { chmod, copyFile, cp, link, lstat, mkdir, open, readdir, readFile, readlink, realpath, rename, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { errorMessage, ThawError } from '../errors.js';
import { elfInterpreter } from '../elf.js';
import { DEFAULT_TOOLKIT_DIR } from '../defaults.js';
import { packageRoot, processAlive, throwIfAborted } from '../util.js';
import { InstallErrorCode } from './errors.js';
export { InstallErrorCode } from './errors.js';

export interface InstallOptions {
  /** Where to install: an image root, or `/` on a node. Absolute. */
  root: string;
  /** The thaw package to install from (a checkout after the build, or an installed /opt/thaw/lib). */
  packageRoot: string;
  /** The toolkit prefix (e.g. /opt/thaw/stack/1.7); installed at root + this same absolute path. */
  toolkitDir: string;
  /** The Node.js binary to install as opt/thaw/bin/node (normally process.execPath). */
  nodePath: string;
  /** Replace an existing install of other content (the operator's agent.yaml is still kept). */
  force?: boolean;
  /** Aborting stops before the swap (nothing installed) and throws INSTALL_ABORTED. */
  signal?: AbortSignal;
  /** One human-readable line per step. */
  progress?: (line: string) => void;
}

export interface InstallReport {
  root: string;
  /** The parts this call installed or replaced, as host paths (`/opt/thaw/lib`, ...); empty when up to date. */
  files: string[];
  /** Bytes this call copied or wrote (0 when the install was already up to date). */
  bytes: number;
}


export class InstallError extends ThawError {
  declare readonly code: InstallErrorCode;
  constructor(code: InstallErrorCode, message: string, options: { step: string; cause?: unknown; evidence?: Record<string, unknown> }) {
    super(code, message, options);
    this.name = 'InstallError';
  }
}

/** Host paths of the installed layout (config-contract.md); root-relative in `installThaw`. */
export const INSTALL_PATHS = {
  lib: '/opt/thaw/lib',
  node: '/opt/thaw/bin/node',
  wrapper: '/usr/local/bin/thaw',
  agentConfig: '/etc/thaw/agent.yaml',
  containerdDropIn: '/etc/containerd/conf.d/thaw-nri.toml',
  systemdUnit: '/etc/systemd/system/thaw-agent.service',
  /** The store's parent and root (0700: checkpoints hold process memory). */
  stateDir: '/var/lib/thaw',
} as const;

/** The hook argv and CLI entry as installed: hooks run in the host's mount namespace, so these are host paths. */
export const INSTALLED_CLI_MAIN = `${INSTALL_PATHS.lib}/dist/src/cli/main.js`;
export const INSTALLED_HOOK_MAIN = `${INSTALL_PATHS.lib}/dist/src/oci-hooks/main.js`;

/** The stamp inside opt/thaw/lib that says what was installed (how a second install knows it is up to date). */
export const INSTALL_STAMP_FILE = '.thaw-install.json';
const STAGING_MARK = '.thaw-new-';
const OLD_MARK = '.thaw-old-';

/** The wrapper on PATH. */
export function renderWrapper(): string {
  return `#!/bin/sh\n# thaw CLI, installed by \`thaw install\`.\nexec ${INSTALL_PATHS.node} ${INSTALLED_CLI_MAIN} "$@"\n`;
}

/** Where an install from this module's own package takes its parts by default (the CLI's defaults). */
export function defaultInstallSources(): Pick<InstallOptions, 'packageRoot' | 'toolkitDir' | 'nodePath'> {
  return { packageRoot: packageRoot(), toolkitDir: DEFAULT_TOOLKIT_DIR, nodePath: process.execPath };
}

/** Package entries copied into opt/thaw/lib besides node_modules (optional ones may be absent). */
const PACKAGE_ENTRIES: ReadonlyArray<{ rel: string; required: boolean }> = [
  { rel: 'package.json', required: true },
  { rel: 'package-lock.json', required: true },
  { rel: 'dist/src', required: true },
  { rel: 'proto', required: true },
  { rel: 'config', required: true },
  { rel: 'native/build', required: true },
  { rel: 'bin', required: false },
];
/**
 * Parts of the package entries a node does not get: the test harness (src/node-stack/: a private containerd
 * stack, a CRI client, the registry it provisions), which only the tests, the demo and the benchmarks import
 * (test/helpers/layering.ts: no src/ layer may import node-stack).
 */
export const PACKAGE_EXCLUDE: readonly string[] = ['dist/src/node-stack'];
const excluded = (rel: string): boolean => PACKAGE_EXCLUDE.some((x) => rel === x || rel.startsWith(`${x}/`));
/** Files the package must hold for the installed thaw to work at all (checked before anything is copied). */
const PACKAGE_REQUIRED_FILES = ['dist/src/oci-hooks/main.js', 'native/build/thaw-pause', 'native/build/thaw-hook', 'proto/nri/api.proto', 'proto/criu/rpc.proto', 'config/agent.yaml', 'config/conf.d/thaw-nri.toml', 'config/thaw-agent.service'];
/**
 * What a provisioned stack holds besides the toolkit (src/node-stack/provision.ts: the private containerd,
 * runc and CNI plugins the tests drive, the CRI proto, documentation): 160 of its 217 MiB, not copied to a node,
 * which has its own containerd. The bin/ links to them go too.
 */
export const TOOLKIT_EXCLUDE: readonly string[] = [
  'usr/bin/containerd', 'usr/bin/containerd-shim', 'usr/bin/containerd-shim-runc-v1', 'usr/bin/containerd-shim-runc-v2', 'usr/bin/ctr',
  'usr/bin/runc', 'usr/sbin/runc', 'usr/lib/cni', 'usr/share/gocode', 'usr/share/doc', 'usr/share/man', 'usr/share/info', 'usr/share/lintian',
  'share/thaw',
];

async function toolkitKeeps(toolkitDir: string, src: string): Promise<boolean> {
  const excluded = (rel: string): boolean => TOOLKIT_EXCLUDE.some((x) => rel === x || rel.startsWith(`${x}/`));
  const rel = path.relative(toolkitDir, src);
  if (excluded(rel)) return false;
  const st = await lstat(src);
  if (!st.isSymbolicLink()) return true;
  const target = path.resolve(path.dirname(src), await readlink(src));
  return !excluded(path.relative(toolkitDir, target));
}

/** Toolkit binaries the engine runs (engine.ts, restore-coordinator.ts). */
const TOOLKIT_BINARIES = ['bin/criu', 'bin/tar', 'bin/gzip', 'bin/busybox'];

/** One thing that is swapped into place as a whole. */
interface Part {
  /** Host path (what it will be when root is /). */
  hostPath: string;
  /** Destination under root. */
  dest: string;
  /** The same path as the destination's source: nothing to copy (installing a package onto itself). */
  inPlace: boolean;
  /** The operator's: written only when absent, never replaced. */
  keepExisting?: boolean;
  /** True when what is at `dest` already is what this part would install. */
  upToDate(): Promise<boolean>;
  /** Builds the staged copy at `staged`; returns the bytes it wrote. */
  stage(staged: string): Promise<number>;
}

export async function installThaw(o: InstallOptions): Promise<InstallReport> {
  const progress = o.progress ?? (() => undefined);
  const root = absolute(o.root, 'root');
  const packageRoot = absolute(o.packageRoot, 'packageRoot');
  const toolkitDir = absolute(o.toolkitDir, 'toolkitDir');
  const nodePath = absolute(o.nodePath, 'nodePath');
  if (toolkitDir === '/') throw new InstallError(InstallErrorCode.INVALID_OPTION, 'toolkitDir cannot be /', { step: 'check options', evidence: { toolkitDir } });
  throwIfAborted(o.signal, installAborted);

  progress(`checking the package at ${packageRoot}`);
  const prodModules = await productionModules(packageRoot);
  for (const rel of PACKAGE_REQUIRED_FILES) await mustExist(path.join(packageRoot, rel), `the package has no ${rel} (build it first: npm run setup)`);
  await mustExist(nodePath, `no Node.js binary at ${nodePath}`);
  progress(`checking the toolkit at ${toolkitDir}`);
  await checkToolkit(toolkitDir);
  throwIfAborted(o.signal, installAborted);

  await io('create the root', () => mkdir(root, { recursive: true, mode: 0o755 }));
  const stamp = await installStamp(packageRoot, prodModules);
  const under = (hostPath: string): string => path.join(root, hostPath);
  const libDest = under(INSTALL_PATHS.lib);
  const sameAsSource = async (dest: string, source: string): Promise<boolean> =>
    (await realpath(dest).catch(() => undefined)) === (await realpath(source).catch(() => ''));

  const parts: Part[] = [
    {
      hostPath: INSTALL_PATHS.lib,
      dest: libDest,
      inPlace: await sameAsSource(libDest, packageRoot),
      stage: (staged) => stagePackage(packageRoot, prodModules, staged, stamp),
      upToDate: async () => (await readFile(path.join(libDest, INSTALL_STAMP_FILE), 'utf8').catch(() => undefined)) === stamp,
    },
    {
      hostPath: INSTALL_PATHS.node,
      dest: under(INSTALL_PATHS.node),
      inPlace: await sameAsSource(under(INSTALL_PATHS.node), nodePath),
      stage: async (staged) => {
        await copyFile(nodePath, staged);
        await chmod(staged, 0o755);
        return (await stat(staged)).size;
      },
      upToDate: async () => (await fileDigest(under(INSTALL_PATHS.node))) === (await fileDigest(nodePath)),
    },
    {
      hostPath: toolkitDir,
      dest: under(toolkitDir),
      inPlace: await sameAsSource(under(toolkitDir), toolkitDir),
      stage: async (staged) => {
        // verbatimSymlinks: the toolkit's links (bin/criu -> ../usr/sbin/criu) stay as they are, not made absolute.
        await cp(toolkitDir, staged, { recursive: true, verbatimSymlinks: true, preserveTimestamps: true, filter: (src) => toolkitKeeps(toolkitDir, src) });
        await chmod(staged, 0o755);
        return treeBytes(staged);
      },
      // Compared on its own: a package upgrade leaves the toolkit (which restore targets bind-mount) alone.
      upToDate: async () => (await toolkitDigest(under(toolkitDir))) === (await toolkitDigest(toolkitDir)),
    },
    textPart(INSTALL_PATHS.wrapper, under(INSTALL_PATHS.wrapper), renderWrapper(), 0o755),
    textPart(INSTALL_PATHS.agentConfig, under(INSTALL_PATHS.agentConfig), await readFile(path.join(packageRoot, 'config/agent.yaml'), 'utf8'), 0o644, true),
    textPart(INSTALL_PATHS.containerdDropIn, under(INSTALL_PATHS.containerdDropIn), await readFile(path.join(packageRoot, 'config/conf.d/thaw-nri.toml'), 'utf8'), 0o644),
    textPart(INSTALL_PATHS.systemdUnit, under(INSTALL_PATHS.systemdUnit), await readFile(path.join(packageRoot, 'config/thaw-agent.service'), 'utf8'), 0o644),
  ];

  // Leftovers of an install that crashed: staged copies never renamed, replaced trees never removed.
  for (const part of parts) await removeLeftovers(path.dirname(part.dest), path.basename(part.dest));

  // Each part on its own: replaced only when what is there differs from what it would install.
  const pending: Part[] = [];
  const inTheWay: string[] = [];
  for (const part of parts) {
    if (part.inPlace) continue;
    const existing = await lstat(part.dest).catch(() => undefined);
    if (!existing) {
      pending.push(part);
      continue;
    }
    if (part.keepExisting) {
      progress(`keeping the existing ${part.hostPath}`);
      continue;
    }
    if (await part.upToDate()) continue;
    inTheWay.push(part.hostPath);
    pending.push(part);
  }
  if (inTheWay.length > 0 && !o.force) {
    throw new InstallError(InstallErrorCode.EXISTS, `another thaw install is in the way (${inTheWay.join(', ')}); use --force to replace it`, {
      step: 'check the existing install', evidence: { root, paths: inTheWay },
    });
  }
  if (pending.length === 0) {
    progress(`thaw is installed and up to date in ${root}`);
    await ensureStateDir(under(INSTALL_PATHS.stateDir));
    return { root, files: [], bytes: 0 };
  }

  // Stage every part beside its destination; nothing at a destination changes until all are staged.
  const staged = new Map<Part, string>();
  let bytes = 0;
  try {
    for (const part of pending) {
      throwIfAborted(o.signal, installAborted);
      progress(`staging ${part.hostPath}`);
      const parent = path.dirname(part.dest);
      await io(`create ${path.dirname(part.hostPath)}`, () => mkdirChain(root, parent));
      const tmp = path.join(parent, `.${path.basename(part.dest)}${STAGING_MARK}${process.pid}`);
      await rm(tmp, { recursive: true, force: true });
      staged.set(part, tmp);
      bytes += await io(`stage ${part.hostPath}`, () => part.stage(tmp));
    }
    throwIfAborted(o.signal, installAborted);
  } catch (err) {
    await Promise.all([...staged.values()].map((tmp) => rm(tmp, { recursive: true, force: true })));
    throw err;
  }

  // Swap: old aside, new in; on failure put back what was swapped so far.
  const swapped: Array<{ part: Part; old: string | undefined }> = [];
  try {
    for (const part of pending) {
      const tmp = staged.get(part) as string;
      const existing = await lstat(part.dest).catch(() => undefined);
      const old = existing ? path.join(path.dirname(part.dest), `.${path.basename(part.dest)}${OLD_MARK}${process.pid}`) : undefined;
      if (old && !existing?.isDirectory()) {
        // A file is replaced by one rename (never absent); a hard link keeps the old one for a rollback.
        await io(`keep the old ${part.hostPath}`, () => link(part.dest, old));
        await io(`install ${part.hostPath}`, () => rename(tmp, part.dest));
        swapped.push({ part, old });
        progress(`installed ${part.hostPath}`);
        continue;
      }
      // A directory cannot be renamed over a non-empty one: the old one goes aside first (a moment without it).
      if (old) await io(`move the old ${part.hostPath} aside`, () => rename(part.dest, old));
      try {
        await io(`install ${part.hostPath}`, () => rename(tmp, part.dest));
      } catch (err) {
        if (old) await rename(old, part.dest).catch(() => undefined);
        throw err;
      }
      swapped.push({ part, old });
      progress(`installed ${part.hostPath}`);
    }
  } catch (err) {
    for (const { part, old } of swapped.reverse()) {
      await rm(part.dest, { recursive: true, force: true }).catch(() => undefined);
      if (old) await rename(old, part.dest).catch(() => undefined);
    }
    await Promise.all([...staged.values()].map((tmp) => rm(tmp, { recursive: true, force: true })));
    throw err;
  }
  for (const { old } of swapped) if (old) await rm(old, { recursive: true, force: true });
  await ensureStateDir(under(INSTALL_PATHS.stateDir));
  progress(`thaw installed in ${root} (${(bytes / 1048576).toFixed(1)} MiB)`);
  return { root, files: swapped.map(({ part }) => part.hostPath), bytes };
}

function absolute(p: string, name: string): string {
  if (typeof p !== 'string' || !path.isAbsolute(p)) {
    throw new InstallError(InstallErrorCode.INVALID_OPTION, `${name} must be an absolute path, got ${JSON.stringify(p)}`, { step: 'check options', evidence: { [name]: p } });
  }
  return path.resolve(p);
}

const installAborted = (cause: unknown): InstallError => new InstallError(InstallErrorCode.ABORTED, 'aborted', { step: 'install', cause });

async function io<T>(step: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (err instanceof ThawError) throw err;
    throw new InstallError(InstallErrorCode.IO, errorMessage(err), { step, cause: err, evidence: { errno: (err as NodeJS.ErrnoException).code } });
  }
}

async function mustExist(p: string, message: string): Promise<void> {
  if (!(await stat(p).then((s) => s.isFile() || s.isDirectory(), () => false))) {
    throw new InstallError(InstallErrorCode.SOURCE_MISSING, message, { step: 'check the sources', evidence: { path: p } });
  }
}

/** Creates `dir` and its missing parents below `root` with 0755 (an image root gets the usual modes). */
async function mkdirChain(root: string, dir: string): Promise<void> {
  const rel = path.relative(root, dir);
  let cur = root;
  for (const seg of rel === '' ? [] : rel.split(path.sep)) {
    cur = path.join(cur, seg);
    await mkdir(cur, { mode: 0o755 }).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'EEXIST') throw err;
    });
  }
}

/**
 * The node_modules entries of the package's production dependencies, from its package-lock.json (npm's
 * lockfile v2/v3 `packages` map; `dev: true` marks what only devDependencies need). An entry nested under one
 * already listed comes with it. Throws SOURCE_MISSING when a needed one is not installed.
 */
export async function productionModules(packageRoot: string): Promise<string[]> {
  const lockPath = path.join(packageRoot, 'package-lock.json');
  const text = await readFile(lockPath, 'utf8').catch(() => undefined);
  if (text === undefined) throw new InstallError(InstallErrorCode.SOURCE_MISSING, `no package-lock.json in ${packageRoot}`, { step: 'read the lockfile', evidence: { path: lockPath } });
  let packages: Record<string, { dev?: boolean; optional?: boolean }>;
  try {
    const lock = JSON.parse(text) as { packages?: Record<string, { dev?: boolean; optional?: boolean }> };
    if (!lock.packages || typeof lock.packages !== 'object') throw new Error('no "packages" map (lockfileVersion 2 or 3 expected)');
    packages = lock.packages;
  } catch (err) {
    throw new InstallError(InstallErrorCode.SOURCE_MISSING, `${lockPath} is not an npm v2/v3 lockfile: ${errorMessage(err)}`, { step: 'read the lockfile', cause: err });
  }
  const keys = Object.keys(packages).filter((k) => k.startsWith('node_modules/') && packages[k]?.dev !== true).sort();
  const out: string[] = [];
  const missing: string[] = [];
  for (const key of keys) {
    if (out.some((parent) => key.startsWith(`${parent}/node_modules/`))) continue;
    const present = await stat(path.join(packageRoot, key)).then((s) => s.isDirectory(), () => false);
    if (!present) {
      if (packages[key]?.optional !== true) missing.push(key);
      continue;
    }
    out.push(key);
  }
  if (missing.length > 0) {
    throw new InstallError(InstallErrorCode.SOURCE_MISSING, `production dependencies are not installed in ${packageRoot}: ${missing.join(', ')} (run npm ci)`, {
      step: 'check node_modules', evidence: { missing },
    });
  }
  return out;
}

/** The toolkit must hold the binaries the engine runs, each with its ELF interpreter inside toolkitDir. */
async function checkToolkit(toolkitDir: string): Promise<void> {
  for (const rel of TOOLKIT_BINARIES) {
    const p = path.join(toolkitDir, rel);
    const real = await realpath(p).catch(() => undefined);
    if (real === undefined) throw new InstallError(InstallErrorCode.SOURCE_MISSING, `the toolkit has no ${rel}`, { step: 'check the toolkit', evidence: { path: p } });
    if (!real.startsWith(`${toolkitDir}/`)) {
      throw new InstallError(InstallErrorCode.TOOLKIT_NOT_RELOCATED, `${p} resolves outside the toolkit (${real})`, { step: 'check the toolkit', evidence: { path: p, real } });
    }
    const interp = await elfInterpreter(real);
    // Static binaries (busybox) have none; a dynamic one must use the toolkit's own loader.
    if (interp !== undefined && !interp.startsWith(`${toolkitDir}/`)) {
      throw new InstallError(InstallErrorCode.TOOLKIT_NOT_RELOCATED, `${rel}'s ELF interpreter ${interp} is outside ${toolkitDir}: this toolkit only runs where it was built`, {
        step: 'check the toolkit', evidence: { path: real, interpreter: interp },
      });
    }
  }
}

async function stagePackage(packageRoot: string, modules: readonly string[], staged: string, stamp: string): Promise<number> {
  await mkdir(staged, { mode: 0o755 });
  for (const { rel, required } of PACKAGE_ENTRIES) {
    const from = path.join(packageRoot, rel);
    if (!required && !(await stat(from).then(() => true, () => false))) continue;
    await mkdir(path.dirname(path.join(staged, rel)), { recursive: true, mode: 0o755 });
    await cp(from, path.join(staged, rel), { recursive: true, verbatimSymlinks: true, filter: (src) => !excluded(path.relative(packageRoot, src)) });
  }
  for (const key of modules) {
    await mkdir(path.dirname(path.join(staged, key)), { recursive: true, mode: 0o755 });
    await cp(path.join(packageRoot, key), path.join(staged, key), { recursive: true, verbatimSymlinks: true });
  }
  await chmod(path.join(staged, 'native/build/thaw-pause'), 0o755);
  await chmod(path.join(staged, 'native/build/thaw-hook'), 0o755);
  await writeFileSynced(path.join(staged, INSTALL_STAMP_FILE), stamp, 0o644);
  return treeBytes(staged);
}

function textPart(hostPath: string, dest: string, text: string, mode: number, keepExisting = false): Part {
  return {
    hostPath,
    dest,
    inPlace: false,
    ...(keepExisting ? { keepExisting } : {}),
    upToDate: async () => {
      const [content, st] = await Promise.all([readFile(dest, 'utf8').catch(() => undefined), stat(dest).catch(() => undefined)]);
      return content === text && st !== undefined && (st.mode & 0o7777) === mode;
    },
    stage: async (staged) => {
      await writeFileSynced(staged, text, mode);
      return Buffer.byteLength(text);
    },
  };
}

async function writeFileSynced(file: string, text: string, mode: number): Promise<void> {
  await writeFile(file, text, { mode });
  await chmod(file, mode); // the umask may have cut the mode
  const fh = await open(file, fsConstants.O_RDONLY);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * What the package part consists of: the package's name and version and a digest of every file it copies.
 * Written into the installed lib; an install whose stamp equals the installed one leaves the lib alone.
 */
async function installStamp(packageRoot: string, modules: readonly string[]): Promise<string> {
  const pkg = JSON.parse(await readFile(path.join(packageRoot, 'package.json'), 'utf8')) as { name?: string; version?: string };
  const h = createHash('sha256');
  for (const rel of [...PACKAGE_ENTRIES.map((e) => e.rel), ...modules]) await hashTree(h, packageRoot, rel, true, excluded);
  return `${JSON.stringify({ name: pkg.name, version: pkg.version, package: h.digest('hex') }, null, 2)}\n`;
}

async function fileDigest(p: string): Promise<string | undefined> {
  const bytes = await readFile(p).catch(() => undefined);
  return bytes === undefined ? undefined : createHash('sha256').update(bytes).digest('hex');
}

/**
 * A toolkit's identity: its provisioning stamp (.thaw-stack.json: the Debian package versions it was built
 * from, src/node-stack/provision.ts) or, without one, its file list with modes, sizes, link targets and mtimes.
 */
async function toolkitDigest(dir: string): Promise<string | undefined> {
  if (!(await stat(dir).then((st) => st.isDirectory(), () => false))) return undefined;
  const h = createHash('sha256');
  const stackStamp = await readFile(path.join(dir, '.thaw-stack.json')).catch(() => undefined);
  if (stackStamp) h.update(stackStamp);
  else await hashTree(h, dir, '.', false);
  return h.digest('hex');
}

/** Feeds every file under root/rel (paths, modes, link targets, and contents unless `contents` is false) into h. */
async function hashTree(h: ReturnType<typeof createHash>, root: string, rel: string, contents = true, skip: (rel: string) => boolean = () => false): Promise<void> {
  if (skip(rel)) return;
  const p = path.join(root, rel);
  const st = await lstat(p).catch(() => undefined);
  if (!st) return;
  if (st.isDirectory()) {
    for (const name of (await readdir(p)).sort()) await hashTree(h, root, path.join(rel, name), contents, skip);
    return;
  }
  h.update(`${rel}\0${st.mode}\0${st.size}\0`);
  if (st.isSymbolicLink()) h.update(await readlink(p));
  else if (st.isFile() && contents) h.update(await readFile(p));
  else if (st.isFile()) h.update(String(st.mtimeMs));
}

async function treeBytes(p: string): Promise<number> {
  const st = await lstat(p);
  if (!st.isDirectory()) return st.isFile() ? st.size : 0;
  let sum = 0;
  for (const name of await readdir(p)) sum += await treeBytes(path.join(p, name));
  return sum;
}

/** Removes `.<base>.thaw-new-<pid>` / `.thaw-old-<pid>` entries whose install process is gone (never a running one's). */
async function removeLeftovers(dir: string, base: string): Promise<void> {
  const names = await readdir(dir).catch(() => [] as string[]);
  for (const name of names) {
    const mark = [STAGING_MARK, OLD_MARK].find((m) => name.startsWith(`.${base}${m}`));
    if (mark === undefined) continue;
    const pid = Number(name.slice(`.${base}${mark}`.length));
    if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && processAlive(pid)) continue;
    await rm(path.join(dir, name), { recursive: true, force: true });
  }
}

/** var/lib/thaw and its checkpoints dir: created 0700, or tightened to 0700 (their contents are left alone). */
async function ensureStateDir(stateDir: string): Promise<void> {
  for (const dir of [stateDir, path.join(stateDir, 'checkpoints')]) {
    await io(`create ${dir}`, async () => {
      await mkdir(dir, { recursive: true, mode: 0o700 });
      await chmod(dir, 0o700);
    });
  }
}
