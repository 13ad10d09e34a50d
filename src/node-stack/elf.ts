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

/** Pure part of elfHasInterpreter: scans a program header table for PT_INTERP (p_type is its first u32). */
export function programHeadersHaveInterp(table: Buffer, phentsize: number): boolean {
  for (let off = 0; off + 4 <= table.length; off += phentsize) {
    if (table.readUInt32LE(off) === PT_INTERP) return true;
  }
  return false;
}
