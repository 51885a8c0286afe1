"""The decision rule on top of the network: a prior correction of the normal class.

Training draws every class equally often (the class-balanced sampler), so the network's
probabilities assume five equally likely classes. In a study most liver slices are normal, and a
slice the network finds 40 % normal and 30 % HCC is, under that prior, far more likely normal. By
Bayes' rule a change of prior adds a constant to each class's logit (logit adjustment); with the
lesion classes left as trained, one offset ``b`` on the normal logit is the whole correction:

    p'(normal) = p(normal) e^b / (p(normal) e^b + sum of the lesion classes' p)

``b`` is chosen on a validation split, by macro F1 over every labelled slice (`choose_offset`),
and stored in the model card (``decision.normal_logit_offset``), so that `classify`, the Slicer
module and `evaluate` take the same decision. ``b = 0`` is the network's own argmax, as in the
paper. The offset moves slices between normal and their most likely lesion class only: the order
of the lesion classes, and so each lesion slice's class and heatmap, are unchanged.

The second part of the rule is the slice context (``decision.slice_context_mm``, default 0). A
lesion spans neighbouring slices and has one class along them, while the network sees three
slices at a time; noise makes a faint lesion flicker between classes, or between lesion and
normal, from slice to slice. With a context of s mm each slice's log-probabilities are replaced
by their Gaussian-weighted mean (sigma s mm along the slice axis) over the liver slices of the
same study (`context_probabilities`), before the offset. That is a product of the neighbours'
opinions: agreement along the lesion adds up, an isolated slice's outlier is outvoted. It is
chosen with the offset on validation slices (`choose_decision`). A slice whose class it changes
is explained by a Grad-CAM map of its new class (the pipeline and `evaluate` recompute those).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from .classes import CLASS_NAMES
from .errors import WeightsError
from .metrics import classification_summary, confusion_matrix

__all__ = ["MAX_ABS_OFFSET", "MAX_SLICE_CONTEXT_MM", "OFFSET_GRID", "SLICE_CONTEXT_GRID_MM", "card_offset", "card_slice_context",
           "offset_logits", "adjust_probabilities", "context_probabilities", "decide", "choose_decision", "decision_record"]

MAX_ABS_OFFSET = 10.0  # e^10: beyond this the offset overrides the network rather than correcting it
OFFSET_GRID = tuple(round(float(x), 2) + 0.0 for x in np.arange(-1.0, 4.0001, 0.1))  # + 0.0: no "-0.0"
MAX_SLICE_CONTEXT_MM = 30.0  # half a large lesion: wider would blur lesions into the normal liver around them
SLICE_CONTEXT_GRID_MM = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0)
_LOG_FLOOR = 1e-7  # a probability of exactly 0 would veto a class for every neighbour


def card_offset(card) -> float:
    """The card's normal-logit offset; 0 where the card records no decision rule (older cards)."""
    decision = card.extra.get("decision") if card is not None else None
    if decision is None:
        return 0.0
    try:
        b = float(decision["normal_logit_offset"])
    except (TypeError, KeyError, ValueError):
        raise WeightsError(
            "the model card's decision has no numeric normal_logit_offset: restore the card, or remove its "
            "'decision' entry to use the network's own argmax"
        ) from None
    if not math.isfinite(b) or abs(b) > MAX_ABS_OFFSET:
        raise WeightsError(f"the model card's normal_logit_offset is {b}; it must be finite and within ±{MAX_ABS_OFFSET:g}: restore the card")
    return b


def card_slice_context(card) -> float:
    """The card's slice context in mm; 0 (each slice on its own) where the card records none."""
    decision = card.extra.get("decision") if card is not None else None
    value = (decision or {}).get("slice_context_mm", 0.0)
    try:
        s = float(value)
    except (TypeError, ValueError):
        s = float("nan")
    if not math.isfinite(s) or not 0.0 <= s <= MAX_SLICE_CONTEXT_MM:
        raise WeightsError(f"the model card's slice_context_mm is {value!r}; it must be a number of mm from 0 to "
                           f"{MAX_SLICE_CONTEXT_MM:g}: restore the card")
    return s


def offset_logits(logits: torch.Tensor, offset: float) -> torch.Tensor:
    """The logits the decision is taken on (the normal class is column 0)."""
    if offset == 0.0:
        return logits
    shift = torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device)
    shift[0] = offset
    return logits + shift


def adjust_probabilities(probs: np.ndarray, offset: float) -> np.ndarray:
    """The probabilities after `offset` is added to the normal logit (rows of a softmax)."""
    p = np.asarray(probs, dtype=np.float64).copy()
    p[:, 0] *= math.exp(offset)
    return p / p.sum(axis=1, keepdims=True)


