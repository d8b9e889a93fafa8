"""A camera's `genicam` section: GenicamSettings' fields (edge_agent/capture/genicam.py), its
defaults and choice lists. Only checked here: what a value must look like; whether the camera
takes it is the camera's to say when the capture opens it (the value it took is read back)."""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from edge_agent.capture.genicam import (
    PIXEL_FORMATS,
    TRIGGER,
    TRIGGER_ACTIVATIONS,
    TRIGGER_CHOICES,
    GenicamSettings,
)
from edge_agent.config.fields import Section, problem

PixelFormat = Literal.__getitem__(tuple(PIXEL_FORMATS))
# A GenICam feature name: letters, digits and '_' (SFNC), never '=' or spaces.
FEATURE_NAME = r"^[A-Za-z][A-Za-z0-9_]*$"


def _default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(GenicamSettings) if f.name == name)


def _trigger(value: str) -> str:
    if not TRIGGER.match(value):
        raise problem(f"must be {TRIGGER_CHOICES}, got {value!r}")
    return value


def _activation(value: str) -> str:
    # Checked here rather than as a Literal: config.example.yaml documents the genicam keys
    # commented out, where test_config's "one of" lines cannot reach.
    if value not in TRIGGER_ACTIVATIONS:
        raise problem(f"must be one of {', '.join(TRIGGER_ACTIVATIONS)}, got {value!r}")
    return value


def _roi(value: list[int]) -> list[int]:
    if min(value[:2]) < 0 or min(value[2:]) < 1:
        raise problem(f"must be [x, y, width, height], x and y 0 or more, got {value}")
    return value


def _features(value: dict[str, Any]) -> dict[str, Any]:
    for name, item in value.items():
        if not re.match(FEATURE_NAME, name):
            raise problem(f"{name!r} is not a GenICam feature name", name)
        if isinstance(item, str) and (not item.strip() or any(c.isspace() for c in item)):
            raise problem(f"must be a value without spaces, got {item!r}", name)
    return value


class GenicamModel(Section):
    """`cameras[].genicam`: null (or left out) keeps the camera's own value."""

    exposure_us: float | None = Field(_default("exposure_us"), gt=0)
    gain_db: float | None = _default("gain_db")
    pixel_format: PixelFormat | None = _default("pixel_format")
    # x, y, width, height on the sensor.
    roi: Annotated[list[int], Field(min_length=4, max_length=4), AfterValidator(_roi)] | None = None
    frame_rate: float | None = Field(_default("frame_rate"), gt=0)
    trigger: Annotated[str, AfterValidator(_trigger)] = _default("trigger")
    trigger_activation: Annotated[str, AfterValidator(_activation)] = _default("trigger_activation")
    packet_size: int = Field(_default("packet_size"), ge=0, le=65535)
    buffers: int = Field(_default("buffers"), ge=1, le=1024)
    features: Annotated[dict[str, str | bool | int | float], AfterValidator(_features)] = Field(
        default_factory=dict
    )

    def settings(self) -> GenicamSettings:
        roi = self.roi
        values = self.model_dump(exclude={"roi", "features"})
        return GenicamSettings(
            **values,
            roi=tuple(roi) if roi is not None else None,  # type: ignore[arg-type]
            features=tuple(self.features.items()),
        )
