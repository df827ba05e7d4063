'use strict';
// @pexi/guest: a WHATWG fetch that goes through the host PEP instead of the network.
//
// The request side leans on Node's own `Request` so that parsing and validation (URL, method, headers,
// every body kind, `duplex`) are exactly Node's; the response side builds a real `Response`. The native
// addon does the protocol work on its own threads, so nothing here blocks the event loop.

const { STATUS_CODES } = require('node:http');
const path = require('node:path');
const { Duplex } = require('node:stream');
const zlib = require('node:zlib');

const native = loadNative();

// Captured at load time: with the `register` preload this is Node's fetch, before anything replaced it.
const originalFetch = globalThis.fetch;

// One protocol session per process; every fetch multiplexes over it.
let session = null;

/** Why pexi refused or failed a request; found as `error.cause` of the `TypeError` fetch rejects with. */
class PexiError extends Error {
  constructor(info) {
    super(info.message);
    this.name = 'PexiError';
    /** Stable machine-readable code: `policy_denied`, `blocked_address`, `connect`, `upstream_timeout`, ... */
    this.code = info.code;
    /** Whether sending the same request again may succeed. */
    this.retryable = Boolean(info.retryable);
    /** The policy's reasons, for `policy_denied`. */
    this.reasons = info.reasons ?? [];
    /** The audit record of the decision, when there was one. */
    this.decisionId = info.decisionId ?? null;
  }
}

function loadNative() {
  const override = process.env.PEXI_GUEST_NATIVE;
  // Built for glibc Linux (the guest image's libc); other targets are added to package.json's napi.targets.
  const abi = process.platform === 'linux' ? '-gnu' : '';
  const file = override ?? path.join(__dirname, `pexi-guest.${process.platform}-${process.arch}${abi}.node`);
  try {
    return require(file);
  } catch (error) {
    throw new Error(
      `@pexi/guest: cannot load the native addon ${file} (${error.message}); build it with \`npm run build\` in the package folder`,
      { cause: error },
    );
  }
}

/**
 * Chooses the PEP endpoint for this process (`unix:PATH`, `virtio:NAME`, `vsock:CID:PORT`). Without a
 * call, the first fetch uses `PEXI_ENDPOINT` or the default virtio port. Replaces the shared session;
 * requests already in flight finish on the old one.
 */
function connect(options = {}) {
  const { endpoint, connectTimeoutMs, keepaliveMs } = typeof options === 'string' ? { endpoint: options } : options;
  try {
    session = native.Session.open(endpoint ?? undefined, { connectTimeoutMs, keepaliveMs });
  } catch (error) {
    throw new PexiError({ code: 'endpoint', message: error.message, retryable: false });
  }
  return { endpoint: session.endpoint };
}

function currentSession() {
  if (session === null) {
    try {
      session = native.Session.open(undefined);
    } catch (error) {
      throw new PexiError({ code: 'endpoint', message: error.message, retryable: false });
    }
  }
  return session;
}

function fetchFailed(info) {
  return new TypeError('fetch failed', { cause: info instanceof PexiError ? info : new PexiError(info) });
}

// What pexi refused, as opposed to what failed: the request was never sent because the policy (or a
// secret's binding, or the address guard) said no. By default fetch answers these as an HTTP 403 that
// carries pexi's code, reasons and decision, where every HTTP client and LLM SDK shows a response (an SDK
// raises its permission error with the body and does not retry); PEXI_FETCH_REFUSALS=throw keeps the
// TypeError with a PexiError cause, as for every failure.
const REFUSALS = new Set(['policy_denied', 'secret_not_allowed', 'blocked_address']);

function refusalsThrow() {
  return process.env.PEXI_FETCH_REFUSALS === 'throw';
}

/**
 * A refusal as pexi-guestd's proxy answers it: 403, `x-pexi-error`, `x-pexi-decision`, and a body with
 * `code`, `reasons`, `decision_id` and a `message` that says it all (code, reasons, decision), also inside
 * an `error` object in the shape LLM APIs use: SDKs print one or the other.
 */
