import { constants as fsConstants } from 'node:fs';
import {
  access, chmod, lstat, mkdir, mkdtemp, open, readdir, readFile, rename, rm, stat, symlink, writeFile,
} from 'node:fs/promises';
import path from 'node:path';
import { silentLogger, type Logger } from '../log.js';
import { writeStrippedCriProto } from './cri-proto.js';
import { elfHasInterpreter } from '../elf.js';
import { StackError, STACK_ERROR_CODES } from './errors.js';
import { runCommand, sleep, tail, throwIfAborted } from './exec.js';
import {
  BIN_LINKS, DEFAULT_STACK_ROOT, INTERPRETER_SUBPATH, LIB_SUBDIRS, STAMP_FILE, stackPaths, type StackFlavor, type StackPaths,
} from './paths.js';

/**
 * Bumped whenever what a prefix holds or how it is patched changes: a stamp of another format makes
 * the next run rebuild the prefix.
 */
export const PROVISION_FORMAT_VERSION = 3;

/** Packages of a flavor whose dependency closure we fetch (the rest are taken alone). */
const CLOSURE_ROOTS = ['containerd', 'runc', 'criu', 'tar', 'gzip', 'busybox-static'] as const;
/**
 * Taken without their dependencies: the CRI proto package (its Go-source deps are useless here) and
 * the CNI plugins (they want iptables only for masquerading, which our bridge network does not do).
 */
const STANDALONE = ['golang-github-kubernetes-cri-api-dev', 'containernetworking-plugins'] as const;
/** Never part of a prefix even if the closure names them (maintainer-script machinery, not libraries). */
const CLOSURE_EXCLUDE = new Set(['dpkg', 'debconf', 'perl-base', 'install-info', 'base-files', 'debianutils']);

export interface FlavorSpec {
  /** Debian suite the packages come from. */
  suite: string;
  /**
   * Versions we tested. A changed archive is noticed: a pin that is gone falls back to the suite's
   * candidate with a warning (sid moves every day).
   */
  pins: Readonly<Record<string, string>>;
}

export const FLAVOR_SPECS: Readonly<Record<StackFlavor, FlavorSpec>> = {
  '1.7': {
    suite: 'trixie',
    pins: {
      containerd: '1.7.24~ds1-6+deb13u1',
      runc: '1.1.15+ds1-2+b4',
      criu: '4.1.1-1',
      tar: '1.35+dfsg-3.1',
      gzip: '1.13-1+deb13u1',
      'busybox-static': '1:1.37.0-6+b9',
      'golang-github-kubernetes-cri-api-dev': '0.32.3-1',
      'containernetworking-plugins': '1.1.1+ds1-3+b17',
    },
  },
  '2.1': {
    suite: 'sid',
    pins: {
      containerd: '2.1.9+ds1-5',
      runc: '1.3.6+ds1-1',
      criu: '4.2.1-1',
      tar: '1.35+dfsg-7',
      gzip: '1.14-1',
      'busybox-static': '1:1.38.0-3+b1',
      'golang-github-kubernetes-cri-api-dev': '0.32.3-1',
      'containernetworking-plugins': '1.9.1+ds1-1',
    },
  },
};

export interface StackStamp {
  formatVersion: number;
  flavor: StackFlavor;
  suite: string;
  /** The pins table this prefix was built from (compared with FLAVOR_SPECS on every run). */
  pins: Record<string, string>;
  /** Every package unpacked into the prefix and its version. */
  packages: Record<string, string>;
  archiveUri: string;
  warnings: string[];
  createdAt: string;
  versions: Record<string, string>;
}

export interface ProvisionOptions {
  flavor: StackFlavor;
  /** Default /opt/thaw/stack. */
  root?: string;
  logger?: Logger;
  signal?: AbortSignal;
  /** Rebuild even when the stamp matches. */
  force?: boolean;
  /** Limit of each apt-get/dpkg/patchelf/check command; default 300 s. */
  commandTimeoutMs?: number;
  /** How long to wait for another provisioner of the same flavor; default 15 min. */
  lockTimeoutMs?: number;
  /** The machine's apt sources, read for their URIs; default debian.sources, then sources.list. */
  hostSourcesPaths?: string[];
}

export interface ProvisionResult {
  paths: StackPaths;
  /** False when the stamp matched and nothing was done. */
  built: boolean;
  durationMs: number;
  stamp: StackStamp;
}

export const DEFAULT_PROVISION_COMMAND_TIMEOUT_MS = 300_000;
export const DEFAULT_PROVISION_LOCK_TIMEOUT_MS = 15 * 60_000;
const DEFAULT_HOST_SOURCES = ['/etc/apt/sources.list.d/debian.sources', '/etc/apt/sources.list'];

