"""Durability as the official client sees it: a publish that returned an id
survives `kill -9` of the server, and so do topics and subscriptions."""

from __future__ import annotations

from google.cloud import pubsub_v1

from conftest import start_pubrun, stop_pubrun
from test_pubsub_official_client import RPC_TIMEOUT, ack_all, publish_all, pull_until


def _clients():
    return pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()


def _close(pub, sub):
    pub.stop()
    pub.transport.close()
    sub.close()


def test_published_messages_survive_kill_9(tmp_path, monkeypatch, pubrun_server, project):
    data_dir = tmp_path / "data"
    first = start_pubrun(tmp_path, data_dir)
    second = None
    try:
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", first.hostport)
        pub, sub = _clients()
        topic = pub.topic_path(project, "durable")
        sub_path = sub.subscription_path(project, "durable-sub")
        pub.create_topic(request={"name": topic, "labels": {"keep": "me"}}, timeout=RPC_TIMEOUT)
        sub.create_subscription(request={"name": sub_path, "topic": topic, "ack_deadline_seconds": 60}, timeout=RPC_TIMEOUT)
        sent = {f"durable-{i}".encode(): {"i": str(i)} for i in range(50)}
        ids = dict(zip(publish_all(pub, topic, list(sent.items())), sent))
        acked = pull_until(sub, sub_path, 10, max_messages=10)
        assert len(acked) == 10
        ack_all(sub, sub_path, acked)
        _close(pub, sub)

        stop_pubrun(first, kill=True)
        second = start_pubrun(tmp_path, data_dir)
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", second.hostport)
        pub, sub = _clients()
        try:
            assert dict(pub.get_topic(request={"topic": topic}, timeout=RPC_TIMEOUT).labels) == {"keep": "me"}
            got_sub = sub.get_subscription(request={"subscription": sub_path}, timeout=RPC_TIMEOUT)
            assert (got_sub.topic, got_sub.ack_deadline_seconds) == (topic, 60)

            acked_ids = {rm.message.message_id for rm in acked}
            must_have = set(ids) - acked_ids
            received = pull_until(sub, sub_path, len(must_have), timeout=30, max_messages=100)
            # Acked messages may come back (at-least-once); unacked ones must.
            received += pull_until(sub, sub_path, len(acked_ids), timeout=2, max_messages=100)
            got = {rm.message.message_id: rm.message for rm in received}
            assert must_have <= set(got), f"lost {len(must_have - set(got))} of {len(must_have)} unacked messages"
            assert set(got) <= set(ids)
            for mid, msg in got.items():
                assert msg.data == ids[mid]
                assert dict(msg.attributes) == sent[ids[mid]]
        finally:
            _close(pub, sub)
    finally:
        for srv in (first, second):
            if srv is not None and srv.proc.poll() is None:
                stop_pubrun(srv)


def test_sigterm_with_open_streams_stops_promptly(tmp_path, monkeypatch, pubrun_server, project):
    """SIGTERM ends open streaming pulls and waiting pulls; the server exits soon after."""
    import threading
    import time

    srv = start_pubrun(tmp_path, tmp_path / "data")
    try:
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", srv.hostport)
        pub, sub = _clients()
        topic = pub.topic_path(project, "shutdown")
        pub.create_topic(request={"name": topic}, timeout=RPC_TIMEOUT)
        streamed = sub.subscription_path(project, "streamed")
        waiting = sub.subscription_path(project, "waiting")
        for s in (streamed, waiting):
            sub.create_subscription(request={"name": s, "topic": topic}, timeout=RPC_TIMEOUT)
        future = sub.subscribe(streamed, lambda m: m.ack())

        def long_poll():
            try:
                sub.pull(request={"subscription": waiting, "max_messages": 1}, timeout=60)
            except Exception:
                pass

        poller = threading.Thread(target=long_poll, daemon=True)
        poller.start()
        time.sleep(1.5)  # both calls are open on the server
        start = time.monotonic()
        srv.proc.terminate()
        code = srv.proc.wait(timeout=30)
        elapsed = time.monotonic() - start
        future.cancel()
        # Closing clients whose server is gone takes the client several seconds
        # of retries; do it in the background.
        threading.Thread(target=_close, args=(pub, sub), daemon=True).start()
        assert code == 0, f"exit code {code} after SIGTERM"
        assert elapsed < 10, f"server took {elapsed:.1f}s to stop with open streams"
    finally:
        if srv.proc.poll() is None:
            stop_pubrun(srv, kill=True)
