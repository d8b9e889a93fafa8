"""The station end to end, a real agent process on a real Mosquitto: recipes switched over
MQTT at a frame boundary, several inspections per frame (ROIs), and one verdict per part from
two triggered cameras (docs/integrators/station.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from edge_agent.images import list_images
from tests.brokers import Broker, Subscriber, free_port
from tests.conftest import stop_agent

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "edge-agent/line1"
# Far above any score of the small bundle: every answer OK, no maps (this is about routing).
QUIET = "{image: 1000000.0, pixel: 1000000.0}"


@pytest.fixture(scope="module")
def folder(mtd_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 good tiles cut to one size, so that every ROI fits every frame."""
    out = tmp_path_factory.mktemp("station_frames")
    for i, path in enumerate(list_images(mtd_small / "test" / "good")[:20]):
        image = cv2.imread(str(path))
        cv2.imwrite(str(out / f"{i:03d}.png"), cv2.resize(image, (160, 120)))
    return out


def _agent(config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config), *args],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(sub: Subscriber, predicate, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate(sub.messages):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"timed out or the agent exited ({proc.returncode}):\n{out[-3000:]}")
        time.sleep(0.05)


def test_recipe_switch_mid_stream_at_a_frame_boundary(
    tmp_path: Path, small_bundle: Path, folder: Path
) -> None:
    config = tmp_path / "station.yaml"
    config.write_text(
        f"thresholds: {QUIET}\n"
        "batching: {max_batch: 4, max_wait_ms: 0, queue_size: 4}\n"
        f"cameras:\n  - {{id: cam, source: {folder}, loop: true}}\n"
        "recipes:\n"
        "  active: bottle-a\n"
        "  bottle-a:\n"
        "    number: 1\n"
        f"    inspections: [{{id: whole, camera: cam, bundle: {small_bundle}}}]\n"
        "  bottle-b:\n"
        "    number: 2\n"
        "    inspections:\n"
        f"      - {{id: left, camera: cam, roi: [0, 0, 80, 120], bundle: {small_bundle}}}\n"
        f"      - {{id: right, camera: cam, roi: [80, 0, 80, 120], bundle: {small_bundle}}}\n"
        f"mqtt: {{port: PORT, spool_dir: {tmp_path / 'spool'}}}\n"
        "metrics: {port: null}\n"
    )
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.port, "#") as sub:
        config.write_text(config.read_text().replace("PORT", str(broker.port)))
        verdicts = f"{PREFIX}/cam/verdict"
        proc = _agent(config)
        _wait(sub, lambda m: len([x for x in m if x.topic == verdicts]) >= 10, proc)
        # Malformed, unknown and oversized commands are refused with a reason, and counted.
        for payload in (b"{not json", b'{"recipe": "bottle-z"}', b"[" * 5000):
            sub.client.publish(f"{PREFIX}/recipe/set", payload, qos=1).wait_for_publish(5)
        sub.client.publish(
            f"{PREFIX}/recipe/set", json.dumps({"number": 2, "request_id": "r-1"}), qos=1
        ).wait_for_publish(5)

        def switched(_m: object) -> bool:
            got = sub.json(verdicts)
            return sum(v["recipe"] == "bottle-b" for v in got) >= 10

        _wait(sub, switched, proc)
        out = stop_agent(proc)
        sub.wait_for(
            lambda m: any(x.payload == b"offline" for x in m if x.topic.endswith("/status"))
        )
        got = sub.json(verdicts)
        states = sub.json(f"{PREFIX}/recipe")
    # Every frame answered once, in order; one change point, old recipe before, new after.
    assert [v["sequence"] for v in got] == list(range(len(got)))
    recipes = [v["recipe"] for v in got]
    change = recipes.index("bottle-b")
    assert recipes == ["bottle-a"] * change + ["bottle-b"] * (len(got) - change)
    # The boundary is the command's arrival, by capture time, whichever batch a frame was in.
    switched_at = states[-1]["changed_at"]
    assert all(v["timestamp"] <= switched_at for v in got[:change])
    assert all(v["timestamp"] >= switched_at for v in got[change:])
    assert all([i["id"] for i in v["inspections"]] == ["whole"] for v in got[:change])
    for v in got[change:]:
        assert [i["id"] for i in v["inspections"]] == ["left", "right"]
        assert all(i["verdict"] == "OK" and i["camera"] == "cam" for i in v["inspections"])
        assert v["verdict"] == "OK"
    # The state: started, three refusals with reasons, then the switch, echoing the request.
    assert [s["result"] for s in states] == ["ok", "refused", "refused", "refused", "ok"]
    assert states[0]["active"] == "bottle-a" and states[-1]["active"] == "bottle-b"
    assert states[-1]["number"] == 2 and states[-1]["request_id"] == "r-1"
    # Malformed ones are refused on arrival, an unknown name by the loop: in either order.
    reasons = " | ".join(s["reason"] for s in states[1:4])
    for words in ("not JSON", "no recipe named 'bottle-z'", "5000 bytes (at most 4096)"):
        assert words in reasons
    assert "recipe bottle-a -> bottle-b" in out and "Traceback" not in out
    # Remembered: the next start begins with bottle-b.
    assert json.loads((tmp_path / "spool" / "recipe.json").read_text()) == {"active": "bottle-b"}
    check = subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr
    assert (
        "recipe bottle-b #2" in check.stdout and "left on cam: roi [0, 0, 80, 120]" in check.stdout
    )


