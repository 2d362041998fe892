"""Checks with Microsoft's Python SDK that a link whose token expires unrenewed is taken away.
Run by tests/microsoft_sdks.rs against the entities tests/azure_rules/ uses (RULES_CONFIG in
tests/common/mod.rs):

    python python_tokens.py CONNECTION_STRING

The client is given a connection string with a fixed SharedAccessSignature that expires in a
few seconds, so it cannot renew. Its receiver works until then; afterwards receiving fails
(the broker detached the link, and a new link's put-token is refused as expired) and a message
sent after the expiry stays on the subscription. The Rust test checks that the emulator counted the
detach. Any failed check raises, so the exit status is non-zero.
"""

import base64
import hashlib
import hmac
import sys
import time
import urllib.parse

from azure.servicebus import ServiceBusClient, ServiceBusMessage
from azure.servicebus.exceptions import ServiceBusError

LIFETIME_S = 3
# After the expiry, how long the receiver gets to notice it lost its link.
NOTICE_S = 15


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def parts(connection_string):
    fields = dict(p.split("=", 1) for p in connection_string.split(";") if "=" in p)
    host = fields["Endpoint"].removeprefix("sb://").rstrip("/")
    return host, fields["SharedAccessKeyName"], fields["SharedAccessKey"]


def sas_token(resource, key_name, key, expires):
    """A SAS token the way the SDKs sign one."""
    sr = urllib.parse.quote_plus(resource)
    digest = hmac.new(key.encode(), f"{sr}\n{expires}".encode(), hashlib.sha256).digest()
    sig = urllib.parse.quote_plus(base64.b64encode(digest))
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={expires}&skn={key_name}"


def send(connection_string, message_id):
    with ServiceBusClient.from_connection_string(connection_string, retry_total=0) as client:
        with client.get_topic_sender("mixed") as sender:
            sender.send_messages(ServiceBusMessage(b"x", session_id="k", message_id=message_id))


def main():
    keyed = sys.argv[1]
    host, key_name, key = parts(keyed)
    expires = int(time.time()) + LIFETIME_S
    token = sas_token(f"sb://{host}/", key_name, key, expires)
    fixed = f"Endpoint=sb://{host};SharedAccessSignature={token};UseDevelopmentEmulator=true"
    with ServiceBusClient.from_connection_string(fixed, retry_total=0) as client:
        with client.get_subscription_receiver("mixed", "plain") as receiver:
            send(keyed, "py-exp:1")
            got = receiver.receive_messages(max_message_count=1, max_wait_time=5)
            check([m.message_id for m in got] == ["py-exp:1"], f"before the expiry, got {got}")
            receiver.complete_message(got[0])
            check(time.time() < expires, "the first receive took longer than the token lifetime")
            # Let the token lapse, then offer the receiver a message it must not get.
            time.sleep(max(0.0, expires - time.time()))
            send(keyed, "py-exp:2")
            failure = None
            deadline = expires + NOTICE_S
            while time.time() < deadline:
                try:
                    late = receiver.receive_messages(max_message_count=1, max_wait_time=1)
                except ServiceBusError as error:
                    failure = error
                    break
                check(not late, f"received {[m.message_id for m in late]} after the token expired")
            check(failure is not None, "the receiver kept its link after its token expired")
    print(f"python tokens: ok ({type(failure).__name__}: {failure})")


if __name__ == "__main__":
    main()
