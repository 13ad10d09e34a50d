/**
 * The tools platform teams run against thaw's artifacts and manifests, provisioned from Debian sid like a
 * stack prefix into `<root>/peer-tools` (bin/ holds one link per tool) so the interop tests run them for
 * real: cosign and notation (signatures), oras and skopeo (OCI artifacts in a registry), kustomize and
 * kubectl (the deploy/kubernetes manifests). Debian builds them with cgo, so each is dynamically linked
 * and is patched onto sid's libc6 in the prefix; skopeo also needs gpgme and sqlite.
 */
import path from 'node:path';
import { componentBinary, isComponentProvisioned, provisionComponent, type ComponentSpec, type ComponentStamp } from './component.js';
import { DEFAULT_STACK_ROOT } from './paths.js';
import type { ProvisionCommonOptions } from './provision-options.js';

export const PEER_TOOLS_COMPONENT = 'peer-tools';

export const PEER_TOOLS_SPEC: ComponentSpec = {
  component: PEER_TOOLS_COMPONENT,
  suite: 'sid',
  pins: {
    cosign: '3.1.1-2',
    oras: '1.3.3-1',
    skopeo: '1.22.0+ds1-1',
    kustomize: '5.8.1+ds-1',
    kubectl: '1.36.4+ds-1',
    notation: '1.3.2-2',
    // skopeo's libraries (NEEDED of skopeo and libgpgme.so.45), and the libc every tool is patched onto.
    libgpgme45: '2.2.0-2',
    libassuan9: '3.0.2-2+b2',
    'libgpg-error0': '1.61-5',
    'libsqlite3-0': '3.53.4-2',
    libc6: '2.43-7',
  },
  binaries: {
    cosign: { file: 'usr/bin/cosign', checkArgs: ['version'] },
    oras: { file: 'usr/bin/oras', checkArgs: ['version'] },
    skopeo: { file: 'usr/bin/skopeo', checkArgs: ['--version'] },
    kustomize: { file: 'usr/bin/kustomize', checkArgs: ['version'] },
    kubectl: { file: 'usr/bin/kubectl', checkArgs: ['version', '--client'] },
    notation: { file: 'usr/bin/notation', checkArgs: ['version'] },
  },
  link: true,
};

export type PeerTool = 'cosign' | 'oras' | 'skopeo' | 'kustomize' | 'kubectl' | 'notation';

export interface PeerToolsPaths {
  prefix: string;
  /** One PATH entry holding every tool. */
  binDir: string;
  tools: Record<PeerTool, string>;
}

export function peerToolsPaths(root: string = DEFAULT_STACK_ROOT): PeerToolsPaths {
  const prefix = path.join(path.resolve(root), PEER_TOOLS_COMPONENT);
  const tools = Object.fromEntries(Object.keys(PEER_TOOLS_SPEC.binaries).map((n) => [n, componentBinary(PEER_TOOLS_SPEC, n, root)]));
  return { prefix, binDir: path.join(prefix, 'bin'), tools: tools as Record<PeerTool, string> };
}

export async function isPeerToolsProvisioned(root: string = DEFAULT_STACK_ROOT): Promise<ComponentStamp | undefined> {
  return isComponentProvisioned(PEER_TOOLS_SPEC, root);
}

/** Provisions `<root>/peer-tools` (see PEER_TOOLS_SPEC); returns at once when its stamp matches. */
export async function provisionPeerTools(options: ProvisionCommonOptions): Promise<{ paths: PeerToolsPaths; built: boolean; stamp: ComponentStamp }> {
  const r = await provisionComponent(PEER_TOOLS_SPEC, options);
  return { paths: peerToolsPaths(options.root ?? DEFAULT_STACK_ROOT), built: r.built, stamp: r.stamp };
}
