// The same OpenClaw turn ("Say hello.", one streamed LLM call against the mock over HTTPS) three ways,
// timed side by side in one run: directly on the host (no VM, no pexi, the key in OpenClaw's config),
// through pexi without a VM (a loopback-only network namespace, pexi-guestd, the PEP, the key brokered),
// and inside the no-NIC VM (`pexi vm run --profile openclaw`). Prints seconds and ratios. Run by
// scripts/bench-openclaw; see docs/benchmarks.md for figures and the emulation caveat.

import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { startMockLlm } from './mock-llm.mjs';
import { certificates, lastJson, openclawConfig, pepConfig, pexi, target, vmTable } from './setup.mjs';

const KEY = `sk-bench-${crypto.randomBytes(8).toString('hex')}`;
const node = process.execPath;
const openclaw = path.join(target, 'openclaw', 'node_modules', 'openclaw', 'openclaw.mjs');
const guestd = path.join(target, 'debug', 'pexi-guestd');
const image = path.join(target, 'vm');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pexi-bench-openclaw-'));
const llm = await startMockLlm({ key: KEY, ...certificates(dir) });
const quiet = { OPENCLAW_NO_AUTO_UPDATE: '1', OPENCLAW_DISABLE_BONJOUR: '1', DO_NOT_TRACK: '1', OPENCLAW_SKIP_CHANNELS: '1' };

