"""Progress for people (a tqdm bar on a terminal) and for programs (JSON lines on stdout).

The Slicer module runs the CLI as a child process with ``--progress-format jsonl`` and reads one
JSON object per line: ``stage``, ``progress``, ``warning``, ``done`` and ``error`` events.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

__all__ = ["Reporter"]


class Reporter:
    def __init__(self, fmt: str = "text", quiet: bool = False):
        self.fmt = fmt
        self.quiet = quiet
        self._bar = None
        self._stage: Optional[str] = None

    # -- events ----------------------------------------------------------------------------
    def emit(self, event: str, **fields: Any) -> None:
        if self.fmt == "jsonl":
            sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
            sys.stdout.flush()

    def info(self, message: str) -> None:
        self.emit("info", message=message)
        if self.fmt == "text" and not self.quiet:
            self._close_bar()
            print(message, file=sys.stderr)

    def warning(self, message: str) -> None:
        self.emit("warning", message=message)
        if self.fmt == "text" and not self.quiet:
            self._close_bar()
            print(f"warning: {message}", file=sys.stderr)

    def failure(self, message: str) -> None:
        """A problem the user must see even with --quiet (e.g. a study skipped in a batch)."""
        self._close_bar()
        print(f"dadrn-lesion: {message}", file=sys.stderr)

    def __call__(self, stage: str, done: int, total: int) -> None:
        """The pipeline's progress callback."""
        if stage != self._stage:
            self._close_bar()
            self._stage = stage
            self.emit("stage", stage=stage)
        self.emit("progress", stage=stage, done=int(done), total=int(total))
        if self.fmt != "text" or self.quiet or stage != "model":
            return
        if sys.stderr.isatty():
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="slice", desc="classifying", file=sys.stderr, leave=False)
            self._bar.n = done
            self._bar.refresh()
        elif done == total:
            print(f"classified {total} liver slices", file=sys.stderr)

    def done(self, **fields: Any) -> None:
        self._close_bar()
        self.emit("done", **fields)

    def error(self, kind: str, message: str) -> None:
        self._close_bar()
        self.emit("error", kind=kind, message=message)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
