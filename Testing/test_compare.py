"""The comparison harness: runs every method on every split, reuses finished runs, and tabulates honestly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from DADRNLesionLib.classes import CLASS_NAMES, LESION_CLASSES
from DADRNLesionLib.cli import main
from DADRNLesionLib.compare import (
    METHODS, PAPER, CompareConfig, aggregate, format_tables, load_results, run_comparison, write_tables,
)
from DADRNLesionLib.data import SliceCache, SliceRule, split_cases
from DADRNLesionLib.errors import UserInputError
from DADRNLesionLib.preprocess import InputSpec
from DADRNLesionLib.train import TrainConfig

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic_cache(per_class: int = 5, slices: int = 4, seed: int = 0) -> SliceCache:
    """A slice cache made in memory: a liver disc per slice, a class-coded blob on lesion slices.

    Not a phantom (those take seconds per case): just enough structure for the harness to run
    every method, the ROI boxes and the pointing game."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    liver = ((yy - 16) ** 2 + (xx - 15) ** 2) < 13 ** 2
    images, labels, case, slice_index, cases, masks = [], [], [], [], [], {}
    for ci in range(5 * per_class):
        cls = ci % 5
        for k in range(slices):
            lab = cls if (cls and k) else 0
            img = np.where(liver, 120 + rng.normal(0, 10, (SIZE, SIZE)), 0.0)
            if lab:
                cy, cx = rng.integers(9, 23, 2)
                blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < (2 + lab) ** 2
                img[blob & liver] = 40 * lab
                core = blob & liver
                dil = ((yy - cy) ** 2 + (xx - cx) ** 2) < (4 + lab) ** 2
                masks[len(labels)] = np.stack([liver, core, dil & liver]).astype(np.uint8)
            images.append(np.repeat(np.clip(img, 1, 255)[None] * liver, 3, axis=0).astype(np.uint8))
            labels.append(lab)
            case.append(ci)
            slice_index.append(k)
        cases.append({"case_id": f"c{ci:02d}", "patient_id": f"c{ci:02d}", "group": "", "split": "",
                      "case_class": CLASS_NAMES[cls], "box": [0, SIZE, 0, SIZE], "n_slices": slices, "n_excluded": 0,
                      "spacing": [1.0, 1.0, 2.0]})
    fields = dict(spec=InputSpec(size=SIZE), rule=SliceRule(), images=np.stack(images), labels=np.array(labels, dtype=np.int64),
                  case=np.array(case, dtype=np.int64), slice_index=np.array(slice_index, dtype=np.int64), cases=cases,
                  masks=masks, source={"synthetic": seed})
    if "input_slice_index" in SliceCache.__dataclass_fields__:
        fields["input_slice_index"] = fields["slice_index"].copy()
    return SliceCache(**fields)


@pytest.fixture(scope="module")
def cache():
    return synthetic_cache()


def tiny_budget(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 1, "batch_size": 8, "samples_per_epoch": 16, "patience": 0, "eval_batch_size": 32, **kw})


@pytest.mark.slow  # a few seconds of training; the first AdamW and matplotlib imports cost more on a busy machine
def test_every_method_kind_runs_on_both_splits_and_finished_runs_are_reused(cache, tmp_path):
    cfg = CompareConfig(methods=("drn50", "roi"), split_seeds=(0, 1), width=0.25, train=tiny_budget(), threads=1)
    messages: list[str] = []
    results = run_comparison(cache, cfg, tmp_path, log=messages.append)
    assert [(r["method"], r["split_seed"]) for r in results] == [(m, s) for s in (0, 1) for m in ("drn50", "roi")]
    for r in results:
        split = split_cases(cache.cases, r["split_seed"])
        test_idx = cache.indices_of_cases([c for c, s in split.items() if s == "test"])
        c = r["test"]["classification"]
        cm = np.array(c["confusion_matrix"])
        if r["kind"] == "roi":
            # Lesion slices only, four classes: no normal row, and "normal" is never an answer.
            assert c["n"] == int((cache.labels[test_idx] > 0).sum())
            assert cm[0].sum() == 0 and cm[:, 0].sum() == 0
            assert c["per_class"]["normal"]["accuracy"] is None
            assert "localization" not in r["test"]
        else:
            assert c["n"] == test_idx.size and cm.sum() == test_idx.size
            assert set(r["test"]["localization"]) >= set(LESION_CLASSES)
            assert (tmp_path / r["method"] / f"split{r['split_seed']}" / "best.safetensors").is_file()
        assert r["steps"] == 2 and r["model"]["width"] == 0.25
    assert (tmp_path / "split0.csv").is_file() and (tmp_path / "split1.csv").is_file()

    again: list[str] = []
    results2 = run_comparison(cache, cfg, tmp_path, log=again.append)
    assert sum("reusing" in m for m in again) == 4 and not any("training" in m for m in again)
    assert results2 == results
    # A changed budget is a different run: it is not mistaken for the finished one.
    cfg3 = CompareConfig(methods=("roi",), split_seeds=(0,), width=0.25, train=tiny_budget(lr=1e-3), threads=1)
    third: list[str] = []
    run_comparison(cache, cfg3, tmp_path, log=third.append)
    assert any("training" in m for m in third)