def test_two_triggered_cameras_give_one_verdict_per_part(
    tmp_path: Path, small_bundle: Path, folder: Path
) -> None:
    config = tmp_path / "parts.yaml"
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.port, "#") as sub:
        config.write_text(
            f"bundle: {small_bundle}\n"
            f"thresholds: {QUIET}\n"
            "batching: {max_batch: 4, max_wait_ms: 0, queue_size: 4}\n"
            "cameras:\n"
            f"  - {{id: top, source: {folder}, loop: true, mode: trigger}}\n"
            f"  - {{id: side, source: {folder}, loop: true, mode: trigger}}\n"
            f"mqtt: {{port: {broker.port}, spool_dir: {tmp_path / 'spool'}}}\n"
            f"metrics: {{port: {free_port()}}}\n"
        )
        proc = _agent(config)
        _wait(sub, lambda m: any(x.topic == f"{PREFIX}/recipe" for x in m), proc)
        time.sleep(0.5)
        for part, cameras in (
            ("P-1", ("top", "side")),
            ("P-2", ("side", "top")),
            ("P-3", ("top",)),
        ):
            for camera in cameras:
                sub.client.publish(f"{PREFIX}/{camera}/trigger", part, qos=1).wait_for_publish(5)
        _wait(sub, lambda m: len([x for x in m if x.topic == f"{PREFIX}/part"]) >= 3, proc)
        stop_agent(proc)
        parts = sub.json(f"{PREFIX}/part")
    assert [p["part_id"] for p in parts] == ["P-1", "P-2", "P-3"], "one each, in trigger order"
    for p in parts[:2]:
        assert p["schema"] == "edge-agent/part/v1" and p["recipe"] == "default"
        assert p["verdict"] == "OK" and p["missing"] == []
        assert sorted(i["id"] for i in p["inspections"]) == ["side", "top"]
    assert parts[2]["verdict"] == "ERROR" and parts[2]["missing"] == ["side"]
    assert [i["id"] for i in parts[2]["inspections"]] == ["top"]


