// @pexi/guest's fetch against a real `pexi serve` and real loopback servers.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { Readable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';

import pexi, { PexiError, check, connect, fetch } from '@pexi/guest';

import { patternBytes, startPep, startUpstream } from './support.mjs';

let upstream;
let pep;

before(async () => {
  upstream = await startUpstream();
  pep = await startPep({ allow: [{ host: '127.0.0.1', ports: [upstream.port] }], tag: 'fetch' });
  connect({ endpoint: pep.endpoint });
});

after(async () => {
  await pep?.stop();
  await upstream?.stop();
});

async function echo(init) {
  const response = await fetch(`${upstream.base}/echo`, init);
  assert.equal(response.status, 200);
  const seen = await response.json();
  return { ...seen, body: Buffer.from(seen.body, 'base64') };
}

async function waitFor(predicate, what, timeoutMs = 10_000) {
  const end = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > end) {
      assert.fail(`timed out waiting for ${what}`);
    }
    await sleep(20);
  }
}

describe('requests', () => {
  test('GET returns a real Response with real Headers', async () => {
    const response = await fetch(`${upstream.base}/hello`);
    assert.ok(response instanceof Response);
    assert.ok(response.headers instanceof Headers);
    assert.equal(response.status, 200);
    assert.equal(response.statusText, 'OK');
    assert.equal(response.ok, true);
    assert.equal(response.url, `${upstream.base}/hello`);
    assert.equal(response.redirected, false);
    assert.equal(response.headers.get('content-type'), 'text/plain');
    assert.equal(await response.text(), 'hello from upstream\n');
  });

  test('accepts a URL object and a Request, and sends default and caller headers', async () => {
    const fromUrl = await fetch(new URL('/echo?via=url', upstream.base));
    assert.equal((await fromUrl.json()).url, '/echo?via=url');

    const request = new Request(`${upstream.base}/echo`, {
      method: 'PUT',
      headers: { 'x-from-request': 'yes' },
      body: 'request body',
    });
    const seen = await fetch(request).then((r) => r.json());
    assert.equal(seen.method, 'PUT');
    assert.equal(seen.headers['x-from-request'], 'yes');
    assert.equal(Buffer.from(seen.body, 'base64').toString(), 'request body');

    const defaults = await echo({ headers: { 'User-Agent': 'agent/1.0' } });
    assert.equal(defaults.headers['user-agent'], 'agent/1.0');
    assert.equal(defaults.headers.accept, '*/*');
  });

  test('POST sends every body kind Node fetch accepts', async (t) => {
    const bytes = Buffer.from([0, 1, 2, 250, 251, 255]);
    const kinds = {
      string: { body: 'plain text é', expect: Buffer.from('plain text é'), type: 'text/plain;charset=UTF-8' },
      URLSearchParams: {
        body: new URLSearchParams({ a: '1', b: 'two words' }),
        expect: Buffer.from('a=1&b=two+words'),
        type: 'application/x-www-form-urlencoded;charset=UTF-8',
      },
      ArrayBuffer: { body: bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length), expect: bytes },
      Uint8Array: { body: new Uint8Array(bytes), expect: bytes },
      DataView: { body: new DataView(new Uint8Array(bytes).buffer), expect: bytes },
      Blob: { body: new Blob([bytes], { type: 'application/x-test' }), expect: bytes, type: 'application/x-test' },
      ReadableStream: {
        body: new ReadableStream({
          start(controller) {
            controller.enqueue(new TextEncoder().encode('streamed '));
            controller.enqueue(new TextEncoder().encode('body'));
            controller.close();
          },
        }),
        duplex: 'half',
        expect: Buffer.from('streamed body'),
      },
      'async iterable': {
        body: (async function* () {
          yield new TextEncoder().encode('from an ');
          await sleep(10);
          yield new TextEncoder().encode('async generator');
        })(),
        duplex: 'half',
        expect: Buffer.from('from an async generator'),
      },
      'Node Readable': { body: Readable.from([Buffer.from('node '), Buffer.from('stream')]), duplex: 'half', expect: Buffer.from('node stream') },
    };
    for (const [kind, { body, duplex, expect, type }] of Object.entries(kinds)) {
      await t.test(kind, async () => {
        const seen = await echo({ method: 'POST', body, duplex });
        assert.equal(seen.method, 'POST');
        assert.deepEqual(seen.body, expect);
        if (type) {
          assert.equal(seen.headers['content-type'], type);
        }
        if (duplex) {
          assert.equal(seen.headers['transfer-encoding'], 'chunked');
        } else {
          assert.equal(seen.headers['content-length'], String(expect.length));
        }
      });
    }
    await t.test('FormData', async () => {
      const form = new FormData();
      form.append('field', 'value');
      form.append('file', new Blob(['file contents'], { type: 'text/plain' }), 'notes.txt');
      const seen = await echo({ method: 'POST', body: form });
      assert.match(seen.headers['content-type'], /^multipart\/form-data; boundary=/);
      const text = seen.body.toString();
      assert.match(text, /name="field"\r\n\r\nvalue\r\n/);
      assert.match(text, /name="file"; filename="notes.txt"\r\nContent-Type: text\/plain\r\n\r\nfile contents\r\n/);
    });
    await t.test('a 3 MB streamed upload', async () => {
      const upload = patternBytes(3 * 1024 * 1024);
      const seen = await echo({ method: 'POST', body: Readable.from([upload.subarray(0, 1_000_000), upload.subarray(1_000_000)]), duplex: 'half' });
      assert.equal(seen.body.length, upload.length);
      assert.ok(seen.body.equals(upload));
    });
  });

  test('a body that errors fails the fetch', async () => {
    const body = new ReadableStream({
      pull(controller) {
        controller.error(new Error('disk on fire'));
      },
    });
    await assert.rejects(fetch(`${upstream.base}/echo`, { method: 'POST', body, duplex: 'half' }), (error) => {
      assert.ok(error instanceof TypeError);
      assert.equal(error.cause.code, 'body');
      return true;
    });
  });

  test('a denied streamed upload stops pulling from the body', async () => {
    let pulls = 0;
    let cancelled = false;
    const endless = new ReadableStream({
      pull(controller) {
        pulls += 1;
        controller.enqueue(new Uint8Array(16 * 1024));
      },
      cancel() {
        cancelled = true;
      },
    });
    const refused = await fetch('https://denied.example/upload', { method: 'POST', body: endless, duplex: 'half' });
    assert.equal(refused.status, 403);
    assert.equal(refused.headers.get('x-pexi-error'), 'policy_denied');
    await waitFor(() => cancelled, 'the body stream to be cancelled');
    const settled = pulls;
    await sleep(200);
    assert.equal(pulls, settled, 'nothing reads the body after the refusal');
  });

  test('the event loop keeps running while requests wait', { timeout: 30_000 }, async () => {
    // The upstream answers only when a timer of this test's event loop releases it: a fetch that blocked
    // the loop until its response came would never get one (event order, no clock).
    let ticked = false;
    const pending = fetch(`${upstream.base}/held?step=loop`);
    setTimeout(() => {
      ticked = true;
      upstream.release('loop');
    }, 10);
    const response = await pending;
    assert.ok(ticked);
    assert.equal(await response.text(), 'late');
  });

  test('validation errors are the ones Node fetch throws', async () => {
    await assert.rejects(fetch('not a url'), TypeError);
    await assert.rejects(fetch(`${upstream.base}/hello`, { method: 'GET', body: 'x' }), TypeError);
    await assert.rejects(fetch(`${upstream.base}/echo`, { method: 'POST', body: new ReadableStream() }), TypeError);
  });

  test('Node-only options such as dispatcher and agent are ignored', async () => {
    const response = await fetch(`${upstream.base}/hello`, { dispatcher: { dispatch() {} }, agent: {} });
    assert.equal(response.status, 200);
    await response.text();
  });
});

