/**
 * The agent's domain types between the NRI handlers (thaw-nri.ts) and the flows behind them (the
 * checkpoint and restore coordinators): what thaw knows about a container it manages, and what the handlers
 * hand to the flows; how a ManagedContainer is made from NRI's pod and container, and how it is written into
 * (and read back from) the annotations thaw sets on the container.
 */
import type { Container, PodSandbox } from '../nri-plugin/index.js';
import type { OnCheckpoint } from '../nri-plugin/index.js';
import type { OpenedCheckpoint, ReleaseLease } from '../store/index.js';
import { CRI_IMAGE_NAME_ANNOTATION } from './containers.js';
import { controlDirPath } from '../sdk/index.js';
import { lstatSync } from 'node:fs';
import { isPulledKey, parseStoreKey } from '../checkpoint-name.js';

/** What the handlers know about a container thaw manages, handed to the flows. */
export interface ManagedContainer {
  containerId: string;
  containerName: string;
  podId: string;
  podName: string;
  podNamespace: string;
  podUid: string;
  checkpointName: string;
  /** Host path of the control directory (mounted at /snapshot-control in the container). */
  controlDir: string;
  /** The container's image as containerd names it in the spec's annotations, when present. */
  imageRef?: string;
  /** Checkpoint sources: what the worker does after its checkpoint (the pod's on-checkpoint annotation). */
  onCheckpoint?: OnCheckpoint;
  /** What thaw made of it (absent: checkpoint-source, for entries made before roles existed). */
  role?: 'checkpoint-source' | 'restore-target';
  /** Restore targets: how thaw-pause holds the original command (NRI args, or the createRuntime overlay). */
  placeholder?: 'args' | 'overlay';
  /**
   * Checkpoint sources: the process args of the container's spec as NRI gave them at CreateContainer (the
   * Kubernetes command and args, resolved by the runtime). Recorded in the manifest; a restore target's must be
   * the same. Not rebuilt after an agent restart (then the manifest records none, and the restore refuses it).
   */
  specArgs?: string[];
  /**
   * Restore targets: the container's bind mounts (NRI CreateContainer), where the weights service finds sources
   * on host model directories before the container runs. Not rebuilt after an agent restart (nothing restores then).
   */
  mounts?: Array<{ destination: string; source: string }>;
  /**
   * A `thaw.dev/snapshot` container (snapshot.ts): the annotation's name and the key computed at CreateContainer.
   * A source records them in its checkpoint's manifest and holds the node's claim for them until it ends.
   */
  snapshot?: { name: string; key: string };
  /** The image digest learnt from containerd at CreateContainer (snapshot sources), for the manifest. */
  imageDigest?: string;
  /** A snapshot source taking a new checkpoint over one whose restores kept failing: replace it. */
  replaceCheckpoint?: boolean;
}

/**
 * The flows behind the plugin. The handlers call these without awaiting anything slow: a coordinator starts
 * its work in the background and returns.
 */
export interface ThawCoordinator {
  /**
   * A pod sandbox that names a local checkpoint to restore was created: start reading it into the page cache
   * (its container comes later: after image pulls, kubelet's work, CreateContainer).
   */
  restorePodCreated?(podId: string, checkpointName: string): void;
  /** A pod sandbox stopped or was removed: stop what was started for it at restorePodCreated. */
  podGone?(podId: string): void;
  /** A checkpoint source was created: watch its control directory. */
  checkpointSourceCreated?(container: ManagedContainer): void;
  /** A checkpoint source started: its pid is known. */
  checkpointSourceStarted?(container: ManagedContainer, pid: number): void;
  /**
   * A restore target was created (thaw-pause holds its command): start verifying/prefetching the checkpoint.
   * `incoming`: the checkpoint is still being pulled (or copied from the shared store) into the local store;
   * the restore waits for it, and its failure is a cold start.
   */
  /** `lease`: the store lease CreateContainer took on a local checkpoint; the coordinator releases it. */
  restoreTargetCreated?(container: ManagedContainer, checkpoint: OpenedCheckpoint, incoming?: Promise<OpenedCheckpoint>, lease?: ReleaseLease): void;
  /** A restore target started: restore into it (pid = its PID 1, thaw-pause, on the host). */
  restoreTargetStarted?(container: ManagedContainer, pid: number): void;
  /** A managed container stopped or was removed: abandon what runs for it. */
  containerGone?(containerId: string): void;
  /** A managed container's process stopped (NRI StopContainer): nothing can be checkpointed from it any more. */
  containerStopped?(containerId: string): void;
  /** A managed container found running at NRI Synchronize (the agent restarted, or containerd did). */
  containerRecovered?(container: ManagedContainer, pid: number): void;
}

