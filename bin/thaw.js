#!/usr/bin/env node
// The package's `thaw` command: the compiled CLI (npm run build / scripts/setup.sh make dist/).
import { runFromProcess } from '../dist/src/cli/main.js';

runFromProcess();
