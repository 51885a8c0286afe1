"""Weights are data: safetensors + card, checksum verified, mismatches refused, pickles never run."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from DADRNLesionLib.errors import WeightsError
from DADRNLesionLib.preprocess import InputSpec
from DADRNLesionLib.weights import ModelCard, card_path_for, load_checkpoint, random_model, save_checkpoint, sha256_of

CFG = {"backbone": "drn_d_22", "width": 0.25, "attention": "dual"}


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    loaded = random_model(CFG, InputSpec(size=64), seed=5)
    card = ModelCard("test-model", loaded.model.config, InputSpec(size=64), intended_use="tests")
    return save_checkpoint(loaded.model, tmp_path / "m.safetensors", card)


def test_round_trip_gives_identical_outputs(checkpoint):
    card = json.loads(card_path_for(checkpoint).read_text())
    assert card["sha256"] == sha256_of(checkpoint)
    assert card["classes"] == ["normal", "cyst", "fnh", "hcc", "hem"]
    loaded = load_checkpoint(checkpoint)
    again = load_checkpoint(checkpoint)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), again.model(x))
    assert loaded.card.input.size == 64 and loaded.trained


def test_changed_weights_fail_the_checksum(checkpoint):
    data = bytearray(checkpoint.read_bytes())
    data[-10] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match its model card"):
        load_checkpoint(checkpoint)


def test_truncated_file_is_refused(checkpoint):
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    card_file = card_path_for(checkpoint)
    card = json.loads(card_file.read_text())
    card["sha256"] = sha256_of(checkpoint)  # even with a matching checksum the file must be refused
    card_file.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="not a valid safetensors|truncated"):
        load_checkpoint(checkpoint)


def test_card_architecture_must_match_the_tensors(checkpoint):
    card_file = card_path_for(checkpoint)
    card = json.loads(card_file.read_text())
    card["architecture"]["attention"] = "none"
    del card["architecture_name"]  # a consistent card, just not for these tensors
    card_file.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="does not fit the architecture"):
        load_checkpoint(checkpoint)


def test_extra_tensors_are_refused(tmp_path):
    from safetensors.torch import save_file

    loaded = random_model(CFG, InputSpec(size=64))
    state = dict(loaded.model.state_dict())
    state["smuggled.weight"] = torch.zeros(3)
    path = tmp_path / "x.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    card = ModelCard("x", loaded.model.config, InputSpec(size=64), sha256=sha256_of(path))
    card_path_for(path).write_text(json.dumps(card.to_dict()))
    with pytest.raises(WeightsError, match="1 unexpected"):
        load_checkpoint(path)


def test_wrong_classes_and_missing_card_are_refused(checkpoint):
    card_file = card_path_for(checkpoint)
    card = json.loads(card_file.read_text())
    card["classes"] = ["normal", "tumour"]
    card_file.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="classes"):
        load_checkpoint(checkpoint)
    card_file.unlink()
    with pytest.raises(WeightsError, match="no model card"):
        load_checkpoint(checkpoint)


class _Payload:
    """Unpickling this object would create a file: the proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"fc.weight": _Payload(str(marker))}, fh)
    loaded = random_model(CFG, InputSpec(size=64))
    card = ModelCard("evil", loaded.model.config, InputSpec(size=64), sha256=sha256_of(path))
    card_path_for(path).write_text(json.dumps(card.to_dict()))
    with pytest.raises(WeightsError, match="weights-only|plain tensors"):
        load_checkpoint(path)
    assert not marker.exists()


def test_legacy_weights_only_checkpoint_loads(tmp_path):
    loaded = random_model(CFG, InputSpec(size=64), seed=2)
    path = tmp_path / "legacy.pt"
    torch.save(loaded.model.state_dict(), path)
    card = ModelCard("legacy", loaded.model.config, InputSpec(size=64), sha256=sha256_of(path))
    card_path_for(path).write_text(json.dumps(card.to_dict()))
    again = load_checkpoint(path)
    assert torch.equal(again.model.fc.weight, loaded.model.fc.weight)


def test_unverified_card_is_refused(checkpoint):
    card_file = card_path_for(checkpoint)
    card = json.loads(card_file.read_text())
    card["sha256"] = ""
    card_file.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="no sha256"):
        load_checkpoint(checkpoint)
