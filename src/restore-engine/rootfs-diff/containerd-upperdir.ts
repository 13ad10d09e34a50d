/**
 * The upperdir of a container's rootfs, from containerd's own record (not from the container's
 * /proc/<pid>/mountinfo, which a process in the container can change: a CAP_SYS_ADMIN process may mount an
 * overlay of its choosing over `/` in a namespace of its own and so name any host directory as "its" upperdir).
 *
 * How: over containerd's gRPC API on its socket (proto/containerd/, our own subset of containerd's API),
 *   1. containerd.services.containers.v1.Containers/Get(id) → the container's `snapshotter` and `snapshot_key`;
 *   2. containerd.services.snapshots.v1.Snapshots/Mounts(snapshotter, key) → the overlay mount containerd made
 *      the rootfs from, whose options hold `upperdir=...`;
 * both in containerd's `k8s.io` namespace (CRI's), named by the `containerd-namespace` metadata header.
 * Then the upperdir must be `<containerd root>/io.containerd.snapshotter.v1.overlayfs/snapshots/<id>/fs` exactly,
 * written normalised (no `.`, `..` or empty component) and resolving to itself (realpath: no symlink
 * component). Anything else is refused (ROOTFS_UPPERDIR_UNTRUSTED): thaw reads and archives that directory as
 * root, so it must be the container's own snapshot under the snapshotter's root, nothing else on the host.
 *
 * Contract: only the overlayfs snapshotter is supported (another → ROOTFS_NOT_OVERLAY); a containerd that does
 * not answer, or does not know the container → ROOTFS_CONTAINERD_QUERY_FAILED.
 */
import { realpath } from 'node:fs/promises';
import { join, normalize } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { DEFAULT_CONTAINERD_NAMESPACE, MAX_TIMER_DELAY_MS } from '../../defaults.js';
import { packageRoot } from '../../util.js';
import { RootfsError, RootfsErrorCode } from './errors.js';

/** The snapshotter thaw captures from; its directory under containerd's root is `io.containerd.snapshotter.v1.<name>`. */
export const OVERLAYFS_SNAPSHOTTER = 'overlayfs';
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

/** A containerd.types.Mount as proto-loader hands it over (keepCase). */
export interface ContainerdMount {
  type: string;
  source: string;
  options: string[];
}

/**
 * The `upperdir=` of an overlay mount's options, as containerd lists them (one option a string, never
 * escaped: containerd's own paths have no comma). Pure. ROOTFS_NOT_OVERLAY when the mount is not an overlay
 * or has no upperdir (a read-only view: nothing to capture), or names more than one.
 */
export function upperdirFromMount(mount: ContainerdMount): string {
  const step = 'read the upperdir of the rootfs mount';
  const uppers = mount.type === 'overlay' ? mount.options.filter((o) => o.startsWith('upperdir=')).map((o) => o.slice('upperdir='.length)) : [];
  if (uppers.length !== 1 || uppers[0] === '') {
    throw new RootfsError(RootfsErrorCode.NOT_OVERLAY, `the container's rootfs mount is not an overlay with one upperdir (type ${JSON.stringify(mount.type)})`, {
      step,
      evidence: { type: mount.type, options: mount.options },
    });
  }
  return uppers[0]!;
}

/** `<containerd root>/io.containerd.snapshotter.v1.overlayfs/snapshots`: where every overlayfs snapshot lies. */
export function overlayfsSnapshotsDir(containerdRoot: string): string {
  return join(containerdRoot, `io.containerd.snapshotter.v1.${OVERLAYFS_SNAPSHOTTER}`, 'snapshots');
}

/**
 * Refuses (ROOTFS_UPPERDIR_UNTRUSTED) an upperdir that is not exactly `<snapshotsDir>/<id>/fs` (id: digits, as
 * containerd's overlayfs snapshotter numbers them), that is not written normalised, or whose realpath differs
 * (a symlink in any component, the snapshots directory's own included). Resolves with the upperdir.
 */
