/** The CLI's exit codes (contract; docs/operations.md "Running the agent" documents them). */
export const ExitCode = {
  OK: 0,
  /** The operation failed (a checkpoint failed, doctor found a failing check, an agent that cannot start). */
  FAILED: 1,
  /** Bad command line or configuration: the message names the argument or key. */
  USAGE: 2,
  /** The agent's API socket does not answer. */
  UNREACHABLE: 3,
  /** No such checkpoint, container or pod. */
  NOT_FOUND: 4,
  /** Refused: the checkpoint is in use by a restore, the container is not running, ... */
  REFUSED: 5,
} as const;
export type ExitCode = (typeof ExitCode)[keyof typeof ExitCode];
