/**
 * Leases: "this process is reading checkpoint <name>" (a restore), so that delete() and a replacing publish()
 * refuse it (STORE_IN_USE). Counted per store instance; the first lease of a name also writes
 * `<root>/.leases/<key>@<pid>-<start>-<token>` (the key's '/' written '+'), so that another process (the CLI's delete) or store instance
 * sees it, and the last release removes that file. A lease file whose process is gone (pid and start time)
 * is ignored, and removed by recover(). No flock: Node has none, and a file per holder is enough for "is
 * anyone reading this?".
 */
import { randomBytes } from 'node:crypto';
import { mkdir, readdir, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ioError } from './errors.js';
import { CHECKPOINT_DIR_MODE, CHECKPOINT_FILE_MODE, keyFromFileName, keyToFileName, LEASE_PATTERN, LEASES_DIR_NAME, sameProcessRunning, type StoreLayout } from './layout.js';

/** Release a lease; idempotent. */
export type ReleaseLease = () => Promise<void>;

export interface LeaseFile {
  name: string;
  pid: number;
  startTime: string;
  path: string;
}

export class Leases {
  private readonly layout: StoreLayout;
  private readonly now: () => Date;
  /** Tells this instance's lease files from other instances' of the same process. */
  private readonly instanceToken = randomBytes(4).toString('hex');
  /** name → number of leases this process holds. */
  private readonly counts = new Map<string, number>();

  constructor(layout: StoreLayout, now: () => Date) {
    this.layout = layout;
    this.now = now;
  }

  /** Takes a lease on `name` (the caller checked that it exists) until the returned function is called. */
  async acquire(name: string, step: string): Promise<ReleaseLease> {
    const count = this.counts.get(name) ?? 0;
    this.counts.set(name, count + 1);
    if (count === 0) {
      try {
        await mkdir(join(this.layout.root, LEASES_DIR_NAME), { mode: CHECKPOINT_DIR_MODE, recursive: true });
        await writeFile(this.path(name), JSON.stringify({ pid: process.pid, since: this.now().toISOString() }), {
          mode: CHECKPOINT_FILE_MODE,
        });
      } catch (err) {
        this.counts.set(name, (this.counts.get(name) ?? 1) - 1);
        throw ioError(step, 'cannot write the lease file', err);
      }
    }
    let released = false;
    return async () => {
      if (released) return;
      released = true;
      const left = (this.counts.get(name) ?? 1) - 1;
      if (left > 0) {
        this.counts.set(name, left);
        return;
      }
      this.counts.delete(name);
      await unlink(this.path(name)).catch(() => undefined);
    };
  }

  /** True while this instance, or another live instance or process, holds a lease on `name`. */
  async isLeased(name: string): Promise<boolean> {
    if ((this.counts.get(name) ?? 0) > 0) return true;
    const own = this.path(name);
    return (await this.files()).some((l) => l.name === name && l.path !== own && sameProcessRunning(l.pid, l.startTime));
  }

  private path(name: string): string {
    return join(this.layout.root, LEASES_DIR_NAME, `${keyToFileName(name)}@${this.layout.processTag}-${this.instanceToken}`);
  }

  /** Every lease file under the root, of any process. */
  async files(): Promise<LeaseFile[]> {
    let entries: string[];
    try {
      entries = await readdir(join(this.layout.root, LEASES_DIR_NAME));
    } catch {
      return [];
    }
    return entries.flatMap((entry) => {
      const match = LEASE_PATTERN.exec(entry);
      if (!match) return [];
      return [{ name: keyFromFileName(match[1]!), pid: Number(match[2]), startTime: match[3]!, path: join(this.layout.root, LEASES_DIR_NAME, entry) }];
    });
  }
}
