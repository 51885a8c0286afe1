"""The slice classifier: backbone -> attention block -> global average pooling -> linear.

The model is split at the attention output (`features`) so that Grad-CAM can run the backbone
once without gradients and backpropagate through `head` alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
from torch import nn

from ..classes import NUM_CLASSES
from .attention import ATTENTION_KINDS, AttentionBlock
from .drn import DRN_SPECS, build_drn

__all__ = ["ModelConfig", "LesionClassifier", "build_model", "PRESETS", "register_backbone", "backbone_names"]

# name -> builder(width, in_channels) returning a module with an `out_channels` attribute.
_BACKBONES: dict[str, Callable[[float, int], nn.Module]] = {
    name: (lambda width, in_ch, _n=name: build_drn(_n, width=width, in_channels=in_ch)) for name in DRN_SPECS
}


def register_backbone(name: str, builder: Callable[[float, int], nn.Module]) -> None:
    """Add a backbone family (e.g. the paper's baselines) under a config name."""
    _BACKBONES[name] = builder


def backbone_names() -> list[str]:
    return sorted(_BACKBONES)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "drn_a_50"
    width: float = 1.0
    attention: str = "dual"  # none | spatial | channel | dual
    normalisation: str = "softmax"  # sigmoid (variant A) | softmax (variant B)
    fusion: str = "concat"  # sum (A) | concat (B); used by dual attention only
    reduction: int = 8  # channel reduction of the spatial query/key projections
    num_classes: int = NUM_CLASSES
    in_channels: int = 3
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, not {self.attention!r}")
        if not 0 < self.width <= 4:
            raise ValueError(f"width must be in (0, 4], not {self.width}")

    @property
    def display_name(self) -> str:
        """E.g. ``DADRN-B (drn_a_50, softmax, concat)``; the input size lives in `InputSpec`."""
        family = {"none": "DRN", "spatial": "SADRN", "channel": "CADRN", "dual": "DADRN"}[self.attention]
        if not self.backbone.startswith("drn"):  # the paper's baselines: name the network, not the DRN family
            base = {"se_resnet50": "SE-ResNet50", "ra_resnet50": "RA-ResNet50", "resnet50": "ResNet50"}.get(self.backbone, self.backbone)
            family = base if self.attention == "none" else f"{base}+{family[:-3]}"
        parts = [self.backbone if self.width == 1.0 else f"{self.backbone} x{self.width:g}"]
        if self.attention != "none":
            family += "-A" if self.normalisation == "sigmoid" else "-B"
            parts.append(self.normalisation)
        if self.attention == "dual":
            parts.append(self.fusion)
        return f"{family} ({', '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)


# The paper's variants on DRN-A-50. A/B: sigmoid/softmax normalisation; for DADRN, A also fuses by
# sum and B by concatenation (the slides' two footnotes).
PRESETS: dict[str, ModelConfig] = {
    "drn50": ModelConfig(attention="none"),
    "sadrn50-a": ModelConfig(attention="spatial", normalisation="sigmoid"),
    "sadrn50-b": ModelConfig(attention="spatial", normalisation="softmax"),
    "cadrn50-a": ModelConfig(attention="channel", normalisation="sigmoid"),
    "cadrn50-b": ModelConfig(attention="channel", normalisation="softmax"),
    "dadrn50-a": ModelConfig(attention="dual", normalisation="sigmoid", fusion="sum"),
    "dadrn50-b": ModelConfig(attention="dual", normalisation="softmax", fusion="concat"),
}


class LesionClassifier(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.backbone not in _BACKBONES:
            raise ValueError(f"unknown backbone {config.backbone!r}; choose one of {', '.join(backbone_names())}")
        self.config = config
        self.backbone = _BACKBONES[config.backbone](config.width, config.in_channels)
        channels = self.backbone.out_channels
        self.attention = AttentionBlock(channels, config.attention, config.normalisation, config.fusion, config.reduction)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.fc = nn.Linear(self.attention.out_channels, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last spatial map before pooling (the fused attention output): Grad-CAM's target."""
        return self.attention(self.backbone(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        # Pool in float32 whatever the autocast dtype: 784 bfloat16 terms lose too many digits.
        pooled = features.mean(dim=(2, 3), dtype=torch.float32)
        return self.fc(self.dropout(pooled.to(self.fc.weight.dtype)))

    def forward(self, x: torch.Tensor, with_features: bool = False):
        """Logits; with `with_features`, (logits, features), so that a loss on the map can go
        through the wrapper (DistributedDataParallel) rather than around it."""
        features = self.features(x)
        logits = self.head(features)
        return (logits, features) if with_features else logits


def build_model(config: ModelConfig | str | dict[str, Any]) -> LesionClassifier:
    if isinstance(config, str):
        try:
            config = PRESETS[config]
        except KeyError:
            raise ValueError(f"unknown model preset {config!r}; choose one of {', '.join(PRESETS)}") from None
    elif isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    return LesionClassifier(config)
