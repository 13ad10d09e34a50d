/**
 * ELF program headers, read without loading anything: which dynamic loader an executable names. Shared by the
 * stack provisioning and `thaw install` (a toolkit must carry its loader) and the agent (what a restore loads).
 */
import { open } from 'node:fs/promises';

const ELF_MAGIC = 0x7f454c46; // "\x7fELF"
const PT_INTERP = 3;

/**
 * True when the file is a 64-bit little-endian ELF with a PT_INTERP program header, i.e. a
 * dynamically linked executable that the kernel starts through a dynamic loader. Static binaries
 * (busybox-static) and plain shared libraries have none. Reads only the headers.
 */
export async function elfHasInterpreter(filePath: string): Promise<boolean> {
  const fh = await open(filePath, 'r');
  try {
    const head = Buffer.alloc(64);
    const { bytesRead } = await fh.read(head, 0, 64, 0);
    if (bytesRead < 64 || head.readUInt32BE(0) !== ELF_MAGIC) return false;
    if (head[4] !== 2 || head[5] !== 1) return false; // ELFCLASS64, ELFDATA2LSB only (x86_64 Debian)
    const phoff = Number(head.readBigUInt64LE(0x20));
    const phentsize = head.readUInt16LE(0x36);
    const phnum = head.readUInt16LE(0x38);
    if (phentsize < 4 || phnum === 0 || phnum > 512) return false;
    const table = Buffer.alloc(phentsize * phnum);
    const read = await fh.read(table, 0, table.length, phoff);
    return programHeadersHaveInterp(table.subarray(0, read.bytesRead), phentsize);
  } finally {
    await fh.close();
  }
}

/**
 * The PT_INTERP string of a 64-bit little-endian ELF (its dynamic loader's path, e.g.
 * /opt/thaw/stack/1.7/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2), or undefined for a static binary, a
 * shared library without one, or a file that is not such an ELF. Reads only the headers and the string.
 */
export async function elfInterpreter(filePath: string): Promise<string | undefined> {
  const fh = await open(filePath, 'r');
  try {
    const head = Buffer.alloc(64);
    const { bytesRead } = await fh.read(head, 0, 64, 0);
    if (bytesRead < 64 || head.readUInt32BE(0) !== ELF_MAGIC) return undefined;
    if (head[4] !== 2 || head[5] !== 1) return undefined;
    const phoff = Number(head.readBigUInt64LE(0x20));
    const phentsize = head.readUInt16LE(0x36);
    const phnum = head.readUInt16LE(0x38);
    if (phentsize < 56 || phnum === 0 || phnum > 512) return undefined;
    const table = Buffer.alloc(phentsize * phnum);
    const read = await fh.read(table, 0, table.length, phoff);
    for (let off = 0; off + 56 <= read.bytesRead; off += phentsize) {
      if (table.readUInt32LE(off) !== PT_INTERP) continue;
      // Elf64_Phdr: p_type u32, p_flags u32, p_offset u64 (at 8), ..., p_filesz u64 (at 32).
      const offset = Number(table.readBigUInt64LE(off + 8));
      const size = Number(table.readBigUInt64LE(off + 32));
      if (size === 0 || size > 4096) return undefined;
      const text = Buffer.alloc(size);
      const got = await fh.read(text, 0, size, offset);
      return text.subarray(0, got.bytesRead).toString('latin1').replace(/\0.*$/s, '');
    }
    return undefined;
  } finally {
    await fh.close();
  }
}

/** Pure part of elfHasInterpreter: scans a program header table for PT_INTERP (p_type is its first u32). */
export function programHeadersHaveInterp(table: Buffer, phentsize: number): boolean {
  for (let off = 0; off + 4 <= table.length; off += phentsize) {
    if (table.readUInt32LE(off) === PT_INTERP) return true;
  }
  return false;
}
