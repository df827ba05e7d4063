// Streams a response through the PEP, printing each piece as it arrives.
//   PEXI_ENDPOINT=unix:$(pexi paths socket) node examples/stream.mjs URL
import { fetch } from '@pexi/guest';

try {
  const response = await fetch(process.argv[2], {
    headers: { accept: 'text/event-stream' },
    signal: AbortSignal.timeout(60_000),
  });
  if (response.headers.has('x-pexi-error')) {
    // pexi refused it (nothing was sent): a 403 whose JSON body has pexi's code and the policy's reasons.
    const { code, reasons } = await response.json();
    console.error(`${response.status} refused by pexi: ${code} ${reasons.join('; ')}`);
    process.exit(1);
  }
  console.log(`${response.status} ${response.statusText} from ${response.url}`);
  const decoder = new TextDecoder();
  for await (const chunk of response.body) {
    process.stdout.write(decoder.decode(chunk, { stream: true }));
  }
} catch (error) {
  // A failure (the upstream, a timeout) is TypeError('fetch failed') whose cause has pexi's code.
  const { code, message } = error.cause ?? {};
  console.error(`${error.message}: ${code} ${message}`);
  process.exitCode = 1;
}