/** An apt source of the machine: the archive URI and its keyring, plus the file's text for the host's own suite. */
export interface HostAptSource {
  uri: string;
  signedBy?: string;
  /** Path and text of the file it came from (copied verbatim to fetch host packages such as patchelf). */
  file: string;
  text: string;
}

/**
 * Finds the main Debian archive in an apt sources file (deb822 `.sources` or one-line `.list`): the
 * first `deb` entry that is not the security archive. Pure.
 */
export function parseHostAptSource(file: string, text: string): HostAptSource | undefined {
  if (file.endsWith('.sources')) {
    for (const stanza of text.split(/\n\s*\n/)) {
      const fields = new Map<string, string>();
      for (const line of stanza.split('\n')) {
        const m = /^([A-Za-z-]+):\s*(.*)$/.exec(line);
        if (m?.[1] && m[2] !== undefined && !line.startsWith('#')) fields.set(m[1].toLowerCase(), m[2].trim());
      }
      const types = (fields.get('types') ?? '').split(/\s+/);
      const uri = (fields.get('uris') ?? '').split(/\s+/)[0];
      const suites = fields.get('suites') ?? '';
      if (!types.includes('deb') || !uri || /security/.test(uri) || /-security/.test(suites)) continue;
      if ((fields.get('enabled') ?? 'yes') === 'no') continue;
      const signedBy = fields.get('signed-by');
      return { uri, file, text, ...(signedBy && !signedBy.includes('\n') ? { signedBy } : {}) };
    }
    return undefined;
  }
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    const m = /^deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)/.exec(line);
    if (!m?.[2] || /security/.test(m[2]) || /-security/.test(m[3] ?? '')) continue;
    const signedBy = /signed-by=(\S+)/.exec(m[1] ?? '')?.[1];
    return { uri: m[2], file, text, ...(signedBy ? { signedBy } : {}) };
  }
  return undefined;
}

/** The deb822 source we write for a suite: the machine's archive URI and keyring, our suite. Pure. */
export function renderPrivateSources(source: Pick<HostAptSource, 'uri' | 'signedBy'>, suite: string): string {
  return [
    'Types: deb',
    `URIs: ${source.uri}`,
    `Suites: ${suite}`,
    'Components: main',
    ...(source.signedBy ? [`Signed-By: ${source.signedBy}`] : []),
    '',
  ].join('\n');
}

export interface PolicyEntry {
  candidate?: string;
  versions: string[];
}

/** Parses `apt-cache policy p1 p2 ...`: each package's candidate and every version in its table. Pure. */
export function parseAptPolicy(text: string): Map<string, PolicyEntry> {
  const result = new Map<string, PolicyEntry>();
  let current: PolicyEntry | undefined;
  let inTable = false;
  for (const line of text.split('\n')) {
    const head = /^(\S+):$/.exec(line);
    if (head?.[1]) {
      current = { versions: [] };
      result.set(head[1], current);
      inTable = false;
      continue;
    }
    if (!current) continue;
    const cand = /^\s+Candidate:\s*(\S+)/.exec(line);
    if (cand?.[1]) {
      if (cand[1] !== '(none)') current.candidate = cand[1];
      continue;
    }
    if (/^\s+Version table:/.test(line)) {
      inTable = true;
      continue;
    }
    const ver = /^\s+(?:\*\*\*\s+)?(\S+)\s+-?\d+\s*$/.exec(line);
    if (inTable && ver?.[1]) current.versions.push(ver[1]);
  }
  return result;
}

/** Package names of `apt-cache depends --recurse` output, without virtual packages and exclusions. Pure. */
export function parseDependsClosure(text: string): string[] {
  const names = new Set<string>();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith(' ') || line.startsWith('<')) continue;
    const name = line.trim();
    if (!CLOSURE_EXCLUDE.has(name)) names.add(name);
  }
  return [...names].sort();
}

/** The file name apt-get download gives a package (epoch colon escaped as %3a), without the arch part. */
export function debFilePrefix(name: string, version: string): string {
  return `${name}_${version.replace(/:/g, '%3a')}_`;
}

/** Reads the stamp of a prefix; undefined when missing or unreadable. */
export async function readStamp(paths: StackPaths): Promise<StackStamp | undefined> {
  try {
    return JSON.parse(await readFile(paths.stampFile, 'utf8')) as StackStamp;
  } catch {
    return undefined;
  }
}

