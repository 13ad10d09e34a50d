import { describe, expect, it } from 'vitest';
import { isThawError } from '../../src/errors.js';
import { assertSocketPath, UNIX_SOCKET_PATH_MAX_BYTES } from '../../src/node-stack/containerd.js';
import { StackErrorCode } from '../../src/node-stack/errors.js';
import { parseFlavor, stackPaths } from '../../src/node-stack/paths.js';
import { flavorsUnderTest } from '../helpers/stack.js';

function codeOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (e) {
    return isThawError(e) ? e.code : 'not a ThawError';
  }
  return undefined;
}

describe('socket path limit', () => {
  it('accepts 107 bytes and refuses 108 (sun_path holds 108 with the NUL)', () => {
    expect(UNIX_SOCKET_PATH_MAX_BYTES).toBe(107);
    expect(codeOf(() => assertSocketPath(`/${'a'.repeat(106)}`))).toBeUndefined();
    expect(codeOf(() => assertSocketPath(`/${'a'.repeat(107)}`))).toBe('STACK_INVALID_OPTION');
  });

  it('counts bytes, not characters', () => {
    expect(codeOf(() => assertSocketPath(`/${'é'.repeat(54)}`))).toBe('STACK_INVALID_OPTION');
  });

  it('a stack dir like /tmp/thaw-XXXXXX leaves room for every socket', () => {
    for (const name of ['c.sock', 'c.sock.ttrpc', 'nri.sock']) {
      expect(codeOf(() => assertSocketPath(`/tmp/thaw-AbC123/${name}`))).toBeUndefined();
    }
  });
});

describe('stackPaths', () => {
  it('puts everything of a flavor under its fixed prefix', () => {
    const p = stackPaths('1.7');
    expect(p.prefix).toBe('/opt/thaw/stack/1.7');
    expect(p.binDir).toBe('/opt/thaw/stack/1.7/bin');
    expect(p.criu).toBe('/opt/thaw/stack/1.7/bin/criu');
    expect(p.interpreter).toBe('/opt/thaw/stack/1.7/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2');
    expect(p.criProto.endsWith('k8s.io/cri-api/pkg/apis/runtime/v1/api.proto')).toBe(true);
    expect(p.imageCacheDir).toBe('/opt/thaw/stack/images');
    expect(p.patchelf).toBe('/opt/thaw/stack/tools/usr/bin/patchelf');
    expect(stackPaths('2.1', '/x/y/').containerd).toBe('/x/y/2.1/bin/containerd');
  });
});

describe('flavors', () => {
  it('parses known flavors and refuses others with a coded error', () => {
    expect(parseFlavor('2.1')).toBe('2.1');
    expect(parseFlavor(undefined)).toBe('1.7');
    expect(parseFlavor('')).toBe('1.7');
    expect(codeOf(() => parseFlavor('1.6'))).toBe(StackErrorCode.INVALID_OPTION);
  });

  it('reads the THAW_CONTAINERD list', () => {
    expect(flavorsUnderTest('')).toEqual(['1.7']);
    expect(flavorsUnderTest('2.1')).toEqual(['2.1']);
    expect(flavorsUnderTest('1.7, 2.1,1.7')).toEqual(['1.7', '2.1']);
  });
});

describe('error codes', () => {
  it('are stable, unique and STACK_-prefixed', () => {
    const codes = Object.values(StackErrorCode);
    expect(new Set(codes).size).toBe(codes.length);
    for (const c of codes) expect(c).toMatch(/^STACK_[A-Z_]+$/);
    expect(StackErrorCode.PROVISION_FAILED).toBe('STACK_PROVISION_FAILED');
  });
});
