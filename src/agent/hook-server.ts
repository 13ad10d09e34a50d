/**
 * The agent's end of the native createRuntime hook (native/thaw-hook.c). runc starts that static binary in the
 * hook's moment (the container's mounts are set up, nothing of the pod runs yet); it sends one request line
 * here and waits for the answer, and the work itself runs in this process, which is warm: the same
 * runCreateRuntime as the Node.js hook (src/oci-hooks/create-runtime.ts), with the same records, the same
 * undo and the same budget, minus a Node.js start on every restore's critical path.
 *
 * What the work is comes from the agent itself, not from the request: the NRI adjustment registers it under
 * the container id (expect()), and the request only names the container (runc's state: id, init pid, bundle).
 * Who sent the request is the kernel's answer (SO_PEERCRED), not the request's: a peer that is not root is
 * refused, and the peer's pid gives the runtime's view of host paths (`/proc/<peer pid>/root`), so the rootfs
 * is the one the runtime mounted even when this agent runs in a mount namespace of its own. The socket lives
 * in the API socket's directory (root-only, 0700) with mode 0600.
 *
 * The same binary is the poststart hook of every container thaw manages (`thaw-hook --started`): it tells this
 * server that the container's process runs, with its host pid from runc's state. That is how the agent learns a
 * managed container's start without subscribing to NRI's PostStartContainer, a synchronous round trip to this
 * process inside every pod's StartContainer on the node, the pods thaw does not touch included.
 *
 * Protocol (one request, one answer, each one line):
 *   request  {"v":1,"id":ID,"pid":PID,"bundle":BUNDLE,"hookPid":N,"elapsedMs":MS}   (at most MAX_REQUEST_BYTES)
 *   answer   done | cold | nostart CODE | record CODE    (thaw-hook.c's header says what each does)
 * and for a start:
 *   request  {"v":1,"stage":"poststart","id":ID,"pid":PID,"bundle":BUNDLE,"hookPid":N,"elapsedMs":MS}
 *   answer   ok        (after the start was handed on; the hook exits 0 whatever it gets)
 */
