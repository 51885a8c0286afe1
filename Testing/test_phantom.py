"""The synthetic arterial-phase CT generator and lesion insertion into real scans."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy import ndimage

from DADRNLesionLib import phantom
from DADRNLesionLib.classes import CLASS_NAMES, LABEL_BY_KEY, LESION_CLASSES

SMALL = dict(matrix=96, n_slices=16, spacing=(4.0, 4.0, 5.0))  # fast: geometry and bookkeeping
MEDIUM = dict(matrix=160, n_slices=36, spacing=(2.6, 2.6, 3.5))  # lesions large enough in voxels to measure


@pytest.fixture(scope="module")
def clean_cases():
    """Seed 0, noise-free, no deliberately hard lesions: one case per class (same patient)."""
    return {cls: phantom.generate_case(0, cls, noise_hu=0, hard=False, **MEDIUM) for cls in CLASS_NAMES}


def _lps(volume, ijk):
    return (volume.ijk_to_lps_matrix() @ np.append(np.asarray(ijk, float), 1.0))[:3]


def _centroid_ijk(mask):
    k, j, i = np.nonzero(mask)
    return np.array([i.mean(), j.mean(), k.mean()])


def _parenchyma(case):
    liver, les = case.liver.array > 0, case.lesion.array > 0
    par = ndimage.binary_erosion(liver & ~ndimage.binary_dilation(les, iterations=2), iterations=2)
    return case.ct.array[par].astype(float)


def _largest_lesion(case):
    lab, n = ndimage.label(case.lesion.array > 0)
    assert n >= 1
    sizes = ndimage.sum(np.ones_like(lab), lab, range(1, n + 1))
    return lab == 1 + int(np.argmax(sizes))


def _robust_sd(x):
    return 1.4826 * float(np.median(np.abs(x - np.median(x))))


def test_same_seed_same_case_and_different_seed_differs():
    a = phantom.generate_case(5, "fnh", **SMALL)
    b = phantom.generate_case(5, "fnh", **SMALL)
    c = phantom.generate_case(6, "fnh", **SMALL)
    assert np.array_equal(a.ct.array, b.ct.array)
    assert np.array_equal(a.lesion.array, b.lesion.array)
    assert a.meta == b.meta
    assert a.ct.shape != c.ct.shape or not np.array_equal(a.ct.array, c.ct.array)


def test_types_shapes_and_shared_geometry():
    case = phantom.generate_case(3, "hcc", **SMALL)
    assert case.ct.array.dtype == np.int16
    assert case.liver.array.dtype == np.uint8 and case.lesion.array.dtype == np.uint8
    assert case.ct.shape == (16, 96, 96)
    assert case.ct.same_geometry(case.liver) and case.ct.same_geometry(case.lesion)
    assert np.allclose(case.ct.direction, np.eye(3))
    assert case.ct.spacing == (4.0, 4.0, 5.0)
    assert case.meta["slice_thickness_mm"] >= 5.0 - 1e-9
    assert -1024 <= case.ct.array.min() and case.ct.array.max() <= 3071
    assert set(np.unique(case.liver.array)) <= {0, 1}


def test_default_geometry_covers_the_upper_abdomen():
    case = phantom.generate_case(11, "normal", matrix=64)
    sx, sy, sz = case.ct.spacing
    assert sx == sy and 300 <= sx * 64 <= 480  # a realistic field of view (1.2-1.9 mm pixels at 256)
    assert 150 - sz <= case.ct.shape[0] * sz <= 250 + sz
    assert 1.0 <= sz <= case.meta["slice_thickness_mm"] <= 5.0
    top = case.ct.array[-1] > -300
    assert top.any() and case.liver.array[case.ct.shape[0] // 2].any()


def test_anatomy_sides_in_patient_coordinates(clean_cases):
    case = clean_cases["normal"]
    cx, cy = case.meta["patient_centre_lps"]
    marks = case.meta["landmarks_lps"]
    liver = _lps(case.ct, _centroid_ijk(case.liver.array > 0))
    # LPS: x grows towards the patient's left, y posterior, z superior.
    assert liver[0] < cx - 30, "the liver must lie on the patient's right"
    assert marks["spleen"][0] > cx + 30, "the spleen must lie on the patient's left"
    assert marks["aorta"][0] > marks["ivc"][0], "the IVC lies to the right of the aorta"
    assert marks["aorta"][1] < marks["vertebral_body"][1], "the aorta lies anterior to the spine"
    assert liver[2] > marks["right_kidney"][2], "the liver lies above the kidney"
    assert marks["right_kidney"][0] < cx < marks["left_kidney"][0]


def test_aorta_brighter_than_liver_in_arterial_phase(clean_cases):
    case = clean_cases["normal"]
    x, y, _ = case.meta["landmarks_lps"]["aorta"]
    sx, sy, _ = case.ct.spacing
    i = int(round((x - case.ct.origin[0]) / sx))
    j = int(round((y - case.ct.origin[1]) / sy))
    k = case.ct.shape[0] // 2
    aorta = float(np.median(case.ct.array[k, j - 1:j + 2, i - 1:i + 2]))
    par = float(np.median(_parenchyma(case)))
    assert 200 <= aorta <= 380
    assert aorta > par + 120
    assert 55 <= par <= 95


def test_normal_cases_have_no_lesion(clean_cases):
    case = clean_cases["normal"]
    assert case.lesion_class == "normal"
    assert not case.lesion.array.any()
    assert case.meta["lesions"] == []
    assert case.liver.array.any()


@pytest.mark.parametrize("cls", LESION_CLASSES)
def test_lesions_lie_in_the_liver_with_the_class_label(clean_cases, cls):
    case = clean_cases[cls]
    les = case.lesion.array
    assert case.lesion_class == cls
    assert les.any()
    assert set(np.unique(les)) == {0, LABEL_BY_KEY[cls].value}
    assert not np.any((les > 0) & (case.liver.array == 0))
    # Per-lesion slice areas (the slice-label rule's input) account for the whole label map.
    sx, sy, _ = case.ct.spacing
    per_k = (les > 0).sum(axis=(1, 2)) * sx * sy
    listed = np.zeros_like(per_k)
    for lesion in case.meta["lesions"]:
        assert 5.0 <= lesion["diameter_mm"] <= 60.0
        assert lesion["max_area_mm2"] == pytest.approx(max(a for _, a in lesion["area_mm2_by_k"]), rel=1e-3)
        for k, area in lesion["area_mm2_by_k"]:
            listed[k] += area
    assert np.all(listed >= per_k - 1e-3 * (1 + per_k))  # overlapping lesions may count twice


def test_cyst_is_water_dense_and_darker_than_parenchyma(clean_cases):
    case = clean_cases["cyst"]
    les = _largest_lesion(case)
    core = ndimage.binary_erosion(les, iterations=1)
    par = np.median(_parenchyma(case))
    assert np.median(case.ct.array[core]) <= 25
    assert np.mean(case.ct.array[les]) < par - 30


def test_fnh_brighter_than_parenchyma(clean_cases):
    case = clean_cases["fnh"]
    les = _largest_lesion(case)
    assert np.mean(case.ct.array[les]) > np.median(_parenchyma(case)) + 15


def test_hemangioma_bright_periphery_dark_centre(clean_cases):
    case = clean_cases["hem"]
    les = _largest_lesion(case)
    sp = case.ct.spacing[::-1]
    d = ndimage.distance_transform_edt(les, sampling=sp)
    par = np.median(_parenchyma(case))
    ring = (d > 0) & (d <= 0.4 * d.max())
    centre = d >= 0.6 * d.max()
    assert np.percentile(case.ct.array[ring], 95) > par + 60  # nodules near aortic density
    assert np.mean(case.ct.array[centre]) < par - 5


def test_hcc_heterogeneous_hyperenhancement(clean_cases):
    hcc, fnh = clean_cases["hcc"], clean_cases["fnh"]
    les = _largest_lesion(hcc)
    par = _parenchyma(hcc)
    vals = hcc.ct.array[les].astype(float)
    assert np.percentile(vals, 75) > np.median(par) + 15
    assert _robust_sd(vals) > 2.5 * _robust_sd(par)
    assert _robust_sd(vals) > _robust_sd(fnh.ct.array[_largest_lesion(fnh)].astype(float))


def test_generate_cases_is_balanced_and_reproducible():
    plan = phantom.case_plan(10, 7)
    for block in (plan[:5], plan[5:]):
        assert sorted(cls for _, _, cls in block) == sorted(CLASS_NAMES)
    assert phantom.case_plan(3, 7) == plan[:3]
    assert len({seed for _, seed, _ in plan}) == 10
    case = next(phantom.generate_cases(1, 7, matrix=64, n_slices=6))
    direct = phantom.generate_case(plan[0][1], plan[0][2], matrix=64, n_slices=6)
    assert case.case_id == plan[0][0] and case.meta["requested_class"] == plan[0][2]
    assert np.array_equal(case.ct.array, direct.ct.array)


def test_a_class_focused_plan_holds_the_listed_classes_in_turn_and_the_full_list_is_the_default_plan():
    plan = phantom.case_plan(9, 11, classes=["hcc", "hcc", "fnh"])
    for block in (plan[:3], plan[3:6], plan[6:]):
        assert sorted(cls for _, _, cls in block) == ["fnh", "hcc", "hcc"]
    assert len({seed for _, seed, _ in plan}) == 9
    assert phantom.case_plan(10, 11, classes=list(CLASS_NAMES)) == phantom.case_plan(10, 11)
    assert phantom.case_plan(4, 11, classes=["cyst"]) == [(cid, seed, "cyst") for cid, seed, _ in phantom.case_plan(4, 11)]
    case = next(phantom.generate_cases(1, 11, classes=["hem"], matrix=64, n_slices=6))
    assert case.meta["requested_class"] == "hem"
    with pytest.raises(ValueError, match="unknown class 'adenoma'"):
        phantom.case_plan(3, 11, classes=["hcc", "adenoma"])
    with pytest.raises(ValueError, match="classes is empty"):
        phantom.case_plan(3, 11, classes=[])


def test_an_unenhanced_phantom_is_the_same_patient_with_blood_density_vessels_and_a_darker_liver():
    arterial = phantom.generate_case(5, "normal", matrix=96, n_slices=24, noise_hu=0)
    plain = phantom.generate_case(5, "normal", matrix=96, n_slices=24, noise_hu=0, phase="unenhanced")
    assert (arterial.meta["phase"], plain.meta["phase"]) == ("arterial", "unenhanced")
    assert np.array_equal(arterial.liver.array, plain.liver.array)  # the same anatomy
    liver = arterial.liver.array > 0
    assert 38 - 3 <= np.median(plain.ct.array[liver]) <= 66 + 3
    # The enhanced vessels and organs lose their contrast; nothing gains more than a vein can.
    change = plain.ct.array.astype(float) - arterial.ct.array
    assert (change < -150).sum() > 100 and change.max() < 40
    cyst = phantom.generate_case(5, "cyst", matrix=96, n_slices=24, phase="unenhanced")
    assert cyst.lesion_class == "cyst" and cyst.meta["lesions"]
    with pytest.raises(ValueError, match="normal or cyst"):
        phantom.generate_case(5, "hcc", matrix=64, n_slices=8, phase="unenhanced")
    with pytest.raises(ValueError, match="unknown phase"):
        phantom.generate_case(5, "normal", matrix=64, n_slices=8, phase="portal")


def test_the_unenhanced_share_touches_only_normal_and_cyst_cases_and_changes_no_other_draw():
    phases = [phantom.case_phase(3, i, cls, 0.5) for i, (_, _, cls) in enumerate(phantom.case_plan(40, 3))]
    classes = [cls for _, _, cls in phantom.case_plan(40, 3)]
    plain = {cls for cls, ph in zip(classes, phases) if ph == "unenhanced"}
    assert plain <= {"normal", "cyst"} and plain
    assert 0.2 < phases.count("unenhanced") / (classes.count("normal") + classes.count("cyst")) < 0.8
    assert all(ph == "arterial" for ph in (phantom.case_phase(3, i, "normal", 0.0) for i in range(20)))
    with pytest.raises(ValueError, match="between 0 and 1"):
        phantom.case_phase(3, 0, "normal", 1.5)
    # With a share, every case left arterial is the default case, voxel for voxel.
    default = list(phantom.generate_cases(10, 3, matrix=64, n_slices=6))
    shared = list(phantom.generate_cases(10, 3, unenhanced=0.5, matrix=64, n_slices=6))
    assert [c.meta["phase"] for c in shared] == phases[:10] and "unenhanced" in phases[:10]
    for a, b in zip(default, shared):
        assert np.array_equal(a.ct.array, b.ct.array) == (b.meta["phase"] == "arterial")


def test_unknown_class_is_refused():
    with pytest.raises(ValueError, match="unknown class"):
        phantom.generate_case(0, "adenoma", matrix=64, n_slices=8)


def _ts_native(real_data):
    from DADRNLesionLib import io

    folder = real_data / "ts_native_sm"
    ct = io.read_volume(folder / "ct.nii.gz")
    labels = io.align_to_grid(io.read_volume(folder / "totalsegmentator_labels.nii.gz"), ct)
    return ct, ct.with_array((labels.array == 5).astype(np.uint8))


@pytest.mark.parametrize("cls", ["cyst", "hem"])
def test_insert_lesions_into_real_scan_stays_in_its_liver(real_data, cls):
    ct, liver = _ts_native(real_data)
    meta: list = []
    out, lab = phantom.insert_lesions(ct, liver, cls, np.random.default_rng(1), n_lesions=2, meta_out=meta)
    assert out.same_geometry(ct) and lab.same_geometry(ct)
    assert out.array.dtype == np.int16 and lab.array.dtype == np.uint8
    assert lab.array.any() and meta
    assert not np.any((lab.array > 0) & (liver.array == 0))
    assert set(np.unique(lab.array)) == {0, LABEL_BY_KEY[cls].value}
    # Outside the liver the scan is untouched; contrast is relative to this scan's own liver.
    changed = out.array != ct.array
    assert not np.any(changed & (liver.array == 0))
    par = np.median(ct.array[(liver.array > 0) & (lab.array == 0)])
    if cls == "cyst":
        assert np.mean(out.array[lab.array > 0]) < par - 15
    again, lab2 = phantom.insert_lesions(ct, liver, cls, np.random.default_rng(1), n_lesions=2)
    assert np.array_equal(again.array, out.array) and np.array_equal(lab2.array, lab.array)


def test_write_cases_and_cli(tmp_path):
    from DADRNLesionLib import io
    from DADRNLesionLib.cli import main

    out = tmp_path / "ph"
    assert main(["phantom", "--out", str(out), "--cases", "1", "--seed", "3", "--matrix", "64", "--slices", "8", "--quiet"]) == 0
    with open(out / "cases.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1
    for col in ("case_id", "lesion_class", "n_lesions", "spacing", "noise", "path"):
        assert col in rows[0]
    first = next(phantom.generate_cases(1, 3, matrix=64, n_slices=8))
    ct = io.read_volume(out / rows[0]["path"] / "ct.nii.gz")
    assert ct.same_geometry(first.ct) and np.array_equal(ct.array, first.ct.array)
    lesion = io.read_volume(out / rows[0]["path"] / "lesion.nii.gz")
    assert np.array_equal(lesion.array, first.lesion.array)
    assert (out / rows[0]["path"] / "meta.json").is_file()
    # A second run into the same folder needs --overwrite; bad arguments are one-line input errors.
    assert main(["phantom", "--out", str(out), "--cases", "1", "--matrix", "64", "--slices", "8", "--quiet"]) == 2
    assert main(["phantom", "--out", str(tmp_path / "x"), "--cases", "-1", "--quiet"]) == 2
    phantom.write_cases(out, 1, 4, matrix=64, n_slices=8, overwrite=True)
    with open(out / "cases.csv", newline="") as fh:
        assert [r["case_id"] for r in csv.DictReader(fh)] == ["phantom_s4_00000"]


def test_liver_label_gives_way_to_the_aorta_painted_over_it():
    """Where the liver's shape overlaps the aorta (the aorta is painted over it in the image), the
    label says aorta too: no aorta-bright voxel outside a lesion is labelled liver."""
    pc = phantom.generate_case(1007, "fnh", matrix=256)
    liver, lesion, hu = pc.liver.array > 0, pc.lesion.array > 0, pc.ct.array
    ml = float(np.prod(pc.ct.spacing)) / 1000.0
    assert (liver & ~lesion & (hu > 180)).sum() * ml < 5.0  # was 31 ml before the label followed the paint
    i, j, k = np.rint((np.array(pc.meta["landmarks_lps"]["aorta"]) - np.array(pc.ct.origin)) / np.array(pc.ct.spacing)).astype(int)
    assert not liver[k, j - 2 : j + 3, i - 2 : i + 3].any()
    assert liver.sum() * ml > 800  # the liver itself is still there
