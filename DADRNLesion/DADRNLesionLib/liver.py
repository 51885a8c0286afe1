"""Automatic liver segmentation on CT of any phase, without learned weights.

Why a classical method: the product must run offline in seconds on a CPU, and no liver model weights
exist here. Every step has a physical reason and parameters in millimetres, or in HU relative to
levels estimated on the scan itself, so the method does not depend on one scanner's or phase's
contrast (docs/liver.md has the accuracy, speed and parameter sensitivity):

1. Orientation: the array is permuted/flipped into a canonical frame (axis 0 inferior->superior,
   1 anterior->posterior, 2 patient right->left) from the direction cosines, so "patient right" is
   never assumed to be image left. Oblique volumes use the nearest axis permutation; the mask maps
   back exactly onto the input voxels.
2. A coarse grid (block means, ~2.5 mm) keeps it fast and averages noise.
3. Anatomy found on the scan: the body (> -400 HU, largest region, holes filled), the subcutaneous
   fat and the depth beneath it (the abdominal wall), the spine (bone in the posterior middle, less
   a contrast-filled aorta), and the muscle level (the mode of the paraspinal muscles' HU).
4. Liver level: the liver is the largest homogeneous soft-tissue organ in the right upper body away
   from wall and spine; the main mode of that region's histogram is the liver level and its width
   the band. Further modes are tried only if the main one does not give a liver-sized organ on the
   right.
5. Neighbours of liver density: an opening (`open_mm`) cuts bridges (IVC, kidney, stomach wall);
   the largest component on the patient's right is kept and regrown geodesically (a neighbour
   touching at one point is not followed along its length). Muscle is recognised as voxels closer
   to the muscle level than to the liver level that connect to the subcutaneous fat (the wall) or
   to the spine (crura, psoas); the compartment behind the spine (back muscles) is never liver.
6. Uneven enhancement (perfusion, beam hardening, a darker right lobe): the band follows a slowly
   varying liver level (normalised convolution over `field_mm`), re-estimated a few times.
7. Slice-to-slice consistency rejects sudden jumps in area (leaks).
8. The surface: a blurred edge crosses half-way between the liver level and the tissue outside; the
   last `edge_mm` are grown down to that half level (next to fat, about -20 HU; next to muscle,
   the midpoint; next to the lung's air, the midpoint to the diaphragm's muscle in between), so
   the surface is not drawn inside the true edge, nor over the diaphragm.
9. Lesions, vessels, hilum: holes are filled per slice and in 3D, and a closing (`close_mm`) over
   non-fat, non-muscle tissue adds hypo- and hyperdense lesions at the surface; a lesion bulging
   further out is added when the liver wraps much of it and does not merely cover it from above (the
   gallbladder). What the filling took in that continues outside the liver as itself (IVC, kidney
   pole, gallbladder, portal vein trunk) is dropped again, with the blurred rim of it that the band
   had taken; a lesion touching such an organ is split from it at the neck and kept.
10. Full resolution: the coarse mask is interpolated at block centres and its boundary re-decided
    voxel by voxel with the same rules (band, half level), so the surface is not stair-stepped.
11. Partial volume: a surface voxel more liver than fat (above the liver/fat midpoint) is liver,
    unless it lies in muscle's own range and connects to the wall's muscle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
from scipy import ndimage as ndi

from .errors import NoLiverFoundError, UserInputError
from .liver_check import bounding_box, check_liver_mask, summary_line  # the last two re-exported for callers
from .volume import Volume

__all__ = [
    "LiverParams",
    "segment_liver",
    "check_liver_mask",
    "summary_line",
    "totalsegmentator_liver",
    "canonical_frame",
]

Progress = Optional[Callable[[str], None]]


@dataclass(frozen=True)
class LiverParams:
    """Tunable quantities, all physical. Defaults are the documented ones (docs/liver.md)."""

    grid_mm: float = 2.5  # target spacing of the working grid (in-plane; z only if finer)
    smooth_mm: float = 2.0  # Gaussian sigma applied to the HU image before thresholding
    band_k: float = 2.5  # half-width of the intensity band, in units of the per-scan liver spread
    min_band_hu: float = 18.0  # the band is never narrower than this on either side (noise floor)
    wall_mm: float = 20.0  # zone beneath the subcutaneous fat where wall muscle competes with liver
    open_mm: float = 8.0  # opening radius that cuts bridges to neighbours of liver density
    close_mm: float = 12.0  # closing radius that adds surface lesions, hilum, fissures
    field_mm: float = 30.0  # scale of the slowly varying enhancement field
    max_area_jump: float = 1.6  # a slice may not exceed this factor times its neighbour's area
    spine_mm: float = 40.0  # radius around the spine where crura, psoas and back muscles lie
    edge_mm: float = 9.0  # how far the surface may settle outwards onto the half level of the edge
    refine: bool = True  # re-decide the surface at full resolution
    refine_steps: float = 1.0  # outward settling at full resolution, in coarse voxels
    partial_mm: float = 1.5  # how far the surface may take in partial-volume voxels against fat (in-plane)
    partial_muscle_k: float = 2.5  # ... where muscle is only what lies within this many of its spreads (>= 15 HU) below its level; 0: anything darker
    air_behind_wall: bool = True  # air outside the liver lies behind a wall of muscle density (the diaphragm)
    passing_mm: float = 15.0  # a filled-in structure that continues this far outside the liver is not liver
    passing_radius_mm: float = 6.0  # ... and is this thick: IVC, portal vein trunk, kidney; not intrahepatic veins
    passing_part_mm: float = 12.0  # a filled-in piece is split into parts whose centres lie this far apart ...
    passing_neck: float = 0.75  # ... where the neck between two is thinner than this share of the thicker one
    passing_room: float = 0.3  # the continuation outside is at least this share of the part's thickness
    passing_tube: float = 2.0  # a part this elongated (length / width) may be followed through thin fillings
    passing_rim_mm: float = 6.0  # a dropped organ's partial-volume rim, up to this deep in the band, goes with it
    surface_mm: float = 30.0  # surface lesions: tissue up to this far outside the filled mask is looked at ...
    surface_contact: float = 0.45  # ... and a part whose border is at least this share liver is added ...
    surface_radius_mm: float = 5.0  # ... when it is this thick (a radius; thinner is a partial-volume sliver) ...
    surface_below: float = 0.25  # ... and the liver lies under it for at least this share of the contact above it


# --------------------------------------------------------------------------------------------
# orientation


@dataclass(frozen=True)
class CanonicalFrame:
    """How to go from an input array [k,j,i] to the canonical array [S, P, L] and back."""

    perm: tuple[int, int, int]  # canonical axis c is input array axis perm[c]
    flip: tuple[bool, bool, bool]  # flip canonical axis c after the permutation
    spacing: tuple[float, float, float]  # canonical (S, P, L) spacing in mm

    def to_canonical(self, a: np.ndarray) -> np.ndarray:
        b = np.transpose(a, self.perm)
        sl = tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)
        return b[sl]

    def from_canonical(self, b: np.ndarray) -> np.ndarray:
        sl = tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)
        b = b[sl]
        inv = np.argsort(self.perm)
        return np.transpose(b, inv)


def canonical_frame(vol: Volume) -> CanonicalFrame:
    """Nearest axis permutation mapping the volume onto (superior, posterior, left) array axes.

    direction columns are the LPS unit vectors of i, j, k; array axis a holds ijk axis 2-a.
    Canonical axis 0 increases towards Superior (+z), 1 towards Posterior (+y), 2 towards Left (+x).
    """
    d = np.asarray(vol.direction, dtype=np.float64)
    best = None
    import itertools

    # phys axis for canonical c: 0 -> z (row 2), 1 -> y (row 1), 2 -> x (row 0)
    phys_of_canon = (2, 1, 0)
    for perm_ijk in itertools.permutations(range(3)):
        # perm_ijk[c] = ijk axis used for canonical axis c
        score = sum(abs(d[phys_of_canon[c], perm_ijk[c]]) for c in range(3))
        if best is None or score > best[0] + 1e-9:
            best = (score, perm_ijk)
    perm_ijk = best[1]
    perm = tuple(2 - p for p in perm_ijk)
    flip = tuple(bool(d[phys_of_canon[c], perm_ijk[c]] < 0) for c in range(3))
    spacing = tuple(float(vol.spacing[perm_ijk[c]]) for c in range(3))
    return CanonicalFrame(perm=perm, flip=flip, spacing=spacing)


# --------------------------------------------------------------------------------------------
# grid helpers


def _factors(shape, spacing, grid_mm):
    f = []
    for c, (n, s) in enumerate(zip(shape, spacing)):
        fc = max(1, int(round(grid_mm / s)))
        if c == 0 and n < 8:  # a handful of slices: keep them all
            fc = 1
        f.append(min(fc, max(1, n)))
    return tuple(f)


def _block_mean(a: np.ndarray, f) -> np.ndarray:
    pads = [(0, (-n) % fc) for n, fc in zip(a.shape, f)]
    if any(p[1] for p in pads):
        a = np.pad(a, pads, mode="edge")
    s = a.shape
    r = a.reshape(s[0] // f[0], f[0], s[1] // f[1], f[1], s[2] // f[2], f[2])
    return r.mean(axis=(1, 3, 5), dtype=np.float32)


def _ball_ops(mask, r_mm, spacing, op):
    """Erosion/dilation by a ball of radius r_mm on an anisotropic grid.

    Built from unit steps (cross and square in-plane alternately, which approximates a disc, and
    one slice in z while the z radius lasts), so the cost does not grow with the volume's extent
    as a distance transform's does. For erosion the outside of the array counts as inside, so a
    liver cut by the first or last slice (a partial scan) is not eroded from that border.
    """
    n_xy = int(round(r_mm / min(spacing[1:])))
    n_z = int(round(r_mm / spacing[0]))
    if (n_xy <= 0 and n_z <= 0) or not mask.any():
        return mask.copy()
    # Only the mask's box plus what the operation can reach is computed: an erosion stays inside
    # the mask, a dilation grows by the steps. One more voxel of real background around the box
    # keeps the result identical to the whole-array one.
    reach = (1, 1, 1) if op == "erode" else (n_z + 1, n_xy + 1, n_xy + 1)
    box = bounding_box(mask, reach)
    result = np.zeros(mask.shape, bool)
    result[box] = _ball_steps(mask[box], n_xy, n_z, op)
    return result


def _ball_steps(mask, n_xy, n_z, op):
    out = mask
    cross = ndi.generate_binary_structure(2, 1)
    square = ndi.generate_binary_structure(2, 2)
    for step in range(max(n_xy, n_z)):
        st = np.zeros((3, 3, 3), bool)
        if step < n_xy:
            st[1] = cross if step % 2 == 0 else square
        st[1, 1, 1] = True
        if step < n_z:
            st[0, 1, 1] = st[2, 1, 1] = True
        if op == "erode":
            out = ndi.binary_erosion(out, st, border_value=1)
        else:
            out = ndi.binary_dilation(out, st)
    return out


def _open(mask, r_mm, spacing):
    return _ball_ops(_ball_ops(mask, r_mm, spacing, "erode"), r_mm, spacing, "dilate")


def _close(mask, r_mm, spacing):
    return _ball_ops(_ball_ops(mask, r_mm, spacing, "dilate"), r_mm, spacing, "erode")


_INPLANE = np.zeros((3, 3, 3), bool)
_INPLANE[1] = ndi.generate_binary_structure(2, 1)


def _fill_slices(mask):
    """Fill holes slice by slice (one labelling of the background with in-plane connectivity)."""
    lab, n = ndi.label(~mask, structure=_INPLANE)
    if n == 0:
        return mask.copy()
    border = np.zeros(mask.shape, bool)
    border[:, 0, :] = border[:, -1, :] = border[:, :, 0] = border[:, :, -1] = True
    outside = np.unique(lab[border & (lab > 0)])
    keep_bg = np.zeros(n + 1, bool)
    keep_bg[outside] = True
    return mask | ~keep_bg[lab]


def _geodesic(seed, allowed, structure, iterations):
    """Conditional dilation of seed inside allowed, computed only on allowed's bounding box."""
    if not seed.any() or iterations <= 0:
        return seed & allowed
    nz = np.nonzero(allowed)
    box = tuple(slice(max(0, int(a.min()) - 1), int(a.max()) + 2) for a in nz)
    out = np.zeros_like(seed)
    out[box] = ndi.binary_dilation(seed[box] & allowed[box], structure, iterations=iterations, mask=allowed[box])
    return out


