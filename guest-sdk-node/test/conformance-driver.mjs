// The Node addon's driver for the guest conformance runner (protocol/conformance/README.md): reads one
// action as a JSON line on stdin, performs it through the public @pexi/guest API (`fetch`, `check`) against
// PEXI_ENDPOINT, prints the outcome as one JSON line, and exits when stdin closes.
//
//   pexi-conformance guest --name node -- node guest-sdk-node/test/conformance-driver.mjs
import { createHash } from 'node:crypto';
import { createInterface } from 'node:readline';
import pexi, { PexiError } from '../index.mjs';

// The scenarios' outcomes name the ERROR the host sent (code, reasons): fetch's refusals as errors, not as
// the 403 responses it gives programs by default (test/fetch.test.mjs covers those).
process.env.PEXI_FETCH_REFUSALS = 'throw';

/** The body the scenarios move: `a` to `z`, repeating. */
function pattern(size) {
  const body = Buffer.alloc(size);
  for (let i = 0; i < size; i++) body[i] = 97 + (i % 26);
  return body;
}

function failure(error) {
  const cause = error instanceof PexiError ? error : error?.cause instanceof PexiError ? error.cause : null;
  if (!cause) return { error: { code: 'driver', message: String(error?.stack ?? error) } };
  return { error: { code: cause.code, retryable: cause.retryable, reasons: cause.reasons } };
}

async function request(spec) {
  const init = { method: spec.method ?? 'GET', headers: spec.headers ?? [] };
  if (spec.body_bytes !== undefined) init.body = pattern(spec.body_bytes);
  else if (spec.body !== undefined) init.body = spec.body;
  let response;
  try {
    response = await pexi.fetch(spec.url, init);
  } catch (error) {
    return failure(error);
  }
  if (spec.cancel_after_head) {
    await response.body?.cancel();
    return { status: response.status, cancelled: true };
  }
  let body;
  try {
    body = Buffer.from(await response.arrayBuffer());
  } catch (error) {
    return { ...failure(error), status: response.status };
  }
  const outcome = {
    status: response.status,
    body_bytes: body.length,
    body_sha256: createHash('sha256').update(body).digest('hex'),
  };
  if (body.length <= 4096) {
    try {
      outcome.body = new TextDecoder('utf-8', { fatal: true }).decode(body);
    } catch {}
  }
  return outcome;
}

async function perform(action) {
  if (action.check) {
    try {
      const decision = await pexi.check(action.check.method ?? 'GET', action.check.url);
      return { allow: decision.allow, reasons: decision.reasons, decision_id: decision.decisionId };
    } catch (error) {
      return failure(error);
    }
  }
  if (action.request) return request(action.request);
  if (action.sequence) {
    const results = [];
    for (const sub of action.sequence) results.push(await perform(sub));
    return { results };
  }
  if (action.concurrent) return { results: await Promise.all(action.concurrent.map(perform)) };
  if (action.sleep_ms !== undefined) {
    await new Promise((resolve) => setTimeout(resolve, action.sleep_ms));
    return { slept: action.sleep_ms };
  }
  return { error: { code: 'driver', message: `unknown action ${JSON.stringify(action)}` } };
}

const lines = createInterface({ input: process.stdin });
let started = false;
lines.on('line', async (line) => {
  if (started) return;
  started = true;
  let outcome;
  try {
    outcome = await perform(JSON.parse(line));
  } catch (error) {
    outcome = { error: { code: 'driver', message: String(error?.stack ?? error) } };
  }
  process.stdout.write(`${JSON.stringify(outcome)}\n`);
});
// The session stays up until the runner is done with it: it closes stdin.
lines.on('close', () => setTimeout(() => process.exit(0), 0));
