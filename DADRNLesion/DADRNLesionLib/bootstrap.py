"""Confidence intervals for the evaluation figures, by resampling patients rather than slices.

The slices of one patient share the anatomy, the scanner and the lesions, so they are not
independent draws: a slice-level interval over 13 000 slices from 200 cases would be far too
narrow. Each resample draws the test set's patients with replacement (all slices of a drawn patient
come along) and recomputes the figures with the definitions of `metrics`; the interval is the
percentile interval of those resamples. With a single patient there is nothing to resample and no
interval is given. Patients are whatever the data set says (`patient_id`): the cases with lesions
painted into one real scan are separate patients there, so their interval spans lesion draws on one
anatomy.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from .classes import CLASS_NAMES, LESION_CLASSES

__all__ = ["patient_bootstrap", "format_interval"]

N_CLASSES = len(CLASS_NAMES)


def _macro_f1(cm: np.ndarray) -> np.ndarray:
    """Macro F1 of each (B, n, n) confusion matrix over the classes present in its ground truth."""
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
    true_n = cm.sum(axis=2).astype(np.float64)
    pred_n = cm.sum(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = tp / true_n
        precision = np.where(pred_n > 0, tp / np.where(pred_n > 0, pred_n, 1.0), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = true_n > 0
    counted = present.sum(axis=1)
    return np.where(counted > 0, np.where(present, f1, 0.0).sum(axis=1) / np.maximum(counted, 1), np.nan)


def _interval(samples: np.ndarray, level: float) -> Optional[list[float]]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None
    lo, hi = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def patient_bootstrap(
    patient_ids: Sequence[str],
    labels: Sequence[int],
    predicted: Sequence[int],
    hits: Sequence[bool],
    scored: Sequence[bool],
    *,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Percentile intervals of accuracy, macro F1, each class's accuracy (recall) and each lesion
    class's pointing game (over its `scored` slices), patients resampled with replacement.

    Returns {"method", "level", "n_resamples", "patients", "accuracy": [lo, hi] | None, ...}; the
    figures are None when the slices come from fewer than two patients."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie between 0 and 1, not {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, not {n_resamples}")
    pid = np.asarray(patient_ids, dtype=object)
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(predicted, dtype=np.int64)
    hit = np.asarray(hits, dtype=bool)
    ok = np.asarray(scored, dtype=bool)
    if not (pid.shape == y.shape == p.shape == hit.shape == ok.shape):
        raise ValueError("patient_ids, labels, predicted, hits and scored must have one entry per slice")
    names, patient = np.unique(pid.astype(str), return_inverse=True)
    n_pat = names.size
    out: dict[str, Any] = {
        "method": "percentile interval, patients resampled with replacement (all slices of a patient together)",
        "level": level,
        "n_resamples": int(n_resamples),
        "patients": int(n_pat),
    }
    empty = {"accuracy": None, "macro_f1": None, "class_accuracy": {c: None for c in CLASS_NAMES},
             "pointing": {c: None for c in LESION_CLASSES}}
    if n_pat < 2:
        return {**out, **empty}
    # Per-patient counts; a resample is a vector of patient multiplicities, so its counts are one
    # matrix product away.
    cm = np.zeros((n_pat, N_CLASSES * N_CLASSES), np.float64)
    np.add.at(cm, (patient, y * N_CLASSES + p), 1.0)
    lesion_of = [CLASS_NAMES.index(c) for c in LESION_CLASSES]
    point_n = np.zeros((n_pat, len(lesion_of)), np.float64)
    point_hit = np.zeros_like(point_n)
    for j, c in enumerate(lesion_of):
        sel = (y == c) & ok
        np.add.at(point_n[:, j], patient[sel], 1.0)
        np.add.at(point_hit[:, j], patient[sel], hit[sel].astype(np.float64))
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_pat, np.full(n_pat, 1.0 / n_pat), size=int(n_resamples)).astype(np.float64)
    cms = (weights @ cm).reshape(-1, N_CLASSES, N_CLASSES)
    total = cms.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = np.trace(cms, axis1=1, axis2=2) / total
        recall = np.diagonal(cms, axis1=1, axis2=2) / cms.sum(axis=2)
        pointing = (weights @ point_hit) / (weights @ point_n)
    out["accuracy"] = _interval(accuracy, level)
    out["macro_f1"] = _interval(_macro_f1(cms), level)
    out["class_accuracy"] = {name: _interval(recall[:, i], level) for i, name in enumerate(CLASS_NAMES)}
    out["pointing"] = {name: _interval(pointing[:, j], level) for j, name in enumerate(LESION_CLASSES)}
    return out


def _span(v: Optional[list[float]]) -> str:
    return "-" if v is None else f"{v[0]:.3f}-{v[1]:.3f}"


def format_interval(ci: dict[str, Any]) -> str:
    """Two report lines: the intervals of the headline figures and of the pointing game."""
    who = f"{ci['patients']} patient{'' if ci['patients'] == 1 else 's'}"
    head = f"{100 * ci['level']:.0f}% interval ({ci['n_resamples']} resamples of {who})"
    if ci["accuracy"] is None:
        return head + ": none (fewer than two patients)"
    return (
        f"{head}: accuracy {_span(ci['accuracy'])}, macro F1 {_span(ci['macro_f1'])}; class accuracy "
        + ", ".join(f"{c} {_span(ci['class_accuracy'][c])}" for c in CLASS_NAMES)
        + "\n  pointing " + ", ".join(f"{c} {_span(ci['pointing'][c])}" for c in LESION_CLASSES)
    )
