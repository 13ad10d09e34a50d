/**
 * The file pages a CRIU restore faults in (src/restore-engine/mapped-files.ts): which pagemap pages lie in
 * private file mappings and at which file offsets, merged ranges, the listing from (synthetic) images, and
 * reading them through a root. The same listing runs on a real CRIU dump in test/integration/zero-pages.test.ts.
 */
import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CriuImageCodec, encodeImageFile, VmaStatus } from '../../src/restore-engine/criu/images.js';
import { clipRanges, firstIrregularMappedFile, mappedFilePages, mergeRanges, privateFilePageRanges, readMappedFilePages } from '../../src/restore-engine/mapped-files.js';

const P = 4096n;
const codec = CriuImageCodec.load();
const header = Buffer.alloc(8);
let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'thaw-mapped-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const FILE_PRIVATE = VmaStatus.AREA_REGULAR | VmaStatus.FILE_PRIVATE;
const ANON_PRIVATE = VmaStatus.AREA_REGULAR | VmaStatus.ANON_PRIVATE;

describe('mapped file pages', () => {
  it('maps pagemap pages inside private file VMAs to file offsets (pgoff, in bytes, counted), nothing else', () => {
    const vmas = [
      { start: 0x10000n, end: 0x14000n, status: FILE_PRIVATE, flags: 2, pgoff: 2n * P, shmid: 7n }, // file 7 from its 3rd page (pgoff in bytes)
      { start: 0x14000n, end: 0x20000n, status: ANON_PRIVATE, flags: 0x22 },
      { start: 0x20000n, end: 0x22000n, status: VmaStatus.AREA_REGULAR | VmaStatus.FILE_SHARED, flags: 1, pgoff: 0n, shmid: 8n },
      { start: 0x30000n, end: 0x32000n, status: FILE_PRIVATE, flags: 2, pgoff: 0n, shmid: 9n },
    ];
    const pagemap = [
      { vaddr: 0x11000n, nrPages: 5 }, // 0x11000-0x16000: two pages in file 7's VMA, three anonymous
      { vaddr: 0x20000n, nrPages: 2 }, // shared file: its pages are the file's, not faulted in
      { vaddr: 0x31000n, nrPages: 1 },
    ];
    const r = privateFilePageRanges(vmas, pagemap);
    expect([...r.keys()]).toEqual([7n, 9n]);
    expect(r.get(7n)).toEqual([[2n * P + 0x1000n, 2n * P + 0x4000n]]);
    expect(r.get(9n)).toEqual([[0x1000n, 0x2000n]]);
  });

  it('merges ranges that overlap or lie within the gap, sorted', () => {
    expect(mergeRanges([[0x5000n, 0x6000n], [0n, 0x1000n], [0x1000n, 0x2000n], [0x40000n, 0x41000n]], 0x2000)).toEqual([
      { offset: 0, length: 0x2000 },
      { offset: 0x5000, length: 0x1000 },
      { offset: 0x40000, length: 0x1000 },
    ]);
    expect(mergeRanges([[0n, 0x1000n], [0x3000n, 0x4000n]], 0x2000)).toEqual([{ offset: 0, length: 0x4000 }]);
    expect(clipRanges([{ offset: 0, length: 0x3000 }, { offset: 0x8000, length: 0x1000 }], 0x1000, 0x8800)).toEqual([
      { offset: 0x1000, length: 0x2000 },
      { offset: 0x8000, length: 0x800 },
    ]);
  });

  it('lists every mapped file with its head and its written pages, most bytes first, and reads them through a root', async () => {
    const images = join(dir, 'images');
    await mkdir(images);
    await writeFile(join(images, 'pstree.img'), encodeImageFile({ header, entries: [codec.encodePstree({ pid: 10, ppid: 0 }), codec.encodePstree({ pid: 11, ppid: 10 })] }));
    await writeFile(join(images, 'files.img'), encodeImageFile({ header, entries: [
      codec.encodeRegFile({ id: 3, name: '/lib/libbig.so' }),
      codec.encodeRegFile({ id: 4, name: '/lib/libsmall.so' }),
      codec.encodeRegFile({ id: 5, name: '/gone.so' }),
      codec.encodeRegFile({ id: 6, name: '/data/shared.bin' }),
    ] }));
    await writeFile(join(images, 'mm-10.img'), encodeImageFile({ header, entries: [codec.encodeMm([
      { start: 0x100000n, end: 0x200000n, status: FILE_PRIVATE, flags: 2, pgoff: 0n, shmid: 3n },
      { start: 0x300000n, end: 0x301000n, status: FILE_PRIVATE, flags: 2, pgoff: 0x1000n, shmid: 5n },
    ])] }));
    // Pages at the start of libbig and far into it (offset 0x80000).
    await writeFile(join(images, 'pagemap-10.img'), encodeImageFile({ header, entries: [codec.encodePagemapHead(1),
      codec.encodePagemapEntry({ vaddr: 0x100000n, nrPages: 4 }), codec.encodePagemapEntry({ vaddr: 0x180000n, nrPages: 2 }), codec.encodePagemapEntry({ vaddr: 0x300000n, nrPages: 1 })] }));
    // The child maps libsmall, libbig again (its pages are read once) and a shared file (only its head: no pages dumped).
    await writeFile(join(images, 'mm-11.img'), encodeImageFile({ header, entries: [codec.encodeMm([
      { start: 0x100000n, end: 0x200000n, status: FILE_PRIVATE, flags: 2, pgoff: 0n, shmid: 3n },
      { start: 0x400000n, end: 0x401000n, status: VmaStatus.AREA_REGULAR | VmaStatus.FILE_SHARED, flags: 1, pgoff: 0n, shmid: 6n },
      { start: 0x500000n, end: 0x502000n, status: FILE_PRIVATE, flags: 2, pgoff: 0n, shmid: 4n },
    ])] }));
    await writeFile(join(images, 'pagemap-11.img'), encodeImageFile({ header, entries: [codec.encodePagemapHead(2), codec.encodePagemapEntry({ vaddr: 0x100000n, nrPages: 2 }), codec.encodePagemapEntry({ vaddr: 0x501000n, nrPages: 1 })] }));

    const head = { offset: 0, length: 0x10000 };
    const files = await mappedFilePages(images, codec);
    expect(files).toEqual([
      { path: '/lib/libbig.so', ranges: [head, { offset: 0x80000, length: 0x2000 }], bytes: 0x12000 },
      { path: '/gone.so', ranges: [head], bytes: 0x10000 },
      { path: '/data/shared.bin', ranges: [head], bytes: 0x10000 },
      { path: '/lib/libsmall.so', ranges: [head], bytes: 0x10000 },
    ]);

    const root = join(dir, 'root');
    await mkdir(join(root, 'lib'), { recursive: true });
    await writeFile(join(root, 'lib', 'libbig.so'), Buffer.alloc(0x81000, 1)); // ends inside its far range: read to the end
    await writeFile(join(root, 'lib', 'libsmall.so'), Buffer.alloc(0x8000, 2)); // shorter than its head
    const r = await readMappedFilePages(root, files, { concurrency: 2 });
    expect(r).toMatchObject({ files: 2, bytesRead: 0x10000 + 0x1000 + 0x8000, skipped: 2 });
    const stopped = new AbortController();
    stopped.abort();
    expect(await readMappedFilePages(root, files, { signal: stopped.signal })).toMatchObject({ files: 0, bytesRead: 0 });
  });
});

