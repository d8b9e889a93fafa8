"""Config loading: one clear line naming the key for every mistake; the example stays true."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import cv2
import numpy as np
import pytest
import yaml
from pydantic import BaseModel

from edge_agent import cli
from edge_agent.agent import config as cfg
from edge_agent.agent.config import load_config, thresholds_for
from edge_agent.agent.service import load_station
from edge_agent.capture.cameras import CameraSettings
from edge_agent.config.lifecycle import AuditModel, ShadowModel
from edge_agent.decide.archive import ArchiveSettings
from edge_agent.decide.decision import Thresholds
from edge_agent.errors import UserError
from edge_agent.model.bundle import Bundle, load_bundle, update_thresholds
from edge_agent.model.knn import INDEX_KINDS
from edge_agent.model.scorer import DEVICES
from edge_agent.publish.modbus_config import ModbusModel
from edge_agent.publish.opcua_config import OpcUaModel
from edge_agent.publish.publisher import MAX_INFLIGHT_WINDOW, MqttSettings
from tests.conftest import MTD

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config.example.yaml"

SECTIONS: dict[str, type[BaseModel]] = {
    "thresholds": cfg.ThresholdOverrides,
    "batching": cfg.Batching,
    "mqtt": cfg.MqttModel,
    "archive": cfg.ArchiveModel,
    "metrics": cfg.MetricsSettings,
    "sparkplug": cfg.SparkplugModel,
    "opcua": OpcUaModel,
    "modbus": ModbusModel,
    "drift": cfg.DriftModel,
    "liveview": cfg.LiveViewModel,
    "audit": AuditModel,
    "shadow": ShadowModel,
}

MINIMAL = """\
bundle: bundle
cameras:
  - id: cam1
    source: images
