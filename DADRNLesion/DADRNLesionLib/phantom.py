"""Synthetic arterial-phase abdominal CT with ground truth, and lesions painted into real scans.

Why: no public arterial-phase data set with slice-level labels of the four lesion classes exists
that the project can ship, so training, evaluation and benchmarks use phantoms that are meant to be
a fair test, not an easy one. Each case is an upper-abdominal int16 volume (liver dome to the
kidneys) with body wall, fat, muscle, ribs and spine, lung bases and heart at the top, an irregular
liver with portal and hepatic venous branches, gallbladder, stomach with air-fluid level, spleen,
pancreas, kidneys with corticomedullary enhancement, bowel, aorta (bright), portal vein (moderate)
and IVC (less enhanced); 0-3 lesions of one class (see `lesion_models`); partial-volume edges,
in-plane blur and band-limited (CT-like) noise; varied pixel spacing, slice spacing and thickness.
Hard cases on purpose: small, faint, at the liver surface, HCC/FNH/flash-filling-hemangioma
look-alikes, and non-lesion confounders (perfusion differences, focal fat) in any class.

Geometry: identity direction (LPS, axial), so increasing i points to the patient's left,
increasing j posterior and increasing k superior; the liver lies on the patient's right (low i).
The origin centres the patient on (x, y) = (0, 0) up to a few millimetres.

How it is built (pure numpy + scipy, so it also runs where SimpleITK is absent): every structure
is an implicit function (about a signed distance in mm) evaluated inside its bounding box on a
3 mm grid (organs) or a grid of about the pixel size (thin vessels). Dividing it by its gradient measured in voxel footprints (pixel
size in-plane, slice thickness along z) gives the distance to the surface in units of the
partial-volume ramp; that field is smooth near the surface, so it is interpolated linearly to the
full grid, and ``clip(0.5 - u, 0, 1)`` is the fraction of each voxel inside. Structures are
composited back to front. Thick slices therefore blur along z exactly where surfaces cross them.

Slice labels (for the data-set builder): ``meta["lesions"]`` lists, per lesion, ``class``,
``centre_ijk``, ``diameter_mm``, ``hard`` (with ``hard_reasons``: small, low_contrast, edge,
lookalike), ``area_mm2_by_k`` (pairs ``[k, in-slice area in mm^2]`` of that lesion's voxels,
after clipping to the liver) and ``max_area_mm2``. A builder labels slice k with the case's
lesion class when some lesion has ``area(k) >= max(20 mm^2, 0.25 * max_area_mm2)`` (for example),
keeps slices with no lesion voxels as normal, and may drop the ambiguous ones in between.

An unenhanced variant (``phase="unenhanced"``, normal and cyst cases only) gives the same patient
without contrast: liver 38-66 HU, blood 35-50 HU in every vessel, so that veins can be darker than
the liver. Why: models trained on arterial phantoms alone called normal parts of a real
unenhanced scan cysts; the method is for arterial-phase CT, but it should keep normal anatomy
normal on the scans users load anyway.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from scipy import ndimage

from . import lesion_models as lm
from .classes import CLASS_NAMES, LABEL_BY_KEY, LESION_CLASSES
from .volume import Volume

__all__ = ["PhantomCase", "generate_case", "generate_cases", "write_cases", "insert_lesions", "load_real_cases", "real_cases",
           "scan_liver_stats", "case_plan", "case_phase"]

PHASES = ("arterial", "unenhanced")
UNENHANCED_CLASSES = ("normal", "cyst")  # the classes whose look does not depend on the contrast phase
_PHASE_STREAM = 0x0E4A  # the unenhanced values' own stream, so that the arterial draws stay as they were
_M = 12.0  # implicit functions are clamped at +_M mm so that piecewise evaluation stays continuous
_SLICE_STEPS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)


@dataclass
class PhantomCase:
    case_id: str
    ct: Volume  # int16 HU, array [k, j, i]
    liver: Volume  # uint8 0/1, lesions included
    lesion: Volume  # uint8: 0 or the lesion class's label value
    lesion_class: str  # "normal" or one of classes.LESION_CLASSES
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Grids: coarse evaluation boxes, full-resolution regions, separable linear interpolation


def _interp_axis(a: np.ndarray, axis: int, src0: float, step: float, dst: np.ndarray) -> np.ndarray:
    n = a.shape[axis]
    if n == 1:
        return np.repeat(a, len(dst), axis=axis)
    t = np.clip((np.asarray(dst, np.float64) - src0) / step, 0.0, n - 1.000001)
    i0 = np.floor(t).astype(np.intp)
    w = (t - i0).astype(np.float32)
    shape = [1] * a.ndim
    shape[axis] = -1
    a0 = np.take(a, i0, axis=axis)
    a1 = np.take(a, i0 + 1, axis=axis)
    a1 -= a0
    a1 *= w.reshape(shape)
    a0 += a1
    return a0


class _Box:
    """A block of an evaluation grid (coarse for organs, fine for thin vessels): 1-D axes (x, y
    ascending patient mm; z ascending LPS mm), broadcastable X, Y, D (depth below the top)."""

    def __init__(self, cv: "_Canvas", x, y, z, step_xy: float, step_z: float):
        self.cv = cv
        self.x, self.y, self.z = x.astype(np.float32), y.astype(np.float32), z
        self.sxy, self.sz = step_xy, step_z
        self.X = self.x[None, None, :]
        self.Y = self.y[None, :, None]
        self.D = (cv.z_top - self.z).astype(np.float32)[:, None, None]
        self.shape = (len(self.z), len(self.y), len(self.x))
        self.memo: dict = {}

    def cached(self, key, fn):
        if key not in self.memo:
            self.memo[key] = fn(self)
        return self.memo[key]

    def sub(self, lo, hi) -> tuple:
        """Slices of this box covering the patient-mm bounds lo=(X, Y, D), hi=(X, Y, D)."""
        zt = self.cv.z_top
        s = []
        for ax, a, b in ((self.z, zt - hi[2], zt - lo[2]), (self.y, lo[1], hi[1]), (self.x, lo[0], hi[0])):
            i0 = max(int(np.searchsorted(ax, a, "left")) - 1, 0)
            i1 = min(int(np.searchsorted(ax, b, "right")) + 1, len(ax))
            s.append(slice(i0, max(i1, i0)))
        return tuple(s)

    def sub_coords(self, s):
        return self.X[:, :, s[2]], self.Y[:, s[1], :], self.D[s[0], :, :]


class _Region:
    """A block of the full-resolution grid: slices into the volume and X, Y, D coordinates."""

    def __init__(self, cv: "_Canvas", k0, k1, j0, j1, i0, i1):
        self.cv = cv
        self.bounds = (k0, k1, j0, j1, i0, i1)
        self.sl = (slice(k0, k1), slice(j0, j1), slice(i0, i1))
        self.X = cv.xf[i0:i1][None, None, :]
        self.Y = cv.yf[j0:j1][None, :, None]
        self.D = cv.df[k0:k1][:, None, None]
        self.shape = (k1 - k0, j1 - j0, i1 - i0)

    def tex(self, sigma_mm: float) -> np.ndarray:
        """Smooth unit-variance texture with correlation length ~sigma_mm (shared by all organs)."""
        return self.cv.texture(sigma_mm, self)


class _Occ:
    def __init__(self, region: _Region, occ: np.ndarray):
        self.region, self.occ = region, occ

    def take(self, bounds) -> np.ndarray:
        """This occupancy on another full-resolution block (k0, k1, j0, j1, i0, i1); 0 outside."""
        k0, k1, j0, j1, i0, i1 = bounds
        a0, a1, b0, b1, c0, c1 = self.region.bounds
        out = np.zeros((k1 - k0, j1 - j0, i1 - i0), np.float32)
        lo = (max(k0, a0), max(j0, b0), max(i0, c0))
        hi = (min(k1, a1), min(j1, b1), min(i1, c1))
        if any(h <= l for l, h in zip(lo, hi)):
            return out
        out[lo[0] - k0:hi[0] - k0, lo[1] - j0:hi[1] - j0, lo[2] - i0:hi[2] - i0] = self.occ[
            lo[0] - a0:hi[0] - a0, lo[1] - b0:hi[1] - b0, lo[2] - c0:hi[2] - c0
        ]
        return out


class _Canvas:
    def __init__(self, rng, shape, spacing, thickness, origin, centre_xy, z_top, coarse, fine):
        self.rng = rng
        self.shape = shape
        nk, nj, ni = shape
        px, py, sz = spacing
        self.h = (float(px), float(py), float(thickness))
        self.xf = (origin[0] + px * np.arange(ni) - centre_xy[0]).astype(np.float32)
        self.yf = (origin[1] + py * np.arange(nj) - centre_xy[1]).astype(np.float32)
        self.zf = origin[2] + sz * np.arange(nk)
        self.z_top = float(z_top)
        self.df = (self.z_top - self.zf).astype(np.float32)
        self.coarse, self.fine = coarse, fine  # (step in-plane, step along z) of the two grids
        self.img = np.full(shape, -1000.0, np.float32)
        self._tex: dict = {}
        self._liver: Optional[_Occ] = None  # the liver's occupancy, once painted
        self._liver_visible: Optional[np.ndarray] = None  # what of it later structures left uncovered

    # -- boxes and painting ---------------------------------------------------------------------
    def box(self, lo, hi, fine: bool = False) -> Optional[_Box]:
        """Evaluation box covering patient-mm bounds lo=(X, Y, D) .. hi (clipped to the volume plus
        a margin), on a lattice aligned with the volume; None when it misses the volume."""
        sxy, sz = self.fine if fine else self.coarse
        zt = self.z_top
        axes = []
        for a0, a1, ref, st in ((zt - hi[2], zt - lo[2], self.zf, sz), (lo[1], hi[1], self.yf, sxy), (lo[0], hi[0], self.xf, sxy)):
            r0, r1 = float(ref[0]), float(ref[-1])
            a0, a1 = max(float(a0), r0 - 2 * st), min(float(a1), r1 + 2 * st)
            if a1 <= a0:
                return None
            n0 = int(np.floor((a0 - r0) / st)) - 1
            n1 = int(np.ceil((a1 - r0) / st)) + 1
            if n1 - n0 < 2:
                return None
            axes.append(r0 + st * np.arange(n0, n1 + 1))
        return _Box(self, axes[2], axes[1], axes[0], sxy, sz)

    def occupancy(self, box: _Box, f: np.ndarray, clip: Optional[_Occ] = None) -> Optional[_Occ]:
        """Partial-volume fraction on the full grid of the structure {f < 0} (f on `box`).

        An f that does not vary along z (shape (1, ny, nx)) is handled in 2-D and broadcast."""
        f = np.asarray(f, dtype=np.float32)
        flat = f.ndim == 3 and f.shape[0] == 1
        if not flat:
            f = np.broadcast_to(f, box.shape)
        hx, hy, hz = self.h
        if flat:
            gy, gx = np.gradient(f[0], box.sxy, box.sxy)
            g = np.sqrt((gx * hx) ** 2 + (gy * hy) ** 2)[None]
        else:
            gz, gy, gx = np.gradient(f, box.sz, box.sxy, box.sxy)
            g = np.sqrt((gx * hx) ** 2 + (gy * hy) ** 2 + (gz * hz) ** 2)
        u = np.clip(f / np.maximum(g, 1e-6), -2.0, 2.0)
        inside = u < 0.75
        if not inside.any():
            return None
        rng_ = []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            idx = np.flatnonzero(inside.any(axis=other))
            rng_.append((max(idx[0] - 1, 0), min(idx[-1] + 2, inside.shape[axis])))
        (z0, z1), (y0, y1), (x0, x1) = rng_
        if flat:
            z0, z1 = 0, box.shape[0]
        zc, yc, xc = box.z[z0:z1], box.y[y0:y1], box.x[x0:x1]
        k0, k1 = int(np.searchsorted(self.zf, zc[0] - 1e-6, "left")), int(np.searchsorted(self.zf, zc[-1] + 1e-6, "right"))
        j0, j1 = int(np.searchsorted(self.yf, yc[0] - 1e-4, "left")), int(np.searchsorted(self.yf, yc[-1] + 1e-4, "right"))
        i0, i1 = int(np.searchsorted(self.xf, xc[0] - 1e-4, "left")), int(np.searchsorted(self.xf, xc[-1] + 1e-4, "right"))
        if k1 <= k0 or j1 <= j0 or i1 <= i0:
            return None
        if flat:
            u = np.ascontiguousarray(u[:, y0:y1, x0:x1])
        else:
            u = np.ascontiguousarray(u[z0:z1, y0:y1, x0:x1])
            u = _interp_axis(u, 0, zc[0], box.sz, self.zf[k0:k1])
        u = _interp_axis(u, 1, yc[0], box.sxy, self.yf[j0:j1])
        u = _interp_axis(u, 2, xc[0], box.sxy, self.xf[i0:i1])
        np.subtract(0.5, u, out=u)
        np.clip(u, 0.0, 1.0, out=u)
        reg = _Region(self, k0, k1, j0, j1, i0, i1)
        if flat:
            u = np.broadcast_to(u, reg.shape)
        if clip is not None:
            u = np.minimum(u, clip.take(reg.bounds))
        return _Occ(reg, u)

    def paint(self, box: Optional[_Box], f, value, clip: Optional[_Occ] = None) -> Optional[_Occ]:
        """Composite a structure of HU `value` (number or callable(region) -> array) over the image."""
        if box is None:
            return None
        if callable(f):
            f = f(box)
        oc = self.occupancy(box, f, clip)
        if oc is None:
            return None
        self.composite(oc, value)
        if self._liver is not None and clip is not self._liver:
            self._cover_liver(oc)
        return oc

    def hold_liver(self, oc: _Occ) -> None:
        """From now on, a structure painted over the liver (not clipped to it) takes its place in
        the liver label too, as it does in the image: the aorta or a vein trunk that the liver's
        shape overlaps is not liver. Intrahepatic vessels and lesions are painted clipped to the
        liver and stay liver."""
        self._liver = oc
        self._liver_visible = oc.occ.astype(np.float32, copy=True)

    def _cover_liver(self, oc: _Occ) -> None:
        self._liver_visible *= 1.0 - oc.take(self._liver.region.bounds)

    def liver_label(self) -> Optional[tuple]:
        """(slices, liver fills at least half the voxel after everything painted over it), or None."""
        if self._liver is None:
            return None
        return self._liver.region.sl, self._liver_visible >= 0.5

    def composite(self, oc: _Occ, value) -> None:
        reg = oc.region
        val = value(reg) if callable(value) else value
        view = self.img[reg.sl]
        view += oc.occ * (val - view)

    # -- textures -------------------------------------------------------------------------------
    _TEX_SCALES = (2.0, 4.0, 10.0, 20.0)

    def texture(self, sigma_mm: float, reg: _Region) -> np.ndarray:
        k0, k1, j0, j1, i0, i1 = reg.bounds
        return self.texture_at(sigma_mm, self.zf[k0:k1], self.yf[j0:j1], self.xf[i0:i1])

    def texture_at(self, sigma_mm: float, z, y, x) -> np.ndarray:
        """A shared smooth unit-variance texture sampled on the grid z x y x x (1-D axes), at the
        nearest of a few correlation lengths (each one costs a filter over the whole volume)."""
        sigma_mm = min(self._TEX_SCALES, key=lambda v: abs(math.log(v / float(sigma_mm))))
        key = sigma_mm
        if key not in self._tex:
            g = max(2.0, sigma_mm / 1.25)
            gz = max(2.5, sigma_mm / 1.25)
            pad = 4 * max(self.coarse)
            xs = np.arange(self.xf[0] - pad, self.xf[-1] + pad, g)
            ys = np.arange(self.yf[0] - pad, self.yf[-1] + pad, g)
            zs = np.arange(self.zf[0] - pad, self.zf[-1] + pad, gz)
            n = self.rng.standard_normal((len(zs), len(ys), len(xs)), dtype=np.float32)
            n = ndimage.gaussian_filter(n, (sigma_mm / gz, sigma_mm / g, sigma_mm / g), mode="nearest")
            n /= max(float(n.std()), 1e-6)
            self._tex[key] = (n, zs[0], ys[0], xs[0], gz, g)
        n, z0, y0, x0, gz, g = self._tex[key]
        z, y, x = np.atleast_1d(z), np.atleast_1d(y), np.atleast_1d(x)

        def rng_(ax, a0, st, size):
            lo = int(np.clip(np.floor((float(ax.min()) - a0) / st) - 1, 0, size - 2))
            hi = int(np.clip(np.ceil((float(ax.max()) - a0) / st) + 2, lo + 2, size))
            return lo, hi

        a, b = rng_(z, z0, gz, n.shape[0])
        ya, yb = rng_(y, y0, g, n.shape[1])
        xa, xb = rng_(x, x0, g, n.shape[2])
        t = n[a:b, ya:yb, xa:xb]
        t = _interp_axis(t, 0, z0 + a * gz, gz, z)
        t = _interp_axis(t, 1, y0 + ya * g, g, y)
        return _interp_axis(t, 2, x0 + xa * g, g, x)

    def box_texture(self, box: _Box, sigma_mm: float, flat: bool = False) -> np.ndarray:
        z = box.z[len(box.z) // 2:len(box.z) // 2 + 1] if flat else box.z
        return self.texture_at(sigma_mm, z, box.y, box.x)


# ---------------------------------------------------------------------------------------------
# Implicit primitives (about signed distance in mm, negative inside)


def _smin(a, b, k: float):
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _rot(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation (radians about X, then Y, then Z); columns are the local axes in patient mm."""
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _local(X, Y, D, c, R=None):
    x, y, z = X - np.float32(c[0]), Y - np.float32(c[1]), D - np.float32(c[2])
    if R is None:
        return x, y, z
    R = R.astype(np.float32)
    return (R[0, 0] * x + R[1, 0] * y + R[2, 0] * z, R[0, 1] * x + R[1, 1] * y + R[2, 1] * z,
            R[0, 2] * x + R[1, 2] * y + R[2, 2] * z)