describe('readMappedFilePages in a hostile tree (the paths are the checkpoint\'s, the tree the pod\'s)', () => {
  const head = [{ offset: 0, length: 0x10000 }];
  it('an absolute symlink in an intermediate component resolves inside the root: the host file is never read', async () => {
    const host = join(dir, 'hostile-host');
    await mkdir(host, { recursive: true });
    await writeFile(join(host, 'secret.so'), Buffer.alloc(0x3000, 7));
    const root = join(dir, 'hostile-root-1');
    await mkdir(root, { recursive: true });
    await symlink(host, join(root, 'hostdir')); // absolute: on the host it names the host's directory
    await symlink(join(host, 'secret.so'), join(root, 'last.so'));
    const r = await readMappedFilePages(root, [
      { path: '/hostdir/secret.so', ranges: head, bytes: 0x10000 },
      { path: '/last.so', ranges: head, bytes: 0x10000 },
      { path: '/../../../../../../..' + join(host, 'secret.so'), ranges: head, bytes: 0x10000 },
    ]);
    expect(r).toMatchObject({ files: 0, bytesRead: 0, skipped: 3 });
  });

  it('a FIFO, a device node (/dev/zero\'s numbers) and a directory at mapped paths are skipped without being opened', async () => {
    const root = join(dir, 'hostile-root-2');
    await mkdir(join(root, 'lib', 'dir.so'), { recursive: true });
    execFileSync('mkfifo', [join(root, 'lib', 'fifo.so')]);
    execFileSync('mknod', [join(root, 'lib', 'zero.so'), 'c', '1', '5']);
    await writeFile(join(root, 'lib', 'ok.so'), Buffer.alloc(0x2000, 1));
    const r = await readMappedFilePages(root, ['fifo.so', 'zero.so', 'dir.so', 'ok.so'].map((n) => ({ path: `/lib/${n}`, ranges: head, bytes: 0x10000 })));
    expect(r).toMatchObject({ files: 1, bytesRead: 0x2000, skipped: 3 });
  });

  it('firstIrregularMappedFile names the first mapped path that is not a regular file in the root (symlinks followed inside it), without opening it', async () => {
    const root = join(dir, 'hostile-root-3');
    await mkdir(join(root, 'lib', 'dir.so'), { recursive: true });
    await mkdir(join(root, 'dev'), { recursive: true });
    execFileSync('mkfifo', [join(root, 'lib', 'fifo.so')]);
    execFileSync('mknod', [join(root, 'dev', 'zero'), 'c', '1', '5']);
    await writeFile(join(root, 'lib', 'ok.so'), Buffer.alloc(0x2000, 1));
    await symlink('/dev/zero', join(root, 'lib', 'zero-link.so')); // absolute: resolves to the root's /dev/zero
    await symlink('/lib/ok.so', join(root, 'lib', 'ok-link.so'));
    await symlink('/etc/passwd', join(root, 'lib', 'host-link.so')); // the host's file is not the root's: missing there
    const files = (names: string[]) => names.map((n) => ({ path: `/lib/${n}`, ranges: head, bytes: 0x10000 }));
    expect(await firstIrregularMappedFile(root, files(['ok.so', 'ok-link.so', 'host-link.so', 'missing.so']))).toBeUndefined();
    expect(await firstIrregularMappedFile(root, files(['ok.so', 'fifo.so', 'zero-link.so']))).toEqual({ path: '/lib/fifo.so', type: 'fifo' });
    expect(await firstIrregularMappedFile(root, files(['zero-link.so']))).toEqual({ path: '/lib/zero-link.so', type: 'character device' });
    expect(await firstIrregularMappedFile(root, files(['dir.so']))).toEqual({ path: '/lib/dir.so', type: 'directory' });
  });
});
