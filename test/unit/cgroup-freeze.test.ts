import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, readFile, rmdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { freezeCgroupOf } from '../../src/restore-engine/cgroup-freeze.js';
import { parseCgroupMounts } from '../../src/restore-engine/restore-cgroups.js';

describe('freezeCgroupOf', () => {
  it("freezes and thaws a real cgroup of the host's freezer", async () => {
    const mounts = parseCgroupMounts(await readFile('/proc/self/mountinfo', 'utf8'));
    const v1 = mounts.find((m) => m.version === 1 && m.controllers.includes('freezer'));
    const v2 = mounts.find((m) => m.version === 2);
    const top = v1?.mountpoint ?? v2!.mountpoint;
    const dir = join(top, `thaw-freeze-test-${process.pid}`);
    await mkdir(dir);
    const child = spawn('sleep', ['1000'], { stdio: 'ignore' });
    try {
      await writeFile(join(dir, 'cgroup.procs'), String(child.pid));
      const frozen = await freezeCgroupOf(child.pid!);
      expect(frozen.dir).toBe(dir);
      const state = async (): Promise<string> =>
        v1 ? (await readFile(join(dir, 'freezer.state'), 'utf8')).trim() : (await readFile(join(dir, 'cgroup.events'), 'utf8')).match(/^frozen (\d)$/m)![1]!;
      expect(await state()).toBe(v1 ? 'FROZEN' : '1');
      await frozen.thaw();
      await frozen.thaw();
      expect(await state()).toBe(v1 ? 'THAWED' : '0');
      // Our own process sits in a cgroup too; the root cgroup itself is refused.
      if ((await readFile('/proc/1/cgroup', 'utf8')).split('\n').some((l) => /freezer:\/$|^0::\/$/.test(l))) {
        await expect(freezeCgroupOf(1)).rejects.toThrow(/root cgroup/);
      }
    } finally {
      child.kill('SIGKILL');
      await new Promise((r) => child.once('exit', r));
      if (existsSync(dir)) await rmdir(dir);
    }
  });
});
