"""Delivery semantics as Google's official Python client sees them: dead-letter
topics, retry backoff, ordering keys, filters and exactly-once delivery.

Timings are semantic checks with generous bounds (a redelivery must not come
*before* the minimum backoff), never speed measurements.
"""

from __future__ import annotations

import collections
import threading
import time

import pytest
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.subscriber._protocol import streaming_pull_manager
from google.cloud.pubsub_v1.subscriber.exceptions import AcknowledgeError, AcknowledgeStatus
from google.cloud.pubsub_v1.types import PublisherOptions

from test_pubsub_official_client import (
    RPC_TIMEOUT,
    make_sub,
    make_topic,
    pull_now,
    pull_until,
    stop_streaming,
    wait_for,
)

DEAD_LETTER_ATTRIBUTES = {
    "CloudPubSubDeadLetterSourceDeliveryCount",
    "CloudPubSubDeadLetterSourceSubscription",
    "CloudPubSubDeadLetterSourceSubscriptionProject",
    "CloudPubSubDeadLetterSourceTopicPublishTime",
}


# --- dead-letter topics -------------------------------------------------------


def test_dead_letter_topic_receives_message_after_max_delivery_attempts(publisher, subscriber, project):
    topic = make_topic(publisher, project, "work")
    dead_topic = make_topic(publisher, project, "work-dead")
    dead_sub = make_sub(subscriber, project, dead_topic, "dead-sub")
    sub = make_sub(
        subscriber,
        project,
        topic,
        "worker",
        dead_letter_policy={"dead_letter_topic": dead_topic, "max_delivery_attempts": 5},
    )
    got = subscriber.get_subscription(request={"subscription": sub}, timeout=RPC_TIMEOUT)
    assert got.dead_letter_policy.dead_letter_topic == dead_topic
    assert got.dead_letter_policy.max_delivery_attempts == 5

    mid = publisher.publish(topic, b"poison", origin="test").result(timeout=30)
    attempts = []

    def nack_always(message):
        attempts.append(message.delivery_attempt)
        message.nack()

    future = subscriber.subscribe(sub, nack_always)
    try:
        dead = pull_until(subscriber, dead_sub, 1, timeout=60)
    finally:
        stop_streaming(future)
    assert len(dead) == 1, f"nothing reached the dead-letter topic; attempts seen: {attempts}"
    msg = dead[0].message
    assert msg.data == b"poison"
    assert msg.message_id != mid
    attrs = dict(msg.attributes)
    assert DEAD_LETTER_ATTRIBUTES <= set(attrs), attrs
    assert attrs["origin"] == "test"
    assert attrs["CloudPubSubDeadLetterSourceDeliveryCount"] == "5"
    assert attrs["CloudPubSubDeadLetterSourceSubscription"] == "worker"
    assert attrs["CloudPubSubDeadLetterSourceSubscriptionProject"] == project
    # The client reports delivery_attempt when a dead-letter policy is set.
    assert attempts[:5] == [1, 2, 3, 4, 5], attempts
    # Moved and acked on the source: nothing more comes there.
    assert pull_now(subscriber, sub) == []


def test_without_dead_letter_policy_delivery_attempt_is_unset(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic)
    publisher.publish(topic, b"x").result(timeout=30)
    got = pull_until(subscriber, sub, 1)
    assert got[0].delivery_attempt == 0


