// The zero-change preload: an unmodified script's global fetch goes through the PEP.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { appDir, packageDir, runNode, startPep, startUpstream } from './support.mjs';

// The application never mentions pexi: it is the script a user already has.
const SCRIPT = `
for (const url of process.argv.slice(2)) {
  try {
    const response = await fetch(url);
    console.log(JSON.stringify({ status: response.status, text: await response.text() }));
  } catch (error) {
    console.log(JSON.stringify({ error: error.message, code: error.cause?.code }));
  }
}
`;

let upstream;
let pep;
let dir;

before(async () => {
  upstream = await startUpstream();
  pep = await startPep({ allow: [{ host: '127.0.0.1', ports: [upstream.port] }], tag: 'register' });
  dir = appDir('register-app');
  fs.writeFileSync(path.join(dir, 'app.mjs'), SCRIPT);
  // The CommonJS form of the same script, for `--require`.
  fs.writeFileSync(path.join(dir, 'app.cjs'), `(async () => {${SCRIPT}})();`);
});

after(async () => {
  await pep?.stop();
  await upstream?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

function decisionsFor(url) {
  return pep.records().filter((r) => r.kind === 'decision' && r.request.url === url);
}

for (const [flag, script] of [
  ['--import', 'app.mjs'],
  ['--require', 'app.cjs'],
]) {
  test(`node ${flag} @pexi/guest/register sends a plain fetch() through the PEP`, async () => {
    const url = `${upstream.base}/hello?via=${flag.slice(2)}`;
    const { code, stdout, stderr } = await runNode([flag, '@pexi/guest/register', script, url, 'https://denied.example/'], {
      cwd: dir,
      env: { PEXI_ENDPOINT: pep.endpoint },
    });
    assert.equal(code, 0, stderr);
    const [allowed, denied] = stdout.trim().split('\n').map((line) => JSON.parse(line));
    assert.deepEqual(allowed, { status: 200, text: 'hello from upstream\n' });
    // The refusal is a response the script prints like any other: 403 with pexi's reasons.
    assert.equal(denied.status, 403);
    const body = JSON.parse(denied.text);
    assert.equal(body.code, 'policy_denied');
    assert.deepEqual(body.reasons, ['host denied.example is not in the allowlist']);
    const [decision] = decisionsFor(url);
    assert.ok(decision, 'the audit log has the allowed request');
    assert.equal(decision.decision.allow, true);
    assert.equal(decision.guest.name, 'pexi-guest');
    const outcome = await pep.waitRecord((r) => r.kind === 'outcome' && r.decision_id === decision.decision_id);
    assert.equal(outcome.status, 200);
    assert.equal(decisionsFor('https://denied.example/')[0]?.decision.allow, false);
  });
}

test('without the preload the same script bypasses pexi (the control)', async () => {
  const url = `${upstream.base}/hello?via=none`;
  const { code, stdout, stderr } = await runNode(['app.mjs', url, 'https://denied.example/'], {
    cwd: dir,
    env: { PEXI_ENDPOINT: pep.endpoint },
  });
  assert.equal(code, 0, stderr);
  const [allowed, denied] = stdout.trim().split('\n').map((line) => JSON.parse(line));
  assert.equal(allowed.status, 200);
  assert.equal(denied.error, 'fetch failed', 'without pexi the name does not resolve');
  assert.equal(decisionsFor(url).length, 0);
});

test('NODE_OPTIONS with the absolute path of the preload works from any directory; the bare name does not', async () => {
  // A folder with no node_modules, as a script an agent writes in /tmp would be.
  const elsewhere = fs.mkdtempSync(path.join(os.tmpdir(), 'pexi-register-elsewhere-'));
  try {
    fs.writeFileSync(path.join(elsewhere, 'app.mjs'), SCRIPT);
    const url = `${upstream.base}/hello?via=node-options`;
    for (const preload of [`--import ${path.join(packageDir, 'register.mjs')}`, `--require ${path.join(packageDir, 'register.js')}`]) {
      const { code, stdout, stderr } = await runNode(['app.mjs', url], {
        cwd: elsewhere,
        env: { PEXI_ENDPOINT: pep.endpoint, NODE_OPTIONS: preload },
      });
      assert.equal(code, 0, stderr);
      assert.deepEqual(JSON.parse(stdout.trim()), { status: 200, text: 'hello from upstream\n' });
    }
    assert.equal(decisionsFor(url).length, 2, 'both went through the PEP');
    const bare = await runNode(['app.mjs', url], {
      cwd: elsewhere,
      env: { PEXI_ENDPOINT: pep.endpoint, NODE_OPTIONS: '--import @pexi/guest/register' },
    });
    assert.notEqual(bare.code, 0);
    assert.match(bare.stderr, /ERR_MODULE_NOT_FOUND/);
  } finally {
    fs.rmSync(elsewhere, { recursive: true, force: true });
  }
});