def test_a_plc_drives_the_agent_over_modbus_and_reads_each_parts_verdict(
    tmp_path: Path, small_bundle: Path, folder: Path
) -> None:
    """The Modbus handshake end to end: the real agent, two triggered cameras, a pymodbus
    master as the PLC. Every trigger gives one part whose PASS/FAIL is the MQTT part verdict
    of the same part id; none lost, none doubled."""
    from pymodbus.client import ModbusTcpClient

    from edge_agent.model.bundle import load_bundle
    from edge_agent.model.scorer import Scorer
    from edge_agent.publish.modbus import (
        INPUT_COUNT,
        IR_RESULT_PART_ID_HIGH,
        IR_RESULT_PART_ID_LOW,
        IR_STATUS,
        Control,
        Status,
    )

    # A threshold between the frames' scores: some parts pass, some fail.
    scorer = Scorer(load_bundle(small_bundle), device="cpu", threads=2)
    scores = sorted(
        scorer.score_frames([cv2.imread(str(p)) for p in sorted(folder.iterdir())]).image_scores
    )
    threshold = float(scores[len(scores) // 2] + scores[len(scores) // 2 - 1]) / 2
    port = free_port()
    config = tmp_path / "modbus.yaml"
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.port, "#") as sub:
        config.write_text(
            f"bundle: {small_bundle}\n"
            f"thresholds: {{image: {threshold}, pixel: {threshold * 1000}}}\n"
            "batching: {max_batch: 4, max_wait_ms: 0, queue_size: 4}\n"
            "cameras:\n"
            f"  - {{id: top, source: {folder}, loop: true, mode: trigger}}\n"
            f"  - {{id: side, source: {folder}, loop: true, mode: trigger}}\n"
            f"mqtt: {{port: {broker.port}, spool_dir: {tmp_path / 'spool'}}}\n"
            "metrics: {port: null}\n"
            f"modbus: {{enabled: true, port: {port}}}\n"
        )
        proc = _agent(config)
        _wait(sub, lambda m: any(x.topic == f"{PREFIX}/recipe" for x in m), proc)
        plc = ModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=0)
        # The recipe state goes out before the Modbus server listens (the protocol births
        # carry it), so the PLC, as a real one does, retries its connect for a while.
        deadline = time.monotonic() + 30
        while not plc.connect():
            assert proc.poll() is None, "the agent exited"
            assert time.monotonic() < deadline, "the Modbus server never listened"
            time.sleep(0.1)
        shown: dict[int, str] = {}
        try:
            for part_id in range(70_000, 70_025):  # above 65535: both words carry it
                words = [part_id >> 16, part_id & 0xFFFF]
                plc.write_registers(0, [Control.TRIGGER, 0, *words], device_id=1)
                deadline = time.monotonic() + 30
                while True:
                    regs = plc.read_input_registers(0, count=INPUT_COUNT, device_id=1).registers
                    if regs[IR_STATUS] & Status.RESULT_VALID:
                        break
                    assert not regs[IR_STATUS] & Status.ERROR, regs
                    assert time.monotonic() < deadline, f"no result for {part_id}: {regs}"
                    time.sleep(0.01)
                echoed = (regs[IR_RESULT_PART_ID_HIGH] << 16) | regs[IR_RESULT_PART_ID_LOW]
                assert echoed == part_id
                status = regs[IR_STATUS]
                shown[part_id] = (
                    "OK" if status & Status.PASS else "NG" if status & Status.FAIL else "ERROR"
                )
                plc.write_register(0, Control.RESULT_ACK, device_id=1)
        finally:
            plc.close()
        _wait(sub, lambda m: len([x for x in m if x.topic == f"{PREFIX}/part"]) >= 25, proc)
        out = stop_agent(proc)
        parts = sub.json(f"{PREFIX}/part")
    assert [int(p["part_id"]) for p in parts] == list(shown), "one part each, in order"
    assert {int(p["part_id"]): p["verdict"] for p in parts} == shown, "PASS/FAIL is the verdict"
    assert set(shown.values()) == {"OK", "NG"}, "both answers were exercised"
    assert "Traceback" not in out
