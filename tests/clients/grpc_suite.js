// rocketmq-client-nodejs 1.0.8 (RocketMQ 5, gRPC) against slipstream's rocketmq-grpc
// listener, on the same log as the remoting and Kafka clients.
//
//   node grpc_suite.js --endpoints HOST:PORT [--namesrv HOST:PORT] --phase PHASE
//
// send: 10,000 messages (tags a/b, keys, a property); a SimpleConsumer with tag a gets
//   exactly the 5,000, a PushConsumer with * all 10,000; a third group receives and
//   acknowledges 3,000 (then the broker restarts).
// resume (after the restart): 1,000 more; the third group gets every message it had not
//   acknowledged and none it had.
// fifo: 2,000 messages in 20 message groups; a PushConsumer sees each group in order, a
//   failed message coming back before the rest of its group.
// delay: delay messages arrive no earlier than due.
// transaction: committed and rolled back transactions, and two left open that the broker
//   checks back (one committed, one rolled back by the checker).
// invisible: an unacknowledged message comes back (attempt 2) after its invisible time;
//   ChangeInvisibleDuration extends it and gives a new handle; the old one is refused.
// dlq (broker with --rocketmq-max-delivery-attempts 2): a message never acknowledged ends
//   in %DLQ%group after two deliveries.
// cross-send / cross-receive: the gRPC half of the Kafka round trip (cross_protocol.py).
// cross-ons (broker with a remoting listener too): gRPC -> ali-ons and ali-ons -> gRPC.
// raw-rpcs: the RPCs the Node.js SDK does not call, through its generated stubs:
//   QueryOffset (beginning, end, timestamp), PullMessage (with long polling),
//   UpdateOffset / GetOffset, ForwardMessageToDeadLetterQueue.
// bad-input: malformed protobuf, unknown topic, forged receipt handle, oversized body,
//   unimplemented RPC, missing client id: each refused, other streams unaffected.
'use strict';

const assert = require('node:assert');
const path = require('node:path');
const rmq = require('rocketmq-client-nodejs');
const { Producer, SimpleConsumer, PushConsumer, ConsumeResult } = rmq;
const { TransactionResolution } = require('rocketmq-client-nodejs/proto/apache/rocketmq/v2/definition_pb');

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
const ENDPOINTS = args.endpoints;

// The client's default logger writes under ~/logs; ours keeps errors only.
const logger = {
  info() {}, debug() {}, warn() {},
  error(...a) { if (process.env.GRPC_SUITE_DEBUG) console.error('[client]', ...a); },
};
// `--ssl true`: TLS (the CA comes from GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, read by grpc-js).
const opts = extra => Object.assign({ endpoints: ENDPOINTS, logger, requestTimeout: 10000, sslEnabled: args.ssl === 'true' }, extra);

function fail(msg) {
  console.error('FAIL:', msg);
  process.exit(1);
}
function check(cond, msg) {
  if (!cond) fail(msg);
}
const sleep = ms => new Promise(r => setTimeout(r, ms));

async function withTimeout(promise, ms, what) {
  let t;
  const timeout = new Promise((_, reject) => { t = setTimeout(() => reject(new Error(`timed out: ${typeof what === 'function' ? what() : what}`)), ms); });
  try {
    return await Promise.race([ promise, timeout ]);
  } finally {
    clearTimeout(t);
  }
}

async function producer(topics, extra) {
  const p = new Producer(opts(Object.assign({ topics }, extra || {})));
  await p.startup();
  return p;
}

// Sends `n` messages made by `make(i)`, `window` at a time.
async function sendAll(p, n, make, window = 64) {
  const receipts = new Array(n);
  let next = 0;
  async function worker() {
    while (next < n) {
      const i = next++;
      receipts[i] = await p.send(make(i));
    }
  }
  await Promise.all(Array.from({ length: window }, worker));
  return receipts;
}

async function simple(group, subs, awaitDuration = 1000) {
  const c = new SimpleConsumer(opts({ consumerGroup: group, subscriptions: new Map(subs), awaitDuration }));
  await c.startup();
  return c;
}

