/**
 * thaw-pause, the placeholder PID 1 of a restore target (native/thaw-pause.c), run for real: built with
 * the machine's compiler, spawned in both argv modes, signalled the way the agent signals it. Adoption
 * and reaping run it as PID 1 of a fresh PID namespace (`unshare --pid --fork --mount-proc`, as root) and
 * place processes under it with `nsenter -p`, the way CRIU's restored tree lands there (a process whose
 * parent exits inside the namespace is reparented to its init).
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, copyFileSync, mkdtempSync, readFileSync, rmSync, symlinkSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

const NATIVE_DIR = resolve(import.meta.dirname, '../../native');
const PAUSE = join(NATIVE_DIR, 'build/thaw-pause');
const EXIT_WAIT_MS = 5000;

interface Run {
  child: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const running: ChildProcess[] = [];

function start(file: string, args: string[], options: { argv0?: string; env?: NodeJS.ProcessEnv } = {}): Run {
  const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'pipe'], ...options });
  running.push(child);
  let out = '';
  let err = '';
  child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) =>
    child.on('close', (code, signal) => res({ code, signal })),
  );
  return { child, stdout: () => out, stderr: () => err, exited };
}

async function until<T>(what: string, probe: () => T | undefined | false, timeoutMs = EXIT_WAIT_MS): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = probe();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function exitOf(run: Run): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, rej) => {
    timer = setTimeout(() => rej(new Error(`no exit within ${EXIT_WAIT_MS} ms; stderr: ${run.stderr()}`)), EXIT_WAIT_MS);
  });
  try {
    return await Promise.race([run.exited, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

const waiting = (run: Run) => until('the start line', () => run.stderr().includes('thaw-pause: waiting'));
const sleepMs = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Host pids of the live children of `pid` (from /proc, so it sees reparenting). */
function childrenOf(pid: number): number[] {
  const text = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim();
  return text === '' ? [] : text.split(/\s+/).map(Number);
}

function procState(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
  } catch {
    return undefined;
  }
}

/** thaw-pause as PID 1 of a new PID namespace; `pid` is its host pid (unshare's forked child). */
async function startInPidNamespace(args: string[]): Promise<Run & { pid: number }> {
  const run = start('unshare', ['--pid', '--fork', '--mount-proc', PAUSE, ...args]);
  await waiting(run);
  const unsharePid = run.child.pid as number;
  const pid = await until('the namespace init', () => childrenOf(unsharePid)[0]);
  return { ...run, pid };
}

/** Runs `script` in the namespace of `initPid` through a short-lived parent, so what it backgrounds is orphaned
 *  to the namespace's init, like CRIU's --restore-detached tree. */
function placeUnder(initPid: number, script: string): void {
  execFileSync('nsenter', ['-t', String(initPid), '-p', '--', 'sh', '-c', `${script} & exit 0`], { stdio: 'ignore' });
}

beforeAll(() => {
  // A build failure fails the suite: setup provides the compiler.
  execFileSync('make', ['-s', '-C', NATIVE_DIR], { stdio: 'pipe' });
});

