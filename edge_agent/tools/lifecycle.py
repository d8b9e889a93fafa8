"""`edge-agent shadow|promote|rollback|confirm`: change the model of a running agent.

    edge-agent shadow start --config C --inspection ID --bundle B
    edge-agent shadow stop  --config C --inspection ID
    edge-agent promote      --config C --inspection ID [--force]
    edge-agent rollback     --config C --inspection ID
    edge-agent confirm      --config C --entry ARCHIVE_ENTRY [--inspection ID]

The CLI reaches the running agent through its broker, with the config's own MQTT settings
(address, TLS, credentials): it publishes the command on ``<prefix>/<line>/lifecycle/set``
with a fresh request id and the OS user as ``who``, and waits for the agent's outcome with
that id on ``<prefix>/<line>/lifecycle``. The agent applies it through the same door as the
live view and OPC UA (Agent.lifecycle_command), audits it and answers ``ok``, ``refused``
(with every reason: each failed gate) or ``failed``. The CLI runs on the agent's machine: the
paths it sends (--bundle, --entry) are the agent's.

Exit status: 0 ok; 1 refused or failed; 2 bad input (one line); 3 no answer in --timeout.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.agent.config import load_config
from edge_agent.errors import UserError
from edge_agent.lifecycle.audit import os_user
from edge_agent.model.bundle import MANIFEST
from edge_agent.publish import contract
from edge_agent.publish.mqtt_settings import MqttSettings, build_ssl_context

NO_ANSWER = 3
DEFAULT_TIMEOUT_S = 120.0  # a shadow start copies and loads a bundle before it answers
FINAL = ("ok", "refused", "failed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    command = p.prog.split()[-1]
    if command == "shadow":
        p.add_argument("what", choices=("start", "stop"), help="start or stop a shadow")
    p.add_argument("--config", type=Path, required=True, metavar="FILE", help="the agent's YAML")
    if command == "confirm":
        p.add_argument(
            "--entry",
            type=Path,
            required=True,
            help="the archive entry (its .json or .jpg) confirmed as a defect",
        )
        p.add_argument("--inspection", help="the inspection it is a defect of, when several")
    else:
        p.add_argument("--inspection", required=True, help="the inspection's id")
    if command == "shadow":
        p.add_argument("--bundle", type=Path, help="shadow start: the candidate bundle folder")
    if command == "promote":
        p.add_argument(
            "--force",
            action="store_true",
            help="promote although gates fail (recorded as forced in the audit trail)",
        )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help="how long to wait for the agent's answer",
    )


def command_payload(args: argparse.Namespace, who: str, request_id: str) -> dict[str, Any]:
    """The lifecycle/set message for the parsed arguments (contract.parse_lifecycle_command)."""
    action = args.command
    body: dict[str, Any] = {"who": who, "request_id": request_id}
    if action == "shadow":
        action = f"shadow_{args.what}"
        if args.what == "start":
            if args.bundle is None:
                raise UserError("shadow start needs --bundle B")
            if not (args.bundle / MANIFEST).is_file():
                raise UserError(f"--bundle {args.bundle}: not a bundle folder (no {MANIFEST})")
            # The agent reads it: a path relative to here means nothing there.
            body["bundle"] = str(args.bundle.resolve())
        elif args.bundle is not None:
            raise UserError("shadow stop takes no --bundle")
    if action == "confirm":
        if not args.entry.with_suffix(".json").is_file():
            raise UserError(f"--entry {args.entry}: no archive entry (no .json sidecar)")
        body["entry"] = str(args.entry.resolve())
    if getattr(args, "inspection", None) is not None:
        body["inspection"] = args.inspection
    if getattr(args, "force", False):
        body["force"] = True
    body["action"] = action
    return body


class _Waiter:
    """Publishes one command and collects the agent's outcomes for its request id."""

    def __init__(self, settings: MqttSettings, request_id: str) -> None:
        self.settings = settings
        self.request_id = request_id
        self.outcomes: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.subscribed = threading.Event()
        self.refused: str | None = None
        s = settings
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{s.client_id}-cli-{request_id[:8]}",
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        if s.username is not None:
            self.client.username_pw_set(s.username, s.password)
        if s.tls:
            self.client.tls_set_context(build_ssl_context(s))
            if s.tls_insecure:
                self.client.tls_insecure_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.topic = contract.line_topic(s.prefix, s.line, contract.LIFECYCLE)
        self.command_topic = contract.line_topic(s.prefix, s.line, *contract.LIFECYCLE_SET)

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.refused = str(reason)
            self.subscribed.set()
            return
        client.subscribe(self.topic, qos=1)

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        try:
            outcome = json.loads(message.payload)
        except ValueError:
            return
        if isinstance(outcome, dict) and outcome.get("request_id") == self.request_id:
            with self.cond:
                self.outcomes.append(outcome)
                self.cond.notify_all()

    def send(self, body: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        s = self.settings
        try:
            self.client.connect(s.host, s.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot reach the MQTT broker {s.address}: {exc}") from None
        self.client.loop_start()
        try:
            if not self.subscribed.wait(min(timeout_s, 10.0)):
                raise UserError(f"the MQTT broker {s.address} did not answer")
            if self.refused is not None:
                raise UserError(f"the MQTT broker {s.address} refused: {self.refused}")
            info = self.client.publish(self.command_topic, json.dumps(body), qos=1)
            info.wait_for_publish(min(timeout_s, 10.0))
            deadline = time.monotonic() + timeout_s
            with self.cond:
                while True:
                    final = next((o for o in self.outcomes if o.get("result") in FINAL), None)
                    left = deadline - time.monotonic()
                    if final is not None or left <= 0:
                        return final
                    self.cond.wait(min(left, 0.5))
        finally:
            self.client.disconnect()
            self.client.loop_stop()


def run(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise UserError(f"--timeout must be more than 0 seconds, got {args.timeout:g}")
    config = load_config(args.config)
    request_id = uuid.uuid4().hex
    body = command_payload(args, os_user(), request_id)
    outcome = _Waiter(config.mqtt, request_id).send(body, args.timeout)
    if outcome is None:
        print(
            f"no answer from the agent within {args.timeout:g} s (is it running with "
            f"shadow.enabled: true, on {config.mqtt.address}?)"
        )
        return NO_ANSWER
    action, result = outcome.get("action"), outcome.get("result")
    where = f" {outcome['inspection']}" if outcome.get("inspection") else ""
    if result == "ok":
        extra = f" (model {outcome['model_id']})" if outcome.get("model_id") else ""
        note = f": {outcome['reason']}" if outcome.get("reason") else ""
        print(f"{action}{where}: ok{extra}{note}")
        return 0
    print(f"{action}{where}: {result}: {outcome.get('reason')}")
    return 1
