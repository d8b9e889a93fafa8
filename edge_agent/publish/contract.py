"""MQTT contract v1, in one place: topics, QoS and retain flags, and every payload the agent
publishes or accepts (docs/integrators/mqtt.md documents it for PLC/SCADA integrators).

Pure functions and constants: no network, no threads. The publisher moves these bytes; the
agent decides what goes into them. Fields may be added within v1; an incompatible change gets
new schema names (``edge-agent/verdict/v2``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_agent.decide.decision import ERROR, Decision
from edge_agent.station.commands import json_command

VERSION = "v1"
VERDICT_SCHEMA = "edge-agent/verdict/v1"
HEALTH_SCHEMA = "edge-agent/health/v1"

# Topic leaves under <prefix>/<line>/<camera>/
VERDICT = "verdict"  # agent -> subscribers, QoS 1, not retained, every frame, in order
STATUS = "status"  # agent -> subscribers, QoS 1, retained; the connection's last will
HEALTH = "health"  # agent -> subscribers, QoS 0, retained, latest only
TRIGGER = "trigger"  # PLC -> agent, QoS 1; retained triggers are ignored
# The line's own topics, <prefix>/<line>/<leaf> (docs/integrators/station.md).
PART = "part"  # agent -> PLC, QoS 1, not retained: one per part, in trigger order
RECIPE = "recipe"  # agent -> subscribers, QoS 1, retained: the active recipe, the last change
RECIPE_SET = ("recipe", "set")  # PLC -> agent, QoS 1: select a recipe; retained ones ignored
PART_SCHEMA = "edge-agent/part/v1"
RECIPE_SCHEMA = "edge-agent/recipe/v1"
# Changing a model on the running line (docs/model-engineers/lifecycle.md).
SHADOW = "shadow"  # agent -> subscribers, QoS 1, retained: each shadow's comparison so far
LIFECYCLE = "lifecycle"  # agent -> subscribers, QoS 1: each command's outcome
LIFECYCLE_SET = ("lifecycle", "set")  # engineer/operator -> agent, QoS 1; retained ignored
AUDIT = "audit"  # agent -> subscribers, QoS 1: each audit entry (lifecycle/audit.py)
SHADOW_SCHEMA = "edge-agent/shadow/v1"
LIFECYCLE_SCHEMA = "edge-agent/lifecycle/v1"
LIFECYCLE_ACTIONS = ("shadow_start", "shadow_stop", "promote", "rollback", "confirm")
LIFECYCLE_RESULTS = ("accepted", "ok", "refused", "failed")  # accepted: the loop applies it
MAX_LIFECYCLE_BYTES = 4096
MAX_LIFECYCLE_TEXT = 1024  # a path, a name or a request id

VERDICT_QOS = 1
STATUS_QOS = 1
HEALTH_QOS = 0
TRIGGER_QOS = 1

ONLINE = b"online"
OFFLINE = b"offline"

# ERROR (imported from decision, beside OK and NG) is the verdict of a frame that could not be
# inspected or whose score was not a finite number; subscribers treat it as a reject.
MAX_PART_ID = 256
MAX_TRIGGER_BYTES = 4096  # a trigger payload, JSON included; longer ones are refused unread


def topic(prefix: str, line: str, camera: str, leaf: str) -> str:
    """``<prefix>/<line>/<camera>/<leaf>``."""
    return f"{prefix}/{line}/{camera}/{leaf}"


def line_topic(prefix: str, line: str, *leaf: str) -> str:
    """``<prefix>/<line>/<leaf...>``: the station's topics, one per line, not per camera."""
    return "/".join((prefix, line, *leaf))


