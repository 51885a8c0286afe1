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

from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

from .classes import CLASS_NAMES, LESION_CLASSES

__all__ = ["patient_bootstrap", "paired_bootstrap", "format_interval"]

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


class _PatientCounts(NamedTuple):
    """Per-patient sums from which every figure of a resample follows by one matrix product."""

    confusion: np.ndarray  # (patients, classes * classes)
    pointing_n: np.ndarray  # (patients, lesion classes): scored slices
    pointing_hit: np.ndarray  # (patients, lesion classes): of those, hits

    @classmethod
    def of(cls, patient: np.ndarray, n_pat: int, y: np.ndarray, p: np.ndarray, hit: np.ndarray, ok: np.ndarray) -> "_PatientCounts":
        cm = np.zeros((n_pat, N_CLASSES * N_CLASSES), np.float64)
        np.add.at(cm, (patient, y * N_CLASSES + p), 1.0)
        point_n = np.zeros((n_pat, len(LESION_CLASSES)), np.float64)
        point_hit = np.zeros_like(point_n)
        for j, c in enumerate(CLASS_NAMES.index(c) for c in LESION_CLASSES):
            sel = (y == c) & ok
            np.add.at(point_n[:, j], patient[sel], 1.0)
            np.add.at(point_hit[:, j], patient[sel], hit[sel].astype(np.float64))
        return cls(cm, point_n, point_hit)

    def class_patients(self) -> np.ndarray:
        """(classes,) how many patients hold slices of each class."""
        return (self.confusion.reshape(-1, N_CLASSES, N_CLASSES).sum(axis=2) > 0).sum(axis=0)

    def pointing_patients(self) -> np.ndarray:
        """(lesion classes,) how many patients hold scored slices of each lesion class."""
        return (self.pointing_n > 0).sum(axis=0)


def _resample_weights(n_pat: int, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n_pat) multiplicities: how often each patient is drawn in each resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_pat, np.full(n_pat, 1.0 / n_pat), size=int(n_resamples)).astype(np.float64)


def _resampled_figures(weights: np.ndarray, counts: _PatientCounts) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy (B,), macro F1 (B,), class recall (B, classes) and pointing (B, lesion classes) of each resample."""
    cms = (weights @ counts.confusion).reshape(-1, N_CLASSES, N_CLASSES)
    total = cms.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = np.trace(cms, axis1=1, axis2=2) / total
        recall = np.diagonal(cms, axis1=1, axis2=2) / cms.sum(axis=2)
        pointing = (weights @ counts.pointing_hit) / (weights @ counts.pointing_n)
    return accuracy, _macro_f1(cms), recall, pointing


def _check_resampling(level: float, n_resamples: int) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie between 0 and 1, not {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, not {n_resamples}")


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
    _check_resampling(level, n_resamples)
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
    weights = _resample_weights(n_pat, n_resamples, seed)
    counts = _PatientCounts.of(patient, n_pat, y, p, hit, ok)
    accuracy, macro_f1, recall, pointing = _resampled_figures(weights, counts)
    by_class, by_pointing = counts.class_patients(), counts.pointing_patients()
    out["accuracy"] = _interval(accuracy, level)
    out["macro_f1"] = _interval(macro_f1, level)
    # A class seen in one patient only has nothing to resample either: no interval rather than a point.
    out["class_accuracy"] = {name: _interval(recall[:, i], level) if by_class[i] >= 2 else None for i, name in enumerate(CLASS_NAMES)}
    out["pointing"] = {name: _interval(pointing[:, j], level) if by_pointing[j] >= 2 else None
                       for j, name in enumerate(LESION_CLASSES)}
    return out


def paired_bootstrap(
    patient_ids: Sequence[str],
    labels: Sequence[int],
    predicted_a: Sequence[int],
    predicted_b: Sequence[int],
    hits_a: Sequence[bool],
    hits_b: Sequence[bool],
    scored: Sequence[bool],
    *,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Model B against model A on the same slices: each figure of both, B - A, and the percentile
    interval of B - A with the *same* patients drawn for both in every resample.

    Pairing is what makes a small difference visible: the two models share the hard and the easy
    patients, so most of the spread of either figure cancels in their difference, and two
    overlapping intervals can still hide a clear difference. ``sign`` is +1 where the interval
    lies above 0 (B higher), -1 where it lies below, 0 where it holds 0 or is undefined (a figure
    whose slices come from fewer than two patients has no interval)."""
    _check_resampling(level, n_resamples)
    pid = np.asarray(patient_ids, dtype=object)
    y = np.asarray(labels, dtype=np.int64)
    arrays = [np.asarray(predicted_a, dtype=np.int64), np.asarray(predicted_b, dtype=np.int64),
              np.asarray(hits_a, dtype=bool), np.asarray(hits_b, dtype=bool), np.asarray(scored, dtype=bool)]
    if any(a.shape != y.shape for a in arrays) or pid.shape != y.shape:
        raise ValueError("patient_ids, labels, predictions, hits and scored must have one entry per slice")
    pa, pb, hit_a, hit_b, ok = arrays
    names, patient = np.unique(pid.astype(str), return_inverse=True)
    n_pat = names.size
    counts_a = _PatientCounts.of(patient, n_pat, y, pa, hit_a, ok)
    counts_b = _PatientCounts.of(patient, n_pat, y, pb, hit_b, ok)
    ones = np.ones((1, n_pat))
    point_a, point_b = _resampled_figures(ones, counts_a), _resampled_figures(ones, counts_b)
    if n_pat >= 2:
        weights = _resample_weights(n_pat, n_resamples, seed)
        draws_a, draws_b = _resampled_figures(weights, counts_a), _resampled_figures(weights, counts_b)
    else:
        draws_a = draws_b = None

    contributing = [n_pat, n_pat, counts_a.class_patients(), counts_a.pointing_patients()]

    def figure(k: int, column: Optional[int]) -> dict[str, Any]:
        def pick(arrays: tuple[np.ndarray, ...]) -> np.ndarray:
            return arrays[k] if column is None else arrays[k][:, column]

        a, b = float(pick(point_a)[0]), float(pick(point_b)[0])
        patients = contributing[k] if column is None else contributing[k][column]
        ci = None if draws_a is None or patients < 2 else _interval(pick(draws_b) - pick(draws_a), level)
        sign = 0 if ci is None else (1 if ci[0] > 0 else -1 if ci[1] < 0 else 0)
        finite = np.isfinite(a) and np.isfinite(b)
        return {"a": a if np.isfinite(a) else None, "b": b if np.isfinite(b) else None,
                "difference": b - a if finite else None, "interval": ci, "sign": sign}

    return {
        "method": "paired percentile interval of B - A, patients resampled with replacement (the same draw for both models)",
        "level": level,
        "n_resamples": int(n_resamples),
        "patients": int(n_pat),
        "slices": int(y.size),
        "accuracy": figure(0, None),
        "macro_f1": figure(1, None),
        "class_accuracy": {name: figure(2, i) for i, name in enumerate(CLASS_NAMES)},
        "pointing": {name: figure(3, j) for j, name in enumerate(LESION_CLASSES)},
    }


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
