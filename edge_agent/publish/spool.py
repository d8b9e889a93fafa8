"""A bounded, crash-safe, ordered on-disk FIFO of MQTT messages (the store-and-forward spool).

Layout: a folder of segment files ``<number>.seg`` (20 digits, so name order is age order) and
a ``head`` file naming the first live record (``<segment> <offset>``). Each record is::

    b"EAS1" | body length (u32, big endian) | CRC-32 of body (u32) | body
    body = JSON header {"topic", "qos", "retain", "created"} + b"\\n" + payload bytes

Records are appended with one ``os.write`` each and fsynced at most every ``fsync_interval_s``
(and on ``sync()``/``close()``). What a crash can lose: a killed *process* loses nothing that
``append`` accepted (the bytes are in the page cache); a power cut or kernel crash can lose the
records appended in the last ``fsync_interval_s`` and leave a half-written record at the end of
a segment, which the next ``open`` detects by its length/CRC, cuts off with a warning and counts
in ``corrupt_bytes`` (damage inside a segment is skipped up to the next intact record). The head
is persisted at the same cadence, so after a crash records already popped may come back once
(at-least-once; never lost).

Each run appends to a fresh segment, so a damaged tail from a previous run is never written
after. Segments wholly before the head are deleted. The spool is not thread-safe: one thread
owns it (the publisher's network thread).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import UserError
from edge_agent.fileio import atomic_write, fsync_directory

log = logging.getLogger(__name__)

MAGIC = b"EAS1"
_HEADER = struct.Struct(">4sII")
MAX_BODY = 64 * 1024 * 1024
"""Larger lengths can only come from a damaged header (an MQTT payload is at most 256 MiB, a
verdict a few KiB)."""


@dataclass(frozen=True)
class SpoolRecord:
    """One spooled message, as it will be published."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    created: float = 0.0


@dataclass(frozen=True)
class _Entry:
    """Where one live record lies: segment number, byte offset, record size on disk."""

    segment: int
    offset: int
    size: int


def encode_record(record: SpoolRecord) -> bytes:
    """The bytes of one record on disk (header + body)."""
    meta = {
        "topic": record.topic,
        "qos": record.qos,
        "retain": record.retain,
        "created": record.created,
    }
    body = json.dumps(meta, separators=(",", ":")).encode() + b"\n" + record.payload
    return _HEADER.pack(MAGIC, len(body), zlib.crc32(body)) + body


def _decode_body(body: bytes) -> SpoolRecord:
    meta_raw, _, payload = body.partition(b"\n")
    meta = json.loads(meta_raw)
    return SpoolRecord(
        topic=str(meta["topic"]),
        payload=payload,
        qos=int(meta["qos"]),
        retain=bool(meta["retain"]),
        created=float(meta["created"]),
    )


