"""The paper's attention-CNN baselines as backbones of the same classifier family.

* ``resnet50``: plain ResNet-50 (He et al. 2016), output stride 32. The reference the two below
  modify, and the default branch network of the ROI-level model (`roi.py`).
* ``se_resnet50``: SE-ResNet-50 (Hu et al. 2018): every bottleneck's residual branch is rescaled
  channel-wise by a squeeze-and-excitation gate (global pooling -> FC C/16 -> ReLU -> FC C ->
  sigmoid) before the identity is added.
* ``ra_resnet50``: a residual-attention ResNet-50 (Wang et al. 2017): after each of the stages 1-3
  an attention module computes a trunk T (two bottleneck units) and a soft mask M in (0, 1) from a
  bottom-up/top-down hourglass (max-pool down 3, 2 and 1 times, one unit per level, skip
  connections, bilinear upsampling, two 1x1 convolutions, sigmoid), and outputs (1 + M) * T.
  Stage 4 (7x7 at 224) carries no mask, as in the original networks.

Both keep ResNet's strides, as the paper compared them: the last map is 7x7 for a 224 input (4x4
at 128), against DRN's 28x28. That coarse map is why their Grad-CAM localises worse; a dilated
version would be a different baseline. All three register as backbones, so
``ModelConfig(backbone="se_resnet50", attention="none")`` trains, evaluates, saves and explains
(Grad-CAM on the last stage) like any DRN variant; ``width`` scales every channel count.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .classifier import PRESETS, ModelConfig, register_backbone
from .drn import Bottleneck, _ch, init_residual_network

__all__ = ["SqueezeExcitation", "SEBottleneck", "SoftMaskBranch", "ResidualAttentionModule", "ResNet", "build_resnet", "RESNET_KINDS"]

RESNET_KINDS = ("plain", "se", "ra")
RESNET50_LAYERS = (3, 4, 6, 3)
MASK_DEPTHS = (3, 2, 1)  # hourglass depth of the attention modules after stages 1, 2 and 3


class SqueezeExcitation(nn.Module):
    """x * sigmoid(W2 relu(W1 mean_hw(x))): channel gates from the global context."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        inner = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, inner, 1)
        self.fc2 = nn.Conv2d(inner, channels, 1)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gates(x)


class SEBottleneck(Bottleneck):
    """ResNet bottleneck whose residual branch passes an SE gate before the identity is added."""

    def __init__(self, in_ch: int, planes: int, stride: int = 1, dilation: tuple[int, int] = (1, 1), residual: bool = True, reduction: int = 16):
        super().__init__(in_ch, planes, stride, dilation, residual)
        self.se = SqueezeExcitation(planes * self.expansion, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


def _unit(channels: int) -> Bottleneck:
    """A shape-preserving bottleneck unit (channels -> channels) for the attention modules."""
    return Bottleneck(channels, max(1, channels // Bottleneck.expansion))


class SoftMaskBranch(nn.Module):
    """Bottom-up/top-down hourglass -> mask in (0, 1) with the input's shape."""

    def __init__(self, channels: int, depth: int):
        super().__init__()
        if depth < 1:
            raise ValueError("the soft mask needs at least one down-sampling step")
        self.depth = depth
        self.down = nn.ModuleList(_unit(channels) for _ in range(depth))
        self.bottom = _unit(channels)
        self.skip = nn.ModuleList(_unit(channels) for _ in range(depth - 1))
        self.up = nn.ModuleList(_unit(channels) for _ in range(depth - 1))
        self.out = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = []
        y = x
        for down in self.down:
            y = down(F.max_pool2d(y, 3, 2, padding=1))
            levels.append(y)
        y = self.bottom(y)
        # Back up: at each finer level add that level's skip unit, then refine with one unit.
        for i in range(self.depth - 2, -1, -1):
            y = F.interpolate(y, size=levels[i].shape[-2:], mode="bilinear", align_corners=False)
            y = self.up[i](y + self.skip[i](levels[i]))
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(y))


class ResidualAttentionModule(nn.Module):
    """(1 + M(x)) * T(x): the mask can stress trunk features but never erase them (attention residual learning)."""

    def __init__(self, channels: int, mask_depth: int, trunk_units: int = 2):
        super().__init__()
        self.trunk = nn.Sequential(*(_unit(channels) for _ in range(trunk_units)))
        self.mask = SoftMaskBranch(channels, mask_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1.0 + self.mask(x)) * self.trunk(x)


class ResNet(nn.Module):
    """Backbone only: image (N, C, H, W) -> (N, out_channels, H/32, W/32). kind: plain | se | ra."""

    def __init__(self, layers: Sequence[int] = RESNET50_LAYERS, kind: str = "plain", width: float = 1.0, in_channels: int = 3,
                 se_reduction: int = 16):
        super().__init__()
        if kind not in RESNET_KINDS:
            raise ValueError(f"ResNet kind must be one of {', '.join(RESNET_KINDS)}, not {kind!r}")
        if len(layers) != 4:
            raise ValueError("a ResNet has four stages")
        self.kind = kind
        self.width = width
        stem_ch = _ch(64, width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_ch, 7, 2, padding=3, bias=False),
            nn.BatchNorm2d(stem_ch),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, padding=1),
        )
        self._in = stem_ch
        groups = []
        for idx, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage = self._stage(planes, blocks, width, stride=1 if idx == 0 else 2, se_reduction=se_reduction)
            if kind == "ra" and idx < len(MASK_DEPTHS):
                stage = nn.Sequential(*stage, ResidualAttentionModule(self._in, MASK_DEPTHS[idx]))
            groups.append(stage)
        self.groups = nn.ModuleList(groups)
        self.out_channels = self._in
        self._init_weights()

    def _stage(self, planes: int, blocks: int, width: float, stride: int, se_reduction: int) -> nn.Sequential:
        planes_w = _ch(planes, width)
        if self.kind == "se":
            make = lambda i, p, s: SEBottleneck(i, p, s, reduction=se_reduction)  # noqa: E731
        else:
            make = lambda i, p, s: Bottleneck(i, p, s)  # noqa: E731
        layers = [make(self._in, planes_w, stride)]
        self._in = planes_w * Bottleneck.expansion
        layers += [make(self._in, planes_w, 1) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        init_residual_network(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for group in self.groups:
            x = group(x)
        return x


def build_resnet(kind: str = "plain", width: float = 1.0, in_channels: int = 3, layers: Sequence[int] = RESNET50_LAYERS) -> ResNet:
    return ResNet(layers, kind=kind, width=width, in_channels=in_channels)


for _name, _kind in (("resnet50", "plain"), ("se_resnet50", "se"), ("ra_resnet50", "ra")):
    register_backbone(_name, lambda width, in_ch, _k=_kind: build_resnet(_k, width=width, in_channels=in_ch))

# Paper names (table rows "SEResnet50", "RAResnet50"): the baselines with the same head and no
# attention block on top. setdefault leaves any preset of the same name defined elsewhere alone.
PRESETS.setdefault("seresnet50", ModelConfig(backbone="se_resnet50", attention="none"))
PRESETS.setdefault("raresnet50", ModelConfig(backbone="ra_resnet50", attention="none"))
