"""Changing a model on the running line (docs/model-engineers/lifecycle.md): shadow
candidates, gated promotion, rollback and confirmed defects, each audited before it counts.

LineChanges owns that state (the shadows, the promotions, the changes waiting for the loop,
their audit records and reports) and sees the agent only through `Line`: the recipe, runs and
models in force, whether the agent is stopping or loading a recipe, how it builds a scorer,
and `install`, the swap at a frame boundary. The rules themselves are pure and live in
edge_agent/lifecycle/ (gates, shadow budget and statistics, promotions, regression set).

Threads: `command` (the door) is called from any protocol's thread and only checks and
queues. Everything else runs on the inference thread between batches (`between_batches`,
`compare`, `housekeeping`, `stop_shadows`); loading a candidate or a rolled-back bundle runs
on one helper thread while production keeps inspecting. A shadow candidate decides nothing:
production's verdicts are out before it scores, and a failure of the candidate stops the
shadows, never the line. A change that cannot be written to the audit trail does not happen.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from prometheus_client import CollectorRegistry, Gauge

from edge_agent.agent import inspect
from edge_agent.agent.config import Config
from edge_agent.agent.models import Model, Run, bind, load_models
from edge_agent.capture.frame_queue import Frame
from edge_agent.config.lifecycle import ShadowModel
from edge_agent.decide.archive import Heat, RejectArchive
from edge_agent.errors import UserError
from edge_agent.lifecycle import gates, regression
from edge_agent.lifecycle.audit import AuditLog, AuditUnavailable, now_iso
from edge_agent.lifecycle.history import Promotions, bundle_sha256
from edge_agent.lifecycle.shadow import Budget, Comparison, ShadowStats
from edge_agent.model.bundle import MANIFEST, Bundle
from edge_agent.model.scorer import Scorer
from edge_agent.publish.contract import (
    LIFECYCLE_ACTIONS,
    lifecycle_message,
    parse_lifecycle_command,
    shadow_message,
)
from edge_agent.station.recipes import Recipe

log = logging.getLogger(__name__)

Runs = dict[str, tuple[Run, ...]]  # by camera: a recipe's inspections bound to their models
Publish = Callable[[dict[str, Any]], None]


def inspection_key(recipe: str, inspection: str) -> str:
    """How promotions and shadows name an inspection: ids are unique within a recipe."""
    return f"{recipe}/{inspection}"


def apply_promotions(config: Config) -> tuple[Config, dict[str, Path]]:
    """The config with each inspection's bundle as promotions left it (lifecycle/history.py),
    and each inspection's bundle as the config names it (what its promotions start from)."""
    book = config.station
    bases: dict[str, Path] = {}
    recipes = {}
    promotions = _promotions(config)
    for name, recipe in book.recipes.items():
        specs = []
        for spec in recipe.inspections:
            key = inspection_key(name, spec.id)
            bases[key] = spec.bundle
            current = promotions.current(key, spec.bundle) if promotions else spec.bundle
            if current != spec.bundle:
                log.info("%s: runs promoted bundle %s (config: %s)", key, current, spec.bundle)
                spec = dataclasses.replace(spec, bundle=current)
            specs.append(spec)
        recipes[name] = dataclasses.replace(recipe, inspections=tuple(specs))
    station = dataclasses.replace(book, recipes=recipes)
    return dataclasses.replace(config, station=station), bases


def _promotions(config: Config) -> Promotions | None:
    if config.lifecycle_dir is None:
        return None
    keep = config.shadow.keep if config.shadow is not None else ShadowModel().keep
    return Promotions(config.lifecycle_dir, keep)


def shadow_gauges(registry: CollectorRegistry) -> dict[str, Gauge]:
    """The shadow report's figures as gauges, per inspection (the report's keys)."""
    names = {
        "frames": "frames a shadow candidate compared with production",
        "skipped": "frames a shadow candidate could not take within shadow.max_share",
        "false_rejects": "frames production passed that the candidate would reject",
        "catches": "frames production rejected that the candidate rejects too",
        "disagreements": "frames on which candidate and production disagree",
    }
    gauges = {
        key: Gauge(f"edge_agent_shadow_{key}", text, ["inspection"], registry=registry)
        for key, text in names.items()
    }
    gauges["matrix"] = Gauge(
        "edge_agent_shadow_agreement_frames",
        "frames by production verdict and candidate verdict",
        ["inspection", "production", "candidate"],
        registry=registry,
    )
    return gauges


