// kafkajs against slipstream's secured listeners; the same ways in as security_suite.py:
// SCRAM-SHA-512 and PLAIN over SASL_SSL, SCRAM-SHA-256 over SASL_PLAINTEXT, mutual TLS
// over SSL, each producing 300 messages read back by a consumer group; then a wrong
// password and an unknown user refused with kafkajs's authentication error.
'use strict';
const fs = require('fs');
const { Kafka, logLevel } = require('kafkajs');

const N = 300;

function arg(name) {
  const i = process.argv.indexOf(`--${name}`);
  if (i < 0 || i + 1 >= process.argv.length) { console.log(`FAIL: --${name} missing`); process.exit(2); }
  return process.argv[i + 1];
}
const { value, checkValue, fail, ok } = require('./common');

async function roundTrip(way, cfg) {
  const kafka = new Kafka({ clientId: `sec-${way}`, logLevel: logLevel.NOTHING, ...cfg });
  const topic = `sec-kafkajs-${way}`;
  const admin = kafka.admin();
  await admin.connect();
  await admin.createTopics({ topics: [{ topic, numPartitions: 2 }], waitForLeaders: true });
  await admin.disconnect();
  const producer = kafka.producer({ idempotent: true });
  await producer.connect();
  for (let i = 0; i < N; i += 50) {
    const messages = [];
    for (let seq = i; seq < i + 50; seq++) messages.push({ value: value(way, seq) });
    await producer.send({ topic, acks: -1, messages });
  }
  await producer.disconnect();
  const consumer = kafka.consumer({ groupId: `g-${topic}` });
  await consumer.connect();
  await consumer.subscribe({ topic, fromBeginning: true });
  const seen = new Set();
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${way}: read back ${seen.size} of ${N} in 60 s`)), 60000);
    consumer.run({
      eachMessage: async ({ message }) => {
        seen.add(checkValue(message.value));
        if (seen.size >= N) { clearTimeout(timer); resolve(); }
      },
    }).catch(reject);
  });
  await consumer.disconnect();
  ok(`${way}: ${N} messages produced (idempotent, acks=all) and consumed by a group`);
}

async function refused(way, cfg) {
  const kafka = new Kafka({ clientId: `sec-${way}`, logLevel: logLevel.NOTHING, retry: { retries: 0 }, ...cfg });
  const admin = kafka.admin();
  try {
    await admin.connect();
    await admin.listTopics();
  } catch (e) {
    if (e.type !== 'SASL_AUTHENTICATION_FAILED' && !/SASL .*authentication failed/i.test(e.message)) {
      fail(`${way}: refused, but not as an authentication failure: ${e.name}: ${e.message}`);
    }
    ok(`${way}: refused (${e.name}: ${e.message.slice(0, 90)})`);
    return;
  } finally {
    await admin.disconnect().catch(() => {});
  }
  fail(`${way}: topics listed with bad credentials`);
}

async function main() {
  const ca = [fs.readFileSync(arg('ca'))];
  const tls = { ca };
  const user = arg('user');
  const password = arg('password');
  await roundTrip('scram512', { brokers: [arg('sasl-ssl')], ssl: tls, sasl: { mechanism: 'scram-sha-512', username: user, password } });
  await roundTrip('plain', { brokers: [arg('sasl-ssl')], ssl: tls, sasl: { mechanism: 'plain', username: user, password } });
  await roundTrip('scram256', { brokers: [arg('sasl-plaintext')], sasl: { mechanism: 'scram-sha-256', username: user, password } });
  await roundTrip('mtls', {
    brokers: [arg('ssl')],
    ssl: { ca, cert: fs.readFileSync(arg('cert')), key: fs.readFileSync(arg('key')) },
  });
  await refused('wrong-password', { brokers: [arg('sasl-ssl')], ssl: tls, sasl: { mechanism: 'scram-sha-512', username: user, password: `${password}x` } });
  await refused('unknown-user-plain', { brokers: [arg('sasl-ssl')], ssl: tls, sasl: { mechanism: 'plain', username: 'nobody', password } });
  console.log('done');
}

main().catch((e) => fail(`${e.name}: ${e.message}`));
