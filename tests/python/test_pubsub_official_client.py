"""pubrun's Pub/Sub v1 gRPC API judged by Google's official Python client.

Covers what the Pub/Sub publisher and subscriber quickstarts do: topic and
subscription admin (with Google's error codes), batched publishing, synchronous
pull with ack / modifyAckDeadline / ack-deadline expiry, and streaming pull with
ack, nack and client flow control.
"""

from __future__ import annotations

import collections
import datetime as dt
import threading
import time

import pytest
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.publisher import exceptions as pub_exceptions
from google.cloud.pubsub_v1.types import FlowControl

from helpers import RPC_TIMEOUT, background_pull, make_sub, make_topic



# --- helpers ------------------------------------------------------------------


def publish_all(publisher, topic_path, payloads, timeout=60, **attrs):
    """Publish each payload (bytes, or (bytes, attrs)) and return their message ids."""
    futures = []
    for p in payloads:
        if isinstance(p, tuple):
            futures.append(publisher.publish(topic_path, p[0], **p[1]))
        else:
            futures.append(publisher.publish(topic_path, p, **attrs))
    return [f.result(timeout=timeout) for f in futures]


def pull_until(subscriber, sub_path, count, timeout=30.0, max_messages=None):
    """Synchronously pull until `count` messages arrived (or time runs out)."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            resp = subscriber.pull(
                request={"subscription": sub_path, "max_messages": max_messages or min(count - len(got), 1000)},
                timeout=max(1.0, min(remaining, 10.0)),
            )
        except gexc.DeadlineExceeded:
            continue
        got.extend(resp.received_messages)
    return got


def pull_now(subscriber, sub_path, max_messages=100):
    """One Pull with return_immediately=True: what is deliverable right now."""
    start = time.monotonic()
    resp = subscriber.pull(
        request={"subscription": sub_path, "max_messages": max_messages, "return_immediately": True},
        timeout=15,
    )
    elapsed = time.monotonic() - start
    assert elapsed < 10, f"Pull with return_immediately=True took {elapsed:.1f}s"
    return list(resp.received_messages)


def ack_all(subscriber, sub_path, received):
    ids = [m.ack_id for m in received]
    for i in range(0, len(ids), 250):
        subscriber.acknowledge(request={"subscription": sub_path, "ack_ids": ids[i : i + 250]}, timeout=RPC_TIMEOUT)


def wait_for(predicate, timeout, interval=0.05, future=None):
    """Wait until predicate() is true; fail fast if a streaming-pull future died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if future is not None and future.done():
            exc = future.exception(timeout=0)
            raise AssertionError(f"streaming pull ended early: {exc!r}")
        time.sleep(interval)
    return predicate()


def stop_streaming(future):
    future.cancel()
    try:
        future.result(timeout=30)
    except Exception:  # a cancelled stream may report CancelledError; that is fine
        pass


def assert_recent(ts):
    assert ts is not None
    now = dt.datetime.now(dt.timezone.utc)
    assert abs((now - ts).total_seconds()) < 120, f"publish_time {ts} is not close to now {now}"


# --- topics -------------------------------------------------------------------


def test_topic_create_get_delete(publisher, project):
    path = publisher.topic_path(project, "orders")
    created = publisher.create_topic(request={"name": path, "labels": {"team": "data"}}, timeout=RPC_TIMEOUT)
    assert created.name == path
    assert dict(created.labels) == {"team": "data"}

    got = publisher.get_topic(request={"topic": path}, timeout=RPC_TIMEOUT)
    assert got.name == path
    assert dict(got.labels) == {"team": "data"}

    publisher.delete_topic(request={"topic": path}, timeout=RPC_TIMEOUT)
    with pytest.raises(gexc.NotFound):
        publisher.get_topic(request={"topic": path}, timeout=RPC_TIMEOUT)
    with pytest.raises(gexc.NotFound):
        publisher.delete_topic(request={"topic": path}, timeout=RPC_TIMEOUT)
    # The id can be reused after deletion.
    assert publisher.create_topic(request={"name": path}, timeout=RPC_TIMEOUT).name == path


def test_create_existing_topic_is_already_exists(publisher, project):
    path = make_topic(publisher, project, "dup")
    with pytest.raises(gexc.AlreadyExists):
        publisher.create_topic(request={"name": path}, timeout=RPC_TIMEOUT)


def test_get_missing_topic_is_not_found(publisher, project):
    with pytest.raises(gexc.NotFound):
        publisher.get_topic(request={"topic": publisher.topic_path(project, "nope")}, timeout=RPC_TIMEOUT)


