// An unmodified npm `ws` client reaches a `wss://` echo server on the host side through the guest proxy:
// pexi-guestd terminates TLS, the PEP performs the WebSocket upgrade and carries the frames. The client
// script knows nothing of pexi: it gives ws Node's own proxy-aware agent (`proxyEnv`, Node >= 24.5),
// which reads HTTPS_PROXY, and trusts NODE_EXTRA_CA_CERTS. A WebSocket to a denied host is refused.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import https from 'node:https';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { WebSocketServer } from 'ws';

import { appDir, runNode, startGuestd, startPep, tempDir } from './support.mjs';

const [major, minor] = process.versions.node.split('.').map(Number);
const envProxy = major > 24 || (major === 24 && minor >= 5);

const CLIENT = `
import https from 'node:https';
import WebSocket from 'ws';
const [url, denied] = process.argv.slice(2);
// The standard way to give ws a proxy on Node >= 24.5: an agent that reads HTTPS_PROXY and NO_PROXY.
const agent = new https.Agent({ proxyEnv: process.env });
const out = { echoes: [] };
await new Promise((resolve, reject) => {
  const ws = new WebSocket(url, { agent });
  ws.on('open', () => { ws.send('hello'); ws.send(Buffer.from([0, 1, 2, 255])); ws.send('x'.repeat(100000)); });
  ws.on('message', (data, isBinary) => {
    out.echoes.push(isBinary ? [...data] : data.toString().length > 20 ? data.toString().length : data.toString());
    if (out.echoes.length === 3) ws.close(1000, 'done');
  });
  ws.on('close', (code) => { out.close = code; resolve(); });
  ws.on('error', reject);
});
await new Promise((resolve) => {
  const ws = new WebSocket(denied, { agent });
  // A refused handshake is told the WebSocket way: 101 with x-pexi-error, then close 1008 with the reason.
  ws.on('upgrade', (res) => { out.deniedError = res.headers['x-pexi-error']; });
  ws.on('unexpected-response', (req, res) => { out.denied = { status: res.statusCode }; req.destroy(); resolve(); });
  ws.on('close', (code, reason) => { out.denied = { close: code, reason: reason.toString() }; resolve(); });
  ws.on('error', (error) => { out.denied = out.denied ?? { message: error.message }; });
});
console.log(JSON.stringify(out));
agent.destroy();
`;

let dir;
let server;
let pep;
let guestd;
let app;

function openssl(args) {
  execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

before(async () => {
  if (!envProxy) {
    return;
  }
  dir = tempDir('websocket');
  const p = (name) => path.join(dir, name);
  openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', p('ca.key'), '-out', p('ca.pem'), '-days', '2', '-subj', '/CN=pexi ws test CA']);
  openssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', p('ws.key'), '-out', p('ws.csr'), '-subj', '/CN=ws.test']);
  fs.writeFileSync(p('san.cnf'), 'subjectAltName=DNS:ws.test\n');
  openssl(['x509', '-req', '-in', p('ws.csr'), '-CA', p('ca.pem'), '-CAkey', p('ca.key'), '-CAcreateserial', '-out', p('ws.pem'), '-days', '2', '-extfile', p('san.cnf')]);
  server = https.createServer({ cert: fs.readFileSync(p('ws.pem')), key: fs.readFileSync(p('ws.key')) });
  const wss = new WebSocketServer({ server });
  wss.on('connection', (socket) => socket.on('message', (data, isBinary) => socket.send(data, { binary: isBinary })));
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  pep = await startPep({
    // WebSocket upgrades are allowed only by an entry that lists them.
    allow: [{ host: 'ws.test', ports: [server.address().port], upgrade: ['websocket'] }],
    dnsOverrides: { 'ws.test': '127.0.0.1' },
    extraCaFile: p('ca.pem'),
    tag: 'websocket',
  });
  app = appDir('websocket-app', ['ws']);
  // Refusals inside the tunnel, so the client sees pexi's 403 (a refused CONNECT would be a bare error).
  guestd = await startGuestd(pep, app, { denyConnect: 'tunnel' });
  fs.writeFileSync(path.join(app, 'client.mjs'), CLIENT);
});

after(async () => {
  await guestd?.stop();
  await pep?.stop();
  server?.close();
  for (const folder of [dir, app]) {
    if (folder) {
      fs.rmSync(folder, { recursive: true, force: true });
    }
  }
});

test('an npm ws client through the guest proxy: wss echoes both ways; a denied host is closed with 1008 and pexi\'s reason', { skip: !envProxy && 'https.Agent proxyEnv needs Node >= 24.5' }, async () => {
  const url = `wss://ws.test:${server.address().port}/chat`;
  const { code, stdout, stderr } = await runNode(['client.mjs', url, 'wss://denied.test/chat'], {
    cwd: app,
    env: {
      HTTPS_PROXY: guestd.proxy,
      HTTP_PROXY: guestd.proxy,
      NO_PROXY: '',
      NODE_EXTRA_CA_CERTS: guestd.ca,
    },
  });
  assert.equal(code, 0, stderr);
  const out = JSON.parse(stdout.trim());
  assert.deepEqual(out.echoes, ['hello', [0, 1, 2, 255], 100000]);
  assert.equal(out.close, 1000);
  assert.equal(out.denied?.close, 1008, JSON.stringify(out.denied));
  assert.match(out.denied.reason, /^pexi refused this request \(policy_denied\): host denied\.test is not in the allowlist/);
  assert.equal(out.deniedError, 'policy_denied');
  const records = pep.records();
  const decision = records.find((r) => r.kind === 'decision' && r.request.host === 'ws.test' && r.request.upgrade === 'websocket');
  assert.ok(decision?.decision.allow, 'the upgrade was decided');
  const outcome = await pep.waitRecord((r) => r.kind === 'outcome' && r.decision_id === decision.decision_id);
  assert.equal(outcome.status, 101);
  assert.ok(outcome.upgrade.bytes_to_upstream > 100000 && outcome.upgrade.bytes_to_guest > 100000);
});