function refusalResponse(error, url) {
  const { code } = error;
  const reasons = error.reasons ?? [];
  const decisionId = error.decisionId ?? null;
  const why = reasons.length > 0 ? reasons.join('; ') : error.message;
  const message = `pexi refused this request (${code}): ${why}${decisionId ? ` [decision ${decisionId}]` : ''}`;
  const body = {
    code,
    message,
    reasons,
    decision_id: decisionId,
    error: { type: 'pexi_refusal', code, message, reasons, decision_id: decisionId },
  };
  const headers = { 'content-type': 'application/json', 'x-pexi-error': error.code };
  if (decisionId) {
    headers['x-pexi-decision'] = decisionId;
  }
  const response = new Response(JSON.stringify(body), { status: 403, statusText: 'Forbidden', headers });
  Object.defineProperty(response, 'url', { value: url });
  return response;
}

// Node's fetch adds these when the caller did not; servers see the same request either way. There is no
// default `accept-encoding`: bytes cross the PEP as the server sent them, and an explicitly asked-for
// encoding is decoded below as Node's fetch does.
const DEFAULT_HEADERS = [
  ['accept', '*/*'],
  ['accept-language', '*'],
  ['sec-fetch-mode', 'cors'],
  ['user-agent', 'node'],
];

const NULL_BODY_STATUS = new Set([101, 103, 204, 205, 304]);

function isStreamBody(body) {
  return (
    body != null &&
    (body instanceof ReadableStream || typeof body[Symbol.asyncIterator] === 'function')
  );
}

/** fetch(input, init): Node's fetch, performed by the PEP under its policy. */
async function fetch(input, init = undefined) {
  // Throws the same TypeErrors as Node's fetch for a bad URL, method, header or body.
  const request = new Request(input, init);
  const signal = request.signal;
  if (signal.aborted) {
    throw signal.reason;
  }

  let bodyKind = 'none';
  let body;
  if (request.body !== null) {
    const source = init?.body !== undefined ? init.body : input instanceof Request ? input.body : null;
    if (isStreamBody(source)) {
      bodyKind = 'stream';
    } else {
      // Known-size bodies go whole, so their length reaches the server as Content-Length.
      bodyKind = 'bytes';
      body = Buffer.from(await request.arrayBuffer());
      if (signal.aborted) {
        throw signal.reason;
      }
    }
  }

  const headers = [];
  for (const [name, value] of request.headers) {
    headers.push(name, value);
  }
  for (const [name, value] of DEFAULT_HEADERS) {
    if (!request.headers.has(name)) {
      headers.push(name, value);
    }
  }

  let pep;
  try {
    pep = currentSession();
  } catch (error) {
    throw fetchFailed(error);
  }
  let call;
  try {
    call = pep.request({
      method: request.method,
      url: request.url,
      headers,
      redirect: request.redirect,
      bodyKind,
      body,
    });
  } catch (error) {
    throw fetchFailed({ code: 'invalid_request', message: error.message, retryable: false });
  }

  let bodyController = null;
  const onAbort = () => {
    call.cancel();
    if (bodyController !== null) {
      try {
        bodyController.error(signal.reason);
      } catch {
        // Already closed or errored.
      }
    }
  };
  signal.addEventListener('abort', onAbort, { once: true });
  const done = () => signal.removeEventListener('abort', onAbort);

  if (bodyKind === 'stream') {
    uploadBody(request.body, call);
  }

  const answer = await call.head();
  if (answer.error) {
    done();
    if (signal.aborted) {
      throw signal.reason;
    }
    if (REFUSALS.has(answer.error.code) && !refusalsThrow()) {
      return refusalResponse(answer.error, request.url);
    }
    throw fetchFailed(answer.error);
  }
  const head = answer.head;
  if (head.status < 200 || head.status > 599) {
    done();
    call.cancel();
    throw fetchFailed({
      code: 'unsupported_status',
      message: `the response status ${head.status} cannot be represented by fetch`,
      retryable: false,
    });
  }

  const responseHeaders = new Headers();
  for (let i = 0; i + 1 < head.headers.length; i += 2) {
    responseHeaders.append(head.headers[i], head.headers[i + 1]);
  }

  let responseBody = null;
  if (request.method === 'HEAD' || request.method === 'CONNECT' || NULL_BODY_STATUS.has(head.status)) {
    if (answer.ended) {
      done();
    } else {
      drain(call).finally(done);
    }
  } else {
    // What had arrived with the head comes first; then reads, unless that was the whole body.
    let early = answer.body ?? null;
    const ended = answer.ended;
    responseBody = new ReadableStream(
      {
        start(controller) {
          bodyController = controller;
        },
        async pull(controller) {
          if (early !== null) {
            controller.enqueue(new Uint8Array(early.buffer, early.byteOffset, early.byteLength));
            early = null;
            if (!ended) {
              return;
            }
          }
          if (ended) {
            done();
            controller.close();
            return;
          }
          const step = await call.read();
          if (step.error) {
            done();
            try {
              controller.error(
                signal.aborted ? signal.reason : new TypeError('terminated', { cause: new PexiError(step.error) }),
              );
            } catch {
              // The abort handler got there first.
            }
          } else if (step.done) {
            done();
            controller.close();
          } else {
            const chunk = step.chunk;
            controller.enqueue(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength));
          }
        },
        cancel() {
          done();
          call.cancel();
        },
      },
      // Pull only when the reader asks: the PEP's flow control window is the read-ahead, so a consumer
      // that stops reading stops the upstream.
      { highWaterMark: 0 },
    );
    responseBody = decodeContent(responseBody, responseHeaders.get('content-encoding'));
  }

  const response = new Response(responseBody, {
    status: head.status,
    statusText: STATUS_CODES[head.status] ?? '',
    headers: responseHeaders,
  });
  return withOrigin(response, head.url, head.redirectCount > 0);
}

