"""The audit trail: an append-only JSONL file in which every entry carries the SHA-256 of the
one before it, so a removed, altered, reordered or inserted entry breaks the chain.

Each line is one entry in canonical JSON (sorted keys, no spaces, UTF-8): `seq` (1, 2, ...),
`time` (UTC, ISO 8601), `action`, `who`, `source`, `where`, `what`, `reason`, `result`, `prev`
(the previous entry's `hash`; 64 zeros for the first) and `hash` (SHA-256 of the entry's
canonical bytes without `hash`). The entry is also the message published on
`<prefix>/<line>/audit`, so an off-box copy exists: a hash chain alone cannot show that its
newest entries were cut off, or that someone rewrote the whole tail; the published copy can.

Durability: each entry is written with one write(), then fsynced (and the folder too when the
file is created) before `record` returns; a command that cannot be recorded is refused, so
`record` raises `AuditUnavailable` and never returns half-done.

A crash can leave a torn last line. It is never chained over silently and never deleted (the
file stays append-only): the next writer terminates it and records an `audit.torn_tail` entry
naming its line number, length and SHA-256, chained to the last whole entry. `verify` accepts a
torn line only when the very next entry is that record.

Writers in several processes (the agent, an offline `edge-agent teach`) take an exclusive
`flock` on the file for each append and re-read the tail when the file changed under them.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.fileio import fsync_directory

log = logging.getLogger(__name__)

GENESIS = "0" * 64
TORN_TAIL = "audit.torn_tail"
UNCONFIRMED = "audit.unconfirmed"
RESULTS = ("ok", "refused", "failed")
# key -> the types its value may have; one table for writing and verifying
FIELDS: dict[str, tuple[type, ...]] = {
    "seq": (int,),
    "time": (str,),
    "action": (str,),
    "who": (str,),
    "source": (str,),
    "where": (str, type(None)),
    "what": (dict,),
    "reason": (str, type(None)),
    "result": (str,),
    "prev": (str,),
    "hash": (str,),
}
_TAIL_CHUNK = 65536


class AuditUnavailable(RuntimeError):
    """The entry could not be made durable; whatever it was about must not happen."""


# ---------------------------------------------------------------- pure parts


def canonical(entry: Mapping[str, Any]) -> bytes:
    """The one byte form an entry is hashed and stored in."""
    return json.dumps(
        entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 over the entry without its own `hash` (which therefore covers `prev`)."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def seal(body: Mapping[str, Any]) -> dict[str, Any]:
    """`body` (every field but `hash`) with its hash added."""
    entry = dict(body)
    entry.pop("hash", None)
    entry["hash"] = entry_hash(entry)
    return entry


def make_entry(
    *,
    seq: int,
    prev: str,
    time: str,
    action: str,
    who: str,
    source: str,
    where: str | None = None,
    what: Mapping[str, Any] | None = None,
    reason: str | None = None,
    result: str = "ok",
) -> dict[str, Any]:
    if result not in RESULTS:
        raise ValueError(f"audit result must be one of {', '.join(RESULTS)}, got {result!r}")
    for name, value in (("action", action), ("who", who), ("source", source)):
        if not value:
            raise ValueError(f"audit {name} must not be empty")
    return seal(
        {
            "seq": seq,
            "time": time,
            "action": action,
            "who": who,
            "source": source,
            "where": where,
            "what": dict(what or {}),
            "reason": reason,
            "result": result,
            "prev": prev,
        }
    )


@dataclass(frozen=True)
class Head:
    """Where the chain stands: the last whole entry's seq and hash."""

    seq: int = 0
    hash: str = GENESIS


@dataclass(frozen=True)
class Verdict:
    """`verify`'s answer: `bad_line` is the first line (1-based) that breaks the chain, with
    why; None when the whole file checks out. `entries` counts the whole entries read."""

    entries: int
    head: Head
    bad_line: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.bad_line is None


