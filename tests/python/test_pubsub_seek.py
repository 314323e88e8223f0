"""Retention, snapshots and Seek through the official google-cloud-pubsub client.

Each test fails on a server without the feature: the calls would raise
(UNIMPLEMENTED / INVALID_ARGUMENT) or the replayed messages would not arrive.
"""

from __future__ import annotations

import datetime as dt
import time

import pytest
from google.api_core import exceptions as gexc
from google.protobuf import timestamp_pb2

from helpers import RPC_TIMEOUT, make_sub, make_topic


def publish(publisher, topic, *datas):
    for d in datas:
        publisher.publish(topic, d.encode()).result(timeout=30)


def drain(subscriber, sub, expect, timeout=10.0):
    """Pulls (and acks) until `expect` messages came or time ran out; returns sorted data."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < expect and time.monotonic() < deadline:
        resp = subscriber.pull(request={"subscription": sub, "max_messages": 100}, timeout=RPC_TIMEOUT)
        if resp.received_messages:
            subscriber.acknowledge(
                request={"subscription": sub, "ack_ids": [m.ack_id for m in resp.received_messages]},
                timeout=RPC_TIMEOUT,
            )
            got.extend(m.message.data.decode() for m in resp.received_messages)
    return sorted(got)


def assert_nothing_left(subscriber, sub):
    resp = subscriber.pull(request={"subscription": sub, "max_messages": 10, "return_immediately": True}, timeout=RPC_TIMEOUT)
    assert [m.message.data for m in resp.received_messages] == []


def test_retention_settings_are_stored_and_reported(publisher, subscriber, project):
    topic = make_topic(publisher, project, message_retention_duration={"seconds": 86400})
    got = publisher.get_topic(request={"topic": topic}, timeout=RPC_TIMEOUT)
    assert got.message_retention_duration == dt.timedelta(days=1)
    sub = make_sub(
        subscriber, project, topic,
        retain_acked_messages=True, message_retention_duration={"seconds": 1800},
    )
    s = subscriber.get_subscription(request={"subscription": sub}, timeout=RPC_TIMEOUT)
    assert s.retain_acked_messages is True
    assert s.message_retention_duration == dt.timedelta(minutes=30)
    assert s.topic_message_retention_duration == dt.timedelta(days=1)
    with pytest.raises(gexc.InvalidArgument):
        make_topic(publisher, project, "long", message_retention_duration={"seconds": 32 * 86400})
    with pytest.raises(gexc.InvalidArgument):
        make_sub(subscriber, project, topic, "long-sub", message_retention_duration={"seconds": 8 * 86400})


def test_seek_to_time_replays_retained_acked_messages(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic, retain_acked_messages=True)
    publish(publisher, topic, "one", "two")
    assert drain(subscriber, sub, 2) == ["one", "two"]
    assert_nothing_left(subscriber, sub)

    past = timestamp_pb2.Timestamp()
    past.FromDatetime(dt.datetime(2000, 1, 1))
    subscriber.seek(request={"subscription": sub, "time": past}, timeout=RPC_TIMEOUT)
    assert drain(subscriber, sub, 2) == ["one", "two"]

    # Seeking to the future acks everything that is there.
    publish(publisher, topic, "three")
    future = timestamp_pb2.Timestamp()
    future.FromDatetime(dt.datetime(2100, 1, 1))
    subscriber.seek(request={"subscription": sub, "time": future}, timeout=RPC_TIMEOUT)
    assert_nothing_left(subscriber, sub)


def test_snapshot_lifecycle_and_seek(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic)
    publish(publisher, topic, "acked-before")
    assert drain(subscriber, sub, 1) == ["acked-before"]
    publish(publisher, topic, "pending")

    snap_path = subscriber.snapshot_path(project, "snap")
    snap = subscriber.create_snapshot(
        request={"name": snap_path, "subscription": sub, "labels": {"team": "qa"}}, timeout=RPC_TIMEOUT
    )
    assert snap.name == snap_path
    assert snap.topic == topic
    assert dict(snap.labels) == {"team": "qa"}
    # 7 days minus the age of the oldest unacked message (just published).
    expires_in = snap.expire_time - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(days=6, hours=23) < expires_in <= dt.timedelta(days=7)

    with pytest.raises(gexc.AlreadyExists):
        subscriber.create_snapshot(request={"name": snap_path, "subscription": sub}, timeout=RPC_TIMEOUT)
    with pytest.raises(gexc.NotFound):
        subscriber.create_snapshot(
            request={"name": subscriber.snapshot_path(project, "other"),
                     "subscription": subscriber.subscription_path(project, "missing")},
            timeout=RPC_TIMEOUT,
        )

    publish(publisher, topic, "after")
    assert drain(subscriber, sub, 2) == ["after", "pending"]
    assert_nothing_left(subscriber, sub)

    subscriber.seek(request={"subscription": sub, "snapshot": snap_path}, timeout=RPC_TIMEOUT)
    assert drain(subscriber, sub, 2) == ["after", "pending"]

    got = subscriber.get_snapshot(request={"snapshot": snap_path}, timeout=RPC_TIMEOUT)
    assert got.name == snap_path and got.topic == topic
    listed = [s.name for s in subscriber.list_snapshots(request={"project": f"projects/{project}"}, timeout=RPC_TIMEOUT)]
    assert listed == [snap_path]
    by_topic = list(publisher.list_topic_snapshots(request={"topic": topic}, timeout=RPC_TIMEOUT))
    assert by_topic == [snap_path]

    updated = subscriber.update_snapshot(
        request={"snapshot": {"name": snap_path, "labels": {"team": "ops"}}, "update_mask": {"paths": ["labels"]}},
        timeout=RPC_TIMEOUT,
    )
    assert dict(updated.labels) == {"team": "ops"}

    subscriber.delete_snapshot(request={"snapshot": snap_path}, timeout=RPC_TIMEOUT)
    with pytest.raises(gexc.NotFound):
        subscriber.get_snapshot(request={"snapshot": snap_path}, timeout=RPC_TIMEOUT)
    with pytest.raises(gexc.NotFound):
        subscriber.seek(request={"subscription": sub, "snapshot": snap_path}, timeout=RPC_TIMEOUT)


def test_seek_to_snapshot_of_another_topic_is_failed_precondition(publisher, subscriber, project):
    t1 = make_topic(publisher, project, "t-one")
    t2 = make_topic(publisher, project, "t-two")
    s1 = make_sub(subscriber, project, t1, "s-one")
    s2 = make_sub(subscriber, project, t2, "s-two")
    snap_path = subscriber.snapshot_path(project, "of-one")
    subscriber.create_snapshot(request={"name": snap_path, "subscription": s1}, timeout=RPC_TIMEOUT)
    with pytest.raises(gexc.FailedPrecondition):
        subscriber.seek(request={"subscription": s2, "snapshot": snap_path}, timeout=RPC_TIMEOUT)
