/**
 * The rootfs diff: what a container changed in its filesystem, saved at checkpoint and replayed into the
 * target container's rootfs before any of its processes runs (design.md, Checkpoint step 3, Restore step 2).
 *
 *   - containerd-upperdir.ts  the container's upperdir from containerd's snapshot record, checked under its root
 *   - capture.ts     the upperdir walked from directory fds and archived in-process
 *   - tar-format.ts  the archive's headers, written and decoded (no I/O)
 *   - tar-reader.ts  the one reader: decode, validate each entry, hand it on
 *   - apply.ts       deletions and extraction through *at calls relative to the rootfs fd
 *   - undo.ts        the apply's undo journal: originals moved into a backup, created paths recorded, undone
 *
 * Files: `rootfs-diff.tar` (ustar + pax) and `deleted-files.json` (a JSON array of paths relative to the rootfs,
 * no leading '/', that the container deleted: its whiteouts and its opaque directories).
 */
export { RootfsError, RootfsErrorCode } from './errors.js';
export {
  checkUpperdirUnderRoot, overlayfsSnapshotsDir, readContainerdImageDigest, readContainerdUpperdir, upperdirFromMount, type ContainerdEndpoint, type ContainerdMount,
} from './containerd-upperdir.js';
export { captureRootfsDiff, compileExcludes, DEFAULT_ROOTFS_EXCLUDES, type CaptureRootfsDiffOptions, type CaptureRootfsDiffResult } from './capture.js';
export { applyRootfsDiff, parseDeletedFiles, type ApplyRootfsDiffOptions, type ApplyRootfsDiffResult } from './apply.js';
export { discardUndo, undoRootfsDiff, UNDO_DIR_PREFIX, type DirMeta, type UndoJournal, type UndoStep } from './undo.js';
export { readTarEntries, EntryChecker } from './tar-reader.js';
export type { TarEntry, TarEntryType } from './tar-format.js';
