"""Helpers the Python compatibility tests share (imported by the test modules)."""

from __future__ import annotations

import threading
import time

RPC_TIMEOUT = 30  # seconds, per admin call; the client would otherwise retry for 60-600 s


def make_topic(publisher, project, topic_id="topic", **kwargs):
    path = publisher.topic_path(project, topic_id)
    publisher.create_topic(request={"name": path, **kwargs}, timeout=RPC_TIMEOUT)
    return path


def make_sub(subscriber, project, topic_path, sub_id="sub", **kwargs):
    path = subscriber.subscription_path(project, sub_id)
    subscriber.create_subscription(request={"name": path, "topic": topic_path, **kwargs}, timeout=RPC_TIMEOUT)
    return path


def close_quietly(*closers):
    """Calls each closer in turn; one failing (a client already closed) does not stop the rest."""
    for close in closers:
        try:
            close()
        except Exception:
            pass


def background_pull(subscriber, subscription, max_messages):
    """Starts a waiting Pull (no return_immediately) on a thread.

    Returns the thread and a dict that, once the thread ends, holds "value"
    (the response, or the exception the pull raised) and "elapsed" (seconds).
    """
    result = {}

    def puller():
        start = time.monotonic()
        try:
            result["value"] = subscriber.pull(
                request={"subscription": subscription, "max_messages": max_messages}, timeout=30
            )
        except Exception as e:  # the caller asserts on it
            result["value"] = e
        result["elapsed"] = time.monotonic() - start

    t = threading.Thread(target=puller)
    t.start()
    return t, result
