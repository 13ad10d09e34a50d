/**
 * A SOCK_SEQPACKET unix socket pair through koffi, for `criu swrk`.
 *
 * Why not node:net: it has only stream sockets, and CRIU reads each request as one datagram (its
 * cr-service.c sizes a request with `recv(MSG_TRUNC | MSG_PEEK)`; there is no length prefix).
 *
 * Receiving never blocks the event loop: the wait for the next message is a `recvmsg(MSG_PEEK |
 * MSG_TRUNC)` with an empty buffer called through koffi's `.async` (a libuv threadpool thread blocks in
 * it, not the loop); it returns the datagram's full length without consuming it. The message itself is
 * then taken with a non-blocking `recvmsg` on the loop thread, into a buffer of exactly that size, so
 * nothing is ever truncated, and errno is read on the thread that made the call (koffi's errno() is the
 * calling thread's: after an `.async` call it would be some other call's).
 *
 * Cost to know: each socket waiting for a message holds one libuv threadpool thread (UV_THREADPOOL_SIZE,
 * 4 by default, shared with fs, dns and crypto). Four CRIU operations in flight at once stall fs calls
 * until one ends. Callers that run several must raise UV_THREADPOOL_SIZE at process start.
 */
import koffi from 'koffi';
import { msghdrType } from '../../sys/msghdr.js';

import { CriuError, CriuErrorCode } from './errors.js';

// Linux x86-64 / aarch64 constants (asm-generic): socket(2), recv(2), cmsg(3).
const AF_UNIX = 1;
const SOCK_SEQPACKET = 5;
const SOCK_CLOEXEC = 0o2000000;
const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;
const MSG_PEEK = 0x2;
const MSG_CTRUNC = 0x8;
const MSG_TRUNC = 0x20;
const MSG_DONTWAIT = 0x40;
const MSG_NOSIGNAL = 0x4000;
const MSG_CMSG_CLOEXEC = 0x40000000;
const SHUT_RDWR = 2;
const EINTR = 4;
const EAGAIN = 11;

/** struct cmsghdr on LP64: size_t cmsg_len, int cmsg_level, int cmsg_type, then data aligned to 8. */
const CMSG_HEADER_BYTES = 16;
const CMSG_ALIGN = 8;
/** The most fds one message may carry; CRIU sends at most one (orphan-pts-master). */
export const MAX_FDS_PER_MESSAGE = 16;
const CONTROL_BYTES = CMSG_HEADER_BYTES + MAX_FDS_PER_MESSAGE * 4;
/** A peek that fails with EAGAIN right after the blocking peek failed: retried this many times, then an error. */
const MAX_SPURIOUS_WAKEUPS = 100;

interface MsgHdr {
  msg_name: null;
  msg_namelen: number;
  msg_iov: Array<{ iov_base: Buffer | null; iov_len: number }>;
  msg_iovlen: number;
  msg_control: Buffer | null;
  msg_controllen: number;
  msg_flags: number;
}

type SyscallFn = ((...args: unknown[]) => number) & {
  async: (...args: unknown[]) => void;
};

/**
 * The libc functions the socket needs, bound once. Create one per process (or per test file) and pass
 * it to whoever opens sockets; it holds no mutable state.
 */
export class Libc {
  readonly socketpair: (domain: number, type: number, protocol: number, sv: number[]) => number;
  readonly send: (fd: number, buf: Buffer, len: number, flags: number) => number;
  readonly recvmsg: SyscallFn;
  readonly shutdown: (fd: number, how: number) => number;
  readonly close: (fd: number) => number;
  readonly errno: () => number;

  private constructor(lib: koffi.IKoffiLib) {
    const msghdr = msghdrType();
    this.socketpair = lib.func('int socketpair(int, int, int, _Out_ int *sv)');
    this.send = lib.func('send', 'intptr_t', ['int', 'void *', 'size_t', 'int']);
    this.recvmsg = lib.func('recvmsg', 'intptr_t', ['int', koffi.inout(koffi.pointer(msghdr)), 'int']) as SyscallFn;
    this.shutdown = lib.func('shutdown', 'int', ['int', 'int']);
    this.close = lib.func('close', 'int', ['int']);
    this.errno = () => koffi.errno();
  }

  static load(path = 'libc.so.6'): Libc {
    return new Libc(koffi.load(path));
  }
}

/** One received datagram and the fds that came with it (owned by the receiver: close them). */
export interface ReceivedMessage {
  data: Buffer;
  fds: number[];
}

function emptyHeader(): MsgHdr {
  return { msg_name: null, msg_namelen: 0, msg_iov: [], msg_iovlen: 0, msg_control: null, msg_controllen: 0, msg_flags: 0 };
}

function transportError(step: string, errno: number, fd: number): CriuError {
  return new CriuError(CriuErrorCode.TRANSPORT, `errno ${errno}`, { step, evidence: { errno, fd } });
}

/** Reads the fds out of a control buffer filled by recvmsg (every SCM_RIGHTS message in it). */
export function parseScmRights(control: Buffer, controlLen: number): number[] {
  const fds: number[] = [];
  let off = 0;
  while (off + CMSG_HEADER_BYTES <= controlLen) {
    const len = Number(control.readBigUInt64LE(off));
    const level = control.readInt32LE(off + 8);
    const type = control.readInt32LE(off + 12);
    if (len < CMSG_HEADER_BYTES || off + len > controlLen) break;
    if (level === SOL_SOCKET && type === SCM_RIGHTS) {
      for (let p = off + CMSG_HEADER_BYTES; p + 4 <= off + len; p += 4) fds.push(control.readInt32LE(p));
    }
    off += Math.ceil(len / CMSG_ALIGN) * CMSG_ALIGN;
  }
  return fds;
}

