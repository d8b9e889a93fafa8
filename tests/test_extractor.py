"""Patch features: shapes, the reference embedding, and ONNX Runtime vs torch on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_agent.export.backbones import _efficientnet_lite, load_trunk
from edge_agent.export.extractor import PatchFeatureExtractor, adaptive_pool_matrix
from edge_agent.export.onnx_export import export_onnx, parity
from edge_agent.images import read_image, resize

from .conftest import require_mtd


@pytest.fixture(scope="module")
def trunk():
    return load_trunk("efficientnet_lite0")


def _frames(n: int, size: tuple[int, int] = (224, 224)) -> np.ndarray:
    files = sorted((require_mtd() / "test" / "crack").iterdir())[:n]
    return np.stack([resize(read_image(f), size) for f in files])


@pytest.mark.parametrize(
    ("layers", "size", "grid", "dim"),
    [
        (["blocks.2", "blocks.4"], (224, 224), (28, 28), 40 + 112),
        (["blocks.2", "blocks.3"], (224, 224), (28, 28), 40 + 80),
        (["blocks.1", "blocks.2"], (160, 320), (40, 80), 24 + 40),
        (["blocks.2", "blocks.4"], (224, 448), (28, 56), 152),
    ],
)
def test_patch_feature_shapes(trunk, layers, size, grid, dim) -> None:
    ex = PatchFeatureExtractor(trunk, layers).eval()
    with torch.no_grad():
        out = ex(torch.zeros(2, *size, 3, dtype=torch.uint8))
    assert ex.grid_for(*size) == grid
    assert out.shape == (2, grid[0] * grid[1], dim)


def test_building_the_extractor_leaves_the_pretrained_weights_as_they_are() -> None:
    # Its channel probe once ran in training mode and moved every BatchNorm's running
    # statistics towards a zero batch's: features 33-40% off the pretrained network's.
    # load_trunk folds the norms away now (issue 33); a trunk that keeps them must still come
    # out of the extractor as it went in.
    trunk = _efficientnet_lite("efficientnet_lite0", None)
    before = {k: v.clone() for k, v in trunk.stages.state_dict().items()}
    assert any("running_mean" in k for k in before)
    ex = PatchFeatureExtractor(trunk, ["blocks.2", "blocks.4"])
    for key, value in trunk.stages.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert ex.stages.training  # a new module's mode, as before the probe


def test_patch_pooling_averages_the_3x3_neighbourhood(trunk) -> None:
    ex = PatchFeatureExtractor(trunk, ["blocks.2"], patch_size=3).eval()
    frames = torch.from_numpy(_frames(1))
    with torch.no_grad():
        x = frames.permute(0, 3, 1, 2).float()[:, [2, 1, 0]] * ex.scale + ex.shift
        fmap = ex._trunk(x)["blocks.2"]  # [1, 40, 28, 28]
        feats = ex(frames)[0].reshape(28, 28, 40)
    # Interior patch (10, 7): mean of its 3x3 neighbourhood, per channel.
    expected = fmap[0, :, 9:12, 6:9].mean(dim=(1, 2))
    torch.testing.assert_close(feats[10, 7], expected, rtol=1e-5, atol=1e-5)


def test_adaptive_pool_matrix_equals_torch() -> None:
    for n_in, n_out in [(360, 1024), (2048, 1024), (10, 3), (7, 7)]:
        x = torch.randn(4, n_in)
        want = F.adaptive_avg_pool1d(x[:, None], n_out)[:, 0].numpy()
        got = x.numpy() @ adaptive_pool_matrix(n_in, n_out).T
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_adaptive_projection_reproduces_reference_embedding(trunk) -> None:
    """The folded convolution equals the reference's unfold -> upsample -> two pools."""
    layers = ["blocks.2", "blocks.3"]
    ex = PatchFeatureExtractor(trunk, layers, projection="adaptive", embed_dim=256).eval()
    frames = torch.from_numpy(_frames(2))
    with torch.no_grad():
        got = ex(frames)
        x = frames.permute(0, 3, 1, 2).float()[:, [2, 1, 0]] * ex.scale + ex.shift
        maps = ex._trunk(x)
        per_layer = []
        for name in layers:
            m = maps[name]
            b, c, h, w = m.shape
            u = F.unfold(m, 3, padding=1).reshape(b, c * 9, h, w)
            if (h, w) != (28, 28):
                u = F.interpolate(u, size=(28, 28), mode="bilinear", align_corners=False)
            u = u.reshape(b, c, 3, 3, 28, 28).permute(0, 4, 5, 1, 2, 3).reshape(-1, c * 9)
            per_layer.append(F.adaptive_avg_pool1d(u[:, None], 256)[:, 0])
        stacked = torch.stack(per_layer, 1).reshape(-1, 1, 2 * 256)
        want = F.adaptive_avg_pool1d(stacked, 256)[:, 0].reshape(2, 784, 256)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("projection", ["none", "adaptive"])
def test_onnx_matches_torch_on_real_images(trunk, tmp_path: Path, projection: str) -> None:
    embed = 512 if projection == "adaptive" else None
    ex = PatchFeatureExtractor(
        trunk, ["blocks.2", "blocks.4"], projection=projection, embed_dim=embed
    ).eval()
    path = tmp_path / "model.onnx"
    export_onnx(ex, path, 224, 224)
    # A batch size the export never saw: the batch axis must be dynamic.
    diff, rel = parity(ex, path, _frames(3))
    assert rel < 1e-3, f"ONNX vs torch: max diff {diff} ({rel} relative)"


def test_output_projection_is_in_the_graph(trunk, tmp_path: Path) -> None:
    ex = PatchFeatureExtractor(trunk, ["blocks.2", "blocks.4"]).eval()
    matrix = np.random.default_rng(0).standard_normal((152, 32)).astype(np.float32)
    frames = _frames(2)
    with torch.no_grad():
        raw = ex(torch.from_numpy(frames)).numpy()
    ex.set_output_projection(matrix)
    path = tmp_path / "model.onnx"
    export_onnx(ex, path, 224, 224)
    import onnxruntime as ort

    out = ort.InferenceSession(str(path)).run(None, {"frames": frames})[0]
    assert out.shape == (2, 784, 32)
    np.testing.assert_allclose(out, raw @ matrix, rtol=1e-3, atol=1e-3)


def test_unknown_layer_is_refused(trunk) -> None:
    with pytest.raises(ValueError, match="unknown layer"):
        PatchFeatureExtractor(trunk, ["blocks.9"])
