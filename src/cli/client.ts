/**
 * The CLI's side of the control API: a promise per unary call, an async iterator for Checkpoint, and the
 * mapping of a failed call to thaw's code and the CLI's exit code.
 */
import * as grpc from '@grpc/grpc-js';
import {
  loadAgentService,
  THAW_CODE_METADATA_KEY,
  type CheckpointProgressMsg,
  type CheckpointRequestMsg,
  type CheckpointSummaryMsg,
  type SnapshotPodsMsg,
  type InspectCheckpointResponseMsg,
  type StatusResponseMsg,
  type CollectGarbageResponseMsg,
  type VersionResponseMsg,
} from '../agent/index.js';
import { ExitCode } from './exit-codes.js';

/** Unary calls give up after this; the agent answers them from memory or a directory listing. */
export const DEFAULT_CALL_TIMEOUT_MS = 30_000;

export class ApiCallError extends Error {
  constructor(
    message: string,
    readonly grpcCode: grpc.status,
    /** thaw's error code from the agent, or AGENT_UNREACHABLE when the socket did not answer. */
    readonly thawCode: string,
  ) {
    super(message);
    this.name = 'ApiCallError';
  }

  get exitCode(): ExitCode {
    return exitCodeOf(this.grpcCode);
  }
}

export function exitCodeOf(code: grpc.status): ExitCode {
  switch (code) {
    case grpc.status.UNAVAILABLE:
      return ExitCode.UNREACHABLE;
    case grpc.status.NOT_FOUND:
      return ExitCode.NOT_FOUND;
    case grpc.status.FAILED_PRECONDITION:
      return ExitCode.REFUSED;
    case grpc.status.INVALID_ARGUMENT:
      return ExitCode.USAGE;
    default:
      return ExitCode.FAILED;
  }
}

function toCallError(err: grpc.ServiceError, socket: string): ApiCallError {
  const thawCode = String(err.metadata?.get(THAW_CODE_METADATA_KEY)[0] ?? '');
  if (err.code === grpc.status.UNAVAILABLE && thawCode === '') {
    return new ApiCallError(`the agent does not answer on ${socket} (is \`thaw agent\` running? are you root?): ${err.details}`, err.code, 'AGENT_UNREACHABLE');
  }
  return new ApiCallError(err.details || err.message, err.code, thawCode || grpc.status[err.code]);
}

export class AgentClient {
  private readonly client: grpc.Client & Record<string, (...args: unknown[]) => unknown>;

  constructor(readonly socket: string) {
    const { Client } = loadAgentService();
    this.client = new Client(`unix:${socket}`, grpc.credentials.createInsecure()) as unknown as typeof this.client;
  }

  private unary<T>(method: string, request: object, timeoutMs = DEFAULT_CALL_TIMEOUT_MS): Promise<T> {
    return new Promise((resolve, reject) => {
      const fn = this.client[method] as (req: object, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res: T) => void) => void;
      fn.call(this.client, request, { deadline: Date.now() + timeoutMs }, (err, res) => (err ? reject(toCallError(err, this.socket)) : resolve(res)));
    });
  }

  list(namespace = ''): Promise<{ checkpoints: CheckpointSummaryMsg[]; snapshot_pods: SnapshotPodsMsg[] }> {
    return this.unary('ListCheckpoints', { namespace });
  }
  inspect(name: string): Promise<InspectCheckpointResponseMsg> {
    return this.unary('InspectCheckpoint', { name });
  }
  delete(name: string): Promise<object> {
    return this.unary('DeleteCheckpoint', { name });
  }
  clearRestoreFailure(name: string): Promise<{ cleared: boolean }> {
    return this.unary('ClearRestoreFailure', { name });
  }
  collectGarbage(dryRun: boolean): Promise<CollectGarbageResponseMsg> {
    return this.unary('CollectGarbage', { dry_run: dryRun });
  }
  status(): Promise<StatusResponseMsg> {
    return this.unary('Status', {});
  }
  version(timeoutMs?: number): Promise<VersionResponseMsg> {
    return this.unary('Version', {}, timeoutMs);
  }

  /** Streams the checkpoint's progress; the last message has done = true. No deadline (a worker may take long). */
  async *checkpoint(request: Partial<CheckpointRequestMsg>, signal?: AbortSignal): AsyncGenerator<CheckpointProgressMsg> {
    const call = (this.client['Checkpoint'] as (req: object) => grpc.ClientReadableStream<CheckpointProgressMsg>).call(this.client, request);
    const onAbort = (): void => call.cancel();
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      for await (const msg of call) yield msg as CheckpointProgressMsg;
    } catch (err) {
      throw toCallError(err as grpc.ServiceError, this.socket);
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
  }

  close(): void {
    this.client.close();
  }
}
