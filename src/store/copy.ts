/**
 * Copies a checkpoint between two stores (a shared directory, an RWX volume mounted on every node, and this
 * node's local store), every byte hashed on the way and checked against the manifest, into a `.tmp-*`
 * directory of the target that is published atomically under the same manifest (its id kept) or removed.
 */
import { constants as fsConstants } from 'node:fs';
import { mkdir, open, readFile } from 'node:fs/promises';
import { isPulledKey } from '../checkpoint-name.js';
import { OCI_CONFIG_FILE_NAME, OCI_MANIFEST_FILE_NAME } from './provenance.js';
import { createHash } from 'node:crypto';
import { dirname, join } from 'node:path';
import { forEachLimit } from '../sys/concurrency.js';
import { openRegularNoFollow } from './digest.js';
import { StoreError, StoreErrorCode, storeAborted, throwIfAborted } from './errors.js';
import type { LocalStore, OpenedCheckpoint } from './local-store.js';

const COPY_BUFFER_BYTES = 8 * 1024 * 1024;

export interface CopyOptions {
  signal?: AbortSignal;
  /** Files copied at once (default 2). */
  concurrency?: number;
  /** Replace a checkpoint of that name in the target (refused while it is leased). */
  replace?: boolean;
}

export async function copyCheckpoint(from: LocalStore, to: LocalStore, name: string, o: CopyOptions = {}): Promise<OpenedCheckpoint> {
  const step = `copy checkpoint ${name} from ${from.root} to ${to.root}`;
  const source = await from.open(name);
  const pending = await to.beginCheckpoint(name);
  try {
    await forEachLimit(
      source.manifest.files,
      o.concurrency ?? 2,
      async (file) => to.hashLimiter.run(async () => {
        const dest = join(pending.dir, file.path);
        await mkdir(dirname(dest), { recursive: true, mode: 0o700 });
        const input = await openRegularNoFollow(join(source.paths.dir, file.path), step);
        const output = await open(dest, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOFOLLOW, 0o600);
        try {
          const hash = createHash('sha256');
          const buffer = Buffer.allocUnsafe(COPY_BUFFER_BYTES);
          let size = 0;
          for (;;) {
            throwIfAborted(o.signal, step);
            const { bytesRead } = await input.read(buffer, 0, buffer.length, size);
            if (bytesRead === 0) break;
            hash.update(buffer.subarray(0, bytesRead));
            for (let off = 0; off < bytesRead; ) off += (await output.write(buffer, off, bytesRead - off, size + off)).bytesWritten;
            size += bytesRead;
          }
          const actual = hash.digest('hex');
          if (actual !== file.sha256 || size !== file.size) {
            throw new StoreError(StoreErrorCode.DIGEST_MISMATCH, `${file.path}: expected sha256:${file.sha256} (${file.size} bytes), found sha256:${actual} (${size} bytes)`, {
              step,
              evidence: { file: file.path, expected: file.sha256, actual },
            });
          }
        } finally {
          await input.close();
          await output.close();
        }
      }, { ...(o.signal ? { signal: o.signal } : {}), step, aborted: storeAborted(step) }),
      { step, ...(o.signal ? { signal: o.signal } : {}), aborted: storeAborted(step) },
    );
    // A pulled checkpoint takes its registry bytes along (checked again when the target opens it).
    const provenance = isPulledKey(name)
      ? { imageManifest: await readFile(join(source.paths.dir, OCI_MANIFEST_FILE_NAME)), config: await readFile(join(source.paths.dir, OCI_CONFIG_FILE_NAME)) }
      : undefined;
    return await pending.publishVerified(source.manifest, { ...(o.signal ? { signal: o.signal } : {}), ...(o.replace ? { replace: true } : {}), ...(provenance ? { provenance } : {}) });
  } catch (err) {
    await pending.abort().catch(() => undefined);
    throw err;
  }
}
