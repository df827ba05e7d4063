// Compiled (not run) by types.test.mjs: the shipped declarations describe the API as documented.
import pexi, { PexiError, check, connect, fetch, install, originalFetch, uninstall } from '@pexi/guest';
import '@pexi/guest/register';

const endpoint: string = connect({ endpoint: 'unix:/tmp/pexi/pep.sock', connectTimeoutMs: 500 }).endpoint;
connect('vsock:2:4041');

async function main(): Promise<void> {
  const response: Response = await fetch(new URL('https://api.example.com/'), {
    method: 'POST',
    body: new ReadableStream<Uint8Array>(),
    duplex: 'half',
    signal: AbortSignal.timeout(1000),
  });
  const text: string = await response.text();
  const decision = await check('GET', 'https://api.example.com/');
  const allowed: boolean = decision.allow;
  const reasons: string[] = decision.reasons;
  try {
    await pexi.fetch('https://denied.example/');
  } catch (error) {
    if (error instanceof TypeError && error.cause instanceof PexiError) {
      const code: string = error.cause.code;
      const retry: boolean = error.cause.retryable;
      const id: string | null = error.cause.decisionId;
      console.log(code, retry, id, error.cause.reasons);
    }
  }
  install();
  uninstall();
  const original: typeof globalThis.fetch = originalFetch;
  console.log(endpoint, text, allowed, reasons, original);
}

void main();
