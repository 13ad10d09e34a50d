/** The CLI's error codes (`INSTALL_*`: `thaw install`). */
export const InstallErrorCode = {
  /** An option is malformed: a relative path, a toolkitDir that is not under /, ... */
  INVALID_OPTION: 'INSTALL_INVALID_OPTION',
  /** The package, the node binary or the toolkit lacks something (not built, a dependency not installed). */
  SOURCE_MISSING: 'INSTALL_SOURCE_MISSING',
  /** A toolkit binary's ELF interpreter is not inside toolkitDir: the copy would not run at that path. */
  TOOLKIT_NOT_RELOCATED: 'INSTALL_TOOLKIT_NOT_RELOCATED',
  /** Another install (other content) is in the way and `force` was not given; evidence lists the paths. */
  EXISTS: 'INSTALL_EXISTS',
  /** The AbortSignal fired before the swap. */
  ABORTED: 'INSTALL_ABORTED',
  /** A filesystem call failed (cause: the Node error with its errno). */
  IO: 'INSTALL_IO',
} as const;
export type InstallErrorCode = (typeof InstallErrorCode)[keyof typeof InstallErrorCode];
