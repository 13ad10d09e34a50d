import { describe, expect, it } from 'vitest';
import { isThawError } from '../../src/errors.js';
import {
  decodeMessage,
  decodeRequest,
  decodeResponse,
  encodeMessage,
  encodeRequest,
  encodeResponse,
  nriType,
} from '../../src/nri-plugin/ttrpc-codec.js';
import type { ConfigureRequest, ContainerAdjustment } from '../../src/nri-plugin/nri-types.js';
import { findProtoDir } from '../../src/nri-plugin/proto-schema.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const ascii = (s: string): string => Buffer.from(s, 'ascii').toString('hex');

describe('ttrpc codec', () => {
  it('encodes the §10 RegisterPlugin request byte for byte (69 bytes)', () => {
    const payload = encodeMessage(nriType('RegisterPluginRequest'), { pluginName: 'ts-plugin', pluginIdx: '10' });
    expect(payload).toEqual(hex(`0a09${ascii('ts-plugin')}1202${ascii('10')}`));
    const req = encodeRequest({
      service: 'nri.pkg.api.v1alpha1.Runtime',
      method: 'RegisterPlugin',
      payload,
      timeoutNano: 2_000_000_000,
    });
    expect(req).toEqual(
      hex(
        `0a1c${ascii('nri.pkg.api.v1alpha1.Runtime')}120e${ascii('RegisterPlugin')}1a0f0a09${ascii('ts-plugin')}1202${ascii('10')}2080a8d6b907`,
      ),
    );
    expect(req.length).toBe(69);
    const back = decodeRequest(req);
    expect(back).toMatchObject({ service: 'nri.pkg.api.v1alpha1.Runtime', method: 'RegisterPlugin', timeoutNano: 2e9 });
    expect(typeof back.timeoutNano).toBe('number');
  });

  it('ConfigureResponse events is field 2: 0x629 → 12 03 10 a9 0c inside Response.payload', () => {
    const body = encodeMessage(nriType('ConfigureResponse'), { events: 0x629 });
    expect(body).toEqual(hex('10 a9 0c'));
    expect(encodeResponse({ payload: body })).toEqual(hex('12 03 10 a9 0c'));
  });

  it('a success Response with an empty payload is zero bytes (no status field)', () => {
    expect(encodeResponse({ payload: Buffer.alloc(0) }).length).toBe(0);
    expect(decodeResponse(Buffer.alloc(0))).toEqual({ payload: Buffer.alloc(0) });
  });

  it('encodes the §10 error status (code 2 "boom") and the Unimplemented body', () => {
    expect(encodeResponse({ status: { code: 2, message: 'boom' } })).toEqual(hex('0a 08 08 02 12 04 62 6f 6f 6d'));
    expect(encodeResponse({ status: { code: 12, message: 'method UpdatePodSandbox' } })).toEqual(
      hex(`0a1b080c1217${ascii('method UpdatePodSandbox')}`),
    );
    expect(decodeResponse(hex('0a 08 08 02 12 04 62 6f 6f 6d'))).toMatchObject({ status: { code: 2, message: 'boom' } });
  });

  it('ContainerAdjustment starts at field 2 (annotations), env is field 4, args is field 9', () => {
    const adj: ContainerAdjustment = { annotations: { a: 'b' }, env: [{ key: 'K', value: 'V' }], args: ['/x'] };
    const bytes = encodeMessage(nriType('ContainerAdjustment'), adj);
    // 0x12 = field 2, wire type 2; map entry {1:"a", 2:"b"}
    expect(bytes.subarray(0, 8)).toEqual(hex('12 06 0a 01 61 12 01 62'));
    expect(bytes.subarray(8, 16)).toEqual(hex('22 06 0a 01 4b 12 01 56'));
    expect(bytes.subarray(16)).toEqual(hex('4a 02 2f 78'));
    expect(decodeMessage<ContainerAdjustment>(nriType('ContainerAdjustment'), bytes)).toEqual({
      annotations: { a: 'b' },
      env: [{ key: 'K', value: 'V' }],
      args: ['/x'],
      mounts: [],
      rlimits: [],
      CDIDevices: [],
    });
  });

  it('decodes ConfigureRequest v0.7 timeouts (int64 ms) as numbers', () => {
    const bytes = encodeMessage(nriType('ConfigureRequest'), {
      runtimeName: 'containerd',
      runtimeVersion: 'v1.7.24',
      registrationTimeout: 5000,
      requestTimeout: 2000,
    });
    const back = decodeMessage<ConfigureRequest>(nriType('ConfigureRequest'), bytes);
    expect(back).toEqual({ runtimeName: 'containerd', runtimeVersion: 'v1.7.24', registrationTimeout: 5000, requestTimeout: 2000 });
  });

  it('a truncated protobuf is a typed TTRPC_DECODE_FAILED error, not a crash', () => {
    const req = encodeRequest({ service: 'nri.pkg.api.v1alpha1.Plugin', method: 'Configure', payload: Buffer.alloc(20, 1) });
    for (let cut = 1; cut < req.length; cut++) {
      try {
        decodeRequest(req.subarray(0, cut));
      } catch (err) {
        expect(isThawError(err, 'TTRPC_DECODE_FAILED')).toBe(true);
        expect((err as { evidence: { bytes: string } }).evidence.bytes.length).toBeGreaterThan(0);
      }
    }
    expect(() => decodeRequest(hex('0a 7f 61'))).toThrow(expect.objectContaining({ code: 'TTRPC_DECODE_FAILED' }));
  });

  it('a wrongly typed field is TTRPC_ENCODE_FAILED', () => {
    expect(() => encodeMessage(nriType('ContainerAdjustment'), { mounts: 'nope' })).toThrow(
      expect.objectContaining({ code: 'TTRPC_ENCODE_FAILED' }),
    );
  });

  it('finds the proto directory by walking up from the module', () => {
    expect(findProtoDir()).toMatch(/\/proto$/);
  });
});