class Spool:
    """Ordered on-disk FIFO bounded by ``max_messages`` and ``max_bytes``.

    ``append`` rejects (returns False and counts ``dropped``) when either bound would be
    exceeded; nothing is ever dropped silently or evicted. ``peek(i, n)`` reads records without
    removing them (the publisher keeps them until the broker acknowledges them); ``pop(n)``
    removes the ``n`` oldest.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_messages: int = 100_000,
        max_bytes: int = 256 * 1024 * 1024,
        segment_bytes: int = 8 * 1024 * 1024,
        fsync_interval_s: float = 0.5,
    ) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise UserError(
                f"spool limits must be positive (max_messages={max_messages}, "
                f"max_bytes={max_bytes})"
            )
        self.directory = Path(directory)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync_interval_s = fsync_interval_s
        self.dropped = 0
        """Messages rejected because the spool was full (since this object was opened)."""
        self.corrupt_bytes = 0
        """Bytes of damaged records skipped while opening."""
        self._entries: deque[_Entry] = deque()
        self._bytes = 0
        self._read_fds: dict[int, int] = {}
        self._segments: set[int] = set()
        self._write_fd = -1
        self._write_segment = 0
        self._write_offset = 0
        self._dirty = False
        self._head_dirty = False
        self._last_sync = time.monotonic()
        self._write_failed = False
        self._sync_failed = False
        self._open()

    # ------------------------------------------------------------------ public API

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Size on disk of the live records."""
        return self._bytes

    def append(self, record: SpoolRecord, *, count_rejection: bool = True) -> bool:
        """Add a record at the tail; False when the spool is full (counted in ``dropped``
        unless ``count_rejection`` is False: the caller still holds the record)."""
        data = encode_record(record)
        if len(self._entries) >= self.max_messages or self._bytes + len(data) > self.max_bytes:
            self.dropped += count_rejection
            return False
        try:
            if self._write_offset > 0 and self._write_offset + len(data) > self.segment_bytes:
                self._new_write_segment()
            written = os.write(self._write_fd, data)
        except OSError as err:
            written, error = -1, err.strerror or str(err)
        else:
            error = "short write"
        if written != len(data):  # disk full or failing: keep the file valid, refuse the record
            with contextlib.suppress(OSError):
                os.ftruncate(self._write_fd, self._write_offset)
            self.dropped += count_rejection
            if not self._write_failed:
                self._write_failed = True
                log.error(
                    "spool %s: cannot write (%s); messages are rejected and counted",
                    self.directory,
                    error,
                )
            return False
        if self._write_failed:
            self._write_failed = False
            log.info("spool %s: writing works again", self.directory)
        self._entries.append(_Entry(self._write_segment, self._write_offset, len(data)))
        self._write_offset += len(data)
        self._bytes += len(data)
        self._dirty = True
        self.sync_if_due()
        return True

    def peek(self, start: int = 0, count: int = 1) -> list[SpoolRecord]:
        """Records ``start .. start+count-1`` counted from the oldest, without removing them."""
        end = min(len(self._entries), start + count)
        return [self._read(self._entries[i]) for i in range(start, end)]

    def pop(self, count: int = 1) -> None:
        """Remove the ``count`` oldest records."""
        if count > len(self._entries):
            raise ValueError(f"pop({count}) from a spool of {len(self._entries)}")
        for _ in range(count):
            entry = self._entries.popleft()
            self._bytes -= entry.size
        self._head_dirty = True
        self._drop_consumed_segments()
        self.sync_if_due()

    def sync_if_due(self) -> None:
        """fsync appended records and persist the head if ``fsync_interval_s`` has passed."""
        if (self._dirty or self._head_dirty) and (
            time.monotonic() - self._last_sync >= self.fsync_interval_s
        ):
            self.sync()

    def sync(self) -> None:
        """fsync appended records and persist the head now (errors are logged, not raised:
        the records stay in the page cache and are retried at the next sync)."""
        self._last_sync = time.monotonic()
        try:
            if self._dirty and self._write_fd >= 0:
                os.fsync(self._write_fd)
                self._dirty = False
            if self._head_dirty:
                self._write_head()
                self._head_dirty = False
        except OSError as err:
            if not self._sync_failed:
                log.error("spool %s: fsync failed (%s)", self.directory, err.strerror or err)
            self._sync_failed = True
        else:
            self._sync_failed = False

    def close(self) -> None:
        """Sync and close the files; the spool object must not be used afterwards."""
        self.sync()
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
            if self._write_offset == 0:  # nothing was appended this run
                self._segment_path(self._write_segment).unlink(missing_ok=True)

    # ------------------------------------------------------------------ opening / recovery

    def _open(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise UserError(
                f"spool folder {self.directory} is not writable: {err.strerror or err}"
            ) from err
        segments = sorted(self._segment_numbers())
        head_segment, head_offset = self._read_head(segments)
        for number in segments:
            if number < head_segment:
                self._segment_path(number).unlink(missing_ok=True)
                continue
            self._scan_segment(number, head_offset if number == head_segment else 0)
        live = {e.segment for e in self._entries}
        for number in segments:
            if number >= head_segment and number not in live:
                self._segment_path(number).unlink(missing_ok=True)
        self._segments = live
        last = max(segments, default=0)
        self._write_segment = last
        self._new_write_segment()
        self._head_dirty = True
        self.sync()
        if self._entries:
            log.info(
                "spool %s: %d message(s) (%d bytes) left by a previous run will be sent first",
                self.directory,
                len(self._entries),
                self._bytes,
            )

    def _segment_numbers(self) -> list[int]:
        numbers = []
        for path in self.directory.glob("*.seg"):
            if path.stem.isdigit():
                numbers.append(int(path.stem))
        return numbers

    def _segment_path(self, number: int) -> Path:
        return self.directory / f"{number:020d}.seg"

    def _read_head(self, segments: list[int]) -> tuple[int, int]:
        try:
            text = (self.directory / "head").read_text()
            seg_text, off_text = text.split()
            return int(seg_text), int(off_text)
        except FileNotFoundError:
            pass
        except (OSError, ValueError):
            log.warning("spool %s: unreadable head file; replaying from the start", self.directory)
        return (segments[0] if segments else 0), 0

    def _scan_segment(self, number: int, start: int) -> None:
        """Index the valid records of one segment from ``start``; skip damaged bytes."""
        data = self._segment_path(number).read_bytes()
        pos = start
        while pos < len(data):
            size = self._valid_record_size(data, pos)
            if size:
                self._entries.append(_Entry(number, pos, size))
                self._bytes += size
                pos += size
                continue
            resync = self._next_valid_record(data, pos + 1)
            skipped = (resync if resync is not None else len(data)) - pos
            self.corrupt_bytes += skipped
            where = "at the end" if resync is None else "in the middle"
            log.warning(
                "spool %s: skipped %d damaged byte(s) %s of %s (a record half-written "
                "when the previous run stopped)",
                self.directory,
                skipped,
                where,
                self._segment_path(number).name,
            )
            if resync is None:
                # Nothing is ever appended to an old segment again: cut the torn tail off so
                # the warning is not repeated on every start.
                os.truncate(self._segment_path(number), pos)
                break
            pos = resync

    @staticmethod
    def _valid_record_size(data: bytes, pos: int) -> int:
        """Size of the intact record at ``pos``, or 0 if there is none."""
        if len(data) - pos < _HEADER.size:
            return 0
        magic, length, crc = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + length
        if magic != MAGIC or length > MAX_BODY or end > len(data):
            return 0
        body = data[pos + _HEADER.size : end]
        if zlib.crc32(body) != crc:
            return 0
        try:
            _decode_body(body)
        except (ValueError, KeyError, TypeError):
            return 0
        return end - pos

    def _next_valid_record(self, data: bytes, pos: int) -> int | None:
        while True:
            found = data.find(MAGIC, pos)
            if found < 0:
                return None
            if self._valid_record_size(data, found):
                return found
            pos = found + 1

    # ------------------------------------------------------------------ internals

    def _new_write_segment(self) -> None:
        if self._write_fd >= 0:
            os.fsync(self._write_fd)
            os.close(self._write_fd)
        self._write_segment += 1
        path = self._segment_path(self._write_segment)
        self._write_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segments.add(self._write_segment)
        self._write_offset = 0
        self._dirty = False
        self._fsync_directory()

    def _read(self, entry: _Entry) -> SpoolRecord:
        fd = self._read_fds.get(entry.segment)
        if fd is None:
            fd = os.open(self._segment_path(entry.segment), os.O_RDONLY)
            self._read_fds[entry.segment] = fd
        data = os.pread(fd, entry.size, entry.offset)
        return _decode_body(data[_HEADER.size :])

    def _drop_consumed_segments(self) -> None:
        """Delete read-only segments that hold no live record any more."""
        first_live = self._entries[0].segment if self._entries else self._write_segment
        if not self._entries and self._write_offset > self.segment_bytes // 4:
            self._new_write_segment()  # start small again once a big backlog is gone
            first_live = self._write_segment
        for number in [n for n in self._read_fds if n < first_live]:
            os.close(self._read_fds.pop(number))
        for number in [n for n in self._segments if n < first_live]:
            self._segments.discard(number)
            self._segment_path(number).unlink(missing_ok=True)

    def _write_head(self) -> None:
        if self._entries:
            head = self._entries[0]
            text = f"{head.segment} {head.offset}\n"
        else:
            text = f"{self._write_segment} {self._write_offset}\n"
        atomic_write(self.directory / "head", text.encode(), mode=0o600)

    def _fsync_directory(self) -> None:
        fsync_directory(self.directory)
