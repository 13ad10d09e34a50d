/**
 * Making unpacked Debian packages run from a private prefix: patchelf from the machine's own distribution,
 * every dynamically linked executable pointed at the prefix's loader and libraries, directory modes that
 * let unprivileged children (runc init, CRIU's helpers) read the tree.
 */
import { chmod, lstat, mkdir, mkdtemp, readdir, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from '../log.js';
import { elfHasInterpreter } from '../elf.js';
import { privateApt, type HostAptSource } from './apt.js';
import { StackError, StackErrorCode } from './errors.js';
import { runCommand, tail } from './exec.js';
import { INTERPRETER_SUBPATH, LEGACY_INTERPRETER_SUBPATH, LIB_SUBDIRS, type StackPaths } from './paths.js';

export async function exists(p: string): Promise<boolean> {
  return stat(p).then(() => true, () => false);
}

/**
 * Gets patchelf from the machine's own distribution (its libraries are the host's, so it runs without
 * any patching) into `<root>/tools`. Returns its path.
 */
export async function ensurePatchelf(paths: Pick<StackPaths, 'root' | 'toolsDir' | 'patchelf'>, host: HostAptSource,
  opts: { signal?: AbortSignal; timeoutMs: number }, log: Logger): Promise<string> {
  const { signal, timeoutMs } = opts;
  const works = await runCommand(paths.patchelf, ['--version'], { step: 'patchelf --version', signal, allowFailure: true })
    .then((r) => r.exitCode === 0).catch(() => false);
  if (works) return paths.patchelf;
  log.info('fetching the host distribution\'s patchelf', { uri: host.uri });
  const apt = await privateApt(paths.root, 'host', path.basename(host.file).endsWith('.sources') ? 'host.sources' : 'host.list',
    host.text, { signal, timeoutMs });
  await apt.aptGet(['-q', 'update'], 'apt-get update (host suites)');
  const dl = await apt.aptGet(['-q', '--print-uris', 'download', 'patchelf'], 'resolve patchelf');
  const fileName = /'\S+'\s+(\S+\.deb)\s/.exec(dl.stdout)?.[1];
  await apt.aptGet(['-q', 'download', 'patchelf'], 'apt-get download patchelf', apt.archives);
  const deb = fileName ? path.join(apt.archives, fileName) : undefined;
  if (!deb || !(await exists(deb))) {
    throw new StackError(StackErrorCode.PROVISION_FAILED, 'apt-get download left no patchelf .deb', {
      step: 'apt-get download patchelf', evidence: { printUris: tail(dl.stdout, 500), archives: apt.archives },
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

/** Unpacks every `.deb` into `tree` (dpkg-deb -x: files only, no maintainer scripts). */
export async function unpackDebs(debs: Map<string, string>, tree: string, opts: { signal?: AbortSignal; timeoutMs: number }): Promise<void> {
  for (const [name, deb] of debs) {
    await runCommand('dpkg-deb', ['-x', deb, tree], { step: `dpkg -x ${name}`, signal: opts.signal, timeoutMs: opts.timeoutMs });
  }
}

/**
 * Every dynamically linked executable in `tree` (being built for the final place `prefix`) gets the
 * prefix's loader and a DT_RPATH into the prefix. Static executables and libraries are left as they are.
 */
export async function patchExecutables(tree: string, prefix: string, patchelf: string,
  opts: { signal?: AbortSignal; timeoutMs: number }): Promise<void> {
  // Debian 13's libc6 ships its loader under usr/lib; Debian 12's (not merged into /usr) under lib.
  const subpath = (await exists(path.join(tree, INTERPRETER_SUBPATH))) || !(await exists(path.join(tree, LEGACY_INTERPRETER_SUBPATH))) ? INTERPRETER_SUBPATH : LEGACY_INTERPRETER_SUBPATH;
  const interpreter = path.join(prefix, subpath);
  // DT_RPATH (--force-rpath), not DT_RUNPATH: RPATH also applies to the libraries' own dependencies
  // (CRIU's libgnutls needs libunistring.so.5, which Debian 12 lacks).
  const rpath = LIB_SUBDIRS.map((d) => path.join(prefix, d)).join(':');
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

/** Every directory of the tree 0755 (mkdtemp makes 0700; some packages ship 0700 directories). */
export async function chmodDirs(dir: string): Promise<void> {
  const st = await lstat(dir);
  if (!st.isDirectory()) return;
  if ((st.mode & 0o777) !== 0o755) await chmod(dir, 0o755);
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    if (entry.isDirectory()) await chmodDirs(path.join(dir, entry.name));
  }
}
