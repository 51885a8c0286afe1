"""runner.py with real child processes: non-blocking reads, progress parsing, exit codes, cancel.

The children are small Python scripts that print the engine's JSON lines and sleep; cancel must
end the child and a grandchild it started (even one that ignores SIGTERM). The last tests run the
real engine CLI through the same runner and load its output into a real MRML scene.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from DADRNLesionLib import runner as R

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    mode = sys.argv[1]
    def emit(**e):
        sys.stdout.write(json.dumps(e) + "\\n"); sys.stdout.flush()
    if mode == "progress":
        emit(event="stage", stage="liver")
        print("a plain log line", flush=True)
        for done in range(1, 5):
            time.sleep(0.05)
            emit(event="progress", stage="model", done=done, total=4)
        emit(event="warning", message="liver mask: small")
        print("to stderr", file=sys.stderr, flush=True)
        emit(event="done", out=sys.argv[2])
        sys.exit(0)
    if mode == "slow_start":
        time.sleep(1.5)
        emit(event="done", out="x")
        sys.exit(0)
    if mode == "fail":
        emit(event="error", kind=sys.argv[2], message="the mask is empty: draw the liver first")
        print("Traceback would be here", file=sys.stderr)
        sys.exit(int(sys.argv[3]))
    if mode == "chatty_stderr":
        sys.stderr.write("x" * 2_000_000)
        sys.stderr.flush()
        emit(event="done", out="y")
        sys.exit(0)
    if mode == "tree":
        # A grandchild that ignores SIGTERM, so only the hard kill ends it.
        code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
        grandchild = subprocess.Popen([sys.executable, "-c", code])
        with open(sys.argv[2], "w") as f:
            f.write(f"{os.getpid()} {grandchild.pid}")
        emit(event="progress", stage="model", done=1, total=100)
        time.sleep(120)
    """
)


