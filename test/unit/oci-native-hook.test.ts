/**
 * The native createRuntime hook (native/thaw-hook.c), run as runc runs it: a fresh process, an empty
 * environment, the state on stdin. Its parsing of hostile state JSON (oversized, malformed, deep, ambiguous),
 * its wait for the agent bounded by --wait-ms, its answers, and the agent's end (src/agent/hook-server.ts)
 * doing the real work through the real binary.
 */
import { spawn, execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, readdir, rm, symlink, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startHookServer, type HookServer } from '../../src/agent/hook-server.js';
import { HOOK_DONE_FILE, HOOK_FAILED_FILE } from '../../src/oci-hooks/records.js';
import { parseOciState } from '../../src/oci-hooks/state.js';
import { DELETED_FILES_FILE_NAME, ROOTFS_DIFF_FILE_NAME } from '../../src/store/manifest.js';
import { ustar } from '../helpers/rootfs-tree.js';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const HOOK = join(ROOT, 'native/build/thaw-hook');

interface Run {
  code: number | null;
  stderr: string;
  failed?: { code: string; reason: string };
}

let work: string;
let n = 0;

/** Runs the hook with `stdin` (a string, a Buffer, or 'never' for a stdin that is never closed). */
async function runHook(stdin: string | Buffer | 'never', o: { socket?: string; budgetMs?: number; waitMs?: number; controlDir?: string; args?: string[] } = {}): Promise<Run> {
  const controlDir = o.controlDir ?? join(work, `ctl-${n++}`);
  await mkdir(controlDir, { recursive: true });
  const args = o.args ?? ['--socket', o.socket ?? join(work, 'no-agent.sock'), '--control-dir', controlDir, '--budget-ms', String(o.budgetMs ?? 200), '--wait-ms', String(o.waitMs ?? 400)];
  const r = await new Promise<{ code: number | null; stderr: string }>((resolve, reject) => {
    const child = spawn(HOOK, args, { env: {}, stdio: ['pipe', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stderr }));
    child.stdin.on('error', () => undefined); // the hook may stop reading (oversized) before we stop writing
    if (stdin === 'never') child.stdin.write('{"ociVersion":');
    else child.stdin.end(stdin);
  });
  const text = await readFile(join(controlDir, HOOK_FAILED_FILE), 'utf8').catch(() => undefined);
  return { ...r, ...(text !== undefined ? { failed: JSON.parse(text) as { code: string; reason: string } } : {}) };
}

const state = (extra: Record<string, unknown> = {}): string =>
  JSON.stringify({ ociVersion: '1.0.2', id: 'c1', status: 'creating', pid: 4242, bundle: '/run/b/c1', annotations: { a: 'b' }, ...extra });

