"""Plausibility checks of a liver mask and mask-agreement measures.

`check_liver_mask` is the safety net for both an automatic mask and a user's: it does not decide,
it reports numbers a reader can judge and one-line warnings where they look wrong.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .volume import Volume

__all__ = ["check_liver_mask", "summary_line", "bounding_box", "dice", "surface_distance_hd95", "NORMAL_ADULT_ML"]

# Normal adult liver volume (ml); livers outside it exist (small women, hepatomegaly) hence warnings only.
NORMAL_ADULT_ML = (800.0, 2500.0)


def _si_axis(vol: Volume) -> int:
    """Array axis (0=k, 1=j, 2=i) closest to the patient's superior-inferior direction."""
    ijk = int(np.argmax(np.abs(np.asarray(vol.direction)[2, :])))
    return 2 - ijk


def _lps_points(vol: Volume, kji: np.ndarray) -> np.ndarray:
    """(n,3) array indices [k,j,i] -> (n,3) LPS mm."""
    ijk = kji[:, ::-1].astype(np.float64)
    m = vol.ijk_to_lps_matrix()
    return ijk @ m[:3, :3].T + m[:3, 3]


def bounding_box(m: np.ndarray, pad: tuple[int, int, int] = (0, 0, 0)) -> tuple[slice, slice, slice]:
    """Slices of the smallest box holding every True voxel of a non-empty 3D mask, grown by pad[axis]
    voxels and clipped to the array; each axis is projected once, no voxel list is made."""
    box = []
    for axis, other in enumerate(((1, 2), (0, 2), (0, 1))):
        hit = np.flatnonzero(m.any(axis=other))
        box.append(slice(max(0, int(hit[0]) - pad[axis]), min(m.shape[axis], int(hit[-1]) + 1 + pad[axis])))
    return tuple(box)


