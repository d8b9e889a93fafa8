"""The Modbus handshake on the real agent (BENCHMARKS.md, "Modbus TCP"): a PLC stand-in
(pymodbus's client) writes PART_ID + TRIGGER, polls STATUS until RESULT_VALID, reads the
result and acknowledges, as fast as the agent answers, for `--seconds`. One camera, a folder
source in trigger mode, the given (calibrated) bundle.

    .venv/bin/python scripts/modbus_bench.py --bundle BUNDLE --data DIR [--seconds 60]

Prints the TRIGGER write -> RESULT_VALID seen latency (p50, p99, max) and the handshakes per
second held over the whole run, as JSON.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from pymodbus.client import ModbusTcpClient

from edge_agent.images import list_images, read_image
from edge_agent.publish.modbus import (
    INPUT_COUNT,
    IR_RESULT_PART_ID_HIGH,
    IR_RESULT_PART_ID_LOW,
    IR_STATUS,
    Control,
    Status,
)
from edge_agent.tools.broker import choose_broker, free_port, mqtt_broker


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--frames", type=int, default=100)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="modbus-bench-") as tmp:
        work = Path(tmp)
        folder = work / "frames"
        folder.mkdir()
        paths = [x for x in list_images(args.data, recursive=True) if "ground_truth" not in x.parts]
        for i, path in enumerate(paths[: args.frames]):
            cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.resize(read_image(path), (256, 256)))
        port = free_port()
        with mqtt_broker(choose_broker("modbus_bench"), work, quiet=True) as mqtt_port:
            config = work / "agent.yaml"
            config.write_text(
                f"bundle: {args.bundle}\n"
                "device: cpu\n"
                "batching: {max_batch: 8, max_wait_ms: 0, queue_size: 2}\n"
                f"cameras: [{{id: cam, source: {folder}, loop: true, mode: trigger}}]\n"
                f"mqtt: {{port: {mqtt_port}, spool_dir: {work / 'spool'}}}\n"
                "metrics: {port: null}\n"
                f"modbus: {{enabled: true, port: {port}}}\n"
            )
            proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            plc = ModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=0)
            try:
                deadline = time.monotonic() + 120
                while not plc.connect():
                    if time.monotonic() > deadline:
                        raise SystemExit("modbus_bench: the agent's Modbus server never came up")
                    time.sleep(0.2)
                latencies, part_id = [], 1
                for warm in (True, False):
                    started = time.monotonic()
                    span = 5.0 if warm else args.seconds
                    while time.monotonic() - started < span:
                        words = [part_id >> 16, part_id & 0xFFFF]
                        t0 = time.perf_counter()
                        plc.write_registers(0, [Control.TRIGGER, 0, *words], device_id=1)
                        while True:
                            rr = plc.read_input_registers(0, count=INPUT_COUNT, device_id=1)
                            regs = rr.registers
                            if regs[IR_STATUS] & (Status.RESULT_VALID | Status.ERROR):
                                break
                        took = time.perf_counter() - t0
                        shown = (regs[IR_RESULT_PART_ID_HIGH] << 16) | regs[IR_RESULT_PART_ID_LOW]
                        if regs[IR_STATUS] & Status.ERROR or shown != part_id:
                            raise SystemExit(f"modbus_bench: part {part_id} failed: {regs}")
                        plc.write_register(0, Control.RESULT_ACK, device_id=1)
                        if not warm:
                            latencies.append(took * 1000)
                        part_id += 1
                    held = len(latencies) / (time.monotonic() - started) if not warm else 0.0
            finally:
                plc.close()
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
    ms = np.array(latencies)
    print(
        json.dumps(
            {
                "handshakes": len(ms),
                "seconds": args.seconds,
                "handshakes_per_s": round(held, 1),
                "trigger_to_result_valid_ms": {
                    "p50": round(float(np.percentile(ms, 50)), 1),
                    "p99": round(float(np.percentile(ms, 99)), 1),
                    "max": round(float(ms.max()), 1),
                },
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
