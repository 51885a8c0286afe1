"""Slice labels, case lists, the slice cache and the split by patient."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from DADRNLesionLib import data as D
from DADRNLesionLib.classes import CLASS_NAMES
from DADRNLesionLib.errors import UserInputError
from DADRNLesionLib.io import write_volume
from DADRNLesionLib.preprocess import InputSpec, liver_crop_box, prepare_batch
from DADRNLesionLib.volume import Volume

from conftest import make_abdomen

HCC, CYST = 4, 2  # label values
SPACING = (1.5, 1.5, 3.0)  # one pixel = 2.25 mm^2


def case_with_lesions(direction=None):
    """make_abdomen's liver (slices 2-9) with an HCC of known cross-sections and a tiny cyst.

    HCC areas by slice (pixels): k3 4, k4 20, k5 100, k6 60 -> max 100 px = 225 mm^2, threshold
    max(20, 0.25 x 225) = 56.25 mm^2 = 25 px: k5, k6 are HCC slices, k3, k4 remnants (excluded).
    The cyst is 3x3 px = 20.25 mm^2 on k8 only: its own largest section, >= 20 mm^2 -> cyst slice.
    """
    ct, liver = make_abdomen(spacing=SPACING)
    les = np.zeros(ct.shape, np.uint8)
    j0, i0 = 40, 28
    les[3, j0 : j0 + 2, i0 : i0 + 2] = HCC
    les[4, j0 : j0 + 4, i0 : i0 + 5] = HCC
    les[5, j0 : j0 + 10, i0 : i0 + 10] = HCC
    les[6, j0 : j0 + 6, i0 : i0 + 10] = HCC
    les[8, 44:47, 30:33] = CYST
    arr = ct.array.copy()
    arr[les == HCC] = 160
    arr[les == CYST] = 5
    if direction is not None:
        return (Volume(arr, ct.spacing, ct.origin, direction), Volume(liver.array, ct.spacing, ct.origin, direction),
                Volume(les, ct.spacing, ct.origin, direction))
    return ct.with_array(arr), liver, ct.with_array(les)


def test_slice_rule_by_area_in_mm2_and_fraction_of_each_lesions_largest_section():
    ct, liver, les = case_with_lesions()
    labels = D.slice_labels(les.array, liver.array, (1.5, 1.5))
    hcc, cyst = CLASS_NAMES.index("hcc"), CLASS_NAMES.index("cyst")
    expected = [D.IGNORE, D.IGNORE, 0, D.IGNORE, D.IGNORE, hcc, hcc, 0, cyst, 0, D.IGNORE, D.IGNORE]
    assert labels.tolist() == expected  # slices 0-1 and 10-11 hold no liver
    # The same pixels at a finer in-plane spacing are smaller in mm^2: the cyst drops below 20 mm^2.
    fine = D.slice_labels(les.array, liver.array, (1.0, 1.0))
    assert fine[8] == D.IGNORE and fine[5] == hcc
    # A looser rule keeps the remnant at k4 (20 px = 45 mm^2 >= 10 % of 225).
    loose = D.slice_labels(les.array, liver.array, (1.5, 1.5), D.SliceRule(min_area_mm2=20, min_fraction=0.1))
    assert loose[4] == hcc and loose[3] == D.IGNORE


def test_two_lesion_classes_on_one_slice_are_excluded_and_unknown_values_refused():
    ct, liver, les = case_with_lesions()
    a = les.array.copy()
    a[5, 60:70, 50:60] = CYST  # a big cyst beside the HCC
    labels = D.slice_labels(a, liver.array, (1.5, 1.5))
    assert labels[5] == D.IGNORE and labels[6] == CLASS_NAMES.index("hcc")
    a[6, 10, 10] = 9
    with pytest.raises(UserInputError, match="label values"):
        D.slice_labels(a, liver.array, (1.5, 1.5))


def test_prepare_case_merges_lesions_into_the_liver_and_follows_a_flipped_slice_axis():
    ct, liver, les = case_with_lesions()
    liv = liver.array.copy()
    liv[5] = 0  # a liver mask that leaves out a lesion slice entirely
    cv = D.prepare_case("c", ct, liver.with_array(liv), les)
    assert cv.liver.array[5][les.array[5] > 0].all()  # the lesion is inside the model's liver input
    plain = D.prepare_case("c", *case_with_lesions())
    flipped = D.prepare_case("c", *case_with_lesions(direction=np.diag([1.0, 1.0, -1.0])))
    # The axial frame reverses k; mapped back to the stored slices, the labels are the same.
    assert flipped.input_k.tolist() == list(range(11, -1, -1))
    by_input = np.empty_like(flipped.labels)
    by_input[flipped.input_k] = flipped.labels
    assert by_input.tolist() == plain.labels.tolist()


def test_slice_label_table_alone_or_correcting_a_lesion_map(tmp_path):
    ct, liver, les = case_with_lesions()
    table = tmp_path / "labels.csv"
    table.write_text("slice_index,label\n2,normal\n5,HCC\n6,3\n7,exclude\n8,Hemangioma\n")
    t = D.read_slice_label_table(table, ct.shape[0])
    assert t.tolist()[2:9] == [0, D.IGNORE, D.IGNORE, 3, 3, D.IGNORE, 4]
    only = D.prepare_case("c", ct, liver, None, t)
    assert only.labels[3] == D.IGNORE and only.labels[8] == 4 and only.labels[0] == D.IGNORE  # unlisted = excluded
    fixed = D.prepare_case("c", ct, liver, les, t)
    assert fixed.labels[8] == 4 and fixed.labels[3] == D.IGNORE and fixed.labels[9] == 0  # unlisted keep the map's label
    bad = tmp_path / "bad.csv"
    bad.write_text("slice_index,label\n40,cyst\n")
    with pytest.raises(UserInputError, match="outside"):
        D.read_slice_label_table(bad, ct.shape[0])
    bad.write_text("slice_index,label\n3,tumour\n")
    with pytest.raises(UserInputError, match="unknown slice label"):
        D.read_slice_label_table(bad, ct.shape[0])


def _write_case(folder, ct, liver, les=None):
    folder.mkdir(parents=True)
    write_volume(ct, folder / "ct.nii.gz")
    write_volume(liver, folder / "liver.nii.gz")
    if les is not None:
        write_volume(les, folder / "lesion.nii.gz")


def test_read_cases_from_csv_phantom_list_and_folder(tmp_path):
    ct, liver, les = case_with_lesions()
    _write_case(tmp_path / "a", ct, liver, les)
    _write_case(tmp_path / "b", ct, liver)
    with open(tmp_path / "list.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "ct", "liver", "lesion", "patient_id", "group", "split", "subgroup"])
        w.writerow(["A", "a/ct.nii.gz", "a/liver.nii.gz", "a/lesion.nii.gz", "p1", "site1", "test", "small lesions"])
        w.writerow(["B", "b/ct.nii.gz", "b/liver.nii.gz", "", "", "", "", ""])
    recs = D.read_cases(tmp_path / "list.csv")
    assert [r.case_id for r in recs] == ["A", "B"]
    assert recs[0].lesion == tmp_path / "a" / "lesion.nii.gz" and recs[1].lesion is None
    assert (recs[0].patient_id, recs[0].group, recs[0].split, recs[0].subgroup) == ("p1", "site1", "test", "small lesions")
    a = D.load_case(recs[0])
    assert a.labels[5] == CLASS_NAMES.index("hcc") and a.patient_id == "p1" and a.subgroup == "small lesions"
    b = D.load_case(recs[1])
    assert set(b.labels.tolist()) == {0, D.IGNORE}  # no lesion map, no table: a normal case
    # The phantom writer's list: a `path` column naming the case folder.
    (tmp_path / "ph.csv").write_text("case_id,lesion_class,path,source,hard\nA,hcc,a,phantom,1\nB,normal,b,phantom,0\n")
    ph = D.read_cases(tmp_path / "ph.csv")
    assert ph[0].ct == tmp_path / "a" / "ct.nii.gz" and ph[0].lesion is not None and ph[0].group == "phantom"
    assert [r.subgroup for r in ph] == ["hard", "regular"]  # the generator's record of its hard draws
    folder = D.read_cases(tmp_path)  # no cases.csv there: sub-folders are cases
    assert [r.case_id for r in folder] == ["a", "b"]
    (tmp_path / "dup.csv").write_text("case_id,ct,liver\nA,a/ct.nii.gz,a/liver.nii.gz\nA,b/ct.nii.gz,b/liver.nii.gz\n")
    with pytest.raises(UserInputError, match="unique"):
        D.read_cases(tmp_path / "dup.csv")
    (tmp_path / "cols.csv").write_text("id,image\nA,a/ct.nii.gz\n")
    with pytest.raises(UserInputError, match="case_id"):
        D.read_cases(tmp_path / "cols.csv")


def test_cache_is_prepare_batch_as_uint8_with_outlines_of_lesion_slices(tmp_path):
    spec = InputSpec(size=32)
    cv = D.prepare_case("c", *case_with_lesions(), group="g")
    cache = D.build_cache([cv], spec)
    keep = np.flatnonzero(cv.labels != D.IGNORE)
    assert cache.slice_index.tolist() == keep.tolist()
    assert cache.labels.tolist() == cv.labels[keep].tolist()
    box = liver_crop_box(cv.liver.array, cv.ct.spacing[:2], spec.margin_mm)
    ref = prepare_batch(cv.ct.array, cv.liver.array, keep, box, spec)
    assert cache.images.dtype == np.uint8 and cache.images.shape == (keep.size, 3, 32, 32)
    assert np.abs(cache.images.astype(np.float32) / 255 - ref.numpy()).max() <= 0.5 / 255 + 1e-6
    lesion_rows = np.flatnonzero(cache.labels > 0)
    assert sorted(cache.masks) == lesion_rows.tolist()
    m = cache.masks[int(lesion_rows[0])]
    assert m.shape == (3, *box.shape)
    assert (m[2] >= m[1]).all() and m[2].sum() > m[1].sum()  # the dilated outline contains the lesion
    assert cache.cases[0]["case_class"] == "hcc" and cache.cases[0]["n_excluded"] == 2
    # Save, reload, recognise.
    cache.save(tmp_path / "cache")
    again = D.SliceCache.load(tmp_path / "cache")
    assert np.array_equal(again.images, cache.images) and again.spec == spec
    assert all(np.array_equal(again.masks[k], cache.masks[k]) for k in cache.masks)
    assert D.SliceCache.matches(tmp_path / "cache", spec, D.SliceRule(), {})
    assert not D.SliceCache.matches(tmp_path / "cache", InputSpec(size=40), D.SliceRule(), {})
    # At most N normal slices per case, lesion slices all kept.
    few = D.build_cache([cv], spec, normal_per_case=1)
    assert (few.labels == 0).sum() == 1 and (few.labels > 0).sum() == (cache.labels > 0).sum()


def _cases(n_per_class, patients_share=1):
    out = []
    for c, name in enumerate(CLASS_NAMES):
        for k in range(n_per_class):
            out.append({"case_id": f"{name}{k}", "patient_id": f"{name}{k // patients_share}", "case_class": name, "split": ""})
    return out


def test_split_is_by_patient_stratified_and_seeded():
    cases = _cases(10, patients_share=2)  # two cases per patient
    s1 = D.split_cases(cases, seed=1)
    by_patient = {}
    for c in cases:
        by_patient.setdefault(c["patient_id"], set()).add(s1[c["case_id"]])
    assert all(len(v) == 1 for v in by_patient.values())  # never one patient in two splits
    for name in CLASS_NAMES:  # 5 patients per class -> 3/1/1
        got = [s1[c["case_id"]] for c in cases if c["case_class"] == name]
        assert got.count("train") == 6 and got.count("val") == 2 and got.count("test") == 2
    assert D.split_cases(cases, seed=1) == s1
    assert D.split_cases(cases, seed=2) != s1


def test_split_keeps_fixed_assignments_and_round_trips(tmp_path):
    cases = _cases(5)
    cases[0]["split"] = "test"
    s = D.split_cases(cases, seed=0)
    assert s[cases[0]["case_id"]] == "test"
    D.write_split(tmp_path / "split.csv", s)
    assert D.read_split(tmp_path / "split.csv") == s
    (tmp_path / "bad.csv").write_text("case_id,split\na,holdout\n")
    with pytest.raises(UserInputError, match="split"):
        D.read_split(tmp_path / "bad.csv")


def test_phantom_case_gives_lesion_slices_of_its_class():
    from DADRNLesionLib.phantom import generate_case

    case = generate_case(7, "cyst", matrix=96, n_slices=24)
    cv = D.prepare_case(case.case_id, case.ct, case.liver, case.lesion)
    labels = cv.labels
    assert set(labels.tolist()) <= {D.IGNORE, 0, CLASS_NAMES.index("cyst")}
    assert (labels == CLASS_NAMES.index("cyst")).any() and (labels == 0).any()
    # Every slice labelled cyst shows enough lesion, by the rule, in the phantom's own metadata.
    areas = {}
    for les in case.meta["lesions"]:
        for k, a in les["area_mm2_by_k"]:
            areas[k] = max(areas.get(k, 0.0), a)
    for k in np.flatnonzero(labels == CLASS_NAMES.index("cyst")):
        assert areas.get(int(k), 0.0) >= 20.0


def test_the_generators_hard_draws_travel_as_a_subgroup_to_the_cache_and_the_case_list(tmp_path):
    kw = dict(matrix=64, n_slices=8)
    made = list(D.synthetic_cases(3, 5, hard=True, **kw)) + list(D.synthetic_cases(2, 6, **kw))
    assert [D.synthetic_subgroup(c) for c in made[:3]] == ["hard"] * 3
    assert [D.synthetic_subgroup(c) for c in made] == ["hard" if c.meta["hard"] else "regular" for c in made]
    cache = D.build_cache([D.prepare_synthetic(c) for c in made], InputSpec(size=32))
    assert [c["subgroup"] for c in cache.cases] == [D.synthetic_subgroup(c) for c in made]
    D.write_dataset(tmp_path / "set", iter(made))
    assert [r.subgroup for r in D.read_cases(tmp_path / "set" / "cases.csv")] == [D.synthetic_subgroup(c) for c in made]


def test_painted_in_cases_of_other_seeds_can_join_one_cache(real_data, tmp_path):
    """Each session paints new lesions into the same scans; their case ids must not collide, or
    the caches of two sessions could not be merged."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "dcmqi_ct3slice").symlink_to(real_data / "dcmqi_ct3slice")
    ids = {seed: [c.case_id for c in D.synthetic_cases(0, seed, real_dir=tmp_path / "real", real_rounds=2)]
           for seed in (7, 8)}
    assert len(ids[7]) == 2 * len(CLASS_NAMES) and len(set(ids[7])) == len(ids[7])
    assert not set(ids[7]) & set(ids[8])


