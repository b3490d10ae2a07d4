"""The event log: size rotation that readers and followers survive, and webhook signatures."""

from __future__ import annotations

import os
import random
import stat
from concurrent.futures import ThreadPoolExecutor

from hms_mgmt.events import (
    Event,
    EventFollower,
    EventSink,
    WebhookDelivery,
    _spooled_id,
    read_events,
    sign,
    verify_signature,
    webhook_secret,
)


def ev(n: int) -> Event:
    return Event(type="pod.started", service="hms-ach", reason=f"event {n}")


def test_rotation_keeps_three_files_and_readers_see_everything_in_order(tmp_path):
    sink = EventSink(tmp_path, rotate_bytes=2_000, keep=3)
    follower = EventFollower(tmp_path)
    seen = []
    for n in range(80):
        sink.write(ev(n))
        if n % 7 == 0:
            seen += follower.poll()
    seen += follower.poll()
    files = sorted(p.name for p in tmp_path.glob("events.jsonl*"))
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2", "events.jsonl.3"]
    assert [e.reason for e in seen] == [f"event {n}" for n in range(80)]  # the follower lost nothing
    kept = [e.reason for e in read_events(tmp_path)]
    assert kept == [f"event {n}" for n in range(80 - len(kept), 80)]  # oldest dropped, order kept
    assert len({e.id for e in seen}) == 80


def test_follower_from_the_end_sees_only_new_events(tmp_path):
    sink = EventSink(tmp_path)
    sink.write(ev(1))
    follower = EventFollower(tmp_path, from_start=False)
    assert follower.poll() == []
    sink.write(ev(2))
    assert [e.reason for e in follower.poll()] == ["event 2"]


def test_webhook_key_is_private_and_signatures_check(tmp_path):
    key = webhook_secret(tmp_path)
    path = tmp_path / "keys" / "webhook.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert webhook_secret(tmp_path) == key  # stable
    body = b'{"type": "pod.started"}'
    assert verify_signature(body, sign(body, key), key)
    assert not verify_signature(body + b" ", sign(body, key), key)
    assert not verify_signature(body, None, key)
    assert webhook_secret(tmp_path, "configured") == b"configured"


def test_follower_can_start_with_the_tail_of_the_log(tmp_path):
    sink = EventSink(tmp_path)
    for n in range(100):
        sink.write(ev(n))
    follower = EventFollower(tmp_path, tail_bytes=1500)
    first = follower.poll()
    assert 3 <= len(first) < 20 and first[-1].reason == "event 99"  # whole lines only, the newest ones
    sink.write(ev(100))
    assert [e.reason for e in follower.poll()] == ["event 100"]


async def test_publish_never_raises_when_the_log_cannot_be_written(tmp_path, caplog):
    (tmp_path / "events.jsonl").mkdir()  # not a file: every write fails
    sink = EventSink(tmp_path, webhooks=["http://127.0.0.1:9/hook"])
    await sink.publish(ev(1))  # logged, not raised: a heal waiting on this activity goes on
    assert "could not record event pod.started" in caplog.text


def test_each_webhook_gets_its_own_durable_queue(tmp_path):
    sink = EventSink(tmp_path, "http://a.example/hook", webhooks=["http://b.example/hook"])
    assert sink.webhooks == ["http://b.example/hook", "http://a.example/hook"]
    event = ev(1)
    sink.write(event)
    for url in sink.webhooks:
        queued = list(sink.spool_dir(url).glob("*.json"))
        assert [_spooled_id(p) for p in queued] == [event.id]
        assert (sink.spool_dir(url) / "url").read_text() == url


def test_webhooks_get_events_in_the_order_the_log_holds_them_with_concurrent_writers(tmp_path):
    # Events are made (and get their ids) before they are written; threads then race to write.
    # Whatever order the log ends up in, the spool must hand them out in that same order.
    url = "http://127.0.0.1:9/hook"
    sink = EventSink(tmp_path, webhooks=[url])
    events = [ev(i) for i in range(200)]
    random.Random(7).shuffle(events)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(sink.write, events))
    logged = [e.id for e in read_events(tmp_path)]
    spooled = [_spooled_id(p) for p in WebhookDelivery._queued(sink.spool_dir(url))]
    assert len(logged) == 200
    assert spooled == logged


async def test_refusals_are_recorded_within_a_bound_and_the_rest_counted(tmp_path, monkeypatch):
    from hms_mgmt import events as ev

    clock = [1000.0]
    monkeypatch.setattr(ev.time, "monotonic", lambda: clock[0])
    refusals = ev.RefusalLog(ev.EventSink(tmp_path), per_minute=3)
    written = [await refusals.record("hms-ach", f"refused {i}", action="dashboard") for i in range(5)]
    assert written == [True, True, True, False, False]
    clock[0] += 60
    assert await refusals.record("", "refused 5", action="dashboard")
    got = [e for e in ev.read_events(tmp_path) if e.type == "access.denied"]
    assert [e.reason for e in got] == ["refused 0", "refused 1", "refused 2", "refused 5"]
    assert got[-1].service == "-" and got[-1].data == {"action": "dashboard", "not_recorded_before": 2}
    assert "not_recorded_before" not in got[0].data
