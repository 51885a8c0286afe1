"""Precision: bfloat16 on the CPU only when asked and only where the CPU computes in it; where it
runs, the pipeline decides as float32 does and repeats exactly, and training learns and saves plain weights."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from DADRNLesionLib import precision
from DADRNLesionLib.errors import UserInputError
from DADRNLesionLib.precision import autocast_dtype, cpu_has_native_bf16, uses_channels_last

needs_bf16_cpu = pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no bfloat16 instructions (AVX512-BF16 or AMX)")
CPU = torch.device("cpu")


def test_bfloat16_on_the_cpu_only_when_asked_and_refused_without_the_instructions(monkeypatch):
    assert autocast_dtype(CPU, None) is None and autocast_dtype(CPU, False) is None
    assert not uses_channels_last(CPU, None)  # the float32 CPU path keeps its layout, so its results stay as they were
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(UserInputError, match="no bfloat16 instructions.*Leave --cpu-bf16 out"):
        autocast_dtype(CPU, True)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype(CPU, True) is torch.bfloat16 and uses_channels_last(CPU, torch.bfloat16)


def test_contradicting_precision_options_are_refused_with_a_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "DADRNLesionLib", "classify", str(tmp_path / "ct.nii.gz"), "--out", str(tmp_path / "out"),
                           "--no-amp", "--cpu-bf16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "--no-amp and --cpu-bf16 contradict each other" in proc.stderr
    assert not (tmp_path / "out").exists()


@needs_bf16_cpu
@pytest.mark.slow
def test_the_pipeline_in_bfloat16_on_the_cpu_decides_as_float32_does_on_a_fresh_phantom():
    from DADRNLesionLib.phantom import generate_case
    from DADRNLesionLib.pipeline import PipelineOptions, run_pipeline
    from DADRNLesionLib.weights import DEMO_WEIGHTS, load_checkpoint

    demo = load_checkpoint(DEMO_WEIGHTS)
    case = generate_case(910_002, "fnh", hard=False)
    runs = {amp: run_pipeline(case.ct, liver_mask=case.liver, model=demo, options=PipelineOptions(device="cpu", amp=amp))
            for amp in (None, True)}
    assert runs[None].report["device"]["amp"] is None and runs[True].report["device"]["amp"] == "bfloat16"
    full, half = (np.array([s.probabilities for s in runs[a].slices]) for a in (None, True))
    assert full.shape == half.shape and len(full) >= 20
    same = np.mean(full.argmax(1) == half.argmax(1))
    assert same >= 0.9, f"bfloat16 decides {same:.2f} of {len(full)} slices as float32 does"
    assert np.abs(full - half).max() < 0.25, np.abs(full - half).max()
    assert np.median(np.abs(full - half).max(1)) < 0.05


@needs_bf16_cpu
def test_training_in_bfloat16_on_the_cpu_lowers_the_loss_and_saves_plain_weights(tmp_path):
    from test_train import TINY, quiet, toy_cache, toy_split

    from DADRNLesionLib.train import TrainConfig, train
    from DADRNLesionLib.weights import load_checkpoint

    cache = toy_cache()
    split = toy_split(cache)
    n_train = len(cache.indices_of_cases([c for c, s in split.items() if s == "train"]))
    cfg = TrainConfig(epochs=8, batch_size=n_train, samples_per_epoch=n_train, balance="none", augment=None,
                      lr=3e-3, warmup_fraction=0.0, label_smoothing=0.0, patience=0, amp=True)
    result = train(cache, split, TINY, cfg, tmp_path / "run", device="cpu", threads=1, evaluate_test=False, log=quiet, progress_bar=False)
    losses = [h["train_loss"] for h in result.history]
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
    card = json.loads((tmp_path / "run" / "best.json").read_text())
    assert card["training"]["amp"] == "bfloat16"
    loaded = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


@needs_bf16_cpu
def test_bfloat16_runs_on_the_cpu_repeat_exactly(tmp_path):
    from conftest import make_abdomen
    from test_bad_input import save_tiny_weights

    from DADRNLesionLib.pipeline import PipelineOptions, run_pipeline
    from DADRNLesionLib.weights import load_checkpoint

    ct, liver = make_abdomen(shape=(16, 96, 96), seed=3)
    model = load_checkpoint(save_tiny_weights(tmp_path, seed=7, hcc_bias=1.0))
    runs = [run_pipeline(ct, liver_mask=liver, model=model, options=PipelineOptions(device="cpu", amp=True, threads=2)) for _ in range(2)]
    a, b = (np.stack([s.probabilities for s in r.slices]) for r in runs)
    assert np.ptp(a) > 0.01 and np.array_equal(a, b)
    assert np.array_equal(runs[0].heatmap.array, runs[1].heatmap.array)
