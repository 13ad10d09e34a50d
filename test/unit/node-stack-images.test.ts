import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { isThawError } from '../../src/errors.js';
import {
  assertFullyQualifiedRef, buildOciLayoutDocs, DEFAULT_IMAGE_ENV, OCI_MEDIA_TYPES, OCI_REF_NAME_ANNOTATION, sha256Digest,
} from '../../src/node-stack/images.js';

const layer = { digest: `sha256:${'a'.repeat(64)}`, size: 1234 };
const hex = (b: Buffer) => `sha256:${createHash('sha256').update(b).digest('hex')}`;

describe('OCI layout documents', () => {
  it('link config → manifest → index by sha256 digest and size', () => {
    const docs = buildOciLayoutDocs(layer, 'docker.io/thaw/busybox:1', { cmd: ['/bin/sh'] });
    expect(docs.configDescriptor).toEqual({ mediaType: OCI_MEDIA_TYPES.config, digest: hex(docs.config), size: docs.config.length });
    expect(docs.manifestDescriptor.digest).toBe(hex(docs.manifest));
    expect(docs.manifestDescriptor.size).toBe(docs.manifest.length);
    const manifest = JSON.parse(docs.manifest.toString());
    expect(manifest.config).toEqual(docs.configDescriptor);
    expect(manifest.layers).toEqual([{ mediaType: OCI_MEDIA_TYPES.layer, digest: layer.digest, size: layer.size }]);
    const index = JSON.parse(docs.index.toString());
    expect(index.manifests[0].digest).toBe(docs.manifestDescriptor.digest);
    expect(index.manifests[0].annotations[OCI_REF_NAME_ANNOTATION]).toBe('docker.io/thaw/busybox:1');
  });

  it('puts the uncompressed layer digest in diff_ids and the process settings in config', () => {
    const docs = buildOciLayoutDocs(layer, 'docker.io/thaw/x:1', {
      entrypoint: ['/bin/sh', '-c'], cmd: ['echo hi'], env: ['A=1'], workingDir: '/w',
    });
    const cfg = JSON.parse(docs.config.toString());
    expect(cfg.rootfs).toEqual({ type: 'layers', diff_ids: [layer.digest] });
    expect(cfg.config).toEqual({ Entrypoint: ['/bin/sh', '-c'], Cmd: ['echo hi'], Env: ['A=1'], WorkingDir: '/w' });
    expect(cfg.os).toBe('linux');
    expect(cfg.architecture).toBe('amd64');
  });

  it('is deterministic (the manifest digest keys the layout cache) and sensitive to every input', () => {
    const a = buildOciLayoutDocs(layer, 'docker.io/thaw/x:1', { cmd: ['a'] });
    const b = buildOciLayoutDocs(layer, 'docker.io/thaw/x:1', { cmd: ['a'] });
    expect(a.manifestDescriptor.digest).toBe(b.manifestDescriptor.digest);
    expect(buildOciLayoutDocs(layer, 'docker.io/thaw/x:1', { cmd: ['b'] }).manifestDescriptor.digest).not.toBe(a.manifestDescriptor.digest);
    expect(buildOciLayoutDocs({ ...layer, size: 1 }, 'docker.io/thaw/x:1', { cmd: ['a'] }).manifestDescriptor.digest)
      .not.toBe(a.manifestDescriptor.digest);
    expect(JSON.parse(a.config.toString()).config.Env).toEqual(DEFAULT_IMAGE_ENV);
  });

  it('sha256Digest matches a known vector', () => {
    expect(sha256Digest('')).toBe('sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855');
  });

  it('accepts only fully qualified refs', () => {
    for (const ok of ['docker.io/thaw/busybox:1', 'localhost:5000/a/b:latest', `docker.io/x/y@sha256:${'0'.repeat(64)}`]) {
      expect(() => assertFullyQualifiedRef(ok)).not.toThrow();
    }
    for (const bad of ['busybox', 'busybox:1', 'thaw/busybox:1', 'docker.io/thaw/busybox']) {
      let caught: unknown;
      try { assertFullyQualifiedRef(bad); } catch (e) { caught = e; }
      expect(isThawError(caught, 'STACK_INVALID_OPTION'), bad).toBe(true);
    }
  });
});