/**
 * Our end of a seqpacket pair. One receive at a time (CRIU's protocol is strictly request/response);
 * `close()` wakes a pending receive (it resolves null) before the fd is closed, so a threadpool thread
 * never sits in recvmsg on a closed (and maybe reused) fd number.
 */
export class SeqpacketSocket {
  private closed = false;
  private pending: Promise<unknown> | null = null;

  constructor(
    private readonly libc: Libc,
    readonly fd: number,
  ) {}

  /**
   * Creates a connected pair, both ends close-on-exec (spawn's dup2 to fd 3 clears the flag in the
   * child only). Returns our end and the raw fd of the other, which the caller hands to the child and
   * then closes with `libc.close`.
   */
  static pair(libc: Libc): { socket: SeqpacketSocket; peerFd: number } {
    const sv = [-1, -1];
    if (libc.socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) !== 0) {
      throw transportError('socketpair(AF_UNIX, SOCK_SEQPACKET)', libc.errno(), -1);
    }
    return { socket: new SeqpacketSocket(libc, sv[0] as number), peerFd: sv[1] as number };
  }

  /** Sends one datagram. Never blocks: a full socket buffer is an error (CRIU's requests are tiny). */
  send(data: Buffer): void {
    if (this.closed) throw new CriuError(CriuErrorCode.TRANSPORT, 'socket is closed', { step: 'send to CRIU' });
    const n = this.libc.send(this.fd, data, data.length, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) throw transportError('send to CRIU', this.libc.errno(), this.fd);
    if (n !== data.length) {
      throw new CriuError(CriuErrorCode.TRANSPORT, `short send: ${n} of ${data.length} bytes`, { step: 'send to CRIU' });
    }
  }

  /** The next datagram, or null at EOF (the peer closed its end, or we closed ours). */
  async receive(): Promise<ReceivedMessage | null> {
    if (this.pending !== null) {
      throw new CriuError(CriuErrorCode.PROTOCOL, 'a receive is already in progress', { step: 'receive from CRIU' });
    }
    const run = this.receiveOnce();
    this.pending = run.catch(() => undefined);
    try {
      return await run;
    } finally {
      this.pending = null;
    }
  }

  private async receiveOnce(): Promise<ReceivedMessage | null> {
    for (let spurious = 0; ; ) {
      if (this.closed) return null;
      const peeked = await this.peekLengthAsync();
      if (this.closed) return null;
      let length = peeked;
      if (length < 0) {
        // The blocking peek's errno is lost on the worker thread: ask again, without blocking, here.
        length = this.libc.recvmsg(this.fd, emptyHeader(), MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT);
        if (length < 0) {
          const errno = this.libc.errno();
          if ((errno === EAGAIN || errno === EINTR) && ++spurious <= MAX_SPURIOUS_WAKEUPS) continue;
          throw transportError('wait for a message from CRIU', errno, this.fd);
        }
      }
      // 0 is EOF on a seqpacket socket. (An empty datagram reads the same; CRIU never sends one: a
      // criu_resp has required fields.)
      if (length === 0) return null;
      return this.take(length);
    }
  }

  private peekLengthAsync(): Promise<number> {
    return new Promise((resolve, reject) => {
      this.libc.recvmsg.async(this.fd, emptyHeader(), MSG_PEEK | MSG_TRUNC, (err: unknown, n: number) => {
        if (err) reject(err);
        else resolve(n);
      });
    });
  }

  /** Takes the datagram whose length a peek gave, with its fds; truncation of data or fds is an error. */
  private take(length: number): ReceivedMessage {
    const data = Buffer.alloc(length);
    const control = Buffer.alloc(CONTROL_BYTES);
    const hdr: MsgHdr = {
      msg_name: null,
      msg_namelen: 0,
      msg_iov: [{ iov_base: data, iov_len: length }],
      msg_iovlen: 1,
      msg_control: control,
      msg_controllen: CONTROL_BYTES,
      msg_flags: 0,
    };
    const n = this.libc.recvmsg(this.fd, hdr, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0) throw transportError('receive from CRIU', this.libc.errno(), this.fd);
    const fds = parseScmRights(control, hdr.msg_controllen);
    if ((hdr.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) !== 0 || n !== length) {
      for (const fd of fds) this.libc.close(fd);
      throw new CriuError(CriuErrorCode.PROTOCOL, `message truncated: peeked ${length} bytes, got ${n}`, {
        step: 'receive from CRIU',
        evidence: { peekedBytes: length, receivedBytes: n, msgFlags: hdr.msg_flags, fdsReceived: fds.length },
      });
    }
    return { data, fds };
  }

  /** Wakes a pending receive (it resolves null), waits for it, then closes the fd. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // close() alone does not wake a thread blocked in recvmsg on Linux; shutdown() does.
    this.libc.shutdown(this.fd, SHUT_RDWR);
    if (this.pending !== null) await this.pending;
    this.libc.close(this.fd);
  }
}
