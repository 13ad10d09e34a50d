/**
 * Hands the weights' GPU memory (one fd per allocation, from cuMemExportToShareableHandle) to the restored
 * worker: thaw listens on `<control dir>/weights.sock`, the worker (sdk/python/thaw_cuda.py
 * `receive_weight_handles`) connects, and gets one message - `{"schema", "regions": [{"name", "fds": n}]}`
 * with every fd in SCM_RIGHTS, in that order - then the connection closes.
 *
 * The control directory is thaw's; what is in it is the pod's. The socket is bound after removing whatever
 * has the name (unlink does not follow links); its mode is set through an O_PATH|O_NOFOLLOW descriptor
 * that must be a socket, never by path (a link swapped in between would send chmod elsewhere). A peer is
 * served only when `acceptPeer(pid)` (SO_PEERCRED, a host pid) says it is the restored worker; others are
 * closed unanswered. Node has no fd passing on unix sockets, so the socket calls are libc's through koffi.
 */
import { chmod, unlink } from 'node:fs/promises';
import koffi from 'koffi';
import { msghdrType } from '../../sys/msghdr.js';

import { WeightsError, WeightsErrorCode } from './errors.js';
import { WEIGHTS_SCHEMA } from './regions-file.js';

export const WEIGHTS_SOCKET = 'weights.sock';
/** The most of the worker's answer thaw reads (it is a one-line JSON object). */
export const WEIGHTS_ANSWER_MAX_BYTES = 4096;

const AF_UNIX = 1;
const SOCK_STREAM = 1;
const SOCK_CLOEXEC = 0o2000000;
const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;
const SO_PEERCRED = 17;
const SHUT_WR = 1;
const SHUT_RDWR = 2;
const POLLIN = 0x1;
const CMSG_HEADER_BYTES = 16;
const O_PATH = 0o10000000;
const O_NOFOLLOW = 0o400000;
const O_CLOEXEC = 0o2000000;
const O_DIRECTORY = 0o200000;
const SUN_PATH_MAX = 107;

type Fn = koffi.KoffiFunction;

interface Libc {
  socket: Fn;
  bind: Fn;
  listen: Fn;
  accept4: Fn;
  getsockopt: Fn;
  sendmsg: Fn;
  shutdown: Fn;
  close: Fn;
  open: Fn;
  poll: Fn;
  recv: Fn;
  fstatMode: (fd: number) => number;
}

let libc: Libc | undefined;

function bindLibc(): Libc {
  if (libc) return libc;
  const lib = koffi.load('libc.so.6');
  const msghdr = msghdrType();
  const statx = lib.func('statx', 'int', ['int', 'const char *', 'int', 'uint32_t', koffi.out('uint8_t *')]);
  const AT_EMPTY_PATH = 0x1000;
  libc = {
    socket: lib.func('socket', 'int', ['int', 'int', 'int']),
    bind: lib.func('bind', 'int', ['int', 'void *', 'uint32_t']),
    listen: lib.func('listen', 'int', ['int', 'int']),
    accept4: lib.func('accept4', 'int', ['int', 'void *', 'void *', 'int']),
    getsockopt: lib.func('getsockopt', 'int', ['int', 'int', 'int', koffi.out('uint8_t *'), koffi.inout(koffi.pointer('uint32_t'))]),
    sendmsg: lib.func('sendmsg', 'intptr_t', ['int', koffi.pointer(msghdr), 'int']),
    shutdown: lib.func('shutdown', 'int', ['int', 'int']),
    close: lib.func('close', 'int', ['int']),
    open: lib.func('open', 'int', ['const char *', 'int', 'int']),
    poll: lib.func('poll', 'int', [koffi.inout('uint8_t *'), 'uint64_t', 'int']),
    recv: lib.func('recv', 'intptr_t', ['int', koffi.out('uint8_t *'), 'size_t', 'int']),
    // statx(fd, "", AT_EMPTY_PATH, STATX_TYPE): stx_mode is the u16 at offset 28 of struct statx.
    fstatMode: (fd: number) => {
      const buf = Buffer.alloc(256);
      return (statx(fd, '', AT_EMPTY_PATH, 1, buf) as number) === 0 ? buf.readUInt16LE(28) : -1;
    },
  };
  return libc;
}

