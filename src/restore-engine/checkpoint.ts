/**
 * The checkpoint flow (design.md, "Checkpoint", step 3): from the host, take a checkpoint of a running,
 * quiesced container and publish it in the local store.
 *
 *   inspect   /proc of the container's init: mounts and the external-mount plan, stdio, netns, RSS,
 *             command line (container-inspect.ts); the overlay upperdir from containerd's snapshot record,
 *             checked under the snapshotter root (rootfs-diff/containerd-upperdir.ts)
 *   weights   the worker's weights regions (weights/service.ts): sources verified inside the container and
 *             recorded in the manifest; their bytes are in neither CRIU's image nor the driver's state
 *   [cuda]    lock + checkpoint every process of the tree (cuda-steps.ts in the agent)
 *   dump      CRIU dump over RPC into <pending>/criu, always with --leave-running
 *   [cuda]    restore + unlock (also after a failed dump, so the worker can go on)
 *   zero      all-zero pages of private anonymous memory left out of the images (zero-pages.ts)
 *   rootfs    rootfs-diff.tar + deleted-files.json from the upperdir
 *   publish   manifest (sha256 of every file), fsync, atomic rename (store/local-store.ts)
 *   notify    `checkpoint-complete` (and Dynamo's `snapshot-complete`) in the control dir
 *
 * Why --leave-running even for `on-checkpoint: exit`: the worker exits by itself when it reads
 * checkpoint-complete. Were CRIU to kill it at the end of the dump, a checkpoint that fails after the
 * dump (rootfs diff, publish) would have killed a worker for nothing.
 *
 * Failure contract: nothing is half-published (the pending directory is aborted), the worker is never
 * killed, and a worker still waiting gets `checkpoint-complete` with `{ok: false, error}` so it resumes
 * serving (Dynamo only signals success and leaves a failed source blocked; thaw's rule is that a pod never
 * suffers from a checkpoint). The caller gets CHECKPOINT_FAILED naming the phase, with the cause's code
 * (CRIU_FAILED with CRIU's log lines, STORE_EXISTS, ...) in `evidence.causeCode` and the cause attached.
 */
import { readFileSync, readlinkSync } from 'node:fs';
import { lstat, mkdtemp, rm, stat } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';

import { errorMessage, isThawError, ThawError } from '../errors.js';
import type { Logger } from '../log.js';
import type { LocalStore, PendingCheckpoint } from '../store/index.js';
import type { GpuConstraints, Manifest, ManifestFields } from '../store/index.js';
import { readHostFacts } from '../sys/host-facts.js';
import { StoreError, StoreErrorCode } from '../store/index.js';
import { CHECKPOINT_COMPLETE } from '../sdk/index.js';
import { writeMarker } from '../sdk/index.js';
import type { CriuClient } from './criu/client.js';
import type { CgroupsMode, DumpOptions } from './criu/options.js';
import { inspectContainer, type ContainerInspection, type InspectOptions } from './container-inspect.js';
import { freezeCgroupOf } from './cgroup-freeze.js';
import { captureRootfsDiff, readContainerdUpperdir, type ContainerdEndpoint } from './rootfs-diff/index.js';
import { dropZeroPages } from './zero-pages.js';
import { compressLazyPages } from './compressed-pages.js';
import { CriuImageCodec } from './criu/images.js';
import { restoreLazyMarks } from './lazy-marks.js';
import { writeFillPlanImage } from './memory-fill.js';
import { MAX_TIMER_DELAY_MS } from '../defaults.js';
import { throwIfAborted } from '../util.js';
import { CheckpointErrorCode } from './restore-errors.js';
import { recordWeights, type ManifestWeightsDoc } from './weights/service.js';
import type { SourceDigests } from './weights/source-digests.js';
export { CheckpointErrorCode } from './restore-errors.js';

/** The whole flow, dump included, gives up after this (a 100 GB host-memory dump fits). */
export const DEFAULT_CHECKPOINT_TIMEOUT_MS = 30 * 60_000;
/** The `External` key of a pod's own network namespace (restore-recipe.md: `net[<inode>]:extnet`). */
export const NETNS_EXTERNAL_KEY = 'extnet';
export const DUMP_LOG_FILE = 'dump.log';