// Receives and acknowledges until `want` messages or `ms` pass; `onMessage` sees each.
async function drain(c, want, ms, onMessage, invisible = 15000) {
  const until = Date.now() + ms;
  let n = 0;
  while (n < want && Date.now() < until) {
    const batch = await c.receive(32, invisible);
    for (const m of batch) {
      if (onMessage) onMessage(m);
      await c.ack(m);
      n++;
    }
  }
  return n;
}

// A push consumer whose listener is `listener(m)` (returns a ConsumeResult).
async function push(group, subs, listener) {
  const c = new PushConsumer(opts({
    consumerGroup: group,
    subscriptions: new Map(subs),
    messageListener: { consume: async m => listener(m) },
    longPollingTimeout: 5000,
  }));
  await c.startup();
  return c;
}

const TOPIC = 'grpc-topic';
const N1 = 10000;
const N2 = 1000;

function body(i) {
  return Buffer.from(`msg-${i}`);
}

async function phaseSend() {
  const p = await producer([ TOPIC ]);
  const receipts = await sendAll(p, N1, i => ({
    topic: TOPIC,
    tag: i % 2 === 0 ? 'a' : 'b',
    keys: [ `key-${i}` ],
    properties: new Map([[ 'idx', String(i) ]]),
    body: body(i),
  }));
  const ids = new Set(receipts.map(r => r.messageId));
  check(ids.size === N1, `message ids not unique: ${ids.size}`);
  await p.shutdown();
  console.log(`sent ${N1}`);

  // Tag filter: exactly the even ones.
  const tagged = new Set();
  const s = await simple('grpc-tag-a', [[ TOPIC, 'a' ]]);
  await drain(s, N1 / 2, 120000, m => {
    const i = Number(m.properties.get('idx'));
    check(m.tag === 'a' && i % 2 === 0, `tag filter let ${m.tag} / ${i} through`);
    check(m.body.toString() === `msg-${i}`, `body ${m.body}`);
    check(m.keys[0] === `key-${i}`, `keys ${m.keys}`);
    check(ids.has(m.messageId), `unknown message id ${m.messageId}`);
    check(m.deliveryAttempt === 1, `attempt ${m.deliveryAttempt}`);
    check(!tagged.has(i), `message ${i} delivered twice`);
    tagged.add(i);
  });
  check(tagged.size === N1 / 2, `simple consumer got ${tagged.size} of ${N1 / 2}`);
  check((await s.receive(32, 15000)).length === 0, 'more than the tagged messages');
  await s.shutdown();
  console.log('simple consumer: tag a, 5000 ok');

  // Push consumer, all tags.
  const seen = new Set();
  let resolve;
  const done = new Promise(r => { resolve = r; });
  const pc = await push('grpc-push-all', [[ TOPIC, '*' ]], m => {
    seen.add(m.body.toString());
    if (seen.size >= N1) resolve();
    return ConsumeResult.SUCCESS;
  });
  await withTimeout(done, 180000, () => `push consumer (${seen.size} of ${N1})`);
  await pc.shutdown();
  console.log('push consumer: 10000 ok');

  // A group that stops part way (resumed after the restart).
  const got = new Set();
  const r = await simple('grpc-resume', [[ TOPIC, '*' ]]);
  await drain(r, 3000, 120000, m => got.add(m.body.toString()));
  await r.shutdown();
  require('node:fs').writeFileSync(args.state, JSON.stringify([ ...got ]));
  // The acknowledged offsets reach the offset store in the background.
  await sleep(1500);
  console.log(`resume group acknowledged ${got.size}`);
}

async function phaseResume() {
  const before = new Set(JSON.parse(require('node:fs').readFileSync(args.state, 'utf8')));
  const p = await producer([ TOPIC ]);
  await sendAll(p, N2, i => ({ topic: TOPIC, tag: 'a', body: body(N1 + i) }));
  await p.shutdown();
  const r = await simple('grpc-resume', [[ TOPIC, '*' ]]);
  const after = new Set();
  const want = N1 + N2 - before.size;
  await drain(r, want, 180000, m => {
    const b = m.body.toString();
    check(!before.has(b), `${b} was acknowledged before the restart and came again`);
    check(!after.has(b), `${b} delivered twice`);
    after.add(b);
  });
  check(after.size === want, `resumed group got ${after.size} of ${want}`);
  await r.shutdown();
  console.log(`resume ok: ${before.size} before, ${after.size} after`);
}

