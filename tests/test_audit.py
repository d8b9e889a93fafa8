"""The audit trail: the chain catches every removed, altered, reordered or inserted entry (by
brute force over positions and bytes), survives a crash's torn line without chaining over it,
refuses to pretend when the disk fails, and the CLI reports one line with the bad line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import UserError
from edge_agent.lifecycle import audit
from edge_agent.lifecycle.audit import GENESIS, AuditLog, AuditUnavailable, verify_lines
from edge_agent.tools.audit import parse_since, select, table


def chain(n: int) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    prev = GENESIS
    for seq in range(1, n + 1):
        entry = audit.make_entry(
            seq=seq,
            prev=prev,
            time=f"2026-12-06T04:00:{seq:02d}+00:00",
            action="promote" if seq % 2 else "confirm",
            who=f"user{seq}",
            source="cli",
            where="10.0.0.5",
            what={"inspection": "cap", "bundle_before": "a" * 64, "n": seq},
            reason="better on the shadow window",
        )
        entries.append(entry)
        prev = entry["hash"]
    return entries


def lines(entries: list[dict[str, Any]]) -> list[bytes]:
    return [audit.canonical(e) + b"\n" for e in entries]


def test_an_intact_chain_verifies() -> None:
    for n in range(0, 6):
        verdict = verify_lines(lines(chain(n)))
        assert verdict.ok and verdict.entries == n
        assert verdict.head.seq == n


def test_every_removed_altered_reordered_or_inserted_entry_is_found() -> None:
    n = 6
    original = chain(n)
    for k in range(n):  # 0-based position; the bad line is k + 1
        # removed (all but the last: cutting the tail off is what the published copy shows)
        if k < n - 1:
            removed = original[:k] + original[k + 1 :]
            assert verify_lines(lines(removed)).bad_line == k + 1, ("removed", k)
        # altered, hash left as it was
        altered = [dict(e) for e in original]
        altered[k]["who"] = "someone else"
        assert verify_lines(lines(altered)).bad_line == k + 1, ("altered", k)
        # altered and re-hashed: the next entry's prev no longer matches
        if k < n - 1:
            resealed = [dict(e) for e in original]
            resealed[k] = audit.seal({**resealed[k], "reason": "forged"})
            assert verify_lines(lines(resealed)).bad_line == k + 2, ("resealed", k)
        # reordered with its neighbour
        if k < n - 1:
            swapped = list(original)
            swapped[k], swapped[k + 1] = swapped[k + 1], swapped[k]
            assert verify_lines(lines(swapped)).bad_line == k + 1, ("reordered", k)
        # inserted: a copy of an existing entry, and a forged one chained to its predecessor
        copied = [*original[: k + 1], original[k], *original[k + 1 :]]
        assert verify_lines(lines(copied)).bad_line == k + 2, ("copied", k)
        prev = original[k - 1]["hash"] if k else GENESIS
        forged = audit.make_entry(
            seq=k + 1, prev=prev, time="2026-12-06T05:00:00+00:00", action="promote",
            who="mallory", source="cli",
        )  # fmt: skip
        inserted = [*original[:k], forged, *original[k:]]
        assert verify_lines(lines(inserted)).bad_line == k + 2, ("forged", k)


def test_any_changed_byte_is_found_on_its_line() -> None:
    data = lines(chain(3))
    text = b"".join(data)
    starts = [sum(len(x) for x in data[:i]) for i in range(len(data))]
    for pos in range(len(text)):
        line = max(i for i, s in enumerate(starts) if s <= pos) + 1
        for flip in (0x01, 0x20):
            changed = bytearray(text)
            changed[pos] ^= flip
            verdict = verify_lines(bytes(changed).splitlines(keepends=True))
            assert verdict.bad_line == line, (pos, flip, verdict)


def test_a_hand_edited_but_equivalent_line_is_found() -> None:
    data = lines(chain(3))
    data[1] = json.dumps(json.loads(data[1]), indent=None).encode() + b"\n"  # ", " and ": "
    verdict = verify_lines(data)
    assert verdict.bad_line == 2 and "canonical" in (verdict.problem or "")


def test_the_log_chains_restarts_and_concurrent_writers(tmp_path: Path) -> None:
    path = tmp_path / "new" / "audit.jsonl"
    published: list[dict[str, Any]] = []
    first = AuditLog(path, published.append)
    entry = first.record("agent.start", who="edge-agent", source="agent", what={"pid": 1})
    assert entry["seq"] == 1 and entry["prev"] == GENESIS and published == [entry]
    assert path.read_bytes() == audit.canonical(entry) + b"\n"  # the entry is the message
    # A restart (a new AuditLog) and a second writer on the same file (another process:
    # each has its own open file and flock) chain on, whoever wrote last.
    second = AuditLog(path)
    threads = [
        threading.Thread(
            target=lambda log=log: [
                log.record("confirm", who="w", source="test", what={"i": i}) for i in range(25)
            ]
        )
        for log in (first, second, first, second)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    verdict = audit.verify_file(path)
    assert verdict.ok and verdict.entries == 101
    assert [e["seq"] for e in audit.entries(path)] == list(range(1, 102))


def test_a_torn_last_line_is_recorded_never_chained_over(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in range(3):
        log.record("confirm", who="op", source="liveview", what={"i": i})
    torn = audit.canonical(chain(4)[3])[:40]
    with path.open("ab") as f:  # a crash mid-write
        f.write(torn)
    verdict = audit.verify_file(path)
    assert verdict.bad_line == 4 and "unterminated" in (verdict.problem or "")

    published: list[dict[str, Any]] = []
    entry = AuditLog(path, published.append).record("agent.start", who="a", source="agent")
    record = published[0]
    assert record["action"] == audit.TORN_TAIL and record["prev"] == log.head.hash
    assert record["what"]["line"] == 4 and record["what"]["bytes"] == len(torn)
    assert entry["prev"] == record["hash"] and published[1] == entry
    assert path.read_bytes().count(torn + b"\n") == 1  # kept, append-only
    assert audit.verify_file(path).ok

    # without its record the torn line is a bad line
    data = path.read_bytes().splitlines(keepends=True)
    assert verify_lines(data[:4] + data[5:]).bad_line == 4
    # a record naming other bytes does not excuse it
    other = bytearray(data[3])
    other[5] ^= 1
    assert verify_lines([*data[:3], bytes(other), *data[4:]]).bad_line == 4


def test_a_crash_after_terminating_a_torn_line_is_still_recorded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"".join(lines(chain(2))) + b'{"seq":3,"act\n')
    entry = AuditLog(path).record("agent.start", who="a", source="agent")
    assert entry["seq"] == 4
    assert audit.verify_file(path).ok


def test_a_log_that_cannot_be_written_raises_and_the_file_is_untouched(tmp_path: Path) -> None:
    # /dev/full: every write fails with ENOSPC, as a full disk does
    with pytest.raises(AuditUnavailable, match="cannot write audit log"):
        AuditLog(Path("/dev/full")).record("promote", who="x", source="cli")
    with pytest.raises(AuditUnavailable, match="cannot open audit log"):
        AuditLog(tmp_path).record("promote", who="x", source="cli")  # a folder
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.record("confirm", who="x", source="cli")
    before = path.read_bytes()
    with pytest.raises(ValueError):
        log.record("thresholds", who="x", source="cli", what={"image": float("nan")})
    with pytest.raises(ValueError):
        log.record("thresholds", who="", source="cli")
    assert path.read_bytes() == before


def test_an_unconfirmed_write_is_named_in_the_next_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The line reached the file but its fsync failed: the caller refused the command, so
    # the next entry says that this one is void.
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.record("agent.start", who="a", source="agent")
    real_fsync = os.fsync

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(AuditUnavailable):
        log.record("promote", who="eng", source="cli")
    monkeypatch.setattr(os, "fsync", real_fsync)
    log.record("rollback", who="eng", source="cli")
    got = list(audit.entries(path))
    assert [e["action"] for e in got] == ["agent.start", "promote", audit.UNCONFIRMED, "rollback"]
    assert got[2]["what"] == {"seq": 2, "hash": got[1]["hash"]}
    assert audit.verify_file(path).ok


def test_a_failing_publisher_does_not_fail_the_record(tmp_path: Path) -> None:
    def broken(entry: dict[str, Any]) -> None:
        raise ConnectionError("broker gone")

    entry = AuditLog(tmp_path / "a.jsonl", broken).record("confirm", who="x", source="cli")
    assert entry["seq"] == 1
    memory: list[dict[str, Any]] = []
    log = AuditLog(None, memory.append)
    log.record("a", who="x", source="y")
    log.record("b", who="x", source="y")
    assert verify_lines(lines(memory)).ok


def test_since_takes_an_iso_time_or_a_duration() -> None:
    now = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)
    assert parse_since("15m", now) == now - timedelta(minutes=15)
    assert parse_since("2d", now) == now - timedelta(days=2)
    assert parse_since("1.5h", now) == now - timedelta(minutes=90)
    assert parse_since("2026-12-06T08:00+00:00", now) == now - timedelta(hours=4)
    assert parse_since("2026-12-06T08:00", now).tzinfo is not None
    for bad in ("yesterday", "15", "-5m", ""):
        with pytest.raises(UserError, match="--since"):
            parse_since(bad, now)
    entries = chain(5)
    since = datetime(2026, 12, 6, 4, 0, 3, tzinfo=timezone.utc)
    assert [e["seq"] for e in select(entries, since, None)] == [3, 4, 5]
    assert [e["seq"] for e in select(entries, None, "confirm")] == [2, 4]
    assert table([]) == "no entries\n"
    text = table(entries)
    assert text.splitlines()[0].split() == ["time", "seq", "action", "result", "who", "source",
                                            "where", "what", "reason"]  # fmt: skip
    assert len(text.splitlines()) == 6


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "audit", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_verify_and_show(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"".join(lines(chain(4))))
    ok = _cli("verify", "--path", str(path))
    assert ok.returncode == 0 and "4 entries, chain intact" in ok.stdout

    data = lines(chain(4))
    data[1], data[2] = data[2], data[1]
    path.write_bytes(b"".join(data))
    bad = _cli("verify", "--path", str(path))
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"edge-agent: error: {path}: line 2: prev does not match the entry before "
        "(removed, inserted or reordered)"
    ]

    missing = _cli("verify", "--path", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1

    path.write_bytes(b"".join(lines(chain(4))))
    shown = _cli("show", "--path", str(path), "--since", "2026-12-06T04:00:03+00:00", "--json")
    assert shown.returncode == 0
    assert [json.loads(x)["seq"] for x in shown.stdout.splitlines()] == [3, 4]
    bad_since = _cli("show", "--path", str(path), "--since", "soon")
    assert bad_since.returncode == 2 and "Traceback" not in bad_since.stderr


def test_a_crash_at_any_byte_of_a_write_is_recovered(tmp_path: Path) -> None:
    # Every place a write can be cut short, by brute force: the next writer records the torn
    # line and the chain verifies; a whole last entry is chained to as it is.
    whole = b"".join(lines(chain(3)))
    start = whole.rindex(b"\n", 0, len(whole) - 1) + 1  # the last entry's first byte
    for cut in range(start, len(whole) + 1):
        path = tmp_path / f"cut{cut}.jsonl"
        path.write_bytes(whole[:cut])
        entry = AuditLog(path).record("agent.start", who="a", source="agent")
        verdict = audit.verify_file(path)
        assert verdict.ok, (cut, verdict)
        got = list(audit.entries(path))
        # nothing of the entry, or all of it but its newline: nothing torn
        whole_or_none = cut in (start, len(whole) - 1, len(whole))
        torn = [e for e in got if e["action"] == audit.TORN_TAIL]
        assert len(torn) == (0 if whole_or_none else 1), cut
        assert entry == got[-1] and entry["seq"] == len(got)
