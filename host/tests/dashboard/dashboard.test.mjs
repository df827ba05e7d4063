// The dashboard in a real browser (docs/approvals.md): Debian's Chromium, headless, driven by puppeteer-core,
// against a real `pexi serve` with approvals on, a real loopback upstream and the @pexi/guest addon as the
// guest. A request to an unlisted host shows up as a question, the test clicks "Allow always", the held
// request completes, and the next one is allowed by the policy without a question. Screenshots of the page
// are saved under target/dashboard/ (docs/approvals.md shows them).

import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { after, test } from 'node:test';

import puppeteer from 'puppeteer-core';

import { connect, fetch } from '../../../guest-sdk-node/index.mjs';
import { repoRoot, startPep, startUpstream } from '../../../guest-sdk-node/test/support.mjs';

const chromium = process.env.PEXI_CHROMIUM ?? '/usr/bin/chromium';
const shots = process.env.PEXI_SCREENSHOTS ?? path.join(process.env.CARGO_TARGET_DIR ?? path.join(repoRoot, 'target'), 'dashboard');

let upstream;
let pep;
let browser;

after(async () => {
  await browser?.close();
  await pep?.stop();
  await upstream?.stop();
});

/** GET on the PEP's control socket (owner-only; this test runs as the PEP's user). */
function control(socketPath, urlPath) {
  return new Promise((resolve, reject) => {
    http
      .get({ socketPath, path: urlPath, headers: { host: 'pexi' } }, (res) => {
        let body = '';
        res.on('data', (chunk) => { body += chunk; });
        res.on('end', () => resolve({ status: res.statusCode, body: JSON.parse(body) }));
      })
      .on('error', reject);
  });
}

test('a question answered "Allow always" in the dashboard releases the request and asks no more', async () => {
  assert.ok(fs.existsSync(chromium), `${chromium} is missing: apt-get install chromium (scripts/setup does)`);
  fs.mkdirSync(shots, { recursive: true });
  upstream = await startUpstream();
  pep = await startPep({
    tag: 'dashboard',
    approvals: { timeoutMs: 60_000 },
    dnsOverrides: { 'new.test': '127.0.0.1' },
  });
  connect({ endpoint: pep.endpoint });

  const dashboard = await control(pep.controlSocket, '/api/dashboard');
  assert.equal(dashboard.status, 200, JSON.stringify(dashboard.body));
  browser = await puppeteer.launch({
    executablePath: chromium,
    headless: true,
    // Root in CI: Chromium's sandbox needs user namespaces it does not get there.
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-dev-shm-usage'],
  });
  const page = await browser.newPage();
  await page.setViewport({ width: 1280, height: 860 });
  const problems = [];
  page.on('pageerror', (error) => problems.push(String(error)));
  page.on('console', (message) => { if (message.type() === 'error') problems.push(message.text()); });

  await page.goto(dashboard.body.url);
  // The token was traded for a cookie: it is not in the address bar any more.
  assert.equal(new URL(page.url()).search, '');
  await page.waitForSelector('body[data-live="yes"]');

  const target = `http://new.test:${upstream.port}/echo`;
  const held = fetch(target);
  await page.waitForSelector('#questions li');
  const shown = await page.$eval('#questions li .what', (el) => el.textContent);
  assert.equal(shown, `GET ${target}`);
  await page.waitForSelector('#decisions tbody tr.ask');
  await page.screenshot({ path: path.join(shots, 'dashboard-question.png') });

  await page.click('#questions li button[data-answer="allow_always"]');
  const first = await held;
  assert.equal(first.status, 200);
  await first.arrayBuffer();
  await page.waitForFunction(() => document.querySelectorAll('#questions li').length === 0);

  // The answer is an entry in force now: no question for the same host again.
  const second = await fetch(target);
  assert.equal(second.status, 200);
  await second.arrayBuffer();
  await page.waitForSelector('#decisions tbody tr.allow');
  await page.waitForFunction(
    () => [...document.querySelectorAll('#entries tbody tr')].some((row) => row.textContent.includes('new.test')),
  );
  await page.waitForFunction(
    () => [...document.querySelectorAll('#decisions tbody td.outcome')].filter((td) => td.textContent.startsWith('200')).length === 2,
  );
  // Verified again, now with the question, the answer and both requests in the chain.
  await page.click('#verify');
  await page.waitForFunction(() => {
    const badge = document.querySelector('#audit');
    const found = /verified: (\d+) records/.exec(badge.textContent);
    return badge.classList.contains('ok') && found && Number(found[1]) >= 8;
  });
  await page.waitForFunction(
    () => [...document.querySelectorAll('#hosts tbody tr')].some(
      (row) => [...row.cells].map((td) => td.textContent).join(' ') === 'new.test 1 0 1',
    ),
  );
  await page.screenshot({ path: path.join(shots, 'dashboard-answered.png'), fullPage: true });
  assert.deepEqual(problems, [], 'the page logged errors');

  // The audit: the question, the answer (through the dashboard), both decisions.
  const answer = await pep.waitRecord((r) => r.kind === 'approval_answer');
  assert.equal(answer.answer, 'allow_always');
  assert.equal(answer.surface, 'dashboard');
  assert.deepEqual(answer.entry, { host: 'new.test', ports: [upstream.port], schemes: ['http'] });
  const records = pep.records();
  const questions = records.filter((r) => r.kind === 'approval_question');
  assert.equal(questions.length, 1);
  assert.equal(questions[0].url, target);
  const decisions = records.filter((r) => r.kind === 'decision');
  assert.equal(decisions.length, 2);
  assert.equal(decisions[0].decision_id, questions[0].decision_id);
  assert.deepEqual(decisions[0].decision.ask, { scope: 'host' });
  assert.equal(decisions[0].decision.allow, false);
  assert.equal(decisions[1].decision.allow, true);
  assert.deepEqual(decisions[1].decision.reasons, ['allowed by allowlist entry new.test']);
});

test('the dashboard refuses a wrong Host, a missing token and a cross-origin answer', async () => {
  const { url } = (await control(pep.controlSocket, '/api/dashboard')).body;
  const address = new URL(url);
  const token = address.searchParams.get('token');
  const ask = (urlPath, { method = 'GET', headers = {} } = {}) => new Promise((resolve, reject) => {
    const req = http.request({ host: address.hostname, port: address.port, path: urlPath, method, headers }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode));
    });
    req.on('error', reject);
    req.end(method === 'POST' ? '{"answer":"allow_once"}' : undefined);
  });
  const cookie = `pexi_dashboard=${token}`;
  assert.equal(await ask('/api/status', { headers: { cookie } }), 200);
  assert.equal(await ask('/api/status'), 401, 'no token');
  assert.equal(await ask('/api/status', { headers: { cookie: 'pexi_dashboard=00' } }), 401, 'wrong token');
  assert.equal(await ask('/api/status', { headers: { cookie, host: `rebound.example:${address.port}` } }), 421, 'DNS rebinding');
  assert.equal(
    await ask('/api/questions/x/answer', { method: 'POST', headers: { cookie, origin: 'http://evil.example', 'content-type': 'application/json' } }),
    403,
    'a cross-site page answering',
  );
  assert.equal(await ask('/api/dashboard', { headers: { cookie } }), 404, 'the page cannot read its own token');
});
