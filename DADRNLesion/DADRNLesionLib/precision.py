"""Which autocast dtype a run uses, decided in one place for training, evaluation and `classify`.

* CUDA: bfloat16 where the GPU has it, float16 otherwise (training scales the loss), unless
  switched off (`amp=False`).
* CPU: float32 unless asked for (`amp=True`, the `--cpu-bf16` options), because bfloat16 changes
  the figures a little and is only faster where the CPU computes in it natively (AVX512-BF16 or
  AMX: about twice as fast for this model family, `docs/performance.md`). Elsewhere it is emulated
  and slower than float32, so asking for it there is refused with a message rather than obeyed.
* Where bfloat16 runs on the CPU, tensors go channels-last too: oneDNN's fastest bf16 kernels use
  that layout. The float32 CPU path keeps its layout, so its results stay bit for bit as before.
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import UserInputError

__all__ = ["autocast_dtype", "cpu_has_native_bf16", "uses_channels_last"]


def cpu_has_native_bf16() -> bool:
    """True where this CPU has bfloat16 instructions (the probes are private to torch: absent means no)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(bool(p()) for p in probes if p is not None)
    except RuntimeError:
        return False


def autocast_dtype(device: torch.device, amp: Optional[bool]) -> Optional[torch.dtype]:
    """The autocast dtype for `device`: `amp` None is the device's default, True asks, False refuses."""
    if amp is False:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and amp:
        if not cpu_has_native_bf16():
            raise UserInputError(
                "bfloat16 on the CPU was asked for (--cpu-bf16), but this CPU has no bfloat16 instructions "
                "(AVX512-BF16 or AMX): it would run slower than float32. Leave --cpu-bf16 out."
            )
        return torch.bfloat16
    return None


def uses_channels_last(device: torch.device, amp_dtype: Optional[torch.dtype]) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and amp_dtype is not None)
