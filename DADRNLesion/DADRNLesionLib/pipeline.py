"""Volume in, results out: the one entry point the CLI, the Slicer module and the tests call.

    CT -> axial frame -> liver mask -> liver slices in batches -> DADRN + Grad-CAM
       -> per-slice class, probabilities, heatmap -> lesion label map -> input geometry

Batches stream through the model, so memory grows with the batch, not the volume; progress is
reported per batch and a cancel request is honoured between batches.
"""

from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch

from . import __version__
from .cam import GradCAM, normalise_per_slice
from .classes import CLASS_NAMES, LIVER_VALUE, label_value_of_class
from .decision import adjust_probabilities, card_offset, card_slice_context, decide
from .errors import Cancelled, UserInputError, WeightsError
from .liver_check import check_liver_mask
from .orientation import to_axial_frame
from .precision import autocast_dtype, uses_channels_last
from .preprocess import CAM_SMOOTHING_CELLS, check_cam_smoothing, liver_crop_box, liver_slice_indices, maps_to_slices, prepare_batch
from .results import PipelineResult, SliceResult, study_summary
from .volume import Volume
from .weights import DEMO_WEIGHTS, LoadedModel, load_checkpoint, random_model

__all__ = ["PipelineOptions", "run_pipeline", "resolve_device", "load_model", "validate_ct", "ProgressFn"]

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
# In every untrained run's report; the commands say it once, when the model is loaded.
UNTRAINED_WARNING = "the model is UNTRAINED (random weights): the classes and heatmaps are meaningless"
CancelFn = Callable[[], bool]

CPU_BATCH = 8
MAX_GPU_BATCH = 512


@dataclass
class PipelineOptions:
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    batch_size: Optional[int] = None  # None: 8 on CPU, sized from free memory on a GPU
    cam_threshold: float = 0.5
    cam_smoothing: float = CAM_SMOOTHING_CELLS  # Gaussian sigma of the heatmap, in cells of the model's map
    amp: Optional[bool] = None  # None: on for CUDA (bf16 where supported, else fp16); True: bf16 on CPUs too (`precision`)
    threads: Optional[int] = None  # intra-op CPU threads; None: physical cores
    liver_method: str = "auto"  # auto (built-in) | totalsegmentator

    def __post_init__(self) -> None:
        if not 0.0 < self.cam_threshold < 1.0:
            raise UserInputError(f"--cam-threshold must be between 0 and 1 (exclusive), not {self.cam_threshold}")
        check_cam_smoothing(self.cam_smoothing)
        if self.batch_size is not None and self.batch_size < 1:
            raise UserInputError(f"--batch-size must be at least 1, not {self.batch_size}")


def resolve_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserInputError("--device cuda was asked for but PyTorch sees no CUDA GPU: use --device cpu, or install a CUDA build of PyTorch")
        return torch.device(name)
    if name == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise UserInputError("--device mps was asked for but Apple's MPS backend is not available: use --device cpu")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise UserInputError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")


def load_model(weights: Union[str, os.PathLike, None] = None, *, allow_untrained: bool = True) -> LoadedModel:
    """The checkpoint at `weights`, else the shipped demo model, else (if allowed) an untrained one."""
    if weights is not None:
        return load_checkpoint(weights)
    if DEMO_WEIGHTS.is_file():
        return load_checkpoint(DEMO_WEIGHTS)
    if not allow_untrained:
        raise UserInputError(f"no weights given and the demo model {DEMO_WEIGHTS} is missing: pass --weights FILE")
    return random_model("dadrn50-b")


def physical_cores() -> int:
    logical = os.cpu_count() or 1
    try:
        import psutil  # optional

        return psutil.cpu_count(logical=False) or logical
    except ImportError:
        pass
    try:
        pairs, socket = set(), "0"
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("physical id"):
                    socket = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    pairs.add((socket, line.split(":")[1].strip()))
        return len(pairs) or logical
    except OSError:
        return logical