afterEach(() => {
  for (const c of running.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
});

describe('thaw-pause by its own name (args mode)', () => {
  it('prints its version and help', () => {
    expect(execFileSync(PAUSE, ['--version'], { encoding: 'utf8' })).toMatch(/^thaw-pause \d+\.\d+\.\d+\n$/);
    expect(execFileSync(PAUSE, ['--help'], { encoding: 'utf8' })).toContain('SIGUSR2');
  });

  it('rejects arguments without "--" with exit 2', async () => {
    const run = start(PAUSE, ['/bin/true']);
    expect((await exitOf(run)).code).toBe(2);
    expect(run.stderr()).toContain('usage:');
  });

  it('says it waits, stays up, and ignores SIGHUP before a restore', async () => {
    const run = start(PAUSE, ['--', '/bin/sleep', '1000']);
    await waiting(run);
    expect(run.stderr()).toBe('thaw-pause: waiting (mode=args, argv0=/bin/sleep)\n');
    run.child.kill('SIGHUP');
    await sleepMs(300);
    expect(run.child.exitCode).toBeNull();
    expect(procState(run.child.pid as number)).toBe('S'); // asleep, not spinning
  });

  it('exits 0 promptly on SIGTERM before any restore', async () => {
    const run = start(PAUSE, ['--', '/bin/sleep', '1000']);
    await waiting(run);
    run.child.kill('SIGTERM');
    // Exit code 0, not death by the signal: thaw-pause handled SIGTERM itself.
    expect(await exitOf(run)).toEqual({ code: 0, signal: null });
  });

  it('on SIGUSR2 execs the original command with the original environment; its exit code is the exit code', async () => {
    const run = start(PAUSE, ['--', '/bin/sh', '-c', 'echo "fallback ran $THAW_TEST_VAR"; exit 3'], {
      env: { ...process.env, THAW_TEST_VAR: 'with-env' },
    });
    await waiting(run);
    run.child.kill('SIGUSR2');
    expect((await exitOf(run)).code).toBe(3);
    expect(run.stdout()).toBe('fallback ran with-env\n');
    expect(run.stderr()).toContain('thaw-pause: fallback: exec /bin/sh\n');
  });

  it('the exec\'d command gets default signal handling and an unblocked mask', async () => {
    // If thaw-pause leaked its blocked mask, the TERM below would stay pending and the shell would run on.
    const run = start(PAUSE, ['--', '/bin/sh', '-c', 'grep -E "^Sig(Blk|Ign)" /proc/self/status; exec sleep 1000']);
    await waiting(run);
    run.child.kill('SIGUSR2');
    await until('the command output', () => run.stdout().includes('SigIgn'));
    expect(run.stdout()).toMatch(/SigBlk:\s+0+\n/);
    expect(run.stdout()).toMatch(/SigIgn:\s+0+\n/);
    run.child.kill('SIGTERM');
    expect((await exitOf(run)).signal).toBe('SIGTERM');
  });

  it('exits 127 with the reason when the exec fails', async () => {
    const run = start(PAUSE, ['--', '/nonexistent/worker', '--flag']);
    await waiting(run);
    run.child.kill('SIGUSR2');
    expect((await exitOf(run)).code).toBe(127);
    expect(run.stderr()).toContain('thaw-pause: exec /nonexistent/worker failed: No such file or directory\n');
  });

  it('exits 127 on SIGUSR2 when it was given no command', async () => {
    const run = start(PAUSE, []);
    await waiting(run);
    expect(run.stderr()).toContain('argv0=(none)');
    run.child.kill('SIGUSR2');
    expect((await exitOf(run)).code).toBe(127);
    expect(run.stderr()).toContain('no original command');
  });
});

describe('thaw-pause with a deadline (the agent gone for good)', () => {
  it('falls back by itself when no word comes within THAW_PAUSE_DEADLINE_MS; the command sees neither the variable nor the timer', async () => {
    // The command outlives the deadline several times: an interval timer left armed across exec would
    // kill it with SIGALRM before it prints.
    const run = start(PAUSE, ['--', '/bin/sh', '-c', 'sleep 1; echo "alive deadline=${THAW_PAUSE_DEADLINE_MS:-unset}"; exit 4'], {
      env: { ...process.env, THAW_PAUSE_DEADLINE_MS: '200' },
    });
    expect((await exitOf(run)).code).toBe(4);
    expect(run.stdout()).toBe('alive deadline=unset\n');
    expect(run.stderr()).toContain('thaw-pause: no word from the agent within 200 ms; falling back by ourselves\n');
    expect(run.stderr()).toContain('thaw-pause: fallback: exec /bin/sh\n');
  });

  it('at its deadline exits 75 instead of running the command when THAW_PAUSE_DIFF_MARKER exists (a diff only the agent can undo); a missing marker or a symlink does not count', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'thaw-pause-marker-'));
    try {
      const marker = join(dir, '.thaw-diff-applied');
      const env = { ...process.env, THAW_PAUSE_DEADLINE_MS: '200', THAW_PAUSE_DIFF_MARKER: marker };
      // No marker: the ordinary fallback, and the command never sees the variable.
      const plain = start(PAUSE, ['--', '/bin/sh', '-c', 'echo "ran marker=${THAW_PAUSE_DIFF_MARKER:-unset}"; exit 4'], { env });
      expect((await exitOf(plain)).code).toBe(4);
      expect(plain.stdout()).toBe('ran marker=unset\n');
      // A symlink at the marker's path (the pod's own control directory) is not the hook's file.
      symlinkSync('/etc/passwd', marker);
      const linked = start(PAUSE, ['--', '/bin/sh', '-c', 'echo ran; exit 4'], { env });
      expect((await exitOf(linked)).code).toBe(4);
      rmSync(marker);
      execFileSync('/bin/sh', ['-c', `echo '{"entries":1,"deleted":0}' > ${marker}`]);
      const run = start(PAUSE, ['--', '/bin/sh', '-c', 'echo ran; exit 4'], { env });
      expect((await exitOf(run)).code).toBe(75);
      expect(run.stdout()).toBe('');
      expect(run.stderr()).toContain("thaw-pause: no word from the agent within 200 ms, and the rootfs carries the checkpoint's diff that only the agent can undo; exiting 75");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('SIGWINCH (a restore under way) starts the deadline again; when it stops coming, the fallback follows', async () => {
    const run = start(PAUSE, ['--', '/bin/sh', '-c', 'echo cold; exit 5'], { env: { ...process.env, THAW_PAUSE_DEADLINE_MS: '1500' } });
    await waiting(run);
    const started = Date.now();
    while (Date.now() - started < 4000) {
      run.child.kill('SIGWINCH');
      await sleepMs(100);
      expect(run.child.exitCode).toBeNull(); // held past two deadlines by the repeated word
    }
    expect((await exitOf(run)).code).toBe(5);
    expect(run.stdout()).toBe('cold\n');
  });

  it('has no deadline without the variable (or with one that is not a positive number)', async () => {
    for (const value of [undefined, '0', 'soon', '-5']) {
      const env = { ...process.env };
      if (value !== undefined) env.THAW_PAUSE_DEADLINE_MS = value;
      const run = start(PAUSE, ['--', '/bin/sleep', '1000'], { env });
      await waiting(run);
      run.child.kill('SIGALRM'); // only a deadline's own alarm may cause a fallback
      await sleepMs(300);
      expect(run.child.exitCode).toBeNull();
      run.child.kill('SIGTERM');
      expect((await exitOf(run)).code).toBe(0);
    }
  });
});

describe('thaw-pause over an entrypoint (overlay mode)', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'thaw-pause-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('takes argv as the original command and execs it on SIGUSR2', async () => {
    // What runc starts after the createRuntime hook's bind mount: our binary, with the image's argv.
    const run = start(PAUSE, ['-c', 'echo "overlay ran as $0"; exit 4'], { argv0: '/bin/sh' });
    await waiting(run);
    expect(run.stderr()).toBe('thaw-pause: waiting (mode=overlay, argv0=/bin/sh)\n');
    run.child.kill('SIGUSR2');
    expect((await exitOf(run)).code).toBe(4);
    expect(run.stdout()).toBe('overlay ran as /bin/sh\n');
  });

  it('resolves a bare argv0 through PATH, as runc did', async () => {
    const run = start(PAUSE, ['-c', 'echo "bare $0"'], { argv0: 'sh', env: { ...process.env, PATH: '/nonexistent:/bin:/usr/bin' } });
    await waiting(run);
    run.child.kill('SIGUSR2');
    expect((await exitOf(run)).code).toBe(0);
    expect(run.stdout()).toBe('bare sh\n');
  });

  it('treats --version as an argument of the original command, not its own', async () => {
    // The image's entrypoint is GNU echo, whose own --version is what must come out after the fallback.
    const run = start(PAUSE, ['--version'], { argv0: '/bin/echo' });
    await waiting(run);
    expect(run.stderr()).toContain('mode=overlay, argv0=/bin/echo');
    expect(run.stdout()).toBe('');
    run.child.kill('SIGUSR2');
    expect((await exitOf(run)).code).toBe(0);
    expect(run.stdout()).toContain('coreutils');
  });

  it('refuses (127) to exec itself when the overlay is still mounted', async () => {
    // A symlink stands in for the bind mount: the entrypoint path resolves to thaw-pause's own inode.
    const entry = join(dir, 'entrypoint');
    symlinkSync(PAUSE, entry);
    const run = start(entry, ['serve'], { argv0: entry });
    await waiting(run);
    run.child.kill('SIGUSR2');
    expect((await exitOf(run)).code).toBe(127);
    expect(run.stderr()).toContain('thaw-pause is still mounted over it');
  });

  it('with the overlay still mounted, execs the original entrypoint from THAW_PAUSE_ORIGINAL (the hook\'s second mount of it), at SIGUSR2 and at its deadline', async () => {
    const entry = join(dir, 'covered-entrypoint');
    symlinkSync(PAUSE, entry);
    // The second mount: the original entrypoint (here /bin/sh) at another path.
    const original = join(dir, 'original-entrypoint');
    copyFileSync('/bin/sh', original);
    chmodSync(original, 0o755);
    const env = { ...process.env, THAW_PAUSE_ORIGINAL: original };
    const run = start(entry, ['-c', 'echo "ran as $0 ${THAW_PAUSE_ORIGINAL:-unset}"; exit 5'], { argv0: entry, env });
    await waiting(run);
    run.child.kill('SIGUSR2');
    expect((await exitOf(run)).code).toBe(5);
    expect(run.stdout()).toBe(`ran as ${entry} unset\n`);
    expect(run.stderr()).toContain(`thaw-pause: ${entry} is still covered; exec the original entrypoint from ${original}`);
    // The agent gone for good: the deadline does the same.
    const byItself = start(entry, ['-c', 'echo deadline; exit 6'], { argv0: entry, env: { ...env, THAW_PAUSE_DEADLINE_MS: '300' } });
    expect((await exitOf(byItself)).code).toBe(6);
    expect(byItself.stdout()).toBe('deadline\n');
    // THAW_PAUSE_ORIGINAL naming thaw-pause itself (or nothing) is no way out: 127 as before.
    const self = start(entry, ['serve'], { argv0: entry, env: { ...process.env, THAW_PAUSE_ORIGINAL: entry } });
    await waiting(self);
    self.child.kill('SIGUSR2');
    expect((await exitOf(self)).code).toBe(127);
  });

  it('refuses to exec itself when a bare argv0 resolves through PATH to the overlay', async () => {
    const entry = join(dir, 'serve-model');
    symlinkSync(PAUSE, entry);
    const run = start(entry, [], { argv0: 'serve-model', env: { ...process.env, PATH: `/nonexistent:${dir}:/bin` } });
    await waiting(run);
    run.child.kill('SIGUSR2');
    expect((await exitOf(run)).code).toBe(127);
    expect(run.stderr()).toContain(`exec ${entry} refused: thaw-pause is still mounted over it`);
  });
});