def _ellipsoid_local(x, y, z, r):
    rx, ry, rz = (np.float32(v) for v in r)
    k0 = np.sqrt((x / rx) ** 2 + (y / ry) ** 2 + (z / rz) ** 2)
    k1 = np.sqrt((x / (rx * rx)) ** 2 + (y / (ry * ry)) ** 2 + (z / (rz * rz)) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _ellipsoid(X, Y, D, c, r, R=None):
    return _ellipsoid_local(*_local(X, Y, D, c, R), r)


def _ellipse_xy(X, Y, c, a, b, p: float = 2.0):
    """Radial distance to a superellipse |x/a|^p + |y/b|^p = 1 (a cylinder along D)."""
    x, y = X - np.float32(c[0]), Y - np.float32(c[1])
    n = (np.abs(x / a) ** p + np.abs(y / b) ** p) ** (1.0 / p)
    rr = np.sqrt(x * x + y * y)
    rb = np.where(rr > 1e-3, rr / np.maximum(n, 1e-9), np.minimum(a, b))
    return rr - rb


def _catmull(points: np.ndarray, radii: np.ndarray, per: int = 5):
    pts = np.asarray(points, np.float64)
    rad = np.asarray(radii, np.float64)
    if len(pts) < 3:
        return pts, rad
    p = np.vstack([2 * pts[0] - pts[1], pts, 2 * pts[-1] - pts[-2]])
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        for t in np.linspace(0, 1, per, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t3))
    out.append(pts[-1])
    r = np.interp(np.linspace(0, len(rad) - 1, len(out)), np.arange(len(rad)), rad)
    return np.array(out), r


def _tube(box: _Box, points, radii, smooth: bool = True) -> np.ndarray:
    """Distance to a polyline tube of varying radius (Catmull-Rom smoothed), per-segment boxes."""
    pts, rad = _catmull(points, radii) if smooth else (np.asarray(points, float), np.asarray(radii, float))
    f = np.full(box.shape, _M, np.float32)
    for a, b, ra, rb in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
        m = max(ra, rb) + _M + 2.0
        s = box.sub(np.minimum(a, b) - m, np.maximum(a, b) + m)
        if any(sl.stop - sl.start <= 0 for sl in s):
            continue
        X, Y, D = box.sub_coords(s)
        ab = (b - a).astype(np.float32)
        l2 = max(float(ab @ ab), 1e-6)
        x, y, z = X - np.float32(a[0]), Y - np.float32(a[1]), D - np.float32(a[2])
        t = np.clip((x * ab[0] + y * ab[1] + z * ab[2]) / l2, 0.0, 1.0)
        dx, dy, dz = x - t * ab[0], y - t * ab[1], z - t * ab[2]
        d = np.sqrt(dx * dx + dy * dy + dz * dz) - (ra + t * (rb - ra))
        np.minimum(f[s], d, out=f[s])
    return f


def _tube_bounds(points, radii, pad: float = 4.0):
    p = np.asarray(points, float)
    r = float(np.max(radii)) + pad
    return p.min(0) - r, p.max(0) + r


class _Warp:
    """Smooth random displacement: a few random plane waves (mm)."""

    def __init__(self, rng, amp: float, wavelength: tuple, n: int = 5):
        self.k = rng.standard_normal((n, 3))
        self.k /= np.linalg.norm(self.k, axis=1, keepdims=True)
        self.k *= (2 * np.pi / rng.uniform(*wavelength, n))[:, None]
        self.e = rng.standard_normal((n, 3)) * (amp / math.sqrt(n))
        self.phase = rng.uniform(0, 2 * np.pi, n)

    def __call__(self, X, Y, D):
        dx = dy = dz = np.float32(0.0)
        for k, e, ph in zip(self.k, self.e, self.phase):
            s = np.sin(np.float32(k[0]) * X + np.float32(k[1]) * Y + np.float32(k[2]) * D + np.float32(ph))
            dx = dx + np.float32(e[0]) * s
            dy = dy + np.float32(e[1]) * s
            dz = dz + np.float32(e[2]) * s
        return X + dx, Y + dy, D + dz


# ---------------------------------------------------------------------------------------------
# Case parameters


def _choice(rng, values, p=None):
    return values[int(rng.choice(len(values), p=p))]


def _draw_geometry(rng, matrix: int, n_slices: Optional[int], spacing: Optional[tuple]):
    if spacing is not None:
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError("spacing must be three positive numbers (i, j, k) in mm")
        px, py, sz = (float(s) for s in spacing)
        fov_pref = None
    else:
        fov_pref = float(rng.uniform(0.0, 1.0))  # resolved once the body size is known
        px = py = None
        if n_slices is None:
            sz = _choice(rng, _SLICE_STEPS, p=[0.1, 0.1, 0.1, 0.15, 0.15, 0.15, 0.1, 0.15])
        else:
            sz = float(np.clip(round(rng.uniform(150, 250) / n_slices * 4) / 4, 0.5, 5.0))
    if n_slices is None:
        n_slices = int(round(rng.uniform(150, 250) / sz))
    thick = sz if rng.random() < 0.4 else float(min(max(sz * rng.uniform(1.2, 2.0), 1.0), 5.0))
    thick = max(thick, sz) if sz <= 5.0 else sz
    return px, py, sz, thick, int(n_slices), fov_pref