export class CheckpointError extends ThawError {
  declare readonly code: CheckpointErrorCode;
  constructor(code: CheckpointErrorCode, message: string, options: { step: string; cause?: unknown; evidence?: Record<string, unknown> }) {
    super(code, message, options);
    this.name = 'CheckpointError';
  }
}

export type CheckpointPhase = 'precheck' | 'inspect' | 'weights' | 'cuda-checkpoint' | 'dump' | 'cuda-restore' | 'zero-pages' | 'compress-pages' | 'rootfs-diff' | 'publish';
export type OnCheckpoint = 'continue' | 'exit';

/**
 * The CUDA steps around the dump (src/agent/cuda-steps.ts builds them). Called with the tree's host pids:
 * lock + checkpoint before the dump; restoreAndUnlock after it, also when it failed (once lock ran).
 * `gpuConstraints`, asked at publish, is the manifest's `constraints.gpu`: undefined when the container had
 * no CUDA process (then a restore does no CUDA step).
 */
export interface CheckpointCudaHooks {
  lock(pids: readonly number[], signal: AbortSignal): Promise<void>;
  checkpoint(pids: readonly number[], signal: AbortSignal): Promise<void>;
  restoreAndUnlock(pids: readonly number[], signal: AbortSignal): Promise<void>;
  gpuConstraints?(): GpuConstraints | undefined;
}

/**
 * The CRIU dump settings thaw uses; recorded as the manifest's `criu.options` so the restore passes the
 * matching flags (CRIU refuses to restore file locks, external unix sockets or a shell job it was not told
 * about). Seen working here with CRIU 4.1.1, containerd 1.7.24, runc 1.1.5 (test/integration/checkpoint.test.ts).
 */
export interface CheckpointCriuSettings {
  /** The worker closed its connections before ready-for-checkpoint; established TCP is not carried. */
  tcpEstablished: boolean;
  fileLocks: boolean;
  extUnixSk: boolean;
  shellJob: boolean;
  linkRemap: boolean;
  /** Unlinked-but-open files up to this size go into the images. */
  ghostLimitBytes: number;
  manageCgroupsMode: CgroupsMode;
  logLevel: number;
}

export const DEFAULT_CHECKPOINT_CRIU_SETTINGS: Readonly<CheckpointCriuSettings> = {
  tcpEstablished: false,
  fileLocks: true,
  extUnixSk: true,
  shellJob: false,
  linkRemap: true,
  ghostLimitBytes: 512 * 1024 * 1024,
  manageCgroupsMode: 'soft',
  logLevel: 4,
};

export interface CheckpointSourceIdentity {
  /** Default: os.hostname(). */
  nodeHostname?: string;
  pod?: { name: string; namespace: string; uid: string };
  containerName: string;
  /** Default: the process's command line (argv). */
  command?: string[];
  /**
   * The container spec's process args (NRI CreateContainer's `args`): what a restore target's must equal.
   * Default [] — such a checkpoint restores into no pod (manifest.ts checkCompatibility).
   */
  args?: string[];
}

