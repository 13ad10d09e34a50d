/**
 * The command line: which command, its positionals and options (node:util parseArgs, strict), and the help
 * of every command. Pure: `parseCommandLine` returns a result or throws UsageError (exit code 2).
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { configFlagOptions, CONFIG_KEYS, DEFAULT_CONFIG_PATH, flagNameOf } from '../agent/index.js';
import { DEFAULT_API_SOCKET } from '../defaults.js';
import { DEFAULT_NAMESPACE } from '../checkpoint-name.js';

export class UsageError extends Error {
  constructor(message: string, readonly command?: string) {
    super(message);
    this.name = 'UsageError';
  }
}

type Options = NonNullable<ParseArgsConfig['options']>;

interface CommandSpec {
  summary: string;
  usage: string;
  positionals: { min: number; max: number };
  options: Options;
  /** Lines describing the options, after the usage line. */
  details: string[];
}

const COMMON: Options = { help: { type: 'boolean', short: 'h' }, json: { type: 'boolean' } };
const SOCKET: Options = { socket: { type: 'string' } };
const SOCKET_HELP = `  --socket PATH       the agent's API socket (default $THAW_API_SOCKET or ${DEFAULT_API_SOCKET})`;
const JSON_HELP = '  --json              machine-readable output (one JSON document on stdout)';
const NAMESPACE: Options = { namespace: { type: 'string', short: 'n' } };
const NAMESPACE_HELP = `  -n, --namespace NS  the namespace a bare checkpoint name is in (default ${DEFAULT_NAMESPACE}); names are namespace/name`;

/** push/pull work on the node's store directly (as root), with the agent's configuration for its paths and registry access. */
const REGISTRY_OPTIONS = { config: { type: 'string' }, 'registry-config': { type: 'string' }, 'plain-http': { type: 'boolean' }, 'paths-store-root': { type: 'string' } } as const;
const REGISTRY_HELP = [
  `  --config FILE            the agent's configuration (default ${DEFAULT_CONFIG_PATH} when it exists): paths.storeRoot, registry.config`,
  '  --registry-config FILE   the registry access file (JSON: plainHttp, caFile, credentialsFile per host); overrides registry.config',
  '  --plain-http             speak HTTP, not HTTPS, to the registry (a loopback or test registry)',
  '  --paths-store-root DIR   the store (default paths.storeRoot)',
];

