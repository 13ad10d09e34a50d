/**
 * One `criu swrk` process and the request/response exchange with it.
 *
 * CRIU's service worker reads one criu_req from fd 3 (a SOCK_SEQPACKET socket), may send NOTIFY
 * messages that we must answer, and ends with one criu_resp of the request's type. CRIU accepts
 * further requests on the same process only after a request with `keep_open`, and only for VERSION,
 * FEATURE_CHECK, CPUINFO_* and PAGE_SERVER* (cr-service.c: chk_keepopen_req); DUMP, RESTORE and CHECK
 * each need a fresh swrk process. `CriuSwrk` enforces that.
 *
 * Every way out ends the process: success (CRIU exits by itself; killed after a grace period if not),
 * failure, timeout, abort, CRIU dying (we see EOF because we closed our copy of its socket end).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { open } from 'node:fs/promises';

import type { Logger } from '../../log.js';
import {
  CriuError,
  CriuErrorCode,
  excerptCriuLog,
  renderCriuLogExcerpt,
  type CriuLogExcerpt,
} from './errors.js';
import { NOTIFY_SCRIPT_HANDLERS, type CriuNotification, type CriuNotifyHandlers } from './notify.js';
import { CriuReqType, reqTypeName, type CriuCodec, type CriuReqMessage, type CriuRespMessage } from './rpc.js';
import { SeqpacketSocket, type Libc } from './seqpacket.js';
import { MAX_TIMER_DELAY_MS } from '../../defaults.js';

/** The child's fd of the RPC socket: `criu swrk 3`. */
export const SWRK_SOCKET_FD = 3;
/** Extra fds given to the child land at 4, 5, ... in the order given. */
export const SWRK_FIRST_EXTRA_FD = 4;
/** The host's system directories: the PATH of every program thaw starts, after the toolkit's bin where it needs one. */
export const HOST_SYSTEM_PATH = '/usr/sbin:/usr/bin:/sbin:/bin';
/** How long a swrk process may take to exit after its final answer before it is killed. */
export const DEFAULT_SWRK_EXIT_GRACE_MS = 10_000;
/** How long we wait for the exit status after EOF (to report CRIU's exit code). */
const EXIT_STATUS_WAIT_MS = 2_000;
/** Bytes of CRIU's stderr kept for errors. */
const STDERR_TAIL_BYTES = 8 * 1024;
/** Bytes read from the end of CRIU's log for an error. */
const LOG_READ_BYTES = 256 * 1024;

/** Request types CRIU serves again on the same swrk process after `keep_open`. */
const KEEP_OPEN_TYPES: ReadonlySet<number> = new Set([
  CriuReqType.VERSION,
  CriuReqType.FEATURE_CHECK,
  CriuReqType.CPUINFO_DUMP,
  CriuReqType.CPUINFO_CHECK,
  CriuReqType.PAGE_SERVER,
  CriuReqType.PAGE_SERVER_CHLD,
]);

/** How to start swrk. */
export interface SwrkSpawnOptions {
  /** Absolute path of the criu binary (as the wrapper, if any, sees it). */
  criuPath: string;
  /**
   * Argv prefix to run CRIU through, e.g. `['nsenter', '-t', '1234', '-m', '-p', '-i', '-u', '--']`.
   * The socket stays at fd 3 through it (nsenter keeps fds; for -p it forks after setns, so CRIU
   * runs in the target's PID namespace).
   */
  wrapper?: readonly string[];
  /** The child's whole environment (e.g. PATH pointing at the toolkit's bin for tar/gzip). Default: PATH the host's system dirs, nothing else. */
  env?: NodeJS.ProcessEnv;
  /** fds of ours the child gets at 4, 5, ... (the images dir, --inherit-fd targets). */
  extraFds?: readonly number[];
  /** Grace for CRIU to exit after its final answer; default DEFAULT_SWRK_EXIT_GRACE_MS. */
  exitGraceMs?: number;
}

/** Per-request settings. */
export interface SwrkRequestOptions {
  /** What we are doing, for errors ("criu dump"). */
  step: string;
  notify?: CriuNotifyHandlers;
  /** Kill CRIU and reject with CRIU_TIMEOUT after this long. */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** CRIU's log file, quoted in errors. */
  logPath?: string;
  /** Keep the process for another request (only for types CRIU allows). */
  keepOpen?: boolean;
  /**
   * A dump's abort: instead of killing CRIU at once, refuse its next notification at which it can still undo the
   * dump (`UNDOABLE_DUMP_NOTIFICATIONS`; it then cures its parasite and lets the tree run), and kill it only if none
   * comes within this long. Needs `notify` (CRIU sends notifications only then). Unset: an abort kills at once.
   */
  abortGraceMs?: number;
}

