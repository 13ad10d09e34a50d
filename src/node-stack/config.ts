import type { StackFlavor } from './paths.js';

/** Everything the containerd config of a private stack depends on. */
export interface ContainerdConfigInput {
  flavor: StackFlavor;
  /** containerd's persistent root (content store, snapshots, metadata). */
  root: string;
  /** containerd's state dir (sockets of shims, task bundles). */
  state: string;
  grpcAddress: string;
  ttrpcAddress: string;
  /** The `io.containerd.internal.v1.opt` plugin's dir (it would create /opt/containerd otherwise). */
  optDir: string;
  /** runc's state root for this stack's containers (not the machine-wide /run/containerd/runc). */
  runcRoot: string;
  runcBinary: string;
  nriSocketPath: string;
  nriPluginDir: string;
  nriPluginConfigDir: string;
  nriRequestTimeoutMs: number;
  nriRegistrationTimeoutMs: number;
  sandboxImage: string;
  cniBinDir: string;
  cniConfDir: string;
  /** containerd's log level; default info. */
  logLevel?: 'debug' | 'info' | 'warn';
}

/** A TOML basic string (JSON's escaping is a subset TOML accepts). */
function s(value: string): string {
  return JSON.stringify(value);
}

/** A Go duration string: containerd parses "1500ms". */
export function goDuration(ms: number): string {
  if (!Number.isFinite(ms) || ms < 0) throw new RangeError(`duration must be a non-negative number of ms, got ${ms}`);
  return `${Math.round(ms)}ms`;
}

/**
 * Renders the config.toml of a private containerd. 1.7 needs `version = 2` (a version-1 file ignores
 * the NRI section's plugin id) and NRI switched on; 2.x uses `version = 3` with the split CRI plugins.
 * Both: `restrict_oom_score_adj` (these machines lack CAP_SYS_RESOURCE, so runc cannot lower
 * oom_score_adj to containerd's -998), our local pause image as the sandbox image, the CRI stream
 * server on a random loopback port (several stacks may run at once), runc with a private root. Pure.
 */
