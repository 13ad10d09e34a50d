/**
 * The kernel's word on who is at the other end of a connected unix socket (SO_PEERCRED): the peer's pid, uid
 * and gid as of its connect(), which no message from the peer can forge.
 */
import koffi from 'koffi';
import type { Socket } from 'node:net';

const SOL_SOCKET = 1;
const SO_PEERCRED = 17;
/** struct ucred: pid_t pid, uid_t uid, gid_t gid. */
const UCRED_BYTES = 12;

export interface PeerCred {
  pid: number;
  uid: number;
  gid: number;
}

type GetSockOpt = (fd: number, level: number, name: number, value: Buffer, len: Buffer) => number;
let getsockopt: GetSockOpt | undefined;

/** The peer of `socket` (a connection accepted by a node:net unix socket server), or undefined where unknown. */
export function peerCred(socket: Socket): PeerCred | undefined {
  // node:net does not expose the descriptor; its Pipe handle does (Linux: `fd`).
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) return undefined;
  getsockopt ??= koffi.load('libc.so.6').func('int getsockopt(int fd, int level, int name, void *value, void *len)') as unknown as GetSockOpt;
  const value = Buffer.alloc(UCRED_BYTES);
  const len = Buffer.alloc(4);
  len.writeUInt32LE(UCRED_BYTES);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, value, len) !== 0 || len.readUInt32LE() !== UCRED_BYTES) return undefined;
  return { pid: value.readInt32LE(0), uid: value.readUInt32LE(4), gid: value.readUInt32LE(8) };
}
