"""`dadrn-lesion devices`: what PyTorch can run on here (the Slicer panel shows it)."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("devices", help="list the compute devices PyTorch sees")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def describe_devices() -> dict:
    import torch

    from ..precision import cpu_has_native_bf16

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return {
        "torch": torch.__version__,
        "cuda": cuda,
        "cuda_version": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "mps": mps,
        "cpu_threads": torch.get_num_threads(),
        "cpu_bf16": cpu_has_native_bf16(),  # whether --cpu-bf16 is accepted here
        "auto": "cuda" if cuda else ("mps" if mps else "cpu"),
    }


def run(args) -> int:
    info = describe_devices()
    if args.json:
        print(json.dumps(info))
    else:
        gpus = ", ".join(info["cuda_devices"]) or "none"
        print(f"torch {info['torch']}; CUDA GPUs: {gpus}; MPS: {'yes' if info['mps'] else 'no'}; "
              f"CPU bfloat16 (--cpu-bf16): {'yes' if info['cpu_bf16'] else 'no'}; auto picks {info['auto']}")
    return 0
