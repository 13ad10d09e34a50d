/**
 * The weights service in the flows (docs/weights.md): what a checkpoint records of the worker's weights
 * regions, and how a restore opens their sources from the first moment it knows the container.
 *
 * Checkpoint (`recordWeights`): the worker's `<control dir>/weights-regions.json` is read as hostile input
 * (regions-file.ts), and every file source is opened by root inside the container's own root
 * (`/proc/<pid>/root`, RESOLVE_IN_ROOT: its image and its mounts, nothing outside), checked to be a regular
 * file of the size the worker claims, and hashed through the node's SourceDigests (once per node, stamped
 * by file identity). A digest that differs from the worker's claim fails the checkpoint: the manifest
 * records only what thaw verified. The worker released the file allocations before ready-for-checkpoint,
 * so neither CRIU's image nor the driver's device-state copy holds them.
 *
 * Restore (`restoreSourceOpener`): a source under one of the container's bind mounts whose host directory
 * is at or below a model directory the agent's config allows is opened from that directory (no symlink
 * followed) at once - from CreateContainer on, before the container has a process. Any other source is
 * in the container's rootfs, which exists once the container runs: it opens inside `/proc/<pid>/root`
 * when the flow hands the pid over (`rootReady`). A source that no allowed model directory has is looked up in
 * the node's weights cache by its recorded sha256 (`weightsCache`: the sources that came with a checkpoint
 * pulled with weights layers, store/oci/weights-cache.ts), before the rootfs: same checks (no symlink, a
 * regular file of the recorded size; the loader checks the sha256 as it reads).
 */
import { closeSync, constants, openSync } from 'node:fs';
import { posix } from 'node:path';

import { FsAt, O_NONBLOCK, O_RDONLY } from '../../sys/fs-at.js';
import { WeightsError, WeightsErrorCode } from './errors.js';
import { parseWeightsRegions, readWeightsFile, WEIGHTS_SCHEMA, type WeightsRegionSpec } from './regions-file.js';
import type { SourceDigests } from './source-digests.js';
import { SourceFile } from './sources.js';

/** The manifest's `weights` section: the regions in the weights file's own format, plus their file bytes. */
export interface ManifestWeightsDoc {
  schema: typeof WEIGHTS_SCHEMA;
  regions: unknown[];
  /** Bytes of every file source (what a restore reads instead of CRIU). */
  bytes: number;
}

/** The regions as the weights file writes them (the VA in hex: JSON numbers stop at 2^53). */
export function weightsDoc(regions: readonly WeightsRegionSpec[]): ManifestWeightsDoc {
  let bytes = 0;
  const out = regions.map((r) => ({
    name: r.name,
    device: r.device,
    va: `0x${r.va.toString(16)}`,
    size: r.size,
    granularity: r.granularity,
    allocations: r.allocations.map((a) => {
      if (a.source) bytes += a.source.length;
      return { offset: a.offset, size: a.size, kind: a.kind, ...(a.source ? { source: { ...a.source } } : {}) };
    }),
  }));
  return { schema: WEIGHTS_SCHEMA, regions: out, bytes };
}

/** The manifest's weights section validated again (it crossed a store or a registry): every field checked. */
export function regionsOfManifest(doc: unknown): WeightsRegionSpec[] {
  if (typeof doc !== 'object' || doc === null) {
    throw new WeightsError(WeightsErrorCode.FILE_INVALID, 'the manifest\'s weights section is not an object', { step: 'read the manifest\'s weights' });
  }
  const { schema, regions } = doc as { schema?: unknown; regions?: unknown };
  return parseWeightsRegions({ schema, regions });
}

/** Opens the container's root directory (`/proc/<pid>/root`: the root of its mount namespace). */
export function openContainerRoot(pid: number, procRoot = '/proc'): number {
  return openSync(`${procRoot}/${pid}/root`, constants.O_RDONLY | constants.O_DIRECTORY);
}

export interface RecordWeightsOptions {
  controlDir: string;
  /** Host pid of the container's init: sources open inside its root. */
  pid: number;
  digests: SourceDigests;
  procRoot?: string;
  fsAt?: FsAt;
}

/**
 * The manifest's weights section for a worker about to be checkpointed, or undefined when it registered no
 * weights regions. Throws WeightsError (FILE_INVALID, SOURCE_MISSING, SOURCE_CHANGED): the checkpoint then
 * fails and the worker, told `checkpoint-complete {ok: false}`, reloads its weights from the files.
 */
export async function recordWeights(o: RecordWeightsOptions): Promise<ManifestWeightsDoc | undefined> {
  const regions = await readWeightsFile(o.controlDir);
  if (regions === undefined || regions.length === 0) return undefined;
  const fsAt = o.fsAt ?? FsAt.load();
  const rootFd = openContainerRoot(o.pid, o.procRoot);
  try {
    // Every source at once: each is hashed on its own thread (only the first time on this node: stamped after).
    const checks = regions.flatMap((region) =>
      region.allocations.flatMap((alloc) => (alloc.kind === 'file' && alloc.source ? [alloc.source] : [])),
    );
    const settled = await Promise.allSettled(
      checks.map(async (src) => {
        let file: SourceFile;
        try {
          file = new SourceFile(fsAt.openInRoot(rootFd, src.path, O_RDONLY | O_NONBLOCK));
        } catch (err) {
          throw new WeightsError(WeightsErrorCode.SOURCE_MISSING, `cannot open ${src.path} inside the container`, { step: 'record the weights', cause: err, evidence: { path: src.path } });
        }
        try {
          const st = await file.stat();
          if (!st.isFile() || st.size !== src.fileSize) {
            throw new WeightsError(WeightsErrorCode.SOURCE_CHANGED, `${src.path} is not the ${src.fileSize}-byte regular file the worker loaded`, {
              step: 'record the weights',
              evidence: { path: src.path, size: st.size, recorded: src.fileSize },
            });
          }
          const sha = await o.digests.digest(file);
          if (sha !== src.sha256) {
            throw new WeightsError(WeightsErrorCode.SOURCE_CHANGED, `${src.path} has another sha256 than the worker loaded`, {
              step: 'record the weights',
              evidence: { path: src.path, sha256: sha, claimed: src.sha256 },
            });
          }
        } finally {
          await file.close().catch(() => undefined);
        }
      }),
    );
    const failed = settled.find((x): x is PromiseRejectedResult => x.status === 'rejected');
    if (failed) throw failed.reason;
  } finally {
    closeSync(rootFd);
  }
  return weightsDoc(regions);
}

