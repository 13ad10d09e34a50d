/** The provisioners' lock: one builder per prefix, across processes (several test files, agents, setup runs). */
import { open, readFile, rm, stat } from 'node:fs/promises';
import { StackError, StackErrorCode } from './errors.js';
import { sleep, throwIfAborted } from './exec.js';
import { processAlive } from '../util.js';


/**
 * A lock file holding the owner's pid, created with O_EXCL. A lock whose owner is dead is taken over.
 * Returns the release function; throws STACK_PROVISION_FAILED when another live owner holds it past
 * `timeoutMs`.
 */
export async function acquireLock(file: string, timeoutMs: number, signal?: AbortSignal): Promise<() => Promise<void>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    throwIfAborted(signal, 'take provisioning lock');
    try {
      const fh = await open(file, 'wx', 0o644);
      await fh.writeFile(String(process.pid));
      await fh.close();
      return async () => { await rm(file, { force: true }); };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
    const owner = Number.parseInt(await readFile(file, 'utf8').catch(() => ''), 10);
    // An empty file may be a lock being written this instant: only an old one counts as abandoned.
    const age = Date.now() - (await stat(file).then((s) => s.mtimeMs, () => 0));
    if (Number.isFinite(owner) ? !processAlive(owner) : age > 10_000) {
      await rm(file, { force: true });
      continue;
    }
    if (Date.now() > deadline) {
      throw new StackError(StackErrorCode.PROVISION_FAILED, `another provisioner (pid ${owner}) holds ${file}`, {
        step: 'take provisioning lock', evidence: { file, owner, timeoutMs },
      });
    }
    await sleep(500, signal, 'take provisioning lock');
  }
}
