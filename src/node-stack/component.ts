/**
 * A prefix of Debian packages that is not a containerd stack: the tests' OCI registry and the peer tools
 * (cosign, oras, ...). The same build as a stack prefix (private apt, `dpkg-deb -x`, patchelf onto the
 * prefix's own loader, swap by rename, check, then the stamp) for a fixed package list without a
 * dependency closure: each component names exactly the packages its binaries need (libc6 of the same
 * suite included), so it runs the same on Debian 12 and 13.
 */
import { constants as fsConstants } from 'node:fs';
import { access, chmod, mkdir, mkdtemp, readdir, readFile, rename, rm, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { silentLogger, type Logger } from '../log.js';
import { chooseVersions, fetchDebs, parseAptPolicy, privateApt, readHostSource, renderPrivateSources, type SuiteSpec } from './apt.js';
import { StackErrorCode } from './errors.js';
import { runCommand } from './exec.js';
import { acquireLock } from './lock.js';
import { DEFAULT_STACK_ROOT, STAMP_FILE, stackPaths } from './paths.js';
import { chmodDirs, ensurePatchelf, patchExecutables, unpackDebs } from './prefix-patch.js';
import {
  DEFAULT_PROVISION_COMMAND_TIMEOUT_MS, DEFAULT_PROVISION_LOCK_TIMEOUT_MS, PROVISION_FORMAT_VERSION, type ProvisionCommonOptions,
} from './provision-options.js';

export interface ComponentSpec extends SuiteSpec {
  /** Directory name under the stacks' root, and the stamp's `component`. */
  component: string;
  /**
   * Each binary the component provides and how it is checked: the prefix-relative file (linked as
   * `bin/<name>` when `link` is set) and the arguments of a run that must exit 0 (its output goes into
   * the stamp's versions).
   */
  binaries: Readonly<Record<string, { file: string; checkArgs: readonly string[] }>>;
  /** Link every binary as `<prefix>/bin/<name>` (one PATH entry for all of them). */
  link: boolean;
}

export interface ComponentStamp {
  formatVersion: number;
  component: string;
  suite: string;
  pins: Record<string, string>;
  packages: Record<string, string>;
  /** What each binary's check printed (the line naming a version, else its first line). */
  versions: Record<string, string>;
  warnings: string[];
  createdAt: string;
}

export function componentPrefix(spec: Pick<ComponentSpec, 'component'>, root: string = DEFAULT_STACK_ROOT): string {
  return path.join(path.resolve(root), spec.component);
}

export function componentBinary(spec: ComponentSpec, name: string, root: string = DEFAULT_STACK_ROOT): string {
  const prefix = componentPrefix(spec, root);
  const b = spec.binaries[name];
  if (!b) throw new Error(`component ${spec.component} has no binary ${name}`);
  return spec.link ? path.join(prefix, 'bin', name) : path.join(prefix, b.file);
}

/** The component's stamp when its prefix is complete and built from the current pins; else undefined. */
export async function isComponentProvisioned<S extends ComponentStamp = ComponentStamp>(spec: ComponentSpec,
  root: string = DEFAULT_STACK_ROOT): Promise<S | undefined> {
  const stampFile = path.join(componentPrefix(spec, root), STAMP_FILE);
  const stamp = await readFile(stampFile, 'utf8').then((t) => JSON.parse(t) as S, () => undefined);
  if (!stamp || stamp.formatVersion !== PROVISION_FORMAT_VERSION || stamp.component !== spec.component) return undefined;
  if (JSON.stringify(stamp.pins) !== JSON.stringify(spec.pins)) return undefined;
  try {
    await Promise.all(Object.keys(spec.binaries).map((n) => access(componentBinary(spec, n, root), fsConstants.X_OK)));
  } catch {
    return undefined;
  }
  return stamp;
}

function versionLine(text: string): string {
  const lines = text.split('\n').map((l) => l.trim()).filter((l) => l !== '');
  return lines.find((l) => /version/i.test(l) && /\d+\.\d+/.test(l)) ?? lines[0] ?? '';
}

/**
 * Provisions `<root>/<spec.component>`; returns at once when its stamp matches. Same lock, swap and
 * stamp discipline as provisionStack: a prefix without a stamp (written after every binary's check) is
 * never taken as complete. `extraStamp` adds fields to the stamp (the registry's `version`).
 */
export async function provisionComponent<S extends ComponentStamp = ComponentStamp>(spec: ComponentSpec, options: ProvisionCommonOptions,
  extraStamp: (versions: Record<string, string>) => Omit<S, keyof ComponentStamp> = () => ({}) as Omit<S, keyof ComponentStamp>,
): Promise<{ prefix: string; built: boolean; stamp: S }> {
  const log: Logger = (options.logger ?? silentLogger).child({ component: 'node-stack', flavor: spec.component });
  const root = path.resolve(options.root ?? DEFAULT_STACK_ROOT);
  const prefix = componentPrefix(spec, root);
  if (!options.force) {
    const stamp = await isComponentProvisioned<S>(spec, root);
    if (stamp) return { prefix, built: false, stamp };
  }
  await mkdir(root, { recursive: true, mode: 0o755 });
  const release = await acquireLock(path.join(root, `.${spec.component}.lock`),
    options.lockTimeoutMs ?? DEFAULT_PROVISION_LOCK_TIMEOUT_MS, options.signal);
  try {
    if (!options.force) {
      const stamp = await isComponentProvisioned<S>(spec, root);
      if (stamp) return { prefix, built: false, stamp };
    }
    const signal = options.signal;
    const timeoutMs = options.commandTimeoutMs ?? DEFAULT_PROVISION_COMMAND_TIMEOUT_MS;
    const run = { signal, timeoutMs };
    const host = await readHostSource(options);
    const patchelf = await ensurePatchelf(stackPaths('1.7', root), host, run, log);
    const apt = await privateApt(root, spec.suite, 'thaw.sources', renderPrivateSources(host, spec.suite), run);
    await apt.aptGet(['-q', 'update'], `apt-get update (${spec.suite})`);
    const wanted = Object.keys(spec.pins).sort();
    const policy = parseAptPolicy((await apt.aptCache(['policy', ...wanted], 'resolve versions')).stdout);
    const { chosen, warnings } = chooseVersions(wanted, spec, policy, log);
    const debs = await fetchDebs(apt, chosen, log);
    for (const f of await readdir(root)) {
      if (f.startsWith(`.${spec.component}.tmp-`)) await rm(path.join(root, f), { recursive: true, force: true });
    }
    const tmp = await mkdtemp(path.join(root, `.${spec.component}.tmp-`));
    let swapped = false;
    try {
      await chmod(tmp, 0o755);
      await unpackDebs(debs, tmp, run);
      await patchExecutables(tmp, prefix, patchelf, run);
      if (spec.link) {
        await mkdir(path.join(tmp, 'bin'), { recursive: true, mode: 0o755 });
        for (const [name, b] of Object.entries(spec.binaries)) await symlink(path.relative('bin', b.file), path.join(tmp, 'bin', name));
      }
      await chmodDirs(tmp);
      await rm(prefix, { recursive: true, force: true });
      await rename(tmp, prefix);
      swapped = true;
    } finally {
      if (!swapped) await rm(tmp, { recursive: true, force: true });
    }
    // Checked from the final place: the patched loader path only exists there.
    const versions: Record<string, string> = {};
    for (const [name, b] of Object.entries(spec.binaries)) {
      const r = await runCommand(componentBinary(spec, name, root), [...b.checkArgs], {
        step: `check ${name}`, signal, timeoutMs: 60_000, errorCode: StackErrorCode.CHECK_FAILED,
      });
      versions[name] = versionLine(`${r.stdout}\n${r.stderr}`);
    }
    const stamp = {
      formatVersion: PROVISION_FORMAT_VERSION,
      component: spec.component,
      suite: spec.suite,
      pins: { ...spec.pins },
      packages: chosen,
      versions,
      warnings,
      createdAt: new Date().toISOString(),
      ...extraStamp(versions),
    } as S;
    const stampFile = path.join(prefix, STAMP_FILE);
    await writeFile(`${stampFile}.tmp`, `${JSON.stringify(stamp, null, 2)}\n`, { mode: 0o644 });
    await rename(`${stampFile}.tmp`, stampFile);
    log.info('component provisioned', { prefix, versions });
    return { prefix, built: true, stamp };
  } finally {
    await release();
  }
}
