"""`dadrn-lesion compare`: the paper's comparison tables (per-class accuracy, overall, localization).

    dadrn-lesion compare --phantoms 60 --cache runs/cmp/cache --out runs/cmp --width 0.25 --input-size 96
    dadrn-lesion compare --data cases.csv --out runs/cmp                    # full size, on a GPU
    dadrn-lesion compare --out runs/cmp --tables-only                       # tables from finished runs

Every method (DRN50, SE-ResNet50, RA-ResNet50, SADRN/CADRN/DADRN, the ROI-level model) is trained
and tested on each split seed with one budget; OUT/tables.md holds the tables next to the paper's.
Finished runs are reused, so the command can be stopped and rerun, or run once per split seed
in parallel on the same OUT (then once more with --tables-only).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ..cli import add_common_options
from ..errors import UserInputError
from .dataset import add_data_options, add_input_options, describe_cache, input_spec_from, load_cache_from_args


def add_parser(subparsers) -> None:
    from ..compare import DEFAULT_METHODS, METHODS

    p = subparsers.add_parser(
        "compare",
        help="reproduce the paper's comparison tables: every method on both patient-level splits with one budget",
        description="Data: --data CASES.csv, --phantoms N, or --cache DIR (as for `train`). Writes OUT/tables.md, "
        "tables.json, results.csv and one folder per method and split.",
    )
    add_data_options(p)
    add_input_options(p)
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="comparison folder (finished runs in it are reused)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                   help=f"methods to run, or 'all' (default: {' '.join(DEFAULT_METHODS)}; all: {' '.join(METHODS)})")
    p.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1], metavar="SEED", help="patient-level split seeds (default 0 1)")
    p.add_argument("--split-fractions", type=float, nargs=3, default=(0.6, 0.2, 0.2), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--width", type=float, default=1.0, help="channel width of every network (default 1 = the paper's; 0.25 for CPUs)")
    p.add_argument("--roi-backbone", default="resnet50", help="branch network of the ROI-level model (default resnet50)")
    p.add_argument("--roi-patch", type=int, default=64, help="side of the ROI model's lesion patch in pixels (default 64)")
    t = p.add_argument_group("budget (the same for every method)")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--samples-per-epoch", type=int, default=None,
                   help="slices drawn per epoch (default: the train fraction of all labelled slices; the same for every method and split)")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--patience", type=int, default=8, help="early stopping patience in epochs (0: off)")
    t.add_argument("--seed", type=int, default=0, help="seed of initialisation, sampling and augmentation")
    t.add_argument("--no-augment", action="store_true")
    r = p.add_argument_group("run")
    r.add_argument("--device", default="auto")
    r.add_argument("--threads", type=int, help="CPU threads (1 is often fastest for small models on a busy machine)")
    r.add_argument("--cam-threshold", type=float, default=0.5)
    r.add_argument("--cam-smoothing", type=float, default=None, metavar="CELLS",
                   help="Gaussian sigma of the heatmap in cells of the model's map, as classify's (default: classify's; 0: none, as runs before 27 November 2026)")
    r.add_argument("--tables-only", action="store_true", help="only (re)write the tables from the finished runs in --out")
    r.add_argument("--force", action="store_true", help="retrain runs that are already finished")
    add_common_options(p)
    p.set_defaults(run=run)


def _methods(names: list[str]) -> tuple[str, ...]:
    from ..compare import METHODS

    if names == ["all"]:
        return tuple(METHODS)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise UserInputError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)} or 'all'")
    return tuple(dict.fromkeys(names))


def run(args) -> int:
    from .. import compare as C
    from ..model.roi import ROIConfig
    from ..train import AugmentConfig, TrainConfig

    reporter = args.reporter
    methods = _methods(args.methods)
    # The command line, when this process is the command (not a program that called cli.main).
    argv0 = Path(sys.argv[0]) if sys.argv else Path()
    invoked = argv0.name == "dadrn-lesion" or (argv0.name == "__main__.py" and argv0.parent.name == "DADRNLesionLib")
    command = "dadrn-lesion " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if invoked else ""
    if args.tables_only:
        results = C.load_results(args.out)
        if not results:
            raise UserInputError(f"{args.out} holds no finished comparison runs: run without --tables-only first")
        path = C.write_tables(results, args.out)
        reporter.info((args.out / "tables.md").read_text())
        reporter.done(out=str(path), runs=len(results))
        return 0
    if not 0 < args.width <= 4:
        raise UserInputError(f"--width must be in (0, 4], not {args.width}")
    spec = input_spec_from(args)
    cache = load_cache_from_args(args, spec, reporter)
    samples = args.samples_per_epoch
    if samples is None:
        # The train fraction of all labelled slices: one number for every method and split, whichever
        # split seeds this process runs (a split's own count would differ from split to split).
        fractions = tuple(args.split_fractions)
        samples = max(1, round(len(cache) * fractions[0] / max(sum(fractions), 1e-9)))
    try:
        roi = ROIConfig(backbone=args.roi_backbone, patch_size=args.roi_patch)
        train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, samples_per_epoch=samples,
                                patience=args.patience, seed=args.seed, augment=None if args.no_augment else AugmentConfig())
        cfg = C.CompareConfig(methods=methods, split_seeds=tuple(args.split_seeds), split_fractions=tuple(args.split_fractions),
                              width=args.width, train=train_cfg, roi=roi, device=args.device, threads=args.threads,
                              cam_threshold=args.cam_threshold,
                              **({} if args.cam_smoothing is None else {"cam_smoothing": args.cam_smoothing}))
        for m in methods:  # unknown backbones and the like fail before any training
            C.parameter_count(C.METHODS[m], cfg.model_config(C.METHODS[m]))
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
    reporter.info(describe_cache(cache))
    reporter.info(f"comparing {', '.join(C.METHODS[m].label for m in methods)} on split seeds {', '.join(map(str, args.split_seeds))}: "
                  f"{args.epochs} epochs x {samples} slices, batch {args.batch_size}, width {args.width:g}, input {spec.size}")
    C.run_comparison(cache, cfg, args.out, log=reporter.info, force=args.force, command=command)
    # Tables over every finished run in OUT (other split seeds run by a parallel process included).
    results = [r for r in C.load_results(args.out) if r["method"] in methods]
    path = C.write_tables(results, args.out, methods)
    reporter.info((args.out / "tables.md").read_text())
    reporter.done(out=str(path), runs=len(results))
    return 0
