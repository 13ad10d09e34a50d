import { ThawError } from '../../src/errors.js';

/** Error codes of the demo worker and its image builder. Stable: tests and the demo match on them. */
export const DEMO_ERROR_CODES = {
  /** An env var of the worker has a value it cannot use (WORKER_MEMORY_MB=abc, ...). */
  INVALID_CONFIG: 'DEMO_WORKER_INVALID_CONFIG',
  /** Assembling the worker image failed (ldd, a missing compiled module, a bare import). */
  IMAGE_BUILD_FAILED: 'DEMO_IMAGE_BUILD_FAILED',
} as const;

export type DemoErrorCode = (typeof DEMO_ERROR_CODES)[keyof typeof DEMO_ERROR_CODES];

export class DemoError extends ThawError {
  constructor(code: DemoErrorCode, message: string, options: { step: string; cause?: unknown; evidence?: Record<string, unknown> }) {
    super(code, message, options);
    this.name = 'DemoError';
  }
}
