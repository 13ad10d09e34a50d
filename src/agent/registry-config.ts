/**
 * The registry access file of the agent (`--registry-config`), JSON:
 *
 *   { "access": { "<host[:port]>": { "plainHttp"?: boolean, "caFile"?: path,
 *                                    "credentialsFile"?: path, "repositories"?: [prefix...],
 *                                    "authHosts"?: [host[:port]...] } },
 *     "resolveTimeoutMs"?: number, "transferDeadlineMs"?: number,
 *     "pull"?: { "concurrency"?, "rangeBytes"?, "retries"? } }
 *
 * The agent reaches only the hosts named here (any other reference cold-starts), over https unless `plainHttp`
 * says otherwise for that host. A credentials file holds `{"username": "...", "password": "..."}` (or a token
 * server's account); it is read here, kept out of argv and logs, and must not be readable by group or others.
 * Credentials go only with requests for the repository prefixes `repositories` lists (required with a
 * credentials file: a key to one team's repositories is not sent for another's). Token realms and redirects
 * may lead only to the registry itself and the `authHosts`, over the same scheme.
 */
import { readFile, stat } from 'node:fs/promises';
import type { RegistrySourceOptions } from './checkpoint-sources.js';
import type { RegistryAccess } from '../store/index.js';

function fail(message: string): never {
  throw new Error(message);
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
const optInt = (v: unknown, what: string): number | undefined => {
  if (v === undefined) return undefined;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0) fail(`${what} must be a positive integer`);
  return v;
};

/** Reads and checks the file; throws an Error naming the bad field. */
export async function loadRegistryConfig(path: string): Promise<RegistrySourceOptions> {
  const raw: unknown = JSON.parse(await readFile(path, 'utf8'));
  if (!isObject(raw)) fail(`${path}: must be a JSON object`);
  const access: Record<string, RegistryAccess> = {};
  const entries = raw['access'] ?? {};
  if (!isObject(entries)) fail(`${path}: access must be an object keyed by registry host`);
  for (const [host, value] of Object.entries(entries)) {
    if (!isObject(value)) fail(`${path}: access[${JSON.stringify(host)}] must be an object`);
    const a: RegistryAccess = {};
    if (value['plainHttp'] !== undefined) {
      if (typeof value['plainHttp'] !== 'boolean') fail(`access[${JSON.stringify(host)}].plainHttp must be a boolean`);
      a.plainHttp = value['plainHttp'];
    }
    if (value['caFile'] !== undefined) {
      if (typeof value['caFile'] !== 'string') fail(`access[${JSON.stringify(host)}].caFile must be a path`);
      a.ca = await readFile(value['caFile'], 'utf8');
    }
    if (value['credentialsFile'] !== undefined) {
      const file = value['credentialsFile'];
      if (typeof file !== 'string') fail(`access[${JSON.stringify(host)}].credentialsFile must be a path`);
      if (((await stat(file)).mode & 0o077) !== 0) fail(`${file}: credentials must not be readable by group or others`);
      const c: unknown = JSON.parse(await readFile(file, 'utf8'));
      if (!isObject(c) || typeof c['username'] !== 'string' || typeof c['password'] !== 'string') fail(`${file}: must hold {"username", "password"}`);
      a.credentials = { username: c['username'], password: c['password'] };
      const repos = value['repositories'];
      if (!Array.isArray(repos) || repos.length === 0 || repos.some((r) => typeof r !== 'string' || !/^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:\/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$/.test(r))) {
        fail(`access[${JSON.stringify(host)}].repositories must list the repository prefixes the credentials are for (e.g. ["team-a"])`);
      }
      a.credentialRepositories = repos as string[];
    } else if (value['repositories'] !== undefined) {
      fail(`access[${JSON.stringify(host)}].repositories scopes credentials, but no credentialsFile is given`);
    }
    if (value['authHosts'] !== undefined) {
      const hosts = value['authHosts'];
      if (!Array.isArray(hosts) || hosts.some((h) => typeof h !== 'string' || !/^[a-z0-9.-]+(?::[0-9]{1,5})?$/.test(h))) fail(`access[${JSON.stringify(host)}].authHosts must be a list of host[:port]`);
      a.authHosts = (hosts as string[]).map((h) => h.toLowerCase());
    }
    for (const key of Object.keys(value)) {
      if (!['plainHttp', 'caFile', 'credentialsFile', 'repositories', 'authHosts'].includes(key)) fail(`access[${JSON.stringify(host)}].${key} is not a known key (plainHttp, caFile, credentialsFile, repositories, authHosts)`);
    }
    access[host.toLowerCase()] = a;
  }
  const resolveTimeoutMs = optInt(raw['resolveTimeoutMs'], 'resolveTimeoutMs');
  const transferDeadlineMs = optInt(raw['transferDeadlineMs'], 'transferDeadlineMs');
  const pullRaw = raw['pull'] ?? {};
  if (!isObject(pullRaw)) fail('pull must be an object');
  const pull: NonNullable<RegistrySourceOptions['pull']> = {};
  const concurrency = optInt(pullRaw['concurrency'], 'pull.concurrency');
  const rangeBytes = optInt(pullRaw['rangeBytes'], 'pull.rangeBytes');
  const retries = pullRaw['retries'] === undefined ? undefined : typeof pullRaw['retries'] === 'number' && Number.isSafeInteger(pullRaw['retries']) && pullRaw['retries'] >= 0 ? pullRaw['retries'] : fail('pull.retries must be a non-negative integer');
  if (concurrency !== undefined) pull.concurrency = concurrency;
  if (rangeBytes !== undefined) pull.rangeBytes = rangeBytes;
  if (retries !== undefined) pull.retries = retries;
  return { access, ...(resolveTimeoutMs !== undefined ? { resolveTimeoutMs } : {}), ...(transferDeadlineMs !== undefined ? { transferDeadlineMs } : {}), ...(Object.keys(pull).length > 0 ? { pull } : {}) };
}
