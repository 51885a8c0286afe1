"""The bad-input matrix of docs/reliability.md: every row is a test here.

Each bad input gets either a correct result on the input's own geometry (the geometry cases) or a
UserInputError whose one-line message names the problem and what to do; through the CLI that is one
``dadrn-lesion: error:`` line, exit code 2 and no traceback. DICOM cases are built from the real
series in ../shared/data/real by editing tags with pydicom, and skip when that folder is absent.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DADRNLesionLib import cli as cli_module
from DADRNLesionLib import outputs
from DADRNLesionLib.errors import NoLiverFoundError, UserInputError
from DADRNLesionLib.io import WriteError, read_mask, read_volume, write_volume
from DADRNLesionLib.limits import MemoryLimitError, available_memory_bytes, check_fits, estimate_bytes
from DADRNLesionLib.orientation import to_axial_frame
from DADRNLesionLib.outputs import RESULT_FILES, write_results
from DADRNLesionLib.pipeline import PipelineOptions, run_pipeline
from DADRNLesionLib.preprocess import InputSpec
from DADRNLesionLib.volume import GeometryMismatchError, Volume
from DADRNLesionLib.weights import ModelCard, random_model, save_checkpoint

from conftest import REPO, make_abdomen
from test_orientation import reoriented

TINY = {"backbone": "drn_d_22", "width": 0.25, "attention": "dual"}


# -- helpers shared with the other reliability test files -----------------------------------------
def cli(*args, timeout=300):
    """`dadrn-lesion ARGS` in a fresh process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "DADRNLesion")}
    return subprocess.run([sys.executable, "-m", "DADRNLesionLib", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dadrn-lesion: error")]


def assert_one_line_error(code: int, stderr: str, *needles: str) -> str:
    lines = error_lines(stderr)
    assert code == 2, stderr
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def save_tiny_weights(folder: Path, seed: int = 1, hcc_bias: float = 8.0) -> Path:
    import torch

    loaded = random_model(TINY, InputSpec(size=64), seed=seed)
    with torch.no_grad():
        loaded.model.fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, hcc_bias, 0.0]))
    card = ModelCard("reliability-test", loaded.model.config, InputSpec(size=64), intended_use="tests")
    return save_checkpoint(loaded.model, folder / "tiny.safetensors", card)


def run(ct, liver, model, **kw):
    return run_pipeline(ct, liver_mask=liver, model=model, options=PipelineOptions(device="cpu", batch_size=8, threads=1, **kw))


def assert_on_geometry(result, ct: Volume) -> None:
    for vol in (result.liver, result.heatmap, result.labelmap):
        assert vol.shape == ct.shape
        assert np.allclose(vol.spacing, ct.spacing, rtol=1e-6)
        assert np.allclose(vol.origin, ct.origin, atol=1e-6)
        assert np.allclose(vol.direction, ct.direction, atol=1e-9)


@pytest.fixture(scope="module")
def model():
    import torch

    loaded = random_model(TINY, InputSpec(size=64), seed=1)
    with torch.no_grad():
        loaded.model.fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 8.0, 0.0]))
    return loaded


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("study")
    ct, liver = make_abdomen()
    write_volume(ct, folder / "ct.nrrd")
    write_volume(liver, folder / "liver.nii.gz")
    return folder


def in_process_cli(capsys, *args) -> tuple[int, str]:
    code = cli_module.main([str(a) for a in args])
    return code, capsys.readouterr().err


# == files that are not a readable 3D CT =========================================================
def test_missing_path(tmp_path):
    with pytest.raises(UserInputError, match="does not exist: check the path"):
        read_volume(tmp_path / "nowhere.nii.gz")


def test_empty_file(tmp_path):
    (tmp_path / "ct.nii.gz").write_bytes(b"")
    with pytest.raises(UserInputError, match=r"empty \(0 bytes\)"):
        read_volume(tmp_path / "ct.nii.gz")


