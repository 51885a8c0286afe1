"""A voxel array with its physical geometry, independent of any imaging library.

The engine passes `Volume` objects between stages so that no stage needs SimpleITK, VTK or
MRML. Conventions (the same as ITK/DICOM/NIfTI readers, so the readers convert losslessly):

* ``array`` is indexed ``[k, j, i]`` (slice, row, column), as SimpleITK and MRML return arrays;
* ``spacing`` and ``origin`` are ``(i, j, k)`` / ``(x, y, z)`` in millimetres;
* ``origin`` and ``direction`` are in LPS patient coordinates; the columns of ``direction`` are
  the unit vectors of the i, j and k axes. Slicer's RAS is LPS with x and y negated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import UserInputError

__all__ = ["Volume", "GeometryMismatchError"]


class GeometryMismatchError(UserInputError):
    """Two volumes that must share a voxel grid do not."""


@dataclass
class Volume:
    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if len(self.spacing) != 3 or len(self.origin) != 3:
            raise ValueError("spacing and origin must have three components (i, j, k)")

    # -- geometry -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (k, j, i)."""
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        k, j, i = self.array.shape
        return (i, j, k)

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def ijk_to_lps_matrix(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (i, j, k, 1) to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras_matrix(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) to RAS millimetres, as MRML's IJKToRAS."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.ijk_to_lps_matrix()

    def same_geometry(self, other: "Volume", tol: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol, rtol=tol)
            and np.allclose(self.origin, other.origin, atol=max(tol, 1e-3))
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def require_same_geometry(self, other: "Volume", what: str = "mask") -> None:
        if self.same_geometry(other):
            return
        raise GeometryMismatchError(
            f"the {what} does not lie on the image's voxel grid "
            f"(image size {self.size_ijk}, spacing {_fmt(self.spacing)}, origin {_fmt(self.origin)}; "
            f"{what} size {other.size_ijk}, spacing {_fmt(other.spacing)}, origin {_fmt(other.origin)}): "
            f"resample the {what} onto the image first, or let the tool segment the liver itself"
        )

    def with_array(self, array: np.ndarray) -> "Volume":
        """A new volume on this geometry holding `array` (same shape required)."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {array.shape} differs from volume shape {self.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy())

    def slice_positions_mm(self) -> np.ndarray:
        """Signed position of each k slice along the volume's k axis (LPS z for axial volumes)."""
        k = np.arange(self.shape[0], dtype=np.float64)
        centre = np.asarray(self.origin)[None, :] + (k[:, None] * self.spacing[2]) * self.direction[:, 2][None, :]
        return centre[:, 2]


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
