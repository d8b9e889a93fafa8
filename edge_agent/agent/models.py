"""The station's models as they run: each bundle loaded once, scored by one Scorer and
self-tested, and each inspection of a recipe bound to its model, its thresholds and the patches
its ignore mask leaves out.

Inspections that share a bundle share its Scorer, so the service scores them in one batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_agent.agent.config import Config, thresholds_for
from edge_agent.decide.decision import Thresholds
from edge_agent.errors import UserError
from edge_agent.model.bundle import Bundle, load_bundle
from edge_agent.model.scorer import Scorer
from edge_agent.model.selftest import self_test
from edge_agent.station.recipes import Inspection, Recipe
from edge_agent.station.regions import keep_cells

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Model:
    """One bundle, loaded, with the Scorer the config asks for."""

    bundle: Bundle
    scorer: Scorer

    @property
    def megabytes(self) -> float:
        """What it holds in memory, roughly: the bank and the ONNX graph."""
        graph = self.bundle.model_path.stat().st_size
        return (self.bundle.bank.nbytes + graph) / 1e6


@dataclass(frozen=True)
class Run:
    """One inspection of a recipe, ready to score."""

    spec: Inspection
    model: Model
    thresholds: Thresholds
    keep: np.ndarray | None = field(default=None, compare=False, repr=False)  # bool [h, w]

    @property
    def id(self) -> str:
        return self.spec.id


Build = Callable[[Bundle], Scorer]


def load_models(
    config: Config, paths: Iterable[Path], build: Build, have: Mapping[Path, Model] | None = None
) -> dict[Path, Model]:
    """Each bundle of ``paths`` loaded, built and self-tested (those in ``have`` reused).
    UserError naming the bundle when one cannot score: a station never starts, nor changes
    over, to a model that cannot answer."""
    have = have or {}
    models: dict[Path, Model] = {}
    for path in paths:
        if path in have:
            models[path] = have[path]
            continue
        try:
            bundle = load_bundle(path)
        except UserError as exc:
            raise UserError(f"{config.path}: bundle: {exc}") from None
        scorer = build(bundle)
        self_test(scorer)
        models[path] = Model(bundle, scorer)
    return models


def bind(
    config: Config, recipe: Recipe, models: Mapping[Path, Model]
) -> dict[str, tuple[Run, ...]]:
    """camera -> the recipe's inspections on it, in the recipe's order, bound to their models
    (which must be in ``models``) and thresholds (inspection over config over bundle)."""
    runs: dict[str, list[Run]] = {}
    legacy = config.bundle is not None
    for i, spec in enumerate(recipe.inspections):
        model = models[spec.bundle]
        where = "" if legacy else f"recipes.{recipe.name}.inspections[{i}]"
        spec = _as_fitted(config, spec, model.bundle, where or "bundle")
        thresholds = thresholds_for(config, model.bundle, spec, where)
        keep = keep_cells(spec.ignore, model.scorer.grid) if spec.ignore is not None else None
        runs.setdefault(spec.camera, []).append(Run(spec, model, thresholds, keep))
    return {camera: tuple(r) for camera, r in runs.items()}


def _as_fitted(config: Config, spec: Inspection, bundle: Bundle, where: str) -> Inspection:
    """The inspection with the ROI and ignore mask its bundle was fitted with (fit --roi,
    --ignore): the config may leave them out or repeat them, never contradict them."""
    roi, ignore = spec.roi, spec.ignore
    if bundle.roi is not None:
        if roi is not None and roi != bundle.roi:
            raise UserError(
                f"{config.path}: {where}.roi: {list(roi)} is not the ROI the bundle "
                f"{bundle.path} was fitted on, {list(bundle.roi)} (leave it out, or fit again)"
            )
        roi = bundle.roi
    if bundle.ignore is not None:
        if ignore is not None and not np.array_equal(ignore, bundle.ignore):
            raise UserError(
                f"{config.path}: {where}.ignore: not the mask the bundle {bundle.path} was "
                "fitted with (leave it out, or fit again)"
            )
        ignore = bundle.ignore
    if roi == spec.roi and ignore is spec.ignore:
        return spec
    return dataclasses.replace(spec, roi=roi, ignore=ignore)
