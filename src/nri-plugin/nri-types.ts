/**
 * Hand-written TypeScript shapes of the NRI messages thaw uses (proto/nri/api.proto). These are the plain
 * objects the codec produces and accepts: protobufjs camelCase field names (`runtime_name` →
 * `runtimeName`, `CDI_devices` → `CDIDevices`, `NRI_version` → `NRIVersion`).
 *
 * Decoded objects: scalars are absent when they hold the proto3 default (so `id?: string`), repeated fields
 * are always arrays and maps always objects. int64/uint64 are `number` (see ttrpc-codec.ts): all NRI int64s
 * (timeouts, byte limits, device numbers, timestamps) are far below 2^53.
 */

/** Event numbers (enum Event). The subscription mask bit of event e is 1 << (e - 1). */
export const NriEvent = {
  UNKNOWN: 0,
  RUN_POD_SANDBOX: 1,
  STOP_POD_SANDBOX: 2,
  REMOVE_POD_SANDBOX: 3,
  CREATE_CONTAINER: 4,
  POST_CREATE_CONTAINER: 5,
  START_CONTAINER: 6,
  POST_START_CONTAINER: 7,
  UPDATE_CONTAINER: 8,
  POST_UPDATE_CONTAINER: 9,
  STOP_CONTAINER: 10,
  REMOVE_CONTAINER: 11,
  UPDATE_POD_SANDBOX: 12,
  POST_UPDATE_POD_SANDBOX: 13,
  VALIDATE_CONTAINER_ADJUSTMENT: 14,
} as const;
export type NriEventValue = (typeof NriEvent)[keyof typeof NriEvent];

export const ContainerState = {
  UNKNOWN: 0,
  CREATED: 1,
  PAUSED: 2,
  RUNNING: 3,
  STOPPED: 4,
} as const;

export type StringMap = Record<string, string>;

export interface OptionalValue<T> {
  value?: T;
}

export interface LinuxNamespace {
  type?: string;
  path?: string;
}

export interface Mount {
  destination?: string;
  type?: string;
  source?: string;
  options?: string[];
}

export interface Hook {
  path?: string;
  args?: string[];
  env?: string[];
  /** seconds */
  timeout?: OptionalValue<number>;
}

export interface Hooks {
  prestart?: Hook[];
  createRuntime?: Hook[];
  createContainer?: Hook[];
  startContainer?: Hook[];
  poststart?: Hook[];
  poststop?: Hook[];
}

export interface LinuxDevice {
  path?: string;
  /** "c", "b", "u" or "p" */
  type?: string;
  major?: number;
  minor?: number;
  /** Go os.FileMode: permission bits only */
  fileMode?: OptionalValue<number>;
  uid?: OptionalValue<number>;
  gid?: OptionalValue<number>;
}

export interface LinuxMemory {
  limit?: OptionalValue<number>;
  reservation?: OptionalValue<number>;
  swap?: OptionalValue<number>;
  kernel?: OptionalValue<number>;
  kernelTcp?: OptionalValue<number>;
  swappiness?: OptionalValue<number>;
  disableOomKiller?: OptionalValue<boolean>;
  useHierarchy?: OptionalValue<boolean>;
}

export interface LinuxCPU {
  shares?: OptionalValue<number>;
  quota?: OptionalValue<number>;
  period?: OptionalValue<number>;
  realtimeRuntime?: OptionalValue<number>;
  realtimePeriod?: OptionalValue<number>;
  cpus?: string;
  mems?: string;
}

export interface LinuxResources {
  memory?: LinuxMemory;
  cpu?: LinuxCPU;
  hugepageLimits?: Array<{ pageSize?: string; limit?: number }>;
  blockioClass?: OptionalValue<string>;
  rdtClass?: OptionalValue<string>;
  unified?: StringMap;
  devices?: Array<{ allow?: boolean; type?: string; major?: OptionalValue<number>; minor?: OptionalValue<number>; access?: string }>;
  pids?: { limit?: number };
}

export interface LinuxPodSandbox {
  podOverhead?: LinuxResources;
  podResources?: LinuxResources;
  cgroupParent?: string;
  cgroupsPath?: string;
  namespaces?: LinuxNamespace[];
  resources?: LinuxResources;
}

export interface PodSandbox {
  id?: string;
  name?: string;
  uid?: string;
  namespace?: string;
  labels?: StringMap;
  annotations?: StringMap;
  runtimeHandler?: string;
  linux?: LinuxPodSandbox;
  pid?: number;
  /** v0.8 */
  ips?: string[];
}

export interface LinuxContainer {
  namespaces?: LinuxNamespace[];
  devices?: LinuxDevice[];
  resources?: LinuxResources;
  oomScoreAdj?: OptionalValue<number>;
  cgroupsPath?: string;
}

export interface POSIXRlimit {
  type?: string;
  hard?: number;
  soft?: number;
}

export interface Container {
  id?: string;
  podSandboxId?: string;
  name?: string;
  state?: number;
  labels?: StringMap;
  annotations?: StringMap;
  args?: string[];
  /** "KEY=VALUE" */
  env?: string[];
  mounts?: Mount[];
  hooks?: Hooks;
  linux?: LinuxContainer;
  pid?: number;
  rlimits?: POSIXRlimit[];
  /** v0.10+ (ns since the epoch) */
  createdAt?: number;
  startedAt?: number;
  finishedAt?: number;
  exitCode?: number;
  statusReason?: string;
  statusMessage?: string;
  /** v0.12 */
  image?: { name?: string; digest?: string; configDigest?: string };
}

export interface KeyValue {
  key: string;
  value: string;
}

export interface LinuxContainerAdjustment {
  devices?: LinuxDevice[];
  resources?: LinuxResources;
  cgroupsPath?: string;
  /** v0.7 */
  oomScoreAdj?: OptionalValue<number>;
}

/** What CreateContainer may change. There is no field 1 on the wire. */
export interface ContainerAdjustment {
  annotations?: StringMap;
  mounts?: Mount[];
  env?: KeyValue[];
  hooks?: Hooks;
  linux?: LinuxContainerAdjustment;
  rlimits?: POSIXRlimit[];
  /** v0.7 */
  CDIDevices?: Array<{ name: string }>;
  /** v0.10, field 9: honoured only by containerd ≥ 2.2.0; older runtimes drop it silently. */
  args?: string[];
}

export interface ContainerUpdate {
  containerId: string;
  linux?: { resources?: LinuxResources };
  ignoreFailure?: boolean;
}

export interface ContainerEviction {
  containerId: string;
  reason: string;
}

export interface ConfigureRequest {
  config?: string;
  runtimeName?: string;
  runtimeVersion?: string;
  /** v0.7, ms */
  registrationTimeout?: number;
  /** v0.7, ms */
  requestTimeout?: number;
  /** v0.12 */
  NRIVersion?: string;
}

export interface SynchronizeRequest {
  pods?: PodSandbox[];
  containers?: Container[];
  more?: boolean;
}

export interface PodContainerRequest {
  pod?: PodSandbox;
  container?: Container;
}

export interface UpdateContainerRequest extends PodContainerRequest {
  linuxResources?: LinuxResources;
}

export interface StateChangeEvent {
  event?: number;
  pod?: PodSandbox;
  container?: Container;
}

export interface CreateContainerResponse {
  adjust?: ContainerAdjustment;
  update?: ContainerUpdate[];
  evict?: ContainerEviction[];
}
