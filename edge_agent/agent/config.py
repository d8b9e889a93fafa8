"""The agent's YAML configuration, validated once at start into frozen values.

Every problem is one UserError line naming the file and the key path, e.g.
``config.yaml: cameras[1].source: missing``: a missing key, an unknown key (typo protection),
a wrong type, a bad value, malformed YAML (with its line), an unreadable file. Relative paths
(bundle, camera files and folders, spool, archive, TLS files) resolve against the folder of
the config file, so a config and its data can move together. config.example.yaml at the
repository root documents every key; a test keeps it loadable.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edge_agent.capture.cameras import KINDS as CAMERA_KINDS
from edge_agent.capture.cameras import MODES, CameraSettings
from edge_agent.capture.cameras import OVERFLOWS as OVERFLOW
from edge_agent.decide.archive import ArchiveSettings
from edge_agent.decide.decision import Thresholds, resolve_thresholds
from edge_agent.errors import UserError
from edge_agent.model.bundle import Bundle, load_bundle
from edge_agent.publish.publisher import MqttSettings

DEVICES = ("auto", "cpu", "cuda")
INDEX_KINDS = ("flat", "hnsw")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Camera ids and the line name become MQTT topic levels: no '/', '+', '#', no spaces.
TOPIC_LEVEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

_REQUIRED = object()


@dataclass(frozen=True)
class Batching:
    max_batch: int = 8
    max_wait_ms: float = 20.0
    queue_size: int = 64


@dataclass(frozen=True)
class ThresholdOverrides:
    image: float | None = None
    pixel: float | None = None


@dataclass(frozen=True)
class MetricsSettings:
    host: str = "127.0.0.1"
    port: int | None = 9108  # None: no endpoint


@dataclass(frozen=True)
class Config:
    path: Path
    bundle: Path
    device: str
    threads: int | None
    index: str
    ivf_nprobe: int
    log_level: str
    thresholds: ThresholdOverrides
    batching: Batching
    cameras: tuple[CameraSettings, ...]
    mqtt: MqttSettings
    health_interval_s: float
    archive: ArchiveSettings | None
    metrics: MetricsSettings


# -- the schema ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One key: accepted types, default (_REQUIRED if none), and checks on the value."""

    types: tuple[type, ...]
    default: Any = _REQUIRED
    nullable: bool = False
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    above: float | None = None  # exclusive lower bound
    is_path: bool = False
    check: Callable[[Any], str | None] | None = None
    secret: bool = False  # never echo the value in an error message


def _str(**kw: Any) -> Field:
    return Field((str,), **kw)


def _int(**kw: Any) -> Field:
    return Field((int,), **kw)


def _num(**kw: Any) -> Field:
    return Field((int, float), **kw)


def _bool(**kw: Any) -> Field:
    return Field((bool,), **kw)


def _topic_level(value: Any) -> str | None:
    if not TOPIC_LEVEL.match(value):
        return f"{value!r} must be letters, digits, '_', '-' or '.' (it is an MQTT topic level)"
    return None


TOP: dict[str, Field] = {
    "bundle": _str(is_path=True),
    "device": _str(default="auto", choices=DEVICES),
    "threads": _int(default=None, nullable=True, min=1),
    "index": _str(default="flat", choices=INDEX_KINDS),
    "ivf_nprobe": _int(default=8, min=1),
    "log_level": _str(default="info", choices=LOG_LEVELS),
}
SECTIONS = ("thresholds", "batching", "cameras", "mqtt", "archive", "metrics")

THRESHOLDS: dict[str, Field] = {
    "image": _num(default=None, nullable=True, above=0),
    "pixel": _num(default=None, nullable=True, above=0),
}

BATCHING: dict[str, Field] = {
    "max_batch": _int(default=8, min=1, max=256),
    "max_wait_ms": _num(default=20.0, min=0, max=10_000),
    "queue_size": _int(default=64, min=1, max=100_000),
}


