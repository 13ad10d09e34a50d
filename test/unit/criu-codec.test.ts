/**
 * CRIU's RPC wire format, pinned against hand-made bytes: if a field number in proto/criu/rpc.proto
 * drifts from CRIU's, these fail. Bytes are written out by hand from the protobuf encoding rules
 * (tag = field << 3 | wire type; varints little-endian base 128; int32 -1 = ten bytes).
 */
import { describe, expect, it } from 'vitest';

import { isThawError } from '../../src/errors.js';
import { CriuCodec, CriuReqType, type CriuOptsMessage } from '../../src/restore-engine/criu/rpc.js';

const codec = CriuCodec.load();
const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');

/** images_dir_fd = -1: field 1, varint, ten bytes of two's complement. */
const IMAGES_DIR_FD_MINUS_1 = '08ffffffffffffffffff01';

/** A DUMP request whose opts are images_dir_fd=-1 plus `field`; returns the expected bytes. */
function dumpWith(fieldHex: string): string {
  const opts = IMAGES_DIR_FD_MINUS_1 + fieldHex;
  const len = opts.length / 2;
  return `0801` + `12` + len.toString(16).padStart(2, '0') + opts;
}

describe('criu_req encoding', () => {
  it('a CHECK request is the two bytes 08 03', () => {
    expect(hex(codec.encodeRequest({ type: CriuReqType.CHECK }))).toBe('0803');
  });

  it('a VERSION request is 08 0a', () => {
    expect(hex(codec.encodeRequest({ type: CriuReqType.VERSION }))).toBe('080a');
  });

  it('a notify answer carries notify_success as field 3', () => {
    expect(hex(codec.encodeRequest({ type: CriuReqType.NOTIFY, notifySuccess: true }))).toBe('08061801');
    expect(hex(codec.encodeRequest({ type: CriuReqType.NOTIFY, notifySuccess: false }))).toBe('08061800');
  });

  it('FEATURE_CHECK carries criu_features as field 5', () => {
    expect(hex(codec.encodeRequest({ type: CriuReqType.FEATURE_CHECK, features: { memTrack: true, lazyPages: true } }))).toBe(
      '0809' + '2a04' + '0801' + '1001',
    );
  });

  it('keep_open is field 4', () => {
    expect(hex(codec.encodeRequest({ type: CriuReqType.VERSION, keepOpen: true }))).toBe('080a2001');
  });

  const str = (s: string): string => s.length.toString(16).padStart(2, '0') + Buffer.from(s).toString('hex');
  const cases: Array<[string, Partial<CriuOptsMessage>, string]> = [
    ['pid is field 2', { pid: 300 }, '10ac02'],
    ['leave_running is field 3', { leaveRunning: true }, '1801'],
    ['ext_unix_sk is field 4', { extUnixSk: true }, '2001'],
    ['tcp_established is field 5', { tcpEstablished: true }, '2801'],
    ['shell_job is field 7', { shellJob: true }, '3801'],
    ['file_locks is field 8', { fileLocks: true }, '4001'],
    ['log_level is field 9', { logLevel: 4 }, '4804'],
    ['log_file is field 10', { logFile: 'dump.log' }, '52' + str('dump.log')],
    ['notify_scripts is field 12', { notifyScripts: true }, '6001'],
    ['root is field 13', { root: '/r' }, '6a' + str('/r')],
    ['work_dir_fd is field 17', { workDirFd: 5 }, '8801' + '05'],
    ['link_remap is field 18', { linkRemap: true }, '9001' + '01'],
    ['cg_root is field 25', { cgRoot: [{ path: '/p' }] }, 'ca01' + '04' + '12' + str('/p')],
    ['rst_sibling is field 26', { rstSibling: true }, 'd001' + '01'],
    ['inherit_fd is field 27 {key 1, fd 2}', { inheritFd: [{ key: 'k', fd: 7 }] }, 'da01' + '05' + '0a' + str('k') + '1007'],
    ['skip_mnt is field 31', { skipMnt: ['/m'] }, 'fa01' + str('/m')],
    ['manage_cgroups_mode is field 34', { manageCgroupsMode: 0 }, '9002' + '00'],
    ['ghost_limit is field 35', { ghostLimit: 1 }, '9802' + '01'],
    ['external is field 37', { external: ['x'] }, 'aa02' + str('x')],
    ['join_ns is field 39 {ns 1, ns_file 2}', { joinNs: [{ ns: 'ipc', nsFile: '/f' }] }, 'ba02' + '09' + '0a' + str('ipc') + '12' + str('/f')],
    ['freeze_cgroup is field 44', { freezeCgroup: '/c' }, 'e202' + str('/c')],
    ['orphan_pts_master is field 50', { orphanPtsMaster: true }, '9003' + '01'],
    ['config_file is field 51', { configFile: '/c' }, '9a03' + str('/c')],
    ['network_lock is field 64', { networkLock: 3 }, '8004' + '03'],
    ['images_dir is field 68', { imagesDir: '/i' }, 'a204' + str('/i')],
    ['leave_stopped is field 69', { leaveStopped: true }, 'a804' + '01'],
  ];
  it.each(cases)('%s', (_name, field, bytes) => {
    const req = { type: CriuReqType.DUMP, opts: { imagesDirFd: -1, ...field } };
    expect(hex(codec.encodeRequest(req))).toBe(dumpWith(bytes));
  });
});