def _largest_cc(mask, structure=None):
    lab, n = ndi.label(mask, structure=structure)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


# --------------------------------------------------------------------------------------------
# input checks


def _check_ct(arr: np.ndarray) -> None:
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise UserInputError(f"expected a 3D image, got an array of shape {arr.shape}")
    sample = arr[:: max(1, arr.shape[0] // 16), ::4, ::4]
    if not np.all(np.isfinite(sample)):
        raise UserInputError("the image holds NaN or infinite values: it does not look like CT in Hounsfield units")
    lo, hi = float(np.min(sample)), float(np.max(sample))
    if hi - lo < 50:
        raise NoLiverFoundError(
            "the image is (nearly) constant, so no liver can be found: check the input file, "
            "or provide a liver mask with --liver-mask"
        )
    if np.count_nonzero(sample < -500) < max(20, 1e-4 * sample.size):
        raise UserInputError(
            f"the image does not look like CT in Hounsfield units (values {lo:.4g}..{hi:.4g}, no air "
            "below -500): give an abdominal CT in HU (check the rescale slope/intercept), or provide a "
            "liver mask with --liver-mask"
        )


# --------------------------------------------------------------------------------------------
# the method on the canonical coarse grid


@dataclass
class _Scan:
    """The coarse canonical image and the per-scan anatomy the method reasons with."""

    hu: np.ndarray  # smoothed coarse HU
    raw: np.ndarray  # coarse block means
    spacing: tuple[float, float, float]
    body: np.ndarray
    u: np.ndarray  # 0 at the patient's right body edge, 1 at the left edge (per slice)
    v: np.ndarray  # 0 anterior, 1 posterior (per slice)
    homogeneous: np.ndarray
    wall_depth: np.ndarray  # mm beneath the subcutaneous fat (0 in it and outside the body)
    spine_dist: np.ndarray  # in-plane mm to the spine's centre (inf where no spine was seen)
    behind_spine: np.ndarray  # the back muscles' compartment: behind the spine, within 36 mm of it
    muscle: tuple[float, float]  # (mode, spread) of skeletal muscle HU on this scan
    info: dict = field(default_factory=dict)

    def crop(self, sl) -> "_Scan":
        """The same scan restricted to a box (views, no copies): keeps the work near the liver."""
        a = {k: getattr(self, k)[sl] for k in ("hu", "raw", "body", "u", "v", "homogeneous", "wall_depth", "spine_dist", "behind_spine")}
        return _Scan(spacing=self.spacing, muscle=self.muscle, info=self.info, **a)


def _box_around(mask, margin_mm, spacing):
    nz = np.nonzero(mask)
    out = []
    for a, n, sp in zip(nz, mask.shape, spacing):
        m = int(np.ceil(margin_mm / sp))
        out.append(slice(max(0, int(a.min()) - m), min(n, int(a.max()) + m + 1)))
    return tuple(out)


def _body_mask(raw, spacing):
    air = raw > -400
    body = ndi.binary_opening(air, np.array([[[0, 0, 0], [0, 1, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]], [[0, 0, 0], [0, 1, 0], [0, 0, 0]]], bool)[1:2]) if min(raw.shape[1:]) > 8 else air
    # the torso is the largest connected region; arms and the table are separate or cut off
    body = _largest_cc(body)
    if not body.any():
        return body
    return _fill_slices(body)


def _histogram_mode(vals, lo=-30.0, hi=250.0, width=2.0):
    """Mode and Gaussian-equivalent spread (from the half width at half maximum) of `vals`."""
    bins = np.arange(lo, hi + width, width)
    h, _ = np.histogram(vals, bins=bins)
    smooth_bins = 1.5
    hs = ndi.gaussian_filter1d(h.astype(float), smooth_bins)
    i = int(np.argmax(hs))
    sd = _peak_sd(hs, i, width, smooth_bins)
    return float(bins[i] + width / 2), float(np.clip(sd, 3.0, 40.0)), hs, bins


def _peak_sd(hs: np.ndarray, i: int, width: float, smooth_bins: float) -> float:
    """Gaussian-equivalent spread of the smoothed histogram's peak at bin i: from its half width at
    half maximum (the narrower side, which a neighbouring peak does not widen), less the smoothing."""
    half = hs[i] / 2
    a = i
    while a > 0 and hs[a] > half:
        a -= 1
    b = i
    while b < len(hs) - 1 and hs[b] > half:
        b += 1
    hwhm = min(i - a, b - i) * width
    return float(np.sqrt(max((hwhm / 1.1774) ** 2 - (smooth_bins * width) ** 2, 0.0)))


def _prepare(canon: np.ndarray, spacing_full, p: LiverParams) -> tuple[_Scan, tuple[int, int, int]]:
    f = _factors(canon.shape, spacing_full, p.grid_mm)
    raw = _block_mean(np.clip(canon, -1024, 3071), f)
    spacing = tuple(float(s * fc) for s, fc in zip(spacing_full, f))
    sig = [min(p.smooth_mm / s, 2.0) if s < 2.5 * p.smooth_mm else 0.0 for s in spacing]
    hu = ndi.gaussian_filter(raw, sigma=sig, mode="nearest") if any(sig) else raw.copy()
    body = _body_mask(raw, spacing)
    if body.sum() * np.prod(spacing) < 50_000:  # < 50 ml of body: nothing to segment
        raise NoLiverFoundError(
            "no body was found in the image (almost everything is air): check the input, "
            "or provide a liver mask with --liver-mask"
        )
    # normalised in-slice coordinates from each slice's body extent
    nz, ny, nx = raw.shape
    u = np.full(raw.shape, -1.0, np.float32)
    v = np.full(raw.shape, -1.0, np.float32)
    for z in range(nz):
        ys, xs = np.nonzero(body[z])
        if ys.size == 0:
            continue
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        u[z] = ((np.arange(nx) - x0) / max(1, x1 - x0))[None, :]
        v[z] = ((np.arange(ny) - y0) / max(1, y1 - y0))[:, None]
    # local homogeneity: std over ~7 mm of the block means
    size = [max(1, int(round(7.0 / s)) | 1) for s in spacing]
    m1 = ndi.uniform_filter(raw, size, mode="nearest")
    m2 = ndi.uniform_filter(raw * raw, size, mode="nearest")
    lstd = np.sqrt(np.maximum(m2 - m1 * m1, 0))
    soft = body & (hu > -30) & (hu < 250)
    thr = np.percentile(lstd[soft], 40) if soft.any() else 0
    homogeneous = soft & (lstd <= max(thr, 1.0))
    wall_depth, wall_layer = _wall_depth(raw, hu, body, spacing)
    spine_dist, behind, paraspinal = _spine(hu, raw, body, u, v, spacing)
    # muscle level: the paraspinal muscles are thick and always in an abdominal scan; the wall
    # layer (thinner, partial volume with fat) is the fallback
    vals = hu[paraspinal] if paraspinal.sum() >= 50 else hu[wall_layer]
    muscle = _histogram_mode(vals)[:2] if vals.size >= 50 else (float("nan"), float("nan"))
    fat_vals = raw[body & (raw > -250) & (raw < -30)]
    fat = _histogram_mode(fat_vals, lo=-250.0, hi=-30.0)[0] if fat_vals.size >= 50 else -100.0
    info = {"factors": f, "muscle": muscle, "fat": fat}
    return _Scan(hu, raw, spacing, body, u, v, homogeneous, wall_depth, spine_dist, behind, muscle, info), f


def _wall_depth(raw, hu, body, spacing):
    """Depth (mm) beneath the subcutaneous fat, and the muscle layer just beneath that fat.

    The abdominal wall muscles lie directly inside the subcutaneous fat all around the body and,
    in native and arterial scans, touch the liver without a visible fat plane.
    """
    fat = body & (raw < -40)
    outside = ~body
    rim = ndi.binary_dilation(outside, _INPLANE, iterations=2) & body
    lab, n = ndi.label(fat | rim, structure=_INPLANE)  # components within each slice
    subq = np.zeros_like(body)
    if n:
        touch = np.unique(lab[rim])
        sel = np.zeros(n + 1, bool)
        sel[touch[touch > 0]] = True
        subq = sel[lab]
    d = _inplane_distance(~(outside | subq), spacing[1:])
    layer = body & ~subq & (d > 1.5) & (d < 10.0) & (hu > -30) & (hu < 150)
    return d, layer


def _contrast_filled_vessels(bone, raw, spacing_yx):
    """The parts of one slice's > 200 HU that are a contrast-filled vessel, not bone.

    In the arterial phase the aorta (250-450 HU) lies just in front of the spine and above the
    bone threshold; counted as bone, it pulls the spine's centre forwards, and the back muscles'
    compartment behind that centre then takes the caudate lobe. A vessel's cross-section is
    round, solid and uniformly filled (its spread is the noise); a vertebra is not round with its
    arch, cortex and marrow differ by hundreds of HU, and where the marrow is below the threshold
    the cortex is a ring. Measured on the phantoms' coarse grid: 97 %
    of aortic sections pass this test, 6 % of spinal ones (the median over slices absorbs those).
    """
    out = np.zeros_like(bone)
    lab, n = ndi.label(bone)
    if n == 0:
        return out
    px_cm2 = spacing_yx[0] * spacing_yx[1] / 100.0
    areas = np.bincount(lab.ravel(), minlength=n + 1) * px_cm2
    for c, box in enumerate(ndi.find_objects(lab), start=1):
        if box is None or not 1.0 <= areas[c] <= 12.0:  # an aorta is 2-8 cm^2; a vertebra with its arch more
            continue
        box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)
        part = lab[box] == c
        if ndi.binary_fill_holes(part).sum() > 1.1 * part.sum():  # a cortical ring around marrow
            continue
        inner = ndi.binary_erosion(part)
        vals = raw[box][inner if inner.sum() >= 4 else part]
        spread = 1.4826 * float(np.median(np.abs(vals - np.median(vals))))
        ys, xs = np.nonzero(part)
        ev = np.linalg.eigvalsh(np.cov(np.vstack([ys * spacing_yx[0], xs * spacing_yx[1]])))
        roundness = float(np.sqrt(max(ev[0], 0.0) / max(ev[1], 1e-6)))
        if spread <= 30.0 and roundness >= 0.75:
            out[box] |= part
    return out


def _spine(hu, raw, body, u, v, spacing):
    """Distance to the spine's centre per slice, and a paraspinal muscle sample for the muscle level.

    The spine is the bone (> 200 HU) in the posterior middle of the body, less contrast-filled
    vessels; slices without it take the centre of the nearest slice that has it.
    """
    nz, ny, nx = hu.shape
    bone = (hu > 200) & body & (u > 0.3) & (u < 0.7) & (v > 0.45)
    centres = np.full((nz, 2), np.nan)
    for z in range(nz):
        ys, xs = np.nonzero(bone[z] & ~_contrast_filled_vessels(bone[z], raw[z], spacing[1:]))
        if ys.size * spacing[1] * spacing[2] >= 100:  # >= 1 cm^2 of bone
            centres[z] = (np.median(ys), np.median(xs))
    have = np.nonzero(~np.isnan(centres[:, 0]))[0]
    # the spine runs on through the slices: a slice's centre is the median of its neighbours'
    # within 12 mm, so a slice whose bone is a lone arch or a vessel the test missed does not jump
    zs = have * spacing[0]
    smoothed = centres.copy()
    for z in have:
        near = have[np.abs(zs - z * spacing[0]) <= 12.0]
        smoothed[z] = np.median(centres[near], axis=0)
    centres = smoothed
    dist = np.full(hu.shape, np.inf, np.float32)
    para = np.zeros(hu.shape, bool)
    behind = np.zeros(hu.shape, bool)
    if have.size == 0:
        return dist, behind, para
    Y, X = np.mgrid[0:ny, 0:nx]
    for z in range(nz):
        zc = have[np.argmin(np.abs(have - z))]
        yc, xc = centres[zc]
        dy = (Y - yc) * spacing[1]
        dx = (X - xc) * spacing[2]
        dist[z] = np.hypot(dx, dy)
        behind[z] = (dy > 5.0) & (np.abs(dx) < 36.0)
        if z in have:
            para[z] = (np.abs(dx) > 15) & (np.abs(dx) < 60) & (dy > 10) & (dy < 70)
    para &= body & (hu > -30) & (hu < 150)
    return dist, behind, para


def _intensity_candidates(s: _Scan, p: LiverParams, n_max: int = 3):
    """Liver intensity candidates: modes of homogeneous soft tissue in the right upper body."""
    region = s.homogeneous & (s.wall_depth > p.wall_mm) & (s.u < 0.55) & (s.v < 0.85) & (s.spine_dist > p.spine_mm)
    if region.sum() < 50:
        region = s.homogeneous & (s.wall_depth > 0)
    if region.sum() < 50:
        raise NoLiverFoundError(
            "no soft tissue of organ density was found inside the body: the image may not cover the "
            "upper abdomen; provide a liver mask with --liver-mask"
        )
    vals = s.hu[region]
    w = (1.2 - s.u[region]).clip(0.2, 1.2)  # a soft preference for the right
    bins = np.arange(-30.0, 251.0, 2.0)
    h, _ = np.histogram(vals, bins=bins, weights=w)
    smooth_bins = 1.5
    hs = ndi.gaussian_filter1d(h.astype(float), smooth_bins)
    centres = 0.5 * (bins[1:] + bins[:-1])
    peaks = [i for i in range(1, len(hs) - 1) if hs[i] >= hs[i - 1] and hs[i] > hs[i + 1] and hs[i] > 0.15 * hs.max()]
    peaks.sort(key=lambda i: -hs[i])
    out = []
    for i in peaks[:n_max]:
        sigma = _peak_sd(hs, i, 2.0, smooth_bins)
        out.append((float(centres[i]), float(np.clip(sigma, 3.0, 40.0)), float(hs[i] / hs.max())))
    if not out:
        raise NoLiverFoundError(
            "no liver-like intensity peak was found in the right upper abdomen: provide a liver mask "
            "with --liver-mask"
        )
    return out


def _allowed(s: _Scan, level, p: LiverParams, muscle_range_only: bool = False):
    """Voxels that may be liver given the muscles around it.

    Never in the subcutaneous fat. A muscle layer is the set of voxels closer to this scan's muscle
    level than to the local liver level (midpoint = equal-distance decision boundary) that is
    connected, through such voxels, to where muscle starts: the inner face of the subcutaneous fat
    (the abdominal wall, up to `wall_mm` deep) or the spine (crura, psoas, back muscles, up to
    `spine_mm` from its centre). Connectedness matters: a noisy dark voxel inside the liver is not
    muscle, a layer growing in from the wall is. Where liver and muscle differ by less than 8 HU,
    intensity cannot decide and the outer half of the wall zone is excluded by position instead.

    `muscle_range_only` (for the partial-volume rim, step 11): muscle is only what lies within
    muscle's own range (`partial_muscle_k` spreads, at least 15 HU, below its level). A voxel
    darker than that beside the liver is a mixture with fat, and the fat midpoint decides it; for
    the band and the closing the wider rule stays, so they do not spread into the fat-streaked
    muscle of the wall.
    """
    mu_m = s.muscle[0]
    # the liver never lies behind the spine next to it: that is the back muscles' compartment
    ok = s.body & (s.wall_depth > 0) & ~s.behind_spine
    if not np.isfinite(mu_m):
        return ok & (s.wall_depth > 0.5 * p.wall_mm)
    level = np.asarray(level, dtype=np.float32)
    separable = (level - mu_m) > 8.0
    darkish = separable & (s.hu < 0.5 * (level + mu_m)) & ok
    if muscle_range_only and p.partial_muscle_k > 0:
        darkish &= s.hu >= mu_m - max(p.partial_muscle_k * s.muscle[1], 15.0)
    n_wall = max(1, int(round(p.wall_mm / min(s.spacing[1:]))))
    wall_zone = s.wall_depth < p.wall_mm
    seed = darkish & wall_zone & (s.wall_depth <= 1.5 * max(s.spacing[1:]))
    wall = _geodesic(seed, darkish & wall_zone, _INPLANE, n_wall)
    spine_zone = s.spine_dist < p.spine_mm
    if spine_zone.any():
        bone = (s.hu > 200) & (s.spine_dist < 25.0)
        seed = darkish & spine_zone & ndi.binary_dilation(bone, _INPLANE, iterations=2)
        n_sp = max(1, int(round(p.spine_mm / min(s.spacing[1:]))))
        wall |= _geodesic(seed, darkish & spine_zone, _INPLANE, n_sp)
    inseparable_wall = ~separable & wall_zone & (s.wall_depth < 0.5 * p.wall_mm)
    return ok & ~wall & ~inseparable_wall


def _inplane_distance(inside, spacing_yx):
    """In-plane distance (mm) of each voxel to the nearest outside voxel of its own slice.

    One 2D transform per slice: three times faster than a 3D one with an infinite z spacing, and
    the same values. A slice with no outside voxel gets infinity (deep in every comparison).
    """
    d = np.full(inside.shape, np.inf, np.float32)
    for k in range(inside.shape[0]):
        if not inside[k].all():
            d[k] = ndi.distance_transform_edt(inside[k], sampling=spacing_yx)
    return d


def _regrow(core, band, r_mm, spacing):
    """Geodesic dilation of `core` inside `band` by about r_mm (path length inside the band).

    Geodesic, not Euclidean: a neighbour that touches the liver at one point (a muscle strip
    behind a fat plane, a vessel) is only entered for r_mm from the contact, not along its length.
    """
    n_xy = max(1, int(round(r_mm / min(spacing[1:]))))
    n_z = int(round(r_mm / spacing[0]))
    out = core.copy()
    full = ndi.generate_binary_structure(3, 1)
    inplane = full.copy()
    inplane[0] = inplane[2] = False
    zonly = np.zeros((3, 3, 3), bool)
    zonly[:, 1, 1] = True
    allowed = band | core
    for step in range(max(n_xy, n_z)):
        st = full if (step < n_z and step < n_xy) else (inplane if step < n_xy else zonly)
        out = ndi.binary_dilation(out, st, mask=allowed)
    return out


def _select_component(opened, s: _Scan):
    """The liver: the largest component whose centroid lies on the patient's right."""
    lab, n = ndi.label(opened)
    if n == 0:
        return None
    idx = np.arange(1, n + 1)
    vox_ml = float(np.prod(s.spacing)) / 1000.0
    counts = ndi.sum_labels(np.ones(lab.shape, np.float32), lab, idx)
    usum = ndi.sum_labels(s.u, lab, idx)
    best, best_score = None, 0.0
    for c, cnt, us in zip(idx, counts, usum):
        score = cnt * vox_ml * _right_weight(us / cnt)
        if cnt * vox_ml >= 5 and score > best_score:
            best, best_score = c, score
    return None if best is None else lab == best


def _right_weight(ubar: float) -> float:
    """Position prior: 1 for a centroid well on the patient's right, 0 past the body's midline."""
    return float(np.clip((0.62 - ubar) / 0.25, 0.0, 1.0))


def _slice_consistency(mask, band, p: LiverParams):
    """Reject sudden per-slice area jumps (leaks) by keeping only what continues the neighbour."""
    area = mask.sum(axis=(1, 2)).astype(float)
    if mask.shape[0] < 3 or area.max() == 0:
        return mask
    out = mask.copy()
    zc = int(np.argmax(area))
    for order in (range(zc + 1, mask.shape[0]), range(zc - 1, -1, -1)):
        prev = zc
        for z in order:
            a, ap = out[z].sum(), out[prev].sum()
            if ap > 0 and a > p.max_area_jump * ap + 20:
                nb = ndi.binary_dilation(out[prev], iterations=3)
                lab, _ = ndi.label(out[z] & band[z])
                keep = np.unique(lab[nb & (lab > 0)])
                out[z] = np.isin(lab, keep[keep > 0]) & ndi.binary_dilation(nb, iterations=3)
            prev = z
    return out


def _half_level(s: _Scan, liver, local, half, p: LiverParams):
    """Per voxel, the HU half-way between the local liver level and the tissue just outside it.

    The true surface of a blurred edge is where the image crosses half-way between the two sides:
    about -20 HU next to fat, about 45 HU next to 25 HU muscle. The band (liver level +- half)
    stops above that, so on its own it puts the surface inside the true edge (by several mm
    where the surface is oblique to the slices, as at the dome). The outside level is the local
    mean of non-liver voxels in a shell 1-`edge_mm` mm outside the mask, with air counted at the
    muscle level (`air_behind_wall`): the lung's air is beyond the diaphragm, and clipped to
    -150 HU it drew the half level below the diaphragm's HU, so the surface growth took in the
    diaphragm wherever thick slices cut the dome obliquely (15-44 ml per phantom).
    """
    shell = _ball_ops(liver, p.edge_mm, s.spacing, "dilate") & ~_ball_ops(liver, 1.0, s.spacing, "dilate") & s.body
    sig = [max(5.0 / sp, 0.5) for sp in s.spacing]
    if p.air_behind_wall and np.isfinite(s.muscle[0]):
        # air outside the liver (the lung, gas in the gut) lies behind a wall of muscle density:
        # the diaphragm, the gut wall. That wall is the neighbour the edge is half-way to.
        vals = np.where(s.hu < -150.0, s.muscle[0], s.hu)
    else:
        vals = np.maximum(s.hu, -150.0)
    num = ndi.gaussian_filter(np.where(shell, vals, 0).astype(np.float32), sig, mode="nearest", truncate=3.0)
    den = ndi.gaussian_filter(shell.astype(np.float32), sig, mode="nearest", truncate=3.0)
    outside = np.where(den > 0.02, num / np.maximum(den, 1e-6), local - 2 * half)
    outside = np.minimum(outside, local - half)  # the neighbour of interest is the darker one
    return (0.5 * (local + outside)).astype(np.float32)


def _edge_band(s: _Scan, liver, local, half, p: LiverParams):
    """Band for the last few mm of the surface: down to the half level, up to the band's top.

    A blurred liver/muscle edge can look like muscle; it is reached only from the liver through
    other edge voxels (the growth is geodesic), so the muscle rule is not applied to it.
    """
    hl = _half_level(s, liver, local, half, p)
    edge = (s.hu >= hl) & (s.hu <= local + half) & s.body & (s.wall_depth > 0) & ~s.behind_spine
    return edge | ((np.abs(s.hu - local) <= half) & _allowed(s, local, p)), hl


def _local_field(liver, hu, mu, spacing, scale_mm):
    """Liver HU as a slowly varying field: normalised convolution of the HU inside the mask."""
    sig = [scale_mm / sp for sp in spacing]
    num = ndi.gaussian_filter(np.where(liver, hu, 0).astype(np.float32), sig, mode="nearest", truncate=3.0)
    den = ndi.gaussian_filter(liver.astype(np.float32), sig, mode="nearest", truncate=3.0)
    return np.where(den > 0.02, num / np.maximum(den, 1e-6), mu).astype(np.float32)


@dataclass
class _Result:
    liver: np.ndarray
    local: np.ndarray  # liver level field
    half: float  # band half-width (HU)
    mu: float
    sd: float
    half_level: np.ndarray  # HU half-way between liver and its outside, per voxel


def _segment_with(s: _Scan, mu, sigma, p: LiverParams, field_iters: int = 8) -> Optional[_Result]:
    """Segment the liver given one candidate liver intensity `mu` (spread `sigma`)."""
    half = max(p.band_k * sigma, p.min_band_hu)
    flat = np.full(s.hu.shape, mu, np.float32)
    band = (np.abs(s.hu - mu) <= half) & _allowed(s, flat, p)
    comp = _select_component(_open(band, p.open_mm, s.spacing), s)
    if comp is None:
        return None
    regrow_mm = p.open_mm + max(s.spacing[1:])
    liver = _regrow(comp, band, regrow_mm, s.spacing)
    local, sd = flat, sigma
    for _ in range(field_iters):
        if liver.sum() < 100:
            break
        # uneven enhancement (perfusion, beam hardening): the band follows the local liver level;
        # the work is restricted to a box around the current mask (growth per pass < the margin)
        box = _box_around(liver, max(p.field_mm, 2 * regrow_mm), s.spacing)
        sub, lv = s.crop(box), liver[box]
        loc = _local_field(lv, sub.hu, mu, s.spacing, p.field_mm)
        resid = (sub.hu - loc)[lv]
        sd = float(np.clip(1.4826 * np.median(np.abs(resid - np.median(resid))), 3.0, 40.0))
        half = max(p.band_k * sd, p.min_band_hu)
        band_b = (np.abs(sub.hu - loc) <= half) & _allowed(sub, loc, p)
        opened = _open(band_b, p.open_mm, s.spacing)
        lab, _ = ndi.label(opened)
        ids = np.unique(lab[lv & opened])
        ids = ids[ids > 0]
        if ids.size == 0:
            break
        new_b = _regrow(np.isin(lab, ids), band_b, regrow_mm, s.spacing)
        changed = np.count_nonzero(new_b ^ lv) + np.count_nonzero(liver) - np.count_nonzero(lv)
        liver = np.zeros_like(liver)
        liver[box] = new_b
        band = np.zeros_like(band)
        band[box] = band_b
        local = np.full(s.hu.shape, mu, np.float32)
        local[box] = loc
        if changed < 0.01 * liver.sum():
            break
    liver = _slice_consistency(liver, band, p)
    if not liver.any():
        return None
    box = _box_around(liver, 2 * p.edge_mm, s.spacing)
    eb, hl = _edge_band(s.crop(box), liver[box], local[box], half, p)
    grown = _regrow(liver[box], eb, p.edge_mm, s.spacing)
    half_level = np.full(s.hu.shape, -20.0, np.float32)
    half_level[box] = hl
    liver = np.zeros_like(liver)
    liver[box] = grown
    return _Result(liver, local, half, mu, sd, half_level)


def _complete(r: _Result, s: _Scan, p: LiverParams):
    """Fill holes (vessels, lesions) and add surface lesions/hilum via a tissue-limited closing.

    The closing (a ball of `close_mm`) adds only voxels denser than fat and allowed by the muscle
    rule, so a lesion bulging at the surface is included but the fat around the liver is not.
    """
    liver = _fill_slices(r.liver)
    closed = _close(liver, p.close_mm, s.spacing)
    tissue = (s.hu > -20) & _allowed(s, r.local, p)
    liver = liver | (closed & tissue)
    liver = _fill_slices(liver)
    liver = ndi.binary_fill_holes(liver)  # 3D holes (a lesion wholly inside)
    liver = _fill_slices(liver | _surface_lesions(liver, tissue, s, p))
    liver = _drop_passing_structures(liver, r.liver, s, p, tissue, r.local)
    return _largest_cc(liver)


def _surface_lesions(liver, tissue, s: _Scan, p: LiverParams):
    """Lesions at the surface that bulge out further than the closing reaches.

    Such a lesion is tissue beside the liver that is neither fat nor muscle (`tissue`) nor bone, and
    the liver wraps a large share of it. Neighbouring organs touch the liver over a small share of
    their border, or hang under it: the gallbladder in its fossa is covered by liver from above and
    has none beneath it, so a part whose contact below is less than `surface_below` of its contact
    above is not added. Parts are cut at necks as in `_drop_passing_structures`.
    """
    out = np.zeros_like(liver)
    if p.surface_mm <= 0 or not liver.any():
        return out
    box = _box_around(liver, p.surface_mm + 2 * max(s.spacing), s.spacing)
    lv = liver[box]
    near = ndi.distance_transform_edt(~lv, sampling=s.spacing) <= p.surface_mm
    candidate = near & ~lv & tissue[box] & (s.hu[box] < 400.0) & ~s.behind_spine[box]
    lab, n = ndi.label(candidate)
    vox_ml = float(np.prod(s.spacing)) / 1000.0
    for c, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(0, a.start - 1), min(d, a.stop + 1)) for a, d in zip(sl, lab.shape))
        comp, lvb = lab[sl] == c, lv[sl]
        if comp.sum() * vox_ml < 0.5:
            continue
        depth = ndi.distance_transform_edt(comp, sampling=s.spacing)
        if depth.max() < p.surface_radius_mm:  # a sliver: most candidates end here
            continue
        parts = _split_at_necks(comp, s.spacing, p.passing_part_mm, p.passing_neck, depth)
        for q in range(1, int(parts.max()) + 1):
            part = parts == q
            if depth[part].max() < p.surface_radius_mm:
                continue
            shell = ndi.binary_dilation(part) & ~part
            if (shell & lvb).sum() < p.surface_contact * shell.sum():
                continue
            above = (part[:-1] & lvb[1:]).sum()  # canonical axis 0 runs inferior -> superior
            below = (part[1:] & lvb[:-1]).sum()
            if below < p.surface_below * above:
                continue
            out[box][sl] |= part
    return out


