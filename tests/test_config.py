"""Config loading: one clear line naming the key for every mistake; the example stays true."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from edge_agent.agent import config as cfg
from edge_agent.agent.config import load_checked_bundle, load_config
from edge_agent.capture.cameras import CameraSettings
from edge_agent.errors import UserError
from edge_agent.model.bundle import update_thresholds
from edge_agent.publish.publisher import MqttSettings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config.example.yaml"

MINIMAL = """\
bundle: bundle
cameras:
  - id: cam1
    source: images
"""


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
    assert c.device == "auto" and c.index == "flat" and c.threads is None
    assert c.batching == cfg.Batching()
    assert c.thresholds == cfg.ThresholdOverrides(None, None)
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
        ("cameras:\n  - {id: a, source: x}\n", "bundle: missing"),
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


def test_a_mistyped_password_is_not_echoed(tmp_path: Path) -> None:
    error = _error(_write(tmp_path, MINIMAL + "mqtt:\n  password: 918273645\n"))
    assert "918273645" not in error and "mqtt.password" in error


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
    assert set(cfg.CAMERA) == {f.name for f in dataclasses.fields(CameraSettings)}
    config_only = {"password_file", "health_interval_s"}
    assert set(cfg.MQTT) - config_only == {f.name for f in dataclasses.fields(MqttSettings)}


def test_example_documents_every_key_and_loads(tmp_path: Path, small_bundle: Path) -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    assert set(raw) == set(cfg.TOP) | set(cfg.SECTIONS)
    for name, schema in (
        ("thresholds", cfg.THRESHOLDS),
        ("batching", cfg.BATCHING),
        ("mqtt", cfg.MQTT),
        ("archive", cfg.ARCHIVE),
        ("metrics", cfg.METRICS),
    ):
        assert set(raw[name]) == set(schema), name
    assert set(raw["cameras"][0]) == set(cfg.CAMERA)
    # Every documented value is the real default (apart from the required keys and the
    # paths the example points at /var/lib/edge-agent).
    defaults = {k: f.default for k, f in cfg.MQTT.items()}
    for key, value in raw["mqtt"].items():
        if key != "spool_dir":
            assert value == defaults[key], f"mqtt.{key}"
    for key, value in raw["cameras"][0].items():
        if key not in ("id", "source"):
            assert value == cfg.CAMERA[key].default, f"cameras[0].{key}"
    for section, schema in (("batching", cfg.BATCHING), ("archive", cfg.ARCHIVE)):
        for key, value in raw[section].items():
            if key != "dir":
                assert value == schema[key].default, f"{section}.{key}"

    text = EXAMPLE.read_text().replace(
        "bundle: /var/lib/edge-agent/bundle", f"bundle: {small_bundle}"
    )
    path = _write(tmp_path, text)
    c = load_config(path)
    assert c.cameras[0].source == 0 and c.archive is not None
    with pytest.raises(UserError, match=r"thresholds\.image: not set .* `edge-agent calibrate`"):
        load_checked_bundle(c)
    path = _write(tmp_path, text.replace("  image: null", "  image: 3.5"))
    with pytest.raises(UserError, match=r"thresholds\.pixel: not set"):
        load_checked_bundle(load_config(path))
    path = _write(
        tmp_path, text.replace("  image: null", "  image: 3.5").replace("pixel: null", "pixel: 3")
    )
    bundle, thresholds = load_checked_bundle(load_config(path))
    assert (thresholds.image, thresholds.pixel) == (3.5, 3.0)
    assert bundle.model_id


def test_bundle_thresholds_are_used_and_config_overrides_them(
    tmp_path: Path, small_bundle: Path
) -> None:
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle_dir)
    update_thresholds(bundle_dir, {"image": 30.0, "pixel": 28.0})
    path = _write(tmp_path, "bundle: bundle\ncameras:\n  - {id: a, source: 0}\n")
    _, t = load_checked_bundle(load_config(path))
    assert (t.image, t.pixel) == (30.0, 28.0)
    path = _write(
        tmp_path, "bundle: bundle\nthresholds: {image: 33}\ncameras: [{id: a, source: 0}]"
    )
    _, t = load_checked_bundle(load_config(path))
    assert (t.image, t.pixel) == (33.0, 28.0)


def test_unusable_bundle_is_reported_under_the_bundle_key(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL)
    with pytest.raises(UserError) as info:
        load_checked_bundle(load_config(path))
    assert str(info.value) == f"{path}: bundle: bundle {tmp_path / 'bundle'}: no such folder"
