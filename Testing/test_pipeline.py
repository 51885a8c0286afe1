"""The one entry point: geometry, only liver slices, label map rules, progress, cancel, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DADRNLesionLib.classes import CLASS_NAMES, LIVER_VALUE
from DADRNLesionLib.errors import Cancelled, UserInputError
from DADRNLesionLib.pipeline import PipelineOptions, run_pipeline
from DADRNLesionLib.volume import GeometryMismatchError, Volume
from DADRNLesionLib.weights import random_model
from DADRNLesionLib.preprocess import InputSpec

from conftest import make_abdomen
from test_orientation import reoriented


@pytest.fixture(scope="module")
def biased_model():
    """A small random model pushed towards HCC so that lesion outputs are exercised."""
    loaded = random_model({"backbone": "drn_d_22", "width": 0.25, "attention": "dual"}, InputSpec(size=64), seed=1)
    with torch.no_grad():
        loaded.model.fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 8.0, 0.0]))
    return loaded


def run(ct, liver, model, **kw):
    return run_pipeline(ct, liver_mask=liver, model=model, options=PipelineOptions(device="cpu", batch_size=4, **kw))


def test_outputs_lie_on_the_input_geometry_and_only_liver_slices_are_classified(biased_model):
    ct, liver = make_abdomen()
    res = run(ct, liver, biased_model)
    for vol in (res.liver, res.heatmap, res.labelmap):
        assert vol.same_geometry(ct)
    assert [s.slice_index for s in res.slices] == list(range(2, 10))
    assert res.heatmap.array.dtype == np.float32 and res.labelmap.array.dtype == np.uint8
    assert 0.0 <= res.heatmap.array.min() and res.heatmap.array.max() <= 1.0
    assert not res.heatmap.array[liver.array == 0].any()  # heat only inside the liver


def test_label_map_rules(biased_model):
    ct, liver = make_abdomen()
    res = run(ct, liver, biased_model, cam_threshold=0.5)
    labels, heat = res.labelmap.array, res.heatmap.array
    assert set(np.unique(labels)) <= {0, 1, 4}
    assert np.array_equal(labels > 0, liver.array > 0)  # label map covers exactly the liver
    for s in res.slices:
        assert s.predicted_class == "hcc"
        k = s.slice_index
        region = labels[k] == 4
        assert np.array_equal(region, (heat[k] >= 0.5) & (liver.array[k] > 0))
        i, j = s.cam_peak_ij
        assert heat[k, j, i] == heat[k].max() == 1.0
        assert np.isclose(s.probabilities.sum(), 1.0, atol=1e-4)
    assert res.report["summary"]["dominant_class"] == "hcc"
    assert res.report["slice_counts"]["hcc"] == len(res.slices)


def test_a_lower_threshold_marks_a_larger_region(biased_model):
    ct, liver = make_abdomen()
    hi = (run(ct, liver, biased_model, cam_threshold=0.7).labelmap.array == 4).sum()
    lo = (run(ct, liver, biased_model, cam_threshold=0.2).labelmap.array == 4).sum()
    assert lo > hi > 0


def test_results_do_not_depend_on_how_the_volume_is_stored(biased_model):
    ct, liver = make_abdomen()
    ref = run(ct, liver, biased_model)
    perm, flips = (0, 2, 1), (True, True, False)
    ct2, liver2 = reoriented(ct, perm, flips), reoriented(liver, perm, flips)
    res = run(ct2, liver2, biased_model)
    assert res.labelmap.same_geometry(ct2)
    from DADRNLesionLib.orientation import to_axial_frame

    canon_ref, _ = to_axial_frame(ref.labelmap)
    canon_res, _ = to_axial_frame(res.labelmap)
    assert np.array_equal(canon_ref.array, canon_res.array)
    assert np.allclose(to_axial_frame(ref.heatmap)[0].array, to_axial_frame(res.heatmap)[0].array, atol=1e-5)
    # Flipping k reverses slice order, so input slice indices differ but z positions match.
    assert sorted(round(s.z_mm, 3) for s in ref.slices) == sorted(round(s.z_mm, 3) for s in res.slices)
    assert "flipped" in res.report["input"]["orientation"]


def test_progress_reports_done_and_total(biased_model):
    ct, liver = make_abdomen()
    seen = []
    run_pipeline(ct, liver_mask=liver, model=biased_model, options=PipelineOptions(device="cpu", batch_size=3),
                 progress=lambda stage, done, total: seen.append((stage, done, total)))
    model_events = [e for e in seen if e[0] == "model"]
    assert model_events[0] == ("model", 0, 8) and model_events[-1] == ("model", 8, 8)
    assert [d for _, d, _ in model_events] == [0, 3, 6, 8]


def test_cancel_stops_between_batches(biased_model):
    ct, liver = make_abdomen()
    done = []

    def progress(stage, d, total):
        done.append(d)

    with pytest.raises(Cancelled):
        run_pipeline(ct, liver_mask=liver, model=biased_model, options=PipelineOptions(device="cpu", batch_size=2),
                     progress=progress, cancel=lambda: len(done) >= 4)
    assert max(done) < 8


def test_same_input_gives_the_same_result(biased_model):
    ct, liver = make_abdomen()
    a, b = run(ct, liver, biased_model), run(ct, liver, biased_model)
    assert np.array_equal(a.labelmap.array, b.labelmap.array)
    assert np.allclose(np.stack([s.probabilities for s in a.slices]), np.stack([s.probabilities for s in b.slices]), atol=1e-5)


def test_liver_mask_on_another_grid_is_refused(biased_model):
    ct, liver = make_abdomen()
    shifted = Volume(liver.array, liver.spacing, (0.0, 0.0, 0.0))
    with pytest.raises(GeometryMismatchError, match="resample"):
        run(ct, shifted, biased_model)


def test_empty_or_non_binary_user_mask_is_refused(biased_model):
    ct, liver = make_abdomen()
    with pytest.raises(UserInputError, match="empty"):
        run(ct, liver.with_array(np.zeros_like(liver.array)), biased_model)
    with pytest.raises(UserInputError, match="not binary"):
        run(ct, liver.with_array(liver.array * np.uint8(3) + (ct.array > 0).astype(np.uint8)), biased_model)


@pytest.mark.parametrize("bad, message", [
    (lambda ct: ct.with_array(np.zeros_like(ct.array)), "constant"),
    (lambda ct: ct.with_array((ct.array.astype(np.int32) + 1500).astype(np.int16)), "Hounsfield"),
    (lambda ct: ct.with_array(np.where(ct.array > 50, np.nan, ct.array.astype(np.float32))), "NaN"),
])
def test_non_ct_input_is_refused(biased_model, bad, message):
    ct, liver = make_abdomen()
    with pytest.raises(UserInputError, match=message):
        run(bad(ct), liver, biased_model)


def test_one_slice_volume_works(biased_model):
    ct, liver = make_abdomen(shape=(5, 96, 96))
    ct1 = Volume(ct.array[2:3].copy(), ct.spacing, ct.origin)
    l1 = Volume(liver.array[2:3].copy(), ct.spacing, ct.origin)
    res = run(ct1, l1, biased_model)
    assert len(res.slices) == 1 and res.labelmap.shape == (1, 96, 96)


def test_class_order_is_the_documented_one():
    assert CLASS_NAMES == ("normal", "cyst", "fnh", "hcc", "hem") and LIVER_VALUE == 1


def _slices(classes, first=10, top=0.8):
    from DADRNLesionLib.results import SliceResult

    out = []
    for n, c in enumerate(classes):
        p = np.full(len(CLASS_NAMES), 0.05)
        p[CLASS_NAMES.index(c)] = top + 0.1 * (c == "cyst")  # ties in slice count go to the larger summed probability
        out.append(SliceResult(first + n, 2.0 * n, c, p / p.sum()))
    return out


def test_study_summary_names_the_classes_it_outvoted_and_the_lesion_runs():
    from DADRNLesionLib.results import study_summary

    mixed = study_summary(_slices(["normal", "hcc", "fnh", "fnh", "hem", "normal", "normal", "fnh", "hcc", "cyst", "normal"]))
    assert mixed["dominant_class"] == "fnh" and mixed["slices"] == [12, 13, 17]
    assert mixed["finding"] == "FNH on 3 of 7 lesion slices (also HCC 2, Cyst 1, Hemangioma 1)"
    assert mixed["class_counts"] == {"cyst": 1, "fnh": 3, "hcc": 2, "hem": 1}
    assert [(r["first_slice"], r["last_slice"]) for r in mixed["regions"]] == [(11, 14), (17, 19)]
    assert mixed["regions"][0]["class_counts"] == {"hcc": 1, "fnh": 2, "hem": 1}

    one = study_summary(_slices(["normal", "cyst", "cyst", "normal"]))
    assert one["finding"] == "Cyst on 2 slice(s)" and one["regions"] == [{"first_slice": 11, "last_slice": 12, "class_counts": {"cyst": 2}}]
    none = study_summary(_slices(["normal"] * 3))
    assert none["finding"] == "no lesion slices" and none["dominant_class"] is None and none["regions"] == []
