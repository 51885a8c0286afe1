"""Turn liver slices into model inputs, and model maps back into slices. Shared by training and inference.

Input of slice k: the liver-masked slices k-1, k, k+1 (edge slices repeat the nearest) as three
channels, HU-windowed to [0, 1], cropped to the liver's in-plane bounding box over the whole volume
(plus a margin) and resized to the model's square input. One box per volume keeps the physical
scale constant from slice to slice, so lesion size in pixels means the same on every slice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserInputError

__all__ = ["InputSpec", "CropBox", "liver_crop_box", "liver_slice_indices", "neighbour_indices", "prepare_batch", "maps_to_slices", "smooth_maps", "check_cam_smoothing", "CAM_SMOOTHING_CELLS",
           "MAX_CAM_SMOOTHING_CELLS"]


@dataclass(frozen=True)
class InputSpec:
    size: int = 224
    # Arterial phase: parenchyma ~60-90 HU, cysts ~0-20, enhancing lesions and vessels up to ~300.
    window_level: float = 60.0
    window_width: float = 400.0
    margin_mm: float = 10.0

    @property
    def window(self) -> tuple[float, float]:
        return (self.window_level - self.window_width / 2, self.window_level + self.window_width / 2)

    def __post_init__(self) -> None:
        if self.size % 8 or self.size < 32:
            raise ValueError(f"input size must be a multiple of 8 and at least 32, not {self.size}")
        if self.window_width <= 0:
            raise ValueError(f"window width must be positive, not {self.window_width}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown input spec keys: {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class CropBox:
    """In-plane box [j0:j1, i0:i1] of the (k, j, i) array."""

    j0: int
    j1: int
    i0: int
    i1: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.j1 - self.j0, self.i1 - self.i0)


def liver_slice_indices(liver: np.ndarray) -> np.ndarray:
    """Indices k of the slices that hold any liver voxel."""
    return np.flatnonzero(liver.reshape(liver.shape[0], -1).any(axis=1))


def liver_crop_box(liver: np.ndarray, spacing_ij: tuple[float, float], margin_mm: float) -> CropBox:
    """Square-in-millimetres box around all liver voxels, with a margin, clipped to the image."""
    rows = np.flatnonzero(liver.any(axis=(0, 2)))
    cols = np.flatnonzero(liver.any(axis=(0, 1)))
    if rows.size == 0:
        raise ValueError("the liver mask is empty")
    si, sj = float(spacing_ij[0]), float(spacing_ij[1])
    j_lo, j_hi = rows[0] * sj - margin_mm, (rows[-1] + 1) * sj + margin_mm
    i_lo, i_hi = cols[0] * si - margin_mm, (cols[-1] + 1) * si + margin_mm
    side = max(j_hi - j_lo, i_hi - i_lo)  # make it square in mm so the resize keeps the aspect
    jc, ic = (j_lo + j_hi) / 2, (i_lo + i_hi) / 2
    n_j, n_i = liver.shape[1], liver.shape[2]
    j0 = int(np.clip(np.floor((jc - side / 2) / sj), 0, n_j - 1))
    j1 = int(np.clip(np.ceil((jc + side / 2) / sj), j0 + 1, n_j))
    i0 = int(np.clip(np.floor((ic - side / 2) / si), 0, n_i - 1))
    i1 = int(np.clip(np.ceil((ic + side / 2) / si), i0 + 1, n_i))
    return CropBox(j0, j1, i0, i1)


def neighbour_indices(slices: Sequence[int], n_slices: int) -> np.ndarray:
    """(len(slices), 3) array of [k-1, k, k+1], clamped to the volume (edges repeat the nearest)."""
    k = np.asarray(slices, dtype=np.int64)[:, None] + np.array([-1, 0, 1])[None, :]
    return np.clip(k, 0, n_slices - 1)


def prepare_batch(
    ct: np.ndarray,
    liver: np.ndarray,
    slices: Sequence[int],
    box: CropBox,
    spec: InputSpec,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(n, 3, size, size) tensor for the given slice indices, windowed to [0, 1], outside liver = 0.

    Only the cropped voxels of the 3n slices are copied and converted, so memory is O(batch), not
    O(volume); conversion happens on `device` in `dtype`.
    """
    ks = neighbour_indices(slices, ct.shape[0])
    sl = (ks, slice(box.j0, box.j1), slice(box.i0, box.i1))
    raw = _to_device(np.ascontiguousarray(ct[sl]), device)
    inside = _to_device(np.ascontiguousarray(liver[sl] > 0), device)
    lo, hi = spec.window
    x = raw.to(dtype if dtype != torch.float16 else torch.float32)
    x = ((x - lo) / (hi - lo)).clamp_(0.0, 1.0) * inside
    x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear", align_corners=False, antialias=False)
    return x.to(dtype).contiguous()


