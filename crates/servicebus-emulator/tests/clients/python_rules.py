"""Checks with Microsoft's Python SDK that the emulator refuses what Service Bus refuses. Run by
tests/microsoft_sdks.rs against the entities tests/azure_rules/ uses (RULES_CONFIG in
tests/common/mod.rs):

    python python_rules.py CONNECTION_STRING

Leaves two messages behind: "py-n:1" and "py-t:1", sent without SessionId and dead-lettered on
mixed/Subscriptions/s with reason "Session id is null."; the Rust test checks them. Any failed check raises, so the exit status is non-zero.
"""

import datetime
import sys
import time

from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSubQueue
from azure.servicebus.exceptions import ServiceBusAuthenticationError, ServiceBusError

WAIT = 5


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def refused(client, topic, messages, text):
    """Sends one transfer and checks the service's refusal names `text`."""
    with client.get_topic_sender(topic) as sender:
        try:
            sender.send_messages(messages)
        except ServiceBusError as error:
            check(text in str(error), f"refusal {error!r} does not contain {text!r}")
            return
    raise AssertionError(f"{topic}: a transfer that must be refused ({text}) was accepted")


def sent(client, topic, messages):
    with client.get_topic_sender(topic) as sender:
        sender.send_messages(messages)


def msg(session, message_id, body=b"x", **kwargs):
    return ServiceBusMessage(body, session_id=session, message_id=message_id, **kwargs)


def partitioned_batches(client):
    refused(
        client,
        "part-dedup",
        [msg("a", "py-a:1"), msg("a", "py-a:2")],
        "Batching brokered messages with distinct SessionId, PartitionKey, or MessageId is not "
        "supported for an entity with partitioning and duplicate detection enabled.",
    )
    sent(client, "part-dedup", msg("a", "py-a:1"))
    sent(client, "part-dedup", msg("a", "py-a:2"))
    refused(
        client,
        "part",
        [msg("a", "py-a:1"), msg("b", "py-b:1")],
        "Batching brokered messages with distinct SessionId or PartitionKey is not supported for "
        "an entity with partitioning enabled.",
    )
    sent(client, "part", [msg("a", "py-a:1"), msg("a", "py-a:2")])


def scheduled(client):
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    refused(
        client,
        "mixed",
        msg("a", "py-sched", scheduled_enqueue_time_utc=later),
        "Scheduled messages",
    )


def long_ids(client):
    message = msg("a", "py-long")
    # The SDK checks SessionId and PartitionKey lengths itself; the AMQP properties are where a
    # client that does not check puts a longer MessageId.
    message.raw_amqp_message.properties.message_id = "x" * 129
    refused(client, "mixed", message, "129 bytes")


def session_less(client):
    sent(client, "mixed", ServiceBusMessage(b"no session", message_id="py-n:1"))


def dead_letters_do_not_expire(client):
    with client.get_subscription_receiver("mixed", "plain") as receiver:
        # The session-less message of session_less() is here too; out of the way first.
        for m in receiver.receive_messages(max_message_count=1, max_wait_time=WAIT):
            receiver.complete_message(m)
        ttl = datetime.timedelta(seconds=2)
        sent_at = time.monotonic()
        sent(client, "mixed", ServiceBusMessage(b"short-lived", message_id="py-t:1", time_to_live=ttl))
        got = receiver.receive_messages(max_message_count=1, max_wait_time=WAIT)
        check([m.message_id for m in got] == ["py-t:1"], f"short-lived message, got {got}")
        receiver.dead_letter_message(got[0], reason="test")
    # Past the time-to-live (and a sweep of the entity): still in the dead-letter queue.
    time.sleep(max(0.0, ttl.total_seconds() + 0.5 - (time.monotonic() - sent_at)))
    with client.get_subscription_receiver(
        "mixed", "plain", sub_queue=ServiceBusSubQueue.DEAD_LETTER
    ) as dead:
        again = dead.receive_messages(max_message_count=1, max_wait_time=WAIT)
        check([m.message_id for m in again] == ["py-t:1"], f"dead letter kept, got {again}")
        dead.complete_message(again[0])


def session_close(client):
    sent(client, "mixed", [msg("c", "py-c:1", b"1"), msg("c", "py-c:2", b"2")])
    with client.get_subscription_receiver("mixed", "s", session_id="c") as receiver:
        got = receiver.receive_messages(max_message_count=2, max_wait_time=WAIT)
        check(len(got) == 2, f"two messages of session c, got {len(got)}")
    # Closed without settling: back in line, delivery count unchanged.
    with client.get_subscription_receiver("mixed", "s", session_id="c") as receiver:
        again = []
        for _ in range(5):
            if len(again) == 2:
                break
            again.extend(receiver.receive_messages(max_message_count=2, max_wait_time=WAIT))
        counts = [(b"".join(m.body), m.delivery_count) for m in again]
        check(counts == [(b"1", 0), (b"2", 0)], f"redelivered untouched, got {counts}")
        for m in again:
            receiver.complete_message(m)


def complete_then_close(client):
    """A completion sent right before the receiver closes still counts: nothing comes back."""
    sent(client, "mixed", msg("d", "py-d:1"))
    with client.get_subscription_receiver("mixed", "s", session_id="d") as receiver:
        got = receiver.receive_messages(max_message_count=1, max_wait_time=WAIT)
        check(len(got) == 1, f"one message of session d, got {len(got)}")
        receiver.complete_message(got[0])
    with client.get_subscription_receiver("mixed", "s", session_id="d") as receiver:
        again = receiver.receive_messages(max_message_count=1, max_wait_time=1)
        check(again == [], f"a completed message came back: {again}")


def bad_key(connection_string):
    """A token signed with the wrong key is answered 401 and nothing is sent."""
    parts = [p for p in connection_string.split(";") if not p.startswith("SharedAccessKey=")]
    wrong = ";".join(parts + ["SharedAccessKey=wrong"])
    with ServiceBusClient.from_connection_string(wrong, retry_total=0) as client:
        try:
            sent(client, "mixed", msg("a", "py-bad-key"))
        except ServiceBusAuthenticationError:
            # The SDK maps the 401 of put-token to this type and does not keep its text.
            return
    raise AssertionError("a token signed with the wrong key was accepted")


def main():
    connection_string = sys.argv[1]
    bad_key(connection_string)
    with ServiceBusClient.from_connection_string(connection_string, retry_total=0) as client:
        partitioned_batches(client)
        scheduled(client)
        long_ids(client)
        session_less(client)
        dead_letters_do_not_expire(client)
        session_close(client)
        complete_then_close(client)
    print("python rules: ok")


if __name__ == "__main__":
    main()
