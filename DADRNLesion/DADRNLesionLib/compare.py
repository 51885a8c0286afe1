"""The paper's comparison (its tables 1-3) on any labelled data: every method, both splits, one budget.

For each split seed, the cases are split by patient (`data.split_cases`); every method is then
trained on that split's train cases, early-stopped on its val cases and tested on its test cases,
with the same `TrainConfig` (epochs, slices drawn per epoch, batch, learning rate, patience,
augmentation, seed). Slice-level methods go through `train.train` and `evaluate.evaluate_cache`
unchanged, exactly as `dadrn-lesion train` runs them; the ROI-level model, which needs the lesion
box, has its own loop below built from the same pieces (balanced draws, schedule, augmentation,
metrics) on the lesion slices only.

Each finished run leaves ``OUT/<method>/split<seed>/result.json``; a rerun with the same settings
reuses it, so a long comparison can be stopped and continued, or split over processes (one per
split seed) that share OUT. The tables are means over the splits with the spread (half the range,
so the two splits lie at mean +- spread), next to the paper's own figures.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .classes import CLASS_NAMES, LESION_CLASSES
from .data import SliceCache, split_cases, write_split
from .errors import UserInputError
from .metrics import classification_summary, confusion_matrix
from .model import PRESETS, ModelConfig
from .model.roi import ROIClassifier, ROIConfig, boxes_from_masks, crop_patches, to_five_class
from .precision import autocast_dtype
from .preprocess import CAM_SMOOTHING_CELLS, check_cam_smoothing
from .train import TrainConfig, augment_batch, balanced_order, lr_at

__all__ = [
    "Method", "METHODS", "DEFAULT_METHODS", "PAPER", "CompareConfig", "run_comparison", "train_roi",
    "aggregate", "format_tables", "write_tables", "load_results", "parameter_count",
]

PathLike = Union[str, os.PathLike]
RESULT = "result.json"


@dataclass(frozen=True)
class Method:
    key: str  # command-line name
    label: str  # row name in our tables
    kind: str  # "slice" (whole liver slice, 5 classes, Grad-CAM) or "roi" (needs the lesion box, 4 classes)
    preset: str = ""  # model preset of a slice-level method
    paper: str = ""  # the paper's row it stands for (default: label)

    @property
    def paper_label(self) -> str:
        return self.paper or self.label


METHODS: dict[str, Method] = {m.key: m for m in (
    Method("drn50", "DRN50", "slice", "drn50"),
    Method("seresnet50", "SEResnet50", "slice", "seresnet50"),
    Method("raresnet50", "RAResnet50", "slice", "raresnet50"),
    Method("sadrn50-a", "SADRN50-A", "slice", "sadrn50-a"),
    Method("sadrn50-b", "SADRN50-B", "slice", "sadrn50-b"),
    Method("cadrn50-a", "CADRN50-A", "slice", "cadrn50-a"),
    Method("cadrn50-b", "CADRN50-B", "slice", "cadrn50-b"),
    Method("dadrn50-a", "DADRN50-A", "slice", "dadrn50-a"),
    Method("dadrn50-b", "DADRN50-B", "slice", "dadrn50-b"),
    Method("roi", "ROI global-local", "roi", paper="ResGLNet"),
)}
# The rows of the paper's table 2 plus the ROI-level model; SADRN/CADRN-B are in its table 1 only.
DEFAULT_METHODS = ("drn50", "seresnet50", "raresnet50", "sadrn50-a", "cadrn50-a", "dadrn50-a", "dadrn50-b", "roi")

# The slides' figures (ICIP 2019, 1091 arterial-phase slices, two patient-level splits).
PAPER: dict[str, dict[str, dict[str, float]]] = {
    "class_accuracy": {
        "DRN50": dict(zip(CLASS_NAMES, (0.9788, 0.9327, 0.7596, 0.8427, 0.5278))),
        "SEResnet50": dict(zip(CLASS_NAMES, (0.9334, 0.9327, 0.7788, 0.9116, 0.5917))),
        "RAResnet50": dict(zip(CLASS_NAMES, (0.9675, 0.9182, 0.7596, 0.8227, 0.5556))),
        "SADRN50-A": dict(zip(CLASS_NAMES, (0.9577, 0.9096, 0.8132, 0.8816, 0.6625))),
        "SADRN50-B": dict(zip(CLASS_NAMES, (0.9334, 0.8761, 0.7775, 0.8220, 0.5458))),
        "CADRN50-A": dict(zip(CLASS_NAMES, (0.9675, 0.9551, 0.8530, 0.9016, 0.6181))),
        "CADRN50-B": dict(zip(CLASS_NAMES, (0.9588, 0.9413, 0.8324, 0.8322, 0.5847))),
        "DADRN50-A": dict(zip(CLASS_NAMES, (0.9690, 0.9451, 0.7802, 0.8024, 0.7069))),
        "DADRN50-B": dict(zip(CLASS_NAMES, (0.9804, 0.9551, 0.8159, 0.9116, 0.6819))),
        "ResGLNet": dict(zip(LESION_CLASSES, (0.9615, 0.8405, 0.8846, 0.8462))),
    },
    "overall": {
        "DRN50": {"accuracy": 0.8083, "macro_f1": 0.8197, "macro_precision": 0.8294, "macro_recall": 0.8207},
        "SEResnet50": {"accuracy": 0.8296, "macro_f1": 0.8265, "macro_precision": 0.8552, "macro_recall": 0.8149},
        "RAResnet50": {"accuracy": 0.8047, "macro_f1": 0.8041, "macro_precision": 0.8304, "macro_recall": 0.7905},
        "SADRN50-A": {"accuracy": 0.8449, "macro_f1": 0.8372, "macro_precision": 0.8463, "macro_recall": 0.8346},
        "CADRN50-A": {"accuracy": 0.8591, "macro_f1": 0.8263, "macro_precision": 0.8506, "macro_recall": 0.8149},
        "DADRN50-A": {"accuracy": 0.8407, "macro_f1": 0.8213, "macro_precision": 0.8446, "macro_recall": 0.8111},
        "DADRN50-B": {"accuracy": 0.8690, "macro_f1": 0.8412, "macro_precision": 0.8528, "macro_recall": 0.8386},
    },
    "localization": {
        "DRN50": dict(zip(LESION_CLASSES, (0.5110, 0.6676, 0.5941, 0.3798))),
        "SEResnet50": dict(zip(LESION_CLASSES, (0.1898, 0.0742, 0.7327, 0.2532))),
        "RAResnet50": dict(zip(LESION_CLASSES, (0.2628, 0.0742, 0.6931, 0.3292))),
        "DADRN50-B": dict(zip(LESION_CLASSES, (0.5986, 0.6676, 0.7327, 0.5064))),
    },
}


@dataclass
class CompareConfig:
    methods: tuple[str, ...] = DEFAULT_METHODS
    split_seeds: tuple[int, ...] = (0, 1)
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    width: float = 1.0  # channel width of every network (0.25 for a CPU-sized comparison)
    train: TrainConfig = field(default_factory=TrainConfig)
    roi: ROIConfig = field(default_factory=ROIConfig)  # backbone/patch of the ROI model; width is overridden
    device: str = "auto"
    threads: Optional[int] = None
    cam_threshold: float = 0.5
    cam_smoothing: float = CAM_SMOOTHING_CELLS  # as `classify` makes its heatmap (`preprocess.smooth_maps`)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise UserInputError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        if not self.methods:
            raise UserInputError("no methods to compare")
        check_cam_smoothing(self.cam_smoothing)
        if not self.split_seeds:
            raise UserInputError("give at least one split seed")

    def model_config(self, method: Method) -> Union[ModelConfig, ROIConfig]:
        if method.kind == "roi":
            return replace(self.roi, width=self.width)
        return ModelConfig(**{**PRESETS[method.preset].to_dict(), "width": self.width})


# --------------------------------------------------------------------------------------------
# the ROI-level model's training and test (lesion slices only)


def _lesion_samples(cache: SliceCache, case_ids: Sequence[str]) -> tuple[np.ndarray, int]:
    """Lesion slices of these cases that carry a lesion outline; and how many lack one."""
    idx = cache.indices_of_cases(case_ids)
    idx = idx[cache.labels[idx] > 0]
    has = np.array([int(i) in cache.masks for i in idx], dtype=bool)
    return idx[has], int((~has).sum())


def _boxes(cache: SliceCache, idx: np.ndarray) -> torch.Tensor:
    return boxes_from_masks([cache.masks[int(i)][1] for i in idx], cache.spec.size)


def _images(cache: SliceCache, idx: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(cache.read_images(idx)).to(device).float().div_(255.0)


@torch.no_grad()
def _roi_confusion(model: ROIClassifier, cache: SliceCache, idx: np.ndarray, boxes: torch.Tensor, device: torch.device,
                   amp_dtype: Optional[torch.dtype], batch: int) -> tuple[np.ndarray, float]:
    """Five-class confusion matrix (normal row and column empty) and mean loss over `idx`."""
    model.eval()
    cm = np.zeros((len(CLASS_NAMES), len(CLASS_NAMES)), dtype=np.int64)
    loss = 0.0
    for s in range(0, idx.size, batch):
        part = idx[s : s + batch]
        x = _images(cache, part, device)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            logits = model(x, boxes[s : s + batch].to(device))
        y5 = torch.from_numpy(cache.labels[part]).to(device)
        loss += float(F.cross_entropy(logits.float(), y5 - 1, reduction="sum"))
        pred5 = to_five_class(logits.argmax(1))
        cm += confusion_matrix(y5.cpu().numpy(), pred5.cpu().numpy())
    return cm, loss / max(1, idx.size)


def train_roi(
    cache: SliceCache,
    split: dict[str, str],
    roi_config: ROIConfig,
    cfg: TrainConfig,
    out_dir: PathLike,
    *,
    device: str = "auto",
    threads: Optional[int] = None,
    log: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Train the ROI-level model on the lesion slices of the train split; test the best epoch.

    Same recipe as `train.train`: AdamW (no decay on norms and biases), warm-up + cosine, draws
    balanced over the (four) classes, label smoothing, CT augmentation, gradient clipping, early
    stopping on validation macro F1. The slice and its lesion patch are augmented separately
    (the patch is cut before augmentation, so the box stays on the lesion).
    Returns the run summary; writes best.safetensors + best.json and metrics.csv.
    """
    from safetensors.torch import save_file

    from .pipeline import resolve_device

    t0 = time.perf_counter()
    log = log or (lambda message: print(message, file=sys.stderr))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(max(1, threads or os.cpu_count() or 1))
    amp_dtype = autocast_dtype(dev, cfg.amp)

    parts, unoutlined = {}, 0
    for s in ("train", "val", "test"):
        parts[s], n_missing = _lesion_samples(cache, [c for c, v in split.items() if v == s])
        unoutlined += n_missing
    if parts["train"].size == 0 or parts["val"].size == 0:
        raise UserInputError("the ROI-level model needs outlined lesion slices in both the train and the val split")
    boxes = {s: _boxes(cache, idx) for s, idx in parts.items()}
    box_of = {int(i): b for i, b in zip(parts["train"], boxes["train"])}

    torch.manual_seed(int(np.random.SeedSequence([cfg.seed, 0xC0DE]).generate_state(1)[0]))
    model = ROIClassifier(roi_config).to(dev)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    per_epoch = cfg.samples_per_epoch or int(parts["train"].size)
    steps_per_epoch = max(1, per_epoch // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    c = roi_config
    best, best_epoch, bad, step = None, -1, 0, 0
    best_state: Optional[dict[str, torch.Tensor]] = None
    history: list[dict[str, Any]] = []
    status = "completed"
    for epoch in range(cfg.epochs):
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xE90C, epoch]))
        order = balanced_order(parts["train"], cache.labels, steps_per_epoch * cfg.batch_size, rng)
        model.train()
        t_epoch, loss_sum, correct = time.perf_counter(), 0.0, 0
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            x = _images(cache, idx, dev)
            bx = torch.stack([box_of[int(i)] for i in idx]).to(dev)
            y = torch.from_numpy(cache.labels[idx] - 1).to(dev)
            patches = crop_patches(x, bx, c.patch_size, c.box_margin, c.min_box)
            seed = int(np.random.SeedSequence([cfg.seed, epoch, b]).generate_state(1)[0])
            torch.manual_seed(seed)
            if cfg.augment is not None:
                gen = torch.Generator().manual_seed(seed)
                x = augment_batch(x, cfg.augment, cache.spec.window_width, gen)
                patches = augment_batch(patches, cfg.augment, cache.spec.window_width, gen)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, total, cfg.lr, cfg.warmup_fraction)
            with torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                logits = model.classify(x, patches)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            loss_sum += float(loss.detach()) * y.numel()
            correct += int((logits.argmax(1) == y).sum())
        cm, val_loss = _roi_confusion(model, cache, parts["val"], boxes["val"], dev, amp_dtype, cfg.eval_batch_size)
        val = classification_summary(cm)
        value = {"macro_f1": val["macro_f1"], "accuracy": val["accuracy"], "loss": -val_loss}[cfg.monitor]
        improved = best is None or value > best + 1e-6
        n_seen = steps_per_epoch * cfg.batch_size
        history.append({"epoch": epoch + 1, "step": step, "train_loss": loss_sum / n_seen, "train_acc": correct / n_seen,
                        "val_loss": val_loss, "val_acc": val["accuracy"], "val_macro_f1": val["macro_f1"],
                        "seconds": round(time.perf_counter() - t_epoch, 2), "best": int(improved)})
        log(f"  roi epoch {epoch + 1}/{cfg.epochs}: train loss {history[-1]['train_loss']:.4f}, val acc {val['accuracy']:.4f} "
            f"macro-F1 {val['macro_f1']:.4f}{'  *best*' if improved else ''}")
        if improved:
            best, best_epoch, bad = value, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if cfg.patience and bad >= cfg.patience:
                status = "early_stopped"
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    cm, _ = _roi_confusion(model, cache, parts["test"], boxes["test"], dev, amp_dtype, cfg.eval_batch_size)
    test = classification_summary(cm)
    save_file({k: v.contiguous() for k, v in best_state.items()}, str(out / "best.safetensors"))
    card = {"model": "roi", "architecture": roi_config.to_dict(), "architecture_name": roi_config.display_name,
            "classes": list(LESION_CLASSES), "input": cache.spec.to_dict(), "train": cfg.to_dict(),
            "best_epoch": best_epoch + 1, "test": test, "slices": {s: int(v.size) for s, v in parts.items()},
            "lesion_slices_without_outline": unoutlined}
    (out / "best.json").write_text(json.dumps(card, indent=2))
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    return {"status": status, "epochs_run": len(history), "steps": step, "best_epoch": best_epoch + 1,
            "seconds": round(time.perf_counter() - t0, 1), "history": history,
            "test": {"n_cases": len({cache.cases[int(k)]["case_id"] for k in cache.case[parts["test"]]}), "classification": test}}


