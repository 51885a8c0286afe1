"""Shared fixtures: where the real CT cases live, and small volumes built in memory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DADRNLesion"))  # tests run from a plain clone too

REAL_DATA = Path(os.environ.get("DADRN_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real CT cases not found at {REAL_DATA} (the shared data folder beside the clone); set DADRN_REAL_DATA to run these tests")
    return REAL_DATA


@pytest.fixture(scope="session")
def tiny_model():
    """A randomly initialised small DADRN: fast, and exercises every part of the model."""
    from DADRNLesionLib.preprocess import InputSpec
    from DADRNLesionLib.weights import random_model

    return random_model({"backbone": "drn_d_22", "width": 0.25, "attention": "dual"}, InputSpec(size=64), seed=0)


def make_abdomen(shape=(12, 96, 96), spacing=(1.5, 1.5, 3.0), seed=0):
    """A crude CT-like volume (air, body, liver block) with its liver mask; not a phantom."""
    from DADRNLesionLib.volume import Volume

    rng = np.random.default_rng(seed)
    k, j, i = shape
    jj, ii = np.mgrid[0:j, 0:i]
    body = ((jj - j / 2) / (0.42 * j)) ** 2 + ((ii - i / 2) / (0.45 * i)) ** 2 < 1
    ct = np.full(shape, -1000, dtype=np.int16)
    ct[:, body] = 40
    liver = np.zeros(shape, dtype=np.uint8)
    liv2d = ((jj - 0.45 * j) / (0.22 * j)) ** 2 + ((ii - 0.35 * i) / (0.2 * i)) ** 2 < 1
    liver[2 : k - 2, liv2d] = 1
    ct[liver > 0] = 80
    ct = (ct + rng.normal(0, 10, shape)).astype(np.int16)
    return Volume(ct, spacing, (-70.0, -60.0, 100.0)), Volume(liver, spacing, (-70.0, -60.0, 100.0))


@pytest.fixture
def abdomen():
    return make_abdomen()


@pytest.fixture
def one_torch_thread():
    """Small models train faster on one thread, and far faster on a machine shared with other jobs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
