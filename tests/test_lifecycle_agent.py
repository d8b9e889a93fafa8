"""Changing a model on a running line, end to end: a real agent process on a real Mosquitto,
driven by the real CLI (edge-agent shadow/promote/rollback/confirm) over MQTT. A worse
candidate (fit on four images) shows would-be false rejects and fails its gate; a better one
is promoted at one frame boundary with no frame lost; rollback gives back the old bundle's
exact scores; a confirmed defect that a candidate would pass blocks promote and teach until
--force, which the audit trail records."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import pytest
from prometheus_client import CollectorRegistry

from edge_agent.agent.config import Config, load_config
from edge_agent.agent.lifecycle import LineChanges, apply_promotions
from edge_agent.agent.models import Model, Run
from edge_agent.images import list_images
from edge_agent.lifecycle.audit import AuditLog
from edge_agent.model.bundle import Bundle, update_thresholds
from edge_agent.model.scorer import Scorer
from edge_agent.station.recipes import Recipe
from tests.brokers import Broker, Subscriber
from tests.conftest import small_fit_options, stop_agent

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "edge-agent/line1"
VERDICTS = f"{PREFIX}/cam/verdict"
SHADOW = f"{PREFIX}/shadow"
# Measured on these frames (160x120): the 60-image bundle scores good tiles 28-35, the
# 4-image one 34-42; at 35 the first passes every good tile, the second rejects nearly all.
THRESHOLDS = {"image": 35.0, "pixel": 35.0}


@pytest.fixture(scope="module")
def folder(mtd_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 good tiles and 12 defects, one size."""
    out = tmp_path_factory.mktemp("lifecycle_frames")
    paths = [*list_images(mtd_small / "test" / "good")]
    for defect in ("crack", "blowhole"):
        paths += list_images(mtd_small / "test" / defect)
    for i, path in enumerate(paths):
        cv2.imwrite(str(out / f"{i:03d}.png"), cv2.resize(cv2.imread(str(path)), (160, 120)))
    return out


@pytest.fixture(scope="module")
def bundles(
    mtd_small: Path, small_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """good: the 60-image bundle; worse: the same fit on 4 images; both calibrated alike."""
    from edge_agent.export.fit import fit

    root = tmp_path_factory.mktemp("lifecycle_bundles")
    few = root / "few"
    (few / "train" / "good").mkdir(parents=True)
    for f in sorted((mtd_small / "train" / "good").iterdir())[:4]:
        shutil.copy(f, few / "train" / "good" / f.name)
    fit(few, root / "worse", small_fit_options())
    shutil.copytree(small_bundle, root / "good")
    for name in ("good", "worse"):
        update_thresholds(root / name, dict(THRESHOLDS))
    return {"good": root / "good", "worse": root / "worse"}


def _config(tmp_path: Path, bundle: Path, folder: Path, port: int, **shadow: object) -> Path:
    settings = {"enabled": True, "min_frames": 20, "report_interval_s": 0.3, **shadow}
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"bundle: {bundle}\n"
        "batching: {max_batch: 4, max_wait_ms: 0, queue_size: 4}\n"
        f"cameras:\n  - {{id: cam, source: {folder}, loop: true}}\n"
        f"mqtt: {{port: {port}, spool_dir: {tmp_path / 'spool'}}}\n"
        "metrics: {port: null}\n"
        f"archive: {{dir: {tmp_path / 'archive'}}}\n"
        f"audit: {{path: {tmp_path / 'audit.jsonl'}}}\n"
        f"shadow: {json.dumps(settings)}\n"
    )
    return config


