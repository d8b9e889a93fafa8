"""FrameQueue: overflow policies, back-pressure, batching deadlines and close, with real threads."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge_agent.capture.frame_queue import Frame, FrameQueue


def frame(camera: str, seq: int) -> Frame:
    image = np.full((4, 4, 3), seq % 256, np.uint8)
    return Frame(camera, seq, f"{camera}-{seq}", time.time(), image)


def ids(frames: list[Frame]) -> list[str]:
    return [f.frame_id for f in frames]


def start(target, *args) -> tuple[threading.Thread, list]:
    """Run target(*args) on a thread; its return value lands in the list."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(target(*args)), daemon=True)
    t.start()
    return t, out


def test_drop_oldest_keeps_newest_and_counts_per_camera() -> None:
    q = FrameQueue(3)
    for i in range(5):
        assert q.put(frame("a", i), block=False)
    assert q.put(frame("b", 0), block=False)
    assert q.depth() == 3
    assert q.dropped == {"a": 3}
    assert ids(q.get_batch(10, 0.0)) == ["a-3", "a-4", "b-0"]
    assert q.depth() == 0


def test_live_frames_never_evict_back_pressure_frames() -> None:
    q = FrameQueue(3)
    assert q.put(frame("file", 0), block=True)
    assert q.put(frame("live", 0), block=False)
    assert q.put(frame("file", 1), block=True)
    assert q.put(frame("live", 1), block=False)  # evicts live-0, not file-0
    assert q.dropped == {"live": 1}
    assert ids(q.get_batch(10, 0.0)) == ["file-0", "file-1", "live-1"]
    for i in range(3):
        q.put(frame("file", i), block=True)
    assert q.put(frame("live", 2), block=False)  # nothing droppable: the new frame is dropped
    assert q.dropped == {"live": 2}
    assert ids(q.get_batch(10, 0.0)) == ["file-0", "file-1", "file-2"]


def test_back_pressure_blocks_until_the_consumer_takes() -> None:
    q = FrameQueue(2)
    q.put(frame("a", 0), block=True)
    q.put(frame("a", 1), block=True)
    producer, out = start(lambda: q.put(frame("a", 2), block=True))
    producer.join(0.3)
    assert producer.is_alive(), "put(block=True) on a full queue must wait"
    assert q.depth() == 2 and q.dropped == {}
    assert ids(q.get_batch(1, 0.0)) == ["a-0"]
    producer.join(2.0)
    assert not producer.is_alive() and out == [True]
    assert ids(q.get_batch(10, 0.0)) == ["a-1", "a-2"]


def test_cancel_releases_a_blocked_producer() -> None:
    q = FrameQueue(1)
    q.put(frame("a", 0), block=True)
    stop = threading.Event()
    producer, out = start(lambda: q.put(frame("a", 1), block=True, cancel=stop))
    producer.join(0.2)
    assert producer.is_alive()
    stop.set()
    q.wake()
    producer.join(1.0)
    assert not producer.is_alive() and out == [False]
    assert q.depth() == 1


def test_batch_waits_at_most_max_wait_for_stragglers() -> None:
    q = FrameQueue(16)
    q.put(frame("a", 0), block=False)
    t0 = time.monotonic()
    batch = q.get_batch(8, 0.25, timeout_s=1.0)
    waited = time.monotonic() - t0
    assert ids(batch) == ["a-0"]
    assert 0.2 <= waited < 0.8


def test_batch_returns_once_full_without_waiting() -> None:
    q = FrameQueue(16)
    for i in range(10):
        q.put(frame("a", i), block=False)
    t0 = time.monotonic()
    assert ids(q.get_batch(4, 5.0)) == ["a-0", "a-1", "a-2", "a-3"]
    assert time.monotonic() - t0 < 0.5
    assert q.depth() == 6


def test_batch_collects_stragglers_as_they_arrive() -> None:
    q = FrameQueue(16)

    def produce() -> None:
        for i in range(4):
            time.sleep(0.05)
            q.put(frame("a", i), block=False)

    producer, _ = start(produce)
    t0 = time.monotonic()
    batch = q.get_batch(4, 3.0, timeout_s=3.0)
    assert ids(batch) == ["a-0", "a-1", "a-2", "a-3"]
    assert time.monotonic() - t0 < 1.5  # returned at max_batch, not at max_wait
    producer.join(1.0)


def test_batch_stops_waiting_when_the_queue_is_full() -> None:
    q = FrameQueue(2)
    q.put(frame("a", 0), block=True)
    q.put(frame("a", 1), block=True)
    t0 = time.monotonic()
    assert len(q.get_batch(8, 5.0)) == 2  # nothing more can come: no point waiting
    assert time.monotonic() - t0 < 0.5


def test_first_frame_timeout_returns_empty() -> None:
    q = FrameQueue(4)
    t0 = time.monotonic()
    assert q.get_batch(4, 0.1, timeout_s=0.2) == []
    assert 0.15 <= time.monotonic() - t0 < 0.8


def test_close_wakes_consumer_and_producer() -> None:
    empty, full = FrameQueue(4), FrameQueue(1)
    full.put(frame("a", 0), block=True)
    consumer, got = start(lambda: empty.get_batch(4, 1.0, timeout_s=None))
    producer, put = start(lambda: full.put(frame("a", 1), block=True))
    consumer.join(0.2)
    producer.join(0.2)
    assert consumer.is_alive() and producer.is_alive()
    empty.close()
    full.close()
    consumer.join(1.0)
    producer.join(1.0)
    assert not consumer.is_alive() and got == [[]]
    assert not producer.is_alive() and put == [False]
    assert full.closed and empty.closed


def test_closed_queue_drains_then_returns_empty() -> None:
    q = FrameQueue(4)
    q.put(frame("a", 0), block=False)
    q.put(frame("a", 1), block=False)
    q.close()
    assert not q.put(frame("a", 2), block=False)
    assert not q.put(frame("a", 3), block=True)
    t0 = time.monotonic()
    assert ids(q.get_batch(8, 2.0)) == ["a-0", "a-1"]  # no straggler wait once closed
    assert q.get_batch(8, 2.0, timeout_s=None) == []
    assert time.monotonic() - t0 < 0.5


def test_many_producers_lose_nothing_under_back_pressure() -> None:
    q = FrameQueue(3)
    n = 200

    def produce(cam: str) -> None:
        for i in range(n):
            q.put(frame(cam, i), block=True)

    producers = [start(produce, cam)[0] for cam in ("a", "b", "c")]
    got: list[Frame] = []
    while len(got) < 3 * n:
        batch = q.get_batch(4, 0.01, timeout_s=5.0)
        assert batch, "producers stalled"
        got += batch
    for p in producers:
        p.join(1.0)
    for cam in ("a", "b", "c"):
        assert [f.sequence for f in got if f.camera == cam] == list(range(n))
    assert q.dropped == {}


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_sizes_are_refused(bad: int) -> None:
    with pytest.raises(ValueError):
        FrameQueue(bad)
    with pytest.raises(ValueError):
        FrameQueue(2).get_batch(bad, 0.0)


def test_a_frame_carries_the_reason_it_has_no_image() -> None:
    q = FrameQueue(2)
    bad = Frame("a", 0, "a-0", time.time(), np.empty((0, 0, 3), np.uint8), "x.png", "why")
    q.put(bad, block=True)
    q.put(frame("a", 1), block=True)
    got = q.get_batch(2, 0.0)
    assert [f.error for f in got] == ["why", None]
    assert got[0].source_name == "x.png" and got[0].image.size == 0
