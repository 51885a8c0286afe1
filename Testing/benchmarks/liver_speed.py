"""Liver segmentation speed on a 512x512x100 CT volume.

    python Testing/benchmarks/liver_speed.py [--repeat 3] [--source phantom|real] [--versus NAME=VALUE ...]

The volume is a synthetic arterial-phase phantom at 512x512x100 (0.8 mm pixels, 2.5 mm slices) or,
with --source real, the real contrast case tiled along z to 100 slices. Prints the median wall
time of `segment_liver` (reading the file is not included) and the machine's CPU count. The target
is under 10 s on 2 CPU cores. `--versus partial_mm=0 passing_mm=0` also times the method with those
`LiverParams` changed, alternating with the defaults run by run, so both see the same load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "DADRNLesion"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from DADRNLesionLib.liver import LiverParams, segment_liver  # noqa: E402
from DADRNLesionLib.volume import Volume  # noqa: E402


def phantom_volume() -> Volume:
    from DADRNLesionLib.phantom import generate_case

    return generate_case(7, "hcc", matrix=512, n_slices=100, spacing=(0.8, 0.8, 2.5)).ct


def real_volume() -> Volume:
    from liver_accuracy import real_cases

    ct = next(c.ct for c in real_cases() if c.name == "ts_contrast_dicom")
    reps = int(np.ceil(100 / ct.shape[0]))
    arr = np.concatenate([ct.array if r % 2 == 0 else ct.array[::-1] for r in range(reps)], axis=0)[:100]
    return Volume(arr, ct.spacing, ct.origin, ct.direction)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--source", choices=("phantom", "real"), default="phantom")
    ap.add_argument("--versus", nargs="+", metavar="NAME=VALUE", default=[],
                    help="also time these LiverParams changes, alternating with the defaults")
    a = ap.parse_args(argv)
    vol = phantom_volume() if a.source == "phantom" else real_volume()
    variants = {"defaults": LiverParams()}
    if a.versus:
        changes = {k: float(v) for k, v in (item.split("=", 1) for item in a.versus)}
        variants[" ".join(a.versus)] = replace(LiverParams(), **changes)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(a.repeat):
        for name, params in variants.items():
            t = time.perf_counter()
            m = segment_liver(vol, params=params)
            times[name].append(time.perf_counter() - t)
            if name == "defaults":
                ml = float(m.array.sum() * vol.voxel_volume_ml)
    for name, ts in times.items():
        print(
            f"segment_liver ({name}) on {a.source} {vol.size_ijk[0]}x{vol.size_ijk[1]}x{vol.size_ijk[2]} "
            f"(spacing {', '.join(f'{s:.2f}' for s in vol.spacing)} mm): median {statistics.median(ts):.2f} s "
            f"(runs {', '.join(f'{t:.2f}' for t in ts)})"
        )
    print(f"liver {ml:.0f} ml, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
