"""The DRN / attention-DRN model family (DRN, SADRN, CADRN, DADRN-A/B) behind one config."""

from .attention import AttentionBlock, ChannelAttention, SpatialAttention
from .classifier import PRESETS, LesionClassifier, ModelConfig, backbone_names, build_model, register_backbone
from .drn import DRN, DRN_SPECS, build_drn
from . import baselines  # noqa: F401  registers resnet50, se_resnet50, ra_resnet50 and their presets

__all__ = [
    "AttentionBlock", "ChannelAttention", "SpatialAttention", "PRESETS", "LesionClassifier", "ModelConfig",
    "backbone_names", "build_model", "register_backbone", "DRN", "DRN_SPECS", "build_drn",
]