async function phaseFifo() {
  const topic = 'grpc-fifo';
  const groups = 20;
  const per = 100;
  const p = await producer([ topic ]);
  // One sender per group keeps each group's sends in order.
  await Promise.all(Array.from({ length: groups }, async (_, g) => {
    for (let k = 0; k < per; k++) {
      await p.send({ topic, messageGroup: `g${g}`, body: Buffer.from(`${g}:${k}`) });
    }
  }));
  await p.shutdown();
  const last = new Map();
  let total = 0;
  const failedOnce = new Set();
  let resolve;
  const done = new Promise(r => { resolve = r; });
  const pc = await push('grpc-fifo-group', [[ topic, '*' ]], async m => {
    const [ g, k ] = m.body.toString().split(':').map(Number);
    check(m.messageGroup === `g${g}`, `message group ${m.messageGroup}`);
    const prev = last.has(g) ? last.get(g) : -1;
    check(k === prev + 1, `group ${g}: ${k} after ${prev}`);
    await sleep(Math.random() * 2);
    // Every 50th fails once: it must come back before the rest of its group.
    if (k % 50 === 7 && !failedOnce.has(`${g}:${k}`)) {
      failedOnce.add(`${g}:${k}`);
      return ConsumeResult.FAILURE;
    }
    last.set(g, k);
    if (++total >= groups * per) resolve();
    return ConsumeResult.SUCCESS;
  });
  await withTimeout(done, 240000, () => `fifo (${total} of ${groups * per})`);
  await pc.shutdown();
  check(failedOnce.size === groups * 2, `failures ${failedOnce.size}`);
  console.log('fifo ok: 20 groups in order, failed messages redelivered in place');
}

async function phaseDelay() {
  const topic = 'grpc-delay';
  const p = await producer([ topic ]);
  const sent = Date.now();
  await sendAll(p, 20, i => ({ topic, delay: 3000, body: Buffer.from(`d${i}`) }), 4);
  await p.shutdown();
  const c = await simple('grpc-delay-group', [[ topic, '*' ]]);
  const got = [];
  await drain(c, 20, 60000, m => {
    check(Date.now() >= sent + 2900, `delay message ${m.body} came ${Date.now() - sent} ms after its send`);
    check(m.deliveryTimestamp && m.deliveryTimestamp.getTime() >= sent + 2900, 'delivery timestamp');
    got.push(m.body.toString());
  });
  check(got.length === 20, `got ${got.length} delay messages`);
  await c.shutdown();
  console.log(`delay ok: 20 after ${Date.now() - sent} ms`);
}

async function phaseTransaction() {
  const topic = 'grpc-tx';
  const checked = [];
  const p = await producer([ topic ], {
    checker: {
      async check(m) {
        const b = m.body.toString();
        checked.push(b);
        return b === 'check-commit' ? TransactionResolution.COMMIT : TransactionResolution.ROLLBACK;
      },
    },
  });
  const tx1 = p.beginTransaction();
  await p.send({ topic, body: Buffer.from('committed') }, tx1);
  await tx1.commit();
  const tx2 = p.beginTransaction();
  await p.send({ topic, body: Buffer.from('rolled-back') }, tx2);
  await tx2.rollback();
  // Left open: the broker asks the checker.
  await p.send({ topic, body: Buffer.from('check-commit') }, p.beginTransaction());
  await p.send({ topic, body: Buffer.from('check-rollback') }, p.beginTransaction());
  const c = await simple('grpc-tx-group', [[ topic, '*' ]]);
  const got = new Set();
  await drain(c, 2, 60000, m => got.add(m.body.toString()));
  // Anything rolled back would have come by now too.
  await drain(c, 1, 4000, m => got.add(m.body.toString()));
  check(got.has('committed') && got.has('check-commit'), `got ${[ ...got ]}`);
  check(got.size === 2, `rolled back messages delivered: ${[ ...got ]}`);
  check(checked.includes('check-commit') && checked.includes('check-rollback'), `checked ${checked}`);
  await c.shutdown();
  await p.shutdown();
  console.log('transaction ok: commit, rollback, check-back both ways');
}

