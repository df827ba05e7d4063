// One request with the library named on the command line, written as a program that knows nothing of
// pexi: no proxy, no CA, no agent or dispatcher options. It prints one JSON line, what such a program
// would show its user: the status and body of a response, or the error's message (and, for libraries that
// throw on a 4xx, the response body the error carries).
//
//   node node.mjs LIBRARY URL        (run from the folder whose node_modules has undici, got, axios, ws)

import http from 'node:http';
import https from 'node:https';

const [library, url] = process.argv.slice(2);
const show = (fields) => console.log(JSON.stringify(fields));

/**
 * A WebSocket round trip: open, send "ping", print the echo. A close that is not a normal one is printed
 * with its code and reason (a refused handshake is closed with 1008 and pexi's reason).
 */
async function webSocket(socket, on) {
  const closed = await new Promise((resolve, reject) => {
    on('open', () => socket.send('ping'));
    on('message', (data) => {
      show({ status: 101, body: String(data?.data ?? data) });
      socket.close();
    });
    on('close', (code, reason) => resolve(typeof code === 'object' ? { code: code.code, reason: code.reason } : { code, reason: String(reason) }));
    on('error', (error) => reject(error?.error ?? error));
  });
  if (closed.code !== 1000 && closed.code !== 1005) {
    show({ closed });
    process.exitCode = 1;
  }
}

const clients = {
  async fetch() {
    const response = await fetch(url);
    show({ status: response.status, body: await response.text() });
  },
  async 'undici-request'() {
    const { request } = await import('undici');
    const { statusCode, body } = await request(url);
    show({ status: statusCode, body: await body.text() });
  },
  async 'undici-fetch'() {
    const { fetch } = await import('undici');
    const response = await fetch(url);
    show({ status: response.status, body: await response.text() });
  },
  async got() {
    const { default: got } = await import('got');
    const response = await got(url, { retry: { limit: 0 } });
    show({ status: response.statusCode, body: response.body });
  },
  async axios() {
    const { default: axios } = await import('axios');
    const response = await axios.get(url, { responseType: 'text' });
    show({ status: response.status, body: response.data });
  },
  async 'https.get'() {
    const module = url.startsWith('https:') ? https : http;
    await new Promise((resolve, reject) => {
      module
        .get(url, (response) => {
          let body = '';
          response.on('data', (chunk) => (body += chunk));
          response.on('end', () => resolve(show({ status: response.statusCode, body })));
        })
        .on('error', reject);
    });
  },
  async ws() {
    const { WebSocket } = await import('ws');
    const socket = new WebSocket(url);
    // ws's documented way to see a refused handshake's answer; without it 'error' says only the status.
    socket.on('unexpected-response', (request, response) => {
      request.destroy();
      let body = '';
      response.on('data', (chunk) => (body += chunk));
      response.on('end', () => socket.emit('error', Object.assign(new Error(`Unexpected server response: ${response.statusCode}`), { body })));
    });
    await webSocket(socket, (event, handler) => socket.on(event, handler));
  },
  async WebSocket() {
    const socket = new globalThis.WebSocket(url);
    await webSocket(socket, (event, handler) => socket.addEventListener(event, handler)).catch((error) => {
      throw new Error(`WebSocket error: ${error?.message ?? 'no details'}`);
    });
  },
};

try {
  if (!clients[library]) {
    throw new Error(`no client ${library}`);
  }
  await clients[library]();
} catch (error) {
  show({
    error: error.message,
    cause: error.cause?.message ?? error.cause?.code,
    body: error.body ?? error.response?.body ?? error.response?.data,
  });
  process.exitCode = 1;
}
