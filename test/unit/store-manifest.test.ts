import { execFileSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { isThawError } from '../../src/errors.js';
import {
  checkCompatibility,
  isRestorable,
  MANIFEST_KIND,
  parseManifest,
  schemaVersionOf,
  type Manifest,
  type NodeFacts,
} from '../../src/store/manifest.js';
import { readHostFacts } from '../../src/sys/host-facts.js';
import { manifestFields } from '../helpers/store-fixtures.js';

function validManifest(): Manifest {
  const f = manifestFields();
  return {
    schemaVersion: 1,
    kind: MANIFEST_KIND,
    name: 'llm-7b',
    id: '0b7d6f9e-3c1a-4c8e-9f00-123456789abc',
    createdAt: '2026-01-02T03:04:05.000Z',
    source: f.source,
    constraints: f.constraints,
    criu: f.criu,
    files: [
      { path: 'criu/pages-1.img', size: 10, sha256: 'b'.repeat(64), mode: 0o600 },
      { path: 'rootfs-diff.tar', size: 5, sha256: 'c'.repeat(64), mode: 0o600 },
    ],
    totals: { bytes: 15, fileCount: 2, liveBytes: 99 },
    timings: { phaseMs: { 'criu-dump': 3 } },
  };
}

/** The manifest with one change applied, as JSON text. */
function mutated(change: (m: Record<string, any>) => void): string {
  const m = JSON.parse(JSON.stringify(validManifest())) as Record<string, any>;
  change(m);
  return JSON.stringify(m);
}

function messageOf(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    expect(isThawError(err, 'STORE_MANIFEST_INVALID'), String(err)).toBe(true);
    return (err as Error).message;
  }
  throw new Error('expected STORE_MANIFEST_INVALID');
}

describe('parseManifest', () => {
  it('round-trips a valid manifest', () => {
    const m = validManifest();
    expect(parseManifest(JSON.stringify(m))).toEqual(m);
    expect(parseManifest(m)).toEqual(m);
  });

  it('schema 2 is schema 1 with compressed pages: read as written; schemaVersionOf says which a file list is', () => {
    const m = validManifest();
    m.files[0] = { ...m.files[0]!, path: 'criu/thaw-pages.zst' };
    m.schemaVersion = 2;
    expect(parseManifest(JSON.stringify(m))).toEqual(m);
    expect(schemaVersionOf(m.files)).toBe(2);
    expect(schemaVersionOf(validManifest().files)).toBe(1);
  });

  it.each([
    ['not JSON', '{"kind":', /manifest is not JSON/],
    ['foreign JSON', '{"hello":"world"}', /not a thaw checkpoint manifest: manifest\.kind is missing \(expected "thaw\.checkpoint"\)/],
    ['a JSON array', '[1,2]', /manifest must be an object \(got an array\)/],
    ['another schema version', mutated((m) => (m.schemaVersion = 3)), /manifest\.schemaVersion 3 is not supported \(this thaw reads schemas 1 and 2\)/],
    ['schema 2 without compressed pages', mutated((m) => (m.schemaVersion = 2)), /manifest\.schemaVersion is 2, but its files do not list criu\/thaw-pages\.zst/],
    ['compressed pages under schema 1 (a schema-1 reader would hand them to CRIU)', mutated((m) => (m.files[0].path = 'criu/thaw-pages.zst')), /manifest\.schemaVersion is 1, but its files list criu\/thaw-pages\.zst/],
    ['no schema version', mutated((m) => delete m.schemaVersion), /manifest\.schemaVersion is missing is not supported/],
    ['a bad id', mutated((m) => (m.id = 'x')), /manifest\.id must be a lower-case uuid \(got "x"\)/],
    ['a bad date', mutated((m) => (m.createdAt = 'yesterday')), /manifest\.createdAt must be an ISO 8601 date/],
    ['a bad sha256', mutated((m) => (m.files[1].sha256 = 'XYZ')), /manifest\.files\[1\]\.sha256 must be 64 lower-case hex digits \(got "XYZ"\)/],
    ['a negative size', mutated((m) => (m.files[0].size = -1)), /manifest\.files\[0\]\.size must be a non-negative integer \(got -1\)/],
    ['an escaping path', mutated((m) => (m.files[0].path = '../etc/shadow')), /manifest\.files\[0\]\.path "\.\.\/etc\/shadow" has a '\.\.' segment/],
    ['an absolute path', mutated((m) => (m.files[0].path = '/etc/shadow')), /manifest\.files\[0\]\.path "\/etc\/shadow" is absolute/],
    ['a nested ..', mutated((m) => (m.files[0].path = 'criu/../../x')), /has a '\.\.' segment/],
    ['a duplicate path', mutated((m) => (m.files[1].path = m.files[0].path)), /manifest\.files\[1\]\.path "criu\/pages-1\.img" is listed twice/],
    ['the manifest listing itself', mutated((m) => (m.files[0].path = 'manifest.json')), /must not be manifest\.json itself/],
    ['totals that do not add up', mutated((m) => (m.totals.bytes = 14)), /manifest\.totals\.bytes is 14 but the files add up to 15/],
    ['a missing source field', mutated((m) => delete m.source.container.id), /manifest\.source\.container\.id must be a string \(got undefined\)/],
    ['an env value', mutated((m) => (m.source.envKeys = ['HF_TOKEN=hf_secret'])), /manifest\.source\.envKeys\[0\] contains '='/],
    ['a bad image digest', mutated((m) => (m.constraints.image.digest = 'md5:1')), /manifest\.constraints\.image\.digest must be "sha256:"/],
    ['a bad gpu field', mutated((m) => (m.constraints.gpu = { cudaApiVersion: 'twelve' })), /manifest\.constraints\.gpu\.cudaApiVersion must be a non-negative integer/],
    ['an object criu option', mutated((m) => (m.criu.options.nested = {})), /manifest\.criu\.options\.nested must be a string, number or boolean \(got object\)/],
    ['pid 0', mutated((m) => (m.criu.pid = 0)), /manifest\.criu\.pid must be a process id \(got 0\)/],
  ])('refuses %s', (_label, text, message) => {
    expect(messageOf(() => parseManifest(text))).toMatch(message);
  });
});

