// Drives the emulator with Microsoft's JavaScript SDK (@azure/service-bus, on the rhea AMQP
// stack) and asserts what Service Bus would answer. Run by tests/microsoft_sdks.rs:
//
//   node js_sdk.mjs CONNECTION_STRING TOPIC SESSION_SUBSCRIPTION PLAIN_SUBSCRIPTION QUEUE
//
// Same scenario and the same preconditions as python_sdk.py: an empty topic with duplicate
// detection, a session subscription and a plain one, an empty queue with a short lock. Leaves
// exactly one message behind, in the dead-letter queue of PLAIN_SUBSCRIPTION (message id "b:1",
// reason "plain-reason"). Any failed check throws, so the exit status is non-zero.

import { ServiceBusClient, isServiceBusError } from "@azure/service-bus";
import Long from "long";

const WAIT = { maxWaitTimeInMs: 5000 };

function check(condition, what) {
  if (!condition) throw new Error(`check failed: ${what}`);
}

const text = (m) => Buffer.from(m.body).toString();
const texts = (ms) => ms.map(text);
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);
const seq = (m) => m.sequenceNumber.toNumber();
/** Peeks from the start (by default a receiver peeks on from where its last peek ended). */
const peekAll = (receiver) => receiver.peekMessages(10, { fromSequenceNumber: Long.fromNumber(1) });

/** Exactly n messages (fails after a few empty receives). */
async function receive(receiver, n) {
  const got = [];
  for (let i = 0; i < 5 && got.length < n; i++) {
    got.push(...(await receiver.receiveMessages(n - got.length, WAIT)));
  }
  check(got.length === n, `expected ${n} messages, got ${JSON.stringify(texts(got))}`);
  return got;
}

