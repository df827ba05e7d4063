// `node --import @pexi/guest/register app.js`: replaces globalThis.fetch before any application code
// runs, so libraries that capture fetch at load time capture pexi's.
// It also points the process's other HTTP clients (and its children) at the guest proxy when
// pexi-guestd runs, and trusts the proxy's CA: see useGuestProxy.
import { install, useGuestProxy } from './index.mjs';

useGuestProxy();
install();