/**
 * The dump notifications that CRIU answers a refusal of by undoing the dump and resuming the tree
 * (criu/cr-dump.c: a failed pre-dump or network-lock ends the dump before or right after the freeze, a failed
 * post-dump after the parasite is cured; either way the tasks are set running again).
 */
export const UNDOABLE_DUMP_NOTIFICATIONS: ReadonlySet<string> = new Set(['pre-dump', 'network-lock', 'post-dump']);

/** A request's abort, as the exchange sees it: asked for, and the notification refused for it. */
interface AbortState {
  /** The request reached CRIU: before that there is nothing to undo. */
  sent: boolean;
  requested: boolean;
  refusedAt: string | null;
  aborted(how: string): CriuError;
}

export interface SwrkDeps {
  libc: Libc;
  codec: CriuCodec;
  logger: Logger;
}

interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms).unref());
}

/** The pids below `pid` (children, grandchildren, ...), from /proc/<pid>/task/<tid>/children. */
function descendantsOf(pid: number): number[] {
  const found: number[] = [];
  const queue = [pid];
  while (queue.length > 0) {
    const p = queue.shift() as number;
    let tids: string[];
    try {
      tids = readdirSync(`/proc/${p}/task`);
    } catch {
      continue;
    }
    for (const tid of tids) {
      let text = '';
      try {
        text = readFileSync(`/proc/${p}/task/${tid}/children`, 'utf8');
      } catch {
        continue;
      }
      for (const c of text.split(/\s+/).filter(Boolean).map(Number)) {
        if (!found.includes(c)) {
          found.push(c);
          queue.push(c);
        }
      }
    }
  }
  return found;
}

/** Reads the end of CRIU's log and picks its evidence; never throws (an unreadable log is evidence too). */
export async function readCriuLogExcerpt(path: string): Promise<CriuLogExcerpt> {
  try {
    const fh = await open(path, 'r');
    try {
      const { size } = await fh.stat();
      const start = Math.max(0, size - LOG_READ_BYTES);
      const buf = Buffer.alloc(size - start);
      await fh.read(buf, 0, buf.length, start);
      let text = buf.toString('utf8');
      if (start > 0) text = text.slice(text.indexOf('\n') + 1);
      return excerptCriuLog(path, text);
    } finally {
      await fh.close();
    }
  } catch (err) {
    return { path, tail: [], errorLines: [], unreadable: err instanceof Error ? err.message : String(err) };
  }
}

/**
 * A started swrk process. Create with `CriuSwrk.start()`, send requests with `request()`, and always
 * `close()` it (idempotent; kills the process if it still runs).
 */
export class CriuSwrk {
  private readonly child: ChildProcess;
  private readonly socket: SeqpacketSocket;
  private readonly exited: Promise<ExitStatus>;
  private exitStatus: ExitStatus | null = null;
  private spawnError: Error | null = null;
  private stderrTail = '';
  private busy = false;
  private usable = true;
  private closed = false;

  private constructor(
    private readonly deps: SwrkDeps,
    private readonly spawnOptions: SwrkSpawnOptions,
  ) {
    const { socket, peerFd } = SeqpacketSocket.pair(deps.libc);
    this.socket = socket;
    const wrapper = spawnOptions.wrapper ?? [];
    const [command, ...args] = [...wrapper, spawnOptions.criuPath, 'swrk', String(SWRK_SOCKET_FD)];
    try {
      this.child = spawn(command as string, args, {
        stdio: ['ignore', 'pipe', 'pipe', peerFd, ...(spawnOptions.extraFds ?? [])],
        env: spawnOptions.env ?? { PATH: HOST_SYSTEM_PATH },
      });
    } finally {
      // Close our copy of CRIU's end right away: then CRIU exiting (or crashing) closes the last copy
      // and our receive sees EOF instead of waiting forever.
      deps.libc.close(peerFd);
    }
    this.exited = new Promise<ExitStatus>((resolve) => {
      this.child.once('exit', (code, signal) => {
        this.exitStatus = { code, signal };
        resolve(this.exitStatus);
      });
      this.child.once('error', (err) => {
        // spawn failures (ENOENT, EACCES) come here, and no 'exit' follows.
        this.spawnError = err;
        this.exitStatus = { code: null, signal: null };
        resolve(this.exitStatus);
        // Without a process there is nobody to answer: wake a pending receive.
        void this.socket.close();
      });
    });
    const keepTail = (chunk: Buffer): void => {
      this.stderrTail = (this.stderrTail + chunk.toString('utf8')).slice(-STDERR_TAIL_BYTES);
    };
    this.child.stderr?.on('data', keepTail);
    this.child.stdout?.on('data', keepTail);
  }

