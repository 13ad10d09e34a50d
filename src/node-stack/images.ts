import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { chmod, copyFile, mkdir, mkdtemp, rename, rm, stat, symlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { StackError, StackErrorCode } from './errors.js';
import { runCommand } from './exec.js';
import { stackPaths, type StackFlavor } from './paths.js';

const DEFAULT_BUSYBOX_FLAVOR: StackFlavor = '1.7';

export const OCI_MEDIA_TYPES = {
  index: 'application/vnd.oci.image.index.v1+json',
  manifest: 'application/vnd.oci.image.manifest.v1+json',
  config: 'application/vnd.oci.image.config.v1+json',
  layer: 'application/vnd.oci.image.layer.v1.tar',
} as const;

/** The annotation naming a manifest in an OCI layout's index.json. */
export const OCI_REF_NAME_ANNOTATION = 'org.opencontainers.image.ref.name';

/** Applets linked in a busybox rootfs: what tests, the pause process and shells need. */
export const BUSYBOX_APPLETS = [
  'sh', 'ash', 'cat', 'echo', 'sleep', 'ls', 'ps', 'kill', 'true', 'false', 'env', 'id', 'mkdir', 'rm', 'cp', 'mv',
  'grep', 'sed', 'awk', 'head', 'tail', 'wc', 'date', 'hostname', 'ip', 'nc', 'wget', 'mount', 'umount', 'touch',
  'test', '[', 'printf', 'dd', 'seq', 'md5sum', 'sha256sum', 'stat', 'readlink', 'ln', 'chmod', 'uname', 'sync',
  'xargs', 'tr', 'cut', 'sort', 'uniq', 'tee', 'find', 'du', 'df', 'free', 'top', 'vi', 'yes', 'usleep', 'timeout',
  'ping', 'ifconfig', 'nslookup', 'pidof', 'pgrep', 'pkill', 'basename', 'dirname', 'expr', 'which', 'tar', 'gzip',
] as const;

export interface ImageConfigInput {
  entrypoint?: string[];
  cmd?: string[];
  /** `KEY=value` entries; default PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin. */
  env?: string[];
  workingDir?: string;
}

export const DEFAULT_IMAGE_ENV = ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'];

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
}

/** The JSON blobs of a one-layer OCI image, with their digests. */
export interface OciLayoutDocs {
  config: Buffer;
  configDescriptor: Descriptor;
  manifest: Buffer;
  manifestDescriptor: Descriptor;
  index: Buffer;
}