export interface CheckpointContainerOptions {
  store: LocalStore;
  criu: CriuClient;
  containerId: string;
  /** Host pid of the container's init (CRI ContainerStatus verbose `info.pid`, NRI PostStart `pid`). */
  pid: number;
  /** Host path of the container's control directory; checkpoint-complete is written there. */
  controlDir: string;
  checkpointName: string;
  onCheckpoint: OnCheckpoint;
  imageRef: string;
  imageDigest?: string;
  /** A `thaw.dev/snapshot` checkpoint: its name and key, recorded in the manifest (store/manifest.ts). */
  snapshot?: { name: string; key: string };
  source: CheckpointSourceIdentity;
  containerdVersion: string;
  criuVersion: string;
  logger: Logger;
  /** Replace a checkpoint of the same name atomically; without it an existing name fails the precheck. */
  replace?: boolean;
  cuda?: CheckpointCudaHooks;
  criuSettings?: Partial<CheckpointCriuSettings>;
  /** Parent of the per-checkpoint CRIU work dir (dump.log); default os.tmpdir(). Kept on failure. */
  workRoot?: string;
  inspect?: InspectOptions;
  /**
   * Where to ask containerd for the container's rootfs snapshot (its socket and root directory). The upperdir
   * comes from there, never from the container's own mountinfo; one that is not under the snapshotter root
   * fails the checkpoint in its inspect phase (ROOTFS_UPPERDIR_UNTRUSTED as the cause), before the worker is
   * touched. Failing rather than publishing without a diff: a restore would run the process against files
   * other than the ones it had, and thaw cannot tell which of them it needs.
   */
  containerd: ContainerdEndpoint;
  /**
   * Leave all-zero pages of private anonymous memory out of the dump (zero-pages.ts): smaller checkpoints,
   * faster restores, the same memory. Default true; a failure of this step only logs and keeps CRIU's images.
   */
  dropZeroPages?: boolean;
  /**
   * Compress the lazy pages into zstd frames (compressed-pages.ts): thaw-pack's path, its threads and zstd level.
   * Such a checkpoint restores only through thaw-fill (elsewhere its pods cold-start). Absent: the pages stay
   * plain. A failure of this step only logs and keeps the pages plain.
   */
  compressPages?: { binary: string; threads: number; level: number };
  /**
   * The weights service: the worker's weights regions (its weights file in the control dir) are verified and
   * recorded in the manifest, their sources hashed through these node-wide digests. Absent: a weights file is
   * ignored (the restored worker reloads from its files).
   */
  weights?: { digests: SourceDigests };
  /**
   * Called with the checkpoint's expected size (the container's resident memory, which CRIU's page images
   * hold) after the inspection and before anything is written or the worker is touched: makes room in the
   * store (collecting least recently used checkpoints) or throws (STORE_NO_ROOM), which fails the checkpoint
   * in its inspect phase with nothing left behind.
   */
  makeRoom?: (expectedBytes: number, signal: AbortSignal) => Promise<void>;
}

export interface CheckpointPhases {
  inspectMs: number;
  /** Verifying and recording the weights regions (absent without any). */
  weightsMs?: number;
  /** Bytes of weights left out of the checkpoint (their file sources). */
  weightsBytes?: number;
  cudaMs?: number;
  dumpMs: number;
  /** Scanning the dump for zero pages and rewriting it without them (absent when switched off). */
  zeroPagesMs?: number;
  /** Bytes of zero pages left out of the dump. */
  zeroPagesDroppedBytes?: number;
  /** Compressing the lazy pages (absent when off or when there was nothing to compress). */
  compressPagesMs?: number;
  /** The lazy pages' bytes, and their frames' (compressed-pages.ts). */
  compressedPagesBytes?: number;
  compressedFrameBytes?: number;
  rootfsDiffMs: number;
  publishMs: number;
  totalMs: number;
}

export interface CheckpointResult {
  manifest: Manifest;
  phases: CheckpointPhases;
  /** The CRIU work dir with dump.log (removed on success; this is where it was). */
  workDir: string;
}

const round = (ms: number): number => Math.max(0, Math.round(ms));

/** The caller's signal combined with the flow's deadline; `dispose` clears the timer. */
function deadlineSignal(signal: AbortSignal | undefined, timeoutMs: number): { signal: AbortSignal; dispose: () => void } {
  const controller = new AbortController();
  const timer = setTimeout(
    () => controller.abort(new Error(`checkpoint ran past its timeout of ${timeoutMs} ms`)),
    Math.min(Math.max(timeoutMs, 0), MAX_TIMER_DELAY_MS),
  );
  const onAbort = (): void => controller.abort(signal?.reason);
  if (signal?.aborted) onAbort();
  else signal?.addEventListener('abort', onAbort, { once: true });
  return {
    signal: controller.signal,
    dispose: () => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    },
  };
}

/** The manifest's `criu.options`: scalars only, named like DumpOptions. */
export function recordedCriuOptions(s: CheckpointCriuSettings, externalNetNs: boolean): Record<string, string | number | boolean> {
  return {
    leaveRunning: true,
    tcpEstablished: s.tcpEstablished,
    fileLocks: s.fileLocks,
    extUnixSk: s.extUnixSk,
    shellJob: s.shellJob,
    linkRemap: s.linkRemap,
    ghostLimitBytes: s.ghostLimitBytes,
    manageCgroupsMode: s.manageCgroupsMode,
    externalNetNs,
  };
}

