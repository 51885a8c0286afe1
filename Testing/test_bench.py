"""The benchmark's code path on a tiny model: the figures are computed right (not how big they are)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from DADRNLesionLib.bench import benchmark_model, end_to_end, main, measure_interleaved, measure_throughput
from DADRNLesionLib.io import write_volume
from DADRNLesionLib.preprocess import InputSpec
from DADRNLesionLib.weights import random_model

from conftest import make_abdomen


@pytest.fixture(scope="module")
def tiny():
    return random_model({"backbone": "drn_d_22", "width": 0.25, "attention": "dual"}, InputSpec(size=64))


def test_throughput_counts_slices_per_second():
    calls = []
    rate = measure_throughput(lambda: calls.append(1), batch=10, device=torch.device("cpu"), min_time=0.05, min_iters=3)
    assert rate["iterations"] >= 3 and len(calls) == rate["iterations"] + 1  # one warm-up call
    assert rate["slices_per_s"] == pytest.approx(10 / rate["median_batch_s"])


def test_interleaved_steps_alternate_and_each_gets_its_own_figure():
    order = []
    steps = {"a": lambda: order.append("a"), "b": lambda: (order.append("b"), time.sleep(0.002))}
    rates = measure_interleaved(steps, batch=4, device=torch.device("cpu"), min_time=0.02, min_iters=3)
    assert order[:2] == ["a", "b"]  # one warm-up call each, then rounds
    assert order[2:] == ["a", "b"] * rates["a"]["iterations"]
    assert rates["a"]["iterations"] == rates["b"]["iterations"] >= 3
    assert rates["b"]["median_batch_s"] >= 0.002 and rates["a"]["slices_per_s"] > rates["b"]["slices_per_s"]


def test_model_figures_and_ratios_are_consistent(tiny):
    out = benchmark_model(tiny, torch.device("cpu"), batch=2, min_time=0.05)
    for key in ("forward_slices_per_s", "cam_slices_per_s", "naive_cam_slices_per_s"):
        assert out[key] > 0
    assert out["cam_vs_forward"] == pytest.approx(out["cam_slices_per_s"] / out["forward_slices_per_s"])
    assert out["cam_vs_naive"] == pytest.approx(out["cam_slices_per_s"] / out["naive_cam_slices_per_s"])
    assert all(p.grad is None for p in tiny.model.parameters())  # naive CAM leaves no gradients behind


def test_end_to_end_stages_add_up(tiny, tmp_path):
    ct, liver = make_abdomen()
    write_volume(ct, tmp_path / "ct.nii.gz")
    write_volume(liver, tmp_path / "liver.nii.gz")
    out = end_to_end(tiny, tmp_path / "ct.nii.gz", tmp_path / "o", "cpu", 4, liver_mask=tmp_path / "liver.nii.gz")
    stages = out["stages_s"]
    assert set(stages) == {"read", "liver_mask", "preprocess", "model_cam", "postprocess", "write"}
    assert sum(stages.values()) <= out["end_to_end_s"] + 0.01
    # stages_s are rounded to the millisecond: on a run this short that alone moves the ratio by
    # up to 0.0005 s / end_to_end_s
    rounding = 0.0005 / out["end_to_end_s"] + 1e-9
    assert out["non_network_fraction"] == pytest.approx(1 - stages["model_cam"] / out["end_to_end_s"], abs=rounding)
    assert out["liver_slices"] == 8 and (tmp_path / "o" / "report.json").is_file()


@pytest.mark.slow
def test_command_writes_the_documented_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    main(["--models", "tiny", "--device", "cpu", "--min-time", "0.05", "--matrix", "96", "--slices", "24", "--json", str(path)])
    data = json.loads(path.read_text())
    m = data["models"]["tiny"]
    for key in ("forward_slices_per_s", "cam_slices_per_s", "naive_cam_slices_per_s", "cam_vs_forward", "cam_vs_naive",
                "end_to_end_s", "non_network_fraction", "peak_rss_mb"):
        assert key in m, key
    assert data["device"] == "cpu" and "torch" in data["versions"]
    assert m["end_to_end_runs_s"] == [round(m["end_to_end_s"], 3)]  # one run on the CPU by default
    assert "fwd+CAM/s" in capsys.readouterr().out


def test_repeated_end_to_end_reports_the_first_study_apart(tmp_path, capsys):
    path = tmp_path / "bench.json"
    main(["--models", "tiny", "--device", "cpu", "--min-time", "0.02", "--no-naive", "--matrix", "96", "--slices", "24",
          "--e2e-runs", "2", "--json", str(path)])
    m = json.loads(path.read_text())["models"]["tiny"]
    assert len(m["end_to_end_runs_s"]) == 2
    assert m["end_to_end_runs_s"] == [round(m["end_to_end_first_s"], 3), round(m["end_to_end_s"], 3)]
    assert set(m["stages_first_s"]) == set(m["stages_s"])
    out = capsys.readouterr().out
    assert "first study in the process" in out and "next study" in out
