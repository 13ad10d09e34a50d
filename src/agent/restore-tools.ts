/**
 * The files a restore reads besides its checkpoint: the create-runtime hook's modules, thaw-pause, and the
 * executables the hook and the engine run (CRIU, nsenter, mount, ...) with their dynamic loader and libraries.
 *
 * Why it matters: with the page cache cold, the checkpoint's prefetch keeps the disk's queue full, and every
 * page fault of these small files waits behind it. On the H100 host (2026-11-27) the hook took 600 ms instead
 * of 110 ms that way, and CRIU started late. Read first, they cost tens of ms (a few MB).
 */
import { execFile } from 'node:child_process';
import { readFile, realpath } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import { promisify } from 'node:util';
import { DEFAULT_NSENTER_PATH, DEFAULT_UNSHARE_PATH } from '../defaults.js';
import { elfInterpreter } from '../elf.js';
import { DEFAULT_MOUNT_PATH, DEFAULT_UMOUNT_PATH } from '../oci-hooks/index.js';
import { DEFAULT_SETPRIV_PATH, DEFAULT_SH_PATH } from '../restore-engine/index.js';

const execFileP = promisify(execFile);

/**
 * The host programs thaw's root processes run by absolute path (docs/security.md, "Helpers and CRIU run on the
 * host"): the restore chain (setpriv → sh → nsenter → unshare → CRIU) and the create-runtime hook's mount and
 * umount. `thaw doctor` checks each is a host binary nobody but root can replace. `required: false`: thaw works
 * without it, in a lesser way (no setpriv: a CRIU outlives a killed agent).
 */
export const HOST_HELPERS: ReadonlyArray<{ name: string; path: string; required: boolean; role: string }> = [
  { name: 'nsenter', path: DEFAULT_NSENTER_PATH, required: true, role: 'joins the target\'s PID, IPC and UTS namespaces for CRIU' },
  { name: 'unshare', path: DEFAULT_UNSHARE_PATH, required: true, role: 'gives CRIU a private copy of the host\'s mount namespace' },
  { name: 'sh', path: DEFAULT_SH_PATH, required: true, role: 'moves the restorer into the target\'s cgroups' },
  { name: 'mount', path: DEFAULT_MOUNT_PATH, required: true, role: 'the create-runtime hook\'s thaw-pause overlay' },
  { name: 'umount', path: DEFAULT_UMOUNT_PATH, required: true, role: 'removes the thaw-pause overlay' },
  { name: 'setpriv', path: DEFAULT_SETPRIV_PATH, required: false, role: 'CRIU dies with the agent' },
];

/** One `ld.so --list` run; a loader that hangs must not hold the prefetch. */
export const LOADER_LIST_TIMEOUT_MS = 5_000;
/** An import graph bigger than this is not the hook's: stop following it. */
const MAX_MODULES = 500;

export interface RestoreToolsOptions {
  /** The hook's argv ([node, main.js]): the modules main.js imports, transitively, are read (not node itself: the agent runs from it, so it is cached). */
  hookArgv: readonly string[];
  thawPausePath: string;
  /** Dynamically linked executables a restore runs: each with its loader and the libraries the loader resolves. */
  executables: readonly string[];
}

/** The libraries in the output of `ld.so --list <exe>` (glibc's loader; the same lines as ldd's). Pure. */
export function parseLoaderList(text: string): string[] {
  const paths = new Set<string>();
  for (const line of text.split('\n')) {
    // "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "\t/lib64/ld-linux-x86-64.so.2 (0x...)"
    const m = /^\s*(?:\S+\s+=>\s+)?(\/\S+)\s+\(0x[0-9a-f]+\)\s*$/.exec(line);
    if (m?.[1]) paths.add(m[1]);
  }
  return [...paths];
}

/** Relative module specifiers of an ES module's static and dynamic imports (compiled output: plain strings). Pure. */
export function relativeImports(source: string): string[] {
  const found = new Set<string>();
  const patterns = [/\bfrom\s*['"](\.{1,2}\/[^'"]+)['"]/g, /\bimport\s*\(\s*['"](\.{1,2}\/[^'"]+)['"]\s*\)/g, /^\s*import\s*['"](\.{1,2}\/[^'"]+)['"]/gm];
  for (const re of patterns) for (const m of source.matchAll(re)) if (m[1]) found.add(m[1]);
  return [...found];
}

/** `entry` and every module it imports through relative specifiers, transitively (absolute paths). */
export async function moduleGraph(entry: string): Promise<string[]> {
  const seen = new Set<string>();
  const queue = [resolve(entry)];
  while (queue.length > 0 && seen.size < MAX_MODULES) {
    const file = queue.shift() as string;
    if (seen.has(file)) continue;
    let source: string;
    try {
      source = await readFile(file, 'utf8');
    } catch {
      continue; // not there: nothing to read ahead
    }
    seen.add(file);
    for (const spec of relativeImports(source)) queue.push(resolve(dirname(file), spec));
  }
  return [...seen];
}

/** An executable, its ELF interpreter and the libraries the interpreter resolves for it; [exe] when static or not ELF. */
export async function executableFiles(exe: string): Promise<string[]> {
  const real = await realpath(exe);
  const interpreter = await elfInterpreter(real).catch(() => undefined);
  if (interpreter === undefined) return [real];
  try {
    const { stdout } = await execFileP(interpreter, ['--list', real], { timeout: LOADER_LIST_TIMEOUT_MS, env: {} });
    return [real, interpreter, ...parseLoaderList(stdout)];
  } catch {
    return [real, interpreter];
  }
}

/** Every file of RestoreToolsOptions, each once, real paths where they resolve. */
export async function restoreToolFiles(o: RestoreToolsOptions): Promise<string[]> {
  const files: string[] = [];
  const hookMain = o.hookArgv[1];
  if (hookMain !== undefined && isAbsolute(hookMain) && hookMain.endsWith('.js')) files.push(...(await moduleGraph(hookMain)));
  files.push(o.thawPausePath);
  for (const exe of o.executables) files.push(...(await executableFiles(exe).catch(() => [])));
  const unique = new Set<string>();
  for (const f of files) unique.add(await realpath(f).catch(() => f));
  return [...unique];
}