def _damage(data: bytes, how: str) -> bytes:
    if how == "truncated":
        return data[: len(data) * 2 // 3]
    damaged = bytearray(data)
    for i in range(len(data) // 2, len(data) // 2 + 64):
        damaged[i] ^= 0x5A
    return bytes(damaged)


@pytest.mark.parametrize("suffix, compress, how, message", [
    (".nii.gz", True, "truncated", "incomplete or corrupt"),
    (".nii.gz", True, "corrupt", "incomplete or corrupt|cannot read"),
    (".nii", False, "truncated", "truncated"),
    (".nrrd", True, "truncated", "incomplete or corrupt"),
    (".nrrd", True, "corrupt", "incomplete or corrupt"),
    (".nrrd", False, "truncated", "cannot read"),
    (".mha", True, "truncated", "truncated"),
    (".mha", True, "corrupt", "corrupt"),
    (".mha", False, "truncated", "truncated"),
])
def test_truncated_or_corrupt_file_is_refused_not_zero_filled(tmp_path, suffix, compress, how, message):
    # SimpleITK's NIfTI and MetaImage readers return a half-zero volume for these without complaint.
    ct, _ = make_abdomen()
    path = write_volume(ct, tmp_path / f"ct{suffix}", compress=compress)
    path.write_bytes(_damage(path.read_bytes(), how))
    with pytest.raises(UserInputError, match=message) as info:
        read_volume(path)
    assert "\n" not in str(info.value) and ("again" in str(info.value) or "use a NIfTI" in str(info.value))


@pytest.mark.parametrize("name, content, message", [
    ("notes.txt", b"patient notes\n", "cannot read"),
    ("notes.nii.gz", b"not an image at all", "cannot read"),
])
def test_text_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserInputError, match=message):
        read_volume(tmp_path / name)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_png_photo(tmp_path, mode):
    from PIL import Image

    Image.new(mode, (32, 32)).save(tmp_path / "photo.png")
    with pytest.raises(UserInputError, match="2D image; a 3D CT volume"):
        read_volume(tmp_path / "photo.png")


def test_2d_image(tmp_path):
    sitk.WriteImage(sitk.Image([64, 64], sitk.sitkInt16), str(tmp_path / "slice.nrrd"))
    with pytest.raises(UserInputError, match="2D image"):
        read_volume(tmp_path / "slice.nrrd")


def test_4d_image(tmp_path):
    sitk.WriteImage(sitk.Image([16, 16, 4, 3], sitk.sitkInt16), str(tmp_path / "perfusion.nii.gz"))
    with pytest.raises(UserInputError, match="4D image .* extract one 3D"):
        read_volume(tmp_path / "perfusion.nii.gz")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_4d_image_with_one_time_point_is_a_3d_volume(tmp_path, suffix):
    image = sitk.JoinSeries([sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))])
    assert image.GetDimension() == 4
    sitk.WriteImage(image, str(tmp_path / f"one{suffix}"))
    vol = read_volume(tmp_path / f"one{suffix}")
    assert vol.shape == (4, 5, 6) and vol.array[3, 4, 5] == 4 * 5 * 6 - 1


@pytest.mark.parametrize("pixel, suffix", [(sitk.sitkVectorFloat32, ".nrrd"), (sitk.sitkVectorUInt8, ".nii.gz"), (sitk.sitkVectorUInt8, ".nrrd")])
def test_vector_or_rgb_volume(tmp_path, pixel, suffix):
    sitk.WriteImage(sitk.Image([16, 16, 4], pixel, 3), str(tmp_path / f"rgb{suffix}"))
    with pytest.raises(UserInputError, match="3 components per voxel"):
        read_volume(tmp_path / f"rgb{suffix}")


# == volumes that are not CT in HU ================================================================
def test_constant_volume(model):
    ct, liver = make_abdomen()
    with pytest.raises(UserInputError, match="constant"):
        run(ct.with_array(np.full(ct.shape, -1000, np.int16)), liver, model)


def test_all_air_volume_without_mask_finds_no_liver(model):
    ct, _ = make_abdomen()
    air = (-1000 + np.random.default_rng(0).normal(0, 15, ct.shape)).astype(np.int16)
    with pytest.raises(NoLiverFoundError, match="liver-mask|no body"):
        run(ct.with_array(air), None, model)


def test_mr_like_volume(model):
    ct, liver = make_abdomen()
    mr = np.random.default_rng(0).integers(0, 1500, ct.shape).astype(np.int16)
    for mask in (liver, None):
        with pytest.raises(UserInputError, match="Hounsfield"):
            run(ct.with_array(mr), mask, model)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_a_float_volume(tmp_path, model, bad):
    ct, liver = make_abdomen()
    values = ct.array.astype(np.float32)
    values[5, 40, 40] = bad
    path = write_volume(ct.with_array(values), tmp_path / "ct.nrrd")
    with pytest.raises(UserInputError, match="NaN or infinite"):
        run(read_volume(path), liver, model)


