"""Dilated residual networks (Yu, Koltun and Funkhouser, CVPR 2017) as one configurable builder.

A DRN keeps an output stride of 8: groups 4 and 5 (``layer3``/``layer4``) keep stride 1 and
dilate their 3x3 convolutions by 2 and 4 instead, so a 224x224 input gives a 28x28 map.

* DRN-A: a ResNet (stem 7x7/2 + max-pool) with the dilation above. DRN-A-50 is the paper's DRN50.
* DRN-C: the max-pool stem replaced by residual basic blocks (levels 1-2), and two extra
  non-residual levels (7-8) at dilation 2 and 1 that remove gridding artefacts.
* DRN-D: like DRN-C, with levels 1-2 and 7-8 as plain conv-BN-ReLU layers.

``width`` multiplies every channel count, giving small models for demos and CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

__all__ = ["DRNSpec", "DRN", "DRN_SPECS", "build_drn", "init_residual_network"]


@dataclass(frozen=True)
class DRNSpec:
    kind: str  # "A", "C" or "D"
    block: str  # "basic" or "bottleneck"
    layers: tuple[int, ...]  # A: 4 groups; C/D: 8 levels


DRN_SPECS: dict[str, DRNSpec] = {
    "drn_a_18": DRNSpec("A", "basic", (2, 2, 2, 2)),
    "drn_a_34": DRNSpec("A", "basic", (3, 4, 6, 3)),
    "drn_a_50": DRNSpec("A", "bottleneck", (3, 4, 6, 3)),
    "drn_c_26": DRNSpec("C", "basic", (1, 1, 2, 2, 2, 2, 1, 1)),
    "drn_c_42": DRNSpec("C", "basic", (1, 1, 3, 4, 6, 3, 1, 1)),
    "drn_c_58": DRNSpec("C", "bottleneck", (1, 1, 3, 4, 6, 3, 1, 1)),
    "drn_d_22": DRNSpec("D", "basic", (1, 1, 2, 2, 2, 2, 1, 1)),
    "drn_d_38": DRNSpec("D", "basic", (1, 1, 3, 4, 6, 3, 1, 1)),
    "drn_d_54": DRNSpec("D", "bottleneck", (1, 1, 3, 4, 6, 3, 1, 1)),
}


def _ch(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, dilation: tuple[int, int] = (1, 1), residual: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, padding=dilation[0], dilation=dilation[0], bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation[1], dilation=dilation[1], bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual
        self.downsample = _projection(in_ch, planes, stride) if residual and (stride != 1 or in_ch != planes) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, dilation: tuple[int, int] = (1, 1), residual: bool = True):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation[1], dilation=dilation[1], bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual
        self.downsample = _projection(in_ch, out_ch, stride) if residual and (stride != 1 or in_ch != out_ch) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


def _projection(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1, kernel: int = 3) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class DRN(nn.Module):
    """Backbone only: image (N, C, H, W) -> feature map (N, out_channels, H/8, W/8)."""

    def __init__(self, spec: DRNSpec, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        block = BasicBlock if spec.block == "basic" else Bottleneck
        self.spec = spec
        self.width = width
        self._in = 0
        if spec.kind == "A":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, _ch(64, width), 7, 2, padding=3, bias=False),
                nn.BatchNorm2d(_ch(64, width)),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, padding=1),
            )
            self._in = _ch(64, width)
            l1, l2, l3, l4 = spec.layers
            groups = [
                self._group(block, 64, l1, width),
                self._group(block, 128, l2, width, stride=2),
                self._group(block, 256, l3, width, dilation=2),
                self._group(block, 512, l4, width, dilation=4),
            ]
        elif spec.kind in ("C", "D"):
            c = [16, 32, 64, 128, 256, 512, 512, 512]
            n = spec.layers
            self.stem = _conv_bn_relu(in_channels, _ch(c[0], width), kernel=7)
            self._in = _ch(c[0], width)
            if spec.kind == "C":
                early = [
                    self._group(BasicBlock, c[0], n[0], width, force_plain_width=True),
                    self._group(BasicBlock, c[1], n[1], width, stride=2, force_plain_width=True),
                ]
            else:
                early = [self._plain(c[0], n[0], width), self._plain(c[1], n[1], width, stride=2)]
            groups = early + [
                self._group(block, c[2], n[2], width, stride=2),
                self._group(block, c[3], n[3], width, stride=2),
                self._group(block, c[4], n[4], width, dilation=2, new_level=True),
                self._group(block, c[5], n[5], width, dilation=4, new_level=True),
            ]
            if spec.kind == "C":
                groups += [
                    self._group(BasicBlock, c[6], n[6], width, dilation=2, residual=False, force_plain_width=True),
                    self._group(BasicBlock, c[7], n[7], width, dilation=1, residual=False, force_plain_width=True),
                ]
            else:
                groups += [self._plain(c[6], n[6], width, dilation=2), self._plain(c[7], n[7], width, dilation=1)]
        else:
            raise ValueError(f"unknown DRN kind {spec.kind!r}")
        self.groups = nn.ModuleList(groups)
        self.out_channels = self._in
        self._init_weights()

    def _group(self, block, planes, blocks, width, stride=1, dilation=1, residual=True, new_level=False, force_plain_width=False):
        planes_w = _ch(planes, width)
        if force_plain_width:
            block = BasicBlock
        # DRN-C/D start a newly dilated level at half its dilation (fyu/drn's "new_level").
        first_dil = (dilation // 2 if new_level and dilation > 1 else dilation, dilation)
        layers = [block(self._in, planes_w, stride, dilation=first_dil, residual=residual)]
        self._in = planes_w * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self._in, planes_w, 1, dilation=(dilation, dilation), residual=residual))
        return nn.Sequential(*layers)

    def _plain(self, channels, convs, width, stride=1, dilation=1):
        out_ch = _ch(channels, width)
        layers = []
        for idx in range(convs):
            layers.append(_conv_bn_relu(self._in, out_ch, stride if idx == 0 else 1, dilation))
            self._in = out_ch
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        init_residual_network(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for group in self.groups:
            x = group(x)
        return x


def init_residual_network(net: nn.Module) -> None:
    """He-initialised convolutions, unit BatchNorm, and the last BN of every residual branch at zero
    so that each block starts close to identity (shared by the DRNs and the ResNet baselines)."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in net.modules():
        if isinstance(m, Bottleneck) and m.residual:
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock) and m.residual:
            nn.init.zeros_(m.bn2.weight)


def build_drn(name: str, width: float = 1.0, in_channels: int = 3, layers: Sequence[int] | None = None) -> DRN:
    try:
        spec = DRN_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(sorted(DRN_SPECS))}") from None
    if layers is not None:
        spec = DRNSpec(spec.kind, spec.block, tuple(layers))
    return DRN(spec, width=width, in_channels=in_channels)
