"""The paper's measures on hand-checked examples."""

from __future__ import annotations

import numpy as np
import pytest

from DADRNLesionLib.classes import CLASS_NAMES
from DADRNLesionLib.metrics import (
    classification_summary,
    confusion_matrix,
    format_classification_table,
    format_localization_table,
    localization_summary,
)


def test_confusion_matrix_rows_are_truth_columns_are_predictions():
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2])
    assert cm.shape == (5, 5)
    assert cm[0, 0] == 1 and cm[0, 1] == 1 and cm[1, 1] == 1 and cm[2, 2] == 2 and cm[2, 0] == 1
    assert cm.sum() == 6
    with pytest.raises(ValueError):
        confusion_matrix([0, 5], [0, 0])
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0])


def test_class_accuracy_is_recall_and_macro_means_are_over_present_classes():
    # normal: 4 slices, 3 right, 1 called cyst; cyst: 2 slices, both right; hcc: 2 slices, 1 right, 1 called normal.
    y = [0, 0, 0, 0, 1, 1, 3, 3]
    p = [0, 0, 0, 1, 1, 1, 3, 0]
    s = classification_summary(confusion_matrix(y, p))
    pc = s["per_class"]
    assert pc["normal"]["accuracy"] == pytest.approx(0.75) == pc["normal"]["recall"]
    assert pc["cyst"]["accuracy"] == 1.0 and pc["cyst"]["precision"] == pytest.approx(2 / 3)
    assert pc["hcc"]["accuracy"] == 0.5 and pc["hcc"]["precision"] == 1.0
    assert pc["normal"]["precision"] == pytest.approx(3 / 4)
    # fnh and hem have no true slices: no recall, left out of the macro means.
    assert pc["fnh"]["accuracy"] is None and pc["fnh"]["f1"] is None and pc["fnh"]["precision"] is None
    assert s["accuracy"] == pytest.approx(6 / 8)
    f1 = {
        "normal": 2 * 0.75 * 0.75 / 1.5,
        "cyst": 2 * (2 / 3) * 1.0 / (2 / 3 + 1.0),
        "hcc": 2 * 1.0 * 0.5 / 1.5,
    }
    assert s["macro_f1"] == pytest.approx(np.mean(list(f1.values())))
    assert s["macro_recall"] == pytest.approx(np.mean([0.75, 1.0, 0.5]))
    assert s["macro_precision"] == pytest.approx(np.mean([0.75, 2 / 3, 1.0]))
    assert s["classes"] == list(CLASS_NAMES)


def test_a_class_never_predicted_has_zero_precision_and_f1():
    s = classification_summary(confusion_matrix([0, 2, 2], [0, 0, 0]))
    assert s["per_class"]["fnh"]["precision"] == 0.0
    assert s["per_class"]["fnh"]["f1"] == 0.0
    assert s["per_class"]["fnh"]["accuracy"] == 0.0


def test_perfect_predictions_score_one_everywhere():
    y = [0, 1, 2, 3, 4, 4]
    s = classification_summary(confusion_matrix(y, y))
    assert s["accuracy"] == s["macro_f1"] == s["macro_precision"] == s["macro_recall"] == 1.0


def test_localization_per_lesion_class_over_all_its_slices():
    labels = [0, 1, 1, 1, 1, 3, 3, -1]
    hits = [True, True, False, True, True, False, False, True]  # the normal and the unscored (-1) slice do not count
    ious = [0.9, 0.5, 0.0, 0.25, 0.25, 0.0, 0.1, 1.0]
    loc = localization_summary(labels, hits, ious)
    assert loc["cyst"] == {"pointing": 0.75, "iou": pytest.approx(0.25), "n": 4}
    assert loc["hcc"]["pointing"] == 0.0 and loc["hcc"]["iou"] == pytest.approx(0.05)
    assert loc["fnh"] == {"pointing": None, "iou": None, "n": 0}
    assert loc["all_lesion_slices"]["n"] == 6 and loc["all_lesion_slices"]["pointing"] == pytest.approx(3 / 6)


def test_tables_show_the_figures():
    s = classification_summary(confusion_matrix([0, 1, 1], [0, 1, 0]))
    text = format_classification_table(s, "T")
    assert "T" in text and "0.5000" in text and "recall" in text and "n=2" in text
    loc = localization_summary([1, 1], [True, False], [0.5, 0.0])
    assert "0.5000" in format_localization_table(loc)