describe('responses', () => {
  test('HEAD, 204 and 304 have a null body; 4xx and 5xx are responses', async () => {
    const head = await fetch(`${upstream.base}/hello`, { method: 'HEAD' });
    assert.equal(head.status, 200);
    assert.equal(head.body, null);
    for (const status of [204, 304]) {
      const response = await fetch(`${upstream.base}/status/${status}`);
      assert.equal(response.status, status);
      assert.equal(response.body, null);
    }
    const missing = await fetch(`${upstream.base}/status/404`);
    assert.equal(missing.status, 404);
    assert.equal(missing.ok, false);
    assert.equal(missing.statusText, 'Not Found');
    assert.equal(missing.headers.get('x-status'), '404');
    const failed = await fetch(`${upstream.base}/status/503`);
    assert.equal(failed.status, 503);
    await failed.arrayBuffer();
  });

  test('repeated headers and Set-Cookie are kept', async () => {
    const response = await fetch(`${upstream.base}/setcookie`);
    assert.deepEqual(response.headers.getSetCookie(), ['a=1; Path=/', 'b=2; Path=/']);
    assert.equal(await response.text(), 'cookies');
  });

  test('a gzip response is decoded as Node fetch does', async () => {
    const response = await fetch(`${upstream.base}/gzip`, { headers: { 'accept-encoding': 'gzip' } });
    assert.equal(response.headers.get('content-encoding'), 'gzip');
    assert.equal(await response.text(), 'decompressed by the fetch\n');
  });

  test('a clone keeps url and redirected', async () => {
    const response = await fetch(`${upstream.base}/redirect?to=${encodeURIComponent(`${upstream.base}/hello`)}`);
    const copy = response.clone();
    assert.equal(copy.url, `${upstream.base}/hello`);
    assert.equal(copy.redirected, true);
    assert.equal(await copy.text(), await response.text());
  });

  test('a 10 MB download arrives whole and in order', async () => {
    const size = 10 * 1024 * 1024;
    const response = await fetch(`${upstream.base}/big?bytes=${size}`);
    assert.equal(response.headers.get('content-length'), String(size));
    const hash = createHash('sha256');
    let received = 0;
    let chunks = 0;
    for await (const chunk of response.body) {
      hash.update(chunk);
      received += chunk.length;
      chunks += 1;
    }
    assert.equal(received, size);
    assert.ok(chunks > 10, `the body streamed in ${chunks} chunks`);
    assert.equal(hash.digest('hex'), createHash('sha256').update(patternBytes(size)).digest('hex'));
  });

  test('a body that fails after data errors the stream after that data, with the PEP\'s code', async (t) => {
    const capped = await startPep({
      allow: [{ host: '127.0.0.1', ports: [upstream.port] }],
      tag: 'capped',
      env: { PEP_MAX_RESPONSE_BYTES: String(1024 * 1024) },
    });
    t.after(() => capped.stop());
    connect({ endpoint: capped.endpoint });
    t.after(() => connect({ endpoint: pep.endpoint }));
    const response = await fetch(`${upstream.base}/chunked?bytes=${3 * 1024 * 1024}`);
    assert.equal(response.status, 200);
    let received = 0;
    const failure = await (async () => {
      try {
        for await (const chunk of response.body) {
          received += chunk.length;
        }
      } catch (error) {
        return error;
      }
      return null;
    })();
    assert.ok(failure instanceof TypeError, `the body errored: ${failure}`);
    assert.equal(failure.message, 'terminated');
    assert.equal(failure.cause?.code, 'response_too_large');
    assert.ok(received > 0 && received <= 1024 * 1024, `${received} bytes arrived before the error`);
  });

  test('server-sent events arrive one by one, as they are sent', { timeout: 30_000 }, async () => {
    // The upstream sends each token only after the previous one reached this test: a client or PEP that
    // buffered the response would never deliver the first, and the test would time out. No clock involved.
    const response = await fetch(`${upstream.base}/sse?tokens=5&step=fetch-sse`);
    assert.equal(response.headers.get('content-type'), 'text/event-stream');
    const arrivals = [];
    const decoder = new TextDecoder();
    let text = '';
    for await (const chunk of response.body) {
      text += decoder.decode(chunk, { stream: true });
      for (const match of text.matchAll(/data: (token-\d+)\n\n/g)) {
        if (!arrivals.includes(match[1])) {
          arrivals.push(match[1]);
          upstream.release('fetch-sse');
        }
      }
    }
    assert.deepEqual(arrivals, ['token-0', 'token-1', 'token-2', 'token-3', 'token-4']);
    assert.match(text, /data: \[DONE\]\n\n$/);
  });
});

