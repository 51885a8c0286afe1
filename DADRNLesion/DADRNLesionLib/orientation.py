"""Lossless reorientation to the axial frame the model was trained in, and back.

The model expects slices in radiological view: k from inferior to superior, rows from anterior to
posterior, columns from the patient's right to left (LPS-aligned axes). A volume stored in any
other axis order or sign is permuted and flipped (no interpolation), processed, and every output
array is mapped back exactly. Oblique volumes use the nearest axis permutation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .volume import Volume

__all__ = ["AxialFrame", "to_axial_frame"]


@dataclass(frozen=True)
class AxialFrame:
    """How the input array's axes map onto the canonical (k, j, i) = (S, P, L) array axes."""

    # perm[c] = input array axis that becomes canonical array axis c; flip[c]: reverse it.
    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    input_shape: tuple[int, int, int]
    obliquity_deg: float = 0.0  # largest angle between an array axis and its nearest patient axis

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    @property
    def slice_axis_is_axial(self) -> bool:
        """True when the input's k axis already runs along S-I (only signs may differ)."""
        return self.perm[0] == 0

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, self.perm)
        for axis, f in enumerate(self.flip):
            if f:
                out = np.flip(out, axis=axis)
        return out

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        out = array
        for axis, f in enumerate(self.flip):
            if f:
                out = np.flip(out, axis=axis)
        return np.ascontiguousarray(np.transpose(out, np.argsort(self.perm)))

    def canonical_index_to_input(self, k: int, j: int, i: int) -> tuple[int, int, int]:
        """Map a canonical (k, j, i) index back to the input array's (k, j, i) index."""
        canonical = [k, j, i]
        canonical_shape = [self.input_shape[p] for p in self.perm]
        out = [0, 0, 0]
        for c, axis in enumerate(self.perm):
            v = canonical[c]
            out[axis] = canonical_shape[c] - 1 - v if self.flip[c] else v
        return tuple(out)  # type: ignore[return-value]

    def describe(self) -> str:
        oblique = (
            f"; oblique by up to {self.obliquity_deg:.1f} degrees, processed in its nearest axis order without resampling"
            if self.obliquity_deg > 0.5 else ""
        )
        if self.is_identity:
            return f"stored axial (LPS-aligned); no reorientation{oblique}"
        what = "axes flipped" if self.slice_axis_is_axial else "stored axis is not axial; axes permuted"
        return f"{what} to the axial frame without interpolation (permutation {self.perm}, flips {self.flip}), results mapped back{oblique}"


def to_axial_frame(volume: Volume) -> tuple[Volume, AxialFrame]:
    """The volume as a canonical axial array (a view where possible) and the mapping back."""
    d = volume.direction
    # Array axis a (0=k, 1=j, 2=i) runs along direction column (2 - a).
    dominant = [int(np.argmax(np.abs(d[:, 2 - a]))) for a in range(3)]  # LPS axis of each array axis
    if len(set(dominant)) != 3:  # degenerate (e.g. 45-degree oblique): fall back to a greedy choice
        dominant, used = [], set()
        for a in range(3):
            order = np.argsort(-np.abs(d[:, 2 - a]))
            pick = next(int(o) for o in order if int(o) not in used)
            used.add(pick)
            dominant.append(pick)
    # Canonical array axis c holds LPS axis (2 - c): k<-S(2), j<-P(1), i<-L(0).
    perm = tuple(dominant.index(2 - c) for c in range(3))
    flip = tuple(bool(d[2 - c, 2 - perm[c]] < 0) for c in range(3))
    cosines = [abs(d[2 - c, 2 - perm[c]]) / max(np.linalg.norm(d[:, 2 - perm[c]]), 1e-12) for c in range(3)]
    obliquity = float(np.degrees(np.arccos(np.clip(min(cosines), -1.0, 1.0))))
    frame = AxialFrame(perm, flip, volume.shape, obliquity)  # type: ignore[arg-type]
    if frame.is_identity:
        return volume, frame
    array = frame.to_canonical(volume.array)
    # New geometry: canonical axis c = input axis perm[c], maybe reversed.
    spacing_in = volume.spacing  # (i, j, k)
    spacing = tuple(spacing_in[2 - frame.perm[2 - x]] for x in range(3))  # x: 0=i,1=j,2=k canonical
    direction = np.zeros((3, 3))
    origin = np.asarray(volume.origin, dtype=np.float64).copy()
    for x in range(3):
        c = 2 - x  # canonical array axis of canonical spatial index x
        a = frame.perm[c]  # input array axis
        col = volume.direction[:, 2 - a].copy()
        if frame.flip[c]:
            origin = origin + col * spacing_in[2 - a] * (volume.shape[a] - 1)
            col = -col
        direction[:, x] = col
    return Volume(np.ascontiguousarray(array), spacing, tuple(origin), direction), frame