"""


def _checked(config: cfg.Config) -> tuple[Bundle, Thresholds]:
    """The top-level bundle and the thresholds in force for it (config over bundle)."""
    assert config.bundle is not None
    bundle = load_bundle(config.bundle)
    return bundle, thresholds_for(config, bundle)


def _write(folder: Path, text: str, name: str = "config.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def _error(path: Path) -> str:
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message  # one line
    assert message.startswith(f"{path}: ")
    return message[len(f"{path}: ") :]


def test_minimal_config_gets_defaults_and_resolves_relative_paths(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL)
    c = load_config(path)
    assert c.bundle == tmp_path / "bundle"
    assert c.cameras[0].source == str(tmp_path / "images")
    assert c.cameras[0].overflow == "auto" and c.cameras[0].mode == "continuous"
    assert c.device == "auto" and c.index == "auto" and c.threads is None
    assert c.batching == cfg.Batching()
    assert c.thresholds == cfg.ThresholdOverrides(image=None, pixel=None)
    assert c.archive is None
    assert c.metrics.port == 9108 and c.metrics.host == "127.0.0.1"
    assert c.mqtt.port == 1883 and c.mqtt.spool_dir == Path("/var/lib/edge-agent/spool")
    assert c.mqtt.client_id.startswith("edge-agent-line1-")
    assert c.health_interval_s == 10.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.device = "cpu"  # type: ignore[misc]


def test_sources_that_are_not_paths_stay_as_given(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
bundle: /abs/bundle
cameras:
  - {id: usb, source: 0}
  - {id: usb2, source: "1"}
  - {id: dev, source: /dev/video2}
  - {id: ip, source: "rtsp://user:pw@10.0.0.5/stream"}
  - {id: vid, source: ~/clip.mp4}
""",
    )
    c = load_config(path)
    assert [cam.source for cam in c.cameras] == [
        0,
        "1",
        "/dev/video2",
        "rtsp://user:pw@10.0.0.5/stream",
        str(Path("~/clip.mp4").expanduser()),
    ]
    assert c.bundle == Path("/abs/bundle")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "devcie: cpu\n", "devcie: unknown key (did you mean 'device'?)"),
        (MINIMAL + "mqtt:\n  prot: 1883\n", "mqtt.prot: unknown key (did you mean 'port'?)"),
        (
            "bundle: b\ncameras:\n  - id: a\n    source: x\n    fps: 5\n",
            "cameras[0].fps: unknown key",
        ),
        (MINIMAL + "mqtt:\n  port: abc\n", "mqtt.port: must be an integer, got 'abc' (str)"),
        # A password typed as a number must not end up in a log or a terminal.
        (MINIMAL + "mqtt:\n  password: 918273645\n", "mqtt.password: must be a string, got int"),
        (MINIMAL + "mqtt:\n  port: true\n", "mqtt.port: must be an integer, got True (boolean)"),
        (MINIMAL + "mqtt:\n  port: 70000\n", "mqtt.port: must be at most 65535, got 70000"),
        (MINIMAL + "batching:\n  max_batch: 2.5\n", "batching.max_batch: must be an integer"),
        (MINIMAL + "batching:\n  max_batch: 0\n", "batching.max_batch: must be at least 1"),
        (MINIMAL + "device: gpu\n", "device: must be one of auto, cpu, cuda, got 'gpu'"),
        (MINIMAL + "thresholds:\n  image: -1\n", "thresholds.image: must be more than 0"),
        (MINIMAL + "thresholds: 3\n", "thresholds: must be a mapping of keys, got 3 (int)"),
        (MINIMAL + "archive:\n  save_ok: yes please\n", "archive.save_ok: must be true or false"),
        (MINIMAL + "metrics:\n  host: ''\n", "metrics.host: must not be empty"),
        (
            "cameras:\n  - {id: a, source: x}\n",
            "bundle: give either bundle (one model for every camera) or recipes",
        ),
        ("bundle: b\n", "cameras: missing"),
        ("bundle: b\ncameras: []\n", "cameras: must be a non-empty list"),
        (
            "bundle: b\ncameras:\n  - {id: a, source: x}\n  - {id: b}\n",
            "cameras[1].source: missing",
        ),
        ("bundle: b\ncameras:\n  - {id: a, source: x}\n  - {id: a, source: y}\n", "cameras[1].id"),
        ("bundle: b\ncameras:\n  - {id: 'a/b', source: x}\n", "cameras[0].id: 'a/b' must be"),
        (
            "bundle: b\ncameras:\n  - {id: a, source: x, mode: triggered}\n",
            "cameras[0].mode: must be one of continuous, trigger",
        ),
        (
            "bundle: b\ncameras:\n  - {id: a, source: 0, reconnect_initial_s: 5, "
            "reconnect_max_s: 1}\n",
            "cameras[0].reconnect_max_s: must not be less than reconnect_initial_s",
        ),
        (MINIMAL + "mqtt:\n  prefix: 'a/+/b'\n", "mqtt.prefix: 'a/+/b' must be topic levels"),
        (MINIMAL + "mqtt:\n  password: x\n", "mqtt.password is set but mqtt.username is not"),
        ("- just\n- a list\n", "must be a mapping of keys, got ['just', 'a list'] (list)"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in _error(_write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("mqtt:\n  password: 918273645\n", "mqtt.password"),
        ("mqtt:\n  password: [918273645]\n", "mqtt.password"),
        ("mqtt:\n  - password: 918273645\n", "mqtt"),  # a section written as a list
    ],
)
def test_a_mistyped_password_is_not_echoed(tmp_path: Path, text: str, key: str) -> None:
    path = _write(tmp_path, MINIMAL + text)
    error = _error(path)
    assert "918273645" not in error and error.startswith(f"{key}: ")
    with pytest.raises(UserError) as info:
        load_config(path)
    # Nor anywhere in what a traceback of it would print: pydantic's error holds the input.
    assert info.value.__context__ is None and info.value.__cause__ is None


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "bundle: b\ncameras:\n  - id: a\n   source: [x\n")
    message = _error(path)
    assert message.startswith("line 4, column ") and "invalid YAML" in message


def test_missing_empty_and_unreadable_files(tmp_path: Path) -> None:
    assert _error(tmp_path / "nope.yaml") == "no such config file"
    assert "the config is empty" in _error(_write(tmp_path, "# nothing\n"))
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    assert "cannot read the config" in _error(folder)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00bundle")
    assert "cannot read the config" in _error(binary)


