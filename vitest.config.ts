import { defineConfig } from 'vitest/config';

// Integration tests start real containerd/runc/CRIU stacks as root: on a 2-core machine they run one
// file at a time. Unit tests are cheap and run in parallel.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    fileParallelism: false,
    testTimeout: 60_000,
    hookTimeout: 120_000,
    teardownTimeout: 60_000,
    reporters: ['default'],
  },
});