/**
 * True when the prefix is complete and was built from the current pins by this provisioner format:
 * the stamp (written last, after the checks) matches and every bin/ link resolves.
 */
export async function isProvisioned(flavor: StackFlavor, root: string = DEFAULT_STACK_ROOT): Promise<StackStamp | undefined> {
  const paths = stackPaths(flavor, root);
  const stamp = await readStamp(paths);
  if (!stamp || stamp.formatVersion !== PROVISION_FORMAT_VERSION || stamp.flavor !== flavor) return undefined;
  if (JSON.stringify(stamp.pins) !== JSON.stringify(FLAVOR_SPECS[flavor].pins)) return undefined;
  try {
    await Promise.all(Object.keys(BIN_LINKS).map((n) => access(path.join(paths.binDir, n), fsConstants.X_OK)));
    await access(paths.criProtoStripped, fsConstants.R_OK);
  } catch {
    return undefined;
  }
  return stamp;
}

/**
 * Makes `<root>/<flavor>` hold containerd, runc, CRIU, GNU tar/gzip, busybox-static, the CRI proto and
 * their shared-library closure from Debian, patched to run from the prefix on Debian 12 and 13.
 *
 * Called by scripts/setup.sh (through provision-main) and by anything that needs a stack. Returns at
 * once when the stamp matches. Otherwise it takes a per-flavor lock file (waits for another
 * provisioner), fetches with apt-get using private sources/state under `<root>/.apt/` (the machine's apt
 * configuration and packages are never changed), builds into `<root>/.<flavor>.tmp-*`, swaps it into
 * place, checks the binaries (`criu check` must say "Looks good") and only then writes the stamp: a
 * prefix without a stamp is never taken as complete. Throws STACK_PROVISION_FAILED (command, exit code,
 * stderr tail) or STACK_CHECK_FAILED.
 */
export async function provisionStack(options: ProvisionOptions): Promise<ProvisionResult> {
  const started = Date.now();
  const log = (options.logger ?? silentLogger).child({ component: 'node-stack', flavor: options.flavor });
  const paths = stackPaths(options.flavor, options.root ?? DEFAULT_STACK_ROOT);
  if (!options.force) {
    const stamp = await isProvisioned(options.flavor, paths.root);
    if (stamp) return { paths, built: false, durationMs: Date.now() - started, stamp };
  }
  await mkdir(paths.root, { recursive: true, mode: 0o755 });
  await chmod(paths.root, 0o755);
  const release = await acquireLock(path.join(paths.root, `.${options.flavor}.lock`),
    options.lockTimeoutMs ?? DEFAULT_PROVISION_LOCK_TIMEOUT_MS, options.signal);
  try {
    if (!options.force) {
      // Another provisioner may have finished while we waited for the lock.
      const stamp = await isProvisioned(options.flavor, paths.root);
      if (stamp) return { paths, built: false, durationMs: Date.now() - started, stamp };
    }
    const stamp = await build(paths, options, log);
    const durationMs = Date.now() - started;
    log.info('stack provisioned', { prefix: paths.prefix, durationMs, packages: Object.keys(stamp.packages).length });
    return { paths, built: true, durationMs, stamp };
  } finally {
    await release();
  }
}

interface AptContext {
  dir: string;
  options: string[];
}

async function privateApt(root: string, name: string, sourcesFileName: string, sourcesText: string): Promise<AptContext> {
  const dir = path.join(root, '.apt', name);
  for (const sub of ['parts', 'lists/partial', 'cache', 'archives/partial', 'preferences.d']) {
    await mkdir(path.join(dir, sub), { recursive: true, mode: 0o755 });
  }
  const partsDir = path.join(dir, 'parts');
  for (const f of await readdir(partsDir)) {
    if (f !== sourcesFileName) await rm(path.join(partsDir, f), { force: true });
  }
  await writeFile(path.join(partsDir, sourcesFileName), sourcesText, { mode: 0o644 });
  return {
    dir,
    options: [
      '-o', 'Dir::Etc::SourceList=/dev/null',
      '-o', `Dir::Etc::SourceParts=${partsDir}`,
      '-o', 'Dir::Etc::Preferences=/dev/null',
      '-o', `Dir::Etc::PreferencesParts=${path.join(dir, 'preferences.d')}`,
      '-o', `Dir::State::Lists=${path.join(dir, 'lists')}`,
      '-o', 'Dir::State::status=/dev/null',
      '-o', `Dir::Cache=${path.join(dir, 'cache')}`,
      '-o', `Dir::Cache::archives=${path.join(dir, 'archives')}`,
      '-o', 'Debug::NoLocking=1',
      '-o', 'APT::Sandbox::User=root',
      '-o', 'Acquire::Languages=none',
    ],
  };
}

