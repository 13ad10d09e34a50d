/**
 * The control API's schema (proto/thaw/agent/v1/agent.proto), loaded at run time with @grpc/proto-loader, and
 * the TypeScript shapes of its messages as proto-loader hands them over (keepCase: field names as in the .proto;
 * longs as numbers: byte counts stay below 2^53; defaults filled in). Shared by the server (the agent) and the
 * client (the CLI).
 */
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { packageRoot } from '../util.js';

export const AGENT_PROTO_RELATIVE_PATH = 'proto/thaw/agent/v1/agent.proto';
/** Trailing-metadata key that carries thaw's stable error code of a failed call. */
export const THAW_CODE_METADATA_KEY = 'thaw-code';

export interface PodRefMsg { namespace: string; name: string; uid: string }
export interface CheckpointRequestMsg { container_id?: string; pod?: PodRefMsg; name: string; container_name: string; replace: boolean }
export interface CheckpointProgressMsg {
  container_id: string;
  name: string;
  pod: string;
  container: string;
  state: string;
  done: boolean;
  id: string;
  bytes: number;
  phases_json: string;
  error_json: string;
}
export interface CheckpointSummaryMsg {
  name: string;
  id: string;
  created_at: string;
  bytes: number;
  files: number;
  image: string;
  source_pod: string;
  gpu: boolean;
  in_use: boolean;
  problem: string;
  snapshot: string;
  snapshot_key: string;
  restore_failure_json: string;
  namespace: string;
}
export interface SnapshotPodsMsg { namespace: string; snapshot: string; outcome: string; cause: string; count: number }
export interface ListCheckpointsResponseMsg { checkpoints: CheckpointSummaryMsg[]; snapshot_pods: SnapshotPodsMsg[] }
export interface MismatchMsg { what: string; expected: string; actual: string; severity: string }
export interface InspectCheckpointResponseMsg {
  summary: CheckpointSummaryMsg;
  manifest_json: string;
  disk_bytes: number;
  restorable: boolean;
  mismatches: MismatchMsg[];
  directory: string;
}
export interface CollectedCheckpointMsg { name: string; namespace: string; bytes: number; last_used: string }
export interface CollectGarbageResponseMsg {
  collected: CollectedCheckpointMsg[];
  bytes: number;
  cache_files: number;
  cache_bytes: number;
  unmet: string;
  dry_run: boolean;
}
export interface RestoreInFlightMsg { container_id: string; pod: string; checkpoint: string; phase: string; since: string }
export interface StatusResponseMsg {
  version: string;
  pid: number;
  started_at: string;
  nri: string;
  runtime: string;
  checkpoints: CheckpointProgressMsg[];
  restores: RestoreInFlightMsg[];
  managed_containers: number;
}
export interface VersionResponseMsg { version: string; node_version: string; criu_version: string; runtime: string; gpu: boolean }

export interface AgentServiceDefinition {
  service: grpc.ServiceDefinition;
  Client: grpc.ServiceClientConstructor;
}

/** Loads the service (synchronously: once per process, at start). */
export function loadAgentService(root = packageRoot()): AgentServiceDefinition {
  const def = protoLoader.loadSync(join(root, AGENT_PROTO_RELATIVE_PATH), { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true });
  const pkg = grpc.loadPackageDefinition(def) as unknown as { thaw: { agent: { v1: { Agent: grpc.ServiceClientConstructor } } } };
  const Client = pkg.thaw.agent.v1.Agent;
  return { service: Client.service, Client };
}