/** The CRIU request of the dump: the settings, the external mounts, the netns when it is the pod's own. */
export function buildCheckpointDumpOptions(
  inspection: Pick<ContainerInspection, 'pid' | 'externalMounts' | 'netns'>,
  dirs: { imagesDir: string; workDir: string },
  s: CheckpointCriuSettings,
): DumpOptions {
  const dump: DumpOptions = {
    imagesDir: dirs.imagesDir,
    workDir: dirs.workDir,
    logFile: DUMP_LOG_FILE,
    logLevel: s.logLevel,
    pid: inspection.pid,
    leaveRunning: true,
    externalMounts: inspection.externalMounts.map((m) => ({ mountpoint: m.mountpoint, key: m.key })),
    tcpEstablished: s.tcpEstablished,
    fileLocks: s.fileLocks,
    extUnixSk: s.extUnixSk,
    shellJob: s.shellJob,
    linkRemap: s.linkRemap,
    ghostLimitBytes: s.ghostLimitBytes,
    manageCgroupsMode: s.manageCgroupsMode,
  };
  // A host-network pod shares the host's namespace: CRIU leaves a namespace it shares with itself alone.
  if (!inspection.netns.isHost) dump.externalNetNs = { inode: inspection.netns.inode, key: NETNS_EXTERNAL_KEY };
  return dump;
}

/**
 * Checkpoints container `opts.containerId` (init `opts.pid`) into `opts.store` under `opts.checkpointName`.
 * Call it once the worker wrote ready-for-checkpoint. Resolves with the published manifest and the phase
 * timings; rejects with CHECKPOINT_FAILED (see the file comment for what is guaranteed then). The signal
 * and `timeoutMs` (default DEFAULT_CHECKPOINT_TIMEOUT_MS) abort the flow; CRIU is killed, nothing is published.
 */
/**
 * The process's working directory as its container sees it and its real uid and gid (/proc/<pid>/cwd and
 * status), read at the dump; what cannot be read is left out (the check at restore then skips it).
 */
function processIdentity(pid: number): { cwd?: string; user?: { uid: number; gid: number } } {
  const out: { cwd?: string; user?: { uid: number; gid: number } } = {};
  try {
    const cwd = readlinkSync(`/proc/${pid}/cwd`);
    if (cwd.startsWith('/') && !cwd.endsWith(' (deleted)')) out.cwd = cwd;
  } catch {
    // gone or not ours to read: recorded without it
  }
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const uid = /^Uid:\s+(\d+)/m.exec(status)?.[1];
    const gid = /^Gid:\s+(\d+)/m.exec(status)?.[1];
    if (uid !== undefined && gid !== undefined) out.user = { uid: Number(uid), gid: Number(gid) };
  } catch {
    // as above
  }
  return out;
}