def test_dead_letter_policy_is_validated(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    for attempts in (4, 101):
        with pytest.raises(gexc.InvalidArgument, match="between 5 and 100"):
            make_sub(
                subscriber, project, topic, f"bad-{attempts}",
                dead_letter_policy={"dead_letter_topic": topic, "max_delivery_attempts": attempts},
            )
    with pytest.raises(gexc.NotFound):
        make_sub(
            subscriber, project, topic, "missing-dlq",
            dead_letter_policy={"dead_letter_topic": publisher.topic_path(project, "nope"), "max_delivery_attempts": 5},
        )


# --- retry policy ---------------------------------------------------------------


def _nack_and_time_redelivery(subscriber, sub, timeout=30.0):
    first = pull_until(subscriber, sub, 1)
    assert len(first) == 1
    nacked_at = time.monotonic()
    subscriber.modify_ack_deadline(
        request={"subscription": sub, "ack_ids": [first[0].ack_id], "ack_deadline_seconds": 0}, timeout=RPC_TIMEOUT
    )
    again = pull_until(subscriber, sub, 1, timeout=timeout)
    return again, time.monotonic() - nacked_at


def test_retry_policy_delays_redelivery_by_minimum_backoff(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(
        subscriber, project, topic, "backoff",
        retry_policy={"minimum_backoff": {"seconds": 3}, "maximum_backoff": {"seconds": 10}},
    )
    immediate = make_sub(subscriber, project, topic, "immediate")
    got = subscriber.get_subscription(request={"subscription": sub}, timeout=RPC_TIMEOUT)
    assert got.retry_policy.minimum_backoff.total_seconds() == 3
    assert got.retry_policy.maximum_backoff.total_seconds() == 10
    publisher.publish(topic, b"retry me").result(timeout=30)

    again, waited = _nack_and_time_redelivery(subscriber, sub)
    assert len(again) == 1, "redelivered after the backoff"
    assert waited >= 2.9, f"redelivered {waited:.2f}s after the nack, before minimum_backoff (3s)"
    assert waited < 3 + 20, f"redelivery took {waited:.1f}s"
    # Without a retry policy the nack redelivers at once (no backoff to wait out).
    again, waited = _nack_and_time_redelivery(subscriber, immediate)
    assert len(again) == 1
    assert waited < 2.9, f"without a retry policy the redelivery still took {waited:.2f}s"


def test_retry_policy_defaults_and_bounds(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic, "defaults", retry_policy={"maximum_backoff": {"seconds": 600}})
    got = subscriber.get_subscription(request={"subscription": sub}, timeout=RPC_TIMEOUT)
    assert got.retry_policy.minimum_backoff.total_seconds() == 10
    assert got.retry_policy.maximum_backoff.total_seconds() == 600
    with pytest.raises(gexc.InvalidArgument, match="maximum_backoff"):
        make_sub(subscriber, project, topic, "too-long", retry_policy={"maximum_backoff": {"seconds": 601}})
    # Updatable, like Google's.
    updated = subscriber.update_subscription(
        request={
            "subscription": {"name": sub, "retry_policy": {"minimum_backoff": {"seconds": 1}}},
            "update_mask": {"paths": ["retry_policy"]},
        },
        timeout=RPC_TIMEOUT,
    )
    assert updated.retry_policy.minimum_backoff.total_seconds() == 1


# --- ordering keys --------------------------------------------------------------


def test_ordering_keys_are_delivered_in_publish_order(subscriber, project, pubrun_server):
    ordered_publisher = pubsub_v1.PublisherClient(publisher_options=PublisherOptions(enable_message_ordering=True))
    try:
        topic = make_topic(ordered_publisher, project)
        sub = make_sub(subscriber, project, topic, "ordered", enable_message_ordering=True)
        assert subscriber.get_subscription(request={"subscription": sub}, timeout=RPC_TIMEOUT).enable_message_ordering
        keys = ["alpha", "beta", "gamma"]
        per_key = 25
        futures = []
        for i in range(per_key):
            for k in keys:
                futures.append(ordered_publisher.publish(topic, f"{k}-{i}".encode(), ordering_key=k))
            futures.append(ordered_publisher.publish(topic, f"none-{i}".encode()))
        for f in futures:
            f.result(timeout=60)
    finally:
        ordered_publisher.stop()

    received = collections.defaultdict(list)
    lock = threading.Lock()

    def callback(message):
        with lock:
            received[message.ordering_key].append(message.data.decode())
        message.ack()

    future = subscriber.subscribe(sub, callback)
    try:
        total = lambda: sum(len(v) for v in received.values())  # noqa: E731
        assert wait_for(lambda: total() >= per_key * (len(keys) + 1), timeout=60, future=future), dict(received)
    finally:
        stop_streaming(future)
    for k in keys:
        assert received[k] == [f"{k}-{i}" for i in range(per_key)], f"key {k} out of order: {received[k]}"
    assert sorted(received[""]) == sorted(f"none-{i}" for i in range(per_key))


def test_ordered_pull_withholds_the_next_message_of_a_key_while_one_is_outstanding(subscriber, project, pubrun_server):
    ordered_publisher = pubsub_v1.PublisherClient(publisher_options=PublisherOptions(enable_message_ordering=True))
    try:
        topic = make_topic(ordered_publisher, project)
        sub = make_sub(subscriber, project, topic, "ordered-pull", enable_message_ordering=True, ack_deadline_seconds=60)
        for i in range(3):
            ordered_publisher.publish(topic, f"k-{i}".encode(), ordering_key="k").result(timeout=30)
    finally:
        ordered_publisher.stop()
    first = pull_until(subscriber, sub, 1, max_messages=1)
    assert [m.message.data for m in first] == [b"k-0"]
    assert pull_now(subscriber, sub) == [], "k-1 must wait while k-0 is outstanding"
    # Nack k-0: it comes back first, then its successors.
    subscriber.modify_ack_deadline(
        request={"subscription": sub, "ack_ids": [first[0].ack_id], "ack_deadline_seconds": 0}, timeout=RPC_TIMEOUT
    )
    again = pull_until(subscriber, sub, 3)
    assert [m.message.data for m in again] == [b"k-0", b"k-1", b"k-2"]
    assert all(m.message.ordering_key == "k" for m in again)


# --- filters ----------------------------------------------------------------------


def test_filter_delivers_only_matching_messages(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    flt = 'attributes.kind = "keep" OR hasPrefix(attributes.region, "eu-")'
    sub = make_sub(subscriber, project, topic, "filtered", filter=flt)
    everything = make_sub(subscriber, project, topic, "everything")
    assert subscriber.get_subscription(request={"subscription": sub}, timeout=RPC_TIMEOUT).filter == flt
    sent = [
        (b"1", {"kind": "keep"}),
        (b"2", {"kind": "drop"}),
        (b"3", {"region": "eu-west1"}),
        (b"4", {"region": "us-east1"}),
        (b"5", {}),
    ]
    for data, attrs in sent:
        publisher.publish(topic, data, **attrs).result(timeout=30)
    assert len(pull_until(subscriber, everything, 5)) == 5
    got = pull_until(subscriber, sub, 2)
    got += pull_until(subscriber, sub, 1, timeout=2)  # nothing else may come
    assert sorted(m.message.data for m in got) == [b"1", b"3"]


def test_bad_filter_is_invalid_argument(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    for flt in ['attributes.kind = ', 'attributes.kind = "a" AND attributes.x = "b" OR attributes:y', "kind = 'x'"]:
        with pytest.raises(gexc.InvalidArgument, match="position"):
            make_sub(subscriber, project, topic, "bad-filter", filter=flt)
    with pytest.raises(gexc.NotFound):
        subscriber.get_subscription(request={"subscription": subscriber.subscription_path(project, "bad-filter")}, timeout=RPC_TIMEOUT)


def test_filter_cannot_be_updated(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic, "fixed", filter="attributes:x")
    with pytest.raises(gexc.InvalidArgument):
        subscriber.update_subscription(
            request={"subscription": {"name": sub, "filter": "attributes:y"}, "update_mask": {"paths": ["filter"]}},
            timeout=RPC_TIMEOUT,
        )


# --- exactly-once delivery ----------------------------------------------------------


def test_exactly_once_ack_with_response_succeeds(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic, "eod", enable_exactly_once_delivery=True)
    assert subscriber.get_subscription(request={"subscription": sub}, timeout=RPC_TIMEOUT).enable_exactly_once_delivery
    for i in range(5):
        publisher.publish(topic, f"m{i}".encode()).result(timeout=30)
    results = {}
    errors = []
    lock = threading.Lock()

    def callback(message):
        try:
            status = message.ack_with_response().result(timeout=30)
            with lock:
                results[message.data] = status
        except Exception as e:  # noqa: BLE001 - reported below
            with lock:
                errors.append(repr(e))

    future = subscriber.subscribe(sub, callback)
    try:
        assert wait_for(lambda: len(results) + len(errors) >= 5, timeout=60, future=future), (results, errors)
    finally:
        stop_streaming(future)
    assert errors == []
    assert set(results.values()) == {AcknowledgeStatus.SUCCESS}
    assert pull_until(subscriber, sub, 1, timeout=2) == [], "acked exactly once: nothing comes back"


def test_exactly_once_rejects_a_superseded_ack_id_with_error_info(publisher, subscriber, project):
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic, "eod-invalid", enable_exactly_once_delivery=True)
    publisher.publish(topic, b"once").result(timeout=30)
    first = pull_until(subscriber, sub, 1)
    old = first[0].ack_id
    subscriber.modify_ack_deadline(request={"subscription": sub, "ack_ids": [old], "ack_deadline_seconds": 0}, timeout=RPC_TIMEOUT)
    with pytest.raises(gexc.InvalidArgument) as info:
        subscriber.acknowledge(request={"subscription": sub, "ack_ids": [old]}, timeout=RPC_TIMEOUT)
    exc = info.value
    assert exc.reason == "EXACTLY_ONCE_ACKID_FAILURE"
    assert exc.domain == "pubsub.googleapis.com"
    # What the client's streaming pull manager reads to fail exactly this ack.
    assert streaming_pull_manager._get_ack_errors(exc) == {old: "PERMANENT_FAILURE_INVALID_ACK_ID"}
    # The redelivery's own ack id works.
    again = pull_until(subscriber, sub, 1)
    assert again[0].ack_id != old
    subscriber.acknowledge(request={"subscription": sub, "ack_ids": [again[0].ack_id]}, timeout=RPC_TIMEOUT)
    assert pull_until(subscriber, sub, 1, timeout=2) == []


def test_exactly_once_ack_with_response_reports_invalid_ack_id_for_an_expired_lease(publisher, subscriber, project):
    """The streaming client's ack future fails with INVALID_ACK_ID when the
    lease ran out before the ack (the message was nacked by another party)."""
    topic = make_topic(publisher, project)
    sub = make_sub(subscriber, project, topic, "eod-expired", enable_exactly_once_delivery=True)
    publisher.publish(topic, b"late").result(timeout=30)
    outcome = []
    done = threading.Event()
    claimed = threading.Lock()

    def callback(message):
        # The redelivery (after the nack below) may arrive while the first
        # callback still waits for its ack: only the first one runs the check.
        if not claimed.acquire(blocking=False):
            message.ack()
            return
        # Someone else gives the lease up (a nack through a second client)...
        other = pubsub_v1.SubscriberClient()
        try:
            other.modify_ack_deadline(
                request={"subscription": sub, "ack_ids": [message.ack_id], "ack_deadline_seconds": 0}, timeout=RPC_TIMEOUT
            )
        finally:
            other.close()
        # ... so this ack must fail rather than silently succeed.
        try:
            outcome.append(message.ack_with_response().result(timeout=30))
        except AcknowledgeError as e:
            outcome.append(e.error_code)
        done.set()

    future = subscriber.subscribe(sub, callback)
    try:
        assert done.wait(60), "callback never ran"
    finally:
        stop_streaming(future)
    assert outcome[0] == AcknowledgeStatus.INVALID_ACK_ID, outcome
