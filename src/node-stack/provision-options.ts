/** What every provisioner (stack flavors, the registry, the peer tools) takes, and its one set of defaults. */
import type { Logger } from '../log.js';

/**
 * Bumped whenever what a prefix holds or how it is patched changes: a stamp of another format makes
 * the next run rebuild the prefix.
 */
export const PROVISION_FORMAT_VERSION = 3;

export const DEFAULT_PROVISION_COMMAND_TIMEOUT_MS = 300_000;
export const DEFAULT_PROVISION_LOCK_TIMEOUT_MS = 15 * 60_000;

export interface ProvisionCommonOptions {
  /** Default /opt/thaw/stack. */
  root?: string;
  logger?: Logger;
  signal?: AbortSignal;
  /** Rebuild even when the stamp matches. */
  force?: boolean;
  /** Limit of each apt-get/dpkg/patchelf/check command; default 300 s. */
  commandTimeoutMs?: number;
  /** How long to wait for another provisioner of the same prefix; default 15 min. */
  lockTimeoutMs?: number;
  /** The machine's apt sources, read for their URIs; default debian.sources, then sources.list. */
  hostSourcesPaths?: string[];
}
