/**
 * Opening the weights' source files, which the worker named: root reads them, so each path resolves only
 * inside the container's rootfs (openat2 RESOLVE_IN_ROOT: `..` and absolute links stay inside it) or below
 * an allowed host model directory from the agent's config (RESOLVE_BENEATH with no symlink at all), and
 * must be a regular file. Never by path from the host's root.
 */
import { close, fstat, read } from 'node:fs';
import type { BigIntStats, Stats } from 'node:fs';
import { promisify } from 'node:util';

import { FsAt, O_NONBLOCK, O_RDONLY } from '../../sys/fs-at.js';

const fstatAsync = promisify(fstat);
const closeAsync = promisify(close);

/** An open source: the subset of fs.promises.FileHandle the loader and the digests use, over a raw fd. */
export class SourceFile {
  constructor(readonly fd: number) {}

  stat(): Promise<Stats>;
  stat(options: { bigint: true }): Promise<BigIntStats>;
  stat(options?: { bigint?: boolean }): Promise<Stats | BigIntStats> {
    return options?.bigint ? fstatAsync(this.fd, { bigint: true }) : fstatAsync(this.fd);
  }

  read(buffer: Buffer, offset: number, length: number, position: number): Promise<{ bytesRead: number }> {
    return new Promise((resolve, reject) => {
      read(this.fd, buffer, offset, length, position, (err, bytesRead) => (err ? reject(err) : resolve({ bytesRead })));
    });
  }

  close(): Promise<void> {
    return closeAsync(this.fd);
  }
}

/** A host directory the agent's config allows weights from, as the container sees it (`prefix`). */
export interface AllowedModelDir {
  /** Absolute, normal container path it is mounted at, e.g. "/models". */
  prefix: string;
  /** An O_PATH|O_DIRECTORY fd of the host directory (the agent's). */
  dirFd: number;
}

/**
 * An opener for loadWeights: a path under an allowed model dir's prefix opens below that dir (no link
 * followed); any other path opens inside the rootfs `rootFd`. O_NONBLOCK: a FIFO the pod planted does not
 * hang the reader; a non-regular file is refused.
 */
export function sourceOpener(fsAt: FsAt, rootFd: number, allowed: readonly AllowedModelDir[] = []): (path: string) => Promise<SourceFile> {
  return async (path: string) => {
    const dir = allowed.find((d) => path.startsWith(`${d.prefix}/`));
    const fd = dir
      ? fsAt.openBeneath(dir.dirFd, path.slice(dir.prefix.length + 1), O_RDONLY | O_NONBLOCK)
      : fsAt.openInRoot(rootFd, path, O_RDONLY | O_NONBLOCK);
    const file = new SourceFile(fd);
    const st = await file.stat().catch(async (err: unknown) => {
      await file.close();
      throw err;
    });
    if (!st.isFile()) {
      await file.close();
      throw new Error(`${path} is not a regular file`);
    }
    return file;
  };
}