def _agent(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _wait(sub: Subscriber, predicate, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"timed out or the agent exited ({proc.returncode}):\n{out[-3000:]}")
        time.sleep(0.1)


def _shadow(sub: Subscriber) -> dict | None:
    """The latest shadow report's first entry."""
    reports = [r for r in sub.json(SHADOW) if r["shadows"]]
    return reports[-1]["shadows"][0] if reports else None


def _compared(sub: Subscriber, n: int, model_id: str) -> bool:
    report = _shadow(sub)
    return (
        report is not None
        and report["state"] == "running"
        and report["candidate"]["model_id"] == model_id
        and report["frames"] >= n
    )


def _model_id(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["model_id"]


def _audit(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


@dataclass
class FakeLine:
    """The agent as LineChanges sees it (lifecycle.Line), where the door's rules need no
    models: what is in force, stopping, a recipe still loading."""

    config: Config
    stopped: bool = False
    loading: str | None = None
    installed: list[tuple[Any, ...]] = field(default_factory=list)

    @property
    def recipe(self) -> Recipe:
        return self.config.station.recipes[self.config.station.active]

    runs: dict[str, tuple[Run, ...]] = field(default_factory=dict)
    models: dict[Path, Model] = field(default_factory=dict)

    def stopping(self) -> bool:
        return self.stopped

    def loading_recipe(self) -> str | None:
        return self.loading

    def build_scorer(self, bundle: Bundle) -> Scorer:
        raise AssertionError("the door loads nothing")

    def install(self, *args: Any) -> None:
        self.installed.append(args)


def _changes(tmp_path: Path, shadow: str, audit: Path) -> tuple[LineChanges, FakeLine, list]:
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"bundle: {tmp_path / 'b'}\ncameras: [{{id: cam, source: {tmp_path}}}]\n"
        f"mqtt: {{spool_dir: {tmp_path / 'spool'}}}\n{shadow}"
    )
    line = FakeLine(load_config(config))
    sent: list[dict] = []
    changes = LineChanges(
        line,
        bases=apply_promotions(line.config)[1],
        audit=AuditLog(audit),
        archive=None,
        registry=CollectorRegistry(),
        publish_lifecycle=sent.append,
        publish_shadow=sent.append,
    )
    return changes, line, sent


def test_the_door_refuses_with_the_reason_audits_and_publishes_it(tmp_path: Path) -> None:
    off, _, sent = _changes(tmp_path, "", tmp_path / "off.jsonl")
    reason = off.command("promote", "cam", {"request_id": "r1"}, "anna", "cli")
    assert reason is not None and "shadow.enabled: false in " in reason
    assert [(m["result"], m["reason"], m["request_id"]) for m in sent] == [
        ("refused", reason, "r1")
    ]
    entry = json.loads((tmp_path / "off.jsonl").read_text())
    assert (entry["action"], entry["result"], entry["who"]) == ("promote", "refused", "anna")

    on = "shadow: {enabled: true}\n"
    changes, line, sent = _changes(tmp_path, on, tmp_path / "on.jsonl")
    bundle = tmp_path / "cand"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    start = {"bundle": str(bundle)}
    assert changes.command("shadow_stop", "nope", {}, "anna", "cli") == (
        "no inspection 'nope' in recipe default (inspections: cam)"
    )
    assert changes.command("promote", "cam", {}, "anna", "cli") == (
        "no candidate shadows cam (shadow_start first)"
    )
    assert changes.command("rollback", "cam", {}, "anna", "cli") == (
        "default/cam: no earlier bundle is kept to roll back to"
    )
    line.loading = "default"  # a recipe still loading holds up swaps, not a shadow's start
    assert changes.command("shadow_start", "cam", start, "anna", "cli") is None
    assert sent[-1]["result"] == "accepted"
    # The loop checks again: the agent began to stop after the door took it.
    line.stopped = True
    changes.between_batches()
    assert (sent[-1]["action"], sent[-1]["result"]) == ("shadow_start", "refused")
    assert sent[-1]["reason"] == "the agent is stopping" and not line.installed
    assert changes.report()["shadows"] == []


def test_a_worse_candidate_shows_false_rejects_and_fails_its_gate(
    tmp_path: Path, bundles: dict[str, Path], folder: Path
) -> None:
    good, worse = bundles["good"], bundles["worse"]
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.port, "#") as sub:
        config = _config(tmp_path, good, folder, broker.port)  # default budget: 0.25
        proc = _agent(config)
        _wait(sub, lambda: len(sub.on(VERDICTS)) >= 4, proc)
        done = _cli("shadow", "start", "--config", config, "--inspection", "cam", "--bundle", worse)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "shadow_start cam: ok" in done.stdout
        _wait(sub, lambda: _compared(sub, 24, _model_id(worse)), proc)
        refused = _cli("promote", "--config", config, "--inspection", "cam")
        report = _shadow(sub)
        out = stop_agent(proc)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "promote cam: refused: gates failed: would-be false rejects" in refused.stdout
    # The candidate decided nothing: every verdict is production's.
    got = sub.json(VERDICTS)
    assert {v["model_id"] for v in got} == {_model_id(good)}
    assert [v["sequence"] for v in got] == list(range(len(got)))
    # Within the budget: it took about a quarter of the frames and counted the rest.
    assert report is not None and report["skipped"] > report["frames"]
    assert report["false_rejects"] > 0.5 * report["passed"] > 0
    assert report["matrix"]["OK"]["NG"] == report["false_rejects"]
    assert report["quantiles"]["candidate"]["p50"] > report["quantiles"]["production"]["p50"]
    # Disagreements archived: original | production's map | the candidate's.
    shadows = sorted((tmp_path / "archive").rglob("*_shadow.json"))
    assert shadows and report["archived"] >= 1
    sidecar = json.loads(shadows[0].read_text())
    assert sidecar["panels"] == 3 and sidecar["shadow"]["candidate_verdict"] == "NG"
    image = cv2.imread(str(shadows[0].with_suffix(".jpg")))
    assert image.shape[1] == 3 * 160 + 2 * 4
    # Audited: the shadow's start, then the refusal with its reasons.
    entries = _audit(tmp_path)
    actions = [(e["action"], e["result"]) for e in entries]
    assert ("shadow.start", "ok") in actions and ("promote", "refused") in actions
    refusal = next(e for e in entries if e["action"] == "promote")
    assert "would-be false rejects" in refusal["reason"] and refusal["who"]
    assert "Traceback" not in out


def test_a_better_candidate_promotes_at_a_frame_boundary_and_rolls_back_exactly(
    tmp_path: Path, bundles: dict[str, Path], folder: Path
) -> None:
    good, worse = bundles["good"], bundles["worse"]
    old, new = _model_id(worse), _model_id(good)
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.port, "#") as sub:
        config = _config(tmp_path, worse, folder, broker.port, max_share=1.0)
        proc = _agent(config)
        n_files = len(list(folder.iterdir()))
        _wait(sub, lambda: len(sub.on(VERDICTS)) >= n_files, proc)  # a full loop, old model
        done = _cli("shadow", "start", "--config", config, "--inspection", "cam", "--bundle", good)
        assert done.returncode == 0, done.stdout + done.stderr
        _wait(sub, lambda: _compared(sub, 24, new), proc)
        promoted = _cli("promote", "--config", config, "--inspection", "cam")
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
        _wait(sub, lambda: sum(v["model_id"] == new for v in sub.json(VERDICTS)) >= 8, proc)
        back = _cli("rollback", "--config", config, "--inspection", "cam")
        assert back.returncode == 0, back.stdout + back.stderr

        def old_again() -> bool:
            got = [v["model_id"] for v in sub.json(VERDICTS)]
            return new in got and got[got.index(new) :].count(old) >= n_files

        _wait(sub, old_again, proc)
        # Regression set: an archived reject confirmed as a defect (the worse model rejects
        # good tiles the better one passes, so the better one would let it pass).
        entry = next(
            p for p in sorted((tmp_path / "archive").rglob("*_NG.json")) if "_shadow" not in p.name
        )
        confirmed = _cli("confirm", "--config", config, "--entry", entry)
        assert confirmed.returncode == 0, confirmed.stdout + confirmed.stderr
        again = _cli("shadow", "start", "--config", config, "--inspection", "cam", "--bundle", good)
        assert again.returncode == 0, again.stdout + again.stderr
        _wait(sub, lambda: _compared(sub, 24, new), proc)
        blocked = _cli("promote", "--config", config, "--inspection", "cam")
        forced = _cli("promote", "--config", config, "--inspection", "cam", "--force")
        _wait(sub, lambda: [v["model_id"] for v in sub.json(VERDICTS)][-4:] == [new] * 4, proc)
        stop_agent(proc)
    got = sub.json(VERDICTS)
    # No frame lost, and one change point each way: old, new, old, new.
    assert [v["sequence"] for v in got] == list(range(len(got)))
    runs = [got[0]["model_id"]]
    for v in got[1:]:
        if v["model_id"] != runs[-1]:
            runs.append(v["model_id"])
    assert runs == [old, new, old, new]
    # Rollback: the old bundle's exact scores, frame by frame.
    first = got.index(next(v for v in got if v["model_id"] == new))
    before = {v["source"]: v["score"] for v in got[:first]}
    later = got[first:]
    start = later.index(next(v for v in later if v["model_id"] == old))
    after = {}
    for v in later[start:]:
        if v["model_id"] != old:
            break
        after[v["source"]] = v["score"]
    assert after and all(after[s] == before[s] for s in after)
    # The confirmed defect blocked the promotion; --force went through and says so.
    assert blocked.returncode == 1 and "confirmed defect" in blocked.stdout, blocked.stdout
    assert forced.returncode == 0 and "forced past failed gates" in forced.stdout, forced.stdout
    entries = _audit(tmp_path)
    promotes = [e for e in entries if e["action"] == "promote"]
    assert [e["result"] for e in promotes] == ["ok", "refused", "ok"]
    assert promotes[0]["what"]["forced"] is False and promotes[2]["what"]["forced"] is True
    assert promotes[2]["what"]["sha256_before"] != promotes[2]["what"]["sha256_after"]
    assert [e["action"] for e in entries].count("confirm") == 1
    # The promotion outlives a restart: --check names the kept copy of the better bundle.
    check = subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr
    assert f"(model {new})" in check.stdout and "_lifecycle/bundles/" in check.stdout
    # teach re-scores the set too: it refuses a version that would pass the defect.
    regression = tmp_path / "spool" / "_lifecycle" / "regression" / "default" / "cam"
    assert len(list(regression.glob("*.png"))) == 1
    taught = tmp_path / "taught"
    goods = tmp_path / "goods"
    goods.mkdir()
    for p in sorted(folder.iterdir())[:2]:
        shutil.copy(p, goods / p.name)
    args = ("teach", "--bundle", good, "--good", goods, "--out", taught, "--regression", regression)
    refused = _cli(*args)
    assert refused.returncode == 2 and "confirmed defect" in refused.stderr, refused.stderr
    assert not taught.exists()