async function readHostSource(options: Pick<ProvisionOptions, 'hostSourcesPaths'>): Promise<HostAptSource> {
  const candidates = options.hostSourcesPaths ?? DEFAULT_HOST_SOURCES;
  for (const file of candidates) {
    const text = await readFile(file, 'utf8').catch(() => undefined);
    if (text === undefined) continue;
    const parsed = parseHostAptSource(file, text);
    if (parsed) return parsed;
  }
  throw new StackError(STACK_ERROR_CODES.PROVISION_FAILED, 'no Debian archive found in the machine\'s apt sources', {
    step: 'read host apt sources',
    evidence: { tried: candidates },
  });
}

async function build(paths: StackPaths, options: ProvisionOptions, log: Logger): Promise<StackStamp> {
  const signal = options.signal;
  const timeoutMs = options.commandTimeoutMs ?? DEFAULT_PROVISION_COMMAND_TIMEOUT_MS;
  const spec = FLAVOR_SPECS[options.flavor];
  const host = await readHostSource(options);
  const warnings: string[] = [];

  const patchelf = await ensurePatchelf(paths, host, options, log);

  const apt = await privateApt(paths.root, spec.suite, 'thaw.sources', renderPrivateSources(host, spec.suite));
  const aptGet = (args: string[], step: string, cwd?: string) =>
    runCommand('apt-get', [...apt.options, ...args], { step, signal, timeoutMs, ...(cwd ? { cwd } : {}) });
  const aptCache = (args: string[], step: string) =>
    runCommand('apt-cache', [...apt.options, ...args], { step, signal, timeoutMs });

  log.info('fetching package lists', { suite: spec.suite, uri: host.uri });
  await aptGet(['-q', 'update'], `apt-get update (${spec.suite})`);

  const closure = parseDependsClosure((await aptCache(['depends', '--recurse', '--no-recommends', '--no-suggests',
    '--no-conflicts', '--no-breaks', '--no-replaces', '--no-enhances', ...CLOSURE_ROOTS], 'resolve dependency closure')).stdout);
  const wanted = [...new Set([...closure, ...STANDALONE, ...Object.keys(spec.pins)])].sort();
  const policy = parseAptPolicy((await aptCache(['policy', ...wanted], 'resolve versions')).stdout);
  const chosen: Record<string, string> = {};
  for (const name of wanted) {
    const entry = policy.get(name);
    const pin = spec.pins[name];
    if (pin && entry?.versions.includes(pin)) {
      chosen[name] = pin;
    } else if (entry?.candidate) {
      if (pin) {
        const w = `${name} ${pin} is gone from ${spec.suite}; using the candidate ${entry.candidate}`;
        warnings.push(w);
        log.warn('pinned version unavailable', { package: name, pinned: pin, candidate: entry.candidate });
      }
      chosen[name] = entry.candidate;
    } else {
      throw new StackError(STACK_ERROR_CODES.PROVISION_FAILED, `package ${name} not found in ${spec.suite}`, {
        step: 'resolve versions',
        evidence: { package: name, pinned: pin, policy: entry },
      });
    }
  }

  const archives = path.join(apt.dir, 'archives');
  const debs = await findDebs(archives, chosen);
  const missing = Object.keys(chosen).filter((n) => !debs.has(n));
  if (missing.length > 0) {
    log.info('downloading packages', { count: missing.length });
    await aptGet(['-q', 'download', ...missing.map((n) => `${n}=${chosen[n]}`)], 'apt-get download', archives);
    const again = await findDebs(archives, chosen);
    for (const n of missing) {
      const f = again.get(n);
      if (!f) {
        throw new StackError(STACK_ERROR_CODES.PROVISION_FAILED, `apt-get download left no .deb for ${n}`, {
          step: 'apt-get download', evidence: { package: n, version: chosen[n], archives },
        });
      }
      debs.set(n, f);
    }
  }

  // Build beside the final place (same filesystem, so the swap is a rename).
  await cleanLeftovers(paths);
  const tmp = await mkdtemp(path.join(paths.root, `.${options.flavor}.tmp-`));
  let swapped = false;
  try {
    await chmod(tmp, 0o755);
    for (const [name, deb] of debs) {
      await runCommand('dpkg-deb', ['-x', deb, tmp], { step: `dpkg -x ${name}`, signal, timeoutMs });
    }
    await patchExecutables(tmp, paths, patchelf, { signal, timeoutMs });
    await makeBinLinks(tmp);
    await writeStrippedCriProto(path.join(tmp, path.relative(paths.prefix, paths.criProto)),
      path.join(tmp, path.relative(paths.prefix, paths.criProtoStripped)));
    await chmodDirs(tmp);

    // Swap: the old prefix (if any) moves aside, the new one moves in. Without a stamp (written below,
    // after the checks) the new prefix does not count as provisioned even if we die here.
    let old: string | undefined;
    if (await exists(paths.prefix)) {
      old = `${tmp.replace('.tmp-', '.old-')}`;
      await rename(paths.prefix, old);
    }
    await rename(tmp, paths.prefix);
    swapped = true;
    if (old) await rm(old, { recursive: true, force: true });
  } finally {
    if (!swapped) await rm(tmp, { recursive: true, force: true });
  }

  const versions = await checkStack(paths, { signal, timeoutMs });
  const stamp: StackStamp = {
    formatVersion: PROVISION_FORMAT_VERSION,
    flavor: options.flavor,
    suite: spec.suite,
    pins: { ...spec.pins },
    packages: chosen,
    archiveUri: host.uri,
    warnings,
    createdAt: new Date().toISOString(),
    versions,
  };
  const stampTmp = `${paths.stampFile}.tmp`;
  await writeFile(stampTmp, `${JSON.stringify(stamp, null, 2)}\n`, { mode: 0o644 });
  await rename(stampTmp, paths.stampFile);
  return stamp;
}

