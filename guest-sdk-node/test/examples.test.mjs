// The README's example runs as shown.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { packageDir, runNode, startPep, startUpstream } from './support.mjs';

let upstream;
let pep;

before(async () => {
  upstream = await startUpstream();
  pep = await startPep({ allow: [{ host: '127.0.0.1', ports: [upstream.port] }], tag: 'examples' });
});

after(async () => {
  await pep?.stop();
  await upstream?.stop();
});

const example = path.join(packageDir, 'examples', 'stream.mjs');

test('README.md shows examples/stream.mjs as it is', () => {
  const readme = fs.readFileSync(path.join(packageDir, 'README.md'), 'utf8');
  assert.ok(readme.includes(fs.readFileSync(example, 'utf8')), 'README.md embeds examples/stream.mjs verbatim');
});

test('examples/stream.mjs streams an allowed URL and reports a denied one', async () => {
  const env = { PEXI_ENDPOINT: pep.endpoint };
  const url = `${upstream.base}/sse?tokens=3&gap=20`;
  const ok = await runNode([example, url], { cwd: packageDir, env });
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal(ok.stdout, `200 OK from ${url}\ndata: token-0\n\ndata: token-1\n\ndata: token-2\n\ndata: [DONE]\n\n`);

  const denied = await runNode([example, 'https://denied.example/'], { cwd: packageDir, env });
  assert.equal(denied.code, 1);
  assert.equal(denied.stderr, '403 refused by pexi: policy_denied host denied.example is not in the allowlist\n');
});
