/**
 * The local checkpoint store's layout and path safety (design.md, Store): one directory per checkpoint under a
 * root (default /var/lib/thaw/checkpoints), checkpoints owned by a namespace under that namespace's directory,
 * pulled ones in their own area. A checkpoint is named by its store key (src/checkpoint-name.ts):
 * `namespace/name` or `oci-<64 hex>`.
 *
 *   <root>/<namespace>/<name>/manifest.json        see manifest.ts
 *   <root>/<namespace>/<name>/criu/                CRIU image files
 *   <root>/<namespace>/<name>/rootfs-diff.tar      the container's overlay upperdir
 *   <root>/<namespace>/<name>/deleted-files.json   the upperdir's whiteouts
 *   <root>/.oci/oci-<hex>/                         a pulled checkpoint (the same files, and the registry manifest)
 *   <root>/.tmp-<key>-<pid>-<start>-<random>/      a checkpoint being written, or an old one being removed
 *   <root>/.leases/<key>@<pid>-<start>-<token>     "this process is reading <key>" (leases.ts)
 *   <root>/.verified/<key>.json                    the file identities last hashed (verify.ts)
 *   <root>/.restore-failed/<key>.json              a restore of this manifest failed here (restore-failures.ts)
 *   <root>/.weights/sha256/<hex>                   the weights cache (weights-cache.ts)
 *   <root>/.used/<key>                             its mtime: when the checkpoint was last published or leased (gc.ts)
 *   <root>/.unowned/<name>/                        a checkpoint of the old flat layout that recorded no namespace
 *                                                  (migrate.ts): restores nowhere, kept for the operator
 *
 * In file names (`.tmp-*`, leases, stamps) a key's '/' is written '+', which neither part of a key may hold.
 * Entries of the root that begin with '.' are the store's own; every other one is a namespace (a DNS label never
 * begins with '.').
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
import { parseStoreKey } from '../checkpoint-name.js';
import { StoreError, StoreErrorCode } from './errors.js';
import { CRIU_DIR_NAME, DELETED_FILES_FILE_NAME, MANIFEST_FILE_NAME, ROOTFS_DIFF_FILE_NAME, type Manifest } from './manifest.js';

export const CHECKPOINT_DIR_MODE = 0o700;
export const CHECKPOINT_FILE_MODE = 0o600;

export const TMP_PREFIX = '.tmp-';
export const LEASES_DIR_NAME = '.leases';
/** Where pulled checkpoints (`oci-<hex>`) live. */
export const PULLED_DIR_NAME = '.oci';
/** Checkpoints of the old flat layout that recorded no namespace (migrate.ts). */
export const UNOWNED_DIR_NAME = '.unowned';

/** A store key as it appears in a file name ('/' → '+'). */
export function keyToFileName(key: string): string {
  return key.replace('/', '+');
}

/** The store key a file name holds (the inverse of keyToFileName). */
export function keyFromFileName(text: string): string {
  return text.replace('+', '/');
}
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
  /** Its store key: `namespace/name`, or `oci-<hex>` for a pulled checkpoint. */
  name: string;
  /** The namespace that owns it (the directory it is in); undefined for a pulled checkpoint. */
  namespace?: string;
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
   * Validates a store key and returns its directory (`<root>/<namespace>/<name>`, `<root>/.oci/oci-<hex>`);
   * STORE_INVALID_NAME with the rule's reason otherwise. Callers name their step without the key until it is
   * valid: a bad one may hold NUL or escapes, and the reason already quotes it.
   */
  dirOf(key: string, step = 'resolve checkpoint name'): string {
    const parsed = parseStoreKey(key);
    if ('reason' in parsed) throw new StoreError(StoreErrorCode.INVALID_NAME, parsed.reason, { step, evidence: { name: key } });
    return this.inside(parsed.kind === 'pulled' ? join(PULLED_DIR_NAME, parsed.name) : join(parsed.namespace, parsed.name), step);
  }

  /** The directory holding the key's checkpoint directory (`<root>/<namespace>` or `<root>/.oci`). */
  parentOf(key: string, step = 'resolve checkpoint name'): string {
    return resolve(this.dirOf(key, step), '..');
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

  newTmpName(key: string): string {
    return `${TMP_PREFIX}${keyToFileName(key)}-${this.processTag}-${randomBytes(8).toString('hex')}`;
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
