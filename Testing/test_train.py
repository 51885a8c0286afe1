"""Training: loss goes down, resume continues exactly, early stopping stops, DDP keeps ranks in sync,
training data grows between epochs.

Everything runs a tiny model (DRN-D-22 at width 1/8, 32x32 inputs) for a handful of steps.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from DADRNLesionLib import data as D
from DADRNLesionLib.model import ModelConfig
from DADRNLesionLib.preprocess import InputSpec
from DADRNLesionLib.train import AugmentConfig, TrainConfig, augment_batch, balanced_order, lr_at, train

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(backbone="drn_d_22", width=0.125, attention="dual", normalisation="softmax", fusion="concat")
SIZE = 32


def toy_cache(cases_per_class: int = 2, slices_per_case: int = 4, seed: int = 0) -> D.SliceCache:
    """Liver-like disks; lesion classes add a blob whose brightness and size depend on the class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    liver = ((yy - 16) ** 2 + (xx - 15) ** 2) < 13**2
    images, labels, case, cases, masks = [], [], [], [], {}
    for cls in range(5):
        for c in range(cases_per_class):
            ci = len(cases)
            cases.append({"case_id": f"c{cls}_{c}", "patient_id": f"c{cls}_{c}", "group": "toy", "split": "",
                          "case_class": ["normal", "cyst", "fnh", "hcc", "hem"][cls], "box": [0, SIZE, 0, SIZE],
                          "n_slices": slices_per_case, "n_excluded": 0, "spacing": [1.0, 1.0, 1.0]})
            for s in range(slices_per_case):
                img = np.where(liver, 0.5, 0.0) + rng.normal(0, 0.03, (SIZE, SIZE)) * liver
                lesion = np.zeros((SIZE, SIZE), bool)
                if cls:
                    cy, cx = rng.integers(10, 22, 2)
                    r = 2 + cls
                    lesion = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) & liver
                    img = np.where(lesion, [0.0, 0.1, 0.85, 0.7, 0.3][cls], img)
                img = np.clip(img, 0, 1)
                masks[len(labels)] = np.stack([liver, lesion, lesion]).astype(np.uint8)
                images.append(np.rint(np.stack([img] * 3) * 255).astype(np.uint8))
                labels.append(cls)
                case.append(ci)
    n = len(labels)
    return D.SliceCache(
        spec=InputSpec(size=SIZE), rule=D.SliceRule(), images=np.stack(images), labels=np.array(labels),
        case=np.array(case), slice_index=np.arange(n) % slices_per_case, input_slice_index=np.arange(n) % slices_per_case,
        cases=cases, masks={k: v for k, v in masks.items() if labels[k] > 0}, source={"toy": seed},
    )


def toy_split(cache: D.SliceCache) -> dict[str, str]:
    # Case 0 of every class trains, case 1 validates and tests (a toy: val and test may share).
    return {c["case_id"]: ("train" if c["case_id"].endswith("_0") else "val") for c in cache.cases}


def _renamed(cache: D.SliceCache, prefix: str) -> D.SliceCache:
    """The same toy cache under other case ids (another generator's set)."""
    for c in cache.cases:
        c["case_id"] = c["patient_id"] = prefix + c["case_id"]
    cache.source = {"toy": prefix}
    return cache


def quiet(_message: str) -> None:
    pass


def test_balanced_order_draws_every_class_equally():
    labels = np.array([0] * 50 + [1] * 5 + [3] * 2)
    order = balanced_order(np.arange(labels.size), labels, 30, np.random.default_rng(0))
    counts = np.bincount(labels[order], minlength=5)
    assert counts.tolist() == [10, 10, 0, 10, 0]
    assert set(order[labels[order] == 1].tolist()) == set(range(50, 55))  # each small class is used up before repeating


def test_learning_rate_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 100, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] < 0.01


