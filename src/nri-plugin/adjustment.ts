/**
 * A typed, validating builder for ContainerAdjustment — what a CreateContainer handler may change.
 *
 * Every add/remove validates at once and throws NRI_INVALID_ADJUSTMENT naming the bad value, so a policy
 * bug shows up where it is made, not as a runtime-side error that fails the pod. Semantics on the runtime
 * side (nri-protocol.md §4.5): env/annotations/mounts with an existing key/destination replace it; the
 * remove* calls send the "-" removal marker; hooks are appended to the spec's lists; devices also get a
 * device-cgroup allow rule.
 *
 * `setArgs` replaces the whole process argv but is honoured only by containerd ≥ 2.2.0: `build(runtime)`
 * leaves it out and says `argsApplied: false` on older runtimes, and the caller picks its fallback (thaw's:
 * a createRuntime hook).
 */
import { NriErrorCode, NriError } from './errors.js';
import type { ContainerAdjustment, Hook, Hooks, KeyValue, LinuxDevice, Mount, POSIXRlimit } from './nri-types.js';
import { supportsArgs, type RuntimeInfo } from './runtime-version.js';

export type HookStage = 'prestart' | 'createRuntime' | 'createContainer' | 'startContainer' | 'poststart' | 'poststop';
const HOOK_STAGES: readonly HookStage[] = ['prestart', 'createRuntime', 'createContainer', 'startContainer', 'poststart', 'poststop'];

export interface HookSpec {
  /** Absolute path of the executable (in the runtime's mount namespace, except startContainer). */
  path: string;
  /** Full argv, argv[0] included. */
  args?: string[];
  /** "KEY=VALUE" entries; empty = an empty environment. */
  env?: string[];
  /** Positive whole seconds; the runtime kills the hook after it. */
  timeoutSeconds?: number;
}

export interface MountSpec {
  destination: string;
  source: string;
  type?: string;
  options?: string[];
}

export interface DeviceSpec {
  path: string;
  type: 'c' | 'b' | 'u' | 'p';
  major: number;
  minor: number;
  /** permission bits (e.g. 0o666) */
  fileMode?: number;
  uid?: number;
  gid?: number;
}

export interface AdjustmentResult {
  adjustment: ContainerAdjustment;
  /** false when setArgs was called but the runtime does not honour args (or no runtime was given). */
  argsApplied: boolean;
  /** Human-readable notes on what was left out and why. */
  notes: string[];
}

const ENV_KEY = /^[A-Za-z_][A-Za-z0-9_]*$/;

function invalid(message: string, evidence: Record<string, unknown>): NriError {
  return new NriError(NriErrorCode.NRI_INVALID_ADJUSTMENT, message, { step: 'build container adjustment', evidence });
}

function assertAbsolute(what: string, path: string): void {
  if (typeof path !== 'string' || !path.startsWith('/') || path.includes('\0')) {
    throw invalid(`${what} must be an absolute path, got ${JSON.stringify(path)}`, { what, path });
  }
}

function assertNoNul(what: string, value: string): void {
  if (typeof value !== 'string' || value.includes('\0')) throw invalid(`${what} must be a string without NUL bytes`, { what });
}

export class AdjustmentBuilder {
  private readonly annotations: Record<string, string> = {};
  private readonly mounts: Mount[] = [];
  private readonly env: KeyValue[] = [];
  private readonly hooks: Required<Hooks> = {
    prestart: [],
    createRuntime: [],
    createContainer: [],
    startContainer: [],
    poststart: [],
    poststop: [],
  };
  private readonly devices: LinuxDevice[] = [];
  private readonly rlimits: POSIXRlimit[] = [];
  private readonly cdiDevices: Array<{ name: string }> = [];
  private args: string[] | undefined;

  /** Sets (or replaces) an environment variable. */
  addEnv(key: string, value: string): this {
    if (!ENV_KEY.test(key)) throw invalid(`env key ${JSON.stringify(key)} must match ${ENV_KEY.source}`, { key });
    assertNoNul(`env ${key} value`, value);
    this.env.push({ key, value });
    return this;
  }

  /** Removes an environment variable from the container. */
  removeEnv(key: string): this {
    if (!ENV_KEY.test(key)) throw invalid(`env key ${JSON.stringify(key)} must match ${ENV_KEY.source}`, { key });
    this.env.push({ key: `-${key}`, value: '' });
    return this;
  }

  /** Adds (or replaces, by destination) a mount. A bind mount's source must be absolute. */
  addMount(mount: MountSpec): this {
    assertAbsolute('mount destination', mount.destination);
    const type = mount.type ?? 'bind';
    const options = mount.options ?? (type === 'bind' ? ['rbind', 'ro'] : []);
    const isBind = type === 'bind' || options.includes('bind') || options.includes('rbind');
    if (isBind) assertAbsolute('bind mount source', mount.source);
    else assertNoNul('mount source', mount.source);
    options.forEach((o) => assertNoNul('mount option', o));
    this.mounts.push({ destination: mount.destination, type, source: mount.source, options: [...options] });
    return this;
  }

  /** Removes the container's mount at `destination`. */
  removeMount(destination: string): this {
    assertAbsolute('mount destination', destination);
    this.mounts.push({ destination: `-${destination}` });
    return this;
  }

  addAnnotation(key: string, value: string): this {
    if (!key || key.startsWith('-')) throw invalid(`annotation key ${JSON.stringify(key)} must be non-empty and not start with "-"`, { key });
    assertNoNul(`annotation ${key} value`, value);
    this.annotations[key] = value;
    return this;
  }

