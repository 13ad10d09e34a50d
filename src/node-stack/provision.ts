/**
 * The containerd stack prefixes (`<root>/<flavor>`): containerd, runc, CRIU, GNU tar/gzip, busybox-static,
 * the CRI proto and their shared-library closure from Debian, built, checked and stamped. The apt work is
 * in apt.ts, the patching in prefix-patch.ts, the lock in lock.ts; the registry and the peer tools are
 * components (component.ts) of their own.
 */
import { constants as fsConstants } from 'node:fs';
import { access, chmod, mkdir, mkdtemp, readdir, readFile, rename, rm, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { silentLogger, type Logger } from '../log.js';
import {
  chooseVersions, fetchDebs, parseAptPolicy, parseDependsClosure, privateApt, readHostSource, renderPrivateSources, type SuiteSpec,
} from './apt.js';
import { writeStrippedCriProto } from './cri-proto.js';
import { StackError, StackErrorCode } from './errors.js';
import { runCommand, tail } from './exec.js';
import { acquireLock } from './lock.js';
import { BIN_LINKS, DEFAULT_STACK_ROOT, stackPaths, type StackFlavor, type StackPaths } from './paths.js';
import { chmodDirs, ensurePatchelf, exists, patchExecutables, unpackDebs } from './prefix-patch.js';
import {
  DEFAULT_PROVISION_COMMAND_TIMEOUT_MS, DEFAULT_PROVISION_LOCK_TIMEOUT_MS, PROVISION_FORMAT_VERSION, type ProvisionCommonOptions,
} from './provision-options.js';

export { DEFAULT_PROVISION_COMMAND_TIMEOUT_MS, DEFAULT_PROVISION_LOCK_TIMEOUT_MS, PROVISION_FORMAT_VERSION } from './provision-options.js';
// Where these lived before provision.ts was split; kept so importers need not know the new modules.
export { debFilePrefix, parseAptPolicy, parseDependsClosure, parseHostAptSource, renderPrivateSources } from './apt.js';
export type { HostAptSource, PolicyEntry } from './apt.js';
export {
  isRegistryProvisioned, provisionRegistry, registryPaths, REGISTRY_BINARY_SUBPATH, REGISTRY_COMPONENT, REGISTRY_SPEC,
} from './registry-provision.js';
export type { RegistryPaths, RegistryStamp } from './registry-provision.js';

/** Packages of a flavor whose dependency closure we fetch (the rest are taken alone). */
const CLOSURE_ROOTS = ['containerd', 'runc', 'criu', 'tar', 'gzip', 'busybox-static'] as const;
/**
 * Taken without their dependencies: the CRI proto package (its Go-source deps are useless here) and
 * the CNI plugins (they want iptables only for masquerading, which our bridge network does not do).
 */
const STANDALONE = ['golang-github-kubernetes-cri-api-dev', 'containernetworking-plugins'] as const;

export type FlavorSpec = SuiteSpec;

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

export interface ProvisionOptions extends ProvisionCommonOptions {
  flavor: StackFlavor;
}

export interface ProvisionResult {
  paths: StackPaths;
  /** False when the stamp matched and nothing was done. */
  built: boolean;
  durationMs: number;
  stamp: StackStamp;
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

async function build(paths: StackPaths, options: ProvisionOptions, log: Logger): Promise<StackStamp> {
  const signal = options.signal;
  const timeoutMs = options.commandTimeoutMs ?? DEFAULT_PROVISION_COMMAND_TIMEOUT_MS;
  const run = { signal, timeoutMs };
  const spec = FLAVOR_SPECS[options.flavor];
  const host = await readHostSource(options);

  const patchelf = await ensurePatchelf(paths, host, run, log);

  const apt = await privateApt(paths.root, spec.suite, 'thaw.sources', renderPrivateSources(host, spec.suite), run);
  log.info('fetching package lists', { suite: spec.suite, uri: host.uri });
  await apt.aptGet(['-q', 'update'], `apt-get update (${spec.suite})`);

  const closure = parseDependsClosure((await apt.aptCache(['depends', '--recurse', '--no-recommends', '--no-suggests',
    '--no-conflicts', '--no-breaks', '--no-replaces', '--no-enhances', ...CLOSURE_ROOTS], 'resolve dependency closure')).stdout);
  const wanted = [...new Set([...closure, ...STANDALONE, ...Object.keys(spec.pins)])].sort();
  const policy = parseAptPolicy((await apt.aptCache(['policy', ...wanted], 'resolve versions')).stdout);
  const { chosen, warnings } = chooseVersions(wanted, spec, policy, log);
  const debs = await fetchDebs(apt, chosen, log);

  // Build beside the final place (same filesystem, so the swap is a rename).
  await cleanLeftovers(paths);
  const tmp = await mkdtemp(path.join(paths.root, `.${options.flavor}.tmp-`));
  let swapped = false;
  try {
    await chmod(tmp, 0o755);
    await unpackDebs(debs, tmp, run);
    await patchExecutables(tmp, paths.prefix, patchelf, run);
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

async function makeBinLinks(tree: string): Promise<void> {
  const binDir = path.join(tree, 'bin');
  await mkdir(binDir, { recursive: true, mode: 0o755 });
  for (const [name, rel] of Object.entries(BIN_LINKS)) {
    if (!(await exists(path.join(tree, rel)))) {
      throw new StackError(StackErrorCode.PROVISION_FAILED, `${rel} is not in the unpacked packages`, {
        step: 'link bin/', evidence: { name, expected: rel },
      });
    }
    await symlink(path.relative('bin', rel), path.join(binDir, name));
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
      errorCode: StackErrorCode.CHECK_FAILED,
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
    throw new StackError(StackErrorCode.CHECK_FAILED, `criu check did not say "Looks good" (exit ${criuCheck.exitCode})`, {
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

