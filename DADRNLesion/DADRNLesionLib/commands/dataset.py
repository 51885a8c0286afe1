"""`dadrn-lesion dataset phantoms|cache|split`: make a data set, prepare its slices once, split it.

    phantoms  write synthetic cases (+ real scans with painted-in lesions) as a cases.csv data set
    cache     prepare the labelled slices of a data set as a uint8 slice cache (what training reads)
    split     write the seeded train/val/test split by patient of a data set or cache

The data options (`--data`, `--phantoms`, `--cache`) are shared with `train` and `evaluate`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from ..cli import add_common_options
from ..errors import UserInputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("dataset", help="make phantom data sets, slice caches and splits for training")
    sub = p.add_subparsers(dest="dataset_command", metavar="ACTION")
    sub.required = True

    ph = sub.add_parser("phantoms", help="write synthetic cases (and real scans with painted-in lesions) as a data set")
    ph.add_argument("--out", required=True, type=Path, metavar="DIR")
    ph.add_argument("--cases", type=int, required=True, help="number of phantom cases (balanced over the five classes, or over --classes)")
    ph.add_argument("--seed", type=int, default=0)
    add_phantom_class_option(ph, "--classes")
    add_unenhanced_option(ph, "--unenhanced")
    add_real_options(ph)
    ph.add_argument("--overwrite", action="store_true")
    add_common_options(ph)
    ph.set_defaults(run=run_phantoms)

    ca = sub.add_parser("cache", help="prepare the labelled slices of a data set once (uint8, N x 3 x S x S)")
    add_data_options(ca, cache_required=True)
    ca.add_argument("--merge", nargs="+", type=Path, metavar="CACHE",
                    help="instead of preparing data: merge these caches (built with the same input options) into --cache")
    add_input_options(ca)
    add_common_options(ca)
    ca.set_defaults(run=run_cache)

    sp = sub.add_parser("split", help="write the seeded split by patient (case_id,split CSV)")
    add_data_options(sp)
    sp.add_argument("--split-seed", type=int, default=0)
    sp.add_argument("--split-fractions", type=float, nargs=3, default=(0.6, 0.2, 0.2), metavar=("TRAIN", "VAL", "TEST"))
    sp.add_argument("--out", required=True, type=Path, metavar="FILE")
    add_input_options(sp)
    add_common_options(sp)
    sp.set_defaults(run=run_split)


# -- shared options ----------------------------------------------------------------------------


def add_real_options(p) -> None:
    p.add_argument("--real-background", type=Path, metavar="DIR",
                   help="folder of real scans with liver labels (see shared/data/real/README.md) to paint lesions into")
    p.add_argument("--real-rounds", type=int, default=1, help="lesion draws per real scan and class (default 1)")
    p.add_argument("--real-holdout", nargs="*", default=[], metavar="SCAN",
                   help="real scans whose cases go to the test split only (never seen in training)")


def add_phantom_class_option(p, flag: str) -> None:
    from ..classes import CLASS_NAMES

    p.add_argument(flag, nargs="+", choices=CLASS_NAMES, default=None, metavar="CLASS",
                   help="phantoms of these classes only, in turn (a class named twice comes twice as often): "
                        "more cases of the classes a model confuses; default all five, balanced")


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share between 0 and 1 (e.g. 0.5)")
    return value


def add_unenhanced_option(p, flag: str) -> None:
    p.add_argument(flag, type=_share, default=0.0, metavar="SHARE",
                   help="make this share (0-1) of the normal and cyst phantoms without contrast (liver 38-66 HU, veins at "
                        "blood density), so that a model keeps the normal anatomy of unenhanced scans normal; default 0")


def add_data_options(p, cache_required: bool = False) -> None:
    g = p.add_argument_group("data (one of --data, --phantoms, or an existing --cache)")
    g.add_argument("--data", nargs="+", metavar="CASES",
                   help="cases CSV(s) (case_id, ct, liver, lesion, slice_labels, patient_id, group, split) or case folders")
    g.add_argument("--phantoms", type=int, metavar="N", help="generate N phantom cases in memory instead")
    g.add_argument("--phantom-seed", type=int, default=0)
    add_phantom_class_option(g, "--phantom-classes")
    add_unenhanced_option(g, "--phantom-unenhanced")
    add_real_options(g)
    g.add_argument("--cache", type=Path, metavar="DIR", required=cache_required,
                   help="slice cache folder: reused when it matches the data and input spec, else (re)built there")
    g.add_argument("--normal-per-case", type=int, default=None, metavar="N",
                   help="use at most N evenly spaced normal slices per case (default: all); `train` still tests on all slices")
    g.add_argument("--liver-source", choices=("reference", "automatic"), default=None,
                   help="mask the slices with the data's liver masks (reference, the default when building), or with the "
                        "automatic liver mask that `classify` makes (to measure, or train on, what the model sees in use; "
                        "lesions are not merged into it); with an existing --cache alone, checks that it was built so")
    g.add_argument("--min-area-mm2", type=float, default=20.0, help="slice rule: a lesion slice needs this in-slice area (default 20)")
    g.add_argument("--min-fraction", type=float, default=0.25,
                   help="slice rule: ... and this fraction of the lesion's largest cross-section (default 0.25)")


def add_input_options(p) -> None:
    g = p.add_argument_group("model input")
    g.add_argument("--input-size", type=int, default=None, help="square input side in pixels (default 224, or the --weights card's)")
    g.add_argument("--window-level", type=float, default=None, help="HU window level (default 60)")
    g.add_argument("--window-width", type=float, default=None, help="HU window width (default 400)")
    g.add_argument("--margin-mm", type=float, default=None, help="margin around the liver's crop box (default 10)")


def input_spec_from(args, base=None):
    from ..preprocess import InputSpec

    base = base or InputSpec()
    values = base.to_dict()
    for key, arg in (("size", "input_size"), ("window_level", "window_level"), ("window_width", "window_width"), ("margin_mm", "margin_mm")):
        v = getattr(args, arg, None)
        if v is not None:
            values[key] = v
    try:
        return InputSpec.from_dict(values)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None


def rule_from(args):
    from ..data import SliceRule

    if args.min_area_mm2 < 0 or not 0 <= args.min_fraction <= 1:
        raise UserInputError("--min-area-mm2 must be >= 0 and --min-fraction between 0 and 1")
    return SliceRule(args.min_area_mm2, args.min_fraction)


def _progress_printer(reporter, total: Optional[int], what: str):
    def show(done: int, case_id: str) -> None:
        reporter.emit("progress", stage=what, done=done, total=total or 0)
        if reporter.fmt == "text" and not reporter.quiet:
            tail = f"/{total}" if total else ""
            print(f"\r{what}: {done}{tail} cases ({case_id})   ", end="", file=sys.stderr, flush=True)

    return show


def load_cache_from_args(args, spec, reporter, *, thin: bool = True):
    """The slice cache the data options describe: an existing matching cache, or built (and saved
    to --cache when given). With --normal-per-case and `thin`, normal slices are thinned after
    loading (the saved cache always keeps every labelled slice)."""
    cache = _load_or_build(args, spec, reporter)
    if thin and args.normal_per_case is not None:
        cache = cache.thin_normal_slices(args.normal_per_case)
    return cache


def _liver_key(args) -> dict[str, Any]:
    """The liver source in a cache's fingerprint; absent for the reference masks, so that caches
    built before the option existed still match."""
    from .. import data as D

    source = getattr(args, "liver_source", None) or "reference"
    # the automatic masks change with the method: a cache made by an earlier one is rebuilt
    return {} if source == "reference" else {"liver": {"source": source, "method": D.liver_method_fingerprint()}}


def _load_or_build(args, spec, reporter):
    from .. import data as D

    rule = rule_from(args)
    if args.data is None and args.phantoms is None:
        if args.cache is None:
            raise UserInputError("give the data: --data CASES.csv, --phantoms N, or --cache DIR of a built cache")
        cache = D.SliceCache.load(args.cache, mmap=True)  # pages are shared between processes
        if cache.spec != spec:
            raise UserInputError(
                f"the cache {args.cache} was built for input {cache.spec.to_dict()}, not {spec.to_dict()}: "
                "rebuild it (give --data/--phantoms too) or match the input options"
            )
        wanted, held = getattr(args, "liver_source", None), D.liver_sources(cache.source)
        if wanted and held and held != {wanted}:
            raise UserInputError(
                f"the cache {args.cache} was built with {' and '.join(sorted(held))} liver masks, not {wanted} ones: "
                "give --data/--phantoms too to build one with --liver-source, or leave --liver-source out to use it as it is"
            )
        return cache
    if args.data is not None and args.phantoms is not None:
        raise UserInputError("give either --data or --phantoms, not both")
    if args.data is not None:
        records = []
        for item in args.data:
            records.extend(D.read_cases(item))
        ids = [r.case_id for r in records]
        if len(set(ids)) != len(ids):
            raise UserInputError("the --data lists repeat case ids; case ids must be unique across lists")
        source = D.source_fingerprint(data=[D.source_fingerprint(x=p)["x"] for p in args.data], **_liver_key(args))
        cases = (D.load_case(r, rule, args.liver_source or "reference") for r in records)
        total = len(records)
    else:
        source = D.source_fingerprint(
            phantoms=args.phantoms, phantom_seed=args.phantom_seed, generator=D.generator_fingerprint(),
            **({"phantom_classes": list(args.phantom_classes)} if args.phantom_classes else {}),
            **({"phantom_unenhanced": args.phantom_unenhanced} if args.phantom_unenhanced else {}),
            real=str(args.real_background) if args.real_background else None, real_rounds=args.real_rounds,
            real_holdout=sorted(args.real_holdout), **_liver_key(args),
        )
        gen = D.synthetic_cases(args.phantoms, args.phantom_seed, real_dir=args.real_background,
                                real_rounds=args.real_rounds, real_holdout=tuple(args.real_holdout),
                                classes=args.phantom_classes, unenhanced=args.phantom_unenhanced)
        cases = (D.prepare_synthetic(c, rule, args.liver_source or "reference") for c in gen)
        total = None
    if args.cache is not None and D.SliceCache.matches(args.cache, spec, rule, source):
        reporter.info(f"using the slice cache in {args.cache}")
        return D.SliceCache.load(args.cache, mmap=True)
    reporter.info("preparing slices (once; pass --cache DIR to keep them)" if args.cache is None else f"building the slice cache in {args.cache}")
    cache = D.build_cache(cases, spec, rule, source=source,
                          progress=_progress_printer(reporter, total, "preparing"))
    if reporter.fmt == "text" and not reporter.quiet:
        print(file=sys.stderr)
    if args.cache is not None:
        cache.save(args.cache)
    return cache


def describe_cache(cache, split: Optional[dict[str, str]] = None) -> str:
    from ..classes import CLASS_NAMES

    lines = [f"{len(cache.cases)} cases, {len(cache)} labelled slices ({sum(c['n_excluded'] for c in cache.cases)} excluded as ambiguous)"]
    header = f"{'':8s}" + "".join(f"{n:>8s}" for n in CLASS_NAMES) + f"{'cases':>8s}"
    lines.append(header)
    groups = {"all": [c["case_id"] for c in cache.cases]}
    if split:
        for s in ("train", "val", "test"):
            groups[s] = [c for c, v in split.items() if v == s]
    for name, ids in groups.items():
        idx = cache.indices_of_cases(ids)
        counts = cache.class_counts(idx)
        lines.append(f"{name:8s}" + "".join(f"{int(v):>8d}" for v in counts) + f"{len(ids):>8d}")
    return "\n".join(lines)


# -- actions -----------------------------------------------------------------------------------


def run_phantoms(args) -> int:
    from .. import data as D

    if args.cases < 0 or args.real_rounds < 0:
        raise UserInputError("--cases and --real-rounds must be >= 0")
    total = args.cases if args.real_background is None else None  # real scans: counted as found
    gen = D.synthetic_cases(args.cases, args.seed, real_dir=args.real_background, real_rounds=args.real_rounds,
                            real_holdout=tuple(args.real_holdout), classes=args.classes, unenhanced=args.unenhanced)
    made = {"phantoms": args.cases, "seed": args.seed, **({"classes": list(args.classes)} if args.classes else {}),
            **({"unenhanced": args.unenhanced} if args.unenhanced else {}),
            "real_background": str(args.real_background) if args.real_background else None,
            "real_rounds": args.real_rounds if args.real_background else 0, "real_holdout": list(args.real_holdout),
            "command": "dadrn-lesion dataset phantoms " + " ".join(sys.argv[3:])}
    path = D.write_dataset(args.out, gen, overwrite=args.overwrite, progress=_progress_printer(args.reporter, total, "writing"),
                           description=made)
    if not args.quiet:
        print(file=sys.stderr)
    args.reporter.info(f"wrote {path}")
    args.reporter.done(out=str(path))
    return 0


def run_cache(args) -> int:
    from .. import data as D

    spec = input_spec_from(args)
    if args.merge:
        if args.data is not None or args.phantoms is not None:
            raise UserInputError("--merge takes built caches only; leave out --data/--phantoms")
        cache = D.merge_caches([D.SliceCache.load(p, mmap=True) for p in args.merge])
        cache.save(args.cache)
    else:
        cache = load_cache_from_args(args, spec, args.reporter)
    args.reporter.info(describe_cache(cache))
    args.reporter.done(out=str(args.cache), slices=len(cache), cases=len(cache.cases))
    return 0


def run_split(args) -> int:
    from .. import data as D

    spec = input_spec_from(args)
    cache = load_cache_from_args(args, spec, args.reporter)
    split = D.split_cases(cache.cases, args.split_seed, tuple(args.split_fractions))
    D.write_split(args.out, split)
    args.reporter.info(describe_cache(cache, split))
    args.reporter.done(out=str(args.out))
    return 0


def split_from_args(args, cache) -> dict[str, str]:
    """--split-file when given, else the seeded split of the cache's cases."""
    from .. import data as D

    if getattr(args, "split_file", None) is not None:
        split = D.read_split(args.split_file)
        missing = [c["case_id"] for c in cache.cases if c["case_id"] not in split]
        if missing:
            raise UserInputError(f"{args.split_file} does not assign {len(missing)} case(s), e.g. {missing[0]}")
        return split
    return D.split_cases(cache.cases, args.split_seed, tuple(args.split_fractions))


def as_dict(obj: Any) -> Any:
    return obj.to_dict() if hasattr(obj, "to_dict") else obj