def _drop_passing_structures(liver, core, s: _Scan, p: LiverParams, tissue=None, local=None):
    """Remove what the filling added that is an organ passing by, not a part of the liver.

    The IVC in its groove, the upper pole of the right kidney, the gallbladder and the portal vein
    trunk at the hilum can be wrapped by liver in a slice, so slice-wise filling and the closing take
    them in. A lesion ends within the liver; these continue outside it. The added voxels are opened
    by a ball of `passing_radius_mm` first: the IVC (about 2 cm across), the portal vein trunk
    (1.2-1.5 cm) and the kidney survive it, the hepatic veins and
    the intrahepatic portal branches, which also reach outside the liver through the IVC or the
    trunk but belong to it, do not.

    A lesion can touch such an organ, and the two then form one filled-in piece, so each piece is
    split at its necks (`_split_at_necks`) and each part judged alone. A part is followed outside the
    mask through tissue of its own density (geodesically, 3D) that is at least `passing_room` as thick
    as the part itself: an organ continues outside as itself (the IVC as a tube as wide as in the
    groove), while a lesion that merely touches the thin cortex of the kidney or a small vessel of
    its density does not pass through them. A part that reaches `passing_mm` beyond the liver's
    surface is dropped, with the added voxels within one radius of it that no kept part holds. The
    walk stays in `tissue` (no fat, no muscle) when given: an organ does not continue as the body wall.
    A tube (a part at least `passing_tube` times as long as it is wide: the IVC, not a lesion) may also
    walk through the thin fillings the opening removed, at its own density: where the band took a
    tube's blurred edge, only a thin filled channel may join it to where it leaves the liver. A round
    lesion may not: a thin filling is also what lies between a cyst and the gallbladder. A tube also
    passes when it runs on outside the mask for `passing_mm` (the IVC leaving the mask into a deep
    groove under the dome never gets far from the liver), and through segments of itself already
    dropped (a tube of uneven width is cut into segments at its necks).

    An organ only some 20 HU off the liver level (the IVC in the arterial phase) has a rim of blurred,
    noisy voxels within the intensity band, which the band took as liver (`core`). With the liver
    level field `local`, that rim, up to `passing_rim_mm` deep, goes with the organ where a voxel is
    nearer the organ's own level (its median) than the liver's: the edge re-decided at the half level.
    """
    if p.passing_mm <= 0:
        return liver
    added = liver & ~core
    thick = _open(added, p.passing_radius_mm, s.spacing) if added.any() else added
    lab, n = ndi.label(thick)
    if n == 0:
        return liver
    vox_ml = float(np.prod(s.spacing)) / 1000.0
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    outside = s.body & ~liver & (s.hu > -20)
    if tissue is not None:
        outside &= tissue
    thin = added & ~thick  # fillings the opening removed: vessel ends, blurred channels
    reach = ndi.distance_transform_edt(~liver, sampling=s.spacing)
    steps = max(1, int(round(2 * p.passing_mm / min(s.spacing))))
    margin = [int(np.ceil(2 * p.passing_mm / sp)) + 1 for sp in s.spacing]
    drop = np.zeros_like(liver)
    keep = np.zeros_like(liver)
    tubes_kept = []

    def walk(part, similar, box, tube=False):
        """Does `part` reach `passing_mm` beyond the surface through `similar` tissue with room (a
        tube: or run on outside the mask for `passing_mm`, within twice the usual walk)?"""
        if p.passing_room > 0:
            own = ndi.distance_transform_edt(part, sampling=s.spacing).max()
            room = ndi.distance_transform_edt(similar | part, sampling=s.spacing)
            similar = similar & (room >= p.passing_room * own)
        if not tube:
            walked = ndi.binary_dilation(part, iterations=steps, mask=part | similar)
            return reach[box][walked & ~part].max(initial=0.0) >= p.passing_mm
        # a tube in a deep groove (the IVC under the dome) runs on outside the mask without getting
        # far from it: the length of its run outside counts too
        out_b = ~liver[box]
        front, walked, first_out = part, part, None
        for k in range(1, 2 * steps + 1):
            grown = ndi.binary_dilation(front, mask=part | similar) & ~walked
            if not grown.any():
                return False
            walked = walked | grown
            front = grown
            if first_out is None and (grown & out_b).any():
                first_out = k
            if reach[box][grown].max(initial=0.0) >= p.passing_mm:
                return True
            if first_out is not None and (k - first_out) * min(s.spacing) >= p.passing_mm and (grown & out_b).any():
                return True
        return False

    for c, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None or sizes[c] * vox_ml < 1.0:
            continue
        box = tuple(slice(max(0, a.start - m), min(dim, a.stop + m)) for a, m, dim in zip(sl, margin, lab.shape))
        hu = s.hu[box]
        parts = _split_at_necks(lab[box] == c, s.spacing, p.passing_part_mm, p.passing_neck)
        for q in range(1, int(parts.max()) + 1):
            part = parts == q
            if part.sum() * vox_ml < 1.0:
                continue
            vals = hu[part]
            lo, hi = np.percentile(vals, 5) - 10.0, np.percentile(vals, 95) + 10.0
            similar = outside[box] & (hu >= lo) & (hu <= hi)
            tube = p.passing_tube > 0 and _elongation(part, s.spacing) >= p.passing_tube
            if tube:
                q1, q3 = np.percentile(vals, [25, 75])  # the tube's own density, not its blurred edge
                own_density = (hu >= q1 - 10.0) & (hu <= q3 + 10.0)
                similar |= thin[box] & own_density
            passing = walk(part, similar, box, tube)
            (drop if passing else keep)[box] |= part
            if tube and not passing:
                tubes_kept.append((box, part, similar | own_density))
    # a tube cut into segments (an uneven IVC) leaves the liver through the segments already dropped
    changed = True
    while changed and tubes_kept and drop.any():
        changed = False
        still_kept = []
        for box, part, similar in tubes_kept:
            if walk(part, similar & (outside[box] | thin[box] | drop[box]), box, True):
                drop[box] |= part
                keep[box] &= ~part
                changed = True
            else:
                still_kept.append((box, part, similar))
        tubes_kept = still_kept
    if not drop.any():
        return liver
    drop = _ball_ops(drop, p.passing_radius_mm, s.spacing, "dilate") & added & ~keep
    if local is not None and p.passing_rim_mm > 0 and drop.any():
        drop |= _organ_rim(drop, liver & core & ~keep, s, local, p.passing_rim_mm)
    return liver & ~drop