async function findDebs(archives: string, chosen: Record<string, string>): Promise<Map<string, string>> {
  const files = await readdir(archives);
  const found = new Map<string, string>();
  for (const [name, version] of Object.entries(chosen)) {
    const prefix = debFilePrefix(name, version);
    const f = files.find((x) => x.startsWith(prefix) && x.endsWith('.deb'));
    if (f) found.set(name, path.join(archives, f));
  }
  return found;
}

/**
 * Gets patchelf from the machine's own distribution (its libraries are the host's, so it runs without
 * any patching) into `<root>/tools`. Returns its path.
 */
async function ensurePatchelf(paths: StackPaths, host: HostAptSource, options: Omit<ProvisionOptions, 'flavor'>, log: Logger): Promise<string> {
  const signal = options.signal;
  const timeoutMs = options.commandTimeoutMs ?? DEFAULT_PROVISION_COMMAND_TIMEOUT_MS;
  const works = await runCommand(paths.patchelf, ['--version'], { step: 'patchelf --version', signal, allowFailure: true })
    .then((r) => r.exitCode === 0).catch(() => false);
  if (works) return paths.patchelf;
  log.info('fetching the host distribution\'s patchelf', { uri: host.uri });
  const apt = await privateApt(paths.root, 'host', path.basename(host.file).endsWith('.sources') ? 'host.sources' : 'host.list', host.text);
  await runCommand('apt-get', [...apt.options, '-q', 'update'], { step: 'apt-get update (host suites)', signal, timeoutMs });
  const archives = path.join(apt.dir, 'archives');
  const dl = await runCommand('apt-get', [...apt.options, '-q', '--print-uris', 'download', 'patchelf'],
    { step: 'resolve patchelf', signal, timeoutMs });
  const fileName = /'\S+'\s+(\S+\.deb)\s/.exec(dl.stdout)?.[1];
  await runCommand('apt-get', [...apt.options, '-q', 'download', 'patchelf'], { step: 'apt-get download patchelf', signal, timeoutMs, cwd: archives });
  const deb = fileName ? path.join(archives, fileName) : undefined;
  if (!deb || !(await exists(deb))) {
    throw new StackError(STACK_ERROR_CODES.PROVISION_FAILED, 'apt-get download left no patchelf .deb', {
      step: 'apt-get download patchelf', evidence: { printUris: tail(dl.stdout, 500), archives },
    });
  }
  await mkdir(paths.root, { recursive: true, mode: 0o755 });
  const tmp = await mkdtemp(path.join(paths.root, '.tools.tmp-'));
  try {
    await chmod(tmp, 0o755);
    await runCommand('dpkg-deb', ['-x', deb, tmp], { step: 'dpkg -x patchelf', signal, timeoutMs });
    await rm(paths.toolsDir, { recursive: true, force: true });
    await rename(tmp, paths.toolsDir);
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
  await runCommand(paths.patchelf, ['--version'], { step: 'patchelf --version', signal });
  return paths.patchelf;
}

/** Every dynamically linked executable in the tree gets the prefix's loader and a DT_RPATH into the prefix. */
async function patchExecutables(tree: string, paths: StackPaths, patchelf: string,
  opts: { signal?: AbortSignal; timeoutMs: number }): Promise<void> {
  const interpreter = path.join(paths.prefix, INTERPRETER_SUBPATH);
  // DT_RPATH (--force-rpath), not DT_RUNPATH: RPATH also applies to the libraries' own dependencies
  // (CRIU's libgnutls needs libunistring.so.5, which Debian 12 lacks).
  const rpath = LIB_SUBDIRS.map((d) => path.join(paths.prefix, d)).join(':');
  const files = await walkFiles(tree);
  for (const file of files) {
    const base = path.basename(file);
    if (/\.so(\.|$)/.test(base) || base.startsWith('ld-linux')) continue; // libraries and the loader itself
    if (!(await elfHasInterpreter(file))) continue;
    await runCommand(patchelf, ['--set-interpreter', interpreter, '--force-rpath', '--set-rpath', rpath, file], {
      step: `patchelf ${path.relative(tree, file)}`, signal: opts.signal, timeoutMs: opts.timeoutMs,
    });
  }
}

async function walkFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) out.push(...(await walkFiles(full)));
    else if (entry.isFile()) out.push(full);
  }
  return out;
}

