// Test parts: a real `pexi serve` process with a config written for the test, and real HTTP servers on
// loopback. Nothing of pexi is mocked.

import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import zlib from 'node:zlib';

export const packageDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const repoRoot = path.resolve(packageDir, '..');

export function pexiBinary() {
  if (process.env.PEXI_BIN) {
    return process.env.PEXI_BIN;
  }
  const target = process.env.CARGO_TARGET_DIR ?? path.join(repoRoot, 'target');
  const binary = path.join(target, 'debug', 'pexi');
  if (!fs.existsSync(binary)) {
    throw new Error(`${binary} is missing: run \`cargo build -p pexi-host\` first (or set PEXI_BIN)`);
  }
  return binary;
}

// Every folder a test makes is removed when its process exits (kept with PEXI_KEEP=1, to look at after a
// failure), whether or not the test removed it itself.
const madeDirs = [];
process.on('exit', () => {
  if (!process.env.PEXI_KEEP) {
    for (const dir of madeDirs) {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }
});

export function tempDir(tag) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `pexi-node-${tag}-`));
  madeDirs.push(dir);
  return dir;
}

/**
 * Starts `pexi serve` with the repository's config.toml and policy, listening on a socket in a fresh
 * directory, allowing `allow` ([{ host, ports }]) and loopback addresses.
 */
/**
 * A `pexi serve` on the repository's config and policy, allowing `allow` entries; `secrets` become
 * `[[secrets]]` tables (their values come from `env`, the PEP's own environment). Its stderr also goes to
 * `pep.log` in its folder.
 */
export async function startPep({ allow = [], tag = 'pep', env = {}, secrets = [], dnsOverrides = {}, extraCaFile = null, approvals = null } = {}) {
  const dir = tempDir(tag);
  const socket = path.join(dir, 'pep.sock');
  const audit = path.join(dir, 'audit.jsonl');
  const replace = (text, from, to) => {
    if (!text.includes(from)) {
      throw new Error(`host/default-config.toml no longer contains ${from}`);
    }
    return text.replace(from, to);
  };
  let config = fs.readFileSync(path.join(repoRoot, 'host', 'default-config.toml'), 'utf8');
  config = replace(config, 'listen = ["unix:{runtime_dir}/pep.sock"]', `listen = [${JSON.stringify(`unix:${socket}`)}]`);
  config = replace(config, 'dir = "policies"', `dir = ${JSON.stringify(path.join(repoRoot, 'policies'))}`);
  config = replace(config, 'allowed_cidrs = []', 'allowed_cidrs = ["127.0.0.0/8"]');
  config = replace(config, 'path = "{state_dir}/audit.jsonl"', `path = ${JSON.stringify(audit)}`);
  const overrides = Object.entries(dnsOverrides)
    .map(([name, address]) => `${JSON.stringify(name)} = [${JSON.stringify(address)}]\n`)
    .join('');
  config = replace(config, '[pep.network.dns_overrides]\n', `[pep.network.dns_overrides]\n${overrides}`);
  if (extraCaFile) {
    config = replace(config, 'extra_ca_file = ""', `extra_ca_file = ${JSON.stringify(extraCaFile)}`);
  }
  if (approvals) {
    // [pep.approvals]: the shipped policy asks a person about unlisted hosts (docs/approvals.md).
    config = replace(config, '\nenabled = false\n', '\nenabled = true\n');
    config = replace(config, 'approval_timeout_ms = 120000', `approval_timeout_ms = ${approvals.timeoutMs ?? 120000}`);
  }
  for (const entry of allow) {
    config += `\n[[pep.policy.allow]]\nhost = ${JSON.stringify(entry.host)}\n`;
    if (entry.ports) {
      config += `ports = [${entry.ports.join(', ')}]\n`;
    }
    if (entry.upgrade) {
      config += `upgrade = ${JSON.stringify(entry.upgrade)}\n`;
    }
  }
  for (const secret of secrets) {
    config += '\n[[secrets]]\n';
    for (const [key, value] of Object.entries(secret)) {
      config += `${key} = ${JSON.stringify(value)}\n`;
    }
  }
  const configPath = path.join(dir, 'config.toml');
  fs.writeFileSync(configPath, config);

  const child = spawn(pexiBinary(), ['serve', '--config', configPath], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn', ...env },
  });
  let stderr = '';
  child.stderr.on('data', (data) => {
    stderr += data;
    fs.appendFileSync(path.join(dir, 'pep.log'), data);
  });
  const deadline = Date.now() + 20_000;
  while (!fs.existsSync(socket)) {
    if (child.exitCode !== null) {
      throw new Error(`pexi serve exited with ${child.exitCode}: ${stderr}`);
    }
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`pexi serve did not listen on ${socket} within 20 s: ${stderr}`);
    }
    await sleep(20);
  }
  return {
    dir,
    socket,
    endpoint: `unix:${socket}`,
    auditPath: audit,
    /** The control socket (docs/approvals.md): beside the audit log. */
    controlSocket: path.join(dir, 'control.sock'),
    stderr: () => stderr,
    /** Parsed audit records written so far. */
    records() {
      if (!fs.existsSync(audit)) {
        return [];
      }
      // The PEP may be appending right now: a last line without its newline is not written yet.
      const text = fs.readFileSync(audit, 'utf8');
      return text
        .slice(0, text.lastIndexOf('\n') + 1)
        .split('\n')
        .filter((line) => line !== '')
        .map((line) => JSON.parse(line));
    },
    /** Waits until a record matching `predicate` is in the log (outcomes are written after the effect). */
    async waitRecord(predicate, timeoutMs = 10_000) {
      const end = Date.now() + timeoutMs;
      for (;;) {
        const found = this.records().find(predicate);
        if (found) {
          return found;
        }
        if (Date.now() > end) {
          throw new Error('no matching audit record');
        }
        await sleep(20);
      }
    },
    /** Stops the PEP; its folder is removed unless `keep` (to read what it wrote). */
    async stop({ keep = false } = {}) {
      if (child.exitCode === null) {
        child.kill('SIGTERM');
        await once(child, 'exit');
      }
      if (!keep) {
        fs.rmSync(dir, { recursive: true, force: true });
      }
    },
  };
}

