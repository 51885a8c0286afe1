"""`dadrn-lesion evaluate`: the paper's tables (class-wise accuracy, overall accuracy, macro F1,
precision, recall, localization accuracy and CAM IoU per class) for a model on labelled cases.

    dadrn-lesion evaluate --weights runs/dadrn/best.safetensors --data cases.csv --split-file runs/dadrn/split.csv --out runs/dadrn/eval

Writes metrics.json, metrics.csv, slices.csv, confusion.png (and one per case group), report.txt.
"""

from __future__ import annotations

from pathlib import Path

from ..cli import add_common_options, add_precision_options, amp_choice
from ..errors import UserInputError
from .dataset import add_data_options, describe_cache, load_cache_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="classification and localization metrics of a model on labelled cases (tables, CSV/JSON, confusion matrix)",
        description="Class-wise accuracy is the recall of each class, as in the paper. Localization: pointing game "
        "(CAM peak in the lesion dilated by 2 voxels) and CAM IoU per lesion class.",
    )
    add_data_options(p)
    p.add_argument("--weights", metavar="FILE", help="checkpoint (.safetensors + .json card); default: the shipped demo model")
    p.add_argument("--split-file", type=Path, metavar="CSV", help="case_id,split list (e.g. a training run's split.csv)")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                   help="which split of --split-file to evaluate (default test; without --split-file every case is used)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cam-threshold", type=float, default=0.5)
    p.add_argument("--cam-smoothing", type=float, default=None, metavar="CELLS",
                   help="Gaussian sigma of the heatmap in cells of the model's map, as classify's (default: classify's default)")
    add_precision_options(p)
    p.add_argument("--normal-offset", type=float, metavar="B",
                   help="add B to the normal class's logit before deciding each slice's class (prior correction); "
                        "default: the model card's decision.normal_logit_offset (0 where it has none, the network's own argmax, as in the paper)")
    p.add_argument("--slice-context-mm", type=float, metavar="MM",
                   help="decide each slice with its case's neighbouring slices: the Gaussian sigma (mm along the slice axis) of "
                        "the average of their log-probabilities; default: the model card's decision.slice_context_mm (0 where "
                        "it has none: each slice alone)")
    p.add_argument("--record-in-card", metavar="NAME",
                   help="also store the figures in the model card's metrics under NAME (e.g. test); the weights and their sha256 are unchanged")
    add_common_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    import math

    from ..data import read_split
    from ..decision import MAX_ABS_OFFSET, MAX_SLICE_CONTEXT_MM, card_offset, card_slice_context
    from ..evaluate import evaluate_cache, write_report
    from ..pipeline import load_model, resolve_device
    from ..precision import autocast_dtype

    if not 0 < args.cam_threshold < 1:
        raise UserInputError(f"--cam-threshold must be between 0 and 1, not {args.cam_threshold}")
    device = resolve_device(args.device)
    loaded = load_model(args.weights, allow_untrained=False)
    from ..preprocess import CAM_SMOOTHING_CELLS, check_cam_smoothing

    smoothing = check_cam_smoothing(CAM_SMOOTHING_CELLS if args.cam_smoothing is None else args.cam_smoothing)
    offset = card_offset(loaded.card) if args.normal_offset is None else args.normal_offset
    if not math.isfinite(offset) or abs(offset) > MAX_ABS_OFFSET:
        raise UserInputError(f"--normal-offset must be finite and within ±{MAX_ABS_OFFSET:g}, not {offset}")
    context = card_slice_context(loaded.card) if args.slice_context_mm is None else args.slice_context_mm
    if not math.isfinite(context) or not 0 <= context <= MAX_SLICE_CONTEXT_MM:
        raise UserInputError(f"--slice-context-mm must be from 0 to {MAX_SLICE_CONTEXT_MM:g}, not {context}")
    spec = loaded.card.input  # the slices are prepared as the model was trained
    cache = load_cache_from_args(args, spec, args.reporter)
    ids = [c["case_id"] for c in cache.cases]
    if args.split_file is not None:
        split = read_split(args.split_file)
        if args.split != "all":
            ids = [c for c in ids if split.get(c) == args.split]
        if not ids:
            raise UserInputError(f"no case of the data is in the {args.split} split of {args.split_file}")
    idx = cache.indices_of_cases(ids)
    if idx.size == 0:
        raise UserInputError("the selected cases hold no labelled slices")
    amp = autocast_dtype(device, amp_choice(args))
    args.reporter.info(describe_cache(cache))
    result = evaluate_cache(loaded.model, cache, idx, device=device, amp_dtype=amp, batch_size=args.batch_size,
                            cam_threshold=args.cam_threshold, cam_smoothing=smoothing, normal_offset=offset, slice_context_mm=context, progress=lambda done, total: args.reporter("model", done, total))
    result.summary["evaluated_on"] = {  # what `calibrate` checks before it records an offset in a card
        "model_id": loaded.card.model_id, "weights_sha256": loaded.card.sha256,
        "split_file": str(args.split_file) if args.split_file else None, "split": args.split if args.split_file else "all",
    }
    title = f"{loaded.card.model_id} on {len(set(result.case_id.tolist()))} cases, normal-logit offset {offset:g}"
    title += f", slice context {context:g} mm" if context else ""
    write_report(result, args.out, title=title)
    if args.record_in_card:
        from ..data import liver_methods, liver_sources

        _record(args.weights, args.record_in_card, result, args, liver=" and ".join(sorted(liver_sources(cache.source))) or "unrecorded",
                methods=liver_methods(cache.source), source=cache.source)
        args.reporter.info(f"recorded the figures in the model card under metrics.{args.record_in_card}")
    if not args.quiet:
        print(result.text())
    args.reporter.done(out=str(args.out), accuracy=result.summary["all"]["classification"]["accuracy"],
                       macro_f1=result.summary["all"]["classification"]["macro_f1"])
    return 0


