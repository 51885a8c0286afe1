"""The decision rule: the normal-logit offset and the slice context, chosen on validation slices,
taken alike by Grad-CAM, the pipeline, `evaluate` and `calibrate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from DADRNLesionLib import data as D
from DADRNLesionLib.cam import GradCAM
from DADRNLesionLib.classes import CLASS_NAMES
from DADRNLesionLib.cli import main
from DADRNLesionLib.decision import adjust_probabilities, card_offset, card_slice_context, choose_decision, context_probabilities, decide
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
    choice = choose_decision(labels, probs)
    assert choice["at_zero"]["class_accuracy"]["normal"] == pytest.approx(1 - fooled.mean())
    assert 0.3 <= choice["normal_logit_offset"] <= 1.6  # enough to flip 0.45 vs 0.35, not the lesions' 0.6 vs 0.1
    assert choice["chosen"]["class_accuracy"]["normal"] == 1.0 and choice["chosen"]["class_accuracy"]["fnh"] == 1.0
    assert choice["chosen"]["macro_f1"] > choice["at_zero"]["macro_f1"]
    with pytest.raises(ValueError, match="normal and lesion"):
        choose_decision(labels[:400], probs[:400])


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


def _lesion_run(rng, n=40, lesion=range(12, 28)):
    """One study of `n` slices 2 mm apart: normal but for a lesion (class 3, HCC) on `lesion`, which
    the network sees faintly: each of its slices leans to HCC only a little, with noise."""
    labels = np.zeros(n, np.int64)
    labels[list(lesion)] = 3
    logits = rng.normal(0.0, 0.8, (n, 5))
    logits[:, 0] += 2.0
    logits[labels == 3, 3] += 2.6  # a little above normal: alone, a quarter of the lesion slices are missed
    p = np.exp(logits)
    return labels, p / p.sum(axis=1, keepdims=True), np.arange(n) * 2.0


def test_the_slice_context_lets_a_faint_lesions_slices_outvote_the_noise_of_each():
    rng = np.random.default_rng(3)
    labels, probs, z = _lesion_run(rng)
    alone = probs.argmax(axis=1)
    together = decide(probs, 0.0, 4.0, z, np.zeros(z.size)).argmax(axis=1)
    inside, outside = labels == 3, labels == 0
    assert (alone[inside] == 3).mean() < 0.8 and (together[inside] == 3).mean() > (alone[inside] == 3).mean()
    assert (alone[outside] == 0).mean() < 0.95 and (together[outside] == 0).mean() == 1.0
    # 0 mm is the slice alone; the rows stay probabilities; a study never votes on another's slices.
    np.testing.assert_allclose(decide(probs, 0.7, 0.0, z, np.zeros(z.size)), adjust_probabilities(probs, 0.7))
    smoothed = context_probabilities(probs, z, np.zeros(z.size), 4.0)
    np.testing.assert_allclose(smoothed.sum(axis=1), 1.0)
    two = context_probabilities(np.concatenate([probs, probs[::-1]]), np.concatenate([z, z]), np.repeat([0, 1], z.size), 4.0)
    np.testing.assert_allclose(two[: z.size], smoothed)
    np.testing.assert_allclose(two[z.size :], context_probabilities(probs[::-1], z, np.zeros(z.size), 4.0))


def test_choosing_the_rule_takes_a_context_only_where_it_helps():
    rng = np.random.default_rng(4)
    runs = [_lesion_run(rng) for _ in range(6)]
    labels = np.concatenate([r[0] for r in runs])
    probs = np.concatenate([r[1] for r in runs])
    z = np.concatenate([r[2] for r in runs])
    groups = np.repeat(np.arange(6), runs[0][0].size)
    choice = choose_decision(labels, probs, z_mm=z, groups=groups, context_grid=(0.0, 2.0, 4.0))
    assert choice["slice_context_mm"] > 0 and choice["contexts_tried"] == [0.0, 2.0, 4.0]
    alone = max(r["macro_f1"] for r in choice["curve"] if r["slice_context_mm"] == 0)
    assert choice["chosen"]["macro_f1"] > alone
    # Slices in a random order of z carry no lesion along z: the context then only blurs, and is refused.
    shuffled = rng.permutation(z.size)
    choice = choose_decision(labels, probs, z_mm=z[shuffled], groups=groups, context_grid=(0.0, 2.0, 4.0))
    assert choice["slice_context_mm"] == 0.0
    with pytest.raises(ValueError, match="position and study"):
        choose_decision(labels, probs, context_grid=(0.0, 2.0))


def test_the_pipeline_decides_in_the_cards_slice_context_and_explains_each_slice_by_its_new_class():
    import copy

    ct, liver, les = case_with_lesions()
    liver = D.prepare_case("case", ct, liver, les).liver
    opts = PipelineOptions(device="cpu", batch_size=4)
    model = random_model({"backbone": "drn_d_22", "width": 0.25, "attention": "dual"}, InputSpec(size=64), seed=5)
    model.card.extra["decision"] = {"normal_logit_offset": -6.0}  # every slice some lesion class, by its own vote
    alone = run_pipeline(ct, liver_mask=liver, model=model, options=opts)
    classes_alone = [s.predicted_class for s in alone.slices]
    assert "normal" not in classes_alone and len(set(classes_alone)) > 1, "the random model should disagree with itself"
    model.card.extra["decision"] = {"normal_logit_offset": -6.0, "slice_context_mm": 30.0}  # the whole liver votes
    together = run_pipeline(ct, liver_mask=liver, model=model, options=opts)
    assert together.report["model"]["slice_context_mm"] == 30.0
    classes = [s.predicted_class for s in together.slices]
    assert len(set(classes)) == 1 and classes != classes_alone and classes[0] != "normal"
    for s in together.slices:  # the probabilities reported are those the class was decided on
        np.testing.assert_allclose(s.probabilities.sum(), 1.0, rtol=1e-5)
        assert CLASS_NAMES[int(np.argmax(s.probabilities))] == s.predicted_class
    # Every map is Grad-CAM's for the decided class, also where the slice alone chose another: the same
    # maps as a model that picks that class on every slice by a bias, which moves no gradient.
    biased = copy.deepcopy(model)
    biased.card.extra.pop("decision")
    with torch.no_grad():
        biased.model.fc.bias[CLASS_NAMES.index(classes[0])] += 100.0
    forced = run_pipeline(ct, liver_mask=liver, model=biased, options=opts)
    assert {s.predicted_class for s in forced.slices} == {classes[0]}
    np.testing.assert_allclose(together.heatmap.array, forced.heatmap.array, atol=1e-5)
    np.testing.assert_array_equal(together.labelmap.array, forced.labelmap.array)
    for bad in (-1.0, float("nan"), 31.0, "wide"):
        model.card.extra["decision"] = {"normal_logit_offset": 0.0, "slice_context_mm": bad}
        with pytest.raises(WeightsError, match="slice_context_mm"):
            card_slice_context(model.card)


def test_calibrate_chooses_the_slice_context_from_the_evaluations_slice_positions(tmp_path):
    import csv

    cache = toy_cache()
    cache.save(tmp_path / "cache")
    loaded = random_model({"backbone": "drn_d_22", "width": 0.125, "attention": "dual"}, InputSpec(size=SIZE), seed=0)
    weights = save_checkpoint(loaded.model, tmp_path / "m.safetensors", loaded.card)

    def evaluate(out, *extra):
        return main(["evaluate", "--weights", str(weights), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / out),
                     "--device", "cpu", "--quiet", *extra])

    assert evaluate("all") == 0
    with open(tmp_path / "all" / "slices.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    spacing = {c["case_id"]: c["spacing"][2] for c in cache.cases}
    assert [float(r["axial_frame_z_mm"]) for r in rows] == [int(r["axial_frame_slice_index"]) * spacing[r["case_id"]] for r in rows]
    assert main(["calibrate", str(tmp_path / "all"), "--weights", str(weights), "--record-in-card", "--quiet",
                 "--slice-context-grid", "0", "2", "5"]) == 0
    choice = json.loads((tmp_path / "all" / "calibration.json").read_text())
    assert choice["contexts_tried"] == [0.0, 2.0, 5.0] and {r["slice_context_mm"] for r in choice["curve"]} == {0.0, 2.0, 5.0}
    card = load_checkpoint(weights).card
    assert card_slice_context(card) == choice["slice_context_mm"] and card.extra["decision"]["slice_context_mm"] in (0.0, 2.0, 5.0)
    # An evaluation decided in a context cannot be taken apart slice by slice again: refused, with what to do.
    assert evaluate("wide", "--slice-context-mm", "5") == 0
    assert json.loads((tmp_path / "wide" / "metrics.json").read_text())["slice_context_mm"] == 5.0
    assert main(["calibrate", str(tmp_path / "wide"), "--quiet"]) == 2
    assert main(["calibrate", str(tmp_path / "all"), "--quiet", "--slice-context-grid", "-1"]) == 2
    assert evaluate("bad", "--slice-context-mm", "40") == 2
    # An evaluation from before the slice context (no positions) still calibrates the offset alone.
    with open(tmp_path / "all" / "slices.csv", newline="") as fh:
        old = [{k: v for k, v in r.items() if k != "axial_frame_z_mm"} for r in csv.DictReader(fh)]
    with open(tmp_path / "all" / "slices.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(old[0]))
        w.writeheader()
        w.writerows(old)
    assert main(["calibrate", str(tmp_path / "all"), "--quiet"]) == 0
    choice = json.loads((tmp_path / "all" / "calibration.json").read_text())
    assert choice["contexts_tried"] == [0.0] and choice["slice_context_mm"] == 0.0
