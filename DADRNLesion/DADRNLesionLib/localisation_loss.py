"""An optional training loss that pulls the true class's class-activation map into the lesion.

The paper trains on slice labels alone, and so does `train` by default. Data made here (phantoms,
lesions painted into real scans) and real data with lesion masks also carry the lesion's outline;
with ``--localisation-loss W`` training uses it on the lesion slices that have one. Slices labelled
from a table, and normal slices, train on their label alone. Inference is unchanged: it still needs
no lesion drawing.

The map is the one Grad-CAM explains (for a GAP + linear head, Grad-CAM's map is the class's
weights applied to the last spatial map, up to a positive factor), before its ReLU. Over the liver's
cells it is standardised (zero mean, unit spread: the loss cannot be won by scaling features) and
turned into a spatial softmax; the loss is minus the log of the share that falls in the dilated
lesion outline, which is what the pointing game asks of the peak.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["outlines_in_input", "localisation_loss", "DEFAULT_SHARPNESS"]

DEFAULT_SHARPNESS = 3.0  # the softmax's inverse temperature on the standardised map


def outlines_in_input(masks: Sequence[Optional[np.ndarray]], size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, size, size) float outlines and (n,) bool "has one", from each sample's (liver, core,
    dilated) masks in its crop box (`SliceCache.masks`), resized as `prepare_batch` resizes the box.

    Each box is resized on `device`, so that a GPU step waits for no CPU resizes: the first GPU run
    with this loss, resizing on the CPU beside busy phantom generators, took 5.6 s a step, likely
    for that reason in part (docs/performance.md)."""
    out = torch.zeros((len(masks), 1, size, size), dtype=torch.float32, device=device)
    has = torch.zeros(len(masks), dtype=torch.bool)
    for n, m in enumerate(masks):
        if m is None or not np.any(m[2]):
            continue
        box = torch.from_numpy(np.ascontiguousarray(m[2], dtype=np.float32))[None, None].to(device, non_blocking=True)
        out[n] = (F.interpolate(box, size=(size, size), mode="bilinear", align_corners=False)[0] > 0).float()
        has[n] = True
    return out, has.to(device)


def localisation_loss(
    features: torch.Tensor,
    class_weights: torch.Tensor,
    target: torch.Tensor,
    outlines: torch.Tensor,
    inside: torch.Tensor,
    has: torch.Tensor,
    sharpness: float = DEFAULT_SHARPNESS,
) -> torch.Tensor:
    """Mean of -log(share of the target class's spatial softmax inside the outline) over the samples
    with an outline that covers some liver cell and leaves some uncovered; 0 (with a graph) when none.

    features (n, C, h, w); class_weights (classes, C) (the linear head's); target (n,); outlines and
    inside (n, 1, H, W) at the input's size (a cell counts when any of its pixels does)."""
    cells = tuple(features.shape[-2:])
    lesion = F.adaptive_max_pool2d(outlines.float(), cells)[:, 0] > 0
    liver = F.adaptive_max_pool2d(inside.float(), cells)[:, 0] > 0
    lesion = lesion & liver
    usable = has & lesion.flatten(1).any(1) & (liver & ~lesion).flatten(1).any(1)
    if not bool(usable.any()):
        return features.float().sum() * 0.0
    f = features[usable].float()
    w = class_weights.float()[target[usable].long()]
    maps = torch.einsum("nchw,nc->nhw", f, w).flatten(1)
    live = liver[usable].flatten(1)
    inner = lesion[usable].flatten(1)
    count = live.sum(1, keepdim=True).clamp(min=1)
    mean = (maps * live).sum(1, keepdim=True) / count
    spread = (((maps - mean) ** 2 * live).sum(1, keepdim=True) / count).sqrt().clamp(min=1e-6)
    z = ((maps - mean) / spread * sharpness).masked_fill(~live, float("-inf"))
    log_share = torch.logsumexp(z.masked_fill(~inner, float("-inf")), 1) - torch.logsumexp(z, 1)
    return -log_share.mean()
