/**
 * Where a container's args[0] lives inside its rootfs, resolved the way runc's exec would find it (the
 * container's PATH for a bare name, process.cwd for a relative path), with every symlink followed INSIDE the
 * rootfs (an absolute link target restarts at the rootfs, `..` stops at it). The answer has no symlink left,
 * so a `mount --bind` onto `<rootfs>/<answer>` cannot follow one out of the rootfs onto a host file.
 */
import { constants as fsConstants } from 'node:fs';
import { lstat, readlink, access } from 'node:fs/promises';
import { join, posix } from 'node:path';
import { HookError, HookErrorCode } from './errors.js';

/** Linux's own limit on links followed in one lookup (MAXSYMLINKS). */
export const MAX_SYMLINKS = 40;
/** runc/Go use the process's PATH; an image without one gets the usual default here rather than nothing. */
export const DEFAULT_CONTAINER_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

/**
 * Resolves `path` (absolute, as the container sees it) inside `rootfs`. Returns the resolved absolute
 * container path, or undefined when a component is missing or not a directory. Throws after MAX_SYMLINKS.
 */
export async function resolveInRoot(rootfs: string, path: string): Promise<string | undefined> {
  const step = 'resolve path inside rootfs';
  const done: string[] = [];
  const todo = path.split('/').filter((s) => s !== '' && s !== '.');
  let links = 0;
  while (todo.length > 0) {
    const part = todo.shift() as string;
    if (part === '..') {
      done.pop(); // at the root, `..` stays at the root
      continue;
    }
    if (part === '.') continue;
    const host = join(rootfs, ...done, part);
    let st;
    try {
      st = await lstat(host);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') return undefined;
      throw new HookError(HookErrorCode.IO, `lstat ${host}: ${(err as Error).message}`, { step, cause: err });
    }
    if (st.isSymbolicLink()) {
      if (++links > MAX_SYMLINKS) {
        throw new HookError(HookErrorCode.ENTRYPOINT_NOT_FOUND, `more than ${MAX_SYMLINKS} symlinks resolving ${path}`, { step, evidence: { path } });
      }
      const target = await readlink(host);
      if (target.startsWith('/')) done.length = 0;
      todo.unshift(...target.split('/').filter((s) => s !== '' && s !== '.'));
      continue;
    }
    if (todo.length > 0 && !st.isDirectory()) return undefined;
    done.push(part);
  }
  return `/${done.join('/')}`;
}

async function executableFile(rootfs: string, containerPath: string): Promise<boolean> {
  const host = join(rootfs, containerPath);
  try {
    const st = await lstat(host);
    if (!st.isFile() || (st.mode & 0o111) === 0) return false;
    await access(host, fsConstants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * The container path of the file args[0] executes: a name with a '/' is taken as is (relative to `cwd`), a
 * bare name is searched in `pathEnv` (DEFAULT_CONTAINER_PATH when unset). HOOK_ENTRYPOINT_NOT_FOUND otherwise.
 */
export async function resolveEntrypoint(rootfs: string, argv0: string, pathEnv: string | undefined, cwd = '/'): Promise<string> {
  const step = 'resolve entrypoint';
  const candidates = argv0.includes('/')
    ? [posix.resolve(cwd, argv0)]
    : (pathEnv ?? DEFAULT_CONTAINER_PATH).split(':').map((dir) => posix.resolve(cwd, dir === '' ? '.' : dir, argv0));
  for (const candidate of candidates) {
    const resolved = await resolveInRoot(rootfs, candidate);
    if (resolved !== undefined && resolved !== '/' && (await executableFile(rootfs, resolved))) return resolved;
  }
  throw new HookError(HookErrorCode.ENTRYPOINT_NOT_FOUND, `${JSON.stringify(argv0)} is not an executable file inside the rootfs`, {
    step,
    evidence: { argv0, rootfs, tried: candidates },
  });
}
