/**
 * The containerd configs an operator is told to use (config/containerd.toml.example for both generations,
 * config/containerd-1.7.toml.example,
 * config/containerd-2.x.toml.example, and the drop-in `thaw install` writes, config/conf.d/thaw-nri.toml),
 * validated by starting the real containerd of the private stacks with them: only root, state, socket and
 * plugin paths are rewritten into a temporary dir (and the CRI stream server, CNI and opt dirs pointed there so
 * that nothing on the machine is touched). NRI is up when its socket exists and an NRI plugin registers and
 * synchronizes over it. A stock containerd 1.7 config (NRI disabled) is the control: no NRI socket.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { createCollectingLogger } from '../../src/log.js';
import { createNriPlugin } from '../../src/nri-plugin/plugin.js';
import { destroyStackDir, processStartTicks, STACK_DIR_PREFIX, STACK_MARKER_FILE } from '../../src/node-stack/cleanup.js';
import { stackPaths, type StackFlavor } from '../../src/node-stack/paths.js';
import { flavorsUnderTest, waitFor } from '../helpers/stack.js';

const REPO = path.resolve(import.meta.dirname, '../..');
const EXAMPLES: Record<StackFlavor, string> = { '1.7': 'config/containerd-1.7.toml.example', '2.1': 'config/containerd-2.x.toml.example' };
const DROP_IN = 'config/conf.d/thaw-nri.toml';
/** The design's config/containerd.toml.example: one version-2 file that both generations load. */
const GENERIC_EXAMPLE = 'config/containerd.toml.example';
const BOOT_TIMEOUT_MS = 60_000;

interface Running {
  dir: string;
  child: ChildProcess;
  nriSocket: string;
  log: string;
}

const running: Running[] = [];

/** The machine's paths in a config, mapped into `dir` (longest first: the gRPC socket is under the state dir). */
function rewritePaths(text: string, dir: string): string {
  const map: Array<[string, string]> = [
    ['/run/containerd/containerd.sock', path.join(dir, 'c.sock')],
    ['/var/lib/containerd', path.join(dir, 'root')],
    ['/run/containerd', path.join(dir, 'state')],
    ['/var/run/nri/nri.sock', path.join(dir, 'nri.sock')],
    ['/opt/nri/plugins', path.join(dir, 'nri-plugins')],
    ['/etc/nri/conf.d', path.join(dir, 'nri-conf.d')],
    ['/etc/containerd/conf.d', path.join(dir, 'conf.d')],
  ];
  let out = text;
  for (const [from, to] of map) out = out.split(from).join(to);
  return out;
}

/** Tables (not in the examples) that keep containerd's other plugins inside `dir`. */
function isolation(flavor: StackFlavor, dir: string): string {
  const q = flavor === '1.7' ? '"' : "'";
  const p = (id: string): string => `plugins.${q}${id}${q}`;
  const cniTable = flavor === '1.7' ? `${p('io.containerd.grpc.v1.cri')}.cni` : `${p('io.containerd.cri.v1.runtime')}.cni`;
  return [
    '',
    '[ttrpc]',
    `  address = ${JSON.stringify(path.join(dir, 'c.sock.ttrpc'))}`,
    `[${p('io.containerd.internal.v1.opt')}]`,
    `  path = ${JSON.stringify(path.join(dir, 'opt'))}`,
    `[${p('io.containerd.grpc.v1.cri')}]`,
    '  stream_server_address = "127.0.0.1"',
    '  stream_server_port = "0"',
    `[${cniTable}]`,
    `  conf_dir = ${JSON.stringify(path.join(dir, 'cni'))}`,
    '',
  ].join('\n');
}

/** Starts containerd of `flavor` on `config` (plus the drop-ins given) and waits until it has booted. */
async function startContainerd(flavor: StackFlavor, config: (dir: string) => string, dropIns: Record<string, string> = {}): Promise<Running> {
  const dir = mkdtempSync(path.join(os.tmpdir(), STACK_DIR_PREFIX));
  // The harness's marker: cleanupStaleStacks removes this dir and its containerd if this run dies.
  writeFileSync(path.join(dir, STACK_MARKER_FILE), JSON.stringify({ ownerPid: process.pid, ownerStartTicks: (await processStartTicks(process.pid)) ?? 0, flavor, createdAt: new Date().toISOString() }));
  for (const d of ['nri-plugins', 'nri-conf.d', 'conf.d', 'cni']) mkdirSync(path.join(dir, d));
  for (const [name, text] of Object.entries(dropIns)) writeFileSync(path.join(dir, 'conf.d', name), rewritePaths(text, dir));
  const configPath = path.join(dir, 'config.toml');
  writeFileSync(configPath, `${rewritePaths(config(dir), dir)}${isolation(flavor, dir)}`);
  const log = path.join(dir, 'containerd.log');
  const fd = openSync(log, 'a');
  const paths = stackPaths(flavor);
  const child = spawn(paths.containerd, ['--config', configPath], { stdio: ['ignore', fd, fd], env: { ...process.env, PATH: `${paths.binDir}:/usr/sbin:/usr/bin:/sbin:/bin` } });
  closeSync(fd);
  const r: Running = { dir, child, nriSocket: path.join(dir, 'nri.sock'), log };
  running.push(r);
  await waitFor(() => {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`containerd ${flavor} exited (${child.exitCode ?? child.signalCode}):\n${readFileSync(log, 'utf8').slice(-3000)}`);
    return readFileSync(log, 'utf8').includes('containerd successfully booted') ? true : undefined;
  }, `containerd ${flavor} to boot`, BOOT_TIMEOUT_MS, 100);
  return r;
}

