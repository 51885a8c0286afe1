"""The lesion-visibility measure (matched-filter SNR) and the benchmark's noise-free regeneration."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from DADRNLesionLib import phantom
from DADRNLesionLib.visibility import lesion_slice_visibility, matched_filter_snr

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))


def _disc(shape, centre, radius):
    jj, ii = np.mgrid[: shape[0], : shape[1]]
    return (jj - centre[0]) ** 2 + (ii - centre[1]) ** 2 <= radius ** 2


def test_flat_disc_in_white_noise_has_the_textbook_snr():
    """For a disc of contrast C over N pixels in white noise of SD sigma, C * sqrt(N) / sigma."""
    rng = np.random.default_rng(0)
    sigma, contrast = 12.0, 9.0
    template = contrast * _disc((11, 11), (5, 5), 5).astype(float)
    n_pixels = int((template != 0).sum())
    noise = sigma * rng.standard_normal((512, 512))
    expected = contrast * np.sqrt(n_pixels) / sigma
    assert matched_filter_snr(template, noise) == pytest.approx(expected, rel=0.08)


def test_noise_at_the_lesions_scale_lowers_the_snr_that_white_noise_of_the_same_sd_would_give():
    rng = np.random.default_rng(1)
    template = 20.0 * _disc((25, 25), (12, 12), 12).astype(float)
    white = rng.standard_normal((512, 512))
    blotchy = ndimage.gaussian_filter(rng.standard_normal((512, 512)), 4.0)
    blotchy /= blotchy.std()
    assert matched_filter_snr(template, 10 * blotchy) < 0.5 * matched_filter_snr(template, 10 * white)


def test_a_slice_gives_area_contrast_and_snr_measured_against_the_liver_around_the_lesion():
    rng = np.random.default_rng(2)
    shape, spacing = (200, 200), (0.8, 0.8)
    body = _disc(shape, (100, 100), 95)
    liver = _disc(shape, (100, 100), 60)
    lesion = _disc(shape, (100, 100), 10)
    clean = np.where(body, 40.0, -1000.0)
    clean[liver] = 60.0
    clean[lesion] = 90.0
    noise = 15.0 * rng.standard_normal(shape)
    v = lesion_slice_visibility(clean, noise, lesion, liver, spacing)
    assert v["area_mm2"] == pytest.approx(lesion.sum() * 0.64)
    assert v["contrast_hu"] == pytest.approx(30.0)
    assert v["snr"] == pytest.approx(30.0 * np.sqrt(lesion.sum()) / 15.0, rel=0.15)
    assert v["snr_of_mean_contrast"] == pytest.approx(v["snr"], rel=1e-6)
    assert lesion_slice_visibility(clean, noise, np.zeros(shape, bool), liver, spacing) is None
    with pytest.raises(ValueError, match="no larger than"):
        matched_filter_snr(np.ones((30, 30)), np.ones((20, 20)))


def test_the_benchmark_regenerates_a_phantom_noise_free_with_its_own_noise_apart():
    """Noise-free image plus the recorded noise is the phantom as generated, draw for draw."""
    from lesion_visibility import regenerate

    case_id = "phantom_s5_00001"
    clean_case, noise = regenerate(case_id)
    _, case_seed, cls = phantom.case_plan(2, 5)[1]
    as_generated = phantom.generate_case(case_seed, cls)
    assert (clean_case.lesion.array == as_generated.lesion.array).all()
    inside = (as_generated.ct.array > -1000) & (as_generated.ct.array < 3000)  # not clipped
    rebuilt = np.rint(clean_case.ct.array.astype(np.float32) + noise)
    difference = np.abs(rebuilt - as_generated.ct.array)[inside]
    assert np.percentile(difference, 99) <= 1.0
    assert noise.std() > 5.0  # the phantom draws 8-25 HU; the clean image really has none of it



def test_the_benchmark_reads_an_evaluation_and_reports_visible_misses(tmp_path, capsys):
    """End to end on two generated cases, with a slices.csv written as evaluate writes it."""
    import lesion_visibility

    rows = []
    for index, (case_id, case_seed, cls) in enumerate(phantom.case_plan(5, 5)):
        if cls == "normal":
            continue
        case = phantom.generate_case(case_seed, cls)
        ks = np.flatnonzero((case.lesion.array > 0).any(axis=(1, 2)))
        for k in ks[len(ks) // 3: 2 * len(ks) // 3]:
            rows.append(dict(case_id=case_id, slice_index=int(k), label=cls, predicted="normal", pointing_hit="0"))
        if len({r["case_id"] for r in rows}) == 2:
            break
    rows.append(dict(case_id="real_scan_hcc_s1_r0", slice_index=3, label="hcc", predicted="hcc", pointing_hit="1"))
    with open(tmp_path / "slices.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "vis.csv"
    assert lesion_visibility.main([str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "left out 1 cases that are not generated phantoms" in printed
    written = list(csv.DictReader(open(out)))
    assert len(written) == len(rows) - 1
    assert all(float(r["snr"]) > 0 and float(r["area_mm2"]) > 0 for r in written)
    visible = [r for r in written if float(r["snr"]) >= 20]
    assert visible, "middle slices of a generated lesion should include clearly visible ones"
    assert f"{visible[0]['label']:6} {sum(r['label'] == visible[0]['label'] for r in visible):4d}  called: normal" in printed