async function phaseInvisible() {
  const topic = 'grpc-invisible';
  const p = await producer([ topic ]);
  await p.send({ topic, body: Buffer.from('again') });
  await p.shutdown();
  const c = await simple('grpc-invisible-group', [[ topic, '*' ]]);
  let first = [];
  for (let i = 0; i < 20 && first.length === 0; i++) first = await c.receive(1, 2000);
  check(first.length === 1 && first[0].deliveryAttempt === 1, 'first delivery');
  const t0 = Date.now();
  let second = [];
  while (second.length === 0 && Date.now() - t0 < 15000) second = await c.receive(1, 2000);
  check(second.length === 1, 'no redelivery');
  check(Date.now() - t0 >= 1500, `redelivered after ${Date.now() - t0} ms`);
  check(second[0].deliveryAttempt === 2, `attempt ${second[0].deliveryAttempt}`);
  check(second[0].messageId === first[0].messageId, 'another message');
  const oldHandle = second[0].receiptHandle;
  await c.changeInvisibleDuration(second[0], 10000);
  check(second[0].receiptHandle !== oldHandle, 'no new receipt handle');
  const none = await c.receive(1, 2000);
  check(none.length === 0, 'delivered while invisible');
  await sleep(2500);
  check((await c.receive(1, 2000)).length === 0, 'extension not kept');
  let refused = false;
  try {
    await c.ack(Object.assign(Object.create(Object.getPrototypeOf(second[0])), second[0], { receiptHandle: oldHandle }));
  } catch (e) {
    refused = /receipt handle/i.test(String(e.message || e));
  }
  check(refused, 'an old receipt handle was accepted');
  await c.ack(second[0]);
  await c.shutdown();
  console.log('invisible ok: redelivery, attempt 2, extension, stale handle refused');
}

async function phaseDlq() {
  const topic = 'grpc-dlq';
  const group = 'grpc-dlq-group';
  const p = await producer([ topic ]);
  await p.send({ topic, body: Buffer.from('poison'), keys: [ 'pk' ] });
  await p.shutdown();
  const c = await simple(group, [[ topic, '*' ]]);
  const attempts = [];
  const until = Date.now() + 30000;
  while (Date.now() < until && attempts.length < 3) {
    const ms = await c.receive(1, 1000);
    for (const m of ms) attempts.push(m.deliveryAttempt);
    if (attempts.length === 2) {
      // Wait out the second one: the third delivery goes to the dead-letter queue.
      await sleep(1500);
      check((await c.receive(1, 1000)).length === 0, 'a third delivery');
      break;
    }
  }
  check(attempts.join() === '1,2', `attempts ${attempts}`);
  await c.shutdown();
  const d = await simple(`${group}-dlq-reader`, [[ `%DLQ%${group}`, '*' ]]);
  const dead = [];
  await drain(d, 1, 30000, m => dead.push(m));
  check(dead.length === 1 && dead[0].body.toString() === 'poison', 'not in the dead-letter queue');
  check(dead[0].keys[0] === 'pk', 'keys lost on the way to the DLQ');
  await d.shutdown();
  console.log('dlq ok');
}

async function phaseCrossSend() {
  const p = await producer([ 'cross-r2k' ]);
  await sendAll(p, 100, i => ({
    topic: 'cross-r2k',
    tag: 'TagX',
    keys: [ `rk-${i}` ],
    properties: new Map([[ 'user_prop', `v${i}` ]]),
    body: Buffer.from(`from-rocketmq-${i}`),
  }));
  await p.shutdown();
  console.log('cross-send ok');
}

async function phaseCrossReceive() {
  const c = await simple('grpc-cross-reader', [[ 'cross-k2r', 'TagK' ]]);
  const seen = new Map();
  await drain(c, 50, 60000, m => seen.set(m.body.toString(), m));
  check(seen.size === 50, `got ${seen.size} of the 50 TagK records`);
  for (const [ b, m ] of seen) {
    const i = Number(b.split('-').pop());
    check(i % 2 === 0, `${b} does not carry TagK`);
    check(m.keys[0] === `kk-${i}`, `Kafka key did not become the key: ${m.keys}`);
    check(m.properties.get('origin') === 'kafka', 'header did not become a property');
  }
  await c.shutdown();
  console.log('cross-receive ok');
}

