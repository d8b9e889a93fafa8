"""`edge-agent bench`: where the time goes, per stage, and end-to-end throughput and latency.

Stages are those of the run-time path, timed on the same code the agent runs: decode (file
bytes -> BGR), prepare (resize to the input size), onnx (ONNX Runtime), knn (FAISS), score
(image score, Eq. 7 when enabled), map (upsample + Gaussian, with ivf-exact's re-checks), regions
(threshold + connected components). With a calibrated bundle the last two do what the agent does:
only NG frames get a map, exact where the pixel threshold decides (Scorer.exact_map), and
regions at the frame's size (decide); an uncalibrated bundle maps every frame.

A frame's latency is measured from the start of its batch (when the first frame
of the batch is read) to the end of its own regions stage, so larger batches trade latency for
throughput exactly as they do in the agent.

`bench --agent` measures the product instead: the real agent, fed by a camera, publishing over
a real MQTT broker to a subscriber (edge_agent/tools/agent_bench.py), next to this engine
figure at the same batch size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge_agent.cli import add_scorer_options
from edge_agent.errors import UserError
from edge_agent.model.bundle import load_bundle
from edge_agent.model.scorer import Scorer
from edge_agent.tools.agent_bench import add_agent_arguments, refuse_agent_options, run_agent_bench
from edge_agent.tools.engine_bench import STAGES, bench_batch, load_files

DEFAULT_BATCHES = (1, 8, 32)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, required=True, help="bundle folder")
    p.add_argument("--data", type=Path, required=True, help="image folder (searched recursively)")
    p.add_argument(
        "--batch", type=int, nargs="+",
        help=f"batch sizes (default: {' '.join(map(str, DEFAULT_BATCHES))}; not with --agent)",
    )  # fmt: skip
    p.add_argument("--limit", type=int, help="use at most this many images")
    p.add_argument(
        "--warmup", type=int, default=2,
        help="batches run before timing (--agent: the first WARMUP x max-batch verdicts are "
        "left out of its figures)",
    )  # fmt: skip
    add_scorer_options(p, batch_size=False)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    add_agent_arguments(p.add_argument_group("the agent end to end (--agent)"))


def run(args: argparse.Namespace) -> int:
    if args.agent:
        return run_agent_bench(args)
    refuse_agent_options(args)
    args.batch = args.batch or list(DEFAULT_BATCHES)
    if min(args.batch) < 1:
        raise UserError("--batch sizes must be at least 1")
    bundle = load_bundle(args.bundle)
    files = load_files(args.data, args.limit)
    scorer = Scorer(
        bundle, device=args.device, threads=args.threads, index=args.index, ivf_nprobe=args.nprobe
    )
    results = [bench_batch(scorer, files, b, args.warmup) for b in args.batch]
    print(f"{len(files)} images, {scorer.device}, D={bundle.dim}, M={len(bundle.bank)}")
    header = f"{'batch':>5} {'img/s':>7} {'p50 ms':>7} {'p99 ms':>7}  " + " ".join(
        f"{s:>7}" for s in STAGES
    )
    print(header + "   (stages: ms per image)")
    for r in results:
        stages = " ".join(f"{r['stages'][s]:7.2f}" for s in STAGES)
        print(
            f"{r['batch']:>5} {r['images_per_second']:7.1f} {r['latency_ms']['p50']:7.1f} "
            f"{r['latency_ms']['p99']:7.1f}  {stages}"
        )
    if args.json:
        best = max(results, key=lambda r: r["images_per_second"])
        print(
            json.dumps(
                {
                    "images_per_second": best["images_per_second"],
                    "latency_ms": best["latency_ms"],
                    "stages": best["stages"],
                    "batch": best["batch"],
                    "by_batch": results,
                    "device": scorer.device,
                    "dim": bundle.dim,
                    "bank_size": len(bundle.bank),
                }
            )
        )
    return 0
