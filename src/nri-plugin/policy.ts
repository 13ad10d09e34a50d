/**
 * The adjustment policy: which pods thaw touches, and what it asks the runtime to change in them.
 *
 * Pure: it reads a pod's annotations and a container's identity and returns a decision. It never throws
 * on bad input — a malformed thaw annotation yields a `rejected` decision carrying the reason, and the
 * caller creates the container unchanged (a pod never fails because of thaw). Pods without any
 * annotation under the prefix are `untouched`, and the plugin then returns an empty adjustment, so such a
 * pod's spec is byte-for-byte what it would have been without thaw.
 *
 * Annotations (prefix configurable, default `thaw.dev/`), documented in README.md "Annotations":
 *   <prefix>checkpoint     = <name>     make a checkpoint of this worker, stored as <pod's namespace>/<name>
 *   <prefix>restore        = <name>     start this container from checkpoint <name> of the pod's own namespace
 *                          | <namespace>/<name>  or of another namespace, when the operator's policy shares
 *                                      it with this one (cold start on any problem); names beginning `oci-`
 *                                      are refused (reserved for pulled checkpoints);
 *                          | <registry>/<repo>:<tag>[@sha256:...]  or from a checkpoint in an OCI registry
 *                                      (src/checkpoint-reference.ts), pulled on demand
 *   <prefix>snapshot       = <name>     one annotation for a whole workload: restore from this namespace's
 *                                      checkpoint <name> whose key (image digest, args, GPU) matches this
 *                                      container, else cold-start and, if no other pod of the node is taking it,
 *                                      become its checkpoint source (src/agent/snapshot.ts)
 *   <prefix>container      = <name>     the container of the pod thaw acts on (default: every container)
 *   <prefix>on-checkpoint  = continue | exit   what the source does after its checkpoint (default continue)
 * Any other key under the prefix is rejected, so that a typo does not silently turn thaw off for a pod.
 */

import { checkUserCheckpointName, parseQualifiedName } from '../checkpoint-name.js';
import { looksLikeReference, parseCheckpointReference, type CheckpointReference } from '../checkpoint-reference.js';

// The name rule moved to src/checkpoint-name.ts (the store needs it too); re-exported for existing callers.
export { checkCheckpointName, CHECKPOINT_NAME_MAX_LENGTH } from '../checkpoint-name.js';

export const DEFAULT_ANNOTATION_PREFIX = 'thaw.dev/';

/** Where the worker sees its control directory, and the variables naming it: Dynamo's, so its workers run unchanged. */
export {
  DEFAULT_CONTROL_DIR as CONTROL_DIR_MOUNT_PATH,
  CONTROL_DIR_ENV,
  LEGACY_CONTROL_DIR_ENV,
} from '../sdk/index.js';

/**
 * Environment a checkpointable worker needs, as Dynamo's configure_checkpoint_transport_env() forces it:
 * sockets on loopback (CRIU cannot restore sockets bound to other addresses), no cuMem-backed NCCL buffers
 * (the driver's checkpoint API does not support them), no NVLS/IB/RAS; and no io_uring in libuv-based
 * workers (CRIU cannot dump io_uring). Only set where the pod does not set the key itself.
 */
export const CHECKPOINT_ENV: ReadonlyArray<readonly [string, string]> = [
  ['NCCL_SOCKET_IFNAME', 'lo'],
  ['GLOO_SOCKET_IFNAME', 'lo'],
  ['NCCL_CUMEM_ENABLE', '0'],
  ['NCCL_NVLS_ENABLE', '0'],
  ['NCCL_IB_DISABLE', '1'],
  ['NCCL_RAS_ENABLE', '0'],
  ['NCCL_P2P_DISABLE', '0'],
  ['TORCH_NCCL_ENABLE_MONITORING', '0'],
  ['TORCH_NCCL_DUMP_ON_TIMEOUT', '0'],
  ['UV_USE_IO_URING', '0'],
];

const KNOWN_KEYS = ['checkpoint', 'restore', 'snapshot', 'container', 'on-checkpoint'] as const;

/**
 * The longest snapshot name: a snapshot's checkpoints are stored as `<name>-<12 hex>` (src/agent/snapshot.ts),
 * which must fit the checkpoint name rule.
 */
export const SNAPSHOT_NAME_MAX_LENGTH = 128 - 13;
type KnownKey = (typeof KNOWN_KEYS)[number];

/** Kubernetes container names are DNS labels. */
const CONTAINER_NAME_PATTERN = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;

export type OnCheckpoint = 'continue' | 'exit';

export type PolicyDecision =
  | { kind: 'untouched' }
  /** The pod names thaw, but for another container of the pod. */
  | { kind: 'other-container'; targetContainer: string }
  | { kind: 'rejected'; reason: string; annotation: string }
  | { kind: 'checkpoint-source'; checkpointName: string; onCheckpoint: OnCheckpoint }
  /** `thaw.dev/snapshot`: restore or checkpoint, decided by the agent from the key and the store. */
  | { kind: 'snapshot'; snapshotName: string; onCheckpoint: OnCheckpoint }
  /** `reference` set: the annotation names a registry checkpoint; `checkpointName` is then the annotation's text. */
  | { kind: 'restore-target'; checkpointName: string; reference?: CheckpointReference };

export interface PolicyInput {
  podAnnotations: Readonly<Record<string, string>>;
  containerName: string;
}