def test_augmentation_keeps_outside_the_liver_black_and_is_reproducible():
    cache = toy_cache()
    x = torch.from_numpy(cache.images[:8]).float() / 255
    cfg = AugmentConfig(p_affine=0.0)  # no geometry: the liver outline must not move
    a = augment_batch(x, cfg, 400.0, torch.Generator().manual_seed(3))
    b = augment_batch(x, cfg, 400.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a > 0, x > 0)  # intensity changes stay inside; outside stays exactly zero
    assert not torch.allclose(a, x)
    g = augment_batch(x, AugmentConfig(p_affine=1.0), 400.0, torch.Generator().manual_seed(4))
    assert g.shape == x.shape and not torch.equal(g > 0, x > 0)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tmp_path):
    cache = toy_cache()
    split = toy_split(cache)
    n_train = len(cache.indices_of_cases([c for c, s in split.items() if s == "train"]))
    cfg = TrainConfig(epochs=8, batch_size=n_train, samples_per_epoch=n_train, balance="none", augment=None,
                      lr=3e-3, warmup_fraction=0.0, label_smoothing=0.0, patience=0)
    result = train(cache, split, TINY, cfg, tmp_path / "run", device="cpu", threads=1, evaluate_test=False, log=quiet, progress_bar=False)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 8 and result.steps == 8  # one step per epoch, always the same 20 slices
    assert losses[-1] < 0.7 * losses[0], losses
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") == 9
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000


def test_early_stopping_triggers_after_patience_epochs_without_improvement(tmp_path):
    cache = toy_cache()
    cfg = TrainConfig(epochs=10, batch_size=8, samples_per_epoch=8, patience=2, min_delta=10.0, augment=None)
    result = train(cache, toy_split(cache), TINY, cfg, tmp_path / "run", device="cpu", threads=1, evaluate_test=False, log=quiet, progress_bar=False)
    assert result.status == "early_stopped"
    assert result.epochs_run == 3 and result.best_epoch == 1  # epoch 1 is the best, 2 and 3 do not improve
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "early_stopped"


def test_validation_on_thinned_normal_slices_counts_every_slice_of_their_cases():
    from DADRNLesionLib.distributed import DistEnv
    from DADRNLesionLib.model import build_model
    from DADRNLesionLib.train import _validate, every_slice_weights

    full = toy_cache(slices_per_case=9)
    thinned = full.thin_normal_slices(2)
    val = [c for c, s in toy_split(full).items() if s == "val"]
    every, kept = full.indices_of_cases(val), thinned.indices_of_cases(val)
    weights = every_slice_weights(thinned, full, kept)
    normal = thinned.labels[kept] == 0
    assert normal.sum() == 2 and weights[normal].sum() == (full.labels[every] == 0).sum() == 9
    assert np.all(weights[~normal] == 1.0)
    torch.manual_seed(0)
    model = build_model(TINY)
    run = lambda cache, idx, w=None: _validate(model, cache, idx, torch.device("cpu"), None, 16, DistEnv(), w)  # noqa: E731
    weighted, on_every, unweighted = run(thinned, kept, weights), run(full, every), run(thinned, kept)
    support = lambda summary: np.asarray(summary["confusion_matrix"]).sum(axis=1).tolist()  # noqa: E731
    assert support(weighted) == support(on_every) == [9, 9, 9, 9, 9]
    assert support(unweighted) == [2, 9, 9, 9, 9]
    assert weighted["slices"] == unweighted["slices"] == kept.size
    # Weights only against the cache the slices were thinned from.
    other = toy_cache(cases_per_class=3, slices_per_case=9)
    assert np.all(every_slice_weights(thinned, other, kept) == 1.0)
    assert np.all(every_slice_weights(full, full, every) == 1.0)


