"""Push subscriptions with the official google-cloud-pubsub client.

A tiny http.server in the test is the push endpoint: it records each POST and
answers 200. pubrun delivers Google's wrapped JSON envelope to it; switching
the subscription to pull with modify_push_config makes Pull work again.
"""

from __future__ import annotations

import base64
import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from google.api_core import exceptions as gexc

from helpers import RPC_TIMEOUT

WAIT_S = 30


@pytest.fixture
def endpoint():
    """(url, queue of (path, headers, parsed JSON body)) of a local receiver."""
    received: queue.Queue = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            received.put((self.path, {k.lower(): v for k, v in self.headers.items()}, json.loads(body)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/push", received
    finally:
        server.shutdown()
        server.server_close()


def test_push_envelope_then_switch_to_pull(publisher, subscriber, project, endpoint):
    url, received = endpoint
    topic = publisher.topic_path(project, "push-topic")
    publisher.create_topic(request={"name": topic}, timeout=RPC_TIMEOUT)
    sub = subscriber.subscription_path(project, "push-sub")
    created = subscriber.create_subscription(
        request={"name": sub, "topic": topic, "push_config": {"push_endpoint": url}},
        timeout=RPC_TIMEOUT,
    )
    assert created.push_config.push_endpoint == url

    mid = publisher.publish(topic, b"hello push", color="red").result(timeout=WAIT_S)
    path, headers, body = received.get(timeout=WAIT_S)
    assert path == "/push"
    assert headers.get("content-type") == "application/json"
    assert body["subscription"] == sub
    msg = body["message"]
    assert base64.b64decode(msg["data"]) == b"hello push"
    assert msg["attributes"] == {"color": "red"}
    assert msg["messageId"] == msg["message_id"] == mid
    assert msg["publishTime"] == msg["publish_time"]
    assert msg["publishTime"].endswith("Z")
    assert "deliveryAttempt" not in body  # no dead-letter policy

    # Pulling a push subscription is refused, as by Google.
    with pytest.raises(gexc.FailedPrecondition):
        subscriber.pull(request={"subscription": sub, "max_messages": 1}, timeout=RPC_TIMEOUT)

    # An empty PushConfig switches it to pull; the next message is pulled, not pushed.
    subscriber.modify_push_config(request={"subscription": sub, "push_config": {}}, timeout=RPC_TIMEOUT)
    got = subscriber.get_subscription(request={"subscription": sub}, timeout=RPC_TIMEOUT)
    assert got.push_config.push_endpoint == ""
    publisher.publish(topic, b"pulled").result(timeout=WAIT_S)
    resp = subscriber.pull(request={"subscription": sub, "max_messages": 10}, timeout=RPC_TIMEOUT)
    assert [m.message.data for m in resp.received_messages] == [b"pulled"]
    subscriber.acknowledge(
        request={"subscription": sub, "ack_ids": [m.ack_id for m in resp.received_messages]},
        timeout=RPC_TIMEOUT,
    )
    assert received.empty()


def test_authenticated_push_is_refused_by_name(publisher, subscriber, project):
    topic = publisher.topic_path(project, "push-topic")
    publisher.create_topic(request={"name": topic}, timeout=RPC_TIMEOUT)
    with pytest.raises(gexc.InvalidArgument, match="oidc_token"):
        subscriber.create_subscription(
            request={
                "name": subscriber.subscription_path(project, "oidc-sub"),
                "topic": topic,
                "push_config": {
                    "push_endpoint": "http://127.0.0.1:9/push",
                    "oidc_token": {"service_account_email": "sa@example.com"},
                },
            },
            timeout=RPC_TIMEOUT,
        )
