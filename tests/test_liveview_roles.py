"""The live view's roles: one token per role from a hashed file (re-read while running), the
single legacy token as an engineer, and the action endpoints: a role that may not gets 403
and the refusal lands in the audit trail; what it may do goes to the lifecycle handler."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import UserError
from edge_agent.lifecycle import audit, roles
from edge_agent.lifecycle.audit import AuditLog
from edge_agent.ops.liveview import LIFECYCLE_ACTIONS, LiveStore, LiveViewServer

LEGACY = "legacy-token-123"


@dataclass
class Lifecycle:
    """Stands in for Agent.lifecycle_command (H2's, in the agent): records the calls and
    refuses what `refuse` names."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)

    def __call__(
        self, action: str, inspection: str | None, args: Mapping[str, Any], who: str, source: str
    ) -> str | None:
        self.calls.append((action, inspection, dict(args), who, source))
        return self.refuse.get(action)


@dataclass
class Served:
    server: LiveViewServer
    tokens: dict[str, str]
    tokens_file: Path
    audit_path: Path
    lifecycle: Lifecycle


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    tokens = {role: roles.new_token() for role in roles.ROLES}
    path = tmp_path / "tokens"
    path.write_text("".join(roles.token_line(r, t, f"{r}-anna") + "\n" for r, t in tokens.items()))
    lifecycle = Lifecycle()
    log = AuditLog(tmp_path / "audit.jsonl")
    s = LiveViewServer(
        LiveStore(["cam1"]),
        "127.0.0.1",
        0,
        LEGACY,
        tokens_file=path,
        lifecycle=lifecycle,
        audit=log,
    )
    s.start()
    yield Served(s, tokens, path, tmp_path / "audit.jsonl", lifecycle)
    s.stop()


def request(
    server: LiveViewServer,
    method: str,
    path: str,
    token: str | None = None,
    body: Any = None,
    ctype: str = "application/json",
) -> tuple[int, Any]:
    host, port = server.address
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers["Content-Type"] = ctype
    req = urllib.request.Request(
        f"http://{host}:{port}{path}", data=data, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            code, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        code, raw = exc.code, exc.read()
    try:
        return code, json.loads(raw)
    except ValueError:
        return code, raw


def act(s: Served, token: str | None, action: str, **args: Any) -> tuple[int, Any]:
    return request(s.server, "POST", f"/action/{action}", token, args)


def test_each_role_may_do_exactly_its_actions(served: Served) -> None:
    s = served
    for role, token in s.tokens.items():
        code, me = request(s.server, "GET", "/whoami.json", token)
        assert code == 200 and me["role"] == role and me["name"] == f"{role}-anna"
        assert request(s.server, "GET", "/status.json", token)[0] == 200  # every role sees
        for action in LIFECYCLE_ACTIONS:
            before = len(s.lifecycle.calls)
            code, answer = act(s, token, action, inspection="cap", reason="why")
            if roles.allows(role, action):
                assert (code, answer) == (200, {"accepted": True}), (role, action)
                assert s.lifecycle.calls[-1] == (
                    action, "cap", {"reason": "why"}, f"{role}-anna", "liveview",
                )  # fmt: skip
            else:
                assert code == 403, (role, action)
                assert answer["refused"] == roles.refusal(role, action)
                assert len(s.lifecycle.calls) == before  # never reached the agent
    # the single legacy token is an engineer, named as such in the trail
    assert request(s.server, "GET", "/whoami.json", LEGACY)[1]["role"] == "engineer"
    assert act(s, LEGACY, "promote", inspection="cap")[0] == 200
    assert s.lifecycle.calls[-1][3] == "liveview.token"


def test_a_viewer_cannot_teach_or_promote_and_it_is_audited(served: Served) -> None:
    s = served
    for action in ("teach", "promote"):
        code, answer = act(s, s.tokens["viewer"], action, inspection="cap", reason="try")
        assert code == 403 and "needs the engineer role" in answer["refused"]
    entries = list(audit.entries(s.audit_path))
    assert [(e["action"], e["result"], e["who"], e["source"], e["where"]) for e in entries] == [
        ("teach", "refused", "viewer-anna", "liveview", "127.0.0.1"),
        ("promote", "refused", "viewer-anna", "liveview", "127.0.0.1"),
    ]
    assert entries[1]["what"] == {"role": "viewer", "inspection": "cap", "args": {"reason": "try"}}
    assert entries[1]["reason"] == roles.refusal("viewer", "promote")
    assert audit.verify_file(s.audit_path).ok
    assert s.lifecycle.calls == []


def test_the_agents_refusal_and_bad_requests(served: Served) -> None:
    s = served
    eng = s.tokens["engineer"]
    s.lifecycle.refuse["promote"] = "gate failed: 3 confirmed defects would pass"
    assert act(s, eng, "promote", inspection="cap") == (
        409,
        {"refused": "gate failed: 3 confirmed defects would pass"},
    )
    assert act(s, None, "promote")[0] == 401
    assert act(s, "wrong", "promote")[0] == 401
    assert act(s, eng, "format_disk")[0] == 404
    assert request(s.server, "GET", "/action/promote", eng)[0] == 404
    bad = [
        (b"inspection=cap", "application/x-www-form-urlencoded"),  # a cross-site form
        (b"{not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (json.dumps({"inspection": 5}).encode(), "application/json"),
        (json.dumps({"bundle": {"a": 1}}).encode(), "application/json"),
        (b"{" + b" " * 5000 + b"}", "application/json"),
    ]
    for body, ctype in bad:
        code, answer = request(s.server, "POST", "/action/promote", eng, body, ctype)
        assert code == 400 and answer["refused"], body[:20]
    assert all(c[0] != "promote" or c[1] == "cap" for c in s.lifecycle.calls)


def test_tokens_are_added_and_revoked_while_running(served: Served) -> None:
    s = served
    new = roles.new_token()
    assert request(s.server, "GET", "/whoami.json", new)[0] == 401
    with s.tokens_file.open("a") as f:
        f.write(roles.token_line("operator", new, "ben") + "\n")
    os.utime(s.tokens_file, ns=(1, 1))  # a changed file, even within the mtime's granularity
    assert request(s.server, "GET", "/whoami.json", new)[1]["name"] == "ben"
    # a file that turns unreadable lets none of its tokens in (the legacy one still works)
    s.tokens_file.write_text("engineer plain-token anna\n")
    assert request(s.server, "GET", "/whoami.json", new)[0] == 401
    assert request(s.server, "GET", "/whoami.json", s.tokens["engineer"])[0] == 401
    assert request(s.server, "GET", "/whoami.json", LEGACY)[0] == 200


def test_without_tokens_everyone_is_a_viewer(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    lifecycle = Lifecycle()
    s = LiveViewServer(LiveStore(["cam1"]), "127.0.0.1", 0, lifecycle=lifecycle, audit=log)
    s.start()
    try:
        assert request(s, "GET", "/whoami.json")[1]["role"] == "viewer"
        assert request(s, "POST", "/action/confirm", None, {})[0] == 403
        assert lifecycle.calls == []
    finally:
        s.stop()
    assert [e["who"] for e in audit.entries(tmp_path / "audit.jsonl")] == ["anonymous"]


def test_a_refusal_that_cannot_be_audited_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    token = roles.new_token()
    path.write_text(roles.token_line("viewer", token, "v") + "\n")
    lifecycle = Lifecycle()
    s = LiveViewServer(
        LiveStore(["cam1"]),
        "127.0.0.1",
        0,
        tokens_file=path,
        lifecycle=lifecycle,
        audit=AuditLog(Path("/dev/full")),
    )
    s.start()
    try:
        assert request(s, "POST", "/action/promote", token, {})[0] == 403
        assert lifecycle.calls == []
    finally:
        s.stop()


def test_a_broken_tokens_file_stops_the_start_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("engineer s3cret anna\n")
    with pytest.raises(UserError, match=r"^liveview.tokens_file: .*line 1: .*sha256") as info:
        LiveViewServer(LiveStore(["cam1"]), "127.0.0.1", 0, tokens_file=path)
    assert "s3cret" not in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"^liveview.tokens_file: cannot read"):
        LiveViewServer(LiveStore(["cam1"]), "127.0.0.1", 0, tokens_file=tmp_path / "nope")
