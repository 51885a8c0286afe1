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
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from .classes import CLASS_NAMES
from .errors import WeightsError
from .metrics import classification_summary, confusion_matrix

__all__ = ["MAX_ABS_OFFSET", "OFFSET_GRID", "card_offset", "offset_logits", "adjust_probabilities", "choose_offset", "decision_record"]

MAX_ABS_OFFSET = 10.0  # e^10: beyond this the offset overrides the network rather than correcting it
OFFSET_GRID = tuple(round(float(x), 2) + 0.0 for x in np.arange(-1.0, 4.0001, 0.1))  # + 0.0: no "-0.0"


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


def _figures(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    s = classification_summary(confusion_matrix(labels, probs.argmax(axis=1)))
    return {"accuracy": s["accuracy"], "macro_f1": s["macro_f1"],
            "class_accuracy": {k: v["accuracy"] for k, v in s["per_class"].items()}}


def choose_offset(labels: np.ndarray, probs: np.ndarray, grid: Optional[tuple[float, ...]] = None) -> dict[str, Any]:
    """The offset of `grid` with the highest macro F1 on these slices (ties: the one nearest 0).

    `probs` are the network's own probabilities (offset 0), one row per labelled slice; every slice
    counts once, so pass every labelled slice of the validation cases, not a sample of the normal
    ones. Returns the offset, its figures, those at 0 and the whole curve.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.ndim != 1 or probs.shape != (labels.size, len(CLASS_NAMES)):
        raise ValueError(f"need one label per row of a (n, {len(CLASS_NAMES)}) probability table, got {labels.shape} and {probs.shape}")
    if labels.size == 0 or not (labels == 0).any() or not (labels > 0).any():
        raise ValueError("choosing the offset needs normal and lesion slices")
    curve = []
    for b in grid or OFFSET_GRID:
        curve.append({"normal_logit_offset": float(b), **_figures(labels, adjust_probabilities(probs, b))})
    best = max(curve, key=lambda r: (round(r["macro_f1"], 9), -abs(r["normal_logit_offset"])))
    return {"normal_logit_offset": best["normal_logit_offset"], "criterion": "macro F1 over every labelled slice",
            "slices": int(labels.size), "chosen": best, "at_zero": _figures(labels, probs), "curve": curve}


def decision_record(choice: dict[str, Any], chosen_on: dict[str, Any]) -> dict[str, Any]:
    """The model card's ``decision`` entry for a `choose_offset` result."""
    return {
        "normal_logit_offset": choice["normal_logit_offset"],
        "rule": "the normal class's logit plus this offset competes with the lesion classes' logits (prior correction)",
        "criterion": choice["criterion"],
        "chosen_on": {**chosen_on, "slices": choice["slices"]},
        "validation": {"chosen": choice["chosen"], "at_zero": choice["at_zero"]},
    }
