"""`dadrn-lesion compare-evaluations BASELINE CANDIDATE`: whether a new model beats the one it would replace.

    dadrn-lesion evaluate --weights old.safetensors --cache C --split-file split.csv --out eval_old
    dadrn-lesion evaluate --weights new.safetensors --cache C --split-file split.csv --out eval_new
    dadrn-lesion compare-evaluations eval_old eval_new --names shipped candidate --out cmp

Prints, per scope, each figure of both models, B - A and its paired 95 % interval (patients
resampled together for both); with --out also comparison.json / .csv / .txt.
"""

from __future__ import annotations

from pathlib import Path

from ..cli import add_common_options
from ..errors import OutputExistsError, UserInputError

_FILES = ("comparison.json", "comparison.csv", "comparison.txt")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare-evaluations",
        help="two models evaluated on the same slices: differences with paired patient-resampled intervals",
        description="Reads the slices.csv of two `evaluate` runs on the same data and split, and reports each figure of "
        "both (accuracy, macro F1, class accuracy, pointing game), the difference B - A and its paired percentile "
        "interval, overall and per group / subgroup.",
    )
    p.add_argument("baseline", type=Path, metavar="A", help="evaluation folder (or its slices.csv) of the model in use")
    p.add_argument("candidate", type=Path, metavar="B", help="evaluation folder (or its slices.csv) of the model proposed")
    p.add_argument("--names", nargs=2, default=("A", "B"), metavar=("NAME_A", "NAME_B"), help="names for the report")
    p.add_argument("--out", type=Path, metavar="DIR", help="also write comparison.json, comparison.csv and comparison.txt here")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    add_common_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..paired_comparison import compare_evaluations, format_comparison, write_comparison

    if not 0 < args.level < 1:
        raise UserInputError(f"--level must lie between 0 and 1, not {args.level}")
    if args.resamples < 1:
        raise UserInputError(f"--resamples must be at least 1, not {args.resamples}")
    if args.out is not None and not args.overwrite:
        taken = [name for name in _FILES if (args.out / name).exists()]
        if taken:
            raise OutputExistsError(f"{args.out} already holds {', '.join(taken)}: choose another --out, or add --overwrite to replace them")
    result = compare_evaluations(args.baseline, args.candidate, n_resamples=args.resamples, level=args.level, names=args.names)
    if args.out is not None:  # the files first: a reader that stops early (| head) must not lose them
        write_comparison(result, args.out)
    print(format_comparison(result))
    if args.out is not None:
        args.reporter.info(f"wrote {args.out}")
    args.reporter.done(out=str(args.out) if args.out else None)
    return 0
