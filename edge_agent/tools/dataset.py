"""MVTec AD folder layout: train/good, test/<good|defect>, ground_truth/<defect>/<stem>_mask.png."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import UserError
from edge_agent.images import list_images

GOOD = "good"


@dataclass(frozen=True)
class TestSample:
    path: Path
    defect_type: str  # "good" or the defect folder name
    mask_path: Path | None  # None for good samples (all-zero mask)

    @property
    def is_anomalous(self) -> bool:
        return self.defect_type != GOOD


def train_folder(data: str | os.PathLike[str]) -> Path:
    """The folder of good training images: DATA/train/good for an MVTec layout, else DATA."""
    data = Path(data)
    if not data.exists():
        raise UserError(f"{data}: no such folder")
    good = data / "train" / GOOD
    return good if good.is_dir() else data


def test_samples(data: str | os.PathLike[str]) -> list[TestSample]:
    """Every test image with its label and mask; a UserError when the layout is not MVTec."""
    data = Path(data)
    test_dir = data / "test"
    if not data.is_dir():
        raise UserError(f"{data}: no such folder")
    if not test_dir.is_dir():
        raise UserError(
            f"{data}: not an MVTec-layout dataset (expected {test_dir}/<good|defect type>/)"
        )
    samples: list[TestSample] = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        for path in list_images(type_dir):
            mask = None
            if type_dir.name != GOOD:
                mask = data / "ground_truth" / type_dir.name / f"{path.stem}_mask.png"
                if not mask.is_file():
                    raise UserError(f"{path}: ground-truth mask {mask} is missing")
            samples.append(TestSample(path, type_dir.name, mask))
    if not samples:
        raise UserError(f"{test_dir}: no test images")
    return samples
