// The product end to end: `pexi vm run --profile openclaw` boots the no-NIC guest, whose init starts
// pexi-guestd before anything else, and the real OpenClaw (npm, Node 24, mounted read-only) runs one
// `agent exec --json` turn inside it against a mock OpenAI-compatible LLM over HTTPS on the host side. The
// turn streams, uses the brokered key (the guest's OpenClaw config holds the placeholder; the key is only
// in the PEP's environment), and fetches two pages with web_fetch: one allowed, one refused with pexi's
// reason. Afterwards the guest's environment, files and output, the console and the audit log are
// searched for the key. Run by scripts/test-vm-openclaw (software emulation here: minutes).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { PAGE_TEXT, startMockLlm } from './mock-llm.mjs';
import { auditRecords, certificates, lastJson, openclawConfig, pepConfig, pexi, vmGuest, vmTable, walk } from './setup.mjs';

const KEY = `sk-vm-openclaw-${crypto.randomBytes(16).toString('hex')}`;
const guest = vmGuest();
const image = guest.image;

let dir;
let llm;
let run;

before(async () => {
  for (const file of [guest.kernel, 'initramfs.cpio.gz', 'share/bin/pexi-guestd', 'share/node/bin/node']) {
    assert.ok(fs.existsSync(path.join(image, file)), `${file} missing in ${image}: run scripts/vm-image${guest.arm64 ? ' --arch arm64' : ''}`);
  }
  assert.ok(
    fs.existsSync(path.join(guest.openclaw, 'node_modules', 'openclaw')),
    `run scripts/test-openclaw ${guest.arm64 ? '--arm64' : '--install-only'} first (installs openclaw)`,
  );
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pexi-vm-openclaw-'));
  llm = await startMockLlm({ key: KEY, ...certificates(dir) });
  const config = pepConfig(dir, llm.port, vmTable(path.join(dir, 'run')));
  fs.writeFileSync(path.join(dir, 'openclaw.json'), JSON.stringify(openclawConfig(llm.port, '/tmp/openclaw/openclaw.log'), null, 2));
  // The guest's side of the test, on the image's share (read-only in the guest); results go to /out.
  const e2e = path.join(image, 'share', 'e2e');
  fs.mkdirSync(e2e, { recursive: true });
  fs.writeFileSync(
    path.join(e2e, 'openclaw-vm.sh'),
    `set -u
ip -o link show > /out/links.txt
# Progress on the console while the turn runs (minutes under software emulation): uptime, load and the
# last thing OpenClaw logged.
( while sleep 20; do
    log=$(ls -t /tmp/openclaw/*.log 2>/dev/null | head -n 1)
    echo "guest: up $(cut -d. -f1 /proc/uptime) s, load $(cut -d' ' -f1-3 /proc/loadavg), openclaw: $([ -n "$log" ] && tail -n 1 "$log" | sed -n 's/.*"1":"\\([^"]*\\)".*/\\1/p' | cut -c1-120)"
  done ) &
openclaw agent exec --json --timeout 900 --cwd /tmp/work "FETCH https://page.test:${llm.port}/page FETCH https://denied.test/page" > /out/turn.json 2> /out/turn.err
echo $? > /out/turn.code
env > /out/env.txt
mkdir -p /out/files
cp -r /tmp/openclaw /out/files/state 2> /dev/null
cp -r /tmp/work /out/files/work 2> /dev/null
cp -r /run/openclaw /out/files/config 2> /dev/null
cp /run/pexi/ca.pem /out/files/ 2> /dev/null
cp /etc/ssl/certs/ca-certificates.crt /out/files/system-bundle.pem 2> /dev/null
exit 0
`,
  );
  const started = Date.now();
  const child = spawn(
    pexi,
    ['vm', 'run', '--config', config, '--profile', 'openclaw', '--profile-config', path.join(dir, 'openclaw.json'), '--output', path.join(dir, 'out'), '--timeout', '1500', '--', 'sh /share/e2e/openclaw-vm.sh'],
    { env: { ...process.env, PEXI_TEST_LLM_KEY: KEY, RUST_LOG: 'warn' }, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let output = '';
  // Every line the run prints (the guest's progress lines among them) as it comes, and a line of our own
  // when nothing came for 30 s, so a slow run under emulation is never silent.
  let said = Date.now();
  const say = (text) => {
    said = Date.now();
    process.stdout.write(`[vm ${((Date.now() - started) / 1000).toFixed(0)} s] ${text}\n`);
  };
  let partial = '';
  const take = (data) => {
    output += data;
    partial += data;
    const lines = partial.split('\n');
    partial = lines.pop();
    for (const line of lines.filter((l) => l.trim())) say(line);
  };
  child.stdout.on('data', take);
  child.stderr.on('data', take);
  const ticker = setInterval(() => Date.now() - said >= 30_000 && say('pexi vm run is still running'), 5_000);
  const [code] = await once(child, 'exit');
  clearInterval(ticker);
  run = { code, output, seconds: (Date.now() - started) / 1000 };
  console.log(`pexi vm run --profile openclaw: exit ${code} after ${run.seconds.toFixed(0)} s`);
});

after(async () => {
  await llm?.stop();
  if (dir && !process.env.PEXI_KEEP) {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

const out = (name) => fs.readFileSync(path.join(dir, 'out', name), 'utf8');

test('the guest has no network device and OpenClaw completes a streamed turn with the brokered key', () => {
  assert.equal(run.code, 0, run.output);
  const links = out('links.txt').trim().split('\n');
  assert.equal(links.length, 1, links.join('\n'));
  assert.match(links[0], /: lo:/);
  assert.equal(out('turn.code').trim(), '0', out('turn.err'));
  const result = lastJson(out('turn.json'));
  assert.equal(result.ok, true);
  const calls = llm.requests.filter((r) => r.url === '/v1/chat/completions');
  assert.ok(calls.length >= 3, 'a tool call, another, then the answer');
  assert.ok(calls.every((r) => r.authorized && r.stream), 'every LLM call streamed with the real key');
  // web_fetch: the allowed page came back; the denied host was refused with pexi's reason.
  assert.ok(result.final.includes(PAGE_TEXT), 'the allowed page text');
  assert.match(result.final, /policy_denied/);
  assert.match(result.final, /host denied\.test is not in the allowlist/);
});

test("the guest trusts pexi-guestd's CA system-wide and every program gets the proxy from its environment", () => {
  const env = Object.fromEntries(
    out('env.txt')
      .split('\n')
      .filter((line) => line.includes('='))
      .map((line) => [line.slice(0, line.indexOf('=')), line.slice(line.indexOf('=') + 1)]),
  );
  const bundle = '/etc/ssl/certs/ca-certificates.crt';
  for (const name of ['SSL_CERT_FILE', 'CURL_CA_BUNDLE', 'REQUESTS_CA_BUNDLE', 'GIT_SSL_CAINFO']) {
    assert.equal(env[name], bundle, name);
  }
  assert.equal(env.NODE_EXTRA_CA_CERTS, '/run/pexi/ca.pem');
  assert.equal(env.NODE_USE_ENV_PROXY, '1');
  for (const name of ['HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy']) {
    assert.equal(env[name], 'http://127.0.0.1:3128', name);
  }
  // The system bundle is exactly the per-boot CA: nothing else is trusted in the guest.
  assert.equal(out('files/system-bundle.pem'), out('files/ca.pem'));
  assert.match(out('files/ca.pem'), /^-----BEGIN CERTIFICATE-----/);
});

test('the key is nowhere in the guest nor in the audit log, which has every request and verifies', () => {
  const { records, decisions } = auditRecords(dir);
  assert.ok(decisions.some((r) => r.request.host === 'llm.test' && r.request.secrets.includes('llm')));
  assert.ok(decisions.some((r) => r.request.host === 'page.test' && r.decision.allow));
  assert.ok(decisions.some((r) => r.request.host === 'denied.test' && !r.decision.allow));
  assert.ok(records.some((r) => r.kind === 'outcome' && r.secrets_injected?.includes('llm')));
  const places = [path.join(dir, 'audit.jsonl'), path.join(dir, 'run', 'console.log'), ...walk(path.join(dir, 'out'))];
  assert.ok(places.some((p) => p.endsWith('env.txt')) && places.some((p) => p.includes(`${path.sep}files${path.sep}`)));
  for (const file of places) {
    assert.ok(!fs.readFileSync(file).includes(KEY), `${path.relative(dir, file)} holds the key`);
  }
  assert.ok(!run.output.includes(KEY));
  assert.ok(out('files/config/openclaw.json').includes('pexi:secret:llm'));
});

