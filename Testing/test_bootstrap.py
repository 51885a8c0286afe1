"""Patient-resampled intervals: same definitions as the point figures, honest about clustered slices."""

from __future__ import annotations

import numpy as np
import pytest

from DADRNLesionLib.bootstrap import _macro_f1, format_interval, patient_bootstrap
from DADRNLesionLib.classes import CLASS_NAMES, LESION_CLASSES
from DADRNLesionLib.metrics import classification_summary, confusion_matrix


def _clustered_errors(n_patients: int = 40, per_patient: int = 30, seed: int = 1):
    """Each patient's slices are all right or all wrong: the slices are not independent draws."""
    rng = np.random.default_rng(seed)
    patient = np.repeat([f"p{i}" for i in range(n_patients)], per_patient)
    labels = np.repeat(rng.integers(0, len(CLASS_NAMES), n_patients), per_patient)
    wrong = np.repeat(rng.random(n_patients) < 0.3, per_patient)
    predicted = np.where(wrong, (labels + 1) % len(CLASS_NAMES), labels)
    hits = ~wrong
    return patient, labels, predicted, hits, labels > 0


def test_macro_f1_matches_the_point_definition_on_random_matrices():
    rng = np.random.default_rng(0)
    cms = rng.integers(0, 6, size=(200, 5, 5)).astype(float)
    cms[::7, 2, :] = 0  # a class absent from the ground truth: left out of the mean
    cms[::5, :, 3] = 0  # a class never predicted: precision 0, F1 0
    cms[::11] = 0
    cms[::11, 1, 1] = 3  # one class present, all right
    got = _macro_f1(cms)
    want = [classification_summary(cm.astype(np.int64))["macro_f1"] for cm in cms]
    np.testing.assert_allclose(got, np.array(want, dtype=float), rtol=1e-12)


def test_perfect_predictions_give_degenerate_intervals_at_one():
    y = np.array([0, 0, 1, 2, 3, 4, 0, 1])
    ci = patient_bootstrap([f"p{i // 2}" for i in range(8)], y, y, y > 0, y > 0, n_resamples=300)
    assert ci["accuracy"] == [1.0, 1.0] and ci["macro_f1"] == [1.0, 1.0]
    assert ci["pointing"]["cyst"] == [1.0, 1.0]
    assert ci["patients"] == 4 and ci["n_resamples"] == 300


def test_interval_holds_the_estimate_and_is_wider_when_slices_cluster_by_patient():
    patient, y, p, hits, scored = _clustered_errors()
    point = classification_summary(confusion_matrix(y, p))["accuracy"]
    by_patient = patient_bootstrap(patient, y, p, hits, scored)
    by_slice = patient_bootstrap(np.arange(y.size).astype(str), y, p, hits, scored)
    lo, hi = by_patient["accuracy"]
    assert lo < point < hi
    # Treating 1200 slices of 40 patients as independent understates the uncertainty several-fold.
    assert hi - lo > 3 * (by_slice["accuracy"][1] - by_slice["accuracy"][0])
    assert by_patient == patient_bootstrap(patient, y, p, hits, scored)  # fixed seed: reproducible
    assert by_patient != patient_bootstrap(patient, y, p, hits, scored, seed=1)


def test_pointing_interval_counts_only_scored_slices_of_the_class():
    # Three cyst patients: two with all hits, one with all misses whose slices are unscored.
    patient = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    y = [1] * 12
    hits = [True] * 4 + [False] * 4 + [True] * 4
    scored = [True] * 4 + [False] * 4 + [True] * 4
    ci = patient_bootstrap(patient, y, y, hits, scored, n_resamples=200)
    assert ci["pointing"]["cyst"] == [1.0, 1.0]
    assert ci["pointing"]["hcc"] is None  # no hcc slices at all
    assert ci["class_accuracy"]["normal"] is None


def test_a_figure_from_one_patient_gets_no_interval():
    # Normal slices and scored cyst slices from patient "a" only: resampling cannot say how they vary.
    patient = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    y = [0, 0, 1, 1] + [1] * 8
    scored = [False, False, True, True] + [False] * 8
    ci = patient_bootstrap(patient, y, y, [s for s in scored], scored, n_resamples=200)
    assert ci["class_accuracy"]["normal"] is None and ci["pointing"]["cyst"] is None
    assert ci["class_accuracy"]["cyst"] == [1.0, 1.0] and ci["accuracy"] == [1.0, 1.0]


def test_one_patient_gives_no_interval_and_bad_arguments_are_refused():
    ci = patient_bootstrap(["scan"] * 5, [0, 1, 1, 0, 0], [0, 1, 0, 0, 0], [False, True, False, False, False], [False, True, True, False, False])
    assert ci["accuracy"] is None and ci["patients"] == 1
    assert "fewer than two patients" in format_interval(ci)
    with pytest.raises(ValueError, match="one entry per slice"):
        patient_bootstrap(["a", "b"], [0], [0], [False], [False])
    with pytest.raises(ValueError, match="level"):
        patient_bootstrap(["a", "b"], [0, 1], [0, 1], [False, True], [False, True], level=95)


def test_report_lines_name_every_class():
    patient, y, p, hits, scored = _clustered_errors()
    text = format_interval(patient_bootstrap(patient, y, p, hits, scored, n_resamples=200))
    assert text.startswith("95% interval (200 resamples of 40 patients): accuracy 0.")
    assert all(f"{c} 0." in text or f"{c} 1." in text for c in CLASS_NAMES)
    assert all(c in text.splitlines()[1] for c in LESION_CLASSES)