export function sha256Digest(data: Buffer | string): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`;
}

/**
 * The config, manifest and index.json of a one-layer image whose layer (an uncompressed tar) has
 * `layerDigest` and `layerSize`. Deterministic (no creation time), so the same rootfs and settings
 * give the same manifest digest, which keys the layout cache. Pure.
 */
export function buildOciLayoutDocs(layer: { digest: string; size: number }, ref: string, cfg: ImageConfigInput): OciLayoutDocs {
  const imageConfig = {
    architecture: 'amd64',
    os: 'linux',
    config: {
      ...(cfg.entrypoint ? { Entrypoint: cfg.entrypoint } : {}),
      ...(cfg.cmd ? { Cmd: cfg.cmd } : {}),
      Env: cfg.env ?? DEFAULT_IMAGE_ENV,
      ...(cfg.workingDir ? { WorkingDir: cfg.workingDir } : {}),
    },
    rootfs: { type: 'layers', diff_ids: [layer.digest] },
  };
  const config = Buffer.from(JSON.stringify(imageConfig));
  const configDescriptor: Descriptor = { mediaType: OCI_MEDIA_TYPES.config, digest: sha256Digest(config), size: config.length };
  const manifest = Buffer.from(JSON.stringify({
    schemaVersion: 2,
    mediaType: OCI_MEDIA_TYPES.manifest,
    config: configDescriptor,
    layers: [{ mediaType: OCI_MEDIA_TYPES.layer, digest: layer.digest, size: layer.size }],
  }));
  const manifestDescriptor: Descriptor = {
    mediaType: OCI_MEDIA_TYPES.manifest,
    digest: sha256Digest(manifest),
    size: manifest.length,
    annotations: { [OCI_REF_NAME_ANNOTATION]: ref },
  };
  const index = Buffer.from(JSON.stringify({
    schemaVersion: 2,
    mediaType: OCI_MEDIA_TYPES.index,
    manifests: [{ ...manifestDescriptor, platform: { architecture: 'amd64', os: 'linux' } }],
  }));
  return { config, configDescriptor, manifest, manifestDescriptor, index };
}

/** A reference as containerd names images: `docker.io/thaw/busybox:1`. Short names are refused (they would be normalised). */
export function assertFullyQualifiedRef(ref: string): void {
  if (!/^([a-z0-9-]+\.[a-z0-9.-]+|localhost)(:\d+)?\/[a-z0-9._/-]+(:[\w.-]+|@sha256:[0-9a-f]{64})$/.test(ref)) {
    throw new StackError(StackErrorCode.INVALID_OPTION, `image ref "${ref}" is not fully qualified (e.g. docker.io/thaw/busybox:1)`, {
      step: 'check image ref', evidence: { ref },
    });
  }
}

async function fileSha256(file: string): Promise<{ digest: string; size: number }> {
  const hash = createHash('sha256');
  let size = 0;
  for await (const chunk of createReadStream(file)) {
    hash.update(chunk as Buffer);
    size += (chunk as Buffer).length;
  }
  return { digest: `sha256:${hash.digest('hex')}`, size };
}

export interface BuildLayoutOptions extends ImageConfigInput {
  ref: string;
  rootfsDir: string;
  /** GNU tar to use (the stack's own, so the layer is the same on Debian 12 and 13). */
  tar: string;
  /** Where built layout archives are kept, keyed by manifest digest. */
  cacheDir: string;
  signal?: AbortSignal;
}

/**
 * Builds an OCI image layout archive (a tar of oci-layout, index.json and blobs/) from a rootfs
 * directory, with a reproducible layer tar (sorted names, mtime 0, uid/gid 0). Returns the archive
 * path inside `cacheDir` (reused when present) and the manifest digest.
 */
export async function buildOciArchive(o: BuildLayoutOptions): Promise<{ archive: string; manifestDigest: string; cached: boolean }> {
  assertFullyQualifiedRef(o.ref);
  await mkdir(o.cacheDir, { recursive: true, mode: 0o755 });
  const work = await mkdtemp(path.join(o.cacheDir, '.build-'));
  try {
    const layerTmp = path.join(work, 'layer.tar');
    await runCommand(o.tar, ['--sort=name', '--mtime=@0', '--owner=0', '--group=0', '--numeric-owner',
      '--format=posix', '--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime',
      '-C', o.rootfsDir, '-cf', layerTmp, '.'], {
      step: 'tar image layer', signal: o.signal, errorCode: StackErrorCode.IMAGE_FAILED,
    });
    const layer = await fileSha256(layerTmp);
    const docs = buildOciLayoutDocs(layer, o.ref, o);
    const key = docs.manifestDescriptor.digest.slice('sha256:'.length);
    const archive = path.join(o.cacheDir, `${key}.tar`);
    if (await stat(archive).then(() => true, () => false)) {
      return { archive, manifestDigest: docs.manifestDescriptor.digest, cached: true };
    }
    const layout = path.join(work, 'layout');
    const blobs = path.join(layout, 'blobs', 'sha256');
    await mkdir(blobs, { recursive: true });
    await rename(layerTmp, path.join(blobs, layer.digest.slice(7)));
    await writeFile(path.join(blobs, docs.configDescriptor.digest.slice(7)), docs.config);
    await writeFile(path.join(blobs, docs.manifestDescriptor.digest.slice(7)), docs.manifest);
    await writeFile(path.join(layout, 'index.json'), docs.index);
    await writeFile(path.join(layout, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
    const tmpArchive = path.join(work, 'image.tar');
    await runCommand(o.tar, ['--sort=name', '--mtime=@0', '--owner=0', '--group=0', '--numeric-owner',
      '-C', layout, '-cf', tmpArchive, 'oci-layout', 'index.json', 'blobs'], {
      step: 'tar image layout', signal: o.signal, errorCode: StackErrorCode.IMAGE_FAILED,
    });
    await chmod(tmpArchive, 0o644);
    await rename(tmpArchive, archive);
    return { archive, manifestDigest: docs.manifestDescriptor.digest, cached: false };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/**
 * Fills `dir` with a minimal busybox rootfs: the static busybox at /bin/busybox with applet symlinks,
 * /etc/passwd and /etc/group (root, nobody), and empty /tmp, /run, /proc, /sys, /dev, /etc dirs
 * (CRIU needs /run in a restore target). `extraFiles` maps rootfs paths to contents (a string or
 * Buffer; mode 0755 when the path is under a bin dir, else 0644). `busyboxPath` defaults to the 1.7
 * stack's busybox-static.
 */
export async function buildBusyboxRootfs(
  dir: string,
  extraFiles: Record<string, string | Buffer> = {},
  busyboxPath: string = stackPaths(DEFAULT_BUSYBOX_FLAVOR).busybox,
): Promise<void> {
  for (const d of ['bin', 'etc', 'tmp', 'run', 'proc', 'sys', 'dev', 'root', 'var/tmp', 'usr/bin', 'sbin']) {
    await mkdir(path.join(dir, d), { recursive: true, mode: 0o755 });
  }
  await chmod(path.join(dir, 'tmp'), 0o1777);
  await chmod(path.join(dir, 'var/tmp'), 0o1777);
  await copyFile(busyboxPath, path.join(dir, 'bin', 'busybox'));
  await chmod(path.join(dir, 'bin', 'busybox'), 0o755);
  for (const applet of BUSYBOX_APPLETS) {
    await symlink('busybox', path.join(dir, 'bin', applet)).catch((e: NodeJS.ErrnoException) => {
      if (e.code !== 'EEXIST') throw e;
    });
  }
  await writeFile(path.join(dir, 'etc', 'passwd'), 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n');
  await writeFile(path.join(dir, 'etc', 'group'), 'root:x:0:\nnogroup:x:65534:\n');
  for (const [rel, content] of Object.entries(extraFiles)) {
    const target = path.join(dir, rel);
    await mkdir(path.dirname(target), { recursive: true, mode: 0o755 });
    await writeFile(target, content);
    await chmod(target, /(^|\/)s?bin\//.test(rel) ? 0o755 : 0o644);
  }
}

export interface ImportImageOptions extends ImageConfigInput {
  ref: string;
  rootfsDir: string;
  signal?: AbortSignal;
  timeoutMs?: number;
}

/** What importImage needs of a stack (a NodeStack has it). */
export interface ImageTarget {
  address: string;
  ctrPath: string;
  tarPath: string;
  imageCacheDir: string;
}

export const DEFAULT_IMAGE_IMPORT_TIMEOUT_MS = 60_000;

/**
 * Builds (or takes from the cache) the OCI archive of `rootfsDir` and imports it into the stack's
 * containerd, namespace k8s.io (the CRI namespace), named `ref`. Throws STACK_IMAGE_FAILED with ctr's
 * stderr on failure.
 */
export async function importImageInto(target: ImageTarget, o: ImportImageOptions): Promise<{ ref: string; manifestDigest: string; cached: boolean }> {
  const built = await buildOciArchive({ ...o, tar: target.tarPath, cacheDir: target.imageCacheDir });
  await runCommand(target.ctrPath, ['-a', target.address, '-n', 'k8s.io', 'images', 'import', '--index-name', o.ref, built.archive], {
    step: `ctr images import ${o.ref}`, signal: o.signal, timeoutMs: o.timeoutMs ?? DEFAULT_IMAGE_IMPORT_TIMEOUT_MS,
    errorCode: StackErrorCode.IMAGE_FAILED,
  });
  return { ref: o.ref, manifestDigest: built.manifestDigest, cached: built.cached };
}

/** A fresh temp dir for a rootfs (the caller removes it). */
export function tempRootfsDir(): Promise<string> {
  return mkdtemp(path.join(os.tmpdir(), 'thawfs-'));
}
