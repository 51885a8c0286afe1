"""bfloat16 against float32 on this CPU (`--cpu-bf16` of classify, evaluate and train).

    python Testing/benchmarks/cpu_precision.py [--threads 2] [--min-time 5] [--train-batch 32] [--seed 910003]

Measured in one run, the two precisions timed in alternation (A B A B ...) so that other load
falls on both alike:
1. inference: the shipped model with Grad-CAM on a batch of 8 slices (classify's CPU batch);
2. training: one optimizer step (forward, loss, backward, AdamW) on a batch of `--train-batch`;
3. classify end to end on a generated phantom study with its own liver mask, once in each precision,
   and how many of its slices get the same class, with the largest probability difference.
Prints the figures and the bf16/fp32 speed ratios. Refuses to run where the CPU has no bfloat16.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "DADRNLesion"))

from DADRNLesionLib.bench import measure_interleaved  # noqa: E402
from DADRNLesionLib.cam import GradCAM  # noqa: E402
from DADRNLesionLib.precision import cpu_has_native_bf16  # noqa: E402
from DADRNLesionLib.weights import DEMO_WEIGHTS, load_checkpoint  # noqa: E402


def _variants(model: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.nn.Module, torch.Tensor, object]]:
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return {
        "float32": (model, x, lambda: torch.autocast("cpu", enabled=False)),
        "bfloat16": (fast, x.contiguous(memory_format=torch.channels_last), lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    }


def inference(model: torch.nn.Module, size: int, min_time: float) -> dict[str, dict[str, float]]:
    x = torch.rand(8, 3, size, size)
    steps = {}
    for name, (net, xx, _) in _variants(model.eval(), x).items():
        cam = GradCAM(net, torch.bfloat16 if name == "bfloat16" else None)
        steps[name] = (lambda cam=cam, xx=xx: cam(xx))
    return measure_interleaved(steps, 8, torch.device("cpu"), min_time=min_time)


def training(model: torch.nn.Module, size: int, batch: int, min_time: float) -> dict[str, dict[str, float]]:
    x = torch.rand(batch, 3, size, size)
    y = torch.randint(0, 5, (batch,), generator=torch.Generator().manual_seed(0))
    steps = {}
    for name, (net, xx, autocast) in _variants(copy.deepcopy(model).train(), x).items():
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5)

        def step(net=net, xx=xx, autocast=autocast, opt=opt):
            with autocast():
                logits = net(xx)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[name] = step
    return measure_interleaved(steps, batch, torch.device("cpu"), min_time=min_time)


def end_to_end(loaded, seed: int) -> dict[str, object]:
    from DADRNLesionLib.phantom import generate_case
    from DADRNLesionLib.pipeline import PipelineOptions, run_pipeline

    case = generate_case(seed, "hcc", hard=False)
    out = {}
    for name, amp in (("float32", None), ("bfloat16", True)):
        t = time.perf_counter()
        res = run_pipeline(case.ct, liver_mask=case.liver, model=loaded, options=PipelineOptions(device="cpu", amp=amp))
        out[name] = (time.perf_counter() - t, np.array([s.probabilities for s in res.slices]), res.report["timings_s"].get("model", 0.0))
    (t32, p32, m32), (t16, p16, m16) = out["float32"], out["bfloat16"]
    return {"slices": len(p32), "float32_s": t32, "bfloat16_s": t16, "model_cam_float32_s": m32, "model_cam_bfloat16_s": m16,
            "same_class": float(np.mean(p32.argmax(1) == p16.argmax(1))), "max_probability_difference": float(np.abs(p32 - p16).max())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=5.0, help="seconds of each precision's own time per measurement")
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=910_003, help="seed of the phantom study classified end to end")
    args = ap.parse_args()
    if not cpu_has_native_bf16():
        print("this CPU has no bfloat16 instructions (AVX512-BF16 or AMX): nothing to compare", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(DEMO_WEIGHTS)
    size = loaded.card.input.size
    print(f"{loaded.card.config.display_name}, {size} px, {args.threads} threads, torch {torch.__version__}")
    for title, rates, unit in (("inference with Grad-CAM, batch 8", inference(loaded.model, size, args.min_time), "slices/s"),
                               (f"training step, batch {args.train_batch}", training(loaded.model, size, args.train_batch, args.min_time),
                                "slices/s")):
        f32, b16 = rates["float32"]["slices_per_s"], rates["bfloat16"]["slices_per_s"]
        print(f"{title}: float32 {f32:.1f} {unit}, bfloat16 {b16:.1f} {unit}, ratio {b16 / f32:.2f} "
              f"({rates['float32']['iterations']} / {rates['bfloat16']['iterations']} batches)")
    e2e = end_to_end(loaded, args.seed)
    print(f"classify end to end ({e2e['slices']} liver slices, own liver mask): float32 {e2e['float32_s']:.1f} s "
          f"(model {e2e['model_cam_float32_s']:.1f} s), bfloat16 {e2e['bfloat16_s']:.1f} s (model {e2e['model_cam_bfloat16_s']:.1f} s), "
          f"ratio {e2e['float32_s'] / e2e['bfloat16_s']:.2f}; same class on {e2e['same_class']:.3f} of the slices, "
          f"largest probability difference {e2e['max_probability_difference']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
