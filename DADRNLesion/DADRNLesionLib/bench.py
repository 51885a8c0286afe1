"""`dadrn-lesion bench`: throughput of forward, head-only Grad-CAM and naive Grad-CAM, end-to-end
classify time by stage, and peak memory, measured in one run so that ratios are comparable.

Run as ``dadrn-lesion bench`` or ``python -m DADRNLesionLib.bench``. Figures are measurements of
this machine at this moment: compare the ratios, not absolute times across machines.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from . import __version__
from .cam import GradCAM, naive_grad_cam
from .precision import autocast_dtype, uses_channels_last
from .weights import DEMO_WEIGHTS, LoadedModel, load_checkpoint, random_model

__all__ = ["measure_throughput", "measure_interleaved", "benchmark_model", "end_to_end", "run_benchmark", "main", "add_parser"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(step: Callable[[], Any], batch: int, device: torch.device, *, min_time: float = 2.0,
                       min_iters: int = 2, warmup: int = 1, max_iters: int = 1000) -> dict[str, float]:
    """Slices per second of `step` (one batch per call): median of per-call rates after warm-up."""
    return measure_interleaved({"step": step}, batch, device, min_time=min_time, min_iters=min_iters, warmup=warmup,
                               max_iters=max_iters)["step"]


def measure_interleaved(steps: dict[str, Callable[[], Any]], batch: int, device: torch.device, *, min_time: float = 2.0,
                        min_iters: int = 2, warmup: int = 1, max_iters: int = 1000) -> dict[str, dict[str, float]]:
    """Time several steps in alternation (A B C A B C ...) so that a load that drifts during the run
    (other jobs, turbo, thermal) falls on every step alike and their ratios stay fair.

    Each step runs `warmup` calls first, then rounds continue until every step has `min_iters`
    calls and `min_time` seconds of its own; figures are medians of the per-call times."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}

    def more() -> bool:
        return any(len(t) < min_iters or sum(t) < min_time for t in times.values()) and min(map(len, times.values())) < max_iters

    while more():
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    out = {}
    for name, t in times.items():
        per_call = float(np.median(t))
        out[name] = {"slices_per_s": batch / per_call, "iterations": len(t), "median_batch_s": per_call}
    return out


