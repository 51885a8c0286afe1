"""Grad-CAM (Selvaraju et al. 2017) on the model's last spatial map, at the cost of a forward pass.

Only the head (pooling + linear) lies after the target map, so the gradient of a class score with
respect to the map needs a backward pass through the head alone: the backbone and attention run
once under ``torch.inference_mode`` and their activations are never kept for autograd. For a plain
GAP + linear head this equals CAM (Zhou et al. 2016); the autograd route keeps it right for any
head, and `naive_grad_cam` is the full-network reference that tests and benchmarks compare with.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .decision import offset_logits

__all__ = ["CamOutput", "GradCAM", "naive_grad_cam", "normalise_per_slice"]


@dataclass
class CamOutput:
    """The logits are the network's own; the probabilities and the default target follow the
    decision rule (`decision`: the normal-logit offset), which moves no lesion class against another."""

    logits: torch.Tensor  # (n, classes), float32
    probabilities: torch.Tensor  # (n, classes), float32
    target: torch.Tensor  # (n,), the class each map explains
    cams: torch.Tensor  # (n, h, w), float32, ReLU'd, not normalised


class GradCAM:
    """Hooks nothing and keeps no state between calls: the model exposes `features` and `head`."""

    def __init__(self, model: torch.nn.Module, amp_dtype: Optional[torch.dtype] = None, normal_offset: float = 0.0):
        self.model = model
        self.amp_dtype = amp_dtype
        self.normal_offset = float(normal_offset)

    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.amp_dtype)

    def __call__(self, images: torch.Tensor, target: Optional[torch.Tensor] = None) -> CamOutput:
        with torch.inference_mode(), self._autocast(images.device):
            features = self.model.features(images)
        # A clone made outside inference mode is an ordinary tensor that autograd may track; it
        # stays in the autocast dtype (the head pools in float32), so the copy is the only extra pass.
        features = features.clone().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model.head(features).float()
            decided = offset_logits(logits.detach(), self.normal_offset)
            chosen = decided.argmax(dim=1) if target is None else target.to(logits.device).long()
            score = logits.gather(1, chosen[:, None]).sum()  # the offset is a constant: same gradient
            (grads,) = torch.autograd.grad(score, features)
        with torch.no_grad():
            return CamOutput(logits.detach(), torch.softmax(decided, dim=1), chosen.detach(), _weighted_maps(grads, features))


def naive_grad_cam(model: torch.nn.Module, images: torch.Tensor, target: Optional[torch.Tensor] = None) -> CamOutput:
    """Grad-CAM the generic way: full autograd graph, backward through the whole network."""
    with torch.enable_grad():
        features = model.features(images)
        features.retain_grad()
        logits = model.head(features)
        chosen = logits.argmax(dim=1) if target is None else target.to(logits.device).long()
        model.zero_grad(set_to_none=True)
        logits.gather(1, chosen[:, None]).sum().backward()
        grads = features.grad
    with torch.no_grad():
        cams = _weighted_maps(grads, features.detach())
        logits = logits.detach().float()
    model.zero_grad(set_to_none=True)
    return CamOutput(logits, torch.softmax(logits, dim=1), chosen.detach(), cams)


def _weighted_maps(grads: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_k mean(dy/dA_k) A_k) as one batched matrix product, in float32."""
    n, c, h, w = features.shape
    weights = grads.float().mean(dim=(2, 3)).to(features.dtype)  # (n, C)
    maps = torch.bmm(weights[:, None, :], features.reshape(n, c, h * w)).reshape(n, h, w)
    return F.relu(maps.float())


def normalise_per_slice(maps: np.ndarray) -> np.ndarray:
    """Scale each 2D map (leading axis = slice) to [0, 1] by its maximum; an all-zero map stays 0."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.size == 0:
        return maps.copy()
    peak = maps.reshape(maps.shape[0], -1).max(axis=1).reshape((-1,) + (1,) * (maps.ndim - 1))
    # Divide (not multiply by a reciprocal) so that each slice's maximum becomes exactly 1.0.
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(peak > 0, maps / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)
    return np.clip(np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
