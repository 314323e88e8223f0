"""pubrun's Pub/Sub v1 REST/JSON mapping (`/v1/...`), on the same port as gRPC.

Shapes follow https://cloud.google.com/pubsub/docs/reference/rest: camelCase
JSON, bytes as base64, errors as {"error": {"code", "message", "status"}}.
"""

from __future__ import annotations

import base64
import datetime as dt
import time

import pytest
import requests

TIMEOUT = 30


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Rest:
    def __init__(self, base_url: str, project: str):
        self.base = base_url
        self.project = project
        self.session = requests.Session()

    def topic(self, tid: str) -> str:
        return f"projects/{self.project}/topics/{tid}"

    def sub(self, sid: str) -> str:
        return f"projects/{self.project}/subscriptions/{sid}"

    def call(self, method: str, path: str, body=None) -> requests.Response:
        kwargs = {"timeout": TIMEOUT}
        if body is not None:
            kwargs["json"] = body
        return self.session.request(method, f"{self.base}/v1/{path}", **kwargs)

    def ok(self, method: str, path: str, body=None) -> dict:
        r = self.call(method, path, body)
        assert r.status_code == 200, f"{method} /v1/{path} -> {r.status_code} {r.text[:500]}"
        assert r.headers.get("content-type", "").startswith("application/json"), r.headers
        return r.json()

    def pull_until(self, sub: str, count: int, timeout: float = 30.0) -> list:
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            resp = self.ok("POST", f"{sub}:pull", {"maxMessages": 10})
            got.extend(resp.get("receivedMessages", []))
        return got

    def pull_now(self, sub: str) -> list:
        start = time.monotonic()
        resp = self.ok("POST", f"{sub}:pull", {"maxMessages": 10, "returnImmediately": True})
        assert time.monotonic() - start < 10
        return resp.get("receivedMessages", [])


def assert_error(r: requests.Response, code: int, status: str):
    assert r.status_code == code, f"expected {code} {status}, got {r.status_code}: {r.text[:500]}"
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert err["code"] == code, body
    assert err["status"] == status, body
    assert isinstance(err["message"], str) and err["message"], body


@pytest.fixture
def rest(base_url, project):
    r = Rest(base_url, project)
    yield r
    r.session.close()


def test_healthz(base_url):
    r = requests.get(f"{base_url}/healthz", timeout=TIMEOUT)
    assert r.status_code == 200


def test_rest_topic_lifecycle(rest):
    name = rest.topic("orders")
    created = rest.ok("PUT", name, {"labels": {"team": "data"}})
    assert created["name"] == name
    assert created.get("labels") == {"team": "data"}

    assert_error(rest.call("PUT", name, {}), 409, "ALREADY_EXISTS")

    assert rest.ok("GET", name)["name"] == name
    listed = rest.ok("GET", f"projects/{rest.project}/topics")
    assert [t["name"] for t in listed["topics"]] == [name]

    assert rest.ok("DELETE", name) == {}
    assert_error(rest.call("GET", name), 404, "NOT_FOUND")
    assert_error(rest.call("DELETE", name), 404, "NOT_FOUND")
    assert rest.ok("GET", f"projects/{rest.project}/topics").get("topics", []) == []