def _default(cls: type, name: str) -> Any:
    """The dataclass default of `cls.name`: one source of truth for defaults."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


CAMERA: dict[str, Field] = {
    "id": _str(check=_topic_level),
    "source": Field((str, int)),
    "kind": _str(default=_default(CameraSettings, "kind"), choices=CAMERA_KINDS),
    "overflow": _str(default=_default(CameraSettings, "overflow"), choices=OVERFLOW),
    "fps_limit": _num(default=None, nullable=True, above=0),
    "reconnect_initial_s": _num(default=_default(CameraSettings, "reconnect_initial_s"), above=0),
    "reconnect_max_s": _num(default=_default(CameraSettings, "reconnect_max_s"), above=0),
    "loop": _bool(default=_default(CameraSettings, "loop")),
    "mode": _str(default=_default(CameraSettings, "mode"), choices=MODES),
    "open_timeout_s": _num(default=_default(CameraSettings, "open_timeout_s"), above=0),
    "read_timeout_s": _num(default=_default(CameraSettings, "read_timeout_s"), above=0),
}


def _m(name: str) -> Any:
    return _default(MqttSettings, name)


MQTT: dict[str, Field] = {
    "host": _str(default=_m("host")),
    "port": _int(default=_m("port"), min=1, max=65535),
    "client_id": _str(default=None, nullable=True, check=_topic_level),
    "prefix": _str(default=_m("prefix"), check=lambda v: _topic_path(v)),
    "line": _str(default=_m("line"), check=_topic_level),
    "username": _str(default=None, nullable=True),
    "password": _str(default=None, nullable=True, secret=True),
    "password_file": _str(default=None, nullable=True, is_path=True),
    "tls": _bool(default=_m("tls")),
    "tls_insecure": _bool(default=_m("tls_insecure")),
    "ca_file": _str(default=None, nullable=True, is_path=True),
    "cert_file": _str(default=None, nullable=True, is_path=True),
    "key_file": _str(default=None, nullable=True, is_path=True),
    "keepalive_s": _int(default=_m("keepalive_s"), min=5, max=3600),
    "spool_dir": _str(default=str(_m("spool_dir")), is_path=True),
    "spool_max_messages": _int(default=_m("spool_max_messages"), min=1),
    "spool_max_bytes": _int(default=_m("spool_max_bytes"), min=4096),
    "reconnect_min_s": _num(default=_m("reconnect_min_s"), above=0),
    "reconnect_max_s": _num(default=_m("reconnect_max_s"), above=0),
    "inflight_window": _int(default=_m("inflight_window"), min=1, max=65535),
    "health_interval_s": _num(default=10.0, above=0, max=3600),
}

ARCHIVE: dict[str, Field] = {
    "dir": _str(default=None, nullable=True, is_path=True),
    "quota_mb": _num(default=1024.0, above=0),
    "save_ok": _bool(default=False),
    "jpeg_quality": _int(default=90, min=1, max=100),
}

METRICS: dict[str, Field] = {
    "host": _str(default="127.0.0.1"),
    "port": _int(default=9108, nullable=True, min=0, max=65535),
}


def _topic_path(value: str) -> str | None:
    """A prefix may have several levels ('plant/hall2') but no wildcards or empty levels."""
    levels = value.split("/")
    if not value or any(not TOPIC_LEVEL.match(level) for level in levels):
        return f"{value!r} must be topic levels of letters, digits, '_', '-', '.' joined by '/'"
    return None


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


# -- validation ------------------------------------------------------------------------------


class _Checker:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.resolve().parent

    def fail(self, where: str, problem: str) -> UserError:
        return UserError(f"{self.path}: {where}: {problem}" if where else f"{self.path}: {problem}")

    def mapping(self, raw: Any, where: str) -> Mapping[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.fail(where, f"must be a mapping of keys, got {_show(raw)}")
        return raw

    def section(
        self, raw: Any, spec: Mapping[str, Field], where: str, sections: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """Validated values of every key in `spec`; `sections` are known keys handled apart."""
        raw = self.mapping(raw, where)
        prefix = f"{where}." if where else ""
        for key in raw:
            if key not in spec and key not in sections:
                known = [*spec, *sections]
                raise self.fail(f"{prefix}{key}", f"unknown key{_suggest(key, known)}")
        return {key: self.value(raw, key, fld, f"{prefix}{key}") for key, fld in spec.items()}

    def value(self, raw: Mapping[str, Any], key: str, fld: Field, where: str) -> Any:
        if key not in raw:
            if fld.default is _REQUIRED:
                raise self.fail(where, "missing")
            if fld.is_path and fld.default is not None:
                return self.resolve(fld.default)
            return fld.default
        value = raw[key]
        if value is None:
            if fld.nullable or (fld.default is None):
                return None
            raise self.fail(where, "must not be empty")
        if not _type_ok(value, fld.types):
            wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in fld.types)
            shown = f"{type(value).__name__} (value not shown)" if fld.secret else _show(value)
            raise self.fail(where, f"must be {wanted}, got {shown}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(where, f"must be a finite number, got {value}")
        if isinstance(value, str) and not value.strip() and str in fld.types:
            raise self.fail(where, "must not be empty")
        if fld.choices is not None and value not in fld.choices:
            choices = ", ".join(map(str, fld.choices))
            raise self.fail(where, f"must be one of {choices}, got {value!r}")
        if fld.min is not None and value < fld.min:
            raise self.fail(where, f"must be at least {fld.min}, got {value}")
        if fld.max is not None and value > fld.max:
            raise self.fail(where, f"must be at most {fld.max}, got {value}")
        if fld.above is not None and value <= fld.above:
            raise self.fail(where, f"must be more than {fld.above}, got {value}")
        if fld.check is not None and (problem := fld.check(value)):
            raise self.fail(where, problem)
        if fld.is_path:
            return self.resolve(value)
        if float in fld.types and isinstance(value, int):
            return float(value)
        return value

    def resolve(self, value: str) -> Path:
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else self.base / path


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    # YAML's true/false are bools, and bool is an int subclass: a port of `true` is a mistake.
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    kind = {dict: "mapping", list: "list", bool: "boolean", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )
    return f"{text} ({kind})"


def _suggest(key: Any, known: list[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the config ({_reason(exc)})") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "malformed"
        raise UserError(f"{path}: {where}invalid YAML ({problem})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML ({exc})") from None


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file (the bundle itself is checked by check_bundle)."""
    path = Path(path)
    raw = read_yaml(path)
    if raw is None:
        raise UserError(f"{path}: the config is empty (see config.example.yaml)")
    c = _Checker(path)
    raw = c.mapping(raw, "")
    top = c.section(raw, TOP, "", SECTIONS)
    thresholds = ThresholdOverrides(**c.section(raw.get("thresholds"), THRESHOLDS, "thresholds"))
    batching = Batching(**c.section(raw.get("batching"), BATCHING, "batching"))
    cameras = _cameras(c, raw)
    mqtt_raw = c.section(raw.get("mqtt"), MQTT, "mqtt")
    health_interval_s = mqtt_raw.pop("health_interval_s")
    mqtt = _mqtt(c, mqtt_raw)
    archive_raw = c.section(raw.get("archive"), ARCHIVE, "archive")
    archive = ArchiveSettings(**archive_raw) if archive_raw["dir"] is not None else None
    metrics = MetricsSettings(**c.section(raw.get("metrics"), METRICS, "metrics"))
    return Config(
        path=path,
        bundle=top["bundle"],
        device=top["device"],
        threads=top["threads"],
        index=top["index"],
        ivf_nprobe=top["ivf_nprobe"],
        log_level=top["log_level"],
        thresholds=thresholds,
        batching=batching,
        cameras=cameras,
        mqtt=mqtt,
        health_interval_s=health_interval_s,
        archive=archive,
        metrics=metrics,
    )