# --------------------------------------------------------------------------------------------
# runs


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run_key(method: Method, model_cfg: Any, cfg: CompareConfig, cache: SliceCache, split: dict[str, str]) -> str:
    return _digest({"method": method.key, "model": model_cfg.to_dict(), "train": cfg.train.to_dict(), "input": cache.spec.to_dict(),
                    "rule": cache.rule.to_dict(), "source": cache.source, "split": sorted(split.items()),
                    "cam_threshold": cfg.cam_threshold, "cam_smoothing": cfg.cam_smoothing})


def run_comparison(
    cache: SliceCache,
    cfg: CompareConfig,
    out_dir: PathLike,
    *,
    log: Optional[Callable[[str], None]] = None,
    force: bool = False,
    command: str = "",
) -> list[dict[str, Any]]:
    """Train and test every method on every split; returns (and writes) one result per run.

    `command` (the command line that asked for the runs) is kept in each result for the tables."""
    from .evaluate import evaluate_cache, write_report
    from .train import train

    log = log or (lambda message: print(message, file=sys.stderr))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in cfg.split_seeds:
        split = split_cases(cache.cases, seed, cfg.split_fractions)
        write_split(out / f"split{seed}.csv", split)
        for key in cfg.methods:
            method = METHODS[key]
            model_cfg = cfg.model_config(method)
            run_dir = out / key / f"split{seed}"
            run_key = _run_key(method, model_cfg, cfg, cache, split)
            done = run_dir / RESULT
            if done.is_file() and not force:
                prev = json.loads(done.read_text())
                if prev.get("run_key") == run_key:
                    log(f"[split {seed}] {method.label}: done before, reusing {done}")
                    results.append(prev)
                    continue
            log(f"[split {seed}] {method.label}: training ({getattr(model_cfg, 'display_name', key)})")
            t0 = time.perf_counter()
            if method.kind == "roi":
                summary = train_roi(cache, split, model_cfg, cfg.train, run_dir, device=cfg.device, threads=cfg.threads,
                                    log=lambda m: log(f"[split {seed}] {m}"))
                test = summary["test"]
            else:
                res = train(cache, split, model_cfg, cfg.train, run_dir, device=cfg.device, threads=cfg.threads,
                            evaluate_test=False, log=lambda m: log(f"[split {seed}]   {m}"), progress_bar=False,
                            model_id=f"{method.label} split {seed}", intended_use="comparison run; not for diagnosis",
                            description={"comparison": key, "split_seed": seed})
                # Test the best epoch here (not inside train) so the CAM threshold is the comparison's.
                from .weights import load_checkpoint

                best = load_checkpoint(res.best_weights)
                dev = _device(cfg.device)
                ev = evaluate_cache(best.model, cache, cache.indices_of_cases([c for c, s in split.items() if s == "test"]),
                                    device=dev, amp_dtype=autocast_dtype(dev, cfg.train.amp), batch_size=cfg.train.eval_batch_size,
                                    cam_threshold=cfg.cam_threshold, cam_smoothing=cfg.cam_smoothing)
                write_report(ev, run_dir / "test", title=f"{method.label} (split {seed}): test")
                test = ev.summary["all"]
                summary = {"status": res.status, "epochs_run": res.epochs_run, "steps": res.steps, "best_epoch": res.best_epoch,
                           "seconds": res.seconds}
            result = {
                "method": key, "label": method.label, "kind": method.kind, "split_seed": seed, "run_key": run_key,
                "model": model_cfg.to_dict(), "input": cache.spec.to_dict(), "train": cfg.train.to_dict(),
                "parameters": parameter_count(method, model_cfg),
                "status": summary["status"], "epochs_run": summary["epochs_run"], "steps": summary["steps"],
                "best_epoch": summary["best_epoch"], "seconds": round(time.perf_counter() - t0, 1), "test": test,
                "command": command, "device": str(_device(cfg.device)), "torch": torch.__version__,
            }
            done.write_text(json.dumps(result, indent=1))
            c = test["classification"]
            log(f"[split {seed}] {method.label}: test accuracy {c['accuracy']:.4f}, macro F1 {c['macro_f1']:.4f} "
                f"({result['seconds']:.0f} s)")
            results.append(result)
    return results