def _organ_rim(organ, band_liver, s: _Scan, local, rim_mm: float):
    """The voxels of `band_liver` within `rim_mm` of `organ` (geodesically) that lie nearer each
    organ component's median HU than the local liver level."""
    lab, n = ndi.label(organ)
    level = np.zeros(n + 1, np.float32)
    level[1:] = ndi.median(s.hu, lab, index=np.arange(1, n + 1))
    steps = max(1, int(round(rim_mm / min(s.spacing))))
    box = _box_around(organ, rim_mm + 2 * max(s.spacing), s.spacing)
    sub_lab, hu, loc, cand = lab[box], s.hu[box], local[box], band_liver[box]
    # the nearest component's level decides for each voxel (the organs rarely touch)
    dist, idx = ndi.distance_transform_edt(sub_lab == 0, sampling=s.spacing, return_indices=True)
    own = level[sub_lab[tuple(idx)]]
    closer = cand & (dist <= rim_mm) & (np.abs(hu - own) < np.abs(hu - loc))
    grown = ndi.binary_dilation(sub_lab > 0, iterations=steps, mask=(sub_lab > 0) | closer)
    out = np.zeros_like(organ)
    out[box] = grown & ~(sub_lab > 0)
    return out


def _elongation(part, spacing) -> float:
    """Length over width of a part from its principal axes (a rod of length L and diameter d: L/d)."""
    pts = np.argwhere(part) * np.asarray(spacing)
    if len(pts) < 4:
        return 0.0
    ev = np.sort(np.linalg.eigvalsh(np.cov(pts.T)))[::-1]
    return float(np.sqrt(12.0 * max(ev[0], 0.0)) / (4.0 * np.sqrt(max(ev[1], 1e-6))))