@pytest.mark.parametrize(
    "topic_id",
    ["1abc", "goog-x", "ab", "has space", "a" * 256, "bad*char", "googthing"],
    ids=["starts-with-digit", "goog-prefix", "too-short", "space", "too-long", "star", "goog-no-dash"],
)
def test_invalid_topic_ids_are_invalid_argument(publisher, project, topic_id):
    with pytest.raises(gexc.InvalidArgument) as ei:
        publisher.create_topic(request={"name": f"projects/{project}/topics/{topic_id}"}, timeout=RPC_TIMEOUT)
    assert ei.value.message, "INVALID_ARGUMENT should say what to fix"


def test_malformed_topic_name_is_invalid_argument(publisher, project):
    for name in [f"projects/{project}/topic/abc", "topics/abc", f"projects/{project}/topics/"]:
        with pytest.raises(gexc.InvalidArgument):
            publisher.create_topic(request={"name": name}, timeout=RPC_TIMEOUT)


def test_list_topics_with_paging(publisher, project):
    created = {make_topic(publisher, project, f"page-topic-{i}") for i in range(7)}
    # A topic in another project must not show up.
    make_topic(publisher, project + "-other", "page-topic-0")

    # The pager follows next_page_token; each page holds at most 3 topics.
    seen = []
    pages = 0
    pager = publisher.list_topics(request={"project": f"projects/{project}", "page_size": 3}, timeout=RPC_TIMEOUT)
    for page in pager.pages:
        pages += 1
        names = [t.name for t in page.topics]
        assert 0 < len(names) <= 3, f"page {pages} has {len(names)} topics"
        seen.extend(names)
    assert len(seen) == 7, seen
    assert set(seen) == created
    assert pages == 3

    # Without a page size all come back, exactly once.
    all_names = [t.name for t in publisher.list_topics(request={"project": f"projects/{project}"}, timeout=RPC_TIMEOUT)]
    assert sorted(all_names) == sorted(created)


def test_list_topics_raw_page_tokens(publisher, project):
    created = {make_topic(publisher, project, f"tok-{i}") for i in range(7)}
    from google.pubsub_v1 import PublisherClient as GapicPublisher

    raw = GapicPublisher()
    seen, token, calls = [], "", 0
    while True:
        calls += 1
        assert calls < 10, "paging does not terminate"
        # ListTopics through the transport directly: one RPC, one page.
        resp = raw._transport.list_topics(
            pubsub_v1.types.ListTopicsRequest(project=f"projects/{project}", page_size=3, page_token=token),
            timeout=RPC_TIMEOUT,
        )
        seen.extend(t.name for t in resp.topics)
        assert len(resp.topics) <= 3
        token = resp.next_page_token
        if not token:
            break
    raw.transport.close()
    assert sorted(seen) == sorted(created)
    assert calls == 3


def test_list_topics_in_empty_project(publisher, project):
    assert list(publisher.list_topics(request={"project": f"projects/{project}"}, timeout=RPC_TIMEOUT)) == []


def test_update_topic_labels(publisher, project):
    path = make_topic(publisher, project, "labelled", labels={"a": "1"})
    updated = publisher.update_topic(
        request={"topic": {"name": path, "labels": {"env": "test", "owner": "qa"}}, "update_mask": {"paths": ["labels"]}},
        timeout=RPC_TIMEOUT,
    )
    assert updated.name == path
    assert dict(updated.labels) == {"env": "test", "owner": "qa"}
    assert dict(publisher.get_topic(request={"topic": path}, timeout=RPC_TIMEOUT).labels) == {"env": "test", "owner": "qa"}


def test_update_topic_errors(publisher, project):
    path = make_topic(publisher, project, "upd")
    with pytest.raises(gexc.InvalidArgument):  # empty update mask
        publisher.update_topic(request={"topic": {"name": path, "labels": {"x": "y"}}, "update_mask": {"paths": []}}, timeout=RPC_TIMEOUT)
    with pytest.raises(gexc.NotFound):
        publisher.update_topic(
            request={"topic": {"name": publisher.topic_path(project, "missing"), "labels": {"x": "y"}}, "update_mask": {"paths": ["labels"]}},
            timeout=RPC_TIMEOUT,
        )


def test_list_topic_subscriptions(publisher, subscriber, project):
    topic = make_topic(publisher, project, "fanout")
    other = make_topic(publisher, project, "other")
    subs = {make_sub(subscriber, project, topic, f"fan-{i}") for i in range(3)}
    make_sub(subscriber, project, other, "not-mine")
    listed = list(publisher.list_topic_subscriptions(request={"topic": topic}, timeout=RPC_TIMEOUT))
    assert sorted(listed) == sorted(subs)
    with pytest.raises(gexc.NotFound):
        list(publisher.list_topic_subscriptions(request={"topic": publisher.topic_path(project, "missing")}, timeout=RPC_TIMEOUT))


