"""Checks Microsoft's Python SDK over the emulator's AMQPS listener. Run by
tests/microsoft_sdks.rs against its CONFIG:

    python python_tls.py TLS_CONNECTION_STRING CA_FILE

The connection string is the Azure kind (no UseDevelopmentEmulator), so the SDK dials 5671 with
TLS. Trusting the test CA (connection_verify) it sends and receives "py-tls:1" on
ordo-events/plain; without it, the handshake fails and nothing is sent. Any failed check
raises, so the exit status is non-zero.
"""

import sys

from azure.servicebus import ServiceBusClient, ServiceBusMessage
from azure.servicebus.exceptions import ServiceBusError


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def main():
    connection_string, ca_file = sys.argv[1], sys.argv[2]
    with ServiceBusClient.from_connection_string(
        connection_string, connection_verify=ca_file, retry_total=0
    ) as client:
        with client.get_topic_sender("ordo-events") as sender:
            sender.send_messages(ServiceBusMessage(b"over tls", message_id="py-tls:1"))
        with client.get_subscription_receiver("ordo-events", "plain") as receiver:
            got = receiver.receive_messages(max_message_count=1, max_wait_time=5)
            check([m.message_id for m in got] == ["py-tls:1"], f"over TLS, got {got}")
            receiver.complete_message(got[0])
    with ServiceBusClient.from_connection_string(connection_string, retry_total=0) as untrusting:
        try:
            with untrusting.get_topic_sender("ordo-events") as sender:
                sender.send_messages(ServiceBusMessage(b"untrusted", message_id="py-tls:2"))
        except ServiceBusError as error:
            print(f"python tls: ok (without the CA: {type(error).__name__}: {error})")
            return
    raise AssertionError("a client that does not trust the CA sent over TLS")


if __name__ == "__main__":
    main()
