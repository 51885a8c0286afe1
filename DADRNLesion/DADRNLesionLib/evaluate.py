"""The paper's tables for a test set: classification per class and overall, and localization.

Each slice goes through the model and Grad-CAM exactly as in `pipeline.run_pipeline`: the CAM
of the predicted class, upsampled bilinearly to the case's liver crop box, smoothed
(`preprocess.smooth_maps`), masked by the liver,
scaled to [0, 1]; its peak is the slice's point, its >= `cam_threshold` region the lesion's
label. Both are scored on the CT's own in-plane grid against the ground-truth lesion:
* pointing game: the peak lies in the lesion dilated by 2 voxels in-plane (a slice predicted
  normal has no heatmap and counts as a miss);
* CAM IoU: the thresholded region against the (undilated) lesion;
* hot-spot centre: the heat-weighted centre of the thresholded region around the peak lies in the
  dilated lesion. The peak sits on a node of the CAM's coarse grid (28 x 28 at 224 px, about 7 mm
  apart over a liver box); the centre of the hot spot is not tied to that grid.
The same is also computed with the CAM of the true class ("true-class CAM"), which isolates
localisation from classification errors.

Results are reported for all test slices and for each case group (e.g. phantoms and each real
scan with painted-in lesions) separately.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .bootstrap import format_interval, patient_bootstrap
from .cam import GradCAM
from .classes import CLASS_NAMES, LESION_CLASSES
from .data import SliceCache
from .decision import adjust_probabilities, decide
from .precision import uses_channels_last
from .preprocess import CAM_SMOOTHING_CELLS, smooth_maps
from .metrics import (
    classification_summary,
    confusion_matrix,
    format_classification_table,
    format_localization_table,
    localization_summary,
    report_scopes,
)

__all__ = ["EvalResult", "Localisation", "evaluate_cache", "write_report", "localise", "plot_confusion"]

PathLike = Union[str, os.PathLike]


@dataclass
class EvalResult:
    case_id: np.ndarray  # (N,) str
    group: np.ndarray  # (N,) str
    slice_index: np.ndarray  # k in the axial frame
    input_slice_index: np.ndarray  # k in the volume as stored (-1: stored axis not axial)
    labels: np.ndarray
    predicted: np.ndarray
    probabilities: np.ndarray  # (N, classes)
    hit: np.ndarray  # (N,) pointing game with the predicted-class CAM (False where not a lesion slice)
    iou: np.ndarray  # (N,) NaN where not a lesion slice
    hit_true: np.ndarray  # the same with the true-class CAM
    iou_true: np.ndarray
    peak_ij: np.ndarray  # (N, 2) (i, j) in the axial frame's slice (= the stored slice when not reoriented); -1 where no heatmap
    scored: np.ndarray  # (N,) lesion slices with a lesion outline (localization is scored on these)
    centre_hit: np.ndarray  # (N,) hot-spot centre of the predicted-class CAM inside the dilated lesion
    cam_threshold: float = 0.5
    cam_smoothing: float = 0.0  # Gaussian sigma of the heatmap in cells of the model's map (`preprocess.smooth_maps`)
    normal_offset: float = 0.0  # the decision rule's normal-logit offset (`decision`; 0: the network's argmax)
    slice_context_mm: float = 0.0  # the decision rule's slice context (`decision`; 0: each slice alone)
    z_mm: Optional[np.ndarray] = None  # (N,) position along the axial frame's slice axis (slice index x spacing)
    patient_id: Optional[np.ndarray] = None  # (N,) str; None: each case its own patient
    subgroup: Optional[np.ndarray] = None  # (N,) str, "" where none (e.g. a phantom's "hard" / "regular")
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def patients(self) -> np.ndarray:
        return self.case_id if self.patient_id is None else self.patient_id

    def text(self) -> str:
        parts = []
        for scope, s in [("all", self.summary["all"])] + sorted(self.summary.get("groups", {}).items()):
            cases = s["n_cases"]
            parts.append(format_classification_table(s["classification"], title=f"== {scope} ({cases} cases) =="))
            parts.append(format_localization_table(s["localization"]))
            if s.get("interval"):
                parts.append(format_interval(s["interval"]))
        return "\n".join(parts)

    def card_metrics(self) -> dict[str, Any]:
        """The compact figures a model card records."""

        def compact(s: dict[str, Any]) -> dict[str, Any]:
            c = s["classification"]
            return {
                "cases": s["n_cases"],
                "slices": c["n"],
                "accuracy": c["accuracy"],
                "macro_f1": c["macro_f1"],
                "macro_precision": c["macro_precision"],
                "macro_recall": c["macro_recall"],
                "class_accuracy": {k: v["accuracy"] for k, v in c["per_class"].items()},
                "pointing": {k: s["localization"][k]["pointing"] for k in LESION_CLASSES},
                "hot_spot_centre": {k: s["localization"][k].get("centre") for k in LESION_CLASSES},
                "cam_iou": {k: s["localization"][k]["iou"] for k in LESION_CLASSES},
                "pointing_true_class_cam": {k: s["localization_true_class"][k]["pointing"] for k in LESION_CLASSES},
                **({"interval": _compact_interval(s["interval"])} if s.get("interval") else {}),
            }

        out = {"all": compact(self.summary["all"])}
        for g, s in self.summary.get("groups", {}).items():
            out[g] = compact(s)
        return out


class Localisation(NamedTuple):
    hit: bool  # the peak inside the dilated lesion
    iou: float  # the >= threshold region against the lesion
    peak: tuple[int, int]  # (row, col) of the peak in the box; (-1, -1) when the heatmap is empty
    centre_hit: bool  # the heat-weighted centre of the peak's >= threshold region inside the dilated lesion


def localise(cam: torch.Tensor, masks: np.ndarray, threshold: float, smoothing: float = 0.0) -> Localisation:
    """Score one CAM (h, w) against one slice's (liver, lesion, dilated lesion) masks in its crop box,
    upsampled and smoothed (`smoothing` cells) as `classify` makes its heatmap."""
    liver = torch.from_numpy(masks[0].astype(np.float32))
    up = F.interpolate(cam[None, None].float().cpu(), size=tuple(liver.shape), mode="bilinear", align_corners=False)[0]
    up = smooth_maps(up, tuple(cam.shape), smoothing)[0]
    heat = up.clamp(min=0) * liver
    top = float(heat.max())
    core = masks[1] > 0
    if top <= 0 or not np.isfinite(top):
        return Localisation(False, 0.0, (-1, -1), False)
    heat = (heat / top).numpy()
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    region = (heat >= threshold) & (masks[0] > 0)
    union = np.logical_or(region, core).sum()
    iou = float(np.logical_and(region, core).sum() / union) if union else 0.0
    parts, _ = ndimage.label(region)
    cr, cc = ndimage.center_of_mass(np.where(parts == parts[r, c], heat, 0.0))
    centre_hit = bool(masks[2][int(round(cr)), int(round(cc))] > 0)
    return Localisation(bool(masks[2][r, c] > 0), iou, (int(r), int(c)), centre_hit)


def evaluate_cache(
    model: torch.nn.Module,
    cache: SliceCache,
    indices: Optional[np.ndarray] = None,
    *,
    device: Union[str, torch.device] = "cpu",
    amp_dtype: Optional[torch.dtype] = None,
    batch_size: int = 64,
    cam_threshold: float = 0.5,
    cam_smoothing: float = CAM_SMOOTHING_CELLS,
    normal_offset: float = 0.0,
    slice_context_mm: float = 0.0,
    progress: Optional[Callable[[int, int], None]] = None,
) -> EvalResult:
    """Classify and localise the cache's slices at `indices` (default: all), deciding each slice's
    class with the normal-logit offset and slice context (`decision`), as `classify` does with the card's.

    The context reaches over the cache's slices of each case; a cache keeps no excluded slices
    (lesion poles), so there it spans a gap that `classify`, which sees every liver slice, fills."""
    device = torch.device(device)
    idx = np.arange(len(cache)) if indices is None else np.asarray(indices, dtype=np.int64)
    model = model.to(device).eval()
    channels_last = uses_channels_last(device, amp_dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cam = GradCAM(model, amp_dtype, normal_offset=normal_offset)
    n = idx.size
    probs = np.zeros((n, len(CLASS_NAMES)), np.float32)
    hit = np.zeros(n, bool)
    hit_true = np.zeros(n, bool)
    iou = np.full(n, np.nan)
    iou_true = np.full(n, np.nan)
    peak = np.full((n, 2), -1, np.int64)
    scored = np.zeros(n, bool)
    centre_hit = np.zeros(n, bool)
    labels = cache.labels[idx]
    case_of = cache.case[idx]
    z_mm = cache.z_mm(idx)

    def images(rows: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(cache.images[idx[rows]])).to(device).float().div_(255.0)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def score(rows: np.ndarray, pred: np.ndarray, out) -> None:
        """Localisation of the lesion slices among `rows` by `out`, the maps of their classes `pred`
        (None where every class in `pred` is normal)."""
        for r, row in enumerate(rows):
            masks = cache.masks.get(int(idx[row])) if labels[row] > 0 else None
            if masks is None:  # a normal slice, or labelled from a table: no lesion outline to score against
                continue
            scored[row] = True
            box = cache.cases[int(case_of[row])]["box"]
            hit[row], centre_hit[row], peak[row] = False, False, (-1, -1)
            if pred[r] != 0:
                h, v, (pr, pc), ch = localise(out.cams[r], masks, cam_threshold, cam_smoothing)
                hit[row], iou[row], centre_hit[row] = h, v, ch
                if pr >= 0:
                    peak[row] = (box[2] + pc, box[0] + pr)
            else:
                iou[row] = 0.0

    for s in range(0, n, batch_size):
        rows = np.arange(s, min(n, s + batch_size))
        x = images(rows)
        out = cam(x)
        probs[rows] = out.probabilities.cpu().numpy()
        score(rows, out.target.cpu().numpy(), out)
        lesion_rows = np.flatnonzero(labels[rows] > 0)
        if lesion_rows.size:
            true_out = cam(x[torch.from_numpy(lesion_rows).to(device)], target=torch.from_numpy(labels[rows][lesion_rows]))
        for pos, r in enumerate(lesion_rows):
            masks = cache.masks.get(int(idx[rows[r]]))
            if masks is not None:
                h, v, _, _ = localise(true_out.cams[pos], masks, cam_threshold, cam_smoothing)
                hit_true[rows[r]], iou_true[rows[r]] = h, v
        if progress is not None:
            progress(int(rows[-1]) + 1, n)
    if slice_context_mm > 0 and n:
        before = probs.argmax(axis=1)
        probs = decide(adjust_probabilities(probs, -normal_offset), normal_offset, slice_context_mm, z_mm, case_of).astype(np.float32)
        after = probs.argmax(axis=1)
        changed = np.flatnonzero((before != after) & (labels > 0))
        now_normal, redo = changed[after[changed] == 0], changed[after[changed] != 0]
        score(now_normal, after[now_normal], None)  # a slice called normal is a miss: no map needed
        for s in range(0, redo.size, batch_size):
            rows = redo[s : s + batch_size]
            score(rows, after[rows], cam(images(rows), target=torch.from_numpy(after[rows])))
    result = EvalResult(
        case_id=np.array([cache.cases[c]["case_id"] for c in case_of], dtype=object),
        group=np.array([cache.cases[c]["group"] or "" for c in case_of], dtype=object),
        slice_index=cache.slice_index[idx].copy(),
        input_slice_index=cache.input_slice_index[idx].copy(),
        labels=labels.copy(),
        predicted=probs.argmax(1),
        probabilities=probs,
        hit=hit,
        iou=iou,
        hit_true=hit_true,
        iou_true=iou_true,
        peak_ij=peak,
        scored=scored,
        centre_hit=centre_hit,
        cam_threshold=cam_threshold,
        cam_smoothing=float(cam_smoothing),
        normal_offset=float(normal_offset),
        slice_context_mm=float(slice_context_mm),
        z_mm=z_mm,
        patient_id=np.array([cache.cases[c].get("patient_id") or cache.cases[c]["case_id"] for c in case_of], dtype=object),
        subgroup=np.array([cache.cases[c].get("subgroup") or "" for c in case_of], dtype=object),
    )
    result.summary = summarise(result)
    return result


def _compact_interval(ci: dict[str, Any]) -> dict[str, Any]:
    """The card's copy of an interval: the bounds and what they are."""
    keep = ("level", "patients", "accuracy", "macro_f1", "class_accuracy", "pointing")
    return {k: ci[k] for k in keep}