class Line(Protocol):
    """The agent as LineChanges sees it: what is in force, and the one swap it may ask for."""

    @property
    def config(self) -> Config: ...

    @property
    def recipe(self) -> Recipe: ...

    @property
    def runs(self) -> Mapping[str, tuple[Run, ...]]: ...

    @property
    def models(self) -> Mapping[Path, Model]: ...

    def stopping(self) -> bool: ...

    def loading_recipe(self) -> str | None:
        """The recipe selection still loading (a swap now would race it), or None."""
        ...

    def build_scorer(self, bundle: Bundle) -> Scorer: ...

    def install(
        self, recipe_name: str, recipe: Recipe, runs: Runs, models: dict[Path, Model]
    ) -> None:
        """Make ``recipe`` (with ``runs`` on ``models``) the recipe's definition, and the one
        in force from the next frame when it is the active recipe."""
        ...


class Inspected(Protocol):
    """A frame production has answered (the agent's batch item)."""

    @property
    def frame(self) -> Frame: ...

    @property
    def recipe(self) -> Recipe: ...

    @property
    def image(self) -> np.ndarray | None: ...

    @property
    def error(self) -> str | None: ...

    @property
    def tasks(self) -> list[inspect.Task]: ...


@dataclass
class _Shadow:
    """A candidate bundle on one inspection's frames (main thread; counts read by others)."""

    key: str  # inspection_key(recipe, inspection)
    recipe: str
    inspection: str
    source: Path  # the folder the command named
    run: Run  # the candidate bound as the inspection (its staged copy, its thresholds)
    stats: ShadowStats
    regression: dict[str, gates.Rescored]  # the confirmed defects under the candidate
    started_at: float
    who: str
    state: str = "running"

    def report(self) -> dict[str, Any]:
        b = self.run.model.bundle
        return {
            "inspection": self.inspection,
            "recipe": self.recipe,
            "state": self.state,
            "candidate": {
                "bundle": str(self.source),
                "copy": str(b.path),
                "model_id": b.model_id,
                "threshold": self.run.thresholds.image,
            },
            "since": round(self.started_at * 1000),
            "regression": {
                "confirmed": len(self.regression),
                "missed": len(gates.regression_misses(self.regression)),
            },
            **self.stats.report(),
        }


@dataclass(frozen=True)
class _Change:
    """A lifecycle command the door accepted, for the loop to apply."""

    action: str
    inspection: str | None
    args: Mapping[str, Any]
    who: str
    source: str

    @property
    def request_id(self) -> str | None:
        value = self.args.get("request_id")
        return value if isinstance(value, str) else None


