/** The restore-engine layer's public API: what other layers import from it (test/unit/layering.test.ts holds them to it). */
export { checkpointContainer, type CheckpointContainerOptions, type CheckpointCudaHooks, type CheckpointPhases, type CheckpointResult, type OnCheckpoint } from './checkpoint.js';
export { processTree } from './container-inspect.js';
export { CriuClient, criuEnvironment, DEFAULT_SETPRIV_PATH, parentDeathWrapper } from './criu/client.js';
export { createRestoreFlow, undoJournalFor, type CudaRestoreStep, type PreparedRestore, type RestoreEvent, type RestoreFlowOptions, type RestoreJob, type RestoreStepContext, type RestoreWeightsService } from './restore-flow.js';
export { DEFAULT_SH_PATH } from './restore.js';
export { RestoreError, RestoreErrorCode } from './restore-errors.js';
// The pure decoders, for the fuzz run (bench/fuzz-decoders.ts).
export { CriuCodec } from './criu/rpc.js';
export { CriuImageCodec, encodeImageFile, parseImageFile } from './criu/images.js';
export { criuPageReads } from './memory-fill.js';
export { readContainerdImageDigest, readTarEntries, type ContainerdEndpoint } from './rootfs-diff/index.js';
// containerd's API as thaw calls it (the agent asks Tasks/Get where a container's process is).
export { containerdCall } from './containerd-api.js';
// The weights service (restore-engine/weights/): what the GPU check (bench/gpu/weights-check.ts) drives.
export { listenForWorker } from './weights/handover.js';
export { loadWeights } from './weights/loader.js';
export { readWeightsFile } from './weights/regions-file.js';
export { SourceDigests } from './weights/source-digests.js';
export { WeightsErrorCode } from './weights/errors.js';