export interface PolicyOptions {
  /** Annotation prefix including its trailing '/', e.g. `thaw.dev/`. */
  annotationPrefix: string;
}

/** Validates a prefix at configuration time: a DNS-subdomain-like name followed by '/'. */
export function validateAnnotationPrefix(prefix: string): string | undefined {
  if (!/^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?\/$/.test(prefix)) {
    return `annotation prefix must be a DNS subdomain followed by '/', like "${DEFAULT_ANNOTATION_PREFIX}" (got ${JSON.stringify(prefix)})`;
  }
  return undefined;
}

/** Decides what thaw does with one container of a pod. Never throws. */
export function decide(input: PolicyInput, options: PolicyOptions): PolicyDecision {
  const prefix = options.annotationPrefix;
  const ours = new Map<KnownKey, string>();
  for (const [key, value] of Object.entries(input.podAnnotations)) {
    if (!key.startsWith(prefix)) continue;
    const short = key.slice(prefix.length);
    if (!(KNOWN_KEYS as readonly string[]).includes(short)) {
      return {
        kind: 'rejected',
        annotation: key,
        reason: `unknown annotation ${key} (known: ${KNOWN_KEYS.map((k) => prefix + k).join(', ')})`,
      };
    }
    ours.set(short as KnownKey, value);
  }
  if (ours.size === 0) return { kind: 'untouched' };

  const checkpoint = ours.get('checkpoint');
  const restore = ours.get('restore');
  const snapshot = ours.get('snapshot');
  const container = ours.get('container');
  const onCheckpoint = ours.get('on-checkpoint');

  if (checkpoint === undefined && restore === undefined && snapshot === undefined) {
    const key = prefix + [...ours.keys()][0];
    return {
      kind: 'rejected',
      annotation: key,
      reason: `${key} is set but none of ${prefix}checkpoint, ${prefix}restore, ${prefix}snapshot is`,
    };
  }
  if (snapshot !== undefined && (checkpoint !== undefined || restore !== undefined)) {
    return {
      kind: 'rejected',
      annotation: prefix + 'snapshot',
      reason: `${prefix}snapshot replaces ${prefix}checkpoint and ${prefix}restore; set it alone`,
    };
  }
  if (checkpoint !== undefined && restore !== undefined) {
    return {
      kind: 'rejected',
      annotation: prefix + 'restore',
      reason: `${prefix}checkpoint and ${prefix}restore are both set; a pod is either a checkpoint source or a restore target`,
    };
  }
  if (container !== undefined) {
    if (!CONTAINER_NAME_PATTERN.test(container)) {
      return {
        kind: 'rejected',
        annotation: prefix + 'container',
        reason: `${prefix}container ${JSON.stringify(container)} is not a valid container name`,
      };
    }
    if (container !== input.containerName) return { kind: 'other-container', targetContainer: container };
  }
  if (onCheckpoint !== undefined && onCheckpoint !== 'continue' && onCheckpoint !== 'exit') {
    return {
      kind: 'rejected',
      annotation: prefix + 'on-checkpoint',
      reason: `${prefix}on-checkpoint must be "continue" or "exit" (got ${JSON.stringify(onCheckpoint)})`,
    };
  }
  if (restore !== undefined) {
    if (onCheckpoint !== undefined) {
      return {
        kind: 'rejected',
        annotation: prefix + 'on-checkpoint',
        reason: `${prefix}on-checkpoint applies to checkpoint sources only, but this pod sets ${prefix}restore`,
      };
    }
    if (looksLikeReference(restore)) {
      const parsed = parseCheckpointReference(restore);
      if ('reason' in parsed) return { kind: 'rejected', annotation: prefix + 'restore', reason: parsed.reason };
      return { kind: 'restore-target', checkpointName: restore, reference: parsed.reference };
    }
    if (restore.includes('/')) {
      // Another namespace's checkpoint: whether this pod may restore it is the tenancy policy's (the agent's) call.
      const q = parseQualifiedName(restore);
      if ('reason' in q) return { kind: 'rejected', annotation: prefix + 'restore', reason: q.reason };
      return { kind: 'restore-target', checkpointName: restore };
    }
    // A pod never names a pulled checkpoint's local name (oci-<digest>): it names the reference.
    const bad = checkUserCheckpointName(restore);
    if (bad !== undefined) return { kind: 'rejected', annotation: prefix + 'restore', reason: bad };
    return { kind: 'restore-target', checkpointName: restore };
  }
  if (snapshot !== undefined) {
    const bad = checkUserCheckpointName(snapshot) ?? (snapshot.length > SNAPSHOT_NAME_MAX_LENGTH ? `snapshot name is ${snapshot.length} characters long (at most ${SNAPSHOT_NAME_MAX_LENGTH})` : undefined);
    if (bad !== undefined) return { kind: 'rejected', annotation: prefix + 'snapshot', reason: bad.replace(/^checkpoint name/, 'snapshot name') };
    return { kind: 'snapshot', snapshotName: snapshot, onCheckpoint: (onCheckpoint as OnCheckpoint) ?? 'continue' };
  }
  const name = checkpoint as string;
  const bad = checkUserCheckpointName(name);
  if (bad !== undefined) return { kind: 'rejected', annotation: prefix + 'checkpoint', reason: bad };
  return { kind: 'checkpoint-source', checkpointName: name, onCheckpoint: (onCheckpoint as OnCheckpoint) ?? 'continue' };
}
