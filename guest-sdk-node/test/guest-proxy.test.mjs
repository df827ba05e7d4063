// The register preload in a guest that runs pexi-guestd: the process's other HTTP clients and its child
// processes are pointed at the guest proxy, and the proxy's per-boot CA is trusted (Node with
// tls.setDefaultCACertificates). Here a child curl reaches a name only the PEP can resolve.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import tls from 'node:tls';
import { after, before, test } from 'node:test';

import { connect, fetch } from '@pexi/guest';

import { appDir, runNode, startGuestd, startPep, startUpstream } from './support.mjs';

const SCRIPT = `
import { execFileSync } from 'node:child_process';
import tls from 'node:tls';
const [url, caFile] = process.argv.slice(2);
const pem = (await import('node:fs')).readFileSync(caFile, 'utf8');
const out = {
  env: {
    HTTP_PROXY: process.env.HTTP_PROXY,
    HTTPS_PROXY: process.env.HTTPS_PROXY,
    https_proxy: process.env.https_proxy,
    OPENCLAW_PROXY_URL: process.env.OPENCLAW_PROXY_URL,
    NO_PROXY: process.env.NO_PROXY,
  },
  trusted: typeof tls.getCACertificates === 'function' ? tls.getCACertificates('default').includes(pem) : null,
};
// A child process that knows nothing of pexi: curl, with the environment it inherits.
out.curl = execFileSync('curl', ['-sS', url], { encoding: 'utf8' });
// Node's own http client, which ignores the proxy variables unless Node's proxy support is on.
const http = await import('node:http');
out.httpGet = await new Promise((resolve) => {
  http
    .get(url, (res) => {
      let body = '';
      res.on('data', (d) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode, body }));
    })
    .on('error', (error) => resolve({ error: error.code ?? error.message }));
});
console.log(JSON.stringify(out));
`;

let upstream;
let pep;
let guestd;
let dir;

before(async () => {
  upstream = await startUpstream();
  pep = await startPep({
    allow: [{ host: 'app.test', ports: [upstream.port] }],
    dnsOverrides: { 'app.test': '127.0.0.1' },
    tag: 'guest-proxy',
  });
  dir = appDir('guest-proxy-app');
  guestd = await startGuestd(pep, dir);
  fs.writeFileSync(path.join(dir, 'app.mjs'), SCRIPT);
});

after(async () => {
  await guestd?.stop();
  await pep?.stop();
  await upstream?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

test('register points child processes and other clients at the guest proxy and trusts its CA', async () => {
  const url = `http://app.test:${upstream.port}/hello`;
  const env = { PEXI_ENDPOINT: pep.endpoint, PEXI_PROXY_URL: guestd.proxy, PEXI_CA_CERT: guestd.ca };
  for (const name of ['HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy', 'NO_PROXY', 'no_proxy', 'OPENCLAW_PROXY_URL']) {
    env[name] = '';
  }
  const { code, stdout, stderr } = await runNode(['--import', '@pexi/guest/register', 'app.mjs', url, guestd.ca], {
    cwd: dir,
    env,
  });
  assert.equal(code, 0, stderr);
  const out = JSON.parse(stdout.trim());
  for (const name of ['HTTP_PROXY', 'HTTPS_PROXY', 'https_proxy', 'OPENCLAW_PROXY_URL']) {
    assert.equal(out.env[name], guestd.proxy, name);
  }
  assert.deepEqual(out.env.NO_PROXY.split(','), ['localhost', '127.0.0.1', '::1']);
  if (typeof tls.setDefaultCACertificates === 'function') {
    assert.equal(out.trusted, true, 'the guest CA is among the default CAs');
  } else {
    // Older Node: NODE_EXTRA_CA_CERTS is the documented way.
    assert.notEqual(out.trusted, true);
  }
  assert.equal(out.curl, 'hello from upstream\n', 'curl reached app.test through the proxy and the PEP');
  const http = await import('node:http');
  if (typeof http.setGlobalProxyFromEnv === 'function') {
    // Node 24: the preload switched Node's own proxy support on, so http.get goes through pexi-guestd.
    assert.deepEqual(out.httpGet, { status: 200, body: 'hello from upstream\n' });
    const decisions = pep.records().filter((r) => r.kind === 'decision' && r.request.host === 'app.test');
    assert.equal(decisions.length, 2, 'curl and http.get each made a decision');
  } else {
    // Node 20 has no way to switch it on after start: http.get looks the name up itself and fails.
    assert.ok(out.httpGet.error, JSON.stringify(out.httpGet));
  }
  const decision = pep.records().find((r) => r.kind === 'decision' && r.request.host === 'app.test');
  assert.ok(decision, 'the PEP decided the child process request');
});

test('@pexi/guest reaches the PEP through pexi-guestd\'s local socket, sharing its one session', async () => {
  connect({ endpoint: guestd.endpoint });
  const url = `http://app.test:${upstream.port}/hello`;
  const responses = await Promise.all([1, 2, 3].map(() => fetch(url)));
  for (const response of responses) {
    assert.equal(await response.text(), 'hello from upstream\n');
  }
  const sessions = new Set(
    pep
      .records()
      .filter((r) => r.kind === 'decision' && r.request.host === 'app.test')
      .map((r) => r.session_id),
  );
  // The child curl of the other test went through the proxy, this through the socket: one session.
  assert.equal(sessions.size, 1);
});