def _split_at_necks(piece, spacing, part_mm: float, neck: float, edt=None) -> np.ndarray:
    """Label the parts of `piece` that meet at a neck: a lesion touching the IVC, the kidney's pole.

    Seeds are the maxima of the distance to the piece's border at least `part_mm` apart; the piece is
    flooded from them in order of decreasing distance (a watershed of the distance map). A tube is cut
    into segments this way too, so two parts stay one where the thickest point of the border between
    them is at least `neck` times as thick as the thicker part: segments of a tube meet at full width,
    a ball meets what it touches at a neck. `edt`, the piece's distance map, when already at hand.
    """
    if edt is None:
        edt = ndi.distance_transform_edt(piece, sampling=spacing)
    size = [2 * max(1, int(round(part_mm / sp))) + 1 for sp in spacing]
    full = np.ones((3, 3, 3), bool)
    seeds, n = ndi.label(piece & (edt > 0) & (edt >= ndi.maximum_filter(edt, size=size)), structure=full)
    if n <= 1:
        return piece.astype(np.int32)
    parts = seeds.astype(np.int32)
    for level in np.arange(edt.max(), 0.0, -0.5 * min(spacing)):
        region = piece & (edt >= level)
        while True:
            grown = ndi.grey_dilation(parts, footprint=full)
            new = region & (parts == 0) & (grown > 0)
            if not new.any():
                break
            parts[new] = grown[new]
    tops = np.concatenate([[0.0], np.asarray(ndi.maximum(edt, seeds, index=np.arange(1, n + 1)))])
    # the thickest point of each border between two parts, from pairs of face neighbours
    a_all, b_all, w_all = [], [], []
    for ax in range(3):
        x, y = np.moveaxis(parts, ax, 0), np.moveaxis(edt, ax, 0)
        m = (x[:-1] != x[1:]) & (x[:-1] > 0) & (x[1:] > 0)
        a_all.append(np.minimum(x[:-1][m], x[1:][m]))
        b_all.append(np.maximum(x[:-1][m], x[1:][m]))
        w_all.append(np.minimum(y[:-1][m], y[1:][m]))
    a, b, w = (np.concatenate(v) for v in (a_all, b_all, w_all))
    root = np.arange(n + 1)

    def find(i):
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    if a.size:
        key = a.astype(np.int64) * (n + 1) + b
        order = np.lexsort((-w, key))
        first = np.ones(order.size, bool)
        first[1:] = key[order][1:] != key[order][:-1]
        for i in order[first]:  # one border per pair, at its thickest point
            if w[i] >= neck * max(tops[a[i]], tops[b[i]]):
                root[find(a[i])] = find(b[i])
    labels = np.array([find(i) for i in range(n + 1)])
    _, dense = np.unique(labels, return_inverse=True)  # 0 stays 0: root[0] == 0 is the smallest
    return dense.reshape(labels.shape)[parts].astype(np.int32)


