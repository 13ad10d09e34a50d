/**
 * Zero pages left out of a real CRIU dump (src/restore-engine/zero-pages.ts), restored by the real CRIU of
 * thaw's node stack: a python process holds written zero pages, data pages and untouched pages in a private
 * anonymous mapping, and a private mapping of a file of 0xab bytes into half of whose pages it wrote zeros
 * (those must come back as zeros, not as the file's bytes). The memory's sha256 after the restore must equal
 * the one before the dump (the restored process writes it when the test creates a file it polls for). Runs as root; CRIU's absence fails the test.
 */
import { execFileSync, spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, describe, expect, it } from 'vitest';
import { MAPPED_FILE_HEAD_BYTES, mappedFilePages } from '../../src/restore-engine/mapped-files.js';
import { dropZeroPages } from '../../src/restore-engine/zero-pages.js';
import { waitFor } from '../helpers/stack.js';

const CRIU = process.env['THAW_TEST_CRIU_PATH'] ?? '/opt/thaw/stack/1.7/bin/criu';
const PAGE = 4096;

// 16384 pages of anonymous memory: every 4th written with zeros (present, droppable: 16 MiB), every 4th with
// data, the rest untouched; 1024 pages of a file mapped privately from its 65th page, every 2nd overwritten
// with zeros.
const VICTIM = `
import hashlib, mmap, os, sys, time
out, datafile = sys.argv[1], sys.argv[2]
P, N, F = 4096, 16384, 1024
anon = mmap.mmap(-1, N * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
seed = os.urandom(P)
for i in range(N):
    if i % 4 == 0:
        anon[i * P:(i + 1) * P] = bytes(P)
    elif i % 4 == 1:
        anon[i * P:(i + 1) * P] = seed[:P - 8] + i.to_bytes(8, "little")
f = open(datafile, "r+b")
filemap = mmap.mmap(f.fileno(), F * P, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=64 * P)
for i in range(0, F, 2):
    filemap[i * P:(i + 1) * P] = bytes(P)
def digest():
    return hashlib.sha256(anon[:] + filemap[:]).hexdigest()
def write(path):
    with open(path + ".tmp", "w") as o:
        o.write(digest())
    os.rename(path + ".tmp", path)
write(out + ".before")
while not os.path.exists(out + ".ask"):
    time.sleep(0.02)
write(out + ".after")
`;

const root = mkdtempSync(join(tmpdir(), 'thaw-zero-pages-it-'));
const pids = new Set<number>();
afterAll(() => {
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }
  rmSync(root, { recursive: true, force: true });
});

/** The file's text once it exists. */
const fileText = (path: string, timeoutMs: number): Promise<string> =>
  waitFor(() => (existsSync(path) ? readFileSync(path, 'utf8') : undefined), `${path} to exist`, timeoutMs, 20);

describe('zero pages dropped from a real dump', () => {
  it('CRIU restores the process with the same memory, file-backed zero pages included, from smaller images', async () => {
    if (!existsSync(CRIU)) throw new Error(`CRIU not found at ${CRIU}: provision thaw's node stack first`);
    if (process.getuid?.() !== 0) throw new Error('this test must run as root');
    const script = join(root, 'victim.py');
    const datafile = join(root, 'data.bin');
    const digestFile = join(root, 'digest');
    writeFileSync(script, VICTIM);
    writeFileSync(datafile, Buffer.alloc((64 + 1024) * PAGE, 0xab));
    const out = openSync(join(root, 'victim.out'), 'a');
    const child = spawn('python3', [script, digestFile, datafile], { detached: true, stdio: ['ignore', out, out] });
    closeSync(out);
    child.unref();
    const pid = child.pid!;
    pids.add(pid);
    const before = await fileText(`${digestFile}.before`, 30_000);

    const images = join(root, 'images');
    mkdirSync(images);
    execFileSync(CRIU, ['dump', '-t', String(pid), '-D', images, '-o', 'dump.log', '-v4'], { timeout: 60_000 });
    const pagesFile = readdirSync(images).find((f) => /^pages-\d+\.img$/.test(f))!;
    const sizeBefore = statSync(join(images, pagesFile)).size;

    // The pages of the private file mapping that the process wrote (every 2nd of 1024, merged across the 4 KiB
    // gaps) are what CRIU will fault in from data.bin on restore, at their offsets in the file (the mapping
    // starts at its 65th page); with the file's head, which CRIU reads to check the file: mapped-files.ts lists them.
    const mapped = await mappedFilePages(images);
    const ranges = [{ offset: 0, length: MAPPED_FILE_HEAD_BYTES }, { offset: 64 * PAGE, length: 1023 * PAGE }];
    expect(mapped.find((m) => m.path === datafile)).toEqual({ path: datafile, ranges, bytes: MAPPED_FILE_HEAD_BYTES + 1023 * PAGE });

    const r = await dropZeroPages(images);
    expect(r.rewritten).toEqual([pid]);
    expect(r.droppedBytes).toBeGreaterThanOrEqual(4096 * PAGE); // the 16 MiB written with zeros, at least
    expect(r.droppedBytes).toBeLessThan(sizeBefore);
    expect(statSync(join(images, pagesFile)).size).toBe(sizeBefore - r.droppedBytes);

    // The dumped process is gone; its pid is free once we have reaped it.
    for (let i = 0; i < 250 && existsSync(`/proc/${pid}`); i += 1) await sleep(20);
    execFileSync(CRIU, ['restore', '-D', images, '-d', '-o', 'restore.log', '-v4'], { timeout: 60_000 });
    writeFileSync(`${digestFile}.ask`, '');
    expect(await fileText(`${digestFile}.after`, 10_000)).toBe(before);
  });
});
