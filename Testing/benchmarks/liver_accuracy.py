"""Liver segmentation accuracy: Dice and HD95 per case on the real cases and the phantom test set.

    python Testing/benchmarks/liver_accuracy.py [--real-only | --phantom-only] [--sensitivity
        [--sensitivity-of NAME ...]] [--lesion-set N] [--param NAME=VALUE ...]

`--lesion-set N` adds the first N phantoms drawn as the training data are (`phantom.generate_cases`,
seed 777: several lesions, hard draws at the surface and beside vessels) and reports how much of
their lesions the mask holds: the classifier sees only what is inside the mask, so a lesion left out
is a lesion missed, however small its share of the liver's Dice. `--param` runs with other
`LiverParams` values, to try a change on all of it.

The real cases' reference for ts_contrast_dicom and ts_native_sm is a TotalSegmentator prediction
(liver label 5), not a manual segmentation; dcmqi_ct3slice's liver_seg.nrrd is a manual label.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "DADRNLesion"))

from DADRNLesionLib.liver import LiverParams, segment_liver  # noqa: E402
from DADRNLesionLib.liver_check import dice, surface_distance_hd95  # noqa: E402
from DADRNLesionLib.volume import Volume  # noqa: E402

REAL = REPO.parent / "shared" / "data" / "real"


@dataclass
class Case:
    name: str
    ct: Volume
    ref: np.ndarray  # bool [k,j,i] on ct's grid
    reference: str  # where the reference comes from
    lesion: np.ndarray | None = None  # bool [k,j,i]: lesion voxels, which belong to the liver mask


def _sitk_read(path: Path):
    import SimpleITK as sitk

    if path.is_dir():
        r = sitk.ImageSeriesReader()
        r.SetFileNames(r.GetGDCMSeriesFileNames(str(path)))
        return r.Execute()
    return sitk.ReadImage(str(path))


def _to_volume(img) -> Volume:
    import SimpleITK as sitk

    return Volume(
        array=sitk.GetArrayFromImage(img),
        spacing=img.GetSpacing(),
        origin=img.GetOrigin(),
        direction=np.array(img.GetDirection()).reshape(3, 3),
    )


def read_ct(path: Path) -> Volume:
    try:
        from DADRNLesionLib.io import read_volume  # type: ignore

        return read_volume(path)
    except ImportError:
        return _to_volume(_sitk_read(path))


def _label_on(ct_img, label_path: Path, value: int | None) -> np.ndarray:
    import SimpleITK as sitk

    lab = sitk.Resample(_sitk_read(label_path), ct_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    a = sitk.GetArrayFromImage(lab)
    return (a == value) if value is not None else (a > 0)


def real_cases(root: Path = REAL) -> list[Case]:
    """The three real cases with their liver reference resampled (nearest) onto the CT grid."""
    specs = [
        ("ts_contrast_dicom", "dicom", "totalsegmentator_fast_labels.nii.gz", 5, "TotalSegmentator --fast prediction"),
        ("ts_native_sm", "ct.nii.gz", "totalsegmentator_labels.nii.gz", 5, "TotalSegmentator prediction"),
        ("dcmqi_ct3slice", "dicom", "liver_seg.nrrd", None, "manual label (dcmqi)"),
    ]
    out = []
    for name, ct_rel, lab_rel, value, ref in specs:
        folder = root / name
        if not folder.exists():
            continue
        img = _sitk_read(folder / ct_rel)
        ct = read_ct(folder / ct_rel)
        out.append(Case(name, ct, _label_on(img, folder / lab_rel, value), ref))
    return out


def phantom_cases(seeds=range(1000, 1010), matrix: int = 256) -> list[Case]:
    from DADRNLesionLib import phantom  # type: ignore
    from DADRNLesionLib.classes import CLASS_NAMES

    out = []
    for n, seed in enumerate(seeds):
        cls = CLASS_NAMES[n % len(CLASS_NAMES)]
        pc = phantom.generate_case(seed, lesion_class=cls, matrix=matrix)
        out.append(Case(f"phantom_{seed}_{cls}", pc.ct, np.asarray(pc.liver.array) > 0, "phantom ground truth",
                        np.asarray(pc.lesion.array) > 0))
    return out


def lesion_set(n: int, seed: int = 777) -> list[Case]:
    """The first n phantoms of `generate_cases(n, seed)`: the mix the model is trained and tested on."""
    from DADRNLesionLib import phantom  # type: ignore

    return [Case(pc.case_id, pc.ct, np.asarray(pc.liver.array) > 0, "phantom ground truth", np.asarray(pc.lesion.array) > 0)
            for pc in phantom.generate_cases(n, seed)]


def evaluate(case: Case, params: LiverParams | None = None) -> dict:
    t = time.perf_counter()
    try:
        m = segment_liver(case.ct, params=params).array > 0
        err = ""
    except Exception as exc:  # a failure is a row in the table, not a crash of the benchmark
        m = np.zeros(case.ct.shape, bool)
        err = f"{type(exc).__name__}: {exc}"
    dt = time.perf_counter() - t
    sp = case.ct.spacing[::-1]
    return {
        "case": case.name,
        "dice": dice(m, case.ref),
        "hd95": surface_distance_hd95(m, case.ref, sp) if m.any() else float("inf"),
        "ml": float(m.sum() * case.ct.voxel_volume_ml),
        "ref_ml": float(case.ref.sum() * case.ct.voxel_volume_ml),
        "seconds": dt,
        "lesion_in_mask": float(m[case.lesion].mean()) if case.lesion is not None and case.lesion.any() else None,
        "reference": case.reference,
        "error": err,
        "mask": m,
    }


def print_table(rows, title):
    print(f"\n{title}")
    print("| case | Dice | HD95 (mm) | volume (ml) | reference volume (ml) | lesion in mask | time (s) | reference |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        held = "-" if r["lesion_in_mask"] is None else f"{r['lesion_in_mask']:.2f}"
        print(
            f"| {r['case']} | {r['dice']:.3f} | {r['hd95']:.1f} | {r['ml']:.0f} | {r['ref_ml']:.0f} | {held} | "
            f"{r['seconds']:.2f} | {r['reference']}{' — ' + r['error'] if r['error'] else ''} |"
        )


def lesion_summary(rows) -> str:
    held = [r["lesion_in_mask"] for r in rows if r["lesion_in_mask"] is not None]
    if not held:
        return "no lesions"
    h = np.array(held)
    return (f"lesion voxels in the mask: mean {h.mean():.3f} over {h.size} cases with lesions; "
            f"cases below 0.9: {int((h < 0.9).sum())}, below 0.5: {int((h < 0.5).sum())}")


SENSITIVITY = {
    "grid_mm": (2.0, 3.0),
    "smooth_mm": (1.0, 3.0),
    "band_k": (2.0, 3.0),
    "min_band_hu": (12.0, 24.0),
    "wall_mm": (15.0, 25.0),
    "open_mm": (6.0, 10.0),
    "close_mm": (8.0, 16.0),
    "field_mm": (20.0, 45.0),
    "max_area_jump": (1.3, 2.0),
    "spine_mm": (30.0, 50.0),
    "edge_mm": (6.0, 12.0),
    "partial_mm": (0.0, 2.5),
    "partial_muscle_k": (0.0, 1.5, 4.0),
    "air_behind_wall": (False,),
    "passing_mm": (0.0, 25.0),
    "passing_radius_mm": (5.0, 8.0),
    "passing_part_mm": (8.0, 16.0),
    "passing_neck": (0.6, 0.9),
    "passing_room": (0.0, 0.5),
    "passing_tube": (1.5, 3.0),
    "passing_rim_mm": (0.0, 9.0),
    "surface_mm": (0.0, 40.0),
    "surface_contact": (0.35, 0.55),
    "surface_radius_mm": (3.5, 7.0),
    "surface_below": (0.0, 0.5),
}


def sensitivity(cases: list[Case], base: LiverParams, names_only=None):
    ref = {c.name: evaluate(c, base)["dice"] for c in cases}
    names = [c.name for c in cases]
    print("\nParameter sensitivity: Dice change vs the defaults (mean over cases; worst case in brackets)")
    print("| parameter | default | value | mean ΔDice | worst ΔDice (case) |")
    print("|---|---|---|---|---|")
    for pname, values in SENSITIVITY.items():
        if names_only and pname not in names_only:
            continue
        for val in values:
            p = replace(base, **{pname: val})
            d = [evaluate(c, p)["dice"] - ref[c.name] for c in cases]
            w = int(np.argmin(d))
            print(f"| {pname} | {getattr(base, pname)} | {val} | {np.mean(d):+.3f} | {d[w]:+.3f} ({names[w]}) |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real-only", action="store_true")
    ap.add_argument("--phantom-only", action="store_true")
    ap.add_argument("--sensitivity", action="store_true", help="also vary each parameter and report Dice change")
    ap.add_argument("--sensitivity-of", nargs="*", default=None, metavar="NAME",
                    help="with --sensitivity: vary only these parameters")
    ap.add_argument("--phantoms", type=int, default=10)
    ap.add_argument("--lesion-set", type=int, default=0, metavar="N", help="also the first N training-like phantoms (seed 777)")
    ap.add_argument("--param", nargs="*", default=[], metavar="NAME=VALUE", help="LiverParams values other than the defaults")
    a = ap.parse_args(argv)
    unknown = [n for n in a.sensitivity_of or [] if n not in SENSITIVITY]  # before hours of work, not after
    if unknown:
        ap.error(f"--sensitivity-of: no sensitivity values for {', '.join(unknown)} (known: {', '.join(SENSITIVITY)})")
    params = LiverParams()
    for item in a.param:
        name, _, value = item.partition("=")
        if name not in LiverParams.__dataclass_fields__:
            ap.error(f"--param {item}: LiverParams has no field {name!r}")
        params = replace(params, **{name: type(getattr(params, name))(value) if not isinstance(getattr(params, name), bool) else value == "1"})
    if a.param:
        print("parameters:", ", ".join(a.param))
    real, ph = [], []
    if not a.phantom_only:
        real = real_cases()
        if not real:
            print(f"(real cases not found at {REAL})")
        else:
            rows = [evaluate(c, params) for c in real]
            print_table(rows, "Real CT (ts_* references are TotalSegmentator predictions, not manual labels)")
    if not a.real_only:
        try:
            ph = phantom_cases(range(1000, 1000 + a.phantoms))
        except ImportError as exc:
            print(f"(phantom generator not available: {exc})")
        if ph:
            rows = [evaluate(c, params) for c in ph]
            print_table(rows, f"Phantom test set (seeds 1000..{999 + a.phantoms}, ground truth liver)")
            print(f"phantom mean Dice {np.mean([r['dice'] for r in rows]):.3f}, min {min(r['dice'] for r in rows):.3f}")
            print(lesion_summary(rows))
        if a.lesion_set:
            rows = [evaluate(c, params) for c in lesion_set(a.lesion_set)]
            print_table(rows, f"Training-like phantoms (generate_cases({a.lesion_set}, 777))")
            print(f"mean Dice {np.mean([r['dice'] for r in rows]):.3f}, min {min(r['dice'] for r in rows):.3f}")
            print(lesion_summary(rows))
    if a.sensitivity:
        sensitivity(real + ph, params, a.sensitivity_of)
    return 0


if __name__ == "__main__":
    sys.exit(main())
