/**
 * CRIU's RPC, end to end, against the real CRIU of thaw's node stack (no mocks of CRIU): check and
 * version, dump of a small real process with and without --leave-running, restore from its images
 * (the restored process goes on counting from where it was dumped), a failing restore with CRIU's log
 * in the error, a timeout that kills CRIU, and the order of notifications.
 *
 * Runs as root. The CRIU binary is the one `src/node-stack/` provisions; its absence FAILS the test.
 * THAW_TEST_CRIU_PATH overrides the path (a developer's own build).
 */
import { execFileSync, spawn } from 'node:child_process';
import {
  closeSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
} from 'node:fs';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { isThawError } from '../../src/errors.js';
import { createCollectingLogger } from '../../src/log.js';
import { CriuClient, nsenterWrapper, parentDeathWrapper } from '../../src/restore-engine/criu/client.js';
import { ensureBuilt } from '../../src/node-stack/thaw-plugin-process.js';
import { CriuErrorCode, type CriuError } from '../../src/restore-engine/criu/errors.js';
import { CriuCodec, CriuReqType } from '../../src/restore-engine/criu/rpc.js';
import { Libc } from '../../src/restore-engine/criu/seqpacket.js';
import { CriuSwrk } from '../../src/restore-engine/criu/swrk.js';

const STACK_CRIU = '/opt/thaw/stack/1.7/bin/criu';
const CRIU_PATH = process.env.THAW_TEST_CRIU_PATH ?? STACK_CRIU;

function requireCriu(): void {
  if (!existsSync(CRIU_PATH)) {
    throw new Error(
      `CRIU not found at ${CRIU_PATH}: provision thaw's node stack first (src/node-stack/, which installs ` +
        `Debian's CRIU 4.1.1 under /opt/thaw/stack/1.7/ and links bin/criu, bin/tar, bin/gzip)`,
    );
  }
  if (process.getuid?.() !== 0) throw new Error('the CRIU integration tests must run as root');
}

const libc = Libc.load();
const codec = CriuCodec.load();
const logger = createCollectingLogger();
const toolkitBin = dirname(CRIU_PATH);
const client = new CriuClient({
  criuPath: CRIU_PATH,
  logger,
  libc,
  codec,
  env: { ...process.env, PATH: `${toolkitBin}:${process.env.PATH ?? '/usr/bin:/bin'}` },
});

/** Every process a test started, killed in afterAll even when a test failed midway. */
const started = new Set<number>();
function kill(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // gone
  }
}

const root = mkdtempSync('/tmp/thaw-criu-');

beforeAll(() => requireCriu());
afterAll(() => {
  for (const pid of started) kill(pid);
  if (process.env.THAW_TEST_KEEP === undefined) rmSync(root, { recursive: true, force: true });
});

describe('CRIU RPC: check and version', () => {
  it('check succeeds on this kernel', async () => {
    await client.check();
  });

  it('version reports CRIU 4.x', async () => {
    const v = await client.version();
    expect(v.major).toBe(4);
    expect(v.minor).toBeGreaterThanOrEqual(0);
    expect(typeof v.sublevel).toBe('number');
  });

  it('featureCheck answers each feature', async () => {
    const f = await client.featureCheck();
    expect(typeof f.memTrack).toBe('boolean');
    expect(typeof f.lazyPages).toBe('boolean');
  });
});

/** A victim CRIU can dump: its own session (setsid), no tty, stdio to a file, a counter held in memory. */
interface Victim {
  pid: number;
  dir: string;
  counterFile: string;
}

/**
 * bash with builtins only: no child processes. (A `sleep` child, killed by CRIU with the tree, is
 * reparented to PID 1; until PID 1 reaps it, its zombie keeps the victim's pid allocated as its
 * pgid/sid, and the restore fails with "Can't fork for <pid>: File exists". This machine's PID 1
 * reaps late.) The counter is written in place without truncation (`1<>`): it only grows, so a
 * reader never sees an empty file. `read -t` on a FIFO nobody writes is the delay.
 */
const COUNTER_SCRIPT =
  'exec 9<>"$2"; i=0; while :; do i=$((i+1)); printf "%d\\n" "$i" 1<>"$1"; read -t 0.05 -u 9 _; done';