class _Case:
    """All random anatomy of one case, in patient mm (X left, Y posterior, D depth below top)."""

    def __init__(self, rng, extent_mm: float):
        u = rng.uniform
        self.s = s = u(0.88, 1.08)
        self.sd = u(0.9, 1.1)
        self.fat = u(0.0, 1.0) ** 1.3
        # Depth of the right dome apex below the top slice; a short volume is moved down to the
        # middle of the liver rather than showing the lung bases only.
        self.DR = u(5.0, 22.0) - max(0.0, (140.0 - extent_mm) * 0.6)
        self.extent = extent_mm
        # Body: cavity (inside the muscles), muscle, subcutaneous fat.
        self.ac, self.b_ant, self.b_post = 122 * s * u(0.95, 1.05), 86 * s * u(0.93, 1.07), 98 * s * u(0.95, 1.05)
        self.p_ant, self.p_post = u(2.0, 2.3), u(2.6, 3.3)
        self.tm = u(9.0, 13.0)
        self.tf_ant = 6 + 42 * self.fat * u(0.8, 1.2)
        self.tf_lat = 5 + 30 * self.fat * u(0.8, 1.2)
        self.tf_post = 6 + 16 * self.fat * u(0.8, 1.2)
        self.half_width = self.ac + 1.15 * self.tm + self.tf_lat
        self.half_depth_post = self.b_post + self.tm + self.tf_post
        self.half_depth_ant = self.b_ant + self.tm + self.tf_ant
        # Tissue HU (late arterial phase).
        self.P = u(60, 90)  # liver parenchyma
        self.A = u(240, 360)  # aorta
        self.PV = max(u(120, 165), self.P + 35)  # portal vein
        self.IVC_hi, self.IVC_lo = u(85, 140), u(45, 80)
        self.S = u(110, 160)  # spleen mean
        self.S_zebra = u(0, 35) if rng.random() < 0.6 else 0.0
        self.K_cortex, self.K_medulla = u(150, 230), u(55, 100)
        self.PANC = u(95, 140)
        self.MUS = u(45, 62)
        self.FAT = u(-112, -88)
        self.BONE, self.CORT = u(160, 260), u(500, 900)
        self.LUNG = u(-880, -800)
        self.HV = self.P - u(10, 30)  # hepatic veins, not yet opacified
        self.WALL = u(60, 100)
        self.BILE = u(0, 15)
        # Spine.
        self.Yv = 40 * s
        self.rvx, self.rvy = 20 * s * u(0.92, 1.08), 16 * s * u(0.92, 1.08)
        self.vert_period = u(27, 33)
        self.vert_phase = u(0, self.vert_period)
        self.disc = u(6, 9)
        # Diaphragm domes.
        self.dome_r = (-55 * s, 5 * s, self.DR)
        self.dome_l = (60 * s, 12 * s, self.DR + u(8, 25))
        self.dome_c = u(0.005, 0.0075) / s
        # Great vessels.
        self.ra = u(10, 13) * s
        self.Xa = 12 * s + u(-4, 4)
        self.Ya = self.Yv - self.rvy - self.ra - 1.5
        # Ribs.
        self.rib_drop = u(160, 220)
        self.rib_period = u(26, 32)
        self.rib_phase = u(0, self.rib_period)
        self.rib_t = u(3.2, 4.0)
        self.rib_h = u(4.0, 5.0)
        self.costal = u(50, 75)
        self.rib_wobble = (u(3, 7), u(0, 6.28), u(2, 4), u(0, 6.28))

    def unenhance(self, rng) -> None:
        """The tissue values without contrast; the anatomy, drawn before, stays as it was."""
        u = rng.uniform
        blood = u(35, 50)
        self.P = u(38, 66)  # a fatty liver lies below the blood's density, a normal one above it
        self.A = blood
        self.PV = self.HV = blood + u(-3, 3)
        self.IVC_hi = self.IVC_lo = blood
        self.S, self.S_zebra = u(40, 52), 0.0
        self.K_cortex = self.K_medulla = u(28, 38)
        self.PANC = u(35, 48)
        self.WALL = u(30, 45)

    def d(self, rel: float) -> float:
        """Template depth (mm below the right dome apex, average patient) -> depth in this case."""
        return self.DR + self.sd * rel


# ---------------------------------------------------------------------------------------------
# Anatomy


def _dome_depth(c: _Case, X, Y):
    """Depth of the diaphragm over (X, Y): two cupolas, the right one higher, deeper posteriorly."""

    def cupola(apex):
        dy = Y - apex[1]
        w = np.where(dy > 0, 1.3, 0.8)
        return apex[2] + c.dome_c * ((X - apex[0]) ** 2 + w * dy * dy)

    return _smin(cupola(c.dome_r), cupola(c.dome_l), 12.0).astype(np.float32)


def _below_dome(c: _Case, box: _Box):
    """< 0 below the diaphragm (abdomen), > 0 in the thorax; about millimetres."""
    dd = _dome_depth(c, box.x[None, :], box.y[:, None])
    gy, gx = np.gradient(dd, box.sxy, box.sxy)
    norm = np.sqrt(1.0 + gx * gx + gy * gy)
    return (dd[None] - box.D) / norm[None]


def _segments_paint(cv: _Canvas, segs, hu, clip=None):
    for a, b, ra, rb in segs:
        r = max(ra, rb) + 3.0
        box = cv.box(np.minimum(a, b) - r, np.maximum(a, b) + r, fine=True)
        if box is not None:
            cv.paint(box, _tube(box, [a, b], [ra, rb], smooth=False), hu, clip=clip)


