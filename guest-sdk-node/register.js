'use strict';
// `node --require @pexi/guest/register app.js`: every global fetch goes through the PEP.
require('./index.js').install();
