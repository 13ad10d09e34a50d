/** The sdk layer's public API: what other layers import from it (test/unit/layering.test.ts holds them to it). */
export { clearStaleMarkers, controlDirPath, createControlDir, readReadyPayload, removeControlDir, waitForWorkerReady, writeMarker } from './control-dir.js';
export { firstPresent, readEntry, writeEntryAtomic, writeFileAtomic } from './marker-files.js';
export { CHECKPOINT_COMPLETE, CONTROL_DIR_ENV, DEFAULT_CONTROL_DIR, LEGACY_CONTROL_DIR_ENV, RESTORE_COMPLETE, RESTORE_FAILED } from './protocol.js';
export { checkpointAndWait, ControlDir } from './worker.js';
