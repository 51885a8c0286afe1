"""Reorientation to the axial frame is exact and invertible, and geometry stays physically right."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from DADRNLesionLib.orientation import to_axial_frame
from DADRNLesionLib.volume import Volume


def reoriented(volume: Volume, perm, flips) -> Volume:
    """The same physical image stored with array axes permuted/flipped (the geometry follows)."""
    arr = volume.array
    origin = np.array(volume.origin)
    spacing_in = volume.spacing
    cols = [volume.direction[:, 2 - a] for a in range(3)]  # column of array axis a
    new_arr = np.transpose(arr, perm)
    new_cols, new_sp = [], []
    for new_axis, old_axis in enumerate(perm):
        col = cols[old_axis].copy()
        sp = spacing_in[2 - old_axis]
        if flips[new_axis]:
            new_arr = np.flip(new_arr, axis=new_axis)
            origin = origin + col * sp * (arr.shape[old_axis] - 1)
            col = -col
        new_cols.append(col)
        new_sp.append(sp)
    direction = np.stack([new_cols[2], new_cols[1], new_cols[0]], axis=1)
    return Volume(np.ascontiguousarray(new_arr), (new_sp[2], new_sp[1], new_sp[0]), tuple(origin), direction)


def lps_of(volume: Volume, k, j, i):
    return volume.ijk_to_lps_matrix() @ np.array([i, j, k, 1.0])


@pytest.fixture
def base():
    rng = np.random.default_rng(0)
    return Volume(rng.integers(-1000, 1000, (5, 6, 7)).astype(np.int16), (0.7, 0.8, 2.5), (10.0, -20.0, 30.0))


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
@pytest.mark.parametrize("flips", [(False, False, False), (True, False, True), (False, True, False)])
def test_any_axis_order_maps_to_the_same_canonical_volume(base, perm, flips):
    other = reoriented(base, perm, flips)
    canon, frame = to_axial_frame(other)
    assert canon.same_geometry(base)
    assert np.array_equal(canon.array, base.array)
    assert np.array_equal(frame.from_canonical(canon.array), other.array)


def test_canonical_index_maps_back_to_the_same_physical_point(base):
    other = reoriented(base, (2, 0, 1), (True, False, True))
    canon, frame = to_axial_frame(other)
    for kji in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
        back = frame.canonical_index_to_input(*kji)
        assert np.allclose(lps_of(canon, *kji), lps_of(other, *back))


def test_oblique_volume_uses_the_nearest_axes(base):
    a = np.deg2rad(20)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    oblique = Volume(base.array, base.spacing, base.origin, rot @ np.diag([1, -1, 1]))
    canon, frame = to_axial_frame(oblique)
    assert frame.flip == (False, True, False)
    assert "oblique by up to 20.0 degrees" in frame.describe()
    assert np.array_equal(frame.from_canonical(canon.array), oblique.array)
    assert np.allclose(lps_of(canon, 0, 0, 0), lps_of(oblique, *frame.canonical_index_to_input(0, 0, 0)))