export async function checkpointContainer(
  opts: CheckpointContainerOptions,
  call: { signal?: AbortSignal; timeoutMs?: number } = {},
): Promise<CheckpointResult> {
  const name = opts.checkpointName;
  const log = opts.logger.child({ component: 'checkpoint', checkpoint: name, containerId: opts.containerId });
  const settings: CheckpointCriuSettings = { ...DEFAULT_CHECKPOINT_CRIU_SETTINGS, ...opts.criuSettings };
  const deadline = deadlineSignal(call.signal, call.timeoutMs ?? DEFAULT_CHECKPOINT_TIMEOUT_MS);
  const signal = deadline.signal;
  const t0 = performance.now();
  const phases: CheckpointPhases = { inspectMs: 0, dumpMs: 0, rootfsDiffMs: 0, publishMs: 0, totalMs: 0 };
  let phase: CheckpointPhase = 'precheck';
  let pending: PendingCheckpoint | undefined;
  let workDir = '';
  let inspection: ContainerInspection | undefined;
  let cudaLocked = false;

  try {
    // Refuse an existing name before anything touches the worker: a dump of gigabytes that publish() would
    // then refuse is time the worker spends stopped for nothing. (publish() still refuses a racing writer.)
    if (opts.replace !== true) {
      const dir = opts.store.pathsOf(name).dir;
      const exists = await stat(dir).then(() => true, () => false);
      if (exists) {
        throw new StoreError(StoreErrorCode.EXISTS, `checkpoint ${name} exists (pass replace to overwrite it)`, {
          step: 'begin checkpoint',
          evidence: { name, dir },
        });
      }
    }

    phase = 'inspect';
    let started = performance.now();
    inspection = await inspectContainer(opts.pid, opts.inspect ?? {});
    const upperdir = await readContainerdUpperdir(opts.containerId, opts.containerd);
    phases.inspectMs = round(performance.now() - started);
    log.info('container inspected', {
      pid: opts.pid,
      pids: inspection.pids,
      externalMounts: inspection.externalMounts.length,
      hostNetwork: inspection.netns.isHost,
      rssBytes: inspection.rssBytes,
      upperdir,
    });
    throwIfAborted(signal);
    // The room first: a checkpoint the store's bounds cannot hold is refused before any byte of it is written.
    await opts.makeRoom?.(inspection.rssBytes, signal);
    throwIfAborted(signal);

    let weights: ManifestWeightsDoc | undefined;
    if (opts.weights) {
      phase = 'weights';
      started = performance.now();
      weights = await recordWeights({ controlDir: opts.controlDir, pid: opts.pid, digests: opts.weights.digests, ...(opts.inspect?.procRoot !== undefined ? { procRoot: opts.inspect.procRoot } : {}) });
      if (weights !== undefined) {
        phases.weightsMs = round(performance.now() - started);
        phases.weightsBytes = weights.bytes;
        log.info('weights regions recorded', { regions: weights.regions.length, bytes: weights.bytes, ms: phases.weightsMs });
      }
      throwIfAborted(signal);
    }

    pending = await opts.store.beginCheckpoint(name);
    workDir = await mkdtemp(join(opts.workRoot ?? tmpdir(), `thaw-ckpt-${name.replace('/', '+')}-`));

    if (opts.cuda) {
      phase = 'cuda-checkpoint';
      started = performance.now();
      cudaLocked = true; // restoreAndUnlock must run even when lock fails halfway through the pids
      await opts.cuda.lock(inspection.pids, signal);
      await opts.cuda.checkpoint(inspection.pids, signal);
      phases.cudaMs = round(performance.now() - started);
    }

    phase = 'dump';
    started = performance.now();
    await opts.criu.dump(
      buildCheckpointDumpOptions(inspection, { imagesDir: pending.paths.criuDir, workDir }, settings),
      undefined,
      { signal },
    );
    phases.dumpMs = round(performance.now() - started);
    log.info('criu dump done', { ms: phases.dumpMs });

    if (opts.cuda && cudaLocked) {
      phase = 'cuda-restore';
      started = performance.now();
      cudaLocked = false;
      await opts.cuda.restoreAndUnlock(inspection.pids, signal);
      phases.cudaMs = (phases.cudaMs ?? 0) + round(performance.now() - started);
    }

    if (opts.dropZeroPages !== false) {
      phase = 'zero-pages';
      started = performance.now();
      try {
        const z = await dropZeroPages(pending.paths.criuDir, { signal, codec: CriuImageCodec.shared() });
        phases.zeroPagesDroppedBytes = z.droppedBytes;
        log.info('zero pages left out of the dump', { droppedBytes: z.droppedBytes, scannedBytes: z.scannedBytes, rewritten: z.rewritten, skipped: z.skipped, ms: z.ms });
      } catch (err) {
        // Only an aborted flow or images left out of step fail the checkpoint; otherwise CRIU's images stand.
        if (signal.aborted || (err as { imagesChanged?: boolean }).imagesChanged === true) throw err;
        log.warn('zero pages kept: the dump is published as CRIU wrote it', { error: errorMessage(err), code: isThawError(err) ? err.code : undefined });
      }
      phases.zeroPagesMs = round(performance.now() - started);
      // Before the plan: a dump CRIU left without lazy pages by its stack-pointer slip gets them back (lazy-marks.ts).
      await restoreLazyMarks(pending.paths.criuDir, CriuImageCodec.shared()).then(
        (m) => {
          if (m.tasks.length > 0) log.info('lazy marks put back: CRIU left them off (a thread stopped with its stack pointer on a page boundary)', { tasks: m.tasks, lazyPages: m.lazyPages });
        },
        (err: unknown) => log.warn('lazy marks not put back: the dump stays as CRIU marked it', { error: errorMessage(err) }),
      );
      // The memory fill's plan, made once here rather than on every restore's CreateContainer (memory-fill.ts).
      // Without it a restore plans for itself; a plan that cannot be made leaves the fill to CRIU.
      const planned = await writeFillPlanImage(pending.paths.criuDir, CriuImageCodec.shared()).catch((err: unknown) => ({ none: errorMessage(err) }));
      if ('none' in planned) log.info('no memory-fill plan: restores of this checkpoint let CRIU fill memory', { reason: planned.none });
      // A dump with no lazy page left (restoreLazyMarks did not apply or failed): its restores are correct, but CRIU
      // reads all of the memory itself, as without the fill.
      else if (planned.copyBytes === 0) log.warn('CRIU marked no page of the dump lazy: restores of this checkpoint let CRIU fill memory', { zeroBytes: planned.zeroBytes });
      else if (opts.compressPages !== undefined) {
        phase = 'compress-pages';
        started = performance.now();
        try {
          const c = await compressLazyPages(pending.paths.criuDir, { ...opts.compressPages, plan: planned.plan, codec: CriuImageCodec.shared(), signal });
          if ('none' in c) log.info('lazy pages left plain', { reason: c.none });
          else {
            phases.compressedPagesBytes = c.inBytes;
            phases.compressedFrameBytes = c.outBytes;
            log.info('lazy pages compressed: restores of this checkpoint need thaw-fill', { inBytes: c.inBytes, outBytes: c.outBytes, frames: c.frames, tasks: c.tasks, packMs: c.packMs, ms: c.ms });
          }
        } catch (err) {
          if (signal.aborted || (err as { imagesChanged?: boolean }).imagesChanged === true) throw err;
          log.warn('lazy pages left plain: compressing them failed', { error: errorMessage(err) });
        }
        phases.compressPagesMs = round(performance.now() - started);
      }
    }

    phase = 'rootfs-diff';
    started = performance.now();
    // Frozen for the capture: the container cannot change its upperdir under the walk (cgroup-freeze.ts).
    const frozen = await freezeCgroupOf(opts.pid, { ...(opts.inspect?.procRoot !== undefined ? { procRoot: opts.inspect.procRoot } : {}), signal });
    try {
      await captureRootfsDiff({
        upperdir,
        tarFile: pending.paths.rootfsDiff,
        deletedFilesFile: pending.paths.deletedFiles,
        signal,
        logger: log,
      });
    } finally {
      await frozen.thaw();
    }
    phases.rootfsDiffMs = round(performance.now() - started);

    phase = 'publish';
    started = performance.now();
    const hostFacts = readHostFacts();
    const phaseMs: Record<string, number> = {
      inspect: phases.inspectMs,
      'criu-dump': phases.dumpMs,
      'rootfs-diff': phases.rootfsDiffMs,
    };
    if (phases.cudaMs !== undefined) phaseMs['cuda'] = phases.cudaMs;
    if (phases.zeroPagesMs !== undefined) phaseMs['zero-pages'] = phases.zeroPagesMs;
    if (phases.compressPagesMs !== undefined) phaseMs['compress-pages'] = phases.compressPagesMs;
    if (phases.weightsMs !== undefined) phaseMs['weights'] = phases.weightsMs;
    const gpu = opts.cuda?.gpuConstraints?.();
    const fields: ManifestFields = {
      source: {
        nodeHostname: opts.source.nodeHostname ?? hostname(),
        ...(opts.source.pod ? { pod: opts.source.pod } : {}),
        container: { name: opts.source.containerName, id: opts.containerId },
        command: opts.source.command ?? inspection.cmdline,
        args: opts.source.args ?? [],
        envKeys: inspection.envKeys,
        ...processIdentity(opts.pid),
      },
      constraints: {
        arch: hostFacts.arch,
        kernelRelease: hostFacts.kernelRelease,
        criuVersion: opts.criuVersion,
        containerdVersion: opts.containerdVersion,
        image: { ref: opts.imageRef, ...(opts.imageDigest !== undefined ? { digest: opts.imageDigest } : {}) },
        ...(gpu !== undefined ? { gpu } : {}),
      },
      criu: {
        pid: opts.pid,
        externalMounts: inspection.externalMounts.map((m) => ({ key: m.key, path: m.mountpoint })),
        ...(inspection.netns.isHost ? {} : { netnsKey: NETNS_EXTERNAL_KEY }),
        stdioFds: inspection.stdioFds,
        options: recordedCriuOptions(settings, !inspection.netns.isHost),
      },
      timings: { phaseMs },
      liveBytes: inspection.rssBytes,
      ...(weights !== undefined ? { weights } : {}),
      ...(opts.snapshot !== undefined ? { snapshot: { ...opts.snapshot } } : {}),
    };
    const published = await pending.publish(fields, { signal, ...(opts.replace ? { replace: true } : {}) });
    phases.publishMs = round(performance.now() - started);
    phases.totalMs = round(performance.now() - t0);
    const manifest = published.manifest;

    // The checkpoint is safe on disk now; a worker that cannot be told is logged, not a failed checkpoint.
    try {
      await writeMarker(opts.controlDir, CHECKPOINT_COMPLETE, {
        ok: true,
        checkpoint: name,
        id: manifest.id,
        bytes: manifest.totals.bytes,
        onCheckpoint: opts.onCheckpoint,
      });
    } catch (err) {
      log.error('checkpoint published but checkpoint-complete could not be written; the worker stays blocked', { error: err });
    }
    // The log of a dump that worked is noise; a failure to remove it must not turn success into failure.
    await rm(workDir, { recursive: true, force: true }).catch((err: unknown) => log.warn('cannot remove the CRIU work dir', { workDir, error: errorMessage(err) }));
    return { manifest, phases, workDir };
  } catch (err) {
    deadline.dispose();
    await cleanUpAfterFailure(opts, log, { pending, inspection, cudaLocked, signal });
    const causeCode = isThawError(err) ? err.code : (err as NodeJS.ErrnoException).code;
    const failure = new CheckpointError(CheckpointErrorCode.FAILED, `${phase} failed: ${errorMessage(err)}`, {
      step: `checkpoint ${name}`,
      cause: err,
      evidence: {
        phase,
        causeCode,
        containerId: opts.containerId,
        pid: opts.pid,
        phases: { ...phases, totalMs: round(performance.now() - t0) },
        ...(workDir !== '' ? { workDir, dumpLog: join(workDir, DUMP_LOG_FILE) } : {}),
        ...(isThawError(err) ? { causeEvidence: err.evidence } : {}),
      },
    });
    await tellWorkerItFailed(opts, log, failure);
    throw failure;
  } finally {
    deadline.dispose();
  }
}

