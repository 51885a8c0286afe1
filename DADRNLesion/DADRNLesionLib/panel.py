"""What the module panel shows, as plain Python: button states, progress text, navigation.

The Slicer widget owns no decisions: it feeds user actions and engine events into `ClassifyPanel`
and copies the resulting `ViewState` onto its Qt widgets. That keeps every rule here testable
without Qt (enable states, Classify <-> Cancel, progress "12 / 80 slices", out-of-memory retry
text, previous/next lesion slice, table row -> slice).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

from .runner import CPU_BF16, EngineEvent, RunDecision

__all__ = ["CPU_BF16", "ViewState", "ClassifyPanel", "LesionNavigator", "device_summary", "stage_text", "APPLY_TEXT", "CANCEL_TEXT"]

APPLY_TEXT = "Classify lesions"
CANCEL_TEXT = "Cancel"

_STAGES = {
    "start": "Starting",
    "load": "Reading the volume",
    "read": "Reading the volume",
    "liver": "Segmenting the liver",
    "preprocess": "Preparing slices",
    "weights": "Loading the model",
    "model": "Classifying slices",
    "classify": "Classifying slices",
    "cam": "Computing heatmaps",
    "localize": "Localizing lesions",
    "write": "Writing results",
    "outputs": "Writing results",
}


def stage_text(stage: Optional[str]) -> str:
    if not stage:
        return "Working"
    return _STAGES.get(stage, stage.replace("_", " ").capitalize())


@dataclass(frozen=True)
class ViewState:
    apply_text: str = APPLY_TEXT
    apply_enabled: bool = False
    apply_tooltip: str = "Select an input volume first."
    parameters_enabled: bool = True  # input/model/device widgets (locked while running)
    progress_visible: bool = False
    progress_value: int = 0
    progress_maximum: int = 100  # 0 means "busy" (unknown total)
    progress_text: str = ""
    status: str = ""
    status_is_error: bool = False
    results_enabled: bool = False  # navigation, export, edit


class ClassifyPanel:
    """State machine of the Classify button and progress display.

    States: idle -> running -> (cancelling) -> idle. Each method returns the new `ViewState`.
    """

    def __init__(self) -> None:
        self.running = False
        self.cancelling = False
        self.input_ready = False
        self.input_reason = "Select an input volume first."
        self.has_results = False
        self.batch_size: Optional[int] = None
        self.device: Optional[str] = None
        self._view = ViewState()
        self._refresh()

    # -- inputs --------------------------------------------------------------------------------
    def set_input(self, ready: bool, reason: str = "") -> ViewState:
        """Whether the inputs are complete; `reason` says what is missing when they are not."""
        self.input_ready = bool(ready)
        self.input_reason = reason or ("" if ready else "Select an input volume first.")
        return self._refresh()

    def set_has_results(self, has: bool) -> ViewState:
        self.has_results = bool(has)
        return self._refresh()

    # -- run lifecycle -------------------------------------------------------------------------
    def start(self, batch_size: Optional[int], device: str) -> ViewState:
        """A run started; `batch_size` 0 or None means the engine chooses it."""
        if self.running:
            raise RuntimeError("a classification is already running")
        self.running = True
        self.cancelling = False
        self.batch_size = int(batch_size) if batch_size else None
        self.device = device
        batch_text = f"batch size {self.batch_size}" if self.batch_size else "an automatic batch size"
        self._view = replace(
            self._view,
            progress_visible=True,
            progress_value=0,
            progress_maximum=0,
            progress_text=f"{stage_text('start')}...",
            status=f"Running on {device_label(device)} with {batch_text}.",
            status_is_error=False,
        )
        return self._refresh()

    def handle(self, event: EngineEvent) -> ViewState:
        """Update progress from one engine event (log lines and data leave the display alone)."""
        if event.kind == "stage":
            text = event.message or stage_text(event.stage)
            self._view = replace(self._view, progress_value=0, progress_maximum=0, progress_text=f"{text}...")
        elif event.kind == "progress" and event.total:
            done = max(0, min(int(event.done or 0), int(event.total)))
            unit = "slices" if event.stage in (None, "model", "classify", "cam", "preprocess") else "steps"
            self._view = replace(
                self._view,
                progress_value=done,
                progress_maximum=int(event.total),
                progress_text=f"{stage_text(event.stage)}: {done} / {event.total} {unit}",
            )
        elif event.kind == "error" and event.message:
            self._view = replace(self._view, status=event.message, status_is_error=True)
        return self._refresh()

    def request_cancel(self) -> ViewState:
        if not self.running:
            return self._view
        self.cancelling = True
        self._view = replace(self._view, progress_text="Cancelling...", status="Stopping the classification.")
        return self._refresh()

    def finish(self, decision: RunDecision) -> ViewState:
        """The engine exited; `decision` (from runner.decide_after_exit) says what happens next."""
        self.running = False
        self.cancelling = False
        if decision.action == "retry":
            self._view = replace(self._view, progress_visible=False, status=decision.message, status_is_error=False)
        elif decision.action == "load":
            self.has_results = True
            self._view = replace(
                self._view,
                progress_visible=True,
                progress_value=1,
                progress_maximum=1,
                progress_text="Done",
                status="Done. Results are in the scene.",
                status_is_error=False,
            )
        elif decision.action == "cancelled":
            self._view = replace(self._view, progress_visible=False, status=decision.message, status_is_error=False)
        else:  # fail, offer_cpu
            self._view = replace(self._view, progress_visible=False, status=decision.message, status_is_error=True)
        return self._refresh()

    def show_status(self, text: str, error: bool = False) -> ViewState:
        self._view = replace(self._view, status=text, status_is_error=error)
        return self._refresh()

    # -- the button ----------------------------------------------------------------------------
    def on_apply_clicked(self) -> str:
        """What a click on the Classify/Cancel button means now: "start", "cancel" or "ignore"."""
        if self.running:
            return "ignore" if self.cancelling else "cancel"
        return "start" if self.input_ready else "ignore"

    @property
    def view(self) -> ViewState:
        return self._view

    def _refresh(self) -> ViewState:
        if self.running:
            self._view = replace(
                self._view,
                apply_text=CANCEL_TEXT,
                apply_enabled=not self.cancelling,
                apply_tooltip="Stop the classification; the scene stays as it was.",
                parameters_enabled=False,
                results_enabled=False,
            )
        else:
            self._view = replace(
                self._view,
                apply_text=APPLY_TEXT,
                apply_enabled=self.input_ready,
                apply_tooltip="Classify every liver slice and localize lesions." if self.input_ready else self.input_reason,
                parameters_enabled=True,
                results_enabled=self.has_results,
            )
        return self._view


def device_label(device: Optional[str]) -> str:
    return {"cuda": "the GPU (CUDA)", "cpu": "the CPU", CPU_BF16: "the CPU in bfloat16", "mps": "the GPU (Apple MPS)",
            "auto": "the best available device"}.get(
        device or "auto", str(device)
    )


def device_summary(info: Optional[dict]) -> str:
    """One line for the panel from ``dadrn-lesion devices --json`` (None: not detected yet)."""
    if info is None:
        return "Not detected yet (PyTorch is checked when you first classify)."
    torch_version = info.get("torch")
    suffix = f" (PyTorch {torch_version})" if torch_version else ""
    if info.get("cuda"):
        names = [str(n) for n in info.get("cuda_devices") or []]
        what = ", ".join(names) if names else "CUDA GPU"
        return f"GPU: {what}{suffix}"
    if info.get("mps"):
        return f"GPU: Apple MPS{suffix}"
    if not torch_version:
        return "PyTorch is not installed."
    bf16 = f"; it computes in bfloat16: choose {CPU_BF16} for about twice the speed" if info.get("cpu_bf16") else ""
    return f"CPU only: no CUDA GPU visible to PyTorch{suffix}{bf16}"


def resolve_device(choice: str, info: Optional[dict]) -> tuple[str, str]:
    """(device for the engine, warning or ""). Asking for CUDA without one falls back to the CPU, and
    for the CPU in bfloat16 (`CPU_BF16`, the engine's --cpu-bf16) without its instructions to float32."""
    choice = (choice or "auto").lower()
    if choice == "cuda" and info is not None and not info.get("cuda"):
        return "cpu", "No CUDA GPU is visible to PyTorch; running on the CPU. See docs/slicer.md, 'GPU not used'."
    if choice == CPU_BF16 and info is not None and not info.get("cpu_bf16"):
        return "cpu", "This CPU has no bfloat16 instructions (AVX512-BF16 or AMX), where bfloat16 would be slower; running on the CPU in float32."
    return choice, ""


class LesionNavigator:
    """Previous/next lesion slice and table row <-> slice, from the rows of the slice table.

    `rows` are (slice index, z mm, class display name) as `scene.slices_from_table` returns them.
    """

    NORMAL = "Normal"

    def __init__(self, rows: Sequence[tuple[int, float, str]]):
        self.rows = [(int(k), float(z), str(c)) for k, z, c in rows]
        self.lesion_slices = sorted({k for k, _, c in self.rows if c != self.NORMAL})

    @property
    def has_lesions(self) -> bool:
        return bool(self.lesion_slices)

    def slice_for_row(self, row: int) -> Optional[int]:
        if 0 <= row < len(self.rows):
            return self.rows[row][0]
        return None

    def row_for_slice(self, k: int) -> Optional[int]:
        for index, (slice_index, _, _) in enumerate(self.rows):
            if slice_index == k:
                return index
        return None

    def next_lesion(self, current: Optional[float]) -> Optional[int]:
        """First lesion slice after `current` (a possibly fractional k); wraps to the first."""
        if not self.lesion_slices:
            return None
        if current is None:
            return self.lesion_slices[0]
        for k in self.lesion_slices:
            if k > current + 0.5:
                return k
        return self.lesion_slices[0]

    def previous_lesion(self, current: Optional[float]) -> Optional[int]:
        """Last lesion slice before `current`; wraps to the last."""
        if not self.lesion_slices:
            return None
        if current is None:
            return self.lesion_slices[-1]
        for k in reversed(self.lesion_slices):
            if k < current - 0.5:
                return k
        return self.lesion_slices[-1]

    def summary(self) -> str:
        if not self.rows:
            return "No liver slices were classified."
        counts: dict[str, int] = {}
        for _, _, c in self.rows:
            if c != self.NORMAL:
                counts[c] = counts.get(c, 0) + 1
        total = f"{len(self.rows)} liver slice{'s' if len(self.rows) != 1 else ''}"
        if not counts:
            return f"{total}, no lesion slice."
        parts = ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda item: -item[1]))
        return f"{total}; lesion slices: {parts}."
