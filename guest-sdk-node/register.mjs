// `node --import @pexi/guest/register app.js`: replaces globalThis.fetch before any application code
// runs, so libraries that capture fetch at load time capture pexi's.
import { install } from './index.mjs';

install();
