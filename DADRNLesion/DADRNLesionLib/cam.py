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

__all__ = ["CamOutput", "GradCAM", "naive_grad_cam", "normalise_per_slice"]


@dataclass
class CamOutput:
    logits: torch.Tensor  # (n, classes), float32
    probabilities: torch.Tensor  # (n, classes), float32
    target: torch.Tensor  # (n,), the class each map explains
    cams: torch.Tensor  # (n, h, w), float32, ReLU'd, not normalised


class GradCAM:
    """Hooks nothing and keeps no state between calls: the model exposes `features` and `head`."""

    def __init__(self, model: torch.nn.Module, amp_dtype: Optional[torch.dtype] = None):
        self.model = model
        self.amp_dtype = amp_dtype

    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.amp_dtype)

    def __call__(self, images: torch.Tensor, target: Optional[torch.Tensor] = None) -> CamOutput:
        with torch.inference_mode(), self._autocast(images.device):
            features = self.model.features(images)
        # A clone made outside inference mode is an ordinary tensor that autograd may track.
        features = features.float().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model.head(features)
            chosen = logits.argmax(dim=1) if target is None else target.to(logits.device).long()
            score = logits.gather(1, chosen[:, None]).sum()
            (grads,) = torch.autograd.grad(score, features)
        with torch.no_grad():
            weights = grads.mean(dim=(2, 3), keepdim=True)
            cams = F.relu((weights * features).sum(dim=1))
            logits = logits.detach()
            return CamOutput(logits, torch.softmax(logits, dim=1), chosen.detach(), cams)


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
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cams = F.relu((weights * features.detach()).sum(dim=1)).float()
        logits = logits.detach().float()
    model.zero_grad(set_to_none=True)
    return CamOutput(logits, torch.softmax(logits, dim=1), chosen.detach(), cams)


def normalise_per_slice(maps: np.ndarray) -> np.ndarray:
    """Scale each 2D map (leading axis = slice) to [0, 1] by its maximum; an all-zero map stays 0."""
    maps = np.asarray(maps, dtype=np.float32)
    peak = maps.reshape(maps.shape[0], -1).max(axis=1) if maps.size else np.zeros(0, np.float32)
    scale = np.where(peak > 0, 1.0 / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)
    out = maps * scale.reshape((-1,) + (1,) * (maps.ndim - 1))
    return np.clip(np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