def _amp(device: torch.device, dtype: str) -> Optional[torch.dtype]:
    if dtype == "float32":
        return None
    if device.type == "cpu":  # float32 unless bfloat16 is named (refused where the CPU lacks it), as classify does
        return autocast_dtype(device, True) if dtype == "bfloat16" else None
    if device.type != "cuda":
        return None
    if dtype == "bfloat16" or (dtype == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _pipeline_amp(device: torch.device, dtype: str) -> Optional[bool]:
    """The end-to-end run's PipelineOptions.amp for --dtype (float16 is a GPU's own choice there)."""
    if dtype == "float32":
        return False
    return True if dtype == "bfloat16" and device.type == "cpu" else None


def benchmark_model(loaded: LoadedModel, device: torch.device, batch: int, dtype: str = "auto", min_time: float = 2.0,
                    naive: bool = True) -> dict[str, Any]:
    model = loaded.model.to(device).eval()
    amp_dtype = _amp(device, dtype)
    size = loaded.card.input.size
    x = torch.rand(batch, 3, size, size, device=device)
    if uses_channels_last(device, amp_dtype):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else torch.autocast(device.type, enabled=False)

    def forward():
        with torch.inference_mode(), autocast():
            return model(x)

    cam = GradCAM(model, amp_dtype)

    def forward_cam():
        return cam(x)

    def naive_cam():
        with autocast():
            return naive_grad_cam(model, x)

    out: dict[str, Any] = {
        "architecture": loaded.card.config.display_name,
        "input_size": size,
        "batch_size": batch,
        "dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32",
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
    }
    steps = {"forward": forward, "cam": forward_cam, **({"naive": naive_cam} if naive else {})}
    rates = measure_interleaved(steps, batch, device, min_time=min_time)
    fwd, cam_r = rates["forward"], rates["cam"]
    out["iterations"] = {name: r["iterations"] for name, r in rates.items()}
    out["forward_slices_per_s"] = fwd["slices_per_s"]
    out["cam_slices_per_s"] = cam_r["slices_per_s"]
    out["cam_vs_forward"] = cam_r["slices_per_s"] / fwd["slices_per_s"]
    if naive:
        nv = rates["naive"]
        out["naive_cam_slices_per_s"] = nv["slices_per_s"]
        out["cam_vs_naive"] = cam_r["slices_per_s"] / nv["slices_per_s"]
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    model.zero_grad(set_to_none=True)
    return out


def make_study(folder: Path, matrix: int = 512, n_slices: int = 100, seed: int = 7) -> tuple[Path, int]:
    """A phantom study with about 80 liver slices written as NIfTI; returns (path, liver slices)."""
    from .io import write_volume
    from .phantom import generate_case

    case = generate_case(seed, "hcc", matrix=matrix, n_slices=n_slices)
    path = folder / f"bench_{matrix}x{n_slices}.nii.gz"
    write_volume(case.ct, path)
    write_volume(case.liver, folder / f"bench_{matrix}x{n_slices}_liver.nii.gz")
    return path, int(case.liver.array.reshape(case.liver.shape[0], -1).any(axis=1).sum())


def end_to_end(loaded: LoadedModel, study: Path, out_dir: Path, device: str, batch: Optional[int], threads: Optional[int] = None,
               liver_mask: Optional[Path] = None, amp: Optional[bool] = None) -> dict[str, Any]:
    """Time classify's stages in this process: read, liver, preprocess, model+CAM, postprocess, write."""
    from .io import read_mask, read_volume
    from .outputs import write_results
    from .pipeline import PipelineOptions, run_pipeline

    t0 = time.perf_counter()
    ct = read_volume(study)
    mask = read_mask(liver_mask, like=ct) if liver_mask else None
    read_s = time.perf_counter() - t0
    result = run_pipeline(ct, liver_mask=mask, model=loaded, options=PipelineOptions(device=device, batch_size=batch, threads=threads, amp=amp))
    t = time.perf_counter()
    write_results(result, out_dir, ct=ct, overwrite=True)
    write_s = time.perf_counter() - t
    total = time.perf_counter() - t0
    tm = result.report["timings_s"]
    stages = {
        "read": read_s,
        "liver_mask": tm.get("liver", 0.0),
        "preprocess": tm.get("preprocess", 0.0) + tm.get("validate", 0.0) + tm.get("setup", 0.0),
        "model_cam": tm.get("model", 0.0),
        "postprocess": tm.get("postprocess", 0.0),
        "write": write_s,
    }
    return {
        "end_to_end_s": total,
        "stages_s": {k: round(v, 3) for k, v in stages.items()},
        "liver_slices": len(result.slices),
        "non_network_fraction": 1.0 - stages["model_cam"] / total,
        "liver_source": "user mask" if mask is not None else "automatic",
    }


def _peak_rss_child(study: Path, model_name: str, device: str, liver_mask: Optional[Path]) -> float:
    """Peak RSS (MB) of a fresh process that classifies `study`: isolates the pipeline's own memory."""
    code = (
        "import resource,sys,tempfile;from pathlib import Path;"
        "from DADRNLesionLib.bench import end_to_end, _models;"
        f"m=_models([{model_name!r}])[{model_name!r}];"
        f"end_to_end(m,Path({str(study)!r}),Path(tempfile.mkdtemp())/'o',{device!r},None,"
        f"liver_mask=Path({str(liver_mask)!r}) if {liver_mask is not None} else None);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return float(proc.stdout.strip().splitlines()[-1])


def _models(names: list[str]) -> dict[str, LoadedModel]:
    out = {}
    for name in names:
        if name == "dadrn50":
            out[name] = random_model("dadrn50-b")
        elif name == "demo":
            if DEMO_WEIGHTS.is_file():
                out[name] = load_checkpoint(DEMO_WEIGHTS)
        elif name == "tiny":  # for tests of this module
            from .preprocess import InputSpec

            out[name] = random_model({"backbone": "drn_d_22", "width": 0.25, "attention": "dual"}, InputSpec(size=64))
        else:
            out[name] = load_checkpoint(name)
    return out


@contextmanager
def _cudnn_autotuned(device: torch.device) -> Iterator[None]:
    """Throughput runs one batch shape over and over: let cuDNN pick its fastest kernels for it.
    The end-to-end runs stay outside, under classify's own setting, to time what a user's run does."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or device.type == "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from .pipeline import physical_cores, resolve_device

    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or physical_cores())
    e2e_runs = args.e2e_runs or (2 if device.type == "cuda" else 1)
    results: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "versions": {"dadrn_lesion": __version__, "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "models": {},
    }
    work = Path(tempfile.mkdtemp(prefix="dadrn-bench-"))
    study = mask = None
    if args.end_to_end:
        study, n_liver = make_study(work, args.matrix, args.slices)
        mask = study.with_name(study.name.replace(".nii.gz", "_liver.nii.gz"))
        results["study"] = {"path": str(study), "size": [args.matrix, args.matrix, args.slices], "liver_slices": n_liver}
    for name, loaded in _models(args.models).items():
        batch = args.batch_size or (8 if device.type == "cpu" else 128)
        with _cudnn_autotuned(device):
            entry = benchmark_model(loaded, device, batch, args.dtype, args.min_time, naive=not args.no_naive)
        if study is not None:
            runs = [end_to_end(loaded, study, work / f"out_{name}", str(device), args.batch_size, args.threads,
                               liver_mask=None if args.auto_liver else mask, amp=_pipeline_amp(device, args.dtype))
                    for _ in range(e2e_runs)]
            entry.update(runs[-1])
            entry["end_to_end_runs_s"] = [round(r["end_to_end_s"], 3) for r in runs]
            if len(runs) > 1:
                entry["end_to_end_first_s"] = runs[0]["end_to_end_s"]
                entry["stages_first_s"] = runs[0]["stages_s"]
        entry["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        results["models"][name] = entry
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.memory_slices:
        from .io import write_volume
        from .phantom import generate_case

        case = generate_case(11, "cyst", matrix=512, n_slices=args.memory_slices)
        big = work / f"memory_512x{args.memory_slices}.nii.gz"
        write_volume(case.ct, big)
        big_mask = work / f"memory_512x{args.memory_slices}_liver.nii.gz"
        write_volume(case.liver, big_mask)
        # The pipeline's memory, not the network's: the demo model (or the tiny one without it).
        model_name = "demo" if DEMO_WEIGHTS.is_file() else "tiny"
        results["memory_test"] = {
            "input": f"512x512x{args.memory_slices} int16 ({case.ct.array.nbytes / 2**20:.0f} MB)",
            "model": model_name,
            "liver_slices": int(case.liver.array.reshape(case.liver.shape[0], -1).any(axis=1).sum()),
            "peak_rss_mb": _peak_rss_child(big, model_name, str(device), None if args.auto_liver else big_mask),
        }
    return results


def format_table(results: dict[str, Any]) -> str:
    lines = [f"device: {results['device']} ({results['device_name']}), threads: {results['threads']}, torch {results['versions']['torch']}"]
    cols = [("forward_slices_per_s", "fwd/s"), ("cam_slices_per_s", "fwd+CAM/s"), ("naive_cam_slices_per_s", "naive/s"),
            ("cam_vs_forward", "CAM/fwd"), ("cam_vs_naive", "CAM/naive"), ("end_to_end_s", "e2e s"),
            ("non_network_fraction", "non-net"), ("peak_rss_mb", "RSS MB"), ("cuda_max_allocated_mb", "CUDA MB")]
    lines.append(f"{'model':<10} {'arch':<38} {'batch':>5} " + " ".join(f"{h:>10}" for _, h in cols))
    for name, m in results["models"].items():
        vals = []
        for key, _ in cols:
            v = m.get(key)
            vals.append(f"{'-':>10}" if v is None else f"{v:>10.3g}" if isinstance(v, float) else f"{v:>10}")
        lines.append(f"{name:<10} {m['architecture'][:38]:<38} {m['batch_size']:>5} " + " ".join(vals))
        if "stages_first_s" in m:
            lines.append(f"{'':<10} first study in the process: {m['end_to_end_first_s']:.2f} s; stages (s): "
                         + ", ".join(f"{k} {v:.2f}" for k, v in m["stages_first_s"].items()))
        if "stages_s" in m:
            lines.append(f"{'':<10} {'next study' if 'stages_first_s' in m else 'stages'} (s): "
                         + ", ".join(f"{k} {v:.2f}" for k, v in m["stages_s"].items()))
    if "memory_test" in results:
        mt = results["memory_test"]
        lines.append(f"memory: {mt['input']} with {mt['model']} model: peak RSS {mt['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["dadrn50", "demo"], help="dadrn50 (full size, untrained), demo, or checkpoint paths")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="throughput batch (default 8 on CPU, 128 on GPU)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="autocast dtype (auto: bfloat16 or float16 on a GPU, float32 on a CPU; bfloat16 on a CPU where it has the instructions)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--min-time", type=float, default=3.0, help="seconds per throughput measurement")
    p.add_argument("--no-naive", action="store_true", help="skip the naive full-backward Grad-CAM")
    p.add_argument("--end-to-end", action=argparse.BooleanOptionalAction, default=True, help="time classify on a generated study")
    p.add_argument("--matrix", type=int, default=512)
    p.add_argument("--slices", type=int, default=100, help="slices of the generated study (about 80 hold liver)")
    p.add_argument("--e2e-runs", type=int, default=None, metavar="N",
                   help="classify the study N times in the same process (default 2 on a GPU, where the first study also "
                        "loads kernels, 1 on the CPU); end_to_end_s is the last, end_to_end_first_s the first")
    p.add_argument("--auto-liver", action="store_true", help="segment the liver automatically instead of using the phantom's mask")
    p.add_argument("--memory-slices", type=int, default=0, help="also measure peak RSS on a 512x512xN study (e.g. 400)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure throughput, Grad-CAM overhead, end-to-end time and memory")
    add_arguments(p)
    p.set_defaults(run=run)


def run(args) -> int:
    results = run_benchmark(args)
    print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m DADRNLesionLib.bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