def _score(liver, s: _Scan) -> float:
    ml = liver.sum() * float(np.prod(s.spacing)) / 1000.0
    if not liver.any():
        return 0.0
    return ml * _right_weight(float(s.u[liver].mean()))


def _to_full(r: _Result, liver_c: np.ndarray, f, canon: np.ndarray, s: _Scan, p: LiverParams) -> np.ndarray:
    """Coarse mask -> full canonical grid, with the boundary re-decided at full resolution.

    The coarse mask is interpolated linearly at block centres; near its boundary (within one coarse
    voxel) each full-resolution voxel is then decided by the same rule as on the coarse grid
    (inside the liver band around the interpolated local liver level, lightly smoothed), so the
    surface is not limited to the coarse grid's steps.
    """
    full_shape = canon.shape
    if not liver_c.any():
        return np.zeros(full_shape, bool)
    nzc = np.nonzero(liver_c)
    lo = [max(0, int(a.min()) - 2) for a in nzc]
    hi = [min(n, int(a.max()) + 3) for a, n in zip(nzc, liver_c.shape)]
    csl = tuple(slice(a, b) for a, b in zip(lo, hi))
    start = [a * fc for a, fc in zip(lo, f)]
    stop = [min(n, b * fc) for b, fc, n in zip(hi, f, full_shape)]
    fsl = tuple(slice(a, b) for a, b in zip(start, stop))
    shape = tuple(b - a for a, b in zip(start, stop))

    def up(a):
        u_ = ndi.zoom(a.astype(np.float32), f, order=1, grid_mode=True, mode="nearest")
        return u_[: shape[0], : shape[1], : shape[2]]

    def rep(a):  # block replication: enough for smooth fields and coarse yes/no maps
        for ax, fc in enumerate(f):
            if fc > 1:
                a = np.repeat(a, fc, axis=ax)
        return a[: shape[0], : shape[1], : shape[2]]

    fine_sp = tuple(sp / fc for sp, fc in zip(s.spacing, f))
    sig = [min(1.0 / sp, 1.5) for sp in fine_sp]
    img = ndi.gaussian_filter(np.clip(canon[fsl], -1024, 3071).astype(np.float32), sig, mode="nearest")
    local = rep(r.local[csl])
    allowed = rep(_allowed(s, r.local, p)[csl])
    if all(fc == 1 for fc in f):
        mask = liver_c[csl].copy()
    else:
        mask = _refine(r, liver_c[csl], up, rep, img, local, allowed, f, p, csl)
    allowed = rep(_allowed(s, r.local, p, muscle_range_only=True)[csl])
    mask = _take_partial_volume(mask, img, local, allowed, r.half, float(s.info.get("fat", -100.0)), fine_sp, p)
    out = np.zeros(full_shape, bool)
    out[fsl] = mask
    return out


