/** The agent layer's public API: what other layers import from it (test/unit/layering.test.ts holds them to it). */
export { agentLogger, describeStartFailure, runAgent } from './agent.js';
export { type CheckpointProgressMsg, type CheckpointRequestMsg, type CheckpointSummaryMsg, type CollectGarbageResponseMsg, type InspectCheckpointResponseMsg, loadAgentService, type SnapshotPodsMsg, type StatusResponseMsg, THAW_CODE_METADATA_KEY, type VersionResponseMsg } from './api-proto.js';
export { type AgentConfig, CONFIG_KEYS, ConfigError, ConfigErrorCode, configFlagOptions, DEFAULT_CONFIG_PATH, flagNameOf, resolveAgentConfig } from './config.js';
export { loadRegistryConfig } from './registry-config.js';
export { type HookServer, type HookWork, startHookServer } from './hook-server.js';
export { HOST_HELPERS } from './restore-tools.js';
