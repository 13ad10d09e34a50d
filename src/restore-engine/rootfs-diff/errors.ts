import { ThawError } from '../../errors.js';
import { throwIfAborted as checkAborted } from '../../util.js';

/** Codes of the rootfs diff (capture and apply); any of them on the restore path means a cold start with that cause. */
export const RootfsErrorCode = {
  /** containerd's record of the container's rootfs is not one overlayfs snapshot with an upperdir (nothing to capture). */
  NOT_OVERLAY: 'ROOTFS_NOT_OVERLAY',
  /** containerd's API did not answer where the container's rootfs snapshot is (cause: the gRPC error). */
  CONTAINERD_QUERY_FAILED: 'ROOTFS_CONTAINERD_QUERY_FAILED',
  /** The upperdir containerd names is not `<root>/io.containerd.snapshotter.v1.overlayfs/snapshots/<id>/fs`, real and normalised. */
  UPPERDIR_UNTRUSTED: 'ROOTFS_UPPERDIR_UNTRUSTED',
  /** The upperdir uses an overlay feature whose content is not in the upperdir (redirect_dir, metacopy). */
  DIFF_UNSUPPORTED: 'ROOTFS_DIFF_UNSUPPORTED',
  /** rootfs-diff.tar is not a readable tar, or deleted-files.json is not a list of relative paths. */
  DIFF_INVALID: 'ROOTFS_DIFF_INVALID',
  /** An entry would be written outside the rootfs, or through a symlink (evidence: the entry). */
  DIFF_UNSAFE: 'ROOTFS_DIFF_UNSAFE',
  /** The archive has a child entry before its parent directory's own entry (evidence: entry, parent). */
  DIFF_ORDER: 'ROOTFS_DIFF_ORDER',
  /** The archive has a global pax header: thaw's writer never makes one, and it would change later entries. */
  DIFF_GLOBAL_PAX: 'ROOTFS_DIFF_GLOBAL_PAX',
  /** The caller's AbortSignal fired. */
  ABORTED: 'ROOTFS_ABORTED',
  /**
   * Undoing an applied diff failed (evidence: the journal step): the rootfs is half changed and nothing may run
   * on it.
   */
  UNDO_FAILED: 'ROOTFS_UNDO_FAILED',
  /** A filesystem call failed (cause: the Node error). */
  IO: 'ROOTFS_IO',
} as const;
export type RootfsErrorCode = (typeof RootfsErrorCode)[keyof typeof RootfsErrorCode];

export class RootfsError extends ThawError {
  declare readonly code: RootfsErrorCode;
  constructor(code: RootfsErrorCode, message: string, options: { step: string; cause?: unknown; evidence?: Record<string, unknown> }) {
    super(code, message, options);
    this.name = 'RootfsError';
  }
}


/** Throws ROOTFS_ABORTED when `signal` has fired. */
export function throwIfAborted(signal: AbortSignal | undefined, step: string): void {
  checkAborted(signal, (cause) => new RootfsError(RootfsErrorCode.ABORTED, 'aborted by the caller', { step, cause }));
}