def _refine(r: _Result, liver_c, up, rep, img, local, allowed, f, p: LiverParams, csl) -> np.ndarray:
    """The coarse surface re-decided voxel by voxel at full resolution."""
    soft = up(liver_c)
    mask = soft >= 0.5
    edge = (soft > 0.02) & (soft < 0.98)
    if p.refine and edge.any():
        # Inside the coarse surface a voxel stays unless it is fat (below half-way from the liver
        # level to fat): lesions and vessels decided by the closing keep their coarse answer.
        # Outside it, a voxel joins if it is in the liver band, or between the half level
        # (half-way to the local outside tissue) and the band's top: the blurred edge.
        hl = rep(r.half_level[csl])
        keep = mask & (img > 0.5 * (local - 100.0))
        in_band = np.abs(img - local) <= r.half
        in_edge = (img >= hl) & (img <= local + r.half)
        grow = (allowed & in_band) | in_edge
        mask = np.where(edge, keep | (~mask & grow), mask)
        # let the surface settle on the full-resolution edge: up to one coarse step outwards,
        # in-plane, through voxels that the same rule accepts
        st = np.zeros((3, 3, 3), bool)
        st[1] = ndi.generate_binary_structure(2, 1)
        steps = int(round(max(f[1:]) * p.refine_steps))
        if steps:
            mask = ndi.binary_dilation(mask, st, iterations=steps, mask=grow | mask)
    return mask


