"""Drives the emulator with Microsoft's Python SDK (azure-servicebus, its own pure-Python AMQP
stack) and asserts what Service Bus would answer. Run by tests/microsoft_sdks.rs:

    python python_sdk.py CONNECTION_STRING TOPIC SESSION_SUBSCRIPTION PLAIN_SUBSCRIPTION QUEUE

The topic must have duplicate detection on and be empty; SESSION_SUBSCRIPTION requires
sessions, PLAIN_SUBSCRIPTION does not. QUEUE is an empty queue without sessions whose lock
duration is short (about a second). Leaves exactly one message behind, in the dead-letter
queue of PLAIN_SUBSCRIPTION (message id "b:1", reason "plain-reason"); the Rust test checks it.
Any failed check raises, so the exit status is non-zero.
"""

import datetime
import sys
import uuid

from azure.servicebus import (
    NEXT_AVAILABLE_SESSION,
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusSubQueue,
)
from azure.servicebus.exceptions import MessageLockLostError

WAIT = 5  # seconds a receive waits for messages that must be there


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def body(message):
    return b"".join(message.body)


def receive(receiver, n):
    """Exactly n messages (fails after a few empty receives)."""
    got = []
    for _ in range(5):
        if len(got) == n:
            break
        got.extend(receiver.receive_messages(max_message_count=n - len(got), max_wait_time=WAIT))
    check(len(got) == n, f"expected {n} messages, got {[body(m) for m in got]}")
    return got


def check_fresh(message, delivery_count=0):
    """Annotations of a peek-locked delivery, and the lock token the SDK took from the tag."""
    now = datetime.datetime.now(datetime.timezone.utc)
    check(message.sequence_number is not None and message.sequence_number > 0, "sequence number")
    check(message.enqueued_time_utc is not None, "enqueued time")
    locked_until = (message.raw_amqp_message.annotations or {}).get(b"x-opt-locked-until")
    check(
        isinstance(locked_until, int) and locked_until > now.timestamp() * 1000,
        f"x-opt-locked-until {locked_until!r} is a future timestamp",
    )
    if message.session_id is None:
        # For session messages the SDK reports the session's lock instead (None here).
        check(message.locked_until_utc > now, f"locked until {message.locked_until_utc}")
    check(
        message.delivery_count == delivery_count,
        f"{body(message)}: delivery count {message.delivery_count}, expected {delivery_count}",
    )
    # The SDK reads the lock token from the 16-byte delivery tag (.NET Guid byte order); the
    # x-opt-lock-token delivery annotation must name the same GUID.
    annotations = message.raw_amqp_message.delivery_annotations or {}
    annotated = annotations.get(b"x-opt-lock-token")
    check(isinstance(message.lock_token, uuid.UUID), f"lock token {message.lock_token!r}")
    check(
        str(annotated) == str(message.lock_token),
        f"delivery tag lock token {message.lock_token} != x-opt-lock-token {annotated}",
    )


def check_deferred(message, delivery_count):
    """A deferred message received by sequence number: locked, with its own lock token."""
    now = datetime.datetime.now(datetime.timezone.utc)
    check(isinstance(message.lock_token, uuid.UUID), f"deferred lock token {message.lock_token!r}")
    check(message.locked_until_utc > now, f"deferred locked until {message.locked_until_utc}")
    check(
        message.delivery_count == delivery_count,
        f"deferred delivery count {message.delivery_count}, expected {delivery_count}",
    )


def main():
    connection, topic, session_sub, plain_sub, queue = sys.argv[1:6]
    with ServiceBusClient.from_connection_string(connection) as client:
        send(client, topic)
        session_a(client, topic, session_sub)
        next_available(client, topic, session_sub)
        dead_letter_queue(client, topic, session_sub)
        plain(client, topic, plain_sub)
        lock_lost(client, queue)
    print("python sdk: all checks passed")


def send(client, topic):
    with client.get_topic_sender(topic) as sender:
        # A single message, an explicit batch and a list (sent as one batch).
        sender.send_messages(ServiceBusMessage(b"a-1", session_id="a", message_id="a:1"))
        batch = sender.create_message_batch()
        for i in (2, 3, 4):
            batch.add_message(
                ServiceBusMessage(f"a-{i}".encode(), session_id="a", message_id=f"a:{i}")
            )
        sender.send_messages(batch)
        sender.send_messages(
            [
                ServiceBusMessage(b"b-1", session_id="b", message_id="b:1"),
                ServiceBusMessage(b"b-2", session_id="b", message_id="b:2"),
            ]
        )
        # Same MessageId within the duplicate-detection window: accepted, not enqueued.
        sender.send_messages(ServiceBusMessage(b"a-1 again", session_id="a", message_id="a:1"))


