"""The module panel's behaviour without Qt: button states, progress text, cancel, navigation."""

from __future__ import annotations

import pytest

from DADRNLesionLib import panel as P
from DADRNLesionLib.runner import EngineEvent, RunDecision, decide_after_exit


def started_panel(batch=8, device="cuda") -> P.ClassifyPanel:
    panel = P.ClassifyPanel()
    panel.set_input(True)
    panel.start(batch, device)
    return panel


# -- the Classify / Cancel button ---------------------------------------------------------------
def test_button_needs_an_input_and_says_why():
    panel = P.ClassifyPanel()
    view = panel.view
    assert view.apply_text == "Classify lesions" and not view.apply_enabled
    assert "CT volume" in view.apply_tooltip or "input volume" in view.apply_tooltip
    assert panel.on_apply_clicked() == "ignore"
    view = panel.set_input(False, "Select the liver segment.")
    assert not view.apply_enabled and view.apply_tooltip == "Select the liver segment."
    view = panel.set_input(True)
    assert view.apply_enabled and view.parameters_enabled and not view.progress_visible
    assert panel.on_apply_clicked() == "start"


def test_running_turns_the_button_into_cancel_and_locks_parameters():
    panel = started_panel(8, "cuda")
    view = panel.view
    assert view.apply_text == "Cancel" and view.apply_enabled
    assert not view.parameters_enabled and not view.results_enabled
    assert view.progress_visible and view.progress_maximum == 0  # busy until the first count
    assert "GPU" in view.status and "batch size 8" in view.status
    assert panel.on_apply_clicked() == "cancel"
    # Input changes while running do not re-enable the parameters or restore the button.
    view = panel.set_input(True)
    assert view.apply_text == "Cancel" and not view.parameters_enabled
    with pytest.raises(RuntimeError):
        panel.start(4, "cpu")


def test_automatic_batch_size_is_described():
    panel = P.ClassifyPanel()
    panel.set_input(True)
    assert "automatic batch size" in panel.start(0, "auto").status


def test_progress_text_counts_slices():
    panel = started_panel()
    view = panel.handle(EngineEvent("stage", stage="liver"))
    assert view.progress_text == "Segmenting the liver..." and view.progress_maximum == 0
    view = panel.handle(EngineEvent("progress", stage="model", done=12, total=80))
    assert (view.progress_value, view.progress_maximum) == (12, 80)
    assert view.progress_text == "Classifying slices: 12 / 80 slices"
    view = panel.handle(EngineEvent("progress", stage="model", done=99, total=80))
    assert view.progress_value == 80  # clamped
    view = panel.handle(EngineEvent("progress", stage="write", done=1, total=3))
    assert view.progress_text == "Writing results: 1 / 3 steps"
    view = panel.handle(EngineEvent("stage", stage="some_new_stage"))
    assert view.progress_text == "Some new stage..."
    before = panel.view
    assert panel.handle(EngineEvent("log", message="noise")) == before
    assert panel.handle(EngineEvent("progress", stage="model", done=1, total=0)) == before


def test_cancel_then_cancelled_restores_the_panel():
    panel = started_panel()
    view = panel.request_cancel()
    assert view.apply_text == "Cancel" and not view.apply_enabled and view.progress_text == "Cancelling..."
    assert panel.on_apply_clicked() == "ignore"  # a second click does nothing
    view = panel.finish(decide_after_exit([EngineEvent("exit", exit_code=130)], 8, "cuda"))
    assert view.apply_text == "Classify lesions" and view.apply_enabled and view.parameters_enabled
    assert not view.progress_visible and not view.status_is_error and "as it was" in view.status
    assert not view.results_enabled


def test_success_enables_results():
    panel = started_panel()
    view = panel.finish(RunDecision("load", out_dir="/tmp/o"))
    assert view.results_enabled and view.apply_text == "Classify lesions"
    assert view.progress_value == view.progress_maximum == 1 and view.progress_text == "Done"


def test_failure_shows_the_engine_message_as_an_error():
    panel = started_panel()
    panel.handle(EngineEvent("error", error_kind="input", message="the liver mask is empty"))
    view = panel.finish(decide_after_exit(
        [EngineEvent("error", error_kind="input", message="the liver mask is empty"), EngineEvent("exit", exit_code=2)], 8, "cuda"))
    assert view.status_is_error and "the liver mask is empty" in view.status
    assert view.apply_enabled and view.apply_text == "Classify lesions"


