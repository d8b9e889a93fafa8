"""Roles: the permission table as the issue states it, tokens and passwords stored only hashed,
and the CLI that hands them out."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.lifecycle import roles
from tests.brokers import Broker

NOT_AUTHORIZED = 135  # MQTT 5 reason code

# The issue's table, written out by hand: the code's table must say the same.
SPEC = {
    "viewer": {"see", "trigger"},
    "operator": {"see", "trigger", "confirm", "acknowledge"},
    "engineer": set(roles.ACTIONS),
}


def test_the_permission_table_is_the_issues() -> None:
    assert roles.ROLES == ("viewer", "operator", "engineer")
    assert set(roles.ACTIONS) == {
        "see", "trigger", "confirm", "acknowledge", "teach", "shadow_start", "shadow_stop",
        "promote", "rollback", "recipe", "thresholds",
    }  # fmt: skip
    for role in roles.ROLES:
        for action in roles.ACTIONS:
            assert roles.allows(role, action) == (action in SPEC[role]), (role, action)
        assert set(roles.permissions(role)) == SPEC[role]
    # each role may do what the ones below it may
    for lower, higher in zip(roles.ROLES, roles.ROLES[1:], strict=False):
        assert SPEC[lower] < SPEC[higher]


def test_unknown_roles_and_actions_are_refused() -> None:
    for role in (None, "", "admin", "Engineer"):
        assert not any(roles.allows(role, a) for a in roles.ACTIONS)
    assert not roles.allows("engineer", "format_disk")
    assert "needs the engineer role" in roles.refusal("viewer", "promote")
    assert "unknown action" in roles.refusal("engineer", "format_disk")
    with pytest.raises(ValueError, match="unknown role"):
        roles.rank("admin")


def test_refusals_are_named_as_the_agent_names_the_action() -> None:
    assert roles.audit_action("shadow_start") == "shadow.start"
    assert roles.audit_action("recipe") == "recipe.change"
    assert roles.audit_action("promote") == "promote"


def test_tokens_are_stored_hashed_and_matched() -> None:
    tokens = {role: roles.new_token() for role in roles.ROLES}
    text = "# holders\n\n" + "\n".join(
        roles.token_line(role, token, f"{role}-1") for role, token in tokens.items()
    )
    assert all(token not in text for token in tokens.values())
    entries = roles.parse_tokens(text)
    for role, token in tokens.items():
        found = roles.match_token(token, entries)
        assert found is not None and (found.role, found.name) == (role, f"{role}-1")
    assert roles.match_token("not-a-token", entries) is None
    assert roles.match_token(tokens["viewer"][:-1], entries) is None
    # one token listed twice: the lower role wins
    twice = roles.parse_tokens(roles.token_line("engineer", tokens["viewer"], "e") + "\n" + text)
    found = roles.match_token(tokens["viewer"], twice)
    assert found is not None and found.role == "viewer"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("engineer s3cret anna", "stored as sha256"),
        ("engineer sha256:" + "0" * 63 + " anna", "stored as sha256"),
        ("admin sha256:" + "0" * 64 + " anna", "unknown role 'admin'"),
        ("engineer sha256:" + "0" * 64, "expected"),
        ("engineer sha256:" + "0" * 64 + " a/b", "name 'a/b'"),
    ],
)
def test_a_bad_tokens_line_names_its_line(line: str, problem: str) -> None:
    with pytest.raises(ValueError, match=rf"^line 2: .*{problem}"):
        roles.parse_tokens("# ok\n" + line)


def test_passwords_are_scrypt_hashed_and_checked() -> None:
    stored = roles.hash_password("correct horse", n=2**10)
    assert "correct horse" not in stored and stored.startswith("scrypt$1024$8$1$")
    assert roles.check_password_hash(stored) == stored
    assert roles.verify_password("correct horse", stored)
    for wrong in ("correct hors", "Correct horse", "", "correct horse "):
        assert not roles.verify_password(wrong, stored)
    assert stored != roles.hash_password("correct horse", n=2**10)  # salted
    bad_forms = (
        "",
        "correct horse",
        "scrypt$1024$8$1$",
        stored.replace("scrypt", "md5"),
        stored.replace("$1024$", "$1000$"),  # not a power of 2
        stored.replace("$1024$", f"${2**22}$"),  # a login costing gigabytes
    )
    for bad in bad_forms:
        assert not roles.verify_password("correct horse", bad)
        with pytest.raises(ValueError):
            roles.check_password_hash(bad)


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_liveview_token_cli_adds_lists_and_revokes(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    added = _cli(
        "liveview-token", "add", "--file", str(path), "--role", "operator", "--name", "anna"
    )
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert len(token) >= 40 and token not in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    entry = roles.match_token(token, roles.parse_tokens(path.read_text()))
    assert entry is not None and (entry.role, entry.name) == ("operator", "anna")
    _cli("liveview-token", "add", "--file", str(path), "--role", "engineer", "--name", "ben")
    listed = _cli("liveview-token", "list", "--file", str(path))
    assert listed.stdout.splitlines() == ["anna\toperator", "ben\tengineer"]
    revoked = _cli("liveview-token", "revoke", "--file", str(path), "--name", "anna")
    assert revoked.returncode == 0
    assert roles.match_token(token, roles.parse_tokens(path.read_text())) is None
    assert len(roles.parse_tokens(path.read_text())) == 1
    bad = _cli("liveview-token", "add", "--file", str(path), "--role", "operator", "--name", "a b")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_opcua_user_cli_prints_a_hashed_entry() -> None:
    out = _cli("opcua-user", "add", "--name", "plc", "--role", "operator", "--password-stdin",
               stdin="long enough\n")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "long enough" not in out.stdout
    stored = out.stdout.split('password_hash: "')[1].split('"')[0]
    assert roles.verify_password("long enough", stored)
    short = _cli("opcua-user", "add", "--name", "plc", "--role", "viewer", "--password-stdin",
                 stdin="short\n")  # fmt: skip
    assert short.returncode == 2 and "at least" in short.stderr


# -- the Mosquitto ACL example ----------------------------------------------------------------

ACL = Path(__file__).resolve().parents[1] / "docs" / "mosquitto-acl.example"


class AclBroker(Broker):
    """tests/brokers.py's broker with docs/mosquitto-acl.example on its password listener."""

    def _config(self) -> str:
        # the password listener's block is the last one (no certificates): the ACL joins it
        return super()._config() + f"acl_file {ACL}\n"


