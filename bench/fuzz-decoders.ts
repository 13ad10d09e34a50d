/**
 * Fuzz targets and their driver: random and mutated inputs through every decoder that reads bytes a peer
 * or a checkpoint controls (the NRI runtime's mux frames and ttrpc messages, NRI's protobuf messages, CRIU's
 * RPC responses and image files, the rootfs diff's tar headers). The contract checked for every input:
 * - no crash: a decoder either returns or throws a ThawError (a typed error with a code); any other throw
 *   is a finding;
 * - no hang: the driver counts inputs in shared memory and its parent (bench/fuzz.ts) ends a run whose
 *   count stops moving for longer than the per-input cap, naming the input (seed + index replay it);
 * - bounded memory: the heap is sampled every 1000 inputs and must stay under a cap.
 *
 * Every input is derived from (seed, index) alone, so a finding replays with `--seed S --only I`.
 *
 * The tar target calls the tar header decoder through `decodeTarHeaders` only: it is today
 * readTarEntries of src/restore-engine/rootfs-diff/tar-reader.ts, the one reader that apply also runs.
 */
import { writeFileSync } from 'node:fs';
import { isThawError } from '../src/errors.js';
import { MuxDecoder, encodeMuxFrames } from '../src/nri-plugin/index.js';
import { decodeMessage, decodeRequest, decodeResponse, encodeMessage, encodeRequest, encodeResponse, nriType } from '../src/nri-plugin/index.js';
import { TtrpcDecoder, TtrpcMessageType, encodeTtrpcMessage } from '../src/nri-plugin/index.js';
import { CriuCodec } from '../src/restore-engine/index.js';
import { CriuImageCodec, encodeImageFile, parseImageFile } from '../src/restore-engine/index.js';
import { readTarEntries } from '../src/restore-engine/index.js';

/** The tar header decoder under test (see the module comment): bytes in a file, its entries out. */
export async function decodeTarHeaders(file: string, bytes: Buffer): Promise<unknown> {
  writeFileSync(file, bytes);
  return readTarEntries(file);
}