def test_caches_merge_and_thin_without_losing_lesion_slices_or_their_outlines():
    spec = InputSpec(size=32)
    a = D.build_cache([D.prepare_case("a", *case_with_lesions())], spec)
    b = D.build_cache([D.prepare_case("b", *case_with_lesions())], spec)
    m = D.merge_caches([a, b])
    assert len(m) == len(a) + len(b) and [c["case_id"] for c in m.cases] == ["a", "b"]
    assert (m.case[len(a):] == 1).all() and sorted(m.masks) == sorted(list(a.masks) + [k + len(a) for k in b.masks])
    assert np.array_equal(m.images[len(a):], b.images)
    with pytest.raises(UserInputError, match="unique"):
        D.merge_caches([a, a])
    thin = m.thin_normal_slices(2)
    assert (thin.labels > 0).sum() == (m.labels > 0).sum()
    assert all(((thin.case == c) & (thin.labels == 0)).sum() == 2 for c in (0, 1))
    for new, old in zip(np.flatnonzero(thin.labels > 0), np.flatnonzero(m.labels > 0)):
        assert np.array_equal(thin.masks[int(new)], m.masks[int(old)])
        assert np.array_equal(thin.images[new], m.images[old])


def test_automatic_liver_source_masks_with_the_pipelines_own_liver_and_keeps_lesions_out_of_it():
    from DADRNLesionLib.liver import segment_liver
    from DADRNLesionLib.orientation import to_axial_frame
    from DADRNLesionLib.phantom import generate_case

    case = generate_case(1003, "hcc", matrix=128)
    ref = D.prepare_case(case.case_id, case.ct, case.liver, case.lesion)
    auto = D.prepare_case(case.case_id, case.ct, case.liver, case.lesion, liver_source="automatic")
    axial, _ = to_axial_frame(case.ct)
    expected = segment_liver(axial).array > 0
    np.testing.assert_array_equal(auto.liver.array > 0, expected)  # exactly what `classify` would use
    assert not np.array_equal(auto.liver.array, ref.liver.array)
    # The lesion map is the same truth either way; only slices the automatic mask reaches are labelled.
    np.testing.assert_array_equal(auto.lesion.array, ref.lesion.array)
    reached = expected.reshape(expected.shape[0], -1).any(axis=1)
    assert (auto.labels[~reached] == D.IGNORE).all()
    assert (auto.labels == CLASS_NAMES.index("hcc")).any()
    with pytest.raises(UserInputError, match="liver source 'ai'"):
        D.prepare_case(case.case_id, case.ct, case.liver, case.lesion, liver_source="ai")


