"""The smoke test a new Scorer passes before it may answer frames.

Loading a bundle checks what can be checked without running it (checksums, schema, shapes).
What it cannot see is a graph that runs but yields NaN (an overflowing export, a bad
projection), a bank whose distances overflow, or a model that fails only on a real batch
(a static batch size, a provider error). `self_test` runs the Scorer exactly as the agent
does on two synthetic frames at the input size and refuses the bundle unless every score
comes back finite and shaped as the grid says. The agent calls it at start (and `run
--check`) and on SIGHUP before the new model replaces the running one.
"""

from __future__ import annotations

import numpy as np

from edge_agent.errors import UserError
from edge_agent.model.bundle import MAX_FEATURE_ABS
from edge_agent.model.scorer import Scorer

MID_GREY = 128
SEED = 0


def synthetic_frames(input_size: tuple[int, int]) -> np.ndarray:
    """[2, H, W, 3] uint8: a mid-grey frame and a fixed noise frame. Two, so that a graph
    that only takes batches of one fails here and not on the first micro-batch."""
    height, width = input_size
    grey = np.full((height, width, 3), MID_GREY, dtype=np.uint8)
    noise = np.random.default_rng(SEED).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return np.stack([grey, noise])


def self_test(scorer: Scorer) -> None:
    """Score synthetic frames with `scorer`; UserError naming the bundle if it cannot."""
    where = f"bundle {scorer.bundle.path}: self-test"
    height, width = scorer.input_size
    frames = synthetic_frames(scorer.input_size)
    try:
        feats = scorer.features(frames)
        scores = scorer.score(frames)
        amap = scorer.anomaly_map(scores.patch_scores[0])
    except Exception as exc:  # ORT, FAISS and numpy raise their own types
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise UserError(
            f"{where}: the model cannot score a batch of 2 {width}x{height} frames ({reason})"
        ) from None
    grid = tuple(scorer.grid)
    if scores.image_scores.shape != (2,) or scores.patch_scores.shape != (2, *grid):
        raise UserError(
            f"{where}: scores of shape {scores.image_scores.shape} and patch scores of shape "
            f"{scores.patch_scores.shape}, expected (2,) and (2, {grid[0]}, {grid[1]})"
        )
    # Checked apart from the scores: FAISS answers NaN or huge queries with a finite sentinel
    # distance (about 1.8e19), so without Eq. 7 a broken graph would score "NG" everywhere.
    peak = float(np.abs(feats).max()) if np.isfinite(feats).all() else None
    if peak is not None and peak > MAX_FEATURE_ABS:
        raise UserError(
            f"{where}: the model outputs features up to {peak:.3g} on synthetic {width}x{height} "
            f"frames, beyond any real feature (at most {MAX_FEATURE_ABS:g})"
        )
    for name, values in (
        ("feature", feats),
        ("image score", scores.image_scores),
        ("patch scores", scores.patch_scores),
        ("anomaly map", amap),
    ):
        if not np.isfinite(values).all():
            raise UserError(
                f"{where}: synthetic {width}x{height} frames (mid-grey, noise) get a "
                f"non-finite {name} "
                f"({_first_bad(values)}): the model or its bank is broken, every frame would "
                "be answered ERROR"
            )


def _first_bad(values: np.ndarray) -> str:
    flat = np.asarray(values, dtype=np.float64).ravel()
    return str(flat[~np.isfinite(flat)][0])
