"""`edge-agent demo`: the whole product on the sample data shipped in demo/sample, in minutes.

1. fit a bundle on 107 good tiles (demo/sample/train);
2. calibrate it on 34 held-out good tiles (demo/sample/holdout);
3. make a video of 20 line frames, good and defective (demo/sample/line);
4. start an MQTT broker: Mosquitto when installed, else amqtt (`pip install 'edge-agent[demo]'`);
5. run the agent on the video and show each verdict as it arrives over MQTT (with
   `--sparkplug`, also each Sparkplug B message, decoded, beside the v1 table).

Every step runs the real `edge-agent` command, printed before it runs, so the demo doubles as
a walk-through of the commands a line engineer would type.
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2

from edge_agent.errors import UserError
from edge_agent.images import list_images, read_image
from edge_agent.tools.broker import choose_broker, mqtt_broker

# The sample tiles live in the repository, not in the wheel: beside the package in a source
# checkout (the editable install setup.sh makes), else maybe under the working directory.
SAMPLE = Path(__file__).resolve().parents[2] / "demo" / "sample"
PREFIX = "edge-agent"
LINE = "demo"
CAMERA = "cam1"
FRAME_SIZE = (320, 320)  # (width, height) of the demo video


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="where results go")
    p.add_argument(
        "--sample", type=Path, default=None,
        help="sample data folder (default: demo/sample of the edge-agent source checkout)",
    )  # fmt: skip
    p.add_argument("--fps", type=float, default=4.0, help="frame rate of the demo video")
    p.add_argument(
        "--sparkplug",
        action="store_true",
        help="also publish Sparkplug B 3.0 and show its decoded messages beside the v1 table",
    )


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _edge_agent(*args: str, log: Path | None = None) -> None:
    """Run one edge-agent command in a child process, echoing it first."""
    print("$ edge-agent " + " ".join(args), flush=True)
    cmd = [sys.executable, "-m", "edge_agent", *args]
    if log is None:
        proc = subprocess.run(cmd, check=False)
    else:
        with log.open("w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        where = f" (log: {log})" if log else ""
        raise UserError(f"demo step `edge-agent {args[0]}` failed{where}")


def make_video(frames_dir: Path, out: Path, fps: float) -> list[str]:
    """An MJPEG video of the line frames; returns each frame's label (file name prefix)."""
    files = list_images(frames_dir)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), fps, FRAME_SIZE)
    if not writer.isOpened():
        raise UserError(f"cannot write the demo video {out}")
    labels = []
    for f in files:
        writer.write(cv2.resize(read_image(f), FRAME_SIZE, interpolation=cv2.INTER_AREA))
        labels.append(f.stem.split("_")[1])
    writer.release()
    return labels


