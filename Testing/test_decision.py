"""The decision rule: the normal-logit offset, chosen on validation slices, taken alike by Grad-CAM,
the pipeline, `evaluate` and `calibrate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from DADRNLesionLib import data as D
from DADRNLesionLib.cam import GradCAM
from DADRNLesionLib.classes import CLASS_NAMES
from DADRNLesionLib.cli import main
from DADRNLesionLib.decision import adjust_probabilities, card_offset, choose_offset
from DADRNLesionLib.errors import WeightsError
from DADRNLesionLib.pipeline import PipelineOptions, run_pipeline
from DADRNLesionLib.preprocess import InputSpec
from DADRNLesionLib.weights import load_checkpoint, random_model, save_checkpoint

from test_data import case_with_lesions
from test_train import SIZE, toy_cache


def test_adjusting_is_bayes_rule_for_a_new_normal_prior():
    p = np.array([[0.4, 0.3, 0.1, 0.1, 0.1], [0.1, 0.6, 0.1, 0.1, 0.1]])
    q = adjust_probabilities(p, np.log(3.0))  # normal three times as likely a priori
    np.testing.assert_allclose(q[0], np.array([1.2, 0.3, 0.1, 0.1, 0.1]) / 1.8)
    np.testing.assert_allclose(q.sum(axis=1), 1.0)
    np.testing.assert_allclose(adjust_probabilities(q, -np.log(3.0)), p)  # undone exactly
    # The lesion classes keep their order: only normal moves against them.
    assert (q[:, 1:].argmax(axis=1) == p[:, 1:].argmax(axis=1)).all()


def test_the_offset_chosen_on_slices_with_too_many_false_lesions_favours_normal():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 400 + [1, 2, 3, 4] * 25)
    probs = np.full((labels.size, 5), 0.1)
    probs[np.arange(labels.size), labels] = 0.6  # right, but ...
    fooled = rng.random(400) < 0.3  # ... 30 % of the normal slices lean to a lesion class, weakly
    probs[:400][fooled] = [0.35, 0.05, 0.45, 0.1, 0.05]
    choice = choose_offset(labels, probs)
    assert choice["at_zero"]["class_accuracy"]["normal"] == pytest.approx(1 - fooled.mean())
    assert 0.3 <= choice["normal_logit_offset"] <= 1.6  # enough to flip 0.45 vs 0.35, not the lesions' 0.6 vs 0.1
    assert choice["chosen"]["class_accuracy"]["normal"] == 1.0 and choice["chosen"]["class_accuracy"]["fnh"] == 1.0
    assert choice["chosen"]["macro_f1"] > choice["at_zero"]["macro_f1"]
    with pytest.raises(ValueError, match="normal and lesion"):
        choose_offset(labels[:400], probs[:400])


def test_gradcam_decides_with_the_offset_and_explains_the_class_it_decided(tiny_model):
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    plain = GradCAM(tiny_model.model)(x)
    assert torch.equal(GradCAM(tiny_model.model, normal_offset=0.0)(x).target, plain.target)
    lesion = GradCAM(tiny_model.model, normal_offset=-8.0)(x)  # normal all but ruled out
    normal = GradCAM(tiny_model.model, normal_offset=8.0)(x)
    assert (lesion.target != 0).all() and (normal.target == 0).all()
    torch.testing.assert_close(lesion.logits, plain.logits)  # the network's own logits are reported unchanged
    expected = torch.from_numpy(adjust_probabilities(plain.probabilities.double().numpy(), -8.0)).float()
    torch.testing.assert_close(lesion.probabilities, expected, atol=1e-5, rtol=1e-4)
    # The map is that of the decided class, the same as asking for that class outright.
    torch.testing.assert_close(lesion.cams, GradCAM(tiny_model.model)(x, target=lesion.target).cams)


def _with_decision(loaded, offset):
    loaded.card.extra["decision"] = {"normal_logit_offset": offset}
    return loaded


def test_the_pipeline_takes_the_cards_offset_and_reports_it():
    ct, liver, les = case_with_lesions()
    liver = D.prepare_case("case", ct, liver, les).liver
    opts = PipelineOptions(device="cpu", batch_size=4)
    model = random_model({"backbone": "drn_d_22", "width": 0.25, "attention": "dual"}, InputSpec(size=64), seed=2)
    with torch.no_grad():
        model.model.fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 3.0, 0.0]))  # HCC everywhere
    run = run_pipeline(ct, liver_mask=liver, model=model, options=opts)
    assert {s.predicted_class for s in run.slices} == {"hcc"} and run.report["model"]["normal_logit_offset"] == 0.0
    assert run.report["cam_smoothing_cells"] == opts.cam_smoothing
    run = run_pipeline(ct, liver_mask=liver, model=_with_decision(model, 6.0), options=opts)
    assert {s.predicted_class for s in run.slices} == {"normal"} and run.report["model"]["normal_logit_offset"] == 6.0
    assert run.labelmap.array.max() <= 1 and run.heatmap.array.max() == 0  # no lesion slice: no lesion label, no heatmap
    for bad in (float("nan"), 50.0, "high"):
        with pytest.raises(WeightsError, match="normal_logit_offset"):
            card_offset(_with_decision(model, bad).card)


def test_calibrate_chooses_on_validation_records_in_the_card_and_evaluate_then_uses_it(tmp_path):
    cache = toy_cache()
    cache.save(tmp_path / "cache")
    loaded = random_model({"backbone": "drn_d_22", "width": 0.125, "attention": "dual"}, InputSpec(size=SIZE), seed=0)
    weights = save_checkpoint(loaded.model, tmp_path / "m.safetensors", loaded.card)
    split = {c["case_id"]: ("val" if c["case_id"].endswith("_1") else "test") for c in cache.cases}
    D.write_split(tmp_path / "split.csv", split)

    def evaluate(split_name, out, *extra):
        return main(["evaluate", "--weights", str(weights), "--cache", str(tmp_path / "cache"), "--split-file", str(tmp_path / "split.csv"),
                     "--split", split_name, "--out", str(tmp_path / out), "--device", "cpu", "--quiet", *extra])

    assert evaluate("val", "val") == 0 and evaluate("test", "test") == 0
    assert main(["calibrate", str(tmp_path / "test"), "--weights", str(weights), "--record-in-card", "--quiet"]) == 2  # never on test
    assert main(["calibrate", str(tmp_path / "val"), "--weights", str(weights), "--record-in-card", "--quiet"]) == 0
    choice = json.loads((tmp_path / "val" / "calibration.json").read_text())
    card = load_checkpoint(weights).card  # still verifies: only the card changed
    b = card_offset(card)
    assert b == choice["normal_logit_offset"] and card.extra["decision"]["chosen_on"]["split"] == "val"
    # evaluate now decides with the card's offset; its figures on the validation slices are the chosen ones.
    assert evaluate("val", "val_b") == 0
    m = json.loads((tmp_path / "val_b" / "metrics.json").read_text())
    assert m["normal_logit_offset"] == b
    assert m["all"]["classification"]["macro_f1"] == pytest.approx(choice["chosen"]["macro_f1"], abs=0.02)  # 5-decimal CSV
    # Calibrating again from an evaluation made with the offset undoes it first: the same choice.
    assert main(["calibrate", str(tmp_path / "val_b"), "--quiet"]) == 0
    assert json.loads((tmp_path / "val_b" / "calibration.json").read_text())["normal_logit_offset"] == pytest.approx(b)
    # Another model's evaluation is not recorded into this card.
    other = random_model({"backbone": "drn_d_22", "width": 0.125, "attention": "dual"}, InputSpec(size=SIZE), seed=1)
    w2 = save_checkpoint(other.model, tmp_path / "o.safetensors", other.card)
    assert main(["calibrate", str(tmp_path / "val"), "--weights", str(w2), "--record-in-card", "--quiet"]) == 2
    assert "decision" not in json.loads((tmp_path / "o.json").read_text())
    assert evaluate("val", "val_raw", "--normal-offset", "0") == 0
    raw = json.loads((tmp_path / "val_raw" / "metrics.json").read_text())
    assert raw["normal_logit_offset"] == 0 and raw["all"]["classification"]["macro_f1"] == pytest.approx(choice["at_zero"]["macro_f1"], abs=0.02)
    assert CLASS_NAMES[0] == "normal"


def test_training_with_calibrate_records_the_offset_it_chose_on_every_validation_slice(tmp_path):
    from DADRNLesionLib.train import TrainConfig, train

    from test_train import TINY, quiet

    cache = toy_cache(cases_per_class=3, slices_per_case=6)
    split = {c["case_id"]: ("train", "val", "test")[int(c["case_id"][-1])] for c in cache.cases}
    thinned = cache.thin_normal_slices(2)  # training sees 2 normal slices a case; the choice sees all 6
    cfg = TrainConfig(epochs=1, batch_size=8, samples_per_epoch=8, patience=0, augment=None, calibrate=True)
    result = train(thinned, split, TINY, cfg, tmp_path / "run", device="cpu", threads=1, test_cache=cache, log=quiet, progress_bar=False)
    card = load_checkpoint(result.best_weights).card
    decision = card.extra["decision"]
    val_slices = len(cache.indices_of_cases([c for c, s in split.items() if s == "val"]))
    assert decision["chosen_on"] == {"split": "val", "during": "training", "slices": val_slices}
    assert decision["normal_logit_offset"] == card_offset(card) and card.training["config"]["calibrate"] is True
    # The test split was scored with that offset: the same network, its recorded decision.
    m = json.loads((tmp_path / "run" / "test" / "metrics.json").read_text())
    assert m["normal_logit_offset"] == decision["normal_logit_offset"]
