"""Training of any member of the model family on a slice cache, on CPU, one GPU or many (DDP).

What a run does, and why:
* Class balance: by default every epoch draws the same number of slices from every class
  (`balance="sampler"`); normal slices outnumber lesion slices several times in a volume, and the
  paper's per-class accuracy rewards no class over another. `balance="loss"` weights the loss by
  inverse class frequency instead.
* Augmentation made for CT (`AugmentConfig`): a small affine (rotation, isotropic scale,
  shift), an HU shift and contrast change inside the liver, band-free Gaussian noise in HU, and
  neighbour-slice jitter (the z order of the two neighbours reversed, or a neighbour replaced
  by the centre slice, as thick slices look). No left-right flip: the liver's side is anatomy.
* Mixed precision on CUDA (bfloat16 where supported, else float16 with loss scaling); bfloat16 on
  CPUs that have it when asked (`amp=True`: about twice as fast; `precision.py`).
* Early stopping on the validation monitor (macro F1 by default) with a patience in epochs; the
  best epoch's weights are written as ``best.safetensors`` + ``best.json`` (model card).
* Validation on a cache whose normal slices were thinned weighs each kept normal slice by the
  normal slices of its case that it stands for (`validation_weights="every_slice"`), so that the
  monitor estimates the every-slice figures `evaluate` reports. Unweighted, a dozen normal slices
  per case hardly move macro F1, and an epoch that calls many normal slices lesions can win.
* ``checkpoint.pt`` (plain tensors and numbers, loaded with ``weights_only=True``) after every
  epoch and when a step limit stops the run: `resume=True` continues at the same step, and the
  per-batch seeds make a resumed run draw the same batches and augmentations.
* Training data may grow while the run trains (`grow`, `growing.py`): finished caches that appear
  in a folder join the training split at the next epoch's start; validation and test do not change.
* Under torchrun each process trains on its shard of every epoch's draw (``--batch-size`` is per
  process); validation is sharded and summed, so all ranks take the same early-stopping decision.
Outputs: ``metrics.csv`` (one row per epoch), ``curves.png``, ``summary.json``, ``split.csv``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from .classes import CLASS_NAMES
from .data import SPLITS, SliceCache, write_split
from .distributed import DistEnv, all_gather_objects, all_reduce_sum, barrier, broadcast_object, setup, teardown
from .errors import UserInputError
from .growing import GrowSource, TrainingPool, grown_record, load_grown, ready_caches
from .localisation_loss import localisation_loss, outlines_in_input
from .metrics import classification_summary
from .model import LesionClassifier, ModelConfig, build_model
from .precision import autocast_dtype, uses_channels_last
from .weights import ModelCard, save_checkpoint

__all__ = ["AugmentConfig", "TrainConfig", "TrainResult", "train", "augment_batch", "augment_with_outlines", "balanced_order", "lr_at"]

PathLike = Union[str, os.PathLike]
CHECKPOINT = "checkpoint.pt"
MONITORS = {"macro_f1": "max", "accuracy": "max", "loss": "min"}
PLOT_EVERY_S = 180.0


@dataclass
class AugmentConfig:
    p_affine: float = 0.8
    rotate_deg: float = 10.0
    scale: float = 0.1  # isotropic scale in [1 - s, 1 + s]
    translate: float = 0.05  # shift as a fraction of the image side
    hu_shift: float = 20.0  # +- HU added inside the liver
    contrast: float = 0.1  # +- relative contrast change about the window centre
    noise_hu: float = 8.0  # Gaussian noise, sigma drawn from [0, noise_hu] HU
    p_swap_neighbours: float = 0.5  # reverse the z order of the two neighbour channels
    p_repeat_centre: float = 0.1  # replace one neighbour by the centre slice

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32  # per process
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    samples_per_epoch: Optional[int] = None  # per epoch over all processes; default: the training slices
    balance: str = "sampler"  # sampler | loss | none
    label_smoothing: float = 0.05
    augment: Optional[AugmentConfig] = field(default_factory=AugmentConfig)
    amp: Optional[bool] = None  # None: on for CUDA
    patience: int = 8  # epochs without improvement of the monitor before stopping; 0: never stop early
    monitor: str = "macro_f1"
    validation_weights: str = "every_slice"  # every_slice | none (see the module docstring)
    min_delta: float = 1e-4  # an improvement smaller than this does not count
    seed: int = 0
    max_steps: Optional[int] = None  # stop (and checkpoint) after this many optimizer steps
    time_limit_s: Optional[float] = None  # fewer epochs, with the schedule fitted to them, when the loop would run longer
    grad_clip: float = 5.0
    eval_batch_size: int = 64
    sync_bn: bool = True  # SyncBatchNorm across GPUs under DDP
    # choose the decision rule's normal-logit offset on every labelled validation slice (`decision`)
    # after training, record it in the card and test with it
    calibrate: bool = False
    # weight of the loss that pulls the true class's map into the lesion outline, on lesion slices
    # that have one (`localisation_loss`); 0: slice labels alone, as the paper trains
    localisation_loss: float = 0.0

    def __post_init__(self) -> None:
        if self.balance not in ("sampler", "loss", "none"):
            raise UserInputError(f"balance must be sampler, loss or none, not {self.balance!r}")
        if self.monitor not in MONITORS:
            raise UserInputError(f"monitor must be one of {', '.join(MONITORS)}, not {self.monitor!r}")
        if self.validation_weights not in ("every_slice", "none"):
            raise UserInputError(f"validation weights must be every_slice or none, not {self.validation_weights!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UserInputError("epochs and batch size must be >= 1 and the learning rate positive")
        if not (self.localisation_loss >= 0 and math.isfinite(self.localisation_loss)):
            raise UserInputError(f"the localisation loss weight must be 0 or more, not {self.localisation_loss}")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise UserInputError(f"the time limit must be positive, not {self.time_limit_s}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = None if self.augment is None else self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = dict(data)
        aug = data.pop("augment", None)
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        cfg.augment = None if aug is None else AugmentConfig(**aug)
        return cfg


@dataclass
class TrainResult:
    out_dir: Path
    best_weights: Optional[Path]
    status: str  # completed | early_stopped | max_steps | time_limit
    epochs_run: int
    steps: int
    best_epoch: int
    best_value: Optional[float]
    history: list[dict[str, Any]]
    seconds: float
    summary: dict[str, Any]


# --------------------------------------------------------------------------------------------
# sampling, schedule, augmentation


def balanced_order(indices: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` sample indices with every class present equally often (each class cycled through a fresh
    permutation, so no slice repeats before its class is used up), shuffled."""
    indices = np.asarray(indices)
    lab = labels[indices]
    classes = np.unique(lab)
    if classes.size == 0 or n <= 0:
        return np.zeros(0, dtype=np.int64)
    share = np.full(classes.size, n // classes.size)
    share[: n - share.sum()] += 1
    parts = []
    for c, m in zip(classes, share):
        pool = indices[lab == c]
        reps = int(math.ceil(m / pool.size))
        parts.append(np.concatenate([rng.permutation(pool) for _ in range(reps)])[:m])
    out = np.concatenate(parts)
    rng.shuffle(out)
    return out


def lr_at(step: int, total: int, base: float, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warm = max(1, int(round(total * warmup_fraction)))
    if step < warm:
        return base * (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    return base * 0.5 * (1.0 + math.cos(math.pi * t))


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, window_width: float, gen: torch.Generator) -> torch.Tensor:
    """Augment a (n, 3, S, S) batch in [0, 1] (0 outside the liver); random draws come from `gen` (CPU)."""
    return augment_with_outlines(x, None, cfg, window_width, gen)[0]


def augment_with_outlines(x: torch.Tensor, outlines: Optional[torch.Tensor], cfg: AugmentConfig, window_width: float,
                          gen: torch.Generator) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`augment_batch`, with the lesion outlines (n, 1, S, S) moved by the same affine; the random
    draws are the same with or without them."""
    n = x.shape[0]
    dev = x.device

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen) * (hi - lo) + lo).to(dev)

    # Neighbour-slice jitter first: it changes which slices the channels hold, not their pixels.
    if cfg.p_swap_neighbours > 0:
        swap = (torch.rand(n, generator=gen) < cfg.p_swap_neighbours).to(dev)
        x = torch.where(swap[:, None, None, None], x[:, [2, 1, 0]], x)
    if cfg.p_repeat_centre > 0:
        rep = (torch.rand(n, generator=gen) < cfg.p_repeat_centre).to(dev)
        side = (torch.rand(n, generator=gen) < 0.5).to(dev)
        x = x.clone()
        for ch, pick in ((0, rep & side), (2, rep & ~side)):
            x[:, ch] = torch.where(pick[:, None, None], x[:, 1], x[:, ch])
    if cfg.p_affine > 0:
        apply = (torch.rand(n, generator=gen) < cfg.p_affine).to(dev)
        ang = u(-cfg.rotate_deg, cfg.rotate_deg, n) * (math.pi / 180.0) * apply
        scale = 1.0 + u(-cfg.scale, cfg.scale, n) * apply
        shift = u(-cfg.translate, cfg.translate, n, 2) * 2.0 * apply[:, None]
        cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if outlines is not None:
            moved = F.grid_sample(outlines.float(), grid.to(torch.float32), mode="bilinear", padding_mode="zeros", align_corners=False)
            outlines = (moved > 0.25).to(outlines.dtype)
    inside = x > 0
    hu = 1.0 / window_width  # one HU in window units
    shift_v = u(-cfg.hu_shift, cfg.hu_shift, n, 1, 1, 1) * hu
    contrast = 1.0 + u(-cfg.contrast, cfg.contrast, n, 1, 1, 1)
    y = (x - 0.5) * contrast + 0.5 + shift_v
    if cfg.noise_hu > 0:
        sigma = u(0.0, cfg.noise_hu, n, 1, 1, 1) * hu
        if dev.type == "cuda":  # a full-size noise field drawn on the CPU would cost more than the step
            noise_gen = torch.Generator(device=dev).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
            noise = torch.randn(x.shape, generator=noise_gen, device=dev, dtype=x.dtype)
        else:
            noise = torch.randn(x.shape, generator=gen)
        y = y + noise * sigma
    # Keep the liver strictly above 0 so that "outside the liver" stays exactly zero.
    y = torch.where(inside, y.clamp(1.0 / 255.0, 1.0), torch.zeros_like(y))
    return y, outlines


# --------------------------------------------------------------------------------------------
# helpers


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _unwrap(model: torch.nn.Module) -> LesionClassifier:
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


def _param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(_unwrap(model).named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _to_batch(source: Union[SliceCache, TrainingPool], idx: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(source.read_images(idx)).to(device, non_blocking=True).float().div_(255.0)
    y = torch.from_numpy(source.labels[idx]).to(device)
    return x, y


def _loss_weight(counts: np.ndarray, device: torch.device) -> torch.Tensor:
    """Inverse class frequency, normalised over the classes present (`balance="loss"`)."""
    counts = counts.astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max(1, (counts > 0).sum()), 0.0)
    return torch.tensor(w, dtype=torch.float32, device=device)


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    if not history:
        return
    cols = list(dict.fromkeys(k for row in history for k in row))  # a resumed older run's rows lack newer columns
    tmp = path.with_suffix(".csv.partial")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for row in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, path)


def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> Optional[Path]:
    """Loss and accuracy per epoch as a PNG (needs matplotlib; skipped without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a1.plot(ep, [h["val_loss"] for h in history], "o-", label="validation")
    a1.set_xlabel("epoch")
    a1.set_ylabel("cross-entropy")
    a1.set_title("loss")
    a1.legend()
    a2.plot(ep, [h["train_acc"] for h in history], "o-", label="train accuracy")
    a2.plot(ep, [h["val_acc"] for h in history], "o-", label="validation accuracy")
    a2.plot(ep, [h["val_macro_f1"] for h in history], "s--", label="validation macro F1")
    a2.set_xlabel("epoch")
    a2.set_ylim(0, 1.02)
    a2.set_title("accuracy")
    a2.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is the user's to replace
        raise UserInputError(f"cannot resume from {path} ({type(exc).__name__}): the file is damaged; start again without --resume") from None


def every_slice_weights(cache: SliceCache, full: SliceCache, idx: np.ndarray) -> np.ndarray:
    """Per slice of `cache` at `idx`: 1 for a lesion slice; for a normal slice, the number of normal
    slices its case has in `full` over the number kept in `cache`, so that weighted counts over the
    thinned slices estimate counts over every slice. All ones where `full` is not the cache that
    `cache` was thinned from (other cases)."""
    weights = np.ones(idx.size, dtype=np.float64)
    if full is cache or [c["case_id"] for c in full.cases] != [c["case_id"] for c in cache.cases]:
        return weights
    n_cases = len(cache.cases)
    in_full = np.bincount(full.case[full.labels == 0], minlength=n_cases)
    kept = np.bincount(cache.case[cache.labels == 0], minlength=n_cases)
    normal = cache.labels[idx] == 0
    case = cache.case[idx][normal]
    weights[normal] = in_full[case] / np.maximum(kept[case], 1)
    return weights


@torch.no_grad()
def _validate(model, cache: SliceCache, idx: np.ndarray, device, amp_dtype, batch: int, env: DistEnv,
              weights: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Confusion matrix, metrics and mean loss over `idx`, each slice counted `weights` times
    (default once); the summary's `slices` is the unweighted count."""
    net = _unwrap(model)
    net.eval()
    mine = idx[env.rank :: env.world_size]
    my_weights = (np.ones(idx.size) if weights is None else np.asarray(weights, dtype=np.float64))[env.rank :: env.world_size]
    cm = torch.zeros(len(CLASS_NAMES), len(CLASS_NAMES), dtype=torch.float64, device=device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    for s in range(0, mine.size, batch):
        x, y = _to_batch(cache, mine[s : s + batch], device)
        w = torch.as_tensor(my_weights[s : s + batch], dtype=torch.float64, device=device)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            logits = net(x)
        logits = logits.float()
        loss_sum += (F.cross_entropy(logits, y, reduction="none").double() * w).sum()
        pred = logits.argmax(1)
        cm += torch.bincount(y * len(CLASS_NAMES) + pred, weights=w, minlength=len(CLASS_NAMES) ** 2).view(len(CLASS_NAMES), -1)
    all_reduce_sum(cm, env)
    all_reduce_sum(loss_sum, env)
    summary = classification_summary(cm.cpu().numpy())
    summary["loss"] = float(loss_sum.item() / max(1e-12, float(cm.sum().item())))
    summary["slices"] = int(idx.size)
    return summary


@torch.no_grad()
def _calibrate(net, cache: SliceCache, split: dict[str, str], device, amp_dtype, batch: int, say) -> Optional[dict[str, Any]]:
    """The card's decision rule, chosen on every labelled slice of the validation cases (normal
    slices not thinned); None, with a message, where those slices cannot decide it."""
    from .decision import SLICE_CONTEXT_GRID_MM, choose_decision, decision_record

    idx = cache.indices_of_cases([c for c, s in split.items() if s == "val"])
    net = net.to(device).eval()
    probs = np.zeros((idx.size, len(CLASS_NAMES)), np.float64)
    for s in range(0, idx.size, batch):
        x, _ = _to_batch(cache, idx[s : s + batch], device)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            logits = net(x)
        probs[s : s + x.shape[0]] = torch.softmax(logits.float(), dim=1).cpu().numpy()
    try:
        choice = choose_decision(cache.labels[idx], probs, z_mm=cache.z_mm(idx), groups=cache.case[idx], context_grid=SLICE_CONTEXT_GRID_MM)
    except ValueError as exc:
        say(f"decision rule not calibrated ({exc}): the card keeps the network's own argmax")
        return None
    best, zero = choice["chosen"], choice["at_zero"]
    say(f"decision rule: normal-logit offset {choice['normal_logit_offset']:+.1f}, slice context {choice['slice_context_mm']:g} mm "
        f"(every labelled validation slice, {idx.size}: "
        f"accuracy {zero['accuracy']:.3f} -> {best['accuracy']:.3f}, macro F1 {zero['macro_f1']:.3f} -> {best['macro_f1']:.3f})")
    return decision_record(choice, {"split": "val", "during": "training"})


def _case_counts(cache: SliceCache, split: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in SPLITS:
        ids = [c["case_id"] for c in cache.cases if split.get(c["case_id"]) == s]
        idx = cache.indices_of_cases(ids)
        groups: dict[str, int] = {}
        for c in cache.cases:
            if split.get(c["case_id"]) == s:
                groups[c["group"] or "default"] = groups.get(c["group"] or "default", 0) + 1
        out[s] = {"cases": len(ids), "cases_by_group": groups,
                  "slices_by_class": dict(zip(CLASS_NAMES, (int(v) for v in cache.class_counts(idx))))}
    return out


def _with_grown(split: dict[str, str], grown: list[tuple[str, SliceCache]]) -> dict[str, str]:
    """The run's split: the starting one, and every grown case in training."""
    return {**split, **{c["case_id"]: "train" for _, part in grown for c in part.cases}}


def _provenance(init_from: Any) -> dict[str, Any]:
    """What a fine-tuned model started from, so that its card tells its whole training."""
    card = init_from.card
    t = card.training
    split = {name: part.get("cases") for name, part in (t.get("split") or {}).items() if isinstance(part, dict)}
    # The parent's own data and origin travel along: its file may be replaced by the new model.
    kept = {"data": t.get("data"), "split_seed": t.get("split_seed"), "split_cases": split or None,
            "initialised_from": t.get("initialised_from")}
    return {"model_id": card.model_id, "sha256": card.sha256, "path": str(init_from.path),
            "steps": t.get("steps"), "command": t.get("command"),
            **{k: v for k, v in kept.items() if v is not None}}


# --------------------------------------------------------------------------------------------
# the loop


def train(
    cache: SliceCache,
    split: dict[str, str],
    model_config: ModelConfig,
    cfg: TrainConfig,
    out_dir: PathLike,
    *,
    device: str = "auto",
    threads: Optional[int] = None,
    resume: bool = False,
    init_from: Optional[Any] = None,
    model_id: Optional[str] = None,
    intended_use: str = "",
    description: Optional[dict[str, Any]] = None,
    evaluate_test: bool = True,
    test_cache: Optional[SliceCache] = None,
    log: Optional[Callable[[str], None]] = None,
    progress_bar: bool = True,
    grow: Optional[GrowSource] = None,
) -> TrainResult:
    """Train `model_config` on the cache's train split, validate on val, test the best on test
    (on `test_cache` when given, e.g. the cache before its normal slices were thinned).

    `grow` adds the caches that appear in its folder to the training split at each epoch's start.

    `init_from` (a `weights.LoadedModel` of the same architecture) starts from trained weights
    instead of a random initialisation: fine-tuning, e.g. the demo model on a hospital's data."""
    from .pipeline import resolve_device

    t_start = time.perf_counter()
    out = Path(out_dir)
    dev = resolve_device(device)
    env, dev = setup(dev)
    log = log or (lambda message: print(message, file=sys.stderr))
    say = log if env.is_main else (lambda message: None)
    try:
        if dev.type == "cpu":
            torch.set_num_threads(max(1, threads or max(1, (os.cpu_count() or 1) // env.world_size)))
        train_idx = cache.indices_of_cases([c for c, s in split.items() if s == "train"])
        val_idx = cache.indices_of_cases([c for c, s in split.items() if s == "val"])
        test_cache = test_cache if test_cache is not None else cache
        test_idx = test_cache.indices_of_cases([c for c, s in split.items() if s == "test"])
        if train_idx.size == 0:
            raise UserInputError("the training split holds no labelled slices: give more cases or other split fractions")
        if val_idx.size == 0:
            raise UserInputError("the validation split holds no labelled slices: early stopping needs one (more cases, or --split-fractions)")
        val_weights = every_slice_weights(cache, test_cache, val_idx) if cfg.validation_weights == "every_slice" else None
        spec = cache.spec
        amp_dtype = autocast_dtype(dev, cfg.amp)

        torch.manual_seed(_seed_for(cfg.seed, 0xC0DE))
        model = build_model(model_config)
        if init_from is not None and not resume:
            model.load_state_dict(init_from.model.state_dict(), strict=True)
        model = model.to(dev)
        channels_last = uses_channels_last(dev, amp_dtype)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one input size throughout: the fastest kernels are found once
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
        )
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

        pool = TrainingPool(cache, train_idx)
        grown: list[tuple[str, SliceCache]] = []
        known_ids = {c["case_id"] for c in cache.cases} | {c["case_id"] for c in test_cache.cases}
        weight = _loss_weight(pool.class_counts(), dev) if cfg.balance == "loss" else None
        if grow is not None:
            say(f"training data grows from {grow.folder}: finished caches there join the training split at each epoch's start"
                + ("" if Path(grow.folder).is_dir() else " (the folder does not exist yet)"))

        per_epoch = cfg.samples_per_epoch or int(train_idx.size)
        global_batch = cfg.batch_size * env.world_size
        steps_per_epoch = max(1, per_epoch // global_batch)
        total_steps = steps_per_epoch * cfg.epochs
        config_key = json.dumps({"model": model_config.to_dict(), "input": spec.to_dict(), "train": cfg.to_dict(),
                                 "world_size": env.world_size, "split": sorted(split.items())}, sort_keys=True)

        state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "best": None, "best_epoch": -1, "bad_epochs": 0, "history": [],
                                 "seconds": 0.0, "epochs": cfg.epochs, "grown": [], "grow_refused": [],
                                 "best_grown": 0}
        best_state: Optional[dict[str, torch.Tensor]] = None
        ckpt_path = out / CHECKPOINT
        if resume:
            if not ckpt_path.is_file():
                raise UserInputError(f"nothing to resume: {ckpt_path} does not exist (run once without --resume)")
            saved = _load_state(ckpt_path)
            saved_key = json.loads(saved["config_key"])
            now_key = json.loads(config_key)
            for k in ("model", "input", "world_size", "split"):
                if saved_key[k] != now_key[k]:
                    raise UserInputError(f"cannot resume {out}: its {k} differs from this command's; use the same options (or a new --out)")
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            if saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            for k in state:
                state[k] = saved.get(k, state[k])
            state["history"] = [dict(h) for h in saved["history"]]
            best_state = saved.get("best_model") or None
            state["epochs"] = cfg.epochs  # a resumed run aims at the epochs its own command asks for
            if state["grown"]:
                if grow is None:
                    raise UserInputError(f"cannot resume {out} without --grow-from: its training split grew from "
                                         f"{len(state['grown'])} caches of a folder; give that folder again")
                # The same caches in the same order: the pool, and so every draw, is as it was.
                accepted, _ = load_grown(grow, state["grown"], cache, known_ids, say, strict=True)
                for _, part in accepted:
                    pool.add(part)
                grown.extend(accepted)
            say(f"resuming {out} at epoch {state['epoch'] + 1}, step {state['step']}")
        elif env.is_main:
            out.mkdir(parents=True, exist_ok=True)
        barrier(env)
        if env.is_main:
            write_split(out / "split.csv", _with_grown(split, grown))
            (out / "train_config.json").write_text(json.dumps(
                {"model": model_config.to_dict(), "input": spec.to_dict(), "train": cfg.to_dict(), "world_size": env.world_size,
                 "description": description or {}}, indent=2))

        if env.world_size > 1:
            if dev.type == "cuda" and cfg.sync_bn:
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

        model_id = model_id or f"{model_config.display_name} {out.name}"
        seconds_before = float(state["seconds"])

        def elapsed() -> float:
            """Wall time of this run, earlier sessions of a resumed run included."""
            return seconds_before + time.perf_counter() - t_start
        sign = 1.0 if MONITORS[cfg.monitor] == "max" else -1.0

        def training_data(upto: Optional[int] = None) -> dict[str, Any]:
            """The data the weights trained on: the starting cache and the first `upto` grown caches
            (the best epoch's weights never saw the caches that came later)."""
            seen = grown[: len(grown) if upto is None else upto]
            if not seen:
                return {"data": cache.source}
            start = cache.source["merged"] if set(cache.source) == {"merged"} else [cache.source]
            return {"data": {"merged": [*start, *(part.source for _, part in seen)]},
                    "grown": grown_record(grow, [n for n, _ in seen], [part for _, part in seen])}

        def grow_pool() -> None:
            """At an epoch's start: the finished caches that have appeared since join the training split."""
            nonlocal weight
            names = broadcast_object(ready_caches(grow, [*state["grown"], *state["grow_refused"]]) if env.is_main else None, env)
            if not names:
                return
            accepted, refused = load_grown(grow, names, cache, known_ids, say)
            state["grow_refused"].extend(refused)
            for name, part in accepted:
                pool.add(part)
                state["grown"].append(name)
            grown.extend(accepted)
            if accepted:
                if cfg.balance == "loss":
                    weight = _loss_weight(pool.class_counts(), dev)
                if env.is_main:
                    write_split(out / "split.csv", _with_grown(split, grown))
                say(f"epoch {state['epoch'] + 1}: {len(accepted)} new caches ({sum(len(p.cases) for _, p in accepted)} cases) "
                    f"from {grow.folder}; {len(pool)} training slices in {len(grown)} grown caches and the starting one")

        def make_card(metrics: dict[str, Any]) -> ModelCard:
            return ModelCard(
                model_id=model_id,
                config=model_config,
                input=spec,
                intended_use=intended_use,
                training={
                    **training_data(state["best_grown"]),
                    "slice_rule": cache.rule.to_dict(),
                    "split": _case_counts(cache, split),
                    "config": cfg.to_dict(),
                    "world_size": env.world_size,
                    "device": str(dev),
                    "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
                    "best_epoch": state["best_epoch"] + 1,
                    "epochs_run": state["epoch"],
                    "steps": state["step"],
                    "seconds": round(elapsed(), 1),
                    "torch": torch.__version__,
                    **({"initialised_from": _provenance(init_from)} if init_from is not None else {}),
                    **(description or {}),
                },
                metrics=metrics,
            )

        def save_resume_state() -> None:
            if not env.is_main:
                return
            _save_state(ckpt_path, {
                "model": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "best_model": best_state or {},
                "config_key": config_key,
                **{k: state[k] for k in ("epoch", "batch", "step", "best", "best_epoch", "bad_epochs", "history", "epochs",
                                         "grown", "grow_refused", "best_grown")},
                "seconds": elapsed(),
            })

        def fit_to_time_limit(total: int) -> int:
            """Cut the epochs still to come to those that fit in the time limit; the new total steps."""
            if cfg.time_limit_s is None or state["epoch"] >= state["epochs"]:
                return total
            fitted = broadcast_object(_epochs_within(state["history"], state["epoch"], state["epochs"], cfg.time_limit_s - elapsed()), env)
            if fitted >= state["epochs"]:
                return total
            say(f"time limit: {fitted} epochs instead of {state['epochs']} fit in the remaining "
                f"{max(0.0, cfg.time_limit_s - elapsed()):.0f} s; the learning-rate schedule now ends there")
            state["epochs"] = fitted
            return steps_per_epoch * fitted

        status = "completed"
        stop = False
        last_plot = time.perf_counter()
        if resume and state["batch"] == 0:
            total_steps = fit_to_time_limit(total_steps)  # a resumed run may have used its time already
        while state["epoch"] < state["epochs"] and not stop:
            epoch = state["epoch"]
            t_epoch = time.perf_counter()  # reading grown caches counts: the time limit judges by these seconds
            if grow is not None and state["batch"] == 0:  # mid-epoch (resumed) the pool stays as the epoch began
                grow_pool()
            rng = np.random.default_rng(_seed_for(cfg.seed, 0xE90C, epoch))
            n_draw = steps_per_epoch * global_batch
            positions = np.arange(len(pool), dtype=np.int64)
            if cfg.balance == "sampler":
                order = balanced_order(positions, pool.labels, n_draw, rng)
            else:
                reps = int(math.ceil(n_draw / positions.size))
                order = np.concatenate([rng.permutation(positions) for _ in range(reps)])[:n_draw]
            mine = order[env.rank :: env.world_size]
            model.train()
            loss_sum = torch.zeros(1, dtype=torch.float64, device=dev)
            correct = torch.zeros(1, dtype=torch.float64, device=dev)
            seen = torch.zeros(1, dtype=torch.float64, device=dev)
            place_sum = torch.zeros(1, dtype=torch.float64, device=dev)
            place_steps = 0
            bar = None
            if env.is_main and progress_bar:
                from tqdm import tqdm

                bar = tqdm(total=steps_per_epoch, initial=state["batch"], desc=f"epoch {epoch + 1}/{state['epochs']}", unit="step",
                           file=sys.stderr, leave=False, mininterval=0.5 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
            for b in range(state["batch"], steps_per_epoch):
                if cfg.max_steps is not None and state["step"] >= cfg.max_steps:
                    status, stop = "max_steps", True
                    state["batch"] = b
                    break
                idx = mine[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                x, y = _to_batch(pool, idx, dev)
                outlines = has_outline = None
                if cfg.localisation_loss > 0:
                    outlines, has_outline = outlines_in_input(pool.outline_masks(idx), spec.size, dev)
                seed = _seed_for(cfg.seed, epoch, b, env.rank)
                torch.manual_seed(seed)  # dropout
                if cfg.augment is not None:
                    x, outlines = augment_with_outlines(x, outlines, cfg.augment, spec.window_width, torch.Generator().manual_seed(seed))
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                lr = lr_at(state["step"], total_steps, cfg.lr, cfg.warmup_fraction)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                with torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                    if outlines is None:
                        logits = model(x)
                    else:
                        logits, features = model(x, with_features=True)
                loss = ce = F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=cfg.label_smoothing)
                if outlines is not None:
                    inside = (x > 0).any(dim=1, keepdim=True)
                    place = localisation_loss(features, _unwrap(model).fc.weight, y, outlines, inside, has_outline & (y > 0))
                    loss = loss + cfg.localisation_loss * place
                    with torch.no_grad():
                        place_sum += place.detach().double()
                        place_steps += 1
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                state["step"] += 1
                with torch.no_grad():
                    loss_sum += ce.detach().double() * y.numel()  # the classification loss alone, as validation's
                    correct += (logits.argmax(1) == y).sum().double()
                    seen += y.numel()
                if bar is not None:
                    bar.update(1)
                    if b % 10 == 0:
                        bar.set_postfix(loss=f"{loss_sum.item() / max(1.0, seen.item()):.3f}", lr=f"{lr:.2g}", refresh=False)
            if bar is not None:
                bar.close()
            if stop:
                save_resume_state()
                say(f"stopped at step {state['step']} (--max-steps); resume with --resume")
                break
            all_reduce_sum(loss_sum, env)
            all_reduce_sum(correct, env)
            all_reduce_sum(seen, env)
            all_reduce_sum(place_sum, env)
            val = _validate(model, cache, val_idx, dev, amp_dtype, cfg.eval_batch_size, env, val_weights)
            value = val["loss"] if cfg.monitor == "loss" else val[cfg.monitor]
            improved = state["best"] is None or sign * (value - state["best"]) > cfg.min_delta
            row = {
                "epoch": epoch + 1,
                "step": state["step"],
                "lr": lr_at(max(0, state["step"] - 1), total_steps, cfg.lr, cfg.warmup_fraction),
                "train_loss": float(loss_sum.item() / max(1.0, seen.item())),
                "train_acc": float(correct.item() / max(1.0, seen.item())),
                "train_localisation_loss": float(place_sum.item() / max(1, place_steps * env.world_size)),
                "val_loss": val["loss"],
                "val_acc": val["accuracy"],
                "val_macro_f1": val["macro_f1"],
                "seconds": round(time.perf_counter() - t_epoch, 2),
                "best": int(improved),
            }
            state["history"].append(row)
            state["epoch"] = epoch + 1
            state["batch"] = 0
            if improved:
                state["best"], state["best_epoch"], state["bad_epochs"] = float(value), epoch, 0
                state["best_grown"] = len(state["grown"])
                best_state = {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}
                if env.is_main:
                    save_checkpoint(_unwrap(model), out / "best.safetensors", make_card({"validation": _short(val)}))
            else:
                state["bad_epochs"] += 1
            say(
                f"epoch {epoch + 1}/{state['epochs']}  step {state['step']}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
                + (f"localisation {row['train_localisation_loss']:.4f}  " if cfg.localisation_loss > 0 else "") +
                f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f} macro-F1 {val['macro_f1']:.4f}"
                f"{'  *best*' if improved else ''}  ({row['seconds']:.0f} s)"
            )
            if cfg.patience and state["bad_epochs"] >= cfg.patience:
                status = "early_stopped"
                say(f"early stopping: validation {cfg.monitor} has not improved for {cfg.patience} epochs (best: epoch {state['best_epoch'] + 1})")
                stop = True
            if not stop:
                total_steps = fit_to_time_limit(total_steps)
            if env.is_main:
                _write_history(out / "metrics.csv", state["history"])
                # Plotting costs seconds: refresh the PNG every few minutes and at the end.
                if stop or state["epoch"] >= state["epochs"] or time.perf_counter() - last_plot > PLOT_EVERY_S:
                    plot_curves(state["history"], out / "curves.png", model_config.display_name)
                    last_plot = time.perf_counter()
            save_resume_state()

        if status == "completed" and state["epochs"] < cfg.epochs:
            status = "time_limit"
        digests = all_gather_objects({"rank": env.rank, "params": _param_digest(model), "steps": state["step"]}, env)
        summary: dict[str, Any] = {
            "status": status,
            "epochs_run": state["epoch"],
            "steps": state["step"],
            "best_epoch": state["best_epoch"] + 1,
            "best": {cfg.monitor: state["best"]},
            "seconds": round(elapsed(), 1),
            **({"grown": training_data()["grown"]} if grown else {}),
            "distributed": {
                "world_size": env.world_size,
                "backend": env.backend or None,
                "ranks": digests,
                "in_sync": len({d["params"] for d in digests}) == 1,
            },
        }
        best_path = out / "best.safetensors" if (out / "best.safetensors").is_file() else None
        if env.is_main and best_state is not None and status != "max_steps":
            net = build_model(model_config)
            net.load_state_dict(best_state)
            metrics: dict[str, Any] = {"validation": _short(_validate(net.to(dev), cache, val_idx, dev, amp_dtype, cfg.eval_batch_size, DistEnv(), val_weights))}
            decision = _calibrate(net, test_cache, split, dev, amp_dtype, cfg.eval_batch_size, say) if cfg.calibrate else None
            if evaluate_test and test_idx.size:
                from .evaluate import evaluate_cache, write_report

                result = evaluate_cache(net, test_cache, test_idx, device=dev, amp_dtype=amp_dtype, batch_size=cfg.eval_batch_size,
                                        normal_offset=decision["normal_logit_offset"] if decision else 0.0,
                                        slice_context_mm=decision["slice_context_mm"] if decision else 0.0)
                write_report(result, out / "test", title=f"{model_id}: test split")
                metrics["test"] = result.card_metrics()
                summary["test"] = result.summary["all"]
                say(result.text())
            card = make_card(metrics)
            if decision:
                card.extra["decision"] = decision
            save_checkpoint(net.cpu(), out / "best.safetensors", card)
            best_path = out / "best.safetensors"
            summary["validation"] = metrics["validation"]
        if env.is_main:
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
        # The other ranks wait for rank 0's test and card, so that all destroy the process group
        # together (`teardown`): a gloo rank that tore down while its peer was still at work aborted
        # once in a while ("terminate called without an active exception"). Not on the failure
        # path, where a rank that raised would leave the others waiting here.
        barrier(env)
        return TrainResult(out, best_path, status, state["epoch"], state["step"], state["best_epoch"] + 1, state["best"],
                           state["history"], summary["seconds"], summary)
    finally:
        # The DDP wrapper's reducer holds the process group: let it go first, so that the group is
        # shut down here rather than when the wrapper is freed, possibly at interpreter exit.
        model = None  # noqa: F841
        teardown(env)


def _epochs_within(history: list[dict[str, Any]], done: int, planned: int, remaining_s: float) -> int:
    """How many epochs in all fit when `remaining_s` is left after `done` of them, judged by the
    lower median of the last three (validation included); at least `done`, at most `planned`.

    A cut is for good (the schedule is fitted to it), so one epoch slowed by something passing, such
    as another job on the machine, must not decide it: hence the lower median, and while only one
    epoch follows the first, the faster of the two. The first epoch carries one-off costs (kernel
    selection, page cache) and otherwise only decides alone whether another epoch fits at all. A
    pace that truly rises is followed an epoch or two late, and each later epoch cuts again, so
    the run may end about an epoch past the limit; callers with a hard limit keep that in reserve."""
    timed = [float(h["seconds"]) for h in history if h.get("seconds")]
    if not timed:
        return planned
    if len(timed) == 1:
        return planned if remaining_s >= timed[0] else done
    recent = timed[1:][-3:]
    per_epoch = min(timed[0], recent[0]) if len(recent) == 1 else sorted(recent)[(len(recent) - 1) // 2]
    return int(min(planned, done + max(0, math.floor(max(0.0, remaining_s) / per_epoch))))


def _short(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures a model card keeps of a classification summary."""
    return {
        "n": summary["n"],
        "accuracy": summary["accuracy"],
        "macro_f1": summary["macro_f1"],
        "macro_precision": summary["macro_precision"],
        "macro_recall": summary["macro_recall"],
        "class_accuracy": {k: v["accuracy"] for k, v in summary["per_class"].items()},
        **({"loss": summary["loss"]} if "loss" in summary else {}),
        **({"slices": summary["slices"]} if "slices" in summary else {}),
    }
