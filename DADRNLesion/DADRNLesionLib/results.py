"""What one pipeline run produces, as plain data shared by the CLI writer, `scene.py` and tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .classes import CLASS_NAMES
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