@pytest.mark.parametrize("dtype, low, high", [(np.int16, -32768, 32767), (np.int32, -(2**31), 2**31 - 1), (np.float64, -1e30, 1e30)])
def test_extreme_values_give_the_same_result_as_values_at_the_window_edge(model, dtype, low, high):
    """Padding (-32768), metal, or absurd floats: the HU window clips them, so the result is the
    one the clipped volume gives, and nothing overflows."""
    ct, liver = make_abdomen()
    lo_hu, hi_hu = InputSpec().window
    extreme = ct.array.astype(dtype)
    clipped = ct.array.astype(np.float64)
    extreme[:, :6, :] = low  # padding outside the field of view
    clipped[:, :6, :] = lo_hu - 1
    inside = np.argwhere(liver.array > 0)[::97]
    extreme[tuple(inside.T)] = high  # "metal" inside the liver
    clipped[tuple(inside.T)] = hi_hu + 1
    a, b = run(ct.with_array(extreme), liver, model), run(ct.with_array(clipped), liver, model)
    assert np.array_equal(a.labelmap.array, b.labelmap.array)
    pa, pb = (np.stack([s.probabilities for s in r.slices]) for r in (a, b))
    assert np.isfinite(pa).all() and np.allclose(pa, pb, atol=1e-6)
    assert np.allclose(a.heatmap.array, b.heatmap.array, atol=1e-5)


# == sizes and geometry ==========================================================================
@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiny_volumes_with_a_mask(model, n):
    ct, liver = make_abdomen(shape=(n + 4, 96, 96))
    ct_n = Volume(ct.array[2 : 2 + n].copy(), ct.spacing, ct.origin)
    liver_n = Volume(liver.array[2 : 2 + n].copy(), ct.spacing, ct.origin)
    res = run(ct_n, liver_n, model)
    assert_on_geometry(res, ct_n)
    assert [s.slice_index for s in res.slices] == list(range(n))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiny_volumes_without_a_mask(model, n):
    ct, _ = make_abdomen(shape=(n + 4, 96, 96))
    ct_n = Volume(ct.array[2 : 2 + n].copy(), ct.spacing, ct.origin)
    try:
        res = run(ct_n, None, model)
    except NoLiverFoundError as exc:  # too little anatomy to find a liver in: a clear refusal is right
        assert "--liver-mask" in str(exc) and "\n" not in str(exc)
    else:
        assert_on_geometry(res, ct_n)


def test_real_three_slice_dicom_with_its_liver_segmentation(real_data, model):
    case = real_data / "dcmqi_ct3slice"
    ct = read_volume(case / "dicom")
    liver = read_mask(case / "liver_seg.nrrd", like=ct, require_binary=True)
    res = run(ct, liver, model)
    assert ct.shape[0] == 3
    assert_on_geometry(res, ct)
    assert np.array_equal(res.labelmap.array > 0, liver.array > 0)


def test_too_small_in_plane(model):
    ct, liver = make_abdomen(shape=(6, 12, 12))
    with pytest.raises(UserInputError, match="too small"):
        run(ct, liver, model)


def _rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]), "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


@pytest.mark.parametrize("name, perm, flips", [
    ("sagittal", (2, 1, 0), (False, True, False)),
    ("coronal", (1, 0, 2), (True, False, False)),
])
def test_non_axial_stored_volume_gives_the_axial_result_on_its_own_geometry(tmp_path, model, name, perm, flips):
    ct, liver = make_abdomen()
    ref = run(ct, liver, model)
    path = write_volume(reoriented(ct, perm, flips), tmp_path / f"{name}.nrrd")
    mask_path = write_volume(reoriented(liver, perm, flips), tmp_path / f"{name}_liver.nii.gz")
    stored = read_volume(path)
    assert to_axial_frame(stored)[1].slice_axis_is_axial is False
    res = run(stored, read_mask(mask_path, like=stored, require_binary=True), model)
    assert_on_geometry(res, stored)
    assert np.array_equal(to_axial_frame(res.labelmap)[0].array, ref.labelmap.array)
    assert np.allclose(to_axial_frame(res.heatmap)[0].array, ref.heatmap.array, atol=1e-5)
    assert "not axial" in res.report["input"]["orientation"]


