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
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

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
    # Binary, unbuffered stdout: events are read straight from the pipe (see `_read_events`), so a
    # line can never sit in a reader's buffer while select() says there is nothing to read.
    # SIGINT as at a terminal: a test session started as a background job (`pytest &` in a script)
    # runs with SIGINT ignored, and its children would inherit that and never see the signal.
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _read_events(proc: subprocess.Popen, events: list[dict], timeout: float) -> bool:
    """Append the complete JSON lines the run has written so far (waiting up to `timeout` for the
    first); False at end of output."""
    pending = getattr(proc, "_pending", b"")
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        return True
    chunk = os.read(proc.stdout.fileno(), 65536)
    if not chunk:
        return False
    *lines, proc._pending = (pending + chunk).split(b"\n")
    events.extend(json.loads(line) for line in lines if line.strip())
    return True


def wait_for(proc: subprocess.Popen, predicate, timeout: float = 240.0) -> list[dict]:
    """Read JSON-lines events until one satisfies `predicate`; returns every event read so far."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = len(events)
        open_ = _read_events(proc, events, 1.0)
        if any(predicate(e) for e in events[seen:]):
            return events
        if not open_ or (len(events) == seen and proc.poll() is not None):
            break
    proc.kill()
    proc.wait()
    pytest.fail(f"the run never reached the awaited point; events: {events[-3:]}; stderr: {proc.stderr.read()[-2000:].decode(errors='replace')}")


def signal_before_writing(proc: subprocess.Popen, sig: int, events: list[dict]) -> bool:
    """Freeze the run, catch up with every event it has written, and send `sig` only if it has not
    begun to write results; True when sent. A run that got further while the test was reading its
    events has not been interrupted, so it cannot be judged: the caller runs it again."""
    proc.send_signal(signal.SIGSTOP)
    while _read_events(proc, events, 0.2) and select.select([proc.stdout], [], [], 0)[0]:
        pass
    early = proc.poll() is None and not any(e.get("stage") == "write" or e.get("event") in ("study_done", "done") for e in events)
    if early:
        proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    return early


def in_model_stage(event: dict) -> bool:
    return event.get("event") == "progress" and event.get("stage") == "model" and 2 <= event["done"] < event["total"]


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


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


def interrupt_in_model_stage(study: Path, weights: Path, out: Path, sig: int, *extra: str, old_results: bool = False,
                             attempts: int = 3) -> tuple[subprocess.Popen, Optional[dict[str, bytes]]]:
    """A run signalled in its model stage, before it writes anything, and the old results folder
    it started from (with `old_results`). A run that outpaced the test and finished is discarded and
    started again from the same state."""
    for _ in range(attempts):
        shutil.rmtree(out, ignore_errors=True)
        before = fake_old_results(out) if old_results else None
        proc = start(study, weights, out, *extra)
        if signal_before_writing(proc, sig, wait_for(proc, in_model_stage)):
            return proc, before
        finish(proc)
    pytest.fail(f"in {attempts} runs the test never caught the run before it wrote its results")


@pytest.mark.slow
def test_sigkill_in_the_model_stage_leaves_no_results_and_the_next_run_works(long_study, weights, tmp_path):
    out = tmp_path / "out"
    proc, _ = interrupt_in_model_stage(long_study, weights, out, signal.SIGKILL)
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
    proc, before = interrupt_in_model_stage(long_study, weights, out, signal.SIGKILL, "--overwrite", old_results=True)
    finish(proc)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_sigint_cancels_with_exit_130_and_no_partial_output(long_study, weights, tmp_path, overwrite):
    out = tmp_path / "out"
    proc, before = interrupt_in_model_stage(long_study, weights, out, signal.SIGINT, *(["--overwrite"] if overwrite else []),
                                            old_results=overwrite)
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