describe('abort', () => {
  test('an already-aborted signal rejects with its reason and sends nothing', async () => {
    const before = pep.records().filter((r) => r.kind === 'decision').length;
    const controller = new AbortController();
    controller.abort();
    await assert.rejects(fetch(`${upstream.base}/hello`, { signal: controller.signal }), { name: 'AbortError' });
    const reason = new Error('my reason');
    await assert.rejects(fetch(`${upstream.base}/hello`, { signal: AbortSignal.abort(reason) }), (error) => error === reason);
    await sleep(100);
    assert.equal(pep.records().filter((r) => r.kind === 'decision').length, before);
  });

  test('abort while waiting for the head cancels upstream', async () => {
    const controller = new AbortController();
    const pending = fetch(`${upstream.base}/slowhead?ms=10000&id=head`, { signal: controller.signal });
    await sleep(300);
    controller.abort();
    await assert.rejects(pending, { name: 'AbortError' });
    await waitFor(() => upstream.events.some((e) => e.path === '/slowhead' && e.id === 'head'), 'the upstream request to be closed');
  });

  test('abort mid-stream errors the body with AbortError and cancels upstream', async () => {
    const controller = new AbortController();
    const response = await fetch(`${upstream.base}/forever?id=body`, { signal: controller.signal });
    const reader = response.body.getReader();
    const first = await reader.read();
    assert.equal(first.done, false);
    controller.abort();
    await assert.rejects(reader.read(), { name: 'AbortError' });
    await waitFor(() => upstream.events.some((e) => e.path === '/forever' && e.id === 'body'), 'the upstream request to be closed');
    const decision = pep.records().find((r) => r.kind === 'decision' && r.request.query === 'id=body');
    const outcome = await pep.waitRecord((r) => r.kind === 'outcome' && r.decision_id === decision.decision_id);
    assert.equal(outcome.error, 'cancelled');
  });

  test('cancelling the body stream cancels upstream', async () => {
    const response = await fetch(`${upstream.base}/forever?id=cancel`);
    const reader = response.body.getReader();
    await reader.read();
    await reader.cancel();
    await waitFor(() => upstream.events.some((e) => e.path === '/forever' && e.id === 'cancel'), 'the upstream request to be closed');
  });
});

