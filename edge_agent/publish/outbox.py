"""One camera's ordered outbox: the verdicts not yet acknowledged by the broker.

The verdicts waiting to be sent form one FIFO, ``spool (on disk, oldest) ++ memory``:

* ``enqueue``: while connected, with the spool empty and fewer than ``memory_limit`` verdicts
  in memory, a verdict stays in memory. Otherwise memory is spilled to the spool tail first
  (so the order is kept) and the verdict is appended to the spool; when the spool is full it is
  rejected and counted in ``Spool.dropped`` (never an older verdict evicted).
* ``next_to_send``: the records after those in flight, up to ``window`` unacknowledged; a
  record read from the spool is ``delayed`` (it waited on disk, the payload must say so).
* ``sent``/``acknowledge``: the link registers the MQTT message id it got for each record, in
  order; a PUBACK marks its entry, and records leave the FIFO only from the head, once every
  older one is acknowledged too (the broker may acknowledge out of order). ``published`` and
  ``delayed_published`` count what left.
* ``on_disconnect``: the window is forgotten (those messages may or may not have reached the
  broker) and memory is spilled to the spool, so after the reconnect everything is re-sent from
  the head, marked delayed: the order is kept at the cost of possible duplicates (QoS 1).

Known gap: verdicts in memory (at most ``memory_limit``; normally only while connected, or when
they did not fit in a full spool) are not on disk, so they are lost if the process is killed
before the broker acknowledges them; a clean stop spills them first (``spill``).

Pure bookkeeping: no sockets, no paho, no threads. One thread owns an outbox and its spool
(the link's network thread); other threads may only read the counters.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from edge_agent.publish.spool import Spool, SpoolRecord

MEMORY_BACKLOG = 1000
"""Unsent verdicts kept in memory while connected; beyond that they go to the spool."""


class Outgoing(NamedTuple):
    """A record to publish; ``delayed`` when it comes from the spool."""

    record: SpoolRecord
    delayed: bool


@dataclass
class _InFlight:
    mid: int
    delayed: bool
    acked: bool = False


class Outbox:
    """FIFO of unacknowledged verdicts over a Spool, with an in-flight window."""

    def __init__(self, spool: Spool, *, window: int, memory_limit: int = MEMORY_BACKLOG) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if memory_limit < 0:
            raise ValueError(f"memory_limit must not be negative, got {memory_limit}")
        self.spool = spool
        self.window = window
        self.memory_limit = memory_limit
        self._memory: deque[SpoolRecord] = deque()
        # In FIFO order: entry i is FIFO position i. Acknowledged entries stay until every
        # older one is acknowledged, so the window also counts them.
        self._inflight: deque[_InFlight] = deque()
        self._by_mid: dict[int, _InFlight] = {}
        self._connected = False
        self.published = 0
        """Verdicts acknowledged by the broker and removed."""
        self.delayed_published = 0
        """Of those, the ones sent marked delayed."""

    def __len__(self) -> int:
        """Verdicts waiting, in flight included."""
        return len(self.spool) + len(self._memory)

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def in_memory(self) -> int:
        return len(self._memory)

    @property
    def in_flight(self) -> int:
        """Sent and not yet removed (acknowledged ones behind an unacknowledged head count)."""
        return len(self._inflight)

    # ------------------------------------------------------------------ connection events

    def on_connect(self) -> None:
        """The broker accepted a (new) connection: send from the head again."""
        self._connected = True
        self._reset_window()

    def on_disconnect(self) -> None:
        """The connection is gone: forget the window and move memory to the spool."""
        self._connected = False
        self._reset_window()
        self.spill()

    # ------------------------------------------------------------------ queueing

    def enqueue(self, record: SpoolRecord) -> bool:
        """Add a verdict at the tail; False when it is rejected because the spool is full
        (counted in ``spool.dropped``)."""
        if self._connected and not self.spool and len(self._memory) < self.memory_limit:
            self._memory.append(record)
            return True
        self.spill()
        if self._memory:
            # The spool is full and older verdicts still wait in memory: appending this one
            # to the spool would put it before them.
            self.spool.dropped += 1
            return False
        return self.spool.append(record)

    def spill(self) -> None:
        """Move in-memory verdicts to the spool tail (they are its newest) while it has room.

        FIFO positions do not change, so the in-flight window stays valid."""
        while self._memory and self.spool.append(self._memory[0], count_rejection=False):
            self._memory.popleft()

    def peek(self, start: int = 0, count: int = 1) -> list[Outgoing]:
        """FIFO positions ``start .. start+count-1`` from the head, without removing them."""
        n_spool = len(self.spool)
        end = min(start + count, len(self))
        if start >= end:
            return []
        out: list[Outgoing] = []
        if start < n_spool:
            out += [Outgoing(r, True) for r in self.spool.peek(start, end - start)]
        out += [Outgoing(self._memory[i - n_spool], False) for i in range(start + len(out), end)]
        return out

    # ------------------------------------------------------------------ sending

    def next_to_send(self) -> list[Outgoing]:
        """The records after those in flight, as many as the window allows; none while
        disconnected. Register each one handed to the client with ``sent``, in order."""
        if not self._connected:
            return []
        start = len(self._inflight)
        return self.peek(start, self.window - start)

    def sent(self, mid: int) -> None:
        """The next record after those in flight went out with MQTT message id ``mid``."""
        position = len(self._inflight)
        if not self._connected:
            raise RuntimeError("sent() while disconnected")
        if position >= min(self.window, len(self)):
            raise RuntimeError(f"sent() beyond the window or the FIFO (position {position})")
        if mid in self._by_mid:
            raise ValueError(f"message id {mid} is already in flight")
        entry = _InFlight(mid, delayed=position < len(self.spool))
        self._inflight.append(entry)
        self._by_mid[mid] = entry

    def acknowledge(self, mid: int) -> int:
        """A PUBACK for ``mid``; returns how many verdicts left the head of the FIFO (0 for an
        id that is not ours, e.g. status or health, or one behind an unacknowledged head)."""
        entry = self._by_mid.pop(mid, None)
        if entry is None:
            return 0
        entry.acked = True
        done = delayed = 0
        while self._inflight and self._inflight[0].acked:
            delayed += self._inflight.popleft().delayed
            done += 1
        if not done:
            return 0
        from_spool = min(done, len(self.spool))
        if from_spool:
            self.spool.pop(from_spool)
        for _ in range(done - from_spool):
            self._memory.popleft()
        self.published += done
        self.delayed_published += delayed
        return done

    # ------------------------------------------------------------------ counters

    def stats(self) -> dict[str, int]:
        return {
            "published": self.published,
            "delayed_published": self.delayed_published,
            "spooled": len(self.spool),
            "in_memory": len(self._memory),
            "in_flight": len(self._inflight),
            "spool_dropped": self.spool.dropped,
        }

    def _reset_window(self) -> None:
        self._inflight.clear()
        self._by_mid.clear()