@pytest.mark.parametrize("axis, degrees", [("z", 30.0), ("x", 20.0), ("x", 60.0)])
def test_oblique_direction_keeps_its_geometry(tmp_path, model, axis, degrees):
    ct, liver = make_abdomen(shape=(24, 64, 64))  # at 60 degrees the j axis is the nearest to S-I
    turn = _rotation(axis, degrees)
    for v in (ct, liver):
        v.direction = turn
    stored = read_volume(write_volume(ct, tmp_path / "oblique.nii.gz"))
    mask = read_mask(write_volume(liver, tmp_path / "oblique_liver.nrrd"), like=stored, require_binary=True)
    assert np.allclose(stored.direction, turn, atol=1e-6)
    res = run(stored, mask, model)
    assert_on_geometry(res, stored)
    assert np.array_equal(res.labelmap.array > 0, liver.array > 0)
    assert len(res.slices) > 0


def test_anisotropic_voxels(model):
    ct, liver = make_abdomen(shape=(8, 192, 160), spacing=(0.5, 0.5, 10.0))
    res = run(ct, liver, model)
    assert_on_geometry(res, ct)
    assert [s.slice_index for s in res.slices] == list(range(2, 6))
    assert np.array_equal(res.labelmap.array > 0, liver.array > 0)


# == the liver mask ==============================================================================
@pytest.mark.parametrize("change", ["size", "spacing", "origin"])
def test_liver_mask_on_another_grid_is_refused(tmp_path, change):
    ct, liver = make_abdomen()
    if change == "size":
        _, liver = make_abdomen(shape=(14, 96, 96))
    elif change == "spacing":
        liver = Volume(liver.array, (1.4, 1.5, 3.0), liver.origin)
    else:
        liver = Volume(liver.array, liver.spacing, (0.0, 0.0, 0.0))
    path = write_volume(liver, tmp_path / "liver.nii.gz")
    with pytest.raises(GeometryMismatchError, match="resample the liver mask onto the image"):
        read_mask(path, like=ct, require_binary=True)


def test_liver_mask_stored_with_flipped_axes_is_accepted(tmp_path, model):
    ct, liver = make_abdomen()
    path = write_volume(reoriented(liver, (0, 1, 2), (False, True, False)), tmp_path / "liver.nii.gz")
    mask = read_mask(path, like=ct, require_binary=True)
    assert np.array_equal(mask.array, liver.array)


def test_empty_liver_mask(model):
    ct, liver = make_abdomen()
    with pytest.raises(UserInputError, match="liver mask is empty"):
        run(ct, liver.with_array(np.zeros_like(liver.array)), model)


def test_multi_label_liver_mask_is_refused(tmp_path):
    ct, liver = make_abdomen()
    organs = liver.array * np.uint8(5)
    organs[:, :10, :10] = 2  # another organ's label, as in a TotalSegmentator file
    path = write_volume(liver.with_array(organs), tmp_path / "organs.nii.gz")
    with pytest.raises(UserInputError, match="not binary: it holds 2 non-zero values .* 0/1 mask"):
        read_mask(path, like=ct, require_binary=True)


@pytest.mark.parametrize("dtype, value", [(np.uint8, 255), (np.float32, 1.0), (np.int32, 7)])
def test_two_valued_masks_are_binary(tmp_path, dtype, value):
    ct, liver = make_abdomen()
    path = write_volume(liver.with_array(liver.array.astype(dtype) * dtype(value)), tmp_path / "liver.nrrd")
    mask = read_mask(path, like=ct, require_binary=True)
    assert mask.array.dtype == np.uint8 and np.array_equal(mask.array, liver.array)


def test_nan_in_a_float_liver_mask(tmp_path):
    ct, liver = make_abdomen()
    values = liver.array.astype(np.float32)
    values[0, 0, 0] = np.nan
    path = write_volume(liver.with_array(values), tmp_path / "liver.nrrd")
    with pytest.raises(UserInputError, match="NaN"):
        read_mask(path, like=ct)


