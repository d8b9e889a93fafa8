"""The agent's YAML configuration, validated once at start into frozen values.

The schema is a set of pydantic models: unknown keys are errors (typo protection) and types
are strict, because YAML misleads (``port: true`` is a boolean, not 1; ``'8'`` is a string, not
a number; an integer is still a fine number). Every problem becomes one UserError line naming
the file and the key path, e.g. ``config.yaml: cameras[1].source: missing``: a missing key,
an unknown key (with a did-you-mean), a wrong type, a bad value, malformed YAML (with its
line), an unreadable file. A password is never echoed, not even a mistyped one.

Defaults and choices are not restated here: they come from the settings dataclasses
(CameraSettings, MqttSettings, ArchiveSettings) and the constants of the modules that
implement them (camera kinds, the publisher's in-flight limit, the kNN index kinds, the
scorer's devices). Relative paths (bundle, camera files and folders, spool, archive, TLS and
password files) resolve against the folder of the config file, so a config and its data can
move together. config.example.yaml at the repository root documents every key and every
choice; a test keeps it loadable and its documented choices equal to the accepted ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from edge_agent.capture.cameras import KINDS as CAMERA_KINDS
from edge_agent.capture.cameras import MODES, OVERFLOWS, CameraSettings
from edge_agent.capture.genicam import PREFIX as GENICAM_PREFIX
from edge_agent.config.fields import ConfigPath, Secret, Text
from edge_agent.config.fields import Section as _Section
from edge_agent.config.fields import problem as _problem
from edge_agent.config.fields import resolve as _resolve
from edge_agent.config.fields import show as _show
from edge_agent.config.fields import text as _text
from edge_agent.config.genicam import GenicamModel
from edge_agent.config.lifecycle import AUDIT_FILE, LIFECYCLE_DIR, AuditModel, ShadowModel
from edge_agent.decide import drift
from edge_agent.decide.archive import ArchiveSettings
from edge_agent.decide.decision import Thresholds, resolve_thresholds
from edge_agent.errors import UserError
from edge_agent.model.bundle import Bundle
from edge_agent.model.knn import DEFAULT_INDEX, DEFAULT_NPROBE, INDEX_KINDS
from edge_agent.model.scorer import DEVICES
from edge_agent.publish.modbus_config import ModbusModel
from edge_agent.publish.opcua_config import OpcUaModel
from edge_agent.publish.publisher import MAX_INFLIGHT_WINDOW, MqttSettings
from edge_agent.publish.sparkplug import SparkplugSettings, resolve_settings
from edge_agent.station.recipes import MAX_NUMBER as MAX_RECIPE_NUMBER
from edge_agent.station.recipes import Inspection, Recipe, RecipeBook
from edge_agent.station.regions import load_ignore_mask

LOG_LEVELS = ("debug", "info", "warning", "error")
# Camera ids and the line name become MQTT topic levels: no '/', '+', '#', no spaces.
TOPIC_LEVEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _one_of(choices: tuple[str, ...]) -> Any:
    """The Literal type of `choices`, so that the tuple stays the only list of them."""
    return Literal.__getitem__(choices)


Device = _one_of(DEVICES)
IndexKind = _one_of(INDEX_KINDS)
LogLevel = _one_of(LOG_LEVELS)
CameraKind = _one_of(CAMERA_KINDS)
Overflow = _one_of(OVERFLOWS)
Mode = _one_of(MODES)


def _default(cls: type, name: str) -> Any:
    """The dataclass default of `cls.name`: the dataclass is the one source of the default."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


# -- value rules -----------------------------------------------------------------------------


def _topic_level(value: str) -> str:
    if not TOPIC_LEVEL.match(value):
        raise _problem(
            f"{value!r} must be letters, digits, '_', '-' or '.' (it is an MQTT topic level)"
        )
    return value


def _topic_path(value: str) -> str:
    """A prefix may have several levels ('plant/hall2') but no wildcards or empty levels."""
    if not all(TOPIC_LEVEL.match(level) for level in value.split("/")):
        raise _problem(
            f"{value!r} must be topic levels of letters, digits, '_', '-', '.' joined by '/'"
        )
    return value


