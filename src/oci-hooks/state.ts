/**
 * The two inputs of an OCI hook, parsed without touching anything: the state JSON on stdin
 * (runtime-spec runtime.md "State") and the bundle's config.json (only the fields the hooks need).
 */
import { isAbsolute, resolve } from 'node:path';
import { HookError, HookErrorCode } from './errors.js';

export type OciStatus = 'creating' | 'created' | 'running' | 'stopped';
const STATUSES: readonly OciStatus[] = ['creating', 'created', 'running', 'stopped'];

export interface OciState {
  ociVersion: string;
  id: string;
  status: OciStatus;
  /** The container's init as the runtime sees it; absent once stopped. */
  pid?: number;
  bundle: string;
  annotations: Record<string, string>;
}

export interface OciConfigView {
  /** Absolute rootfs path (root.path resolved against the bundle). */
  rootfs: string;
  args: string[];
  env: string[];
  /** process.cwd, default '/'. */
  cwd: string;
  annotations: Record<string, string>;
}

function invalid(code: HookErrorCode, step: string, message: string, evidence: Record<string, unknown> = {}): HookError {
  return new HookError(code, message, { step, evidence });
}

function stringMap(value: unknown, what: string, code: HookErrorCode, step: string): Record<string, string> {
  if (value === undefined || value === null) return {};
  if (typeof value !== 'object' || Array.isArray(value)) throw invalid(code, step, `${what} must be an object of strings`);
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
    if (typeof v !== 'string') throw invalid(code, step, `${what}.${k} must be a string`);
    out[k] = v;
  }
  return out;
}

/** Parses the OCI state a runtime writes on a hook's stdin. HOOK_STATE_INVALID with the field at fault. */
export function parseOciState(text: string): OciState {
  const step = 'parse OCI state';
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new HookError(HookErrorCode.STATE_INVALID, `stdin is not JSON: ${(err as Error).message}`, { step, cause: err, evidence: { head: text.slice(0, 200) } });
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw invalid(HookErrorCode.STATE_INVALID, step, 'the state must be a JSON object');
  const v = value as Record<string, unknown>;
  for (const field of ['ociVersion', 'id', 'bundle'] as const) {
    if (typeof v[field] !== 'string' || v[field] === '') throw invalid(HookErrorCode.STATE_INVALID, step, `${field} must be a non-empty string`);
  }
  if (!STATUSES.includes(v.status as OciStatus)) throw invalid(HookErrorCode.STATE_INVALID, step, `status must be one of ${STATUSES.join(', ')}`, { status: v.status });
  if (!isAbsolute(v.bundle as string)) throw invalid(HookErrorCode.STATE_INVALID, step, 'bundle must be an absolute path', { bundle: v.bundle });
  const state: OciState = {
    ociVersion: v.ociVersion as string,
    id: v.id as string,
    status: v.status as OciStatus,
    bundle: v.bundle as string,
    annotations: stringMap(v.annotations, 'annotations', HookErrorCode.STATE_INVALID, step),
  };
  if (v.pid !== undefined && v.pid !== 0) {
    if (!Number.isInteger(v.pid) || (v.pid as number) < 0) throw invalid(HookErrorCode.STATE_INVALID, step, 'pid must be a positive integer', { pid: v.pid });
    state.pid = v.pid as number;
  }
  return state;
}

/** The fields of config.json the hooks use. HOOK_CONFIG_INVALID with the field at fault. */
export function parseOciConfig(text: string, bundle: string): OciConfigView {
  const step = 'parse OCI config';
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new HookError(HookErrorCode.CONFIG_INVALID, `config.json is not JSON: ${(err as Error).message}`, { step, cause: err });
  }
  const v = (value ?? {}) as { root?: { path?: unknown }; process?: { args?: unknown; env?: unknown; cwd?: unknown }; annotations?: unknown };
  const rootPath = v.root?.path;
  if (typeof rootPath !== 'string' || rootPath === '') throw invalid(HookErrorCode.CONFIG_INVALID, step, 'root.path must be a non-empty string');
  const args = v.process?.args;
  if (!Array.isArray(args) || args.length === 0 || !args.every((a) => typeof a === 'string')) {
    throw invalid(HookErrorCode.CONFIG_INVALID, step, 'process.args must be a non-empty array of strings');
  }
  const env = v.process?.env ?? [];
  if (!Array.isArray(env) || !env.every((e) => typeof e === 'string')) throw invalid(HookErrorCode.CONFIG_INVALID, step, 'process.env must be an array of strings');
  const cwd = v.process?.cwd ?? '/';
  if (typeof cwd !== 'string' || !cwd.startsWith('/')) throw invalid(HookErrorCode.CONFIG_INVALID, step, 'process.cwd must be an absolute path');
  return {
    rootfs: resolve(bundle, rootPath),
    args: args as string[],
    env: env as string[],
    cwd,
    annotations: stringMap(v.annotations, 'annotations', HookErrorCode.CONFIG_INVALID, step),
  };
}

/** The value of NAME in a "K=V" list (the last one wins, as in execve's environ lookups by runc). */
export function envValue(env: readonly string[], name: string): string | undefined {
  let found: string | undefined;
  for (const kv of env) if (kv.startsWith(`${name}=`)) found = kv.slice(name.length + 1);
  return found;
}
