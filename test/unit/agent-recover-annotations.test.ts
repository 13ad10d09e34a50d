/**
 * After an agent restart, what it learns back from NRI Synchronize comes from container annotations, which
 * a pod can write too. The control directory must be derived from the container id under the configured
 * root, never taken from an annotation (M3 of the security audit).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { managedFromContainer } from '../../src/agent/managed-container.js';
import { createControlDir } from '../../src/sdk/control-dir.js';

const P = 'thaw.io/';
const ID = 'c'.repeat(64);
let root: string;

beforeEach(async () => {
  root = join(await mkdtemp(join(tmpdir(), 'thaw-recover-')), 'control');
});
afterEach(async () => {
  await rm(join(root, '..'), { recursive: true, force: true });
});

const container = (annotations: Record<string, string>, id = ID) => ({ id, podSandboxId: 'p', name: 'w', annotations });

describe('managedFromContainer (agent restart)', () => {
  it('recovers a container thaw adjusted: its directory is <root>/<id>', async () => {
    const dir = await createControlDir(root, ID);
    const pod = { namespace: 'team-a' };
    const entry = managedFromContainer(P, root, pod, container({ [`${P}role`]: 'restore-target', [`${P}checkpoint-name`]: 'team-a/ck', [`${P}control-dir`]: dir }));
    expect(entry?.controlDir).toBe(dir);
    expect(entry?.checkpointName).toBe('team-a/ck');
    // A bare name, as an agent of the flat store layout wrote it: the pod's own namespace's.
    expect(managedFromContainer(P, root, pod, container({ [`${P}role`]: 'restore-target', [`${P}checkpoint-name`]: 'ck', [`${P}control-dir`]: dir }))?.checkpointName).toBe('team-a/ck');
  });

  it("refuses a checkpoint source's key of another namespace (a forged checkpoint-name), and a bad key", async () => {
    const dir = await createControlDir(root, ID);
    const pod = { namespace: 'team-a' };
    expect(managedFromContainer(P, root, pod, container({ [`${P}role`]: 'checkpoint-source', [`${P}checkpoint-name`]: 'team-a/ck', [`${P}control-dir`]: dir }))?.checkpointName).toBe('team-a/ck');
    expect(managedFromContainer(P, root, pod, container({ [`${P}role`]: 'checkpoint-source', [`${P}checkpoint-name`]: 'team-b/ck', [`${P}control-dir`]: dir }))).toBeUndefined();
    expect(managedFromContainer(P, root, pod, container({ [`${P}role`]: 'checkpoint-source', [`${P}checkpoint-name`]: `oci-${'a'.repeat(64)}`, [`${P}control-dir`]: dir }))).toBeUndefined();
    expect(managedFromContainer(P, root, pod, container({ [`${P}role`]: 'restore-target', [`${P}checkpoint-name`]: '../ck', [`${P}control-dir`]: dir }))).toBeUndefined();
  });

  it('refuses a control-dir annotation outside the root (a pod naming /etc)', async () => {
    await createControlDir(root, ID);
    for (const forged of ['/etc', join(root, '..'), `${root}/${ID}/../..`, join(root, 'd'.repeat(64))]) {
      expect(managedFromContainer(P, root, {}, container({ [`${P}role`]: 'checkpoint-source', [`${P}checkpoint-name`]: 'ck', [`${P}control-dir`]: forged }))).toBeUndefined();
    }
  });

  it('refuses forged role annotations on a container thaw never adjusted (no <root>/<id>)', () => {
    expect(managedFromContainer(P, root, {}, container({ [`${P}role`]: 'restore-target', [`${P}checkpoint-name`]: 'ck', [`${P}control-dir`]: join(root, ID) }))).toBeUndefined();
  });

  it('refuses an id that cannot be a path component', async () => {
    expect(managedFromContainer(P, root, {}, container({ [`${P}role`]: 'restore-target', [`${P}checkpoint-name`]: 'ck', [`${P}control-dir`]: root }, '..'))).toBeUndefined();
  });
});
