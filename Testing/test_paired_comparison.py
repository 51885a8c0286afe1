"""Paired comparison of two models on the same slices: the bootstrap of differences, the reading of two
evaluations' slices.csv, and the `compare-evaluations` command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from DADRNLesionLib.bootstrap import paired_bootstrap, patient_bootstrap
from DADRNLesionLib.classes import CLASS_NAMES, LESION_CLASSES
from DADRNLesionLib.cli import main
from DADRNLesionLib.errors import UserInputError
from DADRNLesionLib.evaluate import evaluate_cache, write_report
from DADRNLesionLib.metrics import classification_summary, confusion_matrix
from DADRNLesionLib.paired_comparison import compare_evaluations, format_comparison, read_slices, write_comparison
from DADRNLesionLib.preprocess import InputSpec
from DADRNLesionLib.weights import random_model

from test_train import SIZE, toy_cache


def _patients_of_varied_difficulty(seed: int = 0):
    """40 patients of 20 cyst slices each; patient i's slices are wrong with a probability between 0.05
    and 0.95 for model A; model B gets one more slice right in every patient than A does."""
    rng = np.random.default_rng(seed)
    patient, y, pa, pb = [], [], [], []
    for i in range(40):
        wrong = rng.random(20) < rng.uniform(0.05, 0.95)
        wrong[0] = True  # a slice A always misses, B always gets
        a = np.where(wrong, 0, 1)
        b = a.copy()
        b[0] = 1
        patient += [f"p{i}"] * 20
        y += [1] * 20
        pa += a.tolist()
        pb += b.tolist()
    return patient, np.array(y), np.array(pa), np.array(pb)


def test_pairing_sees_a_small_consistent_gain_that_separate_intervals_hide():
    patient, y, pa, pb = _patients_of_varied_difficulty()
    none = np.zeros(y.size, bool)
    ci_a = patient_bootstrap(patient, y, pa, none, none)["class_accuracy"]["cyst"]
    ci_b = patient_bootstrap(patient, y, pb, none, none)["class_accuracy"]["cyst"]
    assert ci_b[0] < ci_a[1]  # the two intervals overlap ...
    d = paired_bootstrap(patient, y, pa, pb, none, none, none)
    cyst = d["class_accuracy"]["cyst"]
    assert cyst["difference"] == pytest.approx(0.05)  # one slice in 20, every patient
    assert cyst["interval"] == pytest.approx([0.05, 0.05])  # ... yet the gain is the same in every resample
    assert cyst["sign"] == 1 and d["accuracy"]["sign"] == 1
    swapped = paired_bootstrap(patient, y, pb, pa, none, none, none)
    assert swapped["class_accuracy"]["cyst"]["sign"] == -1


def test_paired_point_figures_follow_the_metric_definitions():
    rng = np.random.default_rng(3)
    n = 600
    patient = rng.integers(0, 30, n).astype(str)
    y = rng.integers(0, 5, n)
    pa = np.where(rng.random(n) < 0.7, y, rng.integers(0, 5, n))
    pb = np.where(rng.random(n) < 0.8, y, rng.integers(0, 5, n))
    scored = y > 0
    hit_a, hit_b = scored & (rng.random(n) < 0.5), scored & (rng.random(n) < 0.6)
    d = paired_bootstrap(patient, y, pa, pb, hit_a, hit_b, scored, n_resamples=300)
    for pred, side in ((pa, "a"), (pb, "b")):
        summ = classification_summary(confusion_matrix(y, pred))
        assert d["accuracy"][side] == pytest.approx(summ["accuracy"])
        assert d["macro_f1"][side] == pytest.approx(summ["macro_f1"])
        for c in CLASS_NAMES:
            assert d["class_accuracy"][c][side] == pytest.approx(summ["per_class"][c]["accuracy"])
    for j, c in enumerate(LESION_CLASSES, start=1):
        sel = y == j
        assert d["pointing"][c]["a"] == pytest.approx(hit_a[sel].mean())
    lo, hi = d["macro_f1"]["interval"]
    assert lo <= d["macro_f1"]["difference"] <= hi
    same = paired_bootstrap(patient, y, pa, pa, hit_a, hit_a, scored, n_resamples=50)
    assert same["accuracy"]["interval"] == [0.0, 0.0] and same["accuracy"]["sign"] == 0
    with pytest.raises(ValueError, match="one entry per slice"):
        paired_bootstrap(patient, y, pa, pb[:-1], hit_a, hit_b, scored)


@pytest.fixture(scope="module")
def two_evaluations(tmp_path_factory):
    """Two different (untrained) models evaluated on the same toy cases, written as `evaluate` writes them."""
    root = tmp_path_factory.mktemp("evals")
    cache = toy_cache()
    for c in cache.cases:
        c["subgroup"] = "hard" if c["case_id"].endswith("_1") else "regular"
    out = {}
    for seed in (0, 1):
        loaded = random_model({"backbone": "drn_d_22", "width": 0.125, "attention": "dual"}, InputSpec(size=SIZE), seed=seed)
        result = evaluate_cache(loaded.model, cache, np.arange(len(cache)), batch_size=16)
        out[seed] = write_report(result, root / f"model{seed}")
    partial = evaluate_cache(loaded.model, cache, np.arange(len(cache) - 4), batch_size=16)
    out["partial"] = write_report(partial, root / "partial")
    return out


def test_two_evaluations_compare_scope_by_scope_with_each_reports_own_figures(two_evaluations, tmp_path):
    a_dir, b_dir = two_evaluations[0], two_evaluations[1]
    table = read_slices(a_dir)
    assert not table.patient_from_case and set(table.subgroup.tolist()) == {"hard", "regular"}
    result = compare_evaluations(a_dir, b_dir / "slices.csv", n_resamples=200, names=("old", "new"))
    assert list(result["scopes"]) == ["all", "toy / hard", "toy / regular"] and not result["notes"]
    for side, folder in (("a", a_dir), ("b", b_dir)):
        metrics = json.loads((folder / "metrics.json").read_text())
        for scope, summ in (("all", metrics["all"]), ("toy / hard", metrics["groups"]["toy / hard"])):
            got = result["scopes"][scope]
            assert got["accuracy"][side] == pytest.approx(summ["classification"]["accuracy"])
            assert got["macro_f1"][side] == pytest.approx(summ["classification"]["macro_f1"])
            for c in LESION_CLASSES:
                assert got["pointing"][c][side] == pytest.approx(summ["localization"][c]["pointing"])
    assert result["scopes"]["all"]["cases"] == 10 and result["scopes"]["toy / hard"]["cases"] == 5
    text = format_comparison(result)
    assert text.splitlines()[0].startswith("A = old") and "== toy / regular (5 cases, 5 patients" in text
    write_comparison(result, tmp_path)
    rows = (tmp_path / "comparison.csv").read_text().splitlines()
    assert rows[0] == "scope,class,metric,a,b,difference,ci_low,ci_high,sign"
    assert len(rows) == 1 + 3 * (2 + len(CLASS_NAMES) + len(LESION_CLASSES))


def test_evaluations_of_different_slices_are_refused(two_evaluations, tmp_path):
    with pytest.raises(UserInputError, match="did not score the same slices .*4 only in"):
        compare_evaluations(two_evaluations[0], two_evaluations["partial"])
    with pytest.raises(UserInputError, match="no slices.csv there"):
        compare_evaluations(two_evaluations[0], two_evaluations[0] / "nothing")
    header_only = tmp_path / "slices.csv"
    header_only.write_text((two_evaluations[0] / "slices.csv").read_text().splitlines()[0] + "\n")
    with pytest.raises(UserInputError, match="holds no slices"):
        compare_evaluations(two_evaluations[0], header_only)


def test_an_older_slices_csv_without_patient_ids_is_read_with_a_note(two_evaluations, tmp_path):
    lines = (two_evaluations[0] / "slices.csv").read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, h in enumerate(header) if h not in ("patient_id", "subgroup")]
    (tmp_path / "slices.csv").write_text("\n".join(",".join(row.split(",")[i] for i in keep) for row in lines) + "\n")
    result = compare_evaluations(tmp_path, two_evaluations[1], n_resamples=50)
    assert "no patient_id column" in result["notes"][0]
    assert result["scopes"]["all"]["patients"] == 10


def test_the_command_prints_the_table_and_keeps_an_earlier_comparison(two_evaluations, tmp_path, capsys):
    args = ["compare-evaluations", str(two_evaluations[0]), str(two_evaluations[1]), "--names", "shipped", "candidate",
            "--resamples", "100", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    assert "B = candidate" in capsys.readouterr().out
    before = (tmp_path / "comparison.json").read_text()
    assert main(args) == 2  # --out already holds a comparison
    assert "already holds comparison.json" in capsys.readouterr().err
    assert (tmp_path / "comparison.json").read_text() == before
    assert main(["compare-evaluations", str(two_evaluations[0]), str(two_evaluations["partial"]), "--quiet"]) == 2
    assert "--split-file and --split" in capsys.readouterr().err
