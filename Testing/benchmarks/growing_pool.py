"""What growing training data costs the training loop (`train --grow-from`).

    python Testing/benchmarks/growing_pool.py [--size 224] [--parts 40] [--slices 400] [--batch 128]

Two costs fall on the training process, which on a GPU machine also feeds the GPU:
1. taking in a finished set at an epoch's start: reading its cache and thinning its normal slices
   (a real set written by `dataset cache --phantoms 10`, timed from disk after a first read);
2. gathering a batch from a pool of many parts instead of one array.
It prints both, against one merged array of the same slices, measured in one run. No GPU needed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "DADRNLesion"))

from DADRNLesionLib import data as D  # noqa: E402
from DADRNLesionLib.growing import GrowSource, TrainingPool, load_grown  # noqa: E402
from DADRNLesionLib.preprocess import InputSpec  # noqa: E402


def _part(n: int, size: int, prefix: str, rng: np.random.Generator) -> D.SliceCache:
    labels = rng.integers(0, 5, n)
    case = np.arange(n) // 40
    cases = [{"case_id": f"{prefix}_{c}", "patient_id": f"{prefix}_{c}", "group": "bench", "split": "", "case_class": "normal",
              "box": [0, size, 0, size], "n_slices": 40, "n_excluded": 0, "spacing": [1.0, 1.0, 1.0]} for c in range(case.max() + 1)]
    return D.SliceCache(spec=InputSpec(size=size), rule=D.SliceRule(), images=rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8),
                        labels=labels, case=case, slice_index=np.arange(n) % 40, input_slice_index=np.arange(n) % 40,
                        cases=cases, masks={}, source={"bench": prefix})


def _timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--parts", type=int, default=40, help="grown sets in the pool")
    ap.add_argument("--slices", type=int, default=400, help="slices per set")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--phantoms", type=int, default=10, help="cases of the real set made for cost 1")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        from DADRNLesionLib.data import build_cache, prepare_synthetic, synthetic_cases

        t = time.perf_counter()
        spec = InputSpec(size=args.size)
        built = build_cache((prepare_synthetic(c) for c in synthetic_cases(args.phantoms, 4242)), spec,
                            source={"phantoms": args.phantoms, "phantom_seed": 4242})
        made = time.perf_counter() - t
        built.save(folder / "p4242")
        mb = sum(f.stat().st_size for f in (folder / "p4242").iterdir()) / 2**20
        base = _part(40, args.size, "start", rng)
        source = GrowSource(folder, normal_per_case=12)

        def take_in() -> None:
            accepted, _ = load_grown(source, ["p4242"], base, {c["case_id"] for c in base.cases}, lambda m: None)
            assert accepted

        take_in()  # first read: into the page cache, as a set just written is
        took = _timed(take_in, 3)
        kept = load_grown(source, ["p4242"], base, set(), lambda m: None)[0][0][1]
        print(f"1. a set of {args.phantoms} phantoms at {args.size} px: {len(built)} slices, {mb:.0f} MB on disk, made in {made:.1f} s "
              f"on this machine; taken in (read + thinned to {len(kept)} slices) in {took * 1000:.0f} ms")

    parts = [_part(args.slices, args.size, f"g{p}", rng) for p in range(args.parts)]
    pool = TrainingPool(parts[0], np.arange(args.slices))
    for p in parts[1:]:
        pool.add(p)
    merged = D.merge_caches(parts)
    draws = [rng.integers(0, len(pool), args.batch) for _ in range(50)]

    def from_pool() -> None:
        for idx in draws:
            pool.read_images(idx)

    def from_array() -> None:
        for idx in draws:
            merged.read_images(idx)

    for idx in draws[:3]:
        assert np.array_equal(pool.read_images(idx), merged.images[idx])
    t_pool = _timed(from_pool, 3) / len(draws)
    t_array = _timed(from_array, 3) / len(draws)
    print(f"2. a batch of {args.batch} from {len(pool)} slices in {args.parts} parts: {t_pool * 1000:.1f} ms; "
          f"from one array: {t_array * 1000:.1f} ms; ratio {t_pool / t_array:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
