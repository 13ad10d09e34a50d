/** The oci-hooks layer's public API: what other layers import from it (test/unit/layering.test.ts holds them to it). */
export { DEFAULT_MOUNT_PATH, DEFAULT_UMOUNT_PATH } from './create-runtime.js';
export { DIFF_APPLIED_FILE, ORIGINAL_ENTRYPOINT_FILE, readHookOutcome, writeCheckpointUnavailable } from './records.js';
export { runCreateRuntime, type CreateRuntimeOptions } from './create-runtime.js';
export { HookErrorCode } from './errors.js';
