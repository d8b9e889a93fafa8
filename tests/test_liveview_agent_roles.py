"""The live view's roles inside the real agent: a viewer token cannot teach or promote (HTTP
403, in the audit trail), an engineer's promote reaches the agent's lifecycle_command (refused
there: no shadow to promote), and the trail verifies afterwards."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from edge_agent.lifecycle import audit, roles
from tests.brokers import Broker, free_port
from tests.test_liveview import ROOT


def _call(url: str, token: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {token}"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_a_viewer_token_cannot_teach_or_promote_in_the_running_agent(
    calibrated_bundle: Path, tmp_path: Path
) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    import cv2
    import numpy as np

    for i in range(3):
        cv2.imwrite(str(frames / f"{i}.png"), np.full((240, 320, 3), 90 + i, np.uint8))
    tokens = {"viewer": roles.new_token(), "engineer": roles.new_token()}
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(
        "".join(roles.token_line(r, t, f"{r}-x") + "\n" for r, t in tokens.items())
    )
    trail = tmp_path / "audit.jsonl"
    port = free_port()
    with Broker(tmp_path / "broker") as broker:
        config = tmp_path / "agent.yaml"
        config.write_text(
            f"bundle: {calibrated_bundle}\ndevice: cpu\nthreads: 2\n"
            f"cameras: [{{id: cam1, source: {frames}, kind: folder, loop: true, fps_limit: 5}}]\n"
            f"mqtt: {{port: {broker.port}, spool_dir: {tmp_path / 'spool'}}}\n"
            "metrics: {port: null}\n"
            f"audit: {{path: {trail}}}\n"
            f"liveview: {{enabled: true, port: {port}, tokens_file: {tokens_file}}}\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, proc.communicate()[0][-3000:]
                try:
                    if _call(f"{base}/whoami.json", tokens["viewer"])[0] == 200:
                        break
                except (urllib.error.URLError, ConnectionError):
                    pass
                assert time.monotonic() < deadline
                time.sleep(0.2)
            for action in ("teach", "promote"):
                code, answer = _call(
                    f"{base}/action/{action}", tokens["viewer"], {"inspection": "cam1"}
                )
                assert code == 403, (action, answer)
            code, answer = _call(
                f"{base}/action/promote", tokens["engineer"], {"inspection": "cam1"}
            )
            assert code == 409 and answer["refused"], answer  # the agent's own refusal
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-3000:]
    entries = list(audit.entries(trail))
    refused = [(e["action"], e["who"], e["source"], e["result"]) for e in entries
               if e["result"] == "refused"]  # fmt: skip
    assert refused[:2] == [
        ("teach", "viewer-x", "liveview", "refused"),
        ("promote", "viewer-x", "liveview", "refused"),
    ]
    assert ("promote", "engineer-x", "liveview", "refused") in refused
    assert audit.verify_file(trail).ok
