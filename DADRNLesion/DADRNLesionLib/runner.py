"""Run the engine CLI as a child process without blocking the caller; parse its progress; cancel it.

The Slicer module starts ``PythonSlicer -m DADRNLesionLib.cli classify ... --progress-format
jsonl`` through `EngineProcess` and polls it from a Qt timer, so the GUI never waits on a pipe.
No Qt here: a reader thread moves stdout lines into a queue and `EngineProcess.poll` drains it.

Cancel ends the whole process tree: the child starts in its own session (POSIX) or process group
(Windows), and cancel signals that group (``taskkill /T`` on Windows), so worker processes the
engine may have started (data loaders, CUDA helpers) die with it.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = [
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_INPUT",
    "EXIT_CUDA_OOM",
    "EXIT_CANCELLED",
    "EngineEvent",
    "EngineProcess",
    "RunDecision",
    "classify_command",
    "devices_command",
    "engine_environment",
    "parse_line",
    "decide_after_exit",
    "failure_message",
    "kill_process_tree",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INPUT = 2
EXIT_CUDA_OOM = 3
EXIT_CANCELLED = 130


@dataclass(frozen=True)
class EngineEvent:
    """One thing the engine said, or its exit.

    kind: "stage", "progress", "warning", "info", "done", "error" (the engine's own events),
    "data" (any other JSON object, e.g. the output of ``devices --json``), "log" (any other line),
    "exit" (the process ended).
    """

    kind: str
    stage: Optional[str] = None
    done: Optional[int] = None
    total: Optional[int] = None
    message: str = ""
    error_kind: Optional[str] = None
    out: Optional[str] = None
    exit_code: Optional[int] = None
    data: dict = field(default_factory=dict)


def parse_line(line: str) -> EngineEvent:
    """An `EngineEvent` from one stdout line; anything that is not an engine event is a log line."""
    text = line.rstrip("\r\n")
    stripped = text.strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        try:
            obj = json.loads(stripped)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            event = obj.get("event")
            if event == "stage":
                return EngineEvent("stage", stage=str(obj.get("stage", "")), message=str(obj.get("message", "")), data=obj)
            if event == "progress":
                return EngineEvent(
                    "progress",
                    stage=str(obj.get("stage", "")) or None,
                    done=_as_int(obj.get("done")),
                    total=_as_int(obj.get("total")),
                    data=obj,
                )
            if event == "done":
                return EngineEvent("done", out=str(obj.get("out", "")) or None, data=obj)
            if event in ("warning", "info"):
                return EngineEvent(event, message=str(obj.get("message", "")), data=obj)
            if event == "error":
                return EngineEvent("error", error_kind=str(obj.get("kind", "internal")), message=str(obj.get("message", "")), data=obj)
            return EngineEvent("data", data=obj)
    return EngineEvent("log", message=text)


def _as_int(value: Any) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# -- commands -------------------------------------------------------------------------------------
CPU_BF16 = "cpu-bf16"  # the device choice that runs the engine with --device cpu --cpu-bf16 (`precision`)


def classify_command(
    python: str,
    input_path,
    out_dir,
    *,
    liver_mask=None,
    weights=None,
    device: str = "auto",
    batch_size: Optional[int] = None,
    cam_threshold: Optional[float] = None,
    overwrite: bool = True,
) -> list[str]:
    """Argument list for ``python -m DADRNLesionLib.cli classify`` with JSON-lines progress."""
    cmd = [str(python), "-u", "-m", "DADRNLesionLib.cli", "classify", str(input_path), "--out", str(out_dir)]
    if liver_mask:
        cmd += ["--liver-mask", str(liver_mask)]
    if weights:
        cmd += ["--weights", str(weights)]
    if device == CPU_BF16:
        cmd += ["--device", "cpu", "--cpu-bf16"]
    elif device:
        cmd += ["--device", str(device)]
    if batch_size is not None:
        cmd += ["--batch-size", str(int(batch_size))]
    if cam_threshold is not None:
        cmd += ["--cam-threshold", f"{float(cam_threshold):g}"]
    if overwrite:
        cmd.append("--overwrite")
    cmd += ["--progress-format", "jsonl"]
    return cmd


def devices_command(python: str) -> list[str]:
    return [str(python), "-u", "-m", "DADRNLesionLib.cli", "devices", "--json"]


def engine_environment(module_dir, base: Optional[dict] = None) -> dict:
    """Environment for the child: the engine package importable, unbuffered UTF-8 output."""
    env = dict(os.environ if base is None else base)
    module_dir = str(module_dir)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != module_dir]
    env["PYTHONPATH"] = os.pathsep.join([module_dir, *parts])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


# -- process tree ---------------------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    """Child processes (recursively) when psutil is available (Slicer ships it); else []."""
    try:
        import psutil  # noqa: PLC0415
    except ImportError:
        return []
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001  (process already gone, access denied)
        return []


def _alive(pid: int) -> bool:
    if os.name == "nt":
        try:
            import psutil  # noqa: PLC0415

            return psutil.pid_exists(pid)
        except ImportError:
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_process_tree(proc: subprocess.Popen, grace_s: float = 2.0) -> None:
    """End `proc` and everything it started: a polite signal first, a hard kill after `grace_s`."""
    pid = proc.pid
    extra = _descendants(pid)  # also any that left the group, when psutil can see them
    if os.name == "nt":
        subprocess.run(
            ["taskkill", "/F", "/T", "/PID", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
            check=False,
        )
        for child in extra:
            _signal(child, signal.SIGTERM)  # TerminateProcess on Windows
    else:
        pgid = _separate_group(pid)
        _signal_tree(proc, pgid, extra, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(pgid) and not any(_alive(c) for c in extra):
                break
            time.sleep(0.05)
        _signal_tree(proc, pgid, extra, signal.SIGKILL)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _separate_group(pid: int) -> Optional[int]:
    """The child's process group, if it is not ours (it is not when started in a new session)."""
    try:
        pgid = os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None
    return None if pgid == os.getpgid(0) else pgid


def _signal_tree(proc: subprocess.Popen, pgid: Optional[int], extra: Sequence[int], sig) -> None:
    if pgid is not None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    if proc.poll() is None:  # never signal a reaped pid: it may belong to another process by now
        _signal(proc.pid, sig)
    for target in extra:
        _signal(target, sig)


def _signal(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _group_alive(pgid: Optional[int]) -> bool:
    if pgid is None or os.name == "nt":
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the process ----------------------------------------------------------------------------------
class EngineProcess:
    """A child process whose stdout lines become `EngineEvent`s, read without ever blocking.

    `poll()` returns the events that arrived since the last call and, once, a final "exit" event
    with the exit code (130 after `cancel()`). stderr goes to a log file (`stderr_path`) so that a
    chatty child can never fill a pipe and stall; `stderr_tail()` gives its last lines for
    error messages.
    """

    # After the child exits, wait at most this long for stdout to drain (a surviving grandchild
    # could hold the pipe open forever).
    DRAIN_TIMEOUT_S = 2.0

    def __init__(self, command: Sequence[str], env: Optional[dict] = None, cwd=None, stderr_path=None):
        self.command = [str(c) for c in command]
        self.env = env
        self.cwd = None if cwd is None else str(cwd)
        self._own_stderr = stderr_path is None
        self.stderr_path = Path(stderr_path) if stderr_path else Path(tempfile.mkstemp(prefix="dadrn-engine-", suffix=".log")[1])
        self.proc: Optional[subprocess.Popen] = None
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._eof = False
        self._exit_reported = False
        self._exited_at: Optional[float] = None
        self.cancelled = False
        self.events: list[EngineEvent] = []  # everything seen, for error reporting

    # lifecycle
    def start(self) -> "EngineProcess":
        if self.proc is not None:
            raise RuntimeError("already started")
        stderr_file = open(self.stderr_path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        try:
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr_file,
                env=self.env,
                cwd=self.cwd,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                **kwargs,
            )
        finally:
            stderr_file.close()  # the child holds its own handle
        self._thread = threading.Thread(target=self._read_stdout, name="dadrn-engine-stdout", daemon=True)
        self._thread.start()
        return self

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self._queue.put(line)
        except (OSError, ValueError):
            pass
        finally:
            self._queue.put(None)

    @property
    def pid(self) -> Optional[int]:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and not self._exit_reported

    @property
    def returncode(self) -> Optional[int]:
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is None:
            return None
        return EXIT_CANCELLED if self.cancelled else _normalise_exit(code)

    def poll(self) -> list[EngineEvent]:
        """Events since the last call; never blocks."""
        out: list[EngineEvent] = []
        if self.proc is None or self._exit_reported:
            return out
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._eof = True
                break
            if line.strip():
                out.append(parse_line(line))
        code = self.proc.poll()
        if code is not None:
            if self._exited_at is None:
                self._exited_at = time.monotonic()
            drained = self._eof or (time.monotonic() - self._exited_at) > self.DRAIN_TIMEOUT_S
            if drained:
                self._exit_reported = True
                out.append(EngineEvent("exit", exit_code=self.returncode))
        self.events.extend(out)
        return out

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> list[EngineEvent]:
        """Poll until the exit event (for scripts and tests; the GUI polls from a timer instead)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        collected: list[EngineEvent] = []
        while True:
            collected.extend(self.poll())
            if self._exit_reported:
                return collected
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"engine still running after {timeout} s")
            time.sleep(interval)

    def cancel(self) -> None:
        """Kill the child and all its descendants; the next `poll()` reports exit code 130."""
        if self.proc is None or self._exit_reported:
            return
        self.cancelled = True
        kill_process_tree(self.proc)

    def stderr_tail(self, lines: int = 15) -> str:
        try:
            text = self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def close(self) -> None:
        """Cancel if still running and remove the stderr log if this object created it."""
        if self.running:
            self.cancel()
        if self._own_stderr:
            try:
                self.stderr_path.unlink()
            except OSError:
                pass


def _normalise_exit(code: int) -> int:
    # A child killed by a signal reports -signum on POSIX; treat an interrupt like a cancel.
    if code in (-signal.SIGINT, -getattr(signal, "SIGTERM", 15)):
        return EXIT_CANCELLED
    return code


# -- what to do after the engine exits ------------------------------------------------------------
@dataclass(frozen=True)
class RunDecision:
    """action: "load" (results are ready), "retry" (same device, smaller batch), "offer_cpu",
    "cancelled" or "fail". `message` is what to tell the user."""

    action: str
    message: str = ""
    batch_size: Optional[int] = None
    device: Optional[str] = None
    out_dir: Optional[str] = None


def _last(events: Sequence[EngineEvent], kind: str) -> Optional[EngineEvent]:
    for event in reversed(events):
        if event.kind == kind:
            return event
    return None


def decide_after_exit(events: Sequence[EngineEvent], batch_size: int, device: str, stderr_tail: str = "") -> RunDecision:
    """Turn the engine's exit into the next step, including the out-of-memory policy.

    CUDA out of memory: halve the batch and retry on the GPU, down to a batch of 1; then offer the
    CPU. Every other failure becomes one readable message.
    """
    exit_event = _last(events, "exit")
    code = exit_event.exit_code if exit_event is not None else None
    error = _last(events, "error")
    done = _last(events, "done")
    if code == EXIT_CANCELLED:
        return RunDecision("cancelled", "Cancelled. The scene was left as it was.")
    oom = code == EXIT_CUDA_OOM or (error is not None and error.error_kind == "cuda_oom")
    if oom:
        if batch_size > 1:
            smaller = max(1, batch_size // 2)
            return RunDecision(
                "retry",
                f"The GPU ran out of memory with batch size {batch_size}; retrying with batch size {smaller}.",
                batch_size=smaller,
                device=device,
            )
        if device != "cpu":
            return RunDecision(
                "offer_cpu",
                "The GPU ran out of memory even with batch size 1. Run on the CPU instead (slower, but it will finish)?",
                batch_size=1,
                device="cpu",
            )
    if code == EXIT_OK and done is not None:
        return RunDecision("load", out_dir=done.out)
    return RunDecision("fail", failure_message(code, error, stderr_tail))


def failure_message(code: Optional[int], error: Optional[EngineEvent], stderr_tail: str = "") -> str:
    """One readable paragraph for a failed run."""
    detail = error.message.strip() if error is not None and error.message else ""
    if not detail and stderr_tail:
        lines = [ln.strip() for ln in stderr_tail.strip().splitlines() if ln.strip()]
        detail = lines[-1] if lines else ""
    kind = error.error_kind if error is not None else None
    if kind == "weights":
        return f"The model weights cannot be used: {detail or 'the checkpoint failed its checks'}. Pick another checkpoint or the demo model."
    if code == EXIT_INPUT or kind == "input":
        return f"The input cannot be used: {detail or 'the engine rejected it'}"
    if code == EXIT_CUDA_OOM or kind == "cuda_oom":
        return f"Out of memory: {detail or 'the computation did not fit'}. Lower the batch size or choose the CPU."
    if code == EXIT_OK:
        return "The engine finished without reporting results; see the log for details."
    if code is None:
        return "The engine stopped unexpectedly."
    if detail:
        return f"The classification failed (exit code {code}): {detail}"
    return f"The classification failed (exit code {code}); see the log for details."


def python_executable() -> str:
    """The interpreter for the engine: Slicer's PythonSlicer when present, else this Python."""
    import shutil  # noqa: PLC0415

    exe_dir = Path(sys.executable).parent
    for name in ("PythonSlicer.exe", "PythonSlicer"):
        candidate = exe_dir / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which("PythonSlicer")
    return found or sys.executable