def _device(name: str) -> torch.device:
    from .pipeline import resolve_device

    return resolve_device(name)


def parameter_count(method: Method, model_cfg: Any) -> int:
    from .model import build_model

    net = ROIClassifier(model_cfg) if method.kind == "roi" else build_model(model_cfg)
    return int(sum(p.numel() for p in net.parameters()))


def load_results(out_dir: PathLike) -> list[dict[str, Any]]:
    """Every finished run under a comparison folder."""
    return [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob(f"*/split*/{RESULT}"))]


# --------------------------------------------------------------------------------------------
# tables


def _lesion_slice_accuracy(cm: Sequence[Sequence[int]]) -> Optional[float]:
    """Correct lesion slices / lesion slices (a lesion called normal is wrong): comparable across
    the five-class slice models and the four-class ROI model."""
    cm = np.asarray(cm)
    n = cm[1:].sum()
    return float(np.trace(cm[1:, 1:]) / n) if n else None


def _row_values(result: dict[str, Any]) -> dict[str, Optional[float]]:
    c = result["test"]["classification"]
    v: dict[str, Optional[float]] = {f"acc_{k}": c["per_class"][k]["accuracy"] for k in CLASS_NAMES}
    if result["kind"] == "roi":
        v["acc_normal"] = None
    for k in ("accuracy", "macro_f1", "macro_precision", "macro_recall"):
        v[k] = c[k]
    v["lesion_accuracy"] = _lesion_slice_accuracy(c["confusion_matrix"])
    for key, prefix in (("localization", "loc_"), ("localization_true_class", "loct_")):
        loc = result["test"].get(key)
        for k in LESION_CLASSES:
            v[f"{prefix}{k}"] = loc[k]["pointing"] if loc else None
            if key == "localization":
                v[f"iou_{k}"] = loc[k]["iou"] if loc else None
    return v