  /** Starts `criu swrk 3` (through the wrapper, if any). Spawn errors surface on the first request. */
  static start(deps: SwrkDeps, spawnOptions: SwrkSpawnOptions): CriuSwrk {
    return new CriuSwrk(deps, spawnOptions);
  }

  /** The pid of the process we started (the wrapper's, when there is one). */
  get pid(): number | undefined {
    return this.child.pid;
  }

  /**
   * Sends `req`, answers NOTIFY messages through `opts.notify`, and resolves with CRIU's final answer
   * of the same type when it reports success. Rejects with CRIU_FAILED (success=false), CRIU_NOTIFY_FAILED,
   * CRIU_PROTOCOL, CRIU_EXITED, CRIU_TIMEOUT, CRIU_ABORTED, CRIU_SPAWN or CRIU_TRANSPORT. After anything
   * but a success with `keepOpen`, the process is finished (exited or killed) when this settles.
   */
  async request(req: CriuReqMessage, opts: SwrkRequestOptions): Promise<CriuRespMessage> {
    if (this.busy || !this.usable || this.closed) {
      throw new CriuError(CriuErrorCode.PROTOCOL, 'this swrk process cannot take another request', {
        step: opts.step,
        evidence: { busy: this.busy, usable: this.usable, closed: this.closed },
      });
    }
    const keepOpen = opts.keepOpen === true;
    if (keepOpen && !KEEP_OPEN_TYPES.has(req.type)) {
      throw new CriuError(CriuErrorCode.INVALID_OPTIONS, `CRIU does not keep swrk open after ${reqTypeName(req.type)}`, {
        step: opts.step,
      });
    }
    this.busy = true;
    this.usable = keepOpen;
    const log = this.deps.logger.child({ component: 'criu-swrk', pid: this.child.pid, request: reqTypeName(req.type) });

    // Timeout and abort both end in `stop`, which kills CRIU; the exchange then sees EOF and the race
    // is won by the stop's rejection.
    let stopError: CriuError | null = null;
    let rejectStop: (err: CriuError) => void = () => undefined;
    const stopped = new Promise<never>((_, reject) => {
      rejectStop = reject;
    });
    const stop = (err: CriuError): void => {
      if (stopError !== null) return;
      stopError = err;
      log.warn('stopping CRIU', { code: err.code });
      this.killTree();
      rejectStop(err);
    };
    let timer: NodeJS.Timeout | undefined;
    if (opts.timeoutMs !== undefined) {
      const timeoutMs = opts.timeoutMs;
      timer = setTimeout(
        () =>
          stop(
            new CriuError(CriuErrorCode.TIMEOUT, `CRIU ran past ${timeoutMs} ms and was killed`, {
              step: opts.step,
              evidence: { timeoutMs, logPath: opts.logPath },
            }),
          ),
        Math.min(Math.max(timeoutMs, 0), MAX_TIMER_DELAY_MS),
      );
    }
    const aborted = (how: string): CriuError =>
      new CriuError(CriuErrorCode.ABORTED, `aborted by the caller; ${how}`, {
        step: opts.step,
        cause: opts.signal?.reason,
        evidence: { logPath: opts.logPath },
      });
    // A graceful abort: the exchange refuses CRIU's next undoable notification; the grace timer kills CRIU if none
    // comes. Before the request is sent there is nothing to undo: kill at once.
    const abort: AbortState = { sent: false, requested: false, refusedAt: null, aborted };
    let graceTimer: NodeJS.Timeout | undefined;
    const graceMs = opts.notify !== undefined ? opts.abortGraceMs : undefined;
    const onAbort = (): void => {
      if (graceMs === undefined || !abort.sent) {
        stop(aborted('CRIU was killed'));
        return;
      }
      abort.requested = true;
      log.info('abort: CRIU is refused at its next notification, so that it undoes the dump', { graceMs });
      graceTimer = setTimeout(
        () => stop(aborted(`CRIU sent no notification within ${graceMs} ms of the abort and was killed`)),
        Math.min(Math.max(graceMs, 0), MAX_TIMER_DELAY_MS),
      );
    };
    if (opts.signal?.aborted) onAbort();
    else opts.signal?.addEventListener('abort', onAbort, { once: true });

    const exchange = this.exchange({ ...req, ...(keepOpen ? { keepOpen: true } : {}) }, opts, log, abort);
    exchange.catch(() => undefined); // when `stopped` wins, the exchange's late failure is not news
    try {
      return await Promise.race([exchange, stopped]);
    } finally {
      if (timer !== undefined) clearTimeout(timer);
      if (graceTimer !== undefined) clearTimeout(graceTimer);
      opts.signal?.removeEventListener('abort', onAbort);
      this.busy = false;
      if (!this.usable) await this.finish(stopError !== null);
    }
  }

