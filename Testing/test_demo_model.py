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


CYST_POINTING_SHORTFALL = pytest.mark.xfail(
    strict=True,
    reason="known shortfall: on this fresh phantom the shipped demo model (accuracy 0.92, macro F1 0.74, cyst pointing "
           "game 0.62 on the slices of 172 held-out phantoms, see its card) classifies the three cyst slices and the "
           "normal slices right, but its heatmap peaks lie 4-9 voxels (7-15 mm) from this small cyst (42-68 voxels a "
           "slice), outside the 2-voxel margin: the peak sits on a 28 x 28 grid of about 7 mm over the liver box; this "
           "test turns red when a better model ships so the marker is removed")


@pytest.mark.slow
@pytest.mark.parametrize("lesion_class,seed", [("hcc", 910_001), pytest.param("cyst", 910_002, marks=CYST_POINTING_SHORTFALL)])
def test_demo_model_classifies_a_fresh_phantom(demo, lesion_class, seed):
    """A phantom never seen in training: most lesion slices get the right class, most normal slices stay normal."""
    from DADRNLesionLib.data import IGNORE, slice_labels
    from DADRNLesionLib.phantom import generate_case
    from DADRNLesionLib.pipeline import PipelineOptions, run_pipeline

    case = generate_case(seed, lesion_class, hard=False)
    res = run_pipeline(case.ct, liver_mask=case.liver, model=demo, options=PipelineOptions(device="cpu"))
    truth = slice_labels(case.lesion.array, case.liver.array, case.ct.spacing[:2])
    predicted = {s.slice_index: s.predicted_class for s in res.slices}
    target = CLASS_NAMES.index(lesion_class)
    lesion_k = [k for k in np.flatnonzero(truth == target) if k in predicted]
    normal_k = [k for k in np.flatnonzero(truth == 0) if k in predicted]
    assert len(lesion_k) >= 3 and len(normal_k) >= 10
    lesion_acc = np.mean([predicted[k] == lesion_class for k in lesion_k])
    normal_acc = np.mean([predicted[k] == "normal" for k in normal_k])
    assert lesion_acc >= 0.6, f"{lesion_class}: {lesion_acc:.2f} of {len(lesion_k)} lesion slices right"
    assert normal_acc >= 0.8, f"normal: {normal_acc:.2f} of {len(normal_k)} slices right"
    assert all(v != IGNORE for v in truth[lesion_k])
    # The heatmap peak of a correctly classified lesion slice lies on or next to the lesion most of the time.
    from scipy import ndimage

    les = case.lesion.array > 0
    near = []
    for s in res.slices:
        if s.slice_index in lesion_k and s.predicted_class == lesion_class:
            i, j = s.cam_peak_ij
            near.append(bool(ndimage.binary_dilation(les[s.slice_index], iterations=2)[j, i]))
    assert np.mean(near) >= 0.6
