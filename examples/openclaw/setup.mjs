// What the OpenClaw end-to-end tests share: a throwaway CA and certificate for the mock LLM's names, the
// PEP's config (allowlist, DNS overrides, the brokered key), OpenClaw's config (the placeholder key), and
// reading the results.

import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const target = process.env.CARGO_TARGET_DIR ?? path.join(root, 'target');
export const pexi = path.join(target, 'debug', 'pexi');

function openssl(args) {
  execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

/** A CA (the PEP trusts it) and a certificate for `names` (llm.test and page.test), in `dir`. */
export function certificates(dir, names = ['llm.test', 'page.test']) {
  const p = (name) => path.join(dir, name);
  openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', p('ca.key'), '-out', p('ca.pem'), '-days', '2', '-subj', '/CN=pexi openclaw test CA']);
  openssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', p('llm.key'), '-out', p('llm.csr'), '-subj', `/CN=${names[0]}`]);
  fs.writeFileSync(p('san.cnf'), `subjectAltName=${names.map((n) => `DNS:${n}`).join(',')},IP:127.0.0.1\n`);
  openssl(['x509', '-req', '-in', p('llm.csr'), '-CA', p('ca.pem'), '-CAkey', p('ca.key'), '-CAcreateserial', '-out', p('llm.pem'), '-days', '2', '-extfile', p('san.cnf')]);
  return { cert: fs.readFileSync(p('llm.pem')), tlsKey: fs.readFileSync(p('llm.key')) };
}

/**
 * The default configuration (host/default-config.toml) made a test's: listening on `dir/pep.sock`, auditing to `dir/audit.jsonl`,
 * trusting `dir/ca.pem` beside the Mozilla roots, loopback allowed, each of `names` resolving to 127.0.0.1.
 * The [vm] table is left out.
 */
export function pepBaseConfig(dir, names) {
  const replace = (text, from, to) => {
    assert.ok(text.includes(from), `host/default-config.toml no longer contains ${from}`);
    return text.replace(from, to);
  };
  let config = fs.readFileSync(path.join(root, 'host', 'default-config.toml'), 'utf8');
  config = replace(config, 'listen = ["unix:{runtime_dir}/pep.sock"]', `listen = [${JSON.stringify(`unix:${dir}/pep.sock`)}]`);
  config = replace(config, 'dir = "policies"', `dir = ${JSON.stringify(path.join(root, 'policies'))}`);
  // The test's servers live on loopback; production leaves this empty.
  config = replace(config, 'allowed_cidrs = []', 'allowed_cidrs = ["127.0.0.0/8"]');
  config = replace(config, 'extra_ca_file = ""', `extra_ca_file = ${JSON.stringify(path.join(dir, 'ca.pem'))}`);
  const overrides = names.map((name) => `${JSON.stringify(name)} = ["127.0.0.1"]\n`).join('');
  config = replace(config, '[pep.network.dns_overrides]\n', `[pep.network.dns_overrides]\n${overrides}`);
  config = replace(config, 'path = "{state_dir}/audit.jsonl"', `path = ${JSON.stringify(path.join(dir, 'audit.jsonl'))}`);
  return config.replace(/\n\[vm\][\s\S]*$/, '\n');
}

/** `pexi serve` on `dir/config.toml` (its log in `dir/pep.log`), once its socket `dir/pep.sock` exists. */
export async function startPep(dir, env = process.env) {
  const child = spawn(pexi, ['serve', '--config', path.join(dir, 'config.toml')], {
    env,
    stdio: ['ignore', 'ignore', fs.openSync(path.join(dir, 'pep.log'), 'w')],
  });
  const deadline = Date.now() + 20_000;
  while (!fs.existsSync(path.join(dir, 'pep.sock'))) {
    assert.ok(child.exitCode === null, 'pexi serve exited');
    assert.ok(Date.now() < deadline, 'pexi serve did not start');
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return child;
}

/**
 * The PEP's config in `dir` for the mock LLM: its names allowed, the key brokered from
 * `$PEXI_TEST_LLM_KEY`; `extra` is appended (a [vm] table, say).
 */
export function pepConfig(dir, port, extra = '') {
  let config = pepBaseConfig(dir, ['llm.test', 'page.test']);
  config += `
[[pep.policy.allow]]
host = "llm.test"
ports = [${port}]
methods = ["POST"]
paths = ["/v1/"]

[[pep.policy.allow]]
host = "page.test"
ports = [${port}]

[[secrets]]
name = "llm"
env = "PEXI_TEST_LLM_KEY"
header = "authorization"
template = "Bearer {secret}"
hosts = ["llm.test"]
${extra}`;
  const file = path.join(dir, 'config.toml');
  fs.writeFileSync(file, config);
  return file;
}

/**
 * The guest the VM tests boot: PEXI_VM_ARCH=arm64 for the arm64 image (`scripts/vm-image --arch arm64`,
 * OpenClaw from `scripts/test-openclaw --arm64`) and PEXI_VM_RUNNER=vfkit for the macOS runner's command
 * line booted by test-support/vfkit-shim; the x86_64 image under QEMU otherwise.
 */
export function vmGuest() {
  const arm64 = process.env.PEXI_VM_ARCH === 'arm64';
  const runner = process.env.PEXI_VM_RUNNER ?? 'qemu';
  return {
    arm64,
    runner,
    image: path.join(target, arm64 ? 'vm-arm64' : 'vm'),
    kernel: arm64 ? 'Image' : 'vmlinux',
    openclaw: path.join(target, arm64 ? 'openclaw-arm64' : 'openclaw'),
  };
}

/** A [vm] table for `pexi vm run --profile openclaw` on the image of scripts/vm-image (virtio-serial only under QEMU). */
export function vmTable(runDir) {
  const guest = vmGuest();
  const runner =
    guest.runner === 'vfkit'
      ? `runner = "vfkit"\nvfkit = ${JSON.stringify(path.join(root, 'test-support', 'vfkit-shim'))}`
      : 'runner = "qemu"';
  return `
[vm]
arch = ${JSON.stringify(guest.arm64 ? 'aarch64' : 'x86_64')}
${runner}
kernel = ${JSON.stringify(path.join(guest.image, guest.kernel))}
initrd = ${JSON.stringify(path.join(guest.image, 'initramfs.cpio.gz'))}
memory_mb = 768
cpus = 1
share = ${JSON.stringify(path.join(guest.image, 'share'))}
share_writable = false
accel = "auto"
kvm_probe_seconds = 10
qemu = ${JSON.stringify(guest.arm64 ? 'qemu-system-aarch64' : 'qemu-system-x86_64')}
vhost_device_vsock = ""
guest_cid = 3
run_dir = ${JSON.stringify(runDir)}
command = "sh"

[vm.profiles.openclaw]
dir = ${JSON.stringify(guest.openclaw)}
command = "true"
`;
}

/** OpenClaw's config: the mock provider with the placeholder key, the guest proxy, web_fetch through it. */
export function openclawConfig(port, logFile) {
  return {
    agents: { defaults: { model: { primary: 'mock/mock-model' } } },
    models: {
      mode: 'replace',
      providers: {
        mock: {
          baseUrl: `https://llm.test:${port}/v1`,
          // The placeholder: the PEP swaps in the key on requests to llm.test only.
          apiKey: 'pexi:secret:llm',
          api: 'openai-completions',
          models: [{ id: 'mock-model', name: 'Mock Model', reasoning: false, input: ['text'], cost: { input: 0, output: 0, cacheRead: 0, cacheWrite: 0 }, contextWindow: 128000, maxTokens: 4096 }],
        },
      },
    },
    update: { checkOnStart: false },
    telemetry: { enabled: false },
    discovery: { mdns: { mode: 'off' } },
    logging: { file: logFile },
    proxy: { proxyUrl: 'http://127.0.0.1:3128' },
    tools: { web: { fetch: { useTrustedEnvProxy: true } } },
  };
}

/** `agent exec --json` prints one JSON object; OpenClaw may log lines before it. */
export function lastJson(text) {
  return JSON.parse(text.slice(text.indexOf('{\n')));
}

/** Every file under `folder`. */
export function walk(folder) {
  return fs.readdirSync(folder, { withFileTypes: true }).flatMap((entry) => {
    const full = path.join(folder, entry.name);
    return entry.isDirectory() ? walk(full) : entry.isFile() ? [full] : [];
  });
}

/** The audit log's records, checked: every pep.http.request decision has an outcome, the chain verifies. */
export function auditRecords(dir) {
  const file = path.join(dir, 'audit.jsonl');
  const records = fs
    .readFileSync(file, 'utf8')
    .trim()
    .split('\n')
    .map((line) => JSON.parse(line));
  const decisions = records.filter((r) => r.kind === 'decision' && r.method === 'pep.http.request');
  const outcomes = new Set(records.filter((r) => r.kind === 'outcome').map((r) => r.decision_id));
  for (const decision of decisions) {
    assert.ok(outcomes.has(decision.decision_id), `an outcome for ${decision.request.url}`);
  }
  execFileSync(pexi, ['audit', 'verify', file]);
  return { records, decisions };
}
