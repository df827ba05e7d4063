// Choosing the PEP, and what fetch says when there is none.

import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { PexiError, check, connect, fetch } from '@pexi/guest';

import { packageDir, runNode, startPep, startUpstream, tempDir } from './support.mjs';

let upstream;
let pep;

before(async () => {
  upstream = await startUpstream();
  pep = await startPep({ allow: [{ host: '127.0.0.1', ports: [upstream.port] }], tag: 'endpoint' });
});

after(async () => {
  await pep?.stop();
  await upstream?.stop();
});

test('an endpoint that does not parse is refused at connect', () => {
  assert.throws(
    () => connect({ endpoint: 'tcp:127.0.0.1:4041' }),
    (error) => error instanceof PexiError && error.code === 'endpoint' && /unix:PATH/.test(error.message),
  );
});

test('no PEP at the endpoint: fetch rejects with a retryable connect cause, check rejects with it', async () => {
  connect({ endpoint: `unix:${path.join(tempDir('nobody'), 'pep.sock')}`, connectTimeoutMs: 300 });
  await assert.rejects(fetch(`${upstream.base}/hello`), (error) => {
    assert.ok(error instanceof TypeError);
    assert.equal(error.message, 'fetch failed');
    assert.equal(error.cause.code, 'connect');
    assert.equal(error.cause.retryable, true);
    assert.match(error.cause.message, /cannot reach the PEP/);
    return true;
  });
  await assert.rejects(check('GET', `${upstream.base}/hello`), (error) => error instanceof PexiError && error.code === 'connect');
});

test('connect() switches the shared session to a PEP that is there', async () => {
  assert.deepEqual(connect(pep.endpoint), { endpoint: pep.endpoint });
  const response = await fetch(`${upstream.base}/hello`);
  assert.equal(await response.text(), 'hello from upstream\n');
});

test('without connect() or PEXI_ENDPOINT outside a VM, fetch says what to set', async () => {
  const script = "import('@pexi/guest').then(({ fetch }) => fetch('http://example.test/')).catch((e) => console.log(JSON.stringify({ m: e.message, code: e.cause.code, msg: e.cause.message })))";
  // An undefined value leaves the variable out of the child's environment.
  const { code, stdout, stderr } = await runNode(['-e', script], { cwd: packageDir, env: { PEXI_ENDPOINT: undefined } });
  assert.equal(code, 0, stderr);
  const seen = JSON.parse(stdout);
  assert.equal(seen.m, 'fetch failed');
  assert.equal(seen.code, 'endpoint');
  assert.match(seen.msg, /PEXI_ENDPOINT is not set/);
});
