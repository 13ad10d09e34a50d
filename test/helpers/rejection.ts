import { isThawError, type ThawError } from '../../src/errors.js';

/** The ThawError `p` rejects with; anything else (a resolve, another error) fails the test. */
export async function rejection(p: Promise<unknown>): Promise<ThawError> {
  try {
    await p;
  } catch (err) {
    if (isThawError(err)) return err;
    throw err;
  }
  throw new Error('expected a rejection');
}
