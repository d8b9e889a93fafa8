"""Recipes: the inspections of each product, and the one way to pick the active one.

A recipe has a name (what people read) and a number (what a PLC sends, 1..32767: a positive
INT). Selecting one is a command that arrives over any protocol; ``parse_select`` turns an MQTT
payload into a ``Select`` or a reason, and ``RecipeBook.find`` resolves it. Neither raises on
what a peer sends.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_agent.station.commands import json_command
from edge_agent.station.regions import Roi

MAX_NUMBER = 32767
MAX_COMMAND_BYTES = 4096
MAX_REQUEST_ID = 128


@dataclass(frozen=True)
class Inspection:
    """camera x region x ignore mask x bundle x thresholds."""

    id: str
    camera: str
    bundle: Path
    roi: Roi | None = None
    ignore: np.ndarray | None = field(default=None, compare=False, repr=False)  # bool, ROI-sized
    ignore_file: Path | None = None
    image_threshold: float | None = None
    pixel_threshold: float | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    number: int
    inspections: tuple[Inspection, ...]

    def on_camera(self, camera: str) -> tuple[Inspection, ...]:
        return tuple(i for i in self.inspections if i.camera == camera)

    @property
    def inspection_ids(self) -> tuple[str, ...]:
        return tuple(i.id for i in self.inspections)

    def cameras(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(i.camera for i in self.inspections))

    def bundles(self) -> tuple[Path, ...]:
        """Its bundles, once each, in the order they first appear."""
        return tuple(dict.fromkeys(i.bundle for i in self.inspections))


@dataclass(frozen=True)
class Select:
    """A recipe selection: by name or by number (exactly one), with the caller's request id."""

    name: str | None = None
    number: int | None = None
    request_id: str | None = None

    def describe(self) -> str:
        return repr(self.name) if self.name is not None else f"number {self.number}"


@dataclass(frozen=True)
class RecipeBook:
    recipes: Mapping[str, Recipe]
    active: str
    preload: bool = True
    part_timeout_s: float = 2.0

    def find(self, select: Select) -> Recipe | str:
        """The recipe ``select`` names, or the reason there is none."""
        if select.name is not None:
            recipe = self.recipes.get(select.name)
            return recipe if recipe is not None else f"no recipe named {select.name!r}"
        for recipe in self.recipes.values():
            if recipe.number == select.number:
                return recipe
        return f"no recipe with number {select.number}"

    def bundles(self) -> tuple[Path, ...]:
        """Every bundle of every recipe, once each, in the order they first appear."""
        return tuple(dict.fromkeys(b for r in self.recipes.values() for b in r.bundles()))


def parse_select(payload: bytes) -> Select | str:
    """``{"recipe": "bottle-b"}`` or ``{"number": 2}``, with an optional ``"request_id"``
    (string), as JSON of at most MAX_COMMAND_BYTES -> Select, else the reason it is refused."""
    data = json_command(payload, MAX_COMMAND_BYTES, ("recipe", "number", "request_id"))
    if isinstance(data, str):
        return data
    request_id = data.get("request_id")
    if request_id is not None and (
        not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID
    ):
        return f"request_id must be a string of at most {MAX_REQUEST_ID} characters"
    name, number = data.get("recipe"), data.get("number")
    if (name is None) == (number is None):
        return 'give exactly one of "recipe" (a name) and "number"'
    if name is not None:
        if not isinstance(name, str) or not name:
            return '"recipe" must be a non-empty string'
        return Select(name=name, request_id=request_id)
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_NUMBER:
        return f'"number" must be an integer 1..{MAX_NUMBER}'
    return Select(number=number, request_id=request_id)
