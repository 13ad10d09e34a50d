/**
 * What a runtime supports, decided from ConfigureRequest's runtime_name/runtime_version (and NRI_version,
 * which v0.12+ runtimes send). Pure.
 *
 * containerd → NRI: ≤ 2.1.x vendor NRI ≤ v0.8 (ValidEvents 0x7FF, no args adjustment); 2.2.0 vendors v0.10
 * (0x3FFF, args honoured). containerd 2.0.0–2.0.3 report runtime_name "v2" — all of them < 2.2.
 * Unknown runtimes (CRI-O, ...) get the conservative answer.
 */

/** ValidEvents of NRI ≤ v0.9 (LAST = 12): events 1..11. */
export const VALID_EVENTS_NRI_0_9 = 0x7ff;
/** ValidEvents of NRI ≥ v0.10 (LAST = 15): events 1..14. */
export const VALID_EVENTS_NRI_0_10 = 0x3fff;

export interface RuntimeInfo {
  name: string;
  version: string;
  /** v0.12+ runtimes only */
  nriVersion?: string;
}

/** [major, minor, patch] from "v1.7.24", "1.7.24~ds1-6", "2.2.0-rc.1"; undefined when unparsable. */
export function parseVersion(version: string): [number, number, number] | undefined {
  const m = /^v?(\d+)\.(\d+)(?:\.(\d+))?/.exec(version.trim());
  if (!m) return undefined;
  return [Number(m[1]), Number(m[2]), Number(m[3] ?? 0)];
}

function atLeast(v: [number, number, number] | undefined, want: [number, number, number]): boolean {
  if (!v) return false;
  for (let i = 0; i < 3; i++) {
    if ((v[i] as number) !== want[i]) return (v[i] as number) > (want[i] as number);
  }
  return true;
}

/** The NRI API level the runtime speaks, as [major, minor, patch] of NRI, when it can be told. */
function nriLevel(runtime: RuntimeInfo): 'pre-0.10' | '0.10+' {
  if (runtime.nriVersion) return atLeast(parseVersion(runtime.nriVersion), [0, 10, 0]) ? '0.10+' : 'pre-0.10';
  if (runtime.name === 'containerd' && atLeast(parseVersion(runtime.version), [2, 2, 0])) return '0.10+';
  return 'pre-0.10';
}

/** The event mask the runtime accepts; a subscription with any other bit makes it close the plugin. */
export function validEventsFor(runtime: RuntimeInfo): number {
  return nriLevel(runtime) === '0.10+' ? VALID_EVENTS_NRI_0_10 : VALID_EVENTS_NRI_0_9;
}

/**
 * Whether ContainerAdjustment.args (field 9) is honoured: containerd ≥ 2.2.0 (NRI v0.10). containerd 1.7.x,
 * 2.0 and 2.1 drop the field silently, so the process is NOT replaced there.
 */
export function supportsArgs(runtimeName: string, runtimeVersion: string, nriVersion?: string): boolean {
  return nriLevel({ name: runtimeName, version: runtimeVersion, ...(nriVersion ? { nriVersion } : {}) }) === '0.10+';
}
