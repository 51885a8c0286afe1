"""The shipped demo model: present, verified by its card, honest about its use, and it works on phantoms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from DADRNLesionLib.classes import CLASS_NAMES
from DADRNLesionLib.errors import WeightsError
from DADRNLesionLib.weights import DEMO_WEIGHTS, card_path_for, load_checkpoint, sha256_of

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    assert DEMO_WEIGHTS.is_file(), f"the demo model {DEMO_WEIGHTS} is missing: run scripts/train_demo_model.sh"
    return load_checkpoint(DEMO_WEIGHTS)


def test_demo_model_is_shipped_small_and_its_checksum_matches_its_card(demo):
    assert DEMO_WEIGHTS == REPO / "Resources" / "Models" / "dadrn_demo.safetensors"
    assert DEMO_WEIGHTS.stat().st_size <= 20 * 1024 * 1024
    card = json.loads(card_path_for(DEMO_WEIGHTS).read_text())
    assert card["sha256"] == sha256_of(DEMO_WEIGHTS)
    assert card["classes"] == list(CLASS_NAMES)
    assert card["architecture"]["attention"] == "dual"  # a DADRN
    assert 96 <= card["input"]["size"] <= 224
    assert "not for diagnosis" in card["intended_use"].lower() and "demonstration" in card["intended_use"].lower()
    test = card["metrics"]["test"]["all"]
    assert {"accuracy", "macro_f1", "class_accuracy", "pointing"} <= set(test)
    assert "phantom" in json.dumps(card["training"]["data"]).lower()
    assert demo.trained and demo.card.model_id == card["model_id"]


def test_a_changed_copy_of_the_demo_weights_is_refused(tmp_path):
    copy = tmp_path / "dadrn_demo.safetensors"
    shutil.copy(DEMO_WEIGHTS, copy)
    shutil.copy(card_path_for(DEMO_WEIGHTS), tmp_path / "dadrn_demo.json")
    load_checkpoint(copy)
    raw = bytearray(copy.read_bytes())
    raw[-5] ^= 0xFF
    copy.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="does not match its model card"):
        load_checkpoint(copy)


def _fresh_phantom_scores(demo, lesion_class, seed):
    """Right/wrong per lesion slice and per normal slice, and whether each right lesion slice's heatmap peak
    lies on the lesion (dilated 2 voxels), for a phantom never seen in training."""
    from scipy import ndimage

    from DADRNLesionLib.data import IGNORE, slice_labels
    from DADRNLesionLib.phantom import generate_case
    from DADRNLesionLib.pipeline import PipelineOptions, run_pipeline

    case = generate_case(seed, lesion_class, hard=False)
    res = run_pipeline(case.ct, liver_mask=case.liver, model=demo, options=PipelineOptions(device="cpu"))
    truth = slice_labels(case.lesion.array, case.liver.array, case.ct.spacing[:2])
    by_slice = {s.slice_index: s for s in res.slices}
    lesion_k = [k for k in np.flatnonzero(truth == CLASS_NAMES.index(lesion_class)) if k in by_slice]
    normal_k = [k for k in np.flatnonzero(truth == 0) if k in by_slice]
    assert len(lesion_k) >= 3 and len(normal_k) >= 10, (lesion_class, seed)
    assert all(v != IGNORE for v in truth[lesion_k])
    lesion_right = [by_slice[k].predicted_class == lesion_class for k in lesion_k]
    normal_right = [by_slice[k].predicted_class == "normal" for k in normal_k]
    near = []
    for k, right in zip(lesion_k, lesion_right):
        if right:
            i, j = by_slice[k].cam_peak_ij
            near.append(bool(ndimage.binary_dilation(case.lesion.array[k] > 0, iterations=2)[j, i]))
    return lesion_right, normal_right, near


@pytest.mark.slow
def test_demo_model_classifies_fresh_phantoms_of_every_lesion_class(demo):
    """Four phantoms never seen in training, one per lesion class: most lesion slices get their class (at least
    half in each phantom), normal slices stay normal, and the heatmap peak of a right slice lies on its lesion.

    Pooled over the four, one slice near a decision boundary moves a figure by about 0.03, not across a threshold.
    """
    lesion, normal, near, per_class = [], [], [], {}
    for lesion_class in ("cyst", "fnh", "hcc", "hem"):
        right, normal_right, near_lesion = _fresh_phantom_scores(demo, lesion_class, 910_001)
        per_class[lesion_class] = float(np.mean(right))
        lesion += right
        normal += normal_right
        near += near_lesion
    assert np.mean(lesion) >= 0.7, f"{np.mean(lesion):.2f} of {len(lesion)} lesion slices right ({per_class})"
    assert min(per_class.values()) >= 0.5, per_class
    assert np.mean(normal) >= 0.9, f"normal: {np.mean(normal):.2f} of {len(normal)} slices right"
    assert np.mean(near) >= 0.6, f"heatmap peak on the lesion in {np.mean(near):.2f} of {len(near)} right slices"


@pytest.mark.slow
def test_demo_model_points_at_a_small_cyst(demo):
    """The same checks on one small cyst (42-68 voxels a slice): its three slices are classified right, and
    the peak of the smoothed heatmap lies on it on two of them. Without the smoothing (`--cam-smoothing 0`)
    the peaks lay 4-9 voxels (7-15 mm) away on all three, on the 28 x 28 grid's cell centres, and this test
    was marked as a known shortfall."""
    right, normal_right, near = _fresh_phantom_scores(demo, "cyst", 910_002)
    assert np.mean(right) >= 0.6 and np.mean(normal_right) >= 0.8
    assert np.mean(near) >= 0.6


def test_the_automatic_liver_mask_with_a_model_measured_worse_with_it_is_warned_about(demo):
    import dataclasses

    from DADRNLesionLib.io import read_volume
    from DADRNLesionLib.pipeline import AUTOMATIC_MASK_TOLERANCE, PipelineOptions, liver_mask_warning, run_pipeline

    card = demo.card
    assert card.liver_mask_sources() == {"reference", "automatic"}
    reference = card.metrics["reference_liver_mask"]["all"]["accuracy"]
    shipped_auto = card.metrics["automatic_liver_mask"]["all"]["accuracy"]
    # the shipped card: warned about exactly when its automatic-mask accuracy lies beyond the tolerance
    assert (liver_mask_warning(card, "auto") is None) == (shipped_auto >= reference - AUTOMATIC_MASK_TOLERANCE)
    # trained on automatic masks too, but measured worse with them: said, with the figures
    auto = reference - 0.05
    worse = dataclasses.replace(card, metrics={**card.metrics, "automatic_liver_mask": {"all": {"accuracy": auto}}})
    message = liver_mask_warning(worse, "auto")
    assert message.startswith("this model is less reliable with the automatic liver mask used here (its card: "
                              f"slice accuracy {auto:.2f} with the automatic mask against {reference:.2f}")
    assert liver_mask_warning(worse, "user") is None and liver_mask_warning(worse, "totalsegmentator") is None
    close = dataclasses.replace(card, metrics={**card.metrics, "automatic_liver_mask": {"all": {"accuracy": reference - 0.02}}})
    assert liver_mask_warning(close, "auto") is None
    assert liver_mask_warning(dataclasses.replace(card, metrics={}), "auto") is None  # nothing measured, nothing to say
    # trained on reference masks only: said even where nothing was measured
    reference_only = dataclasses.replace(card, training={"data": {"merged": [
        {"phantoms": 10, "phantom_seed": 1}, {"phantoms": 10, "phantom_seed": 2, "liver": {"source": "reference"}}]}})
    assert reference_only.liver_mask_sources() == {"reference"}
    assert "trained with reference liver masks only" in liver_mask_warning(reference_only, "auto")
    assert "trained with reference liver masks only" in liver_mask_warning(dataclasses.replace(reference_only, metrics={}), "auto")
    unrecorded = dataclasses.replace(worse, training={})
    assert "less reliable" in liver_mask_warning(unrecorded, "auto")  # the measured figures speak alone
    assert liver_mask_warning(dataclasses.replace(unrecorded, metrics={}), "auto") is None  # no record: nothing to say

    ct = read_volume(REPO / "Resources" / "Demo" / "demo_ct.nii.gz")
    liver = read_volume(REPO / "Resources" / "Demo" / "demo_liver.nii.gz")
    options = PipelineOptions(device="cpu")
    measured_worse = dataclasses.replace(demo, card=worse)
    assert message in run_pipeline(ct, model=measured_worse, options=options).report["warnings"]
    assert run_pipeline(ct, liver_mask=liver, model=measured_worse, options=options).report["warnings"] == []


def test_the_demo_command_writes_its_results_and_says_what_the_automatic_mask_costs(tmp_path, capsys):
    from DADRNLesionLib.cli import main
    from DADRNLesionLib.pipeline import liver_mask_warning

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    # the card's own warning about the automatic mask, where its figures call for one
    expected = liver_mask_warning(load_checkpoint(DEMO_WEIGHTS).card, "auto")
    assert (f"model: {expected}" in err) if expected else ("less reliable" not in err)
    # what it got right and wrong, against the bundled study's truth: 15 HCC slices (three nodules), 36 normal
    truth = next(line for line in err.splitlines() if "against the study's ground truth (demo_lesion.nii.gz): " in line)
    assert "15 HCC slices called " in truth and "36 normal slices called " in truth
    report = json.loads((out / "report.json").read_text())
    assert report["liver"]["source"] == "auto" and report["summary"]["finding"]
    assert (out / "overview.png").is_file() and (out / "lesions.seg.nrrd").is_file()


def test_the_demo_compares_its_slices_with_the_study_ground_truth_class_by_class():
    from types import SimpleNamespace

    from DADRNLesionLib.commands.demo import against_truth

    liver = np.zeros((5, 20, 20), np.uint8)
    liver[:4, 2:18, 2:18] = 1  # slice 4 holds no liver: never counted
    lesion = np.zeros_like(liver)
    lesion[0:2, 5:12, 5:12] = 4  # HCC on slices 0 and 1 (49 mm2 each)
    called = ["hcc", "fnh", "normal", "hcc", "cyst"]
    slices = [SimpleNamespace(slice_index=k, predicted_class=c) for k, c in enumerate(called)]
    assert against_truth(slices, lesion, liver, (1.0, 1.0)) == "2 HCC slices called FNH 1, HCC 1; 2 normal slices called normal 1, HCC 1"