function fail(message: string, evidence: Record<string, unknown> = {}): WeightsError {
  return new WeightsError(WeightsErrorCode.HANDOVER, message, { step: 'hand the weights to the worker', evidence });
}

export interface HandoverRegion {
  name: string;
  fds: readonly number[];
}

/** What the worker answered after mapping (or failing to map) the handles. */
export interface WeightsAnswer {
  ok: boolean;
  error?: string;
}

export interface WeightsHandover {
  /**
   * Resolves once a peer that acceptPeer allowed has been sent every fd (and, with `awaitAnswer`, has
   * answered: `answer`); rejects on close(), an error, or no answer within the deadline.
   */
  readonly delivered: Promise<{ peerPid: number; answer?: WeightsAnswer }>;
  /** Stops listening and removes the socket (idempotent). The fds stay the caller's. */
  close(): Promise<void>;
}

/**
 * Starts listening on `<controlDir>/weights.sock`. `acceptPeer` gets each connecting peer's host pid.
 * The socket is made connectable by any uid in the pod (0666): the directory is only the pod's, and the
 * fds go only to an accepted pid.
 */
export async function listenForWorker(
  controlDir: string,
  regions: readonly HandoverRegion[],
  acceptPeer: (pid: number) => boolean | Promise<boolean>,
  options: { awaitAnswer?: { timeoutMs: number } } = {},
): Promise<WeightsHandover> {
  const c = bindLibc();
  // Bound through a descriptor of the directory (/proc/self/fd/<n>/weights.sock): sun_path holds 107 bytes,
  // a control dir's path (root + a 64-hex container id) may not fit in it.
  const dirFd = c.open(controlDir, O_PATH | O_DIRECTORY | O_CLOEXEC, 0) as number;
  if (dirFd < 0) throw fail(`cannot open ${controlDir}: errno ${koffi.errno()}`);
  const path = `/proc/self/fd/${dirFd}/${WEIGHTS_SOCKET}`;
  if (Buffer.byteLength(path) > SUN_PATH_MAX) {
    c.close(dirFd);
    throw fail('the socket path is too long for sockaddr_un', { path });
  }
  await unlink(path).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return;
    c.close(dirFd);
    throw fail(`cannot clear ${path}: ${err.message}`);
  });
  const fd = c.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0) as number;
  if (fd < 0) {
    c.close(dirFd);
    throw fail(`socket() failed: errno ${koffi.errno()}`);
  }
  let closed = false;
  const shut = async (): Promise<void> => {
    if (closed) return;
    closed = true;
    c.shutdown(fd, SHUT_RDWR); // wakes a pending accept4 on the threadpool before the fd number is freed
    await acceptDone.catch(() => undefined);
    c.close(fd);
    await unlink(path).catch(() => undefined);
    c.close(dirFd);
  };
  let acceptDone: Promise<unknown> = Promise.resolve();
  try {
    const addr = Buffer.alloc(110);
    addr.writeUInt16LE(AF_UNIX, 0);
    addr.write(path, 2);
    if ((c.bind(fd, addr, 2 + Buffer.byteLength(path) + 1) as number) !== 0) throw fail(`bind(${path}) failed: errno ${koffi.errno()}`);
    const pathFd = c.open(path, O_PATH | O_NOFOLLOW | O_CLOEXEC, 0) as number;
    if (pathFd < 0) throw fail(`cannot open the bound socket: errno ${koffi.errno()}`);
    try {
      if ((c.fstatMode(pathFd) & 0o170000) !== 0o140000) throw fail('the socket name no longer is a socket');
      await chmod(`/proc/self/fd/${pathFd}`, 0o666);
    } finally {
      c.close(pathFd);
    }
    if ((c.listen(fd, 8) as number) !== 0) throw fail(`listen failed: errno ${koffi.errno()}`);
  } catch (err) {
    await shut();
    throw err;
  }

  const fds = regions.flatMap((r) => r.fds);
  const message = Buffer.from(JSON.stringify({ schema: WEIGHTS_SCHEMA, regions: regions.map((r) => ({ name: r.name, fds: r.fds.length })) }));
  const control = Buffer.alloc(CMSG_HEADER_BYTES + Math.ceil((fds.length * 4) / 8) * 8);
  control.writeBigUInt64LE(BigInt(CMSG_HEADER_BYTES + fds.length * 4), 0);
  control.writeInt32LE(SOL_SOCKET, 8);
  control.writeInt32LE(SCM_RIGHTS, 12);
  fds.forEach((f, i) => control.writeInt32LE(f, CMSG_HEADER_BYTES + 4 * i));

  const acceptOne = (): Promise<number> =>
    new Promise((resolve, reject) => {
      c.accept4.async(fd, null, null, SOCK_CLOEXEC, (err: unknown, conn: number) => (err ? reject(err as Error) : resolve(conn)));
    });

  const delivered = (async () => {
    for (;;) {
      const pending = acceptOne();
      acceptDone = pending;
      const conn = await pending;
      if (closed) {
        if (conn >= 0) c.close(conn);
        throw fail('closed before the worker connected');
      }
      if (conn < 0) throw fail(`accept failed: errno ${koffi.errno()}`);
      try {
        const cred = Buffer.alloc(12);
        const len = [12];
        if ((c.getsockopt(conn, SOL_SOCKET, SO_PEERCRED, cred, len) as number) !== 0) continue;
        const peerPid = cred.readInt32LE(0);
        if (!(await acceptPeer(peerPid))) continue;
        const header = {
          msg_name: null,
          msg_namelen: 0,
          msg_iov: [{ iov_base: message, iov_len: message.length }],
          msg_iovlen: 1,
          msg_control: fds.length > 0 ? control : null,
          msg_controllen: fds.length > 0 ? control.length : 0,
          msg_flags: 0,
        };
        // A stream socket takes the whole (small) message with its fds in one call or fails.
        const sent = c.sendmsg(conn, header, 0) as number;
        if (sent !== message.length) throw fail(`sendmsg sent ${sent} of ${message.length} bytes: errno ${koffi.errno()}`, { peerPid });
        c.shutdown(conn, SHUT_WR); // the worker reads to end of stream
        if (options.awaitAnswer === undefined) return { peerPid };
        return { peerPid, answer: await readAnswer(conn, options.awaitAnswer.timeoutMs, peerPid) };
      } finally {
        c.close(conn);
      }
    }
  })();
  delivered.catch(() => undefined);
  return { delivered, close: shut };
}

