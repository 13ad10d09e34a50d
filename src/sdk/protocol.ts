/**
 * The worker protocol (design.md, "The worker protocol"): marker files in a per-container control
 * directory, shared by the agent (src/sdk/control-dir.ts), the TypeScript worker SDK (src/sdk/worker.ts)
 * and the Python one (sdk/python/thaw_worker.py, which repeats these names; a test checks they agree).
 * Names and the env var are Dynamo Snapshot's, so its workers need no change.
 */

/** Env var naming the control directory inside the worker's container (Dynamo's current name). */
export const CONTROL_DIR_ENV = 'SNAPSHOT_CONTROL_DIR';
/** Dynamo's legacy name, read when CONTROL_DIR_ENV is unset (Dynamo injects both during its migration). */
export const LEGACY_CONTROL_DIR_ENV = 'DYN_SNAPSHOT_CONTROL_DIR';
/** Where the control directory is mounted in the container when no env var says otherwise. */
export const DEFAULT_CONTROL_DIR = '/snapshot-control';

/** Worker → agent: initialised and quiesced; checkpoint me. */
export const READY_FOR_CHECKPOINT = 'ready-for-checkpoint';
/** Dynamo standalone's name for READY_FOR_CHECKPOINT; the agent accepts either. */
export const READY_FOR_SNAPSHOT = 'ready-for-snapshot';
/** Agent → worker: checkpoint done; go on serving or exit. */
export const CHECKPOINT_COMPLETE = 'checkpoint-complete';
/** Dynamo's name for CHECKPOINT_COMPLETE; the agent writes both, workers accept either. */
export const SNAPSHOT_COMPLETE = 'snapshot-complete';
/** Agent → worker: you were restored; re-open connections, serve. */
export const RESTORE_COMPLETE = 'restore-complete';
/** Agent → worker: restore abandoned; the cold start takes over. */
export const RESTORE_FAILED = 'restore-failed';

/** Ready markers in the order the agent checks them. */
export const READY_MARKERS = [READY_FOR_CHECKPOINT, READY_FOR_SNAPSHOT] as const;
export type ReadyMarker = (typeof READY_MARKERS)[number];

/** What a waiting worker learns. snapshot-complete is reported as checkpoint-complete. */
export const OUTCOMES = [RESTORE_FAILED, RESTORE_COMPLETE, CHECKPOINT_COMPLETE] as const;
export type Outcome = (typeof OUTCOMES)[number];

/** Markers the agent writes (writeMarker accepts exactly these). */
export type AgentMarker = Outcome;

/**
 * The files a waiting worker checks, in priority order, with the outcome each means. When several are
 * present (a stale marker, or both checkpoint names), a failure wins over a restore, and a restore over a
 * checkpoint: a restored process must not act as the source that was checkpointed.
 */
export const OUTCOME_FILES: ReadonlyArray<readonly [file: string, outcome: Outcome]> = [
  [RESTORE_FAILED, RESTORE_FAILED],
  [RESTORE_COMPLETE, RESTORE_COMPLETE],
  [CHECKPOINT_COMPLETE, CHECKPOINT_COMPLETE],
  [SNAPSHOT_COMPLETE, CHECKPOINT_COMPLETE],
];

/**
 * Workers poll their control directory at this interval. Dynamo's poll 0.1 s (_SENTINEL_POLL_INTERVAL_SEC);
 * a restored worker sees restore-complete on its next poll, so the period adds to every restore (~50 ms on
 * average at 0.1 s), while a poll costs a few stat calls and the wait lasts only as long as a checkpoint.
 */
export const POLL_INTERVAL_MS = 10;

/** Prefix of the temporary names atomic writes use before their rename; never a marker name. */
export const TEMP_PREFIX = '.tmp-';