/** The annotations thaw sets on containers it manages (under the configured prefix). */
export function managedAnnotations(prefix: string, role: 'checkpoint-source' | 'restore-target', container: ManagedContainer): Record<string, string> {
  return {
    [`${prefix}role`]: role,
    [`${prefix}checkpoint-name`]: container.checkpointName,
    [`${prefix}control-dir`]: container.controlDir,
    ...(container.placeholder ? { [`${prefix}placeholder`]: container.placeholder } : {}),
    ...(container.onCheckpoint ? { [`${prefix}on-checkpoint`]: container.onCheckpoint } : {}),
    ...(container.snapshot ? { [`${prefix}snapshot-name`]: container.snapshot.name, [`${prefix}snapshot-key`]: container.snapshot.key } : {}),
  };
}

/** The identity part of a ManagedContainer, from NRI's pod and container. */
export function identityOf(pod: PodSandbox, container: Container): Pick<ManagedContainer, 'containerId' | 'containerName' | 'podId' | 'podName' | 'podNamespace' | 'podUid'> {
  return {
    containerId: container.id ?? '',
    containerName: container.name ?? '',
    podId: pod.id ?? container.podSandboxId ?? '',
    podName: pod.name ?? '',
    podNamespace: pod.namespace ?? '',
    podUid: pod.uid ?? '',
  };
}

/**
 * What thaw knew of a container it adjusted, rebuilt from the annotations it set on it (managedAnnotations):
 * how an agent that restarted learns its containers back from NRI Synchronize. Undefined for containers thaw
 * did not adjust, or whose annotations do not read back as thaw's.
 *
 * Annotations are the pod's to write as well (a pod spec's annotations reach its containers), so nothing
 * in them names a path: the control directory is derived from the container id under `controlRoot`
 * (`<root>/<id>`, as CreateContainer made it), a `control-dir` annotation naming anything else refuses the
 * container, and so does a derived directory that does not exist as a real directory (thaw never adjusted
 * that container: the role annotations are forged).
 */
export function managedFromContainer(prefix: string, controlRoot: string, pod: PodSandbox, container: Container): ManagedContainer | undefined {
  const a = container.annotations ?? {};
  const role = a[`${prefix}role`];
  const annotated = a[`${prefix}checkpoint-name`];
  if ((role !== 'checkpoint-source' && role !== 'restore-target') || !annotated || !container.id) return undefined;
  // A store key; a bare name (written by an agent of the flat store layout) is the pod's own namespace's. A
  // checkpoint source's key must be of its own namespace (a forged annotation cannot aim it at another).
  const checkpointName = annotated.includes('/') || isPulledKey(annotated) ? annotated : `${pod.namespace ?? ''}/${annotated}`;
  const parsedKey = parseStoreKey(checkpointName);
  if ('reason' in parsedKey) return undefined;
  if (role === 'checkpoint-source' && (parsedKey.kind !== 'owned' || parsedKey.namespace !== pod.namespace)) return undefined;
  let controlDir: string;
  try {
    controlDir = controlDirPath(controlRoot, container.id);
  } catch {
    return undefined;
  }
  if (a[`${prefix}control-dir`] !== controlDir) return undefined;
  try {
    if (!lstatSync(controlDir).isDirectory()) return undefined;
  } catch {
    return undefined;
  }
  const placeholder = a[`${prefix}placeholder`];
  const onCheckpoint = a[`${prefix}on-checkpoint`];
  const snapshotName = a[`${prefix}snapshot-name`];
  const snapshotKey = a[`${prefix}snapshot-key`];
  const snapshot = snapshotName && snapshotKey && /^[0-9a-f]{64}$/.test(snapshotKey) ? { name: snapshotName, key: snapshotKey } : undefined;
  return {
    ...identityOf(pod, container),
    checkpointName,
    controlDir,
    role,
    ...(a[CRI_IMAGE_NAME_ANNOTATION] ? { imageRef: a[CRI_IMAGE_NAME_ANNOTATION] } : {}),
    ...(placeholder === 'args' || placeholder === 'overlay' ? { placeholder } : {}),
    ...(onCheckpoint === 'continue' || onCheckpoint === 'exit' ? { onCheckpoint } : {}),
    // A snapshot source's key was computed over the spec's args, which thaw did not change: they are the ones
    // its manifest must record (without them every later pod of the workload would refuse the checkpoint).
    ...(snapshot !== undefined && role === 'checkpoint-source' ? { snapshot, ...(container.args && container.args.length > 0 ? { specArgs: [...container.args] } : {}) } : {}),
  };
}