/** Reads the worker's answer to end of stream (poll on the threadpool, so the event loop is not held). */
async function readAnswer(conn: number, timeoutMs: number, peerPid: number): Promise<WeightsAnswer> {
  const c = bindLibc();
  const deadline = performance.now() + timeoutMs;
  const chunks: Buffer[] = [];
  let total = 0;
  for (;;) {
    const left = Math.max(0, Math.round(deadline - performance.now()));
    const pfd = Buffer.alloc(8);
    pfd.writeInt32LE(conn, 0);
    pfd.writeInt16LE(POLLIN, 4);
    const ready = await new Promise<number>((resolve, reject) => {
      c.poll.async(pfd, 1, left, (err: unknown, n: number) => (err ? reject(err as Error) : resolve(n)));
    });
    if (ready < 0) throw fail(`poll failed: errno ${koffi.errno()}`, { peerPid });
    if (ready === 0) throw fail(`the worker did not answer within ${timeoutMs} ms`, { peerPid });
    const buf = Buffer.alloc(WEIGHTS_ANSWER_MAX_BYTES + 1 - total);
    const n = Number(c.recv(conn, buf, buf.length, 0));
    if (n < 0) throw fail(`recv failed: errno ${koffi.errno()}`, { peerPid });
    if (n === 0) break;
    chunks.push(buf.subarray(0, n));
    total += n;
    if (total > WEIGHTS_ANSWER_MAX_BYTES) throw fail('the worker\'s answer is too long', { peerPid });
  }
  let doc: unknown;
  try {
    doc = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw fail('the worker\'s answer is not JSON', { peerPid });
  }
  if (typeof doc !== 'object' || doc === null || typeof (doc as { ok?: unknown }).ok !== 'boolean') throw fail('the worker\'s answer has no ok', { peerPid });
  const { ok, error } = doc as { ok: boolean; error?: unknown };
  return { ok, ...(typeof error === 'string' ? { error: error.slice(0, 1000) } : {}) };
}