def test_epochs_within_a_time_limit_follow_the_typical_recent_epoch():
    from DADRNLesionLib.train import _epochs_within

    history = [{"seconds": 40.0}, {"seconds": 10.0}, {"seconds": 12.0}, {"seconds": 11.0}]
    assert _epochs_within(history, 4, 30, 100.0) == 4 + 9  # 100 s / 11 s (the median), the slow first epoch left out
    # One epoch slowed by another job does not cut the run for good ...
    assert _epochs_within([{"seconds": 277.0}, {"seconds": 488.0}], 2, 16, 4035.0) == 16  # judged by the first, 277 s
    assert _epochs_within([{"seconds": 277.0}, {"seconds": 488.0}, {"seconds": 295.0}], 3, 16, 3740.0) == 15  # the faster of two, 295 s
    assert _epochs_within([{"seconds": 277.0}, {"seconds": 488.0}, {"seconds": 290.0}, {"seconds": 280.0}], 4, 16, 3300.0) == 15
    # ... but a pace that stays slow does, and a first epoch with one-off costs does not count against the second.
    assert _epochs_within([{"seconds": 277.0}, {"seconds": 488.0}, {"seconds": 480.0}, {"seconds": 290.0}], 4, 16, 3300.0) == 10
    assert _epochs_within([{"seconds": 20.0}, {"seconds": 6.0}], 2, 100, 60.0) == 12
    assert _epochs_within(history, 4, 5, 100.0) == 5  # never more than asked
    assert _epochs_within(history, 4, 30, -5.0) == 4  # past the limit: stop where it is
    assert _epochs_within([], 0, 30, 1.0) == 30  # nothing measured yet
    assert _epochs_within(history[:1], 1, 30, 100.0) == 30  # one epoch: no cut yet while another fits
    assert _epochs_within(history[:1], 1, 30, 30.0) == 1


def test_a_time_limit_cuts_the_epochs_and_still_tests_the_best(tmp_path):
    cache = toy_cache(cases_per_class=3)
    split = {c["case_id"]: ("train", "val", "test")[int(c["case_id"][-1])] for c in cache.cases}
    cfg = TrainConfig(epochs=6, batch_size=8, samples_per_epoch=8, patience=0, augment=None, time_limit_s=1e-6)
    result = train(cache, split, TINY, cfg, tmp_path / "cut", device="cpu", threads=1, log=quiet, progress_bar=False)
    assert result.status == "time_limit" and result.epochs_run == 1
    card = json.loads((tmp_path / "cut" / "best.json").read_text())
    assert "test" in card["metrics"] and card["training"]["epochs_run"] == 1
    # Resuming a run whose time is spent trains no further epoch.
    again = train(cache, split, TINY, cfg, tmp_path / "cut", device="cpu", threads=1, resume=True, evaluate_test=False,
                  log=quiet, progress_bar=False)
    assert again.status == "time_limit" and again.epochs_run == 1 and again.steps == result.steps
    roomy = TrainConfig(epochs=2, batch_size=8, samples_per_epoch=8, patience=0, augment=None, time_limit_s=3600.0)
    result = train(cache, split, TINY, roomy, tmp_path / "roomy", device="cpu", threads=1, evaluate_test=False,
                   log=quiet, progress_bar=False)
    assert result.status == "completed" and result.epochs_run == 2


def _cli(args: list[str]) -> int:
    from DADRNLesionLib.cli import main

    return main(args)