export const COMMANDS: Record<string, CommandSpec> = {
  agent: {
    summary: 'run the node agent (NRI plugin, restore engine, store, control API, /metrics)',
    usage: 'thaw agent [--config FILE] [--<key> VALUE ...]',
    positionals: { min: 0, max: 0 },
    options: { help: { type: 'boolean', short: 'h' }, config: { type: 'string' }, ...configFlagOptions() },
    details: [
      `  --config FILE       YAML configuration (default ${DEFAULT_CONFIG_PATH} when it exists)`,
      '  Every configuration key is also a flag and an environment variable (flag > env > file > default):',
      ...CONFIG_KEYS.map((k) => `  --${flagNameOf(k.key).padEnd(22)} ${k.key}: ${k.expected}`),
      '  Stops cleanly on SIGTERM/SIGINT (exit 0).',
    ],
  },
  checkpoint: {
    summary: 'checkpoint a running container now (progress on stderr)',
    usage: 'thaw checkpoint <container-id | namespace/pod> [--name [NAMESPACE/]NAME] [--container NAME] [--replace]',
    positionals: { min: 1, max: 1 },
    options: { ...COMMON, ...SOCKET, ...NAMESPACE, name: { type: 'string' }, container: { type: 'string' }, replace: { type: 'boolean' } },
    details: [
      '  --name NAME         the checkpoint name (default: a checkpoint-source pod\'s annotation); it is stored in the',
      '                      pod\'s namespace (a namespace/name or --namespace naming another is refused)',
      '  -n, --namespace NS  the namespace of a bare --name (default: the pod\'s)',
      '  --container NAME    which container of the pod',
      '  --replace           replace a checkpoint of the same name',
      SOCKET_HELP,
      JSON_HELP,
    ],
  },
  list: {
    summary: 'list the checkpoints in the node\'s store (namespace/name; pulled ones as oci-<digest>)',
    usage: 'thaw list [--namespace NS]',
    positionals: { min: 0, max: 0 },
    options: { ...COMMON, ...SOCKET, ...NAMESPACE },
    details: ['  -n, --namespace NS  only that namespace\'s checkpoints (default: every namespace\'s, and the pulled ones)', SOCKET_HELP, JSON_HELP],
  },
  inspect: {
    summary: 'show a checkpoint: manifest, sizes, compatibility with this node',
    usage: 'thaw inspect <[namespace/]checkpoint | oci-<digest>> [--namespace NS]',
    positionals: { min: 1, max: 1 },
    options: { ...COMMON, ...SOCKET, ...NAMESPACE },
    details: [NAMESPACE_HELP, SOCKET_HELP, JSON_HELP],
  },
  delete: {
    summary: 'delete a checkpoint (refused, exit 5, while a restore uses it)',
    usage: 'thaw delete <[namespace/]checkpoint | oci-<digest>> [--namespace NS]',
    positionals: { min: 1, max: 1 },
    options: { ...COMMON, ...SOCKET, ...NAMESPACE },
    details: [NAMESPACE_HELP, SOCKET_HELP, JSON_HELP],
  },
  gc: {
    summary: 'collect the least recently used checkpoints no restore uses until the store\'s quotas and free space hold',
    usage: 'thaw gc [--dry-run]',
    positionals: { min: 0, max: 0 },
    options: { ...COMMON, ...SOCKET, 'dry-run': { type: 'boolean' } },
    details: [
      '  --dry-run           list what would be collected; delete nothing',
      '  Also removes the file cache\'s entries no checkpoint links. Bounds: store.quotaBytes, store.namespaceQuotaBytes,',
      '  tenancy.namespaces.<ns>.quotaBytes, store.minFreeBytes (agent configuration).',
      SOCKET_HELP,
      JSON_HELP,
    ],
  },
  'clear-failure': {
    summary: 'let pods restore from a checkpoint again after a restore of it failed on this node',
    usage: 'thaw clear-failure <[namespace/]checkpoint | oci-<digest>> [--namespace NS]',
    positionals: { min: 1, max: 1 },
    options: { ...COMMON, ...SOCKET, ...NAMESPACE },
    details: [
      NAMESPACE_HELP,
      '  A restore that failed because of the checkpoint (CRIU, its credentials, its rootfs diff) marks it: pods naming',
      '  it cold-start (RESTORE_CHECKPOINT_FAILED_BEFORE) until it is replaced or this clears the mark (thaw list shows it).',
      SOCKET_HELP,
      JSON_HELP,
    ],
  },
  status: { summary: 'the agent, and the restores and checkpoints in flight', usage: 'thaw status', positionals: { min: 0, max: 0 }, options: { ...COMMON, ...SOCKET }, details: [SOCKET_HELP, JSON_HELP] },
  doctor: {
    summary: 'check this node for what thaw needs; each line says how to fix it',
    usage: 'thaw doctor [--config FILE] [--<key> VALUE ...] [--containerd PATH] [--require-gpu]',
    positionals: { min: 0, max: 0 },
    options: { ...COMMON, ...SOCKET, config: { type: 'string' }, containerd: { type: 'string' }, 'require-gpu': { type: 'boolean' }, ...configFlagOptions() },
    details: [
      '  Reads the agent\'s configuration (file, environment, flags) for the paths it checks.',
      '  --containerd PATH   the containerd binary (default: containerd on PATH)',
      '  --require-gpu       a node without a GPU driver fails (default: a warning)',
      SOCKET_HELP,
      JSON_HELP,
      '  Exit code 1 when any check fails.',
    ],
  },
  push: {
    summary: 'push a checkpoint of this node\'s store to an OCI registry (progress on stderr)',
    usage: 'thaw push <[namespace/]checkpoint> <registry/repository:tag> [--namespace NS] [--with-weights [--weights-dir DIR ...]] [--sign-key FILE] [--config FILE] [--registry-config FILE] [--plain-http]',
    positionals: { min: 2, max: 2 },
    options: { ...COMMON, ...REGISTRY_OPTIONS, ...NAMESPACE, 'with-weights': { type: 'boolean' }, 'weights-dir': { type: 'string', multiple: true }, 'sign-key': { type: 'string' } },
    details: [
      NAMESPACE_HELP,
      ...REGISTRY_HELP,
      '  --with-weights           also push each weights source of the checkpoint as a layer (docs/weights.md), for nodes',
      '                           that do not have the model: read from the store\'s weights cache or found under weights.modelDirs',
      '  --weights-dir DIR        another host directory to find weights sources under (repeatable)',
      '  --sign-key FILE          sign the pushed manifest (cosign\'s sha256-<hex>.sig tag scheme) with this PEM ECDSA P-256',
      '                           private key (unencrypted, owned by you, mode 0600; docs/security.md "Signing")',
      JSON_HELP,
      '  Prints the reference pinned to the pushed manifest (registry/repository:tag@sha256:...).',
    ],
  },
  pull: {
    summary: 'pull a checkpoint from an OCI registry into this node\'s store (progress on stderr)',
    usage: 'thaw pull <registry/repository:tag[@sha256:...]> [--config FILE] [--registry-config FILE] [--plain-http]',
    positionals: { min: 1, max: 1 },
    options: { ...COMMON, ...REGISTRY_OPTIONS },
    details: [...REGISTRY_HELP, JSON_HELP, '  The checkpoint is stored as oci-<digest> (what a pod naming the reference restores from); a second pull transfers nothing.'],
  },
  install: {
    summary: 'lay thaw down into an image root (binaries, toolkit, containerd drop-in, systemd unit)',
    usage: 'thaw install --root DIR [--force]',
    positionals: { min: 0, max: 0 },
    options: { ...COMMON, root: { type: 'string' }, force: { type: 'boolean' }, 'toolkit-dir': { type: 'string' } },
    details: ['  --root DIR          the image root to install into', '  --force             replace an install of other content (the operator\'s agent.yaml is kept)', '  --toolkit-dir DIR   the toolkit to copy (default: the installed one, or /opt/thaw/stack/1.7 from a checkout)'],
  },
};