describe('thaw-pause as PID 1 of a PID namespace', () => {
  it('reaps orphans that exit (no zombies)', async () => {
    const ns = await startInPidNamespace(['--', '/bin/true']);
    placeUnder(ns.pid, 'sleep 0.5');
    const orphan = await until('the orphan under thaw-pause', () => childrenOf(ns.pid)[0]);
    await until('the orphan to be reaped', () => procState(orphan) === undefined, 3000);
    expect(childrenOf(ns.pid)).toEqual([]);
    process.kill(ns.pid, 'SIGTERM');
    expect((await exitOf(ns)).code).toBe(0);
  });

  it('after SIGUSR1 forwards SIGTERM to the adopted worker and exits with its exit code', async () => {
    const ns = await startInPidNamespace(['--', '/bin/true']);
    placeUnder(ns.pid, `sh -c 'trap "exit 7" TERM; while :; do sleep 0.05; done'`);
    await until('the worker under thaw-pause', () => childrenOf(ns.pid)[0]);
    process.kill(ns.pid, 'SIGUSR1');
    await until('the adoption line', () => ns.stderr().includes('adopted worker pid'));
    process.kill(ns.pid, 'SIGTERM');
    expect((await exitOf(ns)).code).toBe(7);
    expect(ns.stderr()).toContain('forwarding SIGTERM to worker');
  });

  it('exits 128+signal when the adopted worker is killed by a signal', async () => {
    const ns = await startInPidNamespace(['--', '/bin/true']);
    placeUnder(ns.pid, 'exec sleep 1000');
    const worker = await until('the worker', () => childrenOf(ns.pid)[0]);
    process.kill(ns.pid, 'SIGUSR1');
    await until('the adoption line', () => ns.stderr().includes('adopted worker pid'));
    process.kill(worker, 'SIGKILL');
    expect((await exitOf(ns)).code).toBe(128 + 9);
  });

  it('exits with the status of a worker that exits on its own', async () => {
    const ns = await startInPidNamespace(['--', '/bin/true']);
    placeUnder(ns.pid, `sh -c 'sleep 1; exit 5'`);
    await until('the worker', () => childrenOf(ns.pid)[0]);
    process.kill(ns.pid, 'SIGUSR1');
    expect((await exitOf(ns)).code).toBe(5);
  });

  it('keeps waiting when SIGUSR1 finds no child to adopt', async () => {
    const ns = await startInPidNamespace(['--', '/bin/true']);
    process.kill(ns.pid, 'SIGUSR1');
    await until('the no-child line', () => ns.stderr().includes('no child to adopt'));
    expect(procState(ns.pid)).toBe('S');
    process.kill(ns.pid, 'SIGTERM');
    expect((await exitOf(ns)).code).toBe(0);
  });

  it('prefers the child named by THAW_PAUSE_WORKER_PID_FILE, when it is one of its children', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'thaw-pause-pid-'));
    try {
      const pidFile = join(dir, 'worker.pid');
      const run = start('unshare', ['--pid', '--fork', '--mount-proc', PAUSE, '--', '/bin/true'], {
        env: { ...process.env, THAW_PAUSE_WORKER_PID_FILE: pidFile },
      });
      await waiting(run);
      const init = await until('the init', () => childrenOf(run.child.pid as number)[0]);
      placeUnder(init, 'exec sleep 1000');
      await until('the first child', () => childrenOf(init).length === 1);
      // The second child writes its own pid (as seen in the namespace) to the file and exits 6 on TERM.
      placeUnder(init, `sh -c 'echo $$ > ${pidFile}; trap "exit 6" TERM; while :; do sleep 0.05; done'`);
      await until('the pid file', () => existsSync(pidFile) && readFileSync(pidFile, 'utf8').trim() !== '');
      process.kill(init, 'SIGUSR1');
      await until('the adoption line', () => run.stderr().includes('adopted worker pid'));
      expect(run.stderr()).toContain(`adopted worker pid ${readFileSync(pidFile, 'utf8').trim()}\n`);
      process.kill(init, 'SIGTERM');
      expect((await exitOf(run)).code).toBe(6);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('on fallback, SIGKILLs what a failed restore left behind before exec\'ing the original command', async () => {
    const ns = await startInPidNamespace(['--', '/bin/sh', '-c', 'echo cold start; exit 0']);
    placeUnder(ns.pid, 'exec sleep 1000');
    const leftover = await until('the leftover', () => childrenOf(ns.pid)[0]);
    process.kill(ns.pid, 'SIGUSR2');
    expect((await exitOf(ns)).code).toBe(0);
    expect(ns.stdout()).toBe('cold start\n');
    expect(procState(leftover)).toBeUndefined();
  });
});