def parse_entry(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """A stored line (without its newline) as an entry, or why it is not one."""
    try:
        entry = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, "not a JSON entry"
    if not isinstance(entry, dict):
        return None, "not a JSON entry"
    if set(entry) != set(FIELDS):
        return None, "fields differ from an audit entry's"
    for key, kinds in FIELDS.items():
        # bool is an int to isinstance; a seq of true is not a sequence number
        if not isinstance(entry[key], kinds) or isinstance(entry[key], bool):
            return None, f"{key} has the wrong type"
    if canonical(entry) != line:
        return None, "not in canonical form (edited by hand?)"
    if entry["hash"] != entry_hash(entry):
        return None, "hash does not match the entry (altered)"
    return entry, None


def verify_lines(lines: Iterable[bytes]) -> Verdict:
    """Check a whole log, line by line (each with its newline, as read from the file; the last
    may lack one). Pure: the CLI and the tests feed it bytes."""
    head = Head()
    count = 0
    torn: tuple[int, bytes] | None = None  # a torn line waiting for its record
    number = 0
    for number, raw in enumerate(lines, start=1):
        terminated = raw.endswith(b"\n")
        line = raw[:-1] if terminated else raw
        entry, _problem = parse_entry(line) if terminated else (None, "unterminated")
        if entry is None:
            if torn is not None:
                return Verdict(count, head, torn[0], "torn line not followed by its record")
            if not terminated:
                return Verdict(
                    count,
                    head,
                    number,
                    "unterminated last line (a write cut short; the agent records it when it "
                    "next opens the log)",
                )
            torn = (number, line)
            continue
        if torn is not None:
            if not _records_torn(entry, *torn):
                return Verdict(count, head, torn[0], problem_of_torn(torn[1]))
            torn = None
        if entry["prev"] != head.hash:
            return Verdict(
                count,
                head,
                number,
                "prev does not match the entry before (removed, inserted or reordered)",
            )
        if entry["seq"] != head.seq + 1:
            return Verdict(count, head, number, f"seq {entry['seq']} after {head.seq}")
        head = Head(entry["seq"], entry["hash"])
        count += 1
    if torn is not None:
        return Verdict(count, head, torn[0], problem_of_torn(torn[1]))
    return Verdict(count, head)


def problem_of_torn(line: bytes) -> str:
    _entry, problem = parse_entry(line)
    return problem or "not a JSON entry"


def _records_torn(entry: Mapping[str, Any], number: int, line: bytes) -> bool:
    what = entry["what"]
    return (
        entry["action"] == TORN_TAIL
        and what.get("line") == number
        and what.get("bytes") == len(line)
        and what.get("sha256") == hashlib.sha256(line).hexdigest()
    )


def read_lines(path: Path) -> Iterator[bytes]:
    """The log's lines with their newlines, streamed (the log only grows)."""
    with path.open("rb") as f:
        yield from f


def entries(path: Path) -> Iterator[dict[str, Any]]:
    """The whole entries in a log, in order (torn lines skipped); for `audit show`."""
    for raw in read_lines(path):
        if raw.endswith(b"\n"):
            entry, _ = parse_entry(raw[:-1])
            if entry is not None:
                yield entry


def os_user() -> str:
    """Who runs a CLI command, as the audit trail names them."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


# ---------------------------------------------------------------- the log


@dataclass(frozen=True)
class _Tail:
    """What the end of the file holds: the head to chain to, the torn bytes after the last
    newline (if any) and the number of lines before them."""

    head: Head
    lines: int
    torn: bytes


def read_tail(f: Any, size: int) -> _Tail:
    """The chain's head from the last whole line, read from the end (the common case: a
    restart, or another writer appended). Counts the lines only when there is a torn tail."""
    if size == 0:
        return _Tail(Head(), 0, b"")
    buf = b""
    end = size
    while end > 0 and buf.count(b"\n") < 2:
        start = max(0, end - _TAIL_CHUNK)
        f.seek(start)
        buf = f.read(end - start) + buf
        end = start
    cut = buf.rfind(b"\n")
    torn = buf[cut + 1 :]
    head = Head()
    if cut >= 0:
        entry, _problem = parse_entry(buf[buf.rfind(b"\n", 0, cut) + 1 : cut])
        if entry is None:
            return _full_tail(f, size)
        head = Head(entry["seq"], entry["hash"])
    return _Tail(head, _count_newlines(f) if torn else 0, torn)


def _count_newlines(f: Any) -> int:
    f.seek(0)
    return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(_TAIL_CHUNK), b""))


def _full_tail(f: Any, size: int) -> _Tail:
    """The slow path, when the last terminated line is not a whole entry (a crash between
    terminating a torn line and recording it): chain to the last whole entry and report the
    broken last line as the torn tail, already terminated."""
    f.seek(0)
    lines = f.read(size).split(b"\n")
    torn = lines.pop()  # what follows the last newline: b"" when the file ends in one
    head = Head()
    for line in lines:
        entry, _problem = parse_entry(line)
        if entry is not None:
            head = Head(entry["seq"], entry["hash"])
    if torn:  # then the broken line before it stays for verify to report
        return _Tail(head, len(lines), torn)
    return _Tail(head, len(lines) - 1, lines[-1] + b"\n")


class AuditLog:
    """Append entries to `path` (None: keep the chain in memory and only publish, for runs
    without a configured log). Thread-safe; `publish` is called with each entry under the lock
    (so entries go out in chain order) and must not block: hand it to an outbox."""

    def __init__(
        self,
        path: Path | None,
        publish: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.path = path
        self._publish = publish
        self._lock = threading.Lock()
        self._head = Head()
        # (inode, size) of the file after our last append; None: read its tail again
        self._known: tuple[int, int] | None = None
        self._unconfirmed: dict[str, Any] | None = None

    @property
    def head(self) -> Head:
        with self._lock:
            return self._head

    def record(
        self,
        action: str,
        *,
        who: str,
        source: str,
        where: str | None = None,
        what: Mapping[str, Any] | None = None,
        reason: str | None = None,
        result: str = "ok",
    ) -> dict[str, Any]:
        """Append one entry and return it once it is on disk. Raises `AuditUnavailable` when it
        cannot be made durable (the caller refuses the command it was about), ValueError for
        an entry that cannot be stored (empty who, unknown result, NaN in `what`)."""
        with self._lock:
            if self.path is None:
                entry = self._next(action, who, source, where, what, reason, result)
                self._head = Head(entry["seq"], entry["hash"])
            else:
                entry = self._append(action, who, source, where, what, reason, result)
            self._emit(entry)
            return entry

    def _emit(self, entry: dict[str, Any]) -> None:
        if self._publish is None:
            return
        try:
            self._publish(entry)
        except Exception:  # the entry is durable; the publisher's failure is not ours
            log.exception("could not publish audit entry %d", entry["seq"])

    def _next(
        self,
        action: str,
        who: str,
        source: str,
        where: str | None,
        what: Mapping[str, Any] | None,
        reason: str | None,
        result: str,
    ) -> dict[str, Any]:
        return make_entry(
            seq=self._head.seq + 1,
            prev=self._head.hash,
            time=now_iso(),
            action=action,
            who=who,
            source=source,
            where=where,
            what=what,
            reason=reason,
            result=result,
        )

    def _append(
        self,
        action: str,
        who: str,
        source: str,
        where: str | None,
        what: Mapping[str, Any] | None,
        reason: str | None,
        result: str,
    ) -> dict[str, Any]:
        assert self.path is not None
        pending: dict[str, Any] | None = None
        try:
            created = not self.path.exists()
            if created:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise AuditUnavailable(f"cannot open audit log {self.path}: {exc}") from exc
        try:
            with os.fdopen(fd, "r+b", buffering=0) as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                if created:
                    fsync_directory(self.path.parent)
                stat = os.fstat(f.fileno())
                if (stat.st_ino, stat.st_size) != self._known:
                    self._resync(f, stat.st_size)
                if self._unconfirmed is not None:
                    self._append_note(f, self._unconfirmed)
                    self._unconfirmed = None
                # build before writing anything: a ValueError leaves the file untouched
                entry = self._next(action, who, source, where, what, reason, result)
                pending = entry
                self._write(f, canonical(entry) + b"\n")
                pending = None
                self._head = Head(entry["seq"], entry["hash"])
                stat = os.fstat(f.fileno())
                self._known = (stat.st_ino, stat.st_size)
                return entry
        except OSError as exc:
            self._known = None  # the file may hold part of a line: look again next time
            if pending is not None:
                # The line may be in the file (the write went through, the fsync failed)
                # although the caller refuses what it describes: say so in the next entry.
                self._unconfirmed = {"seq": pending["seq"], "hash": pending["hash"]}
            raise AuditUnavailable(f"cannot write audit log {self.path}: {exc}") from exc

    def _append_note(self, f: Any, unconfirmed: dict[str, Any]) -> None:
        note = self._next(
            UNCONFIRMED,
            "edge-agent",
            "audit",
            None,
            unconfirmed,
            "the entry with this seq and hash, if it is in the log, was not confirmed on "
            "disk; what it describes was refused",
            "ok",
        )
        self._write(f, canonical(note) + b"\n")
        self._head = Head(note["seq"], note["hash"])
        self._emit(note)

    def _resync(self, f: Any, size: int) -> None:
        """Chain to what is on disk (first open, a restart, another writer, or after a failed
        write); a torn last line is terminated and recorded, never chained over."""
        tail = read_tail(f, size)
        self._head = tail.head
        if not tail.torn:
            return
        whole, _problem = parse_entry(tail.torn)
        if whole is not None and (whole["prev"], whole["seq"]) == (
            tail.head.hash,
            tail.head.seq + 1,
        ):
            # Cut short right before its newline: the entry itself is all there.
            log.warning("audit log %s: entry %d lacked its newline", self.path, whole["seq"])
            self._write(f, b"\n")
            self._head = Head(whole["seq"], whole["hash"])
            return
        torn = tail.torn[:-1] if tail.torn.endswith(b"\n") else tail.torn
        number = tail.lines + 1
        log.warning(
            "audit log %s: line %d is torn (%d bytes, a write cut short by a crash); "
            "recording it and chaining to entry %d",
            self.path,
            number,
            len(torn),
            tail.head.seq,
        )
        if not tail.torn.endswith(b"\n"):
            self._write(f, b"\n")
        record = self._next(
            TORN_TAIL,
            "edge-agent",
            "audit",
            None,
            {"line": number, "bytes": len(torn), "sha256": hashlib.sha256(torn).hexdigest()},
            "a write was cut short (crash or full disk); the torn line is kept as it was",
            "ok",
        )
        self._write(f, canonical(record) + b"\n")
        self._head = Head(record["seq"], record["hash"])
        self._emit(record)

    @staticmethod
    def _write(f: Any, data: bytes) -> None:
        # One write of the whole line (O_APPEND): a short write is an error here, not a retry,
        # so a failure can only leave a torn tail, which the next append records.
        written = os.write(f.fileno(), data)
        if written != len(data):
            raise OSError(f"short write ({written} of {len(data)} bytes)")
        os.fsync(f.fileno())


def verify_file(path: Path) -> Verdict:
    return verify_lines(read_lines(path))