def _fake(method: str, seed: int, acc: float, kind: str = "slice") -> dict:
    cm = np.zeros((5, 5), dtype=int)
    cm[0, 0] = 0 if kind == "roi" else 10
    for c in range(1, 5):
        cm[c, c] = int(round(10 * acc))
        cm[c, 0 if kind == "slice" else (c % 4) + 1] = 10 - int(round(10 * acc))
    from DADRNLesionLib.metrics import classification_summary, localization_summary

    test = {"n_cases": 4, "classification": classification_summary(cm)}
    if kind == "slice":
        labels = np.repeat(np.arange(1, 5), 4)
        hits = np.tile([True, True, False, seed == 1], 4)
        test["localization"] = localization_summary(labels, hits, np.full(labels.size, 0.5))
        test["localization_true_class"] = localization_summary(labels, np.ones(labels.size, bool))
    return {"method": method, "label": METHODS[method].label, "kind": kind, "split_seed": seed, "parameters": 1000,
            "model": {"backbone": "x", "width": 0.25, "attention": "none", "patch_size": 64}, "input": {"size": 96},
            "train": TrainConfig(epochs=2).to_dict(), "seconds": 60.0, "steps": 10, "best_epoch": 1, "test": test}


def test_aggregate_gives_mean_and_half_range_over_splits():
    results = [_fake("drn50", 0, 0.6), _fake("drn50", 1, 0.8), _fake("roi", 0, 0.5, "roi"), _fake("roi", 1, 0.7, "roi")]
    table = aggregate(results)
    assert list(table) == ["drn50", "roi"]
    cyst = table["drn50"]["stats"]["acc_cyst"]
    assert cyst["values"] == [0.6, 0.8] and cyst["mean"] == pytest.approx(0.7) and cyst["spread"] == pytest.approx(0.1)
    # Lesion-slice accuracy: lesion rows only (normal row left out), so it equals the lesion recall here.
    assert table["drn50"]["stats"]["lesion_accuracy"]["mean"] == pytest.approx(0.7)
    assert table["drn50"]["stats"]["accuracy"]["values"] == pytest.approx([(10 + 24) / 50, (10 + 32) / 50])
    assert table["drn50"]["stats"]["loc_cyst"]["values"] == [0.5, 0.75]
    assert table["roi"]["stats"]["acc_normal"] is None and table["roi"]["stats"]["loc_cyst"] is None
    assert table["roi"]["stats"]["lesion_accuracy"]["mean"] == pytest.approx(0.6)

    text = format_tables(table, command="dadrn-lesion compare --out X")
    assert "0.700 ± 0.100" in text and "dadrn-lesion compare --out X" in text
    assert "ROI global-local (4 classes)" in text
    for paper_value in ("0.8690", "0.9615", "0.0742"):  # one figure of each of the paper's tables
        assert paper_value in text
    table3 = text.split("### Table 3")[1].split("### Runs")[0]
    assert "ROI global-local |" not in table3  # the ROI model is given the lesion: no localization row


def test_paper_figures_are_the_slides():
    assert PAPER["class_accuracy"]["DADRN50-B"]["hem"] == 0.6819
    assert "normal" not in PAPER["class_accuracy"]["ResGLNet"]
    assert PAPER["overall"]["SEResnet50"]["macro_precision"] == 0.8552
    assert set(PAPER["localization"]) == {"DRN50", "SEResnet50", "RAResnet50", "DADRN50-B"}
    assert {m.paper_label for m in METHODS.values()} >= set(PAPER["class_accuracy"])


def test_unknown_method_is_a_user_error():
    with pytest.raises(UserInputError, match="unknown method"):
        CompareConfig(methods=("drn50", "vgg16"))


@pytest.mark.slow
def test_command_line_runs_writes_tables_and_rereads_them(cache, tmp_path, capsys):
    cache.save(tmp_path / "cache")
    out = tmp_path / "cmp"
    args = ["compare", "--cache", str(tmp_path / "cache"), "--input-size", str(SIZE), "--out", str(out),
            "--methods", "raresnet50", "roi", "--split-seeds", "3", "--width", "0.25", "--epochs", "1",
            "--samples-per-epoch", "8", "--batch-size", "8", "--threads", "1", "--quiet"]
    assert main(args) == 0
    assert {(r["method"], r["split_seed"]) for r in load_results(out)} == {("raresnet50", 3), ("roi", 3)}
    tables = (out / "tables.md").read_text()
    assert "RAResnet50" in tables and "ROI global-local" in tables
    data = json.loads((out / "tables.json").read_text())
    assert data["methods"]["raresnet50"]["model"]["backbone"] == "ra_resnet50"
    assert (out / "results.csv").read_text().count("\n") > 20
    (out / "tables.md").unlink()
    assert main(["compare", "--out", str(out), "--tables-only", "--quiet"]) == 0
    assert (out / "tables.md").read_text() == tables  # the same tables, from the saved results alone
    assert main(["compare", "--out", str(tmp_path / "empty"), "--tables-only", "--quiet"]) == 2
    assert main(["compare", "--cache", str(tmp_path / "cache"), "--out", str(out), "--methods", "alexnet", "--quiet"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_write_tables_files(tmp_path):
    results = [_fake("dadrn50-b", 0, 0.9), _fake("dadrn50-b", 1, 0.7)]
    write_tables(results, tmp_path)
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0] == "method,label,split_seed,figure,value"
    assert any(r.startswith("dadrn50-b,DADRN50-B,1,acc_cyst,0.7") for r in rows)
