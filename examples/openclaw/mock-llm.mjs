// A stand-in for an OpenAI-compatible LLM API over HTTPS, for running the real OpenClaw against pexi
// without the internet. It streams chat completions (`stream: true`, server-sent events), answers only
// requests that carry the real API key, and plays scripted tool use: for each `FETCH <url>` in the user's
// message it calls OpenClaw's web_fetch (through OpenClaw's tool_call bridge), one after the other, then
// answers with what the tools returned. It also serves a plain page at /page, for web_fetch to fetch.
//
//   node mock-llm.mjs PORT KEY CERT.pem KEY.pem     (or import { startMockLlm })

import fs from 'node:fs';
import https from 'node:https';
import { pathToFileURL } from 'node:url';

export const PAGE_TEXT = 'The secret word is pelican.';
export const GREETING = ['Hello', ' from', ' the', ' mock.'];

export async function startMockLlm({ port = 0, host = '127.0.0.1', key, cert, tlsKey }) {
  const requests = [];
  const server = https.createServer({ cert, key: tlsKey }, async (req, res) => {
    const chunks = [];
    for await (const chunk of req) {
      chunks.push(chunk);
    }
    if (req.url === '/page') {
      res.writeHead(200, { 'content-type': 'text/html' });
      res.end(`<html><head><title>Allowed page</title></head><body><h1>Allowed page</h1><p>${PAGE_TEXT}</p></body></html>`);
      return;
    }
    const record = { method: req.method, url: req.url, authorized: req.headers.authorization === `Bearer ${key}` };
    requests.push(record);
    if (!record.authorized) {
      res.writeHead(401, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { message: 'invalid API key', type: 'invalid_request_error', code: 'invalid_api_key' } }));
      return;
    }
    if (req.method !== 'POST' || req.url !== '/v1/chat/completions') {
      res.writeHead(404, { 'content-type': 'application/json' });
      res.end('{"error":{"message":"no such route"}}');
      return;
    }
    const body = JSON.parse(Buffer.concat(chunks).toString() || '{}');
    record.stream = body.stream === true;
    const messages = body.messages ?? [];
    const textOf = (m) => (typeof m.content === 'string' ? m.content : JSON.stringify(m.content ?? ''));
    const asked = messages.filter((m) => m.role === 'user').map(textOf).join('\n');
    const fetchUrls = [...asked.matchAll(/FETCH (\S+)/g)].map((m) => m[1]);
    const toolResults = messages.filter((m) => m.role === 'tool');
    const fetchUrl = fetchUrls[toolResults.length];
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    const send = (delta, finish = null) =>
      res.write(
        `data: ${JSON.stringify({ id: 'chatcmpl-mock', object: 'chat.completion.chunk', created: 1764000000, model: body.model, choices: [{ index: 0, delta, finish_reason: finish }] })}\n\n`,
      );
    if (fetchUrl) {
      record.reply = 'tool_call';
      const id = `call_${toolResults.length + 1}`;
      send({ role: 'assistant', content: null, tool_calls: [{ index: 0, id, type: 'function', function: { name: 'tool_call', arguments: '' } }] });
      send({ tool_calls: [{ index: 0, function: { arguments: JSON.stringify({ id: 'web_fetch', args: { url: fetchUrl } }) } }] });
      send({}, 'tool_calls');
    } else if (toolResults.length > 0) {
      record.reply = 'tool_result';
      send({ role: 'assistant', content: `TOOL RESULT: ${toolResults.map(textOf).join('\n\nTOOL RESULT: ')}` });
      send({}, 'stop');
    } else {
      record.reply = 'greeting';
      send({ role: 'assistant', content: '' });
      for (const token of GREETING) {
        await new Promise((resolve) => setTimeout(resolve, 20));
        send({ content: token });
      }
      send({}, 'stop');
    }
    res.end('data: [DONE]\n\n');
  });
  server.listen(port, host);
  await new Promise((resolve) => server.once('listening', resolve));
  return {
    port: server.address().port,
    requests,
    stop: () => new Promise((resolve) => server.close(resolve)),
  };
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const [port, key, certFile, keyFile] = process.argv.slice(2);
  const server = await startMockLlm({
    port: Number(port),
    key,
    cert: fs.readFileSync(certFile),
    tlsKey: fs.readFileSync(keyFile),
  });
  console.log(`mock LLM on https://127.0.0.1:${server.port}`);
}
