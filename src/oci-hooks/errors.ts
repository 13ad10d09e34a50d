import { ThawError } from '../errors.js';

/**
 * Codes of the OCI hooks. A create-runtime hook never fails the container with them: it records the
 * error (records.ts, `hook-failed`) and exits 0 so the pod cold-starts; the codes name the cause there.
 */
export const HookErrorCode = {
  /** stdin was not an OCI state object (or a field had the wrong type). */
  STATE_INVALID: 'HOOK_STATE_INVALID',
  /** The bundle's config.json is missing or not the OCI config we need (root.path, process.args). */
  CONFIG_INVALID: 'HOOK_CONFIG_INVALID',
  /** The hook's command line was wrong (stage, options). */
  USAGE: 'HOOK_USAGE',
  /** args[0] does not resolve to an executable file inside the rootfs. */
  ENTRYPOINT_NOT_FOUND: 'HOOK_ENTRYPOINT_NOT_FOUND',
  /** Installing or removing the placeholder overlay failed (evidence: the command's stderr). */
  OVERLAY_FAILED: 'HOOK_OVERLAY_FAILED',
  /** Applying the checkpoint's rootfs diff failed (cause: the ROOTFS_* error). */
  ROOTFS_DIFF_FAILED: 'HOOK_ROOTFS_DIFF_FAILED',
  /**
   * The checkpoint's rootfs diff or deletions list is not the one the agent verified (its sha256 differs from the
   * digest handed to the hook with --diff-sha256, or a file is missing): nothing of it is applied.
   */
  DIFF_UNVERIFIED: 'HOOK_DIFF_UNVERIFIED',
  /**
   * The hook's budget (its runtime timeout less a margin) ran out before its work was done: it gave up so
   * that runc would not kill it (which fails the pod); the container starts cold.
   */
  BUDGET_EXCEEDED: 'HOOK_BUDGET_EXCEEDED',
  /** The checkpoint being pulled did not arrive: the agent said the pull failed, or the wait ran out. */
  CHECKPOINT_UNAVAILABLE: 'HOOK_CHECKPOINT_UNAVAILABLE',
  /**
   * The native hook (native/thaw-hook.c) could not reach the agent's hook socket, or the agent closed the
   * connection without an answer: nothing of the restore was applied by the hook, the container starts cold.
   */
  AGENT_UNREACHABLE: 'HOOK_AGENT_UNREACHABLE',
  /** The native hook's wait for the agent's answer (its --wait-ms) ran out. */
  AGENT_TIMEOUT: 'HOOK_AGENT_TIMEOUT',
  /** The agent's answer to the native hook was not one it knows. */
  AGENT_ANSWER_INVALID: 'HOOK_AGENT_ANSWER_INVALID',
  /** The agent's hook server has no restore waiting for this container (an agent restarted since CreateContainer). */
  AGENT_UNKNOWN_CONTAINER: 'HOOK_AGENT_UNKNOWN_CONTAINER',
  /**
   * The hook failed after it applied the rootfs diff, and undoing the diff failed too (ROOTFS_UNDO_FAILED): the
   * rootfs is half changed, so the hook exits non-zero and runc fails the create rather than run anything on it
   * (the kubelet retries with a fresh container). The reason names the first failure.
   */
  UNDO_FAILED: 'HOOK_UNDO_FAILED',
  /** A filesystem call failed for another reason. */
  IO: 'HOOK_IO',
} as const;
export type HookErrorCode = (typeof HookErrorCode)[keyof typeof HookErrorCode];

export class HookError extends ThawError {
  declare readonly code: HookErrorCode;

  constructor(code: HookErrorCode, message: string, options: { step: string; cause?: unknown; evidence?: Record<string, unknown> }) {
    super(code, message, options);
    this.name = 'HookError';
  }
}
