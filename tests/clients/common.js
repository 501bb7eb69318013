// Shared by the JavaScript client suites: the message shape common.py uses (a body and
// its SHA-1, so every message read back proves itself intact), and the verdict lines
// the integration tests look for.
'use strict';
const crypto = require('crypto');

function value(codec, seq) {
  const body = Buffer.from(`${codec}:${seq}:` + 'slipstream '.repeat((seq % 7) + 3));
  return Buffer.concat([body, Buffer.from(crypto.createHash('sha1').update(body).digest('hex'))]);
}

function checkValue(v) {
  const body = v.subarray(0, v.length - 40);
  if (crypto.createHash('sha1').update(body).digest('hex') !== v.subarray(v.length - 40).toString()) {
    throw new Error(`corrupt message ${v.subarray(0, 60)}`);
  }
  return parseInt(body.toString().split(':')[1], 10);
}

function fail(msg) { console.log(`FAIL: ${msg}`); process.exit(1); }
function ok(msg) { console.log(`ok: ${msg}`); }

module.exports = { value, checkValue, fail, ok };
