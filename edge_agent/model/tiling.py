"""Tiling: a frame far larger than the model input is scored as tiles at native resolution.

A 4096x1024 line-scan strip resized to a 288 px model input shrinks a 3 px scratch to a
fifth of a pixel.
`fit --tile H W` learns on H x W tiles cut from the frames, and the run time cuts every frame
the same way, runs all tiles (of all cameras' frames in a batch) through the model as one
batch, and stitches the tiles' patch features back into one feature grid in frame coordinates.
Everything after the features (kNN, exact re-checks, Eq. 7, maps, regions) then sees one
frame with a large grid, exactly as for an untiled model; the image score is the maximum
over the stitched grid, so over every tile.

Tiles along an axis of length L (pixels) with tile side t and overlap o start at

    p_i = min(i * (t - o), L - t),  i = 0 .. ceil((L - t) / (t - o))

so the last tile ends at the frame's edge. A CNN's zero padding bends a tile's features near
its edges for tens of pixels (measured on a constant frame: ~50 px for the default layers), so
where tiles overlap, a cell's feature is the blend of the tiles covering it, each weighted by
how deep inside it the cell lies, per axis

    w_i(x) = min(1, depth_i(x) / o),  depth_i(x) = distance from the cell's centre to the
             nearer edge of tile i that is not an edge of the frame

normalised to sum 1 (2-D: the product of the two axes' weights). The features then change
continuously from one tile into the next. Measured on a constant frame (the largest step
between neighbouring cells away from the frame's edges, relative to the score): a hard cut
at 0 px overlap 21-27%, blended at 32 px 8.7%, at 96 px 2.1-4.8% (192 px tiles) and at 64 px
3.0-6.9% (128 px tiles: too small for the padding's reach to fit), the untiled model's own
variation about 1%. On good parts the blended seams score within 1.2% of the rest of the
frame, a hard cut's 12% apart (tests/test_tiling.py). Those figures predate fit's BatchNorm fix
(BENCHMARKS.md); with it, 128 px tiles: a cut's largest step 16.5%, the blend's 7.1%, seams on
good parts 13% and 1.5% off the rest. fit stitches training frames the same
way, so the bank holds what blended good parts look like. Frame, tile and overlap are
multiples of the patch cell c.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

DEFAULT_OVERLAP = 96
"""Pixels two neighbouring tiles share (at most half a tile: default_overlap()): about twice
the ~50 px a tile's padding reaches into its features, so the blend has clean features from
one tile or the other across the seam. It costs tiles: t / (t - o) times as many per axis
(1.5x for 288 px tiles)."""


def default_overlap(tile: tuple[int, int], cell: int) -> int:
    """DEFAULT_OVERLAP, or half the shorter tile side (in whole cells) where that is less."""
    return min(DEFAULT_OVERLAP, min(tile) // 2 // cell * cell)


TILES_PER_RUN = 64
"""Tiles per ONNX Runtime run: a few frames' worth, and a bound on the activations held at
once when many large frames arrive together."""


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Pixel offsets of the tiles along one axis (module docstring)."""
    if tile > length:
        raise ValueError(f"a {tile} px tile does not fit in {length} px")
    step = tile - overlap
    n = math.ceil((length - tile) / step) + 1 if length > tile else 1
    return [min(i * step, length - tile) for i in range(n)]