def test_out_of_memory_retry_and_cpu_offer_texts():
    panel = started_panel(4, "cuda")
    oom = [EngineEvent("error", error_kind="cuda_oom", message="CUDA out of memory"), EngineEvent("exit", exit_code=3)]
    decision = decide_after_exit(oom, 4, "cuda")
    view = panel.finish(decision)
    assert decision.action == "retry" and "batch size 2" in view.status and not view.status_is_error
    view = panel.start(decision.batch_size, "cuda")
    assert "batch size 2" in view.status
    view = panel.finish(decide_after_exit(oom, 1, "cuda"))
    assert view.status_is_error and "CPU" in view.status


# -- devices ------------------------------------------------------------------------------------
def test_device_summary():
    assert "Not detected" in P.device_summary(None)
    assert P.device_summary({"cuda": True, "cuda_devices": ["NVIDIA RTX A4000"], "torch": "2.4.0"}) == "GPU: NVIDIA RTX A4000 (PyTorch 2.4.0)"
    assert P.device_summary({"cuda": False, "mps": True, "torch": "2.4.0"}) == "GPU: Apple MPS (PyTorch 2.4.0)"
    cpu = P.device_summary({"cuda": False, "mps": False, "torch": "2.4.0+cpu"})
    assert cpu.startswith("CPU only") and "2.4.0+cpu" in cpu and "bfloat16" not in cpu
    assert "choose cpu-bf16" in P.device_summary({"cuda": False, "mps": False, "torch": "2.4.0+cpu", "cpu_bf16": True})


def test_asking_for_cuda_without_one_falls_back_with_a_warning():
    assert P.resolve_device("cuda", {"cuda": False, "torch": "2.4"})[0] == "cpu"
    assert "GPU not used" in P.resolve_device("cuda", {"cuda": False, "torch": "2.4"})[1]
    assert P.resolve_device("cuda", {"cuda": True}) == ("cuda", "")
    assert P.resolve_device("auto", None) == ("auto", "")
    assert P.resolve_device("CPU", None) == ("cpu", "")


def test_asking_for_the_cpu_in_bfloat16_without_its_instructions_runs_float32_with_a_warning():
    device, warning = P.resolve_device(P.CPU_BF16, {"cuda": False, "cpu_bf16": False, "torch": "2.4"})
    assert device == "cpu" and "no bfloat16 instructions" in warning and "float32" in warning
    assert P.resolve_device(P.CPU_BF16, {"cuda": False, "cpu_bf16": True}) == (P.CPU_BF16, "")
    assert P.device_label(P.CPU_BF16) == "the CPU in bfloat16"


# -- navigation ---------------------------------------------------------------------------------
ROWS = [(3, 7.5, "Normal"), (4, 10.0, "HCC"), (5, 12.5, "HCC"), (6, 15.0, "Normal"), (9, 22.5, "Cyst"), (10, 25.0, "Normal")]


def test_next_and_previous_lesion_slice_wrap_around():
    nav = P.LesionNavigator(ROWS)
    assert nav.lesion_slices == [4, 5, 9] and nav.has_lesions
    assert nav.next_lesion(None) == 4
    assert nav.next_lesion(3.0) == 4
    assert nav.next_lesion(4.0) == 5
    assert nav.next_lesion(4.4) == 5  # a view between slices counts as the nearer slice
    assert nav.next_lesion(5) == 9
    assert nav.next_lesion(9) == 4  # wraps
    assert nav.previous_lesion(9) == 5
    assert nav.previous_lesion(5) == 4
    assert nav.previous_lesion(4) == 9  # wraps
    assert nav.previous_lesion(None) == 9
    assert nav.previous_lesion(100) == 9


def test_table_rows_map_to_slices():
    nav = P.LesionNavigator(ROWS)
    assert nav.slice_for_row(0) == 3 and nav.slice_for_row(4) == 9
    assert nav.slice_for_row(-1) is None and nav.slice_for_row(6) is None
    assert nav.row_for_slice(9) == 4 and nav.row_for_slice(7) is None


def test_no_lesions():
    nav = P.LesionNavigator([(1, 0.0, "Normal")])
    assert not nav.has_lesions and nav.next_lesion(1) is None and nav.previous_lesion(1) is None
    assert nav.summary() == "1 liver slice, no lesion slice."
    assert P.LesionNavigator([]).summary() == "No liver slices were classified."
    assert P.LesionNavigator(ROWS).summary() == "6 liver slices; lesion slices: HCC 2, Cyst 1."
