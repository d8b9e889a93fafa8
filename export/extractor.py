"""Locally aware patch features (PatchCore), as one module from uint8 frames to [B, h*w, D].

The graph takes what a camera gives (uint8 NHWC BGR) and does the cheap preprocessing itself,
so the host only resizes and stacks frames and a GPU upload carries a quarter of the bytes.

Per layer, each position's 3x3 (patch-size) neighbourhood is aggregated, the deeper grids are
bilinearly upsampled to the first layer's grid, and the layers are joined:

- projection "none": average-pool the neighbourhood and concatenate channels (anomalib's
  embedding; D = sum of channels);
- projection "adaptive": the reference implementation's embedding. It unfolds the neighbourhood
  (C*p*p values), adaptive-average-pools that vector to `embed_dim`, stacks the layers and pools
  again to `embed_dim`. Both pools are fixed linear maps, so per layer they fold into one p x p
  convolution with constant weights: same numbers, one GEMM, plain ONNX;
- projection "random" / "pca": the "none" features times a fixed [D_raw, embed_dim] matrix
  (Gaussian, or principal axes fitted on the training patches by `fit`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_agent.export.backbones import IMAGENET_MEAN, IMAGENET_STD, Trunk

PROJECTIONS = ("none", "adaptive", "random", "pca")


def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix equal to torch's adaptive_avg_pool1d from n_in to n_out bins."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)  # ceil
        m[i, start:end] = 1.0 / (end - start)
    return m


def reference_projection_weights(
    channels: list[int], patch_size: int, embed_dim: int
) -> list[np.ndarray]:
    """Per-layer conv weights [embed_dim, C, p, p] reproducing the reference's two pools."""
    n_layers = len(channels)
    aggregate = adaptive_pool_matrix(n_layers * embed_dim, embed_dim)
    weights = []
    for layer, c in enumerate(channels):
        per_layer = adaptive_pool_matrix(c * patch_size * patch_size, embed_dim)
        block = aggregate[:, layer * embed_dim : (layer + 1) * embed_dim]
        w = block @ per_layer  # [embed_dim, C*p*p], flattened in (c, ky, kx) order like Unfold
        weights.append(w.reshape(embed_dim, c, patch_size, patch_size).astype(np.float32))
    return weights


class PatchFeatureExtractor(nn.Module):
    def __init__(
        self,
        trunk: Trunk,
        layers: list[str],
        *,
        patch_size: int = 3,
        projection: str = "none",
        embed_dim: int | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        names = trunk.stage_names
        unknown = [name for name in layers if name not in names]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown}; this backbone has {names[1:]}")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}")
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError("patch size must be a positive odd number")
        self.layers = sorted(layers, key=names.index)
        last = max(names.index(name) for name in self.layers)
        # Run the trunk only as deep as the deepest layer used.
        self.stage_names = names[: last + 1]
        self.stages = nn.ModuleList(trunk.stages[: last + 1])
        self.patch_size = patch_size
        self.projection = projection
        # (x/255 - mean)/std as one multiply-add, applied after the BGR->RGB channel swap.
        scale = [1.0 / (255.0 * s) for s in std]
        shift = [-m / s for m, s in zip(mean, std, strict=True)]
        self.register_buffer("scale", torch.tensor(scale).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor(shift).view(1, 3, 1, 1))
        self.channels = self._probe_channels()
        self.pool_weights = nn.ParameterList()
        if projection == "adaptive":
            if not embed_dim:
                raise ValueError("projection 'adaptive' needs embed_dim")
            for w in reference_projection_weights(self.channels, patch_size, embed_dim):
                self.pool_weights.append(nn.Parameter(torch.from_numpy(w), requires_grad=False))
        self.raw_dim = embed_dim if projection == "adaptive" else sum(self.channels)
        self.register_buffer("out_projection", torch.zeros(0))
        self.dim = self.raw_dim

    def set_output_projection(self, matrix: np.ndarray) -> None:
        """Append a fixed linear map [raw_dim, D] (random or PCA) to the graph."""
        if matrix.shape[0] != self.raw_dim:
            raise ValueError(f"projection must have {self.raw_dim} rows, got {matrix.shape}")
        self.out_projection = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))
        self.dim = int(matrix.shape[1])

    @torch.no_grad()
    def _probe_channels(self) -> list[int]:
        # In eval mode: a pass in training mode (a new module's) would move every BatchNorm's
        # running statistics 10% towards this zero batch's, i.e. change the pretrained weights.
        training = self.stages.training
        self.stages.eval()
        maps = self._trunk(torch.zeros(1, 3, 64, 64))
        self.stages.train(training)
        return [int(maps[name].shape[1]) for name in self.layers]

    def _trunk(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, stage in zip(self.stage_names, self.stages, strict=True):
            x = stage(x)
            if name in self.layers:
                out[name] = x
        return out

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        # frames: uint8 [B, H, W, 3] BGR
        x = frames.permute(0, 3, 1, 2).float()
        x = x[:, [2, 1, 0]] * self.scale + self.shift
        maps = self._trunk(x)
        pad = self.patch_size // 2
        grid = maps[self.layers[0]].shape[-2:]
        joined = []
        for i, name in enumerate(self.layers):
            fmap = maps[name]
            if self.projection == "adaptive":
                fmap = F.conv2d(fmap, self.pool_weights[i], padding=pad)
            elif self.patch_size > 1:
                fmap = F.avg_pool2d(fmap, self.patch_size, stride=1, padding=pad)
            if fmap.shape[-2:] != grid:
                fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
            joined.append(fmap)
        # The reference sums its per-layer projections (each fills its own output block).
        feats = (
            sum(joined[1:], joined[0]) if self.projection == "adaptive" else torch.cat(joined, 1)
        )
        feats = feats.flatten(2).transpose(1, 2)  # [B, h*w, D_raw]
        if self.out_projection.numel():
            feats = feats @ self.out_projection
        return feats

    @torch.no_grad()
    def strides(self) -> tuple[int, int]:
        """(pixels per patch cell, the deepest layer's stride): input sides must be multiples
        of the second for every layer's map to cover whole cells of the first."""
        probe = 512
        maps = self._trunk(torch.zeros(1, 3, probe, probe))
        steps = [probe // int(maps[name].shape[-1]) for name in self.layers]
        return steps[0], max(steps)

    @torch.no_grad()
    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        maps = self._trunk(torch.zeros(1, 3, height, width))
        h, w = maps[self.layers[0]].shape[-2:]
        return int(h), int(w)