def aggregate(results: Sequence[dict[str, Any]], methods: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Per method: each figure's mean and spread (half the range) over the splits it was run on."""
    order = [m for m in (methods or METHODS) if any(r["method"] == m for r in results)]
    table: dict[str, Any] = {}
    for key in order:
        runs = sorted((r for r in results if r["method"] == key), key=lambda r: r["split_seed"])
        per_split = [_row_values(r) for r in runs]
        stats = {}
        for name in per_split[0]:
            vals = [p[name] for p in per_split if p[name] is not None]
            if not vals:
                stats[name] = None
                continue
            stats[name] = {"mean": float(np.mean(vals)), "spread": float((max(vals) - min(vals)) / 2), "n": len(vals), "values": vals}
        first = runs[0]
        table[key] = {
            "label": METHODS[key].label, "kind": METHODS[key].kind, "splits": [r["split_seed"] for r in runs],
            "stats": stats, "parameters": first["parameters"], "model": first["model"], "input": first["input"],
            "train": first["train"], "seconds": [r["seconds"] for r in runs], "steps": [r["steps"] for r in runs],
            "best_epoch": [r["best_epoch"] for r in runs],
            "test_slices": [r["test"]["classification"]["n"] for r in runs],
            "test_support": [{k: r["test"]["classification"]["per_class"][k]["support"] for k in CLASS_NAMES} for r in runs],
            "commands": sorted({r.get("command", "") for r in runs} - {""}),
            "devices": sorted({r.get("device", "") for r in runs} - {""}),
        }
    return table


def _cell(stat: Optional[dict[str, Any]], digits: int = 3) -> str:
    if stat is None:
        return "–"
    if stat["n"] < 2:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['spread']:.{digits}f}"


