"""Is a new model better than the one it would replace? Two evaluations of the same slices, compared.

Two separate intervals that overlap do not say that two models are alike: both models meet the
same easy and hard patients, and that shared spread cancels in their difference. So the comparison
reads the two `evaluate` runs' ``slices.csv``, checks that they scored exactly the same slices with
the same labels, and reports for every scope `evaluate` reports (`metrics.report_scopes`) each figure of
both models, the difference B - A and its paired patient-resampled interval
(`bootstrap.paired_bootstrap`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, NamedTuple, Sequence, Union

import numpy as np

from .bootstrap import paired_bootstrap
from .classes import CLASS_NAMES, LESION_CLASSES
from .errors import UserInputError
from .metrics import report_scopes

__all__ = ["SliceTable", "read_slices", "compare_evaluations", "format_comparison", "write_comparison"]

PathLike = Union[str, Path]


class SliceTable(NamedTuple):
    """One evaluation's slices.csv, as arrays in the file's order."""

    source: Path
    key: np.ndarray  # (N,) "case_id#axial_frame_slice_index"
    patient: np.ndarray  # (N,) str
    group: np.ndarray  # (N,) str
    subgroup: np.ndarray  # (N,) str, "" where none
    labels: np.ndarray  # (N,) class index
    predicted: np.ndarray  # (N,) class index
    hit: np.ndarray  # (N,) pointing hit, False where not scored
    scored: np.ndarray  # (N,) lesion slices whose localization is scored
    patient_from_case: bool  # an older slices.csv without patient_id: each case its own patient


def _slices_path(path: PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "slices.csv"
    if not p.is_file():
        raise UserInputError(f"{path}: no slices.csv there; give the --out folder of a `dadrn-lesion evaluate` run or its slices.csv")
    return p


def read_slices(path: PathLike) -> SliceTable:
    """Read an evaluation's slices.csv (or the folder holding it)."""
    p = _slices_path(path)
    with open(p, newline="") as fh:
        rows = list(csv.DictReader(fh))
    need = {"case_id", "axial_frame_slice_index", "label", "predicted", "pointing_hit"}
    if not rows:
        raise UserInputError(f"{p} holds no slices: give the slices.csv of an `evaluate` run that scored some")
    if not need <= set(rows[0]):
        raise UserInputError(f"{p}: not an evaluation's slices.csv (missing columns: {', '.join(sorted(need - set(rows[0])))})")
    index = {c: i for i, c in enumerate(CLASS_NAMES)}
    try:
        labels = np.array([index[r["label"]] for r in rows], np.int64)
        predicted = np.array([index[r["predicted"]] for r in rows], np.int64)
    except KeyError as exc:
        raise UserInputError(f"{p}: unknown class {exc.args[0]!r}; the classes are {', '.join(CLASS_NAMES)}") from None
    with_patient = "patient_id" in rows[0]
    return SliceTable(
        source=p,
        key=np.array([f"{r['case_id']}#{r['axial_frame_slice_index']}" for r in rows], dtype=object),
        patient=np.array([(r["patient_id"] if with_patient else "") or r["case_id"] for r in rows], dtype=object),
        group=np.array([r.get("group", "") for r in rows], dtype=object),
        subgroup=np.array([r.get("subgroup", "") for r in rows], dtype=object),
        labels=labels,
        predicted=predicted,
        hit=np.array([r["pointing_hit"] == "1" for r in rows], bool),
        scored=np.array([r["pointing_hit"] != "" for r in rows], bool),
        patient_from_case=not with_patient,
    )


def _aligned(a: SliceTable, b: SliceTable) -> np.ndarray:
    """Indices that put B's rows in A's order, after checking that both scored the same slices."""
    if len(set(a.key.tolist())) != a.key.size or len(set(b.key.tolist())) != b.key.size:
        raise UserInputError("a slices.csv lists a slice twice: compare evaluations written by `dadrn-lesion evaluate`")
    only_a = set(a.key.tolist()) - set(b.key.tolist())
    only_b = set(b.key.tolist()) - set(a.key.tolist())
    if only_a or only_b:
        example = sorted(only_a or only_b)[0].replace("#", ", slice ")
        raise UserInputError(
            f"the two evaluations did not score the same slices ({len(only_a)} only in {a.source}, {len(only_b)} only in "
            f"{b.source}; e.g. {example}): evaluate both models with the same --data/--cache, --split-file and --split")
    where = {k: i for i, k in enumerate(b.key.tolist())}
    order = np.array([where[k] for k in a.key.tolist()], np.int64)
    differ = np.flatnonzero((a.labels != b.labels[order]) | (a.scored != b.scored[order]))
    if differ.size:
        raise UserInputError(
            f"{differ.size} slices carry different labels or lesion outlines in the two evaluations (e.g. "
            f"{a.key[differ[0]].replace('#', ', slice ')}): they were evaluated on different versions of the data")
    return order


