/**
 * Debian packages without touching the machine's apt configuration: the machine's archive URI read from its
 * own sources, a private sources file, lists and cache per suite under `<root>/.apt/<name>/`, `apt-cache` to
 * resolve versions and `apt-get download` to fetch `.deb` files. Nothing here installs anything.
 */
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from '../log.js';
import { StackError, StackErrorCode } from './errors.js';
import { runCommand } from './exec.js';

/** Packages of one Debian suite at the versions we tested. */
export interface SuiteSpec {
  /** Debian suite the packages come from. */
  suite: string;
  /**
   * Versions we tested. A changed archive is noticed: a pin that is gone falls back to the suite's
   * candidate with a warning (sid moves every day).
   */
  pins: Readonly<Record<string, string>>;
}

/** Never part of a prefix even if the closure names them (maintainer-script machinery, not libraries). */
const CLOSURE_EXCLUDE = new Set(['dpkg', 'debconf', 'perl-base', 'install-info', 'base-files', 'debianutils']);

export const DEFAULT_HOST_SOURCES = ['/etc/apt/sources.list.d/debian.sources', '/etc/apt/sources.list'];

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

/**
 * The version to take of each wanted package: its pin when the suite still has it, else the suite's
 * candidate with a warning (a pinned package) or silently (a closure member without a pin). Pure; throws
 * STACK_PROVISION_FAILED for a package the suite does not have.
 */
export function chooseVersions(wanted: readonly string[], spec: SuiteSpec, policy: Map<string, PolicyEntry>, log?: Logger): {
  chosen: Record<string, string>;
  warnings: string[];
} {
  const chosen: Record<string, string> = {};
  const warnings: string[] = [];
  for (const name of wanted) {
    const entry = policy.get(name);
    const pin = spec.pins[name];
    if (pin && entry?.versions.includes(pin)) {
      chosen[name] = pin;
    } else if (entry?.candidate) {
      if (pin) {
        warnings.push(`${name} ${pin} is gone from ${spec.suite}; using the candidate ${entry.candidate}`);
        log?.warn('pinned version unavailable', { package: name, pinned: pin, candidate: entry.candidate });
      }
      chosen[name] = entry.candidate;
    } else {
      throw new StackError(StackErrorCode.PROVISION_FAILED, `package ${name} not found in ${spec.suite}`, {
        step: 'resolve versions',
        evidence: { package: name, pinned: pin, policy: entry },
      });
    }
  }
  return { chosen, warnings };
}

/** apt-get and apt-cache bound to one private sources file, lists and cache. */
export interface PrivateApt {
  dir: string;
  options: string[];
  archives: string;
  aptGet(args: string[], step: string, cwd?: string): ReturnType<typeof runCommand>;
  aptCache(args: string[], step: string): ReturnType<typeof runCommand>;
}

export async function privateApt(root: string, name: string, sourcesFileName: string, sourcesText: string,
  run: { signal?: AbortSignal; timeoutMs: number }): Promise<PrivateApt> {
  const dir = path.join(root, '.apt', name);
  for (const sub of ['parts', 'lists/partial', 'cache', 'archives/partial', 'preferences.d']) {
    await mkdir(path.join(dir, sub), { recursive: true, mode: 0o755 });
  }
  const partsDir = path.join(dir, 'parts');
  for (const f of await readdir(partsDir)) {
    if (f !== sourcesFileName) await rm(path.join(partsDir, f), { force: true });
  }
  await writeFile(path.join(partsDir, sourcesFileName), sourcesText, { mode: 0o644 });
  const options = [
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
  ];
  const { signal, timeoutMs } = run;
  return {
    dir,
    options,
    archives: path.join(dir, 'archives'),
    aptGet: (args, step, cwd) => runCommand('apt-get', [...options, ...args], { step, signal, timeoutMs, ...(cwd ? { cwd } : {}) }),
    aptCache: (args, step) => runCommand('apt-cache', [...options, ...args], { step, signal, timeoutMs }),
  };
}

/** The first main Debian archive of the machine's apt sources; throws STACK_PROVISION_FAILED when there is none. */
export async function readHostSource(options: { hostSourcesPaths?: string[] }): Promise<HostAptSource> {
  const candidates = options.hostSourcesPaths ?? DEFAULT_HOST_SOURCES;
  for (const file of candidates) {
    const text = await readFile(file, 'utf8').catch(() => undefined);
    if (text === undefined) continue;
    const parsed = parseHostAptSource(file, text);
    if (parsed) return parsed;
  }
  throw new StackError(StackErrorCode.PROVISION_FAILED, 'no Debian archive found in the machine\'s apt sources', {
    step: 'read host apt sources',
    evidence: { tried: candidates },
  });
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
 * The `.deb` file of every chosen package: those already in the private cache are reused (a second run
 * downloads nothing), the others are fetched with one `apt-get download`. Throws STACK_PROVISION_FAILED
 * when a file is still missing afterwards.
 */
export async function fetchDebs(apt: PrivateApt, chosen: Record<string, string>, log?: Logger): Promise<Map<string, string>> {
  const debs = await findDebs(apt.archives, chosen);
  const missing = Object.keys(chosen).filter((n) => !debs.has(n));
  if (missing.length === 0) return debs;
  log?.info('downloading packages', { count: missing.length });
  await apt.aptGet(['-q', 'download', ...missing.map((n) => `${n}=${chosen[n]}`)], 'apt-get download', apt.archives);
  const again = await findDebs(apt.archives, chosen);
  for (const n of missing) {
    const f = again.get(n);
    if (!f) {
      throw new StackError(StackErrorCode.PROVISION_FAILED, `apt-get download left no .deb for ${n}`, {
        step: 'apt-get download', evidence: { package: n, version: chosen[n], archives: apt.archives },
      });
    }
    debs.set(n, f);
  }
  return debs;
}
