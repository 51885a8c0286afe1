"""Property-based tests of the readers, the reorientation, preprocessing and the pipeline.

Random shapes, spacings, directions (rotations, axis permutations and flips) and voxel types: no
exception other than the documented UserInputError, and every output on the input's geometry.
Example counts are fixed so that the whole file stays well under a minute.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from DADRNLesionLib.classes import CLASS_NAMES
from DADRNLesionLib.errors import UserInputError
from DADRNLesionLib.io import read_volume, write_volume
from DADRNLesionLib.orientation import to_axial_frame
from DADRNLesionLib.pipeline import PipelineOptions, run_pipeline
from DADRNLesionLib.preprocess import InputSpec, liver_crop_box, liver_slice_indices, maps_to_slices, prepare_batch
from DADRNLesionLib.volume import Volume
from DADRNLesionLib.weights import random_model

DTYPES = (np.int16, np.uint8, np.int32, np.float32, np.float64)
FAST = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _quaternion_matrix(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


@st.composite
def directions(draw, oblique: bool = True) -> np.ndarray:
    """A signed axis permutation, optionally followed by an arbitrary rotation (oblique)."""
    perm = draw(st.permutations([0, 1, 2]))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
    m = np.zeros((3, 3))
    for col, row in enumerate(perm):
        m[row, col] = signs[col]
    if oblique and draw(st.booleans()):
        q = np.array(draw(st.lists(st.floats(-1, 1), min_size=4, max_size=4)))
        assume(np.linalg.norm(q) > 0.2)
        m = _quaternion_matrix(q) @ m
    return m


def _values(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    return (rng.standard_normal(shape) * rng.choice([1.0, 1e3, 1e30])).astype(dtype)


spacings = st.tuples(*[st.floats(0.05, 20.0)] * 3)
origins = st.tuples(*[st.floats(-2000.0, 2000.0)] * 3)


@settings(max_examples=60, **FAST)
@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 7), st.integers(1, 7)), spacing=spacings, origin=origins,
       direction=directions(), dtype=st.sampled_from(DTYPES), suffix=st.sampled_from([".nrrd", ".nii.gz", ".mha", ".nii"]),
       seed=st.integers(0, 2**16))
def test_written_volume_reads_back_with_the_same_voxels_and_geometry(shape, spacing, origin, direction, dtype, suffix, seed):
    vol = Volume(_values(np.random.default_rng(seed), shape, dtype), spacing, origin, direction)
    with tempfile.TemporaryDirectory() as tmp:
        back = read_volume(write_volume(vol, Path(tmp) / f"v{suffix}"))
    assert back.array.dtype == vol.array.dtype and back.shape == vol.shape
    assert np.array_equal(back.array, vol.array, equal_nan=True)
    assert np.allclose(back.spacing, vol.spacing, rtol=1e-6)
    assert np.allclose(back.origin, vol.origin, rtol=1e-6, atol=1e-4)
    assert np.allclose(back.direction, vol.direction, atol=1e-5)


def _valid_file(suffix: str, compress: bool) -> bytes:
    rng = np.random.default_rng(0)
    vol = Volume(rng.integers(-1000, 1000, (3, 8, 8)).astype(np.int16), (0.8, 0.8, 2.0), (1.0, 2.0, 3.0))
    with tempfile.TemporaryDirectory() as tmp:
        return write_volume(vol, Path(tmp) / f"v{suffix}", compress=compress).read_bytes()


VALID = {(s, c): _valid_file(s, c) for s in (".nrrd", ".nii.gz", ".mha", ".nii") for c in (True, False) if not (s == ".nii.gz" and not c)}


@settings(max_examples=150, **FAST)
@given(kind=st.sampled_from(sorted(VALID)), cut=st.one_of(st.none(), st.integers(0, 4000)),
       edits=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6))
def test_damaged_files_give_a_volume_or_a_one_line_error(kind, cut, edits):
    data = bytearray(VALID[kind])
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"damaged{kind[0]}"
        path.write_bytes(bytes(data))
        try:
            vol = read_volume(path)
        except UserInputError as exc:
            assert "\n" not in str(exc) and str(exc)
            return
    assert vol.array.ndim == 3 and min(vol.shape) >= 1
    assert all(np.isfinite(vol.spacing)) and all(np.isfinite(vol.origin))


@settings(max_examples=60, **FAST)
@given(shape=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)), spacing=spacings, origin=origins,
       direction=directions())
def test_axial_frame_round_trip_and_physical_positions(shape, spacing, origin, direction):
    vol = Volume(np.arange(np.prod(shape), dtype=np.int32).reshape(shape), spacing, origin, direction)
    canon, frame = to_axial_frame(vol)
    assert np.array_equal(frame.from_canonical(canon.array), vol.array)
    assert np.allclose(np.abs(canon.direction).argmax(axis=0), [0, 1, 2]) or not np.allclose(np.abs(direction), np.round(np.abs(direction)))
    assert np.all(np.diag(canon.direction) >= -1e-9)  # k runs towards S, j towards P, i towards L
    rng = np.random.default_rng(0)
    for _ in range(4):
        kji = tuple(int(rng.integers(0, n)) for n in canon.shape)
        back = frame.canonical_index_to_input(*kji)
        assert canon.array[kji] == vol.array[back]
        p_canon = canon.ijk_to_lps_matrix() @ np.array([kji[2], kji[1], kji[0], 1.0])
        p_input = vol.ijk_to_lps_matrix() @ np.array([back[2], back[1], back[0], 1.0])
        assert np.allclose(p_canon, p_input, atol=1e-6 * (1 + np.abs(p_input).max()))


@st.composite
def ct_and_liver(draw, min_size: int = 16, max_size: int = 24, dtypes=DTYPES):
    """A CT-like array (air, soft tissue, a liver block with holes) of a random voxel type, and its mask.
    With a random direction any axis may become in-plane, so every axis is at least `min_size`."""
    k, j, i = (draw(st.integers(min_size, max_size)) for _ in range(3))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    liver = np.zeros((k, j, i), dtype=np.uint8)
    lo = [int(rng.integers(0, n)) for n in (k, j, i)]
    hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, (k, j, i))]
    liver[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1
    liver &= (rng.random(liver.shape) > 0.2).astype(np.uint8)
    assume(liver.any())
    dtype = draw(st.sampled_from(dtypes))
    hu = np.where(liver > 0, 80.0, rng.choice([-1000.0, 40.0, -100.0], size=liver.shape)) + rng.normal(0, 20, liver.shape)
    hu[0, 0, 0] = -1000.0
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        hu = np.clip(np.rint(hu), info.min, info.max)
    return hu.astype(dtype), liver


@settings(max_examples=40, **FAST)
@given(data=ct_and_liver(min_size=1, max_size=12), size=st.sampled_from([32, 64]), extreme=st.booleans())
def test_prepare_batch_is_finite_windowed_and_sized(data, size, extreme):
    ct, liver = data
    if extreme and np.issubdtype(ct.dtype, np.integer):
        ct = ct.copy()
        ct.flat[:: 7] = np.iinfo(ct.dtype).max
    elif extreme:
        ct = ct.copy()
        ct.flat[:: 7] = np.finfo(ct.dtype).max
    spec = InputSpec(size=size)
    slices = liver_slice_indices(liver)
    box = liver_crop_box(liver, (0.7, 0.9), spec.margin_mm)
    x = prepare_batch(ct, liver, slices, box, spec)
    assert x.shape == (len(slices), 3, size, size) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    maps = torch.rand(len(slices), 7, 7)
    placed = maps_to_slices(maps, box, liver.shape[1:])
    assert placed.shape == (len(slices), *liver.shape[1:])
    outside = np.ones(liver.shape[1:], dtype=bool)
    outside[box.j0 : box.j1, box.i0 : box.i1] = False
    assert not placed[:, outside].any()


@pytest.fixture(scope="module")
def tiny():
    return random_model({"backbone": "drn_d_22", "width": 0.25, "attention": "dual"}, InputSpec(size=32), seed=4)


@settings(max_examples=12, **FAST)
@given(data=ct_and_liver(dtypes=(np.int16, np.int32, np.float32, np.float64)), spacing=spacings, origin=origins,
       direction=directions())
def test_pipeline_outputs_lie_on_the_input_geometry(tiny, data, spacing, origin, direction):
    ct_array, liver_array = data
    ct = Volume(ct_array, spacing, origin, direction)
    liver = ct.with_array(liver_array)
    res = run_pipeline(ct, liver_mask=liver, model=tiny, options=PipelineOptions(device="cpu", batch_size=4, threads=1))
    for out in (res.liver, res.heatmap, res.labelmap):
        assert out.same_geometry(ct, tol=1e-9) and np.array_equal(out.direction, ct.direction)
    assert np.array_equal(res.labelmap.array > 0, liver_array > 0)
    assert res.heatmap.array.min() >= 0 and res.heatmap.array.max() <= 1
    assert not res.heatmap.array[liver_array == 0].any()
    canon_liver = to_axial_frame(liver)[0].array
    assert len(res.slices) == len(liver_slice_indices(canon_liver))
    for s in res.slices:
        assert np.isclose(s.probabilities.sum(), 1.0, atol=1e-4) and np.isfinite(s.probabilities).all()


@pytest.fixture(scope="module")
def tiny_in_context():
    model = random_model({"backbone": "drn_d_22", "width": 0.25, "attention": "dual"}, InputSpec(size=32), seed=4)
    model.card.extra["decision"] = {"normal_logit_offset": -2.0, "slice_context_mm": 6.0}
    return model


@settings(max_examples=8, **FAST)
@given(data=ct_and_liver(dtypes=(np.int16, np.float32)), spacing=spacings, origin=origins, direction=directions())
def test_in_a_slice_context_every_lesion_slice_has_the_map_of_its_class_on_the_input_geometry(tiny_in_context, data, spacing,
                                                                                              origin, direction):
    ct_array, liver_array = data
    ct = Volume(ct_array, spacing, origin, direction)
    res = run_pipeline(ct, liver_mask=ct.with_array(liver_array), model=tiny_in_context,
                       options=PipelineOptions(device="cpu", batch_size=4, threads=1))
    assert res.report["model"]["slice_context_mm"] == 6.0
    for out in (res.heatmap, res.labelmap):
        assert out.same_geometry(ct, tol=1e-9)
    assert res.heatmap.array.min() >= 0 and res.heatmap.array.max() <= 1 and not res.heatmap.array[liver_array == 0].any()
    heat, _ = to_axial_frame(res.heatmap)
    slice_axis_heat = heat.array.reshape(heat.array.shape[0], -1).max(axis=1)
    frame_k = liver_slice_indices(to_axial_frame(ct.with_array(liver_array))[0].array)
    assert len(res.slices) == len(frame_k)
    for s in res.slices:  # the class is the most probable one of the probabilities reported
        assert np.isclose(s.probabilities.sum(), 1.0, atol=1e-4) and CLASS_NAMES[int(np.argmax(s.probabilities))] == s.predicted_class
        assert (s.cam_peak_ij is None) == (s.predicted_class == "normal")
    # A slice the context made normal keeps no heat (a lesion slice's map may be empty: a random model's CAM can be 0).
    assert int((slice_axis_heat[frame_k] > 0).sum()) <= sum(s.predicted_class != "normal" for s in res.slices)