def _to_device(array: np.ndarray, device) -> torch.Tensor:
    """Host array to `device`; to a GPU through pinned memory so the copy overlaps running kernels."""
    tensor = torch.from_numpy(array)
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# The heatmap's Gaussian smoothing, in cells of the model's map (28 x 28 at 224 px: a cell is about
# 7 mm over a liver box). The map of a dilated network carries cell-to-cell ripple (gridding), and
# the peak of a bilinear upsampling can only sit on a cell centre, so a lesion's heat often peaks a
# cell or two beside it. Chosen on the demo model's validation cases: the largest smoothing that
# kept every class's CAM IoU within 0.02 of the unsmoothed map (docs/training.md, "The heatmap's smoothing").
CAM_SMOOTHING_CELLS = 1.5
MAX_CAM_SMOOTHING_CELLS = 5.0  # beyond this the heatmap is a blur over the whole liver box


def check_cam_smoothing(cells: float) -> float:
    """The one range check of `--cam-smoothing`, for `classify`, `evaluate` and `compare` alike."""
    if not 0.0 <= cells <= MAX_CAM_SMOOTHING_CELLS:
        raise UserInputError(f"--cam-smoothing must be between 0 and {MAX_CAM_SMOOTHING_CELLS:g} cells of the model's map, not {cells}")
    return float(cells)


def smooth_maps(up: torch.Tensor, grid_shape: tuple[int, int], sigma_cells: float) -> torch.Tensor:
    """Gaussian smoothing of (n, H, W) maps upsampled from a (h, w) grid, sigma in grid cells per axis
    (separable, edges replicated); 0 returns the maps unchanged."""
    if sigma_cells <= 0:
        return up
    out = up[:, None]
    for axis, (size, cells) in enumerate(zip(up.shape[1:], grid_shape)):
        sigma = sigma_cells * size / cells
        radius = max(1, int(np.ceil(3.0 * sigma)))
        x = torch.arange(-radius, radius + 1, dtype=up.dtype, device=up.device)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        shape, pad = ((1, 1, -1, 1), (0, 0, radius, radius)) if axis == 0 else ((1, 1, 1, -1), (radius, radius, 0, 0))
        out = F.conv2d(F.pad(out, pad, mode="replicate"), (kernel / kernel.sum()).view(shape))
    return out[:, 0]


def maps_to_slices(maps: torch.Tensor, box: CropBox, slice_shape: tuple[int, int], smoothing_cells: float = 0.0) -> np.ndarray:
    """Upsample (n, h, w) model maps to the crop, smooth them (`smooth_maps`) and place them in full
    (n, rows, cols) slices."""
    up = F.interpolate(maps[:, None].float(), size=box.shape, mode="bilinear", align_corners=False)[:, 0]
    up = smooth_maps(up, tuple(maps.shape[1:]), smoothing_cells)
    out = np.zeros((maps.shape[0], *slice_shape), dtype=np.float32)
    out[:, box.j0 : box.j1, box.i0 : box.i1] = up.clamp_(min=0).cpu().numpy()
    return out