async function startVictim(name: string): Promise<Victim> {
  const dir = join(root, name);
  mkdirSync(dir, { recursive: true });
  const counterFile = join(dir, 'counter');
  const out = openSync(join(dir, 'victim.out'), 'a');
  try {
    // detached: setsid() in the child, so the victim leads its own session with no controlling tty.
    const fifo = join(dir, 'delay.fifo');
    execFileSync('mkfifo', [fifo]);
    const child = spawn('/bin/bash', ['-c', COUNTER_SCRIPT, 'victim', counterFile, fifo], {
      detached: true,
      stdio: ['ignore', out, out],
    });
    child.unref();
    if (child.pid === undefined) throw new Error('victim did not start');
    started.add(child.pid);
    await waitFor(() => readCounter(counterFile) >= 10, 5_000, 'victim counter to reach 10');
    return { pid: child.pid, dir, counterFile };
  } finally {
    closeSync(out);
  }
}

function readCounter(file: string): number {
  try {
    return Number.parseInt(readFileSync(file, 'utf8').trim(), 10) || 0;
  } catch {
    return 0;
  }
}

async function waitFor(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(20);
  }
}

function alive(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) [ZX]/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

/** The swrk pids the client logged since `from` (index into the collecting logger's lines). */
function swrkPidsSince(from: number): number[] {
  return logger.lines
    .slice(from)
    .filter((l) => l.msg === 'criu swrk started')
    .map((l) => l.fields.swrkPid as number);
}

async function expectCriuError(p: Promise<unknown>, code: string): Promise<CriuError> {
  try {
    await p;
  } catch (err) {
    if (!isThawError(err, code)) throw err;
    return err as CriuError;
  }
  throw new Error(`expected ${code}, but the call succeeded`);
}

function dirs(name: string): { imagesDir: string; workDir: string } {
  const imagesDir = join(root, name, 'images');
  const workDir = join(root, name, 'work');
  mkdirSync(imagesDir, { recursive: true });
  mkdirSync(workDir, { recursive: true });
  return { imagesDir, workDir };
}

