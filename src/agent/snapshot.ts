/**
 * `thaw.dev/snapshot: <name>`: one annotation on a workload's pod template instead of a checkpoint pod and a
 * restore annotation. At NRI CreateContainer of such a container the agent
 *
 *   1. computes the snapshot key: what makes a checkpoint valid for this container (snapshotKey below);
 *   2. looks for the namespace's checkpoint of that name and key (findSnapshotCheckpoint): found → the container
 *      is a restore target of it, exactly as with `thaw.dev/restore` (restore-target.ts);
 *   3. not found → the container cold-starts. If no other container of the node holds the claim for
 *      (namespace, name, key) (SnapshotClaims), it takes it and is made a checkpoint source (checkpoint-source.ts):
 *      its worker is checkpointed when it writes ready-for-checkpoint, and the checkpoint is published under the
 *      stored name with {name, key} in its manifest. A container that finds the claim held is left unchanged (no
 *      control directory: its worker just serves) and waits for nobody.
 *
 * A checkpoint whose restores fell back DEFAULT_SNAPSHOT_RETAKE_AFTER_FAILURES times in a row (a cause its key does not
 * cover: a damaged file, a CRIU that cannot restore it) is taken again: the next pod becomes the source and replaces
 * it (its own namespace's; refused while a restore still reads it).
 *
 * The claim is released when its checkpoint ends (succeeded, failed, cancelled) or its container goes (stopped,
 * removed, the agent saw it exit): a pod that dies before its worker is ready does not block the next one.
 *
 * The key (sha256, hex) is over: the image digest containerd resolves the container's image to (the manifest or
 * index digest of `io.kubernetes.cri.image-name`), the container's name, its process args as the runtime resolved
 * them (Kubernetes command and args over the image's entrypoint), and the node's GPU model, driver version and CUDA
 * API version (`none` without a GPU). A new image (a retagged `:latest` included), other args or a driver upgrade
 * give a new key: a new checkpoint is taken, and the old one is never restored for the new key (it is left for
 * the store's GC). Environment values are not in the key (they hold per-pod values and secrets), as with
 * `thaw.dev/restore`; the restore's own compatibility check (manifest.ts checkCompatibility) still runs.
 *
 * Storage: the checkpoint lives in the pod's namespace, under the store key `<namespace>/<name>-<12 hex>`
 * (snapshotCheckpointKey), the hex from sha256(namespace NUL key). The bare `<name>-<12 hex>` is also the registry
 * tag in the namespace's snapshotRepository, which another namespace may share: the namespace stays in the hash so
 * that two namespaces' snapshots of one name never share a tag. Whatever is under that key is used only if its
 * manifest's snapshot record names this name and key and its source pod's namespace is this one; anything else
 * there (a checkpoint someone named so by hand) is left alone and the container cold-starts
 * (AGENT_SNAPSHOT_NAME_TAKEN). `snapshotCheckpointName`, `snapshotCheckpointKey` and `findSnapshotCheckpoint` are
 * the only places that know the layout.
 */
import { createHash } from 'node:crypto';
import { isThawError } from '../errors.js';
import type { GpuConstraints, LocalStore, OpenedCheckpoint } from '../store/index.js';
import { StoreErrorCode } from '../store/index.js';
import type { CheckpointEvent } from './checkpoint-coordinator.js';
import type { RestoreEvent } from '../restore-engine/index.js';
import { SnapshotFallbackCause } from './errors.js';
import { DEFAULT_SNAPSHOT_RETAKE_AFTER_FAILURES } from '../defaults.js';

/** Bumped when what goes into the key changes: every checkpoint of the old scheme then stops matching. */
export const SNAPSHOT_KEY_VERSION = 1;
/** Hex digits of the stored name's suffix (48 bits: a collision needs ~16 million keys of one name). */
export const SNAPSHOT_NAME_SUFFIX_HEX = 12;

export interface SnapshotKeyInput {
  /** `sha256:<64 hex>`: what containerd resolves the container's image to. */
  imageDigest: string;
  containerName: string;
  /** The container's process args (NRI CreateContainer). */
  args: readonly string[];
  /** The node's GPUs (src/cuda gpuFacts); absent: no GPU. */
  gpu?: Pick<GpuConstraints, 'model' | 'driverVersion' | 'cudaApiVersion'>;
}

