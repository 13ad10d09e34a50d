/**
 * The codec of CRIU's RPC: criu_req / criu_resp to and from bytes, over `proto/criu/rpc.proto`.
 *
 * Only this folder (`src/restore-engine/criu/`) sees these message types; the rest of thaw talks in
 * the domain types of `options.ts`. Field names here are protobufjs's camelCase of the proto's names.
 */
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import protobuf from 'protobufjs';

import { CriuError, CriuErrorCode } from './errors.js';

/** criu_req_type */
export const CriuReqType = {
  EMPTY: 0,
  DUMP: 1,
  RESTORE: 2,
  CHECK: 3,
  PRE_DUMP: 4,
  PAGE_SERVER: 5,
  NOTIFY: 6,
  CPUINFO_DUMP: 7,
  CPUINFO_CHECK: 8,
  FEATURE_CHECK: 9,
  VERSION: 10,
  WAIT_PID: 11,
  PAGE_SERVER_CHLD: 12,
  SINGLE_PRE_DUMP: 13,
} as const;
export type CriuReqType = (typeof CriuReqType)[keyof typeof CriuReqType];

/** The name of a request type for messages ("RESTORE"), or the number when CRIU sent one we do not know. */
export function reqTypeName(type: number): string {
  const entry = Object.entries(CriuReqType).find(([, v]) => v === type);
  return entry ? entry[0] : String(type);
}

/** criu_cg_mode */
export const CriuCgMode = { IGNORE: 0, CG_NONE: 1, PROPS: 2, SOFT: 3, FULL: 4, STRICT: 5, DEFAULT: 6 } as const;
export type CriuCgMode = (typeof CriuCgMode)[keyof typeof CriuCgMode];

/** criu_network_lock_method */
export const CriuNetworkLockMethod = { IPTABLES: 1, NFTABLES: 2, SKIP: 3 } as const;
export type CriuNetworkLockMethod = (typeof CriuNetworkLockMethod)[keyof typeof CriuNetworkLockMethod];

/** criu_pre_dump_mode */
export const CriuPreDumpMode = { SPLICE: 1, VM_READ: 2 } as const;
export type CriuPreDumpMode = (typeof CriuPreDumpMode)[keyof typeof CriuPreDumpMode];

/** criu_opts: the fields thaw sets (others exist in the proto and may be added here when needed). */
export interface CriuOptsMessage {
  imagesDirFd: number;
  imagesDir?: string;
  pid?: number;
  leaveRunning?: boolean;
  extUnixSk?: boolean;
  tcpEstablished?: boolean;
  evasiveDevices?: boolean;
  shellJob?: boolean;
  fileLocks?: boolean;
  logLevel?: number;
  logFile?: string;
  notifyScripts?: boolean;
  root?: string;
  parentImg?: string;
  trackMem?: boolean;
  autoDedup?: boolean;
  workDirFd?: number;
  linkRemap?: boolean;
  extMnt?: Array<{ key: string; val: string }>;
  cgRoot?: Array<{ ctrl?: string; path: string }>;
  rstSibling?: boolean;
  inheritFd?: Array<{ key: string; fd: number }>;
  autoExtMnt?: boolean;
  extSharing?: boolean;
  extMasters?: boolean;
  skipMnt?: string[];
  enableFs?: string[];
  unixSkIno?: Array<{ inode: number }>;
  manageCgroupsMode?: CriuCgMode;
  ghostLimit?: number;
  external?: string[];
  emptyNs?: number;
  joinNs?: Array<{ ns: string; nsFile: string; extraOpt?: string }>;
  freezeCgroup?: string;
  timeout?: number;
  tcpSkipInFlight?: boolean;
  weakSysctls?: boolean;
  lazyPages?: boolean;
  orphanPtsMaster?: boolean;
  configFile?: string;
  tcpClose?: boolean;
  lsmProfile?: string;
  networkLock?: CriuNetworkLockMethod;
  skipFileRwxCheck?: boolean;
  leaveStopped?: boolean;
  logToStderr?: boolean;
}

