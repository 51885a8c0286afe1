"""The model family: shapes of every variant, the DRN-A-50 figures, and the attention block's algebra."""

from __future__ import annotations

import pytest
import torch

from DADRNLesionLib.classes import NUM_CLASSES
from DADRNLesionLib.model import (
    DRN_SPECS, PRESETS, AttentionBlock, ChannelAttention, ModelConfig, SpatialAttention, build_drn, build_model,
)


@pytest.fixture(scope="module")
def drn_a_50():
    return build_drn("drn_a_50").eval()


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_drn_a_50_gives_2048x28x28_at_224(drn_a_50):
    with torch.inference_mode():
        y = drn_a_50(torch.randn(1, 3, 224, 224))
    assert tuple(y.shape) == (1, 2048, 28, 28)


def test_drn_a_50_parameter_count_matches_resnet50(drn_a_50):
    # Dilation adds no parameters: backbone + a 1000-way fc must be ResNet-50's 25.56M.
    with_imagenet_fc = count(drn_a_50) + 2048 * 1000 + 1000
    assert abs(with_imagenet_fc - 25_557_032) / 25_557_032 < 0.001


@pytest.mark.parametrize("name", sorted(DRN_SPECS))
def test_every_backbone_has_output_stride_8(name):
    m = build_drn(name, width=0.25).eval()
    with torch.inference_mode():
        y = m(torch.randn(2, 3, 64, 64))
    assert y.shape[0] == 2 and tuple(y.shape[2:]) == (8, 8)
    assert y.shape[1] == m.out_channels


def test_width_multiplier_shrinks_the_model():
    assert count(build_drn("drn_d_22", width=0.25)) < count(build_drn("drn_d_22", width=0.5)) / 3


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_paper_variant_classifies_and_exposes_its_feature_map(preset):
    cfg = PRESETS[preset]
    small = ModelConfig(**{**cfg.to_dict(), "backbone": "drn_a_18", "width": 0.25})
    m = build_model(small).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        feats = m.features(x)
        logits = m(x)
    assert tuple(logits.shape) == (2, NUM_CLASSES)
    expected_channels = m.backbone.out_channels * (2 if cfg.attention == "dual" and cfg.fusion == "concat" else 1)
    assert tuple(feats.shape) == (2, expected_channels, 8, 8)
    assert torch.allclose(m.head(feats), logits, atol=1e-5)


def test_dadrn50_b_full_size_feature_map_is_28x28():
    m = build_model("dadrn50-b").eval()
    with torch.inference_mode():
        f = m.features(torch.randn(1, 3, 224, 224))
    assert tuple(f.shape) == (1, 4096, 28, 28)  # spatial and channel outputs concatenated


@pytest.mark.parametrize("norm", ["sigmoid", "softmax"])
def test_beta_zero_makes_spatial_attention_an_identity(norm):
    block = SpatialAttention(32, norm).eval()
    x = torch.randn(2, 32, 6, 6)
    assert block.beta.item() == 0.0
    assert torch.equal(block(x), x)
    with torch.no_grad():
        block.beta.fill_(1.0)
    assert not torch.allclose(block(x), x)


def test_sigmoid_and_softmax_attention_differ():
    torch.manual_seed(0)
    a, b = SpatialAttention(16, "sigmoid"), SpatialAttention(16, "softmax")
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 16, 5, 5)
    alpha_sig, alpha_soft = a.attention(x), b.attention(x)
    assert torch.allclose(alpha_soft.sum(-1), torch.ones(1, 25), atol=1e-5)  # softmax rows sum to one
    assert not torch.allclose(alpha_sig * 25, alpha_soft, atol=1e-3)
    assert (alpha_sig > 0).all() and (alpha_sig * 25 < 1).all()


def test_spatial_attention_follows_the_formula():
    """o_j = sum_i alpha_ji D_i, y = beta o + A, checked against an explicit loop."""
    torch.manual_seed(1)
    block = SpatialAttention(8, "softmax", reduction=2).eval()
    with torch.no_grad():
        block.beta.fill_(0.7)
    x = torch.randn(1, 8, 3, 4)
    alpha = block.attention(x)[0]  # (N_j, N_i)
    d = block.value(x)[0].flatten(1)  # (C, N)
    o = torch.stack([sum(alpha[j, i] * d[:, i] for i in range(12)) for j in range(12)], dim=1)
    expected = 0.7 * o.view(8, 3, 4) + x[0]
    assert torch.allclose(block(x)[0], expected, atol=1e-5)


def test_channel_attention_starts_as_identity_and_learns_gamma():
    block = ChannelAttention(8)
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(block(x), x)
    with torch.no_grad():
        block.gamma.fill_(0.5)
    assert not torch.allclose(block(x), x)


def test_fusion_sum_and_concat():
    x = torch.randn(1, 16, 4, 4)
    assert AttentionBlock(16, "dual", fusion="sum")(x).shape[1] == 16
    assert AttentionBlock(16, "dual", fusion="concat")(x).shape[1] == 32
    assert AttentionBlock(16, "none")(x) is x


def test_bad_config_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="attention must be one of"):
        ModelConfig(attention="triple")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model({"backbone": "resnet9000"})
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"backbone": "drn_a_50", "colour": "red"})