def test_rest_topic_create_without_body(rest):
    name = rest.topic("nobody")
    r = rest.session.put(f"{rest.base}/v1/{name}", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["name"] == name


def test_rest_list_topics_paging(rest):
    names = {rest.ok("PUT", rest.topic(f"p-{i}"), {})["name"] for i in range(7)}
    seen, token, pages = [], None, 0
    while True:
        pages += 1
        assert pages < 10
        q = "pageSize=3" + (f"&pageToken={token}" if token else "")
        resp = rest.ok("GET", f"projects/{rest.project}/topics?{q}")
        assert len(resp.get("topics", [])) <= 3
        seen.extend(t["name"] for t in resp.get("topics", []))
        token = resp.get("nextPageToken")
        if not token:
            break
    assert sorted(seen) == sorted(names)
    assert pages == 3


def test_rest_update_topic_labels(rest):
    name = rest.topic("labelled")
    rest.ok("PUT", name, {"labels": {"a": "1"}})
    updated = rest.ok("PATCH", name, {"topic": {"labels": {"env": "test"}}, "updateMask": "labels"})
    assert updated["labels"] == {"env": "test"}
    assert rest.ok("GET", name)["labels"] == {"env": "test"}


def test_rest_publish_pull_modack_ack(rest):
    topic = rest.topic("jobs")
    sub = rest.sub("workers")
    rest.ok("PUT", topic, {})
    created = rest.ok("PUT", sub, {"topic": topic, "ackDeadlineSeconds": 30})
    assert created["name"] == sub
    assert created["topic"] == topic
    assert created["ackDeadlineSeconds"] == 30

    sent = [(b"hello", {"k": "v"}), (b"\x00\x01binary\xff", {"n": "2"})]
    resp = rest.ok("POST", f"{topic}:publish", {"messages": [{"data": b64(d), "attributes": a} for d, a in sent]})
    ids = resp["messageIds"]
    assert len(ids) == 2 and len(set(ids)) == 2 and all(isinstance(i, str) and i for i in ids)

    received = rest.pull_until(sub, 2)
    assert len(received) == 2
    by_id = {}
    for rm in received:
        assert rm["ackId"]
        msg = rm["message"]
        by_id[msg["messageId"]] = rm
        data = base64.b64decode(msg["data"])
        assert (data, msg.get("attributes", {})) in sent
        published = dt.datetime.fromisoformat(msg["publishTime"].replace("Z", "+00:00"))
        assert abs((dt.datetime.now(dt.timezone.utc) - published).total_seconds()) < 120
    assert set(by_id) == set(ids)
    assert rest.pull_now(sub) == []

    # modifyAckDeadline to 0 hands the message out again right away.
    first = by_id[ids[0]]
    assert rest.ok("POST", f"{sub}:modifyAckDeadline", {"ackIds": [first["ackId"]], "ackDeadlineSeconds": 0}) == {}
    again = rest.pull_until(sub, 1, timeout=10)
    assert [rm["message"]["messageId"] for rm in again] == [ids[0]]

    ack_ids = [again[0]["ackId"], by_id[ids[1]]["ackId"]]
    assert rest.ok("POST", f"{sub}:acknowledge", {"ackIds": ack_ids}) == {}
    assert rest.pull_now(sub) == []

    got = rest.ok("GET", sub)
    assert (got["name"], got["topic"], got["ackDeadlineSeconds"]) == (sub, topic, 30)
    assert [s["name"] for s in rest.ok("GET", f"projects/{rest.project}/subscriptions")["subscriptions"]] == [sub]
    assert rest.ok("GET", f"{topic}/subscriptions")["subscriptions"] == [sub]

    assert rest.ok("DELETE", sub) == {}
    assert_error(rest.call("GET", sub), 404, "NOT_FOUND")
    assert_error(rest.call("POST", f"{sub}:pull", {"maxMessages": 1}), 404, "NOT_FOUND")


def test_rest_update_subscription(rest):
    topic, sub = rest.topic("topic1"), rest.sub("sub1")
    rest.ok("PUT", topic, {})
    rest.ok("PUT", sub, {"topic": topic})
    assert rest.ok("GET", sub)["ackDeadlineSeconds"] == 10
    updated = rest.ok("PATCH", sub, {"subscription": {"ackDeadlineSeconds": 45}, "updateMask": "ackDeadlineSeconds"})
    assert updated["ackDeadlineSeconds"] == 45
    assert rest.ok("GET", sub)["ackDeadlineSeconds"] == 45


def test_rest_errors(rest):
    topic = rest.topic("exists")
    rest.ok("PUT", topic, {})
    assert_error(rest.call("GET", rest.topic("missing")), 404, "NOT_FOUND")
    assert_error(rest.call("PUT", rest.topic("1abc"), {}), 400, "INVALID_ARGUMENT")
    assert_error(rest.call("PUT", rest.topic("goog-x"), {}), 400, "INVALID_ARGUMENT")
    assert_error(rest.call("PUT", rest.topic("ab"), {}), 400, "INVALID_ARGUMENT")
    assert_error(rest.call("PUT", rest.sub("orphan"), {"topic": rest.topic("missing")}), 404, "NOT_FOUND")
    assert_error(rest.call("PUT", rest.sub("quick"), {"topic": topic, "ackDeadlineSeconds": 5}), 400, "INVALID_ARGUMENT")
    assert_error(rest.call("PUT", rest.sub("slow"), {"topic": topic, "ackDeadlineSeconds": 601}), 400, "INVALID_ARGUMENT")
    assert_error(
        rest.call("POST", f"{rest.topic('missing')}:publish", {"messages": [{"data": b64(b"x")}]}), 404, "NOT_FOUND"
    )
    assert_error(rest.call("POST", f"{topic}:publish", {"messages": [{}]}), 400, "INVALID_ARGUMENT")
    assert_error(rest.call("POST", f"{topic}:publish", {"messages": [{"data": "%%% not base64 %%%"}]}), 400, "INVALID_ARGUMENT")
    r = rest.session.post(
        f"{rest.base}/v1/{topic}:publish", data=b"{not json", headers={"content-type": "application/json"}, timeout=TIMEOUT
    )
    assert_error(r, 400, "INVALID_ARGUMENT")


def test_rest_and_grpc_interoperate(rest, publisher, subscriber):
    topic, sub = rest.topic("mixed"), rest.sub("mixed")
    rest.ok("PUT", topic, {})
    rest.ok("PUT", sub, {"topic": topic})

    # REST publish -> gRPC pull.
    [rid] = rest.ok("POST", f"{topic}:publish", {"messages": [{"data": b64(b"via rest"), "attributes": {"from": "rest"}}]})["messageIds"]
    resp = subscriber.pull(request={"subscription": sub, "max_messages": 10}, timeout=30)
    [rm] = resp.received_messages
    assert (rm.message.message_id, rm.message.data, dict(rm.message.attributes)) == (rid, b"via rest", {"from": "rest"})
    subscriber.acknowledge(request={"subscription": sub, "ack_ids": [rm.ack_id]}, timeout=30)

    # gRPC publish -> REST pull.
    gid = publisher.publish(topic, b"via grpc", **{"from": "grpc"}).result(timeout=30)
    [got] = rest.pull_until(sub, 1)
    assert got["message"]["messageId"] == gid
    assert base64.b64decode(got["message"]["data"]) == b"via grpc"
    assert got["message"]["attributes"] == {"from": "grpc"}
    rest.ok("POST", f"{sub}:acknowledge", {"ackIds": [got["ackId"]]})
    assert rest.pull_now(sub) == []


def test_unknown_paths_are_404(base_url):
    """Plain HTTP requests to paths nobody serves get a 404, not a gRPC answer."""
    for path in ["/v1/projects/p/unknown", "/no-such-page", "/v2/projects/p/topics/abc"]:
        r = requests.get(f"{base_url}{path}", timeout=TIMEOUT)
        assert r.status_code == 404, f"GET {path} -> {r.status_code} {dict(r.headers)}"
        assert not r.headers.get("content-type", "").startswith("application/grpc"), f"GET {path} -> {dict(r.headers)}"