// Over TLS: 200 messages sent and received back intact by a SimpleConsumer.
async function phaseTls() {
  const p = await producer([ 'grpc-tls' ]);
  await sendAll(p, 200, i => ({ topic: 'grpc-tls', tag: 'T', body: Buffer.from(`tls-${i}`) }));
  await p.shutdown();
  const c = await simple('grpc-tls-reader', [[ 'grpc-tls', '*' ]]);
  const seen = new Set();
  await drain(c, 200, 60000, m => seen.add(m.body.toString()));
  check(seen.size === 200, `got ${seen.size} of 200 over TLS`);
  await c.shutdown();
  console.log('tls ok');
}

async function phaseCrossOns() {
  const { Producer: OnsProducer, Consumer: OnsConsumer, Message: OnsMessage } = require('ali-ons');
  const ConsumeFromWhere = require('ali-ons/lib/consumer/consume_from_where');
  const quiet = { info() {}, warn() {}, debug() {}, error() {} };
  const common = {
    nameSrv: args.namesrv, httpclient: {}, accessKeyId: 'x', accessKeySecret: 'y', logger: quiet,
    persistConsumerOffsetInterval: 1000, rebalanceInterval: 2000,
  };
  // gRPC -> remoting.
  const p = await producer([ 'g2r' ]);
  await sendAll(p, 100, i => ({ topic: 'g2r', tag: i % 2 ? 'odd' : 'even', keys: [ `gk-${i}` ],
    properties: new Map([[ 'from', 'grpc' ]]), body: Buffer.from(`g-${i}`) }));
  await p.shutdown();
  const seen = new Map();
  const consumer = new OnsConsumer(Object.assign({}, common, { consumerGroup: 'g2r-reader',
    consumeFromWhere: ConsumeFromWhere.CONSUME_FROM_FIRST_OFFSET, instanceName: `g2r-${process.pid}` }));
  consumer.on('error', () => {});
  let resolve;
  const finished = new Promise(r => { resolve = r; });
  consumer.subscribe('g2r', 'even', async msg => {
    seen.set(msg.body.toString(), msg);
    if (seen.size >= 50) resolve();
  });
  await consumer.ready();
  await withTimeout(finished, 120000, () => `ali-ons reading gRPC messages (${seen.size})`);
  await consumer.close();
  for (const [ b, m ] of seen) {
    const i = Number(b.split('-').pop());
    check(i % 2 === 0 && m.tags === 'even', `${b} tag ${m.tags}`);
    check(m.keys === `gk-${i}`, `keys ${m.keys}`);
    check(m.properties.from === 'grpc', `properties ${JSON.stringify(m.properties)}`);
  }
  console.log('gRPC -> ali-ons ok');
  // remoting -> gRPC.
  const op = new OnsProducer(Object.assign({}, common, { producerGroup: 'r2g-sender', instanceName: `r2g-${process.pid}` }));
  await op.ready();
  for (let i = 0; i < 100; i++) {
    const m = new OnsMessage('r2g', 'TagR', Buffer.from(`r-${i}`));
    m.keys = [ `ok-${i}` ];
    m.properties.from = 'ons';
    await op.send(m);
  }
  await op.close();
  const c = await simple('r2g-reader', [[ 'r2g', 'TagR' ]]);
  const got = new Map();
  await drain(c, 100, 60000, m => got.set(m.body.toString(), m));
  check(got.size === 100, `gRPC read ${got.size} of 100 ali-ons messages`);
  for (const [ b, m ] of got) {
    const i = Number(b.split('-').pop());
    check(m.tag === 'TagR' && m.keys[0] === `ok-${i}` && m.properties.get('from') === 'ons', `${b}: ${m.tag} ${m.keys}`);
    check(m.messageId && m.messageId.length > 0, 'no message id');
  }
  await c.shutdown();
  console.log('ali-ons -> gRPC ok');
}

