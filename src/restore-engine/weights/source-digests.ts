/**
 * sha256 of weight source files, computed once per node: each digest is stamped with the file's identity
 * (device, inode, size, mtime and ctime in ns, from fstat of the open descriptor), as the store's verified
 * stamps are. Any write, truncate or rename changes ctime, which only the kernel sets, so an unchanged
 * identity means unchanged bytes short of an attacker who is root already. The cache is in memory and,
 * when given a path, in one JSON file (thaw's own directory, 0600, written by rename).
 */
import { createHash, randomBytes } from 'node:crypto';
import type { BigIntStats } from 'node:fs';
import { readFile, rename, rm, writeFile } from 'node:fs/promises';
import { Worker } from 'node:worker_threads';

const HASH_CHUNK = 8 << 20;

// The sha256 of a whole file on a thread of its own (a model's shards are GB each: hashed on the event loop,
// one would hold it for seconds). The fd is the caller's (descriptors are per process). Source text (eval):
// the same code runs from dist/ and under vitest.
const HASH_WORKER = String.raw`
const { parentPort, workerData } = require('node:worker_threads');
const { readSync } = require('node:fs');
const { createHash } = require('node:crypto');
const h = createHash('sha256');
const buf = Buffer.allocUnsafe(workerData.chunk);
try {
  for (let pos = 0; ; ) {
    const n = readSync(workerData.fd, buf, 0, buf.length, pos);
    if (n === 0) break;
    h.update(buf.subarray(0, n));
    pos += n;
  }
  parentPort.postMessage({ sha256: h.digest('hex') });
} catch (err) {
  parentPort.postMessage({ error: String(err && err.message || err) });
}
`;

function hashFdInThread(fd: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const w = new Worker(HASH_WORKER, { eval: true, workerData: { fd, chunk: HASH_CHUNK } });
    w.once('message', (m: { sha256?: string; error?: string }) => (m.sha256 !== undefined ? resolve(m.sha256) : reject(new Error(m.error ?? 'hash failed'))));
    w.once('error', reject);
    w.once('exit', (code) => reject(new Error(`the hash thread exited ${code}`)));
  });
}
const MAX_ENTRIES = 65536;

/** The part of an open file digests need (a FileHandle or sources.ts's SourceFile). */
export interface DigestSource {
  stat(options: { bigint: true }): Promise<BigIntStats>;
  read(buffer: Buffer, offset: number, length: number, position: number): Promise<{ bytesRead: number }>;
  /** The descriptor, when there is one: the file is then hashed on a thread of its own. */
  readonly fd?: number;
}

export async function fileIdentity(fh: DigestSource): Promise<string> {
  const st = await fh.stat({ bigint: true });
  return `${st.dev}:${st.ino}:${st.size}:${st.mtimeNs}:${st.ctimeNs}`;
}

export class SourceDigests {
  readonly #byIdentity = new Map<string, string>();
  readonly #path: string | undefined;
  #loaded = false;

  constructor(path?: string) {
    this.#path = path;
  }

  async #load(): Promise<void> {
    if (this.#loaded || !this.#path) return;
    this.#loaded = true;
    try {
      const doc = JSON.parse(await readFile(this.#path, 'utf8')) as unknown;
      if (doc && typeof doc === 'object' && !Array.isArray(doc)) {
        for (const [k, v] of Object.entries(doc as Record<string, unknown>)) {
          if (typeof v === 'string' && /^[0-9a-f]{64}$/.test(v) && this.#byIdentity.size < MAX_ENTRIES) this.#byIdentity.set(k, v);
        }
      }
    } catch {
      // absent or unreadable: start empty (the cost is one more hash of each file)
    }
  }

  /** The stamped sha256 of the file as it is now (its identity), or undefined when it has none: nothing is read. */
  async stamped(fh: DigestSource): Promise<{ identity: string; sha256?: string }> {
    await this.#load();
    const identity = await fileIdentity(fh);
    const sha256 = this.#byIdentity.get(identity);
    return sha256 !== undefined ? { identity, sha256 } : { identity };
  }

  /**
   * Records a digest hashed elsewhere (the load's readers hash inline with their reads) under the identity the
   * file had before it was read; only if the file still has it (nothing changed while it was read).
   */
  async stamp(fh: DigestSource, identityBefore: string, sha256: string): Promise<void> {
    if ((await fileIdentity(fh)) !== identityBefore) return;
    if (this.#byIdentity.size >= MAX_ENTRIES) this.#byIdentity.clear();
    this.#byIdentity.set(identityBefore, sha256);
    await this.#save();
  }

  /** The file's sha256: from the stamp when its identity is unchanged, else hashed now (and stamped). */
  async digest(fh: DigestSource): Promise<string> {
    await this.#load();
    const before = await fileIdentity(fh);
    const known = this.#byIdentity.get(before);
    if (known) return known;
    let sha: string;
    if (typeof fh.fd === 'number') {
      sha = await hashFdInThread(fh.fd);
    } else {
      const hash = createHash('sha256');
      const buf = Buffer.allocUnsafe(HASH_CHUNK);
      for (let pos = 0; ; ) {
        const { bytesRead } = await fh.read(buf, 0, buf.length, pos);
        if (bytesRead === 0) break;
        hash.update(buf.subarray(0, bytesRead));
        pos += bytesRead;
      }
      sha = hash.digest('hex');
    }
    // Stamped only if nothing changed while it was hashed.
    if ((await fileIdentity(fh)) === before) {
      if (this.#byIdentity.size >= MAX_ENTRIES) this.#byIdentity.clear();
      this.#byIdentity.set(before, sha);
      await this.#save();
    }
    return sha;
  }

  #saving: Promise<void> = Promise.resolve();

  /** One save at a time, each of the whole map; a failed save costs only a later re-hash, never the load. */
  #save(): Promise<void> {
    const path = this.#path;
    if (!path) return Promise.resolve();
    this.#saving = this.#saving.then(async () => {
      const tmp = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
      try {
        await writeFile(tmp, JSON.stringify(Object.fromEntries(this.#byIdentity)), { mode: 0o600 });
        await rename(tmp, path);
      } catch {
        await rm(tmp, { force: true }).catch(() => undefined);
      }
    });
    return this.#saving;
  }
}
