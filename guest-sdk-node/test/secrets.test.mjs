// Credential brokering with the official SDKs: the guest program holds only `pexi:secret:NAME`, the PEP
// holds the key (in its own environment) and puts it in only on requests to the key's host. The program
// runs in its own Node process, unmodified, under the register preload, as an agent would.

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { LLM_TOKENS, appDir, runNode, startMockLlm, startPep } from './support.mjs';

// Unique per run: a match anywhere can only come from this run.
const KEY = `sk-pexi-node-${crypto.randomBytes(12).toString('hex')}`;

let llm;
let other;
let pep;
let dir;

before(async () => {
  llm = await startMockLlm({ key: KEY });
  // Another allowlisted host, on another loopback address, that would accept the key if it got it.
  other = await startMockLlm({ key: KEY, host: '127.0.0.2' });
  pep = await startPep({
    allow: [
      { host: '127.0.0.1', ports: [llm.port] },
      { host: '127.0.0.2', ports: [other.port] },
    ],
    tag: 'secrets',
    env: { PEXI_TEST_OPENAI_KEY: KEY, PEXI_TEST_ANTHROPIC_KEY: KEY, RUST_LOG: 'trace' },
    // The mock LLMs speak plain HTTP: the keys may go in the clear only because the entries say so.
    secrets: [
      { name: 'openai', env: 'PEXI_TEST_OPENAI_KEY', header: 'authorization', template: 'Bearer {secret}', hosts: ['127.0.0.1'], schemes: ['http'] },
      { name: 'anthropic', env: 'PEXI_TEST_ANTHROPIC_KEY', header: 'x-api-key', hosts: ['127.0.0.1'], schemes: ['http'] },
    ],
  });
  dir = appDir('secrets-app', ['openai', '@anthropic-ai/sdk']);
});

after(async () => {
  await pep?.stop();
  await llm?.stop();
  await other?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

// An ordinary program: the key it is given is the placeholder.
const program = `
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
const [openaiBase, anthropicBase] = process.argv.slice(2);
const out = { openai: [], anthropic: [], refused: null };
const openai = new OpenAI({ apiKey: 'pexi:secret:openai', baseURL: openaiBase + '/v1', maxRetries: 0 });
const stream = await openai.chat.completions.create({ model: 'gpt-test', messages: [{ role: 'user', content: 'hi' }], stream: true });
for await (const chunk of stream) {
  const token = chunk.choices[0]?.delta?.content;
  if (token) out.openai.push(token);
}
const anthropic = new Anthropic({ apiKey: 'pexi:secret:anthropic', baseURL: anthropicBase, maxRetries: 0 });
const message = anthropic.messages.stream({ model: 'claude-test', max_tokens: 64, messages: [{ role: 'user', content: 'hi' }] });
message.on('text', (token) => out.anthropic.push(token));
await message.finalMessage();
// The same placeholder, pointed at another allowed host.
const elsewhere = new OpenAI({ apiKey: 'pexi:secret:openai', baseURL: process.argv[4] + '/v1', maxRetries: 0 });
try {
  await elsewhere.chat.completions.create({ model: 'gpt-test', messages: [{ role: 'user', content: 'hi' }] });
} catch (error) {
  // A 403 from pexi: the SDK's permission error, its body pexi's refusal.
  out.refused = { name: error.constructor.name, status: error.status, ...error.error };
}
out.env = Object.values(process.env).join('\\n');
console.log(JSON.stringify(out));
`;

test('the SDKs stream with the brokered keys; the key is never in the guest, its output or the logs', async () => {
  const script = path.join(dir, 'agent.mjs');
  fs.writeFileSync(script, program);
  const env = { PEXI_ENDPOINT: pep.endpoint };
  const { code, stdout, stderr } = await runNode(
    ['--import', '@pexi/guest/register', script, llm.base, llm.base, other.base],
    { cwd: dir, env },
  );
  assert.equal(code, 0, stderr);
  const out = JSON.parse(stdout.trim());
  assert.deepEqual(out.openai, LLM_TOKENS, 'OpenAI streamed with the real key');
  assert.deepEqual(out.anthropic, LLM_TOKENS, 'Anthropic streamed with the real key');

  // The mock saw the real key on both calls; the guest only ever had the placeholder.
  const seen = llm.requests.filter((r) => r.method === 'POST');
  assert.equal(seen.length, 2);
  assert.equal(seen[0].headers.authorization, `Bearer ${KEY}`);
  assert.equal(seen[1].headers['x-api-key'], KEY);

  // Another allowlisted host: refused with pexi's code, and nothing reached it.
  assert.equal(out.refused?.name, 'PermissionDeniedError', JSON.stringify(out.refused));
  assert.equal(out.refused.code, 'secret_not_allowed', JSON.stringify(out.refused));
  assert.match(out.refused.message, /pexi refused this request \(secret_not_allowed\): .*not for 127\.0\.0\.2/);
  assert.equal(other.requests.length, 0);

  // The audit log names the secrets, never their value.
  const records = pep.records();
  const decisions = records.filter((r) => r.kind === 'decision' && r.request.method === 'POST');
  assert.deepEqual(
    decisions.map((r) => r.request.secrets),
    [['openai'], ['anthropic'], ['openai']],
  );
  // The refusal names the decision it followed, so the agent can find it in the audit log.
  assert.equal(out.refused.decision_id, decisions[2].decision_id, JSON.stringify(out.refused));
  const injected = records.filter((r) => r.kind === 'outcome' && r.secrets_injected?.length);
  assert.equal(injected.length, 2);

  // Not in the guest's environment, output or errors; not in anything the PEP wrote.
  for (const [what, text] of [
    ['guest environment', out.env],
    ['guest stdout', stdout],
    ['guest stderr', stderr],
  ]) {
    assert.ok(!text.includes(KEY), `the key is in the ${what}`);
  }
  await pep.stop({ keep: true });
  const log = fs.readFileSync(path.join(pep.dir, 'pep.log'), 'utf8');
  assert.match(log, /TRACE/, 'the PEP logged at trace level');
  for (const name of fs.readdirSync(pep.dir, { recursive: true })) {
    const file = path.join(pep.dir, name);
    if (fs.statSync(file).isFile()) {
      assert.ok(!fs.readFileSync(file).includes(KEY), `${name} holds the key`);
    }
  }
});