def _take_partial_volume(mask, img, local, allowed, half, fat, spacing, p: LiverParams) -> np.ndarray:
    """Take in the outermost voxels that are more liver than fat.

    A surface voxel is liver when liver fills at least half of it, i.e. when its HU is above the
    midpoint of the liver level and this scan's fat level. The band and the half level towards the
    mixed tissue around the liver (measured over several mm) both stop short of that, which leaves
    a one-voxel rim of the liver outside the mask; against muscle the midpoint rule does not apply
    (the muscle rule in `allowed` keeps those voxels out).
    """
    if p.partial_mm <= 0 or not mask.any():
        return mask
    steps = max(1, int(round(p.partial_mm / min(spacing[1:]))))
    ok = (img >= 0.5 * (local + fat)) & (img <= local + half) & allowed
    return ndi.binary_dilation(mask, _INPLANE, iterations=steps, mask=ok | mask)


def _segment_canonical(canon: np.ndarray, spacing_full, p: LiverParams, progress: Progress):
    say = progress or (lambda m: None)
    s, f = _prepare(canon, spacing_full, p)
    say("liver: estimating the liver intensity for this scan")
    best, best_score = None, 0.0
    for mu, sigma, weight in _intensity_candidates(s, p):
        r = _segment_with(s, mu, sigma, p)
        if r is None:
            continue
        sc = _score(r.liver, s) * (0.5 + 0.5 * weight)
        if sc > best_score:
            best, best_score = r, sc
        # the main peak giving a liver-sized organ on the right settles it; the other peaks are
        # only tried when it does not (e.g. the main peak was muscle or spleen)
        ml = r.liver.sum() * float(np.prod(s.spacing)) / 1000.0
        if weight == 1.0 and ml >= 150 and _right_weight(float(s.u[r.liver].mean())) >= 0.8:
            break
    if best is None:
        raise NoLiverFoundError(
            "no liver-like region was found (no large soft-tissue organ on the patient's right): "
            "check that the image covers the upper abdomen, or provide a liver mask with --liver-mask"
        )
    s.info.update(mu=best.mu, sd=best.sd, half=best.half)
    say("liver: filling vessels and lesions")
    liver = _complete(best, s, p)
    ml = liver.sum() * float(np.prod(s.spacing)) / 1000.0
    s.info["coarse_ml"] = ml
    if ml < 20:
        raise NoLiverFoundError(
            f"the liver-like region found is implausibly small ({ml:.0f} ml): check that the image covers "
            "the upper abdomen, or provide a liver mask with --liver-mask"
        )
    say("liver: mapping the mask onto the input grid")
    return _to_full(best, liver, f, canon, s, p), s


def segment_liver(ct: Volume, *, progress: Progress = None, params: LiverParams | None = None) -> Volume:
    """Binary liver mask (uint8 0/1) on `ct`'s exact geometry.

    Raises NoLiverFoundError when nothing liver-like is found and UserInputError when the image does
    not look like CT in HU; never returns an empty mask.
    """
    p = params or LiverParams()
    arr = np.asarray(ct.array)
    _check_ct(arr)
    frame = canonical_frame(ct)
    canon = frame.to_canonical(arr)
    full, _ = _segment_canonical(canon, frame.spacing, p, progress)
    out = np.ascontiguousarray(frame.from_canonical(full)).astype(np.uint8)
    return ct.with_array(out)


def totalsegmentator_liver(ct, *, fast: bool = True) -> Volume:
    """Liver mask from TotalSegmentator where it and its weights are installed (optional).

    `ct` is a CT file/DICOM folder or a Volume; the mask is returned on the CT's grid. Raises
    UserInputError when TotalSegmentator is not installed or fails.
    """
    try:
        from totalsegmentator.python_api import totalsegmentator  # type: ignore
    except Exception as exc:  # depends on the environment
        raise UserInputError(
            "TotalSegmentator is not installed: `pip install TotalSegmentator` (and fetch its weights once), "
            "or use the built-in liver segmentation or a liver mask (--liver-mask)"
        ) from exc
    import tempfile
    from pathlib import Path

    import SimpleITK as sitk

    from .io import read_volume, write_volume

    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(ct, Volume):
            vol = ct
            src = write_volume(vol, Path(tmp) / "ct.nii.gz")
        else:
            vol = read_volume(ct)
            src = Path(ct)
        out = Path(tmp) / "liver.nii.gz"
        try:
            totalsegmentator(str(src), str(out), roi_subset=["liver"], ml=True, fast=fast)
        except Exception as exc:  # noqa: BLE001 - any failure there is the user's to fix (weights, memory)
            raise UserInputError(f"TotalSegmentator failed ({exc}): check its weights, or use a liver mask") from exc
        img = sitk.ReadImage(str(out))
        ref = sitk.Image([int(x) for x in vol.size_ijk], sitk.sitkUInt8)
        ref.SetSpacing(vol.spacing)
        ref.SetOrigin(vol.origin)
        ref.SetDirection(tuple(float(x) for x in np.asarray(vol.direction).ravel()))
        img = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        arr = (sitk.GetArrayFromImage(img) > 0).astype(np.uint8)
    return vol.with_array(arr)
