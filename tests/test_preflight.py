"""`run --check` finds what the run would trip over: one line naming the key, exit 2."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent import cli
from tests.conftest import MTD, unavailable


@pytest.fixture
def bundle(calibrated_bundle: Path) -> Path:
    return calibrated_bundle


@pytest.fixture(autouse=True)
def keep_log_level() -> Iterator[None]:
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def _check(tmp_path: Path, bundle: Path, camera: str, extra: str = "") -> int:
    """`run --check` on a config; `extra` replaces the default mqtt/metrics/archive lines."""
    sections = {
        "mqtt": f"mqtt: {{spool_dir: {tmp_path}/spool}}",
        "metrics": "metrics: {port: null}",
    }
    for line in extra.splitlines():
        sections[line.split(":")[0]] = line
    config = tmp_path / "config.yaml"
    config.write_text(f"bundle: {bundle}\ncameras:\n  - {camera}\n" + "\n".join(sections.values()))
    return cli.main(["run", "--config", str(config), "--check"])


def test_a_good_config_passes(
    tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    shutil.copy(next((MTD / "test" / "good").iterdir()), frames)
    code = _check(tmp_path, bundle, f"{{id: a, source: {frames}}}")
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("setup", "camera", "extra", "expected"),
    [
        (None, "{id: a, source: missing/}", "", "cameras[0].source: "),
        ("empty", "{id: a, source: empty, kind: folder}", "", "no images found"),
        (None, "{id: a, source: gone.mp4, kind: file}", "", "gone.mp4: no such video file"),
        (
            "ca",
            "{id: a, source: 0}",
            "mqtt: {tls: true, ca_file: ca.pem, spool_dir: spool}",
            "mqtt.ca_file",
        ),
        ("file", "{id: a, source: 0}", "archive: {dir: afile/sub}", "archive.dir: "),
        ("port", "{id: a, source: 0}", "metrics: {port: PORT}", "metrics.port: cannot listen"),
        ("file", "{id: a, source: 0}", "audit: {path: afile/audit.jsonl}", "audit.path: "),
        (
            "tokens",
            "{id: a, source: 0}",
            "liveview: {enabled: true, port: 0, tokens_file: tokens.txt}",
            "liveview.tokens_file: ",
        ),
        (
            None,
            "{id: a, source: 0}",
            "liveview: {enabled: true, port: 0, tokens_file: nowhere.txt}",
            "cannot read",
        ),
    ],
)
def test_what_the_run_would_trip_over(
    tmp_path: Path,
    bundle: Path,
    capsys: pytest.CaptureFixture[str],
    setup: str | None,
    camera: str,
    extra: str,
    expected: str,
) -> None:
    holder = None
    if setup == "empty":
        (tmp_path / "empty").mkdir()
    elif setup == "ca":
        (tmp_path / "ca.pem").write_text("not a certificate\n")
    elif setup == "file":
        (tmp_path / "afile").write_text("a file where a folder should be\n")
    elif setup == "tokens":
        (tmp_path / "tokens.txt").write_text("a-plain-token-not-a-hashed-entry\n")
    elif setup == "port":
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        extra = extra.replace("PORT", str(holder.getsockname()[1]))
    try:
        code = _check(tmp_path, bundle, camera, extra)
    finally:
        if holder is not None:
            holder.close()
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and expected in err, err


def test_a_read_only_spool_is_one_line_at_run_time(
    tmp_path: Path,
    bundle: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A real read-only filesystem (root can write anywhere else): before, ~30 lines of
    # traceback from the final health message came before the right one-line error.
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)])
    if mounted.returncode != 0:
        unavailable("cannot mount a read-only tmpfs here (needs root)")
    try:
        frames = tmp_path / "frames"
        frames.mkdir()
        shutil.copy(next((MTD / "test" / "good").iterdir()), frames)
        config = tmp_path / "config.yaml"
        config.write_text(
            f"bundle: {bundle}\ncameras:\n  - {{id: a, source: {frames}}}\n"
            f"mqtt: {{spool_dir: {ro}/spool}}\nmetrics: {{port: null}}\n"
        )
        code = cli.main(["run", "--config", str(config), "--exit-when-done"])
    finally:
        subprocess.run(["umount", str(ro)], check=False)
    err = capsys.readouterr().err
    assert code == 2
    assert not [r.getMessage() for r in caplog.records if r.exc_info], "a traceback was logged"
    assert err.strip().splitlines()[-1].startswith("edge-agent: error: spool folder ")
