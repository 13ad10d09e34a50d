/**
 * thaw's OCI hooks as one executable (NRI injects them; the runtime runs them with the OCI state on stdin,
 * no PATH and an empty environment, so everything here is named by absolute path):
 *
 *   node dist/src/oci-hooks/main.js create-runtime --mode overlay|args --control-dir DIR \
 *        --checkpoint-dir DIR --thaw-pause PATH [--wait-checkpoint-ms N] [--diff-sha256 TAR_HEX:DELETED_HEX] [--budget-ms N]
 *   node dist/src/oci-hooks/main.js poststop --control-dir DIR [--work-dir DIR]
 *
 * Exit status is always 0: a failing hook would fail the pod, and thaw's rule is that a pod always starts
 * (cold if need be). create-runtime records failures in the control dir (records.ts); both print one line
 * on stderr when something went wrong (the runtime puts it in its log).
 */
import { parseArgs } from 'node:util';
import { errorMessage, isThawError } from '../errors.js';
import { parseDiffSha256, runCreateRuntime } from './create-runtime.js';
import { runPoststop } from './poststop.js';
import { writeHookFailed } from './records.js';
import { parseOciState } from './state.js';

/** The runtime writes a few hundred bytes at once; a runtime that never closes stdin must not hang us. */
export const STDIN_TIMEOUT_MS = 5_000;

async function readStdin(timeoutMs: number): Promise<string> {
  const chunks: Buffer[] = [];
  const timer = setTimeout(() => process.stdin.destroy(new Error(`no end of stdin after ${timeoutMs} ms`)), timeoutMs);
  try {
    for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  } finally {
    clearTimeout(timer);
  }
  return Buffer.concat(chunks).toString('utf8');
}

async function main(argv: string[], startupMs: number): Promise<void> {
  const [stage, ...rest] = argv;
  const { values } = parseArgs({
    args: rest,
    options: {
      mode: { type: 'string' },
      'control-dir': { type: 'string' },
      'checkpoint-dir': { type: 'string' },
      'thaw-pause': { type: 'string' },
      'work-dir': { type: 'string' },
      'undo-journal': { type: 'string' },
      'wait-checkpoint-ms': { type: 'string' },
      'diff-sha256': { type: 'string' },
      'budget-ms': { type: 'string' },
      'original-entrypoint': { type: 'string' },
    },
    strict: true,
  });
  switch (stage) {
    case 'create-runtime': {
      const controlDir = values['control-dir'];
      const mode = values.mode;
      if (controlDir === undefined || values['checkpoint-dir'] === undefined || values['thaw-pause'] === undefined || (mode !== 'overlay' && mode !== 'args')) {
        throw new Error('create-runtime needs --mode overlay|args --control-dir --checkpoint-dir --thaw-pause');
      }
      const diffSha256 = parseDiffSha256(values['diff-sha256']);
      if (values['diff-sha256'] !== undefined && diffSha256 === undefined) throw new Error('--diff-sha256 takes TAR_SHA256:DELETED_SHA256 (64 hex digits each)');
      let state;
      try {
        state = parseOciState(await readStdin(STDIN_TIMEOUT_MS));
      } catch (err) {
        // Without a state there is no overlay either: the container runs its own command.
        await writeHookFailed(controlDir, { code: isThawError(err) ? err.code : 'HOOK_STATE_INVALID', reason: errorMessage(err) }).catch(() => undefined);
        throw err;
      }
      const result = await runCreateRuntime(state, {
        startupMs,
        mode,
        controlDir,
        checkpointDir: values['checkpoint-dir'],
        thawPausePath: values['thaw-pause'],
        ...(diffSha256 !== undefined ? { diffSha256 } : {}),
        ...(values['undo-journal'] !== undefined && values['undo-journal'].startsWith('/') ? { undoJournalFile: values['undo-journal'] } : {}),
        ...(values['wait-checkpoint-ms'] !== undefined && /^\d+$/.test(values['wait-checkpoint-ms']) ? { waitCheckpointMs: Number(values['wait-checkpoint-ms']) } : {}),
        ...(values['budget-ms'] !== undefined && /^\d+$/.test(values['budget-ms']) ? { budgetMs: Number(values['budget-ms']) } : {}),
        ...(values['original-entrypoint'] !== undefined && values['original-entrypoint'].startsWith('/') ? { originalEntrypointPath: values['original-entrypoint'] } : {}),
      });
      if (!result.ok && result.mustNotStart === true) {
        // The diff's undo failed: the rootfs is half changed, so this create must fail rather than run on it.
        process.stderr.write(`thaw create-runtime hook (${state.id}): ${result.code}: ${result.reason}; the container must not start\n`);
        process.exit(1);
      }
      if (!result.ok) process.stderr.write(`thaw create-runtime hook (${state.id}): ${result.code}: ${result.reason}; the container starts cold\n`);
      return;
    }
    case 'poststop': {
      // The state is not needed, but reading it keeps the runtime's write from failing on a closed pipe.
      await readStdin(STDIN_TIMEOUT_MS).catch(() => '');
      const undoJournal = values['undo-journal'];
      const problems = await runPoststop({ controlDir: values['control-dir'], workDir: values['work-dir'], ...(undoJournal !== undefined && undoJournal.startsWith('/') ? { undoJournal } : {}) });
      if (problems.length > 0) process.stderr.write(`thaw poststop hook: could not remove ${problems.join('; ')}\n`);
      return;
    }
    default:
      throw new Error(`unknown stage ${JSON.stringify(stage)} (create-runtime, poststop)`);
  }
}

// performance.now() counts from the process's start: here, Node.js's start plus the module loading.
main(process.argv.slice(2), performance.now()).then(
  () => process.exit(0),
  (err: unknown) => {
    process.stderr.write(`thaw hook: ${errorMessage(err)}\n`);
    process.exit(0);
  },
);