def test_password_file_tls_files_and_publisher_rules(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    path = _write(
        tmp_path, MINIMAL + "mqtt:\n  username: agent\n  password_file: pw\n  port: 8883\n"
    )
    c = load_config(path)
    assert c.mqtt.password == "s3cret" and "s3cret" not in repr(c)
    path = _write(tmp_path, MINIMAL + "mqtt:\n  username: a\n  password_file: missing\n")
    assert "mqtt.password_file: cannot read" in _error(path)
    (tmp_path / "ca.pem").write_text("x")
    path = _write(tmp_path, MINIMAL + "mqtt:\n  ca_file: ca.pem\n")
    assert "need mqtt.tls: true" in _error(path)  # the publisher's own rule, with the file
    path = _write(tmp_path, MINIMAL + "mqtt:\n  tls: true\n  ca_file: ca.pem\n")
    assert load_config(path).mqtt.ca_file == tmp_path / "ca.pem"


def test_schema_covers_the_settings_dataclasses() -> None:
    """A field added to CameraSettings or MqttSettings must be configurable (and vice versa)."""
    assert set(cfg.CameraModel.model_fields) == {f.name for f in dataclasses.fields(CameraSettings)}
    config_only = {"password_file", "health_interval_s"}
    mqtt_keys = set(cfg.MqttModel.model_fields) - config_only
    assert mqtt_keys == {f.name for f in dataclasses.fields(MqttSettings)}
    archive_keys = set(cfg.ArchiveModel.model_fields)
    assert archive_keys == {f.name for f in dataclasses.fields(ArchiveSettings)}
    # ... and its defaults are the dataclasses' own (client_id None: derived from the line).
    for model, settings in (
        (cfg.CameraModel, CameraSettings),
        (cfg.MqttModel, MqttSettings),
        (cfg.ArchiveModel, ArchiveSettings),
    ):
        for f in dataclasses.fields(settings):
            if f.default is dataclasses.MISSING or (settings, f.name) == (
                MqttSettings,
                "client_id",
            ):
                continue
            assert model.model_fields[f.name].default == f.default, f"{settings.__name__}.{f.name}"


def test_choices_and_limits_are_the_implementing_modules_own(tmp_path: Path) -> None:
    accepted = _accepted_choices()
    assert accepted["index"] == set(INDEX_KINDS) and accepted["device"] == set(DEVICES)
    window = f"{MINIMAL}mqtt:\n  inflight_window: {MAX_INFLIGHT_WINDOW}\n"
    assert load_config(_write(tmp_path, window)).mqtt.inflight_window == MAX_INFLIGHT_WINDOW
    too_many = window.replace(f": {MAX_INFLIGHT_WINDOW}", f": {MAX_INFLIGHT_WINDOW + 1}")
    message = _error(_write(tmp_path, too_many))
    assert message.startswith(f"mqtt.inflight_window: must be at most {MAX_INFLIGHT_WINDOW},")


def test_example_documents_every_key_and_loads(tmp_path: Path, small_bundle: Path) -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    # `recipes` is the alternative to `bundle`: documented commented out, checked below.
    assert set(raw) == set(cfg.ConfigModel.model_fields) - {"recipes"}
    for name, model in SECTIONS.items():
        assert set(raw[name]) == set(model.model_fields), name
    assert set(raw["cameras"][0]) == set(cfg.CameraModel.model_fields)
    # Every documented value is the real default (apart from the required keys and the
    # paths the example points at /var/lib/edge-agent).
    top = cfg.ConfigModel.model_fields
    for key, value in raw.items():
        if key not in ("bundle", "cameras", *SECTIONS):
            assert value == top[key].default, key
    for key, value in raw["cameras"][0].items():
        if key not in ("id", "source"):
            assert value == cfg.CameraModel.model_fields[key].default, f"cameras[0].{key}"
    for section, model in SECTIONS.items():
        for key, value in raw[section].items():
            if (section, key) not in (("mqtt", "spool_dir"), ("archive", "dir")):
                default = model.model_fields[key].get_default(call_default_factory=True)
                assert value == default, f"{section}.{key}"

    text = EXAMPLE.read_text().replace(
        "bundle: /var/lib/edge-agent/bundle", f"bundle: {small_bundle}"
    )
    path = _write(tmp_path, text)
    c = load_config(path)
    assert c.cameras[0].source == 0 and c.archive is not None
    with pytest.raises(UserError, match=r"thresholds\.image: not set .* `edge-agent calibrate`"):
        _checked(c)
    path = _write(tmp_path, text.replace("  image: null", "  image: 3.5"))
    with pytest.raises(UserError, match=r"thresholds\.pixel: not set"):
        _checked(load_config(path))
    path = _write(
        tmp_path, text.replace("  image: null", "  image: 3.5").replace("pixel: null", "pixel: 3")
    )
    bundle, thresholds = _checked(load_config(path))
    assert (thresholds.image, thresholds.pixel) == (3.5, 3.0)
    assert bundle.model_id


def _example_station(tmp_path: Path, small_bundle: Path) -> str:
    """config.example.yaml with its commented `recipes:` block switched on and `bundle` off,
    every path in the block pointed at something real."""
    text = EXAMPLE.read_text()
    begin, end = "# --- recipes (begin) ---\n", "# --- recipes (end) ---\n"
    block = text[text.index(begin) + len(begin) : text.index(end)]
    live = "".join(line[2:] + "\n" for line in block.splitlines())
    mask = tmp_path / "mask.png"
    cv2.imwrite(str(mask), np.zeros((160, 240), dtype=np.uint8))
    live = live.replace("/var/lib/edge-agent/masks/cap-date-code.png", str(mask))
    live = re.sub(r"/var/lib/edge-agent/bundles/[\w-]+", str(small_bundle), live)
    return text.replace("bundle: /var/lib/edge-agent/bundle\n", live, 1)


def test_example_station_documents_every_key_and_loads(tmp_path: Path, small_bundle: Path) -> None:
    text = _example_station(tmp_path, small_bundle)
    raw = yaml.safe_load(text)
    recipes = raw["recipes"]
    settings = {k: v for k, v in recipes.items() if k in cfg.RecipesModel.model_fields}
    assert set(settings) == set(cfg.RecipesModel.model_fields)
    for key, value in settings.items():
        assert value == cfg.RecipesModel.model_fields[key].default, f"recipes.{key}"
    first = recipes["bottle-a"]["inspections"][0]
    assert set(recipes["bottle-a"]) == set(cfg.RecipeModel.model_fields)
    assert set(first) == set(cfg.InspectionModel.model_fields)
    c = load_config(_write(tmp_path, text))
    assert c.bundle is None and c.station.active == "bottle-a"
    cap, label = c.station.recipes["bottle-a"].inspections
    assert (cap.roi, cap.ignore.shape, label.roi) == (
        (200, 40, 240, 160),
        (160, 240),
        (180, 220, 280, 200),
    )
    assert c.station.recipes["bottle-b"].number == 2


def test_bundle_thresholds_are_used_and_config_overrides_them(
    tmp_path: Path, small_bundle: Path
) -> None:
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle_dir)
    update_thresholds(bundle_dir, {"image": 30.0, "pixel": 28.0})
    path = _write(tmp_path, "bundle: bundle\ncameras:\n  - {id: a, source: 0}\n")
    _, t = _checked(load_config(path))
    assert (t.image, t.pixel) == (30.0, 28.0)
    path = _write(
        tmp_path, "bundle: bundle\nthresholds: {image: 33}\ncameras: [{id: a, source: 0}]"
    )
    _, t = _checked(load_config(path))
    assert (t.image, t.pixel) == (33.0, 28.0)