@pytest.fixture(scope="module")
def child(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("child") / "child.py"
    path.write_text(CHILD)
    return path


def run_child(child: Path, *args, **kwargs) -> R.EngineProcess:
    return R.EngineProcess([sys.executable, "-u", str(child), *map(str, args)], **kwargs).start()


def _gone(pid: int) -> bool:
    """The process no longer runs (absent, or a zombie its new parent has not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            return True
    return False


# -- parsing ------------------------------------------------------------------------------------
def test_parse_line_knows_every_engine_event():
    assert R.parse_line('{"event":"stage","stage":"liver"}\n') == R.EngineEvent("stage", stage="liver", data={"event": "stage", "stage": "liver"})
    e = R.parse_line('{"event":"progress","stage":"model","done":12,"total":80}')
    assert (e.kind, e.stage, e.done, e.total) == ("progress", "model", 12, 80)
    e = R.parse_line('{"event":"done","out":"/tmp/o"}')
    assert (e.kind, e.out) == ("done", "/tmp/o")
    e = R.parse_line('{"event":"error","kind":"cuda_oom","message":"out of memory"}')
    assert (e.kind, e.error_kind, e.message) == ("error", "cuda_oom", "out of memory")
    assert R.parse_line('{"event":"warning","message":"w"}').kind == "warning"
    assert R.parse_line('{"cuda": false, "torch": "2.3"}').kind == "data"
    assert R.parse_line("Loading model...").kind == "log"
    assert R.parse_line("{not json}").kind == "log"
    assert R.parse_line('{"event":"progress","done":"x","total":null}').done is None


def test_classify_command_and_environment(tmp_path):
    cmd = R.classify_command("/opt/Slicer/bin/PythonSlicer", tmp_path / "in.nrrd", tmp_path / "out", liver_mask=tmp_path / "l.nrrd",
                             weights="/w.safetensors", device="cuda", batch_size=4, cam_threshold=0.45)
    assert cmd[:5] == ["/opt/Slicer/bin/PythonSlicer", "-u", "-m", "DADRNLesionLib.cli", "classify"]
    assert cmd[5] == str(tmp_path / "in.nrrd")
    joined = " ".join(cmd)
    for part in (f"--out {tmp_path / 'out'}", f"--liver-mask {tmp_path / 'l.nrrd'}", "--weights /w.safetensors", "--device cuda",
                 "--batch-size 4", "--cam-threshold 0.45", "--overwrite", "--progress-format jsonl"):
        assert part in joined
    minimal = R.classify_command("py", "in.nrrd", "out", batch_size=None)
    bf16 = R.classify_command("py", "in.nrrd", "out", device=R.CPU_BF16)
    assert bf16[bf16.index("--device") + 1] == "cpu" and "--cpu-bf16" in bf16  # what the engine's parser takes
    from DADRNLesionLib.cli import build_parser

    args = build_parser().parse_args(bf16[4:])
    assert args.device == "cpu" and args.cpu_bf16 and not args.no_amp
    assert "--batch-size" not in minimal and "--liver-mask" not in minimal and "--weights" not in minimal
    env = R.engine_environment("/mod", {"PYTHONPATH": f"/other{os.pathsep}/mod", "HOME": "/h"})
    assert env["PYTHONPATH"] == f"/mod{os.pathsep}/other" and env["PYTHONUNBUFFERED"] == "1" and env["HOME"] == "/h"


# -- running ------------------------------------------------------------------------------------
def test_progress_events_arrive_in_order_with_one_exit(child, tmp_path):
    proc = run_child(child, "progress", tmp_path)
    events = proc.wait(timeout=30)
    kinds = [e.kind for e in events]
    assert kinds[0] == "stage" and kinds[-2:] == ["done", "exit"] and kinds.count("exit") == 1
    assert [e.done for e in events if e.kind == "progress"] == [1, 2, 3, 4]
    assert any(e.kind == "log" and e.message == "a plain log line" for e in events)
    assert any(e.kind == "warning" for e in events)
    assert events[-1].exit_code == 0 and proc.returncode == 0 and not proc.running
    assert proc.poll() == []  # the exit is reported once
    assert proc.stderr_tail() == "to stderr"
    decision = R.decide_after_exit(proc.events, batch_size=8, device="cuda")
    assert decision.action == "load" and decision.out_dir == str(tmp_path)
    proc.close()


def test_poll_never_blocks(child):
    proc = run_child(child, "slow_start")
    t = time.monotonic()
    for _ in range(5):
        assert proc.poll() == []
    assert time.monotonic() - t < 0.5  # the child sleeps 1.5 s before printing anything
    assert proc.running
    events = proc.wait(timeout=30)
    assert [e.kind for e in events] == ["done", "exit"]
    proc.close()


def test_a_chatty_stderr_cannot_stall_the_child(child):
    proc = run_child(child, "chatty_stderr")
    events = proc.wait(timeout=30)
    assert events[-1].exit_code == 0
    assert len(proc.stderr_tail()) > 1000
    proc.close()


@pytest.mark.parametrize("kind, code, action, words", [
    ("input", 2, "fail", "The input cannot be used: the mask is empty"),
    ("weights", 2, "fail", "The model weights cannot be used"),
    ("internal", 1, "fail", "exit code 1"),
])
def test_engine_errors_become_readable_messages(child, kind, code, action, words):
    proc = run_child(child, "fail", kind, code)
    events = proc.wait(timeout=30)
    assert events[-1].exit_code == code
    decision = R.decide_after_exit(proc.events, 4, "cpu", proc.stderr_tail())
    assert decision.action == action and words in decision.message
    assert "Traceback" not in decision.message
    proc.close()


def test_missing_executable_raises_oserror():
    with pytest.raises(OSError):
        R.EngineProcess(["/nonexistent/PythonSlicer", "-m", "x"]).start()


@pytest.mark.skipif(os.name == "nt", reason="checks POSIX process groups")
def test_cancel_kills_the_whole_process_tree(child, tmp_path):
    pids_file = tmp_path / "pids"
    proc = run_child(child, "tree", pids_file)
    deadline = time.monotonic() + 30
    while not (pids_file.exists() and pids_file.read_text().strip()):
        assert time.monotonic() < deadline, "child did not start"
        time.sleep(0.05)
    child_pid, grandchild_pid = map(int, pids_file.read_text().split())
    assert child_pid == proc.pid and not _gone(grandchild_pid)
    assert os.getpgid(proc.pid) != os.getpgid(0)  # started in its own group/session
    t = time.monotonic()
    proc.cancel()
    events = proc.wait(timeout=30)
    assert time.monotonic() - t < 10
    assert events[-1].kind == "exit" and events[-1].exit_code == R.EXIT_CANCELLED
    assert _gone(child_pid)
    deadline = time.monotonic() + 5
    while not _gone(grandchild_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(grandchild_pid), "the grandchild survived the cancel"
    decision = R.decide_after_exit(proc.events, 8, "cuda")
    assert decision.action == "cancelled" and "as it was" in decision.message
    proc.close()


# -- out-of-memory policy -----------------------------------------------------------------------
def _oom_events(code=3):
    return [R.EngineEvent("error", error_kind="cuda_oom", message="CUDA out of memory"), R.EngineEvent("exit", exit_code=code)]


def test_oom_halves_the_batch_down_to_one_then_offers_the_cpu():
    batch, device, steps = 16, "cuda", []
    while True:
        decision = R.decide_after_exit(_oom_events(), batch, device)
        steps.append((decision.action, decision.batch_size))
        if decision.action != "retry":
            break
        batch = decision.batch_size
    assert steps == [("retry", 8), ("retry", 4), ("retry", 2), ("retry", 1), ("offer_cpu", 1)]
    assert decision.device == "cpu" and "CPU" in decision.message
    # An odd batch halves down too; automatic batch (0) means the engine already tried smaller.
    assert R.decide_after_exit(_oom_events(), 3, "cuda").batch_size == 1
    assert R.decide_after_exit(_oom_events(), 0, "cuda").action == "offer_cpu"
    # On the CPU there is nothing left to offer.
    final = R.decide_after_exit(_oom_events(), 1, "cpu")
    assert final.action == "fail" and "memory" in final.message


def test_exit_without_results_is_a_failure():
    assert R.decide_after_exit([R.EngineEvent("exit", exit_code=0)], 4, "cpu").action == "fail"
    assert "exit code 1" in R.decide_after_exit([R.EngineEvent("exit", exit_code=1)], 4, "cpu", "RuntimeError: boom").message
    assert "boom" in R.decide_after_exit([R.EngineEvent("exit", exit_code=1)], 4, "cpu", "x\nRuntimeError: boom").message


# -- the real engine ----------------------------------------------------------------------------
def _engine_env():
    return R.engine_environment(REPO / "DADRNLesion")


@pytest.mark.slow
def test_devices_through_the_runner():
    pytest.importorskip("torch")
    proc = R.EngineProcess(R.devices_command(sys.executable), env=_engine_env(), cwd=REPO / "DADRNLesion").start()
    events = proc.wait(timeout=120)
    data = [e.data for e in events if e.kind == "data"]
    assert events[-1].exit_code == 0, proc.stderr_tail()
    assert data and "cuda" in data[0] and "torch" in data[0]
    from DADRNLesionLib.precision import cpu_has_native_bf16

    assert data[0]["cpu_bf16"] is cpu_has_native_bf16()
    proc.close()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    pytest.importorskip("torch")
    from DADRNLesionLib.preprocess import InputSpec
    from DADRNLesionLib.weights import ModelCard, random_model, save_checkpoint

    loaded = random_model({"backbone": "drn_d_22", "width": 0.25, "attention": "dual"}, InputSpec(size=64), seed=2)
    card = ModelCard("runner-test", loaded.model.config, InputSpec(size=64), intended_use="tests")
    return save_checkpoint(loaded.model, tmp_path_factory.mktemp("w") / "tiny.safetensors", card)


@pytest.mark.slow
def test_engine_classify_through_the_runner_into_a_scene(tiny_weights, tmp_path):
    """The module's path without Slicer: save input, run the CLI as a child, load into MRML."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core is not installed")
    from DADRNLesionLib import scene as S
    from DADRNLesionLib.io import write_volume
    from DADRNLesionLib.volume import Volume

    rng = np.random.default_rng(0)
    shape = (8, 64, 64)
    k, j, i = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    liver = (((i - 28) / 20.0) ** 2 + ((j - 30) / 16.0) ** 2 <= 1.0) & (k >= 1) & (k <= 6)
    body = ((i - 32) / 30.0) ** 2 + ((j - 32) / 26.0) ** 2 <= 1.0
    hu = np.where(liver, 95, np.where(body, 30, -1000)) + rng.normal(0, 5, shape)
    a = 0.2
    direction = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    ct = Volume(hu.astype(np.int16), (1.2, 1.3, 3.0), (5.0, -7.0, 20.0), direction)
    scene = slicer.vtkMRMLScene()
    ct_node = S.volume_to_node(ct, scene, "Tiny CT")
    # What the module does: the input node -> files in a work folder.
    write_volume(S.volume_from_node(ct_node), tmp_path / "input.nrrd", compress=False)
    write_volume(ct.with_array(liver.astype(np.uint8)), tmp_path / "liver.nrrd")
    cmd = R.classify_command(sys.executable, tmp_path / "input.nrrd", tmp_path / "out", liver_mask=tmp_path / "liver.nrrd",
                             weights=tiny_weights, device="cpu", batch_size=2, cam_threshold=0.5)
    proc = R.EngineProcess(cmd, env=_engine_env(), cwd=REPO / "DADRNLesion").start()
    events = proc.wait(timeout=300)
    decision = R.decide_after_exit(proc.events, 2, "cpu", proc.stderr_tail())
    assert decision.action == "load", decision.message + "\n" + proc.stderr_tail()
    progress = [e for e in events if e.kind == "progress" and e.stage == "model"]
    assert progress and progress[-1].done == progress[-1].total == int(liver.any(axis=(1, 2)).sum())
    result = S.load_result_dir(decision.out_dir)
    nodes = S.add_results_to_scene(scene, result, ct_node)
    assert nodes.segmentation.GetName() == "Tiny CT lesions"
    assert S.volume_from_node(nodes.heatmap).same_geometry(ct, tol=1e-4)
    assert nodes.table.GetNumberOfRows() == progress[-1].total
    assert np.array_equal(S.segment_to_volume(nodes.segmentation, "liver", ct_node).array, liver.astype(np.uint8))
    proc.close()