def write_config(
    out: Path, bundle: Path, video: Path, port: int, *, sparkplug: bool = False
) -> Path:
    import yaml

    config: dict[str, Any] = {
        "bundle": str(bundle),
        "device": "auto",
        "cameras": [{"id": CAMERA, "source": str(video)}],
        "mqtt": {
            "host": "127.0.0.1",
            "port": port,
            "prefix": PREFIX,
            "line": LINE,
            "spool_dir": str(out / "spool"),
            "health_interval_s": 2,
        },
        "archive": {"dir": str(out / "rejects"), "quota_mb": 50},
        "metrics": {"port": None},
    }
    if sparkplug:
        config["sparkplug"] = {"enabled": True, "group_id": LINE, "edge_node_id": "demo-agent"}
    path = out / "agent.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class VerdictTable:
    """Subscribes to the verdict topic and prints one row per verdict as it arrives."""

    def __init__(self, port: int, labels: list[str]) -> None:
        import paho.mqtt.client as mqtt

        self.labels = labels
        self.rows: list[dict[str, Any]] = []
        self._inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edge-agent-demo")
        self.client.on_message = lambda _c, _u, msg: self._inbox.put(json.loads(msg.payload))
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{PREFIX}/{LINE}/+/verdict", qos=1)
        self.client.loop_start()
        print(f"subscribed to {PREFIX}/{LINE}/+/verdict")

    def header(self) -> None:
        # Latency is capture -> verdict. A video file is read as fast as the agent takes
        # frames, so here it includes time queued; a live camera only waits for its batch.
        print(
            f"\n{'seq':>3}  {'truth':<9}{'verdict':<8}{'score':>7}{'norm':>6}{'regions':>8}"
            f"{'latency':>9}  reject image",
            flush=True,
        )

    def pump(self, timeout_s: float) -> None:
        try:
            v = self._inbox.get(timeout=timeout_s)
        except queue.Empty:
            return
        self.rows.append(v)
        seq = v["sequence"]
        truth = self.labels[seq] if seq < len(self.labels) else "?"
        score = "-" if v["score"] is None else f"{v['score']:.2f}"
        norm = "-" if v["normalised_score"] is None else f"{v['normalised_score']:.2f}"
        print(
            f"{seq:>3}  {truth:<9}{v['verdict']:<8}{score:>7}{norm:>6}{len(v['regions']):>8}"
            f"{v['latency_ms']:>7.0f}ms  {v['reject_image'] or ''}",
            flush=True,
        )

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def describe_sparkplug(topic: str, payload: bytes, names: dict[int, str]) -> str:
    """One line for a Sparkplug B message: kind, device, seq and its metrics by name.

    ``names`` maps aliases to names; births fill it (data messages carry aliases only)."""
    from edge_agent.publish import sparkplug_b_pb2 as pb
    from edge_agent.publish.sparkplug import metric_value

    parts = topic.split("/")
    kind = parts[2] if len(parts) > 2 else "?"
    device = parts[4] if len(parts) > 4 else "(node)"
    try:
        message = pb.Payload.FromString(payload)
    except Exception:
        return f"spB {kind:<6} {device:<7} undecodable payload ({len(payload)} bytes)"
    values = []
    for m in message.metrics:
        if m.name:
            names[m.alias] = m.name
        name = m.name or names.get(m.alias, f"alias {m.alias}")
        if kind == "DDATA" and not name.startswith(("Inspection/Verdict", "Inspection/Score")):
            continue  # the table's width: the rest is in the births and the agent log
        value = metric_value(m)
        shown = f"{value:.2f}" if isinstance(value, float) else value
        values.append(f"{name.split('/')[-1]}={shown}")
    historical = " historical" if any(m.is_historical for m in message.metrics) else ""
    seq = f"seq {message.seq:>3}" if message.HasField("seq") else "seq   -"
    shown_values = ", ".join(values[:6]) + (", ..." if len(values) > 6 else "")
    return f"spB {kind:<6} {device:<7} {seq}{historical}  {shown_values}"


