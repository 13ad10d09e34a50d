/**
 * The OCI registry the registry store's tests and bench:registry run against: Debian's `docker-registry`
 * (distribution 2.8) with libc6 from the same suite, unpacked into `<root>/registry` and patched like a
 * stack prefix (its own loader, DT_RPATH into the prefix), so it runs the same on Debian 12 and 13.
 */
import path from 'node:path';
import { isComponentProvisioned, provisionComponent, type ComponentSpec, type ComponentStamp } from './component.js';
import { DEFAULT_STACK_ROOT, STAMP_FILE } from './paths.js';
import type { ProvisionCommonOptions } from './provision-options.js';

export const REGISTRY_COMPONENT = 'registry';
export const REGISTRY_BINARY_SUBPATH = 'usr/bin/docker-registry';
export const REGISTRY_SPEC: ComponentSpec = {
  component: REGISTRY_COMPONENT,
  suite: 'trixie',
  pins: { 'docker-registry': '2.8.3+ds1-2+b8', libc6: '2.41-12+deb13u5' },
  binaries: { 'docker-registry': { file: REGISTRY_BINARY_SUBPATH, checkArgs: ['--version'] } },
  link: false,
};

export interface RegistryPaths {
  root: string;
  prefix: string;
  binary: string;
  stampFile: string;
}

export function registryPaths(root: string = DEFAULT_STACK_ROOT): RegistryPaths {
  const prefix = path.join(path.resolve(root), REGISTRY_COMPONENT);
  return { root: path.resolve(root), prefix, binary: path.join(prefix, REGISTRY_BINARY_SUBPATH), stampFile: path.join(prefix, STAMP_FILE) };
}

export interface RegistryStamp extends ComponentStamp {
  component: typeof REGISTRY_COMPONENT;
  /** First line of `docker-registry --version`. */
  version: string;
}

/** The registry's stamp when the prefix is complete and built from the current pins; else undefined. */
export async function isRegistryProvisioned(root: string = DEFAULT_STACK_ROOT): Promise<RegistryStamp | undefined> {
  return isComponentProvisioned<RegistryStamp>(REGISTRY_SPEC, root);
}

/** Provisions `<root>/registry` (see REGISTRY_SPEC); returns at once when its stamp matches. */
export async function provisionRegistry(options: ProvisionCommonOptions): Promise<{ paths: RegistryPaths; built: boolean; stamp: RegistryStamp }> {
  const r = await provisionComponent<RegistryStamp>(REGISTRY_SPEC, options,
    (versions) => ({ component: REGISTRY_COMPONENT, version: versions['docker-registry'] ?? '' }));
  return { paths: registryPaths(options.root ?? DEFAULT_STACK_ROOT), built: r.built, stamp: r.stamp };
}
