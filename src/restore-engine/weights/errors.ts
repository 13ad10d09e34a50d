import { ThawError } from '../../errors.js';

/**
 * Codes of the weights service (weights outside the process image, docs/weights.md). Every one that happens
 * during a restore ends in a cold start with the code as its cause; at checkpoint time the checkpoint keeps
 * the weights in the image instead (the path without the service).
 */
export const WeightsErrorCode = {
  /** The worker's weights file is absent where the restore needs it. */
  FILE_MISSING: 'WEIGHTS_FILE_MISSING',
  /** The worker's weights file is not what the schema allows (too large, not JSON, a field out of range, a link). */
  FILE_INVALID: 'WEIGHTS_FILE_INVALID',
  /** A source file is gone, unreadable, outside the roots it may come from, or not a regular file. */
  SOURCE_MISSING: 'WEIGHTS_SOURCE_MISSING',
  /** A source file's size or sha256 differs from what the checkpoint recorded. */
  SOURCE_CHANGED: 'WEIGHTS_SOURCE_CHANGED',
  /** The weights' GPU memory could not be handed to the restored worker (socket, peer, sendmsg). */
  HANDOVER: 'WEIGHTS_HANDOVER',
  /** The restored worker could not import or map the handed-over weights (its answer on weights.sock says why). */
  IMPORT: 'WEIGHTS_IMPORT',
  /** The checkpoint's weights are outside it, and this agent has no weights service (no CUDA driver with VMM). */
  UNAVAILABLE: 'WEIGHTS_UNAVAILABLE',
  /** The GPU the load would use does not fit the checkpoint's regions (another allocation granularity). */
  GPU_MISMATCH: 'WEIGHTS_GPU_MISMATCH',
  /** A CUDA call of the load failed (allocation, pinned memory, copy, export); evidence has the CUresult. */
  CUDA: 'WEIGHTS_CUDA',
} as const;
export type WeightsErrorCode = (typeof WeightsErrorCode)[keyof typeof WeightsErrorCode];

export class WeightsError extends ThawError {
  declare readonly code: WeightsErrorCode;

  constructor(code: WeightsErrorCode, message: string, options: { step: string; cause?: unknown; evidence?: Record<string, unknown> }) {
    super(code, message, options);
    this.name = 'WeightsError';
  }
}
