"""One frame, every inspection of the active recipe on its camera: cut the region, score it
with its model (inspections sharing a bundle in one batch, as frames of several cameras are),
decide under its thresholds, and put the answers back in frame pixels.

The service loop calls these; they hold no state of their own.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from edge_agent.agent.models import Run
from edge_agent.decide.decision import ERROR, NG, Decision, decide, frame_map, verdict_for
from edge_agent.images import BadImage
from edge_agent.station.regions import crop, ignore_for_frame
from edge_agent.station.verdicts import worst


@dataclass
class Task:
    """One inspection of one frame."""

    run: Run
    region_hw: tuple[int, int] = (0, 0)
    prepared: np.ndarray | None = None
    error: str | None = None
    decision: Decision | None = None

    @property
    def verdict(self) -> str:
        return self.decision.verdict if self.decision is not None else ERROR


def prepare(image: np.ndarray, run: Run) -> Task:
    """The run's region of a BGR frame at its model's input size; a region that does not fit
    the frame (or its ignore mask) is the task's ERROR, with the reason."""
    task = Task(run)
    try:
        region = crop(image, run.spec.roi)
        task.region_hw = region.shape[:2]
        ignore_for_frame(run.spec.ignore, task.region_hw)
    except ValueError as exc:
        task.error = str(exc)
        return task
    try:
        task.prepared = run.model.scorer.prepare_region(region)
    except BadImage as exc:  # a mask fitted for another size of frame
        task.error = str(exc)
    return task


def score(tasks: list[Task], stage_s: dict[str, float]) -> Exception | None:
    """Score and decide every task that has no error, a batch per model; the first inference
    failure (each of its tasks then ERROR with it) is returned, not raised."""
    groups: dict[int, list[Task]] = {}
    for task in tasks:
        if task.error is None:
            groups.setdefault(id(task.run.model), []).append(task)
    failure: Exception | None = None
    for group in groups.values():
        scorer = group[0].run.model.scorer
        keep = None
        if any(t.run.keep is not None for t in group):
            everything = np.ones(scorer.grid, dtype=bool)
            keep = np.stack([t.run.keep if t.run.keep is not None else everything for t in group])
        try:
            scores = scorer.score(np.stack([t.prepared for t in group]), stage_s, keep)
        except Exception as exc:  # ORT/FAISS failures: these frames are ERROR, the caller decides
            failure = failure or exc
            for task in group:
                task.error = f"inference failed: {type(exc).__name__}"
            continue
        # Maps now, before another batch of this scorer replaces `scorer.last`.
        t0 = time.perf_counter()
        for i, task in enumerate(group):
            t = task.run.thresholds
            value = float(scores.image_scores[i])
            # The map costs a blur and a resize: only NG answers report regions (decide()).
            ng = verdict_for(value, t) == NG
            amap = scorer.exact_map(scores.patch_scores, i, threshold=t.pixel) if ng else None
            task.decision = decide(value, amap, task.region_hw, t, ignore=task.run.spec.ignore)
        stage_s["decide"] = stage_s.get("decide", 0.0) + time.perf_counter() - t0
    return failure


def worst_task(tasks: list[Task]) -> Task:
    """The task whose verdict the frame carries: the first of the worst (ERROR > NG > OK)."""
    verdict = worst(t.verdict for t in tasks)
    return next(t for t in tasks if t.verdict == verdict)


def in_frame(task: Task, frame_hw: tuple[int, int], *, with_map: bool = True) -> Decision | None:
    """The task's decision with its regions in frame pixels, and with ``with_map`` its anomaly
    map too (a ROI's map pasted into a frame-sized one, zero elsewhere: only the frame's worst
    answer needs it, for the archive and the live view)."""
    decision, roi = task.decision, task.run.spec.roi
    if decision is None or roi is None:
        return decision
    x, y, w, h = roi
    regions = tuple(dataclasses.replace(r, x=r.x + x, y=r.y + y) for r in decision.regions)
    amap = None
    if with_map and decision.anomaly_map is not None:
        amap = np.zeros(frame_hw, dtype=np.float32)
        amap[y : y + h, x : x + w] = decision.anomaly_map
    return dataclasses.replace(decision, regions=regions, anomaly_map=amap)


def region_heat(task: Task) -> np.ndarray | None:
    """The task's anomaly map at its region's size: its decision's where it has one (NG),
    else scored again for it (a shadow disagreement shows both models' maps, an OK one's
    too). None when the task has no score to show."""
    decision = task.decision
    if decision is None or decision.is_error or task.prepared is None:
        return None
    if decision.anomaly_map is not None:
        return decision.anomaly_map
    scorer, keep = task.run.model.scorer, task.run.keep
    scores = scorer.score(task.prepared[None], None, None if keep is None else keep[None])
    amap = frame_map(
        scorer.exact_map(scores, 0, threshold=task.run.thresholds.pixel), task.region_hw
    )
    ignore = task.run.spec.ignore
    return np.where(ignore, np.float32(0.0), amap) if ignore is not None else amap


def frame_heat(task: Task, frame_hw: tuple[int, int]) -> np.ndarray | None:
    """region_heat pasted into a frame-sized map (zero outside the task's ROI)."""
    amap = region_heat(task)
    roi = task.run.spec.roi
    if amap is None or roi is None:
        return amap
    x, y, w, h = roi
    out = np.zeros(frame_hw, dtype=np.float32)
    out[y : y + h, x : x + w] = amap
    return out