def test_no_liver_found(model):
    ct, _ = make_abdomen(shape=(16, 96, 96))
    fat = np.where(ct.array > -500, -100, ct.array) + np.random.default_rng(1).normal(0, 10, ct.shape)
    with pytest.raises(NoLiverFoundError, match="--liver-mask"):
        run(ct.with_array(fat.astype(np.int16)), None, model)


# == DICOM folders, built from the real series ==================================================
def _dicom_copy(real_data: Path, dest: Path, mutate=None) -> Path:
    src = real_data / "ts_contrast_dicom" / "dicom"
    dest.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        shutil.copy(f, dest / f.name)
    if mutate is not None:
        mutate(sorted(dest.iterdir()))
    return dest


def _edit(path: Path, **tags) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path)


def _extra_image(files: list[Path], index: int, name: str, **tags) -> None:
    """A copy of one slice, saved as a new instance with `tags` changed (a localizer, a reformat)."""
    import pydicom

    target = files[0].parent / name
    shutil.copy(files[index], target)
    _edit(target, SOPInstanceUID=pydicom.uid.generate_uid(), InstanceNumber=900 + index, **tags)


def _shift_z(path: Path, dz: float = 0.0, dx: float = 0.0) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x + dx, y, z + dz]
    ds.save_as(path)


@pytest.fixture(scope="module")
def plain_series(real_data, tmp_path_factory) -> Volume:
    return read_volume(real_data / "ts_contrast_dicom" / "dicom")


def test_dicom_folder_with_several_series(real_data, tmp_path):
    def two(files):
        for f in files[10:]:
            _edit(f, SeriesInstanceUID="1.2.826.0.1.3680043.8.498.1")

    folder = _dicom_copy(real_data, tmp_path / "two", two)
    with pytest.raises(UserInputError, match=r"holds 2 DICOM series .*1\.2\.826\.0\.1\.3680043\.8\.498\.1 \(10 files\).*--series UID"):
        read_volume(folder)
    chosen = read_volume(folder, series_uid="1.2.826.0.1.3680043.8.498.1")
    assert chosen.shape == (10, 512, 512)


@pytest.mark.parametrize("kind", ["localizer", "reformat"])
def test_dicom_localizer_or_reformat_mixed_into_the_series_is_left_out(real_data, tmp_path, plain_series, kind):
    tags = {
        "localizer": dict(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], ImageOrientationPatient=[1, 0, 0, 0, 0, -1],
                          ImagePositionPatient=[-250.0, 0.0, -700.0]),
        "reformat": dict(ImageType=["DERIVED", "SECONDARY", "REFORMATTED"], ImageOrientationPatient=[0, 1, 0, 0, 0, -1]),
    }[kind]
    folder = _dicom_copy(real_data, tmp_path / kind, lambda files: _extra_image(files, 7, f"zz_{kind}", **tags))
    notes: list[str] = []
    vol = read_volume(folder, notes=notes)
    assert vol.same_geometry(plain_series, tol=1e-6) and np.array_equal(vol.array, plain_series.array)
    assert len(notes) == 1 and "left out 1 image" in notes[0] and f"zz_{kind}" in notes[0]


def test_dicom_localizer_warning_reaches_the_user_and_the_report(real_data, tmp_path, weights, capsys):
    import json

    folder = _dicom_copy(real_data, tmp_path / "series", lambda files: _extra_image(
        files, 3, "scout", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], ImageOrientationPatient=[0, 1, 0, 0, 0, -1]))
    labels = read_volume(real_data / "ts_contrast_dicom" / "totalsegmentator_fast_labels.nii.gz")
    mask = write_volume(labels.with_array((labels.array == 5).astype(np.uint8)), tmp_path / "liver.nii.gz")
    code, err = in_process_cli(capsys, "classify", folder, "--liver-mask", mask, "--weights", weights, "--device", "cpu",
                               "--out", tmp_path / "out")
    assert code == 0, err
    assert "warning: input: left out 1 image(s)" in err and "scout" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert any("localizer" in w for w in report["warnings"])


def test_dicom_series_made_only_of_other_orientations_is_refused(real_data, tmp_path):
    def mixed(files):
        for f in files[:8]:
            _edit(f, ImageOrientationPatient=[1, 0, 0, 0, 0, -1])

    folder = _dicom_copy(real_data, tmp_path / "mixed", mixed)
    with pytest.raises(UserInputError, match="mixes images of different orientation"):
        read_volume(folder)


