"""Arterial-phase appearance models of the four focal liver lesion classes.

Shared by the phantom generator and by `phantom.insert_lesions` (lesions painted into real scans),
so a lesion looks the same whatever anatomy surrounds it. Contrast is always set relative to the
host scan: `parenchyma_hu` (the liver's own median) and `aorta_hu` (arterial blood) are inputs.

What each class looks like in the late arterial phase, and how it is drawn:

* cyst - water density (0-20 HU), sharp margin, no enhancement, round or oval;
* hemangioma - hypodense centre with discontinuous peripheral nodules near aortic density;
  small ones sometimes fill at once ("flash filling"), a deliberate look-alike of FNH/HCC;
* HCC - heterogeneous (mosaic) hyperenhancement, sometimes a necrotic centre, a thin capsule rim
  or intratumoural arteries; "hard" ones are faint and homogeneous, like an FNH;
* FNH - homogeneous, bright, lobulated; a stellate hypodense central scar when larger than 30 mm.

Coordinates are the array-aligned frame: millimetres along i, j, k (index x spacing), so the
same code serves any volume whose direction matrix is orthonormal. Partial volume comes from a
soft occupancy: a linear ramp across the voxel footprint (pixel size in-plane, slice thickness
along k) in the direction of the surface normal, which is what box-averaging a smooth surface
over a voxel gives to first order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .classes import LESION_CLASSES

__all__ = ["LesionSpec", "draw_lesion", "render_lesion", "draw_diameter"]


@dataclass
class LesionSpec:
    lesion_class: str
    centre_mm: np.ndarray  # (i, j, k) millimetres in the array-aligned frame
    diameter_mm: float  # nominal: twice the mean radius before lobulation
    rotation: np.ndarray  # 3x3, columns = lesion axes in the array frame
    axes: np.ndarray  # relative semi-axes, geometric mean 1
    lobe_dirs: np.ndarray  # (n, 3) unit vectors in the lesion frame
    lobe_amp: np.ndarray  # (n,) relative bump heights
    lobe_kappa: np.ndarray  # (n,) bump sharpness
    params: dict = field(default_factory=dict)  # class-specific HU and sub-structure parameters
    hard_reasons: list = field(default_factory=list)

    @property
    def radius_mm(self) -> float:
        return 0.5 * self.diameter_mm

    @property
    def extent_mm(self) -> float:
        """A radius that contains the whole lesion, lobes and oval axes included."""
        return self.radius_mm * float(self.axes.max()) * (1.0 + float(self.lobe_amp.sum()) + 0.05) + 1.0


def draw_diameter(rng: np.random.Generator, lesion_class: str, small: bool = False) -> float:
    """Lesion diameter in mm, 5-60: log-uniform, class-typical, or 5-10 mm for a hard small one."""
    if small:
        return float(rng.uniform(5.0, 10.0))
    lo, hi = {"cyst": (8, 45), "fnh": (12, 60), "hcc": (12, 60), "hem": (10, 60)}[lesion_class]
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))[None, :]


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def draw_lesion(
    lesion_class: str,
    rng: np.random.Generator,
    *,
    diameter_mm: float,
    parenchyma_hu: float,
    aorta_hu: float,
    centre_mm=(0.0, 0.0, 0.0),
    hard: tuple[str, ...] = (),
) -> LesionSpec:
    """Shape and appearance of one lesion. `hard` may hold "low_contrast" and/or "lookalike";
    "small" and "edge" are decided by the caller through the size and the position."""
    if lesion_class not in LESION_CLASSES:
        raise ValueError(f"unknown lesion class {lesion_class!r}; expected one of {', '.join(LESION_CLASSES)}")
    P, A = float(parenchyma_hu), float(aorta_hu)
    d = float(diameter_mm)
    rot = _random_rotation(rng)
    ecc = {"cyst": 0.18, "fnh": 0.15, "hcc": 0.2, "hem": 0.2}[lesion_class]
    axes = np.exp(rng.uniform(-ecc, ecc, 3))
    axes /= np.prod(axes) ** (1.0 / 3.0)
    n_lobes = {"cyst": 2, "fnh": 7, "hcc": 5, "hem": 4}[lesion_class]
    amp_hi = {"cyst": 0.04, "fnh": 0.14, "hcc": 0.10, "hem": 0.08}[lesion_class]
    lobe_dirs = _unit_vectors(rng, n_lobes)
    lobe_amp = rng.uniform(0.0, amp_hi, n_lobes)
    lobe_kappa = rng.uniform(3.0, 10.0, n_lobes)
    reasons = []
    if d < 10.0:
        reasons.append("small")
    low = "low_contrast" in hard
    look = "lookalike" in hard
    p: dict = {}
    if lesion_class == "cyst":
        # Water density; a faint cyst (hard) sits at the top of the range.
        p["hu"] = float(min(rng.uniform(14, 20) if low else rng.uniform(0, 16), P - 25.0))
        p["texture_hu"] = 1.0
    elif lesion_class == "fnh":
        p["delta"] = float(rng.uniform(15, 25) if low else rng.uniform(30, 75))
        p["texture_hu"] = float(rng.uniform(4, 8) if look else rng.uniform(1.5, 3.5))
        p["scar"] = bool(d > 30.0 and not look and rng.random() < 0.9)
        p["scar_hu"] = float(P - rng.uniform(0, 15))
        p["scar_spokes"] = int(rng.integers(3, 7))
        p["scar_core"] = float(rng.uniform(0.12, 0.2))
        if look:
            lobe_amp *= 0.5  # an FNH without scar and lobulation, close to an HCC
    elif lesion_class == "hcc":
        homog = look or low
        p["delta"] = float(rng.uniform(12, 20) if low else (rng.uniform(25, 55) if look else rng.uniform(18, 60)))
        p["mosaic_hu"] = float(rng.uniform(3, 6) if homog else rng.uniform(12, 26))
        p["mosaic_mm"] = float(max(2.5, d / rng.uniform(5, 9)))
        p["necrosis"] = bool(d > 25.0 and not homog and rng.random() < 0.5)
        p["necrosis_hu"] = float(rng.uniform(15, 35))
        p["necrosis_frac"] = float(rng.uniform(0.3, 0.55))
        p["capsule"] = bool(d > 15.0 and not homog and rng.random() < 0.4)
        p["capsule_hu"] = float(P - rng.uniform(8, 20))
        p["capsule_mm"] = float(rng.uniform(1.5, 2.5))
        p["arteries"] = int(rng.integers(2, 6)) if (d > 20.0 and not homog and rng.random() < 0.5) else 0
    elif lesion_class == "hem":
        # A faint or atypical (look-alike, >= 20 mm) one has few, dimmer nodules.
        few = low or (look and d >= 20.0)
        p["centre_hu"] = float(P - (rng.uniform(10, 18) if low else rng.uniform(15, 38)))
        p["flash"] = bool(look and d < 20.0)
        p["flash_hu"] = float(P + rng.uniform(40, 90))
        n_nod = int(rng.integers(1, 4)) if few else int(np.clip(d / 3.0, 4, 18)) + int(rng.integers(0, 4))
        p["nodule_hu"] = float(max(P + 60.0, A * (rng.uniform(0.5, 0.7) if few else rng.uniform(0.8, 1.0))))
        p["nodule_dirs"] = _unit_vectors(rng, n_nod)
        p["nodule_size"] = rng.uniform(0.13, 0.26, n_nod)
        p["nodule_pos"] = rng.uniform(0.74, 0.88, n_nod)
        p["texture_hu"] = 2.0
    p["_parenchyma"], p["_aorta"] = P, A
    if low:
        reasons.append("low_contrast")
    if look:
        reasons.append("lookalike")
    return LesionSpec(
        lesion_class, np.asarray(centre_mm, dtype=np.float64), d, rot, axes, lobe_dirs, lobe_amp, lobe_kappa, p, reasons
    )


def _soft(f: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.clip(0.5 - f / w, 0.0, 1.0).astype(np.float32)


def _ramp_width(p: tuple, r: np.ndarray, spacing, thickness: float) -> np.ndarray:
    """Voxel footprint along the radial direction: the width of the partial-volume ramp."""
    si, sj, _ = spacing
    rr = np.maximum(r, 1e-3)
    return np.sqrt((p[0] / rr * si) ** 2 + (p[1] / rr * sj) ** 2 + (p[2] / rr * thickness) ** 2).astype(np.float32) + 1e-3


def _smooth_noise(shape, sigma_mm: float, spacing_kji, rng: np.random.Generator) -> np.ndarray:
    n = rng.standard_normal(shape).astype(np.float32)
    sig = [max(sigma_mm / s, 0.3) for s in spacing_kji]
    n = ndimage.gaussian_filter(n, sig, mode="nearest")
    sd = float(n.std())
    return n / sd if sd > 0 else n


def render_lesion(spec: LesionSpec, shape_kji, spacing_ijk, thickness_mm: float, rng: np.random.Generator):
    """Soft occupancy and noise-free HU of one lesion on the voxel block around it.

    Returns ``(slices, occ, hu)``: `slices` index the volume ([k, j, i]); `occ` (0..1) and `hu` are
    float32 arrays of the block's shape, or ``(None, None, None)`` when the block lies outside."""
    si, sj, sk = (float(s) for s in spacing_ijk)
    ext = spec.extent_mm
    c = spec.centre_mm
    sl = []
    for axis, s, n in ((2, sk, shape_kji[0]), (1, sj, shape_kji[1]), (0, si, shape_kji[2])):
        lo = int(np.floor((c[axis] - ext) / s)) - 1
        hi = int(np.ceil((c[axis] + ext) / s)) + 2
        lo, hi = max(lo, 0), min(hi, n)
        if hi <= lo:
            return None, None, None
        sl.append(slice(lo, hi))
    kk = (np.arange(sl[0].start, sl[0].stop) * sk - c[2]).astype(np.float32)[:, None, None]
    jj = (np.arange(sl[1].start, sl[1].stop) * sj - c[1]).astype(np.float32)[None, :, None]
    ii = (np.arange(sl[2].start, sl[2].stop) * si - c[0]).astype(np.float32)[None, None, :]
    p = (ii, jj, kk)
    r = np.sqrt(ii * ii + jj * jj + kk * kk)
    w = _ramp_width(p, r, (si, sj, sk), thickness_mm)
    R = spec.radius_mm
    # Lesion frame: q = rot^T p / axes (x R), unit-less radius |q| compared with the lobed boundary.
    rot = spec.rotation.astype(np.float32)
    q = [(rot[0, a] * ii + rot[1, a] * jj + rot[2, a] * kk) / np.float32(spec.axes[a]) for a in range(3)]
    rq = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
    inv = 1.0 / np.maximum(rq, 1e-3)
    bound = np.ones_like(rq)
    for v, a, kap in zip(spec.lobe_dirs, spec.lobe_amp, spec.lobe_kappa):
        cosang = (q[0] * v[0] + q[1] * v[1] + q[2] * v[2]) * inv
        bound += np.float32(a) * np.exp(np.float32(kap) * (cosang - 1.0))
    f = rq - R * bound  # ~ millimetres, negative inside
    occ = _soft(f, w)
    block = occ.shape
    spacing_kji = (sk, sj, si)
    P = spec.params
    cls = spec.lesion_class
    if cls == "cyst":
        hu = np.full(block, P["hu"], np.float32) + P["texture_hu"] * _smooth_noise(block, 3.0, spacing_kji, rng)
    elif cls == "fnh":
        base = P["_parenchyma"] + P["delta"]
        hu = base + P["texture_hu"] * _smooth_noise(block, max(2.0, R / 4), spacing_kji, rng)
        if P["scar"]:
            # Stellate scar: a small core and thin radial spokes that taper outwards.
            core = r - P["scar_core"] * R
            fs = core
            for v in _unit_vectors(rng, P["scar_spokes"]):
                v_arr = spec.rotation @ v
                t = np.clip((ii * v_arr[0] + jj * v_arr[1] + kk * v_arr[2]) / (0.7 * R), 0.0, 1.0)
                dx, dy, dz = ii - t * 0.7 * R * v_arr[0], jj - t * 0.7 * R * v_arr[1], kk - t * 0.7 * R * v_arr[2]
                fs = np.minimum(fs, np.sqrt(dx * dx + dy * dy + dz * dz) - (0.07 * R * (1.0 - 0.6 * t) + 0.5))
            scar = _soft(fs, w)
            hu += scar * (P["scar_hu"] - hu)
    elif cls == "hcc":
        base = P["_parenchyma"] + P["delta"]
        hu = base + P["mosaic_hu"] * _smooth_noise(block, P["mosaic_mm"], spacing_kji, rng)
        if P["necrosis"]:
            off = rng.normal(0, 0.12 * R, 3)
            rn = np.sqrt((ii - off[0]) ** 2 + (jj - off[1]) ** 2 + (kk - off[2]) ** 2)
            wob = 1.0 + 0.35 * _smooth_noise(block, max(2.0, R / 4), spacing_kji, rng)
            nec = _soft(rn - P["necrosis_frac"] * R * wob, w)
            nec_hu = P["necrosis_hu"] + 4.0 * _smooth_noise(block, 2.0, spacing_kji, rng)
            hu += nec * (nec_hu - hu)
        if P["capsule"]:
            inner = _soft(f + P["capsule_mm"], w)
            rim = np.clip(occ - inner, 0.0, 1.0)
            hu += rim * (P["capsule_hu"] - hu)
        for _ in range(P["arteries"]):
            pos = rng.uniform(-0.6, 0.6, 3) * R
            ra = np.sqrt((ii - pos[0]) ** 2 + (jj - pos[1]) ** 2 + (kk - pos[2]) ** 2)
            art = _soft(ra - rng.uniform(0.8, 1.6), w)
            hu += art * (0.6 * P["_aorta"] - hu)
    else:  # hem
        if P["flash"]:
            hu = P["flash_hu"] + 3.0 * _smooth_noise(block, 3.0, spacing_kji, rng)
        else:
            hu = P["centre_hu"] + P["texture_hu"] * _smooth_noise(block, 3.0, spacing_kji, rng)
            nod_f = None
            for v, size, pos in zip(P["nodule_dirs"], P["nodule_size"], P["nodule_pos"]):
                # Nodule on the lobed boundary along v, pulled inwards so it stays in the lesion.
                bnd = 1.0 + float(np.sum(spec.lobe_amp * np.exp(spec.lobe_kappa * (spec.lobe_dirs @ v - 1.0))))
                qc = v * pos * R * bnd
                pc = spec.rotation @ (qc * spec.axes)
                rn = np.sqrt((ii - pc[0]) ** 2 + (jj - pc[1]) ** 2 + (kk - pc[2]) ** 2)
                fn = rn - max(size * R, 1.6)
                nod_f = fn if nod_f is None else np.minimum(nod_f, fn)
            nod = np.minimum(_soft(nod_f, w), occ)
            hu += nod * (P["nodule_hu"] - hu)
    return tuple(sl), occ, hu.astype(np.float32)