def test_a_cache_of_reference_masks_is_not_reused_for_the_automatic_source(tmp_path):
    from DADRNLesionLib.cli import main

    common = ["dataset", "cache", "--phantoms", "1", "--phantom-seed", "3", "--cache", str(tmp_path / "c"), "--input-size", "32", "--quiet"]
    assert main(common) == 0
    first = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert main(common + ["--liver-source", "automatic"]) == 0
    second = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert second["source"]["liver"] == {"source": "automatic", "method": D.liver_method_fingerprint()}
    assert "liver" not in first["source"]
    # What `evaluate --record-in-card` names as the method the figures hold for.
    assert D.liver_methods(second["source"]) == [D.liver_method_fingerprint()]
    assert D.liver_methods(first["source"]) == []
    # Masks made by an earlier version of the automatic method are not reused either.
    stale = {**second, "source": {**second["source"], "liver": {"source": "automatic", "method": {"liver.py": "0" * 16}}}}
    (tmp_path / "c" / "cache.json").write_text(json.dumps(stale))
    assert main(common + ["--liver-source", "automatic"]) == 0
    assert json.loads((tmp_path / "c" / "cache.json").read_text()) == second
    # An existing cache alone: used as it is, or checked against an explicit --liver-source.
    split = ["dataset", "split", "--cache", str(tmp_path / "c"), "--input-size", "32", "--quiet", "--out"]
    assert main(split + [str(tmp_path / "s1.csv")]) == 0
    assert main(split + [str(tmp_path / "s2.csv"), "--liver-source", "automatic"]) == 0
    assert main(split + [str(tmp_path / "s3.csv"), "--liver-source", "reference"]) == 2
    assert not (tmp_path / "s3.csv").exists()


