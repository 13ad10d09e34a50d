/** The harness's plugin-process helpers (src/node-stack/thaw-plugin-process.ts), for tests. */
export * from '../../src/node-stack/thaw-plugin-process.js';