def _cameras(c: _Checker, raw: Mapping[str, Any]) -> tuple[CameraSettings, ...]:
    if "cameras" not in raw:
        raise c.fail("cameras", "missing")
    items = raw["cameras"]
    if not isinstance(items, list) or not items:
        raise c.fail("cameras", f"must be a non-empty list of cameras, got {_show(items)}")
    cameras: list[CameraSettings] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"cameras[{i}]"
        values = c.section(item, CAMERA, where)
        if values["id"] in seen:
            raise c.fail(f"{where}.id", f"{values['id']!r} is used by another camera")
        seen.add(values["id"])
        if values["reconnect_max_s"] < values["reconnect_initial_s"]:
            raise c.fail(f"{where}.reconnect_max_s", "must not be less than reconnect_initial_s")
        values["source"] = _source(c, values["source"], values["kind"], f"{where}.source")
        try:
            cameras.append(CameraSettings(**values))
        except UserError as exc:  # capture's own rules, should any go beyond the schema
            raise c.fail(where, str(exc)) from None
    return tuple(cameras)


def _source(c: _Checker, source: str | int, kind: str, where: str) -> str | int:
    """Files and folders resolve against the config's folder; indices, URLs, /dev stay."""
    if isinstance(source, int):
        if source < 0:
            raise c.fail(where, f"a USB camera index must be 0 or more, got {source}")
        return source
    if not source.strip():
        raise c.fail(where, "must not be empty")
    if "://" in source or (source.isdigit() and kind in ("auto", "usb")):
        return source
    return str(c.resolve(source))