# --- subscriptions ------------------------------------------------------------


def test_subscription_lifecycle(publisher, subscriber, project):
    topic = make_topic(publisher, project, "topic1")
    sub_path = subscriber.subscription_path(project, "sub1")
    created = subscriber.create_subscription(
        request={"name": sub_path, "topic": topic, "ack_deadline_seconds": 30}, timeout=RPC_TIMEOUT
    )
    assert created.name == sub_path
    assert created.topic == topic
    assert created.ack_deadline_seconds == 30

    got = subscriber.get_subscription(request={"subscription": sub_path}, timeout=RPC_TIMEOUT)
    assert (got.name, got.topic, got.ack_deadline_seconds) == (sub_path, topic, 30)

    updated = subscriber.update_subscription(
        request={
            "subscription": {"name": sub_path, "ack_deadline_seconds": 45},
            "update_mask": {"paths": ["ack_deadline_seconds"]},
        },
        timeout=RPC_TIMEOUT,
    )
    assert updated.ack_deadline_seconds == 45
    assert updated.topic == topic
    assert subscriber.get_subscription(request={"subscription": sub_path}, timeout=RPC_TIMEOUT).ack_deadline_seconds == 45

    listed = list(subscriber.list_subscriptions(request={"project": f"projects/{project}"}, timeout=RPC_TIMEOUT))
    assert [s.name for s in listed] == [sub_path]
    assert listed[0].topic == topic

    subscriber.delete_subscription(request={"subscription": sub_path}, timeout=RPC_TIMEOUT)
    with pytest.raises(gexc.NotFound):
        subscriber.get_subscription(request={"subscription": sub_path}, timeout=RPC_TIMEOUT)
    with pytest.raises(gexc.NotFound):
        subscriber.delete_subscription(request={"subscription": sub_path}, timeout=RPC_TIMEOUT)
    assert list(subscriber.list_subscriptions(request={"project": f"projects/{project}"}, timeout=RPC_TIMEOUT)) == []
    assert list(publisher.list_topic_subscriptions(request={"topic": topic}, timeout=RPC_TIMEOUT)) == []


def test_subscription_default_ack_deadline_is_10s(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic)
    assert subscriber.get_subscription(request={"subscription": sub}, timeout=RPC_TIMEOUT).ack_deadline_seconds == 10