describe('checkCompatibility', () => {
  const base = validManifest();
  const node: NodeFacts = {
    arch: { node: 'x64', machine: 'x86_64' },
    kernelRelease: '6.8.0-45-generic',
    criuVersion: '4.1',
    containerdVersion: '2.1.4',
    image: { ref: 'registry.example/llm:1', digest: `sha256:${'a'.repeat(64)}` },
  };

  it('finds nothing on the same node', () => {
    expect(checkCompatibility(base, node)).toEqual([]);
  });

  it('reads this host\'s arch and kernel as a manifest records them', () => {
    const host = readHostFacts();
    expect(host.arch.node).toBe(process.arch);
    expect(host.arch.machine).toBe(execFileSync('uname', ['-m'], { encoding: 'utf8' }).trim());
    expect(host.kernelRelease).toBe(execFileSync('uname', ['-r'], { encoding: 'utf8' }).trim());
  });

  it('makes arch and image mismatches fatal', () => {
    const found = checkCompatibility(base, {
      ...node,
      arch: { node: 'arm64', machine: 'aarch64' },
      image: { ref: 'registry.example/llm:1', digest: `sha256:${'d'.repeat(64)}` },
    });
    expect(found).toEqual([
      { what: 'arch', expected: 'x64 (x86_64)', actual: 'arm64 (aarch64)', severity: 'fatal' },
      {
        what: 'image',
        expected: `registry.example/llm:1@sha256:${'a'.repeat(64)}`,
        actual: `registry.example/llm:1@sha256:${'d'.repeat(64)}`,
        severity: 'fatal',
      },
    ]);
    expect(isRestorable(found)).toBe(false);
  });

  it('accepts a retag of the same digest, and compares refs when a digest is unknown', () => {
    expect(checkCompatibility(base, { ...node, image: { ref: 'mirror.example/llm:latest', digest: node.image.digest! } })).toEqual([]);
    expect(checkCompatibility(base, { ...node, image: { ref: 'registry.example/llm:2' } })).toEqual([
      { what: 'image', expected: 'registry.example/llm:1', actual: 'registry.example/llm:2', severity: 'fatal' },
    ]);
  });

  it('refuses a checkpoint with compressed pages only on a node that says it cannot place them', () => {
    const compressed = validManifest();
    compressed.files[0] = { ...compressed.files[0]!, path: 'criu/thaw-pages.zst' };
    compressed.schemaVersion = 2;
    const refused = checkCompatibility(compressed, { ...node, placesCompressedPages: false });
    expect(refused.map((m) => [m.what, m.severity])).toEqual([['pages', 'fatal']]);
    expect(isRestorable(refused)).toBe(false);
    expect(checkCompatibility(compressed, { ...node, placesCompressedPages: true })).toEqual([]);
    expect(checkCompatibility(compressed, node)).toEqual([]); // not told: not compared
    expect(checkCompatibility(base, { ...node, placesCompressedPages: false })).toEqual([]); // plain pages: CRIU places them
  });

  it('warns on kernel, CRIU and containerd differences unless the kernel is strict', () => {
    const other = { ...node, kernelRelease: '6.8.0-50-generic', criuVersion: '4.2', containerdVersion: '2.2.0' };
    const found = checkCompatibility(base, other);
    expect(found.map((m) => [m.what, m.severity])).toEqual([
      ['kernel', 'warning'],
      ['criu', 'warning'],
      ['containerd', 'warning'],
    ]);
    expect(isRestorable(found)).toBe(true);
    expect(checkCompatibility(base, other, { strictKernel: true })[0]).toEqual({
      what: 'kernel',
      expected: '6.8.0-45-generic',
      actual: '6.8.0-50-generic',
      severity: 'fatal',
    });
  });

  it('compares the GPU block only where both sides know a field', () => {
    const withGpu: Manifest = { ...base, constraints: { ...base.constraints, gpu: { model: 'NVIDIA H100 80GB HBM3', driverVersion: '580.65', cudaApiVersion: 12080 } } };
    expect(checkCompatibility(withGpu, { ...node, gpu: { model: 'NVIDIA H100 80GB HBM3' } })).toEqual([]);
    expect(checkCompatibility(withGpu, { ...node, gpu: { model: 'NVIDIA H200', driverVersion: '580.65', cudaApiVersion: 12070 } })).toEqual([
      { what: 'gpu.model', expected: 'NVIDIA H100 80GB HBM3', actual: 'NVIDIA H200', severity: 'fatal' },
      { what: 'gpu.cudaApiVersion', expected: '>= 12080', actual: '12070', severity: 'fatal' },
    ]);
  });

  it('refuses a tensor-parallel checkpoint on a node with fewer GPUs (its count, or its UUIDs in older manifests), and keeps the count through a parse', () => {
    const four = ['GPU-a', 'GPU-b', 'GPU-c', 'GPU-d'];
    const tp: Manifest = { ...base, constraints: { ...base.constraints, gpu: { model: 'NVIDIA H200', uuids: four, count: 4, cudaProcesses: 4 } } };
    expect(parseManifest(JSON.stringify(tp)).constraints.gpu).toEqual({ model: 'NVIDIA H200', uuids: four, count: 4, cudaProcesses: 4 });
    expect(checkCompatibility(tp, { ...node, gpu: { model: 'NVIDIA H200', uuids: four.slice(0, 2) } })).toEqual([
      { what: 'gpu.count', expected: '>= 4 GPU(s)', actual: '2 GPU(s)', severity: 'fatal' },
    ]);
    expect(checkCompatibility(tp, { ...node, gpu: { model: 'NVIDIA H200', uuids: ['GPU-e', 'GPU-f', 'GPU-g', 'GPU-h', 'GPU-i'] } })).toEqual([]);
    const older: Manifest = { ...base, constraints: { ...base.constraints, gpu: { uuids: four } } };
    expect(checkCompatibility(older, { ...node, gpu: { uuids: ['GPU-e'] } }).map((m) => m.what)).toEqual(['gpu.count']);
  });

  it('refuses a checkpoint with GPU state on a node without a GPU, and ignores a GPU the checkpoint did not use', () => {
    const withGpu: Manifest = { ...base, constraints: { ...base.constraints, gpu: { model: 'NVIDIA H100 80GB HBM3' } } };
    expect(checkCompatibility(withGpu, node)).toEqual([{ what: 'gpu', expected: 'NVIDIA H100 80GB HBM3', actual: 'no GPU', severity: 'fatal' }]);
    expect(checkCompatibility(base, { ...node, gpu: { model: 'NVIDIA H100 80GB HBM3' } })).toEqual([]);
  });
});
