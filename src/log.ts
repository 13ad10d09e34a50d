/**
 * Structured logging: one JSON object per line, so that an event (a restore, a rejected frame) can be
 * found and parsed by the operator's log pipeline. Nothing here is global: every component receives a
 * Logger, and tests pass a collecting one to assert on what was logged.
 */
export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
export type LogFields = Record<string, unknown>;

export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  /** A logger whose lines all carry `fields` (e.g. the component or the container id). */
  child(fields: LogFields): Logger;
}

const LEVEL_ORDER: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export interface JsonLoggerOptions {
  /** Where lines go; default process.stderr. */
  write?: (line: string) => void;
  /** Lowest level written; default 'info' (or THAW_LOG_LEVEL when the caller passes it in). */
  level?: LogLevel;
  /** Clock for the `ts` field, injectable for tests. */
  now?: () => Date;
  fields?: LogFields;
}

export function parseLogLevel(value: string | undefined, fallback: LogLevel = 'info'): LogLevel {
  return value === 'debug' || value === 'info' || value === 'warn' || value === 'error' ? value : fallback;
}

export function createJsonLogger(options: JsonLoggerOptions = {}): Logger {
  const write = options.write ?? ((line: string) => process.stderr.write(line));
  const minLevel = LEVEL_ORDER[options.level ?? 'info'];
  const now = options.now ?? (() => new Date());
  const base = options.fields ?? {};
  const emit = (level: LogLevel, msg: string, fields?: LogFields): void => {
    if (LEVEL_ORDER[level] < minLevel) return;
    const record = { ts: now().toISOString(), level, msg, ...base, ...fields };
    write(`${JSON.stringify(record, jsonSafe)}\n`);
  };
  return {
    debug: (m, f) => emit('debug', m, f),
    info: (m, f) => emit('info', m, f),
    warn: (m, f) => emit('warn', m, f),
    error: (m, f) => emit('error', m, f),
    child: (fields) => createJsonLogger({ ...options, fields: { ...base, ...fields } }),
  };
}

/** JSON.stringify replacer: Buffers as hex (bounded), bigints as strings, errors as their JSON form. */
function jsonSafe(_key: string, value: unknown): unknown {
  if (typeof value === 'bigint') return value.toString();
  if (value instanceof Error) {
    const withJson = value as Error & { toJSON?: () => unknown };
    return typeof withJson.toJSON === 'function' ? withJson.toJSON() : { name: value.name, message: value.message };
  }
  if (value && typeof value === 'object' && (value as { type?: string }).type === 'Buffer') {
    const data = (value as { data?: number[] }).data ?? [];
    const hex = Buffer.from(data.slice(0, 64)).toString('hex');
    return data.length > 64 ? `${hex}… (${data.length} bytes)` : hex;
  }
  return value;
}

/** A logger that records every line, for tests. */
export interface CollectingLogger extends Logger {
  readonly lines: Array<{ level: LogLevel; msg: string; fields: LogFields }>;
}

export function createCollectingLogger(fields: LogFields = {}, sink?: CollectingLogger['lines']): CollectingLogger {
  const lines = sink ?? [];
  const emit = (level: LogLevel) => (msg: string, f?: LogFields) => {
    lines.push({ level, msg, fields: { ...fields, ...f } });
  };
  return {
    lines,
    debug: emit('debug'),
    info: emit('info'),
    warn: emit('warn'),
    error: emit('error'),
    child: (more) => createCollectingLogger({ ...fields, ...more }, lines),
  };
}

export const silentLogger: Logger = {
  debug: () => undefined,
  info: () => undefined,
  warn: () => undefined,
  error: () => undefined,
  child: () => silentLogger,
};
