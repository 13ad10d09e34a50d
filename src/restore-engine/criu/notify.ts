/**
 * Handlers for CRIU's notifications (its "action scripts", sent over RPC when `notify_scripts` is set).
 *
 * CRIU stops at each event and waits for our answer: a handler's returned promise is awaited before
 * CRIU goes on, so a handler is where thaw does what must happen at that exact point. Order seen with
 * CRIU 4.1.1: dump pre-dump → post-dump; restore pre-restore → post-restore → pre-resume →
 * post-resume (post-restore comes while the tasks are still stopped). A handler that throws (or
 * rejects) makes us answer `notify_success=false`: CRIU aborts the operation, and the operation
 * rejects with CRIU_NOTIFY_FAILED carrying the handler's error as its cause. Implement only the
 * events you need; an event without a handler is answered success and logged at debug level.
 */
export interface CriuNotifyHandlers {
  /** Dump: the tree is about to be frozen and dumped. */
  preDump?(): void | Promise<void>;
  /** Dump: images are written; with leave-running the tree is still frozen until this returns. */
  postDump?(): void | Promise<void>;
  /** Restore: before anything is restored. */
  preRestore?(): void | Promise<void>;
  /** Restore: namespaces of the restored root exist; `pid` is its pid (as the swrk process sees it). */
  setupNamespaces?(pid: number): void | Promise<void>;
  postSetupNamespaces?(): void | Promise<void>;
  /** Restore: the tree is restored but not yet resumed; `pid` is the root's pid. */
  postRestore?(pid: number): void | Promise<void>;
  networkLock?(): void | Promise<void>;
  networkUnlock?(): void | Promise<void>;
  /** Restore: just before the tasks resume. */
  preResume?(): void | Promise<void>;
  /** Restore: the tasks run again. */
  postResume?(): void | Promise<void>;
  /**
   * Restore with `orphanPtsMaster`: the master side of the restored tty, passed as an fd (SCM_RIGHTS).
   * The handler owns `fd` and must close it.
   */
  orphanPtsMaster?(fd: number): void | Promise<void>;
  /** Page server / lazy pages: CRIU is ready. */
  statusReady?(): void | Promise<void>;
}

/** CRIU's script names (criu/action-scripts.c) → the handler method that answers them. */
export const NOTIFY_SCRIPT_HANDLERS = {
  'pre-dump': 'preDump',
  'post-dump': 'postDump',
  'pre-restore': 'preRestore',
  'setup-namespaces': 'setupNamespaces',
  'post-setup-namespaces': 'postSetupNamespaces',
  'post-restore': 'postRestore',
  'network-lock': 'networkLock',
  'network-unlock': 'networkUnlock',
  'pre-resume': 'preResume',
  'post-resume': 'postResume',
  'orphan-pts-master': 'orphanPtsMaster',
  'status-ready': 'statusReady',
} as const satisfies Record<string, keyof CriuNotifyHandlers>;

export type CriuNotifyScript = keyof typeof NOTIFY_SCRIPT_HANDLERS;

/** What one notification carried. */
export interface CriuNotification {
  script: string;
  pid?: number;
  fds: number[];
}
