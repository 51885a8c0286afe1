"""The ROI-level (global + local lesion patch) classifier: boxes, crops, shapes, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DADRNLesionLib.classes import CLASS_NAMES, LESION_CLASSES
from DADRNLesionLib.model.roi import (
    ROIClassifier, ROIConfig, boxes_from_masks, crop_patches, lesion_box, to_five_class, to_lesion_class,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_lesion_box_takes_the_largest_lesion():
    m = np.zeros((20, 30), dtype=np.uint8)
    m[2:4, 3:5] = 1  # small
    m[10:16, 12:21] = 1  # large
    assert lesion_box(m) == (10.0, 12.0, 16.0, 21.0)
    with pytest.raises(ValueError, match="empty"):
        lesion_box(np.zeros((4, 4)))


def test_boxes_scale_from_the_crop_grid_to_the_model_input():
    m = np.zeros((50, 100), dtype=np.uint8)  # crop box 50 rows x 100 columns, resized to 64 x 64
    m[10:20, 50:60] = 1
    b = boxes_from_masks([m], size=64)
    assert torch.allclose(b, torch.tensor([[10 * 64 / 50, 50 * 0.64, 20 * 64 / 50, 60 * 0.64]]))


def test_crop_of_a_pixel_aligned_box_is_exact():
    img = torch.arange(2 * 32 * 32, dtype=torch.float32).reshape(1, 2, 32, 32)
    boxes = torch.tensor([[4.0, 6.0, 12.0, 14.0]])  # 8 x 8 pixels
    patch = crop_patches(img, boxes, size=8)
    assert torch.allclose(patch, img[:, :, 4:12, 6:14], atol=1e-4)


def test_crop_is_square_with_margin_and_reads_zero_outside():
    img = torch.ones(1, 1, 16, 16)
    # A 4 x 2 box at the corner, margin 0.5 -> square of side 8 centred on the box: half outside.
    patch = crop_patches(img, torch.tensor([[0.0, 0.0, 4.0, 2.0]]), size=8, margin=0.5)
    assert patch.shape == (1, 1, 8, 8)
    assert patch[0, 0, :2, :].abs().max() == 0  # rows above the image
    assert patch[0, 0, :, :3].abs().max() == 0  # columns left of it
    assert torch.allclose(patch[0, 0, 3:, 4:], torch.ones(5, 4))


def test_class_mapping_between_four_and_five_classes():
    idx4 = torch.arange(4)
    assert [CLASS_NAMES[i] for i in to_five_class(idx4)] == list(LESION_CLASSES)
    assert torch.equal(to_lesion_class(to_five_class(idx4)), idx4)
    with pytest.raises(ValueError, match="lesions only"):
        to_lesion_class(np.array([0, 2]))


@pytest.fixture
def roi_model():
    torch.manual_seed(0)
    return ROIClassifier(ROIConfig(backbone="resnet50", width=0.25, patch_size=32))


def test_two_branches_give_four_lesion_logits(roi_model):
    roi_model.eval()
    x = torch.rand(3, 3, 64, 64)
    boxes = torch.tensor([[10.0, 10.0, 20.0, 20.0], [30.0, 5.0, 50.0, 15.0], [0.0, 0.0, 3.0, 3.0]])
    with torch.inference_mode():
        logits = roi_model(x, boxes)
    assert tuple(logits.shape) == (3, 4)
    assert roi_model.fc.in_features == 2 * roi_model.global_branch.out_channels
    # The local branch sees a different patch when the box moves: the answer depends on the ROI.
    with torch.no_grad():
        for p in roi_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with torch.inference_mode():
        assert not torch.allclose(roi_model(x, boxes), roi_model(x, boxes + 8))


def test_other_backbones_and_bad_config():
    m = ROIClassifier(ROIConfig(backbone="se_resnet50", width=0.25, patch_size=32)).eval()
    with torch.inference_mode():
        assert m(torch.rand(1, 3, 64, 64), torch.tensor([[8.0, 8.0, 24.0, 24.0]])).shape == (1, 4)
    with pytest.raises(ValueError, match="unknown backbone"):
        ROIClassifier(ROIConfig(backbone="nope"))
    with pytest.raises(ValueError, match="unknown ROI config keys"):
        ROIConfig.from_dict({"colour": 1})
    assert ROIConfig.from_dict(ROIConfig().to_dict()) == ROIConfig()


def test_a_few_training_steps_fit_a_batch_through_both_branches(roi_model):
    torch.manual_seed(4)
    x = torch.rand(8, 3, 64, 64)
    boxes = torch.tensor([[8.0 + 4 * i, 8.0, 24.0 + 4 * i, 24.0] for i in range(8)])
    y = torch.arange(8) % 4
    opt = torch.optim.Adam(roi_model.parameters(), lr=3e-3)
    roi_model.train()
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(roi_model(x, boxes), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-3:]) < 0.6 * losses[0]
    for branch in (roi_model.global_branch, roi_model.local_branch):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.parameters())
