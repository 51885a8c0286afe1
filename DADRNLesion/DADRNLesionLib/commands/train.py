"""`dadrn-lesion train`: train a model of the DRN/SADRN/CADRN/DADRN family on labelled CT cases.

    dadrn-lesion train --data cases.csv --model dadrn50-b --out runs/dadrn
    torchrun --nproc_per_node=4 -m DADRNLesionLib train --cache runs/cache --model dadrn50-b --out runs/dadrn

Writes OUT/best.safetensors + best.json (model card), metrics.csv, curves.png, split.csv,
summary.json, checkpoint.pt (for --resume) and OUT/test/ (the evaluation of the test split).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from ..cli import add_common_options, add_precision_options, amp_choice
from ..errors import OutputExistsError, UserInputError
from .dataset import add_data_options, add_input_options, describe_cache, input_spec_from, load_cache_from_args, split_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a lesion classifier (any DRN/SADRN/CADRN/DADRN variant) with early stopping and checkpoints",
        description="Data: --data CASES.csv (columns case_id, ct, liver, lesion, slice_labels, patient_id, group, split), "
        "--phantoms N, or --cache DIR. Split by patient with --split-seed (or --split-file).",
    )
    add_data_options(p)
    s = p.add_argument_group("split")
    s.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split by patient (default 0)")
    s.add_argument("--split-fractions", type=float, nargs=3, default=(0.6, 0.2, 0.2), metavar=("TRAIN", "VAL", "TEST"))
    s.add_argument("--split-file", type=Path, metavar="CSV", help="fixed split (case_id,split) instead of the seeded one")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="dadrn50-b", metavar="PRESET|JSON",
                   help="preset (drn50, sadrn50-a/b, cadrn50-a/b, dadrn50-a/b) or a model-config JSON file; the flags below override it")
    m.add_argument("--backbone", help="drn_a_18/34/50, drn_c_26/42/58, drn_d_22/38/54")
    m.add_argument("--width", type=float, help="channel width multiplier (e.g. 0.25 for a small CPU model)")
    m.add_argument("--attention", choices=("none", "spatial", "channel", "dual"))
    m.add_argument("--normalisation", choices=("sigmoid", "softmax"))
    m.add_argument("--fusion", choices=("sum", "concat"))
    m.add_argument("--dropout", type=float)
    add_input_options(p)
    t = p.add_argument_group("optimisation")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=32, help="per process (default 32)")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--samples-per-epoch", type=int, help="slices drawn per epoch (default: the number of training slices)")
    t.add_argument("--balance", choices=("sampler", "loss", "none"), default="sampler",
                   help="class balance: equal draws per class (sampler, default), inverse-frequency loss weights, or none")
    t.add_argument("--label-smoothing", type=float, default=0.05)
    t.add_argument("--localisation-loss", type=float, default=0.0, metavar="WEIGHT",
                   help="add this weight times a loss that pulls the true class's heatmap into the lesion outline, on lesion slices "
                        "whose cache has one (phantoms, painted-in cases, real cases with a lesion mask); 0 (default): slice labels "
                        "alone, as the paper trains. Inference never needs an outline")
    t.add_argument("--no-augment", action="store_true", help="no augmentation")
    t.add_argument("--patience", type=int, default=8, help="early stopping after this many epochs without improvement (0: off)")
    t.add_argument("--monitor", choices=("macro_f1", "accuracy", "loss"), default="macro_f1")
    t.add_argument("--validation-weights", choices=("every-slice", "none"), default="every-slice",
                   help="with --normal-per-case: weigh each kept validation normal slice by the normal slices of its case it "
                        "stands for, so that the monitor estimates every-slice figures (every-slice, default), or count each once")
    t.add_argument("--min-delta", type=float, default=1e-4, help="smallest change of the monitor that counts as an improvement")
    t.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (resume later with --resume)")
    t.add_argument("--time-limit", type=float, metavar="MINUTES",
                   help="train at most this long (wall time of the training loop, earlier sessions of a resumed run "
                        "included): after each epoch the epochs still to come are cut to those that fit, judged by the "
                        "typical recent epoch (one slowed by another job does not count), and the learning-rate schedule is "
                        "fitted to them; the test follows. The run may end about an epoch past the limit")
    t.add_argument("--seed", type=int, default=0, help="seed of initialisation, sampling and augmentation")
    t.add_argument("--grow-from", type=Path, metavar="DIR",
                   help="training data that grows while the run trains: at each epoch's start, every finished cache in a "
                        "sub-folder of DIR (as `dataset cache --cache DIR/NAME` writes them, e.g. from phantom generators "
                        "still running) joins the training split, its normal slices thinned as --normal-per-case; "
                        "validation and test stay those of --cache/--data. Under torchrun DIR must be visible to every process")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, type=Path, metavar="DIR")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    r.add_argument("--init-weights", type=Path, metavar="FILE",
                   help="start from these weights (a .safetensors with its model card, checksum verified) instead of a "
                        "random initialisation: fine-tuning; the architecture must be the same")
    r.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds a run")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (under torchrun: one GPU per process)")
    add_precision_options(r)
    r.add_argument("--threads", type=int, help="CPU threads per process")
    r.add_argument("--model-id", help="model id written into the card")
    r.add_argument("--intended-use", default="Research use on labelled data; not for diagnosis.", help="the card's intended-use statement")
    r.add_argument("--no-test", action="store_true", help="do not evaluate the test split at the end")
    r.add_argument("--calibrate", action="store_true",
                   help="after training, choose the normal-logit offset (prior correction of the class-balanced training) by macro F1 "
                        "on every labelled validation slice, record it in the card and test with it (`dadrn-lesion calibrate` does the same later)")
    add_common_options(p)
    p.set_defaults(run=run)


def model_config_from(args):
    from ..model import PRESETS, ModelConfig

    if args.model in PRESETS:
        base = PRESETS[args.model].to_dict()
    elif Path(args.model).is_file():
        try:
            base = json.loads(Path(args.model).read_text())
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{args.model} is not valid JSON ({exc.msg})") from None
        base = base.get("architecture", base)  # a model card works too
    else:
        raise UserInputError(f"--model {args.model!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    for key in ("backbone", "width", "attention", "normalisation", "fusion", "dropout"):
        v = getattr(args, key)
        if v is not None:
            base[key] = v
    try:
        config = ModelConfig.from_dict(base)
        from ..model import build_model

        build_model(config)  # unknown backbone etc. fail here, before any data work
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
    return config


def run(args) -> int:
    from ..growing import GrowSource
    from ..train import AugmentConfig, TrainConfig, train

    rank = int(os.environ.get("RANK", "0"))
    reporter = args.reporter
    if rank != 0:
        reporter.quiet = True
    config = model_config_from(args)
    spec = input_spec_from(args)
    out: Path = args.out
    if not args.resume and (out / "checkpoint.pt").exists() and not args.overwrite:
        raise OutputExistsError(f"{out} already holds a training run: pass --resume to continue it, --overwrite to start afresh, or another --out")
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        samples_per_epoch=args.samples_per_epoch, balance=args.balance, label_smoothing=args.label_smoothing,
        augment=None if args.no_augment else AugmentConfig(), amp=amp_choice(args),
        patience=args.patience, monitor=args.monitor,
        validation_weights=args.validation_weights.replace("-", "_"), min_delta=args.min_delta, seed=args.seed, max_steps=args.max_steps,
        time_limit_s=None if args.time_limit is None else args.time_limit * 60.0, calibrate=args.calibrate,
        localisation_loss=args.localisation_loss,
    )
    if args.grow_from is not None and args.grow_from.exists() and not args.grow_from.is_dir():
        raise UserInputError(f"--grow-from {args.grow_from} is a file: give the folder the caches are written into "
                             "(each in a sub-folder of its own)")
    init_from = _init_weights(args.init_weights, config) if args.init_weights and not args.resume else None
    full = _cache_for_rank(args, spec, reporter, rank)
    # Train and validate on thinned normal slices if asked; test on every labelled slice.
    cache = full.thin_normal_slices(args.normal_per_case) if args.normal_per_case is not None else full
    split = split_from_args(args, cache)
    if rank == 0:
        reporter.info(describe_cache(cache, split))
        reporter.info(f"training {config.display_name} at {spec.size}x{spec.size} -> {out}")
    description = {
        "command": "dadrn-lesion " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "split_seed": None if args.split_file else args.split_seed,
        "split_file": str(args.split_file) if args.split_file else None,
    }

    def log(message: str) -> None:
        reporter.info(message)

    result = train(
        cache, split, config, cfg, out, device=args.device, threads=args.threads, resume=args.resume,
        init_from=init_from, model_id=args.model_id, intended_use=args.intended_use, description=description,
        evaluate_test=not args.no_test, test_cache=full, log=log, progress_bar=not args.quiet and args.progress_format == "text",
        grow=GrowSource(args.grow_from, args.normal_per_case) if args.grow_from else None,
    )
    if rank == 0:
        reporter.done(out=str(out), status=result.status, best_epoch=result.best_epoch, steps=result.steps,
                      weights=str(result.best_weights) if result.best_weights else None)
    return 0


def _init_weights(path: Path, config):
    """Load (and verify) the starting weights; refuse another architecture before any data work."""
    from ..weights import load_checkpoint

    loaded = load_checkpoint(path)
    theirs, ours = loaded.card.config.to_dict(), config.to_dict()
    differ = sorted(k for k in set(theirs) | set(ours) if k != "dropout" and theirs.get(k) != ours.get(k))
    if differ:
        detail = ", ".join(f"{k}: {theirs.get(k)!r} in the weights vs {ours.get(k)!r} here" for k in differ)
        raise UserInputError(f"--init-weights {path} holds another architecture ({detail}): "
                             "give the same --model/--backbone/--width/... as its card")
    return loaded


def _cache_for_rank(args, spec, reporter, rank: int):
    """Rank 0 builds (and saves) the cache; the other ranks wait and read it, so the volumes are
    read once per node. Without --cache every rank prepares its own copy."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or args.cache is None:
        return load_cache_from_args(args, spec, reporter, thin=False)
    import torch.distributed as dist
    from datetime import timedelta

    from ..pipeline import resolve_device

    backend = "nccl" if resolve_device(args.device).type == "cuda" else "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(hours=3))
    if rank == 0:
        cache = load_cache_from_args(args, spec, reporter, thin=False)
    dist.barrier()
    if rank != 0:
        from ..data import SliceCache

        cache = SliceCache.load(args.cache, mmap=True)
    return cache