export function renderContainerdConfig(c: ContainerdConfigInput): string {
  const common = [
    `root = ${s(c.root)}`,
    `state = ${s(c.state)}`,
    '',
    '[grpc]',
    `  address = ${s(c.grpcAddress)}`,
    '',
    '[ttrpc]',
    `  address = ${s(c.ttrpcAddress)}`,
    '',
    '[debug]',
    `  level = ${s(c.logLevel ?? 'info')}`,
    '',
  ];
  const nri = (key: string) => [
    `[plugins.${key}]`,
    '  disable = false',
    '  disable_connections = false',
    `  socket_path = ${s(c.nriSocketPath)}`,
    `  plugin_path = ${s(c.nriPluginDir)}`,
    `  plugin_config_path = ${s(c.nriPluginConfigDir)}`,
    `  plugin_registration_timeout = ${s(goDuration(c.nriRegistrationTimeoutMs))}`,
    `  plugin_request_timeout = ${s(goDuration(c.nriRequestTimeoutMs))}`,
    '',
  ];
  const runcOptions = (table: string) => [
    `[${table}.containerd]`,
    '  default_runtime_name = "runc"',
    '',
    `[${table}.containerd.runtimes.runc]`,
    '  runtime_type = "io.containerd.runc.v2"',
    '',
    `[${table}.containerd.runtimes.runc.options]`,
    `  BinaryName = ${s(c.runcBinary)}`,
    `  Root = ${s(c.runcRoot)}`,
    '  SystemdCgroup = false',
    '',
  ];
  if (c.flavor === '1.7') {
    const cri = '"io.containerd.grpc.v1.cri"';
    return [
      'version = 2',
      ...common,
      ...nri('"io.containerd.nri.v1.nri"'),
      `[plugins.${cri}]`,
      `  sandbox_image = ${s(c.sandboxImage)}`,
      '  restrict_oom_score_adj = true',
      '  stream_server_address = "127.0.0.1"',
      '  stream_server_port = "0"',
      '  enable_selinux = false',
      // Pod network namespaces under our state dir, so that a crashed stack's are unmounted with it.
      '  netns_mounts_under_state_dir = true',
      '',
      `[plugins.${cri}.containerd]`,
      '  snapshotter = "overlayfs"',
      '  default_runtime_name = "runc"',
      '',
      `[plugins.${cri}.containerd.runtimes.runc]`,
      '  runtime_type = "io.containerd.runc.v2"',
      '',
      `[plugins.${cri}.containerd.runtimes.runc.options]`,
      `  BinaryName = ${s(c.runcBinary)}`,
      `  Root = ${s(c.runcRoot)}`,
      '  SystemdCgroup = false',
      '',
      `[plugins.${cri}.cni]`,
      `  bin_dir = ${s(c.cniBinDir)}`,
      `  conf_dir = ${s(c.cniConfDir)}`,
      '',
      '[plugins."io.containerd.internal.v1.opt"]',
      `  path = ${s(c.optDir)}`,
      '',
    ].join('\n');
  }
  const runtime = "plugins.'io.containerd.cri.v1.runtime'";
  return [
    'version = 3',
    ...common,
    ...nri("'io.containerd.nri.v1.nri'"),
    "[plugins.'io.containerd.cri.v1.images']",
    '  snapshotter = "overlayfs"',
    '',
    "[plugins.'io.containerd.cri.v1.images'.pinned_images]",
    `  sandbox = ${s(c.sandboxImage)}`,
    '',
    `[${runtime}]`,
    '  restrict_oom_score_adj = true',
    '  enable_selinux = false',
    '  netns_mounts_under_state_dir = true',
    '',
    ...runcOptions(runtime),
    `[${runtime}.cni]`,
    `  bin_dirs = [${s(c.cniBinDir)}]`,
    `  conf_dir = ${s(c.cniConfDir)}`,
    '',
    "[plugins.'io.containerd.grpc.v1.cri']",
    '  stream_server_address = "127.0.0.1"',
    '  stream_server_port = "0"',
    '',
    "[plugins.'io.containerd.internal.v1.opt']",
    `  path = ${s(c.optDir)}`,
    '',
  ].join('\n');
}

export interface CniNetworkInput {
  /** Network name (unique per stack). */
  name: string;
  /** Linux bridge name, at most 15 bytes. */
  bridge: string;
  /** An IPv4 /24 like 10.213.7.0/24. */
  subnet: string;
  /** host-local IPAM's state dir (inside the stack dir, so it goes with it). */
  ipamDataDir: string;
}

/**
 * The CNI network of pods that do not use the host network: a bridge with no address on the host
 * (isGateway false), no masquerading and no default route in the pod, so nothing routes off the
 * machine; pods get an address on eth0 (containerd insists on one) and their own loopback. Pure.
 */
export function renderCniConflist(n: CniNetworkInput): string {
  if (Buffer.byteLength(n.bridge) > 15) throw new RangeError(`bridge name ${n.bridge} is longer than 15 bytes`);
  return `${JSON.stringify({
    cniVersion: '1.0.0',
    name: n.name,
    plugins: [
      {
        type: 'bridge',
        bridge: n.bridge,
        isGateway: false,
        isDefaultGateway: false,
        ipMasq: false,
        hairpinMode: false,
        ipam: { type: 'host-local', ranges: [[{ subnet: n.subnet }]], dataDir: n.ipamDataDir },
      },
    ],
  }, null, 2)}\n`;
}

/** A per-stack /24 in 10.200.0.0/13..10.249.255.0, picked from the stack dir's name (stable for a dir). Pure. */
export function podSubnetFor(stackDirName: string): string {
  let h = 2166136261;
  for (const ch of Buffer.from(stackDirName)) h = Math.imul(h ^ ch, 16777619) >>> 0;
  return `10.${200 + (h % 50)}.${(h >>> 8) % 256}.0/24`;
}