export function topLevelHelp(): string {
  const width = Math.max(...Object.keys(COMMANDS).map((c) => c.length));
  return [
    'thaw: checkpoint and restore GPU inference workers on a containerd node',
    '',
    'usage: thaw <command> [options]   (thaw <command> --help for its options)',
    '',
    ...Object.entries(COMMANDS).map(([name, c]) => `  ${name.padEnd(width)}  ${c.summary}`),
    '',
    'exit codes: 0 ok, 1 failed, 2 usage or configuration error, 3 agent unreachable, 4 not found, 5 refused (in use)',
  ].join('\n');
}

export function commandHelp(command: string): string {
  const c = COMMANDS[command]!;
  return [`usage: ${c.usage}`, '', c.summary, '', ...c.details].join('\n');
}

export interface CommandLine {
  command: string;
  positionals: string[];
  values: Record<string, string | boolean | undefined>;
  help: boolean;
}

/** argv without node and the script. `thaw`, `thaw --help` and `thaw help` are help. */
export function parseCommandLine(argv: readonly string[]): CommandLine {
  const [first, ...rest] = argv;
  if (first === undefined || first === '--help' || first === '-h' || first === 'help') {
    if (first === 'help' && rest[0] !== undefined && COMMANDS[rest[0]]) return { command: rest[0], positionals: [], values: {}, help: true };
    return { command: '', positionals: [], values: {}, help: true };
  }
  const spec = COMMANDS[first];
  if (!spec) throw new UsageError(`unknown command ${JSON.stringify(first)} (commands: ${Object.keys(COMMANDS).join(', ')})`);
  let parsed: { values: Record<string, string | boolean | undefined>; positionals: string[] };
  try {
    parsed = parseArgs({ args: [...rest], options: spec.options, strict: true, allowPositionals: true }) as typeof parsed;
  } catch (err) {
    throw new UsageError((err as Error).message.replace(/\. To specify a positional.*$/s, ''), first);
  }
  if (parsed.values['help'] === true) return { command: first, positionals: parsed.positionals, values: parsed.values, help: true };
  const n = parsed.positionals.length;
  if (n < spec.positionals.min) throw new UsageError(`missing argument: ${spec.usage}`, first);
  if (n > spec.positionals.max) throw new UsageError(`unexpected argument ${JSON.stringify(parsed.positionals[spec.positionals.max])}: ${spec.usage}`, first);
  return { command: first, positionals: parsed.positionals, values: parsed.values, help: false };
}

/** `namespace/name` → a pod; anything else → a container id (or prefix). */
export function parseTarget(text: string): { pod: { namespace: string; name: string } } | { containerId: string } {
  const slash = text.indexOf('/');
  if (slash < 0) return { containerId: text };
  const namespace = text.slice(0, slash);
  const name = text.slice(slash + 1);
  if (!namespace || !name || name.includes('/')) throw new UsageError(`${JSON.stringify(text)} is neither a container id nor namespace/pod`, 'checkpoint');
  return { pod: { namespace, name } };
}

/** The API socket: --socket, else THAW_API_SOCKET (the config key api.socket's variable), else the default. */
export function apiSocketOf(values: Record<string, string | boolean | undefined>, env: Readonly<Record<string, string | undefined>>): string {
  const flag = values['socket'];
  return typeof flag === 'string' ? flag : env['THAW_API_SOCKET'] ?? DEFAULT_API_SOCKET;
}