/** xorshift32 seeded from (seed, index): each input stands alone. */
export function rng(seed: number, index: number): () => number {
  let x = (Math.imul(seed ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(index + 1, 0xc2b2ae35)) >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
}

type Rnd = () => number;
const int = (r: Rnd, n: number): number => Math.floor(r() * n);
const randomBytes = (r: Rnd, n: number): Buffer => {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = int(r, 256);
  return b;
};
const INTERESTING = [0x00, 0x01, 0x7f, 0x80, 0xff, 0x20, 0x30, 0x37, 0x0a, 0x3d];

/** One to four mutations of a valid input: bit flips, interesting bytes, truncation, insertion, duplication. */
export function mutate(r: Rnd, input: Buffer): Buffer {
  let b: Buffer = Buffer.from(input);
  const n = 1 + int(r, 4);
  for (let k = 0; k < n; k++) {
    const op = int(r, 7);
    if (b.length === 0 && op < 4) {
      b = randomBytes(r, 1 + int(r, 16));
      continue;
    }
    const at = int(r, Math.max(1, b.length));
    if (op === 0) b[at] = (b[at] ?? 0) ^ (1 << int(r, 8));
    else if (op === 1) b[at] = INTERESTING[int(r, INTERESTING.length)] as number;
    else if (op === 2) b = b.subarray(0, at);
    else if (op === 3) for (let i = 0; i < 4 && at + i < b.length; i++) b[at + i] = 0xff; // a huge length field
    else if (op === 4) b = Buffer.concat([b.subarray(0, at), randomBytes(r, 1 + int(r, 32)), b.subarray(at)]);
    else if (op === 5) b = Buffer.concat([b, b.subarray(at, at + int(r, 600))]);
    else b = Buffer.concat([b.subarray(0, at), b.subarray(at + 1 + int(r, 8))]);
  }
  return b;
}

/** A valid input, a mutation of one, or random bytes (a third each, roughly). */
export function pickInput(r: Rnd, corpus: readonly Buffer[]): Buffer {
  const k = int(r, 10);
  const base = corpus[int(r, corpus.length)] as Buffer;
  if (k === 0) return base;
  if (k <= 6) return mutate(r, base);
  return randomBytes(r, int(r, 300));
}

/** Feeds `bytes` in random chunks (the socket's split points are the peer's to choose). */
function chunks(r: Rnd, bytes: Buffer): Buffer[] {
  const out: Buffer[] = [];
  let at = 0;
  while (at < bytes.length) {
    const n = 1 + int(r, Math.max(1, bytes.length - at));
    out.push(bytes.subarray(at, at + n));
    at += n;
  }
  return out;
}

export interface FuzzTarget {
  name: string;
  /** Runs one input; resolves whatever the decoder returned or threw (the driver judges the throw). */
  run(r: Rnd): unknown;
}

/** NRI messages the plugin decodes (plugin.ts), with one valid instance each. */
const NRI_SAMPLES: Array<[string, object]> = [
  ['ConfigureRequest', { config: 'x: 1', runtimeName: 'containerd', runtimeVersion: '2.1.9', registrationTimeout: 5000, requestTimeout: 2000 }],
  ['SynchronizeRequest', { pods: [{ id: 'p', name: 'n', namespace: 'ns', uid: 'u', annotations: { a: 'b' } }], containers: [{ id: 'c', podSandboxId: 'p', name: 'w', state: 2, pid: 42, args: ['/bin/sh'], env: ['A=B'] }], more: false }],
  ['CreateContainerRequest', { pod: { id: 'p', name: 'n' }, container: { id: 'c', name: 'w', args: ['a', 'b'], annotations: { 'thaw.dev/restore': 'x' }, mounts: [{ destination: '/d', source: '/s', type: 'bind', options: ['rbind'] }] } }],
  ['StateChangeEvent', { event: 5, pod: { id: 'p' }, container: { id: 'c', pid: 7 } }],
  ['UpdateContainerRequest', { pod: { id: 'p' }, container: { id: 'c' }, linuxResources: { cpu: { shares: { value: 2 } } } }],
  ['StopContainerRequest', { pod: { id: 'p' }, container: { id: 'c' } }],
  ['UpdateContainersResponse', { failed: [{ containerId: 'c' }] }],
  // The head every CreateContainer is decoded as first (plugin-service.ts).
  ['CreateContainerRequestHead', { pod: { id: 'p', name: 'n', namespace: 'ns', uid: 'u', annotations: { a: 'b' } }, container: { id: 'c', podSandboxId: 'p', name: 'w', annotations: { 'thaw.dev/restore': 'x' }, args: ['a'] } }],
];

export function fuzzTargets(o: { tarFile: string; tarCorpus: readonly Buffer[] }): FuzzTarget[] {
  const criu = CriuCodec.load();
  const images = CriuImageCodec.load();
  const nriCorpus = NRI_SAMPLES.map(([name, value]) => [name, encodeMessage(nriType(name), value)] as const);
  const requestCorpus = [
    encodeRequest({ service: 'nri.pkg.api.v1alpha1.Plugin', method: 'CreateContainer', payload: nriCorpus[2]![1], timeoutNano: 2e9, metadata: [{ key: 'k', value: 'v' }] }),
    encodeRequest({ service: 'nri.pkg.api.v1alpha1.Plugin', method: 'Configure', payload: nriCorpus[0]![1] }),
  ];
  const responseCorpus = [encodeResponse({ payload: Buffer.from('abc') }), encodeResponse({ status: { code: 2, message: 'boom' } })];
  const ttrpcCorpus = [...requestCorpus, ...responseCorpus].map((body, i) => encodeTtrpcMessage(i + 1, i < 2 ? TtrpcMessageType.REQUEST : TtrpcMessageType.RESPONSE, body, 0));
  const muxCorpus = ttrpcCorpus.map((m, i) => Buffer.concat(encodeMuxFrames((i % 2) + 1, m)));
  const criuRespCorpus = [
    criu.encodeResponse({ type: 2, success: true, restore: { pid: 1234 } } as never),
    criu.encodeResponse({ type: 7, success: false, crErrno: 5, crErrmsg: 'bad' } as never),
    criu.encodeResponse({ type: 8, success: true, notify: { script: 'post-restore', pid: 9 } } as never),
  ];
  const imageCorpus = [
    encodeImageFile({ header: Buffer.from([0x54, 0x4d, 0x52, 0x53, 0x36, 0x32, 0x11, 0x54]), entries: [Buffer.from([0x08, 0x01, 0x10, 0x01, 0x18, 0x01, 0x20, 0x01]), Buffer.from([0x08, 0x80, 0x80, 0x04, 0x10, 0x90, 0x80, 0x04, 0x18, 0x00])] }),
  ];
  const imageDecoders: Array<(b: Buffer) => unknown> = [
    (b) => images.decodePstree(b),
    (b) => images.decodeVmas(b),
    (b) => images.decodeRegFile(b),
    (b) => images.decodePagemapHead(b),
    (b) => images.decodePagemapEntry(b),
  ];
  return [
    {
      name: 'mux framing',
      run: (r) => {
        const d = new MuxDecoder({ maxPayloadBytes: 1 << 20 });
        for (const c of chunks(r, pickInput(r, muxCorpus))) d.push(c);
        return d.bufferedBytes;
      },
    },
    {
      name: 'ttrpc framing',
      run: (r) => {
        const d = new TtrpcDecoder({ maxDataBytes: 1 << 20 });
        for (const c of chunks(r, pickInput(r, ttrpcCorpus))) d.push(c);
        return d.bufferedBytes;
      },
    },
    { name: 'ttrpc request', run: (r) => decodeRequest(pickInput(r, requestCorpus)) },
    { name: 'ttrpc response', run: (r) => decodeResponse(pickInput(r, responseCorpus)) },
    {
      name: 'NRI messages',
      run: (r) => {
        const [name] = nriCorpus[int(r, nriCorpus.length)]!;
        return decodeMessage(nriType(name), pickInput(r, nriCorpus.map(([, b]) => b)));
      },
    },
    { name: 'CRIU RPC response', run: (r) => criu.decodeResponse(pickInput(r, criuRespCorpus)) },
    {
      name: 'CRIU image files',
      run: (r) => {
        const image = parseImageFile(pickInput(r, imageCorpus), 'fuzz.img');
        const decode = imageDecoders[int(r, imageDecoders.length)]!;
        return image.entries.map((e) => decode(e));
      },
    },
    { name: 'tar headers', run: (r) => decodeTarHeaders(o.tarFile, pickInput(r, o.tarCorpus)) },
  ];
}

export interface FuzzFinding {
  target: string;
  index: number;
  kind: 'untyped-throw' | 'slow' | 'memory';
  detail: string;
}

export interface FuzzReport {
  inputs: number;
  seconds: number;
  perTarget: Record<string, { inputs: number; typedErrors: number; maxMs: number }>;
  maxHeapMiB: number;
  findings: FuzzFinding[];
}

export interface FuzzOptions {
  inputs: number;
  seed: number;
  targets: FuzzTarget[];
  /** An input slower than this is a finding (the parent also kills a run stuck on one input this long). */
  perInputCapMs: number;
  heapCapMiB: number;
  /** Only this input (replay). */
  only?: number;
  /** Told the index of the input about to run (the parent's hang watchdog reads it). */
  progress?: (index: number) => void;
}

/** Runs inputs 0..inputs-1 round-robin over the targets (input i goes to target i mod n). */
export async function runFuzz(o: FuzzOptions): Promise<FuzzReport> {
  const started = performance.now();
  const perTarget: FuzzReport['perTarget'] = {};
  for (const t of o.targets) perTarget[t.name] = { inputs: 0, typedErrors: 0, maxMs: 0 };
  const findings: FuzzFinding[] = [];
  let maxHeap = process.memoryUsage().heapUsed;
  const first = o.only ?? 0;
  const end = o.only !== undefined ? o.only + 1 : o.inputs;
  for (let i = first; i < end; i++) {
    o.progress?.(i);
    const target = o.targets[i % o.targets.length]!;
    const stats = perTarget[target.name]!;
    const r = rng(o.seed, i);
    const t0 = performance.now();
    try {
      await target.run(r);
    } catch (err) {
      if (isThawError(err)) stats.typedErrors++;
      else if (findings.length < 100) findings.push({ target: target.name, index: i, kind: 'untyped-throw', detail: String((err as Error)?.stack ?? err).slice(0, 400) });
    }
    const ms = performance.now() - t0;
    stats.inputs++;
    if (ms > stats.maxMs) stats.maxMs = ms;
    if (ms > o.perInputCapMs && findings.length < 100) findings.push({ target: target.name, index: i, kind: 'slow', detail: `${ms.toFixed(0)} ms` });
    if (i % 1000 === 999) {
      const heap = process.memoryUsage().heapUsed;
      if (heap > maxHeap) maxHeap = heap;
      if (heap > o.heapCapMiB * 2 ** 20 && findings.length < 100) findings.push({ target: target.name, index: i, kind: 'memory', detail: `heap ${(heap / 2 ** 20).toFixed(0)} MiB` });
    }
  }
  for (const s of Object.values(perTarget)) s.maxMs = Math.round(s.maxMs * 10) / 10;
  return { inputs: end - first, seconds: Math.round((performance.now() - started) / 100) / 10, perTarget, maxHeapMiB: Math.round(maxHeap / 2 ** 20), findings };
}

/** One 512-byte ustar header (with its checksum) followed by the data padded to a block. */
function tarMember(name: string, typeflag: string, data: Buffer = Buffer.alloc(0), linkname = ''): Buffer {
  const h = Buffer.alloc(512);
  h.write(name.slice(0, 100), 0, 'utf8');
  h.write('0000644\0', 100, 'ascii');
  h.write('0000000\0', 108, 'ascii');
  h.write('0000000\0', 116, 'ascii');
  h.write(`${data.length.toString(8).padStart(11, '0')}\0`, 124, 'ascii');
  h.write('00000000000\0', 136, 'ascii');
  h.write('        ', 148, 'ascii');
  h.write(typeflag, 156, 'ascii');
  h.write(linkname.slice(0, 100), 157, 'utf8');
  h.write('ustar\0', 257, 'ascii');
  h.write('00', 263, 'ascii');
  let sum = 0;
  for (const byte of h) sum += byte;
  h.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 'ascii');
  const pad = Buffer.alloc((512 - (data.length % 512)) % 512);
  return Buffer.concat([h, data, pad]);
}