def axis_weights(length: int, tile: int, overlap: int, cell: int) -> np.ndarray:
    """[cells along the axis, tiles along it]: each tile's blend weight for each cell
    (module docstring), rows summing to 1; 0 where a tile does not cover a cell."""
    p = starts(length, tile, overlap)
    centres = (np.arange(length // cell) + 0.5) * cell
    weights = np.zeros((len(centres), len(p)))
    ramp = max(overlap, cell)  # without overlap each cell lies in one tile: any ramp does
    for i, start in enumerate(p):
        inside = (centres > start) & (centres < start + tile)
        near = np.full(len(centres), np.inf)  # a frame edge is no seam
        if start > 0:
            near = np.minimum(near, centres - start)
        if start + tile < length:
            near = np.minimum(near, start + tile - centres)
        weights[inside, i] = np.minimum(1.0, near[inside] / ramp)
    return weights / weights.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Tiling:
    """How frames of `frame` (height, width) are cut into `tile` (height, width) tiles that
    share `overlap` pixels, with `cell` pixels per patch cell."""

    frame: tuple[int, int]
    tile: tuple[int, int]
    overlap: int
    cell: int
    _gather: np.ndarray = field(init=False, repr=False, compare=False)  # [slots, cells]
    _weight: np.ndarray = field(init=False, repr=False, compare=False)  # [slots, cells]

    def __post_init__(self) -> None:
        (fh, fw), (th, tw), o, c = self.frame, self.tile, self.overlap, self.cell
        if c < 1 or any(v % c for v in (fh, fw, th, tw, o)):
            raise ValueError(
                f"frame {fw}x{fh}, tile {tw}x{th} and overlap {o} must be multiples of the "
                f"{c} px patch cell"
            )
        if th > fh or tw > fw:
            raise ValueError(f"the {tw}x{th} tile is larger than the {fw}x{fh} frame")
        if not 0 <= o < min(th, tw):
            raise ValueError(f"overlap {o} px must be at least 0 and below the tile's sides")
        wy, wx = axis_weights(fh, th, o, c), axis_weights(fw, tw, o, c)
        sy = np.asarray(starts(fh, th, o)) // c
        sx = np.asarray(starts(fw, tw, o)) // c
        gh, gw = th // c, tw // c
        gather, weight = [], []
        # One (tile row, tile column) pair per slot: each cell takes from at most
        # k_y x k_x tiles, the most that cover any one cell along each axis.
        ky, kx = int((wy > 0).sum(1).max()), int((wx > 0).sum(1).max())
        ry = np.argsort(~(wy > 0), axis=1, kind="stable")[:, :ky]  # covering tiles first
        rx = np.argsort(~(wx > 0), axis=1, kind="stable")[:, :kx]
        rows, cols = np.arange(fh // c), np.arange(fw // c)
        for a in range(ky):
            ty = ry[:, a]
            for b in range(kx):
                tx = rx[:, b]
                tile_index = ty[:, None] * len(sx) + tx[None, :]
                ly = np.clip(rows - sy[ty], 0, gh - 1)  # clipped where the weight is 0
                lx = np.clip(cols - sx[tx], 0, gw - 1)
                gather.append((tile_index * (gh * gw) + ly[:, None] * gw + lx[None, :]).ravel())
                weight.append((wy[rows, ty][:, None] * wx[cols, tx][None, :]).ravel())
        object.__setattr__(self, "_gather", np.stack(gather))
        object.__setattr__(self, "_weight", np.stack(weight).astype(np.float32))

    @cached_property
    def positions(self) -> list[tuple[int, int]]:
        """(y, x) pixel offsets of the tiles, row by row: the order cut() emits them in."""
        ys = starts(self.frame[0], self.tile[0], self.overlap)
        xs = starts(self.frame[1], self.tile[1], self.overlap)
        return [(y, x) for y in ys for x in xs]

    @property
    def count(self) -> int:
        return len(self.positions)

    @property
    def grid(self) -> tuple[int, int]:
        """The stitched feature grid: the frame in patch cells."""
        return self.frame[0] // self.cell, self.frame[1] // self.cell

    @property
    def tile_grid(self) -> tuple[int, int]:
        return self.tile[0] // self.cell, self.tile[1] // self.cell

    def cut(self, frames: np.ndarray) -> np.ndarray:
        """[B, H, W, C] frames at the frame size -> [B * count, h, w, C] tiles, frame by frame
        and row by row inside a frame."""
        if frames.shape[1:3] != self.frame:
            raise ValueError(f"frames of {frames.shape[1:3]}, not {self.frame}")
        th, tw = self.tile
        tiles = [frames[:, y : y + th, x : x + tw] for y, x in self.positions]
        return np.stack(tiles, axis=1).reshape(-1, th, tw, frames.shape[3])

    def stitch(self, features: np.ndarray) -> np.ndarray:
        """[B * count, h*w, D] tile features (cut()'s order) -> [B, GH*GW, D] frame features,
        each cell the weighted blend of the tiles covering it (module docstring)."""
        n, per_tile, dim = features.shape
        gh, gw = self.tile_grid
        if per_tile != gh * gw or n % self.count:
            raise ValueError(f"tile features of shape {features.shape} do not fit {self}")
        flat = features.reshape(n // self.count, self.count * per_tile, dim)
        if len(self._gather) == 1:  # no cell in two tiles: a plain gather
            return flat[:, self._gather[0]]
        out = np.zeros((flat.shape[0], self._gather.shape[1], dim), dtype=np.float32)
        for gather, weight in zip(self._gather, self._weight, strict=True):
            out += flat[:, gather] * weight[None, :, None]
        return out

    def features(
        self, frames: np.ndarray, run: Callable[[np.ndarray], np.ndarray], tiles_per_run: int
    ) -> np.ndarray:
        """[B, H, W, 3] frames -> [B, GH*GW, D] stitched features, where `run` maps a batch of
        tiles to their [n, h*w, D] features and takes at most `tiles_per_run` at a time (a
        bound on the activations held at once when many large frames come together)."""
        tiles = self.cut(frames)
        parts = [run(tiles[i : i + tiles_per_run]) for i in range(0, len(tiles), tiles_per_run)]
        return self.stitch(parts[0] if len(parts) == 1 else np.concatenate(parts))

    def as_manifest(self) -> dict[str, object]:
        return {"tile": list(self.tile), "overlap": self.overlap, "cell": self.cell}