def _source(value: object) -> str | int:
    # Resolved against the config's folder later: whether it is a path depends on `kind`.
    if value is None:
        raise _problem("must not be empty")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _problem(f"must be a string or an integer, got {_show(value)}")
    if isinstance(value, int) and value < 0:
        raise _problem(f"a USB camera index must be 0 or more, got {value}")
    return _text(value) if isinstance(value, str) else value


def _camera_list(value: object) -> object:
    if not isinstance(value, list) or not value:
        raise _problem(f"must be a non-empty list of cameras, got {_show(value)}")
    return value


TopicLevel = Annotated[str, AfterValidator(_text), AfterValidator(_topic_level)]
TopicPath = Annotated[str, AfterValidator(_text), AfterValidator(_topic_path)]
Source = Annotated[str | int, PlainValidator(_source)]


# -- the schema ------------------------------------------------------------------------------


class ThresholdOverrides(_Section):
    image: float | None = Field(None, gt=0)
    pixel: float | None = Field(None, gt=0)


class Batching(_Section):
    max_batch: int = Field(8, ge=1, le=256)
    max_wait_ms: float = Field(0.0, ge=0, le=10_000)
    queue_size: int = Field(64, ge=1, le=100_000)


class MetricsSettings(_Section):
    host: Text = "127.0.0.1"
    port: int | None = Field(9108, ge=0, le=65535)  # None: no endpoint; 0: any free port


def _cam(name: str) -> Any:
    return _default(CameraSettings, name)


class CameraModel(_Section):
    """One `cameras` entry: CameraSettings' fields, its defaults."""

    id: TopicLevel
    source: Source
    kind: CameraKind = _cam("kind")
    overflow: Overflow = _cam("overflow")
    fps_limit: float | None = Field(_cam("fps_limit"), gt=0)
    reconnect_initial_s: float = Field(_cam("reconnect_initial_s"), gt=0)
    reconnect_max_s: float = Field(_cam("reconnect_max_s"), gt=0)
    loop: bool = _cam("loop")
    mode: Mode = _cam("mode")
    open_timeout_s: float = Field(_cam("open_timeout_s"), gt=0)
    read_timeout_s: float = Field(_cam("read_timeout_s"), gt=0)
    # OpenCV refuses more than 2^30 pixels (1073 MP) whatever is set here.
    max_megapixels: float = Field(_cam("max_megapixels"), gt=0, le=1000)
    genicam: GenicamModel | None = _cam("genicam")

    @model_validator(mode="after")
    def _backoff(self) -> CameraModel:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise _problem("must not be less than reconnect_initial_s", "reconnect_max_s")
        return self


def _mq(name: str) -> Any:
    return _default(MqttSettings, name)