def test_a_class_focused_phantom_cache_holds_those_classes_and_names_them_in_its_record(tmp_path, capsys):
    from DADRNLesionLib.cli import main
    from DADRNLesionLib.commands.evaluate import describe_source

    common = ["dataset", "cache", "--phantoms", "2", "--phantom-seed", "4", "--cache", str(tmp_path / "c"), "--input-size", "32", "--quiet"]
    assert main(common + ["--phantom-classes", "hcc"]) == 0
    made = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert made["source"]["phantom_classes"] == ["hcc"]
    cache = D.SliceCache.load(tmp_path / "c")
    counts = cache.class_counts(np.arange(len(cache)))
    assert counts[CLASS_NAMES.index("hcc")] > 0
    assert all(counts[CLASS_NAMES.index(c)] == 0 for c in ("cyst", "fnh", "hem"))
    assert "--classes hcc" in describe_source(made["source"])
    # The plain cache of the same seed is another data set: rebuilt, not reused.
    assert main(common) == 0
    assert "phantom_classes" not in json.loads((tmp_path / "c" / "cache.json").read_text())["source"]
    with pytest.raises(SystemExit) as refused:
        main(common + ["--phantom-classes", "adenoma"])
    assert refused.value.code == 2
    assert "invalid choice: 'adenoma'" in capsys.readouterr().err


def test_a_case_without_liver_like_tissue_names_itself_when_the_automatic_mask_fails():
    from DADRNLesionLib.errors import NoLiverFoundError

    ct, liver, les = case_with_lesions()
    water = ct.with_array(np.zeros(ct.shape, np.int16))  # a water phantom: no liver to find
    with pytest.raises(NoLiverFoundError, match="case water_1: the automatic liver mask failed"):
        D.prepare_case("water_1", water, liver, les, liver_source="automatic")
