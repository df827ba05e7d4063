// The ESM entry point: the same module instance as the CommonJS one, so a process has one PEP session.
import pexi from './index.js';

export const { fetch, check, connect, install, uninstall, useGuestProxy, originalFetch, PexiError } = pexi;
export default pexi;