export async function checkUpperdirUnderRoot(upperdir: string, snapshotsDir: string): Promise<string> {
  const step = 'check the upperdir lies under the snapshotter root';
  const refuse = (why: string, extra: Record<string, unknown> = {}): never => {
    throw new RootfsError(RootfsErrorCode.UPPERDIR_UNTRUSTED, `upperdir ${JSON.stringify(upperdir)} refused: ${why}`, {
      step,
      evidence: { upperdir, snapshotsDir, ...extra },
    });
  };
  if (!upperdir.startsWith('/') || normalize(upperdir) !== upperdir || upperdir.split('/').some((c) => c === '.' || c === '..')) {
    refuse('not a normalised absolute path');
  }
  const prefix = `${snapshotsDir}/`;
  if (!upperdir.startsWith(prefix) || !/^\d+\/fs$/.test(upperdir.slice(prefix.length))) {
    refuse('not <snapshotter root>/snapshots/<id>/fs');
  }
  let real: string;
  try {
    real = await realpath(upperdir);
  } catch (err) {
    return refuse(`it does not resolve (${(err as Error).message})`);
  }
  if (real !== upperdir) refuse('a component of it is a symlink', { realpath: real });
  return upperdir;
}

interface ContainerdClients {
  containers: grpc.Client;
  snapshots: grpc.Client;
}

let definitions: Promise<{ Containers: grpc.ServiceClientConstructor; Snapshots: grpc.ServiceClientConstructor; Images: grpc.ServiceClientConstructor }> | undefined;

function loadDefinitions(): NonNullable<typeof definitions> {
  definitions ??= (async () => {
    const dir = join(packageRoot(), 'proto', 'containerd');
    const def = await protoLoader.load(['containers.proto', 'snapshots.proto', 'images.proto'], { includeDirs: [dir], keepCase: true, longs: String, enums: String, defaults: true });
    const pkg = grpc.loadPackageDefinition(def) as unknown as {
      containerd: {
        services: {
          containers: { v1: { Containers: grpc.ServiceClientConstructor } };
          snapshots: { v1: { Snapshots: grpc.ServiceClientConstructor } };
          images: { v1: { Images: grpc.ServiceClientConstructor } };
        };
      };
    };
    return { Containers: pkg.containerd.services.containers.v1.Containers, Snapshots: pkg.containerd.services.snapshots.v1.Snapshots, Images: pkg.containerd.services.images.v1.Images };
  })();
  definitions.catch(() => { definitions = undefined; });
  return definitions;
}

function unary<Req, Res>(client: grpc.Client, method: string, request: Req, metadata: grpc.Metadata, timeoutMs: number): Promise<Res> {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + Math.min(timeoutMs, MAX_TIMER_DELAY_MS));
    const fn = (client as unknown as Record<string, (r: Req, m: grpc.Metadata, o: grpc.CallOptions, cb: (e: grpc.ServiceError | null, v?: Res) => void) => void>)[method]!;
    fn.call(client, request, metadata, { deadline }, (err, value) => (err ? reject(err) : resolve(value as Res)));
  });
}

/**
 * Asks containerd for container `containerId`'s rootfs snapshot and returns its upperdir, checked as the file
 * comment says. Errors: ROOTFS_CONTAINERD_QUERY_FAILED, ROOTFS_NOT_OVERLAY, ROOTFS_UPPERDIR_UNTRUSTED.
 */
