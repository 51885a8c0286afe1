"""Refuse a volume that would not fit in memory before its voxels are read, with its size in the message.

A CT far larger than the machine's free memory otherwise ends in the kernel's out-of-memory killer
(no message, no exit code the user can read) or in swapping for hours. The estimate is per voxel,
measured on the classify command (input array, its axial copy, liver/label/heatmap arrays, the
copies SimpleITK makes when writing): about 2 x input bytes + 20 bytes per voxel, plus the
interpreter, PyTorch and the model. Set ``DADRN_MEMORY_CHECK=off`` to skip the check.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from .errors import UserInputError

__all__ = ["MemoryLimitError", "available_memory_bytes", "estimate_bytes", "check_fits", "BASE_BYTES"]

BASE_BYTES = 600 * 2**20  # interpreter, PyTorch, model and work buffers of one batch
PIPELINE_BYTES_PER_VOXEL = 20  # beyond 2 x the input's own bytes (see the module docstring)


class MemoryLimitError(UserInputError):
    """The volume needs more memory than is available."""


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> Optional[int]:
    """Bytes left under a container's memory limit (cgroup v2, else v1), if one is set."""
    pairs = (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    )
    for limit_file, usage_file in pairs:
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max":
                return None
            limit, usage = int(raw), int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # v1 reports "no limit" as a huge number
            return None
        return max(0, limit - usage)
    return None


def available_memory_bytes() -> Optional[int]:
    """Memory this process can still use without swapping, or None where it cannot be told."""
    candidates = [_meminfo_available(), _cgroup_headroom()]
    if candidates[0] is None:
        try:
            candidates[0] = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    known = [c for c in candidates if c is not None and c > 0]
    return min(known) if known else None


def estimate_bytes(n_voxels: int, itemsize: int, stage: str = "pipeline") -> int:
    """Bytes needed to read (``stage="read"``) or to read and classify (``"pipeline"``) a volume."""
    raw = n_voxels * itemsize
    if stage == "read":
        return 2 * raw  # SimpleITK's image and the numpy copy
    if stage == "pipeline":
        return 2 * raw + PIPELINE_BYTES_PER_VOXEL * n_voxels + BASE_BYTES
    raise ValueError(f"unknown stage {stage!r}")


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e9:.2f} GB"


def check_fits(size_ijk: Sequence[int], itemsize: int, *, stage: str = "pipeline", what: str = "the volume",
               available: Optional[int] = None) -> None:
    """Raise MemoryLimitError when a volume of `size_ijk` voxels of `itemsize` bytes would not fit."""
    if os.environ.get("DADRN_MEMORY_CHECK", "").strip().lower() in ("0", "off", "no", "false"):
        return
    n = 1
    for s in size_ijk:
        n *= int(s)
    need = estimate_bytes(n, itemsize, stage)
    free = available_memory_bytes() if available is None else available
    if free is None or need <= free:
        return
    dims = "x".join(str(int(s)) for s in size_ijk)
    raise MemoryLimitError(
        f"{what} is {dims} voxels ({_gb(n * itemsize)} of {8 * itemsize}-bit data); "
        f"{'reading' if stage == 'read' else 'classifying'} it needs about {_gb(need)} of memory but only "
        f"{_gb(free)} is available: crop it to the liver region or resample it to fewer voxels "
        "(e.g. 512x512 in-plane, thicker slices), close other programs, or use a machine with more memory "
        "(DADRN_MEMORY_CHECK=off skips this check)"
    )