def context_probabilities(probs: np.ndarray, z_mm: np.ndarray, groups: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Each row's log-probabilities averaged with Gaussian weights (sigma `sigma_mm`) over the rows
    of its group (one study) by distance `z_mm` along the slice axis, renormalised; 0: unchanged."""
    p = np.asarray(probs, dtype=np.float64)
    if sigma_mm <= 0 or p.shape[0] == 0:
        return p.copy()
    z = np.asarray(z_mm, dtype=np.float64)
    g = np.asarray(groups)
    if z.shape != (p.shape[0],) or g.shape != (p.shape[0],):
        raise ValueError(f"need one slice position and one study per row, got {z.shape} and {g.shape} for {p.shape[0]} rows")
    log_p = np.log(np.clip(p, _LOG_FLOOR, 1.0))
    out = np.empty_like(log_p)
    for value in np.unique(g):
        rows = np.flatnonzero(g == value)
        d = (z[rows, None] - z[None, rows]) / sigma_mm
        w = np.exp(-0.5 * d * d) * (np.abs(d) <= 3.0)
        out[rows] = (w / w.sum(axis=1, keepdims=True)) @ log_p[rows]
    out = np.exp(out - out.max(axis=1, keepdims=True))
    return out / out.sum(axis=1, keepdims=True)


def decide(probs: np.ndarray, offset: float, slice_context_mm: float = 0.0, z_mm=None, groups=None) -> np.ndarray:
    """The probabilities the classes are decided on: the network's own (offset 0) `probs` taken in
    their slice context, then corrected by the offset. Rows of one study share a `groups` value."""
    if slice_context_mm > 0:
        probs = context_probabilities(probs, z_mm, groups, slice_context_mm)
    return adjust_probabilities(probs, offset)


def _figures(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    s = classification_summary(confusion_matrix(labels, probs.argmax(axis=1)))
    return {"accuracy": s["accuracy"], "macro_f1": s["macro_f1"],
            "class_accuracy": {k: v["accuracy"] for k, v in s["per_class"].items()}}


def choose_decision(
    labels: np.ndarray,
    probs: np.ndarray,
    grid: Optional[tuple[float, ...]] = None,
    *,
    z_mm=None,
    groups=None,
    context_grid: tuple[float, ...] = (0.0,),
) -> dict[str, Any]:
    """The offset of `grid` and slice context of `context_grid` with the highest macro F1 on these
    slices (ties: the narrower context, then the offset nearest 0).

    `probs` are the network's own probabilities (offset 0), one row per labelled slice; every slice
    counts once, so pass every labelled slice of the validation cases, not a sample of the normal
    ones (a context also needs each slice's neighbours). A context other than 0 needs `z_mm` and
    `groups`. Returns the choice, its figures, those of the network's own argmax and the whole curve.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.ndim != 1 or probs.shape != (labels.size, len(CLASS_NAMES)):
        raise ValueError(f"need one label per row of a (n, {len(CLASS_NAMES)}) probability table, got {labels.shape} and {probs.shape}")
    if labels.size == 0 or not (labels == 0).any() or not (labels > 0).any():
        raise ValueError("choosing the offset needs normal and lesion slices")
    if any(c > 0 for c in context_grid) and (z_mm is None or groups is None):
        raise ValueError("choosing a slice context needs each slice's position and study")
    curve = []
    for context in context_grid:
        in_context = context_probabilities(probs, z_mm, groups, context) if context > 0 else probs
        for b in grid or OFFSET_GRID:
            curve.append({"slice_context_mm": float(context), "normal_logit_offset": float(b),
                          **_figures(labels, adjust_probabilities(in_context, b))})
    best = max(curve, key=lambda r: (round(r["macro_f1"], 9), -r["slice_context_mm"], -abs(r["normal_logit_offset"])))
    return {"normal_logit_offset": best["normal_logit_offset"], "slice_context_mm": best["slice_context_mm"],
            "criterion": "macro F1 over every labelled slice", "slices": int(labels.size), "chosen": best, "at_zero": _figures(labels, probs),
            "contexts_tried": [float(c) for c in context_grid], "curve": curve}


def decision_record(choice: dict[str, Any], chosen_on: dict[str, Any]) -> dict[str, Any]:
    """The model card's ``decision`` entry for a `choose_decision` result."""
    return {
        "normal_logit_offset": choice["normal_logit_offset"],
        "slice_context_mm": choice.get("slice_context_mm", 0.0),
        "rule": "each slice's log-probabilities are averaged over its study's liver slices with Gaussian weights of sigma "
                "slice_context_mm along the slice axis (0: the slice alone); then the normal class's logit plus the offset "
                "competes with the lesion classes' logits (prior correction)",
        "criterion": choice["criterion"],
        "chosen_on": {**chosen_on, "slices": choice["slices"]},
        "validation": {"chosen": choice["chosen"], "at_zero": choice["at_zero"]},
    }