/** A stand-in agent: records each request line and answers with `answer` (undefined: never answers). */
async function fakeAgent(answer: string | undefined): Promise<{ socket: string; requests: string[]; server: Server }> {
  const socket = join(work, `agent-${n++}.sock`);
  const requests: string[] = [];
  const server = createServer((s) => {
    let buf = '';
    s.on('data', (d: Buffer) => {
      buf += d.toString();
      if (buf.includes('\n')) {
        requests.push(buf.slice(0, buf.indexOf('\n')));
        if (answer !== undefined) s.end(answer);
      }
    });
    s.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => server.listen(socket, resolve));
  return { socket, requests, server };
}

beforeAll(async () => {
  if (!existsSync(HOOK)) execFileSync('make', ['-s', '-C', join(ROOT, 'native')], { stdio: 'inherit' });
  work = await mkdtemp(join(tmpdir(), 'thaw-native-hook-'));
});
afterAll(async () => {
  await rm(work, { recursive: true, force: true });
});

describe('thaw-hook: the state on stdin', () => {
  const hostile: Record<string, string | Buffer> = {
    'empty stdin': '',
    'not JSON': 'hello',
    'a truncated object': state().slice(0, 40),
    'an array': '[1,2]',
    'text after the object': `${state()} {}`,
    'two objects': `${state()}${state()}`,
    'no pid': JSON.stringify({ ociVersion: '1', id: 'x', status: 'creating', bundle: '/b' }),
    'pid 0': state({ pid: 0 }),
    'a negative pid': state({ pid: -3 }),
    'a fractional pid': state({ pid: 1.5 }),
    'a pid in exponent form': '{"ociVersion":"1","id":"x","status":"creating","bundle":"/b","pid":4e3}',
    'a pid past INT_MAX': state({ pid: 2 ** 31 }),
    'a pid of 30 digits': '{"ociVersion":"1","id":"x","status":"creating","bundle":"/b","pid":123456789012345678901234567890}',
    'a string pid': state({ pid: '42' }),
    'a relative bundle': state({ bundle: 'run/b' }),
    'an escape in the bundle': '{"ociVersion":"1","id":"x","status":"creating","pid":5,"bundle":"/b\\u002f..\\u002fetc"}',
    'an escape in the id': '{"ociVersion":"1","id":"x\\"y","status":"creating","pid":5,"bundle":"/b"}',
    'a bundle outside ASCII': state({ bundle: '/run/caf\u00e9' }),
    'an id given twice': '{"ociVersion":"1","id":"x","id":"y","status":"creating","pid":5,"bundle":"/b"}',
    'a pid given twice': '{"ociVersion":"1","id":"x","status":"creating","pid":5,"pid":6,"bundle":"/b"}',
    'an unknown status': state({ status: 'paused' }),
    'an empty id': state({ id: '' }),
    'a non-string annotation': state({ annotations: { a: 1 } }),
    'annotations as an array': state({ annotations: ['a'] }),
    'a raw control character in a string': '{"ociVersion":"1","id":"x\ty","status":"creating","pid":5,"bundle":"/b"}',
    'a NUL byte in the bundle': Buffer.from('{"ociVersion":"1","id":"x","status":"creating","pid":5,"bundle":"/b\0/c"}'),
    'a bad escape elsewhere': '{"ociVersion":"1","id":"x","status":"creating","pid":5,"bundle":"/b","other":"\\q"}',
    'an unterminated string': '{"ociVersion":"1","id":"x","status":"creating","pid":5,"bundle":"/b',
    'deep nesting': `{"ociVersion":"1","id":"x","status":"creating","pid":5,"bundle":"/b","other":${'['.repeat(100_000)}${']'.repeat(100_000)}}`,
    'a bundle of 5 KiB': state({ bundle: `/${'a'.repeat(5 * 1024)}` }),
    'a stray literal': '{"ociVersion":"1","id":"x","status":"creating","pid":5,"bundle":"/b","other":nul}',
    'a trailing comma': '{"ociVersion":"1","id":"x","status":"creating","pid":5,"bundle":"/b",}',
  };
  for (const [what, input] of Object.entries(hostile)) {
    it(`${what}: exit 0, hook-failed HOOK_STATE_INVALID, the agent never asked`, async () => {
      const agent = await fakeAgent('done\n');
      try {
        const r = await runHook(input, { socket: agent.socket });
        expect(r.code).toBe(0);
        expect(r.failed?.code).toBe('HOOK_STATE_INVALID');
        expect(r.stderr).toContain('the container starts cold');
        expect(agent.requests).toEqual([]);
      } finally {
        agent.server.close();
      }
    });
  }

  it('oversized (over 1 MiB): refused without reading it all into a request', async () => {
    const agent = await fakeAgent('done\n');
    try {
      const big = state({ annotations: { big: 'x'.repeat(2 * 1024 * 1024) } });
      const r = await runHook(big, { socket: agent.socket });
      expect(r.code).toBe(0);
      expect(r.failed?.code).toBe('HOOK_STATE_INVALID');
      expect(r.failed?.reason).toContain('over 1048576 bytes');
      expect(agent.requests).toEqual([]);
    } finally {
      agent.server.close();
    }
  });

  it('a stdin that is never closed: given up on within the wait, cold start', async () => {
    const r = await runHook('never', { budgetMs: 100, waitMs: 300 });
    expect(r.code).toBe(0);
    expect(r.failed?.code).toBe('HOOK_STATE_INVALID');
    expect(r.failed?.reason).toContain('no end of stdin');
  });

  it('a large but valid state (annotations with escapes, nested values, unknown fields): one exact request', async () => {
    const agent = await fakeAgent('done\n');
    try {
      const annotations: Record<string, string> = {};
      for (let i = 0; i < 2000; i++) annotations[`k${i}`] = `v "quoted" \\ \u00e9 \u2028 ${i}`;
      const r = await runHook(state({ annotations, future: { nested: [1, 2.5e-3, true, false, null, { a: '\u0001' }] } }), { socket: agent.socket });
      expect(r).toMatchObject({ code: 0 });
      expect(r.failed).toBeUndefined();
      expect(agent.requests).toHaveLength(1);
      const req = JSON.parse(agent.requests[0] as string) as Record<string, unknown>;
      expect(req).toMatchObject({ v: 1, id: 'c1', pid: 4242, bundle: '/run/b/c1' });
      expect(Number.isInteger(req['hookPid'])).toBe(true);
      expect(typeof req['elapsedMs']).toBe('number');
    } finally {
      agent.server.close();
    }
  });
});

describe('thaw-hook: never more lenient than the TypeScript parser', () => {
  it('200 mutations of a valid state: each either refused (HOOK_STATE_INVALID) or forwarded exactly as JSON.parse + parseOciState read it', async () => {
    const base = state({ annotations: { k: 'v', 'q"uote': 'caf\u00e9' }, extra: [1, { a: null }, true, -2.5e3] });
    let seed = 20261202;
    const rnd = (n: number): number => {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      return seed % n;
    };
    const agent = await fakeAgent('done\n');
    let forwarded = 0;
    try {
      for (let i = 0; i < 200; i++) {
        let buf = Buffer.from(base);
        for (let j = 1 + rnd(3); j > 0; j--) {
          const at = rnd(buf.length);
          const op = rnd(3);
          if (op === 0) buf[at] = rnd(256);
          else if (op === 1) buf = Buffer.concat([buf.subarray(0, at), buf.subarray(at + 1 + rnd(4))]);
          else buf = Buffer.concat([buf.subarray(0, at), Buffer.from('{["\\}]:,0e-'.charAt(rnd(12))), buf.subarray(at)]);
        }
        const seen = agent.requests.length;
        const r = await runHook(buf, { socket: agent.socket });
        expect(r.code).toBe(0);
        if (agent.requests.length === seen) {
          expect(r.failed?.code, buf.toString('latin1')).toBe('HOOK_STATE_INVALID');
          continue;
        }
        forwarded++;
        // Accepted: the TypeScript reading of the same bytes must accept it too, with the same fields.
        const ts = parseOciState(buf.toString('utf8'));
        const req = JSON.parse(agent.requests[seen] as string) as { id: string; pid: number; bundle: string };
        expect({ id: req.id, pid: req.pid, bundle: req.bundle }, buf.toString('latin1')).toEqual({ id: ts.id, pid: ts.pid, bundle: ts.bundle });
      }
    } finally {
      agent.server.close();
    }
    // Some mutations leave a valid state (a changed annotation, a digit of the pid): both outcomes were exercised.
    expect(forwarded).toBeGreaterThan(0);
    expect(forwarded).toBeLessThan(200);
  }, 60_000);
});

describe('thaw-hook: the agent and its answer', () => {
  it('no agent listening: HOOK_AGENT_UNREACHABLE, exit 0', async () => {
    const r = await runHook(state());
    expect(r.code).toBe(0);
    expect(r.failed?.code).toBe('HOOK_AGENT_UNREACHABLE');
  });

  it('an agent that never answers: the hook gives up at --wait-ms with HOOK_AGENT_TIMEOUT, exit 0', async () => {
    const agent = await fakeAgent(undefined);
    try {
      const r = await runHook(state(), { socket: agent.socket, budgetMs: 100, waitMs: 300 });
      expect(agent.requests).toHaveLength(1);
      expect(r.code).toBe(0);
      expect(r.failed?.code).toBe('HOOK_AGENT_TIMEOUT');
    } finally {
      agent.server.close();
    }
  });

  const answers: Array<[string, string, number, string | undefined]> = [
    ['done', 'done\n', 0, undefined],
    ['cold (the agent recorded the failure)', 'cold\n', 0, undefined],
    ['nostart (the undo failed)', 'nostart HOOK_ROOTFS_DIFF_FAILED\n', 1, undefined],
    ['record CODE', 'record HOOK_AGENT_UNKNOWN_CONTAINER\n', 0, 'HOOK_AGENT_UNKNOWN_CONTAINER'],
    ['an unknown word', 'maybe\n', 0, 'HOOK_AGENT_ANSWER_INVALID'],
    ['a closed connection', '', 0, 'HOOK_AGENT_UNREACHABLE'],
    ['an answer without its newline', 'done', 0, 'HOOK_AGENT_UNREACHABLE'],
    ['an oversized answer', `${'x'.repeat(4096)}\n`, 0, 'HOOK_AGENT_ANSWER_INVALID'],
    ['binary in the answer', 'do\u0007ne\n', 0, 'HOOK_AGENT_ANSWER_INVALID'],
  ];
  for (const [what, answer, exit, recorded] of answers) {
    it(`${what}: exit ${exit}${recorded ? `, hook-failed ${recorded}` : ', no record of its own'}`, async () => {
      const agent = await fakeAgent(answer);
      try {
        const r = await runHook(state(), { socket: agent.socket });
        expect(r.code).toBe(exit);
        expect(r.failed?.code).toBe(recorded);
      } finally {
        agent.server.close();
      }
    });
  }

  it('bad usage: exit 0 and HOOK_USAGE (wait shorter than the budget, unknown flag)', async () => {
    const ctl = join(work, 'ctl-usage');
    for (const args of [['--socket', '/x', '--control-dir', ctl, '--budget-ms', '500', '--wait-ms', '100'], ['--control-dir', ctl, '--bogus', '1']]) {
      await rm(ctl, { recursive: true, force: true });
      const r = await runHook(state(), { args, controlDir: ctl });
      expect(r.code).toBe(0);
      expect(r.failed?.code).toBe('HOOK_USAGE');
    }
  });

  it('a control directory that is a symlink: nothing is written through it, still exit 0', async () => {
    const real = join(work, 'ctl-real');
    const link = join(work, 'ctl-link');
    await mkdir(real);
    await symlink(real, link);
    const r = await runHook('garbage', { controlDir: link });
    expect(r.code).toBe(0);
    expect(await readdir(real)).toEqual([]);
    expect(r.stderr).toContain('writing hook-failed failed');
  });
});

describe('thaw-hook with the agent\'s hook server', () => {
  let server: HookServer;
  beforeAll(async () => {
    server = await startHookServer({ socketPath: join(work, 'run', 'hook.sock') });
  });
  afterAll(async () => {
    await server.close();
  });

  async function bundle(id: string): Promise<{ bundle: string; controlDir: string; ckpt: string }> {
    const b = join(work, 'bundles', id);
    await mkdir(join(b, 'rootfs', 'etc'), { recursive: true });
    await writeFile(join(b, 'rootfs', 'etc', 'image-file'), 'from the image\n');
    await writeFile(join(b, 'config.json'), JSON.stringify({ root: { path: 'rootfs' }, process: { args: ['/bin/sh'], env: [], cwd: '/' } }));
    const ckpt = join(work, 'ckpt', id);
    await mkdir(ckpt, { recursive: true });
    await writeFile(join(ckpt, ROOTFS_DIFF_FILE_NAME), ustar([{ name: 'etc/written', type: '0', data: 'by the worker\n' }]));
    await writeFile(join(ckpt, DELETED_FILES_FILE_NAME), JSON.stringify(['etc/image-file']));
    const controlDir = join(work, 'control', id);
    await mkdir(controlDir, { recursive: true });
    return { bundle: b, controlDir, ckpt };
  }

  it('a registered container: the agent applies the rootfs diff in the runtime\'s view, records hook-done, exit 0', async () => {
    const b = await bundle('srv-ok');
    server.expect('srv-ok', { mode: 'args', controlDir: b.controlDir, checkpointDir: b.ckpt, thawPausePath: '/bin/true', budgetMs: 30_000 });
    const r = await runHook(state({ id: 'srv-ok', pid: process.pid, bundle: b.bundle }), { socket: server.socketPath, controlDir: b.controlDir, budgetMs: 30_000, waitMs: 35_000 });
    expect(r).toMatchObject({ code: 0 });
    expect(r.failed).toBeUndefined();
    expect(await readFile(join(b.bundle, 'rootfs', 'etc', 'written'), 'utf8')).toBe('by the worker\n');
    expect(existsSync(join(b.bundle, 'rootfs', 'etc', 'image-file'))).toBe(false);
    const done = JSON.parse(await readFile(join(b.controlDir, HOOK_DONE_FILE), 'utf8')) as Record<string, unknown>;
    expect(done).toMatchObject({ mode: 'args', rootfsDiff: { entries: 1, deleted: 1 } });
    expect(typeof done['startupMs']).toBe('number');
    expect(server.pending()).toBe(0);
  });

  it('the same container\'s hook a second time: no work left for it, HOOK_AGENT_UNKNOWN_CONTAINER, cold start', async () => {
    const b = await bundle('srv-once');
    server.expect('srv-once', { mode: 'args', controlDir: b.controlDir, checkpointDir: b.ckpt, thawPausePath: '/bin/true', budgetMs: 30_000 });
    const s = state({ id: 'srv-once', pid: process.pid, bundle: b.bundle });
    expect((await runHook(s, { socket: server.socketPath, controlDir: b.controlDir, budgetMs: 30_000, waitMs: 35_000 })).failed).toBeUndefined();
    const ctl2 = join(work, 'control', 'srv-once-2');
    const again = await runHook(s, { socket: server.socketPath, controlDir: ctl2, budgetMs: 30_000, waitMs: 35_000 });
    expect(again.code).toBe(0);
    expect(again.failed?.code).toBe('HOOK_AGENT_UNKNOWN_CONTAINER');
  });

  it('a diff that is not the verified one: the agent records HOOK_DIFF_UNVERIFIED, applies nothing, exit 0', async () => {
    const b = await bundle('srv-unverified');
    server.expect('srv-unverified', { mode: 'args', controlDir: b.controlDir, checkpointDir: b.ckpt, thawPausePath: '/bin/true', budgetMs: 30_000, diffSha256: { rootfsDiff: '0'.repeat(64), deletedFiles: '0'.repeat(64) } });
    const r = await runHook(state({ id: 'srv-unverified', pid: process.pid, bundle: b.bundle }), { socket: server.socketPath, controlDir: b.controlDir, budgetMs: 30_000, waitMs: 35_000 });
    expect(r.code).toBe(0);
    expect(r.failed?.code).toBe('HOOK_DIFF_UNVERIFIED');
    expect(existsSync(join(b.bundle, 'rootfs', 'etc', 'written'))).toBe(false);
    expect(existsSync(join(b.bundle, 'rootfs', 'etc', 'image-file'))).toBe(true);
  });

  it('a budget already spent when the work would start: HOOK_BUDGET_EXCEEDED recorded by the agent, nothing applied, exit 0', async () => {
    const b = await bundle('srv-budget');
    // Overlay mode keeps one MOUNT_TIMEOUT_MS (5 s) of the budget for the overlay: a budget under it is spent at once.
    server.expect('srv-budget', { mode: 'overlay', controlDir: b.controlDir, checkpointDir: b.ckpt, thawPausePath: '/bin/true', budgetMs: 1_000, waitCheckpointMs: 60_000 });
    const r = await runHook(state({ id: 'srv-budget', pid: process.pid, bundle: b.bundle }), { socket: server.socketPath, controlDir: b.controlDir, budgetMs: 1_000, waitMs: 6_000 });
    expect(r.code).toBe(0);
    expect(r.failed?.code).toBe('HOOK_BUDGET_EXCEEDED');
    expect(existsSync(join(b.bundle, 'rootfs', 'etc', 'written'))).toBe(false);
  });

  it('the budget counts from the hook\'s start: a wait for a checkpoint that never comes ends within it, the agent answers before the hook\'s wait runs out', async () => {
    const b = await bundle('srv-wait');
    // The checkpoint is "being pulled" (no manifest.json yet): the agent waits at most what is left of the budget.
    server.expect('srv-wait', { mode: 'args', controlDir: b.controlDir, checkpointDir: b.ckpt, thawPausePath: '/bin/true', budgetMs: 300, waitCheckpointMs: 600_000 });
    const r = await runHook(state({ id: 'srv-wait', pid: process.pid, bundle: b.bundle }), { socket: server.socketPath, controlDir: b.controlDir, budgetMs: 300, waitMs: 20_000 });
    expect(r.code).toBe(0);
    // The agent's own record (not the hook's HOOK_AGENT_TIMEOUT): it gave up by the budget and answered.
    expect(r.failed?.code).toBe('HOOK_CHECKPOINT_UNAVAILABLE');
    expect(existsSync(join(b.bundle, 'rootfs', 'etc', 'written'))).toBe(false);
  });

  it('an agent starting while the previous one stops: the old one\'s close leaves the new one\'s socket serving', async () => {
    const path = join(work, 'run3', 'agent-hook.sock');
    const old = await startHookServer({ socketPath: path });
    const next = await startHookServer({ socketPath: path });
    await old.close();
    const b = await bundle('srv-takeover');
    next.expect('srv-takeover', { mode: 'args', controlDir: b.controlDir, checkpointDir: b.ckpt, thawPausePath: '/bin/true', budgetMs: 30_000 });
    try {
      const r = await runHook(state({ id: 'srv-takeover', pid: process.pid, bundle: b.bundle }), { socket: path, controlDir: b.controlDir, budgetMs: 30_000, waitMs: 35_000 });
      expect(r.failed).toBeUndefined();
      expect(next.served()).toBe(1);
    } finally {
      await next.close();
    }
    expect(existsSync(path)).toBe(false);
    expect(await readdir(join(work, 'run3'))).toEqual([]);
  });

  it('a peer that is not the agent\'s uid is refused (SO_PEERCRED), and the hook starts the pod cold', async () => {
    const other = await startHookServer({ socketPath: join(work, 'run2', 'hook.sock'), peerUid: 4242 });
    try {
      const b = await bundle('srv-peer');
      other.expect('srv-peer', { mode: 'args', controlDir: b.controlDir, checkpointDir: b.ckpt, thawPausePath: '/bin/true', budgetMs: 30_000 });
      const r = await runHook(state({ id: 'srv-peer', pid: process.pid, bundle: b.bundle }), { socket: other.socketPath, controlDir: b.controlDir });
      expect(r.code).toBe(0);
      expect(r.failed?.code).toBe('HOOK_AGENT_UNREACHABLE');
      expect(existsSync(join(b.bundle, 'rootfs', 'etc', 'written'))).toBe(false);
      expect(other.pending()).toBe(1);
    } finally {
      await other.close();
    }
  });
});

describe('thaw-hook --started: the poststart hook of a managed container', () => {
  const startArgs = (socket: string, waitMs = 400): string[] => ['--started', '--socket', socket, '--wait-ms', String(waitMs)];

  it('tells the agent the container\'s id and host pid from runc\'s state, then exits 0 on ok', async () => {
    const starts: Array<[string, number]> = [];
    const srv = await startHookServer({ socketPath: join(work, 'run-start', 'hook.sock'), onStarted: (id, pid) => starts.push([id, pid]) });
    try {
      const ctl = join(work, 'ctl-started-ok');
      const r = await runHook(state({ id: 'started-1', pid: 4343, status: 'running' }), { args: startArgs(srv.socketPath, 2_000), controlDir: ctl });
      expect(r.code).toBe(0);
      expect(r.stderr).toBe('');
      expect(starts).toEqual([['started-1', 4343]]);
      expect(srv.started()).toBe(1);
      // A start is no createRuntime work: nothing registered is used, nothing is recorded in any control dir.
      expect(srv.served()).toBe(0);
      expect(r.failed).toBeUndefined();
      expect(await readdir(ctl)).toEqual([]);
    } finally {
      await srv.close();
    }
  });

  it('the request names its stage, and carries the same checked fields as the createRuntime hook\'s', async () => {
    const agent = await fakeAgent('ok\n');
    try {
      const r = await runHook(state({ id: 'started-2', pid: 77, status: 'running' }), { args: startArgs(agent.socket) });
      expect(r.code).toBe(0);
      expect(agent.requests).toHaveLength(1);
      const req = JSON.parse(agent.requests[0]!) as Record<string, unknown>;
      expect(req).toMatchObject({ v: 1, stage: 'poststart', id: 'started-2', pid: 77, bundle: '/run/b/c1' });
    } finally {
      agent.server.close();
    }
  });

  // runc kills a container whose poststart hook fails: whatever goes wrong, the hook exits 0 and records nothing.
  const failures: Array<[string, () => Promise<{ args: string[]; stdin: string; close?: () => void }>, RegExp]> = [
    ['no agent listening', async () => ({ args: startArgs(join(work, 'none.sock')), stdin: state() }), /HOOK_AGENT_UNREACHABLE/],
    ['an agent that never answers', async () => {
      const a = await fakeAgent(undefined);
      return { args: startArgs(a.socket, 200), stdin: state(), close: () => a.server.close() };
    }, /HOOK_AGENT_TIMEOUT/],
    ['an answer other than ok', async () => {
      const a = await fakeAgent('done\n');
      return { args: startArgs(a.socket), stdin: state(), close: () => a.server.close() };
    }, /HOOK_AGENT_ANSWER_INVALID/],
    ['a hostile state', async () => ({ args: startArgs(join(work, 'none.sock')), stdin: state({ pid: -1 }) }), /HOOK_STATE_INVALID/],
    ['bad usage (no --wait-ms)', async () => ({ args: ['--started', '--socket', '/x'], stdin: state() }), /HOOK_USAGE/],
  ];
  for (const [what, setup, said] of failures) {
    it(`${what}: exit 0, one line on stderr, no hook-failed record`, async () => {
      const s = await setup();
      try {
        const ctl = join(work, `ctl-started-${n++}`);
        const r = await runHook(s.stdin, { args: s.args, controlDir: ctl });
        expect(r.code).toBe(0);
        expect(r.stderr).toMatch(said);
        expect(r.stderr).toMatch(/thaw poststart hook .*the agent was not told that the container started/);
        expect(r.failed).toBeUndefined();
        expect(await readdir(ctl)).toEqual([]);
      } finally {
        s.close?.();
      }
    });
  }

  it('a start whose handling throws is still answered ok (the hook exits 0), and the server goes on serving', async () => {
    let calls = 0;
    const srv = await startHookServer({ socketPath: join(work, 'run-start2', 'hook.sock'), onStarted: () => {
      calls++;
      throw new Error('a bug');
    } });
    try {
      for (let i = 0; i < 2; i++) {
        const r = await runHook(state({ id: `started-throw-${i}` }), { args: startArgs(srv.socketPath, 2_000) });
        expect(r.code).toBe(0);
        expect(r.stderr).toBe('');
      }
      expect(calls).toBe(2);
    } finally {
      await srv.close();
    }
  });
});