def check_liver_mask(mask: Volume, ct: Volume | None = None) -> dict:
    """Volume, connectedness, side and intensity of a liver mask, with warnings where implausible.

    The body centre (for "patient right") is the centroid of the body (HU > -400) when `ct` is given,
    else the centre of the field of view; both are compared in LPS x, which increases to the left.
    """
    m = np.asarray(mask.array) > 0
    n = int(m.sum())
    warnings: list[str] = []
    vol_ml = n * mask.voxel_volume_ml
    out = {
        "volume_ml": float(round(vol_ml, 1)),
        "components": 0,
        "largest_component_fraction": 0.0,
        "on_patient_right": False,
        "touches_volume_edge": False,
        "mean_hu": None,
        "warnings": warnings,
    }
    if ct is not None:
        ct.require_same_geometry(mask, "liver mask")
    if n == 0:
        warnings.append("the liver mask is empty")
        return out

    # the work is done on the mask's bounding box: the same components, a fraction of the voxels
    box = bounding_box(m)
    mb = m[box]
    lab, ncomp = ndi.label(mb, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(lab.ravel())[1:]
    out["components"] = int(ncomp)
    out["largest_component_fraction"] = float(round(sizes.max() / n, 4))

    ax = _si_axis(mask)
    first = np.take(m, 0, axis=ax).any()
    last = np.take(m, m.shape[ax] - 1, axis=ax).any()
    touches = bool(first or last)
    out["touches_volume_edge"] = touches

    # side: centroid of the mask vs body (or field of view) centre, in LPS x; index to LPS is
    # affine, so the centroid's position is the position of the mean index
    mean_kji = [float(np.dot(np.arange(sl.start, sl.stop), mb.sum(axis=other))) / n
                for sl, other in zip(box, ((1, 2), (0, 2), (0, 1)))]
    cx = float(_lps_points(mask, np.array([mean_kji]))[0, 0])
    if ct is not None:
        body = np.asarray(ct.array)[::2, ::4, ::4] > -400
        bidx = np.argwhere(body) * np.array([2, 4, 4])
        centre_x = float(_lps_points(ct, bidx)[:, 0].mean()) if bidx.size else None
    else:
        centre_x = None
    if centre_x is None:
        centre = (np.array(mask.shape) - 1) / 2.0
        centre_x = float(_lps_points(mask, centre[None, :])[0, 0])
    out["on_patient_right"] = bool(cx < centre_x)

    if ct is not None:
        out["mean_hu"] = float(round(float(np.asarray(ct.array)[box][mb].mean()), 1))

    lo, hi = NORMAL_ADULT_ML
    if vol_ml < lo:
        if touches:
            warnings.append(
                f"liver volume {vol_ml:.0f} ml is below the normal adult range ({lo:.0f}-{hi:.0f} ml), "
                "but the mask reaches the first or last slice: the scan probably does not cover the whole liver"
            )
        else:
            warnings.append(
                f"liver volume {vol_ml:.0f} ml is below the normal adult range ({lo:.0f}-{hi:.0f} ml) "
                "although the whole liver is in the scan: check the mask"
            )
    elif vol_ml > hi:
        warnings.append(
            f"liver volume {vol_ml:.0f} ml is above the normal adult range ({lo:.0f}-{hi:.0f} ml): "
            "hepatomegaly, or the mask leaks into neighbouring organs"
        )
    if ncomp > 1 and out["largest_component_fraction"] < 0.9:
        warnings.append(
            f"the mask has {ncomp} separate parts and the largest holds only "
            f"{100 * out['largest_component_fraction']:.0f}%: a liver is one connected organ"
        )
    if not out["on_patient_right"]:
        warnings.append("the mask's centre lies on the patient's left: the liver lies on the right (situs inversus?)")
    if out["mean_hu"] is not None and not (0.0 <= out["mean_hu"] <= 200.0):
        warnings.append(
            f"mean intensity in the mask is {out['mean_hu']:.0f} HU, outside 0-200 HU expected for liver "
            "(very fatty liver, or not the liver)"
        )
    return out


def summary_line(info: dict) -> str:
    """One line for logs and the CLI."""
    hu = "" if info.get("mean_hu") is None else f", mean {info['mean_hu']:.0f} HU"
    side = "patient right" if info.get("on_patient_right") else "patient LEFT"
    edge = ", reaches the scan's first/last slice" if info.get("touches_volume_edge") else ""
    line = (
        f"liver mask: {info['volume_ml']:.0f} ml, {info['components']} component(s) "
        f"(largest {100 * info['largest_component_fraction']:.0f}%), {side}{hu}{edge}"
    )
    if info.get("warnings"):
        line += "; WARNING: " + " | ".join(info["warnings"])
    return line


# --------------------------------------------------------------------------------------------
# agreement measures (used by the accuracy benchmark and the tests)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a) > 0
    b = np.asarray(b) > 0
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2.0 * np.logical_and(a, b).sum() / s)


def _surface(m: np.ndarray) -> np.ndarray:
    # in-volume border voxels; the scan's own edge is not a surface of the organ
    er = ndi.binary_erosion(np.pad(m, 1, mode="edge"))[1:-1, 1:-1, 1:-1]
    return m & ~er


def surface_distance_hd95(a: np.ndarray, b: np.ndarray, spacing_kji) -> float:
    """Symmetric 95th percentile surface distance in mm (arrays [k,j,i], spacing in the same order)."""
    a = np.asarray(a) > 0
    b = np.asarray(b) > 0
    if not a.any() or not b.any():
        return float("inf")
    sa, sb = _surface(a), _surface(b)
    if not sa.any() or not sb.any():
        return 0.0
    da = ndi.distance_transform_edt(~sb, sampling=spacing_kji)[sa]
    db = ndi.distance_transform_edt(~sa, sampling=spacing_kji)[sb]
    return float(np.percentile(np.concatenate([da, db]), 95))
