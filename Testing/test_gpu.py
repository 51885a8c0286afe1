"""GPU inference (skipped without CUDA): AMP results agree with the CPU, batch size comes from free memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DADRNLesionLib.cam import GradCAM, naive_grad_cam
from DADRNLesionLib.pipeline import PipelineOptions, run_pipeline
from DADRNLesionLib.preprocess import InputSpec
from DADRNLesionLib.weights import random_model

from conftest import make_abdomen

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.fixture(scope="module")
def model():
    loaded = random_model({"backbone": "drn_d_22", "width": 0.5, "attention": "dual"}, InputSpec(size=96), seed=4)
    with torch.no_grad():
        loaded.model.attention.spatial.beta.fill_(0.3)
        loaded.model.attention.channel.gamma.fill_(0.3)
        loaded.model.fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 3.0, 0.0]))
    return loaded


def test_amp_pipeline_on_gpu_matches_cpu(model):
    ct, liver = make_abdomen(shape=(16, 128, 128))
    cpu = run_pipeline(ct, liver_mask=liver, model=model, options=PipelineOptions(device="cpu", batch_size=8))
    gpu = run_pipeline(ct, liver_mask=liver, model=model, options=PipelineOptions(device="cuda"))
    p_cpu = np.stack([s.probabilities for s in cpu.slices])
    p_gpu = np.stack([s.probabilities for s in gpu.slices])
    assert gpu.report["device"]["amp"] in ("bfloat16", "float16")
    assert gpu.report["device"]["batch_size"] > 8  # sized from free memory
    assert np.abs(p_cpu - p_gpu).max() < 0.05
    assert (p_cpu.argmax(1) == p_gpu.argmax(1)).mean() >= 0.9
    assert gpu.heatmap.same_geometry(ct)
    both = (cpu.heatmap.array > 0) | (gpu.heatmap.array > 0)
    if both.any():
        corr = np.corrcoef(cpu.heatmap.array[both], gpu.heatmap.array[both])[0, 1]
        assert corr > 0.9


def test_head_only_cam_equals_naive_on_gpu(model):
    net = model.model.cuda().eval()
    x = torch.rand(4, 3, 96, 96, device="cuda")
    fast, slow = GradCAM(net)(x), naive_grad_cam(net, x)
    assert torch.equal(fast.target, slow.target)
    assert torch.allclose(fast.cams, slow.cams, atol=1e-4 * float(slow.cams.abs().max()) + 1e-6)
    net.cpu()


def test_augmentation_on_the_gpu_keeps_outside_black_and_is_reproducible():
    from DADRNLesionLib.train import AugmentConfig, augment_batch

    x = torch.zeros(4, 3, 64, 64)
    x[:, :, 16:48, 16:48] = 0.5
    x = x.cuda()
    cfg = AugmentConfig(p_affine=0.0, noise_hu=20.0)
    a = augment_batch(x, cfg, 400.0, torch.Generator().manual_seed(3))
    b = augment_batch(x, cfg, 400.0, torch.Generator().manual_seed(3))
    assert a.device.type == "cuda" and torch.equal(a, b)
    assert torch.equal(a > 0, x > 0)
    inside = a[x > 0] - 0.5
    assert float(inside.std()) > 0.5 / 400.0  # the noise field reached the liver