function paxRecord(key: string, value: string): string {
  const body = ` ${key}=${value}\n`;
  let len = body.length + 1;
  while (`${len}${body}`.length !== len) len = `${len}${body}`.length;
  return `${len}${body}`;
}

/** Valid archives of the kinds a rootfs diff holds: files, directories, symlinks, FIFOs, hard links, pax records. */
export function tarCorpus(): Buffer[] {
  const end = Buffer.alloc(1024);
  const longName = `${'d'.repeat(120)}/file`;
  return [
    Buffer.concat([tarMember('etc/', '5'), tarMember('etc/hosts', '0', Buffer.from('127.0.0.1 localhost\n')), tarMember('etc/link', '2', Buffer.alloc(0), 'hosts'), end]),
    Buffer.concat([tarMember('PaxHeaders/x', 'x', Buffer.from(paxRecord('path', longName) + paxRecord('size', '3'))), tarMember('short', '0', Buffer.from('abc')), end]),
    // GNU long names ('L') are refused by the reader (thaw's writer never makes them): a pax linkpath instead.
    Buffer.concat([tarMember('PaxHeaders/y', 'x', Buffer.from(paxRecord('linkpath', longName) + paxRecord('uid', '4000000'))), tarMember('trunc', '2', Buffer.alloc(0), 'x'), end]),
    Buffer.concat([tarMember('a', '1', Buffer.alloc(0), 'etc/hosts'), tarMember('fifo', '6'), end]),
  ];
}