def validate_ct(ct: Volume) -> None:
    a = ct.array
    if a.ndim != 3:
        raise UserInputError(f"the image has {a.ndim} dimensions; a 3D CT volume is needed")
    if min(a.shape) < 1 or a.shape[1] < 16 or a.shape[2] < 16:
        raise UserInputError(f"the volume is too small ({a.shape[2]}x{a.shape[1]}x{a.shape[0]} voxels) to hold an abdomen")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise UserInputError(f"voxel type {a.dtype} is not a CT intensity type")
    if np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        if not finite.all():
            raise UserInputError(f"the volume holds {int((~finite).sum())} NaN or infinite voxels: fix or re-export the CT")
    lo, hi = float(a.min()), float(a.max())
    if hi - lo < 1.0:
        raise UserInputError(f"the volume is constant ({lo:g}): it holds no image; check the file")
    if lo > -200.0:
        raise UserInputError(
            f"intensities {lo:g}..{hi:g} do not look like CT in Hounsfield units (no air below -200 HU): "
            "use a CT volume with rescale slope/intercept applied"
        )
    if any(s <= 0 or not np.isfinite(s) for s in ct.spacing):
        raise UserInputError(f"voxel spacing {ct.spacing} is not positive: the file's geometry is broken")


@contextmanager
def _threads(n: Optional[int], device: torch.device) -> Iterator[None]:
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n or physical_cores()))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _gpu_batch_size(loaded: LoadedModel, device: torch.device, amp_dtype: Optional[torch.dtype]) -> int:
    """Batch size from free GPU memory, measured with a 2-slice dry run (keeping half the memory free)."""
    size = loaded.card.input.size
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    GradCAM(loaded.model, amp_dtype)(torch.zeros(2, 3, size, size, device=device))
    per_slice = max(1, (torch.cuda.max_memory_allocated(device) - base) // 2)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(MAX_GPU_BATCH, (free * 0.5) // per_slice)))


def _more_than_two_values(a: np.ndarray) -> bool:
    """Whether `a` holds more than two distinct values: three passes, not a sort of the volume."""
    lo, hi = a.min(), a.max()
    return bool(lo != hi and np.any((a != lo) & (a != hi)))


def _check_liver(liver: Volume, ct: Volume, user_given: bool) -> Volume:
    ct.require_same_geometry(liver, "liver mask")
    a = liver.array
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise UserInputError("the liver mask holds NaN or infinite values; save it as a label map")
    if user_given and _more_than_two_values(a):
        values = np.unique(a)
        raise UserInputError(
            f"the liver mask is not binary (values {', '.join(str(v) for v in values[:6])}{'…' if values.size > 6 else ''}): "
            "save the liver alone as 0/1"
        )
    mask = (a > 0).astype(np.uint8)
    if not mask.any():
        raise UserInputError("the liver mask is empty: give a mask that contains the liver, or omit it to segment automatically")
    return liver.with_array(mask)


def run_pipeline(
    ct: Volume,
    *,
    liver_mask: Optional[Volume] = None,
    model: Optional[LoadedModel] = None,
    options: Optional[PipelineOptions] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    input_description: Optional[dict[str, Any]] = None,
) -> PipelineResult:
    options = options or PipelineOptions()
    progress = progress or (lambda stage, done, total: None)
    cancelled = cancel or (lambda: False)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    axial, frame = to_axial_frame(ct)
    validate_ct(axial)  # in the axial frame: a sagittal-stored volume's in-plane size is the axial one
    device = resolve_device(options.device)
    loaded = model or load_model()
    timings["validate"] = time.perf_counter() - t0

    # -- liver -----------------------------------------------------------------------------
    t = time.perf_counter()
    progress("liver", 0, 1)
    if liver_mask is not None:
        liver_source = "user"
        liver_in = _check_liver(liver_mask, ct, user_given=True)
        liver = frame.to_canonical(liver_in.array)
    else:
        liver_source = options.liver_method
        from . import liver as liver_module

        if options.liver_method == "totalsegmentator":
            liver = frame.to_canonical(liver_module.totalsegmentator_liver(ct).array > 0)
        else:
            liver = liver_module.segment_liver(axial).array > 0
    liver = np.ascontiguousarray(liver, dtype=np.uint8)
    progress("liver", 1, 1)
    timings["liver"] = time.perf_counter() - t
    if cancelled():
        raise Cancelled("cancelled after the liver mask")

    # -- slices through the model ----------------------------------------------------------
    t = time.perf_counter()
    spec = loaded.card.input
    slices = liver_slice_indices(liver)
    box = liver_crop_box(liver, (axial.spacing[0], axial.spacing[1]), spec.margin_mm)
    amp_dtype = autocast_dtype(device, options.amp)
    net = loaded.model.to(device).eval()
    channels_last = uses_channels_last(device, amp_dtype)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    cam = GradCAM(net, amp_dtype, normal_offset=card_offset(loaded.card))
    batch = options.batch_size or (_gpu_batch_size(loaded, device, amp_dtype) if device.type == "cuda" else CPU_BATCH)
    timings["setup"] = time.perf_counter() - t

    with _threads(options.threads, device):
        heat, probs, batch, stage_t = _classify_slices(axial.array, liver, slices, box, spec, cam, device, batch, progress, cancelled,
                                                       options.cam_smoothing)
    timings.update(stage_t)
    if not np.isfinite(probs).all():  # NaN would argmax to "normal" and pass unnoticed
        raise WeightsError(
            f"the model gave non-finite probabilities on {int((~np.isfinite(probs).all(axis=1)).sum())} slice(s): its weights "
            "hold NaN/infinite values (use another checkpoint), or half precision overflowed on the GPU (try --no-amp)"
        )
    context = card_slice_context(loaded.card)
    if context > 0 and len(slices):
        t = time.perf_counter()
        offset = card_offset(loaded.card)
        in_context = decide(adjust_probabilities(probs, -offset), offset, context, np.asarray(slices) * axial.spacing[2],
                            np.zeros(len(slices)))
        with _threads(options.threads, device):
            _explain_changed(axial.array, liver, np.asarray(slices), probs.argmax(axis=1), in_context.argmax(axis=1), heat, box, spec,
                             cam, device, batch, options.cam_smoothing)
        probs = in_context.astype(np.float32)
        timings["postprocess"] += time.perf_counter() - t  # the context decision and the maps it redid

    # -- label map and per-slice table -----------------------------------------------------
    t = time.perf_counter()
    labels = liver.astype(np.uint8) * LIVER_VALUE
    predicted = probs.argmax(axis=1) if len(slices) else np.zeros(0, dtype=np.int64)
    results: list[SliceResult] = []
    z_positions = ct.slice_positions_mm()
    for row, k in enumerate(slices):
        name = CLASS_NAMES[int(predicted[row])]
        peak = None
        if name != "normal":
            h = heat[k]
            region = (h >= options.cam_threshold) & (liver[k] > 0)
            labels[k][region] = label_value_of_class(name)
            j, i = np.unravel_index(int(np.argmax(h)), h.shape)
            kk, jj, ii = frame.canonical_index_to_input(int(k), int(j), int(i))
            peak = (ii, jj)
        k_in = frame.canonical_index_to_input(int(k), 0, 0)[0] if frame.slice_axis_is_axial else int(k)
        z = float(z_positions[k_in]) if frame.slice_axis_is_axial else float(axial.slice_positions_mm()[k])
        results.append(SliceResult(int(k_in), z, name, probs[row].copy(), peak))
    results.sort(key=lambda s: s.slice_index)

    liver_out = ct.with_array(frame.from_canonical(liver))
    heat_out = ct.with_array(frame.from_canonical(heat))
    labels_out = ct.with_array(frame.from_canonical(labels))
    liver_check = check_liver_mask(liver_out, ct)
    timings["postprocess"] += time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    report = _report(ct, liver_out, results, loaded, device, amp_dtype, batch, options, timings, frame, liver_source, input_description)
    report["liver_check"] = liver_check
    return PipelineResult(liver_out, heat_out, labels_out, results, report)


def _classify_slices(ct, liver, slices, box, spec, cam, device, batch, progress, cancelled, smoothing=0.0):
    """Stream liver slices through model + Grad-CAM in batches.

    On a GPU the next batch is cut and copied while the current one runs: results of batch i are
    collected only after batch i+1 has been queued. A CUDA out-of-memory halves the batch and
    retries it. Returns (heatmap volume, probabilities, final batch size, stage timings).
    """
    n_slices, rows, cols = liver.shape
    heat = np.zeros((n_slices, rows, cols), dtype=np.float32)
    probs = np.zeros((len(slices), len(CLASS_NAMES)), dtype=np.float32)
    stage_t = {"preprocess": 0.0, "model": 0.0, "postprocess": 0.0}
    channels_last = uses_channels_last(device, cam.amp_dtype)
    progress("model", 0, len(slices))

    def collect(first: int, ks: np.ndarray, out) -> None:
        t = time.perf_counter()
        p = out.probabilities.cpu().numpy()  # waits for this batch on a GPU
        stage_t["model"] += time.perf_counter() - t
        t = time.perf_counter()
        probs[first : first + len(ks)] = p
        lesion_rows = p.argmax(axis=1) != 0
        if lesion_rows.any():
            keep = torch.from_numpy(lesion_rows).to(out.cams.device)
            _place_maps(heat, out.cams[keep], ks[lesion_rows], box, liver, smoothing)
        stage_t["postprocess"] += time.perf_counter() - t
        progress("model", first + len(ks), len(slices))

    start, pending = 0, None
    while start < len(slices):
        if cancelled():
            raise Cancelled(f"cancelled after {start} of {len(slices)} slices")
        ks = np.asarray(slices[start : start + batch])
        t = time.perf_counter()
        x = _model_input(ct, liver, ks, box, spec, device, channels_last)
        stage_t["preprocess"] += time.perf_counter() - t
        t = time.perf_counter()
        try:
            out = cam(x)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            del x
            batch = max(1, batch // 2)
            torch.cuda.empty_cache()
            continue
        stage_t["model"] += time.perf_counter() - t
        if pending is not None:
            collect(*pending)
        pending = (start, ks, out)
        start += len(ks)
    if pending is not None:
        collect(*pending)
    return heat, probs, batch, stage_t


def _explain_changed(ct, liver, slices, before, after, heat, box, spec, cam, device, batch, smoothing) -> None:
    """Bring `heat` in line with the classes the slice context decided: no map on a slice now
    normal, the map of its new class on a slice whose lesion class changed."""
    changed = np.flatnonzero(before != after)
    heat[slices[changed[after[changed] == 0]]] = 0.0
    redo = changed[after[changed] != 0]
    channels_last = uses_channels_last(device, cam.amp_dtype)
    for start in range(0, redo.size, batch):
        rows = redo[start : start + batch]
        out = cam(_model_input(ct, liver, slices[rows], box, spec, device, channels_last), target=torch.from_numpy(after[rows]))
        _place_maps(heat, out.cams, slices[rows], box, liver, smoothing)


def _model_input(ct, liver, ks, box, spec, device, channels_last: bool) -> torch.Tensor:
    x = prepare_batch(ct, liver, ks, box, spec, device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _place_maps(heat: np.ndarray, cams: torch.Tensor, ks: np.ndarray, box, liver: np.ndarray, smoothing: float) -> None:
    """Write the maps of slices `ks` into the heatmap volume: upsampled into the crop box,
    smoothed, kept inside the liver and scaled to peak 1 per slice."""
    placed = maps_to_slices(cams, box, liver.shape[1:], smoothing)
    heat[ks] = normalise_per_slice(placed * liver[ks])


# How much lower a card's slice accuracy with the automatic liver mask may be than with reference
# masks before `classify` says so: about the width of a 50-patient test set's 95 % interval.
AUTOMATIC_MASK_TOLERANCE = 0.03


def liver_mask_warning(card, liver_source: str) -> Optional[str]:
    """A warning when the automatic liver mask feeds a model that is measurably worse with it: the
    card records lower accuracy with it than with reference masks on the same cases, or, where it
    records no such figures, a model that never saw an automatic mask in training (its edges, and
    lesions it leaves out, are then new to the model; docs/training.md)."""
    if liver_source != "auto":
        return None
    sources = card.liver_mask_sources()
    auto = card.metrics.get("automatic_liver_mask", {}).get("all", {}).get("accuracy")
    reference = card.metrics.get("reference_liver_mask", {}).get("all", {}).get("accuracy")
    measured = isinstance(auto, (int, float)) and isinstance(reference, (int, float))
    figures = ""
    if isinstance(auto, (int, float)):
        figures = f" (its card: slice accuracy {auto:.2f} with the automatic mask"
        figures += f" against {reference:.2f} with reference masks on the same cases)" if measured else ")"
    advice = "give a liver mask if you have one (--liver-mask; in Slicer, a liver segment)"
    if sources and "automatic" not in sources:
        return (f"this model was trained with reference liver masks only, and the automatic liver mask used here "
                f"makes its results much less reliable{figures}: {advice}")
    if measured and auto < reference - AUTOMATIC_MASK_TOLERANCE:
        return f"this model is less reliable with the automatic liver mask used here{figures}: {advice}"
    return None


def _report(ct, liver, results, loaded, device, amp_dtype, batch, options, timings, frame, liver_source, input_description) -> dict[str, Any]:
    counts = {name: 0 for name in CLASS_NAMES}
    for s in results:
        counts[s.predicted_class] += 1
    summary = study_summary(results)
    card = loaded.card
    return {
        "input": {
            **(input_description or {}),
            "size_ijk": list(ct.size_ijk),
            "spacing_mm": list(ct.spacing),
            "origin_lps": list(ct.origin),
            "direction": ct.direction.round(6).tolist(),
            "dtype": str(ct.array.dtype),
            "orientation": frame.describe(),
        },
        "liver": {"source": liver_source, "volume_ml": float(liver.array.sum()) * ct.voxel_volume_ml, "slices": len(results)},
        "slice_counts": counts,
        "summary": summary,
        "cam_threshold": options.cam_threshold,
        "cam_smoothing_cells": options.cam_smoothing,
        "model": {
            "id": card.model_id,
            "architecture": card.config.display_name,
            "sha256": card.sha256 or None,
            "path": str(loaded.path) if loaded.path else None,
            "trained": loaded.trained,
            "intended_use": card.intended_use,
            "input": card.input.to_dict(),
            # the prior correction the classes were decided with (0: the network's own argmax)
            "normal_logit_offset": card_offset(card),
            "slice_context_mm": card_slice_context(card),
        },
        "device": {
            "name": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
            "batch_size": batch,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
        },
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "versions": {
            "dadrn_lesion": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        # Inference draws no random numbers (eval mode, no dropout or sampling): the same input,
        # weights, device and thread count give the same labels and probabilities.
        "determinism": {
            "random_numbers_used": False,
            "torch_seed": torch.initial_seed(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        },
        "warnings": ([] if loaded.trained else [UNTRAINED_WARNING])
        + ([w] if (w := liver_mask_warning(loaded.card, liver_source)) else []),
    }
