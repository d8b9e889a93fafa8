"""The ordered outbox without a broker: a real Spool in tmp_path, message ids made up here."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge_agent.publish.outbox import Outbox
from edge_agent.publish.spool import Spool, SpoolRecord, encode_record

TOPIC = "edge-agent/line1/camA/verdict"


def rec(seq: int, pad: int = 0) -> SpoolRecord:
    payload = json.dumps({"sequence": seq, "pad": "x" * pad}).encode()
    return SpoolRecord(TOPIC, payload, 1, False, 1000.0 + seq)


def seq_of(record: SpoolRecord) -> int:
    return int(json.loads(record.payload)["sequence"])


def fifo(box: Outbox) -> list[tuple[int, bool]]:
    """The whole FIFO, head first: (sequence, delayed i.e. in the spool)."""
    return [(seq_of(o.record), o.delayed) for o in box.peek(0, len(box))]


def open_spool(
    directory: Path, max_messages: int = 100_000, max_bytes: int = 256 * 1024 * 1024
) -> Spool:
    # Small segments so that records cross segment files; no fsync cadence to wait for.
    return Spool(
        directory,
        max_messages=max_messages,
        max_bytes=max_bytes,
        segment_bytes=600,
        fsync_interval_s=3600,
    )


def send_all(box: Outbox, first_mid: int) -> list[int]:
    """Register everything the window allows, as the link does; returns the mids."""
    mids = []
    for mid, _ in enumerate(box.next_to_send(), start=first_mid):
        box.sent(mid)
        mids.append(mid)
    return mids


def test_memory_while_connected_with_an_empty_spool_else_spool(tmp_path: Path) -> None:
    box = Outbox(open_spool(tmp_path), window=10, memory_limit=100)
    for i in range(3):  # not connected yet: straight to disk
        assert box.enqueue(rec(i))
    assert (len(box.spool), box.in_memory) == (3, 0)
    box.on_connect()
    assert box.enqueue(rec(3))
    assert (len(box.spool), box.in_memory) == (4, 0), "behind a non-empty spool, not in memory"
    assert box.acknowledge(0) == 0
    send_all(box, 1)
    for mid in (1, 2, 3, 4):
        box.acknowledge(mid)
    assert len(box) == 0 and not box.spool
    for i in range(4, 7):
        assert box.enqueue(rec(i))
    assert (len(box.spool), box.in_memory) == (0, 3)
    assert fifo(box) == [(4, False), (5, False), (6, False)]


def test_order_is_kept_across_spills_to_the_spool(tmp_path: Path) -> None:
    box = Outbox(open_spool(tmp_path), window=4, memory_limit=5)
    box.on_connect()
    for i in range(5):
        box.enqueue(rec(i))
    mids = send_all(box, 100)  # 0..3 in flight from memory, not delayed
    assert [o.delayed for o in box.peek(0, 4)] == [False] * 4
    box.enqueue(rec(5))  # memory is full: all of it goes to the spool first, then this one
    assert (len(box.spool), box.in_memory) == (6, 0)
    for i in range(6, 9):
        box.enqueue(rec(i))  # behind a non-empty spool
    assert fifo(box) == [(i, True) for i in range(9)]
    assert box.in_flight == 4, "a spill does not move FIFO positions, the window stays valid"
    for mid in mids:
        assert box.acknowledge(mid) == 1
    # Entries were registered while in memory: counted as not delayed, as they were sent.
    assert (box.published, box.delayed_published) == (4, 0)
    assert [seq for seq, _ in fifo(box)] == list(range(4, 9))
    send_all(box, 200)
    for mid in range(200, 204):
        box.acknowledge(mid)
    assert (box.published, box.delayed_published) == (8, 4)


def test_window_limits_what_is_in_flight(tmp_path: Path) -> None:
    box = Outbox(open_spool(tmp_path), window=3)
    box.on_connect()
    for i in range(10):
        box.enqueue(rec(i))
    batch = box.next_to_send()
    assert [seq_of(o.record) for o in batch] == [0, 1, 2]
    box.sent(1)
    assert [seq_of(o.record) for o in box.next_to_send()] == [1, 2], "after those in flight"
    box.sent(2)
    box.sent(3)
    assert box.next_to_send() == [] and box.in_flight == 3
    with pytest.raises(RuntimeError, match="window"):
        box.sent(4)
    assert box.acknowledge(1) == 1
    assert [seq_of(o.record) for o in box.next_to_send()] == [3]
    with pytest.raises(ValueError, match="already in flight"):
        box.sent(2)


def test_window_never_goes_past_the_end_of_the_fifo(tmp_path: Path) -> None:
    box = Outbox(open_spool(tmp_path), window=5)
    box.on_connect()
    box.enqueue(rec(0))
    assert len(box.next_to_send()) == 1
    box.sent(7)
    with pytest.raises(RuntimeError):
        box.sent(8)


def test_out_of_order_pubacks_remove_only_from_the_head(tmp_path: Path) -> None:
    box = Outbox(open_spool(tmp_path), window=10)
    box.on_connect()
    for i in range(5):
        box.enqueue(rec(i))
    assert send_all(box, 1) == [1, 2, 3, 4, 5]
    assert box.acknowledge(3) == 0
    assert box.acknowledge(2) == 0
    assert box.acknowledge(5) == 0
    assert (box.published, len(box), box.in_flight) == (0, 5, 5), "acked ones still hold a slot"
    assert box.next_to_send() == []
    assert box.acknowledge(1) == 3, "the head and the acknowledged ones behind it"
    assert [seq for seq, _ in fifo(box)] == [3, 4]
    assert box.acknowledge(3) == 0, "a repeated PUBACK is ignored"
    assert box.acknowledge(999) == 0, "an id that is not ours (status, health)"
    assert box.acknowledge(4) == 2
    assert (box.published, len(box), box.in_flight) == (5, 0, 0)


def test_disconnect_puts_in_flight_back_to_be_resent_first_and_delayed(tmp_path: Path) -> None:
    box = Outbox(open_spool(tmp_path), window=3)
    box.on_connect()
    for i in range(5):
        box.enqueue(rec(i))
    send_all(box, 10)  # 0, 1, 2
    assert box.acknowledge(10) == 1
    assert box.acknowledge(12) == 0  # 2 reached the broker, 1 did not
    box.on_disconnect()
    assert (box.in_flight, box.in_memory, len(box.spool)) == (0, 0, 4)
    assert box.next_to_send() == [], "nothing is sent while disconnected"
    box.enqueue(rec(5))
    with pytest.raises(RuntimeError, match="disconnected"):
        box.sent(20)
    box.on_connect()
    assert box.acknowledge(11) == 0, "a PUBACK of the old connection means nothing now"
    again = box.next_to_send()
    assert [(seq_of(o.record), o.delayed) for o in again] == [(1, True), (2, True), (3, True)]
    send_all(box, 20)
    for mid in (20, 21, 22):
        box.acknowledge(mid)
    send_all(box, 30)
    for mid in (30, 31):
        box.acknowledge(mid)
    assert len(box) == 0
    assert (box.published, box.delayed_published) == (6, 5)


def test_spool_full_rejects_the_newest_and_counts_it(tmp_path: Path) -> None:
    box = Outbox(open_spool(tmp_path, max_messages=3), window=10, memory_limit=10)
    assert [box.enqueue(rec(i)) for i in range(5)] == [True, True, True, False, False]
    assert box.stats()["spool_dropped"] == 2
    assert [seq for seq, _ in fifo(box)] == [0, 1, 2], "the oldest are kept"


def test_spool_full_while_memory_spills_keeps_order_and_counts(tmp_path: Path) -> None:
    box = Outbox(open_spool(tmp_path, max_messages=4), window=10, memory_limit=10)
    box.on_connect()
    for i in range(5):
        box.enqueue(rec(i))
    box.on_disconnect()  # only 4 fit: 4 waits in memory, and is not counted as rejected
    assert (len(box.spool), box.in_memory, box.spool.dropped) == (4, 1, 0)
    assert not box.enqueue(rec(5)), "it would overtake 4"
    assert box.spool.dropped == 1
    assert fifo(box) == [(0, True), (1, True), (2, True), (3, True), (4, False)]
    box.on_connect()
    send_all(box, 1)
    assert box.acknowledge(1) == 1
    assert box.acknowledge(2) == 1
    assert box.enqueue(rec(6)), "the spool has room again: memory spills, then this one"
    assert fifo(box) == [(2, True), (3, True), (4, True), (6, True)]
    assert (box.in_memory, box.spool.dropped) == (0, 1)


def test_a_small_verdict_does_not_overtake_a_big_one_stuck_in_memory(tmp_path: Path) -> None:
    small = len(encode_record(rec(1)))
    spool = Spool(tmp_path, max_bytes=3 * small, fsync_interval_s=3600)
    box = Outbox(spool, window=10)
    box.on_connect()
    box.enqueue(rec(0, pad=4 * small))
    box.on_disconnect()  # too big for the spool: it stays in memory
    assert box.in_memory == 1 and not box.spool
    assert not box.enqueue(rec(1)), "it would fit, but it would be sent before 0"
    assert fifo(box) == [(0, False)] and box.spool.dropped == 1


def test_stats(tmp_path: Path) -> None:
    box = Outbox(open_spool(tmp_path, max_messages=4), window=2, memory_limit=3)
    assert box.stats() == {
        "published": 0,
        "delayed_published": 0,
        "spooled": 0,
        "in_memory": 0,
        "in_flight": 0,
        "spool_dropped": 0,
    }
    box.enqueue(rec(0))  # spool
    box.on_connect()
    send_all(box, 1)
    box.acknowledge(1)
    for i in range(1, 4):
        box.enqueue(rec(i))  # memory
    send_all(box, 2)
    box.acknowledge(2)
    assert box.stats() == {
        "published": 2,
        "delayed_published": 1,
        "spooled": 0,
        "in_memory": 2,
        "in_flight": 1,
        "spool_dropped": 0,
    }


def test_a_new_run_sends_the_old_spool_first(tmp_path: Path) -> None:
    box = Outbox(open_spool(tmp_path), window=10)
    box.on_connect()
    for i in range(4):
        box.enqueue(rec(i))
    send_all(box, 1)
    box.acknowledge(1)
    box.spill()  # what a clean stop does
    box.spool.close()
    box = Outbox(open_spool(tmp_path), window=10)
    box.on_connect()
    box.enqueue(rec(4))
    assert fifo(box) == [(1, True), (2, True), (3, True), (4, True)]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Outbox(None, window=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Outbox(None, window=1, memory_limit=-1)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ model-based


@dataclass
class _Entry:
    mid: int
    delayed: bool
    acked: bool = False


@dataclass
class Model:
    """The FIFO rules in the plainest form: one list of (sequence, in_spool), spool first."""

    capacity: int
    capacity_bytes: int
    window: int
    memory_limit: int
    sizes: dict[int, int] = field(default_factory=dict)  # sequence -> bytes in the spool
    items: list[tuple[int, bool]] = field(default_factory=list)
    connected: bool = False
    inflight: list[_Entry] = field(default_factory=list)
    published: int = 0
    delayed_published: int = 0
    dropped: int = 0
    removed: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)

    def n_spool(self) -> int:
        return sum(in_spool for _, in_spool in self.items)

    def fits(self, seq: int) -> bool:
        used = sum(self.sizes[s] for s, in_spool in self.items if in_spool)
        return self.n_spool() < self.capacity and used + self.sizes[seq] <= self.capacity_bytes

    def spill(self) -> None:
        for i, (seq, in_spool) in enumerate(self.items):
            if in_spool:
                continue
            if not self.fits(seq):
                break
            self.items[i] = (seq, True)

    def enqueue(self, seq: int, size: int) -> bool:
        self.sizes[seq] = size
        n_memory = len(self.items) - self.n_spool()
        if self.connected and self.n_spool() == 0 and n_memory < self.memory_limit:
            self.items.append((seq, False))
            return True
        self.spill()
        if len(self.items) > self.n_spool() or not self.fits(seq):
            self.dropped += 1
            self.rejected.append(seq)
            return False
        self.items.append((seq, True))
        return True

    def next_to_send(self) -> list[tuple[int, bool]]:
        if not self.connected:
            return []
        return self.items[len(self.inflight) : self.window]

    def sent(self, mid: int) -> None:
        self.inflight.append(_Entry(mid, self.items[len(self.inflight)][1]))

    def acknowledge(self, mid: int) -> int:
        entry = next((e for e in self.inflight if e.mid == mid and not e.acked), None)
        if entry is None:
            return 0
        entry.acked = True
        done = 0
        while self.inflight and self.inflight[0].acked:
            head = self.inflight.pop(0)
            self.removed.append(self.items.pop(0)[0])
            self.published += 1
            self.delayed_published += head.delayed
            done += 1
        return done

    def disconnect(self) -> None:
        self.connected = False
        self.inflight.clear()
        self.spill()

    def connect(self) -> None:
        self.connected = True
        self.inflight.clear()

    def restart(self) -> None:
        """A clean stop and a new run: what did not fit in the spool is lost."""
        self.spill()
        self.lost += [seq for seq, in_spool in self.items if not in_spool]
        self.items = [(seq, True) for seq, in_spool in self.items if in_spool]
        self.connected = False
        self.inflight.clear()
        self.published = self.delayed_published = self.dropped = 0


def _check(box: Outbox, model: Model, where: str) -> None:
    assert fifo(box) == model.items, where
    assert box.connected == model.connected, where
    assert box.in_flight == len(model.inflight), where
    assert box.in_memory == len(model.items) - model.n_spool(), where
    assert box.stats()["spooled"] == model.n_spool(), where
    assert (box.published, box.delayed_published) == (model.published, model.delayed_published)
    assert box.stats()["spool_dropped"] == model.dropped, where


def _run_random(directory: Path, seed: int, n_ops: int) -> None:
    rng = random.Random(seed)
    model = Model(
        capacity=rng.choice([2, 5, 30]),
        capacity_bytes=rng.choice([500, 1500, 10**9]),  # records are 120..330 bytes
        window=rng.choice([1, 2, 4]),
        memory_limit=rng.choice([0, 1, 3, 8]),
    )

    def new_box() -> Outbox:
        spool = open_spool(directory, model.capacity, model.capacity_bytes)
        return Outbox(spool, window=model.window, memory_limit=model.memory_limit)

    box = new_box()
    next_seq = next_mid = 0
    history: list[str] = []
    for _ in range(n_ops):
        op = rng.choices(
            ["enqueue", "send", "ack", "stale_ack", "disconnect", "connect", "restart"],
            weights=[30, 15, 25, 3, 5, 5, 1],
        )[0]
        if op == "enqueue":
            record = rec(next_seq, pad=rng.randint(0, 200))
            size = len(encode_record(record))
            assert box.enqueue(record) == model.enqueue(next_seq, size), history
            history.append(f"enqueue {next_seq}")
            next_seq += 1
        elif op == "send":
            batch = [(seq_of(o.record), o.delayed) for o in box.next_to_send()]
            assert batch == model.next_to_send(), history
            # The client may take only part of the batch (the connection dropped meanwhile).
            taken = rng.randint(0, len(batch))
            for _ in range(taken):
                next_mid += 1
                box.sent(next_mid)
                model.sent(next_mid)
            history.append(f"send {taken} of {len(batch)}")
        elif op == "ack":
            waiting = [e.mid for e in model.inflight if not e.acked]
            if waiting:
                mid = rng.choice(waiting)
                assert box.acknowledge(mid) == model.acknowledge(mid), history
                history.append(f"ack {mid}")
        elif op == "stale_ack":
            mid = rng.randint(0, next_mid + 1)  # old connection, status, health, repeated
            assert box.acknowledge(mid) == model.acknowledge(mid), history
            history.append(f"stale ack {mid}")
        elif op == "disconnect":
            box.on_disconnect()
            model.disconnect()
            history.append(op)
        elif op == "connect" and not model.connected:
            box.on_connect()
            model.connect()
            history.append(op)
        elif op == "restart":
            box.spill()
            box.spool.close()
            box = new_box()
            model.restart()
            history.append(op)
        _check(box, model, f"seed {seed}: {history[-12:]}")
    box.spool.close()

    # The reference itself: nothing lost or duplicated, removal in order.
    assert model.removed == sorted(model.removed), seed
    accounted = model.removed + [seq for seq, _ in model.items] + model.rejected + model.lost
    assert sorted(accounted) == list(range(next_seq)), seed


@pytest.mark.parametrize("block", range(4))
def test_random_operations_match_the_reference_model(tmp_path: Path, block: int) -> None:
    for seed in range(block * 50, block * 50 + 50):
        _run_random(tmp_path / f"seed{seed}", seed, n_ops=150)
