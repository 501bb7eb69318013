// kafkajs (pure JavaScript) against slipstream; same phases as confluent_suite.py.
// Codecs: none and gzip are built in; snappy through kafkajs-snappy (pure JS). kafkajs
// has no built-in lz4/zstd (those plugins are native modules).
'use strict';
const crypto = require('crypto');
const { Kafka, CompressionTypes, CompressionCodecs, logLevel } = require('kafkajs');
CompressionCodecs[CompressionTypes.Snappy] = require('kafkajs-snappy');

const N = 10000;
const N_AFTER = 500;
const BIG = 1 << 20;
const CODECS = [['none', CompressionTypes.None], ['gzip', CompressionTypes.GZIP], ['snappy', CompressionTypes.Snappy]];

const { value, checkValue, fail, ok } = require('./common');

class Tracker {
  constructor() { this.last = {}; this.seen = new Set(); this.first = {}; this.next = {}; }
  add(p, offset, v) {
    const seq = checkValue(v);
    if (p in this.last && seq <= this.last[p]) throw new Error(`partition ${p}: seq ${seq} after ${this.last[p]}`);
    if (p in this.next && offset !== this.next[p]) throw new Error(`partition ${p}: offset ${offset} after ${this.next[p] - 1}`);
    if (this.seen.has(seq)) throw new Error(`duplicate seq ${seq}`);
    this.last[p] = seq; this.seen.add(seq);
    if (!(p in this.first)) this.first[p] = offset;
    this.next[p] = offset + 1;
  }
}

async function produce(kafka, topic, codec, from, to) {
  // --plain-producer: Tansu 0.6 fails kafkajs's InitProducerId v1 (no producer id field).
  const producer = kafka.producer({ idempotent: !process.argv.includes('--plain-producer'), maxInFlightRequests: 1 });
  await producer.connect();
  for (let i = from; i < to; i += 500) {
    const messages = [];
    for (let s = i; s < Math.min(i + 500, to); s++) messages.push({ key: `k${s % 13}`, value: value(codec[0], s) });
    await producer.send({ topic, acks: -1, compression: codec[1], messages });
  }
  await producer.disconnect();
}

async function consumeGroup(kafka, topic, groupId, count) {
  const consumer = kafka.consumer({ groupId, sessionTimeout: 6000, heartbeatInterval: 500, maxWaitTimeInMs: 200 });
  await consumer.connect();
  await consumer.subscribe({ topic, fromBeginning: true });
  const t = new Tracker();
  let error = null;
  await new Promise((resolve) => {
    const timer = setTimeout(resolve, 60000);
    consumer.run({
      autoCommit: false,
      eachMessage: async ({ partition, message }) => {
        try { t.add(partition, Number(message.offset), message.value); } catch (e) { error = e; }
        if (t.seen.size >= count || error) { clearTimeout(timer); resolve(); }
      },
    });
  });
  if (error) fail(`${topic}: ${error.message}`);
  const offsets = Object.keys(t.next).map((p) => ({ topic, partition: Number(p), offset: String(t.next[p]) }));
  await consumer.commitOffsets(offsets);
  await consumer.disconnect();
  return t;
}

async function committedOffsets(admin, groupId, topic) {
  const res = await admin.fetchOffsets({ groupId, topics: [topic] });
  const out = {};
  for (const p of res[0].partitions) out[p.partition] = Number(p.offset);
  return out;
}

