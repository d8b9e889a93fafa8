"""Replay for the drift defaults (BENCHMARKS.md, "Drift"): a stable line (held-out good tiles
with 0/2/5% defects) and drifted lines (the same good tiles darker or blurred), scored once
and fed through DriftMonitor at its defaults, 3,000 frames each.

Usage: scripts/drift_replay.py BUNDLE HOLDOUT_GOOD_DIR MVTEC_DATASET
(BUNDLE calibrated on other good images than HOLDOUT_GOOD_DIR.)"""

import glob
import sys

import cv2
import numpy as np

from edge_agent.decide.drift import DriftMonitor, DriftReference
from edge_agent.images import read_image, to_bgr
from edge_agent.model.bundle import load_bundle
from edge_agent.model.scorer import Scorer

b = load_bundle(sys.argv[1])
ref = DriftReference.from_calibration(b.thresholds["calibrated"], b.thresholds["image"])
print("reference", ref)
sc = Scorer(b, device="cpu")
hold = sorted(glob.glob(f"{sys.argv[2]}/*"))
defects = sorted(p for p in glob.glob(f"{sys.argv[3]}/test/*/*") if "/good/" not in p)


def scores(imgs):
    out = []
    for i in range(0, len(imgs), 8):
        out.extend(
            sc.score(np.stack([sc.prepare(to_bgr(x)) for x in imgs[i : i + 8]])).image_scores
        )
    return np.array(out)


good = [read_image(p) for p in hold]
g = scores(good)
d = scores([read_image(p) for p in defects])
variants = {
    "darker x0.85": scores(
        [np.clip(x.astype(np.float32) * 0.85, 0, 255).astype(np.uint8) for x in good]
    ),
    "darker x0.7": scores(
        [np.clip(x.astype(np.float32) * 0.7, 0, 255).astype(np.uint8) for x in good]
    ),
    "blur 3x3": scores([cv2.GaussianBlur(x, (3, 3), 0) for x in good]),
    "blur 5x5": scores([cv2.GaussianBlur(x, (5, 5), 0) for x in good]),
}
t = b.thresholds["image"]


def replay(pool_good, rate_defect, n=3000, seed=0):
    rng = np.random.default_rng(seed)
    m = DriftMonitor(ref)
    alarms = 0
    max_shift = 0.0
    max_ng = 0.0
    first = None
    for k in range(n):
        s = float(rng.choice(d)) if rng.random() < rate_defect else float(rng.choice(pool_good))
        m.add(s, s >= t)
        st = m.state()
        if st.frames >= 200:
            max_shift = max(max_shift, abs(st.shift or 0))
            max_ng = max(max_ng, st.ng_rate or 0)
        if st.alarm:
            alarms += 1
            first = k if first is None else first
    return dict(
        alarm_frames=alarms,
        first_alarm=first,
        max_abs_shift=round(max_shift, 3),
        max_ng_rate=round(max_ng, 3),
    )


print("good held-out median", float(np.median(g)), "FRR", float((g >= t).mean()))
for rate in (0.0, 0.02, 0.05):
    for seed in range(3):
        print("stable, defects", rate, "seed", seed, replay(g, rate, seed=seed))
for name, v in variants.items():
    print(
        name,
        "median",
        round(float(np.median(v)), 2),
        "FRR",
        round(float((v >= t).mean()), 3),
        replay(v, 0.02),
    )
