// The official OpenAI and Anthropic SDKs stream a completion through @pexi/guest: once given pexi's fetch,
// once unmodified under the `register` preload.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import Anthropic from '@anthropic-ai/sdk';
import OpenAI from 'openai';

import { connect, fetch } from '@pexi/guest';

import { LLM_TOKENS, appDir, runNode, startMockLlm, startPep } from './support.mjs';

let llm;
let pep;
let dir;

before(async () => {
  llm = await startMockLlm();
  pep = await startPep({ allow: [{ host: '127.0.0.1', ports: [llm.port] }], tag: 'sdk' });
  connect({ endpoint: pep.endpoint });
  dir = appDir('sdk-app', ['openai', '@anthropic-ai/sdk']);
});

after(async () => {
  await pep?.stop();
  await llm?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

// The same calls, as a user's program makes them; `options` is where a fetch would be passed.
async function openaiTurn(OpenAIClass, base, key, options = {}) {
  const client = new OpenAIClass({ apiKey: key, baseURL: `${base}/v1`, maxRetries: 0, ...options });
  const stream = await client.chat.completions.create({
    model: 'gpt-test',
    messages: [{ role: 'user', content: 'Say hello' }],
    stream: true,
  });
  const tokens = [];
  for await (const chunk of stream) {
    const token = chunk.choices[0]?.delta?.content;
    if (token) {
      tokens.push(token);
    }
  }
  return tokens;
}

async function anthropicTurn(AnthropicClass, base, key, options = {}) {
  const client = new AnthropicClass({ apiKey: key, baseURL: base, maxRetries: 0, ...options });
  const stream = client.messages.stream({
    model: 'claude-test',
    max_tokens: 64,
    messages: [{ role: 'user', content: 'Say hello' }],
  });
  const tokens = [];
  stream.on('text', (token) => tokens.push(token));
  const message = await stream.finalMessage();
  return { tokens, text: message.content[0].text, stop: message.stop_reason };
}

async function assertThroughPep(pathname) {
  const decision = pep
    .records()
    .findLast((r) => r.kind === 'decision' && r.request.path === pathname && r.request.method === 'POST');
  assert.ok(decision, `the audit log has POST ${pathname}`);
  assert.equal(decision.decision.allow, true);
  // The key is redacted in the log; its digest correlates requests without revealing it.
  const keyHeaders = ['authorization', 'x-api-key'].filter((name) => name in decision.request.headers);
  assert.ok(keyHeaders.length > 0, 'the SDK sent its key');
  for (const name of keyHeaders) {
    assert.deepEqual(decision.request.headers[name], ['[redacted]']);
  }
  assert.ok(!JSON.stringify(decision).includes(llm.key));
  const outcome = await pep.waitRecord((r) => r.kind === 'outcome' && r.decision_id === decision.decision_id);
  assert.equal(outcome.status, 200);
}

describe('with the SDK fetch option', () => {
  test('openai streams a chat completion', async () => {
    const tokens = await openaiTurn(OpenAI, llm.base, llm.key, { fetch });
    assert.deepEqual(tokens, LLM_TOKENS);
    await assertThroughPep('/v1/chat/completions');
  });

  test('@anthropic-ai/sdk streams a message', async () => {
    const result = await anthropicTurn(Anthropic, llm.base, llm.key, { fetch });
    assert.deepEqual(result.tokens, LLM_TOKENS);
    assert.equal(result.text, LLM_TOKENS.join(''));
    assert.equal(result.stop, 'end_turn');
    await assertThroughPep('/v1/messages');
  });

  // With their default retries: a 403 is not retried, so one refusal is one denied decision.
  for (const [name, call] of [
    ['openai', () => new OpenAI({ apiKey: 'k', baseURL: 'https://api.denied.example/v1', fetch }).models.list()],
    [
      '@anthropic-ai/sdk',
      () =>
        new Anthropic({ apiKey: 'k', baseURL: 'https://api.denied.example', fetch }).messages.create({
          model: 'm',
          max_tokens: 1,
          messages: [{ role: 'user', content: 'hi' }],
        }),
    ],
  ]) {
    test(`${name} sees a policy denial as its permission error with pexi's reason, and does not retry`, async () => {
      const before = pep.records().filter((r) => r.kind === 'decision' && r.request.host === 'api.denied.example').length;
      await assert.rejects(call(), (error) => {
        assert.equal(error.constructor.name, 'PermissionDeniedError');
        assert.equal(error.status, 403);
        assert.match(error.message, /pexi refused this request \(policy_denied\): host api\.denied\.example is not in the allowlist/);
        assert.equal(error.headers.get?.('x-pexi-error') ?? error.headers['x-pexi-error'], 'policy_denied');
        return true;
      });
      const after = pep.records().filter((r) => r.kind === 'decision' && r.request.host === 'api.denied.example').length;
      assert.equal(after - before, 1, 'one request, not retried');
    });
  }
});

describe('unmodified, under node --import @pexi/guest/register', () => {
  // The program a user already has: no fetch option, no mention of pexi.
  const program = (sdk) => `
import ${sdk === 'openai' ? 'OpenAI' : 'Anthropic'} from '${sdk}';
const [base, key] = process.argv.slice(2);
${(sdk === 'openai' ? openaiTurn : anthropicTurn).toString()}
const result = await ${sdk === 'openai' ? 'openaiTurn(OpenAI' : 'anthropicTurn(Anthropic'}, base, key);
console.log(JSON.stringify(result));
`;

  for (const sdk of ['openai', '@anthropic-ai/sdk']) {
    test(`${sdk} streams through the PEP`, async () => {
      const script = path.join(dir, `${sdk.replace(/[@/]/g, '_')}.mjs`);
      fs.writeFileSync(script, program(sdk));
      const before = pep.records().filter((r) => r.kind === 'decision').length;
      const { code, stdout, stderr } = await runNode(['--import', '@pexi/guest/register', script, llm.base, llm.key], {
        cwd: dir,
        env: { PEXI_ENDPOINT: pep.endpoint },
      });
      assert.equal(code, 0, stderr);
      const result = JSON.parse(stdout.trim());
      const tokens = sdk === 'openai' ? result : result.tokens;
      assert.deepEqual(tokens, LLM_TOKENS);
      assert.equal(pep.records().filter((r) => r.kind === 'decision').length, before + 1);
      await assertThroughPep(sdk === 'openai' ? '/v1/chat/completions' : '/v1/messages');
    });
  }
});