async function makeBinLinks(tree: string): Promise<void> {
  const binDir = path.join(tree, 'bin');
  await mkdir(binDir, { recursive: true, mode: 0o755 });
  for (const [name, rel] of Object.entries(BIN_LINKS)) {
    if (!(await exists(path.join(tree, rel)))) {
      throw new StackError(STACK_ERROR_CODES.PROVISION_FAILED, `${rel} is not in the unpacked packages`, {
        step: 'link bin/', evidence: { name, expected: rel },
      });
    }
    await symlink(path.relative('bin', rel), path.join(binDir, name));
  }
}

async function chmodDirs(dir: string): Promise<void> {
  const st = await lstat(dir);
  if (!st.isDirectory()) return;
  if ((st.mode & 0o777) !== 0o755) await chmod(dir, 0o755);
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    if (entry.isDirectory()) await chmodDirs(path.join(dir, entry.name));
  }
}

/**
 * Runs each binary once from the swapped-in prefix (the patched loader path only exists there).
 * Returns the first line of each `--version`.
 */
export async function checkStack(paths: StackPaths, opts: { signal?: AbortSignal; timeoutMs?: number } = {}): Promise<Record<string, string>> {
  const env = { ...process.env, PATH: `${paths.binDir}:${process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin'}` };
  const versions: Record<string, string> = {};
  const check = async (name: string, file: string, args: string[]): Promise<string> => {
    const r = await runCommand(file, args, {
      step: `check ${name}`, env, signal: opts.signal, timeoutMs: opts.timeoutMs ?? 60_000,
      errorCode: STACK_ERROR_CODES.CHECK_FAILED,
    });
    return `${r.stdout}${r.stderr}`;
  };
  versions.containerd = firstLine(await check('containerd', paths.containerd, ['--version']));
  versions.runc = firstLine(await check('runc', paths.runc, ['--version']));
  versions.criu = firstLine(await check('criu', paths.criu, ['--version']));
  versions.tar = firstLine(await check('tar', paths.tar, ['--version']));
  versions.gzip = firstLine(await check('gzip', paths.gzip, ['--version']));
  const criuCheck = await runCommand(paths.criu, ['check'], {
    step: 'criu check', env, signal: opts.signal, timeoutMs: opts.timeoutMs ?? 60_000, allowFailure: true,
  });
  const said = `${criuCheck.stdout}${criuCheck.stderr}`;
  if (criuCheck.exitCode !== 0 || !/Looks good/.test(said)) {
    throw new StackError(STACK_ERROR_CODES.CHECK_FAILED, `criu check did not say "Looks good" (exit ${criuCheck.exitCode})`, {
      step: 'criu check', evidence: { command: `${paths.criu} check`, exitCode: criuCheck.exitCode, output: tail(said) },
    });
  }
  return versions;
}

function firstLine(text: string): string {
  return text.trim().split('\n')[0] ?? '';
}

async function cleanLeftovers(paths: StackPaths): Promise<void> {
  for (const f of await readdir(paths.root)) {
    if (f.startsWith(`.${paths.flavor}.tmp-`) || f.startsWith(`.${paths.flavor}.old-`) || f.startsWith('.tools.tmp-')) {
      await rm(path.join(paths.root, f), { recursive: true, force: true });
    }
  }
}