// The SDK's generated gRPC stubs, for RPCs it does not call and for raw requests.
function stubs() {
  const grpc = require(require.resolve('@grpc/grpc-js', { paths: [ require.resolve('rocketmq-client-nodejs') ] }));
  const protoDir = path.join(path.dirname(require.resolve('rocketmq-client-nodejs/package.json')), 'proto/apache/rocketmq/v2');
  const svc = require(path.join(protoDir, 'service_grpc_pb.js'));
  const pb = require(path.join(protoDir, 'service_pb.js'));
  const def = require(path.join(protoDir, 'definition_pb.js'));
  const { Duration } = require('google-protobuf/google/protobuf/duration_pb');
  const { Timestamp } = require('google-protobuf/google/protobuf/timestamp_pb');
  const client = new svc.MessagingServiceClient(ENDPOINTS, grpc.credentials.createInsecure(),
    { 'grpc.max_send_message_length': 64 << 20 });
  const md = () => {
    const m = new grpc.Metadata();
    m.set('x-mq-client-id', `raw-${process.pid}`);
    return m;
  };
  const unary = (method, req, meta) => new Promise((res, rej) => client[method](req, meta || md(), (e, r) => (e ? rej(e) : res(r))));
  // A server-streaming call's items.
  const stream = (method, req) => new Promise((res, rej) => {
    const items = [];
    const s = client[method](req, md());
    s.on('data', d => items.push(d));
    s.on('end', () => res(items));
    s.on('error', rej);
  });
  const resource = name => new def.Resource().setName(name);
  const duration = ms => new Duration().setSeconds(Math.floor(ms / 1000)).setNanos((ms % 1000) * 1e6);
  return { grpc, pb, def, client, md, unary, stream, resource, duration, Timestamp };
}