  private async exchange(
    req: CriuReqMessage,
    opts: SwrkRequestOptions,
    log: Logger,
    abort: AbortState,
  ): Promise<CriuRespMessage> {
    if (this.spawnError !== null) throw this.spawnFailure(opts.step);
    await this.send(req, opts.step, req.type);
    abort.sent = true;
    let notifyFailure: { script: string; error: unknown } | null = null;
    for (;;) {
      const msg = await this.socket.receive();
      if (msg === null) throw await this.eofError(opts.step, req.type);
      let resp: CriuRespMessage;
      try {
        resp = this.deps.codec.decodeResponse(msg.data);
      } catch (err) {
        for (const fd of msg.fds) this.deps.libc.close(fd);
        throw err;
      }
      if (resp.type === CriuReqType.NOTIFY) {
        const note: CriuNotification = { script: resp.notify?.script ?? '', fds: msg.fds };
        if (resp.notify?.pid !== undefined) note.pid = resp.notify.pid;
        const refuse = (): boolean => abort.requested && abort.refusedAt === null && UNDOABLE_DUMP_NOTIFICATIONS.has(note.script);
        let failure: { script: string; error: unknown } | null = null;
        if (refuse()) for (const fd of msg.fds) this.deps.libc.close(fd);
        else failure = await this.dispatchNotify(note, opts.notify, log);
        // An abort that came while the handler ran refuses this notification too.
        const refused = refuse();
        if (refused) {
          abort.refusedAt = note.script;
          log.info('abort: CRIU refused at its notification', { script: note.script });
        } else if (failure !== null && notifyFailure === null) notifyFailure = failure;
        await this.send({ type: CriuReqType.NOTIFY, notifySuccess: failure === null && !refused }, opts.step, req.type);
        continue;
      }
      for (const fd of msg.fds) this.deps.libc.close(fd);
      if (abort.refusedAt !== null) throw abort.aborted(`CRIU was refused at its ${abort.refusedAt} notification and undid the dump`);
      if (abort.requested) throw abort.aborted('CRIU had answered before it could be refused');
      if (resp.type !== req.type) {
        throw new CriuError(
          CriuErrorCode.PROTOCOL,
          `expected a ${reqTypeName(req.type)} response, got ${reqTypeName(resp.type)}`,
          { step: opts.step, evidence: await this.failureEvidence(resp, opts.logPath) },
        );
      }
      if (notifyFailure !== null) {
        throw new CriuError(
          CriuErrorCode.NOTIFY_FAILED,
          `the ${notifyFailure.script} handler failed, so CRIU aborted`,
          { step: opts.step, cause: notifyFailure.error, evidence: await this.failureEvidence(resp, opts.logPath) },
        );
      }
      if (!resp.success) {
        const evidence = await this.failureEvidence(resp, opts.logPath);
        const cause = typeof evidence.firstError === 'string' ? evidence.firstError : resp.crErrmsg?.trim();
        const detail = cause ? `: ${cause}` : '';
        const rendered = typeof evidence.log === 'string' ? `\n${evidence.log}` : '';
        throw new CriuError(
          CriuErrorCode.FAILED,
          `CRIU reported failure (cr_errno ${resp.crErrno ?? 0})${detail}${rendered}`,
          { step: opts.step, evidence },
        );
      }
      return resp;
    }
  }

  /** Sends one request; a send that fails because CRIU is gone is reported as CRIU_EXITED. */
  private async send(msg: CriuReqMessage, step: string, type: number): Promise<void> {
    try {
      this.socket.send(this.deps.codec.encodeRequest(msg));
    } catch (err) {
      if (!(err instanceof CriuError) || err.code !== CriuErrorCode.TRANSPORT) throw err;
      const status = await Promise.race([this.exited, sleep(EXIT_STATUS_WAIT_MS).then(() => null)]);
      if (status === null) throw err;
      throw await this.eofError(step, type, err);
    }
  }

