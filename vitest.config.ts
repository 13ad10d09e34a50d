import { defineConfig } from 'vitest/config';

// Two projects. Unit tests are cheap and independent (each makes its own temporary directories): their files
// run in parallel. Integration tests start real containerd/runc/CRIU stacks as root: one file at a time, after
// the unit tests (groupOrder), so a stack never competes with a parallel unit run on a 2-core machine.
// `npx vitest run --project unit` runs the unit part alone.
export default defineConfig({
  test: {
    testTimeout: 60_000,
    hookTimeout: 120_000,
    teardownTimeout: 60_000,
    reporters: ['default'],
    projects: [
      {
        extends: true,
        test: { name: 'unit', include: ['test/unit/**/*.test.ts'], fileParallelism: true, sequence: { groupOrder: 0 } },
      },
      {
        extends: true,
        test: { name: 'integration', include: ['test/integration/**/*.test.ts'], fileParallelism: false, sequence: { groupOrder: 1 } },
      },
    ],
  },
});