def _paint_anatomy(cv: _Canvas, c: _Case, rng):  # noqa: C901 - one recipe, read top to bottom
    u = rng.uniform
    s = c.s
    ext = c.extent
    top, bottom = -40.0, ext + 40.0

    def below_dome(b):
        return b.cached("below_dome", lambda bb: _below_dome(c, bb))

    def cavity_raw(b):
        def f(bb):
            X, Y = bb.X, bb.Y
            ant = Y < 0
            e = _ellipse_xy(X, Y, (0, 0), c.ac, np.where(ant, c.b_ant, c.b_post), np.where(ant, c.p_ant, c.p_post))
            return e + 3.0 * cv.box_texture(bb, 20.0, flat=True)
        return b.cached("cavity_raw", f)

    def spine_block(b):
        return _ellipse_xy(b.X, b.Y, (0, c.Yv + 48 * s), 47 * s, 40 * s, 2.2)

    def cavity(b, grow=0.0):
        return b.cached("cavity", lambda bb: np.maximum(cavity_raw(bb), -spine_block(bb))) - grow

    def muscle_t(X, Y):
        ang = np.arctan2(Y, X)
        t = c.tm * (0.85 + 0.3 * np.abs(np.cos(ang)))
        alba = np.exp(-(X / 9.0) ** 2) * (Y < 0)
        return t * (1.0 - 0.75 * alba)

    def fat_t(X, Y):
        ang = np.arctan2(Y, X)
        ant = np.clip(-np.sin(ang), 0, 1) ** 1.5
        post = np.clip(np.sin(ang), 0, 1) ** 2
        lat = np.abs(np.cos(ang))
        return c.tf_ant * ant + c.tf_lat * lat * (1 - ant) + c.tf_post * post

    def body(b):
        return cavity_raw(b) - muscle_t(b.X, b.Y) - fat_t(b.X, b.Y)

    W, Hp, Ha = c.half_width + 8, c.half_depth_post + 8, c.half_depth_ant + 8
    bodybox = cv.box((-W, -Ha, top), (W, Hp, bottom))
    out = {}

    # Table under the patient.
    ty = c.half_depth_post + u(6, 25)
    curv = u(0.0008, 0.0016)
    for off, hu in ((0.0, u(120, 260)), (u(25, 40), u(80, 200))):
        tb = cv.box((-200 * s - 5, ty + off - 5, top), (200 * s + 5, ty + off + 5 + curv * (200 * s) ** 2, bottom), fine=True)
        cv.paint(tb, lambda b, o=off: np.maximum(np.abs(b.Y - (ty + o) - curv * b.X ** 2) - 1.2, np.abs(b.X) - 200 * s), hu)

    # Skin, subcutaneous fat (with septa), muscle wall, visceral fat (with small vessels).
    cv.paint(bodybox, body, u(10, 40))
    cv.paint(bodybox, lambda b: body(b) + 1.6, lambda r: c.FAT + 6 + 5 * r.tex(4.0) + 40 * np.clip(r.tex(2.0) - 1.8, 0, None))
    cv.paint(bodybox, lambda b: cavity_raw(b) - muscle_t(b.X, b.Y), lambda r: c.MUS + 4 * r.tex(4.0))
    # A thin fat plane between the flat lateral muscles.
    finebody = cv.box((-W, -Ha, top), (W, Hp, bottom), fine=True)
    cv.paint(finebody, lambda b: np.abs(cavity_raw(b) - 0.45 * muscle_t(b.X, b.Y)) - 0.6
             + 8.0 * (np.abs(b.X) < 0.6 * np.sqrt(b.X * b.X + b.Y * b.Y)), lambda r: c.FAT + 60)
    cavbox = cv.box((-c.ac - 5, -c.b_ant - 5, top), (c.ac + 5, c.b_post + 5, bottom))
    cv.paint(cavbox, lambda b: cavity(b), lambda r: c.FAT - 2 + 6 * r.tex(4.0) + 140 * np.clip(r.tex(2.0) - 2.0, 0, None))

    # Ribs in the muscle layer; costal cartilage anteriorly; none below the costal margin.
    def ribs(b, shrink=0.0):
        X, Y, D = b.X, b.Y, b.D
        rho = cavity_raw(b) - 0.5 * muscle_t(X, Y) - 0.5
        rr = np.sqrt(X * X + Y * Y) + 1e-3
        phi = np.arccos(np.clip(Y / rr, -1, 1))  # 0 posterior .. pi anterior
        a2, p2, a3, p3 = c.rib_wobble
        side = np.sign(X) + 0.5  # left and right ribs are not mirror images
        g = c.rib_drop * (phi / np.pi) ** 1.2 + a2 * np.sin(2 * phi + p2 * side) + a3 * np.sin(3 * phi + p3 * side)
        zz = np.mod(D - g - c.rib_phase, c.rib_period) - 0.5 * c.rib_period
        t, hgt = c.rib_t - shrink, c.rib_h - shrink
        f = t * (np.sqrt((rho / t) ** 2 + (zz / hgt) ** 2) - 1.0)
        margin = c.d(c.costal + 115 * (1 - phi / np.pi) ** 1.3)
        f = np.maximum(f, D - margin)
        return np.maximum(f, (0.45 - phi) * 60.0)

    mt = c.tm * 1.2
    ribbox = cv.box((-c.ac - mt - 3, -c.b_ant - mt - 3, top), (c.ac + mt + 3, c.b_post + mt + 3, c.d(c.costal + 120)))
    if ribbox is not None:
        fr = ribs(ribbox)
        X, Y = ribbox.X, ribbox.Y
        phi = np.arccos(np.clip(Y / (np.sqrt(X * X + Y * Y) + 1e-3), -1, 1))
        cart = phi > 0.8 * np.pi
        cv.paint(ribbox, np.where(cart, _M, fr), c.CORT)
        cv.paint(ribbox, np.where(cart, _M, ribs(ribbox, 1.3)), lambda r: c.BONE - 40 + 25 * r.tex(2.0))
        cv.paint(ribbox, np.where(cart, fr, _M), u(100, 200))

    # Thorax above the domes: diaphragm, lung bases (with small vessels), heart, oesophagus.
    thbox = cv.box((-c.ac - 5, -c.b_ant - 5, top), (c.ac + 5, c.b_post + 5, c.d(120)))
    if thbox is not None:
        cav = cavity(thbox) + 0.5
        bd = below_dome(thbox)
        cv.paint(thbox, np.maximum(cav, -bd), lambda r: c.MUS + 3 * r.tex(4.0))
        lung_hu = c.LUNG
        cv.paint(thbox, np.maximum(cav + 1.0, -bd + 4.5),
                 lambda r: lung_hu + 20 * r.tex(10.0) + 500 * np.clip(r.tex(2.0) - 1.9, 0, None))
        dc = float(_dome_depth(c, np.float32(15 * s), np.float32(-30 * s)))
        hc = (18 * s + u(-8, 8), -38 * s, dc - 35)
        hr = (62 * s, 50 * s, 48)
        heart = np.maximum(_ellipsoid(thbox.X, thbox.Y, thbox.D, hc, hr), -bd + 4.5)
        cv.paint(thbox, heart, lambda r: u(95, 130) + 4 * r.tex(4.0))
        lv = np.maximum(_ellipsoid(thbox.X, thbox.Y, thbox.D, (hc[0] + 22 * s, hc[1] + 6 * s, hc[2] - 8), (30 * s, 26 * s, 32)), -bd + 12)
        cv.paint(thbox, lv, c.A * u(0.9, 1.0))
        rv = np.maximum(_ellipsoid(thbox.X, thbox.Y, thbox.D, (hc[0] - 22 * s, hc[1] - 8 * s, hc[2] - 4), (30 * s, 22 * s, 30)), -bd + 10)
        cv.paint(thbox, rv, u(140, 230))
    eso = [(c.Xa - 14 * s, c.Ya - 10 * s, top), (c.Xa - 12 * s, c.Ya - 14 * s, c.d(15)), (30 * s, -2 * s, c.d(40))]
    eb = cv.box(*_tube_bounds(eso, [9, 9, 9]))
    if eb is not None:
        cv.paint(eb, lambda b: _tube(b, eso, [7.5, 7.5, 9]), lambda r: u(35, 55) + 3 * r.tex(2.0))

    # Spine: vertebral bodies with end plates and discs, pedicles and laminae around the canal,
    # spinous and transverse processes on part of each level; psoas muscles.
    yc = c.Yv + c.rvy + 9 * s
    rc = 8.0 * s
    spbox = cv.box((-45 * s, c.Yv - c.rvy - 8, top), (45 * s, yc + 45 * s, bottom))
    if spbox is not None:
        X, Y, D = spbox.X, spbox.Y, spbox.D
        grow = 1.0 + 0.12 * np.clip(D / 200.0, 0, 1)
        zz = np.mod(D - c.vert_phase, c.vert_period) - 0.5 * c.vert_period
        vb = _ellipse_xy(X, Y, (0, c.Yv), c.rvx * grow, c.rvy * grow, 2.3)
        canal = _ellipse_xy(X, Y, (0, yc), rc, rc * 0.9)
        arch = np.maximum(_ellipse_xy(X, Y, (0, yc + 1.0), rc + 5.0, rc + 5.5), -(canal - 0.0))
        spin = np.maximum(_ellipse_xy(X, Y, (0, yc + rc + 15 * s), 3.2, 15 * s), np.abs(zz - 0.1 * c.vert_period) - 0.3 * c.vert_period)
        tpl = 9 * s * (1.0 + 0.4 * np.clip((D - 90.0) / 100.0, 0, 1))  # lumbar ones are longer
        tp = np.minimum(_ellipse_xy(X, Y + 0.25 * X, (-(rc + 4 + tpl), yc - 6), tpl, 3.2),
                        _ellipse_xy(X, Y - 0.25 * X, (rc + 4 + tpl, yc - 6), tpl, 3.2))
        tp = np.maximum(tp, np.abs(zz + 0.2 * c.vert_period) - 0.13 * c.vert_period)
        post = np.minimum(np.minimum(arch, spin), tp)
        bone = np.minimum(vb, post)
        cv.paint(spbox, bone, c.CORT * 0.75)
        cv.paint(spbox, np.minimum(vb + 1.8, post + 1.3), lambda r: c.BONE + 35 * r.tex(2.0))
        cv.paint(spbox, np.maximum(vb + 0.8, np.abs(zz) - 0.5 * c.disc - 1.2), c.CORT * 0.6)
        cv.paint(spbox, np.maximum(vb - 0.8, np.abs(zz) - 0.5 * c.disc), u(70, 100))
        cv.paint(spbox, canal, u(15, 35))
    for side in (-1, 1):
        ps = [(side * (c.rvx + 6), c.Yv - 4, c.d(100)), (side * (c.rvx + 12), c.Yv - 2, c.d(150)),
              (side * (c.rvx + 19), c.Yv + 2, c.d(230)), (side * (c.rvx + 24), c.Yv + 4, bottom + 40)]
        pr = [1.0, 10 * s, 19 * s, 24 * s]
        pb = cv.box(*_tube_bounds(ps, pr))
        if pb is not None:
            cv.paint(pb, lambda b, ps=ps, pr=pr: np.maximum(_tube(b, ps, pr), 1.5 - _ellipse_xy(b.X, b.Y, (0, c.Yv), c.rvx * 1.15, c.rvy * 1.15, 2.3)),
                     lambda r: c.MUS + 3 * r.tex(4.0))

    # Kidneys with corticomedullary differentiation, sinus fat and pelvis.
    kid = {}
    for side, dz, key in ((-1, 150.0, "R"), (1, 138.0, "L")):
        kc = (side * 66 * s + u(-5, 5), 60 * s + u(-5, 5), c.d(dz + u(-12, 12)))
        kr = (23 * s * u(0.9, 1.1), 28 * s * u(0.9, 1.1), 54 * u(0.9, 1.1))
        R = _rot(math.radians(-12), math.radians(side * 10), math.radians(side * 35))
        kid[key] = (kc, kr, R)
        kb = cv.box(np.array(kc) - max(kr) - 6, np.array(kc) + max(kr) + 6)
        if kb is None:
            continue
        x, y, z = _local(kb.X, kb.Y, kb.D, kc, R)
        outer = _ellipsoid_local(x, y, z, kr)
        cv.paint(kb, outer, lambda r: c.K_cortex + 6 * r.tex(2.0))
        qx, qy, qz = x / kr[0], y / kr[1], z / kr[2]
        rn = np.sqrt(qx * qx + qy * qy + qz * qz) + 1e-3
        # Medullary pyramids: lobes around the sinus, apart from the hilum (local -x side).
        dirs = rng.standard_normal((int(rng.integers(8, 13)), 3))
        dirs[:, 0] = np.abs(dirs[:, 0]) * 0.8 - 0.2
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        best = np.max([(qx * v[0] + qy * v[1] + qz * v[2]) for v in dirs], axis=0) / rn
        pyr = np.maximum(np.maximum(rn - 0.8, 0.42 - rn) * 30.0, (math.cos(0.42) - best) * 40.0)
        cv.paint(kb, pyr, lambda r: c.K_medulla + 5 * r.tex(2.0))
        sinus = _ellipsoid_local(x + kr[0] * 0.45, y, z, (kr[0] * 0.55, kr[1] * 0.42, kr[2] * 0.55))
        cv.paint(kb, sinus, lambda r: c.FAT + 25 + 10 * r.tex(2.0))
        pelvis = _ellipsoid_local(x + kr[0] * 0.5, y, z - 3, (kr[0] * 0.3, kr[1] * 0.2, kr[2] * 0.3))
        cv.paint(kb, pelvis, u(5, 25))

    # Spleen: crescent against the posterolateral wall, arciform in the arterial phase.
    spc = (88 * s + u(-6, 6), 50 * s + u(-6, 6), c.dome_l[2] + c.sd * (50 + u(-8, 8)))
    spr = tuple(np.array([26 * s, 55 * s, 50]) * u(0.85, 1.2))
    spR = _rot(0, 0, math.atan2(spc[1], spc[0]))
    spw = _Warp(rng, 5.0, (60, 140))
    zebra_n, zebra_ph = int(rng.integers(5, 10)), u(0, 6.28)

    def spleen(b):
        def f(bb):
            X, Y, D = spw(bb.X, bb.Y, bb.D)
            e = _ellipsoid(X, Y, D, spc, spr, spR)
            cut = _ellipsoid(X, Y, D, (spc[0] - 32 * s, spc[1] - 20 * s, spc[2]), (30 * s, 36 * s, 46))
            return np.maximum(np.maximum(e, -cut), np.maximum(cavity(bb, -1.0), below_dome(bb)))
        return b.cached("spleen", f)

    spbox2 = cv.box(np.array(spc) - max(spr) - 10, np.array(spc) + max(spr) + 10)

    def spleen_hu(r):
        ang = np.arctan2(r.Y - spc[1], r.X - spc[0])
        return c.S + c.S_zebra * np.sin(zebra_n * ang + 2.5 * r.tex(10.0) + zebra_ph) + 4 * r.tex(4.0)

    cv.paint(spbox2, spleen, spleen_hu)

    # Stomach, duodenum and pancreas.
    dist = u(0.75, 1.2)
    st_pts = [(45 * s, 18 * s, c.dome_l[2] + 28), (55 * s, -5 * s, c.dome_l[2] + 52), (48 * s, -35 * s, c.d(82)),
              (28 * s, -55 * s, c.d(104)), (2 * s, -60 * s, c.d(118)), (-22 * s, -50 * s, c.d(126))]
    st_r = np.array([30, 29, 26, 22, 18, 11]) * s * dist
    du_pts = [(-22 * s, -50 * s, c.d(126)), (-42 * s, -32 * s, c.d(132)), (-50 * s, -8 * s, c.d(150)),
              (-45 * s, 2 * s, c.d(175)), (-15 * s, -5 * s, c.d(188)), (18 * s, -12 * s, c.d(182))]
    du_r = np.array([10, 12, 12, 12, 11, 10]) * s * u(0.8, 1.15)
    pa_pts = [(-38 * s, -22 * s, c.d(140)), (-5 * s, -40 * s, c.d(124)), (30 * s, -32 * s, c.d(114)),
              (65 * s, 5 * s, c.d(104)), (80 * s, 26 * s, c.d(100))]
    pa_r = np.array([14, 10, 11, 10, 8]) * s * u(0.8, 1.15)
    level = u(-55, 15) * s
    wall = u(2.5, 4.5)
    food = rng.random() < 0.3
    fluid_hu = u(0, 25)

    def organ_tube(key, pts, r):
        return lambda b: b.cached(key, lambda bb: np.maximum(_tube(bb, pts, r), np.maximum(cavity(bb, -1.5), below_dome(bb))))

    stomach = organ_tube("stomach", st_pts, st_r)
    duod = organ_tube("duod", du_pts, du_r)
    panc = organ_tube("panc", pa_pts, pa_r)
    pb = cv.box(*_tube_bounds(pa_pts, pa_r))
    cv.paint(pb, panc, lambda r: c.PANC + 9 * r.tex(2.0) - 25 * np.clip(r.tex(4.0) - 1.3, 0, None))
    for fn, airy in ((stomach, True), (duod, False)):
        pts, r = (st_pts, st_r) if airy else (du_pts, du_r)
        b = cv.box(*_tube_bounds(pts, r))
        if b is None:
            continue
        fo = fn(b)
        cv.paint(b, fo, lambda r_: c.WALL + 5 * r_.tex(2.0))
        lumen = fo + wall + 1.2 * cv.box_texture(b, 4.0)
        cv.paint(b, lumen, (lambda r_: fluid_hu + 20 + 18 * r_.tex(4.0)) if (food and airy) else fluid_hu)
        lvl = level if airy else u(-40, 5) * s
        cv.paint(b, np.maximum(lumen, b.Y - lvl), -1000.0)

    # Colon and a few small-bowel loops below the liver.
    co_pts = [(-85 * s, 5 * s, bottom + 20), (-88 * s, -12 * s, c.d(178)), (-72 * s, -48 * s, c.d(150)),
              (-30 * s, -70 * s, c.d(160)), (20 * s, -70 * s, c.d(156)), (68 * s, -45 * s, c.d(122)),
              (88 * s, -5 * s, c.d(118)), (90 * s, 25 * s, c.d(165)), (88 * s, 25 * s, bottom + 20)]
    co_pts = [(p[0] + u(-6, 6), p[1] + u(-6, 6), p[2] + u(-8, 8)) for p in co_pts]
    co_r = np.full(len(co_pts), 20 * s * u(0.8, 1.15))
    colon = organ_tube("colon", co_pts, co_r)
    cb = cv.box(*_tube_bounds(co_pts, co_r))
    if cb is not None:
        fo = colon(cb)
        cv.paint(cb, fo, lambda r: c.WALL - 10)
        air_thr = u(0.0, 1.0)
        stool_hu = u(-30, 40)

        def stool(r):
            t = r.tex(4.0)
            af = 1.0 / (1.0 + np.exp(-(t - air_thr) * 4.0))
            return af * -950.0 + (1 - af) * (stool_hu + 25 * r.tex(2.0))

        cv.paint(cb, fo + 2.0, stool)
    for _ in range(int(rng.integers(3, 8))):
        p0 = np.array([u(-55, 55) * s, u(-75, -25) * s, c.d(u(150, 240))])
        pts = [p0]
        for _ in range(3):
            pts.append(pts[-1] + rng.normal(0, 18, 3))
        rr = np.full(4, u(9, 13) * s)
        wall_hu, lum_hu, air = u(90, 135), u(5, 30), rng.random() < 0.35
        b = cv.box(*_tube_bounds(pts, rr))
        if b is None:
            continue
        fo = np.maximum(_tube(b, pts, rr), np.maximum(cavity(b, -2.0), below_dome(b) + 40))
        if not (fo < 0).any():
            continue
        cv.paint(b, fo, lambda r, w_=wall_hu: w_ + 5 * r.tex(2.0))
        cv.paint(b, fo + 2.5, lum_hu)
        if air:
            cv.paint(b, np.maximum(fo + 2.5, b.Y - (p0[1] - u(0, 8))), -1000.0)

    # Liver: right lobe, tapering left lobe, caudate; smooth union, random warp, clipped by the
    # cavity and the diaphragm, neighbours cut out.
    rl_c = (-72 * s + u(-6, 6), 8 * s + u(-5, 5), c.d(75 + u(-6, 6)))
    rl_r = (74 * s * u(0.92, 1.08), 90 * s * u(0.92, 1.08), 80 * u(0.9, 1.15))
    rl_R = _rot(math.radians(u(-5, 20)), math.radians(u(10, 25)), 0.0)  # lower right lobe lateral and posterior
    ll_c = (12 * s + u(-8, 8), -46 * s + u(-5, 5), c.d(40 + u(-6, 6)))
    ll_r = (72 * s * u(0.8, 1.15), 33 * s * u(0.85, 1.15), 42 * u(0.85, 1.15))
    taper = u(0.5, 0.75)
    cl_c = (-10 * s, 22 * s, c.d(60))
    cl_r = (17 * s, 19 * s, 30.0)
    lw = _Warp(rng, u(7, 13), (80, 180), 6)
    lw2 = _Warp(rng, u(2.0, 4.0), (30, 60), 4)
    gb_on = rng.random() < 0.85
    gb_c = (-32 * s + u(-6, 6), -45 * s + u(-6, 6), c.d(110 + u(-8, 8)))
    gb_r = (14 * s * u(0.8, 1.2), 17 * s * u(0.8, 1.2), 34 * u(0.8, 1.2))
    gb_R = _rot(math.radians(u(-40, -20)), 0, math.radians(u(-20, 20)))
    ivc_pts = [(-18 * s, -14 * s, top), (-20 * s, 2 * s, c.d(30)), (-24 * s, 8 * s, c.d(80)), (-24 * s, 6 * s, c.d(140)),
               (-22 * s, 5 * s, bottom + 20)]
    ivc_r = [12 * s, 11.5 * s, 11 * s, 11 * s, 11 * s]
    kR = kid["R"]
    une = u(2.5, 6.0)

    def liver_f(b):
        X, Y, D = lw2(*lw(b.X, b.Y, b.D))
        rl = _ellipsoid(X, Y, D, rl_c, rl_r, rl_R)
        x = X - np.float32(ll_c[0])
        tp = 1.0 - taper * np.clip(x / ll_r[0], 0, 1)
        ll = _ellipsoid_local(x, (Y - ll_c[1]) / tp, (D - ll_c[2]) / tp, ll_r) * tp
        cl = _ellipsoid(X, Y, D, cl_c, cl_r)
        f = _smin(_smin(rl, ll, 14.0), cl, 8.0) + 1.5 * cv.box_texture(b, 10.0)
        f = np.maximum(f, np.maximum(cavity(b, -1.5), below_dome(b)))
        f = np.maximum(f, 3.0 - _ellipsoid(b.X, b.Y, b.D, kR[0], kR[1], kR[2]))
        for fn in (stomach, duod, colon, panc):
            f = np.maximum(f, 3.0 - fn(b))
        f = np.maximum(f, 0.5 - _tube(b, ivc_pts, ivc_r))
        f = np.maximum(f, 3.0 - spleen(b))
        if gb_on:
            f = np.maximum(f, 1.0 - _ellipsoid(b.X, b.Y, b.D, gb_c, gb_r, gb_R))
        return np.minimum(f, 4 * _M)

    lbox = cv.box((-c.ac - 5, -c.b_ant - 5, c.DR - 10), (ll_c[0] + ll_r[0] + 20, c.b_post + 5, c.d(170) + 25))
    fl = liver_f(lbox) if lbox is not None else None
    liver_occ = None
    if fl is not None:
        liver_occ = cv.paint(lbox, fl, lambda r: c.P + une * r.tex(20.0) + 2.0 * r.tex(4.0))
        if liver_occ is not None:
            cv.hold_liver(liver_occ)
    out.update(liver_box=lbox, liver_f=fl, liver_occ=liver_occ)

    # Gallbladder (wall, bile) in its fossa under the liver.
    if gb_on:
        gbb = cv.box(np.array(gb_c) - max(gb_r) - 6, np.array(gb_c) + max(gb_r) + 6)
        if gbb is not None:
            fg = np.maximum(_ellipsoid(gbb.X, gbb.Y, gbb.D, gb_c, gb_r, gb_R), cavity(gbb, -2.0))
            cv.paint(gbb, fg, c.WALL)
            cv.paint(gbb, fg + 2.0, c.BILE)

    # Intrahepatic vessels: hepatic veins (dark), portal branches (bright), arteries alongside.
    hilum = np.array([-38 * s, -12 * s, c.d(90)])
    ivc_top = np.array([-20 * s, -2 * s, c.d(18)])
    segs_hv, segs_pv, segs_ha = [], [], []

    def inside_liver(p, margin=2.0):
        if lbox is None or fl is None:
            return False
        iz = int(np.argmin(np.abs(lbox.D[:, 0, 0] - p[2])))
        iy = int(np.argmin(np.abs(lbox.y - p[1])))
        ix = int(np.argmin(np.abs(lbox.x - p[0])))
        return bool(fl[iz, iy, ix] < -margin)

    def grow(start, direction, length, radius, level_, out_list, rmin, spread):
        d = direction / np.linalg.norm(direction)
        end = start + d * length
        tries = 0
        while not inside_liver(end, radius + 1.5) and tries < 3:
            length *= 0.65
            end = start + d * length
            tries += 1
        if not inside_liver(end, radius + 0.5) or length < 4.0:
            return
        out_list.append((start, end, radius, radius * 0.9))
        if level_ <= 0 or radius * 0.72 < rmin:
            return
        # A thinner side branch at an angle and the continuing trunk.
        side = np.cross(d, rng.normal(0, 1, 3))
        side /= np.linalg.norm(side) + 1e-9
        ang = u(0.5, 0.9)
        grow(end, d * math.cos(ang) + side * math.sin(ang), length * u(0.55, 0.8), radius * u(0.55, 0.7), level_ - 1,
             out_list, rmin, spread)
        grow(end, d + rng.normal(0, spread, 3), length * u(0.7, 0.9), radius * u(0.75, 0.88), level_ - 1, out_list, rmin, spread)

    if fl is not None:
        for tgt in ((-95 * s, 15 * s, c.d(75)), (-50 * s, -62 * s, c.d(80)), (15 * s, -58 * s, c.d(48))):
            tgt = np.array(tgt) + rng.normal(0, 6, 3)
            dvec = tgt - ivc_top
            grow(ivc_top, dvec, np.linalg.norm(dvec) * 0.45, u(5.0, 6.5), 5, segs_hv, 1.1, 0.25)
        rp = np.array([-68 * s, 2 * s, c.d(84)]) + rng.normal(0, 4, 3)
        lp = np.array([-5 * s, -32 * s, c.d(72)]) + rng.normal(0, 4, 3)
        umb = np.array([8 * s, -52 * s, c.d(62)]) + rng.normal(0, 4, 3)
        segs_pv += [(hilum, rp, 6.5 * s, 5.8 * s), (hilum, lp, 5.5 * s, 5.0 * s), (lp, umb, 5.0 * s, 4.2 * s)]
        for st, base in ((rp, np.array([-0.6, -0.6, -0.5])), (rp, np.array([-0.5, 0.7, 0.5])), (rp, np.array([-1.0, 0.1, 0.0])),
                         (umb, np.array([0.8, -0.2, -0.2])), (umb, np.array([0.2, -0.5, 0.8])), (lp, np.array([0.1, 0.4, -0.9]))):
            grow(st, base + rng.normal(0, 0.25, 3), u(22, 36), u(3.6, 4.6), 5, segs_pv, 1.0, 0.3)
        for a, b_, ra, rb in segs_pv:
            if ra > 2.2:
                perp = np.cross(b_ - a, rng.normal(0, 1, 3))
                perp = perp / (np.linalg.norm(perp) + 1e-9) * (ra + 1.6)
                segs_ha.append((a + perp, b_ + perp, 1.2, 1.0))
    out["n_vessel_segments"] = (len(segs_hv), len(segs_pv), len(segs_ha))
    if liver_occ is not None:
        _segments_paint(cv, segs_hv, c.HV, clip=liver_occ)
        _segments_paint(cv, segs_pv, c.PV, clip=liver_occ)
        _segments_paint(cv, segs_ha, c.A * 0.8, clip=liver_occ)

    # Perfusion differences and focal fat: liver HU variation that is not a lesion.
    confounders = []
    if fl is not None and rng.random() < 0.15:
        for _ in range(int(rng.integers(1, 3))):
            kind = "perfusion" if rng.random() < 0.6 else "focal_fat"
            cand = np.argwhere((fl < -4) & (fl > -12)) if kind == "perfusion" else np.argwhere(fl < -15)
            if len(cand) == 0:
                continue
            iz, iy, ix = cand[rng.integers(len(cand))]
            cc = (float(lbox.x[ix]), float(lbox.y[iy]), float(lbox.D[iz, 0, 0]))
            rr = (u(10, 25), u(10, 25), u(8, 18))
            dhu = u(10, 25) if kind == "perfusion" else -u(10, 25)
            rot = _rot(*rng.uniform(0, 3.14, 3))
            eb = cv.box(np.array(cc) - 30, np.array(cc) + 30)
            if eb is not None:
                fe = _ellipsoid(eb.X, eb.Y, eb.D, cc, rr, rot) / 3.0  # soft: a three times wider edge
                cv.paint(eb, fe, lambda r, dh=dhu: c.P + dh + 2 * r.tex(4.0), clip=liver_occ)
                confounders.append({"kind": kind, "centre_mm_patient": [round(v, 1) for v in cc], "delta_hu": round(dhu, 1)})
    out["confounders"] = confounders

    # Veins: IVC (less enhanced below the renal veins), portal vein, SMV, splenic and renal veins.
    ivb = cv.box(*_tube_bounds(ivc_pts, ivc_r))
    if ivb is not None:
        mid = c.d(130)
        cv.paint(ivb, lambda b: _tube(b, ivc_pts, ivc_r),
                 lambda r: c.IVC_lo + (c.IVC_hi - c.IVC_lo) * np.clip((mid - r.D) / 40.0 + 0.5, 0, 1) + 4 * r.tex(4.0))
    conf = np.array([-2 * s, -22 * s, c.d(120)])
    veins = [
        ([conf, (-22 * s, -18 * s, c.d(105)), (-34 * s, -13 * s, c.d(94)), hilum], [7 * s, 7 * s, 6.8 * s, 6.5 * s], c.PV),
        ([conf, (-6 * s, -32 * s, c.d(150)), (-8 * s, -38 * s, bottom + 20)], [5.5 * s] * 3, c.PV * 0.95),
        ([conf, (25 * s, -12 * s, c.d(114)), (55 * s, 10 * s, c.d(105)), (spc[0] - 14 * s, spc[1] - 12 * s, spc[2] + 8)], [4.5 * s] * 4, c.PV),
    ]
    rv_hu = (c.A + c.PV) / 2
    for key in ("R", "L"):
        kc, kr, R = kid[key]
        hil = np.array(kc) + R @ np.array([-kr[0] * 0.9, 0, 0])
        if key == "L":
            veins.append(([hil, (c.Xa + 4, c.Ya - c.ra - 6, hil[2] - 4), (ivc_pts[3][0] + 6, ivc_pts[3][1], hil[2] - 6)], [5 * s] * 3, rv_hu))
        else:
            veins.append(([hil, (ivc_pts[3][0] - 4, ivc_pts[3][1], hil[2] - 6)], [5 * s] * 2, rv_hu))
    for pts, rr, hu in veins:
        b = cv.box(*_tube_bounds(pts, rr))
        if b is not None:
            cv.paint(b, lambda bb, pts=pts, rr=rr: _tube(bb, pts, rr), hu)

    # Arteries: aorta (calcified plaque in some), celiac, hepatic, splenic, SMA, renal arteries.
    ao_pts = [(c.Xa + u(-2, 2), c.Ya + u(-2, 2), top), (c.Xa, c.Ya, c.d(60)), (c.Xa + u(-3, 3), c.Ya + u(-2, 2), c.d(140)),
              (c.Xa + u(-4, 4), c.Ya + u(-3, 3), bottom + 20)]
    ao_r = [c.ra * 1.05, c.ra, c.ra * 0.95, c.ra * 0.9]
    aob = cv.box(*_tube_bounds(ao_pts, ao_r))
    if aob is not None:
        cv.paint(aob, lambda b: _tube(b, ao_pts, ao_r), lambda r: c.A + 5 * r.tex(4.0))
    cel0 = np.array([c.Xa, c.Ya - c.ra + 3, c.d(110)])
    cel1 = np.array([c.Xa - 2, c.Ya - c.ra - 18 * s, c.d(108)])
    arteries = [
        ([cel0, cel1], [3.5, 3.2]),
        ([cel1, (-10 * s, -30 * s, c.d(110)), (-28 * s, -25 * s, c.d(104)), (-38 * s, -15 * s, c.d(92))], [2.8, 2.6, 2.5, 2.3]),
        ([cel1, (20 * s, -26 * s, c.d(104)), (40 * s, -12 * s, c.d(111)), (60 * s, 8 * s, c.d(100)), (spc[0] - 16 * s, spc[1] - 10 * s, spc[2] + 5)],
         [2.9] * 5),
        ([(c.Xa, c.Ya - c.ra + 3, c.d(124)), (c.Xa - 3, c.Ya - c.ra - 16 * s, c.d(136)), (c.Xa - 5, -28 * s, c.d(165)),
          (c.Xa - 6, -32 * s, bottom + 20)], [3.6, 3.5, 3.3, 3.0]),
    ]
    for key in ("R", "L"):
        kc, kr, R = kid[key]
        hil = np.array(kc) + R @ np.array([-kr[0] * 0.85, kr[1] * 0.15, 3.0])
        arteries.append(([(c.Xa, c.Ya, hil[2] - 8), hil], [3.0, 2.6]))
    for pts, rr in arteries:
        b = cv.box(*_tube_bounds(pts, rr), fine=True)
        if b is not None:
            cv.paint(b, _tube(b, pts, rr), c.A * 0.95)
    if aob is not None and rng.random() < 0.4:
        for _ in range(int(rng.integers(2, 9))):
            ang = u(0, 2 * np.pi)
            dz = u(0, ext)
            pc = (c.Xa + (c.ra - 0.5) * math.cos(ang), c.Ya + (c.ra - 0.5) * math.sin(ang), dz)
            b = cv.box(np.array(pc) - 6, np.array(pc) + 6, fine=True)
            if b is not None:
                cv.paint(b, _ellipsoid(b.X, b.Y, b.D, pc, (u(1.2, 2.5), u(1.2, 2.5), u(1.5, 4))), u(400, 900))
    out["landmarks"] = {
        "aorta": (c.Xa, c.Ya, c.d(100)),
        "ivc": (ivc_pts[3][0], ivc_pts[3][1], c.d(140)),
        "portal_vein": tuple(float(v) for v in hilum),
        "spleen": spc,
        "right_kidney": kid["R"][0],
        "left_kidney": kid["L"][0],
        "vertebral_body": (0.0, c.Yv, c.d(100)),
    }
    return out


