"""The attention-CNN baselines (SE-ResNet-50, residual-attention ResNet-50): shapes, algebra, CAM, training."""

from __future__ import annotations

import pytest
import torch

from DADRNLesionLib.cam import GradCAM, naive_grad_cam
from DADRNLesionLib.classes import NUM_CLASSES
from DADRNLesionLib.model import PRESETS, ModelConfig, backbone_names, build_model
from DADRNLesionLib.model.baselines import (
    ResidualAttentionModule, SEBottleneck, SoftMaskBranch, SqueezeExcitation, build_resnet,
)
from DADRNLesionLib.preprocess import InputSpec
from DADRNLesionLib.weights import ModelCard, load_checkpoint, save_checkpoint

BASELINES = ("se_resnet50", "ra_resnet50")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def small(backbone: str, **kw) -> torch.nn.Module:
    return build_model(ModelConfig(backbone=backbone, attention="none", width=0.25, **kw))


def test_baselines_are_registered_with_paper_presets():
    assert {"resnet50", "se_resnet50", "ra_resnet50"} <= set(backbone_names())
    assert PRESETS["seresnet50"] == ModelConfig(backbone="se_resnet50", attention="none")
    assert PRESETS["raresnet50"] == ModelConfig(backbone="ra_resnet50", attention="none")


@pytest.mark.parametrize("name", ["resnet50", *BASELINES])
def test_full_size_last_map_is_2048x7x7_at_224(name):
    # Unlike DRN's 28x28: the baselines keep ResNet's output stride 32, as the paper compared them.
    m = build_resnet({"resnet50": "plain", "se_resnet50": "se", "ra_resnet50": "ra"}[name]).eval()
    with torch.inference_mode():
        y = m(torch.randn(1, 3, 224, 224))
    assert tuple(y.shape) == (1, 2048, 7, 7) and m.out_channels == 2048


def test_parameter_counts_match_the_published_networks():
    plain, se = build_resnet("plain"), build_resnet("se")
    fc = 2048 * 1000 + 1000  # the ImageNet classifier the published counts include
    assert count(plain) + fc == 25_557_032  # ResNet-50
    assert abs(count(se) + fc - 28.09e6) / 28.09e6 < 0.002  # SE-ResNet-50, 28.09M (Hu et al.)
    ra = build_resnet("ra")
    assert count(ra) > count(plain) * 1.2  # three attention modules (trunks + masks) on top


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("size", [64, 96])
def test_small_models_classify_with_output_stride_32(name, size):
    m = small(name).eval()
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        feats = m.features(x)
        logits = m(x)
    assert tuple(logits.shape) == (2, NUM_CLASSES)
    assert tuple(feats.shape) == (2, m.backbone.out_channels, size // 32, size // 32)
    assert torch.allclose(m.head(feats), logits, atol=1e-5)


def test_width_shrinks_the_baselines():
    assert count(build_resnet("se", width=0.25)) < count(build_resnet("se", width=0.5)) / 3


def test_squeeze_excitation_gates_channels_by_global_context():
    se = SqueezeExcitation(32, reduction=16)
    assert se.fc1.out_channels == 2
    x = torch.randn(2, 32, 5, 5)
    g = se.gates(x)
    assert tuple(g.shape) == (2, 32, 1, 1) and ((g > 0) & (g < 1)).all()
    assert torch.allclose(se(x), x * g)
    # Gates depend on the whole map: a change in one corner changes every channel's gate.
    x2 = x.clone()
    x2[:, :, 0, 0] += 5
    assert not torch.allclose(se.gates(x2), g)


def test_se_gate_acts_on_the_residual_branch_only():
    torch.manual_seed(0)
    block = SEBottleneck(64, 16).eval()  # in = out = 64: identity shortcut
    with torch.no_grad():
        block.bn3.weight.fill_(1.0)
        block.se.fc2.bias.fill_(-1e4)  # gates -> 0: the branch vanishes, the identity stays
    x = torch.randn(2, 64, 6, 6)
    assert torch.allclose(block(x), torch.relu(x), atol=1e-6)
    with torch.no_grad():
        block.se.fc2.bias.fill_(1e4)  # gates -> 1: a plain bottleneck
    plain = torch.relu(block.bn3(block.conv3(block.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))))) + x)
    assert torch.allclose(block(x), plain, atol=1e-5)


@pytest.mark.parametrize("shape", [(16, 16), (5, 7), (2, 2)])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_soft_mask_keeps_the_input_shape_and_lies_in_0_1(shape, depth):
    branch = SoftMaskBranch(16, depth).eval()
    x = torch.randn(2, 16, *shape)
    with torch.inference_mode():
        m = branch(x)
    assert m.shape == x.shape and ((m > 0) & (m < 1)).all()


def test_residual_attention_is_one_plus_mask_times_trunk():
    torch.manual_seed(1)
    module = ResidualAttentionModule(16, mask_depth=2).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.inference_mode():
        t, m = module.trunk(x), module.mask(x)
        assert torch.allclose(module(x), (1 + m) * t, atol=1e-6)
        # A mask of zero keeps the trunk unchanged: attention can stress features, never erase them.
        module.mask.out[-1].bias.fill_(-1e4)
        assert torch.allclose(module(x), t, atol=1e-6)


@pytest.mark.parametrize("name", BASELINES)
def test_grad_cam_on_the_last_stage(name):
    torch.manual_seed(2)
    m = small(name)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))  # leave the zero-initialised identity start
    m.eval()
    x = torch.randn(3, 3, 128, 128)
    fast = GradCAM(m)(x)
    slow = naive_grad_cam(m, x)
    assert tuple(fast.cams.shape) == (3, 4, 4)  # 128 / 32: the coarse map the paper's table 3 reflects
    assert torch.equal(fast.target, slow.target)
    scale = float(slow.cams.abs().max())
    assert scale > 0 and torch.allclose(fast.cams, slow.cams, atol=1e-5 * scale + 1e-7)
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("name", BASELINES)
def test_a_few_training_steps_fit_a_batch(name):
    torch.manual_seed(3)
    m = small(name)
    x = torch.randn(8, 3, 64, 64)
    y = torch.arange(8) % NUM_CLASSES
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    m.train()
    for _ in range(12):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < 0.6 * losses[0]
    # Every part learns, the attention masks and SE gates included.
    grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    key = ".se.fc2." if name == "se_resnet50" else ".mask.out."
    assert any(key in n for n in grads)


@pytest.mark.parametrize("name", BASELINES)
def test_checkpoint_round_trip(tmp_path, name):
    m = small(name).eval()
    card = ModelCard(model_id=f"test-{name}", config=m.config, input=InputSpec(size=64))
    path = save_checkpoint(m, tmp_path / f"{name}.safetensors", card)
    loaded = load_checkpoint(path)
    assert loaded.card.config.backbone == name
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(loaded.model(x), m(x), atol=1e-6)