START_OK = ("shadow_start", "ok")


def test_nothing_changes_while_the_audit_trail_cannot_be_written(
    tmp_path: Path, calibrated_bundle: Path, folder: Path
) -> None:
    """Fail safe: a model change that cannot be recorded is refused, and the refusal reaches
    the caller; the line keeps inspecting with the model it had."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full to stand for a full disk")
    candidate = tmp_path / "candidate"
    shutil.copytree(calibrated_bundle, candidate)
    trail, kept = tmp_path / "audit.jsonl", tmp_path / "audit.kept"
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.port, "#") as sub:
        config = _config(tmp_path, calibrated_bundle, folder, broker.port, max_share=1.0)
        proc = _agent(config)
        archived = tmp_path / "archive"
        _wait(sub, lambda: any(archived.rglob("*_NG.json")), proc)
        entry = next(archived.rglob("*_NG.json"))
        start = (
            "shadow",
            "start",
            "--config",
            config,
            "--inspection",
            "cam",
            "--bundle",
            candidate,
        )
        # The disk under the trail fills up (a symlink, so that it works as root too).
        trail.rename(kept)
        trail.symlink_to("/dev/full")
        shadow = _cli(*start)
        confirm = _cli("confirm", "--config", config, "--entry", entry)
        seen = len(sub.on(VERDICTS))
        _wait(sub, lambda: len(sub.on(VERDICTS)) >= seen + 8, proc)  # the line goes on
        # The trail back: the same command goes through, so the refusal was the trail's.
        trail.unlink()
        kept.rename(trail)
        again = _cli(*start)
        out = stop_agent(proc)
    for done, action in ((shadow, "shadow_start"), (confirm, "confirm")):
        assert done.returncode == 1, done.stdout + done.stderr
        reason = rf"{action}[^:]*: refused: cannot be audited: .*No space left"
        assert re.search(reason, done.stdout), done.stdout + done.stderr
    outcomes = [(o["action"], o["result"]) for o in sub.json(f"{PREFIX}/lifecycle")]
    assert outcomes.count(START_OK) == 1
    assert outcomes.count(("shadow_start", "refused")) == 1
    assert ("confirm", "refused") in outcomes and ("confirm", "ok") not in outcomes
    assert again.returncode == 0, again.stdout + again.stderr
    # Refused means not done: no shadow ran before the trail came back, no defect confirmed.
    started = [
        r["timestamp"]
        for r in sub.json(SHADOW)
        if any(s["state"] == "running" for s in r["shadows"])
    ]
    lifecycle = sub.json(f"{PREFIX}/lifecycle")
    ok_at = next(o["timestamp"] for o in lifecycle if (o["action"], o["result"]) == START_OK)
    assert started and min(started) >= ok_at
    regression = tmp_path / "spool" / "_lifecycle" / "regression"
    assert not list(regression.rglob("*.png"))
    assert {v["model_id"] for v in sub.json(VERDICTS)} == {_model_id(calibrated_bundle)}
    # The trail is whole again: the failed writes left no hole in the chain.
    verify = _cli("audit", "verify", "--config", config)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    actions = [e["action"] for e in _audit(tmp_path)]
    assert actions.count("shadow.start") == 1 and "confirm" not in actions
    assert "Traceback" not in out