def _scope_summary(r: EvalResult, sel: np.ndarray) -> dict[str, Any]:
    lab = r.labels[sel]
    cm = confusion_matrix(lab, r.predicted[sel])
    lab_loc = np.where(r.scored[sel], lab, -1)  # slices without an outline are not scored
    iou = np.nan_to_num(r.iou[sel], nan=0.0)
    iou_t = np.nan_to_num(r.iou_true[sel], nan=0.0)
    return {
        "n_cases": int(len(set(r.case_id[sel].tolist()))),
        "classification": classification_summary(cm),
        "localization": localization_summary(lab_loc, r.hit[sel], iou, centre_hits=r.centre_hit[sel]),
        "localization_true_class": localization_summary(lab_loc, r.hit_true[sel], iou_t),
        "interval": patient_bootstrap(r.patients[sel], lab, r.predicted[sel], r.hit[sel], r.scored[sel]),
    }


def summarise(r: EvalResult) -> dict[str, Any]:
    out: dict[str, Any] = {"all": _scope_summary(r, np.ones(r.labels.size, bool)), "cam_threshold": r.cam_threshold,
                           "cam_smoothing_cells": r.cam_smoothing, "normal_logit_offset": r.normal_offset,
                           "slice_context_mm": r.slice_context_mm,
                           "definitions": {
                               "class accuracy": "recall of the class: correct slices of the class / slices of the class",
                               "pointing": "CAM peak of the predicted class inside the lesion dilated by 2 voxels in-plane, "
                                           "over all slices of the class (predicted normal = miss)",
                               "cam_iou": f"IoU of the CAM region >= {r.cam_threshold} of its maximum (inside the liver) with the lesion",
                               "centre": f"heat-weighted centre of the peak's CAM region >= {r.cam_threshold} of its maximum inside "
                                         "the lesion dilated by 2 voxels in-plane (predicted class; predicted normal = miss)",
                               "macro": "unweighted mean over the classes present in the ground truth",
                               "normal_logit_offset": "added to the normal class's logit before the class is decided (prior "
                                                      "correction, chosen on validation data; 0: the network's own argmax); "
                                                      "the probabilities in slices.csv are those after it",
                               "slice_context_mm": "sigma along the slice axis of the Gaussian average of each slice's log-probabilities "
                                                   "over its case's slices, taken before the offset (0: each slice alone)",
                               "interval": "percentile interval over resamples of the patients (with replacement, all slices of a "
                                           "patient together; level and count in each scope's interval); none with fewer than two patients",
                           }}
    unscored = int(((r.labels > 0) & ~r.scored).sum())
    if unscored:
        out["note"] = f"{unscored} lesion slices have no lesion outline (slice-label tables): their localization is not scored"
    subgroup = r.subgroup if r.subgroup is not None else np.full(r.group.shape, "", dtype=object)
    scopes = {name: _scope_summary(r, sel) for name, sel in report_scopes(r.group, subgroup).items()}
    if scopes:
        out["groups"] = scopes
    return out


