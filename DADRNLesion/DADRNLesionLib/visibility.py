"""How visible a lesion is on a slice: the matched-filter signal-to-noise ratio.

Why: a lesion slice that no observer could tell from the scan's noise caps what any classifier can
score, so an evaluation's misses are read against it (`Testing/benchmarks/lesion_visibility.py`).
The observer is the non-prewhitening matched filter. It knows the lesion's noise-free signal on
the slice (the lesion's HU minus the median of the liver around it) and correlates that template
with the image. Its SNR is the template's energy over the standard deviation of its response to the
scan's own noise field, which is band-limited rather than white, so it is measured, not assumed.
Rose's criterion puts the detection of a known signal at a known place near an SNR of 5; finding it
anywhere on a slice, among vessels and liver texture, takes more.

Needs the noise-free image and the noise field apart, which only generated data have.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, signal


def matched_filter_snr(template: np.ndarray, noise: np.ndarray, valid: np.ndarray | None = None) -> float:
    """SNR of the matched filter `template` against the noise image `noise` (same pixel grid).

    The filter's response to the noise is taken at every position where the template lies wholly
    on the image and, given `valid` (bool, noise's shape), wholly inside it; its standard deviation
    over those positions is the noise the filter sees."""
    t = np.asarray(template, dtype=np.float64)
    n = np.asarray(noise, dtype=np.float64)
    if t.ndim != 2 or n.ndim != 2 or t.shape[0] > n.shape[0] or t.shape[1] > n.shape[1]:
        raise ValueError(f"need a 2D template no larger than the 2D noise image; got {t.shape} and {n.shape}")
    energy = float(np.sum(t * t))
    if energy == 0.0:
        return 0.0
    response = signal.fftconvolve(n, t[::-1, ::-1], mode="valid")
    if valid is not None:
        inside = signal.fftconvolve(np.asarray(valid, dtype=np.float64), np.ones(t.shape), mode="valid")
        response = response[inside > t.size - 0.5]
    if response.size < 2:
        raise ValueError("too few positions where the template lies inside the valid region to measure the noise")
    spread = float(response.std())
    return energy / spread if spread > 0 else float("inf")


def lesion_slice_visibility(
    clean: np.ndarray,
    noise: np.ndarray,
    lesion: np.ndarray,
    liver: np.ndarray,
    spacing_ij: tuple[float, float],
    ring_mm: tuple[float, float] = (2.5, 8.0),
    body_hu: float = -300.0,
) -> dict | None:
    """Area (mm²), mean contrast (HU) and matched-filter SNR of the lesion on one slice: of its
    signal as it is, and of a flat disc of its mean contrast (a texture such as HCC's mosaic adds to
    the first, not to the second).

    clean: the noise-free slice (HU); noise: the scan's noise on it; lesion, liver: bool masks.
    The background is the median noise-free HU of the liver in a ring `ring_mm` around the lesion
    (the lesion's own surroundings, not the whole liver, whose enhancement varies). The noise is
    measured where the template lies inside the body, away from the clipped air. None when the
    slice holds no lesion or no liver around it."""
    lesion = np.asarray(lesion, dtype=bool)
    if not lesion.any():
        return None
    si, sj = (float(s) for s in spacing_ij)
    distance = ndimage.distance_transform_edt(~lesion, sampling=(sj, si))
    ring = (distance > ring_mm[0]) & (distance < ring_mm[1]) & np.asarray(liver, dtype=bool) & ~lesion
    if not ring.any():
        return None
    clean = np.asarray(clean, dtype=np.float64)
    background = float(np.median(clean[ring]))
    jj, ii = np.nonzero(lesion)
    box = (slice(jj.min(), jj.max() + 1), slice(ii.min(), ii.max() + 1))
    template = np.where(lesion, clean - background, 0.0)[box]
    contrast = float(np.mean(clean[lesion] - background))
    body = clean > body_hu
    return {
        "area_mm2": float(lesion.sum() * si * sj),
        "contrast_hu": contrast,
        "snr": matched_filter_snr(template, noise, valid=body),
        "snr_of_mean_contrast": matched_filter_snr(contrast * lesion[box], noise, valid=body),
    }
