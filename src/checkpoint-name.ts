/**
 * The checkpoint name rule, shared by the NRI policy (names arriving in annotations), the CLI and the store
 * (where a name becomes a directory). It lives at the root of src/ because both `nri-plugin` and `store` use it
 * and neither may import the other (design.md, Layout).
 */

export const CHECKPOINT_NAME_MAX_LENGTH = 128;
/** Lower-case letters, digits, '.', '_' and '-', starting and ending with a letter or digit. */
const CHECKPOINT_NAME_PATTERN = /^[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?$/;

/**
 * Checks a checkpoint name as it arrives from an annotation (or the CLI): it becomes a directory name in the
 * store, so anything that could escape the store (`/`, `..`, NUL, absolute paths) or confuse tools is refused.
 * Returns the reason, or undefined when the name is valid.
 */
export function checkCheckpointName(name: string): string | undefined {
  if (name.length === 0) return 'checkpoint name is empty';
  if (name.includes('\0')) return 'checkpoint name contains a NUL byte';
  if (name.includes('/')) return `checkpoint name ${JSON.stringify(name)} contains '/' (names cannot be paths)`;
  if (name.includes('..')) return `checkpoint name ${JSON.stringify(name)} contains '..'`;
  if (name.length > CHECKPOINT_NAME_MAX_LENGTH) {
    return `checkpoint name is ${name.length} characters long (at most ${CHECKPOINT_NAME_MAX_LENGTH})`;
  }
  if (!CHECKPOINT_NAME_PATTERN.test(name)) {
    return `checkpoint name ${JSON.stringify(name)} must be lower-case letters, digits, '.', '_' or '-', starting and ending with a letter or digit`;
  }
  return undefined;
}
