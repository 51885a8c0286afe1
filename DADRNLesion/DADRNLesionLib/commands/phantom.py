"""`dadrn-lesion phantom --out DIR --cases N --seed S`: synthetic arterial-phase CT with ground truth.

Writes ``DIR/<case_id>/{ct,liver,lesion}.nii.gz`` + ``meta.json`` per case and ``DIR/cases.csv``
(the list that `train`, `evaluate` and `dataset` read). With ``--real-dir``, every real scan found
there is also written once per class with lesions painted into its liver (ids ``real_*``).
"""

from __future__ import annotations

from pathlib import Path

from ..cli import add_common_options
from ..errors import UserInputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "phantom",
        help="write synthetic arterial-phase CT cases (CT, liver mask, lesion label map) for training and tests",
        description="Synthetic upper-abdominal arterial-phase CT volumes with liver and lesion ground truth, "
        "balanced over normal, cyst, FNH, HCC and hemangioma. The same seed always gives the same cases.",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--cases", type=int, default=10, metavar="N", help="number of phantom cases (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--matrix", type=int, default=256, help="in-plane matrix size, e.g. 256 or 512 (default 256)")
    p.add_argument("--slices", type=int, default=None, metavar="K",
                   help="slices per case (default: drawn so that each volume covers 150-250 mm)")
    p.add_argument("--real-dir", type=Path, default=None, metavar="PATH",
                   help="folder of real CT cases with liver labels; each is also written with inserted lesions")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that already holds files")
    add_common_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..phantom import write_cases

    if args.seed < 0:
        raise UserInputError(f"--seed must be 0 or more, not {args.seed}")
    if args.cases < 0:
        raise UserInputError(f"--cases must be 0 or more, not {args.cases}")
    if args.matrix < 64 or args.matrix > 1024:
        raise UserInputError(f"--matrix must be between 64 and 1024, not {args.matrix}")
    if args.slices is not None and args.slices < 1:
        raise UserInputError(f"--slices must be at least 1, not {args.slices}")
    if args.real_dir is not None and not args.real_dir.is_dir():
        raise UserInputError(f"--real-dir {args.real_dir} is not a folder: point it at the folder of real cases, or leave it out")
    if args.cases == 0 and args.real_dir is None:
        raise UserInputError("nothing to write: give --cases N (N > 0) or --real-dir PATH")
    reporter = getattr(args, "reporter", None)

    def progress(done: int, total: int) -> None:
        if reporter is not None:
            reporter("phantom", done, total)

    csv_path = write_cases(args.out, args.cases, args.seed, matrix=args.matrix, n_slices=args.slices,
                           real_dir=args.real_dir, overwrite=args.overwrite, progress=progress)
    with open(csv_path) as fh:
        n = max(sum(1 for _ in fh) - 1, 0)
    if reporter is not None:
        reporter.info(f"wrote {n} cases to {args.out} (list: {csv_path})")
        reporter.done(cases=n, out=str(args.out), csv=str(csv_path))
    return 0
