/**
 * The subset of containerd's gRPC API thaw calls (proto/containerd/, our own subset, field numbers as
 * containerd's API defines them), on containerd's socket, in one containerd namespace (CRI's `k8s.io` unless
 * told), named by the `containerd-namespace` metadata header:
 *   - Containers/Get   a container's rootfs snapshot reference (rootfs-diff/containerd-upperdir.ts);
 *   - Snapshots/Mounts the mounts containerd made a rootfs from (same);
 *   - Images/Get       an image record's target digest (same);
 *   - Tasks/Get        a container's init process: pid and status (the agent's control API).
 *
 * Contract: `containerdCall` resolves with the decoded response (proto-loader, keepCase, enums as strings) or
 * rejects with grpc-js's own error; callers wrap that in their own typed error, which names what they asked.
 * One client per call: a call is rare (a checkpoint, a snapshot pod, an operator's request), and a client kept
 * open would outlive a containerd restart.
 */
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { DEFAULT_CONTAINERD_NAMESPACE, MAX_TIMER_DELAY_MS } from '../defaults.js';
import { packageRoot } from '../util.js';

/** One containerd call's deadline when the caller names none: a local socket answers in milliseconds. */
export const DEFAULT_CONTAINERD_CALL_TIMEOUT_MS = 10_000;

export interface ContainerdEndpoint {
  /** containerd's gRPC socket (config `containerd.socket`). */
  socket: string;
  /** containerd's root directory (config `containerd.root`): the snapshotters' directories lie under it. */
  root: string;
  /** containerd namespace of the container; default DEFAULT_CONTAINERD_NAMESPACE (k8s.io, CRI's). */
  namespace?: string;
  timeoutMs?: number;
}

/** The services of proto/containerd/, by the name a call gives. */
export type ContainerdService = 'Containers' | 'Snapshots' | 'Images' | 'Tasks';

let definitions: Promise<Record<ContainerdService, grpc.ServiceClientConstructor>> | undefined;

function loadDefinitions(): NonNullable<typeof definitions> {
  definitions ??= (async () => {
    const dir = join(packageRoot(), 'proto', 'containerd');
    const def = await protoLoader.load(['containers.proto', 'snapshots.proto', 'images.proto', 'tasks.proto'], { includeDirs: [dir], keepCase: true, longs: String, enums: String, defaults: true });
    type V1<N extends string> = { v1: Record<N, grpc.ServiceClientConstructor> };
    const pkg = grpc.loadPackageDefinition(def) as unknown as {
      containerd: { services: { containers: V1<'Containers'>; snapshots: V1<'Snapshots'>; images: V1<'Images'>; tasks: V1<'Tasks'> } };
    };
    const s = pkg.containerd.services;
    return { Containers: s.containers.v1.Containers, Snapshots: s.snapshots.v1.Snapshots, Images: s.images.v1.Images, Tasks: s.tasks.v1.Tasks };
  })();
  definitions.catch(() => {
    definitions = undefined;
  });
  return definitions;
}

/** Calls `service`/`method` with `request` on `endpoint`'s containerd, within its deadline. */
export async function containerdCall<Req, Res>(endpoint: ContainerdEndpoint, service: ContainerdService, method: string, request: Req): Promise<Res> {
  const defs = await loadDefinitions();
  const client = new defs[service](`unix://${endpoint.socket}`, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  metadata.set('containerd-namespace', endpoint.namespace ?? DEFAULT_CONTAINERD_NAMESPACE);
  const deadline = new Date(Date.now() + Math.min(endpoint.timeoutMs ?? DEFAULT_CONTAINERD_CALL_TIMEOUT_MS, MAX_TIMER_DELAY_MS));
  try {
    return await new Promise<Res>((resolve, reject) => {
      const fn = (client as unknown as Record<string, (r: Req, m: grpc.Metadata, o: grpc.CallOptions, cb: (e: grpc.ServiceError | null, v?: Res) => void) => void>)[method]!;
      fn.call(client, request, metadata, { deadline }, (err, value) => (err ? reject(err) : resolve(value as Res)));
    });
  } finally {
    client.close();
  }
}