async function phaseRawRpcs() {
  const { pb, def, client, unary, stream, resource, duration, Timestamp } = stubs();
  const topic = 'grpc-raw';
  const p = await producer([ topic ]);
  for (let i = 0; i < 10; i++) await p.send({ topic, body: Buffer.from(`raw-${i}`) });
  const mq = new def.MessageQueue().setTopic(resource(topic)).setId(0);
  const offset = async (policy, ts) => {
    const req = new pb.QueryOffsetRequest().setMessageQueue(mq).setQueryOffsetPolicy(policy);
    if (ts) req.setTimestamp(ts);
    const r = await unary('queryOffset', req);
    check(r.getStatus().getCode() === def.Code.OK, `QueryOffset ${policy}: ${r.getStatus().getMessage()}`);
    return r.getOffset();
  };
  check(await offset(def.QueryOffsetPolicy.BEGINNING) === 0, 'beginning');
  check(await offset(def.QueryOffsetPolicy.END) === 10, 'end');
  const hourAgo = new Timestamp().setSeconds(Math.floor(Date.now() / 1000) - 3600);
  check(await offset(def.QueryOffsetPolicy.TIMESTAMP, hourAgo) === 0, 'by timestamp');

  // PullMessage: five from offset 3, then a long poll at the end answered by a new send.
  const pull = (from, n, waitMs) => stream('pullMessage', new pb.PullMessageRequest().setGroup(resource('raw-g'))
    .setMessageQueue(mq).setOffset(from).setBatchSize(n)
    .setFilterExpression(new def.FilterExpression().setType(def.FilterType.TAG).setExpression('*'))
    .setLongPollingTimeout(duration(waitMs)));
  let items = await pull(3, 5, 0);
  const bodies = items.filter(i => i.hasMessage()).map(i => Buffer.from(i.getMessage().getBody_asU8()).toString());
  check(bodies.join() === 'raw-3,raw-4,raw-5,raw-6,raw-7', `pulled ${bodies}`);
  const next = items.filter(i => i.hasNextOffset()).map(i => i.getNextOffset());
  check(next.length === 1 && next[0] === 8, `next offset ${next}`);
  const t0 = Date.now();
  const waiting = pull(10, 5, 5000);
  await sleep(500);
  await p.send({ topic, body: Buffer.from('raw-late') });
  items = await waiting;
  const late = items.filter(i => i.hasMessage()).map(i => Buffer.from(i.getMessage().getBody_asU8()).toString());
  check(late.join() === 'raw-late' && Date.now() - t0 < 4000, `long poll got ${late} after ${Date.now() - t0} ms`);
  items = await pull(11, 5, 300);
  check(items.length === 1 && items[0].getStatus().getCode() === def.Code.MESSAGE_NOT_FOUND, 'an empty long poll');

  // UpdateOffset / GetOffset.
  let r = await unary('getOffset', new pb.GetOffsetRequest().setGroup(resource('raw-g')).setMessageQueue(mq));
  check(r.getStatus().getCode() === def.Code.OFFSET_NOT_FOUND, `a new group's offset: ${r.getStatus().getCode()}`);
  r = await unary('updateOffset', new pb.UpdateOffsetRequest().setGroup(resource('raw-g')).setMessageQueue(mq).setOffset(8));
  check(r.getStatus().getCode() === def.Code.OK, 'UpdateOffset');
  r = await unary('getOffset', new pb.GetOffsetRequest().setGroup(resource('raw-g')).setMessageQueue(mq));
  check(r.getStatus().getCode() === def.Code.OK && r.getOffset() === 8, `GetOffset ${r.getOffset()}`);

  // ForwardMessageToDeadLetterQueue with a received message's handle, once.
  const recv = await stream('receiveMessage', new pb.ReceiveMessageRequest().setGroup(resource('raw-dlq'))
    .setMessageQueue(new def.MessageQueue().setTopic(resource(topic)).setId(-1)).setBatchSize(1)
    .setFilterExpression(new def.FilterExpression().setType(def.FilterType.TAG).setExpression('*'))
    .setInvisibleDuration(duration(30000)).setLongPollingTimeout(duration(1000)));
  const m = recv.filter(i => i.hasMessage()).map(i => i.getMessage())[0];
  check(m, 'nothing received');
  check(recv.some(i => i.hasDeliveryTimestamp()), 'no delivery timestamp');
  const sys = m.getSystemProperties();
  check(sys.getBodyDigest().getType() === def.DigestType.MD5 && /^[0-9A-F]{32}$/.test(sys.getBodyDigest().getChecksum()), 'digest');
  const forward = () => unary('forwardMessageToDeadLetterQueue', new pb.ForwardMessageToDeadLetterQueueRequest()
    .setGroup(resource('raw-dlq')).setTopic(resource(topic)).setReceiptHandle(sys.getReceiptHandle())
    .setMessageId(sys.getMessageId()).setDeliveryAttempt(1).setMaxDeliveryAttempts(16));
  r = await forward();
  check(r.getStatus().getCode() === def.Code.OK, `forward: ${r.getStatus().getMessage()}`);
  r = await forward();
  check(r.getStatus().getCode() === def.Code.INVALID_RECEIPT_HANDLE, 'forwarded twice');
  const d = await simple('raw-dlq-reader', [[ '%DLQ%raw-dlq', '*' ]]);
  const dead = [];
  await drain(d, 1, 30000, x => dead.push(x.body.toString()));
  check(dead.join() === Buffer.from(m.getBody_asU8()).toString(), `dead letters ${dead}`);
  await d.shutdown();
  await p.shutdown();
  client.close();
  console.log('raw-rpcs ok: QueryOffset, PullMessage, UpdateOffset/GetOffset, ForwardMessageToDeadLetterQueue');
}

