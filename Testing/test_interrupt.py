"""Nothing is lost: a `classify` run killed or cancelled at any point leaves either no results folder
or a complete one, never touches old results unless it finishes, and leaves nothing that breaks the
next run.

The runs are real processes: a study with many liver slices and batch size 1 keeps the model stage
busy for seconds, and the test signals the process when its JSON-lines progress says where it is.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from DADRNLesionLib.io import read_volume, write_volume
from DADRNLesionLib.outputs import RESULT_FILES, clean_stale, write_results
from DADRNLesionLib.pipeline import PipelineOptions, run_pipeline
from DADRNLesionLib.weights import load_checkpoint

from conftest import REPO, make_abdomen
from test_bad_input import save_tiny_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def long_study(tmp_path_factory) -> Path:
    """160 slices, 156 of them liver: at batch size 1 the model stage lasts several seconds."""
    folder = tmp_path_factory.mktemp("long study")
    ct, liver = make_abdomen(shape=(160, 96, 96))
    write_volume(ct, folder / "ct.nrrd")
    write_volume(liver, folder / "liver.nii.gz")
    return folder


def start(study: Path, weights: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "DADRNLesion")}
    args = [sys.executable, "-m", "DADRNLesionLib", "classify", str(study / "ct.nrrd"), "--liver-mask", str(study / "liver.nii.gz"),
            "--weights", str(weights), "--out", str(out), "--device", "cpu", "--threads", "1", "--batch-size", "1",
            "--progress-format", "jsonl", *extra]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, predicate, timeout: float = 240.0) -> list[dict]:
    """Read JSON-lines events until `predicate(event)` holds; returns the events read."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        events.append(json.loads(line))
        if predicate(events[-1]):
            return events
    proc.kill()
    proc.wait()
    pytest.fail(f"the run never reached the awaited point; events: {events[-3:]}; stderr: {proc.stderr.read()[-2000:]}")


def in_model_stage(event: dict) -> bool:
    return event.get("event") == "progress" and event.get("stage") == "model" and 2 <= event["done"] < event["total"]


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def leftovers(parent: Path, out: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}."))


def assert_complete(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(RESULT_FILES)
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["outputs"]) == sorted(RESULT_FILES)


def fake_old_results(out: Path) -> dict[str, bytes]:
    out.mkdir()
    (out / "report.json").write_text('{"summary": "the radiologist\'s previous results"}\n')
    (out / "notes.txt").write_text("kept")
    return {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.mark.slow
def test_sigkill_in_the_model_stage_leaves_no_results_and_the_next_run_works(long_study, weights, tmp_path):
    out = tmp_path / "out"
    proc = start(long_study, weights, out)
    wait_for(proc, in_model_stage)
    proc.send_signal(signal.SIGKILL)
    code, _, _ = finish(proc)
    assert code == -signal.SIGKILL
    assert not out.exists() and not list(tmp_path.rglob("report.json"))
    assert all(name.startswith(".") for name in leftovers(tmp_path, out))
    again = start(long_study, weights, out, "--batch-size", "64")
    code, _, err = finish(again)
    assert code == 0, err
    assert_complete(out)
    assert leftovers(tmp_path, out) == []


def test_sigkill_with_overwrite_keeps_the_old_results(long_study, weights, tmp_path):
    out = tmp_path / "out"
    before = fake_old_results(out)
    proc = start(long_study, weights, out, "--overwrite")
    wait_for(proc, in_model_stage)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_sigint_cancels_with_exit_130_and_no_partial_output(long_study, weights, tmp_path, overwrite):
    out = tmp_path / "out"
    before = fake_old_results(out) if overwrite else None
    proc = start(long_study, weights, out, *(["--overwrite"] if overwrite else []))
    wait_for(proc, in_model_stage)
    proc.send_signal(signal.SIGINT)
    code, stdout, err = finish(proc)
    assert code == 130, err
    assert "cancelled" in err and "Traceback" not in err
    assert json.loads(stdout.splitlines()[-1]) == {"event": "error", "kind": "cancelled", "message": "cancelled"}
    assert leftovers(tmp_path, out) == []
    if overwrite:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not out.exists()


@pytest.mark.slow
def test_sigkill_while_writing_never_leaves_a_folder_that_looks_complete(long_study, weights, tmp_path):
    out = tmp_path / "out"
    proc = start(long_study, weights, out, "--batch-size", "64")
    wait_for(proc, lambda e: e.get("event") == "stage" and e.get("stage") == "write")
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    if out.exists():  # the kill came after the rename: then the folder is whole
        assert_complete(out)
    assert all(name.startswith(".") for name in leftovers(tmp_path, out))
    again = start(long_study, weights, out, "--batch-size", "64", "--overwrite")
    code, _, err = finish(again)
    assert code == 0, err
    assert_complete(out)
    assert leftovers(tmp_path, out) == []


# -- what killed runs leave behind, handled in-process (deterministic) ----------------------------
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def small_result(weights):
    ct, liver = make_abdomen()
    return ct, run_pipeline(ct, liver_mask=liver, model=load_checkpoint(weights), options=PipelineOptions(device="cpu"))


def test_stale_staging_folders_of_dead_runs_are_removed(tmp_path, small_result):
    ct, result = small_result
    out = tmp_path / "out"
    stale = tmp_path / f".out.partial-{dead_pid()}-abc123"
    stale.mkdir()
    (stale / "labelmap.nii.gz").write_bytes(b"half a file")
    live = tmp_path / f".out.partial-{os.getpid()}-running"  # a run still going: not ours to delete
    live.mkdir()
    write_results(result, out, ct=ct)
    assert_complete(out)
    assert leftovers(tmp_path, out) == [live.name]


def test_results_moved_aside_by_a_run_killed_mid_swap_are_restored(tmp_path, small_result):
    ct, result = small_result
    out = tmp_path / "out"
    aside = tmp_path / f".out.old-{dead_pid()}"
    aside.mkdir()
    (aside / "report.json").write_text("old")
    assert clean_stale(out) == [aside]
    assert (out / "report.json").read_text() == "old" and leftovers(tmp_path, out) == []
    write_results(result, out, ct=ct, overwrite=True)
    assert_complete(out)
    assert leftovers(tmp_path, out) == []


def test_an_existing_folder_is_not_touched_without_overwrite(tmp_path, small_result):
    from DADRNLesionLib.errors import OutputExistsError

    ct, result = small_result
    out = tmp_path / "out"
    before = fake_old_results(out)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_results(result, out, ct=ct)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path, out) == []


def test_a_failure_while_writing_keeps_old_results_and_leaves_no_staging(tmp_path, small_result, monkeypatch):
    from DADRNLesionLib import outputs

    ct, result = small_result
    out = tmp_path / "out"
    before = fake_old_results(out)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the overview is drawn

    monkeypatch.setattr(outputs, "_slices_csv", crash)
    with pytest.raises(KeyboardInterrupt):
        write_results(result, out, ct=ct, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path, out) == []


def test_written_results_keep_the_input_geometry(tmp_path, small_result):
    ct, result = small_result
    write_results(result, tmp_path / "out", ct=ct)
    for name in ("labelmap.nii.gz", "heatmap.nii.gz"):
        assert read_volume(tmp_path / "out" / name).same_geometry(ct, tol=1e-6)
    assert np.array_equal(read_volume(tmp_path / "out" / "labelmap.nii.gz").array, result.labelmap.array)