def session_a(client, topic, sub):
    with client.get_subscription_receiver(topic, sub, session_id="a", max_wait_time=WAIT) as r:
        session = r.session
        check(session.session_id == "a", f"granted session {session.session_id}")
        now = datetime.datetime.now(datetime.timezone.utc)
        check(session.locked_until_utc > now, f"session locked until {session.locked_until_utc}")

        check(session.get_state() in (None, b""), "no session state yet")
        session.set_state(b"state-1")
        check(session.get_state() == b"state-1", "session state round trip")
        before = session.locked_until_utc
        session.renew_lock()
        check(session.locked_until_utc >= before, "renewed session lock does not move back")

        peeked = r.peek_messages(max_message_count=10)
        check([body(m) for m in peeked] == [b"a-1", b"a-2", b"a-3", b"a-4"], "peek session a")

        messages = receive(r, 4)
        check([body(m) for m in messages] == [b"a-1", b"a-2", b"a-3", b"a-4"], "order in session a")
        seqs = [m.sequence_number for m in messages]
        check(seqs == sorted(seqs) and len(set(seqs)) == 4, f"sequence numbers {seqs}")
        check(seqs == [m.sequence_number for m in peeked], "peek and receive agree on sequence numbers")
        for m in messages:
            check_fresh(m)
            check(m.session_id == "a", "session id on the message")
        a1, a2, a3, a4 = messages
        r.complete_message(a1)
        r.complete_message(a2)

        # Abandon: back ahead of later messages, delivery count + 1.
        r.abandon_message(a3)
        (again,) = receive(r, 1)
        check(body(again) == b"a-3", f"abandoned message comes back, got {body(again)}")
        check_fresh(again, delivery_count=1)
        r.dead_letter_message(again, reason="session-reason", error_description="a-3 is broken")

        # Defer, then receive the deferred message by sequence number within the session.
        r.defer_message(a4)
        (deferred,) = r.receive_deferred_messages([a4.sequence_number])
        check(body(deferred) == b"a-4" and deferred.session_id == "a", "deferred a-4")
        check(deferred.delivery_count == 0, f"deferred delivery count {deferred.delivery_count}")
        r.complete_message(deferred)

        # Only one a:1 was enqueued: nothing is left in the session.
        rest = r.peek_messages(max_message_count=5, sequence_number=1)
        check(rest == [], f"duplicate dropped, got {[body(m) for m in rest]}")
        check(session.get_state() == b"state-1", "session state kept")


def next_available(client, topic, sub):
    with client.get_subscription_receiver(
        topic, sub, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=WAIT
    ) as r:
        check(r.session.session_id == "b", f"next available session is b, got {r.session.session_id}")
        messages = receive(r, 2)
        check([body(m) for m in messages] == [b"b-1", b"b-2"], "order in session b")
        for m in messages:
            check_fresh(m)
            r.complete_message(m)


def dead_letter_queue(client, topic, sub):
    with client.get_subscription_receiver(
        topic, sub, sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=WAIT
    ) as r:
        (m,) = receive(r, 1)
        check(body(m) == b"a-3", "dead-lettered message")
        check(m.dead_letter_reason == "session-reason", f"reason {m.dead_letter_reason}")
        check(
            m.dead_letter_error_description == "a-3 is broken",
            f"description {m.dead_letter_error_description}",
        )
        check_fresh(m, delivery_count=1)
        r.complete_message(m)


def plain(client, topic, sub):
    """The non-session subscription got its own copy of every message."""
    expected = [b"a-1", b"a-2", b"a-3", b"a-4", b"b-1", b"b-2"]
    with client.get_subscription_receiver(topic, sub, max_wait_time=WAIT) as r:
        peeked = r.peek_messages(max_message_count=10)
        check([body(m) for m in peeked] == expected, f"peek {[body(m) for m in peeked]}")
        check(all(m.delivery_count == 0 for m in peeked), "peek does not count as delivery")

        messages = receive(r, 6)
        check([body(m) for m in messages] == expected, "order on the plain subscription")
        for m in messages:
            check_fresh(m)

        first = messages[0]
        before = first.locked_until_utc
        renewed = r.renew_message_lock(first)
        check(renewed >= before, f"renewed message lock {renewed} >= {before}")
        check(first.locked_until_utc == renewed, "renewal updates the message")

        r.abandon_message(messages[1])
        (again,) = receive(r, 1)
        check(body(again) == b"a-2", "abandoned message comes back first")
        check_fresh(again, delivery_count=1)

        for m in [first, again, messages[2], messages[5]]:
            r.complete_message(m)
        r.dead_letter_message(messages[4], reason="plain-reason", error_description="b-1 parked")

        # Defer; a deferred message only comes back by its sequence number, and abandoning it
        # keeps it deferred with delivery count + 1.
        a4 = messages[3]
        r.defer_message(a4)
        check(r.receive_messages(max_message_count=1, max_wait_time=0.2) == [], "deferred is set aside")
        (deferred,) = r.receive_deferred_messages([a4.sequence_number])
        check(body(deferred) == b"a-4", "deferred message by sequence number")
        check(deferred.sequence_number == a4.sequence_number, "same sequence number")
        check_deferred(deferred, delivery_count=0)
        r.abandon_message(deferred)
        (deferred,) = r.receive_deferred_messages([a4.sequence_number])
        check_deferred(deferred, delivery_count=1)
        r.complete_message(deferred)
        # Peek lists deferred messages too: nothing is left.
        check(r.peek_messages(max_message_count=5, sequence_number=1) == [], "plain is drained")


def lock_lost(client, queue):
    """Settling after the broker took the lock back fails with MessageLockLostError."""
    with client.get_queue_sender(queue) as sender:
        sender.send_messages(ServiceBusMessage(b"q-1", message_id="q:1"))
    with client.get_queue_receiver(queue, max_wait_time=WAIT) as r:
        (stale,) = receive(r, 1)
        check_fresh(stale)
        # The lock runs out and the message comes back to this same receiver.
        (again,) = receive(r, 1)
        check(body(again) == b"q-1", "the message comes back once its lock expired")
        check_fresh(again, delivery_count=1)
        check(again.lock_token != stale.lock_token, "a new delivery has a new lock token")
        try:
            r.complete_message(stale)
        except MessageLockLostError:
            pass
        else:
            raise AssertionError("completing under an expired lock must fail")
        r.complete_message(again)
        check(r.peek_messages(max_message_count=5, sequence_number=1) == [], "queue is drained")


if __name__ == "__main__":
    main()
