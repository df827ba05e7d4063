// The real OpenClaw (npm `openclaw`, Node 24), unmodified, inside a network namespace that has only
// loopback: its only way out is pexi-guestd's forward proxy, whose only way out is the PEP over a Unix
// socket (standing in for the VM boundary). The LLM is a mock OpenAI-compatible API over HTTPS on the
// host side that answers only with the real key, which only the PEP holds ([[secrets]]); OpenClaw's
// config carries the placeholder. Run by scripts/test-openclaw (which installs OpenClaw and Node 24).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { GREETING, PAGE_TEXT, startMockLlm } from './mock-llm.mjs';
import { auditRecords, certificates, lastJson, openclawConfig, pepConfig, pexi, startPep, target, walk } from './setup.mjs';

const guestd = path.join(target, 'debug', 'pexi-guestd');
const openclaw = process.env.PEXI_OPENCLAW ?? path.join(target, 'openclaw', 'node_modules', 'openclaw', 'openclaw.mjs');
// Unique per run: finding it anywhere can only mean this run leaked it.
const KEY = `sk-openclaw-${crypto.randomBytes(16).toString('hex')}`;

let dir;
let llm;
let pep;
let outputs;

/** The guest side: one shell in a fresh network namespace, guestd first, then the OpenClaw commands. */
function guestScript(port) {
  const guest = path.join(dir, 'guest');
  for (const sub of ['state', 'home', 'tmp', 'work', 'out']) {
    fs.mkdirSync(path.join(guest, sub), { recursive: true });
  }
  fs.writeFileSync(
    path.join(guest, 'openclaw.json'),
    JSON.stringify(openclawConfig(port, path.join(guest, 'openclaw.log')), null, 2),
  );
  const exec = (name, message) =>
    `"$NODE" "$OPENCLAW" agent exec --json --timeout 180 --cwd "$G/work" --config "$G/openclaw.json" ${JSON.stringify(message)} > "$G/out/${name}.json" 2> "$G/out/${name}.err"; echo $? > "$G/out/${name}.code"`;
  const script = `
set -u
ip link set lo up
G=${JSON.stringify(guest)}
"$GUESTD" --endpoint ${JSON.stringify(`unix:${dir}/pep.sock`)} --listen 127.0.0.1:3128 --ca-cert "$G/ca.pem" --socket "$G/pexi.sock" --deny-connect tunnel > "$G/out/guestd.out" 2> "$G/out/guestd.err" &
GUESTD_PID=$!
for i in $(seq 100); do [ -s "$G/out/guestd.out" ] && break; sleep 0.1; done
export OPENCLAW_STATE_DIR="$G/state" OPENCLAW_CONFIG_PATH="$G/openclaw.json" HOME="$G/home" TMPDIR="$G/tmp"
export OPENCLAW_NO_AUTO_UPDATE=1 OPENCLAW_DISABLE_BONJOUR=1 DO_NOT_TRACK=1 OPENCLAW_SKIP_CHANNELS=1
export OPENCLAW_PROXY_URL=http://127.0.0.1:3128 HTTPS_PROXY=http://127.0.0.1:3128 HTTP_PROXY=http://127.0.0.1:3128 NO_PROXY=localhost,127.0.0.1,::1
export NODE_EXTRA_CA_CERTS="$G/ca.pem"
${exec('hello', 'Say hello.')}
${exec('fetch-allowed', `FETCH https://page.test:${port}/page`)}
${exec('fetch-denied', 'FETCH https://denied.test/page')}
"$NODE" "$OPENCLAW" proxy validate --proxy-url http://127.0.0.1:3128 --allowed-url https://page.test:${port}/page --json > "$G/out/validate.json" 2> "$G/out/validate.err"; echo $? > "$G/out/validate.code"
env > "$G/out/env.txt"
kill $GUESTD_PID
`;
  fs.writeFileSync(path.join(guest, 'run.sh'), script);
  return guest;
}

function read(guest, name) {
  return fs.readFileSync(path.join(guest, 'out', name), 'utf8');
}

before(async () => {
  for (const [what, file] of [['pexi', pexi], ['pexi-guestd', guestd], ['openclaw', openclaw]]) {
    assert.ok(fs.existsSync(file), `${what} missing at ${file} (scripts/test-openclaw builds and installs it)`);
  }
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pexi-openclaw-'));
  llm = await startMockLlm({ key: KEY, ...certificates(dir) });
  pepConfig(dir, llm.port);
  // The key is in the PEP's environment and nowhere else.
  pep = await startPep(dir, { ...process.env, PEXI_TEST_LLM_KEY: KEY, RUST_LOG: 'info' });
  const guest = guestScript(llm.port);
  // The guest's environment: no key, nothing inherited but the basics.
  const env = {
    PATH: process.env.PATH,
    NODE: process.execPath,
    OPENCLAW: openclaw,
    GUESTD: guestd,
  };
  const child = spawn('unshare', ['-n', 'sh', path.join(guest, 'run.sh')], { env, stdio: ['ignore', 'inherit', 'inherit'] });
  const timer = setTimeout(() => child.kill('SIGKILL'), 600_000);
  const [code] = await once(child, 'exit');
  clearTimeout(timer);
  assert.equal(code, 0, 'the guest script ran');
  // The PEP writes records nobody waits for (outcomes) up to 10 ms after the response: stopped, its
  // log holds every record of the run.
  pep.kill('SIGTERM');
  await once(pep, 'exit');
  outputs = { guest };
});

after(async () => {
  if (pep && pep.exitCode === null) {
    pep.kill('SIGTERM');
    await once(pep, 'exit');
  }
  await llm?.stop();
  if (dir && !process.env.PEXI_KEEP) {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('agent exec completes a streamed turn with the brokered key', () => {
  const { guest } = outputs;
  assert.equal(read(guest, 'hello.code').trim(), '0', read(guest, 'hello.err'));
  const result = lastJson(read(guest, 'hello.json'));
  assert.equal(result.ok, true);
  assert.equal(result.final, GREETING.join(''));
  const calls = llm.requests.filter((r) => r.url === '/v1/chat/completions');
  assert.ok(calls.length >= 1);
  assert.ok(calls.every((r) => r.authorized && r.stream), 'every LLM call streamed with the real key');
});

test('web_fetch reaches an allowlisted page and is refused for a denied host with pexi\'s reason', () => {
  const { guest } = outputs;
  assert.equal(read(guest, 'fetch-allowed.code').trim(), '0', read(guest, 'fetch-allowed.err'));
  // The mock echoes the tool result as its answer (OpenClaw wraps it as untrusted external content).
  const allowed = lastJson(read(guest, 'fetch-allowed.json'));
  assert.match(allowed.final, /openclaw:core:web_fetch/);
  assert.match(allowed.final, /\\?"status\\?": 200/);
  assert.ok(allowed.final.includes(PAGE_TEXT), 'the page text came back');
  const denied = lastJson(read(guest, 'fetch-denied.json'));
  assert.match(denied.final, /403/);
  assert.match(denied.final, /policy_denied/);
  assert.match(denied.final, /host denied\.test is not in the allowlist/);
});

test('openclaw proxy validate passes against pexi-guestd', () => {
  const { guest } = outputs;
  assert.equal(read(guest, 'validate.code').trim(), '0', read(guest, 'validate.json') + read(guest, 'validate.err'));
  const result = JSON.parse(read(guest, 'validate.json'));
  assert.equal(result.ok, true);
  const kinds = result.checks.map((c) => `${c.kind}:${c.ok}`);
  assert.deepEqual(kinds, ['allowed:true', 'denied:true']);
  // The built-in denied check is a loopback canary; the PEP refused it (policy), with pexi's 403.
  assert.equal(result.checks[1].status, 403);
});

test('every request is decided and audited, the log verifies, and the key is nowhere but the PEP', () => {
  const { decisions } = auditRecords(dir);
  assert.ok(decisions.length >= 5, `${decisions.length} decisions`);
  const llmCalls = decisions.filter((r) => r.request.host === 'llm.test');
  assert.ok(llmCalls.length >= 3);
  assert.ok(llmCalls.every((r) => r.decision.allow && r.request.secrets.includes('llm')));
  assert.ok(decisions.some((r) => r.request.host === 'page.test' && r.decision.allow));
  assert.ok(decisions.some((r) => r.request.host === 'denied.test' && !r.decision.allow));

  // The key: not in the guest's environment, files or outputs, nor in the audit log or the PEP's log.
  const { guest } = outputs;
  assert.ok(!read(guest, 'env.txt').includes(KEY));
  for (const file of [...walk(guest), path.join(dir, 'audit.jsonl'), path.join(dir, 'pep.log')]) {
    assert.ok(!fs.readFileSync(file).includes(KEY), `${file} holds the key`);
  }
  assert.ok(fs.readFileSync(path.join(guest, 'openclaw.json'), 'utf8').includes('pexi:secret:llm'));
});