// `url`, `redirected` and `type` are read-only getters that only Node's internal fetch can set; define
// them on the instance (and on its clones) so callers see what Node's fetch would report.
function withOrigin(response, url, redirected) {
  const clone = response.clone;
  Object.defineProperties(response, {
    url: { value: url, enumerable: true },
    redirected: { value: redirected, enumerable: true },
    type: { value: 'basic', enumerable: true },
    clone: {
      value() {
        return withOrigin(clone.call(response), url, redirected);
      },
    },
  });
  return response;
}

function decodeContent(stream, encoding) {
  if (encoding === null) {
    return stream;
  }
  const codings = encoding
    .toLowerCase()
    .split(',')
    .map((c) => c.trim())
    .filter((c) => c !== '' && c !== 'identity');
  let decoded = stream;
  // Codings apply in order, so undo them from the last.
  for (const coding of codings.reverse()) {
    let decoder;
    if (coding === 'gzip' || coding === 'x-gzip') {
      decoder = zlib.createGunzip({ flush: zlib.constants.Z_SYNC_FLUSH, finishFlush: zlib.constants.Z_SYNC_FLUSH });
    } else if (coding === 'deflate') {
      decoder = zlib.createInflate({ flush: zlib.constants.Z_SYNC_FLUSH, finishFlush: zlib.constants.Z_SYNC_FLUSH });
    } else if (coding === 'br') {
      decoder = zlib.createBrotliDecompress({
        flush: zlib.constants.BROTLI_OPERATION_FLUSH,
        finishFlush: zlib.constants.BROTLI_OPERATION_FLUSH,
      });
    } else {
      // An unknown coding: hand the bytes over as they are, like Node's fetch.
      return stream;
    }
    decoded = decoded.pipeThrough(Duplex.toWeb(decoder));
  }
  return decoded;
}

async function uploadBody(body, call) {
  const reader = body.getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        call.finish();
        return;
      }
      const chunk = typeof value === 'string' ? Buffer.from(value) : Buffer.from(value.buffer, value.byteOffset, value.byteLength);
      if (chunk.length > 0 && !(await call.write(chunk))) {
        // The request already ended (answered, refused or aborted): stop the producer.
        reader.cancel().catch(() => {});
        return;
      }
    }
  } catch (error) {
    call.failBody(String(error?.message ?? error));
  }
}