async function exists(p: string): Promise<boolean> {
  return stat(p).then(() => true, () => false);
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * A lock file holding the owner's pid, created with O_EXCL. A lock whose owner is dead is taken over.
 * Returns the release function.
 */
async function acquireLock(file: string, timeoutMs: number, signal?: AbortSignal): Promise<() => Promise<void>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    throwIfAborted(signal, 'take provisioning lock');
    try {
      const fh = await open(file, 'wx', 0o644);
      await fh.writeFile(String(process.pid));
      await fh.close();
      return async () => { await rm(file, { force: true }); };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
    const owner = Number.parseInt(await readFile(file, 'utf8').catch(() => ''), 10);
    // An empty file may be a lock being written this instant: only an old one counts as abandoned.
    const age = Date.now() - (await stat(file).then((s) => s.mtimeMs, () => 0));
    if (Number.isFinite(owner) ? !pidAlive(owner) : age > 10_000) {
      await rm(file, { force: true });
      continue;
    }
    if (Date.now() > deadline) {
      throw new StackError(STACK_ERROR_CODES.PROVISION_FAILED, `another provisioner (pid ${owner}) holds ${file}`, {
        step: 'take provisioning lock', evidence: { file, owner, timeoutMs },
      });
    }
    await sleep(500, signal, 'take provisioning lock');
  }
}

/**
 * The OCI registry the registry store's tests and bench:registry run against: Debian's `docker-registry`
 * (distribution 2.8) with libc6 from the same suite, unpacked into `<root>/registry` and patched like a
 * stack prefix (its own loader, DT_RPATH into the prefix), so it runs the same on Debian 12 and 13.
 */
export const REGISTRY_COMPONENT = 'registry';
export const REGISTRY_SPEC: FlavorSpec = {
  suite: 'trixie',
  pins: { 'docker-registry': '2.8.3+ds1-2+b8', libc6: '2.41-12+deb13u5' },
};
export const REGISTRY_BINARY_SUBPATH = 'usr/bin/docker-registry';

export interface RegistryPaths {
  root: string;
  prefix: string;
  binary: string;
  stampFile: string;
}

export function registryPaths(root: string = DEFAULT_STACK_ROOT): RegistryPaths {
  const prefix = path.join(path.resolve(root), REGISTRY_COMPONENT);
  return { root: path.resolve(root), prefix, binary: path.join(prefix, REGISTRY_BINARY_SUBPATH), stampFile: path.join(prefix, STAMP_FILE) };
}

export interface RegistryStamp {
  formatVersion: number;
  component: typeof REGISTRY_COMPONENT;
  suite: string;
  pins: Record<string, string>;
  packages: Record<string, string>;
  version: string;
  warnings: string[];
  createdAt: string;
}

/** The registry's stamp when the prefix is complete and built from the current pins; else undefined. */
export async function isRegistryProvisioned(root: string = DEFAULT_STACK_ROOT): Promise<RegistryStamp | undefined> {
  const paths = registryPaths(root);
  const stamp = (await readFile(paths.stampFile, 'utf8').then((t) => JSON.parse(t) as RegistryStamp, () => undefined));
  if (!stamp || stamp.formatVersion !== PROVISION_FORMAT_VERSION || stamp.component !== REGISTRY_COMPONENT) return undefined;
  if (JSON.stringify(stamp.pins) !== JSON.stringify(REGISTRY_SPEC.pins)) return undefined;
  if (!(await access(paths.binary, fsConstants.X_OK).then(() => true, () => false))) return undefined;
  return stamp;
}

