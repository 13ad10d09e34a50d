/**
 * The local checkpoint store's layout and path safety (design.md, Store): one directory per checkpoint under a
 * root (default /var/lib/thaw/checkpoints):
 *
 *   <root>/<name>/manifest.json        see manifest.ts
 *   <root>/<name>/criu/                CRIU image files
 *   <root>/<name>/rootfs-diff.tar      the container's overlay upperdir
 *   <root>/<name>/deleted-files.json   the upperdir's whiteouts
 *   <root>/.tmp-<name>-<pid>-<start>-<random>/  a checkpoint being written, or an old one being removed
 *   <root>/.leases/<name>@<pid>-<start>-<token>  "this process is reading <name>" (leases.ts)
 *   <root>/.verified/<name>.json       the file identities last hashed (verify.ts)
 *   <root>/.restore-failed/<name>.json a restore of this manifest failed here (restore-failures.ts)
 *
 * Directories are 0700 and files 0600, owned by root: a checkpoint is process memory, secrets included.
 *
 * Path safety: names pass the checkpoint name rule; every path is resolved under the root and checked to
 * stay there; checkpoint files are opened with O_NOFOLLOW and any symlink, device or FIFO found inside a
 * checkpoint directory is refused (STORE_PATH_ESCAPE), so a planted link cannot make thaw read, hash or
 * chmod a file outside the store.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync, type Stats } from 'node:fs';
import { lstat, readdir } from 'node:fs/promises';
import { join, resolve, sep } from 'node:path';
import { checkCheckpointName } from '../checkpoint-name.js';
import { StoreError, StoreErrorCode } from './errors.js';
import { CRIU_DIR_NAME, DELETED_FILES_FILE_NAME, MANIFEST_FILE_NAME, ROOTFS_DIFF_FILE_NAME, type Manifest } from './manifest.js';

export const CHECKPOINT_DIR_MODE = 0o700;
export const CHECKPOINT_FILE_MODE = 0o600;

export const TMP_PREFIX = '.tmp-';
export const LEASES_DIR_NAME = '.leases';
export const TMP_PATTERN = /^\.tmp-(.+)-(\d+)-(\d+)-([0-9a-f]{16})$/;
export const LEASE_PATTERN = /^(.+)@(\d+)-(\d+)-([0-9a-f]{8})$/;

export interface CheckpointPaths {
  dir: string;
  manifest: string;
  criuDir: string;
  rootfsDiff: string;
  deletedFiles: string;
}

export interface OpenedCheckpoint {
  name: string;
  manifest: Manifest;
  paths: CheckpointPaths;
}

export function pathsOf(dir: string): CheckpointPaths {
  return {
    dir,
    manifest: join(dir, MANIFEST_FILE_NAME),
    criuDir: join(dir, CRIU_DIR_NAME),
    rootfsDiff: join(dir, ROOTFS_DIFF_FILE_NAME),
    deletedFiles: join(dir, DELETED_FILES_FILE_NAME),
  };
}

/**
 * A process's start time (field 22 of /proc/<pid>/stat, in clock ticks since boot), or undefined when it is
 * gone. pid + start time names one process for good: a reused pid has another start time.
 */
export function processStartTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command (which may contain spaces and ')'): state is field 3, starttime field 22.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

/** Whether the process named by pid and start time (a `.tmp-*` or lease name's writer) still runs. */
export function sameProcessRunning(pid: number, startTime: string): boolean {
  return processStartTime(pid) === startTime;
}

/** Names and paths under one store root; every path it returns is checked to stay under the root. */
export class StoreLayout {
  readonly root: string;
  /** This process, as `<pid>-<start time>`, in `.tmp-*` and lease names (see recover). */
  readonly processTag: string;

  constructor(root: string) {
    this.root = root;
    this.processTag = `${process.pid}-${processStartTime(process.pid) ?? '0'}`;
  }

  /**
   * Validates a name and returns `<root>/<name>`; STORE_INVALID_NAME with the rule's reason otherwise. Callers
   * name their step without the name until it is valid: a bad name may hold NUL or escapes, and the reason
   * already quotes it.
   */
  dirOf(name: string, step = 'resolve checkpoint name'): string {
    const bad = checkCheckpointName(name);
    if (bad !== undefined) throw new StoreError(StoreErrorCode.INVALID_NAME, bad, { step, evidence: { name } });
    return this.inside(name, step);
  }

  /** Resolves `rel` under the root and refuses a result outside it. */
  inside(rel: string, step: string, base = this.root): string {
    const path = resolve(base, rel);
    if (!path.startsWith(this.root + sep)) {
      throw new StoreError(StoreErrorCode.PATH_ESCAPE, `${JSON.stringify(rel)} resolves outside the store (${path})`, {
        step,
        evidence: { rel, path },
      });
    }
    return path;
  }

  newTmpName(name: string): string {
    return `${TMP_PREFIX}${name}-${this.processTag}-${randomBytes(8).toString('hex')}`;
  }
}

export interface Tree {
  /** Relative posix paths of regular files, sorted. */
  files: Array<{ path: string; stats: Stats }>;
  /** Relative paths of directories, parents before children ('' is the top). */
  dirs: Array<{ path: string; stats: Stats }>;
}

/** Lists a checkpoint directory with lstat, refusing anything but regular files and directories. */
export async function walk(top: string, step: string): Promise<Tree> {
  const tree: Tree = { files: [], dirs: [{ path: '', stats: await lstat(top) }] };
  const visit = async (rel: string): Promise<void> => {
    const entries = await readdir(join(top, rel));
    entries.sort();
    for (const entry of entries) {
      const childRel = rel === '' ? entry : `${rel}/${entry}`;
      const st = await lstat(join(top, childRel));
      if (st.isDirectory()) {
        tree.dirs.push({ path: childRel, stats: st });
        await visit(childRel);
      } else if (st.isFile()) {
        tree.files.push({ path: childRel, stats: st });
      } else {
        const kind = st.isSymbolicLink() ? 'a symlink' : 'not a regular file or directory';
        throw new StoreError(StoreErrorCode.PATH_ESCAPE, `${childRel} is ${kind} (a checkpoint holds only files and directories)`, {
          step,
          evidence: { path: join(top, childRel), mode: st.mode },
        });
      }
    }
  };
  await visit('');
  return tree;
}
