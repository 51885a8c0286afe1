"""`dadrn-lesion classify` end to end, as a user runs it: files in, files out, exact geometry."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from DADRNLesionLib.io import read_volume, write_volume
from DADRNLesionLib.outputs import RESULT_FILES
from DADRNLesionLib.preprocess import InputSpec
from DADRNLesionLib.results import SLICE_CSV_COLUMNS
from DADRNLesionLib.weights import ModelCard, random_model, save_checkpoint

from conftest import REPO, make_abdomen


def cli(*args, check=None):
    proc = subprocess.run([sys.executable, "-m", "DADRNLesionLib", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**__import__("os").environ, "PYTHONPATH": str(REPO / "DADRNLesion")}, timeout=600)
    if check is not None:
        assert proc.returncode == check, proc.stderr
    return proc


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import torch

    loaded = random_model({"backbone": "drn_d_22", "width": 0.25, "attention": "dual"}, InputSpec(size=64), seed=1)
    with torch.no_grad():
        loaded.model.fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 8.0, 0.0]))
    card = ModelCard("cli-test", loaded.model.config, InputSpec(size=64), intended_use="tests")
    return save_checkpoint(loaded.model, tmp_path_factory.mktemp("w") / "tiny.safetensors", card)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    ct, liver = make_abdomen()
    oblique = np.array([[0.98, -0.17, 0], [0.17, 0.98, 0], [0, 0, 1.0]])
    oblique /= np.linalg.norm(oblique, axis=0)
    ct.direction = oblique
    liver.direction = oblique
    write_volume(ct, folder / "ct.nrrd")
    write_volume(liver, folder / "liver.nii.gz")
    return folder


def test_classify_writes_every_file_on_the_input_geometry(study, weights, tmp_path):
    out = tmp_path / "out"
    cli("classify", study / "ct.nrrd", "--liver-mask", study / "liver.nii.gz", "--weights", weights, "--out", out, "--quiet", check=0)
    assert sorted(p.name for p in out.iterdir()) == sorted(RESULT_FILES)
    ct = read_volume(study / "ct.nrrd")
    for name in ("labelmap.nii.gz", "heatmap.nii.gz"):
        vol = read_volume(out / name)
        assert vol.shape == ct.shape
        assert np.allclose(vol.spacing, ct.spacing) and np.allclose(vol.origin, ct.origin, atol=1e-4)
        assert np.allclose(vol.direction, ct.direction, atol=1e-5)
    labels = read_volume(out / "labelmap.nii.gz").array
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 3, 4, 5}
    heat = read_volume(out / "heatmap.nii.gz").array
    assert heat.dtype == np.float32 and heat.min() >= 0 and heat.max() <= 1
    with open(out / "slices.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == SLICE_CSV_COLUMNS
    assert len(rows) == 8 and all(r["predicted_class"] == "hcc" and r["cam_peak_i"] != "" for r in rows)
    report = json.loads((out / "report.json").read_text())
    for key in ("input", "liver", "slice_counts", "summary", "timings_s", "device", "model", "versions"):
        assert key in report
    assert report["model"]["sha256"] and report["liver"]["volume_ml"] > 0
    with open(out / "labelmap.csv") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["value", "name", "R", "G", "B"] and [r[1] for r in table[2:]] == ["Liver", "Cyst", "FNH", "HCC", "Hemangioma"]


def test_seg_nrrd_is_readable_by_slicerio(study, weights, tmp_path):
    import slicerio

    out = tmp_path / "out"
    cli("classify", study / "ct.nrrd", "--liver-mask", study / "liver.nii.gz", "--weights", weights, "--out", out, "--quiet", check=0)
    seg = slicerio.read_segmentation(str(out / "lesions.seg.nrrd"))
    names = [s["name"] for s in seg["segments"]]
    assert names == ["Liver", "HCC"]
    labels = read_volume(out / "labelmap.nii.gz")
    assert np.allclose(np.asarray(seg["ijkToLPS"]), labels.ijk_to_lps_matrix(), atol=1e-4)
    hcc = slicerio.extract_segments(seg, [("HCC", 4)])
    assert np.array_equal(hcc["voxels"].transpose(2, 1, 0) == 4, labels.array == 4)
    liver = slicerio.extract_segments(seg, [("Liver", 1)])
    assert np.array_equal(liver["voxels"].transpose(2, 1, 0) == 1, labels.array > 0)
    hcc_meta = next(s for s in seg["segments"] if s["name"] == "HCC")
    assert "52988006" in str(hcc_meta["terminology"]) and "10200004" in str(hcc_meta["terminology"])


def test_existing_results_are_not_overwritten_without_the_flag(study, weights, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("radiologist notes")
    proc = cli("classify", study / "ct.nrrd", "--liver-mask", study / "liver.nii.gz", "--weights", weights, "--out", out, check=2)
    assert "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "mine.txt").read_text() == "radiologist notes"


def _file(folder: Path, name: str, content: bytes) -> Path:
    (folder / name).write_bytes(content)
    return folder / name


@pytest.mark.parametrize("make_input, message", [
    (lambda d: d / "missing.nii.gz", "does not exist"),
    (lambda d: _file(d, "empty.nii.gz", b""), "empty"),
    (lambda d: _file(d, "notes.nii.gz", b"not an image"), "cannot read"),
])
def test_bad_input_gives_one_line_and_no_traceback(tmp_path, weights, make_input, message):
    proc = cli("classify", make_input(tmp_path), "--weights", weights, "--out", tmp_path / "o", check=2)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("dadrn-lesion: error")]
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_jsonl_progress_for_programs(study, weights, tmp_path):
    proc = cli("classify", study / "ct.nrrd", "--liver-mask", study / "liver.nii.gz", "--weights", weights,
               "--out", tmp_path / "o", "--progress-format", "jsonl", "--batch-size", "3", check=0)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    progress = [e for e in events if e["event"] == "progress" and e["stage"] == "model"]
    assert progress[-1]["done"] == progress[-1]["total"] == 8
    assert events[-1]["event"] == "done"


def test_several_studies_get_their_own_folders_and_a_bad_one_is_skipped(study, weights, tmp_path):
    (tmp_path / "broken.nrrd").write_text("NRRD0004\nbroken")
    listing = tmp_path / "list.csv"
    listing.write_text(f"path,liver_mask,id\n{study / 'ct.nrrd'},{study / 'liver.nii.gz'},first\n{tmp_path / 'broken.nrrd'},,second\n")
    proc = cli("classify", listing, "--weights", weights, "--out", tmp_path / "batch", "--quiet", check=4)
    assert (tmp_path / "batch" / "first" / "report.json").is_file()
    assert not (tmp_path / "batch" / "second").exists()
    assert "second: skipped" in proc.stderr  # reported even with --quiet
    with open(tmp_path / "batch" / "studies.csv") as fh:
        rows = {r["study"]: r for r in csv.DictReader(fh)}
    assert rows["first"]["status"] == "ok" and rows["second"]["status"] == "failed"


def test_real_dicom_series_keeps_its_geometry(real_data, weights, tmp_path):
    dicom = real_data / "ts_contrast_dicom" / "dicom"
    labels = read_volume(real_data / "ts_contrast_dicom" / "totalsegmentator_fast_labels.nii.gz")
    mask = tmp_path / "liver.nii.gz"
    write_volume(labels.with_array((labels.array == 5).astype(np.uint8)), mask)  # label file stores j flipped
    out = tmp_path / "out"
    cli("classify", dicom, "--liver-mask", mask, "--weights", weights, "--out", out, "--quiet", check=0)
    ct = read_volume(dicom)
    result = read_volume(out / "labelmap.nii.gz")
    assert result.same_geometry(ct, tol=1e-6)
    liver = read_volume(out / "labelmap.nii.gz").array > 0
    ref = labels.array == 5
    assert np.array_equal(liver, ref[:, ::-1, :]) or np.array_equal(liver, ref)