# ---------------------------------------------------------------------------------------------
# Lesions, image formation, public API


_HARD_MODES = ("small", "low_contrast", "edge", "lookalike")


def _draw_hard_modes(rng, lesion_class: str) -> set:
    """One or two ways to make a lesion hard; small and faint together would make it invisible."""
    pool = [m for m in _HARD_MODES if not (m == "lookalike" and lesion_class == "cyst")]
    modes = set(rng.choice(pool, size=int(rng.integers(1, 3)), replace=False).tolist())
    if "small" in modes:
        modes.discard("low_contrast")
    return modes


def _lesion_label(lesion_class: str) -> int:
    return LABEL_BY_KEY[lesion_class].value


def _lesion_meta(spec: lm.LesionSpec, occ: np.ndarray, sl, spacing, clipped_frac: float, reasons: list) -> dict:
    px, py, sz = spacing
    area = (occ >= 0.5).sum(axis=(1, 2)) * (px * py)
    ks = np.flatnonzero(area > 0)
    by_k = [[int(sl[0].start + k), round(float(area[k]), 2)] for k in ks]
    c = spec.centre_mm
    return {
        "class": spec.lesion_class,
        "centre_ijk": [round(float(c[0] / px), 2), round(float(c[1] / py), 2), round(float(c[2] / sz), 2)],
        "diameter_mm": round(float(spec.diameter_mm), 2),
        "hard": bool(reasons),
        "hard_reasons": sorted(set(reasons)),
        "clipped_fraction": round(float(clipped_frac), 3),
        "n_voxels": int((occ >= 0.5).sum()),
        "max_area_mm2": round(float(area.max()) if area.size else 0.0, 2),
        "area_mm2_by_k": by_k,
        "params": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in spec.params.items()
                   if not k.startswith("_") and isinstance(v, (int, float, bool))},
    }


