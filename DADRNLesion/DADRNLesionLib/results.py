"""What one pipeline run produces, as plain data shared by the CLI writer, `scene.py` and tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from .classes import CLASS_NAMES, LABEL_BY_KEY, LESION_CLASSES
from .volume import Volume

SLICE_CSV_COLUMNS: tuple[str, ...] = (
    "slice_index",
    "z_mm",
    "predicted_class",
    *(f"p_{name}" for name in CLASS_NAMES),
    "cam_peak_i",
    "cam_peak_j",
)


@dataclass
class SliceResult:
    """One classified liver slice. Indices are those of the input array (k, and i/j in-plane)."""

    slice_index: int
    z_mm: float
    predicted_class: str
    probabilities: np.ndarray  # (NUM_CLASSES,), in CLASS_NAMES order
    cam_peak_ij: Optional[tuple[int, int]] = None  # (column i, row j); None for normal slices

    @property
    def is_lesion(self) -> bool:
        return self.predicted_class != "normal"

    def as_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "slice_index": int(self.slice_index),
            "z_mm": round(float(self.z_mm), 3),
            "predicted_class": self.predicted_class,
        }
        for name, p in zip(CLASS_NAMES, self.probabilities):
            row[f"p_{name}"] = round(float(p), 6)
        row["cam_peak_i"] = "" if self.cam_peak_ij is None else int(self.cam_peak_ij[0])
        row["cam_peak_j"] = "" if self.cam_peak_ij is None else int(self.cam_peak_ij[1])
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "SliceResult":
        peak = None
        if str(row.get("cam_peak_i", "")).strip() not in ("", "None"):
            peak = (int(row["cam_peak_i"]), int(row["cam_peak_j"]))
        return cls(
            slice_index=int(row["slice_index"]),
            z_mm=float(row["z_mm"]),
            predicted_class=str(row["predicted_class"]),
            probabilities=np.array([float(row[f"p_{n}"]) for n in CLASS_NAMES], dtype=np.float32),
            cam_peak_ij=peak,
        )


@dataclass
class PipelineResult:
    """Every array lies on the input volume's geometry."""

    liver: Volume  # uint8, 0/1
    heatmap: Volume  # float32, 0..1
    labelmap: Volume  # uint8, classes.LABELS values
    slices: list[SliceResult] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def lesion_slices(self) -> list[SliceResult]:
        return [s for s in self.slices if s.is_lesion]


def study_summary(results: Sequence[SliceResult]) -> dict[str, Any]:
    """The study in one line, without hiding disagreement between slices.

    The dominant class is the lesion class called on most slices (ties: the larger summed
    probability). When other lesion classes were called too, the finding says how many slices each
    got: a study whose lesion slices split between FNH and HCC must not read as a confident FNH.
    `regions` are the runs of consecutive lesion slices (whatever their class), for navigation."""
    counts = {c: 0 for c in LESION_CLASSES}
    for s in results:
        if s.is_lesion:
            counts[s.predicted_class] += 1
    n_lesion = sum(counts.values())
    if n_lesion == 0:
        return {"finding": "no lesion slices", "dominant_class": None, "slices": [], "class_counts": counts, "regions": []}

    summed = {c: sum(float(s.probabilities[CLASS_NAMES.index(c)]) for s in results) for c in LESION_CLASSES}
    dominant = max(LESION_CLASSES, key=lambda c: (counts[c], summed[c]))
    name = LABEL_BY_KEY[dominant].name
    others = sorted((c for c in LESION_CLASSES if c != dominant and counts[c]), key=lambda c: (-counts[c], -summed[c]))
    if others:
        also = ", ".join(f"{LABEL_BY_KEY[c].name} {counts[c]}" for c in others)
        finding = f"{name} on {counts[dominant]} of {n_lesion} lesion slices (also {also})"
    else:
        finding = f"{name} on {counts[dominant]} slice(s)"
    regions: list[dict[str, Any]] = []
    for s in sorted((s for s in results if s.is_lesion), key=lambda s: s.slice_index):
        if regions and s.slice_index == regions[-1]["last_slice"] + 1:
            r = regions[-1]
            r["last_slice"] = s.slice_index
        else:
            r = {"first_slice": s.slice_index, "last_slice": s.slice_index, "class_counts": {}}
            regions.append(r)
        r["class_counts"][s.predicted_class] = r["class_counts"].get(s.predicted_class, 0) + 1
    return {
        "finding": finding,
        "dominant_class": dominant,
        "slices": [s.slice_index for s in results if s.predicted_class == dominant],
        "mean_probability": float(np.mean([s.probabilities[CLASS_NAMES.index(dominant)] for s in results if s.predicted_class == dominant])),
        "class_counts": counts,
        "regions": regions,
    }