/** The snapshot key: sha256 (64 hex) of the canonical JSON of the inputs. Pure. */
export function snapshotKey(input: SnapshotKeyInput): string {
  const gpu = input.gpu === undefined ? 'none' : { model: input.gpu.model ?? '', driverVersion: input.gpu.driverVersion ?? '', cudaApiVersion: input.gpu.cudaApiVersion ?? 0 };
  const canonical = JSON.stringify({ v: SNAPSHOT_KEY_VERSION, image: input.imageDigest, container: input.containerName, args: [...input.args], gpu });
  return createHash('sha256').update(canonical).digest('hex');
}

/** What a snapshot checkpoint is: its namespace, the annotation's name, and its key. */
export interface SnapshotId {
  namespace: string;
  name: string;
  key: string;
}

/**
 * The name (within its namespace) of a snapshot's checkpoint, also its registry tag (the file comment says why the
 * namespace is in the hash). Pure.
 */
export function snapshotCheckpointName(id: SnapshotId): string {
  const suffix = createHash('sha256').update(`${id.namespace}\0${id.key}`).digest('hex').slice(0, SNAPSHOT_NAME_SUFFIX_HEX);
  return `${id.name}-${suffix}`;
}

/** The store key of a snapshot's checkpoint: the pod's namespace's `<namespace>/<snapshotCheckpointName>`. Pure. */
export function snapshotCheckpointKey(id: SnapshotId): string {
  return `${id.namespace}/${snapshotCheckpointName(id)}`;
}

/**
 * The registry reference of a snapshot's checkpoint in its namespace's `snapshotRepository` (tenancy.ts): the
 * stored name is the tag, so every node of the namespace names the same one for the same key. Pure.
 */
export function snapshotReference(repository: string, storedName: string): string {
  return `${repository}:${storedName}`;
}

/** storedName: the name within the pod's namespace (snapshotCheckpointName), also the registry tag. */
export type SnapshotLookup =
  | { kind: 'found'; storedName: string; checkpoint: OpenedCheckpoint }
  | { kind: 'absent'; storedName: string }
  /** Something else lies under the stored name: not used, not replaced. */
  | { kind: 'taken'; storedName: string; reason: string };

/**
 * The checkpoint of `id` in `store`, if there is one that is really its own (snapshot record and owner namespace
 * checked). A checkpoint that does not open (corrupt, foreign JSON) counts as taken: the store's own tools deal
 * with it, the pod cold-starts.
 */
export async function findSnapshotCheckpoint(store: Pick<LocalStore, 'open'>, id: SnapshotId): Promise<SnapshotLookup> {
  const storedName = snapshotCheckpointName(id);
  let opened: OpenedCheckpoint;
  try {
    opened = await store.open(snapshotCheckpointKey(id));
  } catch (err) {
    if (isThawError(err, StoreErrorCode.NOT_FOUND)) return { kind: 'absent', storedName };
    return { kind: 'taken', storedName, reason: `the checkpoint stored as ${storedName} does not open: ${(err as Error).message}` };
  }
  const m = opened.manifest;
  if (m.snapshot?.name !== id.name || m.snapshot.key !== id.key) {
    return { kind: 'taken', storedName, reason: `the checkpoint stored as ${storedName} is not snapshot ${id.name} with this key (its record: ${JSON.stringify(m.snapshot ?? null)})` };
  }
  if (m.source.pod?.namespace !== id.namespace) {
    return { kind: 'taken', storedName, reason: `the checkpoint stored as ${storedName} belongs to namespace ${m.source.pod?.namespace ?? '(none)'}, not ${id.namespace}` };
  }
  return { kind: 'found', storedName, checkpoint: opened };
}

const claimKey = (id: SnapshotId): string => `${id.namespace}\0${id.name}\0${id.key}`;

/**
 * In-flight claims: which container of this node is taking the checkpoint of a (namespace, name, key). One holder
 * per id; a container holds at most one claim.
 */
export class SnapshotClaims {
  private readonly byId = new Map<string, string>();
  private readonly byContainer = new Map<string, string>();

  /** Takes the claim for `containerId`; false when another container holds it. Re-claiming one's own is true. */
  tryClaim(id: SnapshotId, containerId: string): boolean {
    const k = claimKey(id);
    const holder = this.byId.get(k);
    if (holder !== undefined && holder !== containerId) return false;
    this.byId.set(k, containerId);
    this.byContainer.set(containerId, k);
    return true;
  }

  holder(id: SnapshotId): string | undefined {
    return this.byId.get(claimKey(id));
  }

  /** Releases what `containerId` holds (nothing when it holds nothing). */
  release(containerId: string): void {
    const k = this.byContainer.get(containerId);
    if (k === undefined) return;
    this.byContainer.delete(containerId);
    if (this.byId.get(k) === containerId) this.byId.delete(k);
  }

