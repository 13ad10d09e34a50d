/**
 * The seqpacket transport over a real socketpair: message boundaries, sizes far over any fixed buffer
 * (nothing truncated), fds over SCM_RIGHTS, EOF, and close() waking a pending receive.
 */
import { closeSync, openSync, readlinkSync } from 'node:fs';

import koffi from 'koffi';
import { afterEach, describe, expect, it } from 'vitest';

import { Libc, parseScmRights, SeqpacketSocket } from '../../src/restore-engine/criu/seqpacket.js';

const libc = Libc.load();
const toClose: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of toClose.splice(0)) await c();
});

function pair(): { ours: SeqpacketSocket; peer: SeqpacketSocket } {
  const { socket, peerFd } = SeqpacketSocket.pair(libc);
  const peer = new SeqpacketSocket(libc, peerFd);
  toClose.push(() => socket.close(), () => peer.close());
  return { ours: socket, peer };
}

/** sendmsg with one SCM_RIGHTS fd, the way CRIU's send_fds does it (test-only binding). */
function sendWithFd(fd: number, data: Buffer, passFd: number): number {
  const lib = koffi.load('libc.so.6');
  const iovec = koffi.struct({ iov_base: 'void *', iov_len: 'size_t' });
  const msghdr = koffi.struct({
    msg_name: 'void *',
    msg_namelen: 'uint32_t',
    msg_iov: koffi.pointer(iovec),
    msg_iovlen: 'size_t',
    msg_control: 'void *',
    msg_controllen: 'size_t',
    msg_flags: 'int',
  });
  const sendmsg = lib.func('sendmsg', 'intptr_t', ['int', koffi.pointer(msghdr), 'int']);
  const control = Buffer.alloc(24);
  control.writeBigUInt64LE(20n, 0); // CMSG_LEN(4)
  control.writeInt32LE(1, 8); // SOL_SOCKET
  control.writeInt32LE(1, 12); // SCM_RIGHTS
  control.writeInt32LE(passFd, 16);
  return sendmsg(fd, {
    msg_name: null,
    msg_namelen: 0,
    msg_iov: [{ iov_base: data, iov_len: data.length }],
    msg_iovlen: 1,
    msg_control: control,
    msg_controllen: control.length,
    msg_flags: 0,
  }, 0) as number;
}

describe('SeqpacketSocket', () => {
  it('keeps message boundaries: two sends are two receives', async () => {
    const { ours, peer } = pair();
    peer.send(Buffer.from([8, 3]));
    peer.send(Buffer.from('second'));
    expect((await ours.receive())?.data).toEqual(Buffer.from([8, 3]));
    expect((await ours.receive())?.data.toString()).toBe('second');
  });

  it('receives a message far larger than any fixed buffer, whole (the size is peeked first)', async () => {
    const { ours, peer } = pair();
    const big = Buffer.alloc(100 * 1024, 7);
    big.writeUInt32LE(0xdeadbeef, big.length - 4);
    peer.send(big);
    const got = await ours.receive();
    expect(got?.data.length).toBe(big.length);
    expect(got?.data.equals(big)).toBe(true);
  });

  it('receives fds passed with SCM_RIGHTS, as new fds of ours', async () => {
    const { ours, peer } = pair();
    const file = openSync('/etc/hostname', 'r');
    expect(sendWithFd(peer.fd, Buffer.from('with-fd'), file)).toBe(7);
    closeSync(file);
    const got = await ours.receive();
    expect(got?.data.toString()).toBe('with-fd');
    expect(got?.fds).toHaveLength(1);
    const fd = got?.fds[0] as number;
    expect(readlinkSync(`/proc/self/fd/${fd}`)).toBe('/etc/hostname');
    closeSync(fd);
  });

  it('resolves null at EOF when the peer closes', async () => {
    const { ours, peer } = pair();
    const pending = ours.receive();
    await peer.close();
    expect(await pending).toBeNull();
  });

  it('does not block the event loop while waiting, and close() wakes the waiting receive', async () => {
    const { ours } = pair();
    const pending = ours.receive();
    await new Promise((r) => setTimeout(r, 50)); // a timer still fires: the loop is free (a blocked loop never gets here)
    await ours.close();
    expect(await pending).toBeNull();
  });

  it('refuses a second concurrent receive, and sends on a closed socket', async () => {
    const { ours } = pair();
    const pending = ours.receive();
    await expect(ours.receive()).rejects.toMatchObject({ code: 'CRIU_PROTOCOL' });
    await ours.close();
    await pending;
    expect(() => ours.send(Buffer.from([1]))).toThrow(expect.objectContaining({ code: 'CRIU_TRANSPORT' }));
  });
});

describe('parseScmRights', () => {
  it('reads every fd of every SCM_RIGHTS message and skips other control messages', () => {
    const c = Buffer.alloc(64);
    // SCM_CREDENTIALS (type 2), 28 bytes long, padded to 32
    c.writeBigUInt64LE(28n, 0);
    c.writeInt32LE(1, 8);
    c.writeInt32LE(2, 12);
    // SCM_RIGHTS with two fds at 32
    c.writeBigUInt64LE(24n, 32);
    c.writeInt32LE(1, 40);
    c.writeInt32LE(1, 44);
    c.writeInt32LE(11, 48);
    c.writeInt32LE(12, 52);
    expect(parseScmRights(c, 56)).toEqual([11, 12]);
  });
});
