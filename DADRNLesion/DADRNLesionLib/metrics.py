"""The paper's evaluation measures, computed from labels and predictions with numpy alone.

* Class-wise accuracy (the paper's Table "class-wise classification accuracy") is the recall of
  that class: correctly classified slices of class c / all slices whose true class is c.
* Overall accuracy: correct slices / all slices.
* Macro precision, recall and F1: the unweighted mean over the classes present in the ground
  truth (a class without true slices has no recall; it is left out of the means and reported as
  null). A class that is never predicted has precision 0; F1 is 0 where precision + recall = 0.
* Localization accuracy of class c (pointing game): slices of class c whose CAM peak lies in the
  ground-truth lesion (dilated by 2 voxels in-plane) / all slices of class c. A slice predicted
  normal has no heatmap in the product, so it counts as not localised.
* CAM IoU: intersection over union of the thresholded heatmap region and the lesion, per slice,
  averaged over the slices of a class (0 for a slice without a heatmap).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from .classes import CLASS_NAMES, LESION_CLASSES

__all__ = [
    "confusion_matrix",
    "classification_summary",
    "localization_summary",
    "format_classification_table",
    "format_localization_table",
    "report_scopes",
]


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """(n, n) counts; rows are the true class, columns the predicted class."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"{t.size} labels but {p.size} predictions")
    if t.size and (t.min() < 0 or p.min() < 0 or t.max() >= n_classes or p.max() >= n_classes):
        raise ValueError(f"labels and predictions must lie in 0..{n_classes - 1}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _nan_to_none(x: float) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def classification_summary(cm: np.ndarray, class_names: Sequence[str] = CLASS_NAMES) -> dict[str, Any]:
    """Per-class accuracy (= recall), precision, F1, support; overall accuracy and macro means."""
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.sum()
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / np.where(support > 0, support, 1), np.nan)
        precision = np.where(predicted > 0, tp / np.where(predicted > 0, predicted, 1), 0.0)
        denom = precision + recall
        f1 = np.where((support > 0) & (denom > 0), 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    present = support > 0
    f1 = np.where(present, f1, np.nan)
    precision_present = np.where(present, precision, np.nan)
    per_class = {
        name: {
            "accuracy": _nan_to_none(recall[c]),  # class-wise accuracy = recall
            "precision": float(precision[c]) if (present[c] or predicted[c]) else None,
            "recall": _nan_to_none(recall[c]),
            "f1": _nan_to_none(f1[c]),
            "support": int(support[c]),
            "predicted": int(predicted[c]),
        }
        for c, name in enumerate(class_names)
    }
    return {
        "n": int(n),
        "accuracy": float(tp.sum() / n) if n else None,
        "macro_f1": float(np.nanmean(f1)) if present.any() else None,
        "macro_precision": float(np.nanmean(precision_present)) if present.any() else None,
        "macro_recall": float(np.nanmean(recall)) if present.any() else None,
        "per_class": per_class,
        "confusion_matrix": cm.astype(np.int64).tolist(),
        "classes": list(class_names),
    }


def localization_summary(
    labels: Sequence[int],
    hits: Sequence[bool],
    ious: Optional[Sequence[float]] = None,
    class_names: Sequence[str] = CLASS_NAMES,
    centre_hits: Optional[Sequence[bool]] = None,
) -> dict[str, Any]:
    """Pointing-game accuracy and mean CAM IoU per lesion class, over the slices of that class (and the
    hot-spot centre's accuracy, when given)."""
    labels = np.asarray(labels, dtype=np.int64)
    hits = np.asarray(hits, dtype=bool)
    centres = None if centre_hits is None else np.asarray(centre_hits, dtype=bool)
    ious_a = None if ious is None else np.asarray(ious, dtype=np.float64)
    out: dict[str, Any] = {}
    for name in LESION_CLASSES:
        c = list(class_names).index(name)
        sel = labels == c
        n = int(sel.sum())
        out[name] = {
            "pointing": float(hits[sel].mean()) if n else None,
            "iou": float(ious_a[sel].mean()) if (n and ious_a is not None) else None,
            "n": n,
        }
        if centres is not None:
            out[name]["centre"] = float(centres[sel].mean()) if n else None
    lesion = labels > 0
    out["all_lesion_slices"] = {
        "pointing": float(hits[lesion].mean()) if lesion.any() else None,
        "iou": float(ious_a[lesion].mean()) if (lesion.any() and ious_a is not None) else None,
        "n": int(lesion.sum()),
    }
    if centres is not None:
        out["all_lesion_slices"]["centre"] = float(centres[lesion].mean()) if lesion.any() else None
    return out


def _fmt(x: Optional[float]) -> str:
    return "   -  " if x is None else f"{x:.4f}"


def format_classification_table(summary: dict[str, Any], title: str = "") -> str:
    names = summary["classes"]
    lines = []
    if title:
        lines.append(title)
    lines.append("class-wise accuracy (= recall of the class)")
    lines.append("  " + "  ".join(f"{n:>7s}" for n in names))
    lines.append("  " + "  ".join(f"{_fmt(summary['per_class'][n]['accuracy']):>7s}" for n in names))
    lines.append("  " + "  ".join(f"{'n=' + str(summary['per_class'][n]['support']):>7s}" for n in names))
    lines.append(f"{'accuracy':>10s} {'macro F1':>10s} {'precision':>10s} {'recall':>10s}   (n={summary['n']} slices)")
    lines.append(
        f"{_fmt(summary['accuracy']):>10s} {_fmt(summary['macro_f1']):>10s} "
        f"{_fmt(summary['macro_precision']):>10s} {_fmt(summary['macro_recall']):>10s}"
    )
    return "\n".join(lines)


def format_localization_table(loc: dict[str, Any], title: str = "") -> str:
    lines = [title] if title else []
    centre = all("centre" in loc[n] for n in LESION_CLASSES)
    lines.append("localization (pointing game: CAM peak in the lesion dilated by 2 voxels; CAM IoU"
                 + ("; hot-spot centre: the heat-weighted centre of the peak's region, in the same dilated lesion)" if centre else ")"))
    lines.append("  " + "  ".join(f"{n:>7s}" for n in LESION_CLASSES))
    lines.append("  " + "  ".join(f"{_fmt(loc[n]['pointing']):>7s}" for n in LESION_CLASSES) + "   pointing")
    lines.append("  " + "  ".join(f"{_fmt(loc[n]['iou']):>7s}" for n in LESION_CLASSES) + "   IoU")
    if centre:
        lines.append("  " + "  ".join(f"{_fmt(loc[n]['centre']):>7s}" for n in LESION_CLASSES) + "   hot-spot centre")
    return "\n".join(lines)


def report_scopes(group: np.ndarray, subgroup: np.ndarray) -> dict[str, np.ndarray]:
    """The scopes reported beside "all", as slice selections: each group (when there is more than
    one, or ungrouped slices beside one) and each named subgroup within its group ("phantom / hard")."""
    scopes: dict[str, np.ndarray] = {}
    groups = sorted(set(group.tolist()) - {""})
    if len(groups) > 1 or (groups and (group == "").any()):
        scopes = {g: group == g for g in groups}
    for g, sg in sorted(set(zip(group.tolist(), subgroup.tolist()))):
        if sg:
            scopes[f"{g} / {sg}" if g else sg] = (group == g) & (subgroup == sg)
    return scopes
