"""Which lesion slices a model misses, by how visible the lesion is on them.

    python Testing/benchmarks/lesion_visibility.py EVAL_DIR [--out slices_visibility.csv]

EVAL_DIR is the output of `dadrn-lesion evaluate` on generated phantoms (`--phantoms N
--phantom-seed S`, or a merged cache of such sets). Every phantom case in its `slices.csv`
(`phantom_s<seed>_<index>`) is generated again from its seed, once, with the generator's noise
field recorded and kept out of the image: that gives the noise-free slice and the scan's own
noise apart, and every other draw of the generator stays as it was. For each lesion slice it prints
the matched-filter SNR (`DADRNLesionLib.visibility`), and per lesion class the share of slices
called right in bins of that SNR, and the slices missed although clearly visible (SNR >= 20), by
case and by what they were called. Cases whose lesions were painted into real scans are left out:
their noise cannot be told from their anatomy.

What it answers: whether the misses are lesions at the edge of visibility, which bound what any
model can score on this set, or visible lesions the model has not learned.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "DADRNLesion"))

from DADRNLesionLib import phantom  # noqa: E402
from DADRNLesionLib.visibility import lesion_slice_visibility  # noqa: E402

BINS = (0.0, 5.0, 10.0, 20.0, 40.0, float("inf"))
CASE_ID = re.compile(r"^phantom_s(\d+)_(\d+)$")


@contextmanager
def noise_recorded_not_added(store: list):
    """The generator with its noise field drawn as usual (so later draws are unchanged) but
    handed to `store` instead of being added to the image."""
    draw = phantom._noise_field

    def record(rng, shape, fc, sigma_z):
        store.append(draw(rng, shape, fc, sigma_z))
        return np.zeros(shape, np.float32)

    phantom._noise_field = record
    try:
        yield
    finally:
        phantom._noise_field = draw


def regenerate(case_id: str):
    """The phantom of `case_id` noise-free, and its noise in HU."""
    seed, index = (int(x) for x in CASE_ID.match(case_id).groups())
    _, case_seed, cls = phantom.case_plan(index + 1, seed)[index]
    fields: list = []
    with noise_recorded_not_added(fields):
        case = phantom.generate_case(case_seed, cls)
    noise = np.float32(case.meta["noise_hu"]) * fields[0] if fields else np.zeros(case.ct.array.shape, np.float32)
    return case, noise


def measure(eval_dir: Path) -> tuple[list, int]:
    rows = list(csv.DictReader(open(eval_dir / "slices.csv", newline="")))
    by_case = defaultdict(list)
    skipped = set()
    for r in rows:
        if r["label"] == "normal":
            continue
        if CASE_ID.match(r["case_id"]):
            by_case[r["case_id"]].append(r)
        else:
            skipped.add(r["case_id"])
    out = []
    for n, (case_id, case_rows) in enumerate(sorted(by_case.items()), 1):
        case, noise = regenerate(case_id)
        clean = case.ct.array.astype(np.float32)
        lesion, liver = case.lesion.array > 0, case.liver.array > 0
        spacing = case.ct.spacing[:2]
        hard = " ".join(sorted({reason for les in case.meta["lesions"] for reason in les["hard_reasons"]}))
        for r in case_rows:
            k = int(r["slice_index"])
            v = lesion_slice_visibility(clean[k], noise[k], lesion[k], liver[k], spacing)
            if v is not None:
                out.append({**{key: r[key] for key in ("case_id", "slice_index", "label", "predicted", "pointing_hit")}, **v,
                            "case_hard_draws": hard})
        if sys.stderr.isatty():
            print(f"\r{n}/{len(by_case)} cases", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return out, len(skipped)


def report(slices: list) -> None:
    names = [f"{lo:g}-{hi:g}" if hi != float("inf") else f">={lo:g}" for lo, hi in zip(BINS[:-1], BINS[1:])]
    print("slices called their class, by matched-filter SNR of the lesion on the slice")
    print(f"{'class':6} {'slices':>6} {'recall':>6} {'point':>6}  " + "  ".join(f"{n:>9}" for n in names)
          + "   median SNR (of the mean contrast)")
    for cls in sorted({s["label"] for s in slices}):
        mine = [s for s in slices if s["label"] == cls]
        snr = np.array([s["snr"] for s in mine])
        right = np.array([s["predicted"] == cls for s in mine])
        hit = np.array([s["pointing_hit"] in ("1", "1.0", "True") for s in mine])
        cells = []
        for lo, hi in zip(BINS[:-1], BINS[1:]):
            m = (snr >= lo) & (snr < hi)
            cells.append(f"{int(right[m].sum())}/{int(m.sum())}")
        flat = np.median([s["snr_of_mean_contrast"] for s in mine])
        print(f"{cls:6} {len(mine):6d} {right.mean():6.2f} {hit.mean():6.2f}  " + "  ".join(f"{c:>9}" for c in cells)
              + f"   {np.median(snr):5.1f} ({flat:.1f})")
    print("\nmissed although SNR >= 20 (called / cases, with the generator's deliberately hard draws of the case)")
    for cls in sorted({s["label"] for s in slices}):
        missed = [s for s in slices if s["label"] == cls and s["snr"] >= 20 and s["predicted"] != cls]
        called = ", ".join(f"{k} {v}" for k, v in Counter(s["predicted"] for s in missed).most_common())
        hard = {s["case_id"]: s["case_hard_draws"] for s in missed}
        cases = ", ".join(f"{k} {v}" + (f" ({hard[k]})" if hard[k] else "") for k, v in Counter(s["case_id"] for s in missed).most_common())
        print(f"{cls:6} {len(missed):4d}  called: {called or '-'}  cases: {cases or '-'}")
    print("\nshare of lesion slices below SNR 10: " + ", ".join(
        f"{cls} {np.mean([s['snr'] < 10 for s in slices if s['label'] == cls]):.2f}" for cls in sorted({s["label"] for s in slices})))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("evaluation", type=Path, help="an evaluate output folder (slices.csv) of generated phantoms")
    ap.add_argument("--out", type=Path, help="write every lesion slice's visibility and outcome to this CSV")
    args = ap.parse_args(argv)
    if not (args.evaluation / "slices.csv").is_file():
        ap.error(f"{args.evaluation} holds no slices.csv; give the folder `dadrn-lesion evaluate --out` wrote")
    slices, skipped = measure(args.evaluation)
    if not slices:
        ap.error("no lesion slice of a generated phantom (case id phantom_s<seed>_<index>) in that evaluation")
    if skipped:
        print(f"left out {skipped} cases that are not generated phantoms (painted into real scans)")
    report(slices)
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(slices[0]))
            w.writeheader()
            w.writerows(slices)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