/** Undo what a failed checkpoint did: give the GPU back, remove the pending directory. Never throws. */
async function cleanUpAfterFailure(
  opts: CheckpointContainerOptions,
  log: Logger,
  state: { pending: PendingCheckpoint | undefined; inspection: ContainerInspection | undefined; cudaLocked: boolean; signal: AbortSignal },
): Promise<void> {
  if (opts.cuda && state.cudaLocked && state.inspection) {
    try {
      // Not the flow's signal: it may be the reason we are here, and a locked GPU must be given back.
      await opts.cuda.restoreAndUnlock(state.inspection.pids, new AbortController().signal);
    } catch (err) {
      log.error('cuda restore/unlock after a failed checkpoint failed; the worker may be stuck', { error: err });
    }
  }
  if (state.pending) {
    try {
      await state.pending.abort();
    } catch (err) {
      log.error('removing the pending checkpoint directory failed (recover() removes it later)', { dir: state.pending.dir, error: err });
    }
  }
}

/**
 * A worker waiting for checkpoint-complete resumes on `{ok: false}`. Skipped when checkpoint-complete is
 * already there: that worker was told (by an earlier checkpoint) and a failure now must not overwrite it.
 */
async function tellWorkerItFailed(opts: CheckpointContainerOptions, log: Logger, failure: CheckpointError): Promise<void> {
  // lstat: the directory is the pod's, and a planted symlink is never followed (not even to stat its target).
  const already = await lstat(join(opts.controlDir, CHECKPOINT_COMPLETE)).then(() => true, () => false);
  if (already) return;
  try {
    await writeMarker(opts.controlDir, CHECKPOINT_COMPLETE, {
      ok: false,
      checkpoint: opts.checkpointName,
      error: { code: failure.code, phase: failure.evidence.phase, causeCode: failure.evidence.causeCode, message: failure.message },
    });
  } catch (err) {
    log.error('checkpoint failed and checkpoint-complete {ok:false} could not be written; the worker stays blocked', { error: err });
  }
}
