"""Grad-CAM: head-only backward equals full-network Grad-CAM, and the maps are well formed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DADRNLesionLib.cam import GradCAM, naive_grad_cam, normalise_per_slice
from DADRNLesionLib.model import build_model


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(3)
    m = build_model({"backbone": "drn_d_22", "width": 0.25, "attention": "dual", "normalisation": "sigmoid", "fusion": "sum"})
    with torch.no_grad():  # non-zero attention weights so the attention path matters
        m.attention.spatial.beta.fill_(0.5)
        m.attention.channel.gamma.fill_(0.3)
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return m.eval()


def test_head_only_grad_cam_equals_full_autograd(small_model):
    x = torch.randn(3, 3, 64, 64)
    fast = GradCAM(small_model)(x)
    slow = naive_grad_cam(small_model, x)
    assert torch.equal(fast.target, slow.target)
    assert torch.allclose(fast.logits, slow.logits, atol=1e-5)
    scale = slow.cams.abs().max()
    assert scale > 0
    assert torch.allclose(fast.cams, slow.cams, atol=1e-5 * float(scale) + 1e-7)


def test_grad_cam_for_a_given_class(small_model):
    x = torch.randn(2, 3, 64, 64)
    for cls in range(5):
        target = torch.full((2,), cls)
        fast = GradCAM(small_model)(x, target)
        slow = naive_grad_cam(small_model, x, target)
        assert (fast.target == cls).all()
        assert torch.allclose(fast.cams, slow.cams, atol=1e-5 * float(slow.cams.abs().max()) + 1e-7)


def test_backbone_keeps_no_autograd_graph_and_model_gets_no_grads(small_model):
    GradCAM(small_model)(torch.randn(2, 3, 64, 64))
    assert all(p.grad is None for p in small_model.parameters())


def test_cam_is_relu_and_probabilities_sum_to_one(small_model):
    out = GradCAM(small_model)(torch.randn(4, 3, 64, 64))
    assert (out.cams >= 0).all()
    assert tuple(out.cams.shape) == (4, 8, 8)
    assert torch.allclose(out.probabilities.sum(1), torch.ones(4), atol=1e-5)


def test_normalise_per_slice_scales_to_one_and_keeps_constant_maps_zero():
    maps = np.stack([np.zeros((4, 4)), np.full((4, 4), 3.0), np.arange(16.0).reshape(4, 4)])
    out = normalise_per_slice(maps)
    assert out.dtype == np.float32
    assert np.all(out[0] == 0) and not np.isnan(out).any()
    assert out[1].max() == 1.0 and out[2].max() == 1.0 and out[2].min() == 0.0
