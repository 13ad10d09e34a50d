import { describe, expect, it } from 'vitest';
import { AdjustmentBuilder } from '../../src/nri-plugin/adjustment.js';
import { parseVersion, supportsArgs, validEventsFor } from '../../src/nri-plugin/runtime-version.js';
import { decodeMessage, encodeMessage, nriType } from '../../src/nri-plugin/ttrpc-codec.js';

describe('runtime versions', () => {
  const cases: Array<[string, string, string | undefined, boolean, number]> = [
    ['containerd', 'v1.7.24', undefined, false, 0x7ff],
    ['containerd', '1.7.24~ds1', undefined, false, 0x7ff],
    ['containerd', 'v2.1.9', undefined, false, 0x7ff],
    ['v2', 'v2.0.2', undefined, false, 0x7ff],
    ['containerd', 'v2.2.0', undefined, true, 0x3fff],
    ['containerd', 'v2.3.1', 'v0.12.0', true, 0x3fff],
    ['cri-o', '1.33.0', undefined, false, 0x7ff],
    ['cri-o', '1.34.0', 'v0.10.0', true, 0x3fff],
  ];
  for (const [name, version, nri, args, events] of cases) {
    it(`${name} ${version}${nri ? ` (NRI ${nri})` : ''}: args ${args ? 'honoured' : 'dropped'}, valid events 0x${events.toString(16)}`, () => {
      expect(supportsArgs(name, version, nri)).toBe(args);
      expect(validEventsFor({ name, version, ...(nri ? { nriVersion: nri } : {}) })).toBe(events);
    });
  }
  it('parses versions loosely', () => {
    expect(parseVersion('v1.7.24')).toEqual([1, 7, 24]);
    expect(parseVersion('2.2')).toEqual([2, 2, 0]);
    expect(parseVersion('garbage')).toBeUndefined();
  });
});

describe('AdjustmentBuilder', () => {
  it('builds the adjustment thaw injects, with removal markers, and it survives the wire', () => {
    const { adjustment, argsApplied, notes } = new AdjustmentBuilder()
      .addEnv('SNAPSHOT_CONTROL_DIR', '/snapshot-control')
      .removeEnv('NCCL_DEBUG')
      .addMount({ destination: '/snapshot-control', source: '/run/thaw/control/abc' })
      .removeMount('/old')
      .addAnnotation('thaw.dev/restore', 'ckpt-1')
      .removeAnnotation('thaw.dev/stale')
      .addHook('createRuntime', { path: '/opt/thaw/bin/thaw', args: ['thaw', 'hook', 'create-runtime'], timeoutSeconds: 30 })
      .addHook('poststop', { path: '/opt/thaw/bin/thaw', env: ['THAW_LOG_LEVEL=debug'] })
      .addDevice({ path: '/dev/nvidia0', type: 'c', major: 195, minor: 0, fileMode: 0o666 })
      .build({ name: 'containerd', version: 'v1.7.24' });
    expect(argsApplied).toBe(false);
    expect(notes).toEqual([]);
    expect(adjustment).toEqual({
      annotations: { 'thaw.dev/restore': 'ckpt-1', '-thaw.dev/stale': '' },
      mounts: [
        { destination: '/snapshot-control', type: 'bind', source: '/run/thaw/control/abc', options: ['rbind', 'ro'] },
        { destination: '-/old' },
      ],
      env: [
        { key: 'SNAPSHOT_CONTROL_DIR', value: '/snapshot-control' },
        { key: '-NCCL_DEBUG', value: '' },
      ],
      hooks: {
        createRuntime: [{ path: '/opt/thaw/bin/thaw', args: ['thaw', 'hook', 'create-runtime'], env: [], timeout: { value: 30 } }],
        poststop: [{ path: '/opt/thaw/bin/thaw', args: ['/opt/thaw/bin/thaw'], env: ['THAW_LOG_LEVEL=debug'] }],
      },
      linux: { devices: [{ path: '/dev/nvidia0', type: 'c', major: 195, minor: 0, fileMode: { value: 0o666 } }] },
    });
    const back = decodeMessage<Record<string, unknown>>(nriType('ContainerAdjustment'), encodeMessage(nriType('ContainerAdjustment'), adjustment));
    expect(back['hooks']).toMatchObject({ ...adjustment.hooks, prestart: [], createContainer: [], startContainer: [], poststart: [] });
    expect(back['env']).toEqual(adjustment.env);
  });

  it('setArgs: left out with a note on containerd 1.7/2.1, included on 2.2', () => {
    const b = new AdjustmentBuilder().setArgs(['/opt/thaw/bin/thaw-pause', '--', '/usr/bin/python3']);
    const old = b.build({ name: 'containerd', version: 'v2.1.9' });
    expect(old.argsApplied).toBe(false);
    expect(old.adjustment.args).toBeUndefined();
    expect(old.notes[0]).toMatch(/^args not applied: containerd v2\.1\.9/);
    const fresh = b.build({ name: 'containerd', version: 'v2.2.0' });
    expect(fresh.argsApplied).toBe(true);
    expect(fresh.adjustment.args).toEqual(['/opt/thaw/bin/thaw-pause', '--', '/usr/bin/python3']);
    expect(b.build().notes).toEqual(['args not applied: no runtime given to build()']);
  });

  const invalid: Array<[string, (b: AdjustmentBuilder) => unknown, RegExp]> = [
    ['a relative mount destination', (b) => b.addMount({ destination: 'snap', source: '/x' }), /mount destination must be an absolute path/],
    ['a relative bind source', (b) => b.addMount({ destination: '/snap', source: 'x' }), /bind mount source must be an absolute path/],
    ['an env key with "="', (b) => b.addEnv('A=B', 'x'), /env key "A=B" must match/],
    ['an env key starting with a digit', (b) => b.addEnv('1A', 'x'), /env key "1A"/],
    ['an env value with NUL', (b) => b.addEnv('A', 'x\0y'), /without NUL/],
    ['a relative hook path', (b) => b.addHook('poststop', { path: 'thaw' }), /hook path must be an absolute path/],
    ['an unknown hook stage', (b) => b.addHook('later' as 'poststop', { path: '/x' }), /unknown hook stage/],
    ['a zero hook timeout', (b) => b.addHook('poststop', { path: '/x', timeoutSeconds: 0 }), /positive integer/],
    ['a hook env entry without "="', (b) => b.addHook('poststop', { path: '/x', env: ['NOPE'] }), /KEY=VALUE/],
    ['a device mode with type bits', (b) => b.addDevice({ path: '/dev/x', type: 'c', major: 1, minor: 1, fileMode: 0o20666 }), /permission bits only/],
    ['empty args', (b) => b.setArgs([]), /args must not be empty/],
    ['relative args[0]', (b) => b.setArgs(['python3']), /args\[0\] must be an absolute path/],
    ['an annotation key starting with "-"', (b) => b.addAnnotation('-x', 'y'), /not start with "-"/],
  ];
  for (const [what, fn, message] of invalid) {
    it(`rejects ${what} with NRI_INVALID_ADJUSTMENT`, () => {
      expect(() => fn(new AdjustmentBuilder())).toThrow(expect.objectContaining({ code: 'NRI_INVALID_ADJUSTMENT', message: expect.stringMatching(message) }));
    });
  }
});
