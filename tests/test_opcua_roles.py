"""OPC UA roles: users with hashed passwords mapped to roles, anonymous clients as viewers,
every method call checked against the caller's role (BadUserAccessDenied, audited), and the
Lifecycle methods handing the caller's name to the agent's lifecycle handler."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua

from edge_agent.agent.config import load_config
from edge_agent.errors import UserError
from edge_agent.lifecycle import audit, roles
from edge_agent.lifecycle.audit import AuditLog
from edge_agent.publish.opcua import LIFECYCLE_METHODS, OpcUaServer
from edge_agent.publish.opcua_config import OpcUaModel
from tests.test_opcua import NS, Triggers, free_port, settings

PASSWORDS = {role: f"{role}-password" for role in roles.ROLES}
USERS = [
    {"name": f"{role}-1", "role": role, "password_hash": roles.hash_password(pw, n=2**10)}
    for role, pw in PASSWORDS.items()
]
LEGACY = ("plc", "legacy-password")


@dataclass
class Lifecycle:
    """Stands in for Agent.lifecycle_command (H2's, in the agent)."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)

    def __call__(
        self, action: str, inspection: str | None, args: Mapping[str, Any], who: str, source: str
    ) -> str | None:
        self.calls.append((action, inspection, dict(args), who, source))
        return self.refuse.get(action)


@dataclass
class Served:
    server: OpcUaServer
    lifecycle: Lifecycle
    triggers: Triggers
    audit_path: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("opcua-roles")
    (tmp / "pw").write_text(LEGACY[1])
    opts = settings(tmp, users=USERS, username=LEGACY[0], password_file="pw")
    lifecycle, triggers = Lifecycle(), Triggers()
    server = OpcUaServer(opts, triggers, audit=AuditLog(tmp / "audit.jsonl"))
    server.set_lifecycle_handler(lifecycle)
    server.start(["cam"], "model-a")
    yield Served(server, lifecycle, triggers, tmp / "audit.jsonl")
    server.stop()


async def call(client: Client, idx: int, obj: str, method: str, *args: Any) -> tuple[int, list]:
    """A method through the Call service itself: its status and outputs both."""
    request = ua.CallMethodRequest()
    request.ObjectId = ua.NodeId(obj, idx)
    request.MethodId = ua.NodeId(f"{obj}.{method}", idx)
    request.InputArguments = [a if isinstance(a, ua.Variant) else ua.Variant(a) for a in args]
    (result,) = await client.uaclient.call([request])
    return result.StatusCode.value, [v.Value for v in result.OutputArguments or []]


def session(server: OpcUaServer, user: str | None, password: str | None, body: Any) -> None:
    async def main() -> None:
        client = Client(server.settings.endpoint, timeout=5, watchdog_intervall=10.0)
        client.application_uri = "urn:test:scada"
        if user is not None:
            client.set_user(user)
            client.set_password(password or "")
        async with client:
            await body(client, await client.get_namespace_index(NS))

    asyncio.run(main())


def lifecycle_args(method: str) -> list[str]:
    extra = LIFECYCLE_METHODS[method][1]
    return ["cap", *(f"{name.lower()}-value" for name in extra), "a note"]


def test_each_role_calls_exactly_its_methods_and_refusals_are_audited(served: Served) -> None:
    s = served
    logins = [(u["name"], u["role"], PASSWORDS[u["role"]]) for u in USERS]
    logins.append((LEGACY[0], "engineer", LEGACY[1]))  # the legacy user: an engineer
    expected_refusals = []
    for name, role, password in logins:

        async def body(client: Client, idx: int, name: str = name, role: str = role) -> None:
            for method, (action, extra) in LIFECYCLE_METHODS.items():
                before = len(s.lifecycle.calls)
                code, out = await call(client, idx, "EdgeAgent.Lifecycle", method,
                                       *lifecycle_args(method))  # fmt: skip
                if roles.allows(role, action):
                    assert (code, out) == (ua.StatusCodes.Good, [""]), (name, method)
                    args = {n.lower(): f"{n.lower()}-value" for n in extra}
                    args["reason"] = "a note"
                    assert s.lifecycle.calls[-1] == (action, "cap", args, name, "opcua")
                else:
                    assert code == ua.StatusCodes.BadUserAccessDenied, (name, method)
                    assert out == [roles.refusal(role, action)]
                    assert len(s.lifecycle.calls) == before
                    expected_refusals.append((action, name, role, method))
            # SelectRecipe is an engineer's; Trigger (the PLC handshake) anyone's
            code, out = await call(client, idx, "EdgeAgent.Recipe", "SelectRecipe", "a",
                                   ua.Variant(0, ua.VariantType.Int32))  # fmt: skip
            if roles.allows(role, "recipe"):
                assert code == ua.StatusCodes.BadInvalidState  # no recipe handler: not refused
            else:
                assert code == ua.StatusCodes.BadUserAccessDenied
                expected_refusals.append(("recipe", name, role, "SelectRecipe"))
            code, _ = await call(client, idx, "EdgeAgent.cam", "Trigger", f"P-{name}")
            assert code == ua.StatusCodes.Good
            assert s.triggers.calls[-1] == ("cam", f"P-{name}")

        session(s.server, name, password, body)

    entries = list(audit.entries(s.audit_path))
    assert [(e["action"], e["who"], e["what"]["role"], e["what"]["method"]) for e in entries] == [
        (roles.audit_action(action), *rest) for action, *rest in expected_refusals
    ]
    assert all(e["result"] == "refused" and e["source"] == "opcua" for e in entries)
    assert all(e["where"] == "urn:test:scada" for e in entries)
    assert audit.verify_file(s.audit_path).ok


def test_wrong_passwords_and_names_get_no_session(served: Served) -> None:
    async def main() -> None:
        url = served.server.settings.endpoint
        for user, password in (
            ("engineer-1", "viewer-password"),  # another user's password
            ("engineer-1", ""),
            ("nobody", "engineer-password"),
            (LEGACY[0], PASSWORDS["engineer"]),
        ):
            client = Client(url, timeout=5)
            client.set_user(user)
            client.set_password(password)
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await client.connect()
            client.disconnect_socket()
        with pytest.raises(ua.uaerrors.BadIdentityTokenRejected):
            await Client(url, timeout=5).connect()  # anonymous: logins are configured

    asyncio.run(main())


def test_the_agents_refusal_and_bad_arguments(served: Served) -> None:
    s = served
    s.lifecycle.refuse["promote"] = "gate failed: would-be false rejects 4% > 1%"

    async def body(client: Client, idx: int) -> None:
        obj = "EdgeAgent.Lifecycle"
        code, out = await call(client, idx, obj, "Promote", "cap", "")
        assert (code, out) == (ua.StatusCodes.BadInvalidState, [s.lifecycle.refuse["promote"]])
        assert s.lifecycle.calls[-1][:3] == ("promote", "cap", {})  # "" Note: none given
        before = len(s.lifecycle.calls)
        assert (await call(client, idx, obj, "Promote", "cap"))[0] == (
            ua.StatusCodes.BadArgumentsMissing
        )
        assert (await call(client, idx, obj, "Promote", "cap", "n", "x"))[0] == (
            ua.StatusCodes.BadTooManyArguments
        )
        code, out = await call(client, idx, obj, "Promote", ua.Variant(5, ua.VariantType.Int32), "")
        assert code == ua.StatusCodes.BadInvalidArgument and "Inspection" in out[0]
        # on another object: Part 4's BadMethodInvalid, the handler not reached
        request = ua.CallMethodRequest()
        request.ObjectId = ua.NodeId("EdgeAgent.Recipe", idx)
        request.MethodId = ua.NodeId("EdgeAgent.Lifecycle.Promote", idx)
        request.InputArguments = [ua.Variant("cap"), ua.Variant("")]
        (result,) = await client.uaclient.call([request])
        assert result.StatusCode.value == ua.StatusCodes.BadMethodInvalid
        assert len(s.lifecycle.calls) == before

    session(s.server, "engineer-1", PASSWORDS["engineer"], body)
    s.lifecycle.refuse.clear()


def test_anonymous_clients_are_viewers(tmp_path: Path) -> None:
    lifecycle = Lifecycle()
    server = OpcUaServer(
        settings(tmp_path, allow_anonymous=True), Triggers(), audit=AuditLog(tmp_path / "a.jsonl")
    )
    server.set_lifecycle_handler(lifecycle)
    server.start(["cam"], "model-a")
    try:

        async def body(client: Client, idx: int) -> None:
            for method in LIFECYCLE_METHODS:
                code, _ = await call(client, idx, "EdgeAgent.Lifecycle", method,
                                     *lifecycle_args(method))  # fmt: skip
                assert code == ua.StatusCodes.BadUserAccessDenied
            assert (await call(client, idx, "EdgeAgent.cam", "Trigger", "P1"))[0] == 0

        session(server, None, None, body)
    finally:
        server.stop()
    assert lifecycle.calls == []
    assert {e["who"] for e in audit.entries(tmp_path / "a.jsonl")} == {"anonymous"}


def test_users_config(tmp_path: Path) -> None:
    def load(**values: Any) -> OpcUaModel:
        raw = {"enabled": True, "endpoint": f"opc.tcp://127.0.0.1:{free_port()}/x/", **values}
        return OpcUaModel.model_validate(raw, context={"base": tmp_path})

    assert [u.role for u in load(users=USERS).users] == list(roles.ROLES)

    def problem(**values: Any) -> str:
        # JSON is YAML, and has no aliases for a dict given twice
        config = {"bundle": "b", "cameras": [{"id": "c", "source": "x"}]}
        config["opcua"] = {"enabled": True, **values}
        path = tmp_path / "c.yaml"
        path.write_text(json.dumps(config))
        with pytest.raises(UserError) as info:
            load_config(path)
        return str(info.value).split(": ", 1)[1]

    plain = {**USERS[0], "password_hash": "s3cret"}
    message = problem(users=[plain])
    assert message.startswith("opcua.users[0].password_hash: must be scrypt$")
    assert "s3cret" not in message
    assert problem(users=[{**USERS[0], "role": "admin"}]).startswith(
        "opcua.users[0].role: must be one of viewer, operator, engineer"
    )
    assert problem(users=[USERS[0], USERS[0]]).startswith("opcua.users[1].name: ")
    assert problem(users=USERS, allow_anonymous=True) == (
        "opcua.allow_anonymous: anonymous access is refused when users are set"
    )
    same = {**USERS[0], "name": "plc"}
    assert problem(users=[same], username="plc", password="pw").startswith("opcua.users[0].name")
