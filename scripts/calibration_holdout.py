"""Check calibration honestly: calibrate on one half of a dataset's good test images, then
count false rejects on the other half and compare with the bound calibration reported.

    .venv/bin/python scripts/calibration_holdout.py BUNDLE DATA [--false-reject 0.05]

DATA is an MVTec-layout dataset; its test/good images are split by alternating file order,
and every test/<defect> image is used as a defect sample for the recall figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edge_agent.calibrate.command import calibrate, score_folder
from edge_agent.images import list_images
from edge_agent.model.bundle import load_bundle
from edge_agent.model.scorer import Scorer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("data", type=Path)
    p.add_argument("--false-reject", type=float, default=0.05)
    p.add_argument("--confidence", type=float, default=0.95)
    args = p.parse_args()

    good = list_images(args.data / "test" / "good")
    with tempfile.TemporaryDirectory() as tmp:
        halves = {name: Path(tmp) / name for name in ("calibrate", "check")}
        for i, f in enumerate(good):
            dest = halves["calibrate" if i % 2 == 0 else "check"]
            dest.mkdir(exist_ok=True)
            shutil.copy(f, dest / f.name)
        defects = Path(tmp) / "defects"
        for d in sorted((args.data / "test").iterdir()):
            if d.name != "good":
                shutil.copytree(d, defects / d.name)
        cal = calibrate(
            args.bundle, halves["calibrate"], defects,
            false_reject=args.false_reject, confidence=args.confidence,
        )  # fmt: skip
        point = cal.chosen
        scorer = Scorer(load_bundle(args.bundle))
        paths = list_images(halves["check"])
        check = score_folder(scorer, halves["check"], paths, 8)
    observed = float(np.mean(check.scores >= point.threshold))
    result = {
        "target_false_reject": args.false_reject,
        "n_calibrate": point.frr.n,
        "threshold": point.threshold,
        "expected_false_reject": point.frr.expected,
        "false_reject_upper_bound": point.frr.upper,
        "confidence": args.confidence,
        "n_check": len(check.scores),
        "observed_false_reject_on_check_half": observed,
        "inside_bound": observed <= point.frr.upper,
        "defect_recall": point.recall,
        "n_defects": point.n_defects,
        "pixel_threshold": cal.pixel.threshold,
    }
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
