import { describe, expect, it } from 'vitest';
import { ConfigError, CONFIG_KEYS, defaultAgentConfig, envNameOf, flagNameOf, resolveAgentConfig } from '../../src/agent/config.js';

const PKG = '/opt/thaw/lib';
const file = (text: string) => ({ path: '/etc/thaw/agent.yaml', text });

function configError(fn: () => unknown): ConfigError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return err as ConfigError;
  }
  throw new Error('expected a ConfigError');
}

describe('agent configuration', () => {
  it('defaults serve a stock node (the contract values)', () => {
    const c = resolveAgentConfig({ packageRoot: PKG });
    expect(c).toEqual(defaultAgentConfig(PKG));
    expect(c.api.socket).toBe('/run/thaw/agent.sock');
    expect(c.metrics.listen).toBe('127.0.0.1:9464');
    expect(c.paths.thawPause).toBe('/opt/thaw/lib/native/build/thaw-pause');
    expect(c.nri).toEqual({ socket: '/var/run/nri/nri.sock', pluginName: 'thaw', pluginIndex: '50' });
    expect(c.cuda.lockTimeoutMs).toBe(10000);
    expect(c.checkpoint.compressPages).toBe('zstd');
  });

  it('names env vars and flags after the dotted key', () => {
    expect(envNameOf('metrics.listen')).toBe('THAW_METRICS_LISTEN');
    expect(envNameOf('cuda.lockTimeoutMs')).toBe('THAW_CUDA_LOCK_TIMEOUT_MS');
    expect(envNameOf('annotationPrefix')).toBe('THAW_ANNOTATION_PREFIX');
    expect(flagNameOf('paths.storeRoot')).toBe('paths-store-root');
    expect(flagNameOf('nri.pluginIndex')).toBe('nri-plugin-index');
  });

  it('takes flag > environment > file > default', () => {
    const text = 'metrics:\n  listen: 127.0.0.1:1000\npaths:\n  storeRoot: /file/store\nlog:\n  level: warn\n';
    const c = resolveAgentConfig({
      file: file(text),
      env: { THAW_METRICS_LISTEN: '127.0.0.1:2000', THAW_LOG_LEVEL: 'debug', THAW_CONTAINERD: '1.7,2.1' },
      flags: { 'metrics-listen': '127.0.0.1:3000' },
      packageRoot: PKG,
    });
    expect(c.metrics.listen).toBe('127.0.0.1:3000');
    expect(c.log.level).toBe('debug');
    expect(c.paths.storeRoot).toBe('/file/store');
    expect(c.paths.workRoot).toBe('/run/thaw/restore');
  });

  it('reads every key of a full file, and an empty (comments only) file', () => {
    const text = `annotationPrefix: example.com/
nri:
  socket: /run/nri.sock
  pluginName: thaw2
  pluginIndex: "07"
containerd:
  socket: /run/k3s/containerd/containerd.sock
  root: /var/lib/rancher/k3s/agent/containerd
api:
  socket: /run/t/a.sock
metrics:
  listen: ""
paths:
  controlRoot: /a
  storeRoot: /b
  workRoot: /c
  toolkitDir: /d
  thawPause: /e/thaw-pause
cuda:
  libcuda: /usr/lib/libcuda.so.1
  libnvml: ""
  lockTimeoutMs: 500
weights:
  readers: 2
  order: together
restore:
  pauseDeadlineMs: 15000
  hook: node
  memoryFill: criu
  fillThreads: 3
checkpoint:
  compressPages: zstd
log:
  level: error
  file: /var/log/thaw.log
`;
    const c = resolveAgentConfig({ file: file(text), packageRoot: PKG });
    expect(c.nri.pluginIndex).toBe('07');
    expect(c.containerd).toEqual({ socket: '/run/k3s/containerd/containerd.sock', root: '/var/lib/rancher/k3s/agent/containerd' });
    expect(c.metrics.listen).toBe('');
    expect(c.cuda.lockTimeoutMs).toBe(500);
    expect(c.restore.pauseDeadlineMs).toBe(15000);
    expect(c.restore.hook).toBe('node');
    expect(c.restore.memoryFill).toBe('criu');
    expect(c.restore.fillThreads).toBe(3);
    expect(c.checkpoint.compressPages).toBe('zstd');
    expect(c.weights.readers).toBe(2);
    expect(c.weights.order).toBe('together');
    expect(c.log.file).toBe('/var/log/thaw.log');
    expect(resolveAgentConfig({ file: file('# nothing set\n'), packageRoot: PKG })).toEqual(defaultAgentConfig(PKG));
    expect(CONFIG_KEYS).toHaveLength(33);
  });

  it.each([
    ['an unknown top-level key', 'metric:\n  listen: x\n', /^load agent configuration: unknown key metric \(file \/etc\/thaw\/agent.yaml\): expected one of annotationPrefix, nri, containerd, api, metrics, paths, registry, cuda, weights, restore, checkpoint, store, limits, log, tenancy$/],
    ['an unknown nested key', 'nri:\n  sockt: /x\n', /unknown key nri\.sockt .*expected one of nri\.socket, nri\.pluginName, nri\.pluginIndex/],
    ['a number where a string is expected', 'nri:\n  pluginIndex: 50\n', /nri\.pluginIndex \(file .*\): expected two digits, as a string \("00".."99"\), got 50 \(a number, not a string\)/],
    ['a string where an integer is expected', 'cuda:\n  lockTimeoutMs: soon\n', /cuda\.lockTimeoutMs \(file .*\): expected a positive integer \(milliseconds\), got "soon"/],
    ['a relative containerd root', 'containerd:\n  root: var/lib/containerd\n', /containerd\.root \(file .*\): expected an absolute path .*got "var\/lib\/containerd" \(not an absolute path\)/],
    ['a relative path', 'paths:\n  storeRoot: var/lib\n', /paths\.storeRoot \(file .*\): expected an absolute path, got "var\/lib" \(not an absolute path\)/],
    ['a bad listen address', 'metrics:\n  listen: "9464"\n', /metrics\.listen .*expected host:port/],
    ['a bad level', 'log:\n  level: loud\n', /log\.level .*expected one of debug, info, warn, error, got "loud"/],
    ['a section that is not a mapping', 'paths: /x\n', /paths \(file .*\): expected a mapping of keys, got "\/x"/],
    ['a bad annotation prefix', 'annotationPrefix: thaw.dev\n', /annotationPrefix .*expected a DNS subdomain followed by '\/'/],
    ['a zero timeout', 'cuda:\n  lockTimeoutMs: 0\n', /cuda\.lockTimeoutMs .*got 0 \(not a positive integer\)/],
    ['no weights readers', 'weights:\n  readers: 0\n', /weights\.readers .*got 0 \(not an integer 1\.\.64\)/],
    ['an unknown weights order', 'weights:\n  order: first\n', /weights\.order .*got "first" \(not checkpoint-first or together\)/],
    ['a registry grant without keys', 'tenancy:\n  namespaces:\n    team-a:\n      registries: [{prefix: r.example/team-a}]\n', /tenancy\.namespaces\.team-a\.registries\[0\]: names no keys.* \(file \/etc\/thaw\/agent\.yaml\)/],
  ])('refuses %s, naming the key and the expected form', (_what, text, message) => {
    const err = configError(() => resolveAgentConfig({ file: file(text), packageRoot: PKG }));
    expect(err.code).toBe('AGENT_CONFIG_INVALID');
    expect(err.message).toMatch(message);
  });

  it("reads the tenancy section whole, beside the other keys; without one, the default policy", () => {
    const text = 'log:\n  level: debug\ntenancy:\n  checkpointNamespaces: [team-a]\n  shared: [{from: platform/base, to: [team-a]}]\n';
    const c = resolveAgentConfig({ file: file(text), packageRoot: PKG });
    expect(c.log.level).toBe('debug');
    expect(c.tenancy.checkpointNamespaces).toEqual(new Set(['team-a']));
    expect(c.tenancy.shared).toEqual([{ from: { namespace: 'platform', name: 'base' }, to: new Set(['team-a']) }]);
    expect(resolveAgentConfig({ packageRoot: PKG }).tenancy).toEqual({ checkpointNamespaces: '*', shared: [], namespaces: new Map() });
  });

  it('refuses bad YAML with its position', () => {
    const err = configError(() => resolveAgentConfig({ file: file('nri: [\n'), packageRoot: PKG }));
    expect(err.message).toMatch(/^load agent configuration: \/etc\/thaw\/agent.yaml: not valid YAML/);
  });

  it('names the environment variable or flag a bad value came from', () => {
    expect(configError(() => resolveAgentConfig({ env: { THAW_CUDA_LOCK_TIMEOUT_MS: '10s' }, packageRoot: PKG })).message).toMatch(
      /cuda\.lockTimeoutMs \(environment THAW_CUDA_LOCK_TIMEOUT_MS\): expected a positive integer \(milliseconds\), got "10s"/,
    );
    expect(configError(() => resolveAgentConfig({ flags: { 'api-socket': `/${'x'.repeat(120)}` }, packageRoot: PKG })).message).toMatch(
      /api\.socket \(flag --api-socket\): .*longer than 107 bytes/,
    );
    // Flags carry integers as text.
    expect(resolveAgentConfig({ flags: { 'cuda-lock-timeout-ms': '2000' }, packageRoot: PKG }).cuda.lockTimeoutMs).toBe(2000);
  });
});
