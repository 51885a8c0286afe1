"""Evaluation: localisation scoring by hand, agreement with the product's pipeline, report files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from DADRNLesionLib import data as D
from DADRNLesionLib.classes import CLASS_NAMES
from DADRNLesionLib.evaluate import evaluate_cache, localise, write_report
from DADRNLesionLib.pipeline import PipelineOptions, run_pipeline
from DADRNLesionLib.preprocess import InputSpec
from DADRNLesionLib.weights import random_model, save_checkpoint

from test_data import case_with_lesions
from test_train import SIZE, toy_cache


def test_localise_scores_the_peak_against_the_dilated_lesion_and_the_region_by_iou():
    liver = np.ones((8, 8), np.uint8)
    core = np.zeros((8, 8), np.uint8)
    core[0:4, 0:4] = 1
    dil = np.zeros((8, 8), np.uint8)
    dil[0:6, 0:6] = 1
    masks = np.stack([liver, core, dil])
    cam = torch.zeros(2, 2)
    cam[0, 0] = 1.0  # upsampled: the top-left quarter is hottest
    hit, iou, (r, c), centre_hit = localise(cam, masks, 0.5)
    assert hit and (r, c) == (0, 0) and centre_hit
    assert 0.2 < iou <= 1.0
    cam2 = torch.zeros(2, 2)
    cam2[1, 1] = 1.0  # bottom-right: outside even the dilated lesion
    hit2, iou2, (r2, c2), centre2 = localise(cam2, masks, 0.5)
    assert not hit2 and r2 >= 6 and c2 >= 6 and iou2 == 0.0 and not centre2
    miss, zero, none, no_centre = localise(torch.zeros(2, 2), masks, 0.5)  # no heat at all
    assert not miss and zero == 0.0 and none == (-1, -1) and not no_centre
    # The liver masks the heat: a peak outside the liver is not taken.
    liver_half = liver.copy()
    liver_half[:, 4:] = 0
    hit3, _, (r3, c3), _ = localise(cam2, np.stack([liver_half, core, dil]), 0.5)
    assert c3 < 4


def test_the_hot_spot_centre_is_not_tied_to_the_cam_grid():
    """Four nearly equal CAM cells around a small lesion: the peak falls on one cell's centre beside the
    lesion, the heat-weighted centre of the hot spot on the lesion."""
    liver = np.ones((16, 16), np.uint8)
    lesion = np.zeros((16, 16), np.uint8)
    lesion[7:9, 7:9] = 1
    cam = torch.zeros(4, 4)
    cam[1:3, 1:3] = 0.98
    cam[1, 1] = 1.0
    hit, _, (r, c), centre_hit = localise(cam, np.stack([liver, lesion, lesion]), 0.5)
    assert not hit and max(r, c) < 7  # the peak: the centre of cell (1, 1), beside the lesion
    assert centre_hit


@pytest.fixture(scope="module")
def hcc_model():
    """A random small model pushed towards HCC, so every slice gets a heatmap."""
    loaded = random_model({"backbone": "drn_d_22", "width": 0.25, "attention": "dual"}, InputSpec(size=64), seed=2)
    with torch.no_grad():
        loaded.model.fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 8.0, 0.0]))
    return loaded


def test_evaluation_agrees_with_the_pipeline_on_classes_probabilities_and_heatmap_peaks(hcc_model):
    ct, liver, les = case_with_lesions()
    cv = D.prepare_case("case", ct, liver, les)
    cache = D.build_cache([cv], hcc_model.card.input)
    result = evaluate_cache(hcc_model.model, cache, batch_size=4)
    run = run_pipeline(ct, liver_mask=cv.liver, model=hcc_model, options=PipelineOptions(device="cpu", batch_size=4))
    by_k = {s.slice_index: s for s in run.slices}
    assert set(result.slice_index.tolist()) <= set(by_k)
    lesion_rows = 0
    for n, k in enumerate(result.slice_index):
        s = by_k[int(k)]
        assert CLASS_NAMES[result.predicted[n]] == s.predicted_class == "hcc"
        np.testing.assert_allclose(result.probabilities[n], s.probabilities, atol=0.02)  # uint8 cache vs float
        if result.labels[n] > 0:
            lesion_rows += 1
            pi, pj = result.peak_ij[n]
            # A random model's CAM is nearly flat, so near-ties may fall either way: the evaluation's
            # peak must be a maximum of the pipeline's own heatmap up to the uint8 rounding of the cache.
            assert run.heatmap.array[k, pj, pi] >= 0.95
    assert lesion_rows == 3  # k5, k6 (HCC) and k8 (cyst)


def test_evaluation_of_a_toy_set_and_its_report(tmp_path):
    cache = toy_cache()
    for c in cache.cases:  # the second case of each class drawn hard
        c["subgroup"] = "hard" if c["case_id"].endswith("_1") else "regular"
    loaded = random_model({"backbone": "drn_d_22", "width": 0.125, "attention": "dual"}, InputSpec(size=SIZE), seed=0)
    result = evaluate_cache(loaded.model, cache, np.arange(len(cache)), batch_size=16)
    n = len(cache)
    # One group ("toy"): no group scopes, but each subgroup is reported on its own cases.
    scopes = result.summary["groups"]
    assert sorted(scopes) == ["toy / hard", "toy / regular"]
    assert scopes["toy / hard"]["n_cases"] == 5 and scopes["toy / hard"]["classification"]["n"] == n // 2
    hard = np.array([c.endswith("_1") for c in result.case_id])
    assert scopes["toy / hard"]["classification"]["accuracy"] == pytest.approx((result.predicted == result.labels)[hard].mean())
    assert result.probabilities.shape == (n, 5)
    np.testing.assert_allclose(result.probabilities.sum(1), 1.0, atol=1e-5)
    lesion = result.labels > 0
    assert result.scored[lesion].all() and not result.scored[~lesion].any()
    assert np.isnan(result.iou[~lesion]).all()
    assert not result.hit[lesion & (result.predicted == 0)].any()  # predicted normal: no heatmap, a miss
    summ = result.summary["all"]
    assert summ["classification"]["n"] == n and summ["n_cases"] == 10
    assert summ["localization"]["cyst"]["n"] == 8
    out = write_report(result, tmp_path / "rep", title="toy")
    for name in ("metrics.json", "metrics.csv", "slices.csv", "confusion.png", "report.txt"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "slices.csv")))
    assert len(rows) == n and rows[0]["label"] == "normal" and rows[0]["pointing_hit"] == ""
    metrics = list(csv.DictReader(open(out / "metrics.csv")))
    acc = [r for r in metrics if r["scope"] == "all" and r["class"] == "all" and r["metric"] == "accuracy"]
    assert float(acc[0]["value"]) == pytest.approx(summ["classification"]["accuracy"], abs=1e-5)
    # Patient-resampled interval around the figure: in the CSV, the JSON and the report.
    assert float(acc[0]["ci_low"]) <= float(acc[0]["value"]) <= float(acc[0]["ci_high"])
    assert summ["interval"]["patients"] == 10 and summ["interval"]["accuracy"] == pytest.approx(
        [float(acc[0]["ci_low"]), float(acc[0]["ci_high"])], abs=1e-5)
    assert "95% interval (2000 resamples of 10 patients): accuracy" in (out / "report.txt").read_text()
    assert result.card_metrics()["all"]["interval"]["macro_f1"] == summ["interval"]["macro_f1"]


def test_cli_evaluate_writes_tables_for_a_split(tmp_path):
    from DADRNLesionLib.cli import main

    cache = toy_cache()
    cache.save(tmp_path / "cache")
    loaded = random_model({"backbone": "drn_d_22", "width": 0.125, "attention": "dual"}, InputSpec(size=SIZE), seed=0)
    save_checkpoint(loaded.model, tmp_path / "m.safetensors", loaded.card)
    split = {c["case_id"]: ("test" if c["case_id"].endswith("_1") else "train") for c in cache.cases}
    D.write_split(tmp_path / "split.csv", split)
    code = main(["evaluate", "--weights", str(tmp_path / "m.safetensors"), "--cache", str(tmp_path / "cache"),
                 "--split-file", str(tmp_path / "split.csv"), "--out", str(tmp_path / "ev"), "--device", "cpu", "--quiet",
                 "--record-in-card", "test"])
    assert code == 0
    from DADRNLesionLib.weights import load_checkpoint

    card = load_checkpoint(tmp_path / "m.safetensors").card  # still verifies: the weights did not change
    assert card.metrics["test"]["all"]["slices"] == 20 and card.metrics["test"]["evaluated_on"]["split"] == "test"
    assert card.metrics["test"]["evaluated_on"]["liver_masks"] == "unrecorded"  # the toy cache names no data source
    assert card.metrics["test"]["evaluated_on"]["source"] == cache.source  # its record travels along
    assert card.metrics["test"]["evaluated_on"]["data"] == str(tmp_path / "cache")  # nothing to rebuild it from: its path
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["all"]["n_cases"] == 5 and m["all"]["classification"]["n"] == 20
    assert set(m["all"]["localization"]) >= {"cyst", "fnh", "hcc", "hem"}
    assert "recall of the class" in m["definitions"]["class accuracy"]
    # A cache built for another input size is refused with a message, not a crash.
    other = random_model({"backbone": "drn_d_22", "width": 0.125, "attention": "dual"}, InputSpec(size=40), seed=0)
    save_checkpoint(other.model, tmp_path / "o.safetensors", other.card)
    assert main(["evaluate", "--weights", str(tmp_path / "o.safetensors"), "--cache", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "ev2"), "--device", "cpu", "--quiet"]) == 2


def test_recorded_phantom_data_is_named_by_its_seed_not_a_path():
    from DADRNLesionLib.commands.evaluate import describe_source

    phantoms = {"phantoms": 50, "phantom_seed": 777, "generator": {"phantom.py": "x"}, "real": None}
    assert describe_source(phantoms) == "50 phantoms, seed 777 (dadrn-lesion dataset phantoms --cases 50 --seed 777)"
    assert describe_source({**phantoms, "real": "../shared/data/real"}) is None  # painted-in scans: not from the seed alone
    assert describe_source({"merged": [phantoms, phantoms]}) is None
    assert describe_source({"phantoms": 0, "phantom_seed": 801}) is None and describe_source(None) is None


def test_in_a_slice_context_each_slice_is_scored_with_the_map_of_the_class_decided_for_it():
    from DADRNLesionLib.cam import GradCAM
    from DADRNLesionLib.preprocess import CAM_SMOOTHING_CELLS

    ct, liver, les = case_with_lesions()
    flip = [v.with_array(np.ascontiguousarray(v.array[::-1])) for v in (ct, liver, les)]
    loaded = random_model({"backbone": "drn_d_22", "width": 0.25, "attention": "dual"}, InputSpec(size=64), seed=2)
    cache = D.build_cache([D.prepare_case("case", ct, liver, les), D.prepare_case("flipped", *flip)], loaded.card.input)
    alone = evaluate_cache(loaded.model, cache, batch_size=4, normal_offset=-6.0)
    result = evaluate_cache(loaded.model, cache, batch_size=4, normal_offset=-6.0, slice_context_mm=30.0)
    assert result.summary["slice_context_mm"] == 30.0 and alone.summary["slice_context_mm"] == 0.0
    changed = (result.predicted != alone.predicted) & result.scored
    assert changed.any(), "a whole-case vote should overrule some lesion slices of this random model"
    x = torch.from_numpy(np.asarray(cache.images)).float().div_(255.0)
    maps = GradCAM(loaded.model)(x, target=torch.from_numpy(result.predicted)).cams
    assert result.scored.sum() == 6
    for n in np.flatnonzero(result.scored):
        if result.predicted[n] == 0:
            assert not result.hit[n] and result.iou[n] == 0.0
            continue
        hit, iou, _, centre = localise(maps[n], cache.masks[n], 0.5, CAM_SMOOTHING_CELLS)
        assert (result.hit[n], result.centre_hit[n]) == (hit, centre) and result.iou[n] == pytest.approx(iou)
        if changed[n]:  # scored anew: the map the slice alone was decided with gives another region
            assert alone.iou[n] != pytest.approx(iou)
    np.testing.assert_array_equal(result.hit_true, alone.hit_true)  # the true-class pointing is the decision's own
    # Cases vote apart: each case's decision is that of the case evaluated alone.
    for case in ("case", "flipped"):
        rows = cache.indices_of_cases([case])
        own = evaluate_cache(loaded.model, cache, rows, batch_size=4, normal_offset=-6.0, slice_context_mm=30.0)
        np.testing.assert_array_equal(own.predicted, result.predicted[rows])