  /** Runs the handler for one notification; returns what failed, or null. Never throws. */
  private async dispatchNotify(
    note: CriuNotification,
    handlers: CriuNotifyHandlers | undefined,
    log: Logger,
  ): Promise<{ script: string; error: unknown } | null> {
    const method = (NOTIFY_SCRIPT_HANDLERS as Record<string, keyof CriuNotifyHandlers>)[note.script];
    const fds = [...note.fds];
    try {
      if (method === undefined) {
        log.warn('unknown CRIU notification answered success', { script: note.script });
        return null;
      }
      const handler = handlers?.[method] as ((arg?: number) => void | Promise<void>) | undefined;
      if (handler === undefined) {
        log.debug('CRIU notification without handler', { script: note.script });
        return null;
      }
      log.debug('CRIU notification', { script: note.script, pid: note.pid, fds: note.fds.length });
      if (method === 'orphanPtsMaster') {
        const fd = fds.shift();
        if (fd === undefined) throw new Error('orphan-pts-master came without an fd');
        await handler.call(handlers, fd);
      } else if (method === 'setupNamespaces' || method === 'postRestore') {
        await handler.call(handlers, note.pid ?? -1);
      } else {
        await handler.call(handlers);
      }
      return null;
    } catch (error) {
      log.warn('CRIU notification handler failed; CRIU will abort', { script: note.script, error });
      return { script: note.script, error };
    } finally {
      for (const fd of fds) this.deps.libc.close(fd); // fds no handler took
    }
  }

  private async failureEvidence(resp: CriuRespMessage, logPath: string | undefined): Promise<Record<string, unknown>> {
    const evidence: Record<string, unknown> = {
      responseType: reqTypeName(resp.type),
      crErrno: resp.crErrno,
      crErrmsg: resp.crErrmsg,
      logPath,
    };
    if (logPath !== undefined) {
      const excerpt = await readCriuLogExcerpt(logPath);
      evidence.logTail = excerpt.tail;
      evidence.logErrors = excerpt.errorLines;
      if (excerpt.firstError !== undefined) evidence.firstError = excerpt.firstError;
      evidence.log = renderCriuLogExcerpt(excerpt);
    }
    return evidence;
  }

  private spawnFailure(step: string): CriuError {
    return new CriuError(CriuErrorCode.SPAWN, `cannot start ${this.spawnOptions.criuPath}: ${this.spawnError?.message}`, {
      step,
      cause: this.spawnError,
      evidence: { criuPath: this.spawnOptions.criuPath, wrapper: this.spawnOptions.wrapper },
    });
  }

  /** EOF before the final answer: CRIU died (or never started). Waits briefly for its exit status. */
  private async eofError(step: string, type: number, cause?: unknown): Promise<CriuError> {
    const status = await Promise.race([this.exited, sleep(EXIT_STATUS_WAIT_MS).then(() => null)]);
    if (this.spawnError !== null) return this.spawnFailure(step);
    return new CriuError(
      CriuErrorCode.EXITED,
      `CRIU closed its socket before answering ${reqTypeName(type)} (${
        status === null ? 'still running' : status.signal !== null ? `killed by ${status.signal}` : `exit code ${status.code}`
      })`,
      {
        step,
        cause,
        evidence: { exitCode: status?.code, signal: status?.signal, stderrTail: this.stderrTail.split('\n').slice(-30) },
      },
    );
  }

  /** SIGKILL the process and everything below it (nsenter's forked CRIU, CRIU's helpers). */
  private killTree(): void {
    const pid = this.child.pid;
    if (pid === undefined || this.exitStatus !== null) return;
    const below = descendantsOf(pid);
    for (const p of [pid, ...below]) {
      try {
        process.kill(p, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  }

  /** Ends the process: after a kill, just reap; after an answer, give CRIU its grace to exit. */
  private async finish(killed: boolean): Promise<void> {
    this.closed = true;
    await this.socket.close();
    if (this.exitStatus !== null) return;
    if (!killed) {
      const graceMs = this.spawnOptions.exitGraceMs ?? DEFAULT_SWRK_EXIT_GRACE_MS;
      const status = await Promise.race([this.exited, sleep(graceMs).then(() => null)]);
      if (status !== null) return;
      // Only the direct child: below it may be a tree CRIU just restored.
      this.deps.logger.warn('CRIU did not exit after its answer; killing it', { pid: this.child.pid, graceMs });
      this.child.kill('SIGKILL');
    }
    await Promise.race([this.exited, sleep(EXIT_STATUS_WAIT_MS)]);
  }

  /** Ends the process (if a keep-open request left it running). Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.usable = false;
    await this.finish(false);
  }
}