def test_unusable_bundle_is_reported_under_the_bundle_key(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL)
    with pytest.raises(UserError) as info:
        load_station(load_config(path))
    assert str(info.value) == f"{path}: bundle: bundle {tmp_path / 'bundle'}: no such folder"


# -- documented choices == accepted choices, through `run --check` -------------------------


def _documented_choices() -> dict[str, set[str]]:
    """The "# one of: a, b" line right above a key in the example, by key path."""
    found: dict[str, set[str]] = {}
    pending: set[str] | None = None
    section = ""
    for n, line in enumerate(EXAMPLE.read_text().splitlines(), 1):
        if choices := re.fullmatch(r"\s*#\s*one of:\s*(.+)", line):
            pending = {c.strip() for c in choices[1].split(",")}
            continue
        key = re.match(r"(\s*)(?:-\s+)?(\w+):", line)
        if key and not key[1]:
            section = key[2]
        if pending is not None:
            assert key, f"config.example.yaml:{n}: a 'one of' line must be right above its key"
            found[key[2] if not key[1] else f"{section}.{key[2]}"] = pending
        pending = None
    return found


def _accepted_choices(
    model: type[BaseModel] = cfg.ConfigModel, prefix: str = ""
) -> dict[str, set[Any]]:
    """Every Literal field of the schema, by key path (a list's items without an index)."""
    found: dict[str, set[Any]] = {}
    for name, field in model.model_fields.items():
        if get_origin(field.annotation) is Literal:
            found[prefix + name] = set(get_args(field.annotation))
        inner = [field.annotation, *get_args(field.annotation)]
        for sub in inner:
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                found |= _accepted_choices(sub, f"{prefix}{name}.")
    return found


