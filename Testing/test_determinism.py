"""Determinism: the same input, weights and device give the same labels and probabilities (to 1e-5
on the CPU) in separate processes, and the report records what a rerun needs to match it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from DADRNLesionLib.io import read_volume, write_volume
from DADRNLesionLib.pipeline import PipelineOptions, run_pipeline
from DADRNLesionLib.weights import load_checkpoint

from conftest import make_abdomen
from test_bad_input import cli, save_tiny_weights


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("determinism")
    ct, liver = make_abdomen(shape=(16, 96, 96), seed=3)
    write_volume(ct, folder / "ct.nii.gz")
    write_volume(liver, folder / "liver.nii.gz")
    # A moderate bias keeps several classes in play, so the probabilities are not all saturated.
    weights = save_tiny_weights(folder, seed=7, hcc_bias=1.0)
    return folder, weights


def probabilities(out: Path) -> tuple[list[str], np.ndarray]:
    with open(out / "slices.csv") as fh:
        rows = list(csv.DictReader(fh))
    classes = [r["predicted_class"] for r in rows]
    return classes, np.array([[float(r[k]) for k in r if k.startswith("p_")] for r in rows])


@pytest.mark.slow
def test_two_processes_give_the_same_result(case, tmp_path):
    folder, weights = case
    outs = []
    for name in ("first", "second"):
        out = tmp_path / name
        proc = cli("classify", folder / "ct.nii.gz", "--liver-mask", folder / "liver.nii.gz", "--weights", weights,
                   "--device", "cpu", "--threads", "2", "--out", out, "--quiet")
        assert proc.returncode == 0, proc.stderr
        outs.append(out)
    (c1, p1), (c2, p2) = probabilities(outs[0]), probabilities(outs[1])
    assert c1 == c2 and len(c1) == 12
    assert np.abs(p1 - p2).max() <= 1e-5
    assert np.ptp(p1) > 0.01  # real probabilities, not a constant
    for name in ("labelmap.nii.gz", "heatmap.nii.gz"):
        a, b = read_volume(outs[0] / name).array, read_volume(outs[1] / name).array
        assert np.array_equal(a, b) if name.startswith("label") else np.abs(a - b).max() <= 1e-5

    r1, r2 = (json.loads((o / "report.json").read_text()) for o in outs)
    for report in (r1, r2):
        assert set(report["versions"]) >= {"dadrn_lesion", "torch", "numpy", "python"}
        assert report["device"]["name"] == "cpu" and report["device"]["threads"] == 2
        assert report["determinism"]["random_numbers_used"] is False
        assert isinstance(report["determinism"]["torch_seed"], int)
        assert report["model"]["sha256"]
    assert r1["summary"] == r2["summary"] and r1["slice_counts"] == r2["slice_counts"]

    # In this process, with another thread count: the same classes, probabilities within 1e-5.
    ct, liver = read_volume(folder / "ct.nii.gz"), read_volume(folder / "liver.nii.gz")
    res = run_pipeline(ct, liver_mask=liver, model=load_checkpoint(weights), options=PipelineOptions(device="cpu", threads=1))
    assert [s.predicted_class for s in res.slices] == c1
    assert np.abs(np.stack([s.probabilities for s in res.slices]) - p1).max() <= 1e-5


def test_batch_size_does_not_change_the_result(case):
    folder, weights = case
    ct, liver = read_volume(folder / "ct.nii.gz"), read_volume(folder / "liver.nii.gz")
    model = load_checkpoint(weights)
    runs = [run_pipeline(ct, liver_mask=liver, model=model, options=PipelineOptions(device="cpu", batch_size=b, threads=1))
            for b in (1, 5, 64)]
    ref = np.stack([s.probabilities for s in runs[0].slices])
    for other in runs[1:]:
        assert [s.predicted_class for s in other.slices] == [s.predicted_class for s in runs[0].slices]
        assert np.abs(np.stack([s.probabilities for s in other.slices]) - ref).max() <= 1e-5
        assert np.abs(other.heatmap.array - runs[0].heatmap.array).max() <= 1e-4