def plot_confusion(cm: np.ndarray, path: Path, title: str = "") -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, np.maximum(rows, 1))
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n{frac[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (row-normalised colour)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metric_rows(scope: str, s: dict[str, Any]) -> list[dict[str, Any]]:
    c = s["classification"]
    ci = s.get("interval") or {}

    def bounds(v: Optional[list[float]]) -> dict[str, Any]:
        return {"ci_low": v[0], "ci_high": v[1]} if v else {}

    rows = [{"scope": scope, "class": "all", "metric": m, "value": c[m], **bounds(ci.get(m))}
            for m in ("accuracy", "macro_f1", "macro_precision", "macro_recall")]
    rows.append({"scope": scope, "class": "all", "metric": "slices", "value": c["n"]})
    rows.append({"scope": scope, "class": "all", "metric": "cases", "value": s["n_cases"]})
    for name, v in c["per_class"].items():
        for m in ("accuracy", "precision", "recall", "f1", "support"):
            extra = bounds(ci.get("class_accuracy", {}).get(name)) if m == "accuracy" else {}
            rows.append({"scope": scope, "class": name, "metric": m, "value": v[m], **extra})
    for key, prefix in (("localization", ""), ("localization_true_class", "true_class_")):
        for name in LESION_CLASSES:
            extra = bounds(ci.get("pointing", {}).get(name)) if key == "localization" else {}
            rows.append({"scope": scope, "class": name, "metric": f"{prefix}pointing", "value": s[key][name]["pointing"], **extra})
            rows.append({"scope": scope, "class": name, "metric": f"{prefix}cam_iou", "value": s[key][name]["iou"]})
            if "centre" in s[key][name]:
                rows.append({"scope": scope, "class": name, "metric": f"{prefix}hot_spot_centre", "value": s[key][name]["centre"]})
    return rows


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)


def write_report(result: EvalResult, out_dir: PathLike, title: str = "") -> Path:
    """metrics.json, metrics.csv (scope, class, metric, value, ci_low, ci_high), slices.csv, confusion*.png, report.txt."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"title": title, **result.summary}, indent=2))
    rows = _metric_rows("all", result.summary["all"])
    for g, s in result.summary.get("groups", {}).items():
        rows += _metric_rows(g, s)
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["scope", "class", "metric", "value", "ci_low", "ci_high"])
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with open(out / "slices.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "group", "slice_index", "axial_frame_slice_index", "label", "predicted", *(f"p_{c}" for c in CLASS_NAMES),
                    "pointing_hit", "cam_iou", "pointing_hit_true_class", "axial_frame_cam_peak_i", "axial_frame_cam_peak_j",
                    "hot_spot_centre_hit", "patient_id", "subgroup", "axial_frame_z_mm"])
        patients = result.patients
        for n in range(result.labels.size):
            lesion = bool(result.scored[n])
            w.writerow([
                result.case_id[n], result.group[n], int(result.input_slice_index[n]) if result.input_slice_index[n] >= 0 else "",
                int(result.slice_index[n]), CLASS_NAMES[result.labels[n]],
                CLASS_NAMES[result.predicted[n]], *(f"{p:.5f}" for p in result.probabilities[n]),
                int(result.hit[n]) if lesion else "", f"{result.iou[n]:.4f}" if lesion and np.isfinite(result.iou[n]) else "",
                int(result.hit_true[n]) if lesion else "",
                int(result.peak_ij[n, 0]) if result.peak_ij[n, 0] >= 0 else "", int(result.peak_ij[n, 1]) if result.peak_ij[n, 1] >= 0 else "",
                int(result.centre_hit[n]) if lesion else "",
                patients[n], "" if result.subgroup is None else result.subgroup[n],
                f"{result.z_mm[n]:.3f}" if result.z_mm is not None else "",
            ])
    plot_confusion(np.array(result.summary["all"]["classification"]["confusion_matrix"]), out / "confusion.png",
                   f"{title} (all)" if title else "")
    for g, s in result.summary.get("groups", {}).items():
        plot_confusion(np.array(s["classification"]["confusion_matrix"]), out / f"confusion_{_safe(g)}.png", f"{title} ({g})" if title else g)
    (out / "report.txt").write_text(((title + "\n") if title else "") + result.text() + "\n")
    return out