async function run(command, args, env) {
  const started = process.hrtime.bigint();
  const child = spawn(command, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  const [code] = await once(child, 'exit');
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  if (code !== 0) {
    throw new Error(`${command} ${args.join(' ')}: exit ${code}\n${stderr.slice(-2000)}`);
  }
  return { seconds, stdout, stderr };
}

function folders(name) {
  const base = path.join(dir, name);
  for (const sub of ['state', 'home', 'tmp', 'work']) {
    fs.mkdirSync(path.join(base, sub), { recursive: true });
  }
  return base;
}

// 1. Directly on the host: OpenClaw with the real key, straight to the mock.
const direct = folders('direct');
const directConfig = openclawConfig(llm.port, path.join(direct, 'openclaw.log'));
directConfig.models.providers.mock.baseUrl = `https://127.0.0.1:${llm.port}/v1`;
directConfig.models.providers.mock.apiKey = KEY;
delete directConfig.proxy;
fs.writeFileSync(path.join(direct, 'openclaw.json'), JSON.stringify(directConfig));
const directRun = await run(node, [openclaw, 'agent', 'exec', '--json', '--timeout', '300', '--cwd', path.join(direct, 'work'), '--config', path.join(direct, 'openclaw.json'), 'Say hello.'], {
  PATH: process.env.PATH, HOME: path.join(direct, 'home'), TMPDIR: path.join(direct, 'tmp'), OPENCLAW_STATE_DIR: path.join(direct, 'state'),
  OPENCLAW_CONFIG_PATH: path.join(direct, 'openclaw.json'), NODE_EXTRA_CA_CERTS: path.join(dir, 'ca.pem'), ...quiet,
});
if (!lastJson(directRun.stdout).ok) throw new Error('the direct turn failed');

// 2. Through pexi without a VM: a loopback-only namespace, pexi-guestd, the PEP (key brokered).
const config = pepConfig(dir, llm.port, vmTable(path.join(dir, 'run')));
const pep = spawn(pexi, ['serve', '--config', config], { env: { ...process.env, PEXI_TEST_LLM_KEY: KEY, RUST_LOG: 'warn' }, stdio: 'ignore' });
while (!fs.existsSync(path.join(dir, 'pep.sock'))) await new Promise((r) => setTimeout(r, 50));
const ns = folders('netns');
fs.writeFileSync(path.join(ns, 'openclaw.json'), JSON.stringify(openclawConfig(llm.port, path.join(ns, 'openclaw.log'))));
fs.writeFileSync(path.join(ns, 'run.sh'), `ip link set lo up
"$GUESTD" --endpoint unix:${dir}/pep.sock --listen 127.0.0.1:3128 --ca-cert ${ns}/ca.pem --socket ${ns}/pexi.sock --deny-connect tunnel > ${ns}/guestd.out 2>&1 &
GUESTD_PID=$!
for i in $(seq 100); do [ -s ${ns}/guestd.out ] && break; sleep 0.05; done
start=$(date +%s.%N)
"$NODE" "$OPENCLAW" agent exec --json --timeout 300 --cwd ${ns}/work --config ${ns}/openclaw.json "Say hello." > ${ns}/turn.json 2> ${ns}/turn.err
code=$?
end=$(date +%s.%N)
echo "$start $end" > ${ns}/times
kill $GUESTD_PID
exit $code
`);
await run('unshare', ['-n', 'sh', path.join(ns, 'run.sh')], {
  PATH: process.env.PATH, NODE: node, OPENCLAW: openclaw, GUESTD: guestd, HOME: path.join(ns, 'home'), TMPDIR: path.join(ns, 'tmp'),
  OPENCLAW_STATE_DIR: path.join(ns, 'state'), OPENCLAW_CONFIG_PATH: path.join(ns, 'openclaw.json'), NODE_EXTRA_CA_CERTS: path.join(ns, 'ca.pem'),
  OPENCLAW_PROXY_URL: 'http://127.0.0.1:3128', HTTPS_PROXY: 'http://127.0.0.1:3128', HTTP_PROXY: 'http://127.0.0.1:3128', NO_PROXY: 'localhost,127.0.0.1,::1', ...quiet,
});
const [nsStart, nsEnd] = fs.readFileSync(path.join(ns, 'times'), 'utf8').trim().split(' ').map(Number);
if (!lastJson(fs.readFileSync(path.join(ns, 'turn.json'), 'utf8')).ok) throw new Error('the netns turn failed');
pep.kill('SIGTERM');
await once(pep, 'exit');

// 3. Inside the no-NIC VM.
fs.writeFileSync(path.join(dir, 'vm-openclaw.json'), JSON.stringify(openclawConfig(llm.port, '/tmp/openclaw/openclaw.log')));
fs.mkdirSync(path.join(image, 'share', 'e2e'), { recursive: true });
fs.writeFileSync(path.join(image, 'share', 'e2e', 'bench-openclaw.sh'), `start=$(date +%s)
openclaw agent exec --json --timeout 1200 --cwd /tmp/work "Say hello." > /out/turn.json 2> /out/turn.err
code=$?
echo "$start $(date +%s)" > /out/times
exit $code
`);
const vmRun = await run(pexi, ['vm', 'run', '--config', config, '--profile', 'openclaw', '--profile-config', path.join(dir, 'vm-openclaw.json'), '--output', path.join(dir, 'out'), '--timeout', '1500', '--', 'sh /share/e2e/bench-openclaw.sh'], {
  ...process.env, PEXI_TEST_LLM_KEY: KEY, RUST_LOG: 'warn',
});
const [vmStart, vmEnd] = fs.readFileSync(path.join(dir, 'out', 'times'), 'utf8').trim().split(' ').map(Number);
if (!lastJson(fs.readFileSync(path.join(dir, 'out', 'turn.json'), 'utf8')).ok) throw new Error('the VM turn failed');
const accel = /software emulation \(TCG\)/.test(vmRun.stderr + vmRun.stdout) ? 'TCG' : 'KVM';

const rows = [
  ['directly on the host (no VM, no pexi)', directRun.seconds],
  ['through pexi, no VM (netns + pexi-guestd + PEP)', nsEnd - nsStart],
  [`inside the no-NIC VM (${accel}), the turn`, vmEnd - vmStart],
  [`inside the no-NIC VM (${accel}), boot to power-off`, vmRun.seconds],
];
console.log(`machine: ${os.cpus().length} cores, ${Math.round(os.totalmem() / 2 ** 30)} GiB, ${os.release()}, ${new Date().toISOString().slice(0, 10)}`);
console.log('one OpenClaw `agent exec --json "Say hello."` turn, seconds');
for (const [what, seconds] of rows) {
  console.log(`  ${what.padEnd(58)} ${seconds.toFixed(1).padStart(7)}  ${(seconds / directRun.seconds).toFixed(2)}x`);
}
await llm.stop();
fs.rmSync(dir, { recursive: true, force: true });
