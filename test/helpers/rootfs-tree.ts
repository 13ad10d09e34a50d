/** Trees and archives for the rootfs diff tests: a byte-for-byte snapshot of a tree, and hand-made ustar archives. */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { lstat, readdir, readFile, readlink } from 'node:fs/promises';
import { join } from 'node:path';

const sh = (cmd: string, args: string[]): string => execFileSync(cmd, args, { encoding: 'utf8' });
export const setXattr = (path: string, name: string, value: string): void => {
  sh('python3', ['-c', 'import os,sys; os.setxattr(sys.argv[1], sys.argv[2], sys.argv[3].encode(), follow_symlinks=False)', path, name, value]);
};
/** user.* xattrs of every non-symlink under `top`, keyed by relative path: one python run per tree. */
export const xattrsOf = (top: string): Record<string, string> =>
  JSON.parse(
    sh('python3', [
      '-c',
      `import os,sys,json
top=sys.argv[1]; out={}
for d,dirs,files in os.walk(top):
    for n in dirs+files:
        p=os.path.join(d,n)
        if os.path.islink(p): continue
        x=sorted((k, os.getxattr(p,k,follow_symlinks=False).hex()) for k in os.listxattr(p,follow_symlinks=False) if k.startswith('user.'))
        if x: out[os.path.relpath(p,top)]=repr(x)
print(json.dumps(out))`,
      top,
    ]),
  ) as Record<string, string>;

export interface Node {
  path: string;
  type: string;
  mode: string;
  owner: string;
  size?: number;
  sha256?: string;
  link?: string;
  linkedTo?: string;
  xattrs?: string;
  mtime?: number;
}

/** Everything a rootfs holds, for a byte-for-byte comparison (directory mtimes aside). */
export async function snapshotTree(top: string, skip: (rel: string) => boolean = () => false): Promise<Node[]> {
  const out: Node[] = [];
  const firstByInode = new Map<number, string>();
  const xattrs = xattrsOf(top);
  const visit = async (rel: string): Promise<void> => {
    for (const name of (await readdir(join(top, rel))).sort()) {
      const childRel = rel === '' ? name : `${rel}/${name}`;
      if (skip(childRel)) continue;
      const abs = join(top, childRel);
      const st = await lstat(abs);
      const node: Node = { path: childRel, type: '', mode: (st.mode & 0o7777).toString(8), owner: `${st.uid}:${st.gid}` };
      if (st.isDirectory()) node.type = 'dir';
      else if (st.isSymbolicLink()) {
        node.type = 'symlink';
        node.link = await readlink(abs);
      } else if (st.isFIFO()) node.type = 'fifo';
      else if (st.isFile()) {
        node.type = 'file';
        node.size = st.size;
        node.sha256 = createHash('sha256').update(await readFile(abs)).digest('hex');
        node.mtime = Math.floor(st.mtimeMs / 1000);
        if (st.nlink > 1) {
          const first = firstByInode.get(st.ino);
          if (first === undefined) firstByInode.set(st.ino, childRel);
          else node.linkedTo = first;
        }
      } else node.type = `other:${st.mode.toString(8)}`;
      if (xattrs[childRel] !== undefined) node.xattrs = xattrs[childRel];
      out.push(node);
      if (st.isDirectory()) await visit(childRel);
    }
  };
  await visit('');
  return out;
}

// ---- hand-made archives -------------------------------------------------------------------------------

export interface HandEntry {
  name: string;
  /** The ustar typeflag: any byte, so that an archive can hold what thaw's writer never makes ('g', 'L', ...). */
  type: string;
  data?: Buffer | string;
  linkname?: string;
}

/** A ustar archive written byte by byte, so that it can hold what GNU tar would never write. */
export function ustar(entries: HandEntry[]): Buffer {
  const blocks: Buffer[] = [];
  for (const e of entries) {
    const h = Buffer.alloc(512);
    const data = Buffer.from(e.data ?? '');
    h.write(e.name, 0, 100, 'utf8');
    h.write(`${(e.type === '5' ? 0o755 : 0o644).toString(8).padStart(7, '0')}\0`, 100);
    h.write('0000000\0', 108);
    h.write('0000000\0', 116);
    h.write(`${data.length.toString(8).padStart(11, '0')}\0`, 124);
    h.write(`${Math.floor(Date.now() / 1000).toString(8).padStart(11, '0')}\0`, 136);
    h.write('        ', 148);
    h.write(e.type, 156);
    h.write(e.linkname ?? '', 157, 100, 'utf8');
    h.write('ustar\0', 257, 'latin1');
    h.write('00', 263);
    let sum = 0;
    for (const b of h) sum += b;
    h.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 'latin1');
    blocks.push(h, data, Buffer.alloc((512 - (data.length % 512)) % 512));
  }
  blocks.push(Buffer.alloc(1024));
  return Buffer.concat(blocks);
}