class MqttModel(_Section):
    """The `mqtt` section: MqttSettings' fields and defaults, plus two keys of the agent's."""

    host: Text = _mq("host")
    port: int = Field(_mq("port"), ge=1, le=65535)
    client_id: TopicLevel | None = None  # None: edge-agent-<line>-<hostname>
    prefix: TopicPath = _mq("prefix")
    line: TopicLevel = _mq("line")
    username: Text | None = _mq("username")
    password: Secret | None = None
    password_file: ConfigPath | None = None
    tls: bool = _mq("tls")
    tls_insecure: bool = _mq("tls_insecure")
    ca_file: ConfigPath | None = _mq("ca_file")
    cert_file: ConfigPath | None = _mq("cert_file")
    key_file: ConfigPath | None = _mq("key_file")
    keepalive_s: int = Field(_mq("keepalive_s"), ge=5, le=3600)
    spool_dir: ConfigPath = _mq("spool_dir")
    spool_max_messages: int = Field(_mq("spool_max_messages"), ge=1)
    spool_max_bytes: int = Field(_mq("spool_max_bytes"), ge=4096)
    reconnect_min_s: float = Field(_mq("reconnect_min_s"), gt=0)
    reconnect_max_s: float = Field(_mq("reconnect_max_s"), gt=0)
    inflight_window: int = Field(_mq("inflight_window"), ge=1, le=MAX_INFLIGHT_WINDOW)
    health_interval_s: float = Field(10.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _rules(self) -> MqttModel:
        if self.password is not None and self.password_file is not None:
            raise _problem("set either password or password_file, not both", "password_file")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise _problem("must not be less than reconnect_min_s", "reconnect_max_s")
        return self


def _arc(name: str) -> Any:
    return _default(ArchiveSettings, name)


class ArchiveModel(_Section):
    dir: ConfigPath | None = None  # None: no archive
    quota_mb: float = Field(_arc("quota_mb"), gt=0)
    save_ok: bool = _arc("save_ok")
    jpeg_quality: int = Field(_arc("jpeg_quality"), ge=1, le=100)
    min_free_mb: float = Field(_arc("min_free_mb"), ge=0)


class SparkplugModel(_Section):
    """The `sparkplug` section: Sparkplug B 3.0 beside contract v1 (off by default). Broker
    address, TLS and credentials are the `mqtt` section's; host/port may point elsewhere."""

    enabled: bool = False
    group_id: TopicLevel | None = None  # None: mqtt.line
    edge_node_id: TopicLevel | None = None  # None: the MQTT client id
    primary_host_id: TopicLevel | None = None  # None: no primary host awareness
    host: Text | None = None  # None: mqtt.host
    port: int | None = Field(None, ge=1, le=65535)  # None: mqtt.port
    client_id: TopicLevel | None = None  # None: <mqtt client id>-sparkplug
    spool_dir: ConfigPath | None = None  # None: <mqtt.spool_dir>/_sparkplug
    spool_max_messages: int = Field(_mq("spool_max_messages"), ge=1)
    spool_max_bytes: int = Field(_mq("spool_max_bytes"), ge=4096)
    data_qos: int = Field(0, ge=0, le=1)


class DriftModel(_Section):
    """The `drift` section: the agent's check of the line's scores against the calibration
    (decide/drift.py; needs a bundle calibrated by this version, which records good scores)."""

    enabled: bool = True
    window: int = Field(drift.DEFAULT_WINDOW, ge=10, le=100_000)
    min_frames: int = Field(drift.DEFAULT_MIN_FRAMES, ge=1)
    median_shift: float = Field(drift.DEFAULT_MEDIAN_SHIFT, gt=0, le=100)
    ng_rate: float = Field(drift.DEFAULT_NG_RATE, gt=0, le=1)


class LiveViewModel(_Section):
    """The `liveview` section: the commissioning page (ops/liveview.py), off by default."""

    enabled: bool = False
    host: Text = "127.0.0.1"
    port: int = Field(8090, ge=0, le=65535)  # 0: any free port (logged)
    token: Secret | None = None  # one token, role engineer (configs from before roles)
    tokens_file: ConfigPath | None = None  # one hashed token a line, each with its role

    @model_validator(mode="after")
    def _token_off_loopback(self) -> LiveViewModel:
        # off loopback a token is required: the page shows the line's parts
        off = self.enabled and not _is_loopback(self.host)
        if off and self.token is None and self.tokens_file is None:
            raise _problem(
                f"required (or tokens_file) when host is not a loopback address "
                f"(host {self.host!r})",
                "token",
            )
        return self


def _unique(ids: list[str], what: str) -> None:
    """The first id used twice, reported on the second item's `id`."""
    seen: set[str] = set()
    for i, item_id in enumerate(ids):
        if item_id in seen:
            raise _problem(f"{item_id!r} is used by another {what}", i, "id")
        seen.add(item_id)


def _roi(value: object) -> tuple[int, int, int, int]:
    if (
        not isinstance(value, list)
        or len(value) != 4
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise _problem(f"must be [x, y, width, height] in frame pixels, got {_show(value)}")
    x, y, w, h = value
    if w <= 0 or h <= 0:
        raise _problem(f"width and height must be positive, got {value}")
    if x < 0 or y < 0:
        raise _problem(f"x and y must be 0 or more, got {value}")
    return x, y, w, h


Roi = Annotated[tuple[int, int, int, int], PlainValidator(_roi)]


class InspectionModel(_Section):
    """One inspection of a recipe: camera x region x ignore mask x bundle x thresholds."""

    id: TopicLevel
    camera: TopicLevel
    bundle: ConfigPath
    roi: Roi | None = None  # None: the whole frame
    ignore: ConfigPath | None = None  # white = ignored; ROI- or frame-sized
    thresholds: ThresholdOverrides = Field(default_factory=ThresholdOverrides)


class RecipeModel(_Section):
    number: int = Field(ge=1, le=MAX_RECIPE_NUMBER)
    inspections: list[InspectionModel]

    @field_validator("inspections")
    @classmethod
    def _inspections(cls, inspections: list[InspectionModel]) -> list[InspectionModel]:
        if not inspections:
            raise _problem("a recipe needs at least one inspection")
        _unique([i.id for i in inspections], "inspection")
        return inspections


class RecipesModel(_Section):
    """`recipes:` takes its three settings and, beside them, one key per recipe (its name)."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, RecipeModel] = Field(init=False)

    active: TopicLevel | None = None  # None: the first recipe
    preload: bool = True
    part_timeout_ms: int = Field(2000, ge=1, le=600_000)

    @model_validator(mode="before")
    @classmethod
    def _typo(cls, data: Any) -> Any:
        # A misspelt setting would otherwise read as a recipe of that name.
        settings = list(cls.model_fields)
        for key, value in data.items() if isinstance(data, dict) else ():
            if key not in settings and not isinstance(value, dict):
                close = difflib.get_close_matches(str(key), settings, n=1)
                if close:
                    raise _problem(f"unknown key (did you mean {close[0]!r}?)", key)
        return data

    @model_validator(mode="after")
    def _recipes(self) -> RecipesModel:
        recipes = self.__pydantic_extra__ or {}
        if not recipes:
            raise _problem("no recipe: add one (a name, with its number and inspections)")
        numbers: dict[int, str] = {}
        for name, recipe in recipes.items():
            if not TOPIC_LEVEL.match(name):
                raise _problem(
                    "a recipe name is letters, digits, '_', '-' or '.', starting with a letter "
                    "or digit",
                    name,
                )
            if recipe.number in numbers:
                raise _problem(
                    f"{recipe.number} is recipe {numbers[recipe.number]}'s too", name, "number"
                )
            numbers[recipe.number] = name
        if self.active is not None and self.active not in recipes:
            raise _problem(
                f"no recipe named {self.active!r} (recipes: {', '.join(recipes)})", "active"
            )
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


class ConfigModel(_Section):
    """The whole file."""

    bundle: ConfigPath | None = None  # one whole-frame inspection per camera (or: recipes)
    recipes: RecipesModel | None = None
    device: Device = "auto"
    threads: int | None = Field(None, ge=1)
    index: IndexKind = DEFAULT_INDEX
    ivf_nprobe: int = Field(DEFAULT_NPROBE, ge=1)
    log_level: LogLevel = "info"
    thresholds: ThresholdOverrides = Field(default_factory=ThresholdOverrides)
    batching: Batching = Field(default_factory=Batching)
    cameras: Annotated[list[CameraModel], BeforeValidator(_camera_list)]
    mqtt: MqttModel = Field(default_factory=MqttModel)
    archive: ArchiveModel = Field(default_factory=ArchiveModel)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    sparkplug: SparkplugModel = Field(default_factory=SparkplugModel)
    opcua: OpcUaModel = Field(default_factory=OpcUaModel)
    modbus: ModbusModel = Field(default_factory=ModbusModel)
    drift: DriftModel = Field(default_factory=DriftModel)
    liveview: LiveViewModel = Field(default_factory=LiveViewModel)
    audit: AuditModel = Field(default_factory=AuditModel)
    shadow: ShadowModel = Field(default_factory=ShadowModel)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # `mqtt:` with nothing under it (all commented out) is YAML null: all defaults.
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if not (v is None and _is_section(cls, k))}

    @model_validator(mode="after")
    def _station(self) -> ConfigModel:
        if (self.bundle is None) == (self.recipes is None):
            raise _problem("give either bundle (one model for every camera) or recipes", "bundle")
        cameras = [c.id for c in self.cameras]
        for name, recipe in (self.recipes.model_extra if self.recipes else {}).items():
            for i, inspection in enumerate(recipe.inspections):
                if inspection.camera not in cameras:
                    problem = f"no camera {inspection.camera!r} (cameras: {', '.join(cameras)})"
                    raise _problem(problem, "recipes", name, "inspections", i, "camera")
        for i, cam in enumerate(self.modbus.trigger_cameras or ()):
            mode = next((c.mode for c in self.cameras if c.id == cam), None)
            if mode != "trigger":
                why = (
                    f"no camera {cam!r}" if mode is None else f"camera {cam!r} is not mode: trigger"
                )
                raise _problem(why, "modbus", "trigger_cameras", i)
        return self

    @field_validator("cameras")
    @classmethod
    def _unique_ids(cls, cameras: list[CameraModel]) -> list[CameraModel]:
        _unique([c.id for c in cameras], "camera")
        return cameras


def _is_section(model: type[BaseModel], key: object) -> bool:
    field = model.model_fields.get(key) if isinstance(key, str) else None
    annotation = field.annotation if field else None
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


@dataclass(frozen=True)
class Config:
    path: Path
    bundle: Path | None  # the top-level bundle (None: recipes); the station says what runs
    station: RecipeBook
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
    sparkplug: SparkplugSettings | None = None  # None: Sparkplug B is off
    opcua: OpcUaModel | None = None  # None: no OPC UA server
    modbus: ModbusModel | None = None  # None: no Modbus server
    drift: DriftModel | None = None  # None: no drift check
    liveview: LiveViewModel | None = None  # None: no live view
    audit: Path | None = None  # the audit trail's file; None: entries are only published
    shadow: ShadowModel | None = None  # None: no model changes on the running line
    lifecycle_dir: Path | None = None  # promoted bundles and regression sets (shadow.dir)


# -- pydantic's errors as one line -----------------------------------------------------------

_UNKNOWN = ("extra_forbidden", "invalid_key")
_TYPE_NAMES = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
}
_BOUNDS = {
    "greater_than_equal": ("at least", "ge"),
    "less_than_equal": ("at most", "le"),
    "greater_than": ("more than", "gt"),
    "less_than": ("less than", "lt"),
}


def _user_error(path: Path, exc: ValidationError) -> UserError:
    errors = exc.errors(include_url=False)
    # pydantic reports every problem; one is enough, and a typo first: it often also makes
    # a required key look missing.
    error = next((e for e in errors if e["type"] in _UNKNOWN), errors[0])
    loc = (*error["loc"], *(error.get("ctx") or {}).get("at", ()))
    if error["type"] in _UNKNOWN:
        model, _ = _walk(loc[:-1])
        known = list(model.model_fields) if model else []
        where = ".".join(p for p in (_where(loc[:-1]), _key(loc[-1])) if p)
        return _fail(path, where, f"unknown key{_suggest(loc[-1], known)}")
    return _fail(path, _where(loc), _describe(error, _walk(loc)[1]))


def _describe(error: ErrorDetails, field: FieldInfo | None) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    value = error.get("input")
    secret = field is not None and _holds_secret(field.annotation)
    # pydantic keeps the input in every error: for a secret it must go no further.
    shown = f"{type(value).__name__} (value not shown)" if secret else _show(value)
    if kind == "missing":
        return "missing"
    if kind == "config":
        return str(error["msg"])
    if kind in _TYPE_NAMES:
        return "must not be empty" if value is None else f"must be {_TYPE_NAMES[kind]}, got {shown}"
    if kind in ("model_type", "dict_type"):
        return f"must be a mapping of keys, got {shown}"
    if kind == "literal_error" and field is not None and not secret:
        return f"must be one of {', '.join(map(str, _choices(field.annotation)))}, got {value!r}"
    if kind in _BOUNDS and not secret:
        words, key = _BOUNDS[kind]
        return f"must be {words} {_number(ctx[key])}, got {value}"
    if kind == "finite_number" and not secret:
        return f"must be a finite number, got {value}"
    message = str(error["msg"])  # pydantic's own wording; it does not contain the input
    return message[:1].lower() + message[1:]


def _where(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        key = _key(part)
        text += f"[{part}]" if isinstance(part, int) else f".{key}" if text else key
    return text


def _key(part: Any) -> str:
    """A key as typed when it is a plain name, else quoted: a key holding a newline or an
    escape sequence must not break the one-line message (or the terminal)."""
    text = str(part)
    return text if text.isprintable() and text.strip() == text and text else repr(text)


def _walk(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """The model a key path leads into and the field it names (None past the schema)."""
    model: type[BaseModel] | None = ConfigModel
    field: FieldInfo | None = None
    for part in loc:
        if isinstance(part, int):  # a list index: the items' model is already in hand
            continue
        if model is RecipesModel and part not in model.model_fields:
            model, field = RecipeModel, None  # a recipe, by its name
            continue
        if model is None or part not in model.model_fields:
            return None, None
        field = model.model_fields[part]
        model = _model_in(field.annotation)
    return model, field


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_model_in, get_args(annotation))), None)


def _holds_secret(annotation: Any) -> bool:
    """A secret, or a section with one: `mqtt: [{password: ...}]` must not be echoed either."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return any(_holds_secret(f.annotation) for f in annotation.model_fields.values())
    return annotation is SecretStr or any(map(_holds_secret, get_args(annotation)))


def _choices(annotation: Any) -> tuple[Any, ...]:
    """The Literal values an annotation allows (empty when it is no choice)."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return next(filter(None, map(_choices, get_args(annotation))), ())


def _number(bound: Any) -> Any:
    # pydantic stores float bounds as floats: "more than 0", not "more than 0.0".
    return int(bound) if isinstance(bound, float) and bound.is_integer() else bound


def _suggest(key: Any, known: list[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"


def _fail(path: Path, where: str, problem: str) -> UserError:
    return UserError(f"{path}: {where}: {problem}" if where else f"{path}: {problem}")


# -- loading ---------------------------------------------------------------------------------


MAX_CONFIG_BYTES = 1024 * 1024
"""A config is a few kB; a larger file is a mistake (or an attack) and is refused unread."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, minus two ways a config silently means something else or takes
    minutes and gigabytes: a key given twice (PyYAML keeps the last) and aliases (`*name`,
    which can expand exponentially: the "billion laughs")."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "aliases (*name) are not allowed in the config", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise UserError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB: not a config")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the config ({_reason(exc)})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "malformed"
        raise UserError(f"{path}: {where}invalid YAML ({problem})") from None
    except yaml.YAMLError as exc:  # e.g. a ReaderError for a control character: one line
        raise UserError(f"{path}: invalid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise UserError(f"{path}: invalid YAML (nested too deeply)") from None


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file (the bundles themselves: agent.models.load_models)."""
    path = Path(path)
    raw = read_yaml(path)
    if raw is None:
        raise UserError(f"{path}: the config is empty (see config.example.yaml)")
    base = path.resolve().parent
    try:
        model = ConfigModel.model_validate(raw, context={"base": base})
    except ValidationError as exc:
        error = _user_error(path, exc)
    else:
        return _config(path, base, model)
    # Raised outside the handler so that the ValidationError, which holds every input (a
    # password too), is not even attached as the context of the UserError.
    raise error


def _config(path: Path, base: Path, model: ConfigModel) -> Config:
    mqtt = _mqtt(path, model.mqtt)
    return Config(
        path=path,
        bundle=model.bundle,
        station=_station(path, model),
        device=model.device,
        threads=model.threads,
        index=model.index,
        ivf_nprobe=model.ivf_nprobe,
        log_level=model.log_level,
        thresholds=model.thresholds,
        batching=model.batching,
        cameras=tuple(_camera(path, base, i, c) for i, c in enumerate(model.cameras)),
        mqtt=mqtt,
        health_interval_s=model.mqtt.health_interval_s,
        archive=(
            ArchiveSettings(**model.archive.model_dump()) if model.archive.dir is not None else None
        ),
        metrics=model.metrics,
        sparkplug=_sparkplug(path, model, mqtt) if model.sparkplug.enabled else None,
        opcua=model.opcua if model.opcua.enabled else None,
        modbus=model.modbus if model.modbus.enabled else None,
        drift=model.drift if model.drift.enabled else None,
        liveview=model.liveview if model.liveview.enabled else None,
        audit=model.audit.path or Path(mqtt.spool_dir) / AUDIT_FILE,
        shadow=model.shadow if model.shadow.enabled else None,
        lifecycle_dir=model.shadow.dir or Path(mqtt.spool_dir) / LIFECYCLE_DIR,
    )


LEGACY_RECIPE = "default"
"""The one recipe a config with a top-level `bundle:` means: an inspection per camera, named
after it, on the whole frame."""


def _station(path: Path, model: ConfigModel) -> RecipeBook:
    if model.recipes is None:
        assert model.bundle is not None
        inspections = tuple(Inspection(c.id, c.id, model.bundle) for c in model.cameras)
        recipe = Recipe(LEGACY_RECIPE, 1, inspections)
        return RecipeBook({LEGACY_RECIPE: recipe}, active=LEGACY_RECIPE)
    recipes = {}
    for name, recipe_model in model.recipes.model_extra.items():
        inspections = []
        for i, m in enumerate(recipe_model.inspections):
            key = f"recipes.{name}.inspections[{i}].ignore"
            try:
                ignore = load_ignore_mask(m.ignore, m.roi, key) if m.ignore else None
            except UserError as exc:
                raise UserError(f"{path}: {exc}") from None
            inspections.append(
                Inspection(
                    m.id,
                    m.camera,
                    m.bundle,
                    roi=m.roi,
                    ignore=ignore,
                    ignore_file=m.ignore,
                    image_threshold=m.thresholds.image,
                    pixel_threshold=m.thresholds.pixel,
                )
            )
        recipes[name] = Recipe(name, recipe_model.number, tuple(inspections))
    r = model.recipes
    return RecipeBook(
        recipes,
        active=r.active or next(iter(recipes)),
        preload=r.preload,
        part_timeout_s=r.part_timeout_ms / 1000.0,
    )


def _camera(path: Path, base: Path, i: int, camera: CameraModel) -> CameraSettings:
    values = camera.model_dump()
    values["genicam"] = camera.genicam.settings() if camera.genicam is not None else None
    source = camera.source
    # Files and folders resolve against the config's folder; indices, URLs, /dev and GenICam
    # device ids stay.
    if isinstance(source, str) and not (
        "://" in source
        or (source.isdigit() and camera.kind in ("auto", "usb"))
        or source.startswith(GENICAM_PREFIX)
        or camera.kind == "genicam"
    ):
        values["source"] = str(_resolve(base, source))
    try:
        return CameraSettings(**values)
    except UserError as exc:  # capture's own rules, should any go beyond the schema
        raise _fail(path, f"cameras[{i}]", str(exc)) from None


def _mqtt(path: Path, mqtt: MqttModel) -> MqttSettings:
    values = mqtt.model_dump(exclude={"password_file", "health_interval_s"})
    values["password"] = mqtt.password.get_secret_value() if mqtt.password else None
    if mqtt.password_file is not None:
        try:
            values["password"] = mqtt.password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            problem = f"cannot read {mqtt.password_file} ({_reason(exc)})"
            raise _fail(path, "mqtt.password_file", problem) from None
    if mqtt.client_id is None:
        # Unique per line and host: two agents with one client id would keep kicking each
        # other off the broker.
        values["client_id"] = f"edge-agent-{mqtt.line}-{_hostname()}"
    settings = MqttSettings(**values)
    try:
        settings.validate()  # the publisher's own rules (TLS files need tls: true, ...)
    except UserError as exc:
        raise _fail(path, "", str(exc)) from None
    return settings


def _sparkplug(path: Path, model: ConfigModel, mqtt: MqttSettings) -> SparkplugSettings:
    settings = resolve_settings(mqtt, **model.sparkplug.model_dump(exclude={"enabled"}))
    # Two connections with one client id keep kicking each other off the broker.
    for camera in model.cameras:
        if settings.mqtt.client_id == f"{mqtt.client_id}-{camera.id}":
            problem = f"{settings.mqtt.client_id!r} is camera {camera.id}'s MQTT client id"
            raise _fail(path, "sparkplug.client_id", problem)
    return settings


def _hostname() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", os.uname().nodename) or "host"


def thresholds_for(
    config: Config, bundle: Bundle, inspection: Inspection | None = None, where: str = ""
) -> Thresholds:
    """The thresholds in force: an inspection's own, else the config's, else the bundle's
    calibration; UserError naming the key to set when one is known nowhere."""
    found = bundle.thresholds
    image, pixel = config.thresholds.image, config.thresholds.pixel
    if inspection is not None:
        image = inspection.image_threshold if inspection.image_threshold is not None else image
        pixel = inspection.pixel_threshold if inspection.pixel_threshold is not None else pixel
    thresholds = resolve_thresholds(found, image, pixel)
    if thresholds is None:
        given = {"image": image, "pixel": pixel}
        missing = [
            key for key in ("image", "pixel") if given[key] is None and found.get(key) is None
        ]
        key = f"{where}.thresholds" if where else "thresholds"
        raise UserError(
            f"{config.path}: {key}.{missing[0]}: not set and the bundle {bundle.path} "
            "is not calibrated: run `edge-agent calibrate` on it (or set "
            + " and ".join(f"{key}.{k}" for k in missing)
            + " in the config)"
        )
    return thresholds