/** Provisions `<root>/registry` (see REGISTRY_SPEC); returns at once when its stamp matches. */
export async function provisionRegistry(options: Omit<ProvisionOptions, 'flavor'>): Promise<{ paths: RegistryPaths; built: boolean; stamp: RegistryStamp }> {
  const log = (options.logger ?? silentLogger).child({ component: 'node-stack', flavor: REGISTRY_COMPONENT });
  const paths = registryPaths(options.root ?? DEFAULT_STACK_ROOT);
  if (!options.force) {
    const stamp = await isRegistryProvisioned(paths.root);
    if (stamp) return { paths, built: false, stamp };
  }
  await mkdir(paths.root, { recursive: true, mode: 0o755 });
  const release = await acquireLock(path.join(paths.root, `.${REGISTRY_COMPONENT}.lock`),
    options.lockTimeoutMs ?? DEFAULT_PROVISION_LOCK_TIMEOUT_MS, options.signal);
  try {
    if (!options.force) {
      const stamp = await isRegistryProvisioned(paths.root);
      if (stamp) return { paths, built: false, stamp };
    }
    const signal = options.signal;
    const timeoutMs = options.commandTimeoutMs ?? DEFAULT_PROVISION_COMMAND_TIMEOUT_MS;
    const spec = REGISTRY_SPEC;
    const host = await readHostSource(options);
    const stackLike = stackPaths('1.7', paths.root);
    const patchelf = await ensurePatchelf(stackLike, host, options, log);
    const apt = await privateApt(paths.root, spec.suite, 'thaw.sources', renderPrivateSources(host, spec.suite));
    await runCommand('apt-get', [...apt.options, '-q', 'update'], { step: `apt-get update (${spec.suite})`, signal, timeoutMs });
    const wanted = Object.keys(spec.pins).sort();
    const policy = parseAptPolicy((await runCommand('apt-cache', [...apt.options, 'policy', ...wanted], { step: 'resolve versions', signal, timeoutMs })).stdout);
    const warnings: string[] = [];
    const chosen: Record<string, string> = {};
    for (const name of wanted) {
      const entry = policy.get(name);
      const pin = spec.pins[name]!;
      if (entry?.versions.includes(pin)) chosen[name] = pin;
      else if (entry?.candidate) {
        warnings.push(`${name} ${pin} is gone from ${spec.suite}; using the candidate ${entry.candidate}`);
        log.warn('pinned version unavailable', { package: name, pinned: pin, candidate: entry.candidate });
        chosen[name] = entry.candidate;
      } else {
        throw new StackError(STACK_ERROR_CODES.PROVISION_FAILED, `package ${name} not found in ${spec.suite}`, { step: 'resolve versions', evidence: { package: name, policy: entry } });
      }
    }
    const archives = path.join(apt.dir, 'archives');
    let debs = await findDebs(archives, chosen);
    const missing = wanted.filter((n) => !debs.has(n));
    if (missing.length > 0) {
      await runCommand('apt-get', [...apt.options, '-q', 'download', ...missing.map((n) => `${n}=${chosen[n]}`)], { step: 'apt-get download', signal, timeoutMs, cwd: archives });
      debs = await findDebs(archives, chosen);
      const still = wanted.filter((n) => !debs.has(n));
      if (still.length > 0) {
        throw new StackError(STACK_ERROR_CODES.PROVISION_FAILED, `apt-get download left no .deb for ${still.join(', ')}`, { step: 'apt-get download', evidence: { archives } });
      }
    }
    for (const f of await readdir(paths.root)) {
      if (f.startsWith(`.${REGISTRY_COMPONENT}.tmp-`)) await rm(path.join(paths.root, f), { recursive: true, force: true });
    }
    const tmp = await mkdtemp(path.join(paths.root, `.${REGISTRY_COMPONENT}.tmp-`));
    let swapped = false;
    try {
      await chmod(tmp, 0o755);
      for (const [name, deb] of debs) await runCommand('dpkg-deb', ['-x', deb, tmp], { step: `dpkg -x ${name}`, signal, timeoutMs });
      const interpreter = path.join(paths.prefix, INTERPRETER_SUBPATH);
      const rpath = LIB_SUBDIRS.map((d) => path.join(paths.prefix, d)).join(':');
      await runCommand(patchelf, ['--set-interpreter', interpreter, '--force-rpath', '--set-rpath', rpath, path.join(tmp, REGISTRY_BINARY_SUBPATH)], {
        step: 'patchelf docker-registry', signal, timeoutMs,
      });
      await chmodDirs(tmp);
      await rm(paths.prefix, { recursive: true, force: true });
      await rename(tmp, paths.prefix);
      swapped = true;
    } finally {
      if (!swapped) await rm(tmp, { recursive: true, force: true });
    }
    const r = await runCommand(paths.binary, ['--version'], { step: 'check docker-registry', signal, timeoutMs: 60_000, errorCode: STACK_ERROR_CODES.CHECK_FAILED });
    const stamp: RegistryStamp = {
      formatVersion: PROVISION_FORMAT_VERSION,
      component: REGISTRY_COMPONENT,
      suite: spec.suite,
      pins: { ...spec.pins },
      packages: chosen,
      version: firstLine(`${r.stdout}${r.stderr}`),
      warnings,
      createdAt: new Date().toISOString(),
    };
    await writeFile(`${paths.stampFile}.tmp`, `${JSON.stringify(stamp, null, 2)}\n`, { mode: 0o644 });
    await rename(`${paths.stampFile}.tmp`, paths.stampFile);
    log.info('registry provisioned', { prefix: paths.prefix, version: stamp.version });
    return { paths, built: true, stamp };
  } finally {
    await release();
  }
}
