/**
 * CRIU's RPC, end to end, against the real CRIU of thaw's node stack (no mocks of CRIU): check and
 * version, dump of a small real process with and without --leave-running, restore from its images
 * (the restored process goes on counting from where it was dumped), a failing restore with CRIU's log
 * in the error, a timeout that kills CRIU, and the order of notifications.
 *
 * Runs as root. The CRIU binary is the one `src/node-stack/` provisions; its absence FAILS the test.
 * THAW_TEST_CRIU_PATH overrides the path (a developer's own build).
 */
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { dirname } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { createCollectingLogger } from '../../src/log.js';
import { CriuClient } from '../../src/restore-engine/criu/client.js';
import { CriuCodec } from '../../src/restore-engine/criu/rpc.js';
import { Libc } from '../../src/restore-engine/criu/seqpacket.js';

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
  rmSync(root, { recursive: true, force: true });
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