import { chmod, lstat, mkdir, rename, rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { dirname, join } from 'node:path';
import { HOOK_SOCKET_SUFFIX } from '../defaults.js';
import { errorMessage } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';
import { HookErrorCode, runCreateRuntime, type CreateRuntimeOptions } from '../oci-hooks/index.js';
import { peerCred } from '../sys/peer-cred.js';

/** The native hook's request is a few hundred bytes (its fields are capped at 4 KiB each). */
export const MAX_REQUEST_BYTES = 16 * 1024;
/** A connection that sends no complete request within this long is dropped (the hook then records its own failure). */
export const REQUEST_TIMEOUT_MS = 5_000;

/** The hook socket of the agent serving `apiSocket`: /run/thaw/agent.sock → /run/thaw/agent-hook.sock. */
export function hookSocketFor(apiSocket: string): string {
  return `${apiSocket.endsWith('.sock') ? apiSocket.slice(0, -'.sock'.length) : apiSocket}${HOOK_SOCKET_SUFFIX}`;
}

/** A unix socket path's limit (sun_path less its NUL). */
export const UNIX_PATH_MAX_BYTES = 107;

/** What the NRI adjustment decided for a container's hook: runCreateRuntime's options, less what the request gives. */
export type HookWork = Omit<CreateRuntimeOptions, 'startupMs' | 'budgetFrom' | 'hostRoot'>;

export interface HookServer {
  socketPath: string;
  /** Registers the work of `containerId`'s createRuntime hook (one run: runc runs that hook once per create). */
  expect(containerId: string, work: HookWork): void;
  /** Drops a registration that will not be used (the container went away before its hook ran). */
  forget(containerId: string): void;
  /** How many registrations wait for their hook. */
  pending(): number;
  /** How many createRuntime hooks this server has done the work of (succeeded or not). */
  served(): number;
  /** How many container starts poststart hooks have told this server of. */
  started(): number;
  close(): Promise<void>;
}

export interface HookServerOptions {
  socketPath: string;
  logger?: Logger;
  /** The uid a peer must have (default: this process's own, root for the agent). */
  peerUid?: number;
  /**
   * A poststart hook says container `containerId` runs as host pid `pid` (runc's state). Called before the hook
   * is answered; must return at once (it starts work, it does not wait for it).
   */
  onStarted?(containerId: string, pid: number): void;
}

/** Which hook sent a request: the createRuntime hook of a restore target, or the poststart hook of a managed container. */
export type HookStage = 'createRuntime' | 'poststart';

interface HookRequest {
  stage: HookStage;
  id: string;
  pid: number;
  bundle: string;
  elapsedMs: number;
}

/** Parses the request line; undefined for anything that is not exactly a v1 request. */
export function parseHookRequest(line: string): HookRequest | undefined {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch {
    return undefined;
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return undefined;
  const r = v as Record<string, unknown>;
  const posInt = (x: unknown): x is number => Number.isSafeInteger(x) && (x as number) > 0;
  if (r['v'] !== 1 || typeof r['id'] !== 'string' || r['id'] === '' || !posInt(r['pid']) || typeof r['bundle'] !== 'string' || !r['bundle'].startsWith('/')) return undefined;
  const elapsed = r['elapsedMs'];
  if (typeof elapsed !== 'number' || !Number.isFinite(elapsed) || elapsed < 0) return undefined;
  const stage = r['stage'] ?? 'createRuntime';
  if (stage !== 'createRuntime' && stage !== 'poststart') return undefined;
  return { stage, id: r['id'], pid: r['pid'], bundle: r['bundle'], elapsedMs: elapsed };
}

export async function startHookServer(o: HookServerOptions): Promise<HookServer> {
  const logger = o.logger ?? silentLogger;
  const peerUid = o.peerUid ?? process.getuid?.() ?? 0;
  const work = new Map<string, HookWork>();
  const connections = new Set<Socket>();
  const running = new Set<Promise<void>>();
  let served = 0;
  let started = 0;

  const answer = (socket: Socket, line: string): void => {
    if (socket.destroyed) return;
    socket.end(`${line}\n`);
  };

  const serve = async (socket: Socket, line: string, peerPid: number, arrived: number): Promise<void> => {
    const req = parseHookRequest(line);
    if (req === undefined) {
      logger.warn('thaw: a hook request that is not one', { head: line.slice(0, 200) });
      answer(socket, 'record HOOK_STATE_INVALID');
      return;
    }
    if (req.stage === 'poststart') {
      started++;
      logger.debug('thaw: a container started (its poststart hook)', { containerId: req.id, pid: req.pid });
      try {
        o.onStarted?.(req.id, req.pid);
      } catch (err) {
        // A bug of ours: the container runs on (the hook exits 0 whatever it is told); the flows' own deadlines act.
        logger.error('thaw: handing on a container start failed', { containerId: req.id, error: errorMessage(err) });
      }
      answer(socket, 'ok');
      return;
    }
    const w = work.get(req.id);
    if (w === undefined) {
      logger.warn('thaw: a createRuntime hook for a container with no restore waiting', { containerId: req.id });
      answer(socket, `record ${HookErrorCode.AGENT_UNKNOWN_CONTAINER}`);
      return;
    }
    work.delete(req.id);
    served++;
    const result = await runCreateRuntime(
      { ociVersion: '', id: req.id, status: 'creating', pid: req.pid, bundle: req.bundle, annotations: {} },
      { ...w, startupMs: req.elapsedMs, budgetFrom: arrived - req.elapsedMs, hostRoot: `/proc/${peerPid}/root` },
    );
    if (result.ok) {
      answer(socket, 'done');
      return;
    }
    logger.warn('thaw: createRuntime hook failed; the container starts cold', { containerId: req.id, code: result.code, reason: result.reason, ...(result.mustNotStart ? { mustNotStart: true } : {}) });
    answer(socket, result.mustNotStart === true ? `nostart ${result.code}` : 'cold');
  };

  const onConnection = (socket: Socket): void => {
    const arrived = performance.now();
    connections.add(socket);
    socket.on('close', () => connections.delete(socket));
    socket.on('error', () => undefined);
    const cred = peerCred(socket);
    if (cred === undefined || cred.uid !== peerUid || cred.pid <= 0) {
      logger.warn('thaw: hook socket peer refused', { peer: cred ?? 'unknown' });
      socket.destroy();
      return;
    }
    socket.setTimeout(REQUEST_TIMEOUT_MS, () => socket.destroy());
    let buffered = '';
    const onData = (chunk: Buffer): void => {
      buffered += chunk.toString('utf8');
      const nl = buffered.indexOf('\n');
      if (nl < 0) {
        if (buffered.length > MAX_REQUEST_BYTES) socket.destroy();
        return;
      }
      socket.off('data', onData);
      socket.setTimeout(0);
      const p = serve(socket, buffered.slice(0, nl), cred.pid, arrived).catch((err: unknown) => {
        // runCreateRuntime never throws; this is a bug of ours: the hook records its own failure.
        logger.error('thaw: hook server', { error: errorMessage(err) });
        socket.destroy();
      });
      running.add(p);
      void p.finally(() => running.delete(p));
    };
    socket.on('data', onData);
  };

  await mkdir(dirname(o.socketPath), { recursive: true, mode: 0o700 });
  // Bound under a name of this process's own, then renamed over the path (a stale socket of a dead agent goes
  // with the rename): libuv unlinks the name it bound at close, and that must never be the path, which an agent
  // starting while this one stops may already hold.
  const bound = join(dirname(o.socketPath), `.hook-${process.pid}-${Math.floor(performance.now())}.sock`);
  await rm(bound, { force: true });
  const server: Server = createServer(onConnection);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(bound, () => {
      server.off('error', reject);
      resolve();
    });
  });
  await chmod(bound, 0o600);
  await rename(bound, o.socketPath);
  // Ours by inode: removed at close only if the path is still this server's.
  const ours = await lstat(o.socketPath);
  return {
    socketPath: o.socketPath,
    expect: (id, w) => void work.set(id, w),
    forget: (id) => void work.delete(id),
    pending: () => work.size,
    served: () => served,
    started: () => started,
    close: async () => {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      // Work in flight ends within its budget, and its hook is waiting for the answer: let it finish.
      await Promise.allSettled([...running]);
      for (const s of connections) s.destroy();
      await closed;
      const now = await lstat(o.socketPath).catch(() => undefined);
      if (now !== undefined && now.ino === ours.ino && now.dev === ours.dev) await rm(o.socketPath, { force: true });
    },
  };
}
