/**
 * The poststop hook of a restore target (design.md, Restore step 5): runs after the container is deleted and
 * removes what thaw made for it: the control directory, the CRIU work directory and the rootfs diff's undo
 * journal (the rootfs it describes is gone with the container). It never fails (a
 * poststop failure is only a warning to the runtime, and there is nothing to retry); what it could not
 * remove is reported on stderr.
 */
import { rm } from 'node:fs/promises';
import { errorMessage } from '../errors.js';

export interface PoststopOptions {
  controlDir?: string;
  workDir?: string;
  /** `<workRoot>/rootfs-undo/<container id>.json` (restore-flow's undoJournalFor). */
  undoJournal?: string;
}

export async function runPoststop(o: PoststopOptions): Promise<string[]> {
  const problems: string[] = [];
  for (const dir of [o.controlDir, o.workDir, o.undoJournal]) {
    if (dir === undefined || dir === '') continue;
    try {
      await rm(dir, { recursive: true, force: true });
    } catch (err) {
      problems.push(`${dir}: ${errorMessage(err)}`);
    }
  }
  return problems;
}