def test_dicom_missing_slice(real_data, tmp_path):
    folder = _dicom_copy(real_data, tmp_path / "gap", lambda files: files[9].unlink())
    with pytest.raises(UserInputError, match=r"gap: about 1 slice\(s\) missing .*step 4 mm where the series steps 2 mm"):
        read_volume(folder)


def test_dicom_varying_slice_spacing(real_data, tmp_path):
    def uneven(files):
        for f in files[12:]:
            _shift_z(f, dz=0.6)

    folder = _dicom_copy(real_data, tmp_path / "uneven", uneven)
    with pytest.raises(UserInputError, match="uneven slice spacing"):
        read_volume(folder)


def test_dicom_duplicate_slice_positions(real_data, tmp_path):
    folder = _dicom_copy(real_data, tmp_path / "dup", lambda files: _extra_image(files, 4, "again"))
    with pytest.raises(UserInputError, match="duplicate slice position"):
        read_volume(folder)


def test_dicom_sheared_stack_gantry_tilt(real_data, tmp_path):
    def tilt(files):
        for n, f in enumerate(files):
            _shift_z(f, dx=0.5 * n)

    folder = _dicom_copy(real_data, tmp_path / "tilt", tilt)
    with pytest.raises(UserInputError, match="sheared"):
        read_volume(folder)


def test_dicom_truncated_file(real_data, tmp_path):
    def cut(files):
        files[6].write_bytes(files[6].read_bytes()[:3000])

    folder = _dicom_copy(real_data, tmp_path / "cut", cut)
    with pytest.raises(UserInputError, match="gap.*could not be read and were skipped") as info:
        read_volume(folder)
    assert "\n" not in str(info.value)


def test_dicom_truncated_edge_file_is_reported(real_data, tmp_path, plain_series):
    folder = _dicom_copy(real_data, tmp_path / "edge", lambda files: files[-1].write_bytes(files[-1].read_bytes()[:3000]))
    notes: list[str] = []
    vol = read_volume(folder, notes=notes)
    assert vol.shape[0] == 19 and any("could not be read" in n for n in notes)


def test_dicom_folder_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(UserInputError, match="no DICOM series found"):
        read_volume(tmp_path)


# == paths and output folders ====================================================================
def test_unicode_and_spaces_in_every_path(study, weights, tmp_path):
    folder = tmp_path / "Patiënt Ünïcode 病人 folder"
    folder.mkdir()
    shutil.copy(study / "ct.nrrd", folder / "ct scan é.nrrd")
    shutil.copy(study / "liver.nii.gz", folder / "liver mask ü.nii.gz")
    out = tmp_path / "résultats 結果 out"
    proc = cli("classify", folder / "ct scan é.nrrd", "--liver-mask", folder / "liver mask ü.nii.gz", "--weights", weights,
               "--out", out, "--quiet", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(RESULT_FILES)
    assert read_volume(out / "labelmap.nii.gz").same_geometry(read_volume(folder / "ct scan é.nrrd"), tol=1e-6)


def test_unicode_dicom_folder(real_data, tmp_path, plain_series):
    folder = _dicom_copy(real_data, tmp_path / "série dicom 病人")
    assert read_volume(folder).same_geometry(plain_series, tol=1e-9)


def test_output_under_a_regular_file_fails_before_the_model_runs(study, weights, tmp_path):
    blocker = tmp_path / "report.pdf"
    blocker.write_text("a file, not a folder")
    proc = cli("classify", study / "ct.nrrd", "--liver-mask", study / "liver.nii.gz", "--weights", weights,
               "--out", blocker / "sub", "--progress-format", "jsonl", "--device", "cpu")
    assert_one_line_error(proc.returncode, proc.stderr, "is a file, not a folder")
    assert '"stage": "model"' not in proc.stdout  # refused up front, not after the work


@pytest.mark.parametrize("where", ["file", "proc"])
def test_unwritable_output_folder(study, weights, tmp_path, capsys, where):
    out = {"file": tmp_path / "out.nii.gz", "proc": Path("/proc/dadrn-out")}[where]
    if where == "file":
        out.write_text("an existing file")
    elif not Path("/proc").is_dir():
        pytest.skip("no /proc on this system")
    code, err = in_process_cli(capsys, "classify", study / "ct.nrrd", "--liver-mask", study / "liver.nii.gz",
                               "--weights", weights, "--out", out)
    assert_one_line_error(code, err, "--out")


def _tmpfs(mount_point: Path, size: str) -> bool:
    mount_point.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True)
    return proc.returncode == 0