DOCUMENTED = _documented_choices()


def test_the_example_documents_exactly_the_accepted_choices() -> None:
    assert {"index", "device", "log_level", "cameras.kind"} <= set(DOCUMENTED)
    assert _accepted_choices() == DOCUMENTED


@pytest.fixture
def keep_log_level() -> Iterator[None]:
    """`run` sets the root logger to the config's log_level; later tests must not inherit it."""
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def _run_check(
    folder: Path, bundle: Path, top: str = "", camera: str = "", source: str = "0"
) -> tuple[int, str]:
    text = f"bundle: {bundle}\n{top}cameras:\n  - {{id: a, source: {source}{camera}}}\n"
    path = _write(folder, text)
    return cli.main(["run", "--config", str(path), "--check"]), str(path)


@pytest.mark.usefixtures("keep_log_level")
def test_run_check_accepts_the_ivf_index(
    tmp_path: Path, calibrated_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Documented and accepted by evaluate/bench, once refused by `run` alone.
    code, path = _run_check(tmp_path, calibrated_bundle, top="index: ivf\nivf_nprobe: 4\n")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"{path}: OK: 1 camera(s)" in out and "image 30 pixel 28" in out
    assert load_config(path).index == "ivf"


@pytest.mark.usefixtures("keep_log_level")
@pytest.mark.parametrize(
    ("key", "value"), [(k, v) for k, values in sorted(DOCUMENTED.items()) for v in sorted(values)]
)
def test_run_check_accepts_every_documented_choice(
    tmp_path: Path,
    calibrated_bundle: Path,
    capsys: pytest.CaptureFixture[str],
    key: str,
    value: str,
) -> None:
    if key.startswith("cameras."):
        source = "0"
        if value in ("file", "folder"):  # --check looks for the source: give it a real one
            (tmp_path / "frames").mkdir()
            shutil.copy(next((MTD / "test" / "good").iterdir()), tmp_path / "frames")
            (tmp_path / "video.mp4").write_bytes(b"")
            source = "frames" if value == "folder" else "video.mp4"
        camera = f", {key[8:]}: {value}"
        code, _ = _run_check(tmp_path, calibrated_bundle, camera=camera, source=source)
    elif "." in key:  # a key of a section: written nested
        section, name = key.split(".", 1)
        code, _ = _run_check(tmp_path, calibrated_bundle, top=f"{section}: {{{name}: {value}}}\n")
    else:
        code, _ = _run_check(tmp_path, calibrated_bundle, top=f"{key}: {value}\n")
    out, err = capsys.readouterr()
    assert code == 0 and "OK: 1 camera(s)" in out, err


def test_duplicate_keys_are_refused_with_their_line(tmp_path: Path) -> None:
    # PyYAML alone keeps the last value: a second `port:` would silently win.
    path = _write(tmp_path, MINIMAL + "mqtt:\n  port: 1883\n  host: a\n  port: 8883\n")
    message = _error(path)
    assert "duplicate key 'port'" in message and message.startswith("line 8, column 3:")


def test_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    # Where a value is shown in an error (here a wrong type), expanding it would take hours.
    text = MINIMAL.replace("bundle: bundle", "bundle: *a8")
    path = _write(tmp_path, "\n".join(lines) + "\n" + text)
    started = time.perf_counter()
    assert "aliases (*name) are not allowed" in _error(path)
    assert time.perf_counter() - started < 1.0


def test_huge_and_deeply_nested_files_are_refused(tmp_path: Path) -> None:
    big = _write(tmp_path, MINIMAL + "# " + "x" * (2 * 1024 * 1024) + "\n", "big.yaml")
    assert "larger than 1024 KiB" in _error(big)
    deep = _write(tmp_path, "bundle: " + "[" * 50_000 + "]" * 50_000 + "\n", "deep.yaml")
    assert "invalid YAML" in _error(deep)


STATION = """\
cameras:
  - {id: cam1, source: images}
  - {id: cam2, source: images}
recipes:
  active: bottle-a
  bottle-a:
    number: 1
    inspections:
      - {id: cap, camera: cam1, roi: [0, 0, 30, 20], ignore: mask.png, bundle: b1}
      - {id: label, camera: cam2, bundle: b2, thresholds: {image: 3.0}}
  bottle-b:
    number: 2
    inspections:
      - {id: cap, camera: cam1, bundle: b1}
"""


def _station(tmp_path: Path, text: str) -> Path:
    cv2.imwrite(str(tmp_path / "mask.png"), np.full((20, 30), 255, dtype=np.uint8))
    cv2.imwrite(str(tmp_path / "color.png"), np.zeros((20, 30, 3), dtype=np.uint8))
    return _write(tmp_path, text)


def test_a_station_loads_as_written(tmp_path: Path) -> None:
    c = load_config(_station(tmp_path, STATION))
    book = c.station
    assert c.bundle is None and book.active == "bottle-a" and book.preload
    assert book.part_timeout_s == 2.0
    cap, label = book.recipes["bottle-a"].inspections
    assert (cap.camera, cap.roi, cap.bundle) == ("cam1", (0, 0, 30, 20), tmp_path / "b1")
    assert cap.ignore is not None and cap.ignore.shape == (20, 30) and cap.ignore.all()
    assert (label.roi, label.ignore, label.image_threshold) == (None, None, 3.0)
    assert book.recipes["bottle-b"].number == 2
    assert book.bundles() == (tmp_path / "b1", tmp_path / "b2")


def test_a_top_level_bundle_is_one_recipe_of_whole_frames(tmp_path: Path) -> None:
    c = load_config(_write(tmp_path, MINIMAL + "  - {id: cam2, source: images}\n"))
    (recipe,) = c.station.recipes.values()
    assert (recipe.name, recipe.number, c.station.active) == ("default", 1, "default")
    assert [(i.id, i.camera, i.roi) for i in recipe.inspections] == [
        ("cam1", "cam1", None),
        ("cam2", "cam2", None),
    ]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("number: 2", "number: 1"), "recipes.bottle-b.number: 1 is recipe bottle-a's too"),
        (("active: bottle-a", "active: bottle-c"), "recipes.active: no recipe named 'bottle-c'"),
        (("camera: cam2", "camera: cam3"), "recipes.bottle-a.inspections[1].camera: no camera"),
        (("[0, 0, 30, 20]", "[0, 0, 0, 20]"), "inspections[0].roi: width and height must be"),
        (("[0, 0, 30, 20]", "[-1, 0, 30, 20]"), "inspections[0].roi: x and y must be 0 or more"),
        (("[0, 0, 30, 20]", "[0, 0, 30.5, 20]"), "inspections[0].roi: must be [x, y, width,"),
        (("[0, 0, 30, 20]", "[0, 0, 31, 20]"), "inspections[0].ignore: "),
        (("ignore: mask.png", "ignore: color.png"), "has 3 channels; a mask has one"),
        (("ignore: mask.png", "ignore: gone.png"), "is not a readable image"),
        (("id: label", "id: cap"), "bottle-a.inspections[1].id: 'cap' is used by another"),
        (
            ("      - {id: cap, camera: cam1, bundle: b1}\n", "      []\n"),
            "recipes.bottle-b.inspections: a recipe needs at least one inspection",
        ),
        (("  bottle-b:", "  'bottle b':"), "a recipe name is letters, digits"),
        (("active: bottle-a", "prelaod: true"), "recipes.prelaod: unknown key (did you mean"),
        (("roi: [0, 0, 30, 20]", "rio: [0, 0, 30, 20]"), "inspections[0].rio: unknown key"),
        (("number: 2", "number: 40000"), "recipes.bottle-b.number: must be at most 32767"),
        (("recipes:\n", "bundle: b1\nrecipes:\n"), "bundle: give either bundle"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_station_mistakes_name_the_key(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    old, new = change
    assert old in STATION
    assert expected in _error(_station(tmp_path, STATION.replace(old, new, 1)))


def test_recipes_need_a_recipe(tmp_path: Path) -> None:
    text = "cameras: [{id: cam1, source: images}]\nrecipes: {active: null}\n"
    assert "recipes: no recipe: add one" in _error(_write(tmp_path, text))
