/** The registry store's pure parts: references, WWW-Authenticate challenges, HTTP response heads, the artifact. */
import { describe, expect, it } from 'vitest';
import { formatReference, parseCheckpointReference } from '../../src/checkpoint-reference.js';
import { buildImageManifest, CHECKPOINT_ARTIFACT_TYPE, chunksOf, parseImageManifest, planChunks, WEIGHTS_LAYER_MEDIA_TYPE, weightsLayersOf, weightsSourcesOf, type ImageManifest } from '../../src/store/oci/artifact.js';

type Edit = (m: ImageManifest) => void;
import { parseResponseHead } from '../../src/store/oci/blob-stream.js';
import { parseChallenges } from '../../src/store/oci/challenge.js';
import { OciErrorCode } from '../../src/store/oci/errors.js';
import { localNameFor } from '../../src/store/oci/pull.js';
import { parseReference } from '../../src/store/oci/reference.js';
import type { Manifest } from '../../src/store/manifest.js';

const HEX = 'ab'.repeat(32);

describe('references', () => {
  it.each([
    ['registry:5000/team/qwen:v1', { registry: 'registry:5000', repository: 'team/qwen', tag: 'v1' }],
    ['ghcr.io/org/ckpt', { registry: 'ghcr.io', repository: 'org/ckpt', tag: 'latest' }],
    [`localhost/a/b/c@sha256:${HEX}`, { registry: 'localhost', repository: 'a/b/c', digest: `sha256:${HEX}` }],
    [`Registry.Example:443/x__y.z-w:V_1.0@sha256:${HEX}`, { registry: 'registry.example:443', repository: 'x__y.z-w', tag: 'V_1.0', digest: `sha256:${HEX}` }],
    ['[::1]:5000/r:t', { registry: '[::1]:5000', repository: 'r', tag: 't' }],
  ])('parses %s', (text, expected) => {
    const r = parseCheckpointReference(text);
    expect(r).toEqual({ reference: expected });
    if ('reference' in r) expect(parseCheckpointReference(formatReference(r.reference))).toEqual(r);
  });

  it.each([
    ['', /empty/],
    ['qwen:v1', /names no registry/],
    ['team/qwen:v1', /"team" is not a registry host/],
    ['registry:5000/../etc:v1', /component "\.\." must be/],
    ['registry:5000/a//b', /component "" must be/],
    ['registry:5000/Team/q', /component "Team"/],
    ['registry:5000/q:-bad', /tag "-bad"/],
    ['registry:5000/q@sha256:ABC', /digest "sha256:ABC"/],
    ['registry:99999/q', /port 99999 is out of range/],
    ['registry:5000/q v1', /whitespace/],
    [`registry:5000/${'a'.repeat(300)}`, /longer than 255/],
  ])('refuses %j', (text, reason) => {
    const r = parseCheckpointReference(text);
    expect('reason' in r && r.reason).toMatch(reason);
    expect(() => parseReference(text)).toThrow(expect.objectContaining({ code: OciErrorCode.INVALID_REFERENCE }));
  });

  it('derives local names from manifest digests only', () => {
    expect(localNameFor(`sha256:${HEX}`)).toBe(`oci-${HEX}`);
    expect(() => localNameFor('sha256:../../x')).toThrow(expect.objectContaining({ code: OciErrorCode.MANIFEST_INVALID }));
  });
});

describe('WWW-Authenticate challenges', () => {
  it('reads Bearer and Basic challenges with quoted and bare parameters', () => {
    expect(parseChallenges('Bearer realm="https://auth.example/token",service="registry.example",scope="repository:team/q:pull,push"')).toEqual([
      { scheme: 'bearer', params: { realm: 'https://auth.example/token', service: 'registry.example', scope: 'repository:team/q:pull,push' } },
    ]);
    expect(parseChallenges('Basic realm="thaw test", Bearer realm=x')).toEqual([
      { scheme: 'basic', params: { realm: 'thaw test' } },
      { scheme: 'bearer', params: { realm: 'x' } },
    ]);
    expect(parseChallenges('Basic realm="a \\"quoted\\" realm"')).toEqual([{ scheme: 'basic', params: { realm: 'a "quoted" realm' } }]);
    expect(parseChallenges('')).toEqual([]);
    expect(parseChallenges('Negotiate')).toEqual([{ scheme: 'negotiate', params: {} }]);
  });
});