describe('redirects', () => {
  const target = () => `${upstream.base}/redirect?status=301&to=${encodeURIComponent(`${upstream.base}/hello`)}`;

  test('follow (the default) follows and reports it', async () => {
    const response = await fetch(target());
    assert.equal(response.status, 200);
    assert.equal(response.redirected, true);
    assert.equal(response.url, `${upstream.base}/hello`);
    assert.equal(await response.text(), 'hello from upstream\n');
  });

  test('manual returns the 3xx as it is', async () => {
    const response = await fetch(target(), { redirect: 'manual' });
    assert.equal(response.status, 301);
    assert.equal(response.headers.get('location'), `${upstream.base}/hello`);
    assert.equal(response.redirected, false);
    assert.equal(response.url, target());
  });

  test('error rejects', async () => {
    await assert.rejects(fetch(target(), { redirect: 'error' }), (error) => {
      assert.ok(error instanceof TypeError);
      assert.equal(error.cause.code, 'redirect_not_allowed');
      return true;
    });
  });

  test('a redirect to a denied host is refused at that hop', async () => {
    const to = `${upstream.base}/redirect?to=${encodeURIComponent('http://denied.example/')}`;
    const refused = await fetch(to);
    assert.equal(refused.status, 403);
    const body = await refused.json();
    assert.equal(body.code, 'policy_denied');
    assert.deepEqual(body.reasons, ['host denied.example is not in the allowlist']);
  });
});