def test_cli_train_resumes_at_the_same_step_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    cache = toy_cache()
    cache.save(tmp_path / "cache")
    D.write_split(tmp_path / "split.csv", {**toy_split(cache), "c4_1": "test", "c3_1": "test"})
    common = ["train", "--cache", str(tmp_path / "cache"), "--split-file", str(tmp_path / "split.csv"), "--input-size", str(SIZE),
              "--model", "dadrn50-b", "--backbone", "drn_d_22", "--width", "0.125", "--epochs", "2", "--batch-size", "4",
              "--samples-per-epoch", "12", "--device", "cpu", "--threads", "1", "--quiet", "--seed", "5"]
    assert _cli(common + ["--out", str(tmp_path / "straight")]) == 0
    assert _cli(common + ["--out", str(tmp_path / "split_run"), "--max-steps", "4"]) == 0
    first = torch.load(tmp_path / "split_run" / "checkpoint.pt", weights_only=True)
    assert first["step"] == 4 and first["epoch"] == 1 and first["batch"] == 1  # stopped inside epoch 2
    assert _cli(common + ["--out", str(tmp_path / "split_run")]) == 2  # an existing run needs --resume or --overwrite
    assert _cli(common + ["--out", str(tmp_path / "split_run"), "--resume"]) == 0
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split_run" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # The best model loads through the product's loader, its card holds validation and test figures.
    from DADRNLesionLib.weights import load_checkpoint

    loaded = load_checkpoint(tmp_path / "split_run" / "best.safetensors")
    assert loaded.card.input.size == SIZE and loaded.card.config.width == 0.125
    assert "validation" in loaded.card.metrics and loaded.card.metrics["test"]["all"]["slices"] == 8
    assert (tmp_path / "split_run" / "test" / "confusion.png").is_file()
    assert loaded.card.training["split"]["train"]["cases"] == 5


def test_cli_fine_tunes_from_verified_weights_and_refuses_another_architecture(tmp_path):
    cache = toy_cache()
    cache.save(tmp_path / "cache")
    D.write_split(tmp_path / "split.csv", {**toy_split(cache), "c4_1": "test"})
    def common(width: str = "0.125") -> list[str]:
        return ["train", "--cache", str(tmp_path / "cache"), "--split-file", str(tmp_path / "split.csv"), "--input-size", str(SIZE),
                "--model", "dadrn50-b", "--backbone", "drn_d_22", "--width", width, "--epochs", "1", "--batch-size", "4",
                "--samples-per-epoch", "8", "--device", "cpu", "--threads", "1", "--quiet", "--no-test"]

    assert _cli(common() + ["--out", str(tmp_path / "base"), "--seed", "1"]) == 0
    base = tmp_path / "base" / "best.safetensors"
    from DADRNLesionLib.weights import load_checkpoint

    start = load_checkpoint(base).model.state_dict()
    # A vanishing learning rate: the fine-tuned model must stay at its starting point, not a fresh random one.
    assert _cli(common() + ["--out", str(tmp_path / "tuned"), "--seed", "2", "--lr", "1e-9", "--init-weights", str(base)]) == 0
    tuned = load_checkpoint(tmp_path / "tuned" / "best.safetensors")
    for k, v in tuned.model.state_dict().items():
        if v.is_floating_point() and "running" not in k:
            assert torch.allclose(v, start[k], atol=1e-6), k
    origin = tuned.card.training["initialised_from"]
    assert origin["sha256"] == load_checkpoint(base).card.sha256 and origin["steps"] == 2
    # The parent's data travel with it, so the tuned card still tells the whole training.
    assert origin["data"] == load_checkpoint(base).card.training["data"]
    assert sum(origin["split_cases"].values()) > 0
    # Without --init-weights the same seed-2 run starts elsewhere (the check above is not vacuous).
    assert _cli(common() + ["--out", str(tmp_path / "fresh"), "--seed", "2", "--lr", "1e-9"]) == 0
    fresh = load_checkpoint(tmp_path / "fresh" / "best.safetensors").model.state_dict()
    assert not torch.allclose(fresh["fc.weight"], start["fc.weight"], atol=1e-3)
    # Another width, or a damaged file: a clear refusal before any training.
    assert _cli(common("0.25") + ["--out", str(tmp_path / "other"), "--init-weights", str(base)]) == 2
    assert not (tmp_path / "other" / "checkpoint.pt").exists()
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(base.read_bytes()[:-8] + b"\0" * 8)
    (tmp_path / "damaged.json").write_text((tmp_path / "base" / "best.json").read_text())
    assert _cli(common() + ["--out", str(tmp_path / "bad"), "--init-weights", str(damaged)]) == 2