async function phase1(kafka) {
  const admin = kafka.admin();
  await admin.connect();
  await admin.createTopics({ topics: [...CODECS.map((c) => ({ topic: `kj-${c[0]}`, numPartitions: 3 })), { topic: 'kj-big', numPartitions: 1 }, { topic: 'kj-mid', numPartitions: 1 }] });
  ok('created topics');
  for (const codec of CODECS) {
    const topic = `kj-${codec[0]}`;
    await produce(kafka, topic, codec, 0, N);
    const t = await consumeGroup(kafka, topic, `kj-g-${codec[0]}`, N);
    if (t.seen.size !== N) fail(`${topic}: consumed ${t.seen.size} of ${N}`);
    const committed = await committedOffsets(admin, `kj-g-${codec[0]}`, topic);
    for (const p of Object.keys(t.next)) if (committed[p] !== t.next[p]) fail(`${topic}: committed ${JSON.stringify(committed)}`);
    ok(`${topic}: ${N} produced (acks=all, ${codec[0]}), consumed in order, committed ${JSON.stringify(committed)}`);
  }

  const block = crypto.createHash('sha256').update('big').digest();
  const big = Buffer.alloc(BIG);
  for (let i = 0; i < BIG; i += block.length) block.copy(big, i);
  const p = kafka.producer();
  await p.connect();
  await p.send({ topic: 'kj-big', acks: -1, messages: [{ value: big, partition: 0 }] });
  const meta = await p.send({ topic: 'kj-mid', acks: -1, messages: Array.from({ length: 20 }, (_, s) => ({ value: value('mid', s), partition: 0 })) });
  await p.disconnect();
  const base = Number(meta[0].baseOffset);

  const c = kafka.consumer({ groupId: 'kj-big-g', maxBytesPerPartition: 4 << 20, maxBytes: 8 << 20, maxWaitTimeInMs: 200 });
  await c.connect();
  await c.subscribe({ topic: 'kj-big', fromBeginning: true });
  const got = await new Promise((resolve) => {
    const timer = setTimeout(() => resolve(null), 30000);
    c.run({ eachMessage: async ({ message }) => { clearTimeout(timer); resolve(message.value); } });
  });
  await c.disconnect();
  if (!got || !got.equals(big)) fail('1 MiB message did not come back intact');
  ok(`1 MiB message (${BIG} bytes) round-tripped intact`);

  const start = base + 7;
  const m = kafka.consumer({ groupId: 'kj-mid-g', maxWaitTimeInMs: 200 });
  await m.connect();
  await m.subscribe({ topic: 'kj-mid' });
  const seen = [];
  await new Promise((resolve) => {
    const timer = setTimeout(resolve, 30000);
    m.run({
      autoCommit: false,
      eachMessage: async ({ message }) => {
        seen.push([Number(message.offset), checkValue(message.value)]);
        if (seen.length >= 13) { clearTimeout(timer); resolve(); }
      },
    });
    m.seek({ topic: 'kj-mid', partition: 0, offset: String(start) });
  });
  await m.disconnect();
  const offs = seen.map((x) => x[0]);
  if (JSON.stringify(offs) !== JSON.stringify(Array.from({ length: 13 }, (_, i) => start + i)) || seen[0][1] !== 7) {
    fail(`mid-batch consumer from ${start} got ${JSON.stringify(seen.slice(0, 3))}`);
  }
  ok(`consumer starting at offset ${start} inside a 20-record batch saw ${start}..${start + 12}, no gap`);
  await admin.disconnect();
}

async function phase2(kafka) {
  const admin = kafka.admin();
  await admin.connect();
  for (const codec of CODECS) {
    const topic = `kj-${codec[0]}`;
    const committed = await committedOffsets(admin, `kj-g-${codec[0]}`, topic);
    await produce(kafka, topic, codec, N, N + N_AFTER);
    const t = await consumeGroup(kafka, topic, `kj-g-${codec[0]}`, N_AFTER);
    if (t.seen.size !== N_AFTER || Math.min(...t.seen) !== N) fail(`${topic}: after restart got ${t.seen.size}, lowest ${Math.min(...t.seen)}`);
    for (const p of Object.keys(t.first)) if (committed[p] !== t.first[p]) fail(`${topic}: partition ${p} resumed at ${t.first[p]}, committed ${committed[p]}`);
    ok(`${topic}: resumed exactly after the committed offsets ${JSON.stringify(committed)} and got the ${N_AFTER} new messages`);
  }
  await admin.disconnect();
}

const args = process.argv.slice(2);
const bootstrap = args[args.indexOf('--bootstrap') + 1];
const phase = Number(args[args.indexOf('--phase') + 1]);
const kafka = new Kafka({ clientId: 'kafkajs-suite', brokers: [bootstrap], logLevel: logLevel.ERROR, retry: { retries: 5 } });
(phase === 1 ? phase1(kafka) : phase2(kafka)).then(() => { console.log('done'); process.exit(0); }, (e) => fail(e.stack || e));
