"""The teach check of BENCHMARKS.md ("Teach"): calibrate a copy of BUNDLE on CAL_GOOD at 5%
false rejects, find the false rejects among HOLD_GOOD, teach every other one of them (into a
new bundle: BUNDLE is not changed), and compare the held-out goods and the dataset's defects
before and after, at the same threshold. Exact flat search throughout.

Usage: scripts/teach_check.py BUNDLE CAL_GOOD HOLD_GOOD MVTEC_DATASET WORK_DIR
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np

from edge_agent.images import read_image, to_bgr
from edge_agent.model.bundle import load_bundle
from edge_agent.model.scorer import Scorer

bundle, cal, hold_dir, data, work = sys.argv[1:6]
EA = [sys.executable, "-m", "edge_agent"]
T, T2, GOOD = f"{work}/calibrated", f"{work}/taught", f"{work}/good"
for p in (T, T2):
    shutil.rmtree(p, ignore_errors=True)
os.makedirs(work, exist_ok=True)
shutil.copytree(bundle, T)
subprocess.run(
    [*EA, "calibrate", "--bundle", T, "--good", cal, "--false-reject", "0.05"],
    check=True,
    capture_output=True,
)
hold = sorted(glob.glob(f"{hold_dir}/*"))
defects = sorted(p for p in glob.glob(f"{data}/test/*/*") if "/good/" not in p)


def scores(bundle, paths):
    sc = Scorer(load_bundle(bundle), device="cpu", index="flat")
    out = []
    for i in range(0, len(paths), 8):
        out.extend(
            sc.score(
                np.stack([sc.prepare(to_bgr(read_image(p))) for p in paths[i : i + 8]])
            ).image_scores
        )
    return np.array(out)


t = load_bundle(T).thresholds["image"]
g0, d0 = scores(T, hold), scores(T, defects)
fr = [p for p, s in zip(hold, g0, strict=True) if s >= t]
taught, untaught = fr[::2], fr[1::2]
shutil.rmtree(GOOD, ignore_errors=True)
os.makedirs(GOOD)
for p in taught:
    shutil.copy(p, GOOD)
r = subprocess.run(
    [*EA, "teach", "--bundle", T, "--good", GOOD, "--out", T2], capture_output=True, text=True
)
print(r.stdout)
g1, d1 = scores(T2, hold), scores(T2, defects)
idx = {p: i for i, p in enumerate(hold)}
others = [p for p in hold if p not in taught]
res = {
    "threshold": t,
    "hold": len(hold),
    "false_rejects": len(fr),
    "taught": len(taught),
    "taught_scores_before": [round(float(g0[idx[p]]), 2) for p in taught],
    "taught_scores_after": [round(float(g1[idx[p]]), 2) for p in taught],
    "untaught_fr_before": int(sum(g0[idx[p]] >= t for p in untaught)),
    "untaught_fr_after": int(sum(g1[idx[p]] >= t for p in untaught)),
    "frr_other_goods_before": float(np.mean([g0[idx[p]] >= t for p in others])),
    "frr_other_goods_after": float(np.mean([g1[idx[p]] >= t for p in others])),
    "recall_before": float(np.mean(d0 >= t)),
    "recall_after": float(np.mean(d1 >= t)),
    "bank_before": len(load_bundle(T).bank),
    "bank_after": len(load_bundle(T2).bank),
}
print(json.dumps(res, indent=1))