def _paper(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.4f}"


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def format_tables(table: dict[str, Any], command: Optional[str] = None) -> str:
    """The three tables as Markdown, ours (mean ± spread over splits) beside the paper's."""
    names = {"normal": "Normal", "cyst": "CYST", "fnh": "FNH", "hcc": "HCC", "hem": "HEM"}
    roi_note = "ROI-level: given the ground-truth lesion box; 4 lesion classes, lesion slices only."
    out: list[str] = []
    any_row = next(iter(table.values()), None)
    if any_row is None:
        return "(no finished runs)\n"
    splits = sorted({s for t in table.values() for s in t["splits"]})
    out.append(f"Splits: {', '.join(map(str, splits))}. Cells: mean ± spread over the splits (each split lies at mean ± spread).")
    out.append("")
    commands = [command] if command else sorted({c for t in table.values() for c in t.get("commands", [])})
    if commands:
        out += ["All three tables come from " + ("this command:" if len(commands) == 1 else "these commands:"), "", "```", *commands, "```", ""]

    out.append("### Table 1: class-wise accuracy (recall of each class)")
    out.append("")
    rows = [[t["label"]] + [_cell(t["stats"][f"acc_{k}"]) for k in CLASS_NAMES] for t in table.values()]
    out += _md(["Method (ours)"] + [names[k] for k in CLASS_NAMES], rows)
    out.append("")
    rows = [[lab] + [_paper(v.get(k)) for k in CLASS_NAMES] for lab, v in PAPER["class_accuracy"].items()]
    out += _md(["Method (paper)"] + [names[k] for k in CLASS_NAMES], rows)
    out += ["", roi_note, ""]

    out.append("### Table 2: overall classification (macro F1 / precision / recall over the classes)")
    out.append("")
    keys = ("accuracy", "macro_f1", "macro_precision", "macro_recall", "lesion_accuracy")
    rows = []
    for t in table.values():
        label = t["label"] + (" (4 classes)" if t["kind"] == "roi" else "")
        rows.append([label] + [_cell(t["stats"][k]) for k in keys])
    out += _md(["Method (ours)", "Accuracy", "F1", "Precision", "Recall", "Acc. on lesion slices"], rows)
    out.append("")
    rows = [[lab] + [_paper(v[k]) for k in keys[:4]] for lab, v in PAPER["overall"].items()]
    out += _md(["Method (paper)", "Accuracy", "F1", "Precision", "Recall"], rows)
    out += ["", "Acc. on lesion slices: correct / all lesion slices (a lesion called normal is wrong), the one figure "
            "where the five-class slice models and the four-class ROI model answer the same question. " + roi_note, ""]

    out.append("### Table 3: localization accuracy (pointing game with the predicted class's Grad-CAM)")
    out.append("")
    slice_rows = [t for t in table.values() if t["kind"] == "slice"]
    rows = [[t["label"]] + [_cell(t["stats"][f"loc_{k}"]) for k in LESION_CLASSES] +
            [_cell(t["stats"][f"loct_{k}"]) for k in LESION_CLASSES] for t in slice_rows]
    out += _md(["Method (ours)"] + [names[k] for k in LESION_CLASSES] + [f"{names[k]} (true-class CAM)" for k in LESION_CLASSES], rows)
    out.append("")
    rows = [[lab] + [_paper(v[k]) for k in LESION_CLASSES] for lab, v in PAPER["localization"].items()]
    out += _md(["Method (paper)"] + [names[k] for k in LESION_CLASSES], rows)
    out += ["", "A slice counts as localised when its CAM peak lies in the lesion (dilated 2 voxels in-plane); a slice "
            "predicted normal has no heatmap and counts as missed. The true-class columns take the CAM of the true "
            "class, separating localisation from classification errors. The ROI-level model is given the lesion and "
            "has no row.", ""]

    out.append("### Runs")
    out.append("")
    rows = []
    for t in table.values():
        m = t["model"]
        arch = f"{m['backbone']} x{m['width']:g}" + (f", patch {m['patch_size']}" if t["kind"] == "roi" else f", attention {m['attention']}")
        rows.append([t["label"], arch, f"{t['parameters'] / 1e6:.2f} M", " / ".join(map(str, t["steps"])),
                     " / ".join(map(str, t["best_epoch"])), " / ".join(f"{s / 60:.1f}" for s in t["seconds"]),
                     " / ".join(map(str, t["test_slices"]))])
    out += _md(["Method", "Network", "Parameters", "Steps", "Best epoch", "Minutes", "Test slices"], rows)
    tr = any_row["train"]
    devices = sorted({d for t in table.values() for d in t.get("devices", [])})
    out += ["", f"Device: {', '.join(devices) or 'not recorded'}. Input {any_row['input']['size']}x{any_row['input']['size']}; every run: {tr['epochs']} epochs x "
            f"{tr['samples_per_epoch'] or 'all'} slices (batch {tr['batch_size']}, lr {tr['lr']:g}, patience {tr['patience']}, "
            f"balance {tr['balance']}, seed {tr['seed']}). Per-split values are separated by /.", ""]
    return "\n".join(out)


def write_tables(results: Sequence[dict[str, Any]], out_dir: PathLike, methods: Optional[Sequence[str]] = None,
                 command: Optional[str] = None) -> Path:
    """tables.md, tables.json (means, spreads, per-split values) and results.csv (one row per run and figure)."""
    out = Path(out_dir)
    table = aggregate(results, methods)
    (out / "tables.json").write_text(json.dumps({"methods": table, "paper": PAPER}, indent=1))
    (out / "tables.md").write_text(format_tables(table, command) + "\n")
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "label", "split_seed", "figure", "value"])
        for r in sorted(results, key=lambda r: (list(METHODS).index(r["method"]), r["split_seed"])):
            for name, v in _row_values(r).items():
                w.writerow([r["method"], r["label"], r["split_seed"], name, "" if v is None else f"{v:.6g}"])
    return out / "tables.md"