def _fill(folder: Path, leave: int) -> None:
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    with open(folder / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


@pytest.fixture
def full_disk(tmp_path):
    """A real tiny filesystem (tmpfs) that is almost full; skips where mounting is not allowed."""
    mount_point = tmp_path / "small-disk"
    if not _tmpfs(mount_point, "256k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated full-disk test covers this")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)


def test_nifti_written_to_a_full_disk_is_an_error_not_a_truncated_file(full_disk):
    # SimpleITK's NIfTI writer only prints to stderr and leaves a truncated file on a full disk.
    _fill(full_disk, 16 * 1024)
    noise = np.random.default_rng(0).normal(0, 300, (20, 64, 64)).astype(np.float32)
    with pytest.raises(WriteError, match="disk"):
        write_volume(Volume(noise), full_disk / "heatmap.nii.gz")


def test_results_on_a_full_disk(full_disk, model):
    ct, liver = make_abdomen()
    result = run(ct, liver, model)
    _fill(full_disk, 24 * 1024)
    out = full_disk / "out"
    with pytest.raises(UserInputError, match="cannot write results to .*free some disk space"):
        write_results(result, out, ct=ct)
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]  # no partial folder left


def test_results_on_a_full_disk_simulated(tmp_path, model, monkeypatch):
    """ENOSPC simulated by making `outputs.write_seg_nrrd` raise it, for machines that cannot mount
    a tmpfs: earlier files are already staged, old results must survive."""
    ct, liver = make_abdomen()
    result = run(ct, liver, model)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("previous results")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs, "write_seg_nrrd", no_space)
    with pytest.raises(UserInputError, match="No space left on device.*free some disk space"):
        write_results(result, out, ct=ct, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "report.json").read_text() == "previous results"


# == resource limits =============================================================================
def _huge_header(folder: Path) -> Path:
    """A detached NRRD header claiming 4096 x 4096 x 8000 voxels (256 GiB) over a 1 KB data file."""
    (folder / "huge.raw").write_bytes(b"\0" * 1024)
    header = folder / "huge.nhdr"
    header.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 4096 4096 8000\nspacings: 0.1 0.1 0.1\n"
                      "endian: little\nencoding: raw\ndata file: huge.raw\n")
    return header


def test_volume_too_large_for_memory_is_refused_before_reading(tmp_path):
    header = _huge_header(tmp_path)
    for stage in ("read", "pipeline"):
        with pytest.raises(MemoryLimitError, match=r"4096x4096x8000 voxels \(268\.4 GB of 16-bit data\).* GB .*crop"):
            read_volume(header, memory_for=stage)


def test_volume_too_large_for_memory_through_the_cli(tmp_path, weights):
    proc = cli("classify", _huge_header(tmp_path), "--weights", weights, "--out", tmp_path / "o")
    assert_one_line_error(proc.returncode, proc.stderr, "4096x4096x8000", "GB", "memory")
    assert not (tmp_path / "o").exists()


def test_memory_estimate_and_check():
    free = available_memory_bytes()
    assert free is None or free > 0
    n = 512 * 512 * 300
    assert estimate_bytes(n, 2, "pipeline") > estimate_bytes(n, 2, "read") >= 2 * n * 2
    check_fits((512, 512, 300), 2, available=64 * 2**30)
    with pytest.raises(MemoryLimitError, match=r"512x512x300 voxels .* needs about [0-9.]+ GB .* only 1\.1 GB"):
        check_fits((512, 512, 300), 2, available=2**30)


def test_memory_check_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("DADRN_MEMORY_CHECK", "off")
    check_fits((4096, 4096, 8000), 2, available=2**30)


