// The shipped TypeScript declarations compile against a program using the documented API.

import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';

import { packageDir, runNode } from './support.mjs';

test('index.d.ts and register.d.ts type-check a program using the API (tsc --strict)', async () => {
  const tsc = path.join(packageDir, 'node_modules', 'typescript', 'bin', 'tsc');
  const { code, stdout, stderr } = await runNode([tsc, '-p', path.join(packageDir, 'test', 'types', 'tsconfig.json')], {
    cwd: packageDir,
  });
  assert.equal(code, 0, stdout + stderr);
});
