/**
 * Crash recovery of the local store. A checkpoint is written into a `.tmp-*` directory and renamed into place
 * only once durable (publish.ts), so a crash at any point leaves at most a `.tmp-*` directory, which
 * recoverStore (run by openLocalStore) removes. `.tmp-*` names carry the writer's pid and start time so that
 * a store opened by a second process (the CLI beside the agent) leaves a live writer's directory alone. The
 * processes using one store are expected to share the host's pid namespace (the agent runs with hostPID).
 */
import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from '../log.js';
import { ioError } from './errors.js';
import { sameProcessRunning, TMP_PATTERN, TMP_PREFIX, type StoreLayout } from './layout.js';
import type { Leases } from './leases.js';

/**
 * Removes what a crashed writer (or an interrupted delete/replace) left: `.tmp-*` directories whose writer
 * is gone, and lease files of dead processes. "Gone" is judged by pid and process start time, so a
 * directory of a live writer (this process included) is kept, and one of an earlier process that had the
 * same pid (an agent restarted as pid 1 of its container) is removed. A `.tmp-*` name without a writer
 * tag is removed. Safe to call again. Returns the removed paths, each logged.
 */
export async function recoverStore(layout: StoreLayout, leases: Leases, logger: Logger): Promise<string[]> {
  const step = 'recover checkpoint store';
  const removed: string[] = [];
  for (const entry of await readdir(layout.root)) {
    if (!entry.startsWith(TMP_PREFIX)) continue;
    const match = TMP_PATTERN.exec(entry);
    const pid = match ? Number(match[2]) : undefined;
    // A live process's directory is a checkpoint being written (or removed) right now.
    if (match && sameProcessRunning(pid!, match[3]!)) continue;
    const path = join(layout.root, entry);
    try {
      await rm(path, { recursive: true, force: true });
    } catch (err) {
      throw ioError(step, `cannot remove ${path}`, err);
    }
    removed.push(path);
    logger.info('removed an unfinished checkpoint directory', { path, writerPid: pid });
  }
  for (const lease of await leases.files()) {
    if (!sameProcessRunning(lease.pid, lease.startTime)) {
      await rm(lease.path, { force: true });
      removed.push(lease.path);
      logger.info('removed a stale checkpoint lease', { path: lease.path, pid: lease.pid });
    }
  }
  return removed;
}