class LineChanges:
    """Shadows, promotions, rollbacks and confirmations of one agent's line (module doc)."""

    def __init__(
        self,
        line: Line,
        *,
        bases: Mapping[str, Path],
        audit: AuditLog,
        archive: RejectArchive | None,
        registry: CollectorRegistry,
        publish_lifecycle: Publish,
        publish_shadow: Publish,
    ) -> None:
        """``bases``: each inspection's bundle as the config names it (apply_promotions);
        ``publish_*``: hand a message to the line's link (dropped while it is down)."""
        self.line = line
        config = line.config
        self.settings = config.shadow  # None: every command is refused, saying why
        self.bases = dict(bases)
        self.audit = audit
        self.archive = archive
        self._publish_lifecycle = publish_lifecycle
        self._publish_shadow = publish_shadow
        self.promotions = _promotions(config)
        self.shadows: dict[str, _Shadow] = {}  # by inspection id (of the active recipe)
        self._stopped_shadows: dict[str, _Shadow] = {}  # reported once more, then dropped
        self._budget = Budget(self.settings.max_share if self.settings else 1.0)
        self._lock = threading.Lock()  # the door's queue: protocol threads vs the loop
        self._changes: deque[_Change] = deque()
        self._change_thread: threading.Thread | None = None
        self._change_result: tuple[_Change, Any] | None = None
        self._next_report = 0.0
        self._reported = False  # the retained report names a shadow: clear it once
        # The latest report as published, for other threads (the live view): replaced whole,
        # never changed, so a reader needs no lock and the loop no copy.
        self._latest: dict[str, Any] = shadow_message(time.time(), [])
        self._gauges = shadow_gauges(registry) if self.settings else {}
        self._apply: dict[str, Callable[[_Change], None]] = {
            "shadow_start": self._do_shadow_start,
            "shadow_stop": self._do_shadow_stop,
            "promote": self._do_promote,
            "rollback": self._do_rollback,
            "confirm": self._do_confirm,
        }

    # -- the door (any thread) ----------------------------------------------------------------

    def command(
        self,
        action: str,
        inspection: str | None,
        args: Mapping[str, Any],
        who: str,
        source: str,
    ) -> str | None:
        """The one way in for shadow_start, shadow_stop, promote, rollback and confirm,
        whichever protocol carried it (``source``: cli, mqtt, opcua, liveview), called from
        its own thread. Refused at once (audited, published, the reason returned) when it
        cannot be applied, a promotion whose gates fail included; else queued for the loop,
        which applies it between two batches and publishes the outcome on
        ``<prefix>/<line>/lifecycle`` (None: accepted). ``args``: ``bundle`` (shadow_start),
        ``entry`` (confirm), ``force`` (promote past failed gates, recorded as such),
        ``request_id`` (echoed in the outcome)."""
        change = _Change(action, inspection, dict(args), who, source)
        reason = self._check(change)
        if reason is None and action == "promote" and not change.args.get("force"):
            failed = self._gates(self.shadows[str(inspection)])
            reason = "gates failed: " + "; ".join(failed) if failed else None
        if reason is not None:
            self._outcome(change, "refused", reason)
            return reason
        with self._lock:
            self._changes.append(change)
        self._publish_outcome(change, "accepted", None)
        return None

    def on_mqtt_command(self, payload: bytes) -> None:
        """MQTT's lifecycle/set, on the line link's network thread."""
        parsed = parse_lifecycle_command(payload)
        if isinstance(parsed, str):
            self._outcome(_Change("command", None, {}, "unknown", "mqtt"), "refused", parsed)
            return
        action, inspection, args, who = parsed
        self.command(action, inspection, args, who, "mqtt")

    def report(self) -> dict[str, Any]:
        """The latest shadow report (contract.shadow_message), as of the last report
        interval or change, from any thread: the live statistics belong to the loop."""
        return self._latest

    def _check(self, change: _Change) -> str | None:
        """Why ``change`` cannot be applied now, or None. Called by the door and again by
        the loop (the state may have moved in between)."""
        line = self.line
        if self.settings is None:
            return (
                "model changes on the running line are off (shadow.enabled: false in "
                f"{line.config.path})"
            )
        if change.action not in LIFECYCLE_ACTIONS:
            return f"unknown action {change.action!r} (one of {', '.join(LIFECYCLE_ACTIONS)})"
        if line.stopping():
            return "the agent is stopping"
        if change.action == "confirm":
            entry = change.args.get("entry")
            if not isinstance(entry, str) or not entry:
                return "confirm needs the archive entry (entry)"
            if not Path(entry).with_suffix(".json").is_file():
                return f"{entry}: no archive entry"
            return None
        recipe = line.recipe
        ids = recipe.inspection_ids
        if change.inspection not in ids:
            return (
                f"no inspection {change.inspection!r} in recipe {recipe.name} "
                f"(inspections: {', '.join(ids)})"
            )
        if change.action == "shadow_start":
            bundle = change.args.get("bundle")
            if not isinstance(bundle, str) or not bundle:
                return "shadow_start needs the candidate bundle (bundle)"
            if not (Path(bundle) / MANIFEST).is_file():
                return f"{bundle}: not a bundle folder (no {MANIFEST})"
            if change.inspection in self.shadows:
                return f"a candidate already shadows {change.inspection}: stop it first"
        elif change.action in ("shadow_stop", "promote"):
            if change.inspection not in self.shadows:
                return f"no candidate shadows {change.inspection} (shadow_start first)"
        elif change.action == "rollback":
            assert self.promotions is not None
            key = inspection_key(recipe.name, str(change.inspection))
            if self.promotions.previous(key, self.bases[key]) is None:
                return f"{key}: no earlier bundle is kept to roll back to"
        if change.action in ("promote", "rollback"):
            loading = line.loading_recipe()
            if loading is not None:
                return f"busy: recipe {loading} is still loading"
            if self._change_thread is not None:
                return "busy: another model change is still loading"
        return None

    def _gates(self, shadow: _Shadow) -> list[str]:
        assert self.settings is not None
        bundle, stats = shadow.run.model.bundle, shadow.stats
        evidence = gates.Evidence(
            self_test=None,  # load_models self-tested it: a failing one never shadows
            thresholds=bundle.thresholds,
            frames=stats.frames,
            passed=stats.passed,
            false_rejects=stats.false_rejects,
            calibration_stale=bool(bundle.manifest.get("calibration_stale")),
            regression=dict(shadow.regression),
        )
        return gates.failed_gates(
            evidence,
            min_frames=self.settings.min_frames,
            max_false_reject_rate=self.settings.max_false_reject_rate,
        )

    # -- the loop's turn (inference thread, between batches) ----------------------------------

    def between_batches(self) -> None:
        """Take a finished load, then apply the changes the door queued."""
        self._finish_loading()
        with self._lock:
            changes = list(self._changes)
            self._changes.clear()
        for change in changes:
            reason = self._check(change)
            if reason is not None:
                self._outcome(change, "refused", reason)
                continue
            try:
                self._apply[change.action](change)
            except AuditUnavailable as exc:  # nothing changes that cannot be recorded
                self._publish_outcome(change, "refused", f"cannot be audited: {exc}")
                log.error("%s refused: cannot be audited: %s", change.action, exc)
            except (UserError, OSError, ValueError) as exc:
                self._outcome(change, "failed", str(exc))

    def housekeeping(self, now: float) -> None:
        """The periodic shadow report (``now``: time.monotonic())."""
        if self.settings is not None and now >= self._next_report:
            self._report()

    def stop_shadows(self, state: str) -> None:
        """End every shadow (a recipe change: they compared against the old recipe)."""
        for shadow in list(self.shadows.values()):
            self._end_shadow(shadow, state)

    # -- audit records and outcomes ------------------------------------------------------------

    def _record(
        self,
        change: _Change,
        what: Mapping[str, Any],
        *,
        result: str = "ok",
        reason: str | None = None,
    ) -> dict[str, Any]:
        return self.audit.record(
            change.action.replace("_", "."),
            who=change.who,
            source=change.source,
            where=change.inspection,
            what=what,
            reason=reason,
            result=result,
        )

    def _outcome(
        self, change: _Change, result: str, reason: str, what: Mapping[str, Any] | None = None
    ) -> None:
        """A command refused or failed: audited (when the trail takes it), published, logged."""
        try:
            self._record(change, {**(what or {}), "args": dict(change.args)}, result=result,
                         reason=reason)  # fmt: skip
        except (AuditUnavailable, ValueError) as exc:
            log.error("cannot audit a %s %s: %s", result, change.action, exc)
        log.warning("%s %s (%s, %s): %s", change.action, result, change.who, change.source, reason)
        self._publish_outcome(change, result, reason)

    def _publish_outcome(
        self,
        change: _Change,
        result: str,
        reason: str | None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        message = lifecycle_message(
            action=change.action,
            inspection=change.inspection,
            result=result,
            reason=reason,
            request_id=change.request_id,
            who=change.who,
            timestamp=time.time(),
            details=details,
        )
        self._publish_lifecycle(message)

    # -- applying each action ------------------------------------------------------------------

    def _run_of(self, inspection: str) -> Run:
        return next(r for runs in self.line.runs.values() for r in runs if r.id == inspection)

    def _start_loading(self, change: _Change, load: Callable[[], Any]) -> None:
        """Load on a helper thread while production keeps inspecting; _finish_loading takes
        the result between two batches."""
        if self._change_thread is not None:
            raise UserError("busy: another model change is still loading")

        def work() -> None:
            try:
                self._change_result = (change, load())
            except Exception as exc:  # UserError or anything ORT/FAISS raise: keep running
                self._change_result = (change, exc)

        self._change_thread = threading.Thread(target=work, name="lifecycle-load", daemon=True)
        self._change_thread.start()

    def _finish_loading(self) -> None:
        if self._change_thread is None or self._change_thread.is_alive():
            return
        done, self._change_result, self._change_thread = self._change_result, None, None
        if done is None:
            return
        change, result = done
        if isinstance(result, Exception):
            self._outcome(change, "failed", f"cannot load: {result}")
            return
        try:
            if change.action == "shadow_start":
                self._begin_shadow(change, *result)
            else:
                self._finish_rollback(change, *result)
        except AuditUnavailable as exc:
            self._publish_outcome(change, "refused", f"cannot be audited: {exc}")
        except (UserError, OSError, ValueError) as exc:
            self._outcome(change, "failed", str(exc))

    def _do_shadow_start(self, change: _Change) -> None:
        line, promotions = self.line, self.promotions
        config = line.config
        assert promotions is not None and config.lifecycle_dir is not None
        recipe = line.recipe
        spec = next(i for i in recipe.inspections if i.id == change.inspection)
        source = Path(str(change.args["bundle"]))
        folder = regression.folder(config.lifecycle_dir, inspection_key(recipe.name, spec.id))
        build = line.build_scorer

        def load() -> tuple[Recipe, Path, Run, dict[str, gates.Rescored]]:
            # A copy: what shadows is what a promotion keeps, whatever happens to `source`.
            staged = promotions.stage(source)
            models = load_models(config, [staged], build)  # self-tested
            one = dataclasses.replace(
                recipe, inspections=(dataclasses.replace(spec, bundle=staged),)
            )
            run = bind(config, one, models)[spec.camera][0]
            entries = regression.load(folder)
            scored = regression.rescore(entries, run.model.scorer, run.thresholds, run.keep)
            return recipe, source, run, scored

        self._start_loading(change, load)

    def _begin_shadow(
        self,
        change: _Change,
        recipe: Recipe,
        source: Path,
        run: Run,
        scored: dict[str, gates.Rescored],
    ) -> None:
        reason = self._check(change)
        if reason is None and recipe is not self.line.recipe:
            reason = "the recipe changed while the candidate loaded"
        if reason is not None:
            self._outcome(change, "refused", reason)
            return
        production = self._run_of(run.id)
        what = {
            "bundle": str(source),
            "copy": str(run.model.bundle.path),
            "model_after": run.model.bundle.model_id,
            "sha256_after": bundle_sha256(run.model.bundle.path),
            "model_before": production.model.bundle.model_id,
            "sha256_before": bundle_sha256(production.model.bundle.path),
            "thresholds_after": {"image": run.thresholds.image, "pixel": run.thresholds.pixel},
            "regression": {
                "confirmed": len(scored),
                "missed": len(gates.regression_misses(scored)),
            },
        }
        self._record(change, what)
        assert self.settings is not None
        key = inspection_key(recipe.name, run.id)
        shadow = _Shadow(
            key, recipe.name, run.id, source, run, ShadowStats(self.settings.window), scored,
            time.time(), change.who,
        )  # fmt: skip
        self.shadows[run.id] = shadow
        log.info(
            "shadow %s: candidate %s (model %s) beside %s, within %.0f%% of inference time",
            key,
            source,
            run.model.bundle.model_id,
            production.model.bundle.model_id,
            self.settings.max_share * 100,
        )
        self._publish_outcome(change, "ok", None, {"model_id": run.model.bundle.model_id})
        self._report()

    def _do_shadow_stop(self, change: _Change) -> None:
        shadow = self.shadows[str(change.inspection)]
        self._record(
            change, {"model_id": shadow.run.model.bundle.model_id, **shadow.stats.report()}
        )
        self._end_shadow(shadow, "stopped")
        self._publish_outcome(change, "ok", None)

    def _end_shadow(self, shadow: _Shadow, state: str) -> None:
        self.shadows.pop(shadow.inspection, None)
        shadow.state = state
        self._stopped_shadows[shadow.inspection] = shadow  # its last report goes out once
        self._report()
        self._prune()

    def _prune(self) -> None:
        if self.promotions is not None:
            in_use = [s.run.model.bundle.path for s in self.shadows.values()]
            in_use += list(self.line.models)
            try:
                self.promotions.prune(in_use)
            except (OSError, UserError) as exc:
                log.warning("cannot delete unused bundle copies: %s", exc)

    def _do_promote(self, change: _Change) -> None:
        assert self.promotions is not None
        shadow = self.shadows[str(change.inspection)]
        failed = self._gates(shadow)
        forced = bool(change.args.get("force"))
        if failed and not forced:
            self._outcome(change, "refused", "gates failed: " + "; ".join(failed))
            return
        before = self._run_of(shadow.inspection)
        after = shadow.run
        replacement = self._replacement(shadow.recipe, shadow.inspection, after.model)
        what = {
            "bundle_before": str(before.model.bundle.path),
            "model_before": before.model.bundle.model_id,
            "sha256_before": bundle_sha256(before.model.bundle.path),
            "thresholds_before": {
                "image": before.thresholds.image,
                "pixel": before.thresholds.pixel,
            },
            "bundle_after": str(after.model.bundle.path),
            "model_after": after.model.bundle.model_id,
            "sha256_after": bundle_sha256(after.model.bundle.path),
            "thresholds_after": {"image": after.thresholds.image, "pixel": after.thresholds.pixel},
            "candidate": str(shadow.source),
            "forced": forced,
            "gates_failed": failed,
            "shadow": {k: shadow.stats.report()[k] for k in ("frames", "passed", "false_rejects")},
        }
        reason = "forced past failed gates: " + "; ".join(failed) if failed else None
        self._record(change, what, reason=reason)
        entry = {
            "path": str(after.model.bundle.path),
            "model_id": after.model.bundle.model_id,
            "sha256": what["sha256_after"],
            "at": now_iso(),
            "who": change.who,
            "forced": forced,
        }
        self.promotions.promote(shadow.key, self.bases[shadow.key], entry)
        self.line.install(shadow.recipe, *replacement)
        self._end_shadow(shadow, "promoted")
        log.info(
            "promoted %s: model %s -> %s%s",
            shadow.key,
            before.model.bundle.model_id,
            after.model.bundle.model_id,
            " (FORCED past failed gates)" if failed else "",
        )
        self._publish_outcome(change, "ok", reason, {"model_id": after.model.bundle.model_id})

    def _do_rollback(self, change: _Change) -> None:
        assert self.promotions is not None
        line = self.line
        recipe, config, have = line.recipe, line.config, dict(line.models)
        key = inspection_key(recipe.name, str(change.inspection))
        target = self.promotions.previous(key, self.bases[key])
        assert target is not None  # _check
        build = line.build_scorer

        def load() -> tuple[Recipe, Model]:
            return recipe, load_models(config, [target], build, have)[target]

        self._start_loading(change, load)

    def _finish_rollback(self, change: _Change, recipe: Recipe, model: Model) -> None:
        assert self.promotions is not None
        reason = self._check(change)
        if reason is None and recipe.name != self.line.recipe.name:
            reason = "the recipe changed while the bundle loaded"
        key = inspection_key(recipe.name, str(change.inspection))
        expected = self.promotions.previous(key, self.bases[key])
        loaded = model.bundle.path.resolve()
        if reason is None and (expected is None or expected.resolve() != loaded):
            reason = "the promotions changed while the bundle loaded"
        if reason is not None:
            self._outcome(change, "refused", reason)
            return
        before = self._run_of(str(change.inspection))
        replacement = self._replacement(recipe.name, str(change.inspection), model)
        after = next(r for r in replacement[1].get(before.spec.camera, ()) if r.id == before.id)
        what = {
            "bundle_before": str(before.model.bundle.path),
            "model_before": before.model.bundle.model_id,
            "sha256_before": bundle_sha256(before.model.bundle.path),
            "thresholds_before": {
                "image": before.thresholds.image,
                "pixel": before.thresholds.pixel,
            },
            "bundle_after": str(model.bundle.path),
            "model_after": model.bundle.model_id,
            "sha256_after": bundle_sha256(model.bundle.path),
            "thresholds_after": {"image": after.thresholds.image, "pixel": after.thresholds.pixel},
        }
        self._record(change, what)
        self.promotions.rollback(key, self.bases[key])
        self.line.install(recipe.name, *replacement)
        self._prune()
        log.info("rolled %s back: model %s -> %s", key, what["model_before"], what["model_after"])
        self._publish_outcome(change, "ok", None, {"model_id": model.bundle.model_id})

    def _replacement(
        self, recipe_name: str, inspection: str, model: Model
    ) -> tuple[Recipe, Runs, dict[Path, Model]]:
        """The recipe with ``inspection`` on ``model``, its runs and the models then in use;
        UserError when it cannot be bound (nothing is changed)."""
        config = self.line.config
        path = model.bundle.path
        recipe = config.station.recipes[recipe_name]
        specs = tuple(
            dataclasses.replace(i, bundle=path) if i.id == inspection else i
            for i in recipe.inspections
        )
        new = dataclasses.replace(recipe, inspections=specs)
        models = {**self.line.models, path: model}
        return new, bind(config, new, models), models

    def _do_confirm(self, change: _Change) -> None:
        line = self.line
        config, recipe = line.config, line.recipe
        assert config.lifecycle_dir is not None
        entry = Path(str(change.args["entry"]))
        _, meta = regression.read_archive_entry(entry)
        inspection = regression.pick_inspection(meta, change.inspection)
        if inspection not in recipe.inspection_ids:
            raise UserError(f"no inspection {inspection!r} in recipe {recipe.name}")
        run = self._run_of(inspection)
        key = inspection_key(recipe.name, inspection)
        folder = regression.folder(config.lifecycle_dir, key)
        record = {
            "inspection": inspection,
            "recipe": recipe.name,
            "confirmed_by": change.who,
            "confirmed_at": now_iso(),
            "source": change.source,
        }
        name = regression.confirm(entry, folder, run.spec.roi, record)
        change = dataclasses.replace(change, inspection=inspection)
        what = {
            "entry": str(entry),
            "name": name,
            "camera": meta.get("camera"),
            "frame_id": meta.get("frame_id"),
            "archived_verdict": meta.get("verdict"),
        }
        try:
            self._record(change, what)
        except AuditUnavailable:  # not recorded: not confirmed either
            for suffix in (".json", ".png"):
                (folder / name).with_suffix(suffix).unlink(missing_ok=True)
            raise
        shadow = self.shadows.get(inspection)
        if shadow is not None:  # the gate sees it at once
            added = [e for e in regression.load(folder) if e.name == name]
            r = shadow.run
            shadow.regression.update(
                regression.rescore(added, r.model.scorer, r.thresholds, r.keep)
            )
        log.info("confirmed %s as a defect of %s (%s)", name, key, change.who)
        self._publish_outcome(change, "ok", None, {"name": name})

    # -- shadows on live frames ----------------------------------------------------------------

    def compare(self, items: Sequence[Inspected], production_s: float) -> None:
        """Each shadowing candidate on the batch's frames of its inspection, as far as its
        budget allows; it decides nothing, and nothing it does can fail production."""
        if not self.shadows:
            return
        self._budget.earn(production_s)
        pairs = [
            (item, task, shadow)
            for item in items
            if item.error is None and item.image is not None
            for task in item.tasks
            if (shadow := self.shadows.get(task.run.id)) is not None
            and item.recipe.name == shadow.recipe
        ]
        if not pairs:
            return
        n = self._budget.take(len(pairs))
        for _, _, shadow in pairs[n:]:
            shadow.stats.skipped += 1
        if n == 0:
            return
        t0 = time.perf_counter()
        try:
            taken = pairs[:n]
            candidates = [inspect.prepare(_image(item), s.run) for item, _, s in taken]
            inspect.score(candidates, {})
            for (item, task, shadow), candidate in zip(taken, candidates, strict=True):
                seen = Comparison(task.verdict, candidate.verdict, _score(task), _score(candidate))
                shadow.stats.add(seen)
                if seen.disagree:
                    self._archive_disagreement(item, task, candidate, shadow)
        except Exception:  # a candidate's bug must never touch the line
            log.exception("shadow: a batch could not be compared; shadows stopped")
            self.stop_shadows("failed")
        finally:
            self._budget.spend(time.perf_counter() - t0, n)

    def _archive_disagreement(
        self, item: Inspected, task: inspect.Task, candidate: inspect.Task, shadow: _Shadow
    ) -> None:
        """The frame with both models' heat maps, under the archive's quota."""
        if self.archive is None or item.image is None:
            return
        frame_hw = item.image.shape[:2]
        heats = []
        for who, t in (("production", task), ("candidate", candidate)):
            amap = inspect.frame_heat(t, frame_hw)
            scale, score = t.run.thresholds.scale, _score(t)
            label = f"{who} {t.verdict}" + (f" {score:.3f}" if score is not None else "")
            heats.append(
                Heat(
                    amap if amap is not None else np.zeros(frame_hw, dtype=np.float32),
                    scale["low"],
                    scale["high"],
                    t.run.thresholds.pixel,
                    label,
                )
            )
        frame = item.frame
        sidecar = {
            "timestamp": round(frame.captured_at * 1000),
            "camera": frame.camera,
            "sequence": frame.sequence,
            "frame_id": frame.frame_id,
            "source": frame.source_name,
            "recipe": item.recipe.name,
            "verdict": task.verdict,
            "score": _score(task),
            "model_id": task.run.model.bundle.model_id,
            "inspections": [{"id": task.run.id, "verdict": task.verdict, "score": _score(task)}],
            "shadow": {
                "inspection": shadow.inspection,
                "candidate_bundle": str(shadow.source),
                "candidate_model_id": candidate.run.model.bundle.model_id,
                "candidate_verdict": candidate.verdict,
                "candidate_score": _score(candidate),
            },
        }
        if self.archive.submit(item.image, sidecar, more=heats, tag="shadow") is not None:
            shadow.stats.archived += 1

    def _report(self) -> None:
        """The shadow report, retained on <prefix>/<line>/shadow, and the metrics."""
        assert self.settings is not None
        self._next_report = time.monotonic() + self.settings.report_interval_s
        shadows = [*self.shadows.values(), *self._stopped_shadows.values()]
        self._stopped_shadows = {}
        reports = [s.report() for s in shadows]
        for r in reports:
            self._metrics(r)
        message = shadow_message(time.time(), reports)
        self._latest = message
        if reports or self._reported:
            self._publish_shadow(message)
        self._reported = bool(reports)

    def _metrics(self, report: Mapping[str, Any]) -> None:
        inspection = str(report["inspection"])
        for key, gauge in self._gauges.items():
            if key == "matrix":
                for p, row in report["matrix"].items():
                    for q, n in row.items():
                        gauge.labels(inspection, p, q).set(n)
            else:
                gauge.labels(inspection).set(report[key])


def _image(item: Inspected) -> np.ndarray:
    assert item.image is not None  # compare() takes only frames with an image
    return item.image


def _score(task: inspect.Task) -> float | None:
    d = task.decision
    return float(d.score) if d is not None and math.isfinite(d.score) else None