# == one line, no traceback, through the real command line =======================================
def _file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("make, needle", [
    (lambda d: _file(d / "ct.nii.gz", b"\x1f\x8b" + b"\0" * 50), "cannot read"),
    (lambda d: (sitk.WriteImage(sitk.Image([16, 16, 4, 2], sitk.sitkInt16), str(d / "t.nii.gz")), d / "t.nii.gz")[1], "4D image"),
])
def test_cli_bad_image_one_line(tmp_path, weights, capsys, make, needle):
    code, err = in_process_cli(capsys, "classify", make(tmp_path), "--weights", weights, "--out", tmp_path / "o")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_cli_non_binary_mask_one_line(study, weights, tmp_path, capsys):
    ct, liver = make_abdomen()
    organs = write_volume(liver.with_array(liver.array * np.uint8(5) + (ct.array > 0).astype(np.uint8)), tmp_path / "organs.nrrd")
    code, err = in_process_cli(capsys, "classify", study / "ct.nrrd", "--liver-mask", organs, "--weights", weights,
                               "--out", tmp_path / "o")
    assert_one_line_error(code, err, "not binary")


def test_cli_dicom_gap_one_line(real_data, tmp_path, weights, capsys):
    folder = _dicom_copy(real_data, tmp_path / "gap", lambda files: files[4].unlink())
    code, err = in_process_cli(capsys, "classify", folder, "--weights", weights, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "gap")


# == weights are data: what test_weights.py does not cover =======================================
def _checkpoint_with(tmp_path: Path, change_state=None, change_card=None) -> Path:
    import json

    from safetensors.torch import save_file

    from DADRNLesionLib.weights import card_path_for, sha256_of

    loaded = random_model(TINY, InputSpec(size=64), seed=5)
    state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    if change_state:
        change_state(state)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    card = ModelCard("w", loaded.model.config, InputSpec(size=64), sha256=sha256_of(path)).to_dict()
    if change_card:
        change_card(card)
    card_path_for(path).write_text(json.dumps(card))
    return path


def _nan_fc(state):
    state["fc.weight"][0, 0] = float("nan")


def _negative_variance(state):
    key = next(k for k in state if k.endswith("running_var"))
    state[key] = -state[key].abs() - 1


@pytest.mark.parametrize("damage", [_nan_fc, _negative_variance])
def test_weights_that_give_nan_are_refused_not_read_as_normal(tmp_path, capsys, study, damage):
    """NaN probabilities argmax to class 0 ("normal"): without a check, every slice would be normal."""
    weights = _checkpoint_with(tmp_path, change_state=damage)
    code, err = in_process_cli(capsys, "classify", study / "ct.nrrd", "--liver-mask", study / "liver.nii.gz",
                               "--weights", weights, "--device", "cpu", "--out", tmp_path / "o")
    # NaN tensors are refused when the weights load; NaN that only arises at inference (a negative
    # BatchNorm variance) is refused when the probabilities come out.
    assert_one_line_error(code, err, "NaN" if damage is _nan_fc else "non-finite probabilities", "another checkpoint")
    assert not (tmp_path / "o").exists()


def test_half_precision_weights_load_as_float32(tmp_path):
    import torch

    from DADRNLesionLib.weights import load_checkpoint

    half = _checkpoint_with(tmp_path, change_state=lambda s: s.update({k: v.half() for k, v in s.items() if v.is_floating_point()}))
    loaded = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    reference = random_model(TINY, InputSpec(size=64), seed=5).model
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(loaded.model(x), reference(x), atol=1e-2)


@pytest.mark.parametrize("change_card", [
    lambda c: c.update(format=99),  # a newer card format than this version knows
    lambda c: c.update(architecture_name="DADRN-B (drn_a_50, softmax, concat)"),  # names another architecture
    lambda c: c["input"].update(margin_mm=float("nan")),
], ids=["future-format", "other-architecture-name", "nan-margin"])
def test_inconsistent_cards_are_refused(tmp_path, change_card):
    from DADRNLesionLib.errors import WeightsError
    from DADRNLesionLib.weights import load_checkpoint

    with pytest.raises(WeightsError):
        load_checkpoint(_checkpoint_with(tmp_path, change_card=change_card))


def test_card_that_is_not_a_json_object_is_refused(tmp_path):
    from DADRNLesionLib.errors import WeightsError
    from DADRNLesionLib.weights import card_path_for, load_checkpoint

    path = _checkpoint_with(tmp_path)
    card_path_for(path).write_text("[1, 2, 3]")
    with pytest.raises(WeightsError):
        load_checkpoint(path)
