"""`dadrn-lesion calibrate EVAL_DIR`: choose the decision rule (normal-logit offset, slice context) on validation slices.

    dadrn-lesion evaluate --weights W --cache C --split-file S --split val --out runs/val
    dadrn-lesion calibrate runs/val --record-in-card --weights W
    dadrn-lesion evaluate --weights W --cache C --split-file S --split test --out runs/test   # now with the offset

Reads the evaluation's slices.csv (every labelled slice of its cases), undoes the offset it was
made with, and picks the offset and slice context with the best macro F1
(`decision.choose_decision`; the contexts of `--slice-context-grid`, each slice's position from the
slices.csv column axial_frame_z_mm). Writes calibration.json into EVAL_DIR; with --record-in-card
also the model card's ``decision`` (the weights and their sha256 are unchanged). An evaluation of
the test split is refused: a rule chosen on the cases it is then judged on would flatter it. So is
one made with a slice context, whose probabilities can no longer be taken slice by slice.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..cli import add_common_options
from ..errors import UserInputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="choose the decision rule (normal-logit offset, slice context) on a validation evaluation; optionally record it in the model card",
        description="The network is trained with every class drawn equally often; a study's liver slices are mostly normal. "
        "An offset added to the normal logit corrects that prior; a slice context lets each slice's neighbours in the "
        "study vote on its class. This picks both by macro F1 on the slices of an `evaluate --split val` run.",
    )
    p.add_argument("evaluation", type=Path, metavar="EVAL_DIR", help="the --out folder of `dadrn-lesion evaluate` on validation cases")
    p.add_argument("--record-in-card", action="store_true",
                   help="store the rule in the model card of --weights as decision.normal_logit_offset and decision.slice_context_mm")
    p.add_argument("--slice-context-grid", type=float, nargs="+", metavar="MM",
                   help="the slice contexts (mm) to choose from; default 0 1 2 3 4 6; 0 alone chooses the offset only")
    p.add_argument("--weights", metavar="FILE", help="the checkpoint whose card receives the offset (default: the shipped demo model)")
    add_common_options(p)
    p.set_defaults(run=run)


def _read(folder: Path):
    import numpy as np

    from ..classes import CLASS_NAMES

    slices, metrics = folder / "slices.csv", folder / "metrics.json"
    if not slices.is_file() or not metrics.is_file():
        raise UserInputError(f"{folder}: no slices.csv and metrics.json there; give the --out folder of a `dadrn-lesion evaluate` run")
    summary = json.loads(metrics.read_text())
    with open(slices, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = [f"p_{c}" for c in CLASS_NAMES]
    if not rows or not set(columns + ["label"]) <= set(rows[0]):
        raise UserInputError(f"{slices} holds no slices with probabilities: give the folder of a `dadrn-lesion evaluate` run")
    index = {c: i for i, c in enumerate(CLASS_NAMES)}
    labels = np.array([index[r["label"]] for r in rows], np.int64)
    probs = np.array([[float(r[c]) for c in columns] for r in rows], np.float64)
    if rows[0].get("axial_frame_z_mm", "") == "":  # evaluations before the slice context
        return summary, labels, probs, None, None
    z_mm = np.array([float(r["axial_frame_z_mm"]) for r in rows], np.float64)
    return summary, labels, probs, z_mm, np.array([r["case_id"] for r in rows], dtype=object)


def run(args) -> int:
    import math

    from ..decision import MAX_SLICE_CONTEXT_MM, SLICE_CONTEXT_GRID_MM, adjust_probabilities, choose_decision, decision_record
    from ..weights import DEMO_WEIGHTS, card_path_for, sha256_of, write_card

    grid = tuple(float(c) for c in (args.slice_context_grid or SLICE_CONTEXT_GRID_MM))
    if not all(math.isfinite(c) and 0 <= c <= MAX_SLICE_CONTEXT_MM for c in grid):
        raise UserInputError(f"--slice-context-grid takes millimetres from 0 to {MAX_SLICE_CONTEXT_MM:g}, not {' '.join(map(str, grid))}")
    summary, labels, probs, z_mm, cases = _read(args.evaluation)
    on = summary.get("evaluated_on") or {}
    if on.get("split") == "test":
        raise UserInputError(
            f"{args.evaluation} evaluated the test split: choose the offset on validation cases (`evaluate --split val`) and "
            "keep the test cases for judging the result")
    if float(summary.get("slice_context_mm", 0.0)) > 0:
        raise UserInputError(
            f"{args.evaluation} decided each slice with a slice context of {summary['slice_context_mm']:g} mm: evaluate the "
            "validation split again with --slice-context-mm 0 and calibrate on that")
    if z_mm is None and any(c > 0 for c in grid):
        args.reporter.info(f"{args.evaluation} has no slice positions (made before the slice context): choosing the offset only")
        grid = (0.0,)
    used = float(summary.get("normal_logit_offset", 0.0))  # evaluations before the decision rule: 0
    try:
        choice = choose_decision(labels, adjust_probabilities(probs, -used), z_mm=z_mm, groups=cases, context_grid=grid)
    except ValueError as exc:
        raise UserInputError(f"{args.evaluation}: {exc}") from None
    choice["evaluation"] = {"folder": str(args.evaluation), **on}
    (args.evaluation / "calibration.json").write_text(json.dumps(choice, indent=2) + "\n")
    best, zero = choice["chosen"], choice["at_zero"]
    print(f"normal-logit offset {choice['normal_logit_offset']:+.1f}, slice context {choice['slice_context_mm']:g} mm on "
          f"{choice['slices']} slices: accuracy "
          f"{zero['accuracy']:.3f} -> {best['accuracy']:.3f}, macro F1 {zero['macro_f1']:.3f} -> {best['macro_f1']:.3f}")
    print("recall " + ", ".join(f"{k} {zero['class_accuracy'][k]:.2f} -> {v:.2f}" for k, v in best["class_accuracy"].items() if v is not None))
    if args.record_in_card:
        weights = Path(args.weights) if args.weights else DEMO_WEIGHTS
        card_path = card_path_for(weights)
        if not weights.is_file() or not card_path.is_file():
            raise UserInputError(f"no weights {weights} with their model card {card_path.name}: give --weights the checkpoint that was evaluated")
        card = json.loads(card_path.read_text())
        sha = on.get("weights_sha256")
        if not sha or sha != card.get("sha256") or sha != sha256_of(weights):
            raise UserInputError(
                f"{args.evaluation} was not made with {weights} (its record names weights {str(sha)[:12]}…): evaluate these "
                "weights on the validation cases first")
        card["decision"] = decision_record(choice, {k: v for k, v in choice["evaluation"].items() if k != "weights_sha256"})
        write_card(card_path, card)
        args.reporter.info(f"recorded decision.normal_logit_offset = {choice['normal_logit_offset']:g} and "
                           f"decision.slice_context_mm = {choice['slice_context_mm']:g} in {card_path}")
    args.reporter.done(out=str(args.evaluation / "calibration.json"), normal_logit_offset=choice["normal_logit_offset"],
                       slice_context_mm=choice["slice_context_mm"])
    return 0
