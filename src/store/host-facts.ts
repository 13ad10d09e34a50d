import { arch, machine, release } from 'node:os';
import type { NodeFacts } from './manifest.js';

/**
 * The facts of this host that a manifest records and a restore compares: `process.arch`, `uname -m` and the
 * kernel release. CRIU and containerd versions, the image and the GPU come from their own layers.
 */
export function readHostFacts(): Pick<NodeFacts, 'arch' | 'kernelRelease'> {
  return { arch: { node: arch(), machine: machine() }, kernelRelease: release() };
}