/**
 * The guest daemon (`pexi-guestd`, built by scripts/test-node) in front of `pep`: its forward proxy on a
 * free loopback port and its per-boot CA written into `dir`.
 */
export async function startGuestd(pep, dir, { denyConnect = 'early' } = {}) {
  const target = process.env.CARGO_TARGET_DIR ?? path.join(repoRoot, 'target');
  const binary = path.join(target, 'debug', 'pexi-guestd');
  const ca = path.join(dir, 'guest-ca.pem');
  const socket = path.join(dir, 'guestd.sock');
  const child = spawn(binary, ['--endpoint', pep.endpoint, '--listen', '127.0.0.1:0', '--ca-cert', ca, '--deny-connect', denyConnect, '--socket', socket], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let line = '';
  for await (const chunk of child.stdout) {
    line += chunk;
    if (line.includes('\n')) {
      break;
    }
  }
  const proxy = line.split(/\s+/).find((word) => word.startsWith('http://'));
  if (!proxy) {
    child.kill('SIGKILL');
    throw new Error(`pexi-guestd did not start: ${line}`);
  }
  return {
    proxy,
    ca,
    socket,
    endpoint: `unix:${socket}`,
    async stop() {
      if (child.exitCode === null) {
        child.kill('SIGTERM');
        await once(child, 'exit');
      }
    },
  };
}

/** The bytes of the 10 MB test body: a pattern, so a lost or reordered chunk shows. */
export function patternBytes(size) {
  const body = Buffer.alloc(size);
  for (let i = 0; i < size; i += 4) {
    body.writeUInt32BE(i >>> 0, i);
  }
  return body;
}

/**
 * Serves `route(req, res)` on a fresh loopback port; `stop()` closes the server and every open connection.
 * A route that throws (a client that went away mid-request) destroys its response instead of failing.
 */
async function serveLoopback(route, onError = () => {}, host = '127.0.0.1') {
  const sockets = new Set();
  const server = http.createServer((req, res) => {
    route(req, res).catch((error) => {
      onError(req, error);
      res.destroy();
    });
  });
  server.on('connection', (socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  server.listen(0, host);
  await once(server, 'listening');
  const { port } = server.address();
  return {
    port,
    host,
    base: `http://${host}:${port}`,
    async stop() {
      for (const socket of sockets) {
        socket.destroy();
      }
      server.close();
      await once(server, 'close');
    },
  };
}

/**
 * A loopback HTTP server for the tests. Routes: /hello, /echo (method, headers, body back as JSON),
 * /big?bytes=N, /sse?tokens=N&gap=MS, /sse?tokens=N&step=ID (each token after the previous one is released
 * with `release(ID)`), /held?step=ID (answers once ID is released), /forever (streams until the client goes away), /redirect?to=URL&status=N, /slowhead?ms=N,
 * /status/N, /setcookie, /gzip. `events` records what the server saw, e.g. that /forever's client left.
 */
export async function startUpstream({ host = '127.0.0.1' } = {}) {
  const events = [];
  // Lockstep streams: a test proves a response streams by event order (the next token is sent only once the
  // previous one reached it), not by timing.
  const steps = new Map();
  const gate = (id) => {
    if (!steps.has(id)) {
      steps.set(id, { released: 0, waiters: [] });
    }
    return steps.get(id);
  };
  const release = (id) => {
    const g = gate(id);
    g.released += 1;
    g.waiters.splice(0).forEach((wake) => wake());
  };
  const route = async (req, res) => {
    const url = new URL(req.url, 'http://upstream');
    const chunks = [];
    for await (const chunk of req) {
      chunks.push(chunk);
    }
    const body = Buffer.concat(chunks);
    switch (url.pathname) {
      case '/hello':
        res.writeHead(200, { 'content-type': 'text/plain' });
        res.end('hello from upstream\n');
        return;
      case '/echo':
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(
          JSON.stringify({
            method: req.method,
            url: req.url,
            headers: req.headers,
            body: body.toString('base64'),
          }),
        );
        return;
      case '/big': {
        const size = Number(url.searchParams.get('bytes') ?? 10 * 1024 * 1024);
        const data = patternBytes(size);
        res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': size });
        // In pieces, so the response streams rather than arriving in one write.
        for (let i = 0; i < size; i += 256 * 1024) {
          if (!res.write(data.subarray(i, i + 256 * 1024))) {
            await once(res, 'drain');
          }
        }
        res.end();
        return;
      }
      case '/chunked': {
        // Like /big, without a content-length: the size is known only at the end.
        const size = Number(url.searchParams.get('bytes') ?? 1024 * 1024);
        const data = patternBytes(size);
        res.writeHead(200, { 'content-type': 'application/octet-stream' });
        for (let i = 0; i < size && !res.destroyed; i += 64 * 1024) {
          if (!res.write(data.subarray(i, i + 64 * 1024))) {
            await once(res, 'drain');
          }
        }
        res.end();
        return;
      }
      case '/sse': {
        const tokens = Number(url.searchParams.get('tokens') ?? 5);
        const gap = Number(url.searchParams.get('gap') ?? 200);
        const step = url.searchParams.get('step');
        const g = step === null ? null : gate(step);
        const wakeAll = () => g?.waiters.splice(0).forEach((wake) => wake());
        res.on('close', wakeAll);
        res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
        for (let i = 0; i < tokens && !res.destroyed; i++) {
          res.write(`data: token-${i}\n\n`);
          if (g === null) {
            await sleep(gap);
          } else {
            while (g.released <= i && !res.destroyed) {
              await new Promise((wake) => g.waiters.push(wake));
            }
          }
        }
        res.end('data: [DONE]\n\n');
        return;
      }
      case '/held': {
        const g = gate(url.searchParams.get('step'));
        const wake = () => g.waiters.splice(0).forEach((w) => w());
        res.on('close', wake);
        while (g.released < 1 && !res.destroyed) {
          await new Promise((w) => g.waiters.push(w));
        }
        if (!res.destroyed) {
          res.writeHead(200, { 'content-type': 'text/plain' });
          res.end('late');
        }
        return;
      }
      case '/forever': {
        res.writeHead(200, { 'content-type': 'text/plain' });
        const id = url.searchParams.get('id');
        let sent = 0;
        res.on('close', () => events.push({ event: 'closed', path: '/forever', id, sent }));
        while (!res.destroyed && !res.writableEnded) {
          res.write('tick\n');
          sent += 1;
          await sleep(50);
        }
        return;
      }
      case '/slowhead': {
        const id = url.searchParams.get('id');
        const gone = new AbortController();
        res.on('close', () => {
          events.push({ event: 'closed', path: '/slowhead', id });
          gone.abort();
        });
        // The wait ends with the client, so no timer outlives the test.
        await sleep(Number(url.searchParams.get('ms') ?? 5000), undefined, { signal: gone.signal }).catch(() => {});
        if (!res.destroyed) {
          res.writeHead(200);
          res.end('late');
        }
        return;
      }
      case '/redirect': {
        const status = Number(url.searchParams.get('status') ?? 302);
        res.writeHead(status, { location: url.searchParams.get('to') });
        res.end();
        return;
      }
      case '/setcookie':
        res.setHeader('set-cookie', ['a=1; Path=/', 'b=2; Path=/']);
        res.writeHead(200, { 'x-multi': 'one' });
        res.end('cookies');
        return;
      case '/gzip':
        res.writeHead(200, { 'content-type': 'text/plain', 'content-encoding': 'gzip' });
        res.end(zlib.gzipSync('decompressed by the fetch\n'));
        return;
      default: {
        const status = url.pathname.match(/^\/status\/(\d+)$/);
        if (status) {
          res.writeHead(Number(status[1]), { 'x-status': status[1] });
          res.end();
          return;
        }
        res.writeHead(404);
        res.end('not found');
      }
    }
  };
  // A client that goes away mid-request (an aborted upload) is part of the tests, not a failure.
  const server = await serveLoopback(
    route,
    (req, error) => events.push({ event: 'error', path: req.url, message: error.message }),
    host,
  );
  return { ...server, events, release };
}

/** The text the mock LLM streams, one token per event. */
export const LLM_TOKENS = ['Hello', ' from', ' the', ' mock', ' model', '.'];

/**
 * A loopback server speaking the streaming APIs of OpenAI (`POST /v1/chat/completions`) and Anthropic
 * (`POST /v1/messages`), as their official SDKs expect them. It requires the API key `key` and records
 * each request it served.
 */
export async function startMockLlm({ key = 'test-key', gapMs = 30, host = '127.0.0.1' } = {}) {
  const requests = [];
  const serve = async (req, res) => {
    const chunks = [];
    for await (const chunk of req) {
      chunks.push(chunk);
    }
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString() || '{}');
    } catch {
      res.writeHead(400, { 'content-type': 'application/json' });
      res.end('{"error":{"message":"bad json"}}');
      return;
    }
    requests.push({ method: req.method, url: req.url, headers: req.headers, body });
    const sse = () =>
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' });
    if (req.method === 'POST' && req.url === '/v1/chat/completions') {
      if (req.headers.authorization !== `Bearer ${key}`) {
        res.writeHead(401, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ error: { message: 'bad key', type: 'invalid_request_error', code: 'invalid_api_key' } }));
        return;
      }
      sse();
      const chunk = (delta, finish = null) =>
        `data: ${JSON.stringify({
          id: 'chatcmpl-mock',
          object: 'chat.completion.chunk',
          created: 1764000000,
          model: body.model,
          choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }],
        })}\n\n`;
      res.write(chunk({ role: 'assistant', content: '' }));
      for (const token of LLM_TOKENS) {
        await sleep(gapMs);
        res.write(chunk({ content: token }));
      }
      res.write(chunk({}, 'stop'));
      res.end('data: [DONE]\n\n');
      return;
    }
    if (req.method === 'POST' && req.url === '/v1/messages') {
      // Current SDKs send the key as a bearer token, older ones as x-api-key.
      const presented = req.headers['x-api-key'] ?? req.headers.authorization?.replace(/^Bearer /, '');
      if (presented !== key || !req.headers['anthropic-version']) {
        res.writeHead(401, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ type: 'error', error: { type: 'authentication_error', message: 'bad key' } }));
        return;
      }
      sse();
      const event = (type, data) => `event: ${type}\ndata: ${JSON.stringify({ type, ...data })}\n\n`;
      res.write(
        event('message_start', {
          message: {
            id: 'msg_mock',
            type: 'message',
            role: 'assistant',
            model: body.model,
            content: [],
            stop_reason: null,
            stop_sequence: null,
            usage: { input_tokens: 5, output_tokens: 1 },
          },
        }),
      );
      res.write(event('content_block_start', { index: 0, content_block: { type: 'text', text: '' } }));
      res.write(event('ping', {}));
      for (const token of LLM_TOKENS) {
        await sleep(gapMs);
        res.write(event('content_block_delta', { index: 0, delta: { type: 'text_delta', text: token } }));
      }
      res.write(event('content_block_stop', { index: 0 }));
      res.write(event('message_delta', { delta: { stop_reason: 'end_turn', stop_sequence: null }, usage: { output_tokens: LLM_TOKENS.length } }));
      res.end(event('message_stop', {}));
      return;
    }
    res.writeHead(404, { 'content-type': 'application/json' });
    res.end('{"error":{"message":"no such route"}}');
  };
  const server = await serveLoopback(serve, () => {}, host);
  return { ...server, key, requests };
}