def _paint_lesions(cv: _Canvas, c: _Case, anat: dict, lesion_class: str, n: int, rng, hard_case: bool, spacing, thick):
    lbox, fl, liver_occ = anat["liver_box"], anat["liver_f"], anat["liver_occ"]
    label = np.zeros(cv.shape, np.uint8)
    metas = []
    if n == 0 or fl is None or liver_occ is None:
        return label, metas
    px, py, sz = spacing
    # Only coarse points whose slice lies in the volume are candidates.
    zin = (lbox.z >= cv.zf[0]) & (lbox.z <= cv.zf[-1])
    placed = []
    for _ in range(n):
        modes = _draw_hard_modes(rng, lesion_class) if hard_case else set()
        d = lm.draw_diameter(rng, lesion_class, small="small" in modes)
        R = 0.5 * d
        for shrink in (1.0, 0.7, 0.5, 0.35):
            if "edge" in modes:
                cand = (fl < 0.15 * R) & (fl > -0.35 * R - 1.0)
            else:
                cand = fl < -min(0.6 * R * shrink + 2.0, 30.0)
            cand &= zin[:, None, None]
            idx = np.argwhere(cand)
            if len(idx) == 0:
                continue
            ok = None
            for _try in range(25):
                iz, iy, ix = idx[rng.integers(len(idx))]
                p = np.array([lbox.x[ix], lbox.y[iy], lbox.D[iz, 0, 0]], np.float64) + rng.uniform(-1, 1, 3)
                if all(np.linalg.norm(p - q) > 0.85 * (R + rq) + 2.0 for q, rq in placed):
                    ok = p
                    break
            if ok is not None:
                break
            R *= 0.8
        else:
            continue
        if ok is None:
            continue
        d = 2.0 * R
        placed.append((ok, R))
        centre_mm = (ok[0] - cv.xf[0], ok[1] - cv.yf[0], (cv.z_top - ok[2]) - cv.zf[0])
        spec = lm.draw_lesion(lesion_class, rng, diameter_mm=d, parenchyma_hu=c.P, aorta_hu=c.A, centre_mm=centre_mm,
                              hard=tuple(m for m in modes if m in ("low_contrast", "lookalike")))
        sl, occ, hu = lm.render_lesion(spec, cv.shape, spacing, thick, rng)
        if sl is None:
            continue
        bounds = (sl[0].start, sl[0].stop, sl[1].start, sl[1].stop, sl[2].start, sl[2].stop)
        clipped = np.minimum(occ, liver_occ.take(bounds))
        total = float(occ.sum())
        if total <= 0 or float(clipped.sum()) < 0.3 * total or not (clipped >= 0.5).any():
            placed.pop()
            continue
        frac = 1.0 - float(clipped.sum()) / total
        reasons = list(spec.hard_reasons)
        if frac > 0.08 or "edge" in modes:
            reasons.append("edge")
        view = cv.img[sl]
        view += clipped * (hu - view)
        label[sl][clipped >= 0.5] = _lesion_label(lesion_class)
        metas.append(_lesion_meta(spec, clipped, sl, spacing, frac, reasons))
    return label, metas


