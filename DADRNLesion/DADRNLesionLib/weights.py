"""Checkpoints as data: safetensors weights plus a JSON model card that pins their sha256.

Loading never unpickles. A checkpoint is ``NAME.safetensors`` with ``NAME.json`` beside it; the
card holds the architecture config, class order, input spec, training description, metrics and
the weights' sha256, which is verified before the tensors are read. Legacy ``.pt``/``.pth`` files
are accepted only through ``torch.load(weights_only=True)`` and still need a card.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

import torch

from . import __version__
from .classes import CLASS_NAMES
from .errors import WeightsError
from .model import LesionClassifier, ModelConfig, build_model
from .preprocess import InputSpec

__all__ = ["LoadedModel", "ModelCard", "save_checkpoint", "load_checkpoint", "random_model", "sha256_of", "DEMO_WEIGHTS", "card_path_for", "write_card"]

PathLike = Union[str, os.PathLike]
CARD_FORMAT = 1


def _demo_weights() -> Path:
    """Resources/Models in the source tree (two folders up) or in a built Slicer module (one up)."""
    here = Path(__file__).resolve()
    candidates = [here.parents[2] / "Resources" / "Models", here.parents[1] / "Resources" / "Models"]
    if os.environ.get("DADRN_LESION_MODELS"):
        candidates.insert(0, Path(os.environ["DADRN_LESION_MODELS"]))
    for folder in candidates:
        if (folder / "dadrn_demo.safetensors").is_file():
            return folder / "dadrn_demo.safetensors"
    return here.parents[2] / "Resources" / "Models" / "dadrn_demo.safetensors"  # where it ships


DEMO_WEIGHTS = _demo_weights()


@dataclass
class ModelCard:
    model_id: str
    config: ModelConfig
    input: InputSpec
    classes: tuple[str, ...] = CLASS_NAMES
    sha256: str = ""
    intended_use: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CARD_FORMAT,
            "model_id": self.model_id,
            "architecture": self.config.to_dict(),
            "architecture_name": self.config.display_name,
            "classes": list(self.classes),
            "input": self.input.to_dict(),
            "sha256": self.sha256,
            "intended_use": self.intended_use,
            "training": self.training,
            "metrics": self.metrics,
            "package_version": __version__,
            **self.extra,
        }

    def liver_mask_sources(self) -> set[str]:
        """Which liver masks the slices were masked with in training, its starting weights' included:
        "reference" (the data's own) and/or "automatic" (the mask `classify` makes); empty when the
        card does not record its training data."""
        from .data import liver_sources

        return liver_sources([self.training.get("data"), self.training.get("initialised_from")])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelCard":
        if not isinstance(data, dict):
            raise WeightsError(f"the model card is a JSON {type(data).__name__}, not an object; use a card written by `dadrn-lesion train`")
        if int(data.get("format", CARD_FORMAT)) > CARD_FORMAT:
            raise WeightsError(
                f"the model card has format {data.get('format')}, newer than this version reads ({CARD_FORMAT}): update DADRNLesion"
            )
        try:
            extra = {k: v for k, v in data.items() if k not in {
                "format", "model_id", "architecture", "architecture_name", "classes", "input", "sha256",
                "intended_use", "training", "metrics", "package_version"}}
            card = cls(
                model_id=str(data["model_id"]),
                config=ModelConfig.from_dict(data["architecture"]),
                input=InputSpec.from_dict(data.get("input", {})),
                classes=tuple(data["classes"]),
                sha256=str(data.get("sha256", "")),
                intended_use=str(data.get("intended_use", "")),
                training=dict(data.get("training", {})),
                metrics=dict(data.get("metrics", {})),
                extra=extra,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"the model card is malformed ({exc}); use a card written by `dadrn-lesion train`") from None
        named = data.get("architecture_name")
        if named is not None and named != card.config.display_name:
            raise WeightsError(f"the model card names {named!r} but describes {card.config.display_name!r}: the card was edited; use the original")
        spec = card.input.to_dict()
        if not all(math.isfinite(float(v)) for v in spec.values()):
            raise WeightsError(f"the model card's input spec holds a non-finite value ({spec}); use the original card")
        return card


@dataclass
class LoadedModel:
    model: LesionClassifier
    card: ModelCard
    path: Optional[Path]  # None for a randomly initialised model

    @property
    def trained(self) -> bool:
        return self.path is not None


def sha256_of(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def card_path_for(weights: PathLike) -> Path:
    weights = Path(weights)
    return weights.with_name(weights.name.split(".")[0] + ".json")


def write_card(card_path: PathLike, card: dict[str, Any]) -> None:
    """Replace a model card in one step: a reader never sees half a card, a crash leaves the old one."""
    card_path = Path(card_path)
    tmp = card_path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, card_path)


def save_checkpoint(model: LesionClassifier, path: PathLike, card: ModelCard) -> Path:
    """Write NAME.safetensors and NAME.json (card with the file's sha256); returns the weights path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError("weights are saved as .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".partial")
    save_file(state, str(tmp), metadata={"model_id": card.model_id, "format": str(CARD_FORMAT)})
    os.replace(tmp, path)
    card.sha256 = sha256_of(path)
    write_card(card_path_for(path), card.to_dict())
    return path


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise WeightsError(f"{path} is not a valid safetensors file ({exc}); the file may be truncated: copy it again") from None
    if path.suffix in (".pt", ".pth", ".ckpt"):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling refusal or corruption is the user's file
            raise WeightsError(
                f"{path} could not be loaded as plain tensors ({type(exc).__name__}); only weights-only checkpoints are accepted: "
                "convert it to safetensors"
            ) from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightsError(f"{path} does not hold a flat dictionary of tensors; save model.state_dict()")
        return state
    raise WeightsError(f"{path}: unknown weights format {path.suffix!r}; use .safetensors (or a weights-only .pt)")


def load_checkpoint(path: PathLike, *, verify: bool = True) -> LoadedModel:
    """Build the model its card describes and load its weights, refusing anything that does not match."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist: check --weights, or omit it to use the shipped demo model")
    card_file = card_path_for(path)
    if not card_file.is_file():
        raise WeightsError(f"no model card {card_file.name} next to {path.name}: a checkpoint needs its card (written by `dadrn-lesion train`)")
    try:
        card = ModelCard.from_dict(json.loads(card_file.read_text()))
    except json.JSONDecodeError as exc:
        raise WeightsError(f"the model card {card_file} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if tuple(card.classes) != CLASS_NAMES:
        raise WeightsError(f"the checkpoint's classes {list(card.classes)} differ from this tool's {list(CLASS_NAMES)}")
    if verify:
        if not card.sha256:
            raise WeightsError(f"the model card {card_file.name} has no sha256; refusing unverified weights")
        actual = sha256_of(path)
        if actual != card.sha256:
            raise WeightsError(
                f"{path.name} does not match its model card (sha256 {actual[:12]}… vs {card.sha256[:12]}…): "
                "the file is corrupt or was changed; copy it again"
            )
    state = _read_state(path)
    model = build_model(card.config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"{path.name} does not fit the architecture in its card ({card.config.display_name}): "
            f"{len(missing)} missing tensors{' e.g. ' + missing[0] if missing else ''}, "
            f"{len(unexpected)} unexpected{' e.g. ' + unexpected[0] if unexpected else ''}"
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise WeightsError(f"{path.name}: tensor {bad[0]} has shape {tuple(state[bad[0]].shape)}, the card's architecture needs {tuple(expected[bad[0]].shape)}")
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise WeightsError(f"{path.name}: tensor {broken[0]} holds NaN or infinite values ({len(broken)} such tensors): the training diverged; use another checkpoint")
    model.load_state_dict(state, strict=True)
    model.eval()
    return LoadedModel(model, card, path)


def random_model(config: ModelConfig | str = "dadrn50-b", input_spec: Optional[InputSpec] = None, seed: int = 0) -> LoadedModel:
    """An untrained model, for benchmarks and for running the pipeline before any weights exist."""
    torch.manual_seed(seed)
    model = build_model(config).eval()
    spec = input_spec or InputSpec()
    card = ModelCard(
        model_id=f"untrained-{model.config.display_name}",
        config=model.config,
        input=spec,
        intended_use="UNTRAINED random weights: outputs are meaningless",
        extra={"created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    )
    return LoadedModel(model, card, None)