export interface CriuFeaturesMessage {
  memTrack?: boolean;
  lazyPages?: boolean;
  pidfdStore?: boolean;
}

export interface CriuReqMessage {
  type: CriuReqType;
  opts?: CriuOptsMessage;
  notifySuccess?: boolean;
  keepOpen?: boolean;
  features?: CriuFeaturesMessage;
  pid?: number;
}

export interface CriuVersionMessage {
  majorNumber: number;
  minorNumber: number;
  gitid?: string;
  sublevel?: number;
  extra?: number;
  name?: string;
}

export interface CriuRespMessage {
  type: number;
  success: boolean;
  dump?: { restored?: boolean };
  restore?: { pid: number };
  notify?: { script?: string; pid?: number };
  ps?: { address?: string; port?: number; pid?: number; fd?: number };
  crErrno?: number;
  features?: CriuFeaturesMessage;
  crErrmsg?: string;
  version?: CriuVersionMessage;
  status?: number;
}

/**
 * Where `proto/criu/<fileName>` lies relative to this module: from `src/` (tsx, vitest) and from `dist/src/`
 * (built). rpc.proto here, images.proto for criu/images.ts.
 */
export function criuProtoPath(fileName: string): string {
  const candidates = [`../../../proto/criu/${fileName}`, `../../../../proto/criu/${fileName}`].map((rel) =>
    fileURLToPath(new URL(rel, import.meta.url)),
  );
  const found = candidates.find((p) => existsSync(p));
  if (found === undefined) {
    throw new CriuError(CriuErrorCode.PROTOCOL, `${fileName} not found (looked at ${candidates.join(', ')})`, {
      step: `load CRIU ${fileName}`,
    });
  }
  return found;
}

/**
 * Encodes requests and decodes responses. Load it once (it parses the .proto) and share it: it holds
 * no state besides the parsed types.
 */
export class CriuCodec {
  private readonly reqType: protobuf.Type;
  private readonly respType: protobuf.Type;

  private constructor(root: protobuf.Root) {
    this.reqType = root.lookupType('criu_req');
    this.respType = root.lookupType('criu_resp');
  }

  static load(protoPath: string = criuProtoPath('rpc.proto')): CriuCodec {
    const root = new protobuf.Root();
    root.loadSync(protoPath);
    return new CriuCodec(root);
  }

  encodeRequest(req: CriuReqMessage): Buffer {
    const problem = this.reqType.verify(req);
    if (problem !== null) {
      throw new CriuError(CriuErrorCode.PROTOCOL, `invalid criu_req: ${problem}`, { step: 'encode CRIU request' });
    }
    return Buffer.from(this.reqType.encode(this.reqType.fromObject(req)).finish());
  }

  /** Decodes a criu_resp; undecodable bytes (or a missing required field) are a CRIU_PROTOCOL error. */
  decodeResponse(bytes: Uint8Array): CriuRespMessage {
    try {
      const msg = this.respType.decode(bytes);
      return this.respType.toObject(msg, { defaults: false, enums: Number }) as CriuRespMessage;
    } catch (cause) {
      throw new CriuError(CriuErrorCode.PROTOCOL, `undecodable criu_resp (${bytes.length} bytes)`, {
        step: 'decode CRIU response',
        cause,
        evidence: { bytes: Buffer.from(bytes.subarray(0, 256)).toString('hex') },
      });
    }
  }

  /** For tests and debugging: the inverse directions. */
  decodeRequest(bytes: Uint8Array): CriuReqMessage {
    return this.reqType.toObject(this.reqType.decode(bytes), { defaults: false, enums: Number }) as CriuReqMessage;
  }

  encodeResponse(resp: CriuRespMessage): Buffer {
    return Buffer.from(this.respType.encode(this.respType.fromObject(resp)).finish());
  }
}