/**
 * A folder laid out like an application that installed @pexi/guest and the given packages (symlinks into
 * this package's node_modules), for running unmodified scripts under the `register` preload.
 */
export function appDir(tag, packages = []) {
  const dir = tempDir(tag);
  fs.mkdirSync(path.join(dir, 'node_modules', '@pexi'), { recursive: true });
  fs.symlinkSync(packageDir, path.join(dir, 'node_modules', '@pexi', 'guest'), 'dir');
  for (const name of packages) {
    const link = path.join(dir, 'node_modules', name);
    fs.mkdirSync(path.dirname(link), { recursive: true });
    fs.symlinkSync(path.join(packageDir, 'node_modules', name), link, 'dir');
  }
  return dir;
}

/** Runs `node ...args` (this same Node binary) in `cwd`; resolves with its exit code and output. */
export async function runNode(args, { cwd, env }) {
  const child = spawn(process.execPath, args, { cwd, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => {
    stdout += d;
  });
  child.stderr.on('data', (d) => {
    stderr += d;
  });
  const timer = setTimeout(() => child.kill('SIGKILL'), Number(process.env.PEXI_RUN_NODE_TIMEOUT_MS ?? 60_000));
  const [code] = await once(child, 'exit');
  clearTimeout(timer);
  return { code, stdout, stderr };
}