export async function readContainerdUpperdir(containerId: string, endpoint: ContainerdEndpoint): Promise<string> {
  const namespace = endpoint.namespace ?? DEFAULT_CONTAINERD_NAMESPACE;
  const timeoutMs = endpoint.timeoutMs ?? DEFAULT_CONTAINERD_CALL_TIMEOUT_MS;
  const evidence = { containerId, socket: endpoint.socket, namespace };
  const queryFailed = (step: string, err: unknown): RootfsError =>
    new RootfsError(RootfsErrorCode.CONTAINERD_QUERY_FAILED, `containerd (${endpoint.socket}) did not answer ${step}: ${(err as Error).message}`, { step, cause: err, evidence });
  let defs: Awaited<ReturnType<typeof loadDefinitions>>;
  try {
    defs = await loadDefinitions();
  } catch (err) {
    throw queryFailed('load the containerd protos', err);
  }
  const target = `unix://${endpoint.socket}`;
  const creds = grpc.credentials.createInsecure();
  const clients: ContainerdClients = { containers: new defs.Containers(target, creds), snapshots: new defs.Snapshots(target, creds) };
  const metadata = new grpc.Metadata();
  metadata.set('containerd-namespace', namespace);
  try {
    let container: { snapshotter: string; snapshot_key: string } | null | undefined;
    try {
      ({ container } = await unary<{ id: string }, { container?: { snapshotter: string; snapshot_key: string } | null }>(
        clients.containers, 'Get', { id: containerId }, metadata, timeoutMs));
    } catch (err) {
      throw queryFailed('Containers/Get', err);
    }
    if (!container || container.snapshot_key === '') {
      throw new RootfsError(RootfsErrorCode.NOT_OVERLAY, `containerd records no rootfs snapshot for container ${containerId}`, { step: 'Containers/Get', evidence });
    }
    if (container.snapshotter !== OVERLAYFS_SNAPSHOTTER) {
      throw new RootfsError(RootfsErrorCode.NOT_OVERLAY, `container ${containerId} uses snapshotter ${JSON.stringify(container.snapshotter)}; thaw captures from ${OVERLAYFS_SNAPSHOTTER} only`, {
        step: 'Containers/Get', evidence: { ...evidence, snapshotter: container.snapshotter },
      });
    }
    let mounts: ContainerdMount[];
    try {
      ({ mounts } = await unary<{ snapshotter: string; key: string }, { mounts: ContainerdMount[] }>(
        clients.snapshots, 'Mounts', { snapshotter: container.snapshotter, key: container.snapshot_key }, metadata, timeoutMs));
    } catch (err) {
      throw queryFailed('Snapshots/Mounts', err);
    }
    if (mounts.length !== 1) {
      throw new RootfsError(RootfsErrorCode.NOT_OVERLAY, `containerd lists ${mounts.length} mounts for the rootfs of ${containerId}, not one overlay`, {
        step: 'Snapshots/Mounts', evidence: { ...evidence, mounts },
      });
    }
    return await checkUpperdirUnderRoot(upperdirFromMount(mounts[0]!), overlayfsSnapshotsDir(endpoint.root));
  } finally {
    clients.containers.close();
    clients.snapshots.close();
  }
}

/**
 * The digest containerd's image record `name` points at (its target: the manifest, or the index of a
 * multi-platform image), `sha256:<64 hex>`. `name` is what CRI recorded for the container
 * (`io.kubernetes.cri.image-name`): a tag reference, a digest reference or the image id, each of which CRI keeps as
 * an image record in its namespace. Errors: ROOTFS_CONTAINERD_QUERY_FAILED (containerd does not answer, does not
 * know the name, or names something that is not a sha256 digest).
 */
export async function readContainerdImageDigest(name: string, endpoint: ContainerdEndpoint): Promise<string> {
  const namespace = endpoint.namespace ?? DEFAULT_CONTAINERD_NAMESPACE;
  const timeoutMs = endpoint.timeoutMs ?? DEFAULT_CONTAINERD_CALL_TIMEOUT_MS;
  const step = 'Images/Get';
  const evidence = { image: name, socket: endpoint.socket, namespace };
  const failed = (message: string, cause?: unknown): RootfsError =>
    new RootfsError(RootfsErrorCode.CONTAINERD_QUERY_FAILED, message, { step, evidence, ...(cause !== undefined ? { cause } : {}) });
  let defs: Awaited<ReturnType<typeof loadDefinitions>>;
  try {
    defs = await loadDefinitions();
  } catch (err) {
    throw failed(`cannot load the containerd protos: ${(err as Error).message}`, err);
  }
  const client = new defs.Images(`unix://${endpoint.socket}`, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  metadata.set('containerd-namespace', namespace);
  try {
    let image: { target?: { digest: string } | null } | null | undefined;
    try {
      ({ image } = await unary<{ name: string }, { image?: { target?: { digest: string } | null } | null }>(client, 'Get', { name }, metadata, timeoutMs));
    } catch (err) {
      throw failed(`containerd (${endpoint.socket}) did not answer ${step} for ${JSON.stringify(name)}: ${(err as Error).message}`, err);
    }
    const digest = image?.target?.digest ?? '';
    if (!/^sha256:[0-9a-f]{64}$/.test(digest)) throw failed(`containerd's image ${JSON.stringify(name)} has no sha256 target digest (got ${JSON.stringify(digest)})`);
    return digest;
  } finally {
    client.close();
  }
}