def _noise_field(rng, shape, fc: float, sigma_z: float) -> np.ndarray:
    """Unit-variance noise with a CT-like in-plane power spectrum: rising with spatial frequency
    (filtered back projection's ramp) and rolled off by the reconstruction kernel at `fc`
    cycles/pixel; correlated along k by `sigma_z` slices (overlapping thick slices)."""
    from scipy import fft as sfft

    n = rng.standard_normal(shape, dtype=np.float32)
    fy = np.fft.fftfreq(shape[1]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[2]).astype(np.float32)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    h = np.sqrt(f + 0.02) * np.exp(-0.5 * (f / fc) ** 2)
    spec = sfft.rfft2(n, workers=-1)
    spec *= h.astype(np.complex64)
    n = sfft.irfft2(spec, s=shape[1:], workers=-1).astype(np.float32, copy=False)
    if sigma_z > 0.3:
        n = ndimage.gaussian_filter1d(n, sigma_z, axis=0, mode="nearest", truncate=3.0)
    n /= max(float(n.std()), 1e-6)
    return n


def _form_image(cv: _Canvas, rng, noise_hu: float, thick: float, sz: float) -> tuple:
    psf = float(rng.uniform(0.45, 0.8))
    img = ndimage.gaussian_filter(cv.img, (0.0, psf, psf), mode="nearest", truncate=3.0)
    fc = float(rng.uniform(0.14, 0.3))
    sigma_z = 0.35 * thick / sz if thick > sz * 1.05 else 0.0
    if noise_hu > 0:
        img += np.float32(noise_hu) * _noise_field(rng, img.shape, fc, sigma_z)
    np.rint(img, out=img)
    np.clip(img, -1024, 3071, out=img)
    return img.astype(np.int16), {"psf_px": round(psf, 3), "noise_cutoff_cyc_per_px": round(fc, 3)}


def generate_case(
    seed: int,
    lesion_class: Optional[str] = None,
    *,
    matrix: int = 256,
    n_slices: Optional[int] = None,
    spacing: Optional[tuple] = None,
    noise_hu: Optional[float] = None,
    hard: Optional[bool] = None,
    phase: str = "arterial",
) -> PhantomCase:
    """One synthetic case. The seed fixes everything; anatomy, noise and lesion draws come from
    separate streams, so one seed with different classes (or phases) gives the same patient.

    lesion_class: None draws one of the five classes (normal included). noise_hu: None draws
    8-25 HU; 0 gives a noise-free image. hard: None draws (25 % of cases), True forces hard
    lesions (small, faint, at the edge, look-alike), False forbids the deliberate ones. phase:
    "arterial", or "unenhanced" (no contrast; lesion_class normal or cyst only, see the module)."""
    if lesion_class is not None and lesion_class not in CLASS_NAMES:
        raise ValueError(f"unknown class {lesion_class!r}; expected one of {', '.join(CLASS_NAMES)} or None")
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
    if phase == "unenhanced" and lesion_class not in UNENHANCED_CLASSES:
        raise ValueError(f"an unenhanced phantom takes lesion_class {' or '.join(UNENHANCED_CLASSES)}, not {lesion_class!r}: "
                         "the other classes are defined by how they enhance")
    if int(matrix) < 32:
        raise ValueError("matrix must be at least 32")
    if int(seed) < 0:
        raise ValueError(f"seed must be 0 or more, not {seed}")
    matrix = int(matrix)
    ss = np.random.SeedSequence(int(seed))
    r_case, r_anat, r_les, r_img = (np.random.default_rng(x) for x in ss.spawn(4))
    drawn = CLASS_NAMES[int(r_case.integers(len(CLASS_NAMES)))]
    cls = lesion_class or drawn
    hard_case = bool(r_case.random() < 0.25) if hard is None else bool(hard)
    n_les = 0 if cls == "normal" else int(r_case.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
    noise = float(r_case.uniform(8, 25)) if noise_hu is None else float(noise_hu)

    px, py, sz, thick, nk, fov_pref = _draw_geometry(r_case, matrix, n_slices, spacing)
    c = _Case(r_anat, nk * sz)
    if phase == "unenhanced":
        c.unenhance(np.random.default_rng(np.random.SeedSequence([int(seed), _PHASE_STREAM])))
    if px is None:
        fov = float(np.clip(max(2 * c.half_width / 0.92, 340 + 130 * fov_pref), 300, 480))
        px = py = fov / matrix
    jx, jy = r_case.uniform(-8, 8, 2)
    y_mid = 0.5 * (c.half_depth_post - c.half_depth_ant) + 12.0
    origin = (
        float(jx - 0.5 * (matrix - 1) * px),
        float(jy + y_mid - 0.5 * (matrix - 1) * py),
        float(round(r_case.uniform(-250, -120) - 0.5 * nk * sz, 2)),
    )
    z_top = origin[2] + (nk - 1) * sz
    coarse = (3.0, 3.0)
    fine = (float(np.clip(1.2 * max(px, py), 0.8, 1.6)), float(np.clip(sz, 1.0, 2.0)))
    cv = _Canvas(r_img, (nk, matrix, matrix), (px, py, sz), thick, origin, (jx, jy), z_top, coarse, fine)
    anat = _paint_anatomy(cv, c, r_anat)
    label, lesions = _paint_lesions(cv, c, anat, cls, n_les, r_les, hard_case, (px, py, sz), thick)
    liver = np.zeros(cv.shape, np.uint8)
    held = cv.liver_label()
    if held is not None:
        liver[held[0]] = held[1]
    liver[label > 0] = 1
    ct, img_meta = _form_image(cv, r_img, noise, thick, sz)
    geom = dict(spacing=(px, py, sz), origin=origin, direction=np.eye(3))
    if cls != "normal" and not lesions:
        cls_out = "normal"  # no room for a lesion (tiny field of view): say so rather than mislabel
    else:
        cls_out = cls
    meta = {
        "source": "phantom",
        "seed": int(seed),
        "lesion_class": cls_out,
        "requested_class": cls,
        "hard": bool(hard_case or any(les["hard"] for les in lesions)),
        "lesions": lesions,
        "spacing": [round(px, 4), round(py, 4), round(sz, 4)],
        "slice_thickness_mm": round(thick, 3),
        "matrix": matrix,
        "n_slices": nk,
        "noise_hu": round(noise, 2),
        "phase": phase,
        "parenchyma_hu": round(c.P, 1),
        "aorta_hu": round(c.A, 1),
        "portal_hu": round(c.PV, 1),
        "patient_centre_lps": [round(float(jx), 2), round(float(jy), 2)],
        # Centres of structures in LPS mm (at one level; they may lie outside a short volume).
        "landmarks_lps": {k: [round(float(v[0] + jx), 2), round(float(v[1] + jy), 2), round(float(z_top - v[2]), 2)]
                          for k, v in anat["landmarks"].items()},
        "confounders": anat["confounders"],
        **img_meta,
    }
    return PhantomCase(
        case_id=f"phantom_{int(seed)}",
        ct=Volume(ct, **geom),
        liver=Volume(liver, **geom),
        lesion=Volume(label, **geom),
        lesion_class=cls_out,
        meta=meta,
    )


def _case_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def case_plan(n: int, seed: int, classes: Optional[Sequence[str]] = None) -> list:
    """(case_id, case seed, class) of the `n` cases `generate_cases(n, seed)` makes: each block
    of five holds each class once, in a seeded order; entry i depends only on (seed, i).

    `classes` narrows the plan (a class-focused set, to give training more cases of the classes it
    confuses): each block then holds each listed entry once, so a class listed twice comes twice as
    often. Listing the five classes in their usual order gives the default plan."""
    pool = list(CLASS_NAMES) if classes is None else [str(c) for c in classes]
    if not pool:
        raise ValueError("classes is empty; give at least one class, or None for all five")
    unknown = sorted(set(pool) - set(CLASS_NAMES))
    if unknown:
        raise ValueError(f"unknown class {', '.join(map(repr, unknown))}; expected some of {', '.join(CLASS_NAMES)}")
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    plan, perm = [], []
    for i in range(int(n)):
        if i % len(pool) == 0:
            perm = [pool[j] for j in order.permutation(len(pool))]
        plan.append((f"phantom_s{int(seed)}_{i:05d}", _case_seed(seed, i), perm[i % len(pool)]))
    return plan


def case_phase(seed: int, index: int, lesion_class: str, unenhanced: float) -> str:
    """The phase of entry `index` of a plan: "unenhanced" for a share `unenhanced` of its normal and
    cyst cases (a draw of its own, so the share changes no other draw), else "arterial"."""
    if not 0.0 <= float(unenhanced) <= 1.0:
        raise ValueError(f"the unenhanced share must lie between 0 and 1, not {unenhanced}")
    if unenhanced <= 0 or lesion_class not in UNENHANCED_CLASSES:
        return "arterial"
    draw = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), _PHASE_STREAM])).random()
    return "unenhanced" if draw < float(unenhanced) else "arterial"


def generate_cases(n: int, seed: int, classes: Optional[Sequence[str]] = None, unenhanced: float = 0.0,
                   **kw) -> Iterator[PhantomCase]:
    """`n` cases balanced over the five classes, or over `classes` (see `case_plan`), generated
    lazily; a prefix of a longer run is identical to a shorter run. `unenhanced`: the share of the
    normal and cyst cases made without contrast (`case_phase`); the others are those of the default."""
    for i, (case_id, case_seed, cls) in enumerate(case_plan(n, seed, classes)):
        case = generate_case(case_seed, cls, phase=case_phase(seed, i, cls, unenhanced), **kw)
        case.case_id = case_id
        case.meta["index"] = i
        yield case


# ---------------------------------------------------------------------------------------------
# Lesions in real scans


def _robust_std(x: np.ndarray) -> float:
    if x.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def _highpass(a: np.ndarray) -> np.ndarray:
    """In-plane fine-scale residual: mostly noise, little anatomy."""
    return a - ndimage.gaussian_filter(a, (0.0, 1.5, 1.5), mode="nearest")