describe('criu_resp decoding', () => {
  it('a successful CHECK answer: type 1, success 2', () => {
    expect(codec.decodeResponse(Buffer.from('08031001', 'hex'))).toEqual({ type: CriuReqType.CHECK, success: true });
  });

  it('a RESTORE answer carries criu_restore_resp {pid 1} as field 4', () => {
    expect(codec.decodeResponse(Buffer.from('08021001' + '2202082a', 'hex'))).toEqual({
      type: CriuReqType.RESTORE,
      success: true,
      restore: { pid: 42 },
    });
  });

  it('a DUMP answer carries criu_dump_resp {restored 1} as field 3', () => {
    expect(codec.decodeResponse(Buffer.from('08011001' + '1a020800', 'hex')).dump).toEqual({ restored: false });
  });

  it('a failure carries cr_errno (7) and cr_errmsg (9)', () => {
    const msg = Buffer.from('bad');
    const bytes = Buffer.concat([Buffer.from('08021000' + '3816' + '4a03', 'hex'), msg]);
    expect(codec.decodeResponse(bytes)).toEqual({ type: 2, success: false, crErrno: 22, crErrmsg: 'bad' });
  });

  it('a NOTIFY carries criu_notify {script 1, pid 2} as field 5', () => {
    const script = Buffer.from('post-restore');
    const notify = Buffer.concat([Buffer.from([0x0a, script.length]), script, Buffer.from('1007', 'hex')]);
    const bytes = Buffer.concat([Buffer.from('08061001' + '2a', 'hex'), Buffer.from([notify.length]), notify]);
    expect(codec.decodeResponse(bytes).notify).toEqual({ script: 'post-restore', pid: 7 });
  });

  it('a VERSION answer carries criu_version as field 10 {major 1, minor 2, gitid 3, sublevel 4}', () => {
    const v = '0804' + '1001' + '1a02' + Buffer.from('g1').toString('hex') + '2001';
    const bytes = '080a1001' + '52' + (v.length / 2).toString(16).padStart(2, '0') + v;
    expect(codec.decodeResponse(Buffer.from(bytes, 'hex')).version).toEqual({
      majorNumber: 4,
      minorNumber: 1,
      gitid: 'g1',
      sublevel: 1,
    });
  });

  it('a FEATURE_CHECK answer carries criu_features as field 8', () => {
    expect(codec.decodeResponse(Buffer.from('08091001' + '42060801' + '1000' + '1801', 'hex')).features).toEqual({
      memTrack: true,
      lazyPages: false,
      pidfdStore: true,
    });
  });

  it('bytes that are not a criu_resp are CRIU_PROTOCOL with the bytes as evidence', () => {
    let caught: unknown;
    try {
      codec.decodeResponse(Buffer.from('0803', 'hex')); // success (required) missing
    } catch (err) {
      caught = err;
    }
    expect(isThawError(caught, 'CRIU_PROTOCOL')).toBe(true);
    expect((caught as { evidence: { bytes: string } }).evidence.bytes).toBe('0803');
  });
});
