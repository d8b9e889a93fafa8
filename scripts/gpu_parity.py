"""GPU/CPU parity for scripts/gpu_check.sh: the same frames scored with exact search on the
CPU, on the GPU (I/O binding: ONNX output to FAISS by pointer, auto there) and on the GPU
through host copies, image scores compared (relative 1e-4). Prints one JSON object; exit 1
when parity fails."""

from __future__ import annotations

import json
import sys

import numpy as np

from edge_agent.images import list_images, read_image
from edge_agent.model.bundle import load_bundle
from edge_agent.model.scorer import Scorer

LIMIT = 256  # every image of the kit's data folder, in batches of 8
TOLERANCE = 1e-4


def main() -> int:
    bundle = load_bundle(sys.argv[1])
    files = list_images(sys.argv[2], recursive=True)[:LIMIT]
    cpu = Scorer(bundle, device="cpu", index="flat")
    gpu = Scorer(bundle, device="cuda", index="flat")
    gpu_host = Scorer(bundle, device="cuda", index="flat", bind_io=False)
    frames = np.stack([cpu.prepare(read_image(f)) for f in files])
    a, b, c = (
        np.concatenate([s.score(frames[i : i + 8]).image_scores for i in range(0, len(files), 8)])
        for s in (cpu, gpu, gpu_host)
    )
    rel = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-12)))
    rel_host = float(np.max(np.abs(c - b) / np.maximum(np.abs(c), 1e-12)))
    ok = rel <= TOLERANCE and rel_host <= TOLERANCE
    report = {
        "images": len(files),
        "cpu": cpu.device,
        "gpu": gpu.device,
        "gpu_used": "cuda" in gpu.device,  # false: both ran on the CPU (see doctor.json)
        "io_binding": gpu.bind_io,
        "max_relative_difference": rel,
        "bound_vs_host_copies": rel_host,
        "tolerance": TOLERANCE,
        "ok": ok,
    }
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