  removeAnnotation(key: string): this {
    if (!key || key.startsWith('-')) throw invalid(`annotation key ${JSON.stringify(key)} must be non-empty and not start with "-"`, { key });
    this.annotations[`-${key}`] = '';
    return this;
  }

  /** Appends an OCI hook to the given stage. */
  addHook(stage: HookStage, hook: HookSpec): this {
    if (!HOOK_STAGES.includes(stage)) throw invalid(`unknown hook stage ${JSON.stringify(stage)}`, { stage });
    assertAbsolute('hook path', hook.path);
    (hook.args ?? []).forEach((a) => assertNoNul('hook arg', a));
    for (const e of hook.env ?? []) {
      const eq = e.indexOf('=');
      if (eq <= 0 || !ENV_KEY.test(e.slice(0, eq))) throw invalid(`hook env entry ${JSON.stringify(e)} must be KEY=VALUE`, { entry: e });
    }
    const out: Hook = { path: hook.path, args: [...(hook.args ?? [hook.path])], env: [...(hook.env ?? [])] };
    if (hook.timeoutSeconds !== undefined) {
      if (!Number.isInteger(hook.timeoutSeconds) || hook.timeoutSeconds <= 0) {
        throw invalid(`hook timeoutSeconds must be a positive integer, got ${hook.timeoutSeconds}`, { timeoutSeconds: hook.timeoutSeconds });
      }
      out.timeout = { value: hook.timeoutSeconds };
    }
    this.hooks[stage].push(out);
    return this;
  }

  addDevice(device: DeviceSpec): this {
    assertAbsolute('device path', device.path);
    if (!['c', 'b', 'u', 'p'].includes(device.type)) throw invalid(`device type must be c, b, u or p, got ${JSON.stringify(device.type)}`, { type: device.type });
    for (const [k, v] of [['major', device.major], ['minor', device.minor]] as const) {
      if (!Number.isInteger(v) || v < 0) throw invalid(`device ${k} must be a non-negative integer, got ${v}`, { [k]: v });
    }
    const d: LinuxDevice = { path: device.path, type: device.type, major: device.major, minor: device.minor };
    if (device.fileMode !== undefined) {
      if (!Number.isInteger(device.fileMode) || device.fileMode < 0 || device.fileMode > 0o777) {
        throw invalid(`device fileMode must hold permission bits only (0..0o777), got ${device.fileMode}`, { fileMode: device.fileMode });
      }
      d.fileMode = { value: device.fileMode };
    }
    if (device.uid !== undefined) d.uid = { value: device.uid };
    if (device.gid !== undefined) d.gid = { value: device.gid };
    this.devices.push(d);
    return this;
  }

  removeDevice(path: string): this {
    assertAbsolute('device path', path);
    this.devices.push({ path: `-${path}` });
    return this;
  }

  addRlimit(type: string, soft: number, hard: number): this {
    if (!/^RLIMIT_[A-Z]+$/.test(type)) throw invalid(`rlimit type must look like RLIMIT_NOFILE, got ${JSON.stringify(type)}`, { type });
    this.rlimits.push({ type, soft, hard });
    return this;
  }

  addCdiDevice(name: string): this {
    if (!/^[^=]+\/[^=]+=.+$/.test(name)) throw invalid(`CDI device name must be vendor/class=name, got ${JSON.stringify(name)}`, { name });
    this.cdiDevices.push({ name });
    return this;
  }

  /** Replaces the container's whole argv (containerd ≥ 2.2.0 only; see build()). args[0] must be absolute. */
  setArgs(args: string[]): this {
    if (args.length === 0) throw invalid('args must not be empty', {});
    assertAbsolute('args[0]', args[0] as string);
    args.forEach((a) => assertNoNul('arg', a));
    this.args = [...args];
    return this;
  }

  /** True when nothing was added. */
  get isEmpty(): boolean {
    return Object.keys(this.build().adjustment).length === 0 && this.args === undefined;
  }

  /**
   * The adjustment to return from CreateContainer. With `runtime`, args are included only if the runtime
   * honours them; without it, args are left out (argsApplied false) — pass the runtime from the handler
   * context.
   */
  build(runtime?: RuntimeInfo): AdjustmentResult {
    const adjustment: ContainerAdjustment = {};
    const notes: string[] = [];
    if (Object.keys(this.annotations).length > 0) adjustment.annotations = { ...this.annotations };
    if (this.mounts.length > 0) adjustment.mounts = this.mounts.map((m) => ({ ...m }));
    if (this.env.length > 0) adjustment.env = this.env.map((e) => ({ ...e }));
    const hooks: Hooks = {};
    for (const stage of HOOK_STAGES) if (this.hooks[stage].length > 0) hooks[stage] = this.hooks[stage].map((h) => ({ ...h }));
    if (Object.keys(hooks).length > 0) adjustment.hooks = hooks;
    if (this.devices.length > 0) adjustment.linux = { devices: this.devices.map((d) => ({ ...d })) };
    if (this.rlimits.length > 0) adjustment.rlimits = this.rlimits.map((r) => ({ ...r }));
    if (this.cdiDevices.length > 0) adjustment.CDIDevices = this.cdiDevices.map((c) => ({ ...c }));
    let argsApplied = false;
    if (this.args !== undefined) {
      if (runtime && supportsArgs(runtime.name, runtime.version, runtime.nriVersion)) {
        adjustment.args = [...this.args];
        argsApplied = true;
      } else {
        notes.push(
          runtime
            ? `args not applied: ${runtime.name} ${runtime.version} does not honour ContainerAdjustment.args (needs containerd >= 2.2.0)`
            : 'args not applied: no runtime given to build()',
        );
      }
    }
    return { adjustment, argsApplied, notes };
  }
}