@pytest.mark.slow
def test_torchrun_two_processes_gloo_train_in_sync(tmp_path):
    cache = toy_cache()
    cache.save(tmp_path / "cache")
    D.write_split(tmp_path / "split.csv", toy_split(cache))
    _renamed(toy_cache(seed=1), "g1_").save(tmp_path / "incoming" / "set1")  # both ranks take it in
    env = {**os.environ, "PYTHONPATH": str(REPO / "DADRNLesion") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "DADRNLesionLib",
           "train", "--cache", str(tmp_path / "cache"), "--split-file", str(tmp_path / "split.csv"), "--input-size", str(SIZE),
           "--backbone", "drn_d_22", "--width", "0.125", "--epochs", "1", "--batch-size", "4", "--samples-per-epoch", "24",
           "--normal-per-case", "2", "--device", "cpu", "--threads", "1", "--no-test", "--quiet", "--out", str(tmp_path / "ddp"),
           "--grow-from", str(tmp_path / "incoming"), "--localisation-loss", "0.5"]  # a loss on the map, not only the logits
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    dist = summary["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo"
    assert sorted(r["rank"] for r in dist["ranks"]) == [0, 1]
    assert all(r["steps"] == 3 for r in dist["ranks"])  # 24 slices / (2 processes x 4)
    assert dist["in_sync"] and len({r["params"] for r in dist["ranks"]}) == 1
    assert summary["grown"]["caches"] == 1 and summary["grown"]["cases"] == 10
    assert (tmp_path / "ddp" / "best.safetensors").is_file()
    # Validation sharded over the ranks and weighted to every slice sums to what one process computes:
    # 18 slices kept (2 of the normal case's 4), counted as the 20 they stand for.
    assert summary["validation"]["slices"] == 18 and summary["validation"]["n"] == 20
    epoch = list(csv.DictReader(open(tmp_path / "ddp" / "metrics.csv")))[-1]
    assert float(epoch["val_acc"]) == pytest.approx(summary["validation"]["accuracy"], abs=1e-6)
    assert float(epoch["train_localisation_loss"]) > 0


# --------------------------------------------------------------------------------------------
# training data that grows while the run trains


def test_training_pool_gathers_the_slices_of_every_part_in_the_order_asked():
    from DADRNLesionLib.growing import TrainingPool

    a, b = toy_cache(seed=0), toy_cache(seed=1)
    start = np.array([3, 7, 11, 20])
    pool = TrainingPool(a, start)
    pool.add(b)
    assert len(pool) == 4 + len(b) and pool.parts == 2
    idx = np.array([5, 0, len(pool) - 1, 2, 4])  # grown slices and starting ones, mixed
    want = np.concatenate([a.images[start], b.images])[idx]
    assert np.array_equal(pool.read_images(idx), want)
    assert np.array_equal(pool.labels[idx], np.concatenate([a.labels[start], b.labels])[idx])


def test_caches_that_appear_during_training_join_the_training_split_and_nothing_else(tmp_path):
    from DADRNLesionLib.growing import GrowSource

    cache = toy_cache()
    split = toy_split(cache)
    grow_dir = tmp_path / "incoming"
    _renamed(toy_cache(seed=1), "g1_").save(grow_dir / "set1")
    (grow_dir / "half_written").mkdir()  # a generator still writing: no cache.json yet
    np.save(grow_dir / "half_written" / "images.npy", np.zeros((1, 3, SIZE, SIZE), np.uint8))
    _renamed(toy_cache(seed=2), "").save(grow_dir / "repeats")  # the starting cache's ids again
    other = toy_cache(seed=3)
    other.spec = InputSpec(size=SIZE, window_width=300.0)
    _renamed(other, "w_").save(grow_dir / "other_window")
    messages: list[str] = []

    def log(message: str) -> None:
        messages.append(message)
        if message.startswith("epoch 1/"):  # a set finishes while the run trains
            _renamed(toy_cache(seed=4), "g2_").save(grow_dir / "set2")

    cfg = TrainConfig(epochs=2, batch_size=4, samples_per_epoch=8, augment=None, seed=3)
    result = train(cache, split, TINY, cfg, tmp_path / "run", device="cpu", threads=1, log=log, progress_bar=False,
                   evaluate_test=False, grow=GrowSource(grow_dir))
    assert result.status == "completed"
    text = "\n".join(messages)
    assert "epoch 1: 1 new caches (10 cases)" in text and "epoch 2: 1 new caches (10 cases)" in text
    assert "repeats left out: its cases c0_0, c0_1, c1_0 and 7 more are already in the run" in text
    assert "other_window left out: its input spec" in text
    assert "half_written" not in text  # not finished: neither taken nor refused, tried again next epoch
    written = D.read_split(tmp_path / "run" / "split.csv")
    assert sum(s == "train" for s in written.values()) == 5 + 20
    assert all(written[f"g{k}_c{c}_{i}"] == "train" for k in (1, 2) for c in range(5) for i in (0, 1))
    assert {k: v for k, v in written.items() if v != "train"} == {k: v for k, v in split.items() if v != "train"}
    from DADRNLesionLib.weights import load_checkpoint

    card = load_checkpoint(tmp_path / "run" / "best.safetensors").card
    # The card names the data its weights trained on: set2 only if the best epoch came after it joined.
    sets = [{"toy": 0}, {"toy": "g1_"}, {"toy": "g2_"}][: card.training["best_epoch"] + 1]
    assert card.training["data"] == {"merged": sets} and card.training["grown"]["caches"] == len(sets) - 1
    assert result.summary["grown"]["caches"] == 2 and result.summary["grown"]["cases"] == 20
    assert result.summary["validation"]["slices"] == 20  # the starting cache's validation cases only
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["grown"] == ["set1", "set2"] and sorted(state["grow_refused"]) == ["other_window", "repeats"]


def test_a_grown_run_resumes_on_the_same_caches_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    cache = toy_cache()
    cache.save(tmp_path / "cache")
    D.write_split(tmp_path / "split.csv", toy_split(cache))
    grow_dir = tmp_path / "incoming"
    _renamed(toy_cache(seed=1), "g1_").save(grow_dir / "set1")
    common = ["train", "--cache", str(tmp_path / "cache"), "--split-file", str(tmp_path / "split.csv"), "--input-size", str(SIZE),
              "--model", "dadrn50-b", "--backbone", "drn_d_22", "--width", "0.125", "--epochs", "2", "--batch-size", "4",
              "--samples-per-epoch", "12", "--device", "cpu", "--threads", "1", "--quiet", "--seed", "5", "--no-test",
              "--normal-per-case", "2"]
    grow = ["--grow-from", str(grow_dir)]
    assert _cli(common + grow + ["--out", str(tmp_path / "straight")]) == 0
    assert _cli(common + grow + ["--out", str(tmp_path / "split_run"), "--max-steps", "4"]) == 0
    assert _cli(common + ["--out", str(tmp_path / "split_run"), "--resume"]) == 2  # its data grew: the folder is needed
    assert _cli(common + ["--out", str(tmp_path / "split_run"), "--resume", "--grow-from", str(tmp_path / "split.csv")]) == 2
    _renamed(toy_cache(seed=2), "g2_").save(grow_dir / "set2")  # arrives after the interruption, before epoch 3
    assert _cli(common + grow + ["--out", str(tmp_path / "split_run"), "--resume"]) == 0
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split_run" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6 and a["grown"] == b["grown"] == ["set1"]  # mid-epoch: set2 waits for an epoch start
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # Normal slices of grown cases are thinned as the starting cache's: 2 per normal case.
    card = json.loads((tmp_path / "straight" / "best.json").read_text())
    assert card["training"]["grown"]["slices_by_class"]["normal"] == 2 * 2