def verdict_message(
    decision: Decision | None,
    *,
    camera: str,
    sequence: int,
    frame_id: str,
    captured_at: float,
    decided_at: float,
    model_id: str,
    part_id: str | None = None,
    source: str | None = None,
    reject_image: str | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The verdict payload (``edge-agent/verdict/v1``).

    With `decision` None the frame could not be inspected: verdict ERROR and the `error`
    string; score, normalised_score and threshold are null and regions empty. A decision
    whose verdict is ERROR (a non-finite score) is sent the same way, with its own reason.
    `source` (the file name of a file/folder camera's frame) is present only when known.
    """
    msg: dict[str, Any] = {
        "schema": VERDICT_SCHEMA,
        "timestamp": round(captured_at * 1000),
        "camera": camera,
        "sequence": int(sequence),
        "frame_id": frame_id,
        "part_id": part_id,
        "verdict": ERROR,
        "score": None,
        "normalised_score": None,
        "threshold": None,
        "regions": [],
        "latency_ms": round(max(0.0, decided_at - captured_at) * 1000.0, 2),
        "model_id": model_id,
        "reject_image": reject_image,
        "delayed": False,
    }
    if source is not None:
        msg["source"] = source
    msg.update(_answer(decision, error, "frame could not be inspected"))
    return msg


def _answer(decision: Decision | None, error: str | None, unknown: str) -> dict[str, Any]:
    """A decision's fields (verdict, score, normalised_score, threshold, regions), or, without
    one or with a non-finite score, ERROR with the reason in `error` (`unknown` if none)."""
    if decision is None or decision.verdict == ERROR:
        reason = error if decision is None else decision.error
        return {"verdict": ERROR, "error": reason or unknown}
    return {
        "verdict": decision.verdict,
        "score": _finite(decision.score),
        "normalised_score": _finite(decision.normalised_score),
        "threshold": _finite(decision.threshold),
        "regions": [r.as_dict() for r in decision.regions],
    }


def inspection_message(
    inspection: str, camera: str, decision: Decision | None, error: str | None = None
) -> dict[str, Any]:
    """One inspection's result, as a frame's ``inspections[]`` and a part's carry it: the v1
    verdict's fields for this inspection alone, regions in frame pixels (the caller shifts a
    ROI's), ``error`` only on ERROR."""
    msg: dict[str, Any] = {
        "id": inspection,
        "camera": camera,
        "verdict": ERROR,
        "score": None,
        "normalised_score": None,
        "threshold": None,
        "regions": [],
    }
    msg.update(_answer(decision, error, "not inspected"))
    return msg


def part_message(part: Mapping[str, Any], decided_at: float) -> dict[str, Any]:
    """``edge-agent/part/v1``: part_id, recipe, verdict (the worst), inspections[], missing[]
    (station.part.Part.verdict_message), stamped with when it was decided."""
    return {"schema": PART_SCHEMA, "timestamp": round(decided_at * 1000), **part}


def recipe_message(
    *,
    active: str,
    number: int,
    result: str,
    reason: str | None,
    request_id: str | None,
    changed_at: float,
) -> dict[str, Any]:
    """``edge-agent/recipe/v1``, retained: the active recipe and the outcome of the last
    command (``result``: ok, refused or loading, with its reason)."""
    return {
        "schema": RECIPE_SCHEMA,
        "active": active,
        "number": number,
        "result": result,
        "reason": reason,
        "request_id": request_id,
        "changed_at": round(changed_at * 1000),
    }


def shadow_message(timestamp: float, shadows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """``edge-agent/shadow/v1``, retained: one entry per inspection a candidate shadows (or
    shadowed last), each with its comparison (lifecycle/shadow.py ShadowStats.report)."""
    return {"schema": SHADOW_SCHEMA, "timestamp": round(timestamp * 1000), "shadows": shadows}


def lifecycle_message(
    *,
    action: str,
    inspection: str | None,
    result: str,
    reason: str | None,
    request_id: str | None,
    who: str,
    timestamp: float,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``edge-agent/lifecycle/v1``: a command's outcome. ``accepted`` first when the loop
    still has to apply it, then ``ok``, ``refused`` (with every reason, e.g. each failed
    gate) or ``failed``."""
    return {
        "schema": LIFECYCLE_SCHEMA,
        "timestamp": round(timestamp * 1000),
        "action": action,
        "inspection": inspection,
        "result": result,
        "reason": reason,
        "request_id": request_id,
        "who": who,
        **(dict(details) if details else {}),
    }


def parse_lifecycle_command(
    payload: bytes,
) -> tuple[str, str | None, dict[str, Any], str] | str:
    """``{"action": "promote", "inspection": "top", "who": "alice", "request_id": "r1",
    "force": false}`` (``bundle`` for shadow_start, ``entry`` for confirm) -> (action,
    inspection, args, who), else the reason it is refused. ``who`` is what the sender claims
    (the broker's ACL is what authenticates it)."""
    known = ("action", "inspection", "who", "request_id", "bundle", "entry", "force")
    data = json_command(payload, MAX_LIFECYCLE_BYTES, known)
    if isinstance(data, str):
        return data
    action = data.get("action")
    if action not in LIFECYCLE_ACTIONS:
        return f"action must be one of {', '.join(LIFECYCLE_ACTIONS)}, got {action!r}"
    for key in ("inspection", "who", "request_id", "bundle", "entry"):
        value = data.get(key)
        if value is not None and (
            not isinstance(value, str)
            or not value.strip()
            or len(value) > MAX_LIFECYCLE_TEXT
            or not value.isprintable()
        ):
            return f"{key} must be printable text of at most {MAX_LIFECYCLE_TEXT} characters"
    force = data.get("force", False)
    if not isinstance(force, bool):
        return "force must be true or false"
    args = {k: data[k] for k in ("request_id", "bundle", "entry") if data.get(k) is not None}
    if force:
        args["force"] = True
    return action, data.get("inspection"), args, data.get("who") or "unknown"


def health_message(
    *,
    camera: str,
    timestamp: float,
    fps: float,
    frames_in: int,
    dropped: int,
    inspected: int,
    ng: int,
    errors: int,
    discarded: int,
    queue_depth: int,
    spool: int,
    connected: bool,
    finished: bool,
    last_error: str | None,
    model_id: str,
    device: str | None,
    uptime_s: float,
    nonfinite_scores: int = 0,
    threshold_override_out_of_range: bool = False,
    triggers_dropped: int = 0,
    triggers_rejected: int = 0,
    drift: dict[str, Any] | None = None,
    aspect_mismatch: str | None = None,
    recipe: str | None = None,
) -> dict[str, Any]:
    """The retained health payload (``edge-agent/health/v1``) of one camera.

    `nonfinite_scores`: frames whose score was NaN or infinite (answered ERROR): a model that
    has gone bad. `threshold_override_out_of_range`: a config threshold lies far outside the
    bundle's calibrated score range. `triggers_dropped`: triggers discarded because too many
    were waiting for a frame; `triggers_rejected`: trigger messages without a usable part id.
    `drift`: the drift check's window (decide/drift.py DriftState.as_dict: frames,
    ok_median, shift, ng_rate, alarm, reason), null without calibrated good scores.
    `aspect_mismatch`: why the camera's frames have another aspect ratio than the images the
    model was fitted on (they are still scored), else null. `recipe`: the active recipe
    (docs/integrators/station.md; "default" for a config with a top-level bundle). All seven
    were added within v1; `model_id` and `device` are the camera's first inspection's.
    """
    return {
        "schema": HEALTH_SCHEMA,
        "timestamp": round(timestamp * 1000),
        "camera": camera,
        "fps": round(fps, 2),
        "frames_in": frames_in,
        "dropped": dropped,
        "inspected": inspected,
        "ng": ng,
        "errors": errors,
        "discarded": discarded,
        "queue_depth": queue_depth,
        "spool": spool,
        "connected": connected,
        "finished": finished,
        "last_error": last_error,
        "model_id": model_id,
        "device": device,
        "uptime_s": round(uptime_s, 1),
        "nonfinite_scores": nonfinite_scores,
        "threshold_override_out_of_range": threshold_override_out_of_range,
        "triggers_dropped": triggers_dropped,
        "triggers_rejected": triggers_rejected,
        "drift": drift,
        "aspect_mismatch": aspect_mismatch,
        "recipe": recipe,
    }


def encode_json(obj: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON, numpy values converted."""
    return json.dumps(obj, separators=(",", ":"), default=_json_default).encode()


def mark_delayed(payload: bytes) -> bytes:
    """The verdict JSON with ``"delayed": true`` (payloads that are not JSON objects as-is):
    a verdict that waited in the spool says so when it is finally sent."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(obj, dict):
        return payload
    obj["delayed"] = True
    return encode_json(obj)


def parse_part_id(payload: bytes) -> str | None:
    """A trigger payload: a plain-text part id or JSON ``{"part_id": ...}``; None if unusable.

    A part id is echoed into every verdict, the archive's sidecars and the logs, so only a
    printable one of at most MAX_PART_ID characters is taken: control characters (NUL, line
    breaks, ANSI escapes) and invisible format characters (bidi overrides, zero-width) could
    forge log lines or hide what a PLC sent. A JSON part id is a string or an integer (true,
    1.5 or NaN are not part ids).
    """
    if len(payload) > MAX_TRIGGER_BYTES:
        return None  # never decoded or parsed: a trigger is a few bytes
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nested thousands deep
            return None
        value = obj.get("part_id") if isinstance(obj, dict) else None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return None
        text = str(value)
    return part_id_or_none(text)


def part_id_or_none(text: str) -> str | None:
    """The one rule for a part id, whichever protocol carried it: stripped, non-empty, at most
    MAX_PART_ID characters, all printable (parse_part_id says why); None when it breaks it."""
    text = text.strip()
    if not text or len(text) > MAX_PART_ID or not text.isprintable():
        return None
    return text


def _finite(value: float) -> float | None:
    """JSON has no NaN/Inf: those become null."""
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, without importing numpy
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