describe('CRIU RPC: dump and restore of a real process', () => {
  it('dumps with leave-running: images written, the victim keeps counting', async () => {
    const v = await startVictim('leave-running');
    const { imagesDir, workDir } = dirs('leave-running');
    const res = await client.dump({ imagesDir, workDir, pid: v.pid, leaveRunning: true });
    expect(res.logPath).toBe(join(workDir, 'dump.log'));
    expect(readdirSync(imagesDir).some((f) => f.startsWith('pages-'))).toBe(true);
    expect(readFileSync(res.logPath, 'utf8')).toContain('Dumping finished successfully');
    const before = readCounter(v.counterFile);
    await waitFor(() => readCounter(v.counterFile) > before + 3, 5_000, 'the victim to go on counting');
    expect(alive(v.pid)).toBe(true);
    kill(v.pid);
  });

  it('dumps (victim stops), restores detached, and the counter goes on from its dumped value; notifications in order', async () => {
    const v = await startVictim('dump-restore');
    const { imagesDir, workDir } = dirs('dump-restore');
    const events: string[] = [];
    const record = (name: string) => () => {
      events.push(name);
    };
    await client.dump(
      { imagesDir, workDir, pid: v.pid },
      { preDump: record('pre-dump'), postDump: record('post-dump'), networkLock: record('network-lock'), networkUnlock: record('network-unlock') },
    );
    await waitFor(() => !existsSync(`/proc/${v.pid}`), 5_000, 'the dumped victim to be gone (and reaped: its pid is restored)');
    const dumped = readCounter(v.counterFile);
    expect(dumped).toBeGreaterThanOrEqual(10);
    await sleep(200);
    expect(readCounter(v.counterFile)).toBe(dumped); // nothing counts while it is an image

    let postRestorePid = -1;
    const res = await client.restore(
      { imagesDir, workDir },
      {
        preRestore: record('pre-restore'),
        postRestore: (pid) => {
          postRestorePid = pid;
          events.push('post-restore');
        },
        preResume: record('pre-resume'),
        postResume: record('post-resume'),
      },
    );
    started.add(res.pid);
    expect(res.pid).toBe(v.pid); // same PID namespace: CRIU restores the original pid
    expect(postRestorePid).toBe(v.pid);
    expect(alive(res.pid)).toBe(true);
    await waitFor(() => readCounter(v.counterFile) > dumped + 3, 5_000, 'the restored victim to count on');
    // It continued from its memory (dumped + k), not from a fresh start (which would be back near 1).
    const now = readCounter(v.counterFile);
    expect(now).toBeGreaterThan(dumped);
    expect(readFileSync(res.logPath, 'utf8')).toContain('Restore finished successfully');

    const dumpEvents = events.filter((e) => ['pre-dump', 'post-dump'].includes(e));
    expect(dumpEvents).toEqual(['pre-dump', 'post-dump']);
    const restoreEvents = events.filter((e) => ['pre-restore', 'post-restore', 'pre-resume', 'post-resume'].includes(e));
    // CRIU's order (cr-restore.c): post-restore comes before the tasks are resumed.
    expect(restoreEvents).toEqual(['pre-restore', 'post-restore', 'pre-resume', 'post-resume']);
    kill(res.pid);
  });

  it('a restore from corrupted images fails with CRIU_FAILED quoting the log', async () => {
    const v = await startVictim('corrupt');
    const { imagesDir, workDir } = dirs('corrupt');
    await client.dump({ imagesDir, workDir, pid: v.pid });
    await waitFor(() => !existsSync(`/proc/${v.pid}`), 5_000, 'the dumped victim to be gone (and reaped: its pid is restored)');
    // An empty core image: CRIU stops at once ("Unexpected EOF"). (An empty pages image does not:
    // see the timeout test below.)
    truncateSync(join(imagesDir, `core-${v.pid}.img`), 0);

    const err = await expectCriuError(client.restore({ imagesDir, workDir }, undefined, { timeoutMs: 30_000 }), CriuErrorCode.FAILED);
    expect(alive(v.pid)).toBe(false);
    expect(err.step).toBe('criu restore');
    expect(err.evidence.logPath).toBe(join(workDir, 'restore.log'));
    expect(err.evidence.crErrmsg).toEqual(expect.any(String));
    const errors = err.evidence.logErrors as string[];
    expect(errors.some((l) => l.includes('Unexpected EOF'))).toBe(true);
    expect(errors.some((l) => l.includes('Restoring FAILED'))).toBe(true);
    // The cause, not CRIU's first error line (which here is the harmless rlimit one).
    expect(err.message.split('\n')[0]).toMatch(/CRIU reported failure \(cr_errno \d+\): Error \(criu\/image\.c:\d+\): Unexpected EOF$/);
    expect(err.message).toContain('Error lines:');
    expect(err.message).toContain('Unexpected EOF');
    expect((err.evidence.logTail as string[]).length).toBeGreaterThan(0);
  });

  it('a restore from an empty pages image hangs CRIU 4.1.1; the timeout kills CRIU and the half-restored task', async () => {
    const v = await startVictim('empty-pages');
    const { imagesDir, workDir } = dirs('empty-pages');
    await client.dump({ imagesDir, workDir, pid: v.pid });
    await waitFor(() => !existsSync(`/proc/${v.pid}`), 5_000, 'the dumped victim to be gone (and reaped: its pid is restored)');
    const pages = readdirSync(imagesDir).filter((f) => f.startsWith('pages-'));
    expect(pages.length).toBeGreaterThan(0);
    for (const f of pages) truncateSync(join(imagesDir, f), 0);

    const mark = logger.lines.length;
    // CRIU's restorer retries preadv() that returns 0 forever (log: "Preadv ... `- returned 0").
    const err = await expectCriuError(client.restore({ imagesDir, workDir }, undefined, { timeoutMs: 3_000 }), CriuErrorCode.TIMEOUT);
    expect(err.evidence.logPath).toBe(join(workDir, 'restore.log'));
    const [swrkPid] = swrkPidsSince(mark);
    expect(alive(swrkPid as number)).toBe(false);
    await waitFor(() => !alive(v.pid), 5_000, 'the half-restored task to be killed with CRIU');
    expect(readFileSync(join(workDir, 'restore.log'), 'utf8')).toMatch(/Preadv .*\n.*returned 0/);
  });

  it('a notify handler that throws aborts the dump with CRIU_NOTIFY_FAILED; the victim runs on', async () => {
    const v = await startVictim('notify-fails');
    const { imagesDir, workDir } = dirs('notify-fails');
    const err = await expectCriuError(
      client.dump({ imagesDir, workDir, pid: v.pid }, { preDump: () => Promise.reject(new Error('not now')) }),
      CriuErrorCode.NOTIFY_FAILED,
    );
    expect((err.cause as Error).message).toBe('not now');
    const before = readCounter(v.counterFile);
    await waitFor(() => readCounter(v.counterFile) > before + 3, 5_000, 'the victim to go on counting');
    kill(v.pid);
  });

  it('a timeout kills CRIU and rejects with CRIU_TIMEOUT', async () => {
    const v = await startVictim('timeout');
    const { imagesDir, workDir } = dirs('timeout');
    const mark = logger.lines.length;
    // CRIU waits for our answer to pre-dump; a handler that never answers holds it there.
    const err = await expectCriuError(
      client.dump({ imagesDir, workDir, pid: v.pid }, { preDump: () => new Promise<void>(() => undefined) }, { timeoutMs: 1_000 }),
      CriuErrorCode.TIMEOUT,
    );
    expect(err.evidence.timeoutMs).toBe(1_000);
    const [swrkPid] = swrkPidsSince(mark);
    expect(swrkPid).toBeGreaterThan(0);
    expect(alive(swrkPid as number)).toBe(false);
    const before = readCounter(v.counterFile);
    await waitFor(() => readCounter(v.counterFile) > before + 3, 5_000, 'the victim to go on counting');
    kill(v.pid);
  });

  it('CRIU dying mid-operation is CRIU_EXITED with its exit status', async () => {
    const v = await startVictim('criu-dies');
    const { imagesDir, workDir } = dirs('criu-dies');
    const mark = logger.lines.length;
    const err = await expectCriuError(
      client.dump(
        { imagesDir, workDir, pid: v.pid },
        {
          preDump: async () => {
            const [swrkPid] = swrkPidsSince(mark);
            process.kill(swrkPid as number, 'SIGKILL');
            await waitFor(() => !alive(swrkPid as number), 5_000, 'CRIU to die');
          },
        },
      ),
      CriuErrorCode.EXITED,
    );
    expect(err.evidence.signal).toBe('SIGKILL');
    expect(err.message).toMatch(/CRIU closed its socket before answering DUMP \(killed by SIGKILL\)/);
    kill(v.pid);
  });

  it('an abort refuses CRIU at its next notification: CRIU undoes the dump by itself, CRIU_ABORTED, the victim runs on', async () => {
    const v = await startVictim('abort');
    const { imagesDir, workDir } = dirs('abort');
    const ac = new AbortController();
    const mark = logger.lines.length;
    const p = client.dump({ imagesDir, workDir, pid: v.pid }, { preDump: () => ac.abort(new Error('shutdown')) }, { signal: ac.signal });
    const err = await expectCriuError(p, CriuErrorCode.ABORTED);
    expect((err.cause as Error).message).toBe('shutdown');
    expect(err.message).toContain('CRIU was refused at its pre-dump notification and undid the dump');
    // Not killed: CRIU answered, and exited on its own.
    expect(logger.lines.slice(mark).map((l) => l.msg)).not.toContain('stopping CRIU');
    expect(readFileSync(join(workDir, 'dump.log'), 'utf8')).toMatch(/Error \(criu\/action-scripts\.c/);
    const before = readCounter(v.counterFile);
    await waitFor(() => readCounter(v.counterFile) > before + 3, 5_000, 'the victim to go on counting');
    kill(v.pid);
  });

  it('an abort at any moment of a dump leaves the victim running: CRIU is refused at post-dump, never killed', async () => {
    // Killing CRIU a few ms into a dump lands, some of the time, while it runs an injected syscall in the victim,
    // which then dies of SIGTRAP (the parent-death test below). An abort at each moment until the dump is done
    // must not kill CRIU, and the victim must run on after each.
    const v = await startVictim('abort-anytime');
    let refused = 0;
    for (let delayMs = 0; delayMs <= 30; delayMs++) {
      const { imagesDir, workDir } = dirs(`abort-anytime-${delayMs}`);
      const ac = new AbortController();
      const mark = logger.lines.length;
      const p = client.dump(
        { imagesDir, workDir, pid: v.pid, leaveRunning: true },
        { preDump: () => void setTimeout(() => ac.abort(new Error(`abort after ${delayMs} ms`)), delayMs) },
        { signal: ac.signal },
      );
      const outcome = await p.then(
        () => 'done' as const,
        (err: unknown) => err,
      );
      ac.abort(); // a dump that was done first: its timer has nothing left to abort
      expect(logger.lines.slice(mark).map((l) => l.msg), `abort ${delayMs} ms after pre-dump`).not.toContain('stopping CRIU');
      const before = readCounter(v.counterFile);
      await waitFor(() => readCounter(v.counterFile) > before + 2, 5_000, `the victim to count on after the abort at ${delayMs} ms`);
      expect(alive(v.pid)).toBe(true);
      if (outcome === 'done') break; // the dump was faster than this delay: later ones abort nothing
      expect(isThawError(outcome) && outcome.code === CriuErrorCode.ABORTED, String(outcome)).toBe(true);
      expect((outcome as CriuError).message).toMatch(/refused at its (pre|post)-dump notification|had answered before/);
      refused++;
    }
    expect(refused).toBeGreaterThanOrEqual(3);
    kill(v.pid);
  });

  it('an abort that gets no notification within the grace kills CRIU: CRIU_ABORTED saying so', async () => {
    const v = await startVictim('abort-grace');
    const { imagesDir, workDir } = dirs('abort-grace');
    const ac = new AbortController();
    const mark = logger.lines.length;
    // The pre-dump handler never answers, so CRIU sends nothing more: the grace decides.
    const p = client.dump(
      { imagesDir, workDir, pid: v.pid },
      { preDump: () => (ac.abort(new Error('shutdown')), new Promise<void>(() => undefined)) },
      { signal: ac.signal, abortGraceMs: 300 },
    );
    const err = await expectCriuError(p, CriuErrorCode.ABORTED);
    expect(err.message).toContain('CRIU sent no notification within 300 ms of the abort and was killed');
    const [swrkPid] = swrkPidsSince(mark);
    expect(alive(swrkPid as number)).toBe(false);
    const before = readCounter(v.counterFile);
    await waitFor(() => readCounter(v.counterFile) > before + 3, 5_000, 'the victim to go on counting');
    kill(v.pid);
  });
});

describe('CRIU RPC: restore into another process\'s namespaces (nsenter wrapper)', () => {
  it('restores the dumped victim inside a placeholder\'s PID, IPC and UTS namespaces; CRIU never enters its mount namespace', async () => {
    // The placeholder: init of new PID/mount/IPC/UTS namespaces, with its own /proc (like a pod's pause).
    const placeholder = spawn('unshare', ['-p', '-m', '-i', '-u', '--fork', '--mount-proc', 'sleep', 'infinity'], {
      detached: true,
      stdio: 'ignore',
    });
    placeholder.unref();
    started.add(placeholder.pid as number);
    let targetPid = 0;
    await waitFor(
      () => {
        const kids = readFileSync(`/proc/${placeholder.pid}/task/${placeholder.pid}/children`, 'utf8').trim();
        targetPid = Number.parseInt(kids, 10) || 0;
        return targetPid > 0;
      },
      5_000,
      'the placeholder to fork its init',
    );
    started.add(targetPid);
    const nsOf = (pid: number, ns: string): string => readlinkSync(`/proc/${pid}/ns/${ns}`);

    const v = await startVictim('into-ns');
    const { imagesDir, workDir } = dirs('into-ns');
    await client.dump({ imagesDir, workDir, pid: v.pid });
    await waitFor(() => !existsSync(`/proc/${v.pid}`), 5_000, 'the dumped victim to be gone');
    const dumped = readCounter(v.counterFile);

    const res = await client.restore({ imagesDir, workDir }, undefined, { wrapper: nsenterWrapper(targetPid), timeoutMs: 30_000 });
    // The pid CRIU reports is the one in the target's PID namespace: find the host pid through NSpid.
    const hostPid = readdirSync('/proc')
      .filter((d) => /^\d+$/.test(d))
      .map(Number)
      .find((p) => {
        try {
          return readFileSync(`/proc/${p}/status`, 'utf8').match(/^NSpid:\s+(.*)$/m)?.[1]?.split(/\s+/).at(-1) === String(res.pid) &&
            nsOf(p, 'pid') === nsOf(targetPid, 'pid');
        } catch {
          return false;
        }
      });
    expect(hostPid).toBeDefined();
    started.add(hostPid as number);
    for (const ns of ['pid', 'ipc', 'uts']) expect(nsOf(hostPid as number, ns)).toBe(nsOf(targetPid, ns));
    // CRIU ran in a private copy of our mount namespace (nsenterWrapper: no -m), so did the tree it restored.
    expect(nsOf(hostPid as number, 'mnt')).not.toBe(nsOf(targetPid, 'mnt'));
    await waitFor(() => readCounter(v.counterFile) > dumped + 3, 5_000, 'the restored victim to count on');
    expect(readFileSync(res.logPath, 'utf8')).toContain('Restore finished successfully');
    kill(hostPid as number);
    kill(targetPid);
  });
});

describe('CRIU RPC: one swrk process for several requests, where CRIU allows it', () => {
  it('VERSION and FEATURE_CHECK with keep_open share a process; CHECK may not keep it', async () => {
    const swrk = CriuSwrk.start({ libc, codec, logger }, { criuPath: CRIU_PATH });
    try {
      const a = await swrk.request({ type: CriuReqType.VERSION }, { step: 'v1', keepOpen: true, timeoutMs: 10_000 });
      const f = await swrk.request(
        { type: CriuReqType.FEATURE_CHECK, features: { memTrack: true } },
        { step: 'f', keepOpen: true, timeoutMs: 10_000 },
      );
      const b = await swrk.request({ type: CriuReqType.VERSION }, { step: 'v2', timeoutMs: 10_000 });
      expect(a.version).toEqual(b.version);
      expect(typeof f.features?.memTrack).toBe('boolean');
      // The last request had no keep_open: the process is finished.
      expect(alive(swrk.pid as number)).toBe(false);
      await expect(swrk.request({ type: CriuReqType.VERSION }, { step: 'v3' })).rejects.toMatchObject({ code: 'CRIU_PROTOCOL' });
    } finally {
      await swrk.close();
    }
    const other = CriuSwrk.start({ libc, codec, logger }, { criuPath: CRIU_PATH });
    try {
      await expect(other.request({ type: CriuReqType.CHECK }, { step: 'c', keepOpen: true })).rejects.toMatchObject({
        code: 'CRIU_INVALID_OPTIONS',
        message: 'c: CRIU does not keep swrk open after CHECK',
      });
    } finally {
      await other.close();
    }
  });

  it('a missing criu binary is CRIU_SPAWN naming the path', async () => {
    const broken = new CriuClient({ criuPath: '/nonexistent/criu', logger, libc, codec });
    await expect(broken.version()).rejects.toMatchObject({ code: 'CRIU_SPAWN', message: expect.stringContaining('/nonexistent/criu') });
  });
});

describe('CRIU RPC: a CRIU whose agent dies', () => {
  // A victim with 1.5 GiB of memory (the dump takes seconds here) and the counter of startVictim's, in python.
  const BIG_VICTIM = [
    'import os, sys, time',
    'ballast = bytearray(b"\\x01") * (1536 << 20)',
    'i = 0',
    'while True:',
    '    i += 1',
    '    with open(sys.argv[1], "r+" if os.path.exists(sys.argv[1]) else "w") as f: f.write("%d\\n" % i)',
    '    time.sleep(0.05)',
  ].join('\n');
  // The "agent": a node process that dumps the victim through CriuClient with the parent-death wrapper and says
  // when CRIU has started (pre-dump notification); the test SIGKILLs it then.
  const AGENT = (victimPid: number, dirsJson: string, marker: string): string => `
import { writeFileSync } from 'node:fs';
import { CriuClient, parentDeathWrapper } from ${JSON.stringify(join(process.cwd(), 'dist/src/restore-engine/criu/client.js'))};
import { createCollectingLogger } from ${JSON.stringify(join(process.cwd(), 'dist/src/log.js'))};
const client = new CriuClient({ criuPath: ${JSON.stringify(CRIU_PATH)}, logger: createCollectingLogger(), parentDeathWrapper: parentDeathWrapper(),
  env: { ...process.env, PATH: ${JSON.stringify(`${toolkitBin}:${process.env.PATH ?? '/usr/bin:/bin'}`)} } });
await client.dump({ ...${dirsJson}, pid: ${victimPid}, leaveRunning: true }, { preDump: () => writeFileSync(${JSON.stringify(marker)}, 'x') });
`;

  it('with the parent-death wrapper, CRIU dies with the process that started it mid-dump, and the victim runs on', async () => {
    ensureBuilt();
    expect(parentDeathWrapper(), 'util-linux setpriv at /usr/bin/setpriv').toBeDefined();
    const dir = join(root, 'parent-death');
    mkdirSync(dir, { recursive: true });
    const counterFile = join(dir, 'counter');
    const script = join(dir, 'victim.py');
    writeFileSync(script, BIG_VICTIM);
    const out = openSync(join(dir, 'victim.out'), 'a');
    const victim = spawn('python3', [script, counterFile], { detached: true, stdio: ['ignore', out, out] });
    closeSync(out);
    victim.unref();
    started.add(victim.pid!);
    await waitFor(() => readCounter(counterFile) >= 5, 30_000, 'the big victim to count');

    const d = dirs('parent-death');
    const marker = join(dir, 'pre-dump');
    const agentScript = join(dir, 'agent.mjs');
    writeFileSync(agentScript, AGENT(victim.pid!, JSON.stringify(d), marker));
    const agent = spawn(process.execPath, [agentScript], { stdio: 'ignore' });
    started.add(agent.pid!);
    await waitFor(() => existsSync(marker), 30_000, 'CRIU to start the dump');
    const criuPids = readdirSync('/proc')
      .filter((p) => /^\d+$/.test(p))
      .filter((p) => {
        try {
          return readFileSync(`/proc/${p}/stat`, 'utf8').replace(/^.*\) /, '').split(' ')[1] === String(agent.pid) && readlinkSync(`/proc/${p}/exe`).endsWith('/criu');
        } catch {
          return false;
        }
      })
      .map(Number);
    expect(criuPids).toHaveLength(1);
    const pagesBytes = (): number =>
      readdirSync(d.imagesDir).filter((f) => f.startsWith('pages-')).reduce((n, f) => n + statSync(join(d.imagesDir, f)).size, 0);
    // Killed while CRIU writes pages: the worker then runs CRIU's parasite as a daemon, which returns to the
    // worker's own code (sigreturn) when its socket closes. Killed a few ms earlier, while CRIU injects a syscall
    // into it, the worker dies of SIGTRAP (the injected trap has no tracer left): CRIU's behaviour, not thaw's,
    // written down in docs/operations.md.
    await waitFor(() => pagesBytes() >= 32 * 2 ** 20, 30_000, 'CRIU to write the first 32 MiB of pages');
    process.kill(agent.pid!, 'SIGKILL');

    await waitFor(() => !alive(criuPids[0]!), 30_000, 'CRIU to die with its parent');
    // Killed at once, not later: a CRIU that outlived its parent would write all 1.5 GiB of pages and fail only
    // when it next talked to the dead socket (the post-dump notification).
    expect(pagesBytes()).toBeLessThan(768 * 2 ** 20);
    const before = readCounter(counterFile);
    await waitFor(() => readCounter(counterFile) > before + 3, 10_000, 'the victim to count on after CRIU died');
    expect(alive(victim.pid!)).toBe(true);
    kill(victim.pid!);
  });
});
