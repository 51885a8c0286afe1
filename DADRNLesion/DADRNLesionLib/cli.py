"""`dadrn-lesion`: the command-line face of the engine (batch work, training, evaluation, Slicer's worker).

A user error prints one line saying what is wrong and what to do, and exits non-zero without a
traceback (``--debug`` shows it). Exit codes: 0 ok, 1 internal error, 2 input error,
3 GPU out of memory, 4 some studies of a batch failed, 130 cancelled.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from . import __version__
from .errors import Cancelled, UserInputError

__all__ = ["main", "COMMANDS", "add_common_options"]

COMMANDS = ["classify", "demo", "devices", "bench", "dataset", "train", "evaluate", "phantom", "compare", "liver", "compare-evaluations", "calibrate"]

EXIT_INTERNAL, EXIT_INPUT, EXIT_OOM, EXIT_PARTIAL, EXIT_CANCELLED = 1, 2, 3, 4, 130


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--progress-format", choices=("text", "jsonl"), default="text",
        help="jsonl: one JSON event per line on stdout (for programs such as the Slicer module)",
    )


def add_precision_options(parser) -> None:
    parser.add_argument("--no-amp", action="store_true", help="full precision on the GPU")
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="bfloat16 autocast on the CPU too: about twice as fast where the CPU has bfloat16 instructions "
                             "(AVX512-BF16, AMX), refused where it has not; the figures differ a little from float32's")


def amp_choice(args) -> Optional[bool]:
    """The `amp` of PipelineOptions and TrainConfig (`precision.autocast_dtype`) from the two options."""
    if args.no_amp and args.cpu_bf16:
        raise UserInputError("--no-amp and --cpu-bf16 contradict each other: give one of them")
    return False if args.no_amp else (True if args.cpu_bf16 else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dadrn-lesion",
        description="Liver lesion classification (normal, cyst, FNH, HCC, hemangioma) and Grad-CAM localisation on arterial-phase CT.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"{__package__}.commands.{name.replace('-', '_')}")
        module.add_parser(sub)
    return parser


def _error_kind(exc: BaseException) -> str:
    from .errors import WeightsError

    return "weights" if isinstance(exc, WeightsError) else "input"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    from .reporting import Reporter

    reporter = Reporter(getattr(args, "progress_format", "text"), getattr(args, "quiet", False))
    args.reporter = reporter
    _cancel_on_sigterm()
    try:
        return int(args.run(args) or 0)
    except UserInputError as exc:
        if debug:
            raise
        reporter.error(_error_kind(exc), str(exc))
        print(f"dadrn-lesion: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (Cancelled, KeyboardInterrupt):
        reporter.error("cancelled", "cancelled")
        print("dadrn-lesion: cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as exc:  # noqa: BLE001 - last line of defence: one readable line, not a traceback
        if debug:
            raise
        if _is_cuda_oom(exc):
            message = "the GPU ran out of memory even at batch size 1: use --device cpu, or close other GPU programs"
            reporter.error("cuda_oom", message)
            print(f"dadrn-lesion: error: {message}", file=sys.stderr)
            return EXIT_OOM
        message = f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (rerun with --debug for the traceback and report it)"
        reporter.error("internal", message)
        print(f"dadrn-lesion: {message}", file=sys.stderr)
        return EXIT_INTERNAL


def _cancel_on_sigterm() -> None:
    """Treat SIGTERM (how the Slicer module cancels) like Ctrl-C, so partial outputs are cleaned up."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return

    def handler(signum, frame):
        raise Cancelled("terminated")

    signal.signal(signal.SIGTERM, handler)


def _is_cuda_oom(exc: BaseException) -> bool:
    try:
        import torch

        return isinstance(exc, torch.cuda.OutOfMemoryError)
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
