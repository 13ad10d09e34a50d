/**
 * The public surface of thaw's NRI plugin library. The transport layers (mux, ttrpc) are exported for
 * tests and tools; the rest of thaw needs createNriPlugin, the handler types and AdjustmentBuilder.
 */
export {
  createNriPlugin,
  readLaunchEnv,
  eventMaskOf,
  eventBit,
  EVENT_HANDLER_NAMES,
  NriPlugin,
  DEFAULT_NRI_REQUEST_TIMEOUT_MS,
  DEFAULT_NRI_REGISTRATION_TIMEOUT_MS,
  DEFAULT_HANDLER_SAFETY_MARGIN_MS,
  DEFAULT_RECONNECT,
  NRI_PLUGIN_SERVICE,
  NRI_RUNTIME_SERVICE,
  type NriPluginOptions,
  type NriHandlers,
  type NriHandlerContext,
  type NriPluginState,
  type NriStopInfo,
  type NriLaunchEnv,
  type CreateContainerResult,
  type UpdateResult,
} from './plugin.js';
export {
  AdjustmentBuilder,
  type AdjustmentResult,
  type HookStage,
  type HookSpec,
  type MountSpec,
  type DeviceSpec,
} from './adjustment.js';
export { supportsArgs, validEventsFor, parseVersion, VALID_EVENTS_NRI_0_9, VALID_EVENTS_NRI_0_10, type RuntimeInfo } from './runtime-version.js';
export { runLaunchedPlugin, writeShellLauncher, createFileLogger, type LaunchedPluginOptions, type ShellLauncherOptions } from './launcher.js';
export { templateHandlers } from './template.js';
export {
  NriErrorCode,
  NriError,
  NriHandlerRejection,
  TtrpcStatusError,
  GrpcCode,
} from './errors.js';
export * from './nri-types.js';
export { Mux, type MuxChannel, type MuxChannelSink, type MuxCloseInfo } from './mux.js';
export { MuxDecoder, encodeMuxFrames, PLUGIN_SERVICE_CONN, RUNTIME_SERVICE_CONN } from './mux-framing.js';
export { TtrpcDecoder, encodeTtrpcMessage, TtrpcMessageType } from './ttrpc-framing.js';
export { TtrpcClient, type TtrpcCallOptions } from './ttrpc-client.js';
export { TtrpcServer, type TtrpcCall, type TtrpcMethodHandler } from './ttrpc-server.js';
export { encodeMessage, decodeMessage, nriType } from './ttrpc-codec.js';
export { CHECKPOINT_ENV, CONTROL_DIR_ENV, CONTROL_DIR_MOUNT_PATH, decide, DEFAULT_ANNOTATION_PREFIX, LEGACY_CONTROL_DIR_ENV, SNAPSHOT_NAME_MAX_LENGTH, type OnCheckpoint, type PolicyDecision, validateAnnotationPrefix } from './policy.js';
// The pure decoders, for the fuzz run (bench/fuzz-decoders.ts).
export { decodeRequest, decodeResponse, encodeRequest, encodeResponse } from './ttrpc-codec.js';