async function drain(call) {
  for (;;) {
    const step = await call.read();
    if (step.done || step.error) {
      return;
    }
  }
}

/**
 * Asks the PEP's policy whether `method url` would be allowed, without performing it.
 * Resolves to `{ allow, reasons, decisionId }`; rejects with a PexiError when the PEP cannot answer.
 */
async function check(method, url) {
  const answer = await currentSession().check(String(method).toUpperCase(), String(url));
  if (answer.error) {
    throw new PexiError(answer.error);
  }
  return answer.decision;
}

/** Makes `globalThis.fetch` go through pexi; the one it replaced stays reachable as `originalFetch`. */
function install() {
  globalThis.fetch = fetch;
}

/** Puts back the `fetch` that was global when this module loaded. */
function uninstall() {
  if (globalThis.fetch === fetch) {
    globalThis.fetch = originalFetch;
  }
}

/**
 * Points everything else in the process at the guest proxy (`pexi-guestd`) when it is running, for the
 * HTTP clients that do not use global fetch (OpenClaw's own undici, `ws`, child processes such as curl
 * and git): `HTTP_PROXY`/`HTTPS_PROXY` (and lowercase), `OPENCLAW_PROXY_URL`, `NO_PROXY` for loopback,
 * and the proxy's per-boot CA added to the default trusted CAs (Node ≥ 22.19 and 24, which have
 * `tls.setDefaultCACertificates`; older Node: start with `NODE_EXTRA_CA_CERTS=<ca>`). Values already set
 * are kept; on Node with `http.setGlobalProxyFromEnv` (24) Node's own clients (`http.get`, the global
 * undici dispatcher) use the proxy from then on. Does nothing when the CA file is absent (no proxy in this
 * guest). Returns what it did: `{ proxy, ca, clients }`.
 */
function useGuestProxy({
  proxyUrl = process.env.PEXI_PROXY_URL ?? 'http://127.0.0.1:3128',
  caFile = process.env.PEXI_CA_CERT ?? '/run/pexi/ca.pem',
} = {}) {
  const fs = require('node:fs');
  const tls = require('node:tls');
  let pem;
  try {
    pem = fs.readFileSync(caFile, 'utf8');
  } catch {
    return { proxy: null, ca: false };
  }
  for (const name of ['HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy', 'OPENCLAW_PROXY_URL']) {
    if (!process.env[name]) {
      process.env[name] = proxyUrl;
    }
  }
  const loopback = ['localhost', '127.0.0.1', '::1'];
  const noProxy = (process.env.NO_PROXY ?? process.env.no_proxy ?? '').split(',').map((s) => s.trim()).filter(Boolean);
  for (const host of loopback) {
    if (!noProxy.includes(host)) {
      noProxy.push(host);
    }
  }
  process.env.NO_PROXY = noProxy.join(',');
  process.env.no_proxy = process.env.NO_PROXY;
  let ca = false;
  if (typeof tls.setDefaultCACertificates === 'function' && typeof tls.getCACertificates === 'function') {
    const current = tls.getCACertificates('default');
    if (!current.includes(pem)) {
      tls.setDefaultCACertificates([...current, pem]);
    }
    ca = true;
  }
  // The variables above reach child processes, but Node reads them for its own clients only at start
  // (NODE_USE_ENV_PROXY), before any preload runs. Node 24 can switch its built-in proxy support on now:
  // `http.get`/`https.get` and the global undici dispatcher (which npm's undici shares) then go through
  // the proxy. Node 20 has no such switch; there only fetch (pexi's) and clients that read the variables
  // themselves (axios, child processes) do.
  const http = require('node:http');
  let clients = false;
  if (typeof http.setGlobalProxyFromEnv === 'function') {
    http.setGlobalProxyFromEnv(process.env);
    clients = true;
  }
  return { proxy: proxyUrl, ca, clients };
}

fetch.originalFetch = originalFetch;

module.exports = { fetch, check, connect, install, uninstall, useGuestProxy, originalFetch, PexiError };