describe('policy', () => {
  test('a denied request is answered 403 with pexi\'s code, reasons and decision, as every HTTP client shows', async () => {
    const response = await fetch('https://denied.example/secrets?token=1');
    assert.equal(response.status, 403);
    assert.equal(response.statusText, 'Forbidden');
    assert.equal(response.ok, false);
    assert.equal(response.url, 'https://denied.example/secrets?token=1');
    assert.equal(response.headers.get('content-type'), 'application/json');
    assert.equal(response.headers.get('x-pexi-error'), 'policy_denied');
    const body = await response.json();
    assert.equal(body.code, 'policy_denied');
    assert.deepEqual(body.reasons, ['host denied.example is not in the allowlist']);
    assert.match(body.decision_id, /^[0-9a-f]{8}-\d+$/);
    assert.equal(response.headers.get('x-pexi-decision'), body.decision_id);
    // In the shape LLM APIs answer with: what their SDKs print is pexi's reason.
    assert.equal(body.error.type, 'pexi_refusal');
    assert.equal(
      body.error.message,
      `pexi refused this request (policy_denied): host denied.example is not in the allowlist [decision ${body.decision_id}]`,
    );
    const record = await pep.waitRecord((r) => r.kind === 'decision' && r.decision_id === body.decision_id);
    assert.equal(record.decision.allow, false);
  });

  test('with PEXI_FETCH_REFUSALS=throw a denied request rejects with TypeError whose cause carries the code and reasons', async () => {
    process.env.PEXI_FETCH_REFUSALS = 'throw';
    const error = await fetch('https://denied.example/secrets')
      .then(
        () => assert.fail('resolved'),
        (e) => e,
      )
      .finally(() => delete process.env.PEXI_FETCH_REFUSALS);
    assert.ok(error instanceof TypeError);
    assert.equal(error.message, 'fetch failed');
    assert.ok(error.cause instanceof PexiError);
    assert.equal(error.cause.code, 'policy_denied');
    assert.equal(error.cause.retryable, false);
    assert.deepEqual(error.cause.reasons, ['host denied.example is not in the allowlist']);
    assert.match(error.cause.decisionId, /^[0-9a-f]{8}-\d+$/);
    const record = await pep.waitRecord((r) => r.kind === 'decision' && r.decision_id === error.cause.decisionId);
    assert.equal(record.decision.allow, false);
    assert.equal(record.request.host, 'denied.example');
  });

  test('check answers without performing the request', async () => {
    const allowed = await check('get', `${upstream.base}/hello`);
    assert.equal(allowed.allow, true);
    assert.ok(allowed.reasons.length > 0);
    const denied = await check('POST', 'https://denied.example/');
    assert.equal(denied.allow, false);
    assert.deepEqual(denied.reasons, ['host denied.example is not in the allowlist']);
    const record = await pep.waitRecord((r) => r.kind === 'decision' && r.decision_id === denied.decisionId);
    assert.equal(record.method, 'pep.policy.check');
  });
});

test('200 concurrent fetches over one session', async () => {
  const before = pep.records().length;
  const responses = await Promise.all(
    Array.from({ length: 200 }, (_, i) => echo({ method: 'POST', body: `request ${i}` })),
  );
  responses.forEach((seen, i) => assert.equal(seen.body.toString(), `request ${i}`));
  const sessions = new Set(
    pep
      .records()
      .slice(before)
      .filter((r) => r.kind === 'decision')
      .map((r) => r.session_id),
  );
  assert.equal(sessions.size, 1, 'every request used the one shared session');
});

test('the default export and named exports are one module', () => {
  assert.equal(pexi.fetch, fetch);
  assert.equal(typeof pexi.originalFetch, 'function');
  assert.notEqual(pexi.originalFetch, fetch);
});