  get size(): number {
    return this.byId.size;
  }
}

/** How a snapshot pod started: the `outcome` label of thaw_snapshot_pods_total. */
export type SnapshotOutcome = 'restored' | 'cold' | 'checkpointed';


/** One row of the per-workload start counts (thaw list, /metrics). */
export interface SnapshotPodCount {
  namespace: string;
  snapshot: string;
  outcome: SnapshotOutcome;
  /** For cold: why (a code); '' otherwise. */
  cause: string;
  count: number;
}

interface Pending {
  namespace: string;
  snapshot: string;
  via: 'restore' | 'checkpoint';
  /** The snapshot's stored name (snapshotCheckpointName): what its restore failures are counted against. */
  storedName?: string;
}

/**
 * What the snapshot flow knows at run time: the claims, and how each snapshot pod started. A pod whose start is
 * decided later (a restore, a checkpoint) is pending until its event arrives; then counted once.
 */
export class SnapshotTracker {
  readonly claims = new SnapshotClaims();
  private readonly pending = new Map<string, Pending>();
  private readonly counts = new Map<string, SnapshotPodCount>();
  /** Restores that fell back in a row, by stored name (reset by a restore that succeeds, or a new checkpoint). */
  private readonly failures = new Map<string, number>();

  constructor(private readonly retakeAfterFailures = DEFAULT_SNAPSHOT_RETAKE_AFTER_FAILURES) {}

  /** A restore of `storedName` fell back (at CreateContainer, or later: onRestoreEvent counts those itself). */
  restoreFailed(storedName: string): void {
    this.failures.set(storedName, (this.failures.get(storedName) ?? 0) + 1);
  }

  /** True when the checkpoint stored as `storedName` failed enough restores in a row that a new one should be taken. */
  shouldRetake(storedName: string): boolean {
    return (this.failures.get(storedName) ?? 0) >= this.retakeAfterFailures;
  }

  failuresOf(storedName: string): number {
    return this.failures.get(storedName) ?? 0;
  }

  /** Counts a pod whose start is known now. */
  count(namespace: string, snapshot: string, outcome: SnapshotOutcome, cause = ''): void {
    const k = `${namespace}\0${snapshot}\0${outcome}\0${cause}`;
    const row = this.counts.get(k) ?? { namespace, snapshot, outcome, cause, count: 0 };
    row.count++;
    this.counts.set(k, row);
  }

  /** A restore target or checkpoint source whose outcome comes with its event. */
  expect(containerId: string, p: Pending): void {
    this.pending.set(containerId, p);
  }

  onRestoreEvent(e: Pick<RestoreEvent, 'containerId' | 'outcome' | 'cause'>): void {
    const p = this.pending.get(e.containerId);
    if (p === undefined || p.via !== 'restore') return;
    this.pending.delete(e.containerId);
    if (p.storedName !== undefined) {
      if (e.outcome === 'restored') this.failures.delete(p.storedName);
      else this.restoreFailed(p.storedName);
    }
    if (e.outcome === 'restored') this.count(p.namespace, p.snapshot, 'restored');
    else this.count(p.namespace, p.snapshot, 'cold', e.cause ?? 'RESTORE_FAILED');
  }

  onCheckpointEvent(e: Pick<CheckpointEvent, 'containerId' | 'outcome'>): void {
    this.claims.release(e.containerId);
    const p = this.pending.get(e.containerId);
    if (p === undefined || p.via !== 'checkpoint') return;
    this.pending.delete(e.containerId);
    if (e.outcome === 'succeeded' && p.storedName !== undefined) this.failures.delete(p.storedName);
    if (e.outcome === 'succeeded') this.count(p.namespace, p.snapshot, 'checkpointed');
    else this.count(p.namespace, p.snapshot, 'cold', e.outcome === 'cancelled' ? SnapshotFallbackCause.CHECKPOINT_CANCELLED : SnapshotFallbackCause.CHECKPOINT_FAILED);
  }

  /** The container stopped or was removed: its claim goes. A pending outcome stays for its event (cancelled). */
  containerGone(containerId: string): void {
    this.claims.release(containerId);
  }

  /** Every count so far, sorted by namespace, snapshot, outcome, cause. */
  rows(): SnapshotPodCount[] {
    return [...this.counts.values()]
      .map((r) => ({ ...r }))
      .sort((a, b) => a.namespace.localeCompare(b.namespace) || a.snapshot.localeCompare(b.snapshot) || a.outcome.localeCompare(b.outcome) || a.cause.localeCompare(b.cause));
  }
}
