import { ThawError } from '../errors.js';

/**
 * Codes of the restore flow. Every one of them ends in a cold start of the pod (design.md, Restore step 4);
 * the code is the fallback's `cause` in logs and counters. The store's STORE_* and CRIU's CRIU_* codes stay
 * on the `cause` of the error that wraps them.
 */
export const RestoreErrorCode = {
  /** The checkpoint is not in the store (or its name is refused). */
  CHECKPOINT_MISSING: 'RESTORE_CHECKPOINT_MISSING',
  /**
   * The checkpoint named by a registry reference (or found in the shared store) could not be brought into the
   * local store: the registry refused, broke off, sent bytes of another digest, a foreign artifact (cause: the
   * OCI_* or STORE_* error with its evidence).
   */
  PULL_FAILED: 'RESTORE_PULL_FAILED',
  /**
   * A restore of this very checkpoint (name and manifest digest) failed on this node before, because of the
   * checkpoint (CRIU, its credentials, its rootfs diff: CHECKPOINT_FAULT_CAUSES in restore-flow.ts), and the
   * failure was recorded in the store: decided at CreateContainer, nothing is applied. Replacing the checkpoint
   * or `thaw clear-failure <namespace/name>` lets pods restore from it again.
   */
  CHECKPOINT_FAILED_BEFORE: 'RESTORE_CHECKPOINT_FAILED_BEFORE',
  /** The checkpoint does not match its manifest (sha256, size, extra or missing files) or cannot be read. */
  CHECKPOINT_CORRUPT: 'RESTORE_CHECKPOINT_CORRUPT',
  /** The manifest's constraints do not match this node or container (arch, image, command, args, container). */
  INCOMPATIBLE: 'RESTORE_INCOMPATIBLE',
  /**
   * The tenancy policy (agent config) refuses it: a checkpoint of another namespace not shared with the pod's,
   * or a registry repository not allow-listed for the pod's namespace.
   */
  NOT_ALLOWED: 'RESTORE_NOT_ALLOWED',
  /**
   * A registry checkpoint's signature is missing, made by a key the policy does not name for that namespace and
   * repository, or signs another digest or repository; decided before any byte of it is stored.
   */
  SIGNATURE: 'RESTORE_SIGNATURE',
  /**
   * The checkpoint's declared size does not fit: more than the store's filesystem has free, or more than the
   * namespace's quota leaves (tenancy.namespaces.<ns>.quotaBytes); decided from the manifest, before any write.
   */
  NO_ROOM: 'RESTORE_NO_ROOM',
  /** The create-runtime hook failed or did not run: the container runs its original command. */
  HOOK_FAILED: 'RESTORE_HOOK_FAILED',
  /** The thaw-pause overlay could not be removed inside the container. */
  OVERLAY: 'RESTORE_OVERLAY',
  /** Moving the restorer into the target container's cgroups failed, or the restored tree is elsewhere. */
  CGROUP: 'RESTORE_CGROUP',
  /** CRIU failed (cause: the CRIU_* error with CRIU's log lines). */
  CRIU: 'RESTORE_CRIU',
  /**
   * A mount of the target container (its root filesystem) has no path in the host's mount namespace, where CRIU
   * runs (host-mounts.ts).
   */
  TARGET_MOUNTS: 'RESTORE_TARGET_MOUNTS',
  /**
   * A file the checkpoint's processes map (its files.img) is, in the target container, not a regular file: a
   * FIFO CRIU's open would block on until its timeout, a device, a directory (planted by the checkpoint's diff or
   * the image). Found before CRIU runs; evidence: the path and what it is.
   */
  MAPPED_FILE_UNSAFE: 'RESTORE_MAPPED_FILE_UNSAFE',
  /** The target container's OCI spec (config.json beside its rootfs) could not be read or is not its own. */
  TARGET_SPEC: 'RESTORE_TARGET_SPEC',
  /**
   * The checkpoint's recorded credentials (CRIU's core/creds: uid/gid, capabilities, no_new_privs, seccomp, LSM
   * label) grant more than the target container's OCI spec (credentials.ts); evidence names each excess.
   */
  CREDENTIALS_EXCEED_SPEC: 'RESTORE_CREDENTIALS_EXCEED_SPEC',
  /** The restored tree did not appear as a child of the placeholder. */
  ADOPT: 'RESTORE_ADOPT',
  /**
   * thaw-fill could not place the restored tree's memory (memory-fill.ts; evidence: its code, e.g. FORK when the
   * tree forked while being filled, TIMEOUT, READ): the tree is killed before it runs any code of its own.
   */
  MEMORY_FILL: 'RESTORE_MEMORY_FILL',
  /**
   * The checkpoint's lazy pages are compressed (compressed-pages.ts) and this restore cannot run thaw-fill (off,
   * not built, no lazy pages in CRIU or the kernel, no stored plan, or it did not start): CRIU alone would restore
   * those pages as zeros, so the pod cold-starts. Nothing of the checkpoint ran. Also the cause of an agent's
   * refusal at CreateContainer when it knows at start it cannot run thaw-fill (manifest.ts checkCompatibility, `pages`).
   */
  MEMORY_FILL_REQUIRED: 'RESTORE_MEMORY_FILL_REQUIRED',
  /** A device step after CRIU (the CUDA restore seam) failed. */
  DEVICES: 'RESTORE_DEVICES',
  /** The target container's process is gone (stopped, killed) before the restore finished. */
  TARGET_GONE: 'RESTORE_TARGET_GONE',
  /**
   * PID 1 of the target did not become thaw-pause within PLACEHOLDER_EXEC_WAIT_MS of the container's start (the
   * createRuntime hook said it would be): nothing was signalled or unmounted in it.
   */
  PLACEHOLDER_NOT_STARTED: 'RESTORE_PLACEHOLDER_NOT_STARTED',
  /** A phase ran past its time limit. */
  TIMEOUT: 'RESTORE_TIMEOUT',
  /** The caller's AbortSignal fired (container removed, agent stopping). */
  ABORTED: 'RESTORE_ABORTED',
  /**
   * The fallback could not undo the checkpoint's rootfs diff in the container (ROOTFS_UNDO_FAILED: a symlink on a
   * journalled path, the backup gone or swapped): the original command must not run on a half-changed rootfs,
   * so the container is SIGKILLed instead of cold-started (the kubelet creates it afresh from the image). The
   * event's `fellBackFor` names the cause the restore had fallen back for.
   */
  UNDO_FAILED: 'RESTORE_UNDO_FAILED',
  /**
   * thaw-pause fell back by itself: no word came from the agent within its deadline (THAW_PAUSE_DEADLINE_MS), so
   * the agent was gone; the original command already runs (found by the next agent, which then neither signals
   * nor writes into the container). The rootfs diff is not undone in that case: no agent was there to do it.
   */
  PLACEHOLDER_DEADLINE: 'RESTORE_PLACEHOLDER_DEADLINE',
  /** The agent died while the container waited for its restore; found on the next start (NRI Synchronize). */
  AGENT_RESTARTED: 'RESTORE_AGENT_RESTARTED',
  /** Anything else (a bug): still a cold start. */
  INTERNAL: 'RESTORE_INTERNAL',
} as const;
export type RestoreErrorCode = (typeof RestoreErrorCode)[keyof typeof RestoreErrorCode];

export class RestoreError extends ThawError {
  declare readonly code: RestoreErrorCode;

  constructor(code: RestoreErrorCode, message: string, options: { step: string; cause?: unknown; evidence?: Record<string, unknown> }) {
    super(code, message, options);
    this.name = 'RestoreError';
  }
}

export const CheckpointErrorCode = {
  /** A phase failed; evidence.phase names it, evidence.causeCode is the cause's code. */
  FAILED: 'CHECKPOINT_FAILED',
} as const;
export type CheckpointErrorCode = (typeof CheckpointErrorCode)[keyof typeof CheckpointErrorCode];

export const InspectErrorCode = {
  /** /proc/<pid>/... could not be read (the process is gone, or no permission): evidence has the path and errno. */
  PROC_UNREADABLE: 'CHECKPOINT_INSPECT_PROC_UNREADABLE',
  /** A mountinfo line that is not mountinfo (proc(5)). */
  MOUNTINFO_INVALID: 'CHECKPOINT_INSPECT_MOUNTINFO_INVALID',
} as const;
export type InspectErrorCode = (typeof InspectErrorCode)[keyof typeof InspectErrorCode];
