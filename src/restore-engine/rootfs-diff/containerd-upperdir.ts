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
import { DEFAULT_CONTAINERD_NAMESPACE } from '../../defaults.js';
import { containerdCall, type ContainerdEndpoint } from '../containerd-api.js';
import { RootfsError, RootfsErrorCode } from './errors.js';

export { DEFAULT_CONTAINERD_CALL_TIMEOUT_MS, type ContainerdEndpoint } from '../containerd-api.js';

/** The snapshotter thaw captures from; its directory under containerd's root is `io.containerd.snapshotter.v1.<name>`. */
export const OVERLAYFS_SNAPSHOTTER = 'overlayfs';

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

/**
 * Asks containerd for container `containerId`'s rootfs snapshot and returns its upperdir, checked as the file
 * comment says. Errors: ROOTFS_CONTAINERD_QUERY_FAILED, ROOTFS_NOT_OVERLAY, ROOTFS_UPPERDIR_UNTRUSTED.
 */
export async function readContainerdUpperdir(containerId: string, endpoint: ContainerdEndpoint): Promise<string> {
  const namespace = endpoint.namespace ?? DEFAULT_CONTAINERD_NAMESPACE;
  const evidence = { containerId, socket: endpoint.socket, namespace };
  const queryFailed = (step: string, err: unknown): RootfsError =>
    new RootfsError(RootfsErrorCode.CONTAINERD_QUERY_FAILED, `containerd (${endpoint.socket}) did not answer ${step}: ${(err as Error).message}`, { step, cause: err, evidence });
  let container: { snapshotter: string; snapshot_key: string } | null | undefined;
  try {
    ({ container } = await containerdCall<{ id: string }, { container?: { snapshotter: string; snapshot_key: string } | null }>(endpoint, 'Containers', 'Get', { id: containerId }));
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
    ({ mounts } = await containerdCall<{ snapshotter: string; key: string }, { mounts: ContainerdMount[] }>(endpoint, 'Snapshots', 'Mounts', { snapshotter: container.snapshotter, key: container.snapshot_key }));
  } catch (err) {
    throw queryFailed('Snapshots/Mounts', err);
  }
  if (mounts.length !== 1) {
    throw new RootfsError(RootfsErrorCode.NOT_OVERLAY, `containerd lists ${mounts.length} mounts for the rootfs of ${containerId}, not one overlay`, {
      step: 'Snapshots/Mounts', evidence: { ...evidence, mounts },
    });
  }
  return await checkUpperdirUnderRoot(upperdirFromMount(mounts[0]!), overlayfsSnapshotsDir(endpoint.root));
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
  const step = 'Images/Get';
  const evidence = { image: name, socket: endpoint.socket, namespace };
  const failed = (message: string, cause?: unknown): RootfsError =>
    new RootfsError(RootfsErrorCode.CONTAINERD_QUERY_FAILED, message, { step, evidence, ...(cause !== undefined ? { cause } : {}) });
  let image: { target?: { digest: string } | null } | null | undefined;
  try {
    ({ image } = await containerdCall<{ name: string }, { image?: { target?: { digest: string } | null } | null }>(endpoint, 'Images', 'Get', { name }));
  } catch (err) {
    throw failed(`containerd (${endpoint.socket}) did not answer ${step} for ${JSON.stringify(name)}: ${(err as Error).message}`, err);
  }
  const digest = image?.target?.digest ?? '';
  if (!/^sha256:[0-9a-f]{64}$/.test(digest)) throw failed(`containerd's image ${JSON.stringify(name)} has no sha256 target digest (got ${JSON.stringify(digest)})`);
  return digest;
}