async function phaseBadInput() {
  const { grpc, pb, def, client, md, unary, resource, duration } = stubs();

  // A healthy consumer long-polls on another stream the whole time.
  const topic = 'grpc-bad-input';
  const p = await producer([ topic ]);
  const healthy = (async () => {
    const c = await simple('grpc-bad-healthy', [[ topic, '*' ]], 5000);
    const n = await drain(c, 1, 60000);
    await c.shutdown();
    return n;
  })();

  // Malformed protobuf: raw bytes through a custom serializer.
  const raw = new grpc.Client(ENDPOINTS, grpc.credentials.createInsecure());
  const garbage = await new Promise(res => raw.makeUnaryRequest('/apache.rocketmq.v2.MessagingService/SendMessage',
    b => b, b => b, Buffer.from([ 0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01 ]), md(), (e, r) => res(e || r)));
  check(garbage instanceof Error && garbage.code !== grpc.status.OK, `malformed protobuf answered ${garbage}`);
  console.log(`malformed protobuf: gRPC status ${garbage.code} (${garbage.details})`);

  const message = (t, bodyBytes) => {
    const sys = new def.SystemProperties().setMessageId(`bad-${Math.random()}`).setMessageType(def.MessageType.NORMAL)
      .setBodyEncoding(def.Encoding.IDENTITY);
    return new def.Message().setTopic(resource(t)).setSystemProperties(sys).setBody(bodyBytes);
  };
  // Unknown topic.
  let r = await unary('sendMessage', new pb.SendMessageRequest().setMessagesList([ message('no-such-topic-xyz', Buffer.from('x')) ]));
  check(r.getEntriesList()[0].getStatus().getCode() === def.Code.TOPIC_NOT_FOUND, `unknown topic: ${r.getStatus().getCode()}`);
  // Oversized body.
  r = await unary('sendMessage', new pb.SendMessageRequest().setMessagesList([ message(topic, Buffer.alloc(5 << 20, 1)) ]));
  check(r.getEntriesList()[0].getStatus().getCode() === def.Code.MESSAGE_BODY_TOO_LARGE, `oversized: ${r.getStatus().getCode()}`);
  // Forged and garbage receipt handles.
  for (const handle of [ '0.0.1.0123456789abcdef', 'not a handle' ]) {
    const ack = new pb.AckMessageRequest().setGroup(resource('grpc-bad-healthy')).setTopic(resource(topic))
      .setEntriesList([ new pb.AckMessageEntry().setMessageId('m').setReceiptHandle(handle) ]);
    r = await unary('ackMessage', ack);
    check(r.getStatus().getCode() === def.Code.INVALID_RECEIPT_HANDLE, `forged handle: ${r.getStatus().getCode()}`);
  }
  // An RPC slipstream does not serve.
  const recall = await unary('recallMessage', new pb.RecallMessageRequest().setTopic(resource(topic)).setRecallHandle('x'))
    .catch(e => e);
  check(recall instanceof Error && recall.code === grpc.status.UNIMPLEMENTED, `recall answered ${recall}`);
  // No client id.
  const anon = await unary('heartbeat', new pb.HeartbeatRequest(), new grpc.Metadata()).catch(e => e);
  check(anon instanceof Error && anon.code === grpc.status.INVALID_ARGUMENT, `no client id answered ${anon}`);
  // A SQL filter.
  const sql = await new Promise(res => {
    const req = new pb.ReceiveMessageRequest().setGroup(resource('g')).setBatchSize(1)
      .setMessageQueue(new def.MessageQueue().setTopic(resource(topic)).setId(-1))
      .setFilterExpression(new def.FilterExpression().setType(def.FilterType.SQL).setExpression('a > 1'))
      .setInvisibleDuration(duration(10000));
    const codes = [];
    const s = client.receiveMessage(req, md());
    s.on('data', d => d.hasStatus() && codes.push(d.getStatus().getCode()));
    s.on('end', () => res(codes));
    s.on('error', e => res([ e.code ]));
  });
  check(sql.length === 1 && sql[0] === def.Code.NOT_IMPLEMENTED, `SQL filter answered ${sql}`);
  console.log('unknown topic, oversized body, forged handles, unimplemented RPC, no client id, SQL filter: refused');

  // The healthy consumer still gets its message.
  await p.send({ topic, body: Buffer.from('still-fine') });
  check(await withTimeout(healthy, 60000, 'healthy consumer') === 1, 'the healthy consumer got nothing');
  await p.shutdown();
  raw.close();
  client.close();
  console.log('bad-input ok');
}

const phases = {
  send: phaseSend,
  resume: phaseResume,
  fifo: phaseFifo,
  delay: phaseDelay,
  transaction: phaseTransaction,
  invisible: phaseInvisible,
  dlq: phaseDlq,
  'cross-send': phaseCrossSend,
  'cross-receive': phaseCrossReceive,
  'cross-ons': phaseCrossOns,
  'raw-rpcs': phaseRawRpcs,
  tls: phaseTls,
  'bad-input': phaseBadInput,
};

const phase = phases[args.phase];
if (!phase) fail(`unknown phase ${args.phase}`);
phase().then(() => {
  console.log('done');
  process.exit(0);
}, e => fail(e && e.stack ? e.stack : e));