def describe_source(source: dict | None) -> str | None:
    """The data of a cache as a reader can rebuild it ("50 phantoms, seed 777"), where its record
    says so; None for other data, whose path then stands in."""
    if not isinstance(source, dict):
        return None
    n, seed, real = source.get("phantoms"), source.get("phantom_seed"), source.get("real")
    if isinstance(n, int) and n > 0 and seed is not None and not real:
        classes = source.get("phantom_classes")
        of, flag = (f" of {' / '.join(classes)}", f" --classes {' '.join(classes)}") if classes else ("", "")
        share = source.get("phantom_unenhanced")
        if share:
            of, flag = f"{of}, {share:g} of the normal and cyst ones unenhanced", f"{flag} --unenhanced {share:g}"
        return f"{n} phantoms{of}, seed {seed} (dadrn-lesion dataset phantoms --cases {n} --seed {seed}{flag})"
    return None


def _record(weights, name: str, result, args, liver: str = "unrecorded", methods: list | None = None,
            source: dict | None = None) -> None:
    """Write the evaluation into the card next to `weights` (the card's sha256 covers the weights only)."""
    import json

    from ..weights import DEMO_WEIGHTS, card_path_for, write_card

    card_path = card_path_for(weights if weights is not None else DEMO_WEIGHTS)
    card = json.loads(card_path.read_text())
    entry = result.card_metrics()
    entry["evaluated_on"] = {
        "data": describe_source(source) or [str(p) for p in (args.data or [])] or (str(args.cache) if args.cache else f"{args.phantoms} phantoms"),
        "split_file": str(args.split_file) if args.split_file else None,
        "split": args.split if args.split_file else "all",
        "slices": "every labelled slice" if args.normal_per_case is None else f"at most {args.normal_per_case} normal slices per case",
        "liver_masks": liver,
        "normal_logit_offset": result.normal_offset,
        "slice_context_mm": result.slice_context_mm,
        "cam_smoothing_cells": result.cam_smoothing,
    }
    if source:
        entry["evaluated_on"]["source"] = source  # how the cache was built: seeds, generator and liver-method versions
    if methods:
        entry["evaluated_on"]["liver_method"] = methods  # automatic masks: the figures hold for this method
    card.setdefault("metrics", {})[name] = entry
    write_card(card_path, card)