def compare_evaluations(baseline: PathLike, candidate: PathLike, *, n_resamples: int = 2000, level: float = 0.95,
                        seed: int = 0, names: Sequence[str] = ("A", "B")) -> dict[str, Any]:
    """Candidate (B) against baseline (A) on every scope of their shared slices."""
    a, b = read_slices(baseline), read_slices(candidate)
    order = _aligned(a, b)
    pb, hit_b = b.predicted[order], b.hit[order]

    def scope(sel: np.ndarray) -> dict[str, Any]:
        out = paired_bootstrap(a.patient[sel], a.labels[sel], a.predicted[sel], pb[sel], a.hit[sel], hit_b[sel],
                               a.scored[sel], n_resamples=n_resamples, level=level, seed=seed)
        out["cases"] = int(len(set(k.split("#")[0] for k in a.key[sel].tolist())))
        return out

    scopes: dict[str, Any] = {"all": scope(np.ones(a.key.size, bool))}
    scopes.update({name: scope(sel) for name, sel in report_scopes(a.group, a.subgroup).items()})
    notes = []
    if a.patient_from_case:
        notes.append(f"{a.source} has no patient_id column (written before it was added): each case is taken as its own patient")
    return {"a": {"name": names[0], "slices_csv": str(a.source)}, "b": {"name": names[1], "slices_csv": str(b.source)},
            "difference": "B - A", "scopes": scopes, "notes": notes}


def _rows(result: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(scope, class, metric, figure) for every figure, in report order."""
    rows = []
    for name, s in result["scopes"].items():
        rows.append((name, "all", "accuracy", s["accuracy"]))
        rows.append((name, "all", "macro_f1", s["macro_f1"]))
        rows += [(name, c, "class_accuracy", s["class_accuracy"][c]) for c in CLASS_NAMES]
        rows += [(name, c, "pointing", s["pointing"][c]) for c in LESION_CLASSES]
    return rows


def _num(v: Any, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def format_comparison(result: dict[str, Any]) -> str:
    """A table per scope: both figures, B - A with its interval, and which model the interval favours."""
    na, nb = result["a"]["name"], result["b"]["name"]
    verdict = {1: f"{nb} higher", -1: f"{na} higher", 0: "no clear difference"}
    lines = [f"A = {na} ({result['a']['slices_csv']})", f"B = {nb} ({result['b']['slices_csv']})"]
    current = None
    for name, cls, metric, f in _rows(result):
        if name != current:
            s = result["scopes"][name]
            lines += ["", f"== {name} ({s['cases']} cases, {s['patients']} patients, {s['slices']} slices) ==",
                      f"{'figure':<24}{'A':>8}{'B':>8}{'B - A':>9}  {100 * s['level']:.0f}% interval (paired)"]
            current = name
        label = metric if cls == "all" else f"{metric} {cls}"
        span = "-" if f["interval"] is None else f"{f['interval'][0]:+.3f} to {f['interval'][1]:+.3f}"
        lines.append(f"{label:<24}{_num(f['a']):>8}{_num(f['b']):>8}{_num(f['difference'], True):>9}  {span:<18} "
                     f"{verdict[f['sign']] if f['interval'] is not None else ''}".rstrip())
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def write_comparison(result: dict[str, Any], out_dir: PathLike) -> Path:
    """comparison.json, comparison.csv (scope, class, metric, a, b, difference, ci_low, ci_high, sign), comparison.txt."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out / "comparison.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["scope", "class", "metric", "a", "b", "difference", "ci_low", "ci_high", "sign"])
        for name, cls, metric, f in _rows(result):
            ci = f["interval"] or ["", ""]
            w.writerow([name, cls, metric, *("" if v is None or v == "" else f"{v:.6g}" for v in (f["a"], f["b"], f["difference"], *ci)),
                        f["sign"]])
    (out / "comparison.txt").write_text(format_comparison(result) + "\n")
    return out