def test_list_subscriptions_with_paging(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    subs = {make_sub(subscriber, project, topic, f"s-{i}") for i in range(5)}
    pager = subscriber.list_subscriptions(request={"project": f"projects/{project}", "page_size": 2}, timeout=RPC_TIMEOUT)
    seen = []
    for page in pager.pages:
        assert 0 < len(page.subscriptions) <= 2
        seen.extend(s.name for s in page.subscriptions)
    assert sorted(seen) == sorted(subs)


def test_create_existing_subscription_is_already_exists(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic)
    with pytest.raises(gexc.AlreadyExists):
        subscriber.create_subscription(request={"name": sub, "topic": topic}, timeout=RPC_TIMEOUT)


def test_subscription_to_missing_topic_is_not_found(subscriber, project):
    with pytest.raises(gexc.NotFound):
        subscriber.create_subscription(
            request={"name": subscriber.subscription_path(project, "orphan"), "topic": f"projects/{project}/topics/missing"},
            timeout=RPC_TIMEOUT,
        )


def test_get_missing_subscription_is_not_found(subscriber, project):
    with pytest.raises(gexc.NotFound):
        subscriber.get_subscription(request={"subscription": subscriber.subscription_path(project, "missing")}, timeout=RPC_TIMEOUT)


@pytest.mark.parametrize("deadline", [5, 601, -1])
def test_ack_deadline_out_of_range_is_invalid_argument(publisher, subscriber, project, deadline):
    topic = make_topic(publisher, project)
    with pytest.raises(gexc.InvalidArgument):
        subscriber.create_subscription(
            request={"name": subscriber.subscription_path(project, "sub1"), "topic": topic, "ack_deadline_seconds": deadline},
            timeout=RPC_TIMEOUT,
        )
    # Also on update.
    sub = make_sub(subscriber, project, topic, "okay")
    with pytest.raises(gexc.InvalidArgument):
        subscriber.update_subscription(
            request={"subscription": {"name": sub, "ack_deadline_seconds": deadline}, "update_mask": {"paths": ["ack_deadline_seconds"]}},
            timeout=RPC_TIMEOUT,
        )


@pytest.mark.parametrize("sub_id", ["1abc", "goog-x", "ab"])
def test_invalid_subscription_ids_are_invalid_argument(publisher, subscriber, project, sub_id):
    topic = make_topic(publisher, project)
    with pytest.raises(gexc.InvalidArgument):
        subscriber.create_subscription(
            request={"name": f"projects/{project}/subscriptions/{sub_id}", "topic": topic}, timeout=RPC_TIMEOUT
        )


def test_deleting_topic_detaches_subscriptions(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic)
    publisher.delete_topic(request={"topic": topic}, timeout=RPC_TIMEOUT)
    got = subscriber.get_subscription(request={"subscription": sub}, timeout=RPC_TIMEOUT)
    assert got.topic == "_deleted-topic_"


# --- publishing ---------------------------------------------------------------


def test_publish_1000_messages_with_attributes(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic, ack_deadline_seconds=60)
    payloads = [(f"message {i}".encode(), {"index": str(i), "kind": "bulk"}) for i in range(1000)]
    ids = publish_all(publisher, topic, payloads)
    assert len(ids) == 1000
    assert all(isinstance(i, str) and i for i in ids)
    assert len(set(ids)) == 1000, "message ids must be distinct"

    received = pull_until(subscriber, sub, 1000, timeout=60)
    by_index = {}
    for rm in received:
        attrs = dict(rm.message.attributes)
        assert attrs["kind"] == "bulk"
        i = int(attrs["index"])
        assert i not in by_index, f"message {i} delivered twice"
        by_index[i] = rm
        assert rm.message.data == f"message {i}".encode()
        assert rm.message.message_id == ids[i]
    assert len(by_index) == 1000
    ack_all(subscriber, sub, received)
    assert pull_now(subscriber, sub) == []


def test_publish_to_missing_topic_is_not_found(publisher, project):
    future = publisher.publish(publisher.topic_path(project, "missing"), b"hello")
    with pytest.raises(gexc.NotFound):
        future.result(timeout=60)


def test_publish_empty_message_is_invalid_argument(publisher, project):
    topic = make_topic(publisher, project)
    future = publisher.publish(topic, b"")
    with pytest.raises(gexc.InvalidArgument):
        future.result(timeout=60)
    # Empty data with an attribute is fine.
    assert publisher.publish(topic, b"", only="attrs").result(timeout=60)


def test_oversized_message_rejected_by_client(publisher, project):
    topic = make_topic(publisher, project)
    with pytest.raises(pub_exceptions.MessageTooLargeError):
        publisher.publish(topic, b"x" * (10 * 1024 * 1024 + 1))


def test_oversized_message_rejected_by_server(publisher, project):
    """The server itself rejects a >10 MB message (sent without client-side checks)."""
    from google.pubsub_v1 import PublisherClient as GapicPublisher

    topic = make_topic(publisher, project)
    raw = GapicPublisher()
    try:
        with pytest.raises(gexc.InvalidArgument):
            raw.publish(
                request={"topic": topic, "messages": [{"data": b"x" * (10 * 1024 * 1024 + 1)}]},
                retry=None,
                timeout=60,
            )
        with pytest.raises(gexc.InvalidArgument):  # no data, no attributes
            raw.publish(request={"topic": topic, "messages": [{"data": b""}]}, retry=None, timeout=60)
        with pytest.raises(gexc.InvalidArgument):  # no messages at all
            raw.publish(request={"topic": topic, "messages": []}, retry=None, timeout=60)
    finally:
        raw.transport.close()


def test_large_message_round_trip(publisher, subscriber, project, base_url):
    """A 6 MB message (above gRPC's 4 MB default limit, below Pub/Sub's 10 MB) is accepted."""
    import base64

    import requests

    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic)
    data = bytes(range(256)) * (6 * 1024 * 1024 // 256)
    message_id = publisher.publish(topic, data, size="6MB").result(timeout=60)
    assert message_id
    # The Python client's emulator channel accepts only 4 MB responses, so
    # fetch the message over the REST mapping instead.
    deadline = time.monotonic() + 30
    received = []
    while not received and time.monotonic() < deadline:
        r = requests.post(f"{base_url}/v1/{sub}:pull", json={"maxMessages": 1}, timeout=30)
        assert r.status_code == 200, r.text[:500]
        received = r.json().get("receivedMessages", [])
    assert len(received) == 1
    msg = received[0]["message"]
    assert msg["messageId"] == message_id
    assert msg["attributes"] == {"size": "6MB"}
    assert base64.b64decode(msg["data"]) == data


def test_publish_with_many_attributes(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic)
    attrs = {f"key{i}": f"value-{i}-" + "v" * 50 for i in range(50)}
    mid = publisher.publish(topic, b"attrs", **attrs).result(timeout=60)
    [rm] = pull_until(subscriber, sub, 1)
    assert rm.message.message_id == mid
    assert dict(rm.message.attributes) == attrs


# --- synchronous pull ---------------------------------------------------------


def test_pull_ack(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic, ack_deadline_seconds=30)
    sent = {
        b"first": {"n": "1", "color": "red"},
        b"second": {"n": "2"},
        b"\x00\xffbinary\n": {"n": "3", "binary": "yes"},
    }
    ids = dict(zip(sent, publish_all(publisher, topic, list(sent.items()))))

    received = pull_until(subscriber, sub, 3, max_messages=10)
    assert len(received) == 3
    for rm in received:
        msg = rm.message
        assert rm.ack_id
        assert msg.data in sent
        assert dict(msg.attributes) == sent[msg.data]
        assert msg.message_id == ids[msg.data]
        assert_recent(msg.publish_time)
    assert len({rm.ack_id for rm in received}) == 3

    # Leased: not delivered again while the deadline runs.
    assert pull_now(subscriber, sub) == []

    ack_all(subscriber, sub, received)
    assert pull_now(subscriber, sub) == []
    # Acking again (already acked ids) is harmless.
    ack_all(subscriber, sub, received)


def test_pull_respects_max_messages(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic, ack_deadline_seconds=60)
    publish_all(publisher, topic, [f"m{i}".encode() for i in range(10)])
    first = pull_until(subscriber, sub, 1, max_messages=4)
    assert 1 <= len(first) <= 4
    rest = pull_until(subscriber, sub, 10 - len(first), max_messages=100)
    all_data = sorted(rm.message.data for rm in first + rest)
    assert all_data == sorted(f"m{i}".encode() for i in range(10))


def test_pull_waits_for_new_messages(publisher, subscriber, project):
    """A Pull without return_immediately waits for a message published meanwhile."""
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic)
    t, result = background_pull(subscriber, sub, 5)
    time.sleep(1.5)
    mid = publisher.publish(topic, b"late").result(timeout=30)
    t.join(timeout=40)
    assert not t.is_alive()
    assert not isinstance(result["value"], Exception), result
    msgs = list(result["value"].received_messages)
    if not msgs:  # a server may end a long poll early with nothing; then the next pull has it
        msgs = pull_until(subscriber, sub, 1)
    assert [rm.message.message_id for rm in msgs] == [mid]