/** The lock token as its GUID text, from the x-opt-lock-token annotation (an AMQP uuid). */
function annotatedLockToken(m) {
  // rhea decodes a uuid to a Buffer; the SDK's date conversion of the annotations turns that
  // into a plain object with the byte values under "0".."15".
  const raw = m._rawAmqpMessage.deliveryAnnotations?.["x-opt-lock-token"];
  const bytes = Buffer.from(Array.from({ length: 16 }, (_, i) => raw?.[i]));
  check(raw && Object.keys(raw).length === 16 && bytes.length === 16, `x-opt-lock-token is a uuid: ${raw}`);
  const h = bytes.toString("hex");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Annotations of a peek-locked delivery, and the lock token the SDK took from the tag. */
function checkFresh(m, deliveryCount = 0) {
  const now = Date.now();
  check(seq(m) > 0, "sequence number");
  check(m.enqueuedTimeUtc instanceof Date, "enqueued time");
  check(m.lockedUntilUtc instanceof Date && m.lockedUntilUtc.getTime() > now, `locked until ${m.lockedUntilUtc}`);
  check(m.deliveryCount === deliveryCount, `${text(m)}: delivery count ${m.deliveryCount}, expected ${deliveryCount}`);
  // The SDK reads the lock token from the 16-byte delivery tag (.NET Guid byte order); the
  // x-opt-lock-token delivery annotation must name the same GUID.
  check(
    m.lockToken === annotatedLockToken(m),
    `delivery tag lock token ${m.lockToken} != x-opt-lock-token ${annotatedLockToken(m)}`,
  );
}

/** A deferred message received by sequence number: locked, with its own lock token. */
function checkDeferred(m, deliveryCount) {
  check(/^[0-9a-f-]{36}$/.test(m.lockToken ?? ""), `deferred lock token ${m.lockToken}`);
  check(m.lockedUntilUtc instanceof Date && m.lockedUntilUtc.getTime() > Date.now(), `deferred locked until ${m.lockedUntilUtc}`);
  check(m.deliveryCount === deliveryCount, `deferred delivery count ${m.deliveryCount}, expected ${deliveryCount}`);
}

async function send(client, topic) {
  const sender = client.createSender(topic);
  // A single message, an explicit batch and an array (sent as one batch).
  await sender.sendMessages({ body: Buffer.from("a-1"), sessionId: "a", messageId: "a:1" });
  const batch = await sender.createMessageBatch();
  for (const i of [2, 3, 4]) {
    check(batch.tryAddMessage({ body: Buffer.from(`a-${i}`), sessionId: "a", messageId: `a:${i}` }), "batch has room");
  }
  await sender.sendMessages(batch);
  await sender.sendMessages([
    { body: Buffer.from("b-1"), sessionId: "b", messageId: "b:1" },
    { body: Buffer.from("b-2"), sessionId: "b", messageId: "b:2" },
  ]);
  // Same MessageId within the duplicate-detection window: accepted, not enqueued.
  await sender.sendMessages({ body: Buffer.from("a-1 again"), sessionId: "a", messageId: "a:1" });
  await sender.close();
}

async function sessionA(client, topic, sub) {
  const r = await client.acceptSession(topic, sub, "a");
  check(r.sessionId === "a", `granted session ${r.sessionId}`);
  check(r.sessionLockedUntilUtc.getTime() > Date.now(), `session locked until ${r.sessionLockedUntilUtc}`);

  const initial = await r.getSessionState();
  check(initial == null || initial.length === 0, `no session state yet: ${initial}`);
  await r.setSessionState(Buffer.from("state-1"));
  check(Buffer.from(await r.getSessionState()).toString() === "state-1", "session state round trip");
  const before = r.sessionLockedUntilUtc.getTime();
  const renewed = await r.renewSessionLock();
  check(renewed.getTime() >= before, "renewed session lock does not move back");

  const peeked = await r.peekMessages(10);
  check(same(texts(peeked), ["a-1", "a-2", "a-3", "a-4"]), `peek session a: ${texts(peeked)}`);

  const messages = await receive(r, 4);
  check(same(texts(messages), ["a-1", "a-2", "a-3", "a-4"]), `order in session a: ${texts(messages)}`);
  const seqs = messages.map(seq);
  check(same(seqs, [...seqs].sort((x, y) => x - y)) && new Set(seqs).size === 4, `sequence numbers ${seqs}`);
  check(same(seqs, peeked.map(seq)), "peek and receive agree on sequence numbers");
  for (const m of messages) {
    checkFresh(m);
    check(m.sessionId === "a", "session id on the message");
  }
  const [a1, a2, a3, a4] = messages;
  await r.completeMessage(a1);
  await r.completeMessage(a2);

  // Abandon: back ahead of later messages, delivery count + 1.
  await r.abandonMessage(a3);
  const [again] = await receive(r, 1);
  check(text(again) === "a-3", `abandoned message comes back, got ${text(again)}`);
  checkFresh(again, 1);
  await r.deadLetterMessage(again, { deadLetterReason: "session-reason", deadLetterErrorDescription: "a-3 is broken" });

  // Defer, then receive the deferred message by sequence number within the session.
  await r.deferMessage(a4);
  const [deferred] = await r.receiveDeferredMessages(a4.sequenceNumber);
  check(deferred && text(deferred) === "a-4" && deferred.sessionId === "a", "deferred a-4");
  check(deferred.deliveryCount === 0, `deferred delivery count ${deferred.deliveryCount}`);
  await r.completeMessage(deferred);

  // Only one a:1 was enqueued: nothing is left in the session.
  const rest = await peekAll(r);
  check(rest.length === 0, `duplicate dropped, got ${texts(rest)}`);
  check(Buffer.from(await r.getSessionState()).toString() === "state-1", "session state kept");
  await r.close();
}

async function nextAvailable(client, topic, sub) {
  const r = await client.acceptNextSession(topic, sub);
  check(r.sessionId === "b", `next available session is b, got ${r.sessionId}`);
  const messages = await receive(r, 2);
  check(same(texts(messages), ["b-1", "b-2"]), "order in session b");
  for (const m of messages) {
    checkFresh(m);
    await r.completeMessage(m);
  }
  await r.close();
}

async function deadLetterQueue(client, topic, sub) {
  const r = client.createReceiver(topic, sub, { subQueueType: "deadLetter" });
  const [m] = await receive(r, 1);
  check(text(m) === "a-3", "dead-lettered message");
  check(m.deadLetterReason === "session-reason", `reason ${m.deadLetterReason}`);
  check(m.deadLetterErrorDescription === "a-3 is broken", `description ${m.deadLetterErrorDescription}`);
  checkFresh(m, 1);
  await r.completeMessage(m);
  await r.close();
}

async function plain(client, topic, sub) {
  // The non-session subscription got its own copy of every message.
  const expected = ["a-1", "a-2", "a-3", "a-4", "b-1", "b-2"];
  const r = client.createReceiver(topic, sub);
  const peeked = await r.peekMessages(10);
  check(same(texts(peeked), expected), `peek ${texts(peeked)}`);
  check(peeked.every((m) => m.deliveryCount === 0), "peek does not count as delivery");

  const messages = await receive(r, 6);
  check(same(texts(messages), expected), `order on the plain subscription: ${texts(messages)}`);
  messages.forEach((m) => checkFresh(m));

  const first = messages[0];
  const before = first.lockedUntilUtc.getTime();
  const renewed = await r.renewMessageLock(first);
  check(renewed.getTime() >= before, `renewed message lock ${renewed} >= ${first.lockedUntilUtc}`);

  await r.abandonMessage(messages[1]);
  const [again] = await receive(r, 1);
  check(text(again) === "a-2", "abandoned message comes back first");
  checkFresh(again, 1);

  for (const m of [first, again, messages[2], messages[5]]) {
    await r.completeMessage(m);
  }
  await r.deadLetterMessage(messages[4], { deadLetterReason: "plain-reason", deadLetterErrorDescription: "b-1 parked" });

  // Defer; a deferred message only comes back by its sequence number, and abandoning it keeps
  // it deferred with delivery count + 1.
  const a4 = messages[3];
  await r.deferMessage(a4);
  check((await r.receiveMessages(1, { maxWaitTimeInMs: 200 })).length === 0, "deferred is set aside");
  let [deferred] = await r.receiveDeferredMessages(a4.sequenceNumber);
  check(deferred && text(deferred) === "a-4", "deferred message by sequence number");
  check(seq(deferred) === seq(a4), "same sequence number");
  checkDeferred(deferred, 0);
  await r.abandonMessage(deferred);
  [deferred] = await r.receiveDeferredMessages(a4.sequenceNumber);
  checkDeferred(deferred, 1);
  await r.completeMessage(deferred);
  let error;
  try {
    await r.receiveDeferredMessages(a4.sequenceNumber);
  } catch (e) {
    error = e;
  }
  check(error && isServiceBusError(error) && error.code === "MessageNotFound", `a completed deferred message is gone, got ${error}`);
  // Peek lists deferred messages too: nothing is left.
  check((await peekAll(r)).length === 0, "plain is drained");
  await r.close();
}

async function lockLost(client, queue) {
  // Settling after the broker took the lock back fails with MessageLockLost.
  const sender = client.createSender(queue);
  await sender.sendMessages({ body: Buffer.from("q-1"), messageId: "q:1" });
  await sender.close();
  // Without the SDK's automatic lock renewal, which would keep the lock.
  const r = client.createReceiver(queue, { maxAutoLockRenewalDurationInMs: 0 });
  const [stale] = await receive(r, 1);
  checkFresh(stale);
  // The lock runs out and the message comes back to this same receiver.
  const [again] = await receive(r, 1);
  check(text(again) === "q-1", "the message comes back once its lock expired");
  checkFresh(again, 1);
  check(again.lockToken !== stale.lockToken, "a new delivery has a new lock token");
  let error;
  try {
    await r.completeMessage(stale);
  } catch (e) {
    error = e;
  }
  check(
    error && isServiceBusError(error) && error.code === "MessageLockLost",
    `completing under an expired lock must fail with MessageLockLost, got ${error}`,
  );
  await r.completeMessage(again);
  check((await peekAll(r)).length === 0, "queue is drained");
  await r.close();
}

const [connection, topic, sessionSub, plainSub, queue] = process.argv.slice(2);
const client = new ServiceBusClient(connection);
try {
  await send(client, topic);
  await sessionA(client, topic, sessionSub);
  await nextAvailable(client, topic, sessionSub);
  await deadLetterQueue(client, topic, sessionSub);
  await plain(client, topic, plainSub);
  await lockLost(client, queue);
} finally {
  await client.close();
}
console.log("js sdk: all checks passed");
