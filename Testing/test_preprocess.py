"""Preprocessing: three neighbouring slices, masking, windowing, the liver box, and maps back into slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DADRNLesionLib.preprocess import (
    CAM_SMOOTHING_CELLS, CropBox, InputSpec, liver_crop_box, liver_slice_indices, maps_to_slices, neighbour_indices, prepare_batch,
    smooth_maps,
)


def test_neighbours_repeat_the_nearest_at_the_edges():
    assert neighbour_indices([0, 3, 9], 10).tolist() == [[0, 0, 1], [2, 3, 4], [8, 9, 9]]
    assert neighbour_indices([0], 1).tolist() == [[0, 0, 0]]


def test_liver_slices_and_square_box_with_margin():
    liver = np.zeros((6, 100, 120), np.uint8)
    liver[2:4, 40:60, 30:90] = 1  # 20 rows x 60 columns
    assert liver_slice_indices(liver).tolist() == [2, 3]
    box = liver_crop_box(liver, (1.0, 1.0), margin_mm=5)
    assert box.i0 == 25 and box.i1 == 95  # 60 + 2*5 wide
    h, w = box.shape
    assert abs(h - w) <= 1  # square in mm
    assert box.j0 <= 35 and box.j1 >= 65


def test_box_is_square_in_millimetres_with_anisotropic_pixels():
    liver = np.zeros((1, 200, 200), np.uint8)
    liver[0, 50:150, 50:150] = 1
    box = liver_crop_box(liver, (0.5, 1.0), margin_mm=0)  # i spacing 0.5, j spacing 1.0
    rows, cols = box.shape
    assert abs(rows * 1.0 - cols * 0.5) <= 1.0


def test_prepare_batch_channels_mask_and_window():
    spec = InputSpec(size=32, window_level=50, window_width=100, margin_mm=0)
    ct = np.zeros((3, 32, 32), np.int16)
    ct[0], ct[1], ct[2] = 0, 50, 100  # window [0, 100] -> 0, 0.5, 1
    liver = np.ones_like(ct, dtype=np.uint8)
    liver[1, :, :16] = 0
    box = CropBox(0, 32, 0, 32)
    x = prepare_batch(ct, liver, [1], box, spec)
    assert tuple(x.shape) == (1, 3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[0, 0], torch.zeros(32, 32))
    assert torch.allclose(x[0, 2], torch.ones(32, 32))
    assert torch.allclose(x[0, 1, :, 20:], torch.full((32, 12), 0.5))
    assert torch.all(x[0, 1, :, :14] == 0)  # outside the liver of that slice


def test_prepare_batch_clamps_extreme_hu():
    spec = InputSpec(size=32, margin_mm=0)
    ct = np.full((1, 32, 32), 3000, np.int16)
    ct[0, :16] = -3000
    x = prepare_batch(ct, np.ones_like(ct), [0], CropBox(0, 32, 0, 32), spec)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_maps_go_back_into_the_box_and_nowhere_else():
    box = CropBox(10, 30, 5, 25)
    maps = torch.ones(2, 4, 4)
    out = maps_to_slices(maps, box, (40, 40))
    assert out.shape == (2, 40, 40)
    assert np.allclose(out[:, 10:30, 5:25], 1.0)
    out[:, 10:30, 5:25] = 0
    assert not out.any()


def test_input_spec_validates():
    with pytest.raises(ValueError):
        InputSpec(size=30)
    assert InputSpec.from_dict(InputSpec(size=128).to_dict()).size == 128


def test_smoothing_takes_the_heat_peak_off_a_ripple_to_the_middle_of_the_hot_spot():
    """A hot spot of four equal cells with a 5 % ripple on one: the bilinear map peaks on that cell's
    centre, the smoothed map in the middle of the four, where the lesion under them lies."""
    grid = torch.zeros(1, 8, 8)
    grid[0, 3:5, 3:5] = 1.0
    grid[0, 3, 3] = 1.05
    box = CropBox(0, 80, 0, 80)  # 10 pixels a cell
    raw = maps_to_slices(grid, box, (80, 80))[0]
    smooth = maps_to_slices(grid, box, (80, 80), CAM_SMOOTHING_CELLS)[0]
    middle = np.array([39.5, 39.5])  # between the four cells' centres (34.5 and 44.5)
    raw_peak = np.array(np.unravel_index(int(raw.argmax()), raw.shape))
    smooth_peak = np.array(np.unravel_index(int(smooth.argmax()), smooth.shape))
    assert np.abs(raw_peak - 34.5).max() <= 0.5  # on the rippled cell's centre
    assert np.abs(smooth_peak - middle).max() <= 1.0
    # Smoothing keeps the maps' mean (a normalised kernel) and 0 leaves them alone.
    up = torch.rand(2, 40, 30)
    assert torch.equal(smooth_maps(up, (4, 3), 0.0), up)
    assert smooth_maps(up, (4, 3), 1.5).mean().item() == pytest.approx(up.mean().item(), rel=0.05)


def test_heatmap_smoothing_option_is_checked_and_reported():
    from DADRNLesionLib.compare import CompareConfig
    from DADRNLesionLib.errors import UserInputError
    from DADRNLesionLib.pipeline import PipelineOptions

    assert PipelineOptions().cam_smoothing == CAM_SMOOTHING_CELLS
    assert CompareConfig().cam_smoothing == CAM_SMOOTHING_CELLS
    for bad in (-0.5, 9.0):
        with pytest.raises(UserInputError, match="cam-smoothing"):
            PipelineOptions(cam_smoothing=bad)
        with pytest.raises(UserInputError, match="cam-smoothing"):
            CompareConfig(cam_smoothing=bad)