describe('HTTP response heads', () => {
  it('reads the status and lower-cased headers, joining repeated ones', () => {
    expect(parseResponseHead('HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\nX-A: 1\r\nx-a: 2')).toEqual({ status: 206, headers: { 'content-length': '10', 'x-a': '1, 2' } });
    expect(parseResponseHead('HTTP/1.0 200 OK')).toEqual({ status: 200, headers: {} });
    expect(parseResponseHead('SSH-2.0-OpenSSH')).toBeUndefined();
    expect(parseResponseHead('HTTP/1.1 200 OK\r\nno colon here')).toBeUndefined();
  });
});

describe('the checkpoint artifact', () => {
  const manifest = {
    files: [
      { path: 'criu/pages-1.img', size: 2500, sha256: 'a'.repeat(64), mode: 0o600 },
      { path: 'rootfs-diff.tar', size: 10, sha256: 'b'.repeat(64), mode: 0o600 },
    ],
  } as unknown as Manifest;
  const chunks = planChunks(manifest.files, 1000).map((c, i) => ({ ...c, digest: c.digest ?? `sha256:${String(i).repeat(64).slice(0, 64)}` }));
  const config = { digest: `sha256:${'c'.repeat(64)}`, size: 123 };

  it('splits large files into chunks annotated with path and offset, and maps them back', () => {
    expect(chunks.map((c) => [c.path, c.offset, c.size])).toEqual([
      ['criu/pages-1.img', 0, 1000],
      ['criu/pages-1.img', 1000, 1000],
      ['criu/pages-1.img', 2000, 500],
      ['rootfs-diff.tar', 0, 10],
    ]);
    expect(chunks[3]!.digest).toBe(`sha256:${'b'.repeat(64)}`);
    const image = parseImageManifest(JSON.stringify(buildImageManifest(config, chunks)));
    expect(image.artifactType).toBe(CHECKPOINT_ARTIFACT_TYPE);
    expect(chunksOf(image, manifest)).toEqual(chunks);
  });

  it('names every layer for generic tools: a whole file by its path, a chunk by path and zero-padded offset (name order = file order)', () => {
    const titles = buildImageManifest(config, chunks).layers.map((l) => l.annotations?.['org.opencontainers.image.title']);
    expect(titles).toEqual([
      'criu/pages-1.img.thaw-chunk-0000000000000000',
      'criu/pages-1.img.thaw-chunk-0000000000001000',
      'criu/pages-1.img.thaw-chunk-0000000000002000',
      'rootfs-diff.tar',
    ]);
    expect([...titles].sort()).toEqual(titles);
  });

  const tamper = (edit: Edit): string => {
    const m = buildImageManifest(config, chunks);
    edit(m);
    return JSON.stringify(m);
  };

  it.each<[string, Edit, string]>([
    ['another artifactType', (m) => void (m.artifactType = 'application/vnd.example'), OciErrorCode.FOREIGN_ARTIFACT],
    ['an image manifest of a container image', (m) => void (m.config.mediaType = 'application/vnd.oci.image.config.v1+json'), OciErrorCode.FOREIGN_ARTIFACT],
    ['a layer of another media type', (m) => void (m.layers[0]!.mediaType = 'application/vnd.oci.image.layer.v1.tar+gzip'), OciErrorCode.FOREIGN_ARTIFACT],
    ['a bad digest', (m) => void (m.layers[0]!.digest = 'sha256:xyz'), OciErrorCode.MANIFEST_INVALID],
  ])('refuses %s', (_what, edit, code) => {
    expect(() => parseImageManifest(tamper(edit))).toThrow(expect.objectContaining({ code }));
  });

  it.each<[string, Edit, RegExp]>([
    ['a path that escapes the checkpoint', (m) => void (m.layers[3]!.annotations![ 'dev.thaw.file.path'] = '../../etc/passwd'), /escapes|'\.\.' segment/],
    ['a file the manifest does not list', (m) => void (m.layers[3]!.annotations!['dev.thaw.file.path'] = 'criu/other.img'), /not a file of the checkpoint/],
    ['a gap between chunks', (m) => void m.layers.splice(1, 1), /leave a gap at byte 1000/],
    ['overlapping chunks', (m) => void (m.layers[1]!.annotations!['dev.thaw.file.offset'] = '900'), /overlap/],
    ['a whole-file layer whose digest is not the file sha256', (m) => void (m.layers[3]!.digest = `sha256:${'d'.repeat(64)}`), /the file's sha256 is/],
    ['an offset that is not a number', (m) => void (m.layers[0]!.annotations!['dev.thaw.file.offset'] = '0x10'), /decimal byte count/],
  ])('refuses layers with %s', (_what, edit, reason) => {
    const image = parseImageManifest(tamper(edit));
    expect(() => chunksOf(image, manifest)).toThrow(reason);
  });
});

describe('weights layers', () => {
  const src = (path: string, sha: string, fileSize: number) => ({ kind: 'file', offset: 0, size: 2 << 20, source: { path, fileOffset: 8, length: fileSize - 8, fileSize, sha256: sha } });
  const manifest = {
    files: [{ path: 'criu/core-1.img', size: 4, sha256: 'a'.repeat(64), mode: 0o600 }],
    weights: {
      schema: 'thaw.dev/weights-regions/v1',
      bytes: 0,
      regions: [{ name: 'w', allocations: [src('/models/a.safetensors', 'd'.repeat(64), 100), { kind: 'raw', offset: 0, size: 1 }, src('/models/copy-of-a.safetensors', 'd'.repeat(64), 100), src('/models/b.safetensors', 'e'.repeat(64), 50)] }],
    },
  } as unknown as Manifest;
  const chunks = planChunks(manifest.files);
  const config = { digest: `sha256:${'c'.repeat(64)}`, size: 12 };
  const weights = weightsSourcesOf(manifest);

  it('one layer per distinct source content, named by its sha256; the file layers map as before', () => {
    expect(weights).toEqual([
      { sha256: 'd'.repeat(64), size: 100, path: '/models/a.safetensors' },
      { sha256: 'e'.repeat(64), size: 50, path: '/models/b.safetensors' },
    ]);
    const image = parseImageManifest(JSON.stringify(buildImageManifest(config, chunks, {}, weights)));
    expect(image.layers.filter((l) => l.mediaType === WEIGHTS_LAYER_MEDIA_TYPE).map((l) => [l.digest, l.size, l.annotations?.['dev.thaw.weights.path']])).toEqual([
      [`sha256:${'d'.repeat(64)}`, 100, '/models/a.safetensors'],
      [`sha256:${'e'.repeat(64)}`, 50, '/models/b.safetensors'],
    ]);
    expect(chunksOf(image, manifest)).toEqual(chunks);
    expect(weightsLayersOf(image, manifest)).toEqual(weights);
    // Without the option: no weights layer at all.
    expect(weightsLayersOf(parseImageManifest(JSON.stringify(buildImageManifest(config, chunks))), manifest)).toEqual([]);
  });

  it.each<[string, Edit, RegExp]>([
    ['content the checkpoint does not name', (m) => {
      m.layers[1]!.digest = `sha256:${'f'.repeat(64)}`;
      m.layers[1]!.annotations!['dev.thaw.weights.sha256'] = 'f'.repeat(64);
    }, /is no source of the checkpoint's weights/],
    ['an annotation that is not its digest', (m) => void (m.layers[1]!.annotations!['dev.thaw.weights.sha256'] = 'e'.repeat(64)), /must be its digest's hex/],
    ['another size than the source', (m) => void (m.layers[1]!.size = 99), /is 99 bytes; the checkpoint's source is 100/],
    ['the same content twice', (m) => void m.layers.push({ ...m.layers[1]! }), /appears twice/],
  ])('refuses a weights layer with %s', (_what, edit, reason) => {
    const m = buildImageManifest(config, chunks, {}, weights);
    edit(m);
    const image = parseImageManifest(JSON.stringify(m));
    expect(() => weightsLayersOf(image, manifest)).toThrow(reason);
  });
});