def _mqtt(c: _Checker, values: dict[str, Any]) -> MqttSettings:
    password_file = values.pop("password_file")
    if password_file is not None:
        if values["password"] is not None:
            raise c.fail("mqtt.password_file", "set either password or password_file, not both")
        try:
            values["password"] = password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            problem = f"cannot read {password_file} ({_reason(exc)})"
            raise c.fail("mqtt.password_file", problem) from None
    if values["reconnect_max_s"] < values["reconnect_min_s"]:
        raise c.fail("mqtt.reconnect_max_s", "must not be less than reconnect_min_s")
    if values["client_id"] is None:
        # Unique per line and host: two agents with one client id would keep kicking each
        # other off the broker.
        values["client_id"] = f"edge-agent-{values['line']}-{_hostname()}"
    settings = MqttSettings(**values)
    try:
        settings.validate()  # the publisher's own rules (TLS files need tls: true, ...)
    except UserError as exc:
        raise c.fail("", str(exc)) from None
    return settings


def _hostname() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", os.uname().nodename) or "host"


def load_checked_bundle(config: Config) -> tuple[Bundle, Thresholds]:
    """Load and verify the configured bundle and settle the thresholds (config over bundle).

    UserError, naming the config key, when the bundle is unusable or no threshold is known.
    """
    try:
        bundle = load_bundle(config.bundle)
    except UserError as exc:
        raise UserError(f"{config.path}: bundle: {exc}") from None
    return bundle, thresholds_for(config, bundle)


def thresholds_for(config: Config, bundle: Bundle) -> Thresholds:
    found = bundle.thresholds
    thresholds = resolve_thresholds(found, config.thresholds.image, config.thresholds.pixel)
    if thresholds is None:
        missing = [
            key
            for key in ("image", "pixel")
            if getattr(config.thresholds, key) is None and found.get(key) is None
        ]
        raise UserError(
            f"{config.path}: thresholds.{missing[0]}: not set and the bundle {config.bundle} "
            "is not calibrated: run `edge-agent calibrate` on it (or set "
            + " and ".join(f"thresholds.{k}" for k in missing)
            + " in the config)"
        )
    return thresholds