class SparkplugView:
    """Subscribes to the demo's Sparkplug group and prints each message, decoded."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.names: dict[int, str] = {}
        self.count = 0
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edge-agent-demo-sp")
        self.client.on_message = lambda _c, _u, msg: self._inbox.put((msg.topic, msg.payload))
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"spBv1.0/{LINE}/#", qos=1)
        self.client.loop_start()
        print(f"subscribed to spBv1.0/{LINE}/# (Sparkplug B)")

    def pump(self) -> None:
        while True:
            try:
                topic, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            self.count += 1
            print("     " + describe_sparkplug(topic, payload, self.names), flush=True)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def summarise(rows: list[dict[str, Any]], labels: list[str], out: Path) -> None:
    by_seq = {r["sequence"]: r for r in rows}
    defects = [i for i, label in enumerate(labels) if label != "good"]
    goods = [i for i, label in enumerate(labels) if label == "good"]
    caught = sum(by_seq.get(i, {}).get("verdict") == "NG" for i in defects)
    false_alarms = sum(by_seq.get(i, {}).get("verdict") == "NG" for i in goods)
    print(
        f"\n{len(rows)} of {len(labels)} frames answered over MQTT: {caught} of {len(defects)} "
        f"defective parts rejected, {false_alarms} of {len(goods)} good parts rejected."
    )
    rejects = sorted((out / "rejects").rglob("*.jpg"))
    if rejects:
        print(f"Reject images with heat maps ({len(rejects)}): {rejects[0].parent}/")
    print(f"Calibration histogram: {out / 'calibration.png'}")
    print(f"Agent log: {out / 'agent.log'};  config: {out / 'agent.yaml'}")


def find_sample(given: Path | None) -> Path:
    """The sample data folder: `given`, else SAMPLE, else ./demo/sample."""
    if given is not None:
        if not given.is_dir():
            raise UserError(f"--sample {given}: no such folder")
        return given
    candidates = list(dict.fromkeys([SAMPLE, Path.cwd().resolve() / "demo" / "sample"]))
    for folder in candidates:
        if folder.is_dir():
            return folder
    looked = " or ".join(map(str, candidates))
    raise UserError(
        f"demo sample data not found (looked in {looked}); it ships in the edge-agent source "
        "repository, not the package: run the demo from a checkout or pass --sample DIR"
    )


def run(args: argparse.Namespace) -> int:
    sample = find_sample(args.sample)
    for part in ("train/good", "holdout/good", "line"):
        list_images(sample / part)  # a clear error if the sample data is incomplete
    # Before the minute of fitting, so that a missing broker fails at once.
    broker = choose_broker("the demo")
    out: Path = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    bundle = out / "bundle"
    started = time.monotonic()

    _step("1/4 fit: good tiles -> bundle (ONNX model + coreset memory bank)")
    # 224 px: with only 107 small training tiles the finer 288 px default grid has too few
    # patches per position to learn from (measured on this sample: 4 of 10 defects caught at
    # 288, 7 of 10 at 224, no false rejects either way); a 5% bank keeps enough of them.
    _edge_agent(
        "fit", str(sample / "train" / "good"), "--out", str(bundle),
        "--image-size", "224", "--coreset", "0.05",
    )  # fmt: skip

    _step("2/4 calibrate: thresholds from held-out good tiles")
    _edge_agent(
        "calibrate", "--bundle", str(bundle), "--good", str(sample / "holdout" / "good"),
        "--false-reject", "0.05", "--plot", str(out / "calibration.png"),
    )  # fmt: skip

    _step("3/4 a line camera: a video of good and defective parts")
    video = out / "line.avi"
    labels = make_video(sample / "line", video, args.fps)
    print(f"{video}: {len(labels)} frames ({labels.count('good')} good)")

    _step("4/4 run the agent; verdicts arrive over MQTT")
    with mqtt_broker(broker, out) as port:
        config = write_config(out, bundle, video, port, sparkplug=args.sparkplug)
        table = VerdictTable(port, labels)
        view = SparkplugView(port) if args.sparkplug else None
        cmd = ["run", "--config", str(config), "--exit-when-done"]
        print("$ edge-agent " + " ".join(cmd) + f"   (log: {out / 'agent.log'})")
        table.header()
        with (out / "agent.log").open("w") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "edge_agent", *cmd], stdout=log, stderr=subprocess.STDOUT
            )
            deadline = time.monotonic() + 300
            while agent.poll() is None and time.monotonic() < deadline:
                table.pump(0.2)
                if view is not None:
                    view.pump()
            if agent.poll() is None:
                agent.terminate()
        while len(table.rows) < len(labels):  # verdicts still in flight after the agent exits
            before = len(table.rows)
            table.pump(1.0)
            if len(table.rows) == before:
                break
        table.close()
        if view is not None:
            time.sleep(0.5)  # the NDEATH of the agent's clean stop
            view.pump()
            view.close()
            print(f"\n{view.count} Sparkplug B messages received")
    if agent.returncode != 0:
        raise UserError(f"the agent exited with code {agent.returncode} (log: {out / 'agent.log'})")
    summarise(table.rows, labels, out)
    print(f"demo finished in {time.monotonic() - started:.0f} s")
    return 0
