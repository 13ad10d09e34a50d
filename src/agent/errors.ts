import { ThawError } from '../errors.js';

/** Codes the agent raises itself (the control API's callers and the CLI match on them). */
export const AgentErrorCode = {
  /** Another agent answers on the API socket: two agents on one node would both act on every container. */
  ALREADY_RUNNING: 'AGENT_ALREADY_RUNNING',
  /** The API socket's path or directory cannot be made root-only, or is something other than a socket. */
  SOCKET: 'AGENT_SOCKET',
  /** No container the agent has seen matches the request. */
  CONTAINER_NOT_FOUND: 'AGENT_CONTAINER_NOT_FOUND',
  /** The container exists but has no running process to checkpoint. */
  CONTAINER_NOT_RUNNING: 'AGENT_CONTAINER_NOT_RUNNING',
  /** containerd did not say where the container's process is (it did not answer, or answered something else). */
  RUNTIME_QUERY_FAILED: 'AGENT_RUNTIME_QUERY_FAILED',
  /** The request matches several containers (evidence: candidates). */
  AMBIGUOUS_TARGET: 'AGENT_AMBIGUOUS_TARGET',
  /** The request is malformed (a field missing or contradictory). */
  BAD_REQUEST: 'AGENT_BAD_REQUEST',
  /** The agent is shutting down and takes no new work. */
  STOPPING: 'AGENT_STOPPING',
  /** The metrics endpoint could not listen. */
  METRICS_LISTEN: 'AGENT_METRICS_LISTEN',
} as const;
export type AgentErrorCode = (typeof AgentErrorCode)[keyof typeof AgentErrorCode];

export class AgentError extends ThawError {
  declare readonly code: AgentErrorCode;
  constructor(code: AgentErrorCode, message: string, options: { step: string; cause?: unknown; evidence?: Record<string, unknown> }) {
    super(code, message, options);
    this.name = 'AgentError';
  }
}

/**
 * Causes of the fallbacks the NRI handlers decide themselves (beside the RESTORE_* codes of the restore flow),
 * the `cause` label of thaw_fallbacks_total. They were the label values control-dir, restore-unavailable and
 * internal-error before they became codes.
 */
export const HandlerFallbackCause = {
  /** The container's control directory could not be created: it runs without thaw (a cold start for a restore target). */
  CONTROL_DIR: 'AGENT_CONTROL_DIR_FAILED',
  /** A pod asks for a restore but the agent has no restore engine configured: cold start. */
  RESTORE_UNAVAILABLE: 'AGENT_RESTORE_UNAVAILABLE',
  /** An NRI handler failed (a bug): the container is created unchanged. */
  INTERNAL: 'AGENT_HANDLER_INTERNAL',
} as const;
export type HandlerFallbackCause = (typeof HandlerFallbackCause)[keyof typeof HandlerFallbackCause];

/** Causes of a snapshot pod's cold start decided at CreateContainer, besides the RESTORE_* ones
 * (src/agent/snapshot.ts): the `cause` label of thaw_snapshot_pods_total{outcome="cold"}. */
export const SnapshotFallbackCause = {
  /** Another container of the node is taking this snapshot's checkpoint: this one cold-starts without waiting. */
  CHECKPOINT_IN_PROGRESS: 'AGENT_SNAPSHOT_CHECKPOINT_IN_PROGRESS',
  /** The image digest (or args) could not be learnt: no key, so neither restore nor checkpoint. */
  KEY_UNKNOWN: 'AGENT_SNAPSHOT_KEY_UNKNOWN',
  /** Another checkpoint lies under the snapshot's store name. */
  NAME_TAKEN: 'AGENT_SNAPSHOT_NAME_TAKEN',
  /** This pod was the checkpoint source and its checkpoint failed (it serves on as a cold start). */
  CHECKPOINT_FAILED: 'AGENT_SNAPSHOT_CHECKPOINT_FAILED',
  /** This pod was the checkpoint source and its checkpoint was cancelled (the container went, the agent stopped). */
  CHECKPOINT_CANCELLED: 'AGENT_SNAPSHOT_CHECKPOINT_CANCELLED',
} as const;
export type SnapshotFallbackCause = (typeof SnapshotFallbackCause)[keyof typeof SnapshotFallbackCause];

export const ConfigErrorCode = {
  /** A key, type or value is wrong; evidence: key, source, expected, got. */
  INVALID: 'AGENT_CONFIG_INVALID',
  /** The config file could not be read (other than missing at the default path). */
  UNREADABLE: 'AGENT_CONFIG_UNREADABLE',
} as const;
export type ConfigErrorCode = (typeof ConfigErrorCode)[keyof typeof ConfigErrorCode];
