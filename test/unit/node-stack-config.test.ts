import { describe, expect, it } from 'vitest';
import { goDuration, podSubnetFor, renderCniConflist, renderContainerdConfig, type ContainerdConfigInput } from '../../src/node-stack/config.js';

const input = (flavor: '1.7' | '2.1'): ContainerdConfigInput => ({
  flavor,
  root: '/tmp/thaw-abc/root',
  state: '/tmp/thaw-abc/state',
  grpcAddress: '/tmp/thaw-abc/c.sock',
  ttrpcAddress: '/tmp/thaw-abc/c.sock.ttrpc',
  optDir: '/tmp/thaw-abc/opt',
  runcRoot: '/tmp/thaw-abc/runc',
  runcBinary: `/opt/thaw/stack/${flavor}/bin/runc`,
  nriSocketPath: '/tmp/thaw-abc/nri.sock',
  nriPluginDir: '/tmp/thaw-abc/nri/plugins',
  nriPluginConfigDir: '/tmp/thaw-abc/nri/conf.d',
  nriRequestTimeoutMs: 2000,
  nriRegistrationTimeoutMs: 5000,
  sandboxImage: 'docker.io/thaw/pause:1',
  cniBinDir: `/opt/thaw/stack/${flavor}/usr/lib/cni`,
  cniConfDir: '/tmp/thaw-abc/cni/conf.d',
});

/** The key = value lines under a [table] header, as a map. */
function table(toml: string, header: string): Map<string, string> {
  const lines = toml.split('\n');
  const start = lines.indexOf(header);
  expect(start, `missing ${header}`).toBeGreaterThanOrEqual(0);
  const out = new Map<string, string>();
  for (const line of lines.slice(start + 1)) {
    if (line.startsWith('[')) break;
    const m = /^\s*([\w.]+) = (.*)$/.exec(line);
    if (m?.[1] && m[2] !== undefined) out.set(m[1], m[2]);
  }
  return out;
}

describe('renderContainerdConfig', () => {
  it('1.7: version 2, NRI enabled with our socket, dirs and timeouts', () => {
    const toml = renderContainerdConfig(input('1.7'));
    expect(toml.split('\n')[0]).toBe('version = 2');
    const nri = table(toml, '[plugins."io.containerd.nri.v1.nri"]');
    expect(nri.get('disable')).toBe('false');
    expect(nri.get('socket_path')).toBe('"/tmp/thaw-abc/nri.sock"');
    expect(nri.get('plugin_path')).toBe('"/tmp/thaw-abc/nri/plugins"');
    expect(nri.get('plugin_config_path')).toBe('"/tmp/thaw-abc/nri/conf.d"');
    expect(nri.get('plugin_request_timeout')).toBe('"2000ms"');
    expect(nri.get('plugin_registration_timeout')).toBe('"5000ms"');
    const cri = table(toml, '[plugins."io.containerd.grpc.v1.cri"]');
    expect(cri.get('restrict_oom_score_adj')).toBe('true');
    expect(cri.get('sandbox_image')).toBe('"docker.io/thaw/pause:1"');
    expect(table(toml, '[plugins."io.containerd.grpc.v1.cri".containerd]').get('snapshotter')).toBe('"overlayfs"');
    const runc = table(toml, '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]');
    expect(runc.get('BinaryName')).toBe('"/opt/thaw/stack/1.7/bin/runc"');
    expect(runc.get('Root')).toBe('"/tmp/thaw-abc/runc"');
    expect(table(toml, '[grpc]').get('address')).toBe('"/tmp/thaw-abc/c.sock"');
    expect(table(toml, '[ttrpc]').get('address')).toBe('"/tmp/thaw-abc/c.sock.ttrpc"');
    expect(toml).not.toContain('io.containerd.cri.v1');
  });

  it('2.1: version 3 with the split CRI plugins and pinned sandbox image', () => {
    const toml = renderContainerdConfig(input('2.1'));
    expect(toml.split('\n')[0]).toBe('version = 3');
    expect(table(toml, "[plugins.'io.containerd.nri.v1.nri']").get('disable')).toBe('false');
    expect(table(toml, "[plugins.'io.containerd.cri.v1.images'.pinned_images]").get('sandbox')).toBe('"docker.io/thaw/pause:1"');
    expect(table(toml, "[plugins.'io.containerd.cri.v1.images']").get('snapshotter')).toBe('"overlayfs"');
    expect(table(toml, "[plugins.'io.containerd.cri.v1.runtime']").get('restrict_oom_score_adj')).toBe('true');
    const runc = table(toml, "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]");
    expect(runc.get('BinaryName')).toBe('"/opt/thaw/stack/2.1/bin/runc"');
    expect(table(toml, "[plugins.'io.containerd.cri.v1.runtime'.cni]").get('bin_dirs')).toBe('["/opt/thaw/stack/2.1/usr/lib/cni"]');
    expect(toml).not.toContain('sandbox_image');
  });

  it('escapes paths as TOML basic strings', () => {
    const toml = renderContainerdConfig({ ...input('1.7'), root: '/tmp/a "b"\\c' });
    expect(toml).toContain('root = "/tmp/a \\"b\\"\\\\c"');
  });

  it('renders durations in ms and refuses negative ones', () => {
    expect(goDuration(1500)).toBe('1500ms');
    expect(goDuration(0)).toBe('0ms');
    expect(() => goDuration(-1)).toThrow(RangeError);
  });
});

describe('pod network (CNI)', () => {
  it('is a bridge without a host address, masquerading or default route', () => {
    const conf = JSON.parse(renderCniConflist({ name: 'thaw-x', bridge: 'th-AbC123', subnet: '10.210.3.0/24', ipamDataDir: '/tmp/thaw-x/cni/ipam' }));
    expect(conf.plugins).toHaveLength(1);
    expect(conf.plugins[0]).toMatchObject({
      type: 'bridge', bridge: 'th-AbC123', isGateway: false, isDefaultGateway: false, ipMasq: false,
      ipam: { type: 'host-local', ranges: [[{ subnet: '10.210.3.0/24' }]], dataDir: '/tmp/thaw-x/cni/ipam' },
    });
    expect(() => renderCniConflist({ name: 'n', bridge: 'x'.repeat(16), subnet: '10.0.0.0/24', ipamDataDir: '/d' })).toThrow(RangeError);
  });

  it('picks a stable private /24 per stack dir', () => {
    expect(podSubnetFor('thaw-AbC123')).toBe(podSubnetFor('thaw-AbC123'));
    expect(podSubnetFor('thaw-AbC123')).toMatch(/^10\.(2[0-4]\d)\.\d{1,3}\.0\/24$/);
    const many = new Set(Array.from({ length: 50 }, (_, i) => podSubnetFor(`thaw-${i}`)));
    expect(many.size).toBeGreaterThan(40);
  });
});