def test_pull_return_immediately_on_empty_subscription(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic)
    assert pull_now(subscriber, sub) == []


def test_pull_missing_subscription_is_not_found(subscriber, project):
    with pytest.raises(gexc.NotFound):
        subscriber.pull(
            request={"subscription": subscriber.subscription_path(project, "missing"), "max_messages": 1, "return_immediately": True},
            timeout=RPC_TIMEOUT,
        )


def test_pull_only_sees_messages_published_after_subscription(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    publisher.publish(topic, b"before").result(timeout=30)
    sub = make_sub(subscriber, project, topic)
    mid = publisher.publish(topic, b"after").result(timeout=30)
    received = pull_until(subscriber, sub, 1)
    assert [rm.message.message_id for rm in received] == [mid]
    ack_all(subscriber, sub, received)
    assert pull_now(subscriber, sub) == []


def test_each_subscription_gets_a_copy(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    a = make_sub(subscriber, project, topic, "sub-a")
    b = make_sub(subscriber, project, topic, "sub-b")
    mid = publisher.publish(topic, b"fan", k="v").result(timeout=30)
    for sub in (a, b):
        [rm] = pull_until(subscriber, sub, 1)
        assert rm.message.message_id == mid
        assert rm.message.data == b"fan"
        ack_all(subscriber, sub, [rm])


def test_modify_ack_deadline_zero_redelivers_now(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic, ack_deadline_seconds=60)
    mid = publisher.publish(topic, b"nack me", a="b").result(timeout=30)
    [first] = pull_until(subscriber, sub, 1)
    assert first.message.message_id == mid
    assert pull_now(subscriber, sub) == []

    subscriber.modify_ack_deadline(
        request={"subscription": sub, "ack_ids": [first.ack_id], "ack_deadline_seconds": 0}, timeout=RPC_TIMEOUT
    )
    start = time.monotonic()
    [again] = pull_until(subscriber, sub, 1, timeout=10)
    assert time.monotonic() - start < 5, "a nacked message should be redelivered right away"
    assert again.message.message_id == mid
    assert again.message.data == b"nack me"
    assert dict(again.message.attributes) == {"a": "b"}
    ack_all(subscriber, sub, [again])
    assert pull_now(subscriber, sub) == []


def test_modify_ack_deadline_out_of_range_is_invalid_argument(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic)
    publisher.publish(topic, b"x").result(timeout=30)
    [rm] = pull_until(subscriber, sub, 1)
    with pytest.raises(gexc.InvalidArgument):
        subscriber.modify_ack_deadline(
            request={"subscription": sub, "ack_ids": [rm.ack_id], "ack_deadline_seconds": 601}, timeout=RPC_TIMEOUT
        )
    with pytest.raises(gexc.InvalidArgument):
        subscriber.modify_ack_deadline(
            request={"subscription": sub, "ack_ids": [rm.ack_id], "ack_deadline_seconds": -1}, timeout=RPC_TIMEOUT
        )


def test_unacked_message_is_redelivered_after_ack_deadline(publisher, subscriber, project):
    """With a 10 s deadline an unacked message comes back; an extended lease does not."""
    topic = make_topic(publisher, project)
    expiring = make_sub(subscriber, project, topic, "expiring", ack_deadline_seconds=10)
    extended = make_sub(subscriber, project, topic, "extended", ack_deadline_seconds=10)
    mid = publisher.publish(topic, b"slow worker").result(timeout=30)

    [first] = pull_until(subscriber, expiring, 1)
    t0 = time.monotonic()
    [held] = pull_until(subscriber, extended, 1)
    subscriber.modify_ack_deadline(
        request={"subscription": extended, "ack_ids": [held.ack_id], "ack_deadline_seconds": 60}, timeout=RPC_TIMEOUT
    )
    assert first.message.message_id == held.message.message_id == mid
    assert pull_now(subscriber, expiring) == []

    again = []
    while not again and time.monotonic() - t0 < 30:
        again = pull_now(subscriber, expiring)
        if not again:
            time.sleep(0.5)
    elapsed = time.monotonic() - t0
    assert again, "message was not redelivered within 30 s of a 10 s ack deadline"
    assert 8.0 <= elapsed <= 25.0, f"redelivered after {elapsed:.1f}s, expected ~10s"
    assert [rm.message.message_id for rm in again] == [mid]
    assert again[0].message.data == b"slow worker"

    # The lease extended to 60 s still holds.
    assert pull_now(subscriber, extended) == []

    ack_all(subscriber, expiring, again)
    ack_all(subscriber, extended, [held])
    assert pull_now(subscriber, expiring) == []
    assert pull_now(subscriber, extended) == []


# --- streaming pull -----------------------------------------------------------


def test_streaming_pull_receives_everything(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic)
    sent = {f"stream-{i}".encode(): str(i) for i in range(200)}
    ids = publish_all(publisher, topic, [(d, {"i": i}) for d, i in sent.items()])

    lock = threading.Lock()
    got = collections.Counter()
    attrs_ok = []
    done = threading.Event()

    def callback(message):
        with lock:
            got[message.data] += 1
            attrs_ok.append(dict(message.attributes) == {"i": sent.get(message.data)})
            if len(got) == len(sent):
                done.set()
        message.ack()

    future = subscriber.subscribe(sub, callback, flow_control=FlowControl(max_messages=5))
    try:
        wait_for(done.is_set, 60, future=future)
    finally:
        stop_streaming(future)
    assert set(got) == set(sent), f"missing {len(set(sent) - set(got))} of {len(sent)}"
    dupes = {d: n for d, n in got.items() if n > 1}
    assert not dupes, f"acked messages delivered more than once: {dupes}"
    assert all(attrs_ok)
    assert len(set(ids)) == 200
    # Everything was acked.
    assert wait_for(lambda: pull_now(subscriber, sub) == [], 10, interval=1)


def test_streaming_pull_gets_messages_published_while_open(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic)
    lock = threading.Lock()
    got = set()

    def callback(message):
        with lock:
            got.add(message.message_id)
        message.ack()

    future = subscriber.subscribe(sub, callback)
    try:
        time.sleep(1.0)  # the stream is open and idle
        ids = set(publish_all(publisher, topic, [f"live-{i}".encode() for i in range(50)]))
        wait_for(lambda: ids <= got, 60, future=future)
    finally:
        stop_streaming(future)
    assert got == ids


def test_streaming_pull_nacked_messages_come_back(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic)
    ids = set(publish_all(publisher, topic, [b"n1", b"n2", b"n3"]))

    lock = threading.Lock()
    deliveries = collections.Counter()
    acked = set()

    def callback(message):
        with lock:
            deliveries[message.message_id] += 1
            first = deliveries[message.message_id] == 1
        if first:
            message.nack()
        else:
            with lock:
                acked.add(message.message_id)
            message.ack()

    future = subscriber.subscribe(sub, callback)
    try:
        wait_for(lambda: acked == ids, 60, future=future)
    finally:
        stop_streaming(future)
    assert acked == ids
    assert all(deliveries[i] >= 2 for i in ids), deliveries


def test_streaming_pull_flow_control_limits_outstanding(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic)
    total = 6
    ids = set(publish_all(publisher, topic, [f"fc-{i}".encode() for i in range(total)]))

    lock = threading.Lock()
    delivered = []  # messages handed to the callback, in order
    state = {"outstanding": 0, "max": 0}

    def callback(message):  # does not ack: the test acks one at a time below
        with lock:
            delivered.append(message)
            state["outstanding"] += 1
            state["max"] = max(state["max"], state["outstanding"])

    future = subscriber.subscribe(sub, callback, flow_control=FlowControl(max_messages=2))
    try:
        acked = 0
        while acked < total:
            want = min(acked + 2, total)
            assert wait_for(lambda: len(delivered) >= want, 30, future=future), (
                f"only {len(delivered)} delivered, expected {want} (acked {acked})"
            )
            time.sleep(0.7)  # room for an (incorrect) third delivery
            with lock:
                assert len(delivered) - acked <= 2, f"{len(delivered) - acked} outstanding with max_messages=2"
                msg = delivered[acked]
                state["outstanding"] -= 1
            msg.ack()
            acked += 1
    finally:
        stop_streaming(future)
    assert state["max"] == 2
    assert [m.message_id for m in delivered] and {m.message_id for m in delivered} == ids
    assert len(delivered) == total, "a held (lease-extended) message was redelivered"


def test_two_streaming_subscribers_share_one_subscription(publisher, subscriber, project):
    """Two workers on one subscription split the messages: none lost, none twice."""
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic)
    ids = set(publish_all(publisher, topic, [f"work-{i}".encode() for i in range(300)]))

    lock = threading.Lock()
    per_worker = [collections.Counter(), collections.Counter()]

    def make_callback(n):
        def callback(message):
            with lock:
                per_worker[n][message.message_id] += 1
            message.ack()

        return callback

    second = pubsub_v1.SubscriberClient()
    futures = [
        subscriber.subscribe(sub, make_callback(0), flow_control=FlowControl(max_messages=10)),
        second.subscribe(sub, make_callback(1), flow_control=FlowControl(max_messages=10)),
    ]

    def all_seen():
        with lock:
            return ids <= set(per_worker[0]) | set(per_worker[1])

    try:
        assert wait_for(all_seen, 60), "not all messages were delivered"
        time.sleep(0.5)
    finally:
        for f in futures:
            stop_streaming(f)
        second.close()
    total = per_worker[0] + per_worker[1]
    assert set(total) == ids
    dupes = {m: n for m, n in total.items() if n > 1}
    assert not dupes, f"{len(dupes)} acked messages delivered twice"


# --- request validation (Google's limits) -------------------------------------


def test_publish_request_limits_are_invalid_argument(publisher, project):
    from google.pubsub_v1 import PublisherClient as GapicPublisher

    topic = make_topic(publisher, project)
    raw = GapicPublisher()

    def publish(messages):
        return raw.publish(request={"topic": topic, "messages": messages}, retry=None, timeout=RPC_TIMEOUT)

    try:
        assert len(publish([{"data": b"x"}] * 1000).message_ids) == 1000
        bad = {
            "1001 messages": [{"data": b"x"}] * 1001,
            "101 attributes": [{"data": b"x", "attributes": {f"k{i}": "v" for i in range(101)}}],
            "257-byte key": [{"attributes": {"k" * 257: "v"}}],
            "1025-byte value": [{"attributes": {"k": "v" * 1025}}],
            "reserved goog key": [{"attributes": {"googfoo": "v"}}],
            "empty key": [{"attributes": {"": "v"}}],
        }
        for what, messages in bad.items():
            with pytest.raises(gexc.InvalidArgument):
                publish(messages)
                pytest.fail(f"{what} was accepted")
    finally:
        raw.transport.close()


def test_invalid_ack_ids_and_pull_sizes_are_invalid_argument(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic)
    with pytest.raises(gexc.InvalidArgument):
        subscriber.acknowledge(request={"subscription": sub, "ack_ids": ["not-an-ack-id"]}, timeout=RPC_TIMEOUT)
    with pytest.raises(gexc.InvalidArgument):
        subscriber.modify_ack_deadline(
            request={"subscription": sub, "ack_ids": ["not-an-ack-id"], "ack_deadline_seconds": 10}, timeout=RPC_TIMEOUT
        )
    with pytest.raises(gexc.InvalidArgument):
        subscriber.pull(request={"subscription": sub, "max_messages": 0, "return_immediately": True}, timeout=RPC_TIMEOUT)


def test_invalid_labels_are_invalid_argument(publisher, project):
    with pytest.raises(gexc.InvalidArgument):
        publisher.create_topic(request={"name": publisher.topic_path(project, "labels"), "labels": {"Bad": "x"}}, timeout=RPC_TIMEOUT)


def test_update_subscription_topic_is_invalid_argument(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    other = make_topic(publisher, project, "other")
    sub = make_sub(subscriber, project, topic)
    with pytest.raises(gexc.InvalidArgument):
        subscriber.update_subscription(
            request={"subscription": {"name": sub, "topic": other}, "update_mask": {"paths": ["topic"]}}, timeout=RPC_TIMEOUT
        )
    assert subscriber.get_subscription(request={"subscription": sub}, timeout=RPC_TIMEOUT).topic == topic


def test_streaming_pull_on_missing_subscription_is_not_found(subscriber, project):
    future = subscriber.subscribe(subscriber.subscription_path(project, "missing"), lambda m: m.ack())
    try:
        with pytest.raises(gexc.NotFound):
            future.result(timeout=30)
    finally:
        future.cancel()


def test_waiting_pull_ends_when_subscription_is_deleted(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic)
    t, result = background_pull(subscriber, sub, 1)
    time.sleep(1.0)
    subscriber.delete_subscription(request={"subscription": sub}, timeout=RPC_TIMEOUT)
    t.join(timeout=40)
    assert result["elapsed"] < 10, f"waiting pull lasted {result['elapsed']:.1f}s after the delete"
    value = result["value"]
    assert isinstance(value, gexc.NotFound) or not value.received_messages, repr(value)


def test_detached_subscription_keeps_backlog_and_ignores_recreated_topic(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic)
    mid = publisher.publish(topic, b"before delete").result(timeout=30)
    publisher.delete_topic(request={"topic": topic}, timeout=RPC_TIMEOUT)
    make_topic(publisher, project)  # same name again
    publisher.publish(topic, b"after recreate").result(timeout=30)
    got = pull_until(subscriber, sub, 2, timeout=3)
    assert [rm.message.message_id for rm in got] == [mid]
    assert list(publisher.list_topic_subscriptions(request={"topic": topic}, timeout=RPC_TIMEOUT)) == []


# --- settings are honored or refused, never silently changed ------------------


@pytest.mark.parametrize(
    "field,value,check",
    [
        ("message_retention_duration", {"seconds": 3600}, lambda s: s.message_retention_duration == dt.timedelta(hours=1)),
        ("retain_acked_messages", True, lambda s: s.retain_acked_messages is True),
        ("expiration_policy", {"ttl": {"seconds": 86400}}, lambda s: s.expiration_policy.ttl == dt.timedelta(days=1)),
    ],
    ids=["retention-1h", "retain-acked", "expiration-1d"],
)
def test_subscription_setting_is_honored_or_refused(publisher, subscriber, project, field, value, check):
    """Real Pub/Sub stores and echoes these; a server that does not support one
    must say so (INVALID_ARGUMENT), as pubrun does for push, filter, dead letter…"""
    topic = make_topic(publisher, project)
    name = subscriber.subscription_path(project, "setting")
    try:
        created = subscriber.create_subscription(request={"name": name, "topic": topic, field: value}, timeout=RPC_TIMEOUT)
    except gexc.InvalidArgument:
        return  # refused with a message: acceptable
    got = subscriber.get_subscription(request={"subscription": name}, timeout=RPC_TIMEOUT)
    assert check(created), f"{field}={value} silently changed on create: {created}"
    assert check(got), f"{field}={value} silently changed: {got}"


def test_retention_below_10_minutes_is_invalid_argument(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    with pytest.raises(gexc.InvalidArgument):
        subscriber.create_subscription(
            request={"name": subscriber.subscription_path(project, "short"), "topic": topic, "message_retention_duration": {"seconds": 5}},
            timeout=RPC_TIMEOUT,
        )