/** A bind mount of the container (NRI CreateContainer's mounts): host `source` at container `destination`. */
export interface ContainerBindMount {
  destination: string;
  source: string;
}

export interface RestoreSourceOpenerOptions {
  /** The container's bind mounts. */
  mounts: readonly ContainerBindMount[];
  /** Host directories the agent's config allows weights to be read from (absolute, normal). */
  modelDirs: readonly string[];
  /** Resolves to the container's root dir fd once it runs (the flow's run); rejects when it never will. */
  rootReady: Promise<number>;
  /**
   * The node's weights cache (entries `<dir>/<sha256 hex>`), and a promise that settles once what the restore is
   * waiting for is in it (a pull under way brings its weights layers there before it publishes the checkpoint).
   */
  weightsCache?: { dir: string; ready?: Promise<unknown> };
  fsAt?: FsAt;
}

function isUnder(path: string, dir: string): boolean {
  return path === dir || path.startsWith(dir.endsWith('/') ? dir : `${dir}/`);
}

/**
 * The restore's opener: `open(path)` resolves a source as the container will see it. Returns the opener and
 * `close()`, which closes the directory fds it opened (the root fd stays the caller's).
 */
export function restoreSourceOpener(o: RestoreSourceOpenerOptions): { open: (path: string, want?: { sha256: string; fileSize: number }) => Promise<SourceFile>; close: () => void } {
  const fsAt = o.fsAt ?? FsAt.load();
  const dirFds = new Map<string, number>();
  const modelDirFd = (dir: string): number => {
    let fd = dirFds.get(dir);
    if (fd === undefined) {
      fd = openSync(dir, constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW);
      dirFds.set(dir, fd);
    }
    return fd;
  };
  // The most specific mount wins, as in the container's own view.
  const mounts = [...o.mounts]
    .filter((m) => posix.isAbsolute(m.destination) && posix.normalize(m.destination) === m.destination && posix.isAbsolute(m.source))
    .sort((a, b) => b.destination.length - a.destination.length);
  const SHA256_HEX = /^[0-9a-f]{64}$/;
  let cacheFd: number | undefined;
  /** The cache's entry of that content and size, open; undefined when it has none (or no cache is configured). */
  const openCached = async (want: { sha256: string; fileSize: number } | undefined): Promise<SourceFile | undefined> => {
    const cache = o.weightsCache;
    if (cache === undefined || want === undefined || !SHA256_HEX.test(want.sha256)) return undefined;
    await cache.ready?.catch(() => undefined);
    let fd: number;
    try {
      cacheFd ??= openSync(cache.dir, constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW);
      fd = fsAt.openBeneath(cacheFd, want.sha256, O_RDONLY | O_NONBLOCK);
    } catch {
      return undefined;
    }
    const file = new SourceFile(fd);
    const st = await file.stat().catch(() => undefined);
    if (st === undefined || !st.isFile() || st.size !== want.fileSize) {
      await file.close().catch(() => undefined);
      return undefined;
    }
    return file;
  };
  const open = async (path: string, want?: { sha256: string; fileSize: number }): Promise<SourceFile> => {
    const mount = mounts.find((m) => isUnder(path, m.destination));
    const source = mount ? posix.normalize(mount.source) : undefined;
    const dir = source !== undefined ? o.modelDirs.find((d) => isUnder(source, d)) : undefined;
    let fd: number;
    if (mount && source !== undefined && dir !== undefined) {
      // Host path = mount source + the rest; opened below the allowed dir with no symlink anywhere.
      const rel = posix.join(posix.relative(dir, source), posix.relative(mount.destination, path));
      try {
        fd = fsAt.openBeneath(modelDirFd(dir), rel === '' ? '.' : rel, O_RDONLY | O_NONBLOCK);
      } catch (err) {
        // Not in the model dir (this node never had it): the weights cache may.
        const cached = await openCached(want);
        if (cached !== undefined) return cached;
        throw err;
      }
    } else {
      const cached = await openCached(want);
      if (cached !== undefined) return cached;
      if (mount && source !== undefined && mount.destination !== '/') {
        // A host mount the config does not allow: root would read what the pod's user maybe could not.
        throw new Error(`${path} is on a host mount (${source}) outside the allowed model directories`);
      }
      fd = fsAt.openInRoot(await o.rootReady, path, O_RDONLY | O_NONBLOCK);
    }
    const file = new SourceFile(fd);
    const st = await file.stat().catch(async (err: unknown) => {
      await file.close();
      throw err;
    });
    if (!st.isFile()) {
      await file.close();
      throw new Error(`${path} is not a regular file`);
    }
    return file;
  };
  return {
    open,
    close: () => {
      for (const fd of dirFds.values()) closeSync(fd);
      dirFds.clear();
      if (cacheFd !== undefined) closeSync(cacheFd);
      cacheFd = undefined;
    },
  };
}