def _client(broker: Broker, user: str, n: int = 0) -> mqtt.Client:
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"acl-test-{user}-{n}",
        protocol=mqtt.MQTTv5,
    )
    client.username_pw_set(user, f"{user}-pw")
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    assert broker.auth_port is not None
    client.connect("127.0.0.1", broker.auth_port)
    client.loop_start()
    assert connected.wait(5)
    return client


def _publish_code(broker: Broker, user: str, topic: str) -> int:
    """The broker's PUBACK reason code for `user`'s QoS 1 publish on `topic` (MQTT 5: 135 =
    not authorized), from a connection of its own (Mosquitto 2.0 may close one after a
    refusal)."""
    codes: list[int] = []
    done = threading.Event()

    def on_publish(_c: Any, _u: Any, _mid: int, reason: Any, _p: Any) -> None:
        codes.append(reason.value)
        done.set()

    client = _client(broker, user, next(_CONNECTIONS))
    client.on_publish = on_publish
    try:
        client.publish(topic, b'{"action": "promote", "inspection": "cap"}', qos=1)
        assert done.wait(5)
    finally:
        client.loop_stop()
        client.disconnect()
    return codes[0]


_CONNECTIONS = itertools.count(1)


def test_the_acl_example_keeps_a_viewer_from_commanding(tmp_path: Path) -> None:
    users = ["edge-agent-line1", "plc-line1", "viewer-anna", "operator-ben", "engineer-cleo"]
    command = "edge-agent/line1/lifecycle/set"
    recipe = "edge-agent/line1/recipe/set"
    with AclBroker(tmp_path / "broker", users={u: f"{u}-pw" for u in users}) as broker:
        agent = _client(broker, "edge-agent-line1")
        got: list[str] = []
        subscribed = threading.Event()
        agent.on_message = lambda _c, _u, m: got.append(m.topic)
        agent.on_subscribe = lambda *_a: subscribed.set()
        agent.subscribe([(command, 1), (recipe, 1)])
        assert subscribed.wait(5)
        try:
            for user in ("viewer-anna", "operator-ben", "plc-line1"):
                assert _publish_code(broker, user, command) == NOT_AUTHORIZED, user
            for user in ("viewer-anna", "operator-ben"):
                assert _publish_code(broker, user, recipe) == NOT_AUTHORIZED, user
                assert _publish_code(broker, user, "edge-agent/line1/cam1/trigger") == (
                    NOT_AUTHORIZED
                )
            assert _publish_code(broker, "engineer-cleo", command) == 0
            assert _publish_code(broker, "plc-line1", recipe) == 0
            deadline = time.monotonic() + 5
            while len(got) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)  # anything refused would have arrived by now too
            # only the engineer's command and the PLC's recipe reached the agent
            assert sorted(got) == [command, recipe]
        finally:
            agent.loop_stop()
            agent.disconnect()
