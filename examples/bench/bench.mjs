// Node's built-in fetch (straight to the upstream) against @pexi/guest's fetch (through the PEP), run by
// `pexi-bench --node` with UPSTREAM and PEXI_ENDPOINT set. Prints rows like the Rust bench.
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const pexi = createRequire(import.meta.url)(path.join(here, '..', '..', 'guest-sdk-node', 'index.js'));
const upstream = process.env.UPSTREAM;
const small = `${upstream}/big?n=1024`;
const big = `${upstream}/big?n=10000000`;
const modes = [
  ['node fetch', globalThis.fetch],
  ['@pexi/guest', pexi.fetch],
];

async function get(fetch, url) {
  const response = await fetch(url);
  let n = 0;
  for await (const chunk of response.body) {
    n += chunk.length;
  }
  return n;
}

for (const [, fetch] of modes) {
  for (let i = 0; i < 100; i++) await get(fetch, small);
}
const latencies = modes.map(() => []);
for (let round = 0; round < 5; round++) {
  for (const [i, [, fetch]] of modes.entries()) {
    for (let j = 0; j < 200; j++) {
      const start = performance.now();
      await get(fetch, small);
      latencies[i].push(performance.now() - start);
    }
  }
}
console.log('\n4. Node: 1024-byte responses, sequential (1000 per mode), and a 10 MB response (best of 3)');
console.log(`   ${'mode'.padEnd(12)} ${'p50 µs'.padStart(10)} ${'p99 µs'.padStart(10)} ${'MB/s'.padStart(8)}`);
const rows = [];
for (const [i, [name, fetch]] of modes.entries()) {
  const sorted = latencies[i].sort((a, b) => a - b);
  const p50 = sorted[Math.floor(sorted.length * 0.5)] * 1000;
  const p99 = sorted[Math.floor(sorted.length * 0.99)] * 1000;
  let best = Infinity;
  for (let k = 0; k < 3; k++) {
    const start = performance.now();
    if ((await get(fetch, big)) !== 10_000_000) throw new Error('short body');
    best = Math.min(best, performance.now() - start);
  }
  const speed = 10_000 / best;
  rows.push({ p50, speed });
  console.log(`   ${name.padEnd(12)} ${p50.toFixed(1).padStart(10)} ${p99.toFixed(1).padStart(10)} ${speed.toFixed(0).padStart(8)}`);
}
console.log(`   @pexi/guest p50 is ${(rows[1].p50 / rows[0].p50).toFixed(2)}× Node's fetch; 10 MB at ${((100 * rows[1].speed) / rows[0].speed).toFixed(0)}% of its speed`);
