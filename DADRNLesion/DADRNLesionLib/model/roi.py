"""An ROI-level lesion classifier in the spirit of ResGLNet: the upper bound that needs the lesion drawn.

The paper's ROI-level row (ResGLNet) classifies a lesion that a person has outlined, using the
lesion patch and its surroundings. This model does the same with two branches:

* local: the lesion patch, a square box around the lesion (the largest lesion of the slice, from
  the ground-truth lesion mask) widened by ``box_margin`` on each side, resampled to
  ``patch_size`` pixels;
* global: the whole liver-masked slice as every slice-level model sees it (the liver context);

each branch a backbone from the same registry (default ``resnet50``), globally average pooled,
concatenated and classified by one linear layer.

Classes: the four lesion classes (cyst, FNH, HCC, hemangioma), not five. An ROI exists only where
there is a lesion, so "normal" cannot be an answer; this matches the paper's table, where
ResGLNet has no Normal column. It is trained and evaluated on the lesion slices of the same
splits as the slice-level models; its index c maps to the five-class index c + 1
(`to_five_class`), so the same metrics code scores it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from ..classes import LESION_CLASSES
from .classifier import LesionClassifier, ModelConfig

__all__ = ["ROIConfig", "ROIClassifier", "lesion_box", "boxes_from_masks", "crop_patches", "to_five_class", "to_lesion_class"]


@dataclass(frozen=True)
class ROIConfig:
    backbone: str = "resnet50"
    width: float = 1.0
    in_channels: int = 3
    num_classes: int = len(LESION_CLASSES)
    patch_size: int = 64  # side of the local branch's input, pixels
    box_margin: float = 0.25  # context added on every side, as a fraction of the box side
    min_box: float = 8.0  # smallest box side, in input pixels (tiny lesions still get some context)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.width <= 4:
            raise ValueError(f"width must be in (0, 4], not {self.width}")
        if self.patch_size < 16:
            raise ValueError(f"patch_size must be at least 16, not {self.patch_size}")
        if self.box_margin < 0:
            raise ValueError(f"box_margin must be non-negative, not {self.box_margin}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ROIConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ROI config keys: {', '.join(unknown)}")
        return cls(**data)

    @property
    def display_name(self) -> str:
        bb = self.backbone if self.width == 1.0 else f"{self.backbone} x{self.width:g}"
        return f"ROI global-local ({bb}, patch {self.patch_size})"


def to_five_class(index4: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Lesion-class index (0..3) -> the five-class index of `classes.CLASS_NAMES` (1..4)."""
    return index4 + 1


def to_lesion_class(index5: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Five-class index of a lesion class (1..4) -> lesion-class index (0..3); normal is refused."""
    if (np.asarray(index5) < 1).any():
        raise ValueError("the ROI-level model classifies lesions only; got a normal slice")
    return index5 - 1


def lesion_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(y0, x0, y1, x1), ends exclusive, of the largest 8-connected lesion of a 2D mask."""
    mask = np.asarray(mask) > 0
    if not mask.any():
        raise ValueError("the lesion mask is empty")
    comps, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n > 1:
        largest = int(np.argmax(np.bincount(comps.ravel())[1:])) + 1
        mask = comps == largest
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return float(rows[0]), float(cols[0]), float(rows[-1] + 1), float(cols[-1] + 1)


def boxes_from_masks(masks: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Lesion boxes in model-input pixels for lesion masks given on the crop grid.

    `masks[n]` is slice n's lesion mask inside the case's crop box (any shape bh x bw, e.g. the
    slice cache's lesion core); the model input is that box resized to size x size, so the box
    scales by size/bh and size/bw. Returns (n, 4) float32 (y0, x0, y1, x1).
    """
    out = np.zeros((len(masks), 4), dtype=np.float32)
    for n, m in enumerate(masks):
        y0, x0, y1, x1 = lesion_box(m)
        sy, sx = size / m.shape[0], size / m.shape[1]
        out[n] = (y0 * sy, x0 * sx, y1 * sy, x1 * sx)
    return torch.from_numpy(out)


def _square(boxes: torch.Tensor, margin: float, min_side: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centres (y, x) and half side of square boxes covering `boxes` plus the margin."""
    cy = (boxes[:, 0] + boxes[:, 2]) / 2
    cx = (boxes[:, 1] + boxes[:, 3]) / 2
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * (1 + 2 * margin)
    side = side.clamp(min=min_side)
    return cy, cx, side / 2


def crop_patches(images: torch.Tensor, boxes: torch.Tensor, size: int, margin: float = 0.0, min_side: float = 1.0) -> torch.Tensor:
    """Bilinear crops (n, C, size, size) of square boxes around `boxes` (y0, x0, y1, x1 in pixels).

    Parts of a box outside the image read as 0 (outside the liver, as in the masked input).
    """
    n, _, h, w = images.shape
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    cy, cx, half = _square(boxes, margin, min_side)
    # Normalised coordinates with align_corners=False: pixel edge 0 -> -1, edge w -> +1.
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=torch.float32)
    theta[:, 0, 0] = 2 * half / w
    theta[:, 0, 2] = 2 * cx / w - 1
    theta[:, 1, 1] = 2 * half / h
    theta[:, 1, 2] = 2 * cy / h - 1
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(images.dtype)


def _backbone(config: ROIConfig) -> nn.Module:
    """A registered backbone, built through the slice classifier so names and errors are the same."""
    return LesionClassifier(ModelConfig(backbone=config.backbone, width=config.width, attention="none",
                                        in_channels=config.in_channels)).backbone


class ROIClassifier(nn.Module):
    """(slice image, lesion box) -> logits over the four lesion classes."""

    def __init__(self, config: ROIConfig = ROIConfig()):
        super().__init__()
        self.config = config
        self.global_branch = _backbone(config)
        self.local_branch = _backbone(config)
        channels = self.global_branch.out_channels + self.local_branch.out_channels
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, config.num_classes)

    def patches(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        c = self.config
        return crop_patches(images, boxes, c.patch_size, c.box_margin, c.min_box)

    def classify(self, images: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Logits from a slice batch and its lesion patches (training augments the two separately)."""
        g = self.global_branch(images).mean(dim=(2, 3))
        local = self.local_branch(patches).mean(dim=(2, 3))
        return self.fc(self.dropout(torch.cat([g, local], dim=1)))

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.classify(images, self.patches(images, boxes))