async function stop(r: Running): Promise<void> {
  const exited = new Promise<void>((resolve) => (r.child.exitCode !== null || r.child.signalCode !== null ? resolve() : r.child.once('exit', () => resolve())));
  r.child.kill('SIGTERM');
  const timer = setTimeout(() => r.child.kill('SIGKILL'), 10_000);
  await exited;
  clearTimeout(timer);
  await destroyStackDir(r.dir);
}

afterEach(async () => {
  for (const r of running.splice(0)) await stop(r);
}, 60_000);

/** Registers an NRI plugin on the socket and waits for Synchronize; returns what the runtime said it is. */
async function registerPlugin(socketPath: string): Promise<string> {
  let runtime = '';
  const plugin = createNriPlugin({
    name: 'thaw-config-check',
    idx: '50',
    logger: createCollectingLogger(),
    socketPath,
    reconnect: false,
    onConfigure: (info) => {
      runtime = `${info.name} ${info.version}`;
    },
    handlers: { synchronize: () => undefined, createContainer: () => undefined },
  });
  try {
    await plugin.start();
    await plugin.waitForState('synchronized', { timeoutMs: 30_000 });
    return runtime;
  } finally {
    await plugin.close();
  }
}

const VERSION: Record<StackFlavor, RegExp> = { '1.7': /^containerd v?1\.7\.24/, '2.1': /^containerd v?2\.1\.9/ };

describe.each(flavorsUnderTest())('containerd %s with thaw\'s NRI config', (flavor) => {
  it(`${EXAMPLES[flavor]} enables NRI: the socket exists and a plugin registers`, async () => {
    const example = readFileSync(path.join(REPO, EXAMPLES[flavor]), 'utf8');
    expect(example).toMatch(flavor === '1.7' ? /^version = 2$/m : /^version = 3$/m);
    const r = await startContainerd(flavor, () => example);
    expect(existsSync(r.nriSocket)).toBe(true);
    expect(await registerPlugin(r.nriSocket)).toMatch(VERSION[flavor]);
  }, 120_000);

  it(`${GENERIC_EXAMPLE} (version 2, for both generations) enables NRI: the socket exists and a plugin registers`, async () => {
    const example = readFileSync(path.join(REPO, GENERIC_EXAMPLE), 'utf8');
    expect(example).toMatch(/^version = 2$/m);
    const r = await startContainerd(flavor, () => example);
    expect(existsSync(r.nriSocket)).toBe(true);
    expect(await registerPlugin(r.nriSocket)).toMatch(VERSION[flavor]);
  }, 120_000);

  it(`the drop-in ${DROP_IN}, imported by a config.toml without an NRI table, enables NRI`, async () => {
    const version = flavor === '1.7' ? 2 : 3;
    const main = (dir: string): string => [
      `version = ${version}`,
      `imports = [${JSON.stringify(path.join(dir, 'conf.d', '*.toml'))}]`,
      'root = "/var/lib/containerd"',
      'state = "/run/containerd"',
      '[grpc]',
      '  address = "/run/containerd/containerd.sock"',
    ].join('\n');
    const r = await startContainerd(flavor, main, { 'thaw-nri.toml': readFileSync(path.join(REPO, DROP_IN), 'utf8') });
    expect(existsSync(r.nriSocket)).toBe(true);
    expect(await registerPlugin(r.nriSocket)).toMatch(VERSION[flavor]);
  }, 120_000);
});

describe.runIf(flavorsUnderTest().includes('1.7'))('containerd 1.7 without thaw\'s config (the control)', () => {
  it('a stock version-2 config leaves NRI off: containerd boots and there is no NRI socket', async () => {
    const r = await startContainerd('1.7', () => ['version = 2', 'root = "/var/lib/containerd"', 'state = "/run/containerd"', '[grpc]', '  address = "/run/containerd/containerd.sock"'].join('\n'));
    expect(existsSync(path.join(r.dir, 'c.sock'))).toBe(true);
    expect(existsSync(r.nriSocket)).toBe(false);
  }, 120_000);
});