def scan_liver_stats(ct: Volume, liver: Volume) -> tuple:
    """(median liver HU, robust SD of the liver's fine-scale in-plane residual): the reference
    for lesion contrast and the noise level that inserted lesions are given."""
    mask = np.asarray(liver.array) > 0
    if not mask.any():
        return float("nan"), float("nan")
    nz = np.argwhere(mask)
    lo, hi = np.maximum(nz.min(0) - 3, 0), np.minimum(nz.max(0) + 4, mask.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    return _liver_stats(np.asarray(ct.array)[crop].astype(np.float32), mask[crop])


def _liver_stats(a: np.ndarray, m: np.ndarray) -> tuple:
    core = ndimage.binary_erosion(m, structure=np.ones((1, 5, 5), bool))
    if core.sum() < 50:
        core = m
    return float(np.median(a[core])), _robust_std(_highpass(a)[core])


def insert_lesions(ct: Volume, liver: Volume, lesion_class: str, rng, n_lesions: Optional[int] = None, *,
                   hard: tuple = (), meta_out: Optional[list] = None):
    """Paint `n_lesions` (1-3 when None) lesions of one class into a real scan's liver.

    Contrast is relative to this scan: its median liver HU stands for the parenchyma and an
    arterial level 150-230 HU above it for the aorta; the lesion carries synthetic noise scaled
    so that its fine-scale statistics match the scan's own liver. Lesions are clipped to the liver
    label, so every lesion voxel lies inside it. Returns (ct_with_lesions int16, lesion label
    uint8); per-lesion metadata (as in `PhantomCase.meta["lesions"]`) is appended to `meta_out`."""
    if lesion_class not in LESION_CLASSES:
        raise ValueError(f"unknown lesion class {lesion_class!r}; expected one of {', '.join(LESION_CLASSES)}")
    ct.require_same_geometry(liver, "liver mask")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    mask = np.asarray(liver.array) > 0
    if not mask.any():
        from .errors import NoLiverFoundError

        raise NoLiverFoundError("the liver mask is empty: lesions can only be inserted into a labelled liver")
    si, sj, sk = ct.spacing
    base = np.asarray(ct.array)
    arr = base.astype(np.float32)
    touched = np.zeros(arr.shape, bool)
    label = np.zeros(arr.shape, np.uint8)
    nz = np.argwhere(mask)
    lo = np.maximum(nz.min(0) - 3, 0)
    hi = np.minimum(nz.max(0) + 4, mask.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    m = mask[crop]
    P, resid_sd = _liver_stats(arr[crop], m)
    A = P + float(rng.uniform(150, 230))
    # Signed distance to the liver surface in mm (positive inside). The volume's first and last
    # slices are not a surface: the liver goes on beyond them, so those faces are padded with copies.
    pad_k = (3 if lo[0] == 0 else 0, 3 if hi[0] == mask.shape[0] else 0)
    mp = np.pad(m, (pad_k, (0, 0), (0, 0)), mode="edge")
    mp = np.pad(mp, ((0, 0), (1, 1), (1, 1)))
    samp = (sk, sj, si)
    d_in = ndimage.distance_transform_edt(mp, sampling=samp)[pad_k[0]:mp.shape[0] - pad_k[1], 1:-1, 1:-1]
    d_out = ndimage.distance_transform_edt(~mp, sampling=samp)[pad_k[0]:mp.shape[0] - pad_k[1], 1:-1, 1:-1]
    sdist = (d_in - d_out).astype(np.float32)
    w = 0.5 * (si + sj)
    soft = np.where(m, np.clip(0.5 + sdist / w, 0.5, 1.0), 0.0).astype(np.float32)
    n = int(rng.integers(1, 4)) if n_lesions is None else int(n_lesions)
    dmax = float(sdist.max())
    placed = []
    value = _lesion_label(lesion_class)
    for _ in range(n):
        d = lm.draw_diameter(rng, lesion_class, small="small" in hard)
        d = min(d, max(5.0, 2.2 * dmax))
        R = 0.5 * d
        ok = None
        for need in (0.6 * R, 0.4 * R, 0.25 * R, 0.0):
            thr = min(need, 0.9 * dmax)
            if "edge" in hard:
                idx = np.argwhere((sdist > 0.5) & (sdist < max(0.35 * R, 1.5)))
            else:
                idx = np.argwhere(sdist >= max(thr, 0.5))
            if len(idx) == 0:
                continue
            for _try in range(25):
                p = idx[rng.integers(len(idx))]
                pm = (np.array([p[2], p[1], p[0]], float) + lo[::-1]) * np.array([si, sj, sk])
                if all(np.linalg.norm(pm - q) > 0.85 * (R + rq) + 2.0 for q, rq in placed):
                    ok = pm
                    break
            if ok is not None:
                break
        if ok is None:
            continue
        spec = lm.draw_lesion(lesion_class, rng, diameter_mm=d, parenchyma_hu=P, aorta_hu=A, centre_mm=ok,
                              hard=tuple(h for h in hard if h in ("low_contrast", "lookalike")))
        sl, occ, hu = lm.render_lesion(spec, arr.shape, (si, sj, sk), sk, rng)
        if sl is None:
            continue
        # The lesion block in crop coordinates; voxels outside the crop are outside the liver.
        clip = np.zeros_like(occ)
        src = tuple(slice(max(s.start, c.start), min(s.stop, c.stop)) for s, c in zip(sl, crop))
        if all(s.stop > s.start for s in src):
            dst = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(src, sl))
            cs_ = tuple(slice(s.start - c.start, s.stop - c.start) for s, c in zip(src, crop))
            clip[dst] = soft[cs_]
        occ_c = np.minimum(occ, clip)
        total = float(occ.sum())
        if total <= 0 or not (occ_c >= 0.5).any():
            continue
        placed.append((ok, R))
        noise = _noise_field(rng, occ.shape, 0.25, 0.0)
        nres = _robust_std(_highpass(noise))
        noise *= np.float32(resid_sd / max(nres, 1e-6))
        hu_b = ndimage.gaussian_filter(hu, (0.0, 0.5, 0.5), mode="nearest") + noise
        view = arr[sl]
        view += occ_c * (hu_b - view)
        touched[sl] |= occ_c > 0
        label[sl][occ_c >= 0.5] = value
        reasons = list(spec.hard_reasons)
        frac = 1.0 - float(occ_c.sum()) / total
        if frac > 0.08 or "edge" in hard:
            reasons.append("edge")
        if meta_out is not None:
            info = _lesion_meta(spec, occ_c, sl, (si, sj, sk), frac, reasons)
            info.update(parenchyma_hu=round(P, 1), noise_resid_hu=round(resid_sd, 2))
            meta_out.append(info)
    # Voxels no lesion touches keep their exact values (also outside -1024..3071).
    out = np.clip(base, -32768, 32767).astype(np.int16)
    out[touched] = np.clip(np.rint(arr[touched]), -1024, 3071).astype(np.int16)
    label[~mask] = 0  # belt and braces: never outside the given liver
    return ct.with_array(out), ct.with_array(label)


def load_real_cases(real_dir) -> list:
    """(name, ct, liver) for every recognised case folder under `real_dir` (see its README):
    a CT (``ct.nii.gz`` or a ``dicom/`` series) with a liver label (``liver_seg.nrrd`` binary,
    or a TotalSegmentator label file where liver = 5) brought onto the CT's grid."""
    from . import io as dio

    out = []
    for sub in sorted(Path(real_dir).iterdir()):
        if not sub.is_dir():
            continue
        ct_path = next((p for p in (sub / "ct.nii.gz", sub / "ct.nrrd", sub / "dicom") if p.exists()), None)
        if ct_path is None:
            continue
        seg = next((p for p in (sub / "liver_seg.nrrd", sub / "liver.nii.gz") if p.exists()), None)
        ts = sorted(sub.glob("*totalsegmentator*labels*.nii*"))
        if seg is None and not ts:
            continue
        ct = dio.read_volume(ct_path)
        ct = ct.with_array(np.clip(ct.array, -1024, 3071).astype(np.int16))
        if seg is not None:
            liver = dio.read_mask(seg, like=ct)
        else:
            lab = dio.align_to_grid(dio.read_volume(ts[0]), ct, "label map")
            liver = ct.with_array((lab.array == 5).astype(np.uint8))
        if liver.array.any():
            out.append((sub.name, ct, liver))
    return out


# ---------------------------------------------------------------------------------------------
# Files


_CSV_COLUMNS = ("case_id", "lesion_class", "n_lesions", "spacing", "noise", "path", "slice_thickness", "hard", "source")


def _write_case(out: Path, case: PhantomCase) -> dict:
    from .io import write_volume

    folder = out / case.case_id
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_volume(case.ct, folder / "ct.nii.gz")
    write_volume(case.liver, folder / "liver.nii.gz")
    write_volume(case.lesion, folder / "lesion.nii.gz")
    (folder / "meta.json").write_text(json.dumps(case.meta, indent=1, default=_json_default))
    sp = case.ct.spacing
    return {
        "case_id": case.case_id,
        "lesion_class": case.lesion_class,
        "n_lesions": len(case.meta.get("lesions", [])),
        "spacing": "x".join(f"{v:.4g}" for v in sp),
        "noise": f"{case.meta.get('noise_hu', float('nan')):.2f}",
        "path": case.case_id,
        "slice_thickness": f"{case.meta.get('slice_thickness_mm', sp[2]):.3g}",
        "hard": int(bool(case.meta.get("hard", False))),
        "source": case.meta.get("source", "phantom"),
    }


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@functools.lru_cache(maxsize=2)
def _real_cases_cached(key: str) -> tuple:
    return tuple(load_real_cases(key))


def real_cases(real_dir, seed: int) -> Iterator[PhantomCase]:
    """Each real scan once per class: unchanged ("normal") and with lesions of each lesion class.
    The scans are read once per process (they are small) and never modified."""
    for ci, (name, ct, liver) in enumerate(_real_cases_cached(str(Path(real_dir).resolve()))):
        par_hu, resid = scan_liver_stats(ct, liver)
        for li, cls in enumerate(CLASS_NAMES):
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xBEEF, ci, li]))
            metas: list = []
            if cls == "normal":
                ct_out, lab = ct.with_array(ct.array.copy()), ct.with_array(np.zeros(ct.shape, np.uint8))
            else:
                hard = tuple(sorted(_draw_hard_modes(rng, cls))) if rng.random() < 0.25 else ()
                ct_out, lab = insert_lesions(ct, liver, cls, rng, hard=hard, meta_out=metas)
            liv = liver.with_array(((liver.array > 0) | (lab.array > 0)).astype(np.uint8))
            meta = {
                "source": "real",
                "real_case": name,
                "seed": int(seed),
                "lesion_class": cls if (cls == "normal" or metas) else "normal",
                "requested_class": cls,
                "hard": any(m["hard"] for m in metas),
                "lesions": metas,
                "spacing": [round(float(v), 4) for v in ct.spacing],
                "slice_thickness_mm": round(float(ct.spacing[2]), 3),
                "noise_hu": round(resid, 2),  # fine-scale residual SD in the liver (the scan's own noise)
                "parenchyma_hu": round(par_hu, 1),
            }
            yield PhantomCase(f"real_{name}_{cls}", ct_out, liv, lab, meta["lesion_class"], meta)


def write_cases(out_dir, n: int, seed: int, *, real_dir=None, overwrite: bool = False,
                progress: Optional[Callable[[int, int], None]] = None, **kw) -> Path:
    """Write `n` phantom cases (and, with `real_dir`, real scans with inserted lesions) as
    ``<out>/<case_id>/{ct,liver,lesion}.nii.gz`` + ``meta.json``, listed in ``<out>/cases.csv``."""
    from .errors import OutputExistsError

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} already holds files: choose an empty --out folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    total = int(n)
    for i, case in enumerate(generate_cases(n, seed, **kw)):
        rows.append(_write_case(out, case))
        if progress:
            progress(i + 1, total)
    if real_dir is not None:
        for case in real_cases(real_dir, seed):
            rows.append(_write_case(out, case))
    with open(out / "cases.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(_CSV_COLUMNS))
        wr.writeheader()
        wr.writerows(rows)
    return out / "cases.csv"
