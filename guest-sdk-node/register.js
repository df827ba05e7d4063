'use strict';
// `node --require @pexi/guest/register app.js`: every global fetch goes through the PEP.
// Also the guest proxy for the other HTTP clients, when pexi-guestd runs (see useGuestProxy).
const pexi = require('./index.js');

pexi.useGuestProxy();
pexi.install();
