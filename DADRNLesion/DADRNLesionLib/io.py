"""Reading CT volumes and masks (NIfTI, NRRD, MHA, DICOM series) and writing volumes, with SimpleITK.

Every reader returns a `Volume` in LPS, the convention of ITK, DICOM and NIfTI readers, so geometry
passes through unchanged; every failure is a `UserInputError` that says what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .errors import UserInputError
from .volume import Volume

__all__ = ["read_volume", "read_mask", "write_volume", "align_to_grid", "volume_from_sitk", "volume_to_sitk", "VOLUME_SUFFIXES", "dicom_series_in"]

PathLike = Union[str, os.PathLike]
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd")


def _sitk():
    import SimpleITK as sitk  # imported lazily: Slicer ships its own and tests may not need it

    return sitk


def volume_from_sitk(image) -> Volume:
    if image.GetDimension() != 3:
        raise UserInputError(f"the image is {image.GetDimension()}D; a 3D CT volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserInputError(
            f"the image has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector); "
            "a single-component CT volume in Hounsfield units is needed"
        )
    sitk = _sitk()
    array = sitk.GetArrayFromImage(image)
    return Volume(array, image.GetSpacing(), image.GetOrigin(), np.array(image.GetDirection()).reshape(3, 3))


def volume_to_sitk(volume: Volume):
    sitk = _sitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array), isVector=False)
    image.SetSpacing(tuple(float(s) for s in volume.spacing))
    image.SetOrigin(tuple(float(o) for o in volume.origin))
    image.SetDirection(tuple(float(v) for v in volume.direction.flatten()))
    return image


def dicom_series_in(folder: PathLike) -> dict[str, list[str]]:
    """Series instance UID -> sorted file names, for every DICOM series directly in `folder`."""
    sitk = _sitk()
    folder = str(folder)
    series = {}
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ():
        series[uid] = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
    return series


def _read_dicom_folder(folder: Path, series_uid: Optional[str]):
    sitk = _sitk()
    series = dicom_series_in(folder)
    if not series:
        raise UserInputError(f"no DICOM series found in folder {folder}: point INPUT at a folder of DICOM files, or at a NIfTI/NRRD/MHA file")
    if series_uid is not None:
        if series_uid not in series:
            raise UserInputError(f"series {series_uid} is not in {folder}; series there: {', '.join(series)}")
        files = series[series_uid]
    elif len(series) > 1:
        listing = "; ".join(f"{uid} ({len(files)} files)" for uid, files in series.items())
        raise UserInputError(
            f"{folder} holds {len(series)} DICOM series ({listing}): put one series per folder or choose one with --series UID"
        )
    else:
        files = next(iter(series.values()))
    if len(files) < 1:
        raise UserInputError(f"the DICOM series in {folder} has no readable files")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOff()
    image = reader.Execute()
    _check_dicom_spacing(files, image)
    return image


def _check_dicom_spacing(files: list[str], image) -> None:
    """Refuse series with gaps or uneven slice steps: stacking them would misplace voxels."""
    if len(files) < 3:
        return
    sitk = _sitk()
    positions = []
    for name in files:
        r = sitk.ImageFileReader()
        r.SetFileName(name)
        try:
            r.ReadImageInformation()
            positions.append([float(v) for v in r.GetMetaData("0020|0032").split("\\")])
        except RuntimeError:
            return  # no positions to check: trust the reader's geometry
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    z = np.sort(np.asarray(positions) @ normal)
    steps = np.diff(z)
    if steps.size and (steps.min() <= 1e-3 or steps.max() - steps.min() > 0.01 * max(abs(np.median(steps)), 1e-3) + 0.01):
        raise UserInputError(
            f"the DICOM series has uneven slice positions (steps {steps.min():.3g} to {steps.max():.3g} mm: missing, "
            "duplicate or mixed slices); export a complete axial series, or convert it to NIfTI/NRRD with resampling"
        )


def read_volume(path: PathLike, *, series_uid: Optional[str] = None) -> Volume:
    """A CT volume from a NIfTI/NRRD/MHA file or a folder holding one DICOM series."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path} does not exist: check the path")
    sitk = _sitk()
    try:
        if path.is_dir():
            image = _read_dicom_folder(path, series_uid)
        else:
            if path.stat().st_size == 0:
                raise UserInputError(f"{path} is empty (0 bytes): the file was not written completely; export it again")
            image = sitk.ReadImage(str(path))
    except UserInputError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "ERROR" in line or "error" in line), first[-1] if first else "")
        raise UserInputError(
            f"cannot read {path} as an image ({detail.strip()[:160]}): use a NIfTI (.nii/.nii.gz), NRRD, MHA file or a DICOM series folder"
        ) from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() == 2:
        raise UserInputError(f"{path} is a 2D image; a 3D CT volume (a series of axial slices) is needed")
    if image.GetDimension() > 3:
        raise UserInputError(f"{path} is a {image.GetDimension()}D image (e.g. a time series); extract one 3D CT volume first")
    return volume_from_sitk(image)


def read_mask(path: PathLike, like: Optional[Volume] = None, *, what: str = "liver mask") -> Volume:
    """A binary mask (any non-zero voxel is inside), checked to lie on `like`'s voxel grid."""
    mask = read_volume(path)
    if like is not None:
        mask = align_to_grid(mask, like, what)
    if not np.issubdtype(mask.array.dtype, np.integer) and not np.isfinite(mask.array).all():
        raise UserInputError(f"the {what} {path} contains NaN or infinite values; save it as an integer label map")
    return mask.with_array((mask.array > 0).astype(np.uint8))


def align_to_grid(mask: Volume, like: Volume, what: str = "mask") -> Volume:
    """`mask` on `like`'s index order when both cover the same voxels, e.g. a label file whose
    j axis is stored flipped; anything else is a geometry mismatch (never resampled silently)."""
    if like.same_geometry(mask):
        return mask
    from .orientation import to_axial_frame

    mask_c, _ = to_axial_frame(mask)
    like_c, like_frame = to_axial_frame(like)
    if like_c.same_geometry(mask_c):
        return like.with_array(like_frame.from_canonical(mask_c.array))
    like.require_same_geometry(mask, what)
    return mask


def write_volume(volume: Volume, path: PathLike, *, compress: bool = True) -> Path:
    sitk = _sitk()
    path = Path(path)
    sitk.WriteImage(volume_to_sitk(volume), str(path), compress)
    return path
